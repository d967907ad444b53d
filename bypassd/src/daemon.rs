//! The daemon's state and what changes it: start, reload, pause, detach, the policy
//! layers and the periodic re-check. Slow steps (reading the config, building a
//! datapath, fsync) are split from the quick commit so that [`crate::control`] can
//! run them without holding the state lock readers wait on.
use crate::{
    config::{Config, ConfigError},
    datapath::{self, Datapath, PolicyImage, Target},
    policy::{self, Action, PolicyError, Resolved, RuleSource, RuleSpec},
    sysfs,
};
use anyhow::Result;
use bypassd_api as api;
use bypassd_ebpf::abi::Counter;
use std::{
    path::{Path, PathBuf},
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

/// One rule of the effective policy and whether it can match right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyEntry {
    pub source: RuleSource,
    pub spec: RuleSpec,
    /// Why it matches nothing (its cgroup is missing), when it does not.
    pub inactive: Option<String>,
}

/// The policy for a config and a runtime layer, resolved and encoded for the kernel.
/// Built in one place, [`build_policy`].
#[derive(Debug, Clone)]
pub struct BuiltPolicy {
    pub entries: Vec<PolicyEntry>,
    resolved: Vec<Resolved>,
    pub image: PolicyImage,
}

impl BuiltPolicy {
    /// Rules an operator adds now must name an existing cgroup (a missing one is
    /// almost always a typo); rules already in place stay, inactive, while theirs
    /// is gone. `old` is the runtime layer before the edit.
    pub fn refuse_new_inactive(&self, old: Option<&Vec<RuleSpec>>) -> Result<(), PolicyError> {
        let known = |r: &RuleSpec| old.is_some_and(|o| o.contains(r));
        for (i, e) in self.entries.iter().enumerate() {
            if let (RuleSource::Runtime, Some(_), Some(cg)) = (e.source, &e.inactive, &e.spec.cgroup)
                && !known(&e.spec)
            {
                return Err(PolicyError::BadRule {
                    index: i + 1,
                    name: e.spec.name.clone(),
                    reason: format!(
                        "cgroup `{cg}` not found below the cgroup v2 mount: a new rule must name an existing \
                         cgroup (rules already in the policy stay, inactive, while their cgroup is gone)"
                    ),
                });
            }
        }
        Ok(())
    }
}

/// Runtime rules first, then the config file's.
fn effective_rules(cfg: &Config, runtime: Option<&Vec<RuleSpec>>) -> Vec<(RuleSource, RuleSpec)> {
    let rt = runtime.into_iter().flatten().map(|r| (RuleSource::Runtime, r.clone()));
    rt.chain(cfg.policy.rules.iter().map(|r| (RuleSource::Config, r.clone()))).collect()
}

/// Resolve cgroups (a missing one makes its rule inactive) and encode the image.
pub fn build_policy(
    cfg: &Config,
    runtime: Option<&Vec<RuleSpec>>,
    cgroup_root: &Path,
) -> Result<BuiltPolicy, PolicyError> {
    let rules = effective_rules(cfg, runtime);
    let specs: Vec<RuleSpec> = rules.iter().map(|(_, r)| r.clone()).collect();
    let resolved = policy::resolve(&specs, cgroup_root)?;
    let entries = rules
        .into_iter()
        .zip(&resolved)
        .map(|((source, spec), r)| PolicyEntry { source, spec, inactive: r.inactive.clone() })
        .collect();
    let image = PolicyImage {
        rules: policy::encode(&resolved),
        accelerate_by_default: cfg.policy.default == Action::Accelerate,
    };
    Ok(BuiltPolicy { entries, resolved, image })
}

fn target(cfg: &Config, cgroup_root: &Path) -> Target {
    let rel = cfg.daemon.cgroup.get_ref().0.to_string_lossy().trim_start_matches('/').to_string();
    Target {
        pin_dir: cfg.daemon.pin_dir.0.clone(),
        cgroup: if rel.is_empty() { cgroup_root.to_path_buf() } else { cgroup_root.join(rel) },
        capacity: cfg.datapath.capacity.0,
        queue_cap: cfg.datapath.queue_cap.0,
        splice: cfg.datapath.splice_safety,
        splice_readers: cfg.datapath.splice_readers.iter().map(|n| n.0.clone()).collect(),
        splice_tracepoints: cfg.datapath.splice_tracepoints,
        coalesce_below: cfg.datapath.coalesce_below,
        send_mode: cfg.datapath.send_mode,
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

fn log_protections(dp: &Datapath) {
    for p in &dp.protections {
        tracing::info!("datapath safety: {p}");
    }
}

/// What a reload needs from the running daemon, copied out so the slow part runs
/// without the state lock.
pub struct ReloadInputs {
    config_path: PathBuf,
    cgroup_root: PathBuf,
    runtime_rules: Option<Vec<RuleSpec>>,
    /// The current datapath's target, when it is attached.
    attached: Option<Target>,
    paused: bool,
}

/// A checked reload, ready to commit: nothing of the running daemon changed yet.
pub struct ReloadPlan {
    config: Config,
    /// sha256 over the loaded files, and the files (main file, then drop-ins).
    sha256: String,
    files: Vec<PathBuf>,
    policy: BuiltPolicy,
    /// A freshly attached datapath when the target changed (else the policy is
    /// applied to the current one).
    new_datapath: Option<Datapath>,
}

/// The slow half of a reload: read the config, build the policy and, when the
/// target changed, the new datapath generation beside the running one.
pub fn prepare_reload(i: ReloadInputs) -> Result<ReloadPlan, ControlError> {
    let loaded = crate::dropins::load(&i.config_path)?;
    let cfg = loaded.config;
    let policy = build_policy(&cfg, i.runtime_rules.as_ref(), &i.cgroup_root)?;
    let t = target(&cfg, &i.cgroup_root);
    check_cgroup(&loaded.cgroup_file, &loaded.cgroup_src, &cfg, &t)?;
    let new_datapath = if i.attached.as_ref() == Some(&t) {
        None
    } else {
        sysfs::ensure_bpffs(&t.pin_dir)?;
        let dp = Datapath::attach(&t, &policy.image, i.paused)?;
        log_protections(&dp);
        Some(dp)
    };
    Ok(ReloadPlan { config: cfg, sha256: loaded.sha256, files: loaded.files, policy, new_datapath })
}

pub struct Daemon {
    config_path: PathBuf,
    config: Config,
    config_sha256: String,
    /// The main config file and the drop-ins merged after it.
    config_files: Vec<PathBuf>,
    cgroup_root: PathBuf,
    datapath: Option<Datapath>,
    /// Why the datapath is not attached, when it is not.
    reason: String,
    started_at: u64,
    runtime_rules: Option<Vec<RuleSpec>>,
    /// The policy as last pushed to the kernel.
    policy: BuiltPolicy,
    log: crate::logging::Handle,
    last_failures: u64,
    last_full_warning: Option<Instant>,
    /// The link datapath ([[links]]), independent of the socket datapath.
    links: datapath::link::Links,
}

impl Daemon {
    /// Read config and state, then attach (or adopt) the datapath.
    pub fn start(config_path: &Path, log: crate::logging::Handle) -> Result<Daemon> {
        let loaded = crate::dropins::load(config_path)?;
        let config = loaded.config.clone();
        log.set_level(config.daemon.log_level);
        let cgroup_root = sysfs::cgroup2_mount()?;
        let runtime_rules = policy::runtime::load(&config.daemon.state_dir.0)?;
        let policy = build_policy(&config, runtime_rules.as_ref(), &cgroup_root)?;
        let t = target(&config, &cgroup_root);
        check_cgroup(&loaded.cgroup_file, &loaded.cgroup_src, &config, &t)?;
        sysfs::ensure_bpffs(&t.pin_dir)?;
        crate::startup::step("config, policy, mounts");
        let dp = Datapath::attach(&t, &policy.image, false)?;
        tracing::info!(
            "datapath {} at {} for cgroup {} (capacity {}, {} policy rules, default {})",
            if dp.adopted { "adopted" } else { "attached" },
            dp.gen_dir.display(),
            t.cgroup.display(),
            t.capacity,
            policy.entries.len(),
            config.policy.default.as_str(),
        );
        log_protections(&dp);
        log_inactive(&policy);
        crate::startup::step("datapath log");
        let mut d = Daemon {
            config_path: config_path.to_path_buf(),
            config_sha256: loaded.sha256,
            config_files: loaded.files,
            config,
            cgroup_root,
            last_failures: dp.counter(Counter::InsertFailures).unwrap_or(0),
            datapath: Some(dp),
            reason: String::new(),
            started_at: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            runtime_rules,
            policy,
            log,
            last_full_warning: None,
            links: Default::default(),
        };
        d.configure_links();
        crate::startup::step("link datapath");
        Ok(d)
    }

    /// Attach, adopt or retire the link datapath's entries for the current config.
    fn configure_links(&mut self) {
        let specs: Vec<_> = self.config.links.iter().map(|s| s.get_ref().clone()).collect();
        if let Err(e) = self.links.configure(&self.config.daemon.pin_dir.0, &specs) {
            tracing::error!("link datapath: {e:#}");
        }
    }

    /// Netlink reported interface or FDB changes.
    pub fn link_events(&mut self, evs: Vec<datapath::link::watch::Event>) {
        use datapath::link::watch::Event;
        let mut relink = false;
        for ev in evs {
            match ev {
                Event::Links => relink = true,
                Event::Fdb { netns, mac, ifindex, gone } => self.links.fdb_update(netns.as_deref(), mac, ifindex, gone),
            }
        }
        if relink {
            self.links.refresh();
        }
    }

    pub fn links(&self) -> Vec<api::LinkStatus> {
        self.links.status()
    }

    pub fn link_stats(&self) -> Vec<datapath::link::EntryStats> {
        self.links.entry_stats()
    }

    /// The metrics endpoint's settings (bound once, at start).
    pub fn metrics_config(&self) -> crate::metrics::MetricsConfig {
        self.config.metrics.clone()
    }

    pub fn reload_inputs(&self) -> ReloadInputs {
        ReloadInputs {
            config_path: self.config_path.clone(),
            cgroup_root: self.cgroup_root.clone(),
            runtime_rules: self.runtime_rules.clone(),
            attached: self.datapath.as_ref().filter(|d| d.is_attached()).map(|d| d.target.clone()),
            paused: self.paused(),
        }
    }

    /// The quick half of a reload: swap in what [`prepare_reload`] built.
    pub fn commit_reload(&mut self, plan: ReloadPlan) -> Result<(), ControlError> {
        match plan.new_datapath {
            Some(dp) => {
                // The pin directory moved: the old one is ours too, retire it.
                if let Some(old) = &self.datapath
                    && old.target.pin_dir != dp.target.pin_dir
                {
                    datapath::detach(&old.target.pin_dir)?;
                }
                self.datapath = Some(dp);
            }
            None => {
                if let Some(dp) = self.datapath.as_mut() {
                    dp.apply_policy(&plan.policy.image)?;
                }
            }
        }
        self.log.set_level(plan.config.daemon.log_level);
        crate::metrics::warn_if_changed(&self.config.metrics, &plan.config.metrics);
        self.config = plan.config;
        self.config_sha256 = plan.sha256;
        self.config_files = plan.files;
        log_inactive(&plan.policy);
        self.policy = plan.policy;
        self.reason.clear();
        self.configure_links();
        tracing::info!("configuration reloaded from {}", self.config_path.display());
        Ok(())
    }

    pub fn summary(&self) -> String {
        let s = self.datapath_summary();
        if self.links.is_empty() { s } else { format!("{s}; {}", self.links.summary()) }
    }

    fn datapath_summary(&self) -> String {
        match &self.datapath {
            Some(dp) if dp.is_attached() => {
                let c = dp.counters().unwrap_or_default();
                let get = |k| c.iter().find(|(n, _)| *n == k).map_or(0, |(_, v)| *v);
                let inactive = self.inactive_rules();
                format!(
                    "attached{}: {} sockets accelerated, {} msgs redirected, {} insert failures{}",
                    if self.paused() { " (paused)" } else { "" },
                    get(Counter::SocketsInserted),
                    get(Counter::RedirectedMsgs),
                    get(Counter::InsertFailures),
                    if inactive > 0 { format!("; {inactive} policy rule(s) inactive (cgroup missing)") } else { String::new() },
                )
            }
            _ => format!("detached: {}", self.reason),
        }
    }

    fn paused(&self) -> bool {
        self.datapath.as_ref().and_then(|d| d.paused().ok()).unwrap_or(false)
    }

    fn inactive_rules(&self) -> u32 {
        self.policy.entries.iter().filter(|e| e.inactive.is_some()).count() as u32
    }

    pub fn status(&self) -> api::Status {
        let (state, reason) = match &self.datapath {
            Some(dp) if dp.is_attached() => (api::state::ATTACHED, String::new()),
            Some(_) => (
                api::state::DEGRADED,
                "the pinned datapath was removed behind bypassd's back (bypassd --detach?); reload to attach again"
                    .into(),
            ),
            None => (api::state::DETACHED, self.reason.clone()),
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
            inactive_rules: self.inactive_rules(),
            config_files: self.config_files.iter().map(|f| f.display().to_string()).collect(),
        }
    }

    fn attached(&self) -> Result<&Datapath, ControlError> {
        self.datapath.as_ref().ok_or_else(|| ControlError::Failed(anyhow::anyhow!("datapath is detached")))
    }

    pub fn stats(&self) -> Result<api::Stats, ControlError> {
        let mut s: api::Stats = self.attached()?.counters()?.into_iter().map(|(c, v)| (c.name().to_string(), v)).collect();
        s.extend(self.links.stats());
        Ok(s)
    }

    pub fn connections(&self) -> Result<Vec<datapath::Connection>, ControlError> {
        match &self.datapath {
            Some(dp) => Ok(dp.connections()?),
            None => Ok(Vec::new()),
        }
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

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn state_dir(&self) -> PathBuf {
        self.config.daemon.state_dir.0.clone()
    }

    /// The effective rules in evaluation order, with whether each is active.
    pub fn policy_list(&self) -> &[PolicyEntry] {
        &self.policy.entries
    }

    pub fn policy_default(&self) -> Action {
        self.config.policy.default
    }

    /// sha256 (hex) of the effective policy, as the `PolicySha256` property shows it.
    pub fn policy_sha256(&self) -> String {
        let rules: Vec<(RuleSource, RuleSpec)> =
            self.policy.entries.iter().map(|e| (e.source, e.spec.clone())).collect();
        policy::diag::sha256(self.policy_default(), &rules)
    }

    pub fn runtime_rules(&self) -> Option<&Vec<RuleSpec>> {
        self.runtime_rules.as_ref()
    }

    /// The policy this config would have with `runtime` as the runtime layer.
    pub fn build_with_runtime(&self, runtime: Option<&Vec<RuleSpec>>) -> Result<BuiltPolicy, PolicyError> {
        build_policy(&self.config, runtime, &self.cgroup_root)
    }

    /// Push a policy built for `runtime` to the kernel and make it the current one.
    pub fn commit_runtime(&mut self, runtime: Option<Vec<RuleSpec>>, built: BuiltPolicy) -> Result<(), ControlError> {
        if let Some(dp) = self.datapath.as_mut() {
            dp.apply_policy(&built.image)?;
        }
        tracing::info!("runtime policy now has {} rules", runtime.as_ref().map_or(0, Vec::len));
        self.runtime_rules = runtime;
        self.policy = built;
        Ok(())
    }

    /// Re-resolve the rules' cgroups; when one appeared, disappeared or was
    /// re-created (new id), push the new image. Cheap: one stat per cgroup rule.
    pub fn recheck_cgroups(&mut self) {
        if !self.policy.entries.iter().any(|e| e.spec.cgroup.is_some()) {
            return;
        }
        let built = match build_policy(&self.config, self.runtime_rules.as_ref(), &self.cgroup_root) {
            Ok(b) => b,
            Err(e) => return tracing::debug!("re-checking policy cgroups: {e}"),
        };
        if built.resolved == self.policy.resolved {
            return;
        }
        for (old, new) in self.policy.resolved.iter().zip(&built.resolved).filter(|(o, n)| o != n) {
            let what = new.spec.summary();
            match (&new.inactive, old.inactive.is_some()) {
                (Some(why), _) => tracing::info!("policy rule `{what}` is inactive: {why}"),
                (None, true) => tracing::info!("policy rule `{what}` is active again (its cgroup exists)"),
                (None, false) => tracing::info!("policy rule `{what}`: its cgroup was re-created; following it"),
            }
        }
        if let Some(dp) = self.datapath.as_mut()
            && let Err(e) = dp.apply_policy(&built.image)
        {
            return tracing::warn!("updating the policy for changed cgroups: {e:#}");
        }
        self.policy = built;
    }

    /// Periodic work: follow cgroups, notice a full SOCKHASH (warn at most once a minute).
    pub fn tick(&mut self) {
        self.recheck_cgroups();
        // Fallback for lost netlink events: interfaces that came or went since.
        self.links.refresh();
        let Some(dp) = &self.datapath else { return };
        if let Ok(f) = dp.counter(Counter::InsertFailures)
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

fn log_inactive(p: &BuiltPolicy) {
    for (i, e) in p.entries.iter().enumerate() {
        if let Some(why) = &e.inactive {
            tracing::warn!("policy rule {} (`{}`) is inactive until it exists: {why}", i + 1, e.spec.summary());
        }
    }
}
