//! Packet tests of what a single node cannot show: backends on other nodes (SNAT to the node
//! address with an allocated port, and back), Maglev's choice (the same on every node, and
//! stable when a backend goes), loadBalancerSourceRanges, and the conntrack sweep that frees
//! SNAT ports. The real BPF object, programmed through the agent's control plane, run with
//! BPF_PROG_TEST_RUN. Needs root.
// Harness code: a lab that cannot be built panics with a message, arguments are passed as
// the call sites read best, and floats are compared exactly where they were parsed.
#![allow(
    clippy::needless_pass_by_value,
    clippy::missing_panics_doc,
    clippy::float_cmp,
    clippy::unused_self
)]

use std::{
    collections::{BTreeSet, HashMap as StdHashMap},
    net::Ipv4Addr,
    time::Duration,
};

use aya::maps::{HashMap, Map, MapData};
use lb_common::{CtEntryV4, CtKeyV4};
use lb_control::translate::NodeInfo;
use lb_testkit::{
    frame::{parse, verify_checksums, Frame, ACK, FIN, SYN},
    Harness, SNAT_PORTS, TC_ACT_SHOT, XDP_DROP, XDP_PASS,
};
use lb_userspace::datapath::conntrack;

const NODE_A: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 2);
const NODE_B: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 3);
const CLIENT: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 100);
const LB_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);

fn node(name: &str, ip: Ipv4Addr) -> Harness {
    Harness::new(NodeInfo {
        name: name.into(),
        addresses: vec![ip.into()],
        zone: None,
    })
    .expect("datapath loads")
}

/// Backend i: 10.244.1.x on node-a for even i, 10.244.2.x on node-b for odd i.
fn backend(i: usize) -> (Ipv4Addr, &'static str) {
    if i.is_multiple_of(2) {
        (Ipv4Addr::new(10, 244, 1, 10 + i as u8), "node-a")
    } else {
        (Ipv4Addr::new(10, 244, 2, 10 + i as u8), "node-b")
    }
}

/// A LoadBalancer Service (LB IP 203.0.113.20:80, NodePort 30080 → 8080) over `backends`,
/// optionally fenced by `ranges`.
fn lb_service(backends: &[usize], ranges: &[&str]) -> String {
    let eps: String = backends
        .iter()
        .map(|i| {
            let (ip, node) = backend(*i);
            format!("- {{addresses: [{ip}], nodeName: {node}}}\n")
        })
        .collect();
    let ranges = if ranges.is_empty() {
        String::new()
    } else {
        format!("  loadBalancerSourceRanges: [{}]\n", ranges.join(", "))
    };
    format!(
        r"
apiVersion: v1
kind: Service
metadata: {{name: web}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.10
  ports:
  - {{name: http, port: 80, nodePort: 30080}}
{ranges}status:
  loadBalancer:
    ingress: [{{ip: {LB_IP}}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports:
- {{name: http, port: 8080, protocol: TCP}}
endpoints:
{eps}"
    )
}

/// Where the datapath sends a SYN: (verdict, rewritten frame).
fn send(h: &Harness, f: &Frame) -> (u32, Frame) {
    let (verdict, out) = h.run(&f.build()).expect("test run");
    (verdict, parse(&out))
}

#[test]
fn outside_to_a_remote_backend_is_snatted_to_the_node_and_back() {
    let mut h = node("node-a", NODE_A);
    // One backend, on node-b.
    h.program(&lb_service(&[1], &[])).expect("program");
    let (pod, _) = backend(1);
    let syn = Frame::tcp((CLIENT, 40000), (NODE_A, 30080), SYN);
    let (verdict, out) = send(&h, &syn);
    assert_eq!(verdict, XDP_PASS);
    assert_eq!((out.dst, out.dport), (pod, 8080), "DNAT to the backend");
    assert_eq!(out.src, NODE_A, "SNAT to the node address");
    assert!(
        (SNAT_PORTS.0..=SNAT_PORTS.1).contains(&out.sport),
        "port {} in the SNAT range",
        out.sport
    );
    verify_checksums(&out.build()).expect("checksums");
    let port = out.sport;

    // The next packet of the flow takes the same translation.
    let ack = Frame::tcp((CLIENT, 40000), (NODE_A, 30080), ACK);
    let (_, out2) = send(&h, &ack);
    assert_eq!((out2.src, out2.sport, out2.dst), (NODE_A, port, pod));

    // The backend's reply to the node and port comes back as the NodePort's, to the client.
    let synack = Frame::tcp((pod, 8080), (NODE_A, port), SYN | ACK);
    let (verdict, back) = send(&h, &synack);
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(
        (back.src, back.sport, back.dst, back.dport),
        (NODE_A, 30080, CLIENT, 40000)
    );
    let raw = h.run(&synack.build()).expect("run").1;
    verify_checksums(&raw).expect("reply checksums");

    // The same via the LB IP: the reply's source is the LB IP.
    let syn = Frame::tcp((CLIENT, 40001), (LB_IP, 80), SYN);
    let (_, out) = send(&h, &syn);
    assert_eq!((out.src, out.dst), (NODE_A, pod));
    let (_, back) = send(&h, &Frame::tcp((pod, 8080), (NODE_A, out.sport), SYN | ACK));
    assert_eq!(
        (back.src, back.sport, back.dst, back.dport),
        (LB_IP, 80, CLIENT, 40001)
    );
}

#[test]
fn a_pod_client_keeps_its_address_to_a_remote_backend() {
    let mut h = node("node-a", NODE_A);
    h.program(&lb_service(&[1], &[])).expect("program");
    let lo = 1;
    h.datapath
        .mark(lo, true)
        .expect("mark lo as a pod interface");
    let client_pod = Ipv4Addr::new(10, 244, 1, 50);
    let syn = Frame::tcp((client_pod, 40000), (Ipv4Addr::new(10, 96, 0, 10), 80), SYN);
    let (verdict, out) = h.run_from(lo, &syn.build()).expect("run");
    assert_eq!(verdict, XDP_PASS);
    let out = parse(&out);
    assert_eq!(
        (out.src, out.sport),
        (client_pod, 40000),
        "no SNAT for pods"
    );
    assert_eq!(out.dst, backend(1).0);
}

/// How many entries `LB4_SNAT` holds (one per source-NATed flow: its port).
fn snat_entries(h: &Harness) -> usize {
    let map = MapData::from_pin(h.pin.path().join("LB4_SNAT")).expect("LB4_SNAT");
    let map: HashMap<MapData, CtKeyV4, CtEntryV4> =
        HashMap::try_from(Map::LruHashMap(map)).expect("LB4_SNAT is an LRU hash");
    map.keys().count()
}

#[test]
fn snat_ports_never_collide_and_are_freed_when_flows_close() {
    let mut h = node("node-a", NODE_A);
    h.program(&lb_service(&[1], &[])).expect("program");
    let pod = backend(1).0;
    const FLOWS: u16 = 3000;
    let mut ports = BTreeSet::new();
    for i in 0..FLOWS {
        let (verdict, out) = send(&h, &Frame::tcp((CLIENT, 20000 + i), (NODE_A, 30080), SYN));
        assert_eq!(verdict, XDP_PASS, "flow {i}");
        assert!(
            ports.insert(out.sport),
            "flow {i}: port {} reused",
            out.sport
        );
    }
    println!(
        "{FLOWS} concurrent flows from one client to one remote backend: {} distinct SNAT ports",
        ports.len()
    );
    assert_eq!(ports.len(), FLOWS as usize);
    assert_eq!(snat_entries(&h), FLOWS as usize);

    // Nothing closed yet: a sweep keeps every flow.
    let t = conntrack::Timeouts {
        closed: Duration::ZERO,
        ..Default::default()
    };
    assert_eq!(conntrack::sweep(h.pin.path(), &t).expect("sweep").flows, 0);

    // Close every flow (FIN both ways), then sweep: every port is free again.
    for (i, port) in (0..FLOWS).zip(&ports) {
        let _ = send(
            &h,
            &Frame::tcp((CLIENT, 20000 + i), (NODE_A, 30080), FIN | ACK),
        );
        let _ = send(&h, &Frame::tcp((pod, 8080), (NODE_A, *port), FIN | ACK));
    }
    let swept = conntrack::sweep(h.pin.path(), &t).expect("sweep");
    println!("after closing: swept {swept:?}");
    assert_eq!(swept.flows, FLOWS as usize);
    assert_eq!(
        snat_entries(&h),
        0,
        "SNAT entries left after the flows closed"
    );
    // A new flow gets a port again.
    let (verdict, _) = send(&h, &Frame::tcp((CLIENT, 19999), (NODE_A, 30080), SYN));
    assert_eq!(verdict, XDP_PASS);
}

#[test]
fn a_reopened_snat_flow_gives_its_old_port_back() {
    let mut h = node("node-a", NODE_A);
    h.program(&lb_service(&[1], &[])).expect("program");
    let pod = backend(1).0;
    const FLOWS: u16 = 100;
    let mut moved = 0;
    for i in 0..FLOWS {
        let client_port = 30000 + i;
        let syn = Frame::tcp((CLIENT, client_port), (NODE_A, 30080), SYN);
        let port = send(&h, &syn).1.sport;
        // The connection closes both ways, then the client opens another from the same port.
        let _ = send(
            &h,
            &Frame::tcp((CLIENT, client_port), (NODE_A, 30080), FIN | ACK),
        );
        let _ = send(&h, &Frame::tcp((pod, 8080), (NODE_A, port), FIN | ACK));
        let (verdict, again) = send(&h, &syn);
        assert_eq!(verdict, XDP_PASS);
        assert_eq!((again.src, again.dst), (NODE_A, pod), "flow {i}");
        let (_, back) = send(
            &h,
            &Frame::tcp((pod, 8080), (NODE_A, again.sport), SYN | ACK),
        );
        assert_eq!(
            (back.src, back.dst, back.dport),
            (NODE_A, CLIENT, client_port)
        );
        if again.sport != port {
            moved += 1;
            // The old port is no longer translated.
            let late = Frame::tcp((pod, 8080), (NODE_A, port), ACK).build();
            let out = h.run(&late).expect("run").1;
            assert_eq!(out, late, "flow {i}: old port {port} still mapped");
        }
    }
    // Ports are drawn at random from 4,536: nearly every reopened flow gets another one.
    assert!(
        moved > FLOWS / 2,
        "{moved} of {FLOWS} reopened flows changed port"
    );
    assert_eq!(
        snat_entries(&h),
        FLOWS as usize,
        "one SNAT entry per open flow: the closed flows' ports went back"
    );
}

#[test]
fn maglev_picks_the_same_backend_on_every_node_and_moves_a_tenth_on_removal() {
    let all: Vec<usize> = (0..10).collect();
    let flows: Vec<Frame> = (0..10_000u32)
        .map(|i| {
            let client = Ipv4Addr::new(
                100,
                64 + (i >> 14) as u8,
                (i >> 6) as u8,
                1 + (i & 63) as u8,
            );
            Frame::tcp((client, 10000 + (i % 50_000) as u16), (LB_IP, 80), SYN)
        })
        .collect();
    let choices = |backends: &[usize]| -> [Vec<Ipv4Addr>; 2] {
        [("node-a", NODE_A), ("node-b", NODE_B)].map(|(name, ip)| {
            let mut h = node(name, ip);
            h.program(&lb_service(backends, &[])).expect("program");
            flows
                .iter()
                .map(|f| {
                    let (verdict, out) = send(&h, f);
                    assert_eq!(verdict, XDP_PASS);
                    out.dst
                })
                .collect()
        })
    };
    let [a, b] = choices(&all);
    assert_eq!(a, b, "node-a and node-b choose alike for every flow");
    let mut per_backend: StdHashMap<Ipv4Addr, usize> = StdHashMap::new();
    for d in &a {
        *per_backend.entry(*d).or_default() += 1;
    }
    assert_eq!(per_backend.len(), 10);
    for (d, n) in &per_backend {
        assert!((800..=1200).contains(n), "backend {d} got {n} of 10000");
    }

    // Remove backend 3 (on node-b) everywhere.
    let without: Vec<usize> = all.iter().copied().filter(|i| *i != 3).collect();
    let [a2, b2] = choices(&without);
    assert_eq!(a2, b2, "still alike after the removal");
    let moved = a.iter().zip(&a2).filter(|(x, y)| x != y).count();
    let lost = a.iter().filter(|d| **d == backend(3).0).count();
    let share = moved as f64 / flows.len() as f64;
    println!(
        "maglev: removing 1 of 10 backends changed {moved} of {} flows ({:.1} %); {lost} of them \
         were on the removed backend",
        flows.len(),
        share * 100.0
    );
    assert!(moved >= lost);
    assert!((0.07..=0.15).contains(&share), "moved share {share}");
}

#[test]
fn source_ranges_fence_every_client_of_the_lb_ip_pods_too_and_not_the_node_port() {
    let mut h = node("node-a", NODE_A);
    h.program(&lb_service(&[0], &["172.18.0.101/30", "192.0.2.0/24"]))
        .expect("program");
    let allowed = Frame::tcp((CLIENT, 40000), (LB_IP, 80), SYN);
    assert_eq!(
        send(&h, &allowed).0,
        XDP_PASS,
        "172.18.0.100 is in 172.18.0.100/30 (written as .101/30)"
    );
    let other = Frame::tcp((Ipv4Addr::new(192, 0, 2, 77), 40000), (LB_IP, 80), SYN);
    assert_eq!(send(&h, &other).0, XDP_PASS, "in the second range");
    let denied_ip = Ipv4Addr::new(172, 18, 0, 200);
    let denied = Frame::tcp((denied_ip, 40000), (LB_IP, 80), SYN);
    assert_eq!(send(&h, &denied).0, XDP_DROP, "outside the ranges");
    // The NodePort of the same Service is not fenced (kube-proxy: LB IPs only).
    let np = Frame::tcp((denied_ip, 40001), (NODE_A, 30080), SYN);
    assert_eq!(send(&h, &np).0, XDP_PASS);
    // Pods are fenced too (kube-proxy's firewall chain sees their traffic): one outside the
    // ranges is dropped, one inside passes, through XDP and the pod interfaces' TC program.
    h.datapath
        .mark(1, true)
        .expect("mark lo as a pod interface");
    let outside_pod = Frame::tcp((Ipv4Addr::new(10, 244, 1, 77), 40002), (LB_IP, 80), SYN);
    assert_eq!(
        h.run_from(1, &outside_pod.build()).expect("run").0,
        XDP_DROP
    );
    assert_eq!(h.run_pod(&outside_pod.build()).expect("run").0, TC_ACT_SHOT);
    h.program(&lb_service(&[0], &["172.18.0.101/30", "10.244.1.77/32"]))
        .expect("program");
    assert_eq!(
        h.run_from(1, &outside_pod.build()).expect("run").0,
        XDP_PASS
    );
    let (verdict, out) = h.run_pod(&outside_pod.build()).expect("run");
    assert_ne!(verdict, TC_ACT_SHOT);
    assert_ne!(out, outside_pod.build(), "the pod's SYN was translated");

    // The LB IP as a source (a load balancer looping a packet back): let in only when one of
    // the node's addresses is inside the ranges.
    let looped = Frame::tcp((LB_IP, 40004), (LB_IP, 80), SYN);
    assert_eq!(
        send(&h, &looped).0,
        XDP_DROP,
        "node-a is outside the ranges"
    );
    h.program(&lb_service(&[0], &["172.18.0.101/30", "172.18.0.0/30"]))
        .expect("program");
    assert_eq!(
        send(&h, &looped).0,
        XDP_PASS,
        "node-a is inside 172.18.0.0/30"
    );

    // Removing the ranges opens the LB IP; the stale prefixes are gone from the map.
    h.program(&lb_service(&[0], &[])).expect("program");
    assert_eq!(
        send(&h, &Frame::tcp((denied_ip, 40003), (LB_IP, 80), SYN)).0,
        XDP_PASS
    );
}

/// NodePorts on 127.0.0.1 are for the node's own processes (the socket hooks): a packet
/// addressed there that reaches the datapath is not taken to a backend.
#[test]
fn a_packet_to_a_localhost_node_port_is_not_translated() {
    let mut h = Harness::new(NodeInfo {
        name: "node-a".into(),
        addresses: vec![NODE_A.into(), Ipv4Addr::LOCALHOST.into()],
        zone: None,
    })
    .expect("datapath loads");
    h.program(&lb_service(&[0], &[])).expect("program");
    let to_node = Frame::tcp((CLIENT, 40001), (NODE_A, 30080), SYN);
    let (_, out) = h.run(&to_node.build()).expect("test run");
    assert_ne!(out, to_node.build(), "the node address is served");
    let to_lo = Frame::tcp((CLIENT, 40000), (Ipv4Addr::LOCALHOST, 30080), SYN);
    let (verdict, out) = h.run(&to_lo.build()).expect("test run");
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(out, to_lo.build(), "left as it came");
}
