//! The Maglev tables of external frontends: one per Service port and family with NodePorts,
//! externalIPs or load-balancer IPs (the traffic that may land on any node), computed from the
//! same endpoints on every node and rewritten in place when they change.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use lb_common::{map_names, ServiceEntry, SCOPE_ALL};

use super::{ApplyStats, Reconciler};
use crate::{
    maglev,
    maps::{frontend_key, BackendValue, FrontendKey, MapError, ServiceMaps},
    model::{Family, FrontendKind, FrontendState, L4Addr},
};

/// What a table is for: a Service port (`namespace/name:port`) and a family, since a
/// dual-stack Service port's frontends of each family have that family's backends.
pub(super) type MaglevGroup = (String, Family);

/// One Maglev table: shared by the external frontends (NodePort, externalIPs, load-balancer
/// IPs) of one Service port and family, which have the same backends.
#[derive(Debug, Clone)]
pub(super) struct MaglevTable {
    index: u32,
    /// The backend ids it was computed for, sorted.
    ids: Vec<u32>,
    /// The entries that name it.
    pub(super) keys: BTreeSet<FrontendKey>,
}

/// What a backend's Maglev permutation is derived from: its address (4 or 16 bytes), port
/// and protocol, so that every node computes the same table for the same endpoints.
fn maglev_identity(b: BackendValue) -> Vec<u8> {
    let (port, proto) = b.port_proto();
    let mut v = Vec::with_capacity(19);
    match b.addr() {
        IpAddr::V4(a) => v.extend_from_slice(&a.octets()),
        IpAddr::V6(a) => v.extend_from_slice(&a.octets()),
    }
    v.extend_from_slice(&port.to_ne_bytes());
    v.push(proto);
    v
}

impl<M: ServiceMaps> Reconciler<M> {
    /// Programs one Maglev table per Service port and family with external frontends
    /// (NodePort, externalIPs, load-balancer IPs: the traffic that may land on any node) and
    /// points their entries at it. A table is rewritten in place, entry by entry, when its
    /// backends change (every entry always names a backend that exists). Returns the groups
    /// that have a table.
    pub(super) fn program_maglev<'a>(
        &mut self,
        frontends: impl Iterator<Item = (&'a L4Addr, &'a FrontendState)>,
        slot_lists: &mut BTreeMap<FrontendKey, (ServiceEntry, Vec<u32>)>,
        stats: &mut ApplyStats,
    ) -> Result<BTreeSet<MaglevGroup>, MapError> {
        let (size, count) = self.maps.maglev_geometry();
        let mut groups: BTreeMap<MaglevGroup, (Vec<u32>, Vec<FrontendKey>)> = BTreeMap::new();
        if size == 0 {
            return Ok(BTreeSet::new());
        }
        for (fe, state) in frontends {
            if state.kind == FrontendKind::ClusterIP || state.backends.is_empty() {
                continue;
            }
            let key = frontend_key(fe, SCOPE_ALL);
            let Some((_, slots)) = slot_lists.get(&key) else {
                continue;
            };
            let mut ids = slots.clone();
            ids.sort_unstable();
            let name = (state.service.to_string(), fe.family());
            let g = groups
                .entry(name)
                .or_insert_with(|| (ids.clone(), Vec::new()));
            // Frontends of one Service port and family share the external set; one that differs
            // (never seen) keeps the random choice.
            if g.0 == ids {
                g.1.push(key);
            }
        }
        let kept = self
            .maglev
            .keys()
            .filter(|n| !groups.contains_key(*n))
            .count();
        if groups.len() + kept > count as usize {
            return Err(MapError::new(
                map_names::LB_MAGLEV,
                "capacity",
                format!(
                    "{} tables wanted, room for {count} (--maglev-tables): nothing was changed, \
                     the last good state stays",
                    groups.len() + kept
                ),
            ));
        }
        // Indexes in use: by the tables kept, and (after a restart) by what the entries in
        // the maps name, which a group takes over when one of its frontends names it.
        let mut used: BTreeSet<u32> = self.maglev.values().map(|t| t.index).collect();
        for (name, (_, keys)) in &groups {
            if self.maglev.contains_key(name) {
                continue;
            }
            let inherited = keys
                .iter()
                .filter_map(|k| self.services.get(k))
                .map(|p| p.value.maglev)
                .find(|m| *m != 0 && !used.contains(&(m - 1)) && *m <= count);
            if let Some(m) = inherited {
                used.insert(m - 1);
                self.maglev.insert(
                    name.clone(),
                    MaglevTable {
                        index: m - 1,
                        ids: Vec::new(), // content unknown: rewritten below
                        keys: BTreeSet::new(),
                    },
                );
            }
        }
        for (name, (ids, keys)) in &groups {
            let table = if let Some(t) = self.maglev.get(name) {
                t.clone()
            } else {
                let Some(index) = (0..count).find(|i| !used.contains(i)) else {
                    // Unreachable: the count was checked above.
                    continue;
                };
                used.insert(index);
                MaglevTable {
                    index,
                    ids: Vec::new(),
                    keys: BTreeSet::new(),
                }
            };
            if table.ids != *ids {
                let members: Vec<(Vec<u8>, u32)> = ids
                    .iter()
                    .filter_map(|id| self.backends.get(id).map(|b| (maglev_identity(*b), *id)))
                    .collect();
                let content = maglev::table(size, &members);
                let changed = self.maps.set_maglev_table(table.index, &content)?;
                stats.writes += changed;
            }
            self.maglev.insert(
                name.clone(),
                MaglevTable {
                    index: table.index,
                    ids: ids.clone(),
                    keys: keys.iter().copied().collect(),
                },
            );
            for k in keys {
                if let Some((v, _)) = slot_lists.get_mut(k) {
                    v.maglev = table.index + 1;
                }
            }
        }
        Ok(groups.into_keys().collect())
    }
}
