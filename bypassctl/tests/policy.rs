//! Live policy edits through bypassctl on a real bus and a real datapath: a swap in
//! the middle of running transfers, persistence across restarts, change reporting,
//! and refusal of bad rules without a trace.
mod common;

use bypass_testsupport::{self as ts, dbus::SystemBus};
use common::*;
use serde_json::Value;
use std::{
    path::Path,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

// Each test uses its own ports: tests run in parallel.
const PORT_A: u16 = 19410;
const PORT_B: u16 = 19420;
const PORT_C: u16 = 19430;
const PORT_D: u16 = 19440;
const PORT_E: u16 = 19450;

fn world(default: &str) -> World {
    ts::require_root();
    let bus = SystemBus::start().expect("start dbus-daemon");
    let (pins, cgroup, state) = (ts::PinDir::new(), ts::TestCgroup::new(), ts::TempDir::new());
    let cfg = format!(
        "[daemon]\npin_dir = \"{}\"\ncgroup = \"{}\"\nstate_dir = \"{}\"\n[policy]\ndefault = \"{default}\"\n",
        pins.path().display(),
        cgroup.rel,
        state.path().display()
    );
    let (k, v) = bus.env();
    let daemon = ts::Daemon::start_with_env(&cfg, &[(k, &v)]).expect("start bypassd");
    World { daemon: Some(daemon), pins, cgroup, state, bus, extra_config: String::new() }
}

fn stat(w: &World, field: &str) -> u64 {
    w.json(&["stats"])[field].as_u64().unwrap_or_else(|| panic!("stats has no {field}"))
}

/// Rules that accelerate both ends of connections to `port`.
fn rules_for(port: u16) -> String {
    format!(
        "[[rules]]\nname = \"server {port}\"\naction = \"accelerate\"\nlocal_ports = \"{port}\"\n\
         [[rules]]\nname = \"clients of {port}\"\naction = \"accelerate\"\nremote_ports = \"{port}\"\n"
    )
}

fn write(dir: &Path, name: &str, body: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p.display().to_string()
}

fn spawn_traffic(w: &World, args: &[&str]) -> Child {
    let mut c = w.cgroup.command(ts::bin("bypass-traffic"));
    c.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    c.spawn().expect("spawn bypass-traffic")
}

fn finish(child: Child) -> Value {
    let out = child.wait_with_output().expect("wait");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "bypass-traffic failed: {stdout} {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(stdout.lines().last().unwrap_or("")).expect("JSON line")
}

fn wait_port(p: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(p).map(|s| s.trim().is_empty()).unwrap_or(true) {
        assert!(Instant::now() < deadline, "server did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn paired_to(w: &World, port: u16) -> usize {
    let c = w.json(&["connections"]);
    c["connections"]
        .as_array()
        .expect("connections array")
        .iter()
        .filter(|x| x["paired"] == Value::Bool(true))
        .filter(|x| [&x["local"], &x["remote"]].iter().any(|a| a.as_str().is_some_and(|a| a.ends_with(&format!(":{port}")))))
        .count()
}

#[test]
fn live_apply_during_50_transfers_keeps_every_byte_and_only_steers_new_connections() {
    let w = world("kernel");
    let dir = ts::TempDir::new();
    let first = write(dir.path(), "a.toml", &rules_for(PORT_A));
    let second = write(dir.path(), "b.toml", &rules_for(PORT_B));
    assert_eq!(w.json(&["policy", "apply", &first])["changed"], Value::Bool(true));

    // 50 transfers to A; the server stalls 1.5 s before reading, so all 50 are open
    // and mid-transfer when the policy changes.
    let port_file = dir.path().join("port-a");
    let srv = spawn_traffic(&w, &["serve", "--listen", &format!("127.0.0.1:{PORT_A}"), "--count", "50",
        "--delay-read-ms", "1500", "--timeout-secs", "120", "--port-file", port_file.to_str().unwrap()]);
    wait_port(&port_file);
    let clients = spawn_traffic(&w, &["send", "--connect", &format!("127.0.0.1:{PORT_A}"), "--conns", "50",
        "--bytes", "4M", "--timeout-secs", "120"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while paired_to(&w, PORT_A) < 50 {
        assert!(Instant::now() < deadline, "the 50 connections to A were not all accelerated: {}", paired_to(&w, PORT_A));
        std::thread::sleep(Duration::from_millis(20));
    }
    // Swap: now B is accelerated and A is not.
    assert_eq!(w.json(&["policy", "apply", &second])["changed"], Value::Bool(true));
    assert_eq!(paired_to(&w, PORT_A), 50, "an edit never evicts live accelerated connections");
    let redirected_before = stat(&w, "redirected_bytes");
    let v = finish(clients);
    assert_eq!(v["ok"], Value::Bool(true), "{v}");
    assert_eq!(v["conns"].as_u64(), Some(50));
    assert_eq!(finish(srv)["ok"], Value::Bool(true));
    assert!(stat(&w, "redirected_bytes") > redirected_before, "the old connections kept the redirect path");

    // New connections follow the new rules: A stays on the kernel path, B is accelerated.
    let inserted = stat(&w, "sockets_inserted");
    let a = dir.path().join("port-a2");
    let srv = spawn_traffic(&w, &["serve", "--listen", &format!("127.0.0.1:{PORT_A}"), "--count", "5",
        "--timeout-secs", "60", "--port-file", a.to_str().unwrap()]);
    wait_port(&a);
    let c = spawn_traffic(&w, &["send", "--connect", &format!("127.0.0.1:{PORT_A}"), "--conns", "5", "--bytes", "1M"]);
    assert_eq!(finish(c)["ok"], Value::Bool(true));
    assert_eq!(finish(srv)["ok"], Value::Bool(true));
    assert_eq!(stat(&w, "sockets_inserted"), inserted, "A is no longer accelerated");
    let b = dir.path().join("port-b");
    let srv = spawn_traffic(&w, &["serve", "--listen", &format!("127.0.0.1:{PORT_B}"), "--count", "5",
        "--timeout-secs", "60", "--port-file", b.to_str().unwrap()]);
    wait_port(&b);
    let c = spawn_traffic(&w, &["send", "--connect", &format!("127.0.0.1:{PORT_B}"), "--conns", "5", "--bytes", "1M"]);
    assert_eq!(finish(c)["ok"], Value::Bool(true));
    assert_eq!(finish(srv)["ok"], Value::Bool(true));
    assert_eq!(stat(&w, "sockets_inserted"), inserted + 10, "B is accelerated now");
}

#[test]
fn runtime_rules_survive_restart_and_apply_reports_changed_then_unchanged() {
    let mut w = world("kernel");
    let dir = ts::TempDir::new();
    let f = write(dir.path(), "p.toml", &rules_for(PORT_C));
    assert_eq!(w.ok(&["policy", "apply", &f]).trim(), "changed");
    assert_eq!(w.ok(&["policy", "apply", &f]).trim(), "unchanged");
    assert_eq!(w.json(&["policy", "apply", &f])["changed"], Value::Bool(false));
    let before = w.json(&["policy", "list"]);
    assert_eq!(before["rules"].as_array().map(Vec::len), Some(2));
    assert!(before["rules"].as_array().unwrap().iter().all(|r| r["source"] == "runtime"), "{before}");

    let d = w.daemon.as_mut().unwrap();
    d.stop();
    d.spawn().expect("restart bypassd");
    // The bus name comes back a moment after READY.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !w.ctl(&["status"]).status.success() {
        assert!(Instant::now() < deadline, "bypassctl cannot reach the restarted bypassd");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(w.json(&["policy", "list"]), before, "runtime rules are back after a restart");
    // And they are in force in the kernel: a connection to PORT_C is accelerated.
    let inserted = stat(&w, "sockets_inserted");
    let pf = dir.path().join("port");
    let srv = spawn_traffic(&w, &["serve", "--listen", &format!("127.0.0.1:{PORT_C}"), "--timeout-secs", "60",
        "--port-file", pf.to_str().unwrap()]);
    wait_port(&pf);
    let c = spawn_traffic(&w, &["send", "--connect", &format!("127.0.0.1:{PORT_C}"), "--bytes", "1M"]);
    assert_eq!(finish(c)["ok"], Value::Bool(true));
    assert_eq!(finish(srv)["ok"], Value::Bool(true));
    assert_eq!(stat(&w, "sockets_inserted"), inserted + 2);

    assert_eq!(w.json(&["policy", "reset"])["changed"], Value::Bool(true));
    assert_eq!(w.json(&["policy", "reset"])["changed"], Value::Bool(false));
    assert_eq!(w.json(&["policy", "list"])["rules"].as_array().map(Vec::len), Some(0));
    assert!(!w.state.path().join("policy.toml").exists(), "reset removes the runtime layer's file");
}

#[test]
fn bad_rules_are_refused_with_the_rule_and_reason_and_change_nothing() {
    let w = world("kernel");
    let dir = ts::TempDir::new();
    let good = write(dir.path(), "good.toml", &rules_for(PORT_A));
    w.ok(&["policy", "apply", &good]);
    let before = w.snapshot();
    let too_many: String = (0..65).map(|i| format!("[[rules]]\naction = \"kernel\"\nlocal_ports = \"{}\"\n", 1000 + i)).collect();
    let cases: Vec<(&str, String, &str)> = vec![
        ("bad CIDR", "[[rules]]\nname = \"web\"\naction = \"accelerate\"\nremote_cidr = \"10.0.0.300/8\"\n".into(), "web"),
        ("host bits", "[[rules]]\naction = \"accelerate\"\nlocal_cidr = \"10.0.0.1/8\"\n".into(), "host bits"),
        ("port 0", "[[rules]]\naction = \"accelerate\"\nlocal_ports = \"0\"\n".into(), "out of range"),
        ("port 65536", "[[rules]]\naction = \"accelerate\"\nremote_ports = \"65536\"\n".into(), "out of range"),
        ("reversed range", "[[rules]]\naction = \"accelerate\"\nremote_ports = \"9000-8000\"\n".into(), "reversed"),
        ("unknown cgroup", "[[rules]]\nname = \"ghost\"\naction = \"accelerate\"\ncgroup = \"/no/such/cgroup\"\n".into(), "not found"),
        ("unknown key", "[[rules]]\naction = \"accelerate\"\nportz = \"80\"\n".into(), "portz"),
        ("too many rules", too_many, "at most 64"),
    ];
    for (what, body, needle) in cases {
        let f = write(dir.path(), "bad.toml", &body);
        let o = w.ctl(&["policy", "apply", &f]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(4), "{what}: {err}");
        assert!(err.contains(needle), "{what}: `{needle}` not in: {err}");
        assert_eq!(w.snapshot(), before, "{what}: a refused apply changed something");
    }
    for (what, args, needle) in [
        ("add bad cidr", vec!["policy", "add", "--action", "accelerate", "--remote-cidr", "1.2.3.4/40"], "prefix"),
        ("add port 0", vec!["policy", "add", "--action", "accelerate", "--local-ports", "0"], "out of range"),
        ("add unknown cgroup", vec!["policy", "add", "--action", "kernel", "--cgroup", "/nope"], "not found"),
        ("remove config-less index", vec!["policy", "remove", "9"], "no rule 9"),
    ] {
        let o = w.ctl(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(4), "{what}: {err}");
        assert!(err.contains(needle), "{what}: `{needle}` not in: {err}");
        assert_eq!(w.snapshot(), before, "{what}: a refused edit changed something");
    }
}

#[test]
fn dry_run_reports_what_apply_would_change_and_changes_nothing() {
    let w = world("kernel");
    let dir = ts::TempDir::new();
    let d = write(dir.path(), "d.toml", &rules_for(PORT_D));
    let e = write(dir.path(), "e.toml", &rules_for(PORT_E));
    let runtime_file = || std::fs::read_to_string(w.state.path().join("policy.toml")).ok();
    let names = |v: &Value| -> Vec<String> {
        v.as_array().expect("rules array").iter().map(|r| r["name"].as_str().unwrap_or("").to_string()).collect()
    };

    // Nothing applied yet: the dry run says what apply would set, and sets nothing.
    let before = w.snapshot();
    let v = w.json(&["policy", "apply", "--dry-run", &d]);
    assert_eq!((v["changed"].clone(), v["dry_run"].clone()), (Value::Bool(true), Value::Bool(true)), "{v}");
    assert_eq!(names(&v["before"]), Vec::<String>::new(), "{v}");
    assert_eq!(names(&v["after"]), [format!("server {PORT_D}"), format!("clients of {PORT_D}")], "{v}");
    assert_eq!(v["after"][0]["rule"]["local_ports"], Value::String(PORT_D.to_string()), "{v}");
    let t = w.ok(&["policy", "apply", "--dry-run", &d]);
    assert!(t.starts_with("would change: 0 runtime rule(s) -> 2\n"), "{t}");
    assert!(t.contains(&format!("+ 1 (server {PORT_D}): accelerate local_ports={PORT_D}")), "{t}");
    // It changes nothing, so every user may ask.
    let o = w.ctl_nobody(&["--json", "policy", "apply", "--dry-run", &d]);
    assert!(o.status.success(), "dry run as nobody: {}", describe(&o));
    assert_eq!(parse_json(&["--json"], &o)["changed"], Value::Bool(true));
    assert_eq!(w.snapshot(), before, "a dry run changed something");
    assert_eq!(runtime_file(), None, "a dry run wrote the runtime policy");

    // Its answer is what apply then reports, and after the apply it says unchanged.
    assert_eq!(w.json(&["policy", "apply", &d])["changed"], Value::Bool(true));
    let applied = (w.snapshot(), runtime_file());
    assert_eq!(w.json(&["policy", "apply", "--dry-run", &d])["changed"], Value::Bool(false));
    assert_eq!(w.ok(&["policy", "apply", "--dry-run", &d]).trim(), "unchanged");

    // Another rule set: the removed and added rules, and still nothing changes.
    let t = w.ok(&["policy", "apply", "--dry-run", &e]);
    assert!(t.starts_with("would change: 2 runtime rule(s) -> 2\n"), "{t}");
    assert!(t.contains(&format!("- 1 (server {PORT_D}): accelerate local_ports={PORT_D}")), "{t}");
    assert!(t.contains(&format!("+ 2 (clients of {PORT_E}): accelerate remote_ports={PORT_E}")), "{t}");
    assert_eq!((w.snapshot(), runtime_file()), applied, "a dry run changed the applied policy");

    // A bad file is refused exactly as apply refuses it (exit 4, rule and reason).
    let bad = write(dir.path(), "bad.toml", "[[rules]]\nname = \"web\"\naction = \"accelerate\"\nlocal_ports = \"0\"\n");
    let o = w.ctl(&["policy", "apply", "--dry-run", &bad]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(4), "{err}");
    assert!(err.contains("rule 1 (web): key `local_ports`: port 0 is out of range"), "{err}");
    // Validation the parser cannot do (the cgroup must exist) is made too.
    let ghost = write(dir.path(), "ghost.toml", "[[rules]]\naction = \"kernel\"\ncgroup = \"/no/such/cgroup\"\n");
    let o = w.ctl(&["policy", "apply", "--dry-run", &ghost]);
    assert_eq!(o.status.code(), Some(4), "{}", describe(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not found"), "{}", describe(&o));
    assert_eq!((w.snapshot(), runtime_file()), applied, "a refused dry run changed something");
}
