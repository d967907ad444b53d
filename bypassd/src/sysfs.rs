//! The kernel file systems bypassd needs: bpffs for pins and the cgroup v2 mount.
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Find the cgroup v2 mount point from mountinfo (hybrid hosts have it at
/// /sys/fs/cgroup/unified, unified ones at /sys/fs/cgroup).
pub fn cgroup2_mount() -> Result<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    cgroup2_mount_in(&info).context(
        "no cgroup v2 file system is mounted (looked for fstype cgroup2 in /proc/self/mountinfo); \
         mount one with: mount -t cgroup2 none /sys/fs/cgroup",
    )
}

pub fn cgroup2_mount_in(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "<id> <parent> <maj:min> <root> <mountpoint> <opts> [optional...] - <fstype> <source> <superopts>"
        let (pre, post) = line.split_once(" - ")?;
        let fstype = post.split_whitespace().next()?;
        let mut f = pre.split_whitespace();
        let root = f.nth(3)?;
        let mount = f.next()?;
        (fstype == "cgroup2" && root == "/").then(|| PathBuf::from(unescape(mount)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).map(|s| s.filesystem_type().0 as i64 == BPF_FS_MAGIC).unwrap_or(false)
}

/// Make sure the pin directory's parent lives on a bpffs, mounting /sys/fs/bpf if
/// it is not one yet (hosts without systemd, containers).
pub fn ensure_bpffs(pin_dir: &Path) -> Result<()> {
    let parent = pin_dir.parent().unwrap_or(Path::new("/"));
    if is_bpffs(parent) {
        return Ok(());
    }
    let sys_bpf = Path::new("/sys/fs/bpf");
    if parent.starts_with(sys_bpf) && !is_bpffs(sys_bpf) {
        nix::mount::mount(Some("bpf"), sys_bpf, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
            .context("mounting bpffs at /sys/fs/bpf (needs CAP_SYS_ADMIN; or mount it before starting bypassd)")?;
        tracing::info!("mounted bpffs at /sys/fs/bpf");
        if is_bpffs(parent) {
            return Ok(());
        }
    }
    bail!(
        "pin directory {} is not on a BPF file system (bpffs); pins there would not survive a restart",
        pin_dir.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_and_unified_layouts() {
        let hybrid = "30 25 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n\
                      35 30 0:31 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_mount_in(hybrid), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        let unified = "29 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(cgroup2_mount_in(unified), Some(PathBuf::from("/sys/fs/cgroup")));
        let bind = "29 23 0:26 /sub /mnt/x rw - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_mount_in(bind), None);
        assert_eq!(cgroup2_mount_in("40 1 0:5 / /with\\040space rw - cgroup2 none rw\n"), Some(PathBuf::from("/with space")));
    }
}
