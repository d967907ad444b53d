//! Service mesh edge cases (issue 11): many short connections, port reuse, a crash of
//! bypassd mid-transfer, and a proxy that never asks for the original destination.
mod mesh_support;

use bypassd_ebpf::abi::Counter;
use mesh_support::*;
use std::time::Duration;

/// 1000 short connections through app -> Envoy -> Envoy -> app: each gets its own
/// stream back (bypass-traffic checks every connection's seeded sha256 both ways, so
/// a crossed pairing fails it), and no pairing entry outlives its sockets.
#[test]
fn thousand_short_connections_each_get_their_own_echo_and_leave_no_pairs() {
    let m = Mesh::new(capture::Capture::Iptables);
    let (srv, _) = m.env.serve(&m.pods.b, "[::]:80", &["--count", "1000"]);
    for batch in 0..10 {
        let seed = (1000 + batch * 100).to_string();
        let c = m.env.send(&m.pods.a, &format!("{POD_B4}:80"), &["--conns", "100", "--bytes", "16384", "--max-write", "4096", "--seed", &seed]);
        let v = finish(c);
        assert_eq!(v["bytes_received"].as_u64(), Some(100 * 16384), "{v}");
    }
    finish(srv);
    m.wait_no_nat_pairs(Duration::from_secs(30));
    let why = format!("answers seen {}, unpaired {}", m.counter(Counter::OrigDstSeen), m.counter(Counter::NatUnpaired));
    assert_eq!(m.counter(Counter::NatNotClient), 0, "a real client failed the sequence check ({why})");
    assert_eq!(m.counter(Counter::NatPairedLocal), 1000, "every app -> sidecar connection paired ({why})");
    assert_eq!(m.counter(Counter::NatPairedInbound), 1000, "every sidecar -> sidecar connection paired");
    // Two entries a pair (one per socket), each deleted exactly once.
    assert_eq!(m.counter(Counter::NatCleared), 4000, "every pair's two entries removed exactly once");
    assert!(m.counter(Counter::NatRedirectedBytes) > 0);
}

/// Linux lets two sockets share a local port toward different destinations. One goes
/// to the service (captured, NAT-paired), the other to a local server the capture
/// leaves alone: guessing the pair from the client's address and port would confuse
/// them; the proxy's SO_ORIGINAL_DST answer names the exact tuple.
#[test]
fn same_local_port_toward_the_service_and_an_uncaptured_destination() {
    let m = Mesh::new(capture::Capture::Iptables);
    let (srv_b, _) = m.env.serve(&m.pods.b, "[::]:80", &[]);
    // Traffic to the pod's own address over lo from a non-proxy uid is not captured.
    let (srv_a, local_port) = m.env.serve(&m.pods.a, &format!("{POD_A4}:0"), &[]);
    let common = ["--source", POD_A4, "--source-port", "41000", "--bytes", &(32 * MIB).to_string()];
    let to_service = m.env.send(&m.pods.a, &format!("{POD_B4}:80"), &[&common[..], &["--seed", "7"]].concat());
    let to_local = m.env.send(&m.pods.a, &format!("{POD_A4}:{local_port}"), &[&common[..], &["--seed", "8"]].concat());
    finish(to_service);
    finish(to_local);
    finish(srv_b);
    finish(srv_a);
    assert_eq!(m.counter(Counter::NatPairedLocal), 1);
    assert_eq!(m.counter(Counter::NatPairedInbound), 1);
    m.wait_no_nat_pairs(Duration::from_secs(10));
}

/// The same 4-tuple again right after a connection closed (tcp_tw_reuse lets the
/// client reuse its port while the old one lingers in TIME_WAIT / FIN-WAIT-2): the new
/// socket pairs with its own proxy socket, never with the dead one.
#[test]
fn reused_client_port_pairs_with_the_new_proxy_socket_only() {
    let m = Mesh::new(capture::Capture::Iptables);
    for ns in [&m.pods.a, &m.pods.b] {
        let st = std::process::Command::new("ip")
            .args(["netns", "exec", &ns.name, "sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"])
            .status()
            .expect("sysctl");
        assert!(st.success());
    }
    let (srv, _) = m.env.serve(&m.pods.b, "[::]:80", &["--count", "3"]);
    for seed in ["21", "22", "23"] {
        let c = m.env.send(&m.pods.a, &format!("{POD_B4}:80"), &["--source-port", "42000", "--bytes", &(8 * MIB).to_string(), "--seed", seed]);
        finish(c);
        std::thread::sleep(Duration::from_millis(1100)); // TIME_WAIT reuse needs a newer timestamp
    }
    finish(srv);
    assert_eq!(m.counter(Counter::NatPairedLocal), 3);
    m.wait_no_nat_pairs(Duration::from_secs(10));
}

/// A FIN-WAIT-2 socket lingering while its port is reused. The app sends, shuts down its
/// write side and keeps reading (FIN-WAIT-2: Envoy holds its side on 15001 open, waiting
/// for the upstream's answer), so its pair stands. It then connects again from the same
/// port to another captured destination. The kernel allows it (another 4-tuple), but
/// both connections would meet Envoy as 127.0.0.1:15001 <- app:port, so conntrack remaps
/// the new one's source port (to 1..511 for a port below 512). The proxy's tuple then
/// names a port the app does not own: the socket owning (app:remapped -> destination),
/// here a squatter on every such port, must not be taken for the client. The two
/// sockets of a real hop share one sequence space (REDIRECT leaves it alone); a squatter
/// does not, and bypassd checks that before pairing. (An orphaned FIN-WAIT-2 socket is a
/// timewait socket, whose entries went at its TCP_CLOSE: the reuse test above covers it.)
#[test]
fn fin_wait_2_socket_lingering_while_its_port_is_reused_pairs_only_real_hops() {
    let m = Mesh::new(capture::Capture::Iptables);
    let (a, b) = (&m.pods.a, &m.pods.b);
    in_ns(a, &["sysctl", "-qw", "net.ipv4.ip_unprivileged_port_start=0"]); // the squatters, uid 1337
    let root = |ns: &bypass_testsupport::Netns| ns.command(Some(&m.env.cg), "env");
    let mut answer = Script::spawn(root(b), &["server", "80", &(MIB).to_string()]);
    answer.next();
    let mut lingering = Script::spawn(root(a), &["client", POD_B4, "80", POD_A4, "300", &(4 * MIB).to_string()]);
    lingering.next();
    lingering.go();
    let sent = lingering.next();
    assert_eq!(answer.next()["received"], sent["sent"], "app -> app bytes intact");
    let fw2 = in_ns(a, &["ss", "-Htan", "state", "fin-wait-2"]);
    assert!(fw2.contains(&format!("{POD_A4}:300 ")), "the app's socket lingers in FIN-WAIT-2: {fw2:?}");
    let pairs = m.env.datapath().nat_pairs().expect("nat pairs");
    assert!(pairs.iter().any(|(k, _)| k.local_port == 300), "the lingering socket's pair stands: {pairs:?}");
    assert_eq!(m.counter(Counter::NatPairedLocal), 1);

    let mut echo = Script::spawn(root(b), &["echo", "15008"]); // 15008 is not captured inbound
    echo.next();
    let mut squat_cmd = a.command(Some(&m.env.cg), "setpriv");
    squat_cmd.args(["--reuid", "1337", "--regid", "1337", "--clear-groups", "env"]);
    let mut squatters = Script::spawn(squat_cmd, &["squat", POD_A4, POD_B4, "15008", "300"]);
    assert_eq!(squatters.next()["ready"], 510);
    let unpaired = m.counter(Counter::NatUnpaired);
    let mut reuse = Script::spawn(root(a), &["client", POD_B4, "15008", POD_A4, "300", &(64 * MIB).to_string()]);
    reuse.next(); // connected: Envoy's socket for it exists now
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let remapped = loop {
        let ss = in_ns(a, &["ss", "-Htan"]);
        let found = ss.lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let port = f.get(4)?.strip_prefix(&format!("{POD_A4}:"))?.parse::<u16>().ok()?;
            (f.get(3) == Some(&"127.0.0.1:15001") && port != 300).then_some(port)
        });
        match found {
            Some(p) => break p,
            None => assert!(std::time::Instant::now() < deadline, "Envoy's socket for the reused port not seen:\n{ss}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    reuse.go();
    let sent = reuse.next();
    let echoed = reuse.next();
    assert_eq!(echoed["received"], sent["sent"], "the reused port's bytes intact both ways (echo)");
    assert_eq!(echoed["bytes"].as_u64(), Some(64 * MIB));
    reuse.wait();
    assert!(remapped < 512, "conntrack remapped 300 to {remapped}, outside the squatted range");
    assert_eq!(m.counter(Counter::NatPairedLocal), 1, "Envoy's socket from :{remapped} was paired with the squatter on :{remapped}");
    assert_eq!(m.counter(Counter::NatUnpaired), unpaired + 1, "the remapped hop stays on TCP");
    assert_eq!(m.counter(Counter::NatNotClient), 1, "the squatter failed the sequence check");
    squatters.go();
    let stray = squatters.next();
    assert_eq!(stray["stray"], serde_json::json!({}), "bytes delivered to squatters");
    squatters.wait();

    // The lingering socket still gets its answer, through its own pair.
    answer.go();
    let answered = answer.next();
    assert_eq!(lingering.next()["received"], answered["sent"], "app <- app bytes intact");
    lingering.wait();
    answer.wait();
    m.wait_no_nat_pairs(Duration::from_secs(10));
}

/// kill -9 of bypassd mid-transfer, then a restart: the pinned datapath keeps pairing,
/// bytes stay intact, and connections after the restart pair too.
#[test]
fn kill9_mid_mesh_transfer_then_restart_stays_intact() {
    let mut m = Mesh::new(capture::Capture::Iptables);
    let (srv, _) = m.env.serve(&m.pods.b, "[::]:80", &["--count", "3"]);
    let c = m.env.send(&m.pods.a, &format!("{POD_B4}:80"), &["--conns", "2", "--bytes", &(200 * MIB).to_string()]);
    std::thread::sleep(Duration::from_millis(700));
    m.daemon.kill9();
    let mid = m.counter(Counter::RedirectedBytes);
    m.daemon.spawn().expect("restart");
    assert!(m.daemon.log().contains("adopted"), "restart must adopt the pinned datapath:\n{}", m.daemon.log());
    finish(c);
    assert!(m.counter(Counter::RedirectedBytes) > mid, "redirection went on after the restart");
    let after = m.counter(Counter::NatPairedLocal);
    finish(m.env.send(&m.pods.a, &format!("{POD_B4}:80"), &["--bytes", &(8 * MIB).to_string()]));
    finish(srv);
    assert_eq!(m.counter(Counter::NatPairedLocal), after + 1, "a new connection pairs after the restart");
    m.wait_no_nat_pairs(Duration::from_secs(10));
}

/// A proxy that never asks SO_ORIGINAL_DST (fixed upstream, no original_dst filter):
/// its hop stays on TCP, intact; only the sidecar -> sidecar hop (which asks) pairs.
#[test]
fn proxy_that_never_asks_stays_on_tcp_and_intact() {
    let env = Env::new();
    let pods = Pods::new();
    capture::install(&pods.a, capture::Capture::Iptables);
    capture::install(&pods.b, capture::Capture::Iptables);
    let _d = env.daemon();
    let _ea = envoy::Envoy::start_with(&pods.a, &env.cg, &env.dir, &envoy::config_static((POD_B4, 80)));
    let _eb = envoy::Envoy::start(&pods.b, &env.cg, &env.dir);
    let (srv, _) = env.serve(&pods.b, "[::]:80", &[]);
    let v = finish(env.send(&pods.a, &format!("{POD_B4}:80"), &["--bytes", &(32 * MIB).to_string()]));
    finish(srv);
    assert_eq!(v["bytes_received"].as_u64(), Some(32 * MIB));
    assert_eq!(env.counter(Counter::NatPairedLocal), 0, "nobody asked on 15001: nothing to pair");
    assert_eq!(env.counter(Counter::NatPairedInbound), 1, "Envoy B asked on 15006");
    assert!(env.counter(Counter::PassedBytes) >= 64 * MIB, "the unpaired hop carried both directions on TCP");
}

/// Policy applies as usual. The mesh pod's rules: the sidecars by uid 1337, the apps by
/// their cgroup (README "Service mesh"). An app outside those rules keeps its hop to the
/// sidecar on TCP (its socket is not admitted), while the sidecar hops still pair.
#[test]
fn policy_uid_1337_plus_the_app_cgroup_accelerates_the_mesh_and_nothing_else() {
    let env = Env::new();
    let pods = Pods::new();
    capture::install(&pods.a, capture::Capture::Iptables);
    capture::install(&pods.b, capture::Capture::Iptables);
    let (apps, other) = (env.cg.child("apps"), env.cg.child("other"));
    let policy = format!(
        "[policy]\ndefault = \"kernel\"\n[[policy.rules]]\nname = \"sidecars\"\naction = \"accelerate\"\nuid = 1337\n\
         [[policy.rules]]\nname = \"apps\"\naction = \"accelerate\"\ncgroup = \"{}\"\n",
        apps.rel
    );
    let _d = bypass_testsupport::Daemon::start(&env.config(&policy)).expect("start bypassd");
    let _ea = envoy::Envoy::start(&pods.a, &env.cg, &env.dir);
    let _eb = envoy::Envoy::start(&pods.b, &env.cg, &env.dir);
    let traffic = |ns: &bypass_testsupport::Netns, cg| ns.command(Some(cg), bypass_testsupport::bin("bypass-traffic"));
    let port_file = env.dir.path().join("app.port");
    let srv = traffic(&pods.b, &apps)
        .args(["serve", "--listen", "[::]:80", "--count", "2", "--port-file"])
        .arg(&port_file)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("serve");
    while !port_file.exists() {
        std::thread::sleep(Duration::from_millis(10));
    }
    for (cg, want_local) in [(&apps, 1), (&other, 1)] {
        let before = env.counter(Counter::NatPairedInbound);
        let c = traffic(&pods.a, cg)
            .args(["send", "--connect", &format!("{POD_B4}:80"), "--bytes", &(16 * MIB).to_string()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("send");
        finish(c);
        assert_eq!(env.counter(Counter::NatPairedLocal), want_local, "app hop pairs only for the admitted app");
        assert_eq!(env.counter(Counter::NatPairedInbound), before + 1, "the sidecar hop pairs either way");
    }
    finish(srv);
    assert_eq!(env.counter(Counter::NatUnpaired), 1, "the other app's hop: answer seen, one socket not admitted");
}
