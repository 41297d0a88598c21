//! The dot product of an f32 row with an f32 or bf16 row: decoding computes many short ones (a
//! query against each cached key, an activation row against each low-rank factor row), where the
//! order of the additions decides the speed.

use super::bf16::AsF32;

/// `a · b` over the shorter of the two.
///
/// Written as plain lanes, the compiler must keep the final additions in source order (floating
/// point does not reassociate), so a 64-value dot ends in a chain of scalar additions and is bound
/// by their latency. On AVX-512 this sums 64 values per step in four independent vectors and
/// reduces them as a tree: 1350 dots of 64 values (one decode step's keys for SmolLM2's nine heads
/// at 150 positions) took 9.6 µs instead of 28.8.
#[inline]
pub fn dot<B: Operand>(a: &[f32], b: &[B]) -> f32 {
    let n = a.len().min(b.len());
    #[cfg(all(target_arch = "x86_64", target_feature = "avx512f", target_feature = "avx512bw"))]
    {
        // SAFETY: the build enables AVX-512F and BW, and both slices hold `n` values.
        unsafe { dot_avx512(&a[..n], &b[..n]) }
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx512f", target_feature = "avx512bw")))]
    {
        // Eight lanes, then a tree over them.
        let mut acc = [0.0f32; 8];
        let (ca, cb) = (a[..n].chunks_exact(8), b[..n].chunks_exact(8));
        let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y.as_f32()).sum();
        for (x, y) in ca.zip(cb) {
            for k in 0..8 {
                acc[k] += x[k] * y[k].as_f32();
            }
        }
        let h: [f32; 4] = std::array::from_fn(|k| acc[k] + acc[k + 4]);
        (h[0] + h[2]) + (h[1] + h[3]) + tail
    }
}

/// The second operand's element: f32, or bf16 bit patterns (a KV cache kept in bf16).
pub trait Operand: AsF32 {
    /// Sixteen values from `p` as f32 lanes (the first `mask`'s lanes; the others zero).
    ///
    /// # Safety
    /// AVX-512F and BW; `p` points at the lanes `mask` selects.
    #[cfg(all(target_arch = "x86_64", target_feature = "avx512f", target_feature = "avx512bw"))]
    unsafe fn load16(p: *const Self, mask: u16) -> std::arch::x86_64::__m512;
}

impl Operand for f32 {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx512f", target_feature = "avx512bw"))]
    #[inline(always)]
    unsafe fn load16(p: *const f32, mask: u16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        if mask == u16::MAX {
            _mm512_loadu_ps(p)
        } else {
            _mm512_maskz_loadu_ps(mask, p)
        }
    }
}

impl Operand for u16 {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx512f", target_feature = "avx512bw"))]
    #[inline(always)]
    unsafe fn load16(p: *const u16, mask: u16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // bf16 → f32 is the bit pattern moved to the upper half.
        let bits = if mask == u16::MAX { _mm256_loadu_si256(p.cast()) } else { _mm256_maskz_loadu_epi16(mask, p.cast()) };
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(bits)))
    }
}

/// # Safety
/// AVX-512F and BW; `a` and `b` have the same length.
#[cfg(all(target_arch = "x86_64", target_feature = "avx512f", target_feature = "avx512bw"))]
#[inline]
unsafe fn dot_avx512<B: Operand>(a: &[f32], b: &[B]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len();
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    while i + 64 <= n {
        for (v, acc) in acc.iter_mut().enumerate() {
            *acc = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i + 16 * v)), B::load16(pb.add(i + 16 * v), u16::MAX), *acc);
        }
        i += 64;
    }
    while i + 16 <= n {
        acc[0] = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), B::load16(pb.add(i), u16::MAX), acc[0]);
        i += 16;
    }
    if i < n {
        // The last 1..15 values through a masked load (the lanes past the end read nothing).
        let mask: __mmask16 = (1u32 << (n - i)) as u16 - 1;
        acc[1] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, pa.add(i)), B::load16(pb.add(i), mask), acc[1]);
    }
    _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])))
}

#[cfg(test)]
mod tests {
    use super::dot;
    use crate::kernels::bf16::{to_bf16, to_f32};

    /// Every length from 0 to 200 (whole steps of 64 and 16, and each masked tail) against f64,
    /// with the second operand in f32 and in bf16.
    #[test]
    fn matches_a_plain_sum_at_every_length() {
        let a: Vec<f32> = (0..200).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
        let b: Vec<f32> = (0..200).map(|i| ((i * 53 % 97) as f32 - 48.0) / 13.0).collect();
        let b16: Vec<u16> = b.iter().map(|&x| to_bf16(x)).collect();
        for n in 0..=200 {
            let want: f64 = a[..n].iter().zip(&b[..n]).map(|(&x, &y)| x as f64 * y as f64).sum();
            let got = dot(&a[..n], &b[..n]) as f64;
            assert!((got - want).abs() <= 1e-5 * (1.0 + want.abs()), "n = {n}: {got} vs {want}");
            let want16: f64 = a[..n].iter().zip(&b16[..n]).map(|(&x, &y)| x as f64 * to_f32(y) as f64).sum();
            let got16 = dot(&a[..n], &b16[..n]) as f64;
            assert!((got16 - want16).abs() <= 1e-5 * (1.0 + want16.abs()), "bf16, n = {n}: {got16} vs {want16}");
        }
        // The shorter slice decides the length.
        assert_eq!(dot(&a[..3], &b[..10]), dot(&a[..3], &b[..3]));
    }
}
