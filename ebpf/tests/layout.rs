//! The C header and the Rust mirror must agree on every size, offset and constant.
//! This compiles a probe against `include/bypass_abi.h` with the host C compiler
//! and compares what it prints with `core::mem::{size_of, offset_of}`.
use bypassd_ebpf::abi::*;
use std::{collections::BTreeMap, mem::{offset_of, size_of}, path::Path, process::Command};

fn c_layout() -> BTreeMap<String, u64> {
    let dir = std::env::temp_dir().join(format!("bypass-layout-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let include = Path::new(env!("CARGO_MANIFEST_DIR")).join("include");
    let mut src = String::from("#include <stdio.h>\n#include <stddef.h>\n#include \"bypass_abi.h\"\nint main(void){\n");
    let mut emit = |name: &str, expr: &str| {
        src.push_str(&format!("printf(\"{name} %llu\\n\", (unsigned long long)({expr}));\n"));
    };
    for (ty, fields) in [
        ("bp_sock_key", &["local_ip", "remote_ip", "local_port", "remote_port", "netns"][..]),
        ("bp_rule", &["local_ip", "remote_ip", "local_prefix", "remote_prefix", "action", "flags",
            "local_port_lo", "local_port_hi", "remote_port_lo", "remote_port_hi", "uid", "cgroup_id"][..]),
        ("bp_policy_meta", &["nrules", "default_action"][..]),
        ("bp_sk_info", &["cgroup_id", "uid", "flags", "recv_seq", "promote"][..]),
        ("bp_promote_req", &["key", "cookie", "ino", "tgid", "fd_hint"][..]),
        ("bp_rx_state", &["copied_seq", "rcvbuf", "queued", "ready", "spliced", "sk", "cookie", "redirected", "pace_read", "pace_ns", "window", "send", "turns", "samples", "seen_in", "turn_seq", "pad"][..]),
        // Link datapath.
        ("bl_port", &["target", "slot", "flags", "offload"][..]),
        ("bl_mac", &["addr", "pad"][..]),
        ("bl_fdb_entry", &["ifindex", "flags", "seen_ns"][..]),
        ("bl_stats", &["redirected_frames", "redirected_bytes", "passed_frames", "passed_bytes"][..]),
        ("bp_nat_peer", &["peer", "path", "reserved"][..]),
    ] {
        emit(&format!("sizeof.{ty}"), &format!("sizeof(struct {ty})"));
        for f in fields {
            emit(&format!("{ty}.{f}"), &format!("offsetof(struct {ty}, {f})"));
        }
    }
    for c in ["BP_ABI_VERSION", "BP_MAX_RULES", "BP_CTR_SOCKETS_INSERTED", "BP_CTR_INSERT_FAILURES",
        "BP_CTR_REDIRECTED_MSGS", "BP_CTR_REDIRECTED_BYTES", "BP_CTR_PASSED_MSGS", "BP_CTR_PASSED_BYTES",
        "BP_CTR_POLICY_KERNEL", "BP_CTR_PAUSED_SKIPS", "BP_CTR_ORDER_WAIT", "BP_CTR_BACKPRESSURE",
        "BP_CTR_NOT_READY", "BP_CTR_SPLICE_KEPT", "BP_CTR_SPLICE_SEEN", "BP_CTR_SPLICE_STRANDED",
        "BP_CTR_SPLICE_REFUSED", "BP_CTR_STRANDED_DROPS", "BP_CTR_COALESCED", "BP_CTR_PEER_STALE",
        "BP_CTR_WINDOW_GROWN", "BP_CTR_BACKPRESSURE_GROWN", "BP_CTR_PRESSURE_HELD", "BP_CTR_MAX",
        "BP_CTR_ORIGDST_SEEN", "BP_CTR_NAT_PAIRED_LOCAL", "BP_CTR_NAT_PAIRED_INBOUND", "BP_CTR_NAT_UNPAIRED",
        "BP_CTR_NAT_REDIRECTED_MSGS", "BP_CTR_NAT_REDIRECTED_BYTES", "BP_CTR_NAT_CLEARED",
        "BP_CTR_NAT_LOCAL_REDIRECTED_BYTES", "BP_CTR_NAT_NOT_CLIENT", "BP_NAT_PATH_LOCAL", "BP_NAT_PATH_INBOUND",
        "BP_CTL_POLICY_SEQ", "BP_CTL_PAUSED", "BP_CTL_QUEUE_CAP", "BP_CTL_RECV_GATE", "BP_CTL_COALESCE_BELOW", "BP_CTL_MAX",
        "BP_ACTION_KERNEL", "BP_ACTION_ACCELERATE",
        "BP_RULE_MATCH_CGROUP", "BP_RULE_MATCH_UID", "BP_SK_KNOWN", "BP_SK_NO_REDIRECT_IN", "BP_SK_READY", "BP_COMM_LEN",
        "BP_SPLICER_CONFIGURED", "BP_SPLICER_LEARNED",
        "BP_CTR_SENDER_AT_INSERT", "BP_CTR_SENDER_PROMOTED", "BP_CTR_SENDER_FAILED", "BP_CTL_SEND_MODE",
        "BP_CTL_PIDNS_DEV", "BP_CTL_PIDNS_INO",
        "BP_SEND_ALL", "BP_SEND_AUTO", "BP_SEND_NONE", "BP_SENDER_NONE", "BP_SENDER_WANTED",
        "BP_SENDER_AT_INSERT", "BP_SENDER_UNPAIRED", "BP_SENDER_FAILED", "BP_NO_FD_HINT", "BP_SENDER_QUEUED", "BP_CTR_PROMOTE_FAILED",
        "BL_ABI_VERSION", "BL_MAX_PORTS", "BL_MAX_FDB", "BL_PORT_PEER", "BL_PORT_BRIDGE", "BL_OFF_RX_SAVED",
        "BL_OFF_RX_ON", "BL_OFF_TX_SAVED", "BL_OFF_TX_ON", "BL_CTL_AGEING_NS", "BL_CTL_MAX"] {
        emit(c, c);
    }
    src.push_str("return 0;}\n");
    let c = dir.join("probe.c");
    let exe = dir.join("probe");
    std::fs::write(&c, src).unwrap();
    let st = Command::new("cc").arg(format!("-I{}", include.display())).arg(&c).arg("-o").arg(&exe)
        .status().expect("run cc");
    assert!(st.success(), "cc failed to build the layout probe");
    let out = Command::new(&exe).output().expect("run probe");
    let _ = std::fs::remove_dir_all(&dir);
    String::from_utf8(out.stdout).unwrap().lines()
        .map(|l| { let (k, v) = l.split_once(' ').unwrap(); (k.to_string(), v.parse().unwrap()) })
        .collect()
}

macro_rules! rust_layout {
    ($m:ident, $cname:literal, $ty:ty, [$($f:ident),*]) => {
        $m.insert(concat!("sizeof.", $cname).to_string(), size_of::<$ty>() as u64);
        $( $m.insert(concat!($cname, ".", stringify!($f)).to_string(), offset_of!($ty, $f) as u64); )*
    };
}

#[test]
fn c_and_rust_layouts_agree() {
    let c = c_layout();
    let mut r = BTreeMap::new();
    rust_layout!(r, "bp_sock_key", SockKey, [local_ip, remote_ip, local_port, remote_port, netns]);
    rust_layout!(r, "bp_rule", Rule, [local_ip, remote_ip, local_prefix, remote_prefix, action, flags,
        local_port_lo, local_port_hi, remote_port_lo, remote_port_hi, uid, cgroup_id]);
    rust_layout!(r, "bp_policy_meta", PolicyMeta, [nrules, default_action]);
    rust_layout!(r, "bp_sk_info", SkInfo, [cgroup_id, uid, flags, recv_seq, promote]);
    rust_layout!(r, "bp_promote_req", PromoteReq, [key, cookie, ino, tgid, fd_hint]);
    rust_layout!(r, "bp_rx_state", RxState, [copied_seq, rcvbuf, queued, ready, spliced, sk, cookie, redirected, pace_read, pace_ns, window, send, turns, samples, seen_in, turn_seq, pad]);
    rust_layout!(r, "bl_port", LinkPort, [target, slot, flags, offload]);
    rust_layout!(r, "bl_mac", LinkMac, [addr, pad]);
    rust_layout!(r, "bl_fdb_entry", LinkFdbEntry, [ifindex, flags, seen_ns]);
    rust_layout!(r, "bl_stats", LinkStats, [redirected_frames, redirected_bytes, passed_frames, passed_bytes]);
    rust_layout!(r, "bp_nat_peer", NatPeer, [peer, path, reserved]);
    let consts: [(&str, u64); 51] = [
        ("BP_ABI_VERSION", ABI_VERSION.into()), ("BP_MAX_RULES", MAX_RULES.into()),
        ("BP_CTR_SOCKETS_INSERTED", Counter::SocketsInserted as u64),
        ("BP_CTR_INSERT_FAILURES", Counter::InsertFailures as u64),
        ("BP_CTR_REDIRECTED_MSGS", Counter::RedirectedMsgs as u64),
        ("BP_CTR_REDIRECTED_BYTES", Counter::RedirectedBytes as u64),
        ("BP_CTR_PASSED_MSGS", Counter::PassedMsgs as u64),
        ("BP_CTR_PASSED_BYTES", Counter::PassedBytes as u64),
        ("BP_CTR_POLICY_KERNEL", Counter::PolicyKernel as u64),
        ("BP_CTR_PAUSED_SKIPS", Counter::PausedSkips as u64),
        ("BP_CTR_ORDER_WAIT", Counter::OrderWait as u64),
        ("BP_CTR_BACKPRESSURE", Counter::Backpressure as u64),
        ("BP_CTR_NOT_READY", Counter::NotReady as u64),
        ("BP_CTR_SPLICE_KEPT", Counter::SpliceKept as u64),
        ("BP_CTR_SPLICE_SEEN", Counter::SpliceSeen as u64),
        ("BP_CTR_SPLICE_STRANDED", Counter::SpliceStranded as u64),
        ("BP_CTR_SPLICE_REFUSED", Counter::SpliceRefused as u64),
        ("BP_CTR_STRANDED_DROPS", Counter::StrandedDrops as u64),
        ("BP_CTR_COALESCED", Counter::Coalesced as u64),
        ("BP_CTR_PEER_STALE", Counter::PeerStale as u64),
        ("BP_CTR_WINDOW_GROWN", Counter::WindowGrown as u64),
        ("BP_CTR_BACKPRESSURE_GROWN", Counter::BackpressureGrown as u64),
        ("BP_CTR_PRESSURE_HELD", Counter::PressureHeld as u64),
        ("BP_CTR_MAX", Counter::COUNT.into()),
        ("BP_CTL_POLICY_SEQ", CTL_POLICY_SEQ.into()), ("BP_CTL_PAUSED", CTL_PAUSED.into()),
        ("BP_CTL_QUEUE_CAP", CTL_QUEUE_CAP.into()), ("BP_CTL_RECV_GATE", CTL_RECV_GATE.into()),
        ("BP_CTL_COALESCE_BELOW", CTL_COALESCE_BELOW.into()),
        ("BP_CTL_MAX", CTL_MAX.into()), ("BP_ACTION_KERNEL", ACTION_KERNEL.into()),
        ("BP_ACTION_ACCELERATE", ACTION_ACCELERATE.into()),
        ("BP_RULE_MATCH_CGROUP", RULE_MATCH_CGROUP.into()), ("BP_RULE_MATCH_UID", RULE_MATCH_UID.into()),
        ("BP_SK_KNOWN", SK_KNOWN.into()), ("BP_SK_NO_REDIRECT_IN", SK_NO_REDIRECT_IN.into()),
        ("BP_SK_READY", SK_READY.into()),
        ("BP_COMM_LEN", COMM_LEN as u64), ("BP_SPLICER_CONFIGURED", SPLICER_CONFIGURED),
        ("BP_SPLICER_LEARNED", SPLICER_LEARNED),
        ("BP_CTR_ORIGDST_SEEN", Counter::OrigDstSeen as u64),
        ("BP_CTR_NAT_PAIRED_LOCAL", Counter::NatPairedLocal as u64),
        ("BP_CTR_NAT_PAIRED_INBOUND", Counter::NatPairedInbound as u64),
        ("BP_CTR_NAT_UNPAIRED", Counter::NatUnpaired as u64),
        ("BP_CTR_NAT_REDIRECTED_MSGS", Counter::NatRedirectedMsgs as u64),
        ("BP_CTR_NAT_REDIRECTED_BYTES", Counter::NatRedirectedBytes as u64),
        ("BP_CTR_NAT_CLEARED", Counter::NatCleared as u64),
        ("BP_CTR_NAT_LOCAL_REDIRECTED_BYTES", Counter::NatLocalRedirectedBytes as u64),
        ("BP_CTR_NAT_NOT_CLIENT", Counter::NatNotClient as u64),
        ("BP_NAT_PATH_LOCAL", NAT_PATH_LOCAL.into()), ("BP_NAT_PATH_INBOUND", NAT_PATH_INBOUND.into()),
    ];
    let link_consts: [(&str, u64); 11] = [
        ("BL_ABI_VERSION", BL_ABI_VERSION.into()), ("BL_MAX_PORTS", BL_MAX_PORTS.into()),
        ("BL_MAX_FDB", BL_MAX_FDB.into()), ("BL_PORT_PEER", BL_PORT_PEER.into()),
        ("BL_PORT_BRIDGE", BL_PORT_BRIDGE.into()), ("BL_OFF_RX_SAVED", BL_OFF_RX_SAVED.into()),
        ("BL_OFF_RX_ON", BL_OFF_RX_ON.into()), ("BL_OFF_TX_SAVED", BL_OFF_TX_SAVED.into()),
        ("BL_OFF_TX_ON", BL_OFF_TX_ON.into()),
        ("BL_CTL_AGEING_NS", BL_CTL_AGEING_NS.into()), ("BL_CTL_MAX", BL_CTL_MAX.into()),
    ];
    let send_consts: [(&str, u64); 17] = [
        ("BP_CTR_SENDER_AT_INSERT", Counter::SenderAtInsert as u64),
        ("BP_CTR_SENDER_PROMOTED", Counter::SenderPromoted as u64),
        ("BP_CTR_SENDER_FAILED", Counter::SenderFailed as u64),
        ("BP_CTL_SEND_MODE", CTL_SEND_MODE.into()),
        ("BP_CTL_PIDNS_DEV", CTL_PIDNS_DEV.into()), ("BP_CTL_PIDNS_INO", CTL_PIDNS_INO.into()),
        ("BP_SEND_ALL", SEND_ALL), ("BP_SEND_AUTO", SEND_AUTO), ("BP_SEND_NONE", SEND_NONE),
        ("BP_SENDER_NONE", SENDER_NONE.into()), ("BP_SENDER_WANTED", SENDER_WANTED.into()),
        ("BP_SENDER_AT_INSERT", SENDER_AT_INSERT.into()), ("BP_SENDER_UNPAIRED", SENDER_UNPAIRED.into()),
        ("BP_NO_FD_HINT", NO_FD_HINT.into()),
        ("BP_SENDER_FAILED", SENDER_FAILED.into()), ("BP_SENDER_QUEUED", SENDER_QUEUED.into()),
        ("BP_CTR_PROMOTE_FAILED", Counter::PromoteFailed as u64),
    ];
    for (k, v) in consts.into_iter().chain(link_consts).chain(send_consts) {
        r.insert(k.to_string(), v);
    }
    assert_eq!(c, r, "C (left) and Rust (right) ABI definitions differ");
    // Every counter is listed once and fits the array (indexes may be reserved, unused).
    let mut idx: Vec<u32> = Counter::ALL.iter().map(|c| *c as u32).collect();
    idx.sort();
    idx.dedup();
    assert_eq!(idx.len(), Counter::ALL.len(), "a counter listed twice in Counter::ALL");
    assert!(idx.iter().all(|i| *i < Counter::COUNT), "a counter beyond BP_CTR_MAX: {idx:?}");
}

#[test]
fn object_has_every_program_and_map() {
    let obj = bypassd_ebpf::object();
    let hay = |needle: &str| obj.windows(needle.len()).any(|w| w == needle.as_bytes());
    for p in [bypassd_ebpf::programs::SOCK_OPS, bypassd_ebpf::programs::SK_MSG, bypassd_ebpf::programs::SOCK_CREATE,
        bypassd_ebpf::programs::RX_DONE, bypassd_ebpf::programs::SPLICE_SEEN,
        bypassd_ebpf::programs::SPLICE_KPROBE, bypassd_ebpf::programs::SENDFILE_SEEN,
        bypassd_ebpf::programs::SPLICE_GUARD, bypassd_ebpf::programs::GETSOCKOPT] {
        assert!(hay(p), "program {p} missing from the object");
    }
    for m in bypassd_ebpf::maps::ALL {
        assert!(hay(m), "map {m} missing from the object");
    }
    let obj = bypassd_ebpf::link::object();
    let hay = |needle: &str| obj.windows(needle.len()).any(|w| w == needle.as_bytes());
    assert!(hay(bypassd_ebpf::link::PROGRAM), "program missing from the link object");
    for m in bypassd_ebpf::link::maps::ALL {
        assert!(hay(m), "map {m} missing from the link object");
    }
}
