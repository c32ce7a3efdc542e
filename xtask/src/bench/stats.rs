//! The statistics the bench reports: percentiles, rates and ratios.

use std::time::Duration;

/// The `p` quantile (0.0..=1.0) of `sorted` by the nearest-rank rule on `len - 1`
/// (0.5 of [1, 2, 3] is 2, 0.99 of 1..=100 is 99); zero for no samples.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p.clamp(0.0, 1.0)).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// Events per second over `elapsed`; `None` when nothing was timed.
pub fn rate(events: u64, elapsed: Duration) -> Option<f64> {
    let s = elapsed.as_secs_f64();
    (s > 0.0).then(|| events as f64 / s)
}

/// `a / b` when both are measured and `b` is not zero.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => Some(a / b),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|&x| Duration::from_millis(x)).collect()
    }

    #[test]
    fn percentiles() {
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
        assert_eq!(percentile(&ms(&[7]), 0.99), Duration::from_millis(7));
        assert_eq!(percentile(&ms(&[1, 2, 3]), 0.5), Duration::from_millis(2));
        let hundred: Vec<u64> = (1..=100).collect();
        let d = ms(&hundred);
        assert_eq!(percentile(&d, 0.0), Duration::from_millis(1));
        assert_eq!(percentile(&d, 0.5), Duration::from_millis(51)); // index 49.5 rounds up
        assert_eq!(percentile(&d, 0.99), Duration::from_millis(99));
        assert_eq!(percentile(&d, 1.0), Duration::from_millis(100));
        // Out-of-range quantiles are clamped, not a panic.
        assert_eq!(percentile(&d, 7.0), Duration::from_millis(100));
    }

    #[test]
    fn rates_and_ratios() {
        assert_eq!(rate(500, Duration::from_millis(250)), Some(2000.0));
        assert_eq!(rate(5, Duration::ZERO), None);
        assert_eq!(ratio(Some(3.0), Some(1.5)), Some(2.0));
        assert_eq!(ratio(Some(3.0), Some(0.0)), None);
        assert_eq!(ratio(None, Some(1.0)), None);
    }
}
