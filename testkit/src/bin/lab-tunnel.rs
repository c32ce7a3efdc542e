//! The lab's L3 tunnel relay (`Network::Tunnel` of the cluster lab): what Calico's IPIP or
//! WireGuard do between nodes, with a TUN device and UDP, as this kernel has neither ipip
//! nor wireguard. It attaches to TUN device DEV (IFF_TUN | IFF_NO_PI: bare IP packets, no
//! Ethernet header) in the namespace it runs in, sends each IPv4 packet the device gives it
//! in one UDP datagram from LISTEN to the PEER whose CIDR holds the packet's destination,
//! and writes each datagram a peer sends it to the device.
//!
//! Usage: lab-tunnel DEV LISTEN_IP:PORT CIDR=PEER_IP:PORT...
//!
//! Prints `lab-tunnel: DEV attached, listening on LISTEN` once running; runs until killed. A
//! packet for no peer's CIDR, or a datagram from an address that is no peer, is dropped (the
//! first few are reported on stderr).
// Harness code: a lab that cannot be built panics with a message, arguments are passed as
// the call sites read best, and floats are compared exactly where they were parsed.
#![allow(
    clippy::needless_pass_by_value,
    clippy::missing_panics_doc,
    clippy::float_cmp,
    clippy::unused_self
)]

use std::{
    fs::File,
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    os::fd::AsRawFd,
    process::exit,
    sync::atomic::{AtomicU32, Ordering},
    thread,
};

const USAGE: &str = "usage: lab-tunnel DEV LISTEN_IP:PORT CIDR=PEER_IP:PORT...";
/// Socket buffers: room for bursts of full-sized TCP segments while the other side writes.
const SOCKET_BUFFER: libc::c_int = 4 << 20;
/// Drops reported on stderr, of each kind (then only counted).
const REPORTED: u32 = 5;

/// A peer relay and the pod CIDR behind it.
#[derive(Clone, Copy, Debug)]
struct Peer {
    net: u32,
    mask: u32,
    addr: SocketAddrV4,
}

impl Peer {
    fn holds(&self, ip: u32) -> bool {
        ip & self.mask == self.net
    }
}

/// `CIDR=IP:PORT`.
fn parse_peer(arg: &str) -> Option<Peer> {
    let (cidr, addr) = arg.split_once('=')?;
    let (net, len) = cidr.split_once('/')?;
    let net = u32::from(net.parse::<Ipv4Addr>().ok()?);
    let len: u32 = len.parse().ok()?;
    let mask = match len {
        0 => 0,
        1..=32 => u32::MAX << (32 - len),
        _ => return None,
    };
    Some(Peer {
        net: net & mask,
        mask,
        addr: addr.parse().ok()?,
    })
}

/// Attaches to TUN device `name` (made by `ip tuntap add ... mode tun`, or made here if
/// there is none) as a bare-IP device.
fn open_tun(name: &str) -> std::io::Result<File> {
    let file = File::options()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    if name.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::other(format!("{name}: name too long")));
    }
    // SAFETY: ifreq is plain old data; all zeros is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is, on the descriptor `file`
    // owns for the whole call.
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &raw mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file)
}

/// Sets a socket's buffer sizes beyond the sysctl limits (root), falling back to the limits.
fn grow_buffers(sock: &UdpSocket) {
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        let size = SOCKET_BUFFER;
        for opt in [force, plain] {
            // SAFETY: setsockopt with an int option value on a socket `sock` owns.
            let r = unsafe {
                libc::setsockopt(
                    sock.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&raw const size).cast(),
                    size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if r == 0 {
                break;
            }
        }
    }
}

/// Reports the first REPORTED events counted by `counter`.
fn report(counter: &AtomicU32, what: impl FnOnce() -> String) {
    if counter.fetch_add(1, Ordering::Relaxed) < REPORTED {
        eprintln!("lab-tunnel: {}", what());
    }
}

/// TUN → UDP: each packet to the peer whose CIDR holds its destination.
fn tun_to_udp(mut tun: File, sock: UdpSocket, peers: Vec<Peer>) -> std::io::Error {
    static UNROUTED: AtomicU32 = AtomicU32::new(0);
    static SEND_FAILED: AtomicU32 = AtomicU32::new(0);
    let mut buf = vec![0u8; 65536];
    loop {
        let n = match tun.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return e,
        };
        let packet = &buf[..n];
        // IPv4 only (the device may also be handed IPv6 the kernel sends by itself).
        let Some(dst) = packet
            .get(16..20)
            .filter(|_| packet[0] >> 4 == 4)
            .and_then(|d| <[u8; 4]>::try_from(d).ok())
            .map(u32::from_be_bytes)
        else {
            report(&UNROUTED, || {
                format!("dropped a non-IPv4 packet ({n} bytes)")
            });
            continue;
        };
        let Some(peer) = peers.iter().find(|p| p.holds(dst)) else {
            report(&UNROUTED, || {
                format!("dropped a packet to {}: no peer", Ipv4Addr::from(dst))
            });
            continue;
        };
        if let Err(e) = sock.send_to(packet, peer.addr) {
            report(&SEND_FAILED, || format!("sending to {}: {e}", peer.addr));
        }
    }
}

/// UDP → TUN: each datagram from a peer, as a packet received on the device.
fn udp_to_tun(mut tun: File, sock: UdpSocket, peers: Vec<Peer>) -> std::io::Error {
    static STRANGERS: AtomicU32 = AtomicU32::new(0);
    static WRITE_FAILED: AtomicU32 = AtomicU32::new(0);
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, from) = match sock.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return e,
        };
        if !peers.iter().any(|p| SocketAddr::V4(p.addr) == from) {
            report(&STRANGERS, || {
                format!("dropped {n} bytes from {from}: no peer")
            });
            continue;
        }
        if let Err(e) = tun.write(&buf[..n]) {
            report(&WRITE_FAILED, || {
                format!("writing {n} bytes from {from}: {e}")
            });
        }
    }
}

/// Either direction failing for good ends the relay (the lab sees it exit).
fn fail(what: &str, e: std::io::Error) -> ! {
    eprintln!("lab-tunnel: {what}: {e}");
    exit(1)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = || -> ! {
        eprintln!("{USAGE}");
        exit(2)
    };
    let (Some(dev), Some(listen)) = (args.first(), args.get(1)) else {
        usage()
    };
    let Ok(listen) = listen.parse::<SocketAddrV4>() else {
        usage()
    };
    let peers: Vec<Peer> = args[2..]
        .iter()
        .map(|a| parse_peer(a).unwrap_or_else(|| usage()))
        .collect();
    let tun = open_tun(dev).unwrap_or_else(|e| fail(&format!("attaching to {dev}"), e));
    let sock = UdpSocket::bind(listen).unwrap_or_else(|e| fail(&format!("binding {listen}"), e));
    grow_buffers(&sock);
    let (tun2, sock2) = match (tun.try_clone(), sock.try_clone()) {
        (Ok(t), Ok(s)) => (t, s),
        (Err(e), _) | (_, Err(e)) => fail("duplicating descriptors", e),
    };
    println!(
        "lab-tunnel: {dev} attached, listening on {listen}, {} peers",
        peers.len()
    );
    let peers2 = peers.clone();
    thread::spawn(move || fail("receiving from peers", udp_to_tun(tun2, sock2, peers2)));
    fail("reading the device", tun_to_udp(tun, sock, peers));
}
