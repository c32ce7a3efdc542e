//! The desired datapath state: what every frontend should resolve to on this node.
//!
//! Built by `translate` from Kubernetes objects, consumed by `reconcile`. Free of I/O.

use std::{collections::BTreeMap, fmt, net::IpAddr};

use lb_common::{IPPROTO_TCP, IPPROTO_UDP};
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Proto {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
}

impl Proto {
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => IPPROTO_TCP,
            Proto::Udp => IPPROTO_UDP,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            IPPROTO_TCP => Some(Proto::Tcp),
            IPPROTO_UDP => Some(Proto::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        })
    }
}

/// An IP family, named as `ipFamilies` and an EndpointSlice's `addressType` name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Family {
    #[serde(rename = "IPv4")]
    Ipv4,
    #[serde(rename = "IPv6")]
    Ipv6,
}

impl Family {
    /// Both families, IPv4 first.
    pub const ALL: [Family; 2] = [Family::Ipv4, Family::Ipv6];

    pub fn of(addr: &IpAddr) -> Family {
        match addr {
            IpAddr::V4(_) => Family::Ipv4,
            IpAddr::V6(_) => Family::Ipv6,
        }
    }

    /// Whether `addr` is of this family.
    pub fn holds(self, addr: &IpAddr) -> bool {
        Family::of(addr) == self
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::Ipv4 => "IPv4",
            Family::Ipv6 => "IPv6",
        })
    }
}

/// An address of either family, port and protocol: a frontend (what clients connect to) or
/// a backend. A frontend's backends are of its own family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct L4Addr {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: Proto,
}

impl L4Addr {
    pub fn is_ipv6(&self) -> bool {
        self.addr.is_ipv6()
    }

    pub fn family(&self) -> Family {
        Family::of(&self.addr)
    }
}

impl fmt::Display for L4Addr {
    /// `10.96.0.1:80/TCP`, `[2001:db8::1]:80/TCP`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            IpAddr::V4(a) => write!(f, "{a}:{}/{}", self.port, self.proto),
            IpAddr::V6(a) => write!(f, "[{a}]:{}/{}", self.port, self.proto),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum FrontendKind {
    ClusterIP,
    NodePort,
    ExternalIP,
    LoadBalancer,
}

impl fmt::Display for FrontendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A backend as the datapath sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Backend {
    pub addr: L4Addr,
    /// The endpoint runs on this node.
    pub local: bool,
    /// The endpoint is terminating (used only because no ready endpoint exists).
    pub terminating: bool,
}

/// `namespace/name:port-name` of a Service port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ServicePortName {
    pub namespace: String,
    pub name: String,
    pub port: String,
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port.is_empty() {
            write!(f, ":{}", self.port)?;
        }
        Ok(())
    }
}

/// What one frontend resolves to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FrontendState {
    pub service: ServicePortName,
    pub kind: FrontendKind,
    /// The backends new flows are spread over, sorted. Empty: reject (or drop).
    pub backends: Vec<Backend>,
    /// With no backends, drop instead of rejecting (Local policy, endpoints elsewhere).
    pub drop_when_empty: bool,
    /// sessionAffinity ClientIP timeout in seconds; 0 = no affinity.
    pub affinity_timeout_s: u32,
    /// loadBalancerSourceRanges (network, prefix length) of a load-balancer IP, those of its
    /// own family: only clients in these may connect. Empty: anyone.
    pub source_ranges: Vec<(IpAddr, u8)>,
}

/// The whole desired state of this node's datapath, both families in one: an IPv4 frontend
/// goes to `LB4_SERVICES`, an IPv6 one to `LB6_SERVICES`, each with backends of its family.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub frontends: BTreeMap<L4Addr, FrontendState>,
    /// What this node's pods get instead at some frontends: those of external frontends with
    /// `externalTrafficPolicy: Local` use the Cluster set for pods (kube-proxy's
    /// short-circuit, so pods reach the LB IP or NodePort even with no local endpoint).
    pub pod_frontends: BTreeMap<L4Addr, FrontendState>,
    /// Every serving endpoint of every Service, chosen for new flows or not (a terminating
    /// one, say). The datapath keeps them so that their established flows carry on.
    pub serving: BTreeMap<L4Addr, Backend>,
    /// healthCheckNodePort → what its server reports (LoadBalancer Services with
    /// `externalTrafficPolicy: Local`).
    pub health_checks: BTreeMap<u16, HealthCheck>,
    /// Service ports with a Local traffic policy, endpoints elsewhere and none on this node,
    /// by policy (`kubeproxy_sync_proxy_rules_no_local_endpoints_total`).
    pub no_local_endpoints_internal: usize,
    pub no_local_endpoints_external: usize,
}

/// A Service's health check node port, as kube-proxy serves it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub namespace: String,
    pub name: String,
    /// Ready endpoints of the Service on this node.
    pub local_endpoints: usize,
}
