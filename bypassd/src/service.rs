//! The daemon: state, reload, pause, policy layers, and the systemd-facing main loop
//! (READY/RELOADING/STATUS/WATCHDOG, SIGHUP reload, SIGTERM stop).
use crate::{
    config::{Config, ConfigError},
    datapath::{self, Datapath, PolicyImage, Target},
    policy::{self, Action, PolicyError, RuleSpec},
    sysfs,
};
use anyhow::{Context, Result};
use bypassd_api as api;
use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

/// Errors the control interface reports; the D-Bus layer maps them to named errors.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Policy(#[from] PolicyError),
    #[error("{0:#}")]
    Failed(#[from] anyhow::Error),
}

/// Where a rule in the effective list comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleSource {
    Runtime,
    Config,
}

impl RuleSource {
    pub fn as_str(self) -> &'static str {
        match self {
            RuleSource::Runtime => "runtime",
            RuleSource::Config => "config",
        }
    }
}

pub struct Daemon {
    pub config_path: PathBuf,
    pub config: Config,
    config_sha256: String,
    /// The main config file and the drop-ins merged after it.
    config_files: Vec<PathBuf>,
    cgroup_root: PathBuf,
    datapath: Option<Datapath>,
    /// Why the datapath is not attached, when it is not.
    reason: String,
    started_at: u64,
    runtime_rules: Option<Vec<RuleSpec>>,
    log: crate::logging::Handle,
    last_failures: u64,
    last_full_warning: Option<Instant>,
}

pub type Shared = Arc<Mutex<Daemon>>;

fn target(cfg: &Config, cgroup_root: &Path) -> Target {
    let rel = cfg.daemon.cgroup.get_ref().0.to_string_lossy().trim_start_matches('/').to_string();
    Target {
        pin_dir: cfg.daemon.pin_dir.0.clone(),
        cgroup: if rel.is_empty() { cgroup_root.to_path_buf() } else { cgroup_root.join(rel) },
        capacity: cfg.datapath.capacity.0,
        queue_cap: cfg.datapath.queue_cap.0,
        splice: cfg.datapath.splice_safety,
        splice_readers: cfg.datapath.splice_readers.iter().map(|n| n.0.clone()).collect(),
    }
}

impl Daemon {
    /// Read config and state, then attach (or adopt) the datapath.
    pub fn start(config_path: &Path, log: crate::logging::Handle) -> Result<Daemon> {
        let loaded = crate::dropins::load(config_path)?;
        let config = loaded.config.clone();
        log.set_level(config.daemon.log_level);
        let cgroup_root = sysfs::cgroup2_mount()?;
        let runtime_rules = policy::runtime::load(&config.daemon.state_dir.0)?;
        let mut d = Daemon {
            config_path: config_path.to_path_buf(),
            config,
            config_sha256: loaded.sha256.clone(),
            config_files: loaded.files.clone(),
            cgroup_root,
            datapath: None,
            reason: String::new(),
            started_at: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            runtime_rules,
            log,
            last_failures: 0,
            last_full_warning: None,
        };
        let image = d.policy_image(&d.effective_rules(&d.config))?;
        let t = target(&d.config, &d.cgroup_root);
        check_cgroup(&loaded.cgroup_file, &loaded.cgroup_src, &d.config, &t)?;
        sysfs::ensure_bpffs(&t.pin_dir)?;
        let dp = Datapath::attach(&t, &image, false)?;
        tracing::info!(
            "datapath {} at {} for cgroup {} (capacity {}, {} policy rules, default {})",
            if dp.adopted { "adopted" } else { "attached" },
            dp.gen_dir.display(),
            t.cgroup.display(),
            t.capacity,
            image.rules.len(),
            d.config.policy.default.as_str(),
        );
        for p in &dp.protections {
            tracing::info!("datapath safety: {p}");
        }
        d.last_failures = dp.counter(bypassd_ebpf::abi::Counter::InsertFailures).unwrap_or(0);
        d.datapath = Some(dp);
        Ok(d)
    }

    /// Runtime rules first, then the config file's.
    fn effective_rules(&self, cfg: &Config) -> Vec<(RuleSource, RuleSpec)> {
        let rt = self.runtime_rules.iter().flatten().map(|r| (RuleSource::Runtime, r.clone()));
        rt.chain(cfg.policy.rules.iter().map(|r| (RuleSource::Config, r.clone()))).collect()
    }

    fn resolve(&self, rules: &[(RuleSource, RuleSpec)]) -> Result<Vec<policy::Resolved>, PolicyError> {
        let specs: Vec<RuleSpec> = rules.iter().map(|(_, r)| r.clone()).collect();
        policy::resolve(&specs, &self.cgroup_root)
    }

    fn policy_image(&self, rules: &[(RuleSource, RuleSpec)]) -> Result<PolicyImage, PolicyError> {
        Ok(PolicyImage {
            rules: policy::encode(&self.resolve(rules)?),
            accelerate_by_default: self.config.policy.default == Action::Accelerate,
        })
    }

    pub fn summary(&self) -> String {
        let s = match &self.datapath {
            Some(dp) if dp.is_attached() => {
                let c = dp.counters().unwrap_or_default();
                let get = |k| c.iter().find(|(n, _)| *n == k).map_or(0, |(_, v)| *v);
                use bypassd_ebpf::abi::Counter as C;
                format!(
                    "attached{}: {} sockets accelerated, {} msgs redirected, {} insert failures",
                    if self.paused() { " (paused)" } else { "" },
                    get(C::SocketsInserted),
                    get(C::RedirectedMsgs),
                    get(C::InsertFailures)
                )
            }
            _ => format!("detached: {}", self.reason),
        };
        match crate::dbus::unavailable() {
            Some(why) => format!("{s}; D-Bus control interface unavailable: {why}"),
            None => s,
        }
    }

    fn paused(&self) -> bool {
        self.datapath.as_ref().and_then(|d| d.paused().ok()).unwrap_or(false)
    }

    pub fn status(&self) -> api::Status {
        let (state, reason) = match &self.datapath {
            Some(dp) if dp.is_attached() => ("attached", String::new()),
            Some(_) => ("degraded", "the pinned datapath was removed behind bypassd's back (bypassd --detach?); reload to attach again".into()),
            None => ("detached", self.reason.clone()),
        };
        let t = target(&self.config, &self.cgroup_root);
        api::Status {
            version: env!("CARGO_PKG_VERSION").into(),
            state: state.into(),
            reason,
            paused: self.paused(),
            cgroup: t.cgroup.display().to_string(),
            pin_dir: t.pin_dir.display().to_string(),
            config_path: self.config_path.display().to_string(),
            config_sha256: self.config_sha256.clone(),
            started_at: self.started_at,
            abi_version: bypassd_ebpf::abi::ABI_VERSION,
            capacity: t.capacity,
            config_files: self.config_files.iter().map(|f| f.display().to_string()).collect(),
        }
    }

    pub fn stats(&self) -> Result<api::Stats, ControlError> {
        let dp = self.datapath.as_ref().ok_or_else(|| ControlError::Failed(anyhow::anyhow!("datapath is detached")))?;
        Ok(dp.counters()?.into_iter().map(|(c, v)| (c.name().to_string(), v)).collect())
    }

    pub fn connections(&self) -> Result<Vec<api::Connection>, ControlError> {
        match &self.datapath {
            Some(dp) => Ok(dp.connections()?.into_iter().map(wire_connection).collect()),
            None => Ok(Vec::new()),
        }
    }

    /// Re-read the config; on any error keep everything as it was.
    pub fn reload(&mut self) -> Result<(), ControlError> {
        let r = self.try_reload();
        crate::metrics::record_reload(r.is_ok());
        r
    }

    fn try_reload(&mut self) -> Result<(), ControlError> {
        let loaded = crate::dropins::load(&self.config_path)?;
        let cfg = loaded.config.clone();
        let rules = self.effective_rules(&cfg);
        let specs: Vec<RuleSpec> = rules.iter().map(|(_, r)| r.clone()).collect();
        let resolved = policy::resolve(&specs, &self.cgroup_root)?;
        let image = PolicyImage {
            rules: policy::encode(&resolved),
            accelerate_by_default: cfg.policy.default == Action::Accelerate,
        };
        let t = target(&cfg, &self.cgroup_root);
        check_cgroup(&loaded.cgroup_file, &loaded.cgroup_src, &cfg, &t)?;
        let paused = self.paused();
        let same_target = self.datapath.as_ref().is_some_and(|d| d.target == t && d.is_attached());
        if same_target {
            if let Some(dp) = self.datapath.as_mut() {
                dp.apply_policy(&image)?;
            }
        } else {
            sysfs::ensure_bpffs(&t.pin_dir)?;
            let dp = Datapath::attach(&t, &image, paused)?;
            // The pin directory moved: the old one is ours too, retire it.
            if let Some(old) = &self.datapath
                && old.target.pin_dir != t.pin_dir
            {
                datapath::detach(&old.target.pin_dir)?;
            }
            for p in &dp.protections {
                tracing::info!("datapath safety: {p}");
            }
            self.datapath = Some(dp);
        }
        self.log.set_level(cfg.daemon.log_level);
        crate::metrics::warn_if_changed(&self.config.metrics, &cfg.metrics);
        self.config = cfg;
        self.config_sha256 = loaded.sha256;
        self.config_files = loaded.files;
        self.reason.clear();
        tracing::info!("configuration reloaded from {}", self.config_path.display());
        Ok(())
    }

    /// Returns whether anything changed.
    pub fn set_paused(&mut self, paused: bool) -> Result<bool, ControlError> {
        let dp = self.datapath.as_mut().ok_or_else(|| ControlError::Failed(anyhow::anyhow!("datapath is detached")))?;
        let was = dp.paused()?;
        dp.set_paused(paused)?;
        if was != paused {
            tracing::info!("acceleration of new connections {}", if paused { "paused" } else { "resumed" });
        }
        Ok(was != paused)
    }

    /// Remove the datapath: new connections stay on the kernel path, open ones finish.
    pub fn detach(&mut self) -> Result<(), ControlError> {
        datapath::detach(&self.config.daemon.pin_dir.0)?;
        self.datapath = None;
        self.reason = "detached on request; reload or restart bypassd to attach again".into();
        tracing::info!("datapath detached; accelerated connections finish on it");
        Ok(())
    }

    pub fn policy_list(&self) -> Vec<(RuleSource, RuleSpec)> {
        self.effective_rules(&self.config)
    }

    pub fn policy_default(&self) -> Action {
        self.config.policy.default
    }

    /// Validate, push to the kernel, then persist; nothing changes on error.
    fn set_runtime(&mut self, new: Option<Vec<RuleSpec>>) -> Result<bool, ControlError> {
        if new == self.runtime_rules {
            return Ok(false);
        }
        let old = std::mem::replace(&mut self.runtime_rules, new.clone());
        let image = match self.policy_image(&self.effective_rules(&self.config)) {
            Ok(i) => i,
            Err(e) => {
                self.runtime_rules = old;
                return Err(e.into());
            }
        };
        let state_dir = self.config.daemon.state_dir.0.clone();
        let persisted = match &new {
            Some(r) => policy::runtime::save(&state_dir, r),
            None => policy::runtime::remove(&state_dir).map(|_| ()),
        };
        if let Err(e) = persisted {
            self.runtime_rules = old;
            return Err(e.into());
        }
        if let Some(dp) = self.datapath.as_mut()
            && let Err(e) = dp.apply_policy(&image)
        {
            // Keep file and kernel in step: put the old layer back.
            let _ = match &old {
                Some(r) => policy::runtime::save(&state_dir, r),
                None => policy::runtime::remove(&state_dir).map(|_| ()),
            };
            self.runtime_rules = old;
            return Err(e.into());
        }
        tracing::info!("runtime policy now has {} rules", new.as_ref().map_or(0, Vec::len));
        Ok(true)
    }

    /// Insert a runtime rule at `position` (1-based among runtime rules; None = last).
    pub fn policy_add(&mut self, rule: RuleSpec, position: Option<usize>) -> Result<(), ControlError> {
        let mut rules = self.runtime_rules.clone().unwrap_or_default();
        let pos = position.unwrap_or(rules.len() + 1);
        if pos == 0 || pos > rules.len() + 1 {
            return Err(ControlError::InvalidArgument(format!(
                "position {pos} is out of range 1-{} (runtime rules)",
                rules.len() + 1
            )));
        }
        rules.insert(pos - 1, rule);
        self.set_runtime(Some(rules)).map(|_| ())
    }

    /// Remove the effective rule at 1-based `index`; config rules cannot be removed here.
    pub fn policy_remove(&mut self, index: usize) -> Result<(), ControlError> {
        let list = self.policy_list();
        let Some((src, _)) = index.checked_sub(1).and_then(|i| list.get(i)) else {
            return Err(ControlError::InvalidArgument(format!("no rule {index} (there are {})", list.len())));
        };
        if *src == RuleSource::Config {
            return Err(ControlError::InvalidArgument(format!(
                "rule {index} comes from {}; edit it there and reload",
                self.config_path.display()
            )));
        }
        let mut rules = self.runtime_rules.clone().unwrap_or_default();
        rules.remove(index - 1);
        self.set_runtime(Some(rules)).map(|_| ())
    }

    /// Replace the runtime layer; returns whether anything changed.
    pub fn policy_apply(&mut self, rules: Vec<RuleSpec>) -> Result<bool, ControlError> {
        self.set_runtime(Some(rules))
    }

    /// Drop the runtime layer; returns whether there was one.
    pub fn policy_reset(&mut self) -> Result<bool, ControlError> {
        self.set_runtime(None)
    }

    /// Periodic work: notice detachment and a full SOCKHASH (warn at most once a minute).
    pub fn tick(&mut self) {
        let Some(dp) = &self.datapath else { return };
        if let Ok(f) = dp.counter(bypassd_ebpf::abi::Counter::InsertFailures)
            && f > self.last_failures
        {
            let due = self.last_full_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(60));
            if due {
                tracing::warn!(
                    "{} sockets could not be accelerated (SOCKHASH full at capacity {}?); they use the kernel path. \
                     Raise [datapath] capacity.",
                    f - self.last_failures,
                    dp.capacity()
                );
                self.last_full_warning = Some(Instant::now());
                self.last_failures = f;
            }
        }
    }
}

/// A datapath connection as the control interface reports it.
fn wire_connection(c: datapath::Connection) -> api::Connection {
    api::Connection {
        family: c.family.into(),
        local: c.local.to_string(),
        remote: c.remote.to_string(),
        netns: c.netns,
        paired: c.paired,
    }
}

/// The configured cgroup must exist below the cgroup v2 mount.
fn check_cgroup(path: &Path, src: &str, cfg: &Config, t: &Target) -> Result<(), ConfigError> {
    if t.cgroup.is_dir() {
        return Ok(());
    }
    let span = cfg.daemon.cgroup.span();
    Err(ConfigError::at(
        path,
        src,
        (span.end > 0).then_some(span),
        format!("key `daemon.cgroup`: cgroup {} does not exist below the cgroup v2 mount", t.cgroup.display()),
    ))
}

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

    let daemon: Shared = Arc::new(Mutex::new(Daemon::start(config_path, log)?));
    let _bus = crate::dbus::serve(daemon.clone()).context("serving the D-Bus interface")?;
    let metrics_cfg = lock(&daemon).config.metrics.clone();
    let _metrics = crate::metrics::serve(daemon.clone(), &metrics_cfg);

    let status = lock(&daemon).summary();
    notify(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status(&status)]);
    tracing::info!("bypassd ready: {status}");

    let mut watchdog_usec = 0u64;
    let wd = sd_notify::watchdog_enabled(false, &mut watchdog_usec);
    let tick = if wd { Duration::from_micros(watchdog_usec / 2).max(Duration::from_millis(100)) } else { Duration::from_secs(5) };
    loop {
        match rx.recv_timeout(tick) {
            Ok(Event::Reload) => {
                notify(&[sd_notify::NotifyState::Reloading, monotonic_usec()]);
                let mut d = lock(&daemon);
                if let Err(e) = d.reload() {
                    tracing::error!("reload failed, keeping the running configuration: {e}");
                }
                let status = d.summary();
                drop(d);
                notify(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status(&status)]);
            }
            Ok(Event::Stop) => {
                notify(&[sd_notify::NotifyState::Stopping]);
                tracing::info!("stopping; the datapath stays pinned and keeps accelerating");
                return Ok(());
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
        }
        let mut d = lock(&daemon);
        d.tick();
        let status = d.summary();
        drop(d);
        let mut st = vec![sd_notify::NotifyState::Status(&status)];
        if wd {
            st.push(sd_notify::NotifyState::Watchdog);
        }
        notify(&st);
    }
}

pub fn lock(d: &Shared) -> std::sync::MutexGuard<'_, Daemon> {
    // A panic while holding the lock must not take the control plane down with it.
    d.lock().unwrap_or_else(|p| p.into_inner())
}

fn monotonic_usec() -> sd_notify::NotifyState<'static> {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap_or(nix::sys::time::TimeSpec::new(0, 0));
    sd_notify::NotifyState::MonotonicUsec(ts.tv_sec() as i128 * 1_000_000 + ts.tv_nsec() as i128 / 1000)
}

fn notify(states: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::debug!("sd_notify: {e}");
    }
}
