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

mod client;
mod server;
pub use client::{ClientCfg, client_conn};
pub use server::{ServerCfg, server_conn};

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
