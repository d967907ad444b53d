//! A stand-in for a VM: two TAP devices, one in a "vm" netns (the guest's NIC) and
//! one in the node netns (what QEMU would hold), with a relay copying frames between
//! their fds, as a hypervisor does. With `vnet_hdr` both carry virtio-net headers
//! and have offloads enabled (TUNSETOFFLOAD), so checksum-partial and GSO frames
//! pass as they would from a virtio guest. Closing the fds deletes both taps.
use anyhow::{Context, Result, bail};
use std::{
    fs::File,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
};

const TUNSETIFF: libc::c_ulong = 0x400454ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x400454d0;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUN_F_CSUM: libc::c_ulong = 0x01;
const TUN_F_TSO4: libc::c_ulong = 0x02;
const TUN_F_TSO6: libc::c_ulong = 0x04;

/// Run `f` on a thread that has entered netns `ns` (None: this netns). Children
/// spawned there and sockets or devices it creates belong to that netns.
pub fn in_netns<T: Send>(ns: Option<&str>, f: impl FnOnce() -> T + Send) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| -> Result<T> {
            if let Some(ns) = ns {
                let f = File::open(format!("/run/netns/{ns}")).with_context(|| format!("opening netns {ns}"))?;
                nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).with_context(|| format!("entering netns {ns}"))?;
            }
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("netns thread panicked"))?
    })
}

/// Open (creating) tap `name` in netns `ns`, non-blocking (the relay reads until empty).
pub fn open_tap(ns: Option<&str>, name: &str, vnet_hdr: bool) -> Result<OwnedFd> {
    in_netns(ns, || -> Result<OwnedFd> {
        // SAFETY: open(2) of a constant path; the fd is owned below.
        let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("opening /dev/net/tun");
        }
        // SAFETY: fresh fd.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        #[repr(C)]
        struct IfReq {
            name: [u8; 16],
            flags: libc::c_short,
            _pad: [u8; 22],
        }
        let mut req = IfReq { name: [0; 16], flags: IFF_TAP | IFF_NO_PI | if vnet_hdr { IFF_VNET_HDR } else { 0 }, _pad: [0; 22] };
        if name.len() > 15 {
            bail!("tap name {name} is too long");
        }
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: req is a valid ifreq for TUNSETIFF.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF as _, &mut req) } < 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("TUNSETIFF {name}"));
        }
        if vnet_hdr {
            // As QEMU does for a virtio guest: checksum offload and TSO.
            // SAFETY: TUNSETOFFLOAD takes an integer argument.
            if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETOFFLOAD as _, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6) } < 0 {
                return Err(std::io::Error::last_os_error()).with_context(|| format!("TUNSETOFFLOAD {name}"));
            }
        }
        Ok(fd)
    })?
}

/// Copies frames both ways between two tap fds until dropped.
pub struct TapRelay {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl TapRelay {
    /// Create tap `node_tap` in netns `node_ns` and `vm_tap` in netns `vm_ns`, and relay.
    pub fn start(node_ns: Option<&str>, node_tap: &str, vm_ns: &str, vm_tap: &str, vnet_hdr: bool) -> Result<TapRelay> {
        let a = Arc::new(open_tap(node_ns, node_tap, vnet_hdr)?);
        let b = Arc::new(open_tap(Some(vm_ns), vm_tap, vnet_hdr)?);
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for (from, to) in [(a.clone(), b.clone()), (b, a)] {
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || copy(&from, &to, &stop)));
        }
        Ok(TapRelay { stop, threads })
    }
}

/// Frames are read until the queue is empty and only then polled for: one syscall
/// less per frame than poll-then-read, which matters because this loop, not the node's
/// forwarding, bounds a TCP stream of small frames (35-60k frames/s each way).
fn copy(from: &OwnedFd, to: &OwnedFd, stop: &AtomicBool) {
    let mut buf = vec![0u8; 70 * 1024];
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: buf is valid for writes of its length.
        let n = unsafe { libc::read(from.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n > 0 {
            // A frame the other side refuses (e.g. carrier down) is dropped, as on a wire.
            // SAFETY: the first n bytes of buf were just read.
            unsafe { libc::write(to.as_raw_fd(), buf.as_ptr().cast(), n as usize) };
            continue;
        }
        let mut p = libc::pollfd { fd: from.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut p, 1, 100) };
    }
}

impl Drop for TapRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
