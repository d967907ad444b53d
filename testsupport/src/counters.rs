//! Checks over the datapath's counters shared by the datapath and mesh tests.
use bypassd_ebpf::abi::Counter;

/// The counters that give a kernel-path message its safety reason.
pub const EXPLAINED: [Counter; 6] = [
    Counter::NotReady,
    Counter::OrderWait,
    Counter::Backpressure,
    Counter::SpliceKept,
    Counter::Coalesced,
    Counter::PeerStale,
];

/// Every message that took the kernel path did so for a safety rule
/// (docs/datapath-safety.md): the receiver had not read with recvmsg yet (not_ready),
/// had TCP bytes unread (order), had a full redirect queue (backpressure), splices, the
/// adaptive rule moved a small write to TCP (coalesced), or the peer's socket was gone
/// (peer_stale). None lacked its peer, so every pairing the test expects happened.
/// `counter` reads one counter (from the test's pinned datapath).
pub fn assert_passes_explained(counter: impl Fn(Counter) -> u64) {
    let passed = counter(Counter::PassedMsgs);
    let explained = EXPLAINED.into_iter().map(&counter).sum::<u64>();
    assert_eq!(
        passed, explained,
        "kernel-path messages without a safety reason (a socket whose peer was not found)"
    );
}

/// Every non-zero counter change between two snapshots (`snapshot`), for failure
/// messages: which rule sent a connection's bytes where.
pub fn diff(before: &[(Counter, u64)], after: &[(Counter, u64)]) -> String {
    after
        .iter()
        .zip(before)
        .filter(|((_, a), (_, b))| a != b)
        .map(|((c, a), (_, b))| format!("{c:?} +{}", a.wrapping_sub(*b)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Every counter's value, in `Counter::ALL` order.
pub fn snapshot(counter: impl Fn(Counter) -> u64) -> Vec<(Counter, u64)> {
    Counter::ALL.into_iter().map(|c| (c, counter(c))).collect()
}
