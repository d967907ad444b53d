//! sd_notify messages to systemd (READY, RELOADING, STATUS, WATCHDOG, STOPPING).
use sd_notify::NotifyState;

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::debug!("sd_notify: {e}");
    }
}

/// RELOADING=1 with the MONOTONIC_USEC that `Type=notify-reload` requires.
pub fn reloading() {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap_or(nix::sys::time::TimeSpec::new(0, 0));
    let usec = ts.tv_sec() as i128 * 1_000_000 + ts.tv_nsec() as i128 / 1000;
    send(&[NotifyState::Reloading, NotifyState::MonotonicUsec(usec)]);
}

/// READY=1 with the status line (start-up done, or a reload finished).
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// The periodic status line, with a watchdog ping when systemd asked for one.
pub fn status(status: &str, watchdog: bool) {
    let mut st = vec![NotifyState::Status(status)];
    if watchdog {
        st.push(NotifyState::Watchdog);
    }
    send(&st);
}

pub fn stopping() {
    send(&[NotifyState::Stopping]);
}
