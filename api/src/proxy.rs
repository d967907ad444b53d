//! The client side: a blocking proxy for `org.bypassd.Manager1`.
//!
//! The names in the attribute must be literals; a test in `lib.rs` checks that they
//! equal [`crate::BUS_NAME`], [`crate::OBJECT_PATH`] and [`crate::INTERFACE`].
//!
//! Build it without property caching so a call costs one round trip:
//! ```no_run
//! let conn = zbus::blocking::Connection::system()?;
//! let proxy = bypassd_api::ManagerProxy::builder(&conn)
//!     .cache_properties(zbus::proxy::CacheProperties::No)
//!     .build()?;
//! println!("{:?}", proxy.get_status()?);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
use crate::{Connection, Error, LinkStatus, PolicyRule, Stats, Status};
use zbus::proxy;

#[proxy(
    interface = "org.bypassd.Manager1",
    default_service = "org.bypassd.Bypassd1",
    default_path = "/org/bypassd/Bypassd1",
    gen_async = false,
    blocking_name = "ManagerProxy"
)]
pub trait Manager {
    /// Version, datapath state and why, paused, cgroup, pin directory, config path
    /// and hash, start time, ABI version, capacity.
    fn get_status(&self) -> Result<Status, Error>;

    /// Datapath counters, summed over CPUs, in the datapath's order.
    fn get_stats(&self) -> Result<Stats, Error>;

    /// Accelerated sockets (both ends, family, network namespace cookie).
    fn list_connections(&self) -> Result<Vec<Connection>, Error>;

    /// The link datapath's entries ([[links]]): state, why, interfaces, offloads.
    fn list_links(&self) -> Result<Vec<LinkStatus>, Error>;

    /// The default action and the effective rules (runtime first, then config).
    fn list_policy(&self) -> Result<(String, Vec<PolicyRule>), Error>;

    /// Re-read the config file; on error nothing changes (`InvalidConfig`).
    fn reload(&self) -> Result<(), Error>;

    /// Stop accelerating new connections; returns whether anything changed.
    fn pause(&self) -> Result<bool, Error>;

    /// Accelerate new connections again; returns whether anything changed.
    fn resume(&self) -> Result<bool, Error>;

    /// Remove the pinned datapath; open accelerated connections finish on it.
    fn detach(&self) -> Result<(), Error>;

    /// Append a runtime rule (TOML table body); returns its 1-based index.
    fn policy_add(&self, rule: &str) -> Result<u32, Error>;

    /// Insert a runtime rule at 1-based `position`; returns its index.
    fn policy_insert(&self, position: u32, rule: &str) -> Result<u32, Error>;

    /// Remove the runtime rule at 1-based `index` of the effective list.
    fn policy_remove(&self, index: u32) -> Result<(), Error>;

    /// Replace the runtime rules with a TOML document of `[[rules]]` tables;
    /// returns whether anything changed.
    fn policy_apply(&self, rules: &str) -> Result<bool, Error>;

    /// A dry run of `policy_apply`: whether it would change anything, the runtime
    /// rules now and the ones it would set. Changes nothing.
    fn policy_diff(&self, rules: &str) -> Result<(bool, Vec<PolicyRule>, Vec<PolicyRule>), Error>;

    /// Drop the runtime rules; returns whether there were any.
    fn policy_reset(&self) -> Result<bool, Error>;

    #[zbus(property)]
    fn version(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn started_at(&self) -> zbus::Result<u64>;
    #[zbus(property)]
    fn abi_version(&self) -> zbus::Result<u32>;
    #[zbus(property)]
    fn state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn state_reason(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn paused(&self) -> zbus::Result<bool>;
    #[zbus(property)]
    fn cgroup(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn pin_dir(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn config_path(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn config_sha256(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn capacity(&self) -> zbus::Result<u32>;
    #[zbus(property)]
    fn default_action(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn policy_sha256(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn counters(&self) -> zbus::Result<Stats>;
}
