//! Posture facts: what the daemon reports about its host, and its node-local checks.
//!
//! Host facts (`os.id`, `os.version_id`, `kernel.release`, `root_fs.encrypted`,
//! `daemon.version`) are read at start and every [`HOST_INTERVAL`]. Each check of the
//! `--config` file runs its command every `interval`; exit 0 is `check.NAME: true`, anything
//! else (including a command that does not exist, or one still running when its interval is
//! up, which is then killed) is `false`. The controller never sends commands: it only reads
//! these facts.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use bulkhead_proto::{Fact, Facts};
use serde::Deserialize;
use tokio::sync::watch;

/// How often host facts are read again, seconds.
pub const HOST_INTERVAL: u64 = 30;

/// `bulkheadd run --config FILE`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// Node-local checks, by name.
    #[serde(default)]
    pub posture_checks: BTreeMap<String, CheckSpec>,
}

/// One node-local check.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckSpec {
    /// The program and its arguments (no shell).
    pub command: Vec<String>,
    /// How often it runs, like `30s`, `5m` (default 30s). Also its time limit.
    #[serde(default = "default_interval")]
    pub interval: String,
}

fn default_interval() -> String {
    "30s".into()
}

/// Parses `500ms`, `30s`, `5m`, `1h`.
pub fn parse_interval(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?}: expected a duration like 30s"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return Err(format!("{s:?}: expected a duration like 30s")),
    };
    if d < Duration::from_millis(100) {
        return Err(format!("{s:?}: at least 100ms"));
    }
    Ok(d)
}

impl DaemonConfig {
    /// Reads and checks the file; any problem is an error naming the file (and, for YAML
    /// errors, the line and column).
    pub fn load(path: &Path) -> anyhow::Result<DaemonConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let c: DaemonConfig = serde_saphyr::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        for (name, check) in &c.posture_checks {
            let bad_name = name.is_empty()
                || name.len() > 63
                || !name
                    .chars()
                    .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '-')
                || name.starts_with('-');
            if bad_name {
                anyhow::bail!(
                    "{}: posture check {name:?}: names are 1-63 characters of [a-z0-9-]",
                    path.display()
                );
            }
            if check.command.is_empty() {
                anyhow::bail!("{}: posture check {name}: empty command", path.display());
            }
            parse_interval(&check.interval)
                .map_err(|e| anyhow::anyhow!("{}: posture check {name}: {e}", path.display()))?;
        }
        Ok(c)
    }
}

/// `ID=value` from os-release text.
fn os_release_field(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let v = l.strip_prefix(key)?.strip_prefix('=')?;
        Some(v.trim().trim_matches('"').trim_matches('\'').to_string())
    })
}

/// Whether `/` is on dm-crypt (LUKS): the root mount's device is a device-mapper target whose
/// uuid starts with `CRYPT-`, directly or through the devices under it.
fn root_encrypted() -> bool {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return false;
    };
    // The last mount on `/` is the one in effect.
    let Some(dev) = mounts.lines().rev().find_map(|l| {
        let mut f = l.split_whitespace();
        let (dev, at) = (f.next()?, f.next()?);
        (at == "/").then_some(dev)
    }) else {
        return false;
    };
    let Ok(real) = std::fs::canonicalize(dev) else {
        return false;
    };
    let Some(name) = real.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    crypt_below(name, 0)
}

fn crypt_below(block: &str, depth: u32) -> bool {
    if depth > 8 {
        return false;
    }
    let sys = Path::new("/sys/class/block").join(block);
    if std::fs::read_to_string(sys.join("dm/uuid")).is_ok_and(|u| u.starts_with("CRYPT-")) {
        return true;
    }
    std::fs::read_dir(sys.join("slaves")).is_ok_and(|d| {
        d.flatten().any(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| crypt_below(n, depth + 1))
        })
    })
}

/// The host facts now.
pub fn host_facts() -> Facts {
    let os = std::fs::read_to_string("/etc/os-release")
        .or_else(|_| std::fs::read_to_string("/usr/lib/os-release"))
        .unwrap_or_default();
    let fact = |v: String| Fact {
        value: v,
        interval: HOST_INTERVAL,
    };
    let mut f = Facts::new();
    if let Some(id) = os_release_field(&os, "ID") {
        f.insert("os.id".into(), fact(id));
    }
    if let Some(v) = os_release_field(&os, "VERSION_ID") {
        f.insert("os.version_id".into(), fact(v));
    }
    if let Ok(k) = std::fs::read_to_string("/proc/sys/kernel/osrelease") {
        f.insert("kernel.release".into(), fact(k.trim().to_string()));
    }
    f.insert(
        "root_fs.encrypted".into(),
        fact(root_encrypted().to_string()),
    );
    f.insert(
        "daemon.version".into(),
        fact(env!("CARGO_PKG_VERSION").to_string()),
    );
    f
}

/// Runs one check once: true if it exits 0 within `limit`; killed and false otherwise.
pub async fn run_check(command: &[String], limit: Duration) -> bool {
    let Some((prog, args)) = command.split_first() else {
        return false;
    };
    let child = tokio::process::Command::new(prog)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(command = ?command, error = %e, "posture check cannot start: failing");
            return false;
        }
    };
    match tokio::time::timeout(limit, child.wait()).await {
        Ok(Ok(st)) => st.success(),
        Ok(Err(_)) => false,
        Err(_) => {
            tracing::warn!(command = ?command, limit = ?limit, "posture check still running at its interval: killed, failing");
            let _ = child.kill().await;
            false
        }
    }
}

/// Keeps `tx` holding the current facts: host facts every [`HOST_INTERVAL`], each check every
/// its interval. Runs until `tx` has no receivers.
pub async fn run(config: DaemonConfig, tx: watch::Sender<Facts>) {
    let mut tasks = tokio::task::JoinSet::new();
    for (name, spec) in config.posture_checks {
        let interval = parse_interval(&spec.interval).unwrap_or(Duration::from_secs(30));
        let tx = tx.clone();
        tasks.spawn(async move {
            let key = format!("check.{name}");
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let pass = run_check(&spec.command, interval).await;
                let fact = Fact {
                    value: pass.to_string(),
                    interval: interval.as_secs().max(1),
                };
                let changed = tx.send_if_modified(|f| {
                    if f.get(&key) == Some(&fact) {
                        false
                    } else {
                        f.insert(key.clone(), fact);
                        true
                    }
                });
                if changed {
                    tracing::info!(check = %name, pass, "posture check changed");
                }
                if tx.is_closed() {
                    return;
                }
            }
        });
    }
    let mut tick = tokio::time::interval(Duration::from_secs(HOST_INTERVAL));
    loop {
        tick.tick().await;
        let host = host_facts();
        tx.send_if_modified(|f| {
            let mut changed = false;
            for (k, v) in &host {
                if f.get(k) != Some(v) {
                    f.insert(k.clone(), v.clone());
                    changed = true;
                }
            }
            changed
        });
        if tx.is_closed() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_and_os_release() {
        assert_eq!(parse_interval("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_interval("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_interval("500ms").unwrap(), Duration::from_millis(500));
        assert!(parse_interval("5").is_err());
        assert!(parse_interval("10ms").is_err());
        let text = "PRETTY_NAME=\"Debian GNU/Linux 12\"\nID=debian\nVERSION_ID=\"12\"\n";
        assert_eq!(os_release_field(text, "ID").as_deref(), Some("debian"));
        assert_eq!(os_release_field(text, "VERSION_ID").as_deref(), Some("12"));
        let f = host_facts();
        assert!(f.contains_key("kernel.release") && f.contains_key("daemon.version"));
    }

    #[test]
    fn config_errors_name_the_file_and_the_check() {
        let dir = std::env::temp_dir().join(format!("bh-posture-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("c.yaml");
        std::fs::write(
            &p,
            "posture_checks:\n  edr: {command: [true], interval: 2s}\n",
        )
        .unwrap();
        let c = DaemonConfig::load(&p).unwrap();
        assert_eq!(c.posture_checks["edr"].command, ["true"]);
        for (text, want) in [
            (
                "posture_checks:\n  edr: {command: [], interval: 2s}\n",
                "empty command",
            ),
            (
                "posture_checks:\n  edr: {command: [x], interval: 2}\n",
                "duration",
            ),
            ("posture_checks:\n  Bad: {command: [x]}\n", "names are"),
            ("posture_check: {}\n", "c.yaml"),
        ] {
            std::fs::write(&p, text).unwrap();
            let e = format!("{:#}", DaemonConfig::load(&p).unwrap_err());
            assert!(e.contains(want) && e.contains("c.yaml"), "{text}: {e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_check_that_hangs_is_killed_and_fails() {
        let t = std::time::Instant::now();
        assert!(!run_check(&["sleep".into(), "30".into()], Duration::from_millis(300)).await);
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(run_check(&["true".into()], Duration::from_secs(5)).await);
        assert!(!run_check(&["false".into()], Duration::from_secs(5)).await);
        assert!(!run_check(&["/nonexistent/x".into()], Duration::from_secs(5)).await);
    }
}
