//! The agent's HTTP endpoints: kube-proxy's `/healthz` and `/livez` (port 10256 by default)
//! and Prometheus `/metrics` (port 10249 by default). A deliberately small HTTP/1.1 server:
//! one request per connection, GET only.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

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

/// What the endpoints report, updated by the agent loop.
#[derive(Default)]
pub struct Status {
    /// When the datapath last matched the desired state.
    pub last_synced: Option<SystemTime>,
    /// The last sync attempt failed: the datapath may lag.
    pub failing: bool,
    sync_buckets: [u64; 15],
    sync_count: u64,
    sync_sum: f64,
    /// Global datapath counters, refreshed before each scrape by the agent.
    pub datapath_counters: Vec<(&'static str, u64)>,
}

impl Status {
    pub fn record_sync(&mut self, took: Duration) {
        let s = took.as_secs_f64();
        for (i, b) in SYNC_BUCKETS.iter().enumerate() {
            if s <= *b {
                self.sync_buckets[i] += 1;
            }
        }
        self.sync_count += 1;
        self.sync_sum += s;
        self.last_synced = Some(SystemTime::now());
        self.failing = false;
    }

    fn healthy(&self) -> bool {
        self.last_synced.is_some() && !self.failing
    }

    fn metrics(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP kubeproxy_sync_proxy_rules_duration_seconds SyncProxyRules latency in seconds\n");
        out.push_str("# TYPE kubeproxy_sync_proxy_rules_duration_seconds histogram\n");
        for (i, b) in SYNC_BUCKETS.iter().enumerate() {
            out.push_str(&format!(
                "kubeproxy_sync_proxy_rules_duration_seconds_bucket{{le=\"{b}\"}} {}\n",
                self.sync_buckets[i]
            ));
        }
        out.push_str(&format!(
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{{le=\"+Inf\"}} {}\n",
            self.sync_count
        ));
        out.push_str(&format!(
            "kubeproxy_sync_proxy_rules_duration_seconds_sum {}\n",
            self.sync_sum
        ));
        out.push_str(&format!(
            "kubeproxy_sync_proxy_rules_duration_seconds_count {}\n",
            self.sync_count
        ));
        if let Some(t) = self.last_synced {
            let secs = t
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64();
            out.push_str("# HELP kubeproxy_sync_proxy_rules_last_timestamp_seconds The last time proxy rules were successfully synced\n");
            out.push_str("# TYPE kubeproxy_sync_proxy_rules_last_timestamp_seconds gauge\n");
            out.push_str(&format!(
                "kubeproxy_sync_proxy_rules_last_timestamp_seconds {secs}\n"
            ));
        }
        out.push_str(
            "# HELP lb_datapath_packets_total Packets seen by the XDP datapath, by outcome\n",
        );
        out.push_str("# TYPE lb_datapath_packets_total counter\n");
        for (name, v) in &self.datapath_counters {
            out.push_str(&format!(
                "lb_datapath_packets_total{{outcome=\"{name}\"}} {v}\n"
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

async fn handle(mut sock: TcpStream, status: SharedStatus, refresh: Arc<dyn Fn() + Send + Sync>) {
    let mut buf = [0u8; 2048];
    let n = match tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf)).await {
        Ok(Ok(n)) => n,
        _ => return,
    };
    let req = String::from_utf8_lossy(&buf[..n]);
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
