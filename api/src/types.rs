//! Wire types of the D-Bus API. Every struct is a D-Bus struct (serde + zvariant
//! `Type`); field order is the wire order, so append, never reorder.
use serde::{Deserialize, Serialize};
use zbus::zvariant::Type;

/// Datapath state as reported by `Status`.
#[derive(Debug, Clone, Serialize, Deserialize, Type, PartialEq, Eq)]
pub struct Status {
    pub version: String,
    /// "attached", "detached" or "degraded".
    pub state: String,
    /// Why the state is what it is (empty when attached and healthy).
    pub reason: String,
    pub paused: bool,
    pub cgroup: String,
    pub pin_dir: String,
    pub config_path: String,
    /// sha256 of the loaded config file, hex; with drop-ins, over every loaded file.
    pub config_sha256: String,
    /// Unix time (seconds) the daemon started.
    pub started_at: u64,
    /// BPF ABI version of the attached datapath.
    pub abi_version: u32,
    /// SOCKHASH capacity.
    pub capacity: u32,
    /// Policy rules that match nothing right now because their cgroup does not
    /// exist (they become active again when it is created).
    pub inactive_rules: u32,
    /// The config files loaded: the main file, then its `conf.d/*.toml` drop-ins in
    /// the order they were merged.
    pub config_files: Vec<String>,
}

/// Counter name and value, summed over CPUs.
pub type Stats = Vec<(String, u64)>;

/// One accelerated socket pair, as seen from the side that has the lower tuple.
#[derive(Debug, Clone, Serialize, Deserialize, Type, PartialEq, Eq)]
pub struct Connection {
    /// "ipv4" or "ipv6".
    pub family: String,
    /// "addr:port" (IPv6 in brackets).
    pub local: String,
    pub remote: String,
    /// Network namespace cookie in the key, 0 when the pair is matched across namespaces.
    pub netns: u64,
    /// true when both ends are in the map (data is redirected), false when only this end is.
    pub paired: bool,
    /// true when the peer was found through NAT pairing (a proxy's SO_ORIGINAL_DST).
    pub nat: bool,
    /// The peer socket as "local <- remote" (its own view), empty when not paired.
    pub peer: String,
    /// Which of the two sockets are senders (run sk_msg, so their sends may be
    /// redirected; the others send through plain TCP): "both", "local", "peer", "none".
    pub senders: String,
}

/// One rule of the effective policy, as `ListPolicy` returns it (evaluation order:
/// runtime rules first, then the config file's; first match wins).
#[derive(Debug, Clone, Serialize, Deserialize, Type, PartialEq, Eq)]
pub struct PolicyRule {
    /// 1-based position in the effective list (what `PolicyRemove` takes).
    pub index: u32,
    /// Where the rule comes from: "runtime" (added over D-Bus, persisted in the
    /// state directory) or "config" (the config file's `[[policy.rules]]`).
    pub source: String,
    /// The rule's `name`, empty when it has none.
    pub name: String,
    /// One-line summary, e.g. `accelerate remote_ports=8080 cgroup=/app`.
    pub summary: String,
    /// The rule as a TOML table body (`action = "accelerate"` ...), the same
    /// fields as `[[policy.rules]]` in the config file.
    pub rule: String,
    /// false while the rule cannot match: its cgroup does not exist (yet, or any
    /// more, e.g. during a restart of the systemd unit that owns it).
    pub active: bool,
    /// Why the rule is inactive; empty when active.
    pub inactive_reason: String,
}

/// One `[[links]]` entry of the link datapath, as `ListLinks` returns it.
#[derive(Debug, Clone, Serialize, Deserialize, Type, PartialEq, Eq)]
pub struct LinkStatus {
    /// "tap0+veth-vm0" (pair) or "br0" (bridge); "...@pod1" when in another netns.
    pub name: String,
    /// "pair" or "bridge".
    pub mode: String,
    /// "attached", "pending" (an interface is missing) or "degraded".
    pub state: String,
    /// Why it is pending or degraded (empty when attached).
    pub reason: String,
    /// The netns file of `netns =` (empty: bypassd's own netns).
    pub netns: String,
    pub interfaces: Vec<LinkInterface>,
}

/// One interface of a link entry.
#[derive(Debug, Clone, Serialize, Deserialize, Type, PartialEq, Eq)]
pub struct LinkInterface {
    pub name: String,
    /// 0 while the interface does not exist.
    pub ifindex: u32,
    /// The link program is attached (TCX, pinned).
    pub attached: bool,
    /// Effective offloads as read back, e.g. "rx-checksum off tx-checksum on tso on".
    pub offloads: String,
    /// Frames and bytes arriving on this interface that the link program redirected
    /// (skipping the bridge) or passed on to the kernel path, since its pins were made.
    pub redirected_frames: u64,
    pub redirected_bytes: u64,
    pub passed_frames: u64,
    pub passed_bytes: u64,
}
