//! Netlink events that matter to the link datapath: interfaces appearing and going
//! (RTM_NEWLINK/DELLINK) and the bridges' FDB (RTM_NEWNEIGH/DELNEIGH, AF_BRIDGE).
//! A plain NETLINK_ROUTE socket bound to the link and neighbour groups; a thread
//! turns messages into `Event`s. The daemon tick re-checks too, so a lost event
//! (ENOBUFS) only delays a change by one tick.
use super::nl;
use anyhow::{Context, Result};
use std::os::fd::AsRawFd;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Some interface appeared, changed or went away: re-check the entries.
    Links,
    /// A bridge learned (`gone` false) or forgot a MAC on port `ifindex`.
    Fdb { mac: [u8; 6], ifindex: u32, gone: bool },
}

const RTMGRP_LINK: u32 = 1;
const RTMGRP_NEIGH: u32 = 4;
const RTM_DELLINK: u16 = 17;
const RTM_NEWNEIGH: u16 = 28;
const RTM_DELNEIGH: u16 = 29;
const NDA_LLADDR: u16 = 2;
const AF_BRIDGE: u8 = 7;
const NUD_PERMANENT: u16 = 0x80;
const NDMSG_LEN: usize = 12;

/// Parse one datagram of netlink messages.
pub fn parse(buf: &[u8]) -> Vec<Event> {
    let mut out = Vec::new();
    for (ty, body) in nl::messages(buf) {
        match ty {
            nl::RTM_NEWLINK | RTM_DELLINK => {
                if !out.contains(&Event::Links) {
                    out.push(Event::Links);
                }
            }
            RTM_NEWNEIGH | RTM_DELNEIGH => out.extend(fdb(body, ty == RTM_NEWNEIGH)),
            _ => {}
        }
    }
    out
}

/// An AF_BRIDGE neighbour message: a learned (not permanent/local) FDB entry.
fn fdb(body: &[u8], new: bool) -> Option<Event> {
    if body.len() < NDMSG_LEN || body[0] != AF_BRIDGE {
        return None;
    }
    let ifindex = nl::u32_at(body, 4);
    let state = u16::from_ne_bytes([body[8], body[9]]);
    if state & NUD_PERMANENT != 0 {
        return None; // the bridge's and ports' own addresses: frames to them are for this host
    }
    let (_, mac) = nl::attrs(&body[NDMSG_LEN..]).into_iter().find(|(t, p)| *t == NDA_LLADDR && p.len() == 6)?;
    let mac: [u8; 6] = mac.try_into().ok()?;
    if mac[0] & 1 != 0 {
        return None;
    }
    (ifindex != 0).then_some(Event::Fdb { mac, ifindex, gone: !new })
}

/// Start the watcher thread; `on` is called for each event batch.
pub fn spawn(on: impl Fn(Vec<Event>) + Send + 'static) -> Result<()> {
    let sock = nl::socket(RTMGRP_LINK | RTMGRP_NEIGH).context("subscribing to netlink link and neighbour events")?;
    std::thread::Builder::new()
        .name("link-watch".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                // SAFETY: buf is valid for writes of its length.
                let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n < 0 {
                    let e = std::io::Error::last_os_error();
                    if e.raw_os_error() == Some(libc::ENOBUFS) {
                        on(vec![Event::Links]); // events were lost: re-check everything
                        continue;
                    }
                    if e.kind() == std::io::ErrorKind::Interrupted {
                        continue;
                    }
                    tracing::warn!("netlink watcher stopped: {e}; links are re-checked on the daemon tick only");
                    return;
                }
                let evs = parse(&buf[..n as usize]);
                if !evs.is_empty() {
                    on(evs);
                }
            }
        })
        .context("starting the netlink watcher thread")?;
    Ok(())
}
