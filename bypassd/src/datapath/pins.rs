//! The pin layout, in one place: generation directories under the pin directory and
//! the names of the maps, programs and links inside them. The daemon, `--detach`, the
//! tests and the benchmark all go through here.
//!
//! A generation is named by what cannot change in place: ABI version, SOCKHASH
//! capacity, cgroup, and a hash of the BPF object itself, so a corrected program with
//! the same ABI builds a new generation instead of adopting the old one:
//! `<pin_dir>/v1-cap65536-cg1234-obj0123456789ab/`.
use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::{
    path::{Path, PathBuf},
    sync::OnceLock,
};

/// First 12 hex digits of the SHA-256 of the BPF object this daemon carries.
pub fn object_hash() -> &'static str {
    static H: OnceLock<String> = OnceLock::new();
    H.get_or_init(|| hash_hex(bypassd_ebpf::object()))
}

/// First 12 hex digits of the SHA-256 of `bytes`.
pub fn hash_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().take(6).map(|b| format!("{b:02x}")).collect()
}

/// The generation directory name for this ABI and object.
pub fn gen_name(capacity: u32, cgroup_id: u64) -> String {
    gen_name_for(bypassd_ebpf::abi::ABI_VERSION, capacity, cgroup_id, object_hash())
}

/// The generation directory name for any ABI version and object hash (tests plant old ones).
pub fn gen_name_for(abi: u32, capacity: u32, cgroup_id: u64, object: &str) -> String {
    format!("v{abi}-cap{capacity}-cg{cgroup_id}-obj{object}")
}

/// What a generation directory name says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenName {
    pub abi: u32,
    pub capacity: u32,
    pub cgroup_id: u64,
    /// Empty for generations pinned before objects were hashed.
    pub object: String,
}

impl GenName {
    pub fn parse(name: &str) -> Option<GenName> {
        let rest = name.strip_prefix('v')?;
        let mut parts = rest.split('-');
        let abi = parts.next()?.parse().ok()?;
        let (mut capacity, mut cgroup_id, mut object) = (None, None, String::new());
        for p in parts {
            if let Some(v) = p.strip_prefix("cap") {
                capacity = v.parse().ok();
            } else if let Some(v) = p.strip_prefix("cg") {
                cgroup_id = v.parse().ok();
            } else if let Some(v) = p.strip_prefix("obj") {
                object = v.to_string();
            }
        }
        Some(GenName { abi, capacity: capacity?, cgroup_id: cgroup_id?, object })
    }
}

/// Where a map is pinned inside a generation.
pub fn map_pin(gen_dir: &Path, map: &str) -> PathBuf {
    gen_dir.join(format!("map_{map}"))
}

/// Where a program is pinned inside a generation.
pub fn prog_pin(gen_dir: &Path, prog: &str) -> PathBuf {
    gen_dir.join(format!("prog_{prog}"))
}

/// Where a link is pinned inside a generation (`link` is a table's link name, e.g. `sockops`).
pub fn link_pin(gen_dir: &Path, link: &str) -> PathBuf {
    gen_dir.join(format!("link_{link}"))
}

/// What kind of pin a file in a generation directory is, and its map/program/link name.
pub fn classify(file_name: &str) -> Option<(PinKind, &str)> {
    [("map_", PinKind::Map), ("prog_", PinKind::Prog), ("link_", PinKind::Link)]
        .into_iter()
        .find_map(|(p, k)| file_name.strip_prefix(p).map(|n| (k, n)))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinKind {
    Map,
    Prog,
    Link,
}

/// The scratch directory a build fills before renaming it into place (bpffs refuses
/// names with dots, and a crash half-way must never leave something adoptable).
pub fn building_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join(format!("building-{}", std::process::id()))
}

/// The link datapath's folder under the pin directory (`links/<entry>/`, see
/// `link::entry`); it has its own lifecycle and is never a generation.
pub const LINKS_DIR: &str = "links";

pub fn links_root(pin_dir: &Path) -> PathBuf {
    pin_dir.join(LINKS_DIR)
}

/// A link entry's folder name: `v1-pair-tap0+veth-vm0-1a2b3c4d` (link ABI version,
/// mode, interfaces with bpffs's forbidden dots replaced, hash of the exact names).
pub fn link_entry_name(mode: &str, id: &str) -> String {
    let hash: String = Sha256::digest(id.as_bytes()).iter().take(4).map(|b| format!("{b:02x}")).collect();
    format!("v{}-{mode}-{}-{hash}", bypassd_ebpf::abi::BL_ABI_VERSION, id.replace('.', "_"))
}

/// Where an interface's TCX link is pinned in a link entry: `link_tcx_<ifname>`, with
/// the characters bpffs refuses (`.`) escaped.
pub fn tcx_pin(entry_dir: &Path, ifname: &str) -> PathBuf {
    link_pin(entry_dir, &format!("tcx_{}", ifname.replace('%', "%25").replace('.', "%2e")))
}

/// The interface a `link_tcx_*` pin file stands for.
pub fn tcx_ifname(file_name: &str) -> Option<String> {
    file_name.strip_prefix("link_tcx_").map(|n| n.replace("%2e", ".").replace("%25", "%"))
}

/// Generation directories (and interrupted builds) under the pin directory, sorted.
pub fn generations(pin_dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(pin_dir) else { return Vec::new() };
    let mut v: Vec<PathBuf> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_dir() && p.file_name().is_none_or(|n| n != LINKS_DIR))
        .collect();
    v.sort();
    v
}

/// The complete generation pinned under `pin_dir` (the last by name if there are several).
pub fn current(pin_dir: &Path) -> Result<PathBuf> {
    generations(pin_dir)
        .into_iter()
        .rev()
        .find(|g| g.file_name().and_then(|n| n.to_str()).and_then(GenName::parse).is_some())
        .with_context(|| format!("no datapath is pinned under {}", pin_dir.display()))
}

/// Unpin one generation. Its cgroup links go (new connections stop using it); its
/// sockets keep redirecting until they close.
pub fn retire(gen_dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(gen_dir).with_context(|| format!("reading {}", gen_dir.display()))? {
        let p = e?.path();
        std::fs::remove_file(&p).with_context(|| format!("unpinning {}", p.display()))?;
    }
    std::fs::remove_dir(gen_dir).with_context(|| format!("removing {}", gen_dir.display()))
}

/// Remove the whole datapath: detach from new connections, let old ones finish.
/// Returns how many generations were removed.
pub fn detach(pin_dir: &Path) -> Result<usize> {
    let gens = generations(pin_dir);
    for g in &gens {
        retire(g)?;
    }
    // The link datapath is retired on its own (link::retire_all): leave its folder.
    if pin_dir.exists() && !links_root(pin_dir).exists() {
        std::fs::remove_dir(pin_dir).with_context(|| format!("removing {}", pin_dir.display()))?;
    }
    Ok(gens.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let n = gen_name_for(3, 65536, 42, "0123456789ab");
        assert_eq!(n, "v3-cap65536-cg42-obj0123456789ab");
        let g = GenName::parse(&n).expect("parses");
        assert_eq!(g, GenName { abi: 3, capacity: 65536, cgroup_id: 42, object: "0123456789ab".into() });
        // Generations pinned before objects were hashed still parse (and never match).
        assert_eq!(GenName::parse("v3-cap8-cg9").map(|g| g.object), Some(String::new()));
        assert_eq!(GenName::parse("building-12"), None);
        assert_eq!(object_hash().len(), 12);
        assert_eq!(classify("link_sockops"), Some((PinKind::Link, "sockops")));
        let p = tcx_pin(Path::new("/x"), "eth0.100");
        assert_eq!(p, Path::new("/x/link_tcx_eth0%2e100"));
        assert_eq!(tcx_ifname("link_tcx_eth0%2e100").as_deref(), Some("eth0.100"));
        assert!(!link_entry_name("bridge", "br.0").contains('.'));
    }
}
