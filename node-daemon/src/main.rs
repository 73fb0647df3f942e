//! `bulkheadd`, the node daemon. A thin main: everything is in the library.

use std::process::ExitCode;

fn main() -> ExitCode {
    bulkhead_node::main()
}
