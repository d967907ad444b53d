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
