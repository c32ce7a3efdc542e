//! The service maps read back as frontends with their backends (for `lb-agent services`,
//! `/metrics` and tests), both families: IPv6 addresses are written `[2001:db8::1]:80/TCP`.

use std::{collections::BTreeMap, net::IpAddr};

use lb_common::{
    BACKEND_F_LOCAL, BACKEND_F_TERMINATING, SCOPE_PODS, SVC_F_CLUSTER_IP, SVC_F_DROP_NO_ENDPOINTS,
    SVC_F_EXTERNAL_IP, SVC_F_LOAD_BALANCER, SVC_F_NODE_PORT,
};
use serde::Serialize;

use super::{BackendValue, MapError, ServiceMaps};
use crate::model::{L4Addr, Proto};

/// One frontend as the maps hold it (for `lb-agent services`).
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct FrontendDump {
    pub id: u32,
    pub frontend: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// What a packet gets when there is no backend.
    pub no_backend: &'static str,
    /// sessionAffinity ClientIP timeout in seconds (0: none).
    pub affinity_timeout_s: u32,
    /// "pods": the entry this node's pods use at an externalTrafficPolicy Local frontend.
    pub scope: &'static str,
    pub backends: Vec<BackendDump>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct BackendDump {
    pub id: u32,
    pub address: String,
    pub state: &'static str,
    pub local: bool,
}

/// `a.b.c.d:port/PROTO` or `[v6]:port/PROTO` (a protocol the model does not know by its
/// number).
fn l4(addr: IpAddr, port_be: u16, proto: u8) -> String {
    let port = u16::from_be(port_be);
    match Proto::from_number(proto) {
        Some(proto) => L4Addr { addr, port, proto }.to_string(),
        None => match addr {
            IpAddr::V4(a) => format!("{a}:{port}/{proto}"),
            IpAddr::V6(a) => format!("[{a}]:{port}/{proto}"),
        },
    }
}

/// Reads the frontends (both families, by service id) and their backends from the maps.
pub fn dump(maps: &impl ServiceMaps) -> Result<Vec<FrontendDump>, MapError> {
    let slots: BTreeMap<(u32, u32), u32> = maps
        .slots()?
        .into_iter()
        .map(|(k, v)| ((k.svc_id, k.slot), v))
        .collect();
    let backends: BTreeMap<u32, BackendValue> = maps.backends()?.into_iter().collect();
    let mut services = maps.services()?;
    services.sort_by_key(|(_, v)| v.svc_id);
    Ok(services
        .into_iter()
        .map(|(k, v)| {
            let kind = [
                (SVC_F_CLUSTER_IP, "ClusterIP"),
                (SVC_F_NODE_PORT, "NodePort"),
                (SVC_F_EXTERNAL_IP, "ExternalIP"),
                (SVC_F_LOAD_BALANCER, "LoadBalancer"),
            ]
            .iter()
            .find(|(f, _)| v.flags & f != 0)
            .map_or("?", |(_, n)| n);
            let (port, proto, scope) = k.port_proto_scope();
            FrontendDump {
                id: v.svc_id,
                frontend: l4(k.addr(), port, proto),
                kind: kind.into(),
                affinity_timeout_s: v.affinity_timeout_s,
                scope: if scope == SCOPE_PODS { "pods" } else { "all" },
                no_backend: if v.flags & SVC_F_DROP_NO_ENDPOINTS != 0 {
                    "drop"
                } else {
                    "reject"
                },
                backends: (0..v.count)
                    .map(|slot| {
                        let id = slots.get(&(v.svc_id, slot)).copied().unwrap_or(0);
                        match backends.get(&id) {
                            // A slot names a backend of its frontend's family.
                            Some(b) if b.is_ipv6() == k.is_ipv6() => {
                                let (port, proto) = b.port_proto();
                                BackendDump {
                                    id,
                                    address: l4(b.addr(), port, proto),
                                    state: if b.flags() & BACKEND_F_TERMINATING != 0 {
                                        "terminating"
                                    } else {
                                        "active"
                                    },
                                    local: b.flags() & BACKEND_F_LOCAL != 0,
                                }
                            }
                            _ => BackendDump {
                                id,
                                address: "?".into(),
                                state: "missing",
                                local: false,
                            },
                        }
                    })
                    .collect(),
            }
        })
        .collect())
}
