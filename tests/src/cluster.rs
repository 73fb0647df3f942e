//! A controller and daemons in a lab, driven with the CLI: shared by the end-to-end tests and
//! the propagation benchmark.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::netns::Lab;
use crate::{Run, TempDir, bin, run};

/// The controller's underlay address (the lab's first host).
pub const CTL: &str = "198.18.0.1";

/// A policy for two-node labs: `web-1` in segment `web`, `db-1` in segment `db`, on `cidr`,
/// followed by `rest` (its rules, and posture or quarantine blocks).
pub fn web_db_policy(name: &str, cidr: &str, rest: &str) -> String {
    format!(
        "version: 1
network: {{ name: {name}, cidr: {cidr} }}
identities:
  web-1: {{ labels: {{ tier: web }} }}
  db-1: {{ labels: {{ tier: db }} }}
segments:
  web: {{ match: {{ tier: web }} }}
  db: {{ match: {{ tier: db }} }}
{rest}"
    )
}

/// Unix time in milliseconds.
pub fn unix_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

/// A lab running a controller in `ctl` and daemons in the other namespaces.
#[derive(Debug)]
pub struct Cluster {
    /// The namespaces: `ctl` and one per node.
    pub lab: Lab,
    /// Scratch files (policies).
    pub files: TempDir,
    /// Labels of the current controller and daemon processes (restarts get new labels).
    /// Label of the running controller process.
    pub controller: String,
    /// Label of each node's running daemon process.
    pub daemons: BTreeMap<String, String>,
    /// Overlay address of each identity, as `bulkhead nodes` reports it.
    pub addresses: BTreeMap<String, String>,
    /// A command the controller and the daemons are started through (e.g. a shell that sets a
    /// umask first); empty: started directly.
    pub wrap: Vec<String>,
}

impl Cluster {
    /// A lab with a `ctl` namespace and one per node; nothing started yet.
    pub fn new(nodes: &[&str]) -> Cluster {
        let mut names = vec!["ctl"];
        names.extend(nodes);
        Cluster {
            lab: Lab::new(&names),
            files: TempDir::new("overlay"),
            controller: String::new(),
            daemons: BTreeMap::new(),
            addresses: BTreeMap::new(),
            wrap: Vec::new(),
        }
    }

    pub fn state(&self, host: &str) -> String {
        self.lab.host(host).dir.join("state").display().to_string()
    }

    pub fn admin(&self) -> String {
        format!("{}/admin.yaml", self.state("ctl"))
    }

    /// The CLI, run in the controller's namespace with the administrator's config.
    pub fn cli(&self, args: &[&str]) -> Run {
        let b = bin("bulkhead").display().to_string();
        let admin = self.admin();
        let mut full = vec![b.as_str(), "--config", admin.as_str()];
        full.extend_from_slice(args);
        self.lab.exec("ctl", &full).into()
    }

    /// Starts the controller in `ctl` (with `extra` arguments) and waits until it answers.
    pub fn start_controller(&mut self, label: &str, policy: &str, extra: &[&str]) {
        let b = bin("bulkhead-controller").display().to_string();
        let state = self.state("ctl");
        let listen = format!("{CTL}:7443");
        let mut args: Vec<&str> = self.wrap.iter().map(String::as_str).collect();
        args.extend([
            b.as_str(),
            "--listen",
            &listen,
            "--state",
            &state,
            "--policy",
            policy,
        ]);
        args.extend_from_slice(extra);
        self.lab.spawn("ctl", label, &args);
        self.controller = label.to_string();
        let up = Lab::until(Duration::from_secs(15), || {
            std::path::Path::new(&self.admin()).exists() && self.cli(&["status"]).code == Some(0)
        });
        assert!(
            up,
            "controller did not come up:\n{}",
            self.lab.log("ctl", label)
        );
    }

    pub fn start_daemon(&mut self, name: &str, label: &str, token: Option<&str>) {
        self.start_daemon_with(name, label, token, &[]);
    }

    /// Starts a daemon with `extra` arguments (such as `--config FILE`).
    pub fn start_daemon_with(
        &mut self,
        name: &str,
        label: &str,
        token: Option<&str>,
        extra: &[&str],
    ) {
        let b = bin("bulkheadd").display().to_string();
        let state = self.state(name);
        let iface = self.lab.host(name).interface.clone();
        let mut args: Vec<&str> = self.wrap.iter().map(String::as_str).collect();
        args.extend([
            b.as_str(),
            "run",
            "--state",
            &state,
            "--interface",
            &iface,
            "--listen-port",
            "51820",
        ]);
        if let Some(t) = token {
            args.extend(["--token", t]);
        }
        args.extend_from_slice(extra);
        self.lab.spawn(name, label, &args);
        self.daemons.insert(name.to_string(), label.to_string());
    }

    pub fn token(&self, name: &str) -> String {
        let r = self.cli(&["token", "create", name, "--ttl", "10m"]);
        assert_eq!(r.code, Some(0), "{}", r.stderr);
        assert_eq!(
            r.stdout.lines().count(),
            1,
            "the token and nothing else on stdout"
        );
        r.stdout.trim().to_string()
    }

    pub fn nodes(&self) -> Vec<serde_json::Value> {
        let r = self.cli(&["nodes", "-o", "json"]);
        assert_eq!(r.code, Some(0), "{}", r.stderr);
        r.json().as_array().cloned().unwrap_or_default()
    }

    /// Waits until every daemon is online and enforces the allowlist the live policy gives it.
    pub fn converge(&mut self, names: &[&str]) {
        let ok = Lab::until(Duration::from_secs(20), || {
            let nodes = self.nodes();
            names.iter().all(|n| {
                nodes
                    .iter()
                    .any(|v| v["identity"] == *n && v["online"] == true && v["in_sync"] == true)
            })
        });
        assert!(
            ok,
            "nodes did not converge: {:#?}\n{}",
            self.nodes(),
            self.logs()
        );
        for v in self.nodes() {
            if let (Some(n), Some(a)) = (v["identity"].as_str(), v["address"].as_str()) {
                self.addresses.insert(n.to_string(), a.to_string());
            }
        }
    }

    pub fn logs(&self) -> String {
        let mut s = format!("--- controller\n{}", self.lab.log("ctl", &self.controller));
        for (n, l) in &self.daemons {
            s += &format!("--- {n}\n{}", self.lab.log(n, l));
        }
        s
    }

    pub fn connect(&self, from: &str, to: &str, port: u16) -> bool {
        let probe = bin("bh-probe").display().to_string();
        self.lab
            .exec(
                from,
                &[
                    &probe,
                    "connect",
                    &self.addresses[to],
                    &port.to_string(),
                    "1000",
                ],
            )
            .status
            .success()
    }

    /// Connects, allowing a few tries for a first handshake. Only for what must get through.
    pub fn connect_eventually(&self, from: &str, to: &str, port: u16) -> bool {
        (0..4).any(|_| self.connect(from, to, port))
    }

    /// Posts a flow batch to the controller as `node`, with its own credential (from its state
    /// directory), the way a compromised node could; returns the HTTP status.
    pub fn post_flows_as(&self, node: &str, batch: &serde_json::Value) -> u16 {
        let state = self.state(node);
        let enrollment: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(format!("{state}/enrollment.json")).expect("enrollment"),
        )
        .expect("enrollment json");
        let pem = |field: &str| {
            self.files.write(
                &format!("{node}-{field}.pem"),
                enrollment[field].as_str().expect("pem"),
            )
        };
        let (cert, key, ca) = (pem("certificate"), pem("key"), pem("ca"));
        let body = self
            .files
            .write(&format!("{node}-batch.json"), &batch.to_string());
        let url = format!("https://{CTL}:7443/v1/node/flows");
        let out = self.lab.exec(
            node,
            &[
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "10",
                "--cacert",
                &ca,
                "--cert",
                &cert,
                "--key",
                &key,
                "-H",
                "content-type: application/json",
                "--data-binary",
                &format!("@{body}"),
                &url,
            ],
        );
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0)
    }

    pub fn pubkey(&self, name: &str) -> String {
        let r = run("bulkheadd", &["pubkey", "--state", &self.state(name)]);
        r.stdout.trim().to_string()
    }

    pub fn wg_peers(&self, on: &str) -> BTreeSet<String> {
        let o = self
            .lab
            .exec(on, &["wg", "show", &self.lab.host(on).interface, "peers"]);
        assert!(
            o.status.success(),
            "wg show: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }

    pub fn hold(&mut self, from: &str, to: &str, port: u16, secs: u64, label: &str) {
        let probe = bin("bh-probe").display().to_string();
        let addr = self.addresses[to].clone();
        self.lab.spawn(
            from,
            label,
            &[&probe, "hold", &addr, &port.to_string(), &secs.to_string()],
        );
    }

    /// Waits for a hold to finish: `Ok` if the flow lasted, `Err(unix ms it broke)` if not.
    pub fn held(&mut self, from: &str, label: &str) -> Result<(), u128> {
        let code = self.lab.wait(from, label, Duration::from_secs(30));
        let log = self.lab.log(from, label);
        match code {
            Some(0) => Ok(()),
            Some(1) => Err(log
                .split_whitespace()
                .last()
                .and_then(|t| t.parse().ok())
                .unwrap_or_else(|| panic!("hold output: {log}"))),
            c => panic!("hold {from}/{label} ended with {c:?}: {log}"),
        }
    }
}
