//! `bypassctl stats --watch` in a real terminal (tmux, package tmux) during a
//! transfer, and `--json` lines, against a real bypassd on a private system bus.
mod common;

use bypass_testsupport as ts;
use common::*;
use std::{
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

/// A tmux server of the test's own (`tmux -L NAME`), killed on drop.
struct Tmux(String);

impl Tmux {
    fn cmd(&self) -> Command {
        let mut c = Command::new("tmux");
        c.args(["-L", &self.0, "-f", "/dev/null"]);
        c
    }

    fn capture(&self) -> String {
        let o = self.cmd().args(["capture-pane", "-p", "-t", "watch"]).output().expect("tmux capture-pane");
        text(&o.stdout)
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd().arg("kill-server").output();
    }
}

/// The redirected msgs/s on the screen, if the table is there.
fn redirected_rate(screen: &str) -> Option<f64> {
    screen.lines().find(|l| l.starts_with("redirected"))?.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn stats_watch_under_tmux_shows_changing_rates_during_a_transfer() {
    let w = World::new();
    let cg = w.cgroup.rel.clone();
    w.ok(&["policy", "add", "--action", "accelerate", "--cgroup", &cg]);
    let (k, v) = w.bus.env();
    let tmux = Tmux(ts::unique("bypassctl-watch"));
    let watch = format!("env {k}={v} {} stats --watch --interval 0.3", bypassctl());
    let o = tmux.cmd().args(["new-session", "-d", "-s", "watch", "-x", "100", "-y", "30", &watch]).output().expect("run tmux");
    assert!(o.status.success(), "tmux new-session: {}", describe(&o));

    let stop = AtomicBool::new(false);
    let (screens, transfers) = std::thread::scope(|s| {
        let capture = s.spawn(|| {
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                seen.push(tmux.capture());
                std::thread::sleep(Duration::from_millis(200));
            }
            seen
        });
        let deadline = Instant::now() + Duration::from_secs(4);
        let mut n = 0;
        while Instant::now() < deadline {
            let mut t = w.cgroup.command(ts::bin("bypass-traffic"));
            t.args(["pair", "--bind", "127.0.0.1", "--bytes", "512M", "--max-write", "262144"]);
            let v = ts::run_json(t);
            assert_eq!(v["ok"], true, "transfer failed: {v}");
            n += 1;
        }
        stop.store(true, Ordering::Relaxed);
        (capture.join().expect("captures"), n)
    });
    let rates: Vec<f64> = screens.iter().filter_map(|s| redirected_rate(s)).collect();
    eprintln!("redirected msgs/s on screen during {transfers} transfers: {rates:?}");
    let last = screens.last().cloned().unwrap_or_default();
    assert!(last.contains("accelerated sockets") && last.contains("not_ready"), "no table on the screen:\n{last}");
    let nonzero: Vec<f64> = rates.iter().copied().filter(|r| *r > 0.0).collect();
    let mut distinct = nonzero.clone();
    distinct.dedup();
    assert!(
        distinct.len() >= 2,
        "the screen should show changing non-zero rates during {transfers} transfers; saw {rates:?}\nlast screen:\n{last}"
    );
    // The screen is redrawn in place: one table, not a scrolling log.
    assert_eq!(last.matches("accelerated sockets").count(), 1, "{last}");
}

#[test]
fn stats_watch_json_prints_one_line_per_interval() {
    let w = World::new();
    let o = w.ctl(&["--json", "stats", "--watch", "--interval", "0.2", "--count", "3"]);
    assert!(o.status.success(), "{}", describe(&o));
    let out = text(&o.stdout);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    for l in lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        assert!(v["redirected"]["bytes_per_s"].is_number() && v["accelerated_sockets"].is_u64(), "{v}");
        assert!(v["passed"]["msgs_per_s_by_reason"]["backpressure"].is_number(), "{v}");
        let secs = v["interval_s"].as_f64().unwrap();
        assert!((0.15..1.0).contains(&secs), "{v}");
    }
    let bad = w.ctl(&["stats", "--interval", "1"]);
    assert!(!bad.status.success(), "--interval needs --watch");
}
