//! The compact weight formats as every kernel reads them: a matrix (or one row of it) in f32,
//! bf16, or one of GGML's two 32-value block formats (Q8_0, Q4_1), row-major, whole blocks per row.

/// Values per quantization block.
pub const BLOCK: usize = 32;

/// A weight matrix, or one row of it, in one of the compact formats (row-major, whole blocks per row).
#[derive(Clone, Copy)]
pub enum Row<'a> {
    F32(&'a [f32]),
    /// bf16 bit patterns (the upper half of an f32).
    Bf16(&'a [u16]),
    /// Per block: f32 scale and 32 signed values.
    Q8_0 {
        scale: &'a [f32],
        q: &'a [i8],
    },
    /// Per block: value = scale·q + min, q in 0..16, two per byte: the low nibble of byte j is
    /// position j of the block, the high nibble position j+16.
    Q4_1 {
        scale: &'a [f32],
        min: &'a [f32],
        q: &'a [u8],
    },
}

impl<'a> Row<'a> {
    /// Row `j` of a matrix with `cols` columns.
    #[inline(always)]
    pub fn row(self, j: usize, cols: usize) -> Row<'a> {
        let nb = cols / BLOCK;
        match self {
            Row::F32(w) => Row::F32(&w[j * cols..(j + 1) * cols]),
            Row::Bf16(w) => Row::Bf16(&w[j * cols..(j + 1) * cols]),
            Row::Q8_0 { scale, q } => Row::Q8_0 { scale: &scale[j * nb..(j + 1) * nb], q: &q[j * cols..(j + 1) * cols] },
            Row::Q4_1 { scale, min, q } => {
                Row::Q4_1 { scale: &scale[j * nb..(j + 1) * nb], min: &min[j * nb..(j + 1) * nb], q: &q[j * cols / 2..(j + 1) * cols / 2] }
            }
        }
    }
}

/// A block of 32 activations as 8-bit values and a scale: `x ≈ scale · q`, `|q| ≤ 127`, rounded
/// to nearest even. The decode products (`vnni`, `amx`) round their activations this way for Q8_0
/// and Q4_1 weights, so every batch size computes the same thing.
pub fn quantize_block(x: &[f32]) -> (f32, [i8; BLOCK]) {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let scale = amax / 127.0;
    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    let mut q = [0i8; BLOCK];
    for (q, &v) in q.iter_mut().zip(x) {
        *q = (v * inv).round_ties_even().clamp(-127.0, 127.0) as i8;
    }
    (scale, q)
}

/// `quantize_block` in AVX-512, with the same results: the scale and the values as two vectors of
/// 16 (positions 0..16, 16..32) of 32-bit integers.
///
/// # Safety
/// The CPU must have AVX-512F; `x` holds 32 values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub unsafe fn quantize_block_avx512(x: &[f32]) -> (f32, [std::arch::x86_64::__m512i; 2]) {
    use std::arch::x86_64::*;
    assert!(x.len() == BLOCK);
    let (v0, v1) = (_mm512_loadu_ps(x.as_ptr()), _mm512_loadu_ps(x.as_ptr().add(16)));
    let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    let scale = amax / 127.0;
    let inv = _mm512_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
    // The default rounding mode: to nearest even.
    (scale, [_mm512_cvtps_epi32(_mm512_mul_ps(v0, inv)), _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv))])
}
