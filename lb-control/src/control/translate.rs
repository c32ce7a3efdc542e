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
//! * Families, as kube-proxy's per-family proxiers build them (`servicechangetracker.go`,
//!   `serviceport.go`): a Service has frontends of a family only when `clusterIPs` holds a
//!   cluster IP of it (`clusterIP` when that is all there is), and then only that family's
//!   addresses: its NodePorts on the node's addresses of the family, its externalIPs,
//!   load-balancer IPs and loadBalancerSourceRanges of the family, and the endpoints of
//!   the family's EndpointSlices (`addressType`; FQDN slices are ignored) or of the Pods'
//!   `podIPs`. The other family's entries are ignored.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use k8s_openapi::{
    api::{
        core::v1::{Pod, Service, ServicePort},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};

use super::model::{
    Backend, Desired, Family, FrontendKind, FrontendState, HealthCheck, L4Addr, Proto,
    ServicePortName,
};
use crate::source::{namespace, Objects, ServiceKey, LABEL_HEADLESS, LABEL_SERVICE_PROXY_NAME};

/// What translation needs to know about the node it runs for.
#[derive(Clone, Debug, Default)]
pub struct NodeInfo {
    pub name: String,
    /// The addresses NodePorts are served on, of both families (a Service's NodePorts are
    /// served on those of its families).
    pub addresses: Vec<IpAddr>,
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
    addr: IpAddr,
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

/// A Service's loadBalancerSourceRanges of both families (the spec field, else the
/// annotation, as kube-proxy's `GetLoadBalancerSourceRanges`), normalised to their network
/// address; each fences the load-balancer IPs of its own family. A range that does not parse
/// is reported and skipped (the API server's validation rejects those).
fn load_balancer_source_ranges(svc: &Service, warnings: &mut Vec<String>) -> Vec<(IpAddr, u8)> {
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
    for r in raw.iter().filter(|r| !r.trim().is_empty()) {
        match parse_cidr(r) {
            Some(c) => out.push((c.net, c.len)),
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

/// The sources a load-balancer IP lets in: its family's ranges (`ranges`) and, when one of
/// the node's addresses of that family (`node`) is inside them, the LB IP itself (a packet
/// the load balancer loops back to the node carries it as its source; kube-proxy's firewall
/// chain allows it alike).
fn fence(ranges: &[(IpAddr, u8)], lb_ip: IpAddr, node: &[IpAddr]) -> Vec<(IpAddr, u8)> {
    let mut out = ranges.to_vec();
    // `contains` never matches across families: only the node's addresses of the LB IP's
    // family can let it in.
    let inside = |a: &IpAddr| !a.is_loopback() && ranges.iter().any(|r| contains(*r, *a));
    if !out.is_empty() && node.iter().any(inside) {
        out.push((lb_ip, if lb_ip.is_ipv6() { 128 } else { 32 }));
        out.sort();
        out.dedup();
    }
    out
}

/// Whether the network `(net, len)` holds `addr` (never across families).
pub fn contains((net, len): (IpAddr, u8), addr: IpAddr) -> bool {
    match (net, addr) {
        (IpAddr::V4(n), IpAddr::V4(a)) => {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(len.min(32)))
                .unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(a)) => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(len.min(128)))
                .unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// A CIDR of either family: its network address (host bits cleared) and prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cidr {
    pub net: IpAddr,
    pub len: u8,
}

impl Cidr {
    pub fn family(&self) -> Family {
        Family::of(&self.net)
    }

    /// Whether the network holds `addr` (never one of the other family).
    pub fn contains(&self, addr: IpAddr) -> bool {
        contains((self.net, self.len), addr)
    }
}

/// `a.b.c.d/n` (n ≤ 32) or an IPv6 CIDR (n ≤ 128), surrounding blanks allowed; None when it
/// is neither.
pub fn parse_cidr(s: &str) -> Option<Cidr> {
    let (addr, len) = s.trim().split_once('/')?;
    let len: u8 = len.parse().ok()?;
    let net = match addr.parse::<IpAddr>().ok()? {
        IpAddr::V4(a) if len <= 32 => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::V4((u32::from(a) & mask).into())
        }
        IpAddr::V6(a) if len <= 128 => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::V6((u128::from(a) & mask).into())
        }
        _ => return None,
    };
    Some(Cidr { net, len })
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
/// none) into `t`: the frontends of each family it has a cluster IP of.
pub fn translate_service(
    t: &mut Translation,
    svc: &Service,
    slices: Option<&Vec<&EndpointSlice>>,
    pods: &[Pod],
    node: &NodeInfo,
) {
    let ns = namespace(&svc.metadata);
    let name = svc.metadata.name.clone().unwrap_or_default();
    if skip_service(svc) {
        return;
    }
    let Some(spec) = &svc.spec else { return };
    // One cluster IP per family, the Service's primary family first.
    let cluster_ips = cluster_ips(svc);
    let source_ranges = load_balancer_source_ranges(svc, &mut t.warnings);
    let affinity_timeout_s = affinity_timeout(spec);
    let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
    let has_node_ports = matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"));
    let lb_ips: Vec<IpAddr> = if spec.type_.as_deref() == Some("LoadBalancer") {
        svc.status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .into_iter()
            .flatten()
            // Proxy-mode ingress IPs are the load balancer's own, not ours to serve.
            .filter(|ing| ing.ip_mode.as_deref() != Some("Proxy"))
            .filter_map(|ing| ing.ip.as_deref().and_then(ip))
            .collect()
    } else {
        Vec::new()
    };
    let external_ips: Vec<IpAddr> = spec
        .external_ips
        .iter()
        .flatten()
        .filter_map(|s| ip(s))
        .collect();
    // Ready endpoints on this node over all ports, of the primary family, for the health
    // check node port (one server answers for both families).
    let mut local_ready = BTreeSet::new();
    // Ports with a Local policy, endpoints elsewhere and none here (kube-proxy counts per
    // Service port, and not the ports without endpoints anywhere); a port counts once
    // whichever of its families lacks them.
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
        let (Ok(port), Ok(node_port)) = (
            u16::try_from(sp.port),
            u16::try_from(sp.node_port.unwrap_or(0)),
        ) else {
            continue; // refused by validation already
        };
        let mut lacks_local = false;
        for (i, cluster_ip) in cluster_ips.iter().enumerate() {
            let family = Family::of(cluster_ip);
            let of_family = |a: &&IpAddr| family.holds(a);
            let endpoints = match slices {
                Some(slices) => endpoints_from_slices(slices, &port_name, proto, family),
                None => endpoints_from_pods(svc, sp, proto, pods, family),
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
            if i == 0 {
                local_ready.extend(
                    endpoints
                        .iter()
                        .filter(|e| e.ready && e.node.as_deref() == Some(node.name.as_str()))
                        .map(|e| e.addr),
                );
            }
            let sets = categorize(&endpoints, node, proto);
            lacks_local |= sets.has_any && sets.local.is_empty();
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
            let ranges: Vec<(IpAddr, u8)> = source_ranges
                .iter()
                .copied()
                .filter(|(net, _)| family.holds(net))
                .collect();
            let node_addresses: Vec<IpAddr> =
                node.addresses.iter().filter(of_family).copied().collect();

            let mut add = |addr: IpAddr, port: u16, kind: FrontendKind, set: &Vec<Backend>| {
                let fe = L4Addr { addr, port, proto };
                let state = |set: &Vec<Backend>| FrontendState {
                    service: spn.clone(),
                    kind,
                    backends: set.clone(),
                    drop_when_empty: set.is_empty() && sets.has_any,
                    affinity_timeout_s,
                    // Only load-balancer IPs are fenced (kube-proxy's firewall chain).
                    source_ranges: if kind == FrontendKind::LoadBalancer {
                        fence(&ranges, addr, &node_addresses)
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

            add(*cluster_ip, port, FrontendKind::ClusterIP, internal);
            if has_node_ports && node_port != 0 {
                for &a in &node_addresses {
                    add(a, node_port, FrontendKind::NodePort, external);
                }
            }
            for &a in external_ips.iter().filter(of_family) {
                add(a, port, FrontendKind::ExternalIP, external);
            }
            for &a in lb_ips.iter().filter(of_family) {
                add(a, port, FrontendKind::LoadBalancer, external);
            }
        }
        if lacks_local {
            lacks_internal += usize::from(internal_local);
            lacks_external += usize::from(external_local);
        }
    }
    let externally_reachable = has_node_ports || !external_ips.is_empty();
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
        if spec.type_.as_deref() == Some("LoadBalancer") && external_local {
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

fn ip(s: &str) -> Option<IpAddr> {
    s.trim().parse().ok()
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

/// The cluster IPs, one per family, in order (the first is the Service's primary family):
/// `clusterIPs`, or the legacy `clusterIP` when that is all there is. What `ipFamilies`
/// and `ipFamilyPolicy` asked for is what the API server allocated into `clusterIPs`
/// (validation checks they agree).
fn cluster_ips(svc: &Service) -> Vec<IpAddr> {
    let Some(spec) = &svc.spec else { return vec![] };
    let list: Vec<&str> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ => spec.cluster_ip.as_deref().into_iter().collect(),
    };
    let mut out: Vec<IpAddr> = Vec::with_capacity(2);
    for a in list.into_iter().filter_map(ip) {
        if !out.iter().any(|o| o.is_ipv6() == a.is_ipv6()) {
            out.push(a);
        }
    }
    out
}

/// The endpoints of one Service port in the EndpointSlices of `family` (`addressType`).
fn endpoints_from_slices(
    slices: &[&EndpointSlice],
    port_name: &str,
    proto: Proto,
    family: Family,
) -> Vec<Endpoint> {
    let mut by_addr: BTreeMap<(IpAddr, u16), Endpoint> = BTreeMap::new();
    let address_type = family.to_string();
    for slice in slices {
        if slice.address_type != address_type {
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
            let Some(addr) = ep
                .addresses
                .first()
                .and_then(|a| ip(a))
                .filter(|a| family.holds(a))
            else {
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

/// Endpoints the EndpointSlice controller would publish for a selector Service, in its
/// slices of `family`: each pod's address of that family (`status.podIPs`; `podIP` when
/// that is all there is).
fn endpoints_from_pods(
    svc: &Service,
    sp: &ServicePort,
    proto: Proto,
    pods: &[Pod],
    family: Family,
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
        let Some(addr) = status.and_then(|s| pod_ip(s, family)) else {
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

/// A pod's address of `family`: the first of `status.podIPs` of that family, or `podIP`
/// when `podIPs` is empty.
fn pod_ip(status: &k8s_openapi::api::core::v1::PodStatus, family: Family) -> Option<IpAddr> {
    let listed: Vec<&str> = status
        .pod_ips
        .iter()
        .flatten()
        .map(|p| p.ip.as_str())
        .collect();
    let candidates: Vec<&str> = if listed.is_empty() {
        status.pod_ip.as_deref().into_iter().collect()
    } else {
        listed
    };
    candidates
        .into_iter()
        .filter_map(ip)
        .find(|a| family.holds(a))
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
    use std::{net::Ipv4Addr, path::Path};

    fn node() -> NodeInfo {
        NodeInfo {
            name: "node-a".into(),
            // Both families: a single-stack Service uses only its family's address.
            addresses: vec![
                Ipv4Addr::new(198, 18, 0, 2).into(),
                NODE_V6.parse().expect("address"),
            ],
            zone: Some("zone-a".into()),
        }
    }

    fn run(yaml: &str) -> Translation {
        let objects = parse_file(Path::new("test.yaml"), yaml).expect("fixture parses");
        translate(&objects, &node())
    }

    fn fe(addr: [u8; 4], port: u16, proto: Proto) -> L4Addr {
        L4Addr {
            addr: IpAddr::from(addr),
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
        let net = |a: [u8; 4], len: u8| (IpAddr::from(a), len);

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
        let a = Ipv4Addr::new(10, 1, 2, 3).into();
        assert!(contains((Ipv4Addr::new(10, 1, 0, 0).into(), 16), a));
        assert!(!contains((Ipv4Addr::new(10, 2, 0, 0).into(), 16), a));
        assert!(contains((Ipv4Addr::UNSPECIFIED.into(), 0), a));
        assert!(contains((a, 32), a));
        assert!(!contains((Ipv4Addr::new(10, 1, 2, 4).into(), 32), a));
    }

    // Families: kube-proxy's per-family proxiers (servicechangetracker.go, serviceport.go).

    /// The node's IPv6 address (`node()`).
    const NODE_V6: &str = "2001:db8:18::2";

    /// A NodePort Service `shop/dual` with `families` (the spec lines about families), its
    /// http port's endpoints in an IPv4, an IPv6 and an FQDN slice.
    fn dual(families: &str, v4_endpoints: &str, v6_endpoints: &str) -> String {
        format!(
            r"
apiVersion: v1
kind: Service
metadata: {{name: dual, namespace: shop}}
spec:
  type: NodePort
{families}
  ports:
  - {{name: http, port: 80, targetPort: 8080, nodePort: 30080}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: dual-4, namespace: shop, labels: {{kubernetes.io/service-name: dual}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints: {v4_endpoints}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: dual-6, namespace: shop, labels: {{kubernetes.io/service-name: dual}}}}
addressType: IPv6
ports: [{{name: http, port: 8080}}]
endpoints: {v6_endpoints}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: dual-fqdn, namespace: shop, labels: {{kubernetes.io/service-name: dual}}}}
addressType: FQDN
ports: [{{name: http, port: 8080}}]
endpoints: [{{addresses: [web.example.com]}}]
"
        )
    }

    const V4_EPS: &str =
        "[{addresses: [10.244.0.11], nodeName: node-a}, {addresses: [10.244.1.12], nodeName: node-b}]";
    const V6_EPS: &str = r#"[{addresses: ["fd00:10:244::11"], nodeName: node-a}, {addresses: ["fd00:10:244:1::12"], nodeName: node-b}]"#;

    /// Every frontend with its backends, as strings.
    fn table(t: &Translation) -> Vec<(String, Vec<String>)> {
        t.desired
            .frontends
            .iter()
            .map(|(fe, st)| {
                let b = st.backends.iter().map(|b| b.addr.to_string()).collect();
                (fe.to_string(), b)
            })
            .collect()
    }

    fn row(fe: &str, backends: &[&str]) -> (String, Vec<String>) {
        (
            fe.to_string(),
            backends.iter().map(ToString::to_string).collect(),
        )
    }

    #[test]
    fn dual_stack_service_gets_each_family_from_its_own_addresses() {
        let v4 = ["10.244.0.11:8080/TCP", "10.244.1.12:8080/TCP"];
        let v6 = ["[fd00:10:244::11]:8080/TCP", "[fd00:10:244:1::12]:8080/TCP"];
        let want = vec![
            row("10.96.0.10:80/TCP", &v4),
            row("198.18.0.2:30080/TCP", &v4),
            row("[2001:db8:18::2]:30080/TCP", &v6),
            row("[fd00:10:96::a]:80/TCP", &v6),
        ];
        // PreferDualStack on a dual-stack cluster, and RequireDualStack: what the API server
        // allocated into clusterIPs decides, the primary family first or second alike.
        for families in [
            "  ipFamilyPolicy: PreferDualStack\n  ipFamilies: [IPv4, IPv6]\n  clusterIP: 10.96.0.10\n  clusterIPs: [10.96.0.10, \"fd00:10:96::a\"]",
            "  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv6, IPv4]\n  clusterIP: \"fd00:10:96::a\"\n  clusterIPs: [\"fd00:10:96::a\", 10.96.0.10]",
        ] {
            let t = run(&dual(families, V4_EPS, V6_EPS));
            assert!(t.warnings.is_empty(), "{:?}", t.warnings);
            assert_eq!(table(&t), want, "{families}");
            // Serving endpoints of both families (the FQDN slice is ignored).
            assert_eq!(t.desired.serving.len(), 4);
            let local: Vec<String> = t.desired.frontends
                [&L4Addr {
                    addr: "fd00:10:96::a".parse().expect("address"),
                    port: 80,
                    proto: Proto::Tcp,
                }]
                .backends
                .iter()
                .filter(|b| b.local)
                .map(|b| b.addr.to_string())
                .collect();
            assert_eq!(local, vec!["[fd00:10:244::11]:8080/TCP"]);
        }
    }

    #[test]
    fn prefer_dual_stack_with_one_cluster_ip_is_single_stack() {
        // A single-stack cluster allocates one family only: no frontend of the other, not
        // even NodePorts on the node's IPv6 address (kube-proxy's IPv6 proxier skips a
        // Service without an IPv6 cluster IP).
        let t = run(&dual(
            "  ipFamilyPolicy: PreferDualStack\n  ipFamilies: [IPv4]\n  clusterIP: 10.96.0.10\n  clusterIPs: [10.96.0.10]",
            V4_EPS,
            V6_EPS,
        ));
        let v4 = ["10.244.0.11:8080/TCP", "10.244.1.12:8080/TCP"];
        assert_eq!(
            table(&t),
            vec![
                row("10.96.0.10:80/TCP", &v4),
                row("198.18.0.2:30080/TCP", &v4)
            ]
        );
        assert!(t.desired.serving.keys().all(|a| !a.is_ipv6()));
        // The legacy clusterIP alone, without clusterIPs, gives the same.
        let legacy = run(&dual("  clusterIP: 10.96.0.10", V4_EPS, V6_EPS));
        assert_eq!(table(&legacy), table(&t));
    }

    #[test]
    fn single_stack_ipv6_uses_ipv6_addresses_only() {
        let yaml = dual(
            "  ipFamilyPolicy: SingleStack\n  ipFamilies: [IPv6]\n  clusterIP: \"fd00:10:96::a\"\n  clusterIPs: [\"fd00:10:96::a\"]\n  externalIPs: [203.0.113.9, \"2001:db8:e::9\"]",
            V4_EPS,
            V6_EPS,
        );
        let t = run(&yaml);
        assert!(t.warnings.is_empty(), "{:?}", t.warnings);
        let v6 = ["[fd00:10:244::11]:8080/TCP", "[fd00:10:244:1::12]:8080/TCP"];
        assert_eq!(
            table(&t),
            vec![
                row("[2001:db8:e::9]:80/TCP", &v6),
                row("[2001:db8:18::2]:30080/TCP", &v6),
                row("[fd00:10:96::a]:80/TCP", &v6),
            ],
            "no IPv4 NodePort, externalIP or endpoint"
        );
        assert!(t.desired.serving.keys().all(L4Addr::is_ipv6));
    }

    #[test]
    fn dual_stack_with_only_ipv4_endpoints_rejects_at_ipv6_frontends() {
        let families = "  ipFamilyPolicy: RequireDualStack\n  clusterIP: 10.96.0.10\n  clusterIPs: [10.96.0.10, \"fd00:10:96::a\"]\n  externalTrafficPolicy: Local";
        let t = run(&dual(families, V4_EPS, "[]"));
        for (fe, st) in &t.desired.frontends {
            if fe.is_ipv6() {
                // No IPv6 endpoint anywhere: reject (not drop), though IPv4 ones exist.
                assert!(st.backends.is_empty() && !st.drop_when_empty, "{fe}");
            } else {
                assert!(st.backends.iter().all(|b| !b.addr.is_ipv6()), "{fe}");
            }
        }
        let v6_node_port = L4Addr {
            addr: NODE_V6.parse().expect("address"),
            port: 30080,
            proto: Proto::Tcp,
        };
        assert!(t.desired.frontends.contains_key(&v6_node_port));
        // The IPv4 NodePort (Local, endpoint on this node) has its local endpoint only.
        assert_eq!(
            backends(&t, fe([198, 18, 0, 2], 30080, Proto::Tcp)),
            vec!["10.244.0.11:8080/TCP"]
        );
        // Endpoints of the IPv6 family only elsewhere: the IPv6 NodePort drops, its pods'
        // entry has the Cluster set.
        let t = run(&dual(
            families,
            V4_EPS,
            r#"[{addresses: ["fd00:10:244:1::12"], nodeName: node-b}]"#,
        ));
        let np = &t.desired.frontends[&v6_node_port];
        assert!(np.backends.is_empty() && np.drop_when_empty);
        assert_eq!(t.desired.pod_frontends[&v6_node_port].backends.len(), 1);
        assert_eq!(
            t.desired.no_local_endpoints_external, 1,
            "counted once per port"
        );
    }

    #[test]
    fn ipv6_endpoint_slices_are_read_as_ipv4_ones() {
        let yaml = dual(
            "  clusterIP: \"fd00:10:96::a\"\n  clusterIPs: [\"fd00:10:96::a\"]",
            V4_EPS,
            r#"
- addresses: ["fd00:10:244::21", "fd00:10:244::99"]   # only the first counts
  conditions: {ready: true}
- addresses: ["fd00:10:244::22"]
  conditions: {ready: false, serving: true, terminating: true}
- addresses: ["fd00:10:244::23"]
  conditions: {ready: false, serving: false}"#,
        );
        let t = run(&yaml);
        let cip = L4Addr {
            addr: "fd00:10:96::a".parse().expect("address"),
            port: 80,
            proto: Proto::Tcp,
        };
        assert_eq!(
            backends(&t, cip),
            vec!["[fd00:10:244::21]:8080/TCP"],
            "ready ones only"
        );
        // Serving ones are kept for their flows (`serving` nil: true), the not serving out.
        let kept: Vec<String> = t.desired.serving.keys().map(ToString::to_string).collect();
        assert_eq!(
            kept,
            vec!["[fd00:10:244::21]:8080/TCP", "[fd00:10:244::22]:8080/TCP"]
        );
    }

    #[test]
    fn mixed_family_external_ips_lb_ingress_and_source_ranges() {
        let svc = |ranges: &str| {
            format!(
                r#"
apiVersion: v1
kind: Service
metadata: {{name: lb}}
spec:
  type: LoadBalancer
  ipFamilyPolicy: PreferDualStack
  clusterIPs: [10.96.0.7, "fd00:10:96::7"]
  externalIPs: [203.0.113.250, "2001:db8:e::250"]
  loadBalancerSourceRanges: [{ranges}]
  ports: [{{port: 443, nodePort: 30443}}]
status:
  loadBalancer:
    ingress:
    - {{ip: 192.0.2.10}}
    - {{ip: "2001:db8:1b::10"}}
    - {{ip: "2001:db8:1b::11", ipMode: Proxy}}
"#
            )
        };
        let l4 = |a: &str, port: u16| L4Addr {
            addr: a.parse().expect("address"),
            port,
            proto: Proto::Tcp,
        };
        let (lb4, lb6) = (l4("192.0.2.10", 443), l4("2001:db8:1b::10", 443));
        let net = |a: &str, len: u8| (a.parse::<IpAddr>().expect("address"), len);
        let ranges = |t: &Translation, f: L4Addr| t.desired.frontends[&f].source_ranges.clone();

        let t = run(&svc(r#"172.18.0.100/30, "2001:db8:c::/48""#));
        assert!(t.warnings.is_empty(), "{:?}", t.warnings);
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
                ("[2001:db8:e::250]:443/TCP".into(), FrontendKind::ExternalIP),
                ("[2001:db8:18::2]:30443/TCP".into(), FrontendKind::NodePort),
                (
                    "[2001:db8:1b::10]:443/TCP".into(),
                    FrontendKind::LoadBalancer
                ),
                ("[fd00:10:96::7]:443/TCP".into(), FrontendKind::ClusterIP),
            ]
        );
        // Each LB IP is fenced by the ranges of its own family only.
        assert_eq!(ranges(&t, lb4), vec![net("172.18.0.100", 30)]);
        assert_eq!(ranges(&t, lb6), vec![net("2001:db8:c::", 48)]);

        // Ranges of one family only: the other family's LB IP is not fenced.
        let t = run(&svc(r#""2001:db8:c::/48""#));
        assert!(ranges(&t, lb4).is_empty());
        assert_eq!(ranges(&t, lb6), vec![net("2001:db8:c::", 48)]);

        // The node inside a range of a family lets that family's LB IP in (and only it).
        let t = run(&svc(r#"172.18.0.100/30, "2001:db8:18::/64""#));
        assert_eq!(ranges(&t, lb4), vec![net("172.18.0.100", 30)]);
        assert_eq!(
            ranges(&t, lb6),
            vec![net("2001:db8:18::", 64), net("2001:db8:1b::10", 128)]
        );
    }

    #[test]
    fn pods_give_each_family_their_pod_ip_of_it() {
        let svc = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  ipFamilyPolicy: RequireDualStack
  clusterIPs: [10.96.0.10, "fd00:10:96::a"]
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
"#;
        let with_ips =
            |p: String, ips: &str| p.replace("  podIP:", &format!("  podIPs: {ips}\n  podIP:"));
        let yaml = format!(
            "{svc}{}{}{}",
            with_ips(
                pod("web-1", "10.244.0.11", "node-a", true, 8080),
                r#"[{ip: 10.244.0.11}, {ip: "fd00:10:244::11"}]"#
            ),
            // podIP only (no podIPs): an IPv4 endpoint only.
            pod("web-2", "10.244.0.12", "node-b", true, 8080),
            with_ips(
                pod("web-3", "fd00:10:244::13", "node-b", true, 9090),
                r#"[{ip: "fd00:10:244::13"}]"#
            ),
        );
        let t = run(&yaml);
        assert!(t.warnings.is_empty(), "{:?}", t.warnings);
        assert_eq!(
            table(&t),
            vec![
                row(
                    "10.96.0.10:80/TCP",
                    &["10.244.0.11:8080/TCP", "10.244.0.12:8080/TCP"]
                ),
                row(
                    "[fd00:10:96::a]:80/TCP",
                    &["[fd00:10:244::11]:8080/TCP", "[fd00:10:244::13]:9090/TCP"]
                ),
            ]
        );
    }

    #[test]
    fn health_check_counts_the_primary_familys_local_endpoints() {
        // One server answers for both families: a dual-stack pod is one endpoint, not two.
        let families = "  ipFamilyPolicy: RequireDualStack\n  clusterIPs: [\"fd00:10:96::a\", 10.96.0.10]\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000";
        let t =
            run(&dual(families, V4_EPS, V6_EPS).replace("type: NodePort", "type: LoadBalancer"));
        assert_eq!(t.desired.health_checks[&32000].local_endpoints, 1);
        // Only IPv4 endpoints, IPv6 primary: none for the IPv6 family.
        let t = run(&dual(families, V4_EPS, "[]").replace("type: NodePort", "type: LoadBalancer"));
        assert_eq!(t.desired.health_checks[&32000].local_endpoints, 0);
    }

    #[test]
    fn node_ports_per_family_on_the_addresses_nodeport_addresses_selects() {
        use crate::node_ports::NodePortAddresses;
        let yaml = dual(
            "  ipFamilyPolicy: RequireDualStack\n  clusterIPs: [10.96.0.10, \"fd00:10:96::a\"]",
            V4_EPS,
            V6_EPS,
        );
        let objects = parse_file(Path::new("test.yaml"), &yaml).expect("fixture parses");
        let ip = |s: &str| s.parse::<IpAddr>().expect("address");
        let addresses = [
            ip("198.18.0.2"),
            ip("10.0.5.2"),
            ip("2001:db8:18::2"),
            ip("fd00:5::2"),
        ];
        let primary = [ip("198.18.0.2"), ip("2001:db8:18::2")];
        let node_ports = |npa: &str| -> Vec<String> {
            let npa: NodePortAddresses = npa.parse().expect("nodeport-addresses");
            let node = NodeInfo {
                addresses: npa.select(&addresses, &primary, false),
                ..node()
            };
            let t = translate(&objects, &node);
            let v6 = ["[fd00:10:244::11]:8080/TCP", "[fd00:10:244:1::12]:8080/TCP"];
            t.desired
                .frontends
                .iter()
                .filter(|(_, st)| st.kind == FrontendKind::NodePort)
                .map(|(fe, st)| {
                    // Each family's NodePorts have that family's endpoints.
                    let want_v6 = fe.is_ipv6();
                    assert!(
                        st.backends.iter().all(|b| b.addr.is_ipv6() == want_v6),
                        "{fe}"
                    );
                    if want_v6 {
                        assert_eq!(backends(&t, *fe), v6, "{fe}");
                    }
                    fe.to_string()
                })
                .collect()
        };
        // Every address of both families.
        assert_eq!(
            node_ports(""),
            vec![
                "10.0.5.2:30080/TCP",
                "198.18.0.2:30080/TCP",
                "[2001:db8:18::2]:30080/TCP",
                "[fd00:5::2]:30080/TCP"
            ]
        );
        // IPv4 CIDRs only: IPv4 restricted, IPv6 on every address (kube-proxy's rule).
        assert_eq!(
            node_ports("198.18.0.0/16"),
            vec![
                "198.18.0.2:30080/TCP",
                "[2001:db8:18::2]:30080/TCP",
                "[fd00:5::2]:30080/TCP"
            ]
        );
        // CIDRs of both families: each restricts its own.
        assert_eq!(
            node_ports("10.0.0.0/8,fd00::/8"),
            vec!["10.0.5.2:30080/TCP", "[fd00:5::2]:30080/TCP"]
        );
        // `primary`: the primary address of each family.
        assert_eq!(
            node_ports("primary"),
            vec!["198.18.0.2:30080/TCP", "[2001:db8:18::2]:30080/TCP"]
        );
    }

    #[test]
    fn cidrs_of_both_families() {
        let c = |s: &str| parse_cidr(s).map(|c| (c.net.to_string(), c.len));
        assert_eq!(c(" 10.1.2.3/16 "), Some(("10.1.0.0".into(), 16)));
        assert_eq!(c("2001:db8::1/32"), Some(("2001:db8::".into(), 32)));
        assert_eq!(c("::/0"), Some(("::".into(), 0)));
        assert_eq!(c("2001:db8::1/128"), Some(("2001:db8::1".into(), 128)));
        assert_eq!(c("10.0.0.0/33"), None);
        assert_eq!(c("2001:db8::/129"), None);
        assert_eq!(c("2001:db8::"), None);
        let net = parse_cidr("2001:db8::/32").expect("CIDR");
        assert!(net.contains("2001:db8:ffff::1".parse().expect("address")));
        assert!(!net.contains("2001:db9::1".parse().expect("address")));
        assert!(
            !net.contains("10.0.0.1".parse().expect("address")),
            "other family"
        );
        let all4 = parse_cidr("0.0.0.0/0").expect("CIDR");
        assert!(!all4.contains("::1".parse().expect("address")));
    }
}
