//! Every validation error, with its exact line and column. Each case lists all the errors the
//! input must produce (no more, no fewer), as `LINE:COL` and a piece of the message.

#![allow(clippy::unwrap_used)] // test code: a panic is a failure with a message

use std::collections::BTreeMap;

use bulkhead_policy::{Severity, load};

const NOW: i64 = 1_800_000_000;

/// A valid policy that cases extend with a few lines.
const BASE: &str = "\
version: 1
network: { cidr: 10.0.0.0/24 }
identities:
  web-1: { labels: { app: web } }
  db-1: { labels: { app: db } }
segments:
  web: { match: { app: web } }
  db: { match: { app: db } }
posture:
  patched: { kernel.release: \">= 6.1\" }
";

struct Case {
    name: &'static str,
    text: String,
    errors: &'static [(u32, u32, &'static str)],
}

fn base(extra: &str) -> String {
    format!("{BASE}{extra}")
}

/// A "billion laughs": each list holds nine aliases of the one before; `levels` of them hold
/// 9^levels values once expanded.
fn alias_bomb(levels: usize) -> String {
    let mut s = "a0: &a0 [x, x, x, x, x, x, x, x, x]\n".to_string();
    for i in 1..levels {
        let p = i - 1;
        s += &format!(
            "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
        );
    }
    s
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "network: unknown addressing",
            text: BASE.replace(
                "network: { cidr: 10.0.0.0/24 }",
                "network: { cidr: 10.0.0.0/24, addressing: native }",
            ),
            errors: &[(2, 43, "unknown addressing \"native\": overlay")],
        },
        Case {
            name: "underlay: unknown mode and key",
            text: base("underlay:\n  mode: block\n  allows: []\n"),
            errors: &[
                (12, 9, "unknown underlay mode \"block\": expected off, observe or enforce"),
                (13, 3, "unknown key \"allows\" in underlay; expected one of: mode, scope, allow"),
            ],
        },
        Case {
            name: "underlay: not a mapping, mode not a string",
            text: base("underlay: [enforce]\n"),
            errors: &[(11, 11, "underlay must be a mapping, found a list")],
        },
        Case {
            name: "underlay: mode not a string",
            text: base("underlay: { mode: [enforce] }\n"),
            errors: &[(11, 19, "underlay.mode must be a string, found a list")],
        },
        Case {
            name: "underlay: scope",
            text: base("underlay:\n  mode: enforce\n  scope: [web, ghost, db-1, \"*\", quarantined]\n"),
            errors: &[
                (13, 16, "undefined segment \"ghost\""),
                (13, 23, "\"db-1\" is an identity; `scope` takes segments"),
                (13, 29, "`scope` takes segments; leave it out to mean every identity"),
                (13, 34, "the built-in segment `quarantined` cannot be the underlay's scope"),
            ],
        },
        Case {
            name: "underlay: empty scope",
            text: base("underlay:\n  mode: observe\n  scope: []\n"),
            errors: &[(13, 10, "`scope` is empty, so the underlay applies to no identity")],
        },
        Case {
            name: "underlay: entry without a name, duplicate names, unknown key",
            text: base(
                "underlay:
  mode: enforce
  allow:
    - { from: [db-1], to: [web], ports: [tcp/22] }
    - { name: ssh, from: [db-1], to: [web], ports: [tcp/22] }
    - { name: ssh, from: [db-1], to: [web], ports: [tcp/23], port: tcp/24 }
    - name: Bad_Name
      from: [db-1]
      to: [web]
      ports: [tcp/22]
",
            ),
            errors: &[
                (14, 7, "an underlay allow entry is missing the required key \"name\""),
                (16, 15, "duplicate underlay allow entry name \"ssh\" (first at 15:15)"),
                (16, 62, "unknown key \"port\" in an underlay allow entry"),
                (17, 13, "bad underlay allow entry name \"Bad_Name\""),
            ],
        },
        Case {
            name: "underlay: from",
            text: base(
                "underlay:
  mode: enforce
  allow:
    - name: a
      from: [10.0.9.1/24, 0.0.0.0/0, 127.0.0.0/8, 10.0.9.9, ghost, quarantined, 10.0.9/24]
      to: [web]
      ports: [tcp/22]
",
            ),
            errors: &[
                (15, 14, "bad network \"10.0.9.1/24\": host bits are set; did you mean 10.0.9.0/24?"),
                (15, 27, "bad network \"0.0.0.0/0\": a /0 is every address; write \"*\" for that"),
                (15, 38, "bad network \"127.0.0.0/8\": it overlaps 127.0.0.0/8, the loopback range"),
                (15, 51, "bad network \"10.0.9.9\": a network needs its length; write 10.0.9.9/32"),
                (15, 61, "undefined segment or identity \"ghost\"; `from` takes IPv4 networks"),
                (15, 68, "the underlay cannot name `quarantined`"),
                (15, 81, "bad network \"10.0.9/24\": expected an IPv4 network such as 10.0.9.0/24"),
            ],
        },
        Case {
            name: "underlay: to outside the scope, unknown, a network",
            text: base(
                "underlay:
  mode: enforce
  scope: [web]
  allow:
    - name: a
      from: [\"*\"]
      to: [web-1, db-1, db, web, ghost, 10.0.0.0/8, \"*\"]
      ports: [tcp/22]
",
            ),
            errors: &[
                (17, 19, "identity \"db-1\" is outside the underlay's scope"),
                (17, 25, "segment \"db\" has members outside the underlay's scope: db-1"),
                (17, 34, "undefined segment or identity \"ghost\""),
                (17, 41, "\"10.0.0.0/8\" in `to`: `to` names servers"),
            ],
        },
        Case {
            name: "underlay: empty lists, bad ports, missing keys",
            text: base(
                "underlay:
  mode: enforce
  allow:
    - { name: a, from: [], to: [], ports: [] }
    - { name: b, from: [web], to: [db], ports: [tcp/0, ssh] }
    - { name: c }
",
            ),
            errors: &[
                (14, 24, "`from` is empty, so the entry matches nothing"),
                (14, 32, "`to` is empty, so the entry matches nothing"),
                (14, 43, "`ports` is empty, so the entry matches nothing"),
                (15, 49, "bad port \"tcp/0\": ports are 1 to 65535"),
                (15, 56, "bad port \"ssh\""),
                (16, 7, "missing the required key \"from\""),
                (16, 7, "missing the required key \"ports\""),
                (16, 7, "missing the required key \"to\""),
            ],
        },
        Case {
            name: "alias bomb",
            text: alias_bomb(12),
            errors: &[(6, 5, "the policy holds more than 1000000 YAML values here")],
        },
        Case {
            name: "nesting too deep",
            text: base(&format!("tests: {}\n", "[".repeat(70))),
            errors: &[(11, 71, "values nest more than 64 levels deep here")],
        },
        Case {
            name: "policy too large",
            text: base(&"# padding\n".repeat(900_000)),
            errors: &[(838_847, 10, "the policy is larger than 8 MiB")],
        },
        Case {
            name: "yaml syntax",
            text: "version: 1\nnetwork: { cidr: [10.0.0.0/24 }\n".into(),
            errors: &[(2, 31, "invalid YAML")],
        },
        Case {
            name: "empty file",
            text: "".into(),
            errors: &[(1, 1, "the policy is empty")],
        },
        Case {
            name: "top level not a mapping",
            text: "- a\n- b\n".into(),
            errors: &[(1, 1, "the policy must be a mapping, found a list")],
        },
        Case {
            name: "unknown top-level key",
            text: base("rulez: []\n"),
            errors: &[(11, 1, "unknown key \"rulez\" in the policy")],
        },
        Case {
            name: "duplicate top-level key",
            text: base("version: 1\n"),
            errors: &[(11, 1, "duplicate key \"version\" in the policy (first at 1:1)")],
        },
        Case {
            name: "missing version and network",
            text: "identities: {}\n".into(),
            errors: &[
                (1, 1, "missing the required key \"network\""),
                (1, 1, "missing the required key \"version\""),
            ],
        },
        Case {
            name: "unsupported version",
            text: BASE.replace("version: 1", "version: 2"),
            errors: &[(1, 10, "unsupported policy version 2")],
        },
        Case {
            name: "bad cidr",
            text: BASE.replace("10.0.0.0/24", "10.0.0.1/24"),
            errors: &[(2, 18, "host bits are set; did you mean 10.0.0.0/24?")],
        },
        Case {
            name: "unknown network key",
            text: BASE.replace("{ cidr: 10.0.0.0/24 }", "{ cidr: 10.0.0.0/24, mtu: 1400 }"),
            errors: &[(2, 31, "unknown key \"mtu\" in network")],
        },
        Case {
            name: "duplicate identity",
            text: BASE.replace("  db-1:", "  web-1:"),
            errors: &[(5, 3, "duplicate key \"web-1\" in identities (first at 4:3)")],
        },
        Case {
            name: "bad names",
            text: BASE
                .replace("  db-1:", "  Db_1:")
                .replace("  db: {", "  -db: {"),
            errors: &[
                (5, 3, "bad identity name \"Db_1\""),
                (8, 3, "bad segment name \"-db\""),
            ],
        },
        Case {
            name: "unknown identity key",
            text: BASE.replace("{ labels: { app: web } }", "{ labels: { app: web }, role: x }"),
            errors: &[(4, 34, "unknown key \"role\" in identity \"web-1\"")],
        },
        Case {
            name: "address outside the cidr and address used twice",
            text: BASE
                .replace("{ labels: { app: web } }", "{ address: 10.0.1.5 }")
                .replace("{ labels: { app: db } }", "{ address: 10.0.0.0 }"),
            errors: &[
                (4, 21, "address 10.0.1.5 is outside the network 10.0.0.0/24"),
                (5, 20, "address 10.0.0.0 is the network or broadcast address"),
            ],
        },
        Case {
            name: "address used twice",
            text: BASE
                .replace("{ labels: { app: web } }", "{ address: 10.0.0.7 }")
                .replace("{ labels: { app: db } }", "{ address: 10.0.0.7 }"),
            errors: &[(5, 20, "address 10.0.0.7 is already used by web-1 (at 4:21)")],
        },
        Case {
            name: "bad address",
            text: BASE.replace("{ labels: { app: web } }", "{ address: 10.0.0.300 }"),
            errors: &[(4, 21, "bad address \"10.0.0.300\"")],
        },
        Case {
            name: "segment needs match or identities",
            text: BASE.replace("  web: { match: { app: web } }", "  web: {}"),
            errors: &[(7, 3, "segment \"web\" needs `match`, `identities` or both")],
        },
        Case {
            name: "segment with an empty match",
            text: BASE.replace("{ match: { app: web } }", "{ match: {} }"),
            errors: &[(7, 17, "has an empty match")],
        },
        Case {
            name: "segment lists an undefined identity",
            text: BASE.replace("{ match: { app: web } }", "{ identities: [web-1, web-9] }"),
            errors: &[(7, 30, "undefined identity \"web-9\"")],
        },
        Case {
            name: "quarantined is built in",
            text: BASE.replace("  db: {", "  quarantined: {"),
            errors: &[(8, 3, "`quarantined` is a built-in segment")],
        },
        Case {
            name: "rule with undefined names, bad ports and unknown key",
            text: base(
                "rules:\n  - name: r1\n    from: [web, nope]\n    to: [db]\n    ports: [tcp/0, http, tcp/9-1, tcp/70000]\n    priority: 1\n",
            ),
            errors: &[
                (13, 17, "undefined segment or identity \"nope\""),
                (15, 13, "bad port \"tcp/0\": ports are 1 to 65535"),
                (15, 20, "bad port \"http\""),
                (15, 26, "bad port range \"tcp/9-1\""),
                (15, 35, "bad port \"tcp/70000\""),
                (16, 5, "unknown key \"priority\" in a rule"),
            ],
        },
        Case {
            name: "rule missing keys",
            text: base("rules:\n  - name: r1\n    from: [web]\n"),
            errors: &[
                (12, 5, "a rule is missing the required key \"ports\""),
                (12, 5, "a rule is missing the required key \"to\""),
            ],
        },
        Case {
            name: "rule side is not a list",
            text: base("rules:\n  - { name: r1, from: web, to: [db], ports: [any] }\n"),
            errors: &[(12, 23, "from must be a list, e.g. [web], found a scalar")],
        },
        Case {
            name: "empty lists",
            text: base("rules:\n  - { name: r1, from: [], to: [db], ports: [] }\n"),
            errors: &[(12, 23, "`from` is empty"), (12, 44, "`ports` is empty")],
        },
        Case {
            name: "bad rule names and duplicates",
            text: base(
                "rules:\n  - { name: r1, from: [web], to: [db], ports: [any] }\n  - { name: r1, from: [web], to: [db], ports: [any] }\n  - { name: R_2, from: [web], to: [db], ports: [any] }\n",
            ),
            errors: &[
                (13, 5, "duplicate rule name \"r1\" (first at 12:5)"),
                (14, 13, "bad rule name \"R_2\""),
            ],
        },
        Case {
            name: "bad times and window",
            text: base(
                "rules:\n  - name: r1\n    from: [web]\n    to: [db]\n    ports: [any]\n    not_before: 2027-01-01T00:00:00Z\n    expires: 2026-01-01T00:00:00Z\n  - name: r2\n    from: [web]\n    to: [db]\n    ports: [any]\n    expires: tomorrow\n",
            ),
            errors: &[
                (17, 14, "expires must be later than not_before"),
                (22, 14, "bad time \"tomorrow\""),
            ],
        },
        Case {
            name: "bad action",
            text: base("rules:\n  - { name: r1, action: permit, from: [web], to: [db], ports: [any] }\n"),
            errors: &[(12, 25, "action must be allow or deny")],
        },
        Case {
            name: "undefined check and posture on deny",
            text: base(
                "rules:\n  - { name: r1, from: [web], to: [db], ports: [any], posture: [patched, nope] }\n  - { name: r2, action: deny, from: [web], to: [db], ports: [any], posture: [patched] }\n",
            ),
            errors: &[
                (12, 73, "undefined posture check \"nope\""),
                (13, 77, "a deny rule cannot require posture"),
            ],
        },
        Case {
            name: "approval: bad counts, durations, keys, and on a deny rule",
            text: base(
                "rules:\n  - { name: r1, from: [web], to: [db], ports: [any], approval: { approvers: 0, max: 2h } }\n  - { name: r2, from: [web], to: [db], ports: [any], approval: { max: 31d, who: me } }\n  - { name: r3, from: [web], to: [db], ports: [any], approval: { approvers: 1 } }\n  - { name: r4, action: deny, from: [web], to: [db], ports: [any], approval: { max: 1h } }\n  - { name: r5, from: [web], to: [db], ports: [any], approval: yes }\n",
            ),
            errors: &[
                (12, 77, "approvers must be 1 to 10"),
                (13, 71, "max must be at most 30d"),
                (13, 76, "unknown key \"who\" in approval"),
                (14, 64, "approval is missing the required key \"max\""),
                (15, 78, "a deny rule cannot need approval"),
                (16, 64, "approval must be a mapping"),
            ],
        },
        Case {
            name: "location: networks",
            text: BASE.replace(
                "  patched: { kernel.release: \">= 6.1\" }\n",
                "  office:\n    endpoint.address: [10.0.0.0/8, 10.1.1.1/16, nowhere]\n  home: { endpoint.address: 10.0.0.0/8 }\n  none: { endpoint.address: [] }\n",
            ),
            errors: &[
                (11, 36, "bad network \"10.1.1.1/16\": host bits are set; did you mean 10.1.0.0/16?"),
                (11, 49, "bad network \"nowhere\""),
                (12, 29, "endpoint.address must be a list of networks"),
                (13, 29, "endpoint.address lists no networks"),
            ],
        },
        Case {
            name: "segment and identity with one name",
            text: BASE.replace("  db: {", "  db-1: {")
                + "rules:\n  - { name: r1, from: [web], to: [db-1], ports: [any] }\n",
            errors: &[(12, 35, "\"db-1\" is both a segment and an identity")],
        },
        Case {
            name: "bad posture checks",
            text: BASE.replace(
                "  patched: { kernel.release: \">= 6.1\" }\n",
                "  patched:\n    kernel.release: \">= 6.x\"\n    os.name: debian\n    root_fs.encrypted: yes\n    os.id: \">= 12\"\n",
            ),
            errors: &[
                (11, 21, "bad version \"6.x\""),
                (12, 5, "unknown fact \"os.name\""),
                (13, 24, "root_fs.encrypted must be true or false"),
                (14, 12, "os.id is not a version"),
            ],
        },
        Case {
            name: "version conditions without a known operator",
            text: BASE.replace(
                "  patched: { kernel.release: \">= 6.1\" }\n",
                "  patched:\n    kernel.release: \"~> 6.1\"\n    os.version_id: \"12\"\n    daemon.version: 0.1\n    os.id: debian\n",
            ),
            errors: &[
                (11, 21, "unknown operator \"~>\" for kernel.release"),
                (12, 20, "os.version_id is a version: compare it with >=, >, <=, < or =="),
                (13, 21, "daemon.version is a version"),
            ],
        },
        Case {
            name: "a misspelt network hides nothing after it",
            text: BASE.replace("network:", "netwrok:")
                + "rules:\n  - { name: r1, from: [web, ghost], to: [db], ports: [tcp/5432] }\ntests:\n  - { from: db-1, to: web-1, port: tcp/5432, expect: allow }\n",
            errors: &[
                (1, 1, "the policy is missing the required key \"network\""),
                (2, 1, "unknown key \"netwrok\" in the policy"),
                (12, 29, "undefined segment or identity \"ghost\""),
                (
                    14,
                    5,
                    "test failed: db-1 -> web-1 tcp/5432: expected allow, got deny (no rule allows it); the policy has other errors, which may be why",
                ),
            ],
        },
        Case {
            name: "bad quarantine",
            text: base("quarantine: { denied_per_minute: 0, duration: 15 }\n"),
            errors: &[
                (11, 34, "denied_per_minute must be 1 or more"),
                (11, 47, "bad duration \"15\""),
            ],
        },
        Case {
            name: "bad tests",
            text: base(
                "tests:\n  - { from: web-1, to: db-9, port: tcp/5432, expect: allow }\n  - { from: web-1, to: db-1, port: tcp, expect: maybe }\n  - { from: web-1, to: db-1, port: tcp/1, expect: deny, failing: [nope] }\n",
            ),
            errors: &[
                (12, 24, "undefined identity \"db-9\""),
                (13, 36, "bad port \"tcp\""),
                (13, 49, "expect must be allow or deny"),
                (14, 67, "undefined posture check \"nope\""),
            ],
        },
        Case {
            name: "failing tests",
            text: base(
                "rules:\n  - { name: web-to-db, from: [web], to: [db], ports: [tcp/5432] }\ntests:\n  - { from: web-1, to: db-1, port: tcp/5432, expect: deny }\n  - { from: web-1, to: db-1, port: tcp/5432, expect: allow }\n  - { from: db-1, to: web-1, port: tcp/5432, expect: allow }\n",
            ),
            errors: &[
                (
                    14,
                    5,
                    "test failed: web-1 -> db-1 tcp/5432: expected deny, got allow (rule \"web-to-db\", line 12)",
                ),
                (
                    16,
                    5,
                    "test failed: db-1 -> web-1 tcp/5432: expected allow, got deny (no rule allows it)",
                ),
            ],
        },
        Case {
            name: "cidr too large",
            text: BASE.replace("10.0.0.0/24", "0.0.0.0/0"),
            errors: &[(2, 18, "bad cidr \"0.0.0.0/0\": a /0 is too large")],
        },
        Case {
            name: "cidr shorter than /8",
            text: BASE.replace("10.0.0.0/24", "10.0.0.0/7"),
            errors: &[(2, 18, "a /7 is too large; every node routes the whole network")],
        },
        Case {
            name: "loopback cidr",
            text: BASE.replace("10.0.0.0/24", "127.0.0.0/8"),
            errors: &[(2, 18, "it overlaps 127.0.0.0/8, the loopback range")],
        },
        Case {
            name: "multicast cidr",
            text: BASE.replace("10.0.0.0/24", "239.1.0.0/16"),
            errors: &[(2, 18, "it overlaps 224.0.0.0/4, the multicast range")],
        },
        Case {
            name: "link-local cidr",
            text: BASE.replace("10.0.0.0/24", "169.254.0.0/16"),
            errors: &[(2, 18, "it overlaps 169.254.0.0/16, the link-local range")],
        },
        Case {
            name: "unspecified cidr",
            text: BASE.replace("10.0.0.0/24", "0.0.0.0/8"),
            errors: &[(2, 18, "it overlaps 0.0.0.0/8, the unspecified (\"this network\") range")],
        },
        Case {
            name: "broadcast cidr",
            text: BASE.replace("10.0.0.0/24", "255.255.255.0/24"),
            errors: &[(2, 18, "it overlaps 240.0.0.0/4, the reserved and broadcast range")],
        },
        Case {
            name: "special identity addresses",
            text: BASE
                .replace("{ labels: { app: web } }", "{ address: 127.0.0.1 }")
                .replace(
                    "  db-1: { labels: { app: db } }\n",
                    "  db-1: { address: 255.255.255.255 }\n  ci-1: { address: 224.0.0.1 }\n  \
                     ci-2: { address: 0.0.0.0 }\n  ci-3: { address: 169.254.1.1 }\n",
                ),
            errors: &[
                (4, 21, "address 127.0.0.1 is in 127.0.0.0/8, the loopback range"),
                (5, 20, "address 255.255.255.255 is in 240.0.0.0/4, the reserved and broadcast"),
                (6, 20, "address 224.0.0.1 is in 224.0.0.0/4, the multicast range"),
                (7, 20, "address 0.0.0.0 is in 0.0.0.0/8, the unspecified"),
                (8, 20, "address 169.254.1.1 is in 169.254.0.0/16, the link-local range"),
            ],
        },
        Case {
            name: "network too small",
            text: BASE.replace("10.0.0.0/24", "10.0.0.0/31"),
            errors: &[(2, 18, "a /31 leaves no room")],
        },
        Case {
            name: "merge keys",
            text: BASE.replace("{ labels: { app: web } }", "{ <<: {a: b} }"),
            errors: &[(4, 12, "merge keys (<<) are not supported")],
        },
        Case {
            name: "many errors at once",
            text: "version: x\nnetwork: { cidr: nope }\nidentities: []\nbogus: 1\n".into(),
            errors: &[
                (1, 10, "version must be a whole number"),
                (2, 18, "bad cidr \"nope\""),
                (3, 13, "identities must be a mapping, found a list"),
                (4, 1, "unknown key \"bogus\""),
            ],
        },
    ]
}

#[test]
fn every_error_is_reported_at_its_line_and_column() {
    let mut failures = Vec::new();
    for case in cases() {
        let l = load(&case.text, NOW, &BTreeMap::new());
        let got: Vec<(u32, u32, String)> = l
            .diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Error)
            .map(|d| (d.pos.line, d.pos.col, d.message.clone()))
            .collect();
        let ok = got.len() == case.errors.len()
            && got
                .iter()
                .zip(case.errors)
                .all(|(g, w)| g.0 == w.0 && g.1 == w.1 && g.2.contains(w.2));
        if !ok {
            failures.push(format!(
                "case {:?}\n  want: {:?}\n  got:  {:?}\n--- input\n{}",
                case.name, case.errors, got, case.text
            ));
        }
        assert!(!l.is_valid(), "case {:?} must be rejected", case.name);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn the_base_policy_is_valid() {
    let l = load(BASE, NOW, &BTreeMap::new());
    assert!(l.is_valid(), "{:?}", l.diagnostics);
}

#[test]
fn rendered_form_is_file_line_col() {
    let l = load(
        &BASE.replace("version: 1", "version: 3"),
        NOW,
        &BTreeMap::new(),
    );
    assert_eq!(
        l.diagnostics[0].render("p.yaml"),
        "p.yaml:1:10: error: unsupported policy version 3; this bulkhead reads version 1"
    );
}

#[test]
fn a_public_network_is_warned_about_but_valid() {
    for (cidr, warned) in [
        ("8.8.0.0/16", true),
        ("192.0.2.0/24", true),
        ("172.32.0.0/16", true),
        ("100.64.0.0/16", false),
        ("172.20.0.0/16", false),
        ("192.168.1.0/24", false),
    ] {
        let l = load(&BASE.replace("10.0.0.0/24", cidr), NOW, &BTreeMap::new());
        assert!(l.is_valid(), "{cidr}: {:?}", l.diagnostics);
        let w: Vec<_> = l
            .diagnostics
            .iter()
            .filter(|d| d.message.contains("is public address space"))
            .map(|d| (d.severity, d.pos.line, d.pos.col))
            .collect();
        let want = if warned {
            vec![(Severity::Warning, 2, 18)]
        } else {
            vec![]
        };
        assert_eq!(w, want, "{cidr}");
    }
}

#[test]
fn warnings_do_not_reject() {
    let text = BASE.replace(
        "  db: { match: { app: db } }\n",
        "  db: { match: { app: db } }\n  empty: { match: { app: none } }\n",
    );
    let l = load(&text, NOW, &BTreeMap::new());
    assert!(l.is_valid(), "{:?}", l.diagnostics);
    assert_eq!(l.diagnostics.len(), 1);
    assert_eq!(l.diagnostics[0].severity, Severity::Warning);
    assert!(l.diagnostics[0].message.contains("has no members"));
}

#[test]
fn a_valid_underlay_block_loads_without_diagnostics() {
    let l = load(
        &base(
            "underlay:
  mode: enforce
  scope: [web, db]
  allow:
    - name: mgmt-ssh
      from: [10.0.9.0/24, 192.0.2.7/32, web, db-1]
      to: [\"*\"]
      ports: [tcp/22, icmp]
    - { name: sync, description: rsync, from: [web-1], to: [db], ports: [tcp/873] }
",
        ),
        NOW,
        &BTreeMap::new(),
    );
    assert!(l.is_valid(), "{:?}", l.diagnostics);
    assert!(l.diagnostics.is_empty(), "{:?}", l.diagnostics);
    let m = l.model.unwrap();
    let u = m.underlay().unwrap();
    assert_eq!(u.mode, bulkhead_allowlist::UnderlayMode::Enforce);
    assert_eq!(u.entries.len(), 2);
    assert_eq!(u.entries[0].from_nets.len(), 2);
    assert!(u.entries[0].to.all);
}

/// With `addressing: underlay` nothing is allocated: an identity has its `address:`, or the
/// address its node was pinned to (the controller passes pins as `prior`), or none yet, and an
/// identity without one is nobody's peer.
#[test]
fn servers_own_addresses_are_declared_or_pinned_never_allocated() {
    let text = "\
version: 1
network: { cidr: 192.0.2.0/24, addressing: underlay }
identities:
  web-1: { labels: { app: web }, address: 192.0.2.10 }
  db-1: { labels: { app: db } }
  db-2: { labels: { app: db } }
  db-3: { labels: { app: db } }
segments:
  web: { match: { app: web } }
  db: { match: { app: db } }
rules:
  - { name: web-to-db, from: [web], to: [db], ports: [tcp/5432] }
";
    let pins = BTreeMap::from([
        ("db-1".to_string(), "192.0.2.21".parse().unwrap()),
        // Outside the range, or taken by a declared address: not taken.
        ("db-2".to_string(), "198.51.100.1".parse().unwrap()),
        ("db-3".to_string(), "192.0.2.10".parse().unwrap()),
    ]);
    let l = load(text, NOW, &pins);
    // A public range is the servers' own: no warning with underlay addressing.
    assert!(l.diagnostics.is_empty(), "{:?}", l.diagnostics);
    let m = l.model.unwrap();
    let a = m.addresses();
    assert_eq!(a["web-1"].to_string(), "192.0.2.10");
    assert_eq!(a["db-1"].to_string(), "192.0.2.21");
    assert!(a["db-2"].is_unspecified() && a["db-3"].is_unspecified());
    let lists = bulkhead_policy::Compiled::new(&m, m.state(&bulkhead_policy::Conditions::at(NOW)))
        .allowlists(&m, 1);
    let web = lists.iter().find(|l| l.identity == "web-1").unwrap();
    assert_eq!(web.addressing, bulkhead_allowlist::Addressing::Underlay);
    let peers: Vec<&str> = web.peers.iter().map(|p| &*p.name).collect();
    assert_eq!(peers, ["db-1"], "only peers with an address get a tunnel");
    assert_eq!(web.peers[0].address.to_string(), "192.0.2.21");
}
