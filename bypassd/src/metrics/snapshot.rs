//! What one scrape reports, copied from the daemon in one short lock.
use crate::{control::Control, policy::RuleSource};
use bypassd_ebpf::abi::Counter;
use std::path::PathBuf;

#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// "attached", "detached" or "degraded" (api::state).
    pub state: String,
    pub reason: String,
    pub paused: bool,
    /// Counters summed over CPUs; empty when no datapath is pinned.
    pub counters: Vec<(Counter, u64)>,
    /// Sockets in the SOCKHASH now; None when it could not be read.
    pub accelerated_sockets: Option<u64>,
    pub reloads: u64,
    pub reloads_failed: u64,
    pub rules_runtime: u64,
    pub rules_config: u64,
    /// Each [[links]] entry's name (from the config: bounded) and counters, in all and per port.
    pub links: Vec<crate::datapath::link::EntryStats>,
}

impl Snapshot {
    /// Copy the daemon's state (short reads of the state lock), then read the pinned
    /// maps without any lock.
    pub fn take(control: &Control) -> Snapshot {
        let status = control.status();
        let (_, rules) = control.policy_list();
        let pin_dir = PathBuf::from(&status.pin_dir);
        let count = |s: RuleSource| rules.iter().filter(|e| e.source == s).count() as u64;
        let (reloads, reloads_failed) = super::reloads();
        let mut snap = Snapshot {
            paused: status.paused,
            state: status.state,
            reason: status.reason,
            reloads,
            reloads_failed,
            rules_runtime: count(RuleSource::Runtime),
            rules_config: count(RuleSource::Config),
            links: control.link_stats(),
            ..Snapshot::default()
        };
        if snap.state != bypassd_api::state::DETACHED
            && let Ok(dp) = crate::datapath::Datapath::open_pinned(&pin_dir)
        {
            snap.counters = dp.counters().unwrap_or_default();
            // A pair lists as one connection; an unpaired entry is one socket.
            snap.accelerated_sockets =
                dp.connections().ok().map(|c| c.iter().map(|c| if c.paired { 2 } else { 1 }).sum());
        }
        snap
    }

    pub fn counter(&self, c: Counter) -> u64 {
        self.counters.iter().find(|(k, _)| *k == c).map_or(0, |(_, v)| *v)
    }

    /// `/healthz`: healthy when the datapath is attached as configured.
    pub fn health(&self) -> Result<String, String> {
        if self.state == bypassd_api::state::ATTACHED {
            Ok(if self.paused { "ok: attached (paused)".into() } else { "ok: attached".into() })
        } else if self.reason.is_empty() {
            Err(self.state.clone())
        } else {
            Err(format!("{}: {}", self.state, self.reason.replace('\n', " ")))
        }
    }
}
