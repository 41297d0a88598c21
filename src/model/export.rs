//! Writing a decoder back out as a Hugging Face directory (config.json, model.safetensors and,
//! model files; the tokenizer writes its own) that transformers loads.

use super::adapt::ModuleKind;
use super::decoder::DecoderModel;
use super::weights::serialize_f32;
use crate::io::atomic_write;
use anyhow::Result;
use std::collections::BTreeMap;
use std::path::Path;

/// Every weight under its Hugging Face name, f32, PyTorch shapes.
pub fn hf_tensors(model: &DecoderModel) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let c = &model.config;
    let d = c.hidden_size;
    let mut t = BTreeMap::new();
    t.insert("model.embed_tokens.weight".into(), (vec![c.vocab_size, d], model.embed.to_f32()));
    t.insert("model.norm.weight".into(), (vec![d], model.norm.clone()));
    if let Some(h) = &model.lm_head {
        t.insert("lm_head.weight".into(), (vec![c.vocab_size, d], h.to_f32()));
    }
    for (l, layer) in model.layers.iter().enumerate() {
        let p = format!("model.layers.{l}");
        t.insert(format!("{p}.input_layernorm.weight"), (vec![d], layer.attn_norm.clone()));
        t.insert(format!("{p}.post_attention_layernorm.weight"), (vec![d], layer.mlp_norm.clone()));
        for kind in ModuleKind::ALL {
            let lin = &layer.linear[kind.index()];
            let name = format!("{p}.{}", kind.path());
            t.insert(format!("{name}.weight"), (vec![lin.out_features, lin.in_features], lin.w.to_f32()));
            if let Some(b) = &lin.bias {
                t.insert(format!("{name}.bias"), (vec![lin.out_features], b.clone()));
            }
        }
    }
    t
}

/// Writes the model's files of a Hugging Face directory (config.json, model.safetensors) into
/// `dir`, each atomically. The tokenizer's files are the tokenizer's to write
/// (`Pretrained::save_hf_dir` writes both).
pub fn save_model_files(model: &DecoderModel, dir: &Path) -> Result<()> {
    let meta = [("format".to_string(), "pt".to_string())].into_iter().collect();
    atomic_write(&dir.join("model.safetensors"), &serialize_f32(&hf_tensors(model), Some(meta))?)?;
    atomic_write(&dir.join("config.json"), (serde_json::to_string_pretty(&model.config.to_json())? + "\n").as_bytes())
}
