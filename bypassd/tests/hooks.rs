//! Which global hooks run, per config (issue 10: bypassd must be free for what it does
//! not accelerate). The tp_btf recvmsg hook (bypass_rx_done) runs on every read on the
//! host, so it is attached only while the recvmsg gate is on and the policy can admit a
//! socket; the kernel's own list of links is the proof, and the log says the same.
//!
//! Per-socket work follows the same rule: a cgroup or uid rule reads the socket's own
//! origin, so no socket needs storage for it, and sockets opened before bypassd started
//! match too.
//!
//! Needs root. Each test has its own cgroup, pin directory and daemon, removed on drop.
use bypass_testsupport::{Daemon, PinDir, TempDir, TestCgroup, bin, require_root, run_json, traffic_report, wait_port_file};
use std::{process::Stdio, time::Duration};
use bypassd::datapath::Datapath;
use bypassd_ebpf::{abi::Counter, programs::RX_DONE};

struct Env {
    cg: TestCgroup,
    pins: PinDir,
    state: TempDir,
}

impl Env {
    fn new() -> Env {
        require_root();
        Env { cg: TestCgroup::new(), pins: PinDir::new(), state: TempDir::new() }
    }

    /// A config for this test's cgroup: `datapath` under [datapath], `policy` under [policy].
    fn config(&self, datapath: &str, policy: &str) -> String {
        format!(
            "[daemon]\npin_dir = \"{}\"\ncgroup = \"{}\"\nstate_dir = \"{}\"\nlog_level = \"info\"\n\n\
             [datapath]\n{datapath}\n[metrics]\nlisten = \"\"\n\n[policy]\n{policy}\n",
            self.pins.path().display(),
            self.cg.rel,
            self.state.path().display()
        )
    }

    fn rx_hook_runs(&self) -> bool {
        Datapath::open_pinned(self.pins.path()).and_then(|d| d.hook_linked(RX_DONE)).expect("read the kernel's links")
    }

    fn counter(&self, c: Counter) -> u64 {
        Datapath::open_pinned(self.pins.path()).and_then(|d| d.counter(c)).expect("read counters")
    }

    /// 4 MiB each way over loopback inside the cgroup: intact, and how much was redirected.
    fn transfer(&self) -> u64 {
        let before = self.counter(Counter::RedirectedBytes);
        let mut t = self.cg.command(bin("bypass-traffic"));
        t.args(["pair", "--bind", "127.0.0.1", "--bytes", &(4u64 << 20).to_string()]);
        let v = run_json(t);
        assert_eq!(v["ok"], serde_json::Value::Bool(true), "transfer failed: {v}");
        self.counter(Counter::RedirectedBytes) - before
    }
}

const ACCELERATE: &str = "default = \"accelerate\"";
const KERNEL: &str = "default = \"kernel\"";
/// The shipped policy's default, plus one accelerate rule.
const ONE_RULE: &str = "default = \"kernel\"\n\n[[policy.rules]]\nname = \"redis\"\naction = \"accelerate\"\nports = \"6379\"\n";

fn hooks_line(log: &str) -> String {
    log.lines().rev().find(|l| l.contains("hooks attached:")).unwrap_or_else(|| panic!("no hooks line: {log}")).to_string()
}

#[test]
fn recv_hook_runs_only_while_the_policy_accelerates() {
    let env = Env::new();
    // The shipped default accelerates nothing: the global hook is loaded, not attached.
    let mut d = Daemon::start(&env.config("", KERNEL)).expect("start bypassd");
    assert!(!env.rx_hook_runs(), "policy accelerates nothing, yet {RX_DONE} is attached: {}", d.log());
    let line = hooks_line(&d.log());
    let attached = line.split("hooks attached:").nth(1).unwrap_or("").split(';').next().unwrap_or("");
    assert!(!attached.contains(RX_DONE) && line.contains("loaded, attached only while"), "{line}");
    assert_eq!(env.transfer(), 0, "the policy sends everything to the kernel");

    // A policy edit that admits sockets attaches it before the policy is in place ...
    d.reload_with(&env.config("", ACCELERATE)).expect("reload");
    assert!(env.rx_hook_runs(), "policy accelerates, recvmsg gate on, yet no {RX_DONE}: {}", d.log());
    assert!(d.log().contains(&format!("attached {RX_DONE}")), "{}", d.log());
    // ... and it does its job: receivers get marked, so the recvmsg gate lets bytes through.
    assert!(env.transfer() > 0, "nothing redirected with the hook attached");

    // Back to nothing accelerated: detached; then one accelerate rule: attached again.
    d.reload_with(&env.config("", KERNEL)).expect("reload");
    assert!(!env.rx_hook_runs(), "{}", d.log());
    assert!(d.log().contains(&format!("detached {RX_DONE} (the policy accelerates nothing)")), "{}", d.log());
    d.reload_with(&env.config("", ONE_RULE)).expect("reload");
    assert!(env.rx_hook_runs(), "one accelerate rule, yet no {RX_DONE}: {}", d.log());

    // A restart adopts the generation and keeps the hook as the policy wants it.
    d.stop();
    d.spawn().expect("restart");
    assert!(env.rx_hook_runs(), "{}", d.log());
}

#[test]
fn recv_hook_is_not_attached_when_the_recvmsg_gate_is_off() {
    let env = Env::new();
    let d = Daemon::start(&env.config("splice_safety = \"off\"", ACCELERATE)).expect("start bypassd");
    assert!(!env.rx_hook_runs(), "splice_safety = off needs no recvmsg hook: {}", d.log());
    assert!(env.transfer() > 0, "with the gate off, sockets are redirect targets at once");
}

#[test]
fn listener_opened_before_bypassd_is_matched_by_its_cgroup_rule() {
    let env = Env::new();
    let dir = TempDir::new();
    // The server listens before any bypassd runs: its socket was never seen by sock_create.
    let port_file = dir.path().join("port");
    let mut srv = env.cg.command(bin("bypass-traffic"));
    srv.args(["serve", "--listen", "127.0.0.1:0", "--port-file"]).arg(&port_file);
    let srv = srv.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn serve");
    let port = wait_port_file(&port_file, Duration::from_secs(10));
    let rule = format!("default = \"kernel\"\n\n[[policy.rules]]\nname = \"this cgroup\"\naction = \"accelerate\"\ncgroup = \"{}\"\n", env.cg.rel);
    let _d = Daemon::start(&env.config("", &rule)).expect("start bypassd");
    let mut c = env.cg.command(bin("bypass-traffic"));
    c.args(["send", "--connect", &format!("127.0.0.1:{port}"), "--bytes", &(16u64 << 20).to_string()]);
    let v = run_json(c);
    assert_eq!(v["ok"], serde_json::Value::Bool(true), "transfer failed: {v}");
    assert_eq!(traffic_report(srv)["ok"], serde_json::Value::Bool(true));
    // Both ends matched the rule (the accepted socket by its listener's cgroup), so bytes
    // were redirected; with origin kept only in storage made at creation, none were.
    assert!(env.counter(Counter::SocketsInserted) >= 2, "inserted {}", env.counter(Counter::SocketsInserted));
    assert!(env.counter(Counter::RedirectedBytes) > 0, "nothing redirected");
}
