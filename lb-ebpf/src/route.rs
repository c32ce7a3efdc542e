//! The route a translated packet takes, asked of the kernel's FIB (`bpf_fib_lookup`): whether
//! it fits the route's MTU.

use aya_ebpf::{
    bindings::{bpf_fib_lookup, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LOOKUP_SKIP_NEIGH},
    cty::c_void,
    helpers::bpf_fib_lookup as fib_lookup,
};

use crate::{family::Family, parse::Tuple};

/// The route's MTU if a datagram of `tot_len` bytes (its IP header included) and `to`'s
/// tuple would not fit it (the caller checked DF for IPv4).
///
/// # Safety
/// `ctx` must be the program's own context (an `xdp_md` or a `__sk_buff`).
#[inline(always)]
pub(crate) unsafe fn mtu_exceeded<F: Family>(
    ctx: *mut c_void,
    ifindex: u32,
    to: &Tuple<F::Addr>,
    proto: u8,
    tot_len: u16,
) -> Option<u16> {
    // `struct bpf_fib_lookup`, written as words (field by field, the compiler zeroes the
    // unions with calls to `memset`): family, l4 protocol, source port; destination port,
    // length; ingress ifindex; tos (IPv6: flow info); source address (16 bytes); destination
    // (16); the rest 0.
    let mut words = [0u32; 16];
    words[0] = F::AF | u32::from(proto) << 8 | u32::from(to.sport) << 16;
    words[1] = u32::from(to.dport) | u32::from(tot_len) << 16;
    words[2] = ifindex;
    F::fib_addrs(&mut words, to);
    const _: () = assert!(size_of::<bpf_fib_lookup>() == 64);
    // SAFETY: `words` is a valid, 4-aligned `bpf_fib_lookup` of the size given, on the stack
    // for the call; the caller vouches for `ctx`. Skipping the neighbour lookup lets the
    // MTU check run for next hops not resolved yet.
    let rc = unsafe {
        fib_lookup(
            ctx,
            words.as_mut_ptr().cast(),
            size_of::<bpf_fib_lookup>() as i32,
            BPF_FIB_LOOKUP_SKIP_NEIGH,
        )
    };
    (rc == i64::from(BPF_FIB_LKUP_RET_FRAG_NEEDED)).then_some((words[1] >> 16) as u16)
}
