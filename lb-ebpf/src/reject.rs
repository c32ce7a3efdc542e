//! Answers built from the packet in place and sent back out of the interface it came in on:
//! to a frontend without backends, TCP RST and ICMP port-unreachable; to a client whose
//! packet would not fit the route to its backend, ICMP fragmentation-needed (in TC and, for
//! `lb_xdp`, in XDP).

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_SHOT},
    helpers::{
        bpf_redirect, bpf_skb_change_head, bpf_skb_change_tail, bpf_skb_pull_data,
        bpf_xdp_adjust_head, bpf_xdp_adjust_tail,
    },
    programs::{TcContext, XdpContext},
};
use lb_common::{stat, ServiceKeyV4, IPPROTO_TCP, SCOPE_ALL, SVC_F_DROP_NO_ENDPOINTS};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{
    csum::{addr_words, csum_fold, sum_words},
    ctx::{ptr_at, TC_NEXT},
    maps::LB4_SERVICES,
    parse::{
        parse, L4Packet, Parsed, ETH_LEN, ETH_P_IP_BE, HEADERS_MAX, ICMP_LEN, IPPROTO_ICMP, IP_LEN,
        L4_OFF, TCP_ACK, TCP_FIN, TCP_LEN, TCP_RST, TCP_SYN, UDP_LEN,
    },
    telemetry::{count, count_service},
};

/// The longest reply built here: Ethernet + IPv4 + ICMP + the original IPv4 header and the
/// first 8 bytes of its payload (RFC 792).
const REPLY_MAX: usize = ETH_LEN + IP_LEN + ICMP_LEN + IP_LEN + UDP_LEN;
/// The bytes of a new IPv4 + ICMP header put in front of the original IPv4 header.
const ICMP_GROW: usize = IP_LEN + ICMP_LEN;

/// ICMP destination unreachable, and its codes the datapath sends.
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
pub(crate) const ICMP_FRAG_NEEDED: u8 = 4;

/// Answers a packet to a frontend without backends; passes everything else.
#[inline(always)]
pub(crate) fn reject(ctx: &TcContext) -> i32 {
    pull_headers(ctx);
    let Ok(Parsed::L4(L4Packet {
        hdr,
        pkt,
        proto,
        tcp_flags,
        ..
    })) = parse(ctx)
    else {
        return TC_NEXT;
    };
    if !hdr.l4 {
        // A later fragment: its first fragment got the answer.
        return TC_NEXT;
    }
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
    count_service(svc.svc_id, u64::from(ctx.len()), false, true);
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
        build_icmp_error(ctx, ICMP_PORT_UNREACH, 0)
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
    send_back(ctx)
}

/// Makes the headers the programs read linear for direct access (a no-op when they are
/// already; a frame shorter than them is pulled whole).
#[inline(always)]
pub(crate) fn pull_headers(ctx: &TcContext) {
    let len = if (ctx.len() as usize) < HEADERS_MAX {
        ctx.len()
    } else {
        HEADERS_MAX as u32
    };
    // SAFETY: ctx.skb.skb is the program's own context.
    unsafe { bpf_skb_pull_data(ctx.skb.skb.cast(), len) };
}

/// Sends a frame built in place back out of the interface it came in on.
#[inline(always)]
pub(crate) fn send_back(ctx: &TcContext) -> i32 {
    // SAFETY: bpf_redirect has no memory preconditions; the context is the program's own.
    unsafe { bpf_redirect((*ctx.skb.skb).ifindex, 0) as i32 }
}

/// Answers a client whose packet (DF set) would not fit the route to its backend with ICMP
/// fragmentation-needed and the route's MTU, from TC.
#[inline(always)]
pub(crate) fn tc_frag_needed(ctx: &TcContext, mtu: u16) -> i32 {
    if !build_icmp_error(ctx, ICMP_FRAG_NEEDED, mtu) {
        return TC_ACT_SHOT;
    }
    count(stat::FRAG_NEEDED_SENT);
    send_back(ctx)
}

/// The same from XDP: the frame is turned into the answer and sent back (XDP_TX).
#[inline(always)]
pub(crate) fn xdp_frag_needed(ctx: &XdpContext, mtu: u16) -> u32 {
    let (Some(eth), Some(ip)) = (ptr_at::<EthHdr>(ctx, 0), ptr_at::<Ipv4Hdr>(ctx, ETH_LEN)) else {
        return xdp_action::XDP_DROP;
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
    let len = ctx.data_end() - ctx.data();
    if len < ETH_LEN + IP_LEN + UDP_LEN {
        return xdp_action::XDP_DROP;
    }
    // Room in front for the new IPv4 + ICMP headers: the original IPv4 header then sits
    // where the ICMP payload goes; the tail is cut after its first 8 bytes of payload.
    // SAFETY: the context is the program's own.
    let grown = unsafe { bpf_xdp_adjust_head(ctx.ctx, -(ICMP_GROW as i32)) } == 0
        && unsafe { bpf_xdp_adjust_tail(ctx.ctx, REPLY_MAX as i32 - (len + ICMP_GROW) as i32) }
            == 0;
    if !grown {
        return xdp_action::XDP_DROP;
    }
    let (Some(eth), Some(ip), Some(icmp)) = (
        ptr_at::<EthHdr>(ctx, 0),
        ptr_at::<Ipv4Hdr>(ctx, ETH_LEN),
        ptr_at::<[u8; ICMP_LEN + IP_LEN + UDP_LEN]>(ctx, L4_OFF),
    ) else {
        return xdp_action::XDP_DROP;
    };
    // SAFETY: all three were bounds-checked by ptr_at after the resize.
    unsafe {
        write_icmp_error(
            eth,
            ip,
            icmp,
            (mac_dst, mac_src, saddr, daddr),
            ICMP_FRAG_NEEDED,
            mtu,
        );
    }
    count(stat::FRAG_NEEDED_SENT);
    xdp_action::XDP_TX
}

/// Sets the frame length to `len` and makes it linear.
#[inline(always)]
fn resize(ctx: &TcContext, len: usize) -> bool {
    let skb = ctx.skb.skb.cast();
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
            u32::from(u16::from_be_bytes((*ip).tot_len)),
            *tcp,
        )
    };
    let doff = u32::from(hdr[12] >> 4) * 4;
    let payload = tot_len.saturating_sub(IP_LEN as u32 + doff);
    let in_seq = u32::from_be_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
    let (seq, ack, flags) = if in_flags & TCP_ACK != 0 {
        ([hdr[8], hdr[9], hdr[10], hdr[11]], [0u8; 4], TCP_RST)
    } else {
        let syn_fin = u32::from(in_flags & TCP_SYN != 0) + u32::from(in_flags & TCP_FIN != 0);
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
            + u64::from(u16::from_ne_bytes([0, IPPROTO_TCP]))
            + u64::from(u16::from_ne_bytes((TCP_LEN as u16).to_be_bytes()))
            + sum_words::<{ TCP_LEN / 2 }>(tcp as *const u8);
        let c = (!csum_fold(sum)).to_ne_bytes();
        t[16] = c[0];
        t[17] = c[1];
    }
    true
}

/// Turns a packet into an ICMP destination-unreachable of `code` (RFC 792: the original IPv4
/// header and the first 8 bytes of its payload follow the ICMP header; `mtu`, for
/// fragmentation-needed, in the header's last two bytes, RFC 1191).
#[inline(always)]
fn build_icmp_error(ctx: &TcContext, code: u8, mtu: u16) -> bool {
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
    // Room for the new IPv4 + ICMP headers in front: the original IPv4 header and the first
    // 8 bytes of its payload then sit exactly where the ICMP payload goes.
    // SAFETY: ctx.skb.skb is the program's own context.
    if unsafe { bpf_skb_change_head(ctx.skb.skb.cast(), ICMP_GROW as u32, 0) } != 0 {
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
    unsafe { write_icmp_error(eth, ip, icmp, (mac_dst, mac_src, saddr, daddr), code, mtu) };
    true
}

/// Fills in a frame whose ICMP payload (the original IPv4 header and 8 bytes) is in place:
/// Ethernet back to the sender, a fresh IPv4 header from the original destination to the
/// original source, and the ICMP header with its checksum.
///
/// # Safety
/// The three pointers must be bounds-checked, for the frame as it is now.
#[inline(always)]
unsafe fn write_icmp_error(
    eth: *mut EthHdr,
    ip: *mut Ipv4Hdr,
    icmp: *mut [u8; ICMP_LEN + IP_LEN + UDP_LEN],
    (mac_dst, mac_src, saddr, daddr): ([u8; 6], [u8; 6], [u8; 4], [u8; 4]),
    code: u8,
    mtu: u16,
) {
    // SAFETY: guaranteed by the caller.
    unsafe {
        (*eth).dst_addr = mac_src;
        (*eth).src_addr = mac_dst;
        (*eth).ether_type = ETH_P_IP_BE;
        write_ipv4(ip, daddr, saddr, IPPROTO_ICMP, (REPLY_MAX - ETH_LEN) as u16);
        let m = &mut *icmp;
        let mtu = mtu.to_be_bytes();
        m[..ICMP_LEN].copy_from_slice(&[ICMP_DEST_UNREACH, code, 0, 0, 0, 0, mtu[0], mtu[1]]);
        let sum = sum_words::<{ (ICMP_LEN + IP_LEN + UDP_LEN) / 2 }>(icmp as *const u8);
        let c = (!csum_fold(sum)).to_ne_bytes();
        m[2] = c[0];
        m[3] = c[1];
    }
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
