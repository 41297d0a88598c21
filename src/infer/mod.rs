//! Generation: sampling (greedy, temperature, top-k, top-p, repetition penalty, seed), stop
//! tokens and stop strings, and the engine that runs many sequences at once (`batch`).

pub mod batch;
pub mod chat;
pub mod exact_match;
pub mod session;

pub use crate::model::adapt::SharedAdapter;
pub use batch::{FinishReason, Finished, Generation, Request, RunningBatch, SeqId, StopHandle, Token};

use crate::model::DecoderModel;
use crate::rng::Rng;
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Result};

/// Receives (row, newly decoded text) while generating.
pub type TextSink<'a> = &'a mut dyn FnMut(usize, &str);

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy decoding.
    pub temperature: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    /// 1 disables nucleus sampling.
    pub top_p: f32,
    /// 1 disables it; >1 discourages tokens already present (transformers' rule).
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl SamplingParams {
    /// Every setting finite and in its range (the error names the flag and the range).
    pub fn validate(&self) -> Result<()> {
        use crate::limits::{check, Allowed};
        check("temperature", self.temperature as f64, Allowed::NonNegative)?;
        check("top-p", self.top_p as f64, Allowed::LeftOpen(0.0, 1.0))?;
        check("repetition-penalty", self.repetition_penalty as f64, Allowed::Positive)?;
        Ok(())
    }
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams { temperature: 0.0, top_k: 0, top_p: 1.0, repetition_penalty: 1.0, seed: 0 }
    }
}

#[derive(Clone, Debug)]
pub struct GenerateParams {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    pub stop_ids: Vec<u32>,
    pub stop_strings: Vec<String>,
}

/// Picks the next token from one row of logits.
pub fn sample(logits: &mut [f32], history: &[u32], p: &SamplingParams, rng: &mut Rng) -> u32 {
    if p.repetition_penalty != 1.0 {
        let mut seen: Vec<u32> = history.to_vec();
        seen.sort_unstable();
        seen.dedup();
        for &t in &seen {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = if *l > 0.0 { *l / p.repetition_penalty } else { *l * p.repetition_penalty };
            }
        }
    }
    let argmax = || logits.iter().enumerate().fold((0usize, f32::NEG_INFINITY), |m, (i, &x)| if x > m.1 { (i, x) } else { m }).0 as u32;
    if p.temperature <= 0.0 {
        return argmax();
    }
    let mut cand: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l / p.temperature)).collect();
    cand.sort_by(|a, b| b.1.total_cmp(&a.1));
    if p.top_k > 0 {
        cand.truncate(p.top_k);
    }
    let m = cand[0].1;
    let mut probs: Vec<f64> = cand.iter().map(|c| ((c.1 - m) as f64).exp()).collect();
    let z: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|x| *x /= z);
    if p.top_p < 1.0 {
        let mut acc = 0.0;
        let keep = probs.iter().position(|&x| {
            acc += x;
            acc >= p.top_p as f64
        });
        let n = keep.map_or(probs.len(), |i| i + 1);
        cand.truncate(n);
        probs.truncate(n);
        let z: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= z);
    }
    let u = rng.next_f32() as f64;
    let mut acc = 0.0;
    for (c, pr) in cand.iter().zip(&probs) {
        acc += pr;
        if u < acc {
            return c.0;
        }
    }
    cand.last().unwrap().0
}

/// Generates continuations of `prompts` (token ids) together, all with `adapter` (`None`: the
/// base). Returns each row's new tokens, without the stop token and cut before a stop string.
/// `on_text` receives each row's newly final text as it grows (for streaming). Each row samples
/// from its own generator seeded with `params.sampling.seed`, so a row's output does not depend
/// on the rows beside it.
pub fn generate(
    model: &DecoderModel,
    tok: &Tokenizer,
    prompts: &[Vec<u32>],
    adapter: Option<(SharedAdapter, f32)>,
    params: &GenerateParams,
    mut on_text: Option<TextSink>,
) -> Result<Vec<Vec<u32>>> {
    if prompts.is_empty() {
        bail!("generation needs a non-empty prompt");
    }
    // All caches at once, so a batch the machine cannot hold is refused before any work.
    let bytes: u128 = prompts.iter().map(|p| model.kv_bytes(p.len().saturating_add(params.max_new_tokens))).sum();
    crate::limits::ensure_memory(bytes, &format!("the KV caches of {} prompts", prompts.len()))?;
    let mut batch = RunningBatch::new(model, tok);
    let mut ids = Vec::with_capacity(prompts.len());
    for p in prompts {
        ids.push(batch.add(Request { prompt: p.clone(), params: params.clone(), adapter: adapter.clone() })?);
    }
    let mut out: Vec<Option<Vec<u32>>> = vec![None; prompts.len()];
    while !batch.is_empty() {
        for e in batch.step()? {
            let row = ids.iter().position(|&id| id == e.id).expect("an event of a sequence this call added");
            if let Some(f) = on_text.as_deref_mut() {
                if !e.text.is_empty() {
                    f(row, &e.text);
                }
            }
            if let Some(done) = e.finished {
                out[row] = Some(done.tokens);
            }
        }
    }
    Ok(out.into_iter().map(|o| o.expect("every sequence finishes before the batch empties")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_topk_topp_and_penalty() {
        let mut rng = Rng::new(1);
        let greedy = SamplingParams::default();
        assert_eq!(sample(&mut [0.1, 3.0, 2.0], &[], &greedy, &mut rng), 1);
        // Penalty 10 on token 1 (positive logit divided): token 2 wins.
        let pen = SamplingParams { repetition_penalty: 10.0, ..Default::default() };
        assert_eq!(sample(&mut [0.1, 3.0, 2.0], &[1], &pen, &mut rng), 2);
        // top_k = 1 with any temperature is greedy.
        let k1 = SamplingParams { temperature: 5.0, top_k: 1, ..Default::default() };
        for _ in 0..20 {
            assert_eq!(sample(&mut [0.1, 3.0, 2.0], &[], &k1, &mut rng), 1);
        }
        // top_p small keeps only the most likely token.
        let p = SamplingParams { temperature: 1.0, top_p: 0.1, ..Default::default() };
        for _ in 0..20 {
            assert_eq!(sample(&mut [0.1, 3.0, 2.0], &[], &p, &mut rng), 1);
        }
        // Plain sampling is deterministic under a seed and visits several tokens.
        let s = SamplingParams { temperature: 1.0, ..Default::default() };
        let draw = |seed| {
            let mut r = Rng::new(seed);
            (0..50).map(|_| sample(&mut [1.0, 1.2, 0.9], &[], &s, &mut r)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        let d = draw(7);
        assert!((0..3).all(|t| d.contains(&t)));
    }
}
