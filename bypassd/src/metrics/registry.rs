//! The metric families, rendered from a [`Snapshot`] with prometheus-client
//! (OpenMetrics text). Labels are bounded enums only: never an address, port, pid
//! or cgroup path.
use super::snapshot::Snapshot;
use bypassd_ebpf::abi::Counter as C;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{
        MetricType,
        counter::ConstCounter,
        gauge::ConstGauge,
        info::Info,
    },
    registry::Registry,
};

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Why a send took the kernel path, and the datapath counter it is read from.
/// `no_peer` has no counter of its own: it is every passed send the others do not
/// explain (the peer socket is not in the SOCKHASH: left to the kernel by the
/// policy, not inserted because the map was full, or already closed).
pub const PASS_REASONS: [(&str, Option<C>); 7] = [
    ("no_peer", None),
    ("order", Some(C::OrderWait)),
    ("backpressure", Some(C::Backpressure)),
    ("not_ready", Some(C::NotReady)),
    ("splice", Some(C::SpliceKept)),
    ("coalesced", Some(C::Coalesced)),
    ("peer_stale", Some(C::PeerStale)),
];

#[derive(Debug)]
struct Families(Snapshot);

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, MetricType::Counter)?)
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

/// One family with a single bounded label.
fn labelled<M: EncodeMetric>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    ty: MetricType,
    label: &str,
    values: &[(&str, M)],
) -> Result<(), std::fmt::Error> {
    let mut fam = e.encode_descriptor(name, help, None, ty)?;
    for (l, m) in values {
        let set = [(label, *l)];
        m.encode(fam.encode_family(&set)?)?;
    }
    Ok(())
}

impl Collector for Families {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.0;
        let abi = bypassd_ebpf::abi::ABI_VERSION.to_string();
        let info = Info::new([("version", env!("CARGO_PKG_VERSION")), ("abi", abi.as_str())]);
        info.encode(e.encode_descriptor("bypassd_build", "bypassd version and BPF ABI version", None, MetricType::Info)?)?;
        let states = [bypassd_api::state::ATTACHED, bypassd_api::state::DETACHED, bypassd_api::state::DEGRADED]
            .map(|st| (st, ConstGauge::new(i64::from(s.state == st))));
        labelled(&mut e, "bypassd_datapath_state", "1 for the datapath's current state", MetricType::Gauge, "state", &states)?;
        gauge(&mut e, "bypassd_datapath_paused", "1 while acceleration of new connections is paused", i64::from(s.paused))?;
        let rules = [("runtime", ConstGauge::new(s.rules_runtime as i64)), ("config", ConstGauge::new(s.rules_config as i64))];
        labelled(&mut e, "bypassd_policy_rules", "Policy rules in effect, by where they come from", MetricType::Gauge, "source", &rules)?;
        counter(&mut e, "bypassd_reloads", "Configuration reloads attempted (SIGHUP or D-Bus)", s.reloads)?;
        counter(&mut e, "bypassd_reloads_failed", "Reloads refused; the running configuration was kept", s.reloads_failed)?;
        if let Some(n) = s.accelerated_sockets {
            gauge(&mut e, "bypassd_accelerated_sockets", "Sockets in the SOCKHASH now", n as i64)?;
        }
        links(&mut e, &s.links)?;
        if s.counters.is_empty() {
            return Ok(()); // no datapath pinned: no datapath counters
        }
        let c = |k| s.counter(k);
        counter(&mut e, "bypassd_redirected_messages", "Sends delivered straight to the peer socket", c(C::RedirectedMsgs))?;
        counter(&mut e, "bypassd_redirected_bytes", "Bytes delivered straight to the peer socket", c(C::RedirectedBytes))?;
        let explained: u64 = PASS_REASONS.iter().filter_map(|(_, k)| *k).map(c).sum();
        let passed = PASS_REASONS.map(|(r, k)| {
            (r, ConstCounter::new(k.map_or_else(|| c(C::PassedMsgs).saturating_sub(explained), c)))
        });
        labelled(
            &mut e,
            "bypassd_passed_messages",
            "Sends of accelerated sockets left on the kernel TCP path, by reason",
            MetricType::Counter,
            "reason",
            &passed,
        )?;
        counter(&mut e, "bypassd_passed_bytes", "Bytes of accelerated sockets left on the kernel TCP path (all reasons)", c(C::PassedBytes))?;
        counter(&mut e, "bypassd_sockets_inserted", "Sockets put into the SOCKHASH", c(C::SocketsInserted))?;
        counter(&mut e, "bypassd_insert_failures", "Admitted sockets not inserted (SOCKHASH full or key taken)", c(C::InsertFailures))?;
        let skipped = [("policy", ConstCounter::new(c(C::PolicyKernel))), ("paused", ConstCounter::new(c(C::PausedSkips)))];
        labelled(
            &mut e,
            "bypassd_sockets_not_accelerated",
            "Established sockets left on the kernel path, by reason",
            MetricType::Counter,
            "reason",
            &skipped,
        )?;
        counter(&mut e, "bypassd_splice_sockets", "Accelerated sockets seen reading with splice", c(C::SpliceSeen))?;
        counter(&mut e, "bypassd_splice_stranded_sockets", "Splice readers that had redirected bytes queued", c(C::SpliceStranded))?;
        counter(&mut e, "bypassd_splice_refused", "splice/sendfile reads refused by the BPF LSM guard", c(C::SpliceRefused))?;
        counter(&mut e, "bypassd_stranded_drops", "Sends refused because the peer splices with bytes stranded", c(C::StrandedDrops))?;
        // Service mesh: connections paired through a NAT capture (docs/mesh.md).
        let paths = [("local", ConstCounter::new(c(C::NatPairedLocal))), ("inbound", ConstCounter::new(c(C::NatPairedInbound)))];
        labelled(&mut e, "bypassd_nat_pairs", "NAT-captured connections paired from the proxy's SO_ORIGINAL_DST answer, by capture path", MetricType::Counter, "path", &paths)?;
        counter(&mut e, "bypassd_nat_unpaired", "SO_ORIGINAL_DST answers not paired (a socket not accelerated, or not the client)", c(C::NatUnpaired))?;
        counter(&mut e, "bypassd_nat_redirected_messages", "Of the redirected sends: to a NAT peer", c(C::NatRedirectedMsgs))?;
        counter(&mut e, "bypassd_nat_redirected_bytes", "Of the redirected bytes: to a NAT peer", c(C::NatRedirectedBytes))?;
        let how = [("at_insert", ConstCounter::new(c(C::SenderAtInsert))), ("promoted", ConstCounter::new(c(C::SenderPromoted)))];
        labelled(&mut e, "bypassd_senders", "Sockets made senders (their sends run sk_msg), by when", MetricType::Counter, "when", &how)?;
        counter(&mut e, "bypassd_sender_failures", "Sockets that could not become senders (they send through plain TCP)", c(C::SenderFailed))?;
        counter(&mut e, "bypassd_promote_failures", "send_mode auto: promotions the daemon could not make (socket or process gone, no ptrace access)", c(C::PromoteFailed))?;
        counter(&mut e, "bypassd_nat_not_client", "Of the unpaired answers: the tuple's owner was another connection (port remapped)", c(C::NatNotClient))?;
        counter(&mut e, "bypassd_nat_local_redirected_bytes", "Of the NAT-redirected bytes: app <-> its own sidecar", c(C::NatLocalRedirectedBytes))?;
        Ok(())
    }
}

/// The link datapath: frames and bytes per [[links]] entry, redirected past the bridge
/// or passed to it, and per port (interface) of the entry now. The `link` label is the
/// entry's name from the config, `port` one of its interfaces (both bounded).
fn links(e: &mut DescriptorEncoder, links: &[crate::datapath::link::EntryStats]) -> Result<(), std::fmt::Error> {
    if links.is_empty() {
        return Ok(());
    }
    type Pick = fn(&bypassd_ebpf::abi::LinkStats) -> [u64; 2];
    let frames: Pick = |s| [s.redirected_frames, s.passed_frames];
    let bytes: Pick = |s| [s.redirected_bytes, s.passed_bytes];
    let families: [(&str, &str, Pick, bool); 4] = [
        ("bypassd_link_frames", "Frames of a [[links]] entry, by action", frames, false),
        ("bypassd_link_bytes", "Bytes of a [[links]] entry, by action", bytes, false),
        ("bypassd_link_port_frames", "Frames arriving on one port of a [[links]] entry, by action", frames, true),
        ("bypassd_link_port_bytes", "Bytes arriving on one port of a [[links]] entry, by action", bytes, true),
    ];
    for (name, help, pick, per_port) in families {
        let mut fam = e.encode_descriptor(name, help, None, MetricType::Counter)?;
        for l in links {
            let rows: Vec<(Option<&str>, &bypassd_ebpf::abi::LinkStats)> =
                if per_port { l.ports.iter().map(|(p, s)| (Some(p.as_str()), s)).collect() } else { vec![(None, &l.total)] };
            for (port, s) in rows {
                for (action, v) in ["redirected", "passed"].into_iter().zip(pick(s)) {
                    let mut set = vec![("link", l.name.as_str())];
                    set.extend(port.map(|p| ("port", p)));
                    set.push(("action", action));
                    ConstCounter::new(v).encode(fam.encode_family(&set)?)?;
                }
            }
        }
    }
    Ok(())
}

/// The OpenMetrics text of one snapshot.
pub fn render(s: Snapshot) -> String {
    let mut reg = Registry::default();
    reg.register_collector(Box::new(Families(s)));
    let mut out = String::new();
    // Writing into a String cannot fail; an encoder error would be a bug here.
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &reg) {
        tracing::error!("metrics: encoding failed: {e}");
    }
    out
}

/// Every sample name bypassd can serve (an attached datapath shows them all).
pub fn metric_names() -> Vec<String> {
    let s = Snapshot {
        state: bypassd_api::state::ATTACHED.into(),
        counters: C::ALL.iter().map(|&k| (k, 0)).collect(),
        accelerated_sockets: Some(0),
        ..Snapshot::default()
    };
    let mut names: Vec<String> = render(s)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(|c| c == '{' || c == ' ').next().map(String::from))
        .collect();
    names.dedup();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_have_base_units_and_bounded_labels() {
        let names = metric_names();
        for n in [
            "bypassd_build_info",
            "bypassd_datapath_state",
            "bypassd_accelerated_sockets",
            "bypassd_redirected_bytes_total",
            "bypassd_redirected_messages_total",
            "bypassd_passed_messages_total",
            "bypassd_passed_bytes_total",
            "bypassd_sockets_inserted_total",
            "bypassd_insert_failures_total",
            "bypassd_reloads_total",
            "bypassd_reloads_failed_total",
            "bypassd_policy_rules",
        ] {
            assert!(names.iter().any(|x| x == n), "{n} missing from {names:?}");
        }
        let mut s = Snapshot { state: "attached".into(), ..Snapshot::default() };
        s.counters = vec![(C::PassedMsgs, 10), (C::OrderWait, 3), (C::NotReady, 2), (C::PassedBytes, 7)];
        let text = render(s);
        assert!(text.contains("bypassd_passed_messages_total{reason=\"no_peer\"} 5"), "{text}");
        assert!(text.contains("bypassd_passed_messages_total{reason=\"order\"} 3"), "{text}");
        assert!(text.contains("bypassd_build_info{version=\""), "{text}");
        assert!(text.trim_end().ends_with("# EOF"), "{text}");
        // Label values come from fixed lists only.
        let allowed = ["no_peer", "order", "backpressure", "not_ready", "splice", "coalesced", "peer_stale", "local", "inbound", "policy", "paused", "at_insert", "promoted", "runtime", "config", "attached", "detached", "degraded"];
        for l in text.lines().filter(|l| !l.starts_with('#') && l.contains('{') && !l.starts_with("bypassd_build_info")) {
            let v = l.split('"').nth(1).unwrap();
            assert!(allowed.contains(&v), "unbounded label value in {l}");
        }
    }

    #[test]
    fn link_and_mesh_counters_are_served() {
        let stats = bypassd_ebpf::abi::LinkStats { redirected_frames: 7, redirected_bytes: 700, passed_frames: 2, passed_bytes: 90 };
        let port = bypassd_ebpf::abi::LinkStats { redirected_frames: 5, redirected_bytes: 500, passed_frames: 1, passed_bytes: 40 };
        let s = Snapshot {
            state: "attached".into(),
            counters: vec![(C::NatPairedLocal, 4), (C::NatPairedInbound, 3), (C::NatRedirectedBytes, 1000)],
            links: vec![crate::datapath::link::EntryStats { name: "tap0+veth0".into(), total: stats, ports: vec![("tap0".into(), port)] }],
            ..Snapshot::default()
        };
        let text = render(s);
        for want in [
            "bypassd_link_frames_total{link=\"tap0+veth0\",action=\"redirected\"} 7",
            "bypassd_link_bytes_total{link=\"tap0+veth0\",action=\"passed\"} 90",
            "bypassd_link_port_frames_total{link=\"tap0+veth0\",port=\"tap0\",action=\"redirected\"} 5",
            "bypassd_link_port_bytes_total{link=\"tap0+veth0\",port=\"tap0\",action=\"passed\"} 40",
            "bypassd_nat_pairs_total{path=\"local\"} 4",
            "bypassd_nat_pairs_total{path=\"inbound\"} 3",
            "bypassd_nat_redirected_bytes_total 1000",
        ] {
            assert!(text.contains(want), "{want} missing from {text}");
        }
    }
}
