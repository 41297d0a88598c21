//! The bf16 products of `amx::matmul_bf16` on AVX512-BF16 vectors, for CPUs with neither AMX nor
//! AVX512-FP16 — AMD Zen 4 and Zen 5, Intel Cooper Lake. `vdpbf16ps` does 16 lanes of a two-term
//! bf16 dot product added to f32, 32 multiply-adds per instruction; on a 2-core AMD EPYC VM it
//! issues at the rate of `vfmadd231ps` (1.5–1.6 G instructions/s per core, measured side by
//! side), twice the multiply-adds of the f32 GEMM. (On the AMX-less Xeon VM measured for
//! `kernels::fp16` it ran at a quarter of that rate, so there fp16 vectors are chosen first.)
//!
//! Numbers as on the tiles: the activations rounded to bf16, the weights bf16 as stored (or
//! Q8_0/Q4_1 dequantized to bf16), products summed in f32.
//!
//! The operands are `amx`'s packed ones, unchanged: A in groups of 16 rows, B in panels of 16
//! columns whose row j holds the bf16 pairs at depths 2j and 2j + 1 of each column — exactly one
//! `vdpbf16ps` operand. `block` replaces the tile microkernel on a 32 × 32 block of C: eight rows
//! at a time against both panels, 16 accumulators, each A pair broadcast to all lanes.

use std::arch::x86_64::*;
use std::sync::OnceLock;

/// Rows of C per pass over the depth: 8 rows × 2 panels = 16 accumulator registers.
const ROWS: usize = 8;

/// True when this CPU has AVX512-BF16 (and the AVX-512 the packing uses).
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        is_x86_feature_detected!("avx512bf16") && is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw")
    })
}

/// As `amx`'s tile microkernel, on vectors: C (32×32 f32, rows `c_stride` bytes apart) `=` or,
/// with `accumulate`, `+=` two groups of 16 A rows (row r of group g at `a[g] + r·a_row`, advancing
/// `a_step` bytes per step) times two B panels (1 KiB per step), over `depth_steps` steps of 32
/// depth values.
///
/// # Safety
/// AVX512-BF16 (`available()`); the A rows, the panels' `depth_steps` KiB and C's 32 rows of 128
/// bytes readable (C also writable) at the addresses above.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bf16")]
pub(super) unsafe fn block(
    a: [*const u16; 2],
    a_row: usize,
    a_step: usize,
    b: [*const u16; 2],
    depth_steps: usize,
    c: *mut f32,
    c_stride: usize,
    accumulate: bool,
) {
    let pairs = |v: __m512i| -> __m512bh { std::mem::transmute(v) };
    for (g, &group) in a.iter().enumerate() {
        for first in (0..16).step_by(ROWS) {
            let a_rows: [*const u8; ROWS] = std::array::from_fn(|r| group.byte_add((first + r) * a_row) as *const u8);
            let c_rows: [*mut f32; ROWS] = std::array::from_fn(|r| c.byte_add((16 * g + first + r) * c_stride));
            let mut acc = [[_mm512_setzero_ps(); 2]; ROWS];
            if accumulate {
                for (sums, &row) in acc.iter_mut().zip(&c_rows) {
                    *sums = [_mm512_loadu_ps(row), _mm512_loadu_ps(row.add(16))];
                }
            }
            for t in 0..depth_steps {
                let (b0, b1) = (b[0].byte_add(1024 * t) as *const u8, b[1].byte_add(1024 * t) as *const u8);
                for j in 0..16 {
                    let w0 = pairs(_mm512_loadu_si512(b0.add(64 * j) as *const _));
                    let w1 = pairs(_mm512_loadu_si512(b1.add(64 * j) as *const _));
                    for (sums, &row) in acc.iter_mut().zip(&a_rows) {
                        let x = pairs(_mm512_set1_epi32((row.add(t * a_step + 4 * j) as *const i32).read_unaligned()));
                        sums[0] = _mm512_dpbf16_ps(sums[0], x, w0);
                        sums[1] = _mm512_dpbf16_ps(sums[1], x, w1);
                    }
                }
            }
            for (sums, &row) in acc.iter().zip(&c_rows) {
                _mm512_storeu_ps(row, sums[0]);
                _mm512_storeu_ps(row.add(16), sums[1]);
            }
        }
    }
}
