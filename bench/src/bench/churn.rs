//! Connection churn.
use super::{Mode, Plan, env::Env, exe, progress};
use crate::{
    fixtures::{check_stop, median, run_timeout},
    report::{self, Churn, Results},
};
use anyhow::{Context, Result, bail};
use bypassd_ebpf::abi::Counter;
use std::time::Duration;

pub(super) fn churn_section(env: &mut Env, plan: &Plan, r: &mut Results) -> Result<()> {
    let mut c = Churn { topology: "loopback".into(), ..Default::default() };
    for rep in 0..plan.churn_reps {
        let order = if rep % 2 == 0 { [Mode::Bypass, Mode::Kernel] } else { [Mode::Kernel, Mode::Bypass] };
        for m in order {
            check_stop()?;
            // Each run in a network namespace of its own: see the helper.
            let mut cmd = env.cg(m).command(exe()?);
            cmd.args(["helper", "churn", "--millis", &plan.churn_millis.to_string()]);
            let before = env.counters().read()?;
            let o = run_timeout(cmd, Duration::from_secs(60))?;
            // Let the last connection's server side close before reading counters.
            std::thread::sleep(Duration::from_millis(100));
            let d = env.counters().read()?.since(&before);
            if !o.status.success() {
                bail!("churn client: {}", String::from_utf8_lossy(&o.stderr));
            }
            let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
            let rate = v["rate"].as_f64().context("rate")?;
            progress(&format!(
                "churn {}: {:.0} conn/s ({} conns, {} errors; inserted {}, redirected {})",
                m.name(),
                rate,
                v["conns"],
                v["errors"],
                d.get(Counter::SocketsInserted),
                d.get(Counter::RedirectedMsgs)
            ));
            match m {
                Mode::Bypass => {
                    c.bypass.push(rate);
                    c.bypass_counters.add(&d);
                    c.bypass_connections += v["conns"].as_u64().unwrap_or(0);
                }
                Mode::Kernel => {
                    c.kernel.push(rate);
                    c.kernel_counters.add(&d);
                }
            }
        }
    }
    c.kernel_median = median(&c.kernel);
    c.bypass_median = median(&c.bypass);
    c.ratio = c.bypass_median / c.kernel_median;
    c.cost = 1.0 - c.ratio;
    // Every connection: both sockets inserted (sock_ops ran on every connection, which is
    // the cost measured). Its 1-byte messages go before the receiver's first read, so the
    // recvmsg-first rule keeps them on TCP: each must carry a counted safety reason.
    let n = c.bypass_connections;
    let passed = c.bypass_counters.get(Counter::PassedMsgs);
    c.verified = c.kernel_counters.is_zero()
        && c.bypass_counters.get(Counter::SocketsInserted) >= 2 * n
        && passed <= report::safety_reasons(&c.bypass_counters) + 16;
    progress(&format!("churn: kernel {:.0}, bypass {:.0} conn/s, cost {:+.1} %", c.kernel_median, c.bypass_median, c.cost * 100.0));
    r.churn = Some(c);
    Ok(())
}
