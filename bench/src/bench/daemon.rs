//! The daemon: start, restart, policy edit, idle CPU, memory with N connections.
use super::{
    Mode, Plan,
    env::{Env, config},
    exe, progress, sleep_checked,
};
use crate::{
    fixtures::{self, Counters, Proc, check_stop, median, read_line, run_timeout},
    report::{DaemonFigures, Results},
};
use anyhow::{Context, Result, bail};
use bypass_testsupport::{Daemon, PinDir, TempDir, TestCgroup, dbus::SystemBus};
use bypassd_ebpf::abi::Counter;
use std::{
    process::Command,
    time::{Duration, Instant},
};

pub(super) fn daemon_section(env: &mut Env, plan: &Plan, r: &mut Results) -> Result<()> {
    let mut d = DaemonFigures::default();
    let pid = env.daemon().pid();

    // Idle CPU first, while nothing else of ours runs.
    let hz = fixtures::clock_ticks_per_sec();
    let t0 = fixtures::cpu_ticks(pid)?;
    let n0 = fixtures::cpu_ns(pid)?;
    let w0 = Instant::now();
    sleep_checked(Duration::from_secs(plan.idle_secs))?;
    let t1 = fixtures::cpu_ticks(pid)?;
    let n1 = fixtures::cpu_ns(pid)?;
    d.idle_cpu_secs = w0.elapsed().as_secs_f64();
    d.idle_cpu_percent = (t1 - t0) as f64 / hz as f64 / d.idle_cpu_secs * 100.0;
    d.idle_cpu_percent_schedstat = (n1.saturating_sub(n0)) as f64 / 1e9 / d.idle_cpu_secs * 100.0;
    progress(&format!(
        "idle CPU: {:.3} % (ticks), {:.4} % (schedstat) over {:.1} s",
        d.idle_cpu_percent, d.idle_cpu_percent_schedstat, d.idle_cpu_secs
    ));

    // Policy edit round trip through bypassctl and D-Bus, on the main daemon: add a
    // runtime rule, then remove it; each must reach the kernel (policy seq + 1).
    let ctl = fixtures::bypassctl_bin()?;
    let bus_env = env.bus.env();
    let bypassctl = |args: &[&str]| -> Result<Duration> {
        let mut cmd = Command::new(&ctl);
        cmd.args(args).env(bus_env.0, &bus_env.1);
        let t = Instant::now();
        let o = run_timeout(cmd, Duration::from_secs(30))?;
        let el = t.elapsed();
        if !o.status.success() {
            bail!("bypassctl {}: {}{}", args.join(" "), String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        }
        Ok(el)
    };
    // bypassd owns its bus name shortly after READY: wait for it.
    let deadline = Instant::now() + Duration::from_secs(15);
    while bypassctl(&["status"]).is_err() {
        if Instant::now() > deadline {
            bail!("bypassd did not answer on D-Bus: {}", env.daemon().log());
        }
        sleep_checked(Duration::from_millis(100))?;
    }
    let mut seqs_ok = true;
    for _ in 0..plan.reload_reps {
        check_stop()?;
        for args in [
            &["policy", "add", "--action", "kernel", "--remote-ports", "9", "--name", "bench-edit"][..],
            &["policy", "remove", "1"][..],
        ] {
            let before = env.counters().policy_seq()?;
            d.policy_edit_ms.push(bypassctl(args)?.as_secs_f64() * 1e3);
            seqs_ok &= env.counters().policy_seq()? == before.wrapping_add(1);
        }
    }
    d.policy_edit_method = "bypassctl policy add / remove over D-Bus".into();
    d.policy_edit_ms_median = median(&d.policy_edit_ms);
    d.policy_edit_reached_kernel = seqs_ok && !d.policy_edit_ms.is_empty();
    progress(&format!(
        "policy edit round trip (bypassctl): {:.2} ms median, reached the kernel: {}",
        d.policy_edit_ms_median, d.policy_edit_reached_kernel
    ));

    // Start and restart times, each on a fresh pin directory and a scratch cgroup,
    // with a system bus of their own (the main daemon owns the name on the other).
    let cg = TestCgroup::new();
    let bus = SystemBus::start().context("starting a private system bus (dbus-daemon)")?;
    let mut reload_ok = true;
    for i in 0..plan.start_reps {
        check_stop()?;
        let pin = PinDir::new();
        let state = TempDir::new();
        let cfg = config(pin.path(), &cg.rel, state.path(), None, false);
        let (k, v) = bus.env();
        let (mut bd, cold) = Daemon::start_timed(&fixtures::bypassd_bin()?, &cfg, &[(k, &v)])?;
        bd.stop();
        let warm = bd.spawn_timed()?;
        d.cold_start_ms.push(cold.as_secs_f64() * 1e3);
        d.restart_ms.push(warm.as_secs_f64() * 1e3);
        progress(&format!("start to READY: cold {:.1} ms, restart (adopt) {:.1} ms", cold.as_secs_f64() * 1e3, warm.as_secs_f64() * 1e3));
        if i == 0 {
            // The same kind of edit through the config file: SIGHUP, RELOADING=1 … READY=1.
            let counters = Counters::open(pin.path())?;
            for j in 0..plan.reload_reps {
                check_stop()?;
                let before = counters.policy_seq()?;
                let cfg = config(pin.path(), &cg.rel, state.path(), None, j % 2 == 0);
                let t = bd.reload_with(&cfg)?;
                reload_ok &= counters.policy_seq()? == before.wrapping_add(1);
                d.reload_ms.push(t.as_secs_f64() * 1e3);
            }
        }
        drop(bd);
        drop(pin);
    }
    drop(bus);
    drop(cg);
    d.cold_start_ms_median = median(&d.cold_start_ms);
    d.restart_ms_median = median(&d.restart_ms);
    d.reload_ms_median = median(&d.reload_ms);
    d.reload_reached_kernel = reload_ok && !d.reload_ms.is_empty();
    progress(&format!(
        "config edit + SIGHUP reload: {:.2} ms median, reached the kernel: {}",
        d.reload_ms_median, d.reload_reached_kernel
    ));

    // Memory with N accelerated connections (and N plain ones, for the kernel side).
    d.connections = plan.conns;
    d.rss_idle_kib = fixtures::rss_kib(pid)?.0;
    d.maps_memlock_idle = fixtures::maps_memlock(env.pin.path())?;
    let rounds = if plan.mode == "short" { 1 } else { 3 };
    d.connections_redirected = true;
    for m in (0..rounds).flat_map(|_| [Mode::Kernel, Mode::Bypass]) {
        check_stop()?;
        let slab0 = fixtures::meminfo_kib("Slab") as i64;
        let before = env.counters().read()?;
        let mut cmd = env.cg(m).command(exe()?);
        cmd.args(["helper", "hold-server", "--n", &plan.conns.to_string()]);
        let (mut server, mut sout) = Proc::spawn_piped(cmd, "connection holder (server)")?;
        let port: u16 = read_line(&mut sout)?.parse().context("holder port")?;
        let mut cmd = env.cg(m).command(exe()?);
        cmd.args(["helper", "hold-client", "--addr", &format!("127.0.0.1:{port}"), "--n", &plan.conns.to_string()]);
        let (mut client, mut cout) = Proc::spawn_piped(cmd, "connection holder (client)")?;
        let line = read_line(&mut cout)?;
        if !line.starts_with("ready") {
            bail!("connection holder: {line}");
        }
        std::thread::sleep(Duration::from_millis(500));
        let slab = fixtures::meminfo_kib("Slab") as i64 - slab0;
        let delta = env.counters().read()?.since(&before);
        match m {
            Mode::Kernel => d.slab_plain_samples_kib.push(slab),
            Mode::Bypass => {
                d.slab_accelerated_samples_kib.push(slab);
                let (rss, hwm) = fixtures::rss_kib(pid)?;
                d.rss_with_connections_kib = rss;
                d.hwm_with_connections_kib = hwm;
                d.maps_memlock_with_connections = fixtures::maps_memlock(env.pin.path())?;
                d.sockets_in_map = delta.get(Counter::SocketsInserted);
                d.connections_redirected &= d.sockets_in_map >= 2 * plan.conns as u64
                    && delta.get(Counter::RedirectedMsgs) >= 2 * plan.conns as u64
                    && delta.get(Counter::InsertFailures) == 0;
            }
        }
        progress(&format!(
            "{} {} connections: slab +{} KiB, inserted {}, redirected {}",
            plan.conns,
            m.name(),
            slab,
            delta.get(Counter::SocketsInserted),
            delta.get(Counter::RedirectedMsgs)
        ));
        for p in [&mut client, &mut server] {
            drop(p.child.stdin.take());
            let _ = p.child.wait();
        }
        // Let the closed sockets go before the next measurement.
        std::thread::sleep(Duration::from_millis(1000));
    }
    let med = |v: &[i64]| median(&v.iter().map(|x| *x as f64).collect::<Vec<_>>()).round() as i64;
    d.slab_plain_kib = med(&d.slab_plain_samples_kib);
    d.slab_accelerated_kib = med(&d.slab_accelerated_samples_kib);
    progress(&format!(
        "bypassd RSS: idle {} KiB, with {} connections {} KiB; maps {:?}",
        d.rss_idle_kib, plan.conns, d.rss_with_connections_kib, d.maps_memlock_with_connections
    ));
    r.daemon = Some(d);
    Ok(())
}
