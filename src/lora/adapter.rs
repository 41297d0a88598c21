//! The weights of one LoRA adapter, in a single flat buffer so the optimizer, gradient clipping
//! and checkpoints treat them as one vector. Module `i` stores A (`[r, in]`) at `offset` and B
//! (`[out, r]`) right after it; gradients use the same layout.

use super::config::LoraConfig;
use crate::model::{
    adapt::{LowRank, LowRankSource, ModuleKind},
    decoder::DecoderModel,
};
use crate::rng::Rng;
use anyhow::{bail, Result};
use std::collections::HashMap;

#[derive(Clone, Debug, PartialEq)]
pub struct LoraModule {
    /// Full module name, e.g. `model.layers.0.self_attn.q_proj`.
    pub name: String,
    pub layer: usize,
    pub kind: ModuleKind,
    pub r: usize,
    pub alpha: f32,
    pub scale: f32,
    pub in_features: usize,
    pub out_features: usize,
    pub offset: usize,
}

impl LoraModule {
    pub fn a_len(&self) -> usize {
        self.r * self.in_features
    }
    pub fn b_len(&self) -> usize {
        self.out_features * self.r
    }
    /// The key PEFT saves this module's A or B matrix under (`which` is "A" or "B").
    pub fn peft_key(&self, which: &str) -> String {
        format!("base_model.model.{}.lora_{which}.weight", self.name)
    }
}

#[derive(Clone, Debug)]
pub struct LoraAdapter {
    pub config: LoraConfig,
    pub modules: Vec<LoraModule>,
    pub params: Vec<f32>,
    /// (layer, module kind) → index into `modules`.
    slots: HashMap<(usize, ModuleKind), usize>,
}

impl LoraAdapter {
    /// The adapter's structure for `model` with all weights zero.
    pub fn zeros(config: LoraConfig, model: &DecoderModel) -> Result<Self> {
        let candidates = model.linear_modules();
        let names: Vec<String> = candidates.iter().map(|c| c.name.clone()).collect();
        let selected = config.select(&names)?;
        let spec = |name: &str| candidates.iter().find(|c| c.name == name).expect("selected from candidates");
        for s in &selected {
            let c = spec(&s.name);
            let most = c.in_features.min(c.out_features);
            if s.r > most {
                bail!(
                    "LoRA rank {} for {} exceeds the module's dimensions ({} in, {} out): r must be at most {most}",
                    s.r,
                    s.name,
                    c.in_features,
                    c.out_features
                );
            }
        }
        let total: u128 = selected.iter().map(|s| s.r as u128 * (spec(&s.name).in_features + spec(&s.name).out_features) as u128).sum();
        // The weights, and during training their gradients and two optimizer moments.
        crate::limits::ensure_memory(4 * total, &format!("an adapter of {total} parameters"))?;
        let mut modules = Vec::with_capacity(selected.len());
        let mut slots = HashMap::with_capacity(selected.len());
        let mut offset = 0usize;
        for s in selected {
            let c = spec(&s.name);
            slots.insert((c.layer, c.kind), modules.len());
            let m = LoraModule {
                name: s.name,
                layer: c.layer,
                kind: c.kind,
                r: s.r,
                alpha: s.alpha,
                scale: s.scale,
                in_features: c.in_features,
                out_features: c.out_features,
                offset,
            };
            offset += m.a_len() + m.b_len();
            modules.push(m);
        }
        Ok(LoraAdapter { config, modules, params: vec![0.0; offset], slots })
    }

    /// A fresh adapter initialized as PEFT does by default: A kaiming-uniform with a = √5
    /// (bound 1/√in), B zero, so training starts from the base model's function.
    pub fn new(config: LoraConfig, model: &DecoderModel, seed: u64) -> Result<Self> {
        let mut a = Self::zeros(config, model)?;
        let mut rng = Rng::new(seed);
        for m in &a.modules {
            let bound = 1.0 / (m.in_features as f32).sqrt();
            for v in &mut a.params[m.offset..m.offset + m.a_len()] {
                *v = rng.uniform(-bound, bound);
            }
        }
        Ok(a)
    }

    pub fn module(&self, layer: usize, kind: ModuleKind) -> Option<&LoraModule> {
        self.slots.get(&(layer, kind)).map(|&i| &self.modules[i])
    }

    pub fn a(&self, m: &LoraModule) -> &[f32] {
        &self.params[m.offset..m.offset + m.a_len()]
    }

    pub fn b(&self, m: &LoraModule) -> &[f32] {
        &self.params[m.offset + m.a_len()..m.offset + m.a_len() + m.b_len()]
    }

    pub fn num_params(&self) -> usize {
        self.params.len()
    }

    /// PEFT's `print_trainable_parameters` line.
    pub fn trainable_report(&self, model: &DecoderModel) -> String {
        let trainable = self.num_params();
        let all = trainable + model.num_params();
        format!(
            "trainable params: {} || all params: {} || trainable%: {:.4}",
            thousands(trainable),
            thousands(all),
            100.0 * trainable as f64 / all as f64
        )
    }
}

impl LowRankSource for LoraAdapter {
    fn lookup(&self, layer: usize, kind: ModuleKind) -> Option<LowRank<'_>> {
        let m = self.module(layer, kind)?;
        Some(LowRank { a: self.a(m), b: self.b(m), r: m.r, scale: m.scale, dropout: self.config.lora_dropout, grad_offset: m.offset })
    }
}

/// 1234567 → "1,234,567".
pub fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::thousands;

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1843200), "1,843,200");
    }
}
