//! Developer tasks: `cargo xtask package` builds the .deb and the .rpm into dist/,
//! `cargo xtask e2e` proves them on a booted systemd container (docs/packaging.md),
//! `cargo xtask ansible` proves the Ansible role on three (packaging/ansible/).
mod ansible;
mod e2e;
mod package;
mod util;

use anyhow::{Result, bail};
use std::process::ExitCode;

const USAGE: &str = "\
usage: cargo xtask <command> [options]

commands:
  package [--out DIR] [--revision N] [--no-lint]
      Build the release binaries, then dist/bypassd_<version>-<N>_<arch>.deb (cargo-deb)
      and dist/bypassd-<version>-<N>.<arch>.rpm (rpmbuild), and check them with lintian
      (no error, no warning) and rpmlint (no error). N defaults to 1.
  e2e [--keep] [--work DIR]
      As root: build both packages (and a newer revision for the upgrade check), boot a
      Debian bookworm rootfs with systemd-nspawn, run the install/reload/restart/reboot/
      upgrade/purge/rpm checks inside it, print PASS/FAIL per check and
      `e2e: N passed, M failed`, tear everything down. --keep leaves the unpacked rootfs
      (the container itself is always stopped). Work directory: target/e2e.
  ansible [--keep] [--work DIR]
      As root: install the Ansible tools (packaging/ansible/test/deps.sh), build three
      package revisions, lint the role (ansible-lint, production profile), boot three
      systemd-nspawn nodes from the e2e rootfs and run the role's checks on them
      (first run, no-op run, policy change, reload, check mode, rolling upgrade with a
      broken package); prints PASS/FAIL per check and `ansible: N passed, M failed`.
      Work directory: target/ansible.

Install the tools both need with: bash packaging/ci-deps.sh";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> Result<ExitCode> {
    let Some((cmd, rest)) = args.split_first() else {
        println!("{USAGE}");
        return Ok(ExitCode::from(2));
    };
    match cmd.as_str() {
        "package" => {
            let opts = package::Options::parse(rest)?;
            let out = package::package(&opts)?;
            for p in out {
                println!("{}", p.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        "e2e" => e2e::run(&e2e::Options::parse(rest)?),
        "ansible" => ansible::run(&ansible::Options::parse(rest)?),
        "help" | "-h" | "--help" => {
            println!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        other => bail!("unknown command `{other}`\n\n{USAGE}"),
    }
}
