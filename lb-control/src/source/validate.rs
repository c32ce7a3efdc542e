//! The checks the API server would make on the fields the agent uses, so that a manifest
//! the cluster would refuse is refused here too, with the reason.

use std::net::IpAddr;

use k8s_openapi::{
    api::{core::v1::Pod, core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};

/// A field the API server would refuse, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct Invalid {
    /// The field's path, e.g. `spec.ports[1].nodePort`.
    pub field: String,
    pub problem: String,
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> Invalid {
    Invalid {
        field: field.into(),
        problem: problem.into(),
    }
}

fn name_of(meta: &ObjectMeta) -> Result<(), Invalid> {
    match meta.name.as_deref() {
        Some(n) if !n.is_empty() => Ok(()),
        _ => Err(invalid("metadata.name", "required")),
    }
}

fn port_range(field: &str, p: i32) -> Result<(), Invalid> {
    if (1..=65535).contains(&p) {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("{p} is not a port number (1-65535)"),
        ))
    }
}

fn protocol(field: &str, p: Option<&str>) -> Result<(), Invalid> {
    match p {
        None | Some("TCP" | "UDP" | "SCTP") => Ok(()),
        Some(other) => Err(invalid(
            field,
            format!("unsupported value {other:?} (TCP, UDP or SCTP)"),
        )),
    }
}

fn ip(field: &str, s: &str) -> Result<(), Invalid> {
    s.parse::<IpAddr>()
        .map(|_| ())
        .map_err(|_| invalid(field, format!("{s:?} is not an IP address")))
}

/// Checks a Service.
pub fn service(svc: &Service) -> Result<(), Invalid> {
    name_of(&svc.metadata)?;
    let Some(spec) = &svc.spec else {
        return Ok(());
    };
    match spec.type_.as_deref() {
        None | Some("ClusterIP" | "NodePort" | "LoadBalancer" | "ExternalName") => {}
        Some(other) => return Err(invalid("spec.type", format!("unsupported value {other:?}"))),
    }
    if let Some(c) = spec.cluster_ip.as_deref() {
        if !c.is_empty() && c != "None" {
            ip("spec.clusterIP", c)?;
        }
    }
    for (i, c) in spec.cluster_ips.iter().flatten().enumerate() {
        if c != "None" {
            ip(&format!("spec.clusterIPs[{i}]"), c)?;
        }
    }
    for (i, c) in spec.external_ips.iter().flatten().enumerate() {
        ip(&format!("spec.externalIPs[{i}]"), c)?;
    }
    let ports = spec.ports.as_deref().unwrap_or_default();
    for (i, p) in ports.iter().enumerate() {
        let f = format!("spec.ports[{i}]");
        port_range(&format!("{f}.port"), p.port)?;
        protocol(&format!("{f}.protocol"), p.protocol.as_deref())?;
        if let Some(np) = p.node_port {
            port_range(&format!("{f}.nodePort"), np)?;
        }
        if let Some(IntOrString::Int(t)) = p.target_port {
            port_range(&format!("{f}.targetPort"), t)?;
        }
        if ports.len() > 1 && p.name.as_deref().unwrap_or_default().is_empty() {
            return Err(invalid(
                format!("{f}.name"),
                "required when a Service has several ports",
            ));
        }
    }
    match spec.session_affinity.as_deref() {
        None | Some("None" | "ClientIP") => {}
        Some(other) => {
            return Err(invalid(
                "spec.sessionAffinity",
                format!("unsupported value {other:?}"),
            ))
        }
    }
    if let Some(t) = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds)
    {
        if !(1..=86_400).contains(&t) {
            return Err(invalid(
                "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                format!("{t} is not within 1-86400"),
            ));
        }
    }
    for policy in [
        ("spec.externalTrafficPolicy", &spec.external_traffic_policy),
        ("spec.internalTrafficPolicy", &spec.internal_traffic_policy),
    ] {
        match policy.1.as_deref() {
            None | Some("Cluster" | "Local") => {}
            Some(other) => return Err(invalid(policy.0, format!("unsupported value {other:?}"))),
        }
    }
    for (i, ing) in svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .enumerate()
    {
        if let Some(a) = ing.ip.as_deref() {
            ip(&format!("status.loadBalancer.ingress[{i}].ip"), a)?;
        }
    }
    Ok(())
}

/// Checks an EndpointSlice.
pub fn endpoint_slice(slice: &EndpointSlice) -> Result<(), Invalid> {
    name_of(&slice.metadata)?;
    match slice.address_type.as_str() {
        "IPv4" | "IPv6" | "FQDN" => {}
        other => {
            return Err(invalid(
                "addressType",
                format!("unsupported value {other:?}"),
            ))
        }
    }
    for (i, ep) in slice.endpoints.iter().flatten().enumerate() {
        if ep.addresses.is_empty() {
            return Err(invalid(
                format!("endpoints[{i}].addresses"),
                "at least one is required",
            ));
        }
        if slice.address_type != "FQDN" {
            for (j, a) in ep.addresses.iter().enumerate() {
                ip(&format!("endpoints[{i}].addresses[{j}]"), a)?;
            }
        }
    }
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        if let Some(n) = p.port {
            port_range(&format!("ports[{i}].port"), n)?;
        }
        protocol(&format!("ports[{i}].protocol"), p.protocol.as_deref())?;
    }
    Ok(())
}

/// Checks a Pod.
pub fn pod(pod: &Pod) -> Result<(), Invalid> {
    name_of(&pod.metadata)?;
    for (i, c) in pod
        .spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .enumerate()
    {
        for (j, p) in c.ports.iter().flatten().enumerate() {
            let f = format!("spec.containers[{i}].ports[{j}]");
            port_range(&format!("{f}.containerPort"), p.container_port)?;
            protocol(&format!("{f}.protocol"), p.protocol.as_deref())?;
        }
    }
    if let Some(a) = pod.status.as_ref().and_then(|s| s.pod_ip.as_deref()) {
        ip("status.podIP", a)?;
    }
    Ok(())
}
