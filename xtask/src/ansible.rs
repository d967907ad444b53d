//! `cargo xtask ansible`: prove the Ansible role (packaging/ansible/) on three
//! booted systemd containers: install its tools (packaging/ansible/test/deps.sh),
//! build three package revisions and the traffic tool, lint the role with
//! ansible-lint's production profile, then run packaging/ansible/test/run.sh.
use crate::{e2e, util};
use anyhow::{Context, Result};
use std::process::{Command, ExitCode};

pub use e2e::Options;

pub fn run(o: &Options) -> Result<ExitCode> {
    let ws = util::workspace_root();
    let target = util::target_dir(&ws)?;
    let work = o.work.clone().unwrap_or_else(|| target.join("ansible"));
    let env = target.join("ansible-env");
    let (venv, collections) = (env.join("venv"), env.join("collections"));
    let started = std::time::Instant::now();

    util::run(
        Command::new("bash")
            .arg(ws.join("packaging/ansible/test/deps.sh"))
            .arg(&venv)
            .arg(&collections),
    )?;
    // 1 is the first install, 2 the rolling upgrade, 3 the upgrade that node 2 gets
    // broken (run.sh breaks it).
    let pkgs = e2e::prepare(&work, &["1", "2", "3"])?;

    let path = format!(
        "{}:{}",
        venv.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut lint = Command::new(venv.join("bin/ansible-lint"));
    lint.current_dir(ws.join("packaging/ansible"))
        .env("PATH", &path)
        .env("ANSIBLE_COLLECTIONS_PATH", &collections)
        .env("ANSIBLE_HOME", work.join("lint-home"));
    eprintln!("xtask: $ {}", util::show(&lint));
    let lint_ok = lint.status().context("running ansible-lint")?.success();
    println!(
        "{} lint ansible-lint --profile production: {}",
        if lint_ok { "PASS" } else { "FAIL" },
        if lint_ok {
            "no failures, no warnings"
        } else {
            "see above"
        }
    );

    let mut cmd = Command::new("bash");
    cmd.arg(ws.join("packaging/ansible/test/run.sh"))
        .env("PATH", &path)
        .arg("--work")
        .arg(&work)
        // The packaging e2e's cache: both tests boot the same rootfs.
        .arg("--rootfs-cache")
        .arg(target.join("e2e"))
        .arg("--venv")
        .arg(&venv)
        .arg("--collections")
        .arg(&collections)
        .arg("--traffic")
        .arg(target.join("release/bypass-traffic"));
    for (flag, p) in ["--deb1", "--deb2", "--deb3"].iter().zip(&pkgs) {
        cmd.arg(flag).arg(&p[0]);
    }
    if o.keep {
        cmd.arg("--keep");
    }
    eprintln!("xtask: $ {}", util::show(&cmd));
    let st = cmd
        .status()
        .context("running packaging/ansible/test/run.sh")?;
    eprintln!(
        "xtask: ansible took {:.0} s in all",
        started.elapsed().as_secs_f64()
    );
    Ok(if st.success() && lint_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
