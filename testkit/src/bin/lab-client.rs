//! A lab client that reports what the socket saw: for TCP the address `getpeername()` gives
//! for the connected socket and the first line of an HTTP answer, for UDP the source address
//! `recvfrom()` gives for the reply and the reply. With the servers of `lab-server` the reply
//! names the backend pod and the client address it saw, so one line tells where a request
//! went, with which source address, and what the client believes it talked to.
//!
//! Usage: lab-client tcp|udp ADDR:PORT [--bind IP] [--timeout-ms N]
//! (and `udp-echo`, `udp-stream`, `upload`: see their functions)
//!
//! Every mode takes an IPv4 `ADDR:PORT` or an IPv6 `[ADDR]:PORT` destination, and `--bind` an
//! address of the same family; addresses are printed in the same forms.
//!
//! Prints `peer=ADDR:PORT reply=LINE` and exits 0; on failure prints the reason to stderr and
//! exits 3 (timed out), 4 (refused), 5 (unreachable) or 1 (anything else); 2 on bad usage.
// Harness code: a lab that cannot be built panics with a message, arguments are passed as
// the call sites read best, and floats are compared exactly where they were parsed.
#![allow(
    clippy::needless_pass_by_value,
    clippy::missing_panics_doc,
    clippy::float_cmp,
    clippy::unused_self
)]

use std::{
    io::{ErrorKind, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    os::fd::FromRawFd,
    process::exit,
    time::Duration,
};

use lb_testkit::netns::sockaddr;

const USAGE: &str = "usage: lab-client tcp|udp|udp-echo|udp-stream|upload ADDR:PORT [--bind IP] \
                     [--timeout-ms N] [--size BYTES] [--count N]";

fn fail(what: &str, e: std::io::Error) -> ! {
    eprintln!("lab-client: {what}: {e}");
    let code = match e.kind() {
        ErrorKind::TimedOut | ErrorKind::WouldBlock => 3,
        ErrorKind::ConnectionRefused => 4,
        ErrorKind::NetworkUnreachable | ErrorKind::HostUnreachable => 5,
        // A blocking connect(2) that runs out of SO_SNDTIMEO says EINPROGRESS.
        _ if e.raw_os_error() == Some(libc::EINPROGRESS) => 3,
        _ => 1,
    };
    exit(code)
}

fn check(r: libc::c_int) -> std::io::Result<()> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A TCP connection to `to` from `bind` (any address when unspecified; of `to`'s family),
/// given up after `timeout`. std cannot bind a socket before connecting it, hence the
/// system calls.
fn tcp_connect(to: SocketAddr, bind: IpAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let family = if to.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket calls on a descriptor this function owns; on success the
    // descriptor is handed to TcpStream, which closes it; on failure it is closed here.
    unsafe {
        let fd = libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        check(fd)?;
        let stream = TcpStream::from_raw_fd(fd);
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: libc::suseconds_t::from(timeout.subsec_micros()),
        };
        check(libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&raw const tv).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        ))?;
        if !bind.is_unspecified() {
            let (local, len) = sockaddr(SocketAddr::new(bind, 0));
            check(libc::bind(fd, (&raw const local).cast(), len))?;
        }
        let (remote, len) = sockaddr(to);
        check(libc::connect(fd, (&raw const remote).cast(), len))?;
        Ok(stream)
    }
}

/// One HTTP request on a new connection: (getpeername, first line of the body).
fn tcp(to: SocketAddr, bind: IpAddr, timeout: Duration) -> (SocketAddr, String) {
    let mut s = tcp_connect(to, bind, timeout).unwrap_or_else(|e| fail("connect", e));
    let peer = s.peer_addr().unwrap_or_else(|e| fail("getpeername", e));
    s.set_read_timeout(Some(timeout))
        .unwrap_or_else(|e| fail("timeout", e));
    s.write_all(b"GET / HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n")
        .unwrap_or_else(|e| fail("send", e));
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)
        .unwrap_or_else(|e| fail("receive", e));
    let resp = String::from_utf8_lossy(&resp);
    let Some((_, body)) = resp.split_once("\r\n\r\n") else {
        fail(
            "receive",
            std::io::Error::other(format!("not HTTP: {resp:?}")),
        )
    };
    (peer, body.lines().next().unwrap_or_default().to_string())
}

/// One datagram on a connected socket: (recvfrom's source, the reply).
fn udp(to: SocketAddr, bind: IpAddr, timeout: Duration) -> (SocketAddr, String) {
    let s = UdpSocket::bind((bind, 0)).unwrap_or_else(|e| fail("bind", e));
    // Connected, as resolvers do: an ICMP port-unreachable then shows as "refused".
    s.connect(to).unwrap_or_else(|e| fail("connect", e));
    s.set_read_timeout(Some(timeout))
        .unwrap_or_else(|e| fail("timeout", e));
    s.send(b"q").unwrap_or_else(|e| fail("send", e));
    let mut buf = [0u8; 2048];
    let (n, from) = s.recv_from(&mut buf).unwrap_or_else(|e| fail("receive", e));
    let reply = String::from_utf8_lossy(&buf[..n]);
    (from, reply.lines().next().unwrap_or_default().to_string())
}

/// `count` datagrams of `size` bytes (`echo:` and a pattern) on one connected socket, each
/// waited for: how many came back whole. The socket is connected, as resolvers' are, so an
/// untranslated answer is not taken.
fn udp_echo(to: SocketAddr, bind: IpAddr, timeout: Duration, size: usize, count: usize) -> usize {
    let s = UdpSocket::bind((bind, 0)).unwrap_or_else(|e| fail("bind", e));
    s.connect(to).unwrap_or_else(|e| fail("connect", e));
    s.set_read_timeout(Some(timeout))
        .unwrap_or_else(|e| fail("timeout", e));
    let mut whole = 0;
    let mut buf = vec![0u8; 65536];
    for i in 0..count {
        let mut msg = b"echo:".to_vec();
        msg.extend((0..size.saturating_sub(5)).map(|j| (j * 31 + i) as u8));
        s.send(&msg).unwrap_or_else(|e| fail("send", e));
        if let Ok(n) = s.recv(&mut buf) {
            whole += usize::from(buf[..n] == msg[..]);
        }
    }
    whole
}

/// A long-lived UDP client, as a resolver is: one connected socket, `count` datagrams one
/// `interval` apart, each answer waited for up to `timeout`. Prints a line per datagram:
/// `reply=LINE`, `timeout`, or `error=WHAT` after which the socket is opened and connected
/// again (as a client does when its socket fails).
fn udp_stream(to: SocketAddr, bind: IpAddr, timeout: Duration, count: usize, interval: Duration) {
    let open = || {
        let s = UdpSocket::bind((bind, 0)).unwrap_or_else(|e| fail("bind", e));
        s.connect(to).unwrap_or_else(|e| fail("connect", e));
        s.set_read_timeout(Some(timeout))
            .unwrap_or_else(|e| fail("timeout", e));
        s
    };
    let mut s = open();
    let mut buf = [0u8; 2048];
    for _ in 0..count {
        let outcome = s.send(b"q").and_then(|_| s.recv(&mut buf));
        match outcome {
            Ok(n) => {
                let reply = String::from_utf8_lossy(&buf[..n]);
                println!("reply={}", reply.lines().next().unwrap_or_default());
            }
            Err(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) => {
                println!("timeout");
            }
            Err(e) => {
                println!("error={e}");
                s = open();
            }
        }
        std::thread::sleep(interval);
    }
}

/// Sends `size` bytes on a new TCP connection, closes its sending side and reads the count
/// the sink answers with.
fn upload(to: SocketAddr, bind: IpAddr, timeout: Duration, size: usize) -> usize {
    let mut s = tcp_connect(to, bind, timeout).unwrap_or_else(|e| fail("connect", e));
    s.set_write_timeout(Some(timeout))
        .unwrap_or_else(|e| fail("timeout", e));
    s.set_read_timeout(Some(timeout))
        .unwrap_or_else(|e| fail("timeout", e));
    let chunk = vec![0x5au8; 65536];
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk.len());
        s.write_all(&chunk[..n]).unwrap_or_else(|e| fail("send", e));
        left -= n;
    }
    s.shutdown(std::net::Shutdown::Write)
        .unwrap_or_else(|e| fail("shutdown", e));
    let mut answer = String::new();
    s.read_to_string(&mut answer)
        .unwrap_or_else(|e| fail("receive", e));
    answer.trim().parse().unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = || -> ! {
        eprintln!("{USAGE}");
        exit(2)
    };
    let (Some(proto), Some(to)) = (args.first(), args.get(1)) else {
        usage()
    };
    let Ok(to) = to.parse::<SocketAddr>() else {
        usage()
    };
    // Any address of the destination's family, unless --bind says which.
    let mut bind: IpAddr = if to.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    };
    let mut timeout = Duration::from_secs(2);
    let (mut size, mut count) = (1000usize, 1usize);
    let mut rest = args[2..].iter();
    while let Some(flag) = rest.next() {
        let value = rest.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--bind" => {
                bind = value
                    .parse()
                    .ok()
                    .filter(|b: &IpAddr| b.is_ipv4() == to.is_ipv4())
                    .unwrap_or_else(|| usage());
            }
            "--timeout-ms" => {
                timeout = Duration::from_millis(value.parse().unwrap_or_else(|_| usage()));
            }
            "--size" => size = value.parse().unwrap_or_else(|_| usage()),
            "--count" => count = value.parse().unwrap_or_else(|_| usage()),
            _ => usage(),
        }
    }
    match proto.as_str() {
        "udp-echo" => {
            let whole = udp_echo(to, bind, timeout, size, count);
            println!("echoed={whole}/{count}");
            exit(i32::from(whole != count));
        }
        "udp-stream" => {
            udp_stream(to, bind, timeout, count, Duration::from_millis(100));
            exit(0);
        }
        "upload" => {
            let started = std::time::Instant::now();
            let got = upload(to, bind, timeout, size);
            println!("uploaded={got}/{size} ms={}", started.elapsed().as_millis());
            exit(i32::from(got != size));
        }
        _ => {}
    }
    let (peer, reply) = match proto.as_str() {
        "tcp" => tcp(to, bind, timeout),
        "udp" => udp(to, bind, timeout),
        _ => usage(),
    };
    println!("peer={peer} reply={reply}");
}
