//! What the service maps hold against what they can hold: a desired state the maps cannot
//! take is refused before anything is written (a half-programmed datapath would be worse than
//! the last good one).

use std::collections::BTreeSet;

use lb_common::map_names;

use crate::{
    maps::{Capacity, MapError},
    model::Desired,
};

/// How full one map is (or would be).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapFill {
    pub map: &'static str,
    pub entries: usize,
    pub capacity: usize,
}

impl MapFill {
    /// At or above 90 % (and not over): worth a warning.
    pub fn nearly_full(&self) -> bool {
        self.entries * 10 >= self.capacity * 9 && self.entries <= self.capacity
    }
}

/// What the service maps hold (or would hold), by family where the maps are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Counts {
    pub(super) frontends_v4: usize,
    pub(super) frontends_v6: usize,
    pub(super) slots: usize,
    pub(super) backends_v4: usize,
    pub(super) backends_v6: usize,
}

/// How full maps of capacity `cap` would be with `desired`: (map, entries, capacity).
pub fn fill_levels(desired: &Desired, cap: &Capacity) -> Vec<MapFill> {
    let frontends: Vec<_> = desired
        .frontends
        .keys()
        .chain(desired.pod_frontends.keys())
        .collect();
    let slots: usize = desired
        .frontends
        .values()
        .chain(desired.pod_frontends.values())
        .map(|f| f.backends.len())
        .sum();
    let backends: BTreeSet<_> = desired
        .frontends
        .values()
        .chain(desired.pod_frontends.values())
        .flat_map(|f| f.backends.iter().map(|b| b.addr))
        .chain(desired.serving.keys().copied())
        .collect();
    let v6_frontends = frontends.iter().filter(|f| f.is_ipv6()).count();
    let v6_backends = backends.iter().filter(|b| b.is_ipv6()).count();
    levels(
        cap,
        Counts {
            frontends_v4: frontends.len() - v6_frontends,
            frontends_v6: v6_frontends,
            slots,
            backends_v4: backends.len() - v6_backends,
            backends_v6: v6_backends,
        },
    )
}

/// Each map's fill, and the id spaces both families share (`LB_SVC_STATS`, `LB_BE_STATS`,
/// indexed by the ids): each family's map first, so that a refusal names the map that
/// overflows when one family alone is too large.
pub(super) fn levels(cap: &Capacity, n: Counts) -> Vec<MapFill> {
    let fill = |map, entries, capacity| MapFill {
        map,
        entries,
        capacity,
    };
    vec![
        fill(map_names::LB4_SERVICES, n.frontends_v4, cap.frontends()),
        fill(map_names::LB6_SERVICES, n.frontends_v6, cap.frontends()),
        fill(
            map_names::LB_SVC_STATS,
            n.frontends_v4 + n.frontends_v6,
            cap.frontends(),
        ),
        fill(map_names::LB_SLOTS, n.slots, cap.slots as usize),
        fill(map_names::LB_MEMBERS, n.slots, cap.slots as usize),
        fill(
            map_names::LB4_BACKENDS,
            n.backends_v4,
            cap.backend_entries(),
        ),
        fill(
            map_names::LB6_BACKENDS,
            n.backends_v6,
            cap.backend_entries(),
        ),
        fill(
            map_names::LB_BE_STATS,
            n.backends_v4 + n.backends_v6,
            cap.backend_entries(),
        ),
    ]
}

/// Refuses, before writing anything, a desired state the maps cannot hold: a half-programmed
/// datapath would be worse than the last good one.
pub(super) fn check_capacity(desired: &Desired, cap: &Capacity) -> Result<(), MapError> {
    refuse_overfull(fill_levels(desired, cap))
}

/// An error for the first (map, entries, capacity) over capacity.
pub(super) fn refuse_overfull(levels: impl IntoIterator<Item = MapFill>) -> Result<(), MapError> {
    for f in levels {
        if f.entries > f.capacity {
            return Err(MapError::new(
                f.map,
                "capacity",
                format!(
                    "{} entries wanted, room for {}: nothing was changed, the last good state stays",
                    f.entries, f.capacity
                ),
            ));
        }
    }
    Ok(())
}
