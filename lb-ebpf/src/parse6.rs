//! IPv6 header parsing: Ethernet + IPv6, its extension headers walked within a fixed bound
//! (`IPV6_EXT_MAX`: hop-by-hop, routing without segments left, destination options,
//! fragment), then TCP/UDP into `Parsed::L4` (a datagram's first fragment too, and its later
//! fragments with the ports the first one carried), or an ICMPv6 error with the IPv6 header
//! and ports it quotes into `Parsed::IcmpError`. Anything else is left alone: other
//! extension headers (AH, ESP, ...) and more of them than the bound, ICMPv6 that is no error
//! (neighbour discovery and router advertisements among it), other protocols.

use lb_common::{stat, IPPROTO_TCP, IPPROTO_UDP, IPV6_EXT_MAX};
use network_types::{eth::EthHdr, ip::Ipv6Hdr};

use crate::{
    ctx::{load32, load64, ptr_at, Packet},
    family::{Addr6, V6},
    frag,
    parse::{
        IcmpError, L4Packet, Parsed, Ports, Tuple, ETH_LEN, ICMP_LEN, IP_DF, TCP_LEN, UDP_LEN,
    },
};

pub(crate) const ETH_P_IPV6_BE: u16 = 0x86DDu16.to_be();
pub(crate) const IP6_LEN: usize = size_of::<Ipv6Hdr>();
/// Offsets in a frame: the IPv6 addresses, and the L4 header when there are no extension
/// headers.
pub(crate) const IP6_SRC_OFF: usize = ETH_LEN + 8;
pub(crate) const IP6_DST_OFF: usize = ETH_LEN + 24;
pub(crate) const L4_OFF6: usize = ETH_LEN + IP6_LEN;
pub(crate) const IPPROTO_ICMPV6: u8 = 58;

/// The headers the programs read, linear, when there are no extension headers: up to a
/// quoted TCP header of an ICMPv6 error. With extension headers, as many bytes again and
/// some (`HEADERS6_EXT_MAX`); headers beyond what is linear then are not looked at.
pub(crate) const HEADERS6_MAX: usize = L4_OFF6 + ICMP_LEN + IP6_LEN + TCP_LEN;
pub(crate) const HEADERS6_EXT_MAX: usize = HEADERS6_MAX + 256;

/// Extension headers the walk goes through.
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_DEST: u8 = 60;
/// Extension headers it does not: ESP, AH, mobility, HIP, shim6, the experimental ones.
const NEXTHDR_ESP: u8 = 50;
const NEXTHDR_AH: u8 = 51;
const NEXTHDR_MOBILITY: u8 = 135;
const NEXTHDR_HIP: u8 = 139;
const NEXTHDR_SHIM6: u8 = 140;
const NEXTHDR_EXP1: u8 = 253;
const NEXTHDR_EXP2: u8 = 254;

/// The fragment header's offset and more-fragments bits (host order).
const FRAG6_OFFSET: u16 = 0xfff8;
const FRAG6_MORE: u16 = 0x0001;

/// ICMPv6 errors (RFC 4443), the types that quote the packet they are about; every other
/// type (echo, neighbour discovery, router advertisements, ...) is left alone.
pub(crate) const ICMP6_DEST_UNREACH: u8 = 1;
pub(crate) const ICMP6_PKT_TOO_BIG: u8 = 2;
const ICMP6_TIME_EXCEEDED: u8 = 3;
const ICMP6_PARAM_PROB: u8 = 4;

/// Where an IPv6 packet's headers are (`Headers`' twin). Offsets, not pointers: the
/// rewrite takes its pointers again (bounds-checked), so that a flow's translation does not
/// keep three of BPF's ten registers for them.
pub(crate) struct Headers6 {
    /// Where the L4 header is (after the extension headers).
    pub(crate) l4_off: usize,
    pub(crate) udp: bool,
    /// The packet carries its L4 header (not a later fragment).
    pub(crate) l4: bool,
}

/// Where an ICMPv6 error's fields are.
pub(crate) struct IcmpPtrs6 {
    pub(crate) ip: *mut Ipv6Hdr,
    /// The ICMPv6 header (type, code, checksum, rest).
    pub(crate) icmp: *mut [u8; ICMP_LEN],
    pub(crate) inner_ip: *mut Ipv6Hdr,
    pub(crate) inner_ports: *mut Ports,
    /// The quoted L4 checksum, when the quote reaches it.
    pub(crate) inner_csum: Option<*mut [u8; 2]>,
}

/// Whether the frame is IPv6 (by its ethertype).
#[inline(always)]
pub(crate) fn is_ipv6(ctx: &impl Packet) -> bool {
    // SAFETY: bounds-checked by ptr_at.
    ptr_at::<EthHdr>(ctx, 0).is_some_and(|eth| unsafe { (*eth).ether_type } == ETH_P_IPV6_BE)
}

/// An IPv6 address from the packet.
///
/// # Safety
/// `p .. p + 16` must have been bounds-checked.
#[inline(always)]
unsafe fn load_addr(p: *const u8) -> Addr6 {
    // SAFETY: guaranteed by the caller.
    unsafe { [load64(p), load64(p.add(8))] }
}

/// A fragment header met on the walk.
#[derive(Clone, Copy)]
struct Frag6 {
    /// Offset and flags, host order.
    off_flags: u16,
    /// The identification, as on the wire.
    id: u32,
    /// The header that follows it.
    next: u8,
}

/// Where the walk of the extension headers ended: the upper-layer protocol and its offset.
struct Walk {
    proto: u8,
    l4_off: usize,
    frag: Option<Frag6>,
}

/// Walks the extension headers from `next` (the IPv6 header's next header), at most
/// `IPV6_EXT_MAX` of them. Stops at TCP, UDP or ICMPv6, or after a later fragment's fragment
/// header (what follows it is payload).
#[inline(always)]
fn walk(ctx: &impl Packet, mut next: u8) -> Result<Walk, u32> {
    let mut off = L4_OFF6;
    let mut frag: Option<Frag6> = None;
    let mut i = 0;
    while i <= IPV6_EXT_MAX {
        match next {
            IPPROTO_TCP | IPPROTO_UDP | IPPROTO_ICMPV6 => {
                return Ok(Walk {
                    proto: next,
                    l4_off: off,
                    frag,
                });
            }
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_FRAGMENT | NEXTHDR_DEST => {}
            NEXTHDR_ESP | NEXTHDR_AH | NEXTHDR_MOBILITY | NEXTHDR_HIP | NEXTHDR_SHIM6
            | NEXTHDR_EXP1 | NEXTHDR_EXP2 => return Err(stat::PASS_IPV6_EXT),
            _ => return Err(stat::PASS_OTHER_PROTO),
        }
        // One more than the bound.
        if i == IPV6_EXT_MAX {
            return Err(stat::PASS_IPV6_EXT);
        }
        // Every extension header is 8 bytes at least: next header and length first.
        let h = ptr_at::<[u8; 8]>(ctx, off).ok_or(stat::PASS_TRUNCATED)?;
        // SAFETY: bounds-checked by ptr_at.
        let h = unsafe { *h };
        match next {
            // Only first (RFC 8200 4.1).
            NEXTHDR_HOP if i != 0 => return Err(stat::PASS_IPV6_EXT),
            NEXTHDR_FRAGMENT => {
                if frag.is_some() {
                    return Err(stat::PASS_IPV6_EXT);
                }
                let f = Frag6 {
                    off_flags: u16::from_be_bytes([h[2], h[3]]),
                    id: u32::from_ne_bytes([h[4], h[5], h[6], h[7]]),
                    next: h[0],
                };
                frag = Some(f);
                off += 8;
                if f.off_flags & FRAG6_OFFSET != 0 {
                    // A later fragment: no more headers, only the datagram's payload.
                    return Ok(Walk {
                        proto: h[0],
                        l4_off: off,
                        frag,
                    });
                }
                next = h[0];
                i += 1;
                continue;
            }
            // A routing header with segments left: the destination is not the final one
            // (nor the one the L4 checksum's pseudo-header holds).
            NEXTHDR_ROUTING if h[3] != 0 => return Err(stat::PASS_IPV6_EXT),
            _ => {}
        }
        off += (usize::from(h[1]) + 1) * 8;
        next = h[0];
        i += 1;
    }
    Err(stat::PASS_IPV6_EXT)
}

/// Parses Ethernet + IPv6, its extension headers, and TCP/UDP or an ICMPv6 error. Anything
/// else is `Err(counter)`: the reason it is left alone.
#[inline(always)]
pub(crate) fn parse6(ctx: &impl Packet) -> Result<Parsed<V6>, u32> {
    ctx.linearize(HEADERS6_MAX);
    let ip = ptr_at::<Ipv6Hdr>(ctx, ETH_LEN).ok_or(stat::PASS_TRUNCATED)?;
    // SAFETY: `ip` was bounds-checked by ptr_at.
    let (version, payload_len, next) = unsafe {
        (
            (*ip).vcf[0] >> 4,
            u16::from_be_bytes((*ip).payload_len),
            (*ip).next_hdr,
        )
    };
    if version != 6 {
        return Err(stat::PASS_NOT_IPV4);
    }
    let tot_len = payload_len
        .checked_add(IP6_LEN as u16)
        .ok_or(stat::PASS_TRUNCATED)?;
    if ETH_LEN as u64 + u64::from(tot_len) > ctx.frame_len() {
        return Err(stat::PASS_TRUNCATED);
    }
    let has_ext = matches!(
        next,
        NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_FRAGMENT | NEXTHDR_DEST
    );
    if has_ext {
        ctx.linearize(HEADERS6_EXT_MAX);
    }
    let w = walk(ctx, next)?;
    // Pointers again: a pull moves the packet.
    let ip = ptr_at::<Ipv6Hdr>(ctx, ETH_LEN).ok_or(stat::PASS_TRUNCATED)?;
    // SAFETY: `ip` was bounds-checked by ptr_at.
    let (saddr, daddr) = unsafe {
        (
            load_addr((ip as *const u8).add(8)),
            load_addr((ip as *const u8).add(24)),
        )
    };
    // What is left of the datagram after its extension headers.
    let ext_len = w.l4_off - L4_OFF6;
    let l4_len = usize::from(payload_len)
        .checked_sub(ext_len)
        .ok_or(stat::PASS_TRUNCATED)?;
    let frag = w.frag.map_or(0, |f| f.off_flags);
    if w.proto == IPPROTO_ICMPV6 {
        if frag & (FRAG6_OFFSET | FRAG6_MORE) != 0 {
            return Err(stat::PASS_FRAGMENT);
        }
        return parse_icmp6_error(ctx, ip, w.l4_off, l4_len, saddr, daddr).map(Parsed::IcmpError);
    }
    let (hdr_len, csum_off) = match w.proto {
        IPPROTO_TCP => (TCP_LEN, 16),
        IPPROTO_UDP => (UDP_LEN, 6),
        // A later fragment of something else.
        _ => return Err(stat::PASS_OTHER_PROTO),
    };
    if let Some(f) = w.frag {
        if f.off_flags & FRAG6_OFFSET != 0 {
            // A later fragment: no L4 header; its datagram's ports come from the first.
            let Some(p) = frag::recall6(saddr, daddr, f.id, w.proto) else {
                return Err(stat::PASS_FRAGMENT_UNKNOWN);
            };
            return Ok(Parsed::L4(L4Packet {
                hdr: Headers6 {
                    l4_off: w.l4_off,
                    udp: w.proto == IPPROTO_UDP,
                    l4: false,
                },
                pkt: Tuple {
                    saddr,
                    daddr,
                    sport: p.sport,
                    dport: p.dport,
                },
                proto: w.proto,
                tcp_flags: 0,
                frags: IP_DF,
                tot_len,
                l4_hdr_len: 0,
            }));
        }
    }
    if l4_len < hdr_len {
        return Err(stat::PASS_TRUNCATED);
    }
    let ports = ptr_at::<Ports>(ctx, w.l4_off).ok_or(stat::PASS_TRUNCATED)?;
    // The checksum in the linear data too (the rewrite writes it).
    ptr_at::<[u8; 2]>(ctx, w.l4_off + csum_off).ok_or(stat::PASS_TRUNCATED)?;
    let (tcp_flags, l4_hdr_len) = if w.proto == IPPROTO_TCP {
        let f = ptr_at::<[u8; 2]>(ctx, w.l4_off + 12).ok_or(stat::PASS_TRUNCATED)?;
        // SAFETY: bounds-checked by ptr_at.
        let [doff, flags] = unsafe { *f };
        (flags, u16::from(doff >> 4) * 4)
    } else {
        (0, UDP_LEN as u16)
    };
    // SAFETY: `ports` was bounds-checked by ptr_at.
    let port_bytes = unsafe { load32(ports as *const u8) }.to_ne_bytes();
    let pkt = Tuple {
        saddr,
        daddr,
        sport: u16::from_ne_bytes([port_bytes[0], port_bytes[1]]),
        dport: u16::from_ne_bytes([port_bytes[2], port_bytes[3]]),
    };
    if let Some(f) = w.frag {
        // The first fragment (more follow): its ports, for the fragments that follow, when
        // its L4 header comes right after the fragment header (what later fragments name in
        // theirs). Other first fragments are translated; their later fragments are not.
        if f.off_flags & FRAG6_MORE != 0 && f.next == w.proto {
            frag::remember6(&pkt, f.id, w.proto);
        }
    }
    Ok(Parsed::L4(L4Packet {
        hdr: Headers6 {
            l4_off: w.l4_off,
            udp: w.proto == IPPROTO_UDP,
            l4: true,
        },
        pkt,
        proto: w.proto,
        tcp_flags,
        frags: IP_DF,
        tot_len,
        l4_hdr_len,
    }))
}

/// An ICMPv6 error at `off` (`len` bytes of it in the datagram), quoting an IPv6 header
/// followed by the TCP or UDP ports (a quoted packet with extension headers is not looked
/// into).
#[inline(always)]
fn parse_icmp6_error(
    ctx: &impl Packet,
    ip: *mut Ipv6Hdr,
    off: usize,
    len: usize,
    saddr: Addr6,
    daddr: Addr6,
) -> Result<IcmpError<V6>, u32> {
    let icmp = ptr_at::<[u8; ICMP_LEN]>(ctx, off).ok_or(stat::PASS_TRUNCATED)?;
    // SAFETY: bounds-checked by ptr_at.
    let kind = unsafe { (*icmp)[0] };
    if !matches!(
        kind,
        ICMP6_DEST_UNREACH | ICMP6_PKT_TOO_BIG | ICMP6_TIME_EXCEEDED | ICMP6_PARAM_PROB
    ) {
        return Err(stat::PASS_OTHER_PROTO);
    }
    let inner_ip = ptr_at::<Ipv6Hdr>(ctx, off + ICMP_LEN).ok_or(stat::PASS_TRUNCATED)?;
    let inner_l4 = off + ICMP_LEN + IP6_LEN;
    let inner_ports = ptr_at::<Ports>(ctx, inner_l4).ok_or(stat::PASS_TRUNCATED)?;
    // The quote must lie within the outer datagram, not in the frame's padding.
    if len < ICMP_LEN + IP6_LEN + UDP_LEN {
        return Err(stat::PASS_TRUNCATED);
    }
    // SAFETY: `inner_ip` and `inner_ports` were bounds-checked by ptr_at.
    let (version, proto, isaddr, idaddr, port_bytes) = unsafe {
        (
            (*inner_ip).vcf[0] >> 4,
            (*inner_ip).next_hdr,
            load_addr((inner_ip as *const u8).add(8)),
            load_addr((inner_ip as *const u8).add(24)),
            load32(inner_ports as *const u8).to_ne_bytes(),
        )
    };
    if version != 6 {
        return Err(stat::PASS_ICMP_UNRELATED);
    }
    let inner_csum = match proto {
        IPPROTO_UDP => ptr_at::<[u8; 2]>(ctx, inner_l4 + 6),
        IPPROTO_TCP if len >= ICMP_LEN + IP6_LEN + 18 => ptr_at::<[u8; 2]>(ctx, inner_l4 + 16),
        IPPROTO_TCP => None,
        _ => return Err(stat::PASS_ICMP_UNRELATED),
    };
    Ok(IcmpError {
        ptrs: IcmpPtrs6 {
            ip,
            icmp,
            inner_ip,
            inner_ports,
            inner_csum,
        },
        saddr,
        daddr,
        inner: Tuple {
            saddr: isaddr,
            daddr: idaddr,
            sport: u16::from_ne_bytes([port_bytes[0], port_bytes[1]]),
            dport: u16::from_ne_bytes([port_bytes[2], port_bytes[3]]),
        },
        inner_proto: proto,
    })
}
