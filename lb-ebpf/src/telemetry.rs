//! Counters (`LB_STATS`, `LB_SVC_STATS`, `LB_BE_STATS`) and flow events (`LB_FLOWS`, sampled).

use lb_common::{config, stat, FlowEvent, FlowEventV6};

use crate::{
    ctx::Verdict,
    family::{words, Addr6},
    maps::{cfg_value, LB_BE_STATS, LB_FLOWS, LB_FLOW_SEQ, LB_STATS, LB_SVC_STATS},
    parse::Tuple,
};

#[inline(always)]
pub(crate) fn count(idx: u32) {
    if let Some(c) = LB_STATS.get_ptr_mut(idx) {
        // SAFETY: a per-CPU slot, only this CPU writes it.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
pub(crate) fn count_service(svc_id: u32, bytes: u64, new_flow: bool, rejected: bool) {
    if let Some(s) = LB_SVC_STATS.get_ptr_mut(svc_id) {
        // SAFETY: a per-CPU slot, only this CPU writes it.
        let s = unsafe { &mut *s };
        s.packets += 1;
        s.bytes += bytes;
        s.new_flows += u64::from(new_flow);
        s.rejected += u64::from(rejected);
    }
}

#[inline(always)]
pub(crate) fn count_backend(backend_id: u32, bytes: u64) {
    if let Some(s) = LB_BE_STATS.get_ptr_mut(backend_id) {
        // SAFETY: a per-CPU slot, only this CPU writes it.
        let s = unsafe { &mut *s };
        s.packets += 1;
        s.bytes += bytes;
    }
}

#[inline(always)]
pub(crate) fn pass(idx: u32) -> Verdict {
    count(idx);
    Verdict::Pass
}

/// 1-in-N sampling of new flows for `LB_FLOWS` (`LB_CONFIG[FLOW_SAMPLE]`, 0 = off).
#[inline(always)]
pub(crate) fn sample_flow() -> bool {
    let n = cfg_value(config::FLOW_SAMPLE);
    if n == 0 {
        return false;
    }
    let Some(seq) = LB_FLOW_SEQ.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: a per-CPU slot, only this CPU writes it.
    let seq = unsafe { &mut *seq };
    *seq = seq.wrapping_add(1);
    *seq % n == 0
}

/// Reports a decision to `LB_FLOWS`; false when the ring buffer is full.
#[inline(always)]
pub(crate) fn report_flow(
    kind: u8,
    proto: u8,
    pkt: &Tuple,
    to: &Tuple,
    svc_id: u32,
    now: u64,
) -> bool {
    let ev = FlowEvent {
        ts_ns: now,
        client_addr: pkt.saddr,
        frontend_addr: pkt.daddr,
        backend_addr: to.daddr,
        svc_id,
        client_port: pkt.sport,
        frontend_port: pkt.dport,
        backend_port: to.dport,
        proto,
        kind,
    };
    if LB_FLOWS.output::<FlowEvent>(&ev, 0).is_err() {
        count(stat::FLOW_EVENTS_LOST);
        return false;
    }
    true
}

/// `report_flow` for an IPv6 flow: a `FlowEventV6` (the reader tells the two apart by size).
#[inline(always)]
pub(crate) fn report_flow6(
    kind: u8,
    proto: u8,
    pkt: &Tuple<Addr6>,
    to: &Tuple<Addr6>,
    svc_id: u32,
    now: u64,
) -> bool {
    // Written in place in the ring buffer: a 72-byte event on the stack would not fit beside
    // the IPv6 path's keys.
    let Some(mut entry) = LB_FLOWS.reserve::<FlowEventV6>(0) else {
        count(stat::FLOW_EVENTS_LOST);
        return false;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` points to a reserved record of the event's size; every field is written
    // before it is submitted.
    unsafe {
        (*ev).ts_ns = now;
        (*ev).client_addr = words(pkt.saddr);
        (*ev).frontend_addr = words(pkt.daddr);
        (*ev).backend_addr = words(to.daddr);
        (*ev).svc_id = svc_id;
        (*ev).client_port = pkt.sport;
        (*ev).frontend_port = pkt.dport;
        (*ev).backend_port = to.dport;
        (*ev).proto = proto;
        (*ev).kind = kind;
        (*ev)._pad = 0;
    }
    entry.submit(0);
    true
}
