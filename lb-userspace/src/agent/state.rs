//! The agent's state as its HTTP endpoints report it: kube-proxy's health (`/healthz`,
//! `/livez`) and metrics, the datapath's counters, and the names of the programmed frontends.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, SystemTime},
};

use lb_control::reconcile::MapFill;
use serde::{Deserialize, Serialize};

/// Buckets of `kubeproxy_sync_proxy_rules_duration_seconds`: exponential, 1 ms × 2, 15 of them
/// (kube-proxy `pkg/proxy/metrics/metrics.go`).
const SYNC_BUCKETS: [f64; 15] = [
    0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048, 4.096,
    8.192, 16.384,
];

/// Buckets of `kubeproxy_network_programming_duration_seconds` (kube-proxy metrics.go):
/// 0.25, 0.5, 1..59 by 1, 60..115 by 5, 120..300 by 30.
fn programming_buckets() -> Vec<f64> {
    let mut b = vec![0.25, 0.5];
    b.extend((1..60).map(f64::from));
    b.extend((60..120).step_by(5).map(f64::from));
    b.extend((120..=300).step_by(30).map(f64::from));
    b
}

/// A Prometheus histogram.
struct Histogram {
    bounds: Vec<f64>,
    counts: Vec<u64>,
    count: u64,
    sum: f64,
}

impl Histogram {
    fn new(bounds: Vec<f64>) -> Self {
        let counts = vec![0; bounds.len()];
        Histogram {
            bounds,
            counts,
            count: 0,
            sum: 0.0,
        }
    }

    fn observe(&mut self, v: f64) {
        for (i, b) in self.bounds.iter().enumerate() {
            if v <= *b {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum += v;
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} histogram\n"));
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            out.push_str(&format!("{name}_bucket{{le=\"{b}\"}} {c}\n"));
        }
        out.push_str(&format!("{name}_bucket{{le=\"+Inf\"}} {}\n", self.count));
        out.push_str(&format!(
            "{name}_sum {}\n{name}_count {}\n",
            self.sum, self.count
        ));
    }
}

/// One frontend's datapath counters, for /metrics.
pub struct FrontendCounters {
    pub frontend: String,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub rejected: u64,
}

/// The agent's state as its endpoints report it (`/healthz`, `/metrics`, health check node
/// ports), updated by the agent's loop.
pub struct AgentState {
    /// When the datapath last matched the desired state.
    pub last_synced: Option<SystemTime>,
    /// The last sync attempt failed: the datapath may lag.
    pub failing: bool,
    sync: Histogram,
    programming: Histogram,
    /// When a change last arrived that the datapath did not have yet.
    pub last_queued: Option<SystemTime>,
    /// Services with a Local policy and no local endpoint: (internal, external).
    pub no_local_endpoints: (usize, usize),
    /// Duration of the last successful sync.
    pub last_sync_duration: Option<Duration>,
    /// Where objects come from ("manifests" or "kubernetes") and, for the API, whether every
    /// watch is connected.
    pub source: &'static str,
    pub api_connected: Option<bool>,
    /// How full the maps are, as of the last programmed state.
    pub map_fill: Vec<MapFill>,
    /// Every programmed frontend entry by service id, for `lb-agent flows` and operators.
    pub frontends: BTreeMap<u32, FrontendName>,
    /// Global datapath counters, refreshed before each scrape by the agent.
    pub datapath_counters: Vec<(&'static str, u64)>,
    /// Per-frontend datapath counters, refreshed before each scrape by the agent.
    pub frontend_counters: Vec<FrontendCounters>,
    /// Per-backend datapath counters (address, packets, bytes), refreshed likewise.
    pub backend_counters: Vec<(String, u64, u64)>,
    /// Refreshes of the counters above that failed to read the maps (the last values stay).
    pub counter_read_errors: u64,
}

impl Default for AgentState {
    fn default() -> Self {
        AgentState {
            last_synced: None,
            failing: false,
            sync: Histogram::new(SYNC_BUCKETS.to_vec()),
            programming: Histogram::new(programming_buckets()),
            last_queued: None,
            no_local_endpoints: (0, 0),
            last_sync_duration: None,
            source: "",
            api_connected: None,
            map_fill: Vec::new(),
            frontends: BTreeMap::new(),
            datapath_counters: Vec::new(),
            frontend_counters: Vec::new(),
            backend_counters: Vec::new(),
            counter_read_errors: 0,
        }
    }
}

impl AgentState {
    pub fn record_sync(&mut self, took: Duration) {
        self.sync.observe(took.as_secs_f64());
        self.last_sync_duration = Some(took);
        self.last_synced = Some(SystemTime::now());
        self.failing = false;
    }

    /// An EndpointSlice change (its trigger time) has reached the datapath after `took`.
    pub fn record_programming(&mut self, took: Duration) {
        self.programming.observe(took.as_secs_f64());
    }

    pub fn healthy(&self) -> bool {
        self.last_synced.is_some() && !self.failing
    }

    pub fn metrics(&self) -> String {
        let mut out = String::new();
        self.sync.render(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            &mut out,
        );
        self.programming.render(
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            &mut out,
        );
        let secs = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64()
        };
        if let Some(t) = self.last_synced {
            out.push_str("# HELP kubeproxy_sync_proxy_rules_last_timestamp_seconds The last time proxy rules were successfully synced\n");
            out.push_str("# TYPE kubeproxy_sync_proxy_rules_last_timestamp_seconds gauge\n");
            out.push_str(&format!(
                "kubeproxy_sync_proxy_rules_last_timestamp_seconds {}\n",
                secs(t)
            ));
        }
        if let Some(t) = self.last_queued {
            out.push_str("# HELP kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds The last time a sync of proxy rules was queued\n");
            out.push_str("# TYPE kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds gauge\n");
            out.push_str(&format!(
                "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds {}\n",
                secs(t)
            ));
        }
        if let Some(d) = self.last_sync_duration {
            out.push_str("# HELP lb_last_sync_duration_seconds Duration of the last successful sync\n# TYPE lb_last_sync_duration_seconds gauge\n");
            out.push_str(&format!(
                "lb_last_sync_duration_seconds {}\n",
                d.as_secs_f64()
            ));
        }
        out.push_str("# HELP lb_source_info Where the agent takes its objects from\n# TYPE lb_source_info gauge\n");
        out.push_str(&format!("lb_source_info{{source=\"{}\"}} 1\n", self.source));
        if let Some(c) = self.api_connected {
            out.push_str("# HELP lb_api_connected Whether every watch on the API server is connected\n# TYPE lb_api_connected gauge\n");
            out.push_str(&format!("lb_api_connected {}\n", u8::from(c)));
        }
        out.push_str("# HELP lb_map_entries Entries the desired state needs in a map\n# TYPE lb_map_entries gauge\n");
        for f in &self.map_fill {
            out.push_str(&format!(
                "lb_map_entries{{map=\"{}\"}} {}\n",
                f.map, f.entries
            ));
        }
        out.push_str("# HELP lb_map_capacity Entries a map holds\n# TYPE lb_map_capacity gauge\n");
        for f in &self.map_fill {
            out.push_str(&format!(
                "lb_map_capacity{{map=\"{}\"}} {}\n",
                f.map, f.capacity
            ));
        }
        out.push_str("# HELP kubeproxy_sync_proxy_rules_no_local_endpoints_total Number of services with a Local traffic policy and no endpoints\n");
        out.push_str("# TYPE kubeproxy_sync_proxy_rules_no_local_endpoints_total gauge\n");
        out.push_str(&format!(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{{traffic_policy=\"internal\"}} {}\n",
            self.no_local_endpoints.0
        ));
        out.push_str(&format!(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{{traffic_policy=\"external\"}} {}\n",
            self.no_local_endpoints.1
        ));
        out.push_str("# HELP lb_counter_read_errors_total Reads of the datapath's counters for /metrics that failed (the last values were served)\n# TYPE lb_counter_read_errors_total counter\n");
        out.push_str(&format!(
            "lb_counter_read_errors_total {}\n",
            self.counter_read_errors
        ));
        out.push_str(
            "# HELP lb_datapath_packets_total Packets seen by the XDP datapath, by outcome\n",
        );
        out.push_str("# TYPE lb_datapath_packets_total counter\n");
        for (name, v) in &self.datapath_counters {
            out.push_str(&format!(
                "lb_datapath_packets_total{{outcome=\"{name}\"}} {v}\n"
            ));
        }
        for (metric, help, get) in [
            (
                "lb_frontend_packets_total",
                "Packets translated for a frontend",
                (|c: &FrontendCounters| c.packets) as fn(&FrontendCounters) -> u64,
            ),
            (
                "lb_frontend_bytes_total",
                "Bytes translated for a frontend",
                |c| c.bytes,
            ),
            (
                "lb_frontend_new_flows_total",
                "New flows to a frontend",
                |c| c.new_flows,
            ),
            (
                "lb_frontend_rejected_total",
                "Packets to a frontend without usable backends",
                |c| c.rejected,
            ),
        ] {
            out.push_str(&format!(
                "# HELP {metric} {help}\n# TYPE {metric} counter\n"
            ));
            for c in &self.frontend_counters {
                out.push_str(&format!(
                    "{metric}{{frontend=\"{}\"}} {}\n",
                    c.frontend,
                    get(c)
                ));
            }
        }
        out.push_str("# HELP lb_backend_packets_total Packets to and from a backend through the datapath\n# TYPE lb_backend_packets_total counter\n");
        for (b, p, _) in &self.backend_counters {
            out.push_str(&format!(
                "lb_backend_packets_total{{backend=\"{b}\"}} {p}\n"
            ));
        }
        out.push_str("# HELP lb_backend_bytes_total Bytes to and from a backend through the datapath\n# TYPE lb_backend_bytes_total counter\n");
        for (b, _, bytes) in &self.backend_counters {
            out.push_str(&format!(
                "lb_backend_bytes_total{{backend=\"{b}\"}} {bytes}\n"
            ));
        }
        out
    }
}

/// One programmed frontend entry, as `/debug/frontends` lists it (and `lb-agent flows`
/// reads it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrontendName {
    /// The entry's service id (which flow events carry).
    pub id: u32,
    /// `address:port/protocol`.
    pub frontend: String,
    /// `namespace/name:port`.
    pub service: String,
}

/// The agent's state, shared by its loop and its HTTP servers.
#[derive(Clone, Default)]
pub struct SharedState(Arc<Mutex<AgentState>>);

impl SharedState {
    /// The state, locked. A lock poisoned by a thread that panicked while holding it is taken
    /// over (the state holds only reports, each field written whole) and said so.
    pub fn lock(&self) -> MutexGuard<'_, AgentState> {
        self.0.lock().unwrap_or_else(|poisoned| {
            tracing::error!(
                "the agent state's lock was poisoned (a thread panicked holding it); carrying on \
                 with the state as it was left"
            );
            poisoned.into_inner()
        })
    }
}

fn rfc3339(t: SystemTime) -> String {
    jiff::Timestamp::try_from(t)
        .map(|ts| ts.to_string())
        .unwrap_or_default()
}

/// kube-proxy's /healthz and /livez body (`pkg/proxy/healthcheck/proxy_health.go`).
pub fn health_response(status: &AgentState, with_node: bool) -> (u16, String) {
    let code = if status.healthy() { 200 } else { 503 };
    let last = status.last_synced.map(rfc3339).unwrap_or_default();
    let now = rfc3339(SystemTime::now());
    let body = if with_node {
        serde_json::json!({"lastUpdated": last, "currentTime": now, "nodeEligible": true})
    } else {
        serde_json::json!({"lastUpdated": last, "currentTime": now})
    };
    (code, body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthz_follows_sync_state() {
        let mut s = AgentState::default();
        let (code, body) = health_response(&s, true);
        assert_eq!(code, 503);
        assert!(body.contains("\"nodeEligible\":true"), "{body}");
        s.record_sync(Duration::from_millis(3));
        let (code, body) = health_response(&s, true);
        assert_eq!(code, 200);
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert!(
            v["lastUpdated"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{body}"
        );
        s.failing = true;
        assert_eq!(health_response(&s, false).0, 503);
    }

    #[test]
    fn programming_buckets_are_kube_proxys() {
        let b = programming_buckets();
        assert_eq!(&b[..4], &[0.25, 0.5, 1.0, 2.0]);
        assert!(b.contains(&59.0) && b.contains(&60.0) && b.contains(&115.0) && !b.contains(&61.0));
        assert_eq!(b.last(), Some(&300.0));
        assert!(b.contains(&120.0) && b.contains(&270.0));
    }

    #[test]
    fn sync_histogram_is_cumulative() {
        let mut s = AgentState::default();
        s.record_sync(Duration::from_millis(3));
        s.record_sync(Duration::from_millis(100));
        let m = s.metrics();
        assert!(m.contains("kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.002\"} 0\n"));
        assert!(m.contains("kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.004\"} 1\n"));
        assert!(m.contains("kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.128\"} 2\n"));
        assert!(m.contains("kubeproxy_sync_proxy_rules_duration_seconds_count 2\n"));
        assert!(m.contains("kubeproxy_sync_proxy_rules_last_timestamp_seconds "));
    }
}
