//! Socket-level translation for the node's own processes (host-network clients), on a cgroup
//! v2 directory: `connect4/6` and `sendmsg4/6` send a socket addressed to a frontend to one of
//! its backends instead, and `recvmsg4/6` / `getpeername4/6` show the frontend again, so the
//! program never sees the backend's address.
//!
//! Only sockets of the agent's own network namespace are translated (`LB_CONFIG`'s netns
//! cookie): pods have a network namespace of their own and go through the datapath on their
//! veth, which keeps kube-proxy's source-address rules. A host process has no such interface
//! in the path, so its packets would never meet the XDP program.
//!
//! Host clients get what pods get: sessionAffinity (keyed by the socket's source: its bound
//! address, else the node's), loadBalancerSourceRanges (the same source against the ranges)
//! and, where kube-proxy drops (a fenced source; `internalTrafficPolicy: Local` with
//! endpoints elsewhere only), a drop rather than a refusal: the socket stays addressed to the
//! frontend and `lb_sock_drop` (cgroup egress) drops what it sends there, so the caller sees
//! what a dropped packet looks like (TCP retransmits until its timeout; UDP is sent into the
//! void) instead of an error.
//!
//! Both families decide alike (`decide`), each with its own maps (`Family`: `V4` on the
//! `LB4_*` maps, `V6` on the `LB6_*` maps). An IPv6 socket may address an IPv4 frontend as
//! an IPv4-mapped address (`::ffff:a.b.c.d`, a dual-stack socket): the kernel then runs the
//! IPv6 hooks for `connect`, `getpeername` and `recvmsg`, which translate it through the IPv4
//! maps and write the backend back as a mapped address; a `sendmsg` to a mapped address runs
//! the IPv4 hook (the kernel sends it as IPv4), and what such a socket sends leaves as IPv4,
//! so `lb_sock_drop` finds it in `LB4_SOCK_DROP`.

use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_set_retval},
    macros::{cgroup_skb, cgroup_sock_addr},
    maps::lpm_trie::Key,
    programs::{SkBuffContext, SockAddrContext},
};
use lb_common::{
    config, stat, AffinityEntry, AffinityKeyV4, AffinityKeyV6, BackendSlotKey, BackendV6,
    Ipv6Words, MemberKey, ServiceEntry, ServiceKeyV4, ServiceKeyV6, SockRevKeyV4, SockRevKeyV6,
    SockRevV4, SockRevV6, SourceRangeV6, IPPROTO_TCP, IPPROTO_UDP, SCOPE_ALL, SCOPE_PODS,
    SVC_F_DROP_NO_ENDPOINTS, SVC_F_POD_SCOPE, SVC_F_SOURCE_RANGES,
};

use crate::{
    clock::now_ns,
    maps::{
        cfg_value, LB4_AFFINITY, LB4_SERVICES, LB4_SOCK_DROP, LB4_SOCK_REV, LB6_AFFINITY,
        LB6_BACKENDS, LB6_NODE_ADDR, LB6_SERVICES, LB6_SOCK_DROP, LB6_SOCK_REV, LB6_SRC_RANGES,
        LB_MEMBERS, LB_SLOTS,
    },
    select::{random_backend, source_allowed, sticky_backend},
    telemetry::count,
};

/// The hook lets the call go on.
const ALLOW: i32 = 1;
/// The hook fails the call (with the error set by `bpf_set_retval`).
const DENY: i32 = 0;
const ECONNREFUSED: i32 = 111;
/// `lb_sock_drop`: the packet goes on.
const SKB_PASS: i32 = 1;
/// `lb_sock_drop`: the packet is dropped as congestion would drop it (bit 1 set), so that
/// neither TCP nor UDP (without IP_RECVERR) reports an error to the sender.
const SKB_DROP_QUIETLY: i32 = 2;
/// The third word of an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), in network order.
const MAPPED_PREFIX: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
/// IPv6 extension headers `lb_sock_drop` steps over to find the ports.
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_DEST: u8 = 60;
/// At most this many extension headers before the TCP or UDP header (a socket can ask for
/// hop-by-hop options, a routing header and destination options before and after it: four;
/// the stack adds no fragment header before the egress hook, which sees whole packets).
const MAX_EXT_HEADERS: usize = 4;

#[cgroup_sock_addr(connect4)]
pub fn lb_connect4(ctx: SockAddrContext) -> i32 {
    to_backend4(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn lb_sendmsg4(ctx: SockAddrContext) -> i32 {
    to_backend4(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn lb_recvmsg4(ctx: SockAddrContext) -> i32 {
    to_frontend4(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn lb_getpeername4(ctx: SockAddrContext) -> i32 {
    to_frontend4(&ctx);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn lb_connect6(ctx: SockAddrContext) -> i32 {
    to_backend6(&ctx)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn lb_sendmsg6(ctx: SockAddrContext) -> i32 {
    to_backend6(&ctx)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn lb_recvmsg6(ctx: SockAddrContext) -> i32 {
    to_frontend6(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn lb_getpeername6(ctx: SockAddrContext) -> i32 {
    to_frontend6(&ctx);
    ALLOW
}

/// An address and port as the maps hold them (network byte order).
#[derive(Clone, Copy)]
struct Endpoint<A> {
    addr: A,
    port: u16,
}

/// What becomes of a socket addressed to a frontend.
enum Decision<A> {
    /// The call goes on unchanged (fenced off, or the maps are being changed).
    Leave,
    /// ECONNREFUSED: the frontend has no endpoints.
    Refuse,
    /// The socket goes to this backend.
    To(Endpoint<A>),
}

/// An address family's maps, as the hooks use them.
trait Family {
    /// An address as the maps hold it.
    type Addr: Copy;
    /// The frontend entry of `fe` for clients of `scope`.
    fn service(fe: &Endpoint<Self::Addr>, proto: u8, scope: u8) -> Option<ServiceEntry>;
    /// Whether `source` is in the frontend's loadBalancerSourceRanges.
    fn source_allowed(svc_id: u32, source: Self::Addr) -> bool;
    /// The backend `source` sticks to, if it still may (sessionAffinity).
    fn sticky(
        svc: &ServiceEntry,
        source: Self::Addr,
        now: u64,
    ) -> Option<(u32, Endpoint<Self::Addr>)>;
    /// A uniformly random backend of the frontend's slots.
    fn random(svc: &ServiceEntry) -> Option<(u32, Endpoint<Self::Addr>)>;
    /// Records where `source` went (sessionAffinity).
    fn stick(svc: &ServiceEntry, source: Self::Addr, entry: &AffinityEntry);
    /// Fences the socket off the frontend: `lb_sock_drop` drops what it sends there.
    fn fence(cookie: u64, fe: &Endpoint<Self::Addr>, svc_id: u32);
    /// Lifts a fence of the socket's off the frontend.
    fn unfence(cookie: u64, fe: &Endpoint<Self::Addr>);
    /// Records that the socket's backend `be` stands for the frontend `fe`.
    fn record(cookie: u64, be: &Endpoint<Self::Addr>, fe: &Endpoint<Self::Addr>);
    /// The frontend the socket's peer `be` stands for, if the hooks sent it there.
    fn reverse(cookie: u64, be: &Endpoint<Self::Addr>) -> Option<Endpoint<Self::Addr>>;
}

/// IPv4: the `LB4_*` maps.
struct V4;

impl Family for V4 {
    type Addr = u32;

    #[inline(always)]
    fn service(fe: &Endpoint<u32>, proto: u8, scope: u8) -> Option<ServiceEntry> {
        let key = ServiceKeyV4 {
            addr: fe.addr,
            port: fe.port,
            proto,
            scope,
        };
        // SAFETY: the value is copied out at once.
        unsafe { LB4_SERVICES.get(&key) }.copied()
    }

    #[inline(always)]
    fn source_allowed(svc_id: u32, source: u32) -> bool {
        source_allowed(svc_id, source)
    }

    #[inline(always)]
    fn sticky(svc: &ServiceEntry, source: u32, now: u64) -> Option<(u32, Endpoint<u32>)> {
        let key = AffinityKeyV4 {
            group: svc.affinity_group,
            client: source,
            _pad: 0,
        };
        sticky_backend(svc, &key, now).map(|(id, b)| {
            (
                id,
                Endpoint {
                    addr: b.addr,
                    port: b.port,
                },
            )
        })
    }

    #[inline(always)]
    fn random(svc: &ServiceEntry) -> Option<(u32, Endpoint<u32>)> {
        random_backend(svc).map(|(id, b)| {
            (
                id,
                Endpoint {
                    addr: b.addr,
                    port: b.port,
                },
            )
        })
    }

    #[inline(always)]
    fn stick(svc: &ServiceEntry, source: u32, entry: &AffinityEntry) {
        let key = AffinityKeyV4 {
            group: svc.affinity_group,
            client: source,
            _pad: 0,
        };
        let _ = LB4_AFFINITY.insert(&key, entry, 0);
    }

    #[inline(always)]
    fn fence(cookie: u64, fe: &Endpoint<u32>, svc_id: u32) {
        let _ = LB4_SOCK_DROP.insert(&rev_key4(cookie, fe), &svc_id, 0);
    }

    #[inline(always)]
    fn unfence(cookie: u64, fe: &Endpoint<u32>) {
        let _ = LB4_SOCK_DROP.remove(&rev_key4(cookie, fe));
    }

    #[inline(always)]
    fn record(cookie: u64, be: &Endpoint<u32>, fe: &Endpoint<u32>) {
        let rev = SockRevV4 {
            addr: fe.addr,
            port: fe.port,
            _pad: 0,
        };
        let _ = LB4_SOCK_REV.insert(&rev_key4(cookie, be), &rev, 0);
    }

    #[inline(always)]
    fn reverse(cookie: u64, be: &Endpoint<u32>) -> Option<Endpoint<u32>> {
        // SAFETY: the value is copied out at once.
        unsafe { LB4_SOCK_REV.get(&rev_key4(cookie, be)) }.map(|r| Endpoint {
            addr: r.addr,
            port: r.port,
        })
    }
}

#[inline(always)]
fn rev_key4(cookie: u64, at: &Endpoint<u32>) -> SockRevKeyV4 {
    SockRevKeyV4 {
        cookie,
        addr: at.addr,
        port: at.port,
        _pad: 0,
    }
}

/// IPv6: the `LB6_*` maps (slots and members are shared: one id space for both families).
struct V6;

impl Family for V6 {
    type Addr = Ipv6Words;

    #[inline(always)]
    fn service(fe: &Endpoint<Ipv6Words>, proto: u8, scope: u8) -> Option<ServiceEntry> {
        let key = ServiceKeyV6 {
            addr: fe.addr,
            port: fe.port,
            proto,
            scope,
        };
        // SAFETY: the value is copied out at once.
        unsafe { LB6_SERVICES.get(&key) }.copied()
    }

    #[inline(always)]
    fn source_allowed(svc_id: u32, source: Ipv6Words) -> bool {
        let key = Key::new(
            32 + 128,
            SourceRangeV6 {
                svc_id_be: svc_id.to_be(),
                addr: source,
            },
        );
        LB6_SRC_RANGES.get(&key).is_some()
    }

    #[inline(always)]
    fn sticky(
        svc: &ServiceEntry,
        source: Ipv6Words,
        now: u64,
    ) -> Option<(u32, Endpoint<Ipv6Words>)> {
        let key = AffinityKeyV6 {
            group: svc.affinity_group,
            client: source,
        };
        // SAFETY: the value is copied out at once.
        let a = unsafe { LB6_AFFINITY.get(&key) }.copied()?;
        if now.wrapping_sub(a.last_used_ns) > u64::from(svc.affinity_timeout_s) * 1_000_000_000 {
            return None;
        }
        // Only while the backend is still in the frontend's set.
        let member = MemberKey {
            svc_id: svc.svc_id,
            backend_id: a.backend_id,
        };
        LB_MEMBERS.get_ptr(&member)?;
        backend6(a.backend_id)
    }

    #[inline(always)]
    fn random(svc: &ServiceEntry) -> Option<(u32, Endpoint<Ipv6Words>)> {
        // SAFETY: bpf_get_prandom_u32 has no preconditions.
        let slot = unsafe { bpf_get_prandom_u32() }.checked_rem(svc.count)?;
        let slot_key = BackendSlotKey {
            svc_id: svc.svc_id,
            slot,
        };
        // SAFETY: the value is copied out at once.
        let id = unsafe { LB_SLOTS.get(&slot_key) }.copied()?;
        backend6(id)
    }

    #[inline(always)]
    fn stick(svc: &ServiceEntry, source: Ipv6Words, entry: &AffinityEntry) {
        let key = AffinityKeyV6 {
            group: svc.affinity_group,
            client: source,
        };
        let _ = LB6_AFFINITY.insert(&key, entry, 0);
    }

    #[inline(always)]
    fn fence(cookie: u64, fe: &Endpoint<Ipv6Words>, svc_id: u32) {
        let _ = LB6_SOCK_DROP.insert(&rev_key6(cookie, fe), &svc_id, 0);
    }

    #[inline(always)]
    fn unfence(cookie: u64, fe: &Endpoint<Ipv6Words>) {
        let _ = LB6_SOCK_DROP.remove(&rev_key6(cookie, fe));
    }

    #[inline(always)]
    fn record(cookie: u64, be: &Endpoint<Ipv6Words>, fe: &Endpoint<Ipv6Words>) {
        let rev = SockRevV6 {
            addr: fe.addr,
            port: fe.port,
            _pad: 0,
        };
        let _ = LB6_SOCK_REV.insert(&rev_key6(cookie, be), &rev, 0);
    }

    #[inline(always)]
    fn reverse(cookie: u64, be: &Endpoint<Ipv6Words>) -> Option<Endpoint<Ipv6Words>> {
        // SAFETY: the value is copied out at once.
        unsafe { LB6_SOCK_REV.get(&rev_key6(cookie, be)) }.map(|r| Endpoint {
            addr: r.addr,
            port: r.port,
        })
    }
}

#[inline(always)]
fn rev_key6(cookie: u64, at: &Endpoint<Ipv6Words>) -> SockRevKeyV6 {
    SockRevKeyV6 {
        cookie,
        addr: at.addr,
        port: at.port,
        _pad: [0; 6],
    }
}

/// An IPv6 backend by id.
#[inline(always)]
fn backend6(id: u32) -> Option<(u32, Endpoint<Ipv6Words>)> {
    // SAFETY: the value is copied out at once.
    unsafe { LB6_BACKENDS.get(id) }.map(|b: &BackendV6| {
        (
            id,
            Endpoint {
                addr: b.addr,
                port: b.port,
            },
        )
    })
}

/// Whether the socket lives in the agent's (the node's) network namespace.
#[inline(always)]
fn host_socket(ctx: &SockAddrContext) -> bool {
    let want = (u64::from(cfg_value(config::NETNS_COOKIE_HI)) << 32)
        | u64::from(cfg_value(config::NETNS_COOKIE_LO));
    // SAFETY: the context is the program's own.
    want != 0 && unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) } == want
}

#[inline(always)]
fn socket_cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: the context is the program's own.
    unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) }
}

/// What becomes of a socket of `cookie` addressed to the frontend `fe` (its entry `svc`)
/// from `source`; the maps record it (reverse entry, affinity, fence).
#[inline(always)]
fn decide<F: Family>(
    mut svc: ServiceEntry,
    cookie: u64,
    fe: &Endpoint<F::Addr>,
    proto: u8,
    source: F::Addr,
) -> Decision<F::Addr> {
    if svc.flags & SVC_F_SOURCE_RANGES != 0 && !F::source_allowed(svc.svc_id, source) {
        F::fence(cookie, fe, svc.svc_id);
        return Decision::Leave;
    }
    // The node's own processes reach an external frontend with `externalTrafficPolicy: Local`
    // through the Cluster set, as this node's pods do (kube-proxy treats local traffic alike).
    if svc.flags & SVC_F_POD_SCOPE != 0 {
        if let Some(p) = F::service(fe, proto, SCOPE_PODS) {
            svc = p;
        }
    }
    if svc.count == 0 {
        if svc.flags & SVC_F_DROP_NO_ENDPOINTS != 0 {
            F::fence(cookie, fe, svc.svc_id);
            return Decision::Leave;
        }
        count(stat::SOCK_REFUSED);
        return Decision::Refuse;
    }
    // A datagram socket fenced off earlier may send here now.
    if proto == IPPROTO_UDP {
        F::unfence(cookie, fe);
    }
    let now = now_ns();
    let sticky = if svc.affinity_timeout_s != 0 {
        F::sticky(&svc, source, now)
    } else {
        None
    };
    // None only while the maps are changed by something other than the agent.
    let Some((backend_id, be)) = sticky.or_else(|| F::random(&svc)) else {
        return Decision::Leave;
    };
    if svc.affinity_timeout_s != 0 {
        let a = AffinityEntry {
            last_used_ns: now,
            backend_id,
            _pad: 0,
        };
        F::stick(&svc, source, &a);
    }
    F::record(cookie, &be, fe);
    count(stat::SOCK_TRANSLATED);
    Decision::To(be)
}

/// The hook's answer to a refusal: the call fails with ECONNREFUSED.
#[inline(always)]
fn refuse() -> i32 {
    // SAFETY: no memory preconditions.
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    DENY
}

/// An IPv4 socket addressed to a frontend goes to one of its backends instead.
#[inline(always)]
fn to_backend4(ctx: &SockAddrContext) -> i32 {
    if !host_socket(ctx) {
        return ALLOW;
    }
    // SAFETY: the context is the program's own; these fields are readable by sock_addr hooks,
    // and `sk` is a socket pointer the verifier knows to be valid.
    let (addr, port, proto, bound) = unsafe {
        let sa = &*ctx.sock_addr;
        let sk = &*sa.__bindgen_anon_1.sk;
        (
            sa.user_ip4,
            sa.user_port as u16,
            sa.protocol as u8,
            sk.src_ip4,
        )
    };
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return ALLOW;
    }
    let fe = Endpoint { addr, port };
    let Some(svc) = V4::service(&fe, proto, SCOPE_ALL) else {
        return ALLOW;
    };
    // The source the packets will carry: the bound address, else the node's (the route to a
    // frontend leaves by the node's interface).
    let source = if bound != 0 {
        bound
    } else {
        cfg_value(config::NODE_ADDR)
    };
    match decide::<V4>(svc, socket_cookie(ctx), &fe, proto, source) {
        Decision::Leave => ALLOW,
        Decision::Refuse => refuse(),
        Decision::To(be) => {
            // SAFETY: user_ip4 / user_port are writable by connect4 and sendmsg4 hooks.
            unsafe {
                let sa = &mut *ctx.sock_addr;
                sa.user_ip4 = be.addr;
                sa.user_port = u32::from(be.port);
            }
            ALLOW
        }
    }
}

/// Whether an IPv6 address is IPv4-mapped (`::ffff:a.b.c.d`).
#[inline(always)]
fn mapped(a: &Ipv6Words) -> bool {
    a[0] == 0 && a[1] == 0 && a[2] == MAPPED_PREFIX
}

/// The context's `user_ip6`, a word at a time (the verifier takes 4-byte accesses).
///
/// # Safety
/// `ctx` is the program's own context, of an IPv6 sock_addr hook.
#[inline(always)]
unsafe fn user_ip6(ctx: &SockAddrContext) -> Ipv6Words {
    let sa = ctx.sock_addr;
    // SAFETY: the caller's; volatile keeps each load 4 bytes wide.
    unsafe {
        [
            core::ptr::read_volatile(&raw const (*sa).user_ip6[0]),
            core::ptr::read_volatile(&raw const (*sa).user_ip6[1]),
            core::ptr::read_volatile(&raw const (*sa).user_ip6[2]),
            core::ptr::read_volatile(&raw const (*sa).user_ip6[3]),
        ]
    }
}

/// Writes `user_ip6` and `user_port`, a word at a time.
///
/// # Safety
/// `ctx` is the program's own context, of an IPv6 sock_addr hook that may write them.
#[inline(always)]
unsafe fn set_user_addr6(ctx: &SockAddrContext, addr: &Ipv6Words, port: u16) {
    let sa = ctx.sock_addr;
    // SAFETY: the caller's; volatile keeps each store 4 bytes wide.
    unsafe {
        core::ptr::write_volatile(&raw mut (*sa).user_ip6[0], addr[0]);
        core::ptr::write_volatile(&raw mut (*sa).user_ip6[1], addr[1]);
        core::ptr::write_volatile(&raw mut (*sa).user_ip6[2], addr[2]);
        core::ptr::write_volatile(&raw mut (*sa).user_ip6[3], addr[3]);
        (*sa).user_port = u32::from(port);
    }
}

/// An IPv4 address as an IPv4-mapped IPv6 address.
#[inline(always)]
fn mapped_words(addr: u32) -> Ipv6Words {
    [0, 0, MAPPED_PREFIX, addr]
}

/// An IPv6 socket addressed to a frontend goes to one of its backends instead; an
/// IPv4-mapped frontend is looked up in the IPv4 maps and its backend written back mapped.
#[inline(always)]
fn to_backend6(ctx: &SockAddrContext) -> i32 {
    if !host_socket(ctx) {
        return ALLOW;
    }
    // SAFETY: the context is the program's own, of an IPv6 hook; `sk` is a socket pointer
    // the verifier knows to be valid, whose fields are read a word at a time.
    let (addr, port, proto, bound) = unsafe {
        let sa = ctx.sock_addr;
        let sk = (*sa).__bindgen_anon_1.sk;
        (
            user_ip6(ctx),
            (*sa).user_port as u16,
            (*sa).protocol as u8,
            [
                core::ptr::read_volatile(&raw const (*sk).src_ip6[0]),
                core::ptr::read_volatile(&raw const (*sk).src_ip6[1]),
                core::ptr::read_volatile(&raw const (*sk).src_ip6[2]),
                core::ptr::read_volatile(&raw const (*sk).src_ip6[3]),
            ],
        )
    };
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return ALLOW;
    }
    if mapped(&addr) {
        let fe = Endpoint {
            addr: addr[3],
            port,
        };
        let Some(svc) = V4::service(&fe, proto, SCOPE_ALL) else {
            return ALLOW;
        };
        // A dual-stack socket bound to an IPv4 address holds it mapped.
        let source = if mapped(&bound) && bound[3] != 0 {
            bound[3]
        } else {
            cfg_value(config::NODE_ADDR)
        };
        return match decide::<V4>(svc, socket_cookie(ctx), &fe, proto, source) {
            Decision::Leave => ALLOW,
            Decision::Refuse => refuse(),
            Decision::To(be) => {
                // SAFETY: user_ip6 / user_port are writable by connect6 and sendmsg6 hooks.
                unsafe { set_user_addr6(ctx, &mapped_words(be.addr), be.port) };
                ALLOW
            }
        };
    }
    let fe = Endpoint { addr, port };
    let Some(svc) = V6::service(&fe, proto, SCOPE_ALL) else {
        return ALLOW;
    };
    let source = if bound == [0; 4] {
        LB6_NODE_ADDR.get(0).copied().unwrap_or([0; 4])
    } else {
        bound
    };
    match decide::<V6>(svc, socket_cookie(ctx), &fe, proto, source) {
        Decision::Leave => ALLOW,
        Decision::Refuse => refuse(),
        Decision::To(be) => {
            // SAFETY: user_ip6 / user_port are writable by connect6 and sendmsg6 hooks.
            unsafe { set_user_addr6(ctx, &be.addr, be.port) };
            ALLOW
        }
    }
}

/// Drops what a host socket sends to a frontend the hooks fenced it off (cgroup egress,
/// beside the socket hooks). One lookup per packet of the node's sockets; the key is the
/// socket, the destination address and port. IPv6 packets are followed through at most
/// `MAX_EXT_HEADERS` extension headers (hop-by-hop, routing, destination options, a first
/// fragment's header) to their TCP or UDP header.
#[cgroup_skb(egress)]
pub fn lb_sock_drop(ctx: SkBuffContext) -> i32 {
    // The data starts at the IP header.
    let Ok(first) = ctx.load::<u8>(0) else {
        return SKB_PASS;
    };
    let fenced = match first >> 4 {
        4 => fenced4(&ctx),
        6 => fenced6(&ctx),
        _ => false,
    };
    if fenced {
        count(stat::SOCK_DROPPED);
        return SKB_DROP_QUIETLY;
    }
    SKB_PASS
}

/// Whether an IPv4 packet goes from a fenced socket to its frontend.
#[inline(always)]
fn fenced4(ctx: &SkBuffContext) -> bool {
    let Ok(ip) = ctx.load::<[u8; 20]>(0) else {
        return false;
    };
    if ip[9] != IPPROTO_TCP && ip[9] != IPPROTO_UDP {
        return false;
    }
    // Later fragments carry no ports: they go with their first.
    if u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff != 0 {
        return false;
    }
    let l4 = usize::from(ip[0] & 0x0f) * 4;
    let Ok(dport) = ctx.load::<u16>(l4 + 2) else {
        return false;
    };
    let daddr = u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]);
    // SAFETY: the context is the program's own.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    let fe = Endpoint {
        addr: daddr,
        port: dport,
    };
    // SAFETY: only presence is read.
    unsafe { LB4_SOCK_DROP.get(&rev_key4(cookie, &fe)) }.is_some()
}

/// Whether an IPv6 packet goes from a fenced socket to its frontend.
#[inline(always)]
fn fenced6(ctx: &SkBuffContext) -> bool {
    // Version, traffic class, flow label, payload length, next header, hop limit.
    let Ok(fixed) = ctx.load::<[u8; 8]>(0) else {
        return false;
    };
    let Ok(daddr) = ctx.load::<Ipv6Words>(24) else {
        return false;
    };
    let Some(l4) = l4_offset6(ctx, fixed[6]) else {
        return false;
    };
    let Ok(dport) = ctx.load::<u16>(l4 + 2) else {
        return false;
    };
    // SAFETY: the context is the program's own.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    let fe = Endpoint {
        addr: daddr,
        port: dport,
    };
    // SAFETY: only presence is read.
    unsafe { LB6_SOCK_DROP.get(&rev_key6(cookie, &fe)) }.is_some()
}

/// Where an IPv6 packet's TCP or UDP header starts, after the fixed header and at most
/// `MAX_EXT_HEADERS` extension headers; None for another protocol, a later fragment (no
/// ports), more extension headers, or a short packet.
#[inline(always)]
fn l4_offset6(ctx: &SkBuffContext, first: u8) -> Option<usize> {
    let mut next = first;
    let mut off = 40usize;
    for _ in 0..MAX_EXT_HEADERS {
        match next {
            IPPROTO_TCP | IPPROTO_UDP => return Some(off),
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                // Next header, then the length in 8-byte units, not counting the first 8.
                let h = ctx.load::<[u8; 2]>(off).ok()?;
                next = h[0];
                off += (usize::from(h[1]) + 1) * 8;
            }
            NEXTHDR_FRAGMENT => {
                let h = ctx.load::<[u8; 4]>(off).ok()?;
                // Later fragments carry no ports: they go with their first.
                if u16::from_be_bytes([h[2], h[3]]) & 0xfff8 != 0 {
                    return None;
                }
                next = h[0];
                off += 8;
            }
            _ => return None,
        }
    }
    (next == IPPROTO_TCP || next == IPPROTO_UDP).then_some(off)
}

/// A peer or datagram source of an IPv4 socket that is a backend this socket was sent to
/// shows as the frontend.
#[inline(always)]
fn to_frontend4(ctx: &SockAddrContext) {
    if !host_socket(ctx) {
        return;
    }
    // SAFETY: the context is the program's own.
    let (addr, port) = unsafe {
        let sa = &*ctx.sock_addr;
        (sa.user_ip4, sa.user_port as u16)
    };
    if let Some(fe) = V4::reverse(socket_cookie(ctx), &Endpoint { addr, port }) {
        // SAFETY: user_ip4 / user_port are writable by recvmsg4 and getpeername4 hooks.
        unsafe {
            let sa = &mut *ctx.sock_addr;
            sa.user_ip4 = fe.addr;
            sa.user_port = u32::from(fe.port);
        }
    }
}

/// The same for an IPv6 socket; an IPv4-mapped peer is looked up in the IPv4 reverse map
/// and the frontend written back mapped.
#[inline(always)]
fn to_frontend6(ctx: &SockAddrContext) {
    if !host_socket(ctx) {
        return;
    }
    // SAFETY: the context is the program's own, of an IPv6 hook.
    let (addr, port) = unsafe { (user_ip6(ctx), (*ctx.sock_addr).user_port as u16) };
    let cookie = socket_cookie(ctx);
    if mapped(&addr) {
        let be = Endpoint {
            addr: addr[3],
            port,
        };
        if let Some(fe) = V4::reverse(cookie, &be) {
            // SAFETY: user_ip6 / user_port are writable by recvmsg6 and getpeername6 hooks.
            unsafe { set_user_addr6(ctx, &mapped_words(fe.addr), fe.port) };
        }
        return;
    }
    if let Some(fe) = V6::reverse(cookie, &Endpoint { addr, port }) {
        // SAFETY: user_ip6 / user_port are writable by recvmsg6 and getpeername6 hooks.
        unsafe { set_user_addr6(ctx, &fe.addr, fe.port) };
    }
}
