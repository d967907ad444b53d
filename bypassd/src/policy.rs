//! Policy: which connections take the eBPF datapath. Rule model and validation,
//! the pure-Rust reference matcher (the kernel's `policy_admits` must agree with
//! it), and the encoding into the ABI's rule buffers.
use bypassd_ebpf::abi;
use serde::{Deserialize, Serialize};
use std::{
    fmt,
    net::{IpAddr, Ipv6Addr, SocketAddr},
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

/// An IPv4 or IPv6 network, "10.0.0.0/8" or "fd00::/8"; a bare address is a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl TryFrom<String> for Cidr {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Cidr::parse(&s)
    }
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Self, String> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a.trim().parse().map_err(|_| format!("`{s}` is not a valid CIDR (bad address `{a}`)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|n| *n <= max)
                .ok_or_else(|| format!("`{s}` is not a valid CIDR (prefix must be 0-{max})"))?,
            None => max,
        };
        // Reject host bits: "10.0.0.1/8" is almost always a typo for a host or a net.
        let c = Cidr { addr, prefix };
        if c.network_bits() != c.mapped() {
            return Err(format!("`{s}` has host bits set (did you mean {}?)", Cidr { addr: c.unmapped_network(), prefix }));
        }
        Ok(c)
    }

    /// The address as the datapath sees it: IPv6, IPv4 as IPv4-mapped.
    fn mapped(&self) -> [u8; 16] {
        to_mapped(self.addr)
    }
    /// Prefix length over the mapped 128-bit address.
    fn mapped_prefix(&self) -> u8 {
        if self.addr.is_ipv4() { 96 + self.prefix } else { self.prefix }
    }
    fn network_bits(&self) -> [u8; 16] {
        mask(self.mapped(), self.mapped_prefix())
    }
    fn unmapped_network(&self) -> IpAddr {
        let m = Ipv6Addr::from(self.network_bits());
        match self.addr {
            IpAddr::V4(_) => IpAddr::V4(m.to_ipv4_mapped().unwrap_or(std::net::Ipv4Addr::UNSPECIFIED)),
            IpAddr::V6(_) => IpAddr::V6(m),
        }
    }
    fn contains(&self, a: &[u8; 16]) -> bool {
        mask(*a, self.mapped_prefix()) == self.network_bits()
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl From<Cidr> for String {
    fn from(c: Cidr) -> String {
        c.to_string()
    }
}

fn mask(mut a: [u8; 16], prefix: u8) -> [u8; 16] {
    for (i, b) in a.iter_mut().enumerate() {
        let bits = (prefix as i32 - 8 * i as i32).clamp(0, 8);
        *b &= if bits == 0 { 0 } else { 0xffu8 << (8 - bits) };
    }
    a
}

pub fn to_mapped(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
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
}

/// Why a rule set was refused: which rule and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("rule {index}{}: {reason}", name.as_deref().map(|n| format!(" ({n})")).unwrap_or_default())]
    BadRule { index: usize, name: Option<String>, reason: String },
    #[error("{count} rules do not fit in the datapath's rule map (at most {max})")]
    TooMany { count: usize, max: usize },
}

/// The cgroup id of a cgroup v2 directory is its inode number.
pub fn cgroup_id(cgroup_root: &Path, path: &str) -> Result<u64, String> {
    if !path.starts_with('/') || path.split('/').any(|c| c == "..") {
        return Err(format!("cgroup `{path}` must be an absolute path below the cgroup v2 mount, without `..`"));
    }
    let full = cgroup_root.join(path.trim_start_matches('/'));
    let md = std::fs::metadata(&full).map_err(|e| format!("cgroup `{path}` not found at {} ({e})", full.display()))?;
    if !md.is_dir() {
        return Err(format!("cgroup `{path}` ({}) is not a directory", full.display()));
    }
    Ok(md.ino())
}

/// Check and resolve a whole rule set; rule numbers in errors count from 1.
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
            let cgroup_id = match &r.cgroup {
                Some(p) => Some(cgroup_id(cgroup_root, p).map_err(bad)?),
                None => None,
            };
            Ok(Resolved { spec: r.clone(), cgroup_id })
        })
        .collect()
}

/// Encode rules into the ABI layout for one rule buffer. A `ports = P` rule becomes
/// two adjacent kernel rules with the same action and other fields, `local_ports = P`
/// then `remote_ports = P`: under first-match-wins that is exactly "either end in P".
pub fn encode(rules: &[Resolved]) -> Vec<abi::Rule> {
    rules
        .iter()
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
            let (lip, lpfx) = s.local_cidr.map_or(([0; 16], 0), |c| (c.network_bits(), c.mapped_prefix()));
            let (rip, rpfx) = s.remote_cidr.map_or(([0; 16], 0), |c| (c.network_bits(), c.mapped_prefix()));
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
    for rule in rules {
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
        Resolved { spec: r, cgroup_id: None }
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
    fn cidrs_parse_and_refuse_bad_values() {
        assert_eq!(Cidr::parse("10.0.0.0/8").unwrap().prefix, 8);
        assert_eq!(Cidr::parse("::1").unwrap().prefix, 128);
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("fd00::/129").is_err());
        assert!(Cidr::parse("10.0.0.300/8").is_err());
        assert!(Cidr::parse("10.0.0.1/8").unwrap_err().contains("host bits"));
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
        let rules = [Resolved { spec: rule("action = \"accelerate\"\nuid = 0\n"), cgroup_id: None }];
        assert_eq!(decide(&rules, Action::Kernel, &view("127.0.0.1:1", "127.0.0.1:2")), Action::Kernel);
        let mut v = view("127.0.0.1:1", "127.0.0.1:2");
        v.owner = Some((1, 0));
        assert_eq!(decide(&rules, Action::Kernel, &v), Action::Accelerate);
    }

    #[test]
    fn resolve_refuses_unknown_cgroups_and_too_many_rules() {
        let r = rule("name = \"web\"\naction = \"accelerate\"\ncgroup = \"/no/such/cgroup\"\n");
        let e = resolve(&[r], Path::new("/sys/fs/cgroup")).unwrap_err();
        assert!(e.to_string().starts_with("rule 1 (web): cgroup `/no/such/cgroup` not found"), "{e}");
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

/// The runtime layer: rules added over D-Bus, persisted in the state directory and
/// evaluated before the config file's rules.
pub mod runtime {
    use super::RuleSpec;
    use anyhow::{Context, Result};
    use serde::{Deserialize, Serialize};
    use std::{fs::File, io::Write, path::Path};

    pub const FILE: &str = "policy.toml";

    #[derive(Debug, Default, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Stored {
        #[serde(default)]
        rules: Vec<RuleSpec>,
    }

    /// None when no runtime layer exists.
    pub fn load(state_dir: &Path) -> Result<Option<Vec<RuleSpec>>> {
        let p = state_dir.join(FILE);
        match std::fs::read_to_string(&p) {
            Ok(s) => {
                let st: Stored = toml::from_str(&s).with_context(|| format!("parsing {}", p.display()))?;
                Ok(Some(st.rules))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
        }
    }

    /// Write, fsync, rename, fsync the directory: a crash leaves the old or the new file.
    pub fn save(state_dir: &Path, rules: &[RuleSpec]) -> Result<()> {
        std::fs::create_dir_all(state_dir).with_context(|| format!("creating {}", state_dir.display()))?;
        let body = toml::to_string(&Stored { rules: rules.to_vec() }).context("serialising runtime rules")?;
        let tmp = state_dir.join(format!(".{FILE}.tmp"));
        let mut f = File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(b"# Runtime policy layer of bypassd, written by `bypassctl policy`. Do not edit.\n")?;
        f.write_all(body.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, state_dir.join(FILE)).context("replacing runtime policy file")?;
        File::open(state_dir)?.sync_all()?;
        Ok(())
    }

    pub fn remove(state_dir: &Path) -> Result<bool> {
        match std::fs::remove_file(state_dir.join(FILE)) {
            Ok(()) => {
                File::open(state_dir)?.sync_all()?;
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e).context("removing runtime policy file"),
        }
    }
}
