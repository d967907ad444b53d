//! The D-Bus control interface (filled in by the D-Bus work).
use crate::service::Shared;

pub struct Server;

pub fn serve(_daemon: Shared) -> anyhow::Result<Server> {
    Ok(Server)
}
