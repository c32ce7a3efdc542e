//! A lab pod's servers: HTTP on a TCP port and an echo service on a UDP port, both answering
//! with the pod's name and the client address they saw, so tests and the demo can tell which
//! backend served a request and whether the client address was kept.
//!
//! Usage: lab-server NAME TCP_PORT UDP_PORT
// Harness code: a lab that cannot be built panics with a message, arguments are passed as
// the call sites read best, and floats are compared exactly where they were parsed.
#![allow(
    clippy::needless_pass_by_value,
    clippy::missing_panics_doc,
    clippy::float_cmp,
    clippy::unused_self
)]

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

fn serve_http(mut sock: TcpStream, name: &str) {
    let peer = sock.peer_addr().map(|p| p.to_string()).unwrap_or_default();
    let _ = sock.set_read_timeout(Some(Duration::from_secs(5)));
    let mut buf = [0u8; 4096];
    let mut req = Vec::new();
    // Serve requests on the connection until the client closes it.
    loop {
        match sock.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
        while let Some(end) = req.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&req[..end]).to_ascii_lowercase();
            req.drain(..end + 4);
            let body = format!("{name} {peer}\n");
            let close = head.contains("connection: close");
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{}\r\n{body}",
                body.len(),
                if close { "Connection: close\r\n" } else { "" }
            );
            if sock.write_all(resp.as_bytes()).is_err() || close {
                return;
            }
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: lab-server NAME TCP_PORT UDP_PORT");
        std::process::exit(2);
    }
    let name = args[1].clone();
    let (Ok(tcp_port), Ok(udp_port)) = (args[2].parse::<u16>(), args[3].parse::<u16>()) else {
        eprintln!("lab-server: ports must be numbers");
        std::process::exit(2);
    };
    let tcp = TcpListener::bind(("0.0.0.0", tcp_port)).unwrap_or_else(|e| {
        eprintln!("lab-server: tcp bind {tcp_port}: {e}");
        std::process::exit(1)
    });
    let udp = UdpSocket::bind(("0.0.0.0", udp_port)).unwrap_or_else(|e| {
        eprintln!("lab-server: udp bind {udp_port}: {e}");
        std::process::exit(1)
    });
    let udp_name = name.clone();
    thread::spawn(move || {
        let mut buf = [0u8; 2048];
        loop {
            if let Ok((_, peer)) = udp.recv_from(&mut buf) {
                let _ = udp.send_to(format!("{udp_name} {peer}\n").as_bytes(), peer);
            }
        }
    });
    // A pool of workers, each accepting and serving one connection at a time: no thread is
    // started per connection, so a connection costs the server little more than the
    // kernel's work and benchmarks see the datapath's cost rather than the server's. When
    // the last idle worker takes a connection it starts another, so one always accepts (the
    // pool grows to the most connections ever open at once).
    let listener = Arc::new(tcp);
    let idle = Arc::new(AtomicUsize::new(0));
    for _ in 0..WORKERS {
        spawn_worker(&listener, &name, &idle);
    }
    loop {
        thread::park();
    }
}

/// Workers started up front.
const WORKERS: usize = 8;

fn spawn_worker(listener: &Arc<TcpListener>, name: &str, idle: &Arc<AtomicUsize>) {
    idle.fetch_add(1, Ordering::SeqCst);
    let (listener, name, idle) = (listener.clone(), name.to_string(), idle.clone());
    thread::spawn(move || loop {
        let Ok((sock, _)) = listener.accept() else {
            continue;
        };
        if idle.fetch_sub(1, Ordering::SeqCst) == 1 {
            spawn_worker(&listener, &name, &idle);
        }
        serve_http(sock, &name);
        idle.fetch_add(1, Ordering::SeqCst);
    });
}
