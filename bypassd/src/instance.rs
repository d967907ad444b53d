//! One bypassd per state directory: an flock on `<state_dir>/bypassd.lock`, held for the
//! daemon's lifetime (and by `bypassd --detach`), so a second instance can neither take
//! over the D-Bus name nor retire generations another instance is building. bpffs
//! holds no regular files, hence the state directory. The holder writes its pid into
//! the file so the refusal can name it.
use anyhow::{Context, Result, bail};
use nix::fcntl::{Flock, FlockArg};
use std::{
    fs::{File, OpenOptions},
    io::{Read, Seek, Write},
    path::{Path, PathBuf},
};

pub const LOCK_FILE: &str = "bypassd.lock";

/// Held until dropped (the kernel drops it when the process exits, crash included).
#[derive(Debug)]
pub struct InstanceLock {
    _lock: Flock<File>,
    pub path: PathBuf,
}

/// Take the lock of `state_dir`, or fail naming the pid that holds it.
pub fn acquire(state_dir: &Path) -> Result<InstanceLock> {
    std::fs::create_dir_all(state_dir).with_context(|| format!("creating state directory {}", state_dir.display()))?;
    let path = state_dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening lock file {}", path.display()))?;
    let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(l) => l,
        Err((mut f, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut pid = String::new();
            let _ = f.read_to_string(&mut pid);
            let pid = pid.trim();
            let who = if pid.is_empty() { "another bypassd".to_string() } else { format!("another bypassd (pid {pid})") };
            bail!(
                "{who} holds {}: only one instance may manage a pin directory; stop it first (systemctl stop bypassd)",
                path.display()
            );
        }
        Err((_, e)) => return Err(e).with_context(|| format!("locking {}", path.display())),
    };
    lock.set_len(0).and_then(|_| lock.rewind()).with_context(|| format!("truncating {}", path.display()))?;
    writeln!(lock, "{}", std::process::id()).with_context(|| format!("writing pid to {}", path.display()))?;
    Ok(InstanceLock { _lock: lock, path })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_refused_with_the_pid() {
        let dir = std::env::temp_dir().join(format!("bypassd-lock-test-{}", std::process::id()));
        let first = acquire(&dir).expect("first lock");
        // flock locks belong to the open file description: a second open conflicts
        // even within one process.
        let err = acquire(&dir).expect_err("second lock refused");
        let msg = format!("{err:#}");
        assert!(msg.contains(&format!("pid {}", std::process::id())), "{msg}");
        assert!(msg.contains(&first.path.display().to_string()), "{msg}");
        drop(first);
        acquire(&dir).expect("free again after drop");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
