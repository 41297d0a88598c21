//! Matrix products against bf16 weights on Intel AMX tiles (Sapphire Rapids and later): bf16
//! inputs, f32 accumulation, 16×16×32 multiply-adds per instruction, so a product runs 3–4× faster
//! than the best f32 GEMM on the same cores. The activations are rounded to bf16 on the way in,
//! as in PyTorch's bf16 autocast; the weights are bf16 as stored, or a Q8_0/Q4_1 weight
//! dequantized and rounded to bf16 (`gemv::dequantize_bf16_parallel`).
//!
//! Shape of the computation: A (`[m × k]`, f32, converted to bf16 rows padded to whole tiles) times
//! B (the weight, repacked per call into column panels of 16 in the VNNI layout the tile unit reads:
//! tile row j holds, for each of 16 columns, the bf16 pair at depths 2j and 2j+1). The microkernel
//! keeps a 32×32 block of C in four tile registers. Rust has no stable AMX intrinsics, so the tile
//! instructions are inline assembly; `available()` also asks Linux for the tile state
//! (arch_prctl ARCH_REQ_XCOMP_PERM), without which the first tile instruction would fault.

use super::aligned::AlignedVec;
use super::blocks::{quantize_block_avx512, BLOCK};
use rayon::prelude::*;
use std::arch::asm;
use std::cell::Cell;
use std::sync::OnceLock;

/// Rows of C per microkernel block, and columns (two panels of 16).
const MR: usize = 32;
const NR: usize = 32;
/// Depth per tile step: 32 bf16 values = one 64-byte tile row.
const KR: usize = 32;

/// True when this CPU has AMX-BF16 and the OS has granted this process the tile state.
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        // SAFETY: cpuid leaf 7 exists on every x86-64 CPU that could run this binary.
        #[allow(unused_unsafe)] // safe to call from Rust 1.94 on, unsafe before
        let leaf7 = unsafe { std::arch::x86_64::__cpuid_count(7, 0) };
        let (amx_bf16, amx_tile) = ((leaf7.edx >> 22) & 1 == 1, (leaf7.edx >> 24) & 1 == 1);
        // The packing routines use AVX-512 (every CPU with AMX has it).
        let avx512 = is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw");
        if !(amx_bf16 && amx_tile && avx512) {
            return false;
        }
        const SYS_ARCH_PRCTL: isize = 158;
        const ARCH_REQ_XCOMP_PERM: usize = 0x1023;
        const XFEATURE_XTILEDATA: usize = 18;
        let ret: isize;
        // SAFETY: a plain Linux syscall with integer arguments; it only changes which extended
        // register state this process may use.
        unsafe {
            asm!("syscall", inlateout("rax") SYS_ARCH_PRCTL => ret, in("rdi") ARCH_REQ_XCOMP_PERM,
                 in("rsi") XFEATURE_XTILEDATA, lateout("rcx") _, lateout("r11") _, options(nostack));
        }
        ret == 0
    })
}

/// The 64-byte operand of `ldtilecfg`: palette 1, its 8 tiles used as 16 rows of 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

thread_local! {
    static CONFIGURED: Cell<bool> = const { Cell::new(false) };
    static A_SCRATCH: Cell<AlignedVec<u16>> = const { Cell::new(AlignedVec::new()) };
    static B_SCRATCH: Cell<AlignedVec<u16>> = const { Cell::new(AlignedVec::new()) };
}

/// Loads the tile configuration once per thread (the OS saves it with the thread's state).
fn configure_tiles() {
    CONFIGURED.with(|done| {
        if !done.get() {
            // Palette 1 has 8 tiles; the fields of tiles 8..16 must stay zero.
            let mut config = TileConfig { palette: 1, start_row: 0, reserved: [0; 14], bytes_per_row: [0; 16], rows: [0; 16] };
            config.bytes_per_row[..8].fill(64);
            config.rows[..8].fill(16);
            // SAFETY: `available()` returned true before any caller gets here, and the operand
            // is a valid, 64-byte aligned palette-1 configuration.
            unsafe { asm!("ldtilecfg [{}]", in(reg) &config, options(nostack, readonly)) };
            done.set(true);
        }
    })
}

/// `out[32×32]` (row stride 32) = A rows `[32 × 32·depth_steps]` (`a_stride` bytes apart) times
/// two B panels, each `depth_steps` tiles of 1 KiB.
///
/// # Safety
/// Tiles configured on this thread; `a` readable for 32 rows of `64·depth_steps` bytes, each
/// panel for `1024·depth_steps` bytes, `out` writable for 1024 f32.
#[inline(always)]
unsafe fn microkernel(a: *const u16, a_stride: usize, b0: *const u16, b1: *const u16, depth_steps: usize, out: *mut f32) {
    let a1 = a.byte_add(16 * a_stride);
    asm!(
        "tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3",
        "2:",
        "tileloadd tmm4, [{a0} + {a_stride}*1]",
        "tileloadd tmm6, [{b0} + {b_stride}*1]",
        "tdpbf16ps tmm0, tmm4, tmm6",
        "tileloadd tmm7, [{b1} + {b_stride}*1]",
        "tdpbf16ps tmm1, tmm4, tmm7",
        "tileloadd tmm5, [{a1} + {a_stride}*1]",
        "tdpbf16ps tmm2, tmm5, tmm6",
        "tdpbf16ps tmm3, tmm5, tmm7",
        "add {a0}, 64", "add {a1}, 64", "add {b0}, 1024", "add {b1}, 1024",
        "dec {steps}", "jnz 2b",
        "tilestored [{c00} + {c_stride}*1], tmm0",
        "tilestored [{c01} + {c_stride}*1], tmm1",
        "tilestored [{c10} + {c_stride}*1], tmm2",
        "tilestored [{c11} + {c_stride}*1], tmm3",
        a0 = inout(reg) a => _, a1 = inout(reg) a1 => _, b0 = inout(reg) b0 => _, b1 = inout(reg) b1 => _,
        steps = inout(reg) depth_steps => _, a_stride = in(reg) a_stride, b_stride = in(reg) 64usize,
        c00 = in(reg) out, c01 = in(reg) out.add(16), c10 = in(reg) out.add(16 * NR), c11 = in(reg) out.add(16 * NR + 16),
        c_stride = in(reg) 4 * NR,
        options(nostack)
    );
}

/// f32 → bf16, rounding to nearest even (finite values; what `half::bf16::from_f32` gives them).
#[inline(always)]
pub(crate) fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

/// The weight operand of `matmul_bf16`, bf16 bit patterns, row-major.
#[derive(Clone, Copy)]
pub enum Weight<'a> {
    /// `W [n × k]`: the product is `a · Wᵀ` (a linear layer's forward).
    Nk(&'a [u16]),
    /// `W [k × n]`: the product is `a · W` (a linear layer's input gradient).
    Kn(&'a [u16]),
}

/// `c[m×n] = alpha · a[m×k] · op(W)` (`+ c` with `accumulate`), with `a` rounded to bf16 and the
/// products accumulated in f32. Call only when `available()`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_bf16(c: &mut [f32], a: &[f32], m: usize, k: usize, w: Weight, n: usize, alpha: f32, accumulate: bool) {
    assert!(available(), "matmul_bf16 needs AMX-BF16");
    assert_eq!(c.len(), m * n, "matmul_bf16: c has {} elements, expected {m}×{n}", c.len());
    assert_eq!(a.len(), m * k, "matmul_bf16: a has {} elements, expected {m}×{k}", a.len());
    let (Weight::Nk(wv) | Weight::Kn(wv)) = w;
    assert_eq!(wv.len(), k * n, "matmul_bf16: weight has {} elements, expected {k}×{n}", wv.len());
    if m == 0 || n == 0 || k == 0 {
        // (With no depth the microkernel's loop would not end.)
        if !accumulate {
            c.fill(0.0);
        }
        return;
    }
    let (mp, np, kp) = (m.next_multiple_of(MR), n.next_multiple_of(NR), k.next_multiple_of(KR));
    let mut a16 = A_SCRATCH.take();
    let mut b16 = B_SCRATCH.take();
    pack_a(a, m, k, mp, kp, &mut a16);
    match w {
        Weight::Nk(w) => pack_nk(w, n, k, np, kp, &mut b16),
        Weight::Kn(w) => pack_kn(w, k, n, np, kp, &mut b16),
    }
    multiply(c, &a16, m, kp, &b16, n, alpha, accumulate);
    A_SCRATCH.set(a16);
    B_SCRATCH.set(b16);
}

/// Sizes `out` for a packed operand of `len` values. Depth padding (`k < kp`) must be zero, or
/// garbage could meet garbage in the sum; padding rows and columns only reach results that are
/// dropped, so when the depth is whole the old contents are left to be overwritten (no memset).
fn prepare(out: &mut AlignedVec<u16>, len: usize, k: usize, kp: usize) {
    if k < kp {
        out.clear();
    }
    out.resize(len);
}

/// `a` as bf16 rows of `kp` values, `mp` rows (rows past `m` are padding).
fn pack_a(a: &[f32], m: usize, k: usize, mp: usize, kp: usize, out: &mut AlignedVec<u16>) {
    prepare(out, mp * kp, k, kp);
    out.par_chunks_mut(kp * 16).enumerate().for_each(|(chunk, dst)| {
        for (i, row) in dst.chunks_mut(kp).enumerate() {
            let r = chunk * 16 + i;
            if r < m {
                for (d, &s) in row.iter_mut().zip(&a[r * k..(r + 1) * k]) {
                    *d = to_bf16(s);
                }
            }
        }
    });
}

/// Panels of 16 columns of `Wᵀ` for `W [n × k]`: in panel p, tile row j of depth block t holds
/// `W[16p + c][32t + 2j .. 32t + 2j + 2]` for c = 0..16 — 32-bit pairs of each weight row, transposed.
fn pack_nk(w: &[u16], n: usize, k: usize, np: usize, kp: usize, out: &mut AlignedVec<u16>) {
    prepare(out, np * kp, k, kp);
    out.par_chunks_mut(16 * kp).enumerate().for_each(|(p, panel)| {
        let rows = 16.min(n.saturating_sub(16 * p));
        for (t, tile) in panel.chunks_exact_mut(16 * KR).enumerate() {
            let depth = KR.min(k.saturating_sub(KR * t));
            if rows == 16 && depth == KR {
                // SAFETY: 16 rows of W from row 16p, each with 32 values from column 32t, exist;
                // the tile has 512 values. AVX-512 is part of `available()`.
                unsafe { transpose_pairs_16x16(w[16 * p * k + KR * t..].as_ptr(), k, tile) };
            } else {
                for c in 0..rows {
                    let row = &w[(16 * p + c) * k + KR * t..][..depth];
                    for (d, &v) in row.iter().enumerate() {
                        tile[(d / 2) * 32 + 2 * c + (d & 1)] = v;
                    }
                }
            }
        }
    });
}

/// One full tile of `pack_nk`: 16 rows of 16 value pairs (`row_len` apart) into tile rows of one
/// pair per source row — a 16×16 transpose of 32-bit elements (unpack, then 128-bit lane shuffles).
#[target_feature(enable = "avx512f")]
unsafe fn transpose_pairs_16x16(src: *const u16, row_len: usize, tile: &mut [u16]) {
    use std::arch::x86_64::*;
    let r: [__m512i; 16] = std::array::from_fn(|i| _mm512_loadu_si512(src.add(i * row_len) as *const _));
    // t: pairs of rows interleaved per 128-bit lane; u[4i + q], lane l: column 4l + q of rows 4i..4i+4.
    let mut t = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    let mut u = [_mm512_setzero_si512(); 16];
    for i in 0..4 {
        u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    let dst = tile.as_mut_ptr() as *mut __m512i;
    for q in 0..4 {
        let (x0, x1, x2, x3) = (u[q], u[4 + q], u[8 + q], u[12 + q]);
        let v0 = _mm512_shuffle_i32x4::<0b01_00_01_00>(x0, x1);
        let v1 = _mm512_shuffle_i32x4::<0b11_10_11_10>(x0, x1);
        let v2 = _mm512_shuffle_i32x4::<0b01_00_01_00>(x2, x3);
        let v3 = _mm512_shuffle_i32x4::<0b11_10_11_10>(x2, x3);
        _mm512_storeu_si512(dst.add(q), _mm512_shuffle_i32x4::<0b10_00_10_00>(v0, v2));
        _mm512_storeu_si512(dst.add(4 + q), _mm512_shuffle_i32x4::<0b11_01_11_01>(v0, v2));
        _mm512_storeu_si512(dst.add(8 + q), _mm512_shuffle_i32x4::<0b10_00_10_00>(v1, v3));
        _mm512_storeu_si512(dst.add(12 + q), _mm512_shuffle_i32x4::<0b11_01_11_01>(v1, v3));
    }
}

/// Panels of 16 columns of `W [k × n]`: in panel p, tile row j (over all depth) holds
/// `W[2j][16p + c], W[2j + 1][16p + c]` for c = 0..16 — two weight rows interleaved.
fn pack_kn(w: &[u16], k: usize, n: usize, np: usize, kp: usize, out: &mut AlignedVec<u16>) {
    prepare(out, np * kp, k, kp);
    // Four panels per task: each weight row is then read 128 bytes (two cache lines) at a time.
    const PANELS: usize = 4;
    out.par_chunks_mut(PANELS * 16 * kp).enumerate().for_each(|(group, panels)| {
        let c_first = PANELS * 16 * group;
        for j in 0..k.div_ceil(2) {
            for (i, panel) in panels.chunks_exact_mut(16 * kp).enumerate() {
                let (c0, cols) = (c_first + 16 * i, 16.min(n.saturating_sub(c_first + 16 * i)));
                if cols == 0 {
                    break; // padding panels
                }
                let tile_row = &mut panel[32 * j..32 * j + 32];
                let r0 = &w[2 * j * n + c0..][..cols];
                if 2 * j + 1 == k {
                    // odd depth: the last row pairs with zeros (left by `prepare`)
                    r0.iter().enumerate().for_each(|(c, &v)| tile_row[2 * c] = v);
                    continue;
                }
                let r1 = &w[(2 * j + 1) * n + c0..][..cols];
                if cols == 16 {
                    // SAFETY: both row segments and the tile row have the lengths the function reads.
                    unsafe { interleave_16(r0, r1, tile_row) };
                } else {
                    for c in 0..cols {
                        (tile_row[2 * c], tile_row[2 * c + 1]) = (r0[c], r1[c]);
                    }
                }
            }
        }
    });
}

/// `out[2c] = a[c], out[2c + 1] = b[c]` for 16 values each.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn interleave_16(a: &[u16], b: &[u16], out: &mut [u16]) {
    use std::arch::x86_64::*;
    let index = _mm512_set_epi16(
        47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0,
    );
    let a = _mm512_castsi256_si512(_mm256_loadu_si256(a.as_ptr() as *const _));
    let b = _mm512_castsi256_si512(_mm256_loadu_si256(b.as_ptr() as *const _));
    _mm512_storeu_si512(out.as_mut_ptr() as *mut _, _mm512_permutex2var_epi16(a, index, b));
}

/// `*mut f32` that may cross to rayon workers: each task writes its own block of C.
#[derive(Clone, Copy)]
struct SharedC(*mut f32);

impl SharedC {
    /// A method, not a field access, so closures capture the whole `Sync` wrapper.
    fn at(&self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}
// SAFETY: tasks write disjoint blocks (see `multiply`).
unsafe impl Send for SharedC {}
unsafe impl Sync for SharedC {}

/// One 32×32 block of C as the tile stores write it (aligned: see `aligned`).
#[repr(C, align(64))]
struct Block([f32; MR * NR]);

/// C blocks of 32×32 computed by rayon tasks of 4×2 blocks; each task writes only its own rows ×
/// columns of `c`.
#[allow(clippy::too_many_arguments)]
fn multiply(c: &mut [f32], a16: &[u16], m: usize, kp: usize, b16: &[u16], n: usize, alpha: f32, accumulate: bool) {
    const TASK_M: usize = 4;
    const TASK_N: usize = 2;
    let (m_blocks, n_blocks) = (m.div_ceil(MR), n.div_ceil(NR));
    let (tasks_m, tasks_n) = (m_blocks.div_ceil(TASK_M), n_blocks.div_ceil(TASK_N));
    let shared = SharedC(c.as_mut_ptr());
    (0..tasks_m * tasks_n).into_par_iter().for_each(|task| {
        configure_tiles();
        let (tm, tn) = (task % tasks_m, task / tasks_m);
        let mut block = Block([0.0; MR * NR]);
        for nb in tn * TASK_N..((tn + 1) * TASK_N).min(n_blocks) {
            let panels = &b16[2 * nb * 16 * kp..(2 * nb + 2) * 16 * kp];
            for mb in tm * TASK_M..((tm + 1) * TASK_M).min(m_blocks) {
                let a_rows = &a16[mb * MR * kp..(mb + 1) * MR * kp];
                // SAFETY: tiles configured above; `a_rows` is 32 rows of kp bf16, each panel
                // kp/32 tiles of 1 KiB, `block` 32×32 f32.
                unsafe { microkernel(a_rows.as_ptr(), 2 * kp, panels.as_ptr(), panels[16 * kp..].as_ptr(), kp / KR, block.0.as_mut_ptr()) };
                let (rows, cols) = ((m - mb * MR).min(MR), (n - nb * NR).min(NR));
                for (i, src) in block.0.chunks(NR).take(rows).enumerate() {
                    // SAFETY: row mb·32 + i < m and columns nb·32 .. +cols < n lie in `c`, and no
                    // other task has this (mb, nb) block.
                    let dst = unsafe { std::slice::from_raw_parts_mut(shared.at((mb * MR + i) * n + nb * NR), cols) };
                    if accumulate {
                        dst.iter_mut().zip(src).for_each(|(d, s)| *d += alpha * s);
                    } else {
                        dst.iter_mut().zip(src).for_each(|(d, s)| *d = alpha * s);
                    }
                }
            }
        }
    });
}

// ---- Decode products of Q8_0 weights on AMX-INT8 tiles ----
//
// A decode step over a few sequences multiplies each weight with up to 16 activation rows. Here
// the weight's rows are the A operand, read straight from memory (16 rows of 64 values per tile,
// the row length as stride: nothing is repacked), the activations — 8-bit blocks of 32, rounded
// as `blocks::quantize_block`, exactly as the `vnni` products round them — are B, packed once per
// call. One `tdpbssd` gives the 16×16 integer dot products of a block; each block's sums are then
// scaled by its weight and activation scales. Against `vnni`'s per-row instructions this does
// about a tenth of the vector work, so the product is bound by reading the weight, as for one row.

/// Whether `q8_0_product` runs on this CPU (AMX-INT8 besides the tile state).
pub fn int8_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        // SAFETY: as in `available`.
        #[allow(unused_unsafe)]
        let leaf7 = unsafe { std::arch::x86_64::__cpuid_count(7, 0) };
        available() && (leaf7.edx >> 25) & 1 == 1
    })
}

/// Weight rows per block of the decode products: two A tiles meet each B tile.
const DECODE_ROWS: usize = 32;

/// Up to 16 activation rows, quantized in blocks of 32, as B tiles: per 64 values of depth two
/// 1 KiB tiles, the first with the first block in its rows 0..8 (row r: for each activation row
/// i, its values 4r..4r + 4) and zeros below, the second with the second block in rows 8..16 —
/// so one 64-byte A tile meets each block alone. Rows past `m` are zero.
pub struct Q8Rows {
    m: usize,
    cols: usize,
    tiles: AlignedVec<u8>,
    /// `[blocks × 16]`: each block's scale per activation row.
    scales: Vec<f32>,
}

impl Q8Rows {
    /// Call only when `int8_available()`.
    pub fn new(x: &[f32], m: usize, cols: usize) -> Self {
        assert!(int8_available() && (1..=16).contains(&m) && cols.is_multiple_of(64) && x.len() == m * cols, "Q8Rows: {m} rows of {cols}");
        let blocks = cols / BLOCK;
        let mut rows = Q8Rows { m, cols, tiles: AlignedVec::zeroed(blocks * 1024), scales: vec![0.0; blocks * 16] };
        // SAFETY: `int8_available` implies AVX-512.
        unsafe { rows.fill(x) };
        rows
    }

    /// Quantizes `x` into the tiles and scales, compiled for AVX-512.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn fill(&mut self, x: &[f32]) {
        let cols = self.cols;
        let rows = self;
        for (i, row) in x.chunks_exact(cols).enumerate() {
            for (b, block) in row.chunks_exact(BLOCK).enumerate() {
                // SAFETY: `int8_available` implies AVX-512; the block has 32 values.
                let (scale, q) = unsafe { quantize_block_avx512(block) };
                let mut bytes = [0i8; BLOCK];
                // SAFETY: 16 lanes of 32-bit values into 16 bytes each.
                unsafe {
                    use std::arch::x86_64::*;
                    _mm_storeu_si128(bytes.as_mut_ptr() as *mut __m128i, _mm512_cvtepi32_epi8(q[0]));
                    _mm_storeu_si128(bytes.as_mut_ptr().add(16) as *mut __m128i, _mm512_cvtepi32_epi8(q[1]));
                }
                rows.scales[b * 16 + i] = scale;
                // Block b is half b % 2 of chunk b / 2: tile (b / 2)·2 + b % 2, rows from 8·(b % 2).
                let tile = &mut rows.tiles[b * 1024..(b + 1) * 1024];
                for r in 0..8 {
                    for e in 0..4 {
                        tile[(8 * (b % 2) + r) * 64 + 4 * i + e] = bytes[4 * r + e] as u8;
                    }
                }
            }
        }
    }
}

thread_local! {
    static Q8_SCRATCH: Cell<(AlignedVec<i8>, Vec<f32>)> = const { Cell::new((AlignedVec::new(), Vec::new())) };
}

/// `out[(j − first)·m + i] = W_j · x_i` for rows `first..first + n` of a Q8_0 weight (`q` the
/// values, `scale` one per block, `cols` wide) and the activation rows of `x`.
pub fn q8_0_product(scale: &[f32], q: &[i8], cols: usize, first: usize, n: usize, x: &Q8Rows, out: &mut [f32]) {
    assert!(int8_available(), "q8_0_product needs AMX-INT8");
    // SAFETY: AMX implies AVX-512 (`available` checks both).
    unsafe { q8_0_product_avx512(scale, q, cols, first, n, x, out) }
}

/// `q8_0_product` compiled for AVX-512, so that its intrinsics inline whatever the build's CPU.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn q8_0_product_avx512(scale: &[f32], q: &[i8], cols: usize, first: usize, n: usize, x: &Q8Rows, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let blocks = cols / BLOCK;
    assert!(x.cols == cols && out.len() == n * x.m && (first + n) * cols <= q.len() && (first + n) * blocks <= scale.len());
    configure_tiles();
    let (mut pad_q, mut pad_scale) = Q8_SCRATCH.take();
    #[repr(C, align(64))]
    struct Sums([i32; 4 * 256]);
    let mut c = Sums([0; 4 * 256]);
    for j0 in (first..first + n).step_by(DECODE_ROWS) {
        let rows = DECODE_ROWS.min(first + n - j0);
        // A partial block runs on a copy padded with zero rows, so no tile reads past the weight.
        let (wq, ws) = if rows == DECODE_ROWS {
            (&q[j0 * cols..(j0 + DECODE_ROWS) * cols], &scale[j0 * blocks..(j0 + DECODE_ROWS) * blocks])
        } else {
            pad_q.clear();
            pad_q.resize(DECODE_ROWS * cols);
            pad_q[..rows * cols].copy_from_slice(&q[j0 * cols..(j0 + rows) * cols]);
            pad_scale.clear();
            pad_scale.extend_from_slice(&scale[j0 * blocks..(j0 + rows) * blocks]);
            pad_scale.resize(DECODE_ROWS * blocks, 0.0);
            (&pad_q[..], &pad_scale[..])
        };
        let mut acc = [_mm512_setzero_ps(); DECODE_ROWS];
        for chunk in 0..cols / 64 {
            // The next block's rows, a line each per chunk: its 32 rows are 32 streams, more
            // than the hardware prefetcher follows.
            for r in 0..DECODE_ROWS {
                // Prefetching never faults; the address is only computed.
                _mm_prefetch::<_MM_HINT_T0>(q.as_ptr().wrapping_add((j0 + DECODE_ROWS + r) * cols + 64 * chunk));
            }
            // SAFETY: tiles configured on this thread; 32 rows of `cols` bytes from `wq`, two
            // B tiles of 1 KiB at chunk·2048, four C tiles in `c`.
            unsafe { q8_kernel(wq.as_ptr().add(64 * chunk), cols, x.tiles.as_ptr().add(2048 * chunk), c.0.as_mut_ptr()) };
            for half in 0..2 {
                let b = 2 * chunk + half;
                // SAFETY: AVX-512 (part of `available`); every read is inside `c`, `ws`, `x.scales`.
                unsafe {
                    let xs = _mm512_loadu_ps(x.scales.as_ptr().add(16 * b));
                    for (r, a) in acc.iter_mut().enumerate() {
                        // C tiles: rows 0..16 × (first, second block), rows 16..32 × (first, second).
                        let tile = 2 * (r / 16) + half;
                        let sums = _mm512_load_si512(c.0.as_ptr().add(256 * tile + 16 * (r % 16)) as *const __m512i);
                        let s = _mm512_mul_ps(_mm512_set1_ps(ws[r * blocks + b]), xs);
                        *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), s, *a);
                    }
                }
            }
        }
        for (r, a) in acc.iter().take(rows).enumerate() {
            let mut lanes = [0.0f32; 16];
            // SAFETY: 16 f32 into a 16-element array.
            unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), *a) };
            let j = j0 + r - first;
            out[j * x.m..(j + 1) * x.m].copy_from_slice(&lanes[..x.m]);
        }
    }
    Q8_SCRATCH.set((pad_q, pad_scale));
}

/// One 64-value chunk of 32 weight rows (`stride` bytes apart) against the two B tiles at `b`:
/// C tiles 0..4 at `c` (rows 0..16 × first block, × second, rows 16..32 × first, × second).
///
/// # Safety
/// Tiles configured on this thread; `a` readable for 32 rows of 64 bytes `stride` apart, `b` for
/// 2 KiB, `c` writable for 4 KiB.
#[inline(always)]
unsafe fn q8_kernel(a: *const i8, stride: usize, b: *const u8, c: *mut i32) {
    asm!(
        "tileloadd tmm4, [{a0} + {stride}*1]",
        "tileloadd tmm5, [{a1} + {stride}*1]",
        "tileloadd tmm6, [{b0} + {row}*1]",
        "tileloadd tmm7, [{b1} + {row}*1]",
        "tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3",
        "tdpbssd tmm0, tmm4, tmm6",
        "tdpbssd tmm1, tmm4, tmm7",
        "tdpbssd tmm2, tmm5, tmm6",
        "tdpbssd tmm3, tmm5, tmm7",
        "tilestored [{c0} + {row}*1], tmm0",
        "tilestored [{c1} + {row}*1], tmm1",
        "tilestored [{c2} + {row}*1], tmm2",
        "tilestored [{c3} + {row}*1], tmm3",
        a0 = in(reg) a, a1 = in(reg) a.add(16 * stride), stride = in(reg) stride,
        b0 = in(reg) b, b1 = in(reg) b.add(1024), row = in(reg) 64usize,
        c0 = in(reg) c, c1 = in(reg) c.add(256), c2 = in(reg) c.add(512), c3 = in(reg) c.add(768),
        options(nostack)
    );
}

// ---- Decode products of bf16 weights on AMX-BF16 tiles ----
//
// As for Q8_0 above: the weight's rows are the A operand straight from memory, the activations
// (rounded to bf16, as `vnni`'s bf16 products round them) are B, packed once per call, and the
// two C tiles accumulate over the whole depth.

/// Up to 16 activation rows as B tiles: per 32 values of depth one 1 KiB tile, whose row p holds
/// for each activation row i the bf16 pair at depths 2p, 2p + 1 (rows past `m` zero).
pub struct Bf16Rows {
    m: usize,
    cols: usize,
    tiles: AlignedVec<u16>,
}

impl Bf16Rows {
    pub fn new(x: &[f32], m: usize, cols: usize) -> Self {
        assert!((1..=16).contains(&m) && cols.is_multiple_of(KR) && x.len() == m * cols, "Bf16Rows: {m} rows of {cols}");
        let mut tiles = AlignedVec::zeroed(cols / KR * 512);
        for (i, row) in x.chunks_exact(cols).enumerate() {
            for (tile, block) in tiles.chunks_exact_mut(512).zip(row.chunks_exact(KR)) {
                for (p, pair) in block.chunks_exact(2).enumerate() {
                    tile[32 * p + 2 * i] = to_bf16(pair[0]);
                    tile[32 * p + 2 * i + 1] = to_bf16(pair[1]);
                }
            }
        }
        Bf16Rows { m, cols, tiles }
    }
}

thread_local! {
    static BF16_SCRATCH: Cell<AlignedVec<u16>> = const { Cell::new(AlignedVec::new()) };
}

/// `out[(j − first)·m + i] = W_j · x_i` for rows `first..first + n` of a bf16 weight `w` (`cols`
/// wide) and the activation rows of `x`. Call only when `available()`.
pub fn bf16_product(w: &[u16], cols: usize, first: usize, n: usize, x: &Bf16Rows, out: &mut [f32]) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    assert!(available() && x.cols == cols && out.len() == n * x.m && (first + n) * cols <= w.len());
    configure_tiles();
    let mut pad = BF16_SCRATCH.take();
    #[repr(C, align(64))]
    struct Sums([f32; 2 * 256]);
    let mut c = Sums([0.0; 2 * 256]);
    for j0 in (first..first + n).step_by(DECODE_ROWS) {
        let rows = DECODE_ROWS.min(first + n - j0);
        // A partial block runs on a copy padded with zero rows, so no tile reads past the weight.
        let a = if rows == DECODE_ROWS {
            &w[j0 * cols..(j0 + DECODE_ROWS) * cols]
        } else {
            pad.clear();
            pad.resize(DECODE_ROWS * cols);
            pad[..rows * cols].copy_from_slice(&w[j0 * cols..(j0 + rows) * cols]);
            &pad[..]
        };
        // SAFETY (all asm below): tiles configured on this thread; `a` is 32 rows of `cols`
        // values, read 32 at a time per step; the B operand has cols/32 tiles of 1 KiB; `c` holds
        // two C tiles. No code between the blocks uses tile registers.
        unsafe { asm!("tilezero tmm0", "tilezero tmm1", options(nostack, nomem)) };
        for step in 0..cols / KR {
            // The next block's rows, a line each per step (32 streams: more than the hardware
            // prefetcher follows).
            for r in 0..DECODE_ROWS {
                // SAFETY: prefetching never faults; the address is only computed.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(w.as_ptr().wrapping_add((j0 + DECODE_ROWS + r) * cols + KR * step) as *const i8) };
            }
            unsafe {
                asm!(
                    "tileloadd tmm6, [{b} + {row}*1]",
                    "tileloadd tmm4, [{a0} + {stride}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tileloadd tmm5, [{a1} + {stride}*1]",
                    "tdpbf16ps tmm1, tmm5, tmm6",
                    a0 = in(reg) a.as_ptr().add(KR * step), a1 = in(reg) a.as_ptr().add(16 * cols + KR * step),
                    stride = in(reg) 2 * cols, b = in(reg) x.tiles.as_ptr().add(512 * step), row = in(reg) 64usize,
                    options(nostack, readonly)
                )
            };
        }
        unsafe {
            asm!(
                "tilestored [{c0} + {row}*1], tmm0",
                "tilestored [{c1} + {row}*1], tmm1",
                c0 = in(reg) c.0.as_mut_ptr(), c1 = in(reg) c.0.as_mut_ptr().add(256), row = in(reg) 64usize,
                options(nostack)
            )
        };
        for r in 0..rows {
            let j = j0 + r - first;
            out[j * x.m..(j + 1) * x.m].copy_from_slice(&c.0[16 * r..16 * r + x.m]);
        }
    }
    BF16_SCRATCH.set(pad);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::matmul::matmul_naive;
    use crate::kernels::testutil::{assert_row_products, randn};
    use crate::rng::Rng;

    fn bf16_round(v: &[f32]) -> Vec<f32> {
        v.iter().map(|&x| f32::from_bits((to_bf16(x) as u32) << 16)).collect()
    }

    #[test]
    fn rounding_matches_half() {
        // 0x3F80_8000 and 0x3F81_8000 are halfway between two bf16 values (ties to even).
        let ties = [f32::from_bits(0x3F80_8000), f32::from_bits(0x3F81_8000)];
        for x in [0.0f32, -0.0, 1.0, ties[0], ties[1], -2.7, 1e-30, 6.5e4, 3.4e38] {
            assert_eq!(to_bf16(x), half::bf16::from_f32(x).to_bits(), "{x}");
        }
    }

    /// The tile products equal an f64 product of the bf16-rounded inputs, up to f32 summation.
    #[test]
    fn products_match_naive_on_bf16_inputs_in_both_weight_layouts() {
        if !available() {
            eprintln!("skipped: this CPU (or OS) has no AMX-BF16");
            return;
        }
        let mut rng = Rng::new(11);
        for &(m, n, k) in &[(1, 1, 1), (3, 5, 0), (5, 17, 3), (37, 70, 45), (64, 96, 64), (33, 33, 97), (130, 40, 576)] {
            let a = randn(&mut rng, m * k, 1.0);
            let w = randn(&mut rng, n * k, 1.0);
            let w16: Vec<u16> = w.iter().map(|&x| to_bf16(x)).collect();
            let (ar, wr) = (bf16_round(&a), bf16_round(&w));
            for acc in [false, true] {
                let c0 = randn(&mut rng, m * n, 1.0);
                // Nk: W is [n × k], product a·Wᵀ. Kn: the same values read as [k × n], product a·W.
                for (weight, w_t) in [(Weight::Nk(&w16), true), (Weight::Kn(&w16), false)] {
                    let (mut got, mut want) = (c0.clone(), c0.clone());
                    matmul_bf16(&mut got, &a, m, k, weight, n, 0.5, acc);
                    matmul_naive(&mut want, &ar, false, &wr, w_t, m, n, k, 0.5, acc);
                    let err = got.iter().zip(&want).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
                    assert!(err < 1e-5 * k as f32 + 1e-6, "({m},{n},{k}) w_t={w_t} acc={acc}: {err}");
                }
            }
        }
    }
    /// The Q8_0 tile product equals the f64 product of the weight's values and the activations
    /// quantized as `blocks::quantize_block`, across row offsets and a partial last block.
    #[test]
    fn q8_0_products_match_naive_on_quantized_rows() {
        if !int8_available() {
            eprintln!("skipped: no AMX-INT8");
            return;
        }
        use crate::kernels::blocks::{quantize_block, Row};
        use crate::model::frozen::{FrozenMatrix, WeightFormat};
        let mut rng = Rng::new(17);
        let (rows, cols) = (70, 128);
        let fm = FrozenMatrix::new(rows, cols, randn(&mut rng, rows * cols, 1.0), WeightFormat::Q8_0);
        let values = fm.to_f32();
        let Row::Q8_0 { scale, q } = fm.view() else { unreachable!("stored as Q8_0") };
        for m in [1, 5, 16] {
            let x = randn(&mut rng, m * cols, 1.0);
            let xr: Vec<f32> = x
                .chunks(BLOCK)
                .flat_map(|b| {
                    let (s, q) = quantize_block(b);
                    q.map(|v| s * v as f32)
                })
                .collect();
            let xt = Q8Rows::new(&x, m, cols);
            for (first, n) in [(0, rows), (5, 40), (38, 32)] {
                let mut out = vec![f32::NAN; n * m];
                q8_0_product(scale, q, cols, first, n, &xt, &mut out);
                assert_row_products(&out, &values, &xr, cols, first, n, m, "Q8_0 tiles");
            }
        }
    }
    /// The bf16 tile product equals the f64 product of the weight and the activations rounded to
    /// bf16, across row offsets and a partial last block.
    #[test]
    fn bf16_decode_products_match_naive_on_rounded_rows() {
        if !available() {
            eprintln!("skipped: no AMX-BF16");
            return;
        }
        let mut rng = Rng::new(19);
        let (rows, cols) = (70, 96);
        let w: Vec<u16> = randn(&mut rng, rows * cols, 1.0).iter().map(|&v| to_bf16(v)).collect();
        let values: Vec<f32> = w.iter().map(|&b| f32::from_bits((b as u32) << 16)).collect();
        for m in [1, 5, 16] {
            let x = randn(&mut rng, m * cols, 1.0);
            let (xt, xr) = (Bf16Rows::new(&x, m, cols), bf16_round(&x));
            for (first, n) in [(0, rows), (5, 40), (38, 32)] {
                let mut out = vec![f32::NAN; n * m];
                bf16_product(&w, cols, first, n, &xt, &mut out);
                assert_row_products(&out, &values, &xr, cols, first, n, m, "bf16 tiles");
            }
        }
    }
}
