//! Header parsing: Ethernet + IPv4 (no options) + TCP/UDP into `Parsed::L4` (the first
//! fragment of a datagram too, and its later fragments with the ports the first one carried),
//! or an ICMP error with the header it quotes into `Parsed::IcmpError`; with the header
//! lengths and offsets the rest of the datapath uses.

use lb_common::{stat, IPPROTO_TCP, IPPROTO_UDP};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{
    ctx::{load32, ptr_at, Packet},
    family::{Family, V4},
    frag,
};

pub(crate) const ETH_LEN: usize = size_of::<EthHdr>();
pub(crate) const IP_LEN: usize = size_of::<Ipv4Hdr>();
pub(crate) const L4_OFF: usize = ETH_LEN + IP_LEN;
pub(crate) const TCP_LEN: usize = 20;
pub(crate) const UDP_LEN: usize = 8;
pub(crate) const ICMP_LEN: usize = 8;
pub(crate) const IPPROTO_ICMP: u8 = 1;

pub(crate) const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
/// Offsets in a frame with an IPv4 header without options.
pub(crate) const IP_CSUM_OFF: usize = ETH_LEN + 10;
pub(crate) const IP_SRC_OFF: usize = ETH_LEN + 12;
pub(crate) const IP_DST_OFF: usize = ETH_LEN + 16;
pub(crate) const TCP_CSUM_OFF: usize = L4_OFF + 16;
pub(crate) const UDP_CSUM_OFF: usize = L4_OFF + 6;
/// Where an ICMP error's quoted IPv4 header and the first bytes of its payload are.
pub(crate) const INNER_IP_OFF: usize = L4_OFF + ICMP_LEN;
pub(crate) const INNER_L4_OFF: usize = INNER_IP_OFF + IP_LEN;
/// The headers the programs read, linear: up to a quoted TCP header of an ICMP error.
pub(crate) const HEADERS_MAX: usize = INNER_L4_OFF + TCP_LEN;

pub(crate) const TCP_FIN: u8 = 0x01;
pub(crate) const TCP_SYN: u8 = 0x02;
pub(crate) const TCP_RST: u8 = 0x04;
pub(crate) const TCP_ACK: u8 = 0x10;

/// IPv4 flags and fragment offset: more fragments, and the offset's bits.
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;
/// Don't fragment.
pub(crate) const IP_DF: u16 = 0x4000;

/// ICMP types that quote the packet they are about.
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;

/// A TCP or UDP header's first four bytes.
#[repr(C)]
pub(crate) struct Ports {
    pub(crate) src: [u8; 2],
    pub(crate) dst: [u8; 2],
}

/// The addresses and ports of a packet (network byte order, as stored in the headers); `A`
/// is the family's address (`u32`, `family::Addr6`).
#[derive(Clone, Copy)]
pub(crate) struct Tuple<A = u32> {
    pub(crate) saddr: A,
    pub(crate) daddr: A,
    pub(crate) sport: u16,
    pub(crate) dport: u16,
}

/// Bounds-checked pointers into the current packet's headers.
pub(crate) struct Headers {
    pub(crate) ip: *mut Ipv4Hdr,
    pub(crate) ports: *mut Ports,
    pub(crate) csum: *mut [u8; 2],
    pub(crate) udp: bool,
    /// The packet carries its L4 header (not a later fragment): ports and checksum are
    /// rewritten with the addresses.
    pub(crate) l4: bool,
}

/// A TCP or UDP packet (or fragment of one) the datapath may translate.
pub(crate) struct L4Packet<F: Family = V4> {
    pub(crate) hdr: F::Hdr,
    pub(crate) pkt: Tuple<F::Addr>,
    pub(crate) proto: u8,
    pub(crate) tcp_flags: u8,
    /// The IPv4 flags and fragment offset, host order (`IP_DF`, ...). IPv6 packets have
    /// `IP_DF` (routers never fragment them).
    pub(crate) frags: u16,
    /// Bytes of the IP datagram (or fragment), from the header (IPv6: its header included).
    pub(crate) tot_len: u16,
    /// Bytes of the L4 header (TCP's data offset; UDP's 8; 0 for a later fragment).
    pub(crate) l4_hdr_len: u16,
}

impl<F: Family> L4Packet<F> {
    /// A fragment after the first: no L4 header, its ports recalled from the first.
    #[inline(always)]
    pub(crate) fn later_fragment(&self) -> bool {
        !F::has_l4(&self.hdr)
    }
}

/// An ICMP error (destination unreachable, time exceeded, parameter problem; IPv6's packet
/// too big) and the IP header plus L4 ports it quotes: the packet it is about, which went
/// the other way.
pub(crate) struct IcmpError<F: Family = V4> {
    pub(crate) ptrs: F::IcmpPtrs,
    /// The outer addresses.
    pub(crate) saddr: F::Addr,
    pub(crate) daddr: F::Addr,
    /// The quoted packet's tuple and protocol.
    pub(crate) inner: Tuple<F::Addr>,
    pub(crate) inner_proto: u8,
}

/// Where an IPv4 ICMP error's fields are.
pub(crate) struct IcmpPtrs4 {
    pub(crate) ip: *mut Ipv4Hdr,
    /// The ICMP header (type, code, checksum, rest).
    pub(crate) icmp: *mut [u8; ICMP_LEN],
    pub(crate) inner_ip: *mut Ipv4Hdr,
    pub(crate) inner_ports: *mut Ports,
    /// The quoted L4 checksum, when the quote reaches it (UDP's always, TCP's with 18 bytes).
    pub(crate) inner_csum: Option<*mut [u8; 2]>,
}

/// What the datapath may translate.
pub(crate) enum Parsed<F: Family = V4> {
    L4(L4Packet<F>),
    IcmpError(IcmpError<F>),
}

/// Parses Ethernet + IPv4 (no options) and TCP/UDP or an ICMP error. Anything else is
/// `Err(counter)`: the reason it is left alone.
#[inline(always)]
pub(crate) fn parse(ctx: &impl Packet) -> Result<Parsed, u32> {
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
            u16::from_be_bytes((*ip).tot_len),
        )
    };
    if vihl >> 4 != 4 {
        return Err(stat::PASS_NOT_IPV4);
    }
    if vihl & 0x0f != 5 {
        return Err(stat::PASS_IP_OPTIONS);
    }
    if usize::from(tot_len) < IP_LEN || (ETH_LEN as u64 + u64::from(tot_len)) > ctx.frame_len() {
        return Err(stat::PASS_TRUNCATED);
    }
    // SAFETY: `ip` was bounds-checked by ptr_at.
    let (saddr, daddr) = unsafe {
        (
            load32((ip as *const u8).add(12)),
            load32((ip as *const u8).add(16)),
        )
    };
    if proto == IPPROTO_ICMP {
        if frags & (IP_MF | IP_OFFSET) != 0 {
            return Err(stat::PASS_FRAGMENT);
        }
        return parse_icmp_error(ctx, ip, saddr, daddr, tot_len).map(Parsed::IcmpError);
    }
    let (l4_len, csum_off) = match proto {
        IPPROTO_TCP => (TCP_LEN, 16),
        IPPROTO_UDP => (UDP_LEN, 6),
        _ => return Err(stat::PASS_OTHER_PROTO),
    };
    if frags & IP_OFFSET != 0 {
        // A later fragment: no L4 header; its datagram's ports come from the first fragment.
        let Some(f) = frag::recall(saddr, daddr, ip, proto) else {
            return Err(stat::PASS_FRAGMENT_UNKNOWN);
        };
        return Ok(Parsed::L4(L4Packet {
            hdr: Headers {
                ip,
                ports: core::ptr::null_mut(),
                csum: core::ptr::null_mut(),
                udp: proto == IPPROTO_UDP,
                l4: false,
            },
            pkt: Tuple {
                saddr,
                daddr,
                sport: f.sport,
                dport: f.dport,
            },
            proto,
            tcp_flags: 0,
            frags,
            tot_len,
            l4_hdr_len: 0,
        }));
    }
    if usize::from(tot_len) < IP_LEN + l4_len {
        return Err(stat::PASS_TRUNCATED);
    }
    let ports = ptr_at::<Ports>(ctx, L4_OFF).ok_or(stat::PASS_TRUNCATED)?;
    let csum = ptr_at::<[u8; 2]>(ctx, L4_OFF + csum_off).ok_or(stat::PASS_TRUNCATED)?;
    let (tcp_flags, l4_hdr_len) = if proto == IPPROTO_TCP {
        let f = ptr_at::<[u8; 2]>(ctx, L4_OFF + 12).ok_or(stat::PASS_TRUNCATED)?;
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
    if frags & IP_MF != 0 {
        // The first fragment: its ports, for the fragments that follow.
        frag::remember(&pkt, ip, proto);
    }
    Ok(Parsed::L4(L4Packet {
        hdr: Headers {
            ip,
            ports,
            csum,
            udp: proto == IPPROTO_UDP,
            l4: true,
        },
        pkt,
        proto,
        tcp_flags,
        frags,
        tot_len,
        l4_hdr_len,
    }))
}

/// An ICMP error quoting an IPv4 header without options and the TCP or UDP ports after it.
#[inline(always)]
fn parse_icmp_error(
    ctx: &impl Packet,
    ip: *mut Ipv4Hdr,
    saddr: u32,
    daddr: u32,
    tot_len: u16,
) -> Result<IcmpError, u32> {
    let icmp = ptr_at::<[u8; ICMP_LEN]>(ctx, L4_OFF).ok_or(stat::PASS_TRUNCATED)?;
    // SAFETY: bounds-checked by ptr_at.
    let kind = unsafe { (*icmp)[0] };
    if !matches!(
        kind,
        ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM
    ) {
        return Err(stat::PASS_OTHER_PROTO);
    }
    let inner_ip = ptr_at::<Ipv4Hdr>(ctx, INNER_IP_OFF).ok_or(stat::PASS_TRUNCATED)?;
    let inner_ports = ptr_at::<Ports>(ctx, INNER_L4_OFF).ok_or(stat::PASS_TRUNCATED)?;
    // The quote must lie within the outer datagram, not in the frame's padding.
    if usize::from(tot_len) < IP_LEN + ICMP_LEN + IP_LEN + UDP_LEN {
        return Err(stat::PASS_TRUNCATED);
    }
    // SAFETY: `inner_ip` and `inner_ports` were bounds-checked by ptr_at.
    let (vihl, frags, proto, isaddr, idaddr, port_bytes) = unsafe {
        (
            (*inner_ip).vihl,
            u16::from_be_bytes((*inner_ip).frags),
            (*inner_ip).proto,
            load32((inner_ip as *const u8).add(12)),
            load32((inner_ip as *const u8).add(16)),
            load32(inner_ports as *const u8).to_ne_bytes(),
        )
    };
    // A quoted later fragment carries no ports; a quote with options is not looked into.
    if vihl != 0x45 || frags & IP_OFFSET != 0 {
        return Err(stat::PASS_ICMP_UNRELATED);
    }
    // Each offset a constant, so that the verifier sees the bounds check of the pointer used.
    const QUOTED: usize = IP_LEN + ICMP_LEN + IP_LEN;
    let inner_csum = match proto {
        IPPROTO_UDP => ptr_at::<[u8; 2]>(ctx, INNER_L4_OFF + 6),
        IPPROTO_TCP if usize::from(tot_len) >= QUOTED + 18 => {
            ptr_at::<[u8; 2]>(ctx, INNER_L4_OFF + 16)
        }
        IPPROTO_TCP => None,
        _ => return Err(stat::PASS_ICMP_UNRELATED),
    };
    Ok(IcmpError {
        ptrs: IcmpPtrs4 {
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
