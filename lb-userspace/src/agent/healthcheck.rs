//! kube-proxy's health check node ports: one HTTP server per `healthCheckNodePort` of a
//! LoadBalancer Service with `externalTrafficPolicy: Local`, answering how many of its
//! endpoints are on this node, so that cloud load balancers send only to nodes that have one.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
};

use hyper::header::HeaderValue;
use lb_control::model::HealthCheck;
use tokio::net::TcpListener;

use super::{
    http::{self, response, Body},
    state::SharedState,
};

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

/// kube-proxy's answer on a health check node port, whatever the path: 200 when the Service
/// has endpoints on this node and the agent is healthy, else 503; the count of local
/// endpoints in `X-Load-Balancing-Endpoint-Weight`.
fn answer_health_check(hc: &HealthCheck, healthy: bool) -> hyper::Response<Body> {
    let ok = hc.local_endpoints != 0 && healthy;
    let mut r = response(
        if ok { 200 } else { 503 },
        "application/json",
        health_check_body(hc, healthy),
    );
    r.headers_mut().insert(
        "X-Load-Balancing-Endpoint-Weight",
        HeaderValue::from(hc.local_endpoints),
    );
    r
}

/// The servers on healthCheckNodePorts, one per port, kept in step with the desired state.
#[derive(Default)]
pub struct HealthChecks {
    servers: BTreeMap<u16, (tokio::task::JoinHandle<()>, Arc<Mutex<HealthCheck>>)>,
}

impl HealthChecks {
    /// Starts, updates and stops servers so that exactly `wanted` are served.
    pub fn sync(&mut self, wanted: &BTreeMap<u16, HealthCheck>, status: &SharedState) {
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
                *state
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = hc.clone();
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
            let task = tokio::spawn(http::serve(listener, move |req| {
                // Any method and path, as kube-proxy's health check servers answer.
                drop(req);
                // The health check is a plain value written whole: a poisoned lock still
                // holds a complete one.
                let hc = st
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone();
                let healthy = status.lock().healthy(std::time::Instant::now());
                std::future::ready(answer_health_check(&hc, healthy))
            }));
            tracing::info!(port, service = %format!("{}/{}", hc.namespace, hc.name), "health check server started");
            self.servers.insert(*port, (task, state));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
