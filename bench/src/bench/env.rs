//! What a run creates (cgroups, namespaces, pins, a private bus, the main daemon) and
//! how one qperf run is made and read.
use super::{Mode, VETH_CLIENT, VETH_SERVER, progress};
use crate::fixtures::{self, Counters, Proc, Snap, run_timeout};
use anyhow::{Context, Result, bail};
use bypass_testsupport::{Daemon, Netns, PinDir, TempDir, TestCgroup, dbus::SystemBus, veth};
use std::{path::Path, process::Command, time::Duration};

/// Everything the run creates. Fields drop in order: servers, daemon, cgroups (which
/// kills anything left in them), namespaces, pins, temp dirs.
pub(super) struct Env {
    pub(super) servers: Vec<Proc>,
    /// The main bypassd, attached to cg_a (started after the unaccelerated section,
    /// which needs a host without it).
    pub(super) daemon: Option<Daemon>,
    pub(super) counters: Option<Counters>,
    pub(super) cg_a: TestCgroup,
    pub(super) cg_b: TestCgroup,
    pub(super) ns_server: Netns,
    pub(super) ns_client: Netns,
    pub(super) pin: PinDir,
    /// The main daemon's private system bus (bypassctl talks to it).
    pub(super) bus: SystemBus,
    pub(super) tmp: TempDir,
    /// Ports: base..base+1 are kept on the kernel path by policy.
    pub(super) base: u16,
}

/// `--send-mode`: the daemon's `[datapath] send_mode` (unset: the shipped default).
pub(crate) static SEND_MODE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

pub(super) fn config(pin: &Path, cgroup_rel: &str, state: &Path, kernel_ports: Option<(u16, u16)>, extra_rule: bool) -> String {
    let send_mode = SEND_MODE.get().map(|m| format!("send_mode = \"{m}\"\n")).unwrap_or_default();
    let mut c = format!(
        "[daemon]\npin_dir = \"{}\"\ncgroup = \"{}\"\nstate_dir = \"{}\"\nlog_level = \"info\"\n\n\
         [datapath]\ncapacity = 32768\n{send_mode}\n[policy]\ndefault = \"accelerate\"\n",
        pin.display(),
        cgroup_rel,
        state.display()
    );
    if let Some((lo, hi)) = kernel_ports {
        // Both sockets of a connection on these ports stay on the kernel path: the
        // server's by its local port, the client's by its remote port.
        c.push_str(&format!(
            "\n[[policy.rules]]\nname = \"bench: unaccelerated (server side)\"\naction = \"kernel\"\nlocal_ports = \"{lo}-{hi}\"\n\
             \n[[policy.rules]]\nname = \"bench: unaccelerated (client side)\"\naction = \"kernel\"\nremote_ports = \"{lo}-{hi}\"\n"
        ));
    }
    if extra_rule {
        c.push_str("\n[[policy.rules]]\nname = \"bench: policy edit\"\naction = \"kernel\"\nremote_ports = \"9\"\n");
    }
    c
}

impl Env {
    pub(super) fn new() -> Result<Env> {
        let tmp = TempDir::new();
        let pin = PinDir::new();
        let ns_server = Netns::new();
        let ns_client = Netns::new();
        veth(&ns_server, &[&format!("{VETH_SERVER}/24")], &ns_client, &[&format!("{VETH_CLIENT}/24")]);
        let cg_b = TestCgroup::new();
        let cg_a = TestCgroup::new();
        let base = 22000 + (std::process::id() % 900) as u16 * 10;
        let state = tmp.path().join("state");
        std::fs::create_dir_all(&state)?;
        let bus = SystemBus::start().context("starting a private system bus (dbus-daemon)")?;
        Ok(Env { servers: Vec::new(), daemon: None, counters: None, cg_a, cg_b, ns_server, ns_client, pin, bus, tmp, base })
    }

    /// The config of the daemons attached to cg_a: accelerate by default, but ports
    /// base..base+1 stay on the kernel path.
    pub(super) fn config_a(&self, pin: &Path) -> Result<String> {
        let state = self.tmp.path().join(format!("state-{}", pin.file_name().unwrap_or_default().to_string_lossy()));
        std::fs::create_dir_all(&state)?;
        Ok(config(pin, &self.cg_a.rel, &state, Some((self.base, self.base + 1)), false))
    }

    /// Start the main bypassd on cg_a (on its own private system bus).
    pub(super) fn start_daemon(&mut self) -> Result<()> {
        let cfg = self.config_a(self.pin.path())?;
        let (k, v) = self.bus.env();
        let (daemon, _) = Daemon::start_timed(&fixtures::bypassd_bin()?, &cfg, &[(k, &v)])?;
        self.counters = Some(Counters::open(self.pin.path())?);
        self.daemon = Some(daemon);
        Ok(())
    }

    pub(super) fn counters(&self) -> &Counters {
        self.counters.as_ref().expect("the main daemon is started before this")
    }

    pub(super) fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().expect("the main daemon is started before this")
    }

    pub(super) fn cg(&self, m: Mode) -> &TestCgroup {
        match m {
            Mode::Bypass => &self.cg_a,
            Mode::Kernel => &self.cg_b,
        }
    }

    /// `prog` in the cgroup of `mode`, in the server or client namespace for veth.
    pub(super) fn command(&self, m: Mode, topo: &str, server: bool, prog: impl AsRef<std::ffi::OsStr>) -> Command {
        match topo {
            "veth" => {
                let ns = if server { &self.ns_server } else { &self.ns_client };
                ns.command(Some(self.cg(m)), prog)
            }
            _ => self.cg(m).command(prog),
        }
    }

    pub(super) fn qperf_server(&mut self, m: Mode, topo: &str, lp: u16) -> Result<()> {
        let mut cmd = self.command(m, topo, true, "qperf");
        cmd.args(["-lp", &lp.to_string()]).stdout(std::process::Stdio::null());
        let p = Proc::spawn(cmd, &format!("qperf server {topo}/{} on port {lp}", m.name()))?;
        self.servers.push(p);
        Ok(())
    }

    pub(super) fn servers_alive(&mut self) -> Result<()> {
        for s in &mut self.servers {
            s.alive()?;
        }
        Ok(())
    }

    /// One qperf run; returns µs (latency) or MB/s (bandwidth) and the counter delta.
    /// A run that fails (qperf gives up after 5 s without an answer, which happens
    /// when the host is starved) is retried twice before the section fails.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn qperf(
        &self,
        counters: Option<&Counters>,
        m: Mode,
        topo: &str,
        lp: u16,
        ip: Option<u16>,
        test: &str,
        size: u32,
        secs: u32,
        cpu: Option<usize>,
    ) -> Result<QRun> {
        let once = || -> Result<QRun> {
            let host = if topo == "veth" { VETH_SERVER } else { "127.0.0.1" };
            let mut cmd = self.command(m, topo, false, "qperf");
            cmd.args([host, "-lp", &lp.to_string(), "-t", &secs.to_string(), "-m", &size.to_string(), "-e", "5", "-uu", "-vvs"]);
            if let Some(ip) = ip {
                cmd.args(["-ip", &ip.to_string()]);
            }
            if let Some(c) = cpu {
                // qperf numbers CPUs from 1 here (-lca 1 pins to CPU 0).
                let a = (c + 1).to_string();
                cmd.args(["-lca", &a, "-rca", &a]);
            }
            cmd.arg(test);
            // In the client's own namespace, TCP segment counts are this run's alone.
            let segs = |env: &Env| (topo == "veth").then(|| netns_out_segs(&env.ns_client.name)).flatten();
            let segs0 = segs(self);
            let read = || counters.map_or(Ok(Snap::default()), |c| c.read());
            let before = read()?;
            let out = run_timeout(cmd, Duration::from_secs(secs as u64 + 30))?;
            let after = read()?;
            let segs1 = segs(self);
            let stdout = String::from_utf8_lossy(&out.stdout);
            if !out.status.success() {
                bail!("qperf {topo}/{} {test} {size}: {}{}", m.name(), stdout, String::from_utf8_lossy(&out.stderr));
            }
            let value = parse_qperf(&stdout).with_context(|| format!("qperf output: {stdout}"))?;
            let send_msgs = qperf_field(&stdout, "send_msgs").unwrap_or(0.0) as u64;
            let out_segs = segs0.zip(segs1).map(|(a, b)| b.saturating_sub(a));
            Ok(QRun { value, delta: after.since(&before), send_msgs, out_segs })
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            match once() {
                Err(e) if attempt < 3 && !fixtures::STOP.load(std::sync::atomic::Ordering::Relaxed) => {
                    progress(&format!("  ⚠ qperf failed, retrying: {}", format!("{e:#}").replace('\n', " ")));
                    std::thread::sleep(Duration::from_millis(500));
                }
                r => return r,
            }
        }
    }
}

/// One qperf run.
pub(super) struct QRun {
    /// µs or MB/s.
    pub(super) value: f64,
    /// Datapath counter change over the run.
    pub(super) delta: Snap,
    /// write() calls the sender made (qperf -vvs).
    pub(super) send_msgs: u64,
    /// TCP segments sent from the client's namespace (veth only).
    pub(super) out_segs: Option<u64>,
}

/// Tcp OutSegs of a network namespace (/proc/net/snmp seen from inside it).
fn netns_out_segs(ns: &str) -> Option<u64> {
    let o = Command::new("ip").args(["netns", "exec", ns, "cat", "/proc/net/snmp"]).output().ok()?;
    let s = String::from_utf8_lossy(&o.stdout);
    let mut tcp = s.lines().filter(|l| l.starts_with("Tcp:"));
    let (h, v) = (tcp.next()?, tcp.next()?);
    let i = h.split_whitespace().position(|k| k == "OutSegs")?;
    v.split_whitespace().nth(i)?.parse().ok()
}

fn qperf_field(out: &str, key: &str) -> Option<f64> {
    out.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == key).then(|| v.split_whitespace().next()?.parse().ok()).flatten()
    })
}

/// The figure from qperf's output, in µs (latency) or MB/s (bandwidth).
fn parse_qperf(out: &str) -> Result<f64> {
    for l in out.lines() {
        let Some((k, v)) = l.split_once('=') else { continue };
        let k = k.trim();
        if k != "latency" && k != "bw" {
            continue;
        }
        let mut it = v.split_whitespace();
        let num: f64 = it.next().context("no value")?.parse()?;
        let unit = it.next().unwrap_or("");
        let factor = match unit {
            "ns" => 1e-3,
            "us" => 1.0,
            "ms" => 1e3,
            "sec" | "s" => 1e6,
            "bytes/sec" => 1e-6,
            "KB/sec" => 1e-3,
            "MB/sec" => 1.0,
            "GB/sec" => 1e3,
            "TB/sec" => 1e6,
            _ => bail!("unknown unit {unit}"),
        };
        return Ok(num * factor);
    }
    bail!("no latency or bw line")
}
