//! `lb-agent run`: load (or take over) the datapath, attach it to the node's interfaces as
//! they appear, and keep the maps equal to what the manifests say.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Context, Result};
use tokio::signal::unix::{signal, SignalKind};

use crate::{
    bpf::{self, Datapath, PinnedMaps},
    http::{self, FrontendCounters, HealthChecks, SharedStatus, Status},
    kube_source::KubeSource,
    manifests::{ManifestDir, Objects},
    maps, node,
    reconcile::{Partial, Reconciler},
    sync::{Dirty, Engine},
    translate::{NodeInfo, ServiceKey},
};

/// How often interfaces, addresses and manifests are looked at.
const POLL: Duration = Duration::from_millis(200);
/// How often the datapath's clock is checked against the kernel's (`Datapath::check_clock`).
const CLOCK_CHECK: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct RunConfig {
    pub manifests: Option<PathBuf>,
    pub kubeconfig: Option<PathBuf>,
    pub node_name: String,
    pub ext_ifaces: Vec<String>,
    /// How external interfaces are attached (XDP or TC).
    pub ext_attach: bpf::ExtAttach,
    pub pod_iface_prefix: String,
    pub cgroup: Option<PathBuf>,
    pub pin_path: PathBuf,
    pub metrics_addr: SocketAddr,
    pub healthz_addr: SocketAddr,
    /// Sizes of the maps when they are first created.
    pub map_sizes: bpf::MapSizes,
    /// Report one new flow in N to `lb-agent flows` (0: none).
    pub flow_sample: u32,
    /// The source address of SNATed flows; default: the first IPv4 address of the first
    /// `--ext-iface`.
    pub node_ip: Option<Ipv4Addr>,
    /// Source ports for SNAT (first, last).
    pub snat_ports: (u16, u16),
    /// Entries of one Maglev table (a prime).
    pub maglev_size: u32,
    /// Conntrack garbage collection: how often, and the timeouts.
    pub ct_gc_interval: Duration,
    pub ct_timeouts: crate::conntrack::Timeouts,
}

/// Where the objects come from. Translation is the same for both.
enum Source {
    Manifests { dir: PathBuf, files: ManifestDir },
    Kube(KubeSource),
}

impl Source {
    /// Takes in what changed; returns whether the objects changed.
    fn poll(&mut self) -> bool {
        match self {
            Source::Manifests { dir, files } => match files.scan(dir) {
                Ok(scan) => {
                    for e in &scan.errors {
                        tracing::error!("{e}; keeping the last good state of that file");
                    }
                    scan.changed
                }
                Err(e) => {
                    tracing::error!("{e}; keeping the last good state");
                    false
                }
            },
            Source::Kube(k) => k.synced() && k.take_changed(),
        }
    }

    fn objects(&self) -> Objects {
        match self {
            Source::Manifests { files, .. } => files.objects(),
            Source::Kube(k) => k.objects(),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Source::Manifests { .. } => "manifests",
            Source::Kube(_) => "kubernetes",
        }
    }

    fn connected(&self) -> Option<bool> {
        match self {
            Source::Manifests { .. } => None,
            Source::Kube(k) => Some(k.connected()),
        }
    }

    /// Whether the objects are complete enough to program from: kube-proxy does not sync
    /// before its informers have listed, and neither does the agent (an empty store would
    /// wipe a taken-over datapath).
    fn ready(&self) -> bool {
        match self {
            Source::Manifests { .. } => true,
            Source::Kube(k) => k.synced(),
        }
    }

    /// Trigger times of the EndpointSlice changes since the last call (for the network
    /// programming latency).
    fn take_triggers(&self) -> Vec<SystemTime> {
        match self {
            Source::Manifests { .. } => Vec::new(),
            Source::Kube(k) => k.take_triggers(),
        }
    }

    /// The Services changed since the last call.
    fn take_dirty(&mut self) -> Dirty {
        match self {
            Source::Manifests { files, .. } => files.take_dirty(),
            Source::Kube(k) => k.take_dirty(),
        }
    }

    /// The named Services with their EndpointSlices (and the Pods, for manifests).
    fn objects_for(&self, keys: &BTreeSet<ServiceKey>) -> Objects {
        match self {
            Source::Manifests { files, .. } => files.objects_for(keys),
            Source::Kube(k) => k.objects_for(keys),
        }
    }

    fn zone(&self) -> Option<String> {
        match self {
            Source::Manifests { .. } => None,
            Source::Kube(k) => k.zone(),
        }
    }

    /// Resolves when the source has news (the API); never for manifests (polled).
    async fn wait(&self) {
        match self {
            Source::Manifests { .. } => std::future::pending().await,
            Source::Kube(k) => k.notify.notified().await,
        }
    }
}

pub async fn run(cfg: RunConfig) -> Result<()> {
    if !crate::maglev::is_prime(cfg.maglev_size) {
        bail!("--maglev-table-size {}: must be a prime", cfg.maglev_size);
    }
    for (flag, n) in [
        ("--max-services", cfg.map_sizes.services),
        ("--max-backends", cfg.map_sizes.backends),
        ("--max-backend-slots", cfg.map_sizes.slots),
    ] {
        if n < 2 {
            bail!("{flag} {n}: must be at least 2");
        }
    }
    if cfg.snat_ports.0 == 0 || cfg.snat_ports.0 > cfg.snat_ports.1 {
        bail!(
            "--snat-ports {}-{}: must be FIRST-LAST with 0 < FIRST <= LAST",
            cfg.snat_ports.0,
            cfg.snat_ports.1
        );
    }
    let mut source = match &cfg.manifests {
        Some(dir) => {
            if !dir.is_dir() {
                bail!("--manifests {}: not a directory", dir.display());
            }
            Source::Manifests {
                dir: dir.clone(),
                files: ManifestDir::default(),
            }
        }
        None => Source::Kube(KubeSource::start(cfg.kubeconfig.as_deref(), &cfg.node_name).await?),
    };

    for w in node::check_host() {
        tracing::warn!("{w}");
    }
    let mut datapath = Datapath::load(&cfg.pin_path, cfg.map_sizes)?;
    datapath.set_ext_attach(cfg.ext_attach);
    let cap = bpf::read_capacity(&cfg.pin_path)?;
    let asked = (
        cfg.map_sizes.services,
        cfg.map_sizes.backends,
        cfg.map_sizes.slots,
    );
    if (cap.services, cap.backends, cap.slots) != asked {
        tracing::warn!(
            services = cap.services,
            backends = cap.backends,
            backend_slots = cap.slots,
            "the pinned maps keep the sizes they were made with, not --max-services / \
             --max-backends / --max-backend-slots (`lb-agent uninstall` to remake them)"
        );
    }
    {
        use lb_common::config as c;
        let cookie = node::netns_cookie()?;
        for (index, value) in [
            (c::FLOW_SAMPLE, cfg.flow_sample),
            (c::SNAT_PORT_MIN, cfg.snat_ports.0 as u32),
            (c::SNAT_PORT_MAX, cfg.snat_ports.1 as u32),
            (c::MAGLEV_SIZE, cfg.maglev_size),
            (c::NETNS_COOKIE_LO, cookie as u32),
            (c::NETNS_COOKIE_HI, (cookie >> 32) as u32),
        ] {
            datapath.set_config(index, value)?;
        }
    }
    datapath.attach_cgroup(cfg.cgroup.as_deref())?;
    if let Some(cg) = &cfg.cgroup {
        tracing::info!(cgroup = %cg.display(), "socket hooks attached (host-network clients)");
    }
    {
        let (pin, every, timeouts) = (cfg.pin_path.clone(), cfg.ct_gc_interval, cfg.ct_timeouts);
        std::thread::spawn(move || loop {
            std::thread::sleep(every);
            match crate::conntrack::sweep(&pin, &timeouts) {
                Ok(s) if s != Default::default() => {
                    tracing::debug!(
                        flows = s.flows,
                        snat = s.snat,
                        orphans = s.orphans,
                        "conntrack swept"
                    )
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = format!("{e:#}"), "conntrack sweep failed"),
            }
        });
    }
    tracing::info!(
        pin_path = %cfg.pin_path.display(),
        taken_over = datapath.taken_over,
        clock_tick_ns = datapath.clock().ns_per_tick,
        "datapath ready"
    );
    let status: SharedStatus = Arc::new(Mutex::new(Status::default()));
    let pin = cfg.pin_path.clone();
    let metrics_status = status.clone();
    let refresh: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
        let counters = bpf::read_stats(&pin).unwrap_or_default();
        let frontends = frontend_counters(&pin).unwrap_or_default();
        let backends = bpf::read_backend_stats(&pin).unwrap_or_default();
        if let Ok(mut s) = metrics_status.lock() {
            s.datapath_counters = counters;
            s.frontend_counters = frontends;
            s.backend_counters = backends
                .into_iter()
                .map(|(b, c)| (b, c.packets, c.bytes))
                .collect();
        }
    });
    for (addr, what) in [(cfg.healthz_addr, "healthz"), (cfg.metrics_addr, "metrics")] {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the {what} address {addr}"))?;
        tracing::info!(%addr, "serving {what}");
        tokio::spawn(http::serve(listener, status.clone(), refresh.clone()));
    }

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut reconciler: Option<Reconciler<PinnedMaps>> = None;
    let mut health_checks = HealthChecks::default();
    let mut engine = Engine::default();
    // What to translate again; everything until a full sync succeeded.
    let mut pending = Dirty {
        all: true,
        ..Default::default()
    };
    let mut zone = None;
    let mut addresses: BTreeSet<Ipv4Addr> = BTreeSet::new();
    let mut clock_checked = Instant::now();
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = source.wait() => {}
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }

        if let Err(e) = attach_interfaces(&mut datapath, &cfg) {
            tracing::warn!(error = format!("{e:#}"), "interface scan failed");
        }
        if clock_checked.elapsed() >= CLOCK_CHECK {
            clock_checked = Instant::now();
            match datapath.check_clock() {
                Ok(Some(c)) => tracing::warn!(
                    tick_ns = c.ns_per_tick,
                    "the datapath clock was off from the kernel's, or not calibrated: calibrated again"
                ),
                Ok(None) => {}
                Err(e) => tracing::warn!(error = format!("{e:#}"), "checking the datapath clock"),
            }
        }

        match node::addresses() {
            Ok(a) if a != addresses => {
                tracing::info!(addresses = ?a, "node addresses");
                addresses = a;
                pending.all = true;
                let snat_ip = cfg
                    .node_ip
                    .or_else(|| node::primary_address(&cfg.ext_ifaces));
                match snat_ip {
                    Some(ip) => {
                        let v = u32::from_ne_bytes(ip.octets());
                        if let Err(e) = datapath.set_config(lb_common::config::NODE_ADDR, v) {
                            tracing::warn!(error = format!("{e:#}"), "setting the node address");
                        } else {
                            tracing::info!(%ip, "node address (source of SNATed flows)");
                        }
                    }
                    None if cfg.ext_ifaces.is_empty() => {}
                    None => tracing::warn!(
                        "no IPv4 address on the external interfaces: traffic from outside to \
                         backends on other nodes is dropped until one appears (or --node-ip)"
                    ),
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = format!("{e:#}"), "reading node addresses failed"),
        }

        if let Ok(mut s) = status.lock() {
            s.source = source.name();
            s.api_connected = source.connected();
        }
        if source.poll() {
            if let Ok(mut s) = status.lock() {
                s.last_queued = Some(SystemTime::now());
            }
        }
        if !source.ready() {
            continue;
        }
        pending.merge(source.take_dirty());
        let z = source.zone();
        if z != zone {
            zone = z;
            pending.all = true;
        }
        if pending.is_empty() {
            continue;
        }
        let started = Instant::now();
        let node = NodeInfo {
            name: cfg.node_name.clone(),
            addresses: addresses.iter().copied().collect(),
            zone: zone.clone(),
        };
        let r = match reconciler.as_mut() {
            Some(r) => r,
            None => match PinnedMaps::open(&cfg.pin_path).map(Reconciler::new) {
                Ok(Ok(r)) => reconciler.insert(r),
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "reading the pinned maps failed");
                    continue;
                }
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "opening the pinned maps failed");
                    continue;
                }
            },
        };
        // Only the Services that changed, unless everything must be looked at again.
        let incremental = if pending.all {
            None
        } else {
            let objects = source.objects_for(&pending.services);
            engine.update(&objects, &node, &pending.services)
        };
        let full = incremental.is_none();
        let (result, warnings, touched) = match incremental {
            Some((partial, warnings)) => {
                let old_ids = service_ids_of(r, &partial);
                let result = r.apply_partial(engine.desired(), &partial);
                (result, warnings, Some((partial, old_ids)))
            }
            None => {
                let warnings = engine.rebuild(&source.objects(), &node);
                (r.apply(engine.desired()), warnings, None)
            }
        };
        for w in &warnings {
            tracing::warn!("{w}");
        }
        let desired = engine.desired();
        match result {
            Ok(stats) => {
                let took = started.elapsed();
                tracing::info!(
                    frontends = desired.frontends.len(),
                    services = if full {
                        None
                    } else {
                        Some(pending.services.len())
                    },
                    writes = stats.writes,
                    deletes = stats.deletes,
                    took_us = took.as_micros() as u64,
                    "datapath programmed"
                );
                let triggers = source.take_triggers();
                let now = SystemTime::now();
                let fill = r.fill();
                for (map, n, cap) in &fill {
                    if *n * 10 >= *cap * 9 && *n <= *cap {
                        tracing::warn!(map, entries = n, capacity = cap, "map nearly full");
                    }
                }
                health_checks.sync(&desired.health_checks, &status);
                if let Ok(mut s) = status.lock() {
                    s.map_fill = fill;
                    s.record_sync(took);
                    s.no_local_endpoints = (
                        desired.no_local_endpoints_internal,
                        desired.no_local_endpoints_external,
                    );
                    for at in &triggers {
                        s.record_programming(now.duration_since(*at).unwrap_or_default());
                    }
                    match &touched {
                        None => s.frontends = frontend_names(desired, r.service_ids()),
                        Some((partial, old_ids)) => {
                            update_frontend_names(&mut s.frontends, desired, r, partial, old_ids)
                        }
                    }
                }
                pending = Dirty::default();
            }
            Err(e) => {
                tracing::error!(error = %e, "programming the datapath failed; will retry");
                if let Ok(mut s) = status.lock() {
                    s.failing = true;
                }
                // Start over from what the maps really hold, with everything.
                reconciler = None;
                pending.all = true;
            }
        }
    }
    tracing::info!("stopping; the datapath stays attached and programmed");
    Ok(())
}

/// The service ids the frontends of a partial change have before it is applied.
fn service_ids_of(r: &Reconciler<PinnedMaps>, partial: &Partial) -> Vec<u32> {
    partial
        .frontends
        .iter()
        .flat_map(|fe| {
            [lb_common::SCOPE_ALL, lb_common::SCOPE_PODS]
                .map(|scope| r.service_id(&maps::frontend_key(fe, scope)))
        })
        .flatten()
        .collect()
}

/// Updates the names of the frontends a partial change touched.
fn update_frontend_names(
    names: &mut std::collections::BTreeMap<u32, (String, String)>,
    desired: &crate::model::Desired,
    r: &Reconciler<PinnedMaps>,
    partial: &Partial,
    old_ids: &[u32],
) {
    for id in old_ids {
        names.remove(id);
    }
    for fe in &partial.frontends {
        for (scope, frontends) in [
            (lb_common::SCOPE_ALL, &desired.frontends),
            (lb_common::SCOPE_PODS, &desired.pod_frontends),
        ] {
            if let (Some(st), Some(id)) = (
                frontends.get(fe),
                r.service_id(&maps::frontend_key(fe, scope)),
            ) {
                names.insert(id, (fe.to_string(), st.service.to_string()));
            }
        }
    }
}

/// Service id → (frontend, service port name) of every programmed entry.
fn frontend_names(
    desired: &crate::model::Desired,
    ids: Vec<(lb_common::ServiceKeyV4, u32)>,
) -> std::collections::BTreeMap<u32, (String, String)> {
    let mut by_key = std::collections::HashMap::new();
    for (scope, frontends) in [
        (lb_common::SCOPE_ALL, &desired.frontends),
        (lb_common::SCOPE_PODS, &desired.pod_frontends),
    ] {
        for (fe, st) in frontends {
            let k = maps::frontend_key(fe, scope);
            by_key.insert(
                (k.addr, k.port, k.proto, k.scope),
                (fe.to_string(), st.service.to_string()),
            );
        }
    }
    ids.into_iter()
        .filter_map(|(k, id)| Some((id, by_key.get(&(k.addr, k.port, k.proto, k.scope))?.clone())))
        .collect()
}

/// Every frontend's datapath counters, from the pinned maps.
fn frontend_counters(pin: &std::path::Path) -> Result<Vec<FrontendCounters>> {
    let rows = maps::dump(&PinnedMaps::open(pin)?)?;
    let ids: Vec<u32> = rows.iter().map(|r| r.id).collect();
    let stats = bpf::read_service_stats(pin, &ids)?;
    Ok(rows
        .into_iter()
        .zip(stats)
        .map(|(r, (_, c))| FrontendCounters {
            frontend: r.frontend,
            packets: c.packets,
            bytes: c.bytes,
            new_flows: c.new_flows,
            rejected: c.rejected,
        })
        .collect())
}

fn attach_interfaces(datapath: &mut Datapath, cfg: &RunConfig) -> Result<()> {
    let ifaces = node::interfaces()?;
    for (idx, name) in &ifaces {
        if !node::wanted(name, &cfg.ext_ifaces, &cfg.pod_iface_prefix) || datapath.is_attached(*idx)
        {
            continue;
        }
        let is_pod = !cfg.ext_ifaces.contains(name);
        if let Err(e) = node::prepare_interface(name) {
            tracing::warn!(iface = %name, error = format!("{e:#}"), "sysctl failed");
        }
        match datapath.attach(*idx, name, is_pod) {
            Ok(Some(hook)) => tracing::info!(iface = %name, ifindex = idx, %hook, "attached"),
            Ok(None) => {}
            Err(e) => tracing::warn!(iface = %name, error = format!("{e:#}"), "attach failed"),
        }
    }
    let live: Vec<u32> = ifaces.iter().map(|(i, _)| *i).collect();
    for gone in datapath.forget_links_except(&live)? {
        tracing::info!(ifindex = gone, "interface gone; link forgotten");
    }
    Ok(())
}
