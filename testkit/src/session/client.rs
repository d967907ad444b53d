//! One client connection: connect, send and receive both ways, check, report.
use super::*;

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
