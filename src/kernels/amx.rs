//! Matrix products against bf16 weights on Intel AMX tiles (Sapphire Rapids and later): bf16
//! inputs, f32 accumulation, 16×16×32 multiply-adds per instruction, so a product runs 3–4× faster
//! than the best f32 GEMM on the same cores. The activations are rounded to bf16 on the way in,
//! as in PyTorch's bf16 autocast; the weights are bf16 as stored, or a Q8_0/Q4_1 weight
//! dequantized and rounded to bf16 a few rows at a time as it is packed (`Weight::NkRows`,
//! `Weight::KnRows`).
//!
//! Shape of the computation: A (`[m × k]`, f32, converted to bf16 tiles padded to whole tiles) times
//! B (the weight, repacked per call into column panels of 16 in the VNNI layout the tile unit reads:
//! tile row j holds, for each of 16 columns, the bf16 pair at depths 2j and 2j+1). The microkernel
//! keeps a 32×32 block of C in four tile registers. Rust has no stable AMX intrinsics, so the tile
//! instructions are inline assembly; `available()` also asks Linux for the tile state
//! (arch_prctl ARCH_REQ_XCOMP_PERM), without which the first tile instruction would fault.
//!
//! Without AMX, `matmul_bf16` runs on the best vectors the CPU has (`product_unit`): AVX512-FP16
//! (`kernels::fp16`, its own packing), else AVX512-BF16 dot products over this module's packed
//! operands (`kernels::dpbf16`, in place of the tile microkernel).

use super::aligned::AlignedVec;
use super::bf16::{to_bf16, AsF32};
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

/// What runs `matmul_bf16`'s products on this CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProductUnit {
    /// AMX bf16 tiles.
    Tiles,
    /// AVX512-FP16 vectors, without AMX (`kernels::fp16`): other numerics, see there.
    Fp16,
    /// AVX512-BF16 dot products, with neither (`kernels::dpbf16`): the tiles' numerics.
    Bf16Dot,
}

impl ProductUnit {
    pub fn name(self) -> &'static str {
        match self {
            ProductUnit::Tiles => "amx",
            ProductUnit::Fp16 => "fp16",
            ProductUnit::Bf16Dot => "dpbf16",
        }
    }
}

/// The fastest unit this CPU has for `matmul_bf16`, or none (bf16 weights then take the f32 GEMM).
/// Each runs a product at about twice the f32 GEMM's rate or more where it was measured.
pub fn product_unit() -> Option<ProductUnit> {
    static UNIT: OnceLock<Option<ProductUnit>> = OnceLock::new();
    *UNIT.get_or_init(|| {
        if available() {
            Some(ProductUnit::Tiles)
        } else if super::fp16::available() {
            Some(ProductUnit::Fp16)
        } else if super::dpbf16::available() {
            Some(ProductUnit::Bf16Dot)
        } else {
            None
        }
    })
}

/// True when `matmul_bf16` runs here (`product_unit()` is some).
pub fn products_available() -> bool {
    product_unit().is_some()
}

/// True when the products round the activations to bf16 and sum in f32 (AMX tiles or AVX512-BF16
/// dot products), as PyTorch's bf16 does; false for fp16 vectors or no unit at all.
pub fn products_round_to_bf16() -> bool {
    matches!(product_unit(), Some(ProductUnit::Tiles | ProductUnit::Bf16Dot))
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

/// C (32×32 f32, rows `c_stride` bytes apart) `=` or, with `accumulate`, `+=` two groups of 16
/// A rows times two B panels, over `depth_steps` steps of 32 depth values; C's four tiles are
/// loaded (or zeroed), updated in the tile registers and stored back.
/// - A: row r of group g at `a[g] + r·a_row`, advancing `a_step` bytes per depth step. Row-major
///   bf16 rows are `a_row` = the row length in bytes and `a_step` = 64; `pack_a`'s tile order is
///   `a_row` = 64 and `a_step` = 1024 (each step's tile one contiguous KiB).
/// - B: two panels (`panels_nk` / `panels_kn`), 1 KiB per depth step.
///
/// # Safety
/// Tiles configured on this thread; the A rows, the panels' `depth_steps` KiB and C's 32 rows of
/// 128 bytes readable (C also writable) at the addresses above.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn microkernel(
    a: [*const u16; 2],
    a_row: usize,
    a_step: usize,
    b: [*const u16; 2],
    depth_steps: usize,
    c: *mut f32,
    c_stride: usize,
    accumulate: bool,
) {
    asm!(
        "test {acc}, {acc}",
        "jz 5f",
        "tileloadd tmm0, [{c00} + {c_stride}*1]",
        "tileloadd tmm1, [{c00} + {c_stride}*1 + 64]",
        "tileloadd tmm2, [{c10} + {c_stride}*1]",
        "tileloadd tmm3, [{c10} + {c_stride}*1 + 64]",
        "jmp 2f",
        "5:",
        "tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3",
        "2:",
        "tileloadd tmm4, [{a0} + {a_row}*1]",
        "tileloadd tmm6, [{b0} + {b_row}*1]",
        "tdpbf16ps tmm0, tmm4, tmm6",
        "tileloadd tmm7, [{b1} + {b_row}*1]",
        "tdpbf16ps tmm1, tmm4, tmm7",
        "tileloadd tmm5, [{a1} + {a_row}*1]",
        "tdpbf16ps tmm2, tmm5, tmm6",
        "tdpbf16ps tmm3, tmm5, tmm7",
        "add {a0}, {a_step}", "add {a1}, {a_step}", "add {b0}, 1024", "add {b1}, 1024",
        "dec {steps}", "jnz 2b",
        "tilestored [{c00} + {c_stride}*1], tmm0",
        "tilestored [{c00} + {c_stride}*1 + 64], tmm1",
        "tilestored [{c10} + {c_stride}*1], tmm2",
        "tilestored [{c10} + {c_stride}*1 + 64], tmm3",
        acc = in(reg) accumulate as usize,
        a0 = inout(reg) a[0] => _, a1 = inout(reg) a[1] => _, b0 = inout(reg) b[0] => _, b1 = inout(reg) b[1] => _,
        steps = inout(reg) depth_steps => _, a_row = in(reg) a_row, a_step = in(reg) a_step, b_row = in(reg) 64usize,
        c00 = in(reg) c, c10 = in(reg) c.byte_add(16 * c_stride),
        c_stride = in(reg) c_stride,
        options(nostack)
    );
}

/// One 32×32 block of C as `microkernel` computes it: on the tile unit (`tiles`), or on
/// AVX512-BF16 vectors (`dpbf16::block`, the same operands and result).
///
/// # Safety
/// As `microkernel`, with the tiles configured on this thread when `tiles`, AVX512-BF16 present
/// when not.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn block_product(
    tiles: bool,
    a: [*const u16; 2],
    a_row: usize,
    a_step: usize,
    b: [*const u16; 2],
    depth_steps: usize,
    c: *mut f32,
    c_stride: usize,
    accumulate: bool,
) {
    if tiles {
        microkernel(a, a_row, a_step, b, depth_steps, c, c_stride, accumulate)
    } else {
        super::dpbf16::block(a, a_row, a_step, b, depth_steps, c, c_stride, accumulate)
    }
}

/// The weight operand of `matmul_bf16`, bf16 bit patterns, row-major.
#[derive(Clone, Copy)]
pub enum Weight<'a> {
    /// `W [n × k]`: the product is `a · Wᵀ` (a linear layer's forward).
    Nk(&'a [u16]),
    /// `W [k × n]`: the product is `a · W` (a linear layer's input gradient).
    Kn(&'a [u16]),
    /// `W [n × k]` as `Nk`, given as a function that writes rows `first..first + out.len()/k` as
    /// bf16 into `out`: a compact (Q8_0/Q4_1) weight dequantized sixteen rows at a time as its
    /// panels are packed, so the bf16 matrix is never written out whole and read back.
    NkRows(&'a RowFill<'a>),
    /// `W [k × n]` as `Kn`, its rows (`n` values each) written by the function, 64 at a time.
    KnRows(&'a RowFill<'a>),
}

/// Writes bf16 rows of a weight from the given first row (see `Weight::NkRows`).
pub type RowFill<'a> = dyn Fn(usize, &mut [u16]) + Sync + 'a;

/// `c[m×n] = alpha · a[m×k] · op(W)` (`+ c` with `accumulate`), with `a` rounded to bf16 and the
/// products accumulated in f32; rows of `c` are `ldc` values apart and rows of `a` `lda` apart
/// (`n` and `k` for whole matrices; more for a block of columns of a wider one). Call only when
/// `products_available()`: the product runs on `product_unit()`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_bf16(
    c: &mut [f32],
    ldc: usize,
    a: &[f32],
    lda: usize,
    m: usize,
    k: usize,
    w: Weight,
    n: usize,
    alpha: f32,
    accumulate: bool,
) {
    let unit = product_unit().expect("matmul_bf16 needs AMX-BF16, AVX512-FP16 or AVX512-BF16");
    matmul_bf16_on(unit, c, ldc, a, lda, m, k, w, n, alpha, accumulate)
}

/// `matmul_bf16` on the given unit, which this CPU must have (tests run each one it has).
#[allow(clippy::too_many_arguments)]
fn matmul_bf16_on(
    unit: ProductUnit,
    c: &mut [f32],
    ldc: usize,
    a: &[f32],
    lda: usize,
    m: usize,
    k: usize,
    w: Weight,
    n: usize,
    alpha: f32,
    accumulate: bool,
) {
    assert!(ldc >= n && lda >= k, "matmul_bf16: strides {ldc}, {lda} below the widths {n}, {k}");
    if let Weight::Nk(wv) | Weight::Kn(wv) = w {
        assert_eq!(wv.len(), k * n, "matmul_bf16: weight has {} elements, expected {k}×{n}", wv.len());
    }
    if m == 0 || n == 0 {
        return;
    }
    assert!(c.len() >= (m - 1) * ldc + n, "matmul_bf16: c has {} elements, {m} rows of {n} {ldc} apart need more", c.len());
    assert!(a.len() >= (m - 1) * lda + k, "matmul_bf16: a has {} elements, {m} rows of {k} {lda} apart need more", a.len());
    if k == 0 {
        // (With no depth the microkernel's loop would not end.)
        if !accumulate {
            c.chunks_mut(ldc).take(m).for_each(|row| row[..n].fill(0.0));
        }
        return;
    }
    if unit == ProductUnit::Fp16 {
        return super::fp16::matmul(c, ldc, a, lda, m, k, w, n, alpha, accumulate);
    }
    let tiles = unit == ProductUnit::Tiles;
    assert!(if tiles { available() } else { super::dpbf16::available() }, "matmul_bf16: this CPU has no {unit:?}");
    let (mp, np, kp) = (m.next_multiple_of(MR), n.next_multiple_of(NR), k.next_multiple_of(KR));
    let mut a16 = A_SCRATCH.take();
    let mut b16 = B_SCRATCH.take();
    pack_a(a, lda, m, k, mp, kp, &mut a16);
    match w {
        Weight::Nk(w) => pack_nk(Rows::Stored(w), n, k, np, kp, &mut b16, true),
        Weight::NkRows(fill) => pack_nk(Rows::Filled(fill), n, k, np, kp, &mut b16, true),
        Weight::Kn(w) => pack_kn(w, k, n, np, kp, &mut b16, true),
        Weight::KnRows(fill) => pack_kn_filled(fill, k, n, np, kp, &mut b16),
    }
    multiply(tiles, c, ldc, &a16, m, kp, &b16, n, alpha, accumulate);
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

/// `a` as bf16 A tiles in the order the microkernel reads them: per group of 16 rows (`mp / 16`
/// groups, rows past `m` padding), its `kp / 32` tiles of 16 rows × 32 values, each 1 KiB —
/// so each operand of a product step is one contiguous KiB, like the B panels' tiles.
fn pack_a(a: &[f32], lda: usize, m: usize, k: usize, mp: usize, kp: usize, out: &mut AlignedVec<u16>) {
    prepare(out, mp * kp, k, kp);
    out.par_chunks_mut(kp * 16).enumerate().for_each(|(group, dst)| {
        for i in 0..16 {
            let r = group * 16 + i;
            if r >= m {
                continue;
            }
            let row = &a[r * lda..][..k];
            for (t, src) in row.chunks(KR).enumerate() {
                let tile_row = &mut dst[(t * 16 + i) * KR..][..src.len()];
                tile_row.iter_mut().zip(src).for_each(|(d, &s)| *d = to_bf16(s));
            }
        }
    });
}

/// Where `pack_nk` reads the weight's rows: stored bf16, or written panel by panel.
#[derive(Clone, Copy)]
enum Rows<'a> {
    Stored(&'a [u16]),
    Filled(&'a RowFill<'a>),
}

thread_local! {
    /// Sixteen rows of a weight `Rows::Filled` wrote for one panel.
    static PANEL_ROWS: Cell<Vec<u16>> = const { Cell::new(Vec::new()) };
}

/// Panels of 16 columns of `Wᵀ` for `W [n × k]`: in panel p, tile row j of depth block t holds
/// `W[16p + c][32t + 2j .. 32t + 2j + 2]` for c = 0..16 — 32-bit pairs of each weight row, transposed.
fn pack_nk(w: Rows, n: usize, k: usize, np: usize, kp: usize, out: &mut AlignedVec<u16>, parallel: bool) {
    prepare(out, np * kp, k, kp);
    let pack_panel = |(p, panel): (usize, &mut [u16])| {
        let rows = 16.min(n.saturating_sub(16 * p));
        if rows == 0 {
            return; // a padding panel: its values only reach dropped columns
        }
        let mut filled = PANEL_ROWS.take();
        // The panel's rows, row c at c·k.
        let src: &[u16] = match w {
            Rows::Stored(w) => &w[16 * p * k..(16 * p + rows) * k],
            Rows::Filled(fill) => {
                filled.resize(rows * k, 0);
                fill(16 * p, &mut filled);
                &filled
            }
        };
        for (t, tile) in panel.chunks_exact_mut(16 * KR).enumerate() {
            let depth = KR.min(k.saturating_sub(KR * t));
            if rows == 16 && depth == KR {
                // SAFETY: 16 rows of 32 values from column 32t exist in `src`; the tile has 512
                // values. AVX-512 is part of `available()` and `dpbf16::available()`.
                unsafe { transpose_16x16_32bit(src[KR * t..].as_ptr() as *const u8, 2 * k, tile.as_mut_ptr() as *mut u8, 64) };
            } else {
                for c in 0..rows {
                    let row = &src[c * k + KR * t..][..depth];
                    for (d, &v) in row.iter().enumerate() {
                        tile[(d / 2) * 32 + 2 * c + (d & 1)] = v;
                    }
                }
            }
        }
        PANEL_ROWS.set(filled);
    };
    if parallel {
        out.par_chunks_mut(16 * kp).enumerate().for_each(pack_panel);
    } else {
        out.chunks_mut(16 * kp).enumerate().for_each(pack_panel);
    }
}

/// A 16×16 transpose of 32-bit elements (unpack, then 128-bit lane shuffles): row r of `dst`
/// (rows `dst_stride` bytes apart) receives element r of each of the 16 rows of `src` (rows
/// `src_stride` bytes apart). One full tile of `pack_nk` is this transpose of 16 weight rows' value
/// pairs; attention transposes f32 blocks with it.
///
/// # Safety
/// 16 rows of 64 bytes readable at `src` and writable at `dst`; AVX-512F.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn transpose_16x16_32bit(src: *const u8, src_stride: usize, dst: *mut u8, dst_stride: usize) {
    use std::arch::x86_64::*;
    let r: [__m512i; 16] = std::array::from_fn(|i| _mm512_loadu_si512(src.add(i * src_stride) as *const _));
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
    let row = |r: usize| dst.add(r * dst_stride) as *mut __m512i;
    for q in 0..4 {
        let (x0, x1, x2, x3) = (u[q], u[4 + q], u[8 + q], u[12 + q]);
        let v0 = _mm512_shuffle_i32x4::<0b01_00_01_00>(x0, x1);
        let v1 = _mm512_shuffle_i32x4::<0b11_10_11_10>(x0, x1);
        let v2 = _mm512_shuffle_i32x4::<0b01_00_01_00>(x2, x3);
        let v3 = _mm512_shuffle_i32x4::<0b11_10_11_10>(x2, x3);
        _mm512_storeu_si512(row(q), _mm512_shuffle_i32x4::<0b10_00_10_00>(v0, v2));
        _mm512_storeu_si512(row(4 + q), _mm512_shuffle_i32x4::<0b11_01_11_01>(v0, v2));
        _mm512_storeu_si512(row(8 + q), _mm512_shuffle_i32x4::<0b10_00_10_00>(v1, v3));
        _mm512_storeu_si512(row(12 + q), _mm512_shuffle_i32x4::<0b11_01_11_01>(v1, v3));
    }
}

/// Panels of 16 columns of `W [k × n]`: in panel p, tile row j (over all depth) holds
/// `W[2j][16p + c], W[2j + 1][16p + c]` for c = 0..16 — two weight rows interleaved.
fn pack_kn(w: &[u16], k: usize, n: usize, np: usize, kp: usize, out: &mut AlignedVec<u16>, parallel: bool) {
    prepare(out, np * kp, k, kp);
    // Four panels per task: each weight row is then read 128 bytes (two cache lines) at a time.
    const PANELS: usize = 4;
    let pack_group = |(group, panels): (usize, &mut [u16])| {
        let c_first = PANELS * 16 * group;
        for j in 0..k.div_ceil(2) {
            for (i, panel) in panels.chunks_exact_mut(16 * kp).enumerate() {
                let (c0, cols) = (c_first + 16 * i, 16.min(n.saturating_sub(c_first + 16 * i)));
                if cols == 0 {
                    break; // padding panels
                }
                let r0 = &w[2 * j * n + c0..][..cols];
                let r1 = (2 * j + 1 < k).then(|| &w[(2 * j + 1) * n + c0..][..cols]);
                interleave_pair(r0, r1, &mut panel[32 * j..32 * j + 32]);
            }
        }
    };
    if parallel {
        out.par_chunks_mut(PANELS * 16 * kp).enumerate().for_each(pack_group);
    } else {
        out.chunks_mut(PANELS * 16 * kp).enumerate().for_each(pack_group);
    }
}

/// One tile row of a `pack_kn` panel: `r0[c], r1[c]` pairs for its columns (up to 16). Without
/// `r1` (an odd depth's last row) only the even positions are written; the odd ones keep the zeros
/// `prepare` left.
fn interleave_pair(r0: &[u16], r1: Option<&[u16]>, tile_row: &mut [u16]) {
    match r1 {
        None => r0.iter().enumerate().for_each(|(c, &v)| tile_row[2 * c] = v),
        // SAFETY: both row segments have 16 values and the tile row 32; AVX-512 is part of
        // `available()` and `dpbf16::available()`.
        Some(r1) if r0.len() == 16 => unsafe { interleave_16(r0, r1, tile_row) },
        Some(r1) => r0.iter().zip(r1).enumerate().for_each(|(c, (&a, &b))| (tile_row[2 * c], tile_row[2 * c + 1]) = (a, b)),
    }
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

/// `pack_kn`'s layout for a weight whose rows `fill` writes: in tasks of 64 rows (32 tile rows of
/// every panel), each task dequantizing its rows once and interleaving them into all panels.
fn pack_kn_filled(fill: &RowFill, k: usize, n: usize, np: usize, kp: usize, out: &mut AlignedVec<u16>) {
    const PAIRS: usize = 32;
    prepare(out, np * kp, k, kp);
    let shared = Shared(out.as_mut_ptr());
    let pairs = k.div_ceil(2);
    (0..pairs.div_ceil(PAIRS)).into_par_iter().for_each(|task| {
        let (j0, j1) = (task * PAIRS, ((task + 1) * PAIRS).min(pairs));
        let (first, last) = (2 * j0, (2 * j1).min(k));
        let mut rows = PANEL_ROWS.take();
        rows.resize((last - first) * n, 0);
        fill(first, &mut rows);
        for j in j0..j1 {
            let r0 = &rows[(2 * j - first) * n..][..n];
            let r1 = (2 * j + 1 < k).then(|| &rows[(2 * j + 1 - first) * n..][..n]);
            for p in 0..n.div_ceil(16) {
                let (c0, cols) = (16 * p, 16.min(n - 16 * p));
                // SAFETY: tile row j of panel p, 32 values at p·16·kp + 32·j inside `out`
                // (np·kp values, j < kp/2); only the task with row pair j writes it.
                let tile_row = unsafe { std::slice::from_raw_parts_mut(shared.at(p * 16 * kp + 32 * j), 32) };
                interleave_pair(&r0[c0..c0 + cols], r1.map(|r1| &r1[c0..c0 + cols]), tile_row);
            }
        }
        PANEL_ROWS.set(rows);
    });
}

/// A pointer into an output that may cross to rayon workers: each task writes its own part (a
/// column of C blocks in `multiply`, a range of tile rows in `pack_kn_filled`).
#[derive(Clone, Copy)]
struct Shared<T>(*mut T);

impl<T> Shared<T> {
    /// A method, not a field access, so closures capture the whole `Sync` wrapper.
    fn at(&self, offset: usize) -> *mut T {
        self.0.wrapping_add(offset)
    }
}
// SAFETY: tasks write disjoint parts (see the users).
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}

/// Rows of A per pass of `multiply`: a pass's packed rows (576 KiB at a depth of 576) stay in a
/// core's second-level cache (2 MiB) while the weight panels stream past them once. (Passes sized
/// to the depth, 1 MiB of packed rows each, were tried: +4% on the 1.1B shapes of `bench gemm`
/// over four alternating pairs, within the noise, and the same 8B training step, 76.5 s against
/// 75.9; each extra pass streams the whole weight again.)
const PASS_ROWS: usize = 512;

/// Depth per chunk of `multiply`: a pair of weight panels over this depth (16 KiB) stays in the
/// first-level cache (48 KiB) while a pass's A tiles stream past it from the second level, so a
/// product step loads one of its two operands from L1. Measured against the whole depth at once,
/// in alternating whole-process pairs of the training benchmark, it changed nothing beyond the
/// noise (0.99× at 4×128, 0.98× at 4×512): on this VM the tile unit's own rate set the pace.
const DEPTH_CHUNK: usize = 256;

thread_local! {
    /// One task's column of C blocks, 32×32 f32 each (rows 128 bytes apart), accumulated over the
    /// depth chunks in the tile registers' own layout before it goes to `c`.
    static C_SCRATCH: Cell<AlignedVec<f32>> = const { Cell::new(AlignedVec::new()) };
}

/// `c = alpha · a16 · b16` (or `c += …`), in passes of `PASS_ROWS` rows; within a pass one rayon
/// task per pair of panels (32 columns of C) runs the depth chunks over all the pass's row blocks,
/// then writes its column of C. Each 32×32 block goes to the tile microkernel (`tiles`) or to its
/// AVX512-BF16 counterpart, `dpbf16::block`, on the same packed operands.
#[allow(clippy::too_many_arguments)]
fn multiply(tiles: bool, c: &mut [f32], ldc: usize, a16: &[u16], m: usize, kp: usize, b16: &[u16], n: usize, alpha: f32, accumulate: bool) {
    let (m_blocks, n_blocks) = (m.div_ceil(MR), n.div_ceil(NR));
    let shared = Shared(c.as_mut_ptr());
    for first in (0..m_blocks).step_by(PASS_ROWS / MR) {
        let blocks = (PASS_ROWS / MR).min(m_blocks - first);
        (0..n_blocks).into_par_iter().for_each(|nb| {
            if tiles {
                configure_tiles();
            }
            let mut scratch = C_SCRATCH.take();
            scratch.resize(blocks * MR * NR);
            for d0 in (0..kp).step_by(DEPTH_CHUNK) {
                let steps = DEPTH_CHUNK.min(kp - d0) / KR;
                // Tile t of A group g is at g·16·kp + 512·t values, of panel p at p·16·kp + 512·t.
                let panel = |p: usize| b16[p * 16 * kp + 16 * d0..][..16 * (kp - d0)].as_ptr();
                for (i, block) in scratch.chunks_exact_mut(MR * NR).enumerate() {
                    let group = |g: usize| a16[g * 16 * kp + 16 * d0..][..16 * (kp - d0)].as_ptr();
                    let mb = first + i;
                    let (a, b) = ([group(2 * mb), group(2 * mb + 1)], [panel(2 * nb), panel(2 * nb + 1)]);
                    // SAFETY: tiles configured above (or AVX512-BF16 checked by the caller); each A
                    // group and panel holds `steps` tiles of 1 KiB from depth d0 (the slices above
                    // are checked), `block` is 32 rows of 32 f32.
                    unsafe { block_product(tiles, a, 64, 1024, b, steps, block.as_mut_ptr(), 4 * NR, d0 > 0) };
                }
            }
            let cols = (n - nb * NR).min(NR);
            for (i, block) in scratch.chunks_exact(MR * NR).enumerate() {
                let mb = first + i;
                for (r, src) in block.chunks_exact(NR).take((m - mb * MR).min(MR)).enumerate() {
                    // SAFETY: row mb·32 + r < m and columns nb·32 .. +cols ≤ n lie in `c` (its length
                    // was checked against the stride), and only this task writes columns nb·32 .. +32.
                    let dst = unsafe { std::slice::from_raw_parts_mut(shared.at((mb * MR + r) * ldc + nb * NR), cols) };
                    if accumulate {
                        dst.iter_mut().zip(src).for_each(|(d, s)| *d += alpha * s);
                    } else {
                        dst.iter_mut().zip(src).for_each(|(d, s)| *d = alpha * s);
                    }
                }
            }
            C_SCRATCH.set(scratch);
        });
    }
}

// ---- Serial products on operands the caller packs and reuses (attention) ----
//
// Attention multiplies many small matrices per head (a tile of queries against its keys), each
// operand reused across several products: packing inside `matmul_bf16` per call, and its rayon
// tasks inside the caller's own parallel loop over heads, would cost more than the products.
// These functions run on the calling thread; the operands are whole tiles (multiples of 32 in
// every dimension, zero padding), and results go straight from the tile registers to memory.
// Where `product_unit()` is AVX512-BF16 instead of AMX, `tile_product` runs each block on those
// vectors (`dpbf16::block`), so the callers check `products_round_to_bf16()`.

/// `rows × cols` f32 values (row `i` from `a[i·lda]`) as bf16 rows of `cols_p` values into `out`,
/// `rows_p` rows; the padding is zero.
#[allow(clippy::too_many_arguments)]
pub(crate) fn bf16_rows_into<T: AsF32>(
    a: &[T],
    lda: usize,
    rows: usize,
    cols: usize,
    rows_p: usize,
    cols_p: usize,
    out: &mut AlignedVec<u16>,
) {
    assert!(rows <= rows_p && cols <= cols_p && cols <= lda && (rows == 0 || (rows - 1) * lda + cols <= a.len()));
    out.resize(rows_p * cols_p);
    for (i, dst) in out.chunks_exact_mut(cols_p).enumerate() {
        if i < rows {
            dst[..cols].iter_mut().zip(&a[i * lda..i * lda + cols]).for_each(|(d, &x)| *d = x.as_bf16());
            dst[cols..].fill(0);
        } else {
            dst.fill(0);
        }
    }
}

/// The transpose of `a` (`[rows × cols]`, row-major) as bf16: `cols` rows of `stride` values,
/// `out[j·stride + i] = a[i·cols + j]`; the values past `rows` in each row are zero.
pub(crate) fn bf16_transposed_into(a: &[f32], rows: usize, cols: usize, stride: usize, out: &mut AlignedVec<u16>) {
    assert!(products_round_to_bf16() && rows <= stride && a.len() == rows * cols);
    out.resize(cols * stride);
    let whole = rows - rows % 16;
    let mut block = [0.0f32; 256];
    for i0 in (0..whole).step_by(16) {
        for j0 in (0..cols - cols % 16).step_by(16) {
            // SAFETY: rows i0..i0 + 16 of `a` hold columns j0..j0 + 16; `block` is 16 rows of
            // 64 bytes; AVX-512 is part of `products_round_to_bf16()` (asserted above).
            unsafe { transpose_16x16_32bit(a[i0 * cols + j0..].as_ptr() as *const u8, 4 * cols, block.as_mut_ptr() as *mut u8, 64) };
            for (r, src) in block.chunks_exact(16).enumerate() {
                out[(j0 + r) * stride + i0..][..16].iter_mut().zip(src).for_each(|(d, &x)| *d = to_bf16(x));
            }
        }
    }
    // The edges the blocks left: the last rows whole, the other rows' last columns.
    for (i, row) in a.chunks_exact(cols).enumerate() {
        let first = if i < whole { cols - cols % 16 } else { 0 };
        for (j, &x) in row.iter().enumerate().skip(first) {
            out[j * stride + i] = to_bf16(x);
        }
    }
    for dst in out.chunks_exact_mut(stride) {
        dst[rows..].fill(0);
    }
}

/// `dst[j·dst_stride + i] = src[i·src_stride + j]` for `i < rows`, `j < cols`: an f32 transpose.
pub(crate) fn transpose_f32(src: &[f32], src_stride: usize, rows: usize, cols: usize, dst: &mut [f32], dst_stride: usize) {
    assert!(products_round_to_bf16() && cols <= src_stride && rows <= dst_stride);
    assert!(rows == 0 || cols == 0 || ((rows - 1) * src_stride + cols <= src.len() && (cols - 1) * dst_stride + rows <= dst.len()));
    let (whole_rows, whole_cols) = (rows - rows % 16, cols - cols % 16);
    for i0 in (0..whole_rows).step_by(16) {
        for j0 in (0..whole_cols).step_by(16) {
            // SAFETY: the asserts keep 16 rows of 16 values from (i0, j0) in `src` and from
            // (j0, i0) in `dst`; AVX-512 is part of `products_round_to_bf16()` (asserted above).
            unsafe {
                transpose_16x16_32bit(
                    src[i0 * src_stride + j0..].as_ptr() as *const u8,
                    4 * src_stride,
                    dst[j0 * dst_stride + i0..].as_mut_ptr() as *mut u8,
                    4 * dst_stride,
                )
            };
        }
    }
    for i in 0..rows {
        for j in if i < whole_rows { whole_cols } else { 0 }..cols {
            dst[j * dst_stride + i] = src[i * src_stride + j];
        }
    }
}

/// `w` (`[n × k]` bf16, both multiples of 32) as B panels for products with `wᵀ`: `n / 16`
/// panels of `16·k` values (the `Weight::Nk` layout of `matmul_bf16`).
pub(crate) fn panels_nk(w: &[u16], n: usize, k: usize, out: &mut AlignedVec<u16>) {
    assert!(n.is_multiple_of(NR) && k.is_multiple_of(KR) && w.len() == n * k);
    pack_nk(Rows::Stored(w), n, k, n, k, out, false);
}

/// `w` (`[k × n]` bf16, both multiples of 32) as B panels for products with `w`: `n / 16`
/// panels of `16·k` values (the `Weight::Kn` layout).
pub(crate) fn panels_kn(w: &[u16], k: usize, n: usize, out: &mut AlignedVec<u16>) {
    assert!(n.is_multiple_of(NR) && k.is_multiple_of(KR) && w.len() == k * n);
    pack_kn(w, k, n, n, k, out, false);
}

/// `panels_kn` of `rows` rows of `n` f32 values (`stride` apart) rounded to bf16, with zero rows
/// up to the depth `k` (a multiple of 32): the conversion and the packing in one pass.
pub(crate) fn panels_kn_f32(w: &[f32], stride: usize, rows: usize, k: usize, n: usize, out: &mut AlignedVec<u16>) {
    assert!(products_round_to_bf16() && n.is_multiple_of(NR) && k.is_multiple_of(KR) && rows <= k && n <= stride);
    assert!(rows == 0 || (rows - 1) * stride + n <= w.len());
    out.resize(n * k);
    let row_bf16 = |r: usize, c0: usize| -> [u16; 16] {
        if r < rows {
            std::array::from_fn(|c| to_bf16(w[r * stride + c0 + c]))
        } else {
            [0; 16]
        }
    };
    for j in 0..k / 2 {
        for p in 0..n / 16 {
            let (r0, r1) = (row_bf16(2 * j, 16 * p), row_bf16(2 * j + 1, 16 * p));
            // SAFETY: two rows of 16 values and a tile row of 32; AVX-512 is part of
            // `products_round_to_bf16()` (asserted above).
            unsafe { interleave_16(&r0, &r1, &mut out[p * 16 * k + 32 * j..][..32]) };
        }
    }
}

/// `c = a · b`, or `c += a · b` with `accumulate`, on this thread, over whole 32×32 blocks:
/// - `a`: `mp` rows of bf16 `a_stride` values apart, each read for `depth` values;
/// - `b`: `np / 16` panels (`panels_nk` / `panels_kn`) `panel_stride` values apart, each read for
///   the first `depth` of its depth (so a panel packed deeper serves a shallower product);
/// - `c`: `mp × np` f32, rows `ldc` apart.
///
/// `mp`, `np` and `depth` are multiples of 32. Rows of `a` and `c` should start on 64-byte
/// boundaries (`AlignedVec` with strides of whole cache lines): tile loads from other addresses
/// are about 7× slower.
#[allow(clippy::too_many_arguments)]
pub(crate) fn tile_product(
    c: &mut [f32],
    ldc: usize,
    a: &[u16],
    a_stride: usize,
    mp: usize,
    b: &[u16],
    panel_stride: usize,
    np: usize,
    depth: usize,
    accumulate: bool,
) {
    assert!(products_round_to_bf16(), "tile_product needs AMX-BF16 or AVX512-BF16");
    assert!(mp.is_multiple_of(MR) && np.is_multiple_of(NR) && depth.is_multiple_of(KR) && depth > 0, "tile_product: {mp}×{np}×{depth}");
    if mp == 0 || np == 0 {
        return;
    }
    assert!(depth <= a_stride && (mp - 1) * a_stride + depth <= a.len(), "tile_product: a too short");
    assert!(16 * depth <= panel_stride && (np / 16 - 1) * panel_stride + 16 * depth <= b.len(), "tile_product: b too short");
    assert!(np <= ldc && (mp - 1) * ldc + np <= c.len(), "tile_product: c too short");
    let tiles = available();
    if tiles {
        configure_tiles();
    }
    for mb in 0..mp / MR {
        for nb in 0..np / NR {
            // SAFETY: tiles configured (or AVX512-BF16 present: `products_round_to_bf16`); the
            // asserts above keep 32 rows of `depth` values of `a`
            // from row 32·mb, two panels' first `16·depth` values from panel 2·nb, and 32 rows of
            // 32 values of `c` from (32·mb, 32·nb) inside their slices.
            unsafe {
                let groups = [a.as_ptr().add(mb * MR * a_stride), a.as_ptr().add((mb * MR + 16) * a_stride)];
                let panels = [b.as_ptr().add(2 * nb * panel_stride), b.as_ptr().add((2 * nb + 1) * panel_stride)];
                let block = c.as_mut_ptr().add(mb * MR * ldc + nb * NR);
                block_product(tiles, groups, 2 * a_stride, 64, panels, depth / KR, block, 4 * ldc, accumulate)
            };
        }
    }
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
                let mut bytes = [0u32; BLOCK / 4];
                // SAFETY: 16 lanes of 32-bit values into 16 bytes each.
                unsafe {
                    use std::arch::x86_64::*;
                    _mm_storeu_si128(bytes.as_mut_ptr() as *mut __m128i, _mm512_cvtepi32_epi8(q[0]));
                    _mm_storeu_si128(bytes.as_mut_ptr().add(4) as *mut __m128i, _mm512_cvtepi32_epi8(q[1]));
                }
                rows.scales[b * 16 + i] = scale;
                // Block b is half b % 2 of chunk b / 2: tile (b / 2)·2 + b % 2, rows from 8·(b % 2);
                // row r holds, for each activation row i, its values 4r..4r + 4 as one u32.
                let tile = &mut rows.tiles[b * 1024..(b + 1) * 1024];
                for (r, &four) in bytes.iter().enumerate() {
                    tile[(8 * (b % 2) + r) * 64 + 4 * i..][..4].copy_from_slice(&four.to_ne_bytes());
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
///
/// Software-pipelined over the 64-value chunks of each 32-row block: the tile products of chunk
/// k are issued, then the vector pass scales chunk k − 1's sums (stored by the tiles one chunk
/// earlier, in the other of two slots), so the tile unit and the vector units work at once. With
/// the vector pass after every eight chunks instead, 16-row SmolLM2 products took 230–400 ns per
/// 32×64 chunk against 150–330 ns this way (one thread, alternating runs).
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn q8_0_product_avx512(scale: &[f32], q: &[i8], cols: usize, first: usize, n: usize, x: &Q8Rows, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let blocks = cols / BLOCK;
    assert!(x.cols == cols && out.len() == n * x.m && (first + n) * cols <= q.len() && (first + n) * blocks <= scale.len());
    configure_tiles();
    let (mut pad_q, mut pad_scale) = Q8_SCRATCH.take();
    // Two slots of four C tiles; every slot is written by the tiles before the vector pass
    // reads it, so it needs no initial value.
    #[repr(C, align(64))]
    struct Sums([i32; 2 * 1024]);
    let mut sums = std::mem::MaybeUninit::<Sums>::uninit();
    let slots = sums.as_mut_ptr() as *mut i32;
    let chunks = cols / 64;
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
        // The next block's rows, prefetched a line each per chunk: its 32 rows are 32 streams,
        // more than the hardware prefetcher follows. Not past this call's rows.
        let ahead = (first + n).saturating_sub(j0 + DECODE_ROWS).min(DECODE_ROWS);
        let mut acc = [_mm512_setzero_ps(); DECODE_ROWS];
        for chunk in 0..=chunks {
            if chunk < chunks {
                for r in 0..ahead {
                    _mm_prefetch::<_MM_HINT_T0>(q.as_ptr().add((j0 + DECODE_ROWS + r) * cols + 64 * chunk));
                }
                // SAFETY: tiles configured on this thread; 32 rows of `cols` bytes from `wq`, two
                // B tiles of 1 KiB at chunk·2048, four C tiles into slot chunk % 2.
                unsafe { q8_kernel(wq.as_ptr().add(64 * chunk), cols, x.tiles.as_ptr().add(2048 * chunk), slots.add(1024 * (chunk % 2))) };
            }
            let Some(done) = chunk.checked_sub(1) else { continue };
            // C tiles of a slot: rows 0..16 × (first, second block), rows 16..32 × (first, second).
            let slot = slots.add(1024 * (done % 2));
            let b = 2 * done;
            let x_scale = [_mm512_loadu_ps(x.scales.as_ptr().add(16 * b)), _mm512_loadu_ps(x.scales.as_ptr().add(16 * (b + 1)))];
            for (r, a) in acc.iter_mut().enumerate() {
                let row = slot.add(512 * (r / 16) + 16 * (r % 16));
                let mut sum = *a;
                for (half, &x_scale) in x_scale.iter().enumerate() {
                    // SAFETY: inside the slot just stored, `ws` and `x.scales`.
                    let block = _mm512_cvtepi32_ps(_mm512_load_si512(row.add(256 * half) as *const __m512i));
                    let s = _mm512_mul_ps(_mm512_set1_ps(*ws.get_unchecked(r * blocks + b + half)), x_scale);
                    sum = _mm512_fmadd_ps(block, s, sum);
                }
                *a = sum;
            }
        }
        let lanes = (1u32 << x.m) - 1;
        for (r, a) in acc.iter().take(rows).enumerate() {
            let j = j0 + r - first;
            // SAFETY: the first m lanes into out[j·m..(j + 1)·m], inside `out` (asserted above).
            unsafe { _mm512_mask_storeu_ps(out.as_mut_ptr().add(j * x.m), lanes as __mmask16, *a) };
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
        v.iter().map(|&x| super::super::bf16::to_f32(to_bf16(x))).collect()
    }

    /// The units with the tiles' numerics that this CPU has: AMX tiles, AVX512-BF16 vectors.
    fn bf16_units() -> Vec<ProductUnit> {
        let units = [(available(), ProductUnit::Tiles), (super::super::dpbf16::available(), ProductUnit::Bf16Dot)];
        let here: Vec<ProductUnit> = units.iter().filter(|(has, _)| *has).map(|&(_, unit)| unit).collect();
        if here.is_empty() {
            eprintln!("skipped: this CPU (or OS) has neither AMX-BF16 nor AVX512-BF16");
        }
        here
    }

    /// With row strides the product reads a block of columns of a wider A and writes a block of
    /// columns of a wider C, leaving the columns around it as they were.
    #[test]
    fn strided_products_touch_only_their_block() {
        for unit in bf16_units() {
            strided_products_on(unit);
        }
    }

    fn strided_products_on(unit: ProductUnit) {
        let mut rng = Rng::new(12);
        let (m, n, k, lda, ldc, a_at, c_at) = (45, 40, 70, 83, 57, 9, 11);
        let a_wide = randn(&mut rng, m * lda, 1.0);
        let w = randn(&mut rng, n * k, 1.0);
        let w16: Vec<u16> = w.iter().map(|&x| to_bf16(x)).collect();
        let wr = bf16_round(&w);
        let a: Vec<f32> = a_wide.chunks(lda).flat_map(|row| bf16_round(&row[a_at..a_at + k])).collect();
        for acc in [false, true] {
            let c0 = randn(&mut rng, m * ldc, 1.0);
            let mut got = c0.clone();
            matmul_bf16_on(unit, &mut got[c_at..], ldc, &a_wide[a_at..], lda, m, k, Weight::Nk(&w16), n, 1.0, acc);
            let mut want: Vec<f32> = c0.chunks(ldc).flat_map(|row| row[c_at..c_at + n].to_vec()).collect();
            matmul_naive(&mut want, &a, false, &wr, true, m, n, k, 1.0, acc);
            for (i, (g, c)) in got.chunks(ldc).zip(c0.chunks(ldc)).enumerate() {
                assert_eq!(&g[..c_at], &c[..c_at], "row {i}: columns before the block changed");
                assert_eq!(&g[c_at + n..], &c[c_at + n..], "row {i}: columns after the block changed");
                let err = g[c_at..c_at + n].iter().zip(&want[i * n..]).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
                assert!(err < 1e-5 * k as f32 + 1e-6, "{unit:?} row {i} acc={acc}: {err}");
            }
        }
    }

    /// The tile products equal an f64 product of the bf16-rounded inputs, up to f32 summation.
    #[test]
    fn products_match_naive_on_bf16_inputs_in_both_weight_layouts() {
        for unit in bf16_units() {
            products_match_naive_on(unit);
        }
    }

    fn products_match_naive_on(unit: ProductUnit) {
        let mut rng = Rng::new(11);
        // (600, 70, 300): two passes of rows, and depth chunks of 256 and 44 (padded to 64).
        for &(m, n, k) in &[(1, 1, 1), (3, 5, 0), (5, 17, 3), (37, 70, 45), (64, 96, 64), (33, 33, 97), (130, 40, 576), (600, 70, 300)] {
            let a = randn(&mut rng, m * k, 1.0);
            let w = randn(&mut rng, n * k, 1.0);
            let w16: Vec<u16> = w.iter().map(|&x| to_bf16(x)).collect();
            let (ar, wr) = (bf16_round(&a), bf16_round(&w));
            for acc in [false, true] {
                let c0 = randn(&mut rng, m * n, 1.0);
                // Nk: W is [n × k], product a·Wᵀ. Kn: the same values read as [k × n], product a·W.
                for (weight, w_t) in [(Weight::Nk(&w16), true), (Weight::Kn(&w16), false)] {
                    let (mut got, mut want) = (c0.clone(), c0.clone());
                    matmul_bf16_on(unit, &mut got, n, &a, k, m, k, weight, n, 0.5, acc);
                    matmul_naive(&mut want, &ar, false, &wr, w_t, m, n, k, 0.5, acc);
                    let err = got.iter().zip(&want).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
                    assert!(err < 1e-5 * k as f32 + 1e-6, "{unit:?} ({m},{n},{k}) w_t={w_t} acc={acc}: {err}");
                }
            }
        }
    }
    /// The serial pieces attention builds on: bf16 rows and transposes with their zero padding,
    /// the f32 transpose, and `tile_product` on both panel layouts with strides, a panel packed
    /// deeper than the product reads, and accumulation.
    #[test]
    fn serial_tile_pieces_match_naive() {
        if !products_round_to_bf16() {
            return;
        }
        let mut rng = Rng::new(4);
        let (rows, cols) = (37, 48);
        let a = randn(&mut rng, rows * cols, 1.0);
        let ar = bf16_round(&a);
        let mut t = AlignedVec::new();
        bf16_transposed_into(&a, rows, cols, 64, &mut t);
        let mut r = AlignedVec::new();
        bf16_rows_into(&a, cols, rows, 40, 64, 64, &mut r);
        for i in 0..64 {
            for j in 0..64 {
                let inside = i < rows && j < cols;
                let at = |v: &AlignedVec<u16>, x: usize| f32::from_bits((v[x] as u32) << 16);
                if j < cols {
                    assert_eq!(at(&t, j * 64 + i), if inside { ar[i * cols + j] } else { 0.0 });
                }
                assert_eq!(at(&r, i * 64 + j), if i < rows && j < 40 { ar[i * cols + j] } else { 0.0 });
            }
        }
        let (mut direct, mut two_step) = (AlignedVec::new(), AlignedVec::new());
        panels_kn_f32(&a, cols, rows, 64, 32, &mut direct);
        bf16_rows_into(&a, cols, rows, 32, 64, 32, &mut r);
        panels_kn(&r, 64, 32, &mut two_step);
        assert_eq!(&direct[..], &two_step[..]);
        let mut back = vec![0.0; cols * 40];
        transpose_f32(&a, cols, rows, cols, &mut back, 40);
        assert!((0..rows).all(|i| (0..cols).all(|j| back[j * 40 + i] == a[i * cols + j])));

        // c[64 × 96] (row stride 100) = or += x[64 × 32 of a 40-wide row] · op(w), w packed to depth 64.
        let (m, n, depth) = (64, 96, 32);
        let x = bf16_round(&randn(&mut rng, m * 40, 1.0));
        let x16: Vec<u16> = x.iter().map(|&v| to_bf16(v)).collect();
        let mut xa = AlignedVec::new();
        xa.resize(m * 64);
        for i in 0..m {
            xa[i * 64..i * 64 + 40].copy_from_slice(&x16[i * 40..(i + 1) * 40]);
        }
        let w = bf16_round(&randn(&mut rng, n * 64, 1.0));
        let w16: Vec<u16> = w.iter().map(|&v| to_bf16(v)).collect();
        let xd: Vec<f32> = (0..m).flat_map(|i| x[i * 40..i * 40 + depth].to_vec()).collect();
        for nk in [true, false] {
            let mut panels = AlignedVec::new();
            // Nk: w is [n × 64], the product x·wᵀ over its first `depth` columns; Kn: [64 × n], x·w over its first rows.
            let wd: Vec<f32> = if nk {
                panels_nk(&w16, n, 64, &mut panels);
                (0..n).flat_map(|j| w[j * 64..j * 64 + depth].to_vec()).collect()
            } else {
                panels_kn(&w16, 64, n, &mut panels);
                w[..depth * n].to_vec()
            };
            for acc in [false, true] {
                let mut c = AlignedVec::<f32>::new();
                c.resize(m * 100);
                c.iter_mut().enumerate().for_each(|(i, v)| *v = (i % 7) as f32);
                let before = c.to_vec();
                tile_product(&mut c, 100, &xa, 64, m, &panels, 16 * 64, n, depth, acc);
                let mut want = vec![0.0; m * n];
                matmul_naive(&mut want, &xd, false, &wd, nk, m, n, depth, 1.0, false);
                for i in 0..m {
                    for j in 0..100 {
                        let (got, old) = (c[i * 100 + j], before[i * 100 + j]);
                        let expect = if j < n { want[i * n + j] + if acc { old } else { 0.0 } } else { old };
                        assert!((got - expect).abs() < 1e-4, "nk={nk} acc={acc} ({i},{j}): {got} vs {expect}");
                    }
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
        // 128 columns: two chunks, the pipeline's shortest; 640: ten.
        for (rows, cols) in [(70, 128), (70, 640)] {
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
