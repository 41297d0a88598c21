//! The language-model head fused with cross-entropy. Training never materializes the full
//! `[tokens × vocab]` logits: rows that carry a label are gathered and processed in chunks, each
//! chunk's logits turned into dL/dlogits in place and multiplied straight back into dL/dhidden.

use super::amx;
use super::blocks::Row;
use super::gemv;
use super::matmul::DenseWeight;
use rayon::prelude::*;

/// Bytes of logits computed at once: as many rows as fit (at least 64, at most 512). Every chunk
/// passes over the whole head twice (logits, then dL/dx), so wider chunks repack and reread the
/// head less often: 256 rows instead of 64 cut SmolLM2's head time by about a sixth (bf16, AMX).
const CHUNK_BYTES: usize = 48 << 20;

/// Vocabulary rows of a compact head expanded to f32 at a time: the head is never whole in f32.
const VOCAB_BLOCK: usize = 4096;

/// The LM head `[vocab × dim]` times activations, for f32 or compact (bf16, Q8_0, Q4_1) heads.
struct Head<'a> {
    w: Row<'a>,
    vocab: usize,
    dim: usize,
    /// f32 copy of one vocabulary block (compact heads without a bf16 product unit), and the
    /// matching columns of the logits.
    block: Vec<f32>,
    cols: Vec<f32>,
}

impl<'a> Head<'a> {
    fn new(w: Row<'a>, vocab: usize, dim: usize) -> Self {
        Head { w, vocab, dim, block: Vec::new(), cols: Vec::new() }
    }

    /// Vocabulary blocks as (first row, rows, values): an f32 head whole; with a bf16 product
    /// unit (`amx::product_unit`), a bf16 head as stored and a Q8_0/Q4_1 head's block dequantized
    /// to bf16 as its product packs it; without one, compact heads expanded to f32 one block at a
    /// time.
    fn for_each_block(&mut self, mut f: impl FnMut(usize, usize, DenseWeight, &mut Vec<f32>)) {
        let (w, dim) = (self.w, self.dim);
        if let Row::F32(all) = w {
            return f(0, self.vocab, DenseWeight::F32(all), &mut self.cols);
        }
        for v0 in (0..self.vocab).step_by(VOCAB_BLOCK) {
            let n = VOCAB_BLOCK.min(self.vocab - v0);
            match w {
                Row::Bf16(all) if amx::products_available() => f(v0, n, DenseWeight::Bf16(&all[v0 * dim..(v0 + n) * dim]), &mut self.cols),
                _ if amx::products_available() => {
                    let fill = |first: usize, out: &mut [u16]| gemv::dequantize_bf16(w, dim, v0 + first, out);
                    f(v0, n, DenseWeight::Bf16Rows(&fill), &mut self.cols);
                }
                _ => {
                    self.block.resize(n * dim, 0.0);
                    gemv::dequantize_parallel(w, dim, v0, &mut self.block);
                    f(v0, n, DenseWeight::F32(&self.block), &mut self.cols);
                }
            }
        }
    }

    /// `logits[c × vocab] = x[c × dim] · Wᵀ`. On tiles each vocabulary block's product writes
    /// its columns of `logits` in place; other compact heads go through `cols`.
    fn logits(&mut self, x: &[f32], c: usize, logits: &mut [f32]) {
        let (vocab, dim) = (self.vocab, self.dim);
        self.for_each_block(|v0, n, wb, cols| match wb {
            DenseWeight::Bf16(w) => amx::matmul_bf16(&mut logits[v0..], vocab, x, dim, c, dim, amx::Weight::Nk(w), n, 1.0, false),
            DenseWeight::Bf16Rows(w) => amx::matmul_bf16(&mut logits[v0..], vocab, x, dim, c, dim, amx::Weight::NkRows(w), n, 1.0, false),
            DenseWeight::F32(_) if n == vocab => wb.forward(logits, x, c, n, dim),
            DenseWeight::F32(_) => {
                cols.resize(c * n, 0.0);
                wb.forward(cols, x, c, n, dim);
                for (row, src) in logits.chunks_mut(vocab).zip(cols.chunks(n)) {
                    row[v0..v0 + n].copy_from_slice(src);
                }
            }
        });
    }

    /// `dx[c × dim] = g[c × vocab] · W`; on tiles each block reads its columns of `g` in place.
    fn backward(&mut self, g: &[f32], c: usize, dx: &mut [f32]) {
        let (vocab, dim) = (self.vocab, self.dim);
        self.for_each_block(|v0, n, wb, cols| match wb {
            DenseWeight::Bf16(w) => amx::matmul_bf16(dx, dim, &g[v0..], vocab, c, n, amx::Weight::Kn(w), dim, 1.0, v0 > 0),
            DenseWeight::Bf16Rows(w) => amx::matmul_bf16(dx, dim, &g[v0..], vocab, c, n, amx::Weight::KnRows(w), dim, 1.0, v0 > 0),
            DenseWeight::F32(_) if n == vocab => wb.backward(dx, g, c, n, dim, false),
            DenseWeight::F32(_) => {
                cols.resize(c * n, 0.0);
                for (dst, row) in cols.chunks_mut(n).zip(g.chunks(vocab)) {
                    dst.copy_from_slice(&row[v0..v0 + n]);
                }
                wb.backward(dx, cols, c, n, dim, v0 > 0);
            }
        });
    }
}

/// Result of the fused head: the summed loss and the number of tokens it was summed over.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LossSum {
    pub sum: f64,
    pub count: usize,
}

impl LossSum {
    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum / self.count as f64
        }
    }
}

/// For hidden states `x` (`[tokens, dim]`), head weight `w` (`[vocab, dim]`, f32 or compact) and
/// one target per row (`None` = ignored, like label −100), returns the summed cross-entropy and,
/// when `dx` is given, adds `grad_scale · dL/dx` to it (use `grad_scale = 1/count` for a mean loss).
#[allow(clippy::too_many_arguments)]
pub fn lm_head_cross_entropy(
    x: &[f32],
    w: Row,
    vocab: usize,
    dim: usize,
    targets: &[Option<u32>],
    grad_scale: f32,
    mut dx: Option<&mut [f32]>,
) -> LossSum {
    let _timer = crate::profile::time(crate::profile::Phase::LmHead);
    let mut head = Head::new(w, vocab, dim);
    assert_eq!(x.len(), targets.len() * dim);
    let rows: Vec<usize> = (0..targets.len()).filter(|&r| targets[r].is_some()).collect();
    let mut total = LossSum { sum: 0.0, count: rows.len() };
    // Chunks of equal size: a short last chunk would pass over (and repack) the whole head for a
    // few rows.
    let max_rows = (CHUNK_BYTES / (4 * vocab.max(1))).clamp(64, 512);
    let chunk_rows = rows.len().div_ceil(rows.len().div_ceil(max_rows).max(1)).max(1);
    let mut xs = vec![0.0f32; chunk_rows.min(rows.len()) * dim];
    let mut logits = vec![0.0f32; chunk_rows.min(rows.len()) * vocab];
    let mut dxs = vec![0.0f32; xs.len()];
    for chunk in rows.chunks(chunk_rows) {
        let c = chunk.len();
        for (i, &r) in chunk.iter().enumerate() {
            xs[i * dim..(i + 1) * dim].copy_from_slice(&x[r * dim..(r + 1) * dim]);
        }
        let lg = &mut logits[..c * vocab];
        head.logits(&xs[..c * dim], c, lg);
        // Each row: loss = logsumexp − logit[target]; gradient = softmax − onehot(target).
        let losses: Vec<f64> = lg
            .par_chunks_mut(vocab)
            .zip(chunk.par_iter())
            .map(|(row, &r)| {
                let t = targets[r].unwrap() as usize;
                let target_logit = row[t];
                let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                // One exp per logit: keep exp(v - m), then scale it into the softmax gradient.
                let z = super::fastexp::exp_shifted_sum(row, 1.0, m);
                let loss = m as f64 + z.ln() - target_logit as f64;
                let k = (grad_scale as f64 / z) as f32;
                for v in row.iter_mut() {
                    *v *= k;
                }
                row[t] -= grad_scale;
                loss
            })
            .collect();
        total.sum += losses.iter().sum::<f64>();
        if let Some(dx) = dx.as_deref_mut() {
            let d = &mut dxs[..c * dim];
            head.backward(lg, c, d);
            for (i, &r) in chunk.iter().enumerate() {
                for (o, &g) in dx[r * dim..(r + 1) * dim].iter_mut().zip(&d[i * dim..(i + 1) * dim]) {
                    *o += g;
                }
            }
        }
    }
    total
}

/// Targets for causal LM from HF-style labels: row t predicts `labels[t+1]` of the same sequence;
/// labels < 0 (−100) and each sequence's last position are ignored.
pub fn shift_labels(labels: &[i64], seq_len: usize) -> Vec<Option<u32>> {
    labels
        .chunks(seq_len)
        .flat_map(|row| (0..seq_len).map(move |t| row.get(t + 1).copied().filter(|&l| l >= 0).map(|l| l as u32)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::{check_directional, randn};
    use crate::rng::Rng;

    #[test]
    fn matches_naive_cross_entropy_and_gradient_checks() {
        let mut rng = Rng::new(8);
        let (rows, dim, vocab) = (150, 6, 11); // more rows than one chunk
        let x = randn(&mut rng, rows * dim, 1.0);
        let w = randn(&mut rng, vocab * dim, 1.0);
        let targets: Vec<Option<u32>> = (0..rows).map(|r| if r % 4 == 3 { None } else { Some((r * 7 % vocab) as u32) }).collect();
        let n = targets.iter().flatten().count();
        let mut dx = vec![0.0; rows * dim];
        let got = lm_head_cross_entropy(&x, Row::F32(&w), vocab, dim, &targets, 1.0 / n as f32, Some(&mut dx));
        assert_eq!(got.count, n);

        let naive = |x: &[f32]| -> f64 {
            let mut s = 0.0;
            for r in 0..rows {
                let Some(t) = targets[r] else { continue };
                let lg: Vec<f64> = (0..vocab).map(|v| (0..dim).map(|d| x[r * dim + d] as f64 * w[v * dim + d] as f64).sum()).collect();
                let m = lg.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let lse = m + lg.iter().map(|l| (l - m).exp()).sum::<f64>().ln();
                s += lse - lg[t as usize];
            }
            s / n as f64
        };
        assert!((got.mean() - naive(&x)).abs() < 1e-5, "{} vs {}", got.mean(), naive(&x));
        check_directional("lm_head ce dx", &x, &dx, naive, 6);
        assert!(dx[3 * dim..4 * dim].iter().all(|&g| g == 0.0), "ignored rows get no gradient");
    }

    /// A compact head is processed in vocabulary blocks and gives what its f32 values give.
    #[test]
    fn compact_heads_match_their_f32_values() {
        let mut rng = Rng::new(9);
        let (rows, dim, vocab) = (70, 6, 2 * VOCAB_BLOCK + 100);
        let x = randn(&mut rng, rows * dim, 1.0);
        let bits: Vec<u16> = randn(&mut rng, vocab * dim, 0.3).iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect();
        let w: Vec<f32> = bits.iter().map(|&b| half::bf16::from_bits(b).to_f32()).collect();
        let targets: Vec<Option<u32>> = (0..rows).map(|r| Some((r * 131 % vocab) as u32)).collect();
        let (mut dx_f32, mut dx_bf16) = (vec![0.0; rows * dim], vec![0.0; rows * dim]);
        // On AMX (or AVX512-BF16 vectors) the bf16 head also rounds its inputs to bf16: the hidden
        // states on the way into the logits, the logits' gradient on the way back. On fp16 vectors
        // (AVX512-FP16 without AMX) both operands are rounded to fp16 and summed in fp16 over a few values.
        let (x_seen, loss_tolerance, dx_tolerance) = if amx::products_round_to_bf16() {
            (x.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect(), 1e-4, 1e-3)
        } else if amx::products_available() {
            (x.clone(), 1e-3, 1e-3)
        } else {
            (x.clone(), 1e-4, 1e-5)
        };
        let a = lm_head_cross_entropy(&x_seen, Row::F32(&w), vocab, dim, &targets, 0.1, Some(&mut dx_f32));
        let b = lm_head_cross_entropy(&x, Row::Bf16(&bits), vocab, dim, &targets, 0.1, Some(&mut dx_bf16));
        assert!((a.sum - b.sum).abs() < loss_tolerance * a.sum.abs(), "{} vs {}", a.sum, b.sum);
        let err = dx_f32.iter().zip(&dx_bf16).map(|(p, q)| (p - q).abs()).fold(0.0f32, f32::max);
        assert!(err < dx_tolerance, "dx differs by {err}");
    }

    #[test]
    fn shifting_follows_transformers() {
        let labels = [5, -100, 7, 8, /* row 2 */ 1, 2, -100, -100];
        let t = shift_labels(&labels, 4);
        assert_eq!(t, vec![None, Some(7), Some(8), None, Some(2), None, None, None]);
    }
}
