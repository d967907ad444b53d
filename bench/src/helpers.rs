//! Helper processes the benchmark starts (re-executing itself) inside the test
//! cgroups: the AF_UNIX floor, connection churn, and a holder of N connections.
use anyhow::{Context, Result, bail};
use clap::Subcommand;
use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::unix::net::{UnixListener, UnixStream},
    path::PathBuf,
    time::{Duration, Instant},
};

#[derive(Subcommand, Debug)]
pub enum Helper {
    /// AF_UNIX stream server for `unix-client` (ping-pong echo or sink).
    UnixServer {
        #[arg(long)]
        path: PathBuf,
    },
    /// One AF_UNIX point: prints `{"value": …}` (µs one-way latency or MB/s).
    UnixClient {
        #[arg(long)]
        path: PathBuf,
        /// lat or bw
        #[arg(long)]
        test: String,
        #[arg(long)]
        size: u32,
        #[arg(long)]
        millis: u32,
        /// Pin client and server to this CPU (0-based); unpinned when absent.
        #[arg(long)]
        cpu: Option<usize>,
    },
    /// Connection churn in a fresh network namespace of its own (so no run inherits an
    /// earlier run's TIME_WAIT sockets): a server thread reads 1 byte, answers 1 byte
    /// and waits for EOF; the client connects, exchanges, closes, as fast as possible.
    /// Prints JSON.
    Churn {
        #[arg(long)]
        millis: u32,
    },
    /// Accept N connections (prints its port first), answer one byte on each, and
    /// hold them until stdin closes.
    HoldServer {
        #[arg(long)]
        n: usize,
    },
    /// Open N connections to `hold-server`, exchange one byte on each, print
    /// `ready N`, and hold them until stdin closes. (Two processes: one may not have
    /// CAP_SYS_RESOURCE to raise RLIMIT_NOFILE above 2 N.)
    HoldClient {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        n: usize,
    },
}

pub fn run(h: Helper) -> Result<()> {
    match h {
        Helper::UnixServer { path } => unix_server(path),
        Helper::UnixClient { path, test, size, millis, cpu } => unix_client(path, &test, size, millis, cpu),
        Helper::Churn { millis } => churn(millis),
        Helper::HoldServer { n } => hold_server(n),
        Helper::HoldClient { addr, n } => hold_client(addr, n),
    }
}

/// Pin the calling process to `cpu`, or allow every CPU.
pub fn set_affinity(cpu: Option<usize>) -> Result<()> {
    let mut set = nix::sched::CpuSet::new();
    match cpu {
        Some(c) => set.set(c)?,
        None => {
            let n = std::thread::available_parallelism().map_or(1, |n| n.get()).max(num_cpus_online());
            for c in 0..n.min(nix::sched::CpuSet::count()) {
                let _ = set.set(c);
            }
        }
    }
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
    Ok(())
}

fn num_cpus_online() -> usize {
    let v = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if v > 0 { v as usize } else { 1 }
}

const LAT: u8 = 1;
const BW: u8 = 2;

fn unix_server(path: PathBuf) -> Result<()> {
    let _ = std::fs::remove_file(&path);
    let l = UnixListener::bind(&path)?;
    println!("ready");
    std::io::stdout().flush()?;
    for s in l.incoming() {
        let mut s = s?;
        // Header: test (1), size (4), cpu (4, -1 = unpinned).
        let mut h = [0u8; 9];
        if s.read_exact(&mut h).is_err() {
            continue;
        }
        let size = u32::from_le_bytes(h[1..5].try_into().unwrap()) as usize;
        let cpu = i32::from_le_bytes(h[5..9].try_into().unwrap());
        set_affinity((cpu >= 0).then_some(cpu as usize))?;
        let mut buf = vec![0u8; size.max(1)];
        match h[0] {
            LAT => loop {
                if s.read_exact(&mut buf).is_err() {
                    break;
                }
                if s.write_all(&buf).is_err() {
                    break;
                }
            },
            BW => {
                let mut total = 0u64;
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => total += n as u64,
                    }
                }
                let _ = s.write_all(&total.to_le_bytes());
            }
            _ => {}
        }
    }
    Ok(())
}

fn unix_client(path: PathBuf, test: &str, size: u32, millis: u32, cpu: Option<usize>) -> Result<()> {
    set_affinity(cpu)?;
    let mut s = UnixStream::connect(&path).with_context(|| format!("connecting to {}", path.display()))?;
    let t = match test {
        "lat" => LAT,
        "bw" => BW,
        _ => bail!("unknown test {test}"),
    };
    let mut h = vec![t];
    h.extend_from_slice(&size.to_le_bytes());
    h.extend_from_slice(&cpu.map_or(-1i32, |c| c as i32).to_le_bytes());
    s.write_all(&h)?;
    let mut buf = vec![0x5au8; size as usize];
    let dur = Duration::from_millis(millis as u64);
    let value = if t == LAT {
        // Warm up, then time round trips; report half a round trip like qperf.
        for _ in 0..100 {
            s.write_all(&buf)?;
            s.read_exact(&mut buf)?;
        }
        let t0 = Instant::now();
        let mut n = 0u64;
        while t0.elapsed() < dur {
            s.write_all(&buf)?;
            s.read_exact(&mut buf)?;
            n += 1;
        }
        t0.elapsed().as_secs_f64() * 1e6 / (2.0 * n as f64)
    } else {
        let t0 = Instant::now();
        while t0.elapsed() < dur {
            s.write_all(&buf)?;
        }
        s.shutdown(Shutdown::Write)?;
        let mut tot = [0u8; 8];
        s.read_exact(&mut tot)?;
        u64::from_le_bytes(tot) as f64 / t0.elapsed().as_secs_f64() / 1e6
    };
    println!("{}", serde_json::json!({ "value": value }));
    Ok(())
}

fn churn(millis: u32) -> Result<()> {
    // Before any thread exists: threads spawned later share this namespace.
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).context("unshare a network namespace")?;
    bypass_testsupport::ip(&["link", "set", "lo", "up"])?;
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    std::thread::spawn(move || churn_server(l));
    churn_client(addr, millis)
}

fn churn_server(l: TcpListener) {
    let mut b = [0u8; 16];
    for s in l.incoming() {
        let Ok(mut s) = s else { continue };
        if s.read_exact(&mut b[..1]).is_err() {
            continue;
        }
        let _ = s.write_all(&b[..1]);
        // Wait for the client's FIN, so the client closes first (TIME_WAIT on its side).
        while matches!(s.read(&mut b), Ok(n) if n > 0) {}
    }
}

fn churn_client(addr: SocketAddr, millis: u32) -> Result<()> {
    let dur = Duration::from_millis(millis as u64);
    let mut b = [1u8; 1];
    let mut n = 0u64;
    let mut errors = 0u64;
    let t0 = Instant::now();
    while t0.elapsed() < dur {
        match TcpStream::connect(addr) {
            Ok(mut s) => {
                s.write_all(&b)?;
                s.read_exact(&mut b)?;
                drop(s);
                n += 1;
            }
            Err(_) => errors += 1,
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    println!("{}", serde_json::json!({ "conns": n, "secs": secs, "errors": errors, "rate": n as f64 / secs }));
    Ok(())
}

fn raise_nofile(want: u64) -> Result<()> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    if lim.rlim_cur >= want {
        return Ok(());
    }
    // Raise the hard limit too when allowed (CAP_SYS_RESOURCE); else go to the hard limit.
    let raised = libc::rlimit { rlim_cur: want, rlim_max: want.max(lim.rlim_max) };
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        return Ok(());
    }
    if lim.rlim_max >= want {
        let soft = libc::rlimit { rlim_cur: want, rlim_max: lim.rlim_max };
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &soft) } == 0 {
            return Ok(());
        }
    }
    bail!("need {want} file descriptors, RLIMIT_NOFILE hard limit is {}", lim.rlim_max)
}

/// Stdin closing (or the parent dying) is the signal to let go.
fn wait_stdin_eof() {
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
}

/// A loopback listener with a deep accept queue (std's 128 makes a burst of
/// connects wait for SYN retransmits).
fn deep_listener() -> Result<TcpListener> {
    use std::os::fd::FromRawFd;
    let l = TcpListener::bind("127.0.0.1:0")?;
    let fd = std::os::fd::IntoRawFd::into_raw_fd(l);
    // listen() again on a listening socket only changes the backlog.
    if unsafe { libc::listen(fd, 65535) } != 0 {
        bail!("listen: {}", std::io::Error::last_os_error());
    }
    Ok(unsafe { TcpListener::from_raw_fd(fd) })
}

fn hold_server(n: usize) -> Result<()> {
    raise_nofile((n + 64) as u64)?;
    let l = deep_listener()?;
    println!("{}", l.local_addr()?.port());
    std::io::stdout().flush()?;
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        v.push(l.accept()?.0);
    }
    // Two rounds of one byte each way on every connection: the first makes both ends
    // recvmsg readers (bypassd redirects only to a socket that has read once), the
    // second is redirected in the accelerated cgroup — the counters must show it.
    let mut b = [0u8; 1];
    for _ in 0..2 {
        for s in v.iter_mut() {
            s.read_exact(&mut b)?;
            s.write_all(&b)?;
        }
    }
    wait_stdin_eof();
    Ok(())
}

fn hold_client(addr: SocketAddr, n: usize) -> Result<()> {
    raise_nofile((n + 64) as u64)?;
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(TcpStream::connect(addr).context("connect")?);
    }
    let mut b = [7u8; 1];
    for _ in 0..2 {
        for c in v.iter_mut() {
            c.write_all(&b)?;
        }
        for c in v.iter_mut() {
            c.read_exact(&mut b)?;
        }
    }
    println!("ready {n}");
    std::io::stdout().flush()?;
    wait_stdin_eof();
    Ok(())
}
