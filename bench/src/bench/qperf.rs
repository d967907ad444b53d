//! qperf: tcp_lat (unpinned, pinned) and tcp_bw, loopback and veth, A/B interleaved.
use super::{Mode, Plan, env::Env, progress};
use crate::{
    fixtures::check_stop,
    report::{Point, Results, redirect_ok, size_label},
};
use anyhow::Result;
use bypassd_ebpf::abi::Counter;
use std::time::Duration;

pub(super) fn qperf_section(env: &mut Env, plan: &Plan, r: &mut Results) -> Result<()> {
    let base = env.base;
    let ports = |topo: &str, m: Mode| -> u16 {
        let t = if topo == "veth" { 2 } else { 0 };
        base + 3 + t + if m == Mode::Kernel { 1 } else { 0 }
    };
    let mut lps = Vec::new();
    for topo in &plan.topologies {
        for m in [Mode::Bypass, Mode::Kernel] {
            lps.push((*topo, m, ports(topo, m)));
        }
    }
    for (topo, m, lp) in &lps {
        env.qperf_server(*m, topo, *lp)?;
    }
    std::thread::sleep(Duration::from_millis(300));
    env.servers_alive()?;

    let tests: [(&str, &str, bool); 3] = [("tcp_lat", "tcp_lat", false), ("tcp_lat_pinned", "tcp_lat", true), ("tcp_bw", "tcp_bw", false)];
    let mut points: Vec<Point> = Vec::new();
    for topo in &plan.topologies {
        for (name, _, _) in &tests {
            if !plan.tests.is_empty() && !plan.tests.iter().any(|t| t == name) {
                continue;
            }
            for &s in &plan.sizes {
                points.push(Point::new(topo, name, s));
            }
        }
    }
    let total = points.len() * plan.reps * 2;
    let mut done = 0;
    for rep in 0..plan.reps {
        for p in points.iter_mut() {
            let (_, qtest, pinned) = *tests.iter().find(|t| t.0 == p.test).unwrap();
            // A B on even repetitions, B A on odd ones: neither always goes first.
            let order = if rep % 2 == 0 { [Mode::Bypass, Mode::Kernel] } else { [Mode::Kernel, Mode::Bypass] };
            for m in order {
                check_stop()?;
                let lp = ports(&p.topology, m);
                let q = env.qperf(Some(env.counters()), m, &p.topology, lp, None, qtest, p.size, plan.secs, pinned.then_some(plan.cpu))?;
                let (v, d) = (q.value, q.delta);
                done += 1;
                match m {
                    Mode::Bypass => {
                        p.bypass.push(v);
                        p.bypass_counters.add(&d);
                        p.bypass_send_msgs += q.send_msgs;
                        p.bypass_out_segs += q.out_segs.unwrap_or(0);
                    }
                    Mode::Kernel => {
                        p.kernel.push(v);
                        p.kernel_counters.add(&d);
                        p.kernel_send_msgs += q.send_msgs;
                        p.kernel_out_segs += q.out_segs.unwrap_or(0);
                    }
                }
                progress(&format!(
                    "[{done}/{total}] {} {} {} {}: {:.2} {}  (redirected {}, passed {})",
                    p.topology,
                    p.test,
                    size_label(p.size),
                    m.name(),
                    v,
                    p.unit,
                    d.get(Counter::RedirectedMsgs),
                    d.get(Counter::PassedMsgs)
                ));
                if m == Mode::Bypass && !redirect_ok(&d) {
                    progress("  ⚠ this bypass run was NOT redirected (see counters)");
                }
                if m == Mode::Kernel && !d.is_zero() {
                    progress(&format!("  ⚠ the datapath counters moved during a kernel run: {:?}", d.to_map()));
                }
            }
        }
        // Keep what we have so far, in case the run is cut short.
        r.qperf = points.iter().map(clone_point).collect();
        r.qperf.iter_mut().for_each(Point::finish);
    }
    for p in points.iter_mut() {
        p.finish();
        progress(&format!(
            "{} {} {}: kernel {:.2} bypass {:.2} {} → ratio {:.2}{}",
            p.topology,
            p.test,
            size_label(p.size),
            p.kernel_median,
            p.bypass_median,
            p.unit,
            p.ratio,
            if p.verified { "" } else { "  ⚠ NOT VERIFIED" }
        ));
    }
    r.qperf = points;
    Ok(())
}

fn clone_point(p: &Point) -> Point {
    let mut q = Point::new(&p.topology, &p.test, p.size);
    q.kernel = p.kernel.clone();
    q.bypass = p.bypass.clone();
    q.bypass_counters = p.bypass_counters;
    q.kernel_counters = p.kernel_counters;
    q.kernel_send_msgs = p.kernel_send_msgs;
    q.bypass_send_msgs = p.bypass_send_msgs;
    q.kernel_out_segs = p.kernel_out_segs;
    q.bypass_out_segs = p.bypass_out_segs;
    q
}
