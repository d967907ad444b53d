//! The run: fixtures, sections, A/B interleaving, verification, output.
use crate::{
    Cli,
    fixtures::{self, BenchDaemon, Counters, Proc, Snap, check_stop, median, read_line, run_timeout},
    plot,
    report::{self, Churn, DaemonFigures, Point, Results, UnaccelPoint, UnixPoint, redirect_ok, size_label},
};
use anyhow::{Context, Result, bail};
use bypass_testsupport::{Netns, PinDir, TempDir, TestCgroup, dbus::SystemBus, veth};
use bypassd_ebpf::abi::Counter;
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

const VETH_SERVER: &str = "10.213.0.1";
const VETH_CLIENT: &str = "10.213.0.2";

/// How long and how often.
struct Plan {
    mode: &'static str,
    reps: usize,
    secs: u32,
    sizes: Vec<u32>,
    topologies: Vec<&'static str>,
    cpu: usize,
    unix_millis: u32,
    churn_millis: u32,
    churn_reps: usize,
    unaccel_reps: usize,
    start_reps: usize,
    reload_reps: usize,
    idle_secs: u64,
    conns: usize,
    sections: Vec<String>,
    tests: Vec<String>,
}

impl Plan {
    fn from(cli: &Cli) -> Plan {
        let short = cli.short;
        let mut sizes: Vec<u32> = if cli.sizes.is_empty() { (0..8).map(|i| 1u32 << (2 * i)).collect() } else { cli.sizes.clone() };
        sizes.sort_unstable();
        sizes.dedup();
        let topologies = ["loopback", "veth"]
            .into_iter()
            .filter(|t| cli.topologies.is_empty() || cli.topologies.iter().any(|x| x == t))
            .collect();
        Plan {
            mode: if short { "short" } else { "full" },
            reps: cli.reps.unwrap_or(if short { 1 } else { 5 }),
            secs: cli.secs.unwrap_or(if short { 1 } else { 2 }).max(1),
            sizes,
            topologies,
            cpu: cli.cpu,
            unix_millis: if short { 300 } else { 1000 },
            churn_millis: if short { 1000 } else { 3000 },
            churn_reps: if short { 1 } else { 5 },
            unaccel_reps: cli.unaccel_reps.unwrap_or(if short { 1 } else { 11 }),
            start_reps: if short { 2 } else { 5 },
            reload_reps: if short { 3 } else { 10 },
            idle_secs: if short { 3 } else { 10 },
            conns: 10_000,
            sections: cli.only.clone(),
            tests: cli.tests.clone(),
        }
    }
    fn wants(&self, s: &str) -> bool {
        self.sections.is_empty() || self.sections.iter().any(|x| x == s)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Bypass,
    Kernel,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Bypass => "bypass",
            Mode::Kernel => "kernel",
        }
    }
}

/// Everything the run creates. Fields drop in order: servers, daemon, cgroups (which
/// kills anything left in them), namespaces, pins, temp dirs.
struct Env {
    servers: Vec<Proc>,
    /// The main bypassd, attached to cg_a (started after the unaccelerated section,
    /// which needs a host without it).
    daemon: Option<BenchDaemon>,
    counters: Option<Counters>,
    cg_a: TestCgroup,
    cg_b: TestCgroup,
    ns_server: Netns,
    ns_client: Netns,
    pin: PinDir,
    /// The main daemon's private system bus (bypassctl talks to it).
    bus: SystemBus,
    tmp: TempDir,
    /// Ports: base..base+1 are kept on the kernel path by policy.
    base: u16,
}

fn config(pin: &Path, cgroup_rel: &str, state: &Path, kernel_ports: Option<(u16, u16)>, extra_rule: bool) -> String {
    let mut c = format!(
        "[daemon]\npin_dir = \"{}\"\ncgroup = \"{}\"\nstate_dir = \"{}\"\nlog_level = \"info\"\n\n\
         [datapath]\ncapacity = 32768\n\n[policy]\ndefault = \"accelerate\"\n",
        pin.display(),
        cgroup_rel,
        state.display()
    );
    if let Some((lo, hi)) = kernel_ports {
        // Both sockets of a connection on these ports stay on the kernel path: the
        // server's by its local port, the client's by its remote port.
        c.push_str(&format!(
            "\n[[policy.rules]]\nname = \"bench: unaccelerated (server side)\"\naction = \"kernel\"\nlocal_ports = \"{lo}-{hi}\"\n\
             \n[[policy.rules]]\nname = \"bench: unaccelerated (client side)\"\naction = \"kernel\"\nremote_ports = \"{lo}-{hi}\"\n"
        ));
    }
    if extra_rule {
        c.push_str("\n[[policy.rules]]\nname = \"bench: policy edit\"\naction = \"kernel\"\nremote_ports = \"9\"\n");
    }
    c
}

impl Env {
    fn new() -> Result<Env> {
        let tmp = TempDir::new();
        let pin = PinDir::new();
        let ns_server = Netns::new();
        let ns_client = Netns::new();
        veth(&ns_server, &[&format!("{VETH_SERVER}/24")], &ns_client, &[&format!("{VETH_CLIENT}/24")]);
        let cg_b = TestCgroup::new();
        let cg_a = TestCgroup::new();
        let base = 22000 + (std::process::id() % 900) as u16 * 10;
        let state = tmp.path().join("state");
        std::fs::create_dir_all(&state)?;
        let bus = SystemBus::start().context("starting a private system bus (dbus-daemon)")?;
        Ok(Env { servers: Vec::new(), daemon: None, counters: None, cg_a, cg_b, ns_server, ns_client, pin, bus, tmp, base })
    }

    /// The config of the daemons attached to cg_a: accelerate by default, but ports
    /// base..base+1 stay on the kernel path.
    fn config_a(&self, pin: &Path) -> Result<String> {
        let state = self.tmp.path().join(format!("state-{}", pin.file_name().unwrap_or_default().to_string_lossy()));
        std::fs::create_dir_all(&state)?;
        Ok(config(pin, &self.cg_a.rel, &state, Some((self.base, self.base + 1)), false))
    }

    /// Start the main bypassd on cg_a (on its own private system bus).
    fn start_daemon(&mut self) -> Result<()> {
        let cfg = self.config_a(self.pin.path())?;
        let (daemon, _) = BenchDaemon::start(&cfg, &[self.bus.env()])?;
        self.counters = Some(Counters::open(self.pin.path())?);
        self.daemon = Some(daemon);
        Ok(())
    }

    fn counters(&self) -> &Counters {
        self.counters.as_ref().expect("the main daemon is started before this")
    }

    fn daemon(&self) -> &BenchDaemon {
        self.daemon.as_ref().expect("the main daemon is started before this")
    }

    fn cg(&self, m: Mode) -> &TestCgroup {
        match m {
            Mode::Bypass => &self.cg_a,
            Mode::Kernel => &self.cg_b,
        }
    }

    /// `prog` in the cgroup of `mode`, in the server or client namespace for veth.
    fn command(&self, m: Mode, topo: &str, server: bool, prog: impl AsRef<std::ffi::OsStr>) -> Command {
        match topo {
            "veth" => {
                let ns = if server { &self.ns_server } else { &self.ns_client };
                ns.command(Some(self.cg(m)), prog)
            }
            _ => self.cg(m).command(prog),
        }
    }

    fn qperf_server(&mut self, m: Mode, topo: &str, lp: u16) -> Result<()> {
        let mut cmd = self.command(m, topo, true, "qperf");
        cmd.args(["-lp", &lp.to_string()]).stdout(std::process::Stdio::null());
        let p = Proc::spawn(cmd, &format!("qperf server {topo}/{} on port {lp}", m.name()))?;
        self.servers.push(p);
        Ok(())
    }

    fn servers_alive(&mut self) -> Result<()> {
        for s in &mut self.servers {
            s.alive()?;
        }
        Ok(())
    }

    /// One qperf run; returns µs (latency) or MB/s (bandwidth) and the counter delta.
    /// A run that fails (qperf gives up after 5 s without an answer, which happens
    /// when the host is starved) is retried twice before the section fails.
    #[allow(clippy::too_many_arguments)]
    fn qperf(
        &self,
        counters: Option<&Counters>,
        m: Mode,
        topo: &str,
        lp: u16,
        ip: Option<u16>,
        test: &str,
        size: u32,
        secs: u32,
        cpu: Option<usize>,
    ) -> Result<QRun> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.qperf_once(counters, m, topo, lp, ip, test, size, secs, cpu) {
                Err(e) if attempt < 3 && !fixtures::STOP.load(std::sync::atomic::Ordering::Relaxed) => {
                    progress(&format!("  ⚠ qperf failed, retrying: {}", format!("{e:#}").replace('\n', " ")));
                    std::thread::sleep(Duration::from_millis(500));
                }
                r => return r,
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn qperf_once(
        &self,
        counters: Option<&Counters>,
        m: Mode,
        topo: &str,
        lp: u16,
        ip: Option<u16>,
        test: &str,
        size: u32,
        secs: u32,
        cpu: Option<usize>,
    ) -> Result<QRun> {
        let host = if topo == "veth" { VETH_SERVER } else { "127.0.0.1" };
        let mut cmd = self.command(m, topo, false, "qperf");
        cmd.args([host, "-lp", &lp.to_string(), "-t", &secs.to_string(), "-m", &size.to_string(), "-e", "5", "-uu", "-vvs"]);
        if let Some(ip) = ip {
            cmd.args(["-ip", &ip.to_string()]);
        }
        if let Some(c) = cpu {
            // qperf numbers CPUs from 1 here (-lca 1 pins to CPU 0).
            let a = (c + 1).to_string();
            cmd.args(["-lca", &a, "-rca", &a]);
        }
        cmd.arg(test);
        // In the client's own namespace, TCP segment counts are this run's alone.
        let segs = |env: &Env| (topo == "veth").then(|| netns_out_segs(&env.ns_client.name)).flatten();
        let segs0 = segs(self);
        let read = || counters.map_or(Ok(Snap::default()), |c| c.read());
        let before = read()?;
        let out = run_timeout(cmd, Duration::from_secs(secs as u64 + 30))?;
        let after = read()?;
        let segs1 = segs(self);
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!("qperf {topo}/{} {test} {size}: {}{}", m.name(), stdout, String::from_utf8_lossy(&out.stderr));
        }
        let value = parse_qperf(&stdout).with_context(|| format!("qperf output: {stdout}"))?;
        let send_msgs = qperf_field(&stdout, "send_msgs").unwrap_or(0.0) as u64;
        let out_segs = segs0.zip(segs1).map(|(a, b)| b.saturating_sub(a));
        Ok(QRun { value, delta: after.since(&before), send_msgs, out_segs })
    }
}

/// One qperf run.
struct QRun {
    /// µs or MB/s.
    value: f64,
    /// Datapath counter change over the run.
    delta: Snap,
    /// write() calls the sender made (qperf -vvs).
    send_msgs: u64,
    /// TCP segments sent from the client's namespace (veth only).
    out_segs: Option<u64>,
}

/// Tcp OutSegs of a network namespace (/proc/net/snmp seen from inside it).
fn netns_out_segs(ns: &str) -> Option<u64> {
    let o = Command::new("ip").args(["netns", "exec", ns, "cat", "/proc/net/snmp"]).output().ok()?;
    let s = String::from_utf8_lossy(&o.stdout);
    let mut tcp = s.lines().filter(|l| l.starts_with("Tcp:"));
    let (h, v) = (tcp.next()?, tcp.next()?);
    let i = h.split_whitespace().position(|k| k == "OutSegs")?;
    v.split_whitespace().nth(i)?.parse().ok()
}

fn qperf_field(out: &str, key: &str) -> Option<f64> {
    out.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == key).then(|| v.split_whitespace().next()?.parse().ok()).flatten()
    })
}

/// The figure from qperf's output, in µs (latency) or MB/s (bandwidth).
fn parse_qperf(out: &str) -> Result<f64> {
    for l in out.lines() {
        let Some((k, v)) = l.split_once('=') else { continue };
        let k = k.trim();
        if k != "latency" && k != "bw" {
            continue;
        }
        let mut it = v.split_whitespace();
        let num: f64 = it.next().context("no value")?.parse()?;
        let unit = it.next().unwrap_or("");
        let factor = match unit {
            "ns" => 1e-3,
            "us" => 1.0,
            "ms" => 1e3,
            "sec" | "s" => 1e6,
            "bytes/sec" => 1e-6,
            "KB/sec" => 1e-3,
            "MB/sec" => 1.0,
            "GB/sec" => 1e3,
            "TB/sec" => 1e6,
            _ => bail!("unknown unit {unit}"),
        };
        return Ok(num * factor);
    }
    bail!("no latency or bw line")
}

/// 1-minute load averages seen during the run (sampled at most every 10 s).
static LOAD: std::sync::Mutex<Vec<f64>> = std::sync::Mutex::new(Vec::new());

fn progress(msg: &str) {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    static LAST: std::sync::Mutex<Option<Instant>> = std::sync::Mutex::new(None);
    let t = START.get_or_init(Instant::now).elapsed().as_secs_f64();
    eprintln!("[bench {t:7.1}s] {msg}");
    let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
    if last.is_none_or(|l| l.elapsed() >= Duration::from_secs(10)) {
        *last = Some(Instant::now());
        if let Some(l) = std::fs::read_to_string("/proc/loadavg").ok().and_then(|s| s.split_whitespace().next()?.parse().ok()) {
            LOAD.lock().unwrap_or_else(|p| p.into_inner()).push(l);
        }
    }
}

fn sh(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn machine() -> report::Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let os = std::fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME=").map(|v| v.trim_matches('"').to_string()))
        .unwrap_or_default();
    let repo = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let commit = sh("git", &["-C", repo, "rev-parse", "--short", "HEAD"]);
    let dirty = !sh("git", &["-C", repo, "status", "--porcelain", "--untracked-files=no"]).is_empty();
    report::Machine {
        kernel: nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default(),
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model: cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim().to_string()))
            .unwrap_or_default(),
        mem_gib: fixtures::meminfo_kib("MemTotal") as f64 / 1024.0 / 1024.0,
        os,
        qperf: sh("dpkg-query", &["-W", "-f=${Version}", "qperf"]),
        commit: if dirty { format!("{commit} (+ uncommitted changes)") } else { commit },
    }
}

fn preflight() -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("the benchmark needs root (BPF, cgroups, network namespaces)");
    }
    for (tool, pkg) in [("qperf", "qperf"), ("bpftool", "bpftool"), ("ip", "iproute2"), ("dbus-daemon", "dbus")] {
        if Command::new(tool).arg("--help").output().is_err() {
            bail!("{tool} is missing: run bench/deps.sh (apt-get install {pkg})");
        }
    }
    fixtures::bypassd_bin()?;
    fixtures::bypassctl_bin()?;
    Ok(())
}

/// Returns whether the run was clean (no section failed, every run verified).
pub fn run(cli: &Cli) -> Result<bool> {
    preflight()?;
    let plan = Plan::from(cli);
    // Private copies of bypassd and bypassctl: a build during the run cannot swap them.
    let bins = TempDir::new();
    fixtures::freeze_binaries(bins.path())?;
    let out = cli.out_dir();
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let t0 = Instant::now();
    let mut r = Results { machine: machine(), ..Default::default() };
    r.run = report::RunInfo {
        command: std::iter::once("cargo run --release -p bypass-bench --".to_string())
            .chain(std::env::args().skip(1))
            .collect::<Vec<_>>()
            .join(" "),
        mode: plan.mode.into(),
        reps: plan.reps,
        secs_per_point: plan.secs,
        sizes: plan.sizes.clone(),
        pinned_cpu: plan.cpu,
        started_unix: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        duration_secs: 0.0,
        load_avg_1min: Vec::new(),
    };
    progress(&format!("{} mode: {} reps × {} s, sizes {:?}, output {}", plan.mode, plan.reps, plan.secs, plan.sizes, out.display()));

    // Before anything of ours is loaded: whatever is here belongs to someone else.
    r.host_tracing_programs_start = fixtures::host_tracing_programs();
    r.bpf_stats_enabled.0 = fixtures::bpf_stats_enabled();
    let mut env = Env::new()?;

    type Section = fn(&mut Env, &Plan, &mut Results) -> Result<()>;
    let sections: [(&str, Section); 5] = [
        // First, while no bypassd of ours is attached anywhere.
        ("unaccelerated", unaccel_section),
        ("daemon", daemon_section),
        ("churn", churn_section),
        ("unix", unix_section),
        ("qperf", qperf_section),
    ];
    for (name, f) in sections {
        if !plan.wants(name) {
            continue;
        }
        if name != "unaccelerated" && env.daemon.is_none() {
            env.servers.clear();
            env.start_daemon()?;
            verify_hooks(&env, &mut r)?;
        }
        progress(&format!("== {name}"));
        if let Err(e) = f(&mut env, &plan, &mut r) {
            progress(&format!("section {name} failed: {e:#}"));
            r.errors.push(format!("{name}: {e:#}"));
        }
        if fixtures::STOP.load(std::sync::atomic::Ordering::Relaxed) {
            break;
        }
        env.servers.clear();
    }
    drop(env);
    // Ours are gone with the pins: whatever is left belongs to someone else.
    std::thread::sleep(Duration::from_millis(200));
    r.host_tracing_programs_end = fixtures::host_tracing_programs();
    r.bpf_stats_enabled.1 = fixtures::bpf_stats_enabled();

    // An interrupted run writes nothing: it would replace complete results with partial ones.
    check_stop()?;
    r.run.duration_secs = t0.elapsed().as_secs_f64();
    r.run.load_avg_1min = LOAD.lock().unwrap_or_else(|p| p.into_inner()).clone();
    r.evaluate();
    write_outputs(&r, &out, true)?;
    let clean = r.errors.is_empty() && r.targets.iter().find(|t| t.name.starts_with("Bypass runs")).is_none_or(|t| t.pass);
    Ok(clean)
}

/// The kernel cgroup must have no socket hooks at all; the bypass cgroup ours.
fn verify_hooks(env: &Env, r: &mut Results) -> Result<()> {
    r.verification.bypass_cgroup_programs = fixtures::effective_progs(&env.cg_a.path)?;
    r.verification.kernel_cgroup_programs = fixtures::effective_progs(&env.cg_b.path)?;
    let hooks_in_b = r
        .verification
        .kernel_cgroup_programs
        .iter()
        .any(|(t, _)| t.contains("sock_ops") || t.contains("sock_create") || t.contains("sk_msg") || t.contains("sk_skb"));
    let ours_in_a = r.verification.bypass_cgroup_programs.iter().any(|(t, n)| t.contains("sock_ops") && n.starts_with("bypass"));
    r.verification.ok = !hooks_in_b && ours_in_a;
    let global = fixtures::global_hooks(env.pin.path())?;
    progress(&format!(
        "hooks: bypass cgroup {:?}; kernel cgroup {:?} → {}; bypassd's global hooks: {:?}",
        r.verification.bypass_cgroup_programs,
        r.verification.kernel_cgroup_programs,
        if r.verification.ok { "OK" } else { "NOT OK" },
        global
    ));
    r.global_hooks = Some(global);
    Ok(())
}

/// Re-render results.md and the plots from a results.json.
pub fn render(json: &Path, out: Option<&Path>) -> Result<()> {
    let text = std::fs::read_to_string(json).with_context(|| format!("reading {}", json.display()))?;
    let mut r: Results = serde_json::from_str(&text).with_context(|| format!("parsing {}", json.display()))?;
    let out = out.map(Path::to_path_buf).unwrap_or_else(|| json.parent().unwrap_or(Path::new(".")).to_path_buf());
    std::fs::create_dir_all(&out)?;
    r.evaluate();
    // The JSON is the record of what was measured: never rewrite it.
    write_outputs(&r, &out, false)
}

fn write_outputs(r: &Results, out: &Path, json: bool) -> Result<()> {
    if json {
        std::fs::write(out.join("results.json"), serde_json::to_string_pretty(r)? + "\n")?;
    }
    let md = r.markdown();
    std::fs::write(out.join("results.md"), &md)?;
    let plotted = plot::register_font().and_then(|_| plot::plots(r, out));
    if let Err(e) = &plotted {
        eprintln!("[bench] plots not written: {e:#}");
    }
    println!("{md}");
    println!("wrote {}/results.json, results.md{}", out.display(), if plotted.is_ok() { ", latency.png, bandwidth.png" } else { "" });
    plotted
}

/// This very program, for the helpers: /proc/self/exe keeps working when a build
/// replaces target/release/bypass-bench during the run.
fn exe() -> Result<PathBuf> {
    Ok(PathBuf::from("/proc/self/exe"))
}

fn sleep_checked(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        check_stop()?;
        std::thread::sleep(Duration::from_millis(50).min(end.saturating_duration_since(Instant::now())));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// qperf: tcp_lat (unpinned, pinned) and tcp_bw, loopback and veth, A/B interleaved.

fn qperf_section(env: &mut Env, plan: &Plan, r: &mut Results) -> Result<()> {
    let base = env.base;
    let ports = |topo: &str, m: Mode| -> u16 {
        let t = if topo == "veth" { 2 } else { 0 };
        base + 3 + t + if m == Mode::Kernel { 1 } else { 0 }
    };
    let mut lps = Vec::new();
    for topo in &plan.topologies {
        for m in [Mode::Bypass, Mode::Kernel] {
            lps.push((*topo, m, ports(topo, m)));
        }
    }
    for (topo, m, lp) in &lps {
        env.qperf_server(*m, topo, *lp)?;
    }
    std::thread::sleep(Duration::from_millis(300));
    env.servers_alive()?;

    let tests: [(&str, &str, bool); 3] = [("tcp_lat", "tcp_lat", false), ("tcp_lat_pinned", "tcp_lat", true), ("tcp_bw", "tcp_bw", false)];
    let mut points: Vec<Point> = Vec::new();
    for topo in &plan.topologies {
        for (name, _, _) in &tests {
            if !plan.tests.is_empty() && !plan.tests.iter().any(|t| t == name) {
                continue;
            }
            for &s in &plan.sizes {
                points.push(Point::new(topo, name, s));
            }
        }
    }
    let total = points.len() * plan.reps * 2;
    let mut done = 0;
    for rep in 0..plan.reps {
        for p in points.iter_mut() {
            let (_, qtest, pinned) = *tests.iter().find(|t| t.0 == p.test).unwrap();
            // A B on even repetitions, B A on odd ones: neither always goes first.
            let order = if rep % 2 == 0 { [Mode::Bypass, Mode::Kernel] } else { [Mode::Kernel, Mode::Bypass] };
            for m in order {
                check_stop()?;
                let lp = ports(&p.topology, m);
                let q = env.qperf(Some(env.counters()), m, &p.topology, lp, None, qtest, p.size, plan.secs, pinned.then_some(plan.cpu))?;
                let (v, d) = (q.value, q.delta);
                done += 1;
                match m {
                    Mode::Bypass => {
                        p.bypass.push(v);
                        p.bypass_counters.add(&d);
                        p.bypass_send_msgs += q.send_msgs;
                        p.bypass_out_segs += q.out_segs.unwrap_or(0);
                    }
                    Mode::Kernel => {
                        p.kernel.push(v);
                        p.kernel_counters.add(&d);
                        p.kernel_send_msgs += q.send_msgs;
                        p.kernel_out_segs += q.out_segs.unwrap_or(0);
                    }
                }
                progress(&format!(
                    "[{done}/{total}] {} {} {} {}: {:.2} {}  (redirected {}, passed {})",
                    p.topology,
                    p.test,
                    size_label(p.size),
                    m.name(),
                    v,
                    p.unit,
                    d.get(Counter::RedirectedMsgs),
                    d.get(Counter::PassedMsgs)
                ));
                if m == Mode::Bypass && !redirect_ok(&d) {
                    progress("  ⚠ this bypass run was NOT redirected (see counters)");
                }
                if m == Mode::Kernel && !d.is_zero() {
                    progress(&format!("  ⚠ the datapath counters moved during a kernel run: {:?}", d.to_map()));
                }
            }
        }
        // Keep what we have so far, in case the run is cut short.
        r.qperf = points.iter().map(clone_point).collect();
        r.qperf.iter_mut().for_each(Point::finish);
    }
    for p in points.iter_mut() {
        p.finish();
        progress(&format!(
            "{} {} {}: kernel {:.2} bypass {:.2} {} → ratio {:.2}{}",
            p.topology,
            p.test,
            size_label(p.size),
            p.kernel_median,
            p.bypass_median,
            p.unit,
            p.ratio,
            if p.verified { "" } else { "  ⚠ NOT VERIFIED" }
        ));
    }
    r.qperf = points;
    Ok(())
}

fn clone_point(p: &Point) -> Point {
    let mut q = Point::new(&p.topology, &p.test, p.size);
    q.kernel = p.kernel.clone();
    q.bypass = p.bypass.clone();
    q.bypass_counters = p.bypass_counters;
    q.kernel_counters = p.kernel_counters;
    q.kernel_send_msgs = p.kernel_send_msgs;
    q.bypass_send_msgs = p.bypass_send_msgs;
    q.kernel_out_segs = p.kernel_out_segs;
    q.bypass_out_segs = p.bypass_out_segs;
    q
}

// ---------------------------------------------------------------------------------
// AF_UNIX floor.

fn unix_section(env: &mut Env, plan: &Plan, r: &mut Results) -> Result<()> {
    let path = env.tmp.path().join("unix.sock");
    let mut cmd = env.cg_b.command(exe()?);
    cmd.args(["helper", "unix-server", "--path"]).arg(&path);
    let (p, mut out) = Proc::spawn_piped(cmd, "AF_UNIX server")?;
    env.servers.push(p);
    if read_line(&mut out)? != "ready" {
        bail!("AF_UNIX server did not start");
    }
    let reps = plan.reps.min(3);
    let mut pts: Vec<UnixPoint> = Vec::new();
    for test in ["lat", "lat_pinned", "bw"] {
        for &s in &plan.sizes {
            pts.push(UnixPoint {
                test: test.into(),
                size: s,
                unit: if test == "bw" { "MB/s".into() } else { "us".into() },
                samples: Vec::new(),
                median: f64::NAN,
            });
        }
    }
    for _ in 0..reps {
        for p in pts.iter_mut() {
            check_stop()?;
            let mut cmd = env.cg_b.command(exe()?);
            cmd.args(["helper", "unix-client", "--path"]).arg(&path).args([
                "--test",
                if p.test == "bw" { "bw" } else { "lat" },
                "--size",
                &p.size.to_string(),
                "--millis",
                &plan.unix_millis.to_string(),
            ]);
            if p.test == "lat_pinned" {
                cmd.args(["--cpu", &plan.cpu.to_string()]);
            }
            let o = run_timeout(cmd, Duration::from_secs(30))?;
            if !o.status.success() {
                bail!("AF_UNIX client: {}", String::from_utf8_lossy(&o.stderr));
            }
            let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
            p.samples.push(v["value"].as_f64().context("no value")?);
        }
    }
    for p in pts.iter_mut() {
        p.median = median(&p.samples);
        progress(&format!("AF_UNIX {} {}: {:.2} {}", p.test, size_label(p.size), p.median, p.unit));
    }
    r.unix = pts;
    Ok(())
}

// ---------------------------------------------------------------------------------
// Connection churn.

fn churn_section(env: &mut Env, plan: &Plan, r: &mut Results) -> Result<()> {
    let mut ports = Vec::new();
    for m in [Mode::Bypass, Mode::Kernel] {
        let mut cmd = env.cg(m).command(exe()?);
        cmd.args(["helper", "churn-server", "--addr", "127.0.0.1:0"]);
        let (p, mut out) = Proc::spawn_piped(cmd, "churn server")?;
        env.servers.push(p);
        ports.push(read_line(&mut out)?.parse::<u16>().context("churn server port")?);
    }
    let mut c = Churn { topology: "loopback".into(), ..Default::default() };
    for rep in 0..plan.churn_reps {
        let order = if rep % 2 == 0 { [Mode::Bypass, Mode::Kernel] } else { [Mode::Kernel, Mode::Bypass] };
        for m in order {
            check_stop()?;
            let port = ports[if m == Mode::Bypass { 0 } else { 1 }];
            let mut cmd = env.cg(m).command(exe()?);
            cmd.args(["helper", "churn-client", "--addr", &format!("127.0.0.1:{port}"), "--millis", &plan.churn_millis.to_string()]);
            let before = env.counters().read()?;
            let o = run_timeout(cmd, Duration::from_secs(60))?;
            // Let the last connection's server side close before reading counters.
            std::thread::sleep(Duration::from_millis(100));
            let d = env.counters().read()?.since(&before);
            if !o.status.success() {
                bail!("churn client: {}", String::from_utf8_lossy(&o.stderr));
            }
            let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
            let rate = v["rate"].as_f64().context("rate")?;
            progress(&format!(
                "churn {}: {:.0} conn/s ({} conns, {} errors; inserted {}, redirected {})",
                m.name(),
                rate,
                v["conns"],
                v["errors"],
                d.get(Counter::SocketsInserted),
                d.get(Counter::RedirectedMsgs)
            ));
            match m {
                Mode::Bypass => {
                    c.bypass.push(rate);
                    c.bypass_counters.add(&d);
                    c.bypass_connections += v["conns"].as_u64().unwrap_or(0);
                }
                Mode::Kernel => {
                    c.kernel.push(rate);
                    c.kernel_counters.add(&d);
                }
            }
        }
    }
    c.kernel_median = median(&c.kernel);
    c.bypass_median = median(&c.bypass);
    c.ratio = c.bypass_median / c.kernel_median;
    c.cost = 1.0 - c.ratio;
    // Every connection: both sockets inserted (sock_ops ran on every connection, which is
    // the cost measured). Its 1-byte messages go before the receiver's first read, so the
    // recvmsg-first rule keeps them on TCP: each must carry a counted safety reason.
    let n = c.bypass_connections;
    let passed = c.bypass_counters.get(Counter::PassedMsgs);
    c.verified = c.kernel_counters.is_zero()
        && c.bypass_counters.get(Counter::SocketsInserted) >= 2 * n
        && passed <= report::safety_reasons(&c.bypass_counters) + 16;
    progress(&format!("churn: kernel {:.0}, bypass {:.0} conn/s, cost {:+.1} %", c.kernel_median, c.bypass_median, c.cost * 100.0));
    r.churn = Some(c);
    Ok(())
}

// ---------------------------------------------------------------------------------
// Cost to traffic the policy leaves on the kernel path: the same qperf pair (in cg_a,
// on ports the policy sends to the kernel) with a bypassd datapath attached, and with
// no bypassd datapath anywhere on the host (detached with `bypassd --detach`). Runs
// before the main daemon starts, so "detached" really means no hooks of ours at all:
// cgroup programs and any global ones (tracepoints) alike.

/// A bypassd on cg_a that can be attached and detached between runs.
struct Toggle {
    daemon: Option<BenchDaemon>,
    counters: Option<Counters>,
    pin: PinDir,
    cfg: String,
}

impl Toggle {
    fn attach(&mut self) -> Result<()> {
        if self.daemon.is_none() {
            let (d, _) = BenchDaemon::start(&self.cfg, &[])?;
            self.daemon = Some(d);
        }
        self.counters = Some(Counters::open(self.pin.path())?);
        Ok(())
    }

    /// Stop bypassd and remove its datapath the way an operator would.
    fn detach(&mut self) -> Result<()> {
        self.counters = None;
        if let Some(mut d) = self.daemon.take() {
            d.stop();
            let o = Command::new(fixtures::bypassd_bin()?).arg("--detach").arg("--config").arg(&d.config).output()?;
            if !o.status.success() {
                bail!("bypassd --detach: {}", String::from_utf8_lossy(&o.stderr));
            }
        }
        Ok(())
    }
}

fn unaccel_section(env: &mut Env, plan: &Plan, r: &mut Results) -> Result<()> {
    // Control port base, data port base+1: both in the policy's kernel range.
    let (lp, ip) = (env.base, env.base + 1);
    env.qperf_server(Mode::Bypass, "loopback", lp)?;
    std::thread::sleep(Duration::from_millis(300));
    env.servers_alive()?;
    let pin = PinDir::new();
    let cfg = env.config_a(pin.path())?;
    let mut tg = Toggle { daemon: None, counters: None, pin, cfg };
    let cases: [(&str, u32); 3] = [("tcp_lat", 1), ("tcp_bw", 1024), ("tcp_bw", 16384)];
    let mut pts: Vec<UnaccelPoint> = cases
        .iter()
        .map(|(t, s)| UnaccelPoint {
            test: t.to_string(),
            size: *s,
            unit: if *t == "tcp_bw" { "MB/s".into() } else { "us".into() },
            hooks: Vec::new(),
            no_hooks: Vec::new(),
            hooks_median: f64::NAN,
            no_hooks_median: f64::NAN,
            cost: f64::NAN,
            hooks_counters: Snap::default(),
            verified: false,
        })
        .collect();
    let mut detached_clean = true;
    for rep in 0..plan.unaccel_reps {
        // on, off | off, on | on, off …: one attach or detach per repetition.
        let order = if rep % 2 == 0 { [true, false] } else { [false, true] };
        for attached in order {
            check_stop()?;
            if attached {
                tg.attach()?;
                if r.global_hooks.is_none() {
                    r.global_hooks = Some(fixtures::global_hooks(tg.pin.path())?);
                }
            } else {
                tg.detach()?;
                let left: Vec<_> = fixtures::effective_progs(&env.cg_a.path)?;
                if !left.is_empty() {
                    detached_clean = false;
                    progress(&format!("  ⚠ programs still effective on the cgroup after detach: {left:?}"));
                }
            }
            for p in pts.iter_mut() {
                check_stop()?;
                let q = env.qperf(tg.counters.as_ref(), Mode::Bypass, "loopback", lp, Some(ip), &p.test, p.size, plan.secs, Some(plan.cpu))?;
                progress(&format!(
                    "unaccelerated {} {} {}: {:.2} {} (policy_kernel +{}, inserted +{}, redirected +{})",
                    p.test,
                    size_label(p.size),
                    if attached { "attached" } else { "detached" },
                    q.value,
                    p.unit,
                    q.delta.get(Counter::PolicyKernel),
                    q.delta.get(Counter::SocketsInserted),
                    q.delta.get(Counter::RedirectedMsgs)
                ));
                if attached {
                    p.hooks.push(q.value);
                    p.hooks_counters.add(&q.delta);
                } else {
                    p.no_hooks.push(q.value);
                }
            }
        }
    }
    tg.detach()?;
    for p in pts.iter_mut() {
        p.hooks_median = median(&p.hooks);
        p.no_hooks_median = median(&p.no_hooks);
        p.cost = if p.unit == "us" { p.hooks_median / p.no_hooks_median - 1.0 } else { 1.0 - p.hooks_median / p.no_hooks_median };
        let c = &p.hooks_counters;
        p.verified = detached_clean
            && c.get(Counter::PolicyKernel) > 0
            && c.get(Counter::SocketsInserted) == 0
            && c.get(Counter::RedirectedMsgs) == 0
            && c.get(Counter::PassedMsgs) == 0;
        progress(&format!(
            "unaccelerated {} {}: detached {:.2}, attached {:.2} {} → cost {:+.1} %",
            p.test,
            size_label(p.size),
            p.no_hooks_median,
            p.hooks_median,
            p.unit,
            p.cost * 100.0
        ));
    }
    r.unaccelerated = pts;
    Ok(())
}

// ---------------------------------------------------------------------------------
// The daemon: start, restart, policy edit, idle CPU, memory with N connections.

fn daemon_section(env: &mut Env, plan: &Plan, r: &mut Results) -> Result<()> {
    let mut d = DaemonFigures::default();
    let pid = env.daemon().pid();

    // Idle CPU first, while nothing else of ours runs.
    let hz = fixtures::clock_ticks_per_sec();
    let t0 = fixtures::cpu_ticks(pid)?;
    let n0 = fixtures::cpu_ns(pid)?;
    let w0 = Instant::now();
    sleep_checked(Duration::from_secs(plan.idle_secs))?;
    let t1 = fixtures::cpu_ticks(pid)?;
    let n1 = fixtures::cpu_ns(pid)?;
    d.idle_cpu_secs = w0.elapsed().as_secs_f64();
    d.idle_cpu_percent = (t1 - t0) as f64 / hz as f64 / d.idle_cpu_secs * 100.0;
    d.idle_cpu_percent_schedstat = (n1.saturating_sub(n0)) as f64 / 1e9 / d.idle_cpu_secs * 100.0;
    progress(&format!(
        "idle CPU: {:.3} % (ticks), {:.4} % (schedstat) over {:.1} s",
        d.idle_cpu_percent, d.idle_cpu_percent_schedstat, d.idle_cpu_secs
    ));

    // Policy edit round trip through bypassctl and D-Bus, on the main daemon: add a
    // runtime rule, then remove it; each must reach the kernel (policy seq + 1).
    let ctl = fixtures::bypassctl_bin()?;
    let bus_env = env.bus.env();
    let bypassctl = |args: &[&str]| -> Result<Duration> {
        let mut cmd = Command::new(&ctl);
        cmd.args(args).env(bus_env.0, &bus_env.1);
        let t = Instant::now();
        let o = run_timeout(cmd, Duration::from_secs(30))?;
        let el = t.elapsed();
        if !o.status.success() {
            bail!("bypassctl {}: {}{}", args.join(" "), String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        }
        Ok(el)
    };
    // bypassd owns its bus name shortly after READY: wait for it.
    let deadline = Instant::now() + Duration::from_secs(15);
    while bypassctl(&["status"]).is_err() {
        if Instant::now() > deadline {
            bail!("bypassd did not answer on D-Bus: {}", env.daemon().log());
        }
        sleep_checked(Duration::from_millis(100))?;
    }
    let mut seqs_ok = true;
    for _ in 0..plan.reload_reps {
        check_stop()?;
        for args in [
            &["policy", "add", "--action", "kernel", "--remote-ports", "9", "--name", "bench-edit"][..],
            &["policy", "remove", "1"][..],
        ] {
            let before = env.counters().policy_seq()?;
            d.policy_edit_ms.push(bypassctl(args)?.as_secs_f64() * 1e3);
            seqs_ok &= env.counters().policy_seq()? == before.wrapping_add(1);
        }
    }
    d.policy_edit_method = "bypassctl policy add / remove over D-Bus".into();
    d.policy_edit_ms_median = median(&d.policy_edit_ms);
    d.policy_edit_reached_kernel = seqs_ok && !d.policy_edit_ms.is_empty();
    progress(&format!(
        "policy edit round trip (bypassctl): {:.2} ms median, reached the kernel: {}",
        d.policy_edit_ms_median, d.policy_edit_reached_kernel
    ));

    // Start and restart times, each on a fresh pin directory and a scratch cgroup,
    // with a system bus of their own (the main daemon owns the name on the other).
    let cg = TestCgroup::new();
    let bus = SystemBus::start().context("starting a private system bus (dbus-daemon)")?;
    let mut reload_ok = true;
    for i in 0..plan.start_reps {
        check_stop()?;
        let pin = PinDir::new();
        let state = TempDir::new();
        let cfg = config(pin.path(), &cg.rel, state.path(), None, false);
        let (mut bd, cold) = BenchDaemon::start(&cfg, &[bus.env()])?;
        bd.stop();
        let warm = bd.spawn()?;
        d.cold_start_ms.push(cold.as_secs_f64() * 1e3);
        d.restart_ms.push(warm.as_secs_f64() * 1e3);
        progress(&format!("start to READY: cold {:.1} ms, restart (adopt) {:.1} ms", cold.as_secs_f64() * 1e3, warm.as_secs_f64() * 1e3));
        if i == 0 {
            // The same kind of edit through the config file: SIGHUP, RELOADING=1 … READY=1.
            let counters = Counters::open(pin.path())?;
            for j in 0..plan.reload_reps {
                check_stop()?;
                let before = counters.policy_seq()?;
                let cfg = config(pin.path(), &cg.rel, state.path(), None, j % 2 == 0);
                let t = bd.reload_with(&cfg)?;
                reload_ok &= counters.policy_seq()? == before.wrapping_add(1);
                d.reload_ms.push(t.as_secs_f64() * 1e3);
            }
        }
        drop(bd);
        drop(pin);
    }
    drop(bus);
    drop(cg);
    d.cold_start_ms_median = median(&d.cold_start_ms);
    d.restart_ms_median = median(&d.restart_ms);
    d.reload_ms_median = median(&d.reload_ms);
    d.reload_reached_kernel = reload_ok && !d.reload_ms.is_empty();
    progress(&format!(
        "config edit + SIGHUP reload: {:.2} ms median, reached the kernel: {}",
        d.reload_ms_median, d.reload_reached_kernel
    ));

    // Memory with N accelerated connections (and N plain ones, for the kernel side).
    d.connections = plan.conns;
    d.rss_idle_kib = fixtures::rss_kib(pid)?.0;
    d.maps_memlock_idle = fixtures::maps_memlock(env.pin.path())?;
    let rounds = if plan.mode == "short" { 1 } else { 3 };
    d.connections_redirected = true;
    for m in (0..rounds).flat_map(|_| [Mode::Kernel, Mode::Bypass]) {
        check_stop()?;
        let slab0 = fixtures::meminfo_kib("Slab") as i64;
        let before = env.counters().read()?;
        let mut cmd = env.cg(m).command(exe()?);
        cmd.args(["helper", "hold-server", "--n", &plan.conns.to_string()]);
        let (mut server, mut sout) = Proc::spawn_piped(cmd, "connection holder (server)")?;
        let port: u16 = read_line(&mut sout)?.parse().context("holder port")?;
        let mut cmd = env.cg(m).command(exe()?);
        cmd.args(["helper", "hold-client", "--addr", &format!("127.0.0.1:{port}"), "--n", &plan.conns.to_string()]);
        let (mut client, mut cout) = Proc::spawn_piped(cmd, "connection holder (client)")?;
        let line = read_line(&mut cout)?;
        if !line.starts_with("ready") {
            bail!("connection holder: {line}");
        }
        std::thread::sleep(Duration::from_millis(500));
        let slab = fixtures::meminfo_kib("Slab") as i64 - slab0;
        let delta = env.counters().read()?.since(&before);
        match m {
            Mode::Kernel => d.slab_plain_samples_kib.push(slab),
            Mode::Bypass => {
                d.slab_accelerated_samples_kib.push(slab);
                let (rss, hwm) = fixtures::rss_kib(pid)?;
                d.rss_with_connections_kib = rss;
                d.hwm_with_connections_kib = hwm;
                d.maps_memlock_with_connections = fixtures::maps_memlock(env.pin.path())?;
                d.sockets_in_map = delta.get(Counter::SocketsInserted);
                d.connections_redirected &= d.sockets_in_map >= 2 * plan.conns as u64
                    && delta.get(Counter::RedirectedMsgs) >= 2 * plan.conns as u64
                    && delta.get(Counter::InsertFailures) == 0;
            }
        }
        progress(&format!(
            "{} {} connections: slab +{} KiB, inserted {}, redirected {}",
            plan.conns,
            m.name(),
            slab,
            delta.get(Counter::SocketsInserted),
            delta.get(Counter::RedirectedMsgs)
        ));
        for p in [&mut client, &mut server] {
            drop(p.child.stdin.take());
            let _ = p.child.wait();
        }
        // Let the closed sockets go before the next measurement.
        std::thread::sleep(Duration::from_millis(1000));
    }
    let med = |v: &[i64]| median(&v.iter().map(|x| *x as f64).collect::<Vec<_>>()).round() as i64;
    d.slab_plain_kib = med(&d.slab_plain_samples_kib);
    d.slab_accelerated_kib = med(&d.slab_accelerated_samples_kib);
    progress(&format!(
        "bypassd RSS: idle {} KiB, with {} connections {} KiB; maps {:?}",
        d.rss_idle_kib, plan.conns, d.rss_with_connections_kib, d.maps_memlock_with_connections
    ));
    r.daemon = Some(d);
    Ok(())
}
