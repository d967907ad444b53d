//! The runtime layer: rules added over D-Bus, persisted in the state directory and
//! evaluated before the config file's rules.
use super::RuleSpec;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::{fs::File, io::Write, path::Path};

pub const FILE: &str = "policy.toml";

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored {
    #[serde(default)]
    rules: Vec<RuleSpec>,
}

/// None when no runtime layer exists.
pub fn load(state_dir: &Path) -> Result<Option<Vec<RuleSpec>>> {
    let p = state_dir.join(FILE);
    match std::fs::read_to_string(&p) {
        Ok(s) => {
            let st: Stored = toml::from_str(&s).with_context(|| format!("parsing {}", p.display()))?;
            Ok(Some(st.rules))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}

/// Write, fsync, rename, fsync the directory: a crash leaves the old or the new file.
pub fn save(state_dir: &Path, rules: &[RuleSpec]) -> Result<()> {
    std::fs::create_dir_all(state_dir).with_context(|| format!("creating {}", state_dir.display()))?;
    let body = toml::to_string(&Stored { rules: rules.to_vec() }).context("serialising runtime rules")?;
    let tmp = state_dir.join(format!(".{FILE}.tmp"));
    let mut f = File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(b"# Runtime policy layer of bypassd, written by `bypassctl policy`. Do not edit.\n")?;
    f.write_all(body.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, state_dir.join(FILE)).context("replacing runtime policy file")?;
    File::open(state_dir)?.sync_all()?;
    Ok(())
}

pub fn remove(state_dir: &Path) -> Result<bool> {
    match std::fs::remove_file(state_dir.join(FILE)) {
        Ok(()) => {
            File::open(state_dir)?.sync_all()?;
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).context("removing runtime policy file"),
    }
}
