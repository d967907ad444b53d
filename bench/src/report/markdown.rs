//! The benchmark report as markdown (results.md): targets, tables, counters, notes.
use super::*;

impl Results {
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let m = &self.machine;
        let _ = writeln!(s, "# bypassd benchmark: bypass vs. kernel TCP path\n");
        let _ = writeln!(
            s,
            "Machine: Linux {}, {} CPUs ({}), {:.0} GiB, {}. qperf {}. bypassd commit {}.  ",
            m.kernel, m.cpus, m.cpu_model, m.mem_gib, m.os, m.qperf, m.commit
        );
        let _ = writeln!(
            s,
            "Run: `{}` — {} mode, {} repetitions × {} s per point, A/B interleaved, medians; took {:.0} s.  ",
            self.run.command, self.run.mode, self.run.reps, self.run.secs_per_point, self.run.duration_secs
        );
        if !self.run.load_avg_1min.is_empty() {
            let l = &self.run.load_avg_1min;
            let _ = writeln!(
                s,
                "Host load (1-min average) during the run: median {:.1}, max {:.1} (the benchmark alone accounts for about 1–2).  ",
                median(l),
                l.iter().copied().fold(0.0f64, f64::max)
            );
        }
        let _ = writeln!(
            s,
            "*bypass* = qperf client and server in a cgroup where bypassd is attached (policy: accelerate); \
             *kernel* = the same pair in a sibling cgroup with no hooks. Ratio = bypass / kernel. \
             Latency is qperf's one-way latency (half a round trip) in µs; bandwidth is MB/s (10⁶ B/s). \
             *pinned*: client and server both on CPU {}.\n",
            self.run.pinned_cpu
        );
        let mut host: Vec<&String> = self.host_tracing_programs_start.iter().chain(&self.host_tracing_programs_end).collect();
        host.sort();
        host.dedup();
        if !host.is_empty() {
            let _ = writeln!(
                s,
                "**Noise warning:** BPF tracing programs of other users were loaded on the host during the run \
                 (they run for sockets on both sides of every comparison): {}.\n",
                host.iter().map(|h| h.as_str()).collect::<Vec<_>>().join(", ")
            );
        }
        if self.bpf_stats_enabled.0 || self.bpf_stats_enabled.1 {
            let _ = writeln!(
                s,
                "**Noise warning:** `kernel.bpf_stats_enabled` was on (start: {}, end: {}; set by someone else): every \
                 BPF program run — bypassd's sk_msg on every message too — also reads the clock twice, which \
                 slows the bypass side only.\n",
                self.bpf_stats_enabled.0, self.bpf_stats_enabled.1
            );
        }
        if let Some(g) = &self.global_hooks {
            let _ = writeln!(
                s,
                "bypassd's hooks outside its cgroup (run for every socket on the host, so the *kernel* runs pay \
                 for them too; measured under *cost to traffic bypassd does not accelerate*): {}.\n",
                if g.is_empty() { "none".to_string() } else { g.iter().map(|(t, n)| format!("{n} ({t})")).collect::<Vec<_>>().join(", ") }
            );
        }
        if !self.errors.is_empty() {
            let _ = writeln!(s, "**Errors during the run:**\n");
            for e in &self.errors {
                let _ = writeln!(s, "- {}", e.lines().next().unwrap_or(""));
            }
            let _ = writeln!(s);
        }

        let _ = writeln!(s, "## Targets\n");
        let _ = writeln!(s, "| | Target | Measured | Result |\n|---|---|---|---|");
        for t in &self.targets {
            let r = match (t.pass, t.judged, t.inconclusive) {
                (_, true, true) => "INCONCLUSIVE (noise)",
                (true, true, _) => "PASS",
                (false, true, _) => "**MISS**",
                (true, false, _) => "(pass)",
                (false, false, _) => "(miss)",
            };
            let _ = writeln!(s, "| {} | {} | {} | {} |", t.name, t.target, t.measured, r);
        }
        let _ = writeln!(s);

        for (title, tests, unix_test) in [
            ("Latency, pinned (µs, one-way)", "tcp_lat_pinned", "lat_pinned"),
            ("Latency, unpinned (µs, one-way)", "tcp_lat", "lat"),
            ("Bandwidth (MB/s)", "tcp_bw", "bw"),
        ] {
            if !self.qperf.iter().any(|p| p.test == tests) {
                continue;
            }
            let _ = writeln!(s, "## {title}\n");
            let _ = writeln!(
                s,
                "| Size | loopback kernel | loopback bypass | ratio | veth kernel | veth bypass | ratio | AF_UNIX floor |\n\
                 |---:|---:|---:|---:|---:|---:|---:|---:|"
            );
            for &size in &self.run.sizes {
                let mut row = format!("| {} ", size_label(size));
                for topo in ["loopback", "veth"] {
                    match self.point(topo, tests, size) {
                        Some(p) => {
                            let partly = redirected_share(&p.bypass_counters) < 0.9;
                            let _ = write!(
                                row,
                                "| {} | {}{} | {}{} ",
                                f(p.kernel_median),
                                f(p.bypass_median),
                                if partly { " †" } else { "" },
                                ratio(p.ratio),
                                if p.verified { "" } else { " ⚠" }
                            );
                        }
                        None => row.push_str("| – | – | – "),
                    }
                }
                let u = self.unix(unix_test, size).map_or("–".into(), |u| f(u.median));
                let _ = writeln!(row, "| {u} |");
                s.push_str(&row);
            }
            let _ = writeln!(s);
        }
        if self.qperf.iter().any(|p| redirected_share(&p.bypass_counters) < 0.9) {
            let _ = writeln!(
                s,
                "† less than 90 % of the bytes of these bypass runs were redirected: bypassd's safety rules kept \
                 the rest on the kernel path (see the counters table).\n"
            );
        }

        let veth_bw: Vec<&Point> = self.qperf.iter().filter(|p| p.topology == "veth" && p.test == "tcp_bw").collect();
        if veth_bw.iter().any(|p| p.kernel_out_segs > 0) {
            let _ = writeln!(s, "### Why small messages lose: writes vs. segments (veth, tcp_bw, all runs)\n");
            let _ = writeln!(
                s,
                "The kernel path coalesces small writes into few TCP segments; the bypass hands every write to \
                 the receiver as its own message (one sk_msg verdict, one redirect, one wakeup).\n"
            );
            let _ = writeln!(
                s,
                "| Size | kernel: writes | TCP segments | writes per segment | bypass: writes | redirected msgs | TCP segments |\n\
                 |---:|---:|---:|---:|---:|---:|---:|"
            );
            for p in veth_bw {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {:.1} | {} | {} | {} |",
                    size_label(p.size),
                    p.kernel_send_msgs,
                    p.kernel_out_segs,
                    p.kernel_send_msgs as f64 / p.kernel_out_segs.max(1) as f64,
                    p.bypass_send_msgs,
                    p.bypass_counters.get(Counter::RedirectedMsgs),
                    p.bypass_out_segs
                );
            }
            let _ = writeln!(s);
        }

        if let Some(c) = &self.churn {
            let _ = writeln!(s, "## Connection churn ({})\n", c.topology);
            let _ = writeln!(
                s,
                "Connect, 1 byte each way, close, back to back from one client, each run in a fresh \
                 network namespace. \
                 Kernel {} conn/s, bypass {} conn/s: ratio {}, cost {}. \
                 The bypass runs inserted {} sockets ({} connections) and redirected {} messages.\n",
                f(c.kernel_median),
                f(c.bypass_median),
                ratio(c.ratio),
                pct(c.cost),
                c.bypass_counters.get(Counter::SocketsInserted),
                c.bypass_connections,
                c.bypass_counters.get(Counter::RedirectedMsgs),
            );
            if c.bypass_counters.get(Counter::RedirectedMsgs) == 0 && c.bypass_connections > 0 {
                let _ = writeln!(
                    s,
                    "None of these messages was redirected: bypassd redirects to a socket only after it has read once \
                     (the recvmsg-first rule; {} messages counted as not_ready), so a connection with a single \
                     exchange stays on TCP. The cost measured here is sock_ops, the SOCKHASH insert and the removal \
                     at close.\n",
                    c.bypass_counters.get(Counter::NotReady)
                );
            }
        }

        if !self.unaccelerated.is_empty() {
            let _ = writeln!(s, "## Cost to traffic bypassd does not accelerate\n");
            let _ = writeln!(
                s,
                "The same qperf pair (pinned, in bypassd's cgroup, on ports two policy rules send to the kernel \
                 path) with a bypassd datapath attached — sock_create and sock_ops run for these sockets, and any \
                 global hook of bypassd runs as it would for every socket on the host — and with no bypassd \
                 datapath on the host at all (`bypassd --detach` between runs). Attached and detached runs \
                 alternate; cost = how much worse attached is.\n"
            );
            let _ = writeln!(
                s,
                "| Test | Size | detached (min–max) | attached, policy=kernel (min–max) | cost | runs |\n|---|---:|---:|---:|---:|---:|"
            );
            let range = |v: &[f64]| {
                let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                format!("{}–{}", f(lo), f(hi))
            };
            for u in &self.unaccelerated {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} {} ({}) | {} {} ({}) | {}{} | {} |",
                    u.test,
                    size_label(u.size),
                    f(u.no_hooks_median),
                    u.unit,
                    range(&u.no_hooks),
                    f(u.hooks_median),
                    u.unit,
                    range(&u.hooks),
                    pct(u.cost),
                    if u.verified { "" } else { " ⚠" },
                    u.hooks.len()
                );
            }
            let _ = writeln!(s);
        }

        if let Some(d) = &self.daemon {
            let _ = writeln!(s, "## The daemon\n");
            let _ = writeln!(s, "| Figure | Value |\n|---|---:|");
            let _ = writeln!(s, "| Start to READY=1, empty pin dir (load + attach), median | {} ms |", f(d.cold_start_ms_median));
            let _ = writeln!(s, "| Restart to READY=1, pins present (adopt), median | {} ms |", f(d.restart_ms_median));
            let _ = writeln!(
                s,
                "| Policy edit round trip ({}), median | {} ms{} |",
                d.policy_edit_method,
                f(d.policy_edit_ms_median),
                if d.policy_edit_reached_kernel { "" } else { " ⚠ (kernel policy did not change)" }
            );
            let _ = writeln!(
                s,
                "| Config file edit + SIGHUP reload, to READY=1, median | {} ms{} |",
                f(d.reload_ms_median),
                if d.reload_reached_kernel { "" } else { " ⚠ (kernel policy did not change)" }
            );
            let _ = writeln!(
                s,
                "| CPU while idle ({:.0} s window; utime+stime / schedstat) | {:.3} % / {:.4} % of one CPU |",
                d.idle_cpu_secs, d.idle_cpu_percent, d.idle_cpu_percent_schedstat
            );
            let _ = writeln!(s, "| Resident memory (VmRSS), idle | {} KiB |", d.rss_idle_kib);
            let _ = writeln!(
                s,
                "| Resident memory with {} accelerated connections ({} sockets in the SOCKHASH{}) | {} KiB (peak {} KiB) |",
                d.connections,
                d.sockets_in_map,
                if d.connections_redirected { ", redirect verified" } else { ", ⚠ NOT redirected" },
                d.rss_with_connections_kib,
                d.hwm_with_connections_kib
            );
            let sum = |m: &BTreeMap<String, u64>| m.values().sum::<u64>();
            let _ = writeln!(
                s,
                "| BPF map memory (bpftool memlock), idle → with connections | {} KiB → {} KiB ({}) |",
                sum(&d.maps_memlock_idle) / 1024,
                sum(&d.maps_memlock_with_connections) / 1024,
                d.maps_memlock_with_connections
                    .iter()
                    .map(|(k, v)| format!("{k} {} KiB", v / 1024))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let _ = writeln!(
                s,
                "| Kernel slab growth: {} plain connections → {} accelerated | {} KiB → {} KiB ({:+.0} B per connection) |",
                d.connections,
                d.connections,
                d.slab_plain_kib,
                d.slab_accelerated_kib,
                (d.slab_accelerated_kib - d.slab_plain_kib) as f64 * 1024.0 / d.connections.max(1) as f64
            );
            let _ = writeln!(s);
        }

        let _ = writeln!(s, "## Datapath counters during the runs\n");
        let _ = writeln!(
            s,
            "Summed over each point's runs. A bypass point is verified when redirected_msgs grew and every passed \
             message is explained: by a counted safety reason (order, backpressure, receiver not reading yet, splice) \
             or within 1 % (at least 16: qperf's control exchange); or, with send_mode auto, when both sockets were \
             inserted and neither became a sender (a stream kept on the kernel's send path on purpose: nothing \
             redirected, nothing passed); *bytes redirected* says how much of the traffic really took the bypass. A kernel point is verified when no counter moved. Kernel-path cgroup programs: {}.\n",
            if self.verification.kernel_cgroup_programs.is_empty() {
                "none".to_string()
            } else {
                self.verification.kernel_cgroup_programs.iter().map(|(a, n)| format!("{a}:{n}")).collect::<Vec<_>>().join(", ")
            }
        );
        let _ = writeln!(
            s,
            "| Topology | Test | Size | bypass: sockets inserted | redirected msgs | passed msgs (of which for a safety reason) | bytes redirected | kernel runs: counter change | verified |\n\
             |---|---|---:|---:|---:|---:|---:|---:|---|"
        );
        for p in &self.qperf {
            let kc: u64 = p.kernel_counters.0.iter().sum();
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} ({}) | {} | {} | {} |",
                p.topology,
                p.test,
                size_label(p.size),
                p.bypass_counters.get(Counter::SocketsInserted),
                p.bypass_counters.get(Counter::RedirectedMsgs),
                p.bypass_counters.get(Counter::PassedMsgs),
                safety_reasons(&p.bypass_counters),
                share(redirected_share(&p.bypass_counters)),
                kc,
                if p.verified { "yes" } else { "**NO**" }
            );
        }
        s
    }
}
