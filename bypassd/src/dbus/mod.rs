//! The D-Bus control interface: `org.bypassd.Manager1` at `/org/bypassd/Bypassd1`,
//! owned as `org.bypassd.Bypassd1` on the system bus (names in `bypassd_api`).
//!
//! * Read methods and properties are open to everyone (the bus policy says so too).
//! * Write methods check the caller's uid with the bus
//!   (`org.freedesktop.DBus.GetConnectionUnixUser` of the message's sender) and
//!   refuse anyone but root with `org.bypassd.Error.AccessDenied`, logged with the
//!   uid, before touching anything. The bus policy file refuses them first; this
//!   check is the second line, for a mistaken or missing policy file.
//! * `PropertiesChanged` is emitted after every write method and, for changes that
//!   do not come over D-Bus (SIGHUP reload, pins removed behind our back), by a
//!   once-a-second comparison in the supervisor thread. Counters change per packet
//!   and are never signalled.
//!
//! **The bus is optional.** Acceleration matters more than control: when the system
//! bus cannot be reached (or the name cannot be owned) at start, bypassd logs a
//! warning, keeps running the datapath, says so in its systemd status line
//! ([`Control::set_bus_unavailable`]) and keeps retrying in the background (1 s doubling to 30 s).
//! A bus that goes away later (dbus restarted) is reconnected the same way.
mod methods;
mod props;

use crate::control::Control;
use bypassd_api as api;
use props::Announcer;
use std::{
    sync::{Arc, mpsc},
    thread::JoinHandle,
    time::Duration,
};
use zbus::names::BusName;

/// How often the supervisor looks for property changes made outside D-Bus and for a
/// lost bus connection.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// Replies from the bus (the uid look-up) that take longer than this fail the call.
const METHOD_TIMEOUT: Duration = Duration::from_secs(10);

/// Keeps the control interface alive: a supervisor thread owns the bus connection,
/// reconnects it when it is lost and announces property changes. Dropping the
/// server stops the thread, which drops the connection and so releases the name.
pub struct Server {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            // The thread wakes at once on the closed channel; never hang shutdown on it.
            let deadline = std::time::Instant::now() + Duration::from_secs(2);
            while !t.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

/// Own the name and serve the interface. Never fails because of the bus: when it is
/// unreachable (or does not answer within [`FIRST_CONNECT_WAIT`]), bypassd goes on
/// and the returned server keeps trying in the background.
pub fn serve(control: Control) -> anyhow::Result<Server> {
    let (stop_tx, stop_rx) = mpsc::channel();
    let (first_tx, first_rx) = mpsc::sync_channel(1);
    let thread =
        std::thread::Builder::new().name("bypassd-dbus".into()).spawn({
        let control = control.clone();
        move || supervise(control, stop_rx, first_tx)
    })?;
    let why = match first_rx.recv_timeout(FIRST_CONNECT_WAIT) {
        Ok(Ok(())) => {
            tracing::info!("D-Bus control interface {} on the system bus as {}", api::INTERFACE, api::BUS_NAME);
            None
        }
        Ok(Err(why)) => Some(why),
        Err(_) => {
            let why = format!("the system bus did not answer within {} s", FIRST_CONNECT_WAIT.as_secs());
            control.set_bus_unavailable(Some(why.clone()));
            Some(why)
        }
    };
    if let Some(why) = why {
        tracing::warn!(
            "D-Bus control interface unavailable ({why}); the datapath runs anyway, but bypassctl cannot reach \
             bypassd until the system bus is back. Retrying in the background."
        );
    }
    Ok(Server { stop: Some(stop_tx), thread: Some(thread) })
}

/// How long start-up waits for the bus before it goes on without it.
const FIRST_CONNECT_WAIT: Duration = Duration::from_secs(5);

fn connect(control: &Control, announcer: &Arc<Announcer>) -> zbus::Result<zbus::blocking::Connection> {
    let manager = methods::Manager::new(control.clone(), announcer.clone());
    let conn = zbus::blocking::connection::Builder::system()?
        .method_timeout(METHOD_TIMEOUT)
        .serve_at(api::OBJECT_PATH, manager)?
        .name(api::BUS_NAME)?
        .build()?;
    // Changes are announced relative to what a client could read at connect time.
    announcer.reset(control);
    Ok(conn)
}

/// The supervisor thread: connect (reporting the first outcome to `serve`), watch for
/// property changes and a lost connection, reconnect with backoff.
fn supervise(control: Control, stop: mpsc::Receiver<()>, first: mpsc::SyncSender<Result<(), String>>) {
    let announcer = Arc::new(Announcer::default());
    let mut first = Some(first);
    let mut conn: Option<zbus::blocking::Connection> = None;
    let mut backoff = Duration::from_secs(1);
    let mut last_error: Option<String> = None;
    loop {
        let wait = match &conn {
            None => match connect(&control, &announcer) {
                Ok(c) => {
                    control.set_bus_unavailable(None);
                    // `serve` logs the first success, unless it stopped waiting.
                    let told = first.take().is_some_and(|f| f.try_send(Ok(())).is_ok());
                    if !told {
                        tracing::info!("D-Bus control interface available again as {}", api::BUS_NAME);
                    }
                    conn = Some(c);
                    last_error = None;
                    backoff = Duration::from_secs(1);
                    WATCH_INTERVAL
                }
                Err(e) => {
                    let why = e.to_string();
                    control.set_bus_unavailable(Some(why.clone()));
                    let told = first.take().is_some_and(|f| f.try_send(Err(why.clone())).is_ok());
                    // `serve` logs the first failure; later ones are logged when they change.
                    if !told && last_error.as_deref() != Some(why.as_str()) {
                        tracing::warn!("D-Bus control interface still unavailable: {why}; retrying");
                    } else if !told {
                        tracing::debug!("D-Bus control interface still unavailable: {why}");
                    }
                    last_error = Some(why);
                    let wait = backoff;
                    backoff = (backoff * 2).min(RETRY_MAX);
                    wait
                }
            },
            Some(c) if c.is_closed() => {
                let why = "the connection to the system bus was closed".to_string();
                tracing::warn!("D-Bus control interface lost ({why}); the datapath keeps running. Reconnecting.");
                control.set_bus_unavailable(Some(why.clone()));
                last_error = Some(why);
                conn = None;
                backoff = Duration::from_secs(1);
                // Reconnect after a pause: the bus is probably restarting.
                WATCH_INTERVAL
            }
            Some(c) => {
                if let Some(changed) = announcer.changes(&control)
                    && let Err(e) = c.emit_signal(
                        None::<BusName<'_>>,
                        api::OBJECT_PATH,
                        "org.freedesktop.DBus.Properties",
                        "PropertiesChanged",
                        &(api::INTERFACE, changed, Vec::<&str>::new()),
                    )
                {
                    tracing::debug!("emitting PropertiesChanged: {e}");
                }
                WATCH_INTERVAL
            }
        };
        match stop.recv_timeout(wait) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // Server dropped: bypassd is stopping.
            _ => return,
        }
    }
}
