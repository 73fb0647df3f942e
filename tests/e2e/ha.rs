//! Two controllers on one real etcd, in namespaces, with real daemons: the daemons learn of a
//! controller started after they joined, fail over to it when theirs is killed (`kill -9`),
//! later changes through it still reach them, the restarted controller only moves the revision
//! forward, and `bulkhead flows` through either controller shows every node's flows.

use std::time::{Duration, Instant};

use bulkhead_e2e::cluster::{CTL, Cluster, unix_ms, web_db_policy};
use bulkhead_e2e::netns::{Lab, etcd};
use bulkhead_e2e::{Run, bin, netns_ok};

const RULES: &str = "rules:
  - { name: web-to-db, from: [web], to: [db], ports: [tcp/5432] }
";

const NODES: [&str; 2] = ["web-1", "db-1"];

#[test]
fn daemons_fail_over_and_changes_still_reach_them() {
    if !netns_ok() {
        return;
    }
    if !etcd::etcd_ok() {
        return;
    }
    let mut hosts = vec!["ctl2"];
    hosts.extend(NODES);
    let mut c = Cluster::new(&hosts);
    let text = web_db_policy("ha", "10.202.0.0/16", RULES);
    let policy = c.files.write("policy.yaml", &text);
    let closed = c.files.write(
        "closed.yaml",
        &text.replace(
            "  - { name: web-to-db, from: [web], to: [db], ports: [tcp/5432] }\n",
            "",
        ),
    );

    // etcd in the first controller's namespace, on the lab's underlay.
    let data = c.lab.host("ctl").dir.join("etcd").display().to_string();
    let client_url = format!("http://{CTL}:2379");
    c.lab.spawn(
        "ctl",
        "etcd",
        &[
            "etcd",
            "--name",
            "e",
            "--data-dir",
            &data,
            "--listen-client-urls",
            &client_url,
            "--advertise-client-urls",
            &client_url,
            "--listen-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-advertise-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-cluster",
            "e=http://127.0.0.1:2380",
        ],
    );
    let spec = format!("etcd://{CTL}:2379");
    // One CA key file, shipped to both controllers.
    let ca_key = c.lab.host("ctl").dir.join("ca-seal.key");
    std::fs::write(&ca_key, format!("{}\n", "3c".repeat(32))).expect("CA key file");
    let ca_key = ca_key.display().to_string();
    let on_etcd = ["--store", spec.as_str(), "--ca-key-file", ca_key.as_str()];
    c.start_controller("controller", &policy, &on_etcd);

    // Nodes enroll through the first, while it is the only controller.
    for n in NODES {
        let t = c.token(n);
        let decoded = bulkhead_proto::Token::decode(&t).expect("token");
        assert_eq!(decoded.urls.len(), 1, "{:?}", decoded.urls);
        c.start_daemon(n, "bulkheadd", Some(&t));
        let probe = bin("bh-probe").display().to_string();
        c.lab.spawn(n, "listen", &[&probe, "listen", "5432", "120"]);
    }
    c.converge(&NODES);
    assert!(c.connect_eventually("web-1", "db-1", 5432), "{}", c.logs());
    assert!(!c.connect("db-1", "web-1", 5432));

    // The second controller, in its own namespace, on the same etcd.
    let ctl2_state = c.state("ctl2");
    let ctl2_admin = format!("{ctl2_state}/admin.yaml");
    let controller = bin("bulkhead-controller").display().to_string();
    c.lab.spawn(
        "ctl2",
        "controller",
        &[
            &controller,
            "--listen",
            "198.18.0.2:7443",
            "--state",
            &ctl2_state,
            "--store",
            &spec,
            "--ca-key-file",
            &ca_key,
        ],
    );
    let cli2 = |c: &Cluster, args: &[&str]| -> Run {
        let b = bin("bulkhead").display().to_string();
        let mut full = vec![b.as_str(), "--config", ctl2_admin.as_str()];
        full.extend_from_slice(args);
        c.lab.exec("ctl2", &full).into()
    };
    let up = Lab::until(Duration::from_secs(20), || {
        let s = cli2(&c, &["status", "-o", "json"]);
        s.code == Some(0)
            && s.json()["controllers"]
                .as_array()
                .is_some_and(|a| a.len() == 2)
    });
    assert!(up, "second controller: {}", c.lab.log("ctl2", "controller"));

    // The nodes learn the second controller from their reports' answers (every 10 s).
    let learned = Lab::until(Duration::from_secs(25), || {
        NODES.iter().all(|n| {
            std::fs::read_to_string(format!("{}/enrollment.json", c.state(n)))
                .is_ok_and(|e| e.contains("198.18.0.2:7443"))
        })
    });
    assert!(
        learned,
        "nodes did not learn the second controller:\n{}",
        c.logs()
    );

    // kill -9 the first controller: the daemons reconnect to the second.
    c.lab.signal("ctl", "controller", "KILL");
    let killed = Instant::now();
    let failed_over = Lab::until(Duration::from_secs(20), || {
        let r = cli2(&c, &["nodes", "-o", "json"]);
        r.code == Some(0)
            && r.json().as_array().is_some_and(|a| {
                NODES
                    .iter()
                    .all(|n| a.iter().any(|v| v["identity"] == *n && v["online"] == true))
            })
    });
    assert!(failed_over, "daemons did not fail over:\n{}", c.logs());
    eprintln!(
        "failover: both daemons online on the second controller {:?} after kill -9",
        killed.elapsed()
    );

    // A change through the second controller still reaches them: the flow is cut.
    let r = cli2(&c, &["policy", "apply", "--yes", &closed, "-o", "json"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(r.json()["revision"], 2);
    let cut = Lab::until(Duration::from_secs(10), || {
        !c.connect("web-1", "db-1", 5432)
    });
    assert!(
        cut,
        "the change must reach daemons that failed over\n{}",
        c.logs()
    );

    // The first controller restarts: revisions only go forward. Its --policy file holds the old
    // text, so it applies it again as a new revision, 3, never going back to 1.
    c.start_controller("controller-2", &policy, &on_etcd);
    let mut seen = Vec::new();
    let applied = Lab::until(Duration::from_secs(10), || {
        let rev = c.cli(&["policy", "show", "-o", "json"]).json()["revision"].as_u64();
        seen.push(rev);
        rev == Some(3)
    });
    assert!(applied, "{seen:?}\n{}", c.lab.log("ctl", "controller-2"));
    assert!(seen.iter().all(|r| r.is_some_and(|r| r >= 2)), "{seen:?}");
    let reopened = unix_ms() as i64;
    assert!(
        c.connect_eventually("web-1", "db-1", 5432),
        "revision 3 opens the flow again"
    );

    // Each controller keeps the flows its own nodes report; `flows` through either one shows
    // both ends' record of that connection, whichever controller each node reports to.
    let both_seen = |r: &Run| {
        r.code == Some(0)
            && r.json().as_array().is_some_and(|a| {
                NODES.iter().all(|n| {
                    a.iter().any(|f| {
                        f["node"] == *n
                            && f["verdict"] == "allow"
                            && f["src"] == "web-1"
                            && f["port"] == 5432
                            && f["at"].as_i64().is_some_and(|t| t >= reopened)
                    })
                })
            })
    };
    let shown = Lab::until(Duration::from_secs(10), || {
        both_seen(&c.cli(&["flows", "-o", "json"]))
            && both_seen(&cli2(&c, &["flows", "-o", "json"]))
    });
    assert!(
        shown,
        "through the first: {:?}\nthrough the second: {:?}",
        c.cli(&["flows", "-o", "json"]),
        cli2(&c, &["flows", "-o", "json"])
    );

    // The durable history too: each controller holds its own nodes' part, and either one's
    // `flows --since` is the same, merged answer, with the connection in it.
    let since = ["flows", "--since", "1h", "-o", "json"];
    let same = Lab::until(Duration::from_secs(10), || {
        let (a, b) = (c.cli(&since), cli2(&c, &since));
        a.code == Some(0)
            && a.stdout == b.stdout
            && a.json().as_array().is_some_and(|h| {
                h.iter().any(|x| {
                    x["src"] == "web-1"
                        && x["dst"] == "db-1"
                        && x["port"] == 5432
                        && x["verdict"] == "allow"
                        && x["last"].as_i64().is_some_and(|t| t >= reopened)
                })
            })
    });
    assert!(
        same,
        "through the first: {:?}\nthrough the second: {:?}",
        c.cli(&since),
        cli2(&c, &since)
    );
}
