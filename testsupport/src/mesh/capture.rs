//! Istio's sidecar capture, rule for rule as in istio/istio
//! tools/istio-iptables/pkg/capture/testdata/*.golden (proxy uid and gid 1337, all
//! inbound ports, all outbound IP ranges) and, for the nftables mode,
//! tools/istio-nftables/pkg/capture/testdata/*.golden (table inet istio-proxy-nat).
//! Applied inside a pod namespace only, so it goes with the namespace.
use crate::Netns;
use std::{io::Write, process::{Command, Stdio}};

/// Which backend builds the capture.
#[derive(Clone, Copy, Debug)]
pub enum Capture {
    Iptables,
    Nftables,
}

/// ISTIO_OUTPUT / ISTIO_REDIRECT / ISTIO_IN_REDIRECT for one family (iptables-restore input).
fn iptables_rules(local_src: &str, lo_dst: &str) -> String {
    let mut r = String::from("*nat\n:ISTIO_INBOUND - [0:0]\n:ISTIO_REDIRECT - [0:0]\n:ISTIO_IN_REDIRECT - [0:0]\n:ISTIO_OUTPUT - [0:0]\n");
    r += "-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN\n";
    r += "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001\n";
    r += "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006\n";
    r += "-A PREROUTING -p tcp -j ISTIO_INBOUND\n";
    r += "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT\n";
    r += "-A OUTPUT -p tcp -j ISTIO_OUTPUT\n";
    r += &format!("-A ISTIO_OUTPUT -o lo -s {local_src} -j RETURN\n");
    for m in ["--uid-owner", "--gid-owner"] {
        r += &format!("-A ISTIO_OUTPUT -o lo ! -d {lo_dst} -p tcp ! --dport 15008 -m owner {m} 1337 -j ISTIO_IN_REDIRECT\n");
        r += &format!("-A ISTIO_OUTPUT -o lo -m owner ! {m} 1337 -j RETURN\n");
        r += &format!("-A ISTIO_OUTPUT -m owner {m} 1337 -j RETURN\n");
    }
    r += &format!("-A ISTIO_OUTPUT -d {lo_dst} -j RETURN\n");
    r += "-A ISTIO_OUTPUT -j ISTIO_REDIRECT\nCOMMIT\n";
    r
}

/// Istio's nftables mode, both families in one inet table.
fn nftables_rules() -> String {
    let t = "inet istio-proxy-nat";
    let mut r = format!("add table {t}\n");
    r += &format!("add chain {t} prerouting {{ type nat hook prerouting priority -100 ; }}\n");
    r += &format!("add chain {t} output {{ type nat hook output priority -100 ; }}\n");
    for c in ["istio-inbound", "istio-redirect", "istio-in-redirect", "istio-output"] {
        r += &format!("add chain {t} {c}\n");
    }
    r += &format!("add rule {t} istio-inbound meta l4proto tcp tcp dport 15008 return\n");
    r += &format!("add rule {t} istio-redirect meta l4proto tcp redirect to :15001\n");
    r += &format!("add rule {t} istio-in-redirect meta l4proto tcp redirect to :15006\n");
    r += &format!("add rule {t} prerouting meta l4proto tcp jump istio-inbound\n");
    r += &format!("add rule {t} istio-inbound meta l4proto tcp jump istio-in-redirect\n");
    r += &format!("add rule {t} output jump istio-output\n");
    r += &format!("add rule {t} istio-output oifname lo ip saddr 127.0.0.6/32 return\n");
    r += &format!("add rule {t} istio-output oifname lo ip6 saddr ::6/128 return\n");
    for m in ["skuid", "skgid"] {
        r += &format!("add rule {t} istio-output oifname lo meta l4proto tcp ip daddr != 127.0.0.1/32 tcp dport != 15008 {m} 1337 jump istio-in-redirect\n");
        r += &format!("add rule {t} istio-output oifname lo meta l4proto tcp ip6 daddr != ::1/128 tcp dport != 15008 {m} 1337 jump istio-in-redirect\n");
        r += &format!("add rule {t} istio-output oifname lo {m} != 1337 return\n");
        r += &format!("add rule {t} istio-output {m} 1337 return\n");
    }
    r += &format!("add rule {t} istio-output ip daddr 127.0.0.1/32 return\n");
    r += &format!("add rule {t} istio-output ip6 daddr ::1/128 return\n");
    r += &format!("add rule {t} istio-output jump istio-redirect\n");
    r
}

fn feed(ns: &Netns, prog: &[&str], input: &str) {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &ns.name]).args(prog).stdin(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c.spawn().unwrap_or_else(|e| panic!("running {prog:?} (scripts/deps-mesh installs it): {e}"));
    child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("write rules");
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "{prog:?} in {}: {}\n{input}", ns.name, String::from_utf8_lossy(&out.stderr));
}

/// Install the capture in `ns` (IPv4 and IPv6).
pub fn install(ns: &Netns, how: Capture) {
    match how {
        Capture::Iptables => {
            feed(ns, &["iptables-restore", "--noflush"], &iptables_rules("127.0.0.6/32", "127.0.0.1/32"));
            feed(ns, &["ip6tables-restore", "--noflush"], &iptables_rules("::6/128", "::1/128"));
        }
        Capture::Nftables => feed(ns, &["nft", "-f", "-"], &nftables_rules()),
    }
}
