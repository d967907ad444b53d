//! bypassctl: the command-line client of bypassd, over the D-Bus system bus
//! (`DBUS_SYSTEM_BUS_ADDRESS` is honoured). Exit codes are in [`cli::exit`].
mod cli;
mod generate;
mod output;
mod watch;

use bypassd_api::{self as api, ManagerProxy};
use clap::Parser;
use cli::{AddArgs, Cli, Command, PolicyCommand, exit};
use output::Out;
use serde_json::{Value, json};
use std::{io::Read, process::ExitCode, time::Duration};

/// How long a call may take (a reload builds a new datapath: seconds at most).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// zbus's default when DBUS_SYSTEM_BUS_ADDRESS is not set.
const DEFAULT_SYSTEM_BUS: &str = "unix:path=/var/run/dbus/system_bus_socket";

/// Why a command failed, with the exit code it maps to.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    /// D-Bus error name, when the failure was one.
    pub name: Option<String>,
    pub message: String,
}

impl Failure {
    fn new(code: u8, name: Option<String>, message: impl Into<String>) -> Failure {
        Failure { code, name, message: message.into() }
    }

    pub fn kind(&self) -> &'static str {
        match self.code {
            exit::PERMISSION_DENIED => "permission_denied",
            exit::INVALID_ARGUMENT => "invalid_argument",
            exit::NOT_RUNNING => "not_running",
            exit::USAGE => "usage",
            _ => "error",
        }
    }
}

type Result<T> = std::result::Result<T, Failure>;

fn bus_address() -> String {
    std::env::var("DBUS_SYSTEM_BUS_ADDRESS").unwrap_or_else(|_| DEFAULT_SYSTEM_BUS.to_string())
}

/// `what` is the first line: what we found.
fn not_running(what: &str) -> Failure {
    Failure::new(
        exit::NOT_RUNNING,
        None,
        format!(
            "{what}\nCheck with `systemctl status bypassd` (and `journalctl -u bypassd`); \
             start it with `systemctl start bypassd`."
        ),
    )
}

fn euid() -> u32 {
    // SAFETY: geteuid cannot fail and has no preconditions.
    unsafe { libc::geteuid() }
}

/// Map an error of a call made for `what` (e.g. "pause") to a failure.
fn classify(e: api::Error, what: &str) -> Failure {
    let name = e.error_name();
    let denied = || {
        Failure::new(
            exit::PERMISSION_DENIED,
            name.clone(),
            format!(
                "permission denied: `bypassctl {what}` changes bypassd and needs root (you are uid {}); \
                 run it as root, e.g. with sudo",
                euid()
            ),
        )
    };
    match e {
        api::Error::AccessDenied(_) => denied(),
        api::Error::InvalidArgument(m) => Failure::new(exit::INVALID_ARGUMENT, name, format!("invalid argument: {m}")),
        api::Error::InvalidConfig(m) => Failure::new(
            exit::ERROR,
            name,
            format!("the config file is invalid; bypassd keeps its running configuration:\n{m}"),
        ),
        api::Error::NotAttached(m) => Failure::new(exit::ERROR, name, m),
        api::Error::Failed(m) => Failure::new(exit::ERROR, name, format!("bypassd failed: {m}")),
        api::Error::Bus(ref b) => match name.as_deref() {
            Some("org.freedesktop.DBus.Error.ServiceUnknown" | "org.freedesktop.DBus.Error.NameHasNoOwner") => {
                not_running(&format!(
                    "bypassd is not running: nobody owns {} on the system bus at {}.",
                    api::BUS_NAME,
                    bus_address()
                ))
            }
            Some("org.freedesktop.DBus.Error.AccessDenied") => denied(),
            Some("org.freedesktop.DBus.Error.InvalidArgs") => {
                Failure::new(exit::INVALID_ARGUMENT, name.clone(), format!("invalid argument: {}", e.message()))
            }
            Some("org.freedesktop.DBus.Error.NoReply" | "org.freedesktop.DBus.Error.Timeout") => Failure::new(
                exit::ERROR,
                name.clone(),
                "bypassd did not answer in time; check with `systemctl status bypassd`".to_string(),
            ),
            Some(
                "org.freedesktop.DBus.Error.UnknownMethod"
                | "org.freedesktop.DBus.Error.UnknownObject"
                | "org.freedesktop.DBus.Error.UnknownInterface",
            ) => Failure::new(
                exit::ERROR,
                name.clone(),
                format!("bypassd does not know this request (is it older than bypassctl?): {}", e.message()),
            ),
            Some(n) => Failure::new(exit::ERROR, Some(n.to_string()), format!("{n}: {}", e.message())),
            None if matches!(b, zbus::Error::InputOutput(_)) => {
                not_running(&format!("bypassd is not reachable: lost the system bus at {} ({b}).", bus_address()))
            }
            None => Failure::new(exit::ERROR, None, format!("D-Bus error: {b}")),
        },
    }
}

fn connect() -> Result<ManagerProxy<'static>> {
    let conn = zbus::blocking::connection::Builder::system()
        .and_then(|b| b.method_timeout(CALL_TIMEOUT).build())
        .map_err(|e| {
            not_running(&format!(
                "bypassd is not reachable: cannot connect to the system bus at {} ({e}). Is D-Bus running?",
                bus_address()
            ))
        })?;
    ManagerProxy::builder(&conn)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .map_err(|e| classify(e.into(), "connect"))
}

fn main() -> ExitCode {
    // A closed stdout (`bypassctl ... | head`) ends bypassctl quietly, as it does other
    // Unix tools, instead of a panic in println!. Rust starts with SIGPIPE ignored.
    // SAFETY: called before any thread exists; SIG_DFL is a valid disposition.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "generate") {
        let g = cli::GenerateCli::parse_from(&args[1..]);
        return match generate::run(&g.what) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bypassctl: {e:#}");
                ExitCode::from(exit::ERROR)
            }
        };
    }
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { exit::USAGE } else { exit::OK });
        }
    };
    let out = Out { json: cli.json };
    match run(&cli.command, &out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            out.failure(&f);
            ExitCode::from(f.code)
        }
    }
}

fn run(cmd: &Command, out: &Out) -> Result<()> {
    let p = connect()?;
    match cmd {
        Command::Status => {
            let s = p.get_status().map_err(|e| classify(e, "status"))?;
            // A daemon without the link datapath (older version) has no ListLinks.
            let links = p.list_links().unwrap_or_default();
            out.status(&s, &links);
        }
        Command::Stats(a) if a.watch => watch::run(&p, out.json, a.interval, a.count)?,
        Command::Stats(_) => {
            let s = p.get_stats().map_err(|e| classify(e, "stats"))?;
            out.stats(&s);
        }
        Command::Connections => {
            let c = p.list_connections().map_err(|e| classify(e, "connections"))?;
            out.connections(&c);
        }
        Command::Policy(PolicyCommand::List) => {
            let (default, rules) = p.list_policy().map_err(|e| classify(e, "policy list"))?;
            out.policy(&default, &rules);
        }
        Command::Policy(PolicyCommand::Add(a)) => {
            let rule = rule_toml(a);
            let index = match a.position {
                Some(pos) => p.policy_insert(pos, &rule),
                None => p.policy_add(&rule),
            }
            .map_err(|e| classify(e, "policy add"))?;
            let (_, rules) = p.list_policy().map_err(|e| classify(e, "policy list"))?;
            let summary = rules.iter().find(|r| r.index == index).map(|r| r.summary.clone()).unwrap_or_default();
            out.changed(true, &format!("added rule {index}: {summary}"), "", json!({"index": index}));
        }
        Command::Policy(PolicyCommand::Remove { index }) => {
            p.policy_remove(*index).map_err(|e| classify(e, "policy remove"))?;
            out.changed(true, &format!("removed rule {index}"), "", json!({"index": index}));
        }
        Command::Policy(PolicyCommand::Apply { file, dry_run: true }) => {
            let text = read_policy_file(file)?;
            let (changed, current, proposed) =
                p.policy_diff(&text).map_err(|e| classify(e, "policy apply --dry-run"))?;
            out.policy_diff(changed, &current, &proposed);
        }
        Command::Policy(PolicyCommand::Apply { file, dry_run: false }) => {
            let text = read_policy_file(file)?;
            let changed = p.policy_apply(&text).map_err(|e| classify(e, "policy apply"))?;
            out.changed(changed, "", "", json!({}));
        }
        Command::Policy(PolicyCommand::Reset) => {
            let changed = p.policy_reset().map_err(|e| classify(e, "policy reset"))?;
            out.changed(changed, "runtime rules dropped", "there were no runtime rules", json!({}));
        }
        Command::Reload => {
            let before = p.get_status().map_err(|e| classify(e, "reload"))?;
            p.reload().map_err(|e| classify(e, "reload"))?;
            let after = p.get_status().map_err(|e| classify(e, "reload"))?;
            let changed = before.config_sha256 != after.config_sha256 || before.state != after.state;
            out.changed(
                changed,
                &format!("reloaded {} (sha256 {})", after.config_path, short(&after.config_sha256)),
                &format!("reloaded {}; it did not change", after.config_path),
                json!({"config_path": after.config_path, "config_sha256": after.config_sha256, "state": after.state}),
            );
        }
        Command::Pause => {
            let changed = p.pause().map_err(|e| classify(e, "pause"))?;
            out.changed(
                changed,
                "acceleration of new connections paused",
                "acceleration of new connections was already paused",
                json!({"paused": true}),
            );
        }
        Command::Resume => {
            let changed = p.resume().map_err(|e| classify(e, "resume"))?;
            out.changed(
                changed,
                "acceleration of new connections resumed",
                "acceleration of new connections was not paused",
                json!({"paused": false}),
            );
        }
        Command::Detach => {
            let before = p.get_status().map_err(|e| classify(e, "detach"))?;
            p.detach().map_err(|e| classify(e, "detach"))?;
            out.changed(
                before.state != api::state::DETACHED,
                "datapath detached; accelerated connections finish on it, `bypassctl reload` attaches again",
                "the datapath was already detached",
                json!({"state": api::state::DETACHED}),
            );
        }
    }
    Ok(())
}

fn short(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}

/// The rule as a TOML table body, for bypassd's own parser.
fn rule_toml(a: &AddArgs) -> String {
    let mut t = toml::Table::new();
    let mut put = |k: &str, v: Option<toml::Value>| {
        if let Some(v) = v {
            t.insert(k.to_string(), v);
        }
    };
    put("name", a.name.clone().map(toml::Value::String));
    put("action", Some(toml::Value::String(a.action.as_str().into())));
    put("local_ports", a.local_ports.clone().map(toml::Value::String));
    put("remote_ports", a.remote_ports.clone().map(toml::Value::String));
    put("ports", a.ports.clone().map(toml::Value::String));
    put("local_cidr", a.local_cidr.clone().map(toml::Value::String));
    put("remote_cidr", a.remote_cidr.clone().map(toml::Value::String));
    put("cgroup", a.cgroup.clone().map(toml::Value::String));
    put("uid", a.uid.map(|u| toml::Value::Integer(u.into())));
    toml::to_string(&t).unwrap_or_default()
}

fn read_policy_file(file: &std::path::Path) -> Result<String> {
    let bad = |e: std::io::Error| {
        Failure::new(exit::INVALID_ARGUMENT, None, format!("invalid argument: cannot read {}: {e}", file.display()))
    };
    if file.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).map_err(bad)?;
        Ok(s)
    } else {
        std::fs::read_to_string(file).map_err(bad)
    }
}

/// A rule's TOML text as a JSON object (for --json); the text itself if it does not parse.
pub fn rule_json(text: &str) -> Value {
    match toml::from_str::<toml::Table>(text) {
        Ok(t) => serde_json::to_value(t).unwrap_or(Value::Null),
        Err(_) => Value::String(text.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn add_flags_become_a_rule_table() {
        let cli = Cli::try_parse_from([
            "bypassctl",
            "policy",
            "add",
            "--action",
            "accelerate",
            "--remote-ports",
            "8000-8999",
            "--uid",
            "1000",
            "--name",
            "web \"x\"",
        ])
        .unwrap();
        let Command::Policy(PolicyCommand::Add(a)) = cli.command else { panic!() };
        let t: toml::Table = toml::from_str(&rule_toml(&a)).unwrap();
        assert_eq!(t["action"].as_str(), Some("accelerate"));
        assert_eq!(t["remote_ports"].as_str(), Some("8000-8999"));
        assert_eq!(t["uid"].as_integer(), Some(1000));
        assert_eq!(t["name"].as_str(), Some("web \"x\""));
        assert!(!t.contains_key("local_cidr"));
    }

    #[test]
    fn help_documents_the_exit_codes() {
        let help = Cli::command().render_long_help().to_string();
        for code in ["0 ", "1 ", "2 ", "3 ", "4 ", "69 "] {
            assert!(help.contains(&format!("\n  {code}")), "exit code {code} missing from --help:\n{help}");
        }
        assert!(help.contains("systemctl status bypassd"));
        assert!(help.contains("DBUS_SYSTEM_BUS_ADDRESS"));
    }
}
