//! The control plane under load, across cgroup restarts and in its signals, over a
//! real bus: a slow reload must not stall readers, every reload tells systemd,
//! rules whose cgroup is missing are shown inactive instead of failing start and
//! reload, and PropertiesChanged follows every kind of change.
mod common;

use bypassd_api as api;
use common::*;
use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

/// Puts the config file back (as a regular file) when the test ends, also on panic:
/// the world's teardown reads it.
struct RestoreConfig(PathBuf, String);

impl Drop for RestoreConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        let _ = std::fs::write(&self.0, &self.1);
    }
}

/// A reload that blocks (here: its config file is a FIFO nobody writes yet) must not
/// hold up GetStatus, and a D-Bus reload sends RELOADING=1 then READY=1 to systemd.
#[test]
fn dbus_reload_never_stalls_readers_and_notifies_systemd() {
    let mut w = World::new();
    let cfg_path = w.daemon().config.clone();
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();
    let _restore = RestoreConfig(cfg_path.clone(), cfg.clone());
    std::fs::remove_file(&cfg_path).unwrap();
    let c = std::ffi::CString::new(cfg_path.as_os_str().as_encoded_bytes()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");

    let reload = {
        let mut cmd = w.cmd(false, &["reload"]);
        std::thread::spawn(move || cmd.output().expect("run bypassctl reload"))
    };
    // A stalled daemon fails the call in 2 s instead of hanging the test.
    let conn = zbus::blocking::connection::Builder::address(w.bus.address().as_str())
        .unwrap()
        .method_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let proxy = api::ManagerProxy::builder(&conn).cache_properties(zbus::proxy::CacheProperties::No).build().unwrap();
    // The reload is blocked reading the FIFO for all of this loop.
    let start = Instant::now();
    let (mut calls, mut slowest) = (0, Duration::ZERO);
    while start.elapsed() < Duration::from_millis(1500) {
        let t = Instant::now();
        let st = proxy.get_status().unwrap_or_else(|e| panic!("GetStatus during a reload: {e}"));
        slowest = slowest.max(t.elapsed());
        assert_eq!(st.state, api::state::ATTACHED);
        calls += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!reload.is_finished(), "the reload should still wait for its config file");
    // Feed the config; the reload completes.
    std::fs::write(&cfg_path, &cfg).unwrap();
    let out = reload.join().unwrap();
    assert!(out.status.success(), "bypassctl reload: {}", describe(&out));
    eprintln!("GetStatus during a blocked reload: {calls} calls, slowest {slowest:?}");
    assert!(slowest < Duration::from_millis(100), "GetStatus took {slowest:?} while a reload ran");

    // systemd hears of the D-Bus reload like of a SIGHUP one.
    let d = w.daemon();
    d.wait_for("RELOADING=1", Duration::from_secs(5)).expect("RELOADING=1 for a D-Bus reload");
    d.wait_for("READY=1", Duration::from_secs(5)).expect("READY=1 after a D-Bus reload");
}

/// A persisted runtime rule whose cgroup was removed: start and reload work, the
/// rule is listed inactive (and counted in status) until the cgroup is back.
#[test]
fn a_rule_whose_cgroup_is_missing_is_shown_inactive_and_comes_back() {
    let mut w = World::new();
    let app = w.cgroup.path.join("app");
    std::fs::create_dir(&app).unwrap();
    let rel = format!("{}/app", w.cgroup.rel);
    w.ok(&["policy", "add", "--action", "accelerate", "--cgroup", &rel, "--name", "app"]);
    let pl = w.json(&["policy", "list"]);
    assert_eq!(pl["rules"][0]["active"], true, "{pl}");
    assert_eq!(w.json(&["status"])["inactive_rules"], 0);

    std::fs::remove_dir(&app).unwrap();
    // A reload right away must not fail on the missing cgroup.
    let out = w.ok(&["reload"]);
    assert!(!out.contains("error"), "{out}");
    let pl = w.json(&["policy", "list"]);
    assert_eq!(pl["rules"][0]["active"], false, "{pl}");
    assert!(pl["rules"][0]["inactive_reason"].as_str().unwrap().contains("does not exist"), "{pl}");
    assert!(w.ok(&["policy", "list"]).contains("inactive: cgroup"), "{}", w.ok(&["policy", "list"]));
    assert_eq!(w.json(&["status"])["inactive_rules"], 1);
    assert!(w.ok(&["status"]).contains("1 rule(s) inactive"));

    // Restart with the persisted rule still naming the missing cgroup.
    let d = w.daemon();
    d.stop();
    d.spawn().expect("bypassd starts with a runtime rule naming a removed cgroup");
    assert_eq!(w.json(&["policy", "list"])["rules"][0]["active"], false);

    // The cgroup comes back: the rule is active again within the re-check interval.
    std::fs::create_dir(&app).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while w.json(&["policy", "list"])["rules"][0]["active"] != true {
        assert!(Instant::now() < deadline, "rule still inactive: {}", w.json(&["policy", "list"]));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(w.json(&["status"])["inactive_rules"], 0);
    let _ = std::fs::remove_dir(&app);
}

/// PropertiesChanged follows actions (over D-Bus and SIGHUP); counters are not signalled.
#[test]
fn properties_changed_follows_actions() {
    let mut w = World::new();
    let conn = zbus::blocking::connection::Builder::address(w.bus.address().as_str()).unwrap().build().unwrap();
    let rule = zbus::MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .interface("org.freedesktop.DBus.Properties")
        .unwrap()
        .member("PropertiesChanged")
        .unwrap()
        .path(api::OBJECT_PATH)
        .unwrap()
        .build();
    let signals = zbus::blocking::MessageIterator::for_match_rule(rule, &conn, Some(64)).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for m in signals.flatten() {
            let Ok((iface, changed, _)) = m.body().deserialize::<(
                String,
                std::collections::HashMap<String, zbus::zvariant::OwnedValue>,
                Vec<String>,
            )>() else {
                continue;
            };
            if tx.send((iface, changed)).is_err() {
                break;
            }
        }
    });
    let expect = |prop: &str, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(5);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match rx.recv_timeout(left) {
                Ok((iface, changed)) => {
                    assert_eq!(iface, api::INTERFACE);
                    assert!(!changed.contains_key(api::property::COUNTERS), "counters are never signalled");
                    if changed.contains_key(prop) {
                        return changed;
                    }
                }
                Err(_) => break,
            }
        }
        panic!("no PropertiesChanged for {prop} after {what}");
    };
    w.ok(&["pause"]);
    let c = expect(api::property::PAUSED, "pause");
    assert!(bool::try_from(&c[api::property::PAUSED]).unwrap());
    w.ok(&["resume"]);
    expect(api::property::PAUSED, "resume");
    w.ok(&["policy", "add", "--action", "kernel", "--remote-ports", "5000"]);
    expect(api::property::POLICY_SHA256, "policy add");
    w.ok(&["detach"]);
    let c = expect(api::property::STATE, "detach");
    assert_eq!(<&str>::try_from(&c[api::property::STATE]).unwrap(), api::state::DETACHED);
    w.ok(&["reload"]);
    expect(api::property::STATE, "reload");
    // A change that does not come over D-Bus: edit the config, SIGHUP.
    let cfg = w.daemon().config.clone();
    let body = std::fs::read_to_string(&cfg).unwrap().replace("default = \"kernel\"", "default = \"accelerate\"");
    std::fs::write(&cfg, body).unwrap();
    w.daemon().reload().unwrap();
    let c = expect(api::property::CONFIG_SHA256, "SIGHUP reload");
    assert_eq!(<&str>::try_from(&c[api::property::DEFAULT_ACTION]).unwrap(), "accelerate");
}
