//! Answers to packets for a frontend without backends, built from the packet in place: TCP
//! with RST, UDP with ICMP port-unreachable, sent back out of the interface they came in on.

use aya_ebpf::{
    bindings::TC_ACT_SHOT,
    helpers::{bpf_redirect, bpf_skb_change_head, bpf_skb_change_tail, bpf_skb_pull_data},
    programs::TcContext,
};
use lb_common::{stat, ServiceKeyV4, IPPROTO_TCP, SCOPE_ALL, SVC_F_DROP_NO_ENDPOINTS};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{
    csum::{addr_words, csum_fold, sum_words},
    ctx::{ptr_at, TC_NEXT},
    maps::LB4_SERVICES,
    parse::{
        parse, Parsed, ETH_LEN, ETH_P_IP_BE, IP_LEN, L4_OFF, TCP_ACK, TCP_FIN, TCP_LEN, TCP_RST,
        TCP_SYN, UDP_LEN,
    },
    telemetry::{count, count_service},
};

const ICMP_LEN: usize = 8;
const IPPROTO_ICMP: u8 = 1;

/// The longest reply built here: Ethernet + IPv4 + ICMP + the original IPv4 + UDP headers.
const REPLY_MAX: usize = ETH_LEN + IP_LEN + ICMP_LEN + IP_LEN + UDP_LEN;

/// Answers a packet to a frontend without backends; passes everything else.
#[inline(always)]
pub(crate) fn reject(ctx: &TcContext) -> i32 {
    // Make the headers linear for direct access (no-op when they are already).
    let len = if (ctx.len() as usize) < REPLY_MAX {
        ctx.len()
    } else {
        REPLY_MAX as u32
    };
    // SAFETY: ctx.skb.skb is the program's own context.
    unsafe { bpf_skb_pull_data(ctx.skb.skb.cast(), len) };
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
    if unsafe { bpf_skb_change_head(ctx.skb.skb.cast(), GROW, 0) } != 0 {
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
