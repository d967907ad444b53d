//! Man pages and shell completions, generated from the clap definition.
use crate::cli::{Cli, Generate};
use anyhow::{Context, Result};
use clap::CommandFactory;
use clap_complete::Shell;
use std::path::Path;

const SHELLS: [Shell; 3] = [Shell::Bash, Shell::Zsh, Shell::Fish];

pub fn run(g: &Generate) -> Result<()> {
    match g {
        Generate::Man { dir } => man(dir),
        Generate::Completions { shell, dir } => completions(shell.map(|s| vec![s]).unwrap_or(SHELLS.to_vec()), dir),
        Generate::All { dir } => {
            man(&dir.join("man"))?;
            completions(SHELLS.to_vec(), &dir.join("completions"))
        }
    }
}

fn man(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    // One page per visible subcommand (bypassctl-policy-add.1, ...), clap_mangen's layout.
    fn pages(cmd: &clap::Command, dir: &Path) -> Result<()> {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            pages(sub, dir)?;
            clap_mangen::Man::new(sub.clone()).generate_to(dir)?;
        }
        Ok(())
    }
    pages(&cmd, dir)?;
    let path = dir.join("bypassctl.1");
    let mut page = Vec::new();
    top_page(cmd, &mut page)?;
    std::fs::write(&path, page).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("man pages written to {}", dir.display());
    Ok(())
}

/// bypassctl(1): clap's sections, then exit status, environment, JSON and see also
/// from the same constants as `--help`.
fn top_page(cmd: clap::Command, w: &mut Vec<u8>) -> Result<()> {
    use clap_mangen::roff::{Roff, bold, roman};
    let man = clap_mangen::Man::new(cmd);
    man.render_title(w)?;
    man.render_name_section(w)?;
    man.render_synopsis_section(w)?;
    man.render_description_section(w)?;
    man.render_options_section(w)?;
    man.render_subcommands_section(w)?;
    let mut r = Roff::new();
    r.control("SH", ["EXIT STATUS"]);
    for (code, what) in crate::cli::EXIT_CODES {
        r.control("TP", []).text([bold(code.to_string())]).text([roman(*what)]);
    }
    r.control("SH", ["PRIVILEGES"]).text([roman(crate::cli::PRIVILEGES)]);
    r.control("SH", ["JSON OUTPUT"]).text([roman(crate::cli::JSON_NOTE)]);
    r.control("SH", ["ENVIRONMENT"]);
    for (k, v) in crate::cli::ENVIRONMENT {
        r.control("TP", []).text([bold(*k)]).text([roman(*v)]);
    }
    r.control("SH", ["SEE ALSO"]).text([roman(
        "bypassd(8), busctl(1), systemctl(1); the D-Bus interface org.bypassd.Manager1 \
         (busctl introspect org.bypassd.Bypassd1 /org/bypassd/Bypassd1).",
    )]);
    r.to_writer(w)?;
    man.render_version_section(w)?;
    Ok(())
}

fn completions(shells: Vec<Shell>, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for shell in shells {
        let mut cmd = Cli::command();
        let p = clap_complete::generate_to(shell, &mut cmd, "bypassctl", dir)
            .with_context(|| format!("writing {shell} completions to {}", dir.display()))?;
        eprintln!("{shell} completions written to {}", p.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_man_pages_and_completions_without_the_hidden_command() {
        let dir = std::env::temp_dir().join(format!("bypassctl-assets-{}", std::process::id()));
        run(&Generate::All { dir: dir.clone() }).unwrap();
        let top = std::fs::read_to_string(dir.join("man/bypassctl.1")).unwrap();
        assert!(top.contains("EXIT STATUS") && top.contains("69") && top.contains("DBUS_SYSTEM_BUS_ADDRESS"));
        for page in ["bypassctl-status.1", "bypassctl-policy.1", "bypassctl-policy-apply.1", "bypassctl-detach.1"] {
            assert!(dir.join("man").join(page).exists(), "{page}");
        }
        for f in ["bypassctl.bash", "_bypassctl", "bypassctl.fish"] {
            let c = std::fs::read_to_string(dir.join("completions").join(f)).unwrap();
            assert!(c.contains("remote-cidr") && !c.contains("generate"), "{f}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
