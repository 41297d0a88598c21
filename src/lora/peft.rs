//! PEFT adapter directories: `adapter_config.json` + `adapter_model.safetensors` with PEFT's exact
//! tensor names (`base_model.model.<module>.lora_A.weight` `[r, in]`, `...lora_B.weight` `[out, r]`).

use super::adapter::LoraAdapter;
use super::config::LoraConfig;
use crate::io::atomic_write;
use crate::model::decoder::DecoderModel;
use crate::model::weights::{serialize_f32, TensorStore};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// Writes the adapter into `dir` (created if needed); each file is written atomically.
pub fn save(adapter: &LoraAdapter, dir: &Path) -> Result<()> {
    let mut tensors = BTreeMap::new();
    for m in &adapter.modules {
        tensors.insert(m.peft_key("A"), (vec![m.r, m.in_features], adapter.a(m).to_vec()));
        tensors.insert(m.peft_key("B"), (vec![m.out_features, m.r], adapter.b(m).to_vec()));
    }
    let meta = [("format".to_string(), "pt".to_string())].into_iter().collect();
    atomic_write(&dir.join(WEIGHTS_FILE), &serialize_f32(&tensors, Some(meta))?)?;
    let config = serde_json::to_string_pretty(&adapter.config.to_peft_json())? + "\n";
    atomic_write(&dir.join(CONFIG_FILE), config.as_bytes())?;
    Ok(())
}

/// Reads the LoRA configuration of a PEFT adapter directory.
pub fn read_config(dir: &Path) -> Result<LoraConfig> {
    let path = dir.join(CONFIG_FILE);
    let text = crate::io::read_input_text(&path, "adapter config")?;
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    LoraConfig::from_peft_json(&v).with_context(|| format!("in {}", path.display()))
}

/// Loads a PEFT adapter for `model`, checking every tensor's shape against the base model.
pub fn load(dir: &Path, model: &DecoderModel) -> Result<LoraAdapter> {
    if std::fs::metadata(dir).is_ok_and(|m| m.is_file()) {
        bail!(
            "{} is a file; an adapter is a PEFT directory (adapter_config.json + adapter_model.safetensors) or a GGUF adapter",
            dir.display()
        );
    }
    crate::io::check_input_dir(dir, "adapter directory")?;
    let config = read_config(dir)?;
    let weights = dir.join(WEIGHTS_FILE);
    if !weights.exists() {
        if dir.join("adapter_model.bin").exists() {
            bail!("{}: only adapter_model.safetensors is supported, not the pickle format adapter_model.bin", dir.display());
        }
        bail!("{}: no {WEIGHTS_FILE}", dir.display());
    }
    let mut adapter = LoraAdapter::zeros(config, model).with_context(|| format!("adapter {} does not fit this model", dir.display()))?;
    let store = TensorStore::open_files(std::slice::from_ref(&weights))?;
    let mut expected = std::collections::HashSet::new();
    for i in 0..adapter.modules.len() {
        let m = adapter.modules[i].clone();
        let (ka, kb) = (m.peft_key("A"), m.peft_key("B"));
        let a =
            store.f32(&ka, &[m.r, m.in_features]).with_context(|| format!("adapter {} does not match the base model", dir.display()))?;
        let b =
            store.f32(&kb, &[m.out_features, m.r]).with_context(|| format!("adapter {} does not match the base model", dir.display()))?;
        if let Some(bad) = a.iter().chain(&b).find(|x| !x.is_finite()) {
            bail!("{}: module {} holds a non-finite weight ({bad})", weights.display(), m.name);
        }
        adapter.params[m.offset..m.offset + m.a_len()].copy_from_slice(&a);
        adapter.params[m.offset + m.a_len()..m.offset + m.a_len() + m.b_len()].copy_from_slice(&b);
        expected.insert(ka);
        expected.insert(kb);
    }
    if let Some(extra) = store.list().keys().find(|k| !expected.contains(*k)) {
        bail!("{}: tensor {extra} belongs to no module the adapter config selects in this model", weights.display());
    }
    Ok(adapter)
}
