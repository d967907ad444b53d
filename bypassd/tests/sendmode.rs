//! Which accelerated sockets are senders (`[datapath] send_mode`): a sender's sends run
//! sk_msg and may be redirected; every other accelerated socket is a redirect target
//! only and sends through plain TCP. Each test checks the bytes (sha256 or byte-exact
//! echo) and the counters that say which mode each socket got.
use bypass_testsupport::{Daemon, Sandbox, TempDir, run_json, traffic_report, unique, wait_port_file};
use bypassd::datapath::Datapath;
use bypassd_ebpf::abi::Counter;
use serde_json::Value;
use std::{
    path::Path,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

const MIB: u64 = 1 << 20;

fn daemon(sb: &Sandbox, mode: &str) -> Daemon {
    daemon_with(sb, mode, "")
}

/// `extra`: more [datapath] lines.
fn daemon_with(sb: &Sandbox, mode: &str, extra: &str) -> Daemon {
    let cfg = sb.config(&format!("[datapath]\nsend_mode = \"{mode}\"\n{extra}\n[policy]\ndefault = \"accelerate\"\n"));
    Daemon::start(&cfg).expect("start bypassd")
}

fn counter(sb: &Sandbox, c: Counter) -> u64 {
    Datapath::open_pinned(sb.pins.path()).and_then(|d| d.counter(c)).expect("read counters")
}

fn assert_ok(v: &Value) {
    assert_eq!(v["ok"], Value::Bool(true), "transfer failed: {v}");
}

/// Spawn a server (`serve` or `rr-serve`) of bypass-traffic in the sandbox's cgroup; returns it and its port.
fn spawn_server(sb: &Sandbox, sub: &str, extra: &[&str], dir: &Path) -> (Child, u16) {
    let port_file = dir.join(unique("port"));
    let mut cmd = sb.traffic();
    cmd.args([sub, "--listen", "127.0.0.1:0", "--count", "1", "--port-file"]).arg(&port_file).args(extra);
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn server");
    (child, wait_port_file(&port_file, Duration::from_secs(10)))
}

/// A request/response loop of `iters` 64-byte echoes; rr compares every echoed byte.
fn request_response(sb: &Sandbox, iters: u64) -> Value {
    echoes(sb, "64", iters)
}

/// `iters` echoes of `size` bytes (rr's size syntax) on one connection.
fn echoes(sb: &Sandbox, size: &str, iters: u64) -> Value {
    let dir = TempDir::new();
    let (srv, port) = spawn_server(sb, "rr-serve", &[], dir.path());
    let mut c = sb.traffic();
    c.args(["rr", "--connect", &format!("127.0.0.1:{port}"), "--size", size, "--iters", &iters.to_string()]);
    let v = run_json(c);
    let s = traffic_report(srv);
    assert_ok(&s);
    v
}

#[test]
fn auto_keeps_a_stream_of_small_writes_on_the_kernel_send_path() {
    let sb = Sandbox::new();
    let _d = daemon(&sb, "auto");
    let mut t = sb.traffic();
    t.args(["pair", "--bind", "127.0.0.1", "--bytes", &(32 * MIB).to_string(), "--reply-bytes", "0", "--max-write", "64"]);
    let v = run_json(t);
    assert_ok(&v);
    assert_eq!(v["bytes_sent"].as_u64(), Some(32 * MIB), "{v}");
    let c = &v["per_conn"][0];
    assert_eq!(c["peer_sha256_received"], c["sha256_sent"], "the server got other bytes: {v}");
    assert_eq!(counter(&sb, Counter::SocketsInserted), 2, "both sockets are accelerated (redirect targets)");
    // Nobody became a sender: the writes never ran sk_msg (no redirect, no pass counted).
    assert_eq!(counter(&sb, Counter::SenderPromoted), 0);
    assert_eq!(counter(&sb, Counter::SenderAtInsert), 0);
    assert_eq!(counter(&sb, Counter::RedirectedMsgs) + counter(&sb, Counter::PassedMsgs), 0);
}

#[test]
fn auto_promotes_both_ends_of_a_request_response_pair_and_redirects_intact() {
    let sb = Sandbox::new();
    let _d = daemon(&sb, "auto");
    let v = request_response(&sb, 4000);
    assert_ok(&v);
    assert_eq!(counter(&sb, Counter::SenderPromoted), 2, "client and server both turned request/response: {v}");
    assert_eq!(counter(&sb, Counter::SenderFailed), 0);
    assert_eq!(counter(&sb, Counter::PromoteFailed), 0);
    // The first exchanges took TCP (before promotion, and until the order rule let the
    // redirect start); most of the rest was redirected.
    let redirected = counter(&sb, Counter::RedirectedMsgs);
    assert!(redirected >= 4000, "only {redirected} of 8000 messages were redirected: {v}");
}

#[test]
fn auto_promotes_with_the_recvmsg_gate_off_too() {
    let sb = Sandbox::new();
    // The gate needs no recvmsg hook then, but promotion does: it queues the requests.
    let d = daemon_with(&sb, "auto", "splice_safety = \"off\"\n");
    let v = request_response(&sb, 4000);
    assert_ok(&v);
    assert_eq!(counter(&sb, Counter::SenderPromoted), 2, "{v}\n{}", d.log());
    assert_eq!(counter(&sb, Counter::PromoteFailed), 0);
    assert!(counter(&sb, Counter::RedirectedMsgs) >= 4000, "{v}");
}

#[test]
fn auto_keeps_bursts_above_64_kib_per_turn_on_the_kernel_send_path() {
    let sb = Sandbox::new();
    let _d = daemon(&sb, "auto");
    // 128 KiB each way per turn: a burst, which TCP hands over faster than a redirect.
    let v = echoes(&sb, "128K", 300);
    assert_ok(&v);
    assert_eq!(counter(&sb, Counter::SocketsInserted), 2);
    assert_eq!(counter(&sb, Counter::SenderPromoted), 0, "a burst per turn promoted a sender: {v}");
    assert_eq!(counter(&sb, Counter::RedirectedMsgs) + counter(&sb, Counter::PassedMsgs), 0);
    // The same conversation at 16 KiB a turn is request/response: both ends promoted.
    let v = echoes(&sb, "16K", 300);
    assert_ok(&v);
    assert_eq!(counter(&sb, Counter::SenderPromoted), 2, "16 KiB turns: {v}");
    assert!(counter(&sb, Counter::RedirectedMsgs) > 0, "{v}");
}

#[test]
fn auto_promotes_neither_end_when_only_one_turns() {
    let sb = Sandbox::new();
    let _d = daemon(&sb, "auto");
    // 64 B requests answered with 128 KiB: the client's conversation turns, the
    // server's answers are bursts. One end a sender alone costs the TCP direction the
    // ACKs it got on the other's segments (sendmode.h): neither end is promoted.
    let dir = TempDir::new();
    let (srv, port) = spawn_server(&sb, "rr-serve", &["--size", "64", "--reply-size", "128K"], dir.path());
    let mut c = sb.traffic();
    c.args(["rr", "--connect", &format!("127.0.0.1:{port}"), "--size", "64", "--reply-size", "128K", "--iters", "400"]);
    let v = run_json(c);
    assert_ok(&v);
    assert_ok(&traffic_report(srv));
    assert_eq!(counter(&sb, Counter::SocketsInserted), 2);
    assert_eq!(counter(&sb, Counter::SenderPromoted), 0, "one end became a sender alone: {v}");
    assert_eq!(counter(&sb, Counter::RedirectedMsgs) + counter(&sb, Counter::PassedMsgs), 0);
}

#[test]
fn auto_promotes_nothing_without_the_daemon_and_stays_intact() {
    let sb = Sandbox::new();
    let mut d = daemon(&sb, "auto");
    // The datapath stays pinned and keeps inserting; only the promoter is gone.
    d.kill9();
    let v = request_response(&sb, 2000);
    assert_ok(&v);
    assert_eq!(counter(&sb, Counter::SocketsInserted), 2);
    assert_eq!(counter(&sb, Counter::SenderPromoted), 0, "{v}");
    assert_eq!(counter(&sb, Counter::RedirectedMsgs), 0, "targets only: plain TCP sends");
}

#[test]
fn auto_streams_both_ways_at_once_stay_intact_whatever_each_end_becomes() {
    let sb = Sandbox::new();
    let _d = daemon(&sb, "auto");
    let mut t = sb.traffic();
    t.args(["pair", "--bind", "127.0.0.1", "--bytes", &(64 * MIB).to_string(), "--max-write", "4096"]);
    let v = run_json(t);
    assert_ok(&v);
    assert_eq!(v["bytes_received"].as_u64(), Some(64 * MIB), "{v}");
    let promoted = counter(&sb, Counter::SenderPromoted);
    assert!(promoted <= 2, "{promoted}");
    eprintln!("promoted {promoted}, redirected {} msgs", counter(&sb, Counter::RedirectedMsgs));
}

#[test]
fn all_makes_every_socket_a_sender_and_connections_show_it() {
    let sb = Sandbox::new();
    let _d = daemon(&sb, "all");
    let dir = TempDir::new();
    let hold = dir.path().join("go");
    let hold_arg = hold.to_string_lossy().into_owned();
    let (srv, port) = spawn_server(&sb, "serve", &["--hold-file", &hold_arg], dir.path());
    let mut c = sb.traffic();
    c.args(["send", "--connect", &format!("127.0.0.1:{port}"), "--bytes", &MIB.to_string()]);
    let client = c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn client");
    // While the server holds its reads, the connection is listed with both ends senders.
    let deadline = Instant::now() + Duration::from_secs(10);
    let conns = loop {
        let conns = Datapath::open_pinned(sb.pins.path()).and_then(|d| d.connections()).expect("connections");
        if conns.iter().any(|c| c.paired) || Instant::now() > deadline {
            break conns;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let pair = conns.iter().find(|c| c.paired).unwrap_or_else(|| panic!("no paired connection: {conns:?}"));
    assert!(pair.sender && pair.peer_sender, "{pair:?}");
    std::fs::write(&hold, b"").expect("release the server");
    assert_ok(&traffic_report(client));
    assert_ok(&traffic_report(srv));
    assert_eq!(counter(&sb, Counter::SenderAtInsert), 2);
    assert_eq!(counter(&sb, Counter::SenderPromoted), 0);
}

#[test]
fn none_redirects_nothing_and_the_bytes_arrive() {
    let sb = Sandbox::new();
    let _d = daemon(&sb, "none");
    let v = request_response(&sb, 500);
    assert_ok(&v);
    assert_eq!(counter(&sb, Counter::SocketsInserted), 2);
    assert_eq!(counter(&sb, Counter::SenderAtInsert) + counter(&sb, Counter::SenderPromoted), 0);
    assert_eq!(counter(&sb, Counter::RedirectedMsgs), 0);
}
