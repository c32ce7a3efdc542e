//! The agent's HTTP endpoints: kube-proxy's `/healthz` and `/livez` (port 10256 by default)
//! and Prometheus `/metrics` (port 10249 by default). A deliberately small HTTP/1.1 server:
//! one request per connection, GET only.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use crate::model::HealthCheck;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

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

/// What the endpoints report, updated by the agent loop.
pub struct Status {
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
    /// (map, entries, capacity) as of the last desired state.
    pub map_fill: Vec<(&'static str, usize, usize)>,
    /// Service id → (frontend, `namespace/name:port`), for `lb-agent flows` and operators.
    pub frontends: BTreeMap<u32, (String, String)>,
    /// Global datapath counters, refreshed before each scrape by the agent.
    pub datapath_counters: Vec<(&'static str, u64)>,
    /// Per-frontend datapath counters, refreshed before each scrape by the agent.
    pub frontend_counters: Vec<FrontendCounters>,
    /// Per-backend datapath counters (address, packets, bytes), refreshed likewise.
    pub backend_counters: Vec<(String, u64, u64)>,
}

impl Default for Status {
    fn default() -> Self {
        Status {
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
        }
    }
}

impl Status {
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

    fn healthy(&self) -> bool {
        self.last_synced.is_some() && !self.failing
    }

    fn metrics(&self) -> String {
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
        for (m, n, _) in &self.map_fill {
            out.push_str(&format!("lb_map_entries{{map=\"{m}\"}} {n}\n"));
        }
        out.push_str("# HELP lb_map_capacity Entries a map holds\n# TYPE lb_map_capacity gauge\n");
        for (m, _, cap) in &self.map_fill {
            out.push_str(&format!("lb_map_capacity{{map=\"{m}\"}} {cap}\n"));
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

pub type SharedStatus = Arc<Mutex<Status>>;

fn rfc3339(t: SystemTime) -> String {
    jiff::Timestamp::try_from(t)
        .map(|ts| ts.to_string())
        .unwrap_or_default()
}

/// kube-proxy's /healthz and /livez body (`pkg/proxy/healthcheck/proxy_health.go`).
fn health_response(status: &Status, with_node: bool) -> (u16, String) {
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

/// Reads a request's head (up to the blank line, at most 8 KiB, within 5 s). Reading it whole
/// matters: closing a socket with unread bytes makes the kernel answer with a reset, which
/// the client sees instead of the response.
async fn read_head(sock: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout_at(deadline, sock.read(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 || head.len() + n > 8192 {
            return None;
        }
        head.extend_from_slice(&buf[..n]);
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

async fn handle(mut sock: TcpStream, status: SharedStatus, refresh: Arc<dyn Fn() + Send + Sync>) {
    let Some(req) = read_head(&mut sock).await else {
        return;
    };
    let path = req
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("/")
        .split('?')
        .next()
        .unwrap_or("/")
        .to_owned();
    if path == "/metrics" {
        refresh();
    }
    let (code, ctype, body) = {
        let s = match status.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        match path.as_str() {
            "/healthz" => {
                let (c, b) = health_response(&s, true);
                (c, "application/json", b)
            }
            "/livez" => {
                let (c, b) = health_response(&s, false);
                (c, "application/json", b)
            }
            "/metrics" => (200, "text/plain; version=0.0.4", s.metrics()),
            "/debug/frontends" => {
                let list: Vec<serde_json::Value> = s
                    .frontends
                    .iter()
                    .map(|(id, (fe, svc))| serde_json::json!({"id": id, "frontend": fe, "service": svc}))
                    .collect();
                (
                    200,
                    "application/json",
                    serde_json::Value::from(list).to_string(),
                )
            }
            _ => (404, "text/plain", "404 page not found\n".to_owned()),
        }
    };
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        _ => "Service Unavailable",
    };
    let resp = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nX-Content-Type-Options: nosniff\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = sock.write_all(resp.as_bytes()).await;
    let _ = sock.shutdown().await;
}

/// Serves on `listener` until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    status: SharedStatus,
    refresh: Arc<dyn Fn() + Send + Sync>,
) {
    loop {
        match listener.accept().await {
            Ok((sock, _)) => {
                tokio::spawn(handle(sock, status.clone(), refresh.clone()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// kube-proxy's health check response body (`service_health.go`), tab-indented as it is.
fn health_check_body(hc: &HealthCheck, healthy: bool) -> String {
    format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\"localEndpoints\": {},\n\t\"serviceProxyHealthy\": {}\n}}",
        serde_json::Value::from(hc.namespace.as_str()),
        serde_json::Value::from(hc.name.as_str()),
        hc.local_endpoints,
        healthy
    )
}

async fn answer_health_check(
    mut sock: TcpStream,
    state: Arc<Mutex<HealthCheck>>,
    status: SharedStatus,
) {
    if read_head(&mut sock).await.is_none() {
        return;
    }
    let hc = match state.lock() {
        Ok(s) => s.clone(),
        Err(p) => p.into_inner().clone(),
    };
    let healthy = match status.lock() {
        Ok(s) => s.healthy(),
        Err(p) => p.into_inner().healthy(),
    };
    let ok = hc.local_endpoints != 0 && healthy;
    let body = health_check_body(&hc, healthy);
    let resp = format!(
        "HTTP/1.1 {}\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\nX-Load-Balancing-Endpoint-Weight: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        if ok { "200 OK" } else { "503 Service Unavailable" },
        hc.local_endpoints,
        body.len()
    );
    let _ = sock.write_all(resp.as_bytes()).await;
    let _ = sock.shutdown().await;
}

/// The servers on healthCheckNodePorts, one per port, kept in step with the desired state.
#[derive(Default)]
pub struct HealthChecks {
    servers: BTreeMap<u16, (tokio::task::JoinHandle<()>, Arc<Mutex<HealthCheck>>)>,
}

impl HealthChecks {
    /// Starts, updates and stops servers so that exactly `wanted` are served.
    pub fn sync(&mut self, wanted: &BTreeMap<u16, HealthCheck>, status: &SharedStatus) {
        self.servers.retain(|port, (task, _)| {
            let keep = wanted.contains_key(port);
            if !keep {
                task.abort();
                tracing::info!(port, "health check server stopped");
            }
            keep
        });
        for (port, hc) in wanted {
            if let Some((_, state)) = self.servers.get(port) {
                if let Ok(mut s) = state.lock() {
                    *s = hc.clone();
                }
                continue;
            }
            let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, *port));
            let listener = match std::net::TcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .and_then(TcpListener::from_std)
            {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(port, service = %format!("{}/{}", hc.namespace, hc.name), error = %e, "cannot serve the health check node port");
                    continue;
                }
            };
            let state = Arc::new(Mutex::new(hc.clone()));
            let (st, status) = (state.clone(), status.clone());
            let task = tokio::spawn(async move {
                loop {
                    if let Ok((sock, _)) = listener.accept().await {
                        tokio::spawn(answer_health_check(sock, st.clone(), status.clone()));
                    }
                }
            });
            tracing::info!(port, service = %format!("{}/{}", hc.namespace, hc.name), "health check server started");
            self.servers.insert(*port, (task, state));
        }
    }
}

/// A GET to one of the agent's own endpoints (for the CLI commands); the body, or None when
/// the agent does not answer.
pub fn get(addr: SocketAddr, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    // Written in pieces on purpose: the server must read a request whatever its segments.
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: lb-agent\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthz_follows_sync_state() {
        let mut s = Status::default();
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
    fn health_check_body_is_kube_proxys() {
        let hc = HealthCheck {
            namespace: "shop".into(),
            name: "web".into(),
            local_endpoints: 2,
        };
        assert_eq!(
            health_check_body(&hc, true),
            "{\n\t\"service\": {\n\t\t\"namespace\": \"shop\",\n\t\t\"name\": \"web\"\n\t},\n\t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
        );
        let v: serde_json::Value =
            serde_json::from_str(&health_check_body(&hc, false)).expect("json");
        assert_eq!(v["serviceProxyHealthy"], false);
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
        let mut s = Status::default();
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
