//! `lb-agent run`: load (or take over) the datapath, attach it to the node's interfaces as
//! they appear, and keep the maps equal to what the source says. The loop: source → control
//! (incremental translation) → reconcile (the only writer of the service maps) → datapath;
//! its state is served over HTTP (`state`, `http`, `healthcheck`).

pub mod config;
pub mod healthcheck;
pub mod http;
pub mod metrics;
pub mod state;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result};
use lb_common::{SCOPE_ALL, SCOPE_PODS};
use lb_control::{
    incremental::Engine,
    maps::{self as service_maps, frontend_key, FrontendKey},
    model::{Desired, FrontendState, L4Addr, Proto},
    reconcile::{Partial, Reconciler},
    source::{manifests::ManifestSource, Dirty, Source},
    translate::NodeInfo,
};
use tokio::signal::unix::{signal, SignalKind};

pub use self::config::RunConfig;
use self::{
    healthcheck::HealthChecks,
    http::Endpoints,
    metrics::{DatapathCounters, FrontendCounters, Metrics},
    state::{FrontendName, SharedState},
};
use crate::{
    datapath::{self, host_sockets, node, pinned_maps, stats, Datapath, PinnedMaps},
    source::kube::{ApiAccess, KubeSource},
};

/// How often interfaces, addresses and manifests are looked at.
const POLL: Duration = Duration::from_millis(200);
/// How often the datapath's clock is checked against the kernel's (`Datapath::check_clock`).
const CLOCK_CHECK: Duration = Duration::from_mins(1);

pub async fn run(cfg: RunConfig) -> Result<()> {
    cfg.check()?;
    let mut source: Box<dyn Source> = if let Some(dir) = &cfg.manifests {
        Box::new(ManifestSource::new(dir)?)
    } else {
        let access = match &cfg.kubeconfig {
            Some(path) => ApiAccess::Kubeconfig(path),
            None => ApiAccess::InCluster(cfg.api_server.as_ref()),
        };
        Box::new(KubeSource::start(access, &cfg.node_name).await?)
    };

    for w in node::check_host() {
        tracing::warn!("{w}");
    }
    let mut datapath = Datapath::load(&cfg.pin_path, cfg.map_sizes)?;
    datapath.set_ext_attach(cfg.ext_attach);
    let cap = datapath::read_capacity(&cfg.pin_path)?;
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
            (c::SNAT_PORT_MIN, u32::from(cfg.snat_ports.0)),
            (c::SNAT_PORT_MAX, u32::from(cfg.snat_ports.1)),
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
            match datapath::conntrack::sweep(&pin, &timeouts) {
                Ok(s) if s != datapath::conntrack::Swept::default() => {
                    tracing::debug!(
                        flows = s.flows,
                        snat = s.snat,
                        orphans = s.orphans,
                        "conntrack swept"
                    );
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
    let status = SharedState::new(
        Metrics::new(source.name(), source.connected().is_some()),
        cfg.healthz_timeout,
    );
    let pin = cfg.pin_path.clone();
    // Before each scrape: the datapath's counters. A failed read keeps the last values (and
    // is logged and counted), rather than serving zeros.
    let refresh: http::Refresh = Arc::new(move |m: &Metrics| {
        let read = || -> Result<_> {
            Ok(DatapathCounters {
                outcomes: stats::read_stats(&pin)?,
                frontends: frontend_counters(&pin)?,
                backends: stats::read_backend_stats(&pin)?
                    .into_iter()
                    .map(|(b, c)| (b, c.packets, c.bytes))
                    .collect(),
            })
        };
        match read() {
            Ok(counters) => m.set_datapath(&counters),
            Err(e) => {
                m.counter_read_failed();
                tracing::warn!(
                    error = format!("{e:#}"),
                    "reading the datapath's counters for /metrics failed; serving the last ones"
                );
            }
        }
    });
    for (addr, which, what) in [
        (cfg.healthz_addr, Endpoints::Health, "/healthz, /livez"),
        (
            cfg.metrics_addr,
            Endpoints::Metrics,
            "/metrics, /proxyMode, /debug/frontends",
        ),
    ] {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr} for {what}"))?;
        tracing::info!(%addr, "serving {what}");
        tokio::spawn(http::serve_agent(
            listener,
            which,
            status.clone(),
            refresh.clone(),
        ));
    }

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut reconciler: Option<Reconciler<PinnedMaps>> = None;
    let mut health_checks = HealthChecks::default();
    let mut engine = Engine::default();
    // What to translate again; everything until a full sync succeeded.
    let mut pending = Dirty::everything();
    // Trigger times of the EndpointSlice changes in `pending`, measured once programmed.
    let mut pending_triggers = Vec::new();
    let mut zone = None;
    let mut addresses: BTreeSet<IpAddr> = BTreeSet::new();
    // The node's primary address of each family (SNAT sources, `primary` NodePorts).
    let mut primary: Vec<IpAddr> = Vec::new();
    // The node's host IPs as its Node object gives them (where the source knows it).
    let mut node_status_addresses: Vec<IpAddr> = Vec::new();
    let mut clock_checked = Instant::now();
    let links = watch_links();
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = source.wait() => {}
            () = links.notified() => {}
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

        let from_node = source.node_addresses();
        match node::addresses() {
            Ok(a) if a != addresses || from_node != node_status_addresses => {
                tracing::info!(addresses = ?a, node_status = ?from_node, "node addresses");
                addresses = a;
                node_status_addresses = from_node;
                pending.all = true;
                status.lock().queued();
                primary = program_node_addresses(&mut datapath, &cfg, &node_status_addresses);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = format!("{e:#}"), "reading node addresses failed"),
        }

        let changed = source.poll();
        let changes = source.take_changes();
        {
            let mut s = status.lock();
            if let Some(c) = source.connected() {
                s.metrics().set_api_connected(c);
            }
            s.node_eligible = source.node_eligible();
            if changed {
                s.queued();
            }
            s.record_changes(changes);
        }
        if !source.ready() {
            continue;
        }
        pending.merge(source.take_dirty());
        pending_triggers.extend(source.take_triggers());
        let z = source.zone();
        if z != zone {
            zone = z;
            pending.all = true;
        }
        if pending.is_empty() {
            // Nothing the datapath does not have.
            status.lock().up_to_date();
            continue;
        }
        let started = Instant::now();
        let node = NodeInfo {
            name: cfg.node_name.clone(),
            addresses: nodeport_addresses(&cfg, &addresses, &primary),
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
        let (result, warnings, touched) = if let Some((partial, warnings)) = incremental {
            let old_ids = service_ids_of(r, &partial);
            let result = r.apply_partial(engine.desired(), &partial);
            (result, warnings, Some((partial, old_ids)))
        } else {
            let warnings = engine.rebuild(&source.objects(), &node);
            (r.apply(engine.desired()), warnings, None)
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
                let now = SystemTime::now();
                let fill = r.fill();
                for f in fill.iter().filter(|f| f.nearly_full()) {
                    tracing::warn!(
                        map = f.map,
                        entries = f.entries,
                        capacity = f.capacity,
                        "map nearly full"
                    );
                }
                health_checks.sync(&desired.health_checks, &status);
                if stats.writes + stats.deletes > 0 {
                    leave_removed_backends(&cfg.pin_path, desired);
                }
                {
                    let mut s = status.lock();
                    s.metrics().set_map_fill(&fill);
                    s.record_sync(took);
                    s.metrics().set_no_local_endpoints(
                        desired.no_local_endpoints_internal,
                        desired.no_local_endpoints_external,
                    );
                    // Never negative: a trigger time ahead of this clock counts as 0.
                    for at in pending_triggers.drain(..) {
                        s.record_programming(now.duration_since(at).unwrap_or_default());
                    }
                    match &touched {
                        None => s.frontends = frontend_names(desired, r.service_ids()),
                        Some((partial, old_ids)) => {
                            update_frontend_names(&mut s.frontends, desired, r, partial, old_ids);
                        }
                    }
                }
                pending = Dirty::default();
            }
            Err(e) => {
                tracing::error!(error = %e, "programming the datapath failed; will retry");
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
        .flat_map(|fe| [SCOPE_ALL, SCOPE_PODS].map(|scope| r.service_id(&frontend_key(fe, scope))))
        .flatten()
        .collect()
}

/// Updates the names of the frontends a partial change touched.
fn update_frontend_names(
    names: &mut BTreeMap<u32, FrontendName>,
    desired: &Desired,
    r: &Reconciler<PinnedMaps>,
    partial: &Partial,
    old_ids: &[u32],
) {
    for id in old_ids {
        names.remove(id);
    }
    for fe in &partial.frontends {
        for (scope, frontends) in [
            (SCOPE_ALL, &desired.frontends),
            (SCOPE_PODS, &desired.pod_frontends),
        ] {
            if let (Some(st), Some(id)) =
                (frontends.get(fe), r.service_id(&frontend_key(fe, scope)))
            {
                let name = FrontendName {
                    id,
                    frontend: fe.to_string(),
                    service: st.service.to_string(),
                };
                names.insert(id, name);
            }
        }
    }
}

/// The name of every programmed entry, by service id.
fn frontend_names(desired: &Desired, ids: Vec<(FrontendKey, u32)>) -> BTreeMap<u32, FrontendName> {
    let mut by_key = HashMap::new();
    for (scope, frontends) in [
        (SCOPE_ALL, &desired.frontends),
        (SCOPE_PODS, &desired.pod_frontends),
    ] {
        for (fe, st) in frontends {
            by_key.insert(frontend_key(fe, scope), (fe, st));
        }
    }
    ids.into_iter()
        .filter_map(|(k, id)| {
            let (fe, st) = by_key.get(&k)?;
            let name = FrontendName {
                id,
                frontend: fe.to_string(),
                service: st.service.to_string(),
            };
            Some((id, name))
        })
        .collect()
}

/// Every frontend's datapath counters, from the pinned maps.
fn frontend_counters(pin: &Path) -> Result<Vec<FrontendCounters>> {
    let rows = service_maps::dump(&PinnedMaps::open(pin)?)?;
    let ids: Vec<u32> = rows.iter().map(|r| r.id).collect();
    let stats = stats::read_service_stats(pin, &ids)?;
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

/// Wakes the loop as soon as a link or an address of the node's namespace changes
/// (netlink), so that a new pod's interface is attached before the pod sends its first
/// packet; polling stays as the fallback (and the only way, if the socket cannot be made).
fn watch_links() -> Arc<tokio::sync::Notify> {
    let notify = Arc::new(tokio::sync::Notify::new());
    match datapath::sys::LinkEvents::open() {
        Ok(events) => {
            let n = notify.clone();
            std::thread::spawn(move || loop {
                match events.wait() {
                    Ok(()) => n.notify_one(),
                    Err(e) => {
                        tracing::warn!(error = %e, "link events lost; interfaces are polled");
                        return;
                    }
                }
            });
        }
        Err(e) => tracing::warn!(error = %e, "no netlink link events; interfaces are polled"),
    }
    notify
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

/// Moves the node's connected UDP sockets off backends their frontend no longer has.
fn leave_removed_backends(pin: &Path, desired: &Desired) {
    let serves = |fe: SocketAddr, be: SocketAddr| {
        let udp = |a: SocketAddr| L4Addr {
            addr: a.ip(),
            port: a.port(),
            proto: Proto::Udp,
        };
        let (fe, be) = (udp(fe), udp(be));
        let has = |set: Option<&FrontendState>| {
            set.is_some_and(|s| s.backends.iter().any(|b| b.addr == be))
        };
        has(desired.frontends.get(&fe))
            || has(desired.pod_frontends.get(&fe))
            || desired.serving.get(&be).is_some_and(|b| b.terminating)
    };
    match host_sockets::leave_removed_backends(pin, serves) {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            sockets = n,
            "connected UDP sockets of the node destroyed: their backend was removed"
        ),
        Err(e) => tracing::warn!(
            error = format!("{e:#}"),
            "moving the node's UDP sockets off removed backends failed"
        ),
    }
}

/// The addresses NodePorts are served on (`--nodeport-addresses`, localhost NodePorts), of
/// both families.
fn nodeport_addresses(
    cfg: &RunConfig,
    addresses: &BTreeSet<IpAddr>,
    primary: &[IpAddr],
) -> Vec<IpAddr> {
    let all: Vec<IpAddr> = addresses.iter().copied().collect();
    cfg.nodeport_addresses
        .select(&all, primary, cfg.localhost_nodeports)
}

/// Writes the node's address of each family, the source of source-NATed flows
/// (`LB_CONFIG[NODE_ADDR]`, `LB6_NODE_ADDR`): `--node-ip` / `--node-ipv6`, else the first
/// address of the family on the external interfaces, else the Node object's host IP of the
/// family (`from_node`). Returns those addresses.
fn program_node_addresses(
    datapath: &mut Datapath,
    cfg: &RunConfig,
    from_node: &[IpAddr],
) -> Vec<IpAddr> {
    let v4 = cfg
        .node_ip
        .or_else(|| node::primary_address(&cfg.ext_ifaces))
        .or_else(|| {
            from_node.iter().find_map(|a| match a {
                IpAddr::V4(a) => Some(*a),
                IpAddr::V6(_) => None,
            })
        });
    let v6 = cfg
        .node_ipv6
        .or_else(|| node::primary_address_v6(&cfg.ext_ifaces))
        .or_else(|| {
            from_node.iter().find_map(|a| match a {
                IpAddr::V6(a) => Some(*a),
                IpAddr::V4(_) => None,
            })
        });
    match v4 {
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
            "no IPv4 address on the external interfaces: IPv4 traffic from outside to \
             backends on other nodes is dropped until one appears (or --node-ip)"
        ),
    }
    // All zero when the node has none.
    match pinned_maps::write_node_addr_v6(&cfg.pin_path, v6) {
        Err(e) => tracing::warn!(error = format!("{e:#}"), "setting the node's IPv6 address"),
        Ok(()) => match v6 {
            Some(ip) => tracing::info!(%ip, "node IPv6 address (source of SNATed IPv6 flows)"),
            None if cfg.ext_ifaces.is_empty() => {}
            None => tracing::info!(
                "no IPv6 address on the external interfaces: IPv6 traffic from outside to \
                 backends on other nodes cannot be source-NATed until one appears (or \
                 --node-ipv6)"
            ),
        },
    }
    v4.map(IpAddr::V4)
        .into_iter()
        .chain(v6.map(IpAddr::V6))
        .collect()
}
