//! End-to-end tests of the bypass-traffic binary over loopback.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_bypass-traffic");
const MIB4: u64 = 4 << 20;

fn run(args: &[&str]) -> (Output, Value) {
    let out = Command::new(BIN)
        .args(args)
        .output()
        .expect("spawn bypass-traffic");
    let json = parse_json(&out, args);
    (out, json)
}

fn parse_json(out: &Output, args: &[&str]) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "expected exactly one JSON line from {args:?}; stdout: {stdout}; stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(lines[0]).unwrap_or_else(|e| panic!("bad JSON {:?}: {e}", lines[0]))
}

fn assert_ok(out: &Output, v: &Value, conns: u64, c2s: u64, s2c: u64) {
    assert!(
        out.status.success() && v["ok"] == true,
        "run failed: {v}; stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(v["conns"], conns);
    assert_eq!(v["bytes_sent"], conns * c2s);
    assert_eq!(v["bytes_received"], conns * s2c);
    let per = v["per_conn"].as_array().expect("per_conn");
    assert_eq!(per.len() as u64, conns);
    for c in per {
        assert_eq!(c["ok"], true, "{c}");
        assert_eq!(c["sent"], c2s);
        assert_eq!(c["received"], s2c);
        assert_eq!(c["sha256_sent"], c["peer_sha256_received"], "{c}");
        assert_eq!(c["sha256_sent"].as_str().map(str::len), Some(64));
    }
    assert_eq!(v["sha256_sent"], per[0]["sha256_sent"]);
    assert_eq!(v["sha256_received"], per[0]["sha256_received"]);
}

fn ipv6_available() -> bool {
    let ok = TcpListener::bind("[::1]:0").is_ok();
    if !ok {
        eprintln!("skipping: no IPv6 loopback here");
    }
    ok
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("bypass-traffic-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create temp dir");
    d
}

fn wait_file(p: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !p.exists() {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("child exited ({st}) before creating {}", p.display());
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {}",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn spawn_serve(dir: &Path, extra: &[&str]) -> (Child, u16) {
    let port_file = dir.join("port");
    let mut args = vec![
        "serve".to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--port-file".into(),
        port_file.display().to_string(),
        "--timeout-secs".into(),
        "120".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut child = Command::new(BIN)
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn serve");
    wait_file(&port_file, &mut child);
    let port: u16 = std::fs::read_to_string(&port_file)
        .expect("read port file")
        .trim()
        .parse()
        .expect("port number");
    assert_ne!(port, 0);
    (child, port)
}

#[test]
fn pair_ipv4_8x4m() {
    let (out, v) = run(&[
        "pair",
        "--bind",
        "127.0.0.1",
        "--bytes",
        "4M",
        "--conns",
        "8",
        "--seed",
        "11",
    ]);
    assert_ok(&out, &v, 8, MIB4, MIB4);
    assert_eq!(v["seed"], 11);
    assert_eq!(v["server_ok"], true);
}

#[test]
fn pair_ipv6_8x4m() {
    if !ipv6_available() {
        return;
    }
    let (out, v) = run(&["pair", "--bind", "::1", "--bytes", "4M", "--conns", "8"]);
    assert_ok(&out, &v, 8, MIB4, MIB4);
}

#[test]
fn pair_splice_8x4m() {
    let (out, v) = run(&[
        "pair",
        "--bind",
        "127.0.0.1",
        "--bytes",
        "4M",
        "--conns",
        "8",
        "--read-mode",
        "splice",
    ]);
    assert_ok(&out, &v, 8, MIB4, MIB4);
    if ipv6_available() {
        let (out, v) = run(&[
            "pair",
            "--bind",
            "[::1]",
            "--bytes",
            "4M",
            "--reply-bytes",
            "1M",
            "--conns",
            "8",
            "--read-mode",
            "splice",
            "--max-write",
            "1000",
        ]);
        assert_ok(&out, &v, 8, MIB4, 1 << 20);
    }
}

#[test]
fn pair_delay_read_nonblocking() {
    // Both readers stall while both writers fill the socket buffers.
    let (out, v) = run(&[
        "pair",
        "--bind",
        "127.0.0.1",
        "--bytes",
        "4M",
        "--conns",
        "8",
        "--delay-read-ms",
        "300",
        "--server-delay-read-ms",
        "300",
        "--nonblocking",
    ]);
    assert_ok(&out, &v, 8, MIB4, MIB4);
    assert!(
        v["eagain"].as_u64().expect("eagain") > 0,
        "stalled reader must cause EAGAIN: {v}"
    );
    assert!(v["seconds"].as_f64().expect("seconds") >= 0.3);
}

#[test]
fn pair_asymmetric_and_empty() {
    let (out, v) = run(&[
        "pair",
        "--bind",
        "127.0.0.1",
        "--bytes",
        "0",
        "--reply-bytes",
        "512K",
        "--max-write",
        "1",
    ]);
    assert_ok(&out, &v, 1, 0, 512 << 10);
    assert_eq!(
        v["sha256_sent"],
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    let (out, v) = run(&[
        "pair",
        "--bind",
        "127.0.0.1",
        "--bytes",
        "0",
        "--reply-bytes",
        "0",
        "--conns",
        "3",
    ]);
    assert_ok(&out, &v, 3, 0, 0);
}

#[test]
fn same_seed_same_hashes() {
    let (_, a) = run(&[
        "pair",
        "--bind",
        "127.0.0.1",
        "--bytes",
        "1M",
        "--seed",
        "0x1234",
        "--max-write",
        "100",
    ]);
    let (_, b) = run(&[
        "pair",
        "--bind",
        "127.0.0.1",
        "--bytes",
        "1M",
        "--seed",
        "4660",
        "--max-write",
        "65536",
    ]);
    assert_eq!(a["ok"], true);
    assert_eq!(a["sha256_sent"], b["sha256_sent"]);
    assert_eq!(a["sha256_received"], b["sha256_received"]);
    assert_ne!(a["sha256_sent"], a["sha256_received"]);
}

#[test]
fn serve_send_with_port_file() {
    let dir = tmpdir("serve");
    let ready = dir.join("ready");
    let ready_s = ready.display().to_string();
    let (child, port) = spawn_serve(&dir, &["--count", "3", "--ready-file", &ready_s]);
    assert!(ready.exists());
    let addr = format!("127.0.0.1:{port}");
    let (out, v) = run(&[
        "send",
        "--connect",
        &addr,
        "--bytes",
        "4M",
        "--reply-bytes",
        "2M",
        "--conns",
        "2",
    ]);
    assert_ok(&out, &v, 2, MIB4, 2 << 20);
    let (out, v) = run(&[
        "send",
        "--connect",
        &addr,
        "--bytes",
        "1M",
        "--nonblocking",
        "--max-write",
        "4096",
    ]);
    assert_ok(&out, &v, 1, 1 << 20, 1 << 20);
    let out = child.wait_with_output().expect("serve output");
    let sv = parse_json(&out, &["serve"]);
    assert!(out.status.success(), "serve failed: {sv}");
    assert_eq!(sv["ok"], true);
    assert_eq!(sv["conns"], 3);
    assert_eq!(sv["port"], port);
    assert_eq!(sv["bytes_received"], 2 * MIB4 + (1 << 20));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn serve_dual_stack_accepts_ipv4() {
    if !ipv6_available() {
        return;
    }
    let dir = tmpdir("dual");
    let port_file = dir.join("port");
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "[::]:0",
            "--count",
            "2",
            "--timeout-secs",
            "120",
            "--port-file",
        ])
        .arg(&port_file)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn serve");
    wait_file(&port_file, &mut child);
    let port = std::fs::read_to_string(&port_file)
        .expect("port")
        .trim()
        .to_string();
    for host in ["127.0.0.1", "[::1]"] {
        let (out, v) = run(&[
            "send",
            "--connect",
            &format!("{host}:{port}"),
            "--bytes",
            "1M",
        ]);
        assert_ok(&out, &v, 1, 1 << 20, 1 << 20);
    }
    assert!(child.wait().expect("wait serve").success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn hold_file_and_sent_file() {
    let dir = tmpdir("hold");
    let hold = dir.join("hold");
    let sent = dir.join("sent");
    let mut child = Command::new(BIN)
        .args([
            "pair",
            "--bind",
            "127.0.0.1",
            "--bytes",
            "256K",
            "--conns",
            "2",
            "--timeout-secs",
            "60",
        ])
        .args(["--read-mode", "read-after-file", "--hold-file"])
        .arg(&hold)
        .arg("--sent-file")
        .arg(&sent)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn pair");
    wait_file(&sent, &mut child);
    // Data now sits unread at the receiver; the run must still be pending.
    std::thread::sleep(Duration::from_millis(200));
    assert!(child.try_wait().expect("try_wait").is_none());
    std::fs::write(&hold, b"").expect("create hold file");
    let out = child.wait_with_output().expect("pair output");
    let v = parse_json(&out, &["pair hold"]);
    assert_ok(&out, &v, 2, 256 << 10, 256 << 10);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn corruption_c2s_is_caught_with_offset() {
    let (out, v) = run(&[
        "pair",
        "--bind",
        "127.0.0.1",
        "--bytes",
        "4M",
        "--conns",
        "3",
        "--corrupt-at",
        "1234567",
    ]);
    assert_eq!(out.status.code(), Some(1), "{v}");
    assert_eq!(v["ok"], false);
    let err = v["error"].as_str().expect("error string");
    assert!(err.contains("conn 0"), "{err}");
    assert!(err.contains("c2s"), "{err}");
    assert!(err.contains("byte offset 1234567"), "{err}");
    assert_eq!(v["failed_conn"], 0);
    assert_eq!(v["direction"], "c2s");
    assert_eq!(v["offset"], 1234567);
    assert_eq!(v["failed"], 1);
    let per = v["per_conn"].as_array().expect("per_conn");
    assert_eq!(per[0]["peer_status"], "mismatch");
    assert_eq!(per[1]["ok"], true);
    assert_eq!(per[2]["ok"], true);
}

#[test]
fn corruption_s2c_is_caught_with_offset() {
    let (out, v) = run(&[
        "pair",
        "--bind",
        "127.0.0.1",
        "--bytes",
        "1M",
        "--reply-bytes",
        "2M",
        "--corrupt-reply-at",
        "1048583",
    ]);
    assert_eq!(out.status.code(), Some(1), "{v}");
    let err = v["error"].as_str().expect("error string");
    assert!(err.contains("conn 0") && err.contains("s2c"), "{err}");
    assert!(err.contains("byte offset 1048583"), "{err}");
    assert_eq!(v["direction"], "s2c");
    assert_eq!(v["offset"], 1048583);
}

#[test]
fn corruption_detected_by_separate_server() {
    let dir = tmpdir("corrupt");
    let (child, port) = spawn_serve(&dir, &[]);
    let (out, v) = run(&[
        "send",
        "--connect",
        &format!("127.0.0.1:{port}"),
        "--bytes",
        "100000",
        "--corrupt-at",
        "99999",
    ]);
    assert_eq!(out.status.code(), Some(1), "{v}");
    assert!(
        v["error"]
            .as_str()
            .expect("error")
            .contains("byte offset 99999"),
        "{v}"
    );
    let out = child.wait_with_output().expect("serve output");
    let sv = parse_json(&out, &["serve"]);
    assert_eq!(out.status.code(), Some(1), "{sv}");
    assert_eq!(sv["ok"], false);
    assert_eq!(sv["direction"], "c2s");
    assert_eq!(sv["offset"], 99999);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn server_rejects_garbage_header() {
    let dir = tmpdir("garbage");
    let (child, port) = spawn_serve(&dir, &[]);
    {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.write_all(&[0x55; 40]).expect("write garbage");
        let _ = s.shutdown(std::net::Shutdown::Write);
        let _ = std::io::Read::read_to_end(&mut s, &mut Vec::new());
    }
    let out = child.wait_with_output().expect("serve output");
    let sv = parse_json(&out, &["serve"]);
    assert_eq!(out.status.code(), Some(1), "{sv}");
    assert!(
        sv["error"].as_str().expect("error").contains("magic"),
        "{sv}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn timeout_reports_progress() {
    let dir = tmpdir("timeout");
    let hold = dir.join("never");
    let start = Instant::now();
    let (out, v) = run(&[
        "pair",
        "--bind",
        "127.0.0.1",
        "--bytes",
        "64K",
        "--timeout-secs",
        "1",
        "--read-mode",
        "read-after-file",
        "--hold-file",
        &hold.display().to_string(),
    ]);
    assert!(start.elapsed() < Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(1), "{v}");
    assert_eq!(v["timed_out"], true);
    let err = v["error"].as_str().expect("error");
    assert!(err.contains("timeout") && err.contains("conn 0"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn connect_failure_is_reported() {
    // Grab a free port and close it again so nothing listens there.
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let (out, v) = run(&[
        "send",
        "--connect",
        &format!("127.0.0.1:{port}"),
        "--bytes",
        "10",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        v["error"]
            .as_str()
            .expect("error")
            .contains("conn 0: connect to"),
        "{v}"
    );
}

#[test]
fn rr_latency_loop() {
    let dir = tmpdir("rr");
    let port_file = dir.join("port");
    let mut child = Command::new(BIN)
        .args([
            "rr-serve",
            "--listen",
            "127.0.0.1:0",
            "--count",
            "2",
            "--port-file",
        ])
        .arg(&port_file)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn rr-serve");
    wait_file(&port_file, &mut child);
    let port = std::fs::read_to_string(&port_file)
        .expect("port")
        .trim()
        .to_string();
    let addr = format!("127.0.0.1:{port}");
    let (out, v) = run(&["rr", "--connect", &addr, "--size", "64", "--iters", "200"]);
    assert!(out.status.success(), "{v}");
    assert!(v["median_us"].as_f64().expect("median") > 0.0);
    // A large size must not deadlock.
    let (out, v) = run(&["rr", "--connect", &addr, "--size", "8M", "--iters", "2"]);
    assert!(out.status.success(), "{v}");
    assert!(child.wait().expect("wait rr-serve").success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn rr_answers_with_reply_size_and_checks_every_byte() {
    let dir = tmpdir("rr-reply");
    let port_file = dir.join("port");
    let mut child = Command::new(BIN)
        .args(["rr-serve", "--listen", "127.0.0.1:0", "--count", "2", "--size", "100", "--reply-size", "1000", "--port-file"])
        .arg(&port_file)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn rr-serve");
    wait_file(&port_file, &mut child);
    let port = std::fs::read_to_string(&port_file).expect("port").trim().to_string();
    let addr = format!("127.0.0.1:{port}");
    let (out, v) = run(&["rr", "--connect", &addr, "--size", "100", "--reply-size", "1000", "--iters", "50"]);
    assert!(out.status.success(), "{v}");
    // Expecting an echo of 100 bytes, the client reads the answers out of step: caught.
    let (out, v) = run(&["rr", "--connect", &addr, "--size", "100", "--iters", "5"]);
    assert!(!out.status.success(), "{v}");
    assert!(v["error"].as_str().unwrap_or_default().contains("response differs"), "{v}");
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
