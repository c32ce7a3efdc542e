//! Fuzzing the datapath: frames (random bytes, and valid frames of real flows mutated: bits
//! flipped, cut short, header fields set at random, garbage appended) through every packet
//! program with BPF_PROG_TEST_RUN, each result judged by an oracle of what the datapath may
//! do with it. The programs passed the verifier when the harness loaded them; here no run may
//! fail, nothing may be rewritten that the datapath has no business translating, and every
//! translation must keep the checksums right. Needs root.
//!
//! Every other frame, the TC programs get an skb with a CHECKSUM_COMPLETE sum
//! (BPF_F_TEST_SKB_CHECKSUM_COMPLETE), which the kernel checks still sums the packet after
//! the run; where the datapath is known to leave it wrong (`Stale`), the run is counted
//! apart and the frame run again without the flag to judge its bytes.
//!
//! IPv6 frames (`fuzz_ipv6_frames_through_every_program`: extension headers, fragments,
//! ICMPv6 errors and neighbour discovery, mutated) are judged by a smaller oracle: every run
//! succeeds, a frame naming none of the datapath's IPv6 addresses passes untouched, answers
//! and rewrites carry right L4 checksums; `LB_FUZZ6_FRAMES` (default 200,000) sets their
//! number.
//!
//! `LB_FUZZ_SEED` (default `DEFAULT_SEED`) and `LB_FUZZ_FRAMES` (default 1,000,000) set the
//! seed and the number of frames; each frame runs through all five programs. The seed fixes
//! the frames generated; the datapath's own random choices (ClusterIP backends, SNAT ports)
//! are not seeded, so a run's flows can differ in their backends and ports.
// Harness code: a lab that cannot be built panics with a message, arguments are passed as
// the call sites read best, and floats are compared exactly where they were parsed.
#![allow(
    clippy::needless_pass_by_value,
    clippy::missing_panics_doc,
    clippy::float_cmp,
    clippy::unused_self
)]

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt::Write as _,
    ops::Range,
    time::Instant,
};

use aya::maps::{HashMap as AyaHashMap, Map, MapData, PerCpuArray};
use lb_common::{
    map_names, stat, BackendV4, CtEntryV4, CtKeyV4, ServiceEntry, ServiceKeyV4, SCOPE_ALL,
};
use lb_control::translate::NodeInfo;
use lb_testkit::{
    frame::{
        checksum, verify_checksums, ACK, CLIENT_MAC, FIN, ICMP, NODE_MAC, PSH, RST, SYN, TCP, UDP,
    },
    Harness, Program, SNAT_PORTS, TC_ACT_REDIRECT, TC_ACT_SHOT, XDP_DROP,
};
use lb_userspace::datapath::{conntrack, stats::read_stats};

const DEFAULT_SEED: u64 = 0x5eed_f00d_cafe_0001;
const DEFAULT_FRAMES: u64 = 1_000_000;
/// Every so many frames the agent's conntrack sweep runs, as it does every few seconds on a
/// node, with short timeouts: closed flows and flows idle for `SWEEP_IDLE` go (and their
/// SNAT ports with them), so that the programs also meet flows half gone.
const SWEEP_EVERY: u64 = 100_000;
const SWEEP_IDLE: std::time::Duration = std::time::Duration::from_secs(5);

const NODE_IP: [u8; 4] = [198, 18, 0, 2];
const CLIENT: [u8; 4] = [198, 18, 0, 1];
const CLIENT2: [u8; 4] = [198, 18, 0, 7];
const ROUTER: [u8; 4] = [198, 18, 0, 254];
const VIP: [u8; 4] = [10, 96, 0, 10];
const EMPTY_VIP: [u8; 4] = [10, 96, 0, 20];
/// The Service's backend on this node.
const LOCAL: [u8; 4] = [10, 244, 0, 11];
/// Its backend on node-b: flows from outside to it are source-NATed.
const REMOTE: [u8; 4] = [10, 244, 1, 11];
/// A pod of this node that is no backend.
const POD_CLIENT: [u8; 4] = [10, 244, 0, 12];
const HAIRPIN: [u8; 4] = [169, 254, 42, 1];

/// A NodePort Service `web` (TCP 80 → 8080, NodePort 30080; UDP 53 → 5353, NodePort 30053)
/// with a backend here and one on node-b, and a NodePort Service `empty` without endpoints
/// (its frontends are answered with RST / ICMP port-unreachable). No Local policy and no
/// source ranges: no frontend of these drops.
fn services() -> String {
    let ip = |a: [u8; 4]| format!("{}.{}.{}.{}", a[0], a[1], a[2], a[3]);
    format!(
        r"
apiVersion: v1
kind: Service
metadata: {{name: web}}
spec:
  type: NodePort
  clusterIP: {vip}
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
- {{addresses: [{local}], nodeName: node-a}}
- {{addresses: [{remote}], nodeName: node-b}}
---
apiVersion: v1
kind: Service
metadata: {{name: empty}}
spec:
  type: NodePort
  clusterIP: {empty}
  ports:
  - {{name: http, port: 80, nodePort: 30081}}
  - {{name: dns, port: 53, protocol: UDP, nodePort: 30054}}
",
        vip = ip(VIP),
        local = ip(LOCAL),
        remote = ip(REMOTE),
        empty = ip(EMPTY_VIP),
    )
}

// ---------------------------------------------------------------------------------------
// The PRNG: xorshift64* (Vigna), seeded from LB_FUZZ_SEED.

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        // xorshift's state must not be zero.
        Rng(if seed == 0 {
            0x9e37_79b9_7f4a_7c15
        } else {
            seed
        })
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (`n` > 0; the modulo bias is irrelevant here).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn range(&mut self, r: Range<usize>) -> usize {
        r.start + self.below(r.end - r.start)
    }

    /// True with probability `percent` / 100.
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }

    fn u16(&mut self) -> u16 {
        self.next() as u16
    }

    fn addr(&mut self) -> [u8; 4] {
        (self.next() as u32).to_be_bytes()
    }
}

// ---------------------------------------------------------------------------------------
// Frames: tuples, one's complement sums, building.

/// A TCP/UDP packet's addresses and ports (ports in host order).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
struct Tuple {
    proto: u8,
    saddr: [u8; 4],
    daddr: [u8; 4],
    sport: u16,
    dport: u16,
}

impl Tuple {
    fn new(proto: u8, (saddr, sport): ([u8; 4], u16), (daddr, dport): ([u8; 4], u16)) -> Tuple {
        Tuple {
            proto,
            saddr,
            daddr,
            sport,
            dport,
        }
    }

    fn reverse(self) -> Tuple {
        Tuple {
            proto: self.proto,
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
        }
    }

    /// A conntrack / SNAT key (addresses and ports in network byte order).
    fn from_key(k: &CtKeyV4) -> Tuple {
        Tuple {
            proto: k.proto,
            saddr: k.saddr.to_ne_bytes(),
            daddr: k.daddr.to_ne_bytes(),
            sport: u16::from_be(k.sport),
            dport: u16::from_be(k.dport),
        }
    }

    /// The tuple of an IPv4 header at `ip` and the ports after it (at `ip + 20`).
    fn at(f: &[u8], ip: usize) -> Tuple {
        Tuple {
            proto: f[ip + 9],
            saddr: addr_at(f, ip + 12),
            daddr: addr_at(f, ip + 16),
            sport: be16(f, ip + 20),
            dport: be16(f, ip + 22),
        }
    }
}

impl std::fmt::Display for Tuple {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [a, b, c, d] = self.saddr;
        let [e, g, h, i] = self.daddr;
        write!(
            f,
            "{} {a}.{b}.{c}.{d}:{} -> {e}.{g}.{h}.{i}:{}",
            match self.proto {
                TCP => "tcp",
                UDP => "udp",
                _ => "proto?",
            },
            self.sport,
            self.dport
        )
    }
}

fn be16(f: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([f[at], f[at + 1]])
}

fn addr_at(f: &[u8], at: usize) -> [u8; 4] {
    [f[at], f[at + 1], f[at + 2], f[at + 3]]
}

/// Sum of big-endian 16-bit words (an odd last byte padded with zero), unfolded.
fn sum16(data: &[u8]) -> u64 {
    data.chunks(2)
        .map(|c| u64::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

/// A one's complement sum folded to 16 bits.
fn fold(mut s: u64) -> u16 {
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// A folded sum as a value of one's complement arithmetic: 0xffff and 0 are both zero.
fn ones(s: u64) -> u16 {
    match fold(s) {
        0xffff => 0,
        v => v,
    }
}

/// A region whose checksum field is part of it sums to 0xffff when the checksum is right.
fn sums_right(s: u64) -> bool {
    fold(s) == 0xffff
}

fn pseudo(src: [u8; 4], dst: [u8; 4], proto: u8, len: usize) -> u32 {
    (sum16(&src) + sum16(&dst) + u64::from(proto) + len as u64) as u32
}

/// An Ethernet + IPv4 header (no options) for `payload` bytes of `proto`.
fn put_ipv4(buf: &mut Vec<u8>, t: &Tuple, payload: usize, id: u16, frags: u16) {
    buf.extend(NODE_MAC);
    buf.extend(CLIENT_MAC);
    buf.extend([0x08, 0x00]);
    let start = buf.len();
    buf.push(0x45);
    buf.push(0);
    buf.extend(((20 + payload) as u16).to_be_bytes());
    buf.extend(id.to_be_bytes());
    buf.extend(frags.to_be_bytes());
    buf.push(64);
    buf.push(t.proto);
    buf.extend([0, 0]);
    buf.extend(t.saddr);
    buf.extend(t.daddr);
    let c = checksum(0, &buf[start..]);
    buf[start + 10..start + 12].copy_from_slice(&c.to_be_bytes());
}

/// What an L4 frame carries besides its tuple.
#[derive(Clone, Copy)]
struct L4Opts {
    flags: u8,
    payload: usize,
    id: u16,
    /// IPv4 flags and fragment offset (DF: 0x4000, MF: 0x2000).
    frags: u16,
    udp_zero: bool,
}

impl L4Opts {
    fn plain(flags: u8) -> L4Opts {
        L4Opts {
            flags,
            payload: 0,
            id: 0x1234,
            frags: 0x4000,
            udp_zero: false,
        }
    }
}

/// A TCP or UDP frame with its checksums right (for a first fragment, the L4 checksum is
/// over the bytes it carries, as if they were the whole datagram).
fn build_l4(buf: &mut Vec<u8>, rng: &mut Rng, t: &Tuple, o: L4Opts) {
    let l4_len = if t.proto == TCP { 20 } else { 8 } + o.payload;
    buf.clear();
    put_ipv4(buf, t, l4_len, o.id, o.frags);
    let l4 = buf.len();
    buf.extend(t.sport.to_be_bytes());
    buf.extend(t.dport.to_be_bytes());
    if t.proto == TCP {
        buf.extend(rng.next().to_be_bytes());
        buf.extend([0x50, o.flags, 0xfa, 0xf0, 0, 0, 0, 0]);
    } else {
        buf.extend((l4_len as u16).to_be_bytes());
        buf.extend([0, 0]);
    }
    for _ in 0..o.payload {
        buf.push(rng.byte());
    }
    let csum_at = l4 + if t.proto == TCP { 16 } else { 6 };
    if !(t.proto == UDP && o.udp_zero) {
        let mut c = checksum(pseudo(t.saddr, t.daddr, t.proto, l4_len), &buf[l4..]);
        if t.proto == UDP && c == 0 {
            c = 0xffff;
        }
        buf[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
    }
}

/// A later fragment of a datagram (no L4 header): `len` bytes at 8-byte `offset`.
fn build_later_fragment(
    buf: &mut Vec<u8>,
    rng: &mut Rng,
    t: &Tuple,
    id: u16,
    frags: u16,
    len: usize,
) {
    buf.clear();
    put_ipv4(buf, t, len, id, frags);
    for _ in 0..len {
        buf.push(rng.byte());
    }
}

/// An ICMP error from `src` to `dst` quoting the first `quote` bytes of the IPv4 datagram in
/// `inner` (a frame).
fn build_icmp(
    buf: &mut Vec<u8>,
    src: [u8; 4],
    dst: [u8; 4],
    kind: (u8, u8, u16),
    inner: &[u8],
    quote: usize,
) {
    let quote = quote.min(inner.len() - 14);
    let t = Tuple::new(ICMP, (src, 0), (dst, 0));
    buf.clear();
    put_ipv4(buf, &t, 8 + quote, 0x0ecc, 0);
    let icmp = buf.len();
    let (kind, code, rest) = kind;
    buf.extend([kind, code, 0, 0, 0, 0]);
    buf.extend(rest.to_be_bytes());
    buf.extend(&inner[14..14 + quote]);
    let c = checksum(0, &buf[icmp..]);
    buf[icmp + 2..icmp + 4].copy_from_slice(&c.to_be_bytes());
}

/// Makes every checksum a frame's structure allows right again after a mutation (the IPv4
/// header's, TCP's, UDP's when not zero, ICMP's and the IPv4 header an ICMP message quotes),
/// so that mutated frames with right checksums are tried too.
fn repair(f: &mut [u8]) {
    if f.len() < 34 || f[12..14] != [0x08, 0x00] {
        return;
    }
    let ihl = usize::from(f[14] & 0x0f) * 4;
    if ihl < 20 || f.len() < 14 + ihl {
        return;
    }
    f[24..26].fill(0);
    let c = checksum(0, &f[14..14 + ihl]);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    let tot = usize::from(be16(f, 16));
    if tot < ihl || 14 + tot > f.len() || be16(f, 20) & 0x1fff != 0 {
        return;
    }
    let (l4, end) = (14 + ihl, 14 + tot);
    let (src, dst, proto) = (addr_at(f, 26), addr_at(f, 30), f[23]);
    let at = match proto {
        TCP if end - l4 >= 20 => l4 + 16,
        UDP if end - l4 >= 8 && f[l4 + 6..l4 + 8] != [0, 0] => l4 + 6,
        ICMP if end - l4 >= 4 => {
            // The quoted header first: the ICMP checksum covers it.
            if end - l4 >= 28 && f[l4 + 8] == 0x45 {
                f[l4 + 18..l4 + 20].fill(0);
                let c = checksum(0, &f[l4 + 8..l4 + 28]);
                f[l4 + 18..l4 + 20].copy_from_slice(&c.to_be_bytes());
            }
            f[l4 + 2..l4 + 4].fill(0);
            let c = checksum(0, &f[l4..end]);
            f[l4 + 2..l4 + 4].copy_from_slice(&c.to_be_bytes());
            return;
        }
        _ => return,
    };
    f[at..at + 2].fill(0);
    let mut c = checksum(pseudo(src, dst, proto, end - l4), &f[l4..end]);
    if proto == UDP && c == 0 {
        c = 0xffff;
    }
    f[at..at + 2].copy_from_slice(&c.to_be_bytes());
}

fn hex(f: &[u8]) -> String {
    let mut s = String::with_capacity(f.len() * 3);
    for (i, b) in f.iter().enumerate() {
        if i > 0 {
            s.push(if i % 16 == 0 { '\n' } else { ' ' });
        }
        let _ = write!(s, "{b:02x}");
    }
    s
}

// ---------------------------------------------------------------------------------------
// The oracle: what a frame is to the datapath (`view`, which follows lb-ebpf/src/parse.rs),
// and what the datapath knows (`Model`).

/// (source, destination, IP identification, protocol): a datagram, as `LB4_FRAGS` keys it.
type FragKey = ([u8; 4], [u8; 4], u16, u8);

#[derive(Clone, Copy, Debug)]
enum View {
    /// Anything the datapath must pass on untouched: not Ethernet + IPv4, IP options, a total
    /// length below 20 or beyond the frame, a protocol other than TCP, UDP and ICMP, a TCP/UDP
    /// header cut short or beyond the total length, an ICMP fragment, an ICMP message other
    /// than an error, an error whose quote is cut short or is not IPv4 without options +
    /// TCP/UDP with its ports.
    Other,
    /// TCP/UDP with its header: unfragmented, or a datagram's first fragment.
    L4 {
        t: Tuple,
        first_fragment: bool,
        tcp_flags: u8,
    },
    /// A later fragment (offset > 0): translated only as its datagram's first fragment was.
    Later { key: FragKey },
    /// An ICMP error (type 3, 11 or 12) quoting a TCP/UDP packet `inner`; the quoted L4
    /// checksum's offset in the frame, where the datapath updates it.
    IcmpError {
        inner: Tuple,
        quoted_csum: Option<usize>,
    },
}

fn view(f: &[u8]) -> View {
    if f.len() < 34 || f[12..14] != [0x08, 0x00] || f[14] != 0x45 {
        return View::Other;
    }
    let tot = usize::from(be16(f, 16));
    if tot < 20 || 14 + tot > f.len() {
        return View::Other;
    }
    let frags = be16(f, 20);
    let proto = f[23];
    match proto {
        ICMP => {
            // Not a fragment, the quote within the datagram (so 70 bytes of frame at least),
            // an error type, the quote an IPv4 header without options, not a later fragment,
            // TCP/UDP, and its ports.
            if frags & 0x3fff != 0
                || tot < 20 + 8 + 20 + 8
                || !matches!(f[34], 3 | 11 | 12)
                || f[42] != 0x45
                || be16(f, 48) & 0x1fff != 0
                || !matches!(f[51], TCP | UDP)
            {
                return View::Other;
            }
            let quoted_csum = match f[51] {
                // 14 + tot >= 70: UDP's checksum is always quoted.
                UDP => Some(68),
                _ if tot >= 20 + 8 + 20 + 18 => Some(78),
                _ => None,
            };
            View::IcmpError {
                inner: Tuple::at(f, 42),
                quoted_csum,
            }
        }
        TCP | UDP => {
            if frags & 0x1fff != 0 {
                return View::Later {
                    key: (addr_at(f, 26), addr_at(f, 30), be16(f, 18), proto),
                };
            }
            if tot < 20 + if proto == TCP { 20 } else { 8 } {
                return View::Other;
            }
            View::L4 {
                t: Tuple::at(f, 14),
                first_fragment: frags & 0x2000 != 0,
                tcp_flags: if proto == TCP { f[47] } else { 0 },
            }
        }
        _ => View::Other,
    }
}

/// What the datapath knows, as a superset: the frontends and backends programmed, every
/// conntrack and SNAT key there has been (read from the maps after the first flows, then
/// learnt from each translation: a new flow's packet and the reverse of what it became are
/// its two keys; entries deleted or evicted stay), and the ports of every first fragment
/// the programs have parsed.
struct Model {
    /// (proto, address, port) → number of backends.
    frontends: HashMap<(u8, [u8; 4], u16), u32>,
    /// The same, in order (for generating frames the same way from the same seed).
    frontend_list: Vec<(u8, [u8; 4], u16)>,
    backends: HashSet<(u8, [u8; 4], u16)>,
    known: HashSet<Tuple>,
    known_list: Vec<Tuple>,
    /// (proto, source, destination) of every known key, whatever the ports.
    known_addrs: HashSet<(u8, [u8; 4], [u8; 4])>,
    frags: HashMap<FragKey, Vec<(u16, u16)>>,
    frag_list: Vec<FragKey>,
}

impl Model {
    /// The same Services, no flows.
    fn services_only(&self) -> Model {
        Model {
            frontends: self.frontends.clone(),
            frontend_list: self.frontend_list.clone(),
            backends: self.backends.clone(),
            known: HashSet::new(),
            known_list: Vec::new(),
            known_addrs: HashSet::new(),
            frags: HashMap::new(),
            frag_list: Vec::new(),
        }
    }

    fn learn(&mut self, t: Tuple) {
        if self.known.insert(t) {
            self.known_list.push(t);
            self.known_addrs.insert((t.proto, t.saddr, t.daddr));
        }
    }

    fn remember_fragment(&mut self, t: &Tuple, id: u16) {
        let key = (t.saddr, t.daddr, id, t.proto);
        let ports = self.frags.entry(key).or_default();
        if ports.is_empty() {
            self.frag_list.push(key);
        }
        if !ports.contains(&(t.sport, t.dport)) {
            ports.push((t.sport, t.dport));
        }
    }

    fn frontend(&self, t: &Tuple) -> Option<u32> {
        self.frontends.get(&(t.proto, t.daddr, t.dport)).copied()
    }

    /// The tuples a later fragment may be translated as: its datagram's first fragments'.
    fn fragment_tuples(&self, key: &FragKey) -> Vec<Tuple> {
        let (saddr, daddr, _, proto) = *key;
        self.frags.get(key).map_or_else(Vec::new, |ports| {
            ports
                .iter()
                .map(|&(sport, dport)| Tuple::new(proto, (saddr, sport), (daddr, dport)))
                .collect()
        })
    }
}

/// What a program did with a frame.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Outcome {
    Untouched,
    Rewritten,
    /// Answered with a RST / ICMP port-unreachable (TC_ACT_REDIRECT).
    Rejected,
    /// A RST to a frontend without backends (never answered), or no SNAT port left.
    Dropped,
    /// BPF_PROG_TEST_RUN refuses it (EINVAL) before the program runs (`kernel_refuses`).
    Refused,
    /// Rewritten, the skb's CHECKSUM_COMPLETE sum left wrong: the bug
    /// `udp_without_checksum_keeps_the_checksum_complete_sum` shows.
    RewrittenStaleSum,
    /// Answered, the sum of the skb sent back out left wrong (where it is not used).
    RejectedStaleSum,
}

/// Why the datapath leaves an skb's CHECKSUM_COMPLETE sum wrong (the run fails with
/// EBADMSG), where it is known to.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Stale {
    /// The ports of a UDP datagram without a checksum translated: a bug
    /// (`udp_without_checksum_keeps_the_checksum_complete_sum`).
    UdpWithoutChecksum,
    /// A frame turned into a RST / ICMP answer and sent back out of its interface: the
    /// answer's headers are written directly and the skb's sum is not brought along. Not
    /// known to matter (a transmitted skb's sum is not used, unless a veth hands it to its
    /// peer as received), so counted apart rather than failed.
    Reject,
}

fn stale_sum(m: &Model, prog: Program, v: &View, input: &[u8]) -> Option<Stale> {
    let View::L4 { t, .. } = v else {
        return None;
    };
    let translated = m.known.contains(t) || m.frontend(t).unwrap_or(0) > 0;
    if t.proto == UDP && input[40..42] == [0, 0] && prog != Program::TcReject && translated {
        return Some(Stale::UdpWithoutChecksum);
    }
    let answers = matches!(prog, Program::TcPod | Program::TcExt | Program::TcReject);
    (answers && m.frontend(t) == Some(0)).then_some(Stale::Reject)
}

/// The first byte that differs outside `allowed`.
fn changed_outside(input: &[u8], out: &[u8], allowed: &[Range<usize>]) -> Option<usize> {
    (0..input.len()).find(|&i| input[i] != out[i] && !allowed.iter().any(|r| r.contains(&i)))
}

/// A region's checksum kept: the one's complement sum over it (its checksum field included)
/// is the same before and after, which an incremental update (RFC 1624) guarantees whether
/// or not the checksum was right; and a right one stays right.
fn kept(what: &str, input: u64, out: u64) -> Result<(), String> {
    if ones(input) != ones(out) {
        return Err(format!(
            "{what}: sum {:04x} before, {:04x} after the rewrite",
            fold(input),
            fold(out)
        ));
    }
    if sums_right(input) && !sums_right(out) {
        return Err(format!("{what}: checksum right before, wrong after"));
    }
    Ok(())
}

/// A translated TCP/UDP packet (not a later fragment): only addresses, ports and checksums
/// changed, both checksums kept. Returns the tuple it became.
fn check_l4_rewrite(input: &[u8], out: &[u8], proto: u8) -> Result<Tuple, String> {
    let csum = if proto == TCP { 50 } else { 40 };
    if let Some(i) = changed_outside(input, out, &[24..38, csum..csum + 2]) {
        return Err(format!(
            "byte {i} changed (only addresses, ports, checksums may)"
        ));
    }
    kept("IPv4 header", sum16(&input[14..34]), sum16(&out[14..34]))?;
    let end = 14 + usize::from(be16(input, 16));
    if proto == UDP && input[40..42] == [0, 0] {
        if out[40..42] != [0, 0] {
            return Err("a zero UDP checksum (none) was changed".into());
        }
    } else {
        // The pseudo-header (addresses, protocol, length) and the segment.
        let l4 = |f: &[u8]| {
            sum16(&f[26..34]) + u64::from(proto) + (end - 34) as u64 + sum16(&f[34..end])
        };
        kept("L4 checksum", l4(input), l4(out))?;
        if proto == UDP && out[40..42] == [0, 0] {
            return Err("a UDP checksum became zero (none)".into());
        }
    }
    if verify_checksums(input).is_ok() {
        verify_checksums(out).map_err(|e| format!("from scratch: {e}"))?;
    }
    Ok(Tuple::at(out, 14))
}

/// A translated later fragment: only its addresses and the IPv4 checksum changed.
fn check_later_rewrite(input: &[u8], out: &[u8]) -> Result<(), String> {
    if let Some(i) = changed_outside(input, out, &[24..26, 26..34]) {
        return Err(format!("byte {i} of a later fragment changed"));
    }
    kept("IPv4 header", sum16(&input[14..34]), sum16(&out[14..34]))
}

/// A translated ICMP error: outer addresses, quoted addresses and ports, and the outer IPv4,
/// ICMP, quoted IPv4 and quoted L4 checksums, each kept; the error goes to the quoted
/// packet's (new) source; its source is the quoted destination's new address if it was that
/// destination, else unchanged.
fn check_icmp_rewrite(input: &[u8], out: &[u8], quoted_csum: Option<usize>) -> Result<(), String> {
    let mut allowed = vec![24..34, 36..38, 52..66];
    if let Some(at) = quoted_csum {
        allowed.push(at..at + 2);
    }
    if let Some(i) = changed_outside(input, out, &allowed) {
        return Err(format!("byte {i} of an ICMP error changed"));
    }
    let end = 14 + usize::from(be16(input, 16));
    kept(
        "outer IPv4 header",
        sum16(&input[14..34]),
        sum16(&out[14..34]),
    )?;
    kept(
        "ICMP checksum",
        sum16(&input[34..end]),
        sum16(&out[34..end]),
    )?;
    kept(
        "quoted IPv4 header",
        sum16(&input[42..62]),
        sum16(&out[42..62]),
    )?;
    if let Some(at) = quoted_csum {
        if input[51] == UDP && input[at..at + 2] == [0, 0] {
            if out[at..at + 2] != [0, 0] {
                return Err("a quoted zero UDP checksum was changed".into());
            }
        } else {
            let q = |f: &[u8]| sum16(&f[54..66]) + sum16(&f[at..at + 2]);
            kept("quoted L4 checksum", q(input), q(out))?;
        }
    }
    if out[30..34] != out[54..58] {
        return Err("the error does not go to the quoted packet's source".into());
    }
    let from_peer = input[26..30] == input[58..62];
    if from_peer && out[26..30] != out[58..62] {
        return Err(
            "an error from the quoted destination does not come from its new address".into(),
        );
    }
    if !from_peer && out[26..30] != input[26..30] {
        return Err("an error from a router changed its source".into());
    }
    Ok(())
}

/// A reject: the frame turned into a RST (TCP) or ICMP port-unreachable (UDP) back to its
/// sender, checksums right.
fn check_reject(input: &[u8], out: &[u8], t: &Tuple, tcp_flags: u8) -> Result<(), String> {
    if out.len() < 34
        || out[0..6] != input[6..12]
        || out[6..12] != input[0..6]
        || out[12..14] != [8, 0]
    {
        return Err("not an IPv4 frame back to the sender's MAC".into());
    }
    verify_checksums(out).map_err(|e| format!("reject: {e}"))?;
    if addr_at(out, 26) != t.daddr || addr_at(out, 30) != t.saddr {
        return Err("reject not from the frontend to the client".into());
    }
    if t.proto == TCP {
        if tcp_flags & RST != 0 {
            return Err("a RST was answered".into());
        }
        let r = Tuple::at(out, 14);
        if out.len() != 54 || out[23] != TCP || r != t.reverse() || out[47] & RST == 0 {
            return Err("not a RST of the connection".into());
        }
    } else if out.len() != 70
        || out[23] != ICMP
        || out[34..36] != [3, 3]
        || out[42..70] != input[14..42]
    {
        return Err("not a port unreachable quoting the datagram".into());
    }
    Ok(())
}

/// `LB_STATS`'s SNAT port exhaustion counter, to tell a drop for want of SNAT ports apart.
struct SnatDrops {
    map: PerCpuArray<MapData, u64>,
    seen: u64,
}

impl SnatDrops {
    fn open(h: &Harness) -> SnatDrops {
        let data = MapData::from_pin(h.pin.path().join(map_names::LB_STATS)).expect("LB_STATS");
        let map = PerCpuArray::try_from(Map::PerCpuArray(data)).expect("LB_STATS is per-CPU");
        let mut d = SnatDrops { map, seen: 0 };
        d.seen = d.read();
        d
    }

    fn read(&self) -> u64 {
        self.map
            .get(&stat::DROP_SNAT_PORTS, 0)
            .expect("counter")
            .iter()
            .sum()
    }

    /// The last run counted one drop for want of a SNAT port.
    fn one_more(&mut self) -> bool {
        let now = self.read();
        let one = now == self.seen + 1;
        self.seen = now;
        one
    }
}

/// A drop the datapath may make: a RST to a frontend without backends (never answered), or a
/// new flow from outside to a remote backend when no SNAT port is left (counted as such).
fn may_drop(
    m: &Model,
    snat_drop: &mut dyn FnMut() -> bool,
    prog: Program,
    v: &View,
    verdict: u32,
) -> bool {
    let View::L4 { t, tcp_flags, .. } = v else {
        return false;
    };
    let backends = m.frontend(t);
    let ingress_tc = matches!(prog, Program::TcPod | Program::TcExt | Program::TcReject);
    if ingress_tc && verdict == TC_ACT_SHOT && backends == Some(0) {
        return t.proto == TCP && tcp_flags & RST != 0;
    }
    let drop = (prog == Program::Xdp && verdict == XDP_DROP)
        || (prog == Program::TcExt && verdict == TC_ACT_SHOT);
    drop && backends.unwrap_or(0) > 0 && snat_drop()
}

/// Judges one run of `prog` on `input` (whose `view` is `v`): what it did, or why that is
/// wrong. Learns the keys of new flows. `snat_drop`: whether the datapath counted this run as
/// a drop for want of a SNAT port.
fn judge(
    m: &mut Model,
    snat_drop: &mut dyn FnMut() -> bool,
    prog: Program,
    input: &[u8],
    v: &View,
    verdict: u32,
    out: &[u8],
) -> Result<Outcome, String> {
    let ingress_tc = matches!(prog, Program::TcPod | Program::TcExt | Program::TcReject);
    let to_empty = |m: &Model| match v {
        View::L4 { t, tcp_flags, .. } if m.frontend(t) == Some(0) => Some((*t, *tcp_flags)),
        _ => None,
    };
    if verdict == prog.pass() {
        if out == input {
            return Ok(Outcome::Untouched);
        }
        if out.len() != input.len() {
            return Err(format!("passed on {} bytes for {}", out.len(), input.len()));
        }
        if prog == Program::TcReject {
            return Err("lb_tc_reject rewrote a frame it passed on".into());
        }
        // Where packets leave, only translations that keep the destination are made.
        if prog == Program::TcEgress && out[30..34] != input[30..34] {
            return Err("lb_tc_egress changed a destination".into());
        }
        match v {
            View::Other => Err("rewrote a frame the datapath must leave alone".into()),
            View::L4 { t, .. } => {
                let known = m.known.contains(t);
                let frontend = m.frontend(t);
                // A new direct TCP connection on a Service flow's reply tuple gets another
                // source port (the client's moved below the ephemeral range, or one of the
                // SNAT range); nothing else of it changes.
                if !known && frontend.is_none() && t.proto == TCP && m.known.contains(&t.reverse())
                {
                    let o = check_l4_rewrite(input, out, t.proto)?;
                    let moved = (32768..=60999).contains(&t.sport).then(|| t.sport - 31744);
                    let port_ok = moved
                        .map_or((SNAT_PORTS.0..=SNAT_PORTS.1).contains(&o.sport), |p| {
                            o.sport == p
                        });
                    if (o.saddr, o.daddr, o.dport) != (t.saddr, t.daddr, t.dport) || !port_ok {
                        return Err(format!("remapped the direct flow {t} to {o}"));
                    }
                    m.learn(*t);
                    m.learn(o.reverse());
                    return Ok(Outcome::Rewritten);
                }
                if !known && frontend.is_none() {
                    return Err(format!("rewrote {t}: no flow, no frontend"));
                }
                let o = check_l4_rewrite(input, out, t.proto)?;
                // A packet of a flow becomes the reverse of the flow's other key; only a new
                // flow to a frontend leads somewhere new: to one of its backends, from the
                // client, this node (SNAT, a port of its range) or the hairpin address.
                if !m.known.contains(&o.reverse()) {
                    let to_backend = m.backends.contains(&(o.proto, o.daddr, o.dport));
                    let from_ok = (o.saddr, o.sport) == (t.saddr, t.sport)
                        || (o.saddr == NODE_IP && (SNAT_PORTS.0..=SNAT_PORTS.1).contains(&o.sport))
                        || (o.saddr == HAIRPIN && o.daddr == t.saddr && o.sport == t.sport);
                    // A remapped direct flow (whose mapping was swept and made again, with
                    // another port of the SNAT range).
                    let remapped = t.proto == TCP
                        && frontend.is_none()
                        && (o.saddr, o.daddr, o.dport) == (t.saddr, t.daddr, t.dport)
                        && (SNAT_PORTS.0..=SNAT_PORTS.1).contains(&o.sport);
                    if !remapped && (frontend.unwrap_or(0) == 0 || !to_backend || !from_ok) {
                        return Err(format!("rewrote {t} to {o}: no flow of either"));
                    }
                }
                m.learn(*t);
                m.learn(o.reverse());
                Ok(Outcome::Rewritten)
            }
            View::Later { key } => {
                if !m.fragment_tuples(key).iter().any(|t| m.known.contains(t)) {
                    return Err(format!(
                        "rewrote a later fragment of a datagram of no flow (first fragments seen: {:?})",
                        m.fragment_tuples(key)
                    ));
                }
                check_later_rewrite(input, out)?;
                // Its datagram's flow: the reverse of the new addresses is a known key's.
                let (saddr, daddr) = (addr_at(out, 26), addr_at(out, 30));
                if !m.known_addrs.contains(&(key.3, daddr, saddr)) {
                    return Err("a later fragment now goes between addresses of no flow".into());
                }
                Ok(Outcome::Rewritten)
            }
            View::IcmpError { inner, quoted_csum } => {
                if !m.known.contains(&inner.reverse()) {
                    return Err(format!("rewrote an ICMP error quoting {inner}: no flow"));
                }
                check_icmp_rewrite(input, out, *quoted_csum)?;
                let now = Tuple::at(out, 42);
                if !m.known.contains(&now) {
                    return Err(format!("an ICMP error now quotes {now}: no flow"));
                }
                Ok(Outcome::Rewritten)
            }
        }
    } else if ingress_tc && verdict == TC_ACT_REDIRECT {
        let Some((t, flags)) = to_empty(m) else {
            return Err("answered a frame that is not to a frontend without backends".into());
        };
        check_reject(input, out, &t, flags)?;
        Ok(Outcome::Rejected)
    } else if may_drop(m, snat_drop, prog, v, verdict) {
        Ok(Outcome::Dropped)
    } else {
        Err(format!("verdict {verdict}"))
    }
}

// ---------------------------------------------------------------------------------------
// Generation.

const ADDRS: [[u8; 4]; 12] = [
    NODE_IP, CLIENT, CLIENT2, ROUTER, VIP, EMPTY_VIP, LOCAL, REMOTE, POD_CLIENT, HAIRPIN, [0; 4],
    [255; 4],
];
const PORTS: [u16; 14] = [
    80, 53, 8080, 5353, 30080, 30081, 30053, 30054, 40000, 40001, 61000, 65535, 0, 1,
];
const FLAGS: [u8; 9] = [
    SYN,
    SYN | ACK,
    ACK,
    ACK | PSH,
    FIN | ACK,
    RST,
    RST | ACK,
    0,
    0xff,
];
const FRAG_IDS: [u16; 4] = [0x1111, 0x2222, 0x3333, 0x4242];

struct Gen {
    rng: Rng,
    scratch: Vec<u8>,
}

impl Gen {
    fn port(&mut self) -> u16 {
        if self.rng.chance(50) {
            self.rng.pick(&PORTS)
        } else {
            self.rng.u16()
        }
    }

    fn any_addr(&mut self) -> [u8; 4] {
        if self.rng.chance(70) {
            self.rng.pick(&ADDRS)
        } else {
            self.rng.addr()
        }
    }

    fn opts(&mut self) -> L4Opts {
        let payload = if self.rng.chance(80) {
            self.rng.below(48)
        } else {
            self.rng.range(48..140)
        };
        L4Opts {
            flags: self.rng.pick(&FLAGS),
            payload,
            id: self.rng.u16(),
            frags: if self.rng.chance(80) { 0x4000 } else { 0 },
            udp_zero: self.rng.chance(15),
        }
    }

    fn known(&mut self, m: &Model) -> Tuple {
        let t = m.known_list[self.rng.below(m.known_list.len())];
        if self.rng.chance(10) {
            t.reverse()
        } else {
            t
        }
    }

    fn for_frontend(&mut self, m: &Model) -> Tuple {
        let (proto, daddr, dport) = m.frontend_list[self.rng.below(m.frontend_list.len())];
        let anyone = self.rng.addr();
        let saddr = self
            .rng
            .pick(&[CLIENT, CLIENT2, POD_CLIENT, LOCAL, REMOTE, anyone]);
        let sport = if self.rng.chance(50) {
            40000 + self.rng.below(16) as u16
        } else {
            self.rng.u16()
        };
        Tuple::new(proto, (saddr, sport), (daddr, dport))
    }

    fn random_tuple(&mut self) -> Tuple {
        let proto = if self.rng.chance(50) { TCP } else { UDP };
        Tuple::new(
            proto,
            (self.any_addr(), self.port()),
            (self.any_addr(), self.port()),
        )
    }

    /// A valid frame of some kind into `buf`: its kind.
    fn valid(&mut self, m: &Model, buf: &mut Vec<u8>) -> &'static str {
        match self.rng.below(92) {
            0..22 => {
                let t = self.known(m);
                let o = self.opts();
                build_l4(buf, &mut self.rng, &t, o);
                "flow packet"
            }
            22..36 => {
                let t = self.for_frontend(m);
                let o = self.opts();
                build_l4(buf, &mut self.rng, &t, o);
                "to a frontend"
            }
            36..42 => {
                let t = self.random_tuple();
                let o = self.opts();
                build_l4(buf, &mut self.rng, &t, o);
                "random tuple"
            }
            42..50 => {
                let t = if self.rng.chance(60) {
                    self.known(m)
                } else {
                    self.for_frontend(m)
                };
                let o = L4Opts {
                    id: self.rng.pick(&FRAG_IDS),
                    frags: 0x2000,
                    payload: 8 * self.rng.range(1..8),
                    ..self.opts()
                };
                build_l4(buf, &mut self.rng, &t, o);
                "first fragment"
            }
            50..58 => {
                let (t, id) = if !m.frag_list.is_empty() && self.rng.chance(75) {
                    let key = m.frag_list[self.rng.below(m.frag_list.len())];
                    (Tuple::new(key.3, (key.0, 0), (key.1, 0)), key.2)
                } else {
                    (self.random_tuple(), self.rng.pick(&FRAG_IDS))
                };
                let offset = if self.rng.chance(80) {
                    self.rng.range(1..16)
                } else {
                    self.rng.range(1..0x2000)
                } as u16;
                let more = if self.rng.chance(50) { 0x2000 } else { 0 };
                let len = self.rng.range(1..64);
                build_later_fragment(buf, &mut self.rng, &t, id, more | offset, len);
                "later fragment"
            }
            58..74 => {
                // About a packet of a flow, going the other way than the error.
                let q = self.known(m).reverse();
                self.icmp_about(buf, &q, true);
                "ICMP error of a flow"
            }
            74..82 => {
                if self.rng.chance(60) {
                    let q = self.random_tuple();
                    self.icmp_about(buf, &q, true);
                    "ICMP error, random quote"
                } else {
                    let q = self.for_frontend(m);
                    self.icmp_about(buf, &q, false);
                    "ICMP, not an error"
                }
            }
            _ => {
                self.other(m, buf);
                "other protocol"
            }
        }
    }

    /// An ICMP message quoting a packet of `q`: an error (type 3, 11, 12; from the quoted
    /// destination, a router or anyone), or some other type.
    fn icmp_about(&mut self, buf: &mut Vec<u8>, q: &Tuple, error: bool) {
        let mut inner = std::mem::take(&mut self.scratch);
        let o = self.opts();
        build_l4(&mut inner, &mut self.rng, q, o);
        let kind = if error {
            let t = self.rng.pick(&[3, 3, 11, 12]);
            let code = if t == 3 {
                self.rng.pick(&[1, 3, 4, 13])
            } else {
                self.rng.below(3) as u8
            };
            (t, code, if code == 4 { 1400 } else { 0 })
        } else {
            (self.rng.pick(&[0, 4, 5, 8, 13, 40]), 0, self.rng.u16())
        };
        let anyone = self.rng.addr();
        let src = self.rng.pick(&[q.daddr, q.daddr, ROUTER, anyone]);
        let quote = self.rng.pick(&[28, 28, 32, 38, 40, 44, 48, 2000]);
        build_icmp(buf, src, q.saddr, kind, &inner, quote);
        self.scratch = inner;
    }

    /// IPv6, ARP, VLAN-tagged, IPv4 with options, other IP protocols: never ours.
    fn other(&mut self, m: &Model, buf: &mut Vec<u8>) {
        let t = self.for_frontend(m);
        let o = self.opts();
        build_l4(buf, &mut self.rng, &t, o);
        match self.rng.below(4) {
            0 => {
                let et = self
                    .rng
                    .pick(&[[0x86, 0xdd], [0x08, 0x06], [0x81, 0x00], [0x00, 0x08]]);
                buf[12..14].copy_from_slice(&et);
            }
            1 => {
                // Options (NOPs) in front of a valid segment to a frontend.
                let n = 4 * self.rng.range(1..11);
                buf[14] = 0x45 + (n / 4) as u8;
                let tot = be16(buf, 16) + n as u16;
                buf[16..18].copy_from_slice(&tot.to_be_bytes());
                for _ in 0..n {
                    buf.insert(34, 1);
                }
                repair(buf);
            }
            _ => {
                buf[23] = self.rng.pick(&[0, 2, 4, 41, 47, 50, 132, 255]);
                repair(buf);
            }
        }
    }

    /// Mutates a frame: bits flipped, cut, a header field set at random, garbage appended.
    fn mutate(&mut self, f: &mut Vec<u8>) {
        let rng = &mut self.rng;
        if f.is_empty() {
            f.push(rng.byte());
            return;
        }
        let len = f.len();
        let hot = len.min(82);
        // Random values for the picks below.
        let (r8, r16) = (rng.byte(), rng.u16());
        let set = |f: &mut Vec<u8>, at: usize, v: &[u8]| {
            if at + v.len() <= f.len() {
                f[at..at + v.len()].copy_from_slice(v);
            }
        };
        match rng.below(17) {
            0 => {
                let i = rng.below(len);
                f[i] ^= 1 << rng.below(8);
            }
            1 | 2 => {
                for _ in 0..rng.range(1..4) {
                    let i = rng.below(hot);
                    f[i] ^= 1 << rng.below(8);
                }
            }
            3 => f.truncate(rng.below(len)),
            4 => {
                let b = (f.get(14).copied().unwrap_or(0x45) & 0xf0) | rng.below(16) as u8;
                set(f, 14, &[b]);
            }
            5 => {
                let b = (f.get(14).copied().unwrap_or(0x45) & 0x0f) | (rng.below(16) as u8) << 4;
                set(f, 14, &[b]);
            }
            6 => {
                let tot = match rng.below(3) {
                    0 => rng.u16(),
                    1 => (len as u16)
                        .wrapping_sub(14)
                        .wrapping_add(rng.range(0..9) as u16)
                        .wrapping_sub(4),
                    _ => rng.pick(&[0, 1, 19, 20, 27, 28, 39, 40, 55, 56, 65, 66, 0xffff]),
                };
                set(f, 16, &tot.to_be_bytes());
            }
            7 => {
                let frags = rng.pick(&[0x2000, 0x0001, 0x2001, 0x4000, 0, 0x1fff, 0x6000, r16]);
                set(f, 20, &frags.to_be_bytes());
            }
            8 => {
                let p = rng.pick(&[ICMP, TCP, UDP, 0, 47, r8]);
                set(f, 23, &[p]);
            }
            9 => {
                for _ in 0..rng.range(1..64) {
                    f.push(rng.byte());
                }
            }
            10 => {
                let et = rng.pick(&[[0x86, 0xdd], [0x08, 0x06], [0x81, 0x00], r16.to_be_bytes()]);
                set(f, 12, &et);
            }
            11 => {
                // A port (outer or quoted) set to a well-known or random value.
                let at = rng.pick(&[34, 36, 62, 64]);
                let p = if rng.chance(50) {
                    rng.pick(&PORTS)
                } else {
                    rng.u16()
                };
                set(f, at, &p.to_be_bytes());
            }
            12 => {
                let at = rng.pick(&[26, 30, 54, 58]);
                let a = if rng.chance(70) {
                    rng.pick(&ADDRS)
                } else {
                    rng.addr()
                };
                set(f, at, &a);
            }
            13 => {
                let fl = rng.pick(&FLAGS);
                set(f, 47, &[fl]);
            }
            14 => {
                let t = rng.pick(&[0, 3, 4, 5, 8, 11, 12, r8]);
                set(f, 34, &[t]);
            }
            15 => {
                // The quoted header: version/IHL, fragment field, protocol.
                match rng.below(3) {
                    0 => set(f, 42, &[rng.pick(&[0x45, 0x46, 0x44, 0x65, r8])]),
                    1 => set(
                        f,
                        48,
                        &rng.pick(&[0x2000u16, 0x0001, 0x4000, r16]).to_be_bytes(),
                    ),
                    _ => set(f, 51, &[rng.pick(&[TCP, UDP, ICMP, r8])]),
                }
            }
            _ => {
                let i = rng.below(len);
                f[i] = rng.pick(&[0, 0xff, r8]);
            }
        }
    }

    /// The next frame to try: its kind.
    fn frame(&mut self, m: &Model, buf: &mut Vec<u8>) -> &'static str {
        if self.rng.chance(8) {
            let len = self.rng.below(200);
            buf.clear();
            for _ in 0..len {
                buf.push(self.rng.byte());
            }
            return "random bytes";
        }
        let kind = self.valid(m, buf);
        let mutations = match self.rng.below(10) {
            0..4 => 0,
            4..9 => self.rng.range(1..4),
            _ => self.rng.range(4..12),
        };
        for _ in 0..mutations {
            self.mutate(buf);
        }
        if mutations > 0 && self.rng.chance(50) {
            repair(buf);
        }
        kind
    }
}

// ---------------------------------------------------------------------------------------
// The test.

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(s) => {
            let s = s.trim();
            let parsed = if let Some(h) = s.strip_prefix("0x") {
                u64::from_str_radix(h, 16)
            } else {
                s.parse()
            };
            parsed.unwrap_or_else(|e| panic!("{name}={s}: {e}"))
        }
        Err(_) => default,
    }
}

fn conntrack_keys(h: &Harness, name: &str) -> Vec<Tuple> {
    let data = MapData::from_pin(h.pin.path().join(name)).expect(name);
    let map: AyaHashMap<MapData, CtKeyV4, CtEntryV4> =
        AyaHashMap::try_from(Map::LruHashMap(data)).expect("an LRU hash");
    let mut keys: Vec<Tuple> = map
        .keys()
        .map(|k| Tuple::from_key(&k.expect("key")))
        .collect();
    keys.sort_unstable();
    keys
}

/// Frontends and backends as programmed, and every conntrack and SNAT key.
fn read_model(h: &Harness) -> Model {
    let data = MapData::from_pin(h.pin.path().join(map_names::LB4_SERVICES)).expect("LB4_SERVICES");
    let services: AyaHashMap<MapData, ServiceKeyV4, ServiceEntry> =
        AyaHashMap::try_from(Map::HashMap(data)).expect("a hash");
    let frontends: HashMap<_, _> = services
        .iter()
        .map(|e| e.expect("service"))
        .filter(|(k, _)| k.scope == SCOPE_ALL)
        .map(|(k, v)| {
            (
                (k.proto, k.addr.to_ne_bytes(), u16::from_be(k.port)),
                v.count,
            )
        })
        .collect();
    let mut frontend_list: Vec<_> = frontends.keys().copied().collect();
    frontend_list.sort_unstable();
    let data = MapData::from_pin(h.pin.path().join(map_names::LB4_BACKENDS)).expect("LB4_BACKENDS");
    let backends: AyaHashMap<MapData, u32, BackendV4> =
        AyaHashMap::try_from(Map::HashMap(data)).expect("a hash");
    let backends = backends
        .iter()
        .map(|e| e.expect("backend").1)
        .map(|b| (b.proto, b.addr.to_ne_bytes(), u16::from_be(b.port)))
        .collect();
    let mut m = Model {
        frontends,
        frontend_list,
        backends,
        known: HashSet::new(),
        known_list: Vec::new(),
        known_addrs: HashSet::new(),
        frags: HashMap::new(),
        frag_list: Vec::new(),
    };
    for name in [map_names::LB4_CONNTRACK, map_names::LB4_SNAT] {
        for t in conntrack_keys(h, name) {
            m.learn(t);
        }
    }
    m
}

/// Whether BPF_PROG_TEST_RUN refuses a frame before running the program: any shorter than
/// an Ethernet header; for the TC programs (skbs), also an IPv4 frame shorter than an IPv4
/// header and an IPv6 one shorter than an IPv6 header (net/bpf/test_run.c with a 2026 fix,
/// backported to stable kernels: this 6.18 kernel has it; older ones run such frames).
fn kernel_refuses(prog: Program, f: &[u8]) -> bool {
    f.len() < 14
        || (prog != Program::Xdp
            && ((f[12..14] == [0x08, 0x00] && f.len() < 14 + 20)
                || (f[12..14] == [0x86, 0xdd] && f.len() < 14 + 40)))
}

/// The system call's error of a failed run (or the error as it is, if it has none).
fn io_error(e: aya::programs::ProgramError) -> std::io::Error {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(err) = cur {
        if let Some(code) = err
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error)
        {
            return std::io::Error::from_raw_os_error(code);
        }
        cur = err.source();
    }
    std::io::Error::other(e.to_string())
}

#[derive(Default)]
struct Counts {
    runs: u64,
    by_outcome: BTreeMap<&'static str, u64>,
}

/// The flows the fuzzing starts from: through the programs they would take, each judged.
fn first_flows(h: &Harness, m: &mut Model, drops: &mut SnatDrops) {
    let mut rng = Rng::new(1);
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let mut run = |m: &mut Model, prog: Program, frame: &[u8]| -> Tuple {
        let verdict = h.run_into(prog, frame, &mut out).expect("test run");
        let v = view(frame);
        if let View::L4 {
            t,
            first_fragment: true,
            ..
        } = v
        {
            m.remember_fragment(&t, be16(frame, 18));
        }
        let outcome = judge(m, &mut || drops.one_more(), prog, frame, &v, verdict, &out)
            .unwrap_or_else(|e| panic!("first flows, {}: {e}\n{}", prog.name(), hex(frame)));
        assert_eq!(
            outcome,
            Outcome::Rewritten,
            "first flows, {}: {v:?}",
            prog.name()
        );
        Tuple::at(&out, 14)
    };
    let mut flow = |m: &mut Model, t: Tuple, prog: Program| {
        build_l4(
            &mut buf,
            &mut rng,
            &t,
            L4Opts::plain(if t.proto == TCP { SYN } else { 0 }),
        );
        let o = run(m, prog, &buf.clone());
        // The backend answers: a local one through its pod interface, a remote one from
        // outside.
        let back = if o.daddr == LOCAL {
            Program::TcPod
        } else {
            Program::TcExt
        };
        let reply = o.reverse();
        build_l4(&mut buf, &mut rng, &reply, L4Opts::plain(SYN | ACK));
        let r = run(m, back, &buf.clone());
        assert_eq!(r, t.reverse(), "the reply comes back from the frontend");
    };
    for p in 0..12 {
        flow(
            m,
            Tuple::new(TCP, (CLIENT, 40000 + p), (NODE_IP, 30080)),
            Program::Xdp,
        );
        flow(
            m,
            Tuple::new(TCP, (CLIENT2, 40000 + p), (VIP, 80)),
            Program::TcExt,
        );
        flow(
            m,
            Tuple::new(UDP, (CLIENT, 40000 + p), (NODE_IP, 30053)),
            Program::Xdp,
        );
    }
    for p in 0..4 {
        flow(
            m,
            Tuple::new(TCP, (POD_CLIENT, 40000 + p), (VIP, 80)),
            Program::TcPod,
        );
        flow(
            m,
            Tuple::new(UDP, (POD_CLIENT, 40000 + p), (VIP, 53)),
            Program::TcPod,
        );
        // LOCAL to its own Service: hairpin when it is chosen.
        flow(
            m,
            Tuple::new(TCP, (LOCAL, 40000 + p), (VIP, 80)),
            Program::TcPod,
        );
    }
    // A fragmented datagram to the ClusterIP's DNS port: its first fragment starts the flow,
    // its later fragment is translated like it.
    let t = Tuple::new(UDP, (CLIENT, 40100), (VIP, 53));
    let o = L4Opts {
        frags: 0x2000,
        id: FRAG_IDS[3],
        payload: 16,
        ..L4Opts::plain(0)
    };
    build_l4(&mut buf, &mut rng, &t, o);
    run(m, Program::Xdp, &buf.clone());
    build_later_fragment(&mut buf, &mut rng, &t, FRAG_IDS[3], 3, 16);
    let later = buf.clone();
    let verdict = h
        .run_into(Program::Xdp, &later, &mut out)
        .expect("test run");
    assert_eq!(
        judge(
            m,
            &mut || drops.one_more(),
            Program::Xdp,
            &later,
            &view(&later),
            verdict,
            &out
        ),
        Ok(Outcome::Rewritten)
    );
}

#[test]
fn fuzz_every_program_against_the_oracle() {
    lb_testkit::require_root();
    let seed = env_u64("LB_FUZZ_SEED", DEFAULT_SEED);
    let frames = env_u64("LB_FUZZ_FRAMES", DEFAULT_FRAMES);
    println!("fuzz: seed {seed:#x} (LB_FUZZ_SEED), {frames} frames (LB_FUZZ_FRAMES), each through all five programs");

    let mut h = Harness::new(NodeInfo {
        name: "node-a".into(),
        addresses: vec![NODE_IP.into()],
        zone: None,
    })
    .expect("datapath loads");
    h.program(&services()).expect("program");
    let mut m = read_model(&h);
    assert!(
        m.frontends.values().any(|c| *c == 0),
        "a frontend without backends: {:?}",
        m.frontends
    );
    assert!(m.frontends.values().any(|c| *c == 2), "{:?}", m.frontends);
    let mut drops = SnatDrops::open(&h);
    first_flows(&h, &mut m, &mut drops);
    // The maps after the first flows: forward, reply and SNAT entries, all in the model.
    let ct = conntrack_keys(&h, map_names::LB4_CONNTRACK);
    let snat = conntrack_keys(&h, map_names::LB4_SNAT);
    assert!(!snat.is_empty(), "no flow was source-NATed");
    for t in ct.iter().chain(&snat) {
        assert!(m.known.contains(t), "the model misses {t}");
        m.learn(*t);
    }
    println!(
        "first flows: {} conntrack entries, {} SNAT entries, {} frontends",
        ct.len(),
        snat.len(),
        m.frontends.len()
    );

    let mut gen = Gen {
        rng: Rng::new(seed),
        scratch: Vec::new(),
    };
    let mut input = Vec::with_capacity(512);
    let mut out = Vec::with_capacity(1024);
    let mut per_prog: BTreeMap<&'static str, Counts> = BTreeMap::new();
    let mut rewritten_by_view: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut kinds: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut failures: Vec<String> = Vec::new();
    let mut reasons: HashSet<String> = HashSet::new();
    let mut swept = conntrack::Swept::default();
    // Translated TCP/UDP packets whose checksums were right before (and so must be after).
    let mut right_before = 0u64;
    let started = Instant::now();
    for i in 0..frames {
        if i > 0 && i % SWEEP_EVERY == 0 {
            let t = conntrack::Timeouts {
                closed: std::time::Duration::ZERO,
                tcp_idle: SWEEP_IDLE,
                udp_idle: SWEEP_IDLE,
            };
            let s = conntrack::sweep(h.pin.path(), &t).expect("sweep");
            swept.flows += s.flows;
            swept.snat += s.snat;
            swept.orphans += s.orphans;
        }
        let kind = gen.frame(&m, &mut input);
        *kinds.entry(kind).or_default() += 1;
        let v = view(&input);
        if let View::L4 {
            t,
            first_fragment: true,
            ..
        } = v
        {
            // Every program parses it, and remembers its ports.
            m.remember_fragment(&t, be16(&input, 18));
        }
        for j in 0..5 {
            let prog = Program::ALL[(i as usize + j) % 5];
            let counts = per_prog.entry(prog.name()).or_default();
            counts.runs += 1;
            // Every other frame, the TC programs get a CHECKSUM_COMPLETE skb, whose sum the
            // kernel checks against the packet after the run.
            let complete = prog != Program::Xdp && i % 2 == 1;
            let ran = if complete {
                h.run_tc_complete(prog, &input, &mut out)
            } else {
                h.run_into(prog, &input, &mut out).map_err(io_error)
            };
            let result = match ran {
                Ok(verdict) => judge(
                    &mut m,
                    &mut || drops.one_more(),
                    prog,
                    &input,
                    &v,
                    verdict,
                    &out,
                )
                .map_err(|e| format!("{e} (verdict {verdict})")),
                Err(e)
                    if kernel_refuses(prog, &input) && e.raw_os_error() == Some(libc::EINVAL) =>
                {
                    Ok(Outcome::Refused)
                }
                Err(e) if complete && e.raw_os_error() == Some(libc::EBADMSG) => {
                    match stale_sum(&m, prog, &v, &input) {
                        Some(Stale::Reject) => Ok(Outcome::RejectedStaleSum),
                        Some(Stale::UdpWithoutChecksum) => {
                            // Nothing is copied out on EBADMSG: the frame again, as a plain
                            // skb, for its bytes (and the flow it may have opened).
                            match h.run_into(prog, &input, &mut out) {
                                Ok(verdict) => judge(
                                    &mut m,
                                    &mut || drops.one_more(),
                                    prog,
                                    &input,
                                    &v,
                                    verdict,
                                    &out,
                                )
                                .map(|o| match o {
                                    Outcome::Rewritten => Outcome::RewrittenStaleSum,
                                    o => o,
                                })
                                .map_err(|e| format!("{e} (verdict {verdict}, run again)")),
                                Err(e) => Err(format!("BPF_PROG_TEST_RUN failed: {e}")),
                            }
                        }
                        None => Err("the skb's CHECKSUM_COMPLETE sum no longer matches the \
                                     packet (EBADMSG)"
                            .into()),
                    }
                }
                Err(e) => Err(format!("BPF_PROG_TEST_RUN failed: {e}")),
            };
            match result {
                Ok(o) => {
                    *counts.by_outcome.entry(outcome_name(o)).or_default() += 1;
                    if matches!(o, Outcome::Rewritten | Outcome::RewrittenStaleSum) {
                        if matches!(v, View::L4 { .. }) && verify_checksums(&input).is_ok() {
                            right_before += 1;
                        }
                        let what = match v {
                            View::L4 {
                                first_fragment: true,
                                ..
                            } => "first fragment",
                            View::L4 { .. } => "TCP/UDP",
                            View::Later { .. } => "later fragment",
                            View::IcmpError { .. } => "ICMP error",
                            View::Other => "other",
                        };
                        *rewritten_by_view.entry(what).or_default() += 1;
                    }
                }
                Err(reason) => {
                    *counts.by_outcome.entry("FAILED").or_default() += 1;
                    // One report per distinct reason (ports and addresses vary).
                    let class: String = reason.chars().filter(|c| !c.is_ascii_digit()).collect();
                    if reasons.insert(format!("{}: {class}", prog.name())) && failures.len() < 20 {
                        failures.push(format!(
                            "frame {i} ({kind}), {}: {reason}\ninput ({} bytes):\n{}\noutput ({} bytes):\n{}",
                            prog.name(),
                            input.len(),
                            hex(&input),
                            out.len(),
                            hex(&out)
                        ));
                    }
                }
            }
        }
    }
    let elapsed = started.elapsed();

    let runs: u64 = per_prog.values().map(|c| c.runs).sum();
    println!(
        "fuzz: {frames} frames, {runs} program runs in {:.1} s ({:.1} µs per run, generation and oracle included)",
        elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1e6 / runs.max(1) as f64
    );
    for (name, c) in &per_prog {
        let outcomes: Vec<String> = c
            .by_outcome
            .iter()
            .map(|(o, n)| format!("{o} {n}"))
            .collect();
        println!("  {name:<13} {} runs: {}", c.runs, outcomes.join(", "));
    }
    println!(
        "  rewritten, by what the frame was: {rewritten_by_view:?}; {right_before} TCP/UDP with \
         checksums right before (verified from scratch after)"
    );
    println!("  swept by the agent's conntrack sweep: {swept:?}");
    println!("  frames generated, by kind: {kinds:?}");
    let stats: Vec<String> = read_stats(h.pin.path())
        .expect("LB_STATS")
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .map(|(name, n)| format!("{name} {n}"))
        .collect();
    println!("  datapath counters: {}", stats.join(", "));
    let ct = conntrack_keys(&h, map_names::LB4_CONNTRACK);
    let snat = conntrack_keys(&h, map_names::LB4_SNAT);
    println!(
        "  model: {} keys known ({} conntrack and {} SNAT entries in the maps now), {} fragmented datagrams",
        m.known.len(),
        ct.len(),
        snat.len(),
        m.frags.len()
    );
    for f in &failures {
        println!("\nFAILURE (seed {seed:#x}) {f}");
    }
    assert!(
        failures.is_empty(),
        "{} kinds of failure, first: {}",
        failures.len(),
        failures[0]
    );
    // The model knows every key the datapath holds: it never judged a translation by less
    // than the datapath knew.
    for t in ct.iter().chain(&snat) {
        assert!(m.known.contains(t), "the model misses {t}");
    }
    // The fuzzing reached the translations, not only the parser's refusals.
    if frames >= 100_000 {
        for what in ["TCP/UDP", "first fragment", "later fragment", "ICMP error"] {
            assert!(
                rewritten_by_view.get(what).copied().unwrap_or(0) > 0,
                "nothing rewritten: {what}"
            );
        }
        for prog in [Program::TcPod, Program::TcExt, Program::TcReject] {
            assert!(
                per_prog[prog.name()].by_outcome.contains_key("rejected"),
                "{} never rejected",
                prog.name()
            );
        }
        for prog in [
            Program::Xdp,
            Program::TcPod,
            Program::TcExt,
            Program::TcEgress,
        ] {
            assert!(
                per_prog[prog.name()].by_outcome.contains_key("rewritten"),
                "{} never rewrote",
                prog.name()
            );
        }
    }
}

fn outcome_name(o: Outcome) -> &'static str {
    match o {
        Outcome::Untouched => "untouched",
        Outcome::Rewritten => "rewritten",
        Outcome::Rejected => "rejected",
        Outcome::Dropped => "dropped",
        Outcome::Refused => "refused by the kernel",
        Outcome::RewrittenStaleSum => "rewritten, CHECKSUM_COMPLETE sum left wrong (bug)",
        Outcome::RejectedStaleSum => "rejected, CHECKSUM_COMPLETE sum left wrong",
    }
}

/// The oracle itself, on frames whose fate is known (no BPF here): translations done right
/// pass, and each way of doing one wrong is caught.
#[test]
fn the_oracle_catches_wrong_rewrites() {
    let mut m = Model {
        frontends: HashMap::from([((TCP, VIP, 80), 1), ((TCP, EMPTY_VIP, 80), 0)]),
        frontend_list: vec![(TCP, VIP, 80), (TCP, EMPTY_VIP, 80)],
        backends: HashSet::from([(TCP, LOCAL, 8080)]),
        known: HashSet::new(),
        known_list: Vec::new(),
        known_addrs: HashSet::new(),
        frags: HashMap::new(),
        frag_list: Vec::new(),
    };
    let never = &mut || false;
    // `t` with `payload` bytes, the same bytes whatever the tuple.
    let frame = |t: &Tuple, o: L4Opts| {
        let mut f = Vec::new();
        build_l4(&mut f, &mut Rng::new(7), t, o);
        f
    };
    let opts = L4Opts {
        payload: 11,
        ..L4Opts::plain(SYN)
    };
    let judge_xdp = |m: &mut Model, input: &[u8], out: &[u8], drop: &mut dyn FnMut() -> bool| {
        let verdict = if out == input || out.len() == input.len() {
            Program::Xdp.pass()
        } else {
            XDP_DROP
        };
        judge(m, drop, Program::Xdp, input, &view(input), verdict, out)
    };

    // A new flow to the frontend, translated right: to its backend, checksums right.
    let syn = Tuple::new(TCP, (CLIENT, 40000), (VIP, 80));
    let dnat = Tuple::new(TCP, (CLIENT, 40000), (LOCAL, 8080));
    let (input, good) = (frame(&syn, opts), frame(&dnat, opts));
    assert_eq!(
        judge_xdp(&mut m, &input, &input, never),
        Ok(Outcome::Untouched)
    );
    assert_eq!(
        judge_xdp(&mut m, &input, &good, never),
        Ok(Outcome::Rewritten)
    );
    assert!(
        m.known.contains(&syn) && m.known.contains(&dnat.reverse()),
        "both keys learnt"
    );
    let wrong = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut o = good.clone();
        f(&mut o);
        o
    };
    for (what, out) in [
        ("a payload byte", wrong(&|o| o[60] ^= 1)),
        ("the TTL", wrong(&|o| o[22] -= 1)),
        ("the L4 checksum", wrong(&|o| o[50] ^= 0x10)),
        ("the IPv4 checksum", wrong(&|o| o[25] ^= 1)),
        (
            "to no backend",
            frame(&Tuple::new(TCP, (CLIENT, 40000), (REMOTE, 8080)), opts),
        ),
        (
            "from another port",
            frame(&Tuple::new(TCP, (CLIENT, 40009), (LOCAL, 8080)), opts),
        ),
    ] {
        caught(judge_xdp(&mut m.services_only(), &input, &out, never), what);
    }
    // Checksums stale after the addresses changed: the IPv4 header's sum is off.
    let mut stale = input.clone();
    stale[30..34].copy_from_slice(&LOCAL);
    caught(judge_xdp(&mut m, &input, &stale, never), "stale checksums");

    // The reply of the flow, reverse NATed.
    let reply = frame(&dnat.reverse(), L4Opts::plain(SYN | ACK));
    let back = frame(&syn.reverse(), L4Opts::plain(SYN | ACK));
    assert_eq!(
        judge_xdp(&mut m, &reply, &back, never),
        Ok(Outcome::Rewritten)
    );
    // A packet of no flow and to no frontend, or not parsed as ours, must stay as it is.
    let stranger = frame(&Tuple::new(TCP, (CLIENT, 1), (ROUTER, 80)), opts);
    let mut moved = stranger.clone();
    moved[30..34].copy_from_slice(&LOCAL);
    repair(&mut moved);
    caught(
        judge_xdp(&mut m, &stranger, &moved, never),
        "no flow, no frontend",
    );
    let mut options = input.clone();
    options[14] = 0x46;
    let mut options_out = good.clone();
    options_out[14] = 0x46;
    caught(
        judge_xdp(&mut m, &options, &options_out, never),
        "IP options",
    );
    // A later fragment of a datagram never seen.
    let mut later = Vec::new();
    build_later_fragment(&mut later, &mut Rng::new(1), &syn, 0x4242, 1, 24);
    let mut later_out = later.clone();
    later_out[30..34].copy_from_slice(&LOCAL);
    repair(&mut later_out);
    caught(
        judge_xdp(&mut m, &later, &later_out, never),
        "unknown datagram",
    );
    // Seen: translated, but only its addresses.
    m.remember_fragment(&syn, 0x4242);
    assert_eq!(
        judge_xdp(&mut m, &later, &later_out, never),
        Ok(Outcome::Rewritten)
    );
    let mut later_elsewhere = later.clone();
    later_elsewhere[30..34].copy_from_slice(&REMOTE);
    repair(&mut later_elsewhere);
    caught(
        judge_xdp(&mut m, &later, &later_elsewhere, never),
        "fragment to another flow's address",
    );
    let mut later_bad = later_out.clone();
    later_bad[40] ^= 1;
    caught(
        judge_xdp(&mut m, &later, &later_bad, never),
        "fragment payload",
    );

    // An ICMP error from the backend about a packet of the flow it got: the client hears it
    // from the frontend, about the packet it sent.
    let error = |src: [u8; 4], q: &Tuple| {
        let mut f = Vec::new();
        build_icmp(&mut f, src, q.saddr, (3, 3, 0), &frame(q, opts), 48);
        f
    };
    let about = error(LOCAL, &dnat);
    let translated = error(VIP, &syn);
    assert_eq!(
        judge_xdp(&mut m, &about, &translated, never),
        Ok(Outcome::Rewritten)
    );
    // The ICMP checksum right, over a quote whose checksums are not.
    let icmp_fixed = |at: usize| {
        let mut f = translated.clone();
        f[at] ^= 1;
        f[36..38].fill(0);
        let c = checksum(0, &f[34..]);
        f[36..38].copy_from_slice(&c.to_be_bytes());
        f
    };
    let mut icmp_sum = translated.clone();
    icmp_sum[37] ^= 1;
    // And an error from the backend that now seems to come from a router.
    for out in [
        icmp_fixed(52),
        icmp_fixed(78),
        icmp_sum,
        error(ROUTER, &syn),
    ] {
        caught(judge_xdp(&mut m, &about, &out, never), "ICMP error");
    }
    // An error quoting no flow stays as it is.
    let unrelated = error(LOCAL, &Tuple::new(TCP, (CLIENT2, 5), (LOCAL, 8080)));
    let mut changed = unrelated.clone();
    changed[26..30].copy_from_slice(&VIP);
    repair(&mut changed);
    caught(
        judge_xdp(&mut m, &unrelated, &changed, never),
        "ICMP error of no flow",
    );

    // Drops: only a frontend's packet, and only when counted as a want of SNAT ports.
    let to_vip = frame(&Tuple::new(TCP, (CLIENT, 40001), (VIP, 80)), opts);
    let dropped = |m: &mut Model, prog: Program, verdict: u32, counted: bool| {
        judge(
            m,
            &mut || counted,
            prog,
            &to_vip,
            &view(&to_vip),
            verdict,
            &to_vip,
        )
    };
    assert_eq!(
        dropped(&mut m, Program::Xdp, XDP_DROP, true),
        Ok(Outcome::Dropped)
    );
    caught(
        dropped(&mut m, Program::Xdp, XDP_DROP, false),
        "drop not counted",
    );
    caught(
        dropped(&mut m, Program::TcPod, TC_ACT_SHOT, true),
        "pod drop",
    );
    // Rejects: only to the frontend without backends, and only a RST / port unreachable.
    caught(
        dropped(&mut m, Program::TcExt, TC_ACT_REDIRECT, false),
        "reject of a frontend with backends",
    );
    let to_empty = frame(&Tuple::new(TCP, (CLIENT, 40002), (EMPTY_VIP, 80)), opts);
    let mut rst = frame(
        &Tuple::new(TCP, (EMPTY_VIP, 80), (CLIENT, 40002)),
        L4Opts::plain(RST | ACK),
    );
    rst[0..6].copy_from_slice(&CLIENT_MAC);
    rst[6..12].copy_from_slice(&NODE_MAC);
    let v = view(&to_empty);
    assert_eq!(
        judge(
            &mut m,
            never,
            Program::TcReject,
            &to_empty,
            &v,
            TC_ACT_REDIRECT,
            &rst
        ),
        Ok(Outcome::Rejected)
    );
    caught(
        judge(
            &mut m,
            never,
            Program::TcEgress,
            &to_empty,
            &v,
            TC_ACT_REDIRECT,
            &rst,
        ),
        "egress reject",
    );
    caught(
        judge(
            &mut m,
            never,
            Program::TcReject,
            &to_empty,
            &v,
            TC_ACT_REDIRECT,
            &to_empty,
        ),
        "reject that is no RST",
    );
    // lb_tc_egress translates only what keeps its destination.
    caught(
        judge(
            &mut m,
            never,
            Program::TcEgress,
            &input,
            &view(&input),
            Program::TcEgress.pass(),
            &good,
        ),
        "egress DNAT",
    );
    // A wrong CHECKSUM_COMPLETE sum is excused only where it is known: a UDP datagram
    // without checksum translated, a reject.
    let udp0 = |t: &Tuple| {
        frame(
            t,
            L4Opts {
                udp_zero: true,
                ..opts
            },
        )
    };
    let stale = |m: &Model, prog: Program, f: &[u8]| stale_sum(m, prog, &view(f), f);
    let dns = udp0(&Tuple::new(UDP, (CLIENT, 1), (VIP, 53)));
    let mut fronts = m.services_only();
    fronts.frontends.insert((UDP, VIP, 53), 1);
    assert_eq!(
        stale(&fronts, Program::TcExt, &dns),
        Some(Stale::UdpWithoutChecksum)
    );
    assert_eq!(stale(&m, Program::TcExt, &dns), None, "not a frontend here");
    assert_eq!(stale(&m, Program::TcPod, &to_empty), Some(Stale::Reject));
    assert_eq!(stale(&m, Program::TcEgress, &to_empty), None);
    assert_eq!(stale(&m, Program::TcExt, &input), None, "TCP keeps the sum");
    // lb_tc_reject translates nothing.
    caught(
        judge(
            &mut m,
            never,
            Program::TcReject,
            &input,
            &view(&input),
            Program::TcReject.pass(),
            &good,
        ),
        "lb_tc_reject translating",
    );
}

/// The oracle found a wrong result, for the reason it prints.
fn caught(r: Result<Outcome, String>, what: &str) {
    match r {
        Err(reason) => println!("caught {what}: {reason}"),
        Ok(o) => panic!("{what} not caught: judged {o:?}"),
    }
}

/// Found by the fuzzer (failing until the datapath is fixed). A UDP datagram without a
/// checksum (checksum field 0, "none", RFC 768) whose ports a TC program translates leaves
/// the skb's CHECKSUM_COMPLETE sum wrong. `skb_rewrite` (lb-ebpf/src/csum.rs) stores the new
/// ports with `bpf_skb_store_bytes(.., 0)` and counts on `bpf_l4_csum_replace` to balance
/// them in the checksum field; with BPF_F_MARK_MANGLED_0 and a zero field that helper leaves
/// everything as it is, so nothing balances the ports' change and `skb->csum` no longer sums
/// the packet (csum.rs says the helpers keep a CHECKSUM_COMPLETE sum right). The bytes are
/// right. A UDP checksum, TCP, a change of addresses only, later fragments and ICMP errors
/// keep the sum right. BPF_F_TEST_SKB_CHECKSUM_COMPLETE gives the skb a CHECKSUM_COMPLETE
/// sum, as a NIC that sums every packet does, and fails the run with EBADMSG if the program
/// left it wrong.
#[test]
fn udp_without_checksum_keeps_the_checksum_complete_sum() {
    lb_testkit::require_root();
    let mut h = Harness::new(NodeInfo {
        name: "node-a".into(),
        addresses: vec![NODE_IP.into()],
        zone: None,
    })
    .expect("datapath loads");
    // ClusterIP 10.96.0.10 UDP 53 → 10.244.0.11:5353, here.
    h.program(
        r"
apiVersion: v1
kind: Service
metadata: {name: dns}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {name: dns, port: 53, protocol: UDP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: dns-1, labels: {kubernetes.io/service-name: dns}}
addressType: IPv4
ports:
- {name: dns, port: 5353, protocol: UDP}
endpoints:
- {addresses: [10.244.0.11], nodeName: node-a}
",
    )
    .expect("program");
    // UDP 10.244.0.12:33334 → 10.96.0.10:53, no payload, checksum 0.
    const QUERY: [u8; 42] = [
        0x02, 0x00, 0x00, 0x00, 0x00, 0x02, 0x02, 0x00, 0x00, 0x00, 0x00, 0x01, 0x08, 0x00, 0x45,
        0x00, 0x00, 0x1c, 0x12, 0x34, 0x40, 0x00, 0x40, 0x11, 0x13, 0x34, 0x0a, 0xf4, 0x00, 0x0c,
        0x0a, 0x60, 0x00, 0x0a, 0x82, 0x36, 0x00, 0x35, 0x00, 0x08, 0x00, 0x00,
    ];
    // What lb_tc_pod makes of it: UDP 10.244.0.12:33334 → 10.244.0.11:5353, checksum 0.
    const DNAT: [u8; 42] = [
        0x02, 0x00, 0x00, 0x00, 0x00, 0x02, 0x02, 0x00, 0x00, 0x00, 0x00, 0x01, 0x08, 0x00, 0x45,
        0x00, 0x00, 0x1c, 0x12, 0x34, 0x40, 0x00, 0x40, 0x11, 0x12, 0x9f, 0x0a, 0xf4, 0x00, 0x0c,
        0x0a, 0xf4, 0x00, 0x0b, 0x82, 0x36, 0x14, 0xe9, 0x00, 0x08, 0x00, 0x00,
    ];
    let mut out = Vec::new();
    // The same query with a checksum keeps the sum right.
    let mut with = Vec::new();
    let t = Tuple::new(UDP, (POD_CLIENT, 33333), (VIP, 53));
    build_l4(&mut with, &mut Rng::new(1), &t, L4Opts::plain(0));
    assert_eq!(
        h.run_tc_complete(Program::TcPod, &with, &mut out)
            .map_err(|e| e.to_string()),
        Ok(lb_testkit::TC_NEXT)
    );
    // Without the flag the query is translated, every byte right.
    assert_eq!(
        h.run_into(Program::TcPod, &QUERY, &mut out)
            .map_err(|e| e.to_string()),
        Ok(lb_testkit::TC_NEXT)
    );
    assert_eq!(out, DNAT);
    // With it, the run fails: the skb's sum is off by the ports' change (53 → 5353).
    assert_eq!(
        h.run_tc_complete(Program::TcPod, &QUERY, &mut out)
            .map_err(|e| e.to_string()),
        Ok(lb_testkit::TC_NEXT),
        "lb_tc_pod left the CHECKSUM_COMPLETE sum of a UDP datagram without checksum wrong"
    );
}

// ---- IPv6 ----

const NODE6: [u8; 16] = [0xfd, 0, 1, 0x98, 0, 0x18, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const CLIENT6: [u8; 16] = [0xfd, 0, 1, 0x98, 0, 0x18, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const ROUTER6: [u8; 16] = [0xfd, 0, 1, 0x98, 0, 0x18, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xfe];
const VIP6: [u8; 16] = [0xfd, 0, 0, 0x96, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10];
const EMPTY6: [u8; 16] = [0xfd, 0, 0, 0x96, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x20];
const LOCAL6: [u8; 16] = [0xfd, 0, 2, 0x44, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x11];
const REMOTE6: [u8; 16] = [0xfd, 0, 2, 0x44, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x11];
const HAIRPIN6: [u8; 16] = [0xfd, 0x6c, 0x62, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
/// Addresses of the datapath's IPv6 Services, backends and node: a frame without any of them
/// (outside or quoted) is none of its business.
const OURS6: [[u8; 16]; 6] = [NODE6, VIP6, EMPTY6, LOCAL6, REMOTE6, HAIRPIN6];
const ADDRS6: [[u8; 16]; 9] = [
    NODE6,
    CLIENT6,
    ROUTER6,
    VIP6,
    EMPTY6,
    LOCAL6,
    REMOTE6,
    HAIRPIN6,
    [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9],
];
const ICMP6: u8 = 58;
/// Extension headers the generator puts before the upper layer: hop-by-hop, routing,
/// fragment, destination options, AH, and one the datapath does not know.
const EXTS6: [u8; 6] = [0, 43, 44, 60, 51, 253];

/// IPv6 frontends written into the `LB6_*` maps (the control plane does not write them
/// yet): VIP6 TCP 80 and UDP 53, NodePort TCP 30080 on NODE6, to a local and a remote
/// backend (8080 / 5353); EMPTY6 TCP 80 and UDP 53 without endpoints.
fn program6(h: &Harness) {
    use aya::maps::Array;
    use lb_common::{
        BackendSlotKey, BackendV6, Ipv6Words, MemberKey, ServiceKeyV6, BACKEND_F_LOCAL,
        IPPROTO_TCP, IPPROTO_UDP, SVC_F_CLUSTER_IP, SVC_F_NODE_PORT,
    };
    let pinned = |name: &str| {
        MapData::from_pin(h.pin.path().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    let mut node: Array<MapData, Ipv6Words> =
        Array::try_from(Map::Array(pinned(map_names::LB6_NODE_ADDR))).expect("map");
    node.set(0, lb_common::ipv6_words(NODE6), 0).expect("node");
    let mut backends: AyaHashMap<MapData, u32, BackendV6> =
        AyaHashMap::try_from(Map::HashMap(pinned(map_names::LB6_BACKENDS))).expect("map");
    let mut slots: AyaHashMap<MapData, BackendSlotKey, u32> =
        AyaHashMap::try_from(Map::HashMap(pinned(map_names::LB_SLOTS))).expect("map");
    let mut members: AyaHashMap<MapData, MemberKey, u32> =
        AyaHashMap::try_from(Map::HashMap(pinned(map_names::LB_MEMBERS))).expect("map");
    let mut services: AyaHashMap<MapData, ServiceKeyV6, ServiceEntry> =
        AyaHashMap::try_from(Map::HashMap(pinned(map_names::LB6_SERVICES))).expect("map");
    let fes: [([u8; 16], u16, u8, u16, u32, bool); 5] = [
        (VIP6, 80, IPPROTO_TCP, 8080, SVC_F_CLUSTER_IP, true),
        (VIP6, 53, IPPROTO_UDP, 5353, SVC_F_CLUSTER_IP, true),
        (NODE6, 30080, IPPROTO_TCP, 8080, SVC_F_NODE_PORT, true),
        (EMPTY6, 80, IPPROTO_TCP, 8080, SVC_F_CLUSTER_IP, false),
        (EMPTY6, 53, IPPROTO_UDP, 5353, SVC_F_CLUSTER_IP, false),
    ];
    for (i, &(addr, port, proto, target, flags, with_backends)) in fes.iter().enumerate() {
        let svc_id = 60_000 + i as u32;
        let mut count = 0;
        if with_backends {
            for (slot, (b, local)) in [(LOCAL6, true), (REMOTE6, false)].iter().enumerate() {
                let id = 60_000 + (i * 2 + slot) as u32;
                let entry = BackendV6 {
                    addr: lb_common::ipv6_words(*b),
                    port: target.to_be(),
                    proto,
                    flags: if *local { BACKEND_F_LOCAL } else { 0 },
                };
                backends.insert(id, entry, 0).expect("backend");
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
                count += 1;
            }
        }
        let key = ServiceKeyV6 {
            addr: lb_common::ipv6_words(addr),
            port: port.to_be(),
            proto,
            scope: SCOPE_ALL,
        };
        let entry = ServiceEntry {
            svc_id,
            count,
            flags,
            affinity_timeout_s: 0,
            affinity_group: u64::from(svc_id),
            maglev: 0,
            _pad: 0,
        };
        services.insert(key, entry, 0).expect("service");
    }
}

/// An IPv6 packet (no Ethernet header): `exts` before `proto`, then `l4` whose checksum
/// (TCP, UDP, ICMPv6) is filled in unless `bad_sum`.
fn ipv6_packet(
    rng: &mut Rng,
    src: [u8; 16],
    dst: [u8; 16],
    exts: &[u8],
    proto: u8,
    mut l4: Vec<u8>,
    bad_sum: bool,
) -> Vec<u8> {
    let sum_at = match proto {
        TCP => Some(16),
        UDP => Some(6),
        ICMP6 => Some(2),
        _ => None,
    };
    if let Some(at) = sum_at.filter(|&at| l4.len() >= at + 2 && !bad_sum) {
        l4[at] = 0;
        l4[at + 1] = 0;
        let len = l4.len() as u64;
        let s = sum16(&src) + sum16(&dst) + (len >> 16) + (len & 0xffff) + u64::from(proto);
        let c = !fold(s + sum16(&l4));
        l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
    }
    let mut chain = Vec::new();
    for (i, &e) in exts.iter().enumerate() {
        let next = exts.get(i + 1).copied().unwrap_or(proto);
        match e {
            44 => {
                // A fragment header: mostly a first fragment with more to come, or a later one.
                let off: u16 = match rng.below(3) {
                    0 => 1,
                    1 => 64 << 3,
                    _ => (rng.next() as u16) & !6,
                };
                chain.push(next);
                chain.push(0);
                chain.extend_from_slice(&off.to_be_bytes());
                chain.extend_from_slice(&[0x42, 0x42, 0, rng.below(4) as u8]);
            }
            43 => {
                // Routing: type, segments left (zero mostly).
                chain.extend_from_slice(&[next, 0, 4, u8::from(rng.below(4) == 0), 0, 0, 0, 0]);
            }
            _ => {
                let n = rng.below(3);
                chain.push(next);
                chain.push(n as u8);
                chain.extend_from_slice(&[1, (4 + 8 * n) as u8, 0, 0, 0, 0]);
                chain.resize(chain.len() + 8 * n, 0);
            }
        }
    }
    let first = exts.first().copied().unwrap_or(proto);
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&((chain.len() + l4.len()) as u16).to_be_bytes());
    p.push(first);
    p.push(64);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(&chain);
    p.extend_from_slice(&l4);
    p
}

/// An upper-layer header and payload of `proto` between the ports (flags for TCP).
fn l4_of(rng: &mut Rng, proto: u8, sport: u16, dport: u16, payload: usize) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend_from_slice(&sport.to_be_bytes());
    l4.extend_from_slice(&dport.to_be_bytes());
    if proto == TCP {
        l4.extend_from_slice(&(rng.next() as u32).to_be_bytes());
        l4.extend_from_slice(&(rng.next() as u32).to_be_bytes());
        l4.extend_from_slice(&[
            5 << 4,
            FLAGS[rng.below(FLAGS.len())],
            0xff,
            0xff,
            0,
            0,
            0,
            0,
        ]);
    } else {
        l4.extend_from_slice(&((8 + payload) as u16).to_be_bytes());
        l4.extend_from_slice(&[0, 0]);
    }
    l4.extend((0..payload).map(|_| rng.next() as u8));
    l4
}

/// A random IPv6 frame: mostly well formed (flows to and from the frontends and backends,
/// extension headers, fragments, ICMPv6 errors quoting such packets, neighbour discovery),
/// then mutated at times.
fn gen6(rng: &mut Rng) -> Vec<u8> {
    let pick = |rng: &mut Rng| ADDRS6[rng.below(ADDRS6.len())];
    let ports = [80u16, 53, 8080, 5353, 30080, 40000, 61000, 65000, 0];
    let port = |rng: &mut Rng| {
        if rng.below(4) == 0 {
            rng.next() as u16
        } else {
            ports[rng.below(ports.len())]
        }
    };
    let mut exts = Vec::new();
    if rng.below(3) == 0 {
        for _ in 0..rng.below(6) {
            exts.push(EXTS6[rng.below(EXTS6.len())]);
        }
    }
    let (src, dst) = (pick(rng), pick(rng));
    let packet = match rng.below(6) {
        0..=2 => {
            let proto = if rng.below(2) == 0 { TCP } else { UDP };
            let (s, d, n) = (port(rng), port(rng), rng.below(1400));
            let l4 = l4_of(rng, proto, s, d, n);
            let bad = rng.below(8) == 0;
            ipv6_packet(rng, src, dst, &exts, proto, l4, bad)
        }
        3 => {
            // An ICMPv6 error (or a random type) quoting a packet the other way.
            let proto = if rng.below(2) == 0 { TCP } else { UDP };
            let (s, d, n) = (port(rng), port(rng), rng.below(64));
            let l4 = l4_of(rng, proto, s, d, n);
            let to = pick(rng);
            let inner = ipv6_packet(rng, dst, to, &[], proto, l4, false);
            let ty = [1u8, 2, 3, 4, 128, 129][rng.below(6)];
            let mut body = vec![ty, rng.below(5) as u8, 0, 0, 0, 0, 0x05, 0x00];
            let cut = rng.range(0..inner.len() + 1);
            body.extend_from_slice(&inner[..cut]);
            let bad = rng.below(8) == 0;
            ipv6_packet(rng, src, dst, &exts, ICMP6, body, bad)
        }
        4 => {
            // Neighbour discovery and router advertisements.
            let ty = [133u8, 134, 135, 136, 137][rng.below(5)];
            let mut body = vec![ty, 0, 0, 0, 0, 0, 0, 0];
            body.extend_from_slice(&dst);
            ipv6_packet(rng, src, dst, &[], ICMP6, body, false)
        }
        _ => {
            let proto = rng.next() as u8;
            let n = rng.below(200);
            let l4 = (0..n).map(|_| rng.next() as u8).collect();
            ipv6_packet(rng, src, dst, &exts, proto, l4, false)
        }
    };
    let mut f = Vec::with_capacity(packet.len() + 14);
    f.extend_from_slice(&NODE_MAC);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&[0x86, 0xdd]);
    f.extend_from_slice(&packet);
    match rng.below(8) {
        0 => {
            let at = rng.below(f.len() * 8);
            f[at / 8] ^= 1 << (at % 8);
        }
        1 => f.truncate(rng.range(0..f.len())),
        2 => f.extend((0..rng.below(64)).map(|_| rng.next() as u8)),
        3 => {
            let at = rng.range(14..f.len().min(14 + 80));
            f[at] = rng.next() as u8;
        }
        _ => {}
    }
    f
}

/// An IPv6 frame's upper layer: its protocol and where it lies in the frame.
type Upper6 = Option<(u8, Range<usize>)>;

/// What an IPv6 frame carries, if it is well formed: (addresses the frame names, outside
/// and quoted; the upper layer's protocol and range when unfragmented and of the length
/// the header says).
fn view6(f: &[u8]) -> (Vec<[u8; 16]>, Upper6) {
    let addr = |at: usize| -> Option<[u8; 16]> { f.get(at..at + 16)?.try_into().ok() };
    let mut names = Vec::new();
    if f.len() < 54 || f[12..14] != [0x86, 0xdd] {
        return (names, None);
    }
    names.extend(addr(22));
    names.extend(addr(38));
    let plen = usize::from(be16(f, 18));
    let (mut next, mut at, mut fragment) = (f[20], 54, false);
    for _ in 0..8 {
        if !matches!(next, 0 | 43 | 44 | 60 | 51) || at + 8 > f.len() {
            break;
        }
        fragment |= next == 44;
        let len = match next {
            44 => 8,
            51 => (usize::from(f[at + 1]) + 2) * 4,
            _ => (usize::from(f[at + 1]) + 1) * 8,
        };
        next = f[at];
        at += len;
    }
    // A quoted packet's addresses, for ICMPv6 (errors or not: naming them is enough).
    if next == ICMP6 && at + 8 + 40 <= f.len() {
        names.extend(addr(at + 8 + 8));
        names.extend(addr(at + 8 + 24));
    }
    let whole = plen + 54 == f.len() && at <= f.len();
    let l4 =
        (whole && !fragment && matches!(next, TCP | UDP | ICMP6)).then_some((next, at..f.len()));
    (names, l4)
}

/// Whether the upper layer's checksum is right (a UDP datagram without one counts as right).
fn l4_sum_right6(f: &[u8], proto: u8, r: &Range<usize>) -> bool {
    let seg = &f[r.clone()];
    let sum_at = match proto {
        TCP => 16,
        UDP => 6,
        _ => 2,
    };
    if seg.len() < sum_at + 2 {
        return true;
    }
    if proto == UDP && seg[6..8] == [0, 0] {
        return true;
    }
    let len = seg.len() as u64;
    let s = sum16(&f[22..38]) + sum16(&f[38..54]) + (len >> 16) + (len & 0xffff);
    sums_right(s + u64::from(proto) + sum16(seg))
}

#[test]
fn fuzz_ipv6_frames_through_every_program() {
    lb_testkit::require_root();
    let seed = env_u64("LB_FUZZ_SEED", DEFAULT_SEED);
    let frames = env_u64("LB_FUZZ6_FRAMES", 200_000);
    let h = Harness::new(NodeInfo {
        name: "node-a".into(),
        addresses: vec![std::net::Ipv4Addr::from(NODE_IP).into()],
        zone: None,
    })
    .expect("datapath loads");
    program6(&h);
    let mut rng = Rng::new(seed ^ 0x6666);
    let mut out = Vec::new();
    let mut outcomes: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    for n in 0..frames {
        let input = gen6(&mut rng);
        let (names, l4) = view6(&input);
        let ours = names.iter().any(|a| OURS6.contains(a));
        let sum_was_right = l4
            .as_ref()
            .is_some_and(|(p, r)| l4_sum_right6(&input, *p, r));
        for prog in Program::ALL {
            let verdict = match h.run_into(prog, &input, &mut out).map_err(io_error) {
                Ok(v) => v,
                Err(e)
                    if kernel_refuses(prog, &input) && e.raw_os_error() == Some(libc::EINVAL) =>
                {
                    *outcomes.entry((prog.name(), "refused")).or_default() += 1;
                    continue;
                }
                Err(e) => panic!(
                    "frame {n} (seed {seed:#x}), {}: {e}\n{}",
                    prog.name(),
                    hex(&input)
                ),
            };
            let fail = |why: &str| -> ! {
                panic!(
                    "frame {n} (seed {seed:#x}), {}: {why} (verdict {verdict:#x})\n in  {}\n out {}",
                    prog.name(),
                    hex(&input),
                    hex(&out)
                )
            };
            let answered = if prog == Program::Xdp {
                verdict == 3 // XDP_TX: packet too big
            } else {
                verdict == TC_ACT_REDIRECT
            };
            let passed = verdict == prog.pass();
            let what = if answered {
                "answered"
            } else if !passed {
                "dropped"
            } else if out == input {
                "untouched"
            } else {
                "rewritten"
            };
            *outcomes.entry((prog.name(), what)).or_default() += 1;
            if !ours && (out != input || !passed) {
                fail("a frame none of the datapath's business was not passed untouched");
            }
            if !(passed || answered || verdict == XDP_DROP || verdict == TC_ACT_SHOT) {
                fail("an unknown verdict");
            }
            if answered || (passed && out != input) {
                // Answers are fresh frames; rewrites keep a right checksum right.
                let (_, l4_out) = view6(&out);
                match l4_out {
                    Some((p, r)) if (answered || sum_was_right) && !l4_sum_right6(&out, p, &r) => {
                        fail("wrong L4 checksum after the program");
                    }
                    None if answered => fail("an answer that is no well-formed IPv6 frame"),
                    _ => {}
                }
            }
        }
    }
    eprintln!("IPv6 fuzz, {frames} frames (seed {seed:#x}):");
    for ((prog, what), count) in &outcomes {
        eprintln!("  {prog:<16} {what:<10} {count}");
    }
    for prog in [Program::Xdp, Program::TcPod] {
        assert!(
            outcomes
                .get(&(prog.name(), "rewritten"))
                .copied()
                .unwrap_or(0)
                > 0,
            "{}: no frame was translated: the generator misses the frontends",
            prog.name()
        );
    }
}
