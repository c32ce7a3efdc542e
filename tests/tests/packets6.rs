//! IPv6 packet tests: the real BPF object run with BPF_PROG_TEST_RUN on crafted IPv6 frames,
//! through every IPv6 path of the datapath. Frames are built here, independently of the
//! datapath's code (the L4 checksums over the 128-bit pseudo-header included), and every
//! rewritten frame is compared byte for byte with one built from scratch.
//!
//! The control plane does not program IPv6 Services yet: `Lb6` writes them straight into the
//! pinned `LB6_*` maps (and the shared id-keyed maps), as the reconciler writes IPv4 ones.
//! Needs root.
// Harness code: a datapath that cannot be loaded panics with a message.
#![allow(clippy::missing_panics_doc, clippy::too_many_lines)]

use std::net::{Ipv4Addr, Ipv6Addr};

use aya::maps::{lpm_trie::Key as LpmKey, Array, HashMap, LpmTrie, Map, MapData};
use lb_common::{
    ipv6_words, map_names, BackendSlotKey, BackendV6, Ipv6Words, MemberKey, ServiceEntry,
    ServiceKeyV6, SourceRangeV6, BACKEND_F_LOCAL, IPPROTO_TCP, IPPROTO_UDP, SCOPE_ALL,
    SVC_F_CLUSTER_IP, SVC_F_NODE_PORT, SVC_F_SOURCE_RANGES,
};
use lb_control::translate::NodeInfo;
use lb_testkit::{Harness, TC_ACT_REDIRECT, TC_NEXT, XDP_DROP, XDP_PASS};

const NODE_IP4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const NODE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x198, 0x18, 0, 0, 0, 0, 2);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x198, 0x18, 0, 0, 0, 0, 1);
const OUTSIDER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7);
const ROUTER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x198, 0x18, 0, 0, 0, 0, 0xfe);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
const POD1: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, 0x11);
const POD2: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, 0x12);
/// A backend on another node.
const REMOTE: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 1, 0, 0, 0, 0, 0x21);
/// The hairpin source (docs/ipv6.md).
const HAIRPIN6: Ipv6Addr = Ipv6Addr::new(0xfd6c, 0x6200, 0, 0, 0, 0, 0, 1);
const SNAT_PORTS: std::ops::RangeInclusive<u16> = 61000..=65535;

const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP6: u8 = 58;
const HOP_BY_HOP: u8 = 0;
const DEST_OPTS: u8 = 60;
const FRAGMENT: u8 = 44;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const PSH: u8 = 0x08;
const ACK: u8 = 0x10;
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

// ---- frames, built and checked here ----

/// One's complement sum of `data` as 16-bit big-endian words, unfolded.
fn sum16(data: &[u8]) -> u64 {
    data.chunks(2)
        .map(|c| u64::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

fn fold(mut s: u64) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// The RFC 8200 8.1 pseudo-header's sum: source, destination, upper-layer length, next
/// header.
fn pseudo_sum(src: Ipv6Addr, dst: Ipv6Addr, len: usize, proto: u8) -> u64 {
    sum16(&src.octets())
        + sum16(&dst.octets())
        + (len as u64 >> 16)
        + (len as u64 & 0xffff)
        + u64::from(proto)
}

/// `seg` (an L4 header and payload, checksum field zero) with its checksum filled in.
fn with_checksum(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, mut seg: Vec<u8>) -> Vec<u8> {
    let at = match proto {
        TCP => 16,
        UDP => 6,
        _ => 2,
    };
    seg[at] = 0;
    seg[at + 1] = 0;
    let mut c = !fold(pseudo_sum(src, dst, seg.len(), proto) + sum16(&seg));
    if proto == UDP && c == 0 {
        c = 0xffff;
    }
    seg[at..at + 2].copy_from_slice(&c.to_be_bytes());
    seg
}

fn tcp_seg(sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(20 + payload.len());
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&1000u32.to_be_bytes()); // seq
    t.extend_from_slice(&(if flags & ACK != 0 { 2000u32 } else { 0 }).to_be_bytes());
    t.extend_from_slice(&[5 << 4, flags, 0xfa, 0xf0, 0, 0, 0, 0]);
    t.extend_from_slice(payload);
    t
}

fn udp_seg(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = Vec::with_capacity(8 + payload.len());
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    u
}

/// An Ethernet + IPv6 frame: `exts` are extension headers (type, body of 6 + 8n bytes) before
/// the upper-layer `body` of protocol `proto` (already checksummed).
fn frame(src: Ipv6Addr, dst: Ipv6Addr, exts: &[(u8, Vec<u8>)], proto: u8, body: &[u8]) -> Vec<u8> {
    let mut chain = Vec::new();
    for (i, (_, ext)) in exts.iter().enumerate() {
        let next = exts.get(i + 1).map_or(proto, |e| e.0);
        assert_eq!((ext.len() + 2) % 8, 0, "extension header size");
        chain.push(next);
        chain.push(((ext.len() + 2) / 8 - 1) as u8);
        chain.extend_from_slice(ext);
    }
    let first = exts.first().map_or(proto, |e| e.0);
    let mut f = Vec::new();
    f.extend_from_slice(&NODE_MAC);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&0x86ddu16.to_be_bytes());
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&((chain.len() + body.len()) as u16).to_be_bytes());
    f.push(first);
    f.push(64);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&chain);
    f.extend_from_slice(body);
    f
}

fn tcp6(s: (Ipv6Addr, u16), d: (Ipv6Addr, u16), flags: u8, payload: &[u8]) -> Vec<u8> {
    let seg = with_checksum(s.0, d.0, TCP, tcp_seg(s.1, d.1, flags, payload));
    frame(s.0, d.0, &[], TCP, &seg)
}

fn udp6(s: (Ipv6Addr, u16), d: (Ipv6Addr, u16), payload: &[u8]) -> Vec<u8> {
    let seg = with_checksum(s.0, d.0, UDP, udp_seg(s.1, d.1, payload));
    frame(s.0, d.0, &[], UDP, &seg)
}

/// What a frame carries: (source, destination, upper-layer protocol, offset of the
/// upper-layer header or fragment data, fragment header (offset in bytes, more, id)).
struct Seen {
    src: Ipv6Addr,
    dst: Ipv6Addr,
    proto: u8,
    l4: usize,
    frag: Option<(usize, bool, u32)>,
}

fn addr(b: &[u8]) -> Ipv6Addr {
    Ipv6Addr::from(<[u8; 16]>::try_from(b).expect("16 bytes"))
}

fn seen(f: &[u8]) -> Seen {
    assert_eq!(&f[12..14], &[0x86, 0xdd], "an IPv6 frame");
    assert_eq!(
        usize::from(u16::from_be_bytes([f[18], f[19]])),
        f.len() - 54,
        "payload length"
    );
    let (mut next, mut at, mut frag) = (f[20], 54, None);
    while matches!(next, HOP_BY_HOP | DEST_OPTS | FRAGMENT) {
        if next == FRAGMENT {
            let off = u16::from_be_bytes([f[at + 2], f[at + 3]]);
            let id = u32::from_be_bytes([f[at + 4], f[at + 5], f[at + 6], f[at + 7]]);
            frag = Some((usize::from(off & !7), off & 1 != 0, id));
            next = f[at];
            at += 8;
        } else {
            next = f[at];
            at += (usize::from(f[at + 1]) + 1) * 8;
        }
    }
    Seen {
        src: addr(&f[22..38]),
        dst: addr(&f[38..54]),
        proto: next,
        l4: at,
        frag,
    }
}

/// Checks the upper-layer checksum of an unfragmented frame from scratch.
fn check_l4(f: &[u8]) {
    let s = seen(f);
    assert!(s.frag.is_none());
    let seg = &f[s.l4..];
    let sum = pseudo_sum(s.src, s.dst, seg.len(), s.proto) + sum16(seg);
    assert_eq!(
        fold(sum),
        0xffff,
        "checksum of protocol {} in {f:02x?}",
        s.proto
    );
}

fn ports(f: &[u8]) -> (u16, u16) {
    let s = seen(f);
    (
        u16::from_be_bytes([f[s.l4], f[s.l4 + 1]]),
        u16::from_be_bytes([f[s.l4 + 2], f[s.l4 + 3]]),
    )
}

// ---- the datapath, with IPv6 Services written into its maps ----

/// A frontend as `Lb6` writes it.
struct Fe {
    addr: Ipv6Addr,
    port: u16,
    proto: u8,
    flags: u32,
    /// (address, port, on this node).
    backends: Vec<(Ipv6Addr, u16, bool)>,
    source_ranges: Vec<(Ipv6Addr, u8)>,
}

fn fe(addr: Ipv6Addr, port: u16, proto: u8, backends: &[(Ipv6Addr, u16, bool)]) -> Fe {
    Fe {
        addr,
        port,
        proto,
        flags: SVC_F_CLUSTER_IP,
        backends: backends.to_vec(),
        source_ranges: Vec::new(),
    }
}

fn pinned(h: &Harness, name: &str) -> MapData {
    MapData::from_pin(h.pin.path().join(name)).unwrap_or_else(|e| panic!("{name} pinned: {e}"))
}

/// Writes frontends into the maps as the reconciler does (backends, then slots and members,
/// then the entry whose count covers them). Ids from 60000 up.
struct Lb6 {
    h: Harness,
    next_backend: u32,
}

impl Lb6 {
    fn new() -> Lb6 {
        let h = Harness::new(NodeInfo {
            name: "node-a".into(),
            addresses: vec![NODE_IP4],
            zone: None,
        })
        .expect("datapath loads");
        let mut node: Array<MapData, Ipv6Words> =
            Array::try_from(Map::Array(pinned(&h, map_names::LB6_NODE_ADDR))).expect("map");
        node.set(0, ipv6_words(NODE6.octets()), 0)
            .expect("node address");
        Lb6 {
            h,
            next_backend: 60_000,
        }
    }

    fn program(&mut self, svc_id: u32, f: &Fe) {
        let h = &self.h;
        let mut backends: HashMap<MapData, u32, BackendV6> =
            HashMap::try_from(Map::HashMap(pinned(h, map_names::LB6_BACKENDS))).expect("map");
        let mut slots: HashMap<MapData, BackendSlotKey, u32> =
            HashMap::try_from(Map::HashMap(pinned(h, map_names::LB_SLOTS))).expect("map");
        let mut members: HashMap<MapData, MemberKey, u32> =
            HashMap::try_from(Map::HashMap(pinned(h, map_names::LB_MEMBERS))).expect("map");
        let mut services: HashMap<MapData, ServiceKeyV6, ServiceEntry> =
            HashMap::try_from(Map::HashMap(pinned(h, map_names::LB6_SERVICES))).expect("map");
        let mut ranges: LpmTrie<MapData, SourceRangeV6, u8> =
            LpmTrie::try_from(Map::LpmTrie(pinned(h, map_names::LB6_SRC_RANGES))).expect("map");
        for (slot, &(a, port, local)) in f.backends.iter().enumerate() {
            let id = self.next_backend;
            self.next_backend += 1;
            let b = BackendV6 {
                addr: ipv6_words(a.octets()),
                port: port.to_be(),
                proto: f.proto,
                flags: if local { BACKEND_F_LOCAL } else { 0 },
            };
            backends.insert(id, b, 0).expect("backend");
            let slot = slot as u32;
            slots
                .insert(BackendSlotKey { svc_id, slot }, id, 0)
                .expect("slot");
            members
                .insert(
                    MemberKey {
                        svc_id,
                        backend_id: id,
                    },
                    slot,
                    0,
                )
                .expect("member");
        }
        for &(net, len) in &f.source_ranges {
            let key = LpmKey::new(
                32 + u32::from(len),
                SourceRangeV6 {
                    svc_id_be: svc_id.to_be(),
                    addr: ipv6_words(net.octets()),
                },
            );
            ranges.insert(&key, 1, 0).expect("range");
        }
        let key = ServiceKeyV6 {
            addr: ipv6_words(f.addr.octets()),
            port: f.port.to_be(),
            proto: f.proto,
            scope: SCOPE_ALL,
        };
        let flags = f.flags
            | if f.source_ranges.is_empty() {
                0
            } else {
                SVC_F_SOURCE_RANGES
            };
        let entry = ServiceEntry {
            svc_id,
            count: f.backends.len() as u32,
            flags,
            affinity_timeout_s: 0,
            affinity_group: u64::from(svc_id),
            maglev: 0,
            _pad: 0,
        };
        services.insert(key, entry, 0).expect("service");
    }
}

/// Runs `input` through XDP: passed, and rewritten to exactly `want` (checksums checked
/// from scratch too).
fn xdp_rewrites(lb: &Lb6, input: &[u8], want: &[u8]) {
    let (verdict, out) = lb.h.run(input).expect("xdp run");
    assert_eq!(verdict, XDP_PASS, "verdict");
    check_l4(&out);
    assert_eq!(out, want, "\n got  {out:02x?}\n want {want:02x?}");
}

/// The same through a TC program's run (`lb_tc_pod`, `lb_tc_ext`, `lb_tc_egress`).
fn tc_rewrites(run: impl Fn(&[u8]) -> anyhow::Result<(u32, Vec<u8>)>, input: &[u8], want: &[u8]) {
    let (verdict, out) = run(input).expect("tc run");
    assert_eq!(verdict, TC_NEXT, "verdict");
    check_l4(&out);
    assert_eq!(out, want, "\n got  {out:02x?}\n want {want:02x?}");
}

// ---- the paths ----

#[test]
fn clusterip_tcp_is_dnatted_and_the_reply_reverse_natted_in_every_program() {
    let mut lb = Lb6::new();
    lb.program(60_001, &fe(VIP6, 80, IPPROTO_TCP, &[(POD1, 8080, true)]));

    // XDP (a client outside the pods, to a local backend: no source NAT).
    let syn = tcp6((CLIENT6, 40000), (VIP6, 80), SYN, b"");
    xdp_rewrites(&lb, &syn, &tcp6((CLIENT6, 40000), (POD1, 8080), SYN, b""));
    let synack = tcp6((POD1, 8080), (CLIENT6, 40000), SYN | ACK, b"");
    xdp_rewrites(
        &lb,
        &synack,
        &tcp6((VIP6, 80), (CLIENT6, 40000), SYN | ACK, b""),
    );
    // The reply where it leaves (TC egress) too.
    tc_rewrites(
        |f| lb.h.run_egress(f),
        &synack,
        &tcp6((VIP6, 80), (CLIENT6, 40000), SYN | ACK, b""),
    );

    // A pod client (lb_tc_pod), data with an odd length.
    let data = tcp6(
        (POD2, 41000),
        (VIP6, 80),
        ACK | PSH,
        b"GET / HTTP/1.1\r\n\r\nx",
    );
    tc_rewrites(
        |f| lb.h.run_pod(f),
        &data,
        &tcp6(
            (POD2, 41000),
            (POD1, 8080),
            ACK | PSH,
            b"GET / HTTP/1.1\r\n\r\nx",
        ),
    );
    let reply = tcp6((POD1, 8080), (POD2, 41000), ACK, b"HTTP/1.1 200 OK");
    tc_rewrites(
        |f| lb.h.run_pod(f),
        &reply,
        &tcp6((VIP6, 80), (POD2, 41000), ACK, b"HTTP/1.1 200 OK"),
    );

    // lb_tc_ext translates like XDP.
    let syn = tcp6((CLIENT6, 40001), (VIP6, 80), SYN, b"");
    tc_rewrites(
        |f| lb.h.run_ext(f),
        &syn,
        &tcp6((CLIENT6, 40001), (POD1, 8080), SYN, b""),
    );
}

#[test]
fn udp_is_dnatted_and_reverse_natted() {
    let mut lb = Lb6::new();
    lb.program(60_001, &fe(VIP6, 53, IPPROTO_UDP, &[(POD1, 5353, true)]));
    let q = udp6((POD2, 33333), (VIP6, 53), b"query");
    xdp_rewrites(&lb, &q, &udp6((POD2, 33333), (POD1, 5353), b"query"));
    let a = udp6((POD1, 5353), (POD2, 33333), b"answer!");
    xdp_rewrites(&lb, &a, &udp6((VIP6, 53), (POD2, 33333), b"answer!"));
    tc_rewrites(
        |f| lb.h.run_pod(f),
        &udp6((POD2, 33334), (VIP6, 53), b"q"),
        &udp6((POD2, 33334), (POD1, 5353), b"q"),
    );
}

#[test]
fn conntrack_keeps_a_flow_on_its_backend() {
    let mut lb = Lb6::new();
    let backends: Vec<_> = (1..=8u16)
        .map(|i| {
            (
                Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, 0x100 + i),
                8080,
                true,
            )
        })
        .collect();
    lb.program(60_001, &fe(VIP6, 80, IPPROTO_TCP, &backends));
    let (_, first) =
        lb.h.run(&tcp6((CLIENT6, 40000), (VIP6, 80), SYN, b""))
            .expect("run");
    let chosen = seen(&first).dst;
    let mut others = 0;
    for i in 0..32u16 {
        let (_, out) =
            lb.h.run(&tcp6((CLIENT6, 40000), (VIP6, 80), ACK, b"more"))
                .expect("run");
        assert_eq!(seen(&out).dst, chosen, "packet {i} of the flow");
        check_l4(&out);
        // New flows spread over the backends.
        let (_, out) =
            lb.h.run(&tcp6((CLIENT6, 50000 + i), (VIP6, 80), SYN, b""))
                .expect("run");
        if seen(&out).dst != chosen {
            others += 1;
        }
    }
    assert!(others > 0, "new flows all went to one backend of eight");
}

#[test]
fn nodeport_to_a_remote_backend_is_source_natted_and_its_reply_restored() {
    let mut lb = Lb6::new();
    let mut f = fe(NODE6, 30080, IPPROTO_TCP, &[(REMOTE, 8080, false)]);
    f.flags = SVC_F_NODE_PORT;
    lb.program(60_001, &f);
    let syn = tcp6((CLIENT6, 40000), (NODE6, 30080), SYN, b"");
    let (verdict, out) = lb.h.run(&syn).expect("run");
    assert_eq!(verdict, XDP_PASS);
    check_l4(&out);
    let (sport, dport) = ports(&out);
    assert!(SNAT_PORTS.contains(&sport), "source port {sport}");
    assert_eq!(out, tcp6((NODE6, sport), (REMOTE, 8080), SYN, b""));
    assert_eq!(dport, 8080);

    let synack = tcp6((REMOTE, 8080), (NODE6, sport), SYN | ACK, b"");
    xdp_rewrites(
        &lb,
        &synack,
        &tcp6((NODE6, 30080), (CLIENT6, 40000), SYN | ACK, b""),
    );
    // The flow goes on through the same port.
    let ack = tcp6((CLIENT6, 40000), (NODE6, 30080), ACK, b"hello");
    xdp_rewrites(
        &lb,
        &ack,
        &tcp6((NODE6, sport), (REMOTE, 8080), ACK, b"hello"),
    );

    // A router on the way to the backend says the packet was too big (to the node, the
    // packet's source): the client gets it, about the packet it sent.
    let big = tcp6((NODE6, sport), (REMOTE, 8080), ACK, &[7u8; 64]);
    let mut body = vec![2, 0, 0, 0, 0, 0, 0x05, 0x00]; // type 2, code 0, MTU 1280
    body.extend_from_slice(&big[14..]);
    let ptb = frame(
        ROUTER6,
        NODE6,
        &[],
        ICMP6,
        &with_checksum(ROUTER6, NODE6, ICMP6, body),
    );
    let sent = tcp6((CLIENT6, 40000), (NODE6, 30080), ACK, &[7u8; 64]);
    let mut body = vec![2, 0, 0, 0, 0, 0, 0x05, 0x00];
    body.extend_from_slice(&sent[14..]);
    let want = frame(
        ROUTER6,
        CLIENT6,
        &[],
        ICMP6,
        &with_checksum(ROUTER6, CLIENT6, ICMP6, body),
    );
    let (verdict, out) = lb.h.run(&ptb).expect("run");
    assert_eq!(verdict, XDP_PASS);
    check_l4(&out);
    assert_eq!(out, want, "\n got  {out:02x?}\n want {want:02x?}");
}

#[test]
fn a_pod_reaching_itself_through_its_service_is_hairpinned() {
    let mut lb = Lb6::new();
    lb.program(60_001, &fe(VIP6, 80, IPPROTO_TCP, &[(POD1, 8080, true)]));
    let syn = tcp6((POD1, 40000), (VIP6, 80), SYN, b"");
    tc_rewrites(
        |f| lb.h.run_pod(f),
        &syn,
        &tcp6((HAIRPIN6, 40000), (POD1, 8080), SYN, b""),
    );
    let synack = tcp6((POD1, 8080), (HAIRPIN6, 40000), SYN | ACK, b"");
    tc_rewrites(
        |f| lb.h.run_pod(f),
        &synack,
        &tcp6((VIP6, 80), (POD1, 40000), SYN | ACK, b""),
    );
}

#[test]
fn source_ranges_fence_the_frontend() {
    let mut lb = Lb6::new();
    let mut f = fe(VIP6, 80, IPPROTO_TCP, &[(POD1, 8080, true)]);
    f.source_ranges = vec![(Ipv6Addr::new(0xfd00, 0x198, 0x18, 0, 0, 0, 0, 0), 64)];
    lb.program(60_001, &f);
    let inside = tcp6((CLIENT6, 40000), (VIP6, 80), SYN, b"");
    xdp_rewrites(
        &lb,
        &inside,
        &tcp6((CLIENT6, 40000), (POD1, 8080), SYN, b""),
    );
    let outside = tcp6((OUTSIDER6, 40000), (VIP6, 80), SYN, b"");
    assert_eq!(lb.h.run(&outside).expect("run").0, XDP_DROP);
    // An address sharing the range's first 32 bits only.
    let near = Ipv6Addr::new(0xfd00, 0x198, 0x19, 0, 0, 0, 0, 1);
    let outside = tcp6((near, 40000), (VIP6, 80), SYN, b"");
    assert_eq!(lb.h.run(&outside).expect("run").0, XDP_DROP);
}

/// XDP passes a reject on untouched; `lb_tc_reject` answers.
fn reject(lb: &Lb6, input: &[u8]) -> Vec<u8> {
    let (verdict, out) = lb.h.run(input).expect("xdp run");
    assert_eq!(verdict, XDP_PASS, "XDP passes it on");
    assert_eq!(out, input, "XDP leaves it untouched");
    let (verdict, out) = lb.h.run_reject(input).expect("tc run");
    assert_eq!(verdict, TC_ACT_REDIRECT, "answered");
    // lb_tc_ext answers alike.
    let (verdict, ext) = lb.h.run_ext(input).expect("tc run");
    assert_eq!(verdict, TC_ACT_REDIRECT, "answered by lb_tc_ext");
    assert_eq!(ext, out);
    assert_eq!(&out[0..6], &CLIENT_MAC);
    assert_eq!(&out[6..12], &NODE_MAC);
    out
}

#[test]
fn a_frontend_without_endpoints_answers_rst_and_port_unreachable() {
    let mut lb = Lb6::new();
    lb.program(60_001, &fe(VIP6, 80, IPPROTO_TCP, &[]));
    lb.program(60_002, &fe(VIP6, 53, IPPROTO_UDP, &[]));

    let out = reject(&lb, &tcp6((CLIENT6, 40000), (VIP6, 80), SYN, b""));
    check_l4(&out);
    let s = seen(&out);
    assert_eq!((s.src, s.dst, s.proto), (VIP6, CLIENT6, TCP));
    assert_eq!(ports(&out), (80, 40000));
    let tcp = &out[s.l4..];
    assert_eq!(tcp[13] & (RST | ACK), RST | ACK, "RST|ACK");
    assert_eq!(
        u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]),
        1001,
        "acknowledges the SYN"
    );

    let q = udp6((CLIENT6, 5555), (VIP6, 53), &[1u8; 64]);
    let out = reject(&lb, &q);
    check_l4(&out);
    let s = seen(&out);
    assert_eq!((s.src, s.dst, s.proto), (VIP6, CLIENT6, ICMP6));
    assert_eq!(
        &out[s.l4..s.l4 + 2],
        &[1, 4],
        "destination unreachable, port"
    );
    // RFC 4443 3.1: as much of the packet as fits; all of this small one.
    assert_eq!(&out[s.l4 + 8..], &q[14..]);
}

#[test]
fn fragments_follow_their_first() {
    let mut lb = Lb6::new();
    lb.program(60_001, &fe(VIP6, 53, IPPROTO_UDP, &[(POD1, 5353, true)]));
    let payload: Vec<u8> = (0..200u8).collect();
    let seg = with_checksum(CLIENT6, VIP6, UDP, udp_seg(33333, 53, &payload));
    let frag = |src, dst, seg: &[u8], off: usize, more: bool| {
        let mut h = ((off as u16) | u16::from(more)).to_be_bytes().to_vec();
        h.extend_from_slice(&0x1234_5678u32.to_be_bytes());
        frame(src, dst, &[(FRAGMENT, h)], UDP, seg)
    };
    let first = frag(CLIENT6, VIP6, &seg[..104], 0, true);
    let later = frag(CLIENT6, VIP6, &seg[104..], 104, false);
    let (v1, out1) = lb.h.run(&first).expect("run");
    let (v2, out2) = lb.h.run(&later).expect("run");
    assert_eq!((v1, v2), (XDP_PASS, XDP_PASS));
    // The datagram as the backend reassembles it.
    let want = with_checksum(CLIENT6, POD1, UDP, udp_seg(33333, 5353, &payload));
    assert_eq!(out1, frag(CLIENT6, POD1, &want[..104], 0, true));
    assert_eq!(out2, frag(CLIENT6, POD1, &want[104..], 104, false));
    let (s1, s2) = (seen(&out1), seen(&out2));
    assert_eq!(s1.frag.map(|f| f.2), Some(0x1234_5678));
    assert_eq!(s2.frag.map(|f| (f.0, f.1)), Some((104, false)));
    let mut whole = out1[s1.l4..].to_vec();
    whole.extend_from_slice(&out2[s2.l4..]);
    assert_eq!(
        fold(pseudo_sum(CLIENT6, POD1, whole.len(), UDP) + sum16(&whole)),
        0xffff,
        "reassembled checksum"
    );
}

#[test]
fn extension_headers_before_tcp_are_walked() {
    let mut lb = Lb6::new();
    lb.program(60_001, &fe(VIP6, 80, IPPROTO_TCP, &[(POD1, 8080, true)]));
    // Hop-by-hop (a PadN option) and destination options (PadN) before TCP.
    let exts = |n: usize| -> Vec<(u8, Vec<u8>)> {
        vec![
            (HOP_BY_HOP, vec![1, 4, 0, 0, 0, 0]),
            (DEST_OPTS, {
                let mut b = vec![1, (4 + 8 * n) as u8];
                b.resize(6 + 8 * n, 0);
                b
            }),
        ]
    };
    for n in [0, 2] {
        let seg = with_checksum(CLIENT6, VIP6, TCP, tcp_seg(40000 + n as u16, 80, SYN, b""));
        let input = frame(CLIENT6, VIP6, &exts(n), TCP, &seg);
        let seg = with_checksum(
            CLIENT6,
            POD1,
            TCP,
            tcp_seg(40000 + n as u16, 8080, SYN, b""),
        );
        let want = frame(CLIENT6, POD1, &exts(n), TCP, &seg);
        xdp_rewrites(&lb, &input, &want);
    }
}

#[test]
fn neighbour_discovery_and_router_advertisements_pass_untouched() {
    let mut lb = Lb6::new();
    // Even with a frontend on the node address (a NodePort) nothing here is translated.
    let mut f = fe(NODE6, 30080, IPPROTO_TCP, &[(REMOTE, 8080, false)]);
    f.flags = SVC_F_NODE_PORT;
    lb.program(60_001, &f);
    let solicited = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 1, 0xff00, 2);
    let link = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
    let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    let mut ns = vec![135, 0, 0, 0, 0, 0, 0, 0];
    ns.extend_from_slice(&NODE6.octets());
    let mut na = vec![136, 0, 0, 0, 0x60, 0, 0, 0];
    na.extend_from_slice(&CLIENT6.octets());
    let ra = vec![134, 0, 0, 0, 64, 0, 0x07, 0x08, 0, 0, 0, 0, 0, 0, 0, 0];
    let frames = [
        frame(
            CLIENT6,
            solicited,
            &[],
            ICMP6,
            &with_checksum(CLIENT6, solicited, ICMP6, ns),
        ),
        frame(
            CLIENT6,
            NODE6,
            &[],
            ICMP6,
            &with_checksum(CLIENT6, NODE6, ICMP6, na),
        ),
        frame(
            link,
            all_nodes,
            &[],
            ICMP6,
            &with_checksum(link, all_nodes, ICMP6, ra),
        ),
    ];
    for f in &frames {
        check_l4(f);
        let (verdict, out) = lb.h.run(f).expect("run");
        assert_eq!((verdict, &out), (XDP_PASS, f));
        for run in [Harness::run_ext, Harness::run_pod, Harness::run_egress] {
            let (verdict, out) = run(&lb.h, f).expect("run");
            assert_eq!((verdict, &out), (TC_NEXT, f));
        }
    }
}
