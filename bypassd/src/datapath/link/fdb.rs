//! Bridge mode's copy of the bridge FDB (`bl_fdb`): where each MAC lives. The
//! program learns source MACs from the frames it sees; this fills in what the
//! bridge already knew when bypassd attached (a dump) and follows what it learns
//! or forgets later (netlink events, watch.rs).
use super::{nl, watch};
use anyhow::Result;
use aya::maps::{HashMap, MapData};
use bypassd_ebpf::abi;

pub type Fdb = HashMap<MapData, abi::LinkMac, abi::LinkFdbEntry>;

/// CLOCK_MONOTONIC in ns, the clock of bpf_ktime_get_ns.
pub fn now_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
}

/// Copy the bridge's learned MACs behind `ports` into `fdb` (this thread's netns),
/// dated when the bridge last saw them, so frames to MACs known before bypassd
/// attached skip the bridge from the first one. An entry the program learned more
/// recently is kept. Returns how many were written.
pub fn sync(fdb: &mut Fdb, ports: &[u32]) -> Result<usize> {
    let now = now_ns();
    let mut n = 0;
    for e in nl::fdb()? {
        let Some(e) = watch::learned(e) else { continue };
        if !ports.contains(&e.ifindex) {
            continue;
        }
        let seen = now.saturating_sub(u64::from(e.updated_cs) * 10_000_000);
        let key = abi::LinkMac { addr: e.mac, pad: 0 };
        if fdb.get(&key, 0).is_ok_and(|old| old.seen_ns >= seen) {
            continue;
        }
        fdb.insert(key, abi::LinkFdbEntry { ifindex: e.ifindex, flags: 0, seen_ns: seen }, 0)?;
        n += 1;
    }
    Ok(n)
}

/// The bridge just saw `mac` on port `ifindex` (as fresh as a frame the program
/// learns from), or forgot it there. Redirected frames never reach the bridge, so
/// its entries age out while ours stay fresh: only an entry pointing at that very
/// port is forgotten. A MAC behind something that is not one of our ports (e.g. the
/// bridge itself) is dropped: frames to it are not ours to move.
pub fn update(fdb: &mut Fdb, is_port: bool, mac: [u8; 6], ifindex: u32, gone: bool) -> Result<(), aya::maps::MapError> {
    let key = abi::LinkMac { addr: mac, pad: 0 };
    if gone {
        match fdb.get(&key, 0) {
            Ok(e) if e.ifindex == ifindex => fdb.remove(&key),
            _ => Ok(()),
        }
    } else if is_port {
        fdb.insert(key, abi::LinkFdbEntry { ifindex, flags: 0, seen_ns: now_ns() }, 0)
    } else {
        match fdb.get(&key, 0) {
            Ok(_) => fdb.remove(&key),
            Err(_) => Ok(()),
        }
    }
}
