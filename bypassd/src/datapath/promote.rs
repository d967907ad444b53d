//! Promotion of sockets to senders (`send_mode = "auto"`, see ebpf/bpf/sendmode.h).
//!
//! sock_ops can insert into a SOCKHASH only at establishment, so a socket whose
//! traffic turns request/response later asks for promotion: sock_ops marks its bp_rx
//! entry and bumps `bp_promote_seq`. This thread notices the bump and runs the
//! iter/sockmap program over bp_socks, which inserts every asking socket into
//! bp_senders. Without this thread (daemon stopped) nothing is promoted: the sockets
//! stay targets only and send at the kernel's speed (fail open).
use super::{
    pins,
    sockopt_link::{Attr, bpf, obj_get},
};
use anyhow::{Context, Result};
use aya::maps::{Array, Map, MapData};
use bypassd_ebpf::{maps, programs};
use std::{
    io::Read,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
    },
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

const BPF_ITER_CREATE: libc::c_long = 33;

/// How often the request counter is read: promotion follows a request within this.
const POLL: Duration = Duration::from_millis(5);

/// The link pin name of the promotion iterator.
pub const LINK: &str = "promote";

/// The running promoter of one datapath generation; stops when dropped.
pub struct Promoter {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Promoter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What the thread needs, opened from the generation's pins.
struct Handles {
    link: OwnedFd,
    seq: Array<MapData, u64>,
}

impl Handles {
    fn open(gen_dir: &Path) -> Result<Handles> {
        let link = obj_get(&pins::link_pin(gen_dir, LINK))?;
        let p = pins::map_pin(gen_dir, maps::PROMOTE_SEQ);
        let data = MapData::from_pin(&p).with_context(|| format!("opening pinned map {}", p.display()))?;
        let seq = Array::try_from(Map::from_map_data(data)?).with_context(|| format!("pinned map {}", p.display()))?;
        Ok(Handles { link, seq })
    }

    /// Run the iterator once: every socket that asked is promoted (or marked failed).
    fn run(&self) -> Result<()> {
        let mut a = Attr([0; 32]);
        a.0[0] = self.link.as_raw_fd() as u32; // iter_create.link_fd
        let fd = bpf(BPF_ITER_CREATE, &a).context("bpf(BPF_ITER_CREATE) for the promotion iterator")?;
        // SAFETY: the kernel returned a new file descriptor that we now own.
        let mut f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd as i32) });
        let mut sink = Vec::new();
        f.read_to_end(&mut sink).context("running the promotion iterator")?;
        Ok(())
    }
}

/// Start promoting for the generation in `gen_dir`. None when it has no promotion
/// iterator (the kernel refused iter/sockmap): sockets in auto mode then stay targets.
pub fn spawn(gen_dir: &Path) -> Option<Promoter> {
    if !pins::link_pin(gen_dir, LINK).exists() {
        tracing::info!("no {} iterator pinned: send_mode auto never promotes (sockets send at kernel speed)", programs::PROMOTE);
        return None;
    }
    let h = match Handles::open(gen_dir) {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!("send_mode auto: cannot open the promotion iterator ({e:#}); nothing will be promoted");
            return None;
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let thread = std::thread::Builder::new().name("promote".into()).spawn(move || run(h, &s)).ok()?;
    Some(Promoter { stop, thread: Some(thread) })
}

fn run(h: Handles, stop: &AtomicBool) {
    let mut seen = h.seq.get(&0, 0).unwrap_or(0);
    let mut warned = false;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(POLL);
        let Ok(now) = h.seq.get(&0, 0) else { continue };
        if now == seen {
            continue;
        }
        seen = now;
        if let Err(e) = h.run()
            && !warned
        {
            tracing::warn!("send_mode auto: promotion failed ({e:#}); those sockets stay targets only");
            warned = true;
        }
    }
}
