//! Link entries whose interfaces live in another network namespace (`netns =` in
//! `[[links]]`, e.g. a KubeVirt pod's). Netlink, the ethtool ioctl and TCX all act
//! on the calling thread's netns (TCX resolves the ifindex there), so that work runs
//! on a short-lived thread that entered the netns with setns(2), which needs
//! CAP_SYS_ADMIN. The pins stay on the one bpffs, which no netns affects.
use anyhow::{Context, Result, anyhow};
use std::os::unix::fs::MetadataExt;

/// Why the netns cannot be entered.
#[derive(Debug)]
pub enum Error {
    /// The file does not exist (yet): the entry waits for it, as for a missing interface.
    Missing(String),
    Other(anyhow::Error),
}

/// Which netns a path refers to now: (device, inode) of the nsfs file.
pub fn identity(path: &str) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Run `f` in the netns `path` refers to (None: this thread's own, on this thread).
pub fn run_in<T: Send>(path: Option<&str>, f: impl FnOnce() -> T + Send) -> Result<T, Error> {
    let Some(path) = path else { return Ok(f()) };
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Error::Missing(path.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied && path.starts_with("/proc/") => {
            return Err(Error::Other(anyhow::Error::new(e).context(format!(
                "opening netns {path} (the ns file of a process with capabilities bypassd lacks needs CAP_SYS_PTRACE; /run/netns/NAME files do not)"
            ))));
        }
        Err(e) => return Err(Error::Other(anyhow::Error::new(e).context(format!("opening netns {path}")))),
    };
    std::thread::scope(|s| {
        s.spawn(move || -> Result<T> {
            enter(&file, path)?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow!("link work inside netns {path} panicked"))?
    })
    .map_err(Error::Other)
}

/// setns(2) this thread into the netns of `file`.
pub fn enter(file: &std::fs::File, path: &str) -> Result<()> {
    nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("entering netns {path} (setns needs CAP_SYS_ADMIN; is {path} a network namespace?)"))
}
