//! Inverted dropout on the LoRA input path, with masks kept as bits: one bit per element instead
//! of an f32 multiplier (the backward pass needs every module's mask, and for all-linear targets
//! f32 masks were the largest activation of all). Masks are drawn in parallel from a seed taken
//! from the caller's generator, so a given generator state always yields the same mask.

use crate::rng::Rng;
use rayon::prelude::*;

/// 64-bit words per parallel task (32K elements).
const WORDS_PER_TASK: usize = 512;

/// Which of `len` elements are kept (bit set) and the factor 1/(1−p) kept elements are scaled by.
pub struct DropoutMask {
    bits: Vec<u64>,
    len: usize,
    scale: f32,
}

impl DropoutMask {
    /// Drops each element with probability `p` (in [0, 1)).
    pub fn sample(rng: &mut Rng, len: usize, p: f32) -> Self {
        assert!((0.0..1.0).contains(&p), "dropout probability {p} outside [0, 1)");
        let seed = rng.next_u64();
        // An element is dropped when a uniform 24-bit draw u satisfies u / 2^24 < p; each 64-bit
        // draw gives two such values.
        let threshold = (p as f64 * (1u64 << 24) as f64).ceil() as u64;
        let mut bits = vec![0u64; len.div_ceil(64)];
        bits.par_chunks_mut(WORDS_PER_TASK).enumerate().for_each(|(task, words)| {
            let mut r = Rng::new(seed ^ (task as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            for word in words {
                let mut w = 0u64;
                for b in (0..64).step_by(2) {
                    let draw = r.next_u64();
                    w |= u64::from(draw >> 40 >= threshold) << b;
                    w |= u64::from((draw >> 16) & 0xFF_FFFF >= threshold) << (b + 1);
                }
                *word = w;
            }
        });
        DropoutMask { bits, len, scale: 1.0 / (1.0 - p) }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[cfg(test)]
    fn kept(&self, i: usize) -> bool {
        (self.bits[i / 64] >> (i % 64)) & 1 == 1
    }

    /// `x` with dropped elements zeroed and kept ones scaled by 1/(1−p).
    pub fn apply(&self, x: &[f32]) -> Vec<f32> {
        let mut out = x.to_vec();
        self.apply_in_place(&mut out);
        out
    }

    /// As `apply`, in place.
    pub fn apply_in_place(&self, x: &mut [f32]) {
        assert_eq!(x.len(), self.len, "dropout mask for {} elements applied to {}", self.len, x.len());
        let scale = self.scale;
        x.par_chunks_mut(64 * WORDS_PER_TASK).zip(self.bits.par_chunks(WORDS_PER_TASK)).for_each(|(x, words)| {
            for (x, &word) in x.chunks_mut(64).zip(words) {
                for (j, v) in x.iter_mut().enumerate() {
                    *v *= if (word >> j) & 1 == 1 { scale } else { 0.0 };
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_the_requested_fraction_reproducibly_and_scales_the_rest() {
        let n = 200_003;
        let (mut r1, mut r2) = (Rng::new(5), Rng::new(5));
        let (a, b) = (DropoutMask::sample(&mut r1, n, 0.1), DropoutMask::sample(&mut r2, n, 0.1));
        assert!((0..n).all(|i| a.kept(i) == b.kept(i)), "same generator state, same mask");
        assert_eq!(r1.next_u64(), r2.next_u64(), "the caller's generator advanced alike");
        let dropped = (0..n).filter(|&i| !a.kept(i)).count() as f64 / n as f64;
        assert!((dropped - 0.1).abs() < 0.005, "dropped fraction {dropped}");
        let c = DropoutMask::sample(&mut r1, n, 0.1);
        assert!((0..n).any(|i| a.kept(i) != c.kept(i)), "the next draw is a different mask");
        let x: Vec<f32> = (0..n).map(|i| 1.0 + i as f32).collect();
        let y = a.apply(&x);
        for i in 0..n {
            let want = if a.kept(i) { x[i] / 0.9 } else { 0.0 };
            assert!((y[i] - want).abs() <= 1e-6 * want.abs(), "element {i}: {} vs {want}", y[i]);
        }
        let none = DropoutMask::sample(&mut r1, 1000, 0.0);
        assert_eq!(none.apply(&x[..1000]), x[..1000].to_vec());
    }
}
