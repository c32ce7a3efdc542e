//! IP fragments: only a datagram's first fragment carries the TCP/UDP header, so the ports it
//! carries are remembered by (addresses, IP identification, protocol) and the later
//! fragments are translated with them, like the first (`LB4_FRAGS`; IPv6: `LB6_FRAGS`, by
//! the fragment header's identification). A later fragment whose first fragment was not
//! seen here is left alone.

use core::mem;

use lb_common::{FragKeyV4, FragKeyV6, FragPorts, FRAG_TIMEOUT_NS};
use network_types::ip::Ipv4Hdr;

use crate::{
    clock::now_ns,
    family::Addr6,
    maps::{LB4_FRAGS, LB6_FRAGS},
    parse::Tuple,
};

/// The key of a datagram, written as three words (field by field, the compiler zeroes the
/// padding with a call to `memset`).
#[inline(always)]
fn frag_key(saddr: u32, daddr: u32, ip: *const Ipv4Hdr, proto: u8) -> FragKeyV4 {
    // SAFETY: the caller bounds-checked the IPv4 header `ip` points to.
    let id = unsafe { (*ip).id };
    let words = [saddr, daddr, u32::from_ne_bytes([id[0], id[1], proto, 0])];
    // SAFETY: FragKeyV4 is 12 bytes of integers aligned to 4: saddr, daddr, then the
    // identification as on the wire, the protocol and a zero pad byte (little-endian target).
    unsafe { mem::transmute::<[u32; 3], FragKeyV4>(words) }
}

const _: () = assert!(size_of::<FragKeyV4>() == 12 && cfg!(target_endian = "little"));

/// Remembers a first fragment's ports for the later fragments of its datagram.
#[inline(always)]
pub(crate) fn remember(pkt: &Tuple, ip: *const Ipv4Hdr, proto: u8) {
    let value = FragPorts {
        seen_ns: now_ns(),
        sport: pkt.sport,
        dport: pkt.dport,
        _pad: 0,
    };
    let _ = LB4_FRAGS.insert(&frag_key(pkt.saddr, pkt.daddr, ip, proto), &value, 0);
}

/// The ports of the datagram a later fragment belongs to, if its first fragment was seen
/// within the reassembly timeout.
#[inline(always)]
pub(crate) fn recall(saddr: u32, daddr: u32, ip: *const Ipv4Hdr, proto: u8) -> Option<FragPorts> {
    // SAFETY: the value is copied out at once.
    let f = unsafe { LB4_FRAGS.get(&frag_key(saddr, daddr, ip, proto)) }.copied()?;
    (now_ns().wrapping_sub(f.seen_ns) <= FRAG_TIMEOUT_NS).then_some(f)
}

/// The key of an IPv6 datagram, written as five 64-bit words.
#[inline(always)]
fn frag_key6(saddr: Addr6, daddr: Addr6, id: u32, proto: u8) -> FragKeyV6 {
    let words = [
        saddr[0],
        saddr[1],
        daddr[0],
        daddr[1],
        u64::from(id) | u64::from(proto) << 32,
    ];
    // SAFETY: FragKeyV6 is 40 bytes of integers: the addresses, the identification as on
    // the wire, the protocol and three zero pad bytes (little-endian target).
    unsafe { mem::transmute::<[u64; 5], FragKeyV6>(words) }
}

const _: () = assert!(size_of::<FragKeyV6>() == 40);

/// `remember` for IPv6: `id` is the fragment header's identification (as on the wire).
#[inline(always)]
pub(crate) fn remember6(pkt: &Tuple<Addr6>, id: u32, proto: u8) {
    let value = FragPorts {
        seen_ns: now_ns(),
        sport: pkt.sport,
        dport: pkt.dport,
        _pad: 0,
    };
    let _ = LB6_FRAGS.insert(&frag_key6(pkt.saddr, pkt.daddr, id, proto), &value, 0);
}

/// `recall` for IPv6.
#[inline(always)]
pub(crate) fn recall6(saddr: Addr6, daddr: Addr6, id: u32, proto: u8) -> Option<FragPorts> {
    // SAFETY: the value is copied out at once.
    let f = unsafe { LB6_FRAGS.get(&frag_key6(saddr, daddr, id, proto)) }.copied()?;
    (now_ns().wrapping_sub(f.seen_ns) <= FRAG_TIMEOUT_NS).then_some(f)
}
