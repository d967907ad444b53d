//! The properties that emit `PropertiesChanged`, and the announcer that compares
//! them with what was last announced.
use crate::control::Control;
use bypassd_api as api;
use std::{collections::HashMap, sync::Mutex};
use zbus::{names::BusName, zvariant::Value};

/// The properties that emit `PropertiesChanged`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Props {
    state: String,
    state_reason: String,
    paused: bool,
    cgroup: String,
    pin_dir: String,
    config_path: String,
    config_sha256: String,
    capacity: u32,
    default_action: String,
    policy_sha256: String,
}

impl Props {
    fn read(c: &Control) -> Props {
        let s = c.status();
        Props {
            state: s.state,
            state_reason: s.reason,
            paused: s.paused,
            cgroup: s.cgroup,
            pin_dir: s.pin_dir,
            config_path: s.config_path,
            config_sha256: s.config_sha256,
            capacity: s.capacity,
            default_action: c.policy_list().0.as_str().to_string(),
            policy_sha256: c.policy_sha256(),
        }
    }

    fn diff(&self, new: &Props) -> HashMap<&'static str, Value<'static>> {
        use api::property as p;
        let mut m = HashMap::new();
        let mut put = |changed: bool, name: &'static str, v: Value<'static>| {
            if changed {
                m.insert(name, v);
            }
        };
        put(self.state != new.state, p::STATE, new.state.clone().into());
        put(self.state_reason != new.state_reason, p::STATE_REASON, new.state_reason.clone().into());
        put(self.paused != new.paused, p::PAUSED, new.paused.into());
        put(self.cgroup != new.cgroup, p::CGROUP, new.cgroup.clone().into());
        put(self.pin_dir != new.pin_dir, p::PIN_DIR, new.pin_dir.clone().into());
        put(self.config_path != new.config_path, p::CONFIG_PATH, new.config_path.clone().into());
        put(self.config_sha256 != new.config_sha256, p::CONFIG_SHA256, new.config_sha256.clone().into());
        put(self.capacity != new.capacity, p::CAPACITY, new.capacity.into());
        put(self.default_action != new.default_action, p::DEFAULT_ACTION, new.default_action.clone().into());
        put(self.policy_sha256 != new.policy_sha256, p::POLICY_SHA256, new.policy_sha256.clone().into());
        m
    }
}

/// Remembers the last announced property values.
#[derive(Default)]
pub(super) struct Announcer {
    last: Mutex<Option<Props>>,
}

impl Announcer {
    pub(super) fn reset(&self, control: &Control) {
        let now = Props::read(control);
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(now);
    }

    /// What changed since the last announcement (None: nothing).
    pub(super) fn changes(&self, control: &Control) -> Option<HashMap<&'static str, Value<'static>>> {
        let now = Props::read(control);
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let changed = last.as_ref().map(|old| old.diff(&now)).unwrap_or_default();
        *last = Some(now);
        (!changed.is_empty()).then_some(changed)
    }

    /// Emit `PropertiesChanged` for what a write changed (the comparison runs off
    /// the executor: it reads the daemon's state).
    pub(super) async fn announce(self: &std::sync::Arc<Self>, control: &Control, conn: &zbus::Connection) {
        let (me, c) = (self.clone(), control.clone());
        let Some(changed) = blocking::unblock(move || me.changes(&c)).await else { return };
        if let Err(e) = conn
            .emit_signal(
                None::<BusName<'_>>,
                api::OBJECT_PATH,
                "org.freedesktop.DBus.Properties",
                "PropertiesChanged",
                &(api::INTERFACE, changed, Vec::<&str>::new()),
            )
            .await
        {
            tracing::debug!("emitting PropertiesChanged: {e}");
        }
    }
}
