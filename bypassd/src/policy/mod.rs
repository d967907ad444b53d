//! Policy: which connections take the eBPF datapath. Rule model and validation,
//! the pure-Rust reference matcher (the kernel's `policy_admits` must agree with
//! it), and the encoding into the ABI's rule buffers.
mod cidr;
pub mod diag;
pub mod runtime;

pub use cidr::{Cidr, to_mapped};

use bypassd_ebpf::abi;
use serde::{Deserialize, Serialize};
use std::{
    fmt,
    net::SocketAddr,
    os::unix::fs::MetadataExt,
    path::Path,
};

/// What to do with a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Redirect through the eBPF datapath.
    Accelerate,
    /// Leave on the kernel's TCP/IP path.
    #[default]
    Kernel,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Accelerate => "accelerate",
            Action::Kernel => "kernel",
        }
    }
    fn abi(self) -> u8 {
        match self {
            Action::Accelerate => abi::ACTION_ACCELERATE,
            Action::Kernel => abi::ACTION_KERNEL,
        }
    }
}

/// Inclusive port range, written "8080" or "8000-8999".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "PortInput", into = "String")]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum PortInput {
    Num(i64),
    Text(String),
}

impl TryFrom<PortInput> for PortRange {
    type Error = String;
    fn try_from(v: PortInput) -> Result<Self, String> {
        match v {
            PortInput::Num(n) => PortRange::parse(&n.to_string()),
            PortInput::Text(s) => PortRange::parse(&s),
        }
    }
}

impl PortRange {
    pub fn parse(s: &str) -> Result<Self, String> {
        let port = |p: &str| -> Result<u16, String> {
            let n: i64 = p.trim().parse().map_err(|_| format!("`{p}` is not a port number"))?;
            if !(1..=65535).contains(&n) {
                return Err(format!("port {n} is out of range 1-65535"));
            }
            Ok(n as u16)
        };
        let (lo, hi) = match s.split_once('-') {
            Some((a, b)) => (port(a)?, port(b)?),
            None => {
                let p = port(s)?;
                (p, p)
            }
        };
        if lo > hi {
            return Err(format!("port range `{s}` is reversed ({lo} > {hi})"));
        }
        Ok(PortRange { lo, hi })
    }
    fn contains(&self, p: u16) -> bool {
        (self.lo..=self.hi).contains(&p)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi { write!(f, "{}", self.lo) } else { write!(f, "{}-{}", self.lo, self.hi) }
    }
}

impl From<PortRange> for String {
    fn from(p: PortRange) -> String {
        p.to_string()
    }
}

/// One rule as operators write it (TOML table). Absent fields match anything.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub action: Action,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_ports: Option<PortRange>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_ports: Option<PortRange>,
    /// Either end's port: the server's socket (local) or the client's (remote), so
    /// one rule admits both sockets of a service's connections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<PortRange>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_cidr: Option<Cidr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_cidr: Option<Cidr>,
    /// Cgroup of the socket's process, as a path below the cgroup v2 mount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    /// Owner uid of the socket's process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
}

impl RuleSpec {
    /// A one-line human summary, e.g. `accelerate remote_ports=8080 cgroup=/app`.
    pub fn summary(&self) -> String {
        let mut s = self.action.as_str().to_string();
        let mut add = |k: &str, v: String| s.push_str(&format!(" {k}={v}"));
        if let Some(p) = self.local_ports { add("local_ports", p.to_string()) }
        if let Some(p) = self.remote_ports { add("remote_ports", p.to_string()) }
        if let Some(p) = self.ports { add("ports", p.to_string()) }
        if let Some(c) = self.local_cidr { add("local_cidr", c.to_string()) }
        if let Some(c) = self.remote_cidr { add("remote_cidr", c.to_string()) }
        if let Some(c) = &self.cgroup { add("cgroup", c.clone()) }
        if let Some(u) = self.uid { add("uid", u.to_string()) }
        s
    }
}

/// A rule with its cgroup path resolved to the kernel's cgroup id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub spec: RuleSpec,
    pub cgroup_id: Option<u64>,
    /// Why the rule matches nothing right now (its cgroup does not exist), if so.
    /// systemd removes and re-creates a unit's cgroup on every restart: the rule
    /// stays in the policy and becomes active again when the cgroup is back.
    pub inactive: Option<String>,
}

impl Resolved {
    pub fn active(&self) -> bool {
        self.inactive.is_none()
    }
}

/// Why a rule set was refused: which rule and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("rule {index}{}: {reason}", name.as_deref().map(|n| format!(" ({n})")).unwrap_or_default())]
    BadRule { index: usize, name: Option<String>, reason: String },
    #[error("{count} rules do not fit in the datapath's rule map (at most {max})")]
    TooMany { count: usize, max: usize },
    /// Rule text that does not parse; the message names the rule, key and reason.
    #[error("{0}")]
    Text(String),
}

/// Where a rule in the effective list comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleSource {
    /// Added over D-Bus, persisted in the state directory; evaluated first.
    Runtime,
    /// The config file's `[[policy.rules]]`.
    Config,
}

impl RuleSource {
    pub fn as_str(self) -> &'static str {
        match self {
            RuleSource::Runtime => "runtime",
            RuleSource::Config => "config",
        }
    }
}

/// The cgroup id of a cgroup v2 directory is its inode number. `Ok(None)`: the path
/// is well-formed but no such cgroup exists (yet, or any more).
pub fn cgroup_id(cgroup_root: &Path, path: &str) -> Result<Option<u64>, String> {
    if !path.starts_with('/') || path.split('/').any(|c| c == "..") {
        return Err(format!("cgroup `{path}` must be an absolute path below the cgroup v2 mount, without `..`"));
    }
    let full = cgroup_root.join(path.trim_start_matches('/'));
    let md = match std::fs::metadata(&full) {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cgroup `{path}` cannot be read at {} ({e})", full.display())),
    };
    if !md.is_dir() {
        return Err(format!("cgroup `{path}` ({}) is not a directory", full.display()));
    }
    Ok(Some(md.ino()))
}

/// Check and resolve a whole rule set; rule numbers in errors count from 1. A rule
/// whose cgroup is missing is inactive, not an error.
pub fn resolve(rules: &[RuleSpec], cgroup_root: &Path) -> Result<Vec<Resolved>, PolicyError> {
    // A `ports` rule takes two kernel rules (see `encode`).
    let kernel_rules: usize = rules.iter().map(|r| 1 + usize::from(r.ports.is_some())).sum();
    if kernel_rules > abi::MAX_RULES as usize {
        return Err(PolicyError::TooMany { count: kernel_rules, max: abi::MAX_RULES as usize });
    }
    rules
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let bad = |reason: String| PolicyError::BadRule { index: i + 1, name: r.name.clone(), reason };
            if r.ports.is_some() && (r.local_ports.is_some() || r.remote_ports.is_some()) {
                return Err(bad("`ports` (either end) cannot be combined with `local_ports` or `remote_ports`".into()));
            }
            let (cgroup_id, inactive) = match &r.cgroup {
                Some(p) => match cgroup_id(cgroup_root, p).map_err(bad)? {
                    Some(id) => (Some(id), None),
                    None => (None, Some(format!("cgroup `{p}` does not exist"))),
                },
                None => (None, None),
            };
            Ok(Resolved { spec: r.clone(), cgroup_id, inactive })
        })
        .collect()
}

/// Encode rules into the ABI layout for one rule buffer. A `ports = P` rule becomes
/// two adjacent kernel rules with the same action and other fields, `local_ports = P`
/// then `remote_ports = P`: under first-match-wins that is exactly "either end in P".
pub fn encode(rules: &[Resolved]) -> Vec<abi::Rule> {
    // An inactive rule matches nothing, so leaving it out decides exactly the same.
    rules
        .iter()
        .filter(|r| r.active())
        .flat_map(|r| match r.spec.ports {
            None => vec![r.clone()],
            Some(p) => {
                let one = |local: bool| {
                    let mut x = r.clone();
                    x.spec.ports = None;
                    if local { x.spec.local_ports = Some(p) } else { x.spec.remote_ports = Some(p) }
                    x
                };
                vec![one(true), one(false)]
            }
        })
        .map(|r| {
            let s = &r.spec;
            let net = |c: Option<Cidr>| c.map_or(([0; 16], 0), |c| (c.mapped().network().octets(), c.mapped().prefix_len()));
            let ((lip, lpfx), (rip, rpfx)) = (net(s.local_cidr), net(s.remote_cidr));
            let lp = s.local_ports.unwrap_or(PortRange { lo: 0, hi: 65535 });
            let rp = s.remote_ports.unwrap_or(PortRange { lo: 0, hi: 65535 });
            let mut flags = 0;
            if r.cgroup_id.is_some() {
                flags |= abi::RULE_MATCH_CGROUP;
            }
            if s.uid.is_some() {
                flags |= abi::RULE_MATCH_UID;
            }
            abi::Rule {
                local_ip: lip,
                remote_ip: rip,
                local_prefix: lpfx,
                remote_prefix: rpfx,
                action: s.action.abi(),
                flags,
                local_port_lo: lp.lo,
                local_port_hi: lp.hi,
                remote_port_lo: rp.lo,
                remote_port_hi: rp.hi,
                uid: s.uid.unwrap_or(0),
                cgroup_id: r.cgroup_id.unwrap_or(0),
            }
        })
        .collect()
}

/// What the datapath knows about one socket when it decides.
#[derive(Debug, Clone, Copy)]
pub struct SocketView {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// None when the socket was created before bypassd attached (no record of its process).
    pub owner: Option<(u64, u32)>,
}

/// The reference matcher: first matching rule wins, else the default.
pub fn decide(rules: &[Resolved], default: Action, s: &SocketView) -> Action {
    let (l, r) = (to_mapped(s.local.ip()), to_mapped(s.remote.ip()));
    for rule in rules.iter().filter(|r| r.active()) {
        let spec = &rule.spec;
        let ok = spec.local_ports.is_none_or(|p| p.contains(s.local.port()))
            && spec.remote_ports.is_none_or(|p| p.contains(s.remote.port()))
            && spec.ports.is_none_or(|p| p.contains(s.local.port()) || p.contains(s.remote.port()))
            && spec.local_cidr.is_none_or(|c| c.contains(&l))
            && spec.remote_cidr.is_none_or(|c| c.contains(&r))
            && rule.cgroup_id.is_none_or(|id| s.owner.is_some_and(|(cg, _)| cg == id))
            && spec.uid.is_none_or(|u| s.owner.is_some_and(|(_, uid)| uid == u));
        if ok {
            return spec.action;
        }
    }
    default
}

/// A connection is accelerated only when both of its sockets are admitted.
pub fn connection_accelerated(rules: &[Resolved], default: Action, a: &SocketView, b: &SocketView) -> bool {
    decide(rules, default, a) == Action::Accelerate && decide(rules, default, b) == Action::Accelerate
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(toml_src: &str) -> RuleSpec {
        toml::from_str(toml_src).unwrap()
    }
    fn res(r: RuleSpec) -> Resolved {
        Resolved { spec: r, cgroup_id: None, inactive: None }
    }
    fn view(l: &str, r: &str) -> SocketView {
        SocketView { local: l.parse().unwrap(), remote: r.parse().unwrap(), owner: None }
    }

    #[test]
    fn ports_parse_and_refuse_bad_values() {
        assert_eq!(PortRange::parse("80").unwrap(), PortRange { lo: 80, hi: 80 });
        assert_eq!(PortRange::parse("1000-2000").unwrap(), PortRange { lo: 1000, hi: 2000 });
        assert!(PortRange::parse("0").unwrap_err().contains("out of range"));
        assert!(PortRange::parse("65536").unwrap_err().contains("out of range"));
        assert!(PortRange::parse("2000-1000").unwrap_err().contains("reversed"));
        assert!(PortRange::parse("http").is_err());
        let r = rule("action = \"accelerate\"\nlocal_ports = 8080\n");
        assert_eq!(r.local_ports, Some(PortRange { lo: 8080, hi: 8080 }));
    }

    #[test]
    fn v4_rules_match_v4_mapped_sockets() {
        let rules = [res(rule("action = \"accelerate\"\nremote_cidr = \"127.0.0.0/8\"\n"))];
        assert_eq!(decide(&rules, Action::Kernel, &view("127.0.0.1:5000", "127.0.0.2:80")), Action::Accelerate);
        assert_eq!(
            decide(&rules, Action::Kernel, &view("[::ffff:127.0.0.1]:80", "[::ffff:127.0.0.1]:5000")),
            Action::Accelerate
        );
        assert_eq!(decide(&rules, Action::Kernel, &view("[::1]:80", "[::1]:5000")), Action::Kernel);
    }

    #[test]
    fn first_match_wins_then_default() {
        let rules = [
            res(rule("action = \"kernel\"\nremote_ports = \"9000-9099\"\n")),
            res(rule("action = \"accelerate\"\nremote_ports = \"9000-9999\"\n")),
        ];
        assert_eq!(decide(&rules, Action::Kernel, &view("127.0.0.1:1", "127.0.0.1:9050")), Action::Kernel);
        assert_eq!(decide(&rules, Action::Kernel, &view("127.0.0.1:1", "127.0.0.1:9150")), Action::Accelerate);
        assert_eq!(decide(&rules, Action::Accelerate, &view("127.0.0.1:1", "127.0.0.1:80")), Action::Accelerate);
    }

    #[test]
    fn owner_rules_never_match_unknown_sockets() {
        let rules = [res(rule("action = \"accelerate\"\nuid = 0\n"))];
        assert_eq!(decide(&rules, Action::Kernel, &view("127.0.0.1:1", "127.0.0.1:2")), Action::Kernel);
        let mut v = view("127.0.0.1:1", "127.0.0.1:2");
        v.owner = Some((1, 0));
        assert_eq!(decide(&rules, Action::Kernel, &v), Action::Accelerate);
    }

    #[test]
    fn missing_cgroups_make_rules_inactive_and_too_many_rules_fail() {
        let r = rule("name = \"web\"\naction = \"accelerate\"\ncgroup = \"/no/such/cgroup\"\n");
        let res = resolve(&[r], Path::new("/sys/fs/cgroup")).unwrap();
        assert_eq!(res[0].inactive.as_deref(), Some("cgroup `/no/such/cgroup` does not exist"));
        assert!(encode(&res).is_empty(), "an inactive rule must not reach the kernel");
        let mut v = view("127.0.0.1:1", "127.0.0.1:2");
        v.owner = Some((0, 0));
        assert_eq!(decide(&res, Action::Kernel, &v), Action::Kernel);
        let bad = rule("action = \"accelerate\"\ncgroup = \"app\"\n");
        assert!(resolve(&[bad], Path::new("/")).unwrap_err().to_string().contains("must be an absolute path"));
        let many = vec![rule("action = \"kernel\"\n"); abi::MAX_RULES as usize + 1];
        assert!(matches!(resolve(&many, Path::new("/")), Err(PolicyError::TooMany { .. })));
    }

    #[test]
    fn encode_maps_v4_to_mapped_prefixes() {
        let r = res(rule("action = \"accelerate\"\nlocal_cidr = \"10.1.0.0/16\"\nremote_ports = \"80-90\"\n"));
        let e = &encode(&[r])[0];
        assert_eq!(e.local_prefix, 112);
        assert_eq!(&e.local_ip[10..14], &[0xff, 0xff, 10, 1]);
        assert_eq!((e.remote_port_lo, e.remote_port_hi), (80, 90));
        assert_eq!((e.local_port_lo, e.local_port_hi), (0, 65535));
        assert_eq!(e.action, abi::ACTION_ACCELERATE);
    }

    #[test]
    fn ports_expands_to_local_then_remote_with_the_same_fields() {
        let r = res(rule("action = \"accelerate\"\nports = \"6379\"\nuid = 7\n"));
        let e = encode(&[r.clone()]);
        assert_eq!(e.len(), 2);
        assert_eq!((e[0].local_port_lo, e[0].local_port_hi, e[0].remote_port_lo, e[0].remote_port_hi), (6379, 6379, 0, 65535));
        assert_eq!((e[1].local_port_lo, e[1].local_port_hi, e[1].remote_port_lo, e[1].remote_port_hi), (0, 65535, 6379, 6379));
        assert!(e.iter().all(|k| k.uid == 7 && k.flags == abi::RULE_MATCH_UID && k.action == abi::ACTION_ACCELERATE));
        assert_eq!(r.spec.summary(), "accelerate ports=6379 uid=7");
        let mixed = rule("action = \"accelerate\"\nports = \"1\"\nlocal_ports = \"2\"\n");
        let err = resolve(&[mixed], Path::new("/")).unwrap_err().to_string();
        assert!(err.contains("cannot be combined"), "{err}");
        let many: Vec<RuleSpec> = (0..33).map(|_| rule("action = \"kernel\"\nports = \"1\"\n")).collect();
        assert!(matches!(resolve(&many, Path::new("/")), Err(PolicyError::TooMany { count: 66, .. })));
    }
}
