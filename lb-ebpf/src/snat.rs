//! Source NAT to the node address for clients from outside going to a backend on another
//! node: the allocation of a port (`snat_port`) and the translation of replies
//! (`snat_reply`).

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_get_prandom_u32};
use lb_common::{config, stat, BackendV4, CtEntryV4, CtKeyV4, SNAT_TRIES};

use crate::{
    conntrack::{conntrack_key, note_close, refresh},
    ctx::{Hook, Verdict},
    maps::{cfg_value, LB4_SNAT},
    parse::{Headers, Tuple},
    telemetry::{count_backend, pass},
};

/// A reply to a source-NATed flow (addressed to this node and an allocated port): restores
/// the frontend as source and the client as destination. None: not such a reply.
#[inline(always)]
pub(crate) fn snat_reply(
    ctx: &impl Hook,
    hdr: &Headers,
    pkt: &Tuple,
    key: &CtKeyV4,
    tcp_flags: u8,
    bytes: u64,
) -> Option<Verdict> {
    let port = u32::from(u16::from_be(pkt.dport));
    if port < cfg_value(config::SNAT_PORT_MIN) || port > cfg_value(config::SNAT_PORT_MAX) {
        return None;
    }
    let entry = LB4_SNAT.get_ptr_mut(key)?;
    // SAFETY: a map value pointer returned by the kernel, valid for this program run.
    let entry = unsafe { &mut *entry };
    note_close(entry, tcp_flags);
    refresh(entry);
    count_backend(entry.backend_id, bytes);
    let to = Tuple {
        saddr: entry.nat_saddr,
        daddr: entry.nat_daddr,
        sport: entry.nat_sport,
        dport: entry.nat_dport,
    };
    ctx.rewrite(hdr, pkt, &to);
    Some(pass(stat::SNAT_REPLY))
}

/// Reserves a source port on this node for a flow to `backend` by inserting its reply entry
/// into `LB4_SNAT` under that port: a port another flow to the same backend holds is never
/// taken. Tries `SNAT_TRIES` random ports of the range (random rather than consecutive, so
/// that taken ports do not cluster); the port is in network byte order.
#[inline(always)]
pub(crate) fn snat_port(
    node_addr: u32,
    backend: &BackendV4,
    proto: u8,
    reply: &CtEntryV4,
) -> Option<u16> {
    let min = cfg_value(config::SNAT_PORT_MIN);
    let max = cfg_value(config::SNAT_PORT_MAX);
    if min == 0 || max < min || max > 65535 || node_addr == 0 {
        return None;
    }
    let range = max - min + 1;
    let mut key = conntrack_key(backend.addr, node_addr, backend.port, 0, proto);
    let mut i = 0;
    while i < SNAT_TRIES {
        // SAFETY: bpf_get_prandom_u32 has no preconditions.
        let r = unsafe { bpf_get_prandom_u32() };
        let port = ((min + r.checked_rem(range).unwrap_or(0)) as u16).to_be();
        key.dport = port;
        if LB4_SNAT.insert(&key, reply, u64::from(BPF_NOEXIST)).is_ok() {
            return Some(port);
        }
        i += 1;
    }
    None
}
