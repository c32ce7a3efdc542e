//! The pinned maps' batch writes (`BPF_MAP_UPDATE_BATCH`) against the real maps of a loaded
//! datapath: everything lands, overwrites win, and a batch the map cannot hold fails with the
//! map named. Needs root.

use std::collections::BTreeMap;

use lb_common::{BackendSlotKey, BackendV4, IPPROTO_TCP, MAX_BACKENDS};
use lb_tests::{require_root, PinDir};
use lb_userspace::{
    bpf::{Datapath, MapSizes, PinnedMaps},
    maps::ServiceMaps,
};

fn open(tag: &str) -> (PinDir, Datapath, PinnedMaps) {
    require_root();
    let pin = PinDir::new(tag);
    let datapath = Datapath::load(
        pin.path(),
        MapSizes {
            conntrack: 1024,
            ..Default::default()
        },
    )
    .expect("datapath loads");
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
    let read: BTreeMap<(u32, u32), u32> = maps
        .slots()
        .expect("iterate")
        .into_iter()
        .map(|(k, v)| ((k.svc_id, k.slot), v))
        .collect();
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
    let read: BTreeMap<(u32, u32), u32> = maps
        .slots()
        .expect("iterate")
        .into_iter()
        .map(|(k, v)| ((k.svc_id, k.slot), v))
        .collect();
    assert_eq!(read.len(), entries.len());
    for (i, (k, v)) in entries.iter().enumerate() {
        let want = if i % 2 == 0 { v + 7 } else { *v };
        assert_eq!(read[&(k.svc_id, k.slot)], want, "{k:?}");
    }
    maps.set_slots(&[]).expect("an empty batch is nothing to do");
}

#[test]
fn a_batch_the_map_cannot_hold_fails_naming_the_map() {
    let (_pin, _dp, mut maps) = open("batchfull");
    let too_many: Vec<(u32, BackendV4)> = (1..=MAX_BACKENDS + 1)
        .map(|id| {
            let b = BackendV4 {
                addr: id.to_be(),
                port: 8080u16.to_be(),
                proto: IPPROTO_TCP,
                flags: 0,
            };
            (id, b)
        })
        .collect();
    let e = maps
        .set_backends(&too_many)
        .expect_err("one entry more than the map holds");
    let text = e.to_string();
    assert!(text.contains("LB4_BACKENDS"), "{text}");
    assert!(
        text.contains(&format!("after {} of {}", MAX_BACKENDS, MAX_BACKENDS + 1)),
        "{text}"
    );
    // What fitted was written.
    assert_eq!(
        maps.backends().expect("iterate").len(),
        MAX_BACKENDS as usize
    );
}
