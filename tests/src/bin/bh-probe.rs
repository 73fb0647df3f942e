//! `bh-probe`: the lab's traffic probes (`bulkhead_netlab::probe`) as a program, run by the
//! end-to-end tests inside their network namespaces.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // WireGuard probes need boringtun, which netlab (shared with the CLI) must not link.
    if args.first().map(String::as_str) == Some("handshake-flood") {
        return ExitCode::from(bulkhead_e2e::handshake_flood::run(&args));
    }
    ExitCode::from(bulkhead_netlab::probe::run(&args))
}
