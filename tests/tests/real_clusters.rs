//! What breaks on real clusters and not on the lab's easy case, end to end in the kind-like
//! cluster (`lb_testkit::cluster`) with real clients and servers: large UDP datagrams
//! (IP fragments) through Services, path MTU discovery across a Service over a link with a
//! smaller MTU, ICMP errors of a Service's backend reaching its client, and a client that
//! reuses its ports for a direct connection right after Service traffic. Needs root and the
//! workspace's binaries (`cargo build`).
// Harness code: a lab that cannot be built panics with a message, arguments are passed as
// the call sites read best, and floats are compared exactly where they were parsed.
#![allow(
    clippy::needless_pass_by_value,
    clippy::missing_panics_doc,
    clippy::float_cmp,
    clippy::unused_self
)]

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4},
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use lb_testkit::{
    cluster::{
        node_ip, node_ip6, services::*, Cluster, ClusterConfig, Network, Origin, Outcome, Proto,
        CLIENT_IP, CLIENT_IP6,
    },
    netns::{binary, run},
    require_root,
};

/// One cluster at a time on a 2-core machine.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn turn() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn cluster(network: Network) -> Cluster {
    cluster_with(ClusterConfig {
        network,
        ..ClusterConfig::new(2, 2)
    })
}

fn cluster_with(config: ClusterConfig) -> Cluster {
    let mut c = Cluster::up_with(config).expect("cluster up");
    c.start_all().expect("servers, manifests, agents");
    c
}

/// Runs lab-client from `origin`: (exit code, stdout).
fn lab_client(c: &Cluster, origin: &Origin, args: &[&str]) -> (i32, String) {
    let mut all: Vec<&str> = args.to_vec();
    let bind = match origin {
        Origin::Outside(ip) => ip.to_string(),
        Origin::Outside6(ip) => ip.to_string(),
        _ => String::new(),
    };
    if !bind.is_empty() {
        all.extend(["--bind", &bind]);
    }
    let out = c
        .run_from(origin, &binary("lab-client").expect("lab-client"), &all)
        .expect("lab-client runs");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    )
}

/// The counter `outcome` of node K's datapath, from its /metrics.
fn datapath_counter(c: &Cluster, k: usize, outcome: &str) -> u64 {
    let metrics = c
        .curl(&Origin::Node(k), "http://127.0.0.1:10249/metrics")
        .expect("metrics");
    let series = format!("lb_datapath_packets_total{{outcome=\"{outcome}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&series)?.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits until a request from `origin` gets `want` (a Service just written is programmed
/// within a second).
fn wait_outcome(
    c: &Cluster,
    origin: &Origin,
    proto: Proto,
    to: impl Into<SocketAddr>,
    want: fn(&Outcome) -> bool,
) -> Outcome {
    let to = to.into();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let o = c.request(origin, proto, to, Duration::from_millis(700));
        if want(&o) || Instant::now() > deadline {
            return o;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The tunnel between the nodes narrowed to 1400 bytes, the pods' links and the outside at
/// 1500: what crosses from a pod or the outside to the other node must learn the path's MTU.
fn narrow_the_tunnel(c: &Cluster) {
    for node in &c.nodes {
        run(&["ip", "-n", &node.ns, "link", "set", "tun0", "mtu", "1400"]).expect("tun0 mtu");
    }
    for pod in &c.pods {
        let node = &c.nodes[pod.node - 1].ns;
        run(&[
            "ip",
            "-n",
            node,
            "link",
            "set",
            &pod.host_iface,
            "mtu",
            "1500",
        ])
        .expect("mtu");
        run(&["ip", "-n", &pod.ns, "link", "set", "eth0", "mtu", "1500"]).expect("mtu");
    }
}

/// 1 MB uploaded from each origin to its address arrives whole.
fn uploads_arrive_whole(c: &Cluster, cases: &[(Origin, String)]) {
    let size = (1 << 20).to_string();
    for (origin, to) in cases {
        let (code, out) = lab_client(
            c,
            origin,
            &["upload", to, "--size", &size, "--timeout-ms", "8000"],
        );
        println!("{origin:?} → {to}: {out}");
        assert_eq!(code, 0, "{origin:?} → {to}: {out}");
    }
}

/// Ten 2900-byte datagrams from each origin to its address come back whole, in one of
/// `rounds` rounds (a new socket each).
fn echoes_come_back_whole(
    c: &Cluster,
    network: Network,
    cases: &[(Origin, String)],
    rounds: usize,
) {
    for (origin, to) in cases {
        let mut outs = Vec::new();
        while outs.len() < rounds {
            let (code, out) = lab_client(
                c,
                origin,
                &[
                    "udp-echo",
                    to,
                    "--size",
                    "2900",
                    "--count",
                    "10",
                    "--timeout-ms",
                    "1000",
                ],
            );
            outs.push(out);
            if code == 0 {
                break;
            }
        }
        println!("{network}: {origin:?} → {to}: {outs:?}");
        assert!(
            outs.last().is_some_and(|r| r == "echoed=10/10"),
            "{network}: {origin:?} → {to}: no round came back whole: {outs:?}"
        );
    }
}

/// kube-proxy's e2e "should be able to handle large requests: udp": a 2900-byte datagram
/// (two fragments at MTU 1500) echoed back whole, ten times, from a pod to a ClusterIP and
/// from outside to a NodePort of every node (each Service's endpoints are on both nodes, so
/// the datagrams go to local and remote backends).
#[test]
fn large_udp_datagrams_through_services_come_back_whole() {
    require_root();
    let _turn = turn();
    for network in [Network::Bridge, Network::Vxlan] {
        let c = cluster(network);
        let web = SocketAddrV4::new(WEB, 53).to_string();
        let cases = [
            (Origin::Pod("node1-pod1".into()), web.clone()),
            (Origin::Pod("node2-pod2".into()), web.clone()),
            (
                Origin::Outside(CLIENT_IP),
                SocketAddrV4::new(node_ip(1), WEB_NODEPORT_UDP).to_string(),
            ),
            (
                Origin::Outside(CLIENT_IP),
                SocketAddrV4::new(node_ip(2), WEB_NODEPORT_UDP).to_string(),
            ),
        ];
        echoes_come_back_whole(&c, network, &cases, 1);
        for k in [1, 2] {
            assert!(
                datapath_counter(&c, k, "fragment_nat") > 0,
                "{network}: node {k} translated no later fragment"
            );
        }
    }
}

/// The IPv6 twin of `large_udp_datagrams_through_services_come_back_whole`: 2900-byte
/// datagrams over IPv6 (two fragments, each with a fragment extension header) to IPv6
/// ClusterIPs and NodePorts whose only endpoint is on the other node (`on-nodeK`), echoed
/// back whole. In the VXLAN lab the IPv6
/// overlay device (flannel-v6.1, 1430 bytes: VXLAN over IPv6) is narrower than the pods'
/// links (1450): IPv6 is never fragmented on the way, so the node answers the pod's first
/// fragment with a packet too big quoting it (fragment header and all), and only once the
/// datapath has translated that back to the Service's address does the pod fragment to fit.
/// As without a Service, what was sent before the sender learned the path's MTU is lost
/// (RFC 8201), once per sender and path: the client (its Service's address) and the
/// backend (its client's address). Within five rounds of ten (a new socket each) one must
/// come back whole. Without the packet too big translated, none does (the client never
/// learns: every datagram's first fragment is lost).
#[test]
fn large_udp_datagrams_through_ipv6_services_come_back_whole() {
    require_root();
    let _turn = turn();
    for network in [Network::Bridge, Network::Vxlan] {
        let c = cluster_with(ClusterConfig {
            network,
            dual_stack: true,
            ..ClusterConfig::new(2, 2)
        });
        let cases = [
            (
                Origin::Pod("node1-pod1".into()),
                SocketAddr::from((on_node6(2), 53)).to_string(),
            ),
            (
                Origin::Pod("node2-pod2".into()),
                SocketAddr::from((on_node6(1), 53)).to_string(),
            ),
            (
                Origin::Outside6(CLIENT_IP6),
                SocketAddr::from((node_ip6(1), on_node_udp(2))).to_string(),
            ),
            (
                Origin::Outside6(CLIENT_IP6),
                SocketAddr::from((node_ip6(2), on_node_udp(1))).to_string(),
            ),
        ];
        echoes_come_back_whole(&c, network, &cases, 5);
        for k in [1, 2] {
            assert!(
                datapath_counter(&c, k, "fragment_nat") > 0,
                "{network}: node {k} translated no later fragment"
            );
        }
    }
}

/// Path MTU discovery across a Service: the nodes' pods and the outside client have MTU
/// 1500, the tunnel between the nodes 1400. An upload from outside through a NodePort to a
/// backend on the other node is source-NATed to the node, so the kernel's own "fragmentation
/// needed" would go to the node's address; the datapath tells the client instead, and 1 MB
/// arrives whole. The same upload from a pod through a ClusterIP keeps the pod's address:
/// there the kernel's error goes to the pod and is translated where it leaves.
#[test]
fn path_mtu_discovery_works_across_a_service() {
    require_root();
    let _turn = turn();
    let c = cluster(Network::Tunnel);
    narrow_the_tunnel(&c);
    // A sink Service whose only endpoint is node 2's first pod (lab-server's port 9000).
    let sink_vip = Ipv4Addr::new(10, 96, 1, 60);
    let pod = c
        .pods
        .iter()
        .find(|p| p.node == 2)
        .expect("a pod on node 2");
    c.write_manifest(
        "sink.yaml",
        &format!(
            r"
apiVersion: v1
kind: Service
metadata: {{name: sink}}
spec:
  type: NodePort
  clusterIP: {sink_vip}
  ports:
  - {{name: sink, port: 9000, nodePort: 30900}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: sink-1, labels: {{kubernetes.io/service-name: sink}}}}
addressType: IPv4
ports:
- {{name: sink, port: 9000, protocol: TCP}}
endpoints:
- {{addresses: [{}], nodeName: node2}}
",
            pod.ip
        ),
    )
    .expect("manifest");
    std::thread::sleep(Duration::from_secs(1));
    let cases = [
        (
            Origin::Outside(CLIENT_IP),
            SocketAddrV4::new(node_ip(1), 30900).to_string(),
        ),
        (
            Origin::Pod("node1-pod1".into()),
            SocketAddrV4::new(sink_vip, 9000).to_string(),
        ),
    ];
    uploads_arrive_whole(&c, &cases);
    assert!(
        datapath_counter(&c, 1, "frag_needed_sent") > 0,
        "node 1 sent no fragmentation-needed"
    );
    assert!(
        datapath_counter(&c, 1, "icmp_error_nat") > 0,
        "node 1 translated no ICMP error"
    );
}

/// The IPv6 twin of `path_mtu_discovery_works_across_a_service`: an IPv6 router never
/// fragments, so a source-NATed packet too big for tun0 must come back to the client as an
/// ICMPv6 packet too big from the datapath (the kernel's would go to the node's own address),
/// and the one from the node's stack to a pod's flow is translated where it leaves.
#[test]
fn path_mtu_discovery_works_across_an_ipv6_service() {
    require_root();
    let _turn = turn();
    let c = cluster_with(ClusterConfig {
        network: Network::Tunnel,
        dual_stack: true,
        ..ClusterConfig::new(2, 2)
    });
    narrow_the_tunnel(&c);
    let sink_vip: Ipv6Addr = "fd00:10:96::1:60".parse().expect("address");
    let pod = c
        .pods
        .iter()
        .find(|p| p.node == 2)
        .expect("a pod on node 2");
    let pod_ip6 = pod.ip6.expect("a dual-stack pod");
    c.write_manifest(
        "sink6.yaml",
        &format!(
            r#"
apiVersion: v1
kind: Service
metadata: {{name: sink6}}
spec:
  type: NodePort
  ipFamilyPolicy: SingleStack
  ipFamilies: [IPv6]
  clusterIP: "{sink_vip}"
  clusterIPs: ["{sink_vip}"]
  ports:
  - {{name: sink, port: 9000, nodePort: 30901}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: sink6-1, labels: {{kubernetes.io/service-name: sink6}}}}
addressType: IPv6
ports:
- {{name: sink, port: 9000, protocol: TCP}}
endpoints:
- {{addresses: ["{pod_ip6}"], nodeName: node2}}
"#
        ),
    )
    .expect("manifest");
    std::thread::sleep(Duration::from_secs(1));
    let (sent, translated) = (
        datapath_counter(&c, 1, "frag_needed_sent"),
        datapath_counter(&c, 1, "icmp_error_nat"),
    );
    let cases = [
        (
            Origin::Outside6(CLIENT_IP6),
            SocketAddr::from((node_ip6(1), 30901)).to_string(),
        ),
        (
            Origin::Pod("node1-pod1".into()),
            SocketAddr::from((sink_vip, 9000)).to_string(),
        ),
    ];
    uploads_arrive_whole(&c, &cases);
    assert!(
        datapath_counter(&c, 1, "frag_needed_sent") > sent,
        "node 1 sent no ICMPv6 packet too big"
    );
    assert!(
        datapath_counter(&c, 1, "icmp_error_nat") > translated,
        "node 1 translated no ICMPv6 error"
    );
}

/// A UDP client of a Service whose backend's port is closed sees ECONNREFUSED: the backend's
/// ICMP port-unreachable reaches it translated, whether the backend is on its node or
/// another, whether the client is a pod or outside (source-NATed to a remote backend).
#[test]
fn a_closed_backend_port_refuses_a_udp_client_through_a_service() {
    require_root();
    let _turn = turn();
    for network in [Network::Bridge, Network::Tunnel] {
        let c = cluster(network);
        let closed_vip = Ipv4Addr::new(10, 96, 1, 61);
        let backend = c.pods.iter().find(|p| p.node == 1).expect("pod on node 1");
        c.write_manifest(
            "closed.yaml",
            &format!(
                r"
apiVersion: v1
kind: Service
metadata: {{name: closed}}
spec:
  type: NodePort
  clusterIP: {closed_vip}
  ports:
  - {{name: dns, port: 53, protocol: UDP, nodePort: 30953}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: closed-1, labels: {{kubernetes.io/service-name: closed}}}}
addressType: IPv4
ports:
- {{name: dns, port: 9, protocol: UDP}}
endpoints:
- {{addresses: [{}], nodeName: node1}}
",
                backend.ip
            ),
        )
        .expect("manifest");
        let cases = [
            (
                Origin::Pod("node1-pod2".into()),
                SocketAddrV4::new(closed_vip, 53),
            ),
            (
                Origin::Pod("node2-pod1".into()),
                SocketAddrV4::new(closed_vip, 53),
            ),
            (
                Origin::Outside(CLIENT_IP),
                SocketAddrV4::new(node_ip(1), 30953),
            ),
            (
                Origin::Outside(CLIENT_IP),
                SocketAddrV4::new(node_ip(2), 30953),
            ),
        ];
        for (origin, to) in cases {
            let o = wait_outcome(&c, &origin, Proto::Udp, to, |o| *o == Outcome::Refused);
            assert_eq!(o, Outcome::Refused, "{network}: {origin:?} → {to}");
        }
    }
}

/// The IPv6 twin of `a_closed_backend_port_refuses_a_udp_client_through_a_service`: the
/// backend's ICMPv6 port unreachable reaches the client translated (from the Service's
/// address, about the flow the client sent), from a pod on either node and from outside
/// through each node's NodePort.
#[test]
fn a_closed_backend_port_refuses_an_ipv6_udp_client_through_a_service() {
    require_root();
    let _turn = turn();
    for network in [Network::Bridge, Network::Tunnel] {
        let c = cluster_with(ClusterConfig {
            network,
            dual_stack: true,
            ..ClusterConfig::new(2, 2)
        });
        let closed_vip: Ipv6Addr = "fd00:10:96::1:61".parse().expect("address");
        let backend = c.pods.iter().find(|p| p.node == 1).expect("pod on node 1");
        c.write_manifest(
            "closed6.yaml",
            &format!(
                r#"
apiVersion: v1
kind: Service
metadata: {{name: closed6}}
spec:
  type: NodePort
  ipFamilyPolicy: SingleStack
  ipFamilies: [IPv6]
  clusterIP: "{closed_vip}"
  clusterIPs: ["{closed_vip}"]
  ports:
  - {{name: dns, port: 53, protocol: UDP, nodePort: 30954}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: closed6-1, labels: {{kubernetes.io/service-name: closed6}}}}
addressType: IPv6
ports:
- {{name: dns, port: 9, protocol: UDP}}
endpoints:
- {{addresses: ["{}"], nodeName: node1}}
"#,
                backend.ip6.expect("a dual-stack pod")
            ),
        )
        .expect("manifest");
        let cases = [
            (
                Origin::Pod("node1-pod2".into()),
                SocketAddr::from((closed_vip, 53)),
            ),
            (
                Origin::Pod("node2-pod1".into()),
                SocketAddr::from((closed_vip, 53)),
            ),
            (
                Origin::Outside6(CLIENT_IP6),
                SocketAddr::from((node_ip6(1), 30954)),
            ),
            (
                Origin::Outside6(CLIENT_IP6),
                SocketAddr::from((node_ip6(2), 30954)),
            ),
        ];
        for (origin, to) in cases {
            let o = wait_outcome(&c, &origin, Proto::Udp, to, |o| *o == Outcome::Refused);
            assert_eq!(o, Outcome::Refused, "{network}: {origin:?} → {to}");
        }
    }
}

/// Runs wrk from `origin` against `url` with new connections (`Connection: close`) for
/// `secs`: requests per second.
fn wrk_rate(c: &Cluster, origin: &Origin, url: &str, secs: u32) -> f64 {
    let out = c
        .run_from(
            origin,
            std::path::Path::new("wrk"),
            &[
                "-t1",
                "-c8",
                &format!("-d{secs}s"),
                "-H",
                "Connection: close",
                url,
            ],
        )
        .expect("wrk");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("wrk said: {text}{}", String::from_utf8_lossy(&out.stderr)))
}

/// A pod that used a ClusterIP and then connects straight to its backend (its client reuses
/// ports within seconds) must not have the direct flow's replies rewritten by the old Service
/// flows, nor meet the backend's TIME_WAIT of them: its direct connection rate stays what it
/// was before the Service traffic. The agents sweep at their defaults (closed flows kept as
/// long as the peers' TIME_WAIT). Over each family of the dual-stack lab.
#[test]
fn direct_connections_after_service_traffic_are_not_slowed() {
    require_root();
    let _turn = turn();
    let c = cluster_with(ClusterConfig {
        fast_sweep: false,
        dual_stack: true,
        ..ClusterConfig::new(2, 2)
    });
    let client = Origin::Pod("node1-pod2".into());
    let backend = c.pods.iter().find(|p| p.node == 1).expect("node1-pod1");
    let ip6 = backend.ip6.expect("a dual-stack pod");
    for (family, direct, via_service) in [
        (
            "IPv4",
            format!("http://{}:8080/", backend.ip),
            format!("http://{}:80/", on_node(1)),
        ),
        (
            "IPv6",
            format!("http://[{ip6}]:8080/"),
            format!("http://[{}]:80/", on_node6(1)),
        ),
    ] {
        let before = wrk_rate(&c, &client, &direct, 3);
        let service = wrk_rate(&c, &client, &via_service, 3);
        let after = wrk_rate(&c, &client, &direct, 3);
        println!(
            "{family}: new connections a second: direct {before:.0}, through the ClusterIP \
             {service:.0}, direct right after {after:.0}"
        );
        assert!(
            before > 500.0,
            "{family}: the lab serves too few connections: {before:.0}/s"
        );
        assert!(
            after > before * 0.5,
            "{family}: direct connections dropped from {before:.0}/s to {after:.0}/s after \
             Service traffic"
        );
    }
}
