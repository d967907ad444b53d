//! `[[links]]`: the link datapath's configuration (VM/container links that skip the
//! bridge), and the checks across entries that serde cannot do.
use serde::{Deserialize, Serialize};
use std::ops::Range;
use toml::Spanned;

/// Longest interface name (IFNAMSIZ - 1).
pub const IFNAME_MAX: usize = 15;

/// One `[[links]]` entry: exactly one of `pair` or `bridge`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LinkSpec {
    /// Kata style: every frame arriving on one side leaves through the other.
    #[serde(default)]
    pub pair: Option<Spanned<[Spanned<IfName>; 2]>>,
    /// Every port of this bridge: known unicast goes straight to its port.
    #[serde(default)]
    pub bridge: Option<Spanned<IfName>>,
    #[serde(default)]
    pub checksum_offload: ChecksumOffload,
    /// How frames reach a veth whose peer sits in another netns.
    #[serde(default)]
    pub redirect: Redirect,
    /// The network namespace the interfaces live in (a pod's, say): a file that
    /// refers to it, such as /run/netns/NAME or /proc/PID/ns/net. Default: bypassd's own.
    #[serde(default)]
    pub netns: Option<Spanned<String>>,
}

impl LinkSpec {
    /// The interfaces named in the entry (a bridge: the bridge itself).
    pub fn interfaces(&self) -> Vec<&str> {
        match (&self.pair, &self.bridge) {
            (Some(p), _) => p.get_ref().iter().map(|i| i.get_ref().0.as_str()).collect(),
            (None, Some(b)) => vec![b.get_ref().0.as_str()],
            (None, None) => Vec::new(),
        }
    }

    /// A short, stable name: "tap0+veth-vm0" or "br0", with "@<netns>" for an entry
    /// in another netns ("@pod1" for /run/netns/pod1, else the path's `/` as `_`).
    pub fn id(&self) -> String {
        let names = self.interfaces().join("+");
        match self.netns_path() {
            None => names,
            Some(p) => {
                let ns = p.strip_prefix("/run/netns/").filter(|n| !n.contains('/')).map_or_else(|| p.replace('/', "_"), String::from);
                format!("{names}@{ns}")
            }
        }
    }

    /// The bridge's interface name (bridge mode).
    pub fn bridge_name(&self) -> Option<&str> {
        self.bridge.as_ref().map(|b| b.get_ref().0.as_str())
    }

    pub fn netns_path(&self) -> Option<&str> {
        self.netns.as_ref().map(|n| n.get_ref().as_str())
    }

    pub fn is_bridge(&self) -> bool {
        self.pair.is_none() && self.bridge.is_some()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Redirect {
    /// bpf_redirect_peer into a veth peer that sits in another netns, else bpf_redirect.
    #[default]
    Auto,
    /// Always bpf_redirect to the destination's egress.
    Egress,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ChecksumOffload {
    #[serde(default)]
    pub rx: OffloadMode,
    /// Off also turns TSO off (the kernel needs tx checksumming for it).
    #[serde(default)]
    pub tx: OffloadMode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OffloadMode {
    /// Leave the interface as it is.
    #[default]
    Keep,
    On,
    Off,
}

impl OffloadMode {
    pub fn wanted(self) -> Option<bool> {
        match self {
            OffloadMode::Keep => None,
            OffloadMode::On => Some(true),
            OffloadMode::Off => Some(false),
        }
    }
}

/// A network interface name as the kernel accepts it (dev_valid_name).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct IfName(pub String);

impl TryFrom<String> for IfName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let bad = s.is_empty()
            || s.len() > IFNAME_MAX
            || s == "."
            || s == ".."
            || s.chars().any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
        if bad {
            return Err(format!(
                "`{s}` is not an interface name (1..{IFNAME_MAX} bytes, no `/`, `:` or whitespace, not `.` or `..`)"
            ));
        }
        Ok(IfName(s))
    }
}

impl From<IfName> for String {
    fn from(n: IfName) -> String {
        n.0
    }
}

/// Checks across entries. Returns the span to point at and the message.
pub fn validate(links: &[Spanned<LinkSpec>]) -> Result<(), (Range<usize>, String)> {
    // (netns, interface) -> (entry index, span, whether it is a bridge).
    type Seen<'a> = ((Option<&'a str>, &'a str), usize, Range<usize>, bool);
    let mut seen: Vec<Seen> = Vec::new();
    for (i, entry) in links.iter().enumerate() {
        let spec = entry.get_ref();
        let key = format!("links[{}]", i + 1);
        if let Some(ns) = &spec.netns {
            let p = ns.get_ref();
            if !p.starts_with('/') || p.contains('\0') || p.split('/').any(|c| c == "..") {
                return Err((ns.span(), format!("key `{key}.netns`: `{p}` is not an absolute path to a netns file (e.g. /run/netns/NAME)")));
            }
        }
        let netns = spec.netns_path();
        let mut names: Vec<(&Spanned<IfName>, bool)> = Vec::new();
        match (&spec.pair, &spec.bridge) {
            (Some(_), Some(b)) => {
                return Err((b.span(), format!("key `{key}.bridge`: an entry is either `pair` or `bridge`, not both")));
            }
            (None, None) => {
                return Err((entry.span(), format!("key `{key}`: an entry needs `pair = [\"a\", \"b\"]` or `bridge = \"name\"`")));
            }
            (Some(p), None) => {
                let [a, b] = p.get_ref();
                if a.get_ref() == b.get_ref() {
                    return Err((p.span(), format!("key `{key}.pair`: `{}` is linked to itself", a.get_ref().0)));
                }
                names.extend([(a, false), (b, false)]);
            }
            (None, Some(b)) => names.push((b, true)),
        }
        for (n, is_bridge) in names {
            let name = n.get_ref().0.as_str();
            if let Some((_, j, _, other_bridge)) = seen.iter().find(|(s, ..)| *s == (netns, name)) {
                let what = if spec.is_bridge() { "bridge" } else { "pair" };
                let msg = if *other_bridge != is_bridge {
                    format!(
                        "key `{key}.{what}`: `{name}` overlaps with links[{}]: a bridge in bypassd's bridge mode cannot also be one side of a pair",
                        j + 1
                    )
                } else {
                    format!("key `{key}.{what}`: interface `{name}` is already used by links[{}]", j + 1)
                };
                return Err((n.span(), msg));
            }
            seen.push(((netns, name), i, n.span(), is_bridge));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use std::path::Path;

    fn err(s: &str) -> String {
        Config::parse(Path::new("/etc/bypassd/t.toml"), s).unwrap_err().to_string()
    }

    #[test]
    fn pair_and_bridge_parse() {
        let c = Config::parse(
            Path::new("t.toml"),
            "[[links]]\npair = [\"tap0\", \"veth-vm0\"]\nchecksum_offload = { tx = \"off\" }\n\n[[links]]\nbridge = \"br0\"\nredirect = \"egress\"\n",
        )
        .unwrap();
        assert_eq!(c.links.len(), 2);
        assert_eq!(c.links[0].get_ref().id(), "tap0+veth-vm0");
        assert_eq!(c.links[0].get_ref().checksum_offload.tx, super::OffloadMode::Off);
        assert_eq!(c.links[0].get_ref().checksum_offload.rx, super::OffloadMode::Keep);
        assert!(c.links[1].get_ref().is_bridge());
        assert_eq!(c.links[1].get_ref().redirect, super::Redirect::Egress);
    }

    #[test]
    fn bad_names_are_located() {
        let e = err("[[links]]\npair = [\"tap0\", \"a-name-that-is-too-long\"]\n");
        assert!(e.starts_with("/etc/bypassd/t.toml:2:"), "{e}");
        assert!(e.contains("not an interface name"), "{e}");
        let e = err("[[links]]\n\nbridge = \"br 0\"\n");
        assert!(e.starts_with("/etc/bypassd/t.toml:3:"), "{e}");
        let e = err("[[links]]\nbridge = \"a/b\"\n");
        assert!(e.contains("not an interface name"), "{e}");
        let e = err("[[links]]\npair = [\"tap0\"]\n");
        assert!(e.starts_with("/etc/bypassd/t.toml:2:"), "{e}");
        let e = err("[[links]]\nbridge = \"br0\"\nchecksum_offload = { rx = \"maybe\" }\n");
        assert!(e.starts_with("/etc/bypassd/t.toml:3:") && e.contains("maybe"), "{e}");
        let e = err("[[links]]\nbridge = \"br0\"\nbrige = 1\n");
        assert!(e.contains("brige"), "{e}");
    }

    #[test]
    fn conflicts_name_line_and_key() {
        let e = err("[[links]]\npair = [\"tap0\", \"tap0\"]\n");
        assert!(e.starts_with("/etc/bypassd/t.toml:2:") && e.contains("`links[1].pair`") && e.contains("itself"), "{e}");
        let e = err("[[links]]\npair = [\"tap0\", \"veth0\"]\n[[links]]\npair = [\"tap1\", \"veth0\"]\n");
        assert!(e.starts_with("/etc/bypassd/t.toml:4:") && e.contains("`links[2].pair`") && e.contains("already used by links[1]"), "{e}");
        let e = err("[[links]]\nbridge = \"br0\"\n[[links]]\npair = [\"br0\", \"veth0\"]\n");
        assert!(e.starts_with("/etc/bypassd/t.toml:4:") && e.contains("overlaps with links[1]"), "{e}");
        let e = err("[[links]]\nbridge = \"br0\"\n[[links]]\nbridge = \"br0\"\n");
        assert!(e.contains("already used"), "{e}");
        let e = err("[[links]]\nbridge = \"br0\"\npair = [\"a\", \"b\"]\n");
        assert!(e.contains("not both"), "{e}");
        // The same names in another netns are other interfaces.
        let ok = "[[links]]\npair = [\"tap0\", \"veth0\"]\n[[links]]\npair = [\"tap0\", \"veth0\"]\nnetns = \"/run/netns/pod1\"\n";
        let c = Config::parse(Path::new("t.toml"), ok).unwrap();
        assert_eq!(c.links[1].get_ref().id(), "tap0+veth0@pod1");
        assert_eq!(c.links[1].get_ref().netns_path(), Some("/run/netns/pod1"));
        let e = err(&ok.replace("/run/netns/pod1", "pod1"));
        assert!(e.starts_with("/etc/bypassd/t.toml:5:") && e.contains("`links[2].netns`") && e.contains("absolute path"), "{e}");
        let e = err(&format!("{ok}[[links]]\nbridge = \"br0\"\npair = [\"x\", \"veth0\"]\nnetns = \"/run/netns/pod1\"\n"));
        assert!(e.contains("not both"), "{e}");
        let e = err("[[links]]\npair = [\"a\", \"b\"]\nnetns = \"/run/netns/p\"\n[[links]]\npair = [\"c\", \"b\"]\nnetns = \"/run/netns/p\"\n");
        assert!(e.starts_with("/etc/bypassd/t.toml:5:") && e.contains("already used by links[1]"), "{e}");
        let e = err("[[links]]\nredirect = \"auto\"\n");
        assert!(e.contains("`links[1]`") && e.contains("needs"), "{e}");
    }
}
