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

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
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
    add_netns, add_pod, agent_cli, agent_healthy, binary, checksum_offload_off, in_netns,
    remove_manifest, router_sysctls, run, spawn_agent, wait_for, write_manifest, AgentFlags,
    PodLink,
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
/// The L3 tunnel's TUN device, MTU and the UDP port its relays listen on (on the node IP).
pub const TUN_DEVICE: &str = "tun0";
pub const TUN_MTU: u16 = 1420;
pub const TUNNEL_PORT: u16 = 51820;

/// Node K's address on its overlay device: 10.244.K.0 (/32), as flannel and Calico number it.
pub fn overlay_ip(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, k as u8, 0)
}

/// The MAC of node K's `flannel.1` (flanneld keeps a random one in a node annotation; the lab
/// derives it from the node, so that captures read the same every time).
pub fn vxlan_mac(k: usize) -> String {
    format!("02:42:0a:f4:{:02x}:00", k as u8)
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

/// The Services the default manifests define (see [`default_manifests`]). Every Service over
/// pods has port 80/TCP (`http`, to the pods' 8080) and 53/UDP (`dns`, to the pods' 5353);
/// those over node 1's host-network server say their ports.
pub mod services {
    use std::net::Ipv4Addr;

    /// `web`: ClusterIP over every pod of every node.
    pub const WEB: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 10);
    /// `web-nodeport`: NodePort (externalTrafficPolicy Cluster) over every pod.
    pub const WEB_NODEPORT: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 11);
    pub const WEB_NODEPORT_TCP: u16 = 30080;
    pub const WEB_NODEPORT_UDP: u16 = 30053;
    /// `external`: ClusterIP with externalIPs [EXTERNAL_IP], endpoint node1-pod1.
    pub const EXTERNAL: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 12);
    pub const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
    /// `lb`: LoadBalancer with ingress LB_IP and loadBalancerSourceRanges [CLIENT_IP/32,
    /// node2-pod1's address/32, node 2's address/32], endpoint node1-pod1.
    pub const LB: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 13);
    pub const LB_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
    pub const LB_NODEPORT_TCP: u16 = 30090;
    pub const LB_NODEPORT_UDP: u16 = 30091;
    /// `local`: LoadBalancer with externalTrafficPolicy Local, ingress LOCAL_LB_IP, endpoints
    /// the pods of node 1 only.
    pub const LOCAL: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 14);
    pub const LOCAL_LB_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 30);
    pub const LOCAL_NODEPORT_TCP: u16 = 30092;
    pub const LOCAL_NODEPORT_UDP: u16 = 30093;
    pub const LOCAL_HEALTH_CHECK_NODEPORT: u16 = 30094;
    /// `self`: ClusterIP whose only endpoint is node1-pod1 (node1-pod1 reaching itself).
    pub const SELF: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 15);
    /// `internal-local`: ClusterIP with internalTrafficPolicy Local, endpoints the pods of
    /// node 1 only (clients on other nodes: dropped).
    pub const INTERNAL_LOCAL: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 17);
    /// `sticky`: ClusterIP with sessionAffinity ClientIP (timeout 60 s), every pod.
    pub const STICKY: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 18);

    /// Where node 1's host-network server (`node1-host`, not in a pod) listens, in node 1's
    /// namespace: the endpoint port of `kubernetes` and `host-nodeport`.
    pub const HOST_SERVER_TCP: u16 = 6443;
    pub const HOST_SERVER_UDP: u16 = 6053;
    /// `kubernetes`: the API server's ClusterIP, as on a one-node kind cluster, port 443/TCP
    /// (`https`) and 53/UDP (`dns`); its EndpointSlice names node 1's own address
    /// (HOST_SERVER_TCP / HOST_SERVER_UDP), a host-network endpoint.
    pub const KUBERNETES: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
    pub const KUBERNETES_TCP: u16 = 443;
    pub const KUBERNETES_UDP: u16 = 53;
    /// `host-nodeport`: NodePort (externalTrafficPolicy Cluster) whose endpoint is node 1's
    /// own address (a host-network pod serving a NodePort, e.g. an ingress controller).
    pub const HOST_NODEPORT: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 16);
    pub const HOST_NODEPORT_TCP: u16 = 30443;
    pub const HOST_NODEPORT_UDP: u16 = 30453;

    /// `on-nodeK`: NodePort whose only endpoint is node K's first pod (a backend on a chosen
    /// node, for the same-node and other-node cases).
    pub fn on_node(k: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 96, 1, 100 + k as u8)
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
}

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

/// The nodes and pods a cluster of this shape has, named for `tag`.
pub fn plan(tag: &str, nodes: usize, pods_per_node: usize) -> (Vec<ClusterNode>, Vec<ClusterPod>) {
    let node_list = (1..=nodes)
        .map(|k| ClusterNode {
            index: k,
            name: node_name(k),
            ns: format!("{tag}-node{k}"),
            ip: node_ip(k),
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
        let (nodes, pods) = plan(&tag, cfg.nodes, cfg.pods_per_node);
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
        add_netns(ns)
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
            self.plug(&format!("n{}", node.index), &node.ns, &[node.ip])?;
            router_sysctls(&node.ns)?;
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
        self.plug("c0", &client, &[CLIENT_IP, DENIED_CLIENT_IP, GATEWAY_IP])?;
        for node in &self.nodes {
            let gw = GATEWAY_IP.to_string();
            run(&["ip", "-n", &node.ns, "route", "add", "default", "via", &gw])?;
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
        }
        Ok(())
    }

    /// `flannel.1` on `node` and, for every other node, what flanneld programs: the route to
    /// its pod CIDR through its `flannel.1` address (onlink), that address's MAC (a permanent
    /// neighbour entry) and where that MAC is (an fdb entry: its node IP).
    fn vxlan(&self, node: &ClusterNode) -> Result<()> {
        let ns = node.ns.as_str();
        let ip = |args: &[&str]| -> Result<String> {
            let mut cmd = vec!["ip", "-n", ns];
            cmd.extend_from_slice(args);
            run(&cmd)
        };
        let (vni, port, mtu) = (
            VXLAN_VNI.to_string(),
            VXLAN_PORT.to_string(),
            VXLAN_MTU.to_string(),
        );
        let (local, mac) = (node.ip.to_string(), vxlan_mac(node.index));
        #[rustfmt::skip]
        ip(&["link", "add", VXLAN_DEVICE, "type", "vxlan", "id", &vni, "local", &local, "dev",
            "eth0", "dstport", &port, "nolearning"])?;
        ip(&["link", "set", VXLAN_DEVICE, "address", &mac, "mtu", &mtu])?;
        let addr = format!("{}/32", overlay_ip(node.index));
        ip(&["addr", "add", &addr, "dev", VXLAN_DEVICE])?;
        ip(&["link", "set", VXLAN_DEVICE, "up"])?;
        for other in self.nodes.iter().filter(|o| o.index != node.index) {
            let (gw, mac) = (overlay_ip(other.index).to_string(), vxlan_mac(other.index));
            let cidr = pod_cidr(other.index);
            #[rustfmt::skip]
            ip(&["route", "add", &cidr, "via", &gw, "dev", VXLAN_DEVICE, "onlink"])?;
            #[rustfmt::skip]
            ip(&["neigh", "replace", &gw, "lladdr", &mac, "dev", VXLAN_DEVICE, "nud", "permanent"])?;
            #[rustfmt::skip]
            run(&["bridge", "-n", ns, "fdb", "append", &mac, "dev", VXLAN_DEVICE, "dst",
                &other.ip.to_string(), "self", "permanent"])?;
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
        ip(&["link", "set", TUN_DEVICE, "up"])?;
        for other in self.nodes.iter().filter(|o| o.index != node.index) {
            ip(&["route", "add", &pod_cidr(other.index), "dev", TUN_DEVICE])?;
        }
        Ok(())
    }

    /// Starts one `lab-tunnel` per node, in the node's namespace and the lab's `network`
    /// cgroup, and waits until each has attached to its `tun0` (the device has a carrier).
    fn start_relays(&mut self) -> Result<()> {
        let bin = binary("lab-tunnel")?;
        for node in self.nodes.clone() {
            let listen = SocketAddrV4::new(node.ip, TUNNEL_PORT).to_string();
            let peers = self
                .nodes
                .iter()
                .filter(|o| o.index != node.index)
                .map(|o| format!("{}={}:{TUNNEL_PORT}", pod_cidr(o.index), o.ip));
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

    /// A veth from namespace `ns` (`eth0`, with `addrs` in the bridge's /16) onto the bridge
    /// (`port`); both ends with TX checksum offload off.
    fn plug(&self, port: &str, ns: &str, addrs: &[Ipv4Addr]) -> Result<()> {
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
        run(&["ip", "-n", ns, "link", "set", "eth0", "up"])?;
        checksum_offload_off(bridge, port)?;
        checksum_offload_off(ns, "eth0")
    }

    /// Routes the whole externalIP / LoadBalancer range from the client through node K.
    pub fn route_vips_via(&self, k: usize) -> Result<()> {
        self.route_via(VIP_RANGE, k)
    }

    /// Routes one externalIP / LoadBalancer IP from the client through node K.
    pub fn route_vip_via(&self, vip: Ipv4Addr, k: usize) -> Result<()> {
        self.route_via(&format!("{vip}/32"), k)
    }

    fn route_via(&self, prefix: &str, k: usize) -> Result<()> {
        let node = self.node(k)?;
        run(&[
            "ip",
            "-n",
            &self.client_ns,
            "route",
            "replace",
            prefix,
            "via",
            &node.ip.to_string(),
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
    fn placement(&self, origin: &Origin) -> Result<(String, Option<PathBuf>, Option<Ipv4Addr>)> {
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
            Origin::Outside(ip) => (self.client_ns.clone(), None, Some(*ip)),
        })
    }

    /// Starts `lab-server` in every pod and node 1's host-network server ([`host_server_name`]),
    /// each in its node's cgroup, and waits until each answers.
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

        let servers = self.pods.iter().map(|p| {
            let ns = self.nodes[p.node - 1].ns.clone();
            (p.name.clone(), ns, SocketAddr::from((p.ip, HTTP_PORT)))
        });
        let host = (
            name,
            node.ns.clone(),
            SocketAddr::from((node.ip, services::HOST_SERVER_TCP)),
        );
        for (name, ns, to) in servers.chain([host]).collect::<Vec<_>>() {
            wait_for(Duration::from_secs(5), || {
                self.check_children()?;
                Ok(in_netns(&ns, move || {
                    std::net::TcpStream::connect_timeout(&to, Duration::from_millis(200))
                })
                .is_ok())
            })
            .with_context(|| format!("{name} does not answer"))?;
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

    /// One request with `lab-client` from `origin` to `to`: an HTTP GET on a new TCP
    /// connection, or one UDP datagram on a new socket; given up after `timeout`.
    pub fn request(
        &self,
        origin: &Origin,
        proto: Proto,
        to: SocketAddrV4,
        timeout: Duration,
    ) -> Outcome {
        match self.try_request(origin, proto, to, timeout) {
            Ok(o) => o,
            Err(e) => Outcome::Failed(format!("{e:#}")),
        }
    }

    fn try_request(
        &self,
        origin: &Origin,
        proto: Proto,
        to: SocketAddrV4,
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

/// `peer=ADDR reply=POD SEEN` from lab-client.
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

/// A Service over the pods `selector` picks, with port 80/TCP → `http` and 53/UDP → `dns`;
/// `node_ports` (TCP, UDP) for NodePort and LoadBalancer Services; `spec` and `status` lines
/// added as they are (indented for their place).
fn service(
    name: &str,
    kind: &str,
    cluster_ip: Ipv4Addr,
    selector: &str,
    node_ports: Option<(u16, u16)>,
    spec: &str,
    status: &str,
) -> String {
    let (tcp, udp) = match node_ports {
        Some((t, u)) => (format!(", nodePort: {t}"), format!(", nodePort: {u}")),
        None => (String::new(), String::new()),
    };
    format!(
        r"---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  type: {kind}
  clusterIP: {cluster_ip}
  selector: {{{selector}}}
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
pub fn default_manifests(pods: &[ClusterPod]) -> Vec<(String, String)> {
    use services::{
        on_node, on_node_tcp, on_node_udp, EXTERNAL, EXTERNAL_IP, INTERNAL_LOCAL, LB, LB_IP,
        LB_NODEPORT_TCP, LB_NODEPORT_UDP, LOCAL, LOCAL_HEALTH_CHECK_NODEPORT, LOCAL_LB_IP,
        LOCAL_NODEPORT_TCP, LOCAL_NODEPORT_UDP, SELF, STICKY, WEB, WEB_NODEPORT, WEB_NODEPORT_TCP,
        WEB_NODEPORT_UDP,
    };
    let mut docs = String::new();
    for p in pods {
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
  conditions: [{{type: Ready, status: "True"}}]
"#,
            name = p.name,
            node = node_name(p.node),
            ip = p.ip
        ));
    }
    let first_pod = pod_name(1, 1);
    let first = format!("pod: {first_pod}");
    let mut svcs = String::new();
    svcs.push_str(&service("web", "ClusterIP", WEB, "app: web", None, "", ""));
    svcs.push_str(&service(
        "web-nodeport",
        "NodePort",
        WEB_NODEPORT,
        "app: web",
        Some((WEB_NODEPORT_TCP, WEB_NODEPORT_UDP)),
        "  externalTrafficPolicy: Cluster\n",
        "",
    ));
    svcs.push_str(&service(
        "external",
        "ClusterIP",
        EXTERNAL,
        &first,
        None,
        &format!("  externalIPs: [\"{EXTERNAL_IP}\"]\n"),
        "",
    ));
    svcs.push_str(&service(
        "lb",
        "LoadBalancer",
        LB,
        &first,
        Some((LB_NODEPORT_TCP, LB_NODEPORT_UDP)),
        &format!(
            "  loadBalancerSourceRanges: [\"{CLIENT_IP}/32\", \"{}/32\", \"{}/32\"]\n",
            pod_ip(2, 1),
            node_ip(2)
        ),
        &format!("status:\n  loadBalancer:\n    ingress: [{{ip: \"{LB_IP}\"}}]\n"),
    ));
    svcs.push_str(&service(
        "local",
        "LoadBalancer",
        LOCAL,
        &format!("node: {}", node_name(1)),
        Some((LOCAL_NODEPORT_TCP, LOCAL_NODEPORT_UDP)),
        &format!(
            "  externalTrafficPolicy: Local\n  healthCheckNodePort: {LOCAL_HEALTH_CHECK_NODEPORT}\n"
        ),
        &format!("status:\n  loadBalancer:\n    ingress: [{{ip: \"{LOCAL_LB_IP}\"}}]\n"),
    ));
    svcs.push_str(&service("self", "ClusterIP", SELF, &first, None, "", ""));
    svcs.push_str(&service(
        "internal-local",
        "ClusterIP",
        INTERNAL_LOCAL,
        &format!("node: {}", node_name(1)),
        None,
        "  internalTrafficPolicy: Local\n",
        "",
    ));
    svcs.push_str(&service(
        "sticky",
        "ClusterIP",
        STICKY,
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
            on_node(k),
            &format!("pod: {}", pod_name(k, 1)),
            Some((on_node_tcp(k), on_node_udp(k))),
            "",
            "",
        ));
    }
    vec![
        ("pods.yaml".to_string(), docs),
        ("services.yaml".to_string(), svcs),
        ("host-network.yaml".to_string(), host_network_services()),
    ]
}

/// `kubernetes` and `host-nodeport`, whose endpoint is node 1's host-network server: a
/// Service without a selector and its EndpointSlice each, the endpoint node 1's own address.
fn host_network_services() -> String {
    use services::{
        HOST_NODEPORT, HOST_NODEPORT_TCP, HOST_NODEPORT_UDP, HOST_SERVER_TCP, HOST_SERVER_UDP,
        KUBERNETES, KUBERNETES_TCP, KUBERNETES_UDP,
    };
    let svc = |name: &str, kind: &str, ip: Ipv4Addr, node_ports: Option<(u16, u16)>| {
        let (tcp, udp) = match node_ports {
            Some((t, u)) => (format!(", nodePort: {t}"), format!(", nodePort: {u}")),
            None => (String::new(), String::new()),
        };
        let policy = if node_ports.is_some() {
            "  externalTrafficPolicy: Cluster\n"
        } else {
            ""
        };
        format!(
            r#"---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  type: {kind}
  clusterIP: {ip}
  ports:
  - {{name: https, port: {KUBERNETES_TCP}, protocol: TCP, targetPort: {HOST_SERVER_TCP}{tcp}}}
  - {{name: dns, port: {KUBERNETES_UDP}, protocol: UDP, targetPort: {HOST_SERVER_UDP}{udp}}}
{policy}---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv4
ports:
- {{name: https, port: {HOST_SERVER_TCP}, protocol: TCP}}
- {{name: dns, port: {HOST_SERVER_UDP}, protocol: UDP}}
endpoints:
- addresses: ["{addr}"]
  conditions: {{ready: true}}
  nodeName: {node}
"#,
            addr = node_ip(1),
            node = node_name(1),
        )
    };
    let mut text = svc("kubernetes", "ClusterIP", KUBERNETES, None);
    text.push_str(&svc(
        "host-nodeport",
        "NodePort",
        HOST_NODEPORT,
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
        let (_, pods) = plan("t", 2, 2);
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
}
