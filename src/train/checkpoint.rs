//! Checkpoints: everything a run needs to continue bit-identically, in one directory written
//! atomically (files fsynced in a temporary directory that is then renamed into place).

use super::optim::AdamW;
use crate::data::Cursor;
use crate::io::atomic_write;
use crate::lora::{self, LoraAdapter};
use crate::model::weights::{serialize_f32, TensorStore};
use crate::model::DecoderModel;
use crate::rng::Rng;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const STATE_FILE: &str = "trainer_state.json";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// The trainer's position, stored as trainer_state.json.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: usize,
    pub total_steps: usize,
    pub cursor: Cursor,
    /// Dropout RNG state.
    pub rng: [u64; 4],
    pub tokens_seen: u64,
    /// Fingerprint of the run settings that must not change across a resume.
    pub fingerprint: String,
}

impl TrainerState {
    /// The state fits the run that resumes it: its step within the run's steps, its data cursor
    /// within the data (and at most `max_epoch`), a usable random generator state.
    pub fn check_against(&self, total_steps: usize, sequences: usize, max_epoch: u64) -> Result<()> {
        if self.total_steps != total_steps {
            bail!("trainer_state.json: total_steps {} but this run has {total_steps}", self.total_steps);
        }
        if self.step > total_steps {
            bail!("trainer_state.json: step {} is past the run's {total_steps} steps", self.step);
        }
        if self.cursor.index > sequences {
            bail!("trainer_state.json: cursor.index {} is past the {sequences} training sequences", self.cursor.index);
        }
        if self.cursor.epoch > max_epoch {
            bail!("trainer_state.json: cursor.epoch {} is out of range for this run", self.cursor.epoch);
        }
        if self.rng == [0; 4] {
            bail!("trainer_state.json: rng is all zero, which no generator state can be");
        }
        Ok(())
    }
}

pub struct Checkpoint {
    pub adapter: LoraAdapter,
    pub optimizer: AdamW,
    pub state: TrainerState,
}

/// Writes `step-N` under `dir`, atomically as a whole.
pub fn save(dir: &Path, adapter: &LoraAdapter, opt: &AdamW, state: &TrainerState) -> Result<PathBuf> {
    let final_dir = dir.join(format!("step-{}", state.step));
    let tmp = dir.join(format!(".step-{}.tmp-{}", state.step, std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    lora::peft::save(adapter, &tmp)?;
    let mut t = BTreeMap::new();
    t.insert("exp_avg".to_string(), (vec![opt.m.len()], opt.m.clone()));
    t.insert("exp_avg_sq".to_string(), (vec![opt.v.len()], opt.v.clone()));
    let meta = [
        ("step".to_string(), opt.step.to_string()),
        ("beta1".to_string(), opt.beta1.to_string()),
        ("beta2".to_string(), opt.beta2.to_string()),
        ("eps".to_string(), opt.eps.to_string()),
        ("weight_decay".to_string(), opt.weight_decay.to_string()),
    ]
    .into_iter()
    .collect();
    atomic_write(&tmp.join(OPTIMIZER_FILE), &serialize_f32(&t, Some(meta))?)?;
    atomic_write(&tmp.join(STATE_FILE), (serde_json::to_string_pretty(state)? + "\n").as_bytes())?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).with_context(|| format!("replacing {}", final_dir.display()))?;
    }
    std::fs::rename(&tmp, &final_dir).with_context(|| format!("moving the checkpoint into {}", final_dir.display()))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(final_dir)
}

/// Reads a checkpoint directory written by `save`.
pub fn load(dir: &Path, model: &DecoderModel) -> Result<Checkpoint> {
    let state_path = dir.join(STATE_FILE);
    crate::io::check_input_dir(dir, "checkpoint")?;
    if std::fs::symlink_metadata(&state_path).is_err() {
        bail!("{} is not a lowrank checkpoint (no {STATE_FILE})", dir.display());
    }
    let text = crate::io::read_input_text(&state_path, "trainer state")?;
    let state: TrainerState = serde_json::from_str(&text).with_context(|| format!("parsing {}", state_path.display()))?;
    let adapter = lora::peft::load(dir, model)?;
    let opt_path = dir.join(OPTIMIZER_FILE);
    let store = TensorStore::open_files(std::slice::from_ref(&opt_path))?;
    let n = adapter.num_params();
    let m = store.f32("exp_avg", &[n])?;
    let v = store.f32("exp_avg_sq", &[n])?;
    if let Some(i) = m.iter().position(|x| !x.is_finite()) {
        bail!("{}: exp_avg[{i}] is {}, not a finite number", opt_path.display(), m[i]);
    }
    if let Some(i) = v.iter().position(|x| !(x.is_finite() && *x >= 0.0)) {
        bail!("{}: exp_avg_sq[{i}] is {}; second moments are finite and >= 0", opt_path.display(), v[i]);
    }
    let meta = |k: &str| -> Result<String> {
        let bytes = crate::io::read_input(&opt_path, "optimizer state")?;
        let (_, md) = safetensors::SafeTensors::read_metadata(&bytes)?;
        md.metadata().as_ref().and_then(|m| m.get(k).cloned()).with_context(|| format!("{}: no {k} in metadata", opt_path.display()))
    };
    let num = |k: &str| -> Result<f64> { meta(k)?.parse::<f64>().with_context(|| format!("{}: bad {k}", opt_path.display())) };
    let optimizer = AdamW {
        beta1: num("beta1")?,
        beta2: num("beta2")?,
        eps: num("eps")?,
        weight_decay: num("weight_decay")?,
        m,
        v,
        step: num("step")? as u64,
    };
    use crate::limits::{check, Allowed};
    let what = |k: &str| format!("{}: optimizer {k}", opt_path.display());
    check(&what("beta1"), optimizer.beta1, Allowed::RightOpen(0.0, 1.0))?;
    check(&what("beta2"), optimizer.beta2, Allowed::RightOpen(0.0, 1.0))?;
    check(&what("eps"), optimizer.eps, Allowed::Positive)?;
    check(&what("weight_decay"), optimizer.weight_decay, Allowed::NonNegative)?;
    if optimizer.step as usize != state.step {
        bail!("{}: optimizer step {} does not match trainer step {}", dir.display(), optimizer.step, state.step);
    }
    Ok(Checkpoint { adapter, optimizer, state })
}

/// Removes all but the newest `keep` `step-N` directories under `dir`.
pub fn prune(dir: &Path, keep: usize) -> Result<()> {
    let mut steps: Vec<(usize, PathBuf)> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix("step-").and_then(|n| n.parse().ok()).map(|n| (n, e.path()))
        })
        .collect();
    steps.sort();
    let excess = steps.len().saturating_sub(keep.max(1));
    for (_, p) in steps.into_iter().take(excess) {
        std::fs::remove_dir_all(&p).with_context(|| format!("removing old checkpoint {}", p.display()))?;
    }
    Ok(())
}

/// The dropout RNG a state describes.
pub fn rng_of(state: &TrainerState) -> Rng {
    Rng::from_state(state.rng)
}
