//! `bypassctl stats --watch`: rates between two reads of the counters, redrawn in
//! place (ANSI clear + home, no curses: fine in tmux and over ssh), or one JSON
//! line per interval with `--json`.
use crate::{Result, classify};
use bypassd_api::ManagerProxy;
use serde_json::{Value, json};
use std::{
    collections::HashMap,
    io::Write,
    time::{Duration, Instant},
};

/// Why a send of an accelerated socket took the kernel path, and its counter.
/// `no_peer` has no counter: it is what the others leave of `passed_msgs`.
const REASONS: [(&str, Option<&str>); 5] = [
    ("no_peer", None),
    ("order", Some("order_wait_msgs")),
    ("backpressure", Some("backpressure_msgs")),
    ("not_ready", Some("not_ready_msgs")),
    ("splice", Some("splice_kept_msgs")),
];

struct Sample {
    at: Instant,
    counters: HashMap<String, u64>,
}

fn sample(p: &ManagerProxy) -> Result<(Sample, u64)> {
    let stats = p.get_stats().map_err(|e| classify(e, "stats"))?;
    let conns = p.list_connections().map_err(|e| classify(e, "connections"))?;
    let sockets = conns.iter().map(|c| if c.paired { 2 } else { 1 }).sum();
    Ok((Sample { at: Instant::now(), counters: stats.into_iter().collect() }, sockets))
}

/// Per-second rates from `a` to `b`; a counter that went down (a new datapath) counts from 0.
fn rates(a: &Sample, b: &Sample, sockets: u64) -> Value {
    let secs = b.at.duration_since(a.at).as_secs_f64().max(1e-3);
    let get = |s: &Sample, k: &str| s.counters.get(k).copied().unwrap_or(0);
    let delta = |k: &str| {
        let (x, y) = (get(a, k), get(b, k));
        if y >= x { y - x } else { y }
    };
    let rate = |n: u64| (n as f64 / secs * 10.0).round() / 10.0;
    let passed = delta("passed_msgs");
    let explained: u64 = REASONS.iter().filter_map(|(_, k)| *k).map(delta).sum();
    let by_reason: serde_json::Map<String, Value> = REASONS
        .iter()
        .map(|(r, k)| (r.to_string(), json!(rate(k.map_or(passed.saturating_sub(explained), delta)))))
        .collect();
    json!({
        "interval_s": (secs * 1000.0).round() / 1000.0,
        "accelerated_sockets": sockets,
        "redirected": { "msgs_per_s": rate(delta("redirected_msgs")), "bytes_per_s": rate(delta("redirected_bytes")) },
        "passed": {
            "msgs_per_s": rate(passed),
            "bytes_per_s": rate(delta("passed_bytes")),
            "msgs_per_s_by_reason": Value::Object(by_reason),
        },
        "sockets_inserted_per_s": rate(delta("sockets_inserted")),
        "insert_failures_per_s": rate(delta("insert_failures")),
    })
}

fn human_bytes(b: f64) -> String {
    let units = ["B/s", "KB/s", "MB/s", "GB/s"];
    let (mut v, mut u) = (b, 0);
    while v >= 1000.0 && u < units.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    format!("{v:.1} {}", units[u])
}

fn screen(r: &Value, interval: f64) -> String {
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    let mut s = String::from("\x1b[H\x1b[2J");
    s += &format!("bypassd stats: rates over {:.1} s (every {interval} s; Ctrl-C stops)\n\n", f(&r["interval_s"]));
    s += &format!("accelerated sockets  {}\n\n", r["accelerated_sockets"]);
    s += &format!("{:<22} {:>14} {:>14}\n", "", "msgs/s", "bytes/s");
    for (name, k) in [("redirected", "redirected"), ("passed (kernel path)", "passed")] {
        s += &format!("{name:<22} {:>14.1} {:>14}\n", f(&r[k]["msgs_per_s"]), human_bytes(f(&r[k]["bytes_per_s"])));
    }
    for (reason, _) in REASONS {
        s += &format!("  {reason:<20} {:>14.1} {:>14}\n", f(&r["passed"]["msgs_per_s_by_reason"][reason]), "-");
    }
    s += &format!(
        "\nsockets inserted/s {:.1}   insert failures/s {:.1}\n",
        f(&r["sockets_inserted_per_s"]),
        f(&r["insert_failures_per_s"])
    );
    s
}

/// Refresh every `interval` seconds, `count` times (None: until interrupted).
pub fn run(p: &ManagerProxy, json: bool, interval: f64, count: Option<u64>) -> Result<()> {
    let period = Duration::from_secs_f64(interval);
    let (mut prev, _) = sample(p)?;
    let mut n = 0;
    while count.is_none_or(|c| n < c) {
        std::thread::sleep(period.saturating_sub(prev.at.elapsed()));
        let (now, sockets) = sample(p)?;
        let r = rates(&prev, &now, sockets);
        let mut out = std::io::stdout().lock();
        let text = if json { format!("{r}\n") } else { screen(&r, interval) };
        // A closed pipe (`| head`) ends the watch quietly.
        if out.write_all(text.as_bytes()).and_then(|_| out.flush()).is_err() {
            return Ok(());
        }
        prev = now;
        n += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(at: Instant, kv: &[(&str, u64)]) -> Sample {
        Sample { at, counters: kv.iter().map(|(k, v)| (k.to_string(), *v)).collect() }
    }

    #[test]
    fn rates_per_second_and_reasons_add_up() {
        let t = Instant::now();
        let a = s(t, &[("redirected_bytes", 1000), ("passed_msgs", 10), ("order_wait_msgs", 2)]);
        let b = s(t + Duration::from_secs(2), &[("redirected_bytes", 5000), ("passed_msgs", 30), ("order_wait_msgs", 6)]);
        let r = rates(&a, &b, 4);
        assert_eq!(r["redirected"]["bytes_per_s"], 2000.0);
        assert_eq!(r["passed"]["msgs_per_s"], 10.0);
        assert_eq!(r["passed"]["msgs_per_s_by_reason"]["order"], 2.0);
        assert_eq!(r["passed"]["msgs_per_s_by_reason"]["no_peer"], 8.0);
        assert_eq!(r["accelerated_sockets"], 4);
        let text = screen(&r, 2.0);
        assert!(text.starts_with("\x1b[H\x1b[2J") && text.contains("2.0 KB/s"), "{text}");
        // A new datapath restarts its counters: no negative rates.
        let c = s(t + Duration::from_secs(3), &[("redirected_bytes", 100)]);
        assert_eq!(rates(&b, &c, 0)["redirected"]["bytes_per_s"], 100.0);
    }
}
