//! The agent's HTTP endpoints: kube-proxy's `/healthz` and `/livez` (port 10256 by default)
//! and Prometheus `/metrics` (port 10249 by default). A deliberately small HTTP/1.1 server:
//! one request per connection, GET only.

use std::{sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use super::state::{health_response, SharedState};

/// Reads a request's head (up to the blank line, at most 8 KiB, within 5 s). Reading it whole
/// matters: closing a socket with unread bytes makes the kernel answer with a reset, which
/// the client sees instead of the response.
pub(super) async fn read_head(sock: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout_at(deadline, sock.read(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 || head.len() + n > 8192 {
            return None;
        }
        head.extend_from_slice(&buf[..n]);
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

async fn handle(mut sock: TcpStream, status: SharedState, refresh: Arc<dyn Fn() + Send + Sync>) {
    let Some(req) = read_head(&mut sock).await else {
        return;
    };
    let path = req
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("/")
        .split('?')
        .next()
        .unwrap_or("/")
        .to_owned();
    if path == "/metrics" {
        refresh();
    }
    let (code, ctype, body) = {
        let s = status.lock();
        match path.as_str() {
            "/healthz" => {
                let (c, b) = health_response(&s, true);
                (c, "application/json", b)
            }
            "/livez" => {
                let (c, b) = health_response(&s, false);
                (c, "application/json", b)
            }
            "/metrics" => (200, "text/plain; version=0.0.4", s.metrics()),
            "/debug/frontends" => {
                let list: Vec<_> = s.frontends.values().collect();
                (
                    200,
                    "application/json",
                    serde_json::to_string(&list).unwrap_or_default(),
                )
            }
            _ => (404, "text/plain", "404 page not found\n".to_owned()),
        }
    };
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        _ => "Service Unavailable",
    };
    let resp = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nX-Content-Type-Options: nosniff\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = sock.write_all(resp.as_bytes()).await;
    let _ = sock.shutdown().await;
}

/// Serves on `listener` until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    status: SharedState,
    refresh: Arc<dyn Fn() + Send + Sync>,
) {
    loop {
        match listener.accept().await {
            Ok((sock, _)) => {
                tokio::spawn(handle(sock, status.clone(), refresh.clone()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
