//! A multi-node lab shaped like a kind cluster, on one machine, in network namespaces:
//!
//! ```text
//!  client (outside, like kind's host)     "docker network" namespace
//!  eth0 172.18.0.100/16 + .200/16 ──veth── c0 ┐
//!                                             br0 (bridge)
//!  nodeK (lb-agent, XDP on eth0)              │
//!  eth0 172.18.0.(1+K)/16 ─────────veth── nK ┘
//!  vethI 10.244.K.1/32 ──veth── eth0 10.244.K.(10+I)/32   pod I of node K
//! ```
//!
//! How pod traffic crosses between nodes is the cluster's [`Network`], as CNIs differ:
//!
//! * [`Network::Bridge`] (kindnet, ptp): `10.244.J.0/24 via 172.18.0.(1+J)` for every other
//!   node J; pod packets cross the bridge as they are.
//! * [`Network::Vxlan`] (flannel's default backend): a VXLAN device `flannel.1` (VNI 1, UDP
//!   8472 over eth0, MTU 1450) with 10.244.K.0/32, and for every other node J what flanneld
//!   programs: `10.244.J.0/24 via 10.244.J.0 dev flannel.1 onlink`, a permanent neighbour
//!   entry for 10.244.J.0 with J's `flannel.1` MAC and a bridge fdb entry sending that MAC
//!   to J's node IP.
//! * [`Network::Tunnel`] (Calico's IPIP `tunl0`, WireGuard: an L3 device without an Ethernet
//!   header): a TUN device `tun0` (MTU 1420) with 10.244.K.0/32, `10.244.J.0/24 dev tun0`
//!   for every other node J, and a relay (`lab-tunnel`, in the lab's `network` cgroup) that
//!   carries each packet `tun0` gives it in a UDP datagram (port 51820, over eth0) to the
//!   relay of the node whose pod CIDR holds the destination, which writes it to its `tun0`.
//!
//! In the overlays only pod-CIDR traffic takes the overlay device (the pods' links get its
//! MTU, as the CNIs set them); node IPs and the client are reached over the bridge, and the
//! agents are given `--ext-iface eth0` only.
//!
//! Node 1 also runs a server in its host network namespace (not in a pod), `node1-host` on
//! TCP 6443 and UDP 6053, the endpoint of the Services `kubernetes` (like kube-apiserver on a
//! one-node kind cluster) and `host-nodeport` (like a host-network ingress controller).
//!
//! The client reaches externalIPs and LoadBalancer IPs (203.0.113.0/24) through a node of
//! its choosing ([`Cluster::route_vips_via`]), as MetalLB in L2 mode would steer them. Each
//! node has a cgroup v2 directory holding its pods' and its host processes (what the agent's
//! socket-level hooks are attached to); the agents and the tunnel relays run in cgroups of
//! the lab's own beside them. Every namespace, process, pin, cgroup and file belongs to one
//! [`Cluster`] and is removed when it is dropped, also after a failure midway;
//! [`Cluster::detach`] leaves it running and hands back a [`ClusterState`] that removes it
//! later (`cargo xtask lab down`).
//!
//! As in the one-node lab, pods keep TX checksum offload on (partial checksums, as real pods
//! send them) while the nodes' links to the bridge and the client have it off, so whatever
//! crosses the "network" carries a checksum computed from what the datapath wrote, and the
//! receiver checks it.
//!
//! With [`ClusterConfig::dual_stack`] the lab is dual-stack, as kind's `ipFamily: dual` and
//! flannel's dual-stack mode make it: every address above has an IPv6 twin (the IPv4
//! address's numbers written in the IPv6 text: 172.18.0.2 → fd00:18::2, 10.244.1.11 →
//! fd00:10:244:1::11, 10.96.1.10 → fd00:10:96::1:10):
//!
//! ```text
//!  client  eth0 fd00:18::100/64 + ::200/64 (denied) + ::1/64 (the nodes' IPv6 gateway)
//!  nodeK   eth0 fd00:18::(1+K)/64, IPv6 forwarding on
//!  vethI   fd00:10:244:K::1/128 ──veth── eth0 fd00:10:244:K::(10+I)/128   pod I of node K
//! ```
//!
//! Every IPv6 address is added without duplicate address detection (and DAD is off in every
//! namespace of the lab, link-local addresses included), so that it is usable at once. Pod
//! traffic between nodes: [`Network::Bridge`] routes `fd00:10:244:J::/64 via fd00:18::(1+J)`;
//! [`Network::Vxlan`] adds flannel's second VXLAN device `flannel-v6.1` (VNI 1, UDP 8472
//! over the IPv6 underlay, MTU 1430) with fd00:10:244:K::/128 and the same route, neighbour
//! and fdb entries as `flannel.1`, in IPv6; [`Network::Tunnel`] gives `tun0`
//! fd00:10:244:K::/128 and `fd00:10:244:J::/64 dev tun0`, and the relays carry IPv6 packets
//! too (over the IPv4 underlay, as one WireGuard peer carries both families). The client
//! routes the IPv6 externalIP / LoadBalancer range (2001:db8::/64) through node 1 as well,
//! and the default manifests are dual-stack ([`default_manifests`]).

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

pub use crate::lab::{HTTP_PORT, UDP_PORT};
use crate::netns::{
    add_netns, add_pod, add_pod_ipv6, agent_cli, agent_healthy, binary, checksum_offload_off,
    in_netns, ipv6_sysctls, remove_manifest, router_sysctls, run, spawn_agent, wait_for,
    write_manifest, AgentFlags, PodLink,
};

/// The client's address that LoadBalancer source ranges allow.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 100);
/// The client's second address, which the source ranges leave out.
pub const DENIED_CLIENT_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 200);
/// The nodes' default gateway: an address of the outside client (kind's nodes route through
/// the Docker network's gateway alike), so that a node reaches any address, as real nodes do.
pub const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 1);
/// Where externalIPs and LoadBalancer ingress IPs come from.
pub const VIP_RANGE: &str = "203.0.113.0/24";
/// The source address the datapath gives a pod's packets to its own Service (hairpin).
pub const HAIRPIN_SNAT_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 42, 1);
/// Where a node's agent serves /healthz, in the node's namespace.
pub const HEALTHZ_URL: &str = "http://127.0.0.1:10256/healthz";

/// [`CLIENT_IP`]'s IPv6 twin (dual-stack labs): the client's address that the IPv6
/// loadBalancerSourceRanges allow.
pub const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 0x100);
/// [`DENIED_CLIENT_IP`]'s IPv6 twin: the client's second IPv6 address, outside the ranges.
pub const DENIED_CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 0x200);
/// [`GATEWAY_IP`]'s IPv6 twin: the nodes' IPv6 default gateway, an address of the client.
pub const GATEWAY_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 1);
/// [`VIP_RANGE`]'s IPv6 twin: where IPv6 externalIPs and LoadBalancer ingress IPs come from.
pub const VIP_RANGE6: &str = "2001:db8::/64";
/// [`HAIRPIN_SNAT_IP`]'s IPv6 twin (`lb_common::HAIRPIN_SNAT_V6`).
pub const HAIRPIN_SNAT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd6c, 0x6200, 0, 0, 0, 0, 0, 1);

/// `n` as it is written in an IPv6 twin of an IPv4 address: its decimal digits as hex digits
/// (11 → 0x11), so that fd00:10:244:2::11 reads as 10.244.2.11 does.
fn twin(n: usize) -> u16 {
    let (mut n, mut out, mut shift) = (n, 0u16, 0);
    while n > 0 {
        out |= ((n % 10) as u16) << shift;
        n /= 10;
        shift += 4;
    }
    out
}

/// Node names (`nodeName` of the Pods) are `node1`, `node2`, ...
pub fn node_name(k: usize) -> String {
    format!("node{k}")
}

/// Node K's address on the bridge: 172.18.0.(1+K), as kind numbers its nodes.
pub fn node_ip(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(172, 18, 0, 1 + k as u8)
}

pub fn pod_cidr(k: usize) -> String {
    format!("10.244.{k}.0/24")
}

/// Node K's address on each of its pod veths, its pods' default gateway.
pub fn pod_gateway(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, k as u8, 1)
}

/// Pod I of node K.
pub fn pod_ip(k: usize, i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, k as u8, 10 + i as u8)
}

/// Node K's IPv6 address on the bridge (dual-stack labs): fd00:18::(1+K), [`node_ip`]'s twin.
pub fn node_ip6(k: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, twin(1 + k))
}

/// Node K's IPv6 pod CIDR: fd00:10:244:K::/64 (of fd00:10:244::/56, kind's dual-stack pod
/// subnet), [`pod_cidr`]'s twin.
pub fn pod_cidr6(k: usize) -> String {
    format!("{}/64", overlay_ip6(k))
}

/// Node K's IPv6 address on each of its pod veths, its pods' IPv6 default gateway:
/// fd00:10:244:K::1, [`pod_gateway`]'s twin.
pub fn pod_gateway6(k: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x10, 0x244, twin(k), 0, 0, 0, 1)
}

/// Pod I of node K's IPv6 address: fd00:10:244:K::(10+I), [`pod_ip`]'s twin.
pub fn pod_ip6(k: usize, i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x10, 0x244, twin(k), 0, 0, 0, twin(10 + i))
}

pub fn pod_name(k: usize, i: usize) -> String {
    format!("node{k}-pod{i}")
}

/// The name node K's host-network server answers with (`lab-server` in the node's own
/// namespace, not in a pod; node 1 runs one, on [`services::HOST_SERVER_TCP`] and
/// [`services::HOST_SERVER_UDP`]).
pub fn host_server_name(k: usize) -> String {
    format!("node{k}-host")
}

/// How pod traffic crosses between nodes (see the module's documentation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    /// kindnet / ptp: routes to the other nodes' pod CIDRs via their bridge addresses.
    #[default]
    Bridge,
    /// flannel's VXLAN backend: `flannel.1`, routes, neighbours and fdb entries as flanneld
    /// programs them.
    Vxlan,
    /// An L3 tunnel without an Ethernet header (Calico IPIP, WireGuard): `tun0` and a UDP
    /// relay per node (`lab-tunnel`).
    Tunnel,
}

impl Network {
    pub const ALL: [Network; 3] = [Network::Bridge, Network::Vxlan, Network::Tunnel];

    /// The device pod traffic between nodes crosses, if it is not eth0.
    pub fn overlay_device(self) -> Option<&'static str> {
        match self {
            Network::Bridge => None,
            Network::Vxlan => Some(VXLAN_DEVICE),
            Network::Tunnel => Some(TUN_DEVICE),
        }
    }

    /// The overlay device's MTU, which the pods' links get too.
    pub fn overlay_mtu(self) -> Option<u16> {
        match self {
            Network::Bridge => None,
            Network::Vxlan => Some(VXLAN_MTU),
            Network::Tunnel => Some(TUN_MTU),
        }
    }

    /// The device IPv6 pod traffic between nodes crosses in a dual-stack lab, if it is not
    /// eth0: flannel's second VXLAN device, or the same tunnel.
    pub fn overlay_device6(self) -> Option<&'static str> {
        match self {
            Network::Bridge => None,
            Network::Vxlan => Some(VXLAN6_DEVICE),
            Network::Tunnel => Some(TUN_DEVICE),
        }
    }
}

impl std::fmt::Display for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Network::Bridge => "bridge",
            Network::Vxlan => "vxlan",
            Network::Tunnel => "tunnel",
        })
    }
}

impl std::str::FromStr for Network {
    type Err = String;

    fn from_str(s: &str) -> Result<Network, String> {
        Network::ALL
            .into_iter()
            .find(|n| n.to_string() == s)
            .ok_or_else(|| format!("unknown network {s:?} (bridge, vxlan or tunnel)"))
    }
}

/// flannel's VXLAN device, VNI, UDP port and MTU.
pub const VXLAN_DEVICE: &str = "flannel.1";
pub const VXLAN_VNI: u32 = 1;
pub const VXLAN_PORT: u16 = 8472;
pub const VXLAN_MTU: u16 = 1450;
/// flannel's VXLAN device for IPv6 in dual-stack mode: the same VNI and port over the IPv6
/// underlay (node IPv6 addresses), whose header is 20 bytes longer, hence the MTU. The pods'
/// links keep [`VXLAN_MTU`] (flannel gives them one MTU): an IPv6 packet longer than 1430
/// bytes is answered by the node with ICMPv6 Packet Too Big.
pub const VXLAN6_DEVICE: &str = "flannel-v6.1";
pub const VXLAN6_MTU: u16 = 1430;
/// The L3 tunnel's TUN device, MTU and the UDP port its relays listen on (on the node IP).
pub const TUN_DEVICE: &str = "tun0";
pub const TUN_MTU: u16 = 1420;
pub const TUNNEL_PORT: u16 = 51820;

/// Node K's address on its overlay device: 10.244.K.0 (/32), as flannel and Calico number it.
pub fn overlay_ip(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, k as u8, 0)
}

/// What differs between the two families' VXLAN devices (`flannel.1`, `flannel-v6.1`).
struct VxlanFamily {
    family: &'static str,
    device: &'static str,
    mtu: u16,
    /// The prefix length of the device's own (host) address.
    host_prefix: u8,
    /// A node's address the tunnel runs over.
    underlay: fn(&ClusterNode) -> Option<IpAddr>,
    /// A node's address on the device.
    overlay: fn(usize) -> IpAddr,
    mac: fn(usize) -> String,
    pod_cidr: fn(usize) -> String,
}

const VXLAN_V4: VxlanFamily = VxlanFamily {
    family: "IPv4",
    device: VXLAN_DEVICE,
    mtu: VXLAN_MTU,
    host_prefix: 32,
    underlay: |n| Some(n.ip.into()),
    overlay: |k| overlay_ip(k).into(),
    mac: vxlan_mac,
    pod_cidr,
};

const VXLAN_V6: VxlanFamily = VxlanFamily {
    family: "IPv6",
    device: VXLAN6_DEVICE,
    mtu: VXLAN6_MTU,
    host_prefix: 128,
    underlay: |n| n.ip6.map(IpAddr::from),
    overlay: |k| overlay_ip6(k).into(),
    mac: vxlan6_mac,
    pod_cidr: pod_cidr6,
};

/// Node K's IPv6 address on its overlay device: fd00:10:244:K:: (/128), the first address of
/// its IPv6 pod CIDR, as flannel numbers it ([`overlay_ip`]'s twin).
pub fn overlay_ip6(k: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x10, 0x244, twin(k), 0, 0, 0, 0)
}

/// The MAC of node K's `flannel.1` (flanneld keeps a random one in a node annotation; the lab
/// derives it from the node, so that captures read the same every time).
pub fn vxlan_mac(k: usize) -> String {
    format!("02:42:0a:f4:{:02x}:00", k as u8)
}

/// The MAC of node K's `flannel-v6.1` (flanneld's second annotation), derived alike.
pub fn vxlan6_mac(k: usize) -> String {
    format!("02:42:fd:f4:{:02x}:00", k as u8)
}

/// The addresses node K's host has in `network` (the source its own stack may pick): its
/// bridge address, its address on the pod veths and, in an overlay, on the overlay device.
pub fn node_addresses(network: Network, k: usize) -> Vec<Ipv4Addr> {
    let mut addrs = vec![node_ip(k), pod_gateway(k)];
    if network.overlay_device().is_some() {
        addrs.push(overlay_ip(k));
    }
    addrs
}

/// The IPv6 addresses node K's host has in a dual-stack lab of `network` (the source its own
/// stack may pick for IPv6): [`node_addresses`]' twins.
pub fn node_addresses6(network: Network, k: usize) -> Vec<Ipv6Addr> {
    let mut addrs = vec![node_ip6(k), pod_gateway6(k)];
    if network.overlay_device6().is_some() {
        addrs.push(overlay_ip6(k));
    }
    addrs
}

/// The Services the default manifests define (see [`default_manifests`]). Every Service over
/// pods has port 80/TCP (`http`, to the pods' 8080) and 53/UDP (`dns`, to the pods' 5353);
/// those over node 1's host-network server say their ports.
///
/// In a dual-stack lab every Service is dual-stack (`ipFamilyPolicy: PreferDualStack`,
/// `ipFamilies: [IPv4, IPv6]`) and each address here has an IPv6 twin, named with a `6`:
/// ClusterIPs from fd00:10:96::/108 (kind's dual-stack service subnet; 10.96.X.Y →
/// fd00:10:96::X:Y), externalIPs and LoadBalancer IPs from [`super::VIP_RANGE6`]. Ports and
/// NodePorts are the same in both families (a NodePort answers on the node's IPv4 and IPv6
/// addresses).
pub mod services {
    use std::net::{Ipv4Addr, Ipv6Addr};

    /// A ClusterIP's IPv6 twin: 10.96.X.Y → fd00:10:96::X:Y (X and Y written as they read).
    const fn cluster_ip6(x: u16, y: u16) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, x, y)
    }

    /// An IPv6 externalIP or LoadBalancer IP: 203.0.113.Y → 2001:db8::Y.
    const fn vip6(y: u16) -> Ipv6Addr {
        Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, y)
    }

    /// `web`: ClusterIP over every pod of every node.
    pub const WEB: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 10);
    pub const WEB6: Ipv6Addr = cluster_ip6(1, 0x10);
    /// `web-nodeport`: NodePort (externalTrafficPolicy Cluster) over every pod.
    pub const WEB_NODEPORT: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 11);
    pub const WEB_NODEPORT6: Ipv6Addr = cluster_ip6(1, 0x11);
    pub const WEB_NODEPORT_TCP: u16 = 30080;
    pub const WEB_NODEPORT_UDP: u16 = 30053;
    /// `external`: ClusterIP with externalIPs [EXTERNAL_IP] ([EXTERNAL_IP, EXTERNAL_IP6] in a
    /// dual-stack lab), endpoint node1-pod1.
    pub const EXTERNAL: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 12);
    pub const EXTERNAL6: Ipv6Addr = cluster_ip6(1, 0x12);
    pub const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
    pub const EXTERNAL_IP6: Ipv6Addr = vip6(0x10);
    /// `lb`: LoadBalancer with ingress LB_IP and loadBalancerSourceRanges [CLIENT_IP/32,
    /// node2-pod1's address/32, node 2's address/32], endpoint node1-pod1. In a dual-stack
    /// lab also ingress LB_IP6 and the ranges' twins [CLIENT_IP6/128, node2-pod1's IPv6
    /// address/128, node 2's IPv6 address/128].
    pub const LB: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 13);
    pub const LB6: Ipv6Addr = cluster_ip6(1, 0x13);
    pub const LB_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
    pub const LB_IP6: Ipv6Addr = vip6(0x20);
    pub const LB_NODEPORT_TCP: u16 = 30090;
    pub const LB_NODEPORT_UDP: u16 = 30091;
    /// `local`: LoadBalancer with externalTrafficPolicy Local, ingress LOCAL_LB_IP (and
    /// LOCAL_LB_IP6), endpoints the pods of node 1 only.
    pub const LOCAL: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 14);
    pub const LOCAL6: Ipv6Addr = cluster_ip6(1, 0x14);
    pub const LOCAL_LB_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 30);
    pub const LOCAL_LB_IP6: Ipv6Addr = vip6(0x30);
    pub const LOCAL_NODEPORT_TCP: u16 = 30092;
    pub const LOCAL_NODEPORT_UDP: u16 = 30093;
    pub const LOCAL_HEALTH_CHECK_NODEPORT: u16 = 30094;
    /// `self`: ClusterIP whose only endpoint is node1-pod1 (node1-pod1 reaching itself).
    pub const SELF: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 15);
    pub const SELF6: Ipv6Addr = cluster_ip6(1, 0x15);
    /// `internal-local`: ClusterIP with internalTrafficPolicy Local, endpoints the pods of
    /// node 1 only (clients on other nodes: dropped).
    pub const INTERNAL_LOCAL: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 17);
    pub const INTERNAL_LOCAL6: Ipv6Addr = cluster_ip6(1, 0x17);
    /// `sticky`: ClusterIP with sessionAffinity ClientIP (timeout 60 s), every pod.
    pub const STICKY: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 18);
    pub const STICKY6: Ipv6Addr = cluster_ip6(1, 0x18);

    /// `dual` (dual-stack labs only): a LoadBalancer Service that must have both families
    /// (`ipFamilyPolicy: RequireDualStack`, `ipFamilies: [IPv4, IPv6]`, both ClusterIPs),
    /// externalIPs [DUAL_EXTERNAL_IP, DUAL_EXTERNAL_IP6], ingress [DUAL_LB_IP, DUAL_LB_IP6],
    /// externalTrafficPolicy Cluster. It has no selector: its endpoints are two
    /// EndpointSlices the lab writes, `dual-ipv4` (`addressType: IPv4`) and `dual-ipv6`
    /// (`addressType: IPv6`), naming the same pods, those of node 1, by their IPv4 and their
    /// IPv6 address (ports `http` 8080/TCP and `dns` 5353/UDP).
    pub const DUAL: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 19);
    pub const DUAL6: Ipv6Addr = cluster_ip6(1, 0x19);
    pub const DUAL_EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 40);
    pub const DUAL_EXTERNAL_IP6: Ipv6Addr = vip6(0x40);
    pub const DUAL_LB_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 50);
    pub const DUAL_LB_IP6: Ipv6Addr = vip6(0x50);
    pub const DUAL_NODEPORT_TCP: u16 = 30095;
    pub const DUAL_NODEPORT_UDP: u16 = 30096;
    /// `dual-empty` (dual-stack labs only): a NodePort Service, `RequireDualStack`, without a
    /// selector and without EndpointSlices: no endpoint anywhere, so every family's
    /// ClusterIP and NodePort is refused (TCP RST, ICMP / ICMPv6 port unreachable).
    pub const DUAL_EMPTY: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 20);
    pub const DUAL_EMPTY6: Ipv6Addr = cluster_ip6(1, 0x20);
    pub const DUAL_EMPTY_NODEPORT_TCP: u16 = 30097;
    pub const DUAL_EMPTY_NODEPORT_UDP: u16 = 30098;

    /// Where node 1's host-network server (`node1-host`, not in a pod) listens, in node 1's
    /// namespace: the endpoint port of `kubernetes` and `host-nodeport`.
    pub const HOST_SERVER_TCP: u16 = 6443;
    pub const HOST_SERVER_UDP: u16 = 6053;
    /// `kubernetes`: the API server's ClusterIP, as on a one-node kind cluster, port 443/TCP
    /// (`https`) and 53/UDP (`dns`); its EndpointSlice names node 1's own address
    /// (HOST_SERVER_TCP / HOST_SERVER_UDP), a host-network endpoint. Its IPv6 ClusterIP is
    /// the first of the IPv6 service subnet (as kind's is) and its IPv6 EndpointSlice names
    /// node 1's IPv6 address.
    pub const KUBERNETES: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
    pub const KUBERNETES6: Ipv6Addr = cluster_ip6(0, 1);
    pub const KUBERNETES_TCP: u16 = 443;
    pub const KUBERNETES_UDP: u16 = 53;
    /// `host-nodeport`: NodePort (externalTrafficPolicy Cluster) whose endpoint is node 1's
    /// own address (a host-network pod serving a NodePort, e.g. an ingress controller); in a
    /// dual-stack lab also node 1's IPv6 address (a second EndpointSlice).
    pub const HOST_NODEPORT: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 16);
    pub const HOST_NODEPORT6: Ipv6Addr = cluster_ip6(1, 0x16);
    pub const HOST_NODEPORT_TCP: u16 = 30443;
    pub const HOST_NODEPORT_UDP: u16 = 30453;

    /// `on-nodeK`: NodePort whose only endpoint is node K's first pod (a backend on a chosen
    /// node, for the same-node and other-node cases).
    pub fn on_node(k: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 96, 1, 100 + k as u8)
    }
    /// `on-nodeK`'s IPv6 ClusterIP: fd00:10:96::1:(100+K).
    pub fn on_node6(k: usize) -> Ipv6Addr {
        cluster_ip6(1, super::twin(100 + k))
    }
    pub fn on_node_tcp(k: usize) -> u16 {
        30100 + k as u16
    }
    pub fn on_node_udp(k: usize) -> u16 {
        30200 + k as u16
    }
}

#[derive(Clone, Debug)]
pub struct ClusterNode {
    /// 1-based.
    pub index: usize,
    pub name: String,
    pub ns: String,
    pub ip: Ipv4Addr,
    /// Its IPv6 address on the bridge, in a dual-stack lab ([`node_ip6`]).
    pub ip6: Option<Ipv6Addr>,
    /// The bpffs folder its agent pins under.
    pub pin: PathBuf,
    /// Its cgroup v2 folder: its pods' and host processes (the agent's `--cgroup`).
    pub cgroup: PathBuf,
}

#[derive(Clone, Debug)]
pub struct ClusterPod {
    pub name: String,
    /// The node's index (1-based).
    pub node: usize,
    pub ns: String,
    pub ip: Ipv4Addr,
    /// Its IPv6 address, in a dual-stack lab ([`pod_ip6`]).
    pub ip6: Option<Ipv6Addr>,
    /// The veth's name on the node.
    pub host_iface: String,
}

/// Who sends a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A pod (by name), in its node's cgroup.
    Pod(String),
    /// Node K's host network namespace, in the node's cgroup.
    Node(usize),
    /// The client outside the cluster, from one of its addresses.
    Outside(Ipv4Addr),
    /// The client outside the cluster, from one of its IPv6 addresses (a dual-stack lab).
    Outside6(Ipv6Addr),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl std::fmt::Display for Proto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        })
    }
}

/// What one request (`lab-client`) came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Reply {
        /// What the client's socket says it talked to (getpeername / recvfrom).
        peer: SocketAddr,
        /// The pod that answered.
        backend: String,
        /// The client address the pod saw.
        seen: SocketAddr,
    },
    /// No answer in time (dropped).
    Timeout,
    /// TCP RST or ICMP port-unreachable.
    Refused,
    /// No route, or ICMP host/net-unreachable.
    Unreachable,
    Failed(String),
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Reply {
                peer,
                backend,
                seen,
            } => write!(f, "{backend} saw {seen} (peer {peer})"),
            Outcome::Timeout => f.write_str("timeout"),
            Outcome::Refused => f.write_str("refused"),
            Outcome::Unreachable => f.write_str("unreachable"),
            Outcome::Failed(e) => write!(f, "failed: {e}"),
        }
    }
}

/// How to build a cluster.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    pub nodes: usize,
    pub pods_per_node: usize,
    /// Prefix of every name (namespaces, pins, cgroups); default: unique per process and
    /// instance, so that tests can run side by side.
    pub tag: Option<String>,
    /// Start long-lived processes in sessions of their own, so that they outlive this
    /// process (with [`Cluster::detach`]).
    pub detached: bool,
    /// Keep the state here, rewritten as parts are made, so that an interrupted build is
    /// still removable ([`ClusterState::load`] and [`ClusterState::teardown`]).
    pub state_file: Option<PathBuf>,
    /// The agents' `--ext-attach` (default: the agent's).
    pub ext_attach: Option<&'static str>,
    /// How pod traffic crosses between nodes (default: [`Network::Bridge`]).
    pub network: Network,
    /// The agents sweep conntrack every second with a 2 s grace (tests see closed flows go);
    /// false: at the agent's defaults.
    pub fast_sweep: bool,
    /// More flags for every agent (`lb-agent run`).
    pub agent_args: Vec<String>,
    /// IPv6 beside IPv4 everywhere: node, pod and client addresses, routes, the overlays and
    /// the manifests (see the module's documentation). Default: true, as a kind cluster with
    /// `ipFamily: dual`; false when the environment has `LB_LAB_DUAL_STACK=0` (every cluster
    /// a test run builds, IPv4 only).
    pub dual_stack: bool,
}

/// The environment variable that makes [`ClusterConfig::new`] IPv4 only (`0`).
pub const DUAL_STACK_ENV: &str = "LB_LAB_DUAL_STACK";

impl ClusterConfig {
    pub fn new(nodes: usize, pods_per_node: usize) -> ClusterConfig {
        ClusterConfig {
            nodes,
            pods_per_node,
            tag: None,
            detached: false,
            state_file: None,
            ext_attach: None,
            network: Network::Bridge,
            fast_sweep: true,
            agent_args: Vec::new(),
            dual_stack: std::env::var(DUAL_STACK_ENV).map_or(true, |v| v != "0"),
        }
    }
}

/// Everything a cluster made that outlives a process: what teardown removes.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ClusterState {
    pub tag: String,
    /// Work folder: manifests/ and the logs.
    pub dir: Option<PathBuf>,
    /// Network namespaces, in the order they were made.
    pub namespaces: Vec<String>,
    /// The bpffs folder holding every node's pins.
    pub pins: Option<PathBuf>,
    /// The lab's cgroup folder (node folders and the agents' inside).
    pub cgroup: Option<PathBuf>,
    /// A cgroup2 mount the lab made because the machine had none.
    pub cgroup_mount: Option<PathBuf>,
    pub state_file: Option<PathBuf>,
}

impl ClusterState {
    pub fn load(path: &Path) -> Result<Option<ClusterState>> {
        match fs::read_to_string(path) {
            Ok(text) => Ok(Some(
                serde_json::from_str(&text)
                    .with_context(|| format!("reading {}", path.display()))?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// What a cluster tagged `tag` made, found by name (its namespaces, pins, cgroups and
    /// work folder): for removing one whose state file is lost.
    pub fn by_tag(tag: &str) -> Result<ClusterState> {
        let (pins, dir, cgroup) = names(tag);
        let namespaces = run(&["ip", "netns", "list"])?
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|ns| ns.starts_with(&format!("{tag}-")))
            .map(str::to_string)
            .collect();
        Ok(ClusterState {
            tag: tag.to_string(),
            dir: Some(dir),
            namespaces,
            pins: Some(pins),
            cgroup: cgroup2_mount()?.map(|root| root.join(cgroup)),
            cgroup_mount: None,
            state_file: None,
        })
    }

    fn save(&self) -> Result<()> {
        let Some(path) = &self.state_file else {
            return Ok(());
        };
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, serde_json::to_string_pretty(self)?)?;
        fs::rename(&tmp, path)?;
        Ok(())
    }

    /// Removes whatever of the cluster exists: kills every process in its cgroups, unpins
    /// the datapaths, deletes the namespaces, the cgroups, the work folder and the state
    /// file. Parts already gone are skipped; returns what could not be removed.
    pub fn teardown(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(cg) = &self.cgroup {
            if let Err(e) = kill_cgroup(cg) {
                problems.push(format!("killing the processes of {}: {e:#}", cg.display()));
            }
        }
        // Unpinning the links detaches the programs; deleting the namespaces removes the rest.
        if let Some(pins) = self.pins.as_ref().filter(|p| p.exists()) {
            if let Err(e) = fs::remove_dir_all(pins) {
                problems.push(format!("removing {}: {e}", pins.display()));
            }
        }
        for ns in self.namespaces.iter().rev() {
            if Path::new("/run/netns").join(ns).exists() {
                if let Err(e) = run(&["ip", "netns", "del", ns]) {
                    problems.push(format!("{e:#}"));
                }
            }
        }
        if let Some(cg) = self.cgroup.as_ref().filter(|p| p.exists()) {
            if let Err(e) = remove_cgroup(cg) {
                problems.push(format!("removing {}: {e:#}", cg.display()));
            }
        }
        if let Some(m) = &self.cgroup_mount {
            let _ = run(&["umount", &m.to_string_lossy()]);
        }
        if let Some(dir) = self.dir.as_ref().filter(|d| d.exists()) {
            if std::env::var_os("LB_KEEP_LAB_LOGS").is_none() {
                if let Err(e) = fs::remove_dir_all(dir) {
                    problems.push(format!("removing {}: {e}", dir.display()));
                }
            }
        }
        if let Some(f) = self.state_file.as_ref().filter(|f| f.exists()) {
            if let Err(e) = fs::remove_file(f) {
                problems.push(format!("removing {}: {e}", f.display()));
            }
        }
        problems
    }
}

/// A cluster's pin folder, work folder and cgroup name (below the cgroup2 root).
fn names(tag: &str) -> (PathBuf, PathBuf, String) {
    (
        PathBuf::from(format!("/sys/fs/bpf/lb-lab-{tag}")),
        std::env::temp_dir().join(format!("lb-lab-{tag}")),
        format!("lb-lab-{tag}"),
    )
}

/// The mount point of the cgroup v2 hierarchy, from /proc/self/mounts.
pub fn cgroup2_mount() -> Result<Option<PathBuf>> {
    let mounts = fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    Ok(mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
    }))
}

/// Kills every process in cgroup `cg` and below, and waits until they are gone.
fn kill_cgroup(cg: &Path) -> Result<()> {
    if !cg.exists() {
        return Ok(());
    }
    let kill = cg.join("cgroup.kill");
    if kill.exists() {
        fs::write(&kill, "1").with_context(|| format!("writing {}", kill.display()))?;
    } else {
        for dir in cgroup_dirs(cg) {
            let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                // SAFETY: kill(2) on a process of the lab's own cgroup.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    wait_for(Duration::from_secs(5), || {
        let events = fs::read_to_string(cg.join("cgroup.events")).unwrap_or_default();
        Ok(!events.lines().any(|l| l == "populated 1"))
    })
    .context("processes left in the cgroup")
}

/// `cg` and every cgroup below it, deepest first.
fn cgroup_dirs(cg: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = fs::read_dir(cg) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(cgroup_dirs(&e.path()));
            }
        }
    }
    out.push(cg.to_path_buf());
    out
}

/// Removes cgroup `cg` and those below it (rmdir, deepest first: their files go with them).
fn remove_cgroup(cg: &Path) -> Result<()> {
    for dir in cgroup_dirs(cg) {
        // A cgroup whose last process has just exited can still be busy for a moment.
        wait_for(Duration::from_secs(2), || Ok(fs::remove_dir(&dir).is_ok()))
            .with_context(|| format!("rmdir {}", dir.display()))?;
    }
    Ok(())
}

/// The nodes and pods a cluster of this shape has, named for `tag` (with IPv6 addresses if
/// `dual_stack`).
pub fn plan(
    tag: &str,
    nodes: usize,
    pods_per_node: usize,
    dual_stack: bool,
) -> (Vec<ClusterNode>, Vec<ClusterPod>) {
    let node_list = (1..=nodes)
        .map(|k| ClusterNode {
            index: k,
            name: node_name(k),
            ns: format!("{tag}-node{k}"),
            ip: node_ip(k),
            ip6: dual_stack.then(|| node_ip6(k)),
            pin: names(tag).0.join(format!("node{k}")),
            cgroup: PathBuf::new(),
        })
        .collect();
    let pods = (1..=nodes)
        .flat_map(|k| {
            (1..=pods_per_node).map(move |i| ClusterPod {
                name: pod_name(k, i),
                node: k,
                ns: format!("{tag}-node{k}-pod{i}"),
                ip: pod_ip(k, i),
                ip6: dual_stack.then(|| pod_ip6(k, i)),
                host_iface: format!("veth{i}"),
            })
        })
        .collect();
    (node_list, pods)
}

pub struct Cluster {
    pub tag: String,
    pub nodes: Vec<ClusterNode>,
    pub pods: Vec<ClusterPod>,
    /// The "docker network": the bridge's namespace.
    pub bridge_ns: String,
    /// The client outside the cluster.
    pub client_ns: String,
    /// Work folder: manifests/ and the logs.
    pub dir: PathBuf,
    /// How pod traffic crosses between nodes.
    pub network: Network,
    /// Cgroup of the agents (outside the nodes' cgroups, so not under their hooks).
    agents_cgroup: PathBuf,
    /// Cgroup of the network's own processes (the tunnel relays), beside the agents'.
    network_cgroup: PathBuf,
    state: ClusterState,
    detached: bool,
    ext_attach: Option<&'static str>,
    /// The agents' conntrack sweep: fast (tests) or at the agent's defaults.
    fast_sweep: bool,
    /// More flags for every agent.
    agent_args: Vec<String>,
    /// Long-lived processes (servers, agents, tunnel relays), by what they are.
    children: Vec<(String, Child)>,
    /// Left running by `detach`.
    kept: bool,
}

impl Cluster {
    /// Builds a cluster of `nodes` nodes with `pods_per_node` pods each (no processes yet).
    pub fn up(nodes: usize, pods_per_node: usize) -> Result<Cluster> {
        Cluster::up_with(ClusterConfig::new(nodes, pods_per_node))
    }

    pub fn up_with(cfg: ClusterConfig) -> Result<Cluster> {
        if !(1..=90).contains(&cfg.nodes) || !(1..=200).contains(&cfg.pods_per_node) {
            bail!("a cluster has 1 to 90 nodes of 1 to 200 pods");
        }
        static N: AtomicU32 = AtomicU32::new(0);
        let tag = cfg.tag.clone().unwrap_or_else(|| {
            let n = N.fetch_add(1, Ordering::Relaxed);
            format!("lc{}x{n}", std::process::id())
        });
        let (nodes, pods) = plan(&tag, cfg.nodes, cfg.pods_per_node, cfg.dual_stack);
        let mut cluster = Cluster {
            bridge_ns: format!("{tag}-net"),
            client_ns: format!("{tag}-client"),
            dir: names(&tag).1,
            network: cfg.network,
            agents_cgroup: PathBuf::new(),
            network_cgroup: PathBuf::new(),
            state: ClusterState {
                tag: tag.clone(),
                state_file: cfg.state_file.clone(),
                ..ClusterState::default()
            },
            detached: cfg.detached,
            ext_attach: cfg.ext_attach,
            fast_sweep: cfg.fast_sweep,
            agent_args: cfg.agent_args.clone(),
            children: Vec::new(),
            kept: false,
            tag,
            nodes,
            pods,
        };
        // From here on, Drop removes whatever part exists.
        cluster.build().context("building the cluster")?;
        Ok(cluster)
    }

    /// Whether the cluster is dual-stack ([`ClusterConfig::dual_stack`]): its nodes have IPv6
    /// addresses.
    pub fn dual_stack(&self) -> bool {
        self.nodes.iter().any(|n| n.ip6.is_some())
    }

    /// Notes a part as made (in the state file too, if there is one).
    fn record(&mut self, f: impl FnOnce(&mut ClusterState)) -> Result<()> {
        f(&mut self.state);
        self.state.save().context("writing the state file")
    }

    /// Creates a namespace of the cluster's, noted first so that teardown removes it even if
    /// setting it up fails halfway.
    fn add_netns(&mut self, ns: &str) -> Result<()> {
        if Path::new("/run/netns").join(ns).exists() {
            bail!("network namespace {ns} exists already");
        }
        let name = ns.to_string();
        self.record(|s| s.namespaces.push(name))?;
        add_netns(ns)?;
        if self.dual_stack() {
            // Before any interface is made in it, so that every one starts without DAD.
            ipv6_sysctls(ns, false)?;
        }
        Ok(())
    }

    fn build(&mut self) -> Result<()> {
        let dir = self.dir.clone();
        fs::create_dir_all(dir.join("manifests"))?;
        self.record(|s| s.dir = Some(dir.clone()))?;
        self.build_cgroups()?;
        let pins = names(&self.tag).0;
        self.record(|s| s.pins = Some(pins))?;

        let bridge = self.bridge_ns.clone();
        self.add_netns(&bridge)?;
        run(&["ip", "-n", &bridge, "link", "add", "br0", "type", "bridge"])?;
        run(&["ip", "-n", &bridge, "link", "set", "br0", "up"])?;
        for node in self.nodes.clone() {
            self.add_netns(&node.ns)?;
            let ip6: Vec<Ipv6Addr> = node.ip6.into_iter().collect();
            self.plug(&format!("n{}", node.index), &node.ns, &[node.ip], &ip6)?;
            router_sysctls(&node.ns)?;
            if self.dual_stack() {
                ipv6_sysctls(&node.ns, true)?;
            }
        }
        for node in self.nodes.clone() {
            match self.network {
                Network::Bridge => self.bridge_routes(&node),
                Network::Vxlan => self.vxlan(&node),
                Network::Tunnel => self.tunnel(&node),
            }
            .with_context(|| format!("{} network of {}", self.network, node.name))?;
        }
        for pod in self.pods.clone() {
            let node_ns = self.nodes[pod.node - 1].ns.clone();
            self.add_netns(&pod.ns)?;
            add_pod(&PodLink {
                node_ns: &node_ns,
                pod_ns: &pod.ns,
                host_iface: &pod.host_iface,
                ip: pod.ip,
                gateway: pod_gateway(pod.node),
            })
            .with_context(|| format!("pod {}", pod.name))?;
            if let Some(ip6) = pod.ip6 {
                add_pod_ipv6(
                    &node_ns,
                    &pod.ns,
                    &pod.host_iface,
                    ip6,
                    pod_gateway6(pod.node),
                )
                .with_context(|| format!("IPv6 of pod {}", pod.name))?;
            }
            if let Some(mtu) = self.network.overlay_mtu() {
                let mtu = mtu.to_string();
                run(&[
                    "ip",
                    "-n",
                    &node_ns,
                    "link",
                    "set",
                    &pod.host_iface,
                    "mtu",
                    &mtu,
                ])?;
                run(&["ip", "-n", &pod.ns, "link", "set", "eth0", "mtu", &mtu])?;
            }
        }
        let client = self.client_ns.clone();
        self.add_netns(&client)?;
        let client6 = if self.dual_stack() {
            vec![CLIENT_IP6, DENIED_CLIENT_IP6, GATEWAY_IP6]
        } else {
            vec![]
        };
        self.plug(
            "c0",
            &client,
            &[CLIENT_IP, DENIED_CLIENT_IP, GATEWAY_IP],
            &client6,
        )?;
        for node in &self.nodes {
            let gw = GATEWAY_IP.to_string();
            run(&["ip", "-n", &node.ns, "route", "add", "default", "via", &gw])?;
            if node.ip6.is_some() {
                let gw = GATEWAY_IP6.to_string();
                run(&[
                    "ip", "-n", &node.ns, "-6", "route", "add", "default", "via", &gw,
                ])?;
            }
        }
        self.route_vips_via(1)?;
        if self.network == Network::Tunnel {
            self.start_relays()?;
        }
        Ok(())
    }

    /// Pod CIDRs of the other nodes through those nodes, as kindnet routes them.
    fn bridge_routes(&self, node: &ClusterNode) -> Result<()> {
        for other in self.nodes.iter().filter(|o| o.index != node.index) {
            run(&[
                "ip",
                "-n",
                &node.ns,
                "route",
                "add",
                &pod_cidr(other.index),
                "via",
                &other.ip.to_string(),
            ])?;
            if let Some(ip6) = other.ip6 {
                #[rustfmt::skip]
                run(&["ip", "-n", &node.ns, "route", "add", &pod_cidr6(other.index), "via",
                    &ip6.to_string()])?;
            }
        }
        Ok(())
    }

    /// `flannel.1` on `node` and, for every other node, what flanneld programs: the route to
    /// its pod CIDR through its `flannel.1` address (onlink), that address's MAC (a permanent
    /// neighbour entry) and where that MAC is (an fdb entry: its node IP). In a dual-stack
    /// lab, `flannel-v6.1` beside it, as flanneld makes it: the same VNI and port over the
    /// nodes' IPv6 addresses, with the same entries for the IPv6 pod CIDRs.
    fn vxlan(&self, node: &ClusterNode) -> Result<()> {
        self.vxlan_device(node, &VXLAN_V4)?;
        if node.ip6.is_some() {
            self.vxlan_device(node, &VXLAN_V6)?;
        }
        Ok(())
    }

    /// One family's VXLAN device on `node` and its entries for the other nodes.
    fn vxlan_device(&self, node: &ClusterNode, f: &VxlanFamily) -> Result<()> {
        let ns = node.ns.as_str();
        let ip = |args: &[&str]| -> Result<String> {
            let mut cmd = vec!["ip", "-n", ns];
            cmd.extend_from_slice(args);
            run(&cmd)
        };
        let underlay = |n: &ClusterNode| {
            (f.underlay)(n)
                .map(|a| a.to_string())
                .with_context(|| format!("{} has no {} address", n.name, f.family))
        };
        let (dev, vni, port, mtu) = (
            f.device,
            VXLAN_VNI.to_string(),
            VXLAN_PORT.to_string(),
            f.mtu.to_string(),
        );
        let (local, mac) = (underlay(node)?, (f.mac)(node.index));
        #[rustfmt::skip]
        ip(&["link", "add", dev, "type", "vxlan", "id", &vni, "local", &local, "dev", "eth0",
            "dstport", &port, "nolearning"])?;
        ip(&["link", "set", dev, "address", &mac, "mtu", &mtu])?;
        let addr = format!("{}/{}", (f.overlay)(node.index), f.host_prefix);
        let mut add = vec!["addr", "add", &addr, "dev", dev];
        if f.host_prefix == 128 {
            // No duplicate address detection: the address works at once.
            add.push("nodad");
        }
        ip(&add)?;
        ip(&["link", "set", dev, "up"])?;
        for other in self.nodes.iter().filter(|o| o.index != node.index) {
            let (gw, mac) = ((f.overlay)(other.index).to_string(), (f.mac)(other.index));
            let (cidr, dst) = ((f.pod_cidr)(other.index), underlay(other)?);
            #[rustfmt::skip]
            ip(&["route", "add", &cidr, "via", &gw, "dev", dev, "onlink"])?;
            #[rustfmt::skip]
            ip(&["neigh", "replace", &gw, "lladdr", &mac, "dev", dev, "nud", "permanent"])?;
            #[rustfmt::skip]
            run(&["bridge", "-n", ns, "fdb", "append", &mac, "dev", dev, "dst", &dst, "self",
                "permanent"])?;
        }
        Ok(())
    }

    /// `tun0` on `node` (persistent, so that the namespace owns it; its relay attaches to it)
    /// with the routes to the other nodes' pod CIDRs through it.
    fn tunnel(&self, node: &ClusterNode) -> Result<()> {
        let ns = node.ns.as_str();
        let ip = |args: &[&str]| -> Result<String> {
            let mut cmd = vec!["ip", "-n", ns];
            cmd.extend_from_slice(args);
            run(&cmd)
        };
        // iproute2 makes IFF_TUN | IFF_NO_PI devices ("pi off").
        ip(&["tuntap", "add", "dev", TUN_DEVICE, "mode", "tun"])?;
        // No IPv6 link-local address (WireGuard's devices have none either), so that the
        // kernel sends nothing of its own into the tunnel.
        #[rustfmt::skip]
        ip(&["link", "set", TUN_DEVICE, "mtu", &TUN_MTU.to_string(), "addrgenmode", "none"])?;
        let addr = format!("{}/32", overlay_ip(node.index));
        ip(&["addr", "add", &addr, "dev", TUN_DEVICE])?;
        if node.ip6.is_some() {
            let addr = format!("{}/128", overlay_ip6(node.index));
            ip(&["addr", "add", &addr, "dev", TUN_DEVICE, "nodad"])?;
        }
        ip(&["link", "set", TUN_DEVICE, "up"])?;
        for other in self.nodes.iter().filter(|o| o.index != node.index) {
            ip(&["route", "add", &pod_cidr(other.index), "dev", TUN_DEVICE])?;
            if other.ip6.is_some() {
                ip(&["route", "add", &pod_cidr6(other.index), "dev", TUN_DEVICE])?;
            }
        }
        Ok(())
    }

    /// Starts one `lab-tunnel` per node, in the node's namespace and the lab's `network`
    /// cgroup, and waits until each has attached to its `tun0` (the device has a carrier).
    fn start_relays(&mut self) -> Result<()> {
        let bin = binary("lab-tunnel")?;
        for node in self.nodes.clone() {
            let listen = SocketAddrV4::new(node.ip, TUNNEL_PORT).to_string();
            // The IPv4 underlay carries both families: an IPv6 pod CIDR is one more CIDR of
            // the same peer.
            let peers = self
                .nodes
                .iter()
                .filter(|o| o.index != node.index)
                .flat_map(|o| {
                    let cidr6 = o.ip6.map(|_| pod_cidr6(o.index));
                    [Some(pod_cidr(o.index)), cidr6]
                        .into_iter()
                        .flatten()
                        .map(move |cidr| format!("{cidr}={}:{TUNNEL_PORT}", o.ip))
                });
            let log = fs::File::create(self.dir.join(format!("tunnel-{}.log", node.name)))?;
            let child = self
                .command(&node.ns, Some(&self.network_cgroup))
                .arg(&bin)
                .args([TUN_DEVICE, &listen])
                .args(peers)
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("starting lab-tunnel")?;
            self.children.push((format!("relay {}", node.name), child));
        }
        for node in self.nodes.clone() {
            wait_for(Duration::from_secs(5), || {
                self.check_children()?;
                let link = run(&["ip", "-n", &node.ns, "-o", "link", "show", TUN_DEVICE])?;
                Ok(link.contains("LOWER_UP"))
            })
            .with_context(|| format!("the tunnel relay of {} did not attach", node.name))?;
        }
        Ok(())
    }

    /// Fails if a long-lived process has exited.
    fn check_children(&mut self) -> Result<()> {
        for (what, child) in &mut self.children {
            if let Some(status) = child.try_wait()? {
                bail!("{what} exited ({status})");
            }
        }
        Ok(())
    }

    /// The packets node K's overlay device has received and sent (`None` on the bridge).
    pub fn overlay_counters(&self, k: usize) -> Result<Option<LinkCounters>> {
        let Some(dev) = self.network.overlay_device() else {
            return Ok(None);
        };
        link_counters(&self.node(k)?.ns, dev).map(Some)
    }

    /// Makes the cluster's cgroups: `<cgroup2>/lb-lab-<tag>/{nodeK,agents,network}`.
    fn build_cgroups(&mut self) -> Result<()> {
        let root = if let Some(root) = cgroup2_mount()? {
            root
        } else {
            let m = self.dir.join("cgroup2");
            fs::create_dir_all(&m)?;
            run(&["mount", "-t", "cgroup2", "none", &m.to_string_lossy()])?;
            self.record(|s| s.cgroup_mount = Some(m.clone()))?;
            m
        };
        let cg = root.join(names(&self.tag).2);
        fs::create_dir(&cg).with_context(|| format!("creating {}", cg.display()))?;
        self.record(|s| s.cgroup = Some(cg.clone()))?;
        for node in &mut self.nodes {
            node.cgroup = cg.join(&node.name);
            fs::create_dir(&node.cgroup)?;
        }
        self.agents_cgroup = cg.join("agents");
        fs::create_dir(&self.agents_cgroup)?;
        self.network_cgroup = cg.join("network");
        fs::create_dir(&self.network_cgroup)?;
        Ok(())
    }

    /// A veth from namespace `ns` (`eth0`, with `addrs` in the bridge's /16 and `addrs6` in
    /// its IPv6 /64) onto the bridge (`port`); both ends with TX checksum offload off. The
    /// first IPv6 address is the one the namespace's own connections leave from (the others
    /// are deprecated: usable, never picked), as the first IPv4 address is the primary one.
    fn plug(&self, port: &str, ns: &str, addrs: &[Ipv4Addr], addrs6: &[Ipv6Addr]) -> Result<()> {
        let bridge = &self.bridge_ns;
        run(&[
            "ip", "-n", bridge, "link", "add", port, "type", "veth", "peer", "name", "eth0",
            "netns", ns,
        ])?;
        run(&["ip", "-n", bridge, "link", "set", port, "master", "br0"])?;
        run(&["ip", "-n", bridge, "link", "set", port, "up"])?;
        for a in addrs {
            run(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{a}/16"),
                "dev",
                "eth0",
            ])?;
        }
        for (i, a) in addrs6.iter().enumerate() {
            let a = format!("{a}/64");
            let mut cmd = vec!["ip", "-n", ns, "addr", "add", &a, "dev", "eth0", "nodad"];
            if i > 0 {
                cmd.extend_from_slice(&["preferred_lft", "0"]);
            }
            run(&cmd)?;
        }
        run(&["ip", "-n", ns, "link", "set", "eth0", "up"])?;
        checksum_offload_off(bridge, port)?;
        checksum_offload_off(ns, "eth0")
    }

    /// Routes the whole externalIP / LoadBalancer range from the client through node K (both
    /// ranges in a dual-stack lab).
    pub fn route_vips_via(&self, k: usize) -> Result<()> {
        self.route_via(VIP_RANGE, k)?;
        if self.dual_stack() {
            self.route_via(VIP_RANGE6, k)?;
        }
        Ok(())
    }

    /// Routes one externalIP / LoadBalancer IP (of either family) from the client through
    /// node K.
    pub fn route_vip_via(&self, vip: impl Into<IpAddr>, k: usize) -> Result<()> {
        match vip.into() {
            IpAddr::V4(a) => self.route_via(&format!("{a}/32"), k),
            IpAddr::V6(a) => self.route_via(&format!("{a}/128"), k),
        }
    }

    /// Routes `prefix` from the client through node K's address of the prefix's family.
    fn route_via(&self, prefix: &str, k: usize) -> Result<()> {
        let node = self.node(k)?;
        let via = if prefix.contains(':') {
            node.ip6
                .with_context(|| format!("{prefix}: the lab is not dual-stack"))?
                .to_string()
        } else {
            node.ip.to_string()
        };
        run(&[
            "ip",
            "-n",
            &self.client_ns,
            "route",
            "replace",
            prefix,
            "via",
            &via,
        ])?;
        Ok(())
    }

    pub fn node(&self, k: usize) -> Result<&ClusterNode> {
        self.nodes
            .get(k.wrapping_sub(1))
            .with_context(|| format!("no node {k} in the cluster"))
    }

    pub fn pod(&self, name: &str) -> Result<&ClusterPod> {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .with_context(|| format!("no pod {name} in the cluster"))
    }

    /// The pods of node K.
    pub fn pods_on(&self, k: usize) -> impl Iterator<Item = &ClusterPod> {
        self.pods.iter().filter(move |p| p.node == k)
    }

    /// The node a pod (by name) runs on.
    pub fn node_of(&self, pod: &str) -> Option<usize> {
        self.pods.iter().find(|p| p.name == pod).map(|p| p.node)
    }

    /// The node whose host-network server has this name ([`host_server_name`]).
    pub fn host_of(&self, server: &str) -> Option<usize> {
        self.nodes
            .iter()
            .find(|n| host_server_name(n.index) == server)
            .map(|n| n.index)
    }

    /// The addresses node K's host has in this cluster's network ([`node_addresses`]).
    pub fn node_addresses(&self, k: usize) -> Vec<Ipv4Addr> {
        node_addresses(self.network, k)
    }

    /// The IPv6 addresses node K's host has in this cluster's network, none unless the lab is
    /// dual-stack ([`node_addresses6`]).
    pub fn node_addresses6(&self, k: usize) -> Vec<Ipv6Addr> {
        if self.dual_stack() {
            node_addresses6(self.network, k)
        } else {
            Vec::new()
        }
    }

    /// The process ids of the lab's long-lived processes (servers, agents, tunnel relays),
    /// by what they are.
    pub fn processes(&self) -> Vec<(String, u32)> {
        self.children
            .iter()
            .map(|(what, child)| (what.clone(), child.id()))
            .collect()
    }

    /// A command that runs its arguments in network namespace `ns` and, if given, in cgroup
    /// `cgroup` (the shell moves itself there, then execs; `nsenter --net` keeps /sys/fs/bpf
    /// visible, unlike `ip netns exec`).
    fn command(&self, ns: &str, cgroup: Option<&Path>) -> Command {
        let nsenter = ["nsenter".to_string(), format!("--net=/run/netns/{ns}")];
        let mut cmd = if let Some(cg) = cgroup {
            let mut c = Command::new("sh");
            c.args(["-c", "echo $$ > \"$0\" && exec \"$@\""])
                .arg(cg.join("cgroup.procs"))
                .args(nsenter);
            c
        } else {
            let mut c = Command::new(&nsenter[0]);
            c.arg(&nsenter[1]);
            c
        };
        cmd.stdin(Stdio::null());
        if self.detached {
            // SAFETY: setsid(2) is async-signal-safe; the child leaves this process's session
            // so that it outlives it (and its terminal).
            unsafe {
                cmd.pre_exec(|| {
                    if libc::setsid() < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        cmd
    }

    /// Where a request from `origin` runs: namespace, cgroup, source address to bind.
    fn placement(&self, origin: &Origin) -> Result<(String, Option<PathBuf>, Option<IpAddr>)> {
        Ok(match origin {
            Origin::Pod(name) => {
                let pod = self.pod(name)?;
                let node = self.node(pod.node)?;
                (pod.ns.clone(), Some(node.cgroup.clone()), None)
            }
            Origin::Node(k) => {
                let node = self.node(*k)?;
                (node.ns.clone(), Some(node.cgroup.clone()), None)
            }
            Origin::Outside(ip) => (self.client_ns.clone(), None, Some((*ip).into())),
            Origin::Outside6(ip) => (self.client_ns.clone(), None, Some((*ip).into())),
        })
    }

    /// Starts `lab-server` in every pod and node 1's host-network server ([`host_server_name`]),
    /// each in its node's cgroup, and waits until each answers its node (on its IPv6 address
    /// too, in a dual-stack lab).
    pub fn start_servers(&mut self) -> Result<()> {
        let bin = binary("lab-server")?;
        for pod in self.pods.clone() {
            let node = self.node(pod.node)?.clone();
            let log = fs::File::create(self.dir.join(format!("{}.log", pod.name)))?;
            let child = self
                .command(&pod.ns, Some(&node.cgroup))
                .arg(&bin)
                .args([&pod.name, &HTTP_PORT.to_string(), &UDP_PORT.to_string()])
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("starting lab-server")?;
            self.children.push((format!("server {}", pod.name), child));
        }
        // Node 1's host-network server, in the node's namespace and cgroup.
        let node = self.node(1)?.clone();
        let name = host_server_name(1);
        let log = fs::File::create(self.dir.join(format!("{name}.log")))?;
        let child = self
            .command(&node.ns, Some(&node.cgroup))
            .arg(&bin)
            .args([
                &name,
                &services::HOST_SERVER_TCP.to_string(),
                &services::HOST_SERVER_UDP.to_string(),
            ])
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting lab-server")?;
        self.children.push((format!("server {name}"), child));

        let mut servers = Vec::new();
        for p in &self.pods {
            let ns = &self.nodes[p.node - 1].ns;
            let ips = [Some(IpAddr::V4(p.ip)), p.ip6.map(IpAddr::V6)];
            for ip in ips.into_iter().flatten() {
                let to = SocketAddr::from((ip, HTTP_PORT));
                servers.push((p.name.clone(), ns.clone(), to));
            }
        }
        for ip in [Some(IpAddr::V4(node.ip)), node.ip6.map(IpAddr::V6)]
            .into_iter()
            .flatten()
        {
            let to = SocketAddr::from((ip, services::HOST_SERVER_TCP));
            servers.push((name.clone(), node.ns.clone(), to));
        }
        for (name, ns, to) in servers {
            wait_for(Duration::from_secs(5), || {
                self.check_children()?;
                Ok(in_netns(&ns, move || {
                    std::net::TcpStream::connect_timeout(&to, Duration::from_millis(200))
                })
                .is_ok())
            })
            .with_context(|| format!("{name} does not answer on {to}"))?;
        }
        Ok(())
    }

    pub fn write_manifest(&self, name: &str, text: &str) -> Result<()> {
        write_manifest(&self.dir.join("manifests"), name, text)
    }

    pub fn remove_manifest(&self, name: &str) -> Result<()> {
        remove_manifest(&self.dir.join("manifests"), name)
    }

    /// Starts the pods' servers, writes [`default_manifests`], starts the agents and waits
    /// until they are healthy.
    pub fn start_all(&mut self) -> Result<()> {
        self.start_servers()?;
        self.write_default_manifests()?;
        self.start_agents()?;
        self.wait_healthy(Duration::from_secs(15))
    }

    /// Writes [`default_manifests`] for this cluster.
    pub fn write_default_manifests(&self) -> Result<()> {
        for (name, text) in default_manifests(&self.pods) {
            self.write_manifest(&name, &text)?;
        }
        Ok(())
    }

    /// Starts one `lb-agent run --manifests <the cluster's folder>` per node, in the node's
    /// namespace, with the node's cgroup for the socket-level hooks.
    pub fn start_agents(&mut self) -> Result<()> {
        let manifests = self.dir.join("manifests");
        for node in self.nodes.clone() {
            let cmd = self.command(&node.ns, Some(&self.agents_cgroup));
            let flags = AgentFlags {
                node_name: &node.name,
                ext_iface: "eth0",
                pin: &node.pin,
                cgroup: Some(&node.cgroup),
                ext_attach: self.ext_attach,
                fast_sweep: self.fast_sweep,
            };
            let mut args = vec!["--manifests".as_ref(), manifests.as_os_str()];
            args.extend(self.agent_args.iter().map(std::ffi::OsStr::new));
            let child = spawn_agent(cmd, &args, &flags, &self.agent_log_path(node.index))?;
            self.children.push((format!("agent {}", node.name), child));
        }
        Ok(())
    }

    fn agent_log_path(&self, k: usize) -> PathBuf {
        self.dir.join(format!("agent-node{k}.log"))
    }

    /// Node K's agent log.
    pub fn agent_log(&self, k: usize) -> String {
        fs::read_to_string(self.agent_log_path(k)).unwrap_or_default()
    }

    /// Waits until every node's agent answers 200 on /healthz (its datapath is programmed).
    pub fn wait_healthy(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        for k in 1..=self.nodes.len() {
            let ns = self.node(k)?.ns.clone();
            let left = deadline.saturating_duration_since(Instant::now());
            wait_for(left, || {
                self.check_children()?;
                Ok(agent_healthy(&ns))
            })
            .with_context(|| {
                format!("agent of node{k} not healthy; log:\n{}", self.agent_log(k))
            })?;
        }
        Ok(())
    }

    /// One request with `lab-client` from `origin` to `to` (IPv4, or IPv6 in a dual-stack
    /// lab): an HTTP GET on a new TCP connection, or one UDP datagram on a new socket; given
    /// up after `timeout`.
    pub fn request(
        &self,
        origin: &Origin,
        proto: Proto,
        to: impl Into<SocketAddr>,
        timeout: Duration,
    ) -> Outcome {
        match self.try_request(origin, proto, to.into(), timeout) {
            Ok(o) => o,
            Err(e) => Outcome::Failed(format!("{e:#}")),
        }
    }

    fn try_request(
        &self,
        origin: &Origin,
        proto: Proto,
        to: SocketAddr,
        timeout: Duration,
    ) -> Result<Outcome> {
        let (ns, cgroup, bind) = self.placement(origin)?;
        let mut cmd = self.command(&ns, cgroup.as_deref());
        cmd.arg(binary("lab-client")?)
            .arg(match proto {
                Proto::Tcp => "tcp",
                Proto::Udp => "udp",
            })
            .arg(to.to_string())
            .args(["--timeout-ms", &timeout.as_millis().to_string()]);
        if let Some(ip) = bind {
            cmd.args(["--bind", &ip.to_string()]);
        }
        let out = cmd.output().context("running lab-client")?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        Ok(match out.status.code() {
            Some(0) => parse_reply(stdout.trim()).unwrap_or_else(|| {
                Outcome::Failed(format!("unexpected output {:?}", stdout.trim()))
            }),
            Some(3) => Outcome::Timeout,
            Some(4) => Outcome::Refused,
            Some(5) => Outcome::Unreachable,
            _ => Outcome::Failed(format!(
                "{} ({})",
                String::from_utf8_lossy(&out.stderr).trim(),
                out.status
            )),
        })
    }

    /// Runs `program` with `args` where `origin` sends from (namespace, cgroup; an outside
    /// client's address is the caller's to bind); returns its output, whatever its status.
    pub fn run_from(
        &self,
        origin: &Origin,
        program: &Path,
        args: &[&str],
    ) -> Result<std::process::Output> {
        let (ns, cgroup, _) = self.placement(origin)?;
        let mut cmd = self.command(&ns, cgroup.as_deref());
        cmd.arg(program).args(args);
        cmd.output()
            .with_context(|| format!("running {}", program.display()))
    }

    /// Starts `program` with `args` as `origin` would run it (its namespace and cgroup), its
    /// output piped; the caller waits for it or kills it.
    pub fn spawn_from(&self, origin: &Origin, program: &Path, args: &[&str]) -> Result<Child> {
        let (ns, cgroup, _) = self.placement(origin)?;
        let mut cmd = self.command(&ns, cgroup.as_deref());
        cmd.arg(program)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd.spawn()
            .with_context(|| format!("starting {}", program.display()))
    }

    /// One HTTP request with curl from `origin`, on a new connection; returns the body.
    pub fn curl(&self, origin: &Origin, url: &str) -> Result<String> {
        let (ns, cgroup, bind) = self.placement(origin)?;
        let mut cmd = self.command(&ns, cgroup.as_deref());
        cmd.args(["curl", "-sS", "--max-time", "2", "-H", "Connection: close"]);
        if let Some(ip) = bind {
            cmd.args(["--interface", &ip.to_string()]);
        }
        let out = cmd.arg(url).output().context("running curl")?;
        if !out.status.success() {
            bail!(
                "curl {url} from {origin:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `lb-agent ARGS... --pin-path <node K's>` in node K's namespace; returns stdout.
    pub fn agent_cli(&self, k: usize, args: &[&str]) -> Result<String> {
        let node = self.node(k)?;
        agent_cli(&node.ns, &node.pin, args)
    }

    /// What teardown removes (for a state file or a report).
    pub fn state(&self) -> &ClusterState {
        &self.state
    }

    /// Leaves the cluster running (its processes too, when built `detached`) and returns
    /// what removes it later.
    pub fn detach(mut self) -> ClusterState {
        self.kept = true;
        self.state.clone()
    }
}

/// What an interface has received and sent, from `ip -s link`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkCounters {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
}

impl std::fmt::Display for LinkCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "RX {} packets {} bytes, TX {} packets {} bytes",
            self.rx_packets, self.rx_bytes, self.tx_packets, self.tx_bytes
        )
    }
}

/// The counters of interface `dev` in namespace `ns` (`ip -s -j link show`).
pub fn link_counters(ns: &str, dev: &str) -> Result<LinkCounters> {
    let out = run(&["ip", "-n", ns, "-s", "-j", "link", "show", "dev", dev])?;
    parse_link_counters(&out).with_context(|| format!("counters of {dev} in {ns}: {out}"))
}

fn parse_link_counters(json: &str) -> Result<LinkCounters> {
    let v: serde_json::Value = serde_json::from_str(json)?;
    let stats = &v[0]["stats64"];
    let n = |dir: &str, what: &str| {
        stats[dir][what]
            .as_u64()
            .with_context(|| format!("no stats64.{dir}.{what}"))
    };
    Ok(LinkCounters {
        rx_packets: n("rx", "packets")?,
        rx_bytes: n("rx", "bytes")?,
        tx_packets: n("tx", "packets")?,
        tx_bytes: n("tx", "bytes")?,
    })
}

/// `peer=ADDR reply=POD SEEN` from lab-client (addresses of either family, IPv6 ones as
/// `[ADDR]:PORT`).
fn parse_reply(line: &str) -> Option<Outcome> {
    let rest = line.strip_prefix("peer=")?;
    let (peer, reply) = rest.split_once(" reply=")?;
    let mut words = reply.split_whitespace();
    let backend = words.next()?.to_string();
    let seen = words.next()?.parse().ok()?;
    Some(Outcome::Reply {
        peer: peer.parse().ok()?,
        backend,
        seen,
    })
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for problem in self.state.teardown() {
            eprintln!("cluster {}: {problem}", self.tag);
        }
    }
}

/// The spec lines that give a Service its ClusterIP: `clusterIP` alone, or with an IPv6 twin
/// the fields the API server fills for a `PreferDualStack` Service in a dual-stack cluster.
fn cluster_ip_lines(v4: Ipv4Addr, v6: Option<Ipv6Addr>) -> String {
    match v6 {
        None => format!("  clusterIP: {v4}\n"),
        Some(v6) => format!(
            "  clusterIP: {v4}\n  clusterIPs: [\"{v4}\", \"{v6}\"]\n  \
             ipFamilyPolicy: PreferDualStack\n  ipFamilies: [IPv4, IPv6]\n"
        ),
    }
}

/// `["A", "B", ...]`: a YAML list of addresses or ranges, quoted.
fn yaml_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|i| format!("\"{i}\"")).collect();
    format!("[{}]", quoted.join(", "))
}

/// A LoadBalancer status with these ingress IPs.
fn ingress(ips: &[String]) -> String {
    let entries: Vec<String> = ips.iter().map(|ip| format!("{{ip: \"{ip}\"}}")).collect();
    format!(
        "status:\n  loadBalancer:\n    ingress: [{}]\n",
        entries.join(", ")
    )
}

/// A Service over the pods `selector` picks, with port 80/TCP → `http` and 53/UDP → `dns`;
/// its ClusterIP (and IPv6 twin, which makes it dual-stack); `node_ports` (TCP, UDP) for
/// NodePort and LoadBalancer Services; `spec` and `status` lines added as they are
/// (indented for their place).
fn service(
    name: &str,
    kind: &str,
    (cluster_ip, cluster_ip6): (Ipv4Addr, Option<Ipv6Addr>),
    selector: &str,
    node_ports: Option<(u16, u16)>,
    spec: &str,
    status: &str,
) -> String {
    let (tcp, udp) = match node_ports {
        Some((t, u)) => (format!(", nodePort: {t}"), format!(", nodePort: {u}")),
        None => (String::new(), String::new()),
    };
    let ips = cluster_ip_lines(cluster_ip, cluster_ip6);
    format!(
        r"---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  type: {kind}
{ips}  selector: {{{selector}}}
  ports:
  - {{name: http, port: 80, targetPort: http{tcp}}}
  - {{name: dns, port: 53, protocol: UDP, targetPort: dns{udp}}}
{spec}{status}"
    )
}

/// The lab's Services over `pods` (see [`services`]) and the Pods themselves (labels `app:
/// web`, `node: nodeK`, `pod: NAME`; the agent derives the endpoints from them, with their
/// `nodeName`), and the Services over node 1's host-network server with their
/// EndpointSlices, as three files.
///
/// When the pods have IPv6 addresses (a dual-stack lab), as a dual-stack cluster has them:
/// each Pod's `status.podIPs` holds both its addresses; every Service is `PreferDualStack`
/// with `ipFamilies: [IPv4, IPv6]` and both ClusterIPs, the IPv6 externalIPs, LoadBalancer
/// ingress IPs and source ranges beside the IPv4 ones; the host-network Services have a
/// second EndpointSlice, `addressType: IPv6`, with node 1's IPv6 address.
pub fn default_manifests(pods: &[ClusterPod]) -> Vec<(String, String)> {
    use services::{
        on_node, on_node6, on_node_tcp, on_node_udp, EXTERNAL, EXTERNAL6, EXTERNAL_IP,
        EXTERNAL_IP6, INTERNAL_LOCAL, INTERNAL_LOCAL6, LB, LB6, LB_IP, LB_IP6, LB_NODEPORT_TCP,
        LB_NODEPORT_UDP, LOCAL, LOCAL6, LOCAL_HEALTH_CHECK_NODEPORT, LOCAL_LB_IP, LOCAL_LB_IP6,
        LOCAL_NODEPORT_TCP, LOCAL_NODEPORT_UDP, SELF, SELF6, STICKY, STICKY6, WEB, WEB6,
        WEB_NODEPORT, WEB_NODEPORT6, WEB_NODEPORT_TCP, WEB_NODEPORT_UDP,
    };
    let dual_stack = pods.iter().any(|p| p.ip6.is_some());
    // A Service's ClusterIPs; the IPv6 twin only in a dual-stack lab.
    let ips = |v4: Ipv4Addr, v6: Ipv6Addr| (v4, dual_stack.then_some(v6));
    // A list of IPv4 items, with their IPv6 twins in a dual-stack lab.
    let both = |v4: &[String], v6: &[String]| -> Vec<String> {
        let mut all = v4.to_vec();
        if dual_stack {
            all.extend_from_slice(v6);
        }
        all
    };
    let mut docs = String::new();
    for p in pods {
        let pod_ips = match p.ip6 {
            Some(ip6) => format!("  podIPs: [{{ip: \"{}\"}}, {{ip: \"{ip6}\"}}]\n", p.ip),
            None => String::new(),
        };
        docs.push_str(&format!(
            r#"---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: default, labels: {{app: web, node: {node}, pod: {name}}}}}
spec:
  nodeName: {node}
  containers:
  - name: server
    image: lab-server
    ports:
    - {{name: http, containerPort: {HTTP_PORT}}}
    - {{name: dns, containerPort: {UDP_PORT}, protocol: UDP}}
status:
  phase: Running
  podIP: {ip}
{pod_ips}  conditions: [{{type: Ready, status: "True"}}]
"#,
            name = p.name,
            node = node_name(p.node),
            ip = p.ip
        ));
    }
    let first_pod = pod_name(1, 1);
    let first = format!("pod: {first_pod}");
    let mut svcs = String::new();
    svcs.push_str(&service(
        "web",
        "ClusterIP",
        ips(WEB, WEB6),
        "app: web",
        None,
        "",
        "",
    ));
    svcs.push_str(&service(
        "web-nodeport",
        "NodePort",
        ips(WEB_NODEPORT, WEB_NODEPORT6),
        "app: web",
        Some((WEB_NODEPORT_TCP, WEB_NODEPORT_UDP)),
        "  externalTrafficPolicy: Cluster\n",
        "",
    ));
    let external_ips = both(&[EXTERNAL_IP.to_string()], &[EXTERNAL_IP6.to_string()]);
    svcs.push_str(&service(
        "external",
        "ClusterIP",
        ips(EXTERNAL, EXTERNAL6),
        &first,
        None,
        &format!("  externalIPs: {}\n", yaml_list(&external_ips)),
        "",
    ));
    let ranges = both(
        &[
            format!("{CLIENT_IP}/32"),
            format!("{}/32", pod_ip(2, 1)),
            format!("{}/32", node_ip(2)),
        ],
        &[
            format!("{CLIENT_IP6}/128"),
            format!("{}/128", pod_ip6(2, 1)),
            format!("{}/128", node_ip6(2)),
        ],
    );
    svcs.push_str(&service(
        "lb",
        "LoadBalancer",
        ips(LB, LB6),
        &first,
        Some((LB_NODEPORT_TCP, LB_NODEPORT_UDP)),
        &format!("  loadBalancerSourceRanges: {}\n", yaml_list(&ranges)),
        &ingress(&both(&[LB_IP.to_string()], &[LB_IP6.to_string()])),
    ));
    svcs.push_str(&service(
        "local",
        "LoadBalancer",
        ips(LOCAL, LOCAL6),
        &format!("node: {}", node_name(1)),
        Some((LOCAL_NODEPORT_TCP, LOCAL_NODEPORT_UDP)),
        &format!(
            "  externalTrafficPolicy: Local\n  healthCheckNodePort: {LOCAL_HEALTH_CHECK_NODEPORT}\n"
        ),
        &ingress(&both(
            &[LOCAL_LB_IP.to_string()],
            &[LOCAL_LB_IP6.to_string()],
        )),
    ));
    svcs.push_str(&service(
        "self",
        "ClusterIP",
        ips(SELF, SELF6),
        &first,
        None,
        "",
        "",
    ));
    svcs.push_str(&service(
        "internal-local",
        "ClusterIP",
        ips(INTERNAL_LOCAL, INTERNAL_LOCAL6),
        &format!("node: {}", node_name(1)),
        None,
        "  internalTrafficPolicy: Local\n",
        "",
    ));
    svcs.push_str(&service(
        "sticky",
        "ClusterIP",
        ips(STICKY, STICKY6),
        "app: web",
        None,
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n",
        "",
    ));
    let nodes = pods.iter().map(|p| p.node).max().unwrap_or(0);
    for k in 1..=nodes {
        svcs.push_str(&service(
            &format!("on-node{k}"),
            "NodePort",
            ips(on_node(k), on_node6(k)),
            &format!("pod: {}", pod_name(k, 1)),
            Some((on_node_tcp(k), on_node_udp(k))),
            "",
            "",
        ));
    }
    let mut files = vec![
        ("pods.yaml".to_string(), docs),
        ("services.yaml".to_string(), svcs),
        (
            "host-network.yaml".to_string(),
            host_network_services(dual_stack),
        ),
    ];
    if dual_stack {
        files.push(("dual-stack.yaml".to_string(), dual_stack_services(pods)));
    }
    files
}

/// The Services only a dual-stack lab has (see [`services::DUAL`] and
/// [`services::DUAL_EMPTY`]): `dual`, `RequireDualStack`, whose endpoints are the pods of
/// node 1 in two EndpointSlices the lab writes, one per family (`dual-ipv4` with their IPv4
/// addresses, `dual-ipv6` with their IPv6 addresses; pods without an IPv6 address are left
/// out of both), and `dual-empty`, `RequireDualStack` without any endpoint.
fn dual_stack_services(pods: &[ClusterPod]) -> String {
    use services::{
        DUAL, DUAL6, DUAL_EMPTY, DUAL_EMPTY6, DUAL_EMPTY_NODEPORT_TCP, DUAL_EMPTY_NODEPORT_UDP,
        DUAL_EXTERNAL_IP, DUAL_EXTERNAL_IP6, DUAL_LB_IP, DUAL_LB_IP6, DUAL_NODEPORT_TCP,
        DUAL_NODEPORT_UDP,
    };
    // No selector (the endpoints are the slices below), so the target ports are numbers.
    let svc = |name: &str, kind: &str, v4: Ipv4Addr, v6: Ipv6Addr, (tcp, udp): (u16, u16)| {
        format!(
            r#"---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  type: {kind}
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIP: {v4}
  clusterIPs: ["{v4}", "{v6}"]
  externalTrafficPolicy: Cluster
  ports:
  - {{name: http, port: 80, protocol: TCP, targetPort: {HTTP_PORT}, nodePort: {tcp}}}
  - {{name: dns, port: 53, protocol: UDP, targetPort: {UDP_PORT}, nodePort: {udp}}}
"#
        )
    };
    let on_node1: Vec<&ClusterPod> = pods
        .iter()
        .filter(|p| p.node == 1 && p.ip6.is_some())
        .collect();
    let slice = |family: &str, addrs: Vec<(IpAddr, &str)>| {
        let mut text = format!(
            r"---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: dual-{lower}, namespace: default, labels: {{kubernetes.io/service-name: dual}}}}
addressType: {family}
ports:
- {{name: http, port: {HTTP_PORT}, protocol: TCP}}
- {{name: dns, port: {UDP_PORT}, protocol: UDP}}
endpoints:
",
            lower = family.to_ascii_lowercase()
        );
        for (addr, pod) in addrs {
            text.push_str(&format!(
                "- addresses: [\"{addr}\"]\n  conditions: {{ready: true}}\n  nodeName: {node}\n  \
                 targetRef: {{kind: Pod, namespace: default, name: {pod}}}\n",
                node = node_name(1)
            ));
        }
        text
    };
    let mut text = svc(
        "dual",
        "LoadBalancer",
        DUAL,
        DUAL6,
        (DUAL_NODEPORT_TCP, DUAL_NODEPORT_UDP),
    );
    text.push_str(&format!(
        "  externalIPs: {}\n{}",
        yaml_list(&[DUAL_EXTERNAL_IP.to_string(), DUAL_EXTERNAL_IP6.to_string()]),
        ingress(&[DUAL_LB_IP.to_string(), DUAL_LB_IP6.to_string()])
    ));
    text.push_str(&slice(
        "IPv4",
        on_node1
            .iter()
            .map(|p| (IpAddr::V4(p.ip), p.name.as_str()))
            .collect(),
    ));
    text.push_str(&slice(
        "IPv6",
        on_node1
            .iter()
            .filter_map(|p| Some((IpAddr::V6(p.ip6?), p.name.as_str())))
            .collect(),
    ));
    text.push_str(&svc(
        "dual-empty",
        "NodePort",
        DUAL_EMPTY,
        DUAL_EMPTY6,
        (DUAL_EMPTY_NODEPORT_TCP, DUAL_EMPTY_NODEPORT_UDP),
    ));
    text
}

/// `kubernetes` and `host-nodeport`, whose endpoint is node 1's host-network server: a
/// Service without a selector and its EndpointSlice each, the endpoint node 1's own address;
/// if `dual_stack`, dual-stack Services with a second EndpointSlice (`NAME-ipv6`, IPv6) naming
/// node 1's IPv6 address.
fn host_network_services(dual_stack: bool) -> String {
    use services::{
        HOST_NODEPORT, HOST_NODEPORT6, HOST_NODEPORT_TCP, HOST_NODEPORT_UDP, HOST_SERVER_TCP,
        HOST_SERVER_UDP, KUBERNETES, KUBERNETES6, KUBERNETES_TCP, KUBERNETES_UDP,
    };
    let slice = |name: &str, slice_name: &str, family: &str, addr: IpAddr| {
        format!(
            r#"---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {slice_name}, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: {family}
ports:
- {{name: https, port: {HOST_SERVER_TCP}, protocol: TCP}}
- {{name: dns, port: {HOST_SERVER_UDP}, protocol: UDP}}
endpoints:
- addresses: ["{addr}"]
  conditions: {{ready: true}}
  nodeName: {node}
"#,
            node = node_name(1),
        )
    };
    let svc =
        |name: &str, kind: &str, ip: Ipv4Addr, ip6: Ipv6Addr, node_ports: Option<(u16, u16)>| {
            let (tcp, udp) = match node_ports {
                Some((t, u)) => (format!(", nodePort: {t}"), format!(", nodePort: {u}")),
                None => (String::new(), String::new()),
            };
            let policy = if node_ports.is_some() {
                "  externalTrafficPolicy: Cluster\n"
            } else {
                ""
            };
            let ips = cluster_ip_lines(ip, dual_stack.then_some(ip6));
            let mut text = format!(
                r"---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  type: {kind}
{ips}  ports:
  - {{name: https, port: {KUBERNETES_TCP}, protocol: TCP, targetPort: {HOST_SERVER_TCP}{tcp}}}
  - {{name: dns, port: {KUBERNETES_UDP}, protocol: UDP, targetPort: {HOST_SERVER_UDP}{udp}}}
{policy}"
            );
            text.push_str(&slice(name, name, "IPv4", node_ip(1).into()));
            if dual_stack {
                let slice_name = format!("{name}-ipv6");
                text.push_str(&slice(name, &slice_name, "IPv6", node_ip6(1).into()));
            }
            text
        };
    let mut text = svc("kubernetes", "ClusterIP", KUBERNETES, KUBERNETES6, None);
    text.push_str(&svc(
        "host-nodeport",
        "NodePort",
        HOST_NODEPORT,
        HOST_NODEPORT6,
        Some((HOST_NODEPORT_TCP, HOST_NODEPORT_UDP)),
    ));
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_parse() {
        assert_eq!(
            parse_reply("peer=10.96.1.10:80 reply=node1-pod1 10.244.1.12:40000"),
            Some(Outcome::Reply {
                peer: "10.96.1.10:80".parse().expect("addr"),
                backend: "node1-pod1".into(),
                seen: "10.244.1.12:40000".parse().expect("addr"),
            })
        );
        assert_eq!(parse_reply("peer=10.96.1.10:80 reply=garbage"), None);
        assert_eq!(
            parse_reply("peer=[fd00:10:96::1:10]:80 reply=node1-pod1 [fd00:10:244:1::12]:40000"),
            Some(Outcome::Reply {
                peer: SocketAddr::from((services::WEB6, 80)),
                backend: "node1-pod1".into(),
                seen: SocketAddr::from((pod_ip6(1, 2), 40000)),
            })
        );
        assert_eq!(
            parse_reply("peer=fd00:10:96::1:10:80 reply=node1-pod1 [fd00::1]:1"),
            None
        );
    }

    #[test]
    fn ipv6_addresses_are_twins_of_the_ipv4_ones() {
        let pairs: [(IpAddr, Ipv6Addr); 12] = [
            (node_ip(1).into(), node_ip6(1)),
            (node_ip(9).into(), node_ip6(9)),
            (pod_ip(2, 1).into(), pod_ip6(2, 1)),
            (pod_gateway(12).into(), pod_gateway6(12)),
            (overlay_ip(3).into(), overlay_ip6(3)),
            (CLIENT_IP.into(), CLIENT_IP6),
            (DENIED_CLIENT_IP.into(), DENIED_CLIENT_IP6),
            (GATEWAY_IP.into(), GATEWAY_IP6),
            (services::WEB.into(), services::WEB6),
            (services::KUBERNETES.into(), services::KUBERNETES6),
            (services::on_node(2).into(), services::on_node6(2)),
            (services::LB_IP.into(), services::LB_IP6),
        ];
        let text: Vec<String> = pairs.iter().map(|(a, b)| format!("{a} {b}")).collect();
        assert_eq!(
            text,
            [
                "172.18.0.2 fd00:18::2",
                "172.18.0.10 fd00:18::10",
                "10.244.2.11 fd00:10:244:2::11",
                "10.244.12.1 fd00:10:244:12::1",
                "10.244.3.0 fd00:10:244:3::",
                "172.18.0.100 fd00:18::100",
                "172.18.0.200 fd00:18::200",
                "172.18.0.1 fd00:18::1",
                "10.96.1.10 fd00:10:96::1:10",
                "10.96.0.1 fd00:10:96::1",
                "10.96.1.102 fd00:10:96::1:102",
                "203.0.113.20 2001:db8::20",
            ]
        );
        assert_eq!(pod_cidr6(2), "fd00:10:244:2::/64");
        assert_eq!(
            HAIRPIN_SNAT_IP6.octets(),
            lb_common::ipv6_bytes(lb_common::HAIRPIN_SNAT_V6)
        );
        assert_eq!(
            node_addresses6(Network::Tunnel, 2),
            [node_ip6(2), pod_gateway6(2), overlay_ip6(2)]
        );
        assert_eq!(Network::Vxlan.overlay_device6(), Some(VXLAN6_DEVICE));
        assert_ne!(vxlan_mac(1), vxlan6_mac(1));
        // The largest lab's addresses are distinct and in their prefixes.
        let (nodes, pods) = plan("t", 90, 200, true);
        let ips: std::collections::BTreeSet<Ipv6Addr> = pods.iter().filter_map(|p| p.ip6).collect();
        assert_eq!(ips.len(), pods.len());
        assert!(pods.iter().all(|p| {
            p.ip6
                .is_some_and(|ip| ip.segments()[..4] == overlay_ip6(p.node).segments()[..4])
        }));
        assert_eq!(nodes[89].ip6, Some("fd00:18::91".parse().expect("addr")));
        let (nodes, pods) = plan("t", 2, 2, false);
        assert!(nodes.iter().all(|n| n.ip6.is_none()) && pods.iter().all(|p| p.ip6.is_none()));
    }

    #[test]
    fn networks_parse_and_link_counters_read() {
        for n in Network::ALL {
            assert_eq!(n.to_string().parse::<Network>(), Ok(n));
        }
        assert!("calico".parse::<Network>().is_err());
        assert_eq!(Network::default(), Network::Bridge);
        assert_eq!(
            node_addresses(Network::Vxlan, 2),
            [node_ip(2), pod_gateway(2), Ipv4Addr::new(10, 244, 2, 0)]
        );
        let json = r#"[{"ifname":"tun0","stats64":{"rx":{"bytes":10,"packets":1},"tx":{"bytes":30,"packets":3}}}]"#;
        assert_eq!(
            parse_link_counters(json).expect("parses"),
            LinkCounters {
                rx_packets: 1,
                rx_bytes: 10,
                tx_packets: 3,
                tx_bytes: 30
            }
        );
        assert!(parse_link_counters("[{}]").is_err());
    }

    #[test]
    fn default_manifests_give_each_service_its_endpoints() {
        use lb_control::{
            source::{manifests::parse_file, Objects},
            translate::{translate, NodeInfo},
        };
        let (_, pods) = plan("t", 2, 2, false);
        let mut objects = Objects::default();
        for (name, text) in default_manifests(&pods) {
            objects.extend(&parse_file(Path::new(&name), &text).expect("parses"));
        }
        // As node 2's agent sees them.
        let node = NodeInfo {
            name: node_name(2),
            addresses: vec![node_ip(2).into()],
            zone: None,
        };
        let t = translate(&objects, &node);
        assert!(t.warnings.is_empty(), "{:?}", t.warnings);
        let backends = |frontend: &str| -> Vec<String> {
            let (_, f) = t
                .desired
                .frontends
                .iter()
                .find(|(a, _)| a.to_string() == frontend)
                .unwrap_or_else(|| panic!("no frontend {frontend}"));
            f.backends.iter().map(|b| b.addr.to_string()).collect()
        };
        use services::*;
        assert_eq!(backends(&format!("{WEB}:80/TCP")).len(), 4);
        assert_eq!(backends(&format!("{WEB}:53/UDP")).len(), 4);
        assert_eq!(
            backends(&format!("{}:{}/UDP", node_ip(2), WEB_NODEPORT_UDP)).len(),
            4
        );
        assert_eq!(
            backends(&format!("{}:80/TCP", on_node(2))),
            ["10.244.2.11:8080/TCP"]
        );
        assert_eq!(
            backends(&format!("{SELF}:53/UDP")),
            ["10.244.1.11:5353/UDP"]
        );
        assert_eq!(
            backends(&format!("{EXTERNAL_IP}:80/TCP")),
            ["10.244.1.11:8080/TCP"]
        );
        assert_eq!(
            backends(&format!("{LB_IP}:53/UDP")),
            ["10.244.1.11:5353/UDP"]
        );
        // Host-network endpoints: node 1's own address.
        let host = |port: u16, proto: &str| format!("{}:{port}/{proto}", node_ip(1));
        assert_eq!(
            backends(&format!("{KUBERNETES}:{KUBERNETES_TCP}/TCP")),
            [host(HOST_SERVER_TCP, "TCP")]
        );
        assert_eq!(
            backends(&format!("{KUBERNETES}:{KUBERNETES_UDP}/UDP")),
            [host(HOST_SERVER_UDP, "UDP")]
        );
        assert_eq!(
            backends(&format!("{}:{HOST_NODEPORT_TCP}/TCP", node_ip(2))),
            [host(HOST_SERVER_TCP, "TCP")]
        );
        assert_eq!(
            backends(&format!("{}:{HOST_NODEPORT_UDP}/UDP", node_ip(2))),
            [host(HOST_SERVER_UDP, "UDP")]
        );
        // Traffic policy Local: node 2 has no endpoint of `local` for outside clients.
        assert!(backends(&format!("{LOCAL_LB_IP}:80/TCP")).is_empty());
        assert!(backends(&format!("{}:{LOCAL_NODEPORT_TCP}/TCP", node_ip(2))).is_empty());
        assert_eq!(backends(&format!("{LOCAL}:80/TCP")).len(), 2);
    }

    /// The dual-stack manifests: every Service dual-stack with both ClusterIPs and the IPv6
    /// twins of its addresses, Pods with both podIPs, an IPv6 EndpointSlice beside each IPv4
    /// one; and an agent that programs IPv4 only sees in them what it sees in the IPv4 ones.
    #[test]
    fn dual_stack_manifests_carry_ipv6_beside_the_same_ipv4() {
        use lb_control::{
            source::{manifests::parse_file, Objects},
            translate::{translate, NodeInfo},
        };
        let objects = |dual_stack: bool| {
            let (_, pods) = plan("t", 2, 2, dual_stack);
            let mut objects = Objects::default();
            // The Services only a dual-stack lab has are another test's.
            for (name, text) in default_manifests(&pods) {
                if name != "dual-stack.yaml" {
                    objects.extend(&parse_file(Path::new(&name), &text).expect("parses"));
                }
            }
            objects
        };
        let (v4, dual) = (objects(false), objects(true));
        assert_eq!(dual.services.len(), v4.services.len());
        for svc in &dual.services {
            let name = svc.metadata.name.clone().unwrap_or_default();
            let spec = svc.spec.as_ref().expect("spec");
            assert_eq!(
                spec.ip_family_policy.as_deref(),
                Some("PreferDualStack"),
                "{name}"
            );
            assert_eq!(
                spec.ip_families.as_deref(),
                Some(&["IPv4".to_string(), "IPv6".to_string()][..]),
                "{name}"
            );
            let ips = spec.cluster_ips.clone().expect("clusterIPs");
            assert_eq!(ips.len(), 2, "{name}");
            assert_eq!(Some(&ips[0]), spec.cluster_ip.as_ref(), "{name}");
            assert!(ips[1].parse::<Ipv6Addr>().is_ok(), "{name}: {ips:?}");
        }
        let svc = |name: &str| {
            dual.services
                .iter()
                .find(|s| s.metadata.name.as_deref() == Some(name))
                .and_then(|s| s.spec.clone())
                .expect("service")
        };
        assert_eq!(
            svc("web").cluster_ips,
            Some(vec![services::WEB.to_string(), services::WEB6.to_string()])
        );
        assert_eq!(
            svc("external").external_ips,
            Some(vec![
                services::EXTERNAL_IP.to_string(),
                services::EXTERNAL_IP6.to_string()
            ])
        );
        let ranges = svc("lb").load_balancer_source_ranges.expect("ranges");
        assert_eq!(ranges.len(), 6);
        assert!(ranges.contains(&format!("{CLIENT_IP6}/128")), "{ranges:?}");
        let lb = dual
            .services
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some("lb"))
            .expect("lb");
        let ingress: Vec<String> = lb
            .status
            .iter()
            .filter_map(|s| s.load_balancer.as_ref())
            .flat_map(|l| l.ingress.iter().flatten())
            .filter_map(|i| i.ip.clone())
            .collect();
        assert_eq!(
            ingress,
            [services::LB_IP.to_string(), services::LB_IP6.to_string()]
        );
        for pod in &dual.pods {
            let status = pod.status.as_ref().expect("status");
            let ips: Vec<String> = status
                .pod_ips
                .iter()
                .flatten()
                .map(|p| p.ip.clone())
                .collect();
            assert_eq!(ips.len(), 2, "{:?}", pod.metadata.name);
            assert_eq!(Some(&ips[0]), status.pod_ip.as_ref());
            assert!(ips[1].parse::<Ipv6Addr>().is_ok(), "{ips:?}");
        }
        let families: Vec<(String, String)> = dual
            .slices
            .iter()
            .map(|s| {
                let eps = s.endpoints.as_deref().unwrap_or_default();
                let addr = eps
                    .first()
                    .map(|e| e.addresses[0].clone())
                    .unwrap_or_default();
                (s.address_type.clone(), addr)
            })
            .collect();
        let (n1, n1v6) = (node_ip(1).to_string(), node_ip6(1).to_string());
        assert_eq!(
            families,
            [
                ("IPv4".to_string(), n1.clone()),
                ("IPv6".to_string(), n1v6.clone()),
                ("IPv4".to_string(), n1),
                ("IPv6".to_string(), n1v6),
            ]
        );
        // Their IPv4 side is what the IPv4 manifests give, and they add IPv6 frontends of
        // IPv6 endpoints only.
        let node = NodeInfo {
            name: node_name(2),
            addresses: vec![node_ip(2).into(), node_ip6(2).into()],
            zone: None,
        };
        let (t4, t6) = (translate(&v4, &node), translate(&dual, &node));
        assert!(t6.warnings.is_empty(), "{:?}", t6.warnings);
        fn pick<V: std::fmt::Debug>(
            m: &std::collections::BTreeMap<lb_control::model::L4Addr, V>,
            v6: bool,
        ) -> String {
            let of_family: Vec<_> = m.iter().filter(|(a, _)| a.addr.is_ipv6() == v6).collect();
            format!("{of_family:?}")
        }
        let of = |d: &lb_control::model::Desired, v6: bool| {
            (
                pick(&d.frontends, v6),
                pick(&d.pod_frontends, v6),
                pick(&d.serving, v6),
            )
        };
        assert_eq!(of(&t6.desired, false), of(&t4.desired, false));
        assert_eq!(
            of(&t4.desired, true),
            ("[]".into(), "[]".into(), "[]".into())
        );
        let v6 = &t6.desired.frontends;
        assert!(
            v6.keys().any(|a| a.addr.is_ipv6())
                && v6
                    .iter()
                    .filter(|(a, _)| a.addr.is_ipv6())
                    .all(|(_, f)| f.backends.iter().all(|b| b.addr.addr.is_ipv6())),
            "IPv6 frontends of IPv6 backends: {v6:?}"
        );
        // And the IPv4 manifests are as they always were: nothing of IPv6 in them.
        for (name, text) in default_manifests(&plan("t", 2, 2, false).1) {
            for word in [
                "IPv6",
                "ipFamil",
                "clusterIPs",
                "podIPs",
                "fd00:",
                "2001:db8",
            ] {
                assert!(!text.contains(word), "{name} has {word}");
            }
        }
    }
    /// `dual` and `dual-empty`, in the dual-stack lab only: both `RequireDualStack` with both
    /// ClusterIPs; `dual`'s two EndpointSlices name node 1's pods, one by their IPv4, the
    /// other by their IPv6 addresses; an agent that programs IPv4 gives `dual`'s IPv4
    /// ClusterIP, NodePort, externalIP and LB IP node 1's pods, and `dual-empty` no backend.
    #[test]
    fn dual_stack_only_services_require_both_families() {
        use lb_control::{
            source::{manifests::parse_file, Objects},
            translate::{translate, NodeInfo},
        };
        use services::*;
        let (_, v4_pods) = plan("t", 2, 2, false);
        assert!(default_manifests(&v4_pods)
            .iter()
            .all(|(name, _)| name != "dual-stack.yaml"));
        let (_, pods) = plan("t", 2, 2, true);
        let mut objects = Objects::default();
        for (name, text) in default_manifests(&pods) {
            objects.extend(&parse_file(Path::new(&name), &text).expect("parses"));
        }
        for (name, v4, v6) in [
            ("dual", DUAL, DUAL6),
            ("dual-empty", DUAL_EMPTY, DUAL_EMPTY6),
        ] {
            let spec = objects
                .services
                .iter()
                .find(|s| s.metadata.name.as_deref() == Some(name))
                .and_then(|s| s.spec.clone())
                .expect("service");
            assert_eq!(spec.ip_family_policy.as_deref(), Some("RequireDualStack"));
            assert_eq!(
                spec.ip_families,
                Some(vec!["IPv4".to_string(), "IPv6".to_string()])
            );
            assert_eq!(spec.cluster_ips, Some(vec![v4.to_string(), v6.to_string()]));
            assert!(spec.selector.is_none(), "{name}");
        }
        let slices: Vec<(String, Vec<String>)> = objects
            .slices
            .iter()
            .filter(|s| {
                s.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get("kubernetes.io/service-name"))
                    .is_some_and(|n| n.starts_with("dual"))
            })
            .map(|s| {
                let addrs = s.endpoints.iter().flatten();
                (
                    s.address_type.clone(),
                    addrs.map(|e| e.addresses[0].clone()).collect(),
                )
            })
            .collect();
        let text = |ips: &[IpAddr]| ips.iter().map(IpAddr::to_string).collect::<Vec<_>>();
        assert_eq!(
            slices,
            [
                (
                    "IPv4".to_string(),
                    text(&[pod_ip(1, 1).into(), pod_ip(1, 2).into()])
                ),
                (
                    "IPv6".to_string(),
                    text(&[pod_ip6(1, 1).into(), pod_ip6(1, 2).into()])
                ),
            ]
        );
        let node = NodeInfo {
            name: node_name(2),
            addresses: vec![node_ip(2).into()],
            zone: None,
        };
        let t = translate(&objects, &node);
        assert!(t.warnings.is_empty(), "{:?}", t.warnings);
        let backends = |frontend: String| -> Vec<String> {
            let (_, f) = t
                .desired
                .frontends
                .iter()
                .find(|(a, _)| a.to_string() == frontend)
                .unwrap_or_else(|| panic!("no frontend {frontend}"));
            f.backends.iter().map(|b| b.addr.to_string()).collect()
        };
        let node1_pods = ["10.244.1.11:8080/TCP", "10.244.1.12:8080/TCP"];
        assert_eq!(backends(format!("{DUAL}:80/TCP")), node1_pods);
        assert_eq!(
            backends(format!("{}:{DUAL_NODEPORT_TCP}/TCP", node_ip(2))),
            node1_pods
        );
        assert_eq!(backends(format!("{DUAL_EXTERNAL_IP}:80/TCP")), node1_pods);
        assert_eq!(
            backends(format!("{DUAL_LB_IP}:53/UDP")),
            ["10.244.1.11:5353/UDP", "10.244.1.12:5353/UDP"]
        );
        assert!(backends(format!("{DUAL_EMPTY}:80/TCP")).is_empty());
        assert!(backends(format!("{}:{DUAL_EMPTY_NODEPORT_UDP}/UDP", node_ip(2))).is_empty());
    }
}
