//! Incremental translation: the desired state kept per Service, so that a change to one
//! Service or its EndpointSlices is translated and programmed alone, in time that follows
//! the size of the change rather than the number of Services (an EndpointSlice change
//! reaches the datapath in milliseconds with tens of thousands of Services).
//!
//! `rebuild` translates everything (start, relist, node changes) and gives the same state as
//! `translate::translate`: Services are merged in order and the first to claim a frontend
//! keeps it. `update` re-translates named Services and returns what the reconciler must look
//! at; when Services compete for a frontend, it asks for a rebuild instead, so that the
//! first-claim rule stays exact.

use std::collections::{BTreeSet, HashMap};

use super::{
    model::{Desired, L4Addr},
    translate::{slices_by_service, translate_service, NodeInfo, Translation},
};
use crate::{
    reconcile::Partial,
    source::{Objects, ServiceKey},
};

/// What one Service contributes to the desired state.
#[derive(Debug, Default)]
struct Fragment {
    frontends: Vec<L4Addr>,
    pod_frontends: Vec<L4Addr>,
    serving: Vec<L4Addr>,
    health_checks: Vec<u16>,
    no_local: (usize, usize),
}

/// The incremental translation engine: the desired state and what each Service contributes
/// to it.
#[derive(Debug, Default)]
pub struct Engine {
    desired: Desired,
    fragments: HashMap<ServiceKey, Fragment>,
    /// How many Services name each serving endpoint.
    serving_refs: HashMap<L4Addr, u32>,
    /// Some frontend was claimed by two Services at the last rebuild or update.
    conflicts: bool,
}

impl Engine {
    pub fn desired(&self) -> &Desired {
        &self.desired
    }

    /// Translates every Service of `objects`; returns the warnings.
    pub fn rebuild(&mut self, objects: &Objects, node: &NodeInfo) -> Vec<String> {
        *self = Engine::default();
        let slices = slices_by_service(&objects.slices);
        let mut warnings = Vec::new();
        for svc in &objects.services {
            let key = ServiceKey::of_service(svc);
            let mut t = Translation::default();
            translate_service(&mut t, svc, slices.get(&key), &objects.pods, node);
            warnings.append(&mut t.warnings);
            self.merge(key, t, &mut warnings, &mut Partial::default());
        }
        warnings
    }

    /// Translates the Services `keys` again from `objects`, which holds at least those
    /// Services, their EndpointSlices and the Pods (a Service missing from it is gone).
    /// Returns what changed for the reconciler and the warnings, or None when a rebuild is
    /// needed (Services compete for a frontend).
    pub fn update(
        &mut self,
        objects: &Objects,
        node: &NodeInfo,
        keys: &BTreeSet<ServiceKey>,
    ) -> Option<(Partial, Vec<String>)> {
        if self.conflicts {
            return None;
        }
        let mut partial = Partial::default();
        let mut warnings = Vec::new();
        for key in keys {
            self.remove(key, &mut partial);
        }
        let slices = slices_by_service(&objects.slices);
        for svc in &objects.services {
            let key = ServiceKey::of_service(svc);
            if !keys.contains(&key) || self.fragments.contains_key(&key) {
                continue;
            }
            let mut t = Translation::default();
            translate_service(&mut t, svc, slices.get(&key), &objects.pods, node);
            warnings.append(&mut t.warnings);
            self.merge(key, t, &mut warnings, &mut partial);
        }
        if self.conflicts {
            return None;
        }
        Some((partial, warnings))
    }

    /// Takes a Service's contribution out, noting what it touched.
    fn remove(&mut self, key: &ServiceKey, partial: &mut Partial) {
        let Some(f) = self.fragments.remove(key) else {
            return;
        };
        for fe in &f.frontends {
            self.desired.frontends.remove(fe);
            partial.frontends.insert(*fe);
        }
        for fe in &f.pod_frontends {
            self.desired.pod_frontends.remove(fe);
            partial.frontends.insert(*fe);
        }
        for addr in &f.serving {
            partial.serving.insert(*addr);
            if let Some(n) = self.serving_refs.get_mut(addr) {
                *n -= 1;
                if *n == 0 {
                    self.serving_refs.remove(addr);
                    self.desired.serving.remove(addr);
                }
            }
        }
        for port in &f.health_checks {
            self.desired.health_checks.remove(port);
        }
        self.desired.no_local_endpoints_internal -= f.no_local.0;
        self.desired.no_local_endpoints_external -= f.no_local.1;
    }

    /// Adds one Service's translation; a frontend another Service holds stays with it.
    fn merge(
        &mut self,
        key: ServiceKey,
        t: Translation,
        warnings: &mut Vec<String>,
        partial: &mut Partial,
    ) {
        let mut f = Fragment::default();
        let d = t.desired;
        for (fe, st) in d.frontends {
            if let Some(prev) = self.desired.frontends.get(&fe) {
                warnings.push(format!(
                    "{fe} of service {} is already used by {}; ignored",
                    st.service, prev.service
                ));
                self.conflicts = true;
                continue;
            }
            if let Some(pod) = d.pod_frontends.get(&fe) {
                self.desired.pod_frontends.insert(fe, pod.clone());
                f.pod_frontends.push(fe);
            }
            self.desired.frontends.insert(fe, st);
            f.frontends.push(fe);
            partial.frontends.insert(fe);
        }
        for (addr, b) in d.serving {
            *self.serving_refs.entry(addr).or_default() += 1;
            self.desired.serving.insert(addr, b);
            f.serving.push(addr);
            partial.serving.insert(addr);
        }
        for (port, hc) in d.health_checks {
            self.desired.health_checks.insert(port, hc);
            f.health_checks.push(port);
        }
        f.no_local = (d.no_local_endpoints_internal, d.no_local_endpoints_external);
        self.desired.no_local_endpoints_internal += f.no_local.0;
        self.desired.no_local_endpoints_external += f.no_local.1;
        self.fragments.insert(key, f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        maps::MemMaps, reconcile::Reconciler, source::manifests::parse_file, translate::translate,
    };
    use std::{net::Ipv4Addr, path::Path};

    fn node() -> NodeInfo {
        NodeInfo {
            name: "n1".into(),
            addresses: vec![Ipv4Addr::new(198, 18, 0, 2).into()],
            zone: None,
        }
    }

    fn service(name: &str, ip: &str, eps: &[&str]) -> String {
        let eps: String = eps
            .iter()
            .map(|e| format!("- {{addresses: [{e}], nodeName: n1}}\n"))
            .collect();
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  type: NodePort\n  clusterIP: {ip}\n  ports:\n  - {{name: http, port: 80, targetPort: 8080}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports:\n- {{name: http, port: 8080}}\nendpoints:\n{eps}---\n"
        )
    }

    fn objects(yaml: &str) -> Objects {
        parse_file(Path::new("t.yaml"), yaml).expect("parses")
    }

    #[test]
    fn updates_give_the_state_a_full_translation_gives() {
        let a = service("a", "10.96.0.1", &["10.244.0.1", "10.244.0.2"]);
        let b = service("b", "10.96.0.2", &["10.244.0.2", "10.244.0.3"]);
        let mut e = Engine::default();
        assert!(e.rebuild(&objects(&(a.clone() + &b)), &node()).is_empty());
        assert_eq!(
            e.desired(),
            &translate(&objects(&(a.clone() + &b)), &node()).desired
        );

        let mut maps_full = Reconciler::new(MemMaps::default()).expect("reconciler");
        let mut maps_inc = Reconciler::new(MemMaps::default()).expect("reconciler");
        maps_full.apply(e.desired()).expect("apply");
        maps_inc.apply(e.desired()).expect("apply");

        // b loses 10.244.0.2 (which a still uses) and gains .4; then a goes away.
        let b2 = service("b", "10.96.0.2", &["10.244.0.3", "10.244.0.4"]);
        let steps = [(a.clone() + &b2, "b"), (b2.clone(), "a")];
        for (yaml, changed) in steps {
            let all = objects(&yaml);
            let keys = BTreeSet::from([ServiceKey::new("default", changed)]);
            let (partial, warnings) = e.update(&all, &node(), &keys).expect("no conflicts");
            assert!(warnings.is_empty());
            let full = translate(&all, &node()).desired;
            assert_eq!(e.desired(), &full, "after {changed} changed");
            maps_inc
                .apply_partial(e.desired(), &partial)
                .expect("partial apply");
            maps_full.apply(&full).expect("full apply");
            assert_eq!(
                crate::maps::dump(maps_inc.maps()).expect("dump"),
                crate::maps::dump(maps_full.maps()).expect("dump"),
                "maps after {changed} changed"
            );
            assert_eq!(maps_inc.maps().backends, maps_full.maps().backends);
        }
        // Backend 10.244.0.1 (only a's) and .2 are gone from the maps.
        assert_eq!(maps_inc.maps().backends.len(), 2);
    }

    #[test]
    fn competing_services_ask_for_a_rebuild() {
        let a = service("a", "10.96.0.1", &["10.244.0.1"]);
        let b = service("b", "10.96.0.1", &["10.244.0.2"]);
        let mut e = Engine::default();
        let w = e.rebuild(&objects(&(a.clone() + &b)), &node());
        assert_eq!(w.len(), 1, "{w:?}");
        let keys = BTreeSet::from([ServiceKey::new("default", "b")]);
        assert!(e.update(&objects(&(a + &b)), &node(), &keys).is_none());
    }

    /// A dual-stack NodePort Service with IPv4 endpoints `eps4` and IPv6 ones `eps6`.
    fn dual(name: &str, eps4: &[&str], eps6: &[&str]) -> String {
        let eps = |eps: &[&str]| -> String {
            eps.iter()
                .map(|e| format!("- {{addresses: [\"{e}\"], nodeName: n1}}\n"))
                .collect()
        };
        let slice = |family: &str, eps: String| {
            format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-{family}, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: {family}\nports:\n- {{name: http, port: 8080}}\nendpoints:\n{eps}---\n"
            )
        };
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  type: NodePort\n  ipFamilyPolicy: RequireDualStack\n  clusterIPs: [10.96.0.9, \"fd00:10:96::9\"]\n  ports:\n  - {{name: http, port: 80, targetPort: 8080, nodePort: 30090}}\n---\n{}{}",
            slice("IPv4", eps(eps4)),
            slice("IPv6", eps(eps6))
        )
    }

    #[test]
    fn dual_stack_updates_give_the_state_a_full_translation_gives() {
        let node = NodeInfo {
            addresses: vec![
                Ipv4Addr::new(198, 18, 0, 2).into(),
                "2001:db8:18::2".parse().expect("address"),
            ],
            ..node()
        };
        let a = service("a", "10.96.0.1", &["10.244.0.1"]);
        let d1 = dual("d", &["10.244.0.2"], &["fd00:10:244::2", "fd00:10:244::3"]);
        let mut e = Engine::default();
        assert!(e.rebuild(&objects(&(a.clone() + &d1)), &node).is_empty());
        let mut maps_inc = Reconciler::new(MemMaps::default()).expect("reconciler");
        maps_inc.apply(e.desired()).expect("apply");
        assert_eq!(maps_inc.maps().services6.len(), 2, "ClusterIP and NodePort");

        // d loses an IPv6 endpoint and gains one; then it goes.
        let d2 = dual("d", &["10.244.0.2"], &["fd00:10:244::3", "fd00:10:244::4"]);
        for yaml in [a.clone() + &d2, a.clone()] {
            let all = objects(&yaml);
            let keys = BTreeSet::from([ServiceKey::new("default", "d")]);
            let (partial, warnings) = e.update(&all, &node, &keys).expect("no conflicts");
            assert!(warnings.is_empty(), "{warnings:?}");
            let full = translate(&all, &node).desired;
            assert_eq!(e.desired(), &full);
            maps_inc
                .apply_partial(e.desired(), &partial)
                .expect("partial apply");
            let mut maps_full = Reconciler::new(MemMaps::default()).expect("reconciler");
            maps_full.apply(&full).expect("full apply");
            let addresses = |m: &MemMaps| -> Vec<(String, Vec<String>)> {
                crate::maps::dump(m)
                    .expect("dump")
                    .into_iter()
                    .map(|f| {
                        (
                            f.frontend,
                            f.backends.into_iter().map(|b| b.address).collect(),
                        )
                    })
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect()
            };
            assert_eq!(addresses(maps_inc.maps()), addresses(maps_full.maps()));
        }
        let m = maps_inc.maps();
        assert!(m.services6.is_empty() && m.backends6.is_empty(), "{m:?}");
    }
}
