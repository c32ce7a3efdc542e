//! Where the Kubernetes objects come from: a `Source` delivers the Services, EndpointSlices
//! (and, from manifests, Pods) that translation works from, and says which Services changed.
//! Two implement it: the manifests in a folder (`manifests`, standalone mode) and the API
//! server (`lb_userspace::source::kube`, which needs the Kubernetes client).

pub mod manifests;
pub mod validate;

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    fmt,
    future::Future,
    pin::Pin,
    time::SystemTime,
};

use k8s_openapi::{
    api::{
        core::v1::{Pod, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

/// The label that names an EndpointSlice's Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Objects with this label belong to another proxy (kube-proxy skips them).
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Headless Services (kube-proxy skips them).
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";

/// A source of objects, polled by the agent's loop.
pub trait Source: Send {
    /// What the source is, for `/metrics` and `status` ("manifests", "kubernetes").
    fn name(&self) -> &'static str;
    /// Takes in what changed; returns whether the objects changed.
    fn poll(&mut self) -> bool;
    /// Whether the objects are complete enough to program from: kube-proxy does not sync
    /// before its informers have listed, and neither does the agent (an empty store would
    /// wipe a taken-over datapath).
    fn ready(&self) -> bool;
    /// Whether every watch is connected (None: the source has no connection).
    fn connected(&self) -> Option<bool> {
        None
    }
    /// Every object.
    fn objects(&self) -> Objects;
    /// The named Services with their EndpointSlices (and every Pod, where there are Pods).
    fn objects_for(&self, keys: &BTreeSet<ServiceKey>) -> Objects;
    /// The Services changed since the last call.
    fn take_dirty(&mut self) -> Dirty;
    /// Trigger times of the EndpointSlice changes since the last call (for the network
    /// programming latency).
    fn take_triggers(&self) -> Vec<SystemTime> {
        Vec::new()
    }
    /// The changes to Services and to endpoints received since the last call, counted as
    /// kube-proxy counts them (`kubeproxy_sync_proxy_rules_{service,endpoint}_changes_*`).
    fn take_changes(&mut self) -> Changes {
        Changes::default()
    }
    /// Whether this node may take traffic, as kube-proxy's /healthz says it: false when its
    /// Node object is being deleted or carries the `ToBeDeletedByClusterAutoscaler` taint.
    /// True where the source knows no Node.
    fn node_eligible(&self) -> bool {
        true
    }
    /// This node's `topology.kubernetes.io/zone`, where the source knows the Node.
    fn zone(&self) -> Option<String> {
        None
    }
    /// This node's addresses as its Node object's status gives them, at most one per family,
    /// the primary family first (empty where the source knows no Node).
    fn node_addresses(&self) -> Vec<std::net::IpAddr> {
        Vec::new()
    }
    /// Resolves when the source has news; never for a source that is only polled.
    fn wait(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(std::future::pending())
    }
}

/// The objects translation works from.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
    pub pods: Vec<Pod>,
}

impl Objects {
    pub fn extend(&mut self, other: &Objects) {
        self.services.extend(other.services.iter().cloned());
        self.slices.extend(other.slices.iter().cloned());
        self.pods.extend(other.pods.iter().cloned());
    }
}

/// A Service's namespace and name.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    pub namespace: String,
    pub name: String,
}

impl ServiceKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ServiceKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// A Service's own key.
    pub fn of_service(svc: &Service) -> ServiceKey {
        ServiceKey::new(
            namespace(&svc.metadata),
            svc.metadata.name.clone().unwrap_or_default(),
        )
    }

    /// The Service an EndpointSlice belongs to (its `kubernetes.io/service-name` label).
    pub fn of_slice(slice: &EndpointSlice) -> Option<ServiceKey> {
        let svc = slice.metadata.labels.as_ref()?.get(LABEL_SERVICE_NAME)?;
        Some(ServiceKey::new(namespace(&slice.metadata), svc.clone()))
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// An object's namespace ("default" when unset, as the API server fills it in).
pub fn namespace(meta: &ObjectMeta) -> String {
    meta.namespace.clone().unwrap_or_else(|| "default".into())
}

/// Whether an object (by its metadata) is, or belongs to, one of the Services `keys`
/// (given as borrowed namespace and name), without allocating: a Service by its own name, an
/// EndpointSlice by its `kubernetes.io/service-name` label.
pub fn named_in<S: std::hash::BuildHasher>(
    meta: &ObjectMeta,
    slice: bool,
    keys: &HashSet<(&str, &str), S>,
) -> bool {
    let ns = meta.namespace.as_deref().unwrap_or("default");
    let name = if slice {
        meta.labels
            .as_ref()
            .and_then(|l| l.get(LABEL_SERVICE_NAME))
            .map(String::as_str)
    } else {
        meta.name.as_deref()
    };
    name.is_some_and(|n| keys.contains(&(ns, n)))
}

/// Object changes a source received: each add, update or delete of a Service is a service
/// change, of an EndpointSlice (from manifests: of a Pod too, which stands for its endpoints)
/// an endpoint change, as kube-proxy counts them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Changes {
    pub services: u64,
    pub endpoints: u64,
}

impl Changes {
    /// The objects that differ between two versions of the same objects (added, removed or
    /// changed; matched by namespace and name), as the API server would have reported them.
    pub fn between(old: &Objects, new: &Objects) -> Changes {
        fn differing<T: PartialEq>(old: &[T], new: &[T], meta: impl Fn(&T) -> &ObjectMeta) -> u64 {
            let key = |t: &T| {
                let m = meta(t);
                (namespace(m), m.name.clone().unwrap_or_default())
            };
            let old: HashMap<_, &T> = old.iter().map(|t| (key(t), t)).collect();
            let new: HashMap<_, &T> = new.iter().map(|t| (key(t), t)).collect();
            let changed = new
                .iter()
                .filter(|(k, n)| old.get(*k).is_none_or(|o| o != *n))
                .count();
            let removed = old.keys().filter(|k| !new.contains_key(*k)).count();
            (changed + removed) as u64
        }
        Changes {
            services: differing(&old.services, &new.services, |s| &s.metadata),
            endpoints: differing(&old.slices, &new.slices, |s| &s.metadata)
                + differing(&old.pods, &new.pods, |p| &p.metadata),
        }
    }

    pub fn add(&mut self, other: Changes) {
        self.services += other.services;
        self.endpoints += other.endpoints;
    }
}

/// What changed in a source since it was last asked: some Services (by key), or anything.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Dirty {
    /// Translate everything again (a relist, Pods that Services select, the node).
    pub all: bool,
    pub services: BTreeSet<ServiceKey>,
}

impl Dirty {
    /// Everything must be translated again.
    pub fn everything() -> Dirty {
        Dirty {
            all: true,
            ..Default::default()
        }
    }

    pub fn is_empty(&self) -> bool {
        !self.all && self.services.is_empty()
    }

    /// Notes the Services that objects belong to; Pods may be selected by any Service.
    pub fn note(&mut self, objects: &Objects) {
        for s in &objects.services {
            self.services.insert(ServiceKey::of_service(s));
        }
        // A slice of no Service is ignored by translation.
        self.services
            .extend(objects.slices.iter().filter_map(ServiceKey::of_slice));
        if !objects.pods.is_empty() {
            self.all = true;
        }
    }

    pub fn merge(&mut self, other: Dirty) {
        self.all |= other.all;
        self.services.extend(other.services);
    }
}

/// Where each Service's objects are in one `Objects`: the positions of the Service and of
/// its EndpointSlices, so that the objects of a changed Service are found without a scan.
#[derive(Clone, Debug, Default)]
pub struct ServiceIndex {
    by: HashMap<ServiceKey, (Vec<usize>, Vec<usize>)>,
}

impl ServiceIndex {
    pub fn of(objects: &Objects) -> ServiceIndex {
        let mut by: HashMap<ServiceKey, (Vec<usize>, Vec<usize>)> = HashMap::new();
        for (i, svc) in objects.services.iter().enumerate() {
            by.entry(ServiceKey::of_service(svc)).or_default().0.push(i);
        }
        for (i, slice) in objects.slices.iter().enumerate() {
            if let Some(k) = ServiceKey::of_slice(slice) {
                by.entry(k).or_default().1.push(i);
            }
        }
        ServiceIndex { by }
    }

    /// Adds the named Services and their EndpointSlices out of `objects` (the objects this
    /// index was made of) to `out`.
    pub fn pick(&self, objects: &Objects, keys: &BTreeSet<ServiceKey>, out: &mut Objects) {
        for key in keys {
            let Some((services, slices)) = self.by.get(key) else {
                continue;
            };
            out.services.extend(
                services
                    .iter()
                    .filter_map(|i| objects.services.get(*i))
                    .cloned(),
            );
            out.slices.extend(
                slices
                    .iter()
                    .filter_map(|i| objects.slices.get(*i))
                    .cloned(),
            );
        }
    }
}
