//! The link datapath: tc ingress programs (TCX) that carry VM and container frames
//! between a tap and a veth (`pair`) or between the ports of a bridge (`bridge`),
//! skipping the bridge. Independent of the socket datapath; its pins live under
//! `<pin_dir>/links/<entry>/`, so frames keep flowing while bypassd is stopped, and
//! a restart adopts them.
//!
//! Lifecycle: `configure` at start and reload, `refresh` when netlink reports a
//! link or FDB change (watch.rs) and on every daemon tick as a fallback.
pub mod entry;
pub mod ethtool;
pub mod fdb;
pub mod ifaces;
pub mod netns;
pub mod nl;
pub mod tcx;
pub mod watch;

use crate::config_links::LinkSpec;
use anyhow::{Context, Result};
use bypassd_api as api;
use entry::Entry;
use std::path::{Path, PathBuf};

pub use super::pins::links_root as root;

#[derive(Default)]
pub struct Links {
    root: Option<PathBuf>,
    entries: Vec<Entry>,
}

impl Links {
    /// Make the pinned entries match `specs`: adopt what is pinned, build what is
    /// missing, retire entries no longer configured (restoring their offloads).
    pub fn configure(&mut self, pin_dir: &Path, specs: &[LinkSpec]) -> Result<()> {
        let root = root(pin_dir);
        if let Some(old) = &self.root
            && *old != root
        {
            retire_root(old)?;
            self.entries.clear();
        }
        let mut old = std::mem::take(&mut self.entries);
        let mut entries = Vec::new();
        for s in specs {
            let fresh = Entry::new(s.clone(), &root);
            let e = match old.iter().position(|e| e.dir == fresh.dir) {
                Some(i) => {
                    let mut e = old.swap_remove(i);
                    e.spec = s.clone();
                    e
                }
                None => fresh,
            };
            entries.push(e);
        }
        // Entries that left the config and live in another netns: their offloads are
        // put back from inside it (the loop below would look in bypassd's own).
        for e in &old {
            if let Some(ns) = e.spec.netns_path() {
                let d = e.dir.clone();
                retire_in(Some(ns), &d);
            }
        }
        if !specs.is_empty() {
            std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        }
        // Anything else pinned there is a former entry of ours.
        let keep: Vec<PathBuf> = entries.iter().map(|e| e.dir.clone()).collect();
        if let Ok(rd) = std::fs::read_dir(&root) {
            for d in rd.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_dir() && !keep.contains(p)) {
                tracing::info!("retiring link pins {} (no longer configured)", d.display());
                entry::retire_dir(&d)?;
            }
        }
        self.root = Some(root.clone());
        self.entries = entries;
        self.refresh();
        if specs.is_empty() && root.exists() {
            let _ = std::fs::remove_dir(&root);
        }
        for e in &self.entries {
            let (state, reason) = state(e);
            let how = if e.adopted { "adopted" } else { "set up" };
            tracing::info!("link {} {how}: {state}{}", e.spec.id(), if reason.is_empty() { String::new() } else { format!(" ({reason})") });
            if !e.missing.is_empty() {
                tracing::warn!("link {}: {} missing; attached when it appears", e.spec.id(), e.missing.join(", "));
            }
        }
        Ok(())
    }

    /// Re-check every entry against the interfaces of its netns (each netns read
    /// once, on a thread inside it when it is not bypassd's own).
    pub fn refresh(&mut self) {
        let mut spaces: Vec<Option<String>> = Vec::new();
        for e in &self.entries {
            let ns = e.spec.netns_path().map(String::from);
            if !spaces.contains(&ns) {
                spaces.push(ns);
            }
        }
        for ns in spaces {
            let ns = ns.as_deref();
            // A bridge port that is also one side of a pair (in the same netns) stays the pair's.
            let claimed: Vec<String> = self
                .entries
                .iter()
                .filter(|e| !e.spec.is_bridge() && e.spec.netns_path() == ns)
                .flat_map(|e| e.spec.interfaces().into_iter().map(String::from))
                .collect();
            let mut group: Vec<&mut Entry> = self.entries.iter_mut().filter(|e| e.spec.netns_path() == ns).collect();
            let before: Vec<_> = group.iter().map(|e| (e.missing.clone(), e.problems.clone())).collect();
            let r = netns::run_in(ns, || -> Result<()> {
                let host = ifaces::Host::read().context("listing interfaces")?;
                for e in group.iter_mut() {
                    e.refresh(&host, &claimed);
                }
                Ok(())
            });
            let why = match r {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some((Vec::new(), format!("{e:#}"))),
                Err(netns::Error::Missing(p)) => Some((vec![format!("netns {p}")], String::new())),
                Err(netns::Error::Other(e)) => Some((Vec::new(), format!("{e:#}"))),
            };
            if let Some((missing, problem)) = why {
                for e in group.iter_mut() {
                    e.missing.clone_from(&missing);
                    e.problems = if problem.is_empty() { Vec::new() } else { vec![problem.clone()] };
                }
            } else if let Some(p) = ns
                && let Err(e) = watch::watch_netns(p)
            {
                tracing::warn!("link datapath: {e:#}; netns {p} is re-checked every tick");
            }
            for (e, b) in group.iter().zip(before) {
                if (e.missing.clone(), e.problems.clone()) != b {
                    let (state, reason) = state(e);
                    tracing::info!("link {}: {state}{}", e.spec.id(), if reason.is_empty() { String::new() } else { format!(" ({reason})") });
                }
            }
        }
    }

    /// A bridge FDB change from netlink in netns `netns` (None: bypassd's own): the
    /// MAC was seen on port `ifindex`, or the bridge forgot it there.
    pub fn fdb_update(&mut self, netns: Option<&str>, mac: [u8; 6], ifindex: u32, gone: bool) {
        for e in self.entries.iter_mut().filter(|e| e.spec.is_bridge() && e.spec.netns_path() == netns) {
            e.fdb_update(mac, ifindex, gone);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn summary(&self) -> String {
        let attached = self.entries.iter().filter(|e| state(e).0 == "attached").count();
        format!("{attached}/{} links attached", self.entries.len())
    }

    pub fn status(&self) -> Vec<api::LinkStatus> {
        self.entries
            .iter()
            .map(|e| {
                let (state, reason) = state(e);
                api::LinkStatus {
                    name: e.spec.id(),
                    mode: if e.spec.is_bridge() { "bridge".into() } else { "pair".into() },
                    state: state.into(),
                    reason,
                    netns: e.spec.netns_path().unwrap_or_default().into(),
                    interfaces: e
                        .ifaces
                        .iter()
                        .map(|i| {
                            let s = i.slot.map(|n| e.slot_stats(n)).unwrap_or_default();
                            api::LinkInterface {
                                name: i.name.clone(),
                                ifindex: i.ifindex,
                                attached: i.attached,
                                offloads: i.offloads.map(|o| o.describe()).unwrap_or_default(),
                                redirected_frames: s.redirected_frames,
                                redirected_bytes: s.redirected_bytes,
                                passed_frames: s.passed_frames,
                                passed_bytes: s.passed_bytes,
                            }
                        })
                        .collect(),
                }
            })
            .collect()
    }

    /// Each entry's counters (summed over its ports and CPUs) and each current port's.
    pub fn entry_stats(&self) -> Vec<EntryStats> {
        self.entries
            .iter()
            .map(|e| EntryStats {
                name: e.spec.id(),
                total: e.stats(),
                ports: e.ifaces.iter().filter_map(|i| Some((i.name.clone(), e.slot_stats(i.slot?)))).collect(),
            })
            .collect()
    }

    /// Counters per entry, `link.<name>.redirected_frames` and so on, and per port,
    /// `link.<name>.port.<interface>.redirected_frames`.
    pub fn stats(&self) -> Vec<(String, u64)> {
        let mut v = Vec::new();
        for es in self.entry_stats() {
            let rows = std::iter::once((format!("link.{}", es.name), es.total))
                .chain(es.ports.iter().map(|(p, s)| (format!("link.{}.port.{p}", es.name), *s)));
            for (prefix, s) in rows {
                for (k, n) in [
                    ("redirected_frames", s.redirected_frames),
                    ("redirected_bytes", s.redirected_bytes),
                    ("passed_frames", s.passed_frames),
                    ("passed_bytes", s.passed_bytes),
                ] {
                    v.push((format!("{prefix}.{k}"), n));
                }
            }
        }
        v
    }
}

/// One entry's counters: in all, and per current port (interface name).
#[derive(Debug, Clone, Default)]
pub struct EntryStats {
    pub name: String,
    pub total: bypassd_ebpf::abi::LinkStats,
    pub ports: Vec<(String, bypassd_ebpf::abi::LinkStats)>,
}

/// "attached", "pending" (an interface is missing) or "degraded" (something failed), and why.
fn state(e: &Entry) -> (&'static str, String) {
    if !e.problems.is_empty() {
        let mut why = e.problems.clone();
        if !e.missing.is_empty() {
            why.push(format!("missing: {}", e.missing.join(", ")));
        }
        return ("degraded", why.join("; "));
    }
    if !e.missing.is_empty() {
        return ("pending", format!("waiting for {}", e.missing.join(", ")));
    }
    ("attached", String::new())
}

fn retire_root(root: &Path) -> Result<usize> {
    let Ok(rd) = std::fs::read_dir(root) else { return Ok(0) };
    let dirs: Vec<PathBuf> = rd.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_dir()).collect();
    for d in &dirs {
        entry::retire_dir(d)?;
    }
    std::fs::remove_dir(root).with_context(|| format!("removing {}", root.display()))?;
    Ok(dirs.len())
}

/// Retire a pinned entry folder from inside netns `ns` (where its interfaces are).
/// A netns that is gone takes its interfaces with it: the pins are removed anyway.
fn retire_in(ns: Option<&str>, dir: &Path) {
    let r = match netns::run_in(ns, || entry::retire_dir(dir)) {
        Ok(r) => r,
        Err(netns::Error::Missing(_)) => entry::retire_dir(dir),
        Err(netns::Error::Other(e)) => Err(e),
    };
    if let Err(e) = r {
        tracing::warn!("retiring link pins {}: {e:#}", dir.display());
    }
}

/// Remove every pinned link entry (`bypassd --detach`): frames return to the
/// kernel path (the bridge), changed offloads are put back (entries of `specs` in
/// their netns). Returns how many.
pub fn retire_all(pin_dir: &Path, specs: &[LinkSpec]) -> Result<usize> {
    let r = root(pin_dir);
    if !r.exists() {
        return Ok(0);
    }
    for s in specs.iter().filter(|s| s.netns_path().is_some()) {
        let d = r.join(entry::dir_name(s));
        if d.exists() {
            retire_in(s.netns_path(), &d);
        }
    }
    retire_root(&r)
}
