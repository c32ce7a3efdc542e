//! The translation every datapath program runs (`process`): reverse NAT and DNAT of flows in
//! conntrack, replies to source-NATed flows, and new flows to a frontend (backend choice,
//! hairpin, source NAT); and the TC programs' wrapper around it (`tc_translate`).

use aya_ebpf::bindings::TC_ACT_SHOT;
use lb_common::{
    config, stat, AffinityKeyV4, AffinityV4, CtEntryV4, ServiceKeyV4, BACKEND_F_LOCAL,
    CT_F_FORWARD, CT_F_HAIRPIN, CT_F_REPLY, CT_F_REPORTED, CT_F_SNAT, FLOW_CLOSED, FLOW_NEW,
    HAIRPIN_SNAT_V4, SCOPE_ALL, SCOPE_PODS, SVC_F_DROP_NO_ENDPOINTS, SVC_F_POD_SCOPE,
    SVC_F_SOURCE_RANGES,
};

use crate::{
    clock::now_ns,
    conntrack::{conntrack_key, keep_flow, note_close, refresh},
    ctx::{Hook, Skb, Verdict, TC_NEXT},
    maps::{cfg_value, LB4_AFFINITY, LB4_CONNTRACK, LB4_SERVICES},
    parse::{parse, Parsed, Tuple, L4_OFF, TCP_FIN, TCP_LEN, TCP_RST},
    reject::reject,
    select::{maglev_backend, random_backend, source_allowed, sticky_backend},
    snat::{snat_port, snat_reply},
    telemetry::{count, count_backend, count_service, pass, report_flow, sample_flow},
};

/// The TC programs' translation: rewrites through the checksum helpers, rejects answered in
/// place.
#[inline(always)]
pub(crate) fn tc_translate<const POD: bool>(skb: &Skb<'_, POD>) -> i32 {
    count(stat::RX);
    // Linear headers for direct reads (a no-op when they are; fails harmlessly on a short
    // frame, which parse() then leaves alone).
    let _ = skb.0.pull_data((L4_OFF + TCP_LEN) as u32);
    match process(skb) {
        Verdict::Pass => TC_NEXT,
        Verdict::Drop => TC_ACT_SHOT,
        Verdict::Reject => reject(skb.0),
    }
}

#[inline(always)]
pub(crate) fn process(ctx: &impl Hook) -> Verdict {
    let Parsed {
        hdr,
        pkt,
        proto,
        tcp_flags,
    } = match parse(ctx) {
        Ok(p) => p,
        Err(reason) => return pass(reason),
    };
    let bytes = ctx.frame_len();

    let ct_key = conntrack_key(pkt.saddr, pkt.daddr, pkt.sport, pkt.dport, proto);
    if let Some(entry) = LB4_CONNTRACK.get_ptr_mut(&ct_key) {
        // SAFETY: a map value pointer returned by the kernel, valid for this program run.
        let entry = unsafe { &mut *entry };
        let to = Tuple {
            saddr: entry.nat_saddr,
            daddr: entry.nat_daddr,
            sport: entry.nat_sport,
            dport: entry.nat_dport,
        };
        if entry.flags & CT_F_REPLY != 0 {
            note_close(entry, tcp_flags);
            refresh(entry);
            count_backend(entry.backend_id, bytes);
            ctx.rewrite(&hdr, &pkt, &to);
            return pass(stat::REVERSE_NAT);
        }
        if keep_flow(proto, tcp_flags, entry, &to) {
            // The client closes (FIN or RST) a reported flow: report that once.
            if entry.flags & CT_F_REPORTED != 0 && tcp_flags & (TCP_FIN | TCP_RST) != 0 {
                entry.flags &= !CT_F_REPORTED;
                report_flow(FLOW_CLOSED, proto, &pkt, &to, entry.svc_id, now_ns());
            }
            note_close(entry, tcp_flags);
            refresh(entry);
            count_service(entry.svc_id, bytes, false, false);
            count_backend(entry.backend_id, bytes);
            ctx.rewrite(&hdr, &pkt, &to);
            return pass(stat::DNAT_ESTABLISHED);
        }
    }

    let node_addr = cfg_value(config::NODE_ADDR);
    if pkt.daddr == node_addr {
        if let Some(verdict) = snat_reply(ctx, &hdr, &pkt, &ct_key, tcp_flags, bytes) {
            return verdict;
        }
    }

    let svc_key = ServiceKeyV4 {
        addr: pkt.daddr,
        port: pkt.dport,
        proto,
        scope: SCOPE_ALL,
    };
    // SAFETY: the value is copied out at once.
    let Some(mut svc) = (unsafe { LB4_SERVICES.get(&svc_key) }).copied() else {
        return pass(stat::PASS_NO_SERVICE);
    };
    let pod_client = ctx.is_from_pod();
    // Source ranges fence clients from outside; this node's pods are not subject to them
    // (as with kube-proxy and Cilium).
    if svc.flags & SVC_F_SOURCE_RANGES != 0 && !pod_client && !source_allowed(svc.svc_id, pkt.saddr)
    {
        count_service(svc.svc_id, bytes, false, true);
        count(stat::DROP_SOURCE_RANGE);
        return Verdict::Drop;
    }
    if svc.flags & SVC_F_POD_SCOPE != 0 && pod_client {
        let pod_key = ServiceKeyV4 {
            scope: SCOPE_PODS,
            ..svc_key
        };
        // SAFETY: the value is copied out at once.
        if let Some(pod_svc) = unsafe { LB4_SERVICES.get(&pod_key) } {
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
    let affinity_key = AffinityKeyV4 {
        group: svc.affinity_group,
        client: pkt.saddr,
        _pad: 0,
    };
    let sticky = if svc.affinity_timeout_s != 0 {
        sticky_backend(&svc, &affinity_key, now)
    } else {
        None
    };
    let chosen = match sticky {
        Some(b) => Some(b),
        None if svc.maglev != 0 => maglev_backend(&svc, &pkt, proto),
        None => random_backend(&svc),
    };
    let Some((backend_id, backend)) = chosen else {
        // The agent writes backends before the slots and slots before the count,
        // so this is only reached if the maps were changed by something else.
        count(stat::DROP_INCONSISTENT);
        return Verdict::Drop;
    };
    if svc.affinity_timeout_s != 0 {
        let a = AffinityV4 {
            last_used_ns: now,
            backend_id,
            _pad: 0,
        };
        let _ = LB4_AFFINITY.insert(&affinity_key, &a, 0);
    }

    let hairpin = backend.addr == pkt.saddr;
    // A client outside this node's pods going to a backend on another node: the reply must
    // come back here to be translated, so the source becomes this node.
    let snat = !hairpin && backend.flags & BACKEND_F_LOCAL == 0 && !pod_client;
    let flags = if hairpin {
        CT_F_HAIRPIN
    } else if snat {
        CT_F_SNAT
    } else {
        0
    };
    let mut to = Tuple {
        saddr: if hairpin { HAIRPIN_SNAT_V4 } else { pkt.saddr },
        daddr: backend.addr,
        sport: pkt.sport,
        dport: backend.port,
    };
    let reply = CtEntryV4 {
        last_seen_ns: now,
        nat_saddr: pkt.daddr,
        nat_daddr: pkt.saddr,
        nat_sport: pkt.dport,
        nat_dport: pkt.sport,
        backend_id,
        svc_id: svc.svc_id,
        flags: CT_F_REPLY | flags,
        _pad: 0,
    };
    if snat {
        let Some(port) = snat_port(node_addr, &backend, proto, &reply) else {
            count(stat::DROP_SNAT_PORTS);
            return Verdict::Drop;
        };
        to.saddr = node_addr;
        to.sport = port;
        count(stat::SNAT_NEW);
    }
    let reply_key = conntrack_key(to.daddr, to.saddr, to.dport, to.sport, proto);
    let reported = sample_flow() && report_flow(FLOW_NEW, proto, &pkt, &to, svc.svc_id, now);
    let forward = CtEntryV4 {
        last_seen_ns: now,
        nat_saddr: to.saddr,
        nat_daddr: to.daddr,
        nat_sport: to.sport,
        nat_dport: to.dport,
        backend_id,
        svc_id: svc.svc_id,
        flags: CT_F_FORWARD | flags | if reported { CT_F_REPORTED } else { 0 },
        _pad: 0,
    };
    // The reply entry goes in first, so that no reply can be seen before it exists (a SNAT
    // flow's is in LB4_SNAT already). A failed insert (map full of entries in use) still
    // forwards this packet; the LRU frees space.
    if !snat {
        let _ = LB4_CONNTRACK.insert(&reply_key, &reply, 0);
    }
    let _ = LB4_CONNTRACK.insert(&ct_key, &forward, 0);
    count_service(svc.svc_id, bytes, true, false);
    count_backend(backend_id, bytes);
    ctx.rewrite(&hdr, &pkt, &to);
    pass(stat::DNAT_NEW)
}
