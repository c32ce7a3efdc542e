//! The desired state encoded into map keys and values.

use lb_common::{
    BackendV4, ServiceKeyV4, BACKEND_F_LOCAL, BACKEND_F_TERMINATING, SVC_F_CLUSTER_IP,
    SVC_F_EXTERNAL_IP, SVC_F_LOAD_BALANCER, SVC_F_NODE_PORT,
};

use crate::model::{FrontendKind, L4Addr};

/// The `LB4_SERVICES` key of a frontend, for the entry of `scope` (`SCOPE_*`).
pub fn frontend_key(fe: &L4Addr, scope: u8) -> ServiceKeyV4 {
    ServiceKeyV4 {
        addr: u32::from_ne_bytes(fe.addr.octets()),
        port: fe.port.to_be(),
        proto: fe.proto.number(),
        scope,
    }
}

/// The `LB4_BACKENDS` value of an endpoint.
pub fn backend_value(addr: &L4Addr, local: bool, terminating: bool) -> BackendV4 {
    BackendV4 {
        addr: u32::from_ne_bytes(addr.addr.octets()),
        port: addr.port.to_be(),
        proto: addr.proto.number(),
        flags: if local { BACKEND_F_LOCAL } else { 0 }
            | if terminating {
                BACKEND_F_TERMINATING
            } else {
                0
            },
    }
}

/// The `SVC_F_*` flag of a frontend's kind.
pub fn kind_flag(kind: FrontendKind) -> u32 {
    match kind {
        FrontendKind::ClusterIP => SVC_F_CLUSTER_IP,
        FrontendKind::NodePort => SVC_F_NODE_PORT,
        FrontendKind::ExternalIP => SVC_F_EXTERNAL_IP,
        FrontendKind::LoadBalancer => SVC_F_LOAD_BALANCER,
    }
}
