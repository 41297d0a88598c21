//! Decode products (`y = x · Wᵀ` for a few activation rows) on CPUs with AVX-512 VNNI and BF16
//! (Sapphire Rapids, Zen 4), where each weight is read once per call and multiplied in its own
//! dot-product type instead of being widened to f32 value by value:
//!
//! - the activations are rounded once per call to the weight's dot-product type: bf16 for a bf16
//!   weight (`vdpbf16ps`: 32 products per instruction), 8-bit values in blocks of 32 with an f32
//!   scale for Q8_0 and Q4_1 (`vpdpbusd`: 64 per instruction; llama.cpp rounds its activations
//!   the same way), unchanged for f32;
//! - each 64-byte chunk of a weight row is loaded once for a tile of up to 16 activation rows, so
//!   a decode step over many sequences costs little more memory traffic than one;
//! - from 8 activation rows on, a Q8_0 weight is taken 16 rows at a time, transposed in registers
//!   so that one vector holds 4 values of each of 16 rows (`q8_0_group`): the int → float
//!   conversions and scalings, which otherwise come once per 64 products, then come once per 512.
//!
//! What the products compute exactly — the weight's values times the activations as rounded here
//! — is what `rounded` returns, and what the tests compare against.

use super::blocks::{quantize_block, quantize_block_avx512, Row, BLOCK};
use std::arch::x86_64::*;

/// Whether this CPU has the instructions (checked once).
pub fn available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("avx512bf16")
            && is_x86_feature_detected!("fma")
    })
}

/// 64 bytes, aligned to a cache line: 16 f32, 32 bf16 or 64 8-bit values.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Chunk([u8; 64]);

const ZERO: Chunk = Chunk([0; 64]);

impl Chunk {
    fn f32s(&mut self) -> &mut [f32; 16] {
        // SAFETY: 64 aligned bytes are 16 f32 exactly; every bit pattern is a valid f32.
        unsafe { &mut *(self.0.as_mut_ptr() as *mut [f32; 16]) }
    }
}

/// Which format the activations were rounded for (the weight's).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    F32,
    Bf16,
    Q8_0,
    Q4_1,
}

fn kind(w: Row) -> Kind {
    match w {
        Row::F32(_) => Kind::F32,
        Row::Bf16(_) => Kind::Bf16,
        Row::Q8_0 { .. } => Kind::Q8_0,
        Row::Q4_1 { .. } => Kind::Q4_1,
    }
}

/// Values of a row per chunk.
fn per_chunk(kind: Kind) -> usize {
    match kind {
        Kind::F32 => 16,
        Kind::Bf16 => 32,
        Kind::Q8_0 | Kind::Q4_1 => 2 * BLOCK,
    }
}

/// The activations of one call, rounded for the weight's format; each row padded with zeros to
/// whole chunks.
pub struct Activations {
    kind: Kind,
    rows: usize,
    chunks: usize,
    /// `[rows × chunks]`: f32, bf16, or 8-bit values (Q8_0: `q + 128` as unsigned; Q4_1: signed,
    /// in the order the Q4_1 nibbles unpack to, see `load_q4_1`).
    x: Vec<Chunk>,
    /// Q8_0/Q4_1 `[rows × chunks]`: each 32-bit lane's block scale, as f32 (Q4_1: 1/16 of it
    /// in the lanes of high nibbles, see `Q4_1Rows::load`).
    scale: Vec<Chunk>,
    /// Q4_1 `[rows × sums_stride]`: each block's `scale · Σq`, which the block's minimum
    /// multiplies; zeros past the row's blocks.
    block_sum: Vec<f32>,
    sums_stride: usize,
    /// Q8_0 from `GROUP_MIN_ROWS` rows on, for the products that take the weights as the
    /// unsigned operand (`q8_0_group`), block-major so that one block's rows lie side by side:
    /// `[blocks × rows × 32]` the values as signed bytes (`x` is them + 128), `[blocks × rows]`
    /// −128 · Σq of each block and the block's scale; empty below.
    signed: Vec<i8>,
    offset: Vec<i32>,
    block_scale: Vec<f32>,
}

impl Activations {
    /// `x` (`m` rows of `cols`) rounded for products with the weight `w`.
    pub fn new(w: Row, x: &[f32], m: usize, cols: usize) -> Self {
        assert_eq!(x.len(), m * cols);
        let kind = kind(w);
        let chunks = cols.div_ceil(per_chunk(kind));
        let mut a = Activations {
            kind,
            rows: m,
            chunks,
            x: vec![ZERO; m * chunks],
            scale: Vec::new(),
            block_sum: Vec::new(),
            sums_stride: 0,
            signed: Vec::new(),
            offset: Vec::new(),
            block_scale: Vec::new(),
        };
        match kind {
            Kind::F32 => {
                for (row, out) in x.chunks_exact(cols).zip(a.x.chunks_exact_mut(chunks)) {
                    for (src, dst) in row.chunks(16).zip(out.iter_mut()) {
                        dst.f32s()[..src.len()].copy_from_slice(src);
                    }
                }
            }
            Kind::Bf16 => {
                for (row, out) in x.chunks_exact(cols).zip(a.x.chunks_exact_mut(chunks)) {
                    for (src, dst) in row.chunks(32).zip(out.iter_mut()) {
                        for (k, &v) in src.iter().enumerate() {
                            dst.0[2 * k..2 * k + 2].copy_from_slice(&super::bf16::to_bf16(v).to_le_bytes());
                        }
                    }
                }
            }
            Kind::Q8_0 | Kind::Q4_1 => {
                a.scale = vec![ZERO; m * chunks];
                if kind == Kind::Q8_0 {
                    // Padding: q = 0 (stored as 128) under a zero weight and a zero scale.
                    a.x.iter_mut().for_each(|c| c.0 = [128; 64]);
                } else {
                    a.sums_stride = (cols / BLOCK).next_multiple_of(16);
                    a.block_sum = vec![0.0; m * a.sums_stride];
                }
                assert!(available(), "Activations::new without AVX-512 VNNI");
                // Each block's scale and Σq, row by row.
                let blocks = cols / BLOCK;
                let mut stats = vec![(0.0f32, 0i32); m * blocks];
                let quantize_row = |row: &[f32], xr: &mut [Chunk], sr: &mut [Chunk], st: &mut [(f32, i32)]| {
                    for (b, block) in row.chunks_exact(BLOCK).enumerate() {
                        let (c, half) = (b / 2, b % 2);
                        // SAFETY: checked above that the CPU has AVX-512; the block is 32 values.
                        let (s, sum) = unsafe { quantize_into(kind, block, &mut xr[c], half) };
                        // Lane l of a chunk holds bytes 4l..4l+4.
                        for l in (0..16).filter(|&l| lane_block(kind, l) == half) {
                            // Q4_1's high nibbles (lanes 8..16) come in 16 times their value.
                            sr[c].f32s()[l] = if kind == Kind::Q4_1 && l >= 8 { s / 16.0 } else { s };
                        }
                        st[b] = (s, sum);
                    }
                };
                if m >= PARALLEL_ROWS {
                    use rayon::prelude::*;
                    let (xs, ss, sts) =
                        (a.x.par_chunks_exact_mut(chunks), a.scale.par_chunks_exact_mut(chunks), stats.par_chunks_exact_mut(blocks));
                    x.par_chunks_exact(cols).zip(xs.zip(ss).zip(sts)).for_each(|(row, ((xr, sr), st))| quantize_row(row, xr, sr, st));
                } else {
                    let (xs, ss, sts) = (a.x.chunks_exact_mut(chunks), a.scale.chunks_exact_mut(chunks), stats.chunks_exact_mut(blocks));
                    x.chunks_exact(cols).zip(xs.zip(ss).zip(sts)).for_each(|(row, ((xr, sr), st))| quantize_row(row, xr, sr, st));
                }
                if kind == Kind::Q4_1 {
                    for (sums, st) in a.block_sum.chunks_exact_mut(a.sums_stride).zip(stats.chunks_exact(blocks)) {
                        sums.iter_mut().zip(st).for_each(|(d, &(s, sum))| *d = s * sum as f32);
                    }
                } else if m >= GROUP_MIN_ROWS {
                    a.group_q8_0(&stats);
                }
            }
        }
        a
    }

    /// The block-major copy `q8_0_group` reads (see `signed`), from the rounded rows and each
    /// block's `(scale, Σq)` in `stats` (`[rows × blocks]`); in parallel over blocks for many rows.
    fn group_q8_0(&mut self, stats: &[(f32, i32)]) {
        let (m, chunks) = (self.rows, self.chunks);
        let blocks = stats.len() / m;
        self.signed = vec![0; blocks * m * BLOCK];
        self.offset = vec![0; blocks * m];
        self.block_scale = vec![0.0; blocks * m];
        let x = &self.x;
        let fill = |b: usize, signed: &mut [i8], offset: &mut [i32], scale: &mut [f32]| {
            for (i, dst) in signed.chunks_exact_mut(BLOCK).enumerate() {
                let src: &[u8; BLOCK] = x[i * chunks + b / 2].0[BLOCK * (b % 2)..][..BLOCK].try_into().expect("a block");
                dst.copy_from_slice(&src.map(|v| (v ^ 0x80) as i8));
                let (s, sum) = stats[i * blocks + b];
                (offset[i], scale[i]) = (-128 * sum, s);
            }
        };
        if m >= PARALLEL_ROWS {
            use rayon::prelude::*;
            let parts = self
                .signed
                .par_chunks_exact_mut(m * BLOCK)
                .zip(self.offset.par_chunks_exact_mut(m))
                .zip(self.block_scale.par_chunks_exact_mut(m));
            parts.enumerate().for_each(|(b, ((signed, offset), scale))| fill(b, signed, offset, scale));
        } else {
            let parts =
                self.signed.chunks_exact_mut(m * BLOCK).zip(self.offset.chunks_exact_mut(m)).zip(self.block_scale.chunks_exact_mut(m));
            parts.enumerate().for_each(|(b, ((signed, offset), scale))| fill(b, signed, offset, scale));
        }
    }
}

/// From this many activation rows on (a prompt chunk), `Activations::new` rounds them in parallel.
const PARALLEL_ROWS: usize = 64;

/// `quantize_block` of the 32 values of `block`, written into block `half` (0 or 1) of `dst`:
/// Q8_0 as `q + 128` in natural order, Q4_1 as signed values in the order its nibbles unpack to,
/// `[a 0..16, b 0..16, a 16..32, b 16..32]`. Returns the scale and `Σ q`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn quantize_into(kind: Kind, block: &[f32], dst: &mut Chunk, half: usize) -> (f32, i32) {
    let (scale, [q0, q1]) = quantize_block_avx512(block);
    let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
    let (q0, q1, at0, at1) = if kind == Kind::Q8_0 {
        let offset = _mm512_set1_epi32(128);
        (_mm512_add_epi32(q0, offset), _mm512_add_epi32(q1, offset), 32 * half, 32 * half + 16)
    } else {
        (q0, q1, 16 * half, 32 + 16 * half)
    };
    _mm_storeu_si128(dst.0.as_mut_ptr().add(at0) as *mut __m128i, _mm512_cvtepi32_epi8(q0));
    _mm_storeu_si128(dst.0.as_mut_ptr().add(at1) as *mut __m128i, _mm512_cvtepi32_epi8(q1));
    (scale, sum)
}

/// Which of a chunk's two blocks (0 or 1) 32-bit lane `l` (bytes 4l..4l+4) belongs to: halves
/// for Q8_0, alternating quarters in Q4_1's unpacked order (as `q8_0_pattern`, `q4_1_pattern`).
fn lane_block(kind: Kind, l: usize) -> usize {
    if kind == Kind::Q8_0 {
        l / 8
    } else {
        (l / 4) % 2
    }
}

/// `x` as the products take it against a weight in `w`'s format (f32: unchanged): for tests and
/// for reasoning about accuracy.
pub fn rounded(w: Row, x: &[f32], cols: usize) -> Vec<f32> {
    match kind(w) {
        Kind::F32 => x.to_vec(),
        Kind::Bf16 => x.iter().map(|&v| f32::from_bits((super::bf16::to_bf16(v) as u32) << 16)).collect(),
        Kind::Q8_0 | Kind::Q4_1 => {
            assert!(cols.is_multiple_of(BLOCK));
            x.chunks_exact(BLOCK)
                .flat_map(|b| {
                    let (s, q) = quantize_block(b);
                    q.map(|v| s * v as f32)
                })
                .collect()
        }
    }
}

/// One format's chunk loads and multiply-adds. `load` reads chunk `c` of weight row `j` (`mask`:
/// its valid elements, from `mask(c)`); `madd` adds its products with chunk `c` of activation row
/// `i` into the lanes of `acc`; `finish` adds what the row's chunks leave out. The lanes' sum is
/// the dot product.
trait Format: Copy {
    type W: Copy;
    fn mask(self, c: usize) -> u64;
    unsafe fn load(self, j: usize, c: usize, mask: u64) -> Self::W;
    unsafe fn madd(acc: __m512, w: &Self::W, x: &Activations, i: usize, c: usize) -> __m512;
    #[inline(always)]
    unsafe fn finish(self, acc: __m512, _j: usize, _x: &Activations, _i: usize) -> __m512 {
        acc
    }
    /// The address of chunk `c` of row `j` (possibly past the matrix: only for prefetching).
    fn address(self, j: usize, c: usize) -> *const i8;
}

/// Bit mask of the first `n` of `lanes` elements (all when `n ≥ lanes`).
#[inline(always)]
fn first(n: usize, lanes: usize) -> u64 {
    if n >= lanes {
        u64::MAX >> (64 - lanes)
    } else {
        (1u64 << n) - 1
    }
}

#[inline(always)]
unsafe fn x_ptr(x: &Activations, i: usize, c: usize) -> *const Chunk {
    x.x.as_ptr().add(i * x.chunks + c)
}

#[inline(always)]
unsafe fn scale_lanes(x: &Activations, i: usize, c: usize) -> __m512 {
    _mm512_load_ps(x.scale.as_ptr().add(i * x.chunks + c) as *const f32)
}

#[derive(Clone, Copy)]
struct F32Rows<'a> {
    w: &'a [f32],
    cols: usize,
}

impl Format for F32Rows<'_> {
    type W = __m512;
    #[inline(always)]
    fn mask(self, c: usize) -> u64 {
        first(self.cols - 16 * c, 16)
    }
    #[inline(always)]
    fn address(self, j: usize, c: usize) -> *const i8 {
        self.w.as_ptr().wrapping_add(j * self.cols + 16 * c) as *const i8
    }
    #[inline(always)]
    unsafe fn load(self, j: usize, c: usize, mask: u64) -> __m512 {
        _mm512_maskz_loadu_ps(mask as __mmask16, self.w.as_ptr().add(j * self.cols + 16 * c))
    }
    #[inline(always)]
    unsafe fn madd(acc: __m512, w: &__m512, x: &Activations, i: usize, c: usize) -> __m512 {
        _mm512_fmadd_ps(*w, _mm512_load_ps(x_ptr(x, i, c) as *const f32), acc)
    }
}

#[derive(Clone, Copy)]
struct Bf16Rows<'a> {
    w: &'a [u16],
    cols: usize,
}

impl Format for Bf16Rows<'_> {
    type W = __m512bh;
    #[inline(always)]
    fn mask(self, c: usize) -> u64 {
        first(self.cols - 32 * c, 32)
    }
    #[inline(always)]
    fn address(self, j: usize, c: usize) -> *const i8 {
        self.w.as_ptr().wrapping_add(j * self.cols + 32 * c) as *const i8
    }
    #[inline(always)]
    unsafe fn load(self, j: usize, c: usize, mask: u64) -> __m512bh {
        let v = _mm512_maskz_loadu_epi16(mask as __mmask32, self.w.as_ptr().add(j * self.cols + 32 * c) as *const i16);
        std::mem::transmute::<__m512i, __m512bh>(v)
    }
    #[inline(always)]
    unsafe fn madd(acc: __m512, w: &__m512bh, x: &Activations, i: usize, c: usize) -> __m512 {
        let xv = std::mem::transmute::<__m512i, __m512bh>(_mm512_load_si512(x_ptr(x, i, c) as *const __m512i));
        _mm512_dpbf16_ps(acc, xv, *w)
    }
}

/// Blocks `b` and `b + 1` of `v` (a row's per-block values; `b + 1` may be past the row's
/// `blocks`, then it reads as 0) spread over a chunk's lanes: `pattern[l]` says which of the two
/// lane `l` takes.
#[inline(always)]
unsafe fn pair_lanes(v: &[f32], b: usize, blocks: usize, pattern: __m512i) -> __m512 {
    let pair = if b + 1 < blocks {
        _mm512_castsi512_ps(_mm512_set1_epi64((v.as_ptr().add(b) as *const i64).read_unaligned()))
    } else {
        _mm512_set1_ps(v[b])
    };
    _mm512_maskz_permutexvar_ps(if b + 1 < blocks { 0xFFFF } else { !lane_mask_second(pattern) }, pattern, pair)
}

/// The lanes of a chunk that the second block of a pair fills, from a `pair_lanes` pattern.
#[inline(always)]
unsafe fn lane_mask_second(pattern: __m512i) -> __mmask16 {
    _mm512_cmpeq_epi32_mask(pattern, _mm512_set1_epi32(1))
}

/// Lane → block for Q8_0's chunks (`lane_block`): the first 8 lanes, then the other 8.
#[inline(always)]
unsafe fn q8_0_pattern() -> __m512i {
    _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1)
}

/// Lane → block for Q4_1's unpacked chunks (`lane_block`): alternating quarters.
#[inline(always)]
unsafe fn q4_1_pattern() -> __m512i {
    _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1)
}

#[derive(Clone, Copy)]
struct Q8_0Rows<'a> {
    scale: &'a [f32],
    q: &'a [i8],
    cols: usize,
}

/// A Q8_0 chunk: its 64 values, −128·Σ of each lane's four values (so that the unsigned product
/// with `q + 128` comes out as the signed one), and the lane scales.
#[derive(Clone, Copy)]
struct Q8Chunk {
    q: __m512i,
    offset: __m512i,
    scale: __m512,
}

impl Format for Q8_0Rows<'_> {
    type W = Q8Chunk;
    #[inline(always)]
    fn mask(self, c: usize) -> u64 {
        first(self.cols - 64 * c, 64)
    }
    #[inline(always)]
    fn address(self, j: usize, c: usize) -> *const i8 {
        self.q.as_ptr().wrapping_add(j * self.cols + 64 * c)
    }
    #[inline(always)]
    unsafe fn load(self, j: usize, c: usize, mask: u64) -> Q8Chunk {
        let blocks = self.cols / BLOCK;
        let q = _mm512_maskz_loadu_epi8(mask, self.q.as_ptr().add(j * self.cols + 64 * c));
        let sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(-128), q);
        let offset = _mm512_sub_epi32(_mm512_setzero_si512(), sums);
        Q8Chunk { q, offset, scale: pair_lanes(&self.scale[j * blocks..], 2 * c, blocks, q8_0_pattern()) }
    }
    #[inline(always)]
    unsafe fn madd(acc: __m512, w: &Q8Chunk, x: &Activations, i: usize, c: usize) -> __m512 {
        let xq = _mm512_load_si512(x_ptr(x, i, c) as *const __m512i);
        let dot = _mm512_dpbusd_epi32(w.offset, xq, w.q);
        _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(w.scale, scale_lanes(x, i, c)), acc)
    }
}

#[derive(Clone, Copy)]
struct Q4_1Rows<'a> {
    scale: &'a [f32],
    min: &'a [f32],
    q: &'a [u8],
    cols: usize,
}

#[derive(Clone, Copy)]
struct Q4Chunk {
    q: __m512i,
    scale: __m512,
}

impl Format for Q4_1Rows<'_> {
    type W = Q4Chunk;
    #[inline(always)]
    fn mask(self, c: usize) -> u64 {
        first(self.cols / 2 - 32 * c, 32)
    }
    #[inline(always)]
    fn address(self, j: usize, c: usize) -> *const i8 {
        self.q.as_ptr().wrapping_add(j * self.cols / 2 + 32 * c) as *const i8
    }
    /// The chunk's two blocks of 16 bytes, loaded twice: the low nibbles of the first copy and
    /// the high nibbles (left in place, so 16 times their value; the activations' scales for
    /// those lanes are 1/16 of the block's) of the second give `[a 0..16, b 0..16, a 16..32,
    /// b 16..32]` (byte k holds positions k and k + 16 of its block).
    #[inline(always)]
    unsafe fn load(self, j: usize, c: usize, mask: u64) -> Q4Chunk {
        let blocks = self.cols / BLOCK;
        let bytes = _mm256_maskz_loadu_epi8(mask as __mmask32, self.q.as_ptr().add(j * self.cols / 2 + 32 * c) as *const i8);
        let both = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(bytes), bytes);
        let nibbles = _mm512_inserti64x4::<1>(_mm512_set1_epi8(15), _mm256_set1_epi8(-16));
        let q = _mm512_and_si512(both, nibbles);
        Q4Chunk { q, scale: pair_lanes(&self.scale[j * blocks..], 2 * c, blocks, q4_1_pattern()) }
    }
    #[inline(always)]
    unsafe fn madd(acc: __m512, w: &Q4Chunk, x: &Activations, i: usize, c: usize) -> __m512 {
        let xq = _mm512_load_si512(x_ptr(x, i, c) as *const __m512i);
        let dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w.q, xq);
        _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(w.scale, scale_lanes(x, i, c)), acc)
    }
    /// The minimums: `Σ_b min_b · (x scale · Σ q)_b` over the row's blocks, 16 at a time.
    #[inline(always)]
    unsafe fn finish(self, mut acc: __m512, j: usize, x: &Activations, i: usize) -> __m512 {
        let blocks = self.cols / BLOCK;
        let sums = x.block_sum.as_ptr().add(i * x.sums_stride);
        for g in 0..blocks.div_ceil(16) {
            let mask = first(blocks - 16 * g, 16) as __mmask16;
            let min = _mm512_maskz_loadu_ps(mask, self.min.as_ptr().add(j * blocks + 16 * g));
            acc = _mm512_fmadd_ps(min, _mm512_loadu_ps(sums.add(16 * g)), acc);
        }
        acc
    }
}

/// Weight rows `j0..j0 + R` against activation rows `i0..i0 + M`: every weight chunk is loaded
/// once for the M rows, the R·M sums stay in registers.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // index loops: each activation chunk meets all R weight chunks in turn
unsafe fn tile<F: Format, const R: usize, const M: usize>(f: F, x: &Activations, j0: usize, i0: usize, out: &mut [f32], first_row: usize) {
    let mut acc = [[_mm512_setzero_ps(); M]; R];
    for c in 0..x.chunks {
        // The tile two ahead, chunk by chunk: its rows share 4 KiB pages, where the hardware
        // prefetcher follows one stream per page.
        for r in 0..R {
            _mm_prefetch::<_MM_HINT_T0>(f.address(j0 + 2 * R + r, c));
        }
        let mask = f.mask(c);
        let w: [F::W; R] = std::array::from_fn(|r| f.load(j0 + r, c, mask));
        for i in 0..M {
            for r in 0..R {
                acc[r][i] = F::madd(acc[r][i], &w[r], x, i0 + i, c);
            }
        }
    }
    let m = x.rows;
    for r in 0..R {
        for i in 0..M {
            acc[r][i] = f.finish(acc[r][i], j0 + r, x, i0 + i);
        }
    }
    if R * M >= 8 {
        // Many sums: reduced together, 16 lanes to a vector of 16 sums.
        let mut v = [_mm512_setzero_ps(); 16];
        for r in 0..R {
            v[r * M..(r + 1) * M].copy_from_slice(&acc[r]);
        }
        let sums = sum_lanes16(v);
        for r in 0..R {
            out[(j0 + r - first_row) * m + i0..][..M].copy_from_slice(&sums[r * M..(r + 1) * M]);
        }
    } else {
        for (r, row) in acc.iter().enumerate() {
            for (i, a) in row.iter().enumerate() {
                out[(j0 + r - first_row) * m + i0 + i] = _mm512_reduce_add_ps(*a);
            }
        }
    }
}

/// The lane sums of 16 vectors, `[Σ v[0], …, Σ v[15]]`, in 15 adds of pairs shuffled together
/// (each level halves the vectors and the lanes per sum) instead of 16 separate reductions.
#[inline(always)]
unsafe fn sum_lanes16(v: [__m512; 16]) -> [f32; 16] {
    // v[2k], v[2k+1] → 256-bit halves of s[k]: [v[2k]'s 8 partial sums, v[2k+1]'s].
    let s: [__m512; 8] = std::array::from_fn(|k| {
        let (a, b) = (v[2 * k], v[2 * k + 1]);
        _mm512_add_ps(_mm512_shuffle_f32x4::<0b01_00_01_00>(a, b), _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b))
    });
    // → 128-bit blocks of t[k]: v[4k], v[4k+1], v[4k+2], v[4k+3], 4 partial sums each.
    let t: [__m512; 4] = std::array::from_fn(|k| {
        let (a, b) = (s[2 * k], s[2 * k + 1]);
        _mm512_add_ps(_mm512_shuffle_f32x4::<0b10_00_10_00>(a, b), _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b))
    });
    // → in block b of u[k]: two partial sums of v[8k + b], two of v[8k + 4 + b].
    let u: [__m512; 2] = std::array::from_fn(|k| {
        let (a, b) = (t[2 * k], t[2 * k + 1]);
        _mm512_add_ps(_mm512_shuffle_ps::<0b01_00_01_00>(a, b), _mm512_shuffle_ps::<0b11_10_11_10>(a, b))
    });
    // → lane 4b + q holds Σ v[4q + b]; one permutation puts them in order.
    let w = _mm512_add_ps(_mm512_shuffle_ps::<0b10_00_10_00>(u[0], u[1]), _mm512_shuffle_ps::<0b11_01_11_01>(u[0], u[1]));
    let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    let mut out = [0.0f32; 16];
    _mm512_storeu_ps(out.as_mut_ptr(), _mm512_permutexvar_ps(order, w));
    out
}

/// Rows ahead that `row_alone` prefetches.
const ROW_AHEAD: usize = 4;

/// Weight row `j` against activation row `i` alone, its chunks in order: one sequential stream,
/// with four sums in flight. For a single activation row this beats `tile`'s four weight rows
/// side by side, whose interleaved streams the AMD EPYC VM's hardware prefetcher followed badly
/// (one thread, bf16 decode 39–40 → 51–66 tokens/s with one row at a time, even with a single
/// sum in flight).
#[inline(always)]
unsafe fn row_alone<F: Format>(f: F, x: &Activations, j: usize, i: usize, out: &mut [f32], first_row: usize) {
    let mut acc = [_mm512_setzero_ps(); 4];
    // Every chunk but the last is whole: loaded with a constant full mask (a plain load).
    let whole = x.chunks.saturating_sub(1);
    let mut c = 0;
    while c + 4 <= whole {
        for (a, sum) in acc.iter_mut().enumerate() {
            _mm_prefetch::<_MM_HINT_T0>(f.address(j + ROW_AHEAD, c + a));
            *sum = F::madd(*sum, &f.load(j, c + a, u64::MAX), x, i, c + a);
        }
        c += 4;
    }
    while c < x.chunks {
        _mm_prefetch::<_MM_HINT_T0>(f.address(j + ROW_AHEAD, c));
        acc[0] = F::madd(acc[0], &f.load(j, c, f.mask(c)), x, i, c);
        c += 1;
    }
    let sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    out[(j - first_row) * x.rows + i] = _mm512_reduce_add_ps(f.finish(sum, j, x, i));
}

/// Weight rows `first..first + n` against activation rows `i0..i0 + M`, R rows at a time.
#[inline(always)]
unsafe fn tiles<F: Format, const R: usize, const M: usize>(f: F, x: &Activations, first: usize, n: usize, i0: usize, out: &mut [f32]) {
    let mut j = first;
    while j + R <= first + n {
        tile::<F, R, M>(f, x, j, i0, out, first);
        j += R;
    }
    while j < first + n {
        tile::<F, 1, M>(f, x, j, i0, out, first);
        j += 1;
    }
}

/// All activation rows against weight rows `first..first + n`: 16 activation rows at a time,
/// the rest 8 at a time against two weight rows, then 4 or 2 against one, then one alone
/// (`row_alone`). Below 8 activation rows each weight row is read alone, in order: side by side,
/// the rows' interleaved streams defeated the AMD EPYC VM's hardware prefetcher (`bench adapters`,
/// two rounds, aggregate decode tokens/s with 2 rows: bf16 152/143 → 164/171, Q8_0 222/202 →
/// 258/262; 4 rows: bf16 255/228 → 292/281, Q8_0 327/343 → 381/368).
#[inline(always)]
unsafe fn rows<F: Format>(f: F, x: &Activations, first: usize, n: usize, out: &mut [f32]) {
    rows_from(f, x, first, n, 0, out)
}

/// `rows` for activation rows `i..`.
#[inline(always)]
unsafe fn rows_from<F: Format>(f: F, x: &Activations, first: usize, n: usize, mut i: usize, out: &mut [f32]) {
    while i < x.rows {
        let left = x.rows - i;
        i += if left >= 16 {
            tiles::<F, 1, 16>(f, x, first, n, i, out);
            16
        } else if left >= 8 {
            tiles::<F, 2, 8>(f, x, first, n, i, out);
            8
        } else if left >= 4 {
            tiles::<F, 1, 4>(f, x, first, n, i, out);
            4
        } else if left >= 2 {
            tiles::<F, 1, 2>(f, x, first, n, i, out);
            2
        } else {
            for j in first..first + n {
                row_alone(f, x, j, i, out, first);
            }
            1
        };
    }
}

/// From this many activation rows on, Q8_0 products take 16 weight rows at a time
/// (`q8_0_group`); below, the transposes would cost more than they save.
const GROUP_MIN_ROWS: usize = 8;

/// `rows` for a Q8_0 weight: from 8 activation rows on, 16 weight rows at a time in one vector
/// (`q8_0_group`), the weight rows left over (fewer than 16) as `rows` takes them. Each group of
/// weight rows meets every pass of 16 (then 8) activation rows while it sits in the first-level
/// cache, so a prompt of many rows reads the weights from memory once, not once per pass.
#[inline(always)]
unsafe fn q8_0_rows(f: Q8_0Rows, x: &Activations, first: usize, n: usize, out: &mut [f32]) {
    let (sixteens, eight) = (x.rows / 16, x.rows % 16 >= GROUP_MIN_ROWS);
    let passed = 16 * sixteens + if eight { 8 } else { 0 };
    let grouped = if passed > 0 { n / 16 * 16 } else { 0 };
    for j in (first..first + grouped).step_by(16) {
        for p in 0..sixteens {
            q8_0_group::<16>(f, x, j, 16 * p, out, first, !eight && p + 1 == sixteens);
        }
        if eight {
            q8_0_group::<8>(f, x, j, 16 * sixteens, out, first, true);
        }
    }
    if grouped < n && passed > 0 {
        let rest = &mut out[grouped * x.rows..];
        for p in 0..sixteens {
            tiles::<_, 1, 16>(f, x, first + grouped, n - grouped, 16 * p, rest);
        }
        if eight {
            tiles::<_, 2, 8>(f, x, first + grouped, n - grouped, 16 * sixteens, rest);
        }
    }
    rows_from(f, x, first, n, passed, out)
}

/// Q8_0 weight rows `j0..j0 + 16` against activation rows `i0..i0 + M`, with the 16 weight rows
/// in the lanes of one vector: each block's 16 × 32 bytes are transposed in registers into
/// eight vectors of 4 bytes per row (`transpose_block`), and each activation row's 4-byte
/// groups, broadcast, multiply all 16 rows at once. One int → float conversion and one
/// multiply-add then cover 16 rows × 32 values instead of one row × 64 (`tile` converts every
/// 64-value chunk of every row). 256 × 576 at 16 rows, one thread, in cache, alternating runs:
/// 24.5 / 31.5 µs against 51.1 / 41.4 through `tile` (Xeon); 15.7 µs best of 2000 on the AMD
/// EPYC VM after the changes of 2026-12-07. `M` is 8 or 16.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // index loops: the eight chains advance in step
unsafe fn q8_0_group<const M: usize>(
    f: Q8_0Rows,
    x: &Activations,
    j0: usize,
    i0: usize,
    out: &mut [f32],
    first_row: usize,
    prefetch_next: bool,
) {
    assert!(M.is_multiple_of(8) && x.rows >= GROUP_MIN_ROWS);
    let (cols, blocks) = (f.cols, f.cols / BLOCK);
    let scale_index =
        _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(blocks as i32));
    let scales = f.scale.as_ptr().add(j0 * blocks);
    let rows = f.q.as_ptr().add(j0 * cols);
    let mut acc = [_mm512_setzero_ps(); M];
    let mut w_scales = [_mm512_setzero_ps(); 8];
    for b in 0..blocks {
        if prefetch_next {
            // The next group's 16 rows (one contiguous run of 16 · cols bytes), 8 of its cache
            // lines per block here, so the whole group has been asked for when this one ends.
            for l in 0..8 {
                _mm_prefetch::<_MM_HINT_T0>(rows.wrapping_add(16 * cols + 64 * (8 * b + l)));
            }
            // And its scales (16 · blocks values, one cache line per block here), which the
            // gather below otherwise waits for, one line per row.
            _mm_prefetch::<_MM_HINT_T0>(scales.wrapping_add(16 * blocks + 16 * b) as *const i8);
        }
        // The weights as the unsigned operand (w + 128), so that each activation's four bytes
        // are the broadcast operand straight from memory; `offset` (−128 · Σq) corrects for the
        // 128 added.
        let w = transpose_block(rows.add(b * BLOCK), cols).map(|v| _mm512_xor_si512(v, _mm512_set1_epi8(-128)));
        // The 16 rows' scales of this block: eight blocks' at a time through the same transpose
        // (each row's eight f32 are 32 bytes), a gather for the last blocks of a row that are
        // fewer than eight (a whole run there would read past the matrix).
        if b % 8 == 0 && b + 8 <= blocks {
            w_scales = transpose_block(scales.add(b) as *const i8, 4 * blocks).map(|v| _mm512_castsi512_ps(v));
        }
        let w_scale = if b / 8 * 8 + 8 <= blocks { w_scales[b % 8] } else { _mm512_i32gather_ps::<4>(scale_index, scales.add(b)) };
        // Eight activation rows at a time: eight independent chains of products in flight (one
        // row's eight multiply-adds in a row would wait on each other's latency).
        for i8 in (0..M).step_by(8) {
            // Rows i0 + i8.. of block b: their bytes, offsets and scales each side by side.
            let first = b * x.rows + i0 + i8;
            let xq = x.signed.as_ptr().add(first * BLOCK) as *const i32;
            let (offsets, x_scales) = (x.offset.as_ptr().add(first), x.block_scale.as_ptr().add(first));
            let mut dot: [__m512i; 8] = std::array::from_fn(|k| _mm512_set1_epi32(offsets.add(k).read()));
            for (t, v) in w.iter().enumerate() {
                for k in 0..8 {
                    dot[k] = _mm512_dpbusd_epi32(dot[k], *v, _mm512_set1_epi32(xq.add(8 * k + t).read()));
                }
            }
            for k in 0..8 {
                let i = i8 + k;
                acc[i] =
                    _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[k]), _mm512_mul_ps(w_scale, _mm512_set1_ps(x_scales.add(k).read())), acc[i]);
            }
        }
    }
    let m = x.rows;
    let mut sums = [[0.0f32; 16]; M];
    for (s, a) in sums.iter_mut().zip(&acc) {
        _mm512_storeu_ps(s.as_mut_ptr(), *a);
    }
    for r in 0..16 {
        let dst = &mut out[(j0 + r - first_row) * m + i0..][..M];
        for (i, d) in dst.iter_mut().enumerate() {
            *d = sums[i][r];
        }
    }
}

/// Bytes `0..32` of 16 rows `stride` bytes apart (a Q8_0 block of each) as eight vectors:
/// vector `t`'s lane `r` holds row `r`'s bytes `4t..4t + 4`. Rows `p` and `p + 8` share a
/// vector, each 256-bit half of which then goes through an 8 × 8 transpose of 32-bit groups.
#[inline(always)]
unsafe fn transpose_block(rows: *const i8, stride: usize) -> [__m512i; 8] {
    let load = |r: usize| _mm256_loadu_si256(rows.add(r * stride) as *const __m256i);
    let z: [__m512i; 8] = std::array::from_fn(|p| _mm512_inserti64x4::<1>(_mm512_castsi256_si512(load(p)), load(p + 8)));
    // Within each 128-bit lane, rows 2k and 2k + 1 interleaved: groups 0, 1 (`lo`), 2, 3 (`hi`).
    let lo: [__m512i; 4] = std::array::from_fn(|k| _mm512_unpacklo_epi32(z[2 * k], z[2 * k + 1]));
    let hi: [__m512i; 4] = std::array::from_fn(|k| _mm512_unpackhi_epi32(z[2 * k], z[2 * k + 1]));
    // quad[g][e]: in each 128-bit lane, group e of rows 4g..4g + 4 (of the lane's half).
    let quad: [[__m512i; 4]; 2] = std::array::from_fn(|g| {
        let (l0, l1, h0, h1) = (lo[2 * g], lo[2 * g + 1], hi[2 * g], hi[2 * g + 1]);
        [_mm512_unpacklo_epi64(l0, l1), _mm512_unpackhi_epi64(l0, l1), _mm512_unpacklo_epi64(h0, h1), _mm512_unpackhi_epi64(h0, h1)]
    });
    // 128-bit lanes 0 and 2 of a quad hold groups 0..4 of its rows, lanes 1 and 3 groups 4..8.
    let first = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13);
    let second = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
    std::array::from_fn(|t| _mm512_permutex2var_epi64(quad[0][t % 4], if t < 4 { first } else { second }, quad[1][t % 4]))
}

/// `out[(j − first)·m + i] = row_j · x_i` for rows `first..first + out.len()/m` of the `[· ×
/// cols]` matrix `w` and the `m` rows of `x` (rounded for `w`'s format by `Activations::new`).
///
/// # Safety
/// The CPU must have the instructions (`available()`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16,avx2,fma")]
pub unsafe fn gemv(w: Row, cols: usize, first: usize, x: &Activations, out: &mut [f32]) {
    assert_eq!(x.kind, kind(w), "activations rounded for another format");
    assert!(x.chunks == cols.div_ceil(per_chunk(x.kind)) && out.len().is_multiple_of(x.rows));
    let n = out.len() / x.rows;
    match w {
        Row::F32(w) => {
            assert!(w.len() >= (first + n) * cols);
            rows(F32Rows { w, cols }, x, first, n, out)
        }
        Row::Bf16(w) => {
            assert!(w.len() >= (first + n) * cols);
            rows(Bf16Rows { w, cols }, x, first, n, out)
        }
        Row::Q8_0 { scale, q } => {
            assert!(q.len() >= (first + n) * cols && scale.len() >= (first + n) * cols / BLOCK);
            q8_0_rows(Q8_0Rows { scale, q, cols }, x, first, n, out)
        }
        Row::Q4_1 { scale, min, q } => {
            assert!(q.len() >= (first + n) * cols / 2 && scale.len() >= (first + n) * cols / BLOCK && min.len() == scale.len());
            rows(Q4_1Rows { scale, min, q, cols }, x, first, n, out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::{assert_row_products, randn};
    use crate::model::frozen::{FrozenMatrix, WeightFormat};
    use crate::rng::Rng;

    #[test]
    fn every_format_and_tile_shape_equals_the_product_with_the_rounded_activations() {
        if !available() {
            eprintln!("skipped: no AVX-512 VNNI/BF16 on this CPU");
            return;
        }
        let mut rng = Rng::new(3);
        // 96 columns: Q8_0/Q4_1 rows end in a lone block, f32/bf16 rows in a part chunk.
        // Activation counts cover every tile shape (16, 8, 4, 2, 1) and their sums, several
        // passes over each weight group (40, 70), and the rounding in parallel (70 ≥
        // PARALLEL_ROWS); 37 and 33 rows give Q8_0's groups of 16 weight rows (`q8_0_group`) and
        // rows left over, with 22 blocks (scales transposed eight blocks at a time, the last six
        // gathered) and one.
        for (rows, cols) in [(13, 96), (8, 64), (5, 160), (37, 704), (33, 32)] {
            let w = randn(&mut rng, rows * cols, 1.0);
            for format in [WeightFormat::F32, WeightFormat::Bf16, WeightFormat::Q8_0, WeightFormat::Q4_1] {
                let fm = FrozenMatrix::new(rows, cols, w.clone(), format);
                let values = fm.to_f32();
                for m in [1, 2, 3, 5, 7, 12, 16, 31, 40, 70] {
                    let x = randn(&mut rng, m * cols, 2.0);
                    let acts = Activations::new(fm.view(), &x, m, cols);
                    let xr = rounded(fm.view(), &x, cols);
                    for first in [0, 1] {
                        let n = rows - first;
                        let mut out = vec![f32::NAN; n * m];
                        // SAFETY: checked above.
                        unsafe { gemv(fm.view(), cols, first, &acts, &mut out) };
                        assert_row_products(&out, &values, &xr, cols, first, n, m, &format!("{format:?} {rows}x{cols}"));
                    }
                }
            }
        }
    }

    #[test]
    fn rounding_is_within_each_formats_bound() {
        let mut rng = Rng::new(5);
        let x = randn(&mut rng, 4 * BLOCK, 3.0);
        let q = [0i8; 4 * BLOCK];
        let s = [1.0f32; 4];
        let w = Row::Q8_0 { scale: &s, q: &q };
        for (b, (got, want)) in rounded(w, &x, 4 * BLOCK).chunks(BLOCK).zip(x.chunks(BLOCK)).enumerate() {
            let amax = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            for (g, v) in got.iter().zip(want) {
                assert!((g - v).abs() <= amax / 254.0 * 1.0001, "block {b}: {g} vs {v}");
            }
        }
        let bf = [0u16; 4 * BLOCK];
        for (g, v) in rounded(Row::Bf16(&bf), &x, 4 * BLOCK).iter().zip(&x) {
            assert!((g - v).abs() <= v.abs() / 256.0);
        }
    }
}
