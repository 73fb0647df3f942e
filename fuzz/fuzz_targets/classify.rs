//! The packet classifier on arbitrary bytes: it must never panic, and what it accepts must be
//! consistent with the bytes.
#![no_main]

use bulkhead_dataplane::packet::{Packet, classify};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Packet::V4(p)) = classify(data) {
        assert!(data.len() >= 20);
        assert_eq!(&data[12..16], &p.src.octets());
        assert_eq!(&data[16..20], &p.dst.octets());
        assert_eq!(data[9], p.proto);
    }
});
