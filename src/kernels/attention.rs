//! Causal grouped-query attention, head-major, with key padding mask and optional sliding window.
//!
//! Forward keeps only the log-sum-exp of each query row; backward recomputes the probabilities
//! from it (as flash attention does), so no `[seq × seq]` matrix outlives one query row.

use super::bf16::AsF32;
use super::dot::{dot, Operand};
use rayon::prelude::*;

/// Shapes and masking rules of one attention call. Query `i` sits at absolute position
/// `q_offset + i`; key `j` at position `j`. A key is visible when it is not in the future, not
/// padding (`key_mask[b·kv_stride + j]`), and, with a window `w`, fewer than `w` positions back.
/// Keys and values are `[batch, kv_heads, kv_stride, head_dim]` of which the first `kv_len`
/// positions are used (`kv_stride` > `kv_len` for a KV cache with room to grow). With `tiles`, the
/// products of many queries run on AMX bf16 tiles, or their AVX512-BF16 counterpart, where the
/// CPU has them (`attention_tiles`): set for a base whose linear products round to bf16 there already.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub q_len: usize,
    pub kv_len: usize,
    pub kv_stride: usize,
    pub head_dim: usize,
    pub q_offset: usize,
    pub window: Option<usize>,
    pub tiles: bool,
}

impl AttnShape {
    pub(super) fn group(&self) -> usize {
        assert!(self.kv_heads > 0 && self.heads.is_multiple_of(self.kv_heads), "heads must be a multiple of kv_heads");
        self.heads / self.kv_heads
    }

    /// The contiguous key range query `i` may see (before the padding mask).
    fn key_range(&self, i: usize) -> std::ops::Range<usize> {
        let pos = self.q_offset + i;
        let hi = (pos + 1).min(self.kv_len);
        let lo = match self.window {
            Some(w) => (pos + 1).saturating_sub(w),
            None => 0,
        };
        lo.min(hi)..hi
    }
}

#[inline]
fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    for (a, &b) in y.iter_mut().zip(x) {
        *a += alpha * b;
    }
}

/// `out = softmax(q·kᵀ·scale + mask)·v` per head; `lse` receives each row's log-sum-exp
/// (−∞ for a row that sees no key, whose output is zero). Keys and values in f32, or in bf16 (a
/// KV cache kept in bf16).
pub fn attention_forward<T: Operand>(q: &[f32], k: &[T], v: &[T], key_mask: &[bool], s: AttnShape, out: &mut [f32], lse: &mut [f32]) {
    let _timer = crate::profile::time(crate::profile::Phase::Attention);
    if s.q_len >= GEMM_MIN_QUERIES {
        #[cfg(target_arch = "x86_64")]
        if s.tiles && super::attention_tiles::usable(&s) {
            return super::attention_tiles::forward(q, k, v, key_mask, s, out, lse);
        }
        // (bf16 keys and values take this path only where tiles cannot run: expanded, whole.)
        forward_gemm(q, &T::f32s(k), &T::f32s(v), key_mask, s, out, lse)
    } else {
        forward_rows(q, k, v, key_mask, s, out, lse)
    }
}

/// From this many queries on, attention runs as per-head GEMMs over a `[q_len × kv_len]` score
/// tile; below it (decoding), row by row.
const GEMM_MIN_QUERIES: usize = 16;

/// Row-by-row forward: one query's scores at a time (decoding, and prompts too short for the
/// per-head GEMMs). One task per (sequence, KV head) runs the query heads of its group together,
/// a block of `KEY_BLOCK` keys (and then values) at a time for all of them, so each cached row is
/// read from memory once per step instead of once per query head. The scores go through the
/// vectorized exp, and the weighted sum of the values runs 64 lanes of the output at a time over a
/// block (`weighted_rows`), so those lanes stay in registers instead of being loaded and stored
/// once per key.
fn forward_rows<T: Operand>(q: &[f32], k: &[T], v: &[T], key_mask: &[bool], s: AttnShape, out: &mut [f32], lse: &mut [f32]) {
    let (hd, tq, tk, ts) = (s.head_dim, s.q_len, s.kv_len, s.kv_stride);
    let g = s.group();
    assert!(tk <= ts);
    assert_eq!(q.len(), s.batch * s.heads * tq * hd);
    assert_eq!(k.len(), s.batch * s.kv_heads * ts * hd);
    assert_eq!(v.len(), k.len());
    assert_eq!(key_mask.len(), s.batch * ts);
    assert_eq!(out.len(), q.len());
    assert_eq!(lse.len(), s.batch * s.heads * tq);
    let scale = 1.0 / (hd as f32).sqrt();
    // A group's heads are consecutive, so its outputs are one chunk of `out` (and of `lse`).
    out.par_chunks_mut(g * tq * hd).zip(lse.par_chunks_mut(g * tq)).enumerate().for_each(|(group, (o, l))| {
        let b = group / s.kv_heads;
        let kv = group * ts * hd;
        let (kb, vb) = (&k[kv..kv + tk * hd], &v[kv..kv + tk * hd]);
        let mask = &key_mask[b * ts..b * ts + tk];
        // Query i of the group's head h is row h·tq + i of `qg`, `o` and `l`.
        let qg = &q[group * g * tq * hd..][..g * tq * hd];
        let mut scores = vec![0.0f32; g * tk];
        for i in 0..tq {
            let range = s.key_range(i);
            for j0 in range.clone().step_by(KEY_BLOCK) {
                let block = j0..(j0 + KEY_BLOCK).min(range.end);
                for h in 0..g {
                    let qi = &qg[(h * tq + i) * hd..][..hd];
                    for j in block.clone() {
                        if h == 0 {
                            // The first head's pass reads the block from memory: ask for the key
                            // `PREFETCH_AHEAD` rows on, and for this key's value row (read once
                            // every score is known), so that the loads do not wait on each miss.
                            prefetch_row(kb.get((j + PREFETCH_AHEAD) * hd..(j + PREFETCH_AHEAD + 1) * hd));
                            prefetch_row(vb.get(j * hd..(j + 1) * hd));
                        }
                        scores[h * tk + j] = if mask[j] { dot(qi, &kb[j * hd..(j + 1) * hd]) * scale } else { f32::NEG_INFINITY };
                    }
                }
            }
            for h in 0..g {
                let p = &mut scores[h * tk..][range.clone()];
                let row = h * tq + i;
                let m = p.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                o[row * hd..(row + 1) * hd].fill(0.0);
                if m == f32::NEG_INFINITY {
                    l[row] = f32::NEG_INFINITY;
                    continue;
                }
                let sum = super::fastexp::exp_shifted_sum(p, 1.0, m) as f32;
                let inv = 1.0 / sum;
                // (The fast exp of −∞ is tiny, not zero: masked keys get exactly zero weight here.)
                for (j, pj) in range.clone().zip(p.iter_mut()) {
                    *pj = if mask[j] { *pj * inv } else { 0.0 };
                }
                l[row] = m + sum.ln();
            }
            for j0 in range.clone().step_by(KEY_BLOCK) {
                let block = j0..(j0 + KEY_BLOCK).min(range.end);
                // (A head that sees no key keeps its zero output.)
                for h in 0..g {
                    let row = h * tq + i;
                    if l[row] == f32::NEG_INFINITY {
                        continue;
                    }
                    weighted_rows(
                        &mut o[row * hd..(row + 1) * hd],
                        &scores[h * tk..][block.clone()],
                        &vb[block.start * hd..block.end * hd],
                    );
                }
            }
        }
    });
}

/// How many key rows ahead `forward_rows` asks for the next keys. Measured on a 2-core Xeon
/// without AMX, 16 sequences × 30 layers at 145 cached positions, bf16: see `prefetch_row`.
const PREFETCH_AHEAD: usize = 8;

/// Asks the CPU to bring `row` (if any) into the first-level cache: a hint, without effect on
/// any result. Decode attention reads each sequence's cache once per step, in short runs (one
/// head's keys, 18 KiB in bf16) that the hardware prefetcher alone follows too late.
#[inline(always)]
fn prefetch_row<T>(row: Option<&[T]>) {
    #[cfg(target_arch = "x86_64")]
    if let Some(row) = row {
        let bytes = std::mem::size_of_val(row);
        for line in (0..bytes).step_by(64) {
            // SAFETY: a prefetch never faults, and the address lies inside `row`.
            unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(row.as_ptr().cast::<i8>().add(line)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = row;
}

/// Keys (or values) per block of `forward_rows`: 64 rows of a 64-value head are 16 KiB in f32,
/// so a block stays in the first-level cache while every query head of the group reads it.
const KEY_BLOCK: usize = 64;

/// `out += Σ_j p[j] · rows[j]` for `rows` of `out.len()` values each, 64 output lanes at a time
/// (a 64-value head row in one pass: four AVX-512 vectors of sums, or eight lanes of 8 without
/// it), then 16 at a time.
fn weighted_rows<T: Operand>(out: &mut [f32], p: &[f32], rows: &[T]) {
    let hd = out.len();
    #[cfg(all(target_arch = "x86_64", target_feature = "avx512f", target_feature = "avx512bw"))]
    let done = if hd.is_multiple_of(16) {
        // SAFETY: the build enables AVX-512F and BW; `rows` holds `p.len()` rows of `hd` values.
        unsafe { weighted_rows_avx512(out, p, rows) };
        hd
    } else {
        0
    };
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx512f", target_feature = "avx512bw")))]
    let done = 0;
    fn lanes<const W: usize, T: AsF32>(out: &mut [f32], p: &[f32], rows: &[T], first: usize) -> usize {
        let hd = out.len();
        let mut c = first;
        while c + W <= hd {
            let mut acc: [f32; W] = out[c..c + W].try_into().expect("W lanes");
            for (&pj, row) in p.iter().zip(rows.chunks_exact(hd)) {
                let r = &row[c..c + W];
                for t in 0..W {
                    acc[t] += pj * r[t].as_f32();
                }
            }
            out[c..c + W].copy_from_slice(&acc);
            c += W;
        }
        c
    }
    let wide = lanes::<64, T>(out, p, rows, done);
    let done = lanes::<16, T>(out, p, rows, wide);
    let tail = &mut out[done..];
    for (&pj, row) in p.iter().zip(rows.chunks_exact(hd)) {
        tail.iter_mut().zip(&row[done..]).for_each(|(o, &x)| *o += pj * x.as_f32());
    }
}

/// `weighted_rows` for a row length that is a multiple of 16: four vectors of 16 output lanes
/// (or one, for the last 16–48) summed over all rows at a time, with fused multiply-adds (plain Rust keeps the multiply
/// and the add apart, and the compiler chose 8-lane vectors).
///
/// # Safety
/// AVX-512F and BW; `out.len()` a multiple of 16; `rows` holds `p.len()` rows of `out.len()` values.
#[cfg(all(target_arch = "x86_64", target_feature = "avx512f", target_feature = "avx512bw"))]
unsafe fn weighted_rows_avx512<T: Operand>(out: &mut [f32], p: &[f32], rows: &[T]) {
    use std::arch::x86_64::*;
    let hd = out.len();
    assert!(rows.len() >= p.len() * hd);
    let (po, pr) = (out.as_mut_ptr(), rows.as_ptr());
    // Four vectors at a time while they fit (a fixed count, so the sums stay in registers), then one.
    let mut c0 = 0;
    while c0 < hd {
        let vectors = if hd - c0 >= 64 { 4 } else { 1 };
        if vectors == 4 {
            let mut acc: [__m512; 4] = std::array::from_fn(|v| _mm512_loadu_ps(po.add(c0 + 16 * v)));
            for (j, &pj) in p.iter().enumerate() {
                let (w, row) = (_mm512_set1_ps(pj), pr.add(j * hd + c0));
                for (v, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm512_fmadd_ps(w, T::load16(row.add(16 * v), u16::MAX), *acc);
                }
            }
            acc.iter().enumerate().for_each(|(v, acc)| _mm512_storeu_ps(po.add(c0 + 16 * v), *acc));
        } else {
            let mut acc = _mm512_loadu_ps(po.add(c0));
            for (j, &pj) in p.iter().enumerate() {
                acc = _mm512_fmadd_ps(_mm512_set1_ps(pj), T::load16(pr.add(j * hd + c0), u16::MAX), acc);
            }
            _mm512_storeu_ps(po.add(c0), acc);
        }
        c0 += 16 * vectors;
    }
}

/// Gradients of `attention_forward` with respect to q, k and v (all overwritten), given the
/// forward's `out` and `lse` and the incoming gradient `dout`.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    key_mask: &[bool],
    s: AttnShape,
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let _timer = crate::profile::time(crate::profile::Phase::Attention);
    if s.q_len >= GEMM_MIN_QUERIES {
        #[cfg(target_arch = "x86_64")]
        if s.tiles && super::attention_tiles::usable(&s) {
            return super::attention_tiles::backward(q, k, v, key_mask, s, out, lse, dout, dq, dk, dv);
        }
        backward_gemm(q, k, v, key_mask, s, out, lse, dout, dq, dk, dv)
    } else {
        backward_rows(q, k, v, key_mask, s, out, lse, dout, dq, dk, dv)
    }
}

#[allow(clippy::too_many_arguments)]
fn backward_rows(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    key_mask: &[bool],
    s: AttnShape,
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let (hd, tq, tk) = (s.head_dim, s.q_len, s.kv_len);
    let g = s.group();
    assert_eq!(s.kv_stride, tk, "backward runs on whole sequences, not on a cache");
    assert_eq!(dq.len(), q.len());
    assert_eq!(dk.len(), k.len());
    assert_eq!(dv.len(), v.len());
    assert_eq!(dout.len(), out.len());
    let scale = 1.0 / (hd as f32).sqrt();
    dq.par_chunks_mut(g * tq * hd).zip(dk.par_chunks_mut(tk * hd)).zip(dv.par_chunks_mut(tk * hd)).enumerate().for_each(
        |(bkv, ((dqg, dkc), dvc))| {
            let b = bkv / s.kv_heads;
            let kb = &k[bkv * tk * hd..(bkv + 1) * tk * hd];
            let vb = &v[bkv * tk * hd..(bkv + 1) * tk * hd];
            let mask = &key_mask[b * tk..(b + 1) * tk];
            dqg.fill(0.0);
            dkc.fill(0.0);
            dvc.fill(0.0);
            for gi in 0..g {
                let bh = bkv * g + gi; // query heads of a group are consecutive
                for i in 0..tq {
                    let row = bh * tq + i;
                    let lse_i = lse[row];
                    if lse_i == f32::NEG_INFINITY {
                        continue;
                    }
                    let qi = &q[row * hd..(row + 1) * hd];
                    let doi = &dout[row * hd..(row + 1) * hd];
                    let d_i = dot(doi, &out[row * hd..(row + 1) * hd]);
                    let dqi = &mut dqg[(gi * tq + i) * hd..][..hd];
                    for j in s.key_range(i) {
                        if !mask[j] {
                            continue;
                        }
                        let kj = &kb[j * hd..(j + 1) * hd];
                        let p = (dot(qi, kj) * scale - lse_i).exp();
                        let dp = dot(doi, &vb[j * hd..(j + 1) * hd]);
                        let ds = p * (dp - d_i) * scale;
                        axpy(dqi, ds, kj);
                        axpy(&mut dkc[j * hd..(j + 1) * hd], ds, qi);
                        axpy(&mut dvc[j * hd..(j + 1) * hd], p, doi);
                    }
                }
            }
        },
    );
}

/// The score tile of one head: `p[i][j]` = exp(scale·q_i·k_j − lse_i) for visible keys, else 0.
/// With `lse` = None each row is normalized by its own sum and its log-sum-exp is written to
/// `lse_out` (forward); with the stored `lse` the forward's probabilities are recomputed (backward).
fn probabilities(qh: &[f32], kb: &[f32], mask: &[bool], s: &AttnShape, p: &mut [f32], lse: Option<&[f32]>, lse_out: Option<&mut [f32]>) {
    let (hd, tq, tk) = (s.head_dim, s.q_len, s.kv_len);
    let scale = 1.0 / (hd as f32).sqrt();
    super::matmul(p, qh, false, kb, true, tq, tk, hd, scale, false);
    softmax_rows(p, tk, 1.0, mask, s, lse, lse_out);
}

/// Turns the scores in `p` (`s.q_len` rows of `stride` values; column `j < s.kv_len` holds
/// q_i·k_j) into `probabilities`, their scale applied here. Every column outside a row's visible
/// keys becomes 0, the padding up to `stride` included. Only each row's causal window is
/// exponentiated.
pub(super) fn softmax_rows(
    p: &mut [f32],
    stride: usize,
    scale: f32,
    mask: &[bool],
    s: &AttnShape,
    lse: Option<&[f32]>,
    lse_out: Option<&mut [f32]>,
) {
    let mut lse_out = lse_out;
    for i in 0..s.q_len {
        let row = &mut p[i * stride..(i + 1) * stride];
        let range = s.key_range(i);
        row[..range.start].fill(0.0);
        row[range.end..].fill(0.0);
        let vis = &mut row[range.clone()];
        let keys = &mask[range];
        let padded = keys.iter().any(|&m| !m);
        if padded {
            vis.iter_mut().zip(keys).filter(|(_, &m)| !m).for_each(|(x, _)| *x = f32::NEG_INFINITY);
        }
        let l = match lse {
            Some(l) => {
                if l[i] != f32::NEG_INFINITY {
                    super::fastexp::exp_shifted_sum(vis, scale, l[i]);
                }
                l[i]
            }
            None => {
                let m = scale * vis.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                if m == f32::NEG_INFINITY {
                    m
                } else {
                    let z = super::fastexp::exp_shifted_sum(vis, scale, m);
                    let inv = (1.0 / z) as f32;
                    vis.iter_mut().for_each(|x| *x *= inv);
                    m + (z as f32).ln()
                }
            }
        };
        if let Some(o) = lse_out.as_deref_mut() {
            o[i] = l;
        }
        if l == f32::NEG_INFINITY {
            vis.fill(0.0);
        } else if padded {
            // Padding keys had −∞ scores (≈1e-38 after the clamped exp): make them exactly 0.
            vis.iter_mut().zip(keys).filter(|(_, &m)| !m).for_each(|(x, _)| *x = 0.0);
        }
    }
}

/// Query rows per tile in the GEMM path: a tile only multiplies against the keys up to its last
/// query (causal), which skips most of the upper triangle.
pub(super) const QUERY_TILE: usize = 128;

/// The tiles of `s`'s queries: (first query, tile shape seeing keys 0..kv_len of the tile).
pub(super) fn query_tiles(s: &AttnShape) -> impl Iterator<Item = (usize, AttnShape)> + '_ {
    (0..s.q_len).step_by(QUERY_TILE).map(move |r0| {
        let r1 = (r0 + QUERY_TILE).min(s.q_len);
        let kv_len = (s.q_offset + r1).min(s.kv_len);
        (r0, AttnShape { q_len: r1 - r0, kv_len, q_offset: s.q_offset + r0, ..*s })
    })
}

fn forward_gemm(q: &[f32], k: &[f32], v: &[f32], key_mask: &[bool], s: AttnShape, out: &mut [f32], lse: &mut [f32]) {
    let (hd, tq, tk, ts) = (s.head_dim, s.q_len, s.kv_len, s.kv_stride);
    let g = s.group();
    assert!(tk <= ts && q.len() == s.batch * s.heads * tq * hd && k.len() == s.batch * s.kv_heads * ts * hd);
    assert!(key_mask.len() == s.batch * ts && out.len() == q.len() && lse.len() == s.batch * s.heads * tq);
    out.par_chunks_mut(tq * hd).zip(lse.par_chunks_mut(tq)).enumerate().for_each(|(bh, (o, l))| {
        let (b, h) = (bh / s.heads, bh % s.heads);
        let kv = (b * s.kv_heads + h / g) * ts * hd;
        let qh = &q[bh * tq * hd..(bh + 1) * tq * hd];
        let mut p = vec![0.0f32; QUERY_TILE.min(tq) * tk];
        for (r0, t) in query_tiles(&s) {
            let (rows, keys) = (t.q_len, t.kv_len);
            let pt = &mut p[..rows * keys];
            let (qt, lt) = (&qh[r0 * hd..(r0 + rows) * hd], &mut l[r0..r0 + rows]);
            probabilities(qt, &k[kv..kv + keys * hd], &key_mask[b * ts..b * ts + keys], &t, pt, None, Some(lt));
            super::matmul(&mut o[r0 * hd..(r0 + rows) * hd], pt, false, &v[kv..kv + keys * hd], false, rows, hd, keys, 1.0, false);
        }
    });
}

#[allow(clippy::too_many_arguments)]
fn backward_gemm(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    key_mask: &[bool],
    s: AttnShape,
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let (hd, tq, tk) = (s.head_dim, s.q_len, s.kv_len);
    let g = s.group();
    assert_eq!(s.kv_stride, tk, "backward runs on whole sequences, not on a cache");
    assert!(dq.len() == q.len() && dk.len() == k.len() && dv.len() == v.len() && dout.len() == out.len());
    let scale = 1.0 / (hd as f32).sqrt();
    dq.par_chunks_mut(g * tq * hd).zip(dk.par_chunks_mut(tk * hd)).zip(dv.par_chunks_mut(tk * hd)).enumerate().for_each(
        |(bkv, ((dqg, dkc), dvc))| {
            let b = bkv / s.kv_heads;
            let kb = &k[bkv * tk * hd..(bkv + 1) * tk * hd];
            let vb = &v[bkv * tk * hd..(bkv + 1) * tk * hd];
            let mask = &key_mask[b * tk..(b + 1) * tk];
            let tile = QUERY_TILE.min(tq) * tk;
            let (mut p, mut dp) = (vec![0.0f32; tile], vec![0.0f32; tile]);
            dkc.fill(0.0);
            dvc.fill(0.0);
            for gi in 0..g {
                let bh = bkv * g + gi;
                for (r0, t) in query_tiles(&s) {
                    let (rows, keys) = (t.q_len, t.kv_len);
                    let span = (bh * tq + r0) * hd..(bh * tq + r0 + rows) * hd;
                    let (qt, ot, dot_) = (&q[span.clone()], &out[span.clone()], &dout[span]);
                    let (pt, dpt) = (&mut p[..rows * keys], &mut dp[..rows * keys]);
                    let (kt, vt) = (&kb[..keys * hd], &vb[..keys * hd]);
                    probabilities(qt, kt, &mask[..keys], &t, pt, Some(&lse[bh * tq + r0..bh * tq + r0 + rows]), None);
                    // dV += Pᵀ·dO; dP = dO·Vᵀ; dS = P ⊙ (dP − rowsum(dO ⊙ O)); dQ = dS·K·scale; dK += dSᵀ·Q·scale
                    super::matmul(&mut dvc[..keys * hd], pt, true, dot_, false, keys, hd, rows, 1.0, true);
                    super::matmul(dpt, dot_, false, vt, true, rows, keys, hd, 1.0, false);
                    for i in 0..rows {
                        let d_i = dot(&dot_[i * hd..(i + 1) * hd], &ot[i * hd..(i + 1) * hd]);
                        for (x, y) in dpt[i * keys..(i + 1) * keys].iter_mut().zip(&pt[i * keys..(i + 1) * keys]) {
                            *x = y * (*x - d_i);
                        }
                    }
                    let dq_t = &mut dqg[(gi * tq + r0) * hd..(gi * tq + r0 + rows) * hd];
                    super::matmul(dq_t, dpt, false, kt, false, rows, hd, keys, scale, false);
                    super::matmul(&mut dkc[..keys * hd], dpt, true, qt, false, keys, hd, rows, scale, true);
                }
            }
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::{check_directional, dot as dot64, randn};
    use crate::rng::Rng;

    fn shape(window: Option<usize>) -> AttnShape {
        AttnShape { batch: 2, heads: 4, kv_heads: 2, q_len: 6, kv_len: 6, kv_stride: 6, head_dim: 8, q_offset: 0, window, tiles: false }
    }

    fn mask() -> Vec<bool> {
        // second sequence right-padded after 4 tokens
        (0..12).map(|i| i < 6 || i % 6 < 4).collect()
    }

    /// Naive reference: full softmax with an explicit mask matrix.
    fn reference(q: &[f32], k: &[f32], v: &[f32], m: &[bool], s: AttnShape) -> Vec<f32> {
        let hd = s.head_dim;
        let mut out = vec![0.0; q.len()];
        for b in 0..s.batch {
            for h in 0..s.heads {
                let kvh = h / (s.heads / s.kv_heads);
                for i in 0..s.q_len {
                    let qi = &q[((b * s.heads + h) * s.q_len + i) * hd..][..hd];
                    let vis = |j: usize| j <= i && m[b * s.kv_len + j] && s.window.is_none_or(|w| i - j < w);
                    let sc: Vec<f64> = (0..s.kv_len)
                        .map(|j| {
                            if vis(j) {
                                dot64(qi, &k[((b * s.kv_heads + kvh) * s.kv_len + j) * hd..][..hd]) / (hd as f64).sqrt()
                            } else {
                                f64::NEG_INFINITY
                            }
                        })
                        .collect();
                    let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = sc.iter().map(|x| (x - mx).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for j in 0..s.kv_len {
                        for d in 0..hd {
                            out[((b * s.heads + h) * s.q_len + i) * hd + d] +=
                                (e[j] / z * v[((b * s.kv_heads + kvh) * s.kv_len + j) * hd + d] as f64) as f32;
                        }
                    }
                }
            }
        }
        out
    }

    /// bf16 keys and values (a bf16 KV cache) give what their f32 values give, row by row (few
    /// queries) and through the per-head GEMMs (which expand them), in both query counts.
    #[test]
    fn bf16_keys_and_values_read_as_their_values() {
        use crate::kernels::bf16::{to_bf16, to_f32};
        for q_len in [3, GEMM_MIN_QUERIES + 2] {
            let s = AttnShape { q_len, kv_len: q_len, kv_stride: q_len, ..shape(None) };
            let mut rng = Rng::new(12);
            let nq = s.batch * s.heads * q_len * s.head_dim;
            let nk = s.batch * s.kv_heads * q_len * s.head_dim;
            let (q, k, v) = (randn(&mut rng, nq, 1.0), randn(&mut rng, nk, 1.0), randn(&mut rng, nk, 1.0));
            let (k16, v16): (Vec<u16>, Vec<u16>) = (k.iter().map(|&x| to_bf16(x)).collect(), v.iter().map(|&x| to_bf16(x)).collect());
            let (kr, vr): (Vec<f32>, Vec<f32>) = (k16.iter().map(|&b| to_f32(b)).collect(), v16.iter().map(|&b| to_f32(b)).collect());
            let m = vec![true; s.batch * q_len];
            let lse_len = s.batch * s.heads * q_len;
            let (mut o16, mut l16, mut o32, mut l32) = (vec![0.0; nq], vec![0.0; lse_len], vec![0.0; nq], vec![0.0; lse_len]);
            attention_forward(&q, &k16, &v16, &m, s, &mut o16, &mut l16);
            attention_forward(&q, &kr, &vr, &m, s, &mut o32, &mut l32);
            let err = o16.iter().zip(&o32).chain(l16.iter().zip(&l32)).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(err < 1e-5, "q_len {q_len}: bf16 against its f32 values {err}");
        }
    }

    #[test]
    fn forward_matches_reference_and_gradients_check() {
        for window in [None, Some(3)] {
            let s = shape(window);
            let mut rng = Rng::new(9);
            let nq = s.batch * s.heads * s.q_len * s.head_dim;
            let nk = s.batch * s.kv_heads * s.kv_len * s.head_dim;
            let (q, k, v) = (randn(&mut rng, nq, 1.0), randn(&mut rng, nk, 1.0), randn(&mut rng, nk, 1.0));
            let m = mask();
            let probe = randn(&mut rng, nq, 1.0);
            let mut out = vec![0.0; nq];
            let mut lse = vec![0.0; s.batch * s.heads * s.q_len];
            attention_forward(&q, &k, &v, &m, s, &mut out, &mut lse);
            let r = reference(&q, &k, &v, &m, s);
            let err = out.iter().zip(&r).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(err < 1e-5, "forward error {err}");

            let (mut dq, mut dk, mut dv) = (vec![0.0; nq], vec![0.0; nk], vec![0.0; nk]);
            attention_backward(&q, &k, &v, &m, s, &out, &lse, &probe, &mut dq, &mut dk, &mut dv);
            let run = |q: &[f32], k: &[f32], v: &[f32]| {
                let mut o = vec![0.0; nq];
                let mut l = vec![0.0; s.batch * s.heads * s.q_len];
                attention_forward(q, k, v, &m, s, &mut o, &mut l);
                dot64(&o, &probe)
            };
            check_directional("attn dq", &q, &dq, |x| run(x, &k, &v), 3);
            check_directional("attn dk", &k, &dk, |x| run(&q, x, &v), 4);
            check_directional("attn dv", &v, &dv, |x| run(&q, &k, x), 5);
        }
    }

    #[test]
    fn offset_queries_match_the_tail_of_a_full_pass() {
        // Decoding with a cache: the last 2 queries against all 6 keys equal rows 4..6 of the full pass.
        let full = AttnShape {
            batch: 1,
            heads: 2,
            kv_heads: 1,
            q_len: 6,
            kv_len: 6,
            kv_stride: 6,
            head_dim: 8,
            q_offset: 0,
            window: None,
            tiles: false,
        };
        let mut rng = Rng::new(2);
        let q = randn(&mut rng, 2 * 6 * 8, 1.0);
        let k = randn(&mut rng, 6 * 8, 1.0);
        let v = randn(&mut rng, 6 * 8, 1.0);
        let m = vec![true; 6];
        let mut out = vec![0.0; q.len()];
        let mut lse = vec![0.0; 12];
        attention_forward(&q, &k, &v, &m, full, &mut out, &mut lse);
        let tail: Vec<f32> = (0..2).flat_map(|h| q[(h * 6 + 4) * 8..(h * 6 + 6) * 8].to_vec()).collect();
        // ... also when keys sit in a larger cache buffer (stride 9, only 6 positions filled).
        let part = AttnShape { q_len: 2, q_offset: 4, kv_stride: 9, ..full };
        let grow = |x: &[f32]| -> Vec<f32> { x.iter().copied().chain(std::iter::repeat_n(f32::NAN, 3 * 8)).collect() };
        let mut mask9 = vec![true; 6];
        mask9.extend([false; 3]);
        let mut out2 = vec![0.0; tail.len()];
        let mut lse2 = vec![0.0; 4];
        attention_forward(&tail, &grow(&k), &grow(&v), &mask9, part, &mut out2, &mut lse2);
        for h in 0..2 {
            for x in 0..16 {
                assert!((out2[h * 16 + x] - out[(h * 6 + 4) * 8 + x]).abs() < 1e-6);
            }
        }
    }

    /// The GEMM path (many queries) and the row path agree, forward and backward.
    #[test]
    fn gemm_and_row_paths_agree() {
        const T: usize = 300; // three query tiles, the last one partial
                              // Head widths 16 and 88: the row path's value sums run 64 lanes, then 16, then the rest.
        for (window, hd) in [(None, 16), (Some(7), 16), (None, 88)] {
            let s = AttnShape {
                batch: 2,
                heads: 4,
                kv_heads: 2,
                q_len: T,
                kv_len: T,
                kv_stride: T,
                head_dim: hd,
                q_offset: 0,
                window,
                tiles: false,
            };
            let mut rng = Rng::new(21);
            let nq = 2 * 4 * T * hd;
            let nk = 2 * 2 * T * hd;
            let (q, k, v, d) = (randn(&mut rng, nq, 1.0), randn(&mut rng, nk, 1.0), randn(&mut rng, nk, 1.0), randn(&mut rng, nq, 1.0));
            let m: Vec<bool> = (0..2 * T).map(|i| i < T || i % T < 200).collect();
            let (mut o1, mut o2, mut l1, mut l2) = (vec![0.0; nq], vec![0.0; nq], vec![0.0; 8 * T], vec![0.0; 8 * T]);
            forward_rows(&q, &k, &v, &m, s, &mut o1, &mut l1);
            forward_gemm(&q, &k, &v, &m, s, &mut o2, &mut l2);
            let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x == y || (x - y).abs() < 1e-4);
            assert!(close(&o1, &o2) && close(&l1, &l2));
            let mut g1 = (vec![0.0; nq], vec![0.0; nk], vec![0.0; nk]);
            let mut g2 = g1.clone();
            backward_rows(&q, &k, &v, &m, s, &o1, &l1, &d, &mut g1.0, &mut g1.1, &mut g1.2);
            backward_gemm(&q, &k, &v, &m, s, &o1, &l1, &d, &mut g2.0, &mut g2.1, &mut g2.2);
            assert!(close(&g1.0, &g2.0) && close(&g1.1, &g2.1) && close(&g1.2, &g2.2));
        }
    }
}
