//! `lb-agent status`: the datapath as pinned (programs, attachments, how full each map is)
//! and the agent as it reports itself (health, last sync, source), like
//! `cilium status --verbose`.

use std::{collections::BTreeMap, fmt::Write as _, net::SocketAddr, path::Path};

use anyhow::{Context, Result};
use aya::maps::{HashMap, Map, MapData};
use lb_common::{
    map_names, AffinityEntry, AffinityKeyV4, AffinityKeyV6, BackendSlotKey, BackendV4, BackendV6,
    CtEntryV4, CtEntryV6, CtKeyV4, CtKeyV6, MemberKey, ServiceEntry, ServiceKeyV4, ServiceKeyV6,
    IFACE_F_POD,
};

use super::client;
use crate::datapath::{
    clock,
    pins::{open_map, pinned_programs, LinkKind, LINKS_DIR},
};

/// A map at or above this share of its capacity is reported as a warning.
pub const NEARLY_FULL: f64 = 0.9;

fn count<K: aya::Pod, V: aya::Pod>(pin: &Path, name: &str, lru: bool) -> Result<(usize, u32)> {
    let data = open_map(pin, name)?;
    let max = data.info()?.max_entries();
    let map = if lru {
        Map::LruHashMap(data)
    } else {
        Map::HashMap(data)
    };
    let map: HashMap<MapData, K, V> = HashMap::try_from(map)?;
    Ok((map.keys().flatten().count(), max))
}

fn metric(metrics: &str, series: &str) -> Option<String> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ').map(str::to_owned))
}

/// The status report, and whether anything calls for attention.
pub fn status(pin: &Path, healthz: SocketAddr, metrics: SocketAddr) -> Result<(String, bool)> {
    let mut out = String::new();
    let mut warnings = Vec::new();

    let progs = pinned_programs(pin)?;
    writeln!(out, "Datapath:     pinned at {}", pin.display())?;
    writeln!(
        out,
        "Programs:     lb_xdp (XDP, id {}), lb_tc_reject (TC ingress beside XDP, id {}), \
         lb_tc_ext (TC ingress of external interfaces, id {}), lb_tc_pod (TC ingress of pod \
         interfaces, id {}), lb_tc_egress (TC egress of both, id {})",
        progs.xdp.info()?.id(),
        progs.tc_reject.info()?.id(),
        progs.tc_ext.info()?.id(),
        progs.tc_pod.info()?.id(),
        progs.tc_egress.info()?.id()
    )?;

    match clock::read(pin) {
        Ok(c) if c.ns_per_tick != 0 => writeln!(
            out,
            "Clock:        jiffies at {} Hz, calibrated to the kernel's coarse monotonic clock",
            clock::hz(&c)
        )?,
        Ok(_) => writeln!(
            out,
            "Clock:        the kernel's coarse clock (not calibrated)"
        )?,
        Err(e) => writeln!(out, "Clock:        unknown ({e:#})")?,
    }

    // Attachments, from the pinned links.
    let ifaces: HashMap<MapData, u32, u32> =
        HashMap::try_from(Map::HashMap(open_map(pin, map_names::LB_IFACES)?))?;
    let mut attached: BTreeMap<u32, Vec<&str>> = BTreeMap::new();
    for entry in std::fs::read_dir(pin.join(LINKS_DIR)).context("reading the pinned links")? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if let Some((kind, Some(idx))) = LinkKind::parse(&name) {
            attached.entry(idx).or_default().push(kind.hook());
        }
    }
    let mut first = true;
    for (idx, hooks) in &attached {
        let name = nix::net::if_::if_indextoname(*idx).map_or_else(
            |_| format!("ifindex {idx} (not in this network namespace)"),
            |n| n.to_string_lossy().into_owned(),
        );
        let kind = if ifaces.get(idx, 0).is_ok_and(|f| f & IFACE_F_POD != 0) {
            "pod"
        } else {
            "external"
        };
        let label = if first { "Attachments:" } else { "" };
        first = false;
        writeln!(out, "{label:<13} {name} ({kind}): {}", hooks.join(", "))?;
    }
    if attached.is_empty() {
        writeln!(out, "Attachments:  none")?;
        warnings.push("the datapath is attached to no interface".to_string());
    }

    // Map fill levels, counted in the maps themselves: each family's maps, then those both
    // families share (slots and members, keyed by service and backend id).
    let fills = [
        (
            map_names::LB4_SERVICES,
            count::<ServiceKeyV4, ServiceEntry>(pin, map_names::LB4_SERVICES, false)?,
        ),
        (
            map_names::LB_SLOTS,
            count::<BackendSlotKey, u32>(pin, map_names::LB_SLOTS, false)?,
        ),
        (
            map_names::LB4_BACKENDS,
            count::<u32, BackendV4>(pin, map_names::LB4_BACKENDS, false)?,
        ),
        (
            map_names::LB_MEMBERS,
            count::<MemberKey, u32>(pin, map_names::LB_MEMBERS, false)?,
        ),
        (
            map_names::LB4_CONNTRACK,
            count::<CtKeyV4, CtEntryV4>(pin, map_names::LB4_CONNTRACK, true)?,
        ),
        (
            map_names::LB4_AFFINITY,
            count::<AffinityKeyV4, AffinityEntry>(pin, map_names::LB4_AFFINITY, true)?,
        ),
        (
            map_names::LB6_SERVICES,
            count::<ServiceKeyV6, ServiceEntry>(pin, map_names::LB6_SERVICES, false)?,
        ),
        (
            map_names::LB6_BACKENDS,
            count::<u32, BackendV6>(pin, map_names::LB6_BACKENDS, false)?,
        ),
        (
            map_names::LB6_CONNTRACK,
            count::<CtKeyV6, CtEntryV6>(pin, map_names::LB6_CONNTRACK, true)?,
        ),
        (
            map_names::LB6_AFFINITY,
            count::<AffinityKeyV6, AffinityEntry>(pin, map_names::LB6_AFFINITY, true)?,
        ),
    ];
    for (i, (name, (n, max))) in fills.iter().enumerate() {
        let share = *n as f64 / f64::from((*max).max(1));
        let label = if i == 0 { "Maps:" } else { "" };
        writeln!(
            out,
            "{label:<13} {name:<14} {n:>7} / {max:<7} {:5.1}%",
            share * 100.0
        )?;
        // LRU maps evict by design; only the others can run out.
        let lru = [
            map_names::LB4_CONNTRACK,
            map_names::LB4_AFFINITY,
            map_names::LB6_CONNTRACK,
            map_names::LB6_AFFINITY,
        ]
        .contains(name);
        if share >= NEARLY_FULL && !lru {
            warnings.push(format!("map {name} is {:.0}% full", share * 100.0));
        }
    }

    // The agent, as it reports itself.
    if let (Ok(h), Ok(m)) = (
        client::get(healthz, "/healthz"),
        client::get(metrics, "/metrics"),
    ) {
        let m = m.body;
        let v: serde_json::Value = serde_json::from_str(&h.body).unwrap_or_default();
        let last = v["lastUpdated"].as_str().filter(|s| !s.is_empty());
        let eligible = v["nodeEligible"].as_bool().unwrap_or(true);
        let state = match (h.status, last, eligible) {
            (200, _, _) => "healthy",
            (_, None, _) => {
                warnings.push("the agent has not programmed the datapath yet".into());
                "not programmed yet"
            }
            (_, Some(_), false) => {
                warnings.push(
                    "this node is being deleted (deletionTimestamp or the \
                     ToBeDeletedByClusterAutoscaler taint): /healthz says 503"
                        .into(),
                );
                "node not eligible"
            }
            _ => {
                warnings.push(
                    "a change has waited for the datapath longer than the health timeout \
                     (see the agent's log)"
                        .into(),
                );
                "unhealthy"
            }
        };
        let took = metric(&m, "lb_last_sync_duration_seconds")
            .and_then(|s| s.parse::<f64>().ok())
            .filter(|_| last.is_some())
            .map(|s| format!(" in {:.1} ms", s * 1000.0))
            .unwrap_or_default();
        writeln!(
            out,
            "Agent:        {state} (healthz {healthz}), last sync {}{took}",
            last.unwrap_or("never")
        )?;
        let source = m
            .lines()
            .find_map(|l| {
                l.strip_prefix("lb_source_info{source=\"")?
                    .split('"')
                    .next()
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| "?".into());
        let api = match metric(&m, "lb_api_connected").as_deref() {
            Some("1") => " (API server connected)",
            Some(_) => {
                warnings.push(
                    "the API server is not connected: the datapath keeps its last state".into(),
                );
                " (API server NOT connected)"
            }
            None => "",
        };
        writeln!(out, "Source:       {source}{api}")?;
    } else {
        writeln!(out, "Agent:        not answering on {healthz} / {metrics} (the datapath keeps forwarding from its pins)")?;
        warnings.push("no agent answers".into());
    }
    writeln!(
        out,
        "Features:     IPv4 and IPv6 (dual-stack) ClusterIP, NodePort, externalIPs, LoadBalancer IPs \
         (XDP or TC DNAT, conntrack); backends on other nodes (SNAT); Maglev for external \
         traffic; loadBalancerSourceRanges; host-network clients (cgroup hooks); rejects (TC); \
         sessionAffinity ClientIP; topology hints; traffic policies; healthCheckNodePort"
    )?;
    for w in &warnings {
        writeln!(out, "Warning:      {w}")?;
    }
    Ok((out, !warnings.is_empty()))
}
