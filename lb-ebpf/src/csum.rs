//! Checksums: the incremental rewrite of addresses and ports in place (RFC 1624) for XDP,
//! the same through the kernel's checksum helpers for TC (`skb_rewrite`), and the one's
//! complement arithmetic the rejects' fresh headers need.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM},
    programs::TcContext,
};

use crate::parse::{
    Headers, Tuple, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, L4_OFF, TCP_CSUM_OFF, UDP_CSUM_OFF,
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
