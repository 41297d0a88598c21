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

/// A non-negative integer field; absent (or null) is `None`, any other type an error naming it.
fn opt_uint(v: &Value, key: &str) -> Result<Option<u64>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x.as_u64().map(Some).with_context(|| format!("config.json: \"{key}\" must be a non-negative integer, found {x}")),
    }
}

/// A required size: present, an integer, within [1, max].
fn get_dim(v: &Value, key: &str, max: usize) -> Result<usize> {
    let x = opt_uint(v, key)?.with_context(|| format!("config.json: missing \"{key}\""))?;
    crate::limits::check_dim(&format!("config.json: \"{key}\""), x, max)
}

fn opt_dim(v: &Value, key: &str, max: usize) -> Result<Option<usize>> {
    opt_uint(v, key)?.map(|x| crate::limits::check_dim(&format!("config.json: \"{key}\""), x, max)).transpose()
}

fn opt_f64(v: &Value, key: &str) -> Result<Option<f64>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x.as_f64().map(Some).with_context(|| format!("config.json: \"{key}\" must be a number, found {x}")),
    }
}

fn opt_bool(v: &Value, key: &str) -> Result<Option<bool>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x.as_bool().map(Some).with_context(|| format!("config.json: \"{key}\" must be true or false, found {x}")),
    }
}

fn opt_str<'a>(v: &'a Value, key: &str) -> Result<Option<&'a str>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x.as_str().map(Some).with_context(|| format!("config.json: \"{key}\" must be a string, found {x}")),
    }
}

/// `rope_parameters` (v5) or `rope_scaling` (v4); returns (theta, scaling).
fn parse_rope(v: &Value) -> Result<(f32, RopeScaling)> {
    let params = v.get("rope_parameters").filter(|p| p.is_object());
    let scaling = params.or_else(|| v.get("rope_scaling").filter(|p| p.is_object()));
    let theta = match params {
        Some(p) if p.get("rope_theta").is_some() => opt_f64(p, "rope_theta")?,
        _ => opt_f64(v, "rope_theta")?,
    }
    .unwrap_or(10000.0) as f32;
    let Some(s) = scaling else {
        return Ok((theta, RopeScaling::Default));
    };
    let kind = match opt_str(s, "rope_type")? {
        Some(k) => k,
        None => opt_str(s, "type")?.unwrap_or("default"),
    };
    let f = |key: &str| -> Result<f32> {
        opt_f64(s, key)?.map(|x| x as f32).with_context(|| format!("config.json: rope scaling \"{kind}\" needs \"{key}\""))
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
        let text = crate::io::read_input_text(path, "model config")?;
        let v: Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        Self::from_json(&v).with_context(|| format!("in {}", path.display()))
    }

    pub fn from_json(v: &Value) -> Result<Self> {
        use crate::limits::{MAX_HEADS, MAX_HEAD_DIM, MAX_HIDDEN, MAX_INTERMEDIATE, MAX_LAYERS, MAX_VOCAB};
        if !v.is_object() {
            bail!("config.json: expected a JSON object");
        }
        let model_type = opt_str(v, "model_type")?.context("config.json: missing \"model_type\"")?;
        let arch = match model_type {
            "llama" => Arch::Llama,
            "mistral" => Arch::Mistral,
            "qwen2" => Arch::Qwen2,
            other => {
                bail!("model_type \"{other}\" is not supported (supported: llama, mistral, qwen2)")
            }
        };
        let hidden_size = get_dim(v, "hidden_size", MAX_HIDDEN)?;
        let num_heads = get_dim(v, "num_attention_heads", MAX_HEADS)?;
        let num_kv_heads = opt_dim(v, "num_key_value_heads", MAX_HEADS)?.unwrap_or(num_heads);
        let head_dim = match opt_dim(v, "head_dim", MAX_HEAD_DIM)? {
            Some(h) => h,
            None if hidden_size % num_heads == 0 => hidden_size / num_heads,
            None => bail!("hidden_size {hidden_size} is not a multiple of num_attention_heads {num_heads} (and no head_dim is given)"),
        };
        let (rope_theta, rope_scaling) = parse_rope(v)?;
        let attention_bias = opt_bool(v, "attention_bias")?.unwrap_or(false);
        let sliding_window = match arch {
            Arch::Mistral => opt_dim(v, "sliding_window", usize::MAX)?,
            Arch::Qwen2 if opt_bool(v, "use_sliding_window")?.unwrap_or(false) => {
                bail!("qwen2 with use_sliding_window=true is not supported")
            }
            _ => None,
        };
        let token = |x: &Value| x.as_u64().and_then(|t| u32::try_from(t).ok());
        let eos_token_ids = match v.get("eos_token_id") {
            Some(Value::Number(n)) => n.as_u64().and_then(|t| u32::try_from(t).ok()).into_iter().collect(),
            Some(Value::Array(a)) => a.iter().filter_map(token).collect(),
            _ => vec![],
        };
        if let Some(act) = opt_str(v, "hidden_act")? {
            if act != "silu" {
                bail!("hidden_act \"{act}\" is not supported for {model_type} (only silu)");
            }
        }
        let config = DecoderConfig {
            arch,
            vocab_size: get_dim(v, "vocab_size", MAX_VOCAB)?,
            hidden_size,
            intermediate_size: get_dim(v, "intermediate_size", MAX_INTERMEDIATE)?,
            num_layers: get_dim(v, "num_hidden_layers", MAX_LAYERS)?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: opt_f64(v, "rms_norm_eps")?.unwrap_or(1e-6) as f32,
            rope_theta,
            rope_scaling,
            max_position_embeddings: opt_dim(v, "max_position_embeddings", usize::MAX)?.unwrap_or(4096),
            tie_word_embeddings: opt_bool(v, "tie_word_embeddings")?.unwrap_or(false),
            qkv_bias: arch == Arch::Qwen2 || attention_bias,
            o_bias: arch != Arch::Qwen2 && attention_bias,
            mlp_bias: opt_bool(v, "mlp_bias")?.unwrap_or(false),
            sliding_window,
            bos_token_id: v.get("bos_token_id").and_then(token),
            eos_token_ids,
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks what both config readers (config.json and GGUF metadata) must agree on: sizes
    /// positive and within `limits`, heads that divide, an even head_dim for rotary embeddings,
    /// finite positive epsilon, theta and scaling factors.
    pub fn validate(&self) -> Result<()> {
        use crate::limits::{check_dim, MAX_HEADS, MAX_HEAD_DIM, MAX_HIDDEN, MAX_INTERMEDIATE, MAX_LAYERS, MAX_VOCAB};
        check_dim("vocab_size", self.vocab_size as u64, MAX_VOCAB)?;
        check_dim("hidden_size", self.hidden_size as u64, MAX_HIDDEN)?;
        check_dim("intermediate_size", self.intermediate_size as u64, MAX_INTERMEDIATE)?;
        check_dim("the number of layers", self.num_layers as u64, MAX_LAYERS)?;
        check_dim("the number of attention heads", self.num_heads as u64, MAX_HEADS)?;
        check_dim("the number of key/value heads", self.num_kv_heads as u64, MAX_HEADS)?;
        check_dim("head_dim", self.head_dim as u64, MAX_HEAD_DIM)?;
        check_dim("the context length", self.max_position_embeddings as u64, usize::MAX)?;
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            bail!(
                "the number of attention heads ({}) must be a multiple of the number of key/value heads ({})",
                self.num_heads,
                self.num_kv_heads
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            bail!("head_dim {} must be even for rotary embeddings", self.head_dim);
        }
        let positive = |name: &str, x: f32| crate::limits::check(name, x as f64, crate::limits::Allowed::Positive);
        positive("rms_norm_eps", self.rms_norm_eps)?;
        positive("rope_theta", self.rope_theta)?;
        match self.rope_scaling {
            RopeScaling::Default => {}
            RopeScaling::Linear { factor } => positive("rope scaling factor", factor)?,
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                positive("rope scaling factor", factor)?;
                positive("low_freq_factor", low_freq_factor)?;
                positive("high_freq_factor", high_freq_factor)?;
                positive("original_max_position_embeddings", original_max_position_embeddings)?;
                if high_freq_factor <= low_freq_factor {
                    bail!("high_freq_factor ({high_freq_factor}) must exceed low_freq_factor ({low_freq_factor})");
                }
            }
        }
        if self.sliding_window == Some(0) {
            bail!("sliding_window must be at least 1");
        }
        Ok(())
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
        for (key, bad) in [
            ("num_attention_heads", json!(0)),
            ("num_hidden_layers", json!(1u64 << 63)),
            ("num_hidden_layers", json!(1_000_000_000)),
            ("hidden_size", json!("64")),
            ("rms_norm_eps", json!("1e-5")),
            ("head_dim", json!(7)),
            ("vocab_size", json!(-3)),
        ] {
            let mut v = base();
            v[key] = bad.clone();
            let e = DecoderConfig::from_json(&v).unwrap_err().to_string();
            assert!(e.contains(key) || e.contains("head_dim"), "{key}={bad}: {e}");
        }
        let mut v = base();
        v.as_object_mut().unwrap().remove("hidden_size");
        assert!(DecoderConfig::from_json(&v).unwrap_err().to_string().contains("hidden_size"));
    }
}
