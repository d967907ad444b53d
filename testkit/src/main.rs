//! bypass-traffic: traffic generator and byte-exact verifier for bypassd's tests and
//! benchmarks. See `bypass-traffic --help` and the module docs for the protocol.

mod net;
mod proto;
mod report;
mod rr;
mod session;
mod stream;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use net::{parse_size, parse_u64};
use report::*;
use session::{ClientCfg, ConnReport, Progress, ReadMode, SentSignal, ServerCfg};

/// Largest connection count for which "per_conn" is included in the output.
const PER_CONN_MAX: usize = 16;

#[derive(Parser)]
#[command(
    name = "bypass-traffic",
    version,
    about = "Traffic generator and byte-exact verifier for bypassd tests (loopback/netns only)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Accept connections and verify/serve the protocol.
    Serve(ServeArgs),
    /// Connect to a `serve` instance and run the protocol.
    Send(SendArgs),
    /// Server on IP:0 and client in this one process.
    Pair(PairArgs),
    /// Request/response latency loop against `rr-serve`.
    Rr(rr::RrArgs),
    /// Echo server for `rr`.
    RrServe(rr::RrServeArgs),
}

#[derive(Args, Clone)]
struct ServerOpts {
    /// How the server reads the incoming stream.
    #[arg(long, value_enum, default_value_t = ReadMode::Recv)]
    read_mode: ReadMode,
    /// Do not read anything from a connection until this file exists
    /// (required by --read-mode read-after-file; combinable with other modes).
    #[arg(long)]
    hold_file: Option<PathBuf>,
    /// Test hook: the server flips the s2c byte at this offset.
    #[arg(long, hide = true, value_parser = parse_size)]
    corrupt_reply_at: Option<u64>,
}

impl ServerOpts {
    fn validate(&self) -> Result<()> {
        if self.read_mode == ReadMode::ReadAfterFile && self.hold_file.is_none() {
            bail!("--read-mode read-after-file requires --hold-file PATH");
        }
        Ok(())
    }
}

#[derive(Args)]
struct ServeArgs {
    /// Address to listen on, e.g. 127.0.0.1:0 or [::]:0 ([::] is dual-stack).
    #[arg(long)]
    listen: String,
    /// Connections to handle before exiting (0 = forever).
    #[arg(long, default_value_t = 1)]
    count: u64,
    /// Sleep this long before the first read of each connection.
    #[arg(long)]
    delay_read_ms: Option<u64>,
    /// Create this file once listening.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Write the bound port number here (atomically) once listening.
    #[arg(long)]
    port_file: Option<PathBuf>,
    /// Fail the whole run after this many seconds (0 = no limit).
    #[arg(long, default_value_t = 0)]
    timeout_secs: u64,
    #[command(flatten)]
    server: ServerOpts,
}

#[derive(Args, Clone)]
struct ClientOpts {
    /// Bytes each connection sends (c2s); suffixes K, M, G allowed (binary).
    #[arg(long, value_parser = parse_size)]
    bytes: u64,
    /// Bytes the server sends back per connection (s2c); default = --bytes.
    #[arg(long, value_parser = parse_size)]
    reply_bytes: Option<u64>,
    /// Concurrent connections.
    #[arg(long, default_value_t = 1)]
    conns: usize,
    /// Base seed (decimal or 0x hex); connection i uses seed+i. Default: random.
    #[arg(long, value_parser = parse_u64)]
    seed: Option<u64>,
    /// Largest single write; write sizes are random in 1..=max-write.
    #[arg(long, default_value = "65536", value_parser = parse_size)]
    max_write: u64,
    /// Non-blocking client sockets with poll(); EAGAINs are counted.
    #[arg(long)]
    nonblocking: bool,
    /// Client sleeps this long before its first read.
    #[arg(long)]
    delay_read_ms: Option<u64>,
    /// Fail the whole run after this many seconds (0 = no limit).
    #[arg(long, default_value_t = 300)]
    timeout_secs: u64,
    /// Create this file once every connection has written all of its c2s stream.
    #[arg(long)]
    sent_file: Option<PathBuf>,
    /// Connect from this local port (only with --conns 1): for tests that need an exact 4-tuple.
    #[arg(long)]
    source_port: Option<u16>,
    /// Connect from this local address (e.g. 127.0.0.6, as a mesh sidecar's inbound hop does).
    #[arg(long)]
    source: Option<std::net::IpAddr>,
    /// Test hook: flip the c2s byte at this offset on connection 0.
    #[arg(long, hide = true, value_parser = parse_size)]
    corrupt_at: Option<u64>,
}

#[derive(Args)]
struct SendArgs {
    /// Server address, e.g. 127.0.0.1:4000 or [::1]:4000.
    #[arg(long)]
    connect: String,
    #[command(flatten)]
    client: ClientOpts,
}

#[derive(Args)]
struct PairArgs {
    /// IP for the in-process server (it listens on IP:0), e.g. 127.0.0.1 or ::1.
    #[arg(long)]
    bind: String,
    #[command(flatten)]
    client: ClientOpts,
    #[command(flatten)]
    server: ServerOpts,
    /// Server sleeps this long before the first read of each connection.
    #[arg(long)]
    server_delay_read_ms: Option<u64>,
}

fn random_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    stream::mix64(nanos ^ (u64::from(std::process::id()) << 32))
}

fn ms(v: Option<u64>) -> Option<Duration> {
    v.filter(|&m| m > 0).map(Duration::from_millis)
}

fn client_progress(opts: &ClientOpts, seed: u64) -> Vec<Arc<Progress>> {
    let reply = opts.reply_bytes.unwrap_or(opts.bytes);
    (0..opts.conns)
        .map(|i| {
            Arc::new(Progress::new(
                seed.wrapping_add(i as u64),
                opts.bytes,
                reply,
            ))
        })
        .collect()
}

fn check_client_opts(opts: &ClientOpts) -> Result<u32> {
    if opts.conns == 0 {
        bail!("--conns must be at least 1");
    }
    let mw = u32::try_from(opts.max_write).unwrap_or(u32::MAX);
    net::ensure_max_write(mw)?;
    Ok(mw)
}

/// Run all client connections concurrently; returns one report per connection.
fn run_clients(
    addr: SocketAddr,
    opts: &ClientOpts,
    max_write: u32,
    seed: u64,
    progs: &[Arc<Progress>],
) -> Vec<ConnReport> {
    let cfg = ClientCfg {
        addr,
        c2s_len: opts.bytes,
        s2c_len: opts.reply_bytes.unwrap_or(opts.bytes),
        max_write,
        nonblocking: opts.nonblocking,
        delay_read: ms(opts.delay_read_ms),
        source_port: opts.source_port,
        source: opts.source,
    };
    let sig = SentSignal::new(opts.conns, opts.sent_file.clone());
    thread::scope(|s| {
        let handles: Vec<_> = progs
            .iter()
            .enumerate()
            .map(|(i, prog)| {
                let conn_seed = seed.wrapping_add(i as u64);
                let corrupt = if i == 0 { opts.corrupt_at } else { None };
                let (cfg, sig) = (&cfg, &sig);
                let h = thread::Builder::new()
                    .name(format!("conn-{i}"))
                    .spawn_scoped(s, move || {
                        session::client_conn(i, conn_seed, cfg, corrupt, prog, sig)
                    });
                (i, conn_seed, h)
            })
            .collect();
        handles
            .into_iter()
            .map(|(i, conn_seed, h)| {
                let err = match h {
                    Ok(h) => match h.join() {
                        Ok(rep) => return rep,
                        Err(_) => format!("conn {i}: connection thread panicked"),
                    },
                    Err(e) => format!("conn {i}: cannot spawn connection thread: {e}"),
                };
                progs[i]
                    .phase
                    .store(session::phase::DONE, Ordering::Relaxed);
                ConnReport {
                    conn: i,
                    seed: conn_seed,
                    error: Some(err),
                    ..Default::default()
                }
            })
            .collect()
    })
}

/// Accept index and live counters of each server connection (finished ones are pruned
/// in forever mode).
type ServerProgress = Arc<Mutex<Vec<(usize, Arc<Progress>)>>>;

/// Accept up to `count` connections (None = forever) and serve each on its own thread.
/// Stops accepting when `stop` is set. Returns the reports of all served connections.
fn serve_loop(
    listener: TcpListener,
    count: Option<u64>,
    stop: &AtomicBool,
    cfg: Arc<ServerCfg>,
    progs: ServerProgress,
    first_accept: &Mutex<Option<Instant>>,
) -> Result<Vec<ConnReport>> {
    listener
        .set_nonblocking(true)
        .context("setting the listener non-blocking")?;
    let mut handles: Vec<(usize, thread::JoinHandle<ConnReport>)> = Vec::new();
    let mut reports = Vec::new();
    let mut accepted: u64 = 0;
    while count.is_none_or(|c| accepted < c) && !stop.load(Ordering::Relaxed) {
        let sock: TcpStream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                net::wait_fd(listener.as_raw_fd(), libc::POLLIN, 100).context("poll(listener)")?;
                continue;
            }
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(
                        libc::EINTR
                            | libc::ECONNABORTED
                            | libc::EPROTO
                            | libc::EMFILE
                            | libc::ENFILE
                            | libc::ENOBUFS
                            | libc::ENOMEM
                    )
                ) =>
            {
                eprintln!("bypass-traffic: accept: {e} (retrying)");
                thread::sleep(Duration::from_millis(10));
                continue;
            }
            Err(e) => return Err(e).context("accept()"),
        };
        let idx = accepted as usize;
        accepted += 1;
        if let Ok(mut f) = first_accept.lock() {
            f.get_or_insert_with(Instant::now);
        }
        let prog = Arc::new(Progress::default());
        if let Ok(mut p) = progs.lock() {
            if count.is_none() && p.len() >= 1024 {
                p.retain(|(_, x)| !x.is_done());
            }
            p.push((idx, prog.clone()));
        }
        let cfg2 = cfg.clone();
        let forever = count.is_none();
        let spawned = thread::Builder::new()
            .name(format!("srv-{idx}"))
            .spawn(move || {
                let rep = session::server_conn(idx, sock, &cfg2, &prog);
                if forever && !rep.ok {
                    eprintln!(
                        "bypass-traffic: {}",
                        rep.error.as_deref().unwrap_or("connection failed")
                    );
                }
                rep
            });
        match spawned {
            Ok(h) if !forever => handles.push((idx, h)),
            Ok(_) => {}
            Err(e) => reports.push(ConnReport {
                conn: idx,
                error: Some(format!("server conn {idx}: cannot spawn thread: {e}")),
                ..Default::default()
            }),
        }
    }
    for (idx, h) in handles {
        reports.push(h.join().unwrap_or_else(|_| ConnReport {
            conn: idx,
            error: Some(format!("server conn {idx}: thread panicked")),
            ..Default::default()
        }));
    }
    reports.sort_by_key(|r| r.conn);
    Ok(reports)
}

fn cmd_send(a: SendArgs) -> Result<ExitCode> {
    let mw = check_client_opts(&a.client)?;
    let addr = net::resolve(&a.connect)?;
    let seed = a.client.seed.unwrap_or_else(random_seed);
    let progs = client_progress(&a.client, seed);
    let named: Vec<(String, Arc<Progress>, bool)> = progs
        .iter()
        .enumerate()
        .map(|(i, p)| (format!("conn {i}"), p.clone(), true))
        .collect();
    let (secs, conns) = (a.client.timeout_secs, a.client.conns);
    start_watchdog(secs, move || {
        let mut r = stall_report("send", secs, &named);
        r.conns = conns;
        r.seed = Some(seed);
        r
    });
    let start = Instant::now();
    let reps = run_clients(addr, &a.client, mw, seed, &progs);
    let mut r = RunReport::from_conns("send", &reps, start.elapsed().as_secs_f64());
    r.seed = Some(seed);
    Ok(finish(&r))
}

fn cmd_pair(a: PairArgs) -> Result<ExitCode> {
    let mw = check_client_opts(&a.client)?;
    a.server.validate()?;
    let ip = net::parse_ip(&a.bind)?;
    let listener = net::listen(SocketAddr::new(ip, 0))?;
    let addr = net::connectable(listener.local_addr().context("getsockname")?);
    let seed = a.client.seed.unwrap_or_else(random_seed);
    let conns = a.client.conns;

    let cfg = Arc::new(ServerCfg {
        read_mode: a.server.read_mode,
        delay_read: ms(a.server_delay_read_ms),
        hold_file: a.server.hold_file.clone(),
        corrupt_reply_at: a.server.corrupt_reply_at,
        corrupt_seed: Some(seed),
    });
    let sprogs: ServerProgress = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let server = {
        let (sprogs, stop) = (sprogs.clone(), stop.clone());
        thread::Builder::new()
            .name("server".into())
            .spawn(move || {
                let first = Mutex::new(None);
                serve_loop(listener, Some(conns as u64), &stop, cfg, sprogs, &first)
            })
            .context("spawning the server thread")?
    };

    let progs = client_progress(&a.client, seed);
    {
        let named: Vec<(String, Arc<Progress>, bool)> = progs
            .iter()
            .enumerate()
            .map(|(i, p)| (format!("conn {i}"), p.clone(), true))
            .collect();
        let (secs, sprogs) = (a.client.timeout_secs, sprogs.clone());
        start_watchdog(secs, move || {
            let mut all = named;
            if let Ok(sp) = sprogs.lock() {
                for (i, p) in sp.iter() {
                    let s = p.seed.load(Ordering::Relaxed);
                    let name = if p.header.load(Ordering::Relaxed) {
                        format!("server side of conn {}", s.wrapping_sub(seed))
                    } else {
                        format!("server conn {i} (header not yet received)")
                    };
                    all.push((name, p.clone(), false));
                }
            }
            let mut r = stall_report("pair", secs, &all);
            r.conns = conns;
            r.seed = Some(seed);
            r
        });
    }

    let start = Instant::now();
    let reps = run_clients(addr, &a.client, mw, seed, &progs);
    let seconds = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let server_res = match server.join() {
        Ok(r) => r,
        Err(_) => Err(anyhow::anyhow!("server thread panicked")),
    };

    let mut r = RunReport::from_conns("pair", &reps, seconds);
    r.seed = Some(seed);
    match server_res {
        Ok(sreps) => {
            let sfailed: Vec<&ConnReport> = sreps.iter().filter(|c| !c.ok).collect();
            r.server_ok = Some(sfailed.is_empty() && sreps.len() == conns);
            r.server_conns = Some(sreps.len());
            if r.ok && !sfailed.is_empty() {
                // Client side looked fine but the server saw a problem.
                let f = sfailed[0];
                r.ok = false;
                r.error = f.error.clone();
                r.failed_conn = Some(f.seed.wrapping_sub(seed) as usize);
                r.direction = f.direction;
                r.offset = f.offset;
            } else if !r.ok && !sfailed.is_empty() {
                let extra: Vec<&str> = sfailed
                    .iter()
                    .take(2)
                    .filter_map(|c| c.error.as_deref())
                    .collect();
                if let Some(e) = r.error.as_mut() {
                    e.push_str(&format!(" | server side: {}", extra.join("; ")));
                }
            }
        }
        Err(e) => {
            r.server_ok = Some(false);
            if r.ok {
                r.ok = false;
                r.error = Some(format!("server: {e:#}"));
            }
        }
    }
    Ok(finish(&r))
}

fn cmd_serve(a: ServeArgs) -> Result<ExitCode> {
    a.server.validate()?;
    let addr = net::resolve(&a.listen)?;
    let listener = net::listen(addr)?;
    let port = listener.local_addr().context("getsockname")?.port();
    if let Some(p) = &a.port_file {
        net::write_atomic(p, port.to_string().as_bytes()).context("--port-file")?;
    }
    if let Some(p) = &a.ready_file {
        net::touch(p).context("--ready-file")?;
    }
    let cfg = Arc::new(ServerCfg {
        read_mode: a.server.read_mode,
        delay_read: ms(a.delay_read_ms),
        hold_file: a.server.hold_file.clone(),
        corrupt_reply_at: a.server.corrupt_reply_at,
        corrupt_seed: None,
    });
    let sprogs: ServerProgress = Arc::new(Mutex::new(Vec::new()));
    {
        let (secs, sprogs) = (a.timeout_secs, sprogs.clone());
        start_watchdog(secs, move || {
            let named: Vec<(String, Arc<Progress>, bool)> = match sprogs.lock() {
                Ok(sp) => sp
                    .iter()
                    .map(|(i, p)| (format!("server conn {i}"), p.clone(), false))
                    .collect(),
                Err(_) => Vec::new(),
            };
            let mut r = stall_report("serve", secs, &named);
            r.conns = named.len();
            r.port = Some(port);
            r
        });
    }
    let count = (a.count > 0).then_some(a.count);
    let stop = AtomicBool::new(false);
    let first = Mutex::new(None);
    let reps = serve_loop(listener, count, &stop, cfg, sprogs, &first)?;
    let seconds = first
        .lock()
        .ok()
        .and_then(|f| *f)
        .map(|t| t.elapsed().as_secs_f64())
        .unwrap_or(0.0);
    let mut r = RunReport::from_conns("serve", &reps, seconds);
    r.port = Some(port);
    Ok(finish(&r))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (mode, res) = match cli.cmd {
        Cmd::Serve(a) => ("serve", cmd_serve(a)),
        Cmd::Send(a) => ("send", cmd_send(a)),
        Cmd::Pair(a) => ("pair", cmd_pair(a)),
        Cmd::Rr(a) => ("rr", rr::cmd_rr(a)),
        Cmd::RrServe(a) => ("rr-serve", rr::cmd_rr_serve(a)),
    };
    match res {
        Ok(code) => code,
        Err(e) => finish(&RunReport::failure(mode, format!("{e:#}"))),
    }
}
