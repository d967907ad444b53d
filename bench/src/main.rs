//! bypass-bench: bypassd against the kernel TCP path, side by side in one run.
//!
//! `cargo run --release -p bypass-bench -- [--short] [--out DIR]` writes results.json,
//! results.md, latency.png and bandwidth.png. Needs root, qperf and bpftool
//! (bench/deps.sh), and target/release/bypassd (or BYPASSD_BIN).
mod bench;
mod fixtures;
mod helpers;
mod mesh;
mod plot;
mod real;
mod report;

use clap::{Parser, Subcommand};
use std::{path::PathBuf, process::ExitCode};

impl Cli {
    pub fn out_dir(&self) -> PathBuf {
        self.out.clone().unwrap_or_else(|| {
            let dir = if self.short { "../target/bench-short" } else { "results" };
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(dir)
        })
    }
}

#[derive(Parser, Debug)]
#[command(name = "bypass-bench", version, about = "bypassd vs. the kernel TCP path, side by side (needs root)")]
pub struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// CI mode: one repetition of 1 s per point (about 3 minutes in all).
    #[arg(long)]
    pub short: bool,
    /// Where results.{json,md} and the plots go [default: bench/results; with
    /// --short: target/bench-short, so CI never overwrites the published results].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Repetitions per point (default: 5, short: 1).
    #[arg(long)]
    pub reps: Option<usize>,
    /// Seconds per qperf run (whole seconds; default: 2, short: 1).
    #[arg(long)]
    pub secs: Option<u32>,
    /// Repetitions of the unaccelerated-traffic section (default: 11, short: 1).
    #[arg(long)]
    pub unaccel_reps: Option<usize>,
    /// CPU (0-based) that pinned runs put client and server on.
    #[arg(long, default_value_t = 1)]
    pub cpu: usize,
    /// Run only these sections (qperf, unix, churn, unaccelerated, daemon, real).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Message sizes (default: 1 to 16K in ×4 steps).
    #[arg(long, value_delimiter = ',')]
    pub sizes: Vec<u32>,
    /// Measure nothing: re-render results.md and the plots from a results.json (into
    /// --out, default: the JSON's directory), judging the targets again.
    #[arg(long, value_name = "RESULTS_JSON")]
    pub render: Option<PathBuf>,
    /// Only these qperf tests (tcp_lat, tcp_lat_pinned, tcp_bw).
    #[arg(long, value_delimiter = ',')]
    pub tests: Vec<String>,
    /// Only these topologies for qperf (loopback, veth).
    #[arg(long, value_delimiter = ',')]
    pub topologies: Vec<String>,
    /// bypassd's `[datapath] send_mode` for the run (all, auto, none) [default: the
    /// shipped default].
    #[arg(long, value_parser = ["all", "auto", "none"])]
    pub send_mode: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Internal: processes the benchmark runs inside its cgroups.
    #[command(hide = true, subcommand)]
    Helper(helpers::Helper),
    /// Service-mesh topology only: wrk -> Envoy -> Envoy -> nginx and a bulk stream,
    /// with and without bypassd (writes mesh.json, mesh.md into the output directory).
    Mesh,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Cmd::Helper(h)) = cli.cmd {
        return match helpers::run(h) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bypass-bench helper: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        let r = unsafe { signal_hook::low_level::register(sig, || fixtures::STOP.store(true, std::sync::atomic::Ordering::Relaxed)) };
        if let Err(e) = r {
            eprintln!("bypass-bench: cannot install signal handler: {e}");
        }
    }
    if let Some(json) = &cli.render {
        return match bench::render(json, cli.out.as_deref()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bypass-bench: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(m) = &cli.send_mode {
        let _ = bench::env::SEND_MODE.set(m.clone());
    }
    // Measure what a systemd host runs: with tracefs, bypassd's tracepoints attach too.
    bypass_testsupport::ensure_tracefs();
    if let Some(Cmd::Mesh) = cli.cmd {
        return match mesh::run(cli.short, cli.reps, &cli.out_dir()) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) if cli.short => ExitCode::SUCCESS, // short mode: runs, numbers not judged
            Ok(false) => ExitCode::from(2),
            Err(e) => {
                eprintln!("bypass-bench mesh: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    match bench::run(&cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(2),
        Err(e) => {
            eprintln!("bypass-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
