//! The pinned service maps of both families as `ServiceMaps`, the trait the reconciler writes
//! through: many entries per syscall where the kernel has batch operations, the Maglev tables
//! through a memory mapping.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsFd,
    path::Path,
};

use super::error::{Context, Result};
use aya::maps::{
    lpm_trie::{Key as LpmKey, LpmTrie},
    Array, HashMap, Map, MapData, PerCpuArray,
};
use lb_common::{
    config, ipv6_bytes, ipv6_words, map_names, BackendSlotKey, BackendStats, BackendV4, BackendV6,
    MemberKey, ServiceEntry, ServiceKeyV4, ServiceKeyV6, SourceRangeV4, SourceRangeV6,
};
use lb_control::maps::{BackendValue, Capacity, FrontendKey, MapError, ServiceMaps};

use super::{
    pins::open_map,
    sys::{update_batch, SharedMapping},
};

/// The pinned service maps.
pub struct PinnedMaps {
    services: HashMap<MapData, ServiceKeyV4, ServiceEntry>,
    services6: HashMap<MapData, ServiceKeyV6, ServiceEntry>,
    slots: HashMap<MapData, BackendSlotKey, u32>,
    backends: HashMap<MapData, u32, BackendV4>,
    backends6: HashMap<MapData, u32, BackendV6>,
    members: HashMap<MapData, MemberKey, u32>,
    backend_stats: PerCpuArray<MapData, BackendStats>,
    maglev: MaglevMap,
    ranges: LpmTrie<MapData, SourceRangeV4, u8>,
    ranges6: LpmTrie<MapData, SourceRangeV6, u8>,
    config: Array<MapData, u32>,
    capacity: Capacity,
}

/// The sizes the pinned service maps were made with: each the smallest of the maps that
/// share it (an older agent's maps of one family may be smaller than the other's).
pub fn read_capacity(pin: &Path) -> Result<Capacity> {
    let size = |name: &str| -> Result<u32> {
        Ok(open_map(pin, name)?
            .info()
            .with_context(|| format!("{name} info"))?
            .max_entries())
    };
    Ok(Capacity {
        services: size(map_names::LB4_SERVICES)?
            .min(size(map_names::LB6_SERVICES)?)
            .min(size(map_names::LB_SVC_STATS)?),
        backends: size(map_names::LB4_BACKENDS)?
            .min(size(map_names::LB6_BACKENDS)?)
            .min(size(map_names::LB_BE_STATS)?),
        slots: size(map_names::LB_SLOTS)?.min(size(map_names::LB_MEMBERS)?),
    })
}

/// Writes the node's IPv6 address to `LB6_NODE_ADDR` (the source of source-NATed IPv6
/// flows), all zero for none.
pub fn write_node_addr_v6(pin: &Path, addr: Option<Ipv6Addr>) -> Result<()> {
    let mut map: Array<MapData, [u32; 4]> =
        Array::try_from(Map::Array(open_map(pin, map_names::LB6_NODE_ADDR)?))?;
    let words = addr.map_or([0; 4], |a| ipv6_words(a.octets()));
    map.set(0, words, 0).context("writing LB6_NODE_ADDR")?;
    Ok(())
}

impl PinnedMaps {
    pub fn open(pin: &Path) -> Result<Self> {
        Ok(PinnedMaps {
            capacity: read_capacity(pin)?,
            maglev: MaglevMap::open(pin)?,
            config: Array::try_from(Map::Array(open_map(pin, map_names::LB_CONFIG)?))?,
            ranges: LpmTrie::try_from(Map::LpmTrie(open_map(pin, map_names::LB4_SRC_RANGES)?))?,
            ranges6: LpmTrie::try_from(Map::LpmTrie(open_map(pin, map_names::LB6_SRC_RANGES)?))?,
            services: HashMap::try_from(Map::HashMap(open_map(pin, map_names::LB4_SERVICES)?))?,
            services6: HashMap::try_from(Map::HashMap(open_map(pin, map_names::LB6_SERVICES)?))?,
            slots: HashMap::try_from(Map::HashMap(open_map(pin, map_names::LB_SLOTS)?))?,
            backends: HashMap::try_from(Map::HashMap(open_map(pin, map_names::LB4_BACKENDS)?))?,
            backends6: HashMap::try_from(Map::HashMap(open_map(pin, map_names::LB6_BACKENDS)?))?,
            members: HashMap::try_from(Map::HashMap(open_map(pin, map_names::LB_MEMBERS)?))?,
            backend_stats: PerCpuArray::try_from(Map::PerCpuArray(open_map(
                pin,
                map_names::LB_BE_STATS,
            )?))?,
        })
    }
}

fn err(map: &'static str, op: &'static str) -> impl FnOnce(aya::maps::MapError) -> MapError {
    move |e| MapError::new(map, op, e)
}

fn collect<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<Vec<(K, V)>, MapError> {
    map.iter()
        .collect::<Result<Vec<_>, _>>()
        .map_err(err(name, "iterate"))
}

/// Deleting a key that is already gone is not an error.
fn tolerate_missing(r: Result<(), aya::maps::MapError>) -> Result<(), aya::maps::MapError> {
    match r {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        other => other,
    }
}

/// Writes `entries` by batch updates, or entry by entry where the kernel has none.
fn set_many<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    name: &'static str,
    entries: &[(K, V)],
) -> Result<(), MapError> {
    let fd = aya::maps::IterableMap::map(map).fd().as_fd();
    match update_batch(fd, entries) {
        Ok(true) => Ok(()),
        Ok(false) => entries
            .iter()
            .try_for_each(|(k, v)| map.insert(k, v, 0).map_err(err(name, "update"))),
        Err(e) => Err(MapError::new(name, "batch update", e)),
    }
}

impl ServiceMaps for PinnedMaps {
    fn capacity(&self) -> Capacity {
        self.capacity
    }
    fn set_services(&mut self, entries: &[(FrontendKey, ServiceEntry)]) -> Result<(), MapError> {
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for (k, v) in entries {
            match k {
                FrontendKey::V4(k) => v4.push((*k, *v)),
                FrontendKey::V6(k) => v6.push((*k, *v)),
            }
        }
        set_many(&mut self.services, map_names::LB4_SERVICES, &v4)?;
        set_many(&mut self.services6, map_names::LB6_SERVICES, &v6)
    }
    fn set_slots(&mut self, entries: &[(BackendSlotKey, u32)]) -> Result<(), MapError> {
        set_many(&mut self.slots, map_names::LB_SLOTS, entries)
    }
    fn set_backends(&mut self, entries: &[(u32, BackendValue)]) -> Result<(), MapError> {
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for (id, b) in entries {
            match b {
                BackendValue::V4(b) => v4.push((*id, *b)),
                BackendValue::V6(b) => v6.push((*id, *b)),
            }
        }
        set_many(&mut self.backends, map_names::LB4_BACKENDS, &v4)?;
        set_many(&mut self.backends6, map_names::LB6_BACKENDS, &v6)
    }
    fn set_members(&mut self, entries: &[(MemberKey, u32)]) -> Result<(), MapError> {
        set_many(&mut self.members, map_names::LB_MEMBERS, entries)
    }
    fn services(&self) -> Result<Vec<(FrontendKey, ServiceEntry)>, MapError> {
        let v4 = collect(&self.services, map_names::LB4_SERVICES)?;
        let v6 = collect(&self.services6, map_names::LB6_SERVICES)?;
        Ok(v4
            .into_iter()
            .map(|(k, v)| (FrontendKey::V4(k), v))
            .chain(v6.into_iter().map(|(k, v)| (FrontendKey::V6(k), v)))
            .collect())
    }
    fn slots(&self) -> Result<Vec<(BackendSlotKey, u32)>, MapError> {
        collect(&self.slots, map_names::LB_SLOTS)
    }
    fn backends(&self) -> Result<Vec<(u32, BackendValue)>, MapError> {
        let v4 = collect(&self.backends, map_names::LB4_BACKENDS)?;
        let v6 = collect(&self.backends6, map_names::LB6_BACKENDS)?;
        Ok(v4
            .into_iter()
            .map(|(id, b)| (id, BackendValue::V4(b)))
            .chain(v6.into_iter().map(|(id, b)| (id, BackendValue::V6(b))))
            .collect())
    }
    fn set_service(&mut self, key: &FrontendKey, value: &ServiceEntry) -> Result<(), MapError> {
        match key {
            FrontendKey::V4(k) => self
                .services
                .insert(k, value, 0)
                .map_err(err(map_names::LB4_SERVICES, "update")),
            FrontendKey::V6(k) => self
                .services6
                .insert(k, value, 0)
                .map_err(err(map_names::LB6_SERVICES, "update")),
        }
    }
    fn delete_service(&mut self, key: &FrontendKey) -> Result<(), MapError> {
        match key {
            FrontendKey::V4(k) => tolerate_missing(self.services.remove(k))
                .map_err(err(map_names::LB4_SERVICES, "delete")),
            FrontendKey::V6(k) => tolerate_missing(self.services6.remove(k))
                .map_err(err(map_names::LB6_SERVICES, "delete")),
        }
    }
    fn set_slot(&mut self, key: &BackendSlotKey, backend_id: u32) -> Result<(), MapError> {
        self.slots
            .insert(key, backend_id, 0)
            .map_err(err(map_names::LB_SLOTS, "update"))
    }
    fn delete_slot(&mut self, key: &BackendSlotKey) -> Result<(), MapError> {
        tolerate_missing(self.slots.remove(key)).map_err(err(map_names::LB_SLOTS, "delete"))
    }
    fn set_backend(&mut self, id: u32, value: &BackendValue) -> Result<(), MapError> {
        match value {
            BackendValue::V4(b) => self
                .backends
                .insert(id, b, 0)
                .map_err(err(map_names::LB4_BACKENDS, "update")),
            BackendValue::V6(b) => self
                .backends6
                .insert(id, b, 0)
                .map_err(err(map_names::LB6_BACKENDS, "update")),
        }
    }
    fn delete_backend(&mut self, id: u32, value: &BackendValue) -> Result<(), MapError> {
        match value {
            BackendValue::V4(_) => tolerate_missing(self.backends.remove(&id))
                .map_err(err(map_names::LB4_BACKENDS, "delete")),
            BackendValue::V6(_) => tolerate_missing(self.backends6.remove(&id))
                .map_err(err(map_names::LB6_BACKENDS, "delete")),
        }
    }
    fn members(&self) -> Result<Vec<(MemberKey, u32)>, MapError> {
        collect(&self.members, map_names::LB_MEMBERS)
    }
    fn set_member(&mut self, key: &MemberKey, slot: u32) -> Result<(), MapError> {
        self.members
            .insert(key, slot, 0)
            .map_err(err(map_names::LB_MEMBERS, "update"))
    }
    fn delete_member(&mut self, key: &MemberKey) -> Result<(), MapError> {
        tolerate_missing(self.members.remove(key)).map_err(err(map_names::LB_MEMBERS, "delete"))
    }
    fn reset_backend_stats(&mut self, id: u32) -> Result<(), MapError> {
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| {
            MapError::new(map_names::LB_BE_STATS, "reset", format!("{what}: {e}"))
        })?;
        let zeros = aya::maps::PerCpuValues::try_from(vec![BackendStats::default(); cpus])
            .map_err(|e| MapError::new(map_names::LB_BE_STATS, "reset", e))?;
        self.backend_stats
            .set(id, zeros, 0)
            .map_err(err(map_names::LB_BE_STATS, "reset"))
    }
    fn maglev_geometry(&self) -> (u32, u32) {
        (self.maglev.size, self.maglev.tables())
    }
    fn backend_id_watermark(&self) -> Result<u32, MapError> {
        self.config
            .get(&config::BACKEND_ID_WATERMARK, 0)
            .map_err(err(map_names::LB_CONFIG, "lookup"))
    }
    fn set_backend_id_watermark(&mut self, id: u32) -> Result<(), MapError> {
        self.config
            .set(config::BACKEND_ID_WATERMARK, id, 0)
            .map_err(err(map_names::LB_CONFIG, "update"))
    }
    fn set_maglev_table(&mut self, index: u32, content: &[u32]) -> Result<usize, MapError> {
        self.maglev.write(index, content)
    }
    fn source_ranges(&self) -> Result<Vec<(u32, IpAddr, u8)>, MapError> {
        let v4 = self.ranges.iter().map(|r| {
            r.map(|(k, _)| {
                let d = k.data();
                (
                    u32::from_be(d.svc_id_be),
                    IpAddr::V4(Ipv4Addr::from(d.addr.to_ne_bytes())),
                    k.prefix_len().saturating_sub(32) as u8,
                )
            })
        });
        let mut out = v4
            .collect::<Result<Vec<_>, _>>()
            .map_err(err(map_names::LB4_SRC_RANGES, "iterate"))?;
        let v6 = self.ranges6.iter().map(|r| {
            r.map(|(k, _)| {
                let d = k.data();
                (
                    u32::from_be(d.svc_id_be),
                    IpAddr::V6(Ipv6Addr::from(ipv6_bytes(d.addr))),
                    k.prefix_len().saturating_sub(32) as u8,
                )
            })
        });
        out.extend(
            v6.collect::<Result<Vec<_>, _>>()
                .map_err(err(map_names::LB6_SRC_RANGES, "iterate"))?,
        );
        Ok(out)
    }
    fn set_source_range(&mut self, svc_id: u32, net: IpAddr, len: u8) -> Result<(), MapError> {
        match net {
            IpAddr::V4(net) => self
                .ranges
                .insert(&range_key(svc_id, net, len), 1, 0)
                .map_err(err(map_names::LB4_SRC_RANGES, "update")),
            IpAddr::V6(net) => self
                .ranges6
                .insert(&range_key6(svc_id, net, len), 1, 0)
                .map_err(err(map_names::LB6_SRC_RANGES, "update")),
        }
    }
    fn delete_source_range(&mut self, svc_id: u32, net: IpAddr, len: u8) -> Result<(), MapError> {
        match net {
            IpAddr::V4(net) => tolerate_missing(self.ranges.remove(&range_key(svc_id, net, len)))
                .map_err(err(map_names::LB4_SRC_RANGES, "delete")),
            IpAddr::V6(net) => tolerate_missing(self.ranges6.remove(&range_key6(svc_id, net, len)))
                .map_err(err(map_names::LB6_SRC_RANGES, "delete")),
        }
    }
}

/// The `LB4_SRC_RANGES` key of a service's range: the service id is matched whole, then
/// `len` bits of the address.
fn range_key(svc_id: u32, net: Ipv4Addr, len: u8) -> LpmKey<SourceRangeV4> {
    LpmKey::new(
        32 + u32::from(len),
        SourceRangeV4 {
            svc_id_be: svc_id.to_be(),
            addr: u32::from_ne_bytes(net.octets()),
        },
    )
}

/// The `LB6_SRC_RANGES` key of a service's range, as `range_key` (up to 128 address bits).
fn range_key6(svc_id: u32, net: Ipv6Addr, len: u8) -> LpmKey<SourceRangeV6> {
    LpmKey::new(
        32 + u32::from(len),
        SourceRangeV6 {
            svc_id_be: svc_id.to_be(),
            addr: ipv6_words(net.octets()),
        },
    )
}

/// `LB_MAGLEV`, written through a memory mapping (the map is `BPF_F_MMAPABLE`): a table is
/// compared and rewritten at memory speed instead of one syscall per entry. Only the pages of
/// the table being written are mapped, and only while it is written, so the agent's memory
/// does not include the whole array. The kernel lays array elements out 8 bytes apart (values
/// are rounded up to 8), so entry i is the u32 at byte 8·i.
struct MaglevMap {
    map: MapData,
    entries: usize,
    /// Entries of one table (`LB_CONFIG[MAGLEV_SIZE]`); 0 when the datapath has none.
    size: u32,
}

/// Bytes between array elements.
const MAGLEV_STRIDE: usize = 8;

impl MaglevMap {
    fn open(pin: &Path) -> Result<Self> {
        let map = open_map(pin, map_names::LB_MAGLEV)?;
        let entries = map.info().context("LB_MAGLEV info")?.max_entries() as usize;
        let config: Array<MapData, u32> =
            Array::try_from(Map::Array(open_map(pin, map_names::LB_CONFIG)?))?;
        let size = config.get(&config::MAGLEV_SIZE, 0).unwrap_or(0);
        Ok(MaglevMap { map, entries, size })
    }

    fn tables(&self) -> u32 {
        if self.size == 0 {
            0
        } else {
            (self.entries / self.size as usize) as u32
        }
    }

    fn write(&mut self, index: u32, content: &[u32]) -> Result<usize, MapError> {
        let fail = |reason: String| MapError::new(map_names::LB_MAGLEV, "update", reason);
        if index >= self.tables() || content.len() != self.size as usize {
            return Err(fail(format!(
                "table {index} of {} entries does not fit",
                content.len()
            )));
        }
        let page = 4096;
        let start = index as usize * self.size as usize * MAGLEV_STRIDE;
        let end = start + content.len() * MAGLEV_STRIDE;
        let offset = start - start % page;
        let len = (end - offset).next_multiple_of(page);
        // Whole pages of the array (offset page-aligned, end <= entries · 8 by the check
        // above), mapped while this table is written.
        let mut mapping = SharedMapping::new(self.map.fd().as_fd(), offset, len)
            .map_err(|e| fail(format!("mmap: {e}")))?;
        let mut changed = 0;
        for (i, v) in content.iter().enumerate() {
            // The element's first 4 bytes are the value (little-endian, as the BPF target);
            // each is written alone, so a packet sees the old or the new id.
            let at = start - offset + i * MAGLEV_STRIDE;
            if mapping.read_u32(at) != Some(*v) {
                if !mapping.write_u32(at, *v) {
                    return Err(fail(format!("entry {i} outside the mapping")));
                }
                changed += 1;
            }
        }
        Ok(changed)
    }
}
