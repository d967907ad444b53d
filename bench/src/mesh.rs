//! Service-mesh topology (issue 11): wrk (pod A) -> Envoy A :15001 -> Envoy B :15006
//! -> nginx (pod B), through Istio's iptables capture, plus a bulk bypass-traffic
//! stream through the same chain. Each point runs without bypassd (datapath
//! detached) and with it, interleaved, and is reported as a ratio.
//! `bypass-bench mesh [--short]`; needs root, wrk, nginx, Envoy (scripts/deps-mesh).
use crate::fixtures::{bypassd_bin, check_stop};
use anyhow::{Context, Result, bail};
use bypass_testsupport::{
    PinDir, TempDir, TestCgroup,
    mesh::{POD_B4, Pods, capture, envoy::Envoy},
};
use bypassd_ebpf::abi::Counter;
use serde::Serialize;
use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

/// One measured point: with and without bypassd (medians over the repetitions).
#[derive(Serialize, Debug, Default, Clone)]
pub struct Point {
    pub name: String,
    pub unit: String,
    pub kernel: f64,
    pub bypass: f64,
    /// bypass / kernel (for latencies lower is better).
    pub ratio: f64,
    pub target: String,
    pub met: bool,
}

#[derive(Debug, Default, Clone, Copy)]
struct Http {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

struct World {
    cg: TestCgroup,
    pins: PinDir,
    dir: TempDir,
    pods: Pods,
    _envoys: Vec<Envoy>,
    _nginx: Child,
}

fn nginx_config(dir: &Path) -> String {
    format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\nuser root;\npid {d}/nginx.pid;\nerror_log {d}/nginx.err warn;\n\
         events {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  sendfile on;\n  keepalive_requests 1000000;\n\
         client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
         server {{ listen 80; listen [::]:80; root {d}/www; }}\n}}\n",
        d = dir.display()
    )
}

impl World {
    fn new() -> Result<World> {
        let cg = TestCgroup::new();
        let pins = PinDir::new();
        let dir = TempDir::new();
        let pods = Pods::new();
        capture::install(&pods.a, capture::Capture::Iptables);
        capture::install(&pods.b, capture::Capture::Iptables);
        let envoys = vec![Envoy::start(&pods.a, &cg, &dir), Envoy::start(&pods.b, &cg, &dir)];
        let www = dir.path().join("www");
        std::fs::create_dir_all(&www)?;
        for (name, size) in [("1k", 1024usize), ("256k", 256 * 1024)] {
            std::fs::write(www.join(name), vec![b'x'; size])?;
        }
        let conf = dir.path().join("nginx.conf");
        std::fs::write(&conf, nginx_config(dir.path()))?;
        let nginx = pods.b.command(Some(&cg), "nginx").arg("-c").arg(&conf).stdout(Stdio::null()).stderr(Stdio::null()).spawn()
            .context("starting nginx (scripts/deps-mesh installs it)")?;
        let w = World { cg, pins, dir, pods, _envoys: envoys, _nginx: nginx };
        w.wait_http()?;
        Ok(w)
    }

    fn wait_http(&self) -> Result<()> {
        for _ in 0..100 {
            if self.wrk("1k", 1, Duration::from_secs(1)).is_ok_and(|h| h.rps > 0.0) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("nginx behind the mesh does not answer: {}", std::fs::read_to_string(self.dir.path().join("nginx.err")).unwrap_or_default())
    }

    fn config(&self) -> String {
        format!(
            "[daemon]\npin_dir = \"{}\"\ncgroup = \"{}\"\nstate_dir = \"{}\"\nlog_level = \"warn\"\n[policy]\ndefault = \"accelerate\"\n",
            self.pins.path().display(),
            self.cg.rel,
            self.dir.path().display()
        )
    }

    /// wrk from pod A to the service in pod B (16 connections, 1 thread).
    fn wrk(&self, file: &str, conns: u32, d: Duration) -> Result<Http> {
        let out = self.pods.a.command(Some(&self.cg), "wrk")
            .args(["-t1", &format!("-c{conns}"), &format!("-d{}s", d.as_secs().max(1)), "--latency"])
            .arg(format!("http://{POD_B4}:80/{file}"))
            .output()
            .context("running wrk (scripts/deps-mesh installs it)")?;
        let s = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || s.contains("Non-2xx") || s.contains("Socket errors") {
            bail!("wrk failed: {s}{}", String::from_utf8_lossy(&out.stderr));
        }
        parse_wrk(&s)
    }

    /// Bulk: one bypass-traffic connection each way through the chain; MiB/s both ways.
    fn bulk(&self, bytes: u64) -> Result<f64> {
        let port_file = self.dir.path().join("bulk.port");
        let _ = std::fs::remove_file(&port_file);
        let traffic = crate::fixtures::bypassd_bin()?.with_file_name("bypass-traffic");
        let mut srv = self.pods.b.command(Some(&self.cg), &traffic)
            .args(["serve", "--listen", "[::]:8080", "--port-file"]).arg(&port_file)
            .stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().context("bypass-traffic serve")?;
        for _ in 0..200 {
            if port_file.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let out = self.pods.a.command(Some(&self.cg), &traffic)
            .args(["send", "--connect", &format!("{POD_B4}:8080"), "--bytes", &bytes.to_string(), "--max-write", "262144"])
            .output().context("bypass-traffic send")?;
        let _ = srv.wait();
        let line = String::from_utf8_lossy(&out.stdout).lines().rev().find(|l| l.starts_with('{')).unwrap_or_default().to_string();
        let v: serde_json::Value = serde_json::from_str(&line).with_context(|| format!("bulk: no report: {line}"))?;
        if v["ok"] != serde_json::Value::Bool(true) {
            bail!("bulk transfer failed: {v}");
        }
        Ok(v["mib_per_sec"].as_f64().unwrap_or(0.0))
    }
}

fn parse_wrk(s: &str) -> Result<Http> {
    let num = |line: &str| -> Option<f64> {
        let v = line.split_whitespace().last()?;
        let (n, unit) = v.find(|c: char| c.is_ascii_alphabetic()).map_or((v, ""), |i| v.split_at(i));
        let n: f64 = n.parse().ok()?;
        Some(match unit {
            "us" => n / 1000.0,
            "ms" => n,
            "s" => n * 1000.0,
            _ => n,
        })
    };
    let find = |prefix: &str| s.lines().map(str::trim).find(|l| l.starts_with(prefix)).and_then(num);
    Ok(Http {
        rps: find("Requests/sec:").context("wrk: no Requests/sec")?,
        p50_ms: find("50%").context("wrk: no 50% latency")?,
        p99_ms: find("99%").context("wrk: no 99% latency")?,
    })
}

/// bypassd for the "with" runs, started without NOTIFY_SOCKET: nobody drains
/// notifications during a measurement, and a full notify queue would block the daemon.
/// Ready when its datapath is pinned and attached.
struct Bypassd(Child);

impl Bypassd {
    fn start(w: &World) -> Result<Bypassd> {
        let cfg = w.dir.path().join("bypassd.toml");
        std::fs::write(&cfg, w.config())?;
        let log = std::fs::File::create(w.dir.path().join("bypassd.log"))?;
        let child = Command::new(bypassd_bin()?).arg("--config").arg(&cfg).env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log).spawn().context("starting bypassd")?;
        let mut d = Bypassd(child);
        for _ in 0..300 {
            if bypassd::datapath::Datapath::open_pinned(w.pins.path()).is_ok_and(|dp| dp.is_attached()) {
                return Ok(d);
            }
            if let Some(st) = d.0.try_wait()? {
                bail!("bypassd exited ({st}): {}", std::fs::read_to_string(w.dir.path().join("bypassd.log")).unwrap_or_default());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("bypassd did not attach within 30 s")
    }

    /// SIGTERM, wait, and detach the datapath so the next "kernel" run has no hooks.
    fn stop(mut self, pins: &Path) -> Result<()> {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        self.0.wait()?;
        bypassd::datapath::detach(pins)?;
        Ok(())
    }
}

impl Drop for Bypassd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

/// Run the mesh section; writes mesh.json and mesh.md to `out`. Ok(false) when a target is missed.
pub fn run(short: bool, out: &Path) -> Result<bool> {
    let w = World::new()?;
    let (reps, secs, bulk_bytes) = if short { (1, 2, 256u64 << 20) } else { (5, 5, 1u64 << 30) };
    let d = Duration::from_secs(secs);
    let mut http: [[Vec<Http>; 2]; 2] = Default::default(); // [size][mode]
    let mut bulk: [Vec<f64>; 2] = Default::default();
    let mut nat_bytes = 0u64;
    let bypassd = bypassd_bin()?;
    eprintln!("mesh: wrk -> Envoy -> Envoy -> nginx, {reps} rep(s) of {secs} s; bypassd {}", bypassd.display());
    for rep in 0..reps {
        // Alternate which mode goes first, so drift (thermal, other load) cancels out.
        let order = if rep % 2 == 0 { [0usize, 1] } else { [1, 0] };
        for mode in order {
            check_stop()?;
            let daemon = if mode == 1 { Some(Bypassd::start(&w)?) } else { None };
            for (i, file) in ["1k", "256k"].iter().enumerate() {
                http[i][mode].push(w.wrk(file, 16, d)?);
            }
            bulk[mode].push(w.bulk(bulk_bytes)?);
            if let Some(dm) = daemon {
                let dp = bypassd::datapath::Datapath::open_pinned(w.pins.path())?;
                nat_bytes += dp.counter(Counter::NatRedirectedBytes)?;
                drop(dp);
                dm.stop(w.pins.path())?;
            }
            eprintln!("mesh: rep {} {} done", rep + 1, if mode == 1 { "bypassd" } else { "kernel" });
        }
    }
    if nat_bytes == 0 {
        bail!("mesh: the bypassd runs redirected nothing through NAT pairs (pairing broken?)");
    }
    let mut points = Vec::new();
    let mut add = |name: &str, unit: &str, k: f64, b: f64, lower_better: bool, want: Option<f64>| {
        let ratio = if k > 0.0 { b / k } else { 0.0 };
        let (target, met) = match (want, lower_better) {
            (Some(t), false) => (format!(">= {t:.2}x"), ratio >= t),
            (Some(t), true) => (format!("<= {t:.2}x"), ratio <= t),
            (None, false) => (">= 1.00x".into(), ratio >= 1.0),
            (None, true) => ("<= 1.00x".into(), ratio <= 1.0),
        };
        points.push(Point { name: name.into(), unit: unit.into(), kernel: k, bypass: b, ratio, target, met });
    };
    for (i, size) in ["1 KiB", "256 KiB"].iter().enumerate() {
        let m = |mode: usize, f: fn(&Http) -> f64| median(http[i][mode].iter().map(f).collect());
        let small = i == 0;
        add(&format!("HTTP {size} requests/s"), "req/s", m(0, |h| h.rps), m(1, |h| h.rps), false, small.then_some(1.2));
        add(&format!("HTTP {size} p50 latency"), "ms", m(0, |h| h.p50_ms), m(1, |h| h.p50_ms), true, None);
        add(&format!("HTTP {size} p99 latency"), "ms", m(0, |h| h.p99_ms), m(1, |h| h.p99_ms), true, small.then_some(0.8));
    }
    add("bulk stream through the chain", "MiB/s", median(bulk[0].clone()), median(bulk[1].clone()), false, Some(1.5));
    let mut md = String::from("# Service mesh: wrk -> Envoy -> Envoy -> nginx (Istio iptables capture)\n\n");
    md += &format!("{reps} repetition(s) of {secs} s, wrk -t1 -c16, interleaved; medians. Bulk: {} MiB each way, one connection.\n\n", bulk_bytes >> 20);
    md += "| point | kernel | bypassd | ratio | target | met |\n|---|---|---|---|---|---|\n";
    for p in &points {
        md += &format!("| {} | {:.3} {u} | {:.3} {u} | {:.2}x | {} | {} |\n", p.name, p.kernel, p.bypass, p.ratio, p.target, if p.met { "yes" } else { "no" }, u = p.unit);
    }
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("mesh.md"), &md)?;
    std::fs::write(out.join("mesh.json"), serde_json::to_string_pretty(&points)?)?;
    println!("{md}");
    Ok(points.iter().all(|p| p.met))
}
