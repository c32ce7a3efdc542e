//! Conntrack entries: their keys, whether a packet stays on its flow's backend (kube-proxy's
//! semantics), closing (FIN / RST) and refreshing.

use core::mem;

use aya_ebpf::maps::LruHashMap;
use lb_common::{
    stat, CtEntryV4, CtKeyV4, BACKEND_F_TERMINATING, CT_F_FIN, CT_F_FORWARD, CT_F_REPLY, CT_F_RST,
    CT_F_SNAT, CT_REFRESH_NS, IPPROTO_TCP,
};

use crate::{
    clock::now_ns,
    maps::{LB4_BACKENDS, LB4_CONNTRACK, LB4_SNAT},
    parse::{Tuple, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    telemetry::count,
};

/// A conntrack key, written as four words: field by field, the compiler zeroes the padding
/// with a call to `memset`.
#[inline(always)]
pub(crate) fn conntrack_key(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> CtKeyV4 {
    let words = [
        saddr,
        daddr,
        u32::from_ne_bytes(port_pair(sport, dport)),
        u32::from(proto),
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

const _: () = assert!(size_of::<CtKeyV4>() == 16 && cfg!(target_endian = "little"));

/// Records a FIN or RST in a conntrack entry's direction; the agent removes flows that have
/// closed (FIN both ways, or a RST) once they are quiet.
#[inline(always)]
pub(crate) fn note_close(entry: &mut CtEntryV4, tcp_flags: u8) {
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
pub(crate) fn keep_flow(proto: u8, tcp_flags: u8, entry: &CtEntryV4, to: &Tuple) -> bool {
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
pub(crate) fn refresh(entry: &mut CtEntryV4) {
    let now = now_ns();
    if now.wrapping_sub(entry.last_seen_ns) > CT_REFRESH_NS {
        entry.last_seen_ns = now;
    }
}

/// A packet that starts a flow of its own (a TCP SYN, a UDP datagram) to no frontend, whose
/// reply tuple is the reply entry of a Service flow: the client reuses a port it used for a
/// Service, now to that Service's backend directly (clients cycle through their ports within
/// seconds). The replies of the two flows are the same packets; the newer flow owns the tuple,
/// as in the kernel's conntrack, so the Service flow's entries go and the direct flow's
/// replies are not rewritten to the frontend. A reply entry only ever translates packets of
/// the flow that created it.
#[inline(always)]
pub(crate) fn claim_direct_flow(pkt: &Tuple, proto: u8, tcp_flags: u8) {
    if proto == IPPROTO_TCP && tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return;
    }
    let reply_key = conntrack_key(pkt.daddr, pkt.saddr, pkt.dport, pkt.sport, proto);
    // SAFETY: the value is copied out at once.
    let Some(reply) = (unsafe { LB4_CONNTRACK.get(&reply_key) }).copied() else {
        return;
    };
    if reply.flags & CT_F_REPLY == 0 {
        return;
    }
    // The Service flow's forward entry, if it still leads to this tuple.
    let forward_key = conntrack_key(
        reply.nat_daddr,
        reply.nat_saddr,
        reply.nat_dport,
        reply.nat_sport,
        proto,
    );
    // SAFETY: as above.
    let ours = unsafe { LB4_CONNTRACK.get(&forward_key) }.is_some_and(|f| {
        f.flags & CT_F_FORWARD != 0
            && f.nat_saddr == pkt.saddr
            && f.nat_daddr == pkt.daddr
            && f.nat_sport == pkt.sport
            && f.nat_dport == pkt.dport
    });
    if ours {
        let _ = LB4_CONNTRACK.remove(&forward_key);
    }
    let _ = LB4_CONNTRACK.remove(&reply_key);
    count(stat::DIRECT_FLOW_CLAIMED);
}
