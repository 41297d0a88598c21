//! Matrix-vector kernels for frozen weights in f32, bf16 and two 32-value block formats (Q8_0,
//! Q4_1 as in GGML), plus the matching row dequantizers. Decoding is memory-bound: each token
//! streams every weight once, so the dot products read the compact format directly and never
//! expand it to f32 in memory.
//!
//! The portable kernels are plain Rust in 16-lane chunks; on CPUs with AVX-512 (checked at run
//! time) the dot products run as explicit AVX-512 intrinsics and the dequantizer as the portable
//! code compiled with AVX-512 enabled. Where the CPU also has VNNI and BF16, `gemv_parallel`
//! runs the products of `vnni` instead, in each format's own dot-product instruction.

use super::bf16::to_f32 as bf16_to_f32;
use super::blocks::{Row, BLOCK};

#[inline(always)]
fn sum16(acc: [f32; 16]) -> f32 {
    acc.iter().sum()
}

/// `row · x`.
#[inline(always)]
fn dot_portable(row: Row, x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    match row {
        Row::F32(w) => {
            let (wc, xc) = (w.chunks_exact(16), x.chunks_exact(16));
            let tail: f32 = wc.remainder().iter().zip(xc.remainder()).map(|(a, b)| a * b).sum();
            for (w, x) in wc.zip(xc) {
                for l in 0..16 {
                    acc[l] += w[l] * x[l];
                }
            }
            sum16(acc) + tail
        }
        Row::Bf16(w) => {
            let (wc, xc) = (w.chunks_exact(16), x.chunks_exact(16));
            let tail: f32 = wc.remainder().iter().zip(xc.remainder()).map(|(&a, b)| bf16_to_f32(a) * b).sum();
            for (w, x) in wc.zip(xc) {
                for l in 0..16 {
                    acc[l] += bf16_to_f32(w[l]) * x[l];
                }
            }
            sum16(acc) + tail
        }
        Row::Q8_0 { scale, q } => {
            for ((&d, q), x) in scale.iter().zip(q.chunks_exact(BLOCK)).zip(x.chunks_exact(BLOCK)) {
                for l in 0..16 {
                    acc[l] += d * (q[l] as f32 * x[l] + q[l + 16] as f32 * x[l + 16]);
                }
            }
            sum16(acc)
        }
        Row::Q4_1 { scale, min, q } => {
            for (((&d, &m), q), x) in scale.iter().zip(min).zip(q.chunks_exact(BLOCK / 2)).zip(x.chunks_exact(BLOCK)) {
                for l in 0..16 {
                    let (lo, hi) = ((q[l] & 15) as f32, (q[l] >> 4) as f32);
                    acc[l] += d * (lo * x[l] + hi * x[l + 16]) + m * (x[l] + x[l + 16]);
                }
            }
            sum16(acc)
        }
    }
}

/// The row as f32 into `out` (`out.len()` values).
#[inline(always)]
fn dequantize_portable(row: Row, out: &mut [f32]) {
    match row {
        Row::F32(w) => out.copy_from_slice(w),
        Row::Bf16(w) => {
            for (o, &b) in out.iter_mut().zip(w) {
                *o = bf16_to_f32(b);
            }
        }
        Row::Q8_0 { scale, q } => {
            for ((&d, q), o) in scale.iter().zip(q.chunks_exact(BLOCK)).zip(out.chunks_exact_mut(BLOCK)) {
                for l in 0..BLOCK {
                    o[l] = d * q[l] as f32;
                }
            }
        }
        Row::Q4_1 { scale, min, q } => {
            for (((&d, &m), q), o) in scale.iter().zip(min).zip(q.chunks_exact(BLOCK / 2)).zip(out.chunks_exact_mut(BLOCK)) {
                for l in 0..16 {
                    o[l] = d * (q[l] & 15) as f32 + m;
                    o[l + 16] = d * (q[l] >> 4) as f32 + m;
                }
            }
        }
    }
}

/// `out[(j − first)·m + i] = row_j · x_i` for rows `first..first + out.len()/m` of `w` and the
/// `m` rows of `x` (each `cols` long).
#[inline(always)]
fn gemv_portable(w: Row, cols: usize, first: usize, x: &[f32], m: usize, out: &mut [f32]) {
    for (jj, o) in out.chunks_exact_mut(m).enumerate() {
        let row = w.row(first + jj, cols);
        for (i, v) in o.iter_mut().enumerate() {
            *v = dot_portable(row, &x[i * cols..(i + 1) * cols]);
        }
    }
}

/// Rows `first..first + out.len()/cols` of `w` as f32.
#[inline(always)]
fn dequantize_portable_rows(w: Row, cols: usize, first: usize, out: &mut [f32]) {
    for (jj, o) in out.chunks_exact_mut(cols).enumerate() {
        dequantize_portable(w.row(first + jj, cols), o);
    }
}

/// Which vector extension the kernels run with on this CPU (checked once).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Simd {
    Portable,
    Avx512,
}

fn simd() -> Simd {
    static LEVEL: std::sync::OnceLock<Simd> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("fma") {
                return Simd::Avx512;
            }
        }
        Simd::Portable
    })
}

/// AVX-512 versions: the dot products spelled out in intrinsics (LLVM does not vectorize a float
/// reduction on its own), the dequantizer the portable code compiled with AVX-512 enabled.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Row, BLOCK};
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn dot(row: Row, x: &[f32]) -> f32 {
        let xp = x.as_ptr();
        let mut acc = _mm512_setzero_ps();
        match row {
            Row::F32(w) => {
                let n = w.len();
                let mut p = 0;
                while p + 16 <= n {
                    acc = _mm512_fmadd_ps(_mm512_loadu_ps(w.as_ptr().add(p)), _mm512_loadu_ps(xp.add(p)), acc);
                    p += 16;
                }
                if p < n {
                    let mask: __mmask16 = (1u32 << (n - p)) as u16 - 1;
                    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, w.as_ptr().add(p)), _mm512_maskz_loadu_ps(mask, xp.add(p)), acc);
                }
            }
            Row::Bf16(w) => {
                let n = w.len();
                let mut p = 0;
                while p + 16 <= n {
                    let h = _mm256_loadu_si256(w.as_ptr().add(p) as *const __m256i);
                    let v = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)));
                    acc = _mm512_fmadd_ps(v, _mm512_loadu_ps(xp.add(p)), acc);
                    p += 16;
                }
                let tail: f32 = w[p..].iter().zip(&x[p..]).map(|(&a, b)| super::bf16_to_f32(a) * b).sum();
                return _mm512_reduce_add_ps(acc) + tail;
            }
            Row::Q8_0 { scale, q } => {
                for (b, &d) in scale.iter().enumerate() {
                    let qp = q.as_ptr().add(b * BLOCK);
                    let lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(qp as *const __m128i)));
                    let hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(qp.add(16) as *const __m128i)));
                    let s =
                        _mm512_fmadd_ps(hi, _mm512_loadu_ps(xp.add(b * BLOCK + 16)), _mm512_mul_ps(lo, _mm512_loadu_ps(xp.add(b * BLOCK))));
                    acc = _mm512_fmadd_ps(_mm512_set1_ps(d), s, acc);
                }
            }
            Row::Q4_1 { scale, min, q } => {
                let mut acc_min = _mm512_setzero_ps();
                let nibble = _mm512_set1_epi32(15);
                for (b, (&d, &m)) in scale.iter().zip(min).enumerate() {
                    let bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(q.as_ptr().add(b * BLOCK / 2) as *const __m128i));
                    let lo = _mm512_cvtepi32_ps(_mm512_and_si512(bytes, nibble));
                    let hi = _mm512_cvtepi32_ps(_mm512_srli_epi32::<4>(bytes));
                    let (x0, x1) = (_mm512_loadu_ps(xp.add(b * BLOCK)), _mm512_loadu_ps(xp.add(b * BLOCK + 16)));
                    let s = _mm512_fmadd_ps(hi, x1, _mm512_mul_ps(lo, x0));
                    acc = _mm512_fmadd_ps(_mm512_set1_ps(d), s, acc);
                    acc_min = _mm512_fmadd_ps(_mm512_set1_ps(m), _mm512_add_ps(x0, x1), acc_min);
                }
                acc = _mm512_add_ps(acc, acc_min);
            }
        }
        _mm512_reduce_add_ps(acc)
    }

    /// The 4×4 dot products of four f32 weight rows with four vectors: each chunk of a weight
    /// row and of a vector is loaded once for four multiply-adds.
    #[inline(always)]
    unsafe fn dot4x4(w: [&[f32]; 4], x: [&[f32]; 4]) -> [[f32; 4]; 4] {
        let n = w[0].len();
        let mut acc = [[_mm512_setzero_ps(); 4]; 4];
        let mut p = 0;
        let mut step = |mask: __mmask16, p: usize| {
            let wv = w.map(|r| _mm512_maskz_loadu_ps(mask, r.as_ptr().add(p)));
            let xv = x.map(|r| _mm512_maskz_loadu_ps(mask, r.as_ptr().add(p)));
            for a in 0..4 {
                for b in 0..4 {
                    acc[a][b] = _mm512_fmadd_ps(wv[a], xv[b], acc[a][b]);
                }
            }
        };
        while p + 16 <= n {
            step(u16::MAX, p);
            p += 16;
        }
        if p < n {
            step(((1u32 << (n - p)) - 1) as u16, p);
        }
        acc.map(|row| row.map(|a| _mm512_reduce_add_ps(a)))
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
    pub unsafe fn gemv(w: Row, cols: usize, first: usize, x: &[f32], m: usize, out: &mut [f32]) {
        let rows = out.len() / m;
        if m < 4 || !rows.is_multiple_of(4) {
            // Few vectors: read the stored format straight into each dot product.
            for (jj, o) in out.chunks_exact_mut(m).enumerate() {
                let row = w.row(first + jj, cols);
                for (i, v) in o.iter_mut().enumerate() {
                    *v = dot(row, &x[i * cols..(i + 1) * cols]);
                }
            }
            return;
        }
        // Several vectors (a decode step over several sequences): four weight rows at a time
        // expanded to f32 once, then multiplied with the vectors four by four.
        let mut buf = vec![0.0f32; 4 * cols];
        let xs: Vec<&[f32]> = x.chunks_exact(cols).collect();
        for j in (0..rows).step_by(4) {
            let block: [&[f32]; 4] = match w {
                Row::F32(all) => std::array::from_fn(|k| &all[(first + j + k) * cols..(first + j + k + 1) * cols]),
                compact => {
                    for (k, dst) in buf.chunks_exact_mut(cols).enumerate() {
                        super::dequantize_portable(compact.row(first + j + k, cols), dst);
                    }
                    let b: &[f32] = &buf;
                    std::array::from_fn(|k| &b[k * cols..(k + 1) * cols])
                }
            };
            let mut i = 0;
            while i + 4 <= m {
                let d = dot4x4(block, [xs[i], xs[i + 1], xs[i + 2], xs[i + 3]]);
                for (k, dk) in d.iter().enumerate() {
                    out[(j + k) * m + i..(j + k) * m + i + 4].copy_from_slice(dk);
                }
                i += 4;
            }
            for i in i..m {
                for (k, row) in block.iter().enumerate() {
                    out[(j + k) * m + i] = dot(Row::F32(row), xs[i]);
                }
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
    pub unsafe fn dequantize(w: Row, cols: usize, first: usize, out: &mut [f32]) {
        super::dequantize_portable_rows(w, cols, first, out)
    }
}

/// `out[(j − first)·m + i] = row_j · x_i` for rows `first..first + out.len()/m` of the `[rows ×
/// cols]` matrix `w` and the `m` rows of `x`.
pub fn gemv(w: Row, cols: usize, first: usize, x: &[f32], m: usize, out: &mut [f32]) {
    assert_eq!(x.len(), m * cols);
    match simd() {
        // SAFETY: `simd()` checked that the CPU has these features; every row holds whole
        // 16-value chunks or is read with a mask, and x rows are as long as w rows (asserted).
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 => unsafe { avx512::gemv(w, cols, first, x, m, out) },
        _ => gemv_portable(w, cols, first, x, m, out),
    }
}

/// Rows `first..first + out.len()/cols` of the matrix `w` as f32.
pub fn dequantize(w: Row, cols: usize, first: usize, out: &mut [f32]) {
    match simd() {
        // SAFETY: `simd()` checked that the CPU has these features.
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 => unsafe { avx512::dequantize(w, cols, first, out) },
        _ => dequantize_portable_rows(w, cols, first, out),
    }
}

/// `y[m × rows] (+)= alpha · x[m × cols] · wᵀ` for a `[rows × cols]` matrix `w`, in parallel
/// over blocks of rows (decoding: `m` sequences, one new token each).
#[allow(clippy::too_many_arguments)]
pub fn gemv_parallel(w: Row, rows: usize, cols: usize, x: &[f32], m: usize, y: &mut [f32], alpha: f32, accumulate: bool) {
    use rayon::prelude::*;
    assert_eq!(y.len(), m * rows);
    // A small product (an adapter's B·u when decoding) runs as one task on this thread: handing
    // work to another thread costs microseconds, more than the product itself.
    let chunk = if rows * cols * m < SERIAL_MULTIPLY_ADDS { rows } else { rows_per_task(rows) };
    // Computed as [rows × m] so each task writes one contiguous stretch, into a buffer kept per
    // thread: every call overwrites all of it, so it is neither zeroed nor reallocated (a fresh
    // vector of the LM head's 16 × 49152 products was a page-faulting 3 MiB per decode step).
    let mut products = PRODUCTS.take();
    if products.len() < rows * m {
        products.resize(rows * m, 0.0);
    }
    let t = &mut products[..rows * m];
    let out = Columns { y: y.as_mut_ptr(), rows, m, alpha, accumulate, _y: std::marker::PhantomData };
    // Each task's products go out to `y` as soon as they are made, while they are in cache, and
    // on both threads (written after all of them, on one thread, they were a tenth of a 16-row
    // decode step's products).
    // SAFETY (every `out.put` below): the tasks hold disjoint runs of weight rows, so they write
    // disjoint columns of `y`.
    #[cfg(target_arch = "x86_64")]
    let done = match w {
        // On AMX tiles from TILE_ROWS rows on, the activations rounded as `vnni` rounds them (so
        // results do not depend on the path): 8-bit blocks for Q8_0, bf16 for bf16.
        Row::Q8_0 { scale, q } if m >= TILE_ROWS && cols.is_multiple_of(64) && super::amx::int8_available() => {
            tile_groups(t, x, m, cols, chunk, super::amx::Q8Rows::new, |xq, first, n, o| {
                super::amx::q8_0_product(scale, q, cols, first, n, xq, o)
            });
            t.par_chunks(chunk * m).enumerate().for_each(|(c, o)| unsafe { out.put(c * chunk, o) });
            true
        }
        Row::Bf16(wb) if m >= TILE_ROWS && cols.is_multiple_of(32) && super::amx::available() => {
            tile_groups(t, x, m, cols, chunk, super::amx::Bf16Rows::new, |xb, first, n, o| {
                super::amx::bf16_product(wb, cols, first, n, xb, o)
            });
            t.par_chunks(chunk * m).enumerate().for_each(|(c, o)| unsafe { out.put(c * chunk, o) });
            true
        }
        _ => false,
    };
    #[cfg(target_arch = "x86_64")]
    let done = done
        || super::vnni::available() && {
            // The activations rounded once for all tasks, to the weight's dot-product type.
            let acts = super::vnni::Activations::new(w, x, m, cols);
            t.par_chunks_mut(chunk * m).enumerate().for_each(|(c, o)| {
                // SAFETY: `available()` checked that the CPU has the instructions.
                unsafe { super::vnni::gemv(w, cols, c * chunk, &acts, o) };
                unsafe { out.put(c * chunk, o) };
            });
            true
        };
    #[cfg(not(target_arch = "x86_64"))]
    let done = false;
    if !done {
        t.par_chunks_mut(chunk * m).enumerate().for_each(|(c, o)| {
            gemv(w, cols, c * chunk, x, m, o);
            unsafe { out.put(c * chunk, o) };
        });
    }
    PRODUCTS.set(products);
}

/// `gemv_parallel`'s output `y[m × rows]`, written by parallel tasks that each hold a run of
/// weight rows, so each writes its own columns of every row of `y`.
struct Columns<'a> {
    y: *mut f32,
    rows: usize,
    m: usize,
    alpha: f32,
    accumulate: bool,
    _y: std::marker::PhantomData<&'a mut [f32]>,
}

// SAFETY: the tasks that share it write disjoint columns (`put`'s contract).
unsafe impl Sync for Columns<'_> {}

impl Columns<'_> {
    /// `y[i][first + j] (+)= alpha · o[j·m + i]` for the products `o` (`[n × m]`) of weight rows
    /// `first..first + n`, 16 weight rows at a time so that the `16·m` products read stay in L1
    /// while they go out to the `m` rows of `y`.
    ///
    /// # Safety
    /// No other thread may write columns `first..first + n` of `y` at the same time.
    unsafe fn put(&self, first: usize, o: &[f32]) {
        let (rows, m) = (self.rows, self.m);
        assert!(first + o.len() / m <= rows);
        for (jb, block) in o.chunks(16 * m).enumerate() {
            for i in 0..m {
                let at = i * rows + first + 16 * jb;
                // SAFETY: inside `y` (checked above), and these columns are this caller's.
                let dst = unsafe { std::slice::from_raw_parts_mut(self.y.add(at), block.len() / m) };
                for (j, d) in dst.iter_mut().enumerate() {
                    let v = self.alpha * block[j * m + i];
                    *d = if self.accumulate { *d + v } else { v };
                }
            }
        }
    }
}

thread_local! {
    static PRODUCTS: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// The activations as `gemv_parallel` multiplies them with a weight in `w`'s format: rounded to
/// its dot-product type where the CPU runs `vnni`'s products, unchanged elsewhere.
pub fn activations_as_taken(w: Row, x: &[f32], cols: usize) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if super::vnni::available() {
        return super::vnni::rounded(w, x, cols);
    }
    let _ = (w, cols);
    x.to_vec()
}

/// `t[rows × m]` (see `gemv_parallel`) from a tile product: the activations prepared 16 rows at
/// a time (`prepare(rows, count, cols)`), each group multiplied by tasks of `chunk` weight rows
/// (rounded up to whole 32-row tile blocks), `product(prepared, first row, rows, out)`.
#[cfg(target_arch = "x86_64")]
fn tile_groups<P: Sync>(
    t: &mut [f32],
    x: &[f32],
    m: usize,
    cols: usize,
    chunk: usize,
    prepare: impl Fn(&[f32], usize, usize) -> P,
    product: impl Fn(&P, usize, usize, &mut [f32]) + Sync,
) {
    use rayon::prelude::*;
    let rows = t.len() / m;
    let chunk = chunk.next_multiple_of(32);
    let mut part = Vec::new();
    for g in (0..m).step_by(16) {
        let mg = 16.min(m - g);
        let prepared = prepare(&x[g * cols..(g + mg) * cols], mg, cols);
        let dst: &mut [f32] = if mg == m {
            &mut *t
        } else {
            part.resize(rows * mg, 0.0);
            &mut part
        };
        dst.par_chunks_mut(chunk * mg).enumerate().for_each(|(c, o)| product(&prepared, c * chunk, o.len() / mg, o));
        if mg < m {
            for j in 0..rows {
                t[j * m + g..j * m + g + mg].copy_from_slice(&part[j * mg..(j + 1) * mg]);
            }
        }
    }
}

/// Rows `first..first + out.len()/cols` of the matrix `w` as f32 into `out`, in parallel.
pub fn dequantize_parallel(w: Row, cols: usize, first: usize, out: &mut [f32]) {
    use rayon::prelude::*;
    let chunk = rows_per_task(out.len() / cols);
    out.par_chunks_mut(chunk * cols).enumerate().for_each(|(c, o)| dequantize(w, cols, first + c * chunk, o));
}

/// Rows `first..first + out.len()/cols` of `w` as bf16 (values rounded to nearest even), on the
/// calling thread.
pub fn dequantize_bf16(w: Row, cols: usize, first: usize, out: &mut [u16]) {
    let mut row = vec![0.0f32; cols];
    for (i, dst) in out.chunks_mut(cols).enumerate() {
        dequantize(w, cols, first + i, &mut row);
        dst.iter_mut().zip(&row).for_each(|(d, &s)| *d = super::bf16::to_bf16(s));
    }
}

/// From this many activation rows on, Q8_0 and bf16 products run on AMX tiles where the CPU has
/// them (`amx::q8_0_product`, `amx::bf16_product`): a tile's work is the same for 1 row as for
/// 16, so below this `vnni`'s products are faster (SmolLM2 Q8_0 decode, 2 threads, tokens/s vnni
/// vs tiles: 2 rows 140-148 vs 108, 4 rows 163-204 vs 140-173, 8 rows 189-270 vs 274-330; bf16 at
/// 8 rows even, at 16 rows 228-252 vs 325-369).
const TILE_ROWS: usize = 8;

/// Below this many multiply-adds `gemv_parallel` runs on the calling thread alone.
const SERIAL_MULTIPLY_ADDS: usize = 1 << 16;

/// Rows per parallel task: enough tasks to balance two to a few dozen threads, each a few KiB of
/// weights at least, in whole groups of 16 rows (`vnni`'s Q8_0 groups; 576 rows in tasks of 36
/// left 4 of every 36 rows to its slower path).
fn rows_per_task(rows: usize) -> usize {
    (rows / (8 * rayon::current_num_threads())).clamp(16, 1024).next_multiple_of(16)
}
