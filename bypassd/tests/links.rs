//! Root proof tests of the link datapath ([[links]]). Each test builds its own "node"
//! netns (where bypassd runs, with a Linux bridge as the baseline), a "vm" netns whose
//! NIC is a real TAP pair joined by a relay (as a hypervisor would), and a "pod"
//! netns with a veth. Traffic: bypass-traffic (sha256) for TCP, numbered and
//! checksummed datagrams for UDP. The bridge's own forwarding is counted by an
//! nftables bridge-family rule inside the node netns.
//!
//! Needs root, iproute2 and nftables (scripts/deps-links).
use bypass_testsupport::{Daemon, Netns, PinDir, TempDir, TestCgroup, bin, require_root, tap::{TapRelay, in_netns}};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::{
    net::UdpSocket,
    path::Path,
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
static SEQ: AtomicU32 = AtomicU32::new(0);

const VM_IP: &str = "10.77.0.1";
const POD_IP: &str = "10.77.0.2";
const BR_IP: &str = "10.77.0.254";

fn sh(ns: Option<&str>, args: &[&str]) -> String {
    let mut c = match ns {
        Some(n) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", n]);
            c.arg(args[0]);
            c
        }
        None => Command::new(args[0]),
    };
    c.args(&args[1..]);
    let out = c.output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// node (bridge br, tap `tap`, veth `vh` to pod), vm (eth0 = tap via relay), pod (eth0).
struct Topo {
    /// Field order is drop order: the relay closes its taps before the netns go.
    relay: Option<TapRelay>,
    vnet: bool,
    tap: String,
    vh: String,
    br: String,
    vm: Netns,
    pod: Netns,
    node: Netns,
}

impl Topo {
    fn new(vnet: bool) -> Topo {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let p = format!("l{}{n}", std::process::id() % 10000);
        let (node, vm, pod) = (Netns::new(), Netns::new(), Netns::new());
        let mut t = Topo { relay: None, vnet, tap: format!("{p}tap"), vh: format!("{p}vh"), br: format!("{p}br"), vm, pod, node };
        let nn = t.node.name.clone();
        sh(Some(&nn), &["ip", "link", "add", &t.vh, "type", "veth", "peer", "name", "eth0", "netns", &t.pod.name]);
        sh(Some(&t.pod.name), &["ip", "addr", "add", &format!("{POD_IP}/24"), "dev", "eth0"]);
        sh(Some(&t.pod.name), &["ip", "link", "set", "eth0", "up"]);
        t.start_relay();
        sh(Some(&t.vm.name), &["ip", "addr", "add", &format!("{VM_IP}/24"), "dev", "eth0"]);
        sh(Some(&t.vm.name), &["ip", "link", "set", "eth0", "up"]);
        sh(Some(&nn), &["ip", "link", "add", &t.br, "type", "bridge"]);
        sh(Some(&nn), &["ip", "addr", "add", &format!("{BR_IP}/24"), "dev", &t.br]);
        for d in [&t.tap, &t.vh] {
            sh(Some(&nn), &["ip", "link", "set", d, "master", &t.br]);
            sh(Some(&nn), &["ip", "link", "set", d, "up"]);
        }
        sh(Some(&nn), &["ip", "link", "set", &t.br, "up"]);
        // The bridge's own forwarding, counted where only the bridge path goes.
        sh(Some(&nn), &["nft", "add table bridge bt { chain fw { type filter hook forward priority 0; counter; }; }"]);
        t.wait_ping();
        t
    }

    fn start_relay(&mut self) {
        self.relay = Some(TapRelay::start(Some(&self.node.name), &self.tap, &self.vm.name, "eth0", self.vnet).expect("tap relay"));
    }

    /// The tap re-created by its "hypervisor": back on the bridge, up.
    fn restart_relay(&mut self) {
        self.start_relay();
        let nn = self.node.name.clone();
        sh(Some(&nn), &["ip", "link", "set", &self.tap, "master", &self.br]);
        sh(Some(&nn), &["ip", "link", "set", &self.tap, "up"]);
        sh(Some(&self.vm.name), &["ip", "addr", "replace", &format!("{VM_IP}/24"), "dev", "eth0"]);
        sh(Some(&self.vm.name), &["ip", "link", "set", "eth0", "up"]);
    }

    /// vm reaches pod (ARP resolved, the path forwards): a datagram gets through.
    fn wait_ping(&self) {
        reach(&self.vm.name, &self.pod.name, POD_IP);
    }

    fn bridge_forwarded(&self) -> u64 {
        let out = sh(Some(&self.node.name), &["nft", "-j", "list", "chain", "bridge", "bt", "fw"]);
        let v: Value = serde_json::from_str(&out).expect("nft json");
        v["nftables"].as_array().into_iter().flatten().filter_map(|o| o["rule"]["expr"].as_array()).flatten()
            .filter_map(|e| e["counter"]["packets"].as_u64()).sum()
    }

    /// TCP vm -> pod with bypass-traffic: `bytes` each way, sha256 checked.
    fn tcp(&self, bytes: u64) {
        let dir = TempDir::new();
        let pf = dir.path().join("port");
        let mut srv = self.pod.command(None, bin("bypass-traffic"));
        srv.args(["serve", "--listen", &format!("{POD_IP}:0"), "--timeout-secs", "120", "--port-file"]).arg(&pf);
        let mut srv = srv.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("serve");
        let port = wait_port(&pf);
        let mut c = self.vm.command(None, bin("bypass-traffic"));
        c.args(["send", "--connect", &format!("{POD_IP}:{port}"), "--bytes", &bytes.to_string(), "--timeout-secs", "120"]);
        let v = bypass_testsupport::run_json(c);
        assert_eq!(v["ok"], Value::Bool(true), "TCP transfer failed: {v}");
        assert_eq!(v["bytes_received"].as_u64(), Some(bytes), "{v}");
        let st = srv.wait().expect("serve");
        assert!(st.success(), "server: {}", bypass_testsupport::read_all(&mut srv));
    }

    fn link_status(&self, d: &Daemon) -> String {
        d.log()
    }
}

/// Send datagrams from `from_ns` until one arrives at `to_ip` in `to_ns` (15 s at most).
fn reach(from_ns: &str, to_ns: &str, to_ip: &str) {
    let rx = in_netns(Some(to_ns), || UdpSocket::bind(format!("{to_ip}:0"))).unwrap().expect("bind");
    rx.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let to = format!("{to_ip}:{}", rx.local_addr().unwrap().port());
    let tx = in_netns(Some(from_ns), || UdpSocket::bind("0.0.0.0:0")).unwrap().expect("bind");
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut buf = [0u8; 16];
    loop {
        let _ = tx.send_to(b"hello", &to);
        if rx.recv(&mut buf).is_ok() {
            return;
        }
        assert!(Instant::now() < deadline, "{from_ns} cannot reach {to_ip} in {to_ns}");
    }
}

fn wait_port(p: &Path) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(s) = std::fs::read_to_string(p)
            && let Ok(port) = s.trim().parse()
        {
            return port;
        }
        assert!(Instant::now() < deadline, "{} did not appear", p.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `n` numbered datagrams from `from_ns` to `to_ip:port` in `to_ns`, each carrying its
/// sequence number and the sha256 of its payload. Returns (received, corrupt,
/// duplicates); every received datagram must check out.
fn udp(from_ns: &str, to_ns: &str, to_ip: &str, n: u32, size: usize) -> (u32, u32, u32) {
    let rx = in_netns(Some(to_ns), || UdpSocket::bind(format!("{to_ip}:0"))).unwrap().expect("bind");
    rx.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let big = 8i32 << 20;
    // SAFETY: setsockopt with a valid int option value.
    unsafe {
        libc::setsockopt(std::os::fd::AsRawFd::as_raw_fd(&rx), libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, (&big as *const i32).cast(), 4);
    }
    let port = rx.local_addr().unwrap().port();
    let to = format!("{to_ip}:{port}");
    let recv = std::thread::spawn(move || {
        let mut seen = vec![false; n as usize];
        let (mut got, mut bad, mut dup) = (0, 0, 0);
        let mut buf = vec![0u8; 65536];
        while let Ok(len) = rx.recv(&mut buf) {
            let d = &buf[..len];
            if len < 36 || Sha256::digest(&d[36..]).as_slice() != &d[4..36] {
                bad += 1;
                continue;
            }
            let seq = u32::from_be_bytes(d[..4].try_into().unwrap()) as usize;
            match seen.get_mut(seq) {
                Some(s) if *s => dup += 1,
                Some(s) => {
                    *s = true;
                    got += 1;
                }
                None => bad += 1,
            }
        }
        (got, bad, dup)
    });
    in_netns(Some(from_ns), || {
        let tx = UdpSocket::bind("0.0.0.0:0").expect("bind tx");
        for i in 0..n {
            let payload: Vec<u8> = (0..size - 36).map(|j| (i as usize * 31 + j) as u8).collect();
            let mut d = i.to_be_bytes().to_vec();
            d.extend_from_slice(&Sha256::digest(&payload));
            d.extend_from_slice(&payload);
            tx.send_to(&d, &to).expect("send");
            // Paced: UDP has no flow control, and the relay is one thread per direction.
            if i % 8 == 7 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    })
    .unwrap();
    recv.join().unwrap()
}

struct Env {
    cg: TestCgroup,
    pins: PinDir,
    state: TempDir,
    _serial: std::sync::MutexGuard<'static, ()>,
}

impl Env {
    fn new() -> Env {
        require_root();
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        Env { _serial: serial, cg: TestCgroup::new(), pins: PinDir::new(), state: TempDir::new() }
    }

    fn config(&self, links: &str) -> String {
        format!(
            "[daemon]\npin_dir = \"{}\"\ncgroup = \"{}\"\nstate_dir = \"{}\"\nlog_level = \"debug\"\n\n{links}",
            self.pins.path().display(),
            self.cg.rel,
            self.state.path().display()
        )
    }

    /// bypassd running in the node netns.
    fn daemon(&self, t: &Topo, links: &str) -> Daemon {
        in_netns(Some(&t.node.name), || Daemon::start(&self.config(links))).unwrap().expect("start bypassd")
    }

    fn links_dir(&self) -> std::path::PathBuf {
        self.pins.path().join("links")
    }

    /// Pinned TCX links (`tcx_*`) under the link folder.
    fn pinned(&self) -> Vec<String> {
        let mut v = Vec::new();
        for d in std::fs::read_dir(self.links_dir()).into_iter().flatten().flatten() {
            for f in std::fs::read_dir(d.path()).into_iter().flatten().flatten() {
                let n = f.file_name().to_string_lossy().into_owned();
                if n.starts_with("tcx_") {
                    v.push(n);
                }
            }
        }
        v.sort();
        v
    }
}

fn respawn(d: &mut Daemon, t: &Topo) {
    in_netns(Some(&t.node.name), || d.spawn()).unwrap().expect("restart bypassd");
}

/// Link counters straight from the pinned per-CPU map of the single entry.
fn link_counters(env: &Env) -> bypassd_ebpf::abi::LinkStats {
    use aya::maps::{Map, MapData, PerCpuArray};
    let dir = std::fs::read_dir(env.links_dir()).expect("links dir").flatten().next().expect("an entry").path();
    let m = MapData::from_pin(dir.join("map_bl_stats")).expect("stats pin");
    let a: PerCpuArray<MapData, bypassd_ebpf::abi::LinkStats> = PerCpuArray::try_from(Map::from_map_data(m).unwrap()).unwrap();
    let mut t = bypassd_ebpf::abi::LinkStats::default();
    for slot in 0..bypassd_ebpf::abi::BL_MAX_PORTS {
        for s in a.get(&slot, 0).unwrap().iter() {
            t.redirected_frames += s.redirected_frames;
            t.redirected_bytes += s.redirected_bytes;
            t.passed_frames += s.passed_frames;
        }
    }
    t
}

fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn pair_cfg(t: &Topo, extra: &str) -> String {
    format!("[[links]]\npair = [\"{}\", \"{}\"]\n{extra}\n", t.tap, t.vh)
}

/// Traffic through the pair: intact, counted by the link, invisible to the bridge.
fn check_pair_traffic(env: &Env, t: &Topo) {
    let before = link_counters(env);
    let fwd = t.bridge_forwarded();
    t.tcp(32 << 20);
    let (got, bad, dup) = udp(&t.vm.name, &t.pod.name, POD_IP, 3000, 1400);
    assert_eq!((bad, dup), (0, 0), "UDP datagrams corrupt or duplicated");
    assert!(got >= 2970, "only {got}/3000 UDP datagrams arrived");
    let (got, bad, dup) = udp(&t.pod.name, &t.vm.name, VM_IP, 3000, 1400);
    assert_eq!((bad, dup), (0, 0), "UDP datagrams corrupt or duplicated (pod -> vm)");
    assert!(got >= 2970, "only {got}/3000 UDP datagrams arrived (pod -> vm)");
    let after = link_counters(env);
    assert!(after.redirected_bytes - before.redirected_bytes >= 64 << 20, "link redirected too little: {before:?} -> {after:?}");
    let fwd_after = t.bridge_forwarded();
    assert!(fwd_after - fwd < 20, "the bridge still forwarded {} frames", fwd_after - fwd);
}

#[test]
fn pair_skips_the_bridge_plain_tap() {
    pair_skips_the_bridge(false);
}

#[test]
fn pair_skips_the_bridge_vnet_hdr_offloads() {
    pair_skips_the_bridge(true);
}

fn pair_skips_the_bridge(vnet: bool) {
    let env = Env::new();
    let t = Topo::new(vnet);
    // Baseline: the bridge forwards.
    let fwd = t.bridge_forwarded();
    t.tcp(1 << 20);
    assert!(t.bridge_forwarded() - fwd > 100, "baseline traffic did not cross the bridge");

    let d = env.daemon(&t, &pair_cfg(&t, ""));
    assert_eq!(env.pinned().len(), 2, "{}", t.link_status(&d));
    check_pair_traffic(&env, &t);
}

#[test]
fn kill9_keeps_frames_flowing_restart_adopts_and_deleted_devices_are_followed() {
    let env = Env::new();
    let mut t = Topo::new(false);
    let mut d = env.daemon(&t, &pair_cfg(&t, ""));
    d.kill9();
    // Frames keep flowing on the pinned links with no daemon.
    check_pair_traffic(&env, &t);
    respawn(&mut d, &t);
    assert!(d.log().contains("adopted"), "{}", d.log());
    assert_eq!(env.pinned().len(), 2);

    // The VM goes away (tap deleted) and comes back: re-attached from netlink events.
    t.relay = None;
    wait_until("the stale tap link to go", 10, || env.pinned().len() == 1);
    t.restart_relay();
    wait_until("the new tap to be attached", 10, || env.pinned().len() == 2);
    check_pair_traffic(&env, &t);

    // Deleted while bypassd is down: the pin (ifindex 0) is cleaned up at start.
    d.kill9();
    t.relay = None;
    respawn(&mut d, &t);
    assert_eq!(env.pinned().len(), 1, "{}", d.log());
    assert!(d.log().contains("missing"), "{}", d.log());
    t.restart_relay();
    wait_until("the new tap to be attached", 10, || env.pinned().len() == 2);
    check_pair_traffic(&env, &t);

    // Detach (as the package scripts do, after the daemon stopped) removes only our
    // links; the bridge carries the traffic again.
    d.kill9();
    let out = in_netns(Some(&t.node.name), || d.tool(&["--detach"])).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!env.links_dir().exists());
    let fwd = t.bridge_forwarded();
    t.tcp(1 << 20);
    assert!(t.bridge_forwarded() - fwd > 100);
}
