//! `org.bypassd.Manager1`: the methods and properties. Every handler runs the
//! daemon's work off zbus's executor ([`blocking::unblock`]), so a slow reload or
//! an fsync never stalls other callers or the bus connection.
use super::props::Announcer;
use crate::control::{Control, ControlError, PolicyEntry};
use bypassd_api::{self as api, Error, member};
use std::sync::Arc;
use zbus::{interface, message::Header};

fn control_error(e: ControlError) -> Error {
    match e {
        ControlError::InvalidArgument(m) => Error::InvalidArgument(m),
        ControlError::Policy(p) => Error::InvalidArgument(p.to_string()),
        ControlError::Config(c) => Error::InvalidConfig(c.to_string()),
        ControlError::Failed(e) => Error::Failed(format!("{e:#}")),
    }
}

fn rule_view(index: usize, e: &PolicyEntry) -> api::PolicyRule {
    api::PolicyRule {
        index: index as u32,
        source: e.source.as_str().to_string(),
        name: e.spec.name.clone().unwrap_or_default(),
        summary: e.spec.summary(),
        rule: toml::to_string(&e.spec).unwrap_or_default(),
        active: e.inactive.is_none(),
        inactive_reason: e.inactive.clone().unwrap_or_default(),
    }
}

/// A datapath connection as the control interface reports it.
fn wire_connection(c: crate::datapath::Connection) -> api::Connection {
    api::Connection {
        family: c.family.into(),
        local: c.local.to_string(),
        remote: c.remote.to_string(),
        netns: c.netns,
        paired: c.paired,
        nat: c.nat,
        peer: c.peer.map(|(l, r)| format!("{l} <- {r}")).unwrap_or_default(),
        senders: match (c.sender, c.peer_sender) {
            (true, true) => "both",
            (true, false) => "local",
            (false, true) => "peer",
            (false, false) => "none",
        }
        .into(),
    }
}

fn require_attached(c: &Control) -> Result<(), Error> {
    let s = c.status();
    if s.state == api::state::DETACHED {
        return Err(Error::NotAttached(format!("the datapath is detached: {}", s.reason)));
    }
    Ok(())
}

pub(super) struct Manager {
    control: Control,
    announcer: Arc<Announcer>,
}

impl Manager {
    pub(super) fn new(control: Control, announcer: Arc<Announcer>) -> Manager {
        Manager { control, announcer }
    }

    /// Run `f` on the blocking pool with the control handle.
    async fn run<T: Send + 'static>(&self, f: impl FnOnce(&Control) -> T + Send + 'static) -> T {
        let c = self.control.clone();
        blocking::unblock(move || f(&c)).await
    }

    /// Only root may change bypassd. Refusals are logged with the caller's uid.
    async fn authorize(&self, conn: &zbus::Connection, hdr: &Header<'_>, method: &str) -> Result<(), Error> {
        let Some(sender) = hdr.sender() else {
            tracing::warn!("refused {method}: the call has no sender to check");
            return Err(Error::AccessDenied(format!(
                "permission denied: {method} needs a caller the bus can vouch for"
            )));
        };
        let uid = conn
            .call_method(
                Some("org.freedesktop.DBus"),
                "/org/freedesktop/DBus",
                Some("org.freedesktop.DBus"),
                "GetConnectionUnixUser",
                &(sender.as_str(),),
            )
            .await
            .and_then(|r| r.body().deserialize::<u32>());
        match uid {
            Ok(0) => Ok(()),
            Ok(uid) => {
                tracing::warn!("refused {method} from uid {uid} ({sender}): only root may change bypassd");
                Err(Error::AccessDenied(format!(
                    "permission denied: {method} changes bypassd and needs root (caller uid {uid})"
                )))
            }
            Err(e) => {
                tracing::warn!("refused {method} from {sender}: cannot tell its uid ({e})");
                Err(Error::AccessDenied(format!("permission denied: cannot determine the caller's uid ({e})")))
            }
        }
    }

    /// Run a write operation as root (off the executor), then announce what it changed.
    async fn write<T: Send + 'static>(
        &self,
        conn: &zbus::Connection,
        hdr: &Header<'_>,
        method: &'static str,
        op: impl FnOnce(&Control) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        self.authorize(conn, hdr, method).await?;
        let r = self.run(op).await;
        match &r {
            // Control::reload logs its failures, for every caller.
            Err(_) if method == member::RELOAD => {}
            Err(e) => tracing::info!("{method} refused: {}", e.message()),
            Ok(_) => {}
        }
        self.announcer.announce(&self.control, conn).await;
        r
    }

    async fn status(&self) -> api::Status {
        self.run(Control::status).await
    }
}

/// bypassd's control interface. Read methods and properties are open to every user;
/// the write methods (Reload, Pause, Resume, Detach, Policy*) are for root only and
/// fail with org.bypassd.Error.AccessDenied for anyone else, changing nothing.
/// Errors: org.bypassd.Error.{InvalidArgument,AccessDenied,InvalidConfig,NotAttached,Failed}.
#[interface(name = "org.bypassd.Manager1")]
impl Manager {
    /// Version, datapath state ("attached", "detached", "degraded") and why, paused,
    /// cgroup, pin directory, config path and sha256, start time (Unix seconds), BPF
    /// ABI version, SOCKHASH capacity, the number of inactive policy rules (their
    /// cgroup does not exist), and the config files loaded (the main file, then its
    /// conf.d/*.toml drop-ins in merge order), in one struct.
    #[zbus(out_args("status"))]
    async fn get_status(&self) -> (api::Status,) {
        (self.status().await,)
    }

    /// Datapath counters summed over CPUs: (name, value) pairs, e.g. sockets_inserted,
    /// insert_failures, redirected_msgs, redirected_bytes, passed_msgs, passed_bytes.
    /// Fails with NotAttached when the datapath is detached.
    #[zbus(out_args("counters"))]
    async fn get_stats(&self) -> Result<api::Stats, Error> {
        self.run(|c| {
            require_attached(c)?;
            c.stats().map_err(control_error)
        })
        .await
    }

    /// Accelerated sockets: (family, local, remote, netns cookie, paired, paired through
    /// NAT (a proxy's SO_ORIGINAL_DST), peer socket "local <- remote", senders "both"|
    /// "local"|"peer"|"none": whose sends run sk_msg).
    #[zbus(out_args("connections"))]
    async fn list_connections(&self) -> Result<Vec<api::Connection>, Error> {
        self.run(|c| Ok(c.connections().map_err(control_error)?.into_iter().map(wire_connection).collect())).await
    }

    /// The link datapath's [[links]] entries: (name, mode "pair"|"bridge", state
    /// "attached"|"pending"|"degraded", reason, interfaces: (name, ifindex, attached,
    /// effective offloads)).
    #[zbus(out_args("links"))]
    async fn list_links(&self) -> Vec<api::LinkStatus> {
        self.run(|c| c.links()).await
    }

    /// The default action ("accelerate" or "kernel") and the effective rules in
    /// evaluation order (runtime rules first, then the config file's): (index,
    /// source "runtime"|"config", name, summary, rule as TOML, active, why inactive).
    /// A rule is inactive while its cgroup does not exist; it matches nothing then
    /// and becomes active again when the cgroup is (re-)created.
    #[zbus(out_args("default_action", "rules"))]
    async fn list_policy(&self) -> (String, Vec<api::PolicyRule>) {
        self.run(|c| {
            let (default, entries) = c.policy_list();
            (default.as_str().to_string(), entries.iter().enumerate().map(|(i, e)| rule_view(i + 1, e)).collect())
        })
        .await
    }

    /// Re-read the config file and apply it. A bad file fails with InvalidConfig and
    /// the running configuration is kept. Root only.
    async fn reload(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<(), Error> {
        self.write(conn, &hdr, member::RELOAD, |c| c.reload().map_err(control_error)).await
    }

    /// Stop accelerating new connections (accelerated ones stay). Returns whether
    /// anything changed. Root only.
    #[zbus(out_args("changed"))]
    async fn pause(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<bool, Error> {
        self.write(conn, &hdr, member::PAUSE, |c| {
            require_attached(c)?;
            c.set_paused(true).map_err(control_error)
        })
        .await
    }

    /// Accelerate new connections again. Returns whether anything changed. Root only.
    #[zbus(out_args("changed"))]
    async fn resume(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<bool, Error> {
        self.write(conn, &hdr, member::RESUME, |c| {
            require_attached(c)?;
            c.set_paused(false).map_err(control_error)
        })
        .await
    }

    /// Remove the pinned datapath: new connections take the kernel path, accelerated
    /// ones finish on it. Reload or restart bypassd to attach again. Root only.
    async fn detach(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<(), Error> {
        self.write(conn, &hdr, member::DETACH, |c| c.detach().map_err(control_error)).await
    }

    /// Append a runtime rule, given as a TOML table body with the fields of the config
    /// file's [[policy.rules]] (e.g. `action = "accelerate"` and `remote_ports =
    /// "8080"`). Runtime rules come before the config file's. Returns the rule's
    /// 1-based index. A bad rule fails with InvalidArgument naming the rule and the
    /// reason. Root only.
    #[zbus(out_args("index"))]
    async fn policy_add(
        &self,
        rule: &str,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<u32, Error> {
        let rule = rule.to_string();
        self.write(conn, &hdr, member::POLICY_ADD, move |c| c.policy_add(&rule, None).map_err(control_error)).await
    }

    /// Insert a runtime rule at 1-based `position` among the runtime rules (1 to
    /// their count + 1); otherwise as PolicyAdd. Root only.
    #[zbus(out_args("index"))]
    async fn policy_insert(
        &self,
        position: u32,
        rule: &str,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<u32, Error> {
        let rule = rule.to_string();
        self.write(conn, &hdr, member::POLICY_INSERT, move |c| {
            c.policy_add(&rule, Some(position)).map_err(control_error)
        })
        .await
    }

    /// Remove the runtime rule at 1-based `index` of the effective list (as
    /// ListPolicy numbers them). Config file rules cannot be removed here. Root only.
    async fn policy_remove(
        &self,
        index: u32,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<(), Error> {
        self.write(conn, &hdr, member::POLICY_REMOVE, move |c| c.policy_remove(index).map_err(control_error)).await
    }

    /// Replace the runtime rules, atomically, with the `[[rules]]` tables of a TOML
    /// document (same fields as [[policy.rules]]). Returns whether anything changed.
    /// Root only.
    #[zbus(out_args("changed"))]
    async fn policy_apply(
        &self,
        rules: &str,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<bool, Error> {
        let text = rules.to_string();
        self.write(conn, &hdr, member::POLICY_APPLY, move |c| c.policy_apply(&text).map_err(control_error)).await
    }

    /// What PolicyApply with the same document would do, changing nothing: whether
    /// the runtime rules would change, the runtime rules now and the ones it would
    /// set (as ListPolicy shows them). A bad document fails with InvalidArgument,
    /// as PolicyApply would. Everyone may call it.
    #[zbus(out_args("changed", "current", "proposed"))]
    async fn policy_diff(&self, rules: &str) -> Result<(bool, Vec<api::PolicyRule>, Vec<api::PolicyRule>), Error> {
        let text = rules.to_string();
        self.run(move |c| {
            let (changed, current, proposed) = c.policy_diff(&text).map_err(control_error)?;
            let view = |v: Vec<PolicyEntry>| v.iter().enumerate().map(|(i, e)| rule_view(i + 1, e)).collect();
            Ok((changed, view(current), view(proposed)))
        })
        .await
    }

    /// Drop the runtime rules; returns whether there were any. Root only.
    #[zbus(out_args("changed"))]
    async fn policy_reset(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<bool, Error> {
        self.write(conn, &hdr, member::POLICY_RESET, |c| c.policy_reset().map_err(control_error)).await
    }

    /// bypassd's version.
    #[zbus(property(emits_changed_signal = "const"))]
    fn version(&self) -> String {
        env!("CARGO_PKG_VERSION").to_string()
    }

    /// When bypassd started, Unix seconds.
    #[zbus(property(emits_changed_signal = "const"))]
    async fn started_at(&self) -> u64 {
        self.status().await.started_at
    }

    /// BPF ABI version of the datapath.
    #[zbus(property(emits_changed_signal = "const"))]
    fn abi_version(&self) -> u32 {
        bypassd_ebpf::abi::ABI_VERSION
    }

    /// "attached", "detached" or "degraded".
    #[zbus(property)]
    async fn state(&self) -> String {
        self.status().await.state
    }

    /// Why the state is what it is; empty when attached.
    #[zbus(property)]
    async fn state_reason(&self) -> String {
        self.status().await.reason
    }

    /// Whether acceleration of new connections is paused.
    #[zbus(property)]
    async fn paused(&self) -> bool {
        self.status().await.paused
    }

    /// The cgroup v2 directory whose sockets may be accelerated.
    #[zbus(property)]
    async fn cgroup(&self) -> String {
        self.status().await.cgroup
    }

    /// Where the datapath is pinned.
    #[zbus(property)]
    async fn pin_dir(&self) -> String {
        self.status().await.pin_dir
    }

    /// The config file.
    #[zbus(property)]
    async fn config_path(&self) -> String {
        self.status().await.config_path
    }

    /// sha256 (hex) of the loaded config file; with drop-ins, of every loaded file.
    #[zbus(property)]
    async fn config_sha256(&self) -> String {
        self.status().await.config_sha256
    }

    /// SOCKHASH capacity.
    #[zbus(property)]
    async fn capacity(&self) -> u32 {
        self.status().await.capacity
    }

    /// What a connection no rule matches gets: "accelerate" or "kernel".
    #[zbus(property)]
    async fn default_action(&self) -> String {
        self.run(|c| c.policy_list().0.as_str().to_string()).await
    }

    /// sha256 (hex) of the effective policy (default action and rules with sources);
    /// changes with every policy edit.
    #[zbus(property)]
    async fn policy_sha256(&self) -> String {
        self.run(Control::policy_sha256).await
    }

    /// Datapath counters as in GetStats (empty when detached). They change per
    /// packet, so no PropertiesChanged is emitted for them.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn counters(&self) -> api::Stats {
        self.run(|c| c.stats().unwrap_or_default()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_name_is_the_api_constant() {
        assert_eq!(<Manager as zbus::object_server::Interface>::name().as_str(), api::INTERFACE);
    }
}
