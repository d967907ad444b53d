//! Cost to traffic the policy leaves on the kernel path: the same qperf pair (in cg_a,
//! on ports the policy sends to the kernel) with a bypassd datapath attached, and with
//! no bypassd datapath anywhere on the host (detached with `bypassd --detach`). Runs
//! before the main daemon starts, so "detached" really means no hooks of ours at all:
//! cgroup programs and any global ones (tracepoints) alike.
use super::{Mode, Plan, env::Env, progress};
use crate::{
    fixtures::{self, Counters, Snap, check_stop, median},
    report::{Results, UnaccelPoint, size_label},
};
use anyhow::{Result, bail};
use bypass_testsupport::{Daemon, PinDir};
use bypassd_ebpf::abi::Counter;
use std::time::Duration;

/// A bypassd on cg_a that can be attached and detached between runs.
struct Toggle {
    daemon: Option<Daemon>,
    counters: Option<Counters>,
    pin: PinDir,
    cfg: String,
}

impl Toggle {
    fn attach(&mut self) -> Result<()> {
        if self.daemon.is_none() {
            let (d, _) = Daemon::start_timed(&fixtures::bypassd_bin()?, &self.cfg, &[])?;
            self.daemon = Some(d);
        }
        self.counters = Some(Counters::open(self.pin.path())?);
        Ok(())
    }

    /// Stop bypassd and remove its datapath the way an operator would.
    fn detach(&mut self) -> Result<()> {
        self.counters = None;
        if let Some(mut d) = self.daemon.take() {
            d.stop();
            let o = d.tool(&["--detach"]);
            if !o.status.success() {
                bail!("bypassd --detach: {}", String::from_utf8_lossy(&o.stderr));
            }
        }
        Ok(())
    }
}

pub(super) fn unaccel_section(env: &mut Env, plan: &Plan, r: &mut Results) -> Result<()> {
    // Control port base, data port base+1: both in the policy's kernel range.
    let (lp, ip) = (env.base, env.base + 1);
    env.qperf_server(Mode::Bypass, "loopback", lp)?;
    std::thread::sleep(Duration::from_millis(300));
    env.servers_alive()?;
    let pin = PinDir::new();
    let cfg = env.config_a(pin.path())?;
    let mut tg = Toggle { daemon: None, counters: None, pin, cfg };
    let cases: [(&str, u32); 3] = [("tcp_lat", 1), ("tcp_bw", 1024), ("tcp_bw", 16384)];
    let mut pts: Vec<UnaccelPoint> = cases
        .iter()
        .map(|(t, s)| UnaccelPoint {
            test: t.to_string(),
            size: *s,
            unit: if *t == "tcp_bw" { "MB/s".into() } else { "us".into() },
            hooks: Vec::new(),
            no_hooks: Vec::new(),
            hooks_median: f64::NAN,
            no_hooks_median: f64::NAN,
            cost: f64::NAN,
            hooks_counters: Snap::default(),
            verified: false,
        })
        .collect();
    let mut detached_clean = true;
    for rep in 0..plan.unaccel_reps {
        // on, off | off, on | on, off …: one attach or detach per repetition.
        let order = if rep % 2 == 0 { [true, false] } else { [false, true] };
        for attached in order {
            check_stop()?;
            if attached {
                tg.attach()?;
                if r.global_hooks.is_none() {
                    r.global_hooks = Some(fixtures::global_hooks(tg.pin.path())?);
                }
            } else {
                tg.detach()?;
                let left: Vec<_> = fixtures::effective_progs(&env.cg_a.path)?;
                if !left.is_empty() {
                    detached_clean = false;
                    progress(&format!("  ⚠ programs still effective on the cgroup after detach: {left:?}"));
                }
            }
            for p in pts.iter_mut() {
                check_stop()?;
                let q = env.qperf(tg.counters.as_ref(), Mode::Bypass, "loopback", lp, Some(ip), &p.test, p.size, plan.secs, Some(plan.cpu))?;
                progress(&format!(
                    "unaccelerated {} {} {}: {:.2} {} (policy_kernel +{}, inserted +{}, redirected +{})",
                    p.test,
                    size_label(p.size),
                    if attached { "attached" } else { "detached" },
                    q.value,
                    p.unit,
                    q.delta.get(Counter::PolicyKernel),
                    q.delta.get(Counter::SocketsInserted),
                    q.delta.get(Counter::RedirectedMsgs)
                ));
                if attached {
                    p.hooks.push(q.value);
                    p.hooks_counters.add(&q.delta);
                } else {
                    p.no_hooks.push(q.value);
                }
            }
        }
    }
    tg.detach()?;
    for p in pts.iter_mut() {
        p.hooks_median = median(&p.hooks);
        p.no_hooks_median = median(&p.no_hooks);
        p.cost = if p.unit == "us" { p.hooks_median / p.no_hooks_median - 1.0 } else { 1.0 - p.hooks_median / p.no_hooks_median };
        let c = &p.hooks_counters;
        p.verified = detached_clean
            && c.get(Counter::PolicyKernel) > 0
            && c.get(Counter::SocketsInserted) == 0
            && c.get(Counter::RedirectedMsgs) == 0
            && c.get(Counter::PassedMsgs) == 0;
        progress(&format!(
            "unaccelerated {} {}: detached {:.2}, attached {:.2} {} → cost {:+.1} %",
            p.test,
            size_label(p.size),
            p.no_hooks_median,
            p.hooks_median,
            p.unit,
            p.cost * 100.0
        ));
    }
    r.unaccelerated = pts;
    Ok(())
}
