//! The operator's commands over IPv6: `lb-agent status` counts the `LB6_*` maps beside the
//! `LB4_*` ones, the backend counters name IPv6 backends, and `lb-agent trace` takes an IPv6
//! packet, explained from the `LB6_*` maps.
//!
//! In process, against the real BPF object in a pin directory of its own (removed with its
//! pins when the test ends, passed or failed). IPv4 Services are programmed through the
//! control plane from manifests; IPv6 ones are written straight into the maps, where the
//! reconciler will write them (`Lb6`), as the control plane does not program IPv6 yet.
// Harness code: a datapath that cannot be loaded panics with a message.
#![allow(clippy::missing_panics_doc)]

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};

use aya::maps::{lpm_trie::Key as LpmKey, HashMap, LpmTrie, Map, MapData};
use lb_common::{
    ipv6_words, map_names, BackendSlotKey, BackendV6, CtEntryV6, CtKeyV6, MemberKey, ServiceEntry,
    ServiceKeyV6, SourceRangeV6, BACKEND_F_LOCAL, SCOPE_ALL, SVC_F_CLUSTER_IP, SVC_F_SOURCE_RANGES,
};
use lb_control::{model::Proto, translate::NodeInfo};
use lb_testkit::{
    frame::{Frame6, SYN, TCP, UDP},
    Harness, XDP_PASS,
};
use lb_userspace::{
    cli::{status::status, trace::trace},
    datapath::stats::read_backend_stats,
};

const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
const POD1: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 0x11);
const POD2: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 0x12);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);

fn harness() -> Harness {
    let mut h = Harness::new(NodeInfo {
        name: "node-a".into(),
        addresses: vec![NODE_IP.into()],
        zone: None,
    })
    .expect("datapath loads");
    h.program(
        r"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {name: http, port: 80}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
endpoints:
- {addresses: [10.244.0.11], nodeName: node-a}
ports:
- {name: http, port: 8080}
",
    )
    .expect("IPv4 Service programmed");
    h
}

fn pinned(h: &Harness, name: &str) -> MapData {
    MapData::from_pin(h.pin.path().join(name)).unwrap_or_else(|e| panic!("{name} pinned: {e}"))
}

/// Writes IPv6 ClusterIP frontend `vip:port/proto` as service `svc_id` with `backends` (on
/// this node; ids 40000 and up, under the backend maps' default capacity), as the
/// reconciler will.
fn program6(
    h: &Harness,
    svc_id: u32,
    (vip, port, proto): (Ipv6Addr, u16, u8),
    backends: &[(Ipv6Addr, u16)],
) {
    let mut services: HashMap<MapData, ServiceKeyV6, ServiceEntry> =
        HashMap::try_from(Map::HashMap(pinned(h, map_names::LB6_SERVICES))).expect("LB6_SERVICES");
    let mut backend_map: HashMap<MapData, u32, BackendV6> =
        HashMap::try_from(Map::HashMap(pinned(h, map_names::LB6_BACKENDS))).expect("LB6_BACKENDS");
    let mut slots: HashMap<MapData, BackendSlotKey, u32> =
        HashMap::try_from(Map::HashMap(pinned(h, map_names::LB_SLOTS))).expect("LB_SLOTS");
    let mut members: HashMap<MapData, MemberKey, u32> =
        HashMap::try_from(Map::HashMap(pinned(h, map_names::LB_MEMBERS))).expect("LB_MEMBERS");
    for (slot, (addr, bport)) in backends.iter().enumerate() {
        let id = 40_000 + (svc_id % 100) * 16 + slot as u32;
        let b = BackendV6 {
            addr: ipv6_words(addr.octets()),
            port: bport.to_be(),
            proto,
            flags: BACKEND_F_LOCAL,
        };
        backend_map.insert(id, b, 0).expect("LB6_BACKENDS");
        let slot = slot as u32;
        slots
            .insert(BackendSlotKey { svc_id, slot }, id, 0)
            .expect("LB_SLOTS");
        members
            .insert(
                MemberKey {
                    svc_id,
                    backend_id: id,
                },
                slot,
                0,
            )
            .expect("LB_MEMBERS");
    }
    let key = ServiceKeyV6 {
        addr: ipv6_words(vip.octets()),
        port: port.to_be(),
        proto,
        scope: SCOPE_ALL,
    };
    let entry = ServiceEntry {
        svc_id,
        count: backends.len() as u32,
        flags: SVC_F_CLUSTER_IP,
        affinity_timeout_s: 0,
        affinity_group: u64::from(svc_id),
        maglev: 0,
        _pad: 0,
    };
    services.insert(key, entry, 0).expect("LB6_SERVICES");
}

fn conntrack6(h: &Harness) -> HashMap<MapData, CtKeyV6, CtEntryV6> {
    HashMap::try_from(Map::LruHashMap(pinned(h, map_names::LB6_CONNTRACK))).expect("LB6_CONNTRACK")
}

/// The `Maps:` line of `map` in a status report: (entries, capacity).
fn fill(report: &str, map: &str) -> Option<(u64, u64)> {
    let line = report
        .lines()
        .find(|l| l.split_whitespace().any(|w| w == map))?;
    let mut words = line.split_whitespace().skip_while(|w| *w != map).skip(1);
    let entries = words.next()?.parse().ok()?;
    let _slash = words.next()?;
    let capacity = words.next()?.parse().ok()?;
    Some((entries, capacity))
}

/// An address nothing answers on: status reports the agent as not answering.
fn nobody() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

#[test]
fn status_counts_the_ipv6_maps_beside_the_ipv4_ones() {
    let h = harness();
    program6(&h, 900, (VIP6, 80, TCP), &[(POD1, 8080), (POD2, 8080)]);
    // A flow in LB6_CONNTRACK, as the datapath leaves one.
    let key = CtKeyV6 {
        saddr: ipv6_words(CLIENT6.octets()),
        daddr: ipv6_words(VIP6.octets()),
        sport: 41000u16.to_be(),
        dport: 80u16.to_be(),
        proto: TCP,
        _pad: [0; 3],
    };
    conntrack6(&h)
        .insert(key, CtEntryV6::default(), 0)
        .expect("LB6_CONNTRACK");

    let (report, attention) = status(h.pin.path(), nobody(), nobody()).expect("status");
    assert!(attention, "no agent answers: {report}");
    assert_eq!(
        fill(&report, "LB4_SERVICES").map(|f| f.0),
        Some(1),
        "{report}"
    );
    assert_eq!(
        fill(&report, "LB6_SERVICES").map(|f| f.0),
        Some(1),
        "{report}"
    );
    assert_eq!(
        fill(&report, "LB6_BACKENDS").map(|f| f.0),
        Some(2),
        "{report}"
    );
    assert_eq!(
        fill(&report, "LB6_CONNTRACK").map(|f| f.0),
        Some(1),
        "{report}"
    );
    assert_eq!(
        fill(&report, "LB4_CONNTRACK").map(|f| f.0),
        Some(0),
        "{report}"
    );
    assert_eq!(
        fill(&report, "LB6_AFFINITY").map(|f| f.0),
        Some(0),
        "{report}"
    );
    // Slots are shared: the IPv4 Service's one and the IPv6 Service's two.
    assert_eq!(fill(&report, "LB_SLOTS").map(|f| f.0), Some(3), "{report}");
    assert!(
        fill(&report, "LB6_CONNTRACK").is_some_and(|(_, cap)| cap == 65_536),
        "{report}"
    );
}

#[test]
fn backend_counters_name_ipv6_backends() {
    let h = harness();
    program6(&h, 901, (VIP6, 80, TCP), &[(POD1, 8080)]);
    let names: Vec<String> = read_backend_stats(h.pin.path())
        .expect("counters")
        .into_iter()
        .map(|(b, _)| b)
        .collect();
    assert!(
        names.contains(&"[fd00:10:244::11]:8080/TCP".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"10.244.0.11:8080/TCP".to_string()),
        "{names:?}"
    );
}

fn v6(ip: Ipv6Addr, port: u16) -> SocketAddr {
    SocketAddr::V6(SocketAddrV6::new(ip, port, 0, 0))
}

#[test]
fn trace_looks_an_ipv6_packet_up_in_the_ipv6_maps() {
    let h = harness();
    program6(&h, 902, (VIP6, 80, TCP), &[(POD1, 8080), (POD2, 8080)]);
    let t = trace(
        h.pin.path(),
        Proto::Tcp,
        v6(CLIENT6, 41000),
        v6(VIP6, 80),
        None,
    )
    .expect("trace");
    assert!(
        t.contains("packet:    TCP [2001:db8::1]:41000 → [fd00:96::10]:80 [SYN] (from outside)"),
        "{t}"
    );
    assert!(
        t.contains("frontend:  [fd00:96::10]:80/TCP ClusterIP (id 902), 2 backend(s)"),
        "{t}"
    );
    // Not an IPv6 frontend (the IPv4 ClusterIP's port, on an IPv6 address): none.
    let t = trace(
        h.pin.path(),
        Proto::Udp,
        v6(CLIENT6, 41001),
        v6(VIP6, 53),
        None,
    )
    .expect("trace");
    assert!(
        t.contains("packet:    UDP [2001:db8::1]:41001 → [fd00:96::10]:53 (from outside)"),
        "{t}"
    );
    assert!(t.contains("frontend:  none at [fd00:96::10]:53/UDP"), "{t}");
    assert!(t.contains("not a Service frontend"), "{t}");
    // An IPv4 packet still goes by the IPv4 maps.
    let t = trace(
        h.pin.path(),
        Proto::Tcp,
        "198.18.0.1:41002".parse().expect("addr"),
        "10.96.0.10:80".parse().expect("addr"),
        None,
    )
    .expect("trace");
    assert!(t.contains("frontend:  10.96.0.10:80/TCP ClusterIP"), "{t}");
    assert!(t.contains("new flow → backend 10.244.0.11:8080"), "{t}");
    // One packet has one family.
    let e = trace(
        h.pin.path(),
        Proto::Tcp,
        "198.18.0.1:41003".parse().expect("addr"),
        v6(VIP6, 80),
        None,
    )
    .expect_err("mixed families");
    assert!(e.to_string().contains("different address families"), "{e}");
    assert!(
        conntrack6(&h).keys().next().is_none(),
        "the trace left flows"
    );
}

/// The IPv6 twin of the lab's trace test, end to end through the IPv6 datapath: a new flow
/// to a backend with the rewritten packet's checksums valid and no flow left behind, an
/// established one, and the rejections of a frontend without endpoints.
#[test]
fn trace_explains_an_ipv6_packets_decision_without_leaving_flows_behind() {
    let h = harness();
    program6(&h, 903, (VIP6, 80, TCP), &[(POD1, 8080), (POD2, 8080)]);
    program6(&h, 904, (VIP6, 81, TCP), &[]);
    program6(&h, 905, (VIP6, 53, UDP), &[]);
    let run = |proto, sport, dport| {
        trace(
            h.pin.path(),
            proto,
            v6(CLIENT6, sport),
            v6(VIP6, dport),
            None,
        )
        .expect("trace")
    };

    let t = run(Proto::Tcp, 41000, 80);
    assert!(
        t.contains("frontend:  [fd00:96::10]:80/TCP ClusterIP (id 903), 2 backend(s)"),
        "{t}"
    );
    assert!(
        t.contains("decision:  new flow → backend [fd00:10:244::1"),
        "{t}"
    );
    assert!(t.contains(":8080 (id 4004"), "{t}");
    assert!(
        t.contains("verdict:   XDP_PASS, rewritten to TCP [2001:db8::1]:41000 → [fd00:10:244::1"),
        "{t}"
    );
    assert!(t.contains("checksums valid"), "{t}");
    // The synthetic flow left no conntrack entry: tracing it again is a new flow again.
    assert!(
        conntrack6(&h).keys().next().is_none(),
        "the trace left flows"
    );
    assert!(run(Proto::Tcp, 41000, 80).contains("new flow"));

    // A flow the datapath already tracks: established, and left as it was.
    let syn = Frame6::tcp((CLIENT6, 41004), (VIP6, 80), SYN).build();
    let (verdict, _) = h.run(&syn).expect("SYN through XDP");
    assert_eq!(verdict, XDP_PASS);
    let flows = conntrack6(&h).keys().count();
    assert!(flows >= 1, "the SYN made no flow");
    let t = run(Proto::Tcp, 41004, 80);
    assert!(
        t.contains("decision:  established flow → backend [fd00:10:244::1"),
        "{t}"
    );
    assert_eq!(
        conntrack6(&h).keys().count(),
        flows,
        "the established flow was touched"
    );

    // No endpoints: TCP is refused with a RST, UDP with ICMPv6 port unreachable.
    let t = run(Proto::Tcp, 41001, 81);
    assert!(t.contains("ClusterIP (id 904), 0 backend(s)"), "{t}");
    assert!(t.contains("no usable endpoint"), "{t}");
    assert!(
        t.contains("rejected with TCP [fd00:96::10]:81 → [2001:db8::1]:41001 [ACK,RST]"),
        "{t}"
    );
    let t = run(Proto::Udp, 41002, 53);
    assert!(t.contains("ICMPv6 port unreachable"), "{t}");
    assert!(t.contains("→ 2001:db8::1 (connection refused)"), "{t}");
}

/// A packet the datapath drops is explained by the drop counter it raised: here a client
/// outside the frontend's loadBalancerSourceRanges.
#[test]
fn trace_says_why_an_ipv6_packet_is_dropped() {
    let h = harness();
    program6(&h, 906, (VIP6, 80, TCP), &[(POD1, 8080)]);
    // Fence the frontend to fd00:198:18::/64.
    let mut ranges: LpmTrie<MapData, SourceRangeV6, u8> =
        LpmTrie::try_from(Map::LpmTrie(pinned(&h, map_names::LB6_SRC_RANGES)))
            .expect("LB6_SRC_RANGES");
    let net = Ipv6Addr::new(0xfd00, 0x198, 0x18, 0, 0, 0, 0, 0);
    let key = LpmKey::new(
        32 + 64,
        SourceRangeV6 {
            svc_id_be: 906u32.to_be(),
            addr: ipv6_words(net.octets()),
        },
    );
    ranges.insert(&key, 1, 0).expect("range");
    let mut services: HashMap<MapData, ServiceKeyV6, ServiceEntry> =
        HashMap::try_from(Map::HashMap(pinned(&h, map_names::LB6_SERVICES))).expect("LB6_SERVICES");
    let fkey = ServiceKeyV6 {
        addr: ipv6_words(VIP6.octets()),
        port: 80u16.to_be(),
        proto: TCP,
        scope: SCOPE_ALL,
    };
    let mut entry = services.get(&fkey, 0).expect("programmed");
    entry.flags |= SVC_F_SOURCE_RANGES;
    services.insert(fkey, entry, 0).expect("LB6_SERVICES");

    let t = trace(
        h.pin.path(),
        Proto::Tcp,
        v6(CLIENT6, 41000),
        v6(VIP6, 80),
        None,
    )
    .expect("trace");
    assert!(
        t.contains(
            "verdict:   XDP_DROP: the client is outside the frontend's loadBalancerSourceRanges"
        ),
        "{t}"
    );
    let inside = Ipv6Addr::new(0xfd00, 0x198, 0x18, 0, 0, 0, 0, 1);
    let t = trace(
        h.pin.path(),
        Proto::Tcp,
        v6(inside, 41000),
        v6(VIP6, 80),
        None,
    )
    .expect("trace");
    assert!(
        t.contains("decision:  new flow → backend [fd00:10:244::11]:8080"),
        "{t}"
    );
}
