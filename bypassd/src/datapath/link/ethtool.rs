//! Checksum offloads through the kernel's ethtool ioctl (SIOCETHTOOL with the
//! one-feature commands). The `ethtool` crate only reads features, so this is the
//! ioctl itself. Any socket reaches dev_ioctl; an AF_UNIX one needs no network family.
use anyhow::{Context, Result, bail};
use std::os::fd::{AsRawFd, OwnedFd};

const ETHTOOL_GDRVINFO: u32 = 0x03;
const ETHTOOL_GRXCSUM: u32 = 0x14;
const ETHTOOL_SRXCSUM: u32 = 0x15;
const ETHTOOL_GTXCSUM: u32 = 0x16;
const ETHTOOL_STXCSUM: u32 = 0x17;
const ETHTOOL_GTSO: u32 = 0x1e;

#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

#[repr(C)]
struct EthtoolDrvinfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

#[repr(C)]
struct Ifreq {
    name: [u8; libc::IFNAMSIZ],
    data: *mut libc::c_void,
    _pad: [u8; 16],
}

/// Which checksum offloads an interface has now (and TSO, which needs tx).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Offloads {
    pub rx: bool,
    pub tx: bool,
    pub tso: bool,
}

impl Offloads {
    pub fn describe(&self) -> String {
        let b = |v: bool| if v { "on" } else { "off" };
        format!("rx-checksum {} tx-checksum {} tso {}", b(self.rx), b(self.tx), b(self.tso))
    }
}

fn socket() -> Result<OwnedFd> {
    nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("creating a socket for the ethtool ioctl")
}

fn ioctl(ifname: &str, data: *mut libc::c_void) -> std::io::Result<()> {
    let sock = socket().map_err(std::io::Error::other)?;
    let mut req = Ifreq { name: [0; libc::IFNAMSIZ], data, _pad: [0; 16] };
    let n = ifname.len().min(libc::IFNAMSIZ - 1);
    req.name[..n].copy_from_slice(&ifname.as_bytes()[..n]);
    // SAFETY: req is a valid ifreq whose data points at a live ethtool struct of the
    // kind its first word (cmd) names.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL as _, &mut req) };
    if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}

fn get(ifname: &str, cmd: u32) -> Result<bool> {
    let mut v = EthtoolValue { cmd, data: 0 };
    ioctl(ifname, (&mut v as *mut EthtoolValue).cast()).with_context(|| format!("ethtool get 0x{cmd:x} on {ifname}"))?;
    Ok(v.data != 0)
}

fn set(ifname: &str, cmd: u32, on: bool) -> std::io::Result<()> {
    let mut v = EthtoolValue { cmd, data: u32::from(on) };
    ioctl(ifname, (&mut v as *mut EthtoolValue).cast())
}

pub fn read(ifname: &str) -> Result<Offloads> {
    let tx = get(ifname, ETHTOOL_GTXCSUM)?;
    // GTSO is any TSO bit; without tx checksumming the kernel drops the TCP/TCP6 ones and
    // keeps only variants such as tx-tcp-accecn-segmentation, which is no TSO for us.
    Ok(Offloads { rx: get(ifname, ETHTOOL_GRXCSUM)?, tx, tso: tx && get(ifname, ETHTOOL_GTSO)? })
}

/// Ask for rx/tx checksumming on or off, then read back what the kernel kept (it may
/// keep a feature off silently, e.g. a tap whose owner never called TUNSETOFFLOAD).
/// Returns the new state and, per asked feature, why it did not take.
pub fn apply(ifname: &str, rx: Option<bool>, tx: Option<bool>) -> Result<(Offloads, Vec<String>)> {
    let mut problems = Vec::new();
    for (what, cmd, want) in [("rx-checksum", ETHTOOL_SRXCSUM, rx), ("tx-checksum", ETHTOOL_STXCSUM, tx)] {
        if let Some(on) = want
            && let Err(e) = set(ifname, cmd, on)
        {
            let why = if e.raw_os_error() == Some(libc::EOPNOTSUPP) { "fixed by the driver".to_string() } else { e.to_string() };
            problems.push(format!("{what} {} refused on {ifname}: {why}", if on { "on" } else { "off" }));
        }
    }
    let now = read(ifname)?;
    for (what, want, have) in [("rx-checksum", rx, now.rx), ("tx-checksum", tx, now.tx)] {
        if let Some(on) = want
            && on != have
            && !problems.iter().any(|p| p.starts_with(what))
        {
            problems.push(format!("{what} stays {} on {ifname} (the kernel kept it)", if have { "on" } else { "off" }));
        }
    }
    Ok((now, problems))
}

/// The driver name (e.g. "veth", "tun", "bridge").
pub fn driver(ifname: &str) -> Result<String> {
    // SAFETY: all-zero is a valid EthtoolDrvinfo.
    let mut d: EthtoolDrvinfo = unsafe { std::mem::zeroed() };
    d.cmd = ETHTOOL_GDRVINFO;
    ioctl(ifname, (&mut d as *mut EthtoolDrvinfo).cast()).with_context(|| format!("ethtool driver info of {ifname}"))?;
    let end = d.driver.iter().position(|&b| b == 0).unwrap_or(d.driver.len());
    let s = String::from_utf8_lossy(&d.driver[..end]).into_owned();
    if s.is_empty() {
        bail!("{ifname} reports no driver");
    }
    Ok(s)
}
