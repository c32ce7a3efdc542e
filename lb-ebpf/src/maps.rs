//! Every map of the object. The agent pins them by name under its `--pin-path` and writes the
//! configuration ones; the programs write the state and the counters (`docs/datapath.md`,
//! "Maps"). Keys and values are `lb-common` types, addresses and ports in network byte order.

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use lb_common::{
    config, stat, AffinityKeyV4, AffinityV4, BackendSlotKey, BackendStats, BackendV4, Clock,
    CtEntryV4, CtKeyV4, FragKeyV4, FragV4, MemberKey, ServiceKeyV4, ServiceStats, ServiceV4,
    SockRevKeyV4, SockRevV4, SourceRangeV4, AFFINITY_ENTRIES, DEFAULT_BACKENDS,
    DEFAULT_BACKEND_SLOTS, DEFAULT_CONNTRACK_ENTRIES, DEFAULT_MAGLEV_SIZE, DEFAULT_MAGLEV_TABLES,
    DEFAULT_SERVICES, DEFAULT_SNAT_ENTRIES, FLOW_EVENTS_BYTES, FRAG_ENTRIES, SOCK_DROP_ENTRIES,
    SOCK_REVERSE_ENTRIES, SOURCE_RANGE_ENTRIES,
};

/// Frontends: (address, port, protocol, scope) → `ServiceV4`; written by the agent.
#[map]
pub(crate) static LB4_SERVICES: HashMap<ServiceKeyV4, ServiceV4> =
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
pub(crate) static LB4_AFFINITY: LruHashMap<AffinityKeyV4, AffinityV4> =
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
/// `lb_connect4` / `lb_sendmsg4`.
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
pub(crate) static LB4_FRAGS: LruHashMap<FragKeyV4, FragV4> = LruHashMap::pinned(FRAG_ENTRIES, 0);

/// One `LB_CONFIG` value (0 when unset).
#[inline(always)]
pub(crate) fn cfg_value(index: u32) -> u32 {
    LB_CONFIG.get(index).copied().unwrap_or(0)
}
