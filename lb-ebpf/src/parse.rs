//! Header parsing: Ethernet + IPv4 (no options, no fragments) + TCP/UDP into `Parsed`, with
//! the header lengths and offsets the rest of the datapath uses.

use lb_common::{stat, IPPROTO_TCP, IPPROTO_UDP};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::ctx::{load32, ptr_at, Packet};

pub(crate) const ETH_LEN: usize = size_of::<EthHdr>();
pub(crate) const IP_LEN: usize = size_of::<Ipv4Hdr>();
pub(crate) const L4_OFF: usize = ETH_LEN + IP_LEN;
pub(crate) const TCP_LEN: usize = 20;
pub(crate) const UDP_LEN: usize = 8;

pub(crate) const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
/// Offsets in a frame with an IPv4 header without options.
pub(crate) const IP_CSUM_OFF: usize = ETH_LEN + 10;
pub(crate) const IP_SRC_OFF: usize = ETH_LEN + 12;
pub(crate) const IP_DST_OFF: usize = ETH_LEN + 16;
pub(crate) const TCP_CSUM_OFF: usize = L4_OFF + 16;
pub(crate) const UDP_CSUM_OFF: usize = L4_OFF + 6;

pub(crate) const TCP_FIN: u8 = 0x01;
pub(crate) const TCP_SYN: u8 = 0x02;
pub(crate) const TCP_RST: u8 = 0x04;
pub(crate) const TCP_ACK: u8 = 0x10;

/// A TCP or UDP header's first four bytes.
#[repr(C)]
pub(crate) struct Ports {
    pub(crate) src: [u8; 2],
    pub(crate) dst: [u8; 2],
}

/// The addresses and ports of a packet (network byte order, as stored in the headers).
#[derive(Clone, Copy)]
pub(crate) struct Tuple {
    pub(crate) saddr: u32,
    pub(crate) daddr: u32,
    pub(crate) sport: u16,
    pub(crate) dport: u16,
}

/// Bounds-checked pointers into the current packet's headers.
pub(crate) struct Headers {
    pub(crate) ip: *mut Ipv4Hdr,
    pub(crate) ports: *mut Ports,
    pub(crate) csum: *mut [u8; 2],
    pub(crate) udp: bool,
}

/// An IPv4 TCP or UDP packet the datapath may translate.
pub(crate) struct Parsed {
    pub(crate) hdr: Headers,
    pub(crate) pkt: Tuple,
    pub(crate) proto: u8,
    pub(crate) tcp_flags: u8,
}

/// Parses Ethernet + IPv4 (no options, not a fragment) + TCP/UDP headers. Anything else is
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
