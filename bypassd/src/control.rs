//! The handle the composition root gives the control interface (and uses itself):
//! every read and write of the daemon goes through [`Control`].
//!
//! Two locks keep readers fast while a write is slow: writers (reload, pause,
//! policy edits, the periodic re-check) take `writer` for their whole run, and the
//! state lock only for the quick steps (copying inputs, committing). Reading the
//! config, building a datapath and fsyncing the runtime policy happen with the
//! state unlocked, so `GetStatus` answers while a reload builds. Every method here
//! blocks: the D-Bus layer calls them off its executor.
pub use crate::daemon::{ControlError, PolicyEntry};
use crate::{
    daemon::{self, Daemon},
    notify,
    policy::{self, Action, RuleSource, RuleSpec},
};
use bypassd_api as api;
use std::sync::{Arc, Mutex, MutexGuard};

#[derive(Clone)]
pub struct Control {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<Daemon>,
    writer: Mutex<()>,
    /// Why the D-Bus control interface is unavailable, when it is (status line).
    bus_unavailable: Mutex<Option<String>>,
}

/// A panic while holding a lock must not take the control plane down with it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn persist(state_dir: &std::path::Path, rules: Option<&Vec<RuleSpec>>) -> anyhow::Result<()> {
    match rules {
        Some(r) => policy::runtime::save(state_dir, r),
        None => policy::runtime::remove(state_dir).map(|_| ()),
    }
}

impl Control {
    pub fn new(daemon: Daemon) -> Control {
        Control {
            inner: Arc::new(Inner {
                state: Mutex::new(daemon),
                writer: Mutex::new(()),
                bus_unavailable: Mutex::new(None),
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, Daemon> {
        lock(&self.inner.state)
    }

    fn writer(&self) -> MutexGuard<'_, ()> {
        lock(&self.inner.writer)
    }

    // --- reads: the state lock only, never behind a slow write ---

    pub fn status(&self) -> api::Status {
        self.state().status()
    }

    pub fn stats(&self) -> Result<api::Stats, ControlError> {
        self.state().stats()
    }

    pub fn connections(&self) -> Result<Vec<crate::datapath::Connection>, ControlError> {
        self.state().connections()
    }

    pub fn links(&self) -> Vec<api::LinkStatus> {
        self.state().links()
    }

    pub fn link_stats(&self) -> Vec<crate::datapath::link::EntryStats> {
        self.state().link_stats()
    }

    /// Netlink events for the link datapath (from the watcher thread).
    pub fn link_events(&self, evs: Vec<crate::datapath::link::watch::Event>) {
        let _w = self.writer();
        self.state().link_events(evs);
    }

    pub fn policy_list(&self) -> (Action, Vec<PolicyEntry>) {
        let d = self.state();
        (d.policy_default(), d.policy_list().to_vec())
    }

    pub fn policy_sha256(&self) -> String {
        self.state().policy_sha256()
    }

    /// The systemd status line: the daemon's summary and the bus's availability.
    pub fn summary(&self) -> String {
        let s = self.state().summary();
        match lock(&self.inner.bus_unavailable).clone() {
            Some(why) => format!("{s}; D-Bus control interface unavailable: {why}"),
            None => s,
        }
    }

    pub fn set_bus_unavailable(&self, why: Option<String>) {
        *lock(&self.inner.bus_unavailable) = why;
    }

    // --- writes ---

    /// Re-read the config; on any error keep everything as it was (and log why).
    /// Tells systemd (RELOADING=1 with MONOTONIC_USEC, then READY=1), whoever asked.
    pub fn reload(&self) -> Result<(), ControlError> {
        notify::reloading();
        let r = {
            let _w = self.writer();
            let inputs = self.state().reload_inputs();
            daemon::prepare_reload(inputs).and_then(|plan| self.state().commit_reload(plan))
        };
        crate::metrics::record_reload(r.is_ok());
        // Logged before READY=1: whoever waits for it finds the reason in the journal.
        if let Err(e) = &r {
            tracing::error!("reload failed, keeping the running configuration: {e}");
        }
        notify::ready(&self.summary());
        r
    }

    pub fn set_paused(&self, paused: bool) -> Result<bool, ControlError> {
        let _w = self.writer();
        self.state().set_paused(paused)
    }

    pub fn detach(&self) -> Result<(), ControlError> {
        let _w = self.writer();
        self.state().detach()
    }

    /// Replace the runtime layer with what `edit` makes of it: validate, persist
    /// (fsync, state unlocked), then push to the kernel; nothing changes on error.
    /// Returns whether anything changed.
    fn edit_runtime<T>(
        &self,
        edit: impl FnOnce(&Daemon) -> Result<(Option<Vec<RuleSpec>>, T), ControlError>,
    ) -> Result<(bool, T), ControlError> {
        let _w = self.writer();
        let (new, out, built, old, state_dir) = {
            let d = self.state();
            let (new, out) = edit(&d)?;
            if new.as_ref() == d.runtime_rules() {
                return Ok((false, out));
            }
            let built = d.build_with_runtime(new.as_ref())?;
            built.refuse_new_inactive(d.runtime_rules())?;
            (new.clone(), out, built, d.runtime_rules().cloned(), d.state_dir())
        };
        persist(&state_dir, new.as_ref())?;
        let pushed = self.state().commit_runtime(new, built);
        if let Err(e) = pushed {
            // Keep file and kernel in step: put the old layer back.
            let _ = persist(&state_dir, old.as_ref());
            return Err(e);
        }
        Ok((true, out))
    }

    /// Insert a runtime rule given as TOML at 1-based `position` among the runtime
    /// rules (None = last); returns its index.
    pub fn policy_add(&self, rule_toml: &str, position: Option<u32>) -> Result<u32, ControlError> {
        self.edit_runtime(|d| {
            let mut rules = d.runtime_rules().cloned().unwrap_or_default();
            let (pos, label) = match position {
                Some(p) => (p as usize, format!("new rule at position {p}")),
                None => (rules.len() + 1, format!("new rule {}", rules.len() + 1)),
            };
            let spec = policy::diag::parse_rule(rule_toml, &label)?;
            if pos == 0 || pos > rules.len() + 1 {
                return Err(ControlError::InvalidArgument(format!(
                    "position {pos} is out of range 1-{} (runtime rules)",
                    rules.len() + 1
                )));
            }
            rules.insert(pos - 1, spec);
            Ok((Some(rules), pos as u32))
        })
        .map(|(_, pos)| pos)
    }

    /// Remove the effective rule at 1-based `index`; config rules cannot be removed here.
    pub fn policy_remove(&self, index: u32) -> Result<(), ControlError> {
        self.edit_runtime(|d| {
            let list = d.policy_list();
            let i = index as usize;
            let Some(e) = i.checked_sub(1).and_then(|i| list.get(i)) else {
                return Err(ControlError::InvalidArgument(format!("no rule {index} (there are {})", list.len())));
            };
            if e.source == RuleSource::Config {
                return Err(ControlError::InvalidArgument(format!(
                    "rule {index} comes from {}; edit it there and reload",
                    d.config_path().display()
                )));
            }
            let mut rules = d.runtime_rules().cloned().unwrap_or_default();
            rules.remove(i - 1);
            Ok((Some(rules), ()))
        })
        .map(|_| ())
    }

    /// Replace the runtime layer with the `[[rules]]` of a TOML document.
    pub fn policy_apply(&self, doc: &str) -> Result<bool, ControlError> {
        let rules = policy::diag::parse_rules_doc(doc)?;
        self.edit_runtime(|_| Ok((Some(rules), ()))).map(|(c, _)| c)
    }

    /// What `policy_apply(doc)` would do, changing nothing: whether the runtime layer
    /// would change (after the same validation `edit_runtime` makes), the runtime rules
    /// now and the ones it would set. Keep in step with `edit_runtime`.
    pub fn policy_diff(&self, doc: &str) -> Result<(bool, Vec<PolicyEntry>, Vec<PolicyEntry>), ControlError> {
        let rules = Some(policy::diag::parse_rules_doc(doc)?);
        let d = self.state();
        let runtime = |v: &[PolicyEntry]| v.iter().filter(|e| e.source == RuleSource::Runtime).cloned().collect::<Vec<_>>();
        let current = runtime(d.policy_list());
        if rules.as_ref() == d.runtime_rules() {
            return Ok((false, current.clone(), current));
        }
        let built = d.build_with_runtime(rules.as_ref())?;
        built.refuse_new_inactive(d.runtime_rules())?;
        Ok((true, current, runtime(&built.entries)))
    }

    /// Drop the runtime layer; returns whether there was one.
    pub fn policy_reset(&self) -> Result<bool, ControlError> {
        self.edit_runtime(|_| Ok((None, ()))).map(|(c, _)| c)
    }

    /// Periodic work; skipped while a write runs (the next tick does it).
    pub fn tick(&self) {
        let _w = match self.inner.writer.try_lock() {
            Ok(w) => w,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return,
        };
        self.state().tick();
    }
}
