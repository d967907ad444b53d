//! Policy rules follow their cgroups: systemd removes and re-creates a unit's cgroup
//! on every restart, so a rule naming it must accelerate the new cgroup again, and a
//! rule whose cgroup is gone must leave start and reload working.
//!
//! systemd-run is not used: these hosts' PID 1 is not systemd. Re-creating the
//! cgroup directory is what a unit restart does to the cgroup tree.
use bypass_testsupport::{Daemon, PinDir, TempDir, TestCgroup, bin, enter_cgroup, require_root, run_json};
use bypassd::datapath::Datapath;
use bypassd_ebpf::abi::Counter;
use std::{
    path::Path,
    time::{Duration, Instant},
};

fn inserted(pins: &Path) -> u64 {
    Datapath::open_pinned(pins).and_then(|d| d.counter(Counter::SocketsInserted)).expect("read counters")
}

/// One verified transfer inside `cg`; returns how many sockets the datapath took.
fn transfer_in(cg: &Path, pins: &Path) -> u64 {
    let before = inserted(pins);
    let mut cmd = std::process::Command::new(bin("bypass-traffic"));
    cmd.args(["pair", "--bind", "127.0.0.1", "--bytes", "1M"]);
    enter_cgroup(cg, &mut cmd);
    let v = run_json(cmd);
    // ok: each side's sha256 of what it received matches what the other sent.
    assert_eq!(v["ok"], true, "{v}");
    inserted(pins) - before
}

/// The cgroup id of the rule the kernel holds (the only cgroup rule).
fn kernel_rule_cgroup(pins: &Path) -> Option<u64> {
    let dp = Datapath::open_pinned(pins).expect("open pins");
    dp.active_policy().expect("read policy").rules.iter().find(|r| r.cgroup_id != 0).map(|r| r.cgroup_id)
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "{what} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_rule_follows_its_cgroup_when_it_is_created_again() {
    require_root();
    let (top, pins, state) = (TestCgroup::new(), PinDir::new(), TempDir::new());
    let app = top.path.join("app");
    std::fs::create_dir(&app).unwrap();
    let cfg = format!(
        "[daemon]\npin_dir = \"{}\"\ncgroup = \"{}\"\nstate_dir = \"{}\"\nlog_level = \"debug\"\n\
         [datapath]\nsplice_safety = \"off\"\n\
         [policy]\ndefault = \"kernel\"\n[[policy.rules]]\naction = \"accelerate\"\ncgroup = \"{}/app\"\n",
        pins.path().display(),
        top.rel,
        state.path().display(),
        top.rel
    );
    let mut d = Daemon::start(&cfg).expect("start bypassd");
    assert_eq!(transfer_in(&app, pins.path()), 2, "the rule accelerates its cgroup");
    // Outside the rule's cgroup nothing is accelerated.
    assert_eq!(transfer_in(&top.path, pins.path()), 0);

    // The unit stops: its cgroup goes away. Reload (even of an unchanged config) works.
    std::fs::remove_dir(&app).unwrap();
    d.reload().expect("reload with the rule's cgroup missing");
    assert!(!d.log().contains("reload failed"), "{}", d.log());
    wait_until("the kernel drops the inactive rule", Duration::from_secs(5), || kernel_rule_cgroup(pins.path()).is_none());

    // The unit starts again: same path, new cgroup (new inode).
    std::fs::create_dir(&app).unwrap();
    let new_id = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&app).unwrap().ino()
    };
    wait_until("the rule follows the new cgroup", Duration::from_secs(5), || {
        kernel_rule_cgroup(pins.path()) == Some(new_id)
    });
    assert_eq!(transfer_in(&app, pins.path()), 2, "new connections from the re-created cgroup are accelerated");
    assert!(d.log().contains("is active again"), "{}", d.log());
    let _ = std::fs::remove_dir(&app);
    d.stop();
}

#[test]
fn a_missing_cgroup_in_the_persisted_runtime_policy_does_not_stop_start_or_reload() {
    require_root();
    let (top, pins, state) = (TestCgroup::new(), PinDir::new(), TempDir::new());
    std::fs::write(
        state.path().join("policy.toml"),
        format!("[[rules]]\nname = \"gone\"\naction = \"accelerate\"\ncgroup = \"{}/gone\"\n", top.rel),
    )
    .unwrap();
    let cfg = format!(
        "[daemon]\npin_dir = \"{}\"\ncgroup = \"{}\"\nstate_dir = \"{}\"\n[policy]\ndefault = \"kernel\"\n",
        pins.path().display(),
        top.rel,
        state.path().display()
    );
    let mut d = Daemon::start(&cfg).expect("start with a runtime rule naming a removed cgroup");
    assert!(d.log().contains("is inactive until it exists"), "{}", d.log());
    // A reload that changes only the capacity builds a new generation and succeeds.
    std::fs::write(&d.config, format!("{cfg}[datapath]\ncapacity = 4096\n")).unwrap();
    d.reload().expect("reload");
    assert!(!d.log().contains("reload failed"), "{}", d.log());
    assert!(d.log().contains("configuration reloaded"), "{}", d.log());
    d.stop();
}
