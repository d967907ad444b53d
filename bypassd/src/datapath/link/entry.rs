//! One `[[links]]` entry: its pin folder (program, maps, one TCX link per
//! interface), and reconciling it with the interfaces the host has right now.
use super::{ethtool, fdb, ifaces, tcx};
use crate::datapath::pins::{self, map_pin, prog_pin};
use crate::config_links::{LinkSpec, Redirect};
use anyhow::{Context, Result, anyhow};
use aya::{
    EbpfLoader,
    maps::{Array, HashMap, Map, MapData, PerCpuArray},
    programs::SchedClassifier,
};
use bypassd_ebpf::{abi, link as obj};
use std::path::{Path, PathBuf};

/// The program's pin name (`prog_ingress`).
const PROG: &str = "ingress";

/// Where one interface of the entry stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Iface {
    pub name: String,
    /// 0 while the interface does not exist.
    pub ifindex: u32,
    pub attached: bool,
    pub offloads: Option<ethtool::Offloads>,
    /// Its index in the stats map while it is a port of the entry.
    pub slot: Option<u32>,
}

/// The pinned program and maps of an entry.
struct Bpf {
    prog: SchedClassifier,
    ports: HashMap<MapData, u32, abi::LinkPort>,
    fdb: fdb::Fdb,
    stats: PerCpuArray<MapData, abi::LinkStats>,
    control: Array<MapData, u64>,
}

pub struct Entry {
    pub spec: LinkSpec,
    pub dir: PathBuf,
    bpf: Option<Bpf>,
    pub adopted: bool,
    pub ifaces: Vec<Iface>,
    /// Why the entry is not fully attached (empty when it is).
    pub problems: Vec<String>,
    /// Interfaces that do not exist (yet).
    pub missing: Vec<String>,
    /// Bridge mode: the bridge's FDB was copied since the maps were opened and the
    /// last port was attached.
    fdb_synced: bool,
}

/// The entry's folder name under `<pin_dir>/links/` (pins.rs).
pub fn dir_name(spec: &LinkSpec) -> String {
    pins::link_entry_name(if spec.is_bridge() { "bridge" } else { "pair" }, &spec.id())
}

fn open_map(dir: &Path, name: &str) -> Result<Map> {
    let p = map_pin(dir, name);
    let data = MapData::from_pin(&p).with_context(|| format!("opening pinned map {}", p.display()))?;
    Map::from_map_data(data).with_context(|| format!("pinned map {}", p.display()))
}

fn open(dir: &Path) -> Result<Bpf> {
    let prog = SchedClassifier::from_pin(prog_pin(dir, PROG)).with_context(|| format!("opening {}", prog_pin(dir, PROG).display()))?;
    Ok(Bpf {
        prog,
        ports: HashMap::try_from(open_map(dir, obj::maps::PORTS)?)?,
        fdb: HashMap::try_from(open_map(dir, obj::maps::FDB)?)?,
        stats: PerCpuArray::try_from(open_map(dir, obj::maps::STATS)?)?,
        control: Array::try_from(open_map(dir, obj::maps::CONTROL)?)?,
    })
}

/// Load the object and pin program and maps into a scratch folder renamed into
/// place when complete, so a crash half-way never leaves something adoptable.
fn build(dir: &Path) -> Result<()> {
    let parent = dir.parent().context("link pin folder has no parent")?;
    let tmp = parent.join(format!("building-{}", std::process::id()));
    if tmp.exists() {
        remove_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let r = (|| -> Result<()> {
        let mut ebpf = EbpfLoader::new().load(obj::object()).context("loading the link BPF object")?;
        for name in obj::maps::ALL {
            let m = ebpf.map(name).ok_or_else(|| anyhow!("link object has no map {name}"))?;
            m.pin(map_pin(&tmp, name)).with_context(|| format!("pinning map {name}"))?;
        }
        let prog: &mut SchedClassifier = ebpf
            .program_mut(obj::PROGRAM)
            .ok_or_else(|| anyhow!("link object has no program {}", obj::PROGRAM))?
            .try_into()?;
        prog.load().context("loading the link tc program")?;
        prog.pin(prog_pin(&tmp, PROG)).context("pinning the link tc program")?;
        Ok(())
    })();
    if let Err(e) = r {
        let _ = remove_all(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, dir).with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))
}

/// Unpin everything in a folder (TCX links go first: frames return to the kernel path).
pub fn remove_all(dir: &Path) -> Result<()> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .collect();
    files.sort_by_key(|p| p.file_name().and_then(|n| n.to_str()).and_then(pins::tcx_ifname).is_none());
    for p in files {
        std::fs::remove_file(&p).with_context(|| format!("unpinning {}", p.display()))?;
    }
    std::fs::remove_dir(dir).with_context(|| format!("removing {}", dir.display()))
}

/// Pinned TCX links in an entry folder: (interface name, pin path).
fn pinned_links(dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Vec::new() };
    rd.filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            Some((pins::tcx_ifname(&name)?, e.path()))
        })
        .collect()
}

impl Entry {
    pub fn new(spec: LinkSpec, root: &Path) -> Entry {
        let dir = root.join(dir_name(&spec));
        Entry { spec, dir, bpf: None, adopted: false, ifaces: Vec::new(), problems: Vec::new(), missing: Vec::new(), fdb_synced: false }
    }

    /// Open the pinned folder, or build it.
    fn ensure_bpf(&mut self) -> Result<()> {
        if self.bpf.is_some() && prog_pin(&self.dir, PROG).exists() {
            return Ok(());
        }
        self.bpf = None;
        self.fdb_synced = false;
        match open(&self.dir) {
            Ok(b) => {
                self.adopted = true;
                self.bpf = Some(b);
            }
            Err(e) => {
                if self.dir.exists() {
                    tracing::warn!("link pins {} are incomplete ({e:#}); rebuilding them", self.dir.display());
                    retire_dir(&self.dir)?;
                }
                build(&self.dir)?;
                self.adopted = false;
                self.bpf = Some(open(&self.dir)?);
            }
        }
        Ok(())
    }

    /// The interfaces this entry should be attached to now, and notes on skipped ones.
    fn wanted(&self, host: &ifaces::Host, claimed: &[String]) -> (Vec<String>, Vec<String>, Vec<String>) {
        let mut notes = Vec::new();
        let mut missing = Vec::new();
        if let Some(p) = &self.spec.pair {
            let names: Vec<String> = p.get_ref().iter().map(|n| n.get_ref().0.clone()).collect();
            missing.extend(names.iter().filter(|n| host.ifindex(n).is_none()).cloned());
            return (names, missing, notes);
        }
        let br = self.spec.bridge_name().unwrap_or_default().to_string();
        if host.ifindex(&br).is_none() {
            missing.push(br);
            return (Vec::new(), missing, notes);
        }
        if !host.is_bridge(&br) {
            notes.push(format!("{br} is not a bridge"));
            return (Vec::new(), missing, notes);
        }
        let mut ports = host.bridge_ports(&br);
        ports.retain(|p| {
            let mine = claimed.contains(p);
            if mine {
                notes.push(format!("port {p} is skipped: it is one side of a configured pair"));
            }
            !mine
        });
        (ports, missing, notes)
    }

    /// Bring the pins and maps in line with the host: attach interfaces that are
    /// there, drop links whose device is gone (fdinfo ifindex 0) or that left the
    /// entry, and fill the port map. Never touches a link that is not ours.
    pub fn refresh(&mut self, host: &ifaces::Host, claimed: &[String]) {
        self.problems.clear();
        if let Err(e) = self.ensure_bpf() {
            self.problems.push(format!("{e:#}"));
            self.ifaces.clear();
            return;
        }
        let (names, missing, notes) = self.wanted(host, claimed);
        self.missing = missing;
        self.problems.extend(notes);
        if let Err(e) = self.reconcile(host, &names) {
            self.problems.push(format!("{e:#}"));
        }
    }

    fn reconcile(&mut self, host: &ifaces::Host, names: &[String]) -> Result<()> {
        let spec = self.spec.clone();
        let dir = self.dir.clone();
        let bpf = self.bpf.as_mut().context("link maps are not open")?;
        let old: Vec<(u32, abi::LinkPort)> = bpf.ports.iter().collect::<Result<_, _>>().context("reading the port map")?;

        // Stale or unwanted links first.
        for (name, pin) in pinned_links(&dir) {
            let now = host.ifindex(&name);
            let pinned = tcx::pinned_ifindex(&pin).unwrap_or(0);
            let keep = names.contains(&name) && pinned != 0 && Some(pinned) == now;
            if keep {
                continue;
            }
            if pinned == 0 {
                tracing::info!("link {}: {name} was deleted; removing its stale pin", spec.id());
            } else if Some(pinned) == now
                && let Some((_, port)) = old.iter().find(|(i, _)| *i == pinned)
            {
                restore_offloads(&name, port.offload);
            }
            std::fs::remove_file(&pin).with_context(|| format!("unpinning {}", pin.display()))?;
        }

        let mut ifs = Vec::new();
        for name in names {
            let Some(ifindex) = host.ifindex(name) else {
                ifs.push(Iface { name: name.clone(), ifindex: 0, attached: false, offloads: None, slot: None });
                continue;
            };
            let pin = pins::tcx_pin(&dir, name);
            let mut attached = pin.exists();
            if !attached {
                match tcx::attach(&mut bpf.prog, name, &pin) {
                    Ok(()) => {
                        tracing::info!("link {}: attached to {name} (ifindex {ifindex})", spec.id());
                        attached = true;
                        self.fdb_synced = false;
                    }
                    Err(e) => self.problems.push(format!("{e:#}")),
                }
            }
            ifs.push(Iface { name: name.clone(), ifindex, attached, offloads: None, slot: None });
        }

        // Port map: slots kept per ifindex, originals of changed offloads kept with them.
        let present: Vec<&Iface> = ifs.iter().filter(|i| i.attached).collect();
        let mut used: Vec<u32> = old.iter().filter(|(i, _)| present.iter().any(|p| p.ifindex == *i)).map(|(_, p)| p.slot).collect();
        let mut ports = Vec::new();
        for i in &present {
            let prev = old.iter().find(|(k, _)| *k == i.ifindex).map(|(_, p)| *p);
            let slot = match prev {
                Some(p) => p.slot,
                None => {
                    // A slot no port has counted in yet, so a new port's counters start at 0.
                    let free = || (0..abi::BL_MAX_PORTS).filter(|s| !used.contains(s));
                    let unused = |s: &u32| bpf.stats.get(s, 0).is_ok_and(|v| v.iter().all(|c| c.redirected_frames == 0 && c.passed_frames == 0));
                    let s = free().find(unused).or_else(|| free().next()).context("too many ports in one link entry")?;
                    used.push(s);
                    s
                }
            };
            let mut flags = if spec.is_bridge() { abi::BL_PORT_BRIDGE } else { 0 };
            if spec.redirect == Redirect::Auto && host.veth_peer_elsewhere(&i.name) {
                flags |= abi::BL_PORT_PEER;
            }
            let offload = prev.map_or(0, |p| p.offload);
            ports.push((i.ifindex, abi::LinkPort { target: 0, slot, flags, offload }));
        }
        if !spec.is_bridge() && ports.len() == 2 {
            let (a, b) = (ports[0].0, ports[1].0);
            ports[0].1.target = b;
            ports[1].1.target = a;
        }
        // Offloads: remember the original once per ifindex, then apply and read back.
        let want = spec.checksum_offload;
        for (ifindex, port) in &mut ports {
            let name = &present.iter().find(|p| p.ifindex == *ifindex).map(|p| p.name.clone()).unwrap_or_default();
            if let Err(e) = save_and_apply(name, port, want.rx.wanted(), want.tx.wanted(), &mut self.problems) {
                self.problems.push(format!("{e:#}"));
            }
        }
        // Destinations go in before the sources that point at them.
        ports.sort_by_key(|(_, p)| p.target != 0);
        for (ifindex, port) in &ports {
            bpf.ports.insert(ifindex, port, 0).context("writing the port map")?;
        }
        for (ifindex, _) in &old {
            if !ports.iter().any(|(i, _)| i == ifindex) {
                let _ = bpf.ports.remove(ifindex);
            }
        }
        if spec.is_bridge() {
            bpf.control.set(abi::BL_CTL_AGEING_NS, host.ageing_ns(spec.bridge_name().unwrap_or_default()), 0)?;
            // FDB entries pointing at ports that are gone would only ever pass; drop them.
            let stale: Vec<abi::LinkMac> = bpf
                .fdb
                .iter()
                .filter_map(|r| r.ok())
                .filter(|(_, e)| !ports.iter().any(|(i, _)| *i == e.ifindex))
                .map(|(k, _)| k)
                .collect();
            for k in stale {
                let _ = bpf.fdb.remove(&k);
            }
            if !self.fdb_synced {
                let ifs: Vec<u32> = ports.iter().map(|(i, _)| *i).collect();
                match fdb::sync(&mut bpf.fdb, &ifs) {
                    Ok(n) => {
                        tracing::info!("link {}: {n} MACs taken from the bridge's FDB", spec.id());
                        self.fdb_synced = true;
                    }
                    Err(e) => tracing::warn!("link {}: reading the bridge's FDB: {e:#} (MACs are learned from frames meanwhile)", spec.id()),
                }
            }
        }
        for i in &mut ifs {
            if i.ifindex != 0 {
                i.offloads = ethtool::read(&i.name).ok();
            }
            i.slot = ports.iter().find(|(k, _)| *k == i.ifindex).map(|(_, p)| p.slot);
        }
        self.ifaces = ifs;
        Ok(())
    }

    /// Follow the bridge's FDB (netlink events, fdb::update).
    pub fn fdb_update(&mut self, mac: [u8; 6], ifindex: u32, gone: bool) {
        let Some(bpf) = self.bpf.as_mut() else { return };
        let is_port = bpf.ports.get(&ifindex, 0).is_ok();
        if let Err(e) = fdb::update(&mut bpf.fdb, is_port, mac, ifindex, gone) {
            tracing::debug!("link {}: FDB update: {e}", self.spec.id());
        }
    }

    /// Frames and bytes redirected and passed, summed over ports and CPUs (ports
    /// that left the entry included, so the totals never go down).
    pub fn stats(&self) -> abi::LinkStats {
        let mut t = abi::LinkStats::default();
        for slot in 0..abi::BL_MAX_PORTS {
            add(&mut t, &self.slot_stats(slot));
        }
        t
    }

    /// The counters of one port (stats slot), summed over CPUs.
    pub fn slot_stats(&self, slot: u32) -> abi::LinkStats {
        let mut t = abi::LinkStats::default();
        if let Some(v) = self.bpf.as_ref().and_then(|b| b.stats.get(&slot, 0).ok()) {
            for s in v.iter() {
                add(&mut t, s);
            }
        }
        t
    }

    /// Detach from every interface, put changed offloads back, remove the pins.
    pub fn retire(&mut self) -> Result<()> {
        self.bpf = None;
        retire_dir(&self.dir)
    }
}

fn add(t: &mut abi::LinkStats, s: &abi::LinkStats) {
    t.redirected_frames += s.redirected_frames;
    t.redirected_bytes += s.redirected_bytes;
    t.passed_frames += s.passed_frames;
    t.passed_bytes += s.passed_bytes;
}

/// Retire one pinned entry folder (ours, possibly left by an earlier configuration).
pub fn retire_dir(dir: &Path) -> Result<()> {
    let ports: Vec<(u32, abi::LinkPort)> = open(dir).map(|b| b.ports.iter().filter_map(|r| r.ok()).collect()).unwrap_or_default();
    for (name, pin) in pinned_links(dir) {
        let pinned = tcx::pinned_ifindex(&pin).unwrap_or(0);
        std::fs::remove_file(&pin).with_context(|| format!("unpinning {}", pin.display()))?;
        if pinned != 0
            && ifaces::ifindex(&name) == Some(pinned)
            && let Some((_, p)) = ports.iter().find(|(i, _)| *i == pinned)
        {
            restore_offloads(&name, p.offload);
        }
    }
    if dir.exists() {
        remove_all(dir)?;
    }
    Ok(())
}

/// Remember the original offloads once per interface, then apply what is asked. A
/// feature back at "keep" after bypassd changed it gets its original again, once;
/// then bypassd stops managing it.
fn save_and_apply(name: &str, port: &mut abi::LinkPort, rx: Option<bool>, tx: Option<bool>, problems: &mut Vec<String>) -> Result<()> {
    let managed = |bit: u32| port.offload & bit != 0;
    if rx.is_none() && tx.is_none() && !managed(abi::BL_OFF_RX_SAVED) && !managed(abi::BL_OFF_TX_SAVED) {
        return Ok(());
    }
    let now = ethtool::read(name)?;
    let mut want = [(rx, abi::BL_OFF_RX_SAVED, abi::BL_OFF_RX_ON, now.rx), (tx, abi::BL_OFF_TX_SAVED, abi::BL_OFF_TX_ON, now.tx)]
        .map(|(want, saved, on, cur)| match want {
            Some(w) => {
                if port.offload & saved == 0 {
                    port.offload |= saved | if cur { on } else { 0 };
                }
                Some(w)
            }
            None if port.offload & saved != 0 => {
                let orig = port.offload & on != 0;
                port.offload &= !(saved | on);
                Some(orig)
            }
            None => None,
        });
    // Only what differs from now.
    want[0] = want[0].filter(|&w| w != now.rx);
    want[1] = want[1].filter(|&w| w != now.tx);
    if want.iter().all(Option::is_none) {
        return Ok(());
    }
    let (after, why) = ethtool::apply(name, want[0], want[1])?;
    // A refused change is retried every refresh: log it once, as a change.
    if after != now {
        tracing::info!("{name}: checksum offloads now {}", after.describe());
    }
    problems.extend(why);
    Ok(())
}

/// Put back the offloads found before bypassd changed them.
pub fn restore_offloads(name: &str, saved: u32) {
    let rx = (saved & abi::BL_OFF_RX_SAVED != 0).then_some(saved & abi::BL_OFF_RX_ON != 0);
    let tx = (saved & abi::BL_OFF_TX_SAVED != 0).then_some(saved & abi::BL_OFF_TX_ON != 0);
    if rx.is_none() && tx.is_none() {
        return;
    }
    match ethtool::apply(name, rx, tx) {
        Ok((now, why)) => {
            tracing::info!("{name}: checksum offloads restored: {}", now.describe());
            for w in why {
                tracing::warn!("{name}: restoring offloads: {w}");
            }
        }
        Err(e) => tracing::warn!("{name}: restoring offloads: {e:#}"),
    }
}
