//! `cargo xtask e2e`: build the packages (and a newer revision for the upgrade
//! check) and the traffic tool, then run packaging/e2e/e2e.sh, which boots a Debian
//! container with systemd-nspawn and runs the checks inside it.
use crate::{
    package,
    util::{self, have},
};
use anyhow::{Context, Result, bail};
use std::{
    path::{Path, PathBuf},
    process::Command,
    process::ExitCode,
};

/// Options of the tests on booted containers (`e2e`, `ansible`).
pub struct Options {
    pub keep: bool,
    pub work: Option<PathBuf>,
}

impl Options {
    pub fn parse(args: &[String]) -> Result<Options> {
        let mut o = Options {
            keep: false,
            work: None,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--keep" => o.keep = true,
                "--work" => o.work = Some(it.next().context("--work needs a directory")?.into()),
                other => bail!("unknown option `{other}` (known: --keep, --work DIR)"),
            }
        }
        Ok(o)
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// What the tests on booted containers share: root and the container tools, the
/// release build (daemon, CLI, traffic tool), and one package pair per revision
/// into WORK/pkgREV. Returns [[deb, rpm], ...] in the order of `revisions`.
pub fn prepare(work: &Path, revisions: &[&str]) -> Result<Vec<Vec<PathBuf>>> {
    if !is_root() {
        bail!("this test needs root (systemd-nspawn, cgroups, BPF)");
    }
    let missing: Vec<&str> = ["systemd-nspawn", "mmdebstrap", "nsenter", "python3"]
        .into_iter()
        .filter(|t| !have(t))
        .collect();
    if !missing.is_empty() {
        bail!(
            "missing {}; install them with: bash packaging/ci-deps.sh",
            missing.join(", ")
        );
    }
    let ws = util::workspace_root();
    let started = std::time::Instant::now();
    util::run(
        Command::new(util::cargo())
            .args([
                "build",
                "--release",
                "-p",
                "bypassd",
                "-p",
                "bypassctl",
                "-p",
                "bypass-testkit",
            ])
            .current_dir(&ws),
    )?;
    // Linting is `cargo xtask package`'s job.
    let mut pkgs = Vec::new();
    for rev in revisions {
        let opts = package::Options {
            out: Some(work.join(format!("pkg{rev}"))),
            revision: (*rev).into(),
            lint: false,
            no_build: true,
        };
        pkgs.push(package::package(&opts)?);
    }
    eprintln!(
        "xtask: packages and tools built in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(pkgs)
}

pub fn run(o: &Options) -> Result<ExitCode> {
    let ws = util::workspace_root();
    let target = util::target_dir(&ws)?;
    let work = o.work.clone().unwrap_or_else(|| target.join("e2e"));
    let started = std::time::Instant::now();
    // Revision 1 is installed first; revision 2 is "a newer build" for the upgrade.
    let pkgs = prepare(&work, &["1", "2"])?;

    let mut cmd = Command::new("bash");
    cmd.arg(ws.join("packaging/e2e/e2e.sh"))
        .arg("--work")
        .arg(&work)
        .arg("--deb1")
        .arg(&pkgs[0][0])
        .arg("--rpm")
        .arg(&pkgs[0][1])
        .arg("--deb2")
        .arg(&pkgs[1][0])
        .arg("--traffic")
        .arg(target.join("release/bypass-traffic"));
    if o.keep {
        cmd.arg("--keep");
    }
    eprintln!("xtask: $ {}", util::show(&cmd));
    let st = cmd.status().context("running packaging/e2e/e2e.sh")?;
    eprintln!(
        "xtask: e2e took {:.0} s in all",
        started.elapsed().as_secs_f64()
    );
    Ok(if st.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
