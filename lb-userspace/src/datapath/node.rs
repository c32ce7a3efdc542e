//! What the agent reads from its node's network namespace: interfaces, addresses, sysctls.
//! Everything goes through netlink-backed libc calls, so it reflects the namespace the agent
//! runs in even when /sys belongs to another one.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use super::error::{Context, Result};

/// The interfaces of the namespace: (ifindex, name).
pub fn interfaces() -> Result<Vec<(u32, String)>> {
    let list = nix::net::if_::if_nameindex().context("listing interfaces")?;
    Ok(list
        .iter()
        .map(|i| (i.index(), i.name().to_string_lossy().into_owned()))
        .collect())
}

/// The addresses NodePorts may be served on, of both families: every address of the
/// namespace but loopback and IPv6 link-local ones (an fe80:: address names a link, not the
/// node: the same one may sit on several interfaces, and a flow to it cannot be routed to a
/// pod).
pub fn addresses() -> Result<BTreeSet<IpAddr>> {
    let mut out = BTreeSet::new();
    for ifa in nix::ifaddrs::getifaddrs().context("listing addresses")? {
        if let Some(ip) = ifa.address.as_ref().and_then(address_of) {
            if !ip.is_loopback() && !is_link_local(&ip) {
                out.insert(ip);
            }
        }
    }
    Ok(out)
}

/// The IP address of a socket address of either family.
fn address_of(a: &nix::sys::socket::SockaddrStorage) -> Option<IpAddr> {
    a.as_sockaddr_in()
        .map(|s| IpAddr::V4(s.ip()))
        .or_else(|| a.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())))
}

/// An IPv6 link-local address (fe80::/10).
fn is_link_local(a: &IpAddr) -> bool {
    matches!(a, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
}

/// The first IPv4 address of the first of `ifaces` that has one.
pub fn primary_address(ifaces: &[String]) -> Option<Ipv4Addr> {
    match primary_of(ifaces, IpAddr::is_ipv4)? {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(_) => None,
    }
}

/// The first IPv6 address, neither loopback nor link-local, of the first of `ifaces` that
/// has one.
pub fn primary_address_v6(ifaces: &[String]) -> Option<Ipv6Addr> {
    match primary_of(ifaces, |a| {
        a.is_ipv6() && !a.is_loopback() && !is_link_local(a)
    })? {
        IpAddr::V6(a) => Some(a),
        IpAddr::V4(_) => None,
    }
}

fn primary_of(ifaces: &[String], wanted: impl Fn(&IpAddr) -> bool) -> Option<IpAddr> {
    let addrs: Vec<_> = nix::ifaddrs::getifaddrs().ok()?.collect();
    ifaces.iter().find_map(|name| {
        addrs
            .iter()
            .filter(|a| &a.interface_name == name)
            .filter_map(|a| a.address.as_ref().and_then(address_of))
            .find(|a| wanted(a))
    })
}

/// The cookie of the agent's network namespace (`SO_NETNS_COOKIE`), which the socket hooks
/// compare with theirs.
pub fn netns_cookie() -> Result<u64> {
    super::sys::netns_cookie().context("SO_NETNS_COOKIE (kernel 5.14 or later needed)")
}

/// Whether an interface is one the datapath attaches to.
pub fn wanted(name: &str, ext_ifaces: &[String], pod_prefix: &str) -> bool {
    ext_ifaces.iter().any(|e| e == name) || (!pod_prefix.is_empty() && name.starts_with(pod_prefix))
}

fn sysctl_path(key: &str) -> String {
    format!("/proc/sys/{}", key.replace('.', "/"))
}

fn write_sysctl(key: &str, value: &str) -> Result<()> {
    let path = sysctl_path(key);
    std::fs::write(&path, value).with_context(|| format!("writing {path}"))
}

/// Reads a sysctl of the agent's network namespace.
pub fn read_sysctl(key: &str) -> Result<String> {
    let path = sysctl_path(key);
    Ok(std::fs::read_to_string(&path)
        .with_context(|| format!("reading {path}"))?
        .trim()
        .to_string())
}

/// Lets an interface the datapath runs on take what it hands the stack: `accept_local` for
/// packets that carry the node's own address as source (NodePort replies from pods, flows
/// source-NATed to the node on their way to another node), and `rp_filter` 0 for hairpin
/// packets, whose source (169.254.42.1) is not routed via the pod, and for SNATed packets.
/// (The kernel applies the larger of `all.rp_filter` and the interface's; see `check_host`.)
pub fn prepare_interface(name: &str) -> Result<()> {
    write_sysctl(&format!("net.ipv4.conf.{name}.accept_local"), "1")?;
    write_sysctl(&format!("net.ipv4.conf.{name}.rp_filter"), "0")
}

/// Host settings the datapath depends on, as warnings.
pub fn check_host() -> Vec<String> {
    let mut warnings = Vec::new();
    match read_sysctl("net.ipv4.ip_forward") {
        Ok(v) if v == "1" => {}
        Ok(v) => warnings.push(format!(
            "net.ipv4.ip_forward is {v}: translated packets will not be forwarded to pods"
        )),
        Err(e) => warnings.push(format!("{e:#}")),
    }
    if let Ok(v) = read_sysctl("net.ipv4.conf.all.rp_filter") {
        if v == "1" {
            warnings.push(
                "net.ipv4.conf.all.rp_filter is 1 (strict): hairpin traffic will be dropped; \
                 use 0 or 2"
                    .into(),
            );
        }
    }
    warnings
}

/// What the kernel says drives an interface (`ETHTOOL_GDRVINFO`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Driver {
    pub name: String,
    /// Where the device sits (a PCI address, say); empty or "N/A" for software devices.
    pub bus_info: String,
}

/// Drivers of software interfaces: XDP on them runs on skbs the kernel already built.
const SOFTWARE_DRIVERS: &[&str] = &[
    "veth",
    "bridge",
    "bonding",
    "team",
    "vxlan",
    "geneve",
    "tun",
    "dummy",
    "macvlan",
    "ipvlan",
    "wireguard",
    "vrf",
    "openvswitch",
];

impl Driver {
    /// Whether this is hardware (or a paravirtual NIC) whose driver may run XDP natively.
    pub fn is_hardware(&self) -> bool {
        !SOFTWARE_DRIVERS.contains(&self.name.as_str())
            && !["", "N/A", "tun", "tap"].contains(&self.bus_info.as_str())
    }
}

/// The driver of interface `ifname` in the agent's namespace.
pub fn driver(ifname: &str) -> Result<Driver> {
    let (name, bus_info) = super::sys::ethtool_driver(ifname)
        .with_context(|| format!("ETHTOOL_GDRVINFO on {ifname}"))?;
    Ok(Driver { name, bus_info })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_addresses_of_both_families_without_loopback_or_link_local() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("address");
        assert!(is_link_local(&ip("fe80::1")));
        assert!(is_link_local(&ip("febf:ffff::1")));
        assert!(!is_link_local(&ip("fec0::1")));
        assert!(!is_link_local(&ip("2001:db8::1")));
        assert!(
            !is_link_local(&ip("169.254.0.1")),
            "IPv4 link-local is kept"
        );
        let all = addresses().expect("addresses");
        assert!(
            all.iter().all(|a| !a.is_loopback() && !is_link_local(a)),
            "{all:?}"
        );
        assert_eq!(primary_address_v6(&["lo".into()]), None, "::1 is not one");
    }

    #[test]
    fn interface_rule() {
        let ext = vec!["eth0".to_string()];
        assert!(wanted("eth0", &ext, "veth"));
        assert!(wanted("veth1234", &ext, "veth"));
        assert!(!wanted("eth1", &ext, "veth"));
        assert!(!wanted("lo", &ext, ""));
        assert!(!wanted("vethx", &[], ""));
    }

    #[test]
    fn only_nics_are_candidates_for_native_xdp() {
        let d = |name: &str, bus: &str| Driver {
            name: name.into(),
            bus_info: bus.into(),
        };
        assert!(d("virtio_net", "0000:00:03.0").is_hardware());
        assert!(d("mlx5_core", "0000:3b:00.0").is_hardware());
        assert!(!d("veth", "").is_hardware());
        assert!(!d("bridge", "N/A").is_hardware());
        assert!(!d("tun", "tap").is_hardware());
        // An unknown driver without a bus address is taken for software.
        assert!(!d("something", "").is_hardware());
    }
}
