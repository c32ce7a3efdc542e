//! The desired state encoded into map keys and values, in the maps of the address's family.

use std::net::IpAddr;

use lb_common::{
    ipv6_words, BackendV4, BackendV6, ServiceKeyV4, ServiceKeyV6, BACKEND_F_LOCAL,
    BACKEND_F_TERMINATING, SVC_F_CLUSTER_IP, SVC_F_EXTERNAL_IP, SVC_F_LOAD_BALANCER,
    SVC_F_NODE_PORT,
};

use super::{BackendValue, FrontendKey};
use crate::model::{FrontendKind, L4Addr};

/// The `LB4_SERVICES` or `LB6_SERVICES` key of a frontend, for the entry of `scope`
/// (`SCOPE_*`).
pub fn frontend_key(fe: &L4Addr, scope: u8) -> FrontendKey {
    let (port, proto) = (fe.port.to_be(), fe.proto.number());
    match fe.addr {
        IpAddr::V4(a) => FrontendKey::V4(ServiceKeyV4 {
            addr: u32::from_ne_bytes(a.octets()),
            port,
            proto,
            scope,
        }),
        IpAddr::V6(a) => FrontendKey::V6(ServiceKeyV6 {
            addr: ipv6_words(a.octets()),
            port,
            proto,
            scope,
        }),
    }
}

/// The `LB4_BACKENDS` or `LB6_BACKENDS` value of an endpoint.
pub fn backend_value(addr: &L4Addr, local: bool, terminating: bool) -> BackendValue {
    let flags = if local { BACKEND_F_LOCAL } else { 0 }
        | if terminating {
            BACKEND_F_TERMINATING
        } else {
            0
        };
    let (port, proto) = (addr.port.to_be(), addr.proto.number());
    match addr.addr {
        IpAddr::V4(a) => BackendValue::V4(BackendV4 {
            addr: u32::from_ne_bytes(a.octets()),
            port,
            proto,
            flags,
        }),
        IpAddr::V6(a) => BackendValue::V6(BackendV6 {
            addr: ipv6_words(a.octets()),
            port,
            proto,
            flags,
        }),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Proto;

    #[test]
    fn each_family_to_its_maps() {
        let v4 = L4Addr {
            addr: "10.96.0.1".parse().expect("address"),
            port: 80,
            proto: Proto::Tcp,
        };
        let v6 = L4Addr {
            addr: "2001:db8::1".parse().expect("address"),
            ..v4
        };
        let FrontendKey::V4(k) = frontend_key(&v4, 0) else {
            panic!("an IPv4 frontend has an LB4_SERVICES key");
        };
        assert_eq!(k.addr.to_ne_bytes(), [10, 96, 0, 1]);
        let FrontendKey::V6(k) = frontend_key(&v6, 1) else {
            panic!("an IPv6 frontend has an LB6_SERVICES key");
        };
        assert_eq!(
            lb_common::ipv6_bytes(k.addr),
            "2001:db8::1"
                .parse::<std::net::Ipv6Addr>()
                .expect("address")
                .octets()
        );
        assert_eq!((k.port, k.scope), (80u16.to_be(), 1));
        let b = backend_value(&v6, true, true);
        assert!(b.is_ipv6());
        assert_eq!(b.addr(), v6.addr);
        assert_eq!(b.flags(), BACKEND_F_LOCAL | BACKEND_F_TERMINATING);
        assert_eq!(frontend_key(&v6, 0).addr(), v6.addr);
    }
}
