//! Logging for the two daemons (the controller and `bulkheadd`), set up the same way: to
//! stderr, colours only on a terminal, level from `BULKHEAD_LOG=error|warn|info|debug|trace`
//! (default info; a full filter language is not worth its build).

/// Installs the global subscriber.
pub fn init() {
    let level = std::env::var("BULKHEAD_LOG")
        .ok()
        .and_then(|l| l.parse::<tracing::Level>().ok())
        .unwrap_or(tracing::Level::INFO);
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_max_level(level)
        .init();
}
