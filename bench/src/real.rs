//! Real programs: redis-benchmark against redis-server, wrk against nginx, and a bulk
//! stream, each run on the kernel path and through bypassd in alternation.
//!
//! Unlike the qperf section (two cgroups side by side), the kernel runs here have no
//! bypassd at all: before each kernel run the datapath is detached (`bypassd --detach`),
//! before each bypass run it is attached again, so a kernel figure carries none of
//! bypassd's global costs. Every bypass run must show redirected messages in the
//! counters, or the section fails. Results go to real.json and real.md beside the
//! main results, and the table is printed.
use crate::fixtures::{Counters, Proc, median, run_timeout};
use anyhow::{Context, Result, bail};
use bypass_testsupport::{Daemon, PinDir, TempDir, TestCgroup};
use bypassd_ebpf::abi::Counter;
use serde::Serialize;
use std::{
    collections::BTreeMap,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

/// One workload: how to run it and what it measured (higher is better).
#[derive(Clone, Copy)]
enum Work {
    Redis { test: &'static str, size: u32, pipeline: u32 },
    Wrk { path: &'static str },
    Bulk,
}

impl Work {
    fn name(self) -> String {
        match self {
            Work::Redis { test, size, pipeline } => format!("redis-benchmark {test} {} -P {pipeline}", size_name(size)),
            Work::Wrk { path } => format!("nginx + wrk {path} keep-alive"),
            Work::Bulk => "bulk stream (bypass-traffic, 256 KiB writes)".into(),
        }
    }
    fn unit(self) -> &'static str {
        match self {
            Work::Redis { .. } | Work::Wrk { .. } => "requests/s",
            Work::Bulk => "MiB/s",
        }
    }
    /// What one unit of work is, for CPU time per unit.
    fn op(self) -> &'static str {
        match self {
            Work::Redis { .. } | Work::Wrk { .. } => "request",
            Work::Bulk => "MiB",
        }
    }
}

/// One run's figure (higher is better) and how much work it did (requests, MiB).
struct Run {
    fig: f64,
    units: f64,
}

/// CPU time the cgroup's processes (client and server) have used, in µs.
fn cpu_usec(cg: &TestCgroup) -> Result<u64> {
    let f = cg.path.join("cpu.stat");
    let text = std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
    text.lines()
        .find_map(|l| l.strip_prefix("usage_usec ")?.trim().parse().ok())
        .with_context(|| format!("no usage_usec in {}", f.display()))
}

fn size_name(b: u32) -> String {
    if b >= 1024 { format!("{} KiB", b / 1024) } else { format!("{b} B") }
}

/// Each GET follows the SET of the same size: redis-benchmark without -r uses one key,
/// so a GET returns whatever the last SET stored.
const WORKS: [Work; 11] = [
    Work::Redis { test: "set", size: 64, pipeline: 1 },
    Work::Redis { test: "get", size: 64, pipeline: 1 },
    Work::Redis { test: "set", size: 16384, pipeline: 1 },
    Work::Redis { test: "get", size: 16384, pipeline: 1 },
    Work::Redis { test: "set", size: 64, pipeline: 32 },
    Work::Redis { test: "get", size: 64, pipeline: 32 },
    Work::Redis { test: "set", size: 16384, pipeline: 32 },
    Work::Redis { test: "get", size: 16384, pipeline: 32 },
    Work::Wrk { path: "/1k" },
    Work::Wrk { path: "/256k" },
    Work::Bulk,
];

#[derive(Serialize, Default, Clone)]
pub struct RealPoint {
    pub workload: String,
    pub unit: String,
    pub kernel: Vec<f64>,
    pub bypass: Vec<f64>,
    pub kernel_median: f64,
    pub bypass_median: f64,
    /// bypass / kernel (higher is better).
    pub ratio: f64,
    /// Messages redirected during each bypass run (must all be > 0, except in a run
    /// that `send_mode = "auto"` kept targets-only on purpose).
    pub redirected_msgs: Vec<u64>,
    /// Bypass runs in which no socket became a sender (send_mode auto: a stream, or a
    /// burst per turn, keeps the kernel's send path) and nothing ran sk_msg.
    pub targets_only_runs: usize,
    /// Bypass runs that redirected nothing without that reason (an error).
    #[serde(skip)]
    unexplained: usize,
    /// Share of the bypass runs' bytes that took the redirect.
    pub redirected_share: f64,
    /// Every sk_msg decision of the bypass runs, by counter.
    pub decisions: BTreeMap<String, u64>,
    /// 1-minute load average beside each run (kernel and bypass interleaved).
    pub load: Vec<f64>,
    /// What the CPU figures are per: "request" or "MiB".
    pub op: String,
    /// CPU time (client + server, µs) per request or MiB, for each run.
    pub kernel_cpu: Vec<f64>,
    pub bypass_cpu: Vec<f64>,
    pub kernel_cpu_median: f64,
    pub bypass_cpu_median: f64,
    /// bypass / kernel of the medians (lower is cheaper). Less swayed by where the
    /// scheduler puts client and server than the throughput is.
    pub cpu_ratio: f64,
}

#[derive(Serialize, Default)]
pub struct RealResults {
    pub reps: usize,
    pub points: Vec<RealPoint>,
    pub errors: Vec<String>,
}

pub struct Opts {
    pub short: bool,
    pub reps: usize,
    pub secs: u32,
}

fn load1() -> f64 {
    std::fs::read_to_string("/proc/loadavg").ok().and_then(|s| s.split_whitespace().next()?.parse().ok()).unwrap_or(0.0)
}

fn need(tool: &str) -> Result<()> {
    let found = std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).exists()));
    if !found {
        bail!("{tool} is not installed (bench/deps.sh installs redis-server, redis-tools, nginx-light, wrk)");
    }
    Ok(())
}

/// bypass-traffic (the verified stream): $BYPASS_TRAFFIC_BIN, else next to this executable.
fn traffic_bin() -> Result<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("BYPASS_TRAFFIC_BIN") {
        return Ok(p.into());
    }
    let p = std::env::current_exe()?.parent().context("exe dir")?.join("bypass-traffic");
    if !p.exists() {
        bail!("{} is missing: cargo build --release -p bypass-testkit", p.display());
    }
    Ok(p)
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_port(port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on 127.0.0.1:{port}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// The servers, started once inside the cgroup and used by both modes.
struct Servers {
    _redis: Proc,
    _nginx: Proc,
    redis_port: u16,
    nginx_port: u16,
}

fn start_servers(cg: &TestCgroup, dir: &Path) -> Result<Servers> {
    let redis_port = free_port()?;
    let mut c = cg.command("redis-server");
    c.args(["--port", &redis_port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--protected-mode", "no"])
        .arg("--dir")
        .arg(dir)
        .stdout(std::process::Stdio::null());
    let redis = Proc::spawn(c, "redis-server")?;
    let www = dir.join("www");
    std::fs::create_dir_all(&www)?;
    std::fs::write(www.join("1k"), vec![b'a'; 1024])?;
    std::fs::write(www.join("256k"), vec![b'b'; 256 * 1024])?;
    let nginx_port = free_port()?;
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log;\nevents {{ worker_connections 256; }}\n\
             http {{\n  access_log off;\n  sendfile off;\n  keepalive_requests 1000000;\n  client_body_temp_path {d}/tmp;\n  proxy_temp_path {d}/tmp;\n  \
             fastcgi_temp_path {d}/tmp;\n  uwsgi_temp_path {d}/tmp;\n  scgi_temp_path {d}/tmp;\n  \
             server {{\n    listen 127.0.0.1:{nginx_port};\n    root {w};\n  }}\n}}\n",
            d = dir.display(),
            w = www.display()
        ),
    )?;
    std::fs::create_dir_all(dir.join("tmp"))?;
    let mut c = cg.command("nginx");
    c.arg("-c").arg(&conf).arg("-p").arg(dir);
    let nginx = Proc::spawn(c, "nginx")?;
    wait_port(redis_port)?;
    wait_port(nginx_port)?;
    Ok(Servers { _redis: redis, _nginx: nginx, redis_port, nginx_port })
}

fn number_after(text: &str, key: &str) -> Option<f64> {
    let i = text.find(key)? + key.len();
    text[i..].split_whitespace().next()?.trim_matches(|c: char| !c.is_ascii_digit() && c != '.').parse().ok()
}

/// Run one workload once.
fn run_once(cg: &TestCgroup, s: &Servers, w: Work, o: &Opts) -> Result<Run> {
    match w {
        Work::Redis { test, size, pipeline } => {
            let n = if o.short { 4000 } else { 40000 } * if pipeline > 1 { 8 } else { 1 };
            let mut c = cg.command("redis-benchmark");
            c.args(["-h", "127.0.0.1", "-p", &s.redis_port.to_string(), "-c", "1", "-t", test, "-d", &size.to_string()])
                .args(["-P", &pipeline.to_string(), "-n", &n.to_string(), "--csv"]);
            let out = run_timeout(c, Duration::from_secs(120))?;
            let text = String::from_utf8_lossy(&out.stdout);
            // --csv: "test","rps",...
            let rps = text
                .lines()
                .find(|l| l.to_ascii_lowercase().starts_with(&format!("\"{test}\"")))
                .and_then(|l| l.split(',').nth(1))
                .and_then(|v| v.trim_matches('"').parse().ok())
                .with_context(|| format!("no {test} figure from redis-benchmark: {text}"))?;
            Ok(Run { fig: rps, units: n as f64 })
        }
        Work::Wrk { path } => {
            let mut c = cg.command("wrk");
            c.args(["-t", "1", "-c", "4", "-d", &format!("{}s", o.secs)])
                .arg(format!("http://127.0.0.1:{}{path}", s.nginx_port));
            let out = run_timeout(c, Duration::from_secs(u64::from(o.secs) + 30))?;
            let text = String::from_utf8_lossy(&out.stdout);
            if text.contains("Non-2xx") || text.contains("Socket errors") {
                bail!("wrk saw errors: {text}");
            }
            let fig = number_after(&text, "Requests/sec:").with_context(|| format!("no Requests/sec from wrk: {text}"))?;
            // "  123456 requests in 2.00s, ..."
            let units = text
                .lines()
                .find(|l| l.contains(" requests in "))
                .and_then(|l| l.split_whitespace().next()?.parse().ok())
                .with_context(|| format!("no request count from wrk: {text}"))?;
            Ok(Run { fig, units })
        }
        Work::Bulk => {
            let (bytes, mib) = if o.short { ("256M", 256.0) } else { ("1G", 1024.0) };
            let dir = TempDir::new();
            let pf = dir.path().join("port");
            let mut sv = cg.command(traffic_bin()?);
            sv.args(["serve", "--listen", "127.0.0.1:0", "--count", "1", "--timeout-secs", "120", "--port-file"]).arg(&pf);
            let srv = Proc::spawn(sv, "bypass-traffic serve")?;
            let deadline = Instant::now() + Duration::from_secs(10);
            let port = loop {
                if let Some(p) = std::fs::read_to_string(&pf).ok().and_then(|s| s.trim().parse::<u16>().ok()) {
                    break p;
                }
                if Instant::now() > deadline {
                    bail!("bypass-traffic serve did not start");
                }
                std::thread::sleep(Duration::from_millis(10));
            };
            let mut c = cg.command(traffic_bin()?);
            c.args(["send", "--connect", &format!("127.0.0.1:{port}"), "--bytes", bytes, "--reply-bytes", "0", "--max-write", "262144"]);
            let out = run_timeout(c, Duration::from_secs(120))?;
            drop(srv);
            let text = String::from_utf8_lossy(&out.stdout);
            let line = text.lines().rev().find(|l| l.starts_with('{')).with_context(|| format!("no JSON from bypass-traffic: {text}"))?;
            let v: serde_json::Value = serde_json::from_str(line)?;
            if v["ok"] != serde_json::Value::Bool(true) {
                bail!("bulk stream failed verification: {line}");
            }
            Ok(Run { fig: v["mib_per_sec"].as_f64().context("no mib_per_sec")?, units: mib })
        }
    }
}

/// Attach (start bypassd, which pins the datapath) or detach (stop it, unpin).
struct Switch {
    pins: PinDir,
    daemon: Option<Daemon>,
    config: String,
}

impl Switch {
    fn attach(&mut self) -> Result<()> {
        if self.daemon.is_none() {
            self.daemon = Some(Daemon::start_timed(&crate::fixtures::bypassd_bin()?, &self.config, &[])?.0);
        }
        Ok(())
    }
    fn detach(&mut self) -> Result<()> {
        if let Some(mut d) = self.daemon.take() {
            d.stop();
            let st = Command::new(crate::fixtures::bypassd_bin()?).arg("--config").arg(&d.config).arg("--detach").output()?;
            if !st.status.success() {
                bail!("bypassd --detach failed: {}", String::from_utf8_lossy(&st.stderr));
            }
        }
        if self.pins.path().exists() && std::fs::read_dir(self.pins.path())?.next().is_some() {
            bail!("{} still holds a datapath after detach", self.pins.path().display());
        }
        Ok(())
    }
}

/// Run the section; failures of single workloads are recorded, not fatal.
pub fn run(o: &Opts, out: &Path) -> Result<RealResults> {
    for t in ["redis-server", "redis-benchmark", "nginx", "wrk"] {
        need(t)?;
    }
    let cg = TestCgroup::new();
    let tmp = TempDir::new();
    let state = TempDir::new();
    let pins = PinDir::new();
    let send_mode = crate::bench::env::SEND_MODE.get().map(|m| format!("[datapath]\nsend_mode = \"{m}\"\n\n")).unwrap_or_default();
    let config = format!(
        "[daemon]\npin_dir = \"{}\"\ncgroup = \"{}\"\nstate_dir = \"{}\"\nlog_level = \"info\"\n\n{send_mode}[policy]\ndefault = \"accelerate\"\n",
        pins.path().display(),
        cg.rel,
        state.path().display()
    );
    let mut sw = Switch { pins, daemon: None, config };
    let servers = start_servers(&cg, tmp.path())?;
    let mut res = RealResults { reps: o.reps, ..Default::default() };
    let mut points: Vec<RealPoint> =
        WORKS.iter().map(|w| RealPoint { workload: w.name(), unit: w.unit().into(), op: w.op().into(), ..Default::default() }).collect();
    let mut redirected = vec![0u64; WORKS.len()];
    let mut passed = vec![0u64; WORKS.len()];
    for rep in 0..o.reps {
        // Alternate which mode goes first, so a drifting machine load favours neither.
        let order = if rep % 2 == 0 { [false, true] } else { [true, false] };
        for bypass in order {
            if bypass { sw.attach()? } else { sw.detach()? }
            let counters = if bypass { Some(Counters::open(sw.pins.path())?) } else { None };
            for (i, w) in WORKS.iter().enumerate() {
                crate::fixtures::check_stop()?;
                let before = counters.as_ref().map(|c| c.read()).transpose()?;
                let cpu0 = cpu_usec(&cg)?;
                let run = match run_once(&cg, &servers, *w, o) {
                    Ok(r) => r,
                    Err(e) => {
                        res.errors.push(format!("{} ({}): {e:#}", w.name(), if bypass { "bypass" } else { "kernel" }));
                        continue;
                    }
                };
                let (fig, cpu) = (run.fig, (cpu_usec(&cg)? - cpu0) as f64 / run.units);
                let p = &mut points[i];
                p.load.push(load1());
                if let (Some(c), Some(b)) = (&counters, before) {
                    let d = c.read()?.since(&b);
                    p.redirected_msgs.push(d.get(Counter::RedirectedMsgs));
                    if crate::report::targets_only(&d) {
                        p.targets_only_runs += 1;
                    } else if d.get(Counter::RedirectedMsgs) == 0 {
                        p.unexplained += 1;
                    }
                    redirected[i] += d.get(Counter::RedirectedBytes);
                    passed[i] += d.get(Counter::PassedBytes);
                    for (k, v) in d.to_map() {
                        *p.decisions.entry(k).or_default() += v;
                    }
                    p.bypass.push(fig);
                    p.bypass_cpu.push(cpu);
                } else {
                    p.kernel.push(fig);
                    p.kernel_cpu.push(cpu);
                }
                eprintln!(
                    "[bench] real: rep {rep} {} {}: {fig:.1} {} (load {:.2})",
                    if bypass { "bypass" } else { "kernel" },
                    w.name(),
                    w.unit(),
                    load1()
                );
            }
        }
    }
    sw.detach()?;
    for (i, p) in points.iter_mut().enumerate() {
        let over = |b: f64, k: f64| if k > 0.0 { b / k } else { 0.0 };
        p.kernel_median = median(&p.kernel);
        p.bypass_median = median(&p.bypass);
        p.ratio = over(p.bypass_median, p.kernel_median);
        p.kernel_cpu_median = median(&p.kernel_cpu);
        p.bypass_cpu_median = median(&p.bypass_cpu);
        p.cpu_ratio = over(p.bypass_cpu_median, p.kernel_cpu_median);
        let total = (redirected[i] + passed[i]) as f64;
        p.redirected_share = if total > 0.0 { redirected[i] as f64 / total } else { 0.0 };
        if p.unexplained > 0 {
            res.errors.push(format!("{}: a bypass run redirected nothing ({:?})", p.workload, p.redirected_msgs));
        }
    }
    res.points = points;
    std::fs::write(out.join("real.json"), serde_json::to_string_pretty(&res)? + "\n")?;
    let md = markdown(&res);
    std::fs::write(out.join("real.md"), &md)?;
    println!("{md}");
    Ok(res)
}

pub fn markdown(r: &RealResults) -> String {
    let mut s = String::from(
        "## Real programs (bypass/kernel; kernel runs with bypassd detached, interleaved, medians)\n\n\
         | workload | kernel | bypass | ratio | CPU per op, kernel → bypass | CPU ratio | redirected share | targets-only runs | load (1 min) |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    for p in &r.points {
        let lo = p.load.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = p.load.iter().copied().fold(0.0, f64::max);
        s.push_str(&format!(
            "| {} | {:.0} {u} | {:.0} {u} | **{:.2}** | {:.1} → {:.1} µs/{} | {:.2} | {:.1} % | {} | {lo:.1}–{hi:.1} |\n",
            p.workload,
            p.kernel_median,
            p.bypass_median,
            p.ratio,
            p.kernel_cpu_median,
            p.bypass_cpu_median,
            p.op,
            p.cpu_ratio,
            100.0 * p.redirected_share,
            p.targets_only_runs,
            u = p.unit
        ));
    }
    s.push_str(&format!(
        "\n{} repetitions per mode. CPU per op: the CPU time of the cgroup holding client and server (cpu.stat \
         usage_usec) over the run, per request or MiB; CPU ratio = bypass / kernel of the medians (lower is cheaper). \
         Targets-only runs: with send_mode auto, no socket became a sender (a stream, or \
         more than 64 KiB written per turn), so every send took the kernel's send path by choice.",
        r.reps
    ));
    for e in &r.errors {
        s.push_str(&format!("\n- error: {e}"));
    }
    s.push('\n');
    s
}
