//! The one JSON report line a run prints, and the watchdog that prints it when a run hangs.
use super::*;

/// The single JSON line printed on stdout.
#[derive(Serialize, Default)]
pub(crate) struct RunReport {
    pub(crate) ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
    pub(crate) mode: &'static str,
    pub(crate) conns: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) seed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) port: Option<u16>,
    pub(crate) bytes_sent: u64,
    pub(crate) bytes_received: u64,
    pub(crate) eagain: u64,
    pub(crate) seconds: f64,
    pub(crate) mib_per_sec: f64,
    sha256_sent: String,
    sha256_received: String,
    pub(crate) failed: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) failed_conn: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) direction: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) offset: Option<u64>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(crate) timed_out: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) server_ok: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) server_conns: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) per_conn: Option<Vec<ConnReport>>,
}

impl RunReport {
    pub(crate) fn from_conns(mode: &'static str, reps: &[ConnReport], seconds: f64) -> RunReport {
        let mut r = RunReport {
            mode,
            conns: reps.len(),
            seconds,
            ..Default::default()
        };
        for c in reps {
            r.bytes_sent += c.sent;
            r.bytes_received += c.received;
            r.eagain += c.eagain;
        }
        if seconds > 0.0 {
            r.mib_per_sec =
                (r.bytes_sent + r.bytes_received) as f64 / (1u64 << 20) as f64 / seconds;
        }
        if let Some(c0) = reps.first() {
            r.sha256_sent = c0.sha256_sent.clone();
            r.sha256_received = c0.sha256_received.clone();
        }
        let failed: Vec<&ConnReport> = reps.iter().filter(|c| !c.ok).collect();
        r.failed = failed.len();
        r.ok = failed.is_empty();
        if let Some(f) = failed.iter().min_by_key(|c| c.conn) {
            let mut e = f
                .error
                .clone()
                .unwrap_or_else(|| format!("conn {} failed", f.conn));
            if failed.len() > 1 {
                e.push_str(&format!(
                    " [{} of {} connections failed]",
                    failed.len(),
                    reps.len()
                ));
            }
            r.error = Some(e);
            r.failed_conn = Some(f.conn);
            r.direction = f.direction;
            r.offset = f.offset;
        }
        if reps.len() <= PER_CONN_MAX {
            r.per_conn = Some(reps.to_vec());
        }
        r
    }

    pub(crate) fn failure(mode: &'static str, error: String) -> RunReport {
        RunReport {
            mode,
            error: Some(error),
            ..Default::default()
        }
    }
}

/// 0 = running, 1 = finished normally, 2 = timed out.
pub(crate) static RUN_STATE: AtomicU8 = AtomicU8::new(0);

pub(crate) fn print_json<T: Serialize>(r: &T) {
    use std::io::Write as _;
    let line = serde_json::to_string(r)
        .unwrap_or_else(|e| format!("{{\"ok\":false,\"error\":\"serializing report: {e}\"}}"));
    let mut out = std::io::stdout().lock();
    // A closed stdout must not turn into a panic; the exit code still tells.
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

/// Print the final JSON line (unless the watchdog already printed one) and map `ok` to
/// the exit code.
pub(crate) fn finish_with<T: Serialize>(r: &T, ok: bool) -> ExitCode {
    if RUN_STATE
        .compare_exchange(0, 1, Ordering::SeqCst, Ordering::SeqCst)
        .is_err()
    {
        // The watchdog won the race and is exiting the process.
        loop {
            thread::sleep(Duration::from_secs(1));
        }
    }
    print_json(r);
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

pub(crate) fn finish(r: &RunReport) -> ExitCode {
    finish_with(r, r.ok)
}

/// After `secs` seconds print a failure report built by `describe` and exit(1).
pub(crate) fn start_watchdog(secs: u64, describe: impl FnOnce() -> RunReport + Send + 'static) {
    if secs == 0 {
        return;
    }
    let spawned = thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || {
            thread::sleep(Duration::from_secs(secs));
            if RUN_STATE
                .compare_exchange(0, 2, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                let mut r = describe();
                r.timed_out = true;
                print_json(&r);
                std::process::exit(1);
            }
        });
    if let Err(e) = spawned {
        eprintln!("bypass-traffic: warning: cannot start the timeout watchdog: {e}");
    }
}

/// Timeout report: which connections are unfinished and how far they got.
pub(crate) fn stall_report(
    mode: &'static str,
    secs: u64,
    progs: &[(String, Arc<Progress>, bool)],
) -> RunReport {
    let stuck: Vec<String> = progs
        .iter()
        .filter(|(_, p, _)| !p.is_done())
        .map(|(name, p, client)| format!("{name}: {}", p.describe(*client)))
        .collect();
    let total = stuck.len();
    let mut s =
        format!("timeout: run exceeded --timeout-secs {secs}; {total} connection(s) unfinished");
    for line in stuck.iter().take(PER_CONN_MAX) {
        s.push_str("; ");
        s.push_str(line);
    }
    if total > PER_CONN_MAX {
        s.push_str(&format!("; ... and {} more", total - PER_CONN_MAX));
    }
    let mut r = RunReport::failure(mode, s);
    r.failed = total;
    r.conns = progs.iter().filter(|(_, _, client)| *client).count();
    for (_, p, client) in progs {
        if *client || mode == "serve" {
            r.bytes_sent += p.sent.load(Ordering::Relaxed);
            r.bytes_received += p.received.load(Ordering::Relaxed);
            r.eagain += p.eagain.load(Ordering::Relaxed);
        }
    }
    r
}
