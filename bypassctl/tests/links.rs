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
    let ns = format!("/run/netns/bpn{}-none", std::process::id());
    let cfg = format!(
        "{}\n[[links]]\npair = [\"{a}\", \"{b}\"]\nchecksum_offload = {{ tx = \"off\" }}\n\n[[links]]\npair = [\"{a}\", \"{b}\"]\nnetns = \"{ns}\"\n",
        config(&w.pins, &w.cgroup, &w.state)
    );
    let (k, v) = w.bus.env();
    w.daemon = Some(ts::Daemon::start_with_env(&cfg, &[(k, &v)]).expect("start bypassd"));

    let st = w.json(&["status"]);
    let links = st["links"].as_array().unwrap_or_else(|| panic!("no links in {st}"));
    assert_eq!(links.len(), 2, "{st}");
    let l = &links[0];
    assert_eq!(l["name"], format!("{a}+{b}"));
    assert_eq!(l["mode"], "pair");
    assert_eq!(l["state"], "pending", "{l}");
    let reason = l["reason"].as_str().unwrap_or_default();
    assert!(reason.contains(&a) && reason.contains(&b), "{l}");
    assert_eq!(l["interfaces"][0]["ifindex"], 0, "{l}");
    assert_eq!(l["interfaces"][0]["attached"], false, "{l}");
    assert_eq!(l["interfaces"][0]["redirected_frames"], 0, "{l}");
    assert_eq!(l["interfaces"][0]["passed_bytes"], 0, "{l}");
    assert_eq!(l["netns"], "", "{l}");
    // The same names in a netns whose file does not exist: pending on the netns.
    let n = &links[1];
    let nsname = ns.trim_start_matches("/run/netns/");
    assert_eq!(n["name"], format!("{a}+{b}@{nsname}"), "{n}");
    assert_eq!(n["netns"], ns.as_str(), "{n}");
    assert_eq!(n["state"], "pending", "{n}");
    assert_eq!(n["reason"], format!("waiting for netns {ns}"), "{n}");

    let human = w.ok(&["status"]);
    assert!(human.contains(&format!("Link:          pair {a}+{b} pending: waiting for {a}, {b}\n")), "{human}");
    assert!(human.contains(&format!("Link:          pair {a}+{b}@{nsname} pending: waiting for netns {ns} (netns {ns})")), "{human}");

    let stats = w.json(&["stats"]);
    for k in ["redirected_frames", "redirected_bytes", "passed_frames", "passed_bytes"] {
        assert_eq!(stats[format!("link.{a}+{b}.{k}")], 0, "{stats}");
    }
}
