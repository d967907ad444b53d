//! The bypassd socket datapath: the BPF object built from `bpf/bypass.bpf.c` and the
//! Rust mirror of its ABI (`include/bypass_abi.h`).
pub mod abi;

/// The compiled BPF object, aligned so aya can parse it in place.
pub fn object() -> &'static [u8] {
    #[repr(C, align(8))]
    struct Aligned<T: ?Sized>(T);
    static OBJ: &Aligned<[u8]> = &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/bypass.bpf.o")));
    &OBJ.0
}

/// Program names in the object (the C function names).
pub mod programs {
    pub const SOCK_OPS: &str = "bypass_sockops";
    pub const SK_MSG: &str = "bypass_sk_msg";
    pub const SOCK_CREATE: &str = "bypass_sock_create";
}

/// Map names in the object.
pub mod maps {
    pub const SOCKS: &str = "bp_socks";
    pub const COUNTERS: &str = "bp_counters";
    pub const CONTROL: &str = "bp_control";
    pub const RULES: &str = "bp_rules";
    pub const POLICY: &str = "bp_policy";
    pub const SK_INFO: &str = "bp_sk_info";
    /// Every map, in the order they are pinned.
    pub const ALL: [&str; 6] = [SOCKS, COUNTERS, CONTROL, RULES, POLICY, SK_INFO];
}
