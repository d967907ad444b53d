//! `cargo xtask package`: the .deb (cargo-deb) and the .rpm (rpmbuild, from a spec
//! generated out of `[package.metadata.generate-rpm]`), both from the same release
//! build, then lintian and rpmlint.
use crate::util::{self, glob, have, run};
use anyhow::{Context, Result, bail};
use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

/// The crate whose Cargo.toml holds the packaging metadata.
const CRATE: &str = "bypassd";
/// Where generated man pages, completions and docs go, below the target dir's
/// release/ (cargo-deb maps the `target/release/` prefix of an asset there).
const STAGE: &str = "package-stage";

pub struct Options {
    pub out: Option<PathBuf>,
    pub revision: String,
    pub lint: bool,
    /// Skip `cargo build` (the caller built already).
    pub no_build: bool,
}

impl Options {
    pub fn parse(args: &[String]) -> Result<Options> {
        let mut o = Options {
            out: None,
            revision: "1".into(),
            lint: true,
            no_build: false,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--out" => o.out = Some(it.next().context("--out needs a directory")?.into()),
                "--revision" => o.revision = it.next().context("--revision needs a value")?.clone(),
                "--no-lint" => o.lint = false,
                "--no-build" => o.no_build = true,
                other => bail!("package: unknown option `{other}`"),
            }
        }
        if o.revision.is_empty()
            || !o
                .revision
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '+')
        {
            bail!(
                "--revision must be made of letters, digits, '.' and '+' (got `{}`)",
                o.revision
            );
        }
        Ok(o)
    }
}

/// Build both packages; returns [deb, rpm].
pub fn package(o: &Options) -> Result<Vec<PathBuf>> {
    let ws = util::workspace_root();
    let target = util::target_dir(&ws)?;
    let out = o.out.clone().unwrap_or_else(|| ws.join("dist"));
    let mut missing = Vec::new();
    if !cargo_deb_installed() {
        missing.push("cargo-deb");
    }
    for t in ["rpmbuild", "strip"] {
        if !have(t) {
            missing.push(t);
        }
    }
    if o.lint {
        for t in ["lintian", "rpmlint"] {
            if !have(t) {
                missing.push(t);
            }
        }
    }
    if !missing.is_empty() {
        bail!(
            "missing {}; install them with: bash packaging/ci-deps.sh",
            missing.join(", ")
        );
    }

    if !o.no_build {
        run(Command::new(util::cargo())
            .args(["build", "--release", "-p", "bypassd", "-p", "bypassctl"])
            .current_dir(&ws))?;
    }
    stage(&ws, &target)?;
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let out = out.canonicalize()?;
    let deb = build_deb(&ws, &out, &o.revision)?;
    let rpm = build_rpm(&ws, &target, &out, &o.revision)?;
    if o.lint {
        lint(&deb, &rpm)?;
    }
    Ok(vec![deb, rpm])
}

fn cargo_deb_installed() -> bool {
    Command::new(util::cargo())
        .args(["deb", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Man pages and completions from `bypassctl generate`, and the docs.
fn stage(ws: &Path, target: &Path) -> Result<()> {
    let stage = target.join("release").join(STAGE);
    if stage.exists() {
        std::fs::remove_dir_all(&stage).with_context(|| format!("removing {}", stage.display()))?;
    }
    let ctl = target.join("release/bypassctl");
    run(Command::new(&ctl)
        .arg("generate")
        .arg("man")
        .arg(stage.join("man")))?;
    run(Command::new(&ctl)
        .arg("generate")
        .arg("completions")
        .arg(stage.join("completions")))?;
    for f in [
        "man/bypassctl.1",
        "completions/bypassctl.bash",
        "completions/_bypassctl",
        "completions/bypassctl.fish",
    ] {
        if !stage.join(f).is_file() {
            bail!(
                "`bypassctl generate` did not write {f} (into {})",
                stage.display()
            );
        }
    }
    // Debian policy and rpmlint want compressed man pages; cargo-deb compresses only
    // files it did not find under target/, so compress the generated ones here.
    let mut pages = glob(&stage.join("man/*.1"))?;
    pages.sort();
    run(Command::new("gzip").arg("-9nf").args(&pages))?;
    let doc = stage.join("doc");
    std::fs::create_dir_all(&doc)?;
    // Docs an operator reads next to the man pages; the ones not written yet are skipped.
    for (src, name) in [
        ("README.md", "README.md"),
        ("docs/packaging.md", "packaging.md"),
        ("docs/bypassctl.md", "bypassctl.md"),
    ] {
        let p = ws.join(src);
        if p.is_file() {
            std::fs::copy(&p, doc.join(name))
                .with_context(|| format!("copying {}", p.display()))?;
        }
    }
    if std::fs::read_dir(&doc)?.next().is_none() {
        bail!("no documentation to package (README.md, docs/packaging.md)");
    }
    Ok(())
}

fn remove_matching(dir: &Path, pattern: &str) -> Result<()> {
    for p in glob(&dir.join(pattern))? {
        if p.is_file() {
            std::fs::remove_file(&p)?;
        }
    }
    Ok(())
}

fn build_deb(ws: &Path, out: &Path, revision: &str) -> Result<PathBuf> {
    remove_matching(out, "bypassd_*.deb")?;
    run(Command::new(util::cargo())
        .args([
            "deb",
            "-p",
            CRATE,
            "--no-build",
            "--strip",
            "--no-separate-debug-symbols",
            "--deb-revision",
            revision,
            "-o",
        ])
        .arg(out)
        .current_dir(ws))?;
    let debs = glob(&out.join("bypassd_*.deb"))?;
    match debs.as_slice() {
        [d] => Ok(d.clone()),
        _ => bail!(
            "expected one bypassd_*.deb in {}, found {debs:?}",
            out.display()
        ),
    }
}

/// The first entry of packaging/debian/changelog, for the spec's %changelog.
struct ChangelogEntry {
    version: String,
    lines: Vec<String>,
    who: String,
    date: String,
}

fn changelog_entry(ws: &Path) -> Result<ChangelogEntry> {
    let p = ws.join("packaging/debian/changelog");
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    let mut lines = text.lines();
    let head = lines.next().context("empty changelog")?;
    let version = head
        .split_once('(')
        .and_then(|(_, r)| r.split_once(')'))
        .map(|(v, _)| v.to_string())
        .context("changelog: no (version) on the first line")?;
    let mut items: Vec<String> = Vec::new();
    for l in lines.by_ref() {
        if let Some(trailer) = l.strip_prefix(" -- ") {
            // " -- Name <mail>  Fri, 27 Nov 2026 00:00:00 +0000"
            let (who, date) = trailer
                .split_once("  ")
                .context("changelog: malformed trailer line")?;
            // RFC 2822 "Fri, 27 Nov 2026 ..." -> rpm's "Fri Nov 27 2026".
            let f: Vec<&str> = date.split_whitespace().collect();
            if f.len() < 4 {
                bail!("changelog: malformed date `{date}`");
            }
            let date = format!("{} {} {} {}", f[0].trim_end_matches(','), f[2], f[1], f[3]);
            return Ok(ChangelogEntry {
                version,
                lines: items,
                who: who.to_string(),
                date,
            });
        }
        let t = l.trim();
        if let Some(item) = t.strip_prefix("* ") {
            items.push(item.to_string());
        } else if !t.is_empty()
            && let Some(last) = items.last_mut()
        {
            last.push(' ');
            last.push_str(t);
        }
    }
    bail!("changelog: first entry has no trailer line")
}

struct RpmAsset {
    source: PathBuf,
    dest: String,
    mode: String,
    config: bool,
    doc: bool,
}

fn build_rpm(ws: &Path, target: &Path, out: &Path, revision: &str) -> Result<PathBuf> {
    let manifest_path = ws.join(CRATE).join("Cargo.toml");
    let manifest: toml::Value = toml::from_str(&std::fs::read_to_string(&manifest_path)?)
        .with_context(|| format!("parsing {}", manifest_path.display()))?;
    let meta = &manifest["package"]["metadata"];
    let rpm = meta
        .get("generate-rpm")
        .context("bypassd/Cargo.toml has no [package.metadata.generate-rpm]")?;
    let deb = meta
        .get("deb")
        .context("bypassd/Cargo.toml has no [package.metadata.deb]")?;
    let (version, license, _) = util::package_info(ws, CRATE)?;
    let crate_dir = ws.join(CRATE);
    let s = |v: &toml::Value, k: &str| {
        v.get(k)
            .and_then(|x| x.as_str())
            .unwrap_or_default()
            .to_string()
    };

    // Resolve the asset table the way cargo-generate-rpm does: `target/release/` is the
    // real target directory, other sources are relative to the crate, a trailing
    // slash in dest means "into this directory".
    let mut assets = Vec::new();
    for a in rpm
        .get("assets")
        .and_then(|a| a.as_array())
        .context("generate-rpm.assets missing")?
    {
        let src = s(a, "source");
        let dest = s(a, "dest");
        let src_path = match src.strip_prefix("target/release/") {
            Some(rest) => target.join("release").join(rest),
            None => crate_dir.join(&src),
        };
        let files = glob(&src_path)?;
        if files.is_empty() || !files.iter().all(|f| f.is_file()) {
            bail!("rpm asset {src}: no such file ({})", src_path.display());
        }
        for f in files {
            let dest = if dest.ends_with('/') {
                format!("{dest}{}", f.file_name().unwrap().to_string_lossy())
            } else {
                dest.clone()
            };
            assets.push(RpmAsset {
                source: f.canonicalize()?,
                dest,
                mode: s(a, "mode"),
                config: a
                    .get("config")
                    .is_some_and(|c| c.as_bool() == Some(true) || c.as_str().is_some()),
                doc: a.get("doc").and_then(|d| d.as_bool()).unwrap_or(false),
            });
        }
    }
    let script = |k: &str| -> Result<String> {
        let rel = s(rpm, k);
        let p = crate_dir.join(&rel);
        std::fs::read_to_string(&p).with_context(|| format!("reading {k} {}", p.display()))
    };
    let deps = |k: &str| -> Vec<String> {
        rpm.get(k)
            .and_then(|t| t.as_table())
            .map(|t| {
                t.iter()
                    .map(|(name, ver)| match ver.as_str() {
                        Some("*") | None => name.clone(),
                        Some(v) => format!("{name} {v}"),
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let cl = changelog_entry(ws)?;

    let mut spec = String::new();
    let w = &mut spec;
    writeln!(
        w,
        "# Generated by `cargo xtask package` from bypassd/Cargo.toml; do not edit."
    )?;
    writeln!(w, "Name: {}", s(rpm, "name"))?;
    writeln!(w, "Version: {version}")?;
    writeln!(w, "Release: {revision}")?;
    writeln!(w, "Summary: {}", s(rpm, "summary"))?;
    writeln!(w, "Group: {}", s(rpm, "group"))?;
    writeln!(w, "Packager: {}", s(rpm, "packager"))?;
    writeln!(w, "License: {license}")?;
    writeln!(w, "URL: {}", s(rpm, "url"))?;
    for r in deps("requires") {
        writeln!(w, "Requires: {r}")?;
    }
    for phase in ["post", "preun", "postun"] {
        writeln!(w, "Requires({phase}): systemd")?;
    }
    for r in deps("recommends") {
        writeln!(w, "Recommends: {r}")?;
    }
    // No debuginfo subpackage, and none of rpm's brp-* post-processing: Debian's rpm
    // runs brp-compress with dash, where it fails. %install strips and compresses.
    writeln!(w, "%global debug_package %{{nil}}")?;
    writeln!(w, "%global _build_id_links none")?;
    writeln!(w, "%global __os_install_post %{{nil}}")?;
    writeln!(
        w,
        "\n%description\n{}",
        fold(&s(deb, "extended-description"), 79)
    )?;
    writeln!(w, "\n%prep\n\n%build\n\n%install")?;
    for a in &assets {
        writeln!(
            w,
            "install -D -m {} '{}' '%{{buildroot}}{}'",
            a.mode,
            a.source.display(),
            a.dest
        )?;
        if is_elf(&a.source) {
            writeln!(w, "strip --strip-unneeded '%{{buildroot}}{}'", a.dest)?;
        }
    }
    writeln!(
        w,
        "find %{{buildroot}}/usr/share/man -type f ! -name '*.gz' -exec gzip -9n {{}} +"
    )?;
    writeln!(w, "\n%files")?;
    let mut dirs: Vec<&str> = vec!["/etc/bypassd", "/usr/share/doc/bypassd"];
    dirs.dedup();
    for d in dirs {
        writeln!(w, "%dir {d}")?;
    }
    for a in &assets {
        let path = match a.dest.strip_suffix(".gz") {
            Some(base) if a.dest.starts_with("/usr/share/man/") => format!("{base}*"),
            _ if a.dest.starts_with("/usr/share/man/") => format!("{}*", a.dest),
            _ => a.dest.clone(),
        };
        let attr = format!("%attr({},root,root)", a.mode);
        if a.config {
            writeln!(w, "%config(noreplace) {attr} {path}")?;
        } else if a.doc && a.dest.starts_with("/usr/share/doc/") {
            writeln!(w, "%doc {attr} {path}")?;
        } else {
            writeln!(w, "{attr} {path}")?;
        }
    }
    for (section, key) in [
        ("post", "post_install_script"),
        ("preun", "pre_uninstall_script"),
        ("postun", "post_uninstall_script"),
    ] {
        writeln!(w, "\n%{section}\n{}", script(key)?.trim_end())?;
    }
    writeln!(w, "\n%changelog\n* {} {} - {}", cl.date, cl.who, cl.version)?;
    for l in &cl.lines {
        writeln!(w, "- {l}")?;
    }

    let top = target.join("rpmbuild");
    if top.exists() {
        std::fs::remove_dir_all(&top)?;
    }
    std::fs::create_dir_all(top.join("SPECS"))?;
    let spec_path = top.join("SPECS/bypassd.spec");
    std::fs::write(&spec_path, &spec)?;
    let rpms = top.join("RPMS");
    run(Command::new("rpmbuild")
        .arg("-bb")
        .arg("--quiet")
        .arg("--define")
        .arg(format!("_topdir {}", top.display()))
        .arg("--define")
        .arg(format!("_rpmdir {}", rpms.display()))
        .arg(&spec_path))?;
    let built: Vec<PathBuf> = std::fs::read_dir(&rpms)?
        .filter_map(|e| e.ok())
        .flat_map(|arch| glob(&arch.path().join("bypassd-*.rpm")).unwrap_or_default())
        .collect();
    let [rpm_file] = built.as_slice() else {
        bail!(
            "expected one .rpm under {}, found {built:?}",
            rpms.display()
        )
    };
    remove_matching(out, "bypassd-*.rpm")?;
    let dest = out.join(rpm_file.file_name().unwrap());
    std::fs::copy(rpm_file, &dest)?;
    eprintln!(
        "xtask: wrote {} (spec: {})",
        dest.display(),
        spec_path.display()
    );
    Ok(dest)
}

fn is_elf(p: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(p)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == *b"\x7fELF"
}

/// Re-wrap a paragraph for the spec's %description.
fn fold(text: &str, width: usize) -> String {
    let mut out = String::new();
    let mut col = 0;
    for word in text.split_whitespace() {
        if col > 0 && col + 1 + word.len() > width {
            out.push('\n');
            col = 0;
        } else if col > 0 {
            out.push(' ');
            col += 1;
        }
        out.push_str(word);
        col += word.len();
    }
    out
}

/// lintian: no error and no warning (overrides are in the package, each explained).
/// rpmlint: no error.
fn lint(deb: &Path, rpm: &Path) -> Result<()> {
    let mut failed = Vec::new();
    let l = Command::new("lintian")
        .args([
            "--fail-on",
            "error,warning",
            "--display-info",
            "--tag-display-limit",
            "0",
        ])
        .arg(deb)
        .output()
        .context("running lintian")?;
    print_lint("lintian", &l);
    if !l.status.success() {
        failed.push("lintian");
    }
    let dir = util::workspace_root().join("packaging/rpm");
    let r = Command::new("rpmlint")
        .arg("-c")
        .arg(dir.join("rpmlint.toml"))
        .arg("-r")
        .arg(dir.join("bypassd.rpmlintrc"))
        .arg(rpm)
        .output()
        .context("running rpmlint")?;
    print_lint("rpmlint", &r);
    let text = String::from_utf8_lossy(&r.stdout);
    let errors = text.lines().filter(|l| l.contains(": E: ")).count();
    if errors > 0 {
        failed.push("rpmlint");
    }
    if !failed.is_empty() {
        bail!("{} reported problems (see above)", failed.join(" and "));
    }
    eprintln!("xtask: lintian: no errors or warnings; rpmlint: no errors");
    Ok(())
}

fn print_lint(tool: &str, o: &std::process::Output) {
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    if all.trim().is_empty() {
        eprintln!("xtask: {tool}: (no output)");
    }
    for line in all.lines() {
        eprintln!("xtask: {tool}: {line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debian_changelog_gives_the_rpm_changelog_entry() {
        let e = changelog_entry(&util::workspace_root()).unwrap();
        let (version, _, _) = util::package_info(&util::workspace_root(), CRATE).unwrap();
        assert!(e.version.starts_with(&format!("{version}-")), "changelog {} vs crate {version}", e.version);
        // rpm wants "Www Mmm DD YYYY".
        let f: Vec<&str> = e.date.split(' ').collect();
        assert_eq!(f.len(), 4, "{}", e.date);
        assert!(f[2].parse::<u32>().is_ok() && f[3].parse::<u32>().is_ok(), "{}", e.date);
        assert!(e.who.contains('<') && !e.lines.is_empty());
    }

    #[test]
    fn fold_wraps_words() {
        assert_eq!(fold("aaa bbb ccc", 7), "aaa bbb\nccc");
    }
}
