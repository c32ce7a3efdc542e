//! Socket-level translation for the node's own processes (host-network clients), on a cgroup
//! v2 directory: `connect4` and `sendmsg4` send a socket addressed to a frontend to one of its
//! backends instead, and `recvmsg4` / `getpeername4` show the frontend again, so the program
//! never sees the backend's address.
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

use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    macros::{cgroup_skb, cgroup_sock_addr},
    programs::{SkBuffContext, SockAddrContext},
};
use lb_common::{
    config, stat, AffinityEntry, AffinityKeyV4, ServiceKeyV4, SockRevKeyV4, SockRevV4, IPPROTO_TCP,
    IPPROTO_UDP, SCOPE_ALL, SCOPE_PODS, SVC_F_DROP_NO_ENDPOINTS, SVC_F_POD_SCOPE,
    SVC_F_SOURCE_RANGES,
};

use crate::{
    clock::now_ns,
    maps::{cfg_value, LB4_AFFINITY, LB4_SERVICES, LB4_SOCK_DROP, LB4_SOCK_REV},
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

#[cgroup_sock_addr(connect4)]
pub fn lb_connect4(ctx: SockAddrContext) -> i32 {
    to_backend(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn lb_sendmsg4(ctx: SockAddrContext) -> i32 {
    to_backend(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn lb_recvmsg4(ctx: SockAddrContext) -> i32 {
    to_frontend(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn lb_getpeername4(ctx: SockAddrContext) -> i32 {
    to_frontend(&ctx);
    ALLOW
}

/// Whether the socket lives in the agent's (the node's) network namespace.
#[inline(always)]
fn host_socket(ctx: &SockAddrContext) -> bool {
    let want = (u64::from(cfg_value(config::NETNS_COOKIE_HI)) << 32)
        | u64::from(cfg_value(config::NETNS_COOKIE_LO));
    // SAFETY: the context is the program's own.
    want != 0 && unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) } == want
}

/// A socket addressed to a frontend goes to one of its backends instead.
#[inline(always)]
fn to_backend(ctx: &SockAddrContext) -> i32 {
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
    let key = ServiceKeyV4 {
        addr,
        port,
        proto,
        scope: SCOPE_ALL,
    };
    // SAFETY: the value is copied out at once.
    let Some(mut svc) = (unsafe { LB4_SERVICES.get(&key) }).copied() else {
        return ALLOW;
    };
    // SAFETY: the context is the program's own.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let mark = SockRevKeyV4 {
        cookie,
        addr,
        port,
        _pad: 0,
    };
    // The source the packets will carry: the bound address, else the node's (the route to a
    // frontend leaves by the node's interface).
    let source = if bound != 0 {
        bound
    } else {
        cfg_value(config::NODE_ADDR)
    };
    if svc.flags & SVC_F_SOURCE_RANGES != 0 && !source_allowed(svc.svc_id, source) {
        return drop_socket(&mark, svc.svc_id);
    }
    // The node's own processes reach an external frontend with `externalTrafficPolicy: Local`
    // through the Cluster set, as this node's pods do (kube-proxy treats local traffic alike).
    if svc.flags & SVC_F_POD_SCOPE != 0 {
        let pod_key = ServiceKeyV4 {
            scope: SCOPE_PODS,
            ..key
        };
        // SAFETY: the value is copied out at once.
        if let Some(p) = unsafe { LB4_SERVICES.get(&pod_key) } {
            svc = *p;
        }
    }
    if svc.count == 0 {
        if svc.flags & SVC_F_DROP_NO_ENDPOINTS != 0 {
            return drop_socket(&mark, svc.svc_id);
        }
        count(stat::SOCK_REFUSED);
        // SAFETY: no memory preconditions.
        unsafe { bpf_set_retval(-ECONNREFUSED) };
        return DENY;
    }
    // A datagram socket fenced off earlier may send here now.
    if proto == IPPROTO_UDP {
        let _ = LB4_SOCK_DROP.remove(&mark);
    }
    let now = now_ns();
    let affinity_key = AffinityKeyV4 {
        group: svc.affinity_group,
        client: source,
        _pad: 0,
    };
    let sticky = if svc.affinity_timeout_s != 0 {
        sticky_backend(&svc, &affinity_key, now)
    } else {
        None
    };
    // None only while the maps are changed by something other than the agent.
    let Some((backend_id, backend)) = sticky.or_else(|| random_backend(&svc)) else {
        return ALLOW;
    };
    if svc.affinity_timeout_s != 0 {
        let a = AffinityEntry {
            last_used_ns: now,
            backend_id,
            _pad: 0,
        };
        let _ = LB4_AFFINITY.insert(&affinity_key, &a, 0);
    }
    let rev_key = SockRevKeyV4 {
        cookie,
        addr: backend.addr,
        port: backend.port,
        _pad: 0,
    };
    let rev = SockRevV4 {
        addr,
        port,
        _pad: 0,
    };
    let _ = LB4_SOCK_REV.insert(&rev_key, &rev, 0);
    // SAFETY: user_ip4 / user_port are writable by connect4 and sendmsg4 hooks.
    unsafe {
        let sa = &mut *ctx.sock_addr;
        sa.user_ip4 = backend.addr;
        sa.user_port = u32::from(backend.port);
    }
    count(stat::SOCK_TRANSLATED);
    ALLOW
}

/// Where kube-proxy drops: the socket keeps the frontend's address and `lb_sock_drop` drops
/// what it sends there.
#[inline(always)]
fn drop_socket(mark: &SockRevKeyV4, svc_id: u32) -> i32 {
    let _ = LB4_SOCK_DROP.insert(mark, &svc_id, 0);
    ALLOW
}

/// Drops what a host socket sends to a frontend the hooks fenced it off (cgroup egress,
/// beside the socket hooks). One lookup per packet of the node's sockets; the key is the
/// socket, the destination address and port.
#[cgroup_skb(egress)]
pub fn lb_sock_drop(ctx: SkBuffContext) -> i32 {
    // The data starts at the IPv4 header.
    let Ok(ip) = ctx.load::<[u8; 20]>(0) else {
        return SKB_PASS;
    };
    if ip[0] >> 4 != 4 || (ip[9] != IPPROTO_TCP && ip[9] != IPPROTO_UDP) {
        return SKB_PASS;
    }
    // Later fragments carry no ports: they go with their first.
    if u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff != 0 {
        return SKB_PASS;
    }
    let l4 = usize::from(ip[0] & 0x0f) * 4;
    let Ok(dport) = ctx.load::<u16>(l4 + 2) else {
        return SKB_PASS;
    };
    let daddr = u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]);
    // SAFETY: the context is the program's own.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    let mark = SockRevKeyV4 {
        cookie,
        addr: daddr,
        port: dport,
        _pad: 0,
    };
    // SAFETY: only presence is read.
    if unsafe { LB4_SOCK_DROP.get(&mark) }.is_some() {
        count(stat::SOCK_DROPPED);
        return SKB_DROP_QUIETLY;
    }
    SKB_PASS
}

/// A peer or datagram source that is a backend this socket was sent to shows as the frontend.
#[inline(always)]
fn to_frontend(ctx: &SockAddrContext) {
    if !host_socket(ctx) {
        return;
    }
    // SAFETY: the context is the program's own.
    let (addr, port, cookie) = unsafe {
        let sa = &*ctx.sock_addr;
        (
            sa.user_ip4,
            sa.user_port as u16,
            bpf_get_socket_cookie(ctx.sock_addr.cast()),
        )
    };
    let key = SockRevKeyV4 {
        cookie,
        addr,
        port,
        _pad: 0,
    };
    // SAFETY: the value is copied out at once.
    if let Some(rev) = unsafe { LB4_SOCK_REV.get(&key) }.copied() {
        // SAFETY: user_ip4 / user_port are writable by recvmsg4 and getpeername4 hooks.
        unsafe {
            let sa = &mut *ctx.sock_addr;
            sa.user_ip4 = rev.addr;
            sa.user_port = u32::from(rev.port);
        }
    }
}
