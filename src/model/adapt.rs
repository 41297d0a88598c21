//! The adapter interface between a model family and its LoRA variants: which linear modules a
//! family has (`ModuleKind`, `ModuleSpec`), the low-rank view of one adapted module (`LowRank`),
//! where the model finds them (`LowRankSource`), and the frozen linear layer's forward and
//! backward with a low-rank update. A model family calls these; it never touches adapter
//! storage, and an adapter never sees the architecture.

use super::buffers;
use super::frozen::FrozenMatrix;
use crate::kernels::dot::dot;
use crate::kernels::dropout::DropoutMask;
use crate::kernels::matmul;
use crate::rng::Rng;
use rayon::prelude::*;

/// The seven linear modules of a decoder layer, in the order PEFT lists them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ModuleKind {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl ModuleKind {
    pub const ALL: [ModuleKind; 7] = [Self::Q, Self::K, Self::V, Self::O, Self::Gate, Self::Up, Self::Down];

    /// Path inside a layer, as in Hugging Face module names.
    pub fn path(self) -> &'static str {
        match self {
            Self::Q => "self_attn.q_proj",
            Self::K => "self_attn.k_proj",
            Self::V => "self_attn.v_proj",
            Self::O => "self_attn.o_proj",
            Self::Gate => "mlp.gate_proj",
            Self::Up => "mlp.up_proj",
            Self::Down => "mlp.down_proj",
        }
    }

    /// The last name component (`q_proj`), which PEFT's target_modules usually names.
    pub fn short_name(self) -> &'static str {
        self.path().rsplit('.').next().unwrap()
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// Full module name of a layer's linear module, e.g. `model.layers.3.self_attn.q_proj`.
pub fn module_name(layer: usize, kind: ModuleKind) -> String {
    format!("model.layers.{layer}.{}", kind.path())
}

/// A frozen linear layer: y = x·Wᵀ + b with W stored `[out, in]` as in PyTorch.
pub struct Linear {
    pub w: FrozenMatrix,
    pub bias: Option<Vec<f32>>,
    pub in_features: usize,
    pub out_features: usize,
}

impl Linear {
    pub(crate) fn forward(&self, x: &[f32], rows: usize, y: &mut [f32]) {
        project(&self.w, x, rows, y);
        self.add_bias(y);
    }

    /// `forward` for inference (decode steps and the prompt chunks that join them): as
    /// `forward`, but on `gemv` at any number of rows where that is faster
    /// (`FrozenMatrix::infers_on_gemv`).
    pub(crate) fn infer(&self, x: &[f32], rows: usize, y: &mut [f32]) {
        if self.w.infers_on_gemv() {
            self.w.gemv(x, rows, y, 1.0, false);
        } else {
            project(&self.w, x, rows, y);
        }
        self.add_bias(y);
    }

    fn add_bias(&self, y: &mut [f32]) {
        if let Some(b) = &self.bias {
            for row in y.chunks_mut(self.out_features) {
                for (v, bb) in row.iter_mut().zip(b) {
                    *v += bb;
                }
            }
        }
    }
}

/// `y[rows × w.rows] = x · Wᵀ`: a few rows (decoding) straight from the stored format, more
/// (prefill, training) through a GEMM (`FrozenMatrix::matmul_t`).
pub(crate) fn project(w: &FrozenMatrix, x: &[f32], rows: usize, y: &mut [f32]) {
    if rows <= DECODE_ROWS {
        w.gemv(x, rows, y, 1.0, false);
    } else {
        w.matmul_t(x, rows, y);
    }
}

/// Up to this many rows a product with a frozen matrix reads the stored weights once per call
/// without expanding the whole matrix (a decode step of up to this many sequences); a GEMM
/// beyond. Measured on SmolLM2 Q8_0 (`lowrank bench serve`, 16 clients): 118.6 generated
/// tokens/s against 51.8 through the GEMM path, which expands each matrix to f32 per call.
pub(crate) const DECODE_ROWS: usize = 32;

/// One low-rank update attached to a linear module, as the forward and backward passes see it:
/// y += scale·(drop(x)·Aᵀ)·Bᵀ with A `[r, in]` and B `[out, r]`. Its gradient lives in a flat buffer
/// laid out like the parameters: dA at `grad_offset`, dB right after it.
#[derive(Clone, Copy)]
pub struct LowRank<'a> {
    pub a: &'a [f32],
    pub b: &'a [f32],
    pub r: usize,
    pub scale: f32,
    pub dropout: f32,
    pub grad_offset: usize,
}

/// Where the model finds the adapters attached to its modules (one adapter, or none).
pub trait LowRankSource {
    fn lookup(&self, layer: usize, kind: ModuleKind) -> Option<LowRank<'_>>;
}

/// An adapter a running sequence holds on to: it stays alive until the sequence ends, even if
/// its registry unloads it meanwhile.
pub type SharedAdapter = std::sync::Arc<dyn LowRankSource + Send + Sync>;

/// No adapter at all: the base model.
pub struct NoAdapter;

impl LowRankSource for NoAdapter {
    fn lookup(&self, _: usize, _: ModuleKind) -> Option<LowRank<'_>> {
        None
    }
}

/// One linear module of a model that an adapter may target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModuleSpec {
    /// Full name, e.g. `model.layers.0.self_attn.q_proj`.
    pub name: String,
    pub layer: usize,
    pub kind: ModuleKind,
    pub in_features: usize,
    pub out_features: usize,
}

/// What a low-rank path keeps for backward.
pub(crate) struct LowRankActs {
    /// drop(x)·Aᵀ, `[rows, r]`.
    u: Vec<f32>,
    /// Which input elements dropout kept, when it was applied.
    keep: Option<DropoutMask>,
}

/// y = lin(x) + scale·(drop(x)·Aᵀ)·Bᵀ.
pub(crate) fn linear_forward(
    lin: &Linear,
    lr: Option<LowRank>,
    x: &[f32],
    rows: usize,
    y: &mut [f32],
    rng: Option<&mut Rng>,
) -> Option<LowRankActs> {
    lin.forward(x, rows, y);
    let lr = lr?;
    let _timer = crate::profile::time(crate::profile::Phase::LoraGemm);
    let keep = match rng {
        Some(rng) if lr.dropout > 0.0 => Some(DropoutMask::sample(rng, x.len(), lr.dropout)),
        _ => None,
    };
    let dropped = keep.as_ref().map(|k| dropped_copy(k, x));
    let u = add_lowrank(&lr, dropped.as_deref().unwrap_or(x), rows, lin.in_features, lin.out_features, y);
    Some(LowRankActs { u, keep })
}

/// y += scale·(x·Aᵀ)·Bᵀ over `rows` rows; returns u = x·Aᵀ (`[rows, r]`).
fn add_lowrank(lr: &LowRank, x: &[f32], rows: usize, inf: usize, outf: usize, y: &mut [f32]) -> Vec<f32> {
    let mut u = vec![0.0; rows * lr.r];
    if rows <= DIRECT_LOWRANK_ROWS {
        // A decode step's rows, each on its own adapter: a few thousand multiply-adds per row,
        // less than the set-up of a GEMM call, so plain loops.
        for ((xr, ur), yr) in x.chunks_exact(inf).zip(u.chunks_exact_mut(lr.r)).zip(y.chunks_exact_mut(outf)) {
            for (uk, ak) in ur.iter_mut().zip(lr.a.chunks_exact(inf)) {
                *uk = dot(xr, ak);
            }
            for (yo, bo) in yr.iter_mut().zip(lr.b.chunks_exact(lr.r)) {
                *yo += lr.scale * dot(bo, ur);
            }
        }
        return u;
    }
    matmul(&mut u, x, false, lr.a, true, rows, lr.r, inf, 1.0, false);
    matmul(y, &u, false, lr.b, true, rows, outf, lr.r, lr.scale, true);
    u
}

/// `x` with dropout's mask applied, in a recycled buffer (it is as large as the module's input).
fn dropped_copy(keep: &DropoutMask, x: &[f32]) -> buffers::Buf {
    let mut d = buffers::copy_of(x);
    keep.apply_in_place(&mut d);
    d
}

/// Up to this many rows the low-rank products run as plain loops (`add_lowrank`).
const DIRECT_LOWRANK_ROWS: usize = 4;

/// Backward of `linear_forward`: accumulates dA, dB into `grads`, and writes (or, with
/// `accumulate`, adds) dL/dx into `dx` when it is wanted. W and its bias are frozen.
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_backward(
    lin: &Linear,
    lr: Option<LowRank>,
    acts: Option<&LowRankActs>,
    x: &[f32],
    dy: &[f32],
    rows: usize,
    grads: &mut [f32],
    dx: Option<&mut [f32]>,
    accumulate: bool,
) {
    let (inf, outf) = (lin.in_features, lin.out_features);
    let mut dx = dx;
    if let Some(dx) = dx.as_deref_mut() {
        lin.w.matmul_back(dy, rows, dx, accumulate);
    }
    let (Some(lr), Some(acts)) = (lr, acts) else {
        return;
    };
    let _timer = crate::profile::time(crate::profile::Phase::LoraGemm);
    let r = lr.r;
    let (ga, rest) = grads[lr.grad_offset..].split_at_mut(r * inf);
    let gb = &mut rest[..outf * r];
    let mut g = vec![0.0; rows * r];
    matmul(&mut g, dy, false, lr.b, false, rows, r, outf, 1.0, false);
    matmul(gb, dy, true, &acts.u, false, outf, r, rows, lr.scale, true);
    let dropped = acts.keep.as_ref().map(|k| dropped_copy(k, x));
    matmul(ga, &g, true, dropped.as_deref().unwrap_or(x), false, r, inf, rows, lr.scale, true);
    if let Some(dx) = dx {
        match &acts.keep {
            None => matmul(dx, &g, false, lr.a, false, rows, inf, r, lr.scale, true),
            Some(keep) => {
                let mut t = buffers::take(rows * inf);
                matmul(&mut t, &g, false, lr.a, false, rows, inf, r, lr.scale, false);
                keep.apply_in_place(&mut t);
                dx.iter_mut().zip(&t).for_each(|(d, t)| *d += t);
            }
        }
    }
}

/// A run of consecutive rows of a batch that share one low-rank update (or none). A batch whose
/// rows carry different adapters is cut into such runs (rows sorted by adapter make them long).
#[derive(Clone)]
pub struct Segment<'a> {
    pub rows: std::ops::Range<usize>,
    pub lowrank: Option<LowRank<'a>>,
}

/// Inference with a different adapter per run of rows: y = lin(x) for all rows in one frozen
/// product, then y[seg] += scale·(x[seg]·Aᵀ)·Bᵀ per segment (no dropout). The frozen weights are
/// read once whatever the number of adapters; only the small low-rank products multiply. With
/// several adapters in the batch their products run on the rayon pool, one segment per task: each
/// reads its own adapter's matrices, so a batch of many adapters is bound by reading them, and
/// both cores read.
pub(crate) fn linear_forward_segments(lin: &Linear, segments: &[Segment], x: &[f32], rows: usize, y: &mut [f32]) {
    lin.infer(x, rows, y);
    let _timer = crate::profile::time(crate::profile::Phase::LoraGemm);
    let (inf, outf) = (lin.in_features, lin.out_features);
    // Each adapted segment's rows of x and of y; segments are ascending runs, so y splits in order.
    let mut work: Vec<(LowRank, &[f32], &mut [f32])> = Vec::new();
    let (mut rest, mut at) = (&mut y[..rows * outf], 0);
    for seg in segments {
        assert!(seg.rows.start >= at && seg.rows.end <= rows, "segments must be ascending runs of rows");
        let Some(lr) = seg.lowrank else { continue };
        let (ys, tail) = std::mem::take(&mut rest)[(seg.rows.start - at) * outf..].split_at_mut(seg.rows.len() * outf);
        (rest, at) = (tail, seg.rows.end);
        work.push((lr, &x[seg.rows.start * inf..seg.rows.end * inf], ys));
    }
    let update = |(lr, xs, ys): (LowRank, &[f32], &mut [f32])| {
        add_lowrank(&lr, xs, xs.len() / inf, inf, outf, ys);
    };
    if work.len() > 1 {
        work.into_par_iter().for_each(update);
    } else {
        work.into_iter().for_each(update);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::randn;
    use crate::rng::Rng;

    /// The plain loops for a few rows and the GEMMs for many compute the same update.
    #[test]
    fn low_rank_update_is_the_same_for_few_rows_and_many() {
        let mut rng = Rng::new(23);
        let (inf, outf, r, rows) = (40, 24, 3, DIRECT_LOWRANK_ROWS + 3);
        let (a, b) = (randn(&mut rng, r * inf, 1.0), randn(&mut rng, outf * r, 1.0));
        let lr = LowRank { a: &a, b: &b, r, scale: 0.7, dropout: 0.0, grad_offset: 0 };
        let x = randn(&mut rng, rows * inf, 1.0);
        let y0 = randn(&mut rng, rows * outf, 1.0);
        let mut many = y0.clone();
        let u_many = add_lowrank(&lr, &x, rows, inf, outf, &mut many);
        for i in 0..rows {
            let mut one = y0[i * outf..(i + 1) * outf].to_vec();
            let u_one = add_lowrank(&lr, &x[i * inf..(i + 1) * inf], 1, inf, outf, &mut one);
            for (got, want) in one.iter().zip(&many[i * outf..(i + 1) * outf]).chain(u_one.iter().zip(&u_many[i * r..(i + 1) * r])) {
                assert!((got - want).abs() < 1e-4, "row {i}: {got} vs {want}");
            }
        }
    }
}
