//! bypassd: loads, pins and attaches the eBPF socket datapath and serves its control
//! interface.
pub mod config;
pub mod config_links;
pub mod control;
pub mod daemon;
pub mod datapath;
pub mod dbus;
pub mod dropins;
pub mod instance;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod policy;
pub mod service;
pub mod startup;
pub mod sysfs;
