//! TCX attachment of the link program: one bpf_link per interface, pinned so frames
//! keep flowing while bypassd is stopped. TCX is multi-attach: other tc programs on
//! the interface keep their place, and removing our pin detaches only our link.
use anyhow::{Context, Result};
use aya::programs::{
    LinkOrder, SchedClassifier, TcAttachType,
    links::FdLink,
    tc::TcAttachOptions,
};
use std::{
    ffi::CString,
    os::fd::{FromRawFd, OwnedFd},
    path::Path,
};

/// Attach `prog` at `ifname`'s ingress (after any TCX program already there) and pin it.
pub fn attach(prog: &mut SchedClassifier, ifname: &str, pin: &Path) -> Result<()> {
    let id = prog
        .attach_with_options(ifname, TcAttachType::Ingress, TcAttachOptions::TcxOrder(LinkOrder::default()))
        .with_context(|| format!("attaching the link program to {ifname} ingress (TCX)"))?;
    let link: FdLink = prog.take_link(id)?.try_into().context("the tc attachment is not a TCX link (kernel < 6.6?)")?;
    // The pin keeps the link; the fd aya holds is closed when the PinnedLink drops.
    link.pin(pin).with_context(|| format!("pinning {}", pin.display()))?;
    Ok(())
}

/// The ifindex a pinned TCX link is attached to: 0 once its device was deleted.
pub fn pinned_ifindex(pin: &Path) -> Result<u32> {
    let fd = obj_get(pin)?;
    let fdinfo = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", std::os::fd::AsRawFd::as_raw_fd(&fd)))
        .with_context(|| format!("reading fdinfo of {}", pin.display()))?;
    fdinfo
        .lines()
        .find_map(|l| l.strip_prefix("ifindex:").map(|v| v.trim().parse::<u32>()))
        .with_context(|| format!("{} is not a TCX link (no ifindex in its fdinfo)", pin.display()))?
        .with_context(|| format!("bad ifindex in the fdinfo of {}", pin.display()))
}

/// BPF_OBJ_GET: open a pinned object.
fn obj_get(pin: &Path) -> Result<OwnedFd> {
    #[repr(C)]
    struct ObjAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: [u8; 108],
    }
    let path = CString::new(pin.as_os_str().as_encoded_bytes()).context("pin path has a NUL byte")?;
    let attr = ObjAttr { pathname: path.as_ptr() as u64, bpf_fd: 0, file_flags: 0, path_fd: 0, _pad: [0; 108] };
    const BPF_OBJ_GET: libc::c_long = 7;
    // SAFETY: attr outlives the call and is the size the kernel is told.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, &attr as *const ObjAttr, std::mem::size_of::<ObjAttr>()) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("opening pinned link {}", pin.display()));
    }
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
