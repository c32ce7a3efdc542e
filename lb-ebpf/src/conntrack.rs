//! Conntrack entries: their keys, whether a packet stays on its flow's backend (kube-proxy's
//! semantics), closing (FIN / RST) and refreshing, and direct flows that clash with a Service
//! flow's tuple.

use core::mem;

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_get_prandom_u32, maps::LruHashMap};
use lb_common::{
    config, stat, CtKeyV4, BACKEND_F_TERMINATING, CT_F_DIRECT, CT_F_FIN, CT_F_FORWARD, CT_F_REPLY,
    CT_F_RST, CT_F_SNAT, CT_REFRESH_NS, IPPROTO_TCP, SNAT_TRIES,
};

use crate::{
    clock::now_ns,
    ctx::Hook,
    family::{Backend, CtEntry, Family},
    maps::cfg_value,
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
pub(crate) fn note_close(entry: &mut impl CtEntry, tcp_flags: u8) {
    if tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        let f = if tcp_flags & TCP_RST != 0 {
            CT_F_RST
        } else {
            CT_F_FIN
        };
        if entry.flags() & f == 0 {
            *entry.flags_mut() |= f;
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
pub(crate) fn keep_flow<F: Family>(
    proto: u8,
    tcp_flags: u8,
    entry: &F::Entry,
    to: &Tuple<F::Addr>,
) -> bool {
    let new_syn = proto == IPPROTO_TCP && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if proto == IPPROTO_TCP && !new_syn {
        return true;
    }
    if new_syn && close_reply_if_closed::<F>(entry, to, proto) {
        return false;
    }
    // SAFETY: the value is read at once.
    match unsafe { F::backends().get(entry.backend_id()) } {
        Some(b) => !new_syn || b.flags() & BACKEND_F_TERMINATING == 0,
        None => false,
    }
}

/// Whether a flow has closed (a FIN or RST recorded in its forward entry or in its reply
/// entry); if so, its reply entry is removed, so that the new flow on the same tuple starts
/// clean (and an allocated SNAT port goes back to the range). Only SYNs that hit a forward
/// entry come here, so the reply lookup costs nothing on the established path.
#[inline(always)]
fn close_reply_if_closed<F: Family>(entry: &F::Entry, to: &Tuple<F::Addr>, proto: u8) -> bool {
    let reply_key = F::ct_key(to.daddr, to.saddr, to.dport, to.sport, proto);
    if entry.flags() & CT_F_SNAT != 0 {
        remove_if_closed(F::snat(), &reply_key, entry.flags())
    } else {
        remove_if_closed(F::conntrack(), &reply_key, entry.flags())
    }
}

/// `close_reply_if_closed` for the map that holds the reply entry (each call site names its
/// map, as the verifier wants).
#[inline(always)]
fn remove_if_closed<K, E: CtEntry>(
    map: &LruHashMap<K, E>,
    reply_key: &K,
    forward_flags: u16,
) -> bool {
    const CLOSED: u16 = CT_F_FIN | CT_F_RST;
    // SAFETY: the value is read at once.
    let reply_closed = unsafe { map.get(reply_key) }.is_some_and(|r| r.flags() & CLOSED != 0);
    if forward_flags & CLOSED == 0 && !reply_closed {
        return false;
    }
    let _ = map.remove(reply_key);
    true
}

#[inline(always)]
pub(crate) fn refresh(entry: &mut impl CtEntry) {
    let now = now_ns();
    let last_seen = entry.last_seen_mut();
    if now.wrapping_sub(*last_seen) > CT_REFRESH_NS {
        *last_seen = now;
    }
}

/// A packet that starts a flow of its own (a TCP SYN, a UDP datagram) to no frontend, whose
/// reply tuple a Service flow's entry holds: the client reuses a port it used for a Service,
/// now to that Service's backend directly (clients cycle through their ports within
/// seconds). The two flows' replies would be the same packets, and a reply entry must only
/// ever translate packets of the flow that created it.
/// * UDP: the Service flow's entries go (UDP has no end; its client has moved on), and the
///   direct flow passes as it is.
/// * TCP: as netfilter does with a tuple that clashes, the newer flow gets another source
///   port, and keeps it while the Service flow's entries last. The backend still holds the
///   Service connection in TIME_WAIT (60 s) on the same tuple, with the client's sequence
///   numbers and timestamps of the frontend's address, which are not those of the backend's:
///   on that tuple the direct SYN would be refused (PAWS) until TIME_WAIT ends. A forward
///   entry rewrites the port, a reply entry writes it back where the reply leaves towards the
///   client (TC egress, the last hop, so that it is translated once); the Service flow keeps
///   its entries. The port is the client's ephemeral port moved below the ephemeral range
///   (`direct_port`), so that one client port always maps to the same one and the backend
///   sees one connection after another on it.
///
/// Whether the packet was rewritten.
#[inline(always)]
pub(crate) fn remap_direct_flow<F: Family>(
    ctx: &impl Hook,
    hdr: &F::Hdr,
    pkt: &Tuple<F::Addr>,
    proto: u8,
    tcp_flags: u8,
) -> bool {
    if proto == IPPROTO_TCP && tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return false;
    }
    let reply_key = F::ct_key(pkt.daddr, pkt.saddr, pkt.dport, pkt.sport, proto);
    // SAFETY: the value is copied out at once.
    let Some(owner) = (unsafe { F::conntrack().get(&reply_key) }).copied() else {
        return false;
    };
    if owner.flags() & CT_F_REPLY == 0 || owner.flags() & CT_F_DIRECT != 0 {
        return false;
    }
    if proto != IPPROTO_TCP {
        let n = owner.nat();
        let forward_key = F::ct_key(n.daddr, n.saddr, n.dport, n.sport, proto);
        let _ = F::conntrack().remove(&forward_key);
        let _ = F::conntrack().remove(&reply_key);
        count(stat::DIRECT_FLOW_CLAIMED);
        return false;
    }
    let now = now_ns();
    let back = Tuple {
        saddr: pkt.daddr,
        daddr: pkt.saddr,
        sport: pkt.dport,
        dport: pkt.sport,
    };
    let reply = F::Entry::new(&back, 0, 0, CT_F_REPLY | CT_F_DIRECT, now);
    let port = if let Some(port) = direct_port(pkt.sport) {
        let key = F::ct_key(pkt.daddr, pkt.saddr, pkt.dport, port, proto);
        let _ = F::conntrack().insert(&key, &reply, 0);
        port
    } else if let Some(port) = reserve_port::<F>(pkt.daddr, pkt.saddr, pkt.dport, proto, &reply) {
        port
    } else {
        // No port: the Service flow keeps the tuple (counted).
        count(stat::DIRECT_FLOW_CLASH);
        return false;
    };
    let to = Tuple {
        sport: port,
        ..*pkt
    };
    let entry = F::Entry::new(&to, 0, 0, CT_F_FORWARD | CT_F_DIRECT, now);
    let _ = F::conntrack().insert(
        &F::ct_key(pkt.saddr, pkt.daddr, pkt.sport, pkt.dport, proto),
        &entry,
        0,
    );
    ctx.rewrite::<F>(hdr, pkt, &to);
    count(stat::DIRECT_FLOW_REMAPPED);
    true
}

/// Linux's default ephemeral ports (32768-60999, `ip_local_port_range`) moved down to
/// 1024-29255, one for one: a port a client does not pick for itself. Network byte order.
/// None for a port outside that range.
#[inline(always)]
fn direct_port(port_be: u16) -> Option<u16> {
    const FIRST: u16 = 32768;
    const LAST: u16 = 60999;
    const BY: u16 = FIRST - 1024;
    let p = u16::from_be(port_be);
    (FIRST..=LAST).contains(&p).then(|| (p - BY).to_be())
}

/// A new SYN on a remapped direct flow whose connection has closed: the client opens another
/// one from the same port, which keeps the same mapping; both entries are open again.
#[inline(always)]
pub(crate) fn reopen_direct<F: Family>(entry: &mut F::Entry, to: &Tuple<F::Addr>, proto: u8) {
    const CLOSED: u16 = CT_F_FIN | CT_F_RST;
    *entry.flags_mut() &= !CLOSED;
    let reply_key = F::ct_key(to.daddr, to.saddr, to.dport, to.sport, proto);
    if let Some(r) = F::conntrack().get_ptr_mut(&reply_key) {
        // SAFETY: a map value pointer returned by the kernel, valid for this program run.
        unsafe { *(*r).flags_mut() &= !CLOSED };
    }
}

/// Reserves a source port of the SNAT range for a client (`client`) of `peer:peer_port` by
/// inserting `reply` as the reply entry under it: a port another flow between them holds is
/// never taken. Network byte order.
#[inline(always)]
fn reserve_port<F: Family>(
    peer: F::Addr,
    client: F::Addr,
    peer_port: u16,
    proto: u8,
    reply: &F::Entry,
) -> Option<u16> {
    let min = cfg_value(config::SNAT_PORT_MIN);
    let max = cfg_value(config::SNAT_PORT_MAX);
    if min == 0 || max < min || max > 65535 {
        return None;
    }
    let range = max - min + 1;
    let mut key = F::ct_key(peer, client, peer_port, 0, proto);
    let mut i = 0;
    while i < SNAT_TRIES {
        // SAFETY: bpf_get_prandom_u32 has no preconditions.
        let r = unsafe { bpf_get_prandom_u32() };
        let port = ((min + r.checked_rem(range).unwrap_or(0)) as u16).to_be();
        F::set_ct_dport(&mut key, port);
        if F::conntrack()
            .insert(&key, reply, u64::from(BPF_NOEXIST))
            .is_ok()
        {
            return Some(port);
        }
        i += 1;
    }
    None
}
