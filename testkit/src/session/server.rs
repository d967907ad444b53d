//! One accepted connection on the server side: echo or reply, check, report.
use super::*;

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
