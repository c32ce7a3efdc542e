//! Service and backend ids: small integers that index the per-CPU counters (`LB_SVC_STATS`,
//! `LB_BE_STATS`), so they stay below the maps' sizes and are reused. A backend id is
//! reused only after its counters are zeroed; a watermark persisted in `LB_CONFIG` says which
//! ids were never used (their counters are still zero), so a restarted agent knows too.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
};

use crate::maps::{BackendValue, MapError, ServiceMaps};

/// How far the persisted backend id watermark moves ahead of the ids in use.
pub(super) const WATERMARK_STEP: u32 = 1024;

/// What makes two backends the same: address (of either family), port and protocol (not
/// their flags).
pub(super) type BackendIdentity = (IpAddr, u16, u8);

pub(super) fn backend_identity(b: BackendValue) -> BackendIdentity {
    let (port, proto) = b.port_proto();
    (b.addr(), port, proto)
}

/// The service ids in use, and where the next search for a free one starts.
#[derive(Debug)]
pub(super) struct ServiceIds {
    next: u32,
    used: HashSet<u32>,
}

impl ServiceIds {
    pub(super) fn new(used: HashSet<u32>) -> Self {
        let next = used.iter().max().copied().unwrap_or(0) + 1;
        ServiceIds { next, used }
    }

    /// A free id in `1..limit`.
    pub(super) fn alloc(&mut self, limit: u32) -> u32 {
        loop {
            if self.next == 0 || self.next >= limit {
                self.next = 1;
            }
            let id = self.next;
            self.next += 1;
            if self.used.insert(id) {
                return id;
            }
        }
    }

    pub(super) fn release(&mut self, id: u32) {
        self.used.remove(&id);
    }
}

/// Backend ids (one space over both families) by identity, and which ids have counters that need zeroing before reuse.
#[derive(Debug)]
pub(super) struct BackendIds {
    next: u32,
    by_identity: HashMap<BackendIdentity, u32>,
    /// Backend ids above this were never used: their counters need no reset.
    used_high: u32,
    /// The watermark persisted in the maps: ahead of every id used, moved in steps before
    /// an id above it is used, so that a crash never leaves a used id above it.
    watermark: u32,
}

impl BackendIds {
    /// The ids of the backends the maps hold, with the watermark the maps keep.
    pub(super) fn new(backends: &BTreeMap<u32, BackendValue>, persisted_watermark: u32) -> Self {
        let highest = backends.keys().max().copied().unwrap_or(0);
        let watermark = persisted_watermark.max(highest);
        BackendIds {
            next: highest + 1,
            by_identity: backends
                .iter()
                .map(|(id, b)| (backend_identity(*b), *id))
                .collect(),
            used_high: watermark,
            watermark,
        }
    }

    /// The id of a backend with this identity, if it has one.
    pub(super) fn get(&self, ident: BackendIdentity) -> Option<u32> {
        self.by_identity.get(&ident).copied()
    }

    /// The id of a backend with this identity, allocating a free one (not a key of `taken`,
    /// below `limit`) when it has none: its counters are zeroed if the id was used before,
    /// and the persisted watermark moves ahead first if the id is above it.
    pub(super) fn assign<M: ServiceMaps>(
        &mut self,
        ident: BackendIdentity,
        taken: &BTreeMap<u32, BackendValue>,
        limit: u32,
        maps: &mut M,
    ) -> Result<u32, MapError> {
        if let Some(id) = self.get(ident) {
            return Ok(id);
        }
        let id = loop {
            if self.next == 0 || self.next >= limit {
                self.next = 1;
            }
            let id = self.next;
            self.next += 1;
            if !taken.contains_key(&id) {
                break id;
            }
        };
        if id <= self.used_high {
            maps.reset_backend_stats(id)?;
        } else if id > self.watermark {
            // Fresh since the maps were made (counters still zero): recorded first.
            let mark = id.saturating_add(WATERMARK_STEP).min(limit);
            maps.set_backend_id_watermark(mark)?;
            self.watermark = mark;
        }
        self.used_high = self.used_high.max(id);
        self.by_identity.insert(ident, id);
        Ok(id)
    }

    /// Forgets a removed backend's identity (its id may be reused).
    pub(super) fn forget(&mut self, ident: BackendIdentity) {
        self.by_identity.remove(&ident);
    }
}
