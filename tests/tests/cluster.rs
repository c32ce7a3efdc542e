//! The reachability matrix in a two-node, kind-like lab (`lb_testkit::cluster`): pods, node
//! host namespaces and a client outside the cluster send TCP and UDP to ClusterIPs,
//! NodePorts, externalIPs and LoadBalancer IPs, and each row checks which backend answered,
//! which source address it saw and, for host clients, what their socket says it talked to.
//! The matrix is printed as a markdown table. Needs root and the workspace's binaries
//! (`cargo build`).
//!
//! The lab is dual-stack, as kind's `ipFamily: dual` (`ClusterConfig::dual_stack`;
//! `LB_LAB_DUAL_STACK=0` makes every cluster here IPv4 only): the IPv4 matrix runs on it and
//! on an IPv4-only lab of each network, `reachability_matrix_over_ipv6` runs its IPv6 twin,
//! and `dual_stack_lab_carries_ipv6_between_pods_nodes_and_the_client` checks the lab's IPv6
//! (rows without a Service) in each network.
// Harness code: a lab that cannot be built panics with a message, arguments are passed as
// the call sites read best, and floats are compared exactly where they were parsed.
#![allow(
    clippy::needless_pass_by_value,
    clippy::missing_panics_doc,
    clippy::float_cmp,
    clippy::unused_self
)]

use std::{
    net::{IpAddr, SocketAddr, SocketAddrV4},
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use lb_testkit::{
    cluster::{
        host_server_name, node_addresses, node_addresses6, node_ip, node_ip6, pod_ip, pod_ip6,
        services::*, Cluster, ClusterConfig, ClusterState, LinkCounters, Network, Origin, Outcome,
        Proto, CLIENT_IP, CLIENT_IP6, DENIED_CLIENT_IP, DENIED_CLIENT_IP6, HAIRPIN_SNAT_IP,
        HAIRPIN_SNAT_IP6, HTTP_PORT, UDP_PORT,
    },
    require_root,
};

/// Rows time out on purpose (drops): one cluster at a time on a 2-core machine.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn turn() -> MutexGuard<'static, ()> {
    // A test that failed while holding the lock poisons it; the next may still run.
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How long an answer may take, and how long a drop is waited for.
const ANSWER: Duration = Duration::from_secs(2);
const DROP: Duration = Duration::from_millis(1500);
/// Requests in flight at once.
const PARALLEL: usize = 8;

/// Who should answer a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Server {
    /// A pod of node K.
    PodOf(usize),
    /// Node K's host-network server (`host_server_name(K)`).
    HostOf(usize),
}

impl std::fmt::Display for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Server::PodOf(k) => write!(f, "node{k}"),
            Server::HostOf(k) => f.write_str(&host_server_name(*k)),
        }
    }
}

#[derive(Clone, Debug)]
enum Expect {
    /// An answer from `server`, which saw one of `sources`; if `peer`, the client's socket
    /// names the address it sent to (getpeername / recvfrom).
    Answer {
        server: Server,
        sources: Vec<IpAddr>,
        peer: bool,
    },
    /// Dropped: no answer (a timeout, not a refusal).
    Dropped,
    /// Refused: TCP RST, or ICMP / ICMPv6 port unreachable (a Service without endpoints).
    Refused,
}

impl std::fmt::Display for Expect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Expect::Answer {
                server,
                sources,
                peer,
            } => {
                let s: Vec<String> = sources.iter().map(IpAddr::to_string).collect();
                write!(f, "{server} sees {}", s.join(" or "))?;
                if *peer {
                    f.write_str("; peer = destination")?;
                }
                Ok(())
            }
            Expect::Dropped => f.write_str("dropped (timeout)"),
            Expect::Refused => f.write_str("refused"),
        }
    }
}

#[derive(Clone, Debug)]
struct Row {
    client: String,
    origin: Origin,
    destination: String,
    proto: Proto,
    to: SocketAddr,
    expect: Expect,
    /// The node the client's routes send externalIPs and LoadBalancer IPs through.
    vips_via: usize,
    /// No Service on the way (nothing for the datapath to translate): a row that checks the
    /// lab itself.
    direct: bool,
}

struct Result_ {
    row: Row,
    outcome: Outcome,
    pass: bool,
}

fn check(row: &Row, outcome: &Outcome, cluster: &Cluster) -> bool {
    match (&row.expect, outcome) {
        (
            Expect::Answer {
                server,
                sources,
                peer: want_peer,
            },
            Outcome::Reply {
                peer,
                backend,
                seen,
            },
        ) => {
            let answered_by = match server {
                Server::PodOf(k) => cluster.node_of(backend) == Some(*k),
                Server::HostOf(k) => cluster.host_of(backend) == Some(*k),
            };
            answered_by && sources.contains(&seen.ip()) && (!want_peer || *peer == row.to)
        }
        (Expect::Dropped, Outcome::Timeout) | (Expect::Refused, Outcome::Refused) => true,
        _ => false,
    }
}

/// The same row over TCP and UDP: `dst` is (address, TCP port, UDP port).
fn both(
    rows: &mut Vec<Row>,
    client: &str,
    origin: Origin,
    destination: &str,
    (ip, tcp, udp): (impl Into<IpAddr>, u16, u16),
    expect: Expect,
    vips_via: usize,
) {
    let ip = ip.into();
    for (proto, port) in [(Proto::Tcp, tcp), (Proto::Udp, udp)] {
        rows.push(Row {
            client: client.to_string(),
            origin: origin.clone(),
            destination: destination.to_string(),
            proto,
            to: SocketAddr::new(ip, port),
            expect: expect.clone(),
            vips_via,
            direct: false,
        });
    }
}

fn at<A: Into<IpAddr>>(ip: A, (tcp, udp): (u16, u16)) -> (A, u16, u16) {
    (ip, tcp, udp)
}

/// Addresses of either family as `IpAddr`s.
fn ips<A: Into<IpAddr> + Copy>(addrs: &[A]) -> Vec<IpAddr> {
    addrs.iter().map(|&a| a.into()).collect()
}

fn answer<A: Into<IpAddr> + Copy>(node: usize, sources: &[A]) -> Expect {
    Expect::Answer {
        server: Server::PodOf(node),
        sources: ips(sources),
        peer: false,
    }
}

/// An answer from `server`, which saw one of `sources`, to a socket that names the address
/// it sent to.
fn answer_peer<A: Into<IpAddr> + Copy>(server: Server, sources: &[A]) -> Expect {
    Expect::Answer {
        server,
        sources: ips(sources),
        peer: true,
    }
}

/// Rows without a Service: pods, hosts and the client reach pods and node 1's host-network
/// server by their own addresses. Nothing is translated, so they check the lab (routes, the
/// overlay, the servers) and tell a broken lab from a datapath that fails a Service row.
fn direct_rows(network: Network) -> Vec<Row> {
    let mut rows = Vec::new();
    let pod = |name: &str| Origin::Pod(name.to_string());
    let pod_ports = (HTTP_PORT, UDP_PORT);
    let host = (node_ip(1), HOST_SERVER_TCP, HOST_SERVER_UDP);
    #[rustfmt::skip]
    let to_pods = [
        ("pod node1-pod1", pod("node1-pod1"), "direct: pod node2-pod1 (other node)", 2, vec![pod_ip(1, 1)]),
        ("pod node2-pod2", pod("node2-pod2"), "direct: pod node1-pod2 (other node)", 1, vec![pod_ip(2, 2)]),
        ("host node1", Origin::Node(1), "direct: pod node2-pod1 (other node)", 2, node_addresses(network, 1)),
    ];
    for (client, origin, dest, k, seen) in to_pods {
        let expect = answer_peer(Server::PodOf(k), &seen);
        let ip = if k == 2 { pod_ip(2, 1) } else { pod_ip(1, 2) };
        both(
            &mut rows,
            client,
            origin,
            dest,
            at(ip, pod_ports),
            expect,
            1,
        );
    }
    #[rustfmt::skip]
    let to_host = [
        ("outside", Origin::Outside(CLIENT_IP), vec![CLIENT_IP]),
        ("pod node2-pod1", pod("node2-pod1"), vec![pod_ip(2, 1)]),
        ("host node2", Origin::Node(2), node_addresses(network, 2)),
    ];
    for (client, origin, seen) in to_host {
        let expect = answer_peer(Server::HostOf(1), &seen);
        let dest = "direct: node1-host (node1's own address)";
        both(&mut rows, client, origin, dest, host, expect, 1);
    }
    for r in &mut rows {
        r.direct = true;
    }
    rows
}

/// [`direct_rows`] in IPv6, for a dual-stack lab of `network` with two pods per node: pods
/// reach pods of their own and of the other node, node hosts reach pods, and the outside
/// client, pods and node 2's host reach node 1's host-network server, each by its IPv6
/// address (no Service, nothing translated).
fn direct_rows6(network: Network) -> Vec<Row> {
    let mut rows = Vec::new();
    let pod = |name: &str| Origin::Pod(name.to_string());
    let pod_ports = (HTTP_PORT, UDP_PORT);
    let (n1, n2) = (node_addresses6(network, 1), node_addresses6(network, 2));
    #[rustfmt::skip]
    let to_pods = [
        ("pod node1-pod1", pod("node1-pod1"), (1, 2), "same node", vec![pod_ip6(1, 1)]),
        ("pod node1-pod1", pod("node1-pod1"), (2, 1), "other node", vec![pod_ip6(1, 1)]),
        ("pod node2-pod2", pod("node2-pod2"), (1, 2), "other node", vec![pod_ip6(2, 2)]),
        ("host node1", Origin::Node(1), (1, 1), "same node", n1.clone()),
        ("host node1", Origin::Node(1), (2, 1), "other node", n1),
        ("host node2", Origin::Node(2), (1, 2), "other node", n2.clone()),
    ];
    for (client, origin, (k, i), what, seen) in to_pods {
        let dest = format!("direct IPv6: pod node{k}-pod{i} ({what})");
        let expect = answer_peer(Server::PodOf(k), &seen);
        let to = at(pod_ip6(k, i), pod_ports);
        both(&mut rows, client, origin, &dest, to, expect, 1);
    }
    let host = (node_ip6(1), HOST_SERVER_TCP, HOST_SERVER_UDP);
    #[rustfmt::skip]
    let to_host = [
        ("outside", Origin::Outside6(CLIENT_IP6), vec![CLIENT_IP6]),
        ("pod node1-pod2 (same node)", pod("node1-pod2"), vec![pod_ip6(1, 2)]),
        ("pod node2-pod1 (other node)", pod("node2-pod1"), vec![pod_ip6(2, 1)]),
        ("host node2", Origin::Node(2), n2),
    ];
    for (client, origin, seen) in to_host {
        let expect = answer_peer(Server::HostOf(1), &seen);
        let dest = "direct IPv6: node1-host (node1's own IPv6 address)";
        both(&mut rows, client, origin, dest, host, expect, 1);
    }
    for r in &mut rows {
        r.direct = true;
    }
    rows
}

fn matrix(network: Network) -> Vec<Row> {
    let mut rows = direct_rows(network);
    let pod = |name: &str| Origin::Pod(name.to_string());
    let outside = Origin::Outside(CLIENT_IP);
    let denied = Origin::Outside(DENIED_CLIENT_IP);
    let svc = (80, 53);
    let on_node_ports = |k: usize| (on_node_tcp(k), on_node_udp(k));
    let node1_addrs = node_addresses(network, 1);

    // Pods → ClusterIP.
    let n1p2 = pod_ip(1, 2);
    #[rustfmt::skip]
    let pod_rows = [
        ("pod node1-pod2", "node1-pod2", "ClusterIP on-node1 (same node)", on_node(1), 1, n1p2),
        ("pod node1-pod2", "node1-pod2", "ClusterIP on-node2 (other node)", on_node(2), 2, n1p2),
        ("pod node2-pod2", "node2-pod2", "ClusterIP on-node1 (other node)", on_node(1), 1, pod_ip(2, 2)),
        ("pod node1-pod1", "node1-pod1", "ClusterIP self (itself: hairpin)", SELF, 1, HAIRPIN_SNAT_IP),
    ];
    for (client, name, dest, ip, node, seen) in pod_rows {
        both(
            &mut rows,
            client,
            pod(name),
            dest,
            at(ip, svc),
            answer(node, &[seen]),
            1,
        );
    }

    // Node 1's host network namespace (in its cgroup) → ClusterIP and its own NodePorts.
    for (dest, k) in [
        ("ClusterIP on-node1 (local backend)", 1),
        ("ClusterIP on-node2 (remote backend)", 2),
    ] {
        let expect = answer_peer(Server::PodOf(k), &node1_addrs);
        both(
            &mut rows,
            "host node1",
            Origin::Node(1),
            dest,
            at(on_node(k), svc),
            expect,
            1,
        );
    }
    for (dest, k) in [
        ("own NodePort on-node1 (local backend)", 1),
        ("own NodePort on-node2 (remote backend)", 2),
    ] {
        let expect = answer(k, &node1_addrs);
        let ports = on_node_ports(k);
        both(
            &mut rows,
            "host node1",
            Origin::Node(1),
            dest,
            at(node_ip(1), ports),
            expect,
            1,
        );
    }

    // Outside → NodePorts (externalTrafficPolicy Cluster).
    for (node, backend) in [(1, 1), (2, 2), (1, 2), (2, 1)] {
        let (what, seen) = if node == backend {
            ("local backend", CLIENT_IP)
        } else {
            ("remote backend", node_ip(node))
        };
        let dest = format!("node{node} NodePort on-node{backend} ({what})");
        let ports = on_node_ports(backend);
        let expect = answer(backend, &[seen]);
        both(
            &mut rows,
            "outside",
            outside.clone(),
            &dest,
            at(node_ip(node), ports),
            expect,
            1,
        );
    }

    // Host-network endpoints: node1-host, node 1's own address, behind `kubernetes`
    // (ClusterIP) and `host-nodeport` (NodePort). Pods keep their address (kube-proxy does
    // not SNAT pod sources for a ClusterIP); a host client is seen as for a ClusterIP to a
    // remote pod; the outside client as for a NodePort to a local / remote endpoint.
    let kubernetes = (KUBERNETES, KUBERNETES_TCP, KUBERNETES_UDP);
    for (name, what) in [("node1-pod1", "same node"), ("node2-pod1", "other node")] {
        let seen = if name == "node1-pod1" {
            pod_ip(1, 1)
        } else {
            pod_ip(2, 1)
        };
        both(
            &mut rows,
            &format!("pod {name}"),
            pod(name),
            &format!("ClusterIP kubernetes (host-network endpoint, {what})"),
            kubernetes,
            answer_peer(Server::HostOf(1), &[seen]),
            1,
        );
    }
    both(
        &mut rows,
        "host node2",
        Origin::Node(2),
        "ClusterIP kubernetes (remote host-network endpoint)",
        kubernetes,
        answer_peer(Server::HostOf(1), &node_addresses(network, 2)),
        1,
    );
    for (node, what, seen) in [(1, "local", CLIENT_IP), (2, "remote", node_ip(2))] {
        both(
            &mut rows,
            "outside",
            outside.clone(),
            &format!("node{node} NodePort host-nodeport ({what} host-network endpoint)"),
            (node_ip(node), HOST_NODEPORT_TCP, HOST_NODEPORT_UDP),
            answer_peer(Server::HostOf(1), &[seen]),
            1,
        );
    }

    // Outside → externalIP and LoadBalancer IP (endpoint on node 1), through each node.
    for (name, ip) in [("externalIP", EXTERNAL_IP), ("LB IP", LB_IP)] {
        for (via, seen) in [(1, CLIENT_IP), (2, node_ip(2))] {
            let what = if via == 1 { "local" } else { "remote" };
            let dest = format!("{name} {ip} via node{via} ({what} backend)");
            let expect = answer(1, &[seen]);
            both(
                &mut rows,
                "outside",
                outside.clone(),
                &dest,
                at(ip, svc),
                expect,
                via,
            );
        }
    }

    // externalTrafficPolicy Local, endpoints on node 1 only.
    let local_ports = (LOCAL_NODEPORT_TCP, LOCAL_NODEPORT_UDP);
    let client = answer(1, &[CLIENT_IP]);
    #[rustfmt::skip]
    let local_rows = [
        ("ETP Local: node1 NodePort (has endpoints)", node_ip(1), local_ports, client.clone(), 1),
        ("ETP Local: node2 NodePort (no local endpoint)", node_ip(2), local_ports, Expect::Dropped, 1),
        ("ETP Local: LB IP via node1 (has endpoints)", LOCAL_LB_IP, svc, client, 1),
        ("ETP Local: LB IP via node2 (no local endpoint)", LOCAL_LB_IP, svc, Expect::Dropped, 2),
    ];
    for (dest, ip, ports, expect, via) in local_rows {
        both(
            &mut rows,
            "outside",
            outside.clone(),
            dest,
            at(ip, ports),
            expect,
            via,
        );
    }
    let n2p1 = pod_ip(2, 1);
    for (dest, ip, ports) in [
        ("ETP Local: own node2's NodePort", node_ip(2), local_ports),
        ("ETP Local: LB IP", LOCAL_LB_IP, svc),
    ] {
        let expect = answer(1, &[n2p1]);
        both(
            &mut rows,
            "pod node2-pod1",
            pod("node2-pod1"),
            dest,
            at(ip, ports),
            expect,
            1,
        );
    }

    // loadBalancerSourceRanges: the LB IP for allowed sources only; NodePorts for all.
    let dest = "source ranges: LB IP via node1 (source not allowed)";
    both(
        &mut rows,
        "outside 172.18.0.200",
        denied.clone(),
        dest,
        at(LB_IP, svc),
        Expect::Dropped,
        1,
    );
    let dest = "source ranges: node1 NodePort of the same Service";
    let ports = (LB_NODEPORT_TCP, LB_NODEPORT_UDP);
    let expect = answer(1, &[DENIED_CLIENT_IP]);
    both(
        &mut rows,
        "outside 172.18.0.200",
        denied,
        dest,
        at(node_ip(1), ports),
        expect,
        1,
    );
    // Pods and the nodes' own processes are fenced too (kube-proxy's firewall chain sees
    // their traffic): node2-pod1 and node 2's address are inside the ranges, node1-pod2 and
    // node 1's addresses outside.
    #[rustfmt::skip]
    let fenced = [
        ("pod node2-pod1 (in the ranges)", pod("node2-pod1"), answer(1, &[pod_ip(2, 1)])),
        ("pod node1-pod2 (not in the ranges)", pod("node1-pod2"), Expect::Dropped),
        ("host node2 (in the ranges)", Origin::Node(2), answer(1, &node_addresses(network, 2))),
        ("host node1 (not in the ranges)", Origin::Node(1), Expect::Dropped),
    ];
    for (client, origin, expect) in fenced {
        let dest = "source ranges: LB IP";
        both(&mut rows, client, origin, dest, at(LB_IP, svc), expect, 1);
    }

    // internalTrafficPolicy Local, endpoints on node 1 only: node 2's pods and processes
    // are dropped (not refused), as kube-proxy drops them.
    #[rustfmt::skip]
    let internal_local = [
        ("pod node1-pod2", pod("node1-pod2"), answer(1, &[pod_ip(1, 2), HAIRPIN_SNAT_IP])),
        ("host node1", Origin::Node(1), answer(1, &node1_addrs)),
        ("pod node2-pod2", pod("node2-pod2"), Expect::Dropped),
        ("host node2", Origin::Node(2), Expect::Dropped),
    ];
    for (client, origin, expect) in internal_local {
        let dest = "ITP Local: ClusterIP internal-local";
        both(
            &mut rows,
            client,
            origin,
            dest,
            at(INTERNAL_LOCAL, svc),
            expect,
            1,
        );
    }
    rows
}

/// The IPv4 rows of the Services only a dual-stack lab has: `dual` (`RequireDualStack`,
/// endpoints node 1's pods in an EndpointSlice per family) by its IPv4 ClusterIP, NodePort,
/// externalIP and LB IP, and `dual-empty` (no endpoint) refused by its IPv4 ClusterIP (from
/// a pod and a host) and NodePort. Their IPv6 twins are in [`matrix6`].
fn dual_stack_only_rows4(network: Network) -> Vec<Row> {
    let mut rows = Vec::new();
    let pod = |name: &str| Origin::Pod(name.to_string());
    let outside = Origin::Outside(CLIENT_IP);
    let svc = (80, 53);
    let dual_ports = (DUAL_NODEPORT_TCP, DUAL_NODEPORT_UDP);
    let empty_ports = (DUAL_EMPTY_NODEPORT_TCP, DUAL_EMPTY_NODEPORT_UDP);
    #[rustfmt::skip]
    let answered = [
        ("pod node2-pod1", pod("node2-pod1"), "dual: ClusterIP (IPv4)", at(DUAL, svc), answer(1, &[pod_ip(2, 1)]), 1),
        ("host node2", Origin::Node(2), "dual: ClusterIP (IPv4)", at(DUAL, svc), answer(1, &node_addresses(network, 2)), 1),
        ("outside", outside.clone(), "dual: node1 NodePort (IPv4, local backend)", at(node_ip(1), dual_ports), answer(1, &[CLIENT_IP]), 1),
        ("outside", outside.clone(), "dual: node2 NodePort (IPv4, remote backend)", at(node_ip(2), dual_ports), answer(1, &[node_ip(2)]), 1),
        ("outside", outside.clone(), "dual: externalIP via node1", at(DUAL_EXTERNAL_IP, svc), answer(1, &[CLIENT_IP]), 1),
        ("outside", outside.clone(), "dual: LB IP via node2", at(DUAL_LB_IP, svc), answer(1, &[node_ip(2)]), 2),
    ];
    for (client, origin, dest, to, expect, via) in answered {
        both(&mut rows, client, origin, dest, to, expect, via);
    }
    #[rustfmt::skip]
    let refused = [
        ("pod node1-pod1", pod("node1-pod1"), "dual-empty: ClusterIP (IPv4, no endpoint)", at(DUAL_EMPTY, svc)),
        ("host node2", Origin::Node(2), "dual-empty: ClusterIP (IPv4, no endpoint)", at(DUAL_EMPTY, svc)),
        ("outside", outside, "dual-empty: node1 NodePort (IPv4, no endpoint)", at(node_ip(1), empty_ports)),
    ];
    for (client, origin, dest, to) in refused {
        both(&mut rows, client, origin, dest, to, Expect::Refused, 1);
    }
    rows
}

/// The IPv6 Service matrix of a dual-stack lab of `network`: [`direct_rows6`] (the lab),
/// then the IPv6 twins of [`matrix`]'s rows (pods, hosts and the outside client reaching
/// IPv6 ClusterIPs, NodePorts on the nodes' IPv6 addresses, host-network endpoints,
/// externalIPs and LB IPs; the hairpin; traffic policies Local and source ranges), `dual`'s IPv6 half (its IPv6 EndpointSlice) and
/// `dual-empty`'s IPv6 ClusterIP and NodePort refused; TCP and UDP each.
fn matrix6(network: Network) -> Vec<Row> {
    let mut rows = direct_rows6(network);
    let pod = |name: &str| Origin::Pod(name.to_string());
    let outside = Origin::Outside6(CLIENT_IP6);
    let svc = (80, 53);
    let on_node_ports = |k: usize| (on_node_tcp(k), on_node_udp(k));
    let node1_addrs = node_addresses6(network, 1);
    let node2_addrs = node_addresses6(network, 2);

    // Pods → IPv6 ClusterIP, and a pod to its own Service (hairpin).
    let n1p2 = pod_ip6(1, 2);
    #[rustfmt::skip]
    let pod_rows = [
        ("pod node1-pod2", "node1-pod2", "IPv6 ClusterIP on-node1 (same node)", on_node6(1), 1, n1p2),
        ("pod node1-pod2", "node1-pod2", "IPv6 ClusterIP on-node2 (other node)", on_node6(2), 2, n1p2),
        ("pod node2-pod2", "node2-pod2", "IPv6 ClusterIP on-node1 (other node)", on_node6(1), 1, pod_ip6(2, 2)),
        ("pod node1-pod1", "node1-pod1", "IPv6 ClusterIP self (itself: hairpin)", SELF6, 1, HAIRPIN_SNAT_IP6),
    ];
    for (client, name, dest, ip, node, seen) in pod_rows {
        let expect = answer(node, &[seen]);
        both(&mut rows, client, pod(name), dest, at(ip, svc), expect, 1);
    }

    // Node 1's host → IPv6 ClusterIPs and its own NodePorts on its IPv6 address.
    for k in [1, 2] {
        let what = if k == 1 { "local" } else { "remote" };
        let dest = format!("IPv6 ClusterIP on-node{k} ({what} backend)");
        let expect = answer_peer(Server::PodOf(k), &node1_addrs);
        let to = at(on_node6(k), svc);
        both(
            &mut rows,
            "host node1",
            Origin::Node(1),
            &dest,
            to,
            expect,
            1,
        );
        let dest = format!("own IPv6 NodePort on-node{k} ({what} backend)");
        let to = at(node_ip6(1), on_node_ports(k));
        let expect = answer(k, &node1_addrs);
        both(
            &mut rows,
            "host node1",
            Origin::Node(1),
            &dest,
            to,
            expect,
            1,
        );
    }

    // Outside → NodePorts on the nodes' IPv6 addresses (externalTrafficPolicy Cluster).
    for (node, backend) in [(1, 1), (2, 2), (1, 2), (2, 1)] {
        let (what, seen) = if node == backend {
            ("local backend", CLIENT_IP6)
        } else {
            ("remote backend", node_ip6(node))
        };
        let dest = format!("node{node} IPv6 NodePort on-node{backend} ({what})");
        let to = at(node_ip6(node), on_node_ports(backend));
        both(
            &mut rows,
            "outside",
            outside.clone(),
            &dest,
            to,
            answer(backend, &[seen]),
            1,
        );
    }

    // Host-network endpoints (node 1's IPv6 address in the IPv6 EndpointSlices).
    let kubernetes = (KUBERNETES6, KUBERNETES_TCP, KUBERNETES_UDP);
    for (name, what, seen) in [
        ("node1-pod1", "same node", pod_ip6(1, 1)),
        ("node2-pod1", "other node", pod_ip6(2, 1)),
    ] {
        let dest = format!("IPv6 ClusterIP kubernetes (host-network endpoint, {what})");
        let expect = answer_peer(Server::HostOf(1), &[seen]);
        both(
            &mut rows,
            &format!("pod {name}"),
            pod(name),
            &dest,
            kubernetes,
            expect,
            1,
        );
    }
    let dest = "IPv6 ClusterIP kubernetes (remote host-network endpoint)";
    let expect = answer_peer(Server::HostOf(1), &node2_addrs);
    both(
        &mut rows,
        "host node2",
        Origin::Node(2),
        dest,
        kubernetes,
        expect,
        1,
    );
    for (node, what, seen) in [(1, "local", CLIENT_IP6), (2, "remote", node_ip6(2))] {
        let dest = format!("node{node} IPv6 NodePort host-nodeport ({what} host-network endpoint)");
        let to = (node_ip6(node), HOST_NODEPORT_TCP, HOST_NODEPORT_UDP);
        let expect = answer_peer(Server::HostOf(1), &[seen]);
        both(&mut rows, "outside", outside.clone(), &dest, to, expect, 1);
    }

    // Outside → IPv6 externalIP and LB IP (endpoint node1-pod1), through each node.
    for (name, ip) in [("IPv6 externalIP", EXTERNAL_IP6), ("IPv6 LB IP", LB_IP6)] {
        for (via, seen) in [(1, CLIENT_IP6), (2, node_ip6(2))] {
            let what = if via == 1 { "local" } else { "remote" };
            let dest = format!("{name} {ip} via node{via} ({what} backend)");
            both(
                &mut rows,
                "outside",
                outside.clone(),
                &dest,
                at(ip, svc),
                answer(1, &[seen]),
                via,
            );
        }
    }

    // externalTrafficPolicy Local over IPv6 (endpoints on node 1 only).
    let local_ports = (LOCAL_NODEPORT_TCP, LOCAL_NODEPORT_UDP);
    let client = answer(1, &[CLIENT_IP6]);
    #[rustfmt::skip]
    let local_rows = [
        ("ETP Local: node1 IPv6 NodePort (has endpoints)", at(node_ip6(1), local_ports), client.clone(), 1),
        ("ETP Local: node2 IPv6 NodePort (no local endpoint)", at(node_ip6(2), local_ports), Expect::Dropped, 1),
        ("ETP Local: IPv6 LB IP via node1 (has endpoints)", at(LOCAL_LB_IP6, svc), client, 1),
        ("ETP Local: IPv6 LB IP via node2 (no local endpoint)", at(LOCAL_LB_IP6, svc), Expect::Dropped, 2),
    ];
    for (dest, to, expect, via) in local_rows {
        both(&mut rows, "outside", outside.clone(), dest, to, expect, via);
    }

    // loadBalancerSourceRanges over IPv6: the IPv6 LB IP for the IPv6 ranges' sources only,
    // the NodePort for all.
    let denied = Origin::Outside6(DENIED_CLIENT_IP6);
    let lb_ports = (LB_NODEPORT_TCP, LB_NODEPORT_UDP);
    #[rustfmt::skip]
    let fenced = [
        ("outside fd00:18::200", denied.clone(), "source ranges: IPv6 LB IP via node1 (source not allowed)", at(LB_IP6, svc), Expect::Dropped),
        ("outside fd00:18::200", denied, "source ranges: node1 IPv6 NodePort of the same Service", at(node_ip6(1), lb_ports), answer(1, &[DENIED_CLIENT_IP6])),
        ("outside", outside.clone(), "source ranges: IPv6 LB IP via node1 (allowed)", at(LB_IP6, svc), answer(1, &[CLIENT_IP6])),
        ("pod node2-pod1 (in the ranges)", pod("node2-pod1"), "source ranges: IPv6 LB IP", at(LB_IP6, svc), answer(1, &[pod_ip6(2, 1)])),
        ("pod node1-pod2 (not in the ranges)", pod("node1-pod2"), "source ranges: IPv6 LB IP", at(LB_IP6, svc), Expect::Dropped),
    ];
    for (client, origin, dest, to, expect) in fenced {
        both(&mut rows, client, origin, dest, to, expect, 1);
    }

    // internalTrafficPolicy Local over IPv6: node 2's pods are dropped.
    #[rustfmt::skip]
    let internal_local = [
        ("pod node1-pod2", pod("node1-pod2"), answer(1, &[pod_ip6(1, 2), HAIRPIN_SNAT_IP6])),
        ("pod node2-pod2", pod("node2-pod2"), Expect::Dropped),
    ];
    for (client, origin, expect) in internal_local {
        let dest = "ITP Local: IPv6 ClusterIP internal-local";
        both(
            &mut rows,
            client,
            origin,
            dest,
            at(INTERNAL_LOCAL6, svc),
            expect,
            1,
        );
    }

    // `dual`'s IPv6 half: endpoints from its IPv6 EndpointSlice (node 1's pods).
    let dual_ports = (DUAL_NODEPORT_TCP, DUAL_NODEPORT_UDP);
    #[rustfmt::skip]
    let dual = [
        ("pod node2-pod1", pod("node2-pod1"), "dual: IPv6 ClusterIP", at(DUAL6, svc), answer(1, &[pod_ip6(2, 1)]), 1),
        ("host node2", Origin::Node(2), "dual: IPv6 ClusterIP", at(DUAL6, svc), answer(1, &node2_addrs), 1),
        ("outside", outside.clone(), "dual: node1 IPv6 NodePort (local backend)", at(node_ip6(1), dual_ports), answer(1, &[CLIENT_IP6]), 1),
        ("outside", outside.clone(), "dual: node2 IPv6 NodePort (remote backend)", at(node_ip6(2), dual_ports), answer(1, &[node_ip6(2)]), 1),
        ("outside", outside.clone(), "dual: IPv6 externalIP via node1", at(DUAL_EXTERNAL_IP6, svc), answer(1, &[CLIENT_IP6]), 1),
        ("outside", outside.clone(), "dual: IPv6 LB IP via node2", at(DUAL_LB_IP6, svc), answer(1, &[node_ip6(2)]), 2),
    ];
    for (client, origin, dest, to, expect, via) in dual {
        both(&mut rows, client, origin, dest, to, expect, via);
    }

    // No endpoint anywhere: refused (TCP RST, ICMPv6 port unreachable), from each client.
    let empty_ports = (DUAL_EMPTY_NODEPORT_TCP, DUAL_EMPTY_NODEPORT_UDP);
    #[rustfmt::skip]
    let refused = [
        ("pod node1-pod1", pod("node1-pod1"), "dual-empty: IPv6 ClusterIP (no endpoint)", at(DUAL_EMPTY6, svc)),
        ("host node2", Origin::Node(2), "dual-empty: IPv6 ClusterIP (no endpoint)", at(DUAL_EMPTY6, svc)),
        ("outside", outside, "dual-empty: node1 IPv6 NodePort (no endpoint)", at(node_ip6(1), empty_ports)),
    ];
    for (client, origin, dest, to) in refused {
        both(&mut rows, client, origin, dest, to, Expect::Refused, 1);
    }
    rows
}

/// Prints each node's packets on overlay device `dev` between two readings of its counters,
/// and returns the devices that did not both receive and send.
fn idle_devices(
    before: &[Option<LinkCounters>],
    after: &[Option<LinkCounters>],
    dev: &str,
) -> Vec<String> {
    let mut idle = Vec::new();
    for (k, (b, a)) in before.iter().zip(after).enumerate() {
        let (Some(b), Some(a)) = (b, a) else {
            continue;
        };
        let (rx, tx) = (
            a.rx_packets.saturating_sub(b.rx_packets),
            a.tx_packets.saturating_sub(b.tx_packets),
        );
        println!("  node{}: +{rx} packets received, +{tx} sent ({a})", k + 1);
        if rx == 0 || tx == 0 {
            idle.push(format!("node{}'s {dev}", k + 1));
        }
    }
    idle
}

/// Runs `rows` in two phases: the client's routes to externalIPs and LoadBalancer IPs via
/// node 1, then via node 2 (each row in the phase its `vips_via` names).
fn run_phases(cluster: &Cluster, rows: &[Row]) -> Vec<Result_> {
    let mut results = Vec::new();
    for via in [1, 2] {
        cluster.route_vips_via(via).expect("route");
        let phase: Vec<Row> = rows.iter().filter(|r| r.vips_via == via).cloned().collect();
        results.extend(run_rows(cluster, phase));
    }
    results
}

/// The failed rows of `results` without a Service (`direct`: the lab's) or with one (the
/// datapath's), a line each.
fn failures(results: &[Result_], cluster: &Cluster, direct: bool) -> Vec<String> {
    results
        .iter()
        .filter(|r| !r.pass && r.row.direct == direct)
        .map(|r| {
            format!(
                "{} → {} {} {}: {} [{}] (expected {})",
                r.row.client,
                r.row.destination,
                r.row.to,
                r.row.proto,
                r.outcome,
                failure_mode(&r.row, &r.outcome, cluster),
                r.row.expect
            )
        })
        .collect()
}

/// Runs `rows` with at most PARALLEL requests in flight.
fn run_rows(cluster: &Cluster, rows: Vec<Row>) -> Vec<Result_> {
    let mut results = Vec::new();
    for chunk in rows.chunks(PARALLEL) {
        std::thread::scope(|s| {
            let handles: Vec<_> = chunk
                .iter()
                .map(|row| {
                    s.spawn(move || {
                        let timeout = match row.expect {
                            Expect::Dropped => DROP,
                            Expect::Answer { .. } | Expect::Refused => ANSWER,
                        };
                        cluster.request(&row.origin, row.proto, row.to, timeout)
                    })
                })
                .collect();
            for (row, h) in chunk.iter().zip(handles) {
                let outcome = h
                    .join()
                    .unwrap_or_else(|_| Outcome::Failed("the request thread panicked".into()));
                let pass = check(row, &outcome, cluster);
                results.push(Result_ {
                    row: row.clone(),
                    outcome,
                    pass,
                });
            }
        });
    }
    results
}

/// What a failed row came to, in a few words: a timeout, a refusal, or which part of the
/// answer is wrong (the server, the source it saw, the peer the client's socket names).
fn failure_mode(row: &Row, outcome: &Outcome, cluster: &Cluster) -> String {
    let Outcome::Reply {
        peer,
        backend,
        seen,
    } = outcome
    else {
        return outcome.to_string();
    };
    let Expect::Answer {
        server,
        sources,
        peer: want_peer,
    } = &row.expect
    else {
        return format!("answered by {backend} (expected {})", row.expect);
    };
    let mut wrong = Vec::new();
    let answered_by = match server {
        Server::PodOf(k) => cluster.node_of(backend) == Some(*k),
        Server::HostOf(k) => cluster.host_of(backend) == Some(*k),
    };
    if !answered_by {
        wrong.push(format!("wrong server {backend}"));
    }
    if !sources.contains(&seen.ip()) {
        wrong.push(format!("wrong source {}", seen.ip()));
    }
    if *want_peer && *peer != row.to {
        wrong.push(format!("wrong peer {peer}"));
    }
    wrong.join(", ")
}

fn table(cluster: &Cluster, results: &[Result_]) -> String {
    let mut t = String::from(
        "| client | destination | proto | backend node | source seen | expected | result |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for r in results {
        let (node, seen) = match &r.outcome {
            Outcome::Reply {
                peer,
                backend,
                seen,
            } => {
                let node = cluster
                    .node_of(backend)
                    .or_else(|| cluster.host_of(backend))
                    .map_or_else(|| backend.clone(), |k| format!("node{k} ({backend})"));
                let mut seen = seen.ip().to_string();
                let peer_checked = matches!(r.row.expect, Expect::Answer { peer: true, .. });
                if matches!(r.row.origin, Origin::Node(_)) || peer_checked || !r.pass {
                    seen.push_str(&format!(" (peer {peer})"));
                }
                (node, seen)
            }
            other => ("-".to_string(), other.to_string()),
        };
        t.push_str(&format!(
            "| {} | {} {} | {} | {} | {} | {} | {} |\n",
            r.row.client,
            r.row.destination,
            r.row.to,
            r.row.proto,
            node,
            seen,
            r.row.expect,
            if r.pass { "pass" } else { "FAIL" }
        ));
    }
    t
}

#[test]
fn reachability_matrix() {
    // The default on the nodes' veth uplinks: lb_tc_ext.
    matrix_with(Network::Bridge, None, "hook=TC ingress");
}

#[test]
fn reachability_matrix_with_xdp_on_the_uplinks() {
    matrix_with(Network::Bridge, Some("xdp"), "hook=XDP");
}

/// As flannel's default backend: pod traffic between nodes in VXLAN (`flannel.1`).
#[test]
fn reachability_matrix_on_vxlan() {
    matrix_with(Network::Vxlan, None, "hook=TC ingress");
}

/// As Calico IPIP or WireGuard: pod traffic between nodes through an L3 tunnel device without
/// an Ethernet header (`tun0`).
#[test]
fn reachability_matrix_on_an_l3_tunnel() {
    matrix_with(Network::Tunnel, None, "hook=TC ingress");
}

/// The IPv4 matrix in an IPv4-only lab of each network (the other matrix tests run on the
/// default, dual-stack lab): every row as there.
#[test]
fn reachability_matrix_on_ipv4_only_labs() {
    for network in Network::ALL {
        matrix_on(
            ClusterConfig {
                network,
                dual_stack: false,
                ..ClusterConfig::new(2, 2)
            },
            "hook=TC ingress",
        );
    }
}

/// Runs the whole matrix on a cluster of `network` whose agents run with `--ext-attach
/// ext_attach`, and checks that each attached its uplink as `hook` says. The lab is checked
/// first (the rows without a Service, and in an overlay that pod traffic crossed the overlay
/// device of both nodes), then the datapath (every other row).
fn matrix_with(network: Network, ext_attach: Option<&'static str>, hook: &str) {
    matrix_on(
        ClusterConfig {
            ext_attach,
            network,
            ..ClusterConfig::new(2, 2)
        },
        hook,
    );
}

/// The whole matrix on a cluster built from `config` (two nodes of two pods), as
/// [`matrix_with`] runs it.
fn matrix_on(config: ClusterConfig, hook: &str) {
    require_root();
    let _turn = turn();
    let started = Instant::now();
    let network = config.network;
    let mut cluster = Cluster::up_with(config).expect("cluster up");
    cluster.start_all().expect("servers, manifests, agents");
    let ready = started.elapsed();
    for k in 1..=2 {
        let log = cluster.agent_log(k);
        assert!(
            log.lines()
                .any(|l| l.contains("attached iface=eth0") && l.contains(hook)),
            "node {k}: eth0 not attached with {hook}:\n{log}"
        );
    }
    let counters = |cluster: &Cluster| -> Vec<Option<LinkCounters>> {
        (1..=2)
            .map(|k| cluster.overlay_counters(k).expect("overlay counters"))
            .collect()
    };
    let before = counters(&cluster);

    let mut rows = matrix(network);
    if cluster.dual_stack() {
        rows.extend(dual_stack_only_rows4(network));
    }
    let results = run_phases(&cluster, &rows);
    let after = counters(&cluster);
    let passed = results.iter().filter(|r| r.pass).count();
    let stack = if cluster.dual_stack() {
        ", dual-stack lab (IPv4 rows, with those of its dual-stack-only Services)"
    } else {
        ""
    };
    println!(
        "\nReachability matrix, {network} network{stack} ({passed} of {} rows pass; cluster ready in {:.1} s, all in {:.1} s):\n\n{}",
        results.len(),
        ready.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        table(&cluster, &results)
    );
    let overlay_idle = match network.overlay_device() {
        Some(dev) => {
            println!("{dev} counters during the matrix:");
            idle_devices(&before, &after, dev)
        }
        None => Vec::new(),
    };

    let (lab, datapath) = (
        failures(&results, &cluster, true),
        failures(&results, &cluster, false),
    );
    assert!(
        lab.is_empty() && overlay_idle.is_empty(),
        "the {network} lab itself is broken: rows without a Service fail:\n{}\noverlay devices that carried nothing: {overlay_idle:?}",
        lab.join("\n")
    );
    assert!(
        datapath.is_empty(),
        "{network} network: {} of {} rows fail:\n{}",
        datapath.len(),
        results.len(),
        datapath.join("\n")
    );
}

/// The lab's IPv6, without the load balancer: in a dual-stack lab of each network, the rows
/// without a Service in IPv6 ([`direct_rows6`]: pod ↔ pod on the same and the other node,
/// host → pod, client → node, pods and host → node 1's host-network server; TCP and UDP)
/// and one MiB uploaded over IPv6 from a pod to a pod of the other node (path MTU discovery
/// where the IPv6 overlay's MTU is smaller than the pods'), then the IPv4 rows without a
/// Service; first with the lab alone, then with the agents running on the dual-stack
/// manifests. In an overlay, the IPv6 rows must have crossed its IPv6 device on both nodes.
/// A failure here is the lab's (or, with the agents only, the datapath's handling of
/// traffic it does not translate), never a Service's.
#[test]
fn dual_stack_lab_carries_ipv6_between_pods_nodes_and_the_client() {
    require_root();
    let _turn = turn();
    for network in Network::ALL {
        let started = Instant::now();
        let mut cluster = Cluster::up_with(ClusterConfig {
            network,
            dual_stack: true,
            ..ClusterConfig::new(2, 2)
        })
        .expect("cluster up");
        cluster.start_servers().expect("servers");
        for phase in ["the lab alone", "with the agents"] {
            if phase == "with the agents" {
                cluster.write_default_manifests().expect("manifests");
                cluster.start_agents().expect("agents");
                cluster
                    .wait_healthy(Duration::from_secs(15))
                    .expect("agents healthy");
            }
            let counters = |cluster: &Cluster| -> Vec<Option<LinkCounters>> {
                (1..=2)
                    .map(|k| {
                        let dev = network.overlay_device6()?;
                        let ns = &cluster.node(k).expect("node").ns;
                        Some(lb_testkit::cluster::link_counters(ns, dev).expect("counters"))
                    })
                    .collect()
            };
            let before = counters(&cluster);
            let mut results = run_rows(&cluster, direct_rows6(network));
            let upload = upload6(&cluster);
            let after = counters(&cluster);
            results.extend(run_rows(&cluster, direct_rows(network)));
            let passed = results.iter().filter(|r| r.pass).count();
            println!(
                "\nDual-stack lab, {network} network, {phase}: {passed} of {} rows pass ({:.1} s so far):\n\n{}",
                results.len(),
                started.elapsed().as_secs_f64(),
                table(&cluster, &results)
            );
            println!("1 MiB over IPv6, node2-pod1 → node1-pod1: {upload:?}");
            let idle = match network.overlay_device6() {
                Some(dev) => {
                    println!("{dev} counters during the IPv6 rows:");
                    idle_devices(&before, &after, dev)
                }
                None => Vec::new(),
            };
            // Every row here is one without a Service.
            let failed = failures(&results, &cluster, true);
            assert!(
                failed.is_empty() && idle.is_empty() && upload.is_ok(),
                "the dual-stack {network} lab, {phase}: rows without a Service fail:\n{}\n\
                 IPv6 overlay devices that carried nothing: {idle:?}\nupload: {upload:?}",
                failed.join("\n")
            );
        }
    }
}

/// The IPv6 Service matrix ([`matrix6`]) on a dual-stack lab of each network, with the
/// agents on the dual-stack manifests; then both families of the dual-stack Service `dual`
/// (`RequireDualStack`, an EndpointSlice per family) reach the same pods, node 1's, over TCP
/// and UDP, from a pod of node 2.
#[test]
fn reachability_matrix_over_ipv6() {
    require_root();
    let _turn = turn();
    for network in Network::ALL {
        matrix6_on(network);
    }
}

fn matrix6_on(network: Network) {
    let started = Instant::now();
    let mut cluster = Cluster::up_with(ClusterConfig {
        network,
        dual_stack: true,
        ..ClusterConfig::new(2, 2)
    })
    .expect("cluster up");
    cluster.start_all().expect("servers, manifests, agents");
    let ready = started.elapsed();
    let rows = matrix6(network);
    let results = run_phases(&cluster, &rows);
    let passed = results.iter().filter(|r| r.pass).count();
    println!(
        "\nIPv6 reachability matrix, {network} network ({passed} of {} rows pass; cluster ready in {:.1} s, all in {:.1} s):\n\n{}",
        results.len(),
        ready.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        table(&cluster, &results)
    );
    let same_pods = both_families_reach_the_same_pods(&cluster);
    println!("dual, by its IPv4 and its IPv6 ClusterIP: {same_pods:?}");
    let (lab, datapath) = (
        failures(&results, &cluster, true),
        failures(&results, &cluster, false),
    );
    assert!(
        lab.is_empty(),
        "the dual-stack {network} lab itself is broken: IPv6 rows without a Service fail:\n{}",
        lab.join("\n")
    );
    assert!(
        datapath.is_empty() && same_pods.is_ok(),
        "{network} network, IPv6: {} of {} rows fail:\n{}\nboth families of dual: {same_pods:?}",
        datapath.len(),
        results.len(),
        datapath.join("\n")
    );
}

/// From node2-pod1, `dual` by its IPv4 and by its IPv6 ClusterIP, over TCP and UDP, enough
/// times that each endpoint answers (two endpoints: a missing one after 24 requests is a
/// chance of 2⁻²³): each family and protocol must be answered by exactly node 1's pods.
fn both_families_reach_the_same_pods(cluster: &Cluster) -> Result<String, String> {
    const TRIES: usize = 24;
    let origin = Origin::Pod("node2-pod1".into());
    let want: std::collections::BTreeSet<String> =
        cluster.pods_on(1).map(|p| p.name.clone()).collect();
    let mut seen = Vec::new();
    for (family, ip) in [("IPv4", IpAddr::from(DUAL)), ("IPv6", IpAddr::from(DUAL6))] {
        for (proto, port) in [(Proto::Tcp, 80), (Proto::Udp, 53)] {
            let mut got = std::collections::BTreeSet::new();
            for _ in 0..TRIES {
                match cluster.request(&origin, proto, SocketAddr::new(ip, port), ANSWER) {
                    Outcome::Reply { backend, .. } => {
                        got.insert(backend);
                    }
                    other => return Err(format!("{family} {proto} {ip}: {other}")),
                }
            }
            if got != want {
                return Err(format!(
                    "{family} {proto} {ip}: answered by {got:?}, not {want:?}"
                ));
            }
            seen.push(format!("{family} {proto}: {got:?}"));
        }
    }
    Ok(seen.join("; "))
}

/// One MiB over TCP and IPv6 from node2-pod1 to node1-pod1's upload sink (no Service):
/// `lab-client upload`'s line, or why it failed.
fn upload6(cluster: &Cluster) -> Result<String, String> {
    const MIB: usize = 1 << 20;
    let to = SocketAddr::from((pod_ip6(1, 1), 9000)).to_string();
    let client = lb_testkit::netns::binary("lab-client").map_err(|e| e.to_string())?;
    let size = MIB.to_string();
    let args = ["upload", &to, "--size", &size, "--timeout-ms", "5000"];
    let origin = Origin::Pod("node2-pod1".into());
    let out = cluster
        .run_from(&origin, &client, &args)
        .map_err(|e| e.to_string())?;
    let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if out.status.success() && line.starts_with(&format!("uploaded={MIB}/{MIB} ")) {
        Ok(line)
    } else {
        Err(format!(
            "{line} {} ({})",
            String::from_utf8_lossy(&out.stderr).trim(),
            out.status
        ))
    }
}

/// Removes a detached cluster if the test fails before it does.
struct Leftovers(ClusterState);

impl Drop for Leftovers {
    fn drop(&mut self) {
        self.0.teardown();
    }
}

fn leftovers(tag: &str, state: &ClusterState) -> Vec<String> {
    let mut found = Vec::new();
    let netns = lb_testkit::netns::run(&["ip", "netns", "list"]).expect("ip netns list");
    found.extend(
        netns
            .lines()
            .filter(|l| l.starts_with(&format!("{tag}-")))
            .map(|l| format!("namespace {l}")),
    );
    for p in [&state.pins, &state.cgroup, &state.dir, &state.state_file]
        .into_iter()
        .flatten()
    {
        if p.exists() {
            found.push(p.display().to_string());
        }
    }
    found
}

/// What `cargo xtask lab up` and `lab down` do: a cluster whose processes outlive its
/// handle, removed later from its state file alone, twice over. An L3-tunnel cluster, whose
/// relays are processes of the network too.
#[test]
fn a_detached_cluster_is_removed_from_its_state_file() {
    require_root();
    let _turn = turn();
    let tag = format!("lcd{}", std::process::id());
    let state_file = std::env::temp_dir().join(format!("{tag}-state.json"));
    let mut cluster = Cluster::up_with(ClusterConfig {
        tag: Some(tag.clone()),
        detached: true,
        state_file: Some(state_file.clone()),
        network: Network::Tunnel,
        ..ClusterConfig::new(2, 1)
    })
    .expect("cluster up");
    cluster.start_all().expect("servers, manifests, agents");
    let guard = Leftovers(cluster.state().clone());
    let node2 = cluster.node(2).expect("node2").clone();
    drop(cluster.detach());

    // Still serving with the handle gone: its processes are in their own sessions.
    let state = ClusterState::load(&state_file)
        .expect("state file")
        .expect("a state file is written");
    assert_eq!(state.tag, tag);
    assert!(node2.pin.exists(), "{}", node2.pin.display());
    let procs = std::fs::read_to_string(node2.cgroup.join("cgroup.procs")).expect("procs");
    assert_eq!(procs.lines().count(), 1, "node2's pod server: {procs}");
    let agents = state.cgroup.as_ref().expect("cgroup").join("agents");
    let procs = std::fs::read_to_string(agents.join("cgroup.procs")).expect("procs");
    assert_eq!(procs.lines().count(), 2, "two agents: {procs}");
    let network = state.cgroup.as_ref().expect("cgroup").join("network");
    let procs = std::fs::read_to_string(network.join("cgroup.procs")).expect("procs");
    assert_eq!(procs.lines().count(), 2, "two tunnel relays: {procs}");

    let problems = state.teardown();
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(leftovers(&tag, &state), Vec::<String>::new());
    // Again, with everything gone: nothing to do, nothing fails.
    let problems = state.teardown();
    assert!(problems.is_empty(), "{problems:?}");
    drop(guard);
}

/// A cluster dropped after its agents ran leaves nothing behind, in each network: no
/// namespace, pin, cgroup or file, and none of its processes (servers, agents, relays).
#[test]
fn a_dropped_cluster_leaves_nothing_behind() {
    require_root();
    let _turn = turn();
    for network in Network::ALL {
        let mut cluster = Cluster::up_with(ClusterConfig {
            network,
            ..ClusterConfig::new(2, 1)
        })
        .expect("cluster up");
        cluster.start_all().expect("servers, manifests, agents");
        // Traffic across nodes works at all (pods reach each other through the network).
        let body = cluster
            .curl(
                &Origin::Pod("node1-pod1".into()),
                &format!("http://{}:8080/", pod_ip(2, 1)),
            )
            .expect("pod to pod across nodes");
        assert!(
            body.starts_with(&format!("node2-pod1 {}:", pod_ip(1, 1))),
            "{network}: {body}"
        );
        let processes = cluster.processes();
        let relays = processes.iter().filter(|(w, _)| w.starts_with("relay"));
        let want = if network == Network::Tunnel { 2 } else { 0 };
        assert_eq!(relays.count(), want, "{network}: {processes:?}");
        let (tag, state) = (cluster.tag.clone(), cluster.state().clone());
        drop(cluster);
        assert_eq!(leftovers(&tag, &state), Vec::<String>::new(), "{network}");
        let alive: Vec<_> = processes
            .iter()
            .filter(|(_, pid)| std::path::Path::new(&format!("/proc/{pid}")).exists())
            .collect();
        assert!(alive.is_empty(), "{network}: still running: {alive:?}");
    }
}

/// One MiB over TCP from node2-pod1 to node1-pod1 (by pod IP, no Service): how long it takes
/// and what node 2's and node 1's overlay devices counted meanwhile.
fn megabyte_across_nodes(cluster: &Cluster) -> (Duration, LinkCounters, LinkCounters) {
    use std::io::{Read, Write};
    const MIB: usize = 1 << 20;
    const PORT: u16 = 9100;
    let counters = |k: usize| {
        cluster
            .overlay_counters(k)
            .expect("counters")
            .expect("an overlay device")
    };
    let (tx0, rx0) = (counters(2), counters(1));
    let server_ns = cluster.pod("node2-pod1").expect("pod").ns.clone();
    let client_ns = cluster.pod("node1-pod1").expect("pod").ns.clone();
    let listener = lb_testkit::netns::in_netns(&server_ns, || {
        let l = std::net::TcpListener::bind(("0.0.0.0", PORT))?;
        l.set_nonblocking(true)?;
        Ok(l)
    })
    .expect("listen in node2-pod1");
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut conn = loop {
            match listener.accept() {
                Ok((c, _)) => break c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        return Err(e);
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(e),
            }
        };
        conn.set_nonblocking(false)?;
        conn.write_all(&vec![0x5a; MIB])
    });
    let to = SocketAddr::from((pod_ip(2, 1), PORT));
    let got = lb_testkit::netns::in_netns(&client_ns, move || {
        let started = Instant::now();
        let mut s = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut data = Vec::with_capacity(MIB);
        s.read_to_end(&mut data)?;
        Ok((data.len(), started.elapsed()))
    });
    let served = server.join().expect("server thread");
    let (len, took) = got.expect("receive the MiB in node1-pod1");
    served.expect("send the MiB from node2-pod1");
    assert_eq!(len, MIB);
    let (tx1, rx1) = (counters(2), counters(1));
    let delta = |a: LinkCounters, b: LinkCounters| LinkCounters {
        rx_packets: b.rx_packets - a.rx_packets,
        rx_bytes: b.rx_bytes - a.rx_bytes,
        tx_packets: b.tx_packets - a.tx_packets,
        tx_bytes: b.tx_bytes - a.tx_bytes,
    };
    (took, delta(tx0, tx1), delta(rx0, rx1))
}

/// Pod traffic between nodes crosses the overlay device (its counters grow by what was sent,
/// node 2's in TX, node 1's in RX), and quickly: one MiB of TCP in well under a second, with
/// the lab alone and again with the agents on the nodes' eth0.
fn overlay_carries_pod_traffic(network: Network) {
    require_root();
    let _turn = turn();
    let mut cluster = Cluster::up_with(ClusterConfig {
        network,
        ..ClusterConfig::new(2, 1)
    })
    .expect("cluster up");
    let dev = network.overlay_device().expect("an overlay");
    for phase in ["the lab alone", "with the agents"] {
        if phase == "with the agents" {
            cluster.start_all().expect("servers, manifests, agents");
        }
        let (took, node2, node1) = megabyte_across_nodes(&cluster);
        println!(
            "{network}, {phase}: 1 MiB node2-pod1 → node1-pod1 in {:.1} ms; node2's {dev}: {node2}; node1's {dev}: {node1}",
            took.as_secs_f64() * 1000.0,
        );
        assert!(
            node2.tx_bytes >= 1 << 20 && node1.rx_bytes >= 1 << 20,
            "{network}, {phase}: the MiB did not cross {dev} (node2 {node2}, node1 {node1})"
        );
        assert!(
            took < Duration::from_secs(1),
            "{network}, {phase}: 1 MiB took {took:?}"
        );
    }
}

#[test]
fn vxlan_carries_pod_traffic_between_nodes() {
    overlay_carries_pod_traffic(Network::Vxlan);
}

#[test]
fn an_l3_tunnel_carries_pod_traffic_between_nodes_quickly() {
    overlay_carries_pod_traffic(Network::Tunnel);
}

/// Entries of a node's `LB4_SNAT` (its source-NATed flows).
fn snat_entries(cluster: &Cluster, k: usize) -> usize {
    use aya::maps::{HashMap, Map, MapData};
    use lb_common::{CtEntryV4, CtKeyV4};
    let node = cluster.node(k).expect("node");
    let map = MapData::from_pin(node.pin.join("LB4_SNAT")).expect("LB4_SNAT pinned");
    let map: HashMap<MapData, CtKeyV4, CtEntryV4> =
        HashMap::try_from(Map::LruHashMap(map)).expect("an LRU hash");
    map.keys().count()
}

/// Many connections from one outside client at once, through node 1 to a backend on node 2:
/// each is source-NATed to node 1 with a port of its own (the backend sees distinct
/// node1:port pairs), and once they are closed the agent frees every port.
#[test]
fn many_concurrent_flows_get_distinct_snat_ports_freed_after_close() {
    require_root();
    let _turn = turn();
    let mut cluster = Cluster::up(2, 1).expect("cluster up");
    cluster.start_all().expect("servers, manifests, agents");
    const FLOWS: usize = 300;
    let target = SocketAddrV4::new(node_ip(1), on_node_tcp(2));
    // `trace` of such a flow shows the SNAT and leaves neither conntrack nor a port behind.
    let trace = cluster
        .agent_cli(
            1,
            &[
                "trace",
                "tcp",
                &format!("{CLIENT_IP}:40000"),
                &target.to_string(),
            ],
        )
        .expect("trace");
    assert!(trace.contains(&node_ip(1).to_string()), "{trace}");
    assert_eq!(
        snat_entries(&cluster, 1),
        0,
        "trace left a SNAT entry: {trace}"
    );
    // One process holds all connections open, prints what the backend saw on each, and
    // closes them when told (a line on stdin).
    let script = format!(
        r#"
import socket, sys
socks = []
for i in range({FLOWS}):
    s = socket.create_connection(("{ip}", {port}), timeout=5)
    s.sendall(b"GET / HTTP/1.1\r\nHost: lab\r\n\r\n")
    data = b""
    while not data.endswith(b"\n") or b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    print(data.split(b"\r\n\r\n", 1)[1].decode().strip(), flush=True)
    socks.append(s)
print("open", flush=True)
sys.stdin.readline()
for s in socks:
    s.close()
print("closed", flush=True)
"#,
        ip = target.ip(),
        port = target.port()
    );
    let mut child = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &cluster.client_ns,
            "python3",
            "-c",
            &script,
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 in the client namespace");
    use std::io::{BufRead, Write};
    let mut lines = std::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut seen = std::collections::BTreeSet::new();
    for line in lines.by_ref() {
        let line = line.expect("read");
        if line == "open" {
            break;
        }
        // "<pod> <address:port it saw>"
        let addr: SocketAddrV4 = line
            .split_whitespace()
            .nth(1)
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected answer {line:?}"));
        assert_eq!(*addr.ip(), node_ip(1), "the backend sees node 1: {line}");
        assert!(
            (61000..=65535).contains(&addr.port()),
            "port {} in the SNAT range",
            addr.port()
        );
        assert!(
            seen.insert(addr.port()),
            "SNAT port {} used twice",
            addr.port()
        );
    }
    assert_eq!(
        seen.len(),
        FLOWS,
        "every connection answered on a port of its own"
    );
    let open = snat_entries(&cluster, 1);
    println!(
        "{FLOWS} concurrent connections: {} distinct SNAT ports; LB4_SNAT holds {open} entries",
        seen.len()
    );
    assert!(open >= FLOWS, "one SNAT entry per open flow ({open})");

    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"close\n")
        .expect("tell the client to close");
    assert_eq!(
        lines.next().map(|l| l.expect("read")),
        Some("closed".into())
    );
    let _ = child.wait();
    // Lab agents sweep every second and free closed flows after 2 s.
    let started = Instant::now();
    let mut left = open;
    while started.elapsed() < Duration::from_secs(15) {
        left = snat_entries(&cluster, 1);
        if left == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    println!(
        "after closing: {left} SNAT entries left after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(left, 0, "SNAT ports leaked after the flows closed");
}

/// Maglev in the lab: the same client address and port reaching the NodePort of node 1 and
/// then of node 2 is answered by the same pod (4 pods over 2 nodes), for every port tried.
#[test]
fn a_flow_keeps_its_backend_whichever_node_it_arrives_at() {
    require_root();
    let _turn = turn();
    let mut cluster = Cluster::up(2, 2).expect("cluster up");
    cluster.start_all().expect("servers, manifests, agents");
    const PORTS: u16 = 20;
    let script = format!(
        r#"
import socket
def ask(node, sport):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("{client}", sport))
    s.settimeout(5)
    s.connect((node, {port}))
    s.sendall(b"GET / HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n")
    data = b""
    while True:
        c = s.recv(4096)
        if not c:
            break
        data += c
    s.close()
    return data.split(b"\r\n\r\n", 1)[1].split()[0].decode()
for sport in range(41000, 41000 + {PORTS}):
    print(sport, ask("{n1}", sport), ask("{n2}", sport), flush=True)
"#,
        client = CLIENT_IP,
        port = WEB_NODEPORT_TCP,
        n1 = node_ip(1),
        n2 = node_ip(2),
    );
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &cluster.client_ns,
            "python3",
            "-c",
            &script,
        ])
        .output()
        .expect("python3 in the client namespace");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut pods = std::collections::BTreeSet::new();
    let mut agree = 0;
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(f.len(), 3, "{line}");
        pods.insert(f[1].to_string());
        agree += usize::from(f[1] == f[2]);
        assert_eq!(
            f[1], f[2],
            "source port {}: node 1 chose {}, node 2 {}",
            f[0], f[1], f[2]
        );
    }
    println!(
        "maglev across nodes: {agree} of {PORTS} client ports got the same pod via node 1 and node 2; pods used: {pods:?}"
    );
    assert_eq!(agree, PORTS as usize);
    assert!(pods.len() >= 2, "the flows spread over pods: {pods:?}");
}
