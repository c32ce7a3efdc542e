//! Packet tests: the real BPF object, programmed through the agent's control plane, run with
//! BPF_PROG_TEST_RUN on crafted frames. Every rewritten byte is compared with a frame built
//! independently, and checksums are verified from scratch. Needs root.
// Harness code: a lab that cannot be built panics with a message, arguments are passed as
// the call sites read best, and floats are compared exactly where they were parsed.
#![allow(
    clippy::needless_pass_by_value,
    clippy::missing_panics_doc,
    clippy::float_cmp,
    clippy::unused_self
)]

use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration};

use aya::maps::{Array, HashMap as AyaHashMap, Map, MapData};
use lb_common::{map_names, Clock, CtEntryV4, CtKeyV4};
use lb_control::translate::NodeInfo;
use lb_testkit::{
    frame::{
        parse, verify_checksums, Frame, ACK, CLIENT_MAC, FIN, ICMP, NODE_MAC, PSH, RST, SYN, TCP,
    },
    Harness, TC_ACT_REDIRECT, TC_ACT_SHOT, TC_NEXT, XDP_DROP, XDP_PASS,
};
use lb_userspace::datapath::{clock::monotonic_ns, conntrack, stats::read_stats};

const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const POD1: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 11);
const POD2: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 12);
const HAIRPIN: Ipv4Addr = Ipv4Addr::new(169, 254, 42, 1);

fn harness() -> Harness {
    Harness::new(NodeInfo {
        name: "node-a".into(),
        addresses: vec![NODE_IP.into()],
        zone: None,
    })
    .expect("datapath loads")
}

/// A NodePort web Service (TCP 80 → 8080, NodePort 30080) and a UDP DNS port (53 → 5353).
fn services(backends: &[Ipv4Addr]) -> String {
    let eps: String = backends
        .iter()
        .map(|b| format!("- {{addresses: [{b}], nodeName: node-a}}\n"))
        .collect();
    let eps = if eps.is_empty() {
        "[]".to_string()
    } else {
        format!("\n{eps}")
    };
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
  - {{name: dns, port: 53, protocol: UDP}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports:
- {{name: http, port: 8080, protocol: TCP}}
- {{name: dns, port: 5353, protocol: UDP}}
endpoints: {eps}
"
    )
}

fn assert_pass_rewritten(h: &Harness, input: &Frame, expected: &Frame) {
    let (verdict, out) = h.run(&input.build()).expect("test run");
    assert_eq!(verdict, XDP_PASS, "verdict");
    verify_checksums(&out).unwrap_or_else(|e| panic!("{e}: {out:02x?}"));
    assert_eq!(
        out,
        expected.build(),
        "\n got  {:?}\n want {:?}",
        parse(&out),
        expected
    );
}

#[test]
fn nodeport_syn_is_dnatted_and_the_reply_reverse_natted() {
    let mut h = harness();
    h.program(&services(&[POD1])).expect("program");

    let syn = Frame::tcp((CLIENT, 40000), (NODE_IP, 30080), SYN);
    let dnat = Frame {
        dst: POD1,
        dport: 8080,
        ..syn.clone()
    };
    assert_pass_rewritten(&h, &syn, &dnat);

    let synack = Frame::tcp((POD1, 8080), (CLIENT, 40000), SYN | ACK);
    let rnat = Frame {
        src: NODE_IP,
        sport: 30080,
        ..synack.clone()
    };
    assert_pass_rewritten(&h, &synack, &rnat);

    // The rest of the flow, with payload, follows the same translation.
    let data = Frame::tcp((CLIENT, 40000), (NODE_IP, 30080), ACK | PSH)
        .with_payload(b"GET / HTTP/1.1\r\n\r\n");
    assert_pass_rewritten(
        &h,
        &data,
        &Frame {
            dst: POD1,
            dport: 8080,
            ..data.clone()
        },
    );
}

#[test]
fn udp_both_ways_with_and_without_checksum() {
    let mut h = harness();
    h.program(&services(&[POD1])).expect("program");

    let q = Frame::udp((POD2, 33333), (VIP, 53), b"query");
    assert_pass_rewritten(
        &h,
        &q,
        &Frame {
            dst: POD1,
            dport: 5353,
            ..q.clone()
        },
    );
    let a = Frame::udp((POD1, 5353), (POD2, 33333), b"answer");
    assert_pass_rewritten(
        &h,
        &a,
        &Frame {
            src: VIP,
            sport: 53,
            ..a.clone()
        },
    );

    // A zero UDP checksum means "none" and stays zero.
    let q = Frame {
        udp_no_checksum: true,
        sport: 33334,
        ..Frame::udp((POD2, 33334), (VIP, 53), b"q")
    };
    let (verdict, out) = h.run(&q.build()).expect("run");
    assert_eq!(verdict, XDP_PASS);
    let got = parse(&out);
    assert!(got.udp_no_checksum);
    assert_eq!((got.dst, got.dport), (POD1, 5353));
    verify_checksums(&out).expect("IP checksum");
}

/// XDP hands a packet to a frontend without backends on untouched; TC ingress answers it.
fn reject(h: &Harness, frame: &[u8]) -> (u32, Vec<u8>) {
    let (verdict, out) = h.run(frame).expect("xdp run");
    assert_eq!(verdict, XDP_PASS, "XDP passes it on");
    assert_eq!(out, frame, "XDP leaves it untouched");
    h.run_reject(frame).expect("tc run")
}

#[test]
fn no_endpoints_tcp_gets_rst() {
    let mut h = harness();
    h.program(&services(&[])).expect("program");

    // SYN: RST|ACK acknowledging the SYN (RFC 9293 3.10.7.1, no ACK bit on the segment).
    let syn = Frame::tcp((CLIENT, 40001), (NODE_IP, 30080), SYN);
    let (verdict, out) = reject(&h, &syn.build());
    assert_eq!(verdict, TC_ACT_REDIRECT, "sent back out");
    verify_checksums(&out).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.len(), 54, "Ethernet + IPv4 + TCP, nothing else");
    let rst = parse(&out);
    assert_eq!((rst.eth_dst, rst.eth_src), (CLIENT_MAC, NODE_MAC));
    assert_eq!(
        (rst.src, rst.sport, rst.dst, rst.dport),
        (NODE_IP, 30080, CLIENT, 40001)
    );
    assert_eq!(rst.proto, TCP);
    assert_eq!(rst.flags, RST | ACK);
    assert_eq!((rst.seq, rst.ack), (0, syn.seq + 1));

    // A segment with ACK and payload: RST with seq = its ack, no ACK bit.
    let data = Frame::tcp((CLIENT, 40002), (VIP, 80), ACK | PSH | FIN).with_payload(&[7u8; 100]);
    let (verdict, out) = reject(&h, &data.build());
    assert_eq!(verdict, TC_ACT_REDIRECT);
    verify_checksums(&out).unwrap_or_else(|e| panic!("{e}"));
    let rst = parse(&out);
    assert_eq!(rst.flags, RST);
    assert_eq!(rst.seq, data.ack);
    assert_eq!((rst.src, rst.sport), (VIP, 80));
    assert!(rst.payload.is_empty());

    // Never answer a RST.
    let r = Frame::tcp((CLIENT, 40003), (VIP, 80), RST);
    assert_eq!(reject(&h, &r.build()).0, TC_ACT_SHOT);

    // TC passes everything that is not for a frontend without backends.
    h.program(&services(&[POD1])).expect("program");
    let frame = syn.build();
    assert_eq!(h.run_reject(&frame).expect("tc run"), (TC_NEXT, frame));
}

#[test]
fn no_endpoints_udp_gets_icmp_port_unreachable() {
    let mut h = harness();
    h.program(&services(&[])).expect("program");
    let q = Frame::udp((CLIENT, 5555), (VIP, 53), &[1u8; 64]);
    let input = q.build();
    let (verdict, out) = reject(&h, &input);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    verify_checksums(&out).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.len(), 14 + 20 + 8 + 20 + 8);
    assert_eq!(&out[0..6], &CLIENT_MAC);
    assert_eq!(&out[6..12], &NODE_MAC);
    let ip = &out[14..34];
    assert_eq!(ip[9], ICMP);
    assert_eq!(&ip[12..16], &VIP.octets());
    assert_eq!(&ip[16..20], &CLIENT.octets());
    assert_eq!(
        &out[34..36],
        &[3, 3],
        "destination unreachable, port unreachable"
    );
    // RFC 792: the original IP header and the first 8 bytes of its payload.
    assert_eq!(&out[42..70], &input[14..42]);

    // A datagram shorter than the reply works too.
    let small = Frame::udp((CLIENT, 5556), (VIP, 53), b"").build();
    let (verdict, out) = reject(&h, &small);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    verify_checksums(&out).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(&out[42..70], &small[14..42]);
}

#[test]
fn local_policy_without_local_endpoint_drops() {
    let mut h = harness();
    let yaml = services(&[POD1])
        .replace(
            "type: NodePort",
            "type: NodePort\n  externalTrafficPolicy: Local",
        )
        .replace("nodeName: node-a", "nodeName: node-b");
    h.program(&yaml).expect("program");
    let syn = Frame::tcp((CLIENT, 40000), (NODE_IP, 30080), SYN);
    assert_eq!(h.run(&syn.build()).expect("run").0, XDP_DROP);
    // ClusterIP (internal policy Cluster) still reaches the remote endpoint.
    let syn = Frame::tcp((POD2, 40000), (VIP, 80), SYN);
    let (verdict, out) = h.run(&syn.build()).expect("run");
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(parse(&out).dst, POD1);
}

#[test]
fn pods_reach_an_external_local_frontend_with_the_cluster_set() {
    // kube-proxy: traffic from local pods to an externalTrafficPolicy Local destination goes
    // to the cluster chain. Here `lo` stands for a pod veth.
    let mut h = harness();
    let yaml = services(&[POD1])
        .replace(
            "type: NodePort",
            "type: NodePort\n  externalTrafficPolicy: Local",
        )
        .replace("nodeName: node-a", "nodeName: node-b");
    h.program(&yaml).expect("program");
    let lo = 1;
    let syn = Frame::tcp((POD2, 40000), (NODE_IP, 30080), SYN);
    // Not known as a pod interface yet: the external (Local) set, which is empty here.
    assert_eq!(h.run_from(lo, &syn.build()).expect("run").0, XDP_DROP);
    h.datapath
        .mark(lo, true)
        .expect("mark lo as a pod interface");
    let (verdict, out) = h.run_from(lo, &syn.build()).expect("run");
    assert_eq!(verdict, XDP_PASS);
    assert_eq!((parse(&out).dst, parse(&out).dport), (POD1, 8080));
    // The same interface no longer a pod's: the external set again.
    h.datapath.mark(lo, false).expect("unmark lo");
    let again = Frame::tcp((POD2, 40001), (NODE_IP, 30080), SYN);
    assert_eq!(h.run_from(lo, &again.build()).expect("run").0, XDP_DROP);
}

#[test]
fn packets_that_are_not_ours_pass_untouched() {
    let mut h = harness();
    h.program(&services(&[POD1])).expect("program");
    let syn = Frame::tcp((CLIENT, 40000), (NODE_IP, 30080), SYN).build();

    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "not a service",
            Frame::tcp((CLIENT, 40000), (POD1, 8080), SYN).build(),
        ),
        (
            "service address, other port",
            Frame::tcp((CLIENT, 40000), (VIP, 81), SYN).build(),
        ),
        (
            "service port, other protocol",
            Frame::udp((CLIENT, 40000), (VIP, 80), b"x").build(),
        ),
        ("Ethernet header only", syn[..14].to_vec()),
        ("IPv4 header cut short", syn[..30].to_vec()),
        ("TCP header cut short", syn[..44].to_vec()),
    ];
    let mut arp = syn.clone();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    cases.push(("ARP", arp));
    let mut v6 = syn.clone();
    v6[12..14].copy_from_slice(&[0x86, 0xdd]);
    cases.push(("IPv6 ethertype", v6));
    let mut bad_ihl = syn.clone();
    bad_ihl[14] = 0x44;
    cases.push(("IHL 4", bad_ihl));
    let mut bad_version = syn.clone();
    bad_version[14] = 0x65;
    cases.push(("IP version 6 in an IPv4 frame", bad_version));
    // IPv4 options: a 24-byte header (NOP x4) in front of a SYN to the NodePort.
    let mut opts = syn[..34].to_vec();
    opts[14] = 0x46;
    let total = u16::from_be_bytes([opts[16], opts[17]]) + 4;
    opts[16..18].copy_from_slice(&total.to_be_bytes());
    opts.extend([1, 1, 1, 1]);
    opts.extend(&syn[34..]);
    cases.push(("IP options", opts));
    // A later fragment of a datagram whose first fragment was never seen (a first fragment
    // is translated: see the fragment tests).
    let mut later = syn.clone();
    later[20..22].copy_from_slice(&0x0010u16.to_be_bytes());
    cases.push(("fragment of an unknown datagram", later));
    let mut long_total = syn.clone();
    long_total[16..18].copy_from_slice(&200u16.to_be_bytes());
    cases.push(("IPv4 total length beyond the frame", long_total));
    let mut icmp = syn.clone();
    icmp[23] = ICMP;
    cases.push(("ICMP to a service address", icmp));

    for (what, frame) in cases {
        let (verdict, out) = h.run(&frame).unwrap_or_else(|e| panic!("{what}: {e:#}"));
        assert_eq!(verdict, XDP_PASS, "{what}");
        assert_eq!(out, frame, "{what}: frame changed");
    }
}

#[test]
fn hairpin_is_snatted_to_the_reserved_address_and_back() {
    let mut h = harness();
    h.program(&services(&[POD1])).expect("program");
    let syn = Frame::tcp((POD1, 45000), (VIP, 80), SYN);
    assert_pass_rewritten(
        &h,
        &syn,
        &Frame {
            src: HAIRPIN,
            dst: POD1,
            dport: 8080,
            ..syn.clone()
        },
    );
    let synack = Frame::tcp((POD1, 8080), (HAIRPIN, 45000), SYN | ACK);
    assert_pass_rewritten(
        &h,
        &synack,
        &Frame {
            src: VIP,
            sport: 80,
            dst: POD1,
            ..synack.clone()
        },
    );
}

#[test]
fn new_flows_spread_uniformly_and_flows_stick() {
    let mut h = harness();
    let pods: Vec<Ipv4Addr> = (11..15).map(|i| Ipv4Addr::new(10, 244, 0, i)).collect();
    h.program(&services(&pods)).expect("program");
    let mut chosen = BTreeMap::new();
    let mut first = BTreeMap::new();
    let flows = 4000u16;
    for i in 0..flows {
        let syn = Frame::tcp((CLIENT, 20000 + i), (VIP, 80), SYN);
        let (verdict, out) = h.run(&syn.build()).expect("run");
        assert_eq!(verdict, XDP_PASS);
        let dst = parse(&out).dst;
        *chosen.entry(dst).or_insert(0u32) += 1;
        first.insert(i, dst);
    }
    assert_eq!(chosen.len(), 4, "{chosen:?}");
    for (pod, n) in &chosen {
        // Binomial(4000, 1/4): mean 1000, sd 27; 200 away is more than 7 sd.
        assert!(
            (800..=1200).contains(n),
            "{pod}: {n} of {flows} ({chosen:?})"
        );
    }
    // Later packets of each flow keep their backend.
    for i in (0..flows).step_by(97) {
        let ack = Frame::tcp((CLIENT, 20000 + i), (VIP, 80), ACK);
        let (_, out) = h.run(&ack.build()).expect("run");
        assert_eq!(parse(&out).dst, first[&i], "flow {i} moved");
    }
}

fn dst_of(h: &Harness, f: &Frame) -> Ipv4Addr {
    let (verdict, out) = h.run(&f.build()).expect("run");
    assert_eq!(verdict, XDP_PASS);
    parse(&out).dst
}

#[test]
fn removed_endpoints_keep_tcp_flows_and_lose_udp_flows_as_with_kube_proxy() {
    let mut h = harness();
    h.program(&services(&[POD1])).expect("program");
    let syn = Frame::tcp((CLIENT, 41000), (VIP, 80), SYN);
    let ack = Frame::tcp((CLIENT, 41000), (VIP, 80), ACK);
    let udp = Frame::udp((CLIENT, 41000), (VIP, 53), b"q");
    assert_eq!(dst_of(&h, &syn), POD1);
    assert_eq!(dst_of(&h, &udp), POD1);

    // POD1 leaves the EndpointSlice, POD2 comes.
    h.program(&services(&[POD2])).expect("program");
    // kube-proxy never flushes TCP conntrack: the established connection carries on.
    assert_eq!(dst_of(&h, &ack), POD1);
    // It flushes UDP entries of endpoints that stopped serving: the flow moves.
    assert_eq!(dst_of(&h, &udp), POD2);
    assert_eq!(dst_of(&h, &udp), POD2, "and stays moved");
    // New connections, also one reusing the old tuple, go to POD2 only.
    assert_eq!(dst_of(&h, &syn), POD2);
    for p in 0..50 {
        assert_eq!(
            dst_of(&h, &Frame::tcp((CLIENT, 42000 + p), (VIP, 80), SYN)),
            POD2
        );
    }
}

#[test]
fn terminating_endpoints_keep_their_flows_but_get_no_new_ones() {
    let mut h = harness();
    let slice = |eps: &str| services(&[]).replace("endpoints: []", &format!("endpoints:\n{eps}"));
    h.program(&slice(
        "- {addresses: [10.244.0.11], conditions: {ready: true}}\n",
    ))
    .expect("program");
    let syn = Frame::tcp((CLIENT, 43000), (VIP, 80), SYN);
    let ack = Frame::tcp((CLIENT, 43000), (VIP, 80), ACK);
    let udp = Frame::udp((CLIENT, 43000), (VIP, 53), b"q");
    assert_eq!(dst_of(&h, &syn), POD1);
    assert_eq!(dst_of(&h, &udp), POD1);

    h.program(&slice(
        "- {addresses: [10.244.0.11], conditions: {ready: false, serving: true, terminating: true}}\n\
         - {addresses: [10.244.0.12], conditions: {ready: true}}\n",
    ))
    .expect("program");
    assert_eq!(dst_of(&h, &ack), POD1, "open TCP connection stays");
    assert_eq!(
        dst_of(&h, &udp),
        POD1,
        "UDP flow of a serving endpoint stays"
    );
    assert_eq!(
        dst_of(&h, &syn),
        POD2,
        "a new connection on the old tuple avoids it"
    );
    for p in 0..50 {
        assert_eq!(
            dst_of(&h, &Frame::tcp((CLIENT, 44000 + p), (VIP, 80), SYN)),
            POD2
        );
    }
}

#[test]
fn a_retransmitted_syn_keeps_its_backend() {
    let mut h = harness();
    let pods: Vec<Ipv4Addr> = (11..15).map(|i| Ipv4Addr::new(10, 244, 0, i)).collect();
    h.program(&services(&pods)).expect("program");
    for p in 0..100 {
        let syn = Frame::tcp((CLIENT, 45000 + p), (VIP, 80), SYN);
        let first = dst_of(&h, &syn);
        assert_eq!(
            dst_of(&h, &syn),
            first,
            "flow {p}: the retransmission changed backend"
        );
    }
}

/// A global counter of the datapath, by name.
fn stat(h: &Harness, name: &str) -> u64 {
    read_stats(h.pin.path())
        .expect("LB_STATS")
        .into_iter()
        .find(|(n, _)| *n == name)
        .map_or_else(|| panic!("no counter {name}"), |(_, v)| v)
}

#[test]
fn a_new_connection_on_a_closed_flows_tuple_is_a_new_flow() {
    let mut h = harness();
    let pods: Vec<Ipv4Addr> = (11..15).map(|i| Ipv4Addr::new(10, 244, 0, i)).collect();
    h.program(&services(&pods)).expect("program");
    const FLOWS: u16 = 200;
    let new_before = stat(&h, "dnat_new");
    let mut moved = 0;
    let mut reopened = Vec::new();
    for p in 0..FLOWS {
        let port = 46000 + p;
        let syn = Frame::tcp((CLIENT, port), (VIP, 80), SYN);
        let first = dst_of(&h, &syn);
        // The connection ends: FIN both ways for even flows, a RST from the server for odd
        // ones (nothing recorded in the client's direction then).
        let reply = |flags| Frame::tcp((first, 8080), (CLIENT, port), flags);
        if p % 2 == 0 {
            assert_eq!(
                dst_of(&h, &Frame::tcp((CLIENT, port), (VIP, 80), FIN | ACK)),
                first
            );
            assert_eq!(
                parse(&h.run(&reply(FIN | ACK).build()).expect("run").1).src,
                VIP
            );
        } else {
            assert_eq!(parse(&h.run(&reply(RST).build()).expect("run").1).src, VIP);
        }
        // The client opens a new connection from the same port: chosen afresh.
        let again = dst_of(&h, &syn);
        if again != first {
            moved += 1;
            // The closed flow's reply entry is gone: its backend's late packets pass as they
            // are.
            let late = reply(ACK).build();
            assert_eq!(
                h.run(&late).expect("run").1,
                late,
                "flow {p}: old reply translated"
            );
        }
        // The new connection's reply is translated.
        let synack = Frame::tcp((again, 8080), (CLIENT, port), SYN | ACK);
        assert_eq!(parse(&h.run(&synack.build()).expect("run").1).src, VIP);
        // And its packets stay on its backend.
        assert_eq!(
            dst_of(&h, &Frame::tcp((CLIENT, port), (VIP, 80), ACK)),
            again
        );
        reopened.push(port);
    }
    assert_eq!(
        stat(&h, "dnat_new") - new_before,
        2 * u64::from(FLOWS),
        "each reopened tuple counts as a new flow"
    );
    // Uniform choice among 4: 3/4 of the reopened flows move (mean 150, sd 6).
    assert!(
        moved >= 100,
        "only {moved} of {FLOWS} reopened flows were chosen afresh"
    );
    // The reopened flows are open: a sweep that removes every closed flow at once keeps them.
    let t = conntrack::Timeouts {
        closed: Duration::ZERO,
        ..Default::default()
    };
    let swept = conntrack::sweep(h.pin.path(), &t).expect("sweep");
    assert_eq!(swept.flows, 0, "reopened flows swept as closed: {swept:?}");
    for port in reopened.iter().step_by(17) {
        let ack = Frame::tcp((CLIENT, *port), (VIP, 80), ACK);
        let (_, out) = h.run(&ack.build()).expect("run");
        assert_ne!(
            parse(&out).dst,
            VIP,
            "flow from port {port} lost after the sweep"
        );
    }
}

#[test]
fn flows_are_stamped_with_the_monotonic_clock_through_jiffies() {
    let mut h = harness();
    h.program(&services(&[POD1])).expect("program");
    let clock = h.datapath.clock();
    // x86's CONFIG_HZ choices: 100, 250, 300, 1000.
    assert!(
        [10_000_000, 4_000_000, 3_333_333, 1_000_000].contains(&clock.ns_per_tick),
        "tick {} ns",
        clock.ns_per_tick
    );
    let conntrack: AyaHashMap<MapData, CtKeyV4, CtEntryV4> = AyaHashMap::try_from(Map::LruHashMap(
        MapData::from_pin(h.pin.path().join(map_names::LB4_CONNTRACK)).expect("pinned"),
    ))
    .expect("LB4_CONNTRACK");
    // A new flow's forward entry: when the datapath says it was seen, against CLOCK_MONOTONIC.
    let stamp_off = |h: &Harness, port: u16| -> i64 {
        let before = monotonic_ns();
        assert_eq!(dst_of(h, &Frame::tcp((CLIENT, port), (VIP, 80), SYN)), POD1);
        let key = CtKeyV4 {
            saddr: u32::from_ne_bytes(CLIENT.octets()),
            daddr: u32::from_ne_bytes(VIP.octets()),
            sport: port.to_be(),
            dport: 80u16.to_be(),
            proto: TCP,
            _pad: [0; 3],
        };
        let e = conntrack.get(&key, 0).expect("forward entry");
        e.last_seen_ns as i64 - before as i64
    };
    // The coarse clock trails CLOCK_MONOTONIC by up to a tick; allow two and some
    // calibration error.
    let near = |off: i64| off.abs() < 2 * clock.ns_per_tick as i64 + 1_000_000;
    let off = stamp_off(&h, 50000);
    assert!(near(off), "stamped {off} ns from CLOCK_MONOTONIC");
    // The stamp is jiffies through LB_CLOCK: an hour more offset, an hour later stamps.
    let mut map: Array<MapData, Clock> = Array::try_from(Map::Array(
        MapData::from_pin(h.pin.path().join(map_names::LB_CLOCK)).expect("pinned"),
    ))
    .expect("LB_CLOCK");
    const HOUR: u64 = 3_600_000_000_000;
    let shifted = Clock {
        offset_ns: clock.offset_ns.wrapping_add(HOUR),
        ..clock
    };
    map.set(0, shifted, 0).expect("write LB_CLOCK");
    let off = stamp_off(&h, 50001) - HOUR as i64;
    assert!(
        near(off),
        "shifted clock: stamped {off} ns from an hour ahead"
    );
    // Without a calibration the datapath reads the coarse clock itself.
    map.set(0, Clock::default(), 0).expect("write LB_CLOCK");
    let off = stamp_off(&h, 50002);
    assert!(
        near(off),
        "coarse clock: stamped {off} ns from CLOCK_MONOTONIC"
    );
    // The agent's check finds a clock that is off, and calibrates it again.
    map.set(0, shifted, 0).expect("write LB_CLOCK");
    std::thread::sleep(Duration::from_millis(50));
    let fixed = h
        .datapath
        .check_clock()
        .expect("check")
        .expect("an hour off is corrected");
    assert_eq!(fixed.ns_per_tick, clock.ns_per_tick);
    assert_eq!(map.get(&0, 0).expect("LB_CLOCK"), fixed);
    let off = stamp_off(&h, 50003);
    assert!(
        near(off),
        "recalibrated: stamped {off} ns from CLOCK_MONOTONIC"
    );
    // A clock that is right is left alone.
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(h.datapath.check_clock().expect("check"), None);
}

#[test]
fn session_affinity_sticks_per_client_until_the_timeout() {
    let mut h = harness();
    let pods: Vec<Ipv4Addr> = (11..15).map(|i| Ipv4Addr::new(10, 244, 0, i)).collect();
    let yaml = services(&pods).replace(
        "  clusterIP:",
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 1}}\n  clusterIP:",
    );
    h.program(&yaml).expect("program");
    let clients: Vec<Ipv4Addr> = (1..=20).map(|i| Ipv4Addr::new(198, 18, 1, i)).collect();
    let mut first = Vec::new();
    for c in &clients {
        let stuck = dst_of(&h, &Frame::tcp((*c, 10000), (VIP, 80), SYN));
        // Every new connection of this client, to the ClusterIP or the NodePort (the same
        // Service port), goes to the same backend.
        for p in 1..10 {
            assert_eq!(
                dst_of(&h, &Frame::tcp((*c, 10000 + p), (VIP, 80), SYN)),
                stuck
            );
        }
        assert_eq!(
            dst_of(&h, &Frame::tcp((*c, 20000), (NODE_IP, 30080), SYN)),
            stuck
        );
        first.push(stuck);
    }
    let distinct: std::collections::BTreeSet<_> = first.iter().collect();
    assert!(
        distinct.len() > 1,
        "20 clients all on one backend: {first:?}"
    );

    // After the timeout (1 s without a new connection), choices are made afresh: for 20
    // clients over 4 backends, all keeping theirs has a chance of 4^-20.
    std::thread::sleep(Duration::from_millis(1300));
    let again: Vec<Ipv4Addr> = clients
        .iter()
        .map(|c| dst_of(&h, &Frame::tcp((*c, 30000), (VIP, 80), SYN)))
        .collect();
    assert_ne!(first, again, "affinity did not expire");

    // A backend that leaves the set is not stuck to any more.
    let c = clients[0];
    let stuck = dst_of(&h, &Frame::tcp((c, 40000), (VIP, 80), SYN));
    let rest: Vec<Ipv4Addr> = pods.iter().copied().filter(|p| *p != stuck).collect();
    h.program(&services(&rest).replace(
        "  clusterIP:",
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 1}}\n  clusterIP:",
    ))
    .expect("program");
    let moved = dst_of(&h, &Frame::tcp((c, 40001), (VIP, 80), SYN));
    assert_ne!(moved, stuck);
    // ... and the client sticks to its new one.
    for p in 2..10 {
        assert_eq!(
            dst_of(&h, &Frame::tcp((c, 40000 + p), (VIP, 80), SYN)),
            moved
        );
    }
}

#[test]
fn udp_rewrites_keep_the_frame_otherwise_identical() {
    let mut h = harness();
    h.program(&services(&[POD1])).expect("program");
    let q = Frame {
        ttl: 17,
        ip_id: 0xbeef,
        ..Frame::udp((CLIENT, 1), (NODE_IP, 53), b"")
    };
    // NodePort is TCP only here: UDP to the node address is not a service.
    let (verdict, out) = h.run(&q.build()).expect("run");
    assert_eq!((verdict, out), (XDP_PASS, q.build()));
    let q = Frame {
        ttl: 17,
        ip_id: 0xbeef,
        ..Frame::udp((CLIENT, 1), (VIP, 53), &[0xff; 33])
    };
    assert_pass_rewritten(
        &h,
        &q,
        &Frame {
            dst: POD1,
            dport: 5353,
            ..q.clone()
        },
    );
}

#[test]
fn pins_of_another_map_layout_are_refused_before_anything_is_loaded() {
    lb_testkit::require_root();
    let pin = lb_testkit::PinDir::new("layout");
    std::fs::create_dir_all(pin.path().join("layout-lb-maps-v0")).expect("mark");
    let err = match lb_userspace::datapath::Datapath::load(
        pin.path(),
        lb_userspace::datapath::MapSizes::default(),
    ) {
        Ok(_) => panic!("an old layout was taken over"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("lb-maps-v0") && err.contains("uninstall"),
        "{err}"
    );
    // Nothing was pinned beside the old mark.
    let names: Vec<String> = std::fs::read_dir(pin.path())
        .expect("read")
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    assert!(
        names
            .iter()
            .all(|n| n == "links" || n == "layout-lb-maps-v0"),
        "{names:?}"
    );
}

/// UDP from `client` to the ClusterIP's DNS port, with and without a checksum, through
/// `check`: both go to pod 1 (a zero checksum stays zero).
fn udp_to_pod1(check: &impl Fn(&Frame, &Frame), client: Ipv4Addr) {
    let q = Frame::udp((client, 33333), (VIP, 53), b"query");
    let q0 = Frame {
        udp_no_checksum: true,
        ..Frame::udp((client, 33334), (VIP, 53), b"q")
    };
    for input in [q, q0] {
        let expected = Frame {
            dst: POD1,
            dport: 5353,
            ..input.clone()
        };
        check(&input, &expected);
    }
}

/// A TC program's result: passed on, checksums right, every byte as `expected`.
fn assert_tc_rewritten((verdict, out): (u32, Vec<u8>), expected: &Frame) {
    assert_eq!(verdict, TC_NEXT, "verdict");
    verify_checksums(&out).unwrap_or_else(|e| panic!("{e}: {out:02x?}"));
    assert_eq!(parse(&out), *expected);
    assert_eq!(out, expected.build(), "every byte");
}

/// On an external interface without native XDP, `lb_tc_ext` does the translation: from
/// outside to a NodePort and back, every byte and both checksums as XDP writes them, UDP with
/// and without a checksum, and a frontend without backends answered in place.
#[test]
fn the_external_tc_program_translates_like_xdp() {
    let mut h = harness();
    h.program(&services(&[POD1])).expect("program");
    let check = |input: &Frame, expected: &Frame| {
        assert_tc_rewritten(h.run_ext(&input.build()).expect("test run"), expected);
    };
    let syn = Frame::tcp((CLIENT, 40000), (NODE_IP, 30080), SYN);
    check(
        &syn,
        &Frame {
            dst: POD1,
            dport: 8080,
            ..syn.clone()
        },
    );
    // The reply takes the pod's program; the client's next segment takes this one again.
    let synack = Frame::tcp((POD1, 8080), (CLIENT, 40000), SYN | ACK);
    let (v, out) = h.run_pod(&synack.build()).expect("run");
    assert_eq!(v, TC_NEXT);
    assert_eq!((parse(&out).src, parse(&out).sport), (NODE_IP, 30080));
    let data = Frame::tcp((CLIENT, 40000), (NODE_IP, 30080), ACK | PSH).with_payload(b"GET /");
    check(
        &data,
        &Frame {
            dst: POD1,
            dport: 8080,
            ..data.clone()
        },
    );
    udp_to_pod1(&check, CLIENT);
    // Not a frontend: untouched.
    let other = Frame::tcp((CLIENT, 40001), (NODE_IP, 22), SYN);
    assert_eq!(
        h.run_ext(&other.build()).expect("run"),
        (TC_NEXT, other.build())
    );

    // Without backends: the RST goes straight back out.
    h.program(&services(&[])).expect("program");
    let syn = Frame::tcp((CLIENT, 40002), (NODE_IP, 30080), SYN);
    let (verdict, out) = h.run_ext(&syn.build()).expect("run");
    assert_eq!(verdict, TC_ACT_REDIRECT, "sent back out");
    verify_checksums(&out).unwrap_or_else(|e| panic!("{e}"));
    let rst = parse(&out);
    assert_eq!(
        (rst.src, rst.sport, rst.dst, rst.dport, rst.flags),
        (NODE_IP, 30080, CLIENT, 40002, RST | ACK)
    );
}

/// From a pod, `lb_tc_pod` does the translation (TC, through the kernel's checksum helpers):
/// every byte and both checksums as XDP would write them, TCP and UDP, both directions,
/// a zero UDP checksum kept.
#[test]
fn the_pod_program_translates_like_xdp() {
    let mut h = harness();
    h.program(&services(&[POD1])).expect("program");
    let check = |input: &Frame, expected: &Frame| {
        assert_tc_rewritten(h.run_pod(&input.build()).expect("test run"), expected);
    };
    let syn = Frame::tcp((POD2, 40000), (VIP, 80), SYN);
    check(
        &syn,
        &Frame {
            dst: POD1,
            dport: 8080,
            ..syn.clone()
        },
    );
    let synack = Frame::tcp((POD1, 8080), (POD2, 40000), SYN | ACK);
    check(
        &synack,
        &Frame {
            src: VIP,
            sport: 80,
            ..synack.clone()
        },
    );
    // A NodePort reply from a pod to an outside client.
    let syn = Frame::tcp((CLIENT, 40001), (NODE_IP, 30080), SYN);
    let (v, _) = h.run(&syn.build()).expect("run");
    assert_eq!(v, XDP_PASS);
    let reply = Frame::tcp((POD1, 8080), (CLIENT, 40001), SYN | ACK).with_payload(b"hello");
    check(
        &reply,
        &Frame {
            src: NODE_IP,
            sport: 30080,
            ..reply.clone()
        },
    );
    udp_to_pod1(&check, POD2);
}
