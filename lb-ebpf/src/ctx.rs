//! What the translation runs on: the `Packet` (bounds of the packet data) and `Hook` (where
//! the translation runs) traits, their impls for XDP and for TC (`Skb`), bounds-checked
//! packet pointers, and the `Verdict` each program turns into its return code.

use aya_ebpf::{
    bindings::TC_ACT_UNSPEC,
    helpers::bpf_skb_pull_data,
    programs::{TcContext, XdpContext},
};
use lb_common::IFACE_F_POD;

use crate::{family::Family, maps::LB_IFACES, parse::Tuple, route::mtu_exceeded};

/// A TC program's "pass on": the next program on the hook runs (tcx's `TCX_NEXT`), then the
/// stack. `TC_ACT_OK` would end the chain there: when the agent swaps `lb_xdp` and
/// `lb_tc_reject` for `lb_tc_ext`, all three are attached for a moment, and `lb_tc_reject`
/// passing a packet that XDP no longer translated with `TC_ACT_OK` kept it from `lb_tc_ext`
/// (seen: connections refused by the node's stack during the swap). Other programs on the
/// same hook (a CNI's) also see what this one passes on.
pub(crate) const TC_NEXT: i32 = TC_ACT_UNSPEC;

/// What the translation decided; each program turns it into its own return code.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// To the stack (translated or untouched).
    Pass,
    Drop,
    /// A frontend without usable backends: answer with RST / ICMP port-unreachable.
    Reject,
    /// The packet (DF set) would not fit the route to its source-NATed backend: answer with
    /// ICMP fragmentation-needed and this MTU.
    FragNeeded(u16),
}

impl Verdict {
    /// As one word, returned in a register from a BPF-to-BPF call (an enum with a field
    /// is returned through the caller's stack): the kind in the low 16 bits, the MTU above.
    #[inline(always)]
    pub(crate) fn to_word(self) -> u32 {
        match self {
            Self::Pass => 0,
            Self::Drop => 1,
            Self::Reject => 2,
            Self::FragNeeded(mtu) => 3 | u32::from(mtu) << 16,
        }
    }

    /// The inverse of `to_word`.
    #[inline(always)]
    pub(crate) fn from_word(w: u32) -> Self {
        match w & 0xffff {
            0 => Self::Pass,
            1 => Self::Drop,
            2 => Self::Reject,
            _ => Self::FragNeeded((w >> 16) as u16),
        }
    }
}

/// The bounds of a packet's linear data, and its whole length (an skb's payload may lie
/// beyond the linear part).
pub(crate) trait Packet {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    fn frame_len(&self) -> u64;
    /// Makes the first `len` bytes of the frame linear, for direct access (the whole frame
    /// when it is shorter). XDP frames are linear: nothing to do. Moves the packet: pointers
    /// into it are taken again after.
    #[inline(always)]
    fn linearize(&self, _len: usize) {}
}

impl Packet for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }
    #[inline(always)]
    fn frame_len(&self) -> u64 {
        (XdpContext::data_end(self) - XdpContext::data(self)) as u64
    }
}

impl Packet for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }
    #[inline(always)]
    fn frame_len(&self) -> u64 {
        u64::from(self.len())
    }
    /// A no-op when they are already; a frame shorter than `len` is pulled whole.
    #[inline(always)]
    fn linearize(&self, len: usize) {
        let len = if (self.len() as usize) < len {
            self.len()
        } else {
            len as u32
        };
        // SAFETY: skb is the program's own context.
        unsafe { bpf_skb_pull_data(self.skb.skb.cast(), len) };
    }
}

/// Where the translation runs: XDP or TC on external interfaces, TC on pod interfaces.
pub(crate) trait Hook: Packet {
    /// The packet came in from one of this node's pods.
    fn is_from_pod(&self) -> bool;
    /// Rewrites addresses and ports from `from` to `to`, checksums included.
    fn rewrite<F: Family>(&self, hdr: &F::Hdr, from: &Tuple<F::Addr>, to: &Tuple<F::Addr>);
    /// The route's MTU if this packet, translated to `to`, would not fit it. `tot_len`: the
    /// datagram's length; `hdr_len`: its IP and L4 headers' (for an aggregated skb, whose
    /// segments are what must fit).
    fn mtu_exceeded<F: Family>(
        &self,
        to: &Tuple<F::Addr>,
        proto: u8,
        tot_len: u16,
        hdr_len: u16,
    ) -> Option<u16>;
}

impl Hook for XdpContext {
    /// An interface the agent marked as a pod's (`LB_IFACES`).
    #[inline(always)]
    fn is_from_pod(&self) -> bool {
        // SAFETY: ctx.ctx is the program's own context.
        let ifindex = unsafe { (*self.ctx).ingress_ifindex };
        // SAFETY: the value is read at once.
        unsafe { LB_IFACES.get(ifindex) }.is_some_and(|f| f & IFACE_F_POD != 0)
    }

    #[inline(always)]
    fn rewrite<F: Family>(&self, hdr: &F::Hdr, from: &Tuple<F::Addr>, to: &Tuple<F::Addr>) {
        F::rewrite_direct(self, hdr, from, to);
    }

    /// XDP frames are never aggregated: the datagram's own length is checked.
    #[inline(always)]
    fn mtu_exceeded<F: Family>(
        &self,
        to: &Tuple<F::Addr>,
        proto: u8,
        tot_len: u16,
        _hdr_len: u16,
    ) -> Option<u16> {
        // SAFETY: ctx.ctx is the program's own context.
        unsafe {
            let ifindex = (*self.ctx).ingress_ifindex;
            mtu_exceeded::<F>(self.ctx.cast(), ifindex, to, proto, tot_len)
        }
    }
}

/// An skb in TC: in ingress of a pod interface (`lb_tc_pod`, `POD`) or of an external one
/// (`lb_tc_ext`), or in egress of either (`lb_tc_egress`, which never looks at `POD`).
pub(crate) struct Skb<'a, const POD: bool>(pub(crate) &'a TcContext);

impl<const POD: bool> Packet for Skb<'_, POD> {
    #[inline(always)]
    fn data(&self) -> usize {
        self.0.data()
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        self.0.data_end()
    }
    #[inline(always)]
    fn frame_len(&self) -> u64 {
        self.0.frame_len()
    }
    #[inline(always)]
    fn linearize(&self, len: usize) {
        self.0.linearize(len);
    }
}

impl<const POD: bool> Hook for Skb<'_, POD> {
    #[inline(always)]
    fn is_from_pod(&self) -> bool {
        POD
    }

    #[inline(always)]
    fn rewrite<F: Family>(&self, hdr: &F::Hdr, from: &Tuple<F::Addr>, to: &Tuple<F::Addr>) {
        F::rewrite_skb(self.0, hdr, from, to);
    }

    /// The route's MTU against the datagram, or for a GRO-aggregated skb against each of the
    /// segments it will be cut into. (The kernel's own skb check, `tot_len` 0, counts the
    /// Ethernet header the skb carries here against a route through a device without one,
    /// such as a tunnel, and refuses packets that fit.)
    #[inline(always)]
    fn mtu_exceeded<F: Family>(
        &self,
        to: &Tuple<F::Addr>,
        proto: u8,
        tot_len: u16,
        hdr_len: u16,
    ) -> Option<u16> {
        // SAFETY: the skb is the program's own context.
        unsafe {
            let skb = self.0.skb.skb;
            let gso_size = (*skb).gso_size;
            let len = if gso_size == 0 {
                tot_len
            } else {
                (gso_size as u16).saturating_add(hdr_len)
            };
            mtu_exceeded::<F>(skb.cast(), (*skb).ifindex, to, proto, len)
        }
    }
}

/// One 32-bit load from the packet. The verifier allows unaligned packet loads, and an IPv4
/// address after a 14-byte Ethernet header is not 4-aligned; a load the compiler knows to be
/// unaligned would be split into four byte loads, so this one reads through a `u32`
/// pointer. Callers bounds-check the four bytes first.
#[inline(always)]
#[allow(
    clippy::cast_ptr_alignment,
    reason = "an unaligned packet load on purpose (see above)"
)]
pub(crate) unsafe fn load32(p: *const u8) -> u32 {
    // SAFETY: the caller checked the bounds; see above for the alignment.
    unsafe { p.cast::<u32>().read_volatile() }
}

/// `load32` for 64 bits (an IPv6 address's halves).
#[inline(always)]
#[allow(
    clippy::cast_ptr_alignment,
    reason = "an unaligned packet load on purpose (see load32)"
)]
pub(crate) unsafe fn load64(p: *const u8) -> u64 {
    // SAFETY: the caller checked the bounds; see load32 for the alignment.
    unsafe { p.cast::<u64>().read_volatile() }
}

#[inline(always)]
pub(crate) fn ptr_at<T>(ctx: &impl Packet, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}
