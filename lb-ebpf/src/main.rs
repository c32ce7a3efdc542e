//! The service datapath: ClusterIP / NodePort / externalIP / LoadBalancer-IP translation for
//! TCP and UDP over IPv4 and IPv6 (`docs/ipv6.md`), on the external interfaces in XDP
//! (`lb_xdp`, where the driver runs XDP natively) or in TC (`lb_tc_ext`, elsewhere), and in
//! TC on the pods' interfaces (`lb_tc_pod`); the TC programs rewrite through the kernel's checksum helpers because local
//! senders leave partial checksums. All run `process`; cgroup socket hooks for the node's own
//! processes are in `sock.rs`.
//!
//! Per packet: parse Ethernet + IPv4 (no options) or IPv6 (extension headers walked within a
//! bound) + TCP/UDP, fragments with their first's ports, then
//! 1. conntrack hit in the reply direction → restore the frontend as source (reverse NAT);
//! 2. conntrack hit in the forward direction → rewrite to the flow's backend;
//! 3. a reply to a flow this node source-NATed (addressed to the node address and a port of
//!    the SNAT range) → restore the frontend as source and the client as destination;
//! 4. otherwise a frontend lookup → the client must be in the frontend's source ranges, if it
//!    has any → pick a backend (the client's sticky one, by the frontend's Maglev table for
//!    external frontends, else uniformly among the slots), record both directions, rewrite; a
//!    client from outside going to a backend on another node is also source-NATed to the node
//!    address and a free port, so that the reply comes back here; a frontend without a usable
//!    backend is dropped (Local policy) or answered with a reject (by the TC programs
//!    themselves; after `lb_xdp`, by `lb_tc_reject`, which gets the packet untouched);
//! 5. anything else passes untouched.
//!
//! Translated packets go to the stack (XDP_PASS / TC_NEXT), which routes them: to a local
//! pod's veth, or out to the node that runs the backend.
//!
//! `lb_tc_reject` (TC ingress, beside `lb_xdp`) answers what XDP passed on for a
//! frontend without backends: TCP with RST, UDP with ICMP port-unreachable, sent back out of
//! the interface it came in on. It runs in TC because an XDP_TX on a veth only reaches a peer
//! that runs XDP itself, which a pod does not (`docs/datapath.md`, "veth caveats").
//!
//! Every packet access is bounds-checked against `data_end` right before it, and no path can
//! panic. Per-packet work is a fixed number of hash lookups, whatever the number of Services.
//!
//! Modules: `parse` (headers), `nat` (the translation), `conntrack`, `snat`, `select`
//! (backend choice), `csum` (checksums), `reject` (RST / ICMP answers), `telemetry`
//! (counters, flow events), `clock`, `maps`, `ctx` (the program contexts); `probe` holds the
//! programs that are never attached, `sock` the cgroup socket hooks.
#![no_std]
#![no_main]
// Measured: passing map keys and values by value, as the lint asks, adds 31 insns to lb_xdp.
#![allow(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys and values go by reference: by value, each is copied to a new stack slot"
)]
#![allow(
    clippy::inline_always,
    reason = "BPF: every helper is inlined on purpose (no bpf-to-bpf calls on the hot path; \
              the verifier tracks packet bounds across the whole program)"
)]
#![allow(
    clippy::needless_pass_by_value,
    reason = "program entry points take their context by value, as aya's macros declare them"
)]

mod clock;
mod conntrack;
mod csum;
mod ctx;
mod family;
mod frag;
mod icmp;
mod maps;
mod nat;
mod parse;
mod parse6;
mod probe;
mod reject;
mod route;
mod select;
mod snat;
mod sock;
mod telemetry;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

use crate::{
    ctx::{Skb, Verdict},
    nat::{process, tc_egress, tc_translate},
    reject::{reject, xdp_frag_needed},
};

/// The datapath on external interfaces whose driver runs XDP natively; rejects go on untouched
/// to `lb_tc_reject`.
#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    match process(&ctx) {
        // A reject goes on untouched to lb_tc_reject, in TC ingress on the same interface.
        Verdict::Pass | Verdict::Reject => xdp_action::XDP_PASS,
        Verdict::Drop => xdp_action::XDP_DROP,
        Verdict::FragNeeded(mtu) => xdp_too_big(&ctx, mtu),
    }
}

/// `xdp_frag_needed` as a call of its own: `lb_xdp`'s frame adds up with `process`'s.
#[inline(never)]
fn xdp_too_big(ctx: &XdpContext, mtu: u16) -> u32 {
    xdp_frag_needed(ctx, mtu)
}

/// The datapath for packets from this node's pods, in TC ingress on their veths. It runs the
/// same translation as `lb_xdp`, but rewrites through the kernel's checksum helpers: a pod's
/// own stack sends TCP and UDP with partial checksums (`CHECKSUM_PARTIAL`: the field holds the
/// pseudo-header sum, the device finishes it), which only the skb's checksum state tells
/// apart and XDP cannot see. `bpf_l4_csum_replace` updates such a field correctly (the
/// addresses with `BPF_F_PSEUDO_HDR`; the ports not at all), and a full one as RFC 1624 does.
#[classifier]
pub fn lb_tc_pod(ctx: TcContext) -> i32 {
    tc_translate(&Skb::<true>(&ctx))
}

/// The datapath for external interfaces without native XDP (veths, bridges, bonds, tunnels),
/// in TC ingress: there XDP would run on an skb the kernel has built already (generic XDP,
/// or on a veth an XDP frame made from each skb), and it leaves the checksum state unknown.
/// The same translation as `lb_xdp`, rewriting through the checksum helpers as `lb_tc_pod`
/// does (a frame from a sender on this host may carry a partial checksum); it answers rejects
/// itself.
#[classifier]
pub fn lb_tc_ext(ctx: TcContext) -> i32 {
    tc_translate(&Skb::<false>(&ctx))
}

/// In TC egress of pod and external interfaces: replies and ICMP errors of flows translated
/// on this node get their frontend back where they leave, whichever link they came in by.
#[classifier]
pub fn lb_tc_egress(ctx: TcContext) -> i32 {
    tc_egress(&Skb::<false>(&ctx))
}

/// Beside `lb_xdp`, in TC ingress: answers what XDP passed on for a frontend without backends.
#[classifier]
pub fn lb_tc_reject(ctx: TcContext) -> i32 {
    reject(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
