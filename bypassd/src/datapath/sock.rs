//! The socket datapath: its program table, what its maps say (connections, receive
//! state, splice readers), and how it describes its protections.
use super::{
    SpliceSafety,
    hooks::{Hook, Program},
};
use anyhow::{Context, Result};
use aya::maps::{HashMap, MapData, SockHash};
use bypassd_ebpf::{abi, programs as p};
use std::{
    collections::HashSet,
    net::{IpAddr, Ipv6Addr, SocketAddr},
};

/// Every program of the socket datapath, in attach order: the receive side first (a
/// socket inserted later finds its publication in place), then sk_msg on the
/// SOCKHASH, then the cgroup hooks that start inserting sockets.
pub const PROGRAMS: &[Program] = &[
    Program {
        name: p::RX_DONE,
        hook: Hook::TpBtf("sock_recv_length"),
        link: Some("rx_done"),
        required: false,
        what: "tp_btf sock_recv_length (marks recvmsg readers; every read on the host: attached only while needed)",
    },
    Program {
        name: p::SPLICE_KPROBE,
        hook: Hook::KProbe("tcp_splice_read"),
        link: Some("splice_kprobe"),
        required: false,
        what: "kprobe tcp_splice_read (splice readers, io_uring included)",
    },
    Program {
        name: p::SPLICE_SEEN,
        hook: Hook::TracePoint("syscalls", "sys_enter_splice"),
        link: Some("splice_seen"),
        required: false,
        what: "tracepoint syscalls:sys_enter_splice (splice readers; opt-in: every syscall on the host takes the slow path)",
    },
    Program {
        name: p::SENDFILE_SEEN,
        hook: Hook::TracePoint("syscalls", "sys_enter_sendfile64"),
        link: Some("sendfile_seen"),
        required: false,
        what: "tracepoint syscalls:sys_enter_sendfile64 (sendfile readers)",
    },
    Program {
        name: p::SPLICE_GUARD,
        hook: Hook::Lsm("file_permission"),
        link: Some("splice_guard"),
        required: false,
        what: "BPF LSM splice guard (lsm/file_permission)",
    },
    Program { name: p::SK_MSG, hook: Hook::SkMsg, link: None, required: true, what: "sk_msg on the senders' SOCKHASH (redirects)" },
    Program {
        name: p::GETSOCKOPT,
        hook: Hook::CgroupGetsockopt,
        link: Some("getsockopt"),
        // Without it (kernels before 5.3) NAT-ed hops stay on TCP; everything else works.
        required: false,
        what: "cgroup/getsockopt (NAT pairing from proxies' SO_ORIGINAL_DST answers)",
    },
    Program {
        name: p::SOCK_CREATE,
        hook: Hook::SockCreate,
        link: Some("sock_create"),
        required: true,
        what: "cgroup/sock_create (socket origin: cgroup, uid, process)",
    },
    Program {
        name: p::SOCK_OPS,
        hook: Hook::SockOps,
        link: Some("sockops"),
        required: true,
        what: "cgroup sock_ops (inserts established sockets)",
    },
];

/// The syscall tracepoints: attached only with `splice_tracepoints` (while any is
/// attached, every thread on the host takes the slow syscall path).
pub fn is_syscall_tracepoint(p: &Program) -> bool {
    matches!(p.hook, Hook::TracePoint("syscalls", _))
}

/// Hooks loaded with the datapath but attached only while needed (see
/// `Datapath::sync_on_demand`): the recvmsg hook, the one global hook left by default
/// (it also queues send_mode auto's promotion requests).
pub fn is_on_demand(p: &Program) -> bool {
    p.name == p::RX_DONE
}

/// The table entry for a program name.
pub fn program(name: &str) -> Option<&'static Program> {
    PROGRAMS.iter().find(|p| p.name == name)
}

/// What protects a datapath, for the log and status. `has` tells whether a program
/// of the table is attached; `gate` whether recvmsg-first gating is on.
pub fn protections(has: &dyn Fn(&str) -> bool, gate: bool, splice: SpliceSafety, queue_cap: u64, readers: bool) -> Vec<String> {
    let publication = if has(p::RX_DONE) {
        "live reads of the receiver; tp_btf sock_recv_length marks recvmsg readers"
    } else if !gate {
        "live reads of the receiver; no recvmsg hook needed (recvmsg gate off)"
    } else {
        "live reads of the receiver; recvmsg hook not attached (attached while the policy accelerates; without it nothing is redirected)"
    };
    let cap = if queue_cap == 0 { "= each receiver's SO_RCVBUF".to_string() } else { format!("{queue_cap} bytes") };
    let mut s = Vec::new();
    if has(p::SPLICE_GUARD) {
        s.push("BPF LSM guard (splice/sendfile reads of accelerated sockets get EINVAL)");
    }
    if gate {
        s.push("recvmsg-first gating (nothing is redirected to a socket before it reads with recvmsg)");
    }
    if has(p::SPLICE_KPROBE) {
        s.push("splice detection (kprobe tcp_splice_read: a splicing socket gets nothing redirected again)");
    } else if has(p::SPLICE_SEEN) {
        s.push("splice detection (syscall tracepoints splice/sendfile: a splicing socket gets nothing redirected again)");
    }
    if readers && splice != SpliceSafety::Off {
        s.push("known splice readers get TCP only (configured, plus learned when seen splicing)");
    }
    if s.is_empty() || splice == SpliceSafety::Off {
        s.push("OFF: a splice(2) reader of an accelerated socket may hang");
    }
    vec![
        format!("backpressure: redirect queue cap {cap} ({publication})"),
        format!("splice: {}", s.join(" + ")),
    ]
}

/// Which sockets run sk_msg, for the log and status.
pub fn senders_line(mode: super::SendMode, promoter: bool) -> String {
    let what = match mode {
        super::SendMode::All => "every accelerated socket from establishment",
        super::SendMode::Auto if promoter => "sockets whose traffic turns request/response (promoted by the daemon); streams send through plain TCP",
        super::SendMode::Auto => "none (send_mode auto, but the promoter could not start): every socket sends through plain TCP",
        super::SendMode::None => "none (send_mode none): every socket sends through plain TCP",
    };
    format!("senders: {what}")
}

/// One accelerated connection as the SOCKHASH holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    /// "ipv4" or "ipv6".
    pub family: &'static str,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub netns: u64,
    /// Both ends are in the SOCKHASH (data is redirected between them).
    pub paired: bool,
    /// The peer is this socket's NAT peer (bp_nat), not the owner of the swapped tuple.
    pub nat: bool,
    /// The peer socket's own (local, remote), when paired.
    pub peer: Option<(SocketAddr, SocketAddr)>,
    /// This socket is a sender (in bp_senders: its sends run sk_msg and may be redirected).
    pub sender: bool,
    /// The peer socket is a sender.
    pub peer_sender: bool,
}

/// Sockets in the SOCKHASH, paired up into connections (each pair listed once). A
/// socket's peer is found as sk_msg finds it: its bp_nat entry, else the swapped tuple.
pub fn connections(
    socks: &SockHash<MapData, abi::SockKey>,
    senders: &SockHash<MapData, abi::SockKey>,
    nat: &std::collections::HashMap<abi::SockKey, abi::NatPeer>,
) -> Result<Vec<Connection>> {
    let keys: Vec<abi::SockKey> = socks.keys().collect::<Result<_, _>>().context("listing SOCKHASH keys")?;
    let senders: HashSet<abi::SockKey> = senders.keys().collect::<Result<_, _>>().context("listing the senders' SOCKHASH keys")?;
    let set: HashSet<abi::SockKey> = keys.iter().copied().collect();
    let mut out = Vec::new();
    for k in &keys {
        let via_nat = nat.get(k);
        let peer = via_nat.map_or_else(|| peer_key(k), |n| n.peer);
        let paired = set.contains(&peer);
        // List each pair once, from the side with the smaller key.
        if paired && (peer.local_ip, peer.local_port, peer.remote_ip) < (k.local_ip, k.local_port, k.remote_ip) {
            continue;
        }
        out.push(Connection {
            family: if Ipv6Addr::from(k.local_ip).to_ipv4_mapped().is_some() { "ipv4" } else { "ipv6" },
            local: sock_addr(&k.local_ip, k.local_port),
            remote: sock_addr(&k.remote_ip, k.remote_port),
            netns: k.netns,
            paired,
            nat: paired && via_nat.is_some(),
            peer: paired.then(|| (sock_addr(&peer.local_ip, peer.local_port), sock_addr(&peer.remote_ip, peer.remote_port))),
            sender: senders.contains(k),
            peer_sender: paired && senders.contains(&peer),
        });
    }
    out.sort_by_key(|c| (c.local.to_string(), c.remote.to_string()));
    Ok(out)
}

/// Known splice readers: (process name, configured, learned).
pub fn splice_readers(splicers: &HashMap<MapData, [u8; abi::COMM_LEN], u64>) -> Result<Vec<(String, bool, bool)>> {
    let mut v: Vec<(String, bool, bool)> = splicers
        .iter()
        .map(|r| {
            r.map(|(k, f)| {
                let end = k.iter().position(|&b| b == 0).unwrap_or(k.len());
                (String::from_utf8_lossy(&k[..end]).into_owned(), f & abi::SPLICER_CONFIGURED != 0, f & abi::SPLICER_LEARNED != 0)
            })
        })
        .collect::<Result<_, _>>()?;
    v.sort();
    Ok(v)
}

/// Write the configured splice readers; drop configured names no longer listed
/// (learned ones stay until the datapath is rebuilt).
pub fn set_configured_splicers(splicers: &mut HashMap<MapData, [u8; abi::COMM_LEN], u64>, names: &[String]) -> Result<()> {
    let want: Vec<[u8; abi::COMM_LEN]> = names.iter().map(|n| comm_key(n)).collect();
    let have: Vec<([u8; abi::COMM_LEN], u64)> = splicers.iter().collect::<Result<_, _>>()?;
    for (k, v) in &have {
        if *v & abi::SPLICER_CONFIGURED != 0 && !want.contains(k) {
            let rest = *v & !abi::SPLICER_CONFIGURED;
            if rest == 0 { splicers.remove(k)? } else { splicers.insert(k, rest, 0)? }
        }
    }
    for k in &want {
        let v = have.iter().find(|(h, _)| h == k).map_or(0, |(_, v)| *v);
        splicers.insert(k, v | abi::SPLICER_CONFIGURED, 0)?;
    }
    Ok(())
}

/// A process name as the kernel's comm: at most 15 bytes, NUL padded.
pub fn comm_key(name: &str) -> [u8; abi::COMM_LEN] {
    let mut k = [0u8; abi::COMM_LEN];
    let b = name.as_bytes();
    let n = b.len().min(abi::COMM_LEN - 1);
    k[..n].copy_from_slice(&b[..n]);
    k
}

pub fn peer_key(k: &abi::SockKey) -> abi::SockKey {
    abi::SockKey {
        local_ip: k.remote_ip,
        remote_ip: k.local_ip,
        local_port: k.remote_port,
        remote_port: k.local_port,
        netns: k.netns,
    }
}

fn sock_addr(ip: &[u8; 16], port: u32) -> SocketAddr {
    let v6 = Ipv6Addr::from(*ip);
    SocketAddr::new(v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4), port as u16)
}
