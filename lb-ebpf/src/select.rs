//! Backend choice for a new flow: the client's sticky backend (sessionAffinity), the
//! frontend's Maglev table, or a uniformly random slot; and the loadBalancerSourceRanges
//! check that comes before it.

use aya_ebpf::{helpers::bpf_get_prandom_u32, maps::lpm_trie::Key};
use lb_common::{
    config, AffinityKeyV4, BackendSlotKey, BackendV4, MemberKey, ServiceEntry, SourceRangeV4,
};

use crate::{
    maps::{
        cfg_value, LB4_AFFINITY, LB4_BACKENDS, LB4_SRC_RANGES, LB_MAGLEV, LB_MEMBERS, LB_SLOTS,
    },
    parse::Tuple,
};

/// sessionAffinity ClientIP: the backend this client's last new flow to the Service port
/// used, if that was within the timeout and the backend is still in this frontend's set
/// (kube-proxy's `recent` match, per endpoint, refreshed by each new connection).
#[inline(always)]
pub(crate) fn sticky_backend(
    svc: &ServiceEntry,
    key: &AffinityKeyV4,
    now: u64,
) -> Option<(u32, BackendV4)> {
    // SAFETY: the value is copied out at once.
    let a = unsafe { LB4_AFFINITY.get(key) }.copied()?;
    if now.wrapping_sub(a.last_used_ns) > u64::from(svc.affinity_timeout_s) * 1_000_000_000 {
        return None;
    }
    let member = MemberKey {
        svc_id: svc.svc_id,
        backend_id: a.backend_id,
    };
    LB_MEMBERS.get_ptr(&member)?;
    // SAFETY: the value is copied out at once.
    unsafe { LB4_BACKENDS.get(a.backend_id) }.map(|b| (a.backend_id, *b))
}

/// The backend the frontend's Maglev table gives this flow: the same on every node that
/// has the same table.
#[inline(always)]
pub(crate) fn maglev_backend(
    svc: &ServiceEntry,
    pkt: &Tuple,
    proto: u8,
) -> Option<(u32, BackendV4)> {
    let size = cfg_value(config::MAGLEV_SIZE);
    if size == 0 {
        return random_backend(svc);
    }
    let idx = svc
        .maglev
        .wrapping_sub(1)
        .wrapping_mul(size)
        .wrapping_add(flow_hash(pkt, proto).checked_rem(size).unwrap_or(0));
    let id = LB_MAGLEV.get(idx).copied()?;
    // SAFETY: the value is copied out at once.
    unsafe { LB4_BACKENDS.get(id) }.map(|b| (id, *b))
}

/// The flow hash Maglev uses: the client address and port, the frontend port and the
/// protocol (not the frontend address, so that a NodePort flow hashes alike on every node),
/// through MurmurHash3's 64-bit finaliser.
#[inline(always)]
fn flow_hash(pkt: &Tuple, proto: u8) -> u32 {
    let mut h = (u64::from(pkt.saddr) << 32) | (u64::from(pkt.sport) << 16) | u64::from(pkt.dport);
    h ^= u64::from(proto) << 59;
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h as u32
}

/// A uniformly random backend among the service's slots.
#[inline(always)]
pub(crate) fn random_backend(svc: &ServiceEntry) -> Option<(u32, BackendV4)> {
    // SAFETY: bpf_get_prandom_u32 has no preconditions.
    let slot = unsafe { bpf_get_prandom_u32() } % svc.count;
    let slot_key = BackendSlotKey {
        svc_id: svc.svc_id,
        slot,
    };
    // SAFETY: values are copied out at once.
    let id = unsafe { LB_SLOTS.get(&slot_key) }.copied()?;
    // SAFETY: as above.
    unsafe { LB4_BACKENDS.get(id) }.map(|b| (id, *b))
}

/// Whether a client may use a frontend with loadBalancerSourceRanges.
#[inline(always)]
pub(crate) fn source_allowed(svc_id: u32, saddr: u32) -> bool {
    let key = Key::new(
        64,
        SourceRangeV4 {
            svc_id_be: svc_id.to_be(),
            addr: saddr,
        },
    );
    LB4_SRC_RANGES.get(&key).is_some()
}
