//! Load, attach, pin and adopt the datapath.
//!
//! Everything lives under the pin directory in one *generation* directory (layout and
//! names in [`pins`]). Restart adopts the generation that matches; a change builds a
//! new one beside it, attaches it, then retires the old one by unpinning. Unpinning
//! never evicts a socket: old connections keep their program and map until they
//! close, so no byte is lost (a deleted or overwritten SOCKHASH entry would drop the
//! receiver's unread data, which is why nothing here deletes).
//!
//! The programs are described once, in a table ([`sock::PROGRAMS`]); building,
//! adopting and status iterate it ([`hooks`]).
pub mod hooks;
pub mod link;
pub mod pins;
pub mod promote;
pub mod sock;
mod sockopt_link;

use anyhow::{Context, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, PerCpuArray, SockHash},
};
use bypassd_ebpf::{abi, maps};
use std::{
    fs::File,
    os::{fd::AsFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

pub use crate::config::{SendMode, SpliceSafety};
pub use hooks::kernel_release;
pub use pins::{detach, generations};
pub use sock::{Connection, comm_key, peer_key};

/// Generation name suffix of a datapath built with the syscall tracepoints.
const TRACEPOINTS_SUFFIX: &str = "-tp";

/// What the daemon asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub pin_dir: PathBuf,
    /// Absolute path of the cgroup v2 directory to attach to.
    pub cgroup: PathBuf,
    pub capacity: u32,
    /// Most bytes queued on one receiver's redirect queue; 0 = its SO_RCVBUF.
    pub queue_cap: u64,
    pub splice: SpliceSafety,
    /// Process names whose sockets never receive redirected data (configured splice readers).
    pub splice_readers: Vec<String>,
    /// Attach the splice/sendfile syscall tracepoints (they slow every syscall on the
    /// host). Attached at build time only, so the generation name says it ("-tp").
    pub splice_tracepoints: bool,
    /// Sends smaller than this take TCP while the receiver still holds a short redirect
    /// queue (TCP merges them into few segments and wakeups); 0 = off.
    pub coalesce_below: u32,
    /// Which sockets run sk_msg on their sends (the others send at kernel speed).
    pub send_mode: SendMode,
}

/// The policy as the kernel sees it: encoded rules and the default action.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PolicyImage {
    pub rules: Vec<abi::Rule>,
    pub accelerate_by_default: bool,
}

impl PolicyImage {
    /// Whether any socket can be admitted (inactive rules are already left out).
    pub fn may_accelerate(&self) -> bool {
        self.accelerate_by_default || self.rules.iter().any(|r| r.action == abi::ACTION_ACCELERATE)
    }
}

pub struct Datapath {
    pub target: Target,
    pub gen_dir: PathBuf,
    pub cgroup_id: u64,
    /// True when this start adopted pins left by an earlier run.
    pub adopted: bool,
    /// What protects this datapath, for the log and status (e.g. "splice: recvmsg-first").
    pub protections: Vec<String>,
    /// recvmsg-first gating is on (set by apply_tuning).
    recv_gate: bool,
    counters: PerCpuArray<MapData, u64>,
    control: Array<MapData, u64>,
    rules: Array<MapData, abi::Rule>,
    policy: Array<MapData, abi::PolicyMeta>,
    socks: SockHash<MapData, abi::SockKey>,
    senders: SockHash<MapData, abi::SockKey>,
    rx: HashMap<MapData, abi::SockKey, abi::RxState>,
    splicers: HashMap<MapData, [u8; abi::COMM_LEN], u64>,
    nat: HashMap<MapData, abi::SockKey, abi::NatPeer>,
    /// Serves promotion requests while this generation is the daemon's (auto mode).
    _promoter: Option<promote::Promoter>,
}

impl Datapath {
    /// Adopt the matching pinned generation, or build and attach a new one; then
    /// retire every other generation. The new one is attached before the old one
    /// is detached, so there is no window without acceleration.
    pub fn attach(target: &Target, policy: &PolicyImage, paused: bool) -> Result<Datapath> {
        let cg = File::open(&target.cgroup).with_context(|| format!("opening cgroup {}", target.cgroup.display()))?;
        let cgroup_id = cg.metadata()?.ino();
        std::fs::create_dir_all(&target.pin_dir)
            .with_context(|| format!("creating pin directory {}", target.pin_dir.display()))?;
        let mut name = pins::gen_name(target.capacity, cgroup_id);
        if target.splice_tracepoints {
            name.push_str(TRACEPOINTS_SUFFIX);
        }
        let gen_dir = target.pin_dir.join(name);

        let opened = Self::open(target, &gen_dir, cgroup_id);
        crate::startup::step("adopt check");
        let mut dp = match opened {
            Ok(dp) => dp,
            Err(e) => {
                if gen_dir.exists() {
                    tracing::warn!("pinned datapath {} is incomplete ({e:#}); rebuilding it", gen_dir.display());
                    pins::retire(&gen_dir)?;
                }
                Self::build(target, &cg, &gen_dir, cgroup_id, policy, paused)?
            }
        };
        if dp.adopted {
            dp.swap_policy(policy)?;
            dp.set_paused(paused)?;
        }
        dp.apply_tuning()?;
        dp.sync_on_demand(policy)?;
        dp.log_hooks();
        crate::startup::step("tuning");
        for old in pins::generations(&target.pin_dir).into_iter().filter(|g| *g != gen_dir) {
            tracing::info!("retiring datapath generation {} (its open connections finish on it)", old.display());
            pins::retire(&old)?;
        }
        crate::startup::step("retire old generations");
        Ok(dp)
    }

    /// Open what is pinned under `pin_dir` without changing anything (tools, tests):
    /// the newest complete generation.
    pub fn open_pinned(pin_dir: &Path) -> Result<Datapath> {
        let gen_dir = pins::current(pin_dir)?;
        let dir_name = gen_dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let name = pins::GenName::parse(dir_name);
        let target = Target {
            pin_dir: pin_dir.to_path_buf(),
            cgroup: PathBuf::new(),
            capacity: name.as_ref().map_or(0, |n| n.capacity),
            queue_cap: 0,
            splice: SpliceSafety::Auto,
            splice_readers: Vec::new(),
            splice_tracepoints: dir_name.ends_with(TRACEPOINTS_SUFFIX),
            coalesce_below: 0,
            send_mode: SendMode::default(),
        };
        Self::open(&target, &gen_dir, name.map_or(0, |n| n.cgroup_id))
    }

    fn open(target: &Target, gen_dir: &Path, cgroup_id: u64) -> Result<Datapath> {
        if let Some(p) = sock::PROGRAMS.iter().find(|p| p.required && !p.is_pinned(gen_dir)) {
            bail!("{} ({}) is not pinned in {}", p.name, p.what, gen_dir.display());
        }
        let load = |name: &str| -> Result<Map> {
            let p = pins::map_pin(gen_dir, name);
            let data = MapData::from_pin(&p).with_context(|| format!("opening pinned map {}", p.display()))?;
            Map::from_map_data(data).with_context(|| format!("pinned map {}", p.display()))
        };
        let control: Array<MapData, u64> = Array::try_from(load(maps::CONTROL)?)?;
        // As the running generation has it (apply_tuning sets it again on attach).
        let recv_gate = control.get(&abi::CTL_RECV_GATE, 0).context("reading the recvmsg gate")? != 0;
        Ok(Datapath {
            target: target.clone(),
            gen_dir: gen_dir.to_path_buf(),
            cgroup_id,
            adopted: true,
            protections: Vec::new(),
            recv_gate,
            counters: PerCpuArray::try_from(load(maps::COUNTERS)?)?,
            control,
            rules: Array::try_from(load(maps::RULES)?)?,
            policy: Array::try_from(load(maps::POLICY)?)?,
            socks: SockHash::try_from(load(maps::SOCKS)?)?,
            senders: SockHash::try_from(load(maps::SENDERS)?)?,
            rx: HashMap::try_from(load(maps::RX)?)?,
            splicers: HashMap::try_from(load(maps::SPLICERS)?)?,
            nat: HashMap::try_from(load(maps::NAT)?)?,
            _promoter: None,
        })
    }

    fn build(
        target: &Target,
        cg: &File,
        gen_dir: &Path,
        cgroup_id: u64,
        policy: &PolicyImage,
        paused: bool,
    ) -> Result<Datapath> {
        // tp_btf and LSM loads need the kernel's BTF too: parse it beside the loader's own parse.
        let btf = std::thread::spawn(|| aya::Btf::from_sys_fs().context("reading the kernel's BTF"));
        let loaded = EbpfLoader::new()
            .map_max_entries(maps::SOCKS, target.capacity)
            .map_max_entries(maps::SENDERS, target.capacity)
            .map_max_entries(maps::RX, target.capacity)
            .map_max_entries(maps::COOKIES, target.capacity)
            .map_max_entries(maps::NAT, target.capacity)
            .load(bypassd_ebpf::object());
        let btf = btf.join().map_err(|_| anyhow!("the BTF parser thread panicked"))?;
        // Name missing kernel features instead of the loader's error (probed only on failure).
        let mut ebpf = match loaded {
            Ok(e) => e,
            Err(e) => {
                hooks::check_kernel()?;
                return Err(e).context("loading the BPF object (maps)");
            }
        };
        let btf = btf.map_err(|e| tracing::warn!("{e:#}; tp_btf and LSM hooks are unavailable")).ok();
        crate::startup::step("BTF, object, maps");

        let tmp = pins::building_dir(&target.pin_dir);
        if tmp.exists() {
            pins::retire(&tmp)?;
        }
        std::fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let result = Self::build_into(&mut ebpf, cg, btf.as_ref(), &tmp, target, policy, paused);
        if let Err(e) = result {
            let _ = pins::retire(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, gen_dir).with_context(|| format!("renaming {} to {}", tmp.display(), gen_dir.display()))?;
        let mut dp = Self::open(target, gen_dir, cgroup_id)?;
        dp.adopted = false;
        // The BTF parses (tens of MiB, one on its own thread's arena) are freed by now:
        // hand the pages back, or they stay resident for the daemon's life (RSS target).
        #[cfg(target_env = "gnu")]
        // SAFETY: malloc_trim only releases free heap memory; no pointer is invalidated.
        unsafe {
            libc::malloc_trim(0);
        }
        crate::startup::step("open pins, trim heap");
        Ok(dp)
    }

    fn build_into(
        ebpf: &mut Ebpf,
        cg: &File,
        btf: Option<&aya::Btf>,
        dir: &Path,
        target: &Target,
        policy: &PolicyImage,
        paused: bool,
    ) -> Result<()> {
        for name in maps::ALL {
            let map = ebpf.map(name).ok_or_else(|| anyhow!("BPF object has no map {name}"))?;
            map.pin(pins::map_pin(dir, name)).with_context(|| format!("pinning map {name}"))?;
        }
        // Policy and pause state go in before anything is attached.
        {
            let mut control: Array<&mut MapData, u64> = Array::try_from(ebpf.map_mut(maps::CONTROL).context("control map")?)?;
            control.set(abi::CTL_PAUSED, u64::from(paused), 0)?;
            // Safety settings too (the gate may be lifted by apply_tuning once the LSM guard is known).
            control.set(abi::CTL_QUEUE_CAP, target.queue_cap, 0)?;
            control.set(abi::CTL_RECV_GATE, u64::from(target.splice != SpliceSafety::Off), 0)?;
            control.set(abi::CTL_SEND_MODE, target.send_mode.abi(), 0)?;
        }
        if target.splice != SpliceSafety::Off {
            let mut sp: HashMap<&mut MapData, [u8; abi::COMM_LEN], u64> =
                HashMap::try_from(ebpf.map_mut(maps::SPLICERS).context("splicers map")?)?;
            for n in &target.splice_readers {
                sp.insert(comm_key(n), abi::SPLICER_CONFIGURED, 0)?;
            }
        }
        write_policy(ebpf, policy)?;
        crate::startup::step("map pins, control, policy");

        let senders: SockHash<&MapData, abi::SockKey> =
            SockHash::try_from(ebpf.map(maps::SENDERS).context("senders map")?)?;
        let senders_fd = senders.fd().try_clone().context("duplicating the senders' SOCKHASH fd")?;
        let to = hooks::AttachTo { cgroup: cg, senders: senders_fd.as_fd(), btf };
        // On-demand hooks are loaded (verified) now and attached by sync_on_demand.
        for p in sock::PROGRAMS.iter().filter(|p| sock::is_on_demand(p)) {
            if let Err(e) = p.load_unattached(ebpf, &to, dir) {
                tracing::warn!("{}: not available on this kernel ({e:#})", p.what);
            }
            crate::startup::step(format!("program {} (loaded)", p.name));
        }
        let table: Vec<hooks::Program> = sock::PROGRAMS
            .iter()
            .copied()
            .filter(|p| !sock::is_on_demand(p) && (target.splice_tracepoints || !sock::is_syscall_tracepoint(p)))
            .collect();
        hooks::attach_all(&table, ebpf, &to, dir)
    }

    /// Whether a program of the table is attached in this generation.
    fn has(&self, name: &str) -> bool {
        sock::program(name).is_some_and(|p| p.is_pinned(&self.gen_dir))
    }

    /// Log which hooks are attached, which wait until needed and which the kernel refused.
    fn log_hooks(&self) {
        let (on, rest): (Vec<&hooks::Program>, Vec<&hooks::Program>) =
            sock::PROGRAMS.iter().partition(|p| p.is_pinned(&self.gen_dir));
        let (idle, rest): (Vec<&hooks::Program>, Vec<&hooks::Program>) =
            rest.into_iter().partition(|p| sock::is_on_demand(p) && p.is_loaded(&self.gen_dir));
        let (opt_out, off): (Vec<&hooks::Program>, Vec<&hooks::Program>) =
            rest.into_iter().partition(|p| !self.target.splice_tracepoints && sock::is_syscall_tracepoint(p));
        let names = |v: &[&hooks::Program]| v.iter().map(|p| p.name).collect::<Vec<_>>().join(", ");
        let part = |v: &[&hooks::Program], why: &str| if v.is_empty() { String::new() } else { format!("; {why}: {}", names(v)) };
        tracing::info!(
            "datapath hooks attached: {}{}{}{}",
            names(&on),
            part(&idle, "loaded, attached only while the policy accelerates and the recvmsg gate is on"),
            part(&off, "not available"),
            part(&opt_out, "off (splice_tracepoints = false)")
        );
    }

    /// Attach the on-demand hooks (the tp_btf recvmsg hook, global: it runs on every
    /// read on the host) while they are needed, detach them when not: needed while the
    /// recvmsg gate is on and the policy can admit a socket. Without it, gated
    /// receivers are never marked ready, so nothing new is redirected (always safe);
    /// sockets accelerated earlier keep what was published, and a later TCP read the
    /// hook does not see only sends them to TCP (a live copied_seq beyond it).
    fn sync_on_demand(&mut self, policy: &PolicyImage) -> Result<()> {
        // send_mode auto needs it too: it queues the promotion requests.
        let auto = self.promotes();
        let want = (self.recv_gate || auto) && policy.may_accelerate();
        for p in sock::PROGRAMS.iter().filter(|p| sock::is_on_demand(p) && p.is_loaded(&self.gen_dir)) {
            match (want, p.is_pinned(&self.gen_dir)) {
                (true, false) => {
                    p.link_pinned(&self.gen_dir)?;
                    let why = if self.recv_gate { "the recvmsg gate is on" } else { "send_mode auto promotes through it" };
                    tracing::info!("attached {} (the policy accelerates and {why})", p.name);
                }
                (false, true) => {
                    p.unlink_pinned(&self.gen_dir)?;
                    tracing::info!(
                        "detached {} ({})",
                        p.name,
                        if self.recv_gate || auto { "the policy accelerates nothing" } else { "the recvmsg gate is off" }
                    );
                }
                _ => {}
            }
        }
        self.describe();
        Ok(())
    }

    /// Write the runtime tuning (queue cap, recvmsg gate) and describe what is active.
    fn apply_tuning(&mut self) -> Result<()> {
        let gate = match self.target.splice {
            SpliceSafety::Off => false,
            SpliceSafety::RecvFirst => true,
            SpliceSafety::Auto => !self.has(bypassd_ebpf::programs::SPLICE_GUARD),
        };
        self.control.set(abi::CTL_QUEUE_CAP, self.target.queue_cap, 0).context("writing queue cap")?;
        self.control
            .set(abi::CTL_COALESCE_BELOW, u64::from(self.target.coalesce_below), 0)
            .context("writing coalescing threshold")?;
        let readers = if self.target.splice == SpliceSafety::Off { &[][..] } else { &self.target.splice_readers[..] };
        sock::set_configured_splicers(&mut self.splicers, readers)?;
        self.control.set(abi::CTL_RECV_GATE, u64::from(gate), 0).context("writing recvmsg gate")?;
        self.control.set(abi::CTL_SEND_MODE, self.target.send_mode.abi(), 0).context("writing send mode")?;
        // Promotion requests name their reader as our /proc sees it (see sendmode.h).
        let (ns_dev, ns_ino) = std::fs::metadata("/proc/self/ns/pid").map_or((0, 0), |m| (m.dev(), m.ino()));
        self.control.set(abi::CTL_PIDNS_DEV, ns_dev, 0).context("writing the pid namespace")?;
        self.control.set(abi::CTL_PIDNS_INO, ns_ino, 0).context("writing the pid namespace")?;
        // Only auto mode asks for promotions: no polling thread in the other modes.
        if !self.promotes() {
            self._promoter = None;
        } else if self._promoter.is_none() {
            self._promoter = promote::spawn(&self.gen_dir);
        }
        self.recv_gate = gate;
        self.describe();
        Ok(())
    }

    /// send_mode auto: sockets ask for promotion (the rx hook and the promoter serve them).
    fn promotes(&self) -> bool {
        self.target.send_mode == SendMode::Auto
    }

    /// What protects this datapath now (hooks attached, gate), for the log and status.
    fn describe(&mut self) {
        let has = |n: &str| self.has(n);
        let t = &self.target;
        self.protections = sock::protections(&has, self.recv_gate, t.splice, t.queue_cap, !t.splice_readers.is_empty());
        self.protections.push(sock::senders_line(t.send_mode, self._promoter.is_some()));
    }

    /// Whether the kernel runs `name` (a program of the table) in this generation now.
    pub fn hook_linked(&self, name: &str) -> Result<bool> {
        sock::program(name).with_context(|| format!("no program {name} in the table"))?.kernel_linked(&self.gen_dir)
    }

    /// True while this generation's required hooks are pinned (nobody detached it).
    pub fn is_attached(&self) -> bool {
        sock::PROGRAMS.iter().filter(|p| p.required).all(|p| p.is_pinned(&self.gen_dir))
    }

    pub fn capacity(&self) -> u32 {
        self.target.capacity
    }

    /// Counters summed over CPUs, indexed by `abi::Counter`.
    pub fn counters(&self) -> Result<Vec<(abi::Counter, u64)>> {
        abi::Counter::ALL
            .iter()
            .map(|&c| {
                let v = self.counters.get(&(c as u32), 0).with_context(|| format!("reading counter {}", c.name()))?;
                Ok((c, v.iter().copied().fold(0u64, u64::wrapping_add)))
            })
            .collect()
    }

    pub fn counter(&self, c: abi::Counter) -> Result<u64> {
        Ok(self.counters()?.into_iter().find(|(k, _)| *k == c).map_or(0, |(_, v)| v))
    }

    pub fn paused(&self) -> Result<bool> {
        Ok(self.control.get(&abi::CTL_PAUSED, 0)? != 0)
    }

    pub fn set_paused(&mut self, paused: bool) -> Result<()> {
        self.control.set(abi::CTL_PAUSED, u64::from(paused), 0).context("writing pause flag")
    }

    /// Swap in a new rule set (see [`Datapath::swap_policy`]); the recvmsg hook is
    /// attached before a policy that admits sockets and detached after one that admits none.
    pub fn apply_policy(&mut self, p: &PolicyImage) -> Result<bool> {
        if p.may_accelerate() {
            self.sync_on_demand(p)?;
        }
        let changed = self.swap_policy(p)?;
        self.sync_on_demand(p)?;
        Ok(changed)
    }

    /// Fill the inactive buffer, then flip the sequence number, so sock_ops sees either
    /// the whole old or the whole new policy.
    /// Returns false (and writes nothing) when the active policy is already this one.
    fn swap_policy(&mut self, p: &PolicyImage) -> Result<bool> {
        if self.active_policy()? == *p {
            return Ok(false);
        }
        check_rules(p)?;
        let seq = self.control.get(&abi::CTL_POLICY_SEQ, 0)?;
        let next = seq.wrapping_add(1);
        let base = (next & 1) as u32 * abi::MAX_RULES;
        for (i, r) in p.rules.iter().enumerate() {
            self.rules.set(base + i as u32, r, 0)?;
        }
        let buf = (next & 1) as u32;
        self.policy.set(buf, meta(p), 0)?;
        self.control.set(abi::CTL_POLICY_SEQ, next, 0)?;
        Ok(true)
    }

    pub fn active_policy(&self) -> Result<PolicyImage> {
        let seq = self.control.get(&abi::CTL_POLICY_SEQ, 0)?;
        let buf = (seq & 1) as u32;
        let m = self.policy.get(&buf, 0)?;
        let n = m.nrules.min(abi::MAX_RULES);
        let rules = (0..n).map(|i| self.rules.get(&(buf * abi::MAX_RULES + i), 0)).collect::<Result<_, _>>()?;
        Ok(PolicyImage { rules, accelerate_by_default: m.default_action == abi::ACTION_ACCELERATE as u32 })
    }

    /// Known splice readers: (process name, configured, learned).
    pub fn splice_readers(&self) -> Result<Vec<(String, bool, bool)>> {
        sock::splice_readers(&self.splicers)
    }

    /// Receive state of every accelerated socket: what its senders see (read copied_seq,
    /// redirected bytes queued, recvmsg reader, splice reader).
    pub fn rx_states(&self) -> Result<Vec<(abi::SockKey, abi::RxState)>> {
        self.rx.iter().collect::<Result<_, _>>().context("listing receive state")
    }

    /// NAT pairs the datapath holds: (socket key, its NAT peer).
    pub fn nat_pairs(&self) -> Result<Vec<(abi::SockKey, abi::NatPeer)>> {
        self.nat.iter().collect::<Result<_, _>>().context("listing NAT pairs")
    }

    /// Sockets in the SOCKHASH, paired up into connections (peers found as sk_msg finds them).
    pub fn connections(&self) -> Result<Vec<Connection>> {
        sock::connections(&self.socks, &self.senders, &self.nat_pairs()?.into_iter().collect())
    }
}

fn check_rules(p: &PolicyImage) -> Result<()> {
    if p.rules.len() > abi::MAX_RULES as usize {
        bail!("{} rules exceed the datapath's {} rule slots", p.rules.len(), abi::MAX_RULES);
    }
    Ok(())
}

fn meta(p: &PolicyImage) -> abi::PolicyMeta {
    abi::PolicyMeta {
        nrules: p.rules.len() as u32,
        default_action: u32::from(if p.accelerate_by_default { abi::ACTION_ACCELERATE } else { abi::ACTION_KERNEL }),
    }
}

/// The first policy, written straight into the freshly loaded maps (buffer 0, seq 0).
fn write_policy(ebpf: &mut Ebpf, p: &PolicyImage) -> Result<()> {
    check_rules(p)?;
    let mut rules: Array<&mut MapData, abi::Rule> = Array::try_from(ebpf.map_mut(maps::RULES).context("rules map")?)?;
    for (i, r) in p.rules.iter().enumerate() {
        rules.set(i as u32, r, 0)?;
    }
    let mut pm: Array<&mut MapData, abi::PolicyMeta> = Array::try_from(ebpf.map_mut(maps::POLICY).context("policy map")?)?;
    pm.set(0, meta(p), 0)?;
    Ok(())
}
