//! What the host says about its interfaces (in bypassd's own netns, from netlink):
//! ifindex, bridge ports, veth peers, bridge ageing time. Read once per refresh.
use super::nl;
use anyhow::Result;

/// The interface's ifindex, None when it does not exist (ioctl: this thread's netns).
pub fn ifindex(name: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(name).ok().filter(|&i| i != 0)
}

/// A snapshot of the netns's interfaces.
pub struct Host(Vec<nl::Link>);

impl Host {
    pub fn read() -> Result<Host> {
        Ok(Host(nl::links()?))
    }

    fn get(&self, name: &str) -> Option<&nl::Link> {
        self.0.iter().find(|l| l.name == name)
    }

    pub fn ifindex(&self, name: &str) -> Option<u32> {
        self.get(name).map(|l| l.ifindex)
    }

    pub fn is_bridge(&self, name: &str) -> bool {
        self.get(name).is_some_and(|l| l.kind == "bridge")
    }

    /// The bridge's ports, sorted by name.
    pub fn bridge_ports(&self, bridge: &str) -> Vec<String> {
        let Some(br) = self.get(bridge) else { return Vec::new() };
        let mut v: Vec<String> = self.0.iter().filter(|l| l.master == br.ifindex).map(|l| l.name.clone()).collect();
        v.sort();
        v
    }

    /// The bridge's FDB ageing time in nanoseconds (netlink gives centiseconds); 0 = never.
    pub fn ageing_ns(&self, bridge: &str) -> u64 {
        self.get(bridge).and_then(|l| l.ageing_cs).map_or(300_000_000_000, |cs| u64::from(cs) * 10_000_000)
    }

    /// A veth whose peer is in another netns: bpf_redirect_peer delivers straight into
    /// the peer's namespace (it drops frames for a peer in this netns).
    pub fn veth_peer_elsewhere(&self, name: &str) -> bool {
        self.get(name).is_some_and(|l| l.kind == "veth" && l.link_elsewhere)
    }
}
