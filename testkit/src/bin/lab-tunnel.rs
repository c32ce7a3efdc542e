//! The lab's L3 tunnel relay (`Network::Tunnel` of the cluster lab): what Calico's IPIP or
//! WireGuard do between nodes, with a TUN device and UDP, as this kernel has neither ipip
//! nor wireguard. It attaches to TUN device DEV (IFF_TUN | IFF_NO_PI: bare IP packets, no
//! Ethernet header) in the namespace it runs in, sends each IPv4 or IPv6 packet the device
//! gives it in one UDP datagram from LISTEN to the PEER whose CIDR holds the packet's
//! destination, and writes each datagram a peer sends it to the device. CIDRs are of either
//! family, and so are the addresses the relays talk over (one peer may carry both families,
//! as a WireGuard peer does: give it a CIDR of each).
//!
//! Usage: lab-tunnel DEV LISTEN_IP:PORT CIDR=PEER_IP:PORT...   (IPv6 addresses as [IP]:PORT)
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
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
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

/// A peer relay and a pod CIDR behind it (of either family: an IPv4 address and CIDR are
/// held in the low 32 bits).
#[derive(Clone, Copy, Debug)]
struct Peer {
    v6: bool,
    net: u128,
    mask: u128,
    addr: SocketAddr,
}

impl Peer {
    fn holds(&self, ip: IpAddr) -> bool {
        let (v6, ip) = match ip {
            IpAddr::V4(a) => (false, u128::from(u32::from(a))),
            IpAddr::V6(a) => (true, u128::from(a)),
        };
        v6 == self.v6 && ip & self.mask == self.net
    }
}

/// `CIDR=IP:PORT`.
fn parse_peer(arg: &str) -> Option<Peer> {
    let (cidr, addr) = arg.split_once('=')?;
    let (net, len) = cidr.split_once('/')?;
    let len: u32 = len.parse().ok()?;
    let (v6, net, bits) = match net.parse::<IpAddr>().ok()? {
        IpAddr::V4(a) => (false, u128::from(u32::from(a)), 32),
        IpAddr::V6(a) => (true, u128::from(a), 128),
    };
    if len > bits {
        return None;
    }
    // The top `len` of `bits` bits.
    let all = if bits == 128 {
        u128::MAX
    } else {
        (1u128 << bits) - 1
    };
    let mask = all & !(all.checked_shr(len).unwrap_or(0));
    Some(Peer {
        v6,
        net: net & mask,
        mask,
        addr: addr.parse().ok()?,
    })
}

/// The destination of an IPv4 or IPv6 packet.
fn destination(packet: &[u8]) -> Option<IpAddr> {
    match packet.first()? >> 4 {
        4 => {
            let d: [u8; 4] = packet.get(16..20)?.try_into().ok()?;
            Some(Ipv4Addr::from(d).into())
        }
        6 => {
            let d: [u8; 16] = packet.get(24..40)?.try_into().ok()?;
            Some(Ipv6Addr::from(d).into())
        }
        _ => None,
    }
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
        let Some(dst) = destination(packet) else {
            report(&UNROUTED, || {
                format!("dropped a packet neither IPv4 nor IPv6 ({n} bytes)")
            });
            continue;
        };
        // (The kernel may hand the device packets of its own, e.g. IPv6 multicast: no peer.)
        let Some(peer) = peers.iter().find(|p| p.holds(dst)) else {
            report(&UNROUTED, || format!("dropped a packet to {dst}: no peer"));
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
        if !peers.iter().any(|p| p.addr == from) {
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
    let Ok(listen) = listen.parse::<SocketAddr>() else {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_hold_their_cidrs_of_either_family() {
        let v4 = parse_peer("10.244.2.0/24=172.18.0.3:51820").expect("parses");
        let v6 = parse_peer("fd00:10:244:2::/64=172.18.0.3:51820").expect("parses");
        let ip = |s: &str| s.parse::<IpAddr>().expect("address");
        assert!(v4.holds(ip("10.244.2.11")) && !v4.holds(ip("10.244.3.11")));
        assert!(v6.holds(ip("fd00:10:244:2::11")) && !v6.holds(ip("fd00:10:244:3::11")));
        // An IPv4 address never matches an IPv6 CIDR whose low bits it shares, nor back.
        assert!(!v6.holds(ip("10.244.2.11")) && !v4.holds(ip("::a0a:20b")));
        let all = parse_peer("0.0.0.0/0=[fd00:18::3]:51820").expect("parses");
        assert!(all.holds(ip("1.2.3.4")) && !all.holds(ip("::1")));
        assert_eq!(all.addr, "[fd00:18::3]:51820".parse().expect("address"));
        assert!(parse_peer("::/0=172.18.0.3:1").is_some_and(|p| p.holds(ip("2001:db8::1"))));
        assert!(parse_peer("fd00::/129=172.18.0.3:1").is_none());
        assert!(parse_peer("10.0.0.0/33=172.18.0.3:1").is_none());
        assert!(parse_peer("10.0.0.0/8").is_none());
    }

    #[test]
    fn destinations_of_both_families_are_read() {
        let mut v4 = [0u8; 20];
        v4[0] = 0x45;
        v4[16..20].copy_from_slice(&[10, 244, 2, 11]);
        assert_eq!(
            destination(&v4),
            Some("10.244.2.11".parse().expect("address"))
        );
        let mut v6 = [0u8; 40];
        v6[0] = 0x60;
        v6[24..40].copy_from_slice(&"fd00:10:244:2::11".parse::<Ipv6Addr>().expect("a").octets());
        assert_eq!(
            destination(&v6),
            Some("fd00:10:244:2::11".parse().expect("address"))
        );
        assert_eq!(destination(&v6[..30]), None);
        assert_eq!(destination(&[0x20; 40]), None);
        assert_eq!(destination(&[]), None);
    }
}
