//! Records → token ids with a per-token "trains" flag (the -100 label masking of transformers),
//! then → fixed-length training sequences by padding or packing.

use super::records::Record;
use super::template::ChatTemplate;
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Result};

/// The Alpaca prompt (Stanford Alpaca's wording), with and without an input.
const ALPACA_WITH_INPUT: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n";
const ALPACA_NO_INPUT: &str = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n";

/// The Alpaca prompt of an Alpaca record (empty for other records).
pub fn alpaca_prompt(record: &Record) -> String {
    match record {
        Record::Alpaca { instruction, input, .. } if input.is_empty() => ALPACA_NO_INPUT.replace("{instruction}", instruction),
        Record::Alpaca { instruction, input, .. } => ALPACA_WITH_INPUT.replace("{instruction}", instruction).replace("{input}", input),
        _ => String::new(),
    }
}

/// One tokenized example. `train[i]` says whether token `i` is a label (is predicted and counted
/// in the loss); false corresponds to label −100.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub train: Vec<bool>,
    /// The text was cut before tokenizing because it held more tokens than can be kept.
    pub clipped: bool,
}

impl Example {
    pub fn trained_tokens(&self) -> usize {
        self.train.iter().skip(1).filter(|&&t| t).count()
    }
}

/// Tokens kept of one example in packing mode (where examples are not cut to --seq-len).
pub const MAX_PACKED_EXAMPLE_TOKENS: usize = 1 << 20;

/// How records become tokens.
pub struct Encoder<'a> {
    pub tokenizer: &'a Tokenizer,
    pub template: Option<&'a ChatTemplate>,
    /// Train on prompt / user tokens as well, not only on completions and assistant turns.
    pub train_on_inputs: bool,
    /// Tokens that will be kept of each example (its sequence length): text beyond what that
    /// many tokens can cover is never tokenized.
    pub max_tokens: usize,
}

impl Encoder<'_> {
    /// `text` cut to what `max_tokens` tokens can cover (no token spans more bytes than the
    /// vocabulary's longest token), at a character boundary; and whether it was cut.
    fn clip<'t>(&self, text: &'t str) -> (&'t str, bool) {
        let budget = self.max_tokens.saturating_mul(self.tokenizer.max_token_bytes()).saturating_add(16);
        if text.len() <= budget {
            return (text, false);
        }
        let mut end = budget;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        (&text[..end], true)
    }

    /// `text` tokenized (with BOS if the tokenizer adds one) followed by EOS, where tokens
    /// that hold bytes at or past `trained_from` train.
    fn prompt_then_completion(&self, text: &str, trained_from: usize) -> Result<Example> {
        let (text, clipped) = self.clip(text);
        let (mut ids, offsets) = self.tokenizer.encode_with_offsets(text, true)?;
        // A token trains when it carries any completion byte (a BOS has the empty range 0..0).
        let mut train: Vec<bool> = offsets.iter().map(|&(s, e)| self.train_on_inputs || (e > trained_from && e > s)).collect();
        if let Some(eos) = self.tokenizer.eos_id {
            ids.push(eos);
            train.push(true);
        }
        Ok(Example { ids, train, clipped })
    }

    /// Every record of the file `path`; an error names the file and the example's number.
    pub fn encode_all(&self, records: &[Record], path: &std::path::Path) -> Result<Vec<Example>> {
        use anyhow::Context;
        records.iter().enumerate().map(|(i, r)| self.encode(r).with_context(|| format!("{}: example {}", path.display(), i + 1))).collect()
    }

    pub fn encode(&self, record: &Record) -> Result<Example> {
        match record {
            Record::Text(t) => self.prompt_then_completion(t, 0),
            Record::PromptCompletion { prompt, completion } => self.prompt_then_completion(&format!("{prompt}{completion}"), prompt.len()),
            Record::Alpaca { output, .. } => {
                let prompt = alpaca_prompt(record);
                self.prompt_then_completion(&format!("{prompt}{output}"), prompt.len())
            }
            Record::Messages(msgs) => {
                let Some(t) = self.template else { bail!("the model has no chat template, so \"messages\" data cannot be rendered") };
                let (text, spans) = t.render_with_assistant_spans(msgs)?;
                let (text, clipped) = self.clip(&text);
                let (ids, offsets) = self.tokenizer.encode_with_offsets(text, false)?;
                let train = offsets.iter().map(|&(s, e)| self.train_on_inputs || spans.iter().any(|&(a, b)| e > a && s < b)).collect();
                Ok(Example { ids, train, clipped })
            }
        }
    }
}

/// A training row of at most `seq_len` tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct Sequence {
    pub ids: Vec<u32>,
    pub train: Vec<bool>,
}

/// What turning examples into sequences did, for the user to see.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SequenceStats {
    pub examples: usize,
    pub truncated: usize,
    /// Examples with nothing left to train on after truncation (dropped).
    pub empty: usize,
    pub sequences: usize,
    pub trained_tokens: usize,
}

/// Padding mode: one example per sequence, truncated to `seq_len`. Packing mode: examples
/// concatenated and cut into `seq_len` pieces (attention then crosses example boundaries,
/// as in TRL's classic packing).
pub fn make_sequences(examples: &[Example], seq_len: usize, packing: bool) -> Result<(Vec<Sequence>, SequenceStats)> {
    if seq_len < 2 {
        bail!("seq-len must be at least 2");
    }
    let mut stats = SequenceStats { examples: examples.len(), ..Default::default() };
    let mut out = Vec::new();
    if packing {
        let (mut ids, mut train) = (Vec::new(), Vec::new());
        for e in examples {
            stats.truncated += usize::from(e.clipped);
            ids.extend(&e.ids);
            train.extend(&e.train);
        }
        for (i, t) in ids.chunks(seq_len).zip(train.chunks(seq_len)) {
            let mut t = t.to_vec();
            t[0] = false; // the first token of a row has no prediction
            if t.iter().any(|&x| x) {
                out.push(Sequence { ids: i.to_vec(), train: t });
            }
        }
    } else {
        for e in examples {
            if e.ids.len() > seq_len || e.clipped {
                stats.truncated += 1;
            }
            let n = e.ids.len().min(seq_len);
            let s = Sequence { ids: e.ids[..n].to_vec(), train: e.train[..n].to_vec() };
            if s.train.iter().skip(1).any(|&x| x) {
                out.push(s);
            } else {
                stats.empty += 1;
            }
        }
    }
    stats.sequences = out.len();
    stats.trained_tokens = out.iter().map(|s| s.train.iter().skip(1).filter(|&&t| t).count()).sum();
    if out.is_empty() {
        bail!("no example has a token to train on within seq-len {seq_len} ({} examples, {} truncated)", stats.examples, stats.truncated);
    }
    Ok((out, stats))
}
