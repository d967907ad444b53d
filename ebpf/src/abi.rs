//! Rust mirror of `include/bypass_abi.h`. `tests/layout.rs` compiles the header with
//! the host C compiler and checks every size and offset against these definitions.

pub const ABI_VERSION: u32 = 10;
pub const MAX_RULES: u32 = 64;

/// Per-CPU counter indices (`enum bp_counter`).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    SocketsInserted = 0,
    InsertFailures = 1,
    RedirectedMsgs = 2,
    RedirectedBytes = 3,
    PassedMsgs = 4,
    PassedBytes = 5,
    PolicyKernel = 6,
    PausedSkips = 7,
    OrderWait = 8,
    Backpressure = 9,
    NotReady = 10,
    SpliceKept = 11,
    SpliceSeen = 12,
    SpliceStranded = 13,
    SpliceRefused = 14,
    StrandedDrops = 15,
    OrigDstSeen = 16,
    NatPairedLocal = 17,
    NatPairedInbound = 18,
    NatUnpaired = 19,
    NatRedirectedMsgs = 20,
    NatRedirectedBytes = 21,
    NatCleared = 22,
    Coalesced = 23,
    PeerStale = 24,
    WindowGrown = 25,
    BackpressureGrown = 26,
    PressureHeld = 27,
    SenderAtInsert = 28,
    SenderPromoted = 29,
    SenderFailed = 30,
    NatLocalRedirectedBytes = 34,
    NatNotClient = 35,
    /// Written by the daemon only (the promoter), like `SenderPromoted`.
    PromoteFailed = 36,
}

impl Counter {
    /// Array size (`BP_CTR_MAX`); 31-33 are reserved.
    pub const COUNT: u32 = 37;
    pub const ALL: [Counter; 34] = [
        Counter::SocketsInserted,
        Counter::InsertFailures,
        Counter::RedirectedMsgs,
        Counter::RedirectedBytes,
        Counter::PassedMsgs,
        Counter::PassedBytes,
        Counter::PolicyKernel,
        Counter::PausedSkips,
        Counter::OrderWait,
        Counter::Backpressure,
        Counter::NotReady,
        Counter::SpliceKept,
        Counter::SpliceSeen,
        Counter::SpliceStranded,
        Counter::SpliceRefused,
        Counter::StrandedDrops,
        Counter::OrigDstSeen,
        Counter::NatPairedLocal,
        Counter::NatPairedInbound,
        Counter::NatUnpaired,
        Counter::NatRedirectedMsgs,
        Counter::NatRedirectedBytes,
        Counter::NatCleared,
        Counter::Coalesced,
        Counter::PeerStale,
        Counter::WindowGrown,
        Counter::BackpressureGrown,
        Counter::PressureHeld,
        Counter::SenderAtInsert,
        Counter::SenderPromoted,
        Counter::SenderFailed,
        Counter::NatLocalRedirectedBytes,
        Counter::NatNotClient,
        Counter::PromoteFailed,
    ];

    /// The stable name used in JSON output and D-Bus.
    pub fn name(self) -> &'static str {
        match self {
            Counter::SocketsInserted => "sockets_inserted",
            Counter::InsertFailures => "insert_failures",
            Counter::RedirectedMsgs => "redirected_msgs",
            Counter::RedirectedBytes => "redirected_bytes",
            Counter::PassedMsgs => "passed_msgs",
            Counter::PassedBytes => "passed_bytes",
            Counter::PolicyKernel => "policy_kernel_sockets",
            Counter::PausedSkips => "paused_skips",
            Counter::OrderWait => "order_wait_msgs",
            Counter::Backpressure => "backpressure_msgs",
            Counter::NotReady => "not_ready_msgs",
            Counter::SpliceKept => "splice_kept_msgs",
            Counter::SpliceSeen => "splice_sockets",
            Counter::SpliceStranded => "splice_stranded_sockets",
            Counter::SpliceRefused => "splice_refused",
            Counter::StrandedDrops => "stranded_drops",
            Counter::OrigDstSeen => "origdst_answers_seen",
            Counter::NatPairedLocal => "nat_paired_local",
            Counter::NatPairedInbound => "nat_paired_inbound",
            Counter::NatUnpaired => "nat_unpaired",
            Counter::NatRedirectedMsgs => "nat_redirected_msgs",
            Counter::NatRedirectedBytes => "nat_redirected_bytes",
            Counter::NatCleared => "nat_cleared",
            Counter::Coalesced => "coalesced_msgs",
            Counter::PeerStale => "peer_stale_msgs",
            Counter::WindowGrown => "windows_grown",
            Counter::BackpressureGrown => "backpressure_grown_msgs",
            Counter::PressureHeld => "pressure_held_msgs",
            Counter::SenderAtInsert => "senders_at_insert",
            Counter::SenderPromoted => "senders_promoted",
            Counter::SenderFailed => "sender_failures",
            Counter::NatLocalRedirectedBytes => "nat_local_redirected_bytes",
            Counter::NatNotClient => "nat_not_client",
            Counter::PromoteFailed => "promote_failures",
        }
    }
}

/// Control array indices (`enum bp_control`).
pub const CTL_POLICY_SEQ: u32 = 0;
pub const CTL_PAUSED: u32 = 1;
pub const CTL_QUEUE_CAP: u32 = 2;
pub const CTL_RECV_GATE: u32 = 3;
pub const CTL_COALESCE_BELOW: u32 = 4;
pub const CTL_SEND_MODE: u32 = 5;
/// The daemon's pid namespace (st_dev, st_ino of /proc/self/ns/pid), for promotion requests.
pub const CTL_PIDNS_DEV: u32 = 6;
pub const CTL_PIDNS_INO: u32 = 7;
pub const CTL_MAX: u32 = 8;

/// `BP_CTL_SEND_MODE` values: which sockets run sk_msg on their sends.
pub const SEND_ALL: u64 = 0;
pub const SEND_AUTO: u64 = 1;
pub const SEND_NONE: u64 = 2;

/// `bp_rx_state.send`: a socket's sender state.
pub const SENDER_NONE: u32 = 0;
pub const SENDER_WANTED: u32 = 1;
pub const SENDER_AT_INSERT: u32 = 2;
pub const SENDER_UNPAIRED: u32 = 3;
pub const SENDER_FAILED: u32 = 4;
pub const SENDER_QUEUED: u32 = 5;

pub const ACTION_KERNEL: u8 = 0;
pub const ACTION_ACCELERATE: u8 = 1;

pub const RULE_MATCH_CGROUP: u8 = 1 << 0;
pub const RULE_MATCH_UID: u8 = 1 << 1;

pub const SK_KNOWN: u32 = 1 << 0;
pub const SK_NO_REDIRECT_IN: u32 = 1 << 1;
pub const SK_READY: u32 = 1 << 2;

/// `bp_splicers` keys: a process name (comm), NUL padded.
pub const COMM_LEN: usize = 16;
pub const SPLICER_CONFIGURED: u64 = 1 << 0;
pub const SPLICER_LEARNED: u64 = 1 << 1;

/// `struct bp_sock_key`: one socket from its own side; IPv4 is IPv4-mapped.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SockKey {
    pub local_ip: [u8; 16],
    pub remote_ip: [u8; 16],
    pub local_port: u32,
    pub remote_port: u32,
    pub netns: u64,
}

/// `struct bp_rule`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rule {
    pub local_ip: [u8; 16],
    pub remote_ip: [u8; 16],
    pub local_prefix: u8,
    pub remote_prefix: u8,
    pub action: u8,
    pub flags: u8,
    pub local_port_lo: u16,
    pub local_port_hi: u16,
    pub remote_port_lo: u16,
    pub remote_port_hi: u16,
    pub uid: u32,
    pub cgroup_id: u64,
}

/// `struct bp_policy_meta`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PolicyMeta {
    pub nrules: u32,
    pub default_action: u32,
}

/// `struct bp_sk_info`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SkInfo {
    pub cgroup_id: u64,
    pub uid: u32,
    pub flags: u32,
    pub recv_seq: u32,
    /// 1: asked for promotion; its next read queues a `PromoteReq`.
    pub promote: u32,
}

/// `struct bp_promote_req` (bp_promote_q values): a socket to make a sender, and the
/// process (tgid in the initial pid namespace) and socket inode to find it by.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PromoteReq {
    pub key: SockKey,
    pub cookie: u64,
    pub ino: u64,
    pub tgid: u32,
    /// The fd argument of the read syscall that queued it (`NO_FD_HINT`: none): tried
    /// first, so most promotions need no scan of the process's descriptors.
    pub fd_hint: u32,
}

/// `bp_promote_req.fd_hint`: no hint (not a read syscall, e.g. io_uring).
pub const NO_FD_HINT: u32 = u32::MAX;

/// `struct bp_rx_state`: what a sender knows about an accelerated receiver.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RxState {
    pub copied_seq: u32,
    pub rcvbuf: u32,
    pub queued: u64,
    pub ready: u32,
    pub spliced: u32,
    /// The receiver's kernel socket address (only the BPF side dereferences it).
    pub sk: u64,
    pub cookie: u64,
    /// Bytes ever redirected to it; minus `queued`, what it has read of them.
    pub redirected: u64,
    pub pace_read: u64,
    pub pace_ns: u64,
    /// Redirect bound grown beyond queue_cap by the reader's pace (0: none).
    pub window: u32,
    /// `SENDER_*`: whether this socket's own sends run sk_msg.
    pub send: u32,
    /// send_mode auto: RTT samples at which the conversation had turned, of `samples`.
    pub turns: u16,
    pub samples: u16,
    /// data_segs_in at the last RTT sample.
    pub seen_in: u32,
    /// write_seq at the last turn: what the socket wrote per turn.
    pub turn_seq: u32,
    pub pad: u32,
}

// SAFETY: plain-old-data, repr(C), every bit pattern valid, no implicit padding
// (checked against the C layout by tests/layout.rs).
unsafe impl aya::Pod for SockKey {}
unsafe impl aya::Pod for Rule {}
unsafe impl aya::Pod for PolicyMeta {}
unsafe impl aya::Pod for SkInfo {}
unsafe impl aya::Pod for RxState {}
unsafe impl aya::Pod for NatPeer {}
unsafe impl aya::Pod for PromoteReq {}

/// `struct bp_nat_peer`: the NAT peer of one socket (bp_nat value).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NatPeer {
    pub peer: SockKey,
    pub path: u32,
    pub reserved: u32,
}

/// `bp_nat_peer.path`: the proxy's listener is on loopback (OUTPUT capture, same netns).
pub const NAT_PATH_LOCAL: u32 = 1;
/// Any other listener address (PREROUTING capture).
pub const NAT_PATH_INBOUND: u32 = 2;

// ===========================================================================
// Link datapath (`bpf/link.bpf.c`), the "Link datapath" section of the header.
// ===========================================================================

/// Version of the link datapath's ABI (`BL_ABI_VERSION`); part of its pin folder names.
pub const BL_ABI_VERSION: u32 = 1;
pub const BL_MAX_PORTS: u32 = 64;
pub const BL_MAX_FDB: u32 = 4096;

pub const BL_PORT_PEER: u32 = 1 << 0;
pub const BL_PORT_BRIDGE: u32 = 1 << 1;

pub const BL_OFF_RX_SAVED: u32 = 1 << 0;
pub const BL_OFF_RX_ON: u32 = 1 << 1;
pub const BL_OFF_TX_SAVED: u32 = 1 << 2;
pub const BL_OFF_TX_ON: u32 = 1 << 3;

pub const BL_CTL_AGEING_NS: u32 = 0;
pub const BL_CTL_MAX: u32 = 1;

/// `struct bl_port`: one attached interface (key: its ifindex).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LinkPort {
    pub target: u32,
    pub slot: u32,
    pub flags: u32,
    pub offload: u32,
}

/// `struct bl_mac`: an Ethernet address, padded to 8 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct LinkMac {
    pub addr: [u8; 6],
    pub pad: u16,
}

/// `struct bl_fdb_entry`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LinkFdbEntry {
    pub ifindex: u32,
    pub flags: u32,
    pub seen_ns: u64,
}

/// `struct bl_stats`: per-CPU frame and byte counters of one port.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LinkStats {
    pub redirected_frames: u64,
    pub redirected_bytes: u64,
    pub passed_frames: u64,
    pub passed_bytes: u64,
}

// SAFETY: as above (plain-old-data, no padding; checked by tests/layout.rs).
unsafe impl aya::Pod for LinkPort {}
unsafe impl aya::Pod for LinkMac {}
unsafe impl aya::Pod for LinkFdbEntry {}
unsafe impl aya::Pod for LinkStats {}
