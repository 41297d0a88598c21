//! The generation engine on the real SmolLM2: sequences with their own adapters joining a
//! running batch (prompts fed in chunks) decode exactly as alone; the token iterator streams
//! the final text, holds back what may start a stop string and ends on its stop handle; caches
//! are freed as sequences leave.

mod common;

use lowrank::infer::{FinishReason, Finished, GenerateParams, Generation, Request, RunningBatch, SamplingParams, SharedAdapter};
use lowrank::LoraAdapter;
use std::sync::Arc;

/// An adapter on q,v whose B is not zero, so it changes the model's output.
fn adapter(seed: u64) -> SharedAdapter {
    let p = common::smollm2_model();
    let mut a = LoraAdapter::new(lowrank::LoraConfig { r: 4, lora_alpha: 8.0, ..Default::default() }, &p.model, seed).unwrap();
    for m in a.modules.clone() {
        let off = m.offset + m.a_len();
        for (i, x) in a.params[off..off + m.b_len()].iter_mut().enumerate() {
            *x = 0.5 * (((i as u64 * 2654435761 + seed) % 17) as f32 / 8.0 - 1.0);
        }
    }
    Arc::new(a)
}

fn params(max_new_tokens: usize, stop_strings: &[&str]) -> GenerateParams {
    GenerateParams {
        max_new_tokens,
        sampling: SamplingParams::default(),
        stop_ids: common::smollm2_model().stop_ids(),
        stop_strings: stop_strings.iter().map(|s| s.to_string()).collect(),
    }
}

fn prompt(text: &str) -> Vec<u32> {
    let t = &common::smollm2_model().tokenizer;
    t.encode(&format!("<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"), false).unwrap()
}

fn alone(req: Request) -> Finished {
    let p = common::smollm2_model();
    Generation::new(&p.model, &p.tokenizer, req).unwrap().run(|_| {}).unwrap()
}

#[test]
fn sequences_joining_a_running_batch_decode_as_alone() {
    let p = common::smollm2_model();
    let (a, b) = (adapter(1), adapter(2));
    let requests = [
        Request { prompt: prompt("Name three colors."), params: params(12, &[]), adapter: Some((a.clone(), 1.0)) },
        // A long prompt, read in chunks of 5 tokens while the others decode.
        Request {
            prompt: prompt("Write one sentence about the sea, the wind and the old lighthouse on the hill."),
            params: params(10, &[]),
            adapter: Some((b.clone(), 0.5)),
        },
        Request { prompt: prompt("What is 2 + 2?"), params: params(8, &[]), adapter: None },
        Request { prompt: prompt("Name three colors."), params: params(6, &[]), adapter: Some((b, 1.0)) },
    ];
    let want: Vec<Finished> = requests.iter().cloned().map(alone).collect();
    // The adapters matter: the same prompt gives other tokens with another adapter.
    assert_ne!(want[0].tokens[..6], want[3].tokens[..]);

    let mut batch = RunningBatch::new(&p.model, &p.tokenizer);
    batch.prefill_chunk = 5;
    let mut ids = Vec::new();
    let mut got: Vec<Option<Finished>> = vec![None; requests.len()];
    let mut step = 0;
    let mut peak = 0;
    while step == 0 || !batch.is_empty() {
        // Sequence i joins at step 3·i, into a batch that is running.
        while ids.len() < requests.len() && step >= 3 * ids.len() {
            ids.push(batch.add(requests[ids.len()].clone()).unwrap());
        }
        peak = peak.max(batch.len());
        for e in batch.step().unwrap() {
            if let Some(f) = e.finished {
                got[ids.iter().position(|&i| i == e.id).unwrap()] = Some(f);
            }
        }
        step += 1;
    }
    assert!(peak >= 3, "the sequences overlapped ({peak} at most)");
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.as_ref().unwrap(), w, "sequence {i}");
    }
    assert_eq!(batch.cache_bytes(), 0, "every cache is freed once its sequence leaves");
}

#[test]
fn the_iterator_streams_final_text_and_holds_back_stop_strings() {
    let p = common::smollm2_model();
    let full = alone(Request { prompt: prompt("Tell me a short story about a cat."), params: params(40, &[]), adapter: None });
    assert!(full.text.len() > 30, "{:?}", full.text);
    // A stop string from the middle of what the model says.
    let start = full.text.char_indices().map(|(i, _)| i).find(|&i| i >= 20).unwrap();
    let stop: String = full.text[start..].chars().take(4).collect();
    let cut = full.text.find(&stop).unwrap();
    let req = Request { prompt: prompt("Tell me a short story about a cat."), params: params(40, &[&stop]), adapter: None };
    let mut generation = Generation::new(&p.model, &p.tokenizer, req).unwrap();
    let mut streamed = String::new();
    for token in generation.by_ref() {
        let token = token.unwrap();
        streamed.push_str(&token.text);
        // Nothing streamed ever reaches into the stop string.
        assert!(streamed.len() <= cut, "streamed {streamed:?} past the stop at {cut}");
    }
    let done = generation.finished().unwrap();
    assert_eq!(done.reason, FinishReason::Stop);
    assert_eq!(streamed, full.text[..cut]);
    assert_eq!(done.text, streamed);
    // Without a stop string the stream is the whole text.
    let mut all = String::new();
    let f = Generation::new(
        &p.model,
        &p.tokenizer,
        Request { prompt: prompt("Tell me a short story about a cat."), params: params(40, &[]), adapter: None },
    )
    .unwrap()
    .run(|t| all.push_str(t))
    .unwrap();
    assert_eq!(all, full.text);
    assert_eq!(f.reason, if f.tokens.len() == 40 { FinishReason::Length } else { FinishReason::Stop });
}

#[test]
fn a_stop_handle_ends_a_generation_and_cancel_frees_its_cache() {
    let p = common::smollm2_model();
    let req = Request { prompt: prompt("Count from one to fifty."), params: params(64, &[]), adapter: None };
    let mut generation = Generation::new(&p.model, &p.tokenizer, req.clone()).unwrap();
    let handle = generation.stop_handle();
    let first: Vec<u32> = generation.by_ref().take(3).map(|t| t.unwrap().id.unwrap()).collect();
    handle.stop();
    assert!(generation.next().is_none());
    let done = generation.finished().unwrap();
    assert_eq!(done.reason, FinishReason::Cancelled);
    assert_eq!(done.tokens, first);
    assert_eq!(alone(req.clone()).tokens[..3], first[..]);

    let mut batch = RunningBatch::new(&p.model, &p.tokenizer);
    let one = batch.add(req.clone()).unwrap();
    let two = batch.add(req).unwrap();
    let both = batch.cache_bytes();
    batch.step().unwrap();
    assert!(batch.cancel(one).is_some());
    assert_eq!(batch.cache_bytes(), both / 2);
    assert!(batch.cancel(one).is_none(), "a cancelled sequence is gone");
    assert_eq!(batch.step().unwrap()[0].id, two);
}

#[test]
fn requests_are_checked_when_they_join() {
    let p = common::smollm2_model();
    let mut batch = RunningBatch::new(&p.model, &p.tokenizer);
    let bad = |prompt: Vec<u32>, params: GenerateParams| Request { prompt, params, adapter: None };
    let ctx = p.model.config.max_position_embeddings;
    let err = |r| batch_err(p, r);
    assert!(err(bad(vec![], params(4, &[]))).contains("non-empty prompt"));
    assert!(err(bad(vec![1, 2], params(ctx, &[]))).contains("exceeds the model's context"));
    assert!(err(bad(vec![u32::MAX], params(4, &[]))).contains("outside the vocabulary"));
    assert!(err(bad(vec![1], params(4, &[""]))).contains("stop string must not be empty"));
    assert!(batch.is_empty());
    assert!(batch.add(bad(vec![1, 2], params(4, &[]))).is_ok());
}

fn batch_err(p: &lowrank::pretrained::Pretrained, r: Request) -> String {
    RunningBatch::new(&p.model, &p.tokenizer).add(r).err().map(|e| e.to_string()).unwrap_or_default()
}
