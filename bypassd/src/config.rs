//! The TOML configuration: parsing with file/line/key diagnostics, and defaults.
use crate::policy::{Action, RuleSpec};
use serde::{Deserialize, Serialize};
use std::{
    fmt,
    path::{Path, PathBuf},
};
use toml::Spanned;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/bypassd/bypassd.toml";
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/bypassd";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/bypassd";
pub const DEFAULT_CAPACITY: u32 = 65536;
pub const MIN_CAPACITY: u32 = 1;
/// 1 048 576 sockets (524 288 connections): far beyond one host's accelerated
/// connections, and the kernel's bucket arrays (16 bytes a slot in each of four
/// maps) stay at 64 MiB; at 1 << 24 they pinned 1 GiB while idle.
pub const MAX_CAPACITY: u32 = 1 << 20;
/// Default bound on the bytes queued for one accelerated receiver (see docs/datapath-safety.md).
pub const DEFAULT_QUEUE_CAP: u64 = 4 << 20;
pub const MIN_QUEUE_CAP: u64 = 16 << 10;
pub const MAX_QUEUE_CAP: u64 = 1 << 30;

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub daemon: DaemonConfig,
    #[serde(default)]
    pub datapath: DatapathConfig,
    #[serde(default)]
    pub policy: PolicyConfig,
    /// Link datapath entries (config_links.rs).
    #[serde(default)]
    pub links: Vec<Spanned<crate::config_links::LinkSpec>>,
    #[serde(default)]
    pub metrics: crate::metrics::MetricsConfig,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// Where programs, maps and links are pinned (must be on a bpffs).
    #[serde(default = "default_pin_dir")]
    pub pin_dir: AbsPath,
    /// Cgroup (path below the cgroup v2 mount) whose sockets are accelerated.
    #[serde(default = "default_cgroup")]
    pub cgroup: Spanned<AbsPath>,
    /// Where runtime policy edits are persisted.
    #[serde(default = "default_state_dir")]
    pub state_dir: AbsPath,
    #[serde(default)]
    pub log_level: LogLevel,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            pin_dir: default_pin_dir(),
            cgroup: default_cgroup(),
            state_dir: default_state_dir(),
            log_level: LogLevel::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DatapathConfig {
    /// SOCKHASH entries (one per accelerated socket, two per connection).
    #[serde(default = "default_capacity")]
    pub capacity: Capacity,
    /// Most bytes queued for one accelerated receiver before its sender is moved to
    /// the TCP path (where TCP flow control blocks it); 0 = the receiver's SO_RCVBUF.
    #[serde(default = "default_queue_cap")]
    pub queue_cap: QueueCap,
    /// How splice(2) readers of accelerated sockets are kept from hanging.
    #[serde(default)]
    pub splice_safety: SpliceSafety,
    /// Programs (process names) whose sockets never receive redirected data.
    #[serde(default = "default_splice_readers")]
    pub splice_readers: Vec<ProcessName>,
    /// Watch splice(2)/sendfile(2) with syscall tracepoints (learns splice readers, but
    /// slows every system call on the host while attached).
    #[serde(default)]
    pub splice_tracepoints: bool,
    /// Sends smaller than this take TCP while the receiver still holds redirected data
    /// (TCP merges them); 0 = always redirect when the safety rules allow it.
    #[serde(default = "default_coalesce_below")]
    pub coalesce_below: u32,
    /// Which accelerated sockets run sk_msg on their sends; the others are redirect
    /// targets only and send through plain TCP at the kernel's speed.
    #[serde(default)]
    pub send_mode: SendMode,
}

/// Off: a detour to TCP lasts until the reader has read everything (the order rule),
/// so under a bulk stream with mixed write sizes it kept almost all bytes on TCP.
fn default_coalesce_below() -> u32 {
    0
}

impl Default for DatapathConfig {
    fn default() -> Self {
        Self {
            capacity: default_capacity(),
            queue_cap: default_queue_cap(),
            splice_safety: SpliceSafety::default(),
            splice_readers: default_splice_readers(),
            splice_tracepoints: false,
            coalesce_below: default_coalesce_below(),
            send_mode: SendMode::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "i64", into = "u64")]
pub struct QueueCap(pub u64);

impl TryFrom<i64> for QueueCap {
    type Error = String;
    fn try_from(v: i64) -> Result<Self, String> {
        if v != 0 && (v < MIN_QUEUE_CAP as i64 || v > MAX_QUEUE_CAP as i64) {
            return Err(format!("queue_cap {v} is out of range: 0 (the receiver's SO_RCVBUF) or {MIN_QUEUE_CAP}..={MAX_QUEUE_CAP} bytes"));
        }
        Ok(QueueCap(v as u64))
    }
}

impl From<QueueCap> for u64 {
    fn from(c: QueueCap) -> u64 {
        c.0
    }
}

/// A process name as in /proc/PID/comm (1..=15 bytes).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct ProcessName(pub String);

impl TryFrom<String> for ProcessName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if s.is_empty() || s.len() > 15 || s.contains('/') || s.contains('\0') {
            return Err(format!("splice reader `{s}` is not a process name (1..15 bytes, as in /proc/PID/comm)"));
        }
        Ok(ProcessName(s))
    }
}

impl From<ProcessName> for String {
    fn from(p: ProcessName) -> String {
        p.0
    }
}

/// HAProxy reads with recv() first and splices later (splice options): keep it off the
/// receiving end of redirects from the start.
fn default_splice_readers() -> Vec<ProcessName> {
    vec![ProcessName("haproxy".into())]
}

fn default_queue_cap() -> QueueCap {
    QueueCap(DEFAULT_QUEUE_CAP)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SpliceSafety {
    /// The BPF LSM guard where the kernel runs it, else recvmsg-first gating.
    #[default]
    Auto,
    /// Redirect to a socket only after it has read with recvmsg.
    RecvFirst,
    /// No protection (a splice reader of an accelerated socket may hang).
    Off,
}

/// `[datapath] send_mode`: which accelerated sockets are senders (run sk_msg).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SendMode {
    /// Every accelerated socket, from establishment.
    #[default]
    All,
    /// Targets only until their traffic turns request/response (at most 64 KiB
    /// written per turn); streams of writes and large bursts keep the kernel's send
    /// path, which is faster for them.
    Auto,
    /// None: nothing is redirected (sends at the kernel's speed; for comparison).
    None,
}

impl SendMode {
    /// The BP_CTL_SEND_MODE value.
    pub fn abi(self) -> u64 {
        use bypassd_ebpf::abi;
        match self {
            SendMode::All => abi::SEND_ALL,
            SendMode::Auto => abi::SEND_AUTO,
            SendMode::None => abi::SEND_NONE,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// What happens to a connection no rule matches.
    #[serde(default)]
    pub default: Action,
    /// Ordered rules, first match wins.
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    #[default]
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

/// An absolute path, checked at parse time so the error points at the key.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct AbsPath(pub PathBuf);

impl TryFrom<String> for AbsPath {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if s.is_empty() || !s.starts_with('/') {
            return Err(format!("`{s}` is not an absolute path"));
        }
        if s.split('/').any(|c| c == "..") {
            return Err(format!("`{s}` must not contain `..`"));
        }
        Ok(AbsPath(PathBuf::from(s)))
    }
}

impl From<AbsPath> for String {
    fn from(p: AbsPath) -> String {
        p.0.to_string_lossy().into_owned()
    }
}

impl AsRef<Path> for AbsPath {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "i64", into = "u32")]
pub struct Capacity(pub u32);

impl TryFrom<i64> for Capacity {
    type Error = String;
    fn try_from(v: i64) -> Result<Self, String> {
        if v < MIN_CAPACITY as i64 || v > MAX_CAPACITY as i64 {
            return Err(format!("capacity {v} is out of range {MIN_CAPACITY}..={MAX_CAPACITY}"));
        }
        Ok(Capacity(v as u32))
    }
}

impl From<Capacity> for u32 {
    fn from(c: Capacity) -> u32 {
        c.0
    }
}

fn default_pin_dir() -> AbsPath {
    AbsPath(DEFAULT_PIN_DIR.into())
}
fn default_cgroup() -> Spanned<AbsPath> {
    Spanned::new(0..0, AbsPath("/".into()))
}
fn default_state_dir() -> AbsPath {
    AbsPath(DEFAULT_STATE_DIR.into())
}
fn default_capacity() -> Capacity {
    Capacity(DEFAULT_CAPACITY)
}

/// A config error that names the file, and the line and column when there is one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: PathBuf,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
    /// The offending source line, for context.
    pub excerpt: Option<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
            if let Some(c) = self.column {
                write!(f, ":{c}")?;
            }
        }
        write!(f, ": {}", self.message)?;
        if let Some(e) = &self.excerpt {
            write!(f, "\n    | {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    /// An error located at a byte span of `src`.
    pub fn at(path: &Path, src: &str, span: Option<std::ops::Range<usize>>, message: String) -> Self {
        let (line, column, excerpt) = match span {
            Some(s) if s.end > 0 || s.start > 0 => {
                let start = s.start.min(src.len());
                let before = &src[..start];
                let line = before.matches('\n').count() + 1;
                let line_start = before.rfind('\n').map_or(0, |i| i + 1);
                let column = before[line_start..].chars().count() + 1;
                let excerpt = src[line_start..].lines().next().unwrap_or("").to_string();
                (Some(line), Some(column), Some(excerpt))
            }
            _ => (None, None, None),
        };
        ConfigError { path: path.to_path_buf(), line, column, message, excerpt }
    }
}

impl Config {
    /// Parse config text; `path` is only used to name the file in errors.
    pub fn parse(path: &Path, src: &str) -> Result<Config, ConfigError> {
        let cfg = crate::policy::diag::from_toml::<Config>(src)
            .map_err(|e| ConfigError::at(path, src, e.error.span(), e.reason()))?;
        crate::config_links::validate(&cfg.links).map_err(|(span, m)| ConfigError::at(path, src, Some(span), m))?;
        Ok(cfg)
    }

    /// Read and parse a config file.
    pub fn load(path: &Path) -> Result<(Config, String), ConfigError> {
        let src = std::fs::read_to_string(path).map_err(|e| ConfigError {
            path: path.to_path_buf(),
            line: None,
            column: None,
            message: format!("cannot read config: {e}"),
            excerpt: None,
        })?;
        let cfg = Config::parse(path, &src)?;
        Ok((cfg, src))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/bypassd/test.toml"), s)
    }

    #[test]
    fn empty_config_is_all_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.daemon.pin_dir.0, PathBuf::from(DEFAULT_PIN_DIR));
        assert_eq!(c.daemon.cgroup.get_ref().0, PathBuf::from("/"));
        assert_eq!(c.datapath.capacity.0, DEFAULT_CAPACITY);
        assert_eq!(c.policy.default, Action::Kernel);
    }

    #[test]
    fn shipped_config_parses_and_documents_every_default() {
        let src = include_str!("../../config/bypassd.toml");
        let shipped = parse(src).unwrap();
        // Every key is documented with its default: uncommenting the documented
        // defaults must give the same config as leaving them out.
        assert_eq!(shipped.daemon, Config::default().daemon);
        assert_eq!(shipped.datapath, Config::default().datapath);
        assert_eq!(shipped.metrics, Config::default().metrics);
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let e = parse("[daemon]\nlog_level = \"info\"\npin_dri = \"/sys/fs/bpf/x\"\n").unwrap_err();
        let s = e.to_string();
        assert_eq!(e.line, Some(3), "{s}");
        assert!(s.starts_with("/etc/bypassd/test.toml:3:"), "{s}");
        assert!(s.contains("pin_dri"), "{s}");
    }

    #[test]
    fn send_mode_takes_three_values_and_names_a_bad_one() {
        assert_eq!(parse("[datapath]\nsend_mode = \"auto\"\n").unwrap().datapath.send_mode, SendMode::Auto);
        assert_eq!(parse("[datapath]\nsend_mode = \"none\"\n").unwrap().datapath.send_mode, SendMode::None);
        let e = parse("[datapath]\n\nsend_mode = \"sometimes\"\n").unwrap_err();
        assert_eq!(e.line, Some(3), "{e}");
        let s = e.to_string();
        assert!(s.contains("send_mode") && s.contains("sometimes"), "{s}");
    }

    #[test]
    fn bad_type_and_bad_value_are_located() {
        let e = parse("[datapath]\ncapacity = \"many\"\n").unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        let e = parse("[datapath]\n\ncapacity = 0\n").unwrap_err();
        assert_eq!(e.line, Some(3), "{e}");
        assert!(e.to_string().contains("key `datapath.capacity`: capacity 0 is out of range"), "{e}");
        let e = parse("[datapath]\nqueue_cap = 100\n").unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        assert!(e.to_string().contains("queue_cap 100 is out of range"), "{e}");
        let e = parse("[datapath]\nsplice_safety = \"maybe\"\n").unwrap_err();
        assert!(e.to_string().contains("maybe"), "{e}");
        assert_eq!(parse("[datapath]\nqueue_cap = 0\n").unwrap().datapath.queue_cap.0, 0);
        let e = parse("[datapath]\nsplice_readers = [\"a-very-long-process-name\"]\n").unwrap_err();
        assert!(e.to_string().contains("not a process name"), "{e}");
        let e = parse("[daemon]\npin_dir = \"relative/dir\"\n").unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        assert!(e.to_string().contains("not an absolute path"), "{e}");
        // A spanned key (the cgroup) is named as written, not by toml's private field.
        let e = parse("[daemon]\ncgroup = \"relative\"\n").unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        assert!(e.to_string().contains("key `daemon.cgroup`: `relative` is not an absolute path"), "{e}");
        let e = parse("[daemon]\nlog_level = \"loud\"\n").unwrap_err();
        assert!(e.to_string().contains("loud"), "{e}");
    }

    #[test]
    fn unreadable_file_is_named() {
        let e = Config::load(Path::new("/nonexistent/bypassd.toml")).unwrap_err();
        assert!(e.to_string().starts_with("/nonexistent/bypassd.toml: cannot read config"), "{e}");
    }
}
