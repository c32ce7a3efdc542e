//! The agent's Prometheus metrics: kube-proxy's under its names, types, help and buckets
//! (`pkg/proxy/metrics/metrics.go`), and the agent's own (`lb_*`), in a `prometheus-client`
//! registry served in the Prometheus text format (0.0.4) on `/metrics`.

use std::{
    fmt,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, SystemTime},
};

use lb_control::{reconcile::MapFill, source::Changes};
use prometheus_client::{
    collector::Collector,
    encoding::{prometheus_text, DescriptorEncoder, EncodeLabelSet, EncodeMetric, LabelSetEncoder},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram, MetricType},
    registry::Registry,
};

/// Buckets of `kubeproxy_sync_proxy_rules_duration_seconds`: exponential, 1 ms × 2, 15 of them
/// (kube-proxy `pkg/proxy/metrics/metrics.go`).
pub const SYNC_BUCKETS: [f64; 15] = [
    0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048, 4.096,
    8.192, 16.384,
];

/// Buckets of `kubeproxy_network_programming_duration_seconds` (kube-proxy metrics.go):
/// 0.25, 0.5, 1..59 by 1, 60..115 by 5, 120..300 by 30.
pub fn programming_buckets() -> Vec<f64> {
    let mut b = vec![0.25, 0.5];
    b.extend((1..60).map(f64::from));
    b.extend((60..120).step_by(5).map(f64::from));
    b.extend((120..=300).step_by(30).map(f64::from));
    b
}

/// The `Content-Type` of `/metrics`.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// `{code="200"}`: the status a health endpoint answered.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PolicyLabel {
    traffic_policy: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabel {
    source: &'static str,
}

/// `{map="LB6_SERVICES",family="ipv6"}`: a map, and the address family of a map that holds
/// one family's entries (`LB4_*`, `LB6_*`); maps both families share (`LB_*`, keyed by
/// service or backend id) have no family label.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct MapLabel {
    map: &'static str,
    family: Option<&'static str>,
}

impl MapLabel {
    fn of(map: &'static str) -> Self {
        MapLabel {
            map,
            family: map_family(map),
        }
    }
}

/// The address family a map's entries are of, from its name: `LB4_*` IPv4, `LB6_*` IPv6.
pub fn map_family(map: &str) -> Option<&'static str> {
    if map.starts_with("LB4_") {
        Some("ipv4")
    } else if map.starts_with("LB6_") {
        Some("ipv6")
    } else {
        None
    }
}

impl EncodeLabelSet for MapLabel {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> Result<(), fmt::Error> {
        let mut labels = vec![("map", self.map)];
        if let Some(family) = self.family {
            labels.push(("family", family));
        }
        EncodeLabelSet::encode(&labels.as_slice(), encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FrontendLabel {
    frontend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabel {
    backend: String,
}

/// A gauge of seconds (or seconds since the epoch).
type Seconds = Gauge<f64, AtomicU64>;

/// One frontend's datapath counters, as read from the maps.
pub struct FrontendCounters {
    pub frontend: String,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub rejected: u64,
}

/// The datapath's counters as read before a scrape.
pub struct DatapathCounters {
    /// Global counters by outcome.
    pub outcomes: Vec<(&'static str, u64)>,
    pub frontends: Vec<FrontendCounters>,
    /// Per backend: address, packets, bytes.
    pub backends: Vec<(String, u64, u64)>,
}

/// A metric registered with its name as served and its help text as written (the registry's
/// own `register` appends a period to the help and would need counters named without their
/// `_total`).
#[derive(Debug)]
struct Described<M> {
    /// As the encoder takes it: a counter's without `_total`, which it appends.
    name: &'static str,
    help: &'static str,
    metric: M,
}

impl<M: EncodeMetric + fmt::Debug + Send + Sync + 'static> Collector for Described<M> {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), fmt::Error> {
        if self.metric.is_empty() {
            return Ok(());
        }
        let metric =
            encoder.encode_descriptor(self.name, self.help, None, self.metric.metric_type())?;
        self.metric.encode(metric)
    }
}

/// Every metric the agent serves. The handles are shared (cloning one clones a reference), so
/// that the agent's loop, its HTTP handlers and the registry see the same values.
pub struct Metrics {
    registry: Registry,
    pub sync_duration: Histogram,
    pub programming: Histogram,
    last_synced: Seconds,
    last_queued: Seconds,
    last_sync_duration: Seconds,
    endpoint_changes_pending: Gauge,
    endpoint_changes_total: Counter,
    service_changes_pending: Gauge,
    service_changes_total: Counter,
    no_local_endpoints: Family<PolicyLabel, Gauge>,
    pub healthz: Family<CodeLabel, Counter>,
    pub livez: Family<CodeLabel, Counter>,
    source: Family<SourceLabel, Gauge>,
    /// Only with a source that connects (the API server).
    api_connected: Option<Gauge>,
    map_entries: Family<MapLabel, Gauge>,
    map_capacity: Family<MapLabel, Gauge>,
    counter_read_errors: Counter,
    datapath_packets: Family<OutcomeLabel, Counter>,
    frontend_packets: Family<FrontendLabel, Counter>,
    frontend_bytes: Family<FrontendLabel, Counter>,
    frontend_new_flows: Family<FrontendLabel, Counter>,
    frontend_rejected: Family<FrontendLabel, Counter>,
    backend_packets: Family<BackendLabel, Counter>,
    backend_bytes: Family<BackendLabel, Counter>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// The registry for an agent whose source is `source` ("manifests", "kubernetes"), with
    /// `lb_api_connected` when the source connects to something.
    pub fn new(source: &'static str, connects: bool) -> Self {
        let mut m = Metrics {
            registry: Registry::default(),
            sync_duration: Histogram::new(SYNC_BUCKETS),
            programming: Histogram::new(programming_buckets()),
            last_synced: Seconds::default(),
            last_queued: Seconds::default(),
            last_sync_duration: Seconds::default(),
            endpoint_changes_pending: Gauge::default(),
            endpoint_changes_total: Counter::default(),
            service_changes_pending: Gauge::default(),
            service_changes_total: Counter::default(),
            no_local_endpoints: Family::default(),
            healthz: Family::default(),
            livez: Family::default(),
            source: Family::default(),
            api_connected: connects.then(Gauge::default),
            map_entries: Family::default(),
            map_capacity: Family::default(),
            counter_read_errors: Counter::default(),
            datapath_packets: Family::default(),
            frontend_packets: Family::default(),
            frontend_bytes: Family::default(),
            frontend_new_flows: Family::default(),
            frontend_rejected: Family::default(),
            backend_packets: Family::default(),
            backend_bytes: Family::default(),
        };
        m.source.get_or_create(&SourceLabel { source }).set(1);
        for traffic_policy in ["internal", "external"] {
            m.no_local_endpoints
                .get_or_create(&PolicyLabel { traffic_policy })
                .set(0);
        }
        m.register_all();
        m
    }

    fn register<M>(&mut self, name: &'static str, help: &'static str, metric: M)
    where
        M: EncodeMetric + fmt::Debug + Send + Sync + 'static,
    {
        let name = match metric.metric_type() {
            MetricType::Counter => name.strip_suffix("_total").unwrap_or(name),
            _ => name,
        };
        self.registry
            .register_collector(Box::new(Described { name, help, metric }));
    }

    fn register_all(&mut self) {
        self.register(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            self.sync_duration.clone(),
        );
        self.register(
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            self.programming.clone(),
        );
        self.register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            self.last_synced.clone(),
        );
        self.register(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
            self.last_queued.clone(),
        );
        self.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            "Pending proxy rules Endpoint changes",
            self.endpoint_changes_pending.clone(),
        );
        self.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes_total",
            "Cumulative proxy rules Endpoint changes",
            self.endpoint_changes_total.clone(),
        );
        self.register(
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            "Pending proxy rules Service changes",
            self.service_changes_pending.clone(),
        );
        self.register(
            "kubeproxy_sync_proxy_rules_service_changes_total",
            "Cumulative proxy rules Service changes",
            self.service_changes_total.clone(),
        );
        self.register(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints",
            self.no_local_endpoints.clone(),
        );
        self.register(
            "kubeproxy_proxy_healthz_total",
            "Cumulative proxy healthz HTTP status",
            self.healthz.clone(),
        );
        self.register(
            "kubeproxy_proxy_livez_total",
            "Cumulative proxy livez HTTP status",
            self.livez.clone(),
        );
        self.register(
            "lb_last_sync_duration_seconds",
            "Duration of the last successful sync",
            self.last_sync_duration.clone(),
        );
        self.register(
            "lb_source_info",
            "Where the agent takes its objects from",
            self.source.clone(),
        );
        if let Some(g) = self.api_connected.clone() {
            self.register(
                "lb_api_connected",
                "Whether every watch on the API server is connected",
                g,
            );
        }
        self.register(
            "lb_map_entries",
            "Entries the desired state needs in a map (family: the address family of a map per family)",
            self.map_entries.clone(),
        );
        self.register(
            "lb_map_capacity",
            "Entries a map holds (family: the address family of a map per family)",
            self.map_capacity.clone(),
        );
        self.register(
            "lb_counter_read_errors_total",
            "Reads of the datapath's counters for /metrics that failed (the last values were served)",
            self.counter_read_errors.clone(),
        );
        self.register(
            "lb_datapath_packets_total",
            "Packets seen by the XDP datapath, by outcome",
            self.datapath_packets.clone(),
        );
        self.register(
            "lb_frontend_packets_total",
            "Packets translated for a frontend",
            self.frontend_packets.clone(),
        );
        self.register(
            "lb_frontend_bytes_total",
            "Bytes translated for a frontend",
            self.frontend_bytes.clone(),
        );
        self.register(
            "lb_frontend_new_flows_total",
            "New flows to a frontend",
            self.frontend_new_flows.clone(),
        );
        self.register(
            "lb_frontend_rejected_total",
            "Packets to a frontend without usable backends",
            self.frontend_rejected.clone(),
        );
        self.register(
            "lb_backend_packets_total",
            "Packets to and from a backend through the datapath",
            self.backend_packets.clone(),
        );
        self.register(
            "lb_backend_bytes_total",
            "Bytes to and from a backend through the datapath",
            self.backend_bytes.clone(),
        );
    }

    /// Everything, in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String fails only if a metric's own encoding does, which the metric
        // types here never do; what was written is served.
        if let Err(e) = prometheus_text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "encoding the metrics failed");
        }
        out
    }

    /// A successful sync that took `took`, finished `now`: nothing is pending any more.
    pub fn synced(&self, took: Duration, now: SystemTime) {
        self.sync_duration.observe(took.as_secs_f64());
        self.last_sync_duration.set(took.as_secs_f64());
        self.last_synced.set(epoch_seconds(now));
        self.endpoint_changes_pending.set(0);
        self.service_changes_pending.set(0);
    }

    /// A change arrived that the datapath does not have yet.
    pub fn queued(&self, now: SystemTime) {
        self.last_queued.set(epoch_seconds(now));
    }

    /// Changes received from the source: counted, and pending until the next sync.
    pub fn changes(&self, c: Changes) {
        self.endpoint_changes_total.inc_by(c.endpoints);
        self.service_changes_total.inc_by(c.services);
        self.endpoint_changes_pending
            .inc_by(i64::try_from(c.endpoints).unwrap_or(i64::MAX));
        self.service_changes_pending
            .inc_by(i64::try_from(c.services).unwrap_or(i64::MAX));
    }

    pub fn set_no_local_endpoints(&self, internal: usize, external: usize) {
        for (traffic_policy, n) in [("internal", internal), ("external", external)] {
            self.no_local_endpoints
                .get_or_create(&PolicyLabel { traffic_policy })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    pub fn set_api_connected(&self, connected: bool) {
        if let Some(g) = &self.api_connected {
            g.set(i64::from(connected));
        }
    }

    pub fn set_map_fill(&self, fill: &[MapFill]) {
        for f in fill {
            let label = MapLabel::of(f.map);
            let n = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
            self.map_entries.get_or_create(&label).set(n(f.entries));
            self.map_capacity.get_or_create(&label).set(n(f.capacity));
        }
    }

    /// A read of the datapath's counters failed; the last ones are served.
    pub fn counter_read_failed(&self) {
        self.counter_read_errors.inc();
    }

    /// The datapath's counters as just read: they are the kernel's running totals, so they
    /// are set, not added; frontends and backends that are gone go with them.
    pub fn set_datapath(&self, c: &DatapathCounters) {
        let set = |counter: &Counter, v: u64| counter.inner().store(v, Ordering::Relaxed);
        for (outcome, v) in &c.outcomes {
            set(
                &self
                    .datapath_packets
                    .get_or_create(&OutcomeLabel { outcome }),
                *v,
            );
        }
        let frontends = [
            &self.frontend_packets,
            &self.frontend_bytes,
            &self.frontend_new_flows,
            &self.frontend_rejected,
        ];
        for f in frontends {
            f.clear();
        }
        for fc in &c.frontends {
            let label = FrontendLabel {
                frontend: fc.frontend.clone(),
            };
            for (family, v) in
                frontends
                    .iter()
                    .zip([fc.packets, fc.bytes, fc.new_flows, fc.rejected])
            {
                set(&family.get_or_create(&label), v);
            }
        }
        self.backend_packets.clear();
        self.backend_bytes.clear();
        for (backend, packets, bytes) in &c.backends {
            let label = BackendLabel {
                backend: backend.clone(),
            };
            set(&self.backend_packets.get_or_create(&label), *packets);
            set(&self.backend_bytes.get_or_create(&label), *bytes);
        }
    }
}

fn epoch_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programming_buckets_are_kube_proxys() {
        let b = programming_buckets();
        assert_eq!(&b[..4], &[0.25, 0.5, 1.0, 2.0]);
        assert!(b.contains(&59.0) && b.contains(&60.0) && b.contains(&115.0) && !b.contains(&61.0));
        assert_eq!(b.last(), Some(&300.0));
        assert!(b.contains(&120.0) && b.contains(&270.0));
    }

    #[test]
    fn the_sync_histogram_is_cumulative_with_kube_proxys_buckets() {
        let m = Metrics::new("manifests", false);
        m.synced(Duration::from_millis(3), SystemTime::now());
        m.synced(Duration::from_millis(100), SystemTime::now());
        let text = m.render();
        for line in [
            "# HELP kubeproxy_sync_proxy_rules_duration_seconds SyncProxyRules latency in seconds\n",
            "# TYPE kubeproxy_sync_proxy_rules_duration_seconds histogram\n",
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.002\"} 0\n",
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.004\"} 1\n",
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.128\"} 2\n",
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"16.384\"} 2\n",
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"+Inf\"} 2\n",
            "kubeproxy_sync_proxy_rules_duration_seconds_count 2\n",
            "kubeproxy_network_programming_duration_seconds_bucket{le=\"1\"} 0\n",
        ] {
            assert!(text.contains(line), "{line:?} in:\n{text}");
        }
        assert!(text.contains("kubeproxy_sync_proxy_rules_last_timestamp_seconds "));
    }

    #[test]
    fn names_types_and_labels_as_served() {
        let m = Metrics::new("kubernetes", true);
        m.changes(Changes {
            services: 2,
            endpoints: 3,
        });
        m.healthz.get_or_create(&CodeLabel { code: 503 }).inc();
        m.set_no_local_endpoints(1, 2);
        m.set_datapath(&DatapathCounters {
            outcomes: vec![("xdp_tx", 7)],
            frontends: vec![FrontendCounters {
                frontend: "10.96.0.10:80/TCP".into(),
                packets: 5,
                bytes: 300,
                new_flows: 1,
                rejected: 0,
            }],
            backends: vec![("10.244.0.11:8080/TCP".into(), 4, 200)],
        });
        let text = m.render();
        for line in [
            "# TYPE kubeproxy_sync_proxy_rules_endpoint_changes_total counter\n",
            "kubeproxy_sync_proxy_rules_endpoint_changes_total 3\n",
            "# TYPE kubeproxy_sync_proxy_rules_endpoint_changes_pending gauge\n",
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending 3\n",
            "kubeproxy_sync_proxy_rules_service_changes_total 2\n",
            "kubeproxy_sync_proxy_rules_service_changes_pending 2\n",
            "# TYPE kubeproxy_proxy_healthz_total counter\n",
            "kubeproxy_proxy_healthz_total{code=\"503\"} 1\n",
            "# TYPE kubeproxy_sync_proxy_rules_no_local_endpoints_total gauge\n",
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy=\"external\"} 2\n",
            "lb_source_info{source=\"kubernetes\"} 1\n",
            "lb_api_connected 0\n",
            "# HELP lb_datapath_packets_total Packets seen by the XDP datapath, by outcome\n",
            "lb_datapath_packets_total{outcome=\"xdp_tx\"} 7\n",
            "lb_frontend_bytes_total{frontend=\"10.96.0.10:80/TCP\"} 300\n",
            "lb_backend_packets_total{backend=\"10.244.0.11:8080/TCP\"} 4\n",
        ] {
            assert!(text.contains(line), "{line:?} in:\n{text}");
        }
        // A sync programs what was pending; a frontend that is gone goes from the counters.
        m.synced(Duration::from_millis(1), SystemTime::now());
        m.set_datapath(&DatapathCounters {
            outcomes: vec![("xdp_tx", 9)],
            frontends: Vec::new(),
            backends: Vec::new(),
        });
        let text = m.render();
        assert!(text.contains("kubeproxy_sync_proxy_rules_endpoint_changes_pending 0\n"));
        assert!(text.contains("kubeproxy_sync_proxy_rules_endpoint_changes_total 3\n"));
        assert!(text.contains("lb_datapath_packets_total{outcome=\"xdp_tx\"} 9\n"));
        assert!(!text.contains("lb_frontend_bytes_total"), "{text}");
        assert!(!Metrics::new("manifests", false)
            .render()
            .contains("lb_api_connected"));
    }

    #[test]
    fn map_fill_is_labelled_by_family_where_a_map_is_per_family() {
        let m = Metrics::new("manifests", false);
        let fill = |map, entries, capacity| MapFill {
            map,
            entries,
            capacity,
        };
        m.set_map_fill(&[
            fill(lb_common::map_names::LB4_SERVICES, 3, 65_536),
            fill(lb_common::map_names::LB6_SERVICES, 2, 65_536),
            fill(lb_common::map_names::LB6_BACKENDS, 4, 65_536),
            fill(lb_common::map_names::LB_SLOTS, 9, 262_144),
        ]);
        let text = m.render();
        for line in [
            "lb_map_entries{map=\"LB4_SERVICES\",family=\"ipv4\"} 3\n",
            "lb_map_entries{map=\"LB6_SERVICES\",family=\"ipv6\"} 2\n",
            "lb_map_entries{map=\"LB6_BACKENDS\",family=\"ipv6\"} 4\n",
            "lb_map_capacity{map=\"LB6_SERVICES\",family=\"ipv6\"} 65536\n",
            // Shared by both families: no family label.
            "lb_map_entries{map=\"LB_SLOTS\"} 9\n",
        ] {
            assert!(text.contains(line), "{line:?} in:\n{text}");
        }
        assert_eq!(map_family("LB4_CONNTRACK"), Some("ipv4"));
        assert_eq!(map_family("LB6_CONNTRACK"), Some("ipv6"));
        assert_eq!(map_family("LB_MAGLEV"), None);
    }
}
