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
use crate::fixtures::Snap;
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
    pub kernel_spread: Spread,
    pub bypass_spread: Spread,
    /// bypass / kernel of each repetition's back-to-back pair.
    pub pair_ratios: Spread,
    /// Every repetition's value, in run order.
    pub kernel_reps: Vec<f64>,
    pub bypass_reps: Vec<f64>,
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

    /// wrk from pod A to the service in pod B (one thread).
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

/// Median, min and max of one point's repetitions.
#[derive(Serialize, Debug, Default, Clone, Copy)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

fn spread(v: &[f64]) -> Spread {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if v.is_empty() { Spread::default() } else { Spread { median: crate::fixtures::median(v), min, max } }
}

/// What the datapath did during one workload of a bypassd run (counter deltas).
#[derive(Serialize, Debug, Default, Clone)]
pub struct HopShare {
    pub workload: String,
    /// Redirected share of each hop's bytes: app <-> sidecar, sidecar <-> sidecar, sidecar <-> app.
    pub hop_share: [f64; 3],
    /// Sends kept on TCP, by reason; `no_peer` = none of the reasons (not paired yet).
    pub passed: std::collections::BTreeMap<String, u64>,
    pub redirected_msgs: u64,
}

/// Per-hop shares from counter deltas. Envoy's tcp_proxy forwards byte for byte, so
/// every hop carries the same bytes: a third of all bytes the datapath saw each.
fn hop_share(workload: &str, d: &Snap) -> HopShare {
    let nat = d.get(Counter::NatRedirectedBytes);
    let local = d.get(Counter::NatLocalRedirectedBytes);
    let plain = d.get(Counter::RedirectedBytes).saturating_sub(nat);
    let per_hop = (d.get(Counter::RedirectedBytes) + d.get(Counter::PassedBytes)) as f64 / 3.0;
    let share = |b: u64| if per_hop > 0.0 { (b as f64 / per_hop).min(1.0) } else { 0.0 };
    let reasons = [
        ("order", Counter::OrderWait),
        ("backpressure", Counter::Backpressure),
        ("not_ready", Counter::NotReady),
        ("coalesced", Counter::Coalesced),
        ("peer_stale", Counter::PeerStale),
        ("splice", Counter::SpliceKept),
    ];
    let mut passed: std::collections::BTreeMap<String, u64> = reasons.iter().map(|(n, c)| (n.to_string(), d.get(*c))).collect();
    let explained: u64 = passed.values().sum();
    passed.insert("no_peer".into(), d.get(Counter::PassedMsgs).saturating_sub(explained));
    HopShare {
        workload: workload.into(),
        hop_share: [share(local), share(nat.saturating_sub(local)), share(plain)],
        passed,
        redirected_msgs: d.get(Counter::RedirectedMsgs),
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")).unwrap_or_default()
}

/// The HTTP workloads: (file, connections, report name). The loaded ones (16 connections
/// on a 2-CPU host) measure throughput and a p99 set mostly by CPU time slices; the one
/// connection measures what the path itself adds to each request.
const HTTP: [(&str, u32, &str); 3] = [("1k", 16, "HTTP 1 KiB"), ("256k", 16, "HTTP 256 KiB"), ("1k", 1, "HTTP 1 KiB, one connection,")];
const WORKLOADS: [&str; 4] = ["1k", "256k", "1k-c1", "bulk"];

/// Run the mesh section; writes mesh.json and mesh.md to `out`. Ok(false) when a target is missed.
pub fn run(short: bool, reps: Option<usize>, out: &Path) -> Result<bool> {
    let w = World::new()?;
    let (default_reps, secs, bulk_bytes) = if short { (3, 2, 256u64 << 20) } else { (5, 5, 1u64 << 30) };
    let reps = reps.unwrap_or(default_reps).max(1);
    let d = Duration::from_secs(secs);
    let mut http: [[Vec<Http>; 2]; 3] = Default::default(); // [HTTP workload][mode]
    let mut bulk: [Vec<f64>; 2] = Default::default();
    let mut seen: [Snap; 4] = Default::default(); // per workload, summed over the bypassd runs
    let bypassd = bypassd_bin()?;
    let load_start = loadavg();
    eprintln!("mesh: wrk -> Envoy -> Envoy -> nginx, {reps} rep(s) of {secs} s; bypassd {}; load {load_start}", bypassd.display());
    for rep in 0..reps {
        // Alternate which mode goes first, so drift (thermal, other load) cancels out.
        let order = if rep % 2 == 0 { [0usize, 1] } else { [1, 0] };
        for mode in order {
            check_stop()?;
            let daemon = if mode == 1 { Some(Bypassd::start(&w)?) } else { None };
            let counters = if mode == 1 { Some(crate::fixtures::Counters::open(w.pins.path())?) } else { None };
            for i in 0..WORKLOADS.len() {
                let before = counters.as_ref().map(|c| c.read()).transpose()?;
                match HTTP.get(i) {
                    Some(&(file, conns, _)) => http[i][mode].push(w.wrk(file, conns, d)?),
                    None => bulk[mode].push(w.bulk(bulk_bytes)?),
                }
                if let (Some(c), Some(b)) = (&counters, before) {
                    seen[i].add(&c.read()?.since(&b));
                }
            }
            drop(counters);
            if let Some(dm) = daemon {
                dm.stop(w.pins.path())?;
            }
            let (h1, bk) = (http[0][mode].last().copied().unwrap_or_default(), bulk[mode].last().copied().unwrap_or_default());
            eprintln!(
                "mesh: rep {} {}: 1 KiB {:.0} req/s p99 {:.2} ms, bulk {bk:.0} MiB/s (load {})",
                rep + 1, if mode == 1 { "bypassd" } else { "kernel" }, h1.rps, h1.p99_ms, loadavg()
            );
        }
    }
    if seen.iter().all(|s| s.get(Counter::NatRedirectedBytes) == 0) {
        bail!("mesh: the bypassd runs redirected nothing through NAT pairs (pairing broken?)");
    }
    let shares: Vec<HopShare> = WORKLOADS.iter().zip(&seen).map(|(n, s)| hop_share(n, s)).collect();
    let mut points = Vec::new();
    let mut add = |name: &str, unit: &str, k: &[f64], b: &[f64], lower_better: bool, want: Option<f64>| {
        let (ks, bs) = (spread(k), spread(b));
        let ratio = if ks.median > 0.0 { bs.median / ks.median } else { 0.0 };
        // Ratios of the repetitions paired in time order (each pair ran back to back).
        let pair: Vec<f64> = k.iter().zip(b).filter(|(k, _)| **k > 0.0).map(|(k, b)| b / k).collect();
        let (target, met) = match (want, lower_better) {
            (Some(t), false) => (format!(">= {t:.2}x"), ratio >= t),
            (Some(t), true) => (format!("<= {t:.2}x"), ratio <= t),
            (None, false) => (">= 1.00x".into(), ratio >= 1.0),
            (None, true) => ("<= 1.00x".into(), ratio <= 1.0),
        };
        points.push(Point { name: name.into(), unit: unit.into(), kernel: ks.median, bypass: bs.median, ratio, target, met, kernel_spread: ks, bypass_spread: bs, pair_ratios: spread(&pair), kernel_reps: k.to_vec(), bypass_reps: b.to_vec() });
    };
    for (i, &(file, conns, name)) in HTTP.iter().enumerate() {
        let v = |mode: usize, f: fn(&Http) -> f64| http[i][mode].iter().map(f).collect::<Vec<_>>();
        let small = file == "1k";
        if conns > 1 {
            add(&format!("{name} requests/s"), "req/s", &v(0, |h| h.rps), &v(1, |h| h.rps), false, small.then_some(1.2));
        }
        add(&format!("{name} p50 latency"), "ms", &v(0, |h| h.p50_ms), &v(1, |h| h.p50_ms), true, None);
        add(&format!("{name} p99 latency"), "ms", &v(0, |h| h.p99_ms), &v(1, |h| h.p99_ms), true, small.then_some(0.8));
    }
    add("bulk stream through the chain", "MiB/s", &bulk[0], &bulk[1], false, Some(1.5));
    let md = report(&points, &shares, reps, secs, bulk_bytes, &load_start);
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("mesh.md"), &md)?;
    let json = serde_json::json!({ "points": points, "hops": shares, "reps": reps, "secs": secs, "load_start": load_start, "load_end": loadavg() });
    std::fs::write(out.join("mesh.json"), serde_json::to_string_pretty(&json)?)?;
    println!("{md}");
    Ok(points.iter().all(|p| p.met))
}

fn report(points: &[Point], shares: &[HopShare], reps: usize, secs: u64, bulk_bytes: u64, load_start: &str) -> String {
    let mut md = String::from("# Service mesh: wrk -> Envoy -> Envoy -> nginx (Istio iptables capture)\n\n");
    md += &format!(
        "{reps} repetition(s) of {secs} s, wrk -t1 -c16 (and -c1 where named), Envoy --concurrency 1 each, nginx 1 worker; kernel and bypassd \
         interleaved (order alternating); medians with [min-max]. Bulk: {} MiB each way, one connection. Load {load_start} -> {}.\n\n",
        bulk_bytes >> 20,
        loadavg()
    );
    md += "| point | kernel | bypassd | ratio | ratio per rep [min-max] | target | met |\n|---|---|---|---|---|---|---|\n";
    for p in points {
        let (k, b, r) = (p.kernel_spread, p.bypass_spread, p.pair_ratios);
        md += &format!(
            "| {} | {:.3} [{:.3}-{:.3}] {u} | {:.3} [{:.3}-{:.3}] {u} | {:.2}x | {:.2}x [{:.2}-{:.2}] | {} | {} |\n",
            p.name, k.median, k.min, k.max, b.median, b.min, b.max, p.ratio, r.median, r.min, r.max, p.target,
            if p.met { "yes" } else { "no" },
            u = p.unit
        );
    }
    md += "\nRedirected share per hop (bypassd runs, summed) and sends kept on TCP by reason:\n\n";
    md += "| workload | app<->sidecar | sidecar<->sidecar | sidecar<->app | redirected msgs | TCP: order | backpressure | not_ready | coalesced | peer_stale | no_peer |\n|---|---|---|---|---|---|---|---|---|---|---|\n";
    for h in shares {
        let g = |k: &str| h.passed.get(k).copied().unwrap_or(0);
        md += &format!(
            "| {} | {:.0} % | {:.0} % | {:.0} % | {} | {} | {} | {} | {} | {} | {} |\n",
            h.workload, h.hop_share[0] * 100.0, h.hop_share[1] * 100.0, h.hop_share[2] * 100.0, h.redirected_msgs,
            g("order"), g("backpressure"), g("not_ready"), g("coalesced"), g("peer_stale"), g("no_peer")
        );
    }
    md
}
