//! Pinned bpf_links aya 0.14 cannot make: the cgroup/getsockopt program
//! (Hook::CgroupGetsockopt; aya creates the link but cannot hand it out as a pinnable
//! `FdLink` for this program type), and the link of a pinned tp_btf program (aya's `from_pin` asks
//! for the program's BTF by id, which needs CAP_SYS_ADMIN; the unit does not grant it).
//! Made here with the bpf(2) commands they take.
use anyhow::{Context, Result, bail};
use std::{
    ffi::CString,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    os::unix::ffi::OsStrExt,
    path::Path,
};

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_RAW_TRACEPOINT_OPEN: libc::c_long = 17;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_CGROUP_GETSOCKOPT: u32 = 21;

/// `union bpf_attr`, large enough for these commands (the kernel zero-checks the tail).
#[repr(C, align(8))]
pub(super) struct Attr(pub(super) [u32; 32]);

pub(super) fn bpf(cmd: libc::c_long, attr: &Attr) -> std::io::Result<i64> {
    // SAFETY: attr is a valid, initialised bpf_attr of the size passed.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *const Attr, std::mem::size_of::<Attr>()) };
    if r < 0 { Err(std::io::Error::last_os_error()) } else { Ok(r) }
}

/// Attach `prog` to `cgroup` as a multi-attach bpf_link (cgroup/getsockopt) and pin it at `pin`.
pub fn attach_getsockopt(prog: BorrowedFd<'_>, cgroup: BorrowedFd<'_>, pin: &Path) -> Result<()> {
    let mut a = Attr([0; 32]);
    a.0[0] = prog.as_raw_fd() as u32; // link_create.prog_fd
    a.0[1] = cgroup.as_raw_fd() as u32; // link_create.target_fd
    a.0[2] = BPF_CGROUP_GETSOCKOPT; // link_create.attach_type
    let fd = bpf(BPF_LINK_CREATE, &a).context("bpf(BPF_LINK_CREATE) for cgroup/getsockopt")?;
    // SAFETY: the kernel returned a new file descriptor that we now own.
    let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    pin_link(&link, pin)
}

/// Attach the tp_btf program pinned at `prog_pin` to its BTF-typed tracepoint (chosen
/// at load) and pin the link at `link_pin`.
pub fn attach_pinned_tp_btf(prog_pin: &Path, link_pin: &Path) -> Result<()> {
    let prog = obj_get(prog_pin)?;
    let mut a = Attr([0; 32]);
    // raw_tracepoint.name stays NULL: a tp_btf program names its target at load.
    a.0[2] = prog.as_raw_fd() as u32; // raw_tracepoint.prog_fd
    let fd = bpf(BPF_RAW_TRACEPOINT_OPEN, &a)
        .with_context(|| format!("bpf(BPF_RAW_TRACEPOINT_OPEN) for {}", prog_pin.display()))?;
    // SAFETY: the kernel returned a new file descriptor that we now own.
    let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    pin_link(&link, link_pin)
}

/// Open a pinned BPF object (program, map or link) by path.
pub(super) fn obj_get(pin: &Path) -> Result<OwnedFd> {
    let path = CString::new(pin.as_os_str().as_bytes()).context("pin path contains NUL")?;
    let mut a = Attr([0; 32]);
    let ptr = path.as_ptr() as u64;
    a.0[0] = ptr as u32; // obj.pathname (u64)
    a.0[1] = (ptr >> 32) as u32;
    let fd = bpf(BPF_OBJ_GET, &a).with_context(|| format!("opening pinned object {}", pin.display()))?;
    // SAFETY: the kernel returned a new file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn pin_link(link: &OwnedFd, pin: &Path) -> Result<()> {
    let path = CString::new(pin.as_os_str().as_bytes()).context("pin path contains NUL")?;
    let mut p = Attr([0; 32]);
    let ptr = path.as_ptr() as u64;
    p.0[0] = ptr as u32; // obj.pathname (u64)
    p.0[1] = (ptr >> 32) as u32;
    p.0[2] = link.as_raw_fd() as u32; // obj.bpf_fd
    if let Err(e) = bpf(BPF_OBJ_PIN, &p) {
        bail!("pinning the link at {}: {e}", pin.display());
    }
    Ok(())
}
