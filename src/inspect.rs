//! `lowrank inspect`: what a model or adapter file holds, in a few lines.

use crate::lora::{self, LoraConfig};
use crate::model::gguf::GgufFile;
use crate::model::quant::type_name;
use crate::model::weights::TensorStore;
use crate::model::DecoderConfig;
use anyhow::{bail, Result};
use std::fmt::Write;
use std::path::Path;

/// Bytes of the regular files under `path` (itself a file or a directory). Symbolic links are
/// not followed into directories (a link loop would never end), and the walk stops at depth 8.
fn size_on_disk(path: &Path) -> u64 {
    fn walk(dir: &Path, depth: usize) -> u64 {
        if depth > 8 {
            return 0;
        }
        let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
        entries
            .filter_map(|e| e.ok())
            .map(|e| match e.file_type() {
                Ok(t) if t.is_dir() => walk(&e.path(), depth + 1),
                Ok(t) if t.is_file() => e.metadata().map(|m| m.len()).unwrap_or(0),
                // A link counts when it leads to a regular file; links to directories are skipped.
                Ok(t) if t.is_symlink() => std::fs::metadata(e.path()).ok().filter(|m| m.is_file()).map_or(0, |m| m.len()),
                _ => 0,
            })
            .sum()
    }
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => m.len(),
        Ok(m) if m.is_dir() => walk(path, 0),
        _ => 0,
    }
}

fn mib(b: u64) -> String {
    format!("{:.2} MiB", b as f64 / (1 << 20) as f64)
}

fn describe_lora(out: &mut String, c: &LoraConfig) {
    let _ = writeln!(
        out,
        "LoRA: r={} lora_alpha={} dropout={} rslora={} targets={:?}",
        c.r, c.lora_alpha, c.lora_dropout, c.use_rslora, c.target_modules
    );
    if !c.rank_pattern.is_empty() || !c.alpha_pattern.is_empty() {
        let _ = writeln!(out, "rank_pattern={:?} alpha_pattern={:?}", c.rank_pattern, c.alpha_pattern);
    }
    if let Some(l) = &c.layers_to_transform {
        let _ = writeln!(out, "layers_to_transform={l:?}");
    }
    if let Some(b) = &c.base_model_name_or_path {
        let _ = writeln!(out, "base model: {b}");
    }
}

/// A report on a Hugging Face model directory, a PEFT adapter directory or a GGUF file.
pub fn inspect(path: &Path) -> Result<String> {
    let mut out = String::new();
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(crate::io::missing(e, format!("{} does not exist", path.display())))
        }
        Err(e) => bail!("{}: {e}", path.display()),
    };
    if !meta.is_dir() && !meta.is_file() {
        bail!("{} is not a regular file or a directory (a FIFO, socket or device)", path.display());
    }
    let size = size_on_disk(path);
    if path.is_dir() && path.join(lora::peft::CONFIG_FILE).exists() {
        let cfg = lora::peft::read_config(path)?;
        let st = TensorStore::open_files(&[path.join(lora::peft::WEIGHTS_FILE)])?;
        let list = st.list();
        let params: usize = list.values().map(|m| m.shape.iter().product::<usize>()).sum();
        let _ = writeln!(out, "PEFT LoRA adapter {} ({})", path.display(), mib(size));
        describe_lora(&mut out, &cfg);
        let _ = writeln!(out, "{} tensors, {params} parameters", list.len());
        for (name, m) in list.iter().take(6) {
            let _ = writeln!(out, "  {name} {:?} {:?}", m.shape, m.dtype);
        }
        if list.len() > 6 {
            let _ = writeln!(out, "  … {} more", list.len() - 6);
        }
    } else if path.is_dir() {
        let cfg = DecoderConfig::from_file(&path.join("config.json"))?;
        let st = TensorStore::open_dir(path)?;
        let list = st.list();
        let params: usize = list.values().map(|m| m.shape.iter().product::<usize>()).sum();
        let _ = writeln!(out, "Hugging Face model {} ({})", path.display(), mib(size));
        let _ = writeln!(out, "{cfg:#?}");
        let _ = writeln!(out, "{} tensors, {params} parameters", list.len());
    } else {
        let g = GgufFile::open(path)?;
        let kind = g.get_str("general.type").unwrap_or("model");
        let params: usize = g.tensors.iter().map(|t| t.n_elements()).sum();
        let _ = writeln!(out, "GGUF v{} {kind} {} ({})", g.version, path.display(), mib(size));
        for (k, v) in &g.metadata {
            let _ = writeln!(out, "  {k} = {}", v.summary());
        }
        let mut types = std::collections::BTreeMap::new();
        for t in &g.tensors {
            *types.entry(type_name(t.type_id)).or_insert(0usize) += 1;
        }
        let _ = writeln!(out, "{} tensors ({types:?}), {params} parameters", g.tensors.len());
        for t in g.tensors.iter().take(6) {
            let _ = writeln!(out, "  {} {:?} {}", t.name, t.torch_shape(), type_name(t.type_id));
        }
    }
    Ok(out)
}
