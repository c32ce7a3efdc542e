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
    if spec.type_.as_deref() != Some("ExternalName") {
        families(spec)?;
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

/// The family an IP address is of, named as `ipFamilies` names it.
fn family_of(a: &IpAddr) -> &'static str {
    if a.is_ipv6() {
        "IPv6"
    } else {
        "IPv4"
    }
}

/// A list of at most one address per family, as `clusterIPs` and `podIPs` are: the
/// addresses (None for `None`), after each was checked to be one.
fn one_per_family(field: &str, list: &[String]) -> Result<Vec<Option<IpAddr>>, Invalid> {
    if list.len() > 2 {
        return Err(invalid(
            field,
            format!("{} addresses: at most two (one per family)", list.len()),
        ));
    }
    let addrs: Vec<Option<IpAddr>> = list.iter().map(|a| a.parse().ok()).collect();
    if let [Some(a), Some(b)] = addrs[..] {
        if a.is_ipv6() == b.is_ipv6() {
            return Err(invalid(
                field,
                format!(
                    "{a} and {b} are both {}: one address per family",
                    family_of(&a)
                ),
            ));
        }
    }
    Ok(addrs)
}

/// `ipFamilyPolicy`, `ipFamilies` and `clusterIPs`, as the API server stores them: the
/// families listed once each, of the cluster IPs in their order, one cluster IP for
/// SingleStack and one of each family for RequireDualStack (the manifests are what the API
/// server would hold after allocating, so a RequireDualStack Service lists both).
fn families(spec: &k8s_openapi::api::core::v1::ServiceSpec) -> Result<(), Invalid> {
    let policy = spec.ip_family_policy.as_deref();
    match policy {
        None | Some("SingleStack" | "PreferDualStack" | "RequireDualStack") => {}
        Some(other) => {
            return Err(invalid(
                "spec.ipFamilyPolicy",
                format!(
                    "unsupported value {other:?} (SingleStack, PreferDualStack or \
                     RequireDualStack)"
                ),
            ))
        }
    }
    let listed = spec.ip_families.as_deref().unwrap_or_default();
    for (i, f) in listed.iter().enumerate() {
        if f != "IPv4" && f != "IPv6" {
            return Err(invalid(
                format!("spec.ipFamilies[{i}]"),
                format!("unsupported value {f:?} (IPv4 or IPv6)"),
            ));
        }
        if listed[..i].contains(f) {
            return Err(invalid(
                format!("spec.ipFamilies[{i}]"),
                format!("{f} is listed twice"),
            ));
        }
    }
    if policy == Some("SingleStack") && listed.len() > 1 {
        return Err(invalid(
            "spec.ipFamilies",
            "SingleStack takes one family (ipFamilyPolicy)",
        ));
    }
    let cluster_ips = spec.cluster_ips.as_deref().unwrap_or_default();
    let ips = one_per_family("spec.clusterIPs", cluster_ips)?;
    if let (Some(first), Some(legacy)) = (cluster_ips.first(), spec.cluster_ip.as_deref()) {
        if !legacy.is_empty() && first != legacy {
            return Err(invalid(
                "spec.clusterIPs[0]",
                format!("{first} is not spec.clusterIP ({legacy})"),
            ));
        }
    }
    let headless = cluster_ips.first().map(String::as_str) == Some("None")
        || spec.cluster_ip.as_deref() == Some("None");
    if headless {
        return Ok(());
    }
    for (i, (a, f)) in ips.iter().zip(listed).enumerate() {
        if let Some(a) = a {
            if family_of(a) != f {
                return Err(invalid(
                    format!("spec.clusterIPs[{i}]"),
                    format!("{a} is not of spec.ipFamilies[{i}] ({f})"),
                ));
            }
        }
    }
    if policy == Some("SingleStack") && ips.len() > 1 {
        return Err(invalid(
            "spec.clusterIPs",
            "SingleStack takes one cluster IP (ipFamilyPolicy)",
        ));
    }
    let assigned = ips.len().max(usize::from(
        spec.cluster_ip.as_deref().is_some_and(|c| !c.is_empty()),
    ));
    if policy == Some("RequireDualStack") && assigned > 0 && ips.len() < 2 {
        return Err(invalid(
            "spec.clusterIPs",
            "RequireDualStack needs a cluster IP of each family (ipFamilyPolicy)",
        ));
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
    let pod_ips: Vec<String> = pod
        .status
        .iter()
        .flat_map(|s| s.pod_ips.iter().flatten())
        .map(|p| p.ip.clone())
        .collect();
    for (i, a) in pod_ips.iter().enumerate() {
        ip(&format!("status.podIPs[{i}].ip"), a)?;
    }
    one_per_family("status.podIPs", &pod_ips)?;
    if let (Some(first), Some(legacy)) = (
        pod_ips.first(),
        pod.status.as_ref().and_then(|s| s.pod_ip.as_deref()),
    ) {
        if first != legacy {
            return Err(invalid(
                "status.podIPs[0].ip",
                format!("{first} is not status.podIP ({legacy})"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::source::manifests::parse_file;

    /// The error of a Service with `spec` (its family lines) and a port, or None when valid.
    fn service(spec: &str) -> Option<String> {
        let text = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: shop}}\nspec:\n{spec}\n  ports: [{{port: 80}}]\n"
        );
        parse_file(Path::new("/m/web.yaml"), &text)
            .err()
            .map(|e| e.to_string())
    }

    #[test]
    fn family_fields_as_the_api_server_stores_them() {
        for ok in [
            "  clusterIP: 10.96.0.10",
            "  ipFamilyPolicy: SingleStack\n  ipFamilies: [IPv6]\n  clusterIPs: [\"fd00::a\"]",
            "  ipFamilyPolicy: PreferDualStack\n  ipFamilies: [IPv4]\n  clusterIP: 10.96.0.10\n  clusterIPs: [10.96.0.10]",
            // A single-stack cluster's PreferDualStack: the families asked for, one allocated.
            "  ipFamilyPolicy: PreferDualStack\n  ipFamilies: [IPv4, IPv6]\n  clusterIPs: [10.96.0.10]",
            "  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv6, IPv4]\n  clusterIPs: [\"fd00::a\", 10.96.0.10]",
            "  ipFamilyPolicy: RequireDualStack\n  clusterIP: None\n  clusterIPs: [None]",
        ] {
            assert_eq!(service(ok), None, "{ok}");
        }
        for (bad, says) in [
            ("  ipFamilyPolicy: DualStack\n  clusterIP: 10.96.0.10", "spec.ipFamilyPolicy: unsupported value \"DualStack\""),
            ("  ipFamilies: [IPv5]\n  clusterIP: 10.96.0.10", "spec.ipFamilies[0]: unsupported value \"IPv5\""),
            ("  ipFamilies: [IPv4, IPv4]\n  clusterIP: 10.96.0.10", "spec.ipFamilies[1]: IPv4 is listed twice"),
            ("  ipFamilyPolicy: SingleStack\n  ipFamilies: [IPv4, IPv6]\n  clusterIPs: [10.96.0.10]", "spec.ipFamilies: SingleStack takes one family"),
            ("  ipFamilyPolicy: SingleStack\n  clusterIPs: [10.96.0.10, \"fd00::a\"]", "spec.clusterIPs: SingleStack takes one cluster IP"),
            ("  ipFamilyPolicy: RequireDualStack\n  clusterIPs: [10.96.0.10]", "spec.clusterIPs: RequireDualStack needs a cluster IP of each family"),
            ("  ipFamilyPolicy: RequireDualStack\n  clusterIP: 10.96.0.10", "RequireDualStack needs a cluster IP of each family"),
            ("  clusterIPs: [10.96.0.10, 10.96.0.11]", "spec.clusterIPs: 10.96.0.10 and 10.96.0.11 are both IPv4: one address per family"),
            ("  clusterIPs: [10.96.0.10, \"fd00::a\", \"fd00::b\"]", "spec.clusterIPs: 3 addresses: at most two"),
            ("  clusterIP: 10.96.0.9\n  clusterIPs: [10.96.0.10]", "spec.clusterIPs[0]: 10.96.0.10 is not spec.clusterIP (10.96.0.9)"),
            ("  ipFamilies: [IPv6, IPv4]\n  clusterIPs: [10.96.0.10, \"fd00::a\"]", "spec.clusterIPs[0]: 10.96.0.10 is not of spec.ipFamilies[0] (IPv6)"),
        ] {
            let e = service(bad).unwrap_or_else(|| panic!("accepted: {bad}"));
            assert!(e.starts_with("/m/web.yaml: Service shop/web: "), "{e}");
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn pod_ips_one_per_family_the_first_being_pod_ip() {
        let pod = |status: &str| {
            let text =
                format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: p}}\nstatus:\n{status}\n");
            parse_file(Path::new("/m/p.yaml"), &text)
                .err()
                .map(|e| e.to_string())
        };
        assert_eq!(
            pod("  podIP: 10.244.0.5\n  podIPs: [{ip: 10.244.0.5}, {ip: \"fd00::5\"}]"),
            None
        );
        assert_eq!(pod("  podIPs: [{ip: \"fd00::5\"}]"), None);
        for (bad, says) in [
            (
                "  podIPs: [{ip: 10.244.0.5}, {ip: 10.244.0.6}]",
                "status.podIPs: 10.244.0.5 and 10.244.0.6 are both IPv4",
            ),
            (
                "  podIPs: [{ip: \"fd00::5\"}, {ip: nowhere}]",
                "status.podIPs[1].ip: \"nowhere\" is not an IP address",
            ),
            (
                "  podIP: 10.244.0.5\n  podIPs: [{ip: \"fd00::5\"}, {ip: 10.244.0.5}]",
                "status.podIPs[0].ip: fd00::5 is not status.podIP (10.244.0.5)",
            ),
        ] {
            let e = pod(bad).unwrap_or_else(|| panic!("accepted: {bad}"));
            assert!(e.starts_with("/m/p.yaml: Pod default/p: "), "{e}");
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
