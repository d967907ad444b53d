//! The bypassd socket datapath: the BPF object built from `bpf/bypass.bpf.c` (and the
//! headers it includes from `bpf/`) and the Rust mirror of its ABI (`include/bypass_abi.h`).
pub mod abi;

/// A compiled object from OUT_DIR, aligned so aya can parse it in place.
macro_rules! aligned_object {
    ($file:literal) => {{
        #[repr(C, align(8))]
        struct Aligned<T: ?Sized>(T);
        static OBJ: &Aligned<[u8]> = &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/", $file)));
        &OBJ.0
    }};
}

/// The compiled socket datapath object.
pub fn object() -> &'static [u8] {
    aligned_object!("bypass.bpf.o")
}

/// Program names in the object (the C function names).
pub mod programs {
    pub const SOCK_OPS: &str = "bypass_sockops";
    pub const SK_MSG: &str = "bypass_sk_msg";
    pub const SOCK_CREATE: &str = "bypass_sock_create";
    /// tp_btf on sock:sock_recv_length: marks a receiver that consumed data as ready.
    pub const RX_DONE: &str = "bypass_rx_done";
    /// kprobe on tcp_splice_read: a receiver splices; never redirect to it again.
    pub const SPLICE_KPROBE: &str = "bypass_splice_kprobe";
    /// Tracepoint syscalls:sys_enter_splice: the same where kprobes are unavailable.
    pub const SPLICE_SEEN: &str = "bypass_splice_seen";
    /// Tracepoint syscalls:sys_enter_sendfile64: sendfile reading a socket.
    pub const SENDFILE_SEEN: &str = "bypass_sendfile_seen";
    /// Optional BPF LSM (file_permission): refuses splice reads of accelerated sockets.
    pub const SPLICE_GUARD: &str = "bypass_splice_guard";
    /// cgroup/getsockopt: observes SO_ORIGINAL_DST answers and records NAT pairs.
    pub const GETSOCKOPT: &str = "bypass_getsockopt";
}

/// Map names in the object.
pub mod maps {
    pub const SOCKS: &str = "bp_socks";
    pub const COUNTERS: &str = "bp_counters";
    pub const CONTROL: &str = "bp_control";
    pub const RULES: &str = "bp_rules";
    pub const POLICY: &str = "bp_policy";
    pub const SK_INFO: &str = "bp_sk_info";
    pub const RX: &str = "bp_rx";
    pub const COOKIES: &str = "bp_cookies";
    pub const SPLICERS: &str = "bp_splicers";
    /// NAT pairs (service mesh capture): socket key -> its NAT peer.
    pub const NAT: &str = "bp_nat";
    /// Senders: the SOCKHASH sk_msg is attached to (bp_socks holds every target).
    pub const SENDERS: &str = "bp_senders";
    /// Promotion requests queued (one u64, bumped with each).
    pub const PROMOTE_SEQ: &str = "bp_promote_seq";
    /// The promotion requests (a BPF queue of `abi::PromoteReq`).
    pub const PROMOTE_QUEUE: &str = "bp_promote_q";
    /// Every map, in the order they are pinned.
    pub const ALL: [&str; 13] =
        [SOCKS, COUNTERS, CONTROL, RULES, POLICY, SK_INFO, RX, COOKIES, SPLICERS, NAT, SENDERS, PROMOTE_SEQ, PROMOTE_QUEUE];
}

/// The link datapath (`bpf/link.bpf.c`): tc ingress programs for VM/container links.
pub mod link {
    /// The compiled link object.
    pub fn object() -> &'static [u8] {
        aligned_object!("link.bpf.o")
    }

    /// The tc ingress program (C function name).
    pub const PROGRAM: &str = "bypass_link_ingress";

    /// Map names in the link object.
    pub mod maps {
        pub const PORTS: &str = "bl_ports";
        pub const FDB: &str = "bl_fdb";
        pub const STATS: &str = "bl_stats";
        pub const CONTROL: &str = "bl_control";
        /// Every map, in the order they are pinned.
        pub const ALL: [&str; 4] = [PORTS, FDB, STATS, CONTROL];
    }
}
