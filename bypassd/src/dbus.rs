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
//! ([`unavailable`]) and keeps retrying in the background (1 s doubling to 30 s).
//! A bus that goes away later (dbus restarted) is reconnected the same way.
use crate::{
    policy::RuleSpec,
    service::{ControlError, Daemon, RuleSource, Shared, lock},
};
use bypassd_api::{self as api, Error, member};
use sha2::{Digest, Sha256};
use std::{
    collections::HashMap,
    sync::{Arc, Mutex, mpsc},
    thread::JoinHandle,
    time::Duration,
};
use zbus::{interface, message::Header, names::BusName, zvariant::Value};

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

/// Why the control interface is unavailable, when it is (shown in the status line).
static UNAVAILABLE: Mutex<Option<String>> = Mutex::new(None);

/// `Some(reason)` while bypassd has no working connection to the system bus.
pub fn unavailable() -> Option<String> {
    UNAVAILABLE.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

fn set_unavailable(v: Option<String>) {
    *UNAVAILABLE.lock().unwrap_or_else(|p| p.into_inner()) = v;
}

/// Own the name and serve the interface. Never fails because of the bus: when it is
/// unreachable (or does not answer within [`FIRST_CONNECT_WAIT`]), bypassd goes on
/// and the returned server keeps trying in the background.
pub fn serve(daemon: Shared) -> anyhow::Result<Server> {
    let (stop_tx, stop_rx) = mpsc::channel();
    let (first_tx, first_rx) = mpsc::sync_channel(1);
    let thread =
        std::thread::Builder::new().name("bypassd-dbus".into()).spawn(move || supervise(daemon, stop_rx, first_tx))?;
    let why = match first_rx.recv_timeout(FIRST_CONNECT_WAIT) {
        Ok(Ok(())) => {
            tracing::info!("D-Bus control interface {} on the system bus as {}", api::INTERFACE, api::BUS_NAME);
            None
        }
        Ok(Err(why)) => Some(why),
        Err(_) => {
            let why = format!("the system bus did not answer within {} s", FIRST_CONNECT_WAIT.as_secs());
            set_unavailable(Some(why.clone()));
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

fn connect(daemon: &Shared, announcer: &Arc<Announcer>) -> zbus::Result<zbus::blocking::Connection> {
    let manager = Manager { daemon: daemon.clone(), announcer: announcer.clone() };
    let conn = zbus::blocking::connection::Builder::system()?
        .method_timeout(METHOD_TIMEOUT)
        .serve_at(api::OBJECT_PATH, manager)?
        .name(api::BUS_NAME)?
        .build()?;
    // Changes are announced relative to what a client could read at connect time.
    announcer.reset(daemon);
    Ok(conn)
}

/// The supervisor thread: connect (reporting the first outcome to `serve`), watch for
/// property changes and a lost connection, reconnect with backoff.
fn supervise(daemon: Shared, stop: mpsc::Receiver<()>, first: mpsc::SyncSender<Result<(), String>>) {
    let announcer = Arc::new(Announcer::default());
    let mut first = Some(first);
    let mut conn: Option<zbus::blocking::Connection> = None;
    let mut backoff = Duration::from_secs(1);
    let mut last_error: Option<String> = None;
    loop {
        let wait = match &conn {
            None => match connect(&daemon, &announcer) {
                Ok(c) => {
                    set_unavailable(None);
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
                    set_unavailable(Some(why.clone()));
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
                set_unavailable(Some(why.clone()));
                last_error = Some(why);
                conn = None;
                backoff = Duration::from_secs(1);
                // Reconnect after a pause: the bus is probably restarting.
                WATCH_INTERVAL
            }
            Some(c) => {
                if let Some(changed) = announcer.changes(&daemon)
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

/// The properties that emit `PropertiesChanged`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Props {
    state: String,
    state_reason: String,
    paused: bool,
    cgroup: String,
    pin_dir: String,
    config_path: String,
    config_sha256: String,
    capacity: u32,
    default_action: String,
    policy_sha256: String,
}

impl Props {
    fn read(d: &Daemon) -> Props {
        let s = d.status();
        Props {
            state: s.state,
            state_reason: s.reason,
            paused: s.paused,
            cgroup: s.cgroup,
            pin_dir: s.pin_dir,
            config_path: s.config_path,
            config_sha256: s.config_sha256,
            capacity: s.capacity,
            default_action: d.policy_default().as_str().to_string(),
            policy_sha256: policy_sha256(d),
        }
    }

    fn diff(&self, new: &Props) -> HashMap<&'static str, Value<'static>> {
        use api::property as p;
        let mut m = HashMap::new();
        let mut put = |changed: bool, name: &'static str, v: Value<'static>| {
            if changed {
                m.insert(name, v);
            }
        };
        put(self.state != new.state, p::STATE, new.state.clone().into());
        put(self.state_reason != new.state_reason, p::STATE_REASON, new.state_reason.clone().into());
        put(self.paused != new.paused, p::PAUSED, new.paused.into());
        put(self.cgroup != new.cgroup, p::CGROUP, new.cgroup.clone().into());
        put(self.pin_dir != new.pin_dir, p::PIN_DIR, new.pin_dir.clone().into());
        put(self.config_path != new.config_path, p::CONFIG_PATH, new.config_path.clone().into());
        put(self.config_sha256 != new.config_sha256, p::CONFIG_SHA256, new.config_sha256.clone().into());
        put(self.capacity != new.capacity, p::CAPACITY, new.capacity.into());
        put(self.default_action != new.default_action, p::DEFAULT_ACTION, new.default_action.clone().into());
        put(self.policy_sha256 != new.policy_sha256, p::POLICY_SHA256, new.policy_sha256.clone().into());
        m
    }
}

/// sha256 over the default action and the effective rules with their sources.
fn policy_sha256(d: &Daemon) -> String {
    let mut h = Sha256::new();
    h.update(format!("default = {:?}\n", d.policy_default().as_str()));
    for (src, rule) in d.policy_list() {
        h.update(format!("# {}\n{}\n", src.as_str(), toml::to_string(&rule).unwrap_or_default()));
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Remembers the last announced property values.
#[derive(Default)]
struct Announcer {
    last: Mutex<Option<Props>>,
}

impl Announcer {
    fn reset(&self, daemon: &Shared) {
        let now = Props::read(&lock(daemon));
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(now);
    }

    /// What changed since the last announcement (None: nothing).
    fn changes(&self, daemon: &Shared) -> Option<HashMap<&'static str, Value<'static>>> {
        let now = Props::read(&lock(daemon));
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let changed = last.as_ref().map(|old| old.diff(&now)).unwrap_or_default();
        *last = Some(now);
        (!changed.is_empty()).then_some(changed)
    }

    async fn announce(&self, daemon: &Shared, conn: &zbus::Connection) {
        let Some(changed) = self.changes(daemon) else { return };
        if let Err(e) = conn
            .emit_signal(
                None::<BusName<'_>>,
                api::OBJECT_PATH,
                "org.freedesktop.DBus.Properties",
                "PropertiesChanged",
                &(api::INTERFACE, changed, Vec::<&str>::new()),
            )
            .await
        {
            tracing::debug!("emitting PropertiesChanged: {e}");
        }
    }
}

fn control_error(e: ControlError) -> Error {
    match e {
        ControlError::InvalidArgument(m) => Error::InvalidArgument(m),
        ControlError::Policy(p) => Error::InvalidArgument(p.to_string()),
        ControlError::Config(c) => Error::InvalidConfig(c.to_string()),
        ControlError::Failed(e) => Error::Failed(format!("{e:#}")),
    }
}

/// The readable part of a TOML error: `key `k`: reason` where the key is known,
/// the line for syntax errors.
fn toml_reason(text: &str, e: &toml::de::Error) -> String {
    if let Err(syntax) = toml::from_str::<toml::Table>(text) {
        let at = syntax.span().map_or(0, |s| s.start.min(text.len()));
        let line_no = text[..at].matches('\n').count() + 1;
        let line = text[text[..at].rfind('\n').map_or(0, |i| i + 1)..].lines().next().unwrap_or("").trim();
        let msg = syntax.message().trim();
        let msg = if msg.is_empty() { String::new() } else { format!(" ({msg})") };
        return format!("invalid TOML at line {line_no}: `{line}`{msg}");
    }
    let msg = e.message().trim();
    let span = e.span();
    let at = span.as_ref().map(|s| s.start.min(text.len())).unwrap_or(0);
    let line_no = text[..at].matches('\n').count() + 1;
    let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("");
    // Value errors point at the value of `key = value`; name the key.
    let key = line
        .split_once('=')
        .filter(|(k, _)| at >= line_start + k.len())
        .map(|(k, _)| k.trim())
        .filter(|k| !k.is_empty() && !k.starts_with('['));
    match (msg.is_empty(), key) {
        (true, _) => format!("invalid TOML at line {line_no}: `{}`", line.trim()),
        (false, Some(k)) if !msg.contains(&format!("`{k}`")) => format!("key `{k}`: {msg}"),
        (false, _) => msg.to_string(),
    }
}

/// The `name` of a rule, if the text is TOML at all.
fn rule_name(table: Option<&toml::Table>) -> Option<String> {
    table.and_then(|t| t.get("name")).and_then(|n| n.as_str()).map(String::from)
}

/// Parse one rule (a TOML table body) with the config file's parser.
fn parse_rule(text: &str, what: &str) -> Result<RuleSpec, Error> {
    toml::from_str::<RuleSpec>(text).map_err(|e| {
        let name = rule_name(toml::from_str::<toml::Table>(text).ok().as_ref());
        let label = name.map(|n| format!("{what} ({n})")).unwrap_or_else(|| what.to_string());
        Error::InvalidArgument(format!("{label}: {}", toml_reason(text, &e)))
    })
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesDoc {
    #[serde(default)]
    rules: Vec<RuleSpec>,
}

/// Parse a policy document (`[[rules]]` tables); errors name the rule by number and name.
fn parse_rules_doc(text: &str) -> Result<Vec<RuleSpec>, Error> {
    toml::from_str::<RulesDoc>(text).map(|d| d.rules).map_err(|e| {
        let at = e.span().map_or(0, |s| s.start.min(text.len()));
        let line_no = text[..at].matches('\n').count() + 1;
        // Which `[[rules]]` table the error is in.
        let n = text[..at]
            .lines()
            .filter(|l| {
                l.trim().trim_start_matches("[[").trim_end_matches("]]").trim() == "rules" && l.trim().starts_with("[[")
            })
            .count();
        let table = toml::from_str::<toml::Table>(text).ok();
        let name = table
            .as_ref()
            .and_then(|t| t.get("rules"))
            .and_then(|r| r.as_array())
            .and_then(|a| a.get(n.wrapping_sub(1)))
            .and_then(|r| r.as_table())
            .and_then(|r| rule_name(Some(r)));
        let rule = match (n, name) {
            (0, _) => String::new(),
            (n, Some(name)) => format!(", rule {n} ({name})"),
            (n, None) => format!(", rule {n}"),
        };
        let reason = toml_reason(text, &e);
        if reason.starts_with("invalid TOML") {
            return Error::InvalidArgument(format!("policy: {reason}"));
        }
        Error::InvalidArgument(format!("policy line {line_no}{rule}: {reason}"))
    })
}

fn rule_view(index: usize, src: RuleSource, rule: &RuleSpec) -> api::PolicyRule {
    api::PolicyRule {
        index: index as u32,
        source: src.as_str().to_string(),
        name: rule.name.clone().unwrap_or_default(),
        summary: rule.summary(),
        rule: toml::to_string(rule).unwrap_or_default(),
    }
}

fn require_attached(d: &Daemon) -> Result<(), Error> {
    let s = d.status();
    if s.state == api::state::DETACHED {
        return Err(Error::NotAttached(format!("the datapath is detached: {}", s.reason)));
    }
    Ok(())
}

struct Manager {
    daemon: Shared,
    announcer: Arc<Announcer>,
}

impl Manager {
    /// Only root may change bypassd. Refusals are logged with the caller's uid.
    async fn authorize(&self, conn: &zbus::Connection, hdr: &Header<'_>, method: &str) -> Result<(), Error> {
        let Some(sender) = hdr.sender() else {
            tracing::warn!("refused {method}: the call has no sender to check");
            return Err(Error::AccessDenied(format!(
                "permission denied: {method} needs a caller the bus can vouch for"
            )));
        };
        let uid = conn
            .call_method(
                Some("org.freedesktop.DBus"),
                "/org/freedesktop/DBus",
                Some("org.freedesktop.DBus"),
                "GetConnectionUnixUser",
                &(sender.as_str(),),
            )
            .await
            .and_then(|r| r.body().deserialize::<u32>());
        match uid {
            Ok(0) => Ok(()),
            Ok(uid) => {
                tracing::warn!("refused {method} from uid {uid} ({sender}): only root may change bypassd");
                Err(Error::AccessDenied(format!(
                    "permission denied: {method} changes bypassd and needs root (caller uid {uid})"
                )))
            }
            Err(e) => {
                tracing::warn!("refused {method} from {sender}: cannot tell its uid ({e})");
                Err(Error::AccessDenied(format!("permission denied: cannot determine the caller's uid ({e})")))
            }
        }
    }

    /// Run a write operation as root, then announce what it changed.
    async fn write<T>(
        &self,
        conn: &zbus::Connection,
        hdr: &Header<'_>,
        method: &str,
        op: impl FnOnce(&mut Daemon) -> Result<T, Error>,
    ) -> Result<T, Error> {
        self.authorize(conn, hdr, method).await?;
        let r = {
            let mut d = lock(&self.daemon);
            op(&mut d)
        };
        match &r {
            Err(e) if method == member::RELOAD => {
                tracing::warn!("reload over D-Bus failed, keeping the running configuration: {}", e.message())
            }
            Err(e) => tracing::info!("{method} refused: {}", e.message()),
            Ok(_) => {}
        }
        self.announcer.announce(&self.daemon, conn).await;
        r
    }

    fn status(&self) -> api::Status {
        lock(&self.daemon).status()
    }
}

/// bypassd's control interface. Read methods and properties are open to every user;
/// the write methods (Reload, Pause, Resume, Detach, Policy*) are for root only and
/// fail with org.bypassd.Error.AccessDenied for anyone else, changing nothing.
/// Errors: org.bypassd.Error.{InvalidArgument,AccessDenied,InvalidConfig,NotAttached,Failed}.
#[interface(name = "org.bypassd.Manager1")]
impl Manager {
    /// Version, datapath state ("attached", "detached", "degraded") and why, paused,
    /// cgroup, pin directory, config path and sha256, start time (Unix seconds), BPF
    /// ABI version, SOCKHASH capacity, and the config files loaded (the main file,
    /// then its conf.d/*.toml drop-ins in merge order), in one struct.
    #[zbus(out_args("status"))]
    fn get_status(&self) -> (api::Status,) {
        (self.status(),)
    }

    /// Datapath counters summed over CPUs: (name, value) pairs, e.g. sockets_inserted,
    /// insert_failures, redirected_msgs, redirected_bytes, passed_msgs, passed_bytes.
    /// Fails with NotAttached when the datapath is detached.
    #[zbus(out_args("counters"))]
    fn get_stats(&self) -> Result<api::Stats, Error> {
        let d = lock(&self.daemon);
        require_attached(&d)?;
        d.stats().map_err(control_error)
    }

    /// Accelerated sockets: (family, local, remote, netns cookie, paired).
    #[zbus(out_args("connections"))]
    fn list_connections(&self) -> Result<Vec<api::Connection>, Error> {
        lock(&self.daemon).connections().map_err(control_error)
    }

    /// The default action ("accelerate" or "kernel") and the effective rules in
    /// evaluation order (runtime rules first, then the config file's): (index,
    /// source "runtime"|"config", name, summary, rule as TOML).
    #[zbus(out_args("default_action", "rules"))]
    fn list_policy(&self) -> (String, Vec<api::PolicyRule>) {
        let d = lock(&self.daemon);
        let rules = d.policy_list().iter().enumerate().map(|(i, (src, r))| rule_view(i + 1, *src, r)).collect();
        (d.policy_default().as_str().to_string(), rules)
    }

    /// Re-read the config file and apply it. A bad file fails with InvalidConfig and
    /// the running configuration is kept. Root only.
    async fn reload(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<(), Error> {
        self.write(conn, &hdr, member::RELOAD, |d| d.reload().map_err(control_error)).await
    }

    /// Stop accelerating new connections (accelerated ones stay). Returns whether
    /// anything changed. Root only.
    #[zbus(out_args("changed"))]
    async fn pause(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<bool, Error> {
        self.write(conn, &hdr, member::PAUSE, |d| {
            require_attached(d)?;
            d.set_paused(true).map_err(control_error)
        })
        .await
    }

    /// Accelerate new connections again. Returns whether anything changed. Root only.
    #[zbus(out_args("changed"))]
    async fn resume(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<bool, Error> {
        self.write(conn, &hdr, member::RESUME, |d| {
            require_attached(d)?;
            d.set_paused(false).map_err(control_error)
        })
        .await
    }

    /// Remove the pinned datapath: new connections take the kernel path, accelerated
    /// ones finish on it. Reload or restart bypassd to attach again. Root only.
    async fn detach(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<(), Error> {
        self.write(conn, &hdr, member::DETACH, |d| d.detach().map_err(control_error)).await
    }

    /// Append a runtime rule, given as a TOML table body with the fields of the config
    /// file's [[policy.rules]] (e.g. `action = "accelerate"` and `remote_ports =
    /// "8080"`). Runtime rules come before the config file's. Returns the rule's
    /// 1-based index. A bad rule fails with InvalidArgument naming the rule and the
    /// reason. Root only.
    #[zbus(out_args("index"))]
    async fn policy_add(
        &self,
        rule: &str,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<u32, Error> {
        let rule = rule.to_string();
        self.write(conn, &hdr, member::POLICY_ADD, move |d| {
            let n = d.policy_list().iter().filter(|(s, _)| *s == RuleSource::Runtime).count() + 1;
            let spec = parse_rule(&rule, &format!("new rule {n}"))?;
            d.policy_add(spec, None).map_err(control_error)?;
            Ok(n as u32)
        })
        .await
    }

    /// Insert a runtime rule at 1-based `position` among the runtime rules (1 to
    /// their count + 1); otherwise as PolicyAdd. Root only.
    #[zbus(out_args("index"))]
    async fn policy_insert(
        &self,
        position: u32,
        rule: &str,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<u32, Error> {
        let rule = rule.to_string();
        self.write(conn, &hdr, member::POLICY_INSERT, move |d| {
            let spec = parse_rule(&rule, &format!("new rule at position {position}"))?;
            d.policy_add(spec, Some(position as usize)).map_err(control_error)?;
            Ok(position)
        })
        .await
    }

    /// Remove the runtime rule at 1-based `index` of the effective list (as
    /// ListPolicy numbers them). Config file rules cannot be removed here. Root only.
    async fn policy_remove(
        &self,
        index: u32,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<(), Error> {
        self.write(conn, &hdr, member::POLICY_REMOVE, |d| d.policy_remove(index as usize).map_err(control_error)).await
    }

    /// Replace the runtime rules, atomically, with the `[[rules]]` tables of a TOML
    /// document (same fields as [[policy.rules]]). Returns whether anything changed.
    /// Root only.
    #[zbus(out_args("changed"))]
    async fn policy_apply(
        &self,
        rules: &str,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<bool, Error> {
        let text = rules.to_string();
        self.write(conn, &hdr, member::POLICY_APPLY, move |d| {
            let rules = parse_rules_doc(&text)?;
            d.policy_apply(rules).map_err(control_error)
        })
        .await
    }

    /// Drop the runtime rules; returns whether there were any. Root only.
    #[zbus(out_args("changed"))]
    async fn policy_reset(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<bool, Error> {
        self.write(conn, &hdr, member::POLICY_RESET, |d| d.policy_reset().map_err(control_error)).await
    }

    /// bypassd's version.
    #[zbus(property(emits_changed_signal = "const"))]
    fn version(&self) -> String {
        env!("CARGO_PKG_VERSION").to_string()
    }

    /// When bypassd started, Unix seconds.
    #[zbus(property(emits_changed_signal = "const"))]
    fn started_at(&self) -> u64 {
        self.status().started_at
    }

    /// BPF ABI version of the datapath.
    #[zbus(property(emits_changed_signal = "const"))]
    fn abi_version(&self) -> u32 {
        self.status().abi_version
    }

    /// "attached", "detached" or "degraded".
    #[zbus(property)]
    fn state(&self) -> String {
        self.status().state
    }

    /// Why the state is what it is; empty when attached.
    #[zbus(property)]
    fn state_reason(&self) -> String {
        self.status().reason
    }

    /// Whether acceleration of new connections is paused.
    #[zbus(property)]
    fn paused(&self) -> bool {
        self.status().paused
    }

    /// The cgroup v2 directory whose sockets may be accelerated.
    #[zbus(property)]
    fn cgroup(&self) -> String {
        self.status().cgroup
    }

    /// Where the datapath is pinned.
    #[zbus(property)]
    fn pin_dir(&self) -> String {
        self.status().pin_dir
    }

    /// The config file.
    #[zbus(property)]
    fn config_path(&self) -> String {
        self.status().config_path
    }

    /// sha256 (hex) of the loaded config file; with drop-ins, of every loaded file.
    #[zbus(property)]
    fn config_sha256(&self) -> String {
        self.status().config_sha256
    }

    /// SOCKHASH capacity.
    #[zbus(property)]
    fn capacity(&self) -> u32 {
        self.status().capacity
    }

    /// What a connection no rule matches gets: "accelerate" or "kernel".
    #[zbus(property)]
    fn default_action(&self) -> String {
        lock(&self.daemon).policy_default().as_str().to_string()
    }

    /// sha256 (hex) of the effective policy (default action and rules with sources);
    /// changes with every policy edit.
    #[zbus(property)]
    fn policy_sha256(&self) -> String {
        policy_sha256(&lock(&self.daemon))
    }

    /// Datapath counters as in GetStats (empty when detached). They change per
    /// packet, so no PropertiesChanged is emitted for them.
    #[zbus(property(emits_changed_signal = "false"))]
    fn counters(&self) -> api::Stats {
        lock(&self.daemon).stats().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_name_is_the_api_constant() {
        assert_eq!(<Manager as zbus::object_server::Interface>::name().as_str(), api::INTERFACE);
    }

    #[test]
    fn rule_errors_name_the_rule_key_and_reason() {
        let e = parse_rule("name = \"web\"\naction = \"accelerate\"\nremote_cidr = \"10.0.0.1/8\"\n", "new rule 1")
            .unwrap_err();
        let m = e.message();
        assert!(matches!(e, Error::InvalidArgument(_)));
        assert!(m.starts_with("new rule 1 (web): key `remote_cidr`: `10.0.0.1/8` has host bits set"), "{m}");
        let m = parse_rule("action = \"fast\"", "new rule 2").unwrap_err().message();
        assert!(m.starts_with("new rule 2: key `action`: unknown variant `fast`"), "{m}");
        let m = parse_rule("action = ", "new rule 1").unwrap_err().message();
        assert!(m.starts_with("new rule 1: invalid TOML at line 1: `action =`"), "{m}");
        let m = parse_rule("action", "new rule 1").unwrap_err().message();
        assert_eq!(m, "new rule 1: invalid TOML at line 1: `action` (expected `.`, `=`)");
        let m = parse_rule("remote_ports = 8080", "new rule 1").unwrap_err().message();
        assert!(m.contains("missing field `action`"), "{m}");
        assert_eq!(
            parse_rule("action = \"kernel\"\nlocal_ports = \"80-90\"", "r").unwrap().summary(),
            "kernel local_ports=80-90"
        );
    }

    #[test]
    fn policy_doc_errors_name_the_rule_by_number_and_name() {
        let doc =
            "[[rules]]\naction = \"kernel\"\n\n[[rules]]\nname = \"web\"\naction = \"accelerate\"\nlocal_ports = 0\n";
        let m = parse_rules_doc(doc).unwrap_err().message();
        assert!(m.starts_with("policy line 7, rule 2 (web): key `local_ports`: port 0 is out of range"), "{m}");
        let m = parse_rules_doc("[[rules]\naction = 1").unwrap_err().message();
        assert!(m.starts_with("policy: invalid TOML at line 1: `[[rules]`"), "{m}");
        let m = parse_rules_doc("[[policy.rules]]\naction = \"kernel\"\n").unwrap_err().message();
        assert!(m.contains("unknown field `policy`"), "{m}");
        assert_eq!(parse_rules_doc("").unwrap(), vec![]);
        assert_eq!(parse_rules_doc("[[rules]]\naction = \"kernel\"\n").unwrap().len(), 1);
    }
}
