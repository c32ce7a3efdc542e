//! What the agent reads from its node's network namespace: interfaces, addresses, sysctls.
//! Everything goes through netlink-backed libc calls, so it reflects the namespace the agent
//! runs in even when /sys belongs to another one.

use std::{collections::BTreeSet, net::Ipv4Addr};

use anyhow::{Context, Result};

/// The interfaces of the namespace: (ifindex, name).
pub fn interfaces() -> Result<Vec<(u32, String)>> {
    let list = nix::net::if_::if_nameindex().context("listing interfaces")?;
    Ok(list
        .iter()
        .map(|i| (i.index(), i.name().to_string_lossy().into_owned()))
        .collect())
}

/// The IPv4 addresses NodePorts are served on: every address of the namespace but loopback.
pub fn addresses() -> Result<BTreeSet<Ipv4Addr>> {
    let mut out = BTreeSet::new();
    for ifa in nix::ifaddrs::getifaddrs().context("listing addresses")? {
        let Some(sin) = ifa.address.as_ref().and_then(|a| a.as_sockaddr_in()) else {
            continue;
        };
        let ip = sin.ip();
        if !ip.is_loopback() {
            out.insert(ip);
        }
    }
    Ok(out)
}

/// Whether an interface is one the datapath attaches to.
pub fn wanted(name: &str, ext_ifaces: &[String], pod_prefix: &str) -> bool {
    ext_ifaces.iter().any(|e| e == name) || (!pod_prefix.is_empty() && name.starts_with(pod_prefix))
}

/// Lets a pod interface accept the replies the datapath has translated back to a node
/// address (NodePort replies carry the node's own address as source).
pub fn prepare_pod_interface(name: &str) -> Result<()> {
    let path = format!("/proc/sys/net/ipv4/conf/{name}/accept_local");
    std::fs::write(&path, "1").with_context(|| format!("writing {path}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_rule() {
        let ext = vec!["eth0".to_string()];
        assert!(wanted("eth0", &ext, "veth"));
        assert!(wanted("veth1234", &ext, "veth"));
        assert!(!wanted("eth1", &ext, "veth"));
        assert!(!wanted("lo", &ext, ""));
        assert!(!wanted("vethx", &[], ""));
    }
}
