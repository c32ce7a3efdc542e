//! The service datapath: ClusterIP / NodePort / externalIP / LoadBalancer-IP translation for
//! IPv4 TCP and UDP, on the external interfaces in XDP (`lb_xdp`, where the driver runs XDP
//! natively) or in TC (`lb_tc_ext`, elsewhere), and in TC on the pods' interfaces
//! (`lb_tc_pod`); the TC programs rewrite through the kernel's checksum helpers because local
//! senders leave partial checksums. All run `process`; cgroup socket hooks for the node's own
//! processes are in `sock.rs`.
//!
//! Per packet: parse Ethernet + IPv4 (no options, no fragments) + TCP/UDP, then
//! 1. conntrack hit in the reply direction → restore the frontend as source (reverse NAT);
//! 2. conntrack hit in the forward direction → rewrite to the flow's backend;
//! 3. a reply to a flow this node source-NATed (addressed to the node address and a port of
//!    the SNAT range) → restore the frontend as source and the client as destination;
//! 4. otherwise a frontend lookup → the client must be in the frontend's source ranges, if it
//!    has any → pick a backend (the client's sticky one, by the frontend's Maglev table for
//!    external frontends, else uniformly among the slots), record both directions, rewrite; a
//!    client from outside going to a backend on another node is also source-NATed to the node
//!    address and a free port, so that the reply comes back here; a frontend without a usable
//!    backend is dropped (Local policy) or answered with a reject (by the TC programs
//!    themselves; after `lb_xdp`, by `lb_tc_reject`, which gets the packet untouched);
//! 5. anything else passes untouched.
//!
//! Translated packets go to the stack (XDP_PASS / TC_NEXT), which routes them: to a local
//! pod's veth, or out to the node that runs the backend.
//!
//! `lb_tc_reject` (TC ingress, beside `lb_xdp`) answers what XDP passed on for a
//! frontend without backends: TCP with RST, UDP with ICMP port-unreachable, sent back out of
//! the interface it came in on. It runs in TC because an XDP_TX on a veth only reaches a peer
//! that runs XDP itself, which a pod does not (DESIGN.md, "veth caveats").
//!
//! Every packet access is bounds-checked against `data_end` right before it, and no path can
//! panic. Per-packet work is a fixed number of hash lookups, whatever the number of Services.
#![no_std]
#![no_main]

use core::mem;

mod sock;

use aya_ebpf::{
    bindings::{
        xdp_action, BPF_F_MARK_MANGLED_0, BPF_F_MMAPABLE, BPF_F_PSEUDO_HDR, BPF_NOEXIST,
        TC_ACT_SHOT, TC_ACT_UNSPEC,
    },
    helpers::{
        bpf_get_prandom_u32, bpf_jiffies64, bpf_ktime_get_coarse_ns, bpf_redirect,
        bpf_skb_change_head, bpf_skb_change_tail, bpf_skb_pull_data,
    },
    macros::{classifier, map, xdp},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
    programs::{TcContext, XdpContext},
};
use lb_common::{
    config, stat, AffinityKeyV4, AffinityV4, BackendSlotKey, BackendStats, BackendV4, Clock,
    CtEntryV4, CtKeyV4, FlowEvent, MemberKey, ServiceKeyV4, ServiceStats, ServiceV4, SockRevKeyV4,
    SockRevV4, SourceRangeV4, AFFINITY_ENTRIES, BACKEND_F_LOCAL, BACKEND_F_TERMINATING, CT_F_FIN,
    CT_F_FORWARD, CT_F_HAIRPIN, CT_F_REPLY, CT_F_REPORTED, CT_F_RST, CT_F_SNAT, CT_REFRESH_NS,
    DEFAULT_BACKENDS, DEFAULT_BACKEND_SLOTS, DEFAULT_CONNTRACK_ENTRIES, DEFAULT_MAGLEV_SIZE,
    DEFAULT_MAGLEV_TABLES, DEFAULT_SERVICES, DEFAULT_SNAT_ENTRIES, FLOW_CLOSED, FLOW_EVENTS_BYTES,
    FLOW_NEW, HAIRPIN_SNAT_V4, IFACE_F_POD, IPPROTO_TCP, IPPROTO_UDP, SCOPE_ALL, SCOPE_PODS,
    SNAT_TRIES, SOCK_REVERSE_ENTRIES, SOURCE_RANGE_ENTRIES, SVC_F_DROP_NO_ENDPOINTS,
    SVC_F_POD_SCOPE, SVC_F_SOURCE_RANGES,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

#[map]
static LB4_SERVICES: HashMap<ServiceKeyV4, ServiceV4> = HashMap::pinned(DEFAULT_SERVICES, 0);
#[map]
static LB_SLOTS: HashMap<BackendSlotKey, u32> = HashMap::pinned(DEFAULT_BACKEND_SLOTS, 0);
#[map]
static LB4_BACKENDS: HashMap<u32, BackendV4> = HashMap::pinned(DEFAULT_BACKENDS, 0);
#[map]
static LB4_CONNTRACK: LruHashMap<CtKeyV4, CtEntryV4> =
    LruHashMap::pinned(DEFAULT_CONNTRACK_ENTRIES, 0);
#[map]
static LB_MEMBERS: HashMap<MemberKey, u32> = HashMap::pinned(DEFAULT_BACKEND_SLOTS, 0);
#[map]
static LB4_AFFINITY: LruHashMap<AffinityKeyV4, AffinityV4> =
    LruHashMap::pinned(AFFINITY_ENTRIES, 0);
#[map]
static LB_IFACES: HashMap<u32, u32> = HashMap::pinned(4096, 0);
#[map]
static LB_BE_STATS: PerCpuArray<BackendStats> = PerCpuArray::pinned(DEFAULT_BACKENDS, 0);
#[map]
static LB_STATS: PerCpuArray<u64> = PerCpuArray::pinned(stat::COUNT, 0);
#[map]
static LB_FLOWS: RingBuf = RingBuf::pinned(FLOW_EVENTS_BYTES, 0);
#[map]
static LB_CONFIG: Array<u32> = Array::pinned(config::COUNT, 0);
/// Per-CPU count of new flows, for 1-in-N sampling.
#[map]
static LB_FLOW_SEQ: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);
#[map]
static LB_SVC_STATS: PerCpuArray<ServiceStats> = PerCpuArray::pinned(DEFAULT_SERVICES, 0);
/// Reply entries of source-NATed flows, keyed by (backend, node address, backend port, SNAT
/// port): the allocated port is the key, so an insert that finds it taken tries another.
#[map]
static LB4_SNAT: LruHashMap<CtKeyV4, CtEntryV4> = LruHashMap::pinned(DEFAULT_SNAT_ENTRIES, 0);
/// Maglev tables, `LB_CONFIG[MAGLEV_SIZE]` backend ids each, back to back (the agent sets the
/// size at load time).
#[map]
static LB_MAGLEV: Array<u32> =
    Array::pinned(DEFAULT_MAGLEV_SIZE * DEFAULT_MAGLEV_TABLES, BPF_F_MMAPABLE);
/// loadBalancerSourceRanges: (service id, client prefix) → 1.
#[map]
static LB4_SRC_RANGES: LpmTrie<SourceRangeV4, u8> = LpmTrie::pinned(SOURCE_RANGE_ENTRIES, 0);
/// The datapath's clock: jiffies scaled to CLOCK_MONOTONIC nanoseconds (`Clock`).
#[map]
static LB_CLOCK: Array<Clock> = Array::pinned(1, 0);
/// Host sockets the cgroup hooks sent to a backend instead of a frontend: (socket, backend)
/// → frontend, for `getpeername` and the source of received datagrams.
#[map]
static LB4_SOCK_REV: LruHashMap<SockRevKeyV4, SockRevV4> =
    LruHashMap::pinned(SOCK_REVERSE_ENTRIES, 0);

const ETH_LEN: usize = mem::size_of::<EthHdr>();
const IP_LEN: usize = mem::size_of::<Ipv4Hdr>();
const L4_OFF: usize = ETH_LEN + IP_LEN;
const TCP_LEN: usize = 20;
const UDP_LEN: usize = 8;
const ICMP_LEN: usize = 8;
const IPPROTO_ICMP: u8 = 1;
const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
/// Offsets in a frame with an IPv4 header without options.
const IP_CSUM_OFF: usize = ETH_LEN + 10;
const IP_SRC_OFF: usize = ETH_LEN + 12;
const IP_DST_OFF: usize = ETH_LEN + 16;
const TCP_CSUM_OFF: usize = L4_OFF + 16;
const UDP_CSUM_OFF: usize = L4_OFF + 6;

/// A TC program's "pass on": the next program on the hook runs (tcx's `TCX_NEXT`), then the
/// stack. `TC_ACT_OK` would end the chain there: when the agent swaps `lb_xdp` and
/// `lb_tc_reject` for `lb_tc_ext`, all three are attached for a moment, and `lb_tc_reject`
/// passing a packet that XDP no longer translated with `TC_ACT_OK` kept it from `lb_tc_ext`
/// (seen: connections refused by the node's stack during the swap). Other programs on the
/// same hook (a CNI's) also see what this one passes on.
const TC_NEXT: i32 = TC_ACT_UNSPEC;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// A TCP or UDP header's first four bytes.
#[repr(C)]
struct Ports {
    src: [u8; 2],
    dst: [u8; 2],
}

/// The addresses and ports of a packet (network byte order, as stored in the headers).
#[derive(Clone, Copy)]
struct Tuple {
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
}

#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    count(stat::RX);
    match process(&ctx) {
        // A reject goes on untouched to lb_tc_reject, in TC ingress on the same interface.
        Verdict::Pass | Verdict::Reject => xdp_action::XDP_PASS,
        Verdict::Drop => xdp_action::XDP_DROP,
    }
}

/// The datapath for packets from this node's pods, in TC ingress on their veths. It runs the
/// same translation as `lb_xdp`, but rewrites through the kernel's checksum helpers: a pod's
/// own stack sends TCP and UDP with partial checksums (`CHECKSUM_PARTIAL`: the field holds the
/// pseudo-header sum, the device finishes it), which only the skb's checksum state tells
/// apart and XDP cannot see. `bpf_l4_csum_replace` updates such a field correctly (the
/// addresses with `BPF_F_PSEUDO_HDR`; the ports not at all), and a full one as RFC 1624 does.
#[classifier]
pub fn lb_tc_pod(ctx: TcContext) -> i32 {
    tc_translate(&Skb::<true>(&ctx))
}

/// The datapath for external interfaces without native XDP (veths, bridges, bonds, tunnels),
/// in TC ingress: there XDP would run on an skb the kernel has built already (generic XDP,
/// or on a veth an XDP frame made from each skb), and it leaves the checksum state unknown.
/// The same translation as `lb_xdp`, rewriting through the checksum helpers as `lb_tc_pod`
/// does (a frame from a sender on this host may carry a partial checksum); it answers rejects
/// itself.
#[classifier]
pub fn lb_tc_ext(ctx: TcContext) -> i32 {
    tc_translate(&Skb::<false>(&ctx))
}

/// The TC programs' translation: rewrites through the checksum helpers, rejects answered in
/// place.
#[inline(always)]
fn tc_translate<const POD: bool>(skb: &Skb<POD>) -> i32 {
    count(stat::RX);
    // Linear headers for direct reads (a no-op when they are; fails harmlessly on a short
    // frame, which parse() then leaves alone).
    let _ = skb.0.pull_data((L4_OFF + TCP_LEN) as u32);
    match process(skb) {
        Verdict::Pass => TC_NEXT,
        Verdict::Drop => TC_ACT_SHOT,
        Verdict::Reject => reject(skb.0),
    }
}

/// What the translation decided; each program turns it into its own return code.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// To the stack (translated or untouched).
    Pass,
    Drop,
    /// A frontend without usable backends: answer with RST / ICMP port-unreachable.
    Reject,
}

/// Where the translation runs: XDP or TC on external interfaces, TC on pod interfaces.
trait Hook: Packet {
    /// The packet came in from one of this node's pods.
    fn from_pod(&self) -> bool;
    /// Rewrites addresses and ports from `from` to `to`, checksums included.
    fn rewrite(&self, hdr: &Headers, from: &Tuple, to: &Tuple);
}

impl Hook for XdpContext {
    /// An interface the agent marked as a pod's (`LB_IFACES`).
    #[inline(always)]
    fn from_pod(&self) -> bool {
        // SAFETY: ctx.ctx is the program's own context.
        let ifindex = unsafe { (*self.ctx).ingress_ifindex };
        // SAFETY: the value is read at once.
        unsafe { LB_IFACES.get(ifindex) }.is_some_and(|f| f & IFACE_F_POD != 0)
    }

    #[inline(always)]
    fn rewrite(&self, hdr: &Headers, from: &Tuple, to: &Tuple) {
        hdr.rewrite(from, to);
    }
}

/// An skb in TC ingress: of a pod interface (`lb_tc_pod`, `POD`) or of an external one
/// (`lb_tc_ext`); each program is attached to its kind of interface only.
struct Skb<'a, const POD: bool>(&'a TcContext);

impl<const POD: bool> Packet for Skb<'_, POD> {
    #[inline(always)]
    fn data(&self) -> usize {
        self.0.data()
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        self.0.data_end()
    }
    #[inline(always)]
    fn frame_len(&self) -> u64 {
        self.0.frame_len()
    }
}

impl<const POD: bool> Hook for Skb<'_, POD> {
    #[inline(always)]
    fn from_pod(&self) -> bool {
        POD
    }

    #[inline(always)]
    fn rewrite(&self, hdr: &Headers, from: &Tuple, to: &Tuple) {
        skb_rewrite(self.0, hdr, from, to);
    }
}

/// Rewrites an skb through the kernel's checksum helpers, which keep a partial checksum
/// partial and a complete one (`CHECKSUM_COMPLETE`) right.
#[inline(always)]
fn skb_rewrite(ctx: &TcContext, hdr: &Headers, from: &Tuple, to: &Tuple) {
    let csum = if hdr.udp { UDP_CSUM_OFF } else { TCP_CSUM_OFF };
    // A UDP checksum of zero means "none": the helpers leave it so.
    let mangled = if hdr.udp {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    let addrs = [
        (from.saddr, to.saddr, IP_SRC_OFF),
        (from.daddr, to.daddr, IP_DST_OFF),
    ];
    for (old, new, off) in addrs {
        if old != new {
            let _ = ctx.l3_csum_replace(IP_CSUM_OFF, old as u64, new as u64, 4);
            let flags = BPF_F_PSEUDO_HDR as u64 | mangled | 4;
            let _ = ctx.l4_csum_replace(csum, old as u64, new as u64, flags);
            let _ = ctx.store(off, &new, 0);
        }
    }
    let ports = [
        (from.sport, to.sport, L4_OFF),
        (from.dport, to.dport, L4_OFF + 2),
    ];
    for (old, new, off) in ports {
        if old != new {
            let _ = ctx.l4_csum_replace(csum, old as u64, new as u64, mangled | 2);
            let _ = ctx.store(off, &new, 0);
        }
    }
}

/// Does nothing: the calibration program of `cargo xtask bench` (the cost of running any XDP
/// program on a frame). Never attached.
#[xdp]
pub fn lb_xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// The bounds of a packet's linear data, and its whole length (an skb's payload may lie
/// beyond the linear part).
trait Packet {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    fn frame_len(&self) -> u64;
}

impl Packet for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }
    #[inline(always)]
    fn frame_len(&self) -> u64 {
        (XdpContext::data_end(self) - XdpContext::data(self)) as u64
    }
}

impl Packet for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }
    #[inline(always)]
    fn frame_len(&self) -> u64 {
        self.len() as u64
    }
}

/// A conntrack key, written as four words: field by field, the compiler zeroes the padding
/// with a call to `memset`.
#[inline(always)]
fn conntrack_key(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> CtKeyV4 {
    let words = [
        saddr,
        daddr,
        u32::from_ne_bytes(port_pair(sport, dport)),
        proto as u32,
    ];
    // SAFETY: CtKeyV4 is 16 bytes of integers, aligned to 4: saddr, daddr, then the ports
    // in memory order (port_pair), proto in the fourth word's first byte (this target is
    // little-endian) and zero padding after it.
    unsafe { mem::transmute::<[u32; 4], CtKeyV4>(words) }
}

/// Two ports as they lie in memory, the first at the lower address.
#[inline(always)]
fn port_pair(first: u16, second: u16) -> [u8; 4] {
    let (a, b) = (first.to_ne_bytes(), second.to_ne_bytes());
    [a[0], a[1], b[0], b[1]]
}

const _: () = assert!(mem::size_of::<CtKeyV4>() == 16 && cfg!(target_endian = "little"));

/// One 32-bit load from the packet. The verifier allows unaligned packet loads, and an IPv4
/// address after a 14-byte Ethernet header is not 4-aligned; a load the compiler knows to be
/// unaligned would be split into four byte loads, so this one reads through a `u32`
/// pointer. Callers bounds-check the four bytes first.
#[inline(always)]
unsafe fn load32(p: *const u8) -> u32 {
    // SAFETY: the caller checked the bounds; see above for the alignment.
    unsafe { (p as *const u32).read_volatile() }
}

#[inline(always)]
fn ptr_at<T>(ctx: &impl Packet, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

#[inline(always)]
fn count(idx: u32) {
    if let Some(c) = LB_STATS.get_ptr_mut(idx) {
        // SAFETY: a per-CPU slot, only this CPU writes it.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn count_service(svc_id: u32, bytes: u64, new_flow: bool, rejected: bool) {
    if let Some(s) = LB_SVC_STATS.get_ptr_mut(svc_id) {
        // SAFETY: a per-CPU slot, only this CPU writes it.
        let s = unsafe { &mut *s };
        s.packets += 1;
        s.bytes += bytes;
        s.new_flows += new_flow as u64;
        s.rejected += rejected as u64;
    }
}

#[inline(always)]
fn count_backend(backend_id: u32, bytes: u64) {
    if let Some(s) = LB_BE_STATS.get_ptr_mut(backend_id) {
        // SAFETY: a per-CPU slot, only this CPU writes it.
        let s = unsafe { &mut *s };
        s.packets += 1;
        s.bytes += bytes;
    }
}

#[inline(always)]
fn pass(idx: u32) -> Verdict {
    count(idx);
    Verdict::Pass
}

/// An IPv4 TCP or UDP packet the datapath may translate.
struct Parsed {
    hdr: Headers,
    pkt: Tuple,
    proto: u8,
    tcp_flags: u8,
}

/// Parses Ethernet + IPv4 (no options, not a fragment) + TCP/UDP headers. Anything else is
/// `Err(counter)`: the reason it is left alone.
#[inline(always)]
fn parse(ctx: &impl Packet) -> Result<Parsed, u32> {
    let eth = ptr_at::<EthHdr>(ctx, 0).ok_or(stat::PASS_TRUNCATED)?;
    // SAFETY: `eth` was bounds-checked by ptr_at.
    if unsafe { (*eth).ether_type } != ETH_P_IP_BE {
        return Err(stat::PASS_NOT_IPV4);
    }
    let ip = ptr_at::<Ipv4Hdr>(ctx, ETH_LEN).ok_or(stat::PASS_TRUNCATED)?;
    // SAFETY: `ip` was bounds-checked by ptr_at.
    let (vihl, frags, proto, tot_len) = unsafe {
        (
            (*ip).vihl,
            u16::from_be_bytes((*ip).frags),
            (*ip).proto,
            u16::from_be_bytes((*ip).tot_len) as usize,
        )
    };
    if vihl >> 4 != 4 {
        return Err(stat::PASS_NOT_IPV4);
    }
    if vihl & 0x0f != 5 {
        return Err(stat::PASS_IP_OPTIONS);
    }
    // More-fragments flag or a fragment offset: only the first fragment has ports, and
    // later ones would not follow it, so fragments are left to the stack.
    if frags & 0x3fff != 0 {
        return Err(stat::PASS_FRAGMENT);
    }
    let (l4_len, csum_off) = match proto {
        IPPROTO_TCP => (TCP_LEN, 16),
        IPPROTO_UDP => (UDP_LEN, 6),
        _ => return Err(stat::PASS_OTHER_PROTO),
    };
    if tot_len < IP_LEN + l4_len || (ETH_LEN + tot_len) as u64 > ctx.frame_len() {
        return Err(stat::PASS_TRUNCATED);
    }
    let ports = ptr_at::<Ports>(ctx, L4_OFF).ok_or(stat::PASS_TRUNCATED)?;
    let csum = ptr_at::<[u8; 2]>(ctx, L4_OFF + csum_off).ok_or(stat::PASS_TRUNCATED)?;
    let tcp_flags = if proto == IPPROTO_TCP {
        let f = ptr_at::<u8>(ctx, L4_OFF + 13).ok_or(stat::PASS_TRUNCATED)?;
        // SAFETY: bounds-checked by ptr_at.
        unsafe { *f }
    } else {
        0
    };
    // SAFETY: `ip` and `ports` were bounds-checked by ptr_at.
    let pkt = unsafe {
        let ports = load32(ports as *const u8).to_ne_bytes();
        Tuple {
            saddr: load32((ip as *const u8).add(12)),
            daddr: load32((ip as *const u8).add(16)),
            sport: u16::from_ne_bytes([ports[0], ports[1]]),
            dport: u16::from_ne_bytes([ports[2], ports[3]]),
        }
    };
    Ok(Parsed {
        hdr: Headers {
            ip,
            ports,
            csum,
            udp: proto == IPPROTO_UDP,
        },
        pkt,
        proto,
        tcp_flags,
    })
}

#[inline(always)]
fn process(ctx: &impl Hook) -> Verdict {
    let Parsed {
        hdr,
        pkt,
        proto,
        tcp_flags,
    } = match parse(ctx) {
        Ok(p) => p,
        Err(reason) => return pass(reason),
    };
    let bytes = ctx.frame_len();

    let ct_key = conntrack_key(pkt.saddr, pkt.daddr, pkt.sport, pkt.dport, proto);
    if let Some(entry) = LB4_CONNTRACK.get_ptr_mut(&ct_key) {
        // SAFETY: a map value pointer returned by the kernel, valid for this program run.
        let entry = unsafe { &mut *entry };
        let to = Tuple {
            saddr: entry.nat_saddr,
            daddr: entry.nat_daddr,
            sport: entry.nat_sport,
            dport: entry.nat_dport,
        };
        if entry.flags & CT_F_REPLY != 0 {
            note_close(entry, tcp_flags);
            refresh(entry);
            count_backend(entry.backend_id, bytes);
            ctx.rewrite(&hdr, &pkt, &to);
            return pass(stat::REVERSE_NAT);
        }
        if keep_flow(proto, tcp_flags, entry, &to) {
            // The client closes (FIN or RST) a reported flow: report that once.
            if entry.flags & CT_F_REPORTED != 0 && tcp_flags & (TCP_FIN | TCP_RST) != 0 {
                entry.flags &= !CT_F_REPORTED;
                report_flow(FLOW_CLOSED, proto, &pkt, &to, entry.svc_id, now_ns());
            }
            note_close(entry, tcp_flags);
            refresh(entry);
            count_service(entry.svc_id, bytes, false, false);
            count_backend(entry.backend_id, bytes);
            ctx.rewrite(&hdr, &pkt, &to);
            return pass(stat::DNAT_ESTABLISHED);
        }
    }

    let node_addr = cfg_value(config::NODE_ADDR);
    if pkt.daddr == node_addr {
        if let Some(verdict) = snat_reply(ctx, &hdr, &pkt, &ct_key, tcp_flags, bytes) {
            return verdict;
        }
    }

    let svc_key = ServiceKeyV4 {
        addr: pkt.daddr,
        port: pkt.dport,
        proto,
        scope: SCOPE_ALL,
    };
    // SAFETY: the value is copied out at once.
    let Some(mut svc) = (unsafe { LB4_SERVICES.get(&svc_key) }).copied() else {
        return pass(stat::PASS_NO_SERVICE);
    };
    let pod_client = ctx.from_pod();
    // Source ranges fence clients from outside; this node's pods are not subject to them
    // (as with kube-proxy and Cilium).
    if svc.flags & SVC_F_SOURCE_RANGES != 0 && !pod_client && !source_allowed(svc.svc_id, pkt.saddr)
    {
        count_service(svc.svc_id, bytes, false, true);
        count(stat::DROP_SOURCE_RANGE);
        return Verdict::Drop;
    }
    if svc.flags & SVC_F_POD_SCOPE != 0 && pod_client {
        let pod_key = ServiceKeyV4 {
            scope: SCOPE_PODS,
            ..svc_key
        };
        // SAFETY: the value is copied out at once.
        if let Some(pod_svc) = unsafe { LB4_SERVICES.get(&pod_key) } {
            svc = *pod_svc;
        }
    }
    if svc.count == 0 {
        if svc.flags & SVC_F_DROP_NO_ENDPOINTS != 0 {
            count_service(svc.svc_id, bytes, false, true);
            count(stat::DROP_NO_LOCAL);
            return Verdict::Drop;
        }
        // Answered by the TC side (which counts it for the service).
        count(stat::PASS_TO_REJECT);
        return Verdict::Reject;
    }

    let now = now_ns();
    let affinity_key = AffinityKeyV4 {
        group: svc.affinity_group,
        client: pkt.saddr,
        _pad: 0,
    };
    let sticky = if svc.affinity_timeout_s != 0 {
        sticky_backend(&svc, &affinity_key, now)
    } else {
        None
    };
    let chosen = match sticky {
        Some(b) => Some(b),
        None if svc.maglev != 0 => maglev_backend(&svc, &pkt, proto),
        None => random_backend(&svc),
    };
    let Some((backend_id, backend)) = chosen else {
        // The agent writes backends before the slots and slots before the count,
        // so this is only reached if the maps were changed by something else.
        count(stat::DROP_INCONSISTENT);
        return Verdict::Drop;
    };
    if svc.affinity_timeout_s != 0 {
        let a = AffinityV4 {
            last_used_ns: now,
            backend_id,
            _pad: 0,
        };
        let _ = LB4_AFFINITY.insert(&affinity_key, &a, 0);
    }

    let hairpin = backend.addr == pkt.saddr;
    // A client outside this node's pods going to a backend on another node: the reply must
    // come back here to be translated, so the source becomes this node.
    let snat = !hairpin && backend.flags & BACKEND_F_LOCAL == 0 && !pod_client;
    let flags = if hairpin {
        CT_F_HAIRPIN
    } else if snat {
        CT_F_SNAT
    } else {
        0
    };
    let mut to = Tuple {
        saddr: if hairpin { HAIRPIN_SNAT_V4 } else { pkt.saddr },
        daddr: backend.addr,
        sport: pkt.sport,
        dport: backend.port,
    };
    let reply = CtEntryV4 {
        last_seen_ns: now,
        nat_saddr: pkt.daddr,
        nat_daddr: pkt.saddr,
        nat_sport: pkt.dport,
        nat_dport: pkt.sport,
        backend_id,
        svc_id: svc.svc_id,
        flags: CT_F_REPLY | flags,
        _pad: 0,
    };
    if snat {
        let Some(port) = snat_port(node_addr, &backend, proto, &reply) else {
            count(stat::DROP_SNAT_PORTS);
            return Verdict::Drop;
        };
        to.saddr = node_addr;
        to.sport = port;
        count(stat::SNAT_NEW);
    }
    let reply_key = conntrack_key(to.daddr, to.saddr, to.dport, to.sport, proto);
    let reported = sample_flow() && report_flow(FLOW_NEW, proto, &pkt, &to, svc.svc_id, now);
    let forward = CtEntryV4 {
        last_seen_ns: now,
        nat_saddr: to.saddr,
        nat_daddr: to.daddr,
        nat_sport: to.sport,
        nat_dport: to.dport,
        backend_id,
        svc_id: svc.svc_id,
        flags: CT_F_FORWARD | flags | if reported { CT_F_REPORTED } else { 0 },
        _pad: 0,
    };
    // The reply entry goes in first, so that no reply can be seen before it exists (a SNAT
    // flow's is in LB4_SNAT already). A failed insert (map full of entries in use) still
    // forwards this packet; the LRU frees space.
    if !snat {
        let _ = LB4_CONNTRACK.insert(&reply_key, &reply, 0);
    }
    let _ = LB4_CONNTRACK.insert(&ct_key, &forward, 0);
    count_service(svc.svc_id, bytes, true, false);
    count_backend(backend_id, bytes);
    ctx.rewrite(&hdr, &pkt, &to);
    pass(stat::DNAT_NEW)
}

/// One `LB_CONFIG` value (0 when unset).
#[inline(always)]
fn cfg_value(index: u32) -> u32 {
    LB_CONFIG.get(index).copied().unwrap_or(0)
}

/// Records a FIN or RST in a conntrack entry's direction; the agent removes flows that have
/// closed (FIN both ways, or a RST) once they are quiet.
#[inline(always)]
fn note_close(entry: &mut CtEntryV4, tcp_flags: u8) {
    if tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        let f = if tcp_flags & TCP_RST != 0 {
            CT_F_RST
        } else {
            CT_F_FIN
        };
        if entry.flags & f == 0 {
            entry.flags |= f;
        }
    }
}

/// A reply to a source-NATed flow (addressed to this node and an allocated port): restores
/// the frontend as source and the client as destination. None: not such a reply.
#[inline(always)]
fn snat_reply(
    ctx: &impl Hook,
    hdr: &Headers,
    pkt: &Tuple,
    key: &CtKeyV4,
    tcp_flags: u8,
    bytes: u64,
) -> Option<Verdict> {
    let port = u16::from_be(pkt.dport) as u32;
    if port < cfg_value(config::SNAT_PORT_MIN) || port > cfg_value(config::SNAT_PORT_MAX) {
        return None;
    }
    let entry = LB4_SNAT.get_ptr_mut(key)?;
    // SAFETY: a map value pointer returned by the kernel, valid for this program run.
    let entry = unsafe { &mut *entry };
    note_close(entry, tcp_flags);
    refresh(entry);
    count_backend(entry.backend_id, bytes);
    let to = Tuple {
        saddr: entry.nat_saddr,
        daddr: entry.nat_daddr,
        sport: entry.nat_sport,
        dport: entry.nat_dport,
    };
    ctx.rewrite(hdr, pkt, &to);
    Some(pass(stat::SNAT_REPLY))
}

/// Reserves a source port on this node for a flow to `backend` by inserting its reply entry
/// into `LB4_SNAT` under that port: a port another flow to the same backend holds is never
/// taken. Tries `SNAT_TRIES` random ports of the range (random rather than consecutive, so
/// that taken ports do not cluster); the port is in network byte order.
#[inline(always)]
fn snat_port(node_addr: u32, backend: &BackendV4, proto: u8, reply: &CtEntryV4) -> Option<u16> {
    let min = cfg_value(config::SNAT_PORT_MIN);
    let max = cfg_value(config::SNAT_PORT_MAX);
    if min == 0 || max < min || max > 65535 || node_addr == 0 {
        return None;
    }
    let range = max - min + 1;
    let mut key = conntrack_key(backend.addr, node_addr, backend.port, 0, proto);
    let mut i = 0;
    while i < SNAT_TRIES {
        // SAFETY: bpf_get_prandom_u32 has no preconditions.
        let r = unsafe { bpf_get_prandom_u32() };
        let port = ((min + r.checked_rem(range).unwrap_or(0)) as u16).to_be();
        key.dport = port;
        if LB4_SNAT.insert(&key, reply, BPF_NOEXIST as u64).is_ok() {
            return Some(port);
        }
        i += 1;
    }
    None
}

/// Whether a client may use a frontend with loadBalancerSourceRanges.
#[inline(always)]
fn source_allowed(svc_id: u32, saddr: u32) -> bool {
    let key = Key::new(
        64,
        SourceRangeV4 {
            svc_id_be: svc_id.to_be(),
            addr: saddr,
        },
    );
    LB4_SRC_RANGES.get(&key).is_some()
}

/// The flow hash Maglev uses: the client address and port, the frontend port and the
/// protocol (not the frontend address, so that a NodePort flow hashes alike on every node),
/// through MurmurHash3's 64-bit finaliser.
#[inline(always)]
fn flow_hash(pkt: &Tuple, proto: u8) -> u32 {
    let mut h = ((pkt.saddr as u64) << 32) | ((pkt.sport as u64) << 16) | pkt.dport as u64;
    h ^= (proto as u64) << 59;
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h as u32
}

/// The backend the frontend's Maglev table gives this flow: the same on every node that
/// has the same table.
#[inline(always)]
fn maglev_backend(svc: &ServiceV4, pkt: &Tuple, proto: u8) -> Option<(u32, BackendV4)> {
    let size = cfg_value(config::MAGLEV_SIZE);
    if size == 0 {
        return random_backend(svc);
    }
    let idx = svc
        .maglev
        .wrapping_sub(1)
        .wrapping_mul(size)
        .wrapping_add(flow_hash(pkt, proto).checked_rem(size).unwrap_or(0));
    let id = LB_MAGLEV.get(idx).copied()?;
    // SAFETY: the value is copied out at once.
    unsafe { LB4_BACKENDS.get(id) }.map(|b| (id, *b))
}

/// 1-in-N sampling of new flows for `LB_FLOWS` (`LB_CONFIG[FLOW_SAMPLE]`, 0 = off).
#[inline(always)]
fn sample_flow() -> bool {
    let n = cfg_value(config::FLOW_SAMPLE);
    if n == 0 {
        return false;
    }
    let Some(seq) = LB_FLOW_SEQ.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: a per-CPU slot, only this CPU writes it.
    let seq = unsafe { &mut *seq };
    *seq = seq.wrapping_add(1);
    *seq % n == 0
}

/// Reports a decision to `LB_FLOWS`; false when the ring buffer is full.
#[inline(always)]
fn report_flow(kind: u8, proto: u8, pkt: &Tuple, to: &Tuple, svc_id: u32, now: u64) -> bool {
    let ev = FlowEvent {
        ts_ns: now,
        client_addr: pkt.saddr,
        frontend_addr: pkt.daddr,
        backend_addr: to.daddr,
        svc_id,
        client_port: pkt.sport,
        frontend_port: pkt.dport,
        backend_port: to.dport,
        proto,
        kind,
    };
    if LB_FLOWS.output::<FlowEvent>(&ev, 0).is_err() {
        count(stat::FLOW_EVENTS_LOST);
        return false;
    }
    true
}

/// A uniformly random backend among the service's slots.
#[inline(always)]
fn random_backend(svc: &ServiceV4) -> Option<(u32, BackendV4)> {
    // SAFETY: bpf_get_prandom_u32 has no preconditions.
    let slot = unsafe { bpf_get_prandom_u32() } % svc.count;
    let slot_key = BackendSlotKey {
        svc_id: svc.svc_id,
        slot,
    };
    // SAFETY: values are copied out at once.
    let id = unsafe { LB_SLOTS.get(&slot_key) }.copied()?;
    // SAFETY: as above.
    unsafe { LB4_BACKENDS.get(id) }.map(|b| (id, *b))
}

/// sessionAffinity ClientIP: the backend this client's last new flow to the Service port
/// used, if that was within the timeout and the backend is still in this frontend's set
/// (kube-proxy's `recent` match, per endpoint, refreshed by each new connection).
#[inline(always)]
fn sticky_backend(svc: &ServiceV4, key: &AffinityKeyV4, now: u64) -> Option<(u32, BackendV4)> {
    // SAFETY: the value is copied out at once.
    let a = unsafe { LB4_AFFINITY.get(key) }.copied()?;
    if now.wrapping_sub(a.last_used_ns) > svc.affinity_timeout_s as u64 * 1_000_000_000 {
        return None;
    }
    let member = MemberKey {
        svc_id: svc.svc_id,
        backend_id: a.backend_id,
    };
    LB_MEMBERS.get_ptr(&member)?;
    // SAFETY: the value is copied out at once.
    unsafe { LB4_BACKENDS.get(a.backend_id) }.map(|b| (a.backend_id, *b))
}

/// Whether a packet that hits a flow's forward entry stays on the flow's backend, with
/// kube-proxy's conntrack semantics:
/// * TCP stays, also when the endpoint was deleted (kube-proxy never flushes TCP entries), so
///   established connections to a terminating or removed endpoint carry on. A SYN without
///   ACK is a new connection when the flow has closed (a FIN or RST seen either way: the
///   client reuses the tuple of a finished connection, as clients that open many short
///   connections do within seconds), and is then chosen, counted and reported as a new flow,
///   as netfilter's conntrack does with a SYN on a closed entry; the closed flow's reply entry
///   is removed (its SNAT port freed). On an open flow it is a retransmission: it keeps a
///   live backend and is chosen again when its backend is gone or terminating.
/// * UDP stays while the backend is in the maps, which hold every serving endpoint;
///   otherwise it is chosen again (kube-proxy deletes UDP entries of endpoints that stopped
///   serving).
#[inline(always)]
fn keep_flow(proto: u8, tcp_flags: u8, entry: &CtEntryV4, to: &Tuple) -> bool {
    let new_syn = proto == IPPROTO_TCP && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if proto == IPPROTO_TCP && !new_syn {
        return true;
    }
    if new_syn && close_reply_if_closed(entry, to, proto) {
        return false;
    }
    // SAFETY: the value is read at once.
    match unsafe { LB4_BACKENDS.get(entry.backend_id) } {
        Some(b) => !new_syn || b.flags & BACKEND_F_TERMINATING == 0,
        None => false,
    }
}

/// Whether a flow has closed (a FIN or RST recorded in its forward entry or in its reply
/// entry); if so, its reply entry is removed, so that the new flow on the same tuple starts
/// clean (and an allocated SNAT port goes back to the range). Only SYNs that hit a forward
/// entry come here, so the reply lookup costs nothing on the established path.
#[inline(always)]
fn close_reply_if_closed(entry: &CtEntryV4, to: &Tuple, proto: u8) -> bool {
    let reply_key = conntrack_key(to.daddr, to.saddr, to.dport, to.sport, proto);
    if entry.flags & CT_F_SNAT != 0 {
        remove_if_closed(&LB4_SNAT, &reply_key, entry.flags)
    } else {
        remove_if_closed(&LB4_CONNTRACK, &reply_key, entry.flags)
    }
}

/// `close_reply_if_closed` for the map that holds the reply entry (each call site names its
/// map, as the verifier wants).
#[inline(always)]
fn remove_if_closed(
    map: &LruHashMap<CtKeyV4, CtEntryV4>,
    reply_key: &CtKeyV4,
    forward_flags: u16,
) -> bool {
    const CLOSED: u16 = CT_F_FIN | CT_F_RST;
    // SAFETY: the value is read at once.
    let reply_closed = unsafe { map.get(reply_key) }.is_some_and(|r| r.flags & CLOSED != 0);
    if forward_flags & CLOSED == 0 && !reply_closed {
        return false;
    }
    let _ = map.remove(reply_key);
    true
}

#[inline(always)]
fn refresh(entry: &mut CtEntryV4) {
    let now = now_ns();
    if now.wrapping_sub(entry.last_seen_ns) > CT_REFRESH_NS {
        entry.last_seen_ns = now;
    }
}

/// The time in ns (CLOCK_MONOTONIC at tick resolution): jiffies through the agent's
/// calibration (`LB_CLOCK`), or the coarse clock until there is one. `bpf_jiffies64` is a
/// load the verifier inlines; `bpf_ktime_get_coarse_ns` is a helper call, measured at about a
/// third of a conntrack hit.
#[inline(always)]
fn now_ns() -> u64 {
    match LB_CLOCK.get(0) {
        // SAFETY: bpf_jiffies64 has no preconditions.
        Some(c) if c.ns_per_tick != 0 => c.at(unsafe { bpf_jiffies64() }),
        // SAFETY: bpf_ktime_get_coarse_ns has no preconditions.
        _ => unsafe { bpf_ktime_get_coarse_ns() },
    }
}

/// Writes both clocks, jiffies then the coarse clock's ns (native order), at the start of the
/// frame: the agent calibrates `LB_CLOCK` from them (BPF_PROG_TEST_RUN; never attached).
#[xdp]
pub fn lb_clock(ctx: XdpContext) -> u32 {
    let Some(out) = ptr_at::<[u64; 2]>(&ctx, 0) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: bounds-checked by ptr_at; neither helper has preconditions.
    unsafe { *out = [bpf_jiffies64(), bpf_ktime_get_coarse_ns()] };
    xdp_action::XDP_PASS
}

/// Bounds-checked pointers into the current packet's headers.
struct Headers {
    ip: *mut Ipv4Hdr,
    ports: *mut Ports,
    csum: *mut [u8; 2],
    udp: bool,
}

impl Headers {
    /// Rewrites addresses and ports from `from` to `to`, updating the IPv4 and L4 checksums
    /// incrementally (RFC 1624).
    #[inline(always)]
    fn rewrite(&self, from: &Tuple, to: &Tuple) {
        let addr_diff = csum_diff32(from.saddr, to.saddr) + csum_diff32(from.daddr, to.daddr);
        let l4_diff =
            addr_diff + csum_diff16(from.sport, to.sport) + csum_diff16(from.dport, to.dport);
        // SAFETY: all three pointers were bounds-checked when `Headers` was built, and
        // nothing has resized the packet since.
        unsafe {
            let ip_csum = u16::from_ne_bytes((*self.ip).check);
            (*self.ip).check = csum_apply(ip_csum, addr_diff).to_ne_bytes();
            let l4_csum = u16::from_ne_bytes(*self.csum);
            // A UDP checksum of zero means "none": leave it so.
            if !(self.udp && l4_csum == 0) {
                let mut c = csum_apply(l4_csum, l4_diff);
                if self.udp && c == 0 {
                    c = 0xffff;
                }
                *self.csum = c.to_ne_bytes();
            }
            (*self.ip).src_addr = to.saddr.to_ne_bytes();
            (*self.ip).dst_addr = to.daddr.to_ne_bytes();
            (*self.ports).src = to.sport.to_ne_bytes();
            (*self.ports).dst = to.dport.to_ne_bytes();
        }
    }
}

/// One's complement of `old` plus `new`, as 16-bit words (RFC 1624 eqn. 3 terms).
#[inline(always)]
fn csum_diff32(old: u32, new: u32) -> u64 {
    (!(old as u16)) as u64
        + (!((old >> 16) as u16)) as u64
        + (new & 0xffff) as u64
        + (new >> 16) as u64
}

#[inline(always)]
fn csum_diff16(old: u16, new: u16) -> u64 {
    (!old) as u64 + new as u64
}

#[inline(always)]
fn csum_fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// HC' = ~(~HC + ~m + m')
#[inline(always)]
fn csum_apply(check: u16, diff: u64) -> u16 {
    !csum_fold((!check) as u64 + diff)
}

/// Sum of `N` 16-bit words starting at `p` (read in memory order).
///
/// # Safety
/// `p .. p + 2N` must have been bounds-checked against the packet end.
#[inline(always)]
unsafe fn sum_words<const N: usize>(p: *const u8) -> u64 {
    let mut sum = 0u64;
    let mut i = 0;
    while i < N {
        // SAFETY: within the range the caller checked.
        sum += unsafe { u16::from_ne_bytes([*p.add(2 * i), *p.add(2 * i + 1)]) } as u64;
        i += 1;
    }
    sum
}

#[inline(always)]
fn addr_words(a: u32) -> u64 {
    (a & 0xffff) as u64 + (a >> 16) as u64
}

#[classifier]
pub fn lb_tc_reject(ctx: TcContext) -> i32 {
    reject(&ctx)
}

/// Answers a packet to a frontend without backends; passes everything else.
#[inline(always)]
fn reject(ctx: &TcContext) -> i32 {
    // Make the headers linear for direct access (no-op when they are already).
    let len = if (ctx.len() as usize) < REPLY_MAX {
        ctx.len()
    } else {
        REPLY_MAX as u32
    };
    // SAFETY: ctx.skb.skb is the program's own context.
    unsafe { bpf_skb_pull_data(ctx.skb.skb as *mut _, len) };
    let Ok(Parsed {
        pkt,
        proto,
        tcp_flags,
        ..
    }) = parse(ctx)
    else {
        return TC_NEXT;
    };
    let svc_key = ServiceKeyV4 {
        addr: pkt.daddr,
        port: pkt.dport,
        proto,
        scope: SCOPE_ALL,
    };
    // SAFETY: the value is copied out at once.
    let Some(svc) = (unsafe { LB4_SERVICES.get(&svc_key) }).copied() else {
        return TC_NEXT;
    };
    if svc.count != 0 {
        // Backends appeared since XDP looked: let the stack have it; the retransmission
        // will be translated.
        return TC_NEXT;
    }
    count_service(svc.svc_id, ctx.len() as u64, false, true);
    if svc.flags & SVC_F_DROP_NO_ENDPOINTS != 0 {
        count(stat::DROP_NO_LOCAL);
        return TC_ACT_SHOT;
    }
    let built = if proto == IPPROTO_TCP {
        if tcp_flags & TCP_RST != 0 {
            return TC_ACT_SHOT; // never answer a RST
        }
        build_rst(ctx, tcp_flags)
    } else {
        build_port_unreachable(ctx)
    };
    if !built {
        return TC_ACT_SHOT;
    }
    count(if proto == IPPROTO_TCP {
        stat::REJECT_TCP
    } else {
        stat::REJECT_UDP
    });
    // Out of the interface it came in on.
    // SAFETY: bpf_redirect has no memory preconditions.
    unsafe { bpf_redirect((*ctx.skb.skb).ifindex, 0) as i32 }
}

/// The longest reply built here: Ethernet + IPv4 + ICMP + the original IPv4 + UDP headers.
const REPLY_MAX: usize = ETH_LEN + IP_LEN + ICMP_LEN + IP_LEN + UDP_LEN;

/// Sets the frame length to `len` and makes it linear.
#[inline(always)]
fn resize(ctx: &TcContext, len: usize) -> bool {
    let skb = ctx.skb.skb as *mut _;
    // SAFETY: skb is the program's own context.
    unsafe {
        bpf_skb_change_tail(skb, len as u32, 0) == 0 && bpf_skb_pull_data(skb, len as u32) == 0
    }
}

/// Turns a TCP segment into the RST a closed port sends (RFC 9293 3.10.7.1).
#[inline(always)]
fn build_rst(ctx: &TcContext, in_flags: u8) -> bool {
    let (Some(eth), Some(ip), Some(tcp)) = (
        ptr_at::<EthHdr>(ctx, 0),
        ptr_at::<Ipv4Hdr>(ctx, ETH_LEN),
        ptr_at::<[u8; TCP_LEN]>(ctx, L4_OFF),
    ) else {
        return false;
    };
    // SAFETY: all three were bounds-checked by ptr_at.
    let (mac_dst, mac_src, saddr, daddr, tot_len, hdr) = unsafe {
        (
            (*eth).dst_addr,
            (*eth).src_addr,
            (*ip).src_addr,
            (*ip).dst_addr,
            u16::from_be_bytes((*ip).tot_len) as u32,
            *tcp,
        )
    };
    let doff = ((hdr[12] >> 4) as u32) * 4;
    let payload = tot_len.saturating_sub(IP_LEN as u32 + doff);
    let in_seq = u32::from_be_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
    let (seq, ack, flags) = if in_flags & TCP_ACK != 0 {
        ([hdr[8], hdr[9], hdr[10], hdr[11]], [0u8; 4], TCP_RST)
    } else {
        let syn_fin = (in_flags & TCP_SYN != 0) as u32 + (in_flags & TCP_FIN != 0) as u32;
        (
            [0u8; 4],
            in_seq.wrapping_add(payload + syn_fin).to_be_bytes(),
            TCP_RST | TCP_ACK,
        )
    };

    if !resize(ctx, L4_OFF + TCP_LEN) {
        return false;
    }
    let (Some(eth), Some(ip), Some(tcp)) = (
        ptr_at::<EthHdr>(ctx, 0),
        ptr_at::<Ipv4Hdr>(ctx, ETH_LEN),
        ptr_at::<[u8; TCP_LEN]>(ctx, L4_OFF),
    ) else {
        return false;
    };
    // SAFETY: all three were bounds-checked by ptr_at after the resize.
    unsafe {
        (*eth).dst_addr = mac_src;
        (*eth).src_addr = mac_dst;
        write_ipv4(ip, daddr, saddr, IPPROTO_TCP, (IP_LEN + TCP_LEN) as u16);
        let t = &mut *tcp;
        *t = [
            hdr[2], hdr[3], hdr[0], hdr[1], seq[0], seq[1], seq[2], seq[3], ack[0], ack[1], ack[2],
            ack[3], 0x50, flags, 0, 0, 0, 0, 0, 0,
        ];
        let sum = addr_words(u32::from_ne_bytes(daddr))
            + addr_words(u32::from_ne_bytes(saddr))
            + u16::from_ne_bytes([0, IPPROTO_TCP]) as u64
            + u16::from_ne_bytes((TCP_LEN as u16).to_be_bytes()) as u64
            + sum_words::<{ TCP_LEN / 2 }>(tcp as *const u8);
        let c = (!csum_fold(sum)).to_ne_bytes();
        t[16] = c[0];
        t[17] = c[1];
    }
    true
}

/// Turns a UDP datagram into ICMP port-unreachable (RFC 792: the original IPv4 header and
/// the first 8 bytes of its payload follow the ICMP header).
#[inline(always)]
fn build_port_unreachable(ctx: &TcContext) -> bool {
    let (Some(eth), Some(ip)) = (ptr_at::<EthHdr>(ctx, 0), ptr_at::<Ipv4Hdr>(ctx, ETH_LEN)) else {
        return false;
    };
    // SAFETY: both were bounds-checked by ptr_at.
    let (mac_dst, mac_src, saddr, daddr) = unsafe {
        (
            (*eth).dst_addr,
            (*eth).src_addr,
            (*ip).src_addr,
            (*ip).dst_addr,
        )
    };
    // Room for the new IPv4 + ICMP headers in front: the original IPv4 and UDP headers then
    // sit exactly where the ICMP payload goes.
    const GROW: u32 = (IP_LEN + ICMP_LEN) as u32;
    // SAFETY: ctx.skb.skb is the program's own context.
    if unsafe { bpf_skb_change_head(ctx.skb.skb as *mut _, GROW, 0) } != 0 {
        return false;
    }
    if !resize(ctx, REPLY_MAX) {
        return false;
    }
    let (Some(eth), Some(ip), Some(icmp)) = (
        ptr_at::<EthHdr>(ctx, 0),
        ptr_at::<Ipv4Hdr>(ctx, ETH_LEN),
        ptr_at::<[u8; ICMP_LEN + IP_LEN + UDP_LEN]>(ctx, L4_OFF),
    ) else {
        return false;
    };
    // SAFETY: all three were bounds-checked by ptr_at after the resize.
    unsafe {
        (*eth).dst_addr = mac_src;
        (*eth).src_addr = mac_dst;
        (*eth).ether_type = ETH_P_IP_BE;
        write_ipv4(ip, daddr, saddr, IPPROTO_ICMP, (REPLY_MAX - ETH_LEN) as u16);
        let m = &mut *icmp;
        m[..ICMP_LEN].copy_from_slice(&[3, 3, 0, 0, 0, 0, 0, 0]);
        let sum = sum_words::<{ (ICMP_LEN + IP_LEN + UDP_LEN) / 2 }>(icmp as *const u8);
        let c = (!csum_fold(sum)).to_ne_bytes();
        m[2] = c[0];
        m[3] = c[1];
    }
    true
}

/// Writes a fresh IPv4 header (no options, DF, TTL 64) with its checksum.
///
/// # Safety
/// `ip` must point to a bounds-checked IPv4 header.
#[inline(always)]
unsafe fn write_ipv4(ip: *mut Ipv4Hdr, saddr: [u8; 4], daddr: [u8; 4], proto: u8, len: u16) {
    // SAFETY: guaranteed by the caller.
    unsafe {
        let h = &mut *ip;
        h.vihl = 0x45;
        h.tos = 0;
        h.tot_len = len.to_be_bytes();
        h.id = [0, 0];
        h.frags = 0x4000u16.to_be_bytes();
        h.ttl = 64;
        h.proto = proto;
        h.check = [0, 0];
        h.src_addr = saddr;
        h.dst_addr = daddr;
        let sum = sum_words::<{ IP_LEN / 2 }>(ip as *const u8);
        h.check = (!csum_fold(sum)).to_ne_bytes();
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
