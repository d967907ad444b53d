//! Socket helpers: listener creation (dual-stack for IPv6), EAGAIN-aware I/O with
//! poll(2), and the splice(2) reader.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use socket2::{Domain, Protocol, Socket, Type};

/// Parse an IP address, accepting `::1` as well as `[::1]`.
pub fn parse_ip(s: &str) -> Result<IpAddr> {
    let t = s.trim();
    let t = t
        .strip_prefix('[')
        .and_then(|x| x.strip_suffix(']'))
        .unwrap_or(t);
    t.parse()
        .with_context(|| format!("invalid IP address {s:?}"))
}

/// Resolve `host:port` (numeric addresses or names such as localhost:1234).
pub fn resolve(s: &str) -> Result<SocketAddr> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    s.to_socket_addrs()
        .with_context(|| {
            format!("cannot resolve address {s:?} (expected e.g. 127.0.0.1:4000 or [::1]:4000)")
        })?
        .next()
        .ok_or_else(|| anyhow!("address {s:?} resolved to nothing"))
}

/// The loopback address of the same family, for connecting to an unspecified bind address.
pub fn connectable(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        let ip = match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        };
        SocketAddr::new(ip, addr.port())
    } else {
        addr
    }
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Create a listening TCP socket with SO_REUSEADDR, a large backlog and, for IPv6,
/// IPV6_V6ONLY off (so `[::]:port` also accepts IPv4 clients).
pub fn listen(addr: SocketAddr) -> Result<TcpListener> {
    let sock = bound_socket(addr)?;
    sock.listen(4096).with_context(|| format!("listen({addr})"))?;
    Ok(sock.into())
}

/// Connect to `addr` from a fixed local port (tests that need an exact 4-tuple).
pub fn connect_from(addr: SocketAddr, source_port: u16) -> Result<TcpStream> {
    let local = match addr {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, source_port)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, source_port)),
    };
    let sock = bound_socket(local)?;
    sock.connect(&addr.into()).with_context(|| format!("connect to {addr} from port {source_port}"))?;
    Ok(sock.into())
}

/// A TCP socket with SO_REUSEADDR bound to `addr` (IPv6: dual-stack).
fn bound_socket(addr: SocketAddr) -> Result<Socket> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).context("socket()")?;
    sock.set_reuse_address(true).context("setsockopt(SO_REUSEADDR)")?;
    if addr.is_ipv6() {
        sock.set_only_v6(false).context("setsockopt(IPV6_V6ONLY, 0)")?;
    }
    sock.bind(&addr.into()).with_context(|| format!("bind({addr})"))?;
    Ok(sock)
}

/// Wait until `fd` is ready for `events` (POLLIN/POLLOUT). Error/hangup conditions also
/// return Ok so that the following syscall reports the real error.
pub fn wait_fd(fd: RawFd, events: libc::c_short, timeout_ms: libc::c_int) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, timeout_ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        return Ok(r > 0);
    }
}

/// EAGAIN-aware socket I/O: works on blocking and O_NONBLOCK sockets alike; every
/// EAGAIN is counted and followed by poll(2).
#[derive(Clone, Copy)]
pub struct Io<'a> {
    pub sock: &'a TcpStream,
    pub eagain: &'a AtomicU64,
}

impl Io<'_> {
    fn on_would_block(&self, events: libc::c_short) -> io::Result<()> {
        self.eagain.fetch_add(1, Ordering::Relaxed);
        wait_fd(self.sock.as_raw_fd(), events, -1).map(drop)
    }

    pub fn read_some(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match (&mut &*self.sock).read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.on_would_block(libc::POLLIN)?
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub fn write_some(&self, buf: &[u8]) -> io::Result<usize> {
        loop {
            match (&mut &*self.sock).write(buf) {
                Ok(0) if !buf.is_empty() => {
                    return Err(io::Error::new(io::ErrorKind::WriteZero, "write returned 0"));
                }
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.on_would_block(libc::POLLOUT)?
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub fn write_all(&self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            let n = self.write_some(buf)?;
            buf = &buf[n..];
        }
        Ok(())
    }

    /// Read until `buf` is full or EOF; returns the number of bytes read.
    pub fn read_full(&self, reader: &mut Reader, buf: &mut [u8]) -> io::Result<usize> {
        let mut got = 0;
        while got < buf.len() {
            let n = reader.read(self, &mut buf[got..])?;
            if n == 0 {
                break;
            }
            got += n;
        }
        Ok(got)
    }
}

/// How a receiver pulls bytes off the socket.
pub enum Reader {
    /// read(2)/recv(2).
    Plain,
    /// splice(2) socket -> pipe, then read(2) from the pipe (like Go's io.Copy).
    Splice {
        rd: OwnedFd,
        wr: OwnedFd,
        cap: usize,
        pending: usize,
    },
}

impl Reader {
    pub fn plain() -> Reader {
        Reader::Plain
    }

    pub fn splice() -> Result<Reader> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: fds has room for two descriptors.
        cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })
            .context("pipe2() for splice reader")?;
        // SAFETY: both fds were just created and are owned here.
        let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // Try a 1 MiB pipe; fall back to whatever the kernel gives us.
        // SAFETY: fcntl on our own pipe fd.
        unsafe { libc::fcntl(wr.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20) };
        // SAFETY: fcntl on our own pipe fd.
        let cap = unsafe { libc::fcntl(wr.as_raw_fd(), libc::F_GETPIPE_SZ) };
        let cap = if cap > 0 { cap as usize } else { 65536 };
        Ok(Reader::Splice {
            rd,
            wr,
            cap,
            pending: 0,
        })
    }

    /// Read some bytes (0 = EOF).
    pub fn read(&mut self, io: &Io, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Reader::Plain => io.read_some(buf),
            Reader::Splice {
                rd,
                wr,
                cap,
                pending,
            } => {
                if buf.is_empty() {
                    return Ok(0);
                }
                if *pending == 0 {
                    let want = buf.len().min(*cap);
                    let n = loop {
                        // SAFETY: valid fds, null offsets (both are not seekable).
                        let r = unsafe {
                            libc::splice(
                                io.sock.as_raw_fd(),
                                std::ptr::null_mut(),
                                wr.as_raw_fd(),
                                std::ptr::null_mut(),
                                want,
                                libc::SPLICE_F_MOVE,
                            )
                        };
                        if r >= 0 {
                            break r as usize;
                        }
                        let e = io::Error::last_os_error();
                        match e.kind() {
                            io::ErrorKind::Interrupted => continue,
                            io::ErrorKind::WouldBlock => {
                                io.eagain.fetch_add(1, Ordering::Relaxed);
                                wait_fd(io.sock.as_raw_fd(), libc::POLLIN, -1)?;
                            }
                            _ => {
                                return Err(io::Error::new(
                                    e.kind(),
                                    format!("splice(socket -> pipe): {e}"),
                                ));
                            }
                        }
                    };
                    if n == 0 {
                        return Ok(0);
                    }
                    *pending = n;
                }
                let want = buf.len().min(*pending);
                loop {
                    // SAFETY: buf is valid for `want` bytes.
                    let r = unsafe { libc::read(rd.as_raw_fd(), buf.as_mut_ptr().cast(), want) };
                    if r > 0 {
                        *pending -= r as usize;
                        return Ok(r as usize);
                    }
                    if r == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "splice pipe returned EOF with data pending",
                        ));
                    }
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(io::Error::new(e.kind(), format!("read(splice pipe): {e}")));
                    }
                }
            }
        }
    }
}

/// Write `contents` to `path` atomically (temp file in the same directory, then rename).
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| anyhow!("{} has no file name", path.display()))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    std::fs::write(&tmp, contents).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

/// Create an (empty) marker file.
pub fn touch(path: &Path) -> Result<()> {
    write_atomic(path, b"").with_context(|| format!("creating marker file {}", path.display()))
}

/// Block until `path` exists (polls every 10 ms).
pub fn wait_for_file(path: &Path) {
    while !path.exists() {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Parse a byte count: plain integer or with a binary suffix K/M/G/T (also KiB, MiB, ...).
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    if num.is_empty() {
        return Err(format!("invalid size {s:?}"));
    }
    let n: u64 = num
        .parse()
        .map_err(|e| format!("invalid size {s:?}: {e}"))?;
    let mult: u64 = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(format!("invalid size suffix in {s:?} (use K, M, G or T)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} overflows u64"))
}

/// Parse a u64 in decimal or 0x-prefixed hex.
pub fn parse_u64(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let r = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => t.parse(),
    };
    r.map_err(|e| format!("invalid number {s:?}: {e}"))
}

pub fn ensure_max_write(w: u32) -> Result<()> {
    if w == 0 || w > crate::proto::MAX_WRITE_LIMIT {
        bail!(
            "--max-write must be in 1..={}",
            crate::proto::MAX_WRITE_LIMIT
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("123").unwrap(), 123);
        assert_eq!(parse_size("4M").unwrap(), 4 << 20);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("2k").unwrap(), 2048);
        assert!(parse_size("x").is_err());
        assert!(parse_size("1Q").is_err());
        assert_eq!(parse_u64("0x10").unwrap(), 16);
        assert_eq!(parse_u64("10").unwrap(), 10);
    }

    #[test]
    fn ips() {
        assert_eq!(parse_ip("[::1]").unwrap(), IpAddr::V6(Ipv6Addr::LOCALHOST));
        assert_eq!(
            parse_ip("127.0.0.1").unwrap(),
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        );
        assert!(parse_ip("nope").is_err());
    }
}
