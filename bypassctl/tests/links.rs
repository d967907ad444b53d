//! `bypassctl status` and `stats` show the link datapath's entries over D-Bus
//! (ListLinks, link.* counters). Interfaces that do not exist make a pending link,
//! which needs no devices; attached links are proven in bypassd/tests/links.rs.
mod common;

use bypass_testsupport::{self as ts, dbus::SystemBus};
use common::{World, config};

#[test]
fn pending_links_are_listed_with_why_and_counted() {
    let mut w = World::without_daemon(SystemBus::start().expect("start dbus-daemon"));
    let (a, b) = (format!("bpn{}a", std::process::id() % 100000), format!("bpn{}b", std::process::id() % 100000));
    let cfg = format!("{}\n[[links]]\npair = [\"{a}\", \"{b}\"]\nchecksum_offload = {{ tx = \"off\" }}\n", config(&w.pins, &w.cgroup, &w.state));
    let (k, v) = w.bus.env();
    w.daemon = Some(ts::Daemon::start_with_env(&cfg, &[(k, &v)]).expect("start bypassd"));

    let st = w.json(&["status"]);
    let links = st["links"].as_array().unwrap_or_else(|| panic!("no links in {st}"));
    assert_eq!(links.len(), 1, "{st}");
    let l = &links[0];
    assert_eq!(l["name"], format!("{a}+{b}"));
    assert_eq!(l["mode"], "pair");
    assert_eq!(l["state"], "pending", "{l}");
    let reason = l["reason"].as_str().unwrap_or_default();
    assert!(reason.contains(&a) && reason.contains(&b), "{l}");
    assert_eq!(l["interfaces"][0]["ifindex"], 0, "{l}");
    assert_eq!(l["interfaces"][0]["attached"], false, "{l}");

    let human = w.ok(&["status"]);
    assert!(human.contains(&format!("Link:          pair {a}+{b} pending: waiting for {a}, {b}")), "{human}");

    let stats = w.json(&["stats"]);
    for k in ["redirected_frames", "redirected_bytes", "passed_frames", "passed_bytes"] {
        assert_eq!(stats[format!("link.{a}+{b}.{k}")], 0, "{stats}");
    }
}
