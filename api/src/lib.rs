//! bypassd's D-Bus API, defined once: the bus name, object path and interface,
//! the member and error names, the wire types, and the client proxy. The daemon
//! serves it; bypassctl calls it; the bus policy file
//! (`systemd/org.bypassd.Bypassd1.conf`) and the checked-in introspection XML
//! (`api/org.bypassd.Manager1.xml`) are tested against these names.
//!
//! # The interface at a glance
//!
//! `org.bypassd.Manager1` at `/org/bypassd/Bypassd1`, owned by `org.bypassd.Bypassd1`
//! on the system bus:
//!
//! | member | kind | who | signature |
//! |---|---|---|---|
//! | `GetStatus` | method | everyone | `() → (sssbsssstuuuas)` ([`Status`]) |
//! | `GetStats` | method | everyone | `() → a(st)` ([`Stats`]) |
//! | `ListConnections` | method | everyone | `() → a(ssstb)` ([`Connection`]) |
//! | `ListLinks` | method | everyone | `() → a(sssssa(substttt))` ([`LinkStatus`]) |
//! | `ListPolicy` | method | everyone | `() → s default_action, a(ussssbs) rules` ([`PolicyRule`]) |
//! | `PolicyDiff` | method | everyone | `s rules_toml → b changed, a(ussssbs) current, a(ussssbs) proposed` (a dry run of `PolicyApply`) |
//! | `Reload` | method | root | `() → ()` |
//! | `Pause` / `Resume` | method | root | `() → b changed` |
//! | `Detach` | method | root | `() → ()` |
//! | `PolicyAdd` | method | root | `s rule_toml → u index` |
//! | `PolicyInsert` | method | root | `u position, s rule_toml → u index` |
//! | `PolicyRemove` | method | root | `u index → ()` |
//! | `PolicyApply` | method | root | `s rules_toml → b changed` |
//! | `PolicyReset` | method | root | `() → b changed` |
//!
//! Properties (read-only; `PropertiesChanged` is emitted when they change, except
//! for the const ones and `Counters`): `Version`, `StartedAt`, `AbiVersion` (const),
//! `State`, `StateReason`, `Paused`, `Cgroup`, `PinDir`, `ConfigPath`,
//! `ConfigSha256`, `Capacity`, `DefaultAction`, `PolicySha256`, and `Counters`
//! (changes per packet, so never signalled; read it or call `GetStats`).
//!
//! Errors are named `org.bypassd.Error.*` ([`Error`]); calls with a wrong signature
//! get the bus-standard `org.freedesktop.DBus.Error.InvalidArgs`.
pub mod error;
pub mod proxy;
pub mod types;

pub use error::Error;
pub use proxy::ManagerProxy;
pub use types::*;

/// The literal behind [`ERROR_PREFIX`]; a macro so the error names below can be
/// built from it at compile time.
macro_rules! error_prefix {
    () => {
        "org.bypassd.Error"
    };
}

/// Well-known name on the system bus.
pub const BUS_NAME: &str = "org.bypassd.Bypassd1";
/// Object path of the manager object.
pub const OBJECT_PATH: &str = "/org/bypassd/Bypassd1";
/// The manager interface.
pub const INTERFACE: &str = "org.bypassd.Manager1";
/// Prefix of the named errors the daemon returns.
pub const ERROR_PREFIX: &str = error_prefix!();

/// `org.bypassd.Error.InvalidArgument`: an argument (rule, position, index, policy
/// file) was refused; nothing changed. The message names the rule and the reason.
pub const ERROR_INVALID_ARGUMENT: &str = concat!(error_prefix!(), ".InvalidArgument");
/// `org.bypassd.Error.AccessDenied`: the caller is not root; nothing changed.
pub const ERROR_ACCESS_DENIED: &str = concat!(error_prefix!(), ".AccessDenied");
/// `org.bypassd.Error.InvalidConfig`: `Reload` found the config file invalid; the
/// running configuration is kept.
pub const ERROR_INVALID_CONFIG: &str = concat!(error_prefix!(), ".InvalidConfig");
/// `org.bypassd.Error.NotAttached`: the operation needs the datapath, which is
/// detached.
pub const ERROR_NOT_ATTACHED: &str = concat!(error_prefix!(), ".NotAttached");
/// `org.bypassd.Error.Failed`: anything else (kernel refused, I/O error, ...).
pub const ERROR_FAILED: &str = concat!(error_prefix!(), ".Failed");

/// Every error name the daemon returns.
pub const ERROR_NAMES: &[&str] =
    &[ERROR_INVALID_ARGUMENT, ERROR_ACCESS_DENIED, ERROR_INVALID_CONFIG, ERROR_NOT_ATTACHED, ERROR_FAILED];

/// Member names of [`INTERFACE`].
pub mod member {
    pub const GET_STATUS: &str = "GetStatus";
    pub const GET_STATS: &str = "GetStats";
    pub const LIST_CONNECTIONS: &str = "ListConnections";
    pub const LIST_LINKS: &str = "ListLinks";
    pub const LIST_POLICY: &str = "ListPolicy";
    pub const RELOAD: &str = "Reload";
    pub const PAUSE: &str = "Pause";
    pub const RESUME: &str = "Resume";
    pub const DETACH: &str = "Detach";
    pub const POLICY_ADD: &str = "PolicyAdd";
    pub const POLICY_INSERT: &str = "PolicyInsert";
    pub const POLICY_REMOVE: &str = "PolicyRemove";
    pub const POLICY_APPLY: &str = "PolicyApply";
    pub const POLICY_RESET: &str = "PolicyReset";
    pub const POLICY_DIFF: &str = "PolicyDiff";
}

/// Methods everyone may call (the bus policy allows them to all users).
pub const READ_METHODS: &[&str] =
    &[
        member::GET_STATUS,
        member::GET_STATS,
        member::LIST_CONNECTIONS,
        member::LIST_LINKS,
        member::LIST_POLICY,
        member::POLICY_DIFF,
    ];

/// Methods that change state: only root may call them (bus policy and the daemon's
/// own uid check).
pub const WRITE_METHODS: &[&str] = &[
    member::RELOAD,
    member::PAUSE,
    member::RESUME,
    member::DETACH,
    member::POLICY_ADD,
    member::POLICY_INSERT,
    member::POLICY_REMOVE,
    member::POLICY_APPLY,
    member::POLICY_RESET,
];

/// Property names of [`INTERFACE`] (all read-only).
pub mod property {
    pub const VERSION: &str = "Version";
    pub const STARTED_AT: &str = "StartedAt";
    pub const ABI_VERSION: &str = "AbiVersion";
    pub const STATE: &str = "State";
    pub const STATE_REASON: &str = "StateReason";
    pub const PAUSED: &str = "Paused";
    pub const CGROUP: &str = "Cgroup";
    pub const PIN_DIR: &str = "PinDir";
    pub const CONFIG_PATH: &str = "ConfigPath";
    pub const CONFIG_SHA256: &str = "ConfigSha256";
    pub const CAPACITY: &str = "Capacity";
    pub const DEFAULT_ACTION: &str = "DefaultAction";
    pub const POLICY_SHA256: &str = "PolicySha256";
    pub const COUNTERS: &str = "Counters";
}

/// Every property of [`INTERFACE`].
pub const PROPERTIES: &[&str] = &[
    property::VERSION,
    property::STARTED_AT,
    property::ABI_VERSION,
    property::STATE,
    property::STATE_REASON,
    property::PAUSED,
    property::CGROUP,
    property::PIN_DIR,
    property::CONFIG_PATH,
    property::CONFIG_SHA256,
    property::CAPACITY,
    property::DEFAULT_ACTION,
    property::POLICY_SHA256,
    property::COUNTERS,
];

/// Values of `Status.state` / the `State` property.
pub mod state {
    pub const ATTACHED: &str = "attached";
    pub const DETACHED: &str = "detached";
    pub const DEGRADED: &str = "degraded";
}

/// Values of `PolicyRule.source`.
pub mod source {
    pub const RUNTIME: &str = "runtime";
    pub const CONFIG: &str = "config";
}

/// The checked-in introspection XML of [`INTERFACE`], as the daemon serves it.
pub const INTROSPECTION_XML: &str = include_str!("../org.bypassd.Manager1.xml");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_names_share_the_prefix() {
        for n in ERROR_NAMES {
            let rest = n.strip_prefix(ERROR_PREFIX).and_then(|r| r.strip_prefix('.'));
            assert!(rest.is_some_and(|r| !r.contains('.')), "{n}");
            zbus::names::ErrorName::try_from(*n).unwrap();
        }
        zbus::names::WellKnownName::try_from(BUS_NAME).unwrap();
        zbus::names::InterfaceName::try_from(INTERFACE).unwrap();
        zbus::zvariant::ObjectPath::try_from(OBJECT_PATH).unwrap();
    }

    #[test]
    fn proxy_uses_the_names_defined_here() {
        use zbus::proxy::Defaults;
        assert_eq!(ManagerProxy::INTERFACE.as_ref().map(|i| i.as_str()), Some(INTERFACE));
        assert_eq!(ManagerProxy::DESTINATION.as_ref().map(|d| d.as_str()), Some(BUS_NAME));
        assert_eq!(ManagerProxy::PATH.as_ref().map(|p| p.as_str()), Some(OBJECT_PATH));
    }

    /// Members named in the XML, in document order: (kind, name).
    pub(crate) fn xml_members(xml: &str) -> Vec<(String, String)> {
        let start = xml.find(&format!("<interface name=\"{INTERFACE}\">")).expect("interface in XML");
        let body = &xml[start..start + xml[start..].find("</interface>").expect("end of interface")];
        let mut out = Vec::new();
        for kind in ["method", "property", "signal"] {
            let pat = format!("<{kind} name=\"");
            let mut rest = body;
            while let Some(i) = rest.find(&pat) {
                rest = &rest[i + pat.len()..];
                let end = rest.find('"').unwrap();
                out.push((kind.to_string(), rest[..end].to_string()));
            }
        }
        out
    }

    #[test]
    fn checked_in_xml_lists_exactly_the_named_members() {
        let m = xml_members(INTROSPECTION_XML);
        let mut methods: Vec<&str> = m.iter().filter(|(k, _)| k == "method").map(|(_, n)| n.as_str()).collect();
        let mut props: Vec<&str> = m.iter().filter(|(k, _)| k == "property").map(|(_, n)| n.as_str()).collect();
        let mut expected: Vec<&str> = READ_METHODS.iter().chain(WRITE_METHODS).copied().collect();
        let mut expected_props = PROPERTIES.to_vec();
        methods.sort();
        props.sort();
        expected.sort();
        expected_props.sort();
        assert_eq!(methods, expected);
        assert_eq!(props, expected_props);
        for p in PROPERTIES {
            let decl = INTROSPECTION_XML.find(&format!("<property name=\"{p}\"")).unwrap();
            let line = &INTROSPECTION_XML[decl..decl + INTROSPECTION_XML[decl..].find('>').unwrap()];
            assert!(line.contains("access=\"read\""), "{p} must be read-only: {line}");
        }
    }

    #[test]
    fn checked_in_xml_uses_the_wire_types() {
        use zbus::zvariant::Type;
        let sig = |t: &zbus::zvariant::Signature| t.to_string();
        for (arg, ty) in [
            ("name=\"status\"", sig(Status::SIGNATURE)),
            ("name=\"counters\"", sig(<Stats as Type>::SIGNATURE)),
            ("name=\"connections\"", sig(<Vec<Connection> as Type>::SIGNATURE)),
            ("name=\"rules\" type=\"a(", sig(<Vec<PolicyRule> as Type>::SIGNATURE)),
        ] {
            let at = INTROSPECTION_XML.find(arg).unwrap_or_else(|| panic!("{arg} not in XML"));
            let decl = &INTROSPECTION_XML[at..at + INTROSPECTION_XML[at..].find('>').unwrap()];
            assert!(decl.contains(&format!("type=\"{ty}\"")), "{decl} should have type {ty}");
        }
    }

    /// The bus policy file grants exactly the read methods to everyone and keeps
    /// the write methods (and Properties.Set) for root.
    #[test]
    fn bus_policy_file_matches_the_api() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../systemd/org.bypassd.Bypassd1.conf");
        let conf = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let default_start = conf.find("<policy context=\"default\">").expect("default policy");
        let default = &conf[default_start..default_start + conf[default_start..].find("</policy>").unwrap()];
        let root_start = conf.find("<policy user=\"root\">").expect("root policy");
        let root = &conf[root_start..root_start + conf[root_start..].find("</policy>").unwrap()];
        assert!(root.contains(&format!("<allow own=\"{BUS_NAME}\"/>")), "root must own {BUS_NAME}");
        assert!(root.contains(&format!("<allow send_destination=\"{BUS_NAME}\"/>")));
        assert!(!default.contains("own="), "only root may own the name");
        for m in READ_METHODS {
            let rule = format!("send_interface=\"{INTERFACE}\" send_member=\"{m}\"/>");
            assert!(default.contains(&rule), "read method {m} must be allowed to everyone: {rule}");
        }
        for m in WRITE_METHODS {
            assert!(!default.contains(&format!("\"{m}\"")), "write method {m} must not be in the default policy");
        }
        assert!(!default.contains("\"Set\""), "Properties.Set is root-only");
        assert!(default.contains(&format!("send_destination=\"{BUS_NAME}\"")));
        // Everything allowed to everyone is addressed to our name and named exactly.
        for line in default.lines().filter(|l| l.contains("<allow")) {
            assert!(line.contains(&format!("send_destination=\"{BUS_NAME}\"")), "{line}");
            assert!(line.contains("send_interface=\""), "{line}");
        }
    }
}
