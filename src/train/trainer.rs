//! The training loop: data → micro-batches with gradient accumulation → clipped AdamW steps on
//! the adapter, with eval, metrics, checkpoints, resume and a clean stop on request.

use super::checkpoint::{self, TrainerState};
use super::metrics::{append_metric, write_metrics};
pub use super::metrics::{read_metrics, Metric};
use super::optim::{clip_grad_norm, AdamW};
use super::schedule::Schedule;
use crate::data::{make_sequences, read_jsonl, to_batch, Cursor, Encoder, Format, Loader, Record, Sequence, SequenceStats};
use crate::kernels::loss::LossSum;
use crate::lora::{self, LoraAdapter, LoraConfig, TargetModules};
use crate::model::WeightFormat;
use crate::pretrained::Pretrained;
use crate::rng::Rng;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Everything a training run is configured by: the one definition of the training settings.
/// The same struct is the `lowrank train` flags (clap, with the defaults below), the keys of a
/// TOML settings file (serde, snake_case names) and what the library and front ends pass to
/// `train`. `TrainConfig::default()` is the flags' defaults.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, clap::Args)]
pub struct TrainConfig {
    /// Base model: a Hugging Face directory or a .gguf file.
    #[arg(long, default_value = "", hide_default_value = true, value_parser = any_path)]
    pub model: PathBuf,
    /// Training data (JSONL).
    #[arg(long, default_value = "", hide_default_value = true, value_parser = any_path)]
    pub data: PathBuf,
    /// Output directory (adapter/, checkpoints/, metrics.jsonl, loss.png).
    #[arg(long, default_value = "lowrank-out")]
    pub output: PathBuf,
    /// Separate eval data (JSONL).
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Hold out this fraction of the training data for eval.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub eval_fraction: f64,
    /// Data format: text, prompt-completion, alpaca or messages (default: detected per line).
    #[arg(long)]
    pub format: Option<String>,
    /// Also train on prompt / user tokens.
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub train_on_inputs: bool,
    /// Skip (and count) malformed lines instead of stopping.
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub skip_bad_lines: bool,
    /// Pack short examples together into full sequences.
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub packing: bool,
    /// LoRA rank r.
    #[arg(long, default_value_t = 8, allow_negative_numbers = true)]
    pub rank: usize,
    /// LoRA alpha (scale = alpha / r).
    #[arg(long, default_value_t = 16.0, allow_negative_numbers = true)]
    pub alpha: f32,
    /// Dropout on the LoRA input.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub dropout: f32,
    /// Target modules: comma-separated names (q_proj,v_proj), "all-linear" or re:REGEX.
    #[arg(long, default_value = "q_proj,v_proj")]
    pub targets: String,
    /// rsLoRA scaling (alpha / sqrt(r)).
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub rslora: bool,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 4, allow_negative_numbers = true)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    pub grad_accum: usize,
    /// Maximum tokens per sequence (longer examples are truncated and counted).
    #[arg(long, default_value_t = 512, allow_negative_numbers = true)]
    pub seq_len: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-4, allow_negative_numbers = true)]
    pub lr: f64,
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub warmup_steps: usize,
    /// linear, cosine, constant or constant_with_warmup.
    #[arg(long, default_value = "linear")]
    pub schedule: String,
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (0 turns clipping off).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub max_grad_norm: f64,
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub epochs: f64,
    /// Stop after this many optimizer steps (overrides --epochs).
    #[arg(long, allow_negative_numbers = true)]
    pub max_steps: Option<usize>,
    /// Evaluate every N steps (and at the end).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub eval_every: usize,
    /// Write a checkpoint every N steps.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub save_every: usize,
    /// Checkpoints to keep.
    #[arg(long, default_value_t = 2, allow_negative_numbers = true)]
    pub keep_checkpoints: usize,
    #[arg(long, default_value_t = 42, allow_negative_numbers = true)]
    pub seed: u64,
    /// Worker threads (0: all cores).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub threads: usize,
    /// Continue from a checkpoint directory (…/checkpoints/step-N).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Replace what a non-empty output directory holds (it is cleared once the model and data
    /// have loaded). Without it, a new run refuses a non-empty output directory.
    #[serde(default)]
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub overwrite: bool,
    /// Recompute each layer in the backward pass instead of keeping its activations.
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub gradient_checkpointing: bool,
    /// Keep the frozen base weights as f32, bf16, q8_0 or q4_1 (less memory; f32 is exact; bf16
    /// trains ~2x faster on CPUs with AMX).
    #[arg(long, default_value = "f32")]
    pub weights: String,
}

/// A path flag whose default is "not given" (empty), checked by `validate`.
fn any_path(s: &str) -> std::result::Result<PathBuf, String> {
    Ok(PathBuf::from(s))
}

impl Default for TrainConfig {
    /// The flags' defaults: the one place they are written is the `#[arg]` attributes above.
    fn default() -> Self {
        #[derive(clap::Parser)]
        struct Flags {
            #[command(flatten)]
            settings: TrainConfig,
        }
        <Flags as clap::Parser>::try_parse_from(["lowrank"]).expect("the defaults parse").settings
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
        let mut v = serde_json::to_value(&c).expect("serializable");
        v.as_object_mut().expect("an object").remove("overwrite");
        v.to_string()
    }

    /// The settings that differ between two fingerprints, as "name: then → now" lines.
    fn fingerprint_diff(then: &str, now: &str) -> String {
        let parse = |s: &str| serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(s).unwrap_or_default();
        let (a, b) = (parse(then), parse(now));
        let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
        keys.sort();
        keys.dedup();
        let null = serde_json::Value::Null;
        keys.into_iter()
            .filter(|k| a.get(*k) != b.get(*k))
            .map(|k| format!("{}: checkpoint {}, this run {}", k.replace('_', "-"), a.get(k).unwrap_or(&null), b.get(k).unwrap_or(&null)))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// These settings under a TOML settings file: every key of `toml_text` (the file at `path`)
    /// replaces the value here unless `on_command_line(key)` says the flag was given (flags
    /// override the file). Unknown keys and values of the wrong type are errors naming the key.
    pub fn with_file(self, toml_text: &str, path: &Path, on_command_line: &dyn Fn(&str) -> bool) -> Result<Self> {
        let table: toml::Table = toml::from_str(toml_text).with_context(|| format!("in {}", path.display()))?;
        let mut values = serde_json::Map::new();
        for (key, value) in table {
            if !on_command_line(&key) {
                values.insert(key, serde_json::to_value(&value)?);
            }
        }
        self.with_settings(values, &format!("in {}", path.display()))
    }

    /// These settings with each of `values` (snake_case names, JSON values: a settings file, or
    /// keyword arguments from Python) in place of the current one. Unknown keys and values of
    /// the wrong type are errors that begin with `origin` and name the key.
    pub fn with_settings(self, values: serde_json::Map<String, serde_json::Value>, origin: &str) -> Result<Self> {
        let mut settings = match serde_json::to_value(&self)? {
            serde_json::Value::Object(o) => o,
            _ => unreachable!("a struct serializes to an object"),
        };
        for (key, value) in values {
            if !settings.contains_key(&key) {
                let known: Vec<&str> = settings.keys().map(String::as_str).collect();
                bail!("{origin}: unknown setting \"{key}\" (settings: {})", known.join(", "));
            }
            settings.insert(key.clone(), value);
            // Typed now, so that a wrong type names its key.
            serde_json::from_value::<TrainConfig>(serde_json::Value::Object(settings.clone()))
                .map_err(|e| anyhow::anyhow!("{origin}: setting \"{key}\": {e}"))?;
        }
        Ok(serde_json::from_value(serde_json::Value::Object(settings))?)
    }

    /// Every setting in its range; the error names the setting (as its flag) and the range.
    pub fn validate(&self) -> Result<()> {
        if self.model.as_os_str().is_empty() || self.data.as_os_str().is_empty() {
            bail!("--model and --data are required (as flags or in the --config file)");
        }
        use crate::limits::{check, check_count, Allowed, MAX_STEPS, MAX_THREADS};
        check_count("batch-size", self.batch_size, 1, 1 << 20)?;
        check_count("grad-accum", self.grad_accum, 1, 1 << 20)?;
        check_count("seq-len", self.seq_len, 2, 1 << 24)?;
        check_count("rank", self.rank, 1, 1 << 16)?;
        check("alpha", self.alpha as f64, Allowed::Positive)?;
        check("dropout", self.dropout as f64, Allowed::RightOpen(0.0, 1.0))?;
        check("lr", self.lr, Allowed::Positive)?;
        check("eval-fraction", self.eval_fraction, Allowed::RightOpen(0.0, 1.0))?;
        check("weight-decay", self.weight_decay, Allowed::NonNegative)?;
        check("max-grad-norm (0 turns clipping off)", self.max_grad_norm, Allowed::NonNegative)?;
        check("epochs", self.epochs, Allowed::LeftOpen(0.0, 1e6))?;
        if let Some(n) = self.max_steps {
            check_count("max-steps", n, 1, MAX_STEPS)?;
        }
        check_count("warmup-steps", self.warmup_steps, 0, MAX_STEPS)?;
        check_count("threads (0 = all cores)", self.threads, 0, MAX_THREADS)?;
        Schedule::parse(&self.schedule)?;
        WeightFormat::parse(&self.weights)?;
        if self.resume.is_some() && self.overwrite {
            bail!("--overwrite and --resume exclude each other (resuming continues the files that are there)");
        }
        Ok(())
    }
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
    let enc = Encoder {
        tokenizer: t,
        template: template.as_ref(),
        train_on_inputs: cfg.train_on_inputs,
        max_tokens: if cfg.packing { crate::data::examples::MAX_PACKED_EXAMPLE_TOKENS } else { cfg.seq_len },
    };
    let train_examples = enc.encode_all(&records, &cfg.data)?;
    let (train, train_stats) = make_sequences(&train_examples, cfg.seq_len, cfg.packing)?;
    let eval = if eval_records.is_empty() {
        Vec::new()
    } else {
        let ex = enc.encode_all(&eval_records, cfg.eval_data.as_deref().unwrap_or(&cfg.data))?;
        make_sequences(&ex, cfg.seq_len, false)?.0
    };
    Ok(PreparedData { train, eval, train_stats, skipped_lines: skipped })
}

/// Runs training as configured. `stop` is polled after every step: when set, a checkpoint is
/// written and the run ends early (Ctrl-C).
pub fn train(cfg: &TrainConfig, progress: &mut dyn Progress, stop: &AtomicBool) -> Result<TrainSummary> {
    cfg.validate()?;
    if cfg.resume.is_none() {
        // Refuse a non-empty output directory now, before the slow loading; with --overwrite it
        // is cleared only once the model and data have loaded, so a run that fails on its input
        // leaves the directory as it was.
        if !cfg.overwrite {
            crate::io::prepare_output_dir(&cfg.output, false)?;
        }
    }
    let inputs: Vec<&Path> =
        [Some(cfg.model.as_path()), Some(cfg.data.as_path()), cfg.eval_data.as_deref()].into_iter().flatten().collect();
    match &cfg.resume {
        None => crate::io::check_output_apart(&cfg.output, &inputs)?,
        // A resumed run writes into the directory it continues, which holds the checkpoint.
        Some(ckpt) => crate::io::check_output_not_inside(&cfg.output, ckpt)?,
    }
    let started = Instant::now();
    let mut p = Pretrained::load_as(&cfg.model, WeightFormat::parse(&cfg.weights)?)?;
    if cfg.seq_len > p.model.config.max_position_embeddings {
        bail!("seq-len {} exceeds the model's context of {} tokens", cfg.seq_len, p.model.config.max_position_embeddings);
    }
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
    let total_steps = match cfg.max_steps {
        Some(n) => n,
        None => {
            let n = (cfg.epochs * steps_per_epoch as f64).ceil().max(1.0);
            if n > crate::limits::MAX_STEPS as f64 {
                bail!("--epochs {} means {n} optimizer steps, more than the {} a run may take", cfg.epochs, crate::limits::MAX_STEPS);
            }
            n as usize
        }
    };
    let schedule = Schedule::parse(&cfg.schedule)?;
    let ckpt_dir = cfg.output.join("checkpoints");

    let (mut adapter, mut opt, mut state) = match &cfg.resume {
        Some(dir) => {
            let c = checkpoint::load(dir, &p.model).with_context(|| format!("resuming from {}", dir.display()))?;
            if c.state.fingerprint != cfg.fingerprint() {
                bail!(
                    "{} was written by a run with different settings; resume needs the same ones ({})",
                    dir.display(),
                    TrainConfig::fingerprint_diff(&c.state.fingerprint, &cfg.fingerprint())
                );
            }
            // Each micro-batch advances the data by at most one epoch.
            let epochs = if cfg.max_steps.is_some() { u64::MAX } else { cfg.epochs.ceil() as u64 + 1 };
            let max_epoch = epochs.min(total_steps as u64 * cfg.grad_accum as u64);
            c.state.check_against(total_steps, loader.len(), max_epoch).with_context(|| format!("resuming from {}", dir.display()))?;
            if c.optimizer.weight_decay != cfg.weight_decay {
                bail!(
                    "{}: the optimizer state has weight_decay {}, this run {}",
                    dir.display(),
                    c.optimizer.weight_decay,
                    cfg.weight_decay
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
    let mut metrics = Vec::new();
    if cfg.resume.is_some() {
        metrics = read_metrics(&metrics_path)?;
        metrics.retain(|m| m.step <= state.step);
    } else if cfg.overwrite {
        crate::io::prepare_output_dir(&cfg.output, true)?;
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
        // The loss is normalized by the trained tokens of all the step's micro-batches together,
        // as transformers does with gradient accumulation: count them first, then build and run
        // one micro-batch at a time.
        let count = loader.trained_tokens_ahead(state.cursor, cfg.grad_accum);
        grads.fill(0.0);
        let mut loss = LossSum::default();
        let mut tokens = 0;
        for _ in 0..cfg.grad_accum {
            let (batch, targets) = to_batch(&loader.next_batch(&mut state.cursor), pad);
            let l = p.model.loss_and_grads(&batch, &targets, &adapter, &mut grads, 1.0 / count.max(1) as f32, Some(&mut rng))?;
            loss.sum += l.sum;
            loss.count += l.count;
            tokens += batch.tokens.len();
        }
        state.tokens_seen += tokens as u64;
        let grad_norm = clip_grad_norm(&mut grads, if cfg.max_grad_norm > 0.0 { cfg.max_grad_norm } else { f64::INFINITY });
        opt.update(&mut adapter.params, &grads, lr);
        state.step += 1;
        state.rng = rng.state();
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
            let e = super::eval::evaluate(&p.model, &adapter, &data.eval, cfg.batch_size, pad)?;
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
    super::plot::loss_png(&all, &cfg.output.join("loss.png"))?;
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
