//! What the benchmark runs on: the bypassd and bypassctl binaries (next to *this*
//! executable, or via `BYPASSD_BIN`, frozen for the run; testsupport's `Daemon` runs
//! them), the datapath's pinned counters, and small process helpers.
use anyhow::{Context, Result, bail};
use aya::maps::{Array, Map, MapData, PerCpuArray};
use bypassd::datapath::pins::{self, PinKind};
use bypassd_ebpf::{abi::Counter, maps};
use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, Output, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

/// Set by SIGINT/SIGTERM; every long loop checks it so the fixtures' Drop guards
/// get to clean up (cgroups, namespaces, pins, servers).
pub static STOP: AtomicBool = AtomicBool::new(false);

pub fn check_stop() -> Result<()> {
    if STOP.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

/// A workspace binary: $<VAR>, else next to this executable (target/<profile>/).
fn workspace_bin(name: &str, var: &str) -> Result<PathBuf> {
    if let Some(dir) = FROZEN.get() {
        return Ok(dir.join(name));
    }
    if let Some(p) = std::env::var_os(var) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let p = exe.parent().context("exe dir")?.join(name);
    if !p.exists() {
        bail!("{} is missing: build it first (cargo build --release -p {name}) or set {var}", p.display());
    }
    Ok(p)
}

static FROZEN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Copy bypassd and bypassctl into `dir` and use those copies from now on.
pub fn freeze_binaries(dir: &Path) -> Result<()> {
    for (name, var) in [("bypassd", "BYPASSD_BIN"), ("bypassctl", "BYPASSCTL_BIN")] {
        let src = workspace_bin(name, var)?;
        std::fs::copy(&src, dir.join(name)).with_context(|| format!("copying {}", src.display()))?;
    }
    let _ = FROZEN.set(dir.to_path_buf());
    Ok(())
}

/// The bypassd binary: $BYPASSD_BIN, else target/<profile>/bypassd.
pub fn bypassd_bin() -> Result<PathBuf> {
    workspace_bin("bypassd", "BYPASSD_BIN")
}

/// The bypassctl binary: $BYPASSCTL_BIN, else target/<profile>/bypassctl.
pub fn bypassctl_bin() -> Result<PathBuf> {
    workspace_bin("bypassctl", "BYPASSCTL_BIN")
}

/// The generation directory bypassd pinned under `pin_dir`.
pub fn gen_dir(pin_dir: &Path) -> Result<PathBuf> {
    pins::current(pin_dir)
}

fn open_pinned(dir: &Path, name: &str) -> Result<Map> {
    let p = pins::map_pin(dir, name);
    let data = MapData::from_pin(&p).with_context(|| format!("opening pinned map {}", p.display()))?;
    Map::from_map_data(data).with_context(|| format!("pinned map {}", p.display()))
}

/// The datapath's per-CPU counters, read from the pins.
pub struct Counters {
    map: PerCpuArray<MapData, u64>,
    control: Array<MapData, u64>,
}

pub use bypass_testsupport::counters::Snap;

impl Counters {
    pub fn open(pin_dir: &Path) -> Result<Counters> {
        let g = gen_dir(pin_dir)?;
        Ok(Counters {
            map: PerCpuArray::try_from(open_pinned(&g, maps::COUNTERS)?)?,
            control: Array::try_from(open_pinned(&g, maps::CONTROL)?)?,
        })
    }

    pub fn read(&self) -> Result<Snap> {
        let mut s = Snap::default();
        for c in Counter::ALL {
            let v = self.map.get(&(c as u32), 0).with_context(|| format!("reading counter {}", c.name()))?;
            s.0[c as usize] = v.iter().copied().fold(0u64, u64::wrapping_add);
        }
        Ok(s)
    }

    /// The policy sequence number: bumps once per policy swap that reached the kernel.
    pub fn policy_seq(&self) -> Result<u64> {
        Ok(self.control.get(&bypassd_ebpf::abi::CTL_POLICY_SEQ, 0)?)
    }
}

/// Kernel memory the pinned maps account (bpftool's bytes_memlock, which on this
/// kernel is the map's actual usage), by map name.
pub fn maps_memlock(pin_dir: &Path) -> Result<BTreeMap<String, u64>> {
    let g = gen_dir(pin_dir)?;
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(&g)? {
        let p = e?.path();
        let name = p.file_name().unwrap_or_default().to_string_lossy().into_owned();
        let Some((PinKind::Map, m)) = pins::classify(&name) else { continue };
        let o = Command::new("bpftool").args(["-j", "map", "show", "pinned"]).arg(&p).output().context("running bpftool")?;
        if !o.status.success() {
            bail!("bpftool map show pinned {}: {}", p.display(), String::from_utf8_lossy(&o.stderr));
        }
        let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
        out.insert(m.to_string(), v["bytes_memlock"].as_u64().unwrap_or(0));
    }
    Ok(out)
}

/// Links of the pinned datapath that are not bound to a cgroup or to the SOCKHASH, as
/// (type, name): they run for sockets anywhere on the host.
pub fn global_hooks(pin_dir: &Path) -> Result<Vec<(String, String)>> {
    let g = gen_dir(pin_dir)?;
    let local = ["sock_ops", "sk_msg", "cgroup_sock", "cgroup_sock_addr", "cgroup_skb", "sk_skb", "cgroup_sockopt"];
    let mut out = Vec::new();
    for e in std::fs::read_dir(&g)? {
        let p = e?.path();
        let name = p.file_name().unwrap_or_default().to_string_lossy().into_owned();
        // Links are what runs: a program pinned without one (an on-demand hook that is
        // off) runs nowhere. Map attachments (sk_msg) are cgroup-scoped anyway.
        let kind = match pins::classify(&name) {
            Some((PinKind::Link, _)) => "link",
            _ => continue,
        };
        let o = Command::new("bpftool").args(["-j", kind, "show", "pinned"]).arg(&p).output()?;
        if !o.status.success() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        let t = v["type"].as_str().unwrap_or("?").to_string();
        if kind == "link" && t == "cgroup" {
            continue;
        }
        if !local.contains(&t.as_str()) {
            out.push((t, name));
        }
    }
    out.sort();
    Ok(out)
}

/// BPF programs on the host that run outside any cgroup (tracing, tracepoints,
/// kprobes, LSM …), as "type name (id)": someone else's may slow every socket.
/// Only attached ones count: a program loaded without a link runs nowhere.
pub fn host_tracing_programs() -> Vec<String> {
    let Ok(o) = Command::new("bpftool").args(["-j", "prog", "show"]).output() else { return Vec::new() };
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    let linked: Vec<u64> = Command::new("bpftool")
        .args(["-j", "link", "show"])
        .output()
        .ok()
        .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
        .and_then(|l| l.as_array().map(|a| a.iter().filter_map(|x| x["prog_id"].as_u64()).collect()))
        .unwrap_or_default();
    let global = ["tracing", "tracepoint", "raw_tracepoint", "kprobe", "perf_event", "lsm", "raw_tracepoint_writable"];
    v.as_array()
        .map(|a| {
            a.iter()
                .filter(|p| global.contains(&p["type"].as_str().unwrap_or("")))
                .filter(|p| p["id"].as_u64().is_some_and(|id| linked.contains(&id)))
                .map(|p| format!("{} {} ({})", p["type"].as_str().unwrap_or("?"), p["name"].as_str().unwrap_or("?"), p["id"]))
                .collect()
        })
        .unwrap_or_default()
}

/// BPF programs effective on a cgroup (own and inherited), as (attach type, name).
pub fn effective_progs(cgroup: &Path) -> Result<Vec<(String, String)>> {
    let o = Command::new("bpftool").args(["-j", "cgroup", "show"]).arg(cgroup).arg("effective").output()?;
    if !o.status.success() {
        bail!("bpftool cgroup show {}: {}", cgroup.display(), String::from_utf8_lossy(&o.stderr));
    }
    let s = String::from_utf8_lossy(&o.stdout);
    if s.trim().is_empty() {
        return Ok(Vec::new());
    }
    let v: serde_json::Value = serde_json::from_str(s.trim())?;
    Ok(v.as_array()
        .map(|a| {
            a.iter()
                .map(|p| {
                    (
                        p["attach_type"].as_str().unwrap_or("?").to_string(),
                        p["name"].as_str().unwrap_or("?").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default())
}

/// A long-running child (qperf server, helper server): killed and reaped on drop.
pub struct Proc {
    pub child: Child,
    pub what: String,
}

impl Proc {
    pub fn spawn(mut cmd: Command, what: &str) -> Result<Proc> {
        let child = cmd.stdin(Stdio::null()).stderr(Stdio::null()).spawn().with_context(|| format!("starting {what}"))?;
        Ok(Proc { child, what: what.to_string() })
    }

    /// Spawn with stdout piped and stdin piped (closing stdin asks helpers to exit).
    pub fn spawn_piped(mut cmd: Command, what: &str) -> Result<(Proc, BufReader<ChildStdout>)> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        let out = BufReader::new(child.stdout.take().context("stdout")?);
        Ok((Proc { child, what: what.to_string() }, out))
    }

    pub fn alive(&mut self) -> Result<()> {
        if let Some(st) = self.child.try_wait()? {
            bail!("{} exited early ({st})", self.what);
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Read one line from a helper's stdout, with a timeout enforced by the helper's own
/// deadline (helpers print promptly or exit).
pub fn read_line(r: &mut BufReader<ChildStdout>) -> Result<String> {
    let mut s = String::new();
    let n = r.read_line(&mut s)?;
    if n == 0 {
        bail!("helper exited without output");
    }
    Ok(s.trim().to_string())
}

/// Run a command to completion, killing it after `timeout`.
pub fn run_timeout(mut cmd: Command, timeout: Duration) -> Result<Output> {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait()?.is_some() {
            return Ok(child.wait_with_output()?);
        }
        if Instant::now() > deadline || STOP.load(Ordering::Relaxed) {
            let _ = child.kill();
            let o = child.wait_with_output()?;
            bail!(
                "{cmd:?} {} after {timeout:?}: {}{}",
                if STOP.load(Ordering::Relaxed) { "interrupted" } else { "timed out" },
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// VmRSS and VmHWM of a process, in KiB.
pub fn rss_kib(pid: i32) -> Result<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let get = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok((get("VmRSS:"), get("VmHWM:")))
}

/// utime + stime of a process, in clock ticks.
pub fn cpu_ticks(pid: i32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) start at ") ".
    let rest = s.rsplit_once(") ").context("bad /proc/PID/stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime 15.
    Ok(f[11].parse::<u64>()? + f[12].parse::<u64>()?)
}

/// CPU time of all of a process's threads in ns (schedstat: finer than clock ticks).
pub fn cpu_ns(pid: i32) -> Result<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let p = e?.path().join("schedstat");
        if let Ok(s) = std::fs::read_to_string(p) {
            total += s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    Ok(total)
}

pub fn clock_ticks_per_sec() -> u64 {
    let v = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if v > 0 { v as u64 } else { 100 }
}

/// A /proc/meminfo field, in KiB.
pub fn meminfo_kib(key: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key) && l[key.len()..].starts_with(':'))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 }
}

pub fn bpf_stats_enabled() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").is_ok_and(|s| s.trim() != "0")
}
