//! The service maps as the reconciler sees them: a small trait, `ServiceMaps`, with an
//! in-memory implementation for tests (`MemMaps`); the pinned maps implement it in
//! `lb_userspace::datapath::pinned_maps`. Also how the desired state is encoded into map
//! keys and values (`encode`) and how the maps read back as frontends and backends (`dump`).
//!
//! Both families go through one trait: a frontend key or backend value says its family
//! (`FrontendKey`, `BackendValue`), and the implementations write it to the `LB4_*` or
//! `LB6_*` map. Service ids and backend ids are one space over both, so slots, members,
//! Maglev tables and counters need no family.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use lb_common::{
    ipv6_bytes, BackendSlotKey, BackendV4, BackendV6, MemberKey, ServiceEntry, ServiceKeyV4,
    ServiceKeyV6, DEFAULT_BACKENDS, DEFAULT_BACKEND_SLOTS, DEFAULT_SERVICES,
};

mod dump;
mod encode;

pub use dump::{dump, BackendDump, FrontendDump};
pub use encode::{backend_value, frontend_key, kind_flag};

/// The key of a frontend entry, in `LB4_SERVICES` or `LB6_SERVICES` by its family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FrontendKey {
    V4(ServiceKeyV4),
    V6(ServiceKeyV6),
}

impl FrontendKey {
    /// The frontend's address.
    pub fn addr(&self) -> IpAddr {
        match self {
            FrontendKey::V4(k) => IpAddr::V4(Ipv4Addr::from(k.addr.to_ne_bytes())),
            FrontendKey::V6(k) => IpAddr::V6(Ipv6Addr::from(ipv6_bytes(k.addr))),
        }
    }
    /// The port (network byte order), protocol and `SCOPE_*` of the entry.
    pub fn port_proto_scope(&self) -> (u16, u8, u8) {
        match self {
            FrontendKey::V4(k) => (k.port, k.proto, k.scope),
            FrontendKey::V6(k) => (k.port, k.proto, k.scope),
        }
    }
    pub fn is_ipv6(&self) -> bool {
        matches!(self, FrontendKey::V6(_))
    }
}

/// A backend entry, in `LB4_BACKENDS` or `LB6_BACKENDS` by its family (under one id space).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BackendValue {
    V4(BackendV4),
    V6(BackendV6),
}

impl BackendValue {
    /// The backend's address.
    pub fn addr(&self) -> IpAddr {
        match self {
            BackendValue::V4(b) => IpAddr::V4(Ipv4Addr::from(b.addr.to_ne_bytes())),
            BackendValue::V6(b) => IpAddr::V6(Ipv6Addr::from(ipv6_bytes(b.addr))),
        }
    }
    /// The port (network byte order) and protocol.
    pub fn port_proto(&self) -> (u16, u8) {
        match self {
            BackendValue::V4(b) => (b.port, b.proto),
            BackendValue::V6(b) => (b.port, b.proto),
        }
    }
    /// `BACKEND_F_*`.
    pub fn flags(&self) -> u8 {
        match self {
            BackendValue::V4(b) => b.flags,
            BackendValue::V6(b) => b.flags,
        }
    }
    pub fn is_ipv6(&self) -> bool {
        matches!(self, BackendValue::V6(_))
    }
}

impl From<BackendV4> for BackendValue {
    fn from(b: BackendV4) -> Self {
        BackendValue::V4(b)
    }
}

impl From<BackendV6> for BackendValue {
    fn from(b: BackendV6) -> Self {
        BackendValue::V6(b)
    }
}

/// A map operation that failed: which map, what was done, and the cause (a kernel error, a
/// capacity refusal).
#[derive(Debug, thiserror::Error)]
#[error("map {map}: {op}: {cause}")]
pub struct MapError {
    pub map: &'static str,
    pub op: &'static str,
    pub cause: Box<dyn std::error::Error + Send + Sync>,
}

impl MapError {
    pub fn new(
        map: &'static str,
        op: &'static str,
        cause: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        MapError {
            map,
            op,
            cause: cause.into(),
        }
    }
}

/// How many entries the service maps hold (set when the maps are created). The maps of
/// either family are as large as the id space both share, so that one limit on the ids
/// covers them all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// `LB4_SERVICES` and `LB6_SERVICES`, and `LB_SVC_STATS` which service ids (of both
    /// families) index: the smallest of them.
    pub services: u32,
    /// `LB4_BACKENDS` and `LB6_BACKENDS`, and `LB_BE_STATS` which backend ids (of both
    /// families) index: the smallest of them.
    pub backends: u32,
    /// `LB_SLOTS` and `LB_MEMBERS`.
    pub slots: u32,
}

impl Default for Capacity {
    fn default() -> Self {
        Capacity {
            services: DEFAULT_SERVICES,
            backends: DEFAULT_BACKENDS,
            slots: DEFAULT_BACKEND_SLOTS,
        }
    }
}

impl Capacity {
    /// Frontends that fit, both families together: their service ids start at 1 and index
    /// `LB_SVC_STATS`, so one fewer than the map's size.
    pub fn frontends(&self) -> usize {
        self.services.saturating_sub(1) as usize
    }
    /// Backends that fit, both families together: ids from 1, indexing `LB_BE_STATS`.
    pub fn backend_entries(&self) -> usize {
        self.backends.saturating_sub(1) as usize
    }
}

/// The maps the reconciler programs. Frontend entries and backends of either family go to
/// their family's map; service and backend ids are one space over both.
pub trait ServiceMaps {
    /// The maps' sizes.
    fn capacity(&self) -> Capacity;
    /// The entries of `LB4_SERVICES` and `LB6_SERVICES`.
    fn services(&self) -> Result<Vec<(FrontendKey, ServiceEntry)>, MapError>;
    fn slots(&self) -> Result<Vec<(BackendSlotKey, u32)>, MapError>;
    /// The entries of `LB4_BACKENDS` and `LB6_BACKENDS`, by backend id.
    fn backends(&self) -> Result<Vec<(u32, BackendValue)>, MapError>;
    fn set_service(&mut self, key: &FrontendKey, value: &ServiceEntry) -> Result<(), MapError>;
    fn delete_service(&mut self, key: &FrontendKey) -> Result<(), MapError>;
    fn set_slot(&mut self, key: &BackendSlotKey, backend_id: u32) -> Result<(), MapError>;
    fn delete_slot(&mut self, key: &BackendSlotKey) -> Result<(), MapError>;
    fn set_backend(&mut self, id: u32, value: &BackendValue) -> Result<(), MapError>;
    /// Deletes backend `id`, which holds `value`, from the map of its family.
    fn delete_backend(&mut self, id: u32, value: &BackendValue) -> Result<(), MapError>;
    fn members(&self) -> Result<Vec<(MemberKey, u32)>, MapError>;
    fn set_member(&mut self, key: &MemberKey, slot: u32) -> Result<(), MapError>;
    fn delete_member(&mut self, key: &MemberKey) -> Result<(), MapError>;
    /// Zeroes the counters of a backend id about to be (re)used.
    fn reset_backend_stats(&mut self, id: u32) -> Result<(), MapError>;
    /// Backend ids above this were never used (`LB_CONFIG[BACKEND_ID_WATERMARK]`).
    fn backend_id_watermark(&self) -> Result<u32, MapError>;
    fn set_backend_id_watermark(&mut self, id: u32) -> Result<(), MapError>;
    /// `LB_MAGLEV`: (entries of one table, number of tables).
    fn maglev_geometry(&self) -> (u32, u32);
    /// Makes Maglev table `index` hold `content` (one table's entries); returns how many
    /// entries changed. Entries change one by one, each always a valid backend id.
    fn set_maglev_table(&mut self, index: u32, content: &[u32]) -> Result<usize, MapError>;
    /// `LB4_SRC_RANGES` and `LB6_SRC_RANGES`: (service id, network, prefix length), the
    /// network's family saying which.
    fn source_ranges(&self) -> Result<Vec<(u32, IpAddr, u8)>, MapError>;
    fn set_source_range(&mut self, svc_id: u32, net: IpAddr, len: u8) -> Result<(), MapError>;
    fn delete_source_range(&mut self, svc_id: u32, net: IpAddr, len: u8) -> Result<(), MapError>;

    // Many entries of one kind at once (the pinned maps use one syscall per batch and
    // family). The entries of a batch are written in no particular order.
    fn set_services(&mut self, entries: &[(FrontendKey, ServiceEntry)]) -> Result<(), MapError> {
        entries.iter().try_for_each(|(k, v)| self.set_service(k, v))
    }
    fn set_slots(&mut self, entries: &[(BackendSlotKey, u32)]) -> Result<(), MapError> {
        entries.iter().try_for_each(|(k, v)| self.set_slot(k, *v))
    }
    fn set_backends(&mut self, entries: &[(u32, BackendValue)]) -> Result<(), MapError> {
        entries
            .iter()
            .try_for_each(|(k, v)| self.set_backend(*k, v))
    }
    fn set_members(&mut self, entries: &[(MemberKey, u32)]) -> Result<(), MapError> {
        entries.iter().try_for_each(|(k, v)| self.set_member(k, *v))
    }
}

/// Maps in memory, one field per map, with a log of every write (so tests can check the
/// order of updates; IPv6 entries are logged as `service6`, `backend6`).
#[derive(Debug, Default, Clone)]
pub struct MemMaps {
    /// `LB4_SERVICES`.
    pub services: BTreeMap<ServiceKeyV4, ServiceEntry>,
    /// `LB6_SERVICES`.
    pub services6: BTreeMap<ServiceKeyV6, ServiceEntry>,
    pub slots: BTreeMap<(u32, u32), u32>,
    /// `LB4_BACKENDS`.
    pub backends: BTreeMap<u32, BackendV4>,
    /// `LB6_BACKENDS`.
    pub backends6: BTreeMap<u32, BackendV6>,
    pub members: BTreeMap<(u32, u32), u32>,
    /// Backend ids whose counters were reset (kept out of `log`).
    pub stats_reset: Vec<u32>,
    pub watermark: u32,
    /// Maglev tables by index; `maglev_size` 0 means no Maglev tables.
    pub maglev: BTreeMap<u32, Vec<u32>>,
    pub maglev_size: u32,
    pub maglev_tables: u32,
    /// `LB4_SRC_RANGES` and `LB6_SRC_RANGES`.
    pub source_ranges: BTreeSet<(u32, IpAddr, u8)>,
    pub log: Vec<String>,
    /// Fail writes after this many (to test error handling).
    pub fail_after: Option<usize>,
    pub capacity: Capacity,
}

impl MemMaps {
    fn write(&mut self, what: String) -> Result<(), MapError> {
        if let Some(n) = self.fail_after {
            if self.log.len() >= n {
                return Err(MapError::new("mem", "update", "injected failure"));
            }
        }
        self.log.push(what);
        Ok(())
    }

    /// The entry of a frontend key, in the map of its family.
    pub fn service(&self, key: &FrontendKey) -> Option<&ServiceEntry> {
        match key {
            FrontendKey::V4(k) => self.services.get(k),
            FrontendKey::V6(k) => self.services6.get(k),
        }
    }
}

impl ServiceMaps for MemMaps {
    fn capacity(&self) -> Capacity {
        self.capacity
    }
    fn services(&self) -> Result<Vec<(FrontendKey, ServiceEntry)>, MapError> {
        let v4 = self.services.iter().map(|(k, v)| (FrontendKey::V4(*k), *v));
        let v6 = self
            .services6
            .iter()
            .map(|(k, v)| (FrontendKey::V6(*k), *v));
        Ok(v4.chain(v6).collect())
    }
    fn slots(&self) -> Result<Vec<(BackendSlotKey, u32)>, MapError> {
        Ok(self
            .slots
            .iter()
            .map(|(&(svc_id, slot), &id)| (BackendSlotKey { svc_id, slot }, id))
            .collect())
    }
    fn backends(&self) -> Result<Vec<(u32, BackendValue)>, MapError> {
        let v4 = self
            .backends
            .iter()
            .map(|(k, v)| (*k, BackendValue::V4(*v)));
        let v6 = self
            .backends6
            .iter()
            .map(|(k, v)| (*k, BackendValue::V6(*v)));
        Ok(v4.chain(v6).collect())
    }
    fn set_service(&mut self, key: &FrontendKey, value: &ServiceEntry) -> Result<(), MapError> {
        let six = if key.is_ipv6() { "6" } else { "" };
        self.write(format!(
            "set service{six} {} count {}",
            value.svc_id, value.count
        ))?;
        match key {
            FrontendKey::V4(k) => self.services.insert(*k, *value),
            FrontendKey::V6(k) => self.services6.insert(*k, *value),
        };
        Ok(())
    }
    fn delete_service(&mut self, key: &FrontendKey) -> Result<(), MapError> {
        let id = self.service(key).map_or(0, |v| v.svc_id);
        let six = if key.is_ipv6() { "6" } else { "" };
        self.write(format!("delete service{six} {id}"))?;
        match key {
            FrontendKey::V4(k) => self.services.remove(k),
            FrontendKey::V6(k) => self.services6.remove(k),
        };
        Ok(())
    }
    fn set_slot(&mut self, key: &BackendSlotKey, backend_id: u32) -> Result<(), MapError> {
        self.write(format!(
            "set slot {}/{} = {backend_id}",
            key.svc_id, key.slot
        ))?;
        self.slots.insert((key.svc_id, key.slot), backend_id);
        Ok(())
    }
    fn delete_slot(&mut self, key: &BackendSlotKey) -> Result<(), MapError> {
        self.write(format!("delete slot {}/{}", key.svc_id, key.slot))?;
        self.slots.remove(&(key.svc_id, key.slot));
        Ok(())
    }
    fn set_backend(&mut self, id: u32, value: &BackendValue) -> Result<(), MapError> {
        match value {
            BackendValue::V4(b) => {
                self.write(format!("set backend {id}"))?;
                self.backends.insert(id, *b);
            }
            BackendValue::V6(b) => {
                self.write(format!("set backend6 {id}"))?;
                self.backends6.insert(id, *b);
            }
        }
        Ok(())
    }
    fn delete_backend(&mut self, id: u32, value: &BackendValue) -> Result<(), MapError> {
        if value.is_ipv6() {
            self.write(format!("delete backend6 {id}"))?;
            self.backends6.remove(&id);
        } else {
            self.write(format!("delete backend {id}"))?;
            self.backends.remove(&id);
        }
        Ok(())
    }
    fn members(&self) -> Result<Vec<(MemberKey, u32)>, MapError> {
        Ok(self
            .members
            .iter()
            .map(|(&(svc_id, backend_id), &slot)| (MemberKey { svc_id, backend_id }, slot))
            .collect())
    }
    fn set_member(&mut self, key: &MemberKey, slot: u32) -> Result<(), MapError> {
        self.write(format!(
            "set member {}/{} = {slot}",
            key.svc_id, key.backend_id
        ))?;
        self.members.insert((key.svc_id, key.backend_id), slot);
        Ok(())
    }
    fn delete_member(&mut self, key: &MemberKey) -> Result<(), MapError> {
        self.write(format!("delete member {}/{}", key.svc_id, key.backend_id))?;
        self.members.remove(&(key.svc_id, key.backend_id));
        Ok(())
    }
    fn reset_backend_stats(&mut self, id: u32) -> Result<(), MapError> {
        self.stats_reset.push(id);
        Ok(())
    }
    fn backend_id_watermark(&self) -> Result<u32, MapError> {
        Ok(self.watermark)
    }
    fn set_backend_id_watermark(&mut self, id: u32) -> Result<(), MapError> {
        self.watermark = id;
        Ok(())
    }
    fn maglev_geometry(&self) -> (u32, u32) {
        (self.maglev_size, self.maglev_tables)
    }
    fn set_maglev_table(&mut self, index: u32, content: &[u32]) -> Result<usize, MapError> {
        let old = self.maglev.get(&index).cloned().unwrap_or_default();
        let changed = content
            .iter()
            .enumerate()
            .filter(|(i, v)| old.get(*i) != Some(v))
            .count();
        self.write(format!("set maglev {index} ({changed} changed)"))?;
        self.maglev.insert(index, content.to_vec());
        Ok(changed)
    }
    fn source_ranges(&self) -> Result<Vec<(u32, IpAddr, u8)>, MapError> {
        Ok(self.source_ranges.iter().copied().collect())
    }
    fn set_source_range(&mut self, svc_id: u32, net: IpAddr, len: u8) -> Result<(), MapError> {
        self.write(format!("set range {svc_id} {net}/{len}"))?;
        self.source_ranges.insert((svc_id, net, len));
        Ok(())
    }
    fn delete_source_range(&mut self, svc_id: u32, net: IpAddr, len: u8) -> Result<(), MapError> {
        self.write(format!("delete range {svc_id} {net}/{len}"))?;
        self.source_ranges.remove(&(svc_id, net, len));
        Ok(())
    }
}
