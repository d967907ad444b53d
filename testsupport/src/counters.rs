//! Checks over the datapath's counters shared by the datapath and mesh tests.
use bypassd_ebpf::abi::Counter;

/// Every message that took the kernel path did so for a safety rule
/// (docs/datapath-safety.md): the receiver had not read with recvmsg yet (not_ready),
/// had TCP bytes unread (order), had a full redirect queue (backpressure), splices, the
/// adaptive rule moved a small write to TCP (coalesced), or the peer's socket was gone
/// (peer_stale). None lacked its peer, so every pairing the test expects happened.
/// `counter` reads one counter (from the test's pinned datapath).
pub fn assert_passes_explained(counter: impl Fn(Counter) -> u64) {
    let passed = counter(Counter::PassedMsgs);
    let explained = [
        Counter::NotReady,
        Counter::OrderWait,
        Counter::Backpressure,
        Counter::SpliceKept,
        Counter::Coalesced,
        Counter::PeerStale,
    ]
    .into_iter()
    .map(&counter)
    .sum::<u64>();
    assert_eq!(passed, explained, "kernel-path messages without a safety reason (a socket whose peer was not found)");
}
