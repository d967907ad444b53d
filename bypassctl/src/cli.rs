//! The command line, defined once: parsing, `--help`, the man page and the shell
//! completions all come from these types.
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// Exit codes (also in `--help` and docs/bypassctl.md).
pub mod exit {
    pub const OK: u8 = 0;
    /// Any other error: bypassd failed the request, reload found the config invalid,
    /// the datapath is detached, unexpected D-Bus errors.
    pub const ERROR: u8 = 1;
    /// Bad command line (clap's usage errors).
    pub const USAGE: u8 = 2;
    /// The caller may not do this: write commands need root.
    pub const PERMISSION_DENIED: u8 = 3;
    /// bypassd refused an argument (rule, position, index, policy file); nothing changed.
    pub const INVALID_ARGUMENT: u8 = 4;
    /// bypassd is not running or not reachable on the system bus (EX_UNAVAILABLE).
    pub const NOT_RUNNING: u8 = 69;
}

/// The exit status table: `--help`, the man page and docs/bypassctl.md show it.
pub const EXIT_CODES: &[(u8, &str)] = &[
    (exit::OK, "success"),
    (
        exit::ERROR,
        "error: bypassd failed the request, the config file is invalid on reload, the datapath is detached, \
         or another D-Bus error",
    ),
    (exit::USAGE, "usage error: bad command line"),
    (exit::PERMISSION_DENIED, "permission denied: the command changes bypassd and needs root; nothing was changed"),
    (
        exit::INVALID_ARGUMENT,
        "invalid argument: bypassd refused a rule, position, index or policy file; nothing was changed",
    ),
    (
        exit::NOT_RUNNING,
        "bypassd is not running or not reachable on the system bus (check with `systemctl status bypassd`)",
    ),
];

/// Who may run what.
pub const PRIVILEGES: &str =
    "Read commands (status, stats, connections, policy list, policy apply --dry-run) work for every user; \
     the others need root.";

/// What --json prints.
pub const JSON_NOTE: &str = "With --json, stdout carries exactly one JSON document, also on errors \
     ({\"error\": {\"kind\", \"exit_code\", \"name\", \"message\"}}); write commands print \
     {\"changed\": true|false, ...}. The schemas are in docs/bypassctl.md.";

/// The environment bypassctl reads.
pub const ENVIRONMENT: &[(&str, &str)] =
    &[("DBUS_SYSTEM_BUS_ADDRESS", "the system bus to use (default unix:path=/var/run/dbus/system_bus_socket)")];

/// Greedy word wrap to `width` columns for text starting at column `indent`;
/// continuation lines are indented by `indent` too.
fn wrap(text: &str, width: usize, indent: usize) -> String {
    let mut out = String::new();
    let mut col = indent;
    for word in text.split_whitespace() {
        if col > indent && col + 1 + word.len() > width {
            out.push('\n');
            out.push_str(&" ".repeat(indent));
            col = indent;
        } else if col > indent {
            out.push(' ');
            col += 1;
        }
        out.push_str(word);
        col += word.len();
    }
    out
}

/// `--help`'s epilogue: exit status, privileges, JSON, environment.
pub fn after_long_help() -> String {
    let mut s = String::from("Exit status:\n");
    for (code, what) in EXIT_CODES {
        s.push_str(&format!("  {code:<3} {}\n", wrap(what, 80, 6)));
    }
    s.push('\n');
    s.push_str(&wrap(PRIVILEGES, 80, 0));
    s.push_str("\n\n");
    s.push_str(&wrap(JSON_NOTE, 80, 0));
    s.push_str("\n\nEnvironment:\n");
    for (k, v) in ENVIRONMENT {
        s.push_str(&format!("  {k}\n      {}\n", wrap(v, 80, 6)));
    }
    s.trim_end().to_string()
}

/// Control bypassd, the same-host TCP accelerator, over the D-Bus system bus.
#[derive(Parser, Debug)]
#[command(
    name = "bypassctl",
    version,
    about = "Control bypassd, the same-host TCP accelerator, over D-Bus",
    long_about = "Control bypassd, the same-host TCP accelerator, over the D-Bus system bus \
                  (org.bypassd.Bypassd1). Shows its state, counters, accelerated connections and \
                  policy, and (as root) reloads its configuration, pauses and resumes acceleration, \
                  edits the runtime policy and detaches the datapath.",
    after_long_help = after_long_help()
)]
pub struct Cli {
    /// Print one JSON document instead of tables (schemas: docs/bypassctl.md).
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug)]
pub struct StatsArgs {
    /// Refresh like top: msgs/s and bytes/s redirected vs. passed (by reason) and the
    /// accelerated-socket count, redrawn in place (ANSI, tmux-friendly).
    #[arg(long)]
    pub watch: bool,
    /// Seconds between refreshes (with --watch).
    #[arg(long, value_name = "S", default_value_t = 1.0, requires = "watch", value_parser = parse_interval)]
    pub interval: f64,
    /// Stop after N refreshes (with --watch; default: until interrupted).
    #[arg(long, value_name = "N", requires = "watch")]
    pub count: Option<u64>,
}

fn parse_interval(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.1..=3600.0).contains(&v) => Ok(v),
        _ => Err(format!("`{s}` is not an interval in seconds (0.1 to 3600)")),
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Show version, datapath state and why, cgroup, pin directory, config file
    /// and its hash, start time.
    Status,
    /// Show the datapath counters (sockets_inserted, redirected_bytes, ...); with
    /// --watch, a refreshing table of rates (--json: one line per interval).
    Stats(StatsArgs),
    /// List accelerated connections: both ends, family, network namespace.
    Connections,
    /// Show or edit the policy: which connections are accelerated.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Re-read the config file and apply it; a bad file is refused and the running
    /// configuration kept (root).
    Reload,
    /// Stop accelerating new connections; accelerated ones stay (root).
    Pause,
    /// Accelerate new connections again (root).
    Resume,
    /// Remove the pinned datapath: new connections take the kernel path, accelerated
    /// ones finish on it. Reload or restart bypassd to attach again (root).
    Detach,
}

/// `bypassctl generate ...`: packaging helper, kept out of [`Cli`] so it appears in
/// neither the help, the man pages nor the completions.
#[derive(Parser, Debug)]
#[command(
    name = "generate",
    bin_name = "bypassctl generate",
    about = "Write bypassctl's man pages and shell completions"
)]
pub struct GenerateCli {
    #[command(subcommand)]
    pub what: Generate,
}

#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// Show the default action and the rules in evaluation order, with where each
    /// comes from (runtime: added with bypassctl; config: the config file).
    List,
    /// Add a runtime rule (root). Runtime rules are evaluated before the config
    /// file's; first match wins.
    Add(AddArgs),
    /// Remove the runtime rule at INDEX, as `policy list` numbers it (root).
    Remove {
        /// 1-based index from `bypassctl policy list`.
        index: u32,
    },
    /// Replace all runtime rules, atomically, with the [[rules]] tables of a TOML file
    /// (same fields as [[policy.rules]] in the config file). Prints "changed" or
    /// "unchanged" (root; --dry-run: everyone).
    Apply {
        /// The policy file; "-" reads standard input.
        file: PathBuf,
        /// Change nothing: validate the file as bypassd would and print what would
        /// change ("would change" with the rules removed and added, or "unchanged").
        #[arg(long)]
        dry_run: bool,
    },
    /// Drop all runtime rules; the config file's rules stay (root).
    Reset,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Action {
    /// Redirect through the eBPF datapath.
    Accelerate,
    /// Leave on the kernel's TCP/IP path.
    Kernel,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Accelerate => "accelerate",
            Action::Kernel => "kernel",
        }
    }
}

/// A rule: absent fields match anything. bypassd validates it with the same code as
/// the config file.
#[derive(Args, Debug)]
pub struct AddArgs {
    /// What matching connections get.
    #[arg(long, value_enum)]
    pub action: Action,
    /// Local port or range ("8080" or "8000-8999").
    #[arg(long, value_name = "PORTS")]
    pub local_ports: Option<String>,
    /// Remote port or range ("8080" or "8000-8999").
    #[arg(long, value_name = "PORTS")]
    pub remote_ports: Option<String>,
    /// Port or range at either end ("6379"): admits a service's server socket and its
    /// clients' sockets in one rule. Not with --local-ports/--remote-ports.
    #[arg(long, value_name = "PORTS", conflicts_with_all = ["local_ports", "remote_ports"])]
    pub ports: Option<String>,
    /// Local network ("127.0.0.0/8", "::1/128"; a bare address is a host).
    #[arg(long, value_name = "CIDR")]
    pub local_cidr: Option<String>,
    /// Remote network ("127.0.0.0/8", "::1/128"; a bare address is a host).
    #[arg(long, value_name = "CIDR")]
    pub remote_cidr: Option<String>,
    /// Cgroup of the socket's process, as a path below the cgroup v2 mount ("/app").
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<String>,
    /// Owner uid of the socket's process.
    #[arg(long)]
    pub uid: Option<u32>,
    /// A name for the rule (shown by `policy list` and in errors).
    #[arg(long)]
    pub name: Option<String>,
    /// Insert at this 1-based position among the runtime rules (default: after them).
    #[arg(long, value_name = "N")]
    pub position: Option<u32>,
}

#[derive(Subcommand, Debug)]
pub enum Generate {
    /// Man pages: DIR/bypassctl.1 and one page per subcommand.
    Man { dir: PathBuf },
    /// Completion scripts for SHELL (default: bash, zsh and fish) into DIR.
    Completions {
        #[arg(long, value_enum)]
        shell: Option<clap_complete::Shell>,
        dir: PathBuf,
    },
    /// Both: DIR/man/ and DIR/completions/.
    All { dir: PathBuf },
}
