//! A small seeded generator (SplitMix64) and the distributions the workloads draw from.
//! Its own code rather than a crate: the sequence for a seed must never change between
//! versions, or results would not compare across them.

#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        (self.unit() * n as f64) as usize % n.max(1)
    }

    /// Exponential with mean `mean`.
    pub fn exponential(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.unit()).ln()
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.unit();
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Gamma with `shape` and mean `mean` (Marsaglia and Tsang; boosted below shape 1).
    pub fn gamma(&mut self, shape: f64, mean: f64) -> f64 {
        let scale = mean / shape;
        if shape < 1.0 {
            let u = 1.0 - self.unit();
            return self.gamma(shape + 1.0, (shape + 1.0) * scale) * u.powf(1.0 / shape);
        }
        let d = shape - 1.0 / 3.0;
        let c = 1.0 / (9.0 * d).sqrt();
        loop {
            let x = self.normal();
            let v = (1.0 + c * x).powi(3);
            if v <= 0.0 {
                continue;
            }
            let u = 1.0 - self.unit();
            if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
                return d * v * scale;
            }
        }
    }

    /// Log-normal with median `median` and log-space deviation `sigma`.
    pub fn log_normal(&mut self, median: f64, sigma: f64) -> f64 {
        median * (sigma * self.normal()).exp()
    }

    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}

/// Ranks drawn with probability ∝ 1 / rankˢ (rank 1 the most popular).
#[derive(Debug, Clone)]
pub struct Zipf {
    cumulative: Vec<f64>,
}

impl Zipf {
    pub fn new(n: usize, skew: f64) -> Self {
        let mut total = 0.0;
        let cumulative = (1..=n.max(1))
            .map(|k| {
                total += 1.0 / (k as f64).powf(skew);
                total
            })
            .collect::<Vec<_>>();
        Self {
            cumulative: cumulative.iter().map(|c| c / total).collect(),
        }
    }

    /// A rank from 0 (the most popular).
    pub fn sample(&self, rng: &mut Rng) -> usize {
        let u = rng.unit();
        self.cumulative
            .partition_point(|c| *c <= u)
            .min(self.cumulative.len() - 1)
    }

    /// The probability of rank `k` (from 0).
    pub fn share(&self, k: usize) -> f64 {
        self.cumulative[k] - if k == 0 { 0.0 } else { self.cumulative[k - 1] }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_gives_the_same_sequence_on_every_version() {
        // Pinned: results of `simulate` compare across versions only if this holds.
        let mut r = Rng::new(1);
        let first: Vec<u64> = (0..3).map(|_| r.next_u64()).collect();
        assert_eq!(
            first,
            vec![
                0x910a_2dec_8902_5cc1,
                0xbeeb_8da1_658e_ec67,
                0xf893_a2ee_fb32_555e
            ]
        );
    }

    #[test]
    fn distributions_have_their_means() {
        let mut r = Rng::new(7);
        let n = 200_000;
        let mean = |f: &mut dyn FnMut() -> f64| (0..n).map(|_| f()).sum::<f64>() / n as f64;
        let exp = mean(&mut || r.exponential(2.0));
        assert!((exp - 2.0).abs() < 0.03, "exponential mean {exp}");
        let mut r = Rng::new(8);
        for shape in [0.25, 1.0, 4.0] {
            let g = mean(&mut || r.gamma(shape, 3.0));
            assert!((g - 3.0).abs() < 0.06, "gamma({shape}) mean {g}");
        }
        let mut r = Rng::new(9);
        let mut draws: Vec<f64> = (0..n).map(|_| r.log_normal(100.0, 1.0)).collect();
        draws.sort_by(f64::total_cmp);
        let median = draws[n / 2];
        assert!((median - 100.0).abs() < 2.0, "log-normal median {median}");
    }

    #[test]
    fn zipf_ranks_follow_their_shares() {
        let z = Zipf::new(4, 1.0);
        // 1 : 1/2 : 1/3 : 1/4 of 25/12.
        let expected = [12.0 / 25.0, 6.0 / 25.0, 4.0 / 25.0, 3.0 / 25.0];
        for (k, e) in expected.iter().enumerate() {
            assert!((z.share(k) - e).abs() < 1e-12);
        }
        let mut r = Rng::new(3);
        let mut counts = [0usize; 4];
        for _ in 0..100_000 {
            counts[z.sample(&mut r)] += 1;
        }
        for (k, e) in expected.iter().enumerate() {
            let got = counts[k] as f64 / 100_000.0;
            assert!((got - e).abs() < 0.01, "rank {k}: {got} vs {e}");
        }
        // Skew 0: uniform.
        let flat = Zipf::new(5, 0.0);
        assert!((0..5).all(|k| (flat.share(k) - 0.2).abs() < 1e-12));
    }
}
