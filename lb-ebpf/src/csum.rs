//! Checksums: the incremental rewrite of addresses and ports in place (RFC 1624) for XDP,
//! the same through the kernel's checksum helpers for TC (`skb_rewrite`, `skb_rewrite6`),
//! and the one's complement arithmetic the rejects' fresh headers need.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM},
    programs::TcContext,
};

use crate::{
    ctx::{ptr_at, Packet},
    family::{Addr6, Family, V6},
    parse::{
        Headers, Ports, Tuple, ETH_LEN, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, L4_OFF, TCP_CSUM_OFF,
        UDP_CSUM_OFF,
    },
    parse6::{Headers6, IP6_DST_OFF, IP6_LEN, IP6_SRC_OFF},
};

impl Headers {
    /// Rewrites addresses and ports from `from` to `to`, updating the IPv4 and L4 checksums
    /// incrementally (RFC 1624). A later fragment carries no L4 header: only its addresses
    /// change (the first fragment's L4 checksum covers the whole datagram).
    #[inline(always)]
    pub(crate) fn rewrite(&self, from: &Tuple, to: &Tuple) {
        let addr_diff = csum_diff32(from.saddr, to.saddr) + csum_diff32(from.daddr, to.daddr);
        let l4_diff =
            addr_diff + csum_diff16(from.sport, to.sport) + csum_diff16(from.dport, to.dport);
        // SAFETY: all three pointers were bounds-checked when `Headers` was built (the L4
        // ones only when `l4`), and nothing has resized the packet since.
        unsafe {
            let ip_csum = u16::from_ne_bytes((*self.ip).check);
            (*self.ip).check = csum_apply(ip_csum, addr_diff).to_ne_bytes();
            (*self.ip).src_addr = to.saddr.to_ne_bytes();
            (*self.ip).dst_addr = to.daddr.to_ne_bytes();
            if !self.l4 {
                return;
            }
            let l4_csum = u16::from_ne_bytes(*self.csum);
            // A UDP checksum of zero means "none": leave it so.
            if !(self.udp && l4_csum == 0) {
                let mut c = csum_apply(l4_csum, l4_diff);
                if self.udp && c == 0 {
                    c = 0xffff;
                }
                *self.csum = c.to_ne_bytes();
            }
            (*self.ports).src = to.sport.to_ne_bytes();
            (*self.ports).dst = to.dport.to_ne_bytes();
        }
    }
}

/// Rewrites an skb through the kernel's checksum helpers, which keep a partial checksum
/// partial and a complete one (`CHECKSUM_COMPLETE`) right.
#[inline(always)]
pub(crate) fn skb_rewrite(ctx: &TcContext, hdr: &Headers, from: &Tuple, to: &Tuple) {
    // A UDP datagram without a checksum (zero) has no field that balances a port change: the
    // store itself updates a `CHECKSUM_COMPLETE` sum then. Otherwise the field does, and the
    // store must leave the sum alone. (Read before any helper moves the packet.)
    // SAFETY: `hdr.csum` was bounds-checked by parse when `hdr.l4`, and nothing has changed
    // the packet since.
    let no_checksum = hdr.l4 && hdr.udp && unsafe { *hdr.csum } == [0, 0];
    let store_flags = if no_checksum {
        u64::from(BPF_F_RECOMPUTE_CSUM)
    } else {
        0
    };
    let csum = if hdr.udp { UDP_CSUM_OFF } else { TCP_CSUM_OFF };
    // A UDP checksum of zero means "none": the helpers leave it so.
    let mangled = if hdr.udp {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    };
    let addrs = [
        (from.saddr, to.saddr, IP_SRC_OFF),
        (from.daddr, to.daddr, IP_DST_OFF),
    ];
    for (old, new, off) in addrs {
        if old != new {
            let _ = ctx.l3_csum_replace(IP_CSUM_OFF, u64::from(old), u64::from(new), 4);
            if hdr.l4 {
                let flags = u64::from(BPF_F_PSEUDO_HDR) | mangled | 4;
                let _ = ctx.l4_csum_replace(csum, u64::from(old), u64::from(new), flags);
            }
            let _ = ctx.store(off, &new, 0);
        }
    }
    if !hdr.l4 {
        return;
    }
    let ports = [
        (from.sport, to.sport, L4_OFF),
        (from.dport, to.dport, L4_OFF + 2),
    ];
    for (old, new, off) in ports {
        if old != new {
            let _ = ctx.l4_csum_replace(csum, u64::from(old), u64::from(new), mangled | 2);
            let _ = ctx.store(off, &new, store_flags);
        }
    }
}

impl Headers6 {
    /// The IPv6 twin of `Headers::rewrite`: no IP header checksum; the L4 checksum covers
    /// the 128-bit addresses through its pseudo-header. A later fragment's addresses change
    /// alone (the first fragment's L4 checksum covers the whole datagram).
    #[inline(always)]
    pub(crate) fn rewrite(&self, ctx: &impl Packet, from: &Tuple<Addr6>, to: &Tuple<Addr6>) {
        // Parsing checked these bounds already, and nothing has resized the packet since.
        let Some(ip) = ptr_at::<[u8; IP6_LEN]>(ctx, ETH_LEN) else {
            return;
        };
        // SAFETY: bounds-checked by ptr_at.
        unsafe {
            let ip = ip.cast::<u8>();
            let mut k = 0;
            while k < 2 {
                store64(ip.add(8 + 8 * k), to.saddr[k]);
                store64(ip.add(24 + 8 * k), to.daddr[k]);
                k += 1;
            }
        }
        if !self.l4 {
            return;
        }
        let csum_off = self.l4_off + if self.udp { 6 } else { 16 };
        let (Some(ports), Some(csum)) = (
            ptr_at::<Ports>(ctx, self.l4_off),
            ptr_at::<[u8; 2]>(ctx, csum_off),
        ) else {
            return;
        };
        // SAFETY: both bounds-checked by ptr_at.
        unsafe {
            let l4_diff = addr6_diff(from.saddr, to.saddr)
                + addr6_diff(from.daddr, to.daddr)
                + csum_diff16(from.sport, to.sport)
                + csum_diff16(from.dport, to.dport);
            let l4_csum = u16::from_ne_bytes(*csum);
            // A UDP checksum of zero means "none" (which IPv6 forbids, but a packet that has
            // it keeps it): leave it so, as for IPv4.
            if !(self.udp && l4_csum == 0) {
                let mut c = csum_apply(l4_csum, l4_diff);
                if self.udp && c == 0 {
                    c = 0xffff;
                }
                *csum = c.to_ne_bytes();
            }
            (*ports).src = to.sport.to_ne_bytes();
            (*ports).dst = to.dport.to_ne_bytes();
        }
    }
}

/// Rewrites an IPv6 skb through the kernel's checksum helpers. The addresses' change goes
/// into the L4 checksum as one difference (`bpf_l4_csum_replace` with `BPF_F_PSEUDO_HDR` and
/// no size): a partial checksum gets it as the pseudo-header it holds, a full one as RFC 1624
/// says, and a `CHECKSUM_COMPLETE` sum is moved by the field's change (as for an IPv4 header,
/// whose own checksum balances its addresses). Nothing in an IPv6 header balances the
/// addresses themselves, so they are stored with `BPF_F_RECOMPUTE_CSUM`, which moves the sum
/// by their change: the two together keep it equal to the packet's.
#[inline(always)]
pub(crate) fn skb_rewrite6(
    ctx: &TcContext,
    hdr: &Headers6,
    from: &Tuple<Addr6>,
    to: &Tuple<Addr6>,
) {
    // As for IPv4: a UDP datagram without a checksum has no field that balances a port
    // change; the store itself updates a `CHECKSUM_COMPLETE` sum then. (Read before any
    // helper moves the packet.)
    let l4_off = hdr.l4_off;
    let csum = l4_off + if hdr.udp { 6 } else { 16 };
    // SAFETY: bounds-checked by ptr_at.
    let no_checksum =
        hdr.l4 && hdr.udp && ptr_at::<[u8; 2]>(ctx, csum).is_some_and(|c| unsafe { *c } == [0, 0]);
    let store_flags = if no_checksum {
        u64::from(BPF_F_RECOMPUTE_CSUM)
    } else {
        0
    };
    let mangled = if hdr.udp {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    };
    let diff = addr6_diff(from.saddr, to.saddr) + addr6_diff(from.daddr, to.daddr);
    if hdr.l4 {
        // Size 0: `to` is a difference (folded; `from` must be 0).
        let flags = u64::from(BPF_F_PSEUDO_HDR) | mangled;
        let _ = ctx.l4_csum_replace(csum, 0, u64::from(csum_fold(diff)), flags);
    }
    let recompute = u64::from(BPF_F_RECOMPUTE_CSUM);
    if !V6::same(from.saddr, to.saddr) {
        let _ = ctx.store(IP6_SRC_OFF, &to.saddr, recompute);
    }
    if !V6::same(from.daddr, to.daddr) {
        let _ = ctx.store(IP6_DST_OFF, &to.daddr, recompute);
    }
    if !hdr.l4 {
        return;
    }
    let ports = [
        (from.sport, to.sport, l4_off),
        (from.dport, to.dport, l4_off + 2),
    ];
    for (old, new, off) in ports {
        if old != new {
            let _ = ctx.l4_csum_replace(csum, u64::from(old), u64::from(new), mangled | 2);
            let _ = ctx.store(off, &new, store_flags);
        }
    }
}

/// One's complement sum of the 16-bit words of `new` plus the complement of `old`'s: what
/// replacing the address `old` with `new` adds to a checksum's sum (RFC 1624).
#[inline(always)]
pub(crate) fn addr6_diff(old: Addr6, new: Addr6) -> u64 {
    csum_diff64(old[0], new[0]) + csum_diff64(old[1], new[1])
}

/// `csum_diff32` for 64 bits.
#[inline(always)]
fn csum_diff64(old: u64, new: u64) -> u64 {
    let n = !old;
    (n & 0xffff)
        + (n >> 16 & 0xffff)
        + (n >> 32 & 0xffff)
        + (n >> 48)
        + (new & 0xffff)
        + (new >> 16 & 0xffff)
        + (new >> 32 & 0xffff)
        + (new >> 48)
}

/// One 32-bit store to the packet (`ctx::load32`'s twin). Callers bounds-check first.
#[inline(always)]
#[allow(
    clippy::cast_ptr_alignment,
    reason = "an unaligned packet store on purpose (see ctx::load32)"
)]
pub(crate) unsafe fn store32(p: *mut u8, v: u32) {
    // SAFETY: the caller checked the bounds; see ctx::load32 for the alignment.
    unsafe { p.cast::<u32>().write_volatile(v) }
}

/// One 64-bit store to the packet (the twin of `ctx::load64`: an IPv6 address after a
/// 14-byte Ethernet header is not 8-aligned). Callers bounds-check the eight bytes first.
#[inline(always)]
#[allow(
    clippy::cast_ptr_alignment,
    reason = "an unaligned packet store on purpose (see ctx::load32)"
)]
pub(crate) unsafe fn store64(p: *mut u8, v: u64) {
    // SAFETY: the caller checked the bounds; see ctx::load32 for the alignment.
    unsafe { p.cast::<u64>().write_volatile(v) }
}

/// One's complement of `old` plus `new`, as 16-bit words (RFC 1624 eqn. 3 terms).
#[inline(always)]
pub(crate) fn csum_diff32(old: u32, new: u32) -> u64 {
    u64::from(!(old as u16))
        + u64::from(!((old >> 16) as u16))
        + u64::from(new & 0xffff)
        + u64::from(new >> 16)
}

#[inline(always)]
pub(crate) fn csum_diff16(old: u16, new: u16) -> u64 {
    u64::from(!old) + u64::from(new)
}

#[inline(always)]
pub(crate) fn csum_fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// HC' = ~(~HC + ~m + m')
#[inline(always)]
pub(crate) fn csum_apply(check: u16, diff: u64) -> u16 {
    !csum_fold(u64::from(!check) + diff)
}

/// Sum of `N` 16-bit words starting at `p` (read in memory order).
///
/// # Safety
/// `p .. p + 2N` must have been bounds-checked against the packet end.
#[inline(always)]
pub(crate) unsafe fn sum_words<const N: usize>(p: *const u8) -> u64 {
    let mut sum = 0u64;
    let mut i = 0;
    while i < N {
        // SAFETY: within the range the caller checked.
        sum += u64::from(unsafe { u16::from_ne_bytes([*p.add(2 * i), *p.add(2 * i + 1)]) });
        i += 1;
    }
    sum
}

#[inline(always)]
pub(crate) fn addr_words(a: u32) -> u64 {
    u64::from(a & 0xffff) + u64::from(a >> 16)
}
