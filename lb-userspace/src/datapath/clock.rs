//! The datapath's clock (`LB_CLOCK`): the programs stamp conntrack, affinity and flow events
//! with `jiffies * ns_per_tick + offset`, which reads like `bpf_ktime_get_coarse_ns()`
//! (CLOCK_MONOTONIC at tick resolution) but costs one inlined load instead of a helper call.
//! The kernel advances jiffies from CLOCK_MONOTONIC (a tick of `1e9 / HZ` ns at a time), so
//! one tick length and one offset hold for the whole boot; the agent finds them from readings
//! of both clocks over 200 ms, and checks now and then that they still hold.

use std::time::{Duration, Instant};

use std::path::Path;

use super::error::{refuse, Context, Result};
use aya::{
    maps::{Array, Map, MapData},
    programs::Xdp,
};
use lb_common::{map_names, Clock};

use super::{pins::open_map, test_run::run_frame};

fn clock_map(pin: &Path) -> Result<Array<MapData, Clock>> {
    Ok(Array::try_from(Map::Array(open_map(
        pin,
        map_names::LB_CLOCK,
    )?))?)
}

/// Writes the datapath's clock (`LB_CLOCK[0]`).
pub fn write(pin: &Path, clock: &Clock) -> Result<()> {
    clock_map(pin)?.set(0, clock, 0).context("writing LB_CLOCK")
}

/// The datapath's clock as pinned (`LB_CLOCK[0]`; a zero tick: not calibrated).
pub fn read(pin: &Path) -> Result<Clock> {
    clock_map(pin)?.get(&0, 0).context("reading LB_CLOCK")
}

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
        let bytes: [u8; 8] = out
            .get(i * 8..i * 8 + 8)
            .and_then(|b| b.try_into().ok())
            .context("lb_clock returned a short frame")?;
        Ok(u64::from_ne_bytes(bytes))
    };
    Ok(Sample {
        jiffies: word(0)?,
        coarse_ns: word(1)?,
    })
}

/// The tick rates Linux offers (`CONFIG_HZ`).
const HZ_CHOICES: [u64; 4] = [100, 250, 300, 1000];

/// The kernel's tick (`TICK_NSEC`) from two samples: the HZ they show, taken to the nearest
/// of Linux's choices. The two clocks are updated a tick at a time but not always at the
/// same tick (seen here: 12 or 13 jiffies over the same 50 ms), so a span of N ticks can
/// read 1/N off; the nearest choices, 250 and 300, are 20 % apart. None when the samples
/// show none of them within 15 %.
pub fn tick_of(a: Sample, b: Sample) -> Option<u64> {
    let ticks = b.jiffies.checked_sub(a.jiffies)?;
    let ns = b.coarse_ns.checked_sub(a.coarse_ns)?;
    if ticks < 2 || ns == 0 {
        return None;
    }
    let seen = ticks as f64 * 1e9 / ns as f64;
    let off = |hz: u64| (seen - hz as f64).abs() / hz as f64;
    let hz = HZ_CHOICES
        .into_iter()
        .min_by(|a, b| off(*a).total_cmp(&off(*b)))
        .filter(|hz| off(*hz) <= 0.15)?;
    Some(tick_ns(hz))
}

/// The kernel's tick at `hz` (`TICK_NSEC`), and back: the HZ of a calibrated clock.
fn tick_ns(hz: u64) -> u64 {
    (1_000_000_000 + hz / 2) / hz
}

/// The HZ a calibrated clock ticks at (0: not calibrated).
pub fn hz(clock: &Clock) -> u64 {
    match clock.ns_per_tick {
        0 => 0,
        tick => tick_ns(tick),
    }
}

/// The clock for `tick` that reads each sample's jiffies as its coarse time, up to the tick
/// the two clocks may be apart: the median of the samples' offsets.
pub fn fit(tick: u64, samples: &[Sample]) -> Option<Clock> {
    let mut offsets: Vec<u64> = samples
        .iter()
        .map(|s| s.coarse_ns.wrapping_sub(s.jiffies.wrapping_mul(tick)))
        .collect();
    // Offsets lie within a few ticks of each other: sort them as distances from the first.
    let first = *offsets.first()?;
    offsets.sort_by_key(|o| o.wrapping_sub(first) as i64);
    Some(Clock {
        ns_per_tick: tick,
        offset_ns: offsets[offsets.len() / 2],
    })
}

/// How long a calibration samples: 20 ticks at 100 Hz, 50 at 250 Hz.
const SPAN: Duration = Duration::from_millis(200);

/// Calibrates from samples every 10 ms over `SPAN` (and at least two ticks).
pub fn calibrate(prog: &Xdp) -> Result<Clock> {
    let mut samples = vec![sample(prog)?];
    let started = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(10));
        samples.push(sample(prog)?);
        let (a, b) = (samples[0], samples[samples.len() - 1]);
        if started.elapsed() >= SPAN && b.jiffies >= a.jiffies + 2 {
            let tick = tick_of(a, b).with_context(|| {
                format!("the kernel's tick from {a:?} and {b:?} is none of HZ {HZ_CHOICES:?}")
            })?;
            return fit(tick, &samples).context("no samples");
        }
        if started.elapsed() > Duration::from_secs(2) {
            refuse!("jiffies did not advance in 2 s ({a:?}, then {b:?}): no datapath clock");
        }
    }
}

/// CLOCK_MONOTONIC in ns, what the datapath's stamps are compared with: they trail it by up
/// to a tick or two (ages come out that much longer).
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
    })
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
        (u64::from(u32::MAX) + 1) - 300 * hz
    }

    #[test]
    fn tick_and_offset_from_samples_a_tick_apart_at_most() {
        for (hz, tick) in [
            (100, 10_000_000),
            (250, 4_000_000),
            (300, 3_333_333),
            (1000, 1_000_000),
        ] {
            // Booted 1,000 s ago; the coarse clock a few µs past each tick, or a tick behind
            // the jiffies (the two are not always updated at the same tick).
            let j0 = initial(hz) + 1000 * hz;
            let at = |ticks: u64, behind: u64| Sample {
                jiffies: j0 + ticks,
                coarse_ns: 1000 * 1_000_000_000 + (ticks - behind) * tick + 3_000,
            };
            let samples: Vec<Sample> = (0..=hz / 10).map(|t| at(t, t % 7 / 6)).collect();
            let (a, b) = (samples[0], *samples.last().expect("samples"));
            assert_eq!(tick_of(a, b), Some(tick), "HZ {hz}");
            // 100 ms with the last reading a tick behind (11 % at 100 Hz): still this HZ.
            assert_eq!(
                tick_of(a, at(hz / 10, 1)),
                Some(tick),
                "HZ {hz}, a tick behind"
            );
            let c = fit(tick, &samples).expect("clock");
            assert_eq!(c.ns_per_tick, tick);
            assert_eq!(super::hz(&c), hz);
            // Most samples were in step: the clock reads them to the µs.
            assert_eq!(drift(&c, a), 0, "HZ {hz}");
            // A minute of ticks later (the kernel counts a jiffy per `TICK_NSEC` of
            // CLOCK_MONOTONIC) the clocks still agree; a tick off by one HZ would be 60 ms
            // off.
            assert_eq!(drift(&c, at(60 * hz, 0)), 0, "HZ {hz}");
        }
    }

    #[test]
    fn samples_that_cannot_tell_give_no_tick() {
        let a = Sample {
            jiffies: 1000,
            coarse_ns: 5_000_000_000,
        };
        let at = |jiffies, coarse_ns| Sample { jiffies, coarse_ns };
        assert_eq!(tick_of(a, at(1001, 5_004_000_000)), None, "one tick");
        assert_eq!(tick_of(a, at(990, 4_000_000_000)), None, "backwards");
        assert_eq!(tick_of(a, at(1010, 5_000_000_000)), None, "no time");
        // 500 Hz is none of Linux's choices.
        assert_eq!(tick_of(a, at(1050, 5_100_000_000)), None, "500 Hz");
        assert_eq!(fit(4_000_000, &[]), None);
    }
}
