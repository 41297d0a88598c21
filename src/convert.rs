//! Operations from files to files, as `lowrank merge`, `export-gguf` and `combine` run them:
//! each checks that its output is apart from its inputs (and empty, unless `overwrite`) before
//! it loads anything, and writes atomically.

use crate::io::{atomic_write, check_output_apart, prepare_output_dir, write_dir_atomically};
use crate::lora::combine::{add_weighted, merge, AdapterSpec, Combination};
use crate::lora::{gguf, peft, LoraAdapter};
use crate::pretrained::Pretrained;
use anyhow::{bail, Result};
use std::path::Path;

/// Writes `model` with `adapter`'s update (times `scale`) folded into its weights as an HF
/// directory `output`.
pub fn merge_into_model(model: &Path, adapter: &Path, scale: f32, output: &Path, overwrite: bool) -> Result<()> {
    crate::limits::check("--scale", scale as f64, crate::limits::Allowed::Closed(-1e6, 1e6))?;
    check_output_apart(output, &[model, adapter])?;
    if !overwrite {
        prepare_output_dir(output, false)?;
    }
    let mut p = Pretrained::load(model)?;
    let a = crate::lora::load(adapter, &p.model)?;
    merge(&mut p.model, &a, scale)?;
    write_dir_atomically(output, overwrite, |dir| p.save_hf_dir(dir))
}

/// Writes `adapter` (trained on `model`) as a llama.cpp GGUF adapter file; returns the number of
/// tensors and bytes written.
pub fn export_gguf(model: &Path, adapter: &Path, output: &Path, overwrite: bool) -> Result<(usize, usize)> {
    check_output_apart(output, &[model, adapter])?;
    if !overwrite && std::fs::symlink_metadata(output).is_ok() {
        bail!("the output {} already exists; pass --overwrite to replace it", output.display());
    }
    let p = Pretrained::load(model)?;
    let a = crate::lora::load(adapter, &p.model)?;
    let bytes = gguf::to_gguf(&a, &p.model.config)?;
    atomic_write(output, &bytes)?;
    Ok((2 * a.modules.len(), bytes.len()))
}

/// Writes the weighted combination of `adapters` (PATH@WEIGHT specs, as PEFT's
/// add_weighted_adapter) as one PEFT adapter directory; returns its rank.
pub fn combine(model: &Path, adapters: &[String], combination: &str, output: &Path, overwrite: bool) -> Result<usize> {
    // No names: the combination is one adapter.
    let specs: Vec<AdapterSpec> = adapters.iter().map(|s| AdapterSpec::parse_unnamed(s)).collect::<Result<_>>()?;
    let mut inputs: Vec<&Path> = specs.iter().map(|s| s.path.as_path()).collect();
    inputs.push(model);
    check_output_apart(output, &inputs)?;
    if !overwrite {
        prepare_output_dir(output, false)?;
    }
    let combination = Combination::parse(combination)?;
    let p = Pretrained::load(model)?;
    let loaded: Vec<(LoraAdapter, f32)> =
        specs.iter().map(|s| Ok((crate::lora::load(&s.path, &p.model)?, s.scale))).collect::<Result<_>>()?;
    let refs: Vec<(&LoraAdapter, f32)> = loaded.iter().map(|(a, w)| (a, *w)).collect();
    let out = add_weighted(&p.model, &refs, combination)?;
    write_dir_atomically(output, overwrite, |dir| peft::save(&out, dir))?;
    Ok(out.config.r)
}
