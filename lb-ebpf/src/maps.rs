//! Every map of the object. The agent pins them by name under its `--pin-path` and writes the
//! configuration ones; the programs write the state and the counters (`docs/datapath.md`,
//! "Maps"). Keys and values are `lb-common` types, addresses and ports in network byte order.

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use lb_common::{
    config, stat, AffinityEntry, AffinityKeyV4, AffinityKeyV6, BackendSlotKey, BackendStats,
    BackendV4, BackendV6, Clock, CtEntryV4, CtEntryV6, CtKeyV4, CtKeyV6, FragKeyV4, FragKeyV6,
    FragPorts, Ipv6Words, MemberKey, ServiceEntry, ServiceKeyV4, ServiceKeyV6, ServiceStats,
    SockRevKeyV4, SockRevKeyV6, SockRevV4, SockRevV6, SourceRangeV4, SourceRangeV6,
    AFFINITY_ENTRIES, DEFAULT_BACKENDS, DEFAULT_BACKEND_SLOTS, DEFAULT_CONNTRACK_ENTRIES,
    DEFAULT_MAGLEV_SIZE, DEFAULT_MAGLEV_TABLES, DEFAULT_SERVICES, DEFAULT_SNAT_ENTRIES,
    FLOW_EVENTS_BYTES, FRAG_ENTRIES, SOCK_DROP_ENTRIES, SOCK_REVERSE_ENTRIES, SOURCE_RANGE_ENTRIES,
};

/// Frontends: (address, port, protocol, scope) → `ServiceEntry`; written by the agent.
#[map]
pub(crate) static LB4_SERVICES: HashMap<ServiceKeyV4, ServiceEntry> =
    HashMap::pinned(DEFAULT_SERVICES, 0);
/// A frontend's usable backends: (service id, slot) → backend id; written by the agent.
#[map]
pub(crate) static LB_SLOTS: HashMap<BackendSlotKey, u32> =
    HashMap::pinned(DEFAULT_BACKEND_SLOTS, 0);
/// Backends: backend id → (address, port, protocol, flags); written by the agent.
#[map]
pub(crate) static LB4_BACKENDS: HashMap<u32, BackendV4> = HashMap::pinned(DEFAULT_BACKENDS, 0);
/// Flows, both directions: 5-tuple → translation; written by the datapath, swept by the agent.
#[map]
pub(crate) static LB4_CONNTRACK: LruHashMap<CtKeyV4, CtEntryV4> =
    LruHashMap::pinned(DEFAULT_CONNTRACK_ENTRIES, 0);
/// Backends in a frontend's slots: (service id, backend id) → slot; written by the agent.
#[map]
pub(crate) static LB_MEMBERS: HashMap<MemberKey, u32> = HashMap::pinned(DEFAULT_BACKEND_SLOTS, 0);
/// sessionAffinity: (group, client) → (backend id, last new flow); written by the datapath.
#[map]
pub(crate) static LB4_AFFINITY: LruHashMap<AffinityKeyV4, AffinityEntry> =
    LruHashMap::pinned(AFFINITY_ENTRIES, 0);
/// Interfaces: ifindex → `IFACE_F_*` flags (a pod's interface); written by the agent.
#[map]
pub(crate) static LB_IFACES: HashMap<u32, u32> = HashMap::pinned(4096, 0);
/// Per-CPU counters: backend id → packets, bytes; written by the datapath, zeroed by the agent.
#[map]
pub(crate) static LB_BE_STATS: PerCpuArray<BackendStats> = PerCpuArray::pinned(DEFAULT_BACKENDS, 0);
/// Per-CPU counters: `stat::*` index → count; written by every program.
#[map]
pub(crate) static LB_STATS: PerCpuArray<u64> = PerCpuArray::pinned(stat::CAPACITY, 0);
/// `FlowEvent`s of sampled flows (new, closed); written by the datapath, read by the agent.
#[map]
pub(crate) static LB_FLOWS: RingBuf = RingBuf::pinned(FLOW_EVENTS_BYTES, 0);
/// Settings: `config::*` index → value (0 when unset); written by the agent.
#[map]
pub(crate) static LB_CONFIG: Array<u32> = Array::pinned(config::COUNT, 0);
/// Per-CPU count of new flows, for 1-in-N sampling; written by the datapath.
#[map]
pub(crate) static LB_FLOW_SEQ: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);
/// Per-CPU counters: service id → packets, bytes, new flows, rejects; written by the datapath.
#[map]
pub(crate) static LB_SVC_STATS: PerCpuArray<ServiceStats> =
    PerCpuArray::pinned(DEFAULT_SERVICES, 0);
/// Reply entries of source-NATed flows, keyed by (backend, node address, backend port, SNAT
/// port): the allocated port is the key, so an insert that finds it taken tries another.
/// Written by the datapath, swept by the agent.
#[map]
pub(crate) static LB4_SNAT: LruHashMap<CtKeyV4, CtEntryV4> =
    LruHashMap::pinned(DEFAULT_SNAT_ENTRIES, 0);
/// Maglev tables, `LB_CONFIG[MAGLEV_SIZE]` backend ids each, back to back (the agent sets the
/// size at load time); written by the agent.
#[map]
pub(crate) static LB_MAGLEV: Array<u32> =
    Array::pinned(DEFAULT_MAGLEV_SIZE * DEFAULT_MAGLEV_TABLES, BPF_F_MMAPABLE);
/// loadBalancerSourceRanges: (service id, client prefix) → 1; written by the agent.
#[map]
pub(crate) static LB4_SRC_RANGES: LpmTrie<SourceRangeV4, u8> =
    LpmTrie::pinned(SOURCE_RANGE_ENTRIES, 0);
/// The datapath's clock: jiffies scaled to CLOCK_MONOTONIC nanoseconds (`Clock`); written by
/// the agent's calibration.
#[map]
pub(crate) static LB_CLOCK: Array<Clock> = Array::pinned(1, 0);
/// Host sockets the cgroup hooks sent to a backend instead of a frontend: (socket, backend)
/// → frontend, for `getpeername` and the source of received datagrams; written by
/// `lb_connect4` / `lb_sendmsg4` (and `lb_connect6` for IPv4-mapped addresses).
#[map]
pub(crate) static LB4_SOCK_REV: LruHashMap<SockRevKeyV4, SockRevV4> =
    LruHashMap::pinned(SOCK_REVERSE_ENTRIES, 0);

/// Host sockets fenced off a frontend (socket, frontend address and port) → the service id;
/// written by the socket hooks, read by `lb_sock_drop`.
#[map]
pub(crate) static LB4_SOCK_DROP: LruHashMap<SockRevKeyV4, u32> =
    LruHashMap::pinned(SOCK_DROP_ENTRIES, 0);

/// Fragmented datagrams: (addresses, identification, protocol) → the ports their first
/// fragment carried; written and read by the datapath.
#[map]
pub(crate) static LB4_FRAGS: LruHashMap<FragKeyV4, FragPorts> = LruHashMap::pinned(FRAG_ENTRIES, 0);

// IPv6: the twins of the `LB4_*` maps, with the same writers and readers. Service ids and
// backend ids are one space over both families, so the slot, member, Maglev and counter maps
// serve both.

/// IPv6 frontends → `ServiceEntry`; written by the agent.
#[map]
pub(crate) static LB6_SERVICES: HashMap<ServiceKeyV6, ServiceEntry> =
    HashMap::pinned(DEFAULT_SERVICES, 0);
/// IPv6 backends: backend id → (address, port, protocol, flags); written by the agent.
#[map]
pub(crate) static LB6_BACKENDS: HashMap<u32, BackendV6> = HashMap::pinned(DEFAULT_BACKENDS, 0);
/// IPv6 flows, both directions; written by the datapath, swept by the agent.
#[map]
pub(crate) static LB6_CONNTRACK: LruHashMap<CtKeyV6, CtEntryV6> =
    LruHashMap::pinned(DEFAULT_CONNTRACK_ENTRIES, 0);
/// IPv6 sessionAffinity; written by the datapath.
#[map]
pub(crate) static LB6_AFFINITY: LruHashMap<AffinityKeyV6, AffinityEntry> =
    LruHashMap::pinned(AFFINITY_ENTRIES, 0);
/// Reply entries of source-NATed IPv6 flows (as `LB4_SNAT`).
#[map]
pub(crate) static LB6_SNAT: LruHashMap<CtKeyV6, CtEntryV6> =
    LruHashMap::pinned(DEFAULT_SNAT_ENTRIES, 0);
/// IPv6 loadBalancerSourceRanges: (service id, client prefix) → 1; written by the agent.
#[map]
pub(crate) static LB6_SRC_RANGES: LpmTrie<SourceRangeV6, u8> =
    LpmTrie::pinned(SOURCE_RANGE_ENTRIES, 0);
/// Host IPv6 sockets the hooks sent to a backend: (socket, backend) → frontend.
#[map]
pub(crate) static LB6_SOCK_REV: LruHashMap<SockRevKeyV6, SockRevV6> =
    LruHashMap::pinned(SOCK_REVERSE_ENTRIES, 0);
/// Host IPv6 sockets fenced off a frontend (socket, frontend) → the service id.
#[map]
pub(crate) static LB6_SOCK_DROP: LruHashMap<SockRevKeyV6, u32> =
    LruHashMap::pinned(SOCK_DROP_ENTRIES, 0);
/// Fragmented IPv6 datagrams → the ports their first fragment carried.
#[map]
pub(crate) static LB6_FRAGS: LruHashMap<FragKeyV6, FragPorts> = LruHashMap::pinned(FRAG_ENTRIES, 0);
/// The node's IPv6 address (the source of source-NATed IPv6 flows; all zero when it has
/// none); written by the agent.
#[map]
pub(crate) static LB6_NODE_ADDR: Array<Ipv6Words> = Array::pinned(1, 0);

/// One `LB_CONFIG` value (0 when unset).
#[inline(always)]
pub(crate) fn cfg_value(index: u32) -> u32 {
    LB_CONFIG.get(index).copied().unwrap_or(0)
}
