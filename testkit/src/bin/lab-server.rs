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
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
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
    let tcp = TcpListener::bind(("0.0.0.0", tcp_port)).unwrap_or_else(|e| {
        eprintln!("lab-server: tcp bind {tcp_port}: {e}");
        std::process::exit(1)
    });
    let udp = UdpSocket::bind(("0.0.0.0", udp_port)).unwrap_or_else(|e| {
        eprintln!("lab-server: udp bind {udp_port}: {e}");
        std::process::exit(1)
    });
    if let Err(e) = pktinfo_on(&udp) {
        eprintln!("lab-server: IP_PKTINFO: {e}");
        std::process::exit(1)
    }
    let udp_name = name.clone();
    thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        loop {
            if let Ok((n, peer, local)) = recv_with_destination(&udp, &mut buf) {
                if buf[..n].starts_with(b"echo:") {
                    let _ = send_from(&udp, &buf[..n], peer, local);
                } else {
                    let reply = format!("{udp_name} {peer}\n");
                    let _ = send_from(&udp, reply.as_bytes(), peer, local);
                }
            }
        }
    });
    match TcpListener::bind(("0.0.0.0", SINK_PORT)) {
        Ok(sink) => {
            thread::spawn(move || {
                for sock in sink.incoming().flatten() {
                    thread::spawn(move || sink_one(sock));
                }
            });
        }
        Err(e) => {
            eprintln!("lab-server: tcp bind {SINK_PORT}: {e}");
            std::process::exit(1)
        }
    }
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

fn pktinfo_on(sock: &UdpSocket) -> std::io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: setsockopt with an int option value on a socket `sock` owns.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_PKTINFO,
            (&raw const on).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Room for one IP_PKTINFO control message, aligned for cmsghdr.
#[repr(C, align(8))]
struct Control([u8; 64]);

fn sockaddr_in(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// One datagram into `buf`: (its length, its source, the destination address it was sent to,
/// when the kernel says).
fn recv_with_destination(
    sock: &UdpSocket,
    buf: &mut [u8],
) -> std::io::Result<(usize, SocketAddrV4, Option<Ipv4Addr>)> {
    // SAFETY: all-zero sockaddr_in and msghdr are valid values.
    let mut from: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut control = Control([0; 64]);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: as above.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&raw mut from).cast();
    msg.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
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
    let peer = SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(from.sin_addr.s_addr)),
        u16::from_be(from.sin_port),
    );
    let mut local = None;
    // SAFETY: the CMSG_* walk stays within msg_controllen bytes of `control`, which the
    // kernel filled; an IP_PKTINFO message holds an in_pktinfo (read unaligned).
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&raw const msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::IPPROTO_IP && (*c).cmsg_type == libc::IP_PKTINFO {
                let info: libc::in_pktinfo = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                local = Some(Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr)));
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
    to: SocketAddrV4,
    from: Option<Ipv4Addr>,
) -> std::io::Result<()> {
    let Some(from) = from else {
        return sock.send_to(data, to).map(|_| ());
    };
    let mut name = sockaddr_in(to);
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    let mut control = Control([0; 64]);
    // SAFETY: an all-zero msghdr is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&raw mut name).cast();
    msg.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(size_of::<libc::in_pktinfo>() as u32) } as usize;
    msg.msg_controllen = space as _;
    // SAFETY: `control` holds `space` bytes (less than its 64), aligned for cmsghdr; the one
    // control message is written within them; sendmsg reads only the buffers `msg` names,
    // which live for the whole call (`data` is not written to).
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&raw const msg);
        (*c).cmsg_level = libc::IPPROTO_IP;
        (*c).cmsg_type = libc::IP_PKTINFO;
        (*c).cmsg_len = libc::CMSG_LEN(size_of::<libc::in_pktinfo>() as u32) as _;
        let info = libc::in_pktinfo {
            ipi_ifindex: 0,
            ipi_spec_dst: libc::in_addr {
                s_addr: u32::from(from).to_be(),
            },
            ipi_addr: libc::in_addr { s_addr: 0 },
        };
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast(), info);
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
