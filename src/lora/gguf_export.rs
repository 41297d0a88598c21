//! LoRA adapters in llama.cpp's GGUF adapter format: `general.type` = "adapter",
//! `adapter.type` = "lora", `adapter.lora.alpha`, the base's `general.architecture`, and tensors
//! `blk.N.<module>.weight.lora_a` `[r, in]` / `.lora_b` `[out, r]`.
//!
//! llama.cpp scales every tensor pair by alpha / r (r read from the tensor). lowrank folds
//! whatever scale PEFT would apply (rsLoRA, rank_pattern, alpha_pattern) into B so that
//! alpha / r · B'·A equals the adapter's update exactly. For llama-architecture files the rows of
//! q and k are interleaved per head as llama.cpp's converter stores the base weights, so B's rows
//! for q_proj and k_proj are permuted the same way.

use super::adapter::LoraAdapter;
use crate::model::adapt::ModuleKind;
use crate::model::config::{Arch, DecoderConfig};
use crate::model::gguf::{hf_to_gguf_name, permute_rows, GgufValue, GgufWriter};
use anyhow::{bail, Context, Result};

/// llama.cpp's architecture name for a decoder config.
pub fn gguf_arch(c: &DecoderConfig) -> &'static str {
    match c.arch {
        Arch::Llama | Arch::Mistral => "llama",
        Arch::Qwen2 => "qwen2",
    }
}

pub fn to_gguf(adapter: &LoraAdapter, base: &DecoderConfig) -> Result<Vec<u8>> {
    let alpha = adapter.config.lora_alpha;
    if alpha <= 0.0 {
        bail!("lora_alpha must be positive to express the adapter's scale in GGUF (got {alpha})");
    }
    let arch = gguf_arch(base);
    let mut w = GgufWriter::default();
    w.meta("general.architecture", GgufValue::String(arch.into()));
    w.meta("general.type", GgufValue::String("adapter".into()));
    w.meta("adapter.type", GgufValue::String("lora".into()));
    w.meta("adapter.lora.alpha", GgufValue::F32(alpha));
    w.meta("general.name", GgufValue::String("lowrank LoRA adapter".into()));
    for m in &adapter.modules {
        let base_name =
            hf_to_gguf_name(&format!("{}.weight", m.name)).with_context(|| format!("module {} has no llama.cpp name", m.name))?;
        // llama.cpp applies alpha / r; make B carry the rest of the true scale.
        let fold = m.scale * m.r as f32 / alpha;
        let mut b: Vec<f32> = adapter.b(m).iter().map(|x| x * fold).collect();
        let heads = match m.kind {
            ModuleKind::Q => Some(base.num_heads),
            ModuleKind::K => Some(base.num_kv_heads),
            _ => None,
        };
        if let (Some(h), "llama") = (heads, arch) {
            b = permute_rows(&b, h, m.out_features, m.r);
        }
        w.tensor_f32(&format!("{base_name}.lora_a"), &[m.r, m.in_features], adapter.a(m));
        w.tensor_f32(&format!("{base_name}.lora_b"), &[m.out_features, m.r], &b);
    }
    Ok(w.to_bytes())
}
