//! The datapath's clock.

use aya_ebpf::helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns};

use crate::maps::LB_CLOCK;

/// The time in ns (CLOCK_MONOTONIC at tick resolution): jiffies through the agent's
/// calibration (`LB_CLOCK`), or the coarse clock until there is one. `bpf_jiffies64` is a
/// load the verifier inlines; `bpf_ktime_get_coarse_ns` is a helper call, measured at about a
/// third of a conntrack hit.
#[inline(always)]
pub(crate) fn now_ns() -> u64 {
    match LB_CLOCK.get(0) {
        // SAFETY: bpf_jiffies64 has no preconditions.
        Some(c) if c.ns_per_tick != 0 => c.at(unsafe { bpf_jiffies64() }),
        // SAFETY: bpf_ktime_get_coarse_ns has no preconditions.
        _ => unsafe { bpf_ktime_get_coarse_ns() },
    }
}
