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

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use aya::{
    programs::{TestRun, TestRunOptions, Xdp},
    EbpfLoader,
};
use lb_control::{
    incremental::Engine,
    reconcile::Reconciler,
    source::{Objects, ServiceIndex, ServiceKey},
    translate::NodeInfo,
};
use lb_testkit::frame::{Frame, ACK, SYN};
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
    }))
}
