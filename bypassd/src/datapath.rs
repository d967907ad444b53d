//! Load, attach, pin and adopt the socket datapath.
//!
//! Everything lives under the pin directory in one *generation* directory named by
//! what cannot change in place (ABI version, SOCKHASH capacity, cgroup):
//! `<pin_dir>/v1-cap65536-cg1234/`. Restart adopts the generation that matches;
//! a change builds a new one beside it, attaches it, then retires the old one by
//! unpinning. Unpinning never evicts a socket: old connections keep their program
//! and map until they close, so no byte is lost (a deleted or overwritten SOCKHASH
//! entry would drop the receiver's unread data, which is why nothing here deletes).
use anyhow::{Context, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, PerCpuArray, SockHash},
    programs::{BtfTracePoint, CgroupAttachMode, CgroupSock, KProbe, Lsm, SkMsg, SockOps, TracePoint, links::FdLink},
};
use bypassd_ebpf::{abi, maps, programs};
use std::{
    collections::HashSet,
    fs::File,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

const LINK_SOCKOPS: &str = "link_sockops";
const LINK_SOCK_CREATE: &str = "link_sock_create";
const LINK_RX_ENTER: &str = "link_rx_enter";
const LINK_RX_DONE: &str = "link_rx_done";
const LINK_SPLICE_SEEN: &str = "link_splice_seen";
const LINK_SPLICE_KPROBE: &str = "link_splice_kprobe";
const LINK_SENDFILE_SEEN: &str = "link_sendfile_seen";
const LINK_SPLICE_GUARD: &str = "link_splice_guard";

/// How splice(2) readers are kept safe (see docs/datapath-safety.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SpliceSafety {
    /// The BPF LSM guard where the kernel runs it, else recvmsg-first gating.
    #[default]
    Auto,
    /// Always gate: a receiver gets redirected data only after it read with recvmsg.
    RecvFirst,
    /// No protection: a splice reader of an accelerated socket may hang.
    Off,
}

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
}

/// The policy as the kernel sees it: encoded rules and the default action.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PolicyImage {
    pub rules: Vec<abi::Rule>,
    pub accelerate_by_default: bool,
}

pub struct Datapath {
    pub target: Target,
    pub gen_dir: PathBuf,
    pub cgroup_id: u64,
    /// True when this start adopted pins left by an earlier run.
    pub adopted: bool,
    /// What protects this datapath, for the log and status (e.g. "splice: recvmsg-first").
    pub protections: Vec<String>,
    counters: PerCpuArray<MapData, u64>,
    control: Array<MapData, u64>,
    rules: Array<MapData, abi::Rule>,
    policy: Array<MapData, abi::PolicyMeta>,
    socks: SockHash<MapData, abi::SockKey>,
    rx: HashMap<MapData, abi::SockKey, abi::RxState>,
    splicers: HashMap<MapData, [u8; abi::COMM_LEN], u64>,
}

fn gen_name(capacity: u32, cgroup_id: u64) -> String {
    format!("v{}-cap{}-cg{}", abi::ABI_VERSION, capacity, cgroup_id)
}

fn map_pin(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("map_{name}"))
}

fn prog_pin(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("prog_{name}"))
}

/// Generation directories (and interrupted builds) under the pin directory.
pub fn generations(pin_dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(pin_dir) else { return Vec::new() };
    let mut v: Vec<PathBuf> = rd.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_dir()).collect();
    v.sort();
    v
}

/// Unpin one generation. Its cgroup links go (new connections stop using it);
/// its sockets keep redirecting until they close.
fn retire(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        std::fs::remove_file(&p).with_context(|| format!("unpinning {}", p.display()))?;
    }
    std::fs::remove_dir(dir).with_context(|| format!("removing {}", dir.display()))
}

/// Remove the whole datapath: detach from new connections, let old ones finish.
/// Returns how many generations were removed.
pub fn detach(pin_dir: &Path) -> Result<usize> {
    let gens = generations(pin_dir);
    for g in &gens {
        retire(g)?;
    }
    if pin_dir.exists() {
        std::fs::remove_dir(pin_dir).with_context(|| format!("removing {}", pin_dir.display()))?;
    }
    Ok(gens.len())
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
        let gen_dir = target.pin_dir.join(gen_name(target.capacity, cgroup_id));

        let mut dp = match Self::open(target, &gen_dir, cgroup_id) {
            Ok(dp) => dp,
            Err(e) => {
                if gen_dir.exists() {
                    tracing::warn!("pinned datapath {} is incomplete ({e:#}); rebuilding it", gen_dir.display());
                    retire(&gen_dir)?;
                }
                Self::build(target, &cg, &gen_dir, cgroup_id, policy, paused)?
            }
        };
        if dp.adopted {
            dp.apply_policy(policy)?;
            dp.set_paused(paused)?;
        }
        dp.apply_tuning()?;
        for old in generations(&target.pin_dir).into_iter().filter(|g| *g != gen_dir) {
            tracing::info!("retiring datapath generation {} (its open connections finish on it)", old.display());
            retire(&old)?;
        }
        Ok(dp)
    }

    /// Open what is pinned under `pin_dir` without changing anything (tools, tests):
    /// the newest complete generation.
    pub fn open_pinned(pin_dir: &Path) -> Result<Datapath> {
        let gen_dir = generations(pin_dir)
            .into_iter()
            .rev()
            .find(|g| g.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('v')))
            .with_context(|| format!("no datapath is pinned under {}", pin_dir.display()))?;
        let name = gen_dir.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        let field = |prefix: &str| -> Option<u64> {
            name.split('-').find_map(|p| p.strip_prefix(prefix)).and_then(|v| v.parse().ok())
        };
        let target = Target {
            pin_dir: pin_dir.to_path_buf(),
            cgroup: PathBuf::new(),
            capacity: field("cap").unwrap_or(0) as u32,
            queue_cap: 0,
            splice: SpliceSafety::Auto,
            splice_readers: Vec::new(),
        };
        Self::open(&target, &gen_dir, field("cg").unwrap_or(0))
    }

    fn open(target: &Target, gen_dir: &Path, cgroup_id: u64) -> Result<Datapath> {
        for link in [LINK_SOCKOPS, LINK_SOCK_CREATE] {
            let p = gen_dir.join(link);
            if !p.exists() {
                bail!("{} is missing", p.display());
            }
        }
        let load = |name: &str| -> Result<Map> {
            let p = map_pin(gen_dir, name);
            let data = MapData::from_pin(&p).with_context(|| format!("opening pinned map {}", p.display()))?;
            Map::from_map_data(data).with_context(|| format!("pinned map {}", p.display()))
        };
        Ok(Datapath {
            target: target.clone(),
            gen_dir: gen_dir.to_path_buf(),
            cgroup_id,
            adopted: true,
            protections: Vec::new(),
            counters: PerCpuArray::try_from(load(maps::COUNTERS)?)?,
            control: Array::try_from(load(maps::CONTROL)?)?,
            rules: Array::try_from(load(maps::RULES)?)?,
            policy: Array::try_from(load(maps::POLICY)?)?,
            socks: SockHash::try_from(load(maps::SOCKS)?)?,
            rx: HashMap::try_from(load(maps::RX)?)?,
            splicers: HashMap::try_from(load(maps::SPLICERS)?)?,
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
        check_kernel()?;
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(maps::SOCKS, target.capacity)
            .map_max_entries(maps::RX, target.capacity)
            .map_max_entries(maps::COOKIES, target.capacity)
            .load(bypassd_ebpf::object())
            .context("loading the BPF object (maps)")?;

        // bpffs refuses names with dots. Build in a scratch directory and rename it into place when complete, so a
        // crash half-way never leaves something that looks adoptable.
        let tmp = target.pin_dir.join(format!("building-{}", std::process::id()));
        if tmp.exists() {
            retire(&tmp)?;
        }
        std::fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let result = Self::build_into(&mut ebpf, cg, &tmp, target, policy, paused);
        if let Err(e) = result {
            let _ = retire(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, gen_dir).with_context(|| format!("renaming {} to {}", tmp.display(), gen_dir.display()))?;
        let mut dp = Self::open(target, gen_dir, cgroup_id)?;
        dp.adopted = false;
        Ok(dp)
    }

    fn build_into(ebpf: &mut Ebpf, cg: &File, dir: &Path, target: &Target, policy: &PolicyImage, paused: bool) -> Result<()> {
        for name in maps::ALL {
            let map = ebpf.map(name).ok_or_else(|| anyhow!("BPF object has no map {name}"))?;
            map.pin(map_pin(dir, name)).with_context(|| format!("pinning map {name}"))?;
        }
        // Policy and pause state go in before anything is attached.
        {
            let mut control: Array<&mut MapData, u64> = Array::try_from(ebpf.map_mut(maps::CONTROL).context("control map")?)?;
            control.set(abi::CTL_PAUSED, u64::from(paused), 0)?;
            // Safety settings too (the gate may be lifted by apply_tuning once the LSM guard is known).
            control.set(abi::CTL_QUEUE_CAP, target.queue_cap, 0)?;
            control.set(abi::CTL_RECV_GATE, u64::from(target.splice != SpliceSafety::Off), 0)?;
        }
        if target.splice != SpliceSafety::Off {
            let mut sp: HashMap<&mut MapData, [u8; abi::COMM_LEN], u64> =
                HashMap::try_from(ebpf.map_mut(maps::SPLICERS).context("splicers map")?)?;
            for n in &target.splice_readers {
                sp.insert(comm_key(n), abi::SPLICER_CONFIGURED, 0)?;
            }
        }
        write_policy(ebpf, policy)?;

        // The receive side first: a socket inserted later finds its publication in place.
        attach_receive_side(ebpf, dir);

        let socks: SockHash<&MapData, abi::SockKey> = SockHash::try_from(ebpf.map(maps::SOCKS).context("socks map")?)?;
        let socks_fd = socks.fd().try_clone().context("duplicating the SOCKHASH fd")?;

        let sk_msg: &mut SkMsg = prog(ebpf, programs::SK_MSG)?.try_into()?;
        sk_msg.load().context("loading sk_msg program")?;
        let id = sk_msg.attach(&socks_fd).context("attaching sk_msg to the SOCKHASH")?;
        // The attachment lives in the map; dropping aya's handle would detach it.
        std::mem::forget(sk_msg.take_link(id)?);
        sk_msg.pin(prog_pin(dir, programs::SK_MSG)).context("pinning sk_msg")?;

        let create: &mut CgroupSock = prog(ebpf, programs::SOCK_CREATE)?.try_into()?;
        create.load().context("loading cgroup/sock_create program")?;
        // cgroup bpf_links always sit beside other programs (BPF_F_ALLOW_MULTI semantics) and
        // refuse attach flags, so the mode must be the flag-less default.
        let id = create.attach(cg, CgroupAttachMode::Single).context("attaching cgroup/sock_create")?;
        let link: FdLink = create.take_link(id)?.try_into().context("sock_create link is not a bpf_link")?;
        link.pin(dir.join(LINK_SOCK_CREATE)).context("pinning sock_create link")?;
        create.pin(prog_pin(dir, programs::SOCK_CREATE)).context("pinning sock_create")?;

        let ops: &mut SockOps = prog(ebpf, programs::SOCK_OPS)?.try_into()?;
        ops.load().context("loading sock_ops program")?;
        let id = ops.attach(cg, CgroupAttachMode::Single).context("attaching sock_ops (bpf_link, multi-attach)")?;
        let link: FdLink = ops.take_link(id)?.try_into().context("sock_ops link is not a bpf_link")?;
        link.pin(dir.join(LINK_SOCKOPS)).context("pinning sock_ops link")?;
        ops.pin(prog_pin(dir, programs::SOCK_OPS)).context("pinning sock_ops")?;
        Ok(())
    }

    /// Write the runtime tuning (queue cap, recvmsg gate) and describe what is active.
    fn apply_tuning(&mut self) -> Result<()> {
        let gen_dir = self.gen_dir.clone();
        let has = |l: &str| gen_dir.join(l).exists();
        let lsm = has(LINK_SPLICE_GUARD);
        let gate = match self.target.splice {
            SpliceSafety::Off => false,
            SpliceSafety::RecvFirst => true,
            SpliceSafety::Auto => !lsm,
        };
        self.control.set(abi::CTL_QUEUE_CAP, self.target.queue_cap, 0).context("writing queue cap")?;
        self.set_configured_splicers()?;
        self.control.set(abi::CTL_RECV_GATE, u64::from(gate), 0).context("writing recvmsg gate")?;
        let mut p = Vec::new();
        let publication = match (has(LINK_RX_ENTER), has(LINK_RX_DONE)) {
            (true, true) => "kprobe tcp_bpf_recvmsg + tp_btf sock_recv_length",
            (true, false) => "kprobe tcp_bpf_recvmsg only",
            (false, true) => "tp_btf sock_recv_length (after each read)",
            (false, false) => "none (a connection that leaves the redirect path stays on TCP)",
        };
        p.push(format!(
            "backpressure: redirect queue cap {} (receive-side publication: {publication})",
            if self.target.queue_cap == 0 { "= each receiver's SO_RCVBUF".to_string() } else { format!("{} bytes", self.target.queue_cap) }
        ));
        let mut splice = Vec::new();
        if lsm {
            splice.push("BPF LSM guard (splice/sendfile reads of accelerated sockets get EINVAL)");
        }
        if gate {
            splice.push("recvmsg-first gating (nothing is redirected to a socket before it reads with recvmsg)");
        }
        if has(LINK_SPLICE_KPROBE) {
            splice.push("splice detection (kprobe tcp_splice_read: a splicing socket gets nothing redirected again)");
        } else if has(LINK_SPLICE_SEEN) {
            splice.push("splice detection (syscall tracepoints splice/sendfile: a splicing socket gets nothing redirected again)");
        }
        if !self.target.splice_readers.is_empty() && self.target.splice != SpliceSafety::Off {
            splice.push("known splice readers get TCP only (configured, plus learned when seen splicing)");
        }
        if splice.is_empty() || self.target.splice == SpliceSafety::Off {
            splice.push("OFF: a splice(2) reader of an accelerated socket may hang");
        }
        p.push(format!("splice: {}", splice.join(" + ")));
        self.protections = p;
        Ok(())
    }

    /// True while this generation's cgroup links are pinned (nobody detached it).
    pub fn is_attached(&self) -> bool {
        self.gen_dir.join(LINK_SOCKOPS).exists() && self.gen_dir.join(LINK_SOCK_CREATE).exists()
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

    /// Swap in a new rule set: fill the inactive buffer, then flip the sequence
    /// number, so sock_ops sees either the whole old or the whole new policy.
    /// Returns false (and writes nothing) when the active policy is already this one.
    pub fn apply_policy(&mut self, p: &PolicyImage) -> Result<bool> {
        if self.active_policy()? == *p {
            return Ok(false);
        }
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

    /// Write the configured splice readers; drop configured names no longer listed
    /// (learned ones stay until the datapath is rebuilt).
    fn set_configured_splicers(&mut self) -> Result<()> {
        let want: Vec<[u8; abi::COMM_LEN]> = if self.target.splice == SpliceSafety::Off {
            Vec::new()
        } else {
            self.target.splice_readers.iter().map(|n| comm_key(n)).collect()
        };
        let have: Vec<([u8; abi::COMM_LEN], u64)> = self.splicers.iter().collect::<Result<_, _>>()?;
        for (k, v) in &have {
            if *v & abi::SPLICER_CONFIGURED != 0 && !want.contains(k) {
                let rest = *v & !abi::SPLICER_CONFIGURED;
                if rest == 0 { self.splicers.remove(k)? } else { self.splicers.insert(k, rest, 0)? }
            }
        }
        for k in &want {
            let v = have.iter().find(|(h, _)| h == k).map_or(0, |(_, v)| *v);
            self.splicers.insert(k, v | abi::SPLICER_CONFIGURED, 0)?;
        }
        Ok(())
    }

    /// Known splice readers: (process name, configured, learned).
    pub fn splice_readers(&self) -> Result<Vec<(String, bool, bool)>> {
        let mut v: Vec<(String, bool, bool)> = self
            .splicers
            .iter()
            .map(|r| {
                r.map(|(k, f)| {
                    let end = k.iter().position(|&b| b == 0).unwrap_or(k.len());
                    (String::from_utf8_lossy(&k[..end]).into_owned(), f & abi::SPLICER_CONFIGURED != 0, f & abi::SPLICER_LEARNED != 0)
                })
            })
            .collect::<Result<_, _>>()?;
        v.sort();
        Ok(v)
    }

    /// Receive state of every accelerated socket: what its senders see (read copied_seq,
    /// redirected bytes queued, recvmsg reader, splice reader).
    pub fn rx_states(&self) -> Result<Vec<(abi::SockKey, abi::RxState)>> {
        self.rx.iter().collect::<Result<_, _>>().context("listing receive state")
    }

    /// Sockets in the SOCKHASH, paired up into connections.
    pub fn connections(&self) -> Result<Vec<bypassd_api::Connection>> {
        let keys: Vec<abi::SockKey> = self.socks.keys().collect::<Result<_, _>>().context("listing SOCKHASH keys")?;
        let set: HashSet<abi::SockKey> = keys.iter().copied().collect();
        let mut out = Vec::new();
        for k in &keys {
            let peer = peer_key(k);
            let paired = set.contains(&peer);
            // List each pair once, from the side with the smaller key.
            if paired && (peer.local_ip, peer.local_port) < (k.local_ip, k.local_port) {
                continue;
            }
            out.push(bypassd_api::Connection {
                family: if is_v4_mapped(&k.local_ip) { "ipv4".into() } else { "ipv6".into() },
                local: fmt_sock(&k.local_ip, k.local_port),
                remote: fmt_sock(&k.remote_ip, k.remote_port),
                netns: k.netns,
                paired,
            });
        }
        out.sort_by(|a, b| (&a.local, &a.remote).cmp(&(&b.local, &b.remote)));
        Ok(out)
    }
}

fn meta(p: &PolicyImage) -> abi::PolicyMeta {
    abi::PolicyMeta {
        nrules: p.rules.len() as u32,
        default_action: u32::from(if p.accelerate_by_default { abi::ACTION_ACCELERATE } else { abi::ACTION_KERNEL }),
    }
}

/// The first policy, written straight into the freshly loaded maps (buffer 0, seq 0).
fn write_policy(ebpf: &mut Ebpf, p: &PolicyImage) -> Result<()> {
    if p.rules.len() > abi::MAX_RULES as usize {
        bail!("{} rules exceed the datapath's {} rule slots", p.rules.len(), abi::MAX_RULES);
    }
    let mut rules: Array<&mut MapData, abi::Rule> = Array::try_from(ebpf.map_mut(maps::RULES).context("rules map")?)?;
    for (i, r) in p.rules.iter().enumerate() {
        rules.set(i as u32, r, 0)?;
    }
    let mut pm: Array<&mut MapData, abi::PolicyMeta> = Array::try_from(ebpf.map_mut(maps::POLICY).context("policy map")?)?;
    pm.set(0, meta(p), 0)?;
    Ok(())
}

/// The receive-side programs and the optional LSM guard. Each is optional: where the
/// kernel refuses one, the datapath stays safe (stale receive state only ever keeps
/// traffic on TCP) and the loss is logged. Links are pinned so they survive restarts.
fn attach_receive_side(ebpf: &mut Ebpf, dir: &Path) {
    let mut try_one = |what: &str, f: &mut dyn FnMut(&mut Ebpf) -> Result<FdLink>, link: &str, name: &str| {
        match f(ebpf).and_then(|l| {
            l.pin(dir.join(link)).with_context(|| format!("pinning {link}"))?;
            Ok(())
        }) {
            Ok(()) => {
                if let Some(p) = ebpf.program_mut(name) {
                    let _ = p.pin(prog_pin(dir, name));
                }
                tracing::debug!("{what}: attached");
            }
            Err(e) => tracing::warn!("{what}: not available on this kernel ({e:#})"),
        }
    };
    try_one(
        "kprobe tcp_bpf_recvmsg (receivers that read with recvmsg)",
        &mut |ebpf| {
            let p: &mut KProbe = prog(ebpf, programs::RX_ENTER)?.try_into()?;
            p.load()?;
            let id = p.attach("tcp_bpf_recvmsg", 0)?;
            Ok(FdLink::try_from(p.take_link(id)?)?)
        },
        LINK_RX_ENTER,
        programs::RX_ENTER,
    );
    try_one(
        "tp_btf sock_recv_length (bytes consumed by receivers)",
        &mut |ebpf| {
            let btf = aya::Btf::from_sys_fs()?;
            let p: &mut BtfTracePoint = prog(ebpf, programs::RX_DONE)?.try_into()?;
            p.load("sock_recv_length", &btf)?;
            let id = p.attach()?;
            Ok(FdLink::from(p.take_link(id)?))
        },
        LINK_RX_DONE,
        programs::RX_DONE,
    );
    try_one(
        "kprobe tcp_splice_read (splice readers, io_uring included)",
        &mut |ebpf| {
            let p: &mut KProbe = prog(ebpf, programs::SPLICE_KPROBE)?.try_into()?;
            p.load()?;
            let id = p.attach("tcp_splice_read", 0)?;
            Ok(FdLink::try_from(p.take_link(id)?)?)
        },
        LINK_SPLICE_KPROBE,
        programs::SPLICE_KPROBE,
    );
    for (what, name, event, link) in [
        ("tracepoint syscalls:sys_enter_splice (splice readers)", programs::SPLICE_SEEN, "sys_enter_splice", LINK_SPLICE_SEEN),
        ("tracepoint syscalls:sys_enter_sendfile64 (sendfile readers)", programs::SENDFILE_SEEN, "sys_enter_sendfile64", LINK_SENDFILE_SEEN),
    ] {
        try_one(
            what,
            &mut |ebpf| {
                let p: &mut TracePoint = prog(ebpf, name)?.try_into()?;
                p.load()?;
                let id = p.attach("syscalls", event)?;
                Ok(FdLink::try_from(p.take_link(id)?)?)
            },
            link,
            name,
        );
    }
    try_one(
        "BPF LSM splice guard (lsm/file_permission)",
        &mut |ebpf| {
            let btf = aya::Btf::from_sys_fs()?;
            let p: &mut Lsm = prog(ebpf, programs::SPLICE_GUARD)?.try_into()?;
            p.load("file_permission", &btf)?;
            let id = p.attach()?;
            Ok(FdLink::from(p.take_link(id)?))
        },
        LINK_SPLICE_GUARD,
        programs::SPLICE_GUARD,
    );
}

fn prog<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::programs::Program> {
    ebpf.program_mut(name).ok_or_else(|| anyhow!("BPF object has no program {name}"))
}

/// Name what the kernel lacks instead of failing deep inside a load.
fn check_kernel() -> Result<()> {
    use aya::{maps::MapType, programs::ProgramType, sys};
    let mut missing = Vec::new();
    for (t, what) in [
        (ProgramType::SockOps, "sock_ops programs (CONFIG_CGROUP_BPF)"),
        (ProgramType::SkMsg, "sk_msg programs (CONFIG_BPF_STREAM_PARSER)"),
        (ProgramType::CgroupSock, "cgroup/sock programs (CONFIG_CGROUP_BPF)"),
    ] {
        if !sys::is_program_supported(t).unwrap_or(false) {
            missing.push(what);
        }
    }
    for (t, what) in [(MapType::SockHash, "SOCKHASH maps"), (MapType::SkStorage, "socket local storage maps")] {
        if !sys::is_map_supported(t).unwrap_or(false) {
            missing.push(what);
        }
    }
    if !missing.is_empty() {
        bail!(
            "this kernel ({}) lacks what bypassd needs: {} (or bypassd lacks CAP_BPF/CAP_SYS_ADMIN)",
            kernel_release(),
            missing.join(", ")
        );
    }
    Ok(())
}

pub fn kernel_release() -> String {
    nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_else(|_| "unknown".into())
}

/// A process name as the kernel's comm: at most 15 bytes, NUL padded.
pub fn comm_key(name: &str) -> [u8; abi::COMM_LEN] {
    let mut k = [0u8; abi::COMM_LEN];
    let b = name.as_bytes();
    let n = b.len().min(abi::COMM_LEN - 1);
    k[..n].copy_from_slice(&b[..n]);
    k
}

pub fn peer_key(k: &abi::SockKey) -> abi::SockKey {
    abi::SockKey {
        local_ip: k.remote_ip,
        remote_ip: k.local_ip,
        local_port: k.remote_port,
        remote_port: k.local_port,
        netns: k.netns,
    }
}

fn is_v4_mapped(ip: &[u8; 16]) -> bool {
    Ipv6Addr::from(*ip).to_ipv4_mapped().is_some()
}

fn fmt_sock(ip: &[u8; 16], port: u32) -> String {
    let v6 = Ipv6Addr::from(*ip);
    let ip = v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4);
    SocketAddr::new(ip, port as u16).to_string()
}
