//! Benchmarks behind `lowrank bench`: the training workload of tools/peft_bench.py
//! (same corpus, LoRA config, batch, sequence length, FLOP accounting), decode and prefill speed,
//! and a GEMM micro-benchmark. Results are JSON lines prefixed "RESULT " like peft_bench's.

use crate::data::{to_batch, Sequence};
use crate::kernels::matmul;
use crate::lora::combine::{merge, unmerge};
use crate::lora::{LoraAdapter, LoraConfig, TargetModules};
use crate::model::adapt::{Linear, LowRankSource, NoAdapter, DECODE_ROWS};
use crate::model::decoder::{SeqCache, SeqStep};
use crate::model::frozen::FrozenMatrix;
use crate::model::DecoderModel;
use crate::model::WeightFormat;
use crate::pretrained::Pretrained;
use crate::rng::Rng;
use crate::train::AdamW;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::Path;
use std::time::Instant;

/// Llama shapes for random-weight benchmarks at the sizes users train: name, hidden size,
/// layers, heads, KV heads, intermediate size, vocabulary.
pub const RANDOM_SHAPES: [(&str, [usize; 6]); 2] =
    [("tinyllama-1.1b", [2048, 22, 32, 4, 5632, 49152]), ("llama3-8b", [4096, 32, 32, 8, 14336, 128256])];

/// Weights drawn from N(0, 0.02²) (norms 1), the initializer transformers uses for Llama, each
/// tensor from its own stream of the seed, generated in parallel blocks as it is asked for.
struct RandomWeights {
    seed: u64,
}

impl crate::model::weights::WeightSource for RandomWeights {
    fn f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        use rayon::prelude::*;
        let n: usize = shape.iter().product();
        if name.ends_with("norm.weight") {
            return Ok(vec![1.0; n]);
        }
        let stream = name.bytes().fold(self.seed ^ 0x9E37_79B9_7F4A_7C15, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01B3));
        let mut v = vec![0.0f32; n];
        v.par_chunks_mut(1 << 16).enumerate().for_each(|(i, block)| {
            let mut rng = Rng::new(stream.wrapping_add(i as u64));
            block.iter_mut().for_each(|x| *x = 0.02 * rng.normal());
        });
        Ok(v)
    }
}

/// A random-weight Llama of one of `RANDOM_SHAPES`, its frozen weights stored in `format` as they
/// are made (an 8B model on a Q4_1 base never exists in f32).
pub fn random_model(shape: &str, format: crate::model::WeightFormat, seed: u64) -> Result<DecoderModel> {
    let Some((_, [d, layers, heads, kv, inter, vocab])) = RANDOM_SHAPES.iter().find(|(n, _)| *n == shape) else {
        bail!("unknown shape {shape:?}; known: {}", RANDOM_SHAPES.map(|s| s.0).join(", "));
    };
    let config = crate::model::config::DecoderConfig::from_json(&json!({
        "model_type": "llama", "hidden_size": d, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "intermediate_size": inter, "vocab_size": vocab, "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": false,
    }))?;
    DecoderModel::from_weights(config, &RandomWeights { seed }, format)
}

/// Peak resident set size of this process so far (VmHWM), in MiB.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok()))
        .map_or(0.0, |kib| kib / 1024.0)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// peft_bench.py's FLOPs per training token of LoRA on a frozen Llama-style decoder.
pub fn flops_per_token(m: &DecoderModel, seq: usize, n_lora: usize) -> f64 {
    let c = &m.config;
    let (h, l, i, nh, nkv, hd) = (c.hidden_size, c.num_layers, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim);
    let per_layer = h * nh * hd + 2 * h * nkv * hd + nh * hd * h + 3 * h * i;
    let n_mm = (l * per_layer + h * c.vocab_size) as f64;
    let attn = (4 * l * seq * nh * hd) as f64;
    let fwd = 2.0 * n_mm + attn + 2.0 * n_lora as f64;
    let bwd = 2.0 * n_mm + 2.0 * attn + 4.0 * n_lora as f64;
    fwd + bwd
}

pub struct TrainBench<'a> {
    pub corpus: &'a Path,
    pub targets: String,
    pub r: usize,
    pub alpha: f32,
    pub dropout: f32,
    pub batch: usize,
    pub seq: usize,
    pub warmup: usize,
    pub steps: usize,
    /// Also time the phases of each measured step (`crate::profile`).
    pub profile: bool,
}

/// The documents of a benchmark corpus: in a `.jsonl` file (what `peft_bench.py corpus --out
/// X.jsonl` writes) each line's `"text"`, exactly peft_bench's documents; in any other file the
/// text between blank lines (a document with blank lines of its own then counts as several).
fn corpus_documents<'a>(path: &Path, text: &'a str) -> Result<Vec<std::borrow::Cow<'a, str>>> {
    if path.extension().is_none_or(|e| e != "jsonl") {
        return Ok(text.split("\n\n").map(std::borrow::Cow::Borrowed).collect());
    }
    let mut docs = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let value: Value = serde_json::from_str(line).with_context(|| format!("{}:{}: not a JSON object", path.display(), i + 1))?;
        let doc = value.get("text").and_then(Value::as_str);
        let doc = doc.with_context(|| format!("{}:{}: no string field \"text\"", path.display(), i + 1))?;
        docs.push(std::borrow::Cow::Owned(doc.to_owned()));
    }
    Ok(docs)
}

/// LoRA training throughput on fixed-length blocks of the corpus (labels = inputs).
pub fn train(p: &Pretrained, b: &TrainBench) -> Result<Value> {
    use crate::limits::{check_count, MAX_STEPS};
    check_count("--batch", b.batch, 1, 1 << 16)?;
    check_count("--seq", b.seq, 2, p.model.config.max_position_embeddings)?;
    check_count("--steps", b.steps, 1, MAX_STEPS)?;
    check_count("--warmup", b.warmup, 0, MAX_STEPS)?;
    let text = crate::io::read_input_text(b.corpus, "corpus")?;
    let docs = corpus_documents(b.corpus, &text)?;
    let eos = p.tokenizer.eos_id.unwrap_or(0);
    let need = (b.warmup + b.steps) * b.batch;
    let mut ids: Vec<u32> = Vec::new();
    let mut blocks: Vec<Sequence> = Vec::new();
    for doc in docs {
        ids.extend(p.tokenizer.encode(&doc, false)?);
        ids.push(eos);
        while ids.len() >= b.seq && blocks.len() < need {
            let rest = ids.split_off(b.seq);
            blocks.push(Sequence { train: vec![true; b.seq], ids: std::mem::replace(&mut ids, rest) });
        }
        if blocks.len() >= need {
            break;
        }
    }
    if blocks.is_empty() {
        bail!("corpus too small for one block of {} tokens", b.seq);
    }
    while blocks.len() < need {
        blocks.push(blocks[blocks.len() % blocks.len().max(1)].clone());
    }
    let cfg = LoraConfig {
        r: b.r,
        lora_alpha: b.alpha,
        lora_dropout: b.dropout,
        target_modules: TargetModules::parse(&b.targets),
        ..Default::default()
    };
    let mut adapter = LoraAdapter::new(cfg, &p.model, 0)?;
    let mut opt = AdamW::new(adapter.num_params(), 0.9, 0.999, 1e-8, 0.0);
    let mut grads = vec![0.0; adapter.num_params()];
    let mut rng = Rng::new(1);
    let mut times = Vec::new();
    let mut losses = Vec::new();
    let mut faults = 0;
    for step in 0..b.warmup + b.steps {
        let (batch, targets) = to_batch(&blocks[step * b.batch..(step + 1) * b.batch], eos);
        let n = targets.iter().flatten().count() as f32;
        let measured = step >= b.warmup;
        crate::profile::set_enabled(b.profile && measured);
        let faults_before = crate::profile::minor_faults();
        let t = Instant::now();
        grads.fill(0.0);
        let loss = p.model.loss_and_grads(&batch, &targets, &adapter, &mut grads, 1.0 / n, Some(&mut rng))?;
        opt.update(&mut adapter.params, &grads, 2e-4);
        if measured {
            times.push(t.elapsed().as_secs_f64());
            faults += crate::profile::minor_faults() - faults_before;
        }
        losses.push(loss.mean());
    }
    crate::profile::set_enabled(false);
    // What the phases do not cover is copies, layout changes (token-major ↔ head-major) and
    // allocation.
    let profile = b.profile.then(|| {
        let mean_step = times.iter().sum::<f64>() / times.len() as f64;
        let mut v = phases_per_step(times.len(), mean_step);
        v.insert("step_s_mean".into(), json!(mean_step));
        v.insert("minor_faults_per_step".into(), json!(faults as f64 / times.len() as f64));
        Value::Object(v)
    });
    let med = median(&mut times.clone());
    let tok_s = (b.batch * b.seq) as f64 / med;
    let flops = flops_per_token(&p.model, b.seq, adapter.num_params());
    Ok(json!({
        "bench": "train", "impl": "lowrank", "targets": b.targets, "r": b.r, "alpha": b.alpha, "dropout": b.dropout,
        "batch": b.batch, "seq": b.seq, "gradient_checkpointing": p.model.gradient_checkpointing,
        "weights": p.model.layers[0].linear[0].w.format().name(), "steps": b.steps, "warmup": b.warmup, "threads": rayon::current_num_threads(),
        "params_lora": adapter.num_params(), "step_s_median": med, "tok_per_s_median": tok_s,
        "model_gflops_per_s": flops * tok_s / 1e9, "loss_first": losses[0], "loss_last": losses[losses.len() - 1],
        "peak_rss_mib": peak_rss_mib(), "profile": profile,
    }))
}

/// Decode tokens/s after a prompt, and prefill tokens/s, for one adapter source.
fn decode_speed(model: &DecoderModel, ad: &dyn LowRankSource, prompt: &[u32], new_tokens: usize) -> Result<(f64, f64)> {
    let mut cache = model.new_seq_cache(prompt.len() + new_tokens + 1)?;
    let t = Instant::now();
    let mut logits = model.step(&mut [SeqStep { cache: &mut cache, tokens: prompt, adapter: Some((ad, 1.0)) }])?;
    let prefill = prompt.len() as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    for _ in 0..new_tokens {
        let next = logits.iter().enumerate().fold((0, f32::MIN), |m, (i, &x)| if x > m.1 { (i, x) } else { m }).0 as u32;
        logits = model.step(&mut [SeqStep { cache: &mut cache, tokens: &[next], adapter: Some((ad, 1.0)) }])?;
    }
    Ok((new_tokens as f64 / t.elapsed().as_secs_f64(), prefill))
}

/// Decode speed (tg) for base, unmerged and merged adapter, and prefill speed (pp) at `prefill` tokens.
pub fn decode(p: &mut Pretrained, adapter: Option<&LoraAdapter>, new_tokens: usize, prefill: usize) -> Result<Vec<Value>> {
    let context = p.model.config.max_position_embeddings;
    crate::limits::check_count("--prefill", prefill, 1, context)?;
    crate::limits::check_count("--new-tokens", new_tokens, 1, context.saturating_sub(64))?;
    let prompt = p
        .tokenizer
        .encode("<|im_start|>user\nExplain in a few sentences what a hash table is.<|im_end|>\n<|im_start|>assistant\n", false)?;
    let long: Vec<u32> = (0..prefill).map(|i| prompt[i % prompt.len()]).collect();
    let mut out = Vec::new();
    let weights = p.model.layers[0].linear[0].w.format().name();
    let row = |variant: &str, (tg, _): (f64, f64), pp: f64| {
        json!({"bench": "infer", "impl": "lowrank", "variant": variant, "weights": weights, "threads": rayon::current_num_threads(),
               "new_tokens": new_tokens, "decode_tok_per_s": tg, "prefill_tokens": prefill, "prefill_tok_per_s": pp,
               "peak_rss_mib": peak_rss_mib()})
    };
    decode_speed(&p.model, &NoAdapter, &prompt, 4)?; // warm-up
    let base = decode_speed(&p.model, &NoAdapter, &prompt, new_tokens)?;
    let pp = decode_speed(&p.model, &NoAdapter, &long, 0)?.1;
    out.push(row("base", base, pp));
    if let Some(a) = adapter {
        let unmerged = decode_speed(&p.model, a, &prompt, new_tokens)?;
        let pp = decode_speed(&p.model, a, &long, 0)?.1;
        out.push(row("lora_unmerged", unmerged, pp));
        merge(&mut p.model, a, 1.0)?;
        let merged = decode_speed(&p.model, &NoAdapter, &prompt, new_tokens)?;
        let pp = decode_speed(&p.model, &NoAdapter, &long, 0)?.1;
        unmerge(&mut p.model, a, 1.0)?;
        out.push(row("lora_merged", merged, pp));
    }
    Ok(out)
}

/// The seconds `profile` recorded since the last call, per step of `steps` (`<phase>_s`), and
/// what they leave of a mean step of `step_s` (`other_s`); resets the record.
fn phases_per_step(steps: usize, step_s: f64) -> serde_json::Map<String, Value> {
    let mut v = serde_json::Map::new();
    let mut covered = 0.0;
    for (phase, secs) in crate::profile::take() {
        v.insert(format!("{}_s", phase.name()), json!(secs / steps as f64));
        covered += secs / steps as f64;
    }
    v.insert("other_s".into(), json!(step_s - covered));
    v
}

/// Batched inference with one adapter per row: `rows` sequences prefill `prefill` tokens each in
/// one step, then decode `steps` tokens each, all rows sharing one adapter vs every row on its
/// own adapter (LoRA q,v rank `r`). Returns both timings and their ratio.
pub fn multi_adapter(p: &Pretrained, rows: usize, r: usize, prefill: usize, steps: usize, profile: bool) -> Result<Value> {
    use crate::limits::check_count;
    let context = p.model.config.max_position_embeddings;
    check_count("--rows", rows, 1, 256)?;
    check_count("--prefill", prefill, 1, context / 2)?;
    check_count("--steps", steps, 1, context / 2)?;
    let cfg = LoraConfig { r, lora_alpha: 2.0 * r as f32, ..Default::default() };
    let adapters: Vec<LoraAdapter> = (0..rows)
        .map(|i| {
            let mut a = LoraAdapter::new(cfg.clone(), &p.model, i as u64)?;
            let mut rng = Rng::new(100 + i as u64);
            a.params.iter_mut().for_each(|x| *x += 0.01 * rng.normal());
            Ok(a)
        })
        .collect::<Result<_>>()?;
    let prompts: Vec<Vec<u32>> = (0..rows).map(|i| (0..prefill).map(|t| ((t * 31 + i * 7) % 1000 + 100) as u32).collect()).collect();
    let run = |distinct: bool| -> Result<(f64, f64)> {
        let mut caches: Vec<SeqCache> = (0..rows).map(|_| p.model.new_seq_cache(prefill + steps + 1)).collect::<Result<_>>()?;
        let pick = |i: usize| -> Option<(&dyn LowRankSource, f32)> { Some((&adapters[if distinct { i } else { 0 }], 1.0)) };
        let t = Instant::now();
        let mut steps_in: Vec<SeqStep> =
            caches.iter_mut().enumerate().map(|(i, c)| SeqStep { cache: c, tokens: &prompts[i], adapter: pick(i) }).collect();
        p.model.step(&mut steps_in)?;
        drop(steps_in);
        let prefill_s = t.elapsed().as_secs_f64();
        crate::profile::take();
        crate::profile::set_enabled(profile);
        let t = Instant::now();
        for k in 0..steps {
            let tokens: Vec<[u32; 1]> = (0..rows).map(|i| [((k * 13 + i) % 1000 + 100) as u32]).collect();
            let mut s: Vec<SeqStep> =
                caches.iter_mut().enumerate().map(|(i, c)| SeqStep { cache: c, tokens: &tokens[i], adapter: pick(i) }).collect();
            p.model.step(&mut s)?;
        }
        let step_s = t.elapsed().as_secs_f64() / steps as f64;
        crate::profile::set_enabled(false);
        Ok((prefill_s, step_s))
    };
    run(true)?; // warm-up
    let (one_pre, one_step) = run(false)?;
    let one_profile = Value::Object(phases_per_step(steps, one_step));
    let (many_pre, many_step) = run(true)?;
    let many_profile = Value::Object(phases_per_step(steps, many_step));
    let weights = p.model.layers[0].linear[0].w.format().name();
    Ok(json!({"bench": "multi_adapter", "impl": "lowrank", "weights": weights, "rows": rows, "r": r, "prefill_tokens": prefill,
              "threads": rayon::current_num_threads(),
              "one_adapter_prefill_tok_per_s": (rows * prefill) as f64 / one_pre, "distinct_prefill_tok_per_s": (rows * prefill) as f64 / many_pre,
              "one_adapter_decode_tok_per_s": rows as f64 / one_step, "distinct_decode_tok_per_s": rows as f64 / many_step,
              "prefill_time_ratio": many_pre / one_pre, "decode_step_time_ratio": many_step / one_step,
              "profile": profile.then(|| json!({"one_adapter": one_profile, "distinct": many_profile}))}))
}

/// f32 GEMM GFLOP/s: square n×n, and the 512×576×1536 shape of a LoRA training step; where the
/// CPU has AMX also the bf16 product a bf16 base runs (weight repacked per call, as in training).
pub fn gemm(n: usize, repeats: usize) -> Result<Value> {
    crate::limits::check_count("--n", n, 1, 1 << 14)?;
    crate::limits::check_count("--repeats", repeats, 1, 10_000)?;
    let mut rng = Rng::new(0);
    let mut run = |m: usize, k: usize, nn: usize| {
        let a: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
        let b: Vec<f32> = (0..k * nn).map(|_| rng.normal()).collect();
        let mut c = vec![0.0; m * nn];
        gflops(m * k * nn, repeats, || matmul(&mut c, &a, false, &b, false, m, nn, k, 1.0, false))
    };
    let square = run(n, n, n);
    let step_shape = run(512, 576, 1536);
    // The bf16 products of a training step (on `amx::product_unit`), as (m, k, n): SmolLM2's gate/up and down
    // projections over 512 tokens, a 4096-row block of its LM head for 256 tokens, and a 1.1B
    // Llama's (TinyLlama's shape) q/o, gate/up and down projections over 2048 tokens; each forward
    // (`a · Wᵀ`) and input gradient (`a · W`).
    let bf16 = crate::kernels::amx::products_available().then(|| {
        use crate::kernels::amx::{matmul_bf16, Weight};
        let mut shapes = serde_json::Map::new();
        for (m, k, nn) in [(512, 576, 1536), (512, 1536, 576), (256, 576, 4096), (2048, 2048, 2048), (2048, 2048, 5632), (2048, 5632, 2048)]
        {
            let a: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
            let g: Vec<f32> = (0..m * nn).map(|_| rng.normal()).collect();
            let w: Vec<u16> = (0..nn * k).map(|_| half::bf16::from_f32(rng.normal()).to_bits()).collect();
            let (mut c, mut dx) = (vec![0.0; m * nn], vec![0.0; m * k]);
            let forward = gflops(m * k * nn, repeats, || matmul_bf16(&mut c, nn, &a, k, m, k, Weight::Nk(&w), nn, 1.0, false));
            let backward = gflops(m * k * nn, repeats, || matmul_bf16(&mut dx, k, &g, nn, m, nn, Weight::Kn(&w), k, 1.0, false));
            shapes.insert(format!("{m}x{k}x{nn}"), json!({"forward": forward, "input_gradient": backward}));
        }
        shapes
    });
    Ok(json!({"bench": "sgemm", "impl": "lowrank (gemm crate)", "n": n, "threads": rayon::current_num_threads(),
           "median_gflops": square, "gflops_512x576x1536": step_shape, "bf16_gflops": bf16,
           "bf16_kernel": crate::kernels::amx::product_unit().map_or("none", |unit| unit.name())}))
}

/// The frozen-weight products of one inference step, as `lowrank serve` runs them at `rows`
/// rows (`Linear::infer`: decode steps, and prompt chunks beyond 32 rows), on SmolLM2-135M's
/// shapes with random weights: 30 layers of
/// q, k, v, o, gate, up and down (each matrix its own memory, as in the model, so the step
/// streams every weight once) and the LM head. Per weight format and row count: the step's
/// median milliseconds over `repeats` runs, multiply-adds per second and weight bytes per second.
pub fn gemv(formats: &[WeightFormat], row_counts: &[usize], repeats: usize) -> Result<Value> {
    crate::limits::check_count("--repeats", repeats, 1, 10_000)?;
    for &m in row_counts {
        crate::limits::check_count("--rows", m, 1, 4096)?;
    }
    let (hidden, kv, inter, vocab, layers) = (576, 192, 1536, 49152, 30);
    let layer_shapes = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (inter, hidden), (inter, hidden), (hidden, inter)];
    let mut rng = Rng::new(0);
    let mut results = serde_json::Map::new();
    for &format in formats {
        let shapes = (0..layers).flat_map(|_| layer_shapes).chain([(vocab, hidden)]);
        let matrices: Vec<Linear> = shapes
            .map(|(rows, cols)| Linear {
                w: FrozenMatrix::new(rows, cols, (0..rows * cols).map(|_| 0.02 * rng.normal()).collect(), format),
                bias: None,
                in_features: cols,
                out_features: rows,
            })
            .collect();
        let mut per_rows = serde_json::Map::new();
        for &m in row_counts {
            // A prompt chunk takes the LM head for its last row only: left out for more rows than
            // a decode step has.
            let products = if m > DECODE_ROWS { &matrices[..matrices.len() - 1] } else { &matrices[..] };
            let multiply_adds: usize = products.iter().map(|l| l.w.len()).sum();
            let weight_bytes: usize = products.iter().map(|l| l.w.bytes()).sum();
            let x: Vec<f32> = (0..m * inter).map(|_| rng.normal()).collect();
            let mut y = vec![0.0f32; m * products.iter().map(|l| l.out_features).max().unwrap_or(0)];
            let s = median_seconds(repeats, || {
                for l in products {
                    l.infer(&x[..m * l.in_features], m, &mut y[..m * l.out_features]);
                }
            });
            per_rows.insert(
                m.to_string(),
                json!({"step_ms": 1e3 * s, "g_multiply_adds_per_s": (m * multiply_adds) as f64 / s / 1e9, "weight_gb_per_s": weight_bytes as f64 / s / 1e9}),
            );
        }
        results.insert(format.name().to_string(), Value::Object(per_rows));
    }
    Ok(
        json!({"bench": "decode_products", "impl": "lowrank", "threads": rayon::current_num_threads(), "shapes": "SmolLM2-135M", "formats": results}),
    )
}

/// GFLOP/s of `product` (`multiply_adds` of them), median over `repeats` timed runs after one
/// untimed one.
fn gflops(multiply_adds: usize, repeats: usize, product: impl FnMut()) -> f64 {
    2.0 * multiply_adds as f64 / median_seconds(repeats, product) / 1e9
}

/// Median seconds of `work` over `repeats` timed runs (at least 3) after one untimed one.
fn median_seconds(repeats: usize, mut work: impl FnMut()) -> f64 {
    work();
    let mut ts: Vec<f64> = (0..repeats.max(3))
        .map(|_| {
            let t = Instant::now();
            work();
            t.elapsed().as_secs_f64()
        })
        .collect();
    median(&mut ts)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `.jsonl` corpus gives each line's text whole, blank lines inside included; a text corpus
    /// splits at blank lines; a bad line is named by file and line.
    #[test]
    fn corpus_documents_follow_the_file_form() {
        let jsonl = "{\"text\": \"one\\n\\nparagraph two\"}\n\n{\"text\": \"three\"}\n";
        let docs = corpus_documents(Path::new("c.jsonl"), jsonl).unwrap();
        assert_eq!(docs, ["one\n\nparagraph two", "three"]);
        let docs = corpus_documents(Path::new("c.txt"), "one\n\nparagraph two\n\nthree").unwrap();
        assert_eq!(docs, ["one", "paragraph two", "three"]);
        let err = corpus_documents(Path::new("c.jsonl"), "{\"text\": \"a\"}\n{\"txt\": 1}\n").unwrap_err();
        assert!(err.to_string().contains("c.jsonl:2") && err.to_string().contains("\"text\""), "{err}");
        let err = corpus_documents(Path::new("c.jsonl"), "not json\n").unwrap_err();
        assert!(err.to_string().contains("c.jsonl:1"), "{err}");
    }
}
