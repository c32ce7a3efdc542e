//! The pinned maps' batch writes (`BPF_MAP_UPDATE_BATCH`) against the real maps of a loaded
//! datapath: everything lands, overwrites win, and a batch the map cannot hold fails with the
//! map named. Needs root.
// Harness code: a lab that cannot be built panics with a message, arguments are passed as
// the call sites read best, and floats are compared exactly where they were parsed.
#![allow(
    clippy::needless_pass_by_value,
    clippy::missing_panics_doc,
    clippy::float_cmp,
    clippy::unused_self
)]

use std::collections::BTreeMap;

use lb_common::{BackendSlotKey, BackendV4, DEFAULT_BACKENDS, IPPROTO_TCP};
use lb_control::{
    maps::{BackendValue, Capacity, ServiceMaps},
    reconcile::Reconciler,
};
use lb_testkit::{require_root, PinDir};
use lb_userspace::datapath::{Datapath, MapSizes, PinnedMaps};

fn open(tag: &str) -> (PinDir, Datapath, PinnedMaps) {
    open_sized(
        tag,
        MapSizes {
            conntrack: 1024,
            ..Default::default()
        },
    )
}

fn open_sized(tag: &str, sizes: MapSizes) -> (PinDir, Datapath, PinnedMaps) {
    require_root();
    let pin = PinDir::new(tag);
    let datapath = Datapath::load(pin.path(), sizes).expect("datapath loads");
    let maps = PinnedMaps::open(pin.path()).expect("maps open");
    (pin, datapath, maps)
}

#[test]
fn batch_writes_land_and_overwrite() {
    let (_pin, _dp, mut maps) = open("batch");
    // More than one batch (16,384 entries each).
    let entries: Vec<(BackendSlotKey, u32)> = (0..40_000u32)
        .map(|i| {
            let key = BackendSlotKey {
                svc_id: 1 + i / 4,
                slot: i % 4,
            };
            (key, 1000 + i)
        })
        .collect();
    maps.set_slots(&entries).expect("batch write");
    let read_slots = |maps: &PinnedMaps| -> BTreeMap<(u32, u32), u32> {
        maps.slots()
            .expect("iterate")
            .into_iter()
            .map(|(k, v)| ((k.svc_id, k.slot), v))
            .collect()
    };
    let read = read_slots(&maps);
    assert_eq!(read.len(), entries.len());
    for (k, v) in &entries {
        assert_eq!(read.get(&(k.svc_id, k.slot)), Some(v), "{k:?}");
    }

    // Overwriting: every other entry gets a new value, the rest keep theirs.
    let changed: Vec<(BackendSlotKey, u32)> = entries
        .iter()
        .step_by(2)
        .map(|(k, v)| (*k, v + 7))
        .collect();
    maps.set_slots(&changed).expect("batch overwrite");
    let read = read_slots(&maps);
    assert_eq!(read.len(), entries.len());
    for (i, (k, v)) in entries.iter().enumerate() {
        let want = if i % 2 == 0 { v + 7 } else { *v };
        assert_eq!(read[&(k.svc_id, k.slot)], want, "{k:?}");
    }
    maps.set_slots(&[])
        .expect("an empty batch is nothing to do");
}

#[test]
fn a_batch_the_map_cannot_hold_fails_naming_the_map() {
    let (_pin, _dp, mut maps) = open("batchfull");
    let too_many: Vec<(u32, BackendValue)> = (1..=DEFAULT_BACKENDS + 1)
        .map(|id| {
            let b = BackendV4 {
                addr: id.to_be(),
                port: 8080u16.to_be(),
                proto: IPPROTO_TCP,
                flags: 0,
            };
            (id, b.into())
        })
        .collect();
    let e = maps
        .set_backends(&too_many)
        .expect_err("one entry more than the map holds");
    let text = e.to_string();
    assert!(text.contains("LB4_BACKENDS"), "{text}");
    assert!(
        text.contains(&format!(
            "after {} of {}",
            DEFAULT_BACKENDS,
            DEFAULT_BACKENDS + 1
        )),
        "{text}"
    );
    // What fitted was written.
    assert_eq!(
        maps.backends().expect("iterate").len(),
        DEFAULT_BACKENDS as usize
    );
}

#[test]
fn the_maps_are_made_with_the_sizes_asked_for_and_the_reconciler_keeps_to_them() {
    let sizes = MapSizes {
        services: 300_000,
        backends: 1000,
        slots: 3000,
        conntrack: 1024,
        ..Default::default()
    };
    let (pin, _dp, maps) = open_sized("sized", sizes);
    let cap = Capacity {
        services: 300_000,
        backends: 1000,
        slots: 3000,
    };
    assert_eq!(maps.capacity(), cap);
    assert_eq!(
        lb_userspace::datapath::read_capacity(pin.path()).expect("read"),
        cap
    );
    let r = Reconciler::new(maps).expect("reconciler");
    let fill: Vec<(&str, usize)> = r.fill().iter().map(|f| (f.map, f.capacity)).collect();
    // Each family's maps and the id spaces they share (LB_SVC_STATS, LB_BE_STATS).
    assert_eq!(
        fill,
        [
            ("LB4_SERVICES", 299_999),
            ("LB6_SERVICES", 299_999),
            ("LB_SVC_STATS", 299_999),
            ("LB_SLOTS", 3000),
            ("LB_MEMBERS", 3000),
            ("LB4_BACKENDS", 999),
            ("LB6_BACKENDS", 999),
            ("LB_BE_STATS", 999),
        ]
    );
}

#[test]
fn conntrack_is_read_and_pruned_in_batches() {
    use aya::maps::{HashMap, Map, MapData};
    use lb_common::{map_names, CtEntryV4, CtKeyV4};
    use std::os::fd::AsFd;

    let (pin, _dp, _maps) = open_sized(
        "ctbatch",
        MapSizes {
            conntrack: 65_536,
            ..Default::default()
        },
    );
    let data = MapData::from_pin(pin.path().join(map_names::LB4_CONNTRACK)).expect("pinned");
    let mut ct: HashMap<MapData, CtKeyV4, CtEntryV4> =
        HashMap::try_from(Map::LruHashMap(data)).expect("conntrack map");
    let key = |i: u32| CtKeyV4 {
        saddr: i.to_be(),
        daddr: 0x0a60_0001u32.to_be(),
        sport: (i as u16).to_be(),
        dport: 80u16.to_be(),
        proto: IPPROTO_TCP,
        _pad: [0; 3],
    };
    for i in 0..20_000u32 {
        let e = CtEntryV4 {
            backend_id: i,
            ..Default::default()
        };
        ct.insert(key(i), e, 0).expect("insert");
    }
    let fd = aya::maps::IterableMap::map(&ct).fd().as_fd();
    let all: Vec<(CtKeyV4, CtEntryV4)> = lb_userspace::datapath::sys::dump_batch(fd)
        .expect("batch read")
        .expect("this kernel has batch lookups");
    assert_eq!(all.len(), 20_000);
    for (k, e) in &all {
        assert_eq!(*k, key(e.backend_id));
    }
    // Every other key, and some that were never there (skipped, not an error).
    let mut doomed: Vec<CtKeyV4> = (0..20_000u32).step_by(2).map(key).collect();
    doomed.insert(10, key(1_000_000));
    doomed.push(key(2_000_000));
    assert!(lb_userspace::datapath::sys::delete_batch(fd, &doomed).expect("batch delete"));
    let left = lb_userspace::datapath::sys::dump_batch::<CtKeyV4, CtEntryV4>(fd)
        .expect("batch read")
        .expect("batch lookups");
    assert_eq!(left.len(), 10_000);
    assert!(left.iter().all(|(_, e)| e.backend_id % 2 == 1));
}
