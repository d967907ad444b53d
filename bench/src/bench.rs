//! The run: fixtures, sections, A/B interleaving, verification, output.
mod churn;
mod daemon;
pub(crate) mod env;
mod qperf;
mod unaccel;
mod unix;

use crate::{
    Cli,
    fixtures::{self, check_stop},
    plot,
    report::{self, Results},
};
use anyhow::{Context, Result, bail};
use bypass_testsupport::TempDir;
use env::Env;
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
        ("unaccelerated", unaccel::unaccel_section),
        ("daemon", daemon::daemon_section),
        ("churn", churn::churn_section),
        ("unix", unix::unix_section),
        ("qperf", qperf::qperf_section),
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
    if plan.wants("real") && !fixtures::STOP.load(std::sync::atomic::Ordering::Relaxed) {
        progress("== real programs");
        let o = crate::real::Opts { short: cli.short, reps: cli.reps.unwrap_or(if cli.short { 1 } else { 5 }), secs: plan.secs.max(2) };
        match crate::real::run(&o, &out) {
            Ok(rr) => r.errors.extend(rr.errors.iter().map(|e| format!("real: {e}"))),
            Err(e) => r.errors.push(format!("real: {e:#}")),
        }
    }
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
