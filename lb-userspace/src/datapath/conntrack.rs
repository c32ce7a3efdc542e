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

use super::error::Result;
use aya::maps::{HashMap, Map, MapData};
use lb_common::{
    map_names, CtEntryV4, CtKeyV4, CT_F_FIN, CT_F_FORWARD, CT_F_REPLY, CT_F_RST, CT_F_SNAT,
    IPPROTO_TCP,
};

use super::{
    clock::monotonic_ns,
    pins::open_map,
    sys::{delete_batch, dump_batch},
};

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
            closed: Duration::from_mins(1),
            tcp_idle: Duration::from_hours(24),
            udp_idle: Duration::from_mins(2),
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

/// Every entry of a conntrack-shaped map: one batch read where the kernel has them (a few
/// syscalls for the whole map instead of two per entry).
fn read_all(map: &HashMap<MapData, CtKeyV4, CtEntryV4>) -> Result<Vec<(CtKeyV4, CtEntryV4)>> {
    let fd = aya::maps::IterableMap::map(map).fd().as_fd();
    Ok(match dump_batch(fd)? {
        Some(all) => all,
        None => map.iter().filter_map(std::result::Result::ok).collect(),
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
/// the expired entries deleted in batches.
///
/// Entries can change between the read and the delete: a SYN on a closed flow's tuple opens
/// a new flow with fresh entries under the same keys (clients reuse ports within seconds).
/// The kernel has no compare-and-delete, so each doomed flow's forward entry and each orphan
/// is looked up again just before the delete, `RECHECK` at a time, and only what is still as
/// it was read goes. That leaves a window of about a millisecond instead of the whole sweep,
/// for one lookup per doomed flow (measured in a release build: 100,000 closed flows swept
/// in 0.36 s, about 0.12 s of it the lookups).
pub fn sweep(pin: &Path, t: &Timeouts) -> Result<Swept> {
    let mut ct: HashMap<MapData, CtKeyV4, CtEntryV4> =
        HashMap::try_from(Map::LruHashMap(open_map(pin, map_names::LB4_CONNTRACK)?))?;
    let mut snat: HashMap<MapData, CtKeyV4, CtEntryV4> =
        HashMap::try_from(Map::LruHashMap(open_map(pin, map_names::LB4_SNAT)?))?;
    let now = monotonic_ns();
    let entries = read_all(&ct)?;
    let snat_entries = read_all(&snat)?;
    let mut swept = Swept::default();
    for part in decide(&entries, &snat_entries, now, t).chunks(RECHECK) {
        let (ct_keys, snat_keys, n) = part.still_as_read(
            |k: &CtKeyV4| ct.get(k, 0).ok(),
            |k: &CtKeyV4| snat.get(k, 0).ok(),
        );
        remove_all(&mut ct, &ct_keys)?;
        remove_all(&mut snat, &snat_keys)?;
        swept.flows += n.flows;
        swept.snat += n.snat;
        swept.orphans += n.orphans;
    }
    Ok(swept)
}

/// Doomed flows (or orphans) looked up again, then deleted, at a time.
const RECHECK: usize = 512;

/// What a sweep would delete, as read.
#[derive(Debug, Default)]
struct Doomed {
    /// Expired flows: the forward entry, and the key of the reply entry if there is one (in
    /// `LB4_SNAT` for a source-NATed flow).
    flows: Vec<(CtKeyV4, CtEntryV4, Option<CtKeyV4>)>,
    /// Reply entries no forward entry leads to, in `LB4_CONNTRACK` and in `LB4_SNAT`.
    orphans: Vec<(CtKeyV4, CtEntryV4)>,
    snat_orphans: Vec<(CtKeyV4, CtEntryV4)>,
}

impl Doomed {
    /// The same, `n` flows or orphans at a time.
    fn chunks(self, n: usize) -> Vec<Doomed> {
        let n = n.max(1);
        let flows = self.flows.chunks(n).map(|c| Doomed {
            flows: c.to_vec(),
            ..Default::default()
        });
        let orphans = self.orphans.chunks(n).map(|c| Doomed {
            orphans: c.to_vec(),
            ..Default::default()
        });
        let snat_orphans = self.snat_orphans.chunks(n).map(|c| Doomed {
            snat_orphans: c.to_vec(),
            ..Default::default()
        });
        flows.chain(orphans).chain(snat_orphans).collect()
    }

    /// The keys to delete from `LB4_CONNTRACK` and `LB4_SNAT`, and what they amount to: what
    /// the maps (`ct`, `snat`: a lookup now) still hold as it was read. A flow whose forward
    /// entry changed (reopened, or refreshed by a late packet) stays for a later sweep.
    fn still_as_read(
        &self,
        ct: impl Fn(&CtKeyV4) -> Option<CtEntryV4>,
        snat: impl Fn(&CtKeyV4) -> Option<CtEntryV4>,
    ) -> (Vec<CtKeyV4>, Vec<CtKeyV4>, Swept) {
        let mut swept = Swept::default();
        // Sets: a key is deleted once.
        let mut drop_ct = HashSet::new();
        let mut drop_snat = HashSet::new();
        for (key, fwd, reply) in &self.flows {
            if ct(key).as_ref() != Some(fwd) {
                continue;
            }
            swept.flows += 1;
            drop_ct.insert(*key);
            match reply {
                Some(r) if fwd.flags & CT_F_SNAT != 0 => drop_snat.insert(*r),
                Some(r) => drop_ct.insert(*r),
                None => false,
            };
        }
        for (key, e) in &self.orphans {
            if ct(key).as_ref() == Some(e) && drop_ct.insert(*key) {
                swept.orphans += 1;
            }
        }
        for (key, e) in &self.snat_orphans {
            if snat(key).as_ref() == Some(e) && drop_snat.insert(*key) {
                swept.orphans += 1;
            }
        }
        swept.snat = drop_snat.len();
        (
            drop_ct.into_iter().collect(),
            drop_snat.into_iter().collect(),
            swept,
        )
    }
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
    let mut doomed = Doomed::default();
    // The reply entries the forward entries lead to, per map.
    let mut live_ct = HashSet::new();
    let mut live_snat = HashSet::new();
    for (key, e) in entries {
        if e.flags & CT_F_FORWARD == 0 {
            continue;
        }
        let pk = partner_key(key, e);
        let reply = if e.flags & CT_F_SNAT != 0 {
            live_snat.insert(pk);
            snat_by_key.get(&pk)
        } else {
            live_ct.insert(pk);
            ct_by_key.get(&pk)
        };
        if expired(e, reply, key.proto, now, t) {
            doomed.flows.push((*key, *e, reply.map(|_| pk)));
        }
    }
    let quiet =
        |e: &CtEntryV4| Duration::from_nanos(now.saturating_sub(e.last_seen_ns)) >= t.closed;
    doomed.orphans = entries
        .iter()
        .filter(|(k, e)| e.flags & CT_F_REPLY != 0 && !live_ct.contains(k) && quiet(e))
        .copied()
        .collect();
    doomed.snat_orphans = snat_entries
        .iter()
        .filter(|(k, e)| !live_snat.contains(k) && quiet(e))
        .copied()
        .collect();
    doomed
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

    /// The sweep's rules with a 10 s close grace (the numbers below are in its terms).
    fn ten_second_grace() -> Timeouts {
        Timeouts {
            closed: Duration::from_secs(10),
            ..Timeouts::default()
        }
    }

    #[test]
    fn the_default_grace_outlasts_time_wait() {
        assert!(Timeouts::default().closed >= Duration::from_mins(1));
    }

    #[test]
    fn closed_flows_go_after_the_grace() {
        let t = ten_second_grace();
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
            closed: Duration::from_mins(1),
            tcp_idle: Duration::from_hours(1),
            udp_idle: Duration::from_mins(2),
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

    /// The keys a sweep deletes from each map (sorted) and its counts, when the maps still
    /// hold `ct` and `snat` at the delete.
    fn swept(
        d: &Doomed,
        ct: &[(CtKeyV4, CtEntryV4)],
        snat: &[(CtKeyV4, CtEntryV4)],
    ) -> (Vec<CtKeyV4>, Vec<CtKeyV4>, Swept) {
        let find = |m: &[(CtKeyV4, CtEntryV4)], k: &CtKeyV4| {
            m.iter().find(|(key, _)| key == k).map(|(_, e)| *e)
        };
        let (mut c, mut s, n) = d.still_as_read(|k| find(ct, k), |k| find(snat, k));
        c.sort_by_key(|k| (k.saddr, k.daddr, k.sport, k.dport));
        s.sort_by_key(|k| (k.saddr, k.daddr, k.sport, k.dport));
        (c, s, n)
    }

    #[test]
    fn reply_entries_of_a_rechosen_flow_go_when_quiet() {
        let t = ten_second_grace();
        // The flow went to backend 5, then was chosen again for backend 7: the forward
        // entry leads to 7's reply entry; 5's is left behind.
        let [_, old_reply] = flow(5, 1, 3, 0, 100 * S);
        let [fwd, new_reply] = flow(7, 1, 3, 0, 105 * S);
        let entries = [fwd, new_reply, old_reply];
        let d = decide(&entries, &[], 108 * S, &t);
        assert_eq!(swept(&d, &entries, &[]).0, vec![], "within the grace");
        let d = decide(&entries, &[], 111 * S, &t);
        let orphan = Swept {
            orphans: 1,
            ..Default::default()
        };
        assert_eq!(
            swept(&d, &entries, &[]),
            (vec![old_reply.0], vec![], orphan)
        );

        // The same with source NAT: the old port's entry in LB4_SNAT goes, the new one stays.
        let [_, old_snat] = flow(5, 9, 61000, CT_F_SNAT, 100 * S);
        let [fwd, new_snat] = flow(5, 9, 62000, CT_F_SNAT, 105 * S);
        let snat = [old_snat, new_snat];
        let d = decide(&[fwd], &snat, 111 * S, &t);
        let (c, s, n) = swept(&d, &[fwd], &snat);
        assert_eq!((c, s), (vec![], vec![old_snat.0]));
        assert_eq!((n.orphans, n.snat), (1, 1));
    }

    #[test]
    fn a_closed_flow_goes_whole_unless_reopened_before_the_delete() {
        let t = ten_second_grace();
        let [fwd, reply] = flow(5, 1, 3, CT_F_FIN, 100 * S);
        let entries = [fwd, reply];
        let d = decide(&entries, &[], 111 * S, &t);
        let (c, s, n) = swept(&d, &entries, &[]);
        assert_eq!((c, s), (vec![fwd.0, reply.0], vec![]));
        assert_eq!(n.flows, 1);
        // Between the read and the delete the client reopens the tuple: fresh entries under
        // the same keys (here to backend 7), which the sweep leaves alone.
        let [fresh_fwd, fresh_reply] = flow(7, 1, 3, 0, 111 * S);
        let now = [fresh_fwd, fresh_reply, reply];
        assert_eq!(swept(&d, &now, &[]), (vec![], vec![], Swept::default()));
        // A source-NATed flow likewise: neither its entry nor its port's goes.
        let [fwd, reply] = flow(5, 9, 61000, CT_F_SNAT | CT_F_FIN, 100 * S);
        let d = decide(&[fwd], &[reply], 111 * S, &t);
        assert_eq!(swept(&d, &[fwd], &[reply]).1, vec![reply.0]);
        let [fresh_fwd, _] = flow(5, 9, 62000, CT_F_SNAT, 111 * S);
        assert_eq!(swept(&d, &[fresh_fwd], &[reply]).1, vec![]);
    }

    #[test]
    fn a_sweep_goes_in_parts_that_keep_everything() {
        let [f1, r1] = flow(5, 1, 3, CT_F_FIN, 0);
        let [f2, r2] = flow(6, 1, 3, CT_F_FIN, 0);
        let [f3, _] = flow(7, 1, 3, CT_F_FIN, 0);
        let d = Doomed {
            flows: vec![
                (f1.0, f1.1, Some(r1.0)),
                (f2.0, f2.1, None),
                (f3.0, f3.1, None),
            ],
            orphans: vec![r1, r2],
            snat_orphans: vec![],
        };
        let parts = d.chunks(2);
        let sizes: Vec<(usize, usize, usize)> = parts
            .iter()
            .map(|p| (p.flows.len(), p.orphans.len(), p.snat_orphans.len()))
            .collect();
        assert_eq!(sizes, vec![(2, 0, 0), (1, 0, 0), (0, 2, 0)]);
        assert_eq!(parts[1].flows[0].0, f3.0);
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
