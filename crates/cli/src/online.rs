//! The commands that talk to a controller: policy plan/apply/show, token create, nodes, revoke,
//! status, quarantine/release, flows (from every live controller), audit.
//!
//! Exit codes: a request the controller refused on its merits (an invalid policy, an unknown
//! identity, a stale plan, a call beyond the caller's role) exits 1; not being able to ask (no
//! config, no connection, a revoked or expired credential) exits 2.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::anyhow;
use bulkhead_proto::{
    AccessRequest, AccessState, AccessView, AdminIssued, AdminRequest, AdminView, ApiError,
    ApplyResponse, AuditEntry, CliConfig, Connection, FlowView, NodeView, PlanResponse,
    PolicyRequest, PolicyView, QuarantineRequest, QuarantineResponse, RevokeResponse, Role,
    StatusView, TokenRequest, TokenResponse,
};

use crate::output::{Format, Outcome, columns, emit, escape_controls, time};
use crate::policy::plan_table;

/// Where the CLI's configuration is: `--config`, else `$BULKHEAD_CONFIG` (both handled by clap),
/// else `~/.config/bulkhead/config.yaml`.
fn config_path(flag: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = flag {
        return Ok(p.to_path_buf());
    }
    let home = std::env::var_os("HOME")
        .ok_or_else(|| anyhow!("no --config, no $BULKHEAD_CONFIG and no $HOME"))?;
    Ok(PathBuf::from(home).join(".config/bulkhead/config.yaml"))
}

/// A connection to the configured controller.
pub struct Remote {
    rt: tokio::runtime::Runtime,
    conn: Connection,
    cfg: CliConfig,
}

impl Remote {
    /// Reads the configuration and connects.
    pub fn connect(config: Option<&Path>) -> anyhow::Result<Remote> {
        let path = config_path(config)?;
        let cfg = CliConfig::load(&path).map_err(|e| {
            anyhow!("{e}\n(the controller writes this file as STATE/admin.yaml on first start; pass it with --config or $BULKHEAD_CONFIG)")
        })?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let client = cfg.client()?;
        let conn = rt.block_on(client.connect())?;
        Ok(Remote { rt, conn, cfg })
    }

    /// Reads the NDJSON lines of `path` from this controller, then from every other live one
    /// (each keeps what its own nodes reported), handing each line to `each`. This one's
    /// failure is an error; another's is named on stderr, with what goes missing (`missing`),
    /// and skipped.
    pub(crate) fn stream_all<T: serde::de::DeserializeOwned>(
        &mut self,
        path: &str,
        missing: &str,
        mut each: impl FnMut(T),
    ) -> anyhow::Result<()> {
        let mut others = self.others();
        let first = self.cfg.url.clone();
        let Remote { rt, conn, .. } = self;
        let mut conns: Vec<(String, &mut Connection)> = vec![(first, conn)];
        conns.extend(others.iter_mut().map(|(u, c)| (u.clone(), c)));
        for (i, (url, c)) in conns.into_iter().enumerate() {
            let read = async {
                let mut lines = tokio::time::timeout(FLOWS_TIMEOUT, c.stream(path))
                    .await
                    .map_err(|_| anyhow!("no answer in {FLOWS_TIMEOUT:?}"))??;
                // All of a controller's answer or none of it: one that fails halfway is
                // missing, not counted in part.
                let mut got = Vec::new();
                while let Some(v) = lines.next::<T>().await? {
                    got.push(v);
                }
                anyhow::Ok(got)
            };
            match rt.block_on(read) {
                Ok(got) => got.into_iter().for_each(&mut each),
                Err(e) if i == 0 => return Err(e.context(format!("controller {url}"))),
                Err(e) => eprintln!("bulkhead: controller {url}: {e:#}: {missing}"),
            }
        }
        Ok(())
    }

    /// Connections to every other live controller (several share one etcd), with the same
    /// credential. One that cannot be reached is named on stderr and left out.
    fn others(&mut self) -> Vec<(String, Connection)> {
        let Ok(status) = self.get::<StatusView>("/v1/status") else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for url in status.controllers.iter().filter(|u| **u != status.url) {
            let cfg = CliConfig {
                url: url.clone(),
                ..self.cfg.clone()
            };
            let conn = cfg.client().map_err(|e| e.to_string()).and_then(|c| {
                self.rt
                    .block_on(async {
                        tokio::time::timeout(std::time::Duration::from_secs(5), c.connect()).await
                    })
                    .map_err(|_| "timed out".to_string())?
                    .map_err(|e| e.to_string())
            });
            match conn {
                Ok(c) => out.push((url.clone(), c)),
                Err(e) => eprintln!(
                    "bulkhead: controller {url} not reachable ({e}): flows its nodes reported are missing"
                ),
            }
        }
        out
    }

    fn get<T: serde::de::DeserializeOwned>(&mut self, path: &str) -> Result<T, ApiError> {
        self.rt.block_on(self.conn.get(path))
    }

    fn post<B: serde::Serialize, T: serde::de::DeserializeOwned>(
        &mut self,
        path: &str,
        body: &B,
    ) -> Result<T, ApiError> {
        self.rt.block_on(self.conn.post(path, body))
    }
}

/// Turns a refusal on the merits into exit 1 (after printing it), anything else into exit 2.
fn refused<T>(r: Result<T, ApiError>) -> anyhow::Result<Result<T, Outcome>> {
    match r {
        Ok(v) => Ok(Ok(v)),
        // 403: a call beyond the caller's role, or a step the rules forbid (approving one's own
        // request): refused on its merits. 401: the credential itself does not work.
        Err(ApiError::Api { status, body }) if status != 401 && status < 500 => {
            eprintln!("bulkhead: {}", escape_controls(&body.message, false));
            for d in &body.details {
                eprintln!("{}", escape_controls(d, false));
            }
            Ok(Err(Outcome::Failed))
        }
        Err(e) => Err(e.into()),
    }
}

fn read_policy(file: &Path) -> anyhow::Result<PolicyRequest> {
    Ok(PolicyRequest {
        text: crate::policy::read_text(file)?,
        source: file.display().to_string(),
        base_revision: None,
    })
}

/// `bulkhead policy plan FILE`.
pub fn plan(r: &mut Remote, file: &Path, fmt: Format) -> anyhow::Result<Outcome> {
    let p = match plan_of(r, file)? {
        Ok(p) => p,
        Err(o) => return Ok(o),
    };
    emit(fmt, &p, || plan_text(&p))?;
    Ok(Outcome::Ok)
}

/// The controller's plan for FILE, or the outcome of its refusal (said on stderr).
pub fn plan_of(r: &mut Remote, file: &Path) -> anyhow::Result<Result<PlanResponse, Outcome>> {
    let req = read_policy(file)?;
    refused(r.post("/v1/policy/plan", &req))
}

/// A plan for people.
pub fn plan_text(p: &PlanResponse) -> String {
    format!(
        "against live revision {}:\n{}",
        p.base_revision,
        plan_table(&p.plan)
    )
}

/// `bulkhead policy apply FILE [--yes]`: plan, show, confirm, apply against the planned revision.
pub fn apply(r: &mut Remote, file: &Path, yes: bool, fmt: Format) -> anyhow::Result<Outcome> {
    let mut req = read_policy(file)?;
    let p: PlanResponse = match refused(r.post("/v1/policy/plan", &req))? {
        Ok(p) => p,
        Err(o) => return Ok(o),
    };
    // The plan goes to stderr when the result is machine-readable, so stdout stays one document.
    let shown = format!(
        "against live revision {}:\n{}",
        p.base_revision,
        plan_table(&p.plan)
    );
    if fmt == Format::Table {
        crate::output::print(&shown)?;
    } else {
        eprint!("{shown}");
    }
    if !yes {
        if !std::io::stdin().is_terminal() {
            return Err(anyhow!(
                "not applied: confirm with --yes when not running interactively"
            ));
        }
        eprint!("apply this plan? [y/N] ");
        std::io::stderr().flush()?;
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            eprintln!("not applied");
            return Ok(Outcome::Failed);
        }
    }
    req.base_revision = Some(p.base_revision);
    let a: ApplyResponse = match refused(r.post("/v1/policy/apply", &req))? {
        Ok(a) => a,
        Err(o) => return Ok(o),
    };
    emit(fmt, &a, || {
        if a.changed {
            format!("applied: revision {}\n", a.revision)
        } else {
            format!("no change: revision {} is already live\n", a.revision)
        }
    })?;
    Ok(Outcome::Ok)
}

/// `bulkhead policy show`.
pub fn show(r: &mut Remote, fmt: Format) -> anyhow::Result<Outcome> {
    let p: PolicyView = match refused(r.get("/v1/policy"))? {
        Ok(p) => p,
        Err(o) => return Ok(o),
    };
    emit(fmt, &p, || {
        let mut out = format!(
            "# revision {}, applied {} by {} from {}\n",
            p.revision,
            time(p.applied_at),
            p.applied_by,
            p.source,
        );
        for b in &p.upcoming {
            out += &format!(
                "# upcoming: rule {} {} at {}\n",
                b.rule,
                b.event,
                time(b.at)
            );
        }
        out + &p.text
    })?;
    Ok(Outcome::Ok)
}

/// The live policy, for the commands that need a base and were given none.
pub fn policy_view(r: &mut Remote) -> anyhow::Result<PolicyView> {
    Ok(r.get("/v1/policy")?)
}

/// `bulkhead token create IDENTITY [--ttl D]`: the token alone on stdout.
pub fn token(r: &mut Remote, identity: &str, ttl: &str, fmt: Format) -> anyhow::Result<Outcome> {
    let secs = bulkhead_policy::parse_duration(ttl).map_err(|e| anyhow!("--ttl: {e}"))?;
    let req = TokenRequest {
        identity: identity.to_string(),
        ttl: u64::try_from(secs).unwrap_or(0),
    };
    let t: TokenResponse = match refused(r.post("/v1/tokens", &req))? {
        Ok(t) => t,
        Err(o) => return Ok(o),
    };
    if let Some(w) = &t.warning {
        eprintln!("bulkhead: warning: {w}");
    }
    emit(fmt, &t, || format!("{}\n", t.token))?;
    Ok(Outcome::Ok)
}

/// `bulkhead nodes`.
pub fn nodes(r: &mut Remote, fmt: Format) -> anyhow::Result<Outcome> {
    let nodes: Vec<NodeView> = match refused(r.get("/v1/nodes"))? {
        Ok(n) => n,
        Err(o) => return Ok(o),
    };
    emit(fmt, &nodes, || {
        let dash = || "-".to_string();
        let mut rows = vec![
            [
                "IDENTITY",
                "ADDRESS",
                "ENDPOINT",
                "STATE",
                "LAST SEEN",
                "REVISION",
                "STATUS",
                "POSTURE",
                "UNDERLAY",
                "NEXT WINDOW CHANGE",
            ]
            .map(String::from)
            .to_vec(),
        ];
        for n in &nodes {
            let state = match (n.in_policy, n.enrolled, n.online) {
                (_, true, true) if n.in_sync => "online",
                (_, true, true) => "online, syncing",
                (_, true, false) => "offline",
                (true, false, _) => "not enrolled",
                (false, false, _) => "-",
            };
            let mut state = if n.enrolled && !n.in_policy {
                format!("{state} (not in policy)")
            } else {
                state.to_string()
            };
            if n.quarantine.is_some() {
                state += ", QUARANTINED";
            }
            rows.push(vec![
                n.identity.clone(),
                n.address.map_or_else(dash, |a| a.to_string()),
                n.endpoint.map_or_else(dash, |e| e.to_string()),
                state,
                n.last_seen.map_or_else(dash, time),
                n.revision.map_or_else(dash, |r| r.to_string()),
                n.status.clone().unwrap_or_else(dash),
                posture(n),
                underlay(n),
                n.upcoming
                    .first()
                    .map_or_else(dash, |b| format!("{} {} {}", b.rule, b.event, time(b.at))),
            ]);
        }
        columns(&rows)
    })?;
    Ok(Outcome::Ok)
}

/// The host firewall: the mode the policy gives the node, and whether its table is in place
/// (`-` for `off` with nothing installed).
fn underlay(n: &NodeView) -> String {
    use bulkhead_allowlist::UnderlayMode;
    let wanted = n.underlay_mode;
    match n.underlay {
        None if wanted == UnderlayMode::Off => "-".into(),
        None => format!("{wanted} (not reported)"),
        Some(r) if r.mode != wanted => format!("{wanted} (node has {})", r.mode),
        Some(_) if wanted == UnderlayMode::Off => "off".into(),
        Some(r) if r.installed => format!("{wanted}"),
        Some(_) => format!("{wanted} (NOT INSTALLED)"),
    }
}

/// `pass`, or each failing check with its reason; `-` when no rule it initiates needs one.
fn posture(n: &NodeView) -> String {
    if n.posture.is_empty() {
        return "-".into();
    }
    let failing: Vec<String> = n
        .posture
        .iter()
        .filter(|c| !c.pass)
        .map(|c| format!("{}: {}", c.check, c.reason.as_deref().unwrap_or("failing")))
        .collect();
    if failing.is_empty() {
        "pass".into()
    } else {
        failing.join("; ")
    }
}

/// `bulkhead revoke IDENTITY`.
pub fn revoke(r: &mut Remote, identity: &str, fmt: Format) -> anyhow::Result<Outcome> {
    let path = format!("/v1/nodes/{identity}/revoke");
    let v: RevokeResponse = match refused(r.post(&path, &()))? {
        Ok(v) => v,
        Err(o) => return Ok(o),
    };
    emit(fmt, &v, || {
        if v.was_enrolled {
            format!(
                "revoked {}: every peer drops it; it needs a new token to return\n",
                v.identity
            )
        } else {
            format!(
                "revoked {}'s unused join tokens (no node was enrolled)\n",
                v.identity
            )
        }
    })?;
    Ok(Outcome::Ok)
}

/// `bulkhead quarantine IDENTITY [--duration D]`.
pub fn quarantine(
    r: &mut Remote,
    identity: &str,
    duration: Option<&str>,
    fmt: Format,
) -> anyhow::Result<Outcome> {
    let duration = duration
        .map(|d| {
            bulkhead_policy::parse_duration(d)
                .map_err(|e| anyhow!("--duration: {e}"))
                .map(|s| u64::try_from(s).unwrap_or(0))
        })
        .transpose()?;
    let path = format!("/v1/nodes/{identity}/quarantine");
    let v: QuarantineResponse = match refused(r.post(&path, &QuarantineRequest { duration }))? {
        Ok(v) => v,
        Err(o) => return Ok(o),
    };
    emit(fmt, &v, || match &v.quarantine {
        Some(q) => format!(
            "quarantined {} {}\n",
            v.identity,
            q.until.map_or("until released".to_string(), |u| format!(
                "until {}",
                time(u)
            ))
        ),
        None => format!("{} is not in quarantine\n", v.identity),
    })?;
    Ok(Outcome::Ok)
}

/// `bulkhead release IDENTITY`.
pub fn release(r: &mut Remote, identity: &str, fmt: Format) -> anyhow::Result<Outcome> {
    let path = format!("/v1/nodes/{identity}/release");
    let v: QuarantineResponse = match refused(r.post(&path, &()))? {
        Ok(v) => v,
        Err(o) => return Ok(o),
    };
    emit(fmt, &v, || format!("released {}\n", v.identity))?;
    Ok(Outcome::Ok)
}

/// One flow as a table row.
fn flow_row(f: &FlowView) -> Vec<String> {
    let ms = f.at.rem_euclid(1000);
    vec![
        format!(
            "{}.{ms:03}",
            time(f.at.div_euclid(1000)).trim_end_matches('Z')
        ),
        format!("{} ({})", f.src, f.src_address),
        format!("{} ({})", f.dst, f.dst_address),
        format!("{}/{}", f.proto, f.port),
        f.path.to_string(),
        f.verdict.to_string(),
        f.rule.clone().unwrap_or_else(|| "(default deny)".into()),
        f.node.clone(),
    ]
}

const FLOW_HEADER: [&str; 8] = [
    "TIME", "FROM", "TO", "PORT", "PATH", "VERDICT", "RULE", "SEEN BY",
];

/// Which flows `bulkhead flows` shows; the controllers filter.
#[derive(Debug, Default)]
pub struct FlowFilter {
    /// Denied or would-be-denied flows only.
    pub denied: bool,
    /// From, to or seen by this identity.
    pub identity: Option<String>,
    /// `overlay` or `underlay`.
    pub path: Option<String>,
    /// `allow`, `deny` or `would-deny`.
    pub verdict: Option<String>,
}

/// How long a controller may take to start answering a flows request.
const FLOWS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// `bulkhead flows`. Each controller keeps the flows its own nodes reported, so with several
/// controllers this asks every live one and merges them by time; `--follow` then prints each new
/// flow from any of them as it comes, and fails (exit 2) once every stream has ended and one of
/// them with an error.
pub fn flows(
    r: &mut Remote,
    filter: FlowFilter,
    follow: bool,
    limit: usize,
    fmt: Format,
) -> anyhow::Result<Outcome> {
    let mut query = String::new();
    if filter.denied {
        query += "&denied=1";
    }
    for (k, v) in [
        ("identity", &filter.identity),
        ("path", &filter.path),
        ("verdict", &filter.verdict),
    ] {
        if let Some(v) = v {
            query += &format!("&{k}={v}");
        }
    }
    let others = r.others();
    let first = r.cfg.url.clone();
    let Remote { rt, conn, .. } = r;
    let mut conns: Vec<(String, &mut Connection)> = vec![(first, conn)];
    let mut rest = others;
    conns.extend(rest.iter_mut().map(|(u, c)| (u.clone(), c)));
    // Asks one controller; `None` (said on stderr) if a further one does not answer in time.
    let open = |url: &str, c: &mut Connection, path: &str, primary: bool| {
        let r = rt.block_on(async { tokio::time::timeout(FLOWS_TIMEOUT, c.stream(path)).await });
        match r {
            Ok(r) if primary => refused(r).map(Some),
            Ok(Ok(lines)) => Ok(Some(Ok(lines))),
            Ok(Err(e)) => {
                eprintln!("bulkhead: controller {url}: {e}: flows its nodes reported are missing");
                Ok(None)
            }
            Err(_) if primary => Err(anyhow!("controller {url}: no answer in {FLOWS_TIMEOUT:?}")),
            Err(_) => {
                eprintln!(
                    "bulkhead: controller {url}: no answer in {FLOWS_TIMEOUT:?}: flows its nodes reported are missing"
                );
                Ok(None)
            }
        }
    };
    // With --follow, subscribed before the histories are read, so that nothing falls between
    // the two; what came in between is in both, and printed once.
    let (tx, mut live) = tokio::sync::mpsc::channel::<Result<FlowView, String>>(4096);
    if follow {
        let path = format!("/v1/flows?limit=0&follow=1{query}");
        for (i, (url, c)) in conns.iter_mut().enumerate() {
            let mut lines = match open(url, c, &path, i == 0)? {
                Some(Ok(l)) => l,
                Some(Err(o)) => return Ok(o),
                None => continue,
            };
            let (tx, url) = (tx.clone(), url.clone());
            rt.spawn(async move {
                loop {
                    let item = match lines.next::<FlowView>().await {
                        Ok(Some(f)) => Ok(f),
                        Ok(None) => Err(format!("controller {url}: the flow stream ended")),
                        Err(e) => Err(format!("controller {url}: {e}")),
                    };
                    let end = item.is_err();
                    if tx.send(item).await.is_err() || end {
                        break;
                    }
                }
            });
        }
    }
    drop(tx);
    let path = format!("/v1/flows?limit={limit}{query}");
    let mut all: Vec<FlowView> = Vec::new();
    for (i, (url, c)) in conns.iter_mut().enumerate() {
        let mut lines = match open(url, c, &path, i == 0)? {
            Some(Ok(l)) => l,
            Some(Err(o)) => return Ok(o),
            None => continue,
        };
        while let Some(f) = rt.block_on(lines.next::<FlowView>())? {
            all.push(f);
        }
    }
    all.sort_by_key(|f| f.at);
    let all = all.split_off(all.len().saturating_sub(limit));
    if !follow {
        emit(fmt, &all, || {
            let mut rows = vec![FLOW_HEADER.map(String::from).to_vec()];
            rows.extend(all.iter().map(flow_row));
            columns(&rows)
        })?;
        return Ok(Outcome::Ok);
    }
    let mut out = std::io::stdout().lock();
    if fmt == Format::Table {
        writeln!(out, "{}", FLOW_HEADER.join("  "))?;
    }
    let mut print = |f: &FlowView| -> anyhow::Result<()> {
        match fmt {
            Format::Table => writeln!(out, "{}", flow_row(f).join("  "))?,
            _ => writeln!(out, "{}", serde_json::to_string(f)?)?,
        }
        Ok(out.flush()?)
    };
    let printed: std::collections::HashSet<String> = all
        .iter()
        .filter_map(|f| serde_json::to_string(f).ok())
        .collect();
    for f in &all {
        print(f)?;
    }
    let mut failed = false;
    while let Some(item) = rt.block_on(live.recv()) {
        match item {
            Ok(f) => {
                if !serde_json::to_string(&f).is_ok_and(|s| printed.contains(&s)) {
                    print(&f)?;
                }
            }
            Err(e) => {
                eprintln!("bulkhead: {}", escape_controls(&e, false));
                failed = true;
            }
        }
    }
    // Each error was said as it came.
    if failed {
        return Err(anyhow!("no controller's flow stream is left to follow"));
    }
    Ok(Outcome::Ok)
}

/// `bulkhead audit`.
pub fn audit(r: &mut Remote, fmt: Format) -> anyhow::Result<Outcome> {
    let log: Vec<AuditEntry> = match refused(r.get("/v1/audit"))? {
        Ok(v) => v,
        Err(o) => return Ok(o),
    };
    emit(fmt, &log, || {
        let dash = || "-".to_string();
        let mut rows = vec![
            ["TIME", "WHO", "ACTION", "IDENTITY", "REVISION", "DETAIL"]
                .map(String::from)
                .to_vec(),
        ];
        for e in &log {
            rows.push(vec![
                time(e.at / 1000),
                e.who.clone(),
                e.action.to_string(),
                e.identity.clone().unwrap_or_else(dash),
                e.revision.map_or_else(dash, |r| r.to_string()),
                e.detail.clone(),
            ]);
        }
        columns(&rows)
    })?;
    Ok(Outcome::Ok)
}

/// `bulkhead status`.
pub fn status(r: &mut Remote, fmt: Format) -> anyhow::Result<Outcome> {
    let s: StatusView = match refused(r.get("/v1/status"))? {
        Ok(s) => s,
        Err(o) => return Ok(o),
    };
    emit(fmt, &s, || {
        let mut rows = vec![
            vec!["controller".into(), s.url.clone()],
            vec!["live controllers".into(), s.controllers.join(", ")],
            vec!["version".into(), s.version.clone()],
            vec!["store".into(), s.store.clone()],
            vec!["policy revision".into(), s.revision.to_string()],
            vec!["identities".into(), s.identities.to_string()],
            vec!["enrolled".into(), s.enrolled.to_string()],
            vec!["online".into(), s.online.to_string()],
            vec!["in sync".into(), s.in_sync.to_string()],
            vec!["uptime".into(), format!("{} s", s.uptime)],
        ];
        for (ep, h) in &s.store_health {
            rows.push(vec![format!("  {ep}"), h.clone()]);
        }
        columns(&rows)
    })?;
    Ok(Outcome::Ok)
}

/// A duration as people write it: `2h`, `15m`, `90s`.
pub fn span(secs: u64) -> String {
    match secs {
        0 => "0s".into(),
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// `bulkhead admin add NAME --role R [--expires D] [--out FILE]`: the key pair is made here and
/// only its public half is sent; the new administrator's CLI configuration goes to stdout (or
/// FILE, mode 0600), to hand over privately.
pub fn admin_add(
    r: &mut Remote,
    name: &str,
    role: Role,
    expires: Option<&str>,
    out: Option<&Path>,
    fmt: Format,
) -> anyhow::Result<Outcome> {
    let expires_in = expires
        .map(|d| {
            bulkhead_policy::parse_duration(d)
                .map_err(|e| anyhow!("--expires: {e}"))
                .map(|s| u64::try_from(s).unwrap_or(0))
        })
        .transpose()?;
    let key = bulkhead_proto::tls::CredentialKey::generate()?;
    let req = AdminRequest {
        name: name.to_string(),
        role,
        expires_in,
        credential_key: key.public().to_base64(),
    };
    let issued: AdminIssued = match refused(r.post("/v1/admins", &req))? {
        Ok(v) => v,
        Err(o) => return Ok(o),
    };
    let cfg = CliConfig {
        url: r.cfg.url.clone(),
        ca: issued.ca.clone(),
        certificate: issued.certificate.clone(),
        key: key.pem(),
    };
    let until = issued
        .admin
        .expires
        .map_or(String::new(), |t| format!(", until {}", time(t)));
    match out {
        Some(path) => {
            cfg.save(path).map_err(|e| anyhow!(e))?;
            emit(fmt, &issued.admin, || {
                format!(
                    "added {} as {}{until}: configuration written to {} (mode 0600)\n",
                    issued.admin.name,
                    issued.admin.role,
                    path.display()
                )
            })?;
        }
        None => {
            eprintln!(
                "bulkhead: added {} as {}{until}; below is its CLI configuration, with its private \
                 key: hand it over privately, keep it mode 0600",
                issued.admin.name, issued.admin.role
            );
            match fmt {
                Format::Json => {
                    crate::output::print(&format!("{}\n", serde_json::to_string_pretty(&cfg)?))?
                }
                _ => crate::output::print(&serde_saphyr::to_string(&cfg)?)?,
            }
        }
    }
    Ok(Outcome::Ok)
}

/// `bulkhead admin list`.
pub fn admin_list(r: &mut Remote, fmt: Format) -> anyhow::Result<Outcome> {
    let admins: Vec<AdminView> = match refused(r.get("/v1/admins"))? {
        Ok(v) => v,
        Err(o) => return Ok(o),
    };
    let now = jiff::Timestamp::now().as_second();
    emit(fmt, &admins, || {
        let mut rows = vec![
            ["NAME", "ROLE", "EXPIRES", "ADDED", "BY", "CREDENTIAL"]
                .map(String::from)
                .to_vec(),
        ];
        for a in &admins {
            rows.push(vec![
                a.name.clone(),
                a.role.to_string(),
                match a.expires {
                    None => "never".into(),
                    Some(t) if t <= now => format!("{} (EXPIRED)", time(t)),
                    Some(t) => time(t),
                },
                time(a.created),
                a.created_by.clone(),
                a.fingerprint.clone(),
            ]);
        }
        columns(&rows)
    })?;
    Ok(Outcome::Ok)
}

/// `bulkhead admin revoke NAME`.
pub fn admin_revoke(r: &mut Remote, name: &str, fmt: Format) -> anyhow::Result<Outcome> {
    let path = format!("/v1/admins/{name}/revoke");
    let v: AdminView = match refused(r.post(&path, &()))? {
        Ok(v) => v,
        Err(o) => return Ok(o),
    };
    emit(fmt, &v, || {
        format!(
            "revoked {} ({}): its credential no longer works, on open connections too\n",
            v.name, v.role
        )
    })?;
    Ok(Outcome::Ok)
}

/// `bulkhead access request RULE [--for D] [--from IDENTITY] --reason TEXT`: the request id on
/// stdout.
pub fn access_request(
    r: &mut Remote,
    rule: &str,
    duration: &str,
    from: Option<&str>,
    reason: &str,
    fmt: Format,
) -> anyhow::Result<Outcome> {
    let secs = bulkhead_policy::parse_duration(duration).map_err(|e| anyhow!("--for: {e}"))?;
    let req = AccessRequest {
        rule: rule.to_string(),
        duration: u64::try_from(secs).unwrap_or(0),
        from: from.map(str::to_string),
        reason: reason.to_string(),
    };
    let v: AccessView = match refused(r.post("/v1/access", &req))? {
        Ok(v) => v,
        Err(o) => return Ok(o),
    };
    eprintln!(
        "bulkhead: request {} for rule {}: needs {} approver(s) other than you by {}",
        v.id,
        v.rule,
        v.approvers_needed,
        time(v.approve_by)
    );
    emit(fmt, &v, || format!("{}\n", v.id))?;
    Ok(Outcome::Ok)
}

/// `bulkhead access list`.
pub fn access_list(r: &mut Remote, fmt: Format) -> anyhow::Result<Outcome> {
    let list: Vec<AccessView> = match refused(r.get("/v1/access"))? {
        Ok(v) => v,
        Err(o) => return Ok(o),
    };
    emit(fmt, &list, || {
        let dash = || "-".to_string();
        let mut rows = vec![
            [
                "ID",
                "RULE",
                "FROM",
                "FOR",
                "STATE",
                "REQUESTER",
                "APPROVED BY",
                "UNTIL",
                "REASON",
            ]
            .map(String::from)
            .to_vec(),
        ];
        for a in &list {
            let approvals: Vec<&str> = a.approvals.iter().map(|p| p.by.as_str()).collect();
            let state = match (a.state, &a.closed_by) {
                (s, Some(by)) => format!("{s} by {by}"),
                (AccessState::Pending, None) => format!(
                    "pending ({}/{}, until {})",
                    a.approvals.len(),
                    a.approvers_needed,
                    time(a.approve_by)
                ),
                (s, None) => s.to_string(),
            };
            rows.push(vec![
                a.id.clone(),
                a.rule.clone(),
                a.from.clone().unwrap_or_else(|| "*".into()),
                span(a.duration),
                state,
                a.requester.clone(),
                if approvals.is_empty() {
                    dash()
                } else {
                    approvals.join(", ")
                },
                a.until.map_or_else(dash, time),
                escape_controls(&a.reason, false).to_string(),
            ]);
        }
        columns(&rows)
    })?;
    Ok(Outcome::Ok)
}

/// `bulkhead access approve|deny|revoke ID`.
pub fn access_act(r: &mut Remote, id: &str, verb: &str, fmt: Format) -> anyhow::Result<Outcome> {
    let path = format!("/v1/access/{id}/{verb}");
    let a: AccessView = match refused(r.post(&path, &()))? {
        Ok(v) => v,
        Err(o) => return Ok(o),
    };
    emit(fmt, &a, || match (verb, a.state) {
        ("approve", AccessState::Approved) => format!(
            "approved {}: rule {} in force until {}\n",
            a.id,
            a.rule,
            a.until.map_or_else(|| "-".into(), time)
        ),
        ("approve", _) => format!(
            "approved {}: {} of {} approvals\n",
            a.id,
            a.approvals.len(),
            a.approvers_needed
        ),
        ("deny", _) => format!("denied {}: it will never take effect\n", a.id),
        _ => format!("revoked {}: rule {} no longer in force\n", a.id, a.rule),
    })?;
    Ok(Outcome::Ok)
}

/// The approved access requests in force, for `policy explain --live`.
pub fn live_grants(r: &mut Remote) -> anyhow::Result<Vec<bulkhead_policy::Grant>> {
    let list: Vec<AccessView> = r.get("/v1/access")?;
    let now = jiff::Timestamp::now().as_second();
    Ok(list
        .into_iter()
        .filter(|a| a.state_at(now) == AccessState::Approved)
        .filter_map(|a| {
            Some(bulkhead_policy::Grant {
                start: a.start?,
                until: a.until?,
                approvers: a.approvals.iter().map(|p| p.by.clone()).collect(),
                initiators: a.from.into_iter().collect(),
                id: a.id,
                rule: a.rule,
                requester: a.requester,
            })
        })
        .collect())
}
