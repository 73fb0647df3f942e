//! Process limits both binaries raise at start.
//!
//! A controller holds a connection per node (and the daemon a socket per scrape and UAPI
//! client): the default soft limit of 1,024 open files is too few for the 1,000 nodes the
//! operations guide promises. The hard limit is the administrator's (systemd's `LimitNOFILE`);
//! the soft one is raised to it.

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// Raises the soft limit on open files to the hard one; returns the limit now in force.
pub fn raise_open_files() -> Option<u64> {
    let now = getrlimit(Resource::Nofile);
    if now.current != now.maximum {
        let raised = Rlimit {
            current: now.maximum,
            maximum: now.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!(error = %e, "cannot raise the open-files limit");
        }
    }
    getrlimit(Resource::Nofile).current
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_rises_to_the_hard_one() {
        let hard = getrlimit(Resource::Nofile).maximum;
        let low = Rlimit {
            current: Some(256),
            maximum: hard,
        };
        setrlimit(Resource::Nofile, low).unwrap();
        assert_eq!(getrlimit(Resource::Nofile).current, Some(256));
        assert_eq!(raise_open_files(), hard);
    }
}
