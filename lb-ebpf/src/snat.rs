//! Source NAT to the node address for clients from outside going to a backend on another
//! node: the allocation of a port (`snat_port`) and the translation of replies
//! (`snat_reply`).

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_get_prandom_u32};
use lb_common::{config, stat, SNAT_TRIES};

use crate::{
    conntrack::{note_close, refresh},
    ctx::{Hook, Verdict},
    family::{Backend, CtEntry, Family},
    maps::cfg_value,
    parse::Tuple,
    telemetry::{count_backend, pass},
};

/// A reply to a source-NATed flow (addressed to this node and an allocated port): restores
/// the frontend as source and the client as destination. None: not such a reply.
#[inline(always)]
pub(crate) fn snat_reply<F: Family>(
    ctx: &impl Hook,
    hdr: &F::Hdr,
    pkt: &Tuple<F::Addr>,
    key: &F::CtKey,
    tcp_flags: u8,
    bytes: u64,
) -> Option<Verdict> {
    let port = u32::from(u16::from_be(pkt.dport));
    if port < cfg_value(config::SNAT_PORT_MIN) || port > cfg_value(config::SNAT_PORT_MAX) {
        return None;
    }
    let entry = F::snat().get_ptr_mut(key)?;
    // SAFETY: a map value pointer returned by the kernel, valid for this program run.
    let entry = unsafe { &mut *entry };
    note_close(entry, tcp_flags);
    refresh(entry);
    count_backend(entry.backend_id(), bytes);
    let to = entry.nat();
    ctx.rewrite::<F>(hdr, pkt, &to);
    Some(pass(stat::SNAT_REPLY))
}

/// Reserves a source port on this node for a flow to `backend` by inserting its reply entry
/// into the family's SNAT map (`LB4_SNAT`, `LB6_SNAT`) under that port: a port another flow
/// to the same backend holds is never taken. Tries `SNAT_TRIES` random ports of the range
/// (random rather than consecutive, so that taken ports do not cluster); the port is in
/// network byte order.
#[inline(always)]
pub(crate) fn snat_port<F: Family>(
    node_addr: F::Addr,
    backend: &F::Backend,
    proto: u8,
    reply: &F::Entry,
) -> Option<u16> {
    let min = cfg_value(config::SNAT_PORT_MIN);
    let max = cfg_value(config::SNAT_PORT_MAX);
    if min == 0 || max < min || max > 65535 || F::is_unspecified(node_addr) {
        return None;
    }
    let range = max - min + 1;
    let mut key = F::ct_key(backend.addr(), node_addr, backend.port(), 0, proto);
    let mut i = 0;
    while i < SNAT_TRIES {
        // SAFETY: bpf_get_prandom_u32 has no preconditions.
        let r = unsafe { bpf_get_prandom_u32() };
        let port = ((min + r.checked_rem(range).unwrap_or(0)) as u16).to_be();
        F::set_ct_dport(&mut key, port);
        if F::snat()
            .insert(&key, reply, u64::from(BPF_NOEXIST))
            .is_ok()
        {
            return Some(port);
        }
        i += 1;
    }
    None
}
