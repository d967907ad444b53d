//! Fixtures of the service-mesh tests: pod namespaces joined by a veth, Istio's
//! capture rules (iptables or native nftables, from Istio's golden files), real
//! Envoy sidecars as uid 1337, and bypass-traffic apps. Everything is created by the
//! test and removed on drop (namespaces take their rules, the cgroup its processes).
#![allow(dead_code)]
pub use bypass_testsupport::mesh::*;

use bypass_testsupport::{Daemon, Netns, Sandbox, TempDir, bin};
use bypassd::datapath::Datapath;
use bypassd_ebpf::abi::Counter;
use serde_json::Value;
use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

pub const MIB: u64 = 1 << 20;

/// The test's sandbox (cgroup, pins, state, config: testsupport::Sandbox) and a scratch dir.
pub struct Env {
    pub sb: Sandbox,
    pub dir: TempDir,
}

impl std::ops::Deref for Env {
    type Target = Sandbox;
    fn deref(&self) -> &Sandbox {
        &self.sb
    }
}

impl Env {
    pub fn new() -> Env {
        Env { sb: Sandbox::new(), dir: TempDir::new() }
    }

    /// A daemon that accelerates everything in this test's cgroup.
    pub fn daemon(&self) -> Daemon {
        Daemon::start(&self.config("[policy]\ndefault = \"accelerate\"\n")).expect("start bypassd")
    }

    pub fn datapath(&self) -> Datapath {
        Datapath::open_pinned(self.pins.path()).expect("open the pinned datapath")
    }

    pub fn counter(&self, c: Counter) -> u64 {
        self.datapath().counter(c).expect("read counters")
    }

    /// bypass-traffic in `ns`, inside the test's cgroup.
    pub fn traffic(&self, ns: &Netns) -> Command {
        ns.command(Some(&self.cg), bin("bypass-traffic"))
    }

    /// `bypass-traffic serve` in `ns`; returns the child and its port.
    pub fn serve(&self, ns: &Netns, listen: &str, extra: &[&str]) -> (Child, u16) {
        let port_file = self.dir.path().join(bypass_testsupport::unique("port"));
        let mut cmd = self.traffic(ns);
        cmd.args(["serve", "--listen", listen, "--port-file"]).arg(&port_file).args(extra);
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn serve");
        match wait_port(&port_file, Duration::from_secs(20)) {
            Some(p) => (child, p),
            None => {
                let _ = child.kill();
                let out = child.wait_with_output().expect("wait serve");
                panic!("serve {listen} did not start: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
    }

    /// `bypass-traffic send` in `ns`, started (not waited on).
    pub fn send(&self, ns: &Netns, connect: &str, args: &[&str]) -> Child {
        let mut c = self.traffic(ns);
        c.args(["send", "--connect", connect]).args(args);
        c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn send")
    }

    /// Every kernel-path message had a safety reason (testsupport::counters).
    pub fn assert_passes_explained(&self) {
        let d = self.datapath();
        bypass_testsupport::counters::assert_passes_explained(|c| d.counter(c).expect("read counters"));
    }
}

fn wait_port(p: &Path, timeout: Duration) -> Option<u16> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(s) = std::fs::read_to_string(p)
            && let Ok(port) = s.trim().parse()
        {
            return Some(port);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// Wait for a spawned bypass-traffic and return its JSON report (asserting ok).
pub fn finish(child: Child) -> Value {
    let v = bypass_testsupport::traffic_report(child);
    assert_eq!(v["ok"], Value::Bool(true), "transfer failed: {v}");
    v
}

/// The connections the datapath lists (peers found as sk_msg finds them).
pub fn connections(env: &Env) -> Vec<bypassd::datapath::Connection> {
    env.datapath().connections().expect("list connections")
}

/// Two pods with Istio's capture, bypassd, and an Envoy sidecar in each.
pub struct Mesh {
    pub daemon: Daemon,
    pub envoys: Vec<envoy::Envoy>,
    pub pods: Pods,
    pub env: Env,
}

impl Mesh {
    pub fn new(how: capture::Capture) -> Mesh {
        let env = Env::new();
        let pods = Pods::new();
        capture::install(&pods.a, how);
        capture::install(&pods.b, how);
        let daemon = env.daemon();
        let envoys = vec![envoy::Envoy::start(&pods.a, &env.cg, &env.dir), envoy::Envoy::start(&pods.b, &env.cg, &env.dir)];
        Mesh { daemon, envoys, pods, env }
    }

    pub fn counter(&self, c: Counter) -> u64 {
        self.env.counter(c)
    }

    /// Wait until the datapath holds no NAT pair (every socket of the run closed).
    pub fn wait_no_nat_pairs(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let left = self.env.datapath().nat_pairs().expect("nat pairs");
            if left.is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "{} pairing entries left behind: {left:?}", left.len());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A step-by-step helper process (tests/mesh_support/linger.py) talking JSON lines:
/// `next()` reads its next report, `go()` lets it take its next step. Killed on drop.
pub struct Script {
    child: Child,
    out: std::io::BufReader<std::process::ChildStdout>,
    what: String,
}

impl Script {
    /// `python3 linger.py ARGS` run by `cmd` (a netns/cgroup/uid wrapper already set up).
    pub fn spawn(mut cmd: Command, args: &[&str]) -> Script {
        let py = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mesh_support/linger.py");
        cmd.arg("python3").arg(py).args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("python3 linger.py {args:?}: {e}"));
        let out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        Script { child, out, what: args.join(" ") }
    }

    pub fn next(&mut self) -> Value {
        use std::io::BufRead;
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap_or_else(|e| panic!("reading from linger.py {}: {e}", self.what));
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("linger.py {} said {line:?}: {e}", self.what))
    }

    pub fn go(&mut self) {
        use std::io::Write;
        let stdin = self.child.stdin.as_mut().expect("stdin");
        stdin.write_all(b"go\n").and_then(|()| stdin.flush()).unwrap_or_else(|e| panic!("linger.py {}: {e}", self.what));
    }

    /// Wait for a clean exit.
    pub fn wait(mut self) {
        let st = self.child.wait().expect("wait linger.py");
        assert!(st.success(), "linger.py {} exited with {st}", self.what);
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run a command in `ns` (sysctl, ss), panicking with its stderr; returns stdout.
pub fn in_ns(ns: &Netns, args: &[&str]) -> String {
    let out = Command::new("ip").args(["netns", "exec", &ns.name]).args(args).output().expect("ip netns exec");
    assert!(out.status.success(), "{args:?} in {}: {}", ns.name, String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}
