//! Socket-level translation for the node's own processes (host-network clients), on a cgroup
//! v2 directory: `connect4` and `sendmsg4` send a socket addressed to a frontend to one of its
//! backends instead, and `recvmsg4` / `getpeername4` show the frontend again, so the program
//! never sees the backend's address.
//!
//! Only sockets of the agent's own network namespace are translated (`LB_CONFIG`'s netns
//! cookie): pods have a network namespace of their own and go through the datapath on their
//! veth, which keeps kube-proxy's source-address rules. A host process has no such interface
//! in the path, so its packets would never meet the XDP program.

use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use lb_common::{
    config, stat, ServiceKeyV4, SockRevKeyV4, SockRevV4, IPPROTO_TCP, IPPROTO_UDP, SCOPE_ALL,
    SCOPE_PODS, SVC_F_POD_SCOPE,
};

use crate::{
    maps::{cfg_value, LB4_SERVICES, LB4_SOCK_REV},
    select::random_backend,
    telemetry::count,
};

/// The hook lets the call go on.
const ALLOW: i32 = 1;
/// The hook fails the call (with the error set by `bpf_set_retval`).
const DENY: i32 = 0;
const ECONNREFUSED: i32 = 111;

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
    // SAFETY: the context is the program's own; these fields are readable by sock_addr hooks.
    let (addr, port, proto) = unsafe {
        let sa = &*ctx.sock_addr;
        (sa.user_ip4, sa.user_port as u16, sa.protocol as u8)
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
        count(stat::SOCK_REFUSED);
        // SAFETY: no memory preconditions.
        unsafe { bpf_set_retval(-ECONNREFUSED) };
        return DENY;
    }
    // None only while the maps are changed by something other than the agent.
    let Some((_, backend)) = random_backend(&svc) else {
        return ALLOW;
    };
    // SAFETY: the context is the program's own.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
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
