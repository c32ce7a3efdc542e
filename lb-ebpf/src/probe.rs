//! Programs that are never attached: the agent and the bench run them with
//! BPF_PROG_TEST_RUN. `lb_clock` reads both clocks for the calibration of `LB_CLOCK`;
//! `lb_xdp_pass` is the bench's empty program. They are kept apart from the attached
//! programs in `main.rs`.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns},
    macros::xdp,
    programs::XdpContext,
};

use crate::ctx::ptr_at;

/// Writes both clocks, jiffies then the coarse clock's ns (native order), at the start of the
/// frame: the agent calibrates `LB_CLOCK` from them (BPF_PROG_TEST_RUN; never attached).
#[xdp]
pub fn lb_clock(ctx: XdpContext) -> u32 {
    let Some(out) = ptr_at::<[u64; 2]>(&ctx, 0) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: bounds-checked by ptr_at; neither helper has preconditions.
    unsafe { *out = [bpf_jiffies64(), bpf_ktime_get_coarse_ns()] };
    xdp_action::XDP_PASS
}

/// Does nothing: the calibration program of `cargo xtask bench` (the cost of running any XDP
/// program on a frame). Never attached.
#[xdp]
pub fn lb_xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}
