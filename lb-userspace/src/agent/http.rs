//! The agent's HTTP endpoints, served by hyper (HTTP/1.1, keep-alive, concurrent
//! connections): on the healthz address kube-proxy's `/healthz` and `/livez` only; on the
//! metrics address `/metrics` (Prometheus), `/proxyMode` (kube-proxy answers its mode there;
//! this is `ebpf`), `/healthz` (`ok` while the process answers, as kube-proxy's metrics server)
//! and `/debug/frontends` (for `lb-agent flows`). GET and HEAD; other methods get 405, other
//! paths 404; health check node ports answer any method, as kube-proxy's. A client that does not send its request head within
//! `HEADER_READ_TIMEOUT` is disconnected, and holds up nothing meanwhile.

use std::{convert::Infallible, future::Future, sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{
    body::{Bytes, Incoming},
    header::{self, HeaderValue},
    server::conn::http1,
    service::service_fn,
    Method, Request, Response, StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use super::{
    metrics::{Metrics, CONTENT_TYPE as METRICS_CONTENT_TYPE},
    state::{Probe, SharedState},
};

/// How long a client has to send a request's head (the first, or the next on a kept-alive
/// connection) before the connection is closed.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest request head read (hyper's minimum); a larger one gets 431.
const MAX_HEAD: usize = 8192;
/// What `/proxyMode` answers: kube-proxy answers its mode (`iptables`, `ipvs`, `nftables`).
pub const PROXY_MODE: &str = "ebpf";

/// A response body: whole, in memory.
pub type Body = Full<Bytes>;

/// A response with `code`, `Content-Type: content_type` and `body`; JSON ones also carry
/// `X-Content-Type-Options: nosniff`, as kube-proxy's do.
pub fn response(code: u16, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

fn not_found() -> Response<Body> {
    response(404, "text/plain; charset=utf-8", "404 page not found\n")
}

/// None for GET and HEAD; 405 with `Allow` for anything else.
pub fn refuse_method(req: &Request<Incoming>) -> Option<Response<Body>> {
    if matches!(*req.method(), Method::GET | Method::HEAD) {
        return None;
    }
    let mut r = response(405, "text/plain; charset=utf-8", "405 method not allowed\n");
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    Some(r)
}

/// Serves connections from `listener`, each request answered by `handler`, until the task is
/// dropped.
pub async fn serve<H, F>(listener: TcpListener, handler: H)
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    loop {
        let (sock, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let answer = handler(req);
                async move { Ok::<_, Infallible>(answer.await) }
            });
            let served = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(MAX_HEAD)
                // As Go's net/http (kube-proxy's) writes them.
                .title_case_headers(true)
                .serve_connection(TokioIo::new(sock), service)
                .await;
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "HTTP connection closed on an error");
            }
        });
    }
}

/// Which of the agent's addresses a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoints {
    /// `--healthz-addr`: `/healthz`, `/livez`.
    Health,
    /// `--metrics-addr`: `/metrics`, `/proxyMode`, `/healthz` (`ok`), `/debug/frontends`.
    Metrics,
}

/// Reads the datapath's counters into the metrics, before each scrape.
pub type Refresh = Arc<dyn Fn(&Metrics) + Send + Sync>;

/// Serves `which` on `listener` until the task is dropped.
pub async fn serve_agent(
    listener: TcpListener,
    which: Endpoints,
    status: SharedState,
    refresh: Refresh,
) {
    serve(listener, move |req| {
        answer(which, req, status.clone(), refresh.clone())
    })
    .await;
}

async fn answer(
    which: Endpoints,
    req: Request<Incoming>,
    status: SharedState,
    refresh: Refresh,
) -> Response<Body> {
    let path = req.uri().path();
    let known = match which {
        Endpoints::Health => matches!(path, "/healthz" | "/livez"),
        Endpoints::Metrics => matches!(
            path,
            "/metrics" | "/proxyMode" | "/debug/frontends" | "/healthz"
        ),
    };
    if !known {
        return not_found();
    }
    if let Some(refused) = refuse_method(&req) {
        return refused;
    }
    match path {
        // kube-proxy's metrics server has the generic health handler: the process answers.
        "/healthz" if which == Endpoints::Metrics => {
            response(200, "text/plain; charset=utf-8", "ok")
        }
        "/healthz" | "/livez" => {
            let probe = if path == "/healthz" {
                Probe::Healthz
            } else {
                Probe::Livez
            };
            let (code, body) = status.probe(probe);
            response(code, "application/json", body)
        }
        "/metrics" => {
            // Reading the counters is system calls over every map entry: off the workers
            // that answer health probes.
            let scraped =
                tokio::task::spawn_blocking(move || status.scrape(refresh.as_ref())).await;
            match scraped {
                Ok(text) => response(200, METRICS_CONTENT_TYPE, text),
                Err(e) => {
                    tracing::error!(error = %e, "rendering the metrics failed");
                    response(500, "text/plain; charset=utf-8", "metrics unavailable\n")
                }
            }
        }
        "/proxyMode" => response(200, "text/plain; charset=utf-8", PROXY_MODE),
        _ => {
            let list = {
                let s = status.lock();
                serde_json::to_string(&s.frontends.values().collect::<Vec<_>>())
            };
            match list {
                Ok(json) => response(200, "application/json", json),
                Err(e) => response(500, "text/plain; charset=utf-8", format!("{e}\n")),
            }
        }
    }
}
