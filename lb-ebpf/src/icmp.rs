//! ICMP and ICMPv6 errors of translated flows (fragmentation needed / packet too big, port
//! unreachable, time exceeded, ...), translated like the flow they are about, as the kernel's
//! conntrack does: the quoted header gets back the addresses and ports its sender knows, the
//! outer destination becomes that sender, and when the error comes from the flow's peer
//! itself its outer source is translated too; IPv4, ICMP(v6) and quoted L4 checksums follow.
//!
//! The quoted packet went the other way, so its reply tuple is what conntrack knows: its
//! entry (in `LB4_CONNTRACK`, or `LB4_SNAT` for a source-NATed flow) says that packets of
//! that tuple become `N`; the quoted packet, their reverse, becomes the reverse of `N`. One
//! rule serves errors about a forward packet (from a backend or a router on its way: the
//! entry found is the flow's reply entry) and about a reply (the forward entry).

use lb_common::{stat, IPPROTO_UDP};

use crate::{
    csum::{addr6_diff, csum_apply, csum_diff16, csum_diff32, store64},
    family::{Addr6, CtEntry, Family, V4, V6},
    parse::{IcmpError, Tuple},
    telemetry::count,
};

/// Translates an ICMP error about a flow of the datapath's; whether it did (any other is left
/// untouched). `egress`: the packet is leaving (TC egress), where only errors whose
/// destination stays are translated (one whose destination changes is translated where it
/// came in, before routing).
#[inline(always)]
pub(crate) fn translate_error<F: Family>(e: &IcmpError<F>, egress: bool) -> bool {
    let i = &e.inner;
    let key = F::ct_key(i.daddr, i.saddr, i.dport, i.sport, e.inner_proto);
    // SAFETY: the value is copied out at once.
    let entry: F::Entry = match unsafe { F::conntrack().get(&key) } {
        Some(c) => *c,
        None if F::same(i.saddr, F::node_addr()) => {
            // SAFETY: as above.
            match unsafe { F::snat().get(&key) } {
                Some(c) => *c,
                None => return false,
            }
        }
        None => return false,
    };
    let nat = entry.nat();
    let inner = Tuple {
        saddr: nat.daddr,
        daddr: nat.saddr,
        sport: nat.dport,
        dport: nat.sport,
    };
    let daddr = nat.daddr;
    // From the quoted packet's destination itself (a backend's port unreachable): it speaks
    // as the frontend the client knows. From a router on the way: its own address stays.
    let saddr = if F::same(e.saddr, i.daddr) {
        nat.saddr
    } else {
        e.saddr
    };
    if egress && !F::same(daddr, e.daddr) {
        return false;
    }
    F::rewrite_error(e, &inner, saddr, daddr);
    count(stat::ICMP_ERROR_NAT);
    true
}

/// Rewrites an ICMP error in place: outer addresses, the quoted addresses and ports, and the
/// outer IPv4, quoted IPv4, quoted L4 (where quoted) and ICMP checksums, each incrementally
/// (RFC 1624). Direct writes: ICMP never carries a partial checksum, and every change is
/// balanced by a checksum field in the same header, so a `CHECKSUM_COMPLETE` sum stays right.
#[inline(always)]
pub(crate) fn rewrite_error(e: &IcmpError<V4>, inner: &Tuple, saddr: u32, daddr: u32) {
    let i = &e.inner;
    let outer_diff = csum_diff32(e.saddr, saddr) + csum_diff32(e.daddr, daddr);
    let inner_addr_diff = csum_diff32(i.saddr, inner.saddr) + csum_diff32(i.daddr, inner.daddr);
    let port_diff = csum_diff16(i.sport, inner.sport) + csum_diff16(i.dport, inner.dport);
    let udp = e.inner_proto == IPPROTO_UDP;
    // SAFETY: every pointer of `e` was bounds-checked by parse, and nothing has resized the
    // packet since.
    unsafe {
        let e4 = &e.ptrs;
        let ip = &mut *e4.ip;
        ip.check = csum_apply(u16::from_ne_bytes(ip.check), outer_diff).to_ne_bytes();
        ip.src_addr = saddr.to_ne_bytes();
        ip.dst_addr = daddr.to_ne_bytes();

        let q = &mut *e4.inner_ip;
        let old_check = u16::from_ne_bytes(q.check);
        let new_check = csum_apply(old_check, inner_addr_diff);
        // Everything the ICMP checksum covers that changes: the quoted addresses, ports and
        // checksums.
        let mut icmp_diff = inner_addr_diff + port_diff + csum_diff16(old_check, new_check);
        q.check = new_check.to_ne_bytes();
        q.src_addr = inner.saddr.to_ne_bytes();
        q.dst_addr = inner.daddr.to_ne_bytes();
        if let Some(c) = e4.inner_csum {
            let old = u16::from_ne_bytes(*c);
            // A UDP checksum of zero means "none": leave it so.
            if !(udp && old == 0) {
                let mut new = csum_apply(old, inner_addr_diff + port_diff);
                if udp && new == 0 {
                    new = 0xffff;
                }
                icmp_diff += csum_diff16(old, new);
                *c = new.to_ne_bytes();
            }
        }
        let p = &mut *e4.inner_ports;
        p.src = inner.sport.to_ne_bytes();
        p.dst = inner.dport.to_ne_bytes();

        let m = &mut *e4.icmp;
        let c = csum_apply(u16::from_ne_bytes([m[2], m[3]]), icmp_diff).to_ne_bytes();
        m[2] = c[0];
        m[3] = c[1];
    }
}

/// The IPv6 twin of `rewrite_error`. There is no IP header checksum; the ICMPv6 checksum
/// covers a pseudo-header with the outer addresses, so it balances their change too, and the
/// quoted L4 checksum covers the quoted addresses. Direct writes, for the same reasons: every
/// change is balanced by a checksum field of the packet, so a `CHECKSUM_COMPLETE` sum stays
/// right.
#[inline(always)]
pub(crate) fn rewrite_error6(e: &IcmpError<V6>, inner: &Tuple<Addr6>, saddr: Addr6, daddr: Addr6) {
    let i = &e.inner;
    let outer_diff = addr6_diff(e.saddr, saddr) + addr6_diff(e.daddr, daddr);
    let inner_addr_diff = addr6_diff(i.saddr, inner.saddr) + addr6_diff(i.daddr, inner.daddr);
    let port_diff = csum_diff16(i.sport, inner.sport) + csum_diff16(i.dport, inner.dport);
    let udp = e.inner_proto == IPPROTO_UDP;
    let p = &e.ptrs;
    // SAFETY: every pointer of `e` was bounds-checked by parse6, and nothing has resized the
    // packet since.
    unsafe {
        let ip = p.ip.cast::<u8>();
        let q = p.inner_ip.cast::<u8>();
        let mut k = 0;
        while k < 2 {
            store64(ip.add(8 + 8 * k), saddr[k]);
            store64(ip.add(24 + 8 * k), daddr[k]);
            store64(q.add(8 + 8 * k), inner.saddr[k]);
            store64(q.add(24 + 8 * k), inner.daddr[k]);
            k += 1;
        }
        // Everything the ICMPv6 checksum covers that changes: the outer addresses (its
        // pseudo-header), the quoted addresses, ports and L4 checksum.
        let mut icmp_diff = outer_diff + inner_addr_diff + port_diff;
        if let Some(c) = p.inner_csum {
            let old = u16::from_ne_bytes(*c);
            // A UDP checksum of zero means "none": leave it so.
            if !(udp && old == 0) {
                let mut new = csum_apply(old, inner_addr_diff + port_diff);
                if udp && new == 0 {
                    new = 0xffff;
                }
                icmp_diff += csum_diff16(old, new);
                *c = new.to_ne_bytes();
            }
        }
        let ports = &mut *p.inner_ports;
        ports.src = inner.sport.to_ne_bytes();
        ports.dst = inner.dport.to_ne_bytes();

        let m = &mut *p.icmp;
        let c = csum_apply(u16::from_ne_bytes([m[2], m[3]]), icmp_diff).to_ne_bytes();
        m[2] = c[0];
        m[3] = c[1];
    }
}
