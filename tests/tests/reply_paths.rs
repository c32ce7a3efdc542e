//! Packet tests of the paths real clusters take that the lab's bridge does not: replies
//! translated where they leave (`lb_tc_egress`) whatever link they came in by, endpoints at
//! the node's own address, IP fragments, ICMP errors of translated flows, and a client that
//! reuses a Service flow's port to reach its backend directly. The real BPF object runs each
//! frame (BPF_PROG_TEST_RUN); checksums are verified from scratch, fragments reassembled
//! before they are. Needs root.
// Harness code: a lab that cannot be built panics with a message, arguments are passed as
// the call sites read best, and floats are compared exactly where they were parsed.
#![allow(
    clippy::needless_pass_by_value,
    clippy::missing_panics_doc,
    clippy::float_cmp,
    clippy::unused_self
)]

use std::net::Ipv4Addr;

use lb_control::translate::NodeInfo;
use lb_testkit::{
    frame::{checksum, parse, verify_checksums, Frame, ACK, FIN, ICMP, SYN, TCP, UDP},
    Harness, TC_NEXT, XDP_PASS,
};
use lb_userspace::datapath::stats::read_stats;

const NODE_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 2);
const OTHER_NODE: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 3);
const CLIENT: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 100);
const ROUTER: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 254);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// `kubernetes`: its endpoint is the node's own address (kube-apiserver, host network).
const API_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
const POD1: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 11);
const POD2: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 12);
/// A pod on the other node.
const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 11);
const HAIRPIN: Ipv4Addr = Ipv4Addr::new(169, 254, 42, 1);

fn harness() -> Harness {
    let mut h = Harness::new(NodeInfo {
        name: "node-a".into(),
        addresses: vec![NODE_IP.into()],
        zone: None,
    })
    .expect("datapath loads");
    h.program(&manifests()).expect("program");
    h
}

/// `web` (ClusterIP VIP, NodePort 30080 / 30053) over POD1; `remote` (NodePort 30090) over a
/// pod on another node; `kubernetes` (443 → 6443, 53 → 6053 UDP, NodePort 30443) over the
/// node's own address.
fn manifests() -> String {
    format!(
        r"
apiVersion: v1
kind: Service
metadata: {{name: web}}
spec:
  type: NodePort
  clusterIP: {VIP}
  ports:
  - {{name: http, port: 80, nodePort: 30080}}
  - {{name: dns, port: 53, protocol: UDP, nodePort: 30053}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports:
- {{name: http, port: 8080, protocol: TCP}}
- {{name: dns, port: 5353, protocol: UDP}}
endpoints:
- {{addresses: [{POD1}], nodeName: node-a}}
---
apiVersion: v1
kind: Service
metadata: {{name: remote}}
spec:
  type: NodePort
  clusterIP: 10.96.0.20
  ports:
  - {{name: http, port: 80, nodePort: 30090}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: remote-1, labels: {{kubernetes.io/service-name: remote}}}}
addressType: IPv4
ports:
- {{name: http, port: 8080, protocol: TCP}}
endpoints:
- {{addresses: [{REMOTE_POD}], nodeName: node-b}}
---
apiVersion: v1
kind: Service
metadata: {{name: kubernetes, namespace: default}}
spec:
  type: NodePort
  clusterIP: {API_VIP}
  ports:
  - {{name: https, port: 443, nodePort: 30443}}
  - {{name: dns, port: 53, protocol: UDP}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: kubernetes, namespace: default, labels: {{kubernetes.io/service-name: kubernetes}}}}
addressType: IPv4
ports:
- {{name: https, port: 6443, protocol: TCP}}
- {{name: dns, port: 6053, protocol: UDP}}
endpoints:
- {{addresses: [{NODE_IP}], nodeName: node-a}}
"
    )
}

/// Runs a frame and checks the verdict is "pass on" and the checksums hold.
fn pass(verdict_and_out: (u32, Vec<u8>), want: u32, what: &str) -> Vec<u8> {
    let (verdict, out) = verdict_and_out;
    assert_eq!(verdict, want, "{what}: verdict");
    out
}

fn counter(h: &Harness, name: &str) -> u64 {
    read_stats(h.pin.path())
        .expect("stats")
        .into_iter()
        .find(|(n, _)| *n == name)
        .map_or(0, |(_, v)| v)
}

// ---- Replies translated where they leave --------------------------------------------------

#[test]
fn replies_are_translated_where_they_leave_whatever_link_they_came_in_by() {
    let h = harness();
    // A pod → ClusterIP flow to a pod on this node.
    let syn = Frame::tcp((POD2, 40000), (VIP, 80), SYN);
    let out = parse(&pass(
        h.run_pod(&syn.build()).expect("test run"),
        TC_NEXT,
        "syn",
    ));
    assert_eq!((out.dst, out.dport), (POD1, 8080));
    // Its reply, as it leaves towards POD2 (it could have come over a tunnel, not through
    // POD1's veth): the frontend is its source again.
    let synack = Frame::tcp((POD1, 8080), (POD2, 40000), SYN | ACK);
    let out = pass(
        h.run_egress(&synack.build()).expect("test run"),
        TC_NEXT,
        "reply",
    );
    verify_checksums(&out).expect("checksums");
    assert_eq!(
        out,
        Frame {
            src: VIP,
            sport: 80,
            ..synack.clone()
        }
        .build()
    );
    assert_eq!(counter(&h, "reverse_nat_egress"), 1);
    // Translated once: what the ingress program already translated finds nothing more.
    let translated = pass(
        h.run_pod(&synack.build()).expect("test run"),
        TC_NEXT,
        "ingress",
    );
    let again = pass(
        h.run_egress(&translated).expect("test run"),
        TC_NEXT,
        "egress after ingress",
    );
    assert_eq!(again, translated);
}

#[test]
fn an_endpoint_at_the_nodes_own_address_answers_pods_and_outside_clients() {
    let h = harness();
    // A pod → the `kubernetes` ClusterIP → kube-apiserver on the node's address.
    let syn = Frame::tcp((POD2, 41000), (API_VIP, 443), SYN);
    let out = parse(&pass(
        h.run_pod(&syn.build()).expect("test run"),
        TC_NEXT,
        "pod syn",
    ));
    assert_eq!((out.src, out.dst, out.dport), (POD2, NODE_IP, 6443));
    // The node's own stack answers: the reply never crosses a pod veth's ingress, only the
    // egress of the pod's veth.
    let reply = Frame::tcp((NODE_IP, 6443), (POD2, 41000), SYN | ACK);
    let out = pass(
        h.run_egress(&reply.build()).expect("test run"),
        TC_NEXT,
        "pod reply",
    );
    verify_checksums(&out).expect("checksums");
    assert_eq!(
        out,
        Frame {
            src: API_VIP,
            sport: 443,
            ..reply.clone()
        }
        .build()
    );

    // UDP the same way.
    let q = Frame::udp((POD2, 41001), (API_VIP, 53), b"q");
    let out = parse(&pass(
        h.run_pod(&q.build()).expect("test run"),
        TC_NEXT,
        "pod udp",
    ));
    assert_eq!((out.dst, out.dport), (NODE_IP, 6053));
    let a = Frame::udp((NODE_IP, 6053), (POD2, 41001), b"a");
    let out = pass(
        h.run_egress(&a.build()).expect("test run"),
        TC_NEXT,
        "udp reply",
    );
    verify_checksums(&out).expect("checksums");
    assert_eq!(
        out,
        Frame {
            src: API_VIP,
            sport: 53,
            ..a.clone()
        }
        .build()
    );

    // An outside client → the NodePort → the node's own address; the reply leaves by the
    // external interface's egress.
    let syn = Frame::tcp((CLIENT, 42000), (NODE_IP, 30443), SYN);
    let out = parse(&pass(
        h.run_ext(&syn.build()).expect("test run"),
        TC_NEXT,
        "outside syn",
    ));
    assert_eq!((out.src, out.dst, out.dport), (CLIENT, NODE_IP, 6443));
    let reply = Frame::tcp((NODE_IP, 6443), (CLIENT, 42000), SYN | ACK);
    let out = pass(
        h.run_egress(&reply.build()).expect("test run"),
        TC_NEXT,
        "outside reply",
    );
    verify_checksums(&out).expect("checksums");
    assert_eq!(
        out,
        Frame {
            sport: 30443,
            ..reply.clone()
        }
        .build()
    );
}

#[test]
fn translations_that_change_the_destination_are_left_to_ingress() {
    let h = harness();
    // Hairpin: POD1 → its own Service → POD1, from the reserved address.
    let syn = Frame::tcp((POD1, 43000), (VIP, 80), SYN);
    let out = parse(&pass(
        h.run_pod(&syn.build()).expect("test run"),
        TC_NEXT,
        "hairpin",
    ));
    assert_eq!((out.src, out.dst), (HAIRPIN, POD1));
    // Its reply must be translated before routing (its destination changes): egress leaves it.
    let reply = Frame::tcp((POD1, 8080), (HAIRPIN, 43000), SYN | ACK).build();
    assert_eq!(
        pass(h.run_egress(&reply).expect("test run"), TC_NEXT, "egress"),
        reply
    );
}

// ---- Fragments ------------------------------------------------------------------------------

/// Splits an IPv4 frame (header without options) into fragments of at most `chunk` payload
/// bytes (a multiple of 8), each with its own header and checksum.
fn fragment(frame: &[u8], chunk: usize) -> Vec<Vec<u8>> {
    let (eth, ip) = frame.split_at(14);
    let payload = &ip[20..];
    let mut out = Vec::new();
    let mut off = 0;
    while off < payload.len() {
        let end = (off + chunk).min(payload.len());
        let more = end < payload.len();
        let mut h = ip[..20].to_vec();
        h[2..4].copy_from_slice(&((20 + end - off) as u16).to_be_bytes());
        let flags = if more { 0x2000 } else { 0 } | (off / 8) as u16;
        h[6..8].copy_from_slice(&flags.to_be_bytes());
        h[10..12].copy_from_slice(&[0, 0]);
        let c = checksum(0, &h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        let mut f = eth.to_vec();
        f.extend(h);
        f.extend(&payload[off..end]);
        out.push(f);
        off = end;
    }
    out
}

/// Puts fragments (checked to agree on addresses, id and protocol) back into one frame.
fn reassemble(frags: &[Vec<u8>]) -> Vec<u8> {
    let first = &frags[0];
    let mut payload: Vec<u8> = Vec::new();
    for f in frags {
        verify_ip_header(f);
        assert_eq!(f[26..34], first[26..34], "fragments disagree on addresses");
        assert_eq!(f[18..20], first[18..20], "fragments disagree on the id");
        let off = usize::from(u16::from_be_bytes([f[20], f[21]]) & 0x1fff) * 8;
        assert_eq!(off, payload.len(), "fragments out of order");
        payload.extend(&f[34..]);
    }
    let mut h = first[14..34].to_vec();
    h[2..4].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    h[6..8].copy_from_slice(&0x4000u16.to_be_bytes());
    h[10..12].copy_from_slice(&[0, 0]);
    let c = checksum(0, &h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    let mut out = first[..14].to_vec();
    out.extend(h);
    out.extend(payload);
    out
}

fn verify_ip_header(frame: &[u8]) {
    assert_eq!(checksum(0, &frame[14..34]), 0, "bad IPv4 header checksum");
}

/// A 3000-byte UDP datagram in fragments of 1480 bytes (MTU 1500).
fn big_udp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), id: u16) -> (Frame, Vec<Vec<u8>>) {
    let payload: Vec<u8> = (0..3000u32).map(|i| (i * 7 + 3) as u8).collect();
    let f = Frame {
        ip_id: id,
        ..Frame::udp(src, dst, &payload)
    };
    let frags = fragment(&f.build(), 1480);
    assert_eq!(frags.len(), 3);
    (f, frags)
}

#[test]
fn every_fragment_of_a_datagram_is_translated_like_its_first() {
    let h = harness();
    // A pod → ClusterIP, 3000 bytes.
    let (q, frags) = big_udp((POD2, 33333), (VIP, 53), 0x4242);
    let out: Vec<Vec<u8>> = frags
        .iter()
        .map(|f| pass(h.run_pod(f).expect("test run"), TC_NEXT, "query fragment"))
        .collect();
    let whole = reassemble(&out);
    verify_checksums(&whole).expect("checksums");
    assert_eq!(
        parse(&whole),
        Frame {
            dst: POD1,
            dport: 5353,
            ..q.clone()
        }
    );
    assert_eq!(counter(&h, "fragment_nat"), 2);
    // The backend's 3000-byte answer, fragmented too.
    let (a, frags) = big_udp((POD1, 5353), (POD2, 33333), 0x5151);
    let out: Vec<Vec<u8>> = frags
        .iter()
        .map(|f| pass(h.run_pod(f).expect("test run"), TC_NEXT, "answer fragment"))
        .collect();
    let whole = reassemble(&out);
    verify_checksums(&whole).expect("checksums");
    assert_eq!(
        parse(&whole),
        Frame {
            src: VIP,
            sport: 53,
            ..a.clone()
        }
    );

    // From outside to the NodePort, in XDP.
    let (q, frags) = big_udp((CLIENT, 34444), (NODE_IP, 30053), 0x6161);
    let out: Vec<Vec<u8>> = frags
        .iter()
        .map(|f| pass(h.run(f).expect("test run"), XDP_PASS, "nodeport fragment"))
        .collect();
    let whole = reassemble(&out);
    verify_checksums(&whole).expect("checksums");
    assert_eq!(
        parse(&whole),
        Frame {
            dst: POD1,
            dport: 5353,
            ..q.clone()
        }
    );
    // The answer from the host-network `kubernetes` endpoint, leaving by egress.
    let (q, frags) = big_udp((POD2, 35555), (API_VIP, 53), 0x7171);
    for f in &frags {
        pass(
            h.run_pod(f).expect("test run"),
            TC_NEXT,
            "query to the node",
        );
    }
    let (a, frags) = big_udp((NODE_IP, 6053), (POD2, 35555), 0x7272);
    let out: Vec<Vec<u8>> = frags
        .iter()
        .map(|f| {
            pass(
                h.run_egress(f).expect("test run"),
                TC_NEXT,
                "egress fragment",
            )
        })
        .collect();
    let whole = reassemble(&out);
    verify_checksums(&whole).expect("checksums");
    assert_eq!(
        parse(&whole),
        Frame {
            src: API_VIP,
            sport: 53,
            ..a.clone()
        }
    );
    let _ = q;
}

#[test]
fn a_fragment_of_an_unknown_datagram_is_never_rewritten() {
    let h = harness();
    // The later fragments of a datagram to the ClusterIP, without their first: nothing tells
    // their ports, so they are left alone (and counted).
    let (_, frags) = big_udp((POD2, 36666), (VIP, 53), 0x0a0a);
    for f in &frags[1..] {
        assert_eq!(pass(h.run_pod(f).expect("test run"), TC_NEXT, "orphan"), *f);
        assert_eq!(
            pass(h.run(f).expect("test run"), XDP_PASS, "orphan xdp"),
            *f
        );
        assert_eq!(
            pass(h.run_egress(f).expect("test run"), TC_NEXT, "orphan egress"),
            *f
        );
    }
    assert_eq!(counter(&h, "pass_fragment_unknown"), 4);
    // A datagram that is not a Service's: its fragments pass untouched, the first too.
    let (_, frags) = big_udp((POD2, 36667), (REMOTE_POD, 9999), 0x0b0b);
    for f in &frags {
        assert_eq!(
            pass(h.run_pod(f).expect("test run"), TC_NEXT, "not ours"),
            *f
        );
    }
}

// ---- ICMP errors ------------------------------------------------------------------------------

/// An ICMP error frame from `from` to `to`, quoting the IPv4 header and `quote` bytes of the
/// payload of `about` (an Ethernet frame).
fn icmp_error(
    from: Ipv4Addr,
    to: Ipv4Addr,
    kind: (u8, u8, u16),
    about: &[u8],
    quote: usize,
) -> Vec<u8> {
    let quoted = &about[14..(34 + quote).min(about.len())];
    let mut icmp = vec![kind.0, kind.1, 0, 0, 0, 0];
    icmp.extend(kind.2.to_be_bytes());
    icmp.extend(quoted);
    let c = checksum(0, &icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    Frame {
        proto: ICMP,
        payload: icmp,
        ..Frame::tcp((from, 0), (to, 0), 0)
    }
    .build()
}

/// Checks an ICMP error's outer IPv4, ICMP and quoted IPv4 checksums; returns (outer source,
/// outer destination, the quoted header + payload bytes).
fn read_icmp_error(frame: &[u8]) -> (Ipv4Addr, Ipv4Addr, Vec<u8>) {
    verify_ip_header(frame);
    assert_eq!(frame[23], ICMP);
    let icmp = &frame[34..];
    assert_eq!(checksum(0, icmp), 0, "bad ICMP checksum");
    let quoted = icmp[8..].to_vec();
    assert_eq!(checksum(0, &quoted[..20]), 0, "bad quoted IPv4 checksum");
    (
        Ipv4Addr::new(frame[26], frame[27], frame[28], frame[29]),
        Ipv4Addr::new(frame[30], frame[31], frame[32], frame[33]),
        quoted,
    )
}

/// The quoted header's (source, destination, source port, destination port).
fn quoted_tuple(q: &[u8]) -> (Ipv4Addr, Ipv4Addr, u16, u16) {
    (
        Ipv4Addr::new(q[12], q[13], q[14], q[15]),
        Ipv4Addr::new(q[16], q[17], q[18], q[19]),
        u16::from_be_bytes([q[20], q[21]]),
        u16::from_be_bytes([q[22], q[23]]),
    )
}

#[test]
fn a_backends_port_unreachable_reaches_the_client_as_the_frontends() {
    let h = harness();
    let q = Frame::udp((POD2, 37777), (VIP, 53), b"who is there");
    let sent = pass(h.run_pod(&q.build()).expect("test run"), TC_NEXT, "query");
    // POD1's port is closed: its kernel answers about the packet it got (quoting 8 bytes of
    // UDP, checksum included).
    let err = icmp_error(POD1, POD2, (3, 3, 0), &sent, 8);
    let out = pass(
        h.run_pod(&err).expect("test run"),
        TC_NEXT,
        "port unreachable",
    );
    let (src, dst, quoted) = read_icmp_error(&out);
    assert_eq!(
        (src, dst),
        (VIP, POD2),
        "from the frontend the client talked to"
    );
    assert_eq!(quoted_tuple(&quoted), (POD2, VIP, 37777, 53));
    // The quoted UDP checksum is the one the client sent: its datagram, as it knows it.
    let original = q.build();
    assert_eq!(quoted[26..28], original[40..42]);
    assert_eq!(counter(&h, "icmp_error_nat"), 1);
}

#[test]
fn a_routers_fragmentation_needed_reaches_a_source_natted_client() {
    let h = harness();
    // Outside → NodePort → a backend on another node: source-NATed to the node.
    let syn = Frame::tcp((CLIENT, 44000), (NODE_IP, 30090), SYN);
    let sent = pass(h.run_ext(&syn.build()).expect("test run"), TC_NEXT, "syn");
    let s = parse(&sent);
    assert_eq!((s.src, s.dst), (NODE_IP, REMOTE_POD));
    // A router on the way: fragmentation needed (MTU 1400), to the node's address, quoting
    // the whole TCP header (routers quote up to 576 bytes).
    let err = icmp_error(ROUTER, NODE_IP, (3, 4, 1400), &sent, 20);
    let out = pass(h.run_ext(&err).expect("test run"), TC_NEXT, "frag needed");
    let (src, dst, quoted) = read_icmp_error(&out);
    assert_eq!(
        (src, dst),
        (ROUTER, CLIENT),
        "the router's own address stays"
    );
    assert_eq!(quoted_tuple(&quoted), (CLIENT, NODE_IP, 44000, 30090));
    assert_eq!(u16::from_be_bytes([out[40], out[41]]), 1400, "the MTU");
    // The quoted TCP checksum is the client's own.
    assert_eq!(quoted[36..38], syn.build()[50..52]);
}

#[test]
fn a_time_exceeded_about_a_pods_flow_is_translated_where_it_leaves() {
    let h = harness();
    // A pod → ClusterIP of the remote Service: DNAT to the other node's pod, source kept.
    let syn = Frame::tcp((POD2, 45000), (Ipv4Addr::new(10, 96, 0, 20), 80), SYN);
    let sent = pass(h.run_pod(&syn.build()).expect("test run"), TC_NEXT, "syn");
    assert_eq!(parse(&sent).dst, REMOTE_POD);
    // A router between the nodes: time exceeded, to the pod (as it leaves towards it).
    let err = icmp_error(ROUTER, POD2, (11, 0, 0), &sent, 8);
    let out = pass(
        h.run_egress(&err).expect("test run"),
        TC_NEXT,
        "time exceeded",
    );
    let (src, dst, quoted) = read_icmp_error(&out);
    assert_eq!((src, dst), (ROUTER, POD2));
    assert_eq!(
        quoted_tuple(&quoted),
        (POD2, Ipv4Addr::new(10, 96, 0, 20), 45000, 80)
    );
}

#[test]
fn icmp_that_is_not_about_a_flow_of_ours_passes_untouched() {
    let h = harness();
    let about = Frame::udp((POD2, 46000), (REMOTE_POD, 53), b"x").build();
    let cases = [
        (
            "an error about another flow",
            icmp_error(ROUTER, POD2, (3, 1, 0), &about, 8),
        ),
        ("an echo request to a frontend", {
            let mut f = icmp_error(POD2, VIP, (8, 0, 0), &about, 8);
            // Type 8 is not an error, whatever it carries.
            f[34] = 8;
            f
        }),
        (
            "a quote cut short",
            icmp_error(ROUTER, POD2, (3, 3, 0), &about, 2),
        ),
    ];
    for (what, frame) in cases {
        assert_eq!(
            pass(h.run_pod(&frame).expect("test run"), TC_NEXT, what),
            frame,
            "{what}"
        );
        assert_eq!(
            pass(h.run(&frame).expect("test run"), XDP_PASS, what),
            frame,
            "{what}"
        );
        assert_eq!(
            pass(h.run_egress(&frame).expect("test run"), TC_NEXT, what),
            frame,
            "{what}"
        );
    }
}

// ---- A client reusing a port ----------------------------------------------------------------

/// A Service flow from POD2:47000 to POD1 behind the ClusterIP (ended with FINs if
/// `closed`), then POD2 uses port 47000 again straight to POD1.
fn service_flow_then_direct(h: &Harness, proto: u8, closed: bool) -> (Frame, u16) {
    let bport = if proto == TCP { 8080 } else { 5353 };
    let to_vip = |flags| match proto {
        TCP => Frame::tcp((POD2, 47000), (VIP, 80), flags),
        _ => Frame::udp((POD2, 47000), (VIP, 53), b"q"),
    };
    let out = parse(&pass(
        h.run_pod(&to_vip(SYN).build()).expect("test run"),
        TC_NEXT,
        "svc",
    ));
    assert_eq!((out.dst, out.dport), (POD1, bport));
    if closed {
        pass(
            h.run_pod(&to_vip(FIN | ACK).build()).expect("test run"),
            TC_NEXT,
            "fin",
        );
        let fin = Frame::tcp((POD1, bport), (POD2, 47000), FIN | ACK);
        pass(
            h.run_pod(&fin.build()).expect("test run"),
            TC_NEXT,
            "fin back",
        );
    }
    let direct = match proto {
        TCP => Frame::tcp((POD2, 47000), (POD1, bport), SYN),
        _ => Frame::udp((POD2, 47000), (POD1, bport), b"q"),
    };
    (direct, bport)
}

#[test]
fn a_direct_datagram_on_a_udp_service_flows_tuple_is_its_own() {
    let h = harness();
    let (direct, bport) = service_flow_then_direct(&h, UDP, false);
    // UDP has no end: the Service flow's entries go, and the direct flow passes as it is.
    let b = direct.build();
    assert_eq!(pass(h.run_pod(&b).expect("test run"), TC_NEXT, "direct"), b);
    assert_eq!(counter(&h, "direct_flow_claimed"), 1);
    // POD1's replies to it are its own, wherever they are looked at.
    let reply = Frame::udp((POD1, bport), (POD2, 47000), b"a").build();
    assert_eq!(
        pass(h.run_pod(&reply).expect("test run"), TC_NEXT, "reply"),
        reply
    );
    assert_eq!(
        pass(h.run_egress(&reply).expect("test run"), TC_NEXT, "egress"),
        reply
    );
    // The Service works on that port again afterwards, as a new flow.
    let again = Frame::udp((POD2, 47000), (VIP, 53), b"q");
    let out = parse(&pass(
        h.run_pod(&again.build()).expect("test run"),
        TC_NEXT,
        "again",
    ));
    assert_eq!((out.dst, out.dport), (POD1, bport));
}

/// Client port 47000 below the ephemeral range (32768 → 1024).
const REMAPPED: u16 = 47000 - 31744;

#[test]
fn a_direct_connection_on_a_service_flows_tuple_gets_a_port_of_its_own() {
    for closed in [true, false] {
        let h = harness();
        let what = format!("service flow closed: {closed}");
        let (direct, bport) = service_flow_then_direct(&h, TCP, closed);
        // As netfilter does with a tuple that clashes, the newer flow gets another source
        // port: the backend still holds the Service connection (or its TIME_WAIT) there.
        let out = pass(
            h.run_pod(&direct.build()).expect("test run"),
            TC_NEXT,
            "direct",
        );
        verify_checksums(&out).expect("checksums");
        assert_eq!(
            out,
            Frame {
                sport: REMAPPED,
                ..direct.clone()
            }
            .build(),
            "{what}"
        );
        assert_eq!(counter(&h, "direct_flow_remapped"), 1, "{what}");
        // Its next packet keeps that port.
        let next = Frame::tcp((POD2, 47000), (POD1, bport), ACK);
        let out = parse(&pass(
            h.run_pod(&next.build()).expect("test run"),
            TC_NEXT,
            "next",
        ));
        assert_eq!(out.sport, REMAPPED, "{what}");
        // POD1's replies to it get the client's port back where they leave towards the
        // client, once (coming in, they are left alone: translated there, they would look
        // like the Service flow's replies where they leave), never the frontend's address.
        let reply = Frame::tcp((POD1, bport), (POD2, REMAPPED), SYN | ACK);
        let ingress = pass(
            h.run_pod(&reply.build()).expect("test run"),
            TC_NEXT,
            "reply in",
        );
        assert_eq!(ingress, reply.build(), "{what}: ingress");
        let out = pass(
            h.run_egress(&ingress).expect("test run"),
            TC_NEXT,
            "reply out",
        );
        verify_checksums(&out).expect("checksums");
        let back = Frame {
            dport: 47000,
            ..reply.clone()
        };
        assert_eq!(out, back.build(), "{what}: egress");
        if !closed {
            // The open Service flow's own replies are still its own.
            let svc_reply = Frame::tcp((POD1, bport), (POD2, 47000), ACK);
            let out = parse(&pass(
                h.run_pod(&svc_reply.build()).expect("test run"),
                TC_NEXT,
                "svc",
            ));
            assert_eq!((out.src, out.sport, out.dport), (VIP, 80, 47000), "{what}");
        }
        // The direct connection ends; the client opens another from the same port to POD1:
        // it keeps the same port, so the backend sees one connection after the other.
        let fin = Frame::tcp((POD2, 47000), (POD1, bport), FIN | ACK);
        let out = parse(&pass(
            h.run_pod(&fin.build()).expect("test run"),
            TC_NEXT,
            "fin",
        ));
        assert_eq!(out.sport, REMAPPED, "{what}: fin");
        let fin_back = Frame::tcp((POD1, bport), (POD2, REMAPPED), FIN | ACK).build();
        pass(
            h.run_egress(&fin_back).expect("test run"),
            TC_NEXT,
            "fin back",
        );
        let out = parse(&pass(
            h.run_pod(&direct.build()).expect("test run"),
            TC_NEXT,
            "syn again",
        ));
        assert_eq!(out.sport, REMAPPED, "{what}: the next connection");
        assert_eq!(
            counter(&h, "direct_flow_remapped"),
            1,
            "{what}: one mapping"
        );
    }
}

#[test]
fn ordinary_traffic_between_pods_claims_nothing() {
    let h = harness();
    let syn = Frame::tcp((POD2, 48000), (VIP, 80), SYN);
    pass(h.run_pod(&syn.build()).expect("test run"), TC_NEXT, "svc");
    // Another port, another backend: no Service flow's reply tuple.
    for f in [
        Frame::tcp((POD2, 48001), (POD1, 8080), SYN),
        Frame::tcp((POD2, 48000), (POD1, 9090), SYN),
        Frame::udp((POD2, 48000), (REMOTE_POD, 8080), b"x"),
    ] {
        let b = f.build();
        assert_eq!(pass(h.run_pod(&b).expect("test run"), TC_NEXT, "other"), b);
    }
    assert_eq!(counter(&h, "direct_flow_remapped"), 0);
    assert_eq!(counter(&h, "direct_flow_claimed"), 0);
    // The Service flow's reply is still translated.
    let reply = Frame::tcp((POD1, 8080), (POD2, 48000), SYN | ACK).build();
    let out = parse(&pass(
        h.run_pod(&reply).expect("test run"),
        TC_NEXT,
        "reply",
    ));
    assert_eq!((out.src, out.sport), (VIP, 80));
    let _ = OTHER_NODE;
}
