//! The decoder family (Llama, SmolLM2, Mistral, Qwen2): forward and hand-derived backward.
//!
//! Base weights are frozen: the backward pass produces gradients only for the low-rank adapters
//! and for the activations needed to reach them. Per layer, the forward pass keeps exactly the
//! tensors its backward reads (`LayerActs`).

use super::adapt::{
    linear_backward, linear_forward, linear_forward_segments, module_name, project, Linear, LowRank, LowRankActs, LowRankSource,
    ModuleKind, ModuleSpec, Segment,
};
use super::buffers::{self, with_saved, Buf, Saved};
use super::config::DecoderConfig;
use super::frozen::{FrozenMatrix, WeightFormat};
use super::weights::{TensorStore, WeightSource};
use crate::kernels::attention::{attention_backward, attention_forward, AttnShape};
use crate::kernels::loss::{lm_head_cross_entropy, LossSum};
use crate::kernels::norm::{rmsnorm_apply, rmsnorm_backward, rmsnorm_forward};
use crate::kernels::rope::{from_heads, inverse_frequencies, to_heads, HeadLayout, RopeAngles};
use crate::kernels::{activations, bf16};
use crate::rng::Rng;
use anyhow::{bail, Result};
use std::path::Path;

pub struct Layer {
    pub attn_norm: Vec<f32>,
    pub mlp_norm: Vec<f32>,
    /// Indexed by `ModuleKind::index()`.
    pub linear: Vec<Linear>,
}

pub struct DecoderModel {
    pub config: DecoderConfig,
    pub embed: FrozenMatrix,
    pub layers: Vec<Layer>,
    pub norm: Vec<f32>,
    /// `None` when the head is tied to the embedding matrix.
    pub lm_head: Option<FrozenMatrix>,
    inv_freq: Vec<f32>,
    /// Keep only each layer's input during the forward pass and recompute the layer right before
    /// its backward (gradient checkpointing): far less memory for one extra forward pass.
    pub gradient_checkpointing: bool,
}

/// What the forward pass keeps of a layer for the backward pass.
enum Kept {
    All(Box<LayerActs>),
    /// Gradient checkpointing: the layer's input and the dropout RNG state it started from.
    Input(Vec<f32>, Option<[u64; 4]>),
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

/// What one pass over the layers needs besides weights: the attention shape (queries, keys,
/// their positions), the key mask and the rotary angles of the new tokens.
struct StepCtx<'a> {
    shape: AttnShape,
    key_mask: &'a [bool],
    angles: RopeAngles,
}

impl StepCtx<'_> {
    fn tokens(&self) -> usize {
        self.shape.batch * self.shape.q_len
    }
    fn layout(&self, heads: usize) -> HeadLayout {
        HeadLayout { batch: self.shape.batch, seq: self.shape.q_len, heads, head_dim: self.shape.head_dim }
    }
}

/// The keys and values one sequence has seen, per layer `[kv_heads, capacity, head_dim]`, for
/// incremental decoding. Each sequence owns its cache: sequences of a batch may stand at
/// different positions, join a running batch or leave it (dropping the cache frees its memory).
/// A base stored as bf16, Q8_0 or Q4_1 keeps its cache in bf16 (as PyTorch's bf16 models and
/// llama.cpp's f16 cache do): decoding many sequences reads every cache each step, and that
/// traffic halves (`DecoderModel::kv_in_bf16`).
pub struct SeqCache {
    kv: Kv,
    /// The attention key mask: a sequence's own positions are never padding (which of them a
    /// query sees is the causal rule's and the window's), so it is all true.
    visible: Vec<bool>,
    len: usize,
    capacity: usize,
}

impl SeqCache {
    /// Positions stored so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes the cache holds.
    pub fn bytes(&self) -> usize {
        match &self.kv {
            Kv::F32 { k, v } => 4 * k.iter().chain(v).map(Vec::len).sum::<usize>(),
            Kv::Bf16 { k, v } => 2 * k.iter().chain(v).map(Vec::len).sum::<usize>(),
        }
    }

    /// Stores `new` positions of layer `layer` (head-major `[kv_heads, new, head_dim]`) after the
    /// cached ones.
    fn store(&mut self, layer: usize, k_new: &[f32], v_new: &[f32], kv_heads: usize, hd: usize, new: usize) {
        let (capacity, len) = (self.capacity, self.len);
        let span = |h: usize| (h * capacity + len) * hd..(h * capacity + len + new) * hd;
        match &mut self.kv {
            Kv::F32 { k, v } => {
                for (cache, src) in [(&mut k[layer], k_new), (&mut v[layer], v_new)] {
                    for h in 0..kv_heads {
                        cache[span(h)].copy_from_slice(&src[h * new * hd..(h + 1) * new * hd]);
                    }
                }
            }
            Kv::Bf16 { k, v } => {
                for (cache, src) in [(&mut k[layer], k_new), (&mut v[layer], v_new)] {
                    for h in 0..kv_heads {
                        bf16::round_into(&src[h * new * hd..(h + 1) * new * hd], &mut cache[span(h)]);
                    }
                }
            }
        }
    }
}

/// A cache's keys and values per layer, in f32 or bf16 (see `SeqCache`).
enum Kv {
    F32 { k: Vec<Vec<f32>>, v: Vec<Vec<f32>> },
    Bf16 { k: Vec<Vec<u16>>, v: Vec<Vec<u16>> },
}

/// One sequence's part of an inference step: its cache, the tokens it adds (a prompt, a chunk
/// of one, or the last sampled token) and the adapter it runs with, with a scale.
pub struct SeqStep<'a> {
    pub cache: &'a mut SeqCache,
    pub tokens: &'a [u32],
    pub adapter: Option<(&'a dyn LowRankSource, f32)>,
}

/// Where one sequence's new tokens sit in a step's rows, with their rotary angles.
struct SeqRows<'a> {
    cache: &'a mut SeqCache,
    start: usize,
    new: usize,
    angles: RopeAngles,
}

/// Runs one linear module of a layer on token rows: (module, input, output width) → output.
type Project<'a> = dyn FnMut(ModuleKind, &[f32], usize) -> Buf + 'a;
/// Token-major q, k, v → token-major attention output, and what backward needs of it.
type Attend<'a> = dyn FnMut(&[f32], &[f32], &[f32]) -> (Buf, Option<AttnActs>) + 'a;
/// A run of a step's rows and the adapter (with its scale) they run with.
type RowRun<'a> = (std::ops::Range<usize>, Option<(&'a dyn LowRankSource, f32)>);

/// What a layer's attention keeps for the backward pass (head-major).
struct AttnActs {
    q: Buf,
    k: Buf,
    v: Buf,
    attn: Buf,
    lse: Vec<f32>,
}

/// What one layer pass produced besides its output.
struct PassActs {
    x_in: Saved,
    rstd1: Vec<f32>,
    attn: Option<AttnActs>,
    h2: Saved,
    rstd2: Vec<f32>,
    gate: Saved,
    up: Saved,
}

/// Everything one layer's backward reads. Head-major tensors are `[batch, heads, seq, head_dim]`.
/// Cheap elementwise results (normed inputs, the SwiGLU output, the token-major attention
/// output) are recomputed in the backward pass instead of being kept. The large ones are kept in
/// bf16 when the model runs in bf16 (see `Saved`).
struct LayerActs {
    x_in: Saved,
    rstd1: Vec<f32>,
    q: Saved,
    k: Saved,
    v: Saved,
    attn: Saved,
    lse: Vec<f32>,
    h2: Saved,
    rstd2: Vec<f32>,
    gate: Saved,
    up: Saved,
    lowrank: Vec<Option<LowRankActs>>,
}

impl DecoderModel {
    /// Loads a Hugging Face model directory (config.json + safetensors).
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        Self::from_hf_dir_as(dir, WeightFormat::F32)
    }

    /// As `from_hf_dir`, with the frozen matrices stored in `format`.
    pub fn from_hf_dir_as(dir: &Path, format: WeightFormat) -> Result<Self> {
        if !dir.is_dir() {
            bail!("model directory {} does not exist", dir.display());
        }
        let config = DecoderConfig::from_file(&dir.join("config.json"))?;
        let store = TensorStore::open_dir(dir)?;
        Self::from_weights(config, &store, format)
    }

    /// Loads a single GGUF file (llama or qwen2 architecture); quantized tensors are dequantized
    /// and stored again in `format`.
    pub fn from_gguf(file: &super::gguf::GgufFile, format: WeightFormat) -> Result<Self> {
        let config = super::gguf::decoder_config(file)?;
        let weights = super::gguf::GgufWeights { file, config: &config };
        Self::from_weights(config.clone(), &weights, format)
    }

    /// Reads every tensor from `st`, one at a time, storing each frozen matrix in `format` right
    /// away (so loading never holds the whole model in f32).
    pub fn from_weights(config: DecoderConfig, st: &dyn WeightSource, format: WeightFormat) -> Result<Self> {
        // Every tensor is checked finite as it loads: a NaN or infinity in a model file would
        // silently poison every output.
        let load = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
            let v = st.f32(name, shape)?;
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                bail!("tensor {name} holds a non-finite value ({}) at element {i}", v[i]);
            }
            Ok(v)
        };
        let st = &load;
        let c = &config;
        c.validate()?;
        crate::limits::ensure_memory(Self::weight_bytes_for(c, format), &format!("the model's weights in {}", format.name()))?;
        let (d, hd) = (c.hidden_size, c.head_dim);
        let mut layers = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            let p = format!("model.layers.{l}");
            let mut linear = Vec::with_capacity(7);
            for kind in ModuleKind::ALL {
                let (inf, outf) = Self::module_shape(c, kind);
                let has_bias = Self::module_has_bias(c, kind);
                let name = format!("{p}.{}", kind.path());
                let bias = if has_bias { Some(st(&format!("{name}.bias"), &[outf])?) } else { None };
                let w = FrozenMatrix::new(outf, inf, st(&format!("{name}.weight"), &[outf, inf])?, format);
                linear.push(Linear { w, bias, in_features: inf, out_features: outf });
            }
            layers.push(Layer {
                attn_norm: st(&format!("{p}.input_layernorm.weight"), &[d])?,
                mlp_norm: st(&format!("{p}.post_attention_layernorm.weight"), &[d])?,
                linear,
            });
        }
        let matrix = |name: &str| -> Result<FrozenMatrix> { Ok(FrozenMatrix::new(c.vocab_size, d, st(name, &[c.vocab_size, d])?, format)) };
        let lm_head = if c.tie_word_embeddings { None } else { Some(matrix("lm_head.weight")?) };
        let inv_freq = inverse_frequencies(hd, c.rope_theta, &c.rope_scaling);
        Ok(DecoderModel {
            embed: matrix("model.embed_tokens.weight")?,
            norm: st("model.norm.weight", &[d])?,
            layers,
            lm_head,
            inv_freq,
            gradient_checkpointing: false,
            config,
        })
    }

    /// A model with random weights from a fixed seed (for tests and benchmarks): linear weights
    /// N(0, 0.08²), norms 1 + N(0, 0.1²), biases N(0, 0.1²).
    pub fn random(config: DecoderConfig, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let mut randn = |n: usize, scale: f32, shift: f32| -> Vec<f32> { (0..n).map(|_| shift + scale * rng.normal()).collect() };
        let c = &config;
        let d = c.hidden_size;
        let layers = (0..c.num_layers)
            .map(|_| {
                let linear = ModuleKind::ALL
                    .iter()
                    .map(|&kind| {
                        let (inf, outf) = Self::module_shape(c, kind);
                        let has_bias = Self::module_has_bias(c, kind);
                        Linear {
                            w: FrozenMatrix::new(outf, inf, randn(inf * outf, 0.08, 0.0), WeightFormat::F32),
                            bias: has_bias.then(|| randn(outf, 0.1, 0.0)),
                            in_features: inf,
                            out_features: outf,
                        }
                    })
                    .collect();
                Layer { attn_norm: randn(d, 0.1, 1.0), mlp_norm: randn(d, 0.1, 1.0), linear }
            })
            .collect();
        DecoderModel {
            embed: FrozenMatrix::new(c.vocab_size, d, randn(c.vocab_size * d, 0.5, 0.0), WeightFormat::F32),
            norm: randn(d, 0.1, 1.0),
            lm_head: (!c.tie_word_embeddings)
                .then(|| FrozenMatrix::new(c.vocab_size, d, randn(c.vocab_size * d, 0.08, 0.0), WeightFormat::F32)),
            layers,
            inv_freq: inverse_frequencies(c.head_dim, c.rope_theta, &c.rope_scaling),
            gradient_checkpointing: false,
            config,
        }
    }

    /// Stores every frozen matrix again in `format` (models made by `random`, benchmarks).
    pub fn store_as(&mut self, format: WeightFormat) {
        let again = |m: &FrozenMatrix| FrozenMatrix::new(m.rows, m.cols, m.to_f32(), format);
        for lin in self.layers.iter_mut().flat_map(|l| l.linear.iter_mut()) {
            lin.w = again(&lin.w);
        }
        self.embed = again(&self.embed);
        if let Some(h) = &mut self.lm_head {
            *h = again(h);
        }
    }

    /// Whether attention's products run on AMX bf16 tiles (or their AVX512-BF16 counterpart):
    /// when the linear products do (a base stored as bf16, Q8_0 or Q4_1 on a CPU whose product
    /// unit rounds to bf16), so that one precision runs through the model, as in PyTorch's bf16.
    fn attention_on_tiles(&self) -> bool {
        crate::kernels::amx::products_round_to_bf16() && self.base_not_f32()
    }

    /// Whether training keeps a layer's input, residual and MLP gate and up for the backward pass
    /// in bf16: when the linear products run in bf16 (a base that is not f32, on any
    /// `amx::product_unit`), which round their inputs to bf16 or finer anyway — as PyTorch keeps a
    /// bf16 model's. (Attention's q, k, v and output follow `attention_on_tiles`.)
    fn keeps_bf16(&self) -> bool {
        crate::kernels::amx::products_available() && self.base_not_f32()
    }

    /// Whether the base is stored in a format other than f32 (bf16, Q8_0, Q4_1).
    fn base_not_f32(&self) -> bool {
        self.layers.first().is_some_and(|l| l.linear[ModuleKind::Q.index()].w.format() != WeightFormat::F32)
    }

    /// Whether inference keeps its KV cache in bf16: for a base that is not f32 (bf16, Q8_0,
    /// Q4_1), with or without AMX. Decoding many sequences is bound by reading their caches
    /// (on a 2-core Xeon without AMX, 16 sequences at ~145 positions read 107 MB of f32 keys and
    /// values per step); bf16 halves that, as llama.cpp's default f16 cache does. An f32 base keeps
    /// an f32 cache, so that its decoding stays exact.
    fn kv_in_bf16(&self) -> bool {
        self.base_not_f32()
    }

    /// Whether a module carries a (frozen) bias under `config`.
    fn module_has_bias(c: &DecoderConfig, kind: ModuleKind) -> bool {
        match kind {
            ModuleKind::Q | ModuleKind::K | ModuleKind::V => c.qkv_bias,
            ModuleKind::O => c.o_bias,
            _ => c.mlp_bias,
        }
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

    /// Every linear module an adapter may target.
    pub fn linear_modules(&self) -> Vec<ModuleSpec> {
        (0..self.config.num_layers)
            .flat_map(|layer| {
                ModuleKind::ALL.into_iter().map(move |kind| {
                    let (in_features, out_features) = Self::module_shape(&self.config, kind);
                    ModuleSpec { name: module_name(layer, kind), layer, kind, in_features, out_features }
                })
            })
            .collect()
    }

    /// Number of base parameters, counted as PyTorch counts them (a tied head once).
    pub fn num_params(&self) -> usize {
        let per_layer: usize = self.layers[0].linear.iter().map(|l| l.w.len() + l.bias.as_ref().map_or(0, Vec::len)).sum::<usize>()
            + 2 * self.config.hidden_size;
        self.embed.len() + per_layer * self.layers.len() + self.norm.len() + self.lm_head.as_ref().map_or(0, FrozenMatrix::len)
    }

    /// Bytes the frozen weights of a model with config `c` take in `format`, computed without
    /// overflow from sizes that may come from a hostile file.
    pub fn weight_bytes_for(c: &DecoderConfig, format: WeightFormat) -> u128 {
        let matrices: u128 = ModuleKind::ALL
            .iter()
            .map(|&k| {
                let (i, o) = Self::module_shape(c, k);
                i as u128 * o as u128
            })
            .sum();
        let heads = if c.tie_word_embeddings { 1 } else { 2 };
        let small = 4 * (2 * c.hidden_size as u128 + 3 * c.intermediate_size as u128);
        c.num_layers as u128 * (format.bytes_for(matrices) + small) + format.bytes_for(heads * c.vocab_size as u128 * c.hidden_size as u128)
    }

    /// Bytes the frozen weights occupy in memory.
    pub fn weight_bytes(&self) -> usize {
        let linear: usize = self.layers.iter().flat_map(|l| &l.linear).map(|m| m.w.bytes() + 4 * m.bias.as_ref().map_or(0, Vec::len)).sum();
        let norms = 4 * (self.norm.len() + self.layers.iter().map(|l| l.attn_norm.len() + l.mlp_norm.len()).sum::<usize>());
        self.embed.bytes() + self.lm_head.as_ref().map_or(0, FrozenMatrix::bytes) + linear + norms
    }

    fn head(&self) -> &FrozenMatrix {
        self.lm_head.as_ref().unwrap_or(&self.embed)
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
            self.embed.row_into(t as usize, row);
        }
        h
    }

    /// Attention over `q_len` new tokens per row that follow `past` cached positions, in a key
    /// buffer of `kv_stride` positions.
    fn step_ctx<'a>(&self, batch: usize, q_len: usize, past: usize, kv_stride: usize, key_mask: &'a [bool]) -> StepCtx<'a> {
        let c = &self.config;
        let shape = AttnShape {
            batch,
            heads: c.num_heads,
            kv_heads: c.num_kv_heads,
            q_len,
            kv_len: past + q_len,
            kv_stride,
            head_dim: c.head_dim,
            q_offset: past,
            window: c.sliding_window,
            tiles: self.attention_on_tiles(),
        };
        let positions: Vec<u32> = (0..batch * q_len).map(|i| (past + i % q_len) as u32).collect();
        StepCtx { shape, key_mask, angles: RopeAngles::new(&self.inv_freq, &positions) }
    }

    fn batch_ctx<'a>(&self, batch: &'a Batch) -> StepCtx<'a> {
        self.step_ctx(batch.batch_size, batch.seq_len, 0, batch.seq_len, &batch.mask)
    }

    /// One layer over `n` token rows, `h` (`[n, hidden]`) updated in place. `proj` runs a linear
    /// module (with whatever adapters apply) and `attend` turns token-major q, k, v into the
    /// token-major attention output: the two ways of running a layer (a training batch, and
    /// sequences with KV caches) differ only there. `keep_bf16` keeps the layer's input, residual
    /// and MLP gate and up in bf16.
    fn layer_pass(&self, l: usize, h: &mut [f32], n: usize, proj: &mut Project, attend: &mut Attend, keep_bf16: bool) -> PassActs {
        let c = &self.config;
        let layer = &self.layers[l];
        let (d, hd) = (c.hidden_size, c.head_dim);
        let (qd, kvd) = (c.num_heads * hd, c.num_kv_heads * hd);
        let x_in = Saved::copy_of(h, keep_bf16);
        let mut xn1 = buffers::take(n * d);
        let mut rstd1 = vec![0.0; n];
        rmsnorm_forward(h, &layer.attn_norm, c.rms_norm_eps, &mut xn1, &mut rstd1);
        let q_tok = proj(ModuleKind::Q, &xn1, qd);
        let k_tok = proj(ModuleKind::K, &xn1, kvd);
        let v_tok = proj(ModuleKind::V, &xn1, kvd);
        let (attn_tokens, attn) = attend(&q_tok, &k_tok, &v_tok);
        let o = proj(ModuleKind::O, &attn_tokens, d);
        for (hv, ov) in h.iter_mut().zip(&o) {
            *hv += ov;
        }

        let h2 = Saved::copy_of(h, keep_bf16);
        let mut xn2 = buffers::take(n * d);
        let mut rstd2 = vec![0.0; n];
        rmsnorm_forward(h, &layer.mlp_norm, c.rms_norm_eps, &mut xn2, &mut rstd2);
        let gate = proj(ModuleKind::Gate, &xn2, c.intermediate_size);
        let up = proj(ModuleKind::Up, &xn2, c.intermediate_size);
        let mut act = buffers::take(gate.len());
        let (gate, up) = if keep_bf16 {
            let (mut gate_bf16, mut up_bf16) = (buffers::take_bf16(gate.len()), buffers::take_bf16(up.len()));
            activations::swiglu_forward_keeping_bf16(&gate, &up, &mut act, &mut gate_bf16, &mut up_bf16);
            (Saved::Bf16(gate_bf16), Saved::Bf16(up_bf16))
        } else {
            activations::swiglu_forward(&gate, &up, &mut act);
            (Saved::F32(gate), Saved::F32(up))
        };
        let m = proj(ModuleKind::Down, &act, d);
        for (hv, mv) in h.iter_mut().zip(&m) {
            *hv += mv;
        }
        PassActs { x_in, rstd1, attn, h2, rstd2, gate, up }
    }

    /// One layer forward over a batch; `h` (`[tokens, hidden]`) is updated in place and what the
    /// backward pass reads is returned. `for_backward` says whether it will be read (only then
    /// is it worth rounding to bf16).
    fn layer_forward(
        &self,
        l: usize,
        h: &mut [f32],
        ctx: &StepCtx,
        ad: &dyn LowRankSource,
        mut rng: Option<&mut Rng>,
        for_backward: bool,
    ) -> LayerActs {
        let c = &self.config;
        let layer = &self.layers[l];
        let n = ctx.tokens();
        let mut lowrank: Vec<Option<LowRankActs>> = (0..ModuleKind::ALL.len()).map(|_| None).collect();
        let mut proj = |k: ModuleKind, x: &[f32], out: usize| {
            let mut y = buffers::take(n * out);
            lowrank[k.index()] = linear_forward(&layer.linear[k.index()], ad.lookup(l, k), x, n, &mut y, rng.as_deref_mut());
            y
        };
        let mut attend = |q_tok: &[f32], k_tok: &[f32], v_tok: &[f32]| {
            let (ql, kl) = (ctx.layout(c.num_heads), ctx.layout(c.num_kv_heads));
            let (mut q, mut k, mut v) = (buffers::take(q_tok.len()), buffers::take(k_tok.len()), buffers::take(v_tok.len()));
            to_heads(q_tok, &mut q, ql, Some(&ctx.angles));
            to_heads(k_tok, &mut k, kl, Some(&ctx.angles));
            to_heads(v_tok, &mut v, kl, None);
            let mut attn = buffers::take(q.len());
            let mut lse = vec![0.0; n * c.num_heads];
            attention_forward(&q, &k, &v, ctx.key_mask, ctx.shape, &mut attn, &mut lse);
            let mut attn_tokens = buffers::take(q.len());
            from_heads(&attn, &mut attn_tokens, ql, None);
            (attn_tokens, Some(AttnActs { q, k, v, attn, lse }))
        };
        let p = self.layer_pass(l, h, n, &mut proj, &mut attend, for_backward && self.keeps_bf16());
        let AttnActs { q, k, v, attn, lse } = p.attn.expect("batch attention keeps its activations");
        // Attention's own activations only where attention computes in bf16 too: f32 attention's
        // backward recomputes the probabilities from q and k against the forward's f32 log-sums.
        let attn_bf16 = for_backward && self.attention_on_tiles();
        let keep = |values: Buf| Saved::keep(values, attn_bf16);
        LayerActs {
            x_in: p.x_in,
            rstd1: p.rstd1,
            q: keep(q),
            k: keep(k),
            v: keep(v),
            attn: keep(attn),
            lse,
            h2: p.h2,
            rstd2: p.rstd2,
            gate: p.gate,
            up: p.up,
            lowrank,
        }
    }

    /// One layer of an inference step over several sequences: the linear modules run once over
    /// all rows (each run of rows with its adapter, `segments`), attention per sequence against
    /// its own cache, which receives the new keys and values.
    fn layer_step(&self, l: usize, h: &mut [f32], seqs: &mut [SeqRows], segments: &[RowRun]) {
        let c = &self.config;
        let layer = &self.layers[l];
        let n = h.len() / c.hidden_size;
        let (hd, heads, kv_heads) = (c.head_dim, c.num_heads, c.num_kv_heads);
        let mut proj = |k: ModuleKind, x: &[f32], out: usize| {
            let segs: Vec<Segment> = segments
                .iter()
                .map(|(rows, ad)| Segment {
                    rows: rows.clone(),
                    lowrank: ad.and_then(|(src, scale)| src.lookup(l, k).map(|lr| LowRank { scale: lr.scale * scale, ..lr })),
                })
                .collect();
            let mut y = buffers::take(n * out);
            linear_forward_segments(&layer.linear[k.index()], &segs, x, n, &mut y);
            y
        };
        let mut attend = |q_tok: &[f32], k_tok: &[f32], v_tok: &[f32]| {
            use rayon::prelude::*;
            // Timed as a whole (RoPE and the cache writes included): the kernels' own timers run
            // inside the parallel loop, where they would add up both threads' time.
            let _timer = crate::profile::time(crate::profile::Phase::Attention);
            let (qd, kvd) = (heads * hd, kv_heads * hd);
            // The sequences in parallel, each against its own cache: a decode step's attention
            // per sequence is too small to split well across threads by heads alone.
            let per_seq: Vec<Vec<f32>> = seqs
                .par_iter_mut()
                .map(|s| {
                    let rows = s.start..s.start + s.new;
                    let (ql, kl) = (
                        HeadLayout { batch: 1, seq: s.new, heads, head_dim: hd },
                        HeadLayout { batch: 1, seq: s.new, heads: kv_heads, head_dim: hd },
                    );
                    let (mut q, mut k, mut v) = (vec![0.0; s.new * qd], vec![0.0; s.new * kvd], vec![0.0; s.new * kvd]);
                    to_heads(&q_tok[rows.start * qd..rows.end * qd], &mut q, ql, Some(&s.angles));
                    to_heads(&k_tok[rows.start * kvd..rows.end * kvd], &mut k, kl, Some(&s.angles));
                    to_heads(&v_tok[rows.start * kvd..rows.end * kvd], &mut v, kl, None);
                    s.cache.store(l, &k, &v, kv_heads, hd, s.new);
                    let past = s.cache.len;
                    let shape = AttnShape {
                        batch: 1,
                        heads,
                        kv_heads,
                        q_len: s.new,
                        kv_len: past + s.new,
                        kv_stride: s.cache.capacity,
                        head_dim: hd,
                        q_offset: past,
                        window: c.sliding_window,
                        tiles: self.attention_on_tiles(),
                    };
                    let mut attn = vec![0.0; q.len()];
                    let mut lse = vec![0.0; s.new * heads];
                    match &s.cache.kv {
                        Kv::F32 { k, v } => attention_forward(&q, &k[l], &v[l], &s.cache.visible, shape, &mut attn, &mut lse),
                        Kv::Bf16 { k, v } => attention_forward(&q, &k[l], &v[l], &s.cache.visible, shape, &mut attn, &mut lse),
                    }
                    let mut tokens = vec![0.0; s.new * qd];
                    from_heads(&attn, &mut tokens, ql, None);
                    tokens
                })
                .collect();
            let mut out = Vec::with_capacity(q_tok.len());
            // Sequences hold consecutive rows in order of `start` (see `step`).
            let mut order: Vec<usize> = (0..seqs.len()).collect();
            order.sort_by_key(|&i| seqs[i].start);
            for i in order {
                out.extend_from_slice(&per_seq[i]);
            }
            (Buf::from(out), None)
        };
        self.layer_pass(l, h, n, &mut proj, &mut attend, false);
    }

    /// One layer backward. On entry `dh` is dL/d(layer output); on return dL/d(layer input)
    /// (unless `need_input_grad` is false, when only the adapter gradients are wanted).
    #[allow(clippy::too_many_arguments)]
    fn layer_backward(
        &self,
        l: usize,
        a: &LayerActs,
        dh: &mut [f32],
        ctx: &StepCtx,
        ad: &dyn LowRankSource,
        grads: &mut [f32],
        need_input_grad: bool,
    ) {
        let c = &self.config;
        let layer = &self.layers[l];
        let n = ctx.tokens();
        let (d, hd, inter) = (c.hidden_size, c.head_dim, c.intermediate_size);
        let (qd, kvd) = (c.num_heads * hd, c.num_kv_heads * hd);
        let lin = |k: ModuleKind| &layer.linear[k.index()];
        let lra = |k: ModuleKind| a.lowrank[k.index()].as_ref();
        // MLP: h3 = h2 + down(swiglu(gate(xn2), up(xn2))), xn2 = rmsnorm(h2). The [tokens ×
        // intermediate] buffers are the largest of the step: two live at once (the SwiGLU output
        // becomes dL/dup, dL/dact becomes dL/dgate).
        let mut act = buffers::take(n * inter);
        with_saved!(&a.gate, |gate| with_saved!(&a.up, |up| activations::swiglu_forward(gate, up, &mut act)));
        let mut dact = buffers::take(n * inter);
        linear_backward(
            lin(ModuleKind::Down),
            ad.lookup(l, ModuleKind::Down),
            lra(ModuleKind::Down),
            &act,
            dh,
            n,
            grads,
            Some(&mut dact),
            false,
        );
        let (mut dgate, mut dup) = (dact, act);
        with_saved!(&a.gate, |gate| with_saved!(&a.up, |up| activations::swiglu_backward(gate, up, &mut dgate, &mut dup)));
        let mut xn2 = buffers::take(n * d);
        with_saved!(&a.h2, |h2| rmsnorm_apply(h2, &layer.mlp_norm, &a.rstd2, &mut xn2));
        let mut dxn2 = buffers::take(n * d);
        linear_backward(
            lin(ModuleKind::Gate),
            ad.lookup(l, ModuleKind::Gate),
            lra(ModuleKind::Gate),
            &xn2,
            &dgate,
            n,
            grads,
            Some(&mut dxn2),
            false,
        );
        linear_backward(
            lin(ModuleKind::Up),
            ad.lookup(l, ModuleKind::Up),
            lra(ModuleKind::Up),
            &xn2,
            &dup,
            n,
            grads,
            Some(&mut dxn2),
            true,
        );
        with_saved!(&a.h2, |h2| rmsnorm_backward(&dxn2, h2, &layer.mlp_norm, &a.rstd2, dh));

        // Attention: h2 = x + o_proj(attn(rope(q(xn1)), rope(k(xn1)), v(xn1))), xn1 = rmsnorm(x)
        let (ql, kl) = (ctx.layout(c.num_heads), ctx.layout(c.num_kv_heads));
        let mut attn_tokens = buffers::take(n * qd);
        let attn = a.attn.values();
        from_heads(&attn, &mut attn_tokens, ql, None);
        let mut dattn_tok = buffers::take(n * qd);
        linear_backward(
            lin(ModuleKind::O),
            ad.lookup(l, ModuleKind::O),
            lra(ModuleKind::O),
            &attn_tokens,
            dh,
            n,
            grads,
            Some(&mut dattn_tok),
            false,
        );
        // Each buffer goes as soon as it is consumed (the backward's peak is the kept activations
        // plus what one section holds).
        drop(attn_tokens);
        let mut dattn = buffers::take(n * qd);
        to_heads(&dattn_tok, &mut dattn, ql, None);
        drop(dattn_tok);
        let (mut dq, mut dk, mut dv) = (buffers::take(n * qd), buffers::take(n * kvd), buffers::take(n * kvd));
        let (q, k, v) = (a.q.values(), a.k.values(), a.v.values());
        attention_backward(&q, &k, &v, ctx.key_mask, ctx.shape, &attn, &a.lse, &dattn, &mut dq, &mut dk, &mut dv);
        drop((dattn, attn, q, k, v));
        let (mut dq_tok, mut dk_tok, mut dv_tok) = (buffers::take(n * qd), buffers::take(n * kvd), buffers::take(n * kvd));
        from_heads(&dq, &mut dq_tok, ql, Some(&ctx.angles));
        from_heads(&dk, &mut dk_tok, kl, Some(&ctx.angles));
        from_heads(&dv, &mut dv_tok, kl, None);
        drop((dq, dk, dv));
        let mut xn1 = buffers::take(n * d);
        with_saved!(&a.x_in, |x_in| rmsnorm_apply(x_in, &layer.attn_norm, &a.rstd1, &mut xn1));
        let mut dxn1 = buffers::take(if need_input_grad { n * d } else { 0 });
        for (i, (kind, dy)) in [(ModuleKind::Q, &dq_tok), (ModuleKind::K, &dk_tok), (ModuleKind::V, &dv_tok)].into_iter().enumerate() {
            let dx = if need_input_grad { Some(&mut dxn1[..]) } else { None };
            linear_backward(lin(kind), ad.lookup(l, kind), lra(kind), &xn1, dy, n, grads, dx, i > 0);
        }
        if need_input_grad {
            with_saved!(&a.x_in, |x_in| rmsnorm_backward(&dxn1, x_in, &layer.attn_norm, &a.rstd1, dh));
        }
    }

    /// Final hidden states after the last norm, `[tokens, hidden]`, keeping per-layer activations
    /// from layer `keep_from` on when training (`keep_from = num_layers` keeps none).
    fn trunk<'a>(
        &self,
        batch: &'a Batch,
        ad: &dyn LowRankSource,
        mut rng: Option<&mut Rng>,
        keep_from: usize,
    ) -> (Vec<f32>, Vec<Kept>, Vec<f32>, Vec<f32>, StepCtx<'a>) {
        let ctx = self.batch_ctx(batch);
        let mut h = self.embed_tokens(&batch.tokens);
        let mut kept = Vec::new();
        for l in 0..self.config.num_layers {
            let input = (l >= keep_from && self.gradient_checkpointing).then(|| Kept::Input(h.clone(), rng.as_deref().map(Rng::state)));
            let acts = self.layer_forward(l, &mut h, &ctx, ad, rng.as_deref_mut(), input.is_none() && l >= keep_from);
            if l >= keep_from {
                kept.push(input.unwrap_or_else(|| Kept::All(Box::new(acts))));
            }
        }
        let n = batch.tokens.len();
        let mut xf = vec![0.0; n * self.config.hidden_size];
        let mut rstd = vec![0.0; n];
        rmsnorm_forward(&h, &self.norm, self.config.rms_norm_eps, &mut xf, &mut rstd);
        (xf, kept, h, rstd, ctx)
    }

    /// Logits `[batch·seq, vocab]` for every position (no dropout).
    pub fn forward(&self, batch: &Batch, ad: &dyn LowRankSource) -> Result<Vec<f32>> {
        self.check_tokens(batch)?;
        let (xf, ..) = self.trunk(batch, ad, None, self.config.num_layers);
        let (n, v) = (batch.tokens.len(), self.config.vocab_size);
        let mut logits = vec![0.0; n * v];
        project(self.head(), &xf, n, &mut logits);
        Ok(logits)
    }

    /// Summed cross-entropy over the rows with a target (no gradients, no dropout).
    pub fn loss(&self, batch: &Batch, targets: &[Option<u32>], ad: &dyn LowRankSource) -> Result<LossSum> {
        self.check_tokens(batch)?;
        let (xf, ..) = self.trunk(batch, ad, None, self.config.num_layers);
        let (head, c) = (self.head(), &self.config);
        Ok(lm_head_cross_entropy(&xf, head.view(), c.vocab_size, c.hidden_size, targets, 0.0, None))
    }

    /// Bytes of a KV cache of `capacity` positions.
    pub fn kv_bytes(&self, capacity: usize) -> u128 {
        let c = &self.config;
        let value_bytes = if self.kv_in_bf16() { 2 } else { 4 };
        2 * value_bytes * (c.num_layers as u128) * (c.num_kv_heads as u128) * (capacity as u128) * (c.head_dim as u128)
    }

    /// An empty KV cache for one sequence of up to `capacity` positions; refused when the
    /// machine cannot hold it.
    pub fn new_seq_cache(&self, capacity: usize) -> Result<SeqCache> {
        let c = &self.config;
        crate::limits::ensure_memory(self.kv_bytes(capacity), &format!("a KV cache of {capacity} positions"))?;
        let per_layer = c.num_kv_heads * capacity * c.head_dim;
        let kv = if self.kv_in_bf16() {
            let layers = || (0..c.num_layers).map(|_| vec![0; per_layer]).collect();
            Kv::Bf16 { k: layers(), v: layers() }
        } else {
            let layers = || (0..c.num_layers).map(|_| vec![0.0; per_layer]).collect();
            Kv::F32 { k: layers(), v: layers() }
        };
        Ok(SeqCache { kv, visible: vec![true; capacity], len: 0, capacity })
    }

    /// One inference step over several sequences, each at its own position with its own
    /// adapter: every sequence's new tokens run after its cached positions (a prompt or a chunk
    /// of one, or one sampled token), all in one pass — the frozen weights are read once for all
    /// rows, the low-rank products run per run of rows sharing an adapter (rows are ordered by
    /// adapter for that). The caches take the new keys and values. Returns the logits of each
    /// sequence's last new token, `[seqs, vocab]`, in the order given.
    pub fn step(&self, seqs: &mut [SeqStep]) -> Result<Vec<f32>> {
        let (d, v) = (self.config.hidden_size, self.config.vocab_size);
        for (i, s) in seqs.iter().enumerate() {
            if s.tokens.is_empty() {
                bail!("step: sequence {i} has no new tokens");
            }
            if s.cache.len + s.tokens.len() > s.cache.capacity {
                bail!("KV cache full: {} + {} positions exceed its capacity of {}", s.cache.len, s.tokens.len(), s.cache.capacity);
            }
            if let Some(&t) = s.tokens.iter().find(|&&t| t as usize >= v) {
                bail!("token id {t} is outside the vocabulary of {v} tokens");
            }
        }
        // Rows grouped by adapter (identity and scale), so each adapter's rows form one run.
        // An adapter's identity: its address and its scale.
        let key = |ad: Option<(&dyn LowRankSource, f32)>| {
            ad.map(|(a, scale)| (a as *const dyn LowRankSource as *const () as usize, scale.to_bits()))
        };
        let mut order: Vec<usize> = (0..seqs.len()).collect();
        order.sort_by_key(|&i| key(seqs[i].adapter));
        let mut tokens = Vec::new();
        let mut segments: Vec<RowRun> = Vec::new();
        let mut starts = vec![0; seqs.len()];
        for &i in &order {
            let s = &seqs[i];
            starts[i] = tokens.len();
            let rows = tokens.len()..tokens.len() + s.tokens.len();
            tokens.extend_from_slice(s.tokens);
            match segments.last_mut() {
                Some((r, ad)) if key(*ad) == key(s.adapter) => r.end = rows.end,
                _ => segments.push((rows, s.adapter)),
            }
        }
        let mut rows: Vec<SeqRows> = seqs
            .iter_mut()
            .enumerate()
            .map(|(i, s)| {
                let positions: Vec<u32> = (s.cache.len..s.cache.len + s.tokens.len()).map(|p| p as u32).collect();
                SeqRows { start: starts[i], new: s.tokens.len(), angles: RopeAngles::new(&self.inv_freq, &positions), cache: &mut *s.cache }
            })
            .collect();
        let mut h = self.embed_tokens(&tokens);
        for l in 0..self.config.num_layers {
            self.layer_step(l, &mut h, &mut rows, &segments);
        }
        // Every layer stored its keys at the same positions; advance once all have.
        for r in rows.iter_mut() {
            r.cache.len += r.new;
        }
        let last: Vec<f32> = rows.iter().flat_map(|r| h[(r.start + r.new - 1) * d..(r.start + r.new) * d].to_vec()).collect();
        let b = rows.len();
        let mut xf = vec![0.0; b * d];
        let mut rstd = vec![0.0; b];
        rmsnorm_forward(&last, &self.norm, self.config.rms_norm_eps, &mut xf, &mut rstd);
        let mut logits = vec![0.0; b * v];
        project(self.head(), &xf, b, &mut logits);
        Ok(logits)
    }

    /// Forward and backward for one micro-batch. Adds `grad_scale · dL/dθ` for every adapter
    /// parameter θ into `grads` (laid out like the adapter's parameters) and returns the summed
    /// loss. Use `grad_scale = 1/(targets counted over all accumulated micro-batches)` for
    /// transformers' mean loss. `rng` drives LoRA dropout; `None` disables it.
    pub fn loss_and_grads(
        &self,
        batch: &Batch,
        targets: &[Option<u32>],
        ad: &dyn LowRankSource,
        grads: &mut [f32],
        grad_scale: f32,
        rng: Option<&mut Rng>,
    ) -> Result<LossSum> {
        self.check_tokens(batch)?;
        if targets.len() != batch.tokens.len() {
            bail!("{} targets for {} tokens", targets.len(), batch.tokens.len());
        }
        let c = &self.config;
        // Layers below the lowest adapted one need no backward at all.
        let lowest = (0..c.num_layers).find(|&l| ModuleKind::ALL.iter().any(|&k| ad.lookup(l, k).is_some()));
        let Some(lowest) = lowest else { bail!("the adapter attaches to no module of this model") };
        let (xf, acts, h_last, rstd, ctx) = self.trunk(batch, ad, rng, lowest);
        let n = batch.tokens.len();
        let mut dxf = vec![0.0; n * c.hidden_size];
        let loss = lm_head_cross_entropy(&xf, self.head().view(), c.vocab_size, c.hidden_size, targets, grad_scale, Some(&mut dxf));
        let mut dh = vec![0.0; n * c.hidden_size];
        rmsnorm_backward(&dxf, &h_last, &self.norm, &rstd, &mut dh);
        for (i, kept) in acts.into_iter().enumerate().rev() {
            let l = lowest + i;
            let a = match kept {
                Kept::All(a) => *a,
                Kept::Input(mut h, state) => {
                    // Replays the layer exactly, dropout masks included.
                    let mut r = state.map(Rng::from_state);
                    self.layer_forward(l, &mut h, &ctx, ad, r.as_mut(), true)
                }
            };
            self.layer_backward(l, &a, &mut dh, &ctx, ad, grads, l > lowest);
        }
        Ok(loss)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::check_directional_eps;
    use crate::lora::{LoraAdapter, LoraConfig, TargetModules};
    use crate::model::adapt::NoAdapter;

    fn tiny(arch: &str, window: Option<usize>) -> DecoderConfig {
        let mut v = serde_json::json!({"model_type": arch, "vocab_size": 50, "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5});
        if let Some(w) = window {
            v["sliding_window"] = serde_json::json!(w);
        }
        DecoderConfig::from_json(&v).unwrap()
    }

    /// The whole model's LoRA gradient against finite differences of its loss, with dropout
    /// (the same masks in every evaluation, from a cloned RNG), GQA, padding, qkv bias
    /// (qwen2) and a sliding window (mistral).
    #[test]
    fn model_lora_gradients_match_finite_differences() {
        for (arch, window, dropout) in [("llama", None, 0.0), ("qwen2", None, 0.2), ("mistral", Some(3), 0.1)] {
            let model = DecoderModel::random(tiny(arch, window), 17);
            let cfg =
                LoraConfig { target_modules: TargetModules::AllLinear, r: 4, lora_alpha: 8.0, lora_dropout: dropout, ..Default::default() };
            let mut adapter = LoraAdapter::new(cfg, &model, 3).unwrap();
            let mut rng = Rng::new(99);
            for p in adapter.params.iter_mut() {
                *p += 0.1 * rng.normal(); // B ≠ 0 so every path carries gradient
            }
            let rows: Vec<Vec<u32>> = vec![(0..7).map(|i| (i * 7 + 3) % 50).collect(), (0..5).map(|i| (i * 11 + 1) % 50).collect()];
            let batch = Batch::right_padded(&rows, 0).unwrap();
            let targets: Vec<Option<u32>> =
                (0..batch.tokens.len()).map(|i| if batch.mask[i] && i % 7 != 6 { Some(((i * 13) % 50) as u32) } else { None }).collect();
            let n = targets.iter().flatten().count() as f32;
            let dropout_rng = Rng::new(5);
            let mut grads = vec![0.0; adapter.num_params()];
            model.loss_and_grads(&batch, &targets, &adapter, &mut grads, 1.0 / n, Some(&mut dropout_rng.clone())).unwrap();
            let params = adapter.params.clone();
            let loss_at = |p: &[f32]| {
                let mut a = adapter.clone();
                a.params.copy_from_slice(p);
                let mut scratch = vec![0.0; p.len()];
                model.loss_and_grads(&batch, &targets, &a, &mut scratch, 0.0, Some(&mut dropout_rng.clone())).unwrap().mean()
            };
            check_directional_eps(arch, &params, &grads, loss_at, 7, 1e-3);
        }
    }

    /// Incremental decoding with the KV cache gives the full forward pass's logits, also for a
    /// left-padded row (rotary attention depends only on relative positions).
    #[test]
    fn cached_decoding_matches_full_forward_at_different_positions() {
        for (arch, window) in [("llama", None), ("mistral", Some(3))] {
            let model = DecoderModel::random(tiny(arch, window), 5);
            let adapter = test_adapter(&model, 1, "q_proj,v_proj");
            let seq: Vec<u32> = vec![3, 14, 15, 9, 26, 5, 35, 8, 9];
            let v = model.config.vocab_size;
            let full = model.forward(&Batch::right_padded(std::slice::from_ref(&seq), 0).unwrap(), &adapter).unwrap();
            let close =
                |a: &[f32], t: usize| a.iter().zip(&full[t * v..(t + 1) * v]).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max) < 1e-4;
            let ad: Option<(&dyn LowRankSource, f32)> = Some((&adapter, 1.0));
            // Two sequences in one step at different positions: the first 7 tokens and the first 5
            // (no padding); then both decode a token per step.
            let (mut a, mut b) = (model.new_seq_cache(10).unwrap(), model.new_seq_cache(10).unwrap());
            let logits = model
                .step(&mut [
                    SeqStep { cache: &mut a, tokens: &seq[..7], adapter: ad },
                    SeqStep { cache: &mut b, tokens: &seq[..5], adapter: ad },
                ])
                .unwrap();
            assert!(close(&logits[..v], 6) && close(&logits[v..], 4), "{arch}: prefill");
            for step in 0..2 {
                let (ta, tb) = ([seq[7 + step]], [seq[5 + step]]);
                let logits = model
                    .step(&mut [SeqStep { cache: &mut a, tokens: &ta, adapter: ad }, SeqStep { cache: &mut b, tokens: &tb, adapter: ad }])
                    .unwrap();
                assert!(close(&logits[..v], 7 + step) && close(&logits[v..], 5 + step), "{arch}: decode step {step}");
            }
            assert_eq!((a.len(), b.len()), (9, 7));
            // A prefill in chunks gives what one call gives.
            let mut c = model.new_seq_cache(9).unwrap();
            for chunk in seq.chunks(4) {
                let logits = model.step(&mut [SeqStep { cache: &mut c, tokens: chunk, adapter: ad }]).unwrap();
                assert!(close(&logits, c.len() - 1), "{arch}: chunk ending at {}", c.len());
            }
            assert!(model.step(&mut [SeqStep { cache: &mut c, tokens: &[1], adapter: ad }]).is_err(), "capacity is enforced");
        }
    }

    fn test_adapter(model: &DecoderModel, seed: u64, targets: &str) -> LoraAdapter {
        let cfg = LoraConfig { r: 2, target_modules: TargetModules::parse(targets), ..Default::default() };
        let mut adapter = LoraAdapter::new(cfg, model, seed).unwrap();
        for (i, p) in adapter.params.iter_mut().enumerate() {
            *p += 0.01 * ((i + seed as usize) % 7) as f32;
        }
        adapter
    }

    /// Eight rows over four adapters (at three scales) and the base, in one step, give each row
    /// the logits it gets alone with its adapter: at prefill and at decode.
    #[test]
    fn rows_with_different_adapters_in_one_step_match_each_row_alone() {
        let model = DecoderModel::random(tiny("qwen2", None), 8);
        let adapters: Vec<LoraAdapter> = [(1, "q_proj,v_proj"), (2, "all-linear"), (3, "k_proj,o_proj"), (4, "gate_proj,down_proj")]
            .iter()
            .map(|&(s, t)| test_adapter(&model, s, t))
            .collect();
        let assign: Vec<Option<(&dyn LowRankSource, f32)>> = vec![
            Some((&adapters[2], 1.0)),
            None,
            Some((&adapters[0], 1.0)),
            Some((&adapters[1], 0.5)),
            Some((&adapters[0], 1.0)),
            Some((&adapters[3], 1.0)),
            None,
            Some((&adapters[0], 2.0)),
        ];
        let prompts: Vec<Vec<u32>> = (0..8).map(|i| (0..3 + i).map(|t| ((t * 7 + i * 3) % 50) as u32).collect()).collect();
        let v = model.config.vocab_size;
        let alone: Vec<(Vec<f32>, Vec<f32>)> = (0..8)
            .map(|i| {
                let mut c = model.new_seq_cache(16).unwrap();
                let pre = model.step(&mut [SeqStep { cache: &mut c, tokens: &prompts[i], adapter: assign[i] }]).unwrap();
                let dec = model.step(&mut [SeqStep { cache: &mut c, tokens: &[7], adapter: assign[i] }]).unwrap();
                (pre, dec)
            })
            .collect();
        let mut caches: Vec<SeqCache> = (0..8).map(|_| model.new_seq_cache(16).unwrap()).collect();
        let mut steps: Vec<SeqStep> =
            caches.iter_mut().enumerate().map(|(i, c)| SeqStep { cache: c, tokens: &prompts[i], adapter: assign[i] }).collect();
        let pre = model.step(&mut steps).unwrap();
        let mut steps: Vec<SeqStep> =
            caches.iter_mut().enumerate().map(|(i, c)| SeqStep { cache: c, tokens: &[7], adapter: assign[i] }).collect();
        let dec = model.step(&mut steps).unwrap();
        let max_diff = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        for i in 0..8 {
            assert!(max_diff(&pre[i * v..(i + 1) * v], &alone[i].0) <= 1e-5, "row {i} prefill");
            assert!(max_diff(&dec[i * v..(i + 1) * v], &alone[i].1) <= 1e-5, "row {i} decode");
        }
        // The adapters do make a difference (the test would pass trivially otherwise).
        assert!(max_diff(&alone[2].0, &alone[1].0) > 1e-3 || prompts[2] != prompts[1]);
        let mut c = model.new_seq_cache(16).unwrap();
        let base = model.step(&mut [SeqStep { cache: &mut c, tokens: &prompts[0], adapter: None }]).unwrap();
        assert!(max_diff(&base, &alone[0].0) > 1e-3, "adapter 2 changes row 0");
    }

    /// A sequence that joins a running batch at step k decodes the same greedy tokens as alone,
    /// and the caches of sequences that leave are freed.
    #[test]
    fn a_sequence_joining_a_running_batch_decodes_as_alone() {
        let model = DecoderModel::random(tiny("llama", None), 9);
        let adapter = test_adapter(&model, 5, "q_proj,v_proj");
        let ad: Option<(&dyn LowRankSource, f32)> = Some((&adapter, 1.0));
        let argmax = |l: &[f32]| l.iter().enumerate().fold((0, f32::MIN), |m, (i, &x)| if x > m.1 { (i, x) } else { m }).0 as u32;
        let greedy_alone = |prompt: &[u32], n: usize| -> Vec<u32> {
            let mut c = model.new_seq_cache(prompt.len() + n).unwrap();
            let mut out = vec![];
            let mut next = prompt.to_vec();
            for _ in 0..n {
                let l = model.step(&mut [SeqStep { cache: &mut c, tokens: &next, adapter: ad }]).unwrap();
                next = vec![argmax(&l)];
                out.push(next[0]);
            }
            out
        };
        let (p1, p2): (Vec<u32>, Vec<u32>) = (vec![4, 8, 15, 16, 23, 42], vec![1, 2, 3]);
        let want1 = greedy_alone(&p1, 10);
        let want2 = greedy_alone(&p2, 5);
        let mut c1 = model.new_seq_cache(16).unwrap();
        let mut c2 = model.new_seq_cache(8).unwrap();
        let (mut got1, mut got2) = (vec![], vec![]);
        let mut n1 = p1.clone();
        let mut n2 = p2.clone();
        for step in 0..10 {
            if (4..9).contains(&step) {
                // Sequence 2 joins at step 4 with its whole prompt, beside sequence 1's decode token.
                let l = model
                    .step(&mut [SeqStep { cache: &mut c1, tokens: &n1, adapter: ad }, SeqStep { cache: &mut c2, tokens: &n2, adapter: ad }])
                    .unwrap();
                let v = model.config.vocab_size;
                n1 = vec![argmax(&l[..v])];
                n2 = vec![argmax(&l[v..])];
                got2.push(n2[0]);
            } else {
                let l = model.step(&mut [SeqStep { cache: &mut c1, tokens: &n1, adapter: ad }]).unwrap();
                n1 = vec![argmax(&l)];
            }
            got1.push(n1[0]);
        }
        assert_eq!(got1, want1);
        assert_eq!(got2, want2);
        assert_eq!(c2.bytes(), model.kv_bytes(8) as usize);
        drop(c2); // leaving frees its cache: what remains is sequence 1's alone
        assert_eq!(c1.bytes(), model.kv_bytes(16) as usize);
    }

    /// With compact weights, decoding (fused-dequant GEMV) and the full forward (GEMM on the
    /// expanded matrix) compute the same model, and that model stays close to the f32 one. On
    /// AMX these models run in bf16 and keep their KV cache in bf16, at half the bytes; the
    /// 17-token prefill runs the per-head GEMM path on the expanded cache, decoding reads it by rows.
    #[test]
    fn compact_weights_decode_like_their_full_forward() {
        let f32_model = DecoderModel::random(tiny("llama", None), 6);
        let seq: Vec<u32> = (0..20).map(|i| (i * 17 + 3) % 50).collect();
        let v = f32_model.config.vocab_size;
        let reference = f32_model.forward(&Batch::right_padded(std::slice::from_ref(&seq), 0).unwrap(), &NoAdapter).unwrap();
        for (format, drift) in [(WeightFormat::Bf16, 0.05), (WeightFormat::Q8_0, 0.1), (WeightFormat::Q4_1, 1.0)] {
            let mut model = DecoderModel::random(tiny("llama", None), 6);
            model.store_as(format);
            assert_eq!(model.layers[0].linear[ModuleKind::Q.index()].w.format(), format);
            assert!(model.weight_bytes() < f32_model.weight_bytes());
            let full = model.forward(&Batch::right_padded(std::slice::from_ref(&seq), 0).unwrap(), &NoAdapter).unwrap();
            let max_diff = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
            let mut cache = model.new_seq_cache(seq.len()).unwrap();
            let f32_cache = f32_model.new_seq_cache(seq.len()).unwrap();
            assert_eq!(cache.bytes() * 2, f32_cache.bytes(), "{format:?}: the cache is bf16");
            assert_eq!(cache.bytes() as u128, model.kv_bytes(seq.len()));
            let logits = model.step(&mut [SeqStep { cache: &mut cache, tokens: &seq[..17], adapter: None }]).unwrap();
            // The cache rounds the keys and values to bf16 (and the products on AMX or VNNI round
            // the activations), while the full forward keeps them in f32.
            let tolerance = 1e-2;
            let err = max_diff(&logits, &full[16 * v..17 * v]);
            assert!(err < tolerance, "{format:?} prefill: vs full forward {err}");
            for t in 17..seq.len() {
                let logits = model.step(&mut [SeqStep { cache: &mut cache, tokens: &seq[t..t + 1], adapter: None }]).unwrap();
                let err = max_diff(&logits, &full[t * v..(t + 1) * v]);
                assert!(err < tolerance, "{format:?} position {t}: decode vs full forward {err}");
            }
            let err = max_diff(&full, &reference);
            assert!(err > 0.0 && err < drift, "{format:?}: logits moved by {err} from f32");
        }
    }

    /// A bf16 base trains like the f32 model of the same (bf16-rounded) values. On a bf16 product
    /// unit (`amx::product_unit`) the products round their activations to bf16 (or fp16) and the
    /// kept activations are bf16; so do the VNNI products that take a batch this small (at most
    /// 32 tokens, `adapt::DECODE_ROWS`) on a CPU with AVX-512 BF16. That moves the loss and the
    /// adapter gradients only slightly. A CPU with neither runs the f32 path on the same values.
    #[test]
    fn bf16_base_gives_the_loss_and_gradients_of_its_values() {
        let mut bf16_model = DecoderModel::random(tiny("llama", None), 12);
        bf16_model.store_as(WeightFormat::Bf16);
        let mut f32_model = DecoderModel::random(tiny("llama", None), 12);
        f32_model.store_as(WeightFormat::Bf16);
        f32_model.store_as(WeightFormat::F32);
        let cfg = LoraConfig { target_modules: TargetModules::AllLinear, r: 4, ..Default::default() };
        let mut adapter = LoraAdapter::new(cfg, &f32_model, 3).unwrap();
        adapter.params.iter_mut().enumerate().for_each(|(i, p)| *p += 0.02 * (i % 7) as f32);
        let batch = Batch::right_padded(&[vec![1, 5, 9, 14, 3, 7, 22, 40], vec![2, 8, 11, 30, 31]], 0).unwrap();
        let targets: Vec<Option<u32>> = (0..16).map(|i| if batch.mask[i] { Some((i * 7 % 50) as u32) } else { None }).collect();
        let run = |m: &DecoderModel| {
            let mut g = vec![0.0; adapter.num_params()];
            let l = m.loss_and_grads(&batch, &targets, &adapter, &mut g, 0.1, None).unwrap();
            (l.mean(), g)
        };
        let ((l16, g16), (l32, g32)) = (run(&bf16_model), run(&f32_model));
        let rounded = crate::kernels::amx::products_available() || crate::kernels::vnni::available();
        let tolerance = if rounded { 1e-2 } else { 1e-5 };
        assert!((l16 - l32).abs() < tolerance * l32.abs(), "loss {l16} vs {l32}");
        let norm = |v: &[f32]| v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        let diff: Vec<f32> = g16.iter().zip(&g32).map(|(a, b)| a - b).collect();
        assert!(norm(&g32) > 0.0 && norm(&diff) < tolerance * norm(&g32), "gradients differ by {} of {}", norm(&diff), norm(&g32));
    }

    /// Gradient checkpointing recomputes layers (with the same dropout masks) and gives the
    /// same loss and adapter gradients, so the adapter still trains.
    #[test]
    fn gradient_checkpointing_gives_the_same_gradients() {
        let mut model = DecoderModel::random(tiny("qwen2", None), 8);
        let cfg = LoraConfig { target_modules: TargetModules::AllLinear, r: 4, lora_dropout: 0.1, ..Default::default() };
        let mut adapter = LoraAdapter::new(cfg, &model, 3).unwrap();
        adapter.params.iter_mut().enumerate().for_each(|(i, p)| *p += 0.01 * (i % 9) as f32);
        let batch = Batch::right_padded(&[vec![1, 5, 9, 14, 3, 7], vec![2, 8, 11]], 0).unwrap();
        let targets: Vec<Option<u32>> = (0..12).map(|i| if batch.mask[i] { Some((i * 7 % 50) as u32) } else { None }).collect();
        let run = |m: &DecoderModel| {
            let mut g = vec![0.0; adapter.num_params()];
            let l = m.loss_and_grads(&batch, &targets, &adapter, &mut g, 0.1, Some(&mut Rng::new(4))).unwrap();
            (l.sum, g)
        };
        let plain = run(&model);
        model.gradient_checkpointing = true;
        let ckpt = run(&model);
        assert_eq!(plain.0, ckpt.0);
        assert!(plain.1.iter().any(|&g| g != 0.0));
        assert_eq!(plain.1, ckpt.1);
    }
}
