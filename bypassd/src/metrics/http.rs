//! A deliberately small HTTP/1.1 server: GET/HEAD of `/metrics` and `/healthz`,
//! one request per connection. Bounded so a slow or hostile client cannot stall
//! the daemon or grow its memory: at most [`MAX_CONNECTIONS`] handler threads
//! (small stacks), connections past that are closed at once, each request must
//! arrive within [`REQUEST_DEADLINE`] and fit in [`MAX_REQUEST`] bytes, and each
//! response must be taken within [`WRITE_TIMEOUT`]. The daemon lock is held only
//! while a snapshot is copied, never while a socket is read or written.
use super::{registry, snapshot::Snapshot};
use crate::control::Control;
use anyhow::{Context, Result};
use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

pub const MAX_CONNECTIONS: usize = 16;
pub const MAX_REQUEST: usize = 8 << 10;
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
const STACK: usize = 128 << 10;

pub struct Server {
    pub addr: SocketAddr,
}

impl Server {
    pub fn start(addr: SocketAddr, daemon: Control) -> Result<Server> {
        let listener = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
        let addr = listener.local_addr().context("local address")?;
        std::thread::Builder::new()
            .name("metrics-accept".into())
            .stack_size(STACK)
            .spawn(move || accept_loop(listener, daemon))
            .context("starting the metrics thread")?;
        Ok(Server { addr })
    }
}

/// Decrements the active count when a handler ends, however it ends.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn accept_loop(listener: TcpListener, daemon: Control) {
    let active = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        let Ok(stream) = conn else {
            // EMFILE and friends: back off instead of spinning.
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::AcqRel);
            drop(stream); // over the cap: close at once, keep nothing
            continue;
        }
        let slot = Slot(active.clone());
        let d = daemon.clone();
        let spawned = std::thread::Builder::new().name("metrics-conn".into()).stack_size(STACK).spawn(move || {
            let _slot = slot;
            handle(stream, &d);
        });
        if let Err(e) = spawned {
            tracing::debug!("metrics: cannot start a handler: {e}");
        }
    }
}

/// Read the request head (up to the blank line) within the deadline and size cap.
fn read_head(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let deadline = Instant::now() + REQUEST_DEADLINE;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && !buf.windows(2).any(|w| w == b"\n\n") {
        let left = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero())?;
        stream.set_read_timeout(Some(left)).ok()?;
        match stream.read(&mut chunk) {
            Ok(0) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return None, // timeout or reset
        }
        if buf.len() > MAX_REQUEST {
            return None;
        }
    }
    Some(buf)
}

fn handle(mut stream: TcpStream, daemon: &Control) {
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let Some(head) = read_head(&mut stream) else { return };
    let line = String::from_utf8_lossy(&head);
    let mut parts = line.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, ctype, body) = if method != "GET" && method != "HEAD" {
        ("405 Method Not Allowed", "text/plain", "read-only: GET /metrics or /healthz\n".to_string())
    } else {
        match path {
            "/metrics" => ("200 OK", registry::CONTENT_TYPE, registry::render(Snapshot::take(daemon))),
            "/healthz" => match Snapshot::take(daemon).health() {
                Ok(s) => ("200 OK", "text/plain", format!("{s}\n")),
                Err(why) => ("503 Service Unavailable", "text/plain", format!("{why}\n")),
            },
            _ => ("404 Not Found", "text/plain", "not found: GET /metrics or /healthz\n".to_string()),
        }
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if method != "HEAD" {
        out.extend_from_slice(body.as_bytes());
    }
    let _ = stream.write_all(&out);
}
