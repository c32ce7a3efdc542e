//! The pinned maps' batch writes (`BPF_MAP_UPDATE_BATCH`) against the real maps of a loaded
//! datapath: everything lands, overwrites win, and a batch the map cannot hold fails with the
//! map named; a dual-stack Service lands in each family's maps. Needs root.
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

/// A dual-stack Service translated and applied to the real maps: each family's frontends in
/// its own map (`LB6_SERVICES` for IPv6), with slots naming backends of its family from the
/// one id space; removing the Service empties both families' maps.
#[test]
fn a_dual_stack_service_lands_in_each_familys_maps_and_leaves_them_clean() {
    use lb_control::{
        maps::{dump, FrontendKey},
        source::manifests::parse_file,
        translate::{translate, NodeInfo},
    };
    let (_pin, _dp, maps) = open("dualstack");
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  type: NodePort
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "fd00:10:96::a"]
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-4, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.244.0.11], nodeName: node-a}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-6, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
ports: [{name: http, port: 8080}]
endpoints: [{addresses: ["fd00:10:244::11"], nodeName: node-a}, {addresses: ["fd00:10:244::12"], nodeName: node-b}]
"#;
    let objects = parse_file(std::path::Path::new("web.yaml"), yaml).expect("parses");
    let node = NodeInfo {
        name: "node-a".into(),
        addresses: vec![
            "198.18.0.2".parse().expect("address"),
            "2001:db8:18::2".parse().expect("address"),
        ],
        zone: None,
    };
    let t = translate(&objects, &node);
    assert!(t.warnings.is_empty(), "{:?}", t.warnings);
    let mut r = Reconciler::new(maps).expect("reconciler");
    r.apply(&t.desired).expect("apply");

    let shown: Vec<(String, Vec<String>)> = dump(r.maps())
        .expect("dump")
        .into_iter()
        .map(|f| {
            (
                f.frontend,
                f.backends.into_iter().map(|b| b.address).collect(),
            )
        })
        .collect();
    let v4 = vec!["10.244.0.11:8080/TCP".to_string()];
    let v6 = vec![
        "[fd00:10:244::11]:8080/TCP".to_string(),
        "[fd00:10:244::12]:8080/TCP".to_string(),
    ];
    let mut want = vec![
        ("10.96.0.10:80/TCP".to_string(), v4.clone()),
        ("198.18.0.2:30080/TCP".to_string(), v4),
        ("[2001:db8:18::2]:30080/TCP".to_string(), v6.clone()),
        ("[fd00:10:96::a]:80/TCP".to_string(), v6),
    ];
    let mut got = shown.clone();
    got.sort();
    want.sort();
    assert_eq!(got, want);

    // Each family in its own maps, ids from one space: no id in both.
    let services = r.maps().services().expect("services");
    let (six, four): (Vec<_>, Vec<_>) = services.iter().partition(|(k, _)| k.is_ipv6());
    assert_eq!((four.len(), six.len()), (2, 2));
    assert!(six.iter().all(|(k, _)| matches!(k, FrontendKey::V6(_))));
    let backends = r.maps().backends().expect("backends");
    assert_eq!(backends.iter().filter(|(_, b)| b.is_ipv6()).count(), 2);
    assert_eq!(backends.iter().filter(|(_, b)| !b.is_ipv6()).count(), 1);
    let mut ids: Vec<u32> = services.iter().map(|(_, e)| e.svc_id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(
        ids.len(),
        4,
        "one service id per frontend, over both families"
    );
    // Every slot of an IPv6 frontend names an IPv6 backend.
    let family_of: BTreeMap<u32, bool> =
        backends.iter().map(|(id, b)| (*id, b.is_ipv6())).collect();
    let v6_ids: Vec<u32> = six.iter().map(|(_, e)| e.svc_id).collect();
    for (k, be) in r.maps().slots().expect("slots") {
        assert_eq!(
            v6_ids.contains(&k.svc_id),
            family_of[&be],
            "slot {k:?} → {be}"
        );
    }

    // The Service goes: nothing of either family stays.
    r.apply(&translate(&lb_control::source::Objects::default(), &node).desired)
        .expect("apply");
    assert!(r.maps().services().expect("services").is_empty());
    assert!(r.maps().backends().expect("backends").is_empty());
    assert!(r.maps().slots().expect("slots").is_empty());
}

/// `LB6_NODE_ADDR` holds the node's IPv6 address as the datapath reads it, all zero for none.
#[test]
fn the_nodes_ipv6_address_is_written_word_by_word() {
    use aya::maps::{Array, Map};
    let (pin, _dp, _maps) = open("nodeaddr6");
    let read = || -> [u32; 4] {
        let data =
            lb_userspace::datapath::pins::open_map(pin.path(), lb_common::map_names::LB6_NODE_ADDR)
                .expect("map");
        let a: Array<_, [u32; 4]> = Array::try_from(Map::Array(data)).expect("array");
        a.get(&0, 0).expect("read")
    };
    let addr: std::net::Ipv6Addr = "2001:db8:18::2".parse().expect("address");
    lb_userspace::datapath::pinned_maps::write_node_addr_v6(pin.path(), Some(addr)).expect("write");
    assert_eq!(lb_common::ipv6_bytes(read()), addr.octets());
    lb_userspace::datapath::pinned_maps::write_node_addr_v6(pin.path(), None).expect("write");
    assert_eq!(read(), [0; 4]);
}
