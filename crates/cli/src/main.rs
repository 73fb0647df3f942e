//! `bulkhead`, the operator CLI. A thin shell: the policy logic lives in `bulkhead-policy`.

mod demo;
mod flowsource;
mod history;
mod map;
mod matrix;
mod online;
mod output;
mod policy;
mod replay;
mod suggest;
mod underlay;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

use crate::output::{Format, Outcome};

/// Bulkhead: zero-trust microsegmentation over WireGuard.
#[derive(Debug, Parser)]
#[command(name = "bulkhead", version, about, propagate_version = true)]
struct Cli {
    /// Output format.
    #[arg(
        short = 'o',
        long = "output",
        global = true,
        value_enum,
        default_value = "table"
    )]
    output: Format,

    /// The controller address and credentials (default ~/.config/bulkhead/config.yaml).
    #[arg(long, global = true, env = "BULKHEAD_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Work on policy files.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Join tokens for new nodes.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Every identity: address, endpoint, online, last seen, applied revision, status.
    Nodes,
    /// Revoke an identity's node: every peer drops it, its credential stops working.
    Revoke {
        /// The identity.
        identity: String,
    },
    /// Quarantine an identity: it loses every rule except those naming the segment
    /// `quarantined`, on every node, until the duration passes or `release`.
    Quarantine {
        /// The identity.
        identity: String,
        /// How long, like `15m` (default: the policy's `quarantine.duration`, else until
        /// released).
        #[arg(long)]
        duration: Option<String>,
    },
    /// End an identity's quarantine.
    Release {
        /// The identity.
        identity: String,
    },
    /// The flow log: flow starts and denied new flows, with the rule that decided each. With
    /// `--since`, the durable history instead: per hour, each kind of flow and how many.
    Flows {
        /// Denied flows only.
        #[arg(long)]
        denied: bool,
        /// Keep printing new flows as they come.
        #[arg(long)]
        follow: bool,
        /// Only flows from or to this identity.
        #[arg(long)]
        identity: Option<String>,
        /// Only flows over this path: `overlay` or `underlay` (the host firewall's).
        #[arg(long, value_parser = ["overlay", "underlay"])]
        path: Option<String>,
        /// Only flows with this verdict: `allow`, `deny` or `would-deny`.
        #[arg(long, value_parser = ["allow", "deny", "would-deny"])]
        verdict: Option<String>,
        /// How many past flows to show.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        /// The durable history of this period (like `24h` or `7d`), from every live
        /// controller: one row per hour and kind of flow (source, destination, port, path,
        /// verdict, rule), with how many there were.
        #[arg(long, value_name = "DURATION", value_parser = duration, conflicts_with_all = ["follow", "limit"])]
        since: Option<i64>,
    },
    /// The audit log: policy applies, enrollments, revocations, quarantines, releases,
    /// administrators, access requests and refused calls, each with who did it.
    Audit,
    /// Administrators and their roles: viewer < operator < approver < owner.
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Access under rules that need approval: request, list, approve, deny, revoke.
    #[command(subcommand)]
    Access(AccessCommand),
    /// Who talks to whom, from the flow history: identities grouped by segment, edges for
    /// allowed, denied and would-deny flows with their ports, counts and rules (-o html|dot|json).
    Map(map::Args),
    /// The controller's state.
    Status,
    /// Run the whole overlay on this machine (as root): a controller and a daemon per identity,
    /// each in its own network namespace; probe every pair and compare with the policy.
    Demo {
        /// Exit after one pass: 0 only if the network did exactly what the policy says.
        #[arg(long)]
        check: bool,
        /// The policy to enforce (default: the built-in deploy/examples/three-tier.yaml).
        #[arg(long, value_name = "FILE")]
        policy: Option<PathBuf>,
        /// The rollout journey instead (spec §9): the servers' own addresses, no rules, the
        /// host firewall observing; then suggest, replay, apply, enforce, and every pair probed.
        #[arg(long, conflicts_with = "policy")]
        journey: bool,
    },
    /// Traffic probes run inside the demo's namespaces.
    #[command(hide = true)]
    Probe {
        /// listen PORTS SECONDS | connect ADDR PORT TIMEOUT_MS | hold ADDR PORT SECONDS
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Print a shell completion script.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page, or write one page per command into a directory.
    Man {
        /// Write `bulkhead.1`, `bulkhead-policy.1`, … here instead of printing `bulkhead.1`.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

/// Options shared by commands that evaluate a policy.
#[derive(Debug, Clone, clap::Args)]
struct When {
    /// Evaluate at this time (RFC 3339) instead of now.
    #[arg(long, value_name = "RFC3339")]
    at: Option<String>,
}

#[derive(Debug, Subcommand)]
enum AdminCommand {
    /// Add an administrator and print its CLI configuration (with its private key, made
    /// here): hand it over privately.
    Add {
        /// A name for the audit log: a-z, 0-9 and '-'.
        name: String,
        /// viewer (reads), operator (also changes), approver (also approves access), owner
        /// (also manages administrators).
        #[arg(long, value_parser = parse_role)]
        role: bulkhead_proto::Role,
        /// The credential stops working after this long, like `30d` (default: until revoked).
        #[arg(long, value_name = "DURATION")]
        expires: Option<String>,
        /// Write the configuration to FILE (mode 0600) instead of stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Every administrator: role, expiry, who added it.
    List,
    /// Revoke an administrator: its credential stops working at once, on open connections
    /// too. The last owner cannot be revoked.
    Revoke {
        /// The administrator.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum AccessCommand {
    /// Ask for access under a rule that needs approval; prints the request's id.
    Request {
        /// The rule.
        rule: String,
        /// How long, from its approval (at most the rule's `max`).
        #[arg(long = "for", default_value = "1h", value_name = "DURATION")]
        duration: String,
        /// Only for this initiating identity (default: every identity on the rule's `from`).
        #[arg(long, value_name = "IDENTITY")]
        from: Option<String>,
        /// Why: the approvers and the audit log see it.
        #[arg(long, value_name = "TEXT")]
        reason: String,
    },
    /// Every request and where it stands.
    List,
    /// Approve a request (approvers; never one's own). With as many different approvers as
    /// its rule needs, the access is in force until its time passes.
    Approve {
        /// The request's id.
        id: String,
    },
    /// Deny a pending request: it never takes effect.
    Deny {
        /// The request's id.
        id: String,
    },
    /// End approved access now.
    Revoke {
        /// The request's id.
        id: String,
    },
}

/// A role; an unknown one is a usage error.
fn parse_role(s: &str) -> Result<bulkhead_proto::Role, String> {
    s.parse()
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Print a one-time join token for IDENTITY, and nothing else, on stdout.
    Create {
        /// The identity the token enrolls.
        identity: String,
        /// How long the token stays valid.
        #[arg(long, default_value = "1h", value_name = "DURATION")]
        ttl: String,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Validate a policy and run its tests; exit 1 with every error as FILE:LINE:COL.
    Check {
        /// The policy file.
        file: PathBuf,
        #[command(flatten)]
        when: When,
    },
    /// Run the policy's `tests` block; exit 1 if any test fails.
    Test {
        /// The policy file.
        file: PathBuf,
        #[command(flatten)]
        when: When,
        /// Sample facts per identity (YAML: IDENTITY: { FACT: VALUE, ... }): an identity listed
        /// there fails the posture checks its facts fail; others pass them.
        #[arg(long, value_name = "FILE")]
        facts: Option<PathBuf>,
    },
    /// Explain the verdict for one connection and the rule that decides it; exit 1 unless
    /// allowed.
    Explain {
        /// The policy file.
        file: PathBuf,
        /// The initiating identity.
        from: String,
        /// The responding identity.
        to: String,
        /// tcp/N, udp/N or icmp.
        port: String,
        #[command(flatten)]
        when: When,
        /// Assume FROM fails this posture check (repeatable).
        #[arg(long, value_name = "CHECK")]
        failing: Vec<String>,
        /// Assume this identity is quarantined (repeatable).
        #[arg(long, value_name = "IDENTITY")]
        quarantined: Vec<String>,
        /// Sample facts per identity (YAML: IDENTITY: { FACT: VALUE, ... }): FROM fails the
        /// posture checks its facts fail.
        #[arg(long, value_name = "FILE")]
        facts: Option<PathBuf>,
        /// Through the tunnels (the policy's rules), or between the servers' own addresses
        /// (the `underlay` block: each end's mode and the allow entries that match).
        #[arg(long, value_enum, default_value = "overlay")]
        path: policy::NetPath,
        /// With `--path underlay`: FROM's server's own address, to match networks in `from`.
        #[arg(long, value_name = "IP")]
        from_address: Option<std::net::Ipv4Addr>,
        /// Ask the controller for the approved access requests in force, so that a rule that
        /// needs approval counts where one covers it (and says who approved it, until when).
        #[arg(long)]
        live: bool,
    },
    /// Show who can reach whom, with the ports, grouped by segment.
    Matrix {
        /// The policy file.
        file: PathBuf,
        #[command(flatten)]
        when: When,
    },
    /// Print the compiled allowlist of one identity, or of all: what the controller pushes.
    Compile {
        /// The policy file.
        file: PathBuf,
        /// Only this identity.
        identity: Option<String>,
        #[command(flatten)]
        when: When,
    },
    /// Against the controller: what `apply` would change, as reachability gained and lost;
    /// with --replay or --history, also the recorded flows replayed against FILE (exit 1 if any
    /// would newly be denied).
    Plan {
        /// The policy file.
        file: PathBuf,
        /// Replay the flows of this last period (like 30d) against FILE.
        #[arg(long, value_name = "DURATION")]
        replay: Option<String>,
        /// Replay the flows of FILE (JSON lines of flow aggregates) instead of the controllers':
        /// offline, the replay alone, no controller needed.
        #[arg(long, value_name = "FILE")]
        history: Option<PathBuf>,
    },
    /// A policy whose rules allow the connections the flow history observed, written with
    /// segments where labels allow: YAML on stdout, what each rule covers on stderr.
    Suggest(suggest::Args),
    /// Against the controller: validate, run the tests, show the plan, apply; print the revision.
    Apply {
        /// The policy file.
        file: PathBuf,
        /// Apply without asking.
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// Against the controller: the live policy and its revision.
    Show,
    /// Show the reachability gained and lost between two policies, pair by pair.
    Diff {
        /// The old policy file.
        old: PathBuf,
        /// The new policy file.
        new: PathBuf,
        #[command(flatten)]
        when: When,
    },
}

/// A duration such as `24h` or `7d`, in seconds; a bad one is a usage error.
fn duration(s: &str) -> Result<i64, String> {
    bulkhead_policy::parse_duration(s)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(outcome) => outcome.into(),
        // Whoever read our output has stopped: done, quietly, like any Unix tool.
        Err(e) if output::is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bulkhead: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<Outcome> {
    let fmt = cli.output;
    let remote = || online::Remote::connect(cli.config.as_deref());
    match cli.command {
        Command::Token(TokenCommand::Create { identity, ttl }) => {
            online::token(&mut remote()?, &identity, &ttl, fmt)
        }
        Command::Nodes => online::nodes(&mut remote()?, fmt),
        Command::Revoke { identity } => online::revoke(&mut remote()?, &identity, fmt),
        Command::Quarantine { identity, duration } => {
            online::quarantine(&mut remote()?, &identity, duration.as_deref(), fmt)
        }
        Command::Release { identity } => online::release(&mut remote()?, &identity, fmt),
        Command::Audit => online::audit(&mut remote()?, fmt),
        Command::Admin(a) => match a {
            AdminCommand::Add {
                name,
                role,
                expires,
                out,
            } => online::admin_add(
                &mut remote()?,
                &name,
                role,
                expires.as_deref(),
                out.as_deref(),
                fmt,
            ),
            AdminCommand::List => online::admin_list(&mut remote()?, fmt),
            AdminCommand::Revoke { name } => online::admin_revoke(&mut remote()?, &name, fmt),
        },
        Command::Access(a) => match a {
            AccessCommand::Request {
                rule,
                duration,
                from,
                reason,
            } => online::access_request(
                &mut remote()?,
                &rule,
                &duration,
                from.as_deref(),
                &reason,
                fmt,
            ),
            AccessCommand::List => online::access_list(&mut remote()?, fmt),
            AccessCommand::Approve { id } => {
                online::access_act(&mut remote()?, &id, "approve", fmt)
            }
            AccessCommand::Deny { id } => online::access_act(&mut remote()?, &id, "deny", fmt),
            AccessCommand::Revoke { id } => online::access_act(&mut remote()?, &id, "revoke", fmt),
        },
        Command::Map(args) => map::map(&args, remote, fmt),
        Command::Flows {
            denied,
            follow,
            identity,
            path,
            verdict,
            limit,
            since,
        } => {
            let filter = online::FlowFilter {
                denied,
                identity,
                path,
                verdict,
            };
            match since {
                Some(secs) => history::show(&mut remote()?, secs, &filter, fmt),
                None => online::flows(&mut remote()?, filter, follow, limit, fmt),
            }
        }
        Command::Status => online::status(&mut remote()?, fmt),
        Command::Demo {
            check,
            policy,
            journey,
        } => demo::demo(check, policy.as_deref(), journey, fmt),
        Command::Probe { args } => Ok(match bulkhead_netlab::probe::run(&args) {
            0 => Outcome::Ok,
            _ => Outcome::Failed,
        }),
        Command::Policy(p) => match p {
            PolicyCommand::Check { file, when } => policy::check(&file, &when, fmt),
            PolicyCommand::Test { file, when, facts } => {
                policy::test(&file, &when, facts.as_deref(), fmt)
            }
            PolicyCommand::Explain {
                file,
                from,
                to,
                port,
                when,
                failing,
                quarantined,
                facts,
                path,
                from_address,
                live,
            } => policy::explain(
                &file,
                policy::Query {
                    from,
                    to,
                    port,
                    failing,
                    quarantined,
                    facts,
                    path,
                    from_address,
                },
                &when,
                if live {
                    Some(online::live_grants(&mut remote()?)?)
                } else {
                    None
                },
                fmt,
            ),
            PolicyCommand::Matrix { file, when } => policy::matrix(&file, &when, fmt),
            PolicyCommand::Plan {
                file,
                replay: None,
                history: None,
            } => online::plan(&mut remote()?, &file, fmt),
            PolicyCommand::Plan {
                file,
                replay,
                history,
            } => replay::plan(&file, replay, history, remote, fmt),
            PolicyCommand::Suggest(args) => suggest::suggest(&args, remote, fmt),
            PolicyCommand::Apply { file, yes } => online::apply(&mut remote()?, &file, yes, fmt),
            PolicyCommand::Show => online::show(&mut remote()?, fmt),
            PolicyCommand::Diff { old, new, when } => policy::diff(&old, &new, &when, fmt),
            PolicyCommand::Compile {
                file,
                identity,
                when,
            } => policy::compile(&file, identity.as_deref(), &when, fmt),
        },
        // Both generators panic on a failed write, so they write to memory first.
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "bulkhead", &mut script);
            output::print(&String::from_utf8_lossy(&script))?;
            Ok(Outcome::Ok)
        }
        Command::Man { dir } => {
            let cmd = Cli::command();
            match dir {
                None => {
                    let mut page = Vec::new();
                    clap_mangen::Man::new(cmd).render(&mut page)?;
                    output::print(&String::from_utf8_lossy(&page))?;
                }
                Some(dir) => {
                    std::fs::create_dir_all(&dir)?;
                    clap_mangen::generate_to(cmd, &dir)?;
                }
            }
            Ok(Outcome::Ok)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn roles_are_known_or_a_usage_error() {
        let parse = |role: &str| {
            Cli::try_parse_from(["bulkhead", "admin", "add", "alice", "--role", role])
                .map(|c| c.command)
        };
        match parse("approver") {
            Ok(Command::Admin(AdminCommand::Add { role, .. })) => {
                assert_eq!(role, bulkhead_proto::Role::Approver);
            }
            other => panic!("{other:?}"),
        }
        let e = parse("root").map(|_| ()).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("unknown role"), "{e}");
        let e = Cli::try_parse_from(["bulkhead", "access", "request", "r"])
            .map(|_| ())
            .unwrap_err();
        assert_eq!(e.exit_code(), 2, "a request needs a reason");
    }

    #[test]
    fn flows_since_takes_a_duration_and_nothing_it_cannot_honour() {
        let parse = |args: &[&str]| Cli::try_parse_from(["bulkhead", "flows"].iter().chain(args));
        match parse(&["--since", "7d"]).map(|c| c.command) {
            Ok(Command::Flows { since, .. }) => assert_eq!(since, Some(7 * 86_400)),
            other => panic!("{other:?}"),
        }
        for bad in [
            &["--since", "7x"][..],
            &["--since", "0s"],
            &["--since", ""],
            &["--since", "1h", "--follow"],
            &["--since", "1h", "--limit", "5"],
        ] {
            let e = parse(bad).map(|_| ()).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad:?}: a usage error");
        }
    }
}
