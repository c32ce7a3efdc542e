//! IPv6 host clients: the node's own processes reach IPv6 frontends through the cgroup socket
//! hooks (`lb_connect6`, `lb_sendmsg6`, `lb_recvmsg6`, `lb_getpeername6`) as IPv4 ones
//! through theirs: a backend pod answers, the socket names the frontend, sessionAffinity
//! holds (keyed by the socket's source), a frontend without endpoints is refused, a source
//! outside the ranges is dropped (`lb_sock_drop` on IPv6 packets), and a connected UDP
//! socket leaves a removed backend. A dual-stack socket reaches an IPv4 frontend through its
//! IPv4-mapped address (`::ffff:a.b.c.d`) the same way.
//!
//! The control plane does not program IPv6 Services yet: `Lb6` writes them straight into the
//! agent's pinned maps, where the reconciler will write them (one helper, to become
//! manifests). IPv4 Services come from manifests, as usual. Each test runs a one-node lab
//! made dual-stack, with a cgroup for the node's host processes (the agent's `--cgroup`);
//! the pods run dual-stack servers of the test's own.
// Harness code: a lab that cannot be built panics with a message.
#![allow(clippy::missing_panics_doc)]

use std::{
    collections::{BTreeSet, HashMap as StdHashMap},
    io::{ErrorKind, Read, Write},
    net::{
        IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, SocketAddrV6, TcpListener, TcpStream,
        UdpSocket,
    },
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, MutexGuard,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use aya::maps::{lpm_trie::Key as LpmKey, Array, HashMap, LpmTrie, Map, MapData, PerCpuArray};
use lb_common::{
    ipv6_words, map_names, stat, AffinityEntry, AffinityKeyV6, BackendSlotKey, BackendV6,
    Ipv6Words, MemberKey, ServiceEntry, ServiceKeyV6, SourceRangeV6, IPPROTO_TCP, IPPROTO_UDP,
    SCOPE_ALL, SVC_F_CLUSTER_IP, SVC_F_SOURCE_RANGES,
};
use lb_testkit::{
    lab::{
        echo_manifest, in_netns, run, tutorial_manifests, Lab, HTTP_PORT, NODE_IP6, POD_GATEWAY,
        POD_GATEWAY6, UDP_PORT,
    },
    require_root,
};
use lb_userspace::datapath::host_sockets;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn turn() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A second address of the node, for sockets bound to it.
const NODE_IP6_B: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x198, 0x18, 0, 0, 0, 0, 3);
/// IPv6 ClusterIPs of the tests.
const WEB6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
const FENCED6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x20);
/// The IPv4 ClusterIPs of `echo_manifest` (TCP 53 → 8080, UDP 53 → 5353) and of the
/// tutorial's `empty` (no endpoints).
const ECHO: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 53);
const EMPTY: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 99);

fn v6(addr: Ipv6Addr, port: u16) -> SocketAddr {
    SocketAddr::V6(SocketAddrV6::new(addr, port, 0, 0))
}

fn mapped(addr: Ipv4Addr, port: u16) -> SocketAddr {
    v6(addr.to_ipv6_mapped(), port)
}

/// Servers in every pod, dual-stack (IPv6 and IPv4-mapped clients): TCP on `HTTP_PORT`
/// writes "<pod> <client address>" and closes; UDP on `UDP_PORT` answers each datagram with
/// the same. Stopped when dropped.
struct PodServers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl PodServers {
    fn start(lab: &Lab) -> PodServers {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for p in &lab.pods {
            let (tcp, udp) = in_netns(&p.ns, || {
                let tcp = TcpListener::bind(("::", HTTP_PORT))?;
                tcp.set_nonblocking(true)?;
                let udp = UdpSocket::bind(("::", UDP_PORT))?;
                udp.set_read_timeout(Some(Duration::from_millis(50)))?;
                Ok((tcp, udp))
            })
            .unwrap_or_else(|e| panic!("servers in {}: {e}", p.name));
            let (name, flag) = (p.name.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    match tcp.accept() {
                        Ok((mut s, peer)) => {
                            let _ = s.set_nonblocking(false);
                            let _ = s.write_all(format!("{name} {}", peer.ip()).as_bytes());
                            let _ = s.shutdown(Shutdown::Both);
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            }));
            let (name, flag) = (p.name.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 512];
                while !flag.load(Ordering::Relaxed) {
                    if let Ok((_, peer)) = udp.recv_from(&mut buf) {
                        let _ = udp.send_to(format!("{name} {}", peer.ip()).as_bytes(), peer);
                    }
                }
            }));
        }
        PodServers { stop, threads }
    }
}

impl Drop for PodServers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A frontend as `Lb6` writes it.
struct Frontend6 {
    addr: Ipv6Addr,
    port: u16,
    proto: u8,
    /// Backends: (address, port).
    backends: Vec<(Ipv6Addr, u16)>,
    /// sessionAffinity ClientIP timeout (0: none).
    affinity_s: u32,
    /// loadBalancerSourceRanges (none: every client).
    source_ranges: Vec<(Ipv6Addr, u8)>,
}

impl Frontend6 {
    fn new(addr: Ipv6Addr, port: u16, proto: u8, backends: &[(Ipv6Addr, u16)]) -> Frontend6 {
        Frontend6 {
            addr,
            port,
            proto,
            backends: backends.to_vec(),
            affinity_s: 0,
            source_ranges: Vec::new(),
        }
    }
}

/// IPv6 Services written into an agent's pinned maps as its reconciler writes IPv4 ones:
/// backends before the slots that name them, slots and members before the entry whose count
/// covers them. Service and backend ids start at 60000, above any the agent hands out here.
/// The one place that programs IPv6 frontends: manifests, once the control plane speaks IPv6.
struct Lb6 {
    services: HashMap<MapData, ServiceKeyV6, ServiceEntry>,
    slots: HashMap<MapData, BackendSlotKey, u32>,
    members: HashMap<MapData, MemberKey, u32>,
    backends: HashMap<MapData, u32, BackendV6>,
    ranges: LpmTrie<MapData, SourceRangeV6, u8>,
    node_addr: Array<MapData, Ipv6Words>,
    /// Backend ids by (address, port, protocol).
    backend_ids: StdHashMap<(Ipv6Addr, u16, u8), u32>,
    /// The backend ids each service id's slots hold.
    programmed: StdHashMap<u32, Vec<u32>>,
}

fn pinned(pin: &Path, name: &str) -> MapData {
    MapData::from_pin(pin.join(name)).unwrap_or_else(|e| panic!("{name} pinned: {e}"))
}

impl Lb6 {
    fn open(pin: &Path) -> Lb6 {
        Lb6 {
            services: HashMap::try_from(Map::HashMap(pinned(pin, map_names::LB6_SERVICES)))
                .expect("LB6_SERVICES"),
            slots: HashMap::try_from(Map::HashMap(pinned(pin, map_names::LB_SLOTS)))
                .expect("LB_SLOTS"),
            members: HashMap::try_from(Map::HashMap(pinned(pin, map_names::LB_MEMBERS)))
                .expect("LB_MEMBERS"),
            backends: HashMap::try_from(Map::HashMap(pinned(pin, map_names::LB6_BACKENDS)))
                .expect("LB6_BACKENDS"),
            ranges: LpmTrie::try_from(Map::LpmTrie(pinned(pin, map_names::LB6_SRC_RANGES)))
                .expect("LB6_SRC_RANGES"),
            node_addr: Array::try_from(Map::Array(pinned(pin, map_names::LB6_NODE_ADDR)))
                .expect("LB6_NODE_ADDR"),
            backend_ids: StdHashMap::new(),
            programmed: StdHashMap::new(),
        }
    }

    fn set_node_addr(&mut self, addr: Ipv6Addr) {
        self.node_addr
            .set(0, ipv6_words(addr.octets()), 0)
            .expect("LB6_NODE_ADDR");
    }

    /// Programs frontend `fe` as service `svc_id` (60000 and up), replacing what it had.
    fn program(&mut self, svc_id: u32, fe: &Frontend6) {
        let mut ids = Vec::new();
        for &(addr, port) in &fe.backends {
            let next = 60_000 + self.backend_ids.len() as u32;
            let id = *self
                .backend_ids
                .entry((addr, port, fe.proto))
                .or_insert(next);
            let b = BackendV6 {
                addr: ipv6_words(addr.octets()),
                port: port.to_be(),
                proto: fe.proto,
                flags: 0,
            };
            self.backends.insert(id, b, 0).expect("LB6_BACKENDS");
            ids.push(id);
        }
        for (slot, id) in ids.iter().enumerate() {
            let slot = slot as u32;
            self.slots
                .insert(BackendSlotKey { svc_id, slot }, *id, 0)
                .expect("LB_SLOTS");
            self.members
                .insert(
                    MemberKey {
                        svc_id,
                        backend_id: *id,
                    },
                    slot,
                    0,
                )
                .expect("LB_MEMBERS");
        }
        for (net, len) in &fe.source_ranges {
            self.ranges
                .insert(&range_key(svc_id, *net, *len), 1, 0)
                .expect("LB6_SRC_RANGES");
        }
        let key = ServiceKeyV6 {
            addr: ipv6_words(fe.addr.octets()),
            port: fe.port.to_be(),
            proto: fe.proto,
            scope: SCOPE_ALL,
        };
        let flags = SVC_F_CLUSTER_IP
            | if fe.source_ranges.is_empty() {
                0
            } else {
                SVC_F_SOURCE_RANGES
            };
        let entry = ServiceEntry {
            svc_id,
            count: ids.len() as u32,
            flags,
            affinity_timeout_s: fe.affinity_s,
            affinity_group: u64::from(svc_id),
            maglev: 0,
            _pad: 0,
        };
        self.services.insert(key, entry, 0).expect("LB6_SERVICES");
        // What the entry's count no longer covers.
        let old = self
            .programmed
            .insert(svc_id, ids.clone())
            .unwrap_or_default();
        for slot in ids.len()..old.len() {
            let _ = self.slots.remove(&BackendSlotKey {
                svc_id,
                slot: slot as u32,
            });
        }
        for id in old.iter().filter(|id| !ids.contains(id)) {
            let _ = self.members.remove(&MemberKey {
                svc_id,
                backend_id: *id,
            });
        }
    }
}

/// The `LB6_SRC_RANGES` key of a range of service `svc_id`.
fn range_key(svc_id: u32, net: Ipv6Addr, len: u8) -> LpmKey<SourceRangeV6> {
    LpmKey::new(
        32 + u32::from(len),
        SourceRangeV6 {
            svc_id_be: svc_id.to_be(),
            addr: ipv6_words(net.octets()),
        },
    )
}

/// A dual-stack one-node lab with a host cgroup, servers in its pods, the given IPv4
/// manifests, an agent (`--cgroup`) that has programmed them, and `Lb6` on its maps with the
/// node's IPv6 address.
struct Setup {
    // Stopped before the lab goes.
    _servers: PodServers,
    lb6: Lb6,
    lab: Lab,
}

fn setup(pods: usize, manifests: impl Fn(&Lab) -> Vec<(String, String)>) -> Setup {
    let mut lab = Lab::up(pods).expect("lab up");
    lab.add_ipv6().expect("IPv6 addresses");
    lab.add_host_cgroup().expect("host cgroup");
    run(&[
        "ip",
        "-6",
        "-n",
        &lab.node_ns,
        "addr",
        "add",
        &format!("{NODE_IP6_B}/64"),
        "dev",
        "ext0",
        "nodad",
    ])
    .expect("second node address");
    let servers = PodServers::start(&lab);
    for (name, text) in manifests(&lab) {
        lab.write_manifest(&name, &text).expect("manifest");
    }
    lab.start_agent().expect("agent");
    lab.wait_healthy(Duration::from_secs(20)).expect("healthy");
    let mut lb6 = Lb6::open(&lab.pin);
    lb6.set_node_addr(NODE_IP6);
    Setup {
        _servers: servers,
        lb6,
        lab,
    }
}

/// The pods' IPv6 addresses with `port`.
fn pod_backends(lab: &Lab, port: u16) -> Vec<(Ipv6Addr, u16)> {
    lab.pods.iter().map(|p| (p.ip6(), port)).collect()
}

/// What a TCP exchange from a node's process showed: the server's answer ("<pod> <client
/// address>") and the socket's peer address.
#[derive(Debug)]
struct Answer {
    pod: String,
    client: IpAddr,
    peer: SocketAddr,
}

fn parse_answer(text: &str, peer: SocketAddr) -> std::io::Result<Answer> {
    let mut words = text.split_whitespace();
    let (Some(pod), Some(client)) = (words.next(), words.next()) else {
        return Err(std::io::Error::other(format!("odd answer {text:?}")));
    };
    Ok(Answer {
        pod: pod.to_string(),
        client: client.parse().map_err(std::io::Error::other)?,
        peer,
    })
}

/// One TCP connection from a node's process to `to` (bound to `bind` first, if given).
fn tcp_from_node(lab: &Lab, to: SocketAddr, bind: Option<Ipv6Addr>) -> std::io::Result<Answer> {
    lab.host_socket(move || {
        let mut s = match bind {
            None => TcpStream::connect_timeout(&to, Duration::from_millis(1500))?,
            Some(ip) => connect_bound(ip, to)?,
        };
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let peer = s.peer_addr()?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        parse_answer(&text, peer)
    })
}

/// A TCP connection from `bind` (std cannot bind before connecting: through the system
/// calls), given up after 1.5 s.
fn connect_bound(bind: Ipv6Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    use std::os::fd::FromRawFd;
    fn sockaddr(ip: Ipv6Addr, port: u16) -> libc::sockaddr_in6 {
        // SAFETY: sockaddr_in6 is plain data; zeroes are valid.
        let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
        sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        sa.sin6_port = port.to_be();
        sa.sin6_addr.s6_addr = ip.octets();
        sa
    }
    let check = |r: libc::c_int| {
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(r)
        }
    };
    let SocketAddr::V6(to) = to else {
        return Err(std::io::Error::other("an IPv6 destination"));
    };
    let len = size_of::<libc::sockaddr_in6>() as libc::socklen_t;
    // SAFETY: plain socket system calls on a descriptor this function owns; the stream
    // takes it over.
    unsafe {
        let fd = check(libc::socket(
            libc::AF_INET6,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
        ))?;
        let stream = TcpStream::from_raw_fd(fd);
        let local = sockaddr(bind, 0);
        check(libc::bind(fd, (&raw const local).cast(), len))?;
        let tv = libc::timeval {
            tv_sec: 1,
            tv_usec: 500_000,
        };
        check(libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&raw const tv).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        ))?;
        let remote = sockaddr(*to.ip(), to.port());
        check(libc::connect(fd, (&raw const remote).cast(), len)).map_err(|e| {
            // A connect that timed out by SO_SNDTIMEO says EINPROGRESS.
            if e.raw_os_error() == Some(libc::EINPROGRESS) {
                std::io::Error::from(ErrorKind::TimedOut)
            } else {
                e
            }
        })?;
        Ok(stream)
    }
}

/// One datagram from a node's process to `to` on an unconnected socket: the answer and the
/// address `recvfrom` says it came from.
fn udp_sendto_from_node(lab: &Lab, to: SocketAddr) -> std::io::Result<Answer> {
    lab.host_socket(move || {
        let s = UdpSocket::bind(("::", 0))?;
        s.set_read_timeout(Some(Duration::from_secs(1)))?;
        s.send_to(b"q", to)?;
        let mut buf = [0u8; 512];
        let (n, from) = s.recv_from(&mut buf)?;
        parse_answer(&String::from_utf8_lossy(&buf[..n]), from)
    })
}

/// A connected UDP socket of a node's process.
fn udp_connected_from_node(lab: &Lab, to: SocketAddr) -> std::io::Result<UdpSocket> {
    lab.host_socket(move || {
        let s = UdpSocket::bind(("::", 0))?;
        s.connect(to)?;
        s.set_read_timeout(Some(Duration::from_secs(1)))?;
        Ok(s)
    })
}

/// One exchange on a connected UDP socket.
fn exchange(s: &UdpSocket) -> std::io::Result<Answer> {
    s.send(b"q")?;
    let mut buf = [0u8; 512];
    let n = s.recv(&mut buf)?;
    parse_answer(&String::from_utf8_lossy(&buf[..n]), s.peer_addr()?)
}

/// Makes `s` send a hop-by-hop options header and a destination options header (each a
/// PadN option) before its UDP header.
fn with_extension_headers(s: &UdpSocket) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // Next header (the kernel's), length 0 (8 bytes), PadN of 4 bytes.
    let header: [u8; 8] = [0, 0, 1, 4, 0, 0, 0, 0];
    for opt in [libc::IPV6_HOPOPTS, libc::IPV6_DSTOPTS] {
        // SAFETY: setsockopt on a socket `s` owns, with a buffer of the length given.
        let r = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_IPV6,
                opt,
                header.as_ptr().cast(),
                header.len() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// `LB_STATS[index]`, summed over the CPUs.
fn global_stat(pin: &Path, index: u32) -> u64 {
    let stats: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(Map::PerCpuArray(pinned(pin, map_names::LB_STATS)))
            .expect("LB_STATS");
    stats.get(&index, 0).expect("LB_STATS").iter().sum()
}

/// A node's process reaches an IPv6 ClusterIP over TCP and UDP (unconnected and connected):
/// a pod answers, and saw the node's address; `getpeername` and `recvfrom` name the
/// frontend, never the pod. Without the IPv6 hooks the ClusterIP is no address of anything:
/// the connection goes nowhere.
#[test]
fn a_node_process_reaches_an_ipv6_cluster_ip_and_sees_the_frontend() {
    require_root();
    let _turn = turn();
    let mut s = setup(2, |_| Vec::new());
    let lab = &s.lab;
    let tcp = Frontend6::new(WEB6, 80, IPPROTO_TCP, &pod_backends(lab, HTTP_PORT));
    let udp = Frontend6::new(WEB6, 53, IPPROTO_UDP, &pod_backends(lab, UDP_PORT));
    s.lb6.program(60_001, &tcp);
    s.lb6.program(60_002, &udp);
    let lab = &s.lab;
    let pods: BTreeSet<String> = lab.pods.iter().map(|p| p.name.clone()).collect();

    let mut seen = BTreeSet::new();
    for _ in 0..16 {
        let a = tcp_from_node(lab, v6(WEB6, 80), None).expect("TCP to the ClusterIP");
        assert_eq!(a.peer, v6(WEB6, 80), "getpeername: the frontend ({a:?})");
        // The node's address on the route to the pod: the source is the node's own.
        assert_eq!(
            a.client,
            IpAddr::V6(POD_GATEWAY6),
            "the pod saw the node ({a:?})"
        );
        assert!(pods.contains(&a.pod), "{a:?}");
        seen.insert(a.pod);
    }
    assert_eq!(seen, pods, "both pods answer");

    let a = udp_sendto_from_node(lab, v6(WEB6, 53)).expect("UDP sendto");
    assert_eq!(a.peer, v6(WEB6, 53), "recvfrom: the frontend ({a:?})");
    assert!(pods.contains(&a.pod), "{a:?}");

    let sock = udp_connected_from_node(lab, v6(WEB6, 53)).expect("UDP connect");
    let first = exchange(&sock).expect("UDP on a connected socket");
    assert_eq!(first.peer, v6(WEB6, 53), "getpeername: the frontend");
    for _ in 0..4 {
        let a = exchange(&sock).expect("again");
        assert_eq!(a.pod, first.pod, "one connected socket, one backend");
    }
    assert!(global_stat(&lab.pin, stat::SOCK_TRANSLATED) >= 18);
}

/// sessionAffinity ClientIP for IPv6 host clients: every new connection of the node's
/// processes goes where the first went, and the affinity is the socket's source's: the
/// node's address (`LB6_NODE_ADDR`) for an unbound socket, the bound address otherwise.
/// Sixteen connections on one of two pods by chance: one in 2^15.
#[test]
fn ipv6_host_clients_get_session_affinity_by_their_source() {
    require_root();
    let _turn = turn();
    let mut s = setup(2, |_| Vec::new());
    let mut fe = Frontend6::new(WEB6, 80, IPPROTO_TCP, &pod_backends(&s.lab, HTTP_PORT));
    fe.affinity_s = 10_800;
    s.lb6.program(60_011, &fe);
    let lab = &s.lab;

    for bind in [None, Some(NODE_IP6_B)] {
        let pods: Vec<String> = (0..16)
            .map(|_| {
                let a = tcp_from_node(lab, v6(WEB6, 80), bind).expect("TCP");
                assert_eq!(a.peer, v6(WEB6, 80));
                assert_eq!(a.client, IpAddr::V6(bind.unwrap_or(POD_GATEWAY6)));
                a.pod
            })
            .collect();
        let distinct: BTreeSet<&String> = pods.iter().collect();
        assert_eq!(distinct.len(), 1, "bound to {bind:?}: {pods:?}");
    }
    let affinity: HashMap<MapData, AffinityKeyV6, AffinityEntry> =
        HashMap::try_from(Map::LruHashMap(pinned(&lab.pin, map_names::LB6_AFFINITY)))
            .expect("LB6_AFFINITY");
    let clients: BTreeSet<Ipv6Addr> = affinity
        .keys()
        .map(|k| k.expect("key"))
        .filter(|k| k.group == 60_011)
        .map(|k| Ipv6Addr::from(lb_common::ipv6_bytes(k.client)))
        .collect();
    assert_eq!(clients, BTreeSet::from([NODE_IP6, NODE_IP6_B]));
}

/// An IPv6 frontend without endpoints refuses a node's process at once: `connect` and
/// `sendto` fail with ECONNREFUSED, as kube-proxy's REJECT answers.
#[test]
fn an_ipv6_frontend_without_endpoints_refuses_node_processes() {
    require_root();
    let _turn = turn();
    let mut s = setup(1, |_| Vec::new());
    s.lb6
        .program(60_021, &Frontend6::new(WEB6, 80, IPPROTO_TCP, &[]));
    s.lb6
        .program(60_022, &Frontend6::new(WEB6, 53, IPPROTO_UDP, &[]));
    let lab = &s.lab;
    let started = Instant::now();
    let e = tcp_from_node(lab, v6(WEB6, 80), None).expect_err("refused");
    assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}");
    let e = udp_sendto_from_node(lab, v6(WEB6, 53)).expect_err("refused");
    assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}");
    assert!(started.elapsed() < Duration::from_secs(1), "at once");
    assert!(global_stat(&lab.pin, stat::SOCK_REFUSED) >= 2);
}

/// A node's process outside an IPv6 frontend's source ranges is dropped, as kube-proxy's
/// firewall chain drops it: its TCP connect times out and its datagrams go unanswered,
/// where the frontend's address itself would refuse it (something outside answers there,
/// as the route leads out). A socket bound to an address in the ranges gets through.
#[test]
fn an_ipv6_source_outside_the_ranges_is_dropped_not_refused() {
    require_root();
    let _turn = turn();
    let mut s = setup(1, |_| Vec::new());
    let mut tcp = Frontend6::new(FENCED6, 80, IPPROTO_TCP, &pod_backends(&s.lab, HTTP_PORT));
    tcp.source_ranges = vec![(NODE_IP6_B, 128)];
    let mut udp = Frontend6::new(FENCED6, 53, IPPROTO_UDP, &pod_backends(&s.lab, UDP_PORT));
    udp.source_ranges = vec![(NODE_IP6_B, 128)];
    s.lb6.program(60_031, &tcp);
    s.lb6.program(60_032, &udp);
    let lab = &s.lab;
    // The outside answers at the frontend's address (what an untranslated packet meets).
    run(&[
        "ip",
        "-6",
        "-n",
        &lab.ext_ns,
        "addr",
        "add",
        &format!("{FENCED6}/128"),
        "dev",
        "lo",
        "nodad",
    ])
    .expect("the frontend's address outside");
    let e = in_netns(&lab.node_ns, || {
        TcpStream::connect_timeout(&v6(FENCED6, 80), Duration::from_secs(2)).map(|_| ())
    })
    .expect_err("no listener outside");
    assert_eq!(
        e.kind(),
        ErrorKind::ConnectionRefused,
        "outside the hooks' cgroup, the outside refuses: {e}"
    );

    let dropped = global_stat(&lab.pin, stat::SOCK_DROPPED);
    let e = tcp_from_node(lab, v6(FENCED6, 80), None).expect_err("dropped");
    assert!(
        matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock),
        "a timeout, not an error: {e}"
    );
    let sock = udp_connected_from_node(lab, v6(FENCED6, 53)).expect("UDP connect");
    for _ in 0..3 {
        let e = exchange(&sock).expect_err("no answer");
        assert!(
            matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock),
            "no answer, no error: {e}"
        );
    }
    assert!(global_stat(&lab.pin, stat::SOCK_DROPPED) > dropped);

    // Extension headers before the UDP header (hop-by-hop, destination options): the
    // outside refuses such a datagram too, and a fenced socket's is dropped all the same.
    let e = in_netns(&lab.node_ns, || {
        let s = UdpSocket::bind(("::", 0))?;
        s.connect(v6(FENCED6, 53))?;
        s.set_read_timeout(Some(Duration::from_secs(1)))?;
        with_extension_headers(&s)?;
        exchange(&s).map(|_| ())
    })
    .expect_err("nothing listens outside");
    assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}");
    let sock = udp_connected_from_node(lab, v6(FENCED6, 53)).expect("UDP connect");
    with_extension_headers(&sock).expect("options");
    let e = exchange(&sock).expect_err("no answer");
    assert!(
        matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock),
        "dropped past its extension headers: {e}"
    );

    let a = tcp_from_node(lab, v6(FENCED6, 80), Some(NODE_IP6_B)).expect("in the ranges");
    assert_eq!(a.peer, v6(FENCED6, 80));
    assert_eq!(a.client, IpAddr::V6(NODE_IP6_B));
}

/// A dual-stack socket of a node's process addresses an IPv4 ClusterIP as `::ffff:a.b.c.d`:
/// translated through the IPv4 maps (connect6 for TCP and connected UDP, sendmsg4 for a
/// datagram to a mapped address), the backend written back mapped, and the frontend shown
/// mapped by `getpeername` and `recvfrom`; a frontend without endpoints refuses it.
#[test]
fn a_dual_stack_socket_reaches_an_ipv4_cluster_ip_by_its_mapped_address() {
    require_root();
    let _turn = turn();
    // The echo Service over the lab's pods, and `empty` (no endpoints).
    let s = setup(2, |lab| {
        let mut files = vec![("echo.yaml".to_string(), echo_manifest(&lab.pods))];
        files.extend(
            tutorial_manifests(&lab.pods)
                .into_iter()
                .filter(|(n, _)| n == "empty.yaml"),
        );
        files
    });
    let lab = &s.lab;
    let pods: BTreeSet<String> = lab.pods.iter().map(|p| p.name.clone()).collect();
    // The node's address on the route to the pod, as a dual-stack server shows it.
    let node = IpAddr::V6(POD_GATEWAY.to_ipv6_mapped());

    let mut seen = BTreeSet::new();
    for _ in 0..12 {
        let a = tcp_from_node(lab, mapped(ECHO, 53), None).expect("TCP to a mapped ClusterIP");
        assert_eq!(
            a.peer,
            mapped(ECHO, 53),
            "getpeername: the mapped frontend ({a:?})"
        );
        assert_eq!(a.client, node, "the pod saw the node ({a:?})");
        seen.insert(a.pod);
    }
    assert_eq!(seen, pods, "both pods answer");

    let a = udp_sendto_from_node(lab, mapped(ECHO, 53)).expect("UDP sendto");
    assert_eq!(
        a.peer,
        mapped(ECHO, 53),
        "recvfrom: the mapped frontend ({a:?})"
    );
    let sock = udp_connected_from_node(lab, mapped(ECHO, 53)).expect("UDP connect");
    let a = exchange(&sock).expect("UDP on a connected socket");
    assert_eq!(
        a.peer,
        mapped(ECHO, 53),
        "getpeername: the mapped frontend ({a:?})"
    );
    assert!(pods.contains(&a.pod));

    let e = tcp_from_node(lab, mapped(EMPTY, 80), None).expect_err("refused");
    assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}");
}

/// Opens `n` connected UDP sockets of node processes to `to`: each with the pod it talks
/// to.
fn connected_sockets(lab: &Lab, to: SocketAddr, n: usize) -> Vec<(UdpSocket, String)> {
    (0..n)
        .map(|_| {
            let s = udp_connected_from_node(lab, to).expect("UDP connect");
            let a = exchange(&s).expect("first exchange");
            assert_eq!(a.peer, to);
            (s, a.pod)
        })
        .collect()
}

/// Whether a connected UDP socket was destroyed (sock_diag): its next calls fail
/// (ECONNABORTED once, then EDESTADDRREQ: it is no longer connected).
fn destroyed(s: &UdpSocket) -> bool {
    exchange(s).is_err() && s.send(b"q").is_err()
}

/// Connected IPv6 UDP sockets of the node's processes leave a backend removed from their
/// frontend: the agent's sweep (`host_sockets::leave_removed_backends`, which the agent
/// runs after an apply; its control plane has no IPv6 Services yet, so the test runs it
/// with the frontend's new backend list) destroys the sockets at that backend and only
/// those, and a new socket goes to the backend that is left.
#[test]
fn connected_ipv6_udp_sockets_leave_a_removed_backend() {
    require_root();
    let _turn = turn();
    let mut s = setup(2, |_| Vec::new());
    let all = pod_backends(&s.lab, UDP_PORT);
    s.lb6
        .program(60_041, &Frontend6::new(WEB6, 53, IPPROTO_UDP, &all));
    let sockets = connected_sockets(&s.lab, v6(WEB6, 53), 8);
    let removed = sockets[0].1.clone();
    let on_removed = sockets.iter().filter(|(_, p)| *p == removed).count();
    let gone = s.lab.pod(&removed).ip6();
    let kept: Vec<(Ipv6Addr, u16)> = all.iter().copied().filter(|(a, _)| *a != gone).collect();
    s.lb6
        .program(60_041, &Frontend6::new(WEB6, 53, IPPROTO_UDP, &kept));

    let pin = s.lab.pin.clone();
    let n = in_netns(&s.lab.node_ns, move || {
        host_sockets::leave_removed_backends(&pin, |fe, be| {
            fe != v6(WEB6, 53) || be.ip() != IpAddr::V6(gone)
        })
        .map_err(std::io::Error::other)
    })
    .expect("the sweep");
    assert_eq!(n, on_removed, "the sockets at {removed}");
    for (sock, pod) in &sockets {
        if *pod == removed {
            assert!(
                destroyed(sock),
                "a socket at the removed {pod} is destroyed"
            );
        } else {
            let a = exchange(sock).expect("a socket at the other pod goes on");
            assert_eq!(a.pod, *pod);
        }
    }
    for (_, pod) in connected_sockets(&s.lab, v6(WEB6, 53), 4) {
        assert_ne!(pod, removed, "new sockets go to the backend left");
    }
}

/// A dual-stack UDP socket connected to an IPv4 ClusterIP by its mapped address (recorded
/// in `LB4_SOCK_REV`, listed by sock_diag as an IPv6 socket) is destroyed by the agent
/// itself when its backend leaves the Service's EndpointSlice, and only such sockets.
#[test]
fn the_agent_moves_a_dual_stack_udp_socket_off_a_removed_ipv4_backend() {
    require_root();
    let _turn = turn();
    let s = setup(2, |lab| {
        vec![("echo.yaml".to_string(), echo_manifest(&lab.pods))]
    });
    let lab = &s.lab;
    let sockets = connected_sockets(lab, mapped(ECHO, 53), 8);
    let removed = sockets[0].1.clone();
    let kept: Vec<_> = lab
        .pods
        .iter()
        .filter(|p| p.name != removed)
        .cloned()
        .collect();
    lab.write_manifest("echo.yaml", &echo_manifest(&kept))
        .expect("echo without it");
    let started = Instant::now();
    while !sockets
        .iter()
        .filter(|(_, p)| *p == removed)
        .all(|(sock, _)| sock.send(b"q").is_err())
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "sockets at {removed} still connected; log:\n{}",
            lab.agent_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for (sock, pod) in sockets.iter().filter(|(_, p)| *p != removed) {
        let a = exchange(sock).expect("a socket at the other pod goes on");
        assert_eq!(a.pod, *pod);
    }
    for (_, pod) in connected_sockets(lab, mapped(ECHO, 53), 4) {
        assert_ne!(pod, removed, "new sockets go to the backend left");
    }
    assert!(
        lab.agent_log()
            .contains("connected UDP sockets of the node destroyed"),
        "{}",
        lab.agent_log()
    );
}
