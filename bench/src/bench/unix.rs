//! AF_UNIX floor.
use super::{Plan, env::Env, exe, progress};
use crate::{
    fixtures::{Proc, check_stop, median, read_line, run_timeout},
    report::{Results, UnixPoint, size_label},
};
use anyhow::{Context, Result, bail};
use std::time::Duration;

pub(super) fn unix_section(env: &mut Env, plan: &Plan, r: &mut Results) -> Result<()> {
    let path = env.tmp.path().join("unix.sock");
    let mut cmd = env.cg_b.command(exe()?);
    cmd.args(["helper", "unix-server", "--path"]).arg(&path);
    let (p, mut out) = Proc::spawn_piped(cmd, "AF_UNIX server")?;
    env.servers.push(p);
    if read_line(&mut out)? != "ready" {
        bail!("AF_UNIX server did not start");
    }
    let reps = plan.reps.min(3);
    let mut pts: Vec<UnixPoint> = Vec::new();
    for test in ["lat", "lat_pinned", "bw"] {
        for &s in &plan.sizes {
            pts.push(UnixPoint {
                test: test.into(),
                size: s,
                unit: if test == "bw" { "MB/s".into() } else { "us".into() },
                samples: Vec::new(),
                median: f64::NAN,
            });
        }
    }
    for _ in 0..reps {
        for p in pts.iter_mut() {
            check_stop()?;
            let mut cmd = env.cg_b.command(exe()?);
            cmd.args(["helper", "unix-client", "--path"]).arg(&path).args([
                "--test",
                if p.test == "bw" { "bw" } else { "lat" },
                "--size",
                &p.size.to_string(),
                "--millis",
                &plan.unix_millis.to_string(),
            ]);
            if p.test == "lat_pinned" {
                cmd.args(["--cpu", &plan.cpu.to_string()]);
            }
            let o = run_timeout(cmd, Duration::from_secs(30))?;
            if !o.status.success() {
                bail!("AF_UNIX client: {}", String::from_utf8_lossy(&o.stderr));
            }
            let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
            p.samples.push(v["value"].as_f64().context("no value")?);
        }
    }
    for p in pts.iter_mut() {
        p.median = median(&p.samples);
        progress(&format!("AF_UNIX {} {}: {:.2} {}", p.test, size_label(p.size), p.median, p.unit));
    }
    r.unix = pts;
    Ok(())
}
