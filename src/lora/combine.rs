//! Using several adapters: a named set with one active adapter at a time (each with its own
//! scale), merging an adapter into the base weights and back, and PEFT's
//! `add_weighted_adapter` for the `linear` and `cat` combinations.

use super::adapter::LoraAdapter;
use super::config::TargetModules;
use crate::kernels::matmul;
use crate::model::{
    adapt::{LowRank, LowRankSource, ModuleKind, SharedAdapter},
    decoder::DecoderModel,
};
use anyhow::{bail, Result};
use std::sync::Arc;

/// An adapter as a command line or a request names it: `[NAME=]PATH[@SCALE]` (NAME defaults to
/// "default", SCALE to 1; a path may contain `@` when what follows the last one is no number).
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterSpec {
    pub name: String,
    pub path: std::path::PathBuf,
    pub scale: f32,
}

impl AdapterSpec {
    pub fn parse(spec: &str) -> Result<Self> {
        match spec.split_once('=') {
            Some((name, rest)) => Ok(AdapterSpec { name: name.to_string(), ..Self::parse_unnamed(rest)? }),
            None => Self::parse_unnamed(spec),
        }
    }

    /// `PATH[@SCALE]` alone (named "default"), for commands whose adapters need no names.
    pub fn parse_unnamed(spec: &str) -> Result<Self> {
        let (path, scale) = match spec.rsplit_once('@') {
            Some((path, w)) if !path.is_empty() && w.parse::<f32>().is_ok() => (path, w.parse::<f32>()?),
            _ => (spec, 1.0),
        };
        crate::limits::check(&format!("adapter {spec:?}: the weight"), scale as f64, crate::limits::Allowed::Closed(-1e6, 1e6))?;
        Ok(AdapterSpec { name: "default".to_string(), path: path.into(), scale })
    }
}

/// Adapters loaded side by side, unmerged, each under a name with its scale (the registry a
/// front end keeps); `active` picks the one the model applies.
/// Entries are shared: a running sequence that uses an adapter keeps it alive after `remove`.
#[derive(Default)]
pub struct AdapterSet {
    pub entries: Vec<(String, Arc<LoraAdapter>, f32)>,
    pub active: Option<usize>,
}

impl AdapterSet {
    pub fn add(&mut self, name: &str, adapter: LoraAdapter, scale: f32) -> Result<()> {
        let valid = !name.is_empty() && name.len() <= 64 && name.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        if !valid || name == "none" {
            bail!("adapter name {name:?} is not usable: 1 to 64 of A-Z a-z 0-9 _ . -, and not \"none\" (which means no adapter)");
        }
        crate::limits::check(&format!("the scale of adapter {name}"), scale as f64, crate::limits::Allowed::Closed(-1e6, 1e6))?;
        if self.entries.iter().any(|e| e.0 == name) {
            bail!("an adapter named \"{name}\" is already loaded");
        }
        self.entries.push((name.to_string(), Arc::new(adapter), scale));
        if self.active.is_none() {
            self.active = Some(self.entries.len() - 1);
        }
        Ok(())
    }

    /// Loads the PEFT adapter directory `spec` names, for `model`, under its name.
    pub fn load(&mut self, spec: &AdapterSpec, model: &DecoderModel) -> Result<()> {
        let adapter = super::load(&spec.path, model)?;
        self.add(&spec.name, adapter, spec.scale)
    }

    /// Unloads the adapter `name` (none is active afterwards if it was).
    pub fn remove(&mut self, name: &str) -> Result<Arc<LoraAdapter>> {
        let Some(i) = self.entries.iter().position(|e| e.0 == name) else { bail!("no adapter named \"{name}\"") };
        self.active = match self.active {
            Some(a) if a == i => None,
            Some(a) if a > i => Some(a - 1),
            other => other,
        };
        Ok(self.entries.remove(i).1)
    }

    /// Makes `name` the active adapter, or none with `None`.
    pub fn activate(&mut self, name: Option<&str>) -> Result<()> {
        self.active = match name {
            None => None,
            Some(n) => match self.entries.iter().position(|e| e.0 == n) {
                Some(i) => Some(i),
                None => bail!("no adapter named \"{n}\" (loaded: {})", self.names().join(", ")),
            },
        };
        Ok(())
    }

    pub fn names(&self) -> Vec<String> {
        self.entries.iter().map(|e| e.0.clone()).collect()
    }

    pub fn active_name(&self) -> Option<&str> {
        self.active.map(|i| self.entries[i].0.as_str())
    }

    /// The active adapter and its scale, for a generation request.
    pub fn active_adapter(&self) -> Option<(SharedAdapter, f32)> {
        self.active.map(|i| {
            let (_, a, scale) = &self.entries[i];
            (a.clone() as SharedAdapter, *scale)
        })
    }
}

impl LowRankSource for AdapterSet {
    fn lookup(&self, layer: usize, kind: ModuleKind) -> Option<LowRank<'_>> {
        let (_, adapter, scale) = &self.entries[self.active?];
        adapter.lookup(layer, kind).map(|lr| LowRank { scale: lr.scale * scale, ..lr })
    }
}

/// W += weight · scale · B·A for every module of the adapter (`weight` = −1 undoes it). A module
/// stored compact (bf16, Q8_0, Q4_1) is expanded to f32 first and stays f32. Each module's new
/// weights are computed aside and checked finite before they replace the old ones, so an
/// adapter with huge weights is an error naming the module, never an infinite weight; the
/// modules already changed are then changed back, so an error leaves the model as it was (to
/// within rounding, for modules that were compact).
fn add_delta(model: &mut DecoderModel, adapter: &LoraAdapter, weight: f32) -> Result<()> {
    let add = |model: &mut DecoderModel, m: &super::adapter::LoraModule, weight: f32| -> Result<()> {
        let lin = &mut model.layers[m.layer].linear[m.kind.index()];
        let mut w = lin.w.to_f32();
        matmul(&mut w, adapter.b(m), false, adapter.a(m), false, m.out_features, m.in_features, m.r, weight * m.scale, true);
        if let Some(x) = w.iter().find(|x| !x.is_finite()) {
            bail!("merging the adapter into {} gives a non-finite weight ({x}); the adapter's weights are too large", m.name);
        }
        lin.w.f32_mut().copy_from_slice(&w);
        Ok(())
    };
    for (i, m) in adapter.modules.iter().enumerate() {
        if let Err(e) = add(model, m, weight) {
            for done in &adapter.modules[..i] {
                let _ = add(model, done, -weight); // subtracts a change that was finite
            }
            return Err(e);
        }
    }
    Ok(())
}

/// Folds the adapter into the base weights: afterwards the model alone computes what model +
/// adapter computed (zero inference overhead).
pub fn merge(model: &mut DecoderModel, adapter: &LoraAdapter, weight: f32) -> Result<()> {
    crate::limits::check("the merge weight", weight as f64, crate::limits::Allowed::Closed(-1e6, 1e6))?;
    add_delta(model, adapter, weight)
}

/// Undoes `merge` by subtracting the same product. Float rounding leaves each weight within a
/// few ulps of its original value (the tests bound it).
pub fn unmerge(model: &mut DecoderModel, adapter: &LoraAdapter, weight: f32) -> Result<()> {
    add_delta(model, adapter, -weight)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Combination {
    /// A = Σ sign(wᵢsᵢ)·√|wᵢsᵢ|·Aᵢ, B = Σ √|wᵢsᵢ|·Bᵢ (equal ranks required).
    Linear,
    /// A = [w₁s₁A₁; w₂s₂A₂; …], B = [B₁ B₂ …]: the update is exactly Σ wᵢsᵢBᵢAᵢ.
    Cat,
}

impl Combination {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "linear" => Ok(Combination::Linear),
            "cat" => Ok(Combination::Cat),
            _ => bail!("unknown combination \"{s}\" (supported: linear, cat)"),
        }
    }
}

/// PEFT's `add_weighted_adapter`: a new adapter with r = lora_alpha = the new rank, the first
/// adapter's other settings, and target modules the union of all adapters' modules.
pub fn add_weighted(model: &DecoderModel, adapters: &[(&LoraAdapter, f32)], how: Combination) -> Result<LoraAdapter> {
    let Some((first, _)) = adapters.first() else { bail!("no adapters to combine") };
    let how = if adapters.len() == 1 { Combination::Linear } else { how };
    let ranks: Vec<usize> = adapters.iter().map(|(a, _)| a.config.r).collect();
    let new_rank = match how {
        Combination::Linear => {
            if ranks.iter().any(|&r| r != ranks[0]) || adapters.iter().any(|(a, _)| a.modules.iter().any(|m| m.r != ranks[0])) {
                bail!("the linear combination needs adapters of one rank (got {ranks:?}); use cat");
            }
            ranks[0]
        }
        Combination::Cat => ranks.iter().sum(),
    };
    let mut names: Vec<String> = adapters.iter().flat_map(|(a, _)| a.modules.iter().map(|m| m.name.clone())).collect();
    names.sort();
    names.dedup();
    let mut config = first.config.clone();
    config.r = new_rank;
    config.lora_alpha = new_rank as f32;
    config.rank_pattern.clear();
    config.alpha_pattern.clear();
    if how == Combination::Cat {
        // A module's rank is the sum of the ranks it has in the adapters that hold it, which
        // differs from r when some adapter lacks the module or has a rank_pattern for it: such
        // modules get their own rank (and alpha = rank, so every scale stays 1) by exact name.
        for name in &names {
            let r: usize = adapters.iter().filter_map(|(a, _)| a.modules.iter().find(|m| &m.name == name)).map(|m| m.r).sum();
            if r != new_rank {
                let key = regex::escape(name);
                config.rank_pattern.push((key.clone(), r));
                config.alpha_pattern.push((key, r as f32));
            }
        }
    }
    config.target_modules = TargetModules::Names(names);
    let mut out = LoraAdapter::zeros(config, model)?;
    for i in 0..out.modules.len() {
        let t = out.modules[i].clone();
        let (a_len, b_len) = (t.a_len(), t.b_len());
        let mut new_a = vec![0.0f32; a_len];
        let mut new_b = vec![0.0f32; b_len];
        let mut row = 0; // for cat: where the next adapter's rows of A (columns of B) go
        for (adapter, weight) in adapters {
            let Some(m) = adapter.module(t.layer, t.kind) else { continue };
            let (a, b) = (adapter.a(m), adapter.b(m));
            let ws = weight * m.scale;
            match how {
                Combination::Linear => {
                    let (wa, wb) = (ws.abs().sqrt() * ws.signum(), ws.abs().sqrt());
                    new_a.iter_mut().zip(a).for_each(|(x, y)| *x += wa * y);
                    new_b.iter_mut().zip(b).for_each(|(x, y)| *x += wb * y);
                }
                Combination::Cat => {
                    for (k, v) in a.iter().enumerate() {
                        new_a[row * t.in_features + k] = ws * v;
                    }
                    for o in 0..t.out_features {
                        for c in 0..m.r {
                            new_b[o * t.r + row + c] = b[o * m.r + c];
                        }
                    }
                    row += m.r;
                }
            }
        }
        out.params[t.offset..t.offset + a_len].copy_from_slice(&new_a);
        out.params[t.offset + a_len..t.offset + a_len + b_len].copy_from_slice(&new_b);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapter_specs_parse_names_paths_and_weights() {
        let s = AdapterSpec::parse("dates=runs/a@b/adapter@0.5").unwrap();
        assert_eq!((s.name.as_str(), s.path.to_str().unwrap(), s.scale), ("dates", "runs/a@b/adapter", 0.5));
        let s = AdapterSpec::parse("runs/x@latest").unwrap();
        assert_eq!((s.name.as_str(), s.path.to_str().unwrap(), s.scale), ("default", "runs/x@latest", 1.0));
        assert_eq!(AdapterSpec::parse_unnamed("a=b@2").unwrap().path.to_str(), Some("a=b"));
        assert!(AdapterSpec::parse("x=p@nan").unwrap_err().to_string().contains("got NaN"));
        assert!(AdapterSpec::parse("x=p@1e9").is_err());
    }
}
