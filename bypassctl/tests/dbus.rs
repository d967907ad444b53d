//! bypassd's D-Bus interface and bypassctl against a real `dbus-daemon` (system-type
//! config including the project's bus policy file) and a real bypassd, as root.
//!
//! Needs root (BPF, cgroups, `setpriv`), `dbus-daemon` (package dbus), `busctl`
//! (systemd) and the workspace's binaries (`cargo build --workspace` first).
//! Fails, never skips, when something is missing.
mod common;

use bypass_testsupport::{self as ts, dbus::SystemBus};
use bypassd_api as api;
use common::*;
use serde_json::Value;
use std::{
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

const STATS_FIELDS: [&str; 6] =
    ["sockets_inserted", "insert_failures", "redirected_msgs", "redirected_bytes", "passed_msgs", "passed_bytes"];
const STATUS_FIELDS: [&str; 12] = [
    "version",
    "state",
    "reason",
    "paused",
    "cgroup",
    "pin_dir",
    "config_path",
    "config_sha256",
    "started_at",
    "abi_version",
    "capacity",
    "inactive_rules",
];

/// Proof 1: every subcommand works as root, human and --json, and the JSON parses.
#[test]
fn every_subcommand_works_as_root_in_both_forms() {
    let w = World::new();

    // Read commands.
    let human = w.ok(&["status"]);
    assert!(human.contains("State:") && human.contains("attached"), "{human}");
    let st = w.json(&["status"]);
    assert_fields(&st, &STATUS_FIELDS, "status");
    assert_eq!(st["state"], "attached");
    assert_eq!(st["cgroup"], w.cgroup.path.display().to_string());
    assert_eq!(st["pin_dir"], w.pins.path().display().to_string());

    assert!(w.ok(&["stats"]).contains("sockets_inserted"));
    let stats = w.json(&["stats"]);
    assert_fields(&stats, &STATS_FIELDS, "stats");
    assert!(STATS_FIELDS.iter().all(|f| stats[f].is_u64()), "{stats}");

    assert!(w.ok(&["connections"]).contains("no accelerated connections"));
    assert!(w.json(&["connections"])["connections"].is_array());

    let list = w.ok(&["policy", "list"]);
    assert!(
        list.contains("Default action: kernel") && list.contains("config") && list.contains("from config"),
        "{list}"
    );
    let pl = w.json(&["policy", "list"]);
    assert_eq!(pl["default_action"], "kernel");
    assert_eq!(pl["rules"].as_array().unwrap().len(), 1);
    assert_eq!(pl["rules"][0]["source"], "config");
    assert_eq!(pl["rules"][0]["rule"]["remote_ports"], "9000-9100");

    // Pause / resume.
    assert!(w.ok(&["pause"]).starts_with("changed"));
    assert_eq!(w.json(&["pause"])["changed"], false);
    assert_eq!(w.json(&["status"])["paused"], true);
    assert!(w.ok(&["resume"]).starts_with("changed"));
    let r = w.json(&["resume"]);
    assert_eq!((r["changed"].clone(), r["paused"].clone()), (Value::Bool(false), Value::Bool(false)));

    // Policy add (flags), with and without --position, human and JSON.
    let out = w.ok(&["policy", "add", "--action", "accelerate", "--remote-ports", "8080", "--name", "web"]);
    assert!(out.starts_with("changed: added rule 1: accelerate remote_ports=8080"), "{out}");
    let cg = w.cgroup.rel.clone();
    let added = w.json(&[
        "policy",
        "add",
        "--action",
        "kernel",
        "--local-ports",
        "7000-7999",
        "--remote-ports",
        "22",
        "--local-cidr",
        "127.0.0.0/8",
        "--remote-cidr",
        "::1",
        "--cgroup",
        &cg,
        "--uid",
        "1000",
        "--name",
        "first",
        "--position",
        "1",
    ]);
    assert_eq!((added["changed"].clone(), added["index"].clone()), (Value::Bool(true), Value::from(1)));
    let pl = w.json(&["policy", "list"]);
    let rules = pl["rules"].as_array().unwrap();
    let names: Vec<&str> = rules.iter().map(|r| r["name"].as_str().unwrap_or("")).collect();
    let sources: Vec<&str> = rules.iter().map(|r| r["source"].as_str().unwrap()).collect();
    assert_eq!(names, ["first", "web", "from config"]);
    assert_eq!(sources, ["runtime", "runtime", "config"]);
    assert_eq!(rules[0]["rule"]["uid"], 1000);
    assert_eq!(rules[0]["rule"]["cgroup"], cg.as_str());
    assert_eq!(rules[0]["rule"]["remote_cidr"], "::1/128");
    assert!(w.state.path().join("policy.toml").exists(), "runtime rules are persisted");
    let table = w.ok(&["policy", "list"]);
    assert!(table.contains("runtime") && table.contains("first") && table.contains("from config"), "{table}");

    // Remove, human and JSON.
    assert!(w.ok(&["policy", "remove", "1"]).starts_with("changed: removed rule 1"));
    assert_eq!(w.json(&["policy", "remove", "1"])["changed"], true);
    assert_eq!(w.json(&["policy", "list"])["rules"].as_array().unwrap().len(), 1);

    // Apply: changed, then unchanged; from a file and from stdin.
    let file = w.state.path().join("../apply-policy.toml");
    let file = file.to_str().unwrap().to_string();
    let _cleanup = Cleanup(file.clone());
    std::fs::write(
        &file,
        "[[rules]]\nname = \"a\"\naction = \"accelerate\"\nremote_ports = \"80\"\n\n[[rules]]\naction = \"kernel\"\nlocal_cidr = \"10.0.0.0/8\"\n",
    )
    .unwrap();
    assert_eq!(w.ok(&["policy", "apply", &file]).trim(), "changed");
    assert_eq!(w.ok(&["policy", "apply", &file]).trim(), "unchanged");
    assert_eq!(w.json(&["policy", "apply", &file])["changed"], false);
    let mut c = w.cmd(false, &["--json", "policy", "apply", "-"]);
    let mut child = c.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"[[rules]]\naction = \"kernel\"\nremote_ports = \"81\"\n").unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(parse_json(&["policy", "apply", "-"], &o)["changed"], true);
    assert_eq!(w.json(&["policy", "list"])["rules"].as_array().unwrap().len(), 2);

    // Reset: changed, then unchanged.
    assert!(w.ok(&["policy", "reset"]).starts_with("changed"));
    assert_eq!(w.json(&["policy", "reset"])["changed"], false);
    assert!(w.ok(&["policy", "reset"]).starts_with("unchanged"));
    assert!(!w.state.path().join("policy.toml").exists());

    // Reload: unchanged config, then a changed one.
    assert!(w.ok(&["reload"]).starts_with("unchanged"));
    let cfg = w.daemon.as_ref().unwrap().config.clone();
    let mut body = std::fs::read_to_string(&cfg).unwrap();
    body = body.replace("default = \"kernel\"", "default = \"accelerate\"");
    std::fs::write(&cfg, body).unwrap();
    let r = w.json(&["reload"]);
    assert_eq!(r["changed"], true);
    assert_eq!(r["config_sha256"].as_str().map(str::len), Some(64));
    assert_eq!(w.json(&["policy", "list"])["default_action"], "accelerate");

    // Detach, then reload attaches again; detach in JSON.
    assert!(w.ok(&["detach"]).starts_with("changed: datapath detached"));
    let st = w.json(&["status"]);
    assert_eq!(st["state"], "detached");
    assert!(!st["reason"].as_str().unwrap().is_empty());
    let o = w.ctl(&["stats"]);
    assert_eq!(o.status.code(), Some(1), "stats while detached: {}", describe(&o));
    assert!(text(&o.stderr).contains("detached"), "{}", describe(&o));
    assert!(w.ok(&["reload"]).starts_with("changed"));
    assert_eq!(w.json(&["status"])["state"], "attached");
    let d = w.json(&["detach"]);
    assert_eq!((d["changed"].clone(), d["state"].clone()), (Value::Bool(true), Value::from("detached")));
    assert_eq!(w.json(&["detach"])["changed"], false);
}

struct Cleanup(String);
impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Every write command, as bypassctl arguments.
fn write_commands(policy_file: &str) -> Vec<Vec<String>> {
    let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    vec![
        v(&["reload"]),
        v(&["pause"]),
        v(&["resume"]),
        v(&["detach"]),
        v(&["policy", "add", "--action", "accelerate", "--remote-ports", "8080"]),
        v(&["policy", "add", "--action", "kernel", "--position", "1"]),
        v(&["policy", "remove", "1"]),
        v(&["policy", "apply", policy_file]),
        v(&["policy", "reset"]),
    ]
}

fn assert_denied(o: &Output, what: &[String]) {
    assert_eq!(o.status.code(), Some(EXIT_PERMISSION_DENIED), "{what:?} as nobody: {}", describe(o));
    let err = text(&o.stderr);
    assert!(err.contains("permission denied"), "{what:?}: {err}");
    assert!(err.contains("uid 65534"), "{what:?}: {err}");
    assert!(!err.contains("org.freedesktop"), "no raw D-Bus error for people: {err}");
}

/// Proof 2: unprivileged users can read, every write fails with "permission denied"
/// and a non-zero exit, and nothing changes.
#[test]
fn unprivileged_users_read_but_cannot_write() {
    let w = World::new();
    // A runtime rule exists, so remove/reset would change something if allowed.
    w.ok(&["policy", "add", "--action", "kernel", "--remote-ports", "5000", "--name", "keep me"]);
    let before = w.snapshot();

    for args in [&["status"][..], &["stats"], &["connections"], &["policy", "list"]] {
        let o = w.ctl_nobody(args);
        assert!(o.status.success(), "{args:?} as nobody: {}", describe(&o));
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        parse_json(&a, &w.ctl_nobody(&a));
    }
    assert_fields(&parse_json(&["--json", "stats"], &w.ctl_nobody(&["--json", "stats"])), &STATS_FIELDS, "stats");
    // Properties and introspection are readable too.
    let (ok, _, err) = w.busctl_call(true, &["get-property", api::BUS_NAME, api::OBJECT_PATH, api::INTERFACE, "State"]);
    assert!(ok, "Get as nobody: {err}");
    let (ok, _, err) = w.busctl_call(true, &["introspect", api::BUS_NAME, api::OBJECT_PATH]);
    assert!(ok, "Introspect as nobody: {err}");

    let file = w.state.path().join("../nobody-policy.toml");
    let file = file.to_str().unwrap().to_string();
    let _cleanup = Cleanup(file.clone());
    std::fs::write(&file, "[[rules]]\naction = \"accelerate\"\n").unwrap();
    for args in write_commands(&file) {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_denied(&w.ctl_nobody(&a), &args);
        let mut j = vec!["--json"];
        j.extend_from_slice(&a);
        let o = w.ctl_nobody(&j);
        assert_denied(&o, &args);
        let doc: Value =
            serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{args:?} --json: {e}: {}", describe(&o)));
        assert_eq!(doc["error"]["kind"], "permission_denied", "{doc}");
    }
    // Properties.Set is refused by the bus.
    let (ok, name, _) =
        w.busctl_call(true, &["set-property", api::BUS_NAME, api::OBJECT_PATH, api::INTERFACE, "Paused", "b", "true"]);
    assert!(!ok);
    assert_eq!(name.as_deref(), Some("org.freedesktop.DBus.Error.AccessDenied"));
    // The same write methods called directly are refused too.
    for m in api::WRITE_METHODS {
        let (ok, name, err) = w.busctl_call(true, &["call", api::BUS_NAME, api::OBJECT_PATH, api::INTERFACE, m]);
        assert!(!ok, "{m} as nobody succeeded");
        assert_eq!(name.as_deref(), Some("org.freedesktop.DBus.Error.AccessDenied"), "{m}: {err}");
    }

    assert_eq!(w.snapshot(), before, "state changed after refused calls");
}

/// Defence in depth: with a bus policy that lets everyone call everything, bypassd
/// still refuses non-root callers itself, logs their uid and changes nothing.
#[test]
fn bypassd_checks_the_callers_uid_itself() {
    let mut w = World::with_bus(SystemBus::start_permissive().expect("start permissive dbus-daemon"));
    w.ok(&["policy", "add", "--action", "kernel", "--remote-ports", "5000"]);
    let before = w.snapshot();
    let file = w.state.path().join("../permissive-policy.toml");
    let file = file.to_str().unwrap().to_string();
    let _cleanup = Cleanup(file.clone());
    std::fs::write(&file, "[[rules]]\naction = \"accelerate\"\n").unwrap();
    for args in write_commands(&file) {
        let mut j = vec!["--json".to_string()];
        j.extend(args.iter().cloned());
        let a: Vec<&str> = j.iter().map(String::as_str).collect();
        let o = w.ctl_nobody(&a);
        assert_denied(&o, &args);
        let doc: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(doc["error"]["name"], api::ERROR_ACCESS_DENIED, "{args:?}: {doc}");
    }
    for m in api::WRITE_METHODS {
        let (ok, name, err) = w.busctl_call(true, &["call", api::BUS_NAME, api::OBJECT_PATH, api::INTERFACE, m]);
        assert!(!ok, "{m} as nobody succeeded");
        // Methods with arguments fail on the missing arguments first; either way nothing runs.
        assert!(
            name.as_deref() == Some(api::ERROR_ACCESS_DENIED) || name.as_deref() == Some("org.freedesktop.zbus.Error"),
            "{m}: {name:?} {err}"
        );
    }
    let (ok, name, _) =
        w.busctl_call(true, &["call", api::BUS_NAME, api::OBJECT_PATH, api::INTERFACE, "PolicyRemove", "u", "1"]);
    assert!(!ok);
    assert_eq!(name.as_deref(), Some(api::ERROR_ACCESS_DENIED));
    assert_eq!(w.snapshot(), before, "state changed after refused calls");
    let log = w.daemon().log();
    assert!(log.contains("refused Pause from uid 65534"), "refusals are logged with the uid:\n{log}");
    assert!(log.contains("refused PolicyReset from uid 65534"), "{log}");
}

/// Proof 3: a non-root process cannot take the bus name (free or owned).
#[test]
fn non_root_cannot_own_the_bus_name() {
    let mut w = World::without_daemon(SystemBus::start().expect("start dbus-daemon"));
    let request = [
        "call",
        "org.freedesktop.DBus",
        "/org/freedesktop/DBus",
        "org.freedesktop.DBus",
        "RequestName",
        "su",
        api::BUS_NAME,
        "4",
    ];
    let (ok, name, err) = w.busctl_call(true, &request);
    assert!(!ok, "nobody got {} while it was free: {err}", api::BUS_NAME);
    assert_eq!(name.as_deref(), Some("org.freedesktop.DBus.Error.AccessDenied"), "{err}");
    w.start_daemon();
    let (ok, name, err) = w.busctl_call(true, &request);
    assert!(!ok, "nobody got {}: {err}", api::BUS_NAME);
    assert_eq!(name.as_deref(), Some("org.freedesktop.DBus.Error.AccessDenied"), "{err}");
    // bypassd still has it.
    w.ok(&["status"]);
}

fn assert_not_running(o: &Output, elapsed: Duration, what: &str) {
    assert_eq!(o.status.code(), Some(EXIT_NOT_RUNNING), "{what}: {}", describe(o));
    let err = text(&o.stderr);
    assert!(err.contains("bypassd is not running") || err.contains("bypassd is not reachable"), "{what}: {err}");
    assert!(err.contains("systemctl status bypassd"), "{what}: {err}");
    assert!(elapsed < Duration::from_secs(1), "{what} took {elapsed:?}");
}

fn all_commands() -> Vec<Vec<&'static str>> {
    vec![
        vec!["status"],
        vec!["stats"],
        vec!["connections"],
        vec!["policy", "list"],
        vec!["policy", "add", "--action", "kernel"],
        vec!["policy", "remove", "1"],
        vec!["policy", "apply", "/dev/null"],
        vec!["policy", "reset"],
        vec!["reload"],
        vec!["pause"],
        vec!["resume"],
        vec!["detach"],
    ]
}

/// Proof 4: with bypassd stopped (and with no bus at all), bypassctl exits 69 with a
/// message saying so and how to check, within a second.
#[test]
fn without_bypassd_bypassctl_exits_69_quickly() {
    let mut w = World::new();
    w.ok(&["status"]);
    assert_eq!(w.daemon().stop(), Some(0), "bypassd stops cleanly on SIGTERM");
    for args in all_commands() {
        for json in [false, true] {
            let mut a = if json { vec!["--json"] } else { vec![] };
            a.extend_from_slice(&args);
            let t = Instant::now();
            let o = w.ctl(&a);
            assert_not_running(&o, t.elapsed(), &format!("{a:?}"));
            assert!(text(&o.stderr).contains("bypassd is not running"), "{}", describe(&o));
            if json {
                let doc: Value = serde_json::from_slice(&o.stdout).unwrap();
                assert_eq!(doc["error"]["kind"], "not_running", "{doc}");
                assert_eq!(doc["error"]["exit_code"], EXIT_NOT_RUNNING);
            }
        }
    }
    // Unprivileged users get the same answer.
    let t = Instant::now();
    assert_not_running(&w.ctl_nobody(&["status"]), t.elapsed(), "status as nobody");

    // No system bus at all.
    let gone = ts::TempDir::new();
    for args in [vec!["status"], vec!["pause"]] {
        let t = Instant::now();
        let o = Command::new(bypassctl())
            .args(&args)
            .env("DBUS_SYSTEM_BUS_ADDRESS", format!("unix:path={}/no-bus", gone.path().display()))
            .output()
            .unwrap();
        assert_not_running(&o, t.elapsed(), "no bus");
        assert!(text(&o.stderr).contains("system bus"), "{}", describe(&o));
    }
}

/// Proof 5: malformed arguments to every write method (called with busctl) get a
/// named error and change nothing.
#[test]
fn malformed_write_arguments_get_named_errors_and_change_nothing() {
    let w = World::new();
    w.ok(&["policy", "add", "--action", "kernel", "--remote-ports", "5000", "--name", "existing"]);
    let before = w.snapshot();
    let inv = Some(api::ERROR_INVALID_ARGUMENT);
    // zbus answers calls whose signature does not match before bypassd sees them.
    let sig = Some("org.freedesktop.zbus.Error");
    let cases: Vec<(&str, Vec<&str>, Option<&str>, &str)> = vec![
        ("PolicyAdd", vec!["s", "action = \"accelerate\"\nremote_cidr = \"10.0.0.1/8\""], inv, "host bits"),
        ("PolicyAdd", vec!["s", "action = \"accelerate\"\nremote_cidr = \"10.0.0.0/33\""], inv, "remote_cidr"),
        ("PolicyAdd", vec!["s", "action = \"sometimes\""], inv, "unknown variant"),
        ("PolicyAdd", vec!["s", "action = \"kernel\"\nlocal_ports = \"0\""], inv, "out of range"),
        ("PolicyAdd", vec!["s", "action = \"kernel\"\ncolour = \"blue\""], inv, "unknown field `colour`"),
        ("PolicyAdd", vec!["s", "remote_ports = 80"], inv, "missing field `action`"),
        ("PolicyAdd", vec!["s", "action = "], inv, "invalid TOML"),
        (
            "PolicyAdd",
            vec!["s", "name = \"nope\"\naction = \"kernel\"\ncgroup = \"/no/such/cgroup\""],
            inv,
            "(nope): cgroup",
        ),
        ("PolicyAdd", vec!["u", "1"], sig, "Signature"),
        ("PolicyInsert", vec!["us", "0", "action = \"kernel\""], inv, "position 0"),
        ("PolicyInsert", vec!["us", "3", "action = \"kernel\""], inv, "position 3"),
        ("PolicyInsert", vec!["us", "1", "action = \"kernel\"\nuid = -1"], inv, "uid"),
        ("PolicyInsert", vec!["su", "action = \"kernel\"", "1"], sig, "Signature"),
        ("PolicyRemove", vec!["u", "0"], inv, "no rule 0"),
        ("PolicyRemove", vec!["u", "3"], inv, "no rule 3"),
        ("PolicyRemove", vec!["u", "2"], inv, "comes from"),
        ("PolicyRemove", vec!["s", "1"], sig, "Signature"),
        ("PolicyApply", vec!["s", "[[rules]\naction = \"kernel\""], inv, "invalid TOML"),
        (
            "PolicyApply",
            vec![
                "s",
                "[[rules]]\naction = \"kernel\"\n\n[[rules]]\nname = \"two\"\naction = \"accelerate\"\nlocal_cidr = \"fd00::1/8\"",
            ],
            inv,
            "rule 2 (two)",
        ),
        ("PolicyApply", vec!["s", "[[policy.rules]]\naction = \"kernel\""], inv, "unknown field `policy`"),
        ("PolicyApply", vec!["s", "[[rules]]\naction = \"kernel\"\ncgroup = \"relative\""], inv, "absolute"),
        ("PolicyApply", vec!["as", "1", "x"], sig, "Signature"),
        ("Pause", vec!["s", "now"], sig, "Signature"),
        ("Resume", vec!["b", "true"], sig, "Signature"),
        ("Reload", vec!["s", "/etc/passwd"], sig, "Signature"),
        ("Detach", vec!["u", "1"], sig, "Signature"),
        ("PolicyReset", vec!["s", "all"], sig, "Signature"),
    ];
    for (member, args, want, msg) in &cases {
        let (ok, name, err) = w.call(member, args);
        assert!(!ok, "{member} {args:?} succeeded");
        assert_eq!(name.as_deref(), *want, "{member} {args:?}: {err}");
        let failed = err.lines().find(|l| l.starts_with("Call failed:")).unwrap_or("");
        assert!(failed.contains(msg), "{member} {args:?}: message should mention {msg:?}: {failed}");
        assert_eq!(w.snapshot(), before, "{member} {args:?} changed the state");
    }
    // Every write method was covered.
    for m in api::WRITE_METHODS {
        assert!(cases.iter().any(|(c, ..)| c == m), "no malformed-argument case for {m}");
    }

    // Reload of a broken config file: InvalidConfig, running configuration kept.
    let cfg = w.daemon.as_ref().unwrap().config.clone();
    let good = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, format!("{good}\n[datapath]\ncapacity = 0\n")).unwrap();
    let (ok, name, err) = w.call("Reload", &[]);
    assert!(!ok);
    assert_eq!(name.as_deref(), Some(api::ERROR_INVALID_CONFIG), "{err}");
    assert!(err.contains("capacity"), "{err}");
    let o = w.ctl(&["reload"]);
    assert_eq!(o.status.code(), Some(1), "{}", describe(&o));
    assert!(text(&o.stderr).contains("keeps its running configuration"), "{}", describe(&o));
    std::fs::write(&cfg, good).unwrap();
    assert_eq!(w.snapshot(), before, "a refused reload changed the state");

    // bypassctl maps InvalidArgument to exit 4 with the daemon's message.
    let o = w.ctl(&["policy", "add", "--action", "kernel", "--local-cidr", "10.0.0.1/8", "--name", "typo"]);
    assert_eq!(o.status.code(), Some(EXIT_INVALID_ARGUMENT), "{}", describe(&o));
    assert!(text(&o.stderr).contains("(typo): key `local_cidr`"), "{}", describe(&o));
    let o = w.ctl(&["--json", "policy", "remove", "9"]);
    assert_eq!(o.status.code(), Some(EXIT_INVALID_ARGUMENT), "{}", describe(&o));
    let doc: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(doc["error"]["name"], api::ERROR_INVALID_ARGUMENT);
    let o = w.ctl(&["policy", "apply", "/nonexistent/policy.toml"]);
    assert_eq!(o.status.code(), Some(EXIT_INVALID_ARGUMENT), "{}", describe(&o));
    // Usage errors are clap's: exit 2.
    let o = w.ctl(&["policy", "add", "--action", "sometimes"]);
    assert_eq!(o.status.code(), Some(2), "{}", describe(&o));
    assert_eq!(w.snapshot(), before);
}

fn interface_block(xml: &str) -> String {
    let start = xml.find(&format!("<interface name=\"{}\">", api::INTERFACE)).expect("interface in XML");
    let end = start + xml[start..].find("</interface>").expect("end of interface") + "</interface>".len();
    xml[start..end].lines().map(str::trim_end).collect::<Vec<_>>().join("\n")
}

/// The served interface is the checked-in api/org.bypassd.Manager1.xml.
#[test]
fn introspection_matches_the_checked_in_xml() {
    let w = World::new();
    let o = w.bus.busctl(&["introspect", "--xml-interface", api::BUS_NAME, api::OBJECT_PATH]);
    assert!(o.status.success(), "{}", describe(&o));
    let live = interface_block(&text(&o.stdout));
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../api/org.bypassd.Manager1.xml");
    let file = std::fs::read_to_string(path).unwrap();
    let checked_in = interface_block(&file);
    if live != checked_in && std::env::var_os("BYPASSD_BLESS_INTROSPECTION").is_some() {
        let start = file.find(&format!("  <interface name=\"{}\">", api::INTERFACE)).unwrap();
        let end = file.find("</interface>").unwrap() + "</interface>".len();
        std::fs::write(path, format!("{}  {}{}", &file[..start], live.trim_start(), &file[end..])).unwrap();
        eprintln!("updated {path}");
        return;
    }
    if live != checked_in {
        let actual = std::env::temp_dir().join("org.bypassd.Manager1.served.xml");
        std::fs::write(&actual, &live).unwrap();
        panic!(
            "the served interface differs from {path} (served version in {}).\nIf the change is intended, run \
             BYPASSD_BLESS_INTROSPECTION=1 cargo test -p bypassctl --test dbus introspection, and review the diff.",
            actual.display()
        );
    }
    // The bus driver agrees on who owns the name: a root process.
    let o = w.bus.busctl(&["status", api::BUS_NAME]);
    assert!(text(&o.stdout).contains("UID=0"), "{}", describe(&o));
}

/// The bus is optional: bypassd starts and accelerates without one, says so, and
/// takes its name as soon as the bus appears.
#[test]
fn bypassd_runs_without_a_bus_and_connects_when_it_appears() {
    ts::require_root();
    let dir = ts::TempDir::new();
    let socket = SystemBus::socket_in(&dir);
    let (pins, cgroup, state) = (ts::PinDir::new(), ts::TestCgroup::new(), ts::TempDir::new());
    let addr = format!("unix:path={}", socket.display());
    let mut daemon = ts::Daemon::start_with_env(&config(&pins, &cgroup, &state), &[("DBUS_SYSTEM_BUS_ADDRESS", &addr)])
        .expect("bypassd starts without a bus");
    let _detach = Detach(daemon.config.clone());
    assert!(daemon.log().contains("D-Bus control interface unavailable"), "{}", daemon.log());
    let generations = std::fs::read_dir(pins.path()).map(|d| d.count()).unwrap_or(0);
    assert!(generations > 0, "the datapath is pinned and attached without a bus:\n{}", daemon.log());
    let bus = SystemBus::start_in(dir, &[bypass_testsupport::dbus::project_policy()]).expect("start dbus-daemon");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let o = Command::new(bypassctl())
            .args(["--json", "status"])
            .env("DBUS_SYSTEM_BUS_ADDRESS", &addr)
            .output()
            .unwrap();
        if o.status.success() {
            let st: Value = serde_json::from_slice(&o.stdout).unwrap();
            assert_eq!(st["state"], "attached");
            break;
        }
        assert_eq!(o.status.code(), Some(EXIT_NOT_RUNNING), "{}", describe(&o));
        assert!(Instant::now() < deadline, "bypassd did not connect to the new bus:\n{}", daemon.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(daemon.log().contains("available again"), "{}", daemon.log());
    daemon.kill9();
    drop(bus);
}

/// Runs `bypassd --detach --config` on drop.
struct Detach(std::path::PathBuf);
impl Drop for Detach {
    fn drop(&mut self) {
        let _ = Command::new(ts::bin("bypassd")).arg("--detach").arg("--config").arg(&self.0).output();
    }
}
