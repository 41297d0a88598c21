//! A fuzz harness on stable Rust: seeded, structure-aware mutations of real inputs — the SmolLM2
//! GGUF's header and metadata, a tiny GGUF model, the fixture safetensors files, a PEFT adapter
//! directory, config.json, chat templates and JSONL data — fed to the library's readers and, for
//! a sample of cases, to the CLI commands that take them. Every case must end in a clean `Ok` or
//! `Err`: a panic, an allocation above `ALLOC_CAP` (counted by the wrapping global allocator
//! below), or a case running past `CASE_LIMIT` fails the run and prints the case's seed.
//!
//! Time-bounded: each target runs for `LOWRANK_FUZZ_SECONDS` (default 6) or `MAX_CASES` cases.
//! Reproduce one case: `LOWRANK_FUZZ_TARGET=<name> LOWRANK_FUZZ_CASE=<seed> cargo test --release
//! --test fuzz`. `LOWRANK_FUZZ_SEED` changes the base seed (default 1).

mod common;

use common::{fixture, run_cli, smollm2, tmpdir, TinyGguf};
use lowrank::model::gguf::{GgufFile, GgufValue};
use lowrank::rng::Rng;
use serde_json::Value;
use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The largest single allocation a case may make. The inputs here are at most ~16 MB, so
/// anything near this is an allocation sized by a hostile number rather than by the data.
const ALLOC_CAP: usize = 1 << 30;
const CASE_LIMIT: Duration = Duration::from_secs(30);
const MAX_CASES: usize = 5000;

static ARMED: AtomicBool = AtomicBool::new(false);
static CASE_SEED: AtomicU64 = AtomicU64::new(0);
/// Milliseconds since `EPOCH` when the running case started (0: none running).
static CASE_START_MS: AtomicU64 = AtomicU64::new(0);
static mut EPOCH: Option<Instant> = None;

/// Writes `n` in decimal without allocating.
fn write_number(out: &mut impl Write, mut n: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let _ = out.write_all(&buf[i..]);
}

struct CappedAllocator;

impl CappedAllocator {
    fn check(&self, size: usize) -> bool {
        if size > ALLOC_CAP && ARMED.load(Ordering::Relaxed) {
            let mut e = std::io::stderr();
            let _ = e.write_all(b"\nfuzz: an allocation of ");
            write_number(&mut e, size as u64);
            let _ = e.write_all(b" bytes (above the cap) in the case with seed ");
            write_number(&mut e, CASE_SEED.load(Ordering::Relaxed));
            let _ = e.write_all(b"\n");
            return false;
        }
        true
    }
}

// SAFETY: forwards to the system allocator; only refuses (returns null) oversized requests.
unsafe impl GlobalAlloc for CappedAllocator {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if !self.check(l.size()) {
            return std::ptr::null_mut();
        }
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if !self.check(l.size()) {
            return std::ptr::null_mut();
        }
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        if !self.check(new_size) {
            return std::ptr::null_mut();
        }
        unsafe { System.realloc(p, l, new_size) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static ALLOCATOR: CappedAllocator = CappedAllocator;

fn now_ms() -> u64 {
    // SAFETY: EPOCH is written once, before the watchdog thread starts.
    #[allow(static_mut_refs)]
    let epoch = unsafe { EPOCH.expect("set in the test") };
    epoch.elapsed().as_millis() as u64 + 1
}

/// Fails the process, naming the case, when one runs past `CASE_LIMIT` (a hang).
fn start_watchdog(target: &'static std::sync::Mutex<&'static str>) {
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(200));
        let started = CASE_START_MS.load(Ordering::SeqCst);
        if started != 0 && now_ms() - started > CASE_LIMIT.as_millis() as u64 {
            let t = *target.lock().unwrap_or_else(|e| e.into_inner());
            eprintln!(
                "\nfuzz: target {t}: the case with seed {} ran past {} s (a hang); rerun with LOWRANK_FUZZ_TARGET={t} LOWRANK_FUZZ_CASE={}",
                CASE_SEED.load(Ordering::SeqCst),
                CASE_LIMIT.as_secs(),
                CASE_SEED.load(Ordering::SeqCst)
            );
            std::process::exit(101);
        }
    });
}

/// Interesting numbers for sizes, counts and offsets.
fn interesting_u64(rng: &mut Rng) -> u64 {
    const V: [u64; 16] = [0, 1, 2, 3, 7, 15, 16, 31, 255, 4096, 65535, 1 << 31, 1 << 32, (1 << 32) + 1, 1 << 62, u64::MAX];
    match rng.below(4) {
        0 => rng.next_u64(),
        1 => V[rng.below(16) as usize].wrapping_sub(rng.below(3)),
        _ => V[rng.below(16) as usize],
    }
}

fn interesting_f64(rng: &mut Rng) -> f64 {
    const V: [f64; 12] = [0.0, -0.0, -1.0, 1e-30, 0.5, 1.0, 2.5, 1e39, 1e300, f64::NAN, f64::INFINITY, f64::NEG_INFINITY];
    if rng.below(3) == 0 {
        (rng.next_f32() as f64 - 0.5) * 10f64.powi(rng.below(40) as i32 - 10)
    } else {
        V[rng.below(12) as usize]
    }
}

fn random_json(rng: &mut Rng, depth: usize) -> Value {
    match rng.below(if depth > 2 { 6 } else { 8 }) {
        0 => Value::Null,
        1 => Value::Bool(rng.below(2) == 0),
        2 => serde_json::json!(interesting_u64(rng)),
        3 => serde_json::Number::from_f64(interesting_f64(rng)).map_or(Value::Null, Value::Number),
        4 => serde_json::json!(-(rng.below(1 << 40) as i64)),
        5 => Value::String(["", "x", "all-linear", "q_proj", "none", "llama", "LORA", "8", "1e-5"][rng.below(9) as usize].into()),
        6 => Value::Array((0..rng.below(4)).map(|_| random_json(rng, depth + 1)).collect()),
        _ => {
            let keys = ["q_proj", "v_proj", "down_proj", "rope_type", "factor", "type", "x"];
            Value::Object((0..rng.below(4)).map(|_| (keys[rng.below(7) as usize].to_string(), random_json(rng, depth + 1))).collect())
        }
    }
}

/// Mutates a JSON object: set keys (known ones or new) to random values, remove keys, or
/// tweak numbers, 1 to 4 times.
fn mutate_json(v: &mut Value, known_keys: &[&str], rng: &mut Rng) {
    let Some(obj) = v.as_object_mut() else { return };
    for _ in 0..1 + rng.below(4) {
        let keys: Vec<String> = obj.keys().cloned().collect();
        let key = if rng.below(4) == 0 || keys.is_empty() {
            known_keys[rng.below(known_keys.len() as u64) as usize].to_string()
        } else {
            keys[rng.below(keys.len() as u64) as usize].clone()
        };
        match rng.below(5) {
            0 => {
                obj.remove(&key);
            }
            1 => {
                let n = obj.get(&key).and_then(Value::as_f64).unwrap_or(1.0);
                let n = n * [0.0, -1.0, 0.5, 2.0, 1e9, 1e30][rng.below(6) as usize];
                obj.insert(key, serde_json::Number::from_f64(n).map_or(Value::Null, Value::Number));
            }
            _ => {
                obj.insert(key, random_json(rng, 0));
            }
        }
    }
}

fn mutate_bytes(b: &mut Vec<u8>, rng: &mut Rng, region: usize) {
    let region = region.min(b.len()).max(1);
    for _ in 0..1 + rng.below(4) {
        match rng.below(5) {
            0 if !b.is_empty() => {
                let at = rng.below(region as u64) as usize % b.len();
                b[at] ^= 1 << rng.below(8);
            }
            1 if b.len() >= 8 => {
                let at = (rng.below(region as u64) as usize).min(b.len() - 8);
                b[at..at + 8].copy_from_slice(&interesting_u64(rng).to_le_bytes());
            }
            2 => {
                let cut = rng.below(b.len() as u64 + 1) as usize;
                b.truncate(cut);
            }
            3 if b.len() >= 4 => {
                let at = (rng.below(region as u64) as usize).min(b.len() - 4);
                b[at..at + 4].copy_from_slice(&(interesting_u64(rng) as u32).to_le_bytes());
            }
            _ => {
                let at = rng.below(region as u64 + 1) as usize % (b.len() + 1);
                let junk: Vec<u8> = (0..rng.below(16)).map(|_| rng.below(256) as u8).collect();
                b.splice(at..at, junk);
            }
        }
    }
}

fn random_gguf_value(rng: &mut Rng) -> GgufValue {
    match rng.below(9) {
        0 => GgufValue::U32(interesting_u64(rng) as u32),
        1 => GgufValue::U64(interesting_u64(rng)),
        2 => GgufValue::I32(-(rng.below(1000) as i32)),
        3 => GgufValue::F32(interesting_f64(rng) as f32),
        4 => GgufValue::F64(interesting_f64(rng)),
        5 => GgufValue::Bool(rng.below(2) == 0),
        6 => GgufValue::String(["", "llama", "qwen2", "gpt2", "linear", "smollm", "{{ x }}"][rng.below(7) as usize].into()),
        7 => GgufValue::Array((0..rng.below(5)).map(|_| GgufValue::U32(rng.below(100) as u32)).collect()),
        _ => GgufValue::Array(vec![]),
    }
}

/// Structure-aware mutation of a GGUF held as parts: metadata values, tensor dimensions, types
/// and offsets; duplicates and removals.
fn mutate_gguf(g: &mut TinyGguf, rng: &mut Rng, model_keys: bool) {
    for _ in 0..1 + rng.below(3) {
        if g.meta.is_empty() {
            g.set("general.architecture", GgufValue::String("llama".into()));
        }
        let n_meta = g.meta.len() as u64;
        let n_t = g.tensors.len() as u64;
        match rng.below(if n_t > 0 { 9 } else { 4 }) {
            0 | 1 => {
                let i = rng.below(n_meta) as usize;
                let keep_tokenizer = model_keys && g.meta[i].0.starts_with("tokenizer.");
                if !keep_tokenizer {
                    g.meta[i].1 = random_gguf_value(rng);
                }
            }
            2 => {
                let i = rng.below(n_meta) as usize;
                if !(model_keys && g.meta[i].0.starts_with("tokenizer.")) {
                    g.meta.remove(i);
                }
            }
            3 => {
                let keys = [
                    "llama.vocab_size",
                    "llama.attention.key_length",
                    "llama.attention.value_length",
                    "general.alignment",
                    "llama.rope.scaling.type",
                    "llama.rope.scaling.factor",
                    "llama.context_length",
                ];
                g.set(keys[rng.below(keys.len() as u64) as usize], random_gguf_value(rng));
            }
            4 | 5 => {
                let t = &mut g.tensors[rng.below(n_t) as usize];
                let d = rng.below(t.1.len() as u64) as usize;
                t.1[d] = interesting_u64(rng);
                if rng.below(4) == 0 {
                    t.1.push(interesting_u64(rng));
                }
            }
            6 => g.tensors[rng.below(n_t) as usize].2 = [0, 1, 2, 3, 8, 12, 14, 30, 6, 99, 4][rng.below(11) as usize],
            7 => g.tensors[rng.below(n_t) as usize].3 = Some(interesting_u64(rng)),
            _ => {
                let i = rng.below(n_t) as usize;
                if rng.below(2) == 0 {
                    let dup = g.tensors[i].clone();
                    g.tensors.push(dup);
                } else {
                    g.tensors.remove(i);
                }
            }
        }
    }
}

/// The parts of a real GGUF file (tensor data left empty: only the header is fuzzed).
fn gguf_parts(path: &Path) -> TinyGguf {
    let g = GgufFile::open(path).unwrap();
    let meta = g.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let tensors = g
        .tensors
        .iter()
        .map(|t| (t.name.clone(), t.dims.iter().map(|&d| d as u64).collect(), t.type_id, Some(t.offset as u64), Vec::new()))
        .collect();
    TinyGguf { meta, tensors }
}

const HOSTILE_TEMPLATE_PIECES: [&str; 14] = [
    "{% for i in range(100000) %}",
    "{% endfor %}",
    "{% for m in messages %}{{ m.content }}{% endfor %}",
    "{{ raise_exception('bad') }}",
    "{{ 'ab' * 100000000 }}",
    "{% macro m(x) %}{{ m(x) }}{% endmacro %}{{ m(1) }}",
    "{% if messages[0]['role'] == 'system' %}",
    "{% endif %}",
    "{{ messages[1000].content }}",
    "{{ messages | tojson }}",
    "{% set x = messages[0].content.split(' ') %}",
    "{{ bos_token }}{{ eos_token }}",
    "{% for i in range(10) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}",
    "{{ (messages | length) // 0 }}",
];

fn mutate_text(text: &str, rng: &mut Rng, pieces: &[&str]) -> String {
    let mut t = text.to_string();
    for _ in 0..1 + rng.below(3) {
        let at = (0..=t.len()).filter(|&i| t.is_char_boundary(i)).nth(rng.below(t.len() as u64 + 1) as usize).unwrap_or(t.len());
        match rng.below(3) {
            0 => t.insert_str(at, pieces[rng.below(pieces.len() as u64) as usize]),
            1 => {
                let end = (at + rng.below(40) as usize).min(t.len());
                let end = (end..=t.len()).find(|&i| t.is_char_boundary(i)).unwrap_or(t.len());
                t.replace_range(at..end, "");
            }
            _ => {
                let end = (at + rng.below(80) as usize).min(t.len());
                let end = (end..=t.len()).find(|&i| t.is_char_boundary(i)).unwrap_or(t.len());
                let dup = t[at..end].to_string();
                t.insert_str(at, &dup);
            }
        }
    }
    t
}

/// Everything the targets share: the seeds and the tiny model they run against.
struct Corpus {
    dir: PathBuf,
    tiny: TinyGguf,
    tiny_path: PathBuf,
    smollm_header: TinyGguf,
    small_ggufs: Vec<TinyGguf>,
    safetensors: Vec<Vec<u8>>,
    hf_model: lowrank::DecoderModel,
    adapter_config: Value,
    adapter_weights: Vec<u8>,
    config_json: Value,
    templates: Vec<String>,
    jsonl: Vec<String>,
    tokenizer: lowrank::tokenizer::Tokenizer,
}

type Target = fn(&Corpus, &mut Rng, bool) -> anyhow::Result<()>;

fn gguf_header(c: &Corpus, rng: &mut Rng, cli: bool) -> anyhow::Result<()> {
    let base = match rng.below(3) {
        0 => &c.smollm_header,
        _ => &c.small_ggufs[rng.below(c.small_ggufs.len() as u64) as usize],
    };
    let mut g = base.clone();
    if std::ptr::eq(base, &c.smollm_header) && rng.below(2) == 0 {
        // Without tensor descriptions the header parses, so the metadata reaches the config
        // and tokenizer readers.
        g.tensors.clear();
    }
    mutate_gguf(&mut g, rng, false);
    let mut bytes = g.to_bytes();
    if rng.below(3) == 0 {
        let region = bytes.len();
        mutate_bytes(&mut bytes, rng, region);
    }
    if cli {
        let p = c.dir.join("case.gguf");
        std::fs::write(&p, &bytes)?;
        cli_ok(&["inspect", p.to_str().unwrap()]);
    }
    let f = GgufFile::from_bytes(bytes, Path::new("case.gguf"))?;
    for t in f.tensors.iter().take(8) {
        let _ = f.tensor_f32(&t.name);
    }
    let _ = lowrank::model::gguf::decoder_config(&f);
    lowrank::tokenizer::Tokenizer::from_gguf(&f)?;
    Ok(())
}

fn gguf_model(c: &Corpus, rng: &mut Rng, cli: bool) -> anyhow::Result<()> {
    let mut g = c.tiny.clone();
    mutate_gguf(&mut g, rng, true);
    let f = GgufFile::from_bytes(g.to_bytes(), Path::new("case.gguf"))?;
    if cli {
        let p = c.dir.join("model.gguf");
        g.write(&p);
        cli_ok(&["generate", "--model", p.to_str().unwrap(), "--prompt", "hi", "--max-new-tokens", "2"]);
    }
    let model = lowrank::DecoderModel::from_gguf(&f, lowrank::model::WeightFormat::F32)?;
    run_model(&model, &lowrank::model::adapt::NoAdapter)
}

/// A short forward pass and two decode steps; token ids within the model's vocabulary.
fn run_model(model: &lowrank::DecoderModel, ad: &dyn lowrank::model::adapt::LowRankSource) -> anyhow::Result<()> {
    let v = model.config.vocab_size as u32;
    let ids: Vec<u32> = [1u32, 17, 300, 5].iter().map(|t| t % v).collect();
    let batch = lowrank::Batch::right_padded(std::slice::from_ref(&ids), 0)?;
    model.forward(&batch, ad)?;
    use lowrank::model::decoder::SeqStep;
    let mut cache = model.new_seq_cache(8)?;
    model.step(&mut [SeqStep { cache: &mut cache, tokens: &ids[..2], adapter: Some((ad, 1.0)) }])?;
    model.step(&mut [SeqStep { cache: &mut cache, tokens: &ids[2..3], adapter: Some((ad, 1.0)) }])?;
    Ok(())
}

fn safetensors_file(c: &Corpus, rng: &mut Rng, cli: bool) -> anyhow::Result<()> {
    let mut bytes = c.safetensors[rng.below(c.safetensors.len() as u64) as usize].clone();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    if rng.below(2) == 0 {
        // Structure-aware: edit the JSON header's tensor entries, keep the data.
        let mut h: Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
        let names: Vec<String> = h.as_object().unwrap().keys().cloned().collect();
        let name = &names[rng.below(names.len() as u64) as usize];
        mutate_json(&mut h[name.as_str()], &["dtype", "shape", "data_offsets"], rng);
        if rng.below(3) == 0 {
            if let Some(shape) = h[name.as_str()].get_mut("shape").and_then(Value::as_array_mut) {
                shape.push(serde_json::json!(interesting_u64(rng)));
            }
        }
        let text = h.to_string();
        let mut out = (text.len() as u64).to_le_bytes().to_vec();
        out.extend(text.as_bytes());
        out.extend(&bytes[8 + header_len..]);
        bytes = out;
    } else {
        mutate_bytes(&mut bytes, rng, 8 + header_len);
    }
    let p = c.dir.join("case.safetensors");
    std::fs::write(&p, &bytes)?;
    if cli {
        let d = c.dir.join("st-dir");
        std::fs::create_dir_all(&d)?;
        std::fs::write(d.join("model.safetensors"), &bytes)?;
        std::fs::copy(fixture("tiny-llama/model/config.json"), d.join("config.json"))?;
        cli_ok(&["inspect", d.to_str().unwrap()]);
    }
    let st = lowrank::model::TensorStore::open_files(&[p])?;
    for name in st.list().keys() {
        let _ = st.f32_any(name);
    }
    Ok(())
}

fn adapter_dir(c: &Corpus, rng: &mut Rng, cli: bool) -> anyhow::Result<()> {
    let mut cfg = c.adapter_config.clone();
    let known = [
        "r",
        "lora_alpha",
        "lora_dropout",
        "rank_pattern",
        "alpha_pattern",
        "target_modules",
        "use_rslora",
        "layers_to_transform",
        "exclude_modules",
        "peft_type",
        "bias",
        "use_dora",
        "task_type",
    ];
    mutate_json(&mut cfg, &known, rng);
    let mut weights = c.adapter_weights.clone();
    if rng.below(4) == 0 {
        mutate_bytes(&mut weights, rng, 4096);
    }
    let d = c.dir.join("adapter");
    std::fs::create_dir_all(&d)?;
    std::fs::write(d.join("adapter_config.json"), cfg.to_string())?;
    std::fs::write(d.join("adapter_model.safetensors"), &weights)?;
    if cli {
        cli_ok(&["inspect", d.to_str().unwrap()]);
    }
    let a = lowrank::lora::peft::load(&d, &c.hf_model)?;
    let _ = lowrank::lora::gguf::to_gguf(&a, &c.hf_model.config);
    let combo = lowrank::lora::combine::Combination::Cat;
    let _ = lowrank::lora::combine::add_weighted(&c.hf_model, &[(&a, 0.5), (&a, -1.0)], combo);
    run_model(&c.hf_model, &a)
}

fn config_json(c: &Corpus, rng: &mut Rng, _cli: bool) -> anyhow::Result<()> {
    let mut v = c.config_json.clone();
    let known = [
        "num_attention_heads",
        "num_key_value_heads",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "vocab_size",
        "head_dim",
        "rms_norm_eps",
        "rope_theta",
        "rope_parameters",
        "rope_scaling",
        "max_position_embeddings",
        "model_type",
        "tie_word_embeddings",
        "sliding_window",
        "eos_token_id",
        "hidden_act",
    ];
    mutate_json(&mut v, &known, rng);
    let config = lowrank::model::DecoderConfig::from_json(&v)?;
    let store = lowrank::model::TensorStore::open_dir(&fixture("tiny-llama/model"))?;
    let model = lowrank::DecoderModel::from_weights(config, &store, lowrank::model::WeightFormat::F32)?;
    run_model(&model, &lowrank::model::adapt::NoAdapter)
}

fn chat_template(c: &Corpus, rng: &mut Rng, cli: bool) -> anyhow::Result<()> {
    let base = &c.templates[rng.below(c.templates.len() as u64) as usize];
    let src = mutate_text(base, rng, &HOSTILE_TEMPLATE_PIECES);
    if cli {
        let p = c.dir.join("template.gguf");
        c.tiny.clone().set("tokenizer.chat_template", GgufValue::String(src.clone())).write(&p);
        cli_ok(&["generate", "--model", p.to_str().unwrap(), "--chat", "--prompt", "hi", "--max-new-tokens", "1"]);
    }
    let t = lowrank::data::ChatTemplate::new(&src, "<s>", "</s>")?;
    use lowrank::data::Message;
    let msgs = [Message::new("system", "Be brief."), Message::new("user", "Hi there"), Message::new("assistant", "Hello.")];
    let _ = t.render(&msgs[1..], true);
    t.render_with_assistant_spans(&msgs)?;
    Ok(())
}

fn jsonl_data(c: &Corpus, rng: &mut Rng, cli: bool) -> anyhow::Result<()> {
    let mut lines: Vec<String> = (0..1 + rng.below(4)).map(|_| c.jsonl[rng.below(c.jsonl.len() as u64) as usize].clone()).collect();
    for l in lines.iter_mut() {
        if let Ok(mut v) = serde_json::from_str::<Value>(l) {
            if rng.below(2) == 0 {
                mutate_json(&mut v, &["text", "prompt", "completion", "messages", "instruction", "input", "output"], rng);
                *l = v.to_string();
                continue;
            }
        }
        *l = mutate_text(
            l,
            rng,
            &["\"", "{", "}", "[", "]", ",", ":", "\\u0000", "\u{FEFF}", "null", "\"role\": \"robot\"", "\n", "\\ud800"],
        );
    }
    let mut bytes = lines.join("\n").into_bytes();
    if rng.below(6) == 0 {
        bytes.insert(rng.below(bytes.len() as u64 + 1) as usize, 0xFF);
    }
    let p = c.dir.join("data.jsonl");
    std::fs::write(&p, &bytes)?;
    if cli {
        let out = c.dir.join("run");
        let _ = std::fs::remove_dir_all(&out);
        cli_ok(&[
            "train",
            "--model",
            c.tiny_path.to_str().unwrap(),
            "--data",
            p.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--max-steps",
            "1",
            "--seq-len",
            "32",
        ]);
    }
    let (records, _) = lowrank::data::read_jsonl(&p, None, rng.below(2) == 0)?;
    let template = lowrank::data::ChatTemplate::new(&c.templates[0], "", "<|im_end|>")?;
    let enc = lowrank::data::Encoder { tokenizer: &c.tokenizer, template: Some(&template), train_on_inputs: false, max_tokens: 32 };
    let examples: Vec<_> = records.iter().filter_map(|r| enc.encode(r).ok()).collect();
    let _ = lowrank::data::make_sequences(&examples, 32, rng.below(2) == 0);
    Ok(())
}

/// The CLI on one case: exit 0 or 1, never a panic, abort or hang (`run_cli` checks those).
fn cli_ok(args: &[&str]) {
    let (code, _, err) = run_cli(args, 30);
    assert!(code == 0 || code == 1, "lowrank {args:?} exited {code}: {err}");
}

fn load_corpus() -> Corpus {
    let dir = tmpdir("fuzz");
    let tiny = TinyGguf::get();
    let tiny_path = tiny.write(&dir.join("tiny.gguf"));
    // The SmolLM2 header: all its metadata and tensor descriptions, with the data section cut
    // off — every tensor then lies past the end, so the header checks run on real values.
    let smollm_header = gguf_parts(smollm2());
    let small_ggufs = vec![gguf_parts(&fixture("quant/quant.gguf")), gguf_parts(&fixture("spm/tokenizer.gguf"))];
    let mut safetensors = vec![std::fs::read(fixture("tiny-llama/peft_adapter/adapter_model.safetensors")).unwrap()];
    safetensors.push(std::fs::read(fixture("tiny-qwen2/model/model-00001-of-00005.safetensors")).unwrap());
    safetensors.push(std::fs::read(fixture("tiny-llama/model/model.safetensors")).unwrap());
    let read_json = |p: PathBuf| -> Value { serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap() };
    let mut templates: Vec<String> =
        ["chatml.jinja", "llama3.jinja"].iter().map(|f| std::fs::read_to_string(fixture("fuzz").join(f)).unwrap()).collect();
    let smollm = GgufFile::open(smollm2()).unwrap();
    templates.insert(0, smollm.get_str("tokenizer.chat_template").unwrap().to_string());
    Corpus {
        tokenizer: lowrank::tokenizer::Tokenizer::from_gguf(&smollm).unwrap(),
        dir,
        tiny,
        tiny_path,
        smollm_header,
        small_ggufs,
        safetensors,
        hf_model: lowrank::DecoderModel::from_hf_dir(&fixture("tiny-llama/model")).unwrap(),
        adapter_config: read_json(fixture("tiny-llama/peft_adapter/adapter_config.json")),
        adapter_weights: std::fs::read(fixture("tiny-llama/peft_adapter/adapter_model.safetensors")).unwrap(),
        config_json: read_json(fixture("tiny-llama/model/config.json")),
        templates,
        jsonl: std::fs::read_to_string(fixture("fuzz/data.jsonl")).unwrap().lines().map(str::to_string).collect(),
    }
}

fn case_seed(base: u64, target: usize, i: usize) -> u64 {
    let mut r = Rng::new(base ^ (target as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
    r.next_u64()
}

#[test]
fn mutated_inputs_end_in_ok_or_err() {
    // SAFETY: written before any other thread reads it.
    unsafe { EPOCH = Some(Instant::now()) };
    static CURRENT: std::sync::Mutex<&'static str> = std::sync::Mutex::new("");
    start_watchdog(&CURRENT);
    let targets: [(&'static str, Target); 7] = [
        ("gguf_header", gguf_header),
        ("gguf_model", gguf_model),
        ("safetensors", safetensors_file),
        ("adapter_dir", adapter_dir),
        ("config_json", config_json),
        ("chat_template", chat_template),
        ("jsonl", jsonl_data),
    ];
    let corpus = load_corpus();
    let env = |k: &str| std::env::var(k).ok();
    let base: u64 = env("LOWRANK_FUZZ_SEED").and_then(|s| s.parse().ok()).unwrap_or(1);
    let seconds: f64 = env("LOWRANK_FUZZ_SECONDS").and_then(|s| s.parse().ok()).unwrap_or(6.0);
    let only_target = env("LOWRANK_FUZZ_TARGET");
    let only_case: Option<u64> = env("LOWRANK_FUZZ_CASE").and_then(|s| s.parse().ok());
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let t = *CURRENT.lock().unwrap_or_else(|e| e.into_inner());
        let seed = CASE_SEED.load(Ordering::SeqCst);
        eprintln!("\nfuzz: target {t}: the case with seed {seed} panicked; rerun with LOWRANK_FUZZ_TARGET={t} LOWRANK_FUZZ_CASE={seed}");
        default_hook(info);
    }));
    for (ti, (name, run)) in targets.iter().enumerate() {
        if only_target.as_deref().is_some_and(|t| t != *name) {
            continue;
        }
        *CURRENT.lock().unwrap() = name;
        let started = Instant::now();
        let (mut ok, mut err, mut cases) = (0, 0, 0);
        for i in 0..MAX_CASES {
            if only_case.is_none() && started.elapsed().as_secs_f64() > seconds {
                break;
            }
            let seed = only_case.unwrap_or_else(|| case_seed(base, ti, i));
            // Every 25th case also goes through the CLI (a process per case is slow).
            let cli = only_case.is_some() || i % 25 == 7;
            CASE_SEED.store(seed, Ordering::SeqCst);
            CASE_START_MS.store(now_ms(), Ordering::SeqCst);
            ARMED.store(true, Ordering::SeqCst);
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&corpus, &mut Rng::new(seed), cli)));
            ARMED.store(false, Ordering::SeqCst);
            CASE_START_MS.store(0, Ordering::SeqCst);
            match result {
                Ok(Ok(())) => ok += 1,
                Ok(Err(_)) => err += 1,
                Err(_) => panic!("fuzz target {name}: case seed {seed} panicked (see above)"),
            }
            cases += 1;
            if only_case.is_some() {
                break;
            }
        }
        eprintln!("fuzz {name}: {cases} cases ({ok} ok, {err} clean errors) in {:.1} s", started.elapsed().as_secs_f64());
        assert!(cases > 0);
    }
    let _ = std::fs::remove_dir_all(&corpus.dir);
}
