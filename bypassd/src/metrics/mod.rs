//! Read-only Prometheus/OpenMetrics endpoint (`/metrics`) and a health check
//! (`/healthz`) on a small bounded HTTP server. Every change stays on D-Bus.
//!
//! The HTTP threads take a [`snapshot::Snapshot`] (the daemon lock is held only
//! to copy a few fields) and render and write it with no lock held.
pub mod http;
pub mod registry;
pub mod snapshot;

use serde::{Deserialize, Serialize};
use std::{
    net::SocketAddr,
    sync::atomic::{AtomicU64, Ordering},
};

/// Where the endpoint listens by default: loopback only, never every interface.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9477";

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `host:port` to serve `/metrics` and `/healthz` on; empty turns it off.
    #[serde(default = "default_listen")]
    pub listen: Listen,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self { listen: default_listen() }
    }
}

fn default_listen() -> Listen {
    Listen(DEFAULT_LISTEN.parse().ok())
}

/// A socket address, or `None` for "" (off); checked at parse time so errors point at the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct Listen(pub Option<SocketAddr>);

impl TryFrom<String> for Listen {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if s.is_empty() {
            return Ok(Listen(None));
        }
        s.parse::<SocketAddr>().map(|a| Listen(Some(a))).map_err(|_| {
            format!("`{s}` is not an address:port (e.g. \"127.0.0.1:9477\", \"[::1]:9477\"; \"\" turns metrics off)")
        })
    }
}

impl From<Listen> for String {
    fn from(l: Listen) -> String {
        l.0.map(|a| a.to_string()).unwrap_or_default()
    }
}

/// Reloads since start, successful and failed (SIGHUP and D-Bus alike).
static RELOADS: AtomicU64 = AtomicU64::new(0);
static RELOADS_FAILED: AtomicU64 = AtomicU64::new(0);

pub fn record_reload(ok: bool) {
    RELOADS.fetch_add(1, Ordering::Relaxed);
    if !ok {
        RELOADS_FAILED.fetch_add(1, Ordering::Relaxed);
    }
}

/// (reloads, failed reloads).
pub fn reloads() -> (u64, u64) {
    (RELOADS.load(Ordering::Relaxed), RELOADS_FAILED.load(Ordering::Relaxed))
}

/// The endpoint binds once at start: say so when a reload asks for another address.
pub fn warn_if_changed(old: &MetricsConfig, new: &MetricsConfig) {
    if old != new {
        tracing::warn!(
            "metrics: [metrics] listen changed from \"{}\" to \"{}\"; it takes effect when bypassd restarts",
            String::from(old.listen),
            String::from(new.listen)
        );
    }
}

/// Start the endpoint if configured. A port that cannot be bound is logged, not
/// fatal: acceleration matters more than its metrics.
pub fn serve(daemon: crate::control::Control, cfg: &MetricsConfig) -> Option<http::Server> {
    let addr = cfg.listen.0?;
    match http::Server::start(addr, daemon) {
        Ok(s) => {
            tracing::info!("metrics: serving /metrics and /healthz on http://{}", s.addr);
            Some(s)
        }
        Err(e) => {
            tracing::error!("metrics: cannot listen on {addr}: {e:#}; the datapath is unaffected");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_parses_addresses_and_empty() {
        assert_eq!(Listen::try_from(String::new()).unwrap(), Listen(None));
        assert_eq!(Listen::try_from("[::1]:9477".to_string()).unwrap().0.unwrap().port(), 9477);
        let e = Listen::try_from("localhost".to_string()).unwrap_err();
        assert!(e.contains("not an address:port"), "{e}");
        assert!(MetricsConfig::default().listen.0.unwrap().ip().is_loopback());
    }
}
