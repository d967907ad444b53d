//! Service mesh on one host (issue 11): consistent keys for every address mix, NAT
//! pairing through Istio's capture rules with real Envoy sidecars, adversarial port
//! reuse, crash and restart. Root; every namespace, rule and process is the test's own.
mod mesh_support;

use bypassd_ebpf::abi::Counter;
use mesh_support::*;

/// Both sockets of a connection derive the same key whatever mix of loopback and
/// non-loopback addresses it has: each mix redirects, and every pass has a reason.
/// (Loopback <-> loopback in two namespaces: datapath.rs same_loopback_tuple_in_two_namespaces_never_crosses.)
#[test]
fn every_address_mix_pairs_both_sockets() {
    let env = Env::new();
    let pods = Pods::new();
    let _d = env.daemon();
    // (listen, connect to, source): as the inbound sidecar, as an app calling a loopback
    // service from its pod IP, and the IPv6 inbound sidecar.
    let cases = [
        (format!("{POD_A4}:0"), POD_A4.to_string(), "127.0.0.6"),
        ("127.0.0.1:0".to_string(), "127.0.0.1".to_string(), POD_A4),
        (format!("[{POD_A6}]:0"), format!("[{POD_A6}]"), "::6"),
        ("[::1]:0".to_string(), "[::1]".to_string(), POD_A6),
    ];
    for (listen, connect, source) in cases {
        let before = env.counter(Counter::RedirectedBytes);
        let (srv, port) = env.serve(&pods.a, &listen, &[]);
        let c = env.send(&pods.a, &format!("{connect}:{port}"), &["--source", source, "--bytes", &(32 * MIB).to_string()]);
        finish(c);
        finish(srv);
        let redirected = env.counter(Counter::RedirectedBytes) - before;
        assert!(redirected >= 4 * MIB, "{source} -> {connect}: only {redirected} bytes redirected (keys differ?)");
        env.assert_passes_explained();
    }
    assert_eq!(env.counter(Counter::InsertFailures), 0);
}
