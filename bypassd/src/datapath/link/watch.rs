//! Netlink events that matter to the link datapath: interfaces appearing and going
//! (RTM_NEWLINK/DELLINK) and the bridges' FDB (RTM_NEWNEIGH/DELNEIGH, AF_BRIDGE).
//! A plain NETLINK_ROUTE socket bound to the link and neighbour groups; a thread
//! turns messages into `Event`s. The daemon tick re-checks too, so a lost event
//! (ENOBUFS) only delays a change by one tick.
use super::nl;
use anyhow::{Context, Result};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex, OnceLock};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Some interface appeared, changed or went away: re-check the entries.
    Links,
    /// A bridge learned (`gone` false) or forgot a MAC on port `ifindex`, in the
    /// netns of `[[links]] netns = ...` (None: bypassd's own).
    Fdb { netns: Option<String>, mac: [u8; 6], ifindex: u32, gone: bool },
}

const RTMGRP_LINK: u32 = 1;
const RTMGRP_NEIGH: u32 = 4;
const RTM_DELLINK: u16 = 17;
const RTM_DELNEIGH: u16 = 29;

/// Parse one datagram of netlink messages (from bypassd's own netns).
pub fn parse(buf: &[u8]) -> Vec<Event> {
    parse_in(buf, None)
}

fn parse_in(buf: &[u8], netns: Option<&str>) -> Vec<Event> {
    let mut out = Vec::new();
    for (ty, body) in nl::messages(buf) {
        match ty {
            nl::RTM_NEWLINK | RTM_DELLINK => {
                if !out.contains(&Event::Links) {
                    out.push(Event::Links);
                }
            }
            nl::RTM_NEWNEIGH | RTM_DELNEIGH => out.extend(fdb(body, ty == nl::RTM_NEWNEIGH, netns)),
            _ => {}
        }
    }
    out
}

/// An AF_BRIDGE neighbour message: a learned (not permanent/local) FDB entry.
fn fdb(body: &[u8], new: bool, netns: Option<&str>) -> Option<Event> {
    let n = learned(nl::parse_neigh(body)?)?;
    Some(Event::Fdb { netns: netns.map(String::from), mac: n.mac, ifindex: n.ifindex, gone: !new })
}

/// A MAC the bridge learned behind a port (not its own or a port's address, not
/// multicast): frames to it may skip the bridge.
pub fn learned(n: nl::Neigh) -> Option<nl::Neigh> {
    // NUD_PERMANENT: the bridge's and ports' own addresses: frames to them are for this host.
    (n.state & nl::NUD_PERMANENT == 0 && n.mac[0] & 1 == 0 && n.ifindex != 0).then_some(n)
}

type Sink = Arc<dyn Fn(Vec<Event>) + Send + Sync>;

/// Where every watcher delivers (set by `spawn`), and the other netns watched now.
static SINK: OnceLock<Sink> = OnceLock::new();
static WATCHED: Mutex<Vec<(String, (u64, u64))>> = Mutex::new(Vec::new());

/// Start the watcher thread of bypassd's own netns; `on` is called for each event
/// batch, from it and from the watchers `watch_netns` starts.
pub fn spawn(on: impl Fn(Vec<Event>) + Send + Sync + 'static) -> Result<()> {
    let sink: Sink = Arc::new(on);
    let _ = SINK.set(sink.clone());
    let sock = nl::socket(RTMGRP_LINK | RTMGRP_NEIGH).context("subscribing to netlink link and neighbour events")?;
    std::thread::Builder::new()
        .name("link-watch".into())
        .spawn({
            let sink = sink.clone();
            move || watch(&sock, None, &sink)
        })
        .context("starting the netlink watcher thread")?;
    // Entries were set up before there was a sink: re-check now, which starts the
    // watchers of their other netns.
    sink(vec![Event::Links]);
    Ok(())
}

/// Watch the netns `path` refers to, unless a watcher for that very netns runs. Its
/// thread enters the netns, subscribes there, and ends (releasing the netns) once
/// the path is gone or refers to another netns; it then asks for a re-check.
pub fn watch_netns(path: &str) -> Result<()> {
    let Some(sink) = SINK.get().cloned() else { return Ok(()) };
    let Some(id) = super::netns::identity(path) else { return Ok(()) };
    let mut w = WATCHED.lock().unwrap_or_else(|e| e.into_inner());
    if w.iter().any(|(p, i)| p == path && *i == id) {
        return Ok(());
    }
    let file = std::fs::File::open(path).with_context(|| format!("opening netns {path}"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    let p = path.to_string();
    std::thread::Builder::new()
        .name("link-watch-ns".into())
        .spawn(move || {
            let sock = super::netns::enter(&file, &p).and_then(|()| {
                drop(file);
                let s = nl::socket(RTMGRP_LINK | RTMGRP_NEIGH).context("subscribing to netlink events")?;
                set_timeout(&s, 2)?;
                Ok(s)
            });
            let sock = match sock {
                Ok(s) => {
                    let _ = tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            watch(&sock, Some((&p, id)), &sink);
            WATCHED.lock().unwrap_or_else(|e| e.into_inner()).retain(|(q, i)| !(*q == p && *i == id));
            sink(vec![Event::Links]);
        })
        .context("starting a netlink watcher thread")?;
    rx.recv().context("the netlink watcher thread ended")?.with_context(|| format!("watching netns {path}"))?;
    w.retain(|(q, _)| q != path);
    w.push((path.to_string(), id));
    tracing::info!("link datapath: watching netlink events in netns {path}");
    Ok(())
}

fn set_timeout(sock: &OwnedFd, secs: i64) -> Result<()> {
    let tv = libc::timeval { tv_sec: secs, tv_usec: 0 };
    // SAFETY: setsockopt with a valid timeval of the size given.
    let rc = unsafe {
        libc::setsockopt(sock.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVTIMEO, (&tv as *const libc::timeval).cast(), std::mem::size_of::<libc::timeval>() as u32)
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error()).context("setting a netlink receive timeout");
    }
    Ok(())
}

/// Read events until the socket fails; in another netns (`ns`: path and identity),
/// also until the path no longer refers to that netns.
fn watch(sock: &OwnedFd, ns: Option<(&str, (u64, u64))>, on: &Sink) {
    let mut buf = vec![0u8; 64 << 10];
    let name = ns.map(|(p, _)| p);
    loop {
        // SAFETY: buf is valid for writes of its length.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ENOBUFS) => on(vec![Event::Links]), // events were lost: re-check everything
                Some(libc::EAGAIN) | Some(libc::EINTR) => {}
                _ => {
                    tracing::warn!("netlink watcher{} stopped: {e}; links are re-checked on the daemon tick only", name.map(|p| format!(" of netns {p}")).unwrap_or_default());
                    return;
                }
            }
        } else {
            let evs = parse_in(&buf[..n as usize], name);
            if !evs.is_empty() {
                on(evs);
            }
        }
        if let Some((p, id)) = ns
            && super::netns::identity(p) != Some(id)
        {
            tracing::info!("link datapath: netns {p} is gone or was replaced; its watcher ends");
            return;
        }
    }
}
