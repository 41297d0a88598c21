//! The language-model head fused with cross-entropy. Training never materializes the full
//! `[tokens × vocab]` logits: rows that carry a label are gathered and processed in chunks, each
//! chunk's logits turned into dL/dlogits in place and multiplied straight back into dL/dhidden.

use super::matmul;
use rayon::prelude::*;

/// Rows of logits computed at once (chunk × vocab floats of scratch).
const CHUNK_ROWS: usize = 64;

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

/// For hidden states `x` (`[tokens, dim]`), head weight `w` (`[vocab, dim]`) and one target per row
/// (`None` = ignored, like label −100), returns the summed cross-entropy and, when `dx` is given,
/// adds `grad_scale · dL/dx` to it (use `grad_scale = 1/count` for a mean loss).
pub fn lm_head_cross_entropy(
    x: &[f32],
    w: &[f32],
    dim: usize,
    targets: &[Option<u32>],
    grad_scale: f32,
    mut dx: Option<&mut [f32]>,
) -> LossSum {
    let vocab = w.len() / dim;
    assert_eq!(x.len(), targets.len() * dim);
    let rows: Vec<usize> = (0..targets.len()).filter(|&r| targets[r].is_some()).collect();
    let mut total = LossSum { sum: 0.0, count: rows.len() };
    let mut xs = vec![0.0f32; CHUNK_ROWS.min(rows.len()) * dim];
    let mut logits = vec![0.0f32; CHUNK_ROWS.min(rows.len()) * vocab];
    let mut dxs = vec![0.0f32; xs.len()];
    for chunk in rows.chunks(CHUNK_ROWS) {
        let c = chunk.len();
        for (i, &r) in chunk.iter().enumerate() {
            xs[i * dim..(i + 1) * dim].copy_from_slice(&x[r * dim..(r + 1) * dim]);
        }
        let lg = &mut logits[..c * vocab];
        matmul(lg, &xs[..c * dim], false, w, true, c, vocab, dim, 1.0, false);
        // Each row: loss = logsumexp − logit[target]; gradient = softmax − onehot(target).
        let losses: Vec<f64> = lg
            .par_chunks_mut(vocab)
            .zip(chunk.par_iter())
            .map(|(row, &r)| {
                let t = targets[r].unwrap() as usize;
                let target_logit = row[t];
                let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                // One exp per logit: keep exp(v - m), then scale it into the softmax gradient.
                let z = super::fastexp::exp_shifted_sum(row, m);
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
            matmul(d, lg, false, w, false, c, dim, vocab, 1.0, false);
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
        let got = lm_head_cross_entropy(&x, &w, dim, &targets, 1.0 / n as f32, Some(&mut dx));
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

    #[test]
    fn shifting_follows_transformers() {
        let labels = [5, -100, 7, 8, /* row 2 */ 1, 2, -100, -100];
        let t = shift_labels(&labels, 4);
        assert_eq!(t, vec![None, Some(7), Some(8), None, Some(2), None, None, None]);
    }
}
