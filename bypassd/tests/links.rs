//! Root proof tests of the link datapath ([[links]]): pair mode (tap <-> veth, both
//! ways) and bridge mode (known unicast straight to its port, the rest through the
//! bridge), over real taps held by a relay, with and without virtio-net headers and
//! offloads. The bridge's own forwarding is counted (nftables, in the test's netns) to
//! show it is skipped. See linkenv/ for the topology.
//!
//! Needs root, iproute2, nftables, ethtool and clang (scripts/deps-links).
mod linkenv;

use bypass_testsupport::tap::in_netns;
use linkenv::{BR_IP, Env, Kind, Topo, link_counters, respawn, sh, wait_until};
use std::{net::UdpSocket, time::Duration};

const VM: usize = 0;
const POD: usize = 1;

fn pair_cfg(t: &Topo, a: usize, b: usize, extra: &str) -> String {
    format!("[[links]]\npair = [\"{}\", \"{}\"]\n{extra}\n", t.eps[a].port, t.eps[b].port)
}

/// Traffic a <-> b is intact, counted by the link, and not forwarded by the bridge.
fn check_skips_bridge(env: &Env, t: &Topo, a: usize, b: usize, max_bridge_frames: u64) {
    let before = link_counters(env);
    let fwd = t.bridge_forwarded();
    t.tcp(a, b, 32 << 20);
    t.udp(a, b, 3000);
    t.udp(b, a, 3000);
    let after = link_counters(env);
    let redirected = after.redirected_bytes - before.redirected_bytes;
    assert!(redirected >= 64 << 20, "the link redirected only {redirected} bytes: {before:?} -> {after:?}");
    let bridged = t.bridge_forwarded() - fwd;
    assert!(bridged <= max_bridge_frames, "the bridge still forwarded {bridged} frames");
}

/// `redirect`: "auto" reaches the pod's veth with bpf_redirect_peer, "egress" with
/// bpf_redirect (the tap side is always bpf_redirect).
fn pair_skips_the_bridge(vnet: bool, redirect: &str) {
    let env = Env::new();
    let t = Topo::new(&[Kind::Vm(vnet), Kind::Pod]);
    let fwd = t.bridge_forwarded();
    t.tcp(VM, POD, 1 << 20);
    // With virtio-net offloads a 64 KiB GSO frame crosses as one: 1 MiB each way can be
    // as few as ~40 frames (CI saw fewer than 100).
    let baseline = t.bridge_forwarded() - fwd;
    assert!(baseline > 10, "baseline traffic did not cross the bridge ({baseline} frames)");

    let d = env.daemon(&t, &pair_cfg(&t, VM, POD, &format!("redirect = \"{redirect}\"")));
    assert_eq!(env.pinned().len(), 2, "{}", d.log());
    // Which helper reaches the veth (its peer is in the pod's netns): read the port map.
    let peer_ports = port_flags(&env).iter().filter(|f| *f & bypassd_ebpf::abi::BL_PORT_PEER != 0).count();
    assert_eq!(peer_ports, usize::from(redirect == "auto"), "redirect = {redirect}");
    check_skips_bridge(&env, &t, VM, POD, 0);
}

/// The flags of every port in the single entry's pinned port map.
fn port_flags(env: &Env) -> Vec<u32> {
    use aya::maps::{HashMap, Map, MapData};
    let dir = std::fs::read_dir(env.links_dir()).expect("links dir").flatten().next().expect("an entry").path();
    let m = MapData::from_pin(dir.join("map_bl_ports")).expect("ports pin");
    let ports: HashMap<MapData, u32, bypassd_ebpf::abi::LinkPort> = HashMap::try_from(Map::from_map_data(m).unwrap()).unwrap();
    ports.iter().map(|r| r.unwrap().1.flags).collect()
}

#[test]
fn pair_skips_the_bridge_plain_tap_plain_redirect() {
    pair_skips_the_bridge(false, "egress");
}

#[test]
fn pair_skips_the_bridge_vnet_hdr_offloads_redirect_peer() {
    pair_skips_the_bridge(true, "auto");
}

#[test]
fn kill9_keeps_frames_flowing_restart_adopts_and_deleted_devices_are_followed() {
    let env = Env::new();
    let mut t = Topo::new(&[Kind::Vm(false), Kind::Pod]);
    let mut d = env.daemon(&t, &pair_cfg(&t, VM, POD, ""));
    d.kill9();
    // Frames keep flowing on the pinned links with no daemon.
    check_skips_bridge(&env, &t, VM, POD, 0);
    respawn(&mut d, &t);
    assert!(d.log().contains("adopted"), "{}", d.log());
    assert_eq!(env.pinned().len(), 2);

    // The VM goes away (tap deleted) and comes back: followed from netlink events
    // (well within one 5 s daemon tick).
    t.unplug(VM);
    wait_until("the stale tap link to go", 4, || env.pinned().len() == 1);
    t.plug(VM);
    wait_until("the new tap to be attached", 4, || env.pinned().len() == 2);
    check_skips_bridge(&env, &t, VM, POD, 0);

    // Deleted while bypassd is down: the pin (ifindex 0) is cleaned up at start.
    d.kill9();
    t.unplug(VM);
    respawn(&mut d, &t);
    assert_eq!(env.pinned().len(), 1, "{}", d.log());
    assert!(d.log().contains("missing; attached when it appears"), "{}", d.log());
    t.plug(VM);
    wait_until("the new tap to be attached", 4, || env.pinned().len() == 2);
    check_skips_bridge(&env, &t, VM, POD, 0);

    // Detach (as the package scripts do, after the daemon stopped) removes only our
    // links; the bridge carries the traffic again.
    d.kill9();
    let out = in_netns(Some(&t.node.name), || d.tool(&["--detach"])).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!env.links_dir().exists());
    let fwd = t.bridge_forwarded();
    t.tcp(VM, POD, 1 << 20);
    let bridged = t.bridge_forwarded() - fwd;
    assert!(bridged > 10, "after detach the bridge forwarded only {bridged} frames");
}

/// A tiny TCX program that counts the frames it sees and passes them on.
const OTHER_PROG: &str = r#"
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
struct { __uint(type, BPF_MAP_TYPE_ARRAY); __uint(max_entries, 1); __type(key, __u32); __type(value, __u64); } seen SEC(".maps");
SEC("classifier") int other_counter(struct __sk_buff *skb) {
    __u32 k = 0; __u64 *v = bpf_map_lookup_elem(&seen, &k);
    if (v) __sync_fetch_and_add(v, 1);
    return -1; /* TCX_NEXT */
}
char _license[] SEC("license") = "GPL";
"#;

/// A classic clsact (cls_bpf, direct-action) filter that passes everything on.
const OTHER_CLSACT: &str = r#"
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
SEC("classifier") int other_clsact(struct __sk_buff *skb) { return -1; /* TC_ACT_UNSPEC */ }
char _license[] SEC("license") = "GPL";
"#;

fn compile(src: &str) -> Vec<u8> {
    let dir = bypass_testsupport::TempDir::new();
    let (c, o) = (dir.path().join("other.c"), dir.path().join("other.o"));
    std::fs::write(&c, src).unwrap();
    let arch = String::from_utf8(std::process::Command::new("gcc").arg("-print-multiarch").output().unwrap().stdout).unwrap();
    sh(None, &["clang", "-O2", "-g", "-target", "bpf", &format!("-I/usr/include/{}", arch.trim()), "-c", c.to_str().unwrap(), "-o", o.to_str().unwrap()]);
    std::fs::read(&o).unwrap()
}

#[test]
fn other_tc_programs_keep_running_and_survive_detach() {
    use aya::programs::{LinkOrder, SchedClassifier, TcAttachType, tc::TcAttachOptions};
    let env = Env::new();
    let t = Topo::new(&[Kind::Vm(false), Kind::Pod]);
    let obj = compile(OTHER_PROG);
    let tap = t.eps[VM].port.clone();
    // Someone else's TCX program first in line on the tap, and a classic clsact filter on the veth.
    let mut other = in_netns(Some(&t.node.name), || {
        let mut ebpf = aya::Ebpf::load(&obj).expect("load other program");
        let p: &mut SchedClassifier = ebpf.program_mut("other_counter").unwrap().try_into().unwrap();
        p.load().unwrap();
        p.attach_with_options(&tap, TcAttachType::Ingress, TcAttachOptions::TcxOrder(LinkOrder::first())).unwrap();
        ebpf
    })
    .unwrap();
    let vh = t.eps[POD].port.clone();
    let dir = bypass_testsupport::TempDir::new();
    let clsact = dir.path().join("clsact.o");
    std::fs::write(&clsact, compile(OTHER_CLSACT)).unwrap();
    sh(Some(&t.node.name), &["tc", "qdisc", "add", "dev", &vh, "clsact"]);
    sh(Some(&t.node.name), &["tc", "filter", "add", "dev", &vh, "ingress", "pref", "7", "bpf", "da", "obj", clsact.to_str().unwrap(), "sec", "classifier"]);
    let seen = |ebpf: &mut aya::Ebpf| -> u64 {
        let m: aya::maps::Array<_, u64> = aya::maps::Array::try_from(ebpf.map_mut("seen").unwrap()).unwrap();
        m.get(&0, 0).unwrap()
    };

    let mut d = env.daemon(&t, &pair_cfg(&t, VM, POD, ""));
    let s0 = seen(&mut other);
    check_skips_bridge(&env, &t, VM, POD, 0);
    assert!(seen(&mut other) - s0 > 1000, "the other TCX program stopped seeing frames");

    d.kill9();
    let out = in_netns(Some(&t.node.name), || d.tool(&["--detach"])).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Both are still attached and still see the traffic, now on the bridge path.
    let s1 = seen(&mut other);
    t.tcp(VM, POD, 1 << 20);
    assert!(seen(&mut other) - s1 > 100, "the other TCX program lost its attachment");
    let filters = sh(Some(&t.node.name), &["tc", "-s", "filter", "show", "dev", &vh, "ingress"]);
    assert!(filters.contains("other_clsact") && filters.contains("pref 7"), "the clsact filter is gone: {filters}");
}

/// (rx, tx) as `ethtool -k` reports them (read independently of bypassd).
fn offloads(t: &Topo, dev: &str) -> (bool, bool, bool) {
    let out = sh(Some(&t.node.name), &["ethtool", "-k", dev]);
    let on = |k: &str| out.lines().find(|l| l.trim_start().starts_with(k)).is_some_and(|l| l.contains(": on"));
    (on("rx-checksumming:"), on("tx-checksumming:"), on("tx-tcp-segmentation:") && on("tx-tcp6-segmentation:"))
}

#[test]
fn offload_matrix_is_applied_read_back_and_restored() {
    let env = Env::new();
    // Two endpoints whose node-side ports can change offloads (veth), plus a plain tap.
    let t = Topo::new(&[Kind::Pod, Kind::Pod, Kind::Vm(false)]);
    let (a, b) = (t.eps[0].port.clone(), t.eps[1].port.clone());
    // A non-default original on one side: tx off (and so TSO off).
    sh(Some(&t.node.name), &["ethtool", "-K", &b, "tx", "off"]);
    let orig = (offloads(&t, &a), offloads(&t, &b));
    assert_eq!(orig.1, (true, false, false), "setup");
    let mut d = env.daemon(&t, &pair_cfg(&t, 0, 1, ""));
    for rx in ["keep", "on", "off"] {
        for tx in ["keep", "on", "off"] {
            env.reconfigure(&mut d, &pair_cfg(&t, 0, 1, &format!("checksum_offload = {{ rx = \"{rx}\", tx = \"{tx}\" }}")));
            for (dev, o) in [(&a, orig.0), (&b, orig.1)] {
                let want_rx = match rx { "on" => true, "off" => false, _ => o.0 };
                let want_tx = match tx { "on" => true, "off" => false, _ => o.1 };
                let got = offloads(&t, dev);
                assert_eq!((got.0, got.1), (want_rx, want_tx), "{dev} with rx={rx} tx={tx}");
                if !want_tx {
                    assert!(!got.2, "{dev}: TSO must be off with tx checksumming off");
                }
            }
            t.tcp(0, 1, 4 << 20);
        }
    }
    // The link leaves the config: every interface gets its original offloads back.
    env.reconfigure(&mut d, "");
    assert_eq!((offloads(&t, &a), offloads(&t, &b)), orig, "offloads not restored");

    // A plain tap: rx checksumming is fixed off, tx cannot be turned on without
    // TUNSETOFFLOAD. The kernel's refusal is reported, not hidden.
    let tap = t.eps[2].port.clone();
    let before = offloads(&t, &tap);
    env.reconfigure(&mut d, &format!("[[links]]\npair = [\"{tap}\", \"{a}\"]\nchecksum_offload = {{ rx = \"on\", tx = \"on\" }}\n"));
    let log = d.log();
    assert!(log.contains(&format!("rx-checksum on refused on {tap}: fixed by the driver")), "{log}");
    assert!(log.contains("degraded"), "{log}");
    env.reconfigure(&mut d, "");
    assert_eq!(offloads(&t, &tap), before);
}

#[test]
fn bridge_mode_vm_to_pod_and_dhcp_stays_on_the_bridge() {
    let env = Env::new();
    let t = Topo::new(&[Kind::Vm(true), Kind::Pod]);
    let _d = env.daemon(&t, &format!("[[links]]\nbridge = \"{}\"\n", t.br));
    assert_eq!(env.pinned().len(), 2);
    // ARP and the first frames (before learning) may cross the bridge.
    t.udp(VM, POD, 10);
    check_skips_bridge(&env, &t, VM, POD, 50);

    // DHCP: a broadcast DISCOVER reaches a server listening on the bridge.
    sh(Some(&t.eps[VM].ns.name), &["ip", "route", "add", "default", "dev", "eth0"]);
    let server = in_netns(Some(&t.node.name), || UdpSocket::bind("0.0.0.0:67")).unwrap().expect("bind :67");
    server.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    in_netns(Some(&t.eps[VM].ns.name), || {
        let c = UdpSocket::bind("0.0.0.0:68").expect("bind :68");
        c.set_broadcast(true).unwrap();
        c.send_to(b"DHCPDISCOVER", "255.255.255.255:67").unwrap();
    })
    .unwrap();
    let mut buf = [0u8; 64];
    let (n, _) = server.recv_from(&mut buf).expect("the DHCP broadcast did not reach the bridge");
    assert_eq!(&buf[..n], b"DHCPDISCOVER");
    // Unicast DHCP to a known MAC still goes through the bridge, not around it.
    let pod_server = in_netns(Some(&t.eps[POD].ns.name), || UdpSocket::bind("0.0.0.0:67")).unwrap().unwrap();
    pod_server.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let fwd = t.bridge_forwarded();
    let pod_ip = t.eps[POD].ip.clone();
    in_netns(Some(&t.eps[VM].ns.name), || {
        let c = UdpSocket::bind("0.0.0.0:68").expect("bind :68");
        for _ in 0..20 {
            c.send_to(b"DHCPREQUEST", format!("{pod_ip}:67")).unwrap();
        }
    })
    .unwrap();
    for _ in 0..20 {
        pod_server.recv_from(&mut buf).expect("unicast DHCP lost");
    }
    assert!(t.bridge_forwarded() - fwd >= 20, "unicast DHCP was redirected around the bridge");
    let _ = BR_IP;
}

#[test]
fn bridge_mode_vm_to_vm_pod_to_pod_and_a_moved_mac_is_followed() {
    let env = Env::new();
    let t = Topo::new(&[Kind::Vm(false), Kind::Vm(true), Kind::Pod, Kind::Pod, Kind::Pod]);
    let _d = env.daemon(&t, &format!("[[links]]\nbridge = \"{}\"\n", t.br));
    assert_eq!(env.pinned().len(), 5);
    t.udp(0, 1, 10);
    t.udp(2, 3, 10);
    // The bridge keeps what it must (ARP, IPv6 ND/MLD multicast, frames before a MAC is
    // learned): a few dozen frames against the ~30 000 each check sends.
    check_skips_bridge(&env, &t, 0, 1, 200);
    check_skips_bridge(&env, &t, 2, 3, 200);

    // Pod 3's MAC and address move to pod 4's port (a migration); pod 3 takes a new MAC.
    let (p3, p4) = (&t.eps[3].ns.name, &t.eps[4].ns.name);
    let mac = sh(Some(p3), &["cat", "/sys/class/net/eth0/address"]).trim().to_string();
    sh(Some(p3), &["ip", "link", "set", "eth0", "address", "02:00:00:00:00:33"]);
    sh(Some(p3), &["ip", "addr", "flush", "dev", "eth0"]);
    sh(Some(p4), &["ip", "addr", "flush", "dev", "eth0"]);
    sh(Some(p4), &["ip", "link", "set", "eth0", "address", &mac]);
    sh(Some(p4), &["ip", "addr", "add", &format!("{}/24", t.eps[3].ip), "dev", "eth0"]);
    // The moved MAC speaks once (as a migrated guest announces itself).
    t.reach(4, 2);
    // Pod 2 still has the MAC in its ARP cache: its frames must go to the new port.
    let (got, bad, dup) = linkenv::udp(&t.eps[2].ns.name, p4, &t.eps[3].ip, 2000, 1400);
    assert_eq!((bad, dup), (0, 0));
    assert!(got >= 1980, "only {got}/2000 datagrams reached the MAC's new port");
}

/// `/metrics` of a daemon listening on 127.0.0.1:9477 in netns `ns`.
fn metrics(ns: &str) -> String {
    use std::io::{Read, Write};
    in_netns(Some(ns), || {
        let mut s = std::net::TcpStream::connect("127.0.0.1:9477").expect("connect to the metrics endpoint");
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
    .unwrap()
}

/// A sample's value from OpenMetrics text (0 when absent).
fn sample(text: &str, series: &str) -> u64 {
    text.lines().find_map(|l| l.strip_prefix(series)?.trim().parse().ok()).unwrap_or(0)
}

/// The ports of a VM live in a netns that is not bypassd's (KubeVirt: the pod's).
/// `netns =` attaches, applies offloads and watches there; a missing netns file is a
/// pending entry; a deleted and re-created interface in it is re-attached. Per-port
/// counters (metrics `port` label) account for each side's own frames.
#[test]
fn pair_inside_another_netns_is_attached_watched_and_counted_per_port() {
    use bypass_testsupport::{Daemon, Netns};
    let env = Env::new();
    let mut t = Topo::new(&[Kind::Vm(false), Kind::Pod]);
    let own = Netns::new(); // bypassd's netns: it has none of the interfaces
    let ghost = format!("/run/netns/{}-gone", t.node.name);
    let cfg = format!(
        "{}\nnetns = \"/run/netns/{}\"\nchecksum_offload = {{ tx = \"off\" }}\n\n[[links]]\npair = [\"a0\", \"b0\"]\nnetns = \"{ghost}\"\n\n[metrics]\nlisten = \"127.0.0.1:9477\"\n",
        pair_cfg(&t, VM, POD, "").trim_end(),
        t.node.name
    );
    let mut d = in_netns(Some(&own.name), || Daemon::start(&env.config(&cfg))).unwrap().expect("start bypassd");
    let log = d.log();
    assert_eq!(env.pinned().len(), 2, "{log}");
    assert!(log.contains(&format!("watching netlink events in netns /run/netns/{}", t.node.name)), "{log}");
    assert!(log.contains(&format!("netns {ghost} missing; attached when it appears")), "{log}");
    // The offload was applied to the pod's port inside that netns (read there by ethtool).
    assert!(!offloads(&t, &t.eps[POD].port).1, "tx-checksum is still on inside the netns");

    // Both ways through the link; each side counts the frames arriving on it.
    let (vm, pod) = (t.eps[VM].port.clone(), t.eps[POD].port.clone());
    let id = format!("{vm}+{pod}@{}", t.node.name);
    let m0 = metrics(&own.name);
    check_skips_bridge(&env, &t, VM, POD, 0);
    let m1 = metrics(&own.name);
    let port = |m: &str, p: &str, what: &str| sample(m, &format!("bypassd_link_port_{what}_total{{link=\"{id}\",port=\"{p}\",action=\"redirected\"}}"));
    let total = |m: &str| sample(m, &format!("bypassd_link_bytes_total{{link=\"{id}\",action=\"redirected\"}}"));
    let (dv, dp) = (port(&m1, &vm, "bytes") - port(&m0, &vm, "bytes"), port(&m1, &pod, "bytes") - port(&m0, &pod, "bytes"));
    // 32 MiB each way plus UDP: each side has at least one direction's bytes.
    assert!(dv >= 32 << 20 && dp >= 32 << 20, "per-port redirected bytes: {vm} +{dv}, {pod} +{dp}\n{m1}");
    assert_eq!(dv + dp, total(&m1) - total(&m0), "the ports do not add up to the entry\n{m1}");

    // The VM's tap goes and comes back inside that netns: followed there.
    t.unplug(VM);
    wait_until("the stale tap link to go", 4, || env.pinned().len() == 1);
    t.plug(VM);
    wait_until("the new tap to be attached", 4, || env.pinned().len() == 2);
    check_skips_bridge(&env, &t, VM, POD, 0);

    // Leaving the config: detached and the offload restored, inside the netns.
    env.reconfigure(&mut d, "");
    assert!(offloads(&t, &pod).1, "tx-checksum not restored inside the netns");
    assert!(env.pinned().is_empty());
}

/// Bridge mode copies the bridge's FDB when it attaches: a MAC the bridge learned
/// before bypassd started is redirected from the first frame, with no frame from it
/// to learn from (the receiver stays silent: no IPv6, a permanent ARP entry).
#[test]
fn bridge_mode_redirects_macs_the_bridge_knew_before_it_started() {
    let env = Env::new();
    let t = Topo::new(&[Kind::Pod, Kind::Pod]);
    let (ns0, ns1) = (t.eps[0].ns.name.clone(), t.eps[1].ns.name.clone());
    sh(Some(&ns1), &["sysctl", "-qw", "net.ipv6.conf.eth0.disable_ipv6=1"]);
    let mac1 = sh(Some(&ns1), &["cat", "/sys/class/net/eth0/address"]).trim().to_string();
    sh(Some(&ns0), &["ip", "neigh", "replace", &t.eps[1].ip, "lladdr", &mac1, "dev", "eth0", "nud", "permanent"]);
    // Topo::new made pod 1 answer (ARP), so the bridge knows its MAC.
    let fdb = sh(Some(&t.node.name), &["bridge", "fdb", "show", "br", &t.br]);
    assert!(fdb.contains(&mac1), "setup: the bridge has not learned {mac1}: {fdb}");

    let d = env.daemon(&t, &format!("[[links]]\nbridge = \"{}\"\n", t.br));
    assert!(d.log().contains("MACs taken from the bridge's FDB"), "{}", d.log());
    let before = link_counters(&env);
    let fwd = t.bridge_forwarded();
    let (got, bad, dup) = linkenv::udp(&ns0, &ns1, &t.eps[1].ip, 1000, 1400);
    assert_eq!((bad, dup), (0, 0));
    assert!(got >= 990, "only {got}/1000 datagrams arrived");
    let after = link_counters(&env);
    let redirected = after.redirected_frames - before.redirected_frames;
    let bridged = t.bridge_forwarded() - fwd;
    // Without the dump every one of them would cross the bridge (nothing to learn from).
    assert!(redirected >= 1000, "only {redirected} frames redirected, {bridged} bridged");
    assert!(bridged <= 5, "the bridge still forwarded {bridged} frames");
}

/// Bridge mode where the bridge lives in a netns other than bypassd's (`netns =`, as a
/// KubeVirt pod's bridge does): its ports are attached there, its FDB is read and
/// followed there (netlink in that netns), and known unicast skips it both ways.
#[test]
fn bridge_mode_inside_another_netns_learns_there_and_skips_the_bridge() {
    use bypass_testsupport::{Daemon, Netns};
    let env = Env::new();
    let t = Topo::new(&[Kind::Vm(true), Kind::Pod, Kind::Pod]);
    let own = Netns::new(); // bypassd's netns: it has none of the interfaces
    let cfg = format!("[[links]]\nbridge = \"{}\"\nnetns = \"/run/netns/{}\"\n", t.br, t.node.name);
    let d = in_netns(Some(&own.name), || Daemon::start(&env.config(&cfg))).unwrap().expect("start bypassd");
    let log = d.log();
    assert_eq!(env.pinned().len(), 3, "every bridge port attached: {log}");
    assert!(log.contains(&format!("watching netlink events in netns /run/netns/{}", t.node.name)), "{log}");
    assert!(log.contains("MACs taken from the bridge's FDB"), "the FDB was not read in its netns: {log}");
    t.udp(VM, POD, 10);
    check_skips_bridge(&env, &t, VM, POD, 50);
    t.udp(1, 2, 10);
    check_skips_bridge(&env, &t, 1, 2, 50);
}
