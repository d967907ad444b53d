//! The link tests' world: a "node" netns (where bypassd runs) with a Linux bridge,
//! "vm" netns whose NIC is a real TAP pair joined by a relay (as a hypervisor would),
//! and "pod" netns with a veth. Traffic helpers check every byte.
#![allow(dead_code)]
use bypass_testsupport::{Daemon, Netns, PinDir, TempDir, TestCgroup, bin, require_root, tap::{TapRelay, in_netns}};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::{
    net::UdpSocket,
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

pub static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
static SEQ: AtomicU32 = AtomicU32::new(0);

pub const BR_IP: &str = "10.77.0.254";

/// Run a command (in netns `ns`); panic with its stderr on failure.
pub fn sh(ns: Option<&str>, args: &[&str]) -> String {
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

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A tap relay; `true`: IFF_VNET_HDR + TUNSETOFFLOAD (as QEMU with virtio).
    Vm(bool),
    Pod,
}

/// One VM or pod: its netns (NIC eth0 = `ip`) and its port on the node.
pub struct Ep {
    /// Field order is drop order: the relay closes its taps before the netns goes.
    pub relay: Option<TapRelay>,
    pub kind: Kind,
    pub port: String,
    pub ip: String,
    pub ns: Netns,
}

pub struct Topo {
    pub eps: Vec<Ep>,
    pub br: String,
    pub node: Netns,
}

impl Topo {
    /// Endpoints 10.77.0.1, .2, ... all ports of one bridge (the baseline path).
    pub fn new(kinds: &[Kind]) -> Topo {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let p = format!("l{}{n}", std::process::id() % 10000);
        let node = Netns::new();
        let nn = node.name.clone();
        let br = format!("{p}br");
        sh(Some(&nn), &["ip", "link", "add", &br, "type", "bridge"]);
        sh(Some(&nn), &["ip", "addr", "add", &format!("{BR_IP}/24"), "dev", &br]);
        sh(Some(&nn), &["ip", "link", "set", &br, "up"]);
        // The bridge's own forwarding, counted where only the bridge path goes.
        sh(Some(&nn), &["nft", "add table bridge bt { chain fw { type filter hook forward priority 0; counter; }; }"]);
        let mut t = Topo { eps: Vec::new(), br, node };
        for (i, k) in kinds.iter().enumerate() {
            let ns = Netns::new();
            let port = format!("{p}{}{i}", if matches!(k, Kind::Pod) { "vh" } else { "tap" });
            let ep = Ep { relay: None, kind: *k, port, ip: format!("10.77.0.{}", i + 1), ns };
            if *k == Kind::Pod {
                sh(Some(&nn), &["ip", "link", "add", &ep.port, "type", "veth", "peer", "name", "eth0", "netns", &ep.ns.name]);
            }
            t.eps.push(ep);
            t.plug(i);
        }
        for i in 1..t.eps.len() {
            t.reach(0, i);
        }
        t
    }

    /// (Re)create endpoint `i`'s NIC side (a tap's relay) and put its port on the bridge.
    pub fn plug(&mut self, i: usize) {
        let nn = self.node.name.clone();
        let ep = &mut self.eps[i];
        if let Kind::Vm(vnet) = ep.kind {
            ep.relay = Some(TapRelay::start(Some(&nn), &ep.port, &ep.ns.name, "eth0", vnet).expect("tap relay"));
        }
        sh(Some(&ep.ns.name), &["ip", "addr", "replace", &format!("{}/24", ep.ip), "dev", "eth0"]);
        sh(Some(&ep.ns.name), &["ip", "link", "set", "eth0", "up"]);
        sh(Some(&nn), &["ip", "link", "set", &ep.port, "master", &self.br]);
        sh(Some(&nn), &["ip", "link", "set", &ep.port, "up"]);
    }

    /// Endpoint `i`'s tap disappears (its VM went away).
    pub fn unplug(&mut self, i: usize) {
        self.eps[i].relay = None;
    }

    pub fn reach(&self, a: usize, b: usize) {
        reach(&self.eps[a].ns.name, &self.eps[b].ns.name, &self.eps[b].ip);
    }

    /// Frames the bridge forwarded itself (nftables bridge forward hook).
    pub fn bridge_forwarded(&self) -> u64 {
        let out = sh(Some(&self.node.name), &["nft", "-j", "list", "chain", "bridge", "bt", "fw"]);
        let v: Value = serde_json::from_str(&out).expect("nft json");
        v["nftables"].as_array().into_iter().flatten().filter_map(|o| o["rule"]["expr"].as_array()).flatten()
            .filter_map(|e| e["counter"]["packets"].as_u64()).sum()
    }

    /// TCP a -> b with bypass-traffic: `bytes` each way, sha256 checked.
    pub fn tcp(&self, a: usize, b: usize, bytes: u64) {
        let (from, to) = (&self.eps[a], &self.eps[b]);
        let dir = TempDir::new();
        let pf = dir.path().join("port");
        let mut srv = to.ns.command(None, bin("bypass-traffic"));
        srv.args(["serve", "--listen", &format!("{}:0", to.ip), "--timeout-secs", "120", "--port-file"]).arg(&pf);
        let mut srv = srv.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("serve");
        let port = bypass_testsupport::wait_port_file(&pf, Duration::from_secs(10));
        let mut c = from.ns.command(None, bin("bypass-traffic"));
        c.args(["send", "--connect", &format!("{}:{port}", to.ip), "--bytes", &bytes.to_string(), "--timeout-secs", "120"]);
        let v = bypass_testsupport::run_json(c);
        assert_eq!(v["ok"], Value::Bool(true), "TCP transfer failed: {v}");
        assert_eq!(v["bytes_received"].as_u64(), Some(bytes), "{v}");
        let st = srv.wait().expect("serve");
        assert!(st.success(), "server: {}", bypass_testsupport::read_all(&mut srv));
    }

    /// UDP a -> b: every datagram that arrives is intact and unique; at most 1 % lost.
    pub fn udp(&self, a: usize, b: usize, n: u32) {
        let (got, bad, dup) = udp(&self.eps[a].ns.name, &self.eps[b].ns.name, &self.eps[b].ip, n, 1400);
        assert_eq!((bad, dup), (0, 0), "UDP {a} -> {b}: datagrams corrupt or duplicated");
        assert!(got >= n - n / 100, "UDP {a} -> {b}: only {got}/{n} datagrams arrived");
    }
}

/// Send datagrams from `from_ns` until one arrives at `to_ip` in `to_ns` (15 s at most).
pub fn reach(from_ns: &str, to_ns: &str, to_ip: &str) {
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

/// `n` numbered datagrams from `from_ns` to `to_ip:port` in `to_ns`, each carrying its
/// sequence number and the sha256 of its payload. Returns (received, corrupt,
/// duplicates); every received datagram must check out.
pub fn udp(from_ns: &str, to_ns: &str, to_ip: &str, n: u32, size: usize) -> (u32, u32, u32) {
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

pub struct Env {
    pub cg: TestCgroup,
    pub pins: PinDir,
    pub state: TempDir,
    _serial: std::sync::MutexGuard<'static, ()>,
}

impl Env {
    pub fn new() -> Env {
        require_root();
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        Env { _serial: serial, cg: TestCgroup::new(), pins: PinDir::new(), state: TempDir::new() }
    }

    pub fn config(&self, links: &str) -> String {
        format!(
            "[daemon]\npin_dir = \"{}\"\ncgroup = \"{}\"\nstate_dir = \"{}\"\nlog_level = \"debug\"\n\n{links}",
            self.pins.path().display(),
            self.cg.rel,
            self.state.path().display()
        )
    }

    /// bypassd running in the node netns.
    pub fn daemon(&self, t: &Topo, links: &str) -> Daemon {
        in_netns(Some(&t.node.name), || Daemon::start(&self.config(links))).unwrap().expect("start bypassd")
    }

    /// Write a new config for the running daemon and reload it (SIGHUP).
    pub fn reconfigure(&self, d: &mut Daemon, links: &str) {
        std::fs::write(&d.config, self.config(links)).expect("write config");
        d.reload().expect("reload");
    }

    pub fn links_dir(&self) -> std::path::PathBuf {
        self.pins.path().join("links")
    }

    /// Pinned TCX links (`link_tcx_*`) under the link folder.
    pub fn pinned(&self) -> Vec<String> {
        let mut v = Vec::new();
        for d in std::fs::read_dir(self.links_dir()).into_iter().flatten().flatten() {
            for f in std::fs::read_dir(d.path()).into_iter().flatten().flatten() {
                let n = f.file_name().to_string_lossy().into_owned();
                if n.starts_with("link_tcx_") {
                    v.push(n);
                }
            }
        }
        v.sort();
        v
    }
}

pub fn respawn(d: &mut Daemon, t: &Topo) {
    in_netns(Some(&t.node.name), || d.spawn()).unwrap().expect("restart bypassd");
}

/// Link counters straight from the pinned per-CPU map of the single entry.
pub fn link_counters(env: &Env) -> bypassd_ebpf::abi::LinkStats {
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

pub fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

