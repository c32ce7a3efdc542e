//! The service maps as the reconciler sees them: a small trait, `ServiceMaps`, with an
//! in-memory implementation for tests (`MemMaps`); the pinned maps implement it in
//! `lb_userspace::datapath::pinned_maps`. Also how the desired state is encoded into map
//! keys and values (`encode`) and how the maps read back as frontends and backends (`dump`).

use std::{collections::BTreeMap, net::Ipv4Addr};

use lb_common::{
    BackendSlotKey, BackendV4, MemberKey, ServiceEntry, ServiceKeyV4, DEFAULT_BACKENDS,
    DEFAULT_BACKEND_SLOTS, DEFAULT_SERVICES,
};

mod dump;
mod encode;

pub use dump::{dump, BackendDump, FrontendDump};
pub use encode::{backend_value, frontend_key, kind_flag};

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

/// How many entries the service maps hold (set when the maps are created).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// `LB4_SERVICES`, and `LB_SVC_STATS` which service ids index.
    pub services: u32,
    /// `LB4_BACKENDS`, and `LB_BE_STATS` which backend ids index.
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
    /// Frontends that fit: their service ids start at 1 and index `LB_SVC_STATS`, so one
    /// fewer than the map's size.
    pub fn frontends(&self) -> usize {
        self.services.saturating_sub(1) as usize
    }
    /// Backends that fit: ids from 1, indexing `LB_BE_STATS`.
    pub fn backend_entries(&self) -> usize {
        self.backends.saturating_sub(1) as usize
    }
}

/// The maps the reconciler programs.
pub trait ServiceMaps {
    /// The maps' sizes.
    fn capacity(&self) -> Capacity;
    fn services(&self) -> Result<Vec<(ServiceKeyV4, ServiceEntry)>, MapError>;
    fn slots(&self) -> Result<Vec<(BackendSlotKey, u32)>, MapError>;
    fn backends(&self) -> Result<Vec<(u32, BackendV4)>, MapError>;
    fn set_service(&mut self, key: &ServiceKeyV4, value: &ServiceEntry) -> Result<(), MapError>;
    fn delete_service(&mut self, key: &ServiceKeyV4) -> Result<(), MapError>;
    fn set_slot(&mut self, key: &BackendSlotKey, backend_id: u32) -> Result<(), MapError>;
    fn delete_slot(&mut self, key: &BackendSlotKey) -> Result<(), MapError>;
    fn set_backend(&mut self, id: u32, value: &BackendV4) -> Result<(), MapError>;
    fn delete_backend(&mut self, id: u32) -> Result<(), MapError>;
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
    /// `LB4_SRC_RANGES`: (service id, network, prefix length).
    fn source_ranges(&self) -> Result<Vec<(u32, Ipv4Addr, u8)>, MapError>;
    fn set_source_range(&mut self, svc_id: u32, net: Ipv4Addr, len: u8) -> Result<(), MapError>;
    fn delete_source_range(&mut self, svc_id: u32, net: Ipv4Addr, len: u8) -> Result<(), MapError>;

    // Many entries of one map at once (the pinned maps use one syscall per batch). The
    // entries of a batch are written in no particular order.
    fn set_services(&mut self, entries: &[(ServiceKeyV4, ServiceEntry)]) -> Result<(), MapError> {
        entries.iter().try_for_each(|(k, v)| self.set_service(k, v))
    }
    fn set_slots(&mut self, entries: &[(BackendSlotKey, u32)]) -> Result<(), MapError> {
        entries.iter().try_for_each(|(k, v)| self.set_slot(k, *v))
    }
    fn set_backends(&mut self, entries: &[(u32, BackendV4)]) -> Result<(), MapError> {
        entries
            .iter()
            .try_for_each(|(k, v)| self.set_backend(*k, v))
    }
    fn set_members(&mut self, entries: &[(MemberKey, u32)]) -> Result<(), MapError> {
        entries.iter().try_for_each(|(k, v)| self.set_member(k, *v))
    }
}

/// Maps in memory, with a log of every write (so tests can check the order of updates).
#[derive(Debug, Default, Clone)]
pub struct MemMaps {
    pub services: BTreeMap<ServiceKeyV4, ServiceEntry>,
    pub slots: BTreeMap<(u32, u32), u32>,
    pub backends: BTreeMap<u32, BackendV4>,
    pub members: BTreeMap<(u32, u32), u32>,
    /// Backend ids whose counters were reset (kept out of `log`).
    pub stats_reset: Vec<u32>,
    pub watermark: u32,
    /// Maglev tables by index; `maglev_size` 0 means no Maglev tables.
    pub maglev: BTreeMap<u32, Vec<u32>>,
    pub maglev_size: u32,
    pub maglev_tables: u32,
    pub source_ranges: std::collections::BTreeSet<(u32, Ipv4Addr, u8)>,
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
}

impl ServiceMaps for MemMaps {
    fn capacity(&self) -> Capacity {
        self.capacity
    }
    fn services(&self) -> Result<Vec<(ServiceKeyV4, ServiceEntry)>, MapError> {
        Ok(self.services.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn slots(&self) -> Result<Vec<(BackendSlotKey, u32)>, MapError> {
        Ok(self
            .slots
            .iter()
            .map(|(&(svc_id, slot), &id)| (BackendSlotKey { svc_id, slot }, id))
            .collect())
    }
    fn backends(&self) -> Result<Vec<(u32, BackendV4)>, MapError> {
        Ok(self.backends.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn set_service(&mut self, key: &ServiceKeyV4, value: &ServiceEntry) -> Result<(), MapError> {
        self.write(format!(
            "set service {} count {}",
            value.svc_id, value.count
        ))?;
        self.services.insert(*key, *value);
        Ok(())
    }
    fn delete_service(&mut self, key: &ServiceKeyV4) -> Result<(), MapError> {
        let id = self.services.get(key).map_or(0, |v| v.svc_id);
        self.write(format!("delete service {id}"))?;
        self.services.remove(key);
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
    fn set_backend(&mut self, id: u32, value: &BackendV4) -> Result<(), MapError> {
        self.write(format!("set backend {id}"))?;
        self.backends.insert(id, *value);
        Ok(())
    }
    fn delete_backend(&mut self, id: u32) -> Result<(), MapError> {
        self.write(format!("delete backend {id}"))?;
        self.backends.remove(&id);
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
    fn source_ranges(&self) -> Result<Vec<(u32, Ipv4Addr, u8)>, MapError> {
        Ok(self.source_ranges.iter().copied().collect())
    }
    fn set_source_range(&mut self, svc_id: u32, net: Ipv4Addr, len: u8) -> Result<(), MapError> {
        self.write(format!("set range {svc_id} {net}/{len}"))?;
        self.source_ranges.insert((svc_id, net, len));
        Ok(())
    }
    fn delete_source_range(&mut self, svc_id: u32, net: Ipv4Addr, len: u8) -> Result<(), MapError> {
        self.write(format!("delete range {svc_id} {net}/{len}"))?;
        self.source_ranges.remove(&(svc_id, net, len));
        Ok(())
    }
}
