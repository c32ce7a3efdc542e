//! An API server double: the Kubernetes REST list/watch protocol over plain HTTP for the
//! kinds the agent reads (Services, EndpointSlices, Nodes), so the agent can be tested
//! against "a cluster" through an ordinary kubeconfig. No kube-apiserver can be installed on
//! these machines.
//!
//! What it speaks: lists with `metadata.resourceVersion`, `labelSelector` (`k`, `!k`, `k=v`,
//! `k!=v`) and `fieldSelector` (`metadata.name`, `metadata.namespace`), `limit`/`continue`;
//! watches (`watch=1`) as chunked streams of ADDED / MODIFIED / DELETED events from the
//! requested resourceVersion on, BOOKMARKs when asked for, an ERROR event with a 410 Status for
//! a resourceVersion older than the last compaction, `timeoutSeconds`; an object that starts
//! or stops matching a watch's label selector arrives as ADDED or DELETED, as from the real
//! server. What a test controls: objects (apply, delete), compaction, dropping every open
//! connection, and taking the server away and back.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Condvar, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    fn of(kind: &str) -> Option<Kind> {
        match kind {
            "Service" => Some(Kind::Service),
            "EndpointSlice" => Some(Kind::EndpointSlice),
            "Node" => Some(Kind::Node),
            _ => None,
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            _ => "v1",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }

    fn namespaced(self) -> bool {
        self != Kind::Node
    }
}

type Key = (Kind, String, String);

/// A client connection: plain TCP or TLS over it.
trait Conn: Read + Write + Send {
    /// Cuts the connection (no clean end of the stream).
    fn cut(&mut self);
}

impl Conn for TcpStream {
    fn cut(&mut self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
}

impl Conn for rustls::StreamOwned<rustls::ServerConnection, TcpStream> {
    fn cut(&mut self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }
}

struct Event {
    rv: u64,
    kind: Kind,
    old: Option<Value>,
    new: Option<Value>,
}

#[derive(Default)]
struct State {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    events: Vec<Event>,
    /// Watches from a resourceVersion at or below this get 410 Gone.
    compacted: u64,
    /// Bumped to end every open watch.
    generation: u64,
    requests: Vec<String>,
    /// The Authorization header of each request (empty when absent).
    authorizations: Vec<String>,
}

struct Shared {
    tls: Option<Arc<rustls::ServerConfig>>,
    state: Mutex<State>,
    changed: Condvar,
    up: AtomicBool,
    stop: AtomicBool,
    /// Milliseconds every list answer waits (a slow API server).
    list_delay_ms: std::sync::atomic::AtomicU64,
}

/// The double. Dropping it stops the server.
pub struct ApiServer {
    shared: Arc<Shared>,
    pub addr: SocketAddr,
    thread: Option<thread::JoinHandle<()>>,
}

impl ApiServer {
    /// Listens on 127.0.0.1 in network namespace `netns` (None: the test's own), over HTTP.
    pub fn start(netns: Option<&str>) -> Result<ApiServer> {
        Self::start_with(netns, None)
    }

    /// The same over HTTPS, with a certificate for 127.0.0.1 and `localhost` from a CA made
    /// for the occasion; returns the CA (PEM) clients must trust, as in a pod's
    /// service-account `ca.crt`.
    pub fn start_tls(netns: Option<&str>) -> Result<(ApiServer, String)> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "lb api double CA");
        let ca_key = KeyPair::generate()?;
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca, ca_key);
        let leaf = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])?;
        let leaf_key = KeyPair::generate()?;
        let leaf_cert = leaf.signed_by(&leaf_key, &issuer)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf_cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
            )?;
        let api = Self::start_with(netns, Some(Arc::new(config)))?;
        Ok((api, ca_cert.pem()))
    }

    fn start_with(
        netns: Option<&str>,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Result<ApiServer> {
        let shared = Arc::new(Shared {
            tls,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            up: AtomicBool::new(true),
            stop: AtomicBool::new(false),
            list_delay_ms: std::sync::atomic::AtomicU64::new(0),
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let s = shared.clone();
        let ns = netns.map(str::to_owned);
        let thread = thread::spawn(move || {
            if let Some(ns) = ns {
                if let Err(e) = crate::lab::enter_netns(&ns) {
                    let _ = tx.send(Err(anyhow!("entering {ns}: {e}")));
                    return;
                }
            }
            let listener = match TcpListener::bind("127.0.0.1:0") {
                Ok(l) => l,
                Err(e) => {
                    let _ = tx.send(Err(e.into()));
                    return;
                }
            };
            let addr = listener.local_addr().map_err(anyhow::Error::from);
            let _ = tx.send(addr);
            accept_loop(listener, s);
        });
        let addr = rx
            .recv()
            .map_err(|_| anyhow!("the API server thread died"))??;
        Ok(ApiServer {
            shared,
            addr,
            thread: Some(thread),
        })
    }

    /// A kubeconfig that points at the double.
    pub fn kubeconfig(&self) -> String {
        format!(
            r#"apiVersion: v1
kind: Config
clusters:
- name: double
  cluster: {{server: "http://{}"}}
users:
- name: agent
  user: {{token: not-checked}}
contexts:
- name: double
  context: {{cluster: double, user: agent}}
current-context: double
"#,
            self.addr
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Creates or replaces every object of a YAML stream (like `kubectl apply`).
    pub fn apply_yaml(&self, yaml: &str) -> Result<()> {
        use serde::Deserialize;
        for doc in serde_yaml::Deserializer::from_str(yaml) {
            let v = serde_yaml::Value::deserialize(doc)?;
            if v.is_null() {
                continue;
            }
            self.apply(serde_json::to_value(v)?)?;
        }
        Ok(())
    }

    pub fn apply(&self, mut obj: Value) -> Result<()> {
        let kind = obj["kind"]
            .as_str()
            .and_then(Kind::of)
            .ok_or_else(|| anyhow!("unsupported kind in {obj}"))?;
        let name = obj["metadata"]["name"]
            .as_str()
            .ok_or_else(|| anyhow!("no metadata.name"))?
            .to_string();
        let ns = if kind.namespaced() {
            let ns = obj["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string();
            obj["metadata"]["namespace"] = json!(ns);
            ns
        } else {
            String::new()
        };
        let mut st = self.lock();
        st.rv += 1;
        let rv = st.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        if obj["metadata"]["uid"].is_null() {
            obj["metadata"]["uid"] = json!(format!("uid-{}-{ns}-{name}", kind.name()));
        }
        let old = st.objects.insert((kind, ns, name), obj.clone());
        st.events.push(Event {
            rv,
            kind,
            old,
            new: Some(obj),
        });
        drop(st);
        self.shared.changed.notify_all();
        Ok(())
    }

    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> Result<()> {
        let ns = if kind.namespaced() { namespace } else { "" };
        let mut st = self.lock();
        let Some(mut old) = st.objects.remove(&(kind, ns.to_string(), name.to_string())) else {
            bail!("no {kind:?} {ns}/{name}");
        };
        st.rv += 1;
        let rv = st.rv;
        old["metadata"]["resourceVersion"] = json!(rv.to_string());
        st.events.push(Event {
            rv,
            kind,
            old: Some(old.clone()),
            new: None,
        });
        drop(st);
        self.shared.changed.notify_all();
        Ok(())
    }

    /// Forgets the event history: every watch from an older resourceVersion gets 410 Gone.
    pub fn compact(&self) {
        let mut st = self.lock();
        st.compacted = st.rv;
        st.events.clear();
    }

    /// Ends every open watch stream (as when the API server or a load balancer restarts).
    pub fn drop_connections(&self) {
        self.lock().generation += 1;
        self.shared.changed.notify_all();
    }

    /// Takes the server away (connections refused, open streams cut) or brings it back.
    pub fn set_up(&self, up: bool) {
        self.shared.up.store(up, Ordering::SeqCst);
        if !up {
            self.drop_connections();
        }
    }

    /// Makes every list wait this long before it answers.
    pub fn set_list_delay(&self, delay: Duration) {
        self.shared
            .list_delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// The Authorization header of every request so far.
    pub fn authorizations(&self) -> Vec<String> {
        self.lock().authorizations.clone()
    }

    /// Request lines served so far (method and path with query).
    pub fn requests(&self) -> Vec<String> {
        self.lock().requests.clone()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.drop_connections();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let addr = listener.local_addr().ok();
    let mut listener = Some(listener);
    while !shared.stop.load(Ordering::SeqCst) {
        let up = shared.up.load(Ordering::SeqCst);
        match (&listener, up) {
            (Some(_), false) => listener = None, // closed: connections are refused
            (None, true) => {
                listener = addr.and_then(|a| TcpListener::bind(a).ok());
                if listener.is_none() {
                    thread::sleep(Duration::from_millis(50));
                }
                continue;
            }
            _ => {}
        }
        let Some(l) = &listener else {
            thread::sleep(Duration::from_millis(20));
            continue;
        };
        let _ = l.set_nonblocking(true);
        match l.accept() {
            Ok((sock, _)) => {
                let s = shared.clone();
                thread::spawn(move || {
                    let _ = sock.set_nonblocking(false);
                    let conn: Box<dyn Conn> = match &s.tls {
                        Some(cfg) => match rustls::ServerConnection::new(cfg.clone()) {
                            Ok(c) => Box::new(rustls::StreamOwned::new(c, sock)),
                            Err(_) => return,
                        },
                        None => Box::new(sock),
                    };
                    if let Err(e) = serve(conn, &s) {
                        eprintln!("api double: {e:#}");
                    }
                });
            }
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
    }
}

struct Request {
    path: String,
    query: BTreeMap<String, String>,
    authorization: String,
}

fn read_request(sock: &mut dyn Conn) -> Result<Option<Request>> {
    let mut reader = BufReader::new(sock);
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut content_length = 0usize;
    let mut authorization = String::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                content_length = v.trim().parse().unwrap_or(0);
            }
            if k.eq_ignore_ascii_case("authorization") {
                authorization = v.trim().to_string();
            }
        }
    }
    let mut body = vec![0u8; content_length];
    reader.read_exact(&mut body)?;
    let target = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let (path, q) = target.split_once('?').unwrap_or((&target, ""));
    let query = q
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect();
    Ok(Some(Request {
        path: path.to_string(),
        query,
        authorization,
    }))
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(v) => out.push(v),
                    Err(_) => out.extend_from_slice(&b[i..i + 3]),
                }
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Which objects a request is about.
struct Target {
    kind: Kind,
    namespace: Option<String>,
    name: Option<String>,
}

fn route(path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (kind_seg, rest): (&str, &[&str]) = match parts.as_slice() {
        ["api", "v1", rest @ ..] => ("core", rest),
        ["apis", "discovery.k8s.io", "v1", rest @ ..] => ("discovery", rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] => (Some(ns.to_string()), rest),
        _ => (None, rest),
    };
    let (resource, name) = match rest {
        [r] => (*r, None),
        [r, n] => (*r, Some(n.to_string())),
        _ => return None,
    };
    let kind = match (kind_seg, resource) {
        ("core", "services") => Kind::Service,
        ("core", "nodes") => Kind::Node,
        ("discovery", "endpointslices") => Kind::EndpointSlice,
        _ => return None,
    };
    Some(Target {
        kind,
        namespace,
        name,
    })
}

/// A label or field selector: all terms must hold.
struct Selector {
    labels: Vec<(String, Option<String>, bool)>,
    fields: Vec<(String, String)>,
}

impl Selector {
    fn parse(q: &BTreeMap<String, String>) -> Selector {
        let mut labels = Vec::new();
        for term in q.get("labelSelector").map_or("", String::as_str).split(',') {
            let term = term.trim();
            if term.is_empty() {
                continue;
            }
            if let Some(k) = term.strip_prefix('!') {
                labels.push((k.to_string(), None, false));
            } else if let Some((k, v)) = term.split_once("!=") {
                labels.push((k.to_string(), Some(v.to_string()), false));
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                labels.push((k.to_string(), Some(v.to_string()), true));
            } else {
                labels.push((term.to_string(), None, true));
            }
        }
        let fields = q
            .get("fieldSelector")
            .map_or("", String::as_str)
            .split(',')
            .filter_map(|t| t.split_once('='))
            .map(|(k, v)| (k.trim_end_matches('=').to_string(), v.to_string()))
            .collect();
        Selector { labels, fields }
    }

    fn matches(&self, obj: &Value) -> bool {
        let labels = &obj["metadata"]["labels"];
        let label_ok = self.labels.iter().all(|(k, v, positive)| {
            let have = labels.get(k).and_then(|x| x.as_str());
            match (v, positive) {
                (None, true) => have.is_some(),
                (None, false) => have.is_none(),
                (Some(v), true) => have == Some(v.as_str()),
                (Some(v), false) => have != Some(v.as_str()),
            }
        });
        let field_ok = self.fields.iter().all(|(k, v)| match k.as_str() {
            "metadata.name" => obj["metadata"]["name"].as_str() == Some(v),
            "metadata.namespace" => obj["metadata"]["namespace"].as_str() == Some(v),
            _ => true,
        });
        label_ok && field_ok
    }
}

fn in_scope(t: &Target, obj: &Value) -> bool {
    t.namespace
        .as_deref()
        .is_none_or(|ns| obj["metadata"]["namespace"].as_str() == Some(ns))
}

fn respond(sock: &mut dyn Conn, code: u16, body: &Value) -> Result<()> {
    let text = body.to_string();
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        410 => "Gone",
        _ => "Error",
    };
    write!(
        sock,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    )?;
    sock.flush()?;
    Ok(())
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn serve(mut conn: Box<dyn Conn>, shared: &Shared) -> Result<()> {
    let sock = conn.as_mut();
    let Some(req) = read_request(sock)? else {
        return Ok(());
    };
    {
        let mut st = shared
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let q: Vec<String> = req.query.iter().map(|(k, v)| format!("{k}={v}")).collect();
        st.requests
            .push(format!("GET {}?{}", req.path, q.join("&")));
        st.authorizations.push(req.authorization.clone());
    }
    let Some(target) = route(&req.path) else {
        return respond(sock, 404, &status(404, "NotFound", "no such resource"));
    };
    let watch = matches!(
        req.query.get("watch").map(String::as_str),
        Some("1" | "true")
    );
    if watch {
        return watch_stream(sock, shared, &target, &req.query);
    }
    let mut st = shared
        .state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(name) = &target.name {
        let key = (
            target.kind,
            target.namespace.clone().unwrap_or_default(),
            name.clone(),
        );
        return if let Some(obj) = st.objects.get(&key) {
            let obj = obj.clone();
            drop(st);
            respond(sock, 200, &obj)
        } else {
            drop(st);
            respond(sock, 404, &status(404, "NotFound", "not found"))
        };
    }
    let delay = shared.list_delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        drop(st);
        thread::sleep(Duration::from_millis(delay));
        st = shared
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
    }
    let sel = Selector::parse(&req.query);
    let all: Vec<Value> = st
        .objects
        .iter()
        .filter(|((k, _, _), o)| *k == target.kind && in_scope(&target, o) && sel.matches(o))
        .map(|(_, o)| o.clone())
        .collect();
    let rv = st.rv;
    drop(st);
    // Pages: `continue` is "<rv>:<offset>".
    let offset = req
        .query
        .get("continue")
        .and_then(|c| c.split_once(':'))
        .and_then(|(_, o)| o.parse::<usize>().ok())
        .unwrap_or(0);
    let limit = req
        .query
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let end = offset.saturating_add(limit).min(all.len());
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if end < all.len() {
        meta["continue"] = json!(format!("{rv}:{end}"));
    }
    let list = json!({
        "kind": format!("{}List", target.kind.name()),
        "apiVersion": target.kind.api_version(),
        "metadata": meta,
        "items": all.get(offset.min(all.len())..end).unwrap_or(&[]),
    });
    respond(sock, 200, &list)
}

fn chunk(sock: &mut dyn Conn, v: &Value) -> std::io::Result<()> {
    let line = format!("{v}\n");
    write!(sock, "{:x}\r\n{line}\r\n", line.len())?;
    sock.flush()
}

fn watch_stream(
    sock: &mut dyn Conn,
    shared: &Shared,
    target: &Target,
    q: &BTreeMap<String, String>,
) -> Result<()> {
    let sel = Selector::parse(q);
    let bookmarks = q.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .unwrap_or(300);
    let deadline = Instant::now() + Duration::from_secs(timeout);
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    write!(
        sock,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )?;
    let mut st = shared
        .state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let generation = st.generation;
    if from != 0 && from < st.compacted {
        drop(st);
        let gone = status(410, "Expired", &format!("too old resource version: {from}"));
        chunk(sock, &json!({"type": "ERROR", "object": gone}))?;
        write!(sock, "0\r\n\r\n")?;
        sock.flush()?;
        return Ok(());
    }
    // resourceVersion 0 or absent: start with the current state, as ADDED events.
    let mut sent = if from == 0 {
        let current: Vec<Value> = st
            .objects
            .iter()
            .filter(|((k, _, _), o)| *k == target.kind && in_scope(target, o) && sel.matches(o))
            .map(|(_, o)| o.clone())
            .collect();
        let rv = st.rv;
        drop(st);
        for o in current {
            chunk(sock, &json!({"type": "ADDED", "object": o}))?;
        }
        st = shared
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        rv
    } else {
        from
    };
    let mut last_bookmark = Instant::now();
    loop {
        if st.generation != generation
            || shared.stop.load(Ordering::SeqCst)
            || !shared.up.load(Ordering::SeqCst)
        {
            // Cut, not closed cleanly: no final chunk.
            sock.cut();
            return Ok(());
        }
        let mut out = Vec::new();
        for ev in st
            .events
            .iter()
            .filter(|e| e.rv > sent && e.kind == target.kind)
        {
            let was = ev
                .old
                .as_ref()
                .is_some_and(|o| in_scope(target, o) && sel.matches(o));
            let is = ev
                .new
                .as_ref()
                .is_some_and(|o| in_scope(target, o) && sel.matches(o));
            let (kind, obj) = match (was, is, &ev.new) {
                (false, true, Some(n)) => ("ADDED", n.clone()),
                (true, true, Some(n)) => ("MODIFIED", n.clone()),
                (true, false, Some(n)) => ("DELETED", n.clone()),
                (true, false, None) => ("DELETED", ev.old.clone().unwrap_or_default()),
                _ => continue,
            };
            out.push(json!({"type": kind, "object": obj}));
        }
        if let Some(last) = st.events.last() {
            sent = sent.max(last.rv);
        }
        sent = sent.max(st.rv);
        let rv = st.rv;
        drop(st);
        for e in out {
            chunk(sock, &e)?;
        }
        if Instant::now() >= deadline {
            write!(sock, "0\r\n\r\n")?;
            sock.flush()?;
            return Ok(());
        }
        if bookmarks && last_bookmark.elapsed() >= Duration::from_secs(1) {
            let bm = json!({"type": "BOOKMARK", "object": {
                "kind": target.kind.name(), "apiVersion": target.kind.api_version(),
                "metadata": {"resourceVersion": rv.to_string()}}});
            chunk(sock, &bm)?;
            last_bookmark = Instant::now();
        }
        st = shared
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (guard, _) = shared
            .changed
            .wait_timeout(st, Duration::from_millis(200))
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        st = guard;
    }
}

/// Waits until `f` holds for the double's request log (e.g. a watch was opened).
pub fn wait_requests(
    api: &ApiServer,
    timeout: Duration,
    f: impl Fn(&[String]) -> bool,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f(&api.requests()) {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(20));
    }
    Err(anyhow!("timed out")).context(format!("requests: {:?}", api.requests()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(api: &ApiServer, path: &str) -> (String, Value) {
        let mut s = TcpStream::connect(api.addr).expect("connect");
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("read");
        let (head, body) = text.split_once("\r\n\r\n").expect("headers");
        let status = head.lines().next().unwrap_or_default().to_string();
        (status, serde_json::from_str(body).expect("json body"))
    }

    /// Opens a watch and returns a reader of its events (one JSON object per line).
    fn watch(api: &ApiServer, path: &str) -> BufReader<TcpStream> {
        let mut s = TcpStream::connect(api.addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(3)))
            .expect("timeout");
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
        let mut r = BufReader::new(s);
        let mut line = String::new();
        while r.read_line(&mut line).expect("header") > 2 {
            line.clear();
        }
        r
    }

    fn next_event(r: &mut BufReader<TcpStream>) -> Option<Value> {
        // Chunked: a size line, then the data line (our events are single lines).
        let mut size = String::new();
        r.read_line(&mut size).ok()?;
        if size.trim() == "0" || size.is_empty() {
            return None;
        }
        let mut data = String::new();
        r.read_line(&mut data).ok()?;
        let mut crlf = String::new();
        r.read_line(&mut crlf).ok()?;
        serde_json::from_str(&data).ok()
    }

    const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: ns}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n";

    #[test]
    fn lists_filter_by_label_and_field_selectors_and_carry_a_resource_version() {
        let api = ApiServer::start(None).expect("start");
        api.apply_yaml(SVC).expect("a");
        api.apply_yaml(&SVC.replace(
            "name: a,",
            "name: b, labels: {service.kubernetes.io/headless: ''},",
        ))
        .expect("b");
        let (status, list) = get(
            &api,
            "/api/v1/services?labelSelector=%21service.kubernetes.io%2Fheadless",
        );
        assert!(status.contains("200"), "{status}");
        assert_eq!(list["kind"], "ServiceList");
        assert_eq!(list["metadata"]["resourceVersion"], "2");
        let names: Vec<&str> = list["items"]
            .as_array()
            .expect("items")
            .iter()
            .filter_map(|i| i["metadata"]["name"].as_str())
            .collect();
        assert_eq!(names, vec!["a"]);
        let (_, list) = get(
            &api,
            "/api/v1/namespaces/ns/services?fieldSelector=metadata.name%3Db",
        );
        assert_eq!(list["items"].as_array().map(Vec::len), Some(1));
        let (_, page) = get(&api, "/api/v1/services?limit=1");
        assert_eq!(page["items"].as_array().map(Vec::len), Some(1));
        let cont = page["metadata"]["continue"]
            .as_str()
            .expect("continue")
            .to_string();
        let (_, rest) = get(&api, &format!("/api/v1/services?limit=1&continue={cont}"));
        assert_eq!(rest["items"][0]["metadata"]["name"], "b");
        let (status, _) = get(&api, "/api/v1/namespaces/ns/services/zzz");
        assert!(status.contains("404"), "{status}");
    }

    #[test]
    fn watches_stream_changes_selector_transitions_and_bookmarks() {
        let api = ApiServer::start(None).expect("start");
        api.apply_yaml(SVC).expect("a");
        let mut w = watch(
            &api,
            "/api/v1/services?watch=true&resourceVersion=1&allowWatchBookmarks=true&labelSelector=%21x",
        );
        api.apply_yaml(&SVC.replace(
            "clusterIP: 10.96.0.1",
            "clusterIP: 10.96.0.1, type: ClusterIP",
        ))
        .expect("modify");
        let e = next_event(&mut w).expect("event");
        assert_eq!(
            (
                e["type"].as_str(),
                e["object"]["metadata"]["resourceVersion"].as_str()
            ),
            (Some("MODIFIED"), Some("2"))
        );
        // Gains the label the watch excludes: DELETED; loses it: ADDED.
        api.apply_yaml(&SVC.replace("name: a,", "name: a, labels: {x: y},"))
            .expect("label");
        assert_eq!(next_event(&mut w).expect("event")["type"], "DELETED");
        api.apply_yaml(SVC).expect("unlabel");
        assert_eq!(next_event(&mut w).expect("event")["type"], "ADDED");
        // Quiet for over a second: a bookmark with the current resourceVersion.
        let e = next_event(&mut w).expect("bookmark");
        assert_eq!(e["type"], "BOOKMARK");
        assert_eq!(e["object"]["metadata"]["resourceVersion"], "4");
        // Dropped connections end the stream.
        api.drop_connections();
        let mut rest = Vec::new();
        while let Some(e) = next_event(&mut w) {
            rest.push(e);
        }
        assert!(rest.iter().all(|e| e["type"] == "BOOKMARK"), "{rest:?}");
    }

    #[test]
    fn a_compacted_resource_version_gets_410_gone() {
        let api = ApiServer::start(None).expect("start");
        api.apply_yaml(SVC).expect("a");
        api.apply_yaml(SVC).expect("a again");
        api.compact();
        let mut w = watch(&api, "/api/v1/services?watch=true&resourceVersion=1");
        let e = next_event(&mut w).expect("error event");
        assert_eq!(e["type"], "ERROR");
        assert_eq!(e["object"]["code"], 410);
        assert_eq!(e["object"]["reason"], "Expired");
        // From the current resourceVersion, a watch works.
        let mut w = watch(&api, "/api/v1/services?watch=true&resourceVersion=2");
        api.delete(Kind::Service, "ns", "a").expect("delete");
        assert_eq!(next_event(&mut w).expect("event")["type"], "DELETED");
    }
}
