//! Backend choice for a new flow: the client's sticky backend (sessionAffinity), the
//! frontend's Maglev table, or a uniformly random slot. Service and backend ids are one
//! space over both families: the slot, member and Maglev maps are shared, and a frontend's
//! slots name backends of its own family.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use lb_common::{config, AffinityKeyV4, BackendSlotKey, BackendV4, MemberKey, ServiceEntry};

use crate::{
    family::{Family, V4},
    maps::{cfg_value, LB_MAGLEV, LB_MEMBERS, LB_SLOTS},
    parse::Tuple,
};

/// `sticky_backend_for` an IPv4 client (the socket hooks').
#[inline(always)]
pub(crate) fn sticky_backend(
    svc: &ServiceEntry,
    key: &AffinityKeyV4,
    now: u64,
) -> Option<(u32, BackendV4)> {
    sticky_backend_for::<V4>(svc, key, now)
}

/// `random_backend_for` an IPv4 frontend (the socket hooks').
#[inline(always)]
pub(crate) fn random_backend(svc: &ServiceEntry) -> Option<(u32, BackendV4)> {
    random_backend_for::<V4>(svc)
}

/// Whether an IPv4 client may use a frontend with loadBalancerSourceRanges (the socket
/// hooks'; the translation asks `Family::source_allowed`).
#[inline(always)]
pub(crate) fn source_allowed(svc_id: u32, saddr: u32) -> bool {
    V4::source_allowed(svc_id, saddr)
}

/// sessionAffinity ClientIP: the backend this client's last new flow to the Service port
/// used, if that was within the timeout and the backend is still in this frontend's set
/// (kube-proxy's `recent` match, per endpoint, refreshed by each new connection).
#[inline(always)]
pub(crate) fn sticky_backend_for<F: Family>(
    svc: &ServiceEntry,
    key: &F::AffKey,
    now: u64,
) -> Option<(u32, F::Backend)> {
    // SAFETY: the value is copied out at once.
    let a = unsafe { F::affinity().get(key) }.copied()?;
    if now.wrapping_sub(a.last_used_ns) > u64::from(svc.affinity_timeout_s) * 1_000_000_000 {
        return None;
    }
    let member = MemberKey {
        svc_id: svc.svc_id,
        backend_id: a.backend_id,
    };
    LB_MEMBERS.get_ptr(&member)?;
    // SAFETY: the value is copied out at once.
    unsafe { F::backends().get(a.backend_id) }.map(|b| (a.backend_id, *b))
}

/// The backend the frontend's Maglev table gives this flow: the same on every node that
/// has the same table.
#[inline(always)]
pub(crate) fn maglev_backend<F: Family>(
    svc: &ServiceEntry,
    pkt: &Tuple<F::Addr>,
    proto: u8,
) -> Option<(u32, F::Backend)> {
    let size = cfg_value(config::MAGLEV_SIZE);
    if size == 0 {
        return random_backend_for::<F>(svc);
    }
    let hash = flow_hash(F::hash_client(pkt.saddr), pkt.sport, pkt.dport, proto);
    let idx = svc
        .maglev
        .wrapping_sub(1)
        .wrapping_mul(size)
        .wrapping_add(hash.checked_rem(size).unwrap_or(0));
    let id = LB_MAGLEV.get(idx).copied()?;
    // SAFETY: the value is copied out at once.
    unsafe { F::backends().get(id) }.map(|b| (id, *b))
}

/// The flow hash Maglev uses: the client address (an IPv6 one folded to 32 bits,
/// `Family::hash_client`) and port, the frontend port and the protocol (not the frontend
/// address, so that a NodePort flow hashes alike on every node), through MurmurHash3's
/// 64-bit finaliser.
#[inline(always)]
fn flow_hash(client: u32, sport: u16, dport: u16, proto: u8) -> u32 {
    let mut h = (u64::from(client) << 32) | (u64::from(sport) << 16) | u64::from(dport);
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
pub(crate) fn random_backend_for<F: Family>(svc: &ServiceEntry) -> Option<(u32, F::Backend)> {
    // SAFETY: bpf_get_prandom_u32 has no preconditions.
    let slot = unsafe { bpf_get_prandom_u32() } % svc.count;
    let slot_key = BackendSlotKey {
        svc_id: svc.svc_id,
        slot,
    };
    // SAFETY: values are copied out at once.
    let id = unsafe { LB_SLOTS.get(&slot_key) }.copied()?;
    // SAFETY: as above.
    unsafe { F::backends().get(id) }.map(|b| (id, *b))
}
