//! Golden tests: policies in, each server's host firewall table out, as `nft list table`
//! shows it, under `testdata/` (`NAME.yaml` → `NAME.nft`).
//!
//! Servers get underlay addresses in name order from 198.18.0.2; the controller is at
//! 198.18.0.1:7443. After an intended change, regenerate with `BULKHEAD_UPDATE_GOLDEN=1 cargo
//! test -p bulkhead-hostfw --test golden` and review the diff like any other change.

#![allow(clippy::unwrap_used)] // test code: a panic is a failure with a message

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;

use bulkhead_hostfw::{Host, firewall, render::render, resolve};
use bulkhead_policy::{Compiled, Conditions, load};

/// 2027-01-01T00:00:00Z.
const NOW: i64 = 1_798_761_600;

fn tables(policy: &str) -> String {
    let l = load(policy, NOW, &BTreeMap::new());
    assert!(l.is_valid(), "{:?}", l.diagnostics);
    let m = l.model.expect("model");
    let lists = Compiled::new(&m, m.state(&Conditions::at(NOW))).allowlists(&m, 1);
    let names: Vec<String> = lists.iter().map(|a| a.identity.clone()).collect();
    let servers: BTreeMap<&str, Ipv4Addr> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), Ipv4Addr::new(198, 18, 0, i as u8 + 2)))
        .collect();
    let mut out = String::new();
    for list in &lists {
        let Some(u) = &list.underlay else {
            out += &format!("# {}: no host firewall\n\n", list.identity);
            continue;
        };
        let cfg = resolve(
            &list.identity,
            u,
            &servers,
            vec!["198.18.0.1:7443".parse().unwrap()],
        );
        let host = Host {
            interface: "bh0",
            overlay_address: list.address,
            wireguard_port: 51820,
            controllers: &[],
            nflog_group: bulkhead_hostfw::DEFAULT_NFLOG_GROUP,
        };
        out += &format!(
            "# {} ({})\n",
            list.identity,
            servers[list.identity.as_str()]
        );
        out += &firewall(&cfg, &host).map_or_else(|| "(off)\n".into(), |t| render(&t));
        out += "\n";
    }
    out
}

#[test]
fn host_firewalls_match_the_golden_files() {
    let update = std::env::var_os("BULKHEAD_UPDATE_GOLDEN").is_some();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
    let mut policies: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    policies.sort();
    assert!(policies.len() >= 2, "{policies:?}");
    let mut mismatches = Vec::new();
    for p in policies {
        let got = tables(&std::fs::read_to_string(&p).unwrap());
        let golden = p.with_extension("nft");
        if update {
            std::fs::write(&golden, &got).unwrap();
            continue;
        }
        if std::fs::read_to_string(&golden).ok().as_deref() != Some(got.as_str()) {
            mismatches.push(golden.display().to_string());
        }
    }
    assert!(
        mismatches.is_empty(),
        "differ: {mismatches:?}\nrerun with BULKHEAD_UPDATE_GOLDEN=1 if the change is intended"
    );
}
