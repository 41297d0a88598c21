//! Frozen weight matrices, kept compact: f32, bf16, or 32-value blocks (Q8_0, Q4_1) as GGML
//! quantizes them. Decoding multiplies the compact form directly (`gemv`); batched work (prefill,
//! training) expands one matrix at a time into reused f32 scratch (`with_f32`), so a model in
//! Q8_0 never holds more than one f32 matrix besides its activations. On a CPU with AMX the
//! products run in bf16 on the tile unit (`kernels::amx`), without it on AVX512-FP16 or
//! AVX512-BF16 vectors where the CPU has them (`amx::product_unit`): bf16 matrices as stored,
//! Q8_0/Q4_1 ones dequantized to bf16 a few rows at a time as the product packs them.

use crate::kernels::aligned::AlignedVec;
use crate::kernels::amx;
use crate::kernels::blocks::{Row, BLOCK};
use crate::kernels::gemv;
use crate::kernels::matmul::DenseWeight;
use anyhow::{bail, Result};
use rayon::prelude::*;
use std::cell::Cell;

/// How frozen weights are stored in memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WeightFormat {
    /// Exact: what the parity tests use.
    #[default]
    F32,
    /// Rounded to bfloat16 (nearest even): half the memory, ~3 significant digits.
    Bf16,
    /// GGML Q8_0: per 32 values one scale (max |x| / 127) and signed bytes: ~1.1 bytes a value.
    Q8_0,
    /// GGML Q4_1: per 32 values scale and minimum, 4-bit values: ~0.75 bytes a value.
    Q4_1,
}

impl WeightFormat {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" => WeightFormat::F32,
            "bf16" => WeightFormat::Bf16,
            "q8_0" => WeightFormat::Q8_0,
            "q4_1" => WeightFormat::Q4_1,
            _ => bail!("unknown weight format \"{s}\" (use f32, bf16, q8_0 or q4_1)"),
        })
    }

    /// Bytes `n` values take in this format (scales included).
    pub fn bytes_for(self, n: u128) -> u128 {
        match self {
            WeightFormat::F32 => 4 * n,
            WeightFormat::Bf16 => 2 * n,
            WeightFormat::Q8_0 => n.div_ceil(32) * 36,
            WeightFormat::Q4_1 => n.div_ceil(32) * 24,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::F32 => "f32",
            WeightFormat::Bf16 => "bf16",
            WeightFormat::Q8_0 => "q8_0",
            WeightFormat::Q4_1 => "q4_1",
        }
    }
}

enum Data {
    F32(Vec<f32>),
    // 64-byte aligned: the AMX decode products read the rows in place (see `kernels::aligned`).
    Bf16(AlignedVec<u16>),
    Q8_0 { scale: Vec<f32>, q: AlignedVec<i8> },
    Q4_1 { scale: Vec<f32>, min: Vec<f32>, q: Vec<u8> },
}

/// A frozen `[rows × cols]` row-major matrix (a PyTorch linear weight is `[out, in]`).
pub struct FrozenMatrix {
    pub rows: usize,
    pub cols: usize,
    data: Data,
}

thread_local! {
    /// f32 copy of the last matrix `with_f32` expanded on this thread; reused to avoid page faults.
    static SCRATCH: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// Runs `f` on `n` values that `fill` writes into this thread's scratch buffer `cell` (taken, not
/// borrowed: a nested call — rayon may run other work on this thread — just gets a buffer of its
/// own). Above `SCRATCH_MAX` values the buffer is temporary.
fn with_scratch<T: Copy + Default, R>(
    cell: &'static std::thread::LocalKey<Cell<Vec<T>>>,
    n: usize,
    fill: impl FnOnce(&mut [T]),
    f: impl FnOnce(&[T]) -> R,
) -> R {
    let mut buf = if n <= SCRATCH_MAX { cell.take() } else { Vec::new() };
    if buf.len() < n {
        buf.resize(n, T::default());
    }
    fill(&mut buf[..n]);
    let result = f(&buf[..n]);
    if n <= SCRATCH_MAX {
        cell.set(buf);
    }
    result
}

/// Matrices above this many values get a temporary buffer instead of the kept scratch. 64M
/// values hold the largest linear layer of an 8B Llama (14336 × 4096): with 8M, each of its
/// products got a fresh mapping and a page fault per 4 KiB (21M faults in one training step).
/// Training reads the LM head in vocabulary blocks, never whole; only `forward`'s full logits
/// expand a compact head whole (and, below this size, keep the copy for the next call).
const SCRATCH_MAX: usize = 64 << 20;

impl FrozenMatrix {
    /// Stores `w` (`[rows × cols]`) in `format`. Block formats need `cols` divisible by 32; other
    /// matrices stay in f32.
    pub fn new(rows: usize, cols: usize, w: Vec<f32>, format: WeightFormat) -> Self {
        assert_eq!(w.len(), rows * cols, "FrozenMatrix: {} values for {rows}×{cols}", w.len());
        let blocks_fit = cols.is_multiple_of(BLOCK);
        let data = match format {
            WeightFormat::F32 => Data::F32(w),
            WeightFormat::Bf16 => {
                let mut bits = AlignedVec::zeroed(w.len());
                bits.par_iter_mut().zip(&w).for_each(|(b, &x)| *b = half::bf16::from_f32(x).to_bits());
                Data::Bf16(bits)
            }
            WeightFormat::Q8_0 if blocks_fit => {
                let scale: Vec<f32> = w.par_chunks(BLOCK).map(|b| b.iter().fold(0.0f32, |m, x| m.max(x.abs())) / 127.0).collect();
                let mut q = AlignedVec::zeroed(w.len());
                q.par_chunks_mut(BLOCK).zip(w.par_chunks(BLOCK)).zip(&scale).for_each(|((out, b), &d)| {
                    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
                    out.iter_mut().zip(b).for_each(|(o, x)| *o = (x * inv).round() as i8);
                });
                Data::Q8_0 { scale, q }
            }
            WeightFormat::Q4_1 if blocks_fit => {
                let range: Vec<(f32, f32)> = w
                    .par_chunks(BLOCK)
                    .map(|b| {
                        let (lo, hi) = b.iter().fold((f32::MAX, f32::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
                        ((hi - lo) / 15.0, lo)
                    })
                    .collect();
                let q = w
                    .par_chunks(BLOCK)
                    .zip(&range)
                    .flat_map_iter(|(b, &(d, m))| {
                        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
                        let level = move |x: f32| (((x - m) * inv + 0.5) as u8).min(15);
                        (0..BLOCK / 2).map(move |j| level(b[j]) | (level(b[j + BLOCK / 2]) << 4))
                    })
                    .collect();
                let (scale, min) = range.into_iter().unzip();
                Data::Q4_1 { scale, min, q }
            }
            WeightFormat::Q8_0 | WeightFormat::Q4_1 => Data::F32(w),
        };
        FrozenMatrix { rows, cols, data }
    }

    pub fn format(&self) -> WeightFormat {
        match self.data {
            Data::F32(_) => WeightFormat::F32,
            Data::Bf16(_) => WeightFormat::Bf16,
            Data::Q8_0 { .. } => WeightFormat::Q8_0,
            Data::Q4_1 { .. } => WeightFormat::Q4_1,
        }
    }

    /// Number of values (`rows × cols`).
    pub fn len(&self) -> usize {
        self.rows * self.cols
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes the matrix occupies in memory.
    pub fn bytes(&self) -> usize {
        match &self.data {
            Data::F32(w) => 4 * w.len(),
            Data::Bf16(w) => 2 * w.len(),
            Data::Q8_0 { scale, q } => 4 * scale.len() + q.len(),
            Data::Q4_1 { scale, min, q } => 4 * (scale.len() + min.len()) + q.len(),
        }
    }

    /// The stored values as the kernels take them.
    pub fn view(&self) -> Row<'_> {
        match &self.data {
            Data::F32(w) => Row::F32(w),
            Data::Bf16(w) => Row::Bf16(w),
            Data::Q8_0 { scale, q } => Row::Q8_0 { scale, q },
            Data::Q4_1 { scale, min, q } => Row::Q4_1 { scale, min, q },
        }
    }

    /// The f32 values when the matrix is stored in f32.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            Data::F32(w) => Some(w),
            _ => None,
        }
    }

    /// The values as f32, for editing in place (merging an adapter): a compact matrix is expanded
    /// to f32 for good first.
    pub fn f32_mut(&mut self) -> &mut Vec<f32> {
        if !matches!(self.data, Data::F32(_)) {
            self.data = Data::F32(self.to_f32());
        }
        match &mut self.data {
            Data::F32(w) => w,
            _ => unreachable!("expanded to f32 above"),
        }
    }

    /// Row `r` as f32 into `out`.
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        gemv::dequantize(self.view(), self.cols, r, out);
    }

    /// All values as f32, in parallel.
    fn expand_into(&self, out: &mut [f32]) {
        gemv::dequantize_parallel(self.view(), self.cols, 0, out);
    }

    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.len()];
        self.expand_into(&mut out);
        out
    }

    /// Runs `f` on the matrix as f32: the stored values, or a copy expanded into this thread's
    /// scratch buffer.
    pub fn with_f32<R>(&self, f: impl FnOnce(&[f32]) -> R) -> R {
        if let Data::F32(w) = &self.data {
            return f(w);
        }
        with_scratch(&SCRATCH, self.len(), |buf| self.expand_into(buf), f)
    }

    /// The matrix as the GEMMs take it. Where the CPU has AMX: bf16 as stored, and Q8_0/Q4_1
    /// dequantized to bf16 a few rows at a time as the product packs them into tile panels (no
    /// bf16 copy of the whole matrix is written and read back, so a quantized base trains at
    /// nearly bf16 speed); without AMX the same forms on AVX512-FP16 or AVX512-BF16 vectors
    /// (`amx::product_unit`); elsewhere f32 (compact formats expanded into scratch).
    fn with_dense<R>(&self, f: impl FnOnce(DenseWeight) -> R) -> R {
        match &self.data {
            Data::F32(w) => f(DenseWeight::F32(w)),
            Data::Bf16(w) if amx::products_available() => f(DenseWeight::Bf16(w)),
            Data::Q8_0 { .. } | Data::Q4_1 { .. } if amx::products_available() => {
                let fill = |first: usize, out: &mut [u16]| gemv::dequantize_bf16(self.view(), self.cols, first, out);
                f(DenseWeight::Bf16Rows(&fill))
            }
            _ => self.with_f32(|w| f(DenseWeight::F32(w))),
        }
    }

    /// `y[m × rows] = x[m × cols] · Wᵀ` for many rows (prefill, training).
    pub fn matmul_t(&self, x: &[f32], m: usize, y: &mut [f32]) {
        let _timer = crate::profile::time(crate::profile::Phase::FrozenGemm);
        self.with_dense(|w| w.forward(y, x, m, self.rows, self.cols))
    }

    /// `dx[m × cols] (+)= dy[m × rows] · W`: the input gradient of `y = x · Wᵀ`.
    pub fn matmul_back(&self, dy: &[f32], m: usize, dx: &mut [f32], accumulate: bool) {
        let _timer = crate::profile::time(crate::profile::Phase::FrozenGemm);
        self.with_dense(|w| w.backward(dx, dy, m, self.rows, self.cols, accumulate))
    }

    /// Whether inference should take this matrix through `gemv` at any number of rows: a Q8_0 matrix
    /// on a CPU with AVX-512 VNNI but no AMX, where the 8-bit products (16 weight rows at a time,
    /// `vnni::q8_0_group`) beat `matmul_t` at every size measured.
    /// - Against the f32 GEMM (Xeon without AMX; SmolLM2's 1536 × 576, 2 threads): 48 rows 452
    ///   vs 1324 µs, 128 rows 1124 vs 2047, 512 rows 4343 vs 4447. That also holds where the
    ///   products run on AVX512-FP16 vectors (not measured against them).
    /// - Against AVX512-BF16 dot products (`amx::ProductUnit::Bf16Dot`, AMD EPYC, `bench gemv
    ///   --weights q8_0`, SmolLM2's 210 layer products, ms, three alternating pairs): 256 rows
    ///   128.6 / 128.5 / 129.1 vs 162.6 / 161.2 / 161.7, 512 rows 273.1 / 268.2 / 269.2 vs 301.0 /
    ///   293.1 / 345.4, once each weight group meets every activation row while it is in cache
    ///   and the activations are rounded in parallel (before, the GEMM won beyond 128 rows).
    ///
    /// Training keeps `matmul_t`: its forward and backward then multiply the same activations.
    pub fn infers_on_gemv(&self) -> bool {
        #[cfg(target_arch = "x86_64")]
        if matches!(self.data, Data::Q8_0 { .. }) {
            return !amx::int8_available() && crate::kernels::vnni::available();
        }
        false
    }

    /// `y[m × rows] (+)= alpha · x[m × cols] · Wᵀ` straight from the stored format (decoding:
    /// `m` is the number of sequences, one new token each).
    pub fn gemv(&self, x: &[f32], m: usize, y: &mut [f32], alpha: f32, accumulate: bool) {
        let _timer = crate::profile::time(crate::profile::Phase::FrozenGemm);
        gemv::gemv_parallel(self.view(), self.rows, self.cols, x, m, y, alpha, accumulate);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::randn;
    use crate::rng::Rng;

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    /// Each format's error bound per value, relative to the block's largest magnitude.
    fn bound(format: WeightFormat) -> f32 {
        match format {
            WeightFormat::F32 => 0.0,
            WeightFormat::Bf16 => 1.0 / 256.0,
            WeightFormat::Q8_0 => 0.5 / 127.0 + 1e-6,
            WeightFormat::Q4_1 => 2.0 * 0.5 / 15.0 + 1e-6,
        }
    }

    #[test]
    fn every_format_round_trips_within_its_bound_and_gemv_matches_its_own_values() {
        let mut rng = Rng::new(7);
        // 128 columns: from 8 rows on, Q8_0 and bf16 products run on AMX tiles where the CPU has
        // them (17 rows: a group of 16 and one of 1).
        for (rows, cols) in [(70, 96), (70, 128)] {
            let w = randn(&mut rng, rows * cols, 1.0);
            for format in [WeightFormat::F32, WeightFormat::Bf16, WeightFormat::Q8_0, WeightFormat::Q4_1] {
                let fm = FrozenMatrix::new(rows, cols, w.clone(), format);
                assert_eq!(fm.format(), format);
                let back = fm.to_f32();
                for (b, (got, want)) in back.chunks(BLOCK).zip(w.chunks(BLOCK)).enumerate() {
                    let amax = want.iter().fold(0.0f32, |m, x| m.max(x.abs()));
                    assert!(max_diff(got, want) <= bound(format) * amax, "{format:?} block {b}: {} vs bound", max_diff(got, want));
                }
                // The product from the compact form equals the product of its own f32 expansion with
                // the activations as the kernels take them.
                for m in [1, 2, 3, 17] {
                    let x = randn(&mut rng, m * cols, 1.0);
                    let mut y = vec![0.5; m * rows];
                    fm.gemv(&x, m, &mut y, 2.0, true);
                    let mut want = vec![0.5; m * rows];
                    let xr = gemv::activations_as_taken(fm.view(), &x, cols);
                    crate::kernels::matmul::matmul_naive(&mut want, &xr, false, &back, true, m, rows, cols, 2.0, true);
                    assert!(max_diff(&y, &want) < 1e-4 * (cols as f32).sqrt(), "{format:?} m={m}: {}", max_diff(&y, &want));
                }
                let mut row = vec![0.0; cols];
                fm.row_into(5, &mut row);
                assert_eq!(row, back[5 * cols..6 * cols]);
                fm.with_f32(|v| assert_eq!(v, &back[..]));
            }
        }
    }

    #[test]
    fn batched_products_of_every_format_match_its_values_rounded_as_the_kernels_take_them() {
        // With AMX (or AVX512-BF16 alone), bf16 and the block formats multiply on tiles (or their
        // vector counterpart): the weights as bf16 (Q8_0/Q4_1 dequantized, then rounded) and the
        // activations rounded to bf16. With AVX512-FP16 and no
        // AMX they take the same bf16 weights on fp16 vectors, within fp16's rounding (about 1e-3
        // of each sum's size, which is ~depth here). Elsewhere compact weights are expanded to f32
        // exactly.
        let mut rng = Rng::new(11);
        let round = |v: &[f32]| -> Vec<f32> { v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect() };
        // 71 rows: an odd depth for the input gradient (its last row pairs with zeros).
        for ((rows, cols, m), format) in [(70, 96, 37), (71, 96, 5)]
            .into_iter()
            .flat_map(|shape| [WeightFormat::F32, WeightFormat::Bf16, WeightFormat::Q8_0, WeightFormat::Q4_1].map(|f| (shape, f)))
        {
            let w = randn(&mut rng, rows * cols, 1.0);
            let fm = FrozenMatrix::new(rows, cols, w.clone(), format);
            let tiles = amx::products_round_to_bf16() && format != WeightFormat::F32;
            let fp16 = !amx::products_round_to_bf16() && amx::products_available() && format != WeightFormat::F32;
            let values = if tiles || fp16 { round(&fm.to_f32()) } else { fm.to_f32() };
            let (forward_tolerance, backward_tolerance) = if fp16 { (1e-3 * cols as f32, 1e-3 * rows as f32) } else { (1e-4, 1e-4) };
            let (x, dy) = (randn(&mut rng, m * cols, 1.0), randn(&mut rng, m * rows, 1.0));
            let (xr, dyr) = if tiles { (round(&x), round(&dy)) } else { (x.clone(), dy.clone()) };
            let mut y = vec![0.0; m * rows];
            fm.matmul_t(&x, m, &mut y);
            let mut want = vec![0.0; m * rows];
            crate::kernels::matmul::matmul_naive(&mut want, &xr, false, &values, true, m, rows, cols, 1.0, false);
            assert!(max_diff(&y, &want) < forward_tolerance, "{format:?} forward: {}", max_diff(&y, &want));
            let mut dx = vec![1.0; m * cols];
            fm.matmul_back(&dy, m, &mut dx, true);
            let mut want = vec![1.0; m * cols];
            crate::kernels::matmul::matmul_naive(&mut want, &dyr, false, &values, false, m, cols, rows, 1.0, true);
            assert!(max_diff(&dx, &want) < backward_tolerance, "{format:?} backward: {}", max_diff(&dx, &want));
        }
    }

    #[test]
    fn formats_parse_and_odd_widths_stay_f32() {
        for f in [WeightFormat::F32, WeightFormat::Bf16, WeightFormat::Q8_0, WeightFormat::Q4_1] {
            assert_eq!(WeightFormat::parse(f.name()).unwrap(), f);
        }
        assert!(WeightFormat::parse("q3").is_err());
        let fm = FrozenMatrix::new(2, 40, vec![1.0; 80], WeightFormat::Q8_0);
        assert_eq!(fm.format(), WeightFormat::F32);
        let mut fm = FrozenMatrix::new(2, 32, vec![1.0; 64], WeightFormat::Q4_1);
        assert_eq!(fm.bytes(), 2 * 8 + 32);
        fm.f32_mut()[0] = 3.0;
        assert_eq!((fm.format(), fm.to_f32()[0]), (WeightFormat::F32, 3.0));
    }
}
