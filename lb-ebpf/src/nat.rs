//! The translation every ingress program runs (`process`): reverse NAT and DNAT of flows in
//! conntrack, replies to source-NATed flows, new flows to a frontend (backend choice,
//! hairpin, source NAT), fragments like their first, ICMP errors like their flow; the TC
//! programs' wrapper around it (`tc_translate`); and the reverse NAT where packets leave
//! towards a pod or the outside (`tc_egress`), whatever link the reply came in by.

use aya_ebpf::{bindings::TC_ACT_SHOT, programs::TcContext};
use lb_common::{
    stat, AffinityEntry, BACKEND_F_LOCAL, CT_F_DIRECT, CT_F_FORWARD, CT_F_HAIRPIN, CT_F_REPLY,
    CT_F_REPORTED, CT_F_SNAT, FLOW_CLOSED, FLOW_NEW, SCOPE_ALL, SCOPE_PODS,
    SVC_F_DROP_NO_ENDPOINTS, SVC_F_POD_SCOPE, SVC_F_SOURCE_RANGES,
};

use crate::{
    clock::now_ns,
    conntrack::{keep_flow, note_close, refresh, remap_direct_flow, reopen_direct},
    ctx::{Hook, Packet, Skb, Verdict, TC_NEXT},
    family::{Backend, CtEntry, Family, V4, V6},
    icmp::translate_error,
    parse::{parse, L4Packet, Parsed, Tuple, IP_DF, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    parse6::{is_ipv6, parse6},
    reject::{pull_headers, reject, tc_frag_needed},
    select::{maglev_backend, random_backend_for, sticky_backend_for},
    snat::{snat_port, snat_reply},
    telemetry::{count, count_backend, count_service, pass, sample_flow},
};

/// The TC ingress programs' translation: rewrites through the checksum helpers, rejects and
/// fragmentation-needed answered in place.
#[inline(always)]
pub(crate) fn tc_translate<const POD: bool>(skb: &Skb<'_, POD>) -> i32 {
    pull_headers(skb.0);
    match process(skb) {
        Verdict::Pass => TC_NEXT,
        Verdict::Drop => TC_ACT_SHOT,
        Verdict::Reject => tc_reject(skb.0),
        Verdict::FragNeeded(mtu) => tc_too_big(skb.0, mtu),
    }
}

/// `reject` as a call of its own (see `process`).
#[inline(never)]
fn tc_reject(ctx: &TcContext) -> i32 {
    reject(ctx)
}

/// `tc_frag_needed` as a call of its own (see `process`).
#[inline(never)]
fn tc_too_big(ctx: &TcContext, mtu: u16) -> i32 {
    tc_frag_needed(ctx, mtu)
}

/// Where packets leave towards a pod or the outside (TC egress of pod and external
/// interfaces): a reply of a flow translated on this node gets its frontend back as source,
/// and an ICMP error of such a flow is translated, whichever link they came in by (an
/// Ethernet uplink, a VXLAN or IPIP device, WireGuard, the node's own stack answering for a
/// host-network endpoint). Only translations that keep the destination happen here; one that
/// changes it (hairpin, source NAT) is made where the packet comes in, before routing. A
/// packet translated there already finds nothing more to do. Passes are not counted here:
/// every packet was counted where it came in.
#[inline(always)]
pub(crate) fn tc_egress(skb: &Skb<'_, false>) -> i32 {
    pull_headers(skb.0);
    if is_ipv6(skb) {
        egress::<V6>(skb, parse6(skb));
    } else {
        egress::<V4>(skb, parse(skb));
    }
    TC_NEXT
}

/// `tc_egress` for one family.
#[inline(always)]
fn egress<F: Family>(skb: &Skb<'_, false>, parsed: Result<Parsed<F>, u32>) {
    match parsed {
        Ok(Parsed::L4(l)) => reverse_nat_egress(skb, &l),
        Ok(Parsed::IcmpError(e)) => {
            translate_error(&e, true);
        }
        Err(_) => {}
    }
}

/// A reply whose conntrack entry restores its source only.
#[inline(always)]
fn reverse_nat_egress<F: Family>(skb: &Skb<'_, false>, l: &L4Packet<F>) {
    let pkt = &l.pkt;
    let key = F::ct_key(pkt.saddr, pkt.daddr, pkt.sport, pkt.dport, l.proto);
    let Some(entry) = F::conntrack().get_ptr_mut(&key) else {
        return;
    };
    // SAFETY: a map value pointer returned by the kernel, valid for this program run.
    let entry = unsafe { &mut *entry };
    let to = entry.nat();
    // The destination address stays (a remapped direct flow's port may change back: routing
    // does not look at it).
    if entry.flags() & CT_F_REPLY == 0 || !F::same(to.daddr, pkt.daddr) {
        return;
    }
    note_close(entry, l.tcp_flags);
    refresh(entry);
    count_backend(entry.backend_id(), skb.frame_len());
    skb.rewrite::<F>(&l.hdr, pkt, &to);
    count(stat::REVERSE_NAT_EGRESS);
    if l.later_fragment() {
        count(stat::FRAGMENT_NAT);
    }
}

/// The translation of a packet coming in (XDP or TC ingress; counted here): the same for
/// both families. Each family's path is a function of its own (a BPF-to-BPF call): inlined
/// side by side, their stack slots would add up past the 512 bytes BPF allows. A call
/// chain's frames add up too, and IPv6's path needs nearly all 512: the programs keep no
/// stack of their own (what they do besides `process`, on paths of their own, rejects and
/// packet-too-big answers, is a call as well).
#[inline(always)]
pub(crate) fn process(ctx: &impl Hook) -> Verdict {
    Verdict::from_word(if is_ipv6(ctx) {
        process_v6(ctx)
    } else {
        process_v4(ctx)
    })
}

/// `process` for IPv4.
#[inline(never)]
fn process_v4(ctx: &impl Hook) -> u32 {
    count(stat::RX);
    process_family::<V4>(ctx, parse(ctx)).to_word()
}

/// `process` for IPv6.
#[inline(never)]
fn process_v6(ctx: &impl Hook) -> u32 {
    count(stat::RX);
    process_family::<V6>(ctx, parse6(ctx)).to_word()
}

/// `process` for one family.
#[inline(always)]
fn process_family<F: Family>(ctx: &impl Hook, parsed: Result<Parsed<F>, u32>) -> Verdict {
    match parsed {
        Ok(Parsed::L4(l)) => translate(ctx, &l),
        Ok(Parsed::IcmpError(e)) => {
            if translate_error(&e, false) {
                Verdict::Pass
            } else {
                pass(stat::PASS_ICMP_UNRELATED)
            }
        }
        Err(reason) => pass(reason),
    }
}

/// A source-NATed packet with DF set (every IPv6 packet) that would not fit the route to
/// its backend: the route's MTU, for the ICMP fragmentation-needed (ICMPv6 packet too big)
/// the client must get (the kernel would send it to the node's own address, the packet's
/// source after the translation). Small packets are not looked up: no route this side of
/// IPv4's minimum datagram (IPv6's minimum MTU) has a lower MTU. (An aggregated skb's
/// `tot_len` is its whole length, so it is always looked up.)
#[inline(always)]
fn too_big<F: Family>(ctx: &impl Hook, l: &L4Packet<F>, to: &Tuple<F::Addr>) -> Option<u16> {
    if l.frags & IP_DF == 0 || l.tot_len <= F::MTU_FLOOR {
        return None;
    }
    let hdr_len = F::ip_hdr_len(&l.hdr) + l.l4_hdr_len;
    ctx.mtu_exceeded::<F>(to, l.proto, l.tot_len, hdr_len)
}

#[inline(always)]
fn translate<F: Family>(ctx: &impl Hook, l: &L4Packet<F>) -> Verdict {
    let (hdr, pkt, proto, tcp_flags) = (&l.hdr, l.pkt, l.proto, l.tcp_flags);
    let bytes = ctx.frame_len();

    let ct_key = F::ct_key(pkt.saddr, pkt.daddr, pkt.sport, pkt.dport, proto);
    if let Some(entry) = F::conntrack().get_ptr_mut(&ct_key) {
        // SAFETY: a map value pointer returned by the kernel, valid for this program run.
        let entry = unsafe { &mut *entry };
        let to = entry.nat();
        if entry.flags() & CT_F_REPLY != 0 {
            if entry.flags() & CT_F_DIRECT != 0 {
                // A remapped direct flow's reply gets its port back where it leaves towards
                // the client (TC egress), and only there: translated here, it would look
                // there like a reply of the Service flow whose tuple it shares.
                return pass(stat::DIRECT_FLOW);
            }
            if l.later_fragment() {
                count(stat::FRAGMENT_NAT);
            }
            note_close(entry, tcp_flags);
            refresh(entry);
            count_backend(entry.backend_id(), bytes);
            ctx.rewrite::<F>(hdr, &pkt, &to);
            return pass(stat::REVERSE_NAT);
        }
        if entry.flags() & CT_F_DIRECT != 0 {
            // A remapped direct flow keeps its port, also for the next connection from the
            // same client port (the backend's TIME_WAIT is on the remapped tuple).
            if tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
                reopen_direct::<F>(entry, &to, proto);
            }
            note_close(entry, tcp_flags);
            refresh(entry);
            ctx.rewrite::<F>(hdr, &pkt, &to);
            return pass(stat::DIRECT_FLOW);
        }
        if keep_flow::<F>(proto, tcp_flags, entry, &to) {
            if entry.flags() & CT_F_SNAT != 0 {
                if let Some(mtu) = too_big(ctx, l, &to) {
                    return Verdict::FragNeeded(mtu);
                }
            }
            if l.later_fragment() {
                count(stat::FRAGMENT_NAT);
            }
            // The client closes (FIN or RST) a reported flow: report that once.
            if entry.flags() & CT_F_REPORTED != 0 && tcp_flags & (TCP_FIN | TCP_RST) != 0 {
                *entry.flags_mut() &= !CT_F_REPORTED;
                F::report(FLOW_CLOSED, proto, &pkt, &to, entry.svc_id(), now_ns());
            }
            note_close(entry, tcp_flags);
            refresh(entry);
            count_service(entry.svc_id(), bytes, false, false);
            count_backend(entry.backend_id(), bytes);
            ctx.rewrite::<F>(hdr, &pkt, &to);
            return pass(stat::DNAT_ESTABLISHED);
        }
    }

    let node_addr = F::node_addr();
    if F::same(pkt.daddr, node_addr) {
        if let Some(verdict) = snat_reply::<F>(ctx, hdr, &pkt, &ct_key, tcp_flags, bytes) {
            return verdict;
        }
    }
    if l.later_fragment() {
        // Its first fragment started no flow here: not a datagram of ours.
        return pass(stat::PASS_NO_SERVICE);
    }

    // NodePorts on 127.0.0.1 (::1) are the node's own processes' (the socket hooks); a packet
    // addressed there from anywhere else is not let through to a backend.
    if F::is_loopback(pkt.daddr) {
        return pass(stat::PASS_NO_SERVICE);
    }
    let svc_key = F::svc_key(pkt.daddr, pkt.dport, proto, SCOPE_ALL);
    // SAFETY: the value is copied out at once.
    let Some(mut svc) = (unsafe { F::services().get(&svc_key) }).copied() else {
        if remap_direct_flow::<F>(ctx, hdr, &pkt, proto, tcp_flags) {
            return Verdict::Pass;
        }
        return pass(stat::PASS_NO_SERVICE);
    };
    let pod_client = ctx.is_from_pod();
    // Source ranges fence every client of the LB IP, this node's pods too (kube-proxy's
    // firewall chain sees pod traffic as well).
    if svc.flags & SVC_F_SOURCE_RANGES != 0 && !F::source_allowed(svc.svc_id, pkt.saddr) {
        count_service(svc.svc_id, bytes, false, true);
        count(stat::DROP_SOURCE_RANGE);
        return Verdict::Drop;
    }
    if svc.flags & SVC_F_POD_SCOPE != 0 && pod_client {
        let pod_key = F::svc_key(pkt.daddr, pkt.dport, proto, SCOPE_PODS);
        // SAFETY: the value is copied out at once.
        if let Some(pod_svc) = unsafe { F::services().get(&pod_key) } {
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
    let affinity_key = F::affinity_key(svc.affinity_group, pkt.saddr);
    let sticky = if svc.affinity_timeout_s != 0 {
        sticky_backend_for::<F>(&svc, &affinity_key, now)
    } else {
        None
    };
    let chosen = match sticky {
        Some(b) => Some(b),
        None if svc.maglev != 0 => maglev_backend::<F>(&svc, &pkt, proto),
        None => random_backend_for::<F>(&svc),
    };
    let Some((backend_id, backend)) = chosen else {
        // The agent writes backends before the slots and slots before the count,
        // so this is only reached if the maps were changed by something else.
        count(stat::DROP_INCONSISTENT);
        return Verdict::Drop;
    };
    if svc.affinity_timeout_s != 0 {
        let a = AffinityEntry {
            last_used_ns: now,
            backend_id,
            _pad: 0,
        };
        let _ = F::affinity().insert(&affinity_key, &a, 0);
    }

    let hairpin = F::same(backend.addr(), pkt.saddr);
    // A client outside this node's pods going to a backend on another node: the reply must
    // come back here to be translated, so the source becomes this node.
    let snat = !hairpin && backend.flags() & BACKEND_F_LOCAL == 0 && !pod_client;
    let flags = if hairpin {
        CT_F_HAIRPIN
    } else if snat {
        CT_F_SNAT
    } else {
        0
    };
    let mut to = Tuple {
        saddr: if hairpin { F::HAIRPIN } else { pkt.saddr },
        daddr: backend.addr(),
        sport: pkt.sport,
        dport: backend.port(),
    };
    let back = Tuple {
        saddr: pkt.daddr,
        daddr: pkt.saddr,
        sport: pkt.dport,
        dport: pkt.sport,
    };
    let reply = F::Entry::new(&back, backend_id, svc.svc_id, CT_F_REPLY | flags, now);
    if snat {
        let via = Tuple {
            saddr: node_addr,
            ..to
        };
        if let Some(mtu) = too_big(ctx, l, &via) {
            return Verdict::FragNeeded(mtu);
        }
        let Some(port) = snat_port::<F>(node_addr, &backend, proto, &reply) else {
            count(stat::DROP_SNAT_PORTS);
            return Verdict::Drop;
        };
        to.saddr = node_addr;
        to.sport = port;
        count(stat::SNAT_NEW);
    }
    let reply_key = F::ct_key(to.daddr, to.saddr, to.dport, to.sport, proto);
    let reported = sample_flow() && F::report(FLOW_NEW, proto, &pkt, &to, svc.svc_id, now);
    let forward_flags = CT_F_FORWARD | flags | if reported { CT_F_REPORTED } else { 0 };
    let forward = F::Entry::new(&to, backend_id, svc.svc_id, forward_flags, now);
    // The reply entry goes in first, so that no reply can be seen before it exists (a SNAT
    // flow's is in the SNAT map already). A failed insert (map full of entries in use) still
    // forwards this packet; the LRU frees space.
    if !snat {
        let _ = F::conntrack().insert(&reply_key, &reply, 0);
    }
    let _ = F::conntrack().insert(&ct_key, &forward, 0);
    count_service(svc.svc_id, bytes, true, false);
    count_backend(backend_id, bytes);
    ctx.rewrite::<F>(hdr, &pkt, &to);
    pass(stat::DNAT_NEW)
}
