//! The datapath's counters, read from the pinned per-CPU maps and summed over CPUs.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
};

use super::error::Result;
use aya::maps::{HashMap, Map, MapData, PerCpuArray};
use lb_common::{ipv6_bytes, map_names, stat, BackendStats, BackendV4, BackendV6, ServiceStats};
use lb_control::model::Proto;

use super::pins::open_map;

/// Every backend's counters, summed over CPUs: (backend address, counters), IPv4 backends
/// as `addr:port/PROTO`, IPv6 ones as `[addr]:port/PROTO` (one id space for both families,
/// so one counter map).
pub fn read_backend_stats(pin: &Path) -> Result<Vec<(String, BackendStats)>> {
    let backends: HashMap<MapData, u32, BackendV4> =
        HashMap::try_from(Map::HashMap(open_map(pin, map_names::LB4_BACKENDS)?))?;
    let backends6: HashMap<MapData, u32, BackendV6> =
        HashMap::try_from(Map::HashMap(open_map(pin, map_names::LB6_BACKENDS)?))?;
    let counters: PerCpuArray<MapData, BackendStats> =
        PerCpuArray::try_from(Map::PerCpuArray(open_map(pin, map_names::LB_BE_STATS)?))?;
    let mut all = Vec::new();
    for entry in &backends {
        let (id, b) = entry?;
        let addr = SocketAddr::from((Ipv4Addr::from(b.addr.to_ne_bytes()), u16::from_be(b.port)));
        all.push((id, addr, b.proto));
    }
    for entry in &backends6 {
        let (id, b) = entry?;
        let addr = SocketAddr::from((Ipv6Addr::from(ipv6_bytes(b.addr)), u16::from_be(b.port)));
        all.push((id, addr, b.proto));
    }
    let mut out = Vec::new();
    for (id, addr, proto) in all {
        let values = counters.get(&id, 0)?;
        let mut sum = BackendStats::default();
        for v in values.iter() {
            sum.packets += v.packets;
            sum.bytes += v.bytes;
        }
        let proto = Proto::from_number(proto).map_or_else(|| proto.to_string(), |p| p.to_string());
        out.push((format!("{addr}/{proto}"), sum));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// The global datapath counters, summed over CPUs, by name. A map made by an older agent
/// (pinned maps keep their size) may hold fewer counters: those it lacks are left out.
pub fn read_stats(pin: &Path) -> Result<Vec<(&'static str, u64)>> {
    let data = open_map(pin, map_names::LB_STATS)?;
    let size = data.info()?.max_entries();
    let map: PerCpuArray<MapData, u64> = PerCpuArray::try_from(Map::PerCpuArray(data))?;
    let mut out = Vec::new();
    for (i, name) in (0..size).zip(stat::NAMES) {
        let values = map.get(&i, 0)?;
        out.push((name, values.iter().sum()));
    }
    Ok(out)
}

/// One service id's counters, summed over CPUs.
pub fn read_service_stats(pin: &Path, ids: &[u32]) -> Result<Vec<(u32, ServiceStats)>> {
    let map: PerCpuArray<MapData, ServiceStats> =
        PerCpuArray::try_from(Map::PerCpuArray(open_map(pin, map_names::LB_SVC_STATS)?))?;
    let mut out = Vec::new();
    for &id in ids {
        let values = map.get(&id, 0)?;
        let mut sum = ServiceStats::default();
        for v in values.iter() {
            sum.packets += v.packets;
            sum.bytes += v.bytes;
            sum.new_flows += v.new_flows;
            sum.rejected += v.rejected;
        }
        out.push((id, sum));
    }
    Ok(out)
}
