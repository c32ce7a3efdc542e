//! The Kubernetes API as the agent's source: reflectors over Services and EndpointSlices with
//! kube-proxy's label selectors, and over this node's own Node object (its zone label).
//!
//! Each reflector lists, then watches; on a watch error, an expired resourceVersion or a lost
//! connection the watcher backs off, relists and carries on. A relist only replaces a store's
//! content once it is complete, so the stores — and with them the datapath — keep the last
//! good state while the API server is away.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    future::Future,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, SystemTime},
};

use futures::StreamExt;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{reflector, utils::Backoff, watcher, WatchStreamExt},
    Api, Client, Config, Resource,
};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;

use lb_control::source::{
    named_in, Dirty, Objects, ServiceKey, Source, LABEL_HEADLESS, LABEL_SERVICE_PROXY_NAME,
};

/// `topology.kubernetes.io/zone` of this node's Node object.
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";

/// State of one reflector.
struct Feed {
    synced: AtomicBool,
    connected: AtomicBool,
}

/// The objects of each Service a reflector has seen: candidates, checked against the store
/// when used, and made again from the store after every (re)list.
type Index<K> = Arc<Mutex<HashMap<ServiceKey, HashSet<reflector::ObjectRef<K>>>>>;

/// The API server as a `Source`: the reflectors' stores, and what their events changed.
pub struct KubeSource {
    services: reflector::Store<Service>,
    slices: reflector::Store<EndpointSlice>,
    slice_index: Index<EndpointSlice>,
    nodes: reflector::Store<Node>,
    feeds: Vec<Arc<Feed>>,
    shared: Shared,
}

/// Shared between the reflectors and the agent.
#[derive(Clone)]
struct Shared {
    /// Set by every event; taken by `take_changed`.
    changed: Arc<AtomicBool>,
    /// The Services events touched since `take_dirty`.
    dirty: Arc<Mutex<Dirty>>,
    /// `endpoints.kubernetes.io/last-change-trigger-time` of EndpointSlice changes watched
    /// since `take_triggers` (the initial lists are the starting state, not changes).
    triggers: Arc<Mutex<Vec<SystemTime>>>,
    /// Woken by every event.
    notify: Arc<Notify>,
}

/// What an object change means for translation: which Service it belongs to (None: any),
/// and, for an EndpointSlice, its change trigger time.
trait Tracked {
    fn service_key(&self) -> Option<ServiceKey>;
    /// Kept in the reflector's index by Service (EndpointSlices: a Service's slices are
    /// found without a scan; Services are found by name).
    const INDEXED: bool = false;
    fn trigger_time(&self) -> Option<SystemTime> {
        None
    }
}

impl Tracked for Service {
    fn service_key(&self) -> Option<ServiceKey> {
        Some(ServiceKey::of_service(self))
    }
}

impl Tracked for EndpointSlice {
    const INDEXED: bool = true;
    fn service_key(&self) -> Option<ServiceKey> {
        // A slice without the label belongs to no Service: nothing to translate again.
        Some(ServiceKey::of_slice(self).unwrap_or_default())
    }
    fn trigger_time(&self) -> Option<SystemTime> {
        let t = self
            .metadata
            .annotations
            .as_ref()?
            .get("endpoints.kubernetes.io/last-change-trigger-time")?;
        let ts: jiff::Timestamp = t.parse().ok()?;
        Some(SystemTime::from(ts))
    }
}

impl Tracked for Node {
    /// The node's zone feeds topology hints of every Service.
    fn service_key(&self) -> Option<ServiceKey> {
        None
    }
}

/// Why the API server source could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("reading kubeconfig {}", .path.display())]
    ReadKubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("kubeconfig {}", .path.display())]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("in-cluster configuration (KUBERNETES_SERVICE_HOST, the service-account token)")]
    InCluster(#[source] kube::config::InClusterError),
    #[error("creating the Kubernetes client")]
    Client(#[source] kube::Error),
}

async fn client(kubeconfig: Option<&Path>) -> Result<Client, StartError> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).map_err(|source| StartError::ReadKubeconfig {
                path: path.to_owned(),
                source,
            })?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|source| StartError::Kubeconfig {
                    path: path.to_owned(),
                    source,
                })?
        }
        None => Config::incluster().map_err(StartError::InCluster)?,
    };
    Client::try_from(config).map_err(StartError::Client)
}

impl KubeSource {
    /// Starts the reflectors (they list, then watch, in the background).
    pub async fn start(kubeconfig: Option<&Path>, node_name: &str) -> Result<Self, StartError> {
        let client = client(kubeconfig).await?;
        let shared = Shared {
            changed: Arc::new(AtomicBool::new(true)),
            dirty: Arc::new(Mutex::new(Dirty::everything())),
            triggers: Arc::new(Mutex::new(Vec::new())),
            notify: Arc::new(Notify::new()),
        };
        let proxy_selector = format!("!{LABEL_SERVICE_PROXY_NAME},!{LABEL_HEADLESS}");
        let mut feeds = Vec::new();
        let (services, _) = spawn_reflector(
            Api::<Service>::all(client.clone()),
            watcher::Config::default().labels(&proxy_selector),
            &shared,
            &mut feeds,
        );
        let (slices, slice_index) = spawn_reflector(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default().labels(&proxy_selector),
            &shared,
            &mut feeds,
        );
        let (nodes, _) = spawn_reflector(
            Api::<Node>::all(client),
            watcher::Config::default().fields(&format!("metadata.name={node_name}")),
            &shared,
            &mut feeds,
        );
        Ok(KubeSource {
            services,
            slices,
            slice_index,
            nodes,
            feeds,
            shared,
        })
    }

    /// Every reflector has completed its first list (kube-proxy does not sync before that).
    pub fn synced(&self) -> bool {
        self.feeds.iter().all(|f| f.synced.load(Ordering::SeqCst))
    }

    /// Whether every watch is currently connected.
    pub fn connected(&self) -> bool {
        self.feeds
            .iter()
            .all(|f| f.connected.load(Ordering::SeqCst))
    }

    /// Whether anything changed since the last call.
    pub fn take_changed(&self) -> bool {
        self.shared.changed.swap(false, Ordering::SeqCst)
    }

    /// The Services changed since the last call.
    pub fn take_dirty(&self) -> Dirty {
        self.shared
            .dirty
            .lock()
            .map_or_else(|_| Dirty::everything(), |mut d| std::mem::take(&mut *d))
    }

    /// Trigger times of the EndpointSlice changes since the last call.
    pub fn take_triggers(&self) -> Vec<SystemTime> {
        self.shared
            .triggers
            .lock()
            .map(|mut t| std::mem::take(&mut *t))
            .unwrap_or_default()
    }

    /// The named Services and their EndpointSlices.
    pub fn objects_for(&self, keys: &BTreeSet<ServiceKey>) -> Objects {
        let wanted: HashSet<(&str, &str)> = keys
            .iter()
            .map(|k| (k.namespace.as_str(), k.name.as_str()))
            .collect();
        let services = keys
            .iter()
            .filter_map(|k| {
                self.services
                    .get(&reflector::ObjectRef::new(&k.name).within(&k.namespace))
            })
            .map(|s| (*s).clone())
            .collect();
        let mut slices = Vec::new();
        match self.slice_index.lock() {
            Ok(mut index) => {
                for key in keys {
                    let Some(refs) = index.get_mut(key) else {
                        continue;
                    };
                    // Still in the store and still this Service's: used; else forgotten.
                    refs.retain(|r| match self.slices.get(r) {
                        Some(s) if ServiceKey::of_slice(&s).as_ref() == Some(key) => {
                            slices.push((*s).clone());
                            true
                        }
                        _ => false,
                    });
                }
            }
            Err(_) => slices.extend(
                self.slices
                    .state()
                    .iter()
                    .filter(|s| named_in(&s.metadata, true, &wanted))
                    .map(|s| (**s).clone()),
            ),
        }
        Objects {
            services,
            slices,
            pods: Vec::new(),
        }
    }

    pub fn objects(&self) -> Objects {
        Objects {
            services: self
                .services
                .state()
                .iter()
                .map(|s| (**s).clone())
                .collect(),
            slices: self.slices.state().iter().map(|s| (**s).clone()).collect(),
            pods: Vec::new(),
        }
    }

    /// This node's zone, from its Node object.
    pub fn zone(&self) -> Option<String> {
        self.nodes
            .state()
            .first()
            .and_then(|n| n.metadata.labels.as_ref()?.get(LABEL_ZONE).cloned())
    }
}

impl Source for KubeSource {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    fn poll(&mut self) -> bool {
        self.synced() && self.take_changed()
    }

    fn ready(&self) -> bool {
        self.synced()
    }

    fn connected(&self) -> Option<bool> {
        Some(KubeSource::connected(self))
    }

    fn objects(&self) -> Objects {
        KubeSource::objects(self)
    }

    fn objects_for(&self, keys: &BTreeSet<ServiceKey>) -> Objects {
        KubeSource::objects_for(self, keys)
    }

    fn take_dirty(&mut self) -> Dirty {
        KubeSource::take_dirty(self)
    }

    fn take_triggers(&self) -> Vec<SystemTime> {
        KubeSource::take_triggers(self)
    }

    fn zone(&self) -> Option<String> {
        KubeSource::zone(self)
    }

    fn wait(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(self.shared.notify.notified())
    }
}

/// Retry delays after a watch or list error: 200 ms doubling to 5 s, with ±20 % jitter, back
/// to the start after a success. client-go starts at 800 ms and ends at 30 s, which spares a
/// struggling API server but leaves the datapath up to half a minute behind once it is back;
/// with three watches per node, 5 s is still gentle.
struct RetryBackoff {
    next: Duration,
}

impl RetryBackoff {
    const FIRST: Duration = Duration::from_millis(200);
    const MAX: Duration = Duration::from_secs(5);

    fn new() -> Self {
        RetryBackoff { next: Self::FIRST }
    }
}

impl Iterator for RetryBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let base = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        // Jitter from the clock's low bits: retries of many nodes do not line up.
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let factor = 0.8 + 0.4 * f64::from(nanos % 1000) / 1000.0;
        Some(base.mul_f64(factor))
    }
}

impl Backoff for RetryBackoff {
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

fn spawn_reflector<K>(
    api: Api<K>,
    config: watcher::Config,
    shared: &Shared,
    feeds: &mut Vec<Arc<Feed>>,
) -> (reflector::Store<K>, Index<K>)
where
    K: Resource<DynamicType = ()>
        + Tracked
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let index: Index<K> = Arc::default();
    let idx = index.clone();
    let listed = store.clone();
    let feed = Arc::new(Feed {
        synced: AtomicBool::new(false),
        connected: AtomicBool::new(false),
    });
    feeds.push(feed.clone());
    let kind = K::kind(&()).into_owned();
    let Shared {
        changed,
        dirty,
        triggers,
        notify,
    } = shared.clone();
    tokio::spawn(async move {
        let stream = reflector(writer, watcher(api, config).backoff(RetryBackoff::new()));
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::Init) => {}
                Ok(watcher::Event::InitApply(obj)) => {
                    feed.connected.store(true, Ordering::SeqCst);
                    note(&idx, &obj, true);
                }
                Ok(watcher::Event::InitDone) => {
                    if !feed.synced.swap(true, Ordering::SeqCst) {
                        tracing::info!(%kind, "initial list done");
                    }
                    feed.connected.store(true, Ordering::SeqCst);
                    // The store now holds the new list whole (objects listed earlier were
                    // buffered until now, and a use of the index may have forgotten them):
                    // the index is made again from it.
                    reindex(&idx, &listed);
                    // A relist may have replaced anything.
                    if let Ok(mut d) = dirty.lock() {
                        d.all = true;
                    }
                    changed.store(true, Ordering::SeqCst);
                    notify.notify_one();
                }
                Ok(ev @ (watcher::Event::Apply(_) | watcher::Event::Delete(_))) => {
                    let (obj, present) = match ev {
                        watcher::Event::Apply(obj) => (obj, true),
                        watcher::Event::Delete(obj) => (obj, false),
                        _ => continue,
                    };
                    feed.connected.store(true, Ordering::SeqCst);
                    // Indexed before the Service is marked, so its pass finds the object.
                    note(&idx, &obj, present);
                    if let Ok(mut d) = dirty.lock() {
                        match obj.service_key() {
                            Some(k) => {
                                d.services.insert(k);
                            }
                            None => d.all = true,
                        }
                    }
                    if let (Some(t), Ok(mut tr)) = (obj.trigger_time(), triggers.lock()) {
                        tr.push(t);
                    }
                    changed.store(true, Ordering::SeqCst);
                    notify.notify_one();
                }
                Err(e) => {
                    if feed.connected.swap(false, Ordering::SeqCst) {
                        tracing::warn!(%kind, error = %e, "watch failed; backing off, then relisting (the datapath keeps its state)");
                    } else {
                        tracing::debug!(%kind, error = %e, "watch still failing");
                    }
                }
            }
        }
    });
    (store, index)
}

/// Makes `index` hold exactly the objects of `store`.
fn reindex<K>(index: &Index<K>, store: &reflector::Store<K>)
where
    K: Resource<DynamicType = ()> + Tracked + Clone,
{
    if !K::INDEXED {
        return;
    }
    let Ok(mut index) = index.lock() else {
        return;
    };
    index.clear();
    for obj in store.state() {
        if let Some(key) = obj.service_key() {
            index
                .entry(key)
                .or_default()
                .insert(reflector::ObjectRef::from_obj(&*obj));
        }
    }
}

/// Records (or forgets) an object under its Service in `index`.
fn note<K>(index: &Index<K>, obj: &K, present: bool)
where
    K: Resource<DynamicType = ()> + Tracked,
{
    if !K::INDEXED {
        return;
    }
    let Some(key) = obj.service_key() else {
        return;
    };
    let Ok(mut index) = index.lock() else {
        return;
    };
    let r = reflector::ObjectRef::from_obj(obj);
    if present {
        index.entry(key).or_default().insert(r);
    } else if let Some(refs) = index.get_mut(&key) {
        refs.remove(&r);
        if refs.is_empty() {
            index.remove(&key);
        }
    }
}
