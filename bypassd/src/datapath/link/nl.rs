//! Minimal rtnetlink: a NETLINK_ROUTE socket, message and attribute walking, and
//! the RTM_GETLINK dump. Netlink answers for the caller's own netns (sysfs would
//! show the netns it was mounted in).
use anyhow::{Context, Result, bail};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

pub const NLMSG_HDRLEN: usize = 16;
const NLMSG_DONE: u16 = 3;
const NLMSG_ERROR: u16 = 2;
const RTM_GETLINK: u16 = 18;
pub const RTM_NEWLINK: u16 = 16;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const IFINFOMSG_LEN: usize = 16;

const IFLA_IFNAME: u16 = 3;
const IFLA_LINK: u16 = 5;
const IFLA_MASTER: u16 = 10;
const IFLA_LINKINFO: u16 = 18;
const IFLA_LINK_NETNSID: u16 = 37;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const IFLA_BR_AGEING_TIME: u16 = 4;

/// A NETLINK_ROUTE socket bound to `groups` (0: requests only).
pub fn socket(groups: u32) -> Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("opening a netlink socket (AF_NETLINK must be allowed)");
    }
    // SAFETY: fd is a fresh socket nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: all-zero sockaddr_nl is valid.
    let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    sa.nl_family = libc::AF_NETLINK as u16;
    sa.nl_groups = groups;
    // SAFETY: sa is a valid sockaddr_nl of the size given.
    let rc = unsafe {
        libc::bind(sock.as_raw_fd(), (&sa as *const libc::sockaddr_nl).cast(), std::mem::size_of::<libc::sockaddr_nl>() as u32)
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error()).context("binding the netlink socket");
    }
    Ok(sock)
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    b.get(off..off + 2).map_or(0, |s| u16::from_ne_bytes([s[0], s[1]]))
}

pub fn u32_at(b: &[u8], off: usize) -> u32 {
    b.get(off..off + 4).map_or(0, |s| u32::from_ne_bytes([s[0], s[1], s[2], s[3]]))
}

/// Netlink messages in a datagram: (type, body).
pub fn messages(buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut v = Vec::new();
    let mut off = 0;
    while off + NLMSG_HDRLEN <= buf.len() {
        let len = u32_at(buf, off) as usize;
        if len < NLMSG_HDRLEN || off + len > buf.len() {
            break;
        }
        v.push((u16_at(buf, off + 4), &buf[off + NLMSG_HDRLEN..off + len]));
        off += (len + 3) & !3;
    }
    v
}

/// Route attributes: (type without flags, payload).
pub fn attrs(b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut v = Vec::new();
    let mut off = 0;
    while off + 4 <= b.len() {
        let len = u16_at(b, off) as usize;
        if len < 4 || off + len > b.len() {
            break;
        }
        v.push((u16_at(b, off + 2) & 0x3fff, &b[off + 4..off + len]));
        off += (len + 3) & !3;
    }
    v
}

/// One interface as RTM_NEWLINK describes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Link {
    pub ifindex: u32,
    pub name: String,
    /// The bridge (or bond) it is a port of.
    pub master: u32,
    /// The peer/lower device (veth peer's ifindex).
    pub link: u32,
    /// IFLA_LINK refers to another netns (a veth whose peer lives elsewhere).
    pub link_elsewhere: bool,
    /// IFLA_INFO_KIND: "bridge", "veth", "tun", ...
    pub kind: String,
    /// Bridge FDB ageing time in centiseconds (bridges only).
    pub ageing_cs: Option<u32>,
}

pub fn parse_link(body: &[u8]) -> Option<Link> {
    if body.len() < IFINFOMSG_LEN {
        return None;
    }
    let mut l = Link { ifindex: u32_at(body, 4), ..Default::default() };
    for (t, p) in attrs(&body[IFINFOMSG_LEN..]) {
        match t {
            IFLA_IFNAME => l.name = String::from_utf8_lossy(p.split(|&b| b == 0).next().unwrap_or(p)).into_owned(),
            IFLA_MASTER => l.master = u32_at(p, 0),
            IFLA_LINK => l.link = u32_at(p, 0),
            IFLA_LINK_NETNSID => l.link_elsewhere = true,
            IFLA_LINKINFO => {
                for (it, ip) in attrs(p) {
                    match it {
                        IFLA_INFO_KIND => l.kind = String::from_utf8_lossy(ip.split(|&b| b == 0).next().unwrap_or(ip)).into_owned(),
                        IFLA_INFO_DATA => {
                            l.ageing_cs = attrs(ip).iter().find(|(t, _)| *t == IFLA_BR_AGEING_TIME).map(|(_, v)| u32_at(v, 0));
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some(l)
}

/// Every interface in this netns.
pub fn links() -> Result<Vec<Link>> {
    let mut body = [0u8; IFINFOMSG_LEN];
    body[0] = libc::AF_UNSPEC as u8;
    Ok(dump(RTM_GETLINK, &body, "link")?.iter().filter(|(t, _)| *t == RTM_NEWLINK).filter_map(|(_, b)| parse_link(b)).collect())
}

/// One bridge FDB entry (AF_BRIDGE neighbour) as RTM_NEWNEIGH describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Neigh {
    /// The port the MAC is behind.
    pub ifindex: u32,
    pub mac: [u8; 6],
    /// NUD_* state: NUD_PERMANENT marks the bridge's and ports' own addresses.
    pub state: u16,
    /// The bridge (NDA_MASTER), 0 if not given.
    pub master: u32,
    /// How long ago the bridge last saw the MAC there, in centiseconds (USER_HZ).
    pub updated_cs: u32,
}

const NDMSG_LEN: usize = 12;
const NDA_LLADDR: u16 = 2;
const NDA_CACHEINFO: u16 = 3;
const NDA_MASTER: u16 = 9;
pub const AF_BRIDGE: u8 = 7;
pub const NUD_PERMANENT: u16 = 0x80;
pub const RTM_NEWNEIGH: u16 = 28;
const RTM_GETNEIGH: u16 = 30;

/// Parse an AF_BRIDGE neighbour message (None for other families or no MAC).
pub fn parse_neigh(body: &[u8]) -> Option<Neigh> {
    if body.len() < NDMSG_LEN || body[0] != AF_BRIDGE {
        return None;
    }
    let mut n = Neigh { ifindex: u32_at(body, 4), mac: [0; 6], state: u16_at(body, 8), master: 0, updated_cs: 0 };
    let mut have_mac = false;
    for (t, p) in attrs(&body[NDMSG_LEN..]) {
        match t {
            NDA_LLADDR if p.len() == 6 => {
                n.mac.copy_from_slice(p);
                have_mac = true;
            }
            NDA_MASTER => n.master = u32_at(p, 0),
            // struct nda_cacheinfo { confirmed, used, updated, refcnt }
            NDA_CACHEINFO => n.updated_cs = u32_at(p, 8),
            _ => {}
        }
    }
    have_mac.then_some(n)
}

/// Every bridge FDB entry in this netns (all bridges).
pub fn fdb() -> Result<Vec<Neigh>> {
    let mut body = [0u8; NDMSG_LEN];
    body[0] = AF_BRIDGE;
    Ok(dump(RTM_GETNEIGH, &body, "bridge FDB")?.iter().filter(|(t, _)| *t == RTM_NEWNEIGH).filter_map(|(_, b)| parse_neigh(b)).collect())
}

/// A NLM_F_DUMP request of `ty` with `body`: every message of the answer (type, body).
fn dump(ty: u16, body: &[u8], what: &str) -> Result<Vec<(u16, Vec<u8>)>> {
    let sock = socket(0)?;
    let mut req = vec![0u8; NLMSG_HDRLEN + body.len()];
    let len = req.len() as u32;
    req[0..4].copy_from_slice(&len.to_ne_bytes());
    req[4..6].copy_from_slice(&ty.to_ne_bytes());
    req[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes());
    req[NLMSG_HDRLEN..].copy_from_slice(body);
    // SAFETY: req is valid for reads of its length.
    if unsafe { libc::send(sock.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("netlink {what} dump request"));
    }
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        // SAFETY: buf is valid for writes of its length.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("reading the netlink {what} dump"));
        }
        for (t, b) in messages(&buf[..n as usize]) {
            match t {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => {
                    let errno = -(u32_at(b, 0) as i32);
                    if errno != 0 {
                        bail!("netlink {what} dump failed: {}", std::io::Error::from_raw_os_error(errno));
                    }
                }
                _ => out.push((t, b.to_vec())),
            }
        }
    }
}
