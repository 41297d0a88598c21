//! Evaluating a model (with an adapter or without) on a data file — loss and perplexity under
//! the training masks, and optionally exact-match accuracy of greedy answers — and previewing
//! which tokens of a file train. Both read data the way training does: read → render → encode →
//! sequences.

use crate::data::{make_sequences, read_jsonl, to_batch, Encoder, Format, Record, Sequence};
use crate::infer::exact_match::{exact_match, ExactMatch};
use crate::kernels::loss::LossSum;
use crate::model::adapt::{LowRankSource, NoAdapter, SharedAdapter};
use crate::model::{DecoderModel, WeightFormat};
use crate::pretrained::Pretrained;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What `lowrank eval` is configured by (its flags).
#[derive(Clone, Debug, clap::Args)]
pub struct EvalSettings {
    #[arg(long)]
    pub model: PathBuf,
    /// Keep the base weights as f32, bf16, q8_0 or q4_1.
    #[arg(long, default_value = "f32", value_parser = WeightFormat::parse)]
    pub weights: WeightFormat,
    /// PEFT adapter directory.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long)]
    pub format: Option<String>,
    #[arg(long)]
    pub train_on_inputs: bool,
    #[arg(long, allow_negative_numbers = true, default_value_t = 2048)]
    pub seq_len: usize,
    #[arg(long, allow_negative_numbers = true, default_value_t = 8)]
    pub batch_size: usize,
    /// Also generate greedy answers and report exact-match accuracy.
    #[arg(long)]
    pub exact_match: bool,
    #[arg(long, allow_negative_numbers = true, default_value_t = 64)]
    pub max_new_tokens: usize,
}

pub struct EvalReport {
    pub loss: LossSum,
    pub examples: usize,
    pub exact_match: Option<ExactMatch>,
}

impl EvalReport {
    pub fn to_json(&self) -> serde_json::Value {
        let mean = self.loss.mean();
        let mut v = serde_json::json!({"loss": mean, "perplexity": mean.exp(), "tokens": self.loss.count, "examples": self.examples});
        if let Some(em) = &self.exact_match {
            v["exact_match"] = serde_json::json!(em.accuracy());
            v["exact_match_correct"] = serde_json::json!(em.correct);
        }
        v
    }
}

/// Loads the model and adapter `s` names and evaluates them on its data file.
pub fn run(s: &EvalSettings) -> Result<EvalReport> {
    crate::limits::check_count("--batch-size", s.batch_size, 1, 1 << 16)?;
    let p = Pretrained::load_as(&s.model, s.weights)?;
    let adapter: Option<SharedAdapter> = match &s.adapter {
        Some(path) => Some(Arc::new(crate::lora::load(path, &p.model)?)),
        None => None,
    };
    let source: &dyn LowRankSource = match &adapter {
        Some(a) => a.as_ref(),
        None => &NoAdapter,
    };
    let (records, seqs) = eval_data(&p, &s.data, s.format.as_deref(), s.train_on_inputs, s.seq_len)?;
    let loss = evaluate(&p.model, source, &seqs, s.batch_size, p.tokenizer.eos_id.unwrap_or(0))?;
    let exact_match =
        if s.exact_match { Some(exact_match(&p, adapter.map(|a| (a, 1.0)), &records, s.batch_size, s.max_new_tokens)?) } else { None };
    Ok(EvalReport { loss, examples: records.len(), exact_match })
}

/// Every record of a data file (no line skipped) and the model's chat template to render them.
fn read_records(p: &Pretrained, path: &Path, format: Option<&str>) -> Result<(Vec<Record>, Option<crate::data::ChatTemplate>)> {
    let format = format.map(Format::parse).transpose()?;
    let (records, _) = read_jsonl(path, format, false)?;
    Ok((records, p.chat_template()?))
}

fn encoder<'a>(p: &'a Pretrained, template: Option<&'a crate::data::ChatTemplate>, train_on_inputs: bool, seq_len: usize) -> Encoder<'a> {
    Encoder { tokenizer: &p.tokenizer, template, train_on_inputs, max_tokens: seq_len }
}

/// The records of an eval data file and their sequences, masked and truncated as training does
/// (the same read → render → encode → sequences pipeline as `trainer::prepare_data`).
pub fn eval_data(
    p: &Pretrained,
    path: &Path,
    format: Option<&str>,
    train_on_inputs: bool,
    seq_len: usize,
) -> Result<(Vec<Record>, Vec<Sequence>)> {
    let format = format.map(Format::parse).transpose()?;
    let (records, _) = read_jsonl(path, format, false)?;
    let seqs = sequences(p, &records, path, train_on_inputs, seq_len)?;
    Ok((records, seqs))
}

/// `records` (from the file `origin`, which errors name) as sequences, rendered, masked and
/// truncated as training does.
pub fn sequences(p: &Pretrained, records: &[Record], origin: &Path, train_on_inputs: bool, seq_len: usize) -> Result<Vec<Sequence>> {
    crate::limits::check_count("seq-len", seq_len, 2, p.model.config.max_position_embeddings)?;
    let template = p.chat_template()?;
    let enc = encoder(p, template.as_ref(), train_on_inputs, seq_len);
    Ok(make_sequences(&enc.encode_all(records, origin)?, seq_len, false)?.0)
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

/// One example as training sees it: its tokens' text and which of them train.
#[derive(Clone, Debug, PartialEq)]
pub struct PreviewExample {
    pub tokens: Vec<String>,
    /// Per token: whether it trains (never the first, which nothing predicts).
    pub trained: Vec<bool>,
    /// Tokens before truncation to the sequence length.
    pub total_tokens: usize,
}

/// The first `limit` examples of a data file, tokenized and masked as training does.
pub fn preview_examples(
    p: &Pretrained,
    path: &Path,
    format: Option<&str>,
    train_on_inputs: bool,
    seq_len: usize,
    limit: usize,
) -> Result<Vec<PreviewExample>> {
    crate::limits::check_count("--seq-len", seq_len, 1, p.model.config.max_position_embeddings)?;
    let (records, template) = read_records(p, path, format)?;
    let enc = encoder(p, template.as_ref(), train_on_inputs, seq_len);
    let mut out = Vec::new();
    for (i, r) in records.iter().take(limit).enumerate() {
        let e = enc.encode(r).with_context(|| format!("{}: example {}", path.display(), i + 1))?;
        let n = e.ids.len().min(seq_len);
        let tokens = (0..n).map(|k| p.tokenizer.decode(&e.ids[k..k + 1], false)).collect::<Result<_>>()?;
        let trained = (0..n).map(|k| e.train[k] && k > 0).collect();
        out.push(PreviewExample { tokens, trained, total_tokens: e.ids.len() });
    }
    Ok(out)
}

/// The first `limit` examples of a data file as text: each token, with those that do not train
/// (label −100) in [brackets].
pub fn preview(p: &Pretrained, path: &Path, format: Option<&str>, train_on_inputs: bool, seq_len: usize, limit: usize) -> Result<String> {
    let mut out = String::from("Tokens in [brackets] are masked (label -100); the rest train. '|' separates tokens.\n\n");
    for (i, e) in preview_examples(p, path, format, train_on_inputs, seq_len, limit)?.iter().enumerate() {
        let mut line = String::new();
        for (piece, &trained) in e.tokens.iter().zip(&e.trained) {
            let piece = piece.replace('\n', "\\n");
            if trained {
                line.push_str(&piece);
            } else {
                line.push_str(&format!("[{piece}]"));
            }
            line.push('|');
        }
        let trained = e.trained.iter().filter(|&&x| x).count();
        let cut = if e.total_tokens > seq_len { format!(", truncated to {seq_len}") } else { String::new() };
        out.push_str(&format!("example {}: {} tokens, {trained} trained{cut}\n{line}\n\n", i + 1, e.total_tokens));
    }
    Ok(out)
}
