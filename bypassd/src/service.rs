//! The composition root and systemd-facing main loop: build the daemon, hand the
//! control interface its [`Control`] handle, then serve SIGHUP (reload), SIGTERM
//! and SIGINT (stop) and the periodic tick (STATUS, WATCHDOG, cgroup re-check).
use crate::{control::Control, daemon::Daemon, notify, startup};
use anyhow::{Context, Result};
use std::{path::Path, sync::mpsc, time::Duration};

/// How often rules' cgroups are re-resolved (and the status line refreshed).
/// cgroupfs inotify does not report every creation and removal, and systemd
/// re-creates a unit's cgroup on each restart: a stat per cgroup rule each second
/// is cheap and catches every case.
const TICK: Duration = Duration::from_secs(1);

enum Event {
    Reload,
    Stop,
}

/// Run the daemon until SIGTERM/SIGINT.
pub fn run(config_path: &Path, log: crate::logging::Handle) -> Result<()> {
    let (tx, rx) = mpsc::channel();
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGHUP,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .context("installing signal handlers")?;
    std::thread::spawn(move || {
        for s in signals.forever() {
            let ev = if s == signal_hook::consts::SIGHUP { Event::Reload } else { Event::Stop };
            if tx.send(ev).is_err() {
                break;
            }
        }
    });

    let daemon = Daemon::start(config_path, log)?;
    let metrics_cfg = daemon.metrics_config();
    let control = Control::new(daemon);
    let _bus = crate::dbus::serve(control.clone()).context("serving the D-Bus interface")?;
    startup::step("D-Bus name");
    let watched = control.clone();
    if let Err(e) = crate::datapath::link::watch::spawn(move |evs| watched.link_events(evs)) {
        tracing::warn!("link datapath: no netlink events ({e:#}); interfaces are re-checked every tick");
    }
    startup::step("netlink watch");
    let _metrics = crate::metrics::serve(control.clone(), &metrics_cfg);
    startup::step("metrics listener");

    let status = control.summary();
    notify::ready(&status);
    startup::step("status + READY=1");
    tracing::info!("bypassd ready: {status}");
    if let Some(t) = startup::report() {
        tracing::info!("start-up time to READY (from main): {t}");
    }

    let mut watchdog_usec = 0u64;
    let wd = sd_notify::watchdog_enabled(false, &mut watchdog_usec);
    let tick = if wd { Duration::from_micros(watchdog_usec / 2).clamp(Duration::from_millis(100), TICK) } else { TICK };
    loop {
        match rx.recv_timeout(tick) {
            Ok(Event::Reload) => {
                // Control::reload logs a failure itself.
                let _ = control.reload();
            }
            Ok(Event::Stop) => {
                notify::stopping();
                tracing::info!("stopping; the datapath stays pinned and keeps accelerating");
                return Ok(());
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
        }
        control.tick();
        notify::status(&control.summary(), wd);
    }
}
