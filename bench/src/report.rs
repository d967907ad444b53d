//! Everything the benchmark measured, as JSON and as a Markdown report.
use crate::fixtures::{Snap, median};
use bypassd_ebpf::abi::Counter;
use serde::{Deserialize, Deserializer, Serialize};
use std::{collections::BTreeMap, fmt::Write};

mod markdown;

#[derive(Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Machine {
    pub kernel: String,
    pub cpus: usize,
    pub cpu_model: String,
    #[serde(deserialize_with = "nan_or")]
    pub mem_gib: f64,
    pub os: String,
    pub qperf: String,
    pub commit: String,
}

#[derive(Serialize, Deserialize, Default)]
#[serde(default)]
pub struct RunInfo {
    pub command: String,
    pub mode: String,
    pub reps: usize,
    pub secs_per_point: u32,
    pub sizes: Vec<u32>,
    pub pinned_cpu: usize,
    pub started_unix: u64,
    /// The host's 1-minute load average, sampled every ~10 s of the run (the benchmark
    /// itself keeps about 1-2 of the CPUs busy; more means someone else was running).
    pub load_avg_1min: Vec<f64>,
    #[serde(deserialize_with = "nan_or")]
    pub duration_secs: f64,
}

/// One qperf point: the same test in the accelerated and the plain cgroup.
#[derive(Serialize, Deserialize)]
pub struct Point {
    pub topology: String,
    /// tcp_lat, tcp_lat_pinned or tcp_bw.
    pub test: String,
    pub size: u32,
    /// "us" (one-way latency, lower is better) or "MB/s" (higher is better).
    pub unit: String,
    pub kernel: Vec<f64>,
    pub bypass: Vec<f64>,
    #[serde(deserialize_with = "nan_or")]
    pub kernel_median: f64,
    #[serde(deserialize_with = "nan_or")]
    pub bypass_median: f64,
    /// bypass / kernel.
    #[serde(deserialize_with = "nan_or")]
    pub ratio: f64,
    /// Datapath counter deltas summed over the bypass runs.
    pub bypass_counters: Snap,
    /// Datapath counter deltas summed over the kernel runs (must be all zero).
    pub kernel_counters: Snap,
    /// The bypass runs were redirected (redirected_msgs grew, passed_msgs small) and
    /// the kernel runs left the datapath alone.
    pub verified: bool,
    /// write() calls by the qperf sender, summed over the runs (tcp_bw; -vvs).
    pub kernel_send_msgs: u64,
    pub bypass_send_msgs: u64,
    /// TCP segments sent from the client's namespace, summed over the runs (veth only:
    /// the namespace is the benchmark's own, so nothing else is counted).
    pub kernel_out_segs: u64,
    pub bypass_out_segs: u64,
}

impl Point {
    pub fn new(topology: &str, test: &str, size: u32) -> Point {
        Point {
            topology: topology.into(),
            test: test.into(),
            size,
            unit: if test.starts_with("tcp_bw") { "MB/s".into() } else { "us".into() },
            kernel: Vec::new(),
            bypass: Vec::new(),
            kernel_median: f64::NAN,
            bypass_median: f64::NAN,
            ratio: f64::NAN,
            bypass_counters: Snap::default(),
            kernel_counters: Snap::default(),
            verified: false,
            kernel_send_msgs: 0,
            bypass_send_msgs: 0,
            kernel_out_segs: 0,
            bypass_out_segs: 0,
        }
    }
    pub fn finish(&mut self) {
        self.kernel_median = median(&self.kernel);
        self.bypass_median = median(&self.bypass);
        self.ratio = self.bypass_median / self.kernel_median;
        self.verified = redirect_ok(&self.bypass_counters) && self.kernel_counters.is_zero();
    }
}

/// The bypass run really used the datapath: messages were redirected, and every message
/// that took the kernel path did so for a counted safety reason (order, backpressure,
/// a receiver that has not read yet, splice), never because the peers failed to pair.
/// 16 messages of slack cover qperf's control exchange. Or, with `send_mode` auto,
/// the sockets were accelerated as redirect targets only, by choice: no socket became a
/// sender, so no send ran sk_msg (see targets_only).
pub fn redirect_ok(c: &Snap) -> bool {
    let r = c.get(Counter::RedirectedMsgs);
    let p = c.get(Counter::PassedMsgs);
    (r > 0 && p <= safety_reasons(c) + (r / 100).max(16)) || targets_only(c)
}

/// Both sockets were inserted, neither became a sender, nothing ran sk_msg: a stream
/// that `send_mode = "auto"` keeps on the kernel's send path on purpose.
pub fn targets_only(c: &Snap) -> bool {
    c.get(Counter::SocketsInserted) >= 2
        && c.get(Counter::SenderAtInsert) + c.get(Counter::SenderPromoted) == 0
        && c.get(Counter::RedirectedMsgs) + c.get(Counter::PassedMsgs) == 0
}

/// Redirected bytes / all bytes the datapath saw (redirected + passed).
pub fn redirected_share(c: &Snap) -> f64 {
    let r = c.get(Counter::RedirectedBytes) as f64;
    let p = c.get(Counter::PassedBytes) as f64;
    if r + p == 0.0 { f64::NAN } else { r / (r + p) }
}

fn share(v: f64) -> String {
    if v.is_nan() { "–".into() } else { format!("{:.1} %", v * 100.0) }
}

/// Messages the safety rules (or the adaptive coalescing rule) kept on the kernel path.
pub fn safety_reasons(c: &Snap) -> u64 {
    [Counter::OrderWait, Counter::Backpressure, Counter::NotReady, Counter::SpliceKept, Counter::Coalesced]
        .iter()
        .map(|&k| c.get(k))
        .sum()
}

#[derive(Serialize, Deserialize)]
pub struct UnixPoint {
    /// lat, lat_pinned or bw.
    pub test: String,
    pub size: u32,
    pub unit: String,
    pub samples: Vec<f64>,
    #[serde(deserialize_with = "nan_or")]
    pub median: f64,
}

#[derive(Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Churn {
    pub topology: String,
    pub kernel: Vec<f64>,
    pub bypass: Vec<f64>,
    #[serde(deserialize_with = "nan_or")]
    pub kernel_median: f64,
    #[serde(deserialize_with = "nan_or")]
    pub bypass_median: f64,
    /// bypass / kernel connections per second.
    #[serde(deserialize_with = "nan_or")]
    pub ratio: f64,
    /// 1 - ratio.
    #[serde(deserialize_with = "nan_or")]
    pub cost: f64,
    pub bypass_connections: u64,
    pub bypass_counters: Snap,
    pub kernel_counters: Snap,
    pub verified: bool,
}

/// Traffic the policy keeps on the kernel path, in the hooked cgroup, against the
/// same traffic in a cgroup without hooks.
#[derive(Serialize, Deserialize)]
pub struct UnaccelPoint {
    pub test: String,
    pub size: u32,
    pub unit: String,
    pub hooks: Vec<f64>,
    pub no_hooks: Vec<f64>,
    #[serde(deserialize_with = "nan_or")]
    pub hooks_median: f64,
    #[serde(deserialize_with = "nan_or")]
    pub no_hooks_median: f64,
    /// How much worse with the hooks, as a fraction (negative: better).
    #[serde(deserialize_with = "nan_or")]
    pub cost: f64,
    pub hooks_counters: Snap,
    pub verified: bool,
}

#[derive(Serialize, Deserialize, Default)]
#[serde(default)]
pub struct DaemonFigures {
    /// Spawn to READY=1 with an empty pin directory (loads and attaches the datapath).
    pub cold_start_ms: Vec<f64>,
    #[serde(deserialize_with = "nan_or")]
    pub cold_start_ms_median: f64,
    /// Spawn to READY=1 when the pins are already there (restart, adopt).
    pub restart_ms: Vec<f64>,
    #[serde(deserialize_with = "nan_or")]
    pub restart_ms_median: f64,
    /// How the policy edit was delivered.
    pub policy_edit_method: String,
    pub policy_edit_ms: Vec<f64>,
    #[serde(deserialize_with = "nan_or")]
    pub policy_edit_ms_median: f64,
    /// Every edit advanced the kernel's policy sequence number (it reached the datapath).
    pub policy_edit_reached_kernel: bool,
    /// The same kind of edit made in the config file and applied with SIGHUP
    /// (kill → RELOADING=1 → READY=1 on NOTIFY_SOCKET).
    pub reload_ms: Vec<f64>,
    #[serde(deserialize_with = "nan_or")]
    pub reload_ms_median: f64,
    pub reload_reached_kernel: bool,
    #[serde(deserialize_with = "nan_or")]
    pub idle_cpu_secs: f64,
    /// CPU time (utime+stime from /proc/PID/stat) over the idle window, as % of one CPU.
    #[serde(deserialize_with = "nan_or")]
    pub idle_cpu_percent: f64,
    /// The same from /proc/PID/task/*/schedstat (ns resolution).
    #[serde(deserialize_with = "nan_or")]
    pub idle_cpu_percent_schedstat: f64,
    pub rss_idle_kib: u64,
    pub connections: usize,
    pub rss_with_connections_kib: u64,
    pub hwm_with_connections_kib: u64,
    pub sockets_in_map: u64,
    pub connections_redirected: bool,
    pub maps_memlock_idle: BTreeMap<String, u64>,
    pub maps_memlock_with_connections: BTreeMap<String, u64>,
    /// /proc/meminfo Slab growth with N plain connections and with N accelerated ones
    /// (medians over the rounds; host-wide, so other activity on the host adds noise).
    pub slab_plain_kib: i64,
    pub slab_accelerated_kib: i64,
    pub slab_plain_samples_kib: Vec<i64>,
    pub slab_accelerated_samples_kib: Vec<i64>,
}

#[derive(Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Verification {
    /// Programs effective on the accelerated cgroup (attach type, name).
    pub bypass_cgroup_programs: Vec<(String, String)>,
    /// Programs effective on the kernel-path cgroup: must hold no socket hooks.
    pub kernel_cgroup_programs: Vec<(String, String)>,
    pub ok: bool,
}

#[derive(Serialize, Deserialize)]
pub struct Target {
    pub name: String,
    pub target: String,
    pub measured: String,
    pub pass: bool,
    /// The run-to-run noise is larger than the effect the target bounds: the
    /// measurement can neither confirm nor refute it.
    #[serde(default)]
    pub inconclusive: bool,
    /// False for rows shown for information only.
    pub judged: bool,
}

#[derive(Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Results {
    pub machine: Machine,
    pub run: RunInfo,
    pub verification: Verification,
    pub qperf: Vec<Point>,
    pub unix: Vec<UnixPoint>,
    pub churn: Option<Churn>,
    pub unaccelerated: Vec<UnaccelPoint>,
    pub daemon: Option<DaemonFigures>,
    pub targets: Vec<Target>,
    pub errors: Vec<String>,
    /// bypassd's programs that are not bound to its cgroup (tracepoints, kprobes …):
    /// they run for every socket on the host, so the "kernel" runs in the other
    /// cgroup pay for them too; the unaccelerated section measures their cost.
    pub global_hooks: Option<Vec<(String, String)>>,
    /// Tracing-type BPF programs loaded on the host (by anyone) at the start and at the
    /// end of the run: they run for every socket, on both sides of every comparison.
    pub host_tracing_programs_start: Vec<String>,
    pub host_tracing_programs_end: Vec<String>,
    /// kernel.bpf_stats_enabled at the start and the end: when on, every BPF program
    /// run (sk_msg per message, too) also reads the clock twice.
    pub bpf_stats_enabled: (bool, bool),
}

/// serde_json writes NaN (a figure that could not be measured) as null.
fn nan_or<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

pub fn size_label(s: u32) -> String {
    if s >= 1024 && s.is_multiple_of(1024) { format!("{} KB", s / 1024) } else { format!("{s} B") }
}

/// Interquartile range over the median.
fn iqr_rel(v: &[f64]) -> f64 {
    if v.len() < 2 {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| {
        let x = p * (s.len() - 1) as f64;
        let (i, f) = (x.floor() as usize, x - x.floor());
        s[i] + (s[(i + 1).min(s.len() - 1)] - s[i]) * f
    };
    (q(0.75) - q(0.25)) / median(v)
}

fn f(v: f64) -> String {
    if v.is_nan() {
        "–".into()
    } else if v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else if v.abs() >= 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn ratio(v: f64) -> String {
    if v.is_nan() { "–".into() } else { format!("{v:.2}") }
}

fn pct(v: f64) -> String {
    if v.is_nan() { "–".into() } else { format!("{:+.1} %", v * 100.0) }
}

/// Issue 10's churn target: at most this share fewer connections/s than the kernel.
const CHURN_MAX_COST: f64 = 0.05;

impl Results {
    pub fn point(&self, topo: &str, test: &str, size: u32) -> Option<&Point> {
        self.qperf.iter().find(|p| p.topology == topo && p.test == test && p.size == size)
    }

    fn unix(&self, test: &str, size: u32) -> Option<&UnixPoint> {
        self.unix.iter().find(|p| p.test == test && p.size == size)
    }

    /// Judge the targets against what was measured.
    pub fn evaluate(&mut self) {
        let mut t = Vec::new();
        let sizes = self.run.sizes.clone();
        for topo in ["loopback", "veth"] {
            for (test, judged) in [("tcp_lat_pinned", true), ("tcp_lat", false)] {
                let pts: Vec<&Point> = sizes.iter().filter_map(|s| self.point(topo, test, *s)).collect();
                if pts.is_empty() {
                    continue;
                }
                let worst = pts.iter().max_by(|a, b| a.ratio.total_cmp(&b.ratio)).unwrap();
                let misses: Vec<String> = pts.iter().filter(|p| p.ratio.is_nan() || p.ratio > 0.6).map(|p| size_label(p.size)).collect();
                t.push(Target {
                    name: format!(
                        "Latency {topo}, {}, every size",
                        if test == "tcp_lat_pinned" { "pinned" } else { "unpinned (information)" }
                    ),
                    target: "bypass/kernel ≤ 0.60".into(),
                    measured: format!(
                        "worst {:.3} at {}{}",
                        worst.ratio,
                        size_label(worst.size),
                        if misses.is_empty() { String::new() } else { format!("; over at {}", misses.join(", ")) }
                    ),
                    pass: misses.is_empty(),
                    inconclusive: false,
                    judged,
                });
            }
        }
        let veth: Vec<&Point> =
            sizes.iter().filter(|s| **s >= 1024).filter_map(|s| self.point("veth", "tcp_bw", *s)).collect();
        if !veth.is_empty() {
            let worst = veth.iter().min_by(|a, b| a.ratio.total_cmp(&b.ratio)).unwrap();
            t.push(Target {
                name: "Bandwidth veth, ≥ 1 KB".into(),
                target: "bypass/kernel ≥ 3.0".into(),
                measured: format!("worst {:.3} at {}", worst.ratio, size_label(worst.size)),
                pass: veth.iter().all(|p| p.ratio >= 3.0),
                inconclusive: false,
                judged: true,
            });
        }
        if let Some(p) = self.point("loopback", "tcp_bw", 16384) {
            t.push(Target {
                name: "Bandwidth loopback, 16 KB".into(),
                target: "bypass/kernel ≥ 1.0".into(),
                measured: format!("{:.3}", p.ratio),
                pass: p.ratio >= 1.0,
                inconclusive: false,
                judged: true,
            });
        }
        if let Some(c) = &self.churn {
            t.push(Target {
                name: "Connection churn cost".into(),
                target: format!("≤ {:.0} % fewer connections/s", CHURN_MAX_COST * 100.0),
                measured: format!("{} ({} vs {} conn/s)", pct(c.cost), f(c.bypass_median), f(c.kernel_median)),
                pass: c.cost <= CHURN_MAX_COST,
                inconclusive: false,
                judged: true,
            });
        }
        if !self.unaccelerated.is_empty() {
            let worst = self.unaccelerated.iter().max_by(|a, b| a.cost.total_cmp(&b.cost)).unwrap();
            // Run-to-run noise per point: the larger relative interquartile range of the
            // two sides. A cost above the bound and above its noise is real (MISS); a
            // point whose noise exceeds the bound, or whose "cost" is a gain beyond its
            // noise (hooks cannot make traffic faster), cannot be judged.
            let noise_of = |u: &UnaccelPoint| iqr_rel(&u.no_hooks).max(iqr_rel(&u.hooks));
            let noise = self.unaccelerated.iter().map(noise_of).fold(0.0f64, f64::max);
            let real_miss = self.unaccelerated.iter().any(|u| u.cost > 0.02 && u.cost > noise_of(u));
            let unjudgeable = self.unaccelerated.iter().any(|u| noise_of(u) > 0.02 || (u.cost < -0.02 && -u.cost > noise_of(u)) || (u.cost > 0.02 && u.cost <= noise_of(u)));
            t.push(Target {
                name: "Cost to unaccelerated traffic".into(),
                target: "≤ 2 % at every measured point".into(),
                measured: format!(
                    "worst {} ({} {}); {}; run-to-run noise (IQR) up to {:.1} %",
                    pct(worst.cost),
                    worst.test,
                    size_label(worst.size),
                    self.unaccelerated
                        .iter()
                        .map(|u| format!("{} {}: {}", u.test, size_label(u.size), pct(u.cost)))
                        .collect::<Vec<_>>()
                        .join(", "),
                    noise * 100.0
                ),
                pass: !real_miss && self.unaccelerated.iter().all(|u| u.cost <= 0.02),
                inconclusive: !real_miss && unjudgeable,
                judged: true,
            });
        }
        let all_verified = self.qperf.iter().all(|p| p.verified)
            && self.churn.as_ref().is_none_or(|c| c.verified)
            && self.unaccelerated.iter().all(|u| u.verified)
            && (self.verification.ok || (self.qperf.is_empty() && self.churn.is_none()));
        t.push(Target {
            name: "Bypass runs redirected, kernel runs untouched".into(),
            target: "every run".into(),
            measured: if all_verified { "yes (counters below)".into() } else { "NO — see the counters table".into() },
            pass: all_verified,
            inconclusive: false,
            judged: true,
        });
        self.targets = t;
    }
}
