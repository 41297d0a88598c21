//! Attention's products on AMX bf16 tiles (or, without AMX, the same products on AVX512-BF16
//! vectors: `amx::tile_product`), for bases whose other products already run there
//! (`AttnShape::tiles`): the same computation as `attention`'s GEMM path — per query tile the
//! scores Q·Kᵀ, the probabilities, P·V; backward the probabilities recomputed from the
//! log-sum-exp, dP = dO·Vᵀ, dS, dQ = dS·K, dK and dV — with the operands of each product rounded
//! to bf16 (as PyTorch's bf16 attention rounds them) and f32 accumulation. The softmax, the
//! log-sum-exp and dS stay in f32.
//!
//! Keys and values are packed into tile panels once per (sequence, KV head) and serve every
//! query head of the group and every query tile. dK and dV accumulate transposed (`[head_dim ×
//! keys]`), as `Qᵀ·dS` and `dOᵀ·P`, so that the probabilities are packed like a weight (pairs of
//! query rows) instead of being transposed; they are turned back once per KV head.

use super::aligned::AlignedVec;
use super::amx;
use super::attention::{query_tiles, softmax_rows, AttnShape};
use super::bf16::{self, AsF32};
use super::dot::dot;
use rayon::prelude::*;
use std::cell::Cell;

/// Whether `s` can run on tiles here: AMX (or AVX512-BF16 where that is the product unit, the
/// tiles' products on vectors), and heads of whole tile rows (`head_dim` a multiple of 32; every
/// head size of the supported families is).
pub(super) fn usable(s: &AttnShape) -> bool {
    amx::products_round_to_bf16() && s.head_dim.is_multiple_of(32)
}

/// Per-thread buffers of one (sequence, head) task, kept between calls so that a training step
/// does not fault in fresh pages for them.
#[derive(Default)]
struct Scratch {
    /// The A operand of the product at hand (bf16 rows).
    a: AlignedVec<u16>,
    /// The B operand packed from a tile's probabilities or dS.
    b: AlignedVec<u16>,
    /// Scores, then probabilities, of a query tile (f32, rows padded to whole tiles).
    p: AlignedVec<f32>,
    /// dP of a query tile.
    dp: AlignedVec<f32>,
    /// A product of `[rows × head_dim]` (the output or dQ of a query tile).
    rows_out: AlignedVec<f32>,
    /// Backward: this KV head's keys as panels for Q·Kᵀ and for dS·K, its values for dO·Vᵀ.
    keys_nk: AlignedVec<u16>,
    keys_kn: AlignedVec<u16>,
    values_nk: AlignedVec<u16>,
    /// Backward: Qᵀ and dOᵀ of one query head (`[head_dim × queries]`, bf16).
    q_t: AlignedVec<u16>,
    do_t: AlignedVec<u16>,
    /// Backward: dKᵀ and dVᵀ of this KV head (`[head_dim × keys]`, f32).
    dk_t: AlignedVec<f32>,
    dv_t: AlignedVec<f32>,
}

thread_local! {
    static SCRATCH: Cell<Scratch> = Cell::new(Scratch::default());
}

/// Runs `f` with this thread's scratch buffers (`f` must not start rayon work: a task stolen in
/// the meantime would find them taken).
fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    let mut w = SCRATCH.take();
    let r = f(&mut w);
    SCRATCH.set(w);
    r
}

/// The forward of `attention::attention_forward` on tiles (see the module comment).
pub(super) fn forward<T: AsF32>(q: &[f32], k: &[T], v: &[T], key_mask: &[bool], s: AttnShape, out: &mut [f32], lse: &mut [f32]) {
    let (hd, tq, tk, ts) = (s.head_dim, s.q_len, s.kv_len, s.kv_stride);
    let g = s.group();
    assert!(usable(&s) && tk <= ts && q.len() == s.batch * s.heads * tq * hd && k.len() == s.batch * s.kv_heads * ts * hd);
    assert!(v.len() == k.len() && key_mask.len() == s.batch * ts && out.len() == q.len() && lse.len() == s.batch * s.heads * tq);
    let tk_p = tk.next_multiple_of(32);
    let scale = 1.0 / (hd as f32).sqrt();
    // Keys as panels for Q·Kᵀ, values for P·V: once per KV head, shared by its query heads.
    let packed: Vec<(AlignedVec<u16>, AlignedVec<u16>)> = (0..s.batch * s.kv_heads)
        .into_par_iter()
        .map(|bkv| {
            with_scratch(|w| {
                let at = bkv * ts * hd;
                let (mut keys, mut values) = (AlignedVec::new(), AlignedVec::new());
                amx::bf16_rows_into(&k[at..], hd, tk, hd, tk_p, hd, &mut w.a);
                amx::panels_nk(&w.a, tk_p, hd, &mut keys);
                amx::bf16_rows_into(&v[at..], hd, tk, hd, tk_p, hd, &mut w.a);
                amx::panels_kn(&w.a, tk_p, hd, &mut values);
                (keys, values)
            })
        })
        .collect();
    out.par_chunks_mut(tq * hd).zip(lse.par_chunks_mut(tq)).enumerate().for_each(|(bh, (o, l))| {
        let (b, h) = (bh / s.heads, bh % s.heads);
        let (keys, values) = &packed[b * s.kv_heads + h / g];
        let qh = &q[bh * tq * hd..(bh + 1) * tq * hd];
        let mask = &key_mask[b * ts..b * ts + tk];
        with_scratch(|w| {
            for (r0, t) in query_tiles(&s) {
                let (rows, n) = (t.q_len, t.kv_len);
                let (rows_p, n_p) = (rows.next_multiple_of(32), n.next_multiple_of(32));
                amx::bf16_rows_into(&qh[r0 * hd..], hd, rows, hd, rows_p, hd, &mut w.a);
                w.p.resize(rows_p * n_p);
                amx::tile_product(&mut w.p, n_p, &w.a, hd, rows_p, keys, 16 * hd, n_p, hd, false);
                softmax_rows(&mut w.p, n_p, scale, &mask[..n], &t, None, Some(&mut l[r0..r0 + rows]));
                amx::bf16_rows_into(&w.p, n_p, rows, n_p, rows_p, n_p, &mut w.a);
                w.rows_out.resize(rows_p * hd);
                amx::tile_product(&mut w.rows_out, hd, &w.a, n_p, rows_p, values, 16 * tk_p, hd, n_p, false);
                o[r0 * hd..(r0 + rows) * hd].copy_from_slice(&w.rows_out[..rows * hd]);
            }
        })
    });
}

/// The backward of `attention::attention_backward` on tiles (see the module comment).
#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
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
    assert!(usable(&s) && s.kv_stride == tk, "backward runs on whole sequences, not on a cache");
    assert!(dq.len() == q.len() && dk.len() == k.len() && dv.len() == v.len() && dout.len() == out.len());
    let (tq_p, tk_p) = (tq.next_multiple_of(32), tk.next_multiple_of(32));
    let scale = 1.0 / (hd as f32).sqrt();
    dq.par_chunks_mut(g * tq * hd).zip(dk.par_chunks_mut(tk * hd)).zip(dv.par_chunks_mut(tk * hd)).enumerate().for_each(
        |(bkv, ((dqg, dkc), dvc))| {
            let mask = &key_mask[(bkv / s.kv_heads) * tk..][..tk];
            with_scratch(|w| {
                let at = bkv * tk * hd;
                amx::bf16_rows_into(&k[at..], hd, tk, hd, tk_p, hd, &mut w.a);
                amx::panels_nk(&w.a, tk_p, hd, &mut w.keys_nk);
                amx::panels_kn(&w.a, tk_p, hd, &mut w.keys_kn);
                amx::bf16_rows_into(&v[at..], hd, tk, hd, tk_p, hd, &mut w.a);
                amx::panels_nk(&w.a, tk_p, hd, &mut w.values_nk);
                for acc in [&mut w.dk_t, &mut w.dv_t] {
                    acc.clear();
                    acc.resize(hd * tk_p);
                }
                for gi in 0..g {
                    let bh = bkv * g + gi; // query heads of a group are consecutive
                    let head = bh * tq * hd..(bh + 1) * tq * hd;
                    let (qh, oh, doh) = (&q[head.clone()], &out[head.clone()], &dout[head]);
                    amx::bf16_transposed_into(qh, tq, hd, tq_p, &mut w.q_t);
                    amx::bf16_transposed_into(doh, tq, hd, tq_p, &mut w.do_t);
                    for (r0, t) in query_tiles(&s) {
                        let (rows, n) = (t.q_len, t.kv_len);
                        let (rows_p, n_p) = (rows.next_multiple_of(32), n.next_multiple_of(32));
                        // P, from the forward's log-sum-exp.
                        amx::bf16_rows_into(&qh[r0 * hd..], hd, rows, hd, rows_p, hd, &mut w.a);
                        w.p.resize(rows_p * n_p);
                        amx::tile_product(&mut w.p, n_p, &w.a, hd, rows_p, &w.keys_nk, 16 * hd, n_p, hd, false);
                        softmax_rows(&mut w.p, n_p, scale, &mask[..n], &t, Some(&lse[bh * tq + r0..][..rows]), None);
                        // dP = dO·Vᵀ, then dS = P ⊙ (dP − rowsum(dO ⊙ O)) with the scale folded in.
                        amx::bf16_rows_into(&doh[r0 * hd..], hd, rows, hd, rows_p, hd, &mut w.a);
                        w.dp.resize(rows_p * n_p);
                        amx::tile_product(&mut w.dp, n_p, &w.a, hd, rows_p, &w.values_nk, 16 * hd, n_p, hd, false);
                        // (dS goes straight to bf16 rows, the A operand of dQ.)
                        w.a.resize(rows_p * n_p);
                        for (i, ds) in w.a.chunks_exact_mut(n_p).enumerate() {
                            if i >= rows {
                                ds.fill(0);
                                continue;
                            }
                            let at = (r0 + i) * hd;
                            let d_i = dot(&doh[at..at + hd], &oh[at..at + hd]);
                            let row = i * n_p..(i + 1) * n_p;
                            ds.iter_mut()
                                .zip(&w.p[row.clone()])
                                .zip(&w.dp[row])
                                .for_each(|((x, &p), &dp)| *x = bf16::to_bf16(p * (dp - d_i) * scale));
                        }
                        // dVᵀ += dOᵀ·P
                        amx::panels_kn_f32(&w.p, n_p, rows, rows_p, n_p, &mut w.b);
                        amx::tile_product(&mut w.dv_t, tk_p, &w.do_t[r0..], tq_p, hd, &w.b, 16 * rows_p, n_p, rows_p, true);
                        // dQ = dS·K
                        w.rows_out.resize(rows_p * hd);
                        amx::tile_product(&mut w.rows_out, hd, &w.a, n_p, rows_p, &w.keys_kn, 16 * tk_p, hd, n_p, false);
                        dqg[(gi * tq + r0) * hd..][..rows * hd].copy_from_slice(&w.rows_out[..rows * hd]);
                        // dKᵀ += Qᵀ·dS
                        amx::panels_kn(&w.a, rows_p, n_p, &mut w.b);
                        amx::tile_product(&mut w.dk_t, tk_p, &w.q_t[r0..], tq_p, hd, &w.b, 16 * rows_p, n_p, rows_p, true);
                    }
                }
                amx::transpose_f32(&w.dk_t, tk_p, hd, tk, dkc, hd);
                amx::transpose_f32(&w.dv_t, tk_p, hd, tk, dvc, hd);
            })
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::attention::{attention_backward, attention_forward};
    use crate::kernels::testutil::randn;
    use crate::rng::Rng;

    fn bf16(v: &[f32]) -> Vec<f32> {
        v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect()
    }

    /// `got` against `want` as the size of their difference relative to `want`'s: the tile path
    /// rounds each product's operands to bf16 (8 bits of mantissa, ≈ 0.4%), a wrong index or mask
    /// errs by the size of the values themselves.
    fn assert_close(got: &[f32], want: &[f32], what: &str) {
        let norm = |x: &mut dyn Iterator<Item = f32>| x.map(|v| (v as f64).powi(2)).sum::<f64>().sqrt();
        let diff = norm(&mut got.iter().zip(want).map(|(a, b)| a - b));
        let size = norm(&mut want.iter().copied());
        assert!(size > 0.0 && diff <= 5e-3 * size, "{what}: relative error {:.2e}", diff / size);
    }

    /// Tiles and the f32 GEMM path agree on inputs already in bf16, forward and backward: over
    /// several query tiles (the last partial), grouped heads, a padded sequence, a window.
    #[test]
    fn tiles_match_the_f32_path() {
        if !amx::products_round_to_bf16() {
            eprintln!("no AMX or AVX512-BF16 here: the tile path is not used");
            return;
        }
        const T: usize = 300;
        for window in [None, Some(70)] {
            let f32_shape = AttnShape {
                batch: 2,
                heads: 4,
                kv_heads: 2,
                q_len: T,
                kv_len: T,
                kv_stride: T,
                head_dim: 64,
                q_offset: 0,
                window,
                tiles: false,
            };
            let tiles = AttnShape { tiles: true, ..f32_shape };
            let mut rng = Rng::new(5);
            let (nq, nk) = (2 * 4 * T * 64, 2 * 2 * T * 64);
            let (q, k, v, d) = (
                bf16(&randn(&mut rng, nq, 1.0)),
                bf16(&randn(&mut rng, nk, 1.0)),
                bf16(&randn(&mut rng, nk, 1.0)),
                bf16(&randn(&mut rng, nq, 1.0)),
            );
            let m: Vec<bool> = (0..2 * T).map(|i| i < T || i % T < 200).collect();
            let run = |s: AttnShape| {
                let (mut o, mut l) = (vec![0.0; nq], vec![0.0; 8 * T]);
                attention_forward(&q, &k, &v, &m, s, &mut o, &mut l);
                let mut g = (vec![f32::NAN; nq], vec![f32::NAN; nk], vec![f32::NAN; nk]);
                attention_backward(&q, &k, &v, &m, s, &o, &l, &d, &mut g.0, &mut g.1, &mut g.2);
                (o, l, g)
            };
            let (want, got) = (run(f32_shape), run(tiles));
            assert_close(&got.0, &want.0, "output");
            assert!(got.1.iter().zip(&want.1).all(|(a, b)| a == b || (a - b).abs() < 1e-2), "log-sum-exp");
            assert_close(&got.2 .0, &want.2 .0, "dq");
            assert_close(&got.2 .1, &want.2 .1, "dk");
            assert_close(&got.2 .2, &want.2 .2, "dv");
        }
    }

    /// Queries that follow cached positions, in a key buffer with room to grow (prefill of a
    /// continuation): the same as the f32 path.
    #[test]
    fn tiles_match_the_f32_path_against_a_cache() {
        if !amx::products_round_to_bf16() {
            return;
        }
        let f32_shape = AttnShape {
            batch: 1,
            heads: 6,
            kv_heads: 2,
            q_len: 40,
            kv_len: 140,
            kv_stride: 160,
            head_dim: 32,
            q_offset: 100,
            window: None,
            tiles: false,
        };
        let mut rng = Rng::new(8);
        let q = bf16(&randn(&mut rng, 6 * 40 * 32, 1.0));
        let mut k = bf16(&randn(&mut rng, 2 * 160 * 32, 1.0));
        let v = bf16(&randn(&mut rng, 2 * 160 * 32, 1.0));
        // Positions past kv_len are never read: poison them.
        for h in 0..2 {
            k[(h * 160 + 140) * 32..(h + 1) * 160 * 32].fill(f32::NAN);
        }
        let m: Vec<bool> = (0..160).map(|j| j < 140 && j != 7).collect();
        let run = |s: AttnShape| {
            let (mut o, mut l) = (vec![0.0; q.len()], vec![0.0; 6 * 40]);
            attention_forward(&q, &k, &v, &m, s, &mut o, &mut l);
            o
        };
        let on_tiles = run(AttnShape { tiles: true, ..f32_shape });
        assert_close(&on_tiles, &run(f32_shape), "output");
        // The same cache in bf16 (its values are bf16 already): the same products.
        let (k16, v16): (Vec<u16>, Vec<u16>) =
            (k.iter().map(|&x| bf16::to_bf16(x)).collect(), v.iter().map(|&x| bf16::to_bf16(x)).collect());
        let (mut o, mut l) = (vec![0.0; q.len()], vec![0.0; 6 * 40]);
        attention_forward(&q, &k16, &v16, &m, AttnShape { tiles: true, ..f32_shape }, &mut o, &mut l);
        assert_eq!(o, on_tiles, "a bf16 cache");
    }
}
