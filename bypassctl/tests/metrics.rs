//! The metrics endpoint against a real bypassd on a private system bus, as root:
//! scrapes during a transfer, /healthz across `bypassctl detach`, and 1000 slow
//! clients that must not slow the D-Bus interface down or grow the daemon.
mod common;

use bypass_testsupport as ts;
use common::*;
use std::{
    collections::HashMap,
    io::{Read, Write},
    net::TcpStream,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

const METRICS: &str = "[metrics]\nlisten = \"127.0.0.1:0\"\n";

/// The tests here measure latency: run them one at a time (the transfer one loads the CPUs).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// The port bypassd logged it serves metrics on (the config asks for port 0).
fn metrics_port(w: &World) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = w.daemon.as_ref().expect("daemon").log();
        if let Some(p) = log
            .lines()
            .find_map(|l| l.split("on http://127.0.0.1:").nth(1))
            .and_then(|p| p.trim().parse().ok())
        {
            return p;
        }
        assert!(Instant::now() < deadline, "bypassd logged no metrics address:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// GET `path`: (status code, body).
pub fn get(port: u16, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to metrics");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read response");
    let code = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string();
    (code, body)
}

/// Parse with a Prometheus text parser; every sample line must become a sample.
fn parse(text: &str) -> HashMap<String, f64> {
    let lines: Vec<std::io::Result<String>> = text.lines().map(|l| Ok(l.to_string())).collect();
    let scrape = prometheus_parse::Scrape::parse(lines.into_iter()).expect("metrics text parses");
    let sample_lines = text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).count();
    assert_eq!(scrape.samples.len(), sample_lines, "some lines did not parse:\n{text}");
    assert!(text.trim_end().ends_with("# EOF"), "OpenMetrics text ends with # EOF");
    let mut out = HashMap::new();
    for s in scrape.samples {
        let v = match s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => v,
            _ => continue,
        };
        let mut labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        labels.sort();
        let key = if labels.is_empty() { s.metric } else { format!("{}{{{}}}", s.metric, labels.join(",")) };
        out.insert(key, v);
    }
    out
}

/// Scrape every 50 ms until stopped: (redirected bytes, accelerated sockets) seen.
struct Scraper {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<(f64, f64)>>>,
}

impl Scraper {
    fn start(port: u16) -> Scraper {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut seen = Vec::new();
            while !s.load(Ordering::Relaxed) {
                let m = parse(&get(port, "/metrics").1);
                seen.push((m["bypassd_redirected_bytes_total"], m["bypassd_accelerated_sockets"]));
                std::thread::sleep(Duration::from_millis(50));
            }
            seen
        });
        Scraper { stop, thread: Some(thread) }
    }

    fn finish(mut self) -> Vec<(f64, f64)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().expect("thread").join().expect("scrapes parse")
    }
}

impl Drop for Scraper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[test]
fn scrape_during_a_transfer_counts_it_and_healthz_follows_detach() {
    let _serial = serial();
    let mut w = World::with_config(METRICS);
    let port = metrics_port(&w);
    let cg = w.cgroup.rel.clone();
    w.ok(&["policy", "add", "--action", "accelerate", "--cgroup", &cg]);

    let (code, body) = get(port, "/healthz");
    assert_eq!((code, body.trim()), (200, "ok: attached"));
    let m = parse(&get(port, "/metrics").1);
    assert_eq!(m["bypassd_datapath_state{state=attached}"], 1.0);
    assert_eq!(m["bypassd_policy_rules{source=runtime}"], 1.0);
    assert_eq!(m["bypassd_policy_rules{source=config}"], 1.0);
    assert!(m.keys().any(|k| k.starts_with("bypassd_build_info{abi=")), "{m:?}");

    let scraper = Scraper::start(port);
    let transfers = 4;
    for _ in 0..transfers {
        let mut t = w.cgroup.command(ts::bin("bypass-traffic"));
        t.args(["pair", "--bind", "127.0.0.1", "--bytes", "512M", "--max-write", "262144"]);
        let v = ts::run_json(t);
        assert_eq!(v["ok"], true, "transfer failed: {v}");
    }
    let seen = scraper.finish();
    // Scrapes taken while the bytes flowed saw the counter move more than once.
    let moves = seen.windows(2).filter(|p| p[1].0 > p[0].0).count();
    assert!(moves >= 2, "bypassd_redirected_bytes_total moved {moves} times over {} scrapes: {seen:?}", seen.len());
    assert!(seen.iter().any(|s| s.1 >= 2.0), "no scrape saw the two accelerated sockets: {seen:?}");
    let m = parse(&get(port, "/metrics").1);
    assert!(m["bypassd_sockets_inserted_total"] >= 2.0 * transfers as f64, "{m:?}");
    // The reasons add up to the passed total bypassd counts.
    let reasons: f64 = m.iter().filter(|(k, _)| k.starts_with("bypassd_passed_messages_total{")).map(|(_, v)| v).sum();
    assert_eq!(reasons, stat(&w, "passed_msgs") as f64);

    // The transfers took longer than the notify socket's 10-datagram queue lasts at one
    // STATUS a second, and bypassd's sd_notify send blocks when it is full (see the
    // report): read what queued up, as systemd would.
    let _ = w.daemon().wait_for("(drain)", Duration::from_millis(300));
    // A failed reload is counted, the running state stays healthy.
    let cfg = w.daemon.as_ref().unwrap().config.clone();
    let good = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, format!("{good}\n[daemon]\nbogus = 1\n")).unwrap();
    assert!(!w.ctl(&["reload"]).status.success());
    std::fs::write(&cfg, &good).unwrap();
    w.ok(&["reload"]);
    let m = parse(&get(port, "/metrics").1);
    assert_eq!((m["bypassd_reloads_total"], m["bypassd_reloads_failed_total"]), (2.0, 1.0));

    // Another listen address on reload: applied at restart, said so; the endpoint stays.
    std::fs::write(&cfg, good.replace("127.0.0.1:0", "127.0.0.1:1")).unwrap();
    w.ok(&["reload"]);
    assert!(w.daemon.as_ref().unwrap().log().contains("takes effect when bypassd restarts"));
    assert_eq!(get(port, "/healthz").0, 200);
    std::fs::write(&cfg, &good).unwrap();

    w.ok(&["detach"]);
    let (code, body) = get(port, "/healthz");
    assert_eq!(code, 503, "{body}");
    assert!(body.starts_with("detached: detached on request"), "{body}");
    assert_eq!(body.lines().count(), 1, "one line: {body}");
    let m = parse(&get(port, "/metrics").1);
    assert_eq!(m["bypassd_datapath_state{state=detached}"], 1.0);
    assert_eq!(get(port, "/nope").0, 404);
}

fn stat(w: &World, field: &str) -> u64 {
    w.json(&["stats"])[field].as_u64().unwrap_or_else(|| panic!("stats has no {field}"))
}

fn rss_kib(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("bypassd status");
    s.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse().ok()).expect("VmRSS")
}

fn threads(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count())
}

#[test]
fn thousand_slow_clients_neither_stall_dbus_nor_grow_the_daemon() {
    let _serial = serial();
    let w = World::with_config(METRICS);
    let port = metrics_port(&w);
    let pid = w.daemon.as_ref().unwrap().pid();
    let rss_before = rss_kib(pid);
    let conn = zbus::blocking::connection::Builder::address(w.bus.address().as_str())
        .and_then(|b| b.build())
        .expect("connect to the test bus");
    let proxy = bypassd_api::ManagerProxy::builder(&conn)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .expect("proxy");

    // The slower of one GetStatus and one GetStats.
    let slowest_call = || {
        let t = Instant::now();
        proxy.get_status().expect("GetStatus");
        let status = t.elapsed();
        let t = Instant::now();
        proxy.get_stats().expect("GetStats");
        status.max(t.elapsed())
    };
    // The same calls without slow clients first: what this (shared) machine gives anyway.
    let mut base: Vec<Duration> = Vec::new();
    for _ in 0..30 {
        base.push(slowest_call());
        std::thread::sleep(Duration::from_millis(100));
    }

    // 1000 clients that send half a request line and then one byte a second.
    let mut slow: Vec<TcpStream> = Vec::new();
    for _ in 0..1000 {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(mut s) => {
                let _ = s.write_all(b"GET /metr");
                slow.push(s);
            }
            Err(e) => panic!("connect {}: {e}", slow.len()),
        }
    }
    let mut under: Vec<Duration> = Vec::new();
    let mut max_rss = rss_before;
    let mut max_threads = 0;
    let end = Instant::now() + Duration::from_secs(8);
    while Instant::now() < end {
        for s in slow.iter_mut().take(50) {
            let _ = s.write_all(b"i");
        }
        under.push(slowest_call());
        max_rss = max_rss.max(rss_kib(pid));
        max_threads = max_threads.max(threads(pid));
        std::thread::sleep(Duration::from_millis(100));
    }
    let p90 = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() * 9 / 10]
    };
    let (worst, baseline) = (under.iter().max().copied().unwrap_or_default(), p90(&mut base));
    let loaded = p90(&mut under);
    eprintln!(
        "1000 slow clients: D-Bus p90 {loaded:?}, slowest {worst:?} (without them: p90 {baseline:?}), RSS {rss_before} -> {max_rss} KiB, threads <= {max_threads}"
    );
    // Under 100 ms (90th percentile: single samples on a shared 2-vCPU host are scheduler
    // noise); where plain calls are already slower, no worse than twice without the clients.
    let bound = Duration::from_millis(100).max(baseline * 2);
    assert!(loaded < bound, "D-Bus p90 {loaded:?} with 1000 slow clients ({baseline:?} without)");
    assert!(max_rss < rss_before + 16 * 1024, "RSS grew from {rss_before} to {max_rss} KiB");
    assert!(max_threads < 40, "{max_threads} threads");
    // The slow ones were cut off (deadline or cap), and a well-behaved scrape works again.
    drop(slow);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, _) = get(port, "/healthz");
        if code == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "/healthz did not recover: {code}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
