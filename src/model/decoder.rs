//! The decoder family (Llama, SmolLM2, Mistral, Qwen2): forward and hand-derived backward.
//!
//! Base weights are frozen: the backward pass produces gradients only for the low-rank adapters
//! and for the activations needed to reach them. Per layer, the forward pass keeps exactly the
//! tensors its backward reads (`LayerActs`).

use super::config::DecoderConfig;
use super::weights::TensorStore;
use crate::kernels::attention::{attention_backward, attention_forward, AttnShape};
use crate::kernels::loss::{lm_head_cross_entropy, LossSum};
use crate::kernels::norm::{rmsnorm_backward, rmsnorm_forward};
use crate::kernels::rope::{from_heads, inverse_frequencies, to_heads, HeadLayout, RopeAngles};
use crate::kernels::{activations, matmul};
use crate::rng::Rng;
use anyhow::{bail, Result};
use std::path::Path;

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
    pub w: Vec<f32>,
    pub bias: Option<Vec<f32>>,
    pub in_features: usize,
    pub out_features: usize,
}

impl Linear {
    fn forward(&self, x: &[f32], rows: usize, y: &mut [f32]) {
        matmul(y, x, false, &self.w, true, rows, self.out_features, self.in_features, 1.0, false);
        if let Some(b) = &self.bias {
            for row in y.chunks_mut(self.out_features) {
                for (v, bb) in row.iter_mut().zip(b) {
                    *v += bb;
                }
            }
        }
    }
}

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

/// No adapter at all: the base model.
pub struct NoAdapter;

impl LowRankSource for NoAdapter {
    fn lookup(&self, _: usize, _: ModuleKind) -> Option<LowRank<'_>> {
        None
    }
}

pub struct Layer {
    pub attn_norm: Vec<f32>,
    pub mlp_norm: Vec<f32>,
    /// Indexed by `ModuleKind::index()`.
    pub linear: Vec<Linear>,
}

pub struct DecoderModel {
    pub config: DecoderConfig,
    pub embed: Vec<f32>,
    pub layers: Vec<Layer>,
    pub norm: Vec<f32>,
    /// `None` when the head is tied to the embedding matrix.
    pub lm_head: Option<Vec<f32>>,
    inv_freq: Vec<f32>,
}

/// A batch of token sequences of equal (padded) length, with a mask of real tokens.
/// Positions are 0..seq_len in every row, as transformers uses when given no position ids.
#[derive(Clone, Debug)]
pub struct Batch {
    pub tokens: Vec<u32>,
    pub mask: Vec<bool>,
    pub batch_size: usize,
    pub seq_len: usize,
}

impl Batch {
    pub fn new(tokens: Vec<u32>, mask: Vec<bool>, batch_size: usize, seq_len: usize) -> Result<Self> {
        if tokens.len() != batch_size * seq_len || mask.len() != tokens.len() {
            bail!("batch of {batch_size}×{seq_len} needs that many tokens and mask entries (got {} and {})", tokens.len(), mask.len());
        }
        Ok(Batch { tokens, mask, batch_size, seq_len })
    }

    /// Right-pads rows of different lengths with `pad` to the longest one.
    pub fn right_padded(rows: &[Vec<u32>], pad: u32) -> Result<Self> {
        let seq_len = rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut tokens = Vec::with_capacity(rows.len() * seq_len);
        let mut mask = Vec::with_capacity(rows.len() * seq_len);
        for r in rows {
            tokens.extend(r.iter().copied().chain(std::iter::repeat_n(pad, seq_len - r.len())));
            mask.extend((0..seq_len).map(|t| t < r.len()));
        }
        Self::new(tokens, mask, rows.len(), seq_len)
    }

    pub fn tokens_count(&self) -> usize {
        self.tokens.len()
    }
}

/// What a low-rank path keeps for backward.
struct LowRankActs {
    /// drop(x)·Aᵀ, `[rows, r]`.
    u: Vec<f32>,
    /// Dropout multipliers (0 or 1/(1−p)) per input element, when dropout was applied.
    keep: Option<Vec<f32>>,
}

/// Everything one layer's backward reads. Head-major tensors are `[batch, heads, seq, head_dim]`.
struct LayerActs {
    x_in: Vec<f32>,
    rstd1: Vec<f32>,
    xn1: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    lse: Vec<f32>,
    attn_tokens: Vec<f32>,
    h2: Vec<f32>,
    rstd2: Vec<f32>,
    xn2: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    act: Vec<f32>,
    lowrank: Vec<Option<LowRankActs>>,
}

/// y = lin(x) + scale·(drop(x)·Aᵀ)·Bᵀ.
fn linear_forward(lin: &Linear, lr: Option<LowRank>, x: &[f32], rows: usize, y: &mut [f32], rng: Option<&mut Rng>) -> Option<LowRankActs> {
    lin.forward(x, rows, y);
    let lr = lr?;
    let keep = match rng {
        Some(rng) if lr.dropout > 0.0 => {
            let kept = 1.0 / (1.0 - lr.dropout);
            Some((0..x.len()).map(|_| if rng.next_f32() < lr.dropout { 0.0 } else { kept }).collect::<Vec<f32>>())
        }
        _ => None,
    };
    let dropped: Option<Vec<f32>> = keep.as_ref().map(|k| x.iter().zip(k).map(|(a, b)| a * b).collect());
    let xd = dropped.as_deref().unwrap_or(x);
    let mut u = vec![0.0; rows * lr.r];
    matmul(&mut u, xd, false, lr.a, true, rows, lr.r, lin.in_features, 1.0, false);
    matmul(y, &u, false, lr.b, true, rows, lin.out_features, lr.r, lr.scale, true);
    Some(LowRankActs { u, keep })
}

/// Backward of `linear_forward`: accumulates dA, dB into `grads`, and writes (or, with
/// `accumulate`, adds) dL/dx into `dx` when it is wanted. W and its bias are frozen.
#[allow(clippy::too_many_arguments)]
fn linear_backward(
    lin: &Linear, lr: Option<LowRank>, acts: Option<&LowRankActs>, x: &[f32], dy: &[f32], rows: usize,
    grads: &mut [f32], dx: Option<&mut [f32]>, accumulate: bool,
) {
    let (inf, outf) = (lin.in_features, lin.out_features);
    let mut dx = dx;
    if let Some(dx) = dx.as_deref_mut() {
        matmul(dx, dy, false, &lin.w, false, rows, inf, outf, 1.0, accumulate);
    }
    let (Some(lr), Some(acts)) = (lr, acts) else { return };
    let r = lr.r;
    let (ga, rest) = grads[lr.grad_offset..].split_at_mut(r * inf);
    let gb = &mut rest[..outf * r];
    let mut g = vec![0.0; rows * r];
    matmul(&mut g, dy, false, lr.b, false, rows, r, outf, 1.0, false);
    matmul(gb, dy, true, &acts.u, false, outf, r, rows, lr.scale, true);
    let dropped: Option<Vec<f32>> = acts.keep.as_ref().map(|k| x.iter().zip(k).map(|(a, b)| a * b).collect());
    matmul(ga, &g, true, dropped.as_deref().unwrap_or(x), false, r, inf, rows, lr.scale, true);
    if let Some(dx) = dx {
        match &acts.keep {
            None => matmul(dx, &g, false, lr.a, false, rows, inf, r, lr.scale, true),
            Some(keep) => {
                let mut t = vec![0.0; rows * inf];
                matmul(&mut t, &g, false, lr.a, false, rows, inf, r, lr.scale, false);
                for ((d, t), k) in dx.iter_mut().zip(&t).zip(keep) {
                    *d += t * k;
                }
            }
        }
    }
}

impl DecoderModel {
    /// Loads a Hugging Face model directory (config.json + safetensors).
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!("model directory {} does not exist", dir.display());
        }
        let config = DecoderConfig::from_file(&dir.join("config.json"))?;
        let store = TensorStore::open_dir(dir)?;
        Self::from_store(config, &store)
    }

    pub fn from_store(config: DecoderConfig, st: &TensorStore) -> Result<Self> {
        let c = &config;
        let (d, hd) = (c.hidden_size, c.head_dim);
        let mut layers = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            let p = format!("model.layers.{l}");
            let mut linear = Vec::with_capacity(7);
            for kind in ModuleKind::ALL {
                let (inf, outf) = Self::module_shape(c, kind);
                let has_bias = match kind {
                    ModuleKind::Q | ModuleKind::K | ModuleKind::V => c.qkv_bias,
                    ModuleKind::O => c.o_bias,
                    _ => c.mlp_bias,
                };
                let name = format!("{p}.{}", kind.path());
                let bias = if has_bias { Some(st.f32(&format!("{name}.bias"), &[outf])?) } else { None };
                linear.push(Linear { w: st.f32(&format!("{name}.weight"), &[outf, inf])?, bias, in_features: inf, out_features: outf });
            }
            layers.push(Layer {
                attn_norm: st.f32(&format!("{p}.input_layernorm.weight"), &[d])?,
                mlp_norm: st.f32(&format!("{p}.post_attention_layernorm.weight"), &[d])?,
                linear,
            });
        }
        let lm_head = if c.tie_word_embeddings { None } else { Some(st.f32("lm_head.weight", &[c.vocab_size, d])?) };
        let inv_freq = inverse_frequencies(hd, c.rope_theta, &c.rope_scaling);
        Ok(DecoderModel {
            embed: st.f32("model.embed_tokens.weight", &[c.vocab_size, d])?,
            norm: st.f32("model.norm.weight", &[d])?,
            layers,
            lm_head,
            inv_freq,
            config,
        })
    }

    /// (in_features, out_features) of a module under `config`.
    pub fn module_shape(c: &DecoderConfig, kind: ModuleKind) -> (usize, usize) {
        let (d, i) = (c.hidden_size, c.intermediate_size);
        let (qd, kvd) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        match kind {
            ModuleKind::Q => (d, qd),
            ModuleKind::K | ModuleKind::V => (d, kvd),
            ModuleKind::O => (qd, d),
            ModuleKind::Gate | ModuleKind::Up => (d, i),
            ModuleKind::Down => (i, d),
        }
    }

    /// Every linear module an adapter may target: (name, layer, kind, in, out).
    pub fn linear_modules(&self) -> Vec<(String, usize, ModuleKind, usize, usize)> {
        (0..self.config.num_layers)
            .flat_map(|l| {
                ModuleKind::ALL.into_iter().map(move |k| {
                    let (i, o) = Self::module_shape(&self.config, k);
                    (module_name(l, k), l, k, i, o)
                })
            })
            .collect()
    }

    /// Number of base parameters, counted as PyTorch counts them (a tied head once).
    pub fn num_params(&self) -> usize {
        let per_layer: usize = self.layers[0].linear.iter().map(|l| l.w.len() + l.bias.as_ref().map_or(0, Vec::len)).sum::<usize>()
            + 2 * self.config.hidden_size;
        self.embed.len() + per_layer * self.layers.len() + self.norm.len() + self.lm_head.as_ref().map_or(0, Vec::len)
    }

    fn head(&self) -> &[f32] {
        self.lm_head.as_deref().unwrap_or(&self.embed)
    }

    fn check_tokens(&self, batch: &Batch) -> Result<()> {
        if let Some(&t) = batch.tokens.iter().find(|&&t| t as usize >= self.config.vocab_size) {
            bail!("token id {t} is outside the vocabulary of {} tokens", self.config.vocab_size);
        }
        Ok(())
    }

    fn embed_tokens(&self, tokens: &[u32]) -> Vec<f32> {
        let d = self.config.hidden_size;
        let mut h = vec![0.0; tokens.len() * d];
        for (row, &t) in h.chunks_mut(d).zip(tokens) {
            row.copy_from_slice(&self.embed[t as usize * d..(t as usize + 1) * d]);
        }
        h
    }

    fn attn_shape(&self, batch: &Batch) -> AttnShape {
        let c = &self.config;
        AttnShape {
            batch: batch.batch_size,
            heads: c.num_heads,
            kv_heads: c.num_kv_heads,
            q_len: batch.seq_len,
            kv_len: batch.seq_len,
            head_dim: c.head_dim,
            q_offset: 0,
            window: c.sliding_window,
        }
    }

    fn rope_angles(&self, batch: &Batch) -> RopeAngles {
        let positions: Vec<u32> = (0..batch.tokens.len()).map(|i| (i % batch.seq_len) as u32).collect();
        RopeAngles::new(&self.inv_freq, &positions)
    }

    /// One layer forward; `h` (`[tokens, hidden]`) is updated in place and the saved
    /// activations are returned.
    fn layer_forward(&self, l: usize, h: &mut [f32], batch: &Batch, angles: &RopeAngles, ad: &dyn LowRankSource, mut rng: Option<&mut Rng>) -> LayerActs {
        let c = &self.config;
        let layer = &self.layers[l];
        let n = batch.tokens.len();
        let (d, hd) = (c.hidden_size, c.head_dim);
        let (qd, kvd) = (c.num_heads * hd, c.num_kv_heads * hd);
        let lin = |k: ModuleKind| &layer.linear[k.index()];
        let mut lowrank: Vec<Option<LowRankActs>> = (0..7).map(|_| None).collect();
        let mut proj = |k: ModuleKind, x: &[f32], out: usize, lowrank: &mut Vec<Option<LowRankActs>>| {
            let mut y = vec![0.0; n * out];
            lowrank[k.index()] = linear_forward(lin(k), ad.lookup(l, k), x, n, &mut y, rng.as_deref_mut());
            y
        };

        let x_in = h.to_vec();
        let mut xn1 = vec![0.0; n * d];
        let mut rstd1 = vec![0.0; n];
        rmsnorm_forward(h, &layer.attn_norm, c.rms_norm_eps, &mut xn1, &mut rstd1);
        let q_tok = proj(ModuleKind::Q, &xn1, qd, &mut lowrank);
        let k_tok = proj(ModuleKind::K, &xn1, kvd, &mut lowrank);
        let v_tok = proj(ModuleKind::V, &xn1, kvd, &mut lowrank);
        let ql = HeadLayout { batch: batch.batch_size, seq: batch.seq_len, heads: c.num_heads, head_dim: hd };
        let kl = HeadLayout { heads: c.num_kv_heads, ..ql };
        let (mut q, mut k, mut v) = (vec![0.0; n * qd], vec![0.0; n * kvd], vec![0.0; n * kvd]);
        to_heads(&q_tok, &mut q, ql, Some(angles));
        to_heads(&k_tok, &mut k, kl, Some(angles));
        to_heads(&v_tok, &mut v, kl, None);
        let shape = self.attn_shape(batch);
        let mut attn = vec![0.0; n * qd];
        let mut lse = vec![0.0; batch.batch_size * c.num_heads * batch.seq_len];
        attention_forward(&q, &k, &v, &batch.mask, shape, &mut attn, &mut lse);
        let mut attn_tokens = vec![0.0; n * qd];
        from_heads(&attn, &mut attn_tokens, ql, None);
        let o = proj(ModuleKind::O, &attn_tokens, d, &mut lowrank);
        for (hv, ov) in h.iter_mut().zip(&o) {
            *hv += ov;
        }

        let h2 = h.to_vec();
        let mut xn2 = vec![0.0; n * d];
        let mut rstd2 = vec![0.0; n];
        rmsnorm_forward(h, &layer.mlp_norm, c.rms_norm_eps, &mut xn2, &mut rstd2);
        let gate = proj(ModuleKind::Gate, &xn2, c.intermediate_size, &mut lowrank);
        let up = proj(ModuleKind::Up, &xn2, c.intermediate_size, &mut lowrank);
        let mut act = vec![0.0; gate.len()];
        activations::swiglu_forward(&gate, &up, &mut act);
        let m = proj(ModuleKind::Down, &act, d, &mut lowrank);
        for (hv, mv) in h.iter_mut().zip(&m) {
            *hv += mv;
        }
        LayerActs { x_in, rstd1, xn1, q, k, v, attn, lse, attn_tokens, h2, rstd2, xn2, gate, up, act, lowrank }
    }

    /// One layer backward. On entry `dh` is dL/d(layer output); on return dL/d(layer input)
    /// (unless `need_input_grad` is false, when only the adapter gradients are wanted).
    #[allow(clippy::too_many_arguments)]
    fn layer_backward(&self, l: usize, a: &LayerActs, dh: &mut [f32], batch: &Batch, angles: &RopeAngles, ad: &dyn LowRankSource, grads: &mut [f32], need_input_grad: bool) {
        let c = &self.config;
        let layer = &self.layers[l];
        let n = batch.tokens.len();
        let (d, hd, inter) = (c.hidden_size, c.head_dim, c.intermediate_size);
        let (qd, kvd) = (c.num_heads * hd, c.num_kv_heads * hd);
        let lin = |k: ModuleKind| &layer.linear[k.index()];
        let lra = |k: ModuleKind| a.lowrank[k.index()].as_ref();

        // MLP: h3 = h2 + down(swiglu(gate(xn2), up(xn2))), xn2 = rmsnorm(h2)
        let mut dact = vec![0.0; n * inter];
        linear_backward(lin(ModuleKind::Down), ad.lookup(l, ModuleKind::Down), lra(ModuleKind::Down), &a.act, dh, n, grads, Some(&mut dact), false);
        let (mut dgate, mut dup) = (vec![0.0; n * inter], vec![0.0; n * inter]);
        activations::swiglu_backward(&a.gate, &a.up, &dact, &mut dgate, &mut dup);
        let mut dxn2 = vec![0.0; n * d];
        linear_backward(lin(ModuleKind::Gate), ad.lookup(l, ModuleKind::Gate), lra(ModuleKind::Gate), &a.xn2, &dgate, n, grads, Some(&mut dxn2), false);
        linear_backward(lin(ModuleKind::Up), ad.lookup(l, ModuleKind::Up), lra(ModuleKind::Up), &a.xn2, &dup, n, grads, Some(&mut dxn2), true);
        rmsnorm_backward(&dxn2, &a.h2, &layer.mlp_norm, &a.rstd2, dh);

        // Attention: h2 = x + o_proj(attn(rope(q(xn1)), rope(k(xn1)), v(xn1))), xn1 = rmsnorm(x)
        let mut dattn_tok = vec![0.0; n * qd];
        linear_backward(lin(ModuleKind::O), ad.lookup(l, ModuleKind::O), lra(ModuleKind::O), &a.attn_tokens, dh, n, grads, Some(&mut dattn_tok), false);
        let ql = HeadLayout { batch: batch.batch_size, seq: batch.seq_len, heads: c.num_heads, head_dim: hd };
        let kl = HeadLayout { heads: c.num_kv_heads, ..ql };
        let mut dattn = vec![0.0; n * qd];
        to_heads(&dattn_tok, &mut dattn, ql, None);
        let (mut dq, mut dk, mut dv) = (vec![0.0; n * qd], vec![0.0; n * kvd], vec![0.0; n * kvd]);
        attention_backward(&a.q, &a.k, &a.v, &batch.mask, self.attn_shape(batch), &a.attn, &a.lse, &dattn, &mut dq, &mut dk, &mut dv);
        let (mut dq_tok, mut dk_tok, mut dv_tok) = (vec![0.0; n * qd], vec![0.0; n * kvd], vec![0.0; n * kvd]);
        from_heads(&dq, &mut dq_tok, ql, Some(angles));
        from_heads(&dk, &mut dk_tok, kl, Some(angles));
        from_heads(&dv, &mut dv_tok, kl, None);
        let mut dxn1 = if need_input_grad { vec![0.0; n * d] } else { Vec::new() };
        for (i, (kind, dy)) in [(ModuleKind::Q, &dq_tok), (ModuleKind::K, &dk_tok), (ModuleKind::V, &dv_tok)].into_iter().enumerate() {
            let dx = if need_input_grad { Some(dxn1.as_mut_slice()) } else { None };
            linear_backward(lin(kind), ad.lookup(l, kind), lra(kind), &a.xn1, dy, n, grads, dx, i > 0);
        }
        if need_input_grad {
            rmsnorm_backward(&dxn1, &a.x_in, &layer.attn_norm, &a.rstd1, dh);
        }
    }

    /// Final hidden states after the last norm, `[tokens, hidden]`, keeping per-layer activations
    /// from layer `keep_from` on when training (`keep_from = num_layers` keeps none).
    fn trunk(&self, batch: &Batch, ad: &dyn LowRankSource, mut rng: Option<&mut Rng>, keep_from: usize) -> (Vec<f32>, Vec<LayerActs>, Vec<f32>, Vec<f32>, RopeAngles) {
        let angles = self.rope_angles(batch);
        let mut h = self.embed_tokens(&batch.tokens);
        let mut kept = Vec::new();
        for l in 0..self.config.num_layers {
            let acts = self.layer_forward(l, &mut h, batch, &angles, ad, rng.as_deref_mut());
            if l >= keep_from {
                kept.push(acts);
            }
        }
        let n = batch.tokens.len();
        let mut xf = vec![0.0; n * self.config.hidden_size];
        let mut rstd = vec![0.0; n];
        rmsnorm_forward(&h, &self.norm, self.config.rms_norm_eps, &mut xf, &mut rstd);
        (xf, kept, h, rstd, angles)
    }

    /// Logits `[batch·seq, vocab]` for every position (no dropout).
    pub fn forward(&self, batch: &Batch, ad: &dyn LowRankSource) -> Result<Vec<f32>> {
        self.check_tokens(batch)?;
        let (xf, ..) = self.trunk(batch, ad, None, self.config.num_layers);
        let (n, d, v) = (batch.tokens.len(), self.config.hidden_size, self.config.vocab_size);
        let mut logits = vec![0.0; n * v];
        matmul(&mut logits, &xf, false, self.head(), true, n, v, d, 1.0, false);
        Ok(logits)
    }

    /// Summed cross-entropy over the rows with a target (no gradients, no dropout).
    pub fn loss(&self, batch: &Batch, targets: &[Option<u32>], ad: &dyn LowRankSource) -> Result<LossSum> {
        self.check_tokens(batch)?;
        let (xf, ..) = self.trunk(batch, ad, None, self.config.num_layers);
        Ok(lm_head_cross_entropy(&xf, self.head(), self.config.hidden_size, targets, 0.0, None))
    }

    /// Forward and backward for one micro-batch. Adds `grad_scale · dL/dθ` for every adapter
    /// parameter θ into `grads` (laid out like the adapter's parameters) and returns the summed
    /// loss. Use `grad_scale = 1/(targets counted over all accumulated micro-batches)` for
    /// transformers' mean loss. `rng` drives LoRA dropout; `None` disables it.
    pub fn loss_and_grads(&self, batch: &Batch, targets: &[Option<u32>], ad: &dyn LowRankSource, grads: &mut [f32], grad_scale: f32, rng: Option<&mut Rng>) -> Result<LossSum> {
        self.check_tokens(batch)?;
        if targets.len() != batch.tokens.len() {
            bail!("{} targets for {} tokens", targets.len(), batch.tokens.len());
        }
        let c = &self.config;
        // Layers below the lowest adapted one need no backward at all.
        let lowest = (0..c.num_layers).find(|&l| ModuleKind::ALL.iter().any(|&k| ad.lookup(l, k).is_some()));
        let Some(lowest) = lowest else { bail!("the adapter attaches to no module of this model") };
        let (xf, acts, h_last, rstd, angles) = self.trunk(batch, ad, rng, lowest);
        let n = batch.tokens.len();
        let mut dxf = vec![0.0; n * c.hidden_size];
        let loss = lm_head_cross_entropy(&xf, self.head(), c.hidden_size, targets, grad_scale, Some(&mut dxf));
        let mut dh = vec![0.0; n * c.hidden_size];
        rmsnorm_backward(&dxf, &h_last, &self.norm, &rstd, &mut dh);
        for (i, a) in acts.iter().enumerate().rev() {
            let l = lowest + i;
            self.layer_backward(l, a, &mut dh, batch, &angles, ad, grads, l > lowest);
        }
        Ok(loss)
    }
}
