//! One connection of the traffic protocol, client side and server side.

use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::net::{Io, Reader, touch, wait_for_file};
use crate::proto::{HEADER_LEN, Header, Status, TRAILER_LEN, Trailer};
use crate::stream::{DIR_C2S, DIR_S2C, SizeGen, Stream, Verifier, hex};

/// Receive buffer size (also the comparison chunk); small enough to stay cache resident.
const RECV_BUF: u64 = 128 << 10;
/// Minimum send buffer size.
const SEND_BUF: u64 = 256 << 10;

pub const C2S: &str = "c2s (client->server)";
pub const S2C: &str = "s2c (server->client)";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ReadMode {
    /// Plain read(2).
    Recv,
    /// splice(2) socket -> pipe, then read the pipe.
    Splice,
    /// Plain read(2), but only after --hold-file exists.
    ReadAfterFile,
}

/// Connection phases, for stall diagnostics.
pub mod phase {
    pub const CONNECT: u8 = 0;
    pub const WAIT: u8 = 1;
    pub const HEADER: u8 = 2;
    pub const TRANSFER: u8 = 3;
    pub const TRAILER: u8 = 4;
    pub const CLOSE: u8 = 5;
    pub const DONE: u8 = 6;

    pub fn name(p: u8) -> &'static str {
        match p {
            CONNECT => "connect",
            WAIT => "wait-before-read",
            HEADER => "header",
            TRANSFER => "transfer",
            TRAILER => "trailer",
            CLOSE => "wait-eof",
            _ => "done",
        }
    }
}

/// Live counters of one connection, readable from the timeout watchdog.
#[derive(Default)]
pub struct Progress {
    pub phase: AtomicU8,
    pub sent: AtomicU64,
    pub received: AtomicU64,
    pub send_total: AtomicU64,
    pub recv_total: AtomicU64,
    pub send_done: AtomicBool,
    /// Server side: a valid header has been received.
    pub header: AtomicBool,
    pub seed: AtomicU64,
    pub eagain: AtomicU64,
}

impl Progress {
    pub fn new(seed: u64, send_total: u64, recv_total: u64) -> Progress {
        let p = Progress::default();
        p.seed.store(seed, Ordering::Relaxed);
        p.send_total.store(send_total, Ordering::Relaxed);
        p.recv_total.store(recv_total, Ordering::Relaxed);
        p
    }

    pub fn is_done(&self) -> bool {
        self.phase.load(Ordering::Relaxed) == phase::DONE
    }

    /// e.g. "phase transfer, c2s (client->server) sent 10/20, s2c (server->client) received 0/20".
    pub fn describe(&self, client: bool) -> String {
        if !client && !self.header.load(Ordering::Relaxed) {
            return format!(
                "phase {}, protocol header not yet received",
                phase::name(self.phase.load(Ordering::Relaxed))
            );
        }
        let (sd, rd) = if client { (C2S, S2C) } else { (S2C, C2S) };
        format!(
            "phase {}, {sd} sent {}/{}{}, {rd} received {}/{}",
            phase::name(self.phase.load(Ordering::Relaxed)),
            self.sent.load(Ordering::Relaxed),
            self.send_total.load(Ordering::Relaxed),
            if self.send_done.load(Ordering::Relaxed) {
                " (complete)"
            } else {
                ""
            },
            self.received.load(Ordering::Relaxed),
            self.recv_total.load(Ordering::Relaxed),
        )
    }
}

/// Per-connection result (one element of "per_conn").
#[derive(Clone, Debug, Default, Serialize)]
pub struct ConnReport {
    pub conn: usize,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub seed: u64,
    pub sent: u64,
    pub received: u64,
    pub sha256_sent: String,
    pub sha256_received: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_sha256_received: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_status: Option<&'static str>,
    pub eagain: u64,
    pub seconds: f64,
    /// Direction of the first failure ("c2s" or "s2c"), if it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direction: Option<&'static str>,
    /// Byte offset of the first failure in that direction (first mismatching byte, or
    /// where a short stream ended / an I/O error hit).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}

struct Failure {
    direction: Option<&'static str>,
    offset: Option<u64>,
    msg: String,
}

#[derive(Default)]
struct Failures(Vec<Failure>);

impl Failures {
    fn add(&mut self, direction: Option<&'static str>, offset: Option<u64>, msg: String) {
        self.0.push(Failure {
            direction,
            offset,
            msg,
        });
    }

    fn apply(self, rep: &mut ConnReport, prefix: &str) {
        rep.ok = self.0.is_empty();
        if rep.ok {
            return;
        }
        if let Some(f) = self.0.iter().find(|f| f.direction.is_some()) {
            rep.direction = f.direction;
            rep.offset = f.offset;
        }
        let msgs: Vec<&str> = self.0.iter().map(|f| f.msg.as_str()).collect();
        rep.error = Some(format!("{prefix}: {}", msgs.join("; ")));
    }
}

struct SendOutcome {
    sent: u64,
    sha: [u8; 32],
    err: Option<anyhow::Error>,
}

/// What one direction sends.
struct SendSpec {
    stream: Stream,
    len: u64,
    max_write: u32,
    sizes: SizeGen,
    /// Test hook: flip the byte at this stream offset.
    corrupt_at: Option<u64>,
}

/// Write `len` bytes of `stream` in writes of random size (1..=max_write), hashing
/// exactly what the kernel accepted.
fn send_stream(io: Io, spec: SendSpec, counter: &AtomicU64, dir: &str) -> SendOutcome {
    let SendSpec {
        stream,
        len,
        max_write,
        mut sizes,
        corrupt_at,
    } = spec;
    let cap = SEND_BUF.max(2 * u64::from(max_write)).min(len).max(1) as usize;
    let mut buf = vec![0u8; cap];
    let (mut start, mut end) = (0usize, 0usize);
    let mut gen_off = 0u64;
    let mut sent = 0u64;
    let mut hasher = Sha256::new();
    let mut err = None;
    'outer: while sent < len {
        let want = (sizes.next_size() as u64).min(len - sent) as usize;
        if end - start < want {
            // Compact and refill; cap >= max_write guarantees room for a whole write.
            buf.copy_within(start..end, 0);
            end -= start;
            start = 0;
            let n = ((cap - end) as u64).min(len - gen_off) as usize;
            stream.fill(gen_off, &mut buf[end..end + n]);
            if let Some(c) = corrupt_at
                && c >= gen_off
                && c < gen_off + n as u64
            {
                buf[end + (c - gen_off) as usize] ^= 0xFF;
            }
            gen_off += n as u64;
            end += n;
        }
        let mut off = 0;
        while off < want {
            let slice = &buf[start + off..start + want];
            match io.write_some(slice) {
                Ok(n) => {
                    hasher.update(&slice[..n]);
                    off += n;
                    sent += n as u64;
                    counter.store(sent, Ordering::Relaxed);
                }
                Err(e) => {
                    err = Some(anyhow!(
                        "{dir} write failed at byte offset {sent} of {len}: {e}"
                    ));
                    break 'outer;
                }
            }
        }
        start += want;
    }
    SendOutcome {
        sent,
        sha: hasher.finalize().into(),
        err,
    }
}

/// Receive and verify `len` bytes. Ok(true) when complete, Ok(false) on early EOF.
fn recv_stream(
    io: &Io,
    reader: &mut Reader,
    v: &mut Verifier,
    len: u64,
    counter: &AtomicU64,
    dir: &str,
) -> Result<bool> {
    let cap = len.clamp(1, RECV_BUF) as usize;
    let mut buf = vec![0u8; cap];
    while v.received() < len {
        let want = ((len - v.received()) as usize).min(cap);
        let n = reader.read(io, &mut buf[..want]).map_err(|e| {
            anyhow!(
                "{dir} read failed at byte offset {} of {len}: {e}",
                v.received()
            )
        })?;
        if n == 0 {
            return Ok(false);
        }
        v.feed(&buf[..n]);
        counter.store(v.received(), Ordering::Relaxed);
    }
    Ok(true)
}

/// After our side is finished: shut down writing and read until EOF.
/// Returns the number of unexpected bytes that arrived.
fn drain_to_eof(io: &Io, reader: &mut Reader) -> Result<u64> {
    io.sock
        .shutdown(Shutdown::Write)
        .context("shutdown(SHUT_WR)")?;
    let mut extra = 0u64;
    let mut buf = [0u8; 4096];
    loop {
        let n = reader
            .read(io, &mut buf)
            .context("reading while waiting for the peer's EOF")?;
        if n == 0 {
            return Ok(extra);
        }
        extra += n as u64;
    }
}

fn mismatch_msg(dir: &str, m: crate::stream::Mismatch) -> String {
    format!(
        "{dir} stream mismatch at byte offset {} (expected 0x{:02x}, got 0x{:02x})",
        m.offset, m.expected, m.got
    )
}

/// Signals (by creating a file) that every client connection has written its whole
/// c2s stream.
pub struct SentSignal {
    remaining: AtomicUsize,
    path: Option<PathBuf>,
}

impl SentSignal {
    pub fn new(conns: usize, path: Option<PathBuf>) -> SentSignal {
        SentSignal {
            remaining: AtomicUsize::new(conns),
            path,
        }
    }

    fn one_done(&self) -> Result<()> {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1
            && let Some(p) = &self.path
        {
            touch(p).context("--sent-file")?;
        }
        Ok(())
    }
}

pub struct ClientCfg {
    pub addr: SocketAddr,
    pub c2s_len: u64,
    pub s2c_len: u64,
    pub max_write: u32,
    pub nonblocking: bool,
    pub delay_read: Option<Duration>,
    /// Bind the client to this local port before connecting.
    pub source_port: Option<u16>,
    /// Bind the client to this local address before connecting.
    pub source: Option<std::net::IpAddr>,
}

/// Run one client connection; never panics on I/O, every problem ends up in the report.
pub fn client_conn(
    idx: usize,
    seed: u64,
    cfg: &ClientCfg,
    corrupt_at: Option<u64>,
    prog: &Progress,
    sent_sig: &SentSignal,
) -> ConnReport {
    let start = Instant::now();
    let mut rep = ConnReport {
        conn: idx,
        seed,
        ..Default::default()
    };
    let mut fails = Failures::default();
    if let Err(e) = client_inner(seed, cfg, corrupt_at, prog, sent_sig, &mut rep, &mut fails) {
        fails.add(None, None, format!("{e:#}"));
    }
    rep.eagain = prog.eagain.load(Ordering::Relaxed);
    rep.seconds = start.elapsed().as_secs_f64();
    fails.apply(&mut rep, &format!("conn {idx}"));
    prog.phase.store(phase::DONE, Ordering::Relaxed);
    rep
}

fn client_inner(
    seed: u64,
    cfg: &ClientCfg,
    corrupt_at: Option<u64>,
    prog: &Progress,
    sent_sig: &SentSignal,
    rep: &mut ConnReport,
    fails: &mut Failures,
) -> Result<()> {
    prog.phase.store(phase::CONNECT, Ordering::Relaxed);
    let sock = match (cfg.source, cfg.source_port) {
        (None, None) => TcpStream::connect(cfg.addr).with_context(|| format!("connect to {}", cfg.addr))?,
        (ip, port) => crate::net::connect_from(cfg.addr, ip, port.unwrap_or(0))?,
    };
    if cfg.nonblocking {
        sock.set_nonblocking(true).context("setting O_NONBLOCK")?;
    }
    let io = Io {
        sock: &sock,
        eagain: &prog.eagain,
    };
    prog.phase.store(phase::HEADER, Ordering::Relaxed);
    let header = Header {
        c2s_len: cfg.c2s_len,
        s2c_len: cfg.s2c_len,
        seed,
        max_write: cfg.max_write,
        flags: 0,
    };
    io.write_all(&header.encode())
        .context("writing protocol header")?;
    let sock2 = sock
        .try_clone()
        .context("dup() of the socket for the sender thread")?;
    prog.phase.store(phase::TRANSFER, Ordering::Relaxed);

    let mut verifier = Verifier::new(Stream::s2c(seed), RECV_BUF as usize);
    let mut reader = Reader::plain();
    let mut trailer = None;
    let mut extra_after_trailer = 0;

    // Which thread shut the socket down first after an error (1 sender, 2 receiver).
    let first_shut = AtomicU8::new(0);
    let send_out = thread::scope(|s| -> Result<SendOutcome> {
        let sender = thread::Builder::new()
            .name("c2s-send".into())
            .spawn_scoped(s, || {
                let io2 = Io {
                    sock: &sock2,
                    eagain: &prog.eagain,
                };
                let spec = SendSpec {
                    stream: Stream::c2s(seed),
                    len: cfg.c2s_len,
                    max_write: cfg.max_write,
                    sizes: SizeGen::new(seed, DIR_C2S, cfg.max_write),
                    corrupt_at,
                };
                let mut out = send_stream(io2, spec, &prog.sent, C2S);
                if out.err.is_none() {
                    prog.send_done.store(true, Ordering::Relaxed);
                    if let Err(e) = sent_sig.one_done() {
                        out.err = Some(e);
                    }
                } else {
                    // Unblock our receiver; the error is reported.
                    let _ = first_shut.compare_exchange(0, 1, Ordering::SeqCst, Ordering::SeqCst);
                    let _ = sock2.shutdown(Shutdown::Both);
                }
                out
            })
            .context("spawning sender thread")?;

        // Receive s2c + trailer on this thread, concurrently with the sender.
        let recv_res = (|| -> Result<()> {
            if let Some(d) = cfg.delay_read {
                thread::sleep(d);
            }
            let complete = recv_stream(
                &io,
                &mut reader,
                &mut verifier,
                cfg.s2c_len,
                &prog.received,
                S2C,
            )?;
            if !complete {
                return Ok(()); // reported as short read below
            }
            prog.phase.store(phase::TRAILER, Ordering::Relaxed);
            let mut tb = [0u8; TRAILER_LEN];
            let n = io
                .read_full(&mut reader, &mut tb)
                .context("reading the server's trailer")?;
            if n < TRAILER_LEN {
                bail!(
                    "server closed the connection before sending the complete trailer (got {n} of {TRAILER_LEN} bytes)"
                );
            }
            trailer = Some(Trailer::decode(&tb).context("decoding the server's trailer")?);
            Ok(())
        })();
        if recv_res.is_err() {
            let _ = first_shut.compare_exchange(0, 2, Ordering::SeqCst, Ordering::SeqCst);
            let _ = sock.shutdown(Shutdown::Both);
        }
        let out = sender
            .join()
            .map_err(|_| anyhow!("{C2S} sender thread panicked"))?;
        if let Err(e) = recv_res {
            fails.add(Some("s2c"), Some(verifier.received()), format!("{e:#}"));
        } else if out.err.is_none() && trailer.is_some() {
            prog.phase.store(phase::CLOSE, Ordering::Relaxed);
            match drain_to_eof(&io, &mut reader) {
                Ok(n) => extra_after_trailer = n,
                Err(e) => fails.add(None, None, format!("after the trailer: {e:#}")),
            }
        }
        Ok(out)
    })?;

    // Evaluate.
    rep.sent = send_out.sent;
    rep.sha256_sent = hex(&send_out.sha);
    rep.received = verifier.received();
    let mismatch = verifier.mismatch();
    rep.sha256_received = hex(&verifier.finish());

    if let Some(m) = mismatch {
        fails.add(Some("s2c"), Some(m.offset), mismatch_msg(S2C, m));
    }
    if rep.received < cfg.s2c_len && !fails.0.iter().any(|f| f.direction == Some("s2c")) {
        fails.add(
            Some("s2c"),
            Some(rep.received),
            format!(
                "{S2C} short read: connection closed by the server after {} of {} bytes",
                rep.received, cfg.s2c_len
            ),
        );
    }
    if let Some(e) = send_out.err {
        fails.add(Some("c2s"), Some(send_out.sent), format!("{e:#}"));
        if first_shut.load(Ordering::SeqCst) == 1 {
            // Our sender failed first and shut the socket down: that is the root cause.
            fails.0.rotate_right(1);
        }
    }
    if let Some(t) = trailer {
        rep.peer_sha256_received = Some(hex(&t.sha256));
        rep.peer_status = Some(t.status.name());
        match t.status {
            Status::Ok => {
                if t.sha256 != send_out.sha {
                    fails.add(
                        Some("c2s"),
                        None,
                        format!(
                            "{C2S} sha256 mismatch: client sent {}, server received {}",
                            rep.sha256_sent,
                            hex(&t.sha256)
                        ),
                    );
                }
            }
            Status::Mismatch => fails.add(
                Some("c2s"),
                Some(t.offset),
                format!(
                    "{C2S} stream mismatch at byte offset {} (detected by the server)",
                    t.offset
                ),
            ),
            Status::Short => fails.add(
                Some("c2s"),
                Some(t.offset),
                format!(
                    "{C2S} short read at the server: it received only {} of {} bytes",
                    t.offset, cfg.c2s_len
                ),
            ),
        }
        if extra_after_trailer > 0 {
            fails.add(
                Some("s2c"),
                Some(cfg.s2c_len),
                format!("server sent {extra_after_trailer} unexpected bytes after the trailer"),
            );
        }
    }
    Ok(())
}

pub struct ServerCfg {
    pub read_mode: ReadMode,
    pub delay_read: Option<Duration>,
    pub hold_file: Option<PathBuf>,
    /// Test hook: flip the s2c byte at this offset...
    pub corrupt_reply_at: Option<u64>,
    /// ...only on the connection whose header carries this seed (None = all).
    pub corrupt_seed: Option<u64>,
}

/// Serve one accepted connection.
pub fn server_conn(idx: usize, sock: TcpStream, cfg: &ServerCfg, prog: &Progress) -> ConnReport {
    let start = Instant::now();
    let mut rep = ConnReport {
        conn: idx,
        ..Default::default()
    };
    let mut fails = Failures::default();
    if let Err(e) = server_inner(sock, cfg, prog, &mut rep, &mut fails) {
        fails.add(None, None, format!("{e:#}"));
    }
    rep.eagain = prog.eagain.load(Ordering::Relaxed);
    rep.seconds = start.elapsed().as_secs_f64();
    let prefix = if prog.header.load(Ordering::Relaxed) {
        format!("server conn {idx} (seed {})", rep.seed)
    } else {
        format!("server conn {idx}")
    };
    fails.apply(&mut rep, &prefix);
    prog.phase.store(phase::DONE, Ordering::Relaxed);
    rep
}

fn server_inner(
    sock: TcpStream,
    cfg: &ServerCfg,
    prog: &Progress,
    rep: &mut ConnReport,
    fails: &mut Failures,
) -> Result<()> {
    sock.set_nonblocking(false).context("clearing O_NONBLOCK")?;
    prog.phase.store(phase::WAIT, Ordering::Relaxed);
    if let Some(d) = cfg.delay_read {
        thread::sleep(d);
    }
    if let Some(p) = &cfg.hold_file {
        wait_for_file(p);
    }
    let mut reader = match cfg.read_mode {
        ReadMode::Splice => Reader::splice()?,
        ReadMode::Recv | ReadMode::ReadAfterFile => Reader::plain(),
    };
    let io = Io {
        sock: &sock,
        eagain: &prog.eagain,
    };
    prog.phase.store(phase::HEADER, Ordering::Relaxed);
    let mut hb = [0u8; HEADER_LEN];
    let n = io
        .read_full(&mut reader, &mut hb)
        .context("reading protocol header")?;
    if n < HEADER_LEN {
        bail!("client closed the connection after {n} of {HEADER_LEN} header bytes");
    }
    let h = Header::decode(&hb).context("invalid protocol header")?;
    rep.seed = h.seed;
    prog.header.store(true, Ordering::Relaxed);
    prog.seed.store(h.seed, Ordering::Relaxed);
    prog.send_total.store(h.s2c_len, Ordering::Relaxed);
    prog.recv_total.store(h.c2s_len, Ordering::Relaxed);
    let corrupt = match cfg.corrupt_seed {
        Some(s) if s != h.seed => None,
        _ => cfg.corrupt_reply_at,
    };
    let sock2 = sock
        .try_clone()
        .context("dup() of the socket for the sender thread")?;
    prog.phase.store(phase::TRANSFER, Ordering::Relaxed);

    let mut verifier = Verifier::new(Stream::c2s(h.seed), RECV_BUF as usize);
    // Which thread shut the socket down first after an error (1 sender, 2 receiver).
    let first_shut = AtomicU8::new(0);
    let (send_out, recv_res) = thread::scope(|s| -> Result<(SendOutcome, Result<bool>)> {
        let sender = thread::Builder::new()
            .name("s2c-send".into())
            .spawn_scoped(s, || {
                let io2 = Io {
                    sock: &sock2,
                    eagain: &prog.eagain,
                };
                let spec = SendSpec {
                    stream: Stream::s2c(h.seed),
                    len: h.s2c_len,
                    max_write: h.max_write,
                    sizes: SizeGen::new(h.seed, DIR_S2C, h.max_write),
                    corrupt_at: corrupt,
                };
                let out = send_stream(io2, spec, &prog.sent, S2C);
                if out.err.is_none() {
                    prog.send_done.store(true, Ordering::Relaxed);
                } else {
                    let _ = first_shut.compare_exchange(0, 1, Ordering::SeqCst, Ordering::SeqCst);
                    let _ = sock2.shutdown(Shutdown::Both);
                }
                out
            })
            .context("spawning sender thread")?;
        let recv_res = recv_stream(
            &io,
            &mut reader,
            &mut verifier,
            h.c2s_len,
            &prog.received,
            C2S,
        );
        if recv_res.is_err() {
            let _ = first_shut.compare_exchange(0, 2, Ordering::SeqCst, Ordering::SeqCst);
            let _ = sock.shutdown(Shutdown::Both);
        }
        let out = sender
            .join()
            .map_err(|_| anyhow!("{S2C} sender thread panicked"))?;
        Ok((out, recv_res))
    })?;

    rep.sent = send_out.sent;
    rep.sha256_sent = hex(&send_out.sha);
    rep.received = verifier.received();
    let mismatch = verifier.mismatch();
    let recv_sha = verifier.finish();
    rep.sha256_received = hex(&recv_sha);

    if let Some(m) = mismatch {
        fails.add(Some("c2s"), Some(m.offset), mismatch_msg(C2S, m));
    }
    let complete = match recv_res {
        Ok(c) => Some(c),
        Err(e) => {
            fails.add(Some("c2s"), Some(rep.received), format!("{e:#}"));
            None
        }
    };
    if complete == Some(false) {
        fails.add(
            Some("c2s"),
            Some(rep.received),
            format!(
                "{C2S} short read: connection closed by the client after {} of {} bytes",
                rep.received, h.c2s_len
            ),
        );
    }
    let send_failed = send_out.err.is_some();
    if let Some(e) = send_out.err {
        fails.add(Some("s2c"), Some(send_out.sent), format!("{e:#}"));
        if first_shut.load(Ordering::SeqCst) == 1 {
            // Our sender failed first and shut the socket down: that is the root cause.
            fails.0.rotate_right(1);
        }
    }
    // After an I/O error, or without a complete s2c stream (a trailer would be
    // misparsed as stream data), just close.
    let Some(complete) = complete else {
        return Ok(());
    };
    if send_failed {
        let _ = sock.shutdown(Shutdown::Both);
        return Ok(());
    }
    let (status, offset) = match mismatch {
        Some(m) => (Status::Mismatch, m.offset),
        None if rep.received < h.c2s_len => (Status::Short, rep.received),
        None => (Status::Ok, 0),
    };
    prog.phase.store(phase::TRAILER, Ordering::Relaxed);
    let t = Trailer {
        status,
        offset,
        sha256: recv_sha,
    };
    if let Err(e) = io.write_all(&t.encode()) {
        fails.add(None, None, format!("writing the trailer: {e}"));
        return Ok(());
    }
    prog.phase.store(phase::CLOSE, Ordering::Relaxed);
    if complete {
        let extra = drain_to_eof(&io, &mut reader)?;
        if extra > 0 {
            fails.add(
                Some("c2s"),
                Some(h.c2s_len),
                format!(
                    "client sent {extra} unexpected bytes after the {} byte c2s stream",
                    h.c2s_len
                ),
            );
        }
    } else {
        let _ = sock.shutdown(Shutdown::Both);
    }
    Ok(())
}
