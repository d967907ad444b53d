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
pub mod ifaces;
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

    /// Re-check every entry against the host's interfaces.
    pub fn refresh(&mut self) {
        if self.entries.is_empty() {
            return;
        }
        let claimed: Vec<String> = self
            .entries
            .iter()
            .filter(|e| !e.spec.is_bridge())
            .flat_map(|e| e.spec.interfaces().into_iter().map(String::from))
            .collect();
        let host = match ifaces::Host::read() {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!("link datapath: cannot list interfaces: {e:#}");
                return;
            }
        };
        for e in &mut self.entries {
            let before = (e.missing.clone(), e.problems.clone());
            e.refresh(&host, &claimed);
            if (e.missing.clone(), e.problems.clone()) != before {
                let (state, reason) = state(e);
                tracing::info!("link {}: {state}{}", e.spec.id(), if reason.is_empty() { String::new() } else { format!(" ({reason})") });
            }
        }
    }

    /// A bridge FDB change from netlink: the MAC was seen on port `ifindex`, or the
    /// bridge forgot it there.
    pub fn fdb_update(&mut self, mac: [u8; 6], ifindex: u32, gone: bool) {
        for e in self.entries.iter_mut().filter(|e| e.spec.is_bridge()) {
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
                    interfaces: e
                        .ifaces
                        .iter()
                        .map(|i| api::LinkInterface {
                            name: i.name.clone(),
                            ifindex: i.ifindex,
                            attached: i.attached,
                            offloads: i.offloads.map(|o| o.describe()).unwrap_or_default(),
                        })
                        .collect(),
                }
            })
            .collect()
    }

    /// Each entry's name and counters (summed over its ports and CPUs).
    pub fn entry_stats(&self) -> Vec<(String, bypassd_ebpf::abi::LinkStats)> {
        self.entries.iter().map(|e| (e.spec.id(), e.stats())).collect()
    }

    /// Counters per entry: `link.<name>.redirected_frames` and so on.
    pub fn stats(&self) -> Vec<(String, u64)> {
        let mut v = Vec::new();
        for (id, s) in self.entry_stats() {
            for (k, n) in [
                ("redirected_frames", s.redirected_frames),
                ("redirected_bytes", s.redirected_bytes),
                ("passed_frames", s.passed_frames),
                ("passed_bytes", s.passed_bytes),
            ] {
                v.push((format!("link.{id}.{k}"), n));
            }
        }
        v
    }
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

/// Remove every pinned link entry (`bypassd --detach`): frames return to the
/// kernel path (the bridge), changed offloads are put back. Returns how many.
pub fn retire_all(pin_dir: &Path) -> Result<usize> {
    let r = root(pin_dir);
    if !r.exists() {
        return Ok(0);
    }
    retire_root(&r)
}
