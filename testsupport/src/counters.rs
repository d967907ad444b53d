//! Checks over the datapath's counters shared by the datapath and mesh tests.
use bypassd_ebpf::abi::Counter;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The counters that give a kernel-path message its safety reason.
pub const EXPLAINED: [Counter; 6] =
    [Counter::NotReady, Counter::OrderWait, Counter::Backpressure, Counter::SpliceKept, Counter::Coalesced, Counter::PeerStale];

/// Every message that took the kernel path did so for a safety rule
/// (docs/datapath-safety.md): the receiver had not read with recvmsg yet (not_ready),
/// had TCP bytes unread (order), had a full redirect queue (backpressure), splices, the
/// adaptive rule moved a small write to TCP (coalesced), or the peer's socket was gone
/// (peer_stale). None lacked its peer, so every pairing the test expects happened.
/// `counter` reads one counter (from the test's pinned datapath).
pub fn assert_passes_explained(counter: impl Fn(Counter) -> u64) {
    let passed = counter(Counter::PassedMsgs);
    let explained = EXPLAINED.into_iter().map(&counter).sum::<u64>();
    assert_eq!(passed, explained, "kernel-path messages without a safety reason (a socket whose peer was not found)");
}

/// Counter values at one moment (or what moved between two, `since`), by index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snap(pub [u64; Counter::COUNT as usize]);

impl Default for Snap {
    fn default() -> Snap {
        Snap([0; Counter::COUNT as usize]) // (derive stops at 32 elements)
    }
}

impl Snap {
    /// Every counter, each read with `counter` (e.g. a test's pinned datapath).
    pub fn read(counter: impl Fn(Counter) -> u64) -> Snap {
        let mut s = Snap::default();
        for c in Counter::ALL {
            s.0[c as usize] = counter(c);
        }
        s
    }
    /// The non-zero counters, for failure messages ("order_wait_msgs +124, ...").
    pub fn moved(&self) -> String {
        Counter::ALL.iter().filter(|c| self.get(**c) != 0).map(|c| format!("{} +{}", c.name(), self.get(*c))).collect::<Vec<_>>().join(", ")
    }
    pub fn get(&self, c: Counter) -> u64 {
        self.0[c as usize]
    }
    pub fn since(&self, before: &Snap) -> Snap {
        let mut d = Snap::default();
        for i in 0..d.0.len() {
            d.0[i] = self.0[i].wrapping_sub(before.0[i]);
        }
        d
    }
    pub fn add(&mut self, o: &Snap) {
        for i in 0..self.0.len() {
            self.0[i] = self.0[i].wrapping_add(o.0[i]);
        }
    }
    pub fn is_zero(&self) -> bool {
        self.0.iter().all(|v| *v == 0)
    }
    pub fn to_map(self) -> BTreeMap<String, u64> {
        Counter::ALL.iter().map(|c| (c.name().to_string(), self.get(*c))).collect()
    }
}

impl<'de> Deserialize<'de> for Snap {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Snap, D::Error> {
        let m = BTreeMap::<String, u64>::deserialize(d)?;
        let mut s = Snap::default();
        for c in Counter::ALL {
            s.0[c as usize] = m.get(c.name()).copied().unwrap_or(0);
        }
        Ok(s)
    }
}

impl Serialize for Snap {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_map().serialize(s)
    }
}
