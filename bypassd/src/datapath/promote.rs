//! Promotion of sockets to senders (`send_mode = "auto"`, see ebpf/bpf/sendmode.h).
//!
//! sock_ops can insert into a SOCKHASH only at establishment, and the program types
//! that could insert later (map iterators) are refused on some kernels. So a socket
//! whose traffic turns request/response asks: at its next read, the rx hook queues
//! (key, cookie, tgid of the reader, socket inode) in `bp_promote_q` and bumps
//! `bp_promote_seq`. This thread notices the bump, finds the descriptor under
//! /proc/<tgid>/fd, takes a copy with pidfd_getfd(2) (CAP_SYS_PTRACE), checks the
//! socket cookie and inserts it into bp_senders. Its next send runs sk_msg; the order
//! rule there makes joining late safe. Without this thread (daemon stopped) nothing is
//! promoted: the sockets stay targets only and send at the kernel's speed (fail open).
//!
//! The promoted and failed counters are written by this thread only (BPF never
//! touches those two indices), so adding to them from user space races with nobody.
use super::pins;
use anyhow::{Context, Result, bail};
use aya::maps::{Array, Map, MapData, MapError, PerCpuArray, PerCpuValues, Queue, SockHash};
use bypassd_ebpf::{
    abi::{self, Counter, PromoteReq},
    maps,
};
use std::{
    cell::OnceCell,
    collections::HashMap,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

/// How often the request counter is read: promotion follows a request within this.
const POLL: Duration = Duration::from_millis(5);

/// Promotion failures logged as warnings; later ones at debug.
const WARN_FAILURES: u32 = 5;

/// BPF_NOEXIST: a socket already a sender (two reads queued it twice) stays as it is.
const BPF_NOEXIST: u64 = 1;

/// The running promoter of one datapath generation; stops when dropped.
pub struct Promoter {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Promoter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The generation's maps the thread uses, opened from its pins.
struct Handles {
    seq: Array<MapData, u64>,
    queue: Queue<MapData, PromoteReq>,
    senders: SockHash<MapData, abi::SockKey>,
    counters: PerCpuArray<MapData, u64>,
}

fn pinned(gen_dir: &Path, name: &str) -> Result<Map> {
    let p = pins::map_pin(gen_dir, name);
    let data = MapData::from_pin(&p).with_context(|| format!("opening pinned map {}", p.display()))?;
    Ok(Map::from_map_data(data)?)
}

impl Handles {
    fn open(gen_dir: &Path) -> Result<Handles> {
        Ok(Handles {
            seq: Array::try_from(pinned(gen_dir, maps::PROMOTE_SEQ)?).context(maps::PROMOTE_SEQ)?,
            queue: Queue::try_from(pinned(gen_dir, maps::PROMOTE_QUEUE)?).context(maps::PROMOTE_QUEUE)?,
            senders: SockHash::try_from(pinned(gen_dir, maps::SENDERS)?).context(maps::SENDERS)?,
            counters: PerCpuArray::try_from(pinned(gen_dir, maps::COUNTERS)?).context(maps::COUNTERS)?,
        })
    }

    /// Serve every queued request; returns (promoted, failed) and the first few failures.
    fn drain(&mut self) -> (u64, u64, Vec<anyhow::Error>) {
        let (mut promoted, mut failed, mut errors) = (0, 0, Vec::new());
        // A process's descriptors are listed once per batch (a server's sockets ask together).
        let mut tables: HashMap<u32, FdTable> = HashMap::new();
        loop {
            let req = match self.queue.pop(0) {
                Ok(r) => r,
                Err(MapError::ElementNotFound) => break,
                Err(e) => {
                    errors.push(anyhow::Error::from(e).context("reading the promotion queue"));
                    break;
                }
            };
            let table = tables.entry(req.tgid).or_insert_with(|| FdTable::open(req.tgid));
            match promote(&mut self.senders, table, &req) {
                Ok(true) => promoted += 1,
                Ok(false) => {}
                Err(e) => {
                    failed += 1;
                    if errors.len() < WARN_FAILURES as usize {
                        errors.push(e);
                    }
                }
            }
        }
        (promoted, failed, errors)
    }

    /// Add `n` to a counter only this thread writes (on CPU 0's slot: readers sum them).
    fn add(&mut self, c: Counter, n: u64) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let mut v: Vec<u64> = self.counters.get(&(c as u32), 0)?.to_vec();
        if let Some(first) = v.first_mut() {
            *first = first.wrapping_add(n);
        }
        self.counters.set(c as u32, PerCpuValues::try_from(v)?, 0)?;
        Ok(())
    }
}

/// Make the requested socket a sender: Ok(false) when it already is one.
fn promote(senders: &mut SockHash<MapData, abi::SockKey>, table: &FdTable, req: &PromoteReq) -> Result<bool> {
    let what = || format!("socket inode {} of process {}", req.ino, req.tgid);
    let fd = table.take(req.ino, req.cookie, req.fd_hint).with_context(what)?;
    match senders.insert(req.key, fd.as_raw_fd(), BPF_NOEXIST) {
        Ok(()) => Ok(true),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => Ok(false),
        Err(e) => Err(anyhow::Error::from(e).context(format!("inserting {} into {}", what(), maps::SENDERS))),
    }
}

/// One process: a pidfd to copy its descriptors with, and (scanned once, when a hint
/// missed) its descriptors by inode.
///
/// Scanned from /proc/<tgid>/fdinfo (its `ino:` line), not /proc/<tgid>/fd: listing fd/
/// needs DAC access to the owner's 0500 directory (CAP_DAC_READ_SEARCH for another
/// user's process), fdinfo/ only ptrace access. An inode number is unique per file
/// system only, so every descriptor with it is a candidate; the cookie decides.
struct FdTable {
    /// The pidfd first: the process cannot be replaced by another while we look.
    pidfd: Result<OwnedFd, String>,
    dir: String,
    by_ino: OnceCell<HashMap<u64, Vec<RawFd>>>,
}

impl FdTable {
    fn open(tgid: u32) -> FdTable {
        let pidfd = syscall_fd(libc::SYS_pidfd_open, tgid as libc::c_long, 0).map_err(|e| format!("pidfd_open: {e}"));
        FdTable { pidfd, dir: format!("/proc/{tgid}/fdinfo"), by_ino: OnceCell::new() }
    }

    fn scan(&self) -> &HashMap<u64, Vec<RawFd>> {
        self.by_ino.get_or_init(|| {
            let mut by_ino: HashMap<u64, Vec<RawFd>> = HashMap::new();
            for e in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
                let Some(n) = e.file_name().to_str().and_then(|s| s.parse().ok()) else { continue };
                let info = std::fs::read_to_string(e.path()).unwrap_or_default();
                if let Some(ino) = info.lines().find_map(|l| l.strip_prefix("ino:")?.trim().parse().ok()) {
                    by_ino.entry(ino).or_default().push(n);
                }
            }
            by_ino
        })
    }

    /// Copy descriptor `n` if it is the socket with this cookie.
    fn copy_if(&self, pidfd: &OwnedFd, n: RawFd, cookie: u64) -> Result<Option<OwnedFd>> {
        let fd = syscall_fd(libc::SYS_pidfd_getfd, pidfd.as_raw_fd() as libc::c_long, n as libc::c_long)
            .context("pidfd_getfd (needs CAP_SYS_PTRACE over the process)")?;
        // Descriptors, inode numbers and pids are reused: the cookie names the socket.
        Ok(socket_cookie(fd.as_raw_fd()).is_ok_and(|c| c == cookie).then_some(fd))
    }

    /// A copy of the process's descriptor of the socket with this inode and cookie:
    /// `hint` (the fd the reader's syscall named) first, else a scan.
    fn take(&self, ino: u64, cookie: u64, hint: u32) -> Result<OwnedFd> {
        let pidfd = self.pidfd.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
        if hint != abi::NO_FD_HINT
            && let Ok(Some(fd)) = self.copy_if(pidfd, hint as RawFd, cookie)
        {
            return Ok(fd);
        }
        tracing::debug!("promotion: fd hint {hint} of {} missed; scanning the process's descriptors", self.dir);
        let Some(fds) = self.scan().get(&ino) else {
            bail!("no descriptor of it in {} (closed, passed on, or the process is not visible)", self.dir);
        };
        for &n in fds {
            if let Some(fd) = self.copy_if(pidfd, n, cookie)? {
                return Ok(fd);
            }
        }
        bail!("descriptor {fds:?} in {} is another file now (its socket cookie differs)", self.dir)
    }
}

/// A syscall returning a new descriptor (pidfd_open, pidfd_getfd: the last argument,
/// flags, is 0 for both).
fn syscall_fd(nr: libc::c_long, a: libc::c_long, b: libc::c_long) -> std::io::Result<OwnedFd> {
    // SAFETY: plain integer arguments; the result is checked before use.
    let r = unsafe { libc::syscall(nr, a, b, 0) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}

fn socket_cookie(fd: RawFd) -> Result<u64> {
    let mut v: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: v and len are valid for the kernel to write an u64 into.
    let r = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_COOKIE, (&raw mut v).cast(), &mut len) };
    if r < 0 {
        return Err(std::io::Error::last_os_error()).context("getsockopt(SO_COOKIE)");
    }
    Ok(v)
}

/// CAP_SYS_PTRACE (bit 19) in this process's effective set, from /proc/self/status.
fn has_cap_sys_ptrace() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status.lines().find_map(|l| l.strip_prefix("CapEff:")).and_then(|v| u64::from_str_radix(v.trim(), 16).ok());
    eff.is_some_and(|e| e & (1 << 19) != 0)
}

/// Start promoting for the generation in `gen_dir`. None when its maps cannot be opened
/// (logged): sockets in auto mode then stay targets.
pub fn spawn(gen_dir: &Path) -> Option<Promoter> {
    if !has_cap_sys_ptrace() {
        tracing::warn!(
            "send_mode auto: bypassd lacks CAP_SYS_PTRACE, so it cannot take the sockets of other users' processes \
             (or of root processes with more capabilities) to promote them: those stay targets (kernel-speed sends), \
             counted in promote_failures. The packaged unit needs a drop-in for auto: see docs/packaging.md"
        );
    }
    let h = match Handles::open(gen_dir) {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!("send_mode auto: cannot open the promotion maps ({e:#}); nothing will be promoted");
            return None;
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let thread = std::thread::Builder::new().name("promote".into()).spawn(move || run(h, &s)).ok()?;
    Some(Promoter { stop, thread: Some(thread) })
}

fn run(mut h: Handles, stop: &AtomicBool) {
    // None: drain now (requests queued while no daemon ran; their sockets may be gone).
    let mut seen: Option<u64> = None;
    let mut warned = 0;
    while !stop.load(Ordering::Relaxed) {
        let now = h.seq.get(&0, 0).ok();
        if seen.is_none() || now != seen {
            seen = now;
            let (promoted, failed, errors) = h.drain();
            if let Err(e) = h.add(Counter::SenderPromoted, promoted).and_then(|()| h.add(Counter::PromoteFailed, failed)) {
                tracing::warn!("send_mode auto: counting promotions: {e:#}");
            }
            for e in errors {
                if warned >= WARN_FAILURES {
                    tracing::debug!("send_mode auto: a promotion failed ({e:#}); that socket stays a target only");
                } else {
                    warned += 1;
                    let more = if warned == WARN_FAILURES { " (later failures are counted, logged at debug)" } else { "" };
                    tracing::warn!("send_mode auto: a promotion failed ({e:#}); that socket stays a target only{more}");
                }
            }
        }
        std::thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{net::TcpListener, os::unix::fs::MetadataExt};

    #[test]
    fn a_socket_of_this_process_is_found_by_inode_and_copied_with_its_cookie() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let ino = std::fs::metadata(format!("/proc/self/fd/{}", l.as_raw_fd())).expect("stat the socket").ino();
        let table = FdTable::open(std::process::id());
        let cookie = socket_cookie(l.as_raw_fd()).expect("cookie");
        let copy = table.take(ino, cookie, abi::NO_FD_HINT).expect("take the socket by a scan");
        assert_ne!(copy.as_raw_fd(), l.as_raw_fd(), "a new descriptor");
        assert_eq!(socket_cookie(copy.as_raw_fd()).expect("cookie"), cookie);
        // The hint names it: no scan.
        let hinted = FdTable::open(std::process::id());
        let copy = hinted.take(ino, cookie, l.as_raw_fd() as u32).expect("take the socket by its hint");
        assert_eq!(socket_cookie(copy.as_raw_fd()).expect("cookie"), cookie);
        assert!(hinted.by_ino.get().is_none(), "a good hint needs no scan");
        // A wrong hint (stdin) falls back to the scan.
        let copy = hinted.take(ino, cookie, 0).expect("take the socket after a wrong hint");
        assert_eq!(socket_cookie(copy.as_raw_fd()).expect("cookie"), cookie);
        let err = table.take(ino, cookie + 1, l.as_raw_fd() as u32).expect_err("another cookie");
        assert!(format!("{err:#}").contains("cookie differs"), "{err:#}");
        let err = table.take(ino + 1_000_000, cookie, abi::NO_FD_HINT).expect_err("no such socket");
        assert!(format!("{err:#}").contains("no descriptor of it in /proc/"), "{err:#}");
    }
}
