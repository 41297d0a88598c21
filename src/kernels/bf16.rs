//! bf16 values as bit patterns (`u16`): the rounding every bf16 path shares, and whole-slice
//! conversions for activations kept in bf16 between the forward and the backward pass.

use rayon::prelude::*;

/// Slices shorter than this convert on the calling thread.
const PARALLEL_LEN: usize = 1 << 16;

/// f32 → bf16, rounding to nearest even (finite values; what `half::bf16::from_f32` gives them).
#[inline(always)]
pub fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

/// bf16 → f32 (exact).
#[inline(always)]
pub fn to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// A value an elementwise kernel reads as f32: an f32, or a bf16 bit pattern (an activation kept
/// in bf16, see `model::buffers::Saved`), so the kernel reads the kept values without first
/// expanding them into a buffer.
pub trait AsF32: Copy + Send + Sync + 'static {
    fn as_f32(self) -> f32;
    /// The value as a bf16 bit pattern (an f32 rounded to it).
    fn as_bf16(self) -> u16;
    /// A slice of values as f32: borrowed, or expanded.
    fn f32s(values: &[Self]) -> std::borrow::Cow<'_, [f32]>;
}

impl AsF32 for f32 {
    #[inline(always)]
    fn as_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn as_bf16(self) -> u16 {
        to_bf16(self)
    }
    fn f32s(values: &[f32]) -> std::borrow::Cow<'_, [f32]> {
        std::borrow::Cow::Borrowed(values)
    }
}

impl AsF32 for u16 {
    #[inline(always)]
    fn as_f32(self) -> f32 {
        to_f32(self)
    }
    #[inline(always)]
    fn as_bf16(self) -> u16 {
        self
    }
    fn f32s(values: &[u16]) -> std::borrow::Cow<'_, [f32]> {
        let mut out = vec![0.0; values.len()];
        expand_into(values, &mut out);
        std::borrow::Cow::Owned(out)
    }
}

/// `dst[i] = to_bf16(src[i])`, on the rayon pool for long slices.
pub fn round_into(src: &[f32], dst: &mut [u16]) {
    map_into(src, dst, to_bf16);
}

/// `dst[i] = to_f32(src[i])`, on the rayon pool for long slices.
pub fn expand_into(src: &[u16], dst: &mut [f32]) {
    map_into(src, dst, to_f32);
}

/// `dst[i] = f(src[i])`, on the rayon pool for slices of `PARALLEL_LEN` values and more.
fn map_into<S: Copy + Sync, D: Send>(src: &[S], dst: &mut [D], f: impl Fn(S) -> D + Sync) {
    assert_eq!(src.len(), dst.len());
    let run = |(d, s): (&mut [D], &[S])| d.iter_mut().zip(s).for_each(|(d, &s)| *d = f(s));
    if src.len() < PARALLEL_LEN {
        run((dst, src));
    } else {
        dst.par_chunks_mut(PARALLEL_LEN / 4).zip(src.par_chunks(PARALLEL_LEN / 4)).for_each(run);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_matches_half() {
        // 0x3F80_8000 and 0x3F81_8000 are halfway between two bf16 values (ties to even).
        let ties = [f32::from_bits(0x3F80_8000), f32::from_bits(0x3F81_8000)];
        for x in [0.0f32, -0.0, 1.0, ties[0], ties[1], -2.7, 1e-30, 6.5e4, 3.4e38] {
            assert_eq!(to_bf16(x), half::bf16::from_f32(x).to_bits(), "{x}");
            assert_eq!(to_f32(to_bf16(x)), half::bf16::from_f32(x).to_f32(), "{x}");
        }
    }

    #[test]
    fn slices_round_and_expand_on_either_side_of_the_parallel_length() {
        for n in [0, 7, PARALLEL_LEN - 1, PARALLEL_LEN + 3 * 16 + 5] {
            let src: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 1e3).collect();
            let mut bits = vec![0u16; n];
            round_into(&src, &mut bits);
            assert!(bits.iter().zip(&src).all(|(&b, &x)| b == half::bf16::from_f32(x).to_bits()), "n={n}");
            let mut back = vec![0.0f32; n];
            expand_into(&bits, &mut back);
            assert!(back.iter().zip(&src).all(|(&y, &x)| y == half::bf16::from_f32(x).to_f32()), "n={n}");
        }
    }
}
