//! The two address families, as the translation sees them. The translation (`nat`,
//! `conntrack`, `snat`, `select`, `icmp`) is written once, generic over `Family`, and compiled
//! once for each (`V4`, `V6`): what differs is here, behind the trait, and in the parsers
//! (`parse` for IPv4, `parse6` for IPv6) and checksum rewrites (`csum`). Every method is
//! inlined, so that each family's program is what it would be written out by hand: the maps
//! named at each call site (as the verifier wants), the keys built as words.

use core::mem;

use aya_ebpf::{
    maps::{lpm_trie::Key, HashMap, LruHashMap},
    programs::TcContext,
};
use lb_common::{
    config, AffinityEntry, AffinityKeyV4, AffinityKeyV6, BackendV4, BackendV6, CtEntryV4,
    CtEntryV6, CtKeyV4, CtKeyV6, Ipv6Words, ServiceEntry, ServiceKeyV4, ServiceKeyV6,
    SourceRangeV4, SourceRangeV6, HAIRPIN_SNAT_V4, HAIRPIN_SNAT_V6,
};

use crate::{
    conntrack::conntrack_key,
    csum::{skb_rewrite, skb_rewrite6},
    ctx::Packet,
    icmp::{rewrite_error, rewrite_error6},
    maps::{
        cfg_value, LB4_AFFINITY, LB4_BACKENDS, LB4_CONNTRACK, LB4_SERVICES, LB4_SNAT,
        LB4_SRC_RANGES, LB6_AFFINITY, LB6_BACKENDS, LB6_CONNTRACK, LB6_NODE_ADDR, LB6_SERVICES,
        LB6_SNAT, LB6_SRC_RANGES,
    },
    parse::{Headers, IcmpError, IcmpPtrs4, Tuple, ETH_LEN, IP_LEN},
    parse6::{Headers6, IcmpPtrs6},
    telemetry::{report_flow, report_flow6},
};

/// What the translation needs of an address family: its addresses, its maps and their keys,
/// and how its headers are rewritten.
pub(crate) trait Family: Sized {
    /// An address as the packet carries it (network byte order).
    type Addr: Copy;
    type CtKey: 'static;
    type Entry: CtEntry<Addr = Self::Addr> + 'static;
    type SvcKey: Copy + 'static;
    type Backend: Backend<Addr = Self::Addr> + 'static;
    type AffKey: 'static;
    /// Bounds-checked pointers to a TCP/UDP packet's headers.
    type Hdr;
    /// Bounds-checked pointers to an ICMP error's headers.
    type IcmpPtrs;

    /// The source of hairpin flows (`HAIRPIN_SNAT_V4` / `_V6`).
    const HAIRPIN: Self::Addr;
    /// Datagrams up to this size fit every route (IPv4's minimum reassembly size, IPv6's
    /// minimum MTU): no path MTU check for them.
    const MTU_FLOOR: u16;
    /// `AF_INET` / `AF_INET6`, for `bpf_fib_lookup`.
    const AF: u32;

    fn same(a: Self::Addr, b: Self::Addr) -> bool;
    fn is_unspecified(a: Self::Addr) -> bool;
    /// 127/8, ::1: NodePorts there are the node's own processes' (the socket hooks).
    fn is_loopback(a: Self::Addr) -> bool;

    fn ct_key(
        saddr: Self::Addr,
        daddr: Self::Addr,
        sport: u16,
        dport: u16,
        proto: u8,
    ) -> Self::CtKey;
    fn set_ct_dport(key: &mut Self::CtKey, port: u16);
    fn conntrack() -> &'static LruHashMap<Self::CtKey, Self::Entry>;
    fn snat() -> &'static LruHashMap<Self::CtKey, Self::Entry>;
    fn services() -> &'static HashMap<Self::SvcKey, ServiceEntry>;
    fn svc_key(addr: Self::Addr, port: u16, proto: u8, scope: u8) -> Self::SvcKey;
    fn backends() -> &'static HashMap<u32, Self::Backend>;
    fn affinity() -> &'static LruHashMap<Self::AffKey, AffinityEntry>;
    fn affinity_key(group: u64, client: Self::Addr) -> Self::AffKey;

    /// The node's address: the source of source-NATed flows (unspecified when it has none).
    fn node_addr() -> Self::Addr;
    /// Whether a client may use a frontend with loadBalancerSourceRanges.
    fn source_allowed(svc_id: u32, saddr: Self::Addr) -> bool;
    /// The client address as 32 bits for the Maglev flow hash (the same on every node).
    fn hash_client(saddr: Self::Addr) -> u32;
    /// Reports a decision to `LB_FLOWS`; false when the ring buffer is full.
    fn report(
        kind: u8,
        proto: u8,
        pkt: &Tuple<Self::Addr>,
        to: &Tuple<Self::Addr>,
        svc_id: u32,
        now: u64,
    ) -> bool;

    /// The packet carries its L4 header (not a later fragment).
    fn has_l4(hdr: &Self::Hdr) -> bool;
    /// Bytes of the IP header and the extension headers before the L4 header.
    fn ip_hdr_len(hdr: &Self::Hdr) -> u16;
    /// Rewrites in place, checksums updated incrementally (XDP).
    fn rewrite_direct(
        ctx: &impl Packet,
        hdr: &Self::Hdr,
        from: &Tuple<Self::Addr>,
        to: &Tuple<Self::Addr>,
    );
    /// Rewrites an skb through the kernel's checksum helpers (TC).
    fn rewrite_skb(
        ctx: &TcContext,
        hdr: &Self::Hdr,
        from: &Tuple<Self::Addr>,
        to: &Tuple<Self::Addr>,
    );
    /// Rewrites an ICMP error: the outer addresses to `saddr`, `daddr`, the quoted packet to
    /// `inner`.
    fn rewrite_error(
        e: &IcmpError<Self>,
        inner: &Tuple<Self::Addr>,
        saddr: Self::Addr,
        daddr: Self::Addr,
    );
    /// Writes the family and the addresses of `to` into `struct bpf_fib_lookup`, as words.
    fn fib_addrs(words: &mut [u32; 16], to: &Tuple<Self::Addr>);
}

/// A conntrack entry (`CtEntryV4` / `CtEntryV6`): the tuple packets become, and whose flow.
pub(crate) trait CtEntry: Copy {
    type Addr: Copy;
    fn new(nat: &Tuple<Self::Addr>, backend_id: u32, svc_id: u32, flags: u16, now: u64) -> Self;
    fn nat(&self) -> Tuple<Self::Addr>;
    fn flags(&self) -> u16;
    fn flags_mut(&mut self) -> &mut u16;
    fn last_seen_mut(&mut self) -> &mut u64;
    fn backend_id(&self) -> u32;
    fn svc_id(&self) -> u32;
}

/// A backend (`BackendV4` / `BackendV6`).
pub(crate) trait Backend: Copy {
    type Addr: Copy;
    fn addr(&self) -> Self::Addr;
    fn port(&self) -> u16;
    fn flags(&self) -> u8;
}

/// The accessors of both families' entries and backends, whose fields have the same names.
macro_rules! entry_and_backend {
    ($entry:ty, $backend:ty, $addr:ty) => {
        impl CtEntry for $entry {
            type Addr = $addr;
            #[inline(always)]
            fn new(nat: &Tuple<$addr>, backend_id: u32, svc_id: u32, flags: u16, now: u64) -> Self {
                Self {
                    last_seen_ns: now,
                    nat_saddr: <$addr as Word>::store(nat.saddr),
                    nat_daddr: <$addr as Word>::store(nat.daddr),
                    nat_sport: nat.sport,
                    nat_dport: nat.dport,
                    backend_id,
                    svc_id,
                    flags,
                    _pad: 0,
                }
            }
            #[inline(always)]
            fn nat(&self) -> Tuple<$addr> {
                Tuple {
                    saddr: <$addr as Word>::load(self.nat_saddr),
                    daddr: <$addr as Word>::load(self.nat_daddr),
                    sport: self.nat_sport,
                    dport: self.nat_dport,
                }
            }
            #[inline(always)]
            fn flags(&self) -> u16 {
                self.flags
            }
            #[inline(always)]
            fn flags_mut(&mut self) -> &mut u16 {
                &mut self.flags
            }
            #[inline(always)]
            fn last_seen_mut(&mut self) -> &mut u64 {
                &mut self.last_seen_ns
            }
            #[inline(always)]
            fn backend_id(&self) -> u32 {
                self.backend_id
            }
            #[inline(always)]
            fn svc_id(&self) -> u32 {
                self.svc_id
            }
        }

        impl Backend for $backend {
            type Addr = $addr;
            #[inline(always)]
            fn addr(&self) -> $addr {
                <$addr as Word>::load(self.addr)
            }
            #[inline(always)]
            fn port(&self) -> u16 {
                self.port
            }
            #[inline(always)]
            fn flags(&self) -> u8 {
                self.flags
            }
        }
    };
}

entry_and_backend!(CtEntryV4, BackendV4, u32);
entry_and_backend!(CtEntryV6, BackendV6, Addr6);

/// An address as the translation holds it, and as the maps' types hold it (`Stored`): the
/// same for IPv4; for IPv6, `Addr6` (two registers) against `Ipv6Words` (four).
pub(crate) trait Word: Copy {
    type Stored: Copy;
    fn load(s: Self::Stored) -> Self;
    fn store(a: Self) -> Self::Stored;
}

impl Word for u32 {
    type Stored = u32;
    #[inline(always)]
    fn load(s: u32) -> u32 {
        s
    }
    #[inline(always)]
    fn store(a: u32) -> u32 {
        a
    }
}

/// An IPv6 address as the translation holds it: its 16 bytes as two 64-bit halves, in
/// memory order (the bytes of `Ipv6Words`, which the maps' types hold). Two registers where
/// `Ipv6Words` takes four: with four per address the 128-bit addresses of a flow did not fit
/// BPF's ten registers, and their spills did not fit its 512-byte stack.
pub(crate) type Addr6 = [u64; 2];

impl Word for Addr6 {
    type Stored = Ipv6Words;
    #[inline(always)]
    fn load(s: Ipv6Words) -> Addr6 {
        addr6(s)
    }
    #[inline(always)]
    fn store(a: Addr6) -> Ipv6Words {
        words(a)
    }
}

/// `Ipv6Words` as an `Addr6` (the same bytes).
#[inline(always)]
pub(crate) const fn addr6(w: Ipv6Words) -> Addr6 {
    // SAFETY: 16 bytes of integers either way; every bit pattern is valid.
    unsafe { mem::transmute::<Ipv6Words, Addr6>(w) }
}

/// An `Addr6` as `Ipv6Words` (the same bytes).
#[inline(always)]
pub(crate) const fn words(a: Addr6) -> Ipv6Words {
    // SAFETY: as above.
    unsafe { mem::transmute::<Addr6, Ipv6Words>(a) }
}

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

/// IPv4.
pub(crate) struct V4;

impl Family for V4 {
    type Addr = u32;
    type CtKey = CtKeyV4;
    type Entry = CtEntryV4;
    type SvcKey = ServiceKeyV4;
    type Backend = BackendV4;
    type AffKey = AffinityKeyV4;
    type Hdr = Headers;
    type IcmpPtrs = IcmpPtrs4;

    const HAIRPIN: u32 = HAIRPIN_SNAT_V4;
    const MTU_FLOOR: u16 = 576;
    const AF: u32 = AF_INET;

    #[inline(always)]
    fn same(a: u32, b: u32) -> bool {
        a == b
    }
    #[inline(always)]
    fn is_unspecified(a: u32) -> bool {
        a == 0
    }
    #[inline(always)]
    fn is_loopback(a: u32) -> bool {
        a.to_ne_bytes()[0] == 127
    }
    #[inline(always)]
    fn ct_key(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> CtKeyV4 {
        conntrack_key(saddr, daddr, sport, dport, proto)
    }
    #[inline(always)]
    fn set_ct_dport(key: &mut CtKeyV4, port: u16) {
        key.dport = port;
    }
    #[inline(always)]
    fn conntrack() -> &'static LruHashMap<CtKeyV4, CtEntryV4> {
        &LB4_CONNTRACK
    }
    #[inline(always)]
    fn snat() -> &'static LruHashMap<CtKeyV4, CtEntryV4> {
        &LB4_SNAT
    }
    #[inline(always)]
    fn services() -> &'static HashMap<ServiceKeyV4, ServiceEntry> {
        &LB4_SERVICES
    }
    #[inline(always)]
    fn svc_key(addr: u32, port: u16, proto: u8, scope: u8) -> ServiceKeyV4 {
        ServiceKeyV4 {
            addr,
            port,
            proto,
            scope,
        }
    }
    #[inline(always)]
    fn backends() -> &'static HashMap<u32, BackendV4> {
        &LB4_BACKENDS
    }
    #[inline(always)]
    fn affinity() -> &'static LruHashMap<AffinityKeyV4, AffinityEntry> {
        &LB4_AFFINITY
    }
    #[inline(always)]
    fn affinity_key(group: u64, client: u32) -> AffinityKeyV4 {
        AffinityKeyV4 {
            group,
            client,
            _pad: 0,
        }
    }
    #[inline(always)]
    fn node_addr() -> u32 {
        cfg_value(config::NODE_ADDR)
    }
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
    #[inline(always)]
    fn hash_client(saddr: u32) -> u32 {
        saddr
    }
    #[inline(always)]
    fn report(kind: u8, proto: u8, pkt: &Tuple, to: &Tuple, svc_id: u32, now: u64) -> bool {
        report_flow(kind, proto, pkt, to, svc_id, now)
    }
    #[inline(always)]
    fn has_l4(hdr: &Headers) -> bool {
        hdr.l4
    }
    #[inline(always)]
    fn ip_hdr_len(_hdr: &Headers) -> u16 {
        IP_LEN as u16
    }
    #[inline(always)]
    fn rewrite_direct(_ctx: &impl Packet, hdr: &Headers, from: &Tuple, to: &Tuple) {
        hdr.rewrite(from, to);
    }
    #[inline(always)]
    fn rewrite_skb(ctx: &TcContext, hdr: &Headers, from: &Tuple, to: &Tuple) {
        skb_rewrite(ctx, hdr, from, to);
    }
    #[inline(always)]
    fn rewrite_error(e: &IcmpError<V4>, inner: &Tuple, saddr: u32, daddr: u32) {
        rewrite_error(e, inner, saddr, daddr);
    }
    #[inline(always)]
    fn fib_addrs(words: &mut [u32; 16], to: &Tuple) {
        words[4] = to.saddr;
        words[8] = to.daddr;
    }
}

/// IPv6.
pub(crate) struct V6;

/// `::1`.
const LOOPBACK_V6: Addr6 = addr6(lb_common::ipv6_words([
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
]));

impl Family for V6 {
    type Addr = Addr6;
    type CtKey = CtKeyV6;
    type Entry = CtEntryV6;
    type SvcKey = ServiceKeyV6;
    type Backend = BackendV6;
    type AffKey = AffinityKeyV6;
    type Hdr = Headers6;
    type IcmpPtrs = IcmpPtrs6;

    const HAIRPIN: Addr6 = addr6(HAIRPIN_SNAT_V6);
    const MTU_FLOOR: u16 = 1280;
    const AF: u32 = AF_INET6;

    /// Half by half, without a call to `memcmp`.
    #[inline(always)]
    fn same(a: Addr6, b: Addr6) -> bool {
        (a[0] ^ b[0]) | (a[1] ^ b[1]) == 0
    }
    #[inline(always)]
    fn is_unspecified(a: Addr6) -> bool {
        a[0] | a[1] == 0
    }
    #[inline(always)]
    fn is_loopback(a: Addr6) -> bool {
        Self::same(a, LOOPBACK_V6)
    }
    /// Written as five 64-bit words (field by field, the compiler zeroes the padding with a
    /// call to `memset`).
    #[inline(always)]
    fn ct_key(saddr: Addr6, daddr: Addr6, sport: u16, dport: u16, proto: u8) -> CtKeyV6 {
        let (s, d) = (sport.to_ne_bytes(), dport.to_ne_bytes());
        let rest = u64::from(u32::from_ne_bytes([s[0], s[1], d[0], d[1]])) | u64::from(proto) << 32;
        let words = [saddr[0], saddr[1], daddr[0], daddr[1], rest];
        // SAFETY: CtKeyV6 is 40 bytes of integers: the two addresses, then the ports in memory
        // order, proto in the byte after them and zero padding (this target is
        // little-endian).
        unsafe { mem::transmute::<[u64; 5], CtKeyV6>(words) }
    }
    #[inline(always)]
    fn set_ct_dport(key: &mut CtKeyV6, port: u16) {
        key.dport = port;
    }
    #[inline(always)]
    fn conntrack() -> &'static LruHashMap<CtKeyV6, CtEntryV6> {
        &LB6_CONNTRACK
    }
    #[inline(always)]
    fn snat() -> &'static LruHashMap<CtKeyV6, CtEntryV6> {
        &LB6_SNAT
    }
    #[inline(always)]
    fn services() -> &'static HashMap<ServiceKeyV6, ServiceEntry> {
        &LB6_SERVICES
    }
    #[inline(always)]
    fn svc_key(addr: Addr6, port: u16, proto: u8, scope: u8) -> ServiceKeyV6 {
        ServiceKeyV6 {
            addr: words(addr),
            port,
            proto,
            scope,
        }
    }
    #[inline(always)]
    fn backends() -> &'static HashMap<u32, BackendV6> {
        &LB6_BACKENDS
    }
    #[inline(always)]
    fn affinity() -> &'static LruHashMap<AffinityKeyV6, AffinityEntry> {
        &LB6_AFFINITY
    }
    #[inline(always)]
    fn affinity_key(group: u64, client: Addr6) -> AffinityKeyV6 {
        AffinityKeyV6 {
            group,
            client: words(client),
        }
    }
    #[inline(always)]
    fn node_addr() -> Addr6 {
        LB6_NODE_ADDR.get(0).copied().map_or([0; 2], addr6)
    }
    /// The LPM key: 32 bits of service id, then the client's 128.
    #[inline(always)]
    fn source_allowed(svc_id: u32, saddr: Addr6) -> bool {
        let key = Key::new(
            32 + 128,
            SourceRangeV6 {
                svc_id_be: svc_id.to_be(),
                addr: words(saddr),
            },
        );
        LB6_SRC_RANGES.get(&key).is_some()
    }
    /// The address's 128 bits through MurmurHash3's 64-bit finaliser, in two halves: every
    /// bit counts, the same on every node.
    #[inline(always)]
    fn hash_client(saddr: Addr6) -> u32 {
        fmix64(fmix64(saddr[0]) ^ saddr[1]) as u32
    }
    #[inline(always)]
    fn report(
        kind: u8,
        proto: u8,
        pkt: &Tuple<Addr6>,
        to: &Tuple<Addr6>,
        svc_id: u32,
        now: u64,
    ) -> bool {
        report_flow6(kind, proto, pkt, to, svc_id, now)
    }
    #[inline(always)]
    fn has_l4(hdr: &Headers6) -> bool {
        hdr.l4
    }
    #[inline(always)]
    fn ip_hdr_len(hdr: &Headers6) -> u16 {
        (hdr.l4_off - ETH_LEN) as u16
    }
    #[inline(always)]
    fn rewrite_direct(ctx: &impl Packet, hdr: &Headers6, from: &Tuple<Addr6>, to: &Tuple<Addr6>) {
        hdr.rewrite(ctx, from, to);
    }
    #[inline(always)]
    fn rewrite_skb(ctx: &TcContext, hdr: &Headers6, from: &Tuple<Addr6>, to: &Tuple<Addr6>) {
        skb_rewrite6(ctx, hdr, from, to);
    }
    #[inline(always)]
    fn rewrite_error(e: &IcmpError<V6>, inner: &Tuple<Addr6>, saddr: Addr6, daddr: Addr6) {
        rewrite_error6(e, inner, saddr, daddr);
    }
    #[inline(always)]
    fn fib_addrs(w: &mut [u32; 16], to: &Tuple<Addr6>) {
        let (s, d) = (words(to.saddr), words(to.daddr));
        w[4..8].copy_from_slice(&s);
        w[8..12].copy_from_slice(&d);
    }
}

/// MurmurHash3's 64-bit finaliser.
#[inline(always)]
pub(crate) fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}
