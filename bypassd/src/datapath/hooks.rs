//! How each kind of BPF program is loaded and attached. A datapath describes its
//! programs once, in a table of [`Program`]s (see `sock.rs`); building, adopting and
//! status iterate that table, so a new hook is one table entry.
use super::pins;
use anyhow::{Context, Result, anyhow};
use aya::{
    Ebpf,
    programs::{BtfTracePoint, CgroupAttachMode, CgroupSock, CgroupSockopt, KProbe, Lsm, SkMsg, SockOps, TracePoint, links::FdLink},
};
use std::{
    fs::File,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::Path,
};

/// Where a program attaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// cgroup sock_ops, on the target cgroup (bpf_link).
    SockOps,
    /// cgroup/sock_create, on the target cgroup (bpf_link).
    SockCreate,
    /// sk_msg verdict on the senders' SOCKHASH: the attachment lives in the map, no link.
    SkMsg,
    /// kprobe on a kernel function.
    KProbe(&'static str),
    /// BTF-enabled raw tracepoint (tp_btf) on an event.
    TpBtf(&'static str),
    /// Classic tracepoint (category, event).
    TracePoint(&'static str, &'static str),
    /// BPF LSM hook.
    Lsm(&'static str),
    /// cgroup/getsockopt, on the target cgroup (bpf_link made by sockopt_link).
    CgroupGetsockopt,
}

/// One program of a datapath, described once.
#[derive(Debug, Clone, Copy)]
pub struct Program {
    /// The program (C function) name in the BPF object.
    pub name: &'static str,
    pub hook: Hook,
    /// Name of its link pin (`link_<name>`); None when the attachment lives in a map.
    pub link: Option<&'static str>,
    /// A required hook failing fails the build; an optional one is logged and skipped.
    pub required: bool,
    /// What it does, for logs.
    pub what: &'static str,
}

/// What programs attach to: the target cgroup, the senders' SOCKHASH, and the kernel's
/// BTF (parsed once per build: tp_btf and LSM programs need it; None if unreadable).
pub struct AttachTo<'a> {
    pub cgroup: &'a File,
    /// bp_senders: the sockets whose sends run sk_msg.
    pub senders: BorrowedFd<'a>,
    pub btf: Option<&'a aya::Btf>,
}

fn kernel_btf<'a>(to: &AttachTo<'a>) -> Result<&'a aya::Btf> {
    to.btf.context("the kernel's BTF (/sys/kernel/btf/vmlinux) could not be read")
}

impl Program {
    /// True when this program is attached in the pinned generation `gen_dir`
    /// (a link pin for linked hooks, the program pin for map attachments).
    pub fn is_pinned(&self, gen_dir: &Path) -> bool {
        match self.link {
            Some(l) => pins::link_pin(gen_dir, l).exists(),
            None => pins::prog_pin(gen_dir, self.name).exists(),
        }
    }

    /// Load, attach and pin this program (and its link) into `dir`.
    pub fn attach(&self, ebpf: &mut Ebpf, to: &AttachTo<'_>, dir: &Path) -> Result<()> {
        let name = self.name;
        let prog = ebpf.program_mut(name).ok_or_else(|| anyhow!("BPF object has no program {name}"))?;
        let link = match self.hook {
            Hook::SockOps => {
                let p: &mut SockOps = prog.try_into()?;
                p.load()?;
                crate::startup::step(format!("program {name}: verify"));
                // cgroup bpf_links always sit beside other programs (BPF_F_ALLOW_MULTI
                // semantics) and refuse attach flags: the mode must be the flag-less default.
                let id = p.attach(to.cgroup, CgroupAttachMode::Single)?;
                Some(FdLink::try_from(p.take_link(id)?).context("sock_ops link is not a bpf_link")?)
            }
            Hook::SockCreate => {
                let p: &mut CgroupSock = prog.try_into()?;
                p.load()?;
                crate::startup::step(format!("program {name}: verify"));
                let id = p.attach(to.cgroup, CgroupAttachMode::Single)?;
                Some(FdLink::try_from(p.take_link(id)?).context("sock_create link is not a bpf_link")?)
            }
            Hook::SkMsg => {
                let p: &mut SkMsg = prog.try_into()?;
                p.load()?;
                crate::startup::step(format!("program {name}: verify"));
                attach_to_map(p.fd()?.as_fd(), to.senders, BPF_SK_MSG_VERDICT)?;
                None
            }
            Hook::KProbe(func) => {
                let p: &mut KProbe = prog.try_into()?;
                p.load()?;
                crate::startup::step(format!("program {name}: verify"));
                let id = p.attach(func, 0)?;
                Some(FdLink::try_from(p.take_link(id)?)?)
            }
            Hook::TpBtf(event) => {
                let p: &mut BtfTracePoint = prog.try_into()?;
                p.load(event, kernel_btf(to)?)?;
                crate::startup::step(format!("program {name}: verify"));
                let id = p.attach()?;
                Some(FdLink::from(p.take_link(id)?))
            }
            Hook::TracePoint(category, event) => {
                let p: &mut TracePoint = prog.try_into()?;
                p.load()?;
                crate::startup::step(format!("program {name}: verify"));
                let id = p.attach(category, event)?;
                Some(FdLink::try_from(p.take_link(id)?)?)
            }
            Hook::CgroupGetsockopt => {
                let p: &mut CgroupSockopt = prog.try_into()?;
                p.load()?;
                crate::startup::step(format!("program {name}: verify"));
                // aya cannot hand this link out as an FdLink: created and pinned there.
                let pin = pins::link_pin(dir, self.link.context("getsockopt needs a link pin")?);
                super::sockopt_link::attach_getsockopt(p.fd()?.as_fd(), to.cgroup.as_fd(), &pin)?;
                None
            }
            Hook::Lsm(hook) => {
                let p: &mut Lsm = prog.try_into()?;
                p.load(hook, kernel_btf(to)?)?;
                crate::startup::step(format!("program {name}: verify"));
                let id = p.attach()?;
                Some(FdLink::from(p.take_link(id)?))
            }
        };
        if let (Some(link), Some(l)) = (link, self.link) {
            link.pin(pins::link_pin(dir, l)).with_context(|| format!("pinning link {l}"))?;
        }
        let prog = ebpf.program_mut(name).ok_or_else(|| anyhow!("BPF object has no program {name}"))?;
        prog.pin(pins::prog_pin(dir, name)).with_context(|| format!("pinning program {name}"))?;
        Ok(())
    }
}

impl Program {
    /// Load (verify) and pin a tp_btf program without attaching it: a hook attached
    /// later, only while it is needed ([`Program::link_pinned`]).
    pub fn load_unattached(&self, ebpf: &mut Ebpf, to: &AttachTo<'_>, dir: &Path) -> Result<()> {
        let Hook::TpBtf(event) = self.hook else {
            anyhow::bail!("{} is not a tp_btf program: only those attach on demand", self.name);
        };
        let prog = ebpf.program_mut(self.name).ok_or_else(|| anyhow!("BPF object has no program {}", self.name))?;
        let p: &mut BtfTracePoint = prog.try_into()?;
        p.load(event, kernel_btf(to)?)?;
        crate::startup::step(format!("program {}: verify", self.name));
        p.pin(pins::prog_pin(dir, self.name)).with_context(|| format!("pinning program {}", self.name))?;
        Ok(())
    }

    /// True when the program is loaded and pinned in `gen_dir`, attached or not.
    pub fn is_loaded(&self, gen_dir: &Path) -> bool {
        pins::prog_pin(gen_dir, self.name).exists()
    }

    /// Attach a pinned tp_btf program of `gen_dir` and pin its link (no-op when attached).
    pub fn link_pinned(&self, gen_dir: &Path) -> Result<()> {
        let (Some(l), Hook::TpBtf(_)) = (self.link, self.hook) else {
            anyhow::bail!("{} is not a tp_btf program: only those attach on demand", self.name);
        };
        if self.is_pinned(gen_dir) {
            return Ok(());
        }
        let pin = pins::prog_pin(gen_dir, self.name);
        super::sockopt_link::attach_pinned_tp_btf(&pin, &pins::link_pin(gen_dir, l))
            .with_context(|| format!("attaching {}", self.name))
    }

    /// The kernel's view, not the pins': whether a live link runs this generation's program.
    pub fn kernel_linked(&self, gen_dir: &Path) -> Result<bool> {
        let pin = pins::prog_pin(gen_dir, self.name);
        if !pin.exists() {
            return Ok(false);
        }
        let id = aya::programs::ProgramInfo::from_pin(&pin).with_context(|| format!("reading {}", pin.display()))?.id();
        // A link may go between listing its id and opening it (someone else's detach).
        Ok(aya::programs::loaded_links().flatten().any(|l| l.program_id() == id))
    }

    /// Detach by unpinning its link (the link holds no other reference of ours).
    pub fn unlink_pinned(&self, gen_dir: &Path) -> Result<()> {
        let Some(l) = self.link else { return Ok(()) };
        let pin = pins::link_pin(gen_dir, l);
        match std::fs::remove_file(&pin) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e).with_context(|| format!("unpinning {}", pin.display())),
            _ => Ok(()),
        }
    }
}

/// Attach every program of `table` in order: required ones must attach; an optional
/// one the kernel refuses is logged (the datapath stays safe without it).
pub fn attach_all(table: &[Program], ebpf: &mut Ebpf, to: &AttachTo<'_>, dir: &Path) -> Result<()> {
    for p in table {
        match p.attach(ebpf, to, dir) {
            Ok(()) => tracing::debug!("{}: attached", p.what),
            Err(e) if p.required => return Err(e).with_context(|| format!("attaching {} ({})", p.name, p.what)),
            Err(e) => tracing::warn!("{}: not available on this kernel ({e:#})", p.what),
        }
        crate::startup::step(format!("program {}", p.name));
    }
    Ok(())
}

/// `bpf_attach_type` BPF_SK_MSG_VERDICT (uapi/linux/bpf.h).
const BPF_SK_MSG_VERDICT: u32 = 7;
const BPF_PROG_ATTACH: libc::c_long = 8;

/// BPF_PROG_ATTACH a program to a map without keeping any file descriptor.
///
/// aya's link for this keeps duplicates of the program and map fds and detaches on
/// drop; forgetting it (to keep the attachment) leaked both, and with them every old
/// generation, until the daemon exited. The attachment lives in the map: when the
/// map's last pin and fd go, the kernel releases the program. Sockets still in the
/// map keep their own reference to it, so open connections are unaffected.
fn attach_to_map(prog: BorrowedFd<'_>, map: BorrowedFd<'_>, attach_type: u32) -> Result<()> {
    #[repr(C)]
    #[derive(Default)]
    struct ProgAttachAttr {
        target_fd: u32,
        attach_bpf_fd: u32,
        attach_type: u32,
        attach_flags: u32,
        replace_bpf_fd: u32,
    }
    let attr = ProgAttachAttr {
        target_fd: map.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type,
        ..Default::default()
    };
    // SAFETY: attr is a valid, initialised prefix of union bpf_attr for BPF_PROG_ATTACH;
    // the kernel reads exactly size_of::<ProgAttachAttr>() bytes.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_PROG_ATTACH, &attr as *const ProgAttachAttr, size_of::<ProgAttachAttr>())
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error()).context("BPF_PROG_ATTACH to the SOCKHASH");
    }
    Ok(())
}

/// The kernel features every datapath needs, named instead of failing deep in a load.
pub fn check_kernel() -> Result<()> {
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
        anyhow::bail!(
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
