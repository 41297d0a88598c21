//! The generation engine: a running batch of sequences, each with its own prompt, adapter,
//! position, sampling settings and stop rules, advanced together one model step at a time.
//!
//! A sequence joins with [`RunningBatch::add`] at any time; its prompt is fed in chunks of at most
//! `prefill_chunk` tokens per step, so a long prompt delays the others by one chunk per step.
//! Every [`RunningBatch::step`] runs one [`DecoderModel::step`] over all sequences (the frozen weights
//! read once, the low-rank products per adapter) and returns what each sequence produced. A
//! sequence that finishes or is cancelled leaves at once and frees its KV cache.
//!
//! [`Generation`] is one sequence as an iterator of tokens, with a [`StopHandle`] another thread
//! may use to end it.

use super::{sample, GenerateParams};
use crate::model::adapt::{LowRankSource, SharedAdapter};
use crate::model::decoder::{SeqCache, SeqStep};
use crate::model::DecoderModel;
use crate::rng::Rng;
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Result};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// What a sequence asks for.
#[derive(Clone)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub params: GenerateParams,
    /// The adapter and the scale it is applied at; `None` runs the (possibly merged) base.
    pub adapter: Option<(SharedAdapter, f32)>,
}

/// A sequence's handle in its batch.
pub type SeqId = u64;

/// Why a sequence ended, in OpenAI's words where they exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token or a stop string.
    Stop,
    /// `max_new_tokens` reached.
    Length,
    /// Cancelled by its caller.
    Cancelled,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Cancelled => "cancelled",
        }
    }
}

/// A finished sequence: its new tokens (without the stop token, cut before a stop string) and
/// their text (exactly the concatenation of the text deltas its events carried).
#[derive(Clone, Debug, PartialEq)]
pub struct Finished {
    pub reason: FinishReason,
    pub tokens: Vec<u32>,
    pub text: String,
    pub prompt_tokens: usize,
}

/// What one step produced for one sequence.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub id: SeqId,
    /// The token sampled this step, if it is part of the output.
    pub token: Option<u32>,
    /// Text that became final this step (may be empty: a partial character, or text that may
    /// be the start of a stop string, is held back until it is decided).
    pub text: String,
    pub finished: Option<Finished>,
}

struct Running {
    id: SeqId,
    cache: SeqCache,
    params: GenerateParams,
    adapter: Option<(SharedAdapter, f32)>,
    rng: Rng,
    prompt_len: usize,
    /// Prompt and generated tokens so far (the repetition penalty's history).
    history: Vec<u32>,
    /// Positions of `history` already in the cache.
    fed: usize,
    /// Bytes of the output text already returned in events.
    shown: usize,
}

impl Running {
    fn output(&self) -> &[u32] {
        &self.history[self.prompt_len..]
    }
}

pub struct RunningBatch<'m> {
    model: &'m DecoderModel,
    tokenizer: &'m Tokenizer,
    running: Vec<Running>,
    next_id: SeqId,
    /// The most prompt tokens one sequence feeds per step.
    pub prefill_chunk: usize,
}

impl<'m> RunningBatch<'m> {
    pub fn new(model: &'m DecoderModel, tokenizer: &'m Tokenizer) -> Self {
        RunningBatch { model, tokenizer, running: Vec::new(), next_id: 0, prefill_chunk: 512 }
    }

    /// Sequences still running.
    pub fn len(&self) -> usize {
        self.running.len()
    }

    pub fn is_empty(&self) -> bool {
        self.running.is_empty()
    }

    /// KV-cache bytes the running sequences hold.
    pub fn cache_bytes(&self) -> u128 {
        self.running.iter().map(|r| self.model.kv_bytes(r.cache.capacity())).sum()
    }

    /// Checks a request and allocates its KV cache (prompt + `max_new_tokens` positions); it
    /// starts with the next step.
    pub fn add(&mut self, req: Request) -> Result<SeqId> {
        let model = self.model;
        let ctx = model.config.max_position_embeddings;
        let p = &req.params;
        if req.prompt.is_empty() {
            bail!("generation needs a non-empty prompt");
        }
        p.sampling.validate()?;
        crate::limits::check_count("max-new-tokens", p.max_new_tokens, 1, ctx)?;
        if p.stop_strings.iter().any(String::is_empty) {
            bail!("a stop string must not be empty (it would stop generation at once)");
        }
        let vocab = model.config.vocab_size;
        if let Some(&t) = req.prompt.iter().find(|&&t| t as usize >= vocab) {
            bail!("token id {t} is outside the vocabulary of {vocab} tokens");
        }
        let capacity = req.prompt.len().saturating_add(p.max_new_tokens);
        if capacity > ctx {
            bail!("prompt of {} tokens + {} new tokens exceeds the model's context of {ctx}", req.prompt.len(), p.max_new_tokens);
        }
        let cache = model.new_seq_cache(capacity)?;
        let id = self.next_id;
        self.next_id += 1;
        self.running.push(Running {
            id,
            cache,
            rng: Rng::new(p.sampling.seed),
            prompt_len: req.prompt.len(),
            history: req.prompt,
            params: req.params,
            adapter: req.adapter,
            fed: 0,
            shown: 0,
        });
        Ok(id)
    }

    /// Ends sequence `id` now and frees its cache; `None` if it is not running.
    pub fn cancel(&mut self, id: SeqId) -> Option<Finished> {
        let i = self.running.iter().position(|r| r.id == id)?;
        let r = self.running.swap_remove(i);
        let text = self.tokenizer.decode(r.output(), true).unwrap_or_default();
        let text = text[..r.shown.min(text.len())].to_string();
        Some(Finished { reason: FinishReason::Cancelled, tokens: r.output().to_vec(), text, prompt_tokens: r.prompt_len })
    }

    /// One model step over every running sequence. Sequences still reading their prompt feed
    /// their next chunk and produce no event until the prompt is in; the others sample a token.
    pub fn step(&mut self) -> Result<Vec<Event>> {
        if self.running.is_empty() {
            return Ok(Vec::new());
        }
        let chunk = self.prefill_chunk.max(1);
        // Each sequence feeds the next chunk of its prompt, or its last sampled token.
        let mut fed = Vec::with_capacity(self.running.len());
        let mut logits = {
            let mut steps: Vec<SeqStep> = Vec::with_capacity(self.running.len());
            for r in self.running.iter_mut() {
                let end = (r.fed + chunk).min(r.history.len());
                fed.push(end - r.fed);
                let adapter = r.adapter.as_ref().map(|(a, s)| (a.as_ref() as &dyn LowRankSource, *s));
                steps.push(SeqStep { cache: &mut r.cache, tokens: &r.history[r.fed..end], adapter });
            }
            self.model.step(&mut steps)?
        };
        let v = self.model.config.vocab_size;
        let mut events = Vec::new();
        let mut i = 0;
        for (row, n) in fed.into_iter().enumerate() {
            let r = &mut self.running[i];
            r.fed += n;
            if r.fed < r.history.len() {
                i += 1; // still reading its prompt
                continue;
            }
            let t = sample(&mut logits[row * v..(row + 1) * v], &r.history, &r.params.sampling, &mut r.rng);
            let event = advance(r, t, self.tokenizer)?;
            if event.finished.is_some() {
                self.running.remove(i);
            } else {
                i += 1;
            }
            events.push(event);
        }
        Ok(events)
    }
}

/// Takes sampled token `t` into sequence `r`: appends it unless it stops the sequence, applies
/// the stop strings, and returns the text that became final.
fn advance(r: &mut Running, t: u32, tok: &Tokenizer) -> Result<Event> {
    let stop_token = r.params.stop_ids.contains(&t);
    let before = r.output().len();
    if !stop_token {
        r.history.push(t);
    }
    let mut text = tok.decode(r.output(), true)?;
    let mut reason = if stop_token {
        Some(FinishReason::Stop)
    } else if r.output().len() >= r.params.max_new_tokens {
        Some(FinishReason::Length)
    } else {
        None
    };
    if let Some(cut) = r.params.stop_strings.iter().filter_map(|s| text.find(s.as_str())).min() {
        text.truncate(cut);
        // Drop the tokens whose text reaches into the stop string.
        while !r.output().is_empty() && tok.decode(r.output(), true)?.len() > cut {
            r.history.pop();
        }
        reason = Some(FinishReason::Stop);
    }
    // While running, hold back a trailing partial character and whatever may begin a stop string.
    let ready = if reason.is_some() {
        text.len()
    } else if text.ends_with('\u{FFFD}') {
        r.shown
    } else {
        text.len() - held_back(&text, &r.params.stop_strings)
    };
    let delta = if ready > r.shown { text[r.shown..ready].to_string() } else { String::new() };
    r.shown = r.shown.max(ready);
    let kept = r.output().len() > before;
    let finished = reason.map(|reason| Finished { reason, tokens: r.output().to_vec(), text, prompt_tokens: r.prompt_len });
    Ok(Event { id: r.id, token: kept.then_some(t), text: delta, finished })
}

/// Bytes at the end of `text` that could be the start of one of `stops`.
fn held_back(text: &str, stops: &[String]) -> usize {
    stops.iter().filter_map(|s| (1..s.len()).rev().find(|&k| s.is_char_boundary(k) && text.ends_with(&s[..k]))).max().unwrap_or(0)
}

/// Ends a [`Generation`] from anywhere (another thread, a signal handler, a closed connection).
#[derive(Clone, Default, Debug)]
pub struct StopHandle(Arc<AtomicBool>);

impl StopHandle {
    pub fn stop(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_stopped(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// One generated token and the text that became final with it. The last item may carry no
/// token: text held back (as the possible start of a stop string) that the end released.
#[derive(Clone, Debug, PartialEq)]
pub struct Token {
    pub id: Option<u32>,
    pub text: String,
}

/// One sequence as an iterator of tokens. After the last one, [`Generation::finished`] says why
/// it ended and holds the whole output.
pub struct Generation<'m> {
    batch: RunningBatch<'m>,
    id: SeqId,
    stop: StopHandle,
    ready: VecDeque<Token>,
    finished: Option<Finished>,
    failed: bool,
}

impl<'m> Generation<'m> {
    pub fn new(model: &'m DecoderModel, tokenizer: &'m Tokenizer, request: Request) -> Result<Self> {
        let mut batch = RunningBatch::new(model, tokenizer);
        let id = batch.add(request)?;
        Ok(Generation { batch, id, stop: StopHandle::default(), ready: VecDeque::new(), finished: None, failed: false })
    }

    /// A handle that ends this generation before its next step.
    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }

    /// Why it ended and everything it produced, once it has.
    pub fn finished(&self) -> Option<&Finished> {
        self.finished.as_ref()
    }

    /// Runs to the end, calling `on_text` with each piece of final text.
    pub fn run(mut self, mut on_text: impl FnMut(&str)) -> Result<Finished> {
        for token in self.by_ref() {
            on_text(&token?.text);
        }
        // The iterator only ends without an error once `finished` is set.
        Ok(self.finished.expect("a generation that ended without error has finished"))
    }
}

impl Iterator for Generation<'_> {
    type Item = Result<Token>;

    fn next(&mut self) -> Option<Result<Token>> {
        loop {
            if let Some(t) = self.ready.pop_front() {
                return Some(Ok(t));
            }
            if self.finished.is_some() || self.failed {
                return None;
            }
            if self.stop.is_stopped() {
                self.finished = self.batch.cancel(self.id);
                return None;
            }
            match self.batch.step() {
                Err(e) => {
                    self.failed = true;
                    return Some(Err(e));
                }
                Ok(events) => {
                    for e in events {
                        if e.token.is_some() || !e.text.is_empty() {
                            self.ready.push_back(Token { id: e.token, text: e.text });
                        }
                        self.finished = e.finished;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::held_back;

    #[test]
    fn holds_back_what_may_start_a_stop_string() {
        let stops = vec!["\n\nUser:".to_string(), "END".to_string()];
        assert_eq!(held_back("hello", &stops), 0);
        assert_eq!(held_back("hello\n", &stops), 1);
        assert_eq!(held_back("hello\n\nUs", &stops), 4);
        assert_eq!(held_back("the EN", &stops), 2);
        assert_eq!(held_back("the E", &stops), 1);
        // A whole stop string is not "held back": the caller cuts it.
        assert_eq!(held_back("fooEND", &stops), 0);
        assert_eq!(held_back("é", &["éa".to_string()]), 2);
    }
}
