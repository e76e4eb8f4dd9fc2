//! Random variates for the simulator, drawn by inverse CDF over the engine's `SplitMix64`.
//!
//! Every random quantity in a run comes from a [`Stream`]: a SplitMix64 generator seeded from
//! the scenario seed and a stream label. Failures, the workload and placement each have their own
//! stream (and each node its own failure stream), so changing the recovery policy never shifts
//! the failure trace or the job list: every policy in a comparison faces the same events.

use automigrate_core::fixtures::SplitMix64;

/// One independent, reproducible sequence of random numbers.
#[derive(Debug, Clone)]
pub struct Stream(SplitMix64);

impl Stream {
    /// The stream `label` of a run seeded with `seed`. Distinct labels give unrelated sequences.
    pub fn new(seed: u64, label: u64) -> Self {
        // Mix the label through one SplitMix64 step so neighbouring labels do not give
        // neighbouring states (SplitMix64 states one increment apart are shifted copies).
        let mut mixer = SplitMix64::new(seed ^ label.wrapping_mul(0xD6E8_FEB8_6659_FD93));
        Self(SplitMix64::new(mixer.next_u64()))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        self.0.unit()
    }

    /// Uniform in `(0, 1]`, safe to take the logarithm of.
    fn unit_open(&mut self) -> f64 {
        1.0 - self.0.unit()
    }

    /// Uniform in `0..bound`.
    pub fn below(&mut self, bound: u64) -> u64 {
        self.0.below(bound)
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// Exponential with the given mean (inverse CDF: `-mean · ln U`).
    pub fn exponential(&mut self, mean: f64) -> f64 {
        -mean * self.unit_open().ln()
    }

    /// Weibull with shape `k` and the given mean. The scale is `mean / Γ(1 + 1/k)`; the draw is
    /// `scale · (-ln U)^(1/k)`. A shape below 1 gives infant mortality (failures cluster after a
    /// repair), above 1 wear-out.
    pub fn weibull(&mut self, shape: f64, mean: f64) -> f64 {
        let scale = mean / gamma(1.0 + 1.0 / shape);
        scale * (-self.unit_open().ln()).powf(1.0 / shape)
    }

    /// Log-normal with the given median and log-space standard deviation (Box–Muller).
    pub fn log_normal(&mut self, median: f64, sigma: f64) -> f64 {
        let radius = (-2.0 * self.unit_open().ln()).sqrt();
        let angle = std::f64::consts::TAU * self.unit();
        median * (sigma * radius * angle.cos()).exp()
    }

    /// Uniform in `[low, high)`.
    pub fn uniform(&mut self, low: f64, high: f64) -> f64 {
        low + (high - low) * self.unit()
    }

    /// An index drawn with probability proportional to `weights` (all ≥ 0, not all zero).
    pub fn weighted(&mut self, weights: &[f64]) -> usize {
        let total: f64 = weights.iter().sum();
        let mut target = self.unit() * total;
        for (index, weight) in weights.iter().enumerate() {
            if target < *weight {
                return index;
            }
            target -= weight;
        }
        weights.len().saturating_sub(1)
    }
}

/// The gamma function by the Lanczos approximation (g = 7, 9 terms), accurate to about 1e-13
/// for the positive arguments the Weibull scale needs.
pub fn gamma(x: f64) -> f64 {
    const COEFFICIENTS: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection formula keeps the approximation in its accurate range.
        return std::f64::consts::PI / ((std::f64::consts::PI * x).sin() * gamma(1.0 - x));
    }
    let x = x - 1.0;
    let mut sum = COEFFICIENTS[0];
    for (index, coefficient) in COEFFICIENTS.iter().enumerate().skip(1) {
        sum += coefficient / (x + index as f64);
    }
    let t = x + 7.5;
    (std::f64::consts::TAU).sqrt() * t.powf(x + 0.5) * (-t).exp() * sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gamma_matches_known_values() {
        assert!((gamma(1.0) - 1.0).abs() < 1e-12);
        assert!((gamma(5.0) - 24.0).abs() < 1e-10);
        assert!((gamma(0.5) - std::f64::consts::PI.sqrt()).abs() < 1e-12);
        assert!((gamma(1.5) - 0.886_226_925_452_758).abs() < 1e-12);
    }

    #[test]
    fn sample_means_match_the_requested_means() {
        let mut stream = Stream::new(7, 1);
        let n = 200_000;
        let exp: f64 = (0..n).map(|_| stream.exponential(10.0)).sum::<f64>() / n as f64;
        assert!((exp - 10.0).abs() < 0.15, "exponential mean {exp}");
        for shape in [0.7, 1.0, 2.0] {
            let weibull: f64 = (0..n).map(|_| stream.weibull(shape, 10.0)).sum::<f64>() / n as f64;
            assert!(
                (weibull - 10.0).abs() < 0.25,
                "weibull {shape} mean {weibull}"
            );
        }
        let mut medians: Vec<f64> = (0..n).map(|_| stream.log_normal(5.0, 0.5)).collect();
        medians.sort_by(f64::total_cmp);
        let median = medians[n / 2];
        assert!((median - 5.0).abs() < 0.1, "log-normal median {median}");
    }

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let a: Vec<u64> = (0..4)
            .map({
                let mut s = Stream::new(42, 3);
                move |_| s.next_u64()
            })
            .collect();
        let b: Vec<u64> = (0..4)
            .map({
                let mut s = Stream::new(42, 3);
                move |_| s.next_u64()
            })
            .collect();
        let c: Vec<u64> = (0..4)
            .map({
                let mut s = Stream::new(42, 4);
                move |_| s.next_u64()
            })
            .collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}
