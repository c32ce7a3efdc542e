//! Conntrack garbage collection: the datapath records FIN and RST per direction; the agent
//! removes a flow (its forward entry and its reply entry, in `LB4_CONNTRACK` or, for a
//! source-NATed flow, `LB4_SNAT`, which frees its port) once it has closed and been quiet for
//! a grace period, or has been idle longer than its protocol's timeout. The LRU maps also
//! evict under pressure; this keeps them from filling with dead flows in the first place.

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    os::fd::AsFd,
    path::Path,
    time::Duration,
};

use anyhow::Result;
use aya::maps::{HashMap, Map, MapData};
use lb_common::{
    map_names, CtEntryV4, CtKeyV4, CT_F_FIN, CT_F_FORWARD, CT_F_REPLY, CT_F_RST, CT_F_SNAT,
    IPPROTO_TCP,
};

use crate::bpf::{delete_batch, dump_batch, open_map};

/// When flows are removed.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// A closed flow (FIN both ways, or a RST) quiet this long.
    pub closed: Duration,
    /// A TCP flow idle this long (kube-proxy sets nf_conntrack_tcp_timeout_established to
    /// 24 h).
    pub tcp_idle: Duration,
    /// A UDP flow idle this long (the kernel's UDP stream timeout is 120 s).
    pub udp_idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            closed: Duration::from_secs(10),
            tcp_idle: Duration::from_secs(24 * 3600),
            udp_idle: Duration::from_secs(120),
        }
    }
}

/// What one sweep removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    pub flows: usize,
    pub snat: usize,
    pub orphans: usize,
}

/// The key of the other direction's entry of a flow: packets of the other direction carry
/// this entry's translated tuple, reversed (for a forward entry: from the backend to the
/// translated source; for a reply entry: from the client to the frontend).
pub fn partner_key(key: &CtKeyV4, e: &CtEntryV4) -> CtKeyV4 {
    CtKeyV4 {
        saddr: e.nat_daddr,
        daddr: e.nat_saddr,
        sport: e.nat_dport,
        dport: e.nat_sport,
        proto: key.proto,
        _pad: [0; 3],
    }
}

/// Whether a flow is over, from both directions' entries: closed (FIN both ways, or a RST)
/// and quiet for `t.closed`, or idle for its protocol's timeout.
fn expired(
    fwd: &CtEntryV4,
    reply: Option<&CtEntryV4>,
    proto: u8,
    now_ns: u64,
    t: &Timeouts,
) -> bool {
    let last = reply.map_or(fwd.last_seen_ns, |r| r.last_seen_ns.max(fwd.last_seen_ns));
    let idle = Duration::from_nanos(now_ns.saturating_sub(last));
    let rst = (fwd.flags | reply.map_or(0, |r| r.flags)) & CT_F_RST != 0;
    let fin_both = fwd.flags & CT_F_FIN != 0 && reply.is_some_and(|r| r.flags & CT_F_FIN != 0);
    if (rst || fin_both) && idle >= t.closed {
        return true;
    }
    idle >= if proto == IPPROTO_TCP {
        t.tcp_idle
    } else {
        t.udp_idle
    }
}

/// CLOCK_MONOTONIC in ns: the clock of `bpf_ktime_get_coarse_ns`, which trails it by at most a
/// tick (ages come out that much longer).
fn monotonic_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64);
    ts.unwrap_or(0)
}

/// Every entry of a conntrack-shaped map: one batch read where the kernel has them (a few
/// syscalls for the whole map instead of two per entry).
fn read_all(map: &HashMap<MapData, CtKeyV4, CtEntryV4>) -> Result<Vec<(CtKeyV4, CtEntryV4)>> {
    let fd = aya::maps::IterableMap::map(map).fd().as_fd();
    Ok(match dump_batch(fd)? {
        Some(all) => all,
        None => map.iter().filter_map(|r| r.ok()).collect(),
    })
}

/// Deletes `keys` (those already gone are skipped), in batches where the kernel has them.
fn remove_all(map: &mut HashMap<MapData, CtKeyV4, CtEntryV4>, keys: &[CtKeyV4]) -> Result<()> {
    let fd = aya::maps::IterableMap::map(map).fd().as_fd();
    if !delete_batch(fd, keys)? {
        for k in keys {
            let _ = map.remove(k);
        }
    }
    Ok(())
}

/// One sweep over the pinned conntrack and SNAT maps: both read whole, decided in memory,
/// the expired entries deleted together.
pub fn sweep(pin: &Path, t: &Timeouts) -> Result<Swept> {
    let mut ct: HashMap<MapData, CtKeyV4, CtEntryV4> =
        HashMap::try_from(Map::LruHashMap(open_map(pin, map_names::CONNTRACK_V4)?))?;
    let mut snat: HashMap<MapData, CtKeyV4, CtEntryV4> =
        HashMap::try_from(Map::LruHashMap(open_map(pin, map_names::SNAT_V4)?))?;
    let now = monotonic_ns();
    let entries = read_all(&ct)?;
    let snat_entries = read_all(&snat)?;
    let doomed = decide(&entries, &snat_entries, now, t);
    remove_all(&mut ct, &doomed.conntrack)?;
    remove_all(&mut snat, &doomed.snat)?;
    Ok(doomed.swept)
}

/// What a sweep deletes, and why.
struct Doomed {
    conntrack: Vec<CtKeyV4>,
    snat: Vec<CtKeyV4>,
    swept: Swept,
}

/// Decides a sweep from both maps' entries: expired flows (both their entries), and reply
/// entries no forward entry leads to any more (the forward entry evicted by the LRU, or the
/// flow chosen again: a UDP flow whose backend went, a reopened TCP tuple) once they have
/// been quiet for the close grace.
fn decide(
    entries: &[(CtKeyV4, CtEntryV4)],
    snat_entries: &[(CtKeyV4, CtEntryV4)],
    now: u64,
    t: &Timeouts,
) -> Doomed {
    let ct_by_key: StdHashMap<CtKeyV4, CtEntryV4> = entries.iter().copied().collect();
    let snat_by_key: StdHashMap<CtKeyV4, CtEntryV4> = snat_entries.iter().copied().collect();
    let mut swept = Swept::default();
    // Sets: a reply entry is also its partner's, and is deleted once.
    let mut drop_ct = HashSet::new();
    let mut drop_snat = HashSet::new();
    // The reply entries the forward entries lead to, per map.
    let mut live_ct = HashSet::new();
    let mut live_snat = HashSet::new();
    for (key, e) in entries {
        if e.flags & CT_F_FORWARD == 0 {
            continue;
        }
        let pk = partner_key(key, e);
        let in_snat = e.flags & CT_F_SNAT != 0;
        let reply = if in_snat {
            live_snat.insert(pk);
            snat_by_key.get(&pk)
        } else {
            live_ct.insert(pk);
            ct_by_key.get(&pk)
        };
        if expired(e, reply, key.proto, now, t) {
            drop_ct.insert(*key);
            if reply.is_some() {
                if in_snat {
                    drop_snat.insert(pk);
                } else {
                    drop_ct.insert(pk);
                }
            }
            swept.flows += 1;
        }
    }
    let quiet =
        |e: &CtEntryV4| Duration::from_nanos(now.saturating_sub(e.last_seen_ns)) >= t.closed;
    for (key, e) in entries {
        if e.flags & CT_F_REPLY != 0 && !live_ct.contains(key) && quiet(e) && drop_ct.insert(*key) {
            swept.orphans += 1;
        }
    }
    for (key, e) in snat_entries {
        if !live_snat.contains(key) && quiet(e) && drop_snat.insert(*key) {
            swept.orphans += 1;
        }
    }
    swept.snat = drop_snat.len();
    Doomed {
        conntrack: drop_ct.into_iter().collect(),
        snat: drop_snat.into_iter().collect(),
        swept,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(flags: u16, last: u64) -> CtEntryV4 {
        CtEntryV4 {
            last_seen_ns: last,
            flags,
            ..Default::default()
        }
    }

    const S: u64 = 1_000_000_000;

    #[test]
    fn closed_flows_go_after_the_grace() {
        let t = Timeouts::default();
        let fwd = entry(CT_F_FORWARD | CT_F_FIN, 100 * S);
        let rep = entry(CT_F_REPLY | CT_F_FIN, 100 * S);
        assert!(
            !expired(&fwd, Some(&rep), 6, 105 * S, &t),
            "within the grace"
        );
        assert!(expired(&fwd, Some(&rep), 6, 111 * S, &t));
        // One FIN is a half-close: the flow lives on.
        let open = entry(CT_F_REPLY, 100 * S);
        assert!(!expired(&fwd, Some(&open), 6, 200 * S, &t));
        // A RST in either direction closes it.
        let rst = entry(CT_F_REPLY | CT_F_RST, 100 * S);
        assert!(expired(
            &entry(CT_F_FORWARD, 100 * S),
            Some(&rst),
            6,
            111 * S,
            &t
        ));
    }

    #[test]
    fn idle_flows_time_out() {
        let t = Timeouts {
            closed: Duration::from_secs(10),
            tcp_idle: Duration::from_secs(3600),
            udp_idle: Duration::from_secs(120),
        };
        let fwd = entry(CT_F_FORWARD, 0);
        assert!(!expired(&fwd, None, 6, 3599 * S, &t));
        assert!(expired(&fwd, None, 6, 3600 * S, &t));
        assert!(!expired(&fwd, None, 17, 119 * S, &t));
        assert!(expired(&fwd, None, 17, 120 * S, &t));
    }

    fn key(saddr: u32, daddr: u32, sport: u16, dport: u16) -> CtKeyV4 {
        CtKeyV4 {
            saddr,
            daddr,
            sport,
            dport,
            proto: IPPROTO_TCP,
            _pad: [0; 3],
        }
    }

    /// A flow from client 1:3 to frontend 2:4, translated to `backend`:6 (from `src`:`sport`),
    /// seen at `last`: its forward key and entry, its reply key and entry.
    fn flow(
        backend: u32,
        src: u32,
        sport: u16,
        flags: u16,
        last: u64,
    ) -> [(CtKeyV4, CtEntryV4); 2] {
        let fwd = CtEntryV4 {
            nat_saddr: src,
            nat_daddr: backend,
            nat_sport: sport,
            nat_dport: 6,
            flags: CT_F_FORWARD | flags,
            last_seen_ns: last,
            ..Default::default()
        };
        let rep = CtEntryV4 {
            nat_saddr: 2,
            nat_daddr: 1,
            nat_sport: 4,
            nat_dport: 3,
            flags: CT_F_REPLY | flags,
            last_seen_ns: last,
            ..Default::default()
        };
        [(key(1, 2, 3, 4), fwd), (key(backend, src, 6, sport), rep)]
    }

    #[test]
    fn reply_entries_of_a_rechosen_flow_go_when_quiet() {
        let t = Timeouts::default();
        // The flow went to backend 5, then was chosen again for backend 7: the forward
        // entry leads to 7's reply entry; 5's is left behind.
        let [_, old_reply] = flow(5, 1, 3, 0, 100 * S);
        let [fwd, new_reply] = flow(7, 1, 3, 0, 105 * S);
        let entries = [fwd, new_reply, old_reply];
        let d = decide(&entries, &[], 108 * S, &t);
        assert!(
            d.conntrack.is_empty(),
            "within the grace: {:?}",
            d.conntrack
        );
        let d = decide(&entries, &[], 111 * S, &t);
        assert_eq!(d.conntrack, vec![old_reply.0]);
        assert_eq!(
            d.swept,
            Swept {
                orphans: 1,
                ..Default::default()
            }
        );

        // The same with source NAT: the old port's entry in LB4_SNAT goes, the new one stays.
        let [_, old_snat] = flow(5, 9, 61000, CT_F_SNAT, 100 * S);
        let [fwd, new_snat] = flow(5, 9, 62000, CT_F_SNAT, 105 * S);
        let d = decide(&[fwd], &[old_snat, new_snat], 111 * S, &t);
        assert!(d.conntrack.is_empty());
        assert_eq!(d.snat, vec![old_snat.0]);
        assert_eq!((d.swept.orphans, d.swept.snat), (1, 1));

        // A closed flow goes whole: its forward entry and the reply entry it leads to.
        let [fwd, reply] = flow(5, 1, 3, CT_F_FIN, 100 * S);
        let mut d = decide(&[fwd, reply], &[], 111 * S, &t);
        d.conntrack.sort_by_key(|k| (k.saddr, k.daddr));
        assert_eq!(d.conntrack, vec![fwd.0, reply.0]);
        assert_eq!(d.swept.flows, 1);
    }

    #[test]
    fn partner_of_forward_and_reply() {
        let key = CtKeyV4 {
            saddr: 1,
            daddr: 2,
            sport: 3,
            dport: 4,
            proto: 6,
            _pad: [0; 3],
        };
        // client 1:3 → frontend 2:4, translated to node 9:7 → backend 5:6.
        let fwd = CtEntryV4 {
            nat_saddr: 9,
            nat_daddr: 5,
            nat_sport: 7,
            nat_dport: 6,
            flags: CT_F_FORWARD,
            ..Default::default()
        };
        let rk = partner_key(&key, &fwd);
        assert_eq!((rk.saddr, rk.daddr, rk.sport, rk.dport), (5, 9, 6, 7));
        let rep = CtEntryV4 {
            nat_saddr: 2,
            nat_daddr: 1,
            nat_sport: 4,
            nat_dport: 3,
            flags: CT_F_REPLY,
            ..Default::default()
        };
        assert_eq!(partner_key(&rk, &rep), key);
    }
}
