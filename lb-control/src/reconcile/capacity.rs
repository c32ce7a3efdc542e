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

/// How full maps of capacity `cap` would be with `desired`: (map, entries, capacity).
pub fn fill_levels(desired: &Desired, cap: &Capacity) -> Vec<MapFill> {
    let frontends = desired.frontends.len() + desired.pod_frontends.len();
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
    levels(cap, frontends, slots, backends.len())
}

pub(super) fn levels(
    cap: &Capacity,
    frontends: usize,
    slots: usize,
    backends: usize,
) -> Vec<MapFill> {
    let fill = |map, entries, capacity| MapFill {
        map,
        entries,
        capacity,
    };
    vec![
        fill(map_names::LB4_SERVICES, frontends, cap.frontends()),
        fill(map_names::LB_SLOTS, slots, cap.slots as usize),
        fill(map_names::LB_MEMBERS, slots, cap.slots as usize),
        fill(map_names::LB4_BACKENDS, backends, cap.backend_entries()),
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
