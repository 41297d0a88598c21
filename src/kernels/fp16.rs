//! Matrix products against bf16 weights (or Q8_0/Q4_1 ones dequantized to bf16) on AVX512-FP16,
//! for CPUs that have it but no AMX (AMX-less Sapphire Rapids VMs, for one): `vfmadd231ph` does 32
//! fp16 multiply-adds per instruction at the rate `vfmadd231ps` does 16 f32 ones. Measured on a
//! 2-core Xeon without AMX: 5.5 G fp16 FMA instructions/s per core against 5.2 G f32 ones, and
//! 1.2 G `vdpbf16ps` — so bf16 dot products would run at half the f32 rate there, fp16 at twice.
//!
//! Numbers: each activation row is scaled by a power of two to at most 2⁸ and each panel of 32
//! weight columns to at most 1, then rounded to fp16 (11 significant bits, more than bf16's 8); the
//! products are summed in fp16 over `KC` = 64 depth values (at most 64 · 2⁸ = 2¹⁴, below fp16's
//! 65504), and those partial sums are unscaled and added in f32. The result's error is of the
//! order of the bf16 rounding that the AMX path and PyTorch's bf16 autocast apply to activations.
//!
//! Shape: A (`[m × k]` f32) packed per block of `MR` rows as `[k][MR]` 32-bit words, each fp16
//! value twice (so a `vbroadcastss`, a pure load, fills a vector with it); B (the weight) packed per
//! call into panels of 32 columns, `[k][32]` fp16. The microkernel keeps a 12 × 64 block of C in 24
//! registers for `KC` depth steps.

use super::aligned::AlignedVec;
use super::amx::Weight;
use rayon::prelude::*;
use std::arch::asm;
use std::sync::OnceLock;

/// Rows of C per microkernel block.
const MR: usize = 12;
/// Columns per fp16 vector: one B panel.
const PANEL: usize = 32;
/// Columns per microkernel block: two panels.
const NR: usize = 2 * PANEL;
/// Depth of each fp16 sum before it goes to f32 (see the module comment for the bound).
const KC: usize = 64;
/// Row blocks per task: 192 rows, so that a step of 512 rows against 192 columns still makes
/// enough tasks for two threads.
const BLOCKS_PER_TASK: usize = 16;

/// True when this CPU has AVX512-FP16 (and the AVX-512 the packing uses).
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        is_x86_feature_detected!("avx512fp16") && is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw")
    })
}

/// The power of two that brings `max` to at most `top` (1 for a zero, infinite or NaN maximum:
/// those values pass through as they are).
fn scale_for(max: f32, top: f32) -> f32 {
    if !(max > 0.0 && max.is_finite()) {
        return 1.0;
    }
    2f32.powi(((top / max).log2().floor() as i32).clamp(-100, 100))
}

fn to_f16(x: f32) -> u16 {
    half::f16::from_f32(x).to_bits()
}

/// `c[m×n] = alpha · a[m×k] · op(W)` (`+ c` with `accumulate`), as `amx::matmul_bf16` (same
/// arguments and strides), on fp16 vectors. Call only when `available()`.
#[allow(clippy::too_many_arguments)]
pub fn matmul(c: &mut [f32], ldc: usize, a: &[f32], lda: usize, m: usize, k: usize, w: Weight, n: usize, alpha: f32, accumulate: bool) {
    assert!(available(), "fp16::matmul needs AVX512-FP16");
    let (mp, np, kp) = (m.next_multiple_of(MR), n.next_multiple_of(NR), k.next_multiple_of(KC));
    let (a16, a_inv) = pack_a(a, lda, m, k, mp, kp);
    // Rows written on demand are written whole first (as bf16, half an f32 copy).
    let filled: Vec<u16>;
    let (bits, kn) = match w {
        Weight::Nk(w) => (w, false),
        Weight::Kn(w) => (w, true),
        Weight::NkRows(fill) | Weight::KnRows(fill) => {
            let mut rows = vec![0u16; n * k];
            let row_len = if matches!(w, Weight::NkRows(_)) { k } else { n };
            rows.par_chunks_mut(64 * row_len).enumerate().for_each(|(i, out)| fill(64 * i, out));
            filled = rows;
            (&filled[..], matches!(w, Weight::KnRows(_)))
        }
    };
    let (b16, b_inv) = pack_b(bits, kn, n, k, np, kp);
    multiply(c, ldc, &a16, &a_inv, m, kp, &b16, &b_inv, n, alpha, accumulate);
}

/// A as `mp / MR` blocks of `[kp][MR]` words (each the row's scaled fp16 value twice; zero past
/// `m` and `k`), and each row's inverse scale.
fn pack_a(a: &[f32], lda: usize, m: usize, k: usize, mp: usize, kp: usize) -> (AlignedVec<u32>, Vec<f32>) {
    // 64-byte aligned, as the panels: a vector load across two cache lines costs two.
    let mut out = AlignedVec::zeroed(mp * kp);
    let mut inv = vec![1.0f32; mp];
    out.par_chunks_mut(kp * MR).zip(inv.par_chunks_mut(MR)).enumerate().for_each(|(blk, (dst, inv))| {
        for (i, inv) in inv.iter_mut().enumerate() {
            let r = blk * MR + i;
            if r >= m {
                break;
            }
            let row = &a[r * lda..][..k];
            // (The largest magnitude by its bits: an integer maximum, which vectorizes.)
            let s = scale_for(f32::from_bits(row.iter().map(|x| x.to_bits() & 0x7fff_ffff).max().unwrap_or(0)), 256.0);
            *inv = 1.0 / s;
            let whole = k - k % 16;
            for kk0 in (0..whole).step_by(16) {
                // SAFETY: values kk0 .. +16 exist in `row`, and words (kk0 + j)·MR + i for j < 16
                // in `dst` (kp ≥ k rows of MR); AVX-512 is part of `available()`.
                unsafe { spread_16(&row[kk0..kk0 + 16], s, &mut dst[kk0 * MR + i..]) };
            }
            for (kk, &x) in row.iter().enumerate().skip(whole) {
                let h = to_f16(x * s) as u32;
                dst[kk * MR + i] = h | (h << 16);
            }
        }
    });
    (out, inv)
}

/// `dst[j·MR] = h | h << 16` with h = fp16(s · x[j]), for 16 values: one row's stretch of a
/// `pack_a` block.
///
/// # Safety
/// AVX-512F; `x` holds 16 values and `dst` at least 15·MR + 1.
#[target_feature(enable = "avx512f")]
unsafe fn spread_16(x: &[f32], s: f32, dst: &mut [u32]) {
    use std::arch::x86_64::*;
    assert!(x.len() >= 16 && dst.len() > 15 * MR);
    let h =
        _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(_mm512_loadu_ps(x.as_ptr()), _mm512_set1_ps(s)));
    let words = _mm512_cvtepu16_epi32(h);
    let twice = _mm512_or_si512(words, _mm512_slli_epi32::<16>(words));
    let index = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32(MR as i32));
    _mm512_i32scatter_epi32::<4>(dst.as_mut_ptr() as *mut _, index, twice);
}

/// B as `np / PANEL` panels of `[kp][PANEL]` fp16 values (zero past `n` and `k`), each scaled so
/// its largest magnitude is at most 1, and each panel's inverse scale. `w` is `[n × k]` bf16
/// (`kn` false: the product takes `Wᵀ`) or `[k × n]` (`kn` true).
fn pack_b(w: &[u16], kn: bool, n: usize, k: usize, np: usize, kp: usize) -> (AlignedVec<u16>, Vec<f32>) {
    assert_eq!(w.len(), n * k, "fp16::matmul: weight has {} values, expected {n}×{k}", w.len());
    // 64-byte aligned: each depth step of a panel is then one cache line.
    let mut out = AlignedVec::zeroed(np * kp);
    let mut inv = vec![1.0f32; np / PANEL];
    out.par_chunks_mut(kp * PANEL).zip(inv.par_iter_mut()).enumerate().for_each(|(p, (panel, inv))| {
        let cols = PANEL.min(n.saturating_sub(p * PANEL));
        if cols == 0 {
            return;
        }
        let value = |kk: usize, c: usize| -> f32 {
            let i = if kn { kk * n + p * PANEL + c } else { (p * PANEL + c) * k + kk };
            super::bf16::to_f32(w[i])
        };
        // The largest magnitude by its bits, as in `pack_a`.
        let magnitude = |b: &u16| b & 0x7fff;
        let max_bits = if kn {
            (0..k).map(|kk| w[kk * n + p * PANEL..][..cols].iter().map(magnitude).max().unwrap_or(0)).max().unwrap_or(0)
        } else {
            w[p * PANEL * k..(p * PANEL + cols) * k].iter().map(magnitude).max().unwrap_or(0)
        };
        let s = scale_for(super::bf16::to_f32(max_bits), 1.0);
        *inv = 1.0 / s;
        if kn {
            for kk in 0..k {
                let (src, dst) = (&w[kk * n + p * PANEL..][..cols], &mut panel[kk * PANEL..][..cols]);
                if cols == PANEL {
                    // SAFETY: 32 values in `src` and `dst`; AVX-512 is part of `available()`.
                    unsafe { convert_16(&src[..16], s, &mut dst[..16]) };
                    unsafe { convert_16(&src[16..], s, &mut dst[16..]) };
                } else {
                    dst.iter_mut().zip(src).for_each(|(d, &b)| *d = to_f16(super::bf16::to_f32(b) * s));
                }
            }
        } else {
            // Column c of the panel is weight row p·32 + c: a transpose, 16 × 16 values at a time
            // where the panel is whole, value by value at its edges.
            let whole = if cols == PANEL { k - k % 16 } else { 0 };
            for c0 in (0..PANEL).step_by(16) {
                for kk0 in (0..whole).step_by(16) {
                    // SAFETY: rows p·32 + c0 .. +16 of `w` hold values kk0 .. kk0 + 16, and panel
                    // rows kk0 .. +16 columns c0 .. +16 lie in `panel`; AVX-512 is part of `available()`.
                    unsafe { transpose_block(&w[(p * PANEL + c0) * k + kk0..], k, s, &mut panel[kk0 * PANEL + c0..]) };
                }
            }
            for c in 0..cols {
                for kk in whole..k {
                    panel[kk * PANEL + c] = to_f16(value(kk, c) * s);
                }
            }
        }
    });
    (out, inv)
}

/// `dst[j] = fp16(s · src[j])` for 16 bf16 values.
///
/// # Safety
/// AVX-512F and BW; 16 values in `src` and `dst`.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn convert_16(src: &[u16], s: f32, dst: &mut [u16]) {
    use std::arch::x86_64::*;
    assert!(src.len() >= 16 && dst.len() >= 16);
    let bits = _mm256_loadu_si256(src.as_ptr() as *const __m256i);
    let x = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(bits)));
    let h = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(x, _mm512_set1_ps(s)));
    _mm256_storeu_si256(dst.as_mut_ptr() as *mut __m256i, h);
}

/// `dst[i·32 + c] = fp16(s · src[c·stride + i])` for i, c < 16: 16 rows of 16 bf16 values
/// transposed, scaled and rounded to fp16, into a panel (rows of 32 values).
///
/// # Safety
/// AVX-512F and BW; 16 rows of 16 values `stride` apart in `src`; 16 rows of 16 values 32 apart in `dst`.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn transpose_block(src: &[u16], stride: usize, s: f32, dst: &mut [u16]) {
    use std::arch::x86_64::*;
    assert!(src.len() >= 15 * stride + 16 && dst.len() >= 15 * PANEL + 16);
    let mut rows = [0.0f32; 256];
    for (c, row) in rows.chunks_exact_mut(16).enumerate() {
        let bits = _mm256_loadu_si256(src.as_ptr().add(c * stride) as *const __m256i);
        _mm512_storeu_ps(row.as_mut_ptr(), _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(bits))));
    }
    let mut cols = [0.0f32; 256];
    super::amx::transpose_16x16_32bit(rows.as_ptr() as *const u8, 64, cols.as_mut_ptr() as *mut u8, 64);
    let scale = _mm512_set1_ps(s);
    for (i, col) in cols.chunks_exact(16).enumerate() {
        let h = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(_mm512_loadu_ps(col.as_ptr()), scale));
        _mm256_storeu_si256(dst.as_mut_ptr().add(i * PANEL) as *mut __m256i, h);
    }
}

/// A pointer into `c` that crosses to rayon workers: each task writes its own block of C.
#[derive(Clone, Copy)]
struct Shared(*mut f32);
impl Shared {
    fn at(&self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}
// SAFETY: tasks write disjoint blocks of C (see `multiply`).
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

/// `c = alpha · A · B` (or `c += …`) over the packed operands: one task per 64 columns and
/// `BLOCKS_PER_TASK` row blocks; per row block the fp16 sums of each `KC` depth chunk are unscaled
/// into an f32 block, which then goes to `c`.
#[allow(clippy::too_many_arguments)]
fn multiply(
    c: &mut [f32],
    ldc: usize,
    a16: &[u32],
    a_inv: &[f32],
    m: usize,
    kp: usize,
    b16: &[u16],
    b_inv: &[f32],
    n: usize,
    alpha: f32,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(c.len() >= (m - 1) * ldc + n, "fp16::matmul: c has {} elements, {m} rows of {n} {ldc} apart need more", c.len());
    let (m_blocks, n_blocks) = (m.div_ceil(MR), n.div_ceil(NR));
    let row_tasks = m_blocks.div_ceil(BLOCKS_PER_TASK);
    let shared = Shared(c.as_mut_ptr());
    (0..n_blocks * row_tasks).into_par_iter().for_each(|task| {
        let (nb, rt) = (task % n_blocks, task / n_blocks);
        let (p0, p1) = (2 * nb, 2 * nb + 1);
        let cols = NR.min(n - nb * NR);
        let mut sums = [0u16; 2 * MR * PANEL];
        for mb in rt * BLOCKS_PER_TASK..((rt + 1) * BLOCKS_PER_TASK).min(m_blocks) {
            let mut block = [0.0f32; MR * NR];
            for d0 in (0..kp).step_by(KC) {
                // SAFETY: block mb holds kp·MR words from d0·MR on, panels p0 and p1 hold kp·32
                // values from d0·32 on (the packing sized them so), `sums` has 24 vectors.
                unsafe {
                    microkernel(
                        a16[mb * kp * MR + d0 * MR..][..KC * MR].as_ptr(),
                        b16[p0 * kp * PANEL + d0 * PANEL..][..KC * PANEL].as_ptr(),
                        b16[p1 * kp * PANEL + d0 * PANEL..][..KC * PANEL].as_ptr(),
                        KC,
                        sums.as_mut_ptr(),
                    );
                    add_sums(&mut block, &sums, &a_inv[mb * MR..][..MR], [b_inv[p0], b_inv[p1]]);
                }
            }
            for (i, src) in block.chunks_exact(NR).enumerate().take(MR.min(m - mb * MR)) {
                let r = mb * MR + i;
                // SAFETY: row r < m and columns nb·64 .. +cols ≤ n lie in `c` (checked above);
                // only this task writes them.
                let dst = unsafe { std::slice::from_raw_parts_mut(shared.at(r * ldc + nb * NR), cols) };
                if accumulate {
                    dst.iter_mut().zip(src).for_each(|(d, s)| *d += alpha * s);
                } else {
                    dst.iter_mut().zip(src).for_each(|(d, s)| *d = alpha * s);
                }
            }
        }
    });
}

/// `block[i][h·32 + l] += sums[2i + h][l] · a_inv[i] · b_inv[h]`: the fp16 sums of one depth
/// chunk, unscaled, into the f32 block.
///
/// # Safety
/// AVX-512F.
#[target_feature(enable = "avx512f")]
unsafe fn add_sums(block: &mut [f32; MR * NR], sums: &[u16; 2 * MR * PANEL], a_inv: &[f32], b_inv: [f32; 2]) {
    use std::arch::x86_64::*;
    for (i, &row_inv) in a_inv.iter().enumerate().take(MR) {
        for (h, &panel_inv) in b_inv.iter().enumerate() {
            let scale = _mm512_set1_ps(row_inv * panel_inv);
            for q in 0..2 {
                let src = sums.as_ptr().add((2 * i + h) * PANEL + 16 * q);
                let dst = block.as_mut_ptr().add(i * NR + h * PANEL + 16 * q);
                let v = _mm512_cvtph_ps(_mm256_loadu_si256(src as *const __m256i));
                _mm512_storeu_ps(dst, _mm512_fmadd_ps(v, scale, _mm512_loadu_ps(dst)));
            }
        }
    }
}

/// 24 fp16 sums (12 rows × two panels of 32 columns) over `steps` depth values, written to `out`
/// as vector 2i + h = row i, panel h.
///
/// # Safety
/// AVX512-FP16; `a` holds `steps · MR` words, `b0` and `b1` `steps · 32` values each, `out` 24 · 32.
#[inline(always)]
unsafe fn microkernel(a: *const u32, b0: *const u16, b1: *const u16, steps: usize, out: *mut u16) {
    asm!(
        "vpxord zmm0, zmm0, zmm0", "vpxord zmm1, zmm1, zmm1", "vpxord zmm2, zmm2, zmm2", "vpxord zmm3, zmm3, zmm3", "vpxord zmm4, zmm4, zmm4", "vpxord zmm5, zmm5, zmm5", "vpxord zmm6, zmm6, zmm6", "vpxord zmm7, zmm7, zmm7", "vpxord zmm8, zmm8, zmm8", "vpxord zmm9, zmm9, zmm9", "vpxord zmm10, zmm10, zmm10", "vpxord zmm11, zmm11, zmm11", "vpxord zmm12, zmm12, zmm12", "vpxord zmm13, zmm13, zmm13", "vpxord zmm14, zmm14, zmm14", "vpxord zmm15, zmm15, zmm15", "vpxord zmm16, zmm16, zmm16", "vpxord zmm17, zmm17, zmm17", "vpxord zmm18, zmm18, zmm18", "vpxord zmm19, zmm19, zmm19", "vpxord zmm20, zmm20, zmm20", "vpxord zmm21, zmm21, zmm21", "vpxord zmm22, zmm22, zmm22", "vpxord zmm23, zmm23, zmm23",
        "2:",
        "prefetcht0 [{b0} + 512]",
        "prefetcht0 [{b1} + 512]",
        "prefetcht0 [{a} + 384]",
        "vmovups zmm24, [{b0}]",
        "vmovups zmm25, [{b1}]",
        "vbroadcastss zmm26, dword ptr [{a} + 0]",
        "vfmadd231ph zmm0, zmm24, zmm26",
        "vfmadd231ph zmm1, zmm25, zmm26",
        "vbroadcastss zmm27, dword ptr [{a} + 4]",
        "vfmadd231ph zmm2, zmm24, zmm27",
        "vfmadd231ph zmm3, zmm25, zmm27",
        "vbroadcastss zmm28, dword ptr [{a} + 8]",
        "vfmadd231ph zmm4, zmm24, zmm28",
        "vfmadd231ph zmm5, zmm25, zmm28",
        "vbroadcastss zmm29, dword ptr [{a} + 12]",
        "vfmadd231ph zmm6, zmm24, zmm29",
        "vfmadd231ph zmm7, zmm25, zmm29",
        "vbroadcastss zmm26, dword ptr [{a} + 16]",
        "vfmadd231ph zmm8, zmm24, zmm26",
        "vfmadd231ph zmm9, zmm25, zmm26",
        "vbroadcastss zmm27, dword ptr [{a} + 20]",
        "vfmadd231ph zmm10, zmm24, zmm27",
        "vfmadd231ph zmm11, zmm25, zmm27",
        "vbroadcastss zmm28, dword ptr [{a} + 24]",
        "vfmadd231ph zmm12, zmm24, zmm28",
        "vfmadd231ph zmm13, zmm25, zmm28",
        "vbroadcastss zmm29, dword ptr [{a} + 28]",
        "vfmadd231ph zmm14, zmm24, zmm29",
        "vfmadd231ph zmm15, zmm25, zmm29",
        "vbroadcastss zmm26, dword ptr [{a} + 32]",
        "vfmadd231ph zmm16, zmm24, zmm26",
        "vfmadd231ph zmm17, zmm25, zmm26",
        "vbroadcastss zmm27, dword ptr [{a} + 36]",
        "vfmadd231ph zmm18, zmm24, zmm27",
        "vfmadd231ph zmm19, zmm25, zmm27",
        "vbroadcastss zmm28, dword ptr [{a} + 40]",
        "vfmadd231ph zmm20, zmm24, zmm28",
        "vfmadd231ph zmm21, zmm25, zmm28",
        "vbroadcastss zmm29, dword ptr [{a} + 44]",
        "vfmadd231ph zmm22, zmm24, zmm29",
        "vfmadd231ph zmm23, zmm25, zmm29",
        "add {a}, 48", "add {b0}, 64", "add {b1}, 64",
        "dec {steps}", "jnz 2b",
        "vmovups [{dst} + 0], zmm0", "vmovups [{dst} + 64], zmm1", "vmovups [{dst} + 128], zmm2", "vmovups [{dst} + 192], zmm3", "vmovups [{dst} + 256], zmm4", "vmovups [{dst} + 320], zmm5", "vmovups [{dst} + 384], zmm6", "vmovups [{dst} + 448], zmm7", "vmovups [{dst} + 512], zmm8", "vmovups [{dst} + 576], zmm9", "vmovups [{dst} + 640], zmm10", "vmovups [{dst} + 704], zmm11", "vmovups [{dst} + 768], zmm12", "vmovups [{dst} + 832], zmm13", "vmovups [{dst} + 896], zmm14", "vmovups [{dst} + 960], zmm15", "vmovups [{dst} + 1024], zmm16", "vmovups [{dst} + 1088], zmm17", "vmovups [{dst} + 1152], zmm18", "vmovups [{dst} + 1216], zmm19", "vmovups [{dst} + 1280], zmm20", "vmovups [{dst} + 1344], zmm21", "vmovups [{dst} + 1408], zmm22", "vmovups [{dst} + 1472], zmm23",
        a = inout(reg) a => _, b0 = inout(reg) b0 => _, b1 = inout(reg) b1 => _, steps = inout(reg) steps => _,
        dst = in(reg) out,
        out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _, out("zmm4") _, out("zmm5") _, out("zmm6") _, out("zmm7") _, out("zmm8") _, out("zmm9") _, out("zmm10") _, out("zmm11") _, out("zmm12") _, out("zmm13") _, out("zmm14") _, out("zmm15") _, out("zmm16") _, out("zmm17") _, out("zmm18") _, out("zmm19") _, out("zmm20") _, out("zmm21") _, out("zmm22") _, out("zmm23") _, out("zmm24") _, out("zmm25") _, out("zmm26") _, out("zmm27") _, out("zmm28") _, out("zmm29") _,
        options(nostack)
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::randn;
    use crate::rng::Rng;

    /// Against the f64 product of the bf16 weight values, every weight form and both
    /// orientations, on shapes with partial row blocks, panels and depth chunks, and rows whose
    /// values are far from 1 (1e4 would overflow fp16 sums unscaled; 1e-6 would lose its digits):
    /// each result within 1% of the sum of its products' magnitudes.
    #[test]
    fn products_match_f64_in_every_form() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512-FP16");
            return;
        }
        let mut rng = Rng::new(5);
        for &(m, k, n) in &[(1, 1, 1), (13, 70, 65), (40, 130, 100), (25, 64, 64), (12, 200, 33)] {
            let mut a = randn(&mut rng, m * k, 1.0);
            a[..k].iter_mut().for_each(|x| *x *= 1e4);
            if m > 1 {
                a[k..2 * k].iter_mut().for_each(|x| *x *= 1e-6);
            }
            let bits: Vec<u16> = randn(&mut rng, n * k, 0.5).iter().map(|&x| crate::kernels::bf16::to_bf16(x)).collect();
            let w: Vec<f32> = bits.iter().map(|&b| crate::kernels::bf16::to_f32(b)).collect();
            // The same weight transposed, `[k × n]`.
            let bits_t: Vec<u16> = (0..k * n).map(|i| bits[(i % n) * k + i / n]).collect();
            let fill_nk = |first: usize, out: &mut [u16]| out.copy_from_slice(&bits[first * k..first * k + out.len()]);
            let fill_kn = |first: usize, out: &mut [u16]| out.copy_from_slice(&bits_t[first * n..first * n + out.len()]);
            let forms: [(&str, Weight); 4] = [
                ("Nk", Weight::Nk(&bits)),
                ("Kn", Weight::Kn(&bits_t)),
                ("NkRows", Weight::NkRows(&fill_nk)),
                ("KnRows", Weight::KnRows(&fill_kn)),
            ];
            for (name, form) in forms {
                for accumulate in [false, true] {
                    let c0 = randn(&mut rng, m * n, 1.0);
                    let mut c = c0.clone();
                    matmul(&mut c, n, &a, k, m, k, form, n, 0.5, accumulate);
                    for i in 0..m {
                        for j in 0..n {
                            let terms = (0..k).map(|p| a[i * k + p] as f64 * w[j * k + p] as f64);
                            let (want, size) = terms.fold((0.0, 0.0), |(s, t), x| (s + x, t + x.abs()));
                            let want = 0.5 * want + if accumulate { c0[i * n + j] as f64 } else { 0.0 };
                            let got = c[i * n + j] as f64;
                            assert!(
                                (got - want).abs() <= 1e-2 * 0.5 * size + 1e-6,
                                "{name} ({m},{k},{n}) acc={accumulate} [{i}][{j}]: {got} vs {want} (size {size})"
                            );
                        }
                    }
                }
            }
        }
    }
}
