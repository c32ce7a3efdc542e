//! kube-proxy's health check node ports: one HTTP server per `healthCheckNodePort` of a
//! LoadBalancer Service with `externalTrafficPolicy: Local`, answering how many of its
//! endpoints are on this node, so that cloud load balancers send only to nodes that have one.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6},
    os::fd::{AsRawFd, OwnedFd},
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
    servers: BTreeMap<u16, Server>,
}

/// One port's server: a task per listener (one per family), and what it reports.
type Server = (Vec<tokio::task::JoinHandle<()>>, Arc<Mutex<HealthCheck>>);

/// The listeners of one health check node port, as kube-proxy serves it on both families:
/// 0.0.0.0 and, where the node has IPv6, [::] (IPv6 only, so that the two do not collide
/// whatever `net.ipv6.bindv6only` says).
fn listeners(port: u16) -> std::io::Result<Vec<TcpListener>> {
    let v4 = std::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))?;
    let mut out = vec![v4];
    match bind_v6_only(port) {
        Ok(l) => out.push(l),
        // No IPv6 on this node (disabled in the kernel): IPv4 alone.
        Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {}
        Err(e) => return Err(e),
    }
    out.into_iter()
        .map(|l| {
            l.set_nonblocking(true)?;
            TcpListener::from_std(l)
        })
        .collect()
}

/// A listener on [::]:`port` that takes IPv6 connections only.
fn bind_v6_only(port: u16) -> std::io::Result<std::net::TcpListener> {
    use nix::sys::socket::{
        bind, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType,
        SockaddrIn6,
    };
    let fd: OwnedFd = socket(
        AddressFamily::Inet6,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
    let addr = SockaddrIn6::from(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0));
    bind(fd.as_raw_fd(), &addr)?;
    listen(&fd, Backlog::new(128)?)?;
    Ok(std::net::TcpListener::from(fd))
}

impl HealthChecks {
    /// Starts, updates and stops servers so that exactly `wanted` are served.
    pub fn sync(&mut self, wanted: &BTreeMap<u16, HealthCheck>, status: &SharedState) {
        self.servers.retain(|port, (tasks, _)| {
            let keep = wanted.contains_key(port);
            if !keep {
                tasks.iter().for_each(tokio::task::JoinHandle::abort);
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
            let listeners = match listeners(*port) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(port, service = %format!("{}/{}", hc.namespace, hc.name), error = %e, "cannot serve the health check node port");
                    continue;
                }
            };
            let state = Arc::new(Mutex::new(hc.clone()));
            let tasks = listeners
                .into_iter()
                .map(|listener| {
                    let (st, status) = (state.clone(), status.clone());
                    tokio::spawn(http::serve(listener, move |req| {
                        // Any method and path, as kube-proxy's health check servers answer.
                        drop(req);
                        // The health check is a plain value written whole: a poisoned lock
                        // still holds a complete one.
                        let hc = st
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .clone();
                        let healthy = status.lock().healthy(std::time::Instant::now());
                        std::future::ready(answer_health_check(&hc, healthy))
                    }))
                })
                .collect();
            tracing::info!(port, service = %format!("{}/{}", hc.namespace, hc.name), "health check server started");
            self.servers.insert(*port, (tasks, state));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_health_check_node_port_is_served_on_both_families() {
        let port = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let ls = listeners(port).expect("listeners");
        let local: Vec<SocketAddr> = ls
            .iter()
            .map(|l| l.local_addr().expect("address"))
            .collect();
        // A host without IPv6 (a container with it disabled) has no ::1 to connect to: the
        // IPv4 side alone is checked there.
        let has_ipv6 = std::net::TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).is_ok();
        if has_ipv6 {
            assert_eq!(
                local,
                vec![
                    SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
                    SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)),
                ]
            );
        } else {
            assert_eq!(local[0], SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)));
        }
        for (l, to) in ls.iter().zip([
            SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            SocketAddr::from((Ipv6Addr::LOCALHOST, port)),
        ]) {
            if to.is_ipv6() && !has_ipv6 {
                break;
            }
            let client = tokio::net::TcpStream::connect(to).await.expect("connects");
            let (_, peer) = l.accept().await.expect("accepts");
            assert_eq!(peer, client.local_addr().expect("address"), "{to}");
        }
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
}
