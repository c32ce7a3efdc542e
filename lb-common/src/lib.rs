//! Map keys and values shared by the BPF datapath (`lb-ebpf`) and the node agent (`lb-userspace`).
//!
//! Every type is `#[repr(C)]` with every byte a named field, so that hash keys never carry
//! uninitialised padding and both sides agree on the layout. Addresses and ports are stored in
//! network byte order (the bytes as they appear on the wire, read as a native integer); counts,
//! ids and flags are in host byte order. The `user` feature derives `bytemuck::Pod`, which
//! rejects any implicit padding at compile time, and `aya::Pod` for the map APIs.
#![no_std]
// Padding is a named, public field (`_pad`) so that keys are built with every byte set.
#![allow(clippy::pub_underscore_fields)]

/// IP protocol numbers the datapath translates.
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Map names, spelled as the maps are (they are also the pinned file names under the agent's
/// `--pin-path`).
pub mod map_names {
    pub const LB4_SERVICES: &str = "LB4_SERVICES";
    pub const LB_SLOTS: &str = "LB_SLOTS";
    pub const LB4_BACKENDS: &str = "LB4_BACKENDS";
    pub const LB4_CONNTRACK: &str = "LB4_CONNTRACK";
    pub const LB_STATS: &str = "LB_STATS";
    pub const LB_SVC_STATS: &str = "LB_SVC_STATS";
    pub const LB_MEMBERS: &str = "LB_MEMBERS";
    pub const LB4_AFFINITY: &str = "LB4_AFFINITY";
    pub const LB_IFACES: &str = "LB_IFACES";
    pub const LB_BE_STATS: &str = "LB_BE_STATS";
    pub const LB_FLOWS: &str = "LB_FLOWS";
    pub const LB_CONFIG: &str = "LB_CONFIG";
    pub const LB4_SNAT: &str = "LB4_SNAT";
    pub const LB_MAGLEV: &str = "LB_MAGLEV";
    pub const LB4_SRC_RANGES: &str = "LB4_SRC_RANGES";
    pub const LB4_SOCK_REV: &str = "LB4_SOCK_REV";
    pub const LB_CLOCK: &str = "LB_CLOCK";
    pub const LB4_FRAGS: &str = "LB4_FRAGS";
    pub const LB4_SOCK_DROP: &str = "LB4_SOCK_DROP";
    pub const LB6_SERVICES: &str = "LB6_SERVICES";
    pub const LB6_BACKENDS: &str = "LB6_BACKENDS";
    pub const LB6_CONNTRACK: &str = "LB6_CONNTRACK";
    pub const LB6_AFFINITY: &str = "LB6_AFFINITY";
    pub const LB6_SNAT: &str = "LB6_SNAT";
    pub const LB6_SRC_RANGES: &str = "LB6_SRC_RANGES";
    pub const LB6_SOCK_REV: &str = "LB6_SOCK_REV";
    pub const LB6_SOCK_DROP: &str = "LB6_SOCK_DROP";
    pub const LB6_FRAGS: &str = "LB6_FRAGS";
    pub const LB6_NODE_ADDR: &str = "LB6_NODE_ADDR";
}

/// Program names, spelled as the programs are in the object file.
pub mod program_names {
    /// The translation on external interfaces whose driver runs XDP natively.
    pub const LB_XDP: &str = "lb_xdp";
    /// Answers (TCP RST, ICMP port-unreachable) what `lb_xdp` passed on for a frontend
    /// without endpoints; TC ingress beside `lb_xdp`.
    pub const LB_TC_REJECT: &str = "lb_tc_reject";
    /// The translation for packets from pods (TC ingress on their veths).
    pub const LB_TC_POD: &str = "lb_tc_pod";
    /// The translation on external interfaces without native XDP (TC ingress).
    pub const LB_TC_EXT: &str = "lb_tc_ext";
    /// Reverse NAT where packets leave towards a pod or the outside (TC egress of pod and
    /// external interfaces), whatever link the reply came in by.
    pub const LB_TC_EGRESS: &str = "lb_tc_egress";
    /// Reads both of the kernel's clocks at once for the agent's calibration of `LB_CLOCK`
    /// (run by BPF_PROG_TEST_RUN, never attached).
    pub const LB_CLOCK: &str = "lb_clock";
    /// Does nothing: the bench's measure of running any XDP program (never attached).
    pub const LB_XDP_PASS: &str = "lb_xdp_pass";
    /// Drops what a host socket sends to a frontend the socket hooks fenced it off (cgroup
    /// v2 egress, attached beside them).
    pub const LB_SOCK_DROP: &str = "lb_sock_drop";
    /// The cgroup v2 socket hooks (host-network clients), in attach order: IPv4, then IPv6
    /// (which also translates IPv4-mapped addresses of dual-stack sockets).
    pub const SOCK: [&str; 8] = [
        "lb_connect4",
        "lb_sendmsg4",
        "lb_recvmsg4",
        "lb_getpeername4",
        "lb_connect6",
        "lb_sendmsg6",
        "lb_recvmsg6",
        "lb_getpeername6",
    ];
}

/// Default capacity of the service maps (entries); the agent sets them when it creates the
/// maps (`--max-services`, `--max-backends`, `--max-backend-slots`).
/// `LB4_SERVICES` and `LB_SVC_STATS` (service ids index it; id 0 is never used, so one
/// entry fewer frontends fit).
pub const DEFAULT_SERVICES: u32 = 65_536;
/// `LB4_BACKENDS` and `LB_BE_STATS` (backend ids index it; id 0 is never used).
pub const DEFAULT_BACKENDS: u32 = 65_536;
/// `LB_SLOTS` and `LB_MEMBERS`: all frontends' backend lists together.
pub const DEFAULT_BACKEND_SLOTS: u32 = 262_144;
pub const DEFAULT_CONNTRACK_ENTRIES: u32 = 262_144;
pub const AFFINITY_ENTRIES: u32 = 65_536;
/// Entries of the SNAT map (flows from outside to a backend on another node).
pub const DEFAULT_SNAT_ENTRIES: u32 = 131_072;
/// Maglev lookup tables: default size of one (a prime) and default number of tables. The
/// tables of `LB_MAGLEV` are `MAGLEV_SIZE` entries each, back to back.
pub const DEFAULT_MAGLEV_SIZE: u32 = 4093;
pub const DEFAULT_MAGLEV_TABLES: u32 = 1024;
/// loadBalancerSourceRanges prefixes, over all Services.
pub const SOURCE_RANGE_ENTRIES: u32 = 16_384;
/// Host sockets translated by the cgroup hooks (their reverse entries).
pub const SOCK_REVERSE_ENTRIES: u32 = 65_536;
/// Host sockets fenced off a frontend (`LB4_SOCK_DROP`).
pub const SOCK_DROP_ENTRIES: u32 = 16_384;
/// How many ports a new SNAT flow tries before it gives up (dropped, counted).
pub const SNAT_TRIES: u32 = 32;
/// Datagrams whose fragments are being translated (`LB4_FRAGS`).
pub const FRAG_ENTRIES: u32 = 16_384;
/// How long (ns) a first fragment's ports are used for the later fragments of its datagram
/// (Linux gives up reassembling after 30 s, `ipfrag_time`).
pub const FRAG_TIMEOUT_NS: u64 = 30_000_000_000;

/// An IPv6 address as the packet carries it: four 32-bit words in network byte order (each
/// word's bytes as on the wire), so that keys hold it aligned and compare it word by word.
pub type Ipv6Words = [u32; 4];

/// The words of an IPv6 address given as its 16 bytes (network order).
pub const fn ipv6_words(b: [u8; 16]) -> Ipv6Words {
    [
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
        u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
    ]
}

/// The 16 bytes (network order) of an IPv6 address held as words.
pub const fn ipv6_bytes(w: Ipv6Words) -> [u8; 16] {
    let [a, b, c, d] = [
        w[0].to_ne_bytes(),
        w[1].to_ne_bytes(),
        w[2].to_ne_bytes(),
        w[3].to_ne_bytes(),
    ];
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}

/// How many IPv6 extension headers (hop-by-hop, routing, destination options, fragment) the
/// datapath walks to find a packet's TCP, UDP or ICMPv6 header; a packet with more is passed
/// untouched (`stat::PASS_IPV6_EXT`).
pub const IPV6_EXT_MAX: usize = 4;

/// The IPv6 twin of `HAIRPIN_SNAT_V4`: fd6c:6200::1, from a unique-local prefix the project
/// keeps for it (a link-local source would not be routed back through the node).
pub const HAIRPIN_SNAT_V6: Ipv6Words =
    ipv6_words([0xfd, 0x6c, 0x62, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);

/// Source address a hairpin flow (a pod reaching itself through a Service) is translated to,
/// so that the pod's reply leaves the pod and comes back through the node: 169.254.42.1.
pub const HAIRPIN_SNAT_V4: u32 = u32::from_ne_bytes([169, 254, 42, 1]);

/// How long (ns) a conntrack entry's `last_seen_ns` may lag before a packet refreshes it.
pub const CT_REFRESH_NS: u64 = 1_000_000_000;

macro_rules! map_type {
    ($(#[$meta:meta])* pub struct $name:ident { $($body:tt)* } size $size:expr;) => {
        $(#[$meta])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
        #[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
        pub struct $name { $($body)* }

        const _: () = assert!(core::mem::size_of::<$name>() == $size);

        #[cfg(feature = "user")]
        // SAFETY: `bytemuck::Pod` (derived above) proves the type has no padding and every
        // bit pattern is valid, which is what `aya::Pod` requires.
        unsafe impl aya::Pod for $name {}
    };
}

map_type! {
    /// A frontend: an IPv4 address, port and protocol that traffic is addressed to
    /// (a ClusterIP, a node address with a NodePort, an external or load-balancer IP).
    pub struct ServiceKeyV4 {
        /// Network byte order.
        pub addr: u32,
        /// Network byte order.
        pub port: u16,
        pub proto: u8,
        /// `SCOPE_*`: which endpoint set this entry serves.
        pub scope: u8,
    }
    size 8;
}

/// The entry serves every client (`ServiceKeyV4::scope`).
pub const SCOPE_ALL: u8 = 0;
/// The entry serves clients in this node's pods; it exists beside a `SCOPE_ALL` entry flagged
/// `SVC_F_POD_SCOPE` (an external frontend with `externalTrafficPolicy: Local`, which pods on
/// the node reach with the Cluster set).
pub const SCOPE_PODS: u8 = 1;

map_type! {
    /// What a frontend resolves to. Its usable backends are the `count` slots
    /// `BackendSlotKey { svc_id, slot: 0..count }`.
    pub struct ServiceEntry {
        /// Identifies the slot list and the per-service counters; never 0.
        pub svc_id: u32,
        /// Number of usable backends; 0 means the frontend rejects (or drops, see flags).
        pub count: u32,
        /// `SVC_F_*`.
        pub flags: u32,
        /// sessionAffinity ClientIP: seconds a client sticks to its backend; 0 = none.
        pub affinity_timeout_s: u32,
        /// Frontends of one Service port share their clients' affinity: the key of
        /// `LB4_AFFINITY` entries (a stable hash of `namespace/name:port`).
        pub affinity_group: u64,
        /// 1 + the index of the frontend's Maglev table in `LB_MAGLEV`; 0: none (random
        /// choice among the slots).
        pub maglev: u32,
        pub _pad: u32,
    }
    size 32;
}

/// Frontend kinds (informational: the datapath treats them alike).
pub const SVC_F_CLUSTER_IP: u32 = 1 << 0;
pub const SVC_F_NODE_PORT: u32 = 1 << 1;
pub const SVC_F_EXTERNAL_IP: u32 = 1 << 2;
pub const SVC_F_LOAD_BALANCER: u32 = 1 << 3;
/// With no usable backend, drop the packet instead of answering with RST / ICMP
/// port-unreachable (a Local traffic policy with endpoints only on other nodes).
pub const SVC_F_DROP_NO_ENDPOINTS: u32 = 1 << 8;
/// Packets from this node's pods use the `SCOPE_PODS` entry of the same frontend.
pub const SVC_F_POD_SCOPE: u32 = 1 << 9;
/// Only clients in the frontend's `LB4_SRC_RANGES` prefixes may connect (loadBalancerSourceRanges).
pub const SVC_F_SOURCE_RANGES: u32 = 1 << 10;
/// Frontends reached from outside the cluster (NodePort, externalIP, LoadBalancer IP).
pub const SVC_F_EXTERNAL: u32 = SVC_F_NODE_PORT | SVC_F_EXTERNAL_IP | SVC_F_LOAD_BALANCER;

map_type! {
    /// One slot of a service's backend list.
    pub struct BackendSlotKey {
        pub svc_id: u32,
        pub slot: u32,
    }
    size 8;
}

map_type! {
    /// A backend (an endpoint address and target port), keyed by backend id (never 0).
    pub struct BackendV4 {
        /// Network byte order.
        pub addr: u32,
        /// Network byte order.
        pub port: u16,
        pub proto: u8,
        /// `BACKEND_F_*`.
        pub flags: u8,
    }
    size 8;
}

map_type! {
    /// `LB_MEMBERS`: which backends a frontend's slots hold (the value is the slot), so that
    /// an affinity entry is only honoured while its backend is still in the set.
    pub struct MemberKey {
        pub svc_id: u32,
        pub backend_id: u32,
    }
    size 8;
}

map_type! {
    /// `LB4_AFFINITY` key: a Service port's affinity group and a client address.
    pub struct AffinityKeyV4 {
        pub group: u64,
        /// Network byte order.
        pub client: u32,
        pub _pad: u32,
    }
    size 16;
}

map_type! {
    /// Where a client stuck, and when a new flow of it last used that.
    pub struct AffinityEntry {
        pub last_used_ns: u64,
        pub backend_id: u32,
        pub _pad: u32,
    }
    size 16;
}

/// `LB_IFACES` value bits (key: ifindex): the interface leads to a pod of this node.
pub const IFACE_F_POD: u32 = 1 << 0;

/// The backend runs on this node.
pub const BACKEND_F_LOCAL: u8 = 1 << 0;
/// The backend is terminating: it keeps its flows but is only chosen when nothing else is.
pub const BACKEND_F_TERMINATING: u8 = 1 << 1;

map_type! {
    /// A conntrack key: the 5-tuple as the packet carries it when it reaches the program.
    pub struct CtKeyV4 {
        pub saddr: u32,
        pub daddr: u32,
        pub sport: u16,
        pub dport: u16,
        pub proto: u8,
        pub _pad: [u8; 3],
    }
    size 16;
}

map_type! {
    /// A conntrack entry: the tuple the packet is rewritten to, and whose flow it is.
    pub struct CtEntryV4 {
        /// The datapath's clock (`Clock`: CLOCK_MONOTONIC at tick resolution) at the last packet (refreshed at most every `CT_REFRESH_NS`).
        pub last_seen_ns: u64,
        pub nat_saddr: u32,
        pub nat_daddr: u32,
        pub nat_sport: u16,
        pub nat_dport: u16,
        pub backend_id: u32,
        pub svc_id: u32,
        /// `CT_F_*`.
        pub flags: u16,
        pub _pad: u16,
    }
    size 32;
}

/// The flow's opening was reported to `LB_FLOWS`, so its closing is reported too.
pub const CT_F_REPORTED: u16 = 1 << 3;
/// Client → frontend direction: destination becomes the backend.
pub const CT_F_FORWARD: u16 = 1 << 0;
/// Backend → client direction: source becomes the frontend again.
pub const CT_F_REPLY: u16 = 1 << 1;
/// The client is the backend itself; its source is translated to `HAIRPIN_SNAT_V4`.
pub const CT_F_HAIRPIN: u16 = 1 << 2;
/// The flow came from outside to a backend on another node: its source is the node address
/// and an allocated port, whose reply entry is in `LB4_SNAT`.
pub const CT_F_SNAT: u16 = 1 << 4;
/// A FIN was seen in this entry's direction.
pub const CT_F_FIN: u16 = 1 << 5;
/// A RST was seen in this entry's direction.
pub const CT_F_RST: u16 = 1 << 6;
/// A direct flow (to no frontend) whose reply tuple a Service flow's entry already held:
/// its source port is remapped (forward entry) and mapped back (reply entry), as netfilter
/// remaps a tuple that clashes, so that the two flows' replies are told apart.
pub const CT_F_DIRECT: u16 = 1 << 7;

map_type! {
    /// `LB4_FRAGS` key: one IPv4 datagram as its fragments arrive (addresses as they carry
    /// them, network byte order; the IP identification as on the wire).
    pub struct FragKeyV4 {
        pub saddr: u32,
        pub daddr: u32,
        pub id: u16,
        pub proto: u8,
        pub _pad: u8,
    }
    size 12;
}

map_type! {
    /// `LB4_FRAGS` value: the ports of the datagram (from its first fragment, network byte
    /// order), which its later fragments do not carry.
    pub struct FragPorts {
        pub seen_ns: u64,
        pub sport: u16,
        pub dport: u16,
        pub _pad: u32,
    }
    size 16;
}

map_type! {
    /// `LB4_SRC_RANGES` key data (after the LPM prefix length): a frontend's service id, then
    /// the client address (network byte order). The prefix length is 32 + the CIDR's.
    pub struct SourceRangeV4 {
        /// Big-endian bytes of the service id, so that it is matched whole, first.
        pub svc_id_be: u32,
        pub addr: u32,
    }
    size 8;
}

map_type! {
    /// `LB4_SOCK_REV` key: a host socket the cgroup hooks translated, and the backend it was
    /// sent to.
    pub struct SockRevKeyV4 {
        pub cookie: u64,
        /// Network byte order.
        pub addr: u32,
        /// Network byte order.
        pub port: u16,
        pub _pad: u16,
    }
    size 16;
}

map_type! {
    /// `LB4_SOCK_REV` value: the frontend the socket addressed.
    pub struct SockRevV4 {
        /// Network byte order.
        pub addr: u32,
        /// Network byte order.
        pub port: u16,
        pub _pad: u16,
    }
    size 8;
}

map_type! {
    /// Per-service counters (`LB_SVC_STATS`, per CPU, indexed by service id).
    pub struct ServiceStats {
        pub packets: u64,
        pub bytes: u64,
        pub new_flows: u64,
        pub rejected: u64,
    }
    size 32;
}

map_type! {
    /// Per-backend counters (`LB_BE_STATS`, per CPU, indexed by backend id), both directions.
    pub struct BackendStats {
        pub packets: u64,
        pub bytes: u64,
    }
    size 16;
}

map_type! {
    /// `LB_CLOCK[0]`: how the datapath tells the time, as `jiffies * ns_per_tick + offset_ns`
    /// (wrapping), which the agent calibrates to `bpf_ktime_get_coarse_ns()` (CLOCK_MONOTONIC
    /// at tick resolution). The jiffies are one load the verifier inlines; the coarse clock is
    /// a helper call, which cost a third of a conntrack hit. While `ns_per_tick` is 0 the
    /// datapath reads the coarse clock itself.
    pub struct Clock {
        /// The kernel's tick (1e9 / CONFIG_HZ, rounded).
        pub ns_per_tick: u64,
        pub offset_ns: u64,
    }
    size 16;
}

impl Clock {
    /// The time in ns at `jiffies`.
    pub fn at(&self, jiffies: u64) -> u64 {
        jiffies
            .wrapping_mul(self.ns_per_tick)
            .wrapping_add(self.offset_ns)
    }
}

/// `LB_CONFIG` indexes (an array of u32 the agent writes).
pub mod config {
    /// Report one new flow in N to `LB_FLOWS` (0: none). Closed flows are reported for the
    /// flows whose opening was.
    pub const FLOW_SAMPLE: u32 = 0;
    /// The node's address (network byte order): the source of SNATed flows.
    pub const NODE_ADDR: u32 = 1;
    /// First and last SNAT port (host byte order).
    pub const SNAT_PORT_MIN: u32 = 2;
    pub const SNAT_PORT_MAX: u32 = 3;
    /// Entries of one Maglev table (a prime).
    pub const MAGLEV_SIZE: u32 = 4;
    /// The agent's network namespace cookie (low, high 32 bits): the cgroup hooks translate
    /// only sockets of that namespace (the node's own processes; pods go through the veth).
    pub const NETNS_COOKIE_LO: u32 = 5;
    pub const NETNS_COOKIE_HI: u32 = 6;
    /// No backend id above this was ever used since the maps were created, so their
    /// counters (`LB_BE_STATS`) are still zero and need no reset when an id is handed out.
    pub const BACKEND_ID_WATERMARK: u32 = 7;
    pub const COUNT: u32 = 8;
}

/// Bytes of the `LB_FLOWS` ring buffer.
pub const FLOW_EVENTS_BYTES: u32 = 256 * 1024;

/// `FlowEvent::kind`.
pub const FLOW_NEW: u8 = 1;
pub const FLOW_CLOSED: u8 = 2;

map_type! {
    /// A load-balancing decision, reported through the `LB_FLOWS` ring buffer.
    pub struct FlowEvent {
        /// The datapath's clock (`Clock`: CLOCK_MONOTONIC at tick resolution).
        pub ts_ns: u64,
        /// Network byte order, as the packet carried them.
        pub client_addr: u32,
        pub frontend_addr: u32,
        pub backend_addr: u32,
        pub svc_id: u32,
        pub client_port: u16,
        pub frontend_port: u16,
        pub backend_port: u16,
        pub proto: u8,
        /// `FLOW_NEW` or `FLOW_CLOSED`.
        pub kind: u8,
    }
    size 32;
}

map_type! {
    /// The IPv6 twin of `ServiceKeyV4` (`LB6_SERVICES`; the value is a `ServiceEntry`).
    pub struct ServiceKeyV6 {
        pub addr: Ipv6Words,
        /// Network byte order.
        pub port: u16,
        pub proto: u8,
        /// `SCOPE_*`.
        pub scope: u8,
    }
    size 20;
}

map_type! {
    /// An IPv6 backend (`LB6_BACKENDS`, keyed by backend id: one id space for both families,
    /// so that `LB_SLOTS`, `LB_MEMBERS`, `LB_MAGLEV` and `LB_BE_STATS` serve both).
    pub struct BackendV6 {
        pub addr: Ipv6Words,
        /// Network byte order.
        pub port: u16,
        pub proto: u8,
        /// `BACKEND_F_*`.
        pub flags: u8,
    }
    size 20;
}

map_type! {
    /// `LB6_AFFINITY` key (the value is an `AffinityEntry`).
    pub struct AffinityKeyV6 {
        pub group: u64,
        pub client: Ipv6Words,
    }
    size 24;
}

map_type! {
    /// The IPv6 twin of `CtKeyV4` (`LB6_CONNTRACK`, `LB6_SNAT`).
    pub struct CtKeyV6 {
        pub saddr: Ipv6Words,
        pub daddr: Ipv6Words,
        pub sport: u16,
        pub dport: u16,
        pub proto: u8,
        pub _pad: [u8; 3],
    }
    size 40;
}

map_type! {
    /// The IPv6 twin of `CtEntryV4`.
    pub struct CtEntryV6 {
        pub last_seen_ns: u64,
        pub nat_saddr: Ipv6Words,
        pub nat_daddr: Ipv6Words,
        pub nat_sport: u16,
        pub nat_dport: u16,
        pub backend_id: u32,
        pub svc_id: u32,
        /// `CT_F_*`.
        pub flags: u16,
        pub _pad: u16,
    }
    size 56;
}

map_type! {
    /// `LB6_FRAGS` key: one IPv6 datagram as its fragments arrive (the fragment header's
    /// identification, as on the wire); the value is a `FragPorts`.
    pub struct FragKeyV6 {
        pub saddr: Ipv6Words,
        pub daddr: Ipv6Words,
        pub id: u32,
        pub proto: u8,
        pub _pad: [u8; 3],
    }
    size 40;
}

map_type! {
    /// `LB6_SRC_RANGES` key data: the service id (big-endian), then the client address. The
    /// prefix length is 32 + the CIDR's.
    pub struct SourceRangeV6 {
        pub svc_id_be: u32,
        pub addr: Ipv6Words,
    }
    size 20;
}

map_type! {
    /// `LB6_SOCK_REV` key (and `LB6_SOCK_DROP`'s): a host socket and an address it was sent
    /// to.
    pub struct SockRevKeyV6 {
        pub cookie: u64,
        pub addr: Ipv6Words,
        /// Network byte order.
        pub port: u16,
        pub _pad: [u8; 6],
    }
    size 32;
}

map_type! {
    /// `LB6_SOCK_REV` value: the frontend the socket addressed.
    pub struct SockRevV6 {
        pub addr: Ipv6Words,
        /// Network byte order.
        pub port: u16,
        pub _pad: u16,
    }
    size 20;
}

map_type! {
    /// An IPv6 load-balancing decision in the `LB_FLOWS` ring buffer (told from a
    /// `FlowEvent` by its size).
    pub struct FlowEventV6 {
        pub ts_ns: u64,
        pub client_addr: Ipv6Words,
        pub frontend_addr: Ipv6Words,
        pub backend_addr: Ipv6Words,
        pub svc_id: u32,
        pub client_port: u16,
        pub frontend_port: u16,
        pub backend_port: u16,
        pub proto: u8,
        /// `FLOW_NEW` or `FLOW_CLOSED`.
        pub kind: u8,
        pub _pad: u32,
    }
    size 72;
}

/// Indexes of the global per-CPU counters in `LB_STATS`.
pub mod stat {
    pub const RX: u32 = 0;
    /// Neither IPv4 nor IPv6 (the name is older than the IPv6 datapath).
    pub const PASS_NOT_IPV4: u32 = 1;
    pub const PASS_IP_OPTIONS: u32 = 2;
    pub const PASS_FRAGMENT: u32 = 3;
    pub const PASS_OTHER_PROTO: u32 = 4;
    pub const PASS_NO_SERVICE: u32 = 5;
    pub const DNAT_NEW: u32 = 6;
    pub const DNAT_ESTABLISHED: u32 = 7;
    pub const REVERSE_NAT: u32 = 8;
    pub const REJECT_TCP: u32 = 9;
    pub const REJECT_UDP: u32 = 10;
    pub const DROP_NO_LOCAL: u32 = 11;
    pub const DROP_INCONSISTENT: u32 = 12;
    pub const PASS_TRUNCATED: u32 = 13;
    /// Handed by XDP to the TC ingress program, which answers with RST / ICMP.
    pub const PASS_TO_REJECT: u32 = 14;
    /// Flow events that found the ring buffer full (nobody reading `lb-agent flows` fast
    /// enough).
    pub const FLOW_EVENTS_LOST: u32 = 15;
    /// New flows from outside to a backend on another node (source NAT to the node).
    pub const SNAT_NEW: u32 = 16;
    /// Replies of such flows, translated back.
    pub const SNAT_REPLY: u32 = 17;
    /// No free SNAT port after `SNAT_TRIES` tries: dropped.
    pub const DROP_SNAT_PORTS: u32 = 18;
    /// A client outside the frontend's loadBalancerSourceRanges: dropped.
    pub const DROP_SOURCE_RANGE: u32 = 19;
    /// Host sockets translated by the cgroup hooks (connect or sendmsg).
    pub const SOCK_TRANSLATED: u32 = 20;
    /// Host sockets refused (a frontend without endpoints).
    pub const SOCK_REFUSED: u32 = 21;
    /// Replies translated where they leave towards a pod or the outside (TC egress).
    pub const REVERSE_NAT_EGRESS: u32 = 22;
    /// ICMP and ICMPv6 errors about a translated flow, translated like the flow (outer and
    /// embedded headers).
    pub const ICMP_ERROR_NAT: u32 = 23;
    /// ICMP errors about no flow of the datapath's: passed untouched.
    pub const PASS_ICMP_UNRELATED: u32 = 24;
    /// Later fragments translated with the ports their first fragment carried.
    pub const FRAGMENT_NAT: u32 = 25;
    /// Later fragments of a datagram whose first fragment was not seen (or long ago):
    /// passed untouched.
    pub const PASS_FRAGMENT_UNKNOWN: u32 = 26;
    /// A new direct flow (TCP SYN; to no frontend) whose reply tuple an open Service flow
    /// holds (a client reusing a port): the direct flow got another source port.
    pub const DIRECT_FLOW_REMAPPED: u32 = 27;
    /// ICMP fragmentation-needed (IPv6: ICMPv6 packet too big) sent to a client whose packet
    /// would not fit the route to its (source-NATed) backend.
    pub const FRAG_NEEDED_SENT: u32 = 28;
    /// Packets of remapped direct flows, either way.
    pub const DIRECT_FLOW: u32 = 29;
    /// A new direct flow (TCP SYN, UDP; to no frontend) whose reply tuple an ended Service
    /// flow still held: that flow's entries were removed.
    pub const DIRECT_FLOW_CLAIMED: u32 = 30;
    /// A new direct flow on an open Service flow's reply tuple with no free port to remap to.
    pub const DIRECT_FLOW_CLASH: u32 = 31;
    /// Packets of host sockets to a frontend they are fenced off (loadBalancerSourceRanges;
    /// `internalTrafficPolicy: Local` with endpoints elsewhere only): dropped.
    pub const SOCK_DROPPED: u32 = 32;
    /// IPv6 packets whose extension headers the datapath does not walk (more than
    /// `IPV6_EXT_MAX` of them, AH, ESP, a routing header with segments left, a second
    /// fragment header): passed untouched.
    pub const PASS_IPV6_EXT: u32 = 33;
    pub const COUNT: u32 = 34;
    /// Entries of `LB_STATS`: room for counters added later (a map keeps its size when a
    /// newer agent takes it over).
    pub const CAPACITY: u32 = 64;

    /// Names in index order, for the agent's output.
    pub const NAMES: [&str; COUNT as usize] = [
        "rx",
        "pass_not_ipv4",
        "pass_ip_options",
        "pass_fragment",
        "pass_other_proto",
        "pass_no_service",
        "dnat_new",
        "dnat_established",
        "reverse_nat",
        "reject_tcp",
        "reject_udp",
        "drop_no_local",
        "drop_inconsistent",
        "pass_truncated",
        "pass_to_reject",
        "flow_events_lost",
        "snat_new",
        "snat_reply",
        "drop_snat_ports",
        "drop_source_range",
        "sock_translated",
        "sock_refused",
        "reverse_nat_egress",
        "icmp_error_nat",
        "pass_icmp_unrelated",
        "fragment_nat",
        "pass_fragment_unknown",
        "direct_flow_remapped",
        "frag_needed_sent",
        "direct_flow",
        "direct_flow_claimed",
        "direct_flow_clash",
        "sock_dropped",
        "pass_ipv6_ext",
    ];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_words_keep_the_wire_order() {
        let b = [
            0xfd, 0x6c, 0x62, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x12, 0x34,
        ];
        let w = ipv6_words(b);
        assert_eq!(ipv6_bytes(w), b);
        // Each word's bytes as on the wire, like an IPv4 address in `ServiceKeyV4::addr`.
        assert_eq!(w[0].to_ne_bytes(), [0xfd, 0x6c, 0x62, 0]);
        assert_eq!(ipv6_bytes(HAIRPIN_SNAT_V6)[15], 1);
    }
}
