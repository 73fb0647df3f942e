//! `bh-probe`: the lab's traffic probes (`bulkhead_netlab::probe`) as a program, run by the
//! end-to-end tests inside their network namespaces.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    ExitCode::from(bulkhead_netlab::probe::run(&args))
}
