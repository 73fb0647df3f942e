//! Standalone daemons in a lab: one `bulkheadd` per identity, each given its configuration as a
//! file (`--allowlist`) rather than by a controller, and the probes to check what passes.

use std::collections::BTreeMap;
use std::time::Duration;

use bulkhead_policy::{Compiled, Conditions};
use bulkhead_proto::{NodeConfig, PeerInfo, PublicKey};

use crate::netns::Lab;
use crate::{bin, run};

/// The UDP port every daemon listens on.
pub const PORT: u16 = 51820;

/// A lab running one daemon per identity of `policy`, each enforcing its compiled allowlist.
#[derive(Debug)]
pub struct Overlay {
    /// The namespaces and the processes started in them.
    pub lab: Lab,
    /// Each daemon's public key, by identity.
    pub keys: BTreeMap<String, PublicKey>,
    /// Each identity's overlay address (a test that moves one says so here).
    pub addresses: BTreeMap<String, String>,
    daemon_args: Vec<String>,
}

pub(crate) fn now() -> i64 {
    jiff::Timestamp::now().as_second()
}

/// Each identity's configuration under `policy`, with every lab host as a peer.
pub fn configs(
    policy: &str,
    lab: &Lab,
    keys: &BTreeMap<String, PublicKey>,
) -> BTreeMap<String, NodeConfig> {
    let l = bulkhead_policy::load(policy, now(), &BTreeMap::new());
    assert!(l.is_valid(), "{:?}", l.diagnostics);
    let m = l.model.expect("model");
    let c = Compiled::new(&m, m.state(&Conditions::at(now())));
    let peers: BTreeMap<String, PeerInfo> = lab
        .hosts
        .iter()
        .map(|h| {
            (
                h.name.clone(),
                PeerInfo {
                    public_key: keys[&h.name],
                    endpoint: Some(format!("{}:{PORT}", h.underlay).parse().expect("endpoint")),
                },
            )
        })
        .collect();
    c.allowlists(&m, 1)
        .into_iter()
        .map(|a| {
            (
                a.identity.clone(),
                NodeConfig {
                    allowlist: a,
                    peers: peers.clone(),
                    keepalive: None,
                    underlay: None,
                },
            )
        })
        .collect()
}

impl Overlay {
    pub fn start(policy: &str, names: &[&str]) -> Overlay {
        Overlay::start_with(policy, names, &[])
    }

    /// Like [`Overlay::start`], with more arguments for every `bulkheadd run`.
    pub fn start_with(policy: &str, names: &[&str], daemon_args: &[&str]) -> Overlay {
        Overlay::start_edited(policy, names, daemon_args, |_| {})
    }

    /// Like [`Overlay::start_with`], with each configuration passed through `edit` before its
    /// daemon starts.
    pub fn start_edited(
        policy: &str,
        names: &[&str],
        daemon_args: &[&str],
        edit: impl Fn(&mut NodeConfig),
    ) -> Overlay {
        let lab = Lab::new(names);
        let mut keys = BTreeMap::new();
        for h in &lab.hosts {
            let state = h.dir.join("state");
            let r = run(
                "bulkheadd",
                &["pubkey", "--state", &state.display().to_string()],
            );
            assert_eq!(r.code, Some(0), "{}", r.stderr);
            keys.insert(
                h.name.clone(),
                PublicKey::from_base64(&r.stdout).expect("public key"),
            );
        }
        let mut o = Overlay {
            lab,
            keys,
            addresses: BTreeMap::new(),
            daemon_args: daemon_args.iter().map(|a| a.to_string()).collect(),
        };
        let cfgs = configs(policy, &o.lab, &o.keys);
        for (name, cfg) in cfgs.iter().filter(|(n, _)| names.contains(&n.as_str())) {
            let mut cfg = cfg.clone();
            edit(&mut cfg);
            o.addresses
                .insert(name.clone(), cfg.allowlist.address.to_string());
            o.write_config(name, &cfg);
        }
        for name in names {
            o.start_daemon(name);
        }
        o
    }

    pub fn write_config(&self, name: &str, cfg: &NodeConfig) {
        let path = self.lab.host(name).dir.join("config.json");
        std::fs::write(&path, serde_json::to_string(cfg).expect("json")).expect("write config");
    }

    pub fn start_daemon(&mut self, name: &str) {
        let h = self.lab.host(name);
        let (state, cfg, iface) = (
            h.dir.join("state").display().to_string(),
            h.dir.join("config.json").display().to_string(),
            h.interface.clone(),
        );
        let bulkheadd = bin("bulkheadd").display().to_string();
        let mut args = vec![
            bulkheadd.as_str(),
            "run",
            "--state",
            &state,
            "--interface",
            &iface,
            "--listen-port",
            "51820",
            "--allowlist",
            &cfg,
        ];
        args.extend(self.daemon_args.iter().map(String::as_str));
        self.lab.spawn(name, "bulkheadd", &args);
        let up = Lab::until(Duration::from_secs(10), || {
            run("bulkheadd", &["status", "--interface", &iface]).code == Some(0)
        });
        assert!(
            up,
            "bulkheadd on {name} did not come up:\n{}",
            self.lab.log(name, "bulkheadd")
        );
    }

    pub fn addr(&self, name: &str) -> &str {
        &self.addresses[name]
    }

    pub fn ping(&self, from: &str, to: &str) -> bool {
        self.lab
            .exec(from, &["ping", "-c", "1", "-W", "1", self.addr(to)])
            .status
            .success()
    }

    /// Ping, allowing a few tries for the first handshake.
    pub fn ping_eventually(&self, from: &str, to: &str) -> bool {
        (0..3).any(|_| self.ping(from, to))
    }

    pub fn listen(&mut self, on: &str, port: u16) {
        let probe = bin("bh-probe").display().to_string();
        let p = port.to_string();
        self.lab
            .spawn(on, &format!("listen-{port}"), &[&probe, "listen", &p, "60"]);
        std::thread::sleep(Duration::from_millis(200));
    }

    /// Connect, allowing a few tries for a listener or a handshake that is still starting on a
    /// busy machine. Only for what must get through.
    pub fn connect_eventually(&self, from: &str, to: &str, port: u16) -> bool {
        (0..3).any(|_| self.connect(from, to, port))
    }

    /// Gives each of `names` its configuration under `policy`, and waits until it took it.
    pub fn enforce(&self, policy: &str, names: &[&str]) {
        let mut cfgs = configs(policy, &self.lab, &self.keys);
        for name in names {
            let cfg = cfgs.remove(*name).expect("config");
            self.write_config(name, &cfg);
            self.reload(name);
        }
    }

    /// Sends SIGHUP to a daemon and waits until it has taken the new file in, by its log.
    pub fn reload(&self, name: &str) {
        let seen = |o: &Overlay| {
            let log = o.lab.log(name, "bulkheadd");
            log.matches("allowlist applied").count() + log.matches("nothing passes until").count()
        };
        let before = seen(self);
        self.lab.signal(name, "bulkheadd", "HUP");
        assert!(
            Lab::until(Duration::from_secs(10), || seen(self) > before),
            "{name} did not reload:\n{}",
            self.lab.log(name, "bulkheadd")
        );
    }

    pub fn connect(&self, from: &str, to: &str, port: u16) -> bool {
        let probe = bin("bh-probe").display().to_string();
        self.lab
            .exec(
                from,
                &[&probe, "connect", self.addr(to), &port.to_string(), "1500"],
            )
            .status
            .success()
    }

    pub fn wg_show(&self, on: &str) -> String {
        let o = self
            .lab
            .exec(on, &["wg", "show", &self.lab.host(on).interface]);
        assert!(
            o.status.success(),
            "wg show: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
}
