//! Request/response latency loop (`rr`) and its echo server (`rr-serve`).

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::thread;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use serde::Serialize;

use crate::net::{self, parse_size, parse_u64};
use crate::stream::Stream;

#[derive(Args)]
pub struct RrArgs {
    /// rr-serve address, e.g. 127.0.0.1:4000.
    #[arg(long)]
    connect: String,
    /// Request (and echoed response) size in bytes; suffixes K, M allowed.
    #[arg(long, value_parser = parse_size)]
    size: u64,
    /// Response size, when rr-serve runs with the same --size and --reply-size: the
    /// request repeated to this length (0: an echo of the request).
    #[arg(long, value_parser = parse_size, default_value = "0")]
    reply_size: u64,
    /// Number of timed request/response round trips.
    #[arg(long)]
    iters: u64,
    /// Untimed round trips before measuring.
    #[arg(long, default_value_t = 0)]
    warmup: u64,
    /// Payload seed (decimal or 0x hex).
    #[arg(long, value_parser = parse_u64, default_value = "1")]
    seed: u64,
    /// Fail the whole run after this many seconds (0 = no limit).
    #[arg(long, default_value_t = 300)]
    timeout_secs: u64,
}

#[derive(Args)]
pub struct RrServeArgs {
    /// Address to listen on, e.g. 127.0.0.1:0 or [::]:0.
    #[arg(long)]
    listen: String,
    /// Connections to serve before exiting (0 = forever).
    #[arg(long, default_value_t = 0)]
    count: u64,
    /// Create this file once listening.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Write the bound port number here (atomically) once listening.
    #[arg(long)]
    port_file: Option<PathBuf>,
    /// Answer each request of --size bytes with --reply-size bytes (the request
    /// repeated) instead of echoing; both 0 (default): echo whatever arrives.
    #[arg(long, value_parser = parse_size, default_value = "0")]
    size: u64,
    #[arg(long, value_parser = parse_size, default_value = "0")]
    reply_size: u64,
}

#[derive(Serialize, Default)]
struct RrReport {
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    mode: &'static str,
    size: u64,
    iters: u64,
    median_us: f64,
    p90_us: f64,
    p99_us: f64,
    min_us: f64,
    max_us: f64,
    mean_us: f64,
    seconds: f64,
}

#[derive(Serialize)]
struct RrServeReport {
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    mode: &'static str,
    port: u16,
    conns: u64,
    bytes_echoed: u64,
}

fn errno_err(what: &str) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Send `out` and receive `inb.len()` bytes, never blocking in send while the
/// response is pending (so large sizes cannot deadlock).
fn exchange(fd: RawFd, out: &[u8], inb: &mut [u8]) -> io::Result<()> {
    let (mut w, mut r) = (0usize, 0usize);
    while r < inb.len() {
        let dontwait = if w < out.len() {
            // SAFETY: the slice is valid for its length.
            let n = unsafe {
                libc::send(
                    fd,
                    out[w..].as_ptr().cast(),
                    out.len() - w,
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if n >= 0 {
                w += n as usize;
            } else {
                let e = io::Error::last_os_error();
                if !matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) {
                    return Err(io::Error::new(e.kind(), format!("send: {e}")));
                }
            }
            if w < out.len() {
                net::wait_fd(fd, libc::POLLIN | libc::POLLOUT, -1)?;
                libc::MSG_DONTWAIT
            } else {
                0
            }
        } else {
            0
        };
        // SAFETY: the slice is valid for its length.
        let n = unsafe { libc::recv(fd, inb[r..].as_mut_ptr().cast(), inb.len() - r, dontwait) };
        if n > 0 {
            r += n as usize;
        } else if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "server closed the connection after {r} of {} response bytes",
                    inb.len()
                ),
            ));
        } else {
            let e = errno_err("recv");
            if !matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ) {
                return Err(e);
            }
        }
    }
    Ok(())
}

fn percentile(sorted: &[u128], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)] as f64 / 1000.0
}

pub fn cmd_rr(a: RrArgs) -> Result<ExitCode> {
    if a.size == 0 || a.size > 64 << 20 {
        bail!("--size must be in 1..=64M");
    }
    if a.iters == 0 {
        bail!("--iters must be at least 1");
    }
    if a.reply_size > 64 << 20 {
        bail!("--reply-size must be in 0..=64M");
    }
    let addr = net::resolve(&a.connect)?;
    let secs = a.timeout_secs;
    crate::start_watchdog(secs, move || {
        crate::RunReport::failure(
            "rr",
            format!("timeout: rr run exceeded --timeout-secs {secs}"),
        )
    });
    let size = a.size as usize;
    let start = Instant::now();
    let run = || -> Result<Vec<u128>> {
        let sock = TcpStream::connect(addr).with_context(|| format!("connect to {addr}"))?;
        sock.set_nodelay(true).context("setting TCP_NODELAY")?;
        let fd = sock.as_raw_fd();
        let st = Stream::new(a.seed);
        let mut req = vec![0u8; size];
        let mut resp = vec![0u8; if a.reply_size == 0 { size } else { a.reply_size as usize }];
        let mut want = resp.clone();
        let mut lat = Vec::with_capacity(a.iters as usize);
        for i in 0..a.warmup + a.iters {
            st.fill(i * a.size, &mut req);
            let t0 = Instant::now();
            exchange(fd, &req, &mut resp).with_context(|| format!("round trip {i}"))?;
            let dt = t0.elapsed().as_nanos();
            repeat_into(&req, &mut want);
            if want != resp {
                let off = want.iter().zip(&resp).position(|(x, y)| x != y).unwrap_or(0);
                return Err(anyhow!(
                    "round trip {i}: response differs at byte offset {off} (expected 0x{:02x}, got 0x{:02x})",
                    want[off],
                    resp[off]
                ));
            }
            if i >= a.warmup {
                lat.push(dt);
            }
        }
        Ok(lat)
    };
    let mut r = RrReport {
        mode: "rr",
        size: a.size,
        iters: a.iters,
        ..Default::default()
    };
    match run() {
        Ok(mut lat) => {
            lat.sort_unstable();
            r.ok = true;
            r.median_us = percentile(&lat, 0.5);
            r.p90_us = percentile(&lat, 0.9);
            r.p99_us = percentile(&lat, 0.99);
            r.min_us = percentile(&lat, 0.0);
            r.max_us = percentile(&lat, 1.0);
            r.mean_us = lat.iter().sum::<u128>() as f64 / lat.len().max(1) as f64 / 1000.0;
        }
        Err(e) => r.error = Some(format!("{e:#}")),
    }
    r.seconds = start.elapsed().as_secs_f64();
    Ok(crate::finish_with(&r, r.ok))
}

/// `out` filled with `src` repeated (an echo when they have the same length).
fn repeat_into(src: &[u8], out: &mut [u8]) {
    for chunk in out.chunks_mut(src.len().max(1)) {
        chunk.copy_from_slice(&src[..chunk.len()]);
    }
}

/// Answer each `size`-byte request with `reply` bytes (the request repeated).
fn answer(mut sock: TcpStream, size: usize, reply: usize) -> Result<u64> {
    sock.set_nodelay(true).context("setting TCP_NODELAY")?;
    let (mut req, mut out) = (vec![0u8; size], vec![0u8; reply]);
    let mut total = 0u64;
    loop {
        let mut got = 0;
        while got < size {
            match sock.read(&mut req[got..]) {
                Ok(0) if got == 0 => return Ok(total),
                Ok(0) => bail!("the client closed mid-request ({got} of {size} bytes)"),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("read"),
            }
        }
        repeat_into(&req, &mut out);
        sock.write_all(&out).context("write")?;
        total += reply as u64;
    }
}

fn echo(mut sock: TcpStream) -> Result<u64> {
    sock.set_nodelay(true).context("setting TCP_NODELAY")?;
    let mut buf = vec![0u8; 256 << 10];
    let mut total = 0u64;
    loop {
        let n = match sock.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("read"),
        };
        sock.write_all(&buf[..n]).context("write")?;
        total += n as u64;
    }
}

pub fn cmd_rr_serve(a: RrServeArgs) -> Result<ExitCode> {
    if (a.size == 0) != (a.reply_size == 0) || a.size > 64 << 20 || a.reply_size > 64 << 20 {
        bail!("--size and --reply-size go together, each in 1..=64M");
    }
    let (size, reply) = (a.size as usize, a.reply_size as usize);
    let addr = net::resolve(&a.listen)?;
    let listener = net::listen(addr)?;
    let port = listener.local_addr().context("getsockname")?.port();
    if let Some(p) = &a.port_file {
        net::write_atomic(p, port.to_string().as_bytes()).context("--port-file")?;
    }
    if let Some(p) = &a.ready_file {
        net::touch(p).context("--ready-file")?;
    }
    let mut handles = Vec::new();
    let mut accepted = 0u64;
    while a.count == 0 || accepted < a.count {
        let sock = match listener.accept() {
            Ok((s, _)) => s,
            Err(e)
                if e.kind() == io::ErrorKind::Interrupted
                    || e.raw_os_error() == Some(libc::ECONNABORTED) =>
            {
                continue;
            }
            Err(e) => return Err(e).context("accept()"),
        };
        let idx = accepted;
        accepted += 1;
        let h = thread::Builder::new()
            .name(format!("echo-{idx}"))
            .spawn(move || {
                let served = if size == 0 { echo(sock) } else { answer(sock, size, reply) };
                served.map_err(|e| {
                    let msg = format!("rr-serve conn {idx}: {e:#}");
                    eprintln!("bypass-traffic: {msg}");
                    msg
                })
            })
            .context("spawning echo thread")?;
        if a.count > 0 {
            handles.push(h);
        }
    }
    let mut errors = Vec::new();
    let mut bytes = 0;
    for h in handles {
        match h.join() {
            Ok(Ok(n)) => bytes += n,
            Ok(Err(e)) => errors.push(e),
            Err(_) => errors.push("echo thread panicked".to_string()),
        }
    }
    let r = RrServeReport {
        ok: errors.is_empty(),
        error: (!errors.is_empty()).then(|| errors.join("; ")),
        mode: "rr-serve",
        port,
        conns: accepted,
        bytes_echoed: bytes,
    };
    Ok(crate::finish_with(&r, r.ok))
}
