//! Decoder configuration read from a Hugging Face `config.json`, in both the transformers 4
//! dialect (`rope_theta`, `rope_scaling`) and the transformers 5 one (`rope_parameters`).

use crate::kernels::rope::RopeScaling;
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
}

impl Arch {
    pub fn model_type(&self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct DecoderConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on the q, k and v projections (Qwen2; Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o_proj (Llama with `attention_bias`).
    pub o_bias: bool,
    /// Bias on the MLP projections (Llama with `mlp_bias`).
    pub mlp_bias: bool,
    /// Mistral's sliding attention window.
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

fn get_usize(v: &Value, key: &str) -> Result<usize> {
    v.get(key).and_then(Value::as_u64).map(|x| x as usize).with_context(|| format!("config.json: missing or non-integer \"{key}\""))
}

fn opt_f64(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

fn opt_bool(v: &Value, key: &str) -> Option<bool> {
    v.get(key).and_then(Value::as_bool)
}

/// `rope_parameters` (v5) or `rope_scaling` (v4); returns (theta, scaling).
fn parse_rope(v: &Value) -> Result<(f32, RopeScaling)> {
    let params = v.get("rope_parameters").filter(|p| p.is_object());
    let scaling = params.or_else(|| v.get("rope_scaling").filter(|p| p.is_object()));
    let theta = params.and_then(|p| opt_f64(p, "rope_theta")).or_else(|| opt_f64(v, "rope_theta")).unwrap_or(10000.0) as f32;
    let Some(s) = scaling else {
        return Ok((theta, RopeScaling::Default));
    };
    let kind = s.get("rope_type").or_else(|| s.get("type")).and_then(Value::as_str).unwrap_or("default");
    let f = |key: &str| -> Result<f32> {
        opt_f64(s, key).map(|x| x as f32).with_context(|| format!("config.json: rope scaling \"{kind}\" needs \"{key}\""))
    };
    let scaling = match kind {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear { factor: f("factor")? },
        "llama3" => RopeScaling::Llama3 {
            factor: f("factor")?,
            low_freq_factor: f("low_freq_factor")?,
            high_freq_factor: f("high_freq_factor")?,
            original_max_position_embeddings: f("original_max_position_embeddings")?,
        },
        other => bail!("config.json: rope scaling type \"{other}\" is not supported (supported: default, linear, llama3)"),
    };
    Ok((theta, scaling))
}

impl DecoderConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let v: Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        Self::from_json(&v).with_context(|| format!("in {}", path.display()))
    }

    pub fn from_json(v: &Value) -> Result<Self> {
        let model_type = v.get("model_type").and_then(Value::as_str).context("config.json: missing \"model_type\"")?;
        let arch = match model_type {
            "llama" => Arch::Llama,
            "mistral" => Arch::Mistral,
            "qwen2" => Arch::Qwen2,
            other => {
                bail!("model_type \"{other}\" is not supported (supported: llama, mistral, qwen2)")
            }
        };
        let hidden_size = get_usize(v, "hidden_size")?;
        let num_heads = get_usize(v, "num_attention_heads")?;
        let num_kv_heads = v.get("num_key_value_heads").and_then(Value::as_u64).map(|x| x as usize).unwrap_or(num_heads);
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            bail!("num_attention_heads ({num_heads}) must be a multiple of num_key_value_heads ({num_kv_heads})");
        }
        let head_dim = v.get("head_dim").and_then(Value::as_u64).map(|x| x as usize).unwrap_or(hidden_size / num_heads);
        if !head_dim.is_multiple_of(2) {
            bail!("head_dim {head_dim} must be even for rotary embeddings");
        }
        let (rope_theta, rope_scaling) = parse_rope(v)?;
        let attention_bias = opt_bool(v, "attention_bias").unwrap_or(false);
        let sliding_window = match arch {
            Arch::Mistral => v.get("sliding_window").and_then(Value::as_u64).map(|x| x as usize),
            Arch::Qwen2 if opt_bool(v, "use_sliding_window").unwrap_or(false) => {
                bail!("qwen2 with use_sliding_window=true is not supported")
            }
            _ => None,
        };
        let eos_token_ids = match v.get("eos_token_id") {
            Some(Value::Number(n)) => n.as_u64().into_iter().map(|x| x as u32).collect(),
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|x| x as u32).collect(),
            _ => vec![],
        };
        if let Some(act) = v.get("hidden_act").and_then(Value::as_str) {
            if act != "silu" {
                bail!("hidden_act \"{act}\" is not supported for {model_type} (only silu)");
            }
        }
        Ok(DecoderConfig {
            arch,
            vocab_size: get_usize(v, "vocab_size")?,
            hidden_size,
            intermediate_size: get_usize(v, "intermediate_size")?,
            num_layers: get_usize(v, "num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: opt_f64(v, "rms_norm_eps").unwrap_or(1e-6) as f32,
            rope_theta,
            rope_scaling,
            max_position_embeddings: v.get("max_position_embeddings").and_then(Value::as_u64).unwrap_or(4096) as usize,
            tie_word_embeddings: opt_bool(v, "tie_word_embeddings").unwrap_or(false),
            qkv_bias: arch == Arch::Qwen2 || attention_bias,
            o_bias: arch != Arch::Qwen2 && attention_bias,
            mlp_bias: opt_bool(v, "mlp_bias").unwrap_or(false),
            sliding_window,
            bos_token_id: v.get("bos_token_id").and_then(Value::as_u64).map(|x| x as u32),
            eos_token_ids,
        })
    }

    /// The config.json a transformers loader reads back (transformers 4 keys, which 5 also reads).
    pub fn to_json(&self) -> Value {
        let mut rope_scaling = Value::Null;
        match &self.rope_scaling {
            RopeScaling::Default => {}
            RopeScaling::Linear { factor } => rope_scaling = serde_json::json!({"rope_type": "linear", "factor": factor}),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                rope_scaling = serde_json::json!({
                    "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                    "high_freq_factor": high_freq_factor,
                    "original_max_position_embeddings": *original_max_position_embeddings as u64,
                })
            }
        }
        let arch_name = match self.arch {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Mistral => "MistralForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
        };
        serde_json::json!({
            "architectures": [arch_name],
            "model_type": self.arch.model_type(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.arch != Arch::Qwen2 && self.qkv_bias,
            "mlp_bias": self.mlp_bias,
            "sliding_window": self.sliding_window,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids.first(),
            "torch_dtype": "float32",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({"model_type": "llama", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2})
    }

    #[test]
    fn reads_both_rope_dialects_identically() {
        let scaling = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let mut v4 = base();
        v4["rope_theta"] = json!(500000.0);
        v4["rope_scaling"] = scaling.clone();
        let mut v5 = base();
        let mut params = scaling;
        params["rope_theta"] = json!(500000.0);
        v5["rope_parameters"] = params;
        let (a, b) = (DecoderConfig::from_json(&v4).unwrap(), DecoderConfig::from_json(&v5).unwrap());
        assert_eq!(a, b);
        assert_eq!(a.rope_theta, 500000.0);
        assert!(matches!(a.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
        assert_eq!(a.head_dim, 8);
        // v4's older spelling "type" instead of "rope_type"
        let mut old = base();
        old["rope_scaling"] = json!({"type": "linear", "factor": 2.0});
        assert_eq!(DecoderConfig::from_json(&old).unwrap().rope_scaling, RopeScaling::Linear { factor: 2.0 });
        // and the config we write reads back to the same thing
        assert_eq!(DecoderConfig::from_json(&a.to_json()).unwrap(), a);
    }

    #[test]
    fn clear_errors_for_unsupported_configs() {
        let mut v = base();
        v["model_type"] = json!("gemma");
        assert!(DecoderConfig::from_json(&v).unwrap_err().to_string().contains("gemma"));
        let mut v = base();
        v["rope_scaling"] = json!({"rope_type": "yarn", "factor": 4.0});
        assert!(DecoderConfig::from_json(&v).unwrap_err().to_string().contains("yarn"));
        let mut v = base();
        v["num_key_value_heads"] = json!(3);
        assert!(DecoderConfig::from_json(&v).unwrap_err().to_string().contains("multiple"));
        let mut v = base();
        v.as_object_mut().unwrap().remove("hidden_size");
        assert!(DecoderConfig::from_json(&v).unwrap_err().to_string().contains("hidden_size"));
    }
}
