//! LoRA adapters in llama.cpp's GGUF adapter format, written and read: `general.type` = "adapter",
//! `adapter.type` = "lora", `adapter.lora.alpha`, the base's `general.architecture`, and tensors
//! `blk.N.<module>.weight.lora_a` `[r, in]` / `.lora_b` `[out, r]`.
//!
//! llama.cpp scales every tensor pair by alpha / r (r read from the tensor). lowrank folds
//! whatever scale PEFT would apply (rsLoRA, rank_pattern, alpha_pattern) into B so that
//! alpha / r · B'·A equals the adapter's update exactly. For llama-architecture files the rows of
//! q and k are interleaved per head as llama.cpp's converter stores the base weights, so B's rows
//! for q_proj and k_proj are permuted the same way.

use super::adapter::LoraAdapter;
use super::config::{LoraConfig, TargetModules};
use crate::model::adapt::ModuleKind;
use crate::model::config::{Arch, DecoderConfig};
use crate::model::decoder::DecoderModel;
use crate::model::gguf::{gguf_to_hf_name, hf_to_gguf_name, permute_rows, unpermute_rows, GgufFile, GgufValue, GgufWriter};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;

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

/// Reads a llama.cpp LoRA adapter (as `convert_lora_to_gguf.py` or `to_gguf` write it) for
/// `model`. Its scale is llama.cpp's: alpha / r per module (r from the tensors; no alpha means
/// scale 1). Every tensor must be a `blk.N.<module>.weight.lora_a|lora_b` pair of a module the
/// base has, with the base's shapes.
pub fn load(path: &Path, model: &DecoderModel) -> Result<LoraAdapter> {
    let g = GgufFile::open(path)?;
    let at = |what: String| format!("{}: {what}", path.display());
    match g.get_str("general.type") {
        Some("adapter") => {}
        Some(other) => bail!(at(format!("general.type is {other:?}, not \"adapter\": this is not a GGUF adapter"))),
        None => bail!(at("no general.type = \"adapter\": this is not a GGUF adapter".into())),
    }
    if g.get_str("adapter.type") != Some("lora") {
        bail!(at(format!("adapter.type is {:?}; only \"lora\" adapters are supported", g.get_str("adapter.type"))));
    }
    let arch = gguf_arch(&model.config);
    let file_arch = g.get_str("general.architecture").unwrap_or("(none)");
    if file_arch != arch {
        bail!(at(format!("the adapter is for architecture {file_arch:?}, the base model is {arch:?}")));
    }
    let alpha = match g.opt_f64("adapter.lora.alpha")? {
        Some(a) if a.is_finite() && a > 0.0 => Some(a as f32),
        Some(0.0) => None, // llama.cpp: no scaling
        Some(a) => bail!(at(format!("adapter.lora.alpha must be a finite number >= 0, got {a}"))),
        None => None,
    };
    // Module name → (A tensor, B tensor).
    let mut pairs: BTreeMap<String, [Option<String>; 2]> = BTreeMap::new();
    for t in g.tensors.iter().map(|t| t.name.as_str()) {
        let (base, which) = match (t.strip_suffix(".lora_a"), t.strip_suffix(".lora_b")) {
            (Some(b), _) => (b, 0),
            (_, Some(b)) => (b, 1),
            _ => bail!(at(format!("tensor {t} is not a LoRA tensor (NAME.lora_a / NAME.lora_b)"))),
        };
        let module = gguf_to_hf_name(base)
            .and_then(|hf| hf.strip_suffix(".weight").map(str::to_string))
            .filter(|m| m.contains("_proj"))
            .with_context(|| at(format!("tensor {t}: not a linear module of a decoder layer (blk.N.attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down.weight)")))?;
        pairs.entry(module).or_default()[which] = Some(t.to_string());
    }
    if pairs.is_empty() {
        bail!(at("the adapter has no tensors".into()));
    }
    let specs = model.linear_modules();
    let mut ranks: BTreeMap<String, usize> = BTreeMap::new();
    for (module, [a, b]) in &pairs {
        let (Some(a), Some(b)) = (a, b) else { bail!(at(format!("module {module} has only one of lora_a / lora_b"))) };
        let spec =
            specs.iter().find(|s| &s.name == module).with_context(|| at(format!("tensor {a}: the base model has no module {module}")))?;
        let (ia, ib) = (g.tensor(a).expect("listed"), g.tensor(b).expect("listed"));
        let (sa, sb) = (ia.torch_shape(), ib.torch_shape());
        let r = sa.first().copied().unwrap_or(0);
        if sa.len() != 2 || sb.len() != 2 || sa[1] != spec.in_features || sb != [spec.out_features, r] || r == 0 {
            bail!(at(format!(
                "module {module}: lora_a is {sa:?} and lora_b {sb:?}; this base needs [r, {}] and [{}, r]",
                spec.in_features, spec.out_features
            )));
        }
        ranks.insert(module.clone(), r);
    }
    // The most common rank is r; the others are rank_pattern entries, as PEFT writes them.
    let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
    ranks.values().for_each(|&r| *counts.entry(r).or_default() += 1);
    let r = counts.iter().max_by_key(|(r, n)| (**n, std::cmp::Reverse(**r))).map(|(r, _)| *r).expect("at least one module");
    let exact = |name: &str| regex::escape(name);
    let config = LoraConfig {
        r,
        lora_alpha: alpha.unwrap_or(r as f32),
        target_modules: TargetModules::Names(ranks.keys().cloned().collect()),
        rank_pattern: ranks.iter().filter(|(_, &mr)| mr != r).map(|(m, &mr)| (exact(m), mr)).collect(),
        // Without alpha llama.cpp applies scale 1: alpha = r for every module.
        alpha_pattern: if alpha.is_none() {
            ranks.iter().filter(|(_, &mr)| mr != r).map(|(m, &mr)| (exact(m), mr as f32)).collect()
        } else {
            vec![]
        },
        ..LoraConfig::default()
    };
    let mut adapter = LoraAdapter::zeros(config, model).with_context(|| at("the adapter does not fit this model".into()))?;
    for i in 0..adapter.modules.len() {
        let m = adapter.modules[i].clone();
        let [Some(ta), Some(tb)] = &pairs[&m.name] else { unreachable!("checked above") };
        let (a, _) = g.tensor_f32(ta)?;
        let (mut b, _) = g.tensor_f32(tb)?;
        if let Some(bad) = a.iter().chain(&b).find(|x| !x.is_finite()) {
            bail!(at(format!("module {} holds a non-finite weight ({bad})", m.name)));
        }
        let heads = match m.kind {
            ModuleKind::Q => Some(model.config.num_heads),
            ModuleKind::K => Some(model.config.num_kv_heads),
            _ => None,
        };
        if let (Some(h), "llama") = (heads, arch) {
            b = unpermute_rows(&b, h, m.out_features, m.r);
        }
        adapter.params[m.offset..m.offset + m.a_len()].copy_from_slice(&a);
        adapter.params[m.offset + m.a_len()..m.offset + m.a_len() + m.b_len()].copy_from_slice(&b);
    }
    Ok(adapter)
}
