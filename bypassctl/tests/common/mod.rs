//! Shared by bypassctl's integration tests: a private system bus, bypassd on it, and
//! helpers to run bypassctl and busctl as root or as nobody.
#![allow(dead_code)]
use bypass_testsupport::{self as ts, dbus::SystemBus};
use bypassd_api as api;
use serde_json::Value;
use std::process::{Command, Output, Stdio};

pub const EXIT_PERMISSION_DENIED: i32 = 3;
pub const EXIT_INVALID_ARGUMENT: i32 = 4;
pub const EXIT_NOT_RUNNING: i32 = 69;

pub const NOBODY: [&str; 3] = ["--reuid=nobody", "--regid=nogroup", "--clear-groups"];

pub fn bypassctl() -> &'static str {
    env!("CARGO_BIN_EXE_bypassctl")
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub fn describe(o: &Output) -> String {
    format!("exit {:?}\nstdout: {}\nstderr: {}", o.status.code(), text(&o.stdout), text(&o.stderr))
}

/// A test's world: its bus, cgroup, pin and state directories, and bypassd. Fields
/// drop in order: bypassd first, then the pins it left, the cgroup, the bus.
pub struct World {
    pub daemon: Option<ts::Daemon>,
    pub pins: ts::PinDir,
    pub cgroup: ts::TestCgroup,
    pub state: ts::TempDir,
    pub bus: SystemBus,
    /// Appended to the config (e.g. a `[metrics]` table).
    pub extra_config: String,
}

impl Drop for World {
    fn drop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            if std::thread::panicking() {
                eprintln!("--- bypassd log ---\n{}\n--- dbus-daemon log ---\n{}", d.log(), self.bus.log());
            }
            d.kill9();
            // Unpin through bypassd itself; PinDir's drop removes whatever is left.
            let _ = d.tool(&["--detach"]);
        }
    }
}

pub fn config(pins: &ts::PinDir, cgroup: &ts::TestCgroup, state: &ts::TempDir) -> String {
    format!(
        r#"[daemon]
pin_dir = "{}"
cgroup = "{}"
state_dir = "{}"
log_level = "debug"

[policy]
default = "kernel"

[[policy.rules]]
name = "from config"
action = "accelerate"
remote_ports = "9000-9100"
"#,
        pins.path().display(),
        cgroup.rel,
        state.path().display()
    )
}

impl World {
    pub fn new() -> World {
        Self::with_bus(SystemBus::start().expect("start dbus-daemon"))
    }

    pub fn with_bus(bus: SystemBus) -> World {
        ts::require_root();
        let (pins, cgroup, state) = (ts::PinDir::new(), ts::TestCgroup::new(), ts::TempDir::new());
        let mut w = World { daemon: None, pins, cgroup, state, bus, extra_config: String::new() };
        w.start_daemon();
        w
    }

    /// A world whose config has `extra` appended.
    pub fn with_config(extra: &str) -> World {
        ts::require_root();
        let mut w = Self::without_daemon(SystemBus::start().expect("start dbus-daemon"));
        w.extra_config = extra.to_string();
        w.start_daemon();
        w
    }

    /// A world whose bus is not running (yet): only the pieces.
    pub fn without_daemon(bus: SystemBus) -> World {
        ts::require_root();
        World {
            daemon: None,
            pins: ts::PinDir::new(),
            cgroup: ts::TestCgroup::new(),
            state: ts::TempDir::new(),
            bus,
            extra_config: String::new(),
        }
    }

    pub fn start_daemon(&mut self) {
        let (k, v) = self.bus.env();
        let cfg = config(&self.pins, &self.cgroup, &self.state) + &self.extra_config;
        self.daemon = Some(ts::Daemon::start_with_env(&cfg, &[(k, &v)]).expect("start bypassd"));
    }

    pub fn daemon(&mut self) -> &mut ts::Daemon {
        self.daemon.as_mut().expect("bypassd running")
    }

    pub fn cmd(&self, unprivileged: bool, args: &[&str]) -> Command {
        let mut c = if unprivileged {
            let mut c = Command::new("setpriv");
            c.args(NOBODY).arg(bypassctl());
            c
        } else {
            Command::new(bypassctl())
        };
        let (k, v) = self.bus.env();
        c.args(args).env(k, v).stdin(Stdio::null());
        c
    }

    pub fn ctl(&self, args: &[&str]) -> Output {
        self.cmd(false, args).output().expect("run bypassctl")
    }

    pub fn ctl_nobody(&self, args: &[&str]) -> Output {
        self.cmd(true, args).output().expect("run setpriv bypassctl")
    }

    /// `bypassctl ARGS` as root; must succeed.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.ctl(args);
        assert!(o.status.success(), "bypassctl {args:?}: {}", describe(&o));
        text(&o.stdout)
    }

    /// `bypassctl --json ARGS` as root; must succeed and print one JSON document.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        parse_json(&a, &self.ctl(&a))
    }

    /// What must not change when a request is refused.
    pub fn snapshot(&self) -> (Value, Value, String, bool) {
        let mut status = self.json(&["status"]);
        status.as_object_mut().unwrap().remove("started_at");
        let sha = text(
            &self.bus.busctl(&["get-property", api::BUS_NAME, api::OBJECT_PATH, api::INTERFACE, "PolicySha256"]).stdout,
        );
        let runtime_file = self.state.path().join("policy.toml").exists();
        (status, self.json(&["policy", "list"]), sha, runtime_file)
    }

    /// busctl as root (or nobody), with sd-bus debug logging so the reply's error name
    /// can be read: returns (success, error name, stderr).
    pub fn busctl_call(&self, unprivileged: bool, args: &[&str]) -> (bool, Option<String>, String) {
        let mut c = if unprivileged {
            let mut c = Command::new("setpriv");
            c.args(NOBODY).arg("busctl");
            c
        } else {
            Command::new("busctl")
        };
        c.arg(format!("--address={}", self.bus.address())).args(args).env("SYSTEMD_LOG_LEVEL", "debug");
        let o = c.stdin(Stdio::null()).output().expect("run busctl");
        let err = text(&o.stderr);
        let name = err
            .lines()
            .filter(|l| l.contains("type=error"))
            .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("error-name=")))
            .find(|n| *n != "n/a")
            .map(String::from);
        (o.status.success(), name, err)
    }

    pub fn call(&self, member: &str, args: &[&str]) -> (bool, Option<String>, String) {
        let mut a = vec!["call", api::BUS_NAME, api::OBJECT_PATH, api::INTERFACE, member];
        a.extend_from_slice(args);
        self.busctl_call(false, &a)
    }
}

pub fn parse_json(args: &[&str], o: &Output) -> Value {
    assert!(o.status.success(), "bypassctl {args:?}: {}", describe(o));
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("bypassctl {args:?} printed no JSON document ({e}): {}", describe(o)))
}

pub fn assert_fields(v: &Value, fields: &[&str], what: &str) {
    for f in fields {
        assert!(v.get(f).is_some(), "{what}: field `{f}` missing in {v}");
    }
}

