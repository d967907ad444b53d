use anyhow::Context;
use bypassd::{config, datapath, instance, logging, service};
use clap::Parser;
use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

/// Same-host TCP acceleration daemon: loads, pins and attaches bypassd's eBPF
/// socket datapath, and keeps it working across its own restarts.
#[derive(Parser, Debug)]
#[command(name = "bypassd", version, about)]
struct Cli {
    /// Configuration file.
    #[arg(long, value_name = "PATH", default_value = config::DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Validate the configuration file and exit.
    #[arg(long, value_name = "PATH", conflicts_with = "detach")]
    check_config: Option<PathBuf>,
    /// Remove the pinned datapath: new connections stay on the kernel path at once,
    /// accelerated connections finish intact. Uses the pin directory from --config.
    #[arg(long)]
    detach: bool,
}

fn main() -> ExitCode {
    bypassd::startup::begin();
    let cli = Cli::parse();
    if let Some(p) = &cli.check_config {
        return match bypassd::dropins::load(p) {
            Ok(l) => {
                for f in &l.files {
                    println!("{}: OK", f.display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("bypassd: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let log = logging::init(config::LogLevel::Info);
    let result = if cli.detach {
        detach(&cli.config)
    } else {
        run(&cli.config, log)
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("bypassd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Serve under the single-instance lock (a config that does not load is reported by
/// the daemon itself, with its location).
fn run(config_path: &Path, log: logging::Handle) -> anyhow::Result<()> {
    let _lock = match bypassd::dropins::load(config_path) {
        Ok(l) => Some(instance::acquire(&l.config.daemon.state_dir.0)?),
        Err(_) => None,
    };
    bypassd::startup::step("config check + instance lock");
    service::run(config_path, log)
}

fn detach(config_path: &Path) -> anyhow::Result<()> {
    // A missing config falls back to the default directories, so purge still works.
    let (pin_dir, state_dir, links) = match bypassd::dropins::load(config_path) {
        Ok(l) => (l.config.daemon.pin_dir.0, l.config.daemon.state_dir.0, l.config.links.into_iter().map(|s| s.into_inner()).collect()),
        Err(e) if !config_path.exists() => {
            tracing::info!("{e}; using the default pin directory");
            (config::DEFAULT_PIN_DIR.into(), config::DEFAULT_STATE_DIR.into(), Vec::new())
        }
        Err(e) => return Err(e).context("cannot tell which pin directory to detach"),
    };
    // Never while a daemon runs: it may be building a generation right now.
    let _lock = instance::acquire(&state_dir)?;
    let links = datapath::link::retire_all(&pin_dir, &links)?;
    let n = datapath::detach(&pin_dir)?;
    println!("detached {n} datapath generation(s) and {links} link entries from {}", pin_dir.display());
    Ok(())
}
