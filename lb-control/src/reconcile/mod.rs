//! Programs the desired state into the service maps with the fewest writes, in an order that
//! never lets a packet see a half-updated service: backends before the slots that name them,
//! slots before the service entry whose count covers them; on shrink and removal, the entry
//! first, then the slots, then backends nothing names any more. Both families go through the
//! same phases: each phase writes the IPv4 and the IPv6 entries before the next begins.
//!
//! The reconciler starts from what the (pinned) maps already hold, so an agent restart
//! rewrites nothing that is still right and removes what is no longer wanted. It is the only
//! writer of the service maps. Ids are in `ids`, capacities in `capacity`, the Maglev tables
//! in `maglev_tables`.

mod capacity;
mod ids;
mod maglev_tables;

pub use capacity::{fill_levels, MapFill};

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::IpAddr,
};

use lb_common::{
    map_names, BackendSlotKey, MemberKey, ServiceEntry, SCOPE_ALL, SCOPE_PODS,
    SVC_F_DROP_NO_ENDPOINTS, SVC_F_POD_SCOPE, SVC_F_SOURCE_RANGES,
};

use self::{
    capacity::{check_capacity, levels, refuse_overfull, Counts},
    ids::{backend_identity, BackendIds, ServiceIds},
    maglev_tables::{MaglevGroup, MaglevTable},
};
use crate::{
    control::hash::{fnv1a, FNV_BASIS},
    maps::{
        backend_value, frontend_key, kind_flag, BackendValue, Capacity, FrontendKey, MapError,
        ServiceMaps,
    },
    model::{Desired, FrontendState, L4Addr},
};

#[derive(Debug, Clone)]
struct Programmed {
    value: ServiceEntry,
    slots: Vec<u32>,
}

/// What one `apply` changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ApplyStats {
    pub writes: usize,
    pub deletes: usize,
}

/// The only writer of the service maps: knows what they hold (read once at the start, then
/// kept in step with every write) and makes them hold a desired state.
pub struct Reconciler<M: ServiceMaps> {
    maps: M,
    cap: Capacity,
    /// Frontend entries of both families.
    services: BTreeMap<FrontendKey, Programmed>,
    /// Backends of both families, by id (one id space).
    backends: BTreeMap<u32, BackendValue>,
    /// Backend entries to write before anything names them (`flush_backends`).
    pending_backends: BTreeMap<u32, BackendValue>,
    /// The service ids of `services` (and any just allocated).
    svc_ids: ServiceIds,
    /// Backend ids by identity, and which need their counters zeroed before reuse.
    backend_ids: BackendIds,
    /// Maglev tables by Service port (`namespace/name:port`) and family.
    maglev: BTreeMap<MaglevGroup, MaglevTable>,
    /// Source ranges programmed per service id (of the frontend's family).
    ranges: BTreeMap<u32, BTreeSet<(IpAddr, u8)>>,
    /// How many programmed slots name each backend id.
    refs: HashMap<u32, u32>,
    /// Backend ids kept for serving endpoints (their flows carry on).
    serving: HashSet<u32>,
    /// Programmed slots, over all entries.
    slot_total: usize,
}

/// What a partial `apply` looks at: the frontends (both scopes) and serving endpoints of the
/// Services that changed. Everything else is known to be programmed already.
#[derive(Debug, Default, Clone)]
pub struct Partial {
    pub frontends: BTreeSet<L4Addr>,
    pub serving: BTreeSet<L4Addr>,
}

/// Refuses, before writing, a frontend with a backend of the other family: its slots would
/// name an id the datapath looks up in its own family's backends only.
fn check_families(desired: &Desired, partial: Option<&Partial>) -> Result<(), MapError> {
    let check = |fe: &L4Addr, st: &FrontendState| match st
        .backends
        .iter()
        .find(|b| b.addr.is_ipv6() != fe.is_ipv6())
    {
        Some(b) => Err(MapError::new(
            map_names::LB_SLOTS,
            "family",
            format!(
                "frontend {fe} of {} has backend {} of the other family: nothing was \
                 changed, the last good state stays",
                st.service, b.addr
            ),
        )),
        None => Ok(()),
    };
    for frontends in [&desired.frontends, &desired.pod_frontends] {
        match partial {
            None => frontends.iter().try_for_each(|(fe, st)| check(fe, st))?,
            Some(p) => p
                .frontends
                .iter()
                .filter_map(|fe| frontends.get(fe).map(|st| (fe, st)))
                .try_for_each(|(fe, st)| check(fe, st))?,
        }
    }
    Ok(())
}

/// The affinity group of a Service port: FNV-1a (64 bit) of `namespace/name:port`, stable
/// across agent restarts and the same on every node.
pub fn affinity_group(service_port: &str) -> u64 {
    fnv1a(FNV_BASIS, service_port.as_bytes())
}

impl<M: ServiceMaps> Reconciler<M> {
    /// Takes over what the maps of both families hold. Slots that no service entry covers
    /// are removed.
    pub fn new(mut maps: M) -> Result<Self, MapError> {
        let mut services: BTreeMap<FrontendKey, Programmed> = maps
            .services()?
            .into_iter()
            .map(|(k, v)| {
                (
                    k,
                    Programmed {
                        value: v,
                        // 0 = unknown until read below; a 0 slot is rewritten on the next apply.
                        slots: vec![0; v.count as usize],
                    },
                )
            })
            .collect();
        let counts: HashMap<u32, FrontendKey> =
            services.iter().map(|(k, p)| (p.value.svc_id, *k)).collect();
        for (slot_key, backend_id) in maps.slots()? {
            let owner = counts
                .get(&slot_key.svc_id)
                .and_then(|k| services.get_mut(k));
            match owner {
                Some(p) if (slot_key.slot as usize) < p.slots.len() => {
                    p.slots[slot_key.slot as usize] = backend_id;
                }
                _ => maps.delete_slot(&slot_key)?,
            }
        }
        // Members follow the slots just read: drop strays, add what is missing.
        let mut expected: HashMap<(u32, u32), u32> = HashMap::new();
        for p in services.values() {
            for (i, id) in p.slots.iter().enumerate() {
                expected.insert((p.value.svc_id, *id), i as u32);
            }
        }
        for (mk, slot) in maps.members()? {
            if expected.remove(&(mk.svc_id, mk.backend_id)) != Some(slot) {
                maps.delete_member(&mk)?;
            }
        }
        for ((svc_id, backend_id), slot) in expected {
            if backend_id != 0 {
                maps.set_member(&MemberKey { svc_id, backend_id }, slot)?;
            }
        }
        let backends: BTreeMap<u32, BackendValue> = maps.backends()?.into_iter().collect();
        let svc_ids = ServiceIds::new(services.values().map(|p| p.value.svc_id).collect());
        let backend_ids = BackendIds::new(&backends, maps.backend_id_watermark()?);
        let mut refs: HashMap<u32, u32> = HashMap::new();
        for p in services.values() {
            for id in &p.slots {
                *refs.entry(*id).or_default() += 1;
            }
        }
        let slot_total = services.values().map(|p| p.slots.len()).sum();
        let mut ranges: BTreeMap<u32, BTreeSet<(IpAddr, u8)>> = BTreeMap::new();
        for (svc_id, net, len) in maps.source_ranges()? {
            ranges.entry(svc_id).or_default().insert((net, len));
        }
        Ok(Reconciler {
            cap: maps.capacity(),
            maps,
            services,
            backends,
            svc_ids,
            backend_ids,
            pending_backends: BTreeMap::new(),
            maglev: BTreeMap::new(),
            ranges,
            refs,
            // Unknown until the first apply, which is a full one: nothing is removed before.
            serving: HashSet::new(),
            slot_total,
        })
    }

    pub fn maps(&self) -> &M {
        &self.maps
    }

    /// The service id of each programmed frontend entry.
    pub fn service_ids(&self) -> Vec<(FrontendKey, u32)> {
        self.services
            .iter()
            .map(|(k, p)| (*k, p.value.svc_id))
            .collect()
    }

    /// Writes the backend entries `ensure_backend` left pending, in one batch.
    fn flush_backends(&mut self) -> Result<(), MapError> {
        let batch: Vec<(u32, BackendValue)> = std::mem::take(&mut self.pending_backends)
            .into_iter()
            .collect();
        self.maps.set_backends(&batch)
    }

    /// The id of the backend with `value`'s address (a new one if there is none), with the
    /// map entry to write (`flush_backends`) if it differs.
    fn ensure_backend(
        &mut self,
        value: BackendValue,
        stats: &mut ApplyStats,
    ) -> Result<u32, MapError> {
        let id = self.backend_ids.assign(
            backend_identity(value),
            &self.backends,
            self.cap.backends,
            &mut self.maps,
        )?;
        if self.backends.get(&id) != Some(&value) {
            self.pending_backends.insert(id, value);
            self.backends.insert(id, value);
            stats.writes += 1;
        }
        Ok(id)
    }

    /// Makes the maps hold `desired`.
    pub fn apply(&mut self, desired: &Desired) -> Result<ApplyStats, MapError> {
        self.apply_scoped(desired, None)
    }

    /// Makes the maps hold `desired` for the frontends and serving endpoints in `partial`
    /// (those of the Services that changed), touching nothing else: the cost follows the
    /// size of the change, not the number of Services.
    pub fn apply_partial(
        &mut self,
        desired: &Desired,
        partial: &Partial,
    ) -> Result<ApplyStats, MapError> {
        self.apply_scoped(desired, Some(partial))
    }

    /// The service id of a programmed entry.
    pub fn service_id(&self, key: &FrontendKey) -> Option<u32> {
        self.services.get(key).map(|p| p.value.svc_id)
    }

    /// How full the maps are with what is programmed.
    pub fn fill(&self) -> Vec<MapFill> {
        let frontends_v6 = self.services.keys().filter(|k| k.is_ipv6()).count();
        let backends_v6 = self.backends.values().filter(|b| b.is_ipv6()).count();
        levels(
            &self.cap,
            Counts {
                frontends_v4: self.services.len() - frontends_v6,
                frontends_v6,
                slots: self.slot_total,
                backends_v4: self.backends.len() - backends_v6,
                backends_v6,
            },
        )
    }

    /// Refuses, before writing, a partial change the maps cannot hold.
    fn check_partial_capacity(&self, desired: &Desired, partial: &Partial) -> Result<(), MapError> {
        let frontends_v6 = desired
            .frontends
            .keys()
            .chain(desired.pod_frontends.keys())
            .filter(|f| f.is_ipv6())
            .count();
        let frontends = desired.frontends.len() + desired.pod_frontends.len();
        let mut slots = self.slot_total;
        let mut new_backends = HashSet::new();
        for fe in &partial.frontends {
            for scope in [SCOPE_ALL, SCOPE_PODS] {
                if let Some(p) = self.services.get(&frontend_key(fe, scope)) {
                    slots = slots.saturating_sub(p.slots.len());
                }
            }
            for st in [desired.frontends.get(fe), desired.pod_frontends.get(fe)]
                .into_iter()
                .flatten()
            {
                slots += st.backends.len();
                for b in &st.backends {
                    let ident = backend_identity(backend_value(&b.addr, false, false));
                    if self.backend_ids.get(ident).is_none() {
                        new_backends.insert(ident);
                    }
                }
            }
        }
        let backends_v6 = self.backends.values().filter(|b| b.is_ipv6()).count()
            + new_backends.iter().filter(|(a, ..)| a.is_ipv6()).count();
        let backends = self.backends.len() + new_backends.len();
        refuse_overfull(levels(
            &self.cap,
            Counts {
                frontends_v4: frontends - frontends_v6,
                frontends_v6,
                slots,
                backends_v4: backends - backends_v6,
                backends_v6,
            },
        ))
    }

    fn apply_scoped(
        &mut self,
        desired: &Desired,
        partial: Option<&Partial>,
    ) -> Result<ApplyStats, MapError> {
        match partial {
            None => check_capacity(desired, &self.cap)?,
            Some(p) => self.check_partial_capacity(desired, p)?,
        }
        check_families(desired, partial)?;
        let mut stats = ApplyStats::default();

        // The entries to look at, with their desired state (None: to be removed).
        type Entry<'a> = (FrontendKey, &'a L4Addr, u8, Option<&'a FrontendState>);
        let in_scope: Vec<Entry<'_>> = match partial {
            None => desired
                .frontends
                .iter()
                .map(|(fe, st)| (fe, st, SCOPE_ALL))
                .chain(
                    desired
                        .pod_frontends
                        .iter()
                        .map(|(fe, st)| (fe, st, SCOPE_PODS)),
                )
                .map(|(fe, st, scope)| (frontend_key(fe, scope), fe, scope, Some(st)))
                .collect(),
            Some(p) => p
                .frontends
                .iter()
                .flat_map(|fe| {
                    [
                        (fe, SCOPE_ALL, desired.frontends.get(fe)),
                        (fe, SCOPE_PODS, desired.pod_frontends.get(fe)),
                    ]
                })
                .map(|(fe, scope, st)| (frontend_key(fe, scope), fe, scope, st))
                .collect(),
        };

        // 1. Backends: reuse the id of an identical address, write new ones and flag changes.
        let mut slot_lists: BTreeMap<FrontendKey, (ServiceEntry, Vec<u32>)> = BTreeMap::new();
        let mut range_lists: BTreeMap<FrontendKey, BTreeSet<(IpAddr, u8)>> = BTreeMap::new();
        for (key, fe, scope, state) in &in_scope {
            let Some(state) = state else { continue };
            let mut slots = Vec::with_capacity(state.backends.len());
            for b in &state.backends {
                let value = backend_value(&b.addr, b.local, b.terminating);
                slots.push(self.ensure_backend(value, &mut stats)?);
            }
            let pod_scope = *scope == SCOPE_ALL && desired.pod_frontends.contains_key(*fe);
            let fenced = *scope == SCOPE_ALL && !state.source_ranges.is_empty();
            if fenced {
                range_lists.insert(*key, state.source_ranges.iter().copied().collect());
            }
            let value = ServiceEntry {
                svc_id: 0, // filled in below
                count: slots.len() as u32,
                flags: kind_flag(state.kind)
                    | if state.drop_when_empty {
                        SVC_F_DROP_NO_ENDPOINTS
                    } else {
                        0
                    }
                    | if pod_scope { SVC_F_POD_SCOPE } else { 0 }
                    | if fenced { SVC_F_SOURCE_RANGES } else { 0 },
                affinity_timeout_s: state.affinity_timeout_s,
                affinity_group: affinity_group(&state.service.to_string()),
                maglev: 0, // set by program_maglev
                _pad: 0,
            };
            slot_lists.insert(*key, (value, slots));
        }
        // Serving endpoints no frontend chooses (terminating ones) stay for their flows.
        let mut released: Vec<u32> = Vec::new();
        match partial {
            None => {
                let mut serving = HashSet::new();
                for b in desired.serving.values() {
                    let value = backend_value(&b.addr, b.local, b.terminating);
                    serving.insert(self.ensure_backend(value, &mut stats)?);
                }
                self.serving = serving;
            }
            Some(p) => {
                for addr in &p.serving {
                    if let Some(b) = desired.serving.get(addr) {
                        let value = backend_value(&b.addr, b.local, b.terminating);
                        let id = self.ensure_backend(value, &mut stats)?;
                        self.serving.insert(id);
                    } else {
                        let v = backend_value(addr, false, false);
                        if let Some(id) = self.backend_ids.get(backend_identity(v)) {
                            self.serving.remove(&id);
                            released.push(id);
                        }
                    }
                }
            }
        }

        self.flush_backends()?;

        // Maglev tables of external frontends, written before the entries that name them.
        let external = in_scope
            .iter()
            .filter(|(_, _, scope, _)| *scope == SCOPE_ALL)
            .filter_map(|(_, fe, _, st)| st.map(|st| (*fe, st)));
        let tables = self.program_maglev(external, &mut slot_lists, &mut stats)?;

        // 2. Frontends that stay or are new, in phases over all of them (each phase one
        //    batch per map): slots and members, source ranges, the entries, then what
        //    shrank. An entry never names a slot that is not written yet.
        struct Change {
            key: FrontendKey,
            value: ServiceEntry,
            slots: Vec<u32>,
            old_slots: Vec<u32>,
            ranges: BTreeSet<(IpAddr, u8)>,
            old_ranges: BTreeSet<(IpAddr, u8)>,
        }
        let mut changes = Vec::with_capacity(slot_lists.len());
        let (mut slot_writes, mut member_writes, mut entry_writes) =
            (Vec::new(), Vec::new(), Vec::new());
        for (key, (value, slots)) in &slot_lists {
            let mut value = *value;
            let old = self.services.get(key).map(|p| (p.value, p.slots.clone()));
            value.svc_id = match &old {
                Some((v, _)) => v.svc_id,
                None => self.svc_ids.alloc(self.cap.services),
            };
            let (old_value, old_slots) = match old {
                Some((v, s)) => (Some(v), s),
                None => (None, Vec::new()),
            };
            for (i, id) in slots.iter().enumerate() {
                if old_slots.get(i) != Some(id) {
                    let mk = MemberKey {
                        svc_id: value.svc_id,
                        backend_id: *id,
                    };
                    member_writes.push((mk, i as u32));
                    let sk = BackendSlotKey {
                        svc_id: value.svc_id,
                        slot: i as u32,
                    };
                    slot_writes.push((sk, *id));
                }
            }
            if old_value != Some(value) {
                entry_writes.push((*key, value));
            }
            changes.push(Change {
                key: *key,
                value,
                slots: slots.clone(),
                old_slots,
                ranges: range_lists.remove(key).unwrap_or_default(),
                old_ranges: self.ranges.get(&value.svc_id).cloned().unwrap_or_default(),
            });
        }
        stats.writes += member_writes.len() + slot_writes.len() + entry_writes.len();
        self.maps.set_members(&member_writes)?;
        self.maps.set_slots(&slot_writes)?;
        for c in &changes {
            for (net, len) in c.ranges.difference(&c.old_ranges) {
                self.maps.set_source_range(c.value.svc_id, *net, *len)?;
                stats.writes += 1;
            }
        }
        self.maps.set_services(&entry_writes)?;
        for c in changes {
            let svc_id = c.value.svc_id;
            for (net, len) in c.old_ranges.difference(&c.ranges) {
                self.maps.delete_source_range(svc_id, *net, *len)?;
                stats.deletes += 1;
            }
            if c.ranges.is_empty() {
                self.ranges.remove(&svc_id);
            } else {
                self.ranges.insert(svc_id, c.ranges);
            }
            for i in c.slots.len()..c.old_slots.len() {
                let sk = BackendSlotKey {
                    svc_id,
                    slot: i as u32,
                };
                self.maps.delete_slot(&sk)?;
                stats.deletes += 1;
            }
            let kept: HashSet<&u32> = c.slots.iter().collect();
            for id in c.old_slots.iter().filter(|id| !kept.contains(id)) {
                let mk = MemberKey {
                    svc_id,
                    backend_id: *id,
                };
                self.maps.delete_member(&mk)?;
                stats.deletes += 1;
            }
            self.count_refs(&c.old_slots, &c.slots, &mut released);
            self.services.insert(
                c.key,
                Programmed {
                    value: c.value,
                    slots: c.slots,
                },
            );
        }

        // 3. Frontends no longer wanted: the entry first, then its slots.
        let gone: Vec<FrontendKey> = match partial {
            None => self
                .services
                .keys()
                .filter(|k| !slot_lists.contains_key(k))
                .copied()
                .collect(),
            Some(_) => in_scope
                .iter()
                .filter(|(k, _, _, st)| st.is_none() && self.services.contains_key(k))
                .map(|(k, ..)| *k)
                .collect(),
        };
        for key in gone {
            if let Some(p) = self.services.get(&key).cloned() {
                self.maps.delete_service(&key)?;
                stats.deletes += 1;
                for i in 0..p.slots.len() {
                    let sk = BackendSlotKey {
                        svc_id: p.value.svc_id,
                        slot: i as u32,
                    };
                    self.maps.delete_slot(&sk)?;
                    stats.deletes += 1;
                }
                for id in &p.slots {
                    let mk = MemberKey {
                        svc_id: p.value.svc_id,
                        backend_id: *id,
                    };
                    self.maps.delete_member(&mk)?;
                    stats.deletes += 1;
                }
                for (net, len) in self.ranges.remove(&p.value.svc_id).unwrap_or_default() {
                    self.maps.delete_source_range(p.value.svc_id, net, len)?;
                    stats.deletes += 1;
                }
                self.count_refs(&p.slots, &[], &mut released);
                self.services.remove(&key);
                self.svc_ids.release(p.value.svc_id);
            }
        }

        // Tables no entry names any more are free again (their content is left as it is).
        if partial.is_none() {
            self.maglev.retain(|name, _| tables.contains(name));
        } else {
            let looked_at: BTreeSet<FrontendKey> = in_scope.iter().map(|e| e.0).collect();
            self.maglev.retain(|name, t| {
                if !tables.contains(name) {
                    t.keys.retain(|k| !looked_at.contains(k));
                }
                !t.keys.is_empty()
            });
        }

        // 4. Backends nothing names any more.
        let mut unused: Vec<u32> = match partial {
            None => self.backends.keys().copied().collect(),
            Some(_) => released,
        };
        unused.retain(|id| !self.serving.contains(id) && !self.refs.contains_key(id));
        unused.sort_unstable();
        unused.dedup();
        for id in unused {
            if let Some(b) = self.backends.remove(&id) {
                self.maps.delete_backend(id, &b)?;
                self.backend_ids.forget(backend_identity(b));
                stats.deletes += 1;
            }
        }
        Ok(stats)
    }

    /// Moves slot reference counts from `old` to `new` slots; ids that lost a reference go to
    /// `released` (candidates for removal).
    fn count_refs(&mut self, old: &[u32], new: &[u32], released: &mut Vec<u32>) {
        for id in new {
            *self.refs.entry(*id).or_default() += 1;
        }
        for id in old {
            if let Some(n) = self.refs.get_mut(id) {
                *n -= 1;
                if *n == 0 {
                    self.refs.remove(id);
                }
            }
            released.push(*id);
        }
        self.slot_total = (self.slot_total + new.len()).saturating_sub(old.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        maps::{dump, MemMaps},
        model::{Backend, FrontendKind, FrontendState, L4Addr, Proto, ServicePortName},
    };
    use lb_common::map_names;
    use std::net::Ipv4Addr;

    fn addr(ip: [u8; 4], port: u16) -> L4Addr {
        L4Addr {
            addr: Ipv4Addr::from(ip).into(),
            port,
            proto: Proto::Tcp,
        }
    }

    fn desired(frontends: &[(L4Addr, &[L4Addr])]) -> Desired {
        let mut d = Desired::default();
        for (fe, backends) in frontends {
            d.frontends.insert(
                *fe,
                FrontendState {
                    service: ServicePortName {
                        namespace: "default".into(),
                        name: "s".into(),
                        port: String::new(),
                    },
                    kind: FrontendKind::ClusterIP,
                    backends: backends
                        .iter()
                        .map(|a| Backend {
                            addr: *a,
                            local: true,
                            terminating: false,
                        })
                        .collect(),
                    drop_when_empty: false,
                    affinity_timeout_s: 0,
                    source_ranges: Vec::new(),
                },
            );
        }
        d
    }

    fn shown(maps: &MemMaps) -> Vec<(String, Vec<String>)> {
        dump(maps)
            .expect("dump")
            .into_iter()
            .map(|f| {
                (
                    f.frontend,
                    f.backends.into_iter().map(|b| b.address).collect(),
                )
            })
            .collect()
    }

    const VIP: [u8; 4] = [10, 96, 0, 1];

    #[test]
    fn grow_writes_backends_then_slots_then_entry() {
        let mut r = Reconciler::new(MemMaps::default()).expect("new");
        let a = addr([10, 0, 0, 1], 80);
        let b = addr([10, 0, 0, 2], 80);
        r.apply(&desired(&[(addr(VIP, 80), &[a])])).expect("apply");
        r.maps.log.clear();
        r.apply(&desired(&[(addr(VIP, 80), &[a, b])]))
            .expect("apply");
        assert_eq!(
            r.maps.log,
            vec![
                "set backend 2",
                "set member 1/2 = 1",
                "set slot 1/1 = 2",
                "set service 1 count 2"
            ]
        );
        assert_eq!(
            shown(&r.maps),
            vec![(
                "10.96.0.1:80/TCP".into(),
                vec!["10.0.0.1:80/TCP".into(), "10.0.0.2:80/TCP".into()]
            )]
        );
    }

    #[test]
    fn shrink_writes_entry_before_removing_slots_and_backends() {
        let mut r = Reconciler::new(MemMaps::default()).expect("new");
        let a = addr([10, 0, 0, 1], 80);
        let b = addr([10, 0, 0, 2], 80);
        r.apply(&desired(&[(addr(VIP, 80), &[a, b])]))
            .expect("apply");
        r.maps.log.clear();
        r.apply(&desired(&[(addr(VIP, 80), &[a])])).expect("apply");
        assert_eq!(
            r.maps.log,
            vec![
                "set service 1 count 1",
                "delete slot 1/1",
                "delete member 1/2",
                "delete backend 2"
            ]
        );
    }

    #[test]
    fn unchanged_state_writes_nothing_and_removal_cleans_up() {
        let mut r = Reconciler::new(MemMaps::default()).expect("new");
        let d = desired(&[(addr(VIP, 80), &[addr([10, 0, 0, 1], 80)])]);
        r.apply(&d).expect("apply");
        let s = r.apply(&d).expect("apply");
        assert_eq!(s, ApplyStats::default());
        r.maps.log.clear();
        r.apply(&Desired::default()).expect("apply");
        assert_eq!(
            r.maps.log,
            vec![
                "delete service 1",
                "delete slot 1/0",
                "delete member 1/1",
                "delete backend 1"
            ]
        );
        assert!(
            r.maps.services.is_empty() && r.maps.slots.is_empty() && r.maps.backends.is_empty()
        );
    }

    #[test]
    fn restart_takes_over_pinned_state_and_removes_what_is_unwanted() {
        let mut r = Reconciler::new(MemMaps::default()).expect("new");
        let a = addr([10, 0, 0, 1], 80);
        let b = addr([10, 0, 0, 2], 80);
        let other = addr([10, 96, 0, 2], 53);
        r.apply(&desired(&[(addr(VIP, 80), &[a, b]), (other, &[b])]))
            .expect("apply");
        // A stray slot beyond the count, as a crashed writer could leave.
        let mut maps = r.maps.clone();
        maps.slots.insert((1, 7), 1);
        // A stray member, and a missing one.
        maps.members.insert((1, 99), 3);
        maps.members.remove(&(1, 1));
        maps.log.clear();

        // A new agent: same wanted state for VIP, `other` is gone.
        let mut r2 = Reconciler::new(maps).expect("take over");
        assert_eq!(
            r2.maps.log,
            vec![
                "delete slot 1/7",
                "delete member 1/99",
                "set member 1/1 = 0"
            ]
        );
        r2.maps.log.clear();
        r2.apply(&desired(&[(addr(VIP, 80), &[a, b])]))
            .expect("apply");
        assert_eq!(
            r2.maps.log,
            vec!["delete service 2", "delete slot 2/0", "delete member 2/2"]
        );
        // New ids never collide with the ones taken over.
        r2.apply(&desired(&[
            (addr(VIP, 80), &[a, b]),
            (other, &[addr([10, 0, 0, 3], 53)]),
        ]))
        .expect("apply");
        assert!(r2.maps.backends.contains_key(&3));
        assert!(r2.maps.services.values().any(|v| v.svc_id == 3));
    }

    #[test]
    fn serving_backends_outside_every_slot_list_are_kept() {
        let mut r = Reconciler::new(MemMaps::default()).expect("new");
        let a = addr([10, 0, 0, 1], 80);
        let b = addr([10, 0, 0, 2], 80);
        r.apply(&desired(&[(addr(VIP, 80), &[a, b])]))
            .expect("apply");
        // b starts terminating: out of the slots, still in the backends, flagged.
        let mut d = desired(&[(addr(VIP, 80), &[a])]);
        d.serving.insert(
            b,
            Backend {
                addr: b,
                local: true,
                terminating: true,
            },
        );
        r.maps.log.clear();
        r.apply(&d).expect("apply");
        assert_eq!(
            r.maps.log,
            vec![
                "set backend 2",
                "set service 1 count 1",
                "delete slot 1/1",
                "delete member 1/2"
            ]
        );
        assert_ne!(
            r.maps.backends[&2].flags & lb_common::BACKEND_F_TERMINATING,
            0
        );
        // Gone from the serving set too: deleted.
        r.maps.log.clear();
        r.apply(&desired(&[(addr(VIP, 80), &[a])])).expect("apply");
        assert_eq!(r.maps.log, vec!["delete backend 2"]);
    }

    #[test]
    fn a_state_the_maps_cannot_hold_is_refused_before_any_write() {
        // Maps made for 100 service ids (99 frontends), 50 backend ids, 120 slots.
        let maps = MemMaps {
            capacity: Capacity {
                services: 100,
                backends: 50,
                slots: 120,
            },
            ..Default::default()
        };
        let mut r = Reconciler::new(maps).expect("new");
        let a = addr([10, 0, 0, 1], 80);
        let frontends =
            |n: usize| -> Vec<L4Addr> { (0..n).map(|i| addr([10, 97, 0, i as u8], 80)).collect() };
        let backends = [a];
        let fit = frontends(99);
        let wanted: Vec<(L4Addr, &[L4Addr])> = fit.iter().map(|f| (*f, &backends[..])).collect();
        r.apply(&desired(&wanted)).expect("99 frontends fit");
        assert_eq!(r.maps.services.len(), 99);
        r.maps.log.clear();
        // One frontend more than LB4_SERVICES holds.
        let many = frontends(100);
        let wanted: Vec<(L4Addr, &[L4Addr])> = many.iter().map(|f| (*f, &backends[..])).collect();
        let err = r.apply(&desired(&wanted)).expect_err("over capacity");
        assert_eq!(err.map, map_names::LB4_SERVICES);
        assert!(err.to_string().contains("room for 99"), "{err}");
        assert!(err.to_string().contains("nothing was changed"), "{err}");
        // More slots than LB_SLOTS holds: 3 frontends of 41 backends, 50 backend ids.
        let many_backends: Vec<L4Addr> = (0..41).map(|i| addr([10, 0, 1, i as u8], 80)).collect();
        let three = frontends(3);
        let wanted: Vec<(L4Addr, &[L4Addr])> =
            three.iter().map(|f| (*f, &many_backends[..])).collect();
        let err = r.apply(&desired(&wanted)).expect_err("over capacity");
        assert_eq!(err.map, map_names::LB_SLOTS, "{err}");
        // More backends than backend ids.
        let too_many: Vec<L4Addr> = (0..50).map(|i| addr([10, 0, 2, i as u8], 80)).collect();
        let err = r
            .apply(&desired(&[(fit[0], &too_many[..])]))
            .expect_err("over capacity");
        assert_eq!(err.map, map_names::LB4_BACKENDS, "{err}");
        assert!(
            r.maps.log.is_empty(),
            "wrote {:?}",
            &r.maps.log[..3.min(r.maps.log.len())]
        );
        assert_eq!(r.maps.services.len(), 99, "the last good state stays");
    }

    #[test]
    fn a_failed_apply_is_repaired_by_a_reconciler_that_rereads_the_maps() {
        // What the agent does after a map write fails: start over from what the maps hold.
        let mut r = Reconciler::new(MemMaps::default()).expect("new");
        let (a, b) = (addr([10, 0, 0, 1], 80), addr([10, 0, 0, 2], 80));
        r.apply(&desired(&[(addr(VIP, 80), &[a])])).expect("apply");
        let mut maps = r.maps.clone();
        maps.log.clear();
        maps.fail_after = Some(2); // the third write fails
        let mut r = Reconciler::new(maps).expect("take over");
        let wanted = desired(&[(addr(VIP, 80), &[a, b]), (addr([10, 96, 0, 2], 53), &[b])]);
        assert!(r.apply(&wanted).is_err());
        let mut maps = r.maps.clone();
        maps.fail_after = None;
        let mut r = Reconciler::new(maps).expect("take over again");
        r.apply(&wanted).expect("apply");
        assert_eq!(
            shown(&r.maps),
            vec![
                (
                    "10.96.0.1:80/TCP".into(),
                    vec!["10.0.0.1:80/TCP".into(), "10.0.0.2:80/TCP".into()]
                ),
                ("10.96.0.2:53/TCP".into(), vec!["10.0.0.2:80/TCP".into()]),
            ]
        );
        // Nothing stray: every slot and member belongs to a programmed entry.
        assert_eq!(r.maps.slots.len(), 3);
        assert_eq!(r.maps.members.len(), 3);
        assert_eq!(r.maps.backends.len(), 2);
    }

    #[test]
    fn empty_frontend_is_kept_with_count_zero() {
        let mut r = Reconciler::new(MemMaps::default()).expect("new");
        r.apply(&desired(&[(addr(VIP, 80), &[])])).expect("apply");
        let rows = dump(&r.maps).expect("dump");
        assert_eq!(rows.len(), 1);
        assert!(rows[0].backends.is_empty());
        assert_eq!(rows[0].no_backend, "reject");
    }

    #[test]
    fn external_frontends_of_a_service_port_share_one_maglev_table() {
        let maps = MemMaps {
            maglev_size: 13,
            maglev_tables: 2,
            ..Default::default()
        };
        let mut r = Reconciler::new(maps).expect("reconciler");
        let b1 = addr([10, 244, 0, 1], 8080);
        let b2 = addr([10, 244, 0, 2], 8080);
        let np = addr([198, 18, 0, 2], 30080);
        let lb = addr([203, 0, 113, 20], 80);
        let cip = addr([10, 96, 0, 1], 80);
        let mut d = desired(&[(np, &[b1, b2]), (lb, &[b1, b2]), (cip, &[b1, b2])]);
        d.frontends.get_mut(&np).expect("np").kind = FrontendKind::NodePort;
        d.frontends.get_mut(&lb).expect("lb").kind = FrontendKind::LoadBalancer;
        r.apply(&d).expect("apply");
        let get = |r: &Reconciler<MemMaps>, a: &L4Addr| {
            r.maps()
                .service(&frontend_key(a, SCOPE_ALL))
                .expect("programmed")
                .maglev
        };
        let (np_table, lb_table) = (get(&r, &np), get(&r, &lb));
        assert_eq!(np_table, lb_table, "one table for the Service port");
        assert_ne!(np_table, 0);
        assert_eq!(get(&r, &cip), 0, "ClusterIPs choose at random");
        let table = &r.maps().maglev[&(np_table - 1)];
        assert_eq!(table.len(), 13);
        let ids: BTreeSet<u32> = table.iter().copied().collect();
        assert_eq!(ids.len(), 2, "both backends own entries: {table:?}");

        // One backend goes: the table is rewritten in place, entries of the other stay.
        let mut d2 = desired(&[(np, &[b2]), (lb, &[b2]), (cip, &[b2])]);
        d2.frontends.get_mut(&np).expect("np").kind = FrontendKind::NodePort;
        d2.frontends.get_mut(&lb).expect("lb").kind = FrontendKind::LoadBalancer;
        r.apply(&d2).expect("apply");
        let idx = get(&r, &np);
        assert_eq!(idx, np_table, "rewritten in place");
        let remaining: BTreeSet<u32> = r.maps().maglev[&(idx - 1)].iter().copied().collect();
        assert_eq!(remaining.len(), 1);
        assert!(r
            .maps()
            .backends
            .contains_key(remaining.iter().next().expect("one")));

        // Three Service ports with external frontends do not fit two tables: refused whole.
        let other = |i: u8| {
            let s = ServicePortName {
                namespace: "default".into(),
                name: format!("s{i}"),
                port: String::new(),
            };
            (addr([198, 18, 0, 2], 30000 + u16::from(i)), s)
        };
        let mut d3 = d2.clone();
        for i in 1..=2 {
            let (fe, name) = other(i);
            let mut st = d3.frontends[&np].clone();
            st.service = name;
            d3.frontends.insert(fe, st);
        }
        let before = r.maps().clone();
        let err = r.apply(&d3).expect_err("no room for a third table");
        assert_eq!(err.op, "capacity", "{err}");
        assert_eq!(r.maps().log, before.log, "nothing written");
    }

    #[test]
    fn counters_of_never_used_backend_ids_are_not_reset() {
        let b = [addr([10, 244, 0, 1], 80), addr([10, 244, 0, 2], 80)];
        let fe = addr([10, 96, 0, 1], 80);
        // Fresh maps: ids 1 and 2 were never used; the watermark moves ahead first.
        let mut r = Reconciler::new(MemMaps::default()).expect("reconciler");
        r.apply(&desired(&[(fe, &b)])).expect("apply");
        assert!(r.maps().stats_reset.is_empty());
        assert_eq!(r.maps().watermark, 1 + ids::WATERMARK_STEP);
        // Maps whose ids up to 100 were used before: their counters are reset on reuse.
        let used = MemMaps {
            watermark: 100,
            ..Default::default()
        };
        let mut r = Reconciler::new(used).expect("reconciler");
        r.apply(&desired(&[(fe, &b)])).expect("apply");
        assert_eq!(r.maps().stats_reset, vec![1, 2]);
        assert_eq!(r.maps().watermark, 100);
    }

    fn addr6(ip: &str, port: u16) -> L4Addr {
        L4Addr {
            addr: ip.parse().expect("address"),
            port,
            proto: Proto::Tcp,
        }
    }

    #[test]
    fn both_families_are_written_in_one_order_under_one_id_space() {
        let mut r = Reconciler::new(MemMaps::default()).expect("new");
        let (a4, a6) = (addr([10, 0, 0, 1], 80), addr6("fd00:10:244::1", 80));
        let vip6 = addr6("fd00:10:96::1", 80);
        r.apply(&desired(&[(addr(VIP, 80), &[a4]), (vip6, &[a6])]))
            .expect("apply");
        // Backends of both families, then slots, then the entries: one phase at a time.
        assert_eq!(
            r.maps.log,
            vec![
                "set backend 1",
                "set backend6 2",
                "set member 1/1 = 0",
                "set member 2/2 = 0",
                "set slot 1/0 = 1",
                "set slot 2/0 = 2",
                "set service 1 count 1",
                "set service6 2 count 1",
            ]
        );
        assert_eq!((r.maps.services.len(), r.maps.services6.len()), (1, 1));
        assert_eq!(r.maps.backends.keys().collect::<Vec<_>>(), vec![&1]);
        assert_eq!(r.maps.backends6.keys().collect::<Vec<_>>(), vec![&2]);
        assert_eq!(
            shown(&r.maps),
            vec![
                ("10.96.0.1:80/TCP".into(), vec!["10.0.0.1:80/TCP".into()]),
                (
                    "[fd00:10:96::1]:80/TCP".into(),
                    vec!["[fd00:10:244::1]:80/TCP".into()]
                ),
            ]
        );
        // The IPv6 frontend grows, then goes: its entry first, then slots and backends.
        let b6 = addr6("fd00:10:244::2", 80);
        r.maps.log.clear();
        r.apply(&desired(&[(addr(VIP, 80), &[a4]), (vip6, &[a6, b6])]))
            .expect("apply");
        assert_eq!(
            r.maps.log,
            vec![
                "set backend6 3",
                "set member 2/3 = 1",
                "set slot 2/1 = 3",
                "set service6 2 count 2"
            ]
        );
        r.maps.log.clear();
        r.apply(&desired(&[(addr(VIP, 80), &[a4])])).expect("apply");
        assert_eq!(
            r.maps.log,
            vec![
                "delete service6 2",
                "delete slot 2/0",
                "delete slot 2/1",
                "delete member 2/2",
                "delete member 2/3",
                "delete backend6 2",
                "delete backend6 3",
            ]
        );
        assert!(r.maps.services6.is_empty() && r.maps.backends6.is_empty());
    }

    #[test]
    fn restart_takes_over_both_families() {
        let mut r = Reconciler::new(MemMaps::default()).expect("new");
        let vip6 = addr6("fd00:10:96::1", 53);
        let wanted = desired(&[
            (addr(VIP, 80), &[addr([10, 0, 0, 1], 80)]),
            (vip6, &[addr6("fd00:10:244::1", 53)]),
            (addr6("fd00:10:96::2", 80), &[addr6("fd00:10:244::2", 80)]),
        ]);
        r.apply(&wanted).expect("apply");
        let mut maps = r.maps.clone();
        maps.log.clear();
        // A new agent reads both families back and rewrites nothing that is still right.
        let mut r2 = Reconciler::new(maps).expect("take over");
        assert!(r2.maps.log.is_empty(), "{:?}", r2.maps.log);
        assert_eq!(r2.apply(&wanted).expect("apply"), ApplyStats::default());
        assert_eq!(r2.fill()[1].entries, 2, "LB6_SERVICES holds two");
        // What is no longer wanted goes, in either family; ids are not reused while held.
        let mut less = wanted.clone();
        less.frontends.remove(&vip6);
        r2.apply(&less).expect("apply");
        assert_eq!(
            r2.maps.log,
            vec![
                "delete service6 2",
                "delete slot 2/0",
                "delete member 2/2",
                "delete backend6 2"
            ]
        );
        r2.apply(&wanted).expect("apply");
        assert!(
            r2.maps.backends6.contains_key(&4),
            "{:?}",
            r2.maps.backends6
        );
        assert!(!r2.maps.backends.contains_key(&4));
    }

    #[test]
    fn source_ranges_of_ipv6_frontends_go_to_their_map() {
        let mut r = Reconciler::new(MemMaps::default()).expect("new");
        let lb6 = addr6("2001:db8:1b::10", 443);
        let mut d = desired(&[(lb6, &[addr6("fd00:10:244::1", 8443)])]);
        let st = d.frontends.get_mut(&lb6).expect("frontend");
        st.kind = FrontendKind::LoadBalancer;
        st.source_ranges = vec![("2001:db8:c::".parse().expect("address"), 48)];
        r.apply(&d).expect("apply");
        assert_eq!(
            r.maps.source_ranges.iter().copied().collect::<Vec<_>>(),
            vec![(1, "2001:db8:c::".parse().expect("address"), 48)]
        );
        let entry = r
            .maps
            .service(&frontend_key(&lb6, SCOPE_ALL))
            .expect("entry");
        assert_ne!(entry.flags & SVC_F_SOURCE_RANGES, 0);
        // Read back at a restart, removed with the frontend.
        let mut r = Reconciler::new(r.maps.clone()).expect("take over");
        r.maps.log.clear();
        r.apply(&Desired::default()).expect("apply");
        assert!(r.maps.source_ranges.is_empty());
        assert!(r
            .maps
            .log
            .contains(&"delete range 1 2001:db8:c::/48".to_string()));
    }

    #[test]
    fn capacity_counts_both_families_in_one_id_space() {
        let maps = MemMaps {
            capacity: Capacity {
                services: 100,
                backends: 50,
                slots: 1000,
            },
            ..Default::default()
        };
        let mut r = Reconciler::new(maps).expect("new");
        let b4 = [addr([10, 0, 0, 1], 80)];
        let b6 = [addr6("fd00:10:244::1", 80)];
        // 60 + 60 frontends: each family fits its map, not the 99 service ids together.
        let fe4: Vec<L4Addr> = (0..60).map(|i| addr([10, 97, 0, i as u8], 80)).collect();
        let fe6: Vec<L4Addr> = (0..60)
            .map(|i| addr6(&format!("fd00:10:97::{i:x}"), 80))
            .collect();
        let mut wanted: Vec<(L4Addr, &[L4Addr])> = fe4.iter().map(|f| (*f, &b4[..])).collect();
        wanted.extend(fe6.iter().map(|f| (*f, &b6[..])));
        let err = r.apply(&desired(&wanted)).expect_err("over capacity");
        assert_eq!(err.map, map_names::LB_SVC_STATS, "{err}");
        assert!(
            err.to_string().contains("120 entries wanted, room for 99"),
            "{err}"
        );
        assert!(r.maps.log.is_empty(), "nothing written");
        // 30 + 30 backends: each family fits, not the 49 backend ids together.
        let many4: Vec<L4Addr> = (0..30).map(|i| addr([10, 0, 1, i as u8], 80)).collect();
        let many6: Vec<L4Addr> = (0..30)
            .map(|i| addr6(&format!("fd00:10:244:1::{i:x}"), 80))
            .collect();
        let err = r
            .apply(&desired(&[(fe4[0], &many4[..]), (fe6[0], &many6[..])]))
            .expect_err("over capacity");
        assert_eq!(err.map, map_names::LB_BE_STATS, "{err}");
        // What fits is taken, and counted by family.
        r.apply(&desired(&[(fe4[0], &many4[..10]), (fe6[0], &many6[..10])]))
            .expect("fits");
        let fill: Vec<(&str, usize)> = r.fill().iter().map(|f| (f.map, f.entries)).collect();
        assert_eq!(
            fill,
            vec![
                ("LB4_SERVICES", 1),
                ("LB6_SERVICES", 1),
                ("LB_SVC_STATS", 2),
                ("LB_SLOTS", 20),
                ("LB_MEMBERS", 20),
                ("LB4_BACKENDS", 10),
                ("LB6_BACKENDS", 10),
                ("LB_BE_STATS", 20),
            ]
        );
    }

    #[test]
    fn a_backend_of_the_other_family_is_refused_before_any_write() {
        let mut r = Reconciler::new(MemMaps::default()).expect("new");
        let err = r
            .apply(&desired(&[(addr(VIP, 80), &[addr6("fd00:10:244::1", 80)])]))
            .expect_err("mixed families");
        assert_eq!((err.map, err.op), (map_names::LB_SLOTS, "family"));
        assert!(
            err.to_string()
                .contains("frontend 10.96.0.1:80/TCP of default/s has backend [fd00:10:244::1]:80/TCP of the other family"),
            "{err}"
        );
        assert!(
            r.maps.log.is_empty() && r.maps.watermark == 0,
            "nothing written"
        );
    }

    #[test]
    fn each_family_of_a_service_port_has_its_maglev_table() {
        let maps = MemMaps {
            maglev_size: 13,
            maglev_tables: 4,
            ..Default::default()
        };
        let mut r = Reconciler::new(maps).expect("reconciler");
        let np4 = addr([198, 18, 0, 2], 30080);
        let np6 = addr6("2001:db8:18::2", 30080);
        let (b4, b6) = (addr([10, 244, 0, 1], 8080), addr6("fd00:10:244::1", 8080));
        let mut d = desired(&[(np4, &[b4]), (np6, &[b6])]);
        for st in d.frontends.values_mut() {
            st.kind = FrontendKind::NodePort;
        }
        r.apply(&d).expect("apply");
        let table = |r: &Reconciler<MemMaps>, a: &L4Addr| {
            r.maps()
                .service(&frontend_key(a, SCOPE_ALL))
                .expect("programmed")
                .maglev
        };
        let (t4, t6) = (table(&r, &np4), table(&r, &np6));
        assert!(t4 != 0 && t6 != 0 && t4 != t6, "{t4} {t6}");
        // Each table names its family's backend only.
        let ids = |t: u32| -> BTreeSet<u32> { r.maps().maglev[&(t - 1)].iter().copied().collect() };
        assert_eq!(ids(t4), BTreeSet::from([1]));
        assert_eq!(ids(t6), BTreeSet::from([2]));
        assert!(r.maps().backends6.contains_key(&2));
    }
}
