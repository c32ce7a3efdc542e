//! The Kubernetes API as the agent's source: reflectors over Services and EndpointSlices with
//! kube-proxy's label selectors, and over this node's own Node object (its zone label, and
//! whether it is being deleted, for /healthz).
//!
//! Each reflector lists, then watches; on a watch error, an expired resourceVersion or a lost
//! connection the watcher backs off, relists and carries on. A relist only replaces a store's
//! content once it is complete, so the stores — and with them the datapath — keep the last
//! good state while the API server is away.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    future::Future,
    net::IpAddr,
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
    named_in, Changes, Dirty, Objects, ServiceKey, Source, LABEL_HEADLESS, LABEL_SERVICE_PROXY_NAME,
};

/// `topology.kubernetes.io/zone` of this node's Node object.
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";
/// The taint the cluster autoscaler puts on a node it is about to delete; kube-proxy's
/// /healthz then says the node is not eligible (`proxy_health.go`).
pub const TAINT_TO_BE_DELETED: &str = "ToBeDeletedByClusterAutoscaler";
/// The EndpointSlice annotation the network programming latency is measured from.
pub const ANNOTATION_TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

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
    /// since `take_triggers`, by Service (see `observed_trigger`).
    triggers: Arc<Mutex<Vec<(ServiceKey, SystemTime)>>>,
    /// Service and EndpointSlice events since `take_changes`.
    changes: Arc<Mutex<Changes>>,
    /// This node's eligibility, from the last state of its Node object seen (true before).
    node_eligible: Arc<AtomicBool>,
    /// When the source started: trigger times before it are not the agent's to measure.
    started: SystemTime,
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
    /// Counts one event of this kind (kube-proxy's service and endpoint changes).
    fn count(_changes: &mut Changes) {}
    /// Whether this node is eligible, for this node's Node object.
    fn node_eligible(&self) -> Option<bool> {
        None
    }
}

impl Tracked for Service {
    fn service_key(&self) -> Option<ServiceKey> {
        Some(ServiceKey::of_service(self))
    }
    fn count(changes: &mut Changes) {
        changes.services += 1;
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
            .get(ANNOTATION_TRIGGER_TIME)?;
        let ts: jiff::Timestamp = t.parse().ok()?;
        Some(SystemTime::from(ts))
    }
    fn count(changes: &mut Changes) {
        changes.endpoints += 1;
    }
}

impl Tracked for Node {
    /// The node's zone feeds topology hints of every Service.
    fn service_key(&self) -> Option<ServiceKey> {
        None
    }
    fn node_eligible(&self) -> Option<bool> {
        Some(node_eligible(self))
    }
}

/// kube-proxy's node eligibility (`proxy_health.go` `SyncNode`): not being deleted, and not
/// tainted `ToBeDeletedByClusterAutoscaler`.
pub fn node_eligible(node: &Node) -> bool {
    let tainted = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == TAINT_TO_BE_DELETED));
    node.metadata.deletion_timestamp.is_none() && !tainted
}

/// The node's host IPs from its status addresses, as kubelet and kube-proxy take them
/// (`GetNodeHostIPs`): the first InternalIP, else ExternalIP, of each family, the family of
/// the first one first.
pub fn node_host_ips(node: &Node) -> Vec<IpAddr> {
    let listed: Vec<(&str, IpAddr)> = node
        .status
        .iter()
        .flat_map(|s| s.addresses.iter().flatten())
        .filter_map(|a| Some((a.type_.as_str(), a.address.trim().parse().ok()?)))
        .collect();
    let mut out: Vec<IpAddr> = Vec::new();
    for kind in ["InternalIP", "ExternalIP"] {
        for (_, a) in listed.iter().filter(|(t, _)| *t == kind) {
            if !out.iter().any(|o| o.is_ipv6() == a.is_ipv6()) {
                out.push(*a);
            }
        }
    }
    out
}

/// The trigger time of a watched change to measure, as kube-proxy measures it
/// (`endpointslicecache.go`): not for a deletion (its annotation tells the last update, not
/// the deletion), and only from after the source started (older ones were not observed).
fn observed_trigger(
    trigger: Option<SystemTime>,
    deleted: bool,
    started: SystemTime,
) -> Option<SystemTime> {
    trigger.filter(|t| !deleted && *t > started)
}

/// The service account's folder in a pod: `token`, `ca.crt` (what in-cluster clients read).
const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Where the agent finds the API server and the credentials it presents.
#[derive(Debug, Clone, Copy)]
pub enum ApiAccess<'a> {
    /// A kubeconfig file: the server, CA and user of its current context.
    Kubeconfig(&'a Path),
    /// In a pod: the service account's token and CA, and the API server at
    /// `KUBERNETES_SERVICE_HOST:KUBERNETES_SERVICE_PORT` (the `kubernetes` Service) or, when
    /// given, at its own address (`--api-server`).
    InCluster(Option<&'a ApiServerAddr>),
}

/// The API server's own address (`--api-server`), reached over HTTPS: `HOST:PORT`, or
/// `https://HOST:PORT` (`https://HOST`: port 443). HOST is an IPv4 address, an IPv6 address in
/// brackets or a DNS name; the API server's certificate must name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiServerAddr {
    /// IPv6 addresses without their brackets.
    host: String,
    port: u16,
    url: http::Uri,
}

/// Why an `--api-server` value is refused.
#[derive(Debug, thiserror::Error)]
pub enum BadApiServer {
    #[error("empty")]
    Empty,
    #[error("{0}:// is not accepted: the API server is reached over https")]
    Scheme(String),
    #[error("expected HOST:PORT or https://HOST:PORT, nothing more")]
    Extra,
    #[error("no port: expected HOST:PORT (or https://HOST for port 443)")]
    NoPort,
    #[error("port {0:?}: expected 1-65535")]
    Port(String),
    #[error("host {0:?}: neither an IP address nor a DNS name")]
    Host(String),
    #[error("{0:?}: an IPv6 address is written in brackets, [ADDRESS]:PORT")]
    Ipv6Brackets(String),
    #[error("not a valid URL")]
    Url(#[source] http::uri::InvalidUri),
}

impl ApiServerAddr {
    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `https://HOST:PORT`.
    pub fn url(&self) -> &http::Uri {
        &self.url
    }
}

impl std::fmt::Display for ApiServerAddr {
    /// `HOST:PORT` (`[ADDRESS]:PORT` for IPv6).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl std::str::FromStr for ApiServerAddr {
    type Err = BadApiServer;

    fn from_str(s: &str) -> Result<Self, BadApiServer> {
        let s = s.trim();
        let (rest, https) = match s.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("https") => (rest, true),
            Some((scheme, _)) => return Err(BadApiServer::Scheme(scheme.to_owned())),
            None => (s, false),
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.is_empty() {
            return Err(BadApiServer::Empty);
        }
        if authority.contains(['/', '?', '#', '@']) || authority.contains(char::is_whitespace) {
            return Err(BadApiServer::Extra);
        }
        let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
            let (ip, tail) = bracketed
                .split_once(']')
                .ok_or_else(|| BadApiServer::Host(authority.to_owned()))?;
            let ip: std::net::Ipv6Addr =
                ip.parse().map_err(|_| BadApiServer::Host(ip.to_owned()))?;
            let port = match tail {
                "" => None,
                t => Some(t.strip_prefix(':').ok_or(BadApiServer::Extra)?),
            };
            (ip.to_string(), port)
        } else {
            let (host, port) = match authority.rsplit_once(':') {
                Some((h, _)) if h.contains(':') => {
                    return Err(BadApiServer::Ipv6Brackets(authority.to_owned()))
                }
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            };
            if host.parse::<std::net::Ipv4Addr>().is_err() && !is_dns_name(host) {
                return Err(BadApiServer::Host(host.to_owned()));
            }
            (host.to_owned(), port)
        };
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| BadApiServer::Port(p.to_owned()))?,
            None if https => 443,
            None => return Err(BadApiServer::NoPort),
        };
        let mut addr = ApiServerAddr {
            host,
            port,
            url: http::Uri::default(),
        };
        addr.url = format!("https://{addr}")
            .parse()
            .map_err(BadApiServer::Url)?;
        Ok(addr)
    }
}

/// A DNS name as a certificate names a host: dot-separated labels of letters, digits and
/// inner hyphens, 1 to 63 characters each, 253 in all, the last not all digits (that would
/// be a mistyped IPv4 address).
fn is_dns_name(s: &str) -> bool {
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    s.len() <= 253
        && s.split('.').all(label_ok)
        && !s
            .rsplit('.')
            .next()
            .is_some_and(|last| last.bytes().all(|b| b.is_ascii_digit()))
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
    #[error(
        "in-cluster configuration (KUBERNETES_SERVICE_HOST/PORT, the service account's files; \
         --api-server gives the API server's address instead)"
    )]
    InCluster(#[source] kube::config::InClusterError),
    #[error("reading the service account's {}", .path.display())]
    ServiceAccountFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the service account's CA bundle {}", .path.display())]
    ServiceAccountCa {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("creating the Kubernetes client")]
    Client(#[source] kube::Error),
}

/// In-cluster configuration (the service account's token and CA, as `Config::incluster`
/// reads them) with the API server at `api` instead of `KUBERNETES_SERVICE_HOST`, which is
/// neither read nor needed.
fn incluster_at(api: &ApiServerAddr) -> Result<Config, StartError> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let dir = Path::new(SERVICE_ACCOUNT_DIR);
    let ca_path = dir.join("ca.crt");
    let token_path = dir.join("token");
    let pem = std::fs::read(&ca_path).map_err(|source| StartError::ServiceAccountFile {
        path: ca_path.clone(),
        source,
    })?;
    let ca = CertificateDer::pem_slice_iter(&pem)
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .and_then(|certs| {
            if certs.is_empty() {
                Err(rustls::pki_types::pem::Error::NoItemsFound)
            } else {
                Ok(certs)
            }
        })
        .map_err(|source| StartError::ServiceAccountCa {
            path: ca_path.clone(),
            source,
        })?;
    // The client reads the token before requests (it is rotated); a missing one is reported
    // now rather than as a failing watch.
    std::fs::metadata(&token_path).map_err(|source| StartError::ServiceAccountFile {
        path: token_path.clone(),
        source,
    })?;
    let mut config = Config::new(api.url().clone());
    config.root_cert = Some(ca);
    // Read again from time to time, as with `Config::incluster`, to follow a CA rotation.
    config.root_cert_file = Some(ca_path);
    config.auth_info.token_file = Some(token_path.to_string_lossy().into_owned());
    Ok(config)
}

async fn client(access: ApiAccess<'_>) -> Result<Client, StartError> {
    let config = match access {
        ApiAccess::Kubeconfig(path) => {
            let kc = Kubeconfig::read_from(path).map_err(|source| StartError::ReadKubeconfig {
                path: path.to_owned(),
                source,
            })?;
            let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|source| StartError::Kubeconfig {
                    path: path.to_owned(),
                    source,
                })?;
            tracing::info!(api_server = %config.cluster_url, kubeconfig = %path.display(), "API server");
            config
        }
        ApiAccess::InCluster(None) => {
            let config = Config::incluster().map_err(StartError::InCluster)?;
            // The `kubernetes` Service's ClusterIP: on a cluster without kube-proxy nothing
            // serves it before this agent has programmed it.
            tracing::info!(
                api_server = %config.cluster_url,
                "API server from KUBERNETES_SERVICE_HOST/PORT (without kube-proxy, give its \
                 own address with --api-server), with the service account"
            );
            config
        }
        ApiAccess::InCluster(Some(api)) => {
            let config = incluster_at(api)?;
            tracing::info!(api_server = %config.cluster_url, "API server from --api-server, with the service account");
            config
        }
    };
    Client::try_from(config).map_err(StartError::Client)
}

impl KubeSource {
    /// Starts the reflectors (they list, then watch, in the background).
    pub async fn start(access: ApiAccess<'_>, node_name: &str) -> Result<Self, StartError> {
        let client = client(access).await?;
        let shared = Shared {
            changed: Arc::new(AtomicBool::new(true)),
            dirty: Arc::new(Mutex::new(Dirty::everything())),
            triggers: Arc::new(Mutex::new(Vec::new())),
            changes: Arc::default(),
            node_eligible: Arc::new(AtomicBool::new(true)),
            started: SystemTime::now(),
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
            .map(|mut t| {
                std::mem::take(&mut *t)
                    .into_iter()
                    .map(|(_, t)| t)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Service and EndpointSlice events since the last call.
    pub fn take_changes(&self) -> Changes {
        self.shared
            .changes
            .lock()
            .map(|mut c| std::mem::take(&mut *c))
            .unwrap_or_default()
    }

    /// Whether this node is eligible (kube-proxy's `nodeEligible`), from its Node object.
    pub fn node_eligible(&self) -> bool {
        self.shared.node_eligible.load(Ordering::SeqCst)
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

    /// This node's host IPs, from its Node object's status.
    pub fn node_addresses(&self) -> Vec<IpAddr> {
        self.nodes
            .state()
            .first()
            .map(|n| node_host_ips(n))
            .unwrap_or_default()
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

    fn take_changes(&mut self) -> Changes {
        KubeSource::take_changes(self)
    }

    fn node_eligible(&self) -> bool {
        KubeSource::node_eligible(self)
    }

    fn zone(&self) -> Option<String> {
        KubeSource::zone(self)
    }

    fn node_addresses(&self) -> Vec<IpAddr> {
        KubeSource::node_addresses(self)
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
        changes,
        node_eligible,
        started,
        notify,
    } = shared.clone();
    // Every event of the kind is a change (kube-proxy counts its informers' adds, updates and
    // deletes, those of a list included); a Node's tells whether this node is eligible.
    let observe = move |obj: &K| {
        if let Ok(mut c) = changes.lock() {
            K::count(&mut c);
        }
        if let Some(e) = obj.node_eligible() {
            if node_eligible.swap(e, Ordering::SeqCst) != e {
                tracing::info!(eligible = e, "this node's eligibility (deletion, ToBeDeletedByClusterAutoscaler taint) changed");
            }
        }
    };
    tokio::spawn(async move {
        let stream = reflector(writer, watcher(api, config).backoff(RetryBackoff::new()));
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::Init) => {}
                Ok(watcher::Event::InitApply(obj)) => {
                    feed.connected.store(true, Ordering::SeqCst);
                    note(&idx, &obj, true);
                    observe(&obj);
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
                    observe(&obj);
                    let key = obj.service_key();
                    if let Ok(mut d) = dirty.lock() {
                        match &key {
                            Some(k) => {
                                d.services.insert(k.clone());
                            }
                            None => d.all = true,
                        }
                    }
                    if let (Some(key), Ok(mut tr)) = (key, triggers.lock()) {
                        // A deleted slice takes its Service's pending trigger times with it,
                        // as in kube-proxy.
                        if !present {
                            tr.retain(|(k, _)| *k != key);
                        }
                        if let Some(t) = observed_trigger(obj.trigger_time(), !present, started) {
                            tr.push((key, t));
                        }
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn node(json: serde_json::Value) -> Node {
        serde_json::from_value(json).expect("a Node")
    }

    #[test]
    fn a_node_being_deleted_or_tainted_for_deletion_is_not_eligible() {
        let plain = serde_json::json!({"metadata": {"name": "n"}});
        assert!(node_eligible(&node(plain)));
        let other_taint = serde_json::json!({"metadata": {"name": "n"},
            "spec": {"taints": [{"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}]}});
        assert!(node_eligible(&node(other_taint)));
        let tainted = serde_json::json!({"metadata": {"name": "n"},
            "spec": {"taints": [{"key": TAINT_TO_BE_DELETED, "value": "1700000000", "effect": "NoSchedule"}]}});
        assert!(!node_eligible(&node(tainted)));
        let deleting = serde_json::json!({"metadata": {"name": "n",
            "deletionTimestamp": "2024-01-01T00:00:00Z", "finalizers": ["x"]}});
        assert!(!node_eligible(&node(deleting)));
    }

    #[test]
    fn node_host_ips_one_per_family_internal_first() {
        let ips = |addresses: serde_json::Value| -> Vec<String> {
            node_host_ips(&node(serde_json::json!({"metadata": {"name": "n"},
                "status": {"addresses": addresses}})))
            .iter()
            .map(ToString::to_string)
            .collect()
        };
        assert_eq!(
            ips(serde_json::json!([
                {"type": "Hostname", "address": "n"},
                {"type": "ExternalIP", "address": "203.0.113.5"},
                {"type": "InternalIP", "address": "fc00:f853:ccd:e793::2"},
                {"type": "InternalIP", "address": "172.18.0.2"},
                {"type": "InternalIP", "address": "172.18.0.3"},
                {"type": "ExternalIP", "address": "2001:db8::5"},
            ])),
            vec!["fc00:f853:ccd:e793::2", "172.18.0.2"],
            "InternalIPs first, the first of each family, in their order"
        );
        assert_eq!(
            ips(serde_json::json!([
                {"type": "InternalIP", "address": "172.18.0.2"},
                {"type": "ExternalIP", "address": "2001:db8::5"},
                {"type": "InternalIP", "address": "not an address"},
            ])),
            vec!["172.18.0.2", "2001:db8::5"],
            "an ExternalIP when a family has no InternalIP"
        );
        assert!(ips(serde_json::json!([])).is_empty());
    }

    #[test]
    fn trigger_times_of_deletions_and_from_before_the_start_are_not_measured() {
        let started = SystemTime::now();
        let after = started + Duration::from_secs(1);
        let before = started - Duration::from_secs(1);
        assert_eq!(observed_trigger(Some(after), false, started), Some(after));
        assert_eq!(observed_trigger(Some(after), true, started), None);
        assert_eq!(observed_trigger(Some(before), false, started), None);
        assert_eq!(observed_trigger(None, false, started), None);
    }

    fn parse(s: &str) -> Result<ApiServerAddr, BadApiServer> {
        s.parse()
    }

    #[test]
    fn api_server_addresses_accepted() {
        for (given, host, port, url) in [
            (
                "kind-control-plane:6443",
                "kind-control-plane",
                6443,
                "https://kind-control-plane:6443/",
            ),
            (
                "https://kind-control-plane:6443",
                "kind-control-plane",
                6443,
                "https://kind-control-plane:6443/",
            ),
            (
                "HTTPS://cp.example.com:6443/",
                "cp.example.com",
                6443,
                "https://cp.example.com:6443/",
            ),
            (
                "https://cp.example.com",
                "cp.example.com",
                443,
                "https://cp.example.com:443/",
            ),
            (
                " 172.18.0.2:6443 ",
                "172.18.0.2",
                6443,
                "https://172.18.0.2:6443/",
            ),
            ("https://10.0.0.1", "10.0.0.1", 443, "https://10.0.0.1:443/"),
            ("[fd00::1]:6443", "fd00::1", 6443, "https://[fd00::1]:6443/"),
            (
                "https://[fd00:0::2]",
                "fd00::2",
                443,
                "https://[fd00::2]:443/",
            ),
            ("localhost:1", "localhost", 1, "https://localhost:1/"),
        ] {
            let a = parse(given).unwrap_or_else(|e| panic!("{given:?}: {e}"));
            assert_eq!((a.host(), a.port()), (host, port), "{given:?}");
            assert_eq!(a.url().to_string(), url, "{given:?}");
        }
        assert_eq!(
            parse("[fd00::1]:6443")
                .map(|a| a.to_string())
                .ok()
                .as_deref(),
            Some("[fd00::1]:6443")
        );
        assert_eq!(
            parse("https://h:6443")
                .map(|a| a.to_string())
                .ok()
                .as_deref(),
            Some("h:6443")
        );
    }

    #[test]
    fn api_server_addresses_refused() {
        for (given, why) in [
            ("", "empty"),
            ("https://", "empty"),
            ("kind-control-plane", "no port"),
            ("10.0.0.1", "no port"),
            ("http://10.0.0.1:6443", "http://"),
            ("tcp://10.0.0.1:6443", "tcp://"),
            ("https://10.0.0.1:6443/api", "nothing more"),
            ("https://user@10.0.0.1:6443", "nothing more"),
            ("10.0.0.1:6443?x", "nothing more"),
            ("10.0.0.1:", "port"),
            ("10.0.0.1:0", "port"),
            ("10.0.0.1:65536", "port"),
            ("10.0.0.1:https", "port"),
            (":6443", "host"),
            ("10.0.0.256:6443", "host"),
            ("under_score:6443", "host"),
            ("-lead.example:6443", "host"),
            ("a..b:6443", "host"),
            ("fd00::1:6443", "brackets"),
            ("[fd00::1", "host"),
            ("[not-v6]:6443", "host"),
            ("[fd00::1]6443", "nothing more"),
        ] {
            match parse(given) {
                Ok(a) => panic!("{given:?} accepted as {a}"),
                Err(e) => assert!(e.to_string().contains(why), "{given:?}: {e}"),
            }
        }
    }
}
