//! bypassd's D-Bus API, defined once: the bus name, object path and interface,
//! the wire types, and the client proxy. The daemon serves it; bypassctl calls it.
pub mod types;

pub use types::*;

/// Well-known name on the system bus.
pub const BUS_NAME: &str = "org.bypassd.Bypassd1";
/// Object path of the manager object.
pub const OBJECT_PATH: &str = "/org/bypassd/Bypassd1";
/// The manager interface.
pub const INTERFACE: &str = "org.bypassd.Manager1";
/// Prefix of the named errors the daemon returns.
pub const ERROR_PREFIX: &str = "org.bypassd.Error";
