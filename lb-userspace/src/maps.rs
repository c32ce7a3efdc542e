//! The service maps as the control plane sees them: a small trait with an aya implementation
//! (`bpf::PinnedMaps`) and an in-memory one for tests.

use std::{collections::BTreeMap, net::Ipv4Addr};

use lb_common::{
    BackendSlotKey, BackendV4, MemberKey, ServiceKeyV4, ServiceV4, BACKEND_F_LOCAL,
    BACKEND_F_TERMINATING, DEFAULT_BACKENDS, DEFAULT_BACKEND_SLOTS, DEFAULT_SERVICES,
    SVC_F_CLUSTER_IP, SVC_F_DROP_NO_ENDPOINTS, SVC_F_EXTERNAL_IP, SVC_F_LOAD_BALANCER,
    SVC_F_NODE_PORT,
};
use serde::Serialize;

use crate::model::{FrontendKind, L4Addr, Proto};

#[derive(Debug, thiserror::Error)]
#[error("map {map}: {op}: {reason}")]
pub struct MapError {
    pub map: &'static str,
    pub op: &'static str,
    pub reason: String,
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
    fn services(&self) -> Result<Vec<(ServiceKeyV4, ServiceV4)>, MapError>;
    fn slots(&self) -> Result<Vec<(BackendSlotKey, u32)>, MapError>;
    fn backends(&self) -> Result<Vec<(u32, BackendV4)>, MapError>;
    fn set_service(&mut self, key: &ServiceKeyV4, value: &ServiceV4) -> Result<(), MapError>;
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
    fn set_services(&mut self, entries: &[(ServiceKeyV4, ServiceV4)]) -> Result<(), MapError> {
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
    pub services: BTreeMap<ServiceKeyV4Ord, ServiceV4>,
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

/// `ServiceKeyV4` with an order, for `BTreeMap`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServiceKeyV4Ord(pub u32, pub u16, pub u8, pub u8);

impl From<&ServiceKeyV4> for ServiceKeyV4Ord {
    fn from(k: &ServiceKeyV4) -> Self {
        ServiceKeyV4Ord(k.addr, k.port, k.proto, k.scope)
    }
}

impl From<ServiceKeyV4Ord> for ServiceKeyV4 {
    fn from(k: ServiceKeyV4Ord) -> Self {
        ServiceKeyV4 {
            addr: k.0,
            port: k.1,
            proto: k.2,
            scope: k.3,
        }
    }
}

impl MemMaps {
    fn write(&mut self, what: String) -> Result<(), MapError> {
        if let Some(n) = self.fail_after {
            if self.log.len() >= n {
                return Err(MapError {
                    map: "mem",
                    op: "update",
                    reason: "injected failure".into(),
                });
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
    fn services(&self) -> Result<Vec<(ServiceKeyV4, ServiceV4)>, MapError> {
        Ok(self
            .services
            .iter()
            .map(|(k, v)| ((*k).into(), *v))
            .collect())
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
    fn set_service(&mut self, key: &ServiceKeyV4, value: &ServiceV4) -> Result<(), MapError> {
        self.write(format!(
            "set service {} count {}",
            value.svc_id, value.count
        ))?;
        self.services.insert(key.into(), *value);
        Ok(())
    }
    fn delete_service(&mut self, key: &ServiceKeyV4) -> Result<(), MapError> {
        let id = self
            .services
            .get(&key.into())
            .map(|v| v.svc_id)
            .unwrap_or(0);
        self.write(format!("delete service {id}"))?;
        self.services.remove(&key.into());
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

pub fn frontend_key(fe: &L4Addr, scope: u8) -> ServiceKeyV4 {
    ServiceKeyV4 {
        addr: u32::from_ne_bytes(fe.addr.octets()),
        port: fe.port.to_be(),
        proto: fe.proto.number(),
        scope,
    }
}

pub fn backend_value(addr: &L4Addr, local: bool, terminating: bool) -> BackendV4 {
    BackendV4 {
        addr: u32::from_ne_bytes(addr.addr.octets()),
        port: addr.port.to_be(),
        proto: addr.proto.number(),
        flags: if local { BACKEND_F_LOCAL } else { 0 }
            | if terminating {
                BACKEND_F_TERMINATING
            } else {
                0
            },
    }
}

pub fn kind_flag(kind: FrontendKind) -> u32 {
    match kind {
        FrontendKind::ClusterIP => SVC_F_CLUSTER_IP,
        FrontendKind::NodePort => SVC_F_NODE_PORT,
        FrontendKind::ExternalIP => SVC_F_EXTERNAL_IP,
        FrontendKind::LoadBalancer => SVC_F_LOAD_BALANCER,
    }
}

/// One frontend as the maps hold it (for `lb-agent services`).
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct FrontendDump {
    pub id: u32,
    pub frontend: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// What a packet gets when there is no backend.
    pub no_backend: &'static str,
    /// sessionAffinity ClientIP timeout in seconds (0: none).
    pub affinity_timeout_s: u32,
    /// "pods": the entry this node's pods use at an externalTrafficPolicy Local frontend.
    pub scope: &'static str,
    pub backends: Vec<BackendDump>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct BackendDump {
    pub id: u32,
    pub address: String,
    pub state: &'static str,
    pub local: bool,
}

fn l4(addr: u32, port_be: u16, proto: u8) -> String {
    let a = Ipv4Addr::from(addr.to_ne_bytes());
    match Proto::from_number(proto) {
        Some(p) => format!("{a}:{}/{p}", u16::from_be(port_be)),
        None => format!("{a}:{}/{proto}", u16::from_be(port_be)),
    }
}

/// Reads the frontends and their backends from the maps.
pub fn dump(maps: &impl ServiceMaps) -> Result<Vec<FrontendDump>, MapError> {
    let slots: BTreeMap<(u32, u32), u32> = maps
        .slots()?
        .into_iter()
        .map(|(k, v)| ((k.svc_id, k.slot), v))
        .collect();
    let backends: BTreeMap<u32, BackendV4> = maps.backends()?.into_iter().collect();
    let mut services = maps.services()?;
    services.sort_by_key(|(_, v)| v.svc_id);
    Ok(services
        .into_iter()
        .map(|(k, v)| {
            let kind = [
                (SVC_F_CLUSTER_IP, "ClusterIP"),
                (SVC_F_NODE_PORT, "NodePort"),
                (SVC_F_EXTERNAL_IP, "ExternalIP"),
                (SVC_F_LOAD_BALANCER, "LoadBalancer"),
            ]
            .iter()
            .find(|(f, _)| v.flags & f != 0)
            .map_or("?", |(_, n)| n);
            FrontendDump {
                id: v.svc_id,
                frontend: l4(k.addr, k.port, k.proto),
                kind: kind.into(),
                affinity_timeout_s: v.affinity_timeout_s,
                scope: if k.scope == lb_common::SCOPE_PODS {
                    "pods"
                } else {
                    "all"
                },
                no_backend: if v.flags & SVC_F_DROP_NO_ENDPOINTS != 0 {
                    "drop"
                } else {
                    "reject"
                },
                backends: (0..v.count)
                    .map(|slot| {
                        let id = slots.get(&(v.svc_id, slot)).copied().unwrap_or(0);
                        match backends.get(&id) {
                            Some(b) => BackendDump {
                                id,
                                address: l4(b.addr, b.port, b.proto),
                                state: if b.flags & BACKEND_F_TERMINATING != 0 {
                                    "terminating"
                                } else {
                                    "active"
                                },
                                local: b.flags & BACKEND_F_LOCAL != 0,
                            },
                            None => BackendDump {
                                id,
                                address: "?".into(),
                                state: "missing",
                                local: false,
                            },
                        }
                    })
                    .collect(),
            }
        })
        .collect())
}

/// `cilium service list`-style table.
pub fn format_table(rows: &[FrontendDump]) -> String {
    let mut out = format!(
        "{:<5} {:<24} {:<28} {}\n",
        "ID", "Frontend", "Service Type", "Backend"
    );
    for r in rows {
        let mut kind = r.kind.clone();
        if r.scope == "pods" {
            kind.push_str(" (pods)");
        }
        if r.affinity_timeout_s != 0 {
            kind.push_str(&format!(" (sticky {}s)", r.affinity_timeout_s));
        }
        let mut first = true;
        let mut line = |backend: String| {
            let (id, frontend, kind) = if first {
                (r.id.to_string(), r.frontend.as_str(), kind.as_str())
            } else {
                (String::new(), "", "")
            };
            out.push_str(&format!("{id:<5} {frontend:<24} {kind:<28} {backend}\n"));
            first = false;
        };
        if r.backends.is_empty() {
            line(format!("(none: {})", r.no_backend));
        }
        for (i, b) in r.backends.iter().enumerate() {
            line(format!(
                "{} => {} ({}{})",
                i + 1,
                b.address,
                b.state,
                if b.local { ", local" } else { "" }
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_scope_affinity_and_states() {
        let rows = vec![
            FrontendDump {
                id: 1,
                frontend: "198.18.0.2:30080/TCP".into(),
                kind: "NodePort".into(),
                no_backend: "drop",
                affinity_timeout_s: 0,
                scope: "all",
                backends: vec![],
            },
            FrontendDump {
                id: 2,
                frontend: "198.18.0.2:30080/TCP".into(),
                kind: "NodePort".into(),
                no_backend: "reject",
                affinity_timeout_s: 30,
                scope: "pods",
                backends: vec![
                    BackendDump {
                        id: 7,
                        address: "10.244.0.11:8080/TCP".into(),
                        state: "active",
                        local: true,
                    },
                    BackendDump {
                        id: 8,
                        address: "10.244.0.12:8080/TCP".into(),
                        state: "terminating",
                        local: false,
                    },
                ],
            },
        ];
        let t = format_table(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(
            lines[1].contains("NodePort") && lines[1].ends_with("(none: drop)"),
            "{t}"
        );
        assert!(lines[2].contains("NodePort (pods) (sticky 30s)"), "{t}");
        assert!(
            lines[2].ends_with("1 => 10.244.0.11:8080/TCP (active, local)"),
            "{t}"
        );
        assert!(
            lines[3].starts_with("      ")
                && lines[3].ends_with("2 => 10.244.0.12:8080/TCP (terminating)"),
            "{t}"
        );
    }
}
