//! Kubernetes objects → the desired datapath state of one node, with kube-proxy's semantics
//! (`docs/architecture.md` names the kube-proxy sources each rule follows):
//!
//! * Services labelled `service.kubernetes.io/service-proxy-name` or
//!   `service.kubernetes.io/headless`, headless Services and ExternalName Services are skipped.
//! * Endpoints come from the EndpointSlices labelled `kubernetes.io/service-name`; their ports
//!   are matched to Service ports by name (kube-proxy `endpointslicecache.go`). A Service with a
//!   selector and no EndpointSlice gets endpoints from the Pods it selects, as the EndpointSlice
//!   controller would derive them (named target ports resolved from container ports).
//! * Conditions: `ready` nil ⇒ true, `serving` nil ⇒ true, `terminating` nil ⇒ false. Ready
//!   endpoints are used; only when none is ready, the serving and terminating ones
//!   (kube-proxy `topology.go` `CategorizeEndpoints`).
//! * `internalTrafficPolicy: Local` (ClusterIP) and `externalTrafficPolicy: Local` (NodePort,
//!   externalIPs, load-balancer IPs) use this node's endpoints only; with none here but some
//!   elsewhere the traffic is dropped, with none anywhere it is rejected.
//! * Topology hints narrow the Cluster set, all or nothing per Service port and node:
//!   same-node hints first, then same-zone hints (`topologyModeFromHints`).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
};

use k8s_openapi::{
    api::{
        core::v1::{Pod, Service, ServicePort},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};

use super::model::{
    Backend, Desired, FrontendKind, FrontendState, HealthCheck, L4Addr, Proto, ServicePortName,
};
use crate::source::{namespace, Objects, ServiceKey, LABEL_HEADLESS, LABEL_SERVICE_PROXY_NAME};

/// What translation needs to know about the node it runs for.
#[derive(Clone, Debug, Default)]
pub struct NodeInfo {
    pub name: String,
    /// The addresses NodePorts are served on.
    pub addresses: Vec<Ipv4Addr>,
    /// `topology.kubernetes.io/zone` of the node, for topology hints.
    pub zone: Option<String>,
}

/// The desired state, and what could not be translated (logged by the caller).
#[derive(Debug, Default)]
pub struct Translation {
    pub desired: Desired,
    pub warnings: Vec<String>,
}

/// One endpoint of one Service port, as kube-proxy sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Endpoint {
    addr: Ipv4Addr,
    port: u16,
    node: Option<String>,
    ready: bool,
    serving: bool,
    terminating: bool,
    zone_hints: Vec<String>,
    node_hints: Vec<String>,
}

/// The annotation kube-proxy reads when `spec.loadBalancerSourceRanges` is empty.
pub const ANNOTATION_SOURCE_RANGES: &str = "service.beta.kubernetes.io/load-balancer-source-ranges";

/// A Service's IPv4 loadBalancerSourceRanges (the spec field, else the annotation, as
/// kube-proxy's `GetLoadBalancerSourceRanges`), normalised to their network address. IPv6
/// ranges belong to the other family and are skipped; a range that does not parse is
/// reported and skipped (the API server's validation rejects those).
fn load_balancer_source_ranges(svc: &Service, warnings: &mut Vec<String>) -> Vec<(Ipv4Addr, u8)> {
    let from_spec: Vec<String> = svc
        .spec
        .as_ref()
        .and_then(|s| s.load_balancer_source_ranges.clone())
        .unwrap_or_default();
    let raw: Vec<String> = if from_spec.is_empty() {
        svc.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_SOURCE_RANGES))
            .map(|v| v.split(',').map(|s| s.trim().to_string()).collect())
            .unwrap_or_default()
    } else {
        from_spec
    };
    let mut out = Vec::new();
    for r in raw.iter().filter(|r| !r.is_empty()) {
        match parse_cidr(r) {
            Some(Cidr::V4(net, len)) => out.push((net, len)),
            Some(Cidr::V6) => {} // the other family's
            None => warnings.push(format!(
                "service {}/{}: loadBalancerSourceRanges entry {r:?} is not a CIDR; ignored",
                svc.metadata.namespace.as_deref().unwrap_or("default"),
                svc.metadata.name.as_deref().unwrap_or("")
            )),
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The sources a load-balancer IP lets in: its ranges and, when one of the node's addresses
/// is inside them, the LB IP itself (a packet the load balancer loops back to the node
/// carries it as its source; kube-proxy's firewall chain allows it alike).
fn fence(ranges: &[(Ipv4Addr, u8)], lb_ip: Ipv4Addr, node: &[Ipv4Addr]) -> Vec<(Ipv4Addr, u8)> {
    let mut out = ranges.to_vec();
    let inside = |a: &Ipv4Addr| !a.is_loopback() && ranges.iter().any(|r| contains(*r, *a));
    if !out.is_empty() && node.iter().any(inside) {
        out.push((lb_ip, 32));
        out.sort();
        out.dedup();
    }
    out
}

/// Whether the IPv4 network `(net, len)` holds `addr`.
pub fn contains((net, len): (Ipv4Addr, u8), addr: Ipv4Addr) -> bool {
    let mask = if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len.min(32)))
    };
    u32::from(addr) & mask == u32::from(net) & mask
}

/// A CIDR as the agent uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cidr {
    /// An IPv4 network (its address with the host bits cleared) and prefix length.
    V4(Ipv4Addr, u8),
    /// An IPv6 CIDR: the other family's, not programmed.
    V6,
}

/// `a.b.c.d/n` or an IPv6 CIDR; None when it is neither.
pub fn parse_cidr(s: &str) -> Option<Cidr> {
    let (addr, len) = s.trim().split_once('/')?;
    let len: u8 = len.parse().ok()?;
    if addr.parse::<std::net::Ipv6Addr>().is_ok() && len <= 128 {
        return Some(Cidr::V6);
    }
    let addr: Ipv4Addr = addr.parse().ok()?;
    if len > 32 {
        return None;
    }
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    Some(Cidr::V4(Ipv4Addr::from(u32::from(addr) & mask), len))
}

/// The EndpointSlices of each Service (those kube-proxy consumes).
pub fn slices_by_service(slices: &[EndpointSlice]) -> BTreeMap<ServiceKey, Vec<&EndpointSlice>> {
    let mut by: BTreeMap<ServiceKey, Vec<&EndpointSlice>> = BTreeMap::new();
    for s in slices {
        if s.metadata
            .labels
            .as_ref()
            .is_some_and(|l| l.contains_key(LABEL_SERVICE_PROXY_NAME))
        {
            continue;
        }
        if let Some(key) = ServiceKey::of_slice(s) {
            by.entry(key).or_default().push(s);
        }
    }
    by
}

/// Translates every Service of `objects`.
pub fn translate(objects: &Objects, node: &NodeInfo) -> Translation {
    let mut t = Translation::default();
    let slices = slices_by_service(&objects.slices);
    for svc in &objects.services {
        let key = ServiceKey::of_service(svc);
        translate_service(&mut t, svc, slices.get(&key), &objects.pods, node);
    }
    t
}

/// Translates one Service (with its EndpointSlices, or the Pods it selects when it has
/// none) into `t`.
pub fn translate_service(
    t: &mut Translation,
    svc: &Service,
    slices: Option<&Vec<&EndpointSlice>>,
    pods: &[Pod],
    node: &NodeInfo,
) {
    {
        let ns = namespace(&svc.metadata);
        let name = svc.metadata.name.clone().unwrap_or_default();
        if skip_service(svc) {
            return;
        }
        let Some(spec) = &svc.spec else { return };
        // Ready endpoints on this node over all ports, for the health check node port.
        let mut local_ready = BTreeSet::new();
        // Ports with a Local policy, endpoints elsewhere and none here (kube-proxy counts per
        // Service port, and not the ports without endpoints anywhere).
        let (mut lacks_internal, mut lacks_external) = (0, 0);
        for sp in spec.ports.iter().flatten() {
            let port_name = sp.name.clone().unwrap_or_default();
            let spn = ServicePortName {
                namespace: ns.clone(),
                name: name.clone(),
                port: port_name.clone(),
            };
            let proto = match sp.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => Proto::Tcp,
                "UDP" => Proto::Udp,
                other => {
                    t.warnings.push(format!(
                        "service {spn}: protocol {other} is not supported yet; port skipped"
                    ));
                    continue;
                }
            };
            let endpoints = match slices {
                Some(slices) => endpoints_from_slices(slices, &port_name, proto),
                None => endpoints_from_pods(svc, sp, proto, pods),
            };
            let (Ok(port), Ok(node_port)) = (
                u16::try_from(sp.port),
                u16::try_from(sp.node_port.unwrap_or(0)),
            ) else {
                continue; // refused by validation already
            };

            for e in endpoints.iter().filter(|e| e.ready || e.serving) {
                let addr = L4Addr {
                    addr: e.addr,
                    port: e.port,
                    proto,
                };
                t.desired.serving.insert(
                    addr,
                    Backend {
                        addr,
                        local: e.node.as_deref() == Some(node.name.as_str()),
                        terminating: e.terminating,
                    },
                );
            }
            let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
            let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
            local_ready.extend(
                endpoints
                    .iter()
                    .filter(|e| e.ready && e.node.as_deref() == Some(node.name.as_str()))
                    .map(|e| e.addr),
            );
            let sets = categorize(&endpoints, node, proto);
            let source_ranges = load_balancer_source_ranges(svc, &mut t.warnings);
            let affinity_timeout_s = affinity_timeout(spec);
            if sets.has_any && sets.local.is_empty() {
                lacks_internal += usize::from(internal_local);
                lacks_external += usize::from(external_local);
            }
            let internal = if internal_local {
                &sets.local
            } else {
                &sets.cluster
            };
            let external = if external_local {
                &sets.local
            } else {
                &sets.cluster
            };

            let mut add = |addr: Ipv4Addr, port: u16, kind: FrontendKind, set: &Vec<Backend>| {
                let fe = L4Addr { addr, port, proto };
                let state = |set: &Vec<Backend>| FrontendState {
                    service: spn.clone(),
                    kind,
                    backends: set.clone(),
                    drop_when_empty: set.is_empty() && sets.has_any,
                    affinity_timeout_s,
                    // Only load-balancer IPs are fenced (kube-proxy's firewall chain).
                    source_ranges: if kind == FrontendKind::LoadBalancer {
                        fence(&source_ranges, addr, &node.addresses)
                    } else {
                        Vec::new()
                    },
                };
                if let Some(prev) = t.desired.frontends.get(&fe) {
                    t.warnings.push(format!(
                        "{fe} of service {spn} is already used by {}; ignored",
                        prev.service
                    ));
                    return;
                }
                if kind != FrontendKind::ClusterIP && external_local {
                    t.desired.pod_frontends.insert(fe, state(&sets.cluster));
                }
                t.desired.frontends.insert(fe, state(set));
            };

            for ip in cluster_ips(svc) {
                add(ip, port, FrontendKind::ClusterIP, internal);
            }
            let has_node_ports = matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"));
            if has_node_ports && node_port != 0 {
                for &a in &node.addresses {
                    add(a, node_port, FrontendKind::NodePort, external);
                }
            }
            for ip in spec.external_ips.iter().flatten().filter_map(|s| ipv4(s)) {
                add(ip, port, FrontendKind::ExternalIP, external);
            }
            if spec.type_.as_deref() == Some("LoadBalancer") {
                for ing in svc
                    .status
                    .as_ref()
                    .and_then(|s| s.load_balancer.as_ref())
                    .and_then(|lb| lb.ingress.as_ref())
                    .into_iter()
                    .flatten()
                {
                    // Proxy-mode ingress IPs are the load balancer's own, not ours to serve.
                    if ing.ip_mode.as_deref() == Some("Proxy") {
                        continue;
                    }
                    if let Some(ip) = ing.ip.as_deref().and_then(ipv4) {
                        add(ip, port, FrontendKind::LoadBalancer, external);
                    }
                }
            }
        }
        let externally_reachable =
            matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"))
                || spec.external_ips.as_ref().is_some_and(|e| !e.is_empty());
        t.desired.no_local_endpoints_internal += lacks_internal;
        if externally_reachable {
            t.desired.no_local_endpoints_external += lacks_external;
        }
        // kube-proxy serves a health check on healthCheckNodePort for LoadBalancer Services
        // with externalTrafficPolicy Local (serviceport.go).
        let hcnp = spec
            .health_check_node_port
            .and_then(|p| u16::try_from(p).ok());
        if let Some(port) = hcnp.filter(|p| *p != 0) {
            if spec.type_.as_deref() == Some("LoadBalancer")
                && spec.external_traffic_policy.as_deref() == Some("Local")
            {
                t.desired.health_checks.insert(
                    port,
                    HealthCheck {
                        namespace: ns.clone(),
                        name: name.clone(),
                        local_endpoints: local_ready.len(),
                    },
                );
            }
        }
    }
}

/// The API's default for `sessionAffinityConfig.clientIP.timeoutSeconds`.
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;

/// sessionAffinity ClientIP: its timeout (default 3 h); 0 without affinity.
fn affinity_timeout(spec: &k8s_openapi::api::core::v1::ServiceSpec) -> u32 {
    if spec.session_affinity.as_deref() != Some("ClientIP") {
        return 0;
    }
    spec.session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds)
        .and_then(|t| u32::try_from(t).ok())
        .filter(|t| *t > 0)
        .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_S)
}

fn ipv4(s: &str) -> Option<Ipv4Addr> {
    match s.parse::<IpAddr>() {
        Ok(IpAddr::V4(a)) => Some(a),
        _ => None,
    }
}

fn skip_service(svc: &Service) -> bool {
    let labels = svc.metadata.labels.as_ref();
    if labels
        .is_some_and(|l| l.contains_key(LABEL_SERVICE_PROXY_NAME) || l.contains_key(LABEL_HEADLESS))
    {
        return true;
    }
    let Some(spec) = &svc.spec else { return true };
    if spec.type_.as_deref() == Some("ExternalName") {
        return true;
    }
    matches!(spec.cluster_ip.as_deref(), Some("None"))
        || cluster_ips(svc).is_empty() && spec.cluster_ip.as_deref().unwrap_or("").is_empty()
}

/// The IPv4 cluster IPs (`clusterIPs`, or the legacy `clusterIP` when that is all there is).
fn cluster_ips(svc: &Service) -> Vec<Ipv4Addr> {
    let Some(spec) = &svc.spec else { return vec![] };
    let list: Vec<&str> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ => spec.cluster_ip.as_deref().into_iter().collect(),
    };
    list.into_iter().filter_map(ipv4).collect()
}

fn endpoints_from_slices(
    slices: &[&EndpointSlice],
    port_name: &str,
    proto: Proto,
) -> Vec<Endpoint> {
    let mut by_addr: BTreeMap<(Ipv4Addr, u16), Endpoint> = BTreeMap::new();
    for slice in slices {
        if slice.address_type != "IPv4" {
            continue;
        }
        let port = slice.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or("") == port_name
                && p.protocol.as_deref().unwrap_or("TCP") == proto.to_string()
        });
        let Some(port) = port
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok())
        else {
            continue;
        };
        if port == 0 {
            continue;
        }
        for ep in slice.endpoints.iter().flatten() {
            // kube-proxy uses the first address only.
            let Some(addr) = ep.addresses.first().and_then(|a| ipv4(a)) else {
                continue;
            };
            let c = ep.conditions.as_ref();
            let e = Endpoint {
                addr,
                port,
                node: ep.node_name.clone(),
                ready: c.and_then(|c| c.ready).unwrap_or(true),
                serving: c.and_then(|c| c.serving).unwrap_or(true),
                terminating: c.and_then(|c| c.terminating).unwrap_or(false),
                zone_hints: ep
                    .hints
                    .iter()
                    .flat_map(|h| h.for_zones.iter().flatten())
                    .map(|z| z.name.clone())
                    .collect(),
                node_hints: ep
                    .hints
                    .iter()
                    .flat_map(|h| h.for_nodes.iter().flatten())
                    .map(|n| n.name.clone())
                    .collect(),
            };
            // The same address in two slices (an endpoint moving between slices): the
            // non-terminating one wins.
            match by_addr.get(&(addr, port)) {
                Some(prev) if !prev.terminating && e.terminating => {}
                _ => {
                    by_addr.insert((addr, port), e);
                }
            }
        }
    }
    by_addr.into_values().collect()
}

/// Endpoints the EndpointSlice controller would publish for a selector Service.
fn endpoints_from_pods(
    svc: &Service,
    sp: &ServicePort,
    proto: Proto,
    pods: &[Pod],
) -> Vec<Endpoint> {
    let Some(spec) = &svc.spec else { return vec![] };
    let Some(selector) = spec.selector.as_ref().filter(|s| !s.is_empty()) else {
        return vec![];
    };
    let ns = namespace(&svc.metadata);
    let publish_not_ready = spec.publish_not_ready_addresses.unwrap_or(false);
    let mut out = BTreeMap::new();
    for pod in pods {
        if namespace(&pod.metadata) != ns {
            continue;
        }
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        if !selector.iter().all(|(k, v)| labels.get(k) == Some(v)) {
            continue;
        }
        let status = pod.status.as_ref();
        if matches!(
            status.and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        ) {
            continue;
        }
        let Some(addr) = status.and_then(|s| s.pod_ip.as_deref()).and_then(ipv4) else {
            continue;
        };
        let Some(port) = target_port(sp, proto, pod) else {
            continue;
        };
        let pod_ready = status
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        let terminating = pod.metadata.deletion_timestamp.is_some();
        out.insert(
            (addr, port),
            Endpoint {
                addr,
                port,
                node: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
                ready: (publish_not_ready || pod_ready) && !terminating,
                serving: publish_not_ready || pod_ready,
                terminating,
                zone_hints: Vec::new(),
                node_hints: Vec::new(),
            },
        );
    }
    out.into_values().collect()
}

/// The Service port's target port on one pod: a number, a container port name (resolved
/// per pod, so pods may differ), or the Service port itself when unset.
fn target_port(sp: &ServicePort, proto: Proto, pod: &Pod) -> Option<u16> {
    let port = match &sp.target_port {
        None | Some(IntOrString::Int(0)) => sp.port,
        Some(IntOrString::Int(p)) => *p,
        Some(IntOrString::String(name)) => {
            if let Ok(n) = name.parse::<i32>() {
                n
            } else {
                pod.spec
                    .iter()
                    .flat_map(|s| s.containers.iter())
                    .flat_map(|c| c.ports.iter().flatten())
                    .find(|p| {
                        p.name.as_deref() == Some(name.as_str())
                            && p.protocol.as_deref().unwrap_or("TCP") == proto.to_string()
                    })?
                    .container_port
            }
        }
    };
    u16::try_from(port).ok().filter(|p| *p != 0)
}

/// The endpoint sets of one Service port on this node (kube-proxy `topology.go`
/// `CategorizeEndpoints`).
struct Categorized {
    /// For Cluster policy: ready endpoints, narrowed by topology hints when they apply; when
    /// none is ready anywhere, the serving terminating ones.
    cluster: Vec<Backend>,
    /// For Local policy: this node's ready endpoints, else its serving terminating ones.
    local: Vec<Backend>,
    /// Some endpoint anywhere is ready or serving-terminating: an empty Local set then drops
    /// instead of rejecting.
    has_any: bool,
}

/// Which topology hints apply (kube-proxy `topologyModeFromHints`): same-node when every
/// ready endpoint has a node hint and one names this node; else same-zone when every ready
/// endpoint has a zone hint and one names this node's zone; else none. All or nothing per
/// Service port and node.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Topology {
    None,
    SameNode,
    SameZone,
}

fn topology_mode(endpoints: &[Endpoint], node: &NodeInfo) -> Topology {
    let ready: Vec<&Endpoint> = endpoints.iter().filter(|e| e.ready).collect();
    if ready.is_empty() {
        return Topology::None;
    }
    let zone = node.zone.as_deref().unwrap_or("");
    if ready.iter().all(|e| !e.node_hints.is_empty())
        && ready.iter().any(|e| e.node_hints.contains(&node.name))
    {
        return Topology::SameNode;
    }
    if ready.iter().all(|e| !e.zone_hints.is_empty())
        && ready.iter().any(|e| e.zone_hints.iter().any(|z| z == zone))
    {
        return Topology::SameZone;
    }
    Topology::None
}

fn categorize(endpoints: &[Endpoint], node: &NodeInfo, proto: Proto) -> Categorized {
    let is_local = |e: &Endpoint| e.node.as_deref() == Some(node.name.as_str());
    let to_backends = |set: Vec<&Endpoint>| -> Vec<Backend> {
        let unique: BTreeSet<Backend> = set
            .into_iter()
            .map(|e| Backend {
                addr: L4Addr {
                    addr: e.addr,
                    port: e.port,
                    proto,
                },
                local: is_local(e),
                terminating: e.terminating,
            })
            .collect();
        unique.into_iter().collect()
    };
    let mode = topology_mode(endpoints, node);
    let zone = node.zone.as_deref().unwrap_or("");
    let in_topology = |e: &Endpoint| match mode {
        Topology::None => true,
        Topology::SameNode => e.node_hints.contains(&node.name),
        Topology::SameZone => e.zone_hints.iter().any(|z| z == zone),
    };
    let mut cluster: Vec<&Endpoint> = endpoints
        .iter()
        .filter(|e| e.ready && in_topology(e))
        .collect();
    if cluster.is_empty() {
        cluster = endpoints
            .iter()
            .filter(|e| e.serving && e.terminating)
            .collect();
    }
    let local_ready: Vec<&Endpoint> = endpoints
        .iter()
        .filter(|e| is_local(e) && e.ready)
        .collect();
    let local = if local_ready.is_empty() {
        endpoints
            .iter()
            .filter(|e| is_local(e) && e.serving && e.terminating)
            .collect()
    } else {
        local_ready
    };
    Categorized {
        has_any: endpoints
            .iter()
            .any(|e| e.ready || (e.serving && e.terminating)),
        cluster: to_backends(cluster),
        local: to_backends(local),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::manifests::parse_file;
    use std::path::Path;

    fn node() -> NodeInfo {
        NodeInfo {
            name: "node-a".into(),
            addresses: vec![Ipv4Addr::new(198, 18, 0, 2)],
            zone: Some("zone-a".into()),
        }
    }

    fn run(yaml: &str) -> Translation {
        let objects = parse_file(Path::new("test.yaml"), yaml).expect("fixture parses");
        translate(&objects, &node())
    }

    fn fe(addr: [u8; 4], port: u16, proto: Proto) -> L4Addr {
        L4Addr {
            addr: Ipv4Addr::from(addr),
            port,
            proto,
        }
    }

    fn backends(t: &Translation, f: L4Addr) -> Vec<String> {
        t.desired.frontends[&f]
            .backends
            .iter()
            .map(|b| b.addr.to_string())
            .collect()
    }

    const WEB: &str = r"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10]
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http, nodePort: 30080}
  - {name: dns, port: 53, protocol: UDP, targetPort: 5353}
  - {name: dns-tcp, port: 53, protocol: TCP, targetPort: 5353}
";

    fn pod(name: &str, ip: &str, node: &str, ready: bool, http_port: u16) -> String {
        format!(
            r#"
---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: shop, labels: {{app: web, tier: x}}}}
spec:
  nodeName: {node}
  containers:
  - name: c
    image: nginx
    ports:
    - {{name: http, containerPort: {http_port}}}
    - {{name: dns, containerPort: 5353, protocol: UDP}}
status:
  phase: Running
  podIP: {ip}
  conditions: [{{type: Ready, status: "{}"}}]
"#,
            if ready { "True" } else { "False" }
        )
    }

    #[test]
    fn selector_pods_named_ports_tcp_and_udp_on_one_port_and_nodeport() {
        let yaml = format!(
            "{WEB}{}{}{}",
            pod("web-1", "10.244.0.11", "node-a", true, 8080),
            pod("web-2", "10.244.0.12", "node-b", true, 9090),
            pod("web-3", "10.244.0.13", "node-a", false, 8080),
        );
        let t = run(&yaml);
        assert!(t.warnings.is_empty(), "{:?}", t.warnings);
        // Named targetPort resolved per pod: the two pods expose different numbers.
        let http = vec!["10.244.0.11:8080/TCP", "10.244.0.12:9090/TCP"];
        assert_eq!(backends(&t, fe([10, 96, 0, 10], 80, Proto::Tcp)), http);
        assert_eq!(backends(&t, fe([198, 18, 0, 2], 30080, Proto::Tcp)), http);
        assert_eq!(
            t.desired.frontends[&fe([198, 18, 0, 2], 30080, Proto::Tcp)].kind,
            FrontendKind::NodePort
        );
        // Same port number, two protocols: two independent frontends.
        let dns = vec!["10.244.0.11:5353/UDP", "10.244.0.12:5353/UDP"];
        assert_eq!(backends(&t, fe([10, 96, 0, 10], 53, Proto::Udp)), dns);
        let dns_tcp = vec!["10.244.0.11:5353/TCP", "10.244.0.12:5353/TCP"];
        assert_eq!(backends(&t, fe([10, 96, 0, 10], 53, Proto::Tcp)), dns_tcp);
        assert_eq!(t.desired.frontends.len(), 4);
        let local: Vec<bool> = t.desired.frontends[&fe([10, 96, 0, 10], 80, Proto::Tcp)]
            .backends
            .iter()
            .map(|b| b.local)
            .collect();
        assert_eq!(local, vec![true, false]);
    }

    #[test]
    fn pods_in_other_namespaces_or_with_other_labels_or_finished_are_not_selected() {
        let other_ns = pod("x", "10.244.0.20", "node-a", true, 8080)
            .replace("namespace: shop", "namespace: other");
        let other_label =
            pod("y", "10.244.0.21", "node-a", true, 8080).replace("app: web", "app: db");
        let done = pod("z", "10.244.0.22", "node-a", true, 8080)
            .replace("phase: Running", "phase: Succeeded");
        let no_ip = pod("w", "10.244.0.23", "node-a", true, 8080)
            .replace("podIP: 10.244.0.23", "hostIP: 1.2.3.4");
        let t = run(&format!("{WEB}{other_ns}{other_label}{done}{no_ip}"));
        let f = &t.desired.frontends[&fe([10, 96, 0, 10], 80, Proto::Tcp)];
        assert!(f.backends.is_empty());
        assert!(!f.drop_when_empty, "no endpoints anywhere: reject");
    }

    const SLICE_SVC: &str = r"
apiVersion: v1
kind: Service
metadata: {name: api, namespace: default}
spec:
  clusterIP: 10.96.1.1
  selector: {app: api}
  ports:
  - {name: grpc, port: 9000, targetPort: 9000}
  - {name: metrics, port: 9100}
";

    #[test]
    fn endpointslice_ports_matched_by_name_and_conditions_read_as_kube_proxy() {
        let yaml = format!(
            r#"{SLICE_SVC}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: api-1, labels: {{kubernetes.io/service-name: api}}}}
addressType: IPv4
ports:
- {{name: grpc, port: 19000, protocol: TCP}}
- {{name: metrics, port: 19100}}
endpoints:
- addresses: [10.244.1.1]            # conditions absent: ready
- addresses: [10.244.1.2]
  conditions: {{ready: false}}
- addresses: [10.244.1.3]
  conditions: {{ready: false, serving: true, terminating: true}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: api-2, labels: {{kubernetes.io/service-name: api}}}}
addressType: IPv4
ports:
- {{name: grpc, port: 29000}}
endpoints:
- addresses: [10.244.2.1, 10.244.2.99]   # only the first address counts
  conditions: {{ready: true}}
---
apiVersion: v1
kind: Pod                                # ignored: the Service has slices
metadata: {{name: p, labels: {{app: api}}}}
spec: {{containers: [{{name: c, image: x}}]}}
status: {{podIP: 10.244.9.9, conditions: [{{type: Ready, status: "True"}}]}}
"#
        );
        let t = run(&yaml);
        // grpc: the slices give different numbers to different endpoints.
        assert_eq!(
            backends(&t, fe([10, 96, 1, 1], 9000, Proto::Tcp)),
            vec!["10.244.1.1:19000/TCP", "10.244.2.1:29000/TCP"]
        );
        // metrics: only the first slice names that port.
        assert_eq!(
            backends(&t, fe([10, 96, 1, 1], 9100, Proto::Tcp)),
            vec!["10.244.1.1:19100/TCP"]
        );
    }

    #[test]
    fn terminating_endpoints_are_used_only_when_none_is_ready() {
        // kube-proxy topology.go: fall back to serving+terminating when no endpoint is ready.
        let slice = |eps: &str| {
            format!(
                r"{SLICE_SVC}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: api-1, labels: {{kubernetes.io/service-name: api}}}}
addressType: IPv4
ports: [{{name: grpc, port: 9000}}]
endpoints: {eps}
"
            )
        };
        let only_terminating = slice(
            r"
- {addresses: [10.0.0.1], conditions: {ready: false, serving: true, terminating: true}}
- {addresses: [10.0.0.2], conditions: {ready: false, serving: false, terminating: true}}
- {addresses: [10.0.0.3], conditions: {ready: false, serving: true, terminating: false}}",
        );
        let t = run(&only_terminating);
        let f = &t.desired.frontends[&fe([10, 96, 1, 1], 9000, Proto::Tcp)];
        assert_eq!(
            backends(&t, fe([10, 96, 1, 1], 9000, Proto::Tcp)),
            vec!["10.0.0.1:9000/TCP"]
        );
        assert!(f.backends[0].terminating);

        let mixed = slice(
            r"
- {addresses: [10.0.0.1], conditions: {ready: false, serving: true, terminating: true}}
- {addresses: [10.0.0.4], conditions: {ready: true}}",
        );
        let t = run(&mixed);
        assert_eq!(
            backends(&t, fe([10, 96, 1, 1], 9000, Proto::Tcp)),
            vec!["10.0.0.4:9000/TCP"]
        );
    }

    #[test]
    fn duplicate_address_across_slices_prefers_the_non_terminating_one() {
        let yaml = format!(
            r"{SLICE_SVC}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: a, labels: {{kubernetes.io/service-name: api}}}}
addressType: IPv4
ports: [{{name: grpc, port: 9000}}]
endpoints: [{{addresses: [10.0.0.1], conditions: {{ready: true}}}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: b, labels: {{kubernetes.io/service-name: api}}}}
addressType: IPv4
ports: [{{name: grpc, port: 9000}}]
endpoints: [{{addresses: [10.0.0.1], conditions: {{ready: false, terminating: true}}}}]
"
        );
        let t = run(&yaml);
        let f = &t.desired.frontends[&fe([10, 96, 1, 1], 9000, Proto::Tcp)];
        assert_eq!(f.backends.len(), 1);
        assert!(!f.backends[0].terminating);
    }

    /// A Service and one EndpointSlice whose endpoints carry `eps` (YAML flow mappings).
    fn hinted(policy: &str, eps: &[&str]) -> String {
        let eps: String = eps.iter().map(|e| format!("- {e}\n")).collect();
        format!(
            r"{}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: api-1, labels: {{kubernetes.io/service-name: api}}}}
addressType: IPv4
ports: [{{name: grpc, port: 9000}}]
endpoints:
{eps}",
            SLICE_SVC.replace(
                "  clusterIP: 10.96.1.1",
                &format!("  clusterIP: 10.96.1.1{policy}")
            )
        )
    }

    fn grpc(t: &Translation) -> Vec<String> {
        backends(t, fe([10, 96, 1, 1], 9000, Proto::Tcp))
    }

    #[test]
    fn topology_hints_narrow_the_cluster_set_all_or_nothing() {
        // Cases after kube-proxy pkg/proxy/topology.go (topologyModeFromHints).
        let a = "{addresses: [10.0.0.1], nodeName: node-a, hints: {forZones: [{name: zone-a}]}}";
        let b = "{addresses: [10.0.0.2], nodeName: node-b, hints: {forZones: [{name: zone-b}]}}";
        let c = "{addresses: [10.0.0.3], nodeName: node-c, hints: {forZones: [{name: zone-a}]}}";
        let unhinted = "{addresses: [10.0.0.4], nodeName: node-d}";
        let unready_unhinted = "{addresses: [10.0.0.5], conditions: {ready: false}}";
        // Every ready endpoint hinted, some for our zone: only those.
        let t = run(&hinted("", &[a, b, c, unready_unhinted]));
        assert_eq!(grpc(&t), vec!["10.0.0.1:9000/TCP", "10.0.0.3:9000/TCP"]);
        // One ready endpoint without a hint: no topology at all.
        let t = run(&hinted("", &[a, b, unhinted]));
        assert_eq!(grpc(&t).len(), 3);
        // Hints, but none for our zone: no topology.
        let t = run(&hinted("", &[b]));
        assert_eq!(grpc(&t), vec!["10.0.0.2:9000/TCP"]);
        // A node without a zone label ignores zone hints.
        let objects = parse_file(Path::new("t.yaml"), &hinted("", &[a, b])).expect("parses");
        let zoneless = NodeInfo {
            zone: None,
            ..node()
        };
        let t = translate(&objects, &zoneless);
        assert_eq!(grpc(&t).len(), 2);
        // Same-node hints win over zone hints when every ready endpoint has one.
        let n1 = "{addresses: [10.0.0.1], nodeName: node-a, hints: {forZones: [{name: zone-a}], forNodes: [{name: node-a}]}}";
        let n2 = "{addresses: [10.0.0.3], nodeName: node-c, hints: {forZones: [{name: zone-a}], forNodes: [{name: node-c}]}}";
        let t = run(&hinted("", &[n1, n2]));
        assert_eq!(grpc(&t), vec!["10.0.0.1:9000/TCP"]);
        // ... and fall back to zone hints when one lacks a node hint.
        let t = run(&hinted("", &[n1, c, b]));
        assert_eq!(grpc(&t), vec!["10.0.0.1:9000/TCP", "10.0.0.3:9000/TCP"]);
        // Local policy ignores hints.
        let t = run(&hinted(
            "\n  internalTrafficPolicy: Local",
            &[
                b,
                "{addresses: [10.0.0.9], nodeName: node-a, hints: {forZones: [{name: zone-b}]}}",
            ],
        ));
        assert_eq!(grpc(&t), vec!["10.0.0.9:9000/TCP"]);
    }

    #[test]
    fn session_affinity_client_ip_with_its_timeout() {
        let t = run(&SLICE_SVC.replace("  selector:", "  sessionAffinity: ClientIP\n  selector:"));
        let f = &t.desired.frontends[&fe([10, 96, 1, 1], 9000, Proto::Tcp)];
        assert_eq!(f.affinity_timeout_s, 10_800, "the API default");
        let t = run(&SLICE_SVC.replace(
            "  selector:",
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 5}}\n  selector:",
        ));
        assert_eq!(
            t.desired.frontends[&fe([10, 96, 1, 1], 9000, Proto::Tcp)].affinity_timeout_s,
            5
        );
        let t = run(&SLICE_SVC.replace("  selector:", "  sessionAffinity: None\n  selector:"));
        assert_eq!(
            t.desired.frontends[&fe([10, 96, 1, 1], 9000, Proto::Tcp)].affinity_timeout_s,
            0
        );
    }

    #[test]
    fn no_local_endpoints_counts_service_ports_with_endpoints_only_elsewhere() {
        // kube-proxy (proxier.go): per Service port with a Local policy, and only when the
        // port has endpoints somewhere.
        let svc = WEB.replace(
            "type: NodePort",
            "type: NodePort\n  externalTrafficPolicy: Local\n  internalTrafficPolicy: Local",
        );
        let counts = |t: &Translation| {
            (
                t.desired.no_local_endpoints_internal,
                t.desired.no_local_endpoints_external,
            )
        };
        let elsewhere = pod("web-2", "10.244.0.12", "node-b", true, 8080);
        assert_eq!(counts(&run(&format!("{svc}{elsewhere}"))), (3, 3));
        assert_eq!(counts(&run(&svc)), (0, 0), "no endpoints anywhere");
        let here = pod("web-1", "10.244.0.11", "node-a", true, 8080);
        assert_eq!(counts(&run(&format!("{svc}{here}{elsewhere}"))), (0, 0));
    }

    #[test]
    fn health_check_node_port_counts_local_ready_endpoints() {
        // kube-proxy service_health.go: only LoadBalancer + externalTrafficPolicy Local, and
        // only ready endpoints on this node count (terminating ones do not).
        let svc = WEB.replace(
            "type: NodePort",
            "type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000",
        );
        let t = run(&format!(
            "{svc}{}{}{}",
            pod("web-1", "10.244.0.11", "node-a", true, 8080),
            pod("web-2", "10.244.0.12", "node-b", true, 8080),
            pod("web-3", "10.244.0.13", "node-a", false, 8080),
        ));
        let hc = &t.desired.health_checks[&32000];
        assert_eq!(
            (hc.namespace.as_str(), hc.name.as_str(), hc.local_endpoints),
            ("shop", "web", 1)
        );
        assert_eq!(t.desired.no_local_endpoints_external, 0);
        let t = run(&format!(
            "{svc}{}",
            pod("web-2", "10.244.0.12", "node-b", true, 8080)
        ));
        assert_eq!(t.desired.health_checks[&32000].local_endpoints, 0);
        // One per Service port (http, dns, dns-tcp).
        assert_eq!(t.desired.no_local_endpoints_external, 3);
        // A NodePort Service with a healthCheckNodePort field gets no server.
        let t = run(&WEB.replace(
            "type: NodePort",
            "type: NodePort\n  healthCheckNodePort: 32000",
        ));
        assert!(t.desired.health_checks.is_empty());
    }

    #[test]
    fn pods_reach_external_local_frontends_with_the_cluster_set() {
        // kube-proxy proxier.go EXT chain: local pods short-circuit to the cluster chain.
        let svc = WEB.replace(
            "type: NodePort",
            "type: NodePort\n  externalTrafficPolicy: Local",
        );
        let t = run(&format!(
            "{svc}{}",
            pod("web-2", "10.244.0.12", "node-b", true, 8080)
        ));
        let np = fe([198, 18, 0, 2], 30080, Proto::Tcp);
        assert!(t.desired.frontends[&np].backends.is_empty());
        assert_eq!(t.desired.pod_frontends[&np].backends.len(), 1);
        assert!(!t
            .desired
            .pod_frontends
            .contains_key(&fe([10, 96, 0, 10], 80, Proto::Tcp)));
        // Cluster policy: no pod-only entries.
        let t = run(&format!(
            "{WEB}{}",
            pod("web-2", "10.244.0.12", "node-b", true, 8080)
        ));
        assert!(t.desired.pod_frontends.is_empty());
    }

    #[test]
    fn skipped_services() {
        // kube-proxy server.go label selectors and utils.go ShouldSkipService.
        let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: a, labels: {service.kubernetes.io/service-proxy-name: other}}
spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: b, labels: {service.kubernetes.io/headless: ""}}
spec: {clusterIP: 10.96.0.2, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: c}
spec: {clusterIP: None, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: d}
spec: {type: ExternalName, externalName: example.com, clusterIP: 10.96.0.4, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: e}
spec: {clusterIP: 10.96.0.5, ports: [{port: 80, protocol: SCTP}]}
"#;
        let t = run(yaml);
        assert!(t.desired.frontends.is_empty(), "{:?}", t.desired.frontends);
        assert_eq!(t.warnings.len(), 1, "SCTP is reported: {:?}", t.warnings);
    }

    #[test]
    fn traffic_policy_local_drops_when_endpoints_are_only_elsewhere() {
        // kube-proxy topology.go (docs/architecture.md): Local with no local endpoint drops,
        // with no endpoint anywhere rejects.
        let svc = WEB.replace(
            "type: NodePort",
            "type: NodePort\n  externalTrafficPolicy: Local\n  internalTrafficPolicy: Local",
        );
        let t = run(&format!(
            "{svc}{}",
            pod("web-2", "10.244.0.12", "node-b", true, 8080)
        ));
        let np = &t.desired.frontends[&fe([198, 18, 0, 2], 30080, Proto::Tcp)];
        assert!(np.backends.is_empty() && np.drop_when_empty);
        let cip = &t.desired.frontends[&fe([10, 96, 0, 10], 80, Proto::Tcp)];
        assert!(cip.backends.is_empty() && cip.drop_when_empty);

        let t = run(&format!(
            "{svc}{}{}",
            pod("web-1", "10.244.0.11", "node-a", true, 8080),
            pod("web-2", "10.244.0.12", "node-b", true, 8080)
        ));
        assert_eq!(
            backends(&t, fe([198, 18, 0, 2], 30080, Proto::Tcp)),
            vec!["10.244.0.11:8080/TCP"]
        );

        let t = run(&svc);
        let np = &t.desired.frontends[&fe([198, 18, 0, 2], 30080, Proto::Tcp)];
        assert!(np.backends.is_empty() && !np.drop_when_empty);
    }

    #[test]
    fn external_ips_and_load_balancer_ingress() {
        let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: lb}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.7
  externalIPs: [203.0.113.250, "2001:db8::1"]
  ports: [{port: 443, nodePort: 30443}]
status:
  loadBalancer:
    ingress:
    - {ip: 192.0.2.10}
    - {ip: 192.0.2.11, ipMode: Proxy}
    - {hostname: lb.example.com}
"#;
        let t = run(yaml);
        let kinds: Vec<(String, FrontendKind)> = t
            .desired
            .frontends
            .iter()
            .map(|(k, v)| (k.to_string(), v.kind))
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("10.96.0.7:443/TCP".into(), FrontendKind::ClusterIP),
                ("192.0.2.10:443/TCP".into(), FrontendKind::LoadBalancer),
                ("198.18.0.2:30443/TCP".into(), FrontendKind::NodePort),
                ("203.0.113.250:443/TCP".into(), FrontendKind::ExternalIP),
            ]
        );
    }

    #[test]
    fn source_ranges_fence_the_lb_ip_and_let_it_in_when_the_node_is_inside() {
        let svc = |ranges: &str| {
            format!(
                r"
apiVersion: v1
kind: Service
metadata: {{name: lb}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.7
  externalIPs: [203.0.113.250]
  loadBalancerSourceRanges: [{ranges}]
  ports: [{{port: 443, nodePort: 30443}}]
status:
  loadBalancer:
    ingress: [{{ip: 192.0.2.10}}]
"
            )
        };
        let ranges = |t: &Translation, f: L4Addr| t.desired.frontends[&f].source_ranges.clone();
        let lb = fe([192, 0, 2, 10], 443, Proto::Tcp);
        let net = |a: [u8; 4], len: u8| (Ipv4Addr::from(a), len);

        // The node (198.18.0.2) outside the ranges: only the ranges.
        let t = run(&svc("172.18.0.101/30, 2001:db8::/64"));
        assert!(t.warnings.is_empty(), "{:?}", t.warnings);
        assert_eq!(ranges(&t, lb), vec![net([172, 18, 0, 100], 30)]);
        // NodePorts, externalIPs and the ClusterIP are not fenced.
        for f in [
            fe([198, 18, 0, 2], 30443, Proto::Tcp),
            fe([203, 0, 113, 250], 443, Proto::Tcp),
            fe([10, 96, 0, 7], 443, Proto::Tcp),
        ] {
            assert!(ranges(&t, f).is_empty(), "{f}");
        }

        // The node inside a range: the LB IP as a source too.
        let t = run(&svc("172.18.0.100/30, 198.18.0.0/15"));
        assert_eq!(
            ranges(&t, lb),
            vec![
                net([172, 18, 0, 100], 30),
                net([192, 0, 2, 10], 32),
                net([198, 18, 0, 0], 15)
            ]
        );
    }

    #[test]
    fn contains_by_prefix() {
        let a = Ipv4Addr::new(10, 1, 2, 3);
        assert!(contains((Ipv4Addr::new(10, 1, 0, 0), 16), a));
        assert!(!contains((Ipv4Addr::new(10, 2, 0, 0), 16), a));
        assert!(contains((Ipv4Addr::UNSPECIFIED, 0), a));
        assert!(contains((a, 32), a));
        assert!(!contains((Ipv4Addr::new(10, 1, 2, 4), 32), a));
    }
}
