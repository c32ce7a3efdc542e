//! A lab pod's servers: HTTP on a TCP port and an echo service on a UDP port, both answering
//! with the pod's name and the client address they saw, so tests and the demo can tell which
//! backend served a request and whether the client address was kept. A UDP answer leaves
//! from the address the request was sent to (IP_PKTINFO, as DNS servers answer), not from
//! whichever address the route back prefers: on a node whose route to the client is an
//! overlay device, that would be the device's address, which the client never asked.
//!
//! A datagram that starts with `echo:` is sent back whole (large ones test fragments). A
//! third server, on TCP port `SINK_PORT` (9000), reads a connection to its end and answers
//! with the number of bytes it got (uploads test path MTU discovery).
//!
//! Each server answers on IPv4 and on IPv6, on sockets of each family (the IPv6 ones
//! IPV6_V6ONLY, so that IPv4 clients are seen as they always were, never as IPv4-mapped
//! IPv6 addresses); a client address is written in its usual form, `ADDR:PORT` or
//! `[ADDR]:PORT`. Where the kernel has no IPv6 the servers answer on IPv4 alone.
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
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    net::{TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

use lb_testkit::netns::sockaddr;

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

/// The upload sink's port.
const SINK_PORT: u16 = 9000;

/// Reads a connection until the client shuts its side, then answers with the byte count.
fn sink_one(mut sock: TcpStream) {
    let _ = sock.set_read_timeout(Some(Duration::from_secs(30)));
    let mut buf = vec![0u8; 65536];
    let mut total = 0usize;
    loop {
        match sock.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n,
            Err(_) => return,
        }
    }
    let _ = sock.write_all(format!("{total}\n").as_bytes());
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
    let exit = |what: &str, e: std::io::Error| -> ! {
        eprintln!("lab-server: {what}: {e}");
        std::process::exit(1)
    };
    // Every socket is bound before any answers, IPv6 first: once the IPv4 HTTP port answers,
    // all of them do.
    let v6 = match ipv6_sockets(tcp_port, udp_port) {
        Ok(v6) => Some(v6),
        Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
            eprintln!("lab-server: no IPv6 in this kernel; IPv4 only");
            None
        }
        Err(e) => exit("IPv6 sockets", e),
    };
    let sink = TcpListener::bind(("0.0.0.0", SINK_PORT))
        .unwrap_or_else(|e| exit(&format!("tcp bind {SINK_PORT}"), e));
    let udp = UdpSocket::bind(("0.0.0.0", udp_port))
        .unwrap_or_else(|e| exit(&format!("udp bind {udp_port}"), e));
    if let Err(e) = pktinfo_on(&udp) {
        exit("IP_PKTINFO", e)
    }
    let tcp = TcpListener::bind(("0.0.0.0", tcp_port))
        .unwrap_or_else(|e| exit(&format!("tcp bind {tcp_port}"), e));
    let mut servers = vec![(tcp, udp, sink)];
    servers.extend(v6);
    for (tcp, udp, sink) in servers {
        let udp_name = name.clone();
        thread::spawn(move || serve_udp(&udp, &udp_name));
        thread::spawn(move || {
            for sock in sink.incoming().flatten() {
                thread::spawn(move || sink_one(sock));
            }
        });
        // A pool of workers, each accepting and serving one connection at a time: no thread
        // is started per connection, so a connection costs the server little more than the
        // kernel's work and benchmarks see the datapath's cost rather than the server's. When
        // the last idle worker takes a connection it starts another, so one always accepts
        // (the pool grows to the most connections ever open at once).
        let listener = Arc::new(tcp);
        let idle = Arc::new(AtomicUsize::new(0));
        for _ in 0..WORKERS {
            spawn_worker(&listener, &name, &idle);
        }
    }
    loop {
        thread::park();
    }
}

/// Answers each datagram on `udp`: `echo:` ones with themselves, others with the name and the
/// client's address, from the address the datagram was sent to.
fn serve_udp(udp: &UdpSocket, name: &str) {
    let mut buf = vec![0u8; 65536];
    loop {
        if let Ok((n, peer, local)) = recv_with_destination(udp, &mut buf) {
            if buf[..n].starts_with(b"echo:") {
                let _ = send_from(udp, &buf[..n], peer, local);
            } else {
                let reply = format!("{name} {peer}\n");
                let _ = send_from(udp, reply.as_bytes(), peer, local);
            }
        }
    }
}

/// The IPv6 servers' sockets, IPv6 only: (HTTP, UDP with IPV6_RECVPKTINFO, sink).
fn ipv6_sockets(
    tcp_port: u16,
    udp_port: u16,
) -> std::io::Result<(TcpListener, UdpSocket, TcpListener)> {
    let tcp = TcpListener::from(ipv6_only(libc::SOCK_STREAM, tcp_port)?);
    let udp = UdpSocket::from(ipv6_only(libc::SOCK_DGRAM, udp_port)?);
    set_int(&udp, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, 1)?;
    let sink = TcpListener::from(ipv6_only(libc::SOCK_STREAM, SINK_PORT)?);
    Ok((tcp, udp, sink))
}

/// A socket of type `ty` (stream: listening) bound to [::]:`port`, for IPv6 alone.
fn ipv6_only(ty: libc::c_int, port: u16) -> std::io::Result<OwnedFd> {
    let check = |r: libc::c_int| {
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    // SAFETY: socket(2) returns a new descriptor, owned by `fd` from here on.
    let fd = unsafe {
        let raw = libc::socket(libc::AF_INET6, ty | libc::SOCK_CLOEXEC, 0);
        check(raw)?;
        OwnedFd::from_raw_fd(raw)
    };
    set_int(&fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1)?;
    if ty == libc::SOCK_STREAM {
        // As std's listeners: a restarted server binds at once.
        set_int(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    }
    let (addr, len) = sockaddr(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)));
    // SAFETY: bind and listen on the descriptor `fd` owns, with a sockaddr of `len` bytes.
    unsafe {
        check(libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), len))?;
        if ty == libc::SOCK_STREAM {
            check(libc::listen(fd.as_raw_fd(), 128))?;
        }
    }
    Ok(fd)
}

fn set_int(
    sock: &impl AsRawFd,
    level: libc::c_int,
    opt: libc::c_int,
    value: libc::c_int,
) -> std::io::Result<()> {
    // SAFETY: setsockopt with an int option value on a socket the caller owns.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            opt,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn pktinfo_on(sock: &UdpSocket) -> std::io::Result<()> {
    set_int(sock, libc::IPPROTO_IP, libc::IP_PKTINFO, 1)
}

/// Room for one IP_PKTINFO or IPV6_PKTINFO control message, aligned for cmsghdr.
#[repr(C, align(8))]
struct Control([u8; 64]);

/// The address in a sockaddr_storage the kernel filled (of an IPv4 or IPv6 socket).
fn socket_addr(storage: &libc::sockaddr_storage) -> std::io::Result<SocketAddr> {
    match libc::c_int::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin: libc::sockaddr_in = unsafe { std::ptr::read((&raw const *storage).cast()) };
            Ok(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6: libc::sockaddr_in6 = unsafe { std::ptr::read((&raw const *storage).cast()) };
            Ok(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        f => Err(std::io::Error::other(format!("address family {f}"))),
    }
}

/// One datagram into `buf`: (its length, its source, the destination address it was sent to,
/// when the kernel says).
fn recv_with_destination(
    sock: &UdpSocket,
    buf: &mut [u8],
) -> std::io::Result<(usize, SocketAddr, Option<IpAddr>)> {
    // SAFETY: all-zero sockaddr_storage and msghdr are valid values.
    let mut from: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut control = Control([0; 64]);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: as above.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&raw mut from).cast();
    msg.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = control.0.len() as _;
    // SAFETY: every pointer in `msg` points at a live buffer of the length given, for the
    // whole call.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &raw mut msg, 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let peer = socket_addr(&from)?;
    let mut local = None;
    // SAFETY: the CMSG_* walk stays within msg_controllen bytes of `control`, which the
    // kernel filled; an IP_PKTINFO message holds an in_pktinfo, an IPV6_PKTINFO one an
    // in6_pktinfo (read unaligned).
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&raw const msg);
        while !c.is_null() {
            match ((*c).cmsg_level, (*c).cmsg_type) {
                (libc::IPPROTO_IP, libc::IP_PKTINFO) => {
                    let info: libc::in_pktinfo =
                        std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                    local = Some(Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr)).into());
                }
                (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) => {
                    let info: libc::in6_pktinfo =
                        std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                    local = Some(Ipv6Addr::from(info.ipi6_addr.s6_addr).into());
                }
                _ => {}
            }
            c = libc::CMSG_NXTHDR(&raw const msg, c);
        }
    }
    Ok((n as usize, peer, local))
}

/// Sends `data` to `to` from address `from` (when known; else as the route chooses).
fn send_from(
    sock: &UdpSocket,
    data: &[u8],
    to: SocketAddr,
    from: Option<IpAddr>,
) -> std::io::Result<()> {
    let Some(from) = from else {
        return sock.send_to(data, to).map(|_| ());
    };
    let (mut name, name_len) = sockaddr(to);
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    let mut control = Control([0; 64]);
    // SAFETY: an all-zero msghdr is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&raw mut name).cast();
    msg.msg_namelen = name_len;
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    let info_len = match from {
        IpAddr::V4(_) => size_of::<libc::in_pktinfo>(),
        IpAddr::V6(_) => size_of::<libc::in6_pktinfo>(),
    } as u32;
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(info_len) } as usize;
    msg.msg_controllen = space as _;
    // SAFETY: `control` holds `space` bytes (less than its 64), aligned for cmsghdr; the one
    // control message is written within them; sendmsg reads only the buffers `msg` names,
    // which live for the whole call (`data` is not written to).
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&raw const msg);
        (*c).cmsg_len = libc::CMSG_LEN(info_len) as _;
        match from {
            IpAddr::V4(from) => {
                (*c).cmsg_level = libc::IPPROTO_IP;
                (*c).cmsg_type = libc::IP_PKTINFO;
                let info = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from(from).to_be(),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                std::ptr::write_unaligned(libc::CMSG_DATA(c).cast(), info);
            }
            IpAddr::V6(from) => {
                (*c).cmsg_level = libc::IPPROTO_IPV6;
                (*c).cmsg_type = libc::IPV6_PKTINFO;
                let info = libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr {
                        s6_addr: from.octets(),
                    },
                    ipi6_ifindex: 0,
                };
                std::ptr::write_unaligned(libc::CMSG_DATA(c).cast(), info);
            }
        }
        if libc::sendmsg(sock.as_raw_fd(), &raw const msg, 0) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
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
