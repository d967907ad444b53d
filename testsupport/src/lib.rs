//! Fixtures for bypassd's integration tests. Every fixture creates something unique
//! to this test (cgroup, pin directory, network namespace, temp dir, daemon) and
//! removes it on drop, also when the test panics.
pub mod counters;
pub mod dbus;
pub mod mesh;
pub mod tap;

use anyhow::{Context, Result, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use std::{
    io::Read,
    os::{fd::AsRawFd, unix::net::UnixDatagram, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    collections::VecDeque,
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A name nobody else on the machine uses: prefix, pid, sequence.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed))
}

/// These tests load BPF and create cgroups and namespaces: they need root. They fail
/// loudly rather than skip, so a CI that lost its root shows up red.
pub fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test needs root (BPF, cgroups, network namespaces); run the suite as root, e.g. `sudo .ci/run`"
    );
    ensure_tracefs();
}

/// systemd hosts mount tracefs at boot, and with it bypassd can attach tracepoints it
/// cannot attach without: mount it, so every test exercises what a real host runs.
pub fn ensure_tracefs() {
    let t = Path::new("/sys/kernel/tracing");
    let mounted = std::fs::read_to_string("/proc/self/mountinfo")
        .map(|m| m.lines().any(|l| l.split_whitespace().nth(4) == Some("/sys/kernel/tracing")))
        .unwrap_or(false);
    if !mounted {
        let ok = Command::new("mount").args(["-t", "tracefs", "nodev"]).arg(t).status().is_ok_and(|s| s.success());
        assert!(ok, "cannot mount tracefs at {} (real hosts have it; the tests must see the same hooks)", t.display());
    }
}

/// A binary of this workspace, built by `cargo build` next to the test executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = dir.join(name);
    assert!(p.exists(), "{} is missing: build the workspace first (cargo build --workspace)", p.display());
    p
}

/// The cgroup v2 mount point, from mountinfo.
pub fn cgroup2_mount() -> PathBuf {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    info.lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mut f = pre.split_whitespace();
            let root = f.nth(3)?;
            let mp = f.next()?;
            (post.starts_with("cgroup2 ") && root == "/").then(|| PathBuf::from(mp))
        })
        .expect("no cgroup v2 mount")
}

/// A temporary directory, removed on drop.
pub struct TempDir(tempfile::TempDir);

impl TempDir {
    pub fn new() -> TempDir {
        let d = tempfile::Builder::new().prefix("bypassd-test-").tempdir().expect("create temp dir");
        // Readable by the unprivileged test clients (tempfile makes it 0700).
        std::fs::set_permissions(d.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod temp dir");
        TempDir(d)
    }
    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Default for TempDir {
    fn default() -> Self {
        Self::new()
    }
}

/// A child cgroup of the cgroup v2 root, for this test's processes only.
pub struct TestCgroup {
    pub path: PathBuf,
    /// Path relative to the cgroup v2 mount, with a leading slash (for configs).
    pub rel: String,
}

impl TestCgroup {
    pub fn new() -> TestCgroup {
        let name = unique("bypassd-test");
        let path = cgroup2_mount().join(&name);
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("creating cgroup {}: {e}", path.display()));
        TestCgroup { path, rel: format!("/{name}") }
    }

    /// A sub-cgroup (for policy tests), removed with its parent.
    pub fn child(&self, name: &str) -> TestCgroup {
        let path = self.path.join(name);
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("creating cgroup {}: {e}", path.display()));
        TestCgroup { path, rel: format!("{}/{name}", self.rel) }
    }

    /// Make `cmd` start inside this cgroup (before exec, so every socket it opens is seen).
    pub fn enter(&self, cmd: &mut Command) {
        enter_cgroup(&self.path, cmd);
    }

    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new(program);
        self.enter(&mut c);
        c
    }

    pub fn id(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&self.path).map(|m| m.ino()).unwrap_or(0)
    }
}

/// Make `cmd` start inside the cgroup directory `dir` (before exec, so every socket
/// it opens is seen), also for cgroups a test removes and re-creates itself.
pub fn enter_cgroup(dir: &Path, cmd: &mut Command) {
    let f = std::fs::OpenOptions::new().write(true).open(dir.join("cgroup.procs")).expect("open cgroup.procs");
    // The closure owns the file, so the fd stays open until the Command is dropped;
    // O_CLOEXEC keeps it out of the exec'd program.
    unsafe {
        cmd.pre_exec(move || {
            if libc::write(f.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

impl Default for TestCgroup {
    fn default() -> Self {
        Self::new()
    }
}

fn kill_and_remove_cgroup(path: &Path) {
    if let Ok(rd) = std::fs::read_dir(path) {
        for e in rd.flatten() {
            if e.path().is_dir() {
                kill_and_remove_cgroup(&e.path());
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let procs = std::fs::read_to_string(path.join("cgroup.procs")).unwrap_or_default();
        if procs.trim().is_empty() {
            break;
        }
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        if Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for _ in 0..100 {
        if std::fs::remove_dir(path).is_ok() || !path.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("warning: could not remove cgroup {}", path.display());
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        kill_and_remove_cgroup(&self.path);
    }
}

/// A unique pin directory under /sys/fs/bpf (mounting bpffs if needed).
pub struct PinDir(pub PathBuf);

impl PinDir {
    pub fn new() -> PinDir {
        let base = Path::new("/sys/fs/bpf");
        let is_bpffs = nix::sys::statfs::statfs(base).map(|s| s.filesystem_type().0 as i64 == 0xcafe4a11).unwrap_or(false);
        if !is_bpffs {
            nix::mount::mount(Some("bpf"), base, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
                .expect("mount bpffs");
        }
        PinDir(base.join(unique("bypassd-test")))
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Default for PinDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        // Unpinning detaches new connections only; open ones are freed when they close.
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Run `ip ARGS`; an error carries its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("running ip (install iproute2)")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// A network namespace of this test, with loopback up.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new() -> Netns {
        let name = unique("bpt");
        ip(&["netns", "add", &name]).expect("ip netns add");
        let ns = Netns { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]).expect("lo up");
        ns
    }

    /// `program args…` inside this namespace (and, if given, the cgroup).
    pub fn command(&self, cg: Option<&TestCgroup>, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        if let Some(cg) = cg {
            cg.enter(&mut c);
        }
        c
    }
}

impl Default for Netns {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Join two namespaces with a veth pair; addresses in CIDR form (v4 and/or v6).
pub fn veth(a: &Netns, a_addrs: &[&str], b: &Netns, b_addrs: &[&str]) {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let (va, vb) = (format!("bpa{}x{n}", std::process::id() % 100000), format!("bpb{}x{n}", std::process::id() % 100000));
    ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb]).expect("veth add");
    ip(&["link", "set", &va, "netns", &a.name]).expect("veth move");
    ip(&["link", "set", &vb, "netns", &b.name]).expect("veth move");
    for (ns, dev, addrs) in [(a, &va, a_addrs), (b, &vb, b_addrs)] {
        for addr in addrs {
            let mut args = vec!["-n", &ns.name, "addr", "add", addr, "dev", dev];
            if addr.contains(':') {
                args.push("nodad");
            }
            ip(&args).expect("addr add");
        }
        ip(&["-n", &ns.name, "link", "set", dev, "up"]).expect("veth up");
    }
}

/// Wait for a program to write its port number into `p` (e.g. `--port-file`).
pub fn wait_port_file(p: &Path, timeout: Duration) -> u16 {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(s) = std::fs::read_to_string(p)
            && let Ok(port) = s.trim().parse()
        {
            return port;
        }
        assert!(Instant::now() < deadline, "{} did not appear", p.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Run a command that prints one JSON line on success (bypass-traffic); panic with
/// its output otherwise.
pub fn run_json(mut cmd: Command) -> serde_json::Value {
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{cmd:?} failed ({}):\nstdout: {stdout}\nstderr: {stderr}", out.status);
    let line = stdout.lines().rev().find(|l| l.trim_start().starts_with('{')).unwrap_or_else(|| panic!("no JSON from {cmd:?}: {stdout} {stderr}"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("bad JSON from {cmd:?}: {e}: {line}"))
}

/// One root test's own cgroup, pin directory and state directory, and the bypassd
/// config that points at them; all removed on drop.
pub struct Sandbox {
    pub cg: TestCgroup,
    pub pins: PinDir,
    pub state: TempDir,
}

impl Sandbox {
    pub fn new() -> Sandbox {
        require_root();
        Sandbox { cg: TestCgroup::new(), pins: PinDir::new(), state: TempDir::new() }
    }

    /// The `[daemon]` table for this sandbox (log level debug), then `extra`.
    pub fn config(&self, extra: &str) -> String {
        format!(
            "[daemon]\npin_dir = \"{}\"\ncgroup = \"{}\"\nstate_dir = \"{}\"\nlog_level = \"debug\"\n{extra}",
            self.pins.path().display(),
            self.cg.rel,
            self.state.path().display()
        )
    }

    /// bypass-traffic, run in this sandbox's cgroup.
    pub fn traffic(&self) -> Command {
        self.cg.command(bin("bypass-traffic"))
    }
}

impl Default for Sandbox {
    fn default() -> Self {
        Self::new()
    }
}

/// Wait for a spawned bypass-traffic and return its JSON report (the last JSON line);
/// panics with its output when it failed or printed none.
pub fn traffic_report(mut child: Child) -> serde_json::Value {
    let st = child.wait().expect("wait");
    let out = read_all(&mut child);
    let mut err = String::new();
    if let Some(e) = child.stderr.as_mut() {
        let _ = e.read_to_string(&mut err);
    }
    assert!(st.success(), "bypass-traffic failed ({st}): {out} {err}");
    let line = out.lines().rev().find(|l| l.starts_with('{')).unwrap_or_else(|| panic!("no JSON: {out} {err}"));
    serde_json::from_str(line).expect("JSON")
}

/// The notify datagrams bypassd sent, read by a thread as they arrive. bypassd's
/// sends block once the socket's queue (net.unix.max_dgram_qlen, 10) is full, as
/// they would under a systemd that stopped reading: a fixture must keep reading.
struct NotifyLog {
    msgs: Mutex<VecDeque<String>>,
    arrived: Condvar,
}

impl NotifyLog {
    fn listen(sock: UnixDatagram) -> Result<Arc<NotifyLog>> {
        sock.set_read_timeout(Some(Duration::from_millis(200)))?;
        let log = Arc::new(NotifyLog { msgs: Mutex::new(VecDeque::new()), arrived: Condvar::new() });
        let weak = Arc::downgrade(&log);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // Ends when the daemon fixture (the only strong reference) is gone.
            while let Some(log) = weak.upgrade() {
                if let Ok(n) = sock.recv(&mut buf) {
                    lock(&log.msgs).push_back(String::from_utf8_lossy(&buf[..n]).into_owned());
                    log.arrived.notify_all();
                }
            }
        });
        Ok(log)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A bypassd process with its own config, started and waited on for READY=1.
pub struct Daemon {
    pub child: Option<Child>,
    pub config: PathBuf,
    pub dir: TempDir,
    notify: Arc<NotifyLog>,
    env: Vec<(String, String)>,
    /// The bypassd binary (this workspace's, or a frozen copy the benchmark made).
    bin: PathBuf,
}

impl Daemon {
    /// Write `config` to a temp file and start bypassd on it.
    pub fn start(config: &str) -> Result<Daemon> {
        Self::start_with_env(config, &[])
    }

    pub fn start_with_env(config: &str, env: &[(&str, &str)]) -> Result<Daemon> {
        Self::start_timed(&bin("bypassd"), config, env).map(|(d, _)| d)
    }

    /// Start `bypassd` (a path: the benchmark runs its own copy) and return it with
    /// the time from spawn to READY=1.
    pub fn start_timed(bypassd: &Path, config: &str, env: &[(&str, &str)]) -> Result<(Daemon, Duration)> {
        let dir = TempDir::new();
        let cfg = dir.path().join("bypassd.toml");
        std::fs::write(&cfg, config)?;
        let notify = NotifyLog::listen(UnixDatagram::bind(dir.path().join("notify.sock"))?)?;
        let mut d = Daemon {
            child: None,
            config: cfg,
            dir,
            notify,
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            bin: bypassd.to_path_buf(),
        };
        let t = d.spawn_timed()?;
        Ok((d, t))
    }

    /// Start (again) on the same config and wait for READY=1.
    pub fn spawn(&mut self) -> Result<()> {
        self.spawn_timed().map(|_| ())
    }

    /// Start (again) on the same config; returns the time from spawn to READY=1.
    pub fn spawn_timed(&mut self) -> Result<Duration> {
        self.drain();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path())?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--config").arg(&self.config).env("NOTIFY_SOCKET", self.dir.path().join("notify.sock"));
        cmd.env_remove("JOURNAL_STREAM");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let t0 = Instant::now();
        let child = cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log).spawn()?;
        self.child = Some(child);
        self.wait_for("READY=1", Duration::from_secs(30))?;
        Ok(t0.elapsed())
    }

    /// Drop notifications already queued (an earlier instance's READY=1 must not count).
    fn drain(&self) {
        lock(&self.notify.msgs).clear();
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("bypassd.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Wait for a notify datagram containing `what`; fails early if bypassd exits.
    pub fn wait_for(&mut self, what: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let mut q = lock(&self.notify.msgs);
                while let Some(m) = q.pop_front() {
                    if m.lines().any(|l| l == what) {
                        return Ok(());
                    }
                }
                let _ = self.notify.arrived.wait_timeout(q, Duration::from_millis(20));
            }
            if let Some(c) = self.child.as_mut()
                && let Some(st) = c.try_wait()?
            {
                bail!("bypassd exited ({st}) before {what}:\n{}", self.log());
            }
            if Instant::now() > deadline {
                bail!("bypassd did not send {what} within {timeout:?}:\n{}", self.log());
            }
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    pub fn signal(&self, sig: i32) {
        // Never pid 0: that would signal this whole process group.
        if let (Some(_), Ok(s)) = (&self.child, nix::sys::signal::Signal::try_from(sig)) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), s);
        }
    }

    /// SIGHUP, then wait for the READY=1 that ends this reload.
    pub fn reload(&mut self) -> Result<()> {
        self.drain();
        self.signal(libc::SIGHUP);
        self.wait_for("RELOADING=1", Duration::from_secs(10))?;
        self.wait_for("READY=1", Duration::from_secs(30))
    }

    /// Write a new config, reload, and return the time from SIGHUP to READY=1.
    pub fn reload_with(&mut self, config: &str) -> Result<Duration> {
        std::fs::write(&self.config, config)?;
        let t0 = Instant::now();
        self.reload()?;
        Ok(t0.elapsed())
    }

    /// kill -9, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait; returns the exit status code.
    pub fn stop(&mut self) -> Option<i32> {
        self.signal(libc::SIGTERM);
        let mut c = self.child.take()?;
        c.wait().ok().and_then(|s| s.code())
    }

    /// Run `bypassd ARGS --config <this config>` to completion.
    pub fn tool(&self, args: &[&str]) -> std::process::Output {
        Command::new(&self.bin).args(args).arg("--config").arg(&self.config).output().expect("run bypassd")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Read all of a child's stdout (for commands started with piped stdout).
pub fn read_all(child: &mut Child) -> String {
    let mut s = String::new();
    if let Some(o) = child.stdout.as_mut() {
        let _ = o.read_to_string(&mut s);
    }
    s
}
