//! Config drop-ins: `<config dir>/conf.d/*.toml`, merged after the main file in name
//! order, so packages and Ansible add settings without editing the conffile.
//!
//! Each file is first parsed on its own as a whole config, so an error names that
//! file, its line and its key. The files are then merged as TOML tables: a key set
//! later replaces the earlier value, tables merge key by key, and `[[policy.rules]]`
//! are appended (main file's rules first, then each drop-in's).
use crate::config::{Config, ConfigError};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// A config as loaded from the main file and its drop-ins.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    /// The main file first, then the drop-ins in the order they were merged.
    pub files: Vec<PathBuf>,
    /// sha256 over every loaded file: the main file's own hash when there is no drop-in.
    pub sha256: String,
    /// The file (and its text) that set `daemon.cgroup`, for locating errors about it.
    pub cgroup_file: PathBuf,
    pub cgroup_src: String,
}

pub fn dropin_dir(main: &Path) -> PathBuf {
    main.parent().unwrap_or(Path::new("/")).join("conf.d")
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError {
        path: path.to_path_buf(),
        line: None,
        column: None,
        message: format!("cannot read config: {e}"),
        excerpt: None,
    })
}

/// `*.toml` files in the drop-in directory, by name; none when it does not exist.
fn dropins(dir: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(ConfigError {
                path: dir.to_path_buf(),
                line: None,
                column: None,
                message: format!("cannot read the drop-in directory: {e}"),
                excerpt: None,
            });
        }
    };
    let mut v: Vec<PathBuf> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml") && !p.is_dir())
        .collect();
    v.sort();
    Ok(v)
}

/// Merge `over` into `base`: tables key by key, `policy.rules` appended, the rest replaced.
fn merge(base: &mut toml::Table, over: toml::Table, path: &str) {
    for (k, v) in over {
        let key_path = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o, &key_path),
            (Some(toml::Value::Array(b)), toml::Value::Array(o)) if key_path == "policy.rules" => b.extend(o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

fn sets_cgroup(t: &toml::Table) -> bool {
    t.get("daemon").and_then(|d| d.as_table()).is_some_and(|d| d.contains_key("cgroup"))
}

fn sha256_hex(b: &[u8]) -> String {
    Sha256::digest(b).iter().map(|b| format!("{b:02x}")).collect()
}

/// Load `main` and the drop-ins next to it; any error leaves the caller's state alone.
pub fn load(main: &Path) -> Result<Loaded, ConfigError> {
    let main_src = read(main)?;
    let main_cfg = Config::parse(main, &main_src)?;
    let mut merged: toml::Table = main_src.parse().map_err(|e: toml::de::Error| {
        ConfigError::at(main, &main_src, e.span(), e.message().trim().to_string())
    })?;
    let mut cgroup = (main.to_path_buf(), main_src.clone(), main_cfg.daemon.cgroup.clone());
    let mut files = vec![main.to_path_buf()];
    let mut hash_input = Vec::new();
    let extra = dropins(&dropin_dir(main))?;
    for p in &extra {
        let src = read(p)?;
        let cfg = Config::parse(p, &src)?;
        let table: toml::Table = src
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::at(p, &src, e.span(), e.message().trim().to_string()))?;
        if sets_cgroup(&table) {
            cgroup = (p.clone(), src.clone(), cfg.daemon.cgroup.clone());
        }
        merge(&mut merged, table, "");
        hash_input.extend_from_slice(format!("{}\0{}\0", p.display(), src.len()).as_bytes());
        hash_input.extend_from_slice(src.as_bytes());
        files.push(p.clone());
    }
    let (config, sha256) = if extra.is_empty() {
        (main_cfg, sha256_hex(main_src.as_bytes()))
    } else {
        let text = toml::to_string(&merged).map_err(|e| ConfigError {
            path: main.to_path_buf(),
            line: None,
            column: None,
            message: format!("cannot merge the drop-ins: {e}"),
            excerpt: None,
        })?;
        // Every file parsed on its own, so the merge parses too; name it if it does not.
        let mut c = Config::parse(&dropin_dir(main), &text)?;
        c.daemon.cgroup = cgroup.2.clone();
        let mut all = format!("{}\0{}\0", main.display(), main_src.len()).into_bytes();
        all.extend_from_slice(main_src.as_bytes());
        all.extend_from_slice(&hash_input);
        (c, sha256_hex(&all))
    };
    Ok(Loaded { config, files, sha256, cgroup_file: cgroup.0, cgroup_src: cgroup.1 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Action;

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn setup(main: &str, drops: &[(&str, &str)]) -> (Dir, PathBuf) {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let d = std::env::temp_dir().join(format!("bypassd-dropins-{}-{n}", std::process::id()));
        std::fs::create_dir_all(d.join("conf.d")).unwrap();
        std::fs::write(d.join("bypassd.toml"), main).unwrap();
        for (n, s) in drops {
            std::fs::write(d.join("conf.d").join(n), s).unwrap();
        }
        let p = d.join("bypassd.toml");
        (Dir(d), p)
    }

    const RULE: &str = "[[policy.rules]]\nname = \"{}\"\naction = \"accelerate\"\nlocal_ports = \"{}\"\n";

    fn rule(name: &str, port: u16) -> String {
        RULE.replacen("{}", name, 1).replacen("{}", &port.to_string(), 1)
    }

    #[test]
    fn dropins_merge_in_name_order_and_append_rules() {
        let main = format!("[daemon]\nlog_level = \"warn\"\n[datapath]\ncapacity = 100\n{}", rule("main", 1));
        let (_d, p) = setup(
            &main,
            &[
                ("20-b.toml", &format!("[datapath]\ncapacity = 300\n{}", rule("b", 3))),
                ("10-a.toml", &format!("[datapath]\ncapacity = 200\nqueue_cap = 0\n{}", rule("a", 2))),
                ("30-c.toml.disabled", "garbage ="),
                ("40-d.toml", "[policy]\ndefault = \"accelerate\"\n"),
            ],
        );
        let l = load(&p).unwrap();
        let names: Vec<_> = l.config.policy.rules.iter().map(|r| r.name.clone().unwrap_or_default()).collect();
        assert_eq!(names, ["main", "a", "b"]);
        assert_eq!(l.config.datapath.capacity.0, 300, "the last file wins");
        assert_eq!(l.config.datapath.queue_cap.0, 0, "keys a later file leaves alone stay");
        assert_eq!(l.config.daemon.log_level.as_str(), "warn");
        assert_eq!(l.config.policy.default, Action::Accelerate);
        let files: Vec<_> = l.files.iter().map(|f| f.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(files, ["bypassd.toml", "10-a.toml", "20-b.toml", "40-d.toml"]);
        // The hash covers every file: changing a drop-in changes it.
        let before = l.sha256.clone();
        std::fs::write(p.parent().unwrap().join("conf.d/40-d.toml"), "[policy]\ndefault = \"kernel\"\n").unwrap();
        assert_ne!(load(&p).unwrap().sha256, before);
    }

    #[test]
    fn no_dropins_is_the_main_file_alone() {
        let (_d, p) = setup("[datapath]\ncapacity = 100\n", &[]);
        let l = load(&p).unwrap();
        assert_eq!(l.files, [p.clone()]);
        assert_eq!(l.sha256, sha256_hex(b"[datapath]\ncapacity = 100\n"));
    }

    #[test]
    fn a_bad_dropin_is_named_with_line_and_key() {
        let (_d, p) = setup("", &[("10-ok.toml", &rule("ok", 1)), ("20-bad.toml", "\n[datapath]\ncapactiy = 5\n")]);
        let e = load(&p).unwrap_err().to_string();
        assert!(e.contains("conf.d/20-bad.toml:3:"), "{e}");
        assert!(e.contains("capactiy"), "{e}");
    }

    #[test]
    fn cgroup_errors_point_into_the_file_that_set_it() {
        let (_d, p) = setup("[daemon]\ncgroup = \"/a\"\n", &[("10.toml", "\n\n[daemon]\ncgroup = \"/b\"\n")]);
        let l = load(&p).unwrap();
        assert_eq!(l.config.daemon.cgroup.get_ref().0, PathBuf::from("/b"));
        assert!(l.cgroup_file.ends_with("conf.d/10.toml"));
        let span = l.config.daemon.cgroup.span();
        let e = ConfigError::at(&l.cgroup_file, &l.cgroup_src, Some(span), "x".into());
        assert_eq!(e.line, Some(4));
    }
}
