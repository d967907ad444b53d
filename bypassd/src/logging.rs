//! Logs go to journald when stderr is connected to it (JOURNAL_STREAM), else to stderr.
use crate::config::LogLevel;
use tracing_subscriber::{filter::LevelFilter, layer::SubscriberExt, reload, util::SubscriberInitExt};

/// Changes the log level at run time (reload).
#[derive(Clone)]
pub struct Handle(Option<reload::Handle<LevelFilter, tracing_subscriber::Registry>>);

impl Handle {
    /// A handle that changes nothing (tools and tests that log elsewhere).
    pub fn none() -> Self {
        Handle(None)
    }

    pub fn set_level(&self, level: LogLevel) {
        if let Some(h) = &self.0 {
            let _ = h.modify(|f| *f = filter(level));
        }
    }
}

fn filter(level: LogLevel) -> LevelFilter {
    match level {
        LogLevel::Error => LevelFilter::ERROR,
        LogLevel::Warn => LevelFilter::WARN,
        LogLevel::Info => LevelFilter::INFO,
        LogLevel::Debug => LevelFilter::DEBUG,
        LogLevel::Trace => LevelFilter::TRACE,
    }
}

/// systemd sets JOURNAL_STREAM to "dev:inode" of the stream it gave us as stderr.
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(v) = std::env::var("JOURNAL_STREAM") else { return false };
    let Some((dev, ino)) = v.split_once(':') else { return false };
    let Ok(md) = std::fs::metadata("/proc/self/fd/2") else { return false };
    dev.parse() == Ok(md.dev()) && ino.parse() == Ok(md.ino())
}

pub fn init(level: LogLevel) -> Handle {
    let (filter_layer, handle) = reload::Layer::new(filter(level));
    let registry = tracing_subscriber::registry().with(filter_layer);
    if stderr_is_journal()
        && let Ok(j) = tracing_journald::layer()
    {
        let _ = registry.with(j.with_syslog_identifier("bypassd".into())).try_init();
    } else {
        let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_target(false);
        let _ = registry.with(fmt).try_init();
    }
    Handle(Some(handle))
}
