//! The training loop: data → micro-batches with gradient accumulation → clipped AdamW steps on
//! the adapter, with eval, metrics, checkpoints, resume and a clean stop on request.

use super::checkpoint::{self, TrainerState};
use super::optim::{clip_grad_norm, AdamW};
use super::schedule::Schedule;
use crate::data::{make_sequences, read_jsonl, to_batch, Cursor, Encoder, Format, Loader, Record, Sequence, SequenceStats};
use crate::io::atomic_write;
use crate::kernels::loss::LossSum;
use crate::lora::{self, LoraAdapter, LoraConfig, TargetModules};
use crate::model::decoder::LowRankSource;
use crate::model::{DecoderModel, WeightFormat};
use crate::pretrained::Pretrained;
use crate::rng::Rng;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Everything a training run is configured by (the CLI flags and the TOML file fill it).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainConfig {
    pub model: PathBuf,
    pub data: PathBuf,
    pub output: PathBuf,
    pub eval_data: Option<PathBuf>,
    pub eval_fraction: f64,
    pub format: Option<String>,
    pub train_on_inputs: bool,
    pub skip_bad_lines: bool,
    pub packing: bool,
    pub rank: usize,
    pub alpha: f32,
    pub dropout: f32,
    pub targets: String,
    pub rslora: bool,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub seq_len: usize,
    pub lr: f64,
    pub warmup_steps: usize,
    pub schedule: String,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub epochs: f64,
    pub max_steps: Option<usize>,
    pub eval_every: usize,
    pub save_every: usize,
    pub keep_checkpoints: usize,
    pub seed: u64,
    pub threads: usize,
    pub resume: Option<PathBuf>,
    pub gradient_checkpointing: bool,
    /// How the frozen base weights are kept in memory: f32, bf16, q8_0 or q4_1.
    pub weights: String,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model: PathBuf::new(),
            data: PathBuf::new(),
            output: PathBuf::from("lowrank-out"),
            eval_data: None,
            eval_fraction: 0.0,
            format: None,
            train_on_inputs: false,
            skip_bad_lines: false,
            packing: false,
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets: "q_proj,v_proj".into(),
            rslora: false,
            batch_size: 4,
            grad_accum: 1,
            seq_len: 512,
            lr: 2e-4,
            warmup_steps: 0,
            schedule: "linear".into(),
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            epochs: 1.0,
            max_steps: None,
            eval_every: 0,
            save_every: 0,
            keep_checkpoints: 2,
            seed: 42,
            threads: 0,
            resume: None,
            gradient_checkpointing: false,
            weights: "f32".into(),
        }
    }
}

impl TrainConfig {
    pub fn lora_config(&self, base: &str) -> LoraConfig {
        LoraConfig {
            r: self.rank,
            lora_alpha: self.alpha,
            lora_dropout: self.dropout,
            target_modules: TargetModules::parse(&self.targets),
            use_rslora: self.rslora,
            base_model_name_or_path: Some(base.to_string()),
            ..Default::default()
        }
    }

    /// The settings a resumed run must share with the run that wrote the checkpoint.
    fn fingerprint(&self) -> String {
        let c = TrainConfig {
            output: PathBuf::new(),
            resume: None,
            threads: 0,
            eval_every: 0,
            save_every: 0,
            keep_checkpoints: 0,
            ..self.clone()
        };
        serde_json::to_string(&c).expect("serializable")
    }

    fn validate(&self) -> Result<()> {
        if self.batch_size == 0 || self.grad_accum == 0 {
            bail!("batch-size and grad-accum must be at least 1");
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            bail!("lr must be a positive number, got {}", self.lr);
        }
        if !(0.0..1.0).contains(&self.eval_fraction) {
            bail!("eval-fraction must be in [0, 1), got {}", self.eval_fraction);
        }
        if self.max_steps.is_none() && self.epochs <= 0.0 {
            bail!("give a positive --epochs or --max-steps");
        }
        Schedule::parse(&self.schedule)?;
        WeightFormat::parse(&self.weights)?;
        Ok(())
    }
}

/// One line of metrics.jsonl.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Metric {
    pub step: usize,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub lr: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub grad_norm: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tokens_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub eval_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub eval_ppl: Option<f64>,
    pub epoch: f64,
    pub elapsed_s: f64,
}

/// What a run reports at the end.
#[derive(Clone, Debug, Serialize)]
pub struct TrainSummary {
    pub steps: usize,
    pub final_loss: Option<f64>,
    pub final_eval_loss: Option<f64>,
    pub trainable_params: usize,
    pub total_params: usize,
    pub adapter_bytes: u64,
    pub wall_s: f64,
    pub tokens_per_s: f64,
    pub interrupted: bool,
    pub adapter_dir: PathBuf,
}

/// Progress events for a front end (the CLI draws a bar from them).
pub trait Progress {
    fn start(&mut self, _total_steps: usize, _resumed_at: usize) {}
    fn step(&mut self, _m: &Metric) {}
    fn eval(&mut self, _m: &Metric) {}
    fn message(&mut self, _text: &str) {}
    fn finish(&mut self) {}
}

/// A `Progress` that reports nothing.
pub struct Silent;
impl Progress for Silent {}

/// Train and eval sequences with what building them did.
pub struct PreparedData {
    pub train: Vec<Sequence>,
    pub eval: Vec<Sequence>,
    pub train_stats: SequenceStats,
    pub skipped_lines: usize,
}

/// Reads, splits, tokenizes and masks the data of a run.
pub fn prepare_data(cfg: &TrainConfig, p: &Pretrained) -> Result<PreparedData> {
    let format = cfg.format.as_deref().map(Format::parse).transpose()?;
    let (mut records, mut skipped) = read_jsonl(&cfg.data, format, cfg.skip_bad_lines)?;
    let mut eval_records: Vec<Record> = Vec::new();
    if let Some(path) = &cfg.eval_data {
        let (r, s) = read_jsonl(path, format, cfg.skip_bad_lines)?;
        eval_records = r;
        skipped += s;
    } else if cfg.eval_fraction > 0.0 {
        let n_eval = ((records.len() as f64 * cfg.eval_fraction).round() as usize).clamp(1, records.len().saturating_sub(1).max(1));
        if records.len() < 2 {
            bail!("--eval-fraction needs at least 2 examples");
        }
        let mut idx: Vec<usize> = (0..records.len()).collect();
        Rng::new(cfg.seed ^ 0xE7A1).shuffle(&mut idx);
        let eval_set: std::collections::HashSet<usize> = idx[..n_eval].iter().copied().collect();
        let mut train = Vec::new();
        for (i, r) in records.into_iter().enumerate() {
            if eval_set.contains(&i) {
                eval_records.push(r)
            } else {
                train.push(r)
            }
        }
        records = train;
    }
    let t = &p.tokenizer;
    let template = p.chat_template()?;
    let enc = Encoder { tokenizer: t, template: template.as_ref(), train_on_inputs: cfg.train_on_inputs };
    let encode_all = |rs: &[Record], what: &str, path: &Path| -> Result<Vec<crate::data::Example>> {
        rs.iter()
            .enumerate()
            .map(|(i, r)| enc.encode(r).with_context(|| format!("{what} example {} of {}", i + 1, path.display())))
            .collect()
    };
    let train_examples = encode_all(&records, "training", &cfg.data)?;
    let (train, train_stats) = make_sequences(&train_examples, cfg.seq_len, cfg.packing)?;
    let eval = if eval_records.is_empty() {
        Vec::new()
    } else {
        let ex = encode_all(&eval_records, "eval", cfg.eval_data.as_deref().unwrap_or(&cfg.data))?;
        make_sequences(&ex, cfg.seq_len, false)?.0
    };
    Ok(PreparedData { train, eval, train_stats, skipped_lines: skipped })
}

/// Mean loss over `seqs` under the same masking as training (no dropout).
pub fn evaluate(model: &DecoderModel, ad: &dyn LowRankSource, seqs: &[Sequence], batch_size: usize, pad: u32) -> Result<LossSum> {
    let mut total = LossSum::default();
    for chunk in seqs.chunks(batch_size.max(1)) {
        let (batch, targets) = to_batch(chunk, pad);
        let l = model.loss(&batch, &targets, ad)?;
        total.sum += l.sum;
        total.count += l.count;
    }
    Ok(total)
}

/// Runs training as configured. `stop` is polled after every step: when set, a checkpoint is
/// written and the run ends early (Ctrl-C).
pub fn train(cfg: &TrainConfig, progress: &mut dyn Progress, stop: &AtomicBool) -> Result<TrainSummary> {
    cfg.validate()?;
    let started = Instant::now();
    let mut p = Pretrained::load_as(&cfg.model, WeightFormat::parse(&cfg.weights)?)?;
    p.model.gradient_checkpointing = cfg.gradient_checkpointing;
    let data = prepare_data(cfg, &p)?;
    let s = &data.train_stats;
    progress.message(&format!(
        "data: {} sequences from {} examples ({} truncated to {} tokens, {} without trainable tokens dropped, {} bad lines skipped), {} trained tokens; eval: {} sequences",
        s.sequences, s.examples, s.truncated, cfg.seq_len, s.empty, data.skipped_lines, s.trained_tokens, data.eval.len()
    ));
    let pad = p.tokenizer.eos_id.unwrap_or(0);
    let mut loader = Loader::new(data.train, cfg.batch_size, cfg.seed, true);
    let steps_per_epoch = loader.batches_per_epoch().div_ceil(cfg.grad_accum).max(1);
    let total_steps = cfg.max_steps.unwrap_or(((cfg.epochs * steps_per_epoch as f64).ceil() as usize).max(1));
    let schedule = Schedule::parse(&cfg.schedule)?;
    let ckpt_dir = cfg.output.join("checkpoints");

    let (mut adapter, mut opt, mut state) = match &cfg.resume {
        Some(dir) => {
            let c = checkpoint::load(dir, &p.model).with_context(|| format!("resuming from {}", dir.display()))?;
            if c.state.fingerprint != cfg.fingerprint() {
                bail!(
                    "{} was written by a run with different settings (model, data, LoRA or optimizer); resume needs the same ones",
                    dir.display()
                );
            }
            progress.message(&format!("resuming from {} at step {}", dir.display(), c.state.step));
            (c.adapter, c.optimizer, c.state)
        }
        None => {
            let adapter = LoraAdapter::new(cfg.lora_config(&p.name()), &p.model, cfg.seed)?;
            let opt = AdamW::new(adapter.num_params(), 0.9, 0.999, 1e-8, cfg.weight_decay);
            let state = TrainerState {
                step: 0,
                total_steps,
                cursor: Cursor::default(),
                rng: Rng::new(cfg.seed.wrapping_add(1)).state(),
                tokens_seen: 0,
                fingerprint: cfg.fingerprint(),
            };
            (adapter, opt, state)
        }
    };
    progress.message(&adapter.trainable_report(&p.model));
    let metrics_path = cfg.output.join("metrics.jsonl");
    let mut metrics = read_metrics(&metrics_path).unwrap_or_default();
    metrics.retain(|m| m.step <= state.step);
    if cfg.resume.is_none() {
        metrics.clear();
    }
    std::fs::create_dir_all(&cfg.output).with_context(|| format!("creating {}", cfg.output.display()))?;
    write_metrics(&metrics_path, &metrics)?;

    let mut rng = checkpoint::rng_of(&state);
    let mut grads = vec![0.0f32; adapter.num_params()];
    let mut interrupted = false;
    let mut last_loss = None;
    let mut last_eval = None;
    let (loop_start, tokens_at_start) = (Instant::now(), state.tokens_seen);
    progress.start(total_steps, state.step);
    while state.step < total_steps {
        let step_start = Instant::now();
        let lr = cfg.lr * schedule.factor(state.step, cfg.warmup_steps, total_steps);
        // Draw the step's micro-batches first so the loss is normalized by all of their
        // trained tokens together, as transformers does with gradient accumulation.
        let micro: Vec<Vec<Sequence>> = (0..cfg.grad_accum).map(|_| loader.next_batch(&mut state.cursor)).collect();
        let batches: Vec<_> = micro.iter().map(|m| to_batch(m, pad)).collect();
        let count: usize = batches.iter().map(|(_, t)| t.iter().flatten().count()).sum();
        grads.fill(0.0);
        let mut loss = LossSum::default();
        for (batch, targets) in &batches {
            let l = p.model.loss_and_grads(batch, targets, &adapter, &mut grads, 1.0 / count.max(1) as f32, Some(&mut rng))?;
            loss.sum += l.sum;
            loss.count += l.count;
            state.tokens_seen += batch.tokens.len() as u64;
        }
        let grad_norm = clip_grad_norm(&mut grads, cfg.max_grad_norm);
        opt.update(&mut adapter.params, &grads, lr);
        state.step += 1;
        state.rng = rng.state();
        let tokens: usize = batches.iter().map(|(b, _)| b.tokens.len()).sum();
        let m = Metric {
            step: state.step,
            loss: Some(loss.mean()),
            lr: Some(lr),
            grad_norm: Some(grad_norm),
            tokens_per_s: Some(tokens as f64 / step_start.elapsed().as_secs_f64()),
            eval_loss: None,
            eval_ppl: None,
            epoch: state.cursor.epoch as f64 + state.cursor.index as f64 / loader.len() as f64,
            elapsed_s: started.elapsed().as_secs_f64(),
        };
        if !loss.mean().is_finite() {
            bail!("the loss became {} at step {}; lower --lr", loss.mean(), state.step);
        }
        last_loss = m.loss;
        progress.step(&m);
        append_metric(&metrics_path, &m)?;
        let last = state.step == total_steps;
        if !data.eval.is_empty() && ((cfg.eval_every > 0 && state.step % cfg.eval_every == 0) || last) {
            let e = evaluate(&p.model, &adapter, &data.eval, cfg.batch_size, pad)?;
            let em = Metric {
                step: state.step,
                eval_loss: Some(e.mean()),
                eval_ppl: Some(e.mean().exp()),
                loss: None,
                lr: None,
                grad_norm: None,
                tokens_per_s: None,
                ..m
            };
            last_eval = em.eval_loss;
            progress.eval(&em);
            append_metric(&metrics_path, &em)?;
        }
        let stopping = stop.load(Ordering::SeqCst);
        if (cfg.save_every > 0 && state.step % cfg.save_every == 0) || (stopping && !last) {
            let dir = checkpoint::save(&ckpt_dir, &adapter, &opt, &state)?;
            checkpoint::prune(&ckpt_dir, cfg.keep_checkpoints)?;
            if stopping {
                progress.message(&format!(
                    "interrupted: checkpoint written to {} (continue with --resume {})",
                    dir.display(),
                    dir.display()
                ));
            }
        }
        if stopping && !last {
            interrupted = true;
            break;
        }
    }
    progress.finish();
    let adapter_dir = cfg.output.join("adapter");
    lora::peft::save(&adapter, &adapter_dir)?;
    let all = read_metrics(&metrics_path)?;
    crate::plot::loss_png(&all, &cfg.output.join("loss.png"))?;
    let adapter_bytes = std::fs::metadata(adapter_dir.join(lora::peft::WEIGHTS_FILE)).map(|m| m.len()).unwrap_or(0);
    let run_tokens = state.tokens_seen - tokens_at_start;
    Ok(TrainSummary {
        steps: state.step,
        final_loss: last_loss,
        final_eval_loss: last_eval,
        trainable_params: adapter.num_params(),
        total_params: adapter.num_params() + p.model.num_params(),
        adapter_bytes,
        wall_s: started.elapsed().as_secs_f64(),
        tokens_per_s: run_tokens as f64 / loop_start.elapsed().as_secs_f64().max(1e-9),
        interrupted,
        adapter_dir,
    })
}

pub fn read_metrics(path: &Path) -> Result<Vec<Metric>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("{}:{}", path.display(), i + 1)))
        .collect()
}

fn write_metrics(path: &Path, metrics: &[Metric]) -> Result<()> {
    let mut text = String::new();
    for m in metrics {
        text.push_str(&serde_json::to_string(m)?);
        text.push('\n');
    }
    atomic_write(path, text.as_bytes())
}

/// Appends one line (a torn last line is impossible to mistake: each line is one write).
fn append_metric(path: &Path, m: &Metric) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).with_context(|| format!("opening {}", path.display()))?;
    f.write_all(format!("{}\n", serde_json::to_string(m)?).as_bytes())?;
    Ok(())
}
