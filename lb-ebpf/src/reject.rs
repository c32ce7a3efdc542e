//! Answers built from the packet in place and sent back out of the interface it came in on:
//! to a frontend without backends, TCP RST and ICMP (ICMPv6) port-unreachable; to a client
//! whose packet would not fit the route to its backend, ICMP fragmentation-needed (ICMPv6
//! packet too big), in TC and, for `lb_xdp`, in XDP.

use core::ptr;

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_SHOT},
    helpers::{
        bpf_csum_diff, bpf_redirect, bpf_skb_change_head, bpf_skb_change_tail, bpf_skb_pull_data,
        bpf_xdp_adjust_head, bpf_xdp_adjust_tail,
    },
    programs::{TcContext, XdpContext},
};
use lb_common::{stat, IPPROTO_TCP, SCOPE_ALL, SVC_F_DROP_NO_ENDPOINTS};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

use crate::{
    csum::{addr_words, csum_fold, store32, store64, sum_words},
    ctx::{load32, load64, ptr_at, Packet, TC_NEXT},
    family::{Family, V4, V6},
    parse::{
        parse, L4Packet, Parsed, ETH_LEN, ETH_P_IP_BE, HEADERS_MAX, ICMP_LEN, IPPROTO_ICMP, IP_LEN,
        L4_OFF, TCP_ACK, TCP_FIN, TCP_LEN, TCP_RST, TCP_SYN, UDP_LEN,
    },
    parse6::{
        is_ipv6, parse6, ETH_P_IPV6_BE, ICMP6_DEST_UNREACH, ICMP6_PKT_TOO_BIG, IP6_LEN,
        IP6_SRC_OFF, IPPROTO_ICMPV6, L4_OFF6,
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

/// ICMPv6 destination unreachable's code for a closed port.
const ICMP6_PORT_UNREACH: u8 = 4;
/// How much of the packet an ICMPv6 error quotes at most: all that fits IPv6's minimum MTU
/// (RFC 4443 2.4 (c)).
const QUOTE6_MAX: usize = 1280 - IP6_LEN - ICMP_LEN;
/// The bytes of a new IPv6 + ICMPv6 header put in front of the original IPv6 header.
const ICMP6_GROW: usize = IP6_LEN + ICMP_LEN;

/// The answers of one family.
trait Answers: Family {
    /// Turns a TCP segment into the RST a closed port sends.
    fn rst(ctx: &TcContext, l: &L4Packet<Self>) -> bool;
    /// Turns a datagram into the ICMP port-unreachable a closed port sends.
    fn port_unreachable(ctx: &TcContext, l: &L4Packet<Self>) -> bool;
}

impl Answers for V4 {
    #[inline(always)]
    fn rst(ctx: &TcContext, l: &L4Packet<V4>) -> bool {
        build_rst(ctx, l.tcp_flags)
    }
    #[inline(always)]
    fn port_unreachable(ctx: &TcContext, _l: &L4Packet<V4>) -> bool {
        build_icmp_error(ctx, ICMP_PORT_UNREACH, 0)
    }
}

impl Answers for V6 {
    #[inline(always)]
    fn rst(ctx: &TcContext, l: &L4Packet<V6>) -> bool {
        build_rst6(ctx, l.hdr.l4_off, l.tcp_flags, l.tot_len)
    }
    #[inline(always)]
    fn port_unreachable(ctx: &TcContext, l: &L4Packet<V6>) -> bool {
        build_icmp6_error(
            ctx,
            ICMP6_DEST_UNREACH,
            ICMP6_PORT_UNREACH,
            0,
            quote6(l.tot_len),
        )
    }
}

/// What an ICMPv6 error about a datagram of `tot_len` bytes quotes of it.
#[inline(always)]
fn quote6(tot_len: u16) -> usize {
    let len = usize::from(tot_len);
    if len < QUOTE6_MAX {
        len
    } else {
        QUOTE6_MAX
    }
}

/// Answers a packet to a frontend without backends; passes everything else.
#[inline(always)]
pub(crate) fn reject(ctx: &TcContext) -> i32 {
    pull_headers(ctx);
    if is_ipv6(ctx) {
        match parse6(ctx) {
            Ok(Parsed::L4(l)) => reject_family::<V6>(ctx, &l),
            _ => TC_NEXT,
        }
    } else {
        match parse(ctx) {
            Ok(Parsed::L4(l)) => reject_family::<V4>(ctx, &l),
            _ => TC_NEXT,
        }
    }
}

/// `reject` for one family.
#[inline(always)]
fn reject_family<F: Answers>(ctx: &TcContext, l: &L4Packet<F>) -> i32 {
    let (pkt, proto, tcp_flags) = (&l.pkt, l.proto, l.tcp_flags);
    if l.later_fragment() {
        // A later fragment: its first fragment got the answer.
        return TC_NEXT;
    }
    let svc_key = F::svc_key(pkt.daddr, pkt.dport, proto, SCOPE_ALL);
    // SAFETY: the value is copied out at once.
    let Some(svc) = (unsafe { F::services().get(&svc_key) }).copied() else {
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
        F::rst(ctx, l)
    } else {
        F::port_unreachable(ctx, l)
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
/// fragmentation-needed (ICMPv6 packet too big) and the route's MTU, from TC.
#[inline(always)]
pub(crate) fn tc_frag_needed(ctx: &TcContext, mtu: u16) -> i32 {
    let built = if is_ipv6(ctx) {
        // Packets that big quote all they may.
        build_icmp6_error(ctx, ICMP6_PKT_TOO_BIG, 0, u32::from(mtu), QUOTE6_MAX)
    } else {
        build_icmp_error(ctx, ICMP_FRAG_NEEDED, mtu)
    };
    if !built {
        return TC_ACT_SHOT;
    }
    count(stat::FRAG_NEEDED_SENT);
    send_back(ctx)
}

/// The same from XDP: the frame is turned into the answer and sent back (XDP_TX).
#[inline(always)]
pub(crate) fn xdp_frag_needed(ctx: &XdpContext, mtu: u16) -> u32 {
    if is_ipv6(ctx) {
        return xdp_pkt_too_big(ctx, mtu);
    }
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

/// ICMPv6 packet too big from XDP: the frame is turned into the answer (quoting the first
/// `QUOTE6_MAX` bytes of the datagram, which is longer: only datagrams above IPv6's minimum
/// MTU are checked) and sent back (XDP_TX).
#[inline(always)]
fn xdp_pkt_too_big(ctx: &XdpContext, mtu: u16) -> u32 {
    const REPLY: usize = L4_OFF6 + ICMP_LEN + QUOTE6_MAX;
    let len = ctx.data_end() - ctx.data();
    if len + ICMP6_GROW < REPLY {
        return xdp_action::XDP_DROP;
    }
    // Room in front for the new IPv6 + ICMPv6 headers: the original IPv6 header then sits
    // where the ICMPv6 payload goes; the tail is cut after the quote.
    // SAFETY: the context is the program's own.
    let grown = unsafe { bpf_xdp_adjust_head(ctx.ctx, -(ICMP6_GROW as i32)) } == 0
        && unsafe { bpf_xdp_adjust_tail(ctx.ctx, REPLY as i32 - (len + ICMP6_GROW) as i32) } == 0;
    if !grown || !write_icmp6_error(ctx, ICMP6_PKT_TOO_BIG, 0, u32::from(mtu), QUOTE6_MAX) {
        return xdp_action::XDP_DROP;
    }
    count(stat::FRAG_NEEDED_SENT);
    xdp_action::XDP_TX
}

/// `build_rst` for IPv6: the TCP header at `l4_off` (after any extension headers, which the
/// answer does not carry), the datagram `tot_len` bytes. The Ethernet and IPv6 headers are
/// turned around where they are.
#[inline(always)]
fn build_rst6(ctx: &TcContext, l4_off: usize, in_flags: u8, tot_len: u16) -> bool {
    let Some(tcp) = ptr_at::<[u8; TCP_LEN]>(ctx, l4_off) else {
        return false;
    };
    // SAFETY: bounds-checked by ptr_at.
    let (ports, seq_in, ack_in, doff) = unsafe {
        let t = tcp as *const u8;
        (
            load32(t),
            u32::from_be_bytes([(*tcp)[4], (*tcp)[5], (*tcp)[6], (*tcp)[7]]),
            load32(t.add(8)),
            (*tcp)[12] >> 4,
        )
    };
    let headers = (l4_off - ETH_LEN) as u32 + u32::from(doff) * 4;
    let payload = u32::from(tot_len).saturating_sub(headers);
    let (seq, ack, flags) = if in_flags & TCP_ACK != 0 {
        (ack_in, 0, TCP_RST)
    } else {
        let syn_fin = u32::from(in_flags & TCP_SYN != 0) + u32::from(in_flags & TCP_FIN != 0);
        (
            0,
            seq_in.wrapping_add(payload + syn_fin).to_be(),
            TCP_RST | TCP_ACK,
        )
    };
    if !resize(ctx, L4_OFF6 + TCP_LEN) {
        return false;
    }
    let (Some(eth), Some(ip), Some(tcp)) = (
        ptr_at::<EthHdr>(ctx, 0),
        ptr_at::<Ipv6Hdr>(ctx, ETH_LEN),
        ptr_at::<[u8; TCP_LEN]>(ctx, L4_OFF6),
    ) else {
        return false;
    };
    // SAFETY: all three were bounds-checked by ptr_at after the resize.
    unsafe {
        let (dst, src) = ((*eth).dst_addr, (*eth).src_addr);
        (*eth).dst_addr = src;
        (*eth).src_addr = dst;
        turn_ipv6(ip, IPPROTO_TCP, TCP_LEN as u16);
        let t = tcp.cast::<u8>();
        // The ports the other way round.
        store32(t, ports.rotate_left(16));
        store32(t.add(4), seq);
        store32(t.add(8), ack);
        store32(t.add(12), u32::from_ne_bytes([0x50, flags, 0, 0]));
        store32(t.add(16), 0);
    }
    let (Some(addrs), Some(seg)) = (
        sum_packet(ctx, IP6_SRC_OFF, 32),
        sum_packet(ctx, L4_OFF6, TCP_LEN),
    ) else {
        return false;
    };
    set_csum(
        ctx,
        L4_OFF6 + 16,
        addrs + seg + pseudo6_rest(IPPROTO_TCP, TCP_LEN),
    )
}

/// Turns an IPv6 packet into an ICMPv6 error of `kind` and `code` (RFC 4443: the header's
/// last four bytes hold `info`, the MTU of a packet too big; the first `quote` bytes of the
/// original datagram follow), from TC.
#[inline(always)]
fn build_icmp6_error(ctx: &TcContext, kind: u8, code: u8, info: u32, quote: usize) -> bool {
    // Room for the new IPv6 + ICMPv6 headers in front: the original IPv6 header then sits
    // where the quote goes.
    // SAFETY: ctx.skb.skb is the program's own context.
    if unsafe { bpf_skb_change_head(ctx.skb.skb.cast(), ICMP6_GROW as u32, 0) } != 0 {
        return false;
    }
    resize(ctx, L4_OFF6 + ICMP_LEN + quote) && write_icmp6_error(ctx, kind, code, info, quote)
}

/// Fills in a frame that holds, `ICMP6_GROW` bytes in, the original frame, of whose datagram
/// `quote` bytes are left (at most `QUOTE6_MAX`): Ethernet back to the sender, a fresh IPv6
/// header from the original destination to the original source, and the ICMPv6 header with
/// its checksum (over a pseudo-header and the whole message). Everything is copied from the
/// original headers where they are, front to back: the new IPv6 header's end overwrites the
/// original Ethernet header once it has been read. False if the frame is not as long.
#[inline(always)]
fn write_icmp6_error(ctx: &impl Packet, kind: u8, code: u8, info: u32, quote: usize) -> bool {
    const ORIG_ETH: usize = ICMP6_GROW;
    const ORIG_IP: usize = ORIG_ETH + ETH_LEN;
    let (Some(eth), Some(orig_eth), Some(ip), Some(orig_ip), Some(icmp)) = (
        ptr_at::<EthHdr>(ctx, 0),
        ptr_at::<EthHdr>(ctx, ORIG_ETH),
        ptr_at::<Ipv6Hdr>(ctx, ETH_LEN),
        ptr_at::<Ipv6Hdr>(ctx, ORIG_IP),
        ptr_at::<[u8; ICMP_LEN]>(ctx, L4_OFF6),
    ) else {
        return false;
    };
    let len = ICMP_LEN + quote;
    // SAFETY: all five were bounds-checked by ptr_at; the copies between them do not overlap
    // (see above).
    unsafe {
        (*eth).dst_addr = (*orig_eth).src_addr;
        (*eth).src_addr = (*orig_eth).dst_addr;
        (*eth).ether_type = ETH_P_IPV6_BE;
        let (o, n) = (orig_ip as *const u8, ip.cast::<u8>());
        store64(n.add(8), load64(o.add(24)));
        store64(n.add(16), load64(o.add(32)));
        store64(n.add(24), load64(o.add(8)));
        store64(n.add(32), load64(o.add(16)));
        let h = &mut *ip;
        h.vcf = [0x60, 0, 0, 0];
        h.payload_len = (len as u16).to_be_bytes();
        h.next_hdr = IPPROTO_ICMPV6;
        h.hop_limit = 64;
        let i = info.to_be_bytes();
        *icmp = [kind, code, 0, 0, i[0], i[1], i[2], i[3]];
    }
    let (Some(addrs), Some(body)) = (
        sum_packet(ctx, IP6_SRC_OFF, 32),
        sum_packet(ctx, L4_OFF6, len),
    ) else {
        return false;
    };
    set_csum(
        ctx,
        L4_OFF6 + 2,
        addrs + body + pseudo6_rest(IPPROTO_ICMPV6, len),
    )
}

/// Turns an IPv6 header around in place (source and destination swapped, no extension
/// headers, hop limit 64) for an answer of `len` bytes of `next`.
///
/// # Safety
/// `ip` must point to a bounds-checked IPv6 header.
#[inline(always)]
unsafe fn turn_ipv6(ip: *mut Ipv6Hdr, next: u8, len: u16) {
    // SAFETY: guaranteed by the caller.
    unsafe {
        let p = ip.cast::<u8>();
        let (s0, s1, d0, d1) = (
            load64(p.add(8)),
            load64(p.add(16)),
            load64(p.add(24)),
            load64(p.add(32)),
        );
        store64(p.add(8), d0);
        store64(p.add(16), d1);
        store64(p.add(24), s0);
        store64(p.add(32), s1);
        let h = &mut *ip;
        h.vcf = [0x60, 0, 0, 0];
        h.payload_len = len.to_be_bytes();
        h.next_hdr = next;
        h.hop_limit = 64;
    }
}

/// The rest of an IPv6 pseudo-header's sum (RFC 8200 8.1) after the addresses: the
/// upper-layer length and next header, in memory order as `sum_words` sums.
#[inline(always)]
fn pseudo6_rest(next: u8, len: usize) -> u64 {
    let l = (len as u32).to_be_bytes();
    u64::from(u16::from_ne_bytes([l[0], l[1]]))
        + u64::from(u16::from_ne_bytes([l[2], l[3]]))
        + u64::from(u16::from_ne_bytes([0, next]))
}

/// Writes the checksum of `sum` (unfolded, zero in the field when summed) at `off`.
#[inline(always)]
fn set_csum(ctx: &impl Packet, off: usize, sum: u64) -> bool {
    let Some(c) = ptr_at::<[u8; 2]>(ctx, off) else {
        return false;
    };
    // SAFETY: bounds-checked by ptr_at.
    unsafe { *c = (!csum_fold(sum)).to_ne_bytes() };
    true
}

/// The one's complement sum (unfolded, in memory order) of the `len` bytes at `off`, at
/// most `ICMP_LEN + QUOTE6_MAX` of them, an odd last byte padded with zero; None if they are
/// not all in the linear data. In blocks of the binary digits of `len`, each bounds-checked
/// at its own constant size and summed by `bpf_csum_diff` (512 bytes at most a call); every
/// block but the last is a multiple of 4 long, so each starts at an even offset.
#[inline(always)]
fn sum_packet(ctx: &impl Packet, off: usize, len: usize) -> Option<u64> {
    if len > ICMP_LEN + QUOTE6_MAX {
        return None;
    }
    let mut at = off;
    let mut left = len;
    let mut sum = block::<512>(ctx, &mut at, &mut left)?;
    sum += block::<512>(ctx, &mut at, &mut left)?;
    sum += block::<256>(ctx, &mut at, &mut left)?;
    sum += block::<128>(ctx, &mut at, &mut left)?;
    sum += block::<64>(ctx, &mut at, &mut left)?;
    sum += block::<32>(ctx, &mut at, &mut left)?;
    sum += block::<16>(ctx, &mut at, &mut left)?;
    sum += block::<8>(ctx, &mut at, &mut left)?;
    sum += block::<4>(ctx, &mut at, &mut left)?;
    if left >= 2 {
        let p = ptr_at::<[u8; 2]>(ctx, at)?;
        // SAFETY: bounds-checked by ptr_at.
        sum += u64::from(u16::from_ne_bytes(unsafe { *p }));
        at += 2;
        left -= 2;
    }
    if left == 1 {
        let p = ptr_at::<u8>(ctx, at)?;
        // SAFETY: bounds-checked by ptr_at.
        sum += u64::from(u16::from_ne_bytes([unsafe { *p }, 0]));
    }
    Some(sum)
}

/// One block of `sum_packet`: `N` bytes at `at`, if at least that many are left.
#[inline(always)]
fn block<const N: usize>(ctx: &impl Packet, at: &mut usize, left: &mut usize) -> Option<u64> {
    if *left < N {
        return Some(0);
    }
    let p = ptr_at::<[u8; N]>(ctx, *at)?;
    // SAFETY: `p .. p + N` was bounds-checked by ptr_at; N is a multiple of 4 and at most
    // 512, as the helper wants; nothing is written.
    let s = unsafe { bpf_csum_diff(ptr::null_mut(), 0, p.cast(), N as u32, 0) };
    if s < 0 {
        return None;
    }
    *at += N;
    *left -= N;
    Some(u64::from(s as u32))
}
