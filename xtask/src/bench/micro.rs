//! What the agent costs, measured in this process against the real pinned maps and the real
//! BPF program (not attached anywhere):
//! * programming: Kubernetes objects → translation → the maps, from empty (the agent's full
//!   sync: `sync::Engine::rebuild` and `Reconciler::apply`);
//! * endpoint change: one EndpointSlice changes and goes the agent's incremental way: the
//!   changed Service and its slices are taken from the objects by Service index (as the
//!   sources keep them), that Service is translated again (`Engine::update`) and its
//!   frontends programmed (`Reconciler::apply_partial`); p50 / p99 over many changes;
//! * per packet: the XDP program on a new-flow SYN and on a conntrack hit, next to an XDP
//!   program that does nothing, by BPF_PROG_TEST_RUN (the kernel's own timing): new flows
//!   one frame per call; hits and the empty program also many runs of one frame per call.
//!   The same for IPv6 (`ipv6` in the row): as many IPv6 frontends as Services, written
//!   straight into the `LB6_*` maps (the control plane does not program IPv6 yet), all
//!   sharing one slot list of 4 backends, and an IPv6 twin of `loop_service`.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use aya::{
    maps::{Array, HashMap, Map, MapData},
    programs::{TestRun, TestRunOptions, Xdp},
    EbpfLoader,
};
use lb_common::{
    ipv6_words, map_names, BackendSlotKey, BackendV6, CtEntryV6, CtKeyV6, Ipv6Words, MemberKey,
    ServiceEntry, ServiceKeyV6, BACKEND_F_LOCAL, SCOPE_ALL, SVC_F_CLUSTER_IP,
};
use lb_control::{
    incremental::Engine,
    reconcile::Reconciler,
    source::{Objects, ServiceIndex, ServiceKey},
    translate::NodeInfo,
};
use lb_testkit::frame::{Frame, Frame6, ACK, SYN, TCP};
use lb_testkit::PinDir;
use lb_userspace::datapath::{loader::EBPF_OBJECT, Datapath, MapSizes, PinnedMaps};
use serde_json::{json, Value};

use super::{
    services::{generate, objects, service_ip, Svc},
    stats::percentile,
};

fn endpoint_ip(i: usize, e: usize) -> Ipv4Addr {
    let n = i * 4 + e;
    Ipv4Addr::new(10, 244 + (n >> 16) as u8, (n >> 8) as u8, n as u8)
}

/// `n` Services with 4 endpoints each, every endpoint its own address; in odd generations
/// endpoint 0 of the last Service has another address (the endpoint change).
fn objects_at(n: usize, generation: usize) -> Result<Objects> {
    let mut set = generate(n, 8080, endpoint_ip);
    set.insert(0, loop_service());
    if generation % 2 == 1 {
        if let Some(last) = set.last_mut() {
            last.endpoints[0] = Ipv4Addr::new(10, 255, 0, 1);
        }
    }
    objects(&set)
}

/// The ClusterIP of `loop_service`.
const LOOP_IP: Ipv4Addr = Ipv4Addr::new(10, 95, 255, 1);

/// A Service whose one endpoint is its own ClusterIP and port: its flows are translated to
/// the tuple they already have, so a conntrack hit leaves the frame as it was and the kernel
/// can run the same frame many times over (`repeat`), which spreads the cost of the clock
/// reads around each run. The hit path is the same as any flow's: lookup, flags, refresh,
/// counters, rewrite (of equal values).
fn loop_service() -> Svc {
    Svc {
        name: "loop".into(),
        port_name: "http".into(),
        cluster_ip: LOOP_IP,
        port: 80,
        target_port: 80,
        node_port: None,
        endpoints: vec![LOOP_IP],
    }
}

/// The kernel's average time of one run of `prog` on `frame`, run `repeat` times by one
/// BPF_PROG_TEST_RUN; the frame it left is in `out`.
fn timed(prog: &Xdp, frame: &[u8], repeat: u32, out: &mut [u8]) -> Result<Duration> {
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(out);
    opts.repeat = repeat;
    Ok(prog.test_run(opts).context("BPF_PROG_TEST_RUN")?.duration)
}

/// Average time of one run of `prog` on `frame`, `repeat` runs per call, over `rounds`
/// calls. The frame must come out as it went in (every run saw the same frame).
fn per_run(prog: &Xdp, frame: &[u8], repeat: u32, rounds: usize) -> Result<f64> {
    let mut total = Duration::ZERO;
    let mut out = vec![0u8; 256];
    for _ in 0..rounds {
        total += timed(prog, frame, repeat, &mut out)?;
        if out[..frame.len()] != *frame {
            bail!("the frame changed: the runs were not all the same");
        }
    }
    Ok(total.as_nanos() as f64 / rounds.max(1) as f64)
}

/// Average time of one run of `prog` over `frames` (one frame per call).
fn per_packet(prog: &Xdp, frames: &[Vec<u8>]) -> Result<f64> {
    let mut total = Duration::ZERO;
    let mut out = vec![0u8; 256];
    for f in frames {
        total += timed(prog, f, 1, &mut out)?;
    }
    Ok(total.as_nanos() as f64 / frames.len().max(1) as f64)
}

/// Map sizes for `n` generated Services (as `--max-services`, `--max-backends`,
/// `--max-backend-slots`, `--maglev-tables` would set them): the defaults, or room for the
/// ClusterIPs, the NodePorts (every tenth, at most 2,000: one Maglev table each), 4
/// endpoints each, all distinct, rounded up to a power of two.
fn sizes_for(n: usize) -> MapSizes {
    let d = MapSizes::default();
    let room = |want: usize, default: u32| (want.next_power_of_two() as u32).max(default);
    let node_ports = n.div_ceil(10).min(2000);
    let frontends = n + node_ports + 16;
    MapSizes {
        services: room(frontends, d.services),
        backends: room(4 * n + 16, d.backends),
        slots: room(4 * frontends, d.slots),
        maglev: lb_common::DEFAULT_MAGLEV_SIZE * room(node_ports, lb_common::DEFAULT_MAGLEV_TABLES),
        ..d
    }
}

/// The in-process measurements for `n` Services, as a results.json row.
pub fn measure(n: usize, changes: usize, packets: usize) -> Result<Value> {
    let node = NodeInfo {
        name: lb_testkit::lab::NODE_NAME.into(),
        addresses: vec![Ipv4Addr::new(198, 18, 0, 2).into()],
        zone: None,
    };
    let pin = PinDir::new("bench");
    let sizes = sizes_for(n);
    let mut datapath = Datapath::load(pin.path(), sizes)?;
    datapath.set_config(
        lb_common::config::MAGLEV_SIZE,
        lb_common::DEFAULT_MAGLEV_SIZE,
    )?;
    let mut reconciler = Reconciler::new(PinnedMaps::open(pin.path())?)?;
    let base = objects_at(n, 0)?;
    let mut engine = Engine::default();
    let started = Instant::now();
    engine.rebuild(&base, &node);
    reconciler.apply(engine.desired())?;
    let programming = started.elapsed();

    let mut times = Vec::with_capacity(changes);
    let variants = [objects_at(n, 1)?, base];
    // The sources keep their objects indexed by Service (the API source as the watch events
    // come, the manifests source as a file is read): the index is not part of a change.
    let indexes = [
        ServiceIndex::of(&variants[0]),
        ServiceIndex::of(&variants[1]),
    ];
    let changed: std::collections::BTreeSet<ServiceKey> = variants[0]
        .services
        .last()
        .map(ServiceKey::of_service)
        .into_iter()
        .collect();
    for k in 0..changes {
        let started = Instant::now();
        let mut subset = Objects::default();
        indexes[k % 2].pick(&variants[k % 2], &changed, &mut subset);
        let (partial, _) = engine
            .update(&subset, &node, &changed)
            .context("an update without competing Services")?;
        let stats = reconciler.apply_partial(engine.desired(), &partial)?;
        times.push(started.elapsed());
        if stats.writes == 0 {
            bail!("an endpoint change wrote nothing");
        }
    }
    times.sort();

    // Per packet: new flows towards the last Service created, one frame per run; conntrack
    // hits of a flow of `loop_service`, the same frame many times per run.
    let vip = service_ip(n - 1);
    let client = Ipv4Addr::new(198, 18, 1, 1);
    let new_flows: Vec<Vec<u8>> = (0..packets)
        .map(|i| Frame::tcp((client, 1024 + (i % 60_000) as u16), (vip, 80), SYN).build())
        .collect();
    let prog = datapath.xdp();
    let open = Frame::tcp((client, 65_000), (LOOP_IP, 80), SYN).build();
    per_packet(prog, std::slice::from_ref(&open))?;
    let hit = Frame::tcp((client, 65_000), (LOOP_IP, 80), ACK).build();
    let hits = vec![hit.clone(); packets];
    const REPEAT: u32 = 1000;
    let rounds = (packets / REPEAT as usize).max(1);
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(pin.path())
        .load(EBPF_OBJECT)?;
    let pass: &mut Xdp = ebpf
        .program_mut(lb_common::program_names::LB_XDP_PASS)
        .context("lb_xdp_pass missing")?
        .try_into()?;
    pass.load()?;
    let empty_ns = per_run(pass, &hit, REPEAT, rounds)?;
    let hit_ns = per_run(prog, &hit, REPEAT, rounds)?;
    let empty_single_ns = per_packet(pass, &hits)?;
    let hit_single_ns = per_packet(prog, &hits)?;
    let new_ns = per_packet(prog, &new_flows)?;
    let ipv6 = measure6(pin.path(), prog, &*pass, n, packets, sizes)
        .unwrap_or_else(|e| json!({"error": format!("{e:#}")}));
    Ok(json!({
        "services": n,
        "map_sizes": {"services": sizes.services, "backends": sizes.backends, "backend_slots": sizes.slots},
        "programming_ms": programming.as_secs_f64() * 1000.0,
        "endpoint_change_p50_ms": percentile(&times, 0.5).as_secs_f64() * 1000.0,
        "endpoint_change_p99_ms": percentile(&times, 0.99).as_secs_f64() * 1000.0,
        "empty_program_ns": empty_ns,
        "conntrack_hit_ns": hit_ns,
        "empty_program_single_run_ns": empty_single_ns,
        "conntrack_hit_single_run_ns": hit_single_ns,
        "new_flow_ns": new_ns,
        "ipv6": ipv6,
    }))
}

/// The ClusterIP of the IPv6 twin of `loop_service`.
const LOOP_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x95, 0, 0, 0, 0, 0, 1);
/// The IPv6 bench's clients.
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x18, 1, 0, 0, 0, 1);
/// The node's IPv6 address (the source of SNATed IPv6 flows).
const NODE_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x18, 0, 0, 0, 0, 2);

/// The `i`th IPv6 frontend address: fd00:96::/64 and up.
fn service_ip6(i: usize) -> Ipv6Addr {
    Ipv6Addr::from((0xfd00_0096_u128 << 96) | i as u128)
}

fn endpoint_ip6(e: usize) -> Ipv6Addr {
    Ipv6Addr::from((0xfd00_0010_0244_u128 << 80) | (0x11 + e) as u128)
}

fn pinned(pin: &Path, name: &str) -> Result<MapData> {
    MapData::from_pin(pin.join(name)).with_context(|| format!("opening the pinned {name}"))
}

/// What the IPv6 measurements program: `n` ClusterIP frontends `service_ip6(i)`:80/TCP, all
/// of service id `svc`, whose slots hold 4 local backends; and the loop frontend (service
/// id `loop_svc`, its one backend itself). Ids at the top of their maps, above those the
/// reconciler hands out to the IPv4 Services.
fn program6(pin: &Path, n: usize, sizes: MapSizes) -> Result<()> {
    let mut services: HashMap<MapData, ServiceKeyV6, ServiceEntry> =
        HashMap::try_from(Map::HashMap(pinned(pin, map_names::LB6_SERVICES)?))?;
    let mut backends: HashMap<MapData, u32, BackendV6> =
        HashMap::try_from(Map::HashMap(pinned(pin, map_names::LB6_BACKENDS)?))?;
    let mut slots: HashMap<MapData, BackendSlotKey, u32> =
        HashMap::try_from(Map::HashMap(pinned(pin, map_names::LB_SLOTS)?))?;
    let mut members: HashMap<MapData, MemberKey, u32> =
        HashMap::try_from(Map::HashMap(pinned(pin, map_names::LB_MEMBERS)?))?;
    let mut node: Array<MapData, Ipv6Words> =
        Array::try_from(Map::Array(pinned(pin, map_names::LB6_NODE_ADDR)?))?;
    node.set(0, ipv6_words(NODE_IP6.octets()), 0)
        .context("LB6_NODE_ADDR")?;
    let (svc, loop_svc) = (sizes.services - 2, sizes.services - 1);
    let loop_backend = sizes.backends - 1;
    let main_backends: Vec<(u32, Ipv6Addr)> = (0..4)
        .map(|e| (sizes.backends - 2 - e as u32, endpoint_ip6(e)))
        .collect();
    let mut set = |svc_id: u32, list: &[(u32, Ipv6Addr)], port: u16| -> Result<()> {
        for (slot, (id, addr)) in list.iter().enumerate() {
            let b = BackendV6 {
                addr: ipv6_words(addr.octets()),
                port: port.to_be(),
                proto: TCP,
                flags: BACKEND_F_LOCAL,
            };
            backends.insert(id, b, 0).context("LB6_BACKENDS")?;
            let slot = slot as u32;
            slots
                .insert(BackendSlotKey { svc_id, slot }, id, 0)
                .context("LB_SLOTS")?;
            members
                .insert(
                    MemberKey {
                        svc_id,
                        backend_id: *id,
                    },
                    slot,
                    0,
                )
                .context("LB_MEMBERS")?;
        }
        Ok(())
    };
    set(svc, &main_backends, 8080)?;
    set(loop_svc, &[(loop_backend, LOOP_IP6)], 80)?;
    let entry = |svc_id: u32, count: u32| ServiceEntry {
        svc_id,
        count,
        flags: SVC_F_CLUSTER_IP,
        affinity_timeout_s: 0,
        affinity_group: u64::from(svc_id),
        maglev: 0,
        _pad: 0,
    };
    let key = |addr: Ipv6Addr| ServiceKeyV6 {
        addr: ipv6_words(addr.octets()),
        port: 80u16.to_be(),
        proto: TCP,
        scope: SCOPE_ALL,
    };
    for i in 0..n {
        services
            .insert(key(service_ip6(i)), entry(svc, 4), 0)
            .context("LB6_SERVICES")?;
    }
    services
        .insert(key(LOOP_IP6), entry(loop_svc, 1), 0)
        .context("LB6_SERVICES")?;
    Ok(())
}

/// The IPv6 per-packet measurements, as the IPv4 ones: new flows to the last frontend, one
/// frame per run; conntrack hits of a flow of the loop frontend; the empty program on the
/// same IPv6 frame.
fn measure6(
    pin: &Path,
    prog: &Xdp,
    pass: &Xdp,
    n: usize,
    packets: usize,
    sizes: MapSizes,
) -> Result<Value> {
    program6(pin, n, sizes)?;
    let vip = service_ip6(n - 1);
    // The datapath must translate IPv6 for the numbers to mean anything.
    let probe = Frame6::tcp((CLIENT6, 1023), (vip, 80), SYN).build();
    let mut out = vec![0u8; 256];
    timed(prog, &probe, 1, &mut out)?;
    if out[..probe.len()] == *probe {
        bail!(
            "the XDP program left an IPv6 SYN to an IPv6 frontend untranslated: no IPv6 datapath"
        );
    }
    let new_flows: Vec<Vec<u8>> = (0..packets)
        .map(|i| Frame6::tcp((CLIENT6, 1024 + (i % 60_000) as u16), (vip, 80), SYN).build())
        .collect();
    let open = Frame6::tcp((CLIENT6, 65_000), (LOOP_IP6, 80), SYN).build();
    per_packet(prog, std::slice::from_ref(&open))?;
    let conntrack: HashMap<MapData, CtKeyV6, CtEntryV6> =
        HashMap::try_from(Map::LruHashMap(pinned(pin, map_names::LB6_CONNTRACK)?))?;
    let key = CtKeyV6 {
        saddr: ipv6_words(CLIENT6.octets()),
        daddr: ipv6_words(LOOP_IP6.octets()),
        sport: 65_000u16.to_be(),
        dport: 80u16.to_be(),
        proto: TCP,
        _pad: [0; 3],
    };
    if conntrack.get(&key, 0).is_err() {
        bail!("the loop flow's SYN left no LB6_CONNTRACK entry: its ACKs would not be hits");
    }
    let hit = Frame6::tcp((CLIENT6, 65_000), (LOOP_IP6, 80), ACK).build();
    let hits = vec![hit.clone(); packets];
    const REPEAT: u32 = 1000;
    let rounds = (packets / REPEAT as usize).max(1);
    let empty_ns = per_run(pass, &hit, REPEAT, rounds)?;
    let hit_ns = per_run(prog, &hit, REPEAT, rounds)?;
    let empty_single_ns = per_packet(pass, &hits)?;
    let hit_single_ns = per_packet(prog, &hits)?;
    let new_ns = per_packet(prog, &new_flows)?;
    Ok(json!({
        "frontends": n,
        "empty_program_ns": empty_ns,
        "conntrack_hit_ns": hit_ns,
        "empty_program_single_run_ns": empty_single_ns,
        "conntrack_hit_single_run_ns": hit_single_ns,
        "new_flow_ns": new_ns,
    }))
}
