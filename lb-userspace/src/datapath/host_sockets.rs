//! The node's connected UDP sockets and backends that are gone.
//!
//! The socket hooks give a host socket its backend when it connects: a connected UDP socket
//! (a resolver's, a metrics client's) then sends to that backend for as long as it lives.
//! kube-proxy deletes a removed UDP endpoint's conntrack entries, so such a client's next
//! datagram is balanced anew. A socket's destination cannot be changed from outside; what
//! the agent does instead is what `ss -K` does: it destroys the sockets the hooks sent to a
//! removed backend (`SOCK_DESTROY` over sock_diag, kernel option `CONFIG_INET_DIAG_DESTROY`).
//! Their pending and next calls fail (`ECONNABORTED`, then `EDESTADDRREQ`), and the client
//! opens a new socket, which the hooks balance anew (as resolvers do after an error).
//! Only sockets in `LB4_SOCK_REV` or `LB6_SOCK_REV` (the hooks translated them) with that
//! backend as their peer are touched (IPv4 and IPv6 sockets; a dual-stack IPv6 socket at an
//! IPv4-mapped backend is in `LB4_SOCK_REV`); TCP connections are left to end as they do with kube-proxy. A backend
//! counts as removed for a socket when its frontend's endpoints no longer include it and it
//! is not a terminating endpoint still serving (whose flows kube-proxy keeps).

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsFd,
    path::Path,
};

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use lb_common::{
    ipv6_bytes, ipv6_words, map_names, SockRevKeyV4, SockRevKeyV6, SockRevV4, SockRevV6,
    IPPROTO_UDP,
};

use super::{
    error::{Context, Result},
    pins::open_map,
    sys::{delete_batch, dump_batch, netlink_recv, netlink_send, netlink_socket},
};

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
/// `TCP_ESTABLISHED`: the state of a connected UDP socket.
const STATE_CONNECTED: u32 = 1 << 1;
const NLMSG_HDR: usize = 16;
/// `struct inet_diag_sockid`: ports, addresses, interface, cookie.
const SOCKID_LEN: usize = 48;
/// `struct inet_diag_req_v2`: family, protocol, extensions, padding, states, socket id.
const REQ_LEN: usize = 8 + SOCKID_LEN;
const AF_INET: u8 = libc::AF_INET as u8;
const AF_INET6: u8 = libc::AF_INET6 as u8;

/// A socket as sock_diag names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiagSocket {
    /// `AF_INET` or `AF_INET6`.
    family: u8,
    /// `struct inet_diag_sockid`, as the kernel sent it (to name the socket back).
    id: [u8; SOCKID_LEN],
}

impl DiagSocket {
    /// The peer's address and port; an IPv4-mapped peer of an IPv6 socket as the IPv4
    /// address it is (the hooks recorded it in `LB4_SOCK_REV`).
    fn peer(&self) -> SocketAddr {
        let port = u16::from_be_bytes([self.id[2], self.id[3]]);
        let mut addr = [0u8; 16];
        addr.copy_from_slice(&self.id[20..36]);
        let ip = if self.family == AF_INET {
            IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]))
        } else {
            let v6 = Ipv6Addr::from(addr);
            v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
        };
        SocketAddr::new(ip, port)
    }

    fn cookie(&self) -> u64 {
        let lo = u32::from_ne_bytes([self.id[40], self.id[41], self.id[42], self.id[43]]);
        let hi = u32::from_ne_bytes([self.id[44], self.id[45], self.id[46], self.id[47]]);
        (u64::from(hi) << 32) | u64::from(lo)
    }
}

/// A reverse map of the socket hooks, opened, with its entries read.
struct RevMap<K: aya::Pod, V: aya::Pod> {
    map: BpfHashMap<MapData, K, V>,
    entries: Vec<(K, V)>,
    name: &'static str,
}

impl<K: aya::Pod, V: aya::Pod> RevMap<K, V> {
    fn read(pin: &Path, name: &'static str) -> Result<Self> {
        let map: BpfHashMap<MapData, K, V> =
            BpfHashMap::try_from(Map::LruHashMap(open_map(pin, name)?))?;
        let fd = aya::maps::IterableMap::map(&map).fd().as_fd();
        let entries = match dump_batch::<K, V>(fd).with_context(|| format!("reading {name}"))? {
            Some(entries) => entries,
            None => map
                .iter()
                .collect::<std::result::Result<Vec<_>, _>>()
                .with_context(|| format!("reading {name}"))?,
        };
        Ok(RevMap { map, entries, name })
    }

    /// Deletes `keys` (entries evicted meanwhile count as deleted: an LRU map).
    fn delete(mut self, keys: &[K]) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let fd = aya::maps::IterableMap::map(&self.map).fd().as_fd();
        if !delete_batch(fd, keys).with_context(|| format!("deleting from {}", self.name))? {
            for k in keys {
                let _ = self.map.remove(k);
            }
        }
        Ok(())
    }
}

/// Destroys the node's connected UDP sockets the hooks sent to a backend that is no longer
/// one of their frontend's (`serves(frontend, backend)` says whether it still is), and
/// forgets their reverse entries: the number of sockets destroyed. Both families: IPv4
/// sockets of `LB4_SOCK_REV`, IPv6 ones of `LB6_SOCK_REV`, and dual-stack IPv6 sockets
/// connected to an IPv4-mapped address, which the hooks recorded in `LB4_SOCK_REV`. The
/// kernel is asked for a family's UDP sockets only when some reverse entry names such a
/// backend.
pub fn leave_removed_backends(
    pin: &Path,
    serves: impl Fn(SocketAddr, SocketAddr) -> bool,
) -> Result<usize> {
    let rev4: RevMap<SockRevKeyV4, SockRevV4> = RevMap::read(pin, map_names::LB4_SOCK_REV)?;
    let rev6: RevMap<SockRevKeyV6, SockRevV6> = RevMap::read(pin, map_names::LB6_SOCK_REV)?;
    // (socket cookie, backend) of every socket to destroy, if it is connected there.
    let stale4: HashSet<(u64, SocketAddr)> = rev4
        .entries
        .iter()
        .map(|(k, v)| (k.cookie, addr4(k.addr, k.port), addr4(v.addr, v.port)))
        .filter(|(_, be, fe)| !serves(*fe, *be))
        .map(|(cookie, be, _)| (cookie, be))
        .collect();
    let stale6: HashSet<(u64, SocketAddr)> = rev6
        .entries
        .iter()
        .map(|(k, v)| (k.cookie, addr6(k.addr, k.port), addr6(v.addr, v.port)))
        .filter(|(_, be, fe)| !serves(*fe, *be))
        .map(|(cookie, be, _)| (cookie, be))
        .collect();
    let mut families = Vec::new();
    if !stale4.is_empty() {
        families.push(AF_INET);
    }
    // IPv6 sockets: those of LB6_SOCK_REV, and dual-stack ones at an IPv4-mapped backend.
    if !stale4.is_empty() || !stale6.is_empty() {
        families.push(AF_INET6);
    }
    if families.is_empty() {
        return Ok(0);
    }
    let nl = netlink_socket(NETLINK_SOCK_DIAG, 0).context("opening a sock_diag socket")?;
    let (mut gone4, mut gone6) = (Vec::new(), Vec::new());
    for family in families {
        for s in connected_udp(&nl, family)? {
            let (cookie, peer) = (s.cookie(), s.peer());
            if !stale4.contains(&(cookie, peer)) && !stale6.contains(&(cookie, peer)) {
                continue;
            }
            match destroy(&nl, &s) {
                Ok(()) => {
                    tracing::debug!(%peer, cookie, "UDP socket destroyed");
                    match peer {
                        SocketAddr::V4(a) => gone4.push(SockRevKeyV4 {
                            cookie,
                            addr: u32::from_ne_bytes(a.ip().octets()),
                            port: a.port().to_be(),
                            _pad: 0,
                        }),
                        SocketAddr::V6(a) => gone6.push(SockRevKeyV6 {
                            cookie,
                            addr: ipv6_words(a.ip().octets()),
                            port: a.port().to_be(),
                            _pad: [0; 6],
                        }),
                    }
                }
                // Closed meanwhile.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => {
                    return Err(e).context(
                        "destroying a UDP socket (SOCK_DESTROY; the kernel needs \
                         CONFIG_INET_DIAG_DESTROY)",
                    )
                }
            }
        }
    }
    let destroyed = gone4.len() + gone6.len();
    rev4.delete(&gone4)?;
    rev6.delete(&gone6)?;
    Ok(destroyed)
}

/// An IPv4 address and port in network byte order, as the maps hold them.
fn addr4(addr: u32, port: u16) -> SocketAddr {
    SocketAddr::new(
        IpAddr::V4(Ipv4Addr::from(addr.to_ne_bytes())),
        u16::from_be(port),
    )
}

/// An IPv6 address (words) and port in network byte order, as the maps hold them.
fn addr6(addr: lb_common::Ipv6Words, port: u16) -> SocketAddr {
    SocketAddr::new(
        IpAddr::V6(Ipv6Addr::from(ipv6_bytes(addr))),
        u16::from_be(port),
    )
}

/// The node's connected UDP sockets of `family`.
fn connected_udp(fd: &std::os::fd::OwnedFd, family: u8) -> Result<Vec<DiagSocket>> {
    netlink_send(
        fd.as_fd(),
        &request(
            SOCK_DIAG_BY_FAMILY,
            NLM_F_DUMP,
            STATE_CONNECTED,
            family,
            &[0; SOCKID_LEN],
        ),
    )
    .context("asking sock_diag for UDP sockets")?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = netlink_recv(fd.as_fd(), &mut buf).context("reading sock_diag")?;
        match parse_dump(&buf[..n], &mut out) {
            Ok(true) => return Ok(out),
            Ok(false) => {}
            Err(errno) => {
                return Err(std::io::Error::from_raw_os_error(errno))
                    .context("sock_diag refused the UDP dump")
            }
        }
    }
}

/// Destroys one socket; the kernel's answer as an `io::Error` when it refused.
fn destroy(fd: &std::os::fd::OwnedFd, s: &DiagSocket) -> std::io::Result<()> {
    netlink_send(
        fd.as_fd(),
        &request(SOCK_DESTROY, NLM_F_ACK, u32::MAX, s.family, &s.id),
    )?;
    let mut buf = [0u8; 512];
    let n = netlink_recv(fd.as_fd(), &mut buf)?;
    match ack_errno(&buf[..n]) {
        Some(0) => Ok(()),
        Some(errno) => Err(std::io::Error::from_raw_os_error(errno)),
        None => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "no acknowledgement from sock_diag",
        )),
    }
}

/// A netlink message with an `inet_diag_req_v2` for UDP sockets of `family`.
fn request(kind: u16, flags: u16, states: u32, family: u8, id: &[u8; SOCKID_LEN]) -> Vec<u8> {
    let len = NLMSG_HDR + REQ_LEN;
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    m.extend_from_slice(&0u32.to_ne_bytes()); // to the kernel
    m.extend_from_slice(&[family, IPPROTO_UDP, 0, 0]);
    m.extend_from_slice(&states.to_ne_bytes());
    m.extend_from_slice(id);
    m
}

/// The netlink messages in `buf`: (type, payload).
fn messages(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut at = 0;
    std::iter::from_fn(move || {
        let hdr = buf.get(at..at + NLMSG_HDR)?;
        let len = u32::from_ne_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]) as usize;
        let kind = u16::from_ne_bytes([hdr[4], hdr[5]]);
        let payload = buf.get(at + NLMSG_HDR..at + len.max(NLMSG_HDR))?;
        at += len.max(NLMSG_HDR).next_multiple_of(4);
        Some((kind, payload))
    })
}

/// Adds the sockets of one dump reply to `out`: Ok(true) at its end, Err(errno) when the
/// kernel answered with an error.
fn parse_dump(buf: &[u8], out: &mut Vec<DiagSocket>) -> std::result::Result<bool, i32> {
    for (kind, payload) in messages(buf) {
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => return Err(errno_of(payload).unwrap_or(libc::EIO)),
            SOCK_DIAG_BY_FAMILY => {
                // struct inet_diag_msg: family, state, timer, retransmits, then the id.
                if let (Some(&family), Some(id)) = (payload.first(), payload.get(4..4 + SOCKID_LEN))
                {
                    if family == AF_INET || family == AF_INET6 {
                        let mut s = DiagSocket {
                            family,
                            id: [0; SOCKID_LEN],
                        };
                        s.id.copy_from_slice(id);
                        out.push(s);
                    }
                }
            }
            _ => {}
        }
    }
    Ok(false)
}

/// The errno of an acknowledgement (0: done).
fn ack_errno(buf: &[u8]) -> Option<i32> {
    messages(buf)
        .find(|(kind, _)| *kind == NLMSG_ERROR)
        .and_then(|(_, payload)| errno_of(payload))
}

/// `struct nlmsgerr` starts with the negated errno.
fn errno_of(payload: &[u8]) -> Option<i32> {
    let b = payload.get(..4)?;
    Some(-i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `SOCK_DIAG_BY_FAMILY` answer for one socket of `family` whose peer is `peer` (the
    /// address's bytes at the start of the 16-byte field) and `port`.
    fn diag_msg(family: u8, peer: &[u8], port: u16, cookie: u64) -> Vec<u8> {
        let mut id = [0u8; SOCKID_LEN];
        id[0..2].copy_from_slice(&40000u16.to_be_bytes());
        id[2..4].copy_from_slice(&port.to_be_bytes());
        id[4..8].copy_from_slice(&[172, 18, 0, 2]);
        id[20..20 + peer.len()].copy_from_slice(peer);
        id[40..44].copy_from_slice(&(cookie as u32).to_ne_bytes());
        id[44..48].copy_from_slice(&((cookie >> 32) as u32).to_ne_bytes());
        let mut payload = vec![family, 1, 0, 0];
        payload.extend_from_slice(&id);
        payload.extend_from_slice(&[0; 20]); // expires, queues, uid, inode
        let mut m = Vec::new();
        let len = NLMSG_HDR + payload.len();
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(&payload);
        m
    }

    fn done() -> Vec<u8> {
        let mut m = (NLMSG_HDR as u32 + 4).to_ne_bytes().to_vec();
        m.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
        m.extend_from_slice(&[0; 14]);
        m
    }

    use lb_common::{BackendV4, BackendV6};

    #[test]
    fn a_dump_is_read_to_its_end_with_peers_and_cookies() {
        let mut buf = diag_msg(AF_INET, &[10, 244, 1, 11], 5353, 0x1_0000_0002);
        buf.extend(diag_msg(AF_INET, &[10, 244, 2, 11], 53, 7));
        let mut out = Vec::new();
        assert_eq!(parse_dump(&buf, &mut out), Ok(false), "no end yet");
        assert_eq!(parse_dump(&done(), &mut out), Ok(true));
        let got: Vec<(String, u64)> = out
            .iter()
            .map(|s| (s.peer().to_string(), s.cookie()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("10.244.1.11:5353".to_string(), 0x1_0000_0002),
                ("10.244.2.11:53".to_string(), 7)
            ]
        );
        // The peer compares with the maps' network-order fields.
        let b = BackendV4 {
            addr: u32::from(Ipv4Addr::new(10, 244, 1, 11)).to_be(),
            port: 5353u16.to_be(),
            proto: IPPROTO_UDP,
            flags: 0,
        };
        assert_eq!(out[0].peer(), addr4(b.addr, b.port));
    }

    #[test]
    fn ipv6_peers_and_ipv4_mapped_ones() {
        let v6: Ipv6Addr = "fd00:10:244::11".parse().expect("address");
        let mapped = Ipv4Addr::new(10, 244, 0, 12).to_ipv6_mapped();
        let mut buf = diag_msg(AF_INET6, &v6.octets(), 5353, 9);
        buf.extend(diag_msg(AF_INET6, &mapped.octets(), 53, 10));
        // Neither IPv4 nor IPv6: skipped.
        buf.extend(diag_msg(1, &[1, 2, 3, 4], 53, 11));
        buf.extend(done());
        let mut out = Vec::new();
        assert_eq!(parse_dump(&buf, &mut out), Ok(true));
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].peer().to_string(), "[fd00:10:244::11]:5353");
        assert_eq!(
            out[1].peer().to_string(),
            "10.244.0.12:53",
            "mapped: as IPv4"
        );
        assert_eq!(out[0].family, AF_INET6);
        let b = BackendV6 {
            addr: ipv6_words(v6.octets()),
            port: 5353u16.to_be(),
            proto: IPPROTO_UDP,
            flags: 0,
        };
        assert_eq!(out[0].peer(), addr6(b.addr, b.port));
        // A destroy names the socket in its own family.
        let m = request(SOCK_DESTROY, NLM_F_ACK, u32::MAX, out[1].family, &out[1].id);
        assert_eq!(&m[16..20], &[AF_INET6, IPPROTO_UDP, 0, 0]);
        assert_eq!(&m[24..], &out[1].id);
    }

    #[test]
    fn errors_and_acknowledgements() {
        let mut err = (NLMSG_HDR as u32 + 20).to_ne_bytes().to_vec();
        err.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        err.extend_from_slice(&[0; 10]);
        err.extend_from_slice(&(-libc::EOPNOTSUPP).to_ne_bytes());
        err.extend_from_slice(&[0; 16]);
        assert_eq!(parse_dump(&err, &mut Vec::new()), Err(libc::EOPNOTSUPP));
        assert_eq!(ack_errno(&err), Some(libc::EOPNOTSUPP));
        let mut ok = err.clone();
        ok[16..20].copy_from_slice(&0i32.to_ne_bytes());
        assert_eq!(ack_errno(&ok), Some(0));
        assert_eq!(ack_errno(&[1, 2, 3]), None, "truncated");
        // A length field that runs past the buffer ends the walk.
        let mut bad = done();
        bad[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert_eq!(messages(&bad).count(), 0);
    }

    #[test]
    fn a_request_is_a_header_and_an_inet_diag_req_v2() {
        let m = request(SOCK_DESTROY, NLM_F_ACK, u32::MAX, AF_INET, &[9; SOCKID_LEN]);
        assert_eq!(m.len(), 72);
        assert_eq!(u32::from_ne_bytes([m[0], m[1], m[2], m[3]]), 72);
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), SOCK_DESTROY);
        assert_eq!(u16::from_ne_bytes([m[6], m[7]]), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(&m[16..20], &[AF_INET, IPPROTO_UDP, 0, 0]);
        assert_eq!(&m[24..], &[9; SOCKID_LEN]);
    }
}
