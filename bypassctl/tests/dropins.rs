//! Config drop-ins (`conf.d/*.toml` next to the main file) against a real bypassd on
//! a private system bus, as root: merge order, status lists the files, and a bad
//! drop-in is refused on reload with file:line:key while the running state is kept.
mod common;

use common::*;

#[test]
fn dropins_merge_in_order_and_a_bad_one_is_refused_on_reload() {
    let mut w = World::new();
    let main = w.daemon().config.clone();
    let confd = main.parent().unwrap().join("conf.d");
    std::fs::create_dir_all(&confd).unwrap();
    let st = w.json(&["status"]);
    assert_eq!(st["config_files"], serde_json::json!([main.display().to_string()]));
    let sha_main_only = st["config_sha256"].clone();

    // Two drop-ins, written in reverse name order: merged by name, rules appended.
    std::fs::write(confd.join("20-second.toml"), "[[policy.rules]]\nname = \"second\"\naction = \"kernel\"\nlocal_ports = \"2000\"\n").unwrap();
    std::fs::write(confd.join("10-first.toml"), "[policy]\ndefault = \"accelerate\"\n\n[[policy.rules]]\nname = \"first\"\naction = \"accelerate\"\nlocal_ports = \"1000\"\n").unwrap();
    std::fs::write(confd.join("README"), "not a drop-in").unwrap();
    w.ok(&["reload"]);
    let st = w.json(&["status"]);
    let files: Vec<String> = st["config_files"].as_array().unwrap().iter().map(|f| f.as_str().unwrap().to_string()).collect();
    assert_eq!(
        files,
        [main.display().to_string(), confd.join("10-first.toml").display().to_string(), confd.join("20-second.toml").display().to_string()]
    );
    assert_ne!(st["config_sha256"], sha_main_only, "the hash covers the drop-ins");
    let human = w.ok(&["status"]);
    assert!(human.contains("Config files:") && human.contains("10-first.toml"), "{human}");
    let pl = w.json(&["policy", "list"]);
    assert_eq!(pl["default_action"], "accelerate");
    let names: Vec<&str> = pl["rules"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["from config", "first", "second"]);

    // A bad drop-in: refused with its file, line and key; nothing changes.
    let before = w.snapshot();
    std::fs::write(confd.join("30-bad.toml"), "[datapath]\ncapacity = 1024\nsplice_readerz = []\n").unwrap();
    let o = w.ctl(&["reload"]);
    assert!(!o.status.success(), "{}", describe(&o));
    let err = text(&o.stderr);
    let loc = format!("{}:3:", confd.join("30-bad.toml").display());
    assert!(err.contains(&loc) && err.contains("splice_readerz"), "error should name {loc} and the key: {err}");
    assert_eq!(w.snapshot(), before, "a refused drop-in must change nothing");
    assert!(w.daemon().log().contains("30-bad.toml:3:"), "the log says why");
    // Fixed, it applies.
    std::fs::remove_file(confd.join("30-bad.toml")).unwrap();
    w.ok(&["reload"]);
    assert_eq!(w.json(&["status"])["config_files"].as_array().unwrap().len(), 3);
}
