//! The CLI's client of the agent's own HTTP endpoints (`status`, `flows`).

use std::{net::SocketAddr, time::Duration};

/// A GET to one of the agent's own endpoints (for the CLI commands); the body, or None when
/// the agent does not answer.
pub fn get(addr: SocketAddr, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    // Written in pieces on purpose: the server must read a request whatever its segments.
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: lb-agent\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
}
