//! The CLI's client of the agent's own HTTP endpoints (`status`, `flows`): hyper's client on
//! a small current-thread runtime, with a connect timeout and a deadline for the whole
//! exchange.

use std::{net::SocketAddr, time::Duration};

use http_body_util::{BodyExt, Empty};
use hyper::{body::Bytes, header, Request};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};

/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long one request may take, connecting and reading the whole answer included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a request to the agent got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("starting the client's runtime")]
    Runtime(#[source] std::io::Error),
    #[error("building the request for {0}")]
    Request(String, #[source] http::Error),
    #[error("http://{addr}{path}")]
    Send {
        addr: SocketAddr,
        path: String,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    #[error("reading the answer of http://{addr}{path}")]
    Body {
        addr: SocketAddr,
        path: String,
        #[source]
        source: hyper::Error,
    },
    #[error("http://{addr}{path}: no answer within {REQUEST_TIMEOUT:?}")]
    Timeout { addr: SocketAddr, path: String },
}

/// An answer: its status code and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

/// A GET to one of the agent's own endpoints; the answer whatever its status (a 503 of
/// /healthz says why in its body).
pub fn get(addr: SocketAddr, path: &str) -> Result<Answer, ClientError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ClientError::Runtime)?;
    runtime.block_on(async {
        tokio::time::timeout(REQUEST_TIMEOUT, fetch(addr, path))
            .await
            .unwrap_or_else(|_| {
                Err(ClientError::Timeout {
                    addr,
                    path: path.to_owned(),
                })
            })
    })
}

async fn fetch(addr: SocketAddr, path: &str) -> Result<Answer, ClientError> {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
    connector.set_nodelay(true);
    let client = Client::builder(TokioExecutor::new()).build::<_, Empty<Bytes>>(connector);
    let request = Request::get(format!("http://{addr}{path}"))
        .header(header::HOST, "lb-agent")
        .body(Empty::new())
        .map_err(|e| ClientError::Request(path.to_owned(), e))?;
    let response = client
        .request(request)
        .await
        .map_err(|source| ClientError::Send {
            addr,
            path: path.to_owned(),
            source,
        })?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|source| ClientError::Body {
            addr,
            path: path.to_owned(),
            source,
        })?
        .to_bytes();
    Ok(Answer {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_port_is_an_error_not_a_hang() {
        // A port nothing listens on (bound, then closed).
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let started = std::time::Instant::now();
        let err = get(addr, "/healthz").expect_err("refused");
        assert!(matches!(err, ClientError::Send { .. }), "{err:?}");
        assert!(started.elapsed() < REQUEST_TIMEOUT);
    }

    #[test]
    fn a_server_that_never_answers_times_out() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let err = get(addr, "/metrics").expect_err("no answer");
        assert!(matches!(err, ClientError::Timeout { .. }), "{err:?}");
        drop(listener);
    }
}
