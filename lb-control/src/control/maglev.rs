//! Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable Software Network
//! Load Balancer", NSDI 2016, section 3.4): a lookup table of a prime size M in which every
//! backend owns about M/N entries, filled from per-backend permutations so that
//! * the table depends only on the set of backends (not on their order, nor on the node that
//!   computes it), so every node sends a flow hash to the same backend, and
//! * removing one of N backends reassigns little more than its own ~1/N of the entries.
//!
//! Each backend's permutation comes from two hashes of its identity (address, port,
//! protocol): `offset = h1 mod M`, `skip = h2 mod (M - 1) + 1`, entry j = `(offset + j·skip)
//! mod M`. Backends take turns claiming their next unclaimed entry until the table is full.

use super::hash::{fnv1a, FNV_BASIS};

/// Table sizes the agent accepts: primes, so that every skip visits every entry.
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u64;
    while d * d <= u64::from(n) {
        if u64::from(n).is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// The two hashes of a backend identity, mixed (MurmurHash3's finaliser) so that near
/// addresses get unrelated permutations.
fn hashes(identity: &[u8]) -> (u64, u64) {
    let mix = |mut h: u64| {
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    };
    (
        mix(fnv1a(FNV_BASIS, identity)),
        mix(fnv1a(0x8422_2325_cbf2_9ce4, identity)),
    )
}

/// Fills a table of `size` entries (a prime) for `backends`, given as (identity bytes,
/// value to store). The result holds the values; empty when there are no backends. The
/// order of `backends` does not matter: they are sorted by identity first.
pub fn table<V: Copy>(size: u32, backends: &[(Vec<u8>, V)]) -> Vec<V> {
    if backends.is_empty() || size == 0 {
        return Vec::new();
    }
    let m = u64::from(size);
    let mut sorted: Vec<&(Vec<u8>, V)> = backends.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    sorted.dedup_by(|a, b| a.0 == b.0);
    let perms: Vec<(u64, u64)> = sorted
        .iter()
        .map(|(id, _)| {
            let (h1, h2) = hashes(id);
            (h1 % m, if m > 1 { h2 % (m - 1) + 1 } else { 1 })
        })
        .collect();
    let mut owner: Vec<Option<usize>> = vec![None; size as usize];
    let mut next = vec![0u64; sorted.len()];
    let mut filled = 0u64;
    'fill: loop {
        for (i, (offset, skip)) in perms.iter().enumerate() {
            // A prime size makes each permutation visit every entry, so this ends.
            let mut c = ((offset + next[i] * skip) % m) as usize;
            while owner[c].is_some() {
                next[i] += 1;
                c = ((offset + next[i] * skip) % m) as usize;
            }
            owner[c] = Some(i);
            next[i] += 1;
            filled += 1;
            if filled == m {
                break 'fill;
            }
        }
    }
    owner
        .into_iter()
        .map(|o| sorted[o.unwrap_or(0)].1)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(n: usize) -> Vec<(Vec<u8>, u32)> {
        (0..n)
            .map(|i| {
                (
                    format!("10.244.{}.{}:8080/TCP", i / 200, i % 200).into_bytes(),
                    i as u32,
                )
            })
            .collect()
    }

    #[test]
    fn primes() {
        assert!(is_prime(4093) && is_prime(1021) && is_prime(65521) && is_prime(2));
        assert!(!is_prime(4096) && !is_prime(1) && !is_prime(0) && !is_prime(4095));
    }

    #[test]
    fn every_backend_gets_its_share() {
        let t = table(4093, &backends(10));
        assert_eq!(t.len(), 4093);
        for b in 0..10u32 {
            let n = t.iter().filter(|v| **v == b).count();
            // Maglev's balance: within a few percent of M/N = 409.
            assert!((395..=425).contains(&n), "backend {b} owns {n} entries");
        }
    }

    #[test]
    fn order_does_not_matter() {
        let mut b = backends(7);
        let t1 = table(1021, &b);
        b.reverse();
        assert_eq!(t1, table(1021, &b));
    }

    #[test]
    fn removing_one_of_ten_moves_about_a_tenth() {
        let all = backends(10);
        let before = table(4093, &all);
        let after = table(4093, &all[1..]);
        let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
        let owned_by_removed = before.iter().filter(|v| **v == 0).count();
        // Every entry of the removed backend moves; few others do.
        assert!(moved >= owned_by_removed);
        let share = moved as f64 / 4093.0;
        assert!((0.09..0.15).contains(&share), "moved share {share}");
    }

    #[test]
    fn empty_without_backends() {
        assert!(table::<u32>(1021, &[]).is_empty());
    }
}
