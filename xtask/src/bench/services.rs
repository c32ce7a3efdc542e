//! The generated Services every datapath is measured with: `n` Services of 4 endpoints each
//! (namespace `bench`, names `svc-0..`), every tenth one counted from the last also a
//! NodePort, and the same Services as Kubernetes objects for lb-agent.

use std::net::Ipv4Addr;

use anyhow::Result;
use lb_control::source::Objects;
use serde_json::{json, Value};

pub const NAMESPACE: &str = "bench";

/// One ServicePort (TCP) of a generated Service and its endpoints.
#[derive(Debug, Clone)]
pub struct Svc {
    pub name: String,
    /// The ServicePort's name.
    pub port_name: String,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub target_port: u16,
    pub node_port: Option<u16>,
    pub endpoints: Vec<Ipv4Addr>,
}

impl Svc {
    /// kube-proxy's name of the service port: `namespace/name:port-name`.
    pub fn port_name(&self) -> String {
        format!("{NAMESPACE}/{}:{}", self.name, self.port_name)
    }
}

/// ClusterIP of the `i`th generated Service (10.96.0.0/12, as kubeadm's default).
pub fn service_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 96 + (i >> 16) as u8, (i >> 8) as u8, i as u8)
}

/// `n` Services, `svc-0` first; `endpoint(i, e)` is the `e`th endpoint (of 4) of Service `i`.
/// Every tenth Service counted back from the last one is also a NodePort (30000, 30001, ...):
/// the last-created Service, the one the traffic addresses, is always one.
pub fn generate(
    n: usize,
    target_port: u16,
    endpoint: impl Fn(usize, usize) -> Ipv4Addr,
) -> Vec<Svc> {
    (0..n)
        .map(|i| {
            let back = n - 1 - i;
            Svc {
                name: format!("svc-{i}"),
                port_name: "http".into(),
                cluster_ip: service_ip(i),
                port: 80,
                target_port,
                node_port: (back.is_multiple_of(10) && back / 10 < 2000)
                    .then(|| 30000 + (back / 10) as u16),
                endpoints: (0..4).map(|e| endpoint(i, e)).collect(),
            }
        })
        .collect()
}

/// The Service and its EndpointSlice as the API server would hand them over.
pub fn documents(s: &Svc) -> [Value; 2] {
    let mut port = json!({"name": s.port_name, "port": s.port, "targetPort": s.target_port, "protocol": "TCP"});
    let mut spec = json!({"clusterIP": s.cluster_ip.to_string(), "type": "ClusterIP"});
    if let Some(np) = s.node_port {
        port["nodePort"] = json!(np);
        spec["type"] = json!("NodePort");
    }
    spec["ports"] = json!([port]);
    let eps: Vec<Value> = s
        .endpoints
        .iter()
        .map(|ip| json!({"addresses": [ip.to_string()], "conditions": {"ready": true}, "nodeName": lb_testkit::lab::NODE_NAME}))
        .collect();
    [
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": s.name, "namespace": NAMESPACE},
            "spec": spec,
        }),
        json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{}-abc", s.name), "namespace": NAMESPACE,
                         "labels": {"kubernetes.io/service-name": s.name}},
            "addressType": "IPv4",
            "ports": [{"name": s.port_name, "port": s.target_port, "protocol": "TCP"}],
            "endpoints": eps,
        }),
    ]
}

/// The Services as one multi-document manifest (JSON documents are YAML too).
pub fn manifest(services: &[Svc]) -> Result<String> {
    let mut out = String::new();
    for s in services {
        for d in documents(s) {
            out.push_str("---\n");
            out.push_str(&serde_json::to_string(&d)?);
            out.push('\n');
        }
    }
    Ok(out)
}

/// The Services as the agent's in-memory objects.
pub fn objects(services: &[Svc]) -> Result<Objects> {
    let mut o = Objects::default();
    for s in services {
        let [svc, slice] = documents(s);
        o.services.push(serde_json::from_value(svc)?);
        o.slices.push(serde_json::from_value(slice)?);
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape() {
        let s = generate(25, 8080, |i, e| Ipv4Addr::new(10, 244, i as u8, e as u8));
        assert_eq!(s.len(), 25);
        assert_eq!(s[24].node_port, Some(30000));
        assert_eq!(s[14].node_port, Some(30001));
        assert_eq!(s[4].node_port, Some(30002));
        assert_eq!(s.iter().filter(|s| s.node_port.is_some()).count(), 3);
        assert_eq!(s[3].endpoints[2], Ipv4Addr::new(10, 244, 3, 2));
        assert_eq!(s[3].port_name(), "bench/svc-3:http");
        assert_eq!(service_ip(9999), Ipv4Addr::new(10, 96, 39, 15));
        // NodePorts stay inside the default range (30000-32767) at any size.
        let big = generate(100_000, 8080, |_, _| Ipv4Addr::LOCALHOST);
        assert!(big.iter().filter_map(|s| s.node_port).all(|p| p < 32768));
        let o = objects(&s).expect("objects");
        assert_eq!((o.services.len(), o.slices.len()), (25, 25));
        let m = manifest(&s[24..]).expect("manifest");
        assert_eq!(m.matches("---\n").count(), 2);
        assert!(m.contains("\"nodePort\":30000"), "{m}");
    }
}
