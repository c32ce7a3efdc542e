//! The datapath's clock (`LB_CLOCK`): the programs stamp conntrack, affinity and flow events
//! with `jiffies * ns_per_tick + offset`, which reads like `bpf_ktime_get_coarse_ns()`
//! (CLOCK_MONOTONIC at tick resolution) but costs one inlined load instead of a helper call.
//! The kernel advances jiffies from CLOCK_MONOTONIC (a tick of `1e9 / HZ` ns at a time), so
//! one tick length and one offset hold for the whole boot; the agent finds them from two
//! readings of both clocks a few ticks apart, and checks now and then that they still hold.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use aya::programs::Xdp;
use lb_common::Clock;

use crate::bpf::run_frame;

/// Both kernel clocks, read in one run of `lb_clock`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    pub jiffies: u64,
    pub coarse_ns: u64,
}

/// Reads both clocks through `lb_clock` (BPF_PROG_TEST_RUN).
pub fn sample(prog: &Xdp) -> Result<Sample> {
    let (_, out) = run_frame(prog, &[0u8; 64], None).context("running lb_clock")?;
    let word = |i: usize| -> Result<u64> {
        let bytes = out
            .get(i * 8..i * 8 + 8)
            .context("lb_clock returned a short frame")?;
        Ok(u64::from_ne_bytes(bytes.try_into()?))
    };
    Ok(Sample {
        jiffies: word(0)?,
        coarse_ns: word(1)?,
    })
}

/// The clock from two samples at least two ticks apart: the tick is the kernel's
/// (`TICK_NSEC`, from HZ rounded to a whole number), the offset makes the later sample's
/// jiffies read as its coarse time. None when the samples cannot tell.
pub fn from_samples(a: Sample, b: Sample) -> Option<Clock> {
    let ticks = b.jiffies.checked_sub(a.jiffies)?;
    let ns = b.coarse_ns.checked_sub(a.coarse_ns)?;
    if ticks < 2 || ns == 0 {
        return None;
    }
    let hz = (ticks as f64 * 1e9 / ns as f64).round() as u64;
    if hz == 0 {
        return None;
    }
    let ns_per_tick = (1_000_000_000 + hz / 2) / hz;
    Some(Clock {
        ns_per_tick,
        offset_ns: b
            .coarse_ns
            .wrapping_sub(b.jiffies.wrapping_mul(ns_per_tick)),
    })
}

/// How far apart the samples of a first calibration are: HZ comes out exact as long as the
/// tick handler's lateness varies by less than `SPAN / (2 * HZ)` (50 µs at 1000 Hz). The
/// agent's later checks (`Datapath::check_clock`) span minutes.
const SPAN: Duration = Duration::from_millis(100);

/// Calibrates from two samples `SPAN` and at least two ticks apart.
pub fn calibrate(prog: &Xdp) -> Result<(Clock, Sample)> {
    let a = sample(prog)?;
    let started = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(10));
        let b = sample(prog)?;
        if started.elapsed() >= SPAN && b.jiffies >= a.jiffies + 2 {
            let clock = from_samples(a, b)
                .with_context(|| format!("calibrating the datapath clock from {a:?} and {b:?}"))?;
            return Ok((clock, b));
        }
        if started.elapsed() > Duration::from_secs(2) {
            bail!("jiffies did not advance in 2 s ({a:?}, then {b:?}): no datapath clock");
        }
    }
}

/// How far (ns, signed) `clock` reads from the coarse clock at `s`.
pub fn drift(clock: &Clock, s: Sample) -> i64 {
    clock.at(s.jiffies).wrapping_sub(s.coarse_ns) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where the kernel starts jiffies (five minutes before wrapping 32 bits).
    fn initial(hz: u64) -> u64 {
        (u32::MAX as u64 + 1) - 300 * hz
    }

    #[test]
    fn tick_and_offset_from_two_samples() {
        for (hz, tick) in [
            (100, 10_000_000),
            (250, 4_000_000),
            (300, 3_333_333),
            (1000, 1_000_000),
        ] {
            // Booted 1,000 s ago; the coarse clock is a few µs past each tick.
            let j0 = initial(hz) + 1000 * hz;
            let a = Sample {
                jiffies: j0,
                coarse_ns: 1000 * 1_000_000_000 + 3_000,
            };
            // 100 ms later, the tick handler 20 µs later than at `a`.
            let ticks = hz / 10;
            let b = Sample {
                jiffies: j0 + ticks,
                coarse_ns: a.coarse_ns + ticks * tick + 20_000,
            };
            let c = from_samples(a, b).expect("calibrated");
            assert_eq!(c.ns_per_tick, tick, "HZ {hz}");
            assert_eq!(c.at(b.jiffies), b.coarse_ns, "HZ {hz}");
            // A minute of ticks later (the kernel counts a jiffy per `TICK_NSEC` of
            // CLOCK_MONOTONIC), the tick handler 5 µs late: the clocks agree but for the
            // handler's lateness; a tick off by one HZ would be off by 60 ms.
            let later = Sample {
                jiffies: b.jiffies + 60 * hz,
                coarse_ns: b.coarse_ns + 60 * hz * tick - 15_000,
            };
            assert_eq!(drift(&c, later), 15_000, "HZ {hz}");
        }
    }

    #[test]
    fn samples_that_cannot_tell_give_no_clock() {
        let a = Sample {
            jiffies: 1000,
            coarse_ns: 5_000_000_000,
        };
        let one_tick = Sample {
            jiffies: 1001,
            coarse_ns: 5_004_000_000,
        };
        assert_eq!(from_samples(a, one_tick), None);
        let backwards = Sample {
            jiffies: 990,
            coarse_ns: 4_000_000_000,
        };
        assert_eq!(from_samples(a, backwards), None);
        let no_time = Sample {
            jiffies: 1010,
            coarse_ns: 5_000_000_000,
        };
        assert_eq!(from_samples(a, no_time), None);
    }
}
