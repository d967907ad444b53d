//! bypass-bench-links: the link datapath against the Linux bridge, with qperf
//! (the seed talk's tool): udp_lat, udp_bw (-m 1400 at most: larger datagrams
//! fragment; received bandwidth), tcp_lat, tcp_bw, over message sizes.
//!
//! Topologies, all in namespaces this program creates (a "node" netns runs bypassd):
//! - vm-pod: a VM's tap (relayed, virtio-net headers + offloads) and a pod's veth on one
//!   bridge: `bridge` (baseline) vs `pair`, and `pair` with tx checksum off; then
//!   tcp_bw again with the guest's TSO/GSO off (the same frames in every mode).
//! - pod-pod: two pods' veths on one bridge: `bridge` vs bridge mode with plain
//!   redirect (`redirect = "egress"`) vs bridge mode with bpf_redirect_peer.
//!
//! Latency on these paths varies up to 2x between runs on a loaded 2-CPU machine:
//! short mode is a smoke test, not a measurement.
//!
//! Every point runs each mode `--reps` times (default 5, short mode 1), interleaved:
//! repetition i of every mode runs back to back, bypassd started afresh for each link
//! mode. The report gives medians, their ratio to the bridge, and the min–max of the
//! paired per-repetition ratios.
//!
//! `cargo build --release -p bypassd -p bypass-bench && target/release/bypass-bench-links
//! [--short] [--reps N] [--out FILE]`. Needs root, qperf, iproute2 (scripts/deps-links).
use anyhow::{Context, Result, bail};
use bypass_testsupport::{Netns, PinDir, TempDir, TestCgroup, tap::{TapRelay, in_netns}};
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

const TESTS: [&str; 4] = ["udp_lat", "udp_bw", "tcp_lat", "tcp_bw"];
/// vm-pod again with the guest's TSO and GSO off (tcp_bw only).
const GUEST_SEGMENTS: &str = "vm-pod, guest TSO/GSO off";
/// The seed talk's figures for the tap <-> veth redirect against the bridge.
const TALK: &str = "seed talk (KubeVirt, tc redirect vs bridge): UDP latency -4…-30 %, throughput +20…+70 %";

fn ip(ns: &str, args: &[&str]) -> Result<()> {
    let st = Command::new("ip").arg("-n").arg(ns).args(args).stderr(Stdio::piped()).output()?;
    if !st.status.success() {
        bail!("ip -n {ns} {}: {}", args.join(" "), String::from_utf8_lossy(&st.stderr));
    }
    Ok(())
}

struct Ep {
    _relay: Option<TapRelay>,
    port: String,
    ip: String,
    ns: Netns,
}

struct World {
    eps: Vec<Ep>,
    br: String,
    node: Netns,
}

impl World {
    /// `vms` tap endpoints then `pods` veth endpoints, all ports of one bridge.
    fn new(vms: usize, pods: usize) -> Result<World> {
        let node = Netns::new();
        let br = "bbr0".to_string();
        ip(&node.name, &["link", "add", &br, "type", "bridge"])?;
        ip(&node.name, &["link", "set", &br, "up"])?;
        let mut w = World { eps: Vec::new(), br, node };
        for i in 0..vms + pods {
            let ns = Netns::new();
            let port = format!("bp{i}");
            let relay = if i < vms {
                Some(TapRelay::start(Some(&w.node.name), &port, &ns.name, "eth0", true)?)
            } else {
                ip(&w.node.name, &["link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns.name])?;
                None
            };
            let addr = format!("10.78.0.{}", i + 1);
            ip(&ns.name, &["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
            ip(&ns.name, &["link", "set", "eth0", "up"])?;
            ip(&w.node.name, &["link", "set", &port, "master", &w.br])?;
            ip(&w.node.name, &["link", "set", &port, "up"])?;
            w.eps.push(Ep { _relay: relay, port, ip: addr, ns });
        }
        Ok(w)
    }
}

/// bypassd in the node netns with `links` as its [[links]] config, until dropped.
struct Bypassd {
    child: Child,
    _dir: TempDir,
}

impl Bypassd {
    fn start(w: &World, bin: &Path, pins: &PinDir, cg: &TestCgroup, links: &str, ports: usize) -> Result<Bypassd> {
        let dir = TempDir::new();
        let cfg = dir.path().join("bypassd.toml");
        std::fs::write(
            &cfg,
            format!(
                "[daemon]\npin_dir = \"{}\"\ncgroup = \"{}\"\nstate_dir = \"{}\"\n\n{links}",
                pins.path().display(),
                cg.rel,
                dir.path().display()
            ),
        )?;
        let log = std::fs::File::create(dir.path().join("log"))?;
        let child = in_netns(Some(&w.node.name), || {
            Command::new(bin).arg("--config").arg(&cfg).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log).spawn()
        })??;
        let d = Bypassd { child, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while attached(pins.path()) < ports {
            if Instant::now() > deadline {
                bail!("bypassd did not attach {ports} ports; log: {}", std::fs::read_to_string(d._dir.path().join("log")).unwrap_or_default());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(d)
    }
}

impl Drop for Bypassd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn attached(pin_dir: &Path) -> usize {
    let root = bypassd::datapath::pins::links_root(pin_dir);
    std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten())
        .filter(|f| f.file_name().to_str().and_then(bypassd::datapath::pins::tcx_ifname).is_some())
        .count()
}

/// One qperf run from `a` to `b`: µs for *_lat, MB/s (received) for *_bw.
fn qperf(w: &World, a: usize, b: usize, test: &str, size: u32, secs: u32) -> Result<f64> {
    let (from, to) = (&w.eps[a], &w.eps[b]);
    let out = from
        .ns
        .command(None, "qperf")
        .args(["-lp", "19790", "-t", &secs.to_string(), "-m", &size.to_string(), "-vu", &to.ip, test])
        .output()
        .context("running qperf (install it: scripts/deps-links)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let key = if test.ends_with("_lat") { "latency" } else if test == "udp_bw" { "recv_bw" } else { "bw" };
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with(key) && l.contains('='))
        .with_context(|| format!("qperf {test} printed no {key}: {text} {}", String::from_utf8_lossy(&out.stderr)))?;
    let mut it = line.split('=').nth(1).unwrap_or_default().split_whitespace();
    let v: f64 = it.next().unwrap_or_default().parse().context("qperf number")?;
    let unit = it.next().unwrap_or_default();
    Ok(match unit {
        "ns" => v / 1000.0,
        "us" => v,
        "ms" => v * 1000.0,
        "sec" | "s" => v * 1e6,
        "KB/sec" => v / 1000.0,
        "MB/sec" => v,
        "GB/sec" => v * 1000.0,
        "bytes/sec" => v / 1e6,
        _ => bail!("unknown qperf unit {unit} in {line}"),
    })
}

/// (packets, bytes) the node netns received on endpoint `i`'s port so far (from
/// `ip -s -j`: /sys/class/net shows the netns sysfs was mounted in, not the thread's).
fn rx_stats(w: &World, i: usize) -> Result<(u64, u64)> {
    let port = &w.eps[i].port;
    let out = Command::new("ip").args(["-n", &w.node.name, "-s", "-j", "link", "show", "dev", port]).output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| format!("ip -s -j link show {port}"))?;
    let rx = &v[0]["stats64"]["rx"];
    Ok((rx["packets"].as_u64().context("rx packets")?, rx["bytes"].as_u64().context("rx bytes")?))
}

struct Row {
    topo: &'static str,
    mode: String,
    test: &'static str,
    size: u32,
    /// One value per repetition, in run order (repetition i of every mode ran
    /// back to back, so value i of two modes form a pair).
    values: Vec<f64>,
    /// Average size of the frames the node received from the sender's port in each
    /// run: a TCP stream through the relay is bound by its frame rate, so a mode whose
    /// sender builds smaller GSO frames moves fewer bytes whatever the node's path costs.
    frames: Vec<f64>,
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// A mode of one topology: its name and its [[links]] config (None: the bridge alone).
struct Mode {
    name: &'static str,
    links: Option<String>,
}

/// Every (test, size) point of the topology, each mode `reps` times, interleaved per
/// point: repetition i runs every mode back to back (in alternating order, so a
/// drift of the machine's load hits both sides alike) before repetition i + 1.
#[allow(clippy::too_many_arguments)]
fn measure(w: &World, topo: &'static str, modes: &[Mode], tests: &[&'static str], sizes: &[u32], reps: usize, secs: u32, bin: &Path, cg: &TestCgroup, rows: &mut Vec<Row>) -> Result<()> {
    for &test in tests {
        let mut sizes: Vec<u32> = sizes.iter().map(|&s| if test == "udp_bw" { s.min(1400) } else { s }).collect();
        sizes.dedup();
        for size in sizes {
            let mut values = vec![Vec::new(); modes.len()];
            let mut frames = vec![Vec::new(); modes.len()];
            for rep in 0..reps {
                let mut order: Vec<usize> = (0..modes.len()).collect();
                if rep % 2 == 1 {
                    order.reverse();
                }
                for i in order {
                    let pins = PinDir::new();
                    let _d = match &modes[i].links {
                        Some(l) => Some(Bypassd::start(w, bin, &pins, cg, l, 2)?),
                        None => None,
                    };
                    let before = rx_stats(w, 0)?;
                    values[i].push(qperf(w, 0, 1, test, size, secs)?);
                    let after = rx_stats(w, 0)?;
                    frames[i].push((after.1 - before.1) as f64 / (after.0 - before.0).max(1) as f64);
                }
            }
            let unit = if test.ends_with("_lat") { "µs" } else { "MB/s" };
            for ((m, v), f) in modes.iter().zip(values).zip(frames) {
                eprintln!(
                    "  {topo:7} {:26} {test:7} {size:>6} B  median {:10.2} {unit}  ({} runs; frames in {:.0} B)",
                    m.name,
                    median(&v),
                    v.len(),
                    median(&f)
                );
                rows.push(Row { topo, mode: m.name.to_string(), test, size, values: v, frames: f });
            }
        }
    }
    Ok(())
}

/// The link datapath against the Linux bridge, with qperf (needs root).
#[derive(clap::Parser)]
#[command(version)]
struct Args {
    /// CI mode: 3 sizes, one repetition of 1 s per point (a smoke test, not judged)
    #[arg(long)]
    short: bool,
    /// Repetitions per point and mode (default: 5, short: 1)
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    reps: Option<u16>,
    /// Also write the Markdown report to this file
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() -> Result<()> {
    let Args { short, out, reps: reps_arg } = <Args as clap::Parser>::parse();
    let (sizes, reps, secs): (Vec<u32>, usize, u32) =
        if short { (vec![1, 1400, 16384], 1, 1) } else { (vec![1, 64, 1024, 1400, 4096, 16384], 5, 1) };
    let reps = reps_arg.map_or(reps, usize::from);
    let bin = std::env::var_os("BYPASSD_BIN")
        .map(PathBuf::from)
        .or_else(|| std::env::current_exe().ok().and_then(|e| e.parent().map(|d| d.join("bypassd"))))
        .context("no bypassd binary")?;
    let cg = TestCgroup::new();
    let mut rows = Vec::new();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();

    // VM <-> pod: bridge, pair, pair with tx checksum off (TSO off with it).
    {
        let w = World::new(1, 1)?;
        let srv = w.eps[1].ns.command(None, "qperf").args(["-lp", "19790"]).stdout(Stdio::null()).spawn()?;
        let _srv = Kill(srv);
        std::thread::sleep(Duration::from_millis(300));
        let pair = format!("[[links]]\npair = [\"{}\", \"{}\"]\n", w.eps[0].port, w.eps[1].port);
        let modes = [
            Mode { name: "bridge", links: None },
            Mode { name: "pair", links: Some(pair.clone()) },
            Mode { name: "pair tx-csum off", links: Some(format!("{pair}checksum_offload = {{ tx = \"off\" }}\n")) },
        ];
        measure(&w, "vm-pod", &modes, &TESTS, &sizes, reps, secs, &bin, &cg, &mut rows)?;
        // The same stream with the guest's TSO and GSO off: every frame is one segment in
        // every mode, so the relay carries the same frames per byte and the ratio is the
        // node's forwarding alone (with offloads on, a path that ACKs sooner makes the
        // guest build smaller frames, and the frame-bound relay moves fewer bytes).
        let st = w.eps[0].ns.command(None, "ethtool").args(["-K", "eth0", "tso", "off", "gso", "off"]).status().context("ethtool (scripts/deps-links)")?;
        if !st.success() {
            bail!("ethtool -K eth0 tso off gso off in the VM's netns: {st}");
        }
        measure(&w, GUEST_SEGMENTS, &modes[..2], &["tcp_bw"], &sizes, reps, secs, &bin, &cg, &mut rows)?;
    }
    // pod <-> pod on one bridge: bridge, bridge mode (redirect), bridge mode (redirect_peer).
    {
        let w = World::new(0, 2)?;
        let srv = w.eps[1].ns.command(None, "qperf").args(["-lp", "19790"]).stdout(Stdio::null()).spawn()?;
        let _srv = Kill(srv);
        std::thread::sleep(Duration::from_millis(300));
        let bm = |r: &str| Some(format!("[[links]]\nbridge = \"{}\"\nredirect = \"{r}\"\n", w.br));
        let modes = [
            Mode { name: "bridge", links: None },
            Mode { name: "bridge mode redirect", links: bm("egress") },
            Mode { name: "bridge mode redirect_peer", links: bm("auto") },
        ];
        measure(&w, "pod-pod", &modes, &TESTS, &sizes, reps, secs, &bin, &cg, &mut rows)?;
    }

    let md = report(&rows, short, reps, load.split_whitespace().take(3).collect::<Vec<_>>().join(" "));
    println!("{md}");
    if let Some(p) = out {
        std::fs::write(&p, &md).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A table per topology: each mode's median and its ratio to the bridge's, with
/// the spread of the per-repetition ratios (repetition i of both ran back to back).
fn report(rows: &[Row], short: bool, reps: usize, load: String) -> String {
    let mut s = format!(
        "# Link datapath vs. the Linux bridge (qperf{})\n\n{TALK}.\nRatios: latency = mode / bridge (below 1 is faster), bandwidth = mode / bridge (above 1 is more). \
         Each point ran {reps} times per mode for 1 s, interleaved with the bridge; ratio = median / median, spread = min–max of the paired per-run ratios. \
         Load average at start: {load}.\nSender's frames: the average size of the frames the node received from the sending endpoint's port (a GSO frame counts once). \
         The VM's frames cross a userspace relay (a stand-in hypervisor) bound by its frame rate, so vm-pod TCP bandwidth follows the guest's GSO frame size: \
         a path that returns ACKs sooner gets smaller frames and fewer bytes through the relay, whatever the node's own forwarding costs.\n",
        if short { ", short mode: 3 sizes, not judged" } else { "" }
    );
    for topo in ["vm-pod", GUEST_SEGMENTS, "pod-pod"] {
        s.push_str(&format!(
            "\n## {topo}\n\n| test | size | bridge (median) | mode | value (median) | ratio | spread | sender's frames, bridge / mode (avg B) |\n|---|---|---|---|---|---|---|---|\n"
        ));
        for r in rows.iter().filter(|r| r.topo == topo && r.mode != "bridge") {
            let Some(base) = rows.iter().find(|b| b.topo == topo && b.mode == "bridge" && b.test == r.test && b.size == r.size) else { continue };
            let unit = if r.test.ends_with("_lat") { "µs" } else { "MB/s" };
            let paired: Vec<f64> = r.values.iter().zip(&base.values).map(|(v, b)| v / b).collect();
            let (lo, hi) = paired.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| (lo.min(x), hi.max(x)));
            s.push_str(&format!(
                "| {} | {} B | {:.2} {unit} | {} | {:.2} {unit} | {:.2} | {lo:.2}–{hi:.2} | {:.0} / {:.0} |\n",
                r.test,
                r.size,
                median(&base.values),
                r.mode,
                median(&r.values),
                median(&r.values) / median(&base.values),
                median(&base.frames),
                median(&r.frames)
            ));
        }
    }
    s
}
