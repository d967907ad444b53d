//! Service-mesh fixtures shared by the mesh tests and the mesh benchmark: pod
//! namespaces joined by a veth, Istio's capture rules (capture.rs) and real Envoy
//! sidecars (envoy.rs). Everything is created here and removed on drop.
pub mod capture;
pub mod envoy;

use crate::Netns;
use std::process::Command;

/// `ip -n NS args…`, panicking with its stderr.
pub fn ip(ns: &Netns, args: &[&str]) {
    let out = Command::new("ip").args(["-n", &ns.name]).args(args).output().expect("run ip");
    assert!(out.status.success(), "ip -n {} {}: {}", ns.name, args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// Two pod namespaces joined by a veth: A = 10.97.0.1 / fd97::1, B = 10.97.0.2 / fd97::2,
/// each with 127.0.0.6 (in 127/8) and ::6 on lo for the inbound sidecar's source.
pub struct Pods {
    pub a: Netns,
    pub b: Netns,
}

pub const POD_A4: &str = "10.97.0.1";
pub const POD_B4: &str = "10.97.0.2";
pub const POD_A6: &str = "fd97::1";
pub const POD_B6: &str = "fd97::2";

impl Pods {
    pub fn new() -> Pods {
        let (a, b) = (Netns::new(), Netns::new());
        crate::veth(&a, &[&format!("{POD_A4}/24"), &format!("{POD_A6}/64")], &b, &[&format!("{POD_B4}/24"), &format!("{POD_B6}/64")]);
        for ns in [&a, &b] {
            ip(ns, &["addr", "add", "::6/128", "dev", "lo", "nodad"]);
        }
        Pods { a, b }
    }
}

