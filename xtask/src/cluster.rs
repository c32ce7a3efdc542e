//! `cargo xtask lab up` and `lab down`: the kind-like cluster of `lb_testkit::cluster`, left
//! running for people (and benchmarks) to use, and removed again.

use std::{
    net::{IpAddr, SocketAddr, SocketAddrV4},
    path::Path,
    time::Duration,
};

use anyhow::{bail, Result};
use lb_testkit::{
    cluster::{
        host_server_name, node_ip, overlay_ip, overlay_ip6, pod_cidr, pod_cidr6, pod_ip6,
        services::{
            on_node, on_node6, on_node_tcp, on_node_udp, DUAL, DUAL6, DUAL_EMPTY, DUAL_EMPTY6,
            DUAL_EMPTY_NODEPORT_TCP, DUAL_EMPTY_NODEPORT_UDP, DUAL_EXTERNAL_IP, DUAL_EXTERNAL_IP6,
            DUAL_LB_IP, DUAL_LB_IP6, DUAL_NODEPORT_TCP, DUAL_NODEPORT_UDP, EXTERNAL, EXTERNAL6,
            EXTERNAL_IP, EXTERNAL_IP6, HOST_NODEPORT, HOST_NODEPORT6, HOST_NODEPORT_TCP,
            HOST_NODEPORT_UDP, HOST_SERVER_TCP, HOST_SERVER_UDP, INTERNAL_LOCAL, INTERNAL_LOCAL6,
            KUBERNETES, KUBERNETES6, KUBERNETES_TCP, KUBERNETES_UDP, LB6, LB_IP, LB_IP6,
            LB_NODEPORT_TCP, LB_NODEPORT_UDP, LOCAL6, LOCAL_LB_IP, LOCAL_LB_IP6,
            LOCAL_NODEPORT_TCP, LOCAL_NODEPORT_UDP, SELF, SELF6, STICKY, STICKY6, WEB, WEB6,
            WEB_NODEPORT, WEB_NODEPORT6, WEB_NODEPORT_TCP, WEB_NODEPORT_UDP,
        },
        Cluster, ClusterConfig, ClusterState, Network, Origin, Proto, CLIENT_IP, CLIENT_IP6,
        DENIED_CLIENT_IP, DENIED_CLIENT_IP6, GATEWAY_IP, GATEWAY_IP6, HTTP_PORT, UDP_PORT,
        VIP_RANGE, VIP_RANGE6, VXLAN6_DEVICE, VXLAN6_MTU,
    },
    netns::bin_dir,
};

/// Where `up` records what it made, for `down`.
pub const STATE_FILE: &str = "/run/lb-lab/state.json";
/// The prefix of every name the lab has (namespaces `lblab-node1`, `lblab-client`, ...).
pub const TAG: &str = "lblab";

pub fn up(nodes: usize, pods: usize, network: Network, dual_stack: bool) -> Result<()> {
    let state_file = Path::new(STATE_FILE);
    if let Some(state) = ClusterState::load(state_file)? {
        bail!(
            "a lab is up already (tag {}, state in {STATE_FILE}): `cargo xtask lab down` first",
            state.tag
        );
    }
    let base = ClusterConfig::new(nodes, pods);
    let dual_stack = dual_stack && base.dual_stack;
    let stack = if dual_stack { ", dual-stack" } else { "" };
    println!(
        "Building the cluster: {nodes} nodes with {pods} pods each ({network} network{stack}), a client outside..."
    );
    let mut cluster = Cluster::up_with(ClusterConfig {
        tag: Some(TAG.to_string()),
        detached: true,
        state_file: Some(state_file.to_path_buf()),
        network,
        dual_stack,
        ..base
    })?;
    cluster.start_all()?;
    print_summary(&cluster);
    // Everything keeps running: the processes are in sessions of their own.
    cluster.detach();
    println!("\nState in {STATE_FILE}; remove it all with `cargo xtask lab down`.");
    Ok(())
}

pub fn down() -> Result<()> {
    let state = if let Some(s) = ClusterState::load(Path::new(STATE_FILE))? {
        s
    } else {
        println!("No state in {STATE_FILE}; removing whatever is named {TAG}-*.");
        ClusterState::by_tag(TAG)?
    };
    let problems = state.teardown();
    if !problems.is_empty() {
        bail!("some parts could not be removed:\n{}", problems.join("\n"));
    }
    println!("The lab is gone.");
    Ok(())
}

fn print_summary(c: &Cluster) {
    let bins = bin_dir();
    println!("\nThe cluster is up; every node runs lb-agent (healthy).\n\nNodes:");
    for n in &c.nodes {
        println!(
            "  {:<6} {:<12} netns {:<14} pods {:<14} cgroup {}\n         pins {}",
            n.name,
            n.ip,
            n.ns,
            pod_cidr(n.index),
            n.cgroup.display(),
            n.pin.display()
        );
        if let Some(ip6) = n.ip6 {
            println!(
                "         IPv6 {ip6} (eth0, /64), pods {}",
                pod_cidr6(n.index)
            );
        }
    }
    let network = c.network;
    match network.overlay_device() {
        None => println!(
            "\nNetwork: bridge (each node routes the other nodes' pod CIDRs via their node IPs)."
        ),
        Some(dev) => {
            let relay = if network == Network::Tunnel {
                ", one lab-tunnel relay per node (UDP 51820 on the node IP; logs tunnel-nodeK.log)"
            } else {
                ""
            };
            println!(
                "\nNetwork: {network}: pod CIDRs of other nodes through {dev} (node K: {} ... {}){relay}; \
                 node IPs over eth0.\n  Counters: ip -n {} -s link show {dev}",
                overlay_ip(1),
                overlay_ip(c.nodes.len()),
                c.nodes[0].ns,
            );
        }
    }
    if c.dual_stack() {
        let k = c.nodes.len();
        match network {
            Network::Bridge => println!(
                "IPv6: each node routes the other nodes' IPv6 pod CIDRs via their IPv6 addresses."
            ),
            Network::Vxlan => println!(
                "IPv6: IPv6 pod CIDRs of other nodes through {VXLAN6_DEVICE} (MTU {VXLAN6_MTU}, over the nodes' \
                 IPv6 addresses; node K: {} ... {}).",
                overlay_ip6(1),
                overlay_ip6(k)
            ),
            Network::Tunnel => println!(
                "IPv6: IPv6 pod CIDRs of other nodes through the same tun0 and relays (node K: {} ... {}).",
                overlay_ip6(1),
                overlay_ip6(k)
            ),
        }
    }
    println!(
        "\nPods (lab-server: HTTP on 8080, UDP echo on 5353, answering \"POD CLIENT-ADDRESS\"):"
    );
    for p in &c.pods {
        let ip6 = p.ip6.map(|a| a.to_string()).unwrap_or_default();
        println!("  {:<12} {:<12} netns {:<22} {ip6}", p.name, p.ip, p.ns);
    }
    println!(
        "\nOutside client: netns {}, addresses {CLIENT_IP} and {DENIED_CLIENT_IP}, \
         {VIP_RANGE} routed via node1; also the nodes' default gateway {GATEWAY_IP}.",
        c.client_ns
    );
    if c.dual_stack() {
        println!(
            "  IPv6: {CLIENT_IP6} and {DENIED_CLIENT_IP6}, {VIP_RANGE6} routed via node1; \
             the nodes' IPv6 gateway {GATEWAY_IP6}."
        );
    }
    let k = c.nodes.len();
    println!(
        "\nServices (each 80/TCP → 8080 and 53/UDP → 5353):
  web            ClusterIP {WEB}                        every pod
  web-nodeport   ClusterIP {WEB_NODEPORT}, NodePort {WEB_NODEPORT_TCP}/TCP {WEB_NODEPORT_UDP}/UDP   every pod
  external       ClusterIP {EXTERNAL}, externalIP {EXTERNAL_IP}     node1-pod1
  lb             LoadBalancer {LB_IP}, NodePort {LB_NODEPORT_TCP}/{LB_NODEPORT_UDP}, source ranges {CLIENT_IP}/32, node2-pod1, node2   node1-pod1
  local          LoadBalancer {LOCAL_LB_IP}, NodePort {LOCAL_NODEPORT_TCP}/{LOCAL_NODEPORT_UDP}, externalTrafficPolicy Local   node1's pods
  self           ClusterIP {SELF}                        node1-pod1
  internal-local ClusterIP {INTERNAL_LOCAL}, internalTrafficPolicy Local   node1's pods
  sticky         ClusterIP {STICKY}, sessionAffinity ClientIP 60 s   every pod
  on-node1..{k}    ClusterIP {}..{}, NodePort {}+K/TCP {}+K/UDP   nodeK-pod1
  kubernetes     ClusterIP {KUBERNETES}, {KUBERNETES_TCP}/TCP → {HOST_SERVER_TCP}, {KUBERNETES_UDP}/UDP → {HOST_SERVER_UDP}   {host} (node1's host network, {n1})
  host-nodeport  ClusterIP {HOST_NODEPORT}, NodePort {HOST_NODEPORT_TCP}/TCP {HOST_NODEPORT_UDP}/UDP   {host}",
        on_node(1),
        on_node(k),
        on_node_tcp(0),
        on_node_udp(0),
        host = host_server_name(1),
        n1 = node_ip(1),
    );
    if c.dual_stack() {
        println!(
            "\nIPv6 (the Services are dual-stack, PreferDualStack: the same pods on both families):
  web {WEB6}   web-nodeport {WEB_NODEPORT6}   external {EXTERNAL6}, externalIP {EXTERNAL_IP6}
  lb {LB6}, LoadBalancer {LB_IP6}, source ranges {CLIENT_IP6}/128, node2-pod1, node2
  local {LOCAL6}, LoadBalancer {LOCAL_LB_IP6}   self {SELF6}   internal-local {INTERNAL_LOCAL6}
  sticky {STICKY6}   on-node1..{k} {}..{}   kubernetes {KUBERNETES6}   host-nodeport {HOST_NODEPORT6}",
            on_node6(1),
            on_node6(k),
        );
        println!(
            "\nDual-stack Services (RequireDualStack, ipFamilies [IPv4, IPv6], both ClusterIPs; no \
             selector: EndpointSlices dual-ipv4 and dual-ipv6 name the same pods, node1's):"
        );
        let nodeports = |tcp: u16, udp: u16| format!("NodePort {tcp}/TCP {udp}/UDP");
        #[rustfmt::skip]
        let table = [
            ("family".to_string(), "dual (LoadBalancer, node1's pods)".to_string(), "dual-empty (NodePort, no endpoint: refused)".to_string()),
            ("IPv4".to_string(), format!("ClusterIP {DUAL}, externalIP {DUAL_EXTERNAL_IP}, LB IP {DUAL_LB_IP}"), format!("ClusterIP {DUAL_EMPTY}")),
            ("IPv6".to_string(), format!("ClusterIP {DUAL6}, externalIP {DUAL_EXTERNAL_IP6}, LB IP {DUAL_LB_IP6}"), format!("ClusterIP {DUAL_EMPTY6}")),
            ("both".to_string(), nodeports(DUAL_NODEPORT_TCP, DUAL_NODEPORT_UDP), nodeports(DUAL_EMPTY_NODEPORT_TCP, DUAL_EMPTY_NODEPORT_UDP)),
        ];
        for (family, dual, empty) in table {
            println!("  {family:<7} {dual:<72} {empty}");
        }
    }
    let client = &c.client_ns;
    let pod = &c.pods[0];
    let node1 = &c.nodes[0];
    println!(
        "\nTry:
  ip netns exec {client} curl http://{n1}:{WEB_NODEPORT_TCP}/
  ip netns exec {client} curl --max-time 2 --interface {DENIED_CLIENT_IP} http://{LB_IP}/   # not in the source ranges: dropped
  ip netns exec {client} ip route replace {VIP_RANGE} via {n2}   # LB IPs via another node
  ip netns exec {pod_ns} curl http://{WEB}/
  nsenter --net=/run/netns/{pod_ns} {bins}/lab-client udp {WEB}:53
  # node1's host network, in its cgroup (what the agent's socket hooks see):
  sh -c 'echo $$ > {cg}/cgroup.procs && exec nsenter --net=/run/netns/{node_ns} {bins}/lab-client tcp {WEB}:80'
  nsenter --net=/run/netns/{node_ns} {bins}/lb-agent services --pin-path {pin}
Manifests (the agents follow changes): {manifests}
Logs: {dir}",
        n1 = node1.ip,
        n2 = node_ip(k.min(2)),
        pod_ns = pod.ns,
        bins = bins.display(),
        cg = node1.cgroup.display(),
        node_ns = node1.ns,
        pin = node1.pin.display(),
        manifests = c.dir.join("manifests").display(),
        dir = c.dir.display(),
    );
    if let (Some(pod6), Some(n1v6)) = (pod.ip6, node1.ip6) {
        let other = pod_ip6(k.min(2), 1);
        println!(
            "  # IPv6, straight to pods and nodes:
  ip netns exec {client} curl http://[{n1v6}]:{HOST_SERVER_TCP}/
  ip netns exec {pod_ns} curl http://[{other}]:{HTTP_PORT}/
  nsenter --net=/run/netns/{node_ns} {bins}/lab-client udp [{pod6}]:{UDP_PORT}",
            pod_ns = pod.ns,
            node_ns = node1.ns,
            bins = bins.display(),
        );
    }
    println!("\nFirst requests:");
    let first = pod.name.clone();
    for (what, origin, proto, to) in [
        (
            format!("outside → node1 NodePort on-node1 {}", on_node_tcp(1)),
            Origin::Outside(CLIENT_IP),
            Proto::Tcp,
            SocketAddrV4::new(node1.ip, on_node_tcp(1)),
        ),
        (
            format!("{first} → ClusterIP web {WEB}:53"),
            Origin::Pod(first.clone()),
            Proto::Udp,
            SocketAddrV4::new(WEB, 53),
        ),
        (
            format!("node1 host → ClusterIP web {WEB}:80"),
            Origin::Node(1),
            Proto::Tcp,
            SocketAddrV4::new(WEB, 80),
        ),
    ] {
        let outcome = c.request(&origin, proto, to, Duration::from_secs(2));
        println!("  {what} ({proto}): {outcome}");
    }
    if let (Some(n1v6), Some(other)) = (node1.ip6, c.pods.last().and_then(|p| p.ip6)) {
        let last = c.pods.last().map(|p| p.name.clone()).unwrap_or_default();
        for (what, origin, proto, to) in [
            (
                format!("outside → node1's host server [{n1v6}]:{HOST_SERVER_TCP}"),
                Origin::Outside6(CLIENT_IP6),
                Proto::Tcp,
                SocketAddr::from((n1v6, HOST_SERVER_TCP)),
            ),
            (
                format!("{first} → pod {last} [{other}]:{UDP_PORT}"),
                Origin::Pod(first.clone()),
                Proto::Udp,
                SocketAddr::from((other, UDP_PORT)),
            ),
        ] {
            let outcome = c.request(&origin, proto, to, Duration::from_secs(2));
            println!("  {what} ({proto}, IPv6): {outcome}");
        }
        // Both families of the dual-stack Service.
        for (family, ip) in [("IPv4", IpAddr::from(DUAL)), ("IPv6", IpAddr::from(DUAL6))] {
            let to = SocketAddr::new(ip, 80);
            let outcome = c.request(
                &Origin::Pod(last.clone()),
                Proto::Tcp,
                to,
                Duration::from_secs(2),
            );
            println!(
                "  {last} → dual-stack Service dual, {family} ClusterIP {to} (TCP): {outcome}"
            );
        }
    }
}
