//! Generation with a KV cache: greedy or sampled (temperature, top-k, top-p, repetition
//! penalty, seed), stop tokens and stop strings, several prompts at once (left-padded).

pub mod exact_match;
pub mod session;

use crate::model::adapt::LowRankSource;
use crate::model::decoder::{SeqCache, SeqStep};
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

/// Generates continuations of `prompts` (token ids) together. Returns each row's new tokens,
/// without the stop token and cut before a stop string. `on_text` receives each row's newly
/// decoded text as it grows (for streaming).
pub fn generate(
    model: &DecoderModel,
    ad: &dyn LowRankSource,
    tok: &Tokenizer,
    prompts: &[Vec<u32>],
    params: &GenerateParams,
    mut on_text: Option<TextSink>,
) -> Result<Vec<Vec<u32>>> {
    if prompts.is_empty() || prompts.iter().any(|p| p.is_empty()) {
        bail!("generation needs a non-empty prompt");
    }
    let b = prompts.len();
    let plen = prompts.iter().map(Vec::len).max().unwrap();
    params.sampling.validate()?;
    crate::limits::check_count("max-new-tokens", params.max_new_tokens, 1, model.config.max_position_embeddings)?;
    if params.stop_strings.iter().any(String::is_empty) {
        bail!("a stop string must not be empty (it would stop generation at once)");
    }
    let capacity = plen.saturating_add(params.max_new_tokens);
    if capacity > model.config.max_position_embeddings {
        bail!(
            "prompt of {plen} tokens + {} new tokens exceeds the model's context of {}",
            params.max_new_tokens,
            model.config.max_position_embeddings
        );
    }
    // One cache per prompt, sized by that prompt and the new tokens; a finished row frees its own.
    let bytes: u128 = prompts.iter().map(|p| model.kv_bytes(p.len() + params.max_new_tokens)).sum();
    crate::limits::ensure_memory(bytes, &format!("the KV caches of {b} prompts"))?;
    let mut caches: Vec<Option<SeqCache>> =
        prompts.iter().map(|p| model.new_seq_cache(p.len() + params.max_new_tokens).map(Some)).collect::<Result<_>>()?;
    let v = model.config.vocab_size;
    let mut rng = Rng::new(params.sampling.seed);
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); b];
    let mut shown = vec![0usize; b];
    // Rows still generating, and the tokens each adds in the next step (first its prompt).
    let mut active: Vec<usize> = (0..b).collect();
    let mut next: Vec<Vec<u32>> = prompts.to_vec();
    for _ in 0..params.max_new_tokens {
        let mut steps: Vec<SeqStep> = Vec::with_capacity(active.len());
        for (r, cache) in caches.iter_mut().enumerate() {
            if let Some(cache) = cache {
                steps.push(SeqStep { cache, tokens: &next[r], adapter: Some((ad, 1.0)) });
            }
        }
        let mut logits = model.step(&mut steps)?;
        drop(steps);
        let mut still = Vec::with_capacity(active.len());
        for (i, &r) in active.iter().enumerate() {
            let history: Vec<u32> = prompts[r].iter().chain(&out[r]).copied().collect();
            let t = sample(&mut logits[i * v..(i + 1) * v], &history, &params.sampling, &mut rng);
            let mut done = params.stop_ids.contains(&t);
            if !done {
                out[r].push(t);
            }
            if !done && (!params.stop_strings.is_empty() || on_text.is_some()) {
                let text = tok.decode(&out[r], true)?;
                if let Some(cut) = params.stop_strings.iter().filter_map(|s| text.find(s.as_str())).min() {
                    // Drop tokens until the text no longer reaches the stop string.
                    while !out[r].is_empty() && tok.decode(&out[r], true)?.len() > cut {
                        out[r].pop();
                    }
                    done = true;
                }
                if let Some(f) = on_text.as_deref_mut() {
                    let text = tok.decode(&out[r], true)?;
                    // Hold back a trailing partial UTF-8 character.
                    if text.len() > shown[r] && !text.ends_with('\u{FFFD}') {
                        f(r, &text[shown[r]..]);
                        shown[r] = text.len();
                    }
                }
            }
            if done {
                caches[r] = None;
            } else {
                next[r] = vec![t];
                still.push(r);
            }
        }
        active = still;
        if active.is_empty() {
            break;
        }
    }
    Ok(out)
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
