//! Root tests of the redirect window (ebpf/bpf/window.h, docs/datapath-safety.md):
//! 1. a bulk stream whose reader keeps up grows its receiver's window beyond queue_cap
//!    and keeps nearly all of its bytes on the redirect path (issue 10, target 3: with a
//!    fixed 4 MiB bound, 30-62 % were redirected here, because every time the reader
//!    fell 4 MiB behind, the order rule then held the stream on TCP for megabytes);
//! 2. a reader that kept up and then stalls is still bounded: by the grown window, which
//!    never exceeds what TCP's receive autotuning may give it (tcp_rmem[2]).
//!
//! Needs root and python3 (scripts/deps-safety). Each test has its own cgroup, pin
//! directory and daemon, removed on drop.
use bypass_testsupport::{Daemon, Sandbox, run_json};
use bypassd::datapath::Datapath;
use bypassd_ebpf::abi::Counter;
use serde_json::Value;
use std::path::Path;

const MIB: u64 = 1 << 20;
/// The shipped default of [datapath] queue_cap: the window before a reader proves its pace.
const DEFAULT_CAP: u64 = 4 * MIB;
/// As in safety.rs: one message over the bound, one racing a publication, and plain
/// TCP's own buffers.
const SLACK: u64 = 12 * MIB;

/// One test at a time: the memory figures come from host-global counters.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn accelerate_all(sb: &Sandbox) -> Daemon {
    Daemon::start(&sb.config("[datapath]\n[policy]\ndefault = \"accelerate\"\n")).expect("start bypassd")
}

fn counter(sb: &Sandbox, c: Counter) -> u64 {
    Datapath::open_pinned(sb.pins.path()).and_then(|d| d.counter(c)).expect("read counters")
}

fn counters(sb: &Sandbox) -> String {
    let d = Datapath::open_pinned(sb.pins.path()).expect("open datapath");
    d.counters().expect("counters").iter().filter(|(_, v)| *v != 0).map(|(c, v)| format!("{}={v}", c.name())).collect::<Vec<_>>().join(" ")
}

/// tcp_rmem[2] of this network namespace: the most TCP autotuning gives a receiver.
fn tcp_rmem_max() -> u64 {
    let s = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_rmem").expect("read tcp_rmem");
    s.split_whitespace().nth(2).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("bad tcp_rmem: {s}"))
}

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("no {k} in {v}"))
}

#[test]
fn bulk_stream_whose_reader_keeps_up_stays_redirected() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let sb = Sandbox::new();
    let _d = accelerate_all(&sb);
    let dir = bypass_testsupport::TempDir::new();
    let pf = dir.path().join("port");
    let mut s = sb.traffic();
    s.args(["serve", "--listen", "127.0.0.1:0", "--count", "1", "--timeout-secs", "120", "--port-file"]).arg(&pf);
    let srv = s.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().expect("spawn serve");
    let port = bypass_testsupport::wait_port_file(&pf, std::time::Duration::from_secs(10));
    let mut c = sb.traffic();
    c.args(["send", "--connect", &format!("127.0.0.1:{port}"), "--bytes", "1G", "--reply-bytes", "0", "--max-write", "262144"]);
    let v = run_json(c);
    let sv = bypass_testsupport::traffic_report(srv);
    assert_eq!(v["ok"], Value::Bool(true), "{v}");
    assert_eq!(sv["ok"], Value::Bool(true), "{sv}");
    let redirected = counter(&sb, Counter::RedirectedBytes);
    let passed = counter(&sb, Counter::PassedBytes);
    let share = redirected as f64 / (redirected + passed).max(1) as f64;
    eprintln!("bulk share {:.1} %: {}", 100.0 * share, counters(&sb));
    // The reader read whole windows fast, so its window grew beyond queue_cap, and the
    // stream seldom left the redirect path: every backpressure refusal starts a TCP
    // detour that the order rule keeps until the reader has read everything. With a
    // fixed 4 MiB bound this stream had 10-100 refusals per GiB here (15-62 % of its
    // bytes redirected); with the window 1-6 (69-99 %; the target of >= 95 % is for the
    // benchmark's quiet runs: one refusal at the largest window can still cost a
    // detour of 300 MiB on a loaded host).
    assert!(counter(&sb, Counter::WindowGrown) > 0, "the window never grew: {}", counters(&sb));
    let refusals = counter(&sb, Counter::Backpressure);
    assert!(refusals <= 20, "{refusals} backpressure refusals in 1 GiB: {}", counters(&sb));
}

#[test]
fn reader_that_kept_up_then_stalls_is_bounded_by_its_window() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let sb = Sandbox::new();
    let _d = accelerate_all(&sb);
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/stall.py");
    let mut c = sb.cg.command("timeout");
    c.args(["-k", "5", "300", "python3"]).arg(fixture);
    c.args(["--bytes", &(1024 * MIB).to_string(), "--read-first", &(256 * MIB).to_string(), "--stall", "5"]);
    let v = run_json(c);
    eprintln!("kept up, then stalled: {v}\ncounters: {}", counters(&sb));
    assert_eq!(v["ok"], Value::Bool(true), "transfer failed or bytes differ: {v}");
    assert_eq!(u(&v, "received"), 1024 * MIB);
    assert!(counter(&sb, Counter::WindowGrown) > 0, "the reader never grew its window: {}", counters(&sb));
    let bound = tcp_rmem_max().max(DEFAULT_CAP) + SLACK;
    let pushed = u(&v, "max_pushed_while_stalled_per_conn");
    assert!(pushed <= bound, "{pushed} bytes pushed into a stalled reader (bound {bound}): {v}");
    assert!(u(&v, "tcp_mem_bytes_rise") <= bound + 64 * MIB, "{v}");
    assert!(counter(&sb, Counter::Backpressure) > 0, "backpressure never held the sender: {}", counters(&sb));
}
