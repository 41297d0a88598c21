//! Damaged and hostile inputs, one test per class of failure: what used to panic, abort on
//! allocation, hang, destroy a file, accept nonsense or explain itself badly now ends in a clear
//! error (or, where the input is legitimate, in success). Most cases run the real CLI against a
//! tiny GGUF model that carries SmolLM2's tokenizer (`common::TinyGguf`).

mod common;

use common::{fixture, run_cli, tmpdir, TinyGguf};
use lowrank::lora::{LoraAdapter, LoraConfig, TargetModules};
use lowrank::model::gguf::GgufValue;
use lowrank::pretrained::Pretrained;
use std::path::{Path, PathBuf};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs lowrank, expecting failure (exit 1) with every one of `needles` in its message.
fn refuses(args: &[&str], needles: &[&str]) -> String {
    let (code, _, err) = run_cli(args, 60);
    assert_eq!(code, 1, "lowrank {args:?} should fail: {err}");
    for n in needles {
        assert!(err.contains(n), "lowrank {args:?}: expected {n:?} in: {err}");
    }
    err
}

fn tiny_model(dir: &Path) -> PathBuf {
    TinyGguf::get().write(&dir.join("tiny.gguf"))
}

/// A PEFT adapter for the tiny model with `cfg`, written to `dir/name`.
fn adapter(dir: &Path, name: &str, cfg: LoraConfig) -> PathBuf {
    let p = Pretrained::load(&dir.join("tiny.gguf")).unwrap();
    let a = LoraAdapter::new(cfg, &p.model, 3).unwrap();
    let mut a = a;
    // Nonzero B so updates are visible.
    for (i, x) in a.params.iter_mut().enumerate() {
        *x += 0.01 * ((i % 7) as f32 - 3.0);
    }
    let out = dir.join(name);
    lowrank::lora::peft::save(&a, &out).unwrap();
    out
}

fn edit_json(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

fn jsonl(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

const GOOD: &str = "{\"prompt\": \"Q: 2+2?\\nA:\", \"completion\": \" 4\"}\n";

#[test]
fn gguf_headers_that_used_to_panic_or_be_misread_are_errors() {
    let dir = tmpdir("hostile-gguf");
    let base = TinyGguf::get();
    let cases: Vec<(&str, TinyGguf, &str)> = vec![
        ("head_count 0", base.clone().set("llama.attention.head_count", GgufValue::U32(0)).clone(), "llama.attention.head_count is 0"),
        ("key_length 0", base.clone().set("llama.attention.key_length", GgufValue::U32(0)).clone(), "key_length is 0"),
        ("odd head_dim", base.clone().set("llama.attention.key_length", GgufValue::U32(15)).clone(), "must be even"),
        ("block_count 2^62", base.clone().set("llama.block_count", GgufValue::U64(1 << 62)).clone(), "block_count is 4611686018427387904"),
        ("block_count 1e9", base.clone().set("llama.block_count", GgufValue::U64(1_000_000_000)).clone(), "[1, 1024]"),
        (
            "string size",
            base.clone().set("llama.embedding_length", GgufValue::String("64".into())).clone(),
            "must be a non-negative integer",
        ),
        ("no head_count", base.clone().remove("llama.attention.head_count").clone(), "head_count is missing"),
        (
            "duplicate key",
            {
                let mut t = base.clone();
                t.meta.push(("llama.block_count".into(), GgufValue::U32(2)));
                t
            },
            "appears twice",
        ),
        (
            "duplicate tensor",
            {
                let mut t = base.clone();
                let dup = t.tensors[3].clone();
                t.tensors.push(dup);
                t
            },
            "appears twice",
        ),
        (
            "offset wraps",
            {
                let mut t = base.clone();
                t.tensor_mut("token_embd.weight").3 = Some(u64::MAX - 31);
                t
            },
            "extends past the end",
        ),
        (
            "offset wraps to the header",
            {
                let mut t = base.clone();
                // data_start + offset ≡ 64 (mod 2^64): header bytes read as embeddings before.
                let data_start =
                    base.to_bytes().len() as u64 - base.tensors.iter().map(|t| t.4.len().div_ceil(32) as u64 * 32).sum::<u64>();
                t.tensor_mut("token_embd.weight").3 = Some(0u64.wrapping_sub(data_start).wrapping_add(64));
                t
            },
            "extends past the end",
        ),
        (
            "unaligned offset",
            {
                let mut t = base.clone();
                t.tensors[0].3 = Some(4);
                t
            },
            "not a multiple of the alignment",
        ),
        (
            "1-D token_embd without vocab_size",
            {
                let mut t = base.clone();
                t.remove("llama.vocab_size");
                let e = t.tensor_mut("token_embd.weight");
                e.1 = vec![e.1[0] * e.1[1]];
                t
            },
            "expected 2 dimensions",
        ),
        (
            "dims overflow",
            {
                let mut t = base.clone();
                t.tensor_mut("output_norm.weight").1 = vec![1 << 40, 1 << 40];
                t
            },
            "overflow",
        ),
        (
            "unknown type",
            {
                let mut t = base.clone();
                t.tensor_mut("output_norm.weight").2 = 99;
                t
            },
            "unknown GGML type 99",
        ),
        (
            "huge array",
            {
                let mut t = base.clone();
                t.set("tokenizer.ggml.merges", GgufValue::Array(vec![]));
                let mut b = t.to_bytes();
                // Patch the merges array's length (first u64 after its item type) to 2^60.
                let key = b"tokenizer.ggml.merges";
                let at = b.windows(key.len()).position(|w| w == key).unwrap() + key.len() + 4 + 4;
                b[at..at + 8].copy_from_slice(&(1u64 << 60).to_le_bytes());
                let p = dir.join("huge-array.gguf");
                std::fs::write(&p, &b).unwrap();
                let e = format!("{:#}", lowrank::model::gguf::GgufFile::open(&p).err().unwrap());
                assert!(e.contains("array length 1152921504606846976"), "{e}");
                t
            },
            "merges",
        ),
    ];
    for (what, gguf, needle) in cases {
        let path = gguf.write(&dir.join("case.gguf"));
        let e = match Pretrained::load(&path) {
            Ok(_) if what == "huge array" => continue,
            Ok(_) => panic!("{what}: loaded"),
            Err(e) => format!("{e:#}"),
        };
        assert!(e.contains(needle), "{what}: expected {needle:?} in: {e}");
        refuses(&["generate", "--model", s(&path), "--prompt", "hi", "--max-new-tokens", "2"], &[]);
        let (code, _, _) = run_cli(&["inspect", s(&path)], 30);
        assert!(code == 0 || code == 1, "{what}: inspect exited {code}");
    }
    // The intact tiny model loads and generates.
    let good = tiny_model(&dir);
    let (code, _, err) = run_cli(&["generate", "--model", s(&good), "--prompt", "hi", "--max-new-tokens", "3"], 60);
    assert_eq!(code, 0, "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn config_json_and_safetensors_are_checked_before_allocating() {
    let dir = tmpdir("hostile-hf");
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("tiny-llama/model").join(f), model.join(f)).unwrap();
    }
    let original = std::fs::read_to_string(model.join("config.json")).unwrap();
    for (key, value, needle) in [
        ("num_attention_heads", serde_json::json!(0), "\"num_attention_heads\" is 0"),
        ("num_hidden_layers", serde_json::json!(1u64 << 63), "[1, 1024]"),
        ("num_hidden_layers", serde_json::json!(1_000_000_000), "[1, 1024]"),
        ("hidden_size", serde_json::json!("64"), "\"hidden_size\" must be a non-negative integer"),
        ("rms_norm_eps", serde_json::json!(-1.0), "rms_norm_eps must be a positive number"),
        ("num_key_value_heads", serde_json::json!(3), "must be a multiple"),
    ] {
        std::fs::write(model.join("config.json"), &original).unwrap();
        edit_json(&model.join("config.json"), |v| v[key] = value.clone());
        let e = format!("{:#}", lowrank::DecoderModel::from_hf_dir(&model).err().unwrap());
        assert!(e.contains(needle), "{key}={value}: expected {needle:?} in: {e}");
        let (code, _, _) = run_cli(&["inspect", s(&model)], 30);
        assert_eq!(code, 1);
    }
    // A truncated safetensors file says so and names the tensor that is cut.
    std::fs::write(model.join("config.json"), &original).unwrap();
    let bytes = std::fs::read(model.join("model.safetensors")).unwrap();
    std::fs::write(model.join("model.safetensors"), &bytes[..bytes.len() - 1000]).unwrap();
    let e = format!("{:#}", lowrank::DecoderModel::from_hf_dir(&model).err().unwrap());
    assert!(e.contains("truncated") && e.contains("tensor model."), "{e}");
    std::fs::write(model.join("model.safetensors"), &bytes[..100]).unwrap();
    let e = format!("{:#}", lowrank::DecoderModel::from_hf_dir(&model).err().unwrap());
    assert!(e.contains("truncated"), "{e}");
    // A shard index may not point outside the model directory.
    std::fs::remove_file(model.join("model.safetensors")).unwrap();
    std::fs::write(model.join("model.safetensors.index.json"), r#"{"weight_map": {"x": "../../etc/passwd"}}"#).unwrap();
    let e = format!("{:#}", lowrank::DecoderModel::from_hf_dir(&model).err().unwrap());
    assert!(e.contains("not a file inside the model directory"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn adapter_configs_are_type_checked_and_ranks_bounded() {
    let dir = tmpdir("hostile-adapter");
    let model = tiny_model(&dir);
    let qv = LoraConfig { r: 4, lora_alpha: 8.0, ..Default::default() };
    let good = adapter(&dir, "good", qv.clone());
    let config = good.join("adapter_config.json");
    let original = std::fs::read_to_string(&config).unwrap();
    for (key, value, needle) in [
        ("r", serde_json::json!(1_000_000_000), "exceeds the module's dimensions"),
        ("r", serde_json::json!(0), "\"r\" must be an integer >= 1"),
        ("r", serde_json::json!("8"), "\"r\" must be an integer >= 1"),
        ("lora_alpha", serde_json::json!(1e39), "lora_alpha must be a finite number"),
        ("lora_alpha", serde_json::json!("16"), "\"lora_alpha\" must be a number"),
        ("use_rslora", serde_json::json!("yes"), "\"use_rslora\" must be true or false"),
        ("lora_dropout", serde_json::json!(2.0), "lora_dropout must be in [0, 1)"),
        ("rank_pattern", serde_json::json!({"q_proj": 2.5}), "rank_pattern[\"q_proj\"] must be an integer >= 1"),
        ("rank_pattern", serde_json::json!({"q_proj": 100000}), "exceeds the module's dimensions"),
        ("alpha_pattern", serde_json::json!({"q_proj": "x"}), "alpha_pattern[\"q_proj\"] must be a number"),
    ] {
        std::fs::write(&config, &original).unwrap();
        edit_json(&config, |v| v[key] = value.clone());
        let p = Pretrained::load(&model).unwrap();
        let e = format!("{:#}", lowrank::lora::peft::load(&good, &p.model).err().unwrap());
        assert!(e.contains(needle), "{key}={value}: expected {needle:?} in: {e}");
    }
    // Non-finite weights are refused by module name.
    let p = Pretrained::load(&model).unwrap();
    let mut nan = LoraAdapter::new(qv.clone(), &p.model, 1).unwrap();
    nan.params[5] = f32::NAN;
    lowrank::lora::peft::save(&nan, &dir.join("nan")).unwrap();
    let e = format!("{:#}", lowrank::lora::peft::load(&dir.join("nan"), &p.model).err().unwrap());
    assert!(e.contains("model.layers.0.self_attn.q_proj holds a non-finite weight"), "{e}");
    // r = 1e9 through every command that reads adapters, and through train.
    std::fs::write(&config, &original).unwrap();
    edit_json(&config, |v| v["r"] = serde_json::json!(1_000_000_000));
    let out = dir.join("out");
    refuses(&["generate", "--model", s(&model), "--adapter", s(&good), "--prompt", "hi"], &["exceeds the module's dimensions"]);
    refuses(&["merge", "--model", s(&model), "--adapter", s(&good), "--output", s(&out)], &["exceeds the module's dimensions"]);
    refuses(&["export-gguf", "--model", s(&model), "--adapter", s(&good), "--output", s(&dir.join("a.gguf"))], &["exceeds"]);
    let data = jsonl(&dir, "d.jsonl", GOOD);
    refuses(
        &["train", "--model", s(&model), "--data", s(&data), "--output", s(&out), "--rank", "1000000000"],
        &["rank must be in [1, 65536]"],
    );
    refuses(
        &["train", "--model", s(&model), "--data", s(&data), "--output", s(&out), "--rank", "1000"],
        &["exceeds the module's dimensions"],
    );
    // A GGUF adapter loads like its PEFT directory; a GGUF model given as an adapter is named as such.
    std::fs::write(&config, &original).unwrap();
    let gguf_adapter = dir.join("adapter.gguf");
    let (code, _, err) = run_cli(&["export-gguf", "--model", s(&model), "--adapter", s(&good), "--output", s(&gguf_adapter)], 60);
    assert_eq!(code, 0, "{err}");
    let generate_with = |adapter: &Path| {
        run_cli(&["generate", "--model", s(&model), "--adapter", s(adapter), "--prompt", "hi", "--max-new-tokens", "4"], 60)
    };
    let (from_dir, from_gguf) = (generate_with(&good), generate_with(&gguf_adapter));
    assert_eq!(from_dir.0, 0, "{}", from_dir.2);
    assert_eq!(from_gguf, from_dir);
    let not_adapter = dir.join("model.gguf");
    TinyGguf::get().write(&not_adapter);
    refuses(&["generate", "--model", s(&model), "--adapter", s(&not_adapter), "--prompt", "hi"], &["not a GGUF adapter"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `combine` of an adapter whose rank_pattern gives a module a rank above r used to index past
/// the combined B; now the module gets its own rank and the update is exact.
#[test]
fn combine_cat_handles_rank_patterns_above_r() {
    let dir = tmpdir("hostile-combine");
    let model = tiny_model(&dir);
    let a = adapter(&dir, "a", LoraConfig { r: 2, lora_alpha: 4.0, rank_pattern: vec![("q_proj".into(), 6)], ..Default::default() });
    let b = adapter(
        &dir,
        "b",
        LoraConfig { r: 2, lora_alpha: 2.0, target_modules: TargetModules::parse("q_proj,k_proj"), ..Default::default() },
    );
    let out = dir.join("ab");
    let (code, _, err) = run_cli(
        &[
            "combine",
            "--model",
            s(&model),
            "--adapter",
            &format!("{}@0.5", s(&a)),
            "--adapter",
            &format!("{}@2", s(&b)),
            "--output",
            s(&out),
        ],
        60,
    );
    assert_eq!(code, 0, "{err}");
    let p = Pretrained::load(&model).unwrap();
    let load = |d: &Path| lowrank::lora::peft::load(d, &p.model).unwrap();
    let (a, b, ab) = (load(&a), load(&b), load(&out));
    let delta = |ad: &LoraAdapter, name: &str| -> Vec<f32> {
        let Some(m) = ad.modules.iter().find(|m| m.name == name) else { return vec![] };
        let mut d = vec![0.0; m.out_features * m.in_features];
        lowrank::kernels::matmul(&mut d, ad.b(m), false, ad.a(m), false, m.out_features, m.in_features, m.r, m.scale, false);
        d
    };
    for m in &ab.modules {
        let got = delta(&ab, &m.name);
        let (da, db) = (delta(&a, &m.name), delta(&b, &m.name));
        for (i, g) in got.iter().enumerate() {
            let want = 0.5 * da.get(i).copied().unwrap_or(0.0) + 2.0 * db.get(i).copied().unwrap_or(0.0);
            assert!((g - want).abs() < 1e-5, "{}: {g} vs {want}", m.name);
        }
    }
    let q0 = ab.modules.iter().find(|m| m.name == "model.layers.0.self_attn.q_proj").unwrap();
    assert_eq!(q0.r, 8);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn numbers_from_the_command_line_are_range_checked() {
    let dir = tmpdir("hostile-numbers");
    let model = tiny_model(&dir);
    let good = adapter(&dir, "good", LoraConfig { r: 4, lora_alpha: 8.0, ..Default::default() });
    let data = jsonl(&dir, "d.jsonl", GOOD);
    let out = dir.join("out");
    let train = |extra: &[&str], needles: &[&str]| {
        let mut a = vec!["train", "--model", s(&model), "--data", s(&data), "--output", s(&out), "--max-steps", "1"];
        a.extend_from_slice(extra);
        refuses(&a, needles);
    };
    train(&["--lr", "-1"], &["lr must be a positive number, got -1"]);
    train(&["--weight-decay", "nan"], &["weight-decay must be a number >= 0, got NaN"]);
    train(&["--weight-decay", "-0.1"], &["weight-decay must be a number >= 0"]);
    train(&["--max-grad-norm", "inf"], &["max-grad-norm"]);
    train(&["--epochs", "inf"], &["epochs must be in (0, 1000000]"]);
    train(&["--epochs", "nan"], &["epochs must be in (0, 1000000], got NaN"]);
    train(&["--threads", "1000000"], &["threads (0 = all cores) must be in [0, 1024]"]);
    train(&["--grad-accum", "100000000"], &["grad-accum must be in [1, 1048576]"]);
    train(&["--dropout", "1"], &["dropout must be in [0, 1)"]);
    train(&["--seq-len", "100000"], &["seq-len 100000 exceeds the model's context of 1024"]);
    let generate = |extra: &[&str], needles: &[&str]| {
        let mut a = vec!["generate", "--model", s(&model), "--prompt", "hi", "--max-new-tokens", "2"];
        a.extend_from_slice(extra);
        refuses(&a, needles);
    };
    generate(&["--temperature", "nan"], &["temperature must be a number >= 0, got NaN"]);
    generate(&["--temperature", "-1"], &["temperature must be a number >= 0, got -1"]);
    generate(&["--top-p", "2"], &["top-p must be in (0, 1], got 2"]);
    generate(&["--repetition-penalty", "-1"], &["repetition-penalty must be a positive number"]);
    generate(&["--adapter", &format!("a={}@nan", s(&good))], &["the weight must be in [-1000000, 1000000], got NaN"]);
    refuses(
        &["generate", "--model", s(&model), "--prompt", "hi", "--max-new-tokens", "100000"],
        &["max-new-tokens must be in [1, 1024], got 100000"],
    );
    generate(&["--stop", ""], &["a stop string must not be empty"]);
    generate(&["--merged"], &["--merged needs an --adapter"]);
    generate(&["--adapter", &format!("none={}", s(&good))], &["adapter name \"none\" is not usable"]);
    generate(&["--adapter", &format!("a b={}", s(&good))], &["adapter name \"a b\" is not usable"]);
    refuses(&["merge", "--model", s(&model), "--adapter", s(&good), "--output", s(&out), "--scale", "nan"], &["--scale must be in"]);
    refuses(&["bench", "train", "--model", s(&model), "--corpus", s(&data), "--seq", "0"], &["--seq must be in [2, 1024], got 0"]);
    refuses(&["bench", "decode", "--model", s(&model), "--prefill", "100000"], &["--prefill must be in [1, 1024]"]);
    refuses(&["bench", "gemm", "--n", "0"], &["--n must be in"]);
    // A 2^32-position context no longer makes a 2^32-position KV cache possible without memory.
    let huge = TinyGguf::get().set("llama.context_length", GgufValue::U64(1 << 32)).write(&dir.join("huge-context.gguf"));
    refuses(
        &["generate", "--model", s(&huge), "--prompt", "hi", "--max-new-tokens", "4294967000"],
        &["KV cache", "needs", "of memory is available"],
    );
    assert!(!out.exists(), "no failed run created the output directory");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn non_regular_inputs_are_refused_and_link_loops_not_followed() {
    let dir = tmpdir("hostile-fifo");
    let model = tiny_model(&dir);
    let fifo = dir.join("fifo");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let out = dir.join("out");
    refuses(&["train", "--model", s(&model), "--data", s(&fifo), "--output", s(&out)], &["is a FIFO, not a regular file"]);
    refuses(&["generate", "--model", s(&fifo), "--prompt", "hi"], &["is a FIFO"]);
    refuses(&["inspect", s(&fifo)], &["not a regular file"]);
    refuses(&["train", "--config", s(&fifo)], &["is a FIFO"]);
    let sub = dir.join("sub");
    std::fs::create_dir_all(&sub).unwrap();
    refuses(&["train", "--model", s(&model), "--data", s(&sub), "--output", s(&out)], &["is a directory, not a regular file"]);
    // A model directory holding a symbolic link loop: inspect walks it without following links.
    let hf = dir.join("hf");
    std::fs::create_dir_all(&hf).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("tiny-llama/model").join(f), hf.join(f)).unwrap();
    }
    std::os::unix::fs::symlink(&hf, hf.join("loop")).unwrap();
    std::os::unix::fs::symlink(hf.join("a"), hf.join("b")).unwrap();
    std::os::unix::fs::symlink(hf.join("b"), hf.join("a")).unwrap();
    let (code, stdout, err) = run_cli(&["inspect", s(&hf)], 30);
    assert!(code == 0 && stdout.contains("Hugging Face model"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn tree(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(tree(&p));
        } else {
            out.push((p.display().to_string(), std::fs::read(&p).unwrap()));
        }
    }
    out.sort();
    out
}

#[test]
fn writes_never_destroy_inputs_or_other_files() {
    let dir = tmpdir("hostile-writes");
    let model = tiny_model(&dir);
    let good = adapter(&dir, "good", LoraConfig { r: 4, lora_alpha: 8.0, ..Default::default() });
    // An HF directory of the model, then merge told to write over it.
    let hf = dir.join("hf");
    let (code, _, err) = run_cli(&["merge", "--model", s(&model), "--adapter", s(&good), "--output", s(&hf)], 60);
    assert_eq!(code, 0, "{err}");
    let before = tree(&hf);
    refuses(&["merge", "--model", s(&hf), "--adapter", s(&good), "--output", s(&hf)], &["is the input"]);
    refuses(&["merge", "--model", s(&hf), "--adapter", s(&good), "--output", s(&hf.join("sub"))], &["lies inside the input"]);
    refuses(&["merge", "--model", s(&hf), "--adapter", s(&good), "--output", s(&dir), "--overwrite"], &["contains the input"]);
    assert_eq!(tree(&hf), before, "the base model directory changed");
    // Merging into a non-empty directory: refused; with --overwrite nothing stale survives.
    let merged = dir.join("merged");
    std::fs::create_dir_all(&merged).unwrap();
    std::fs::write(merged.join("model.safetensors.index.json"), "{\"weight_map\": {}}").unwrap();
    std::fs::write(merged.join("stale.txt"), "old").unwrap();
    refuses(&["merge", "--model", s(&model), "--adapter", s(&good), "--output", s(&merged)], &["already holds files", "--overwrite"]);
    assert!(merged.join("stale.txt").exists());
    let (code, _, err) = run_cli(&["merge", "--model", s(&model), "--adapter", s(&good), "--output", s(&merged), "--overwrite"], 60);
    assert_eq!(code, 0, "{err}");
    assert!(!merged.join("stale.txt").exists() && !merged.join("model.safetensors.index.json").exists());
    assert!(Pretrained::load(&merged).is_ok());
    // export-gguf onto a symbolic link, a FIFO or an existing file.
    let target = dir.join("target.txt");
    std::fs::write(&target, "keep").unwrap();
    let link = dir.join("link.gguf");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let export = |o: &Path, extra: &[&str]| {
        let mut a = vec!["export-gguf", "--model", s(&model), "--adapter", s(&good), "--output", s(o)];
        a.extend_from_slice(extra);
        a.iter().map(|x| x.to_string()).collect::<Vec<_>>()
    };
    let args = export(&link, &["--overwrite"]);
    refuses(&args.iter().map(String::as_str).collect::<Vec<_>>(), &["symbolic link"]);
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
    let fifo = dir.join("fifo.gguf");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let args = export(&fifo, &["--overwrite"]);
    refuses(&args.iter().map(String::as_str).collect::<Vec<_>>(), &["FIFO"]);
    let args = export(&target, &[]);
    refuses(&args.iter().map(String::as_str).collect::<Vec<_>>(), &["already exists", "--overwrite"]);
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
    // train into a directory that holds an earlier run: refused, and nothing there changes; with
    // --overwrite but bad data the old run's files stay as they were too.
    let data = jsonl(&dir, "d.jsonl", GOOD);
    let run = dir.join("run");
    let train = |extra: &[&str]| {
        let mut a = vec!["train", "--model", s(&model), "--data", s(&data), "--output", s(&run), "--max-steps", "2", "--save-every", "1"];
        a.extend_from_slice(extra);
        a.iter().map(|x| x.to_string()).collect::<Vec<_>>()
    };
    let (code, _, err) = run_cli(&train(&[]).iter().map(String::as_str).collect::<Vec<_>>(), 120);
    assert_eq!(code, 0, "{err}");
    let first = tree(&run);
    refuses(&train(&[]).iter().map(String::as_str).collect::<Vec<_>>(), &["already holds files", "--overwrite"]);
    let bad = jsonl(&dir, "bad.jsonl", "{\"text\": 3}\n");
    let mut args = train(&["--overwrite"]);
    let i = args.iter().position(|a| a == s(&data)).unwrap();
    args[i] = s(&bad).to_string();
    refuses(&args.iter().map(String::as_str).collect::<Vec<_>>(), &["bad.jsonl:1:"]);
    assert_eq!(tree(&run), first, "a failed run changed the output directory");
    // With --overwrite a new run replaces the old one entirely (no old checkpoint is kept).
    let (code, _, err) = run_cli(&train(&["--overwrite", "--keep-checkpoints", "1"]).iter().map(String::as_str).collect::<Vec<_>>(), 120);
    assert_eq!(code, 0, "{err}");
    let ckpts: Vec<String> =
        std::fs::read_dir(run.join("checkpoints")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(ckpts, vec!["step-2".to_string()]);
    // A link inside the output directory to the model is the model: --overwrite must not clear it.
    let linked = dir.join("linked");
    std::fs::create_dir_all(&linked).unwrap();
    std::os::unix::fs::symlink(&model, linked.join("m.gguf")).unwrap();
    let m_link = linked.join("m.gguf");
    refuses(
        &["train", "--model", s(&m_link), "--data", s(&data), "--output", s(&linked), "--overwrite", "--max-steps", "1"],
        &["contains the input"],
    );
    assert!(std::fs::symlink_metadata(&m_link).is_ok(), "the link to the model was removed");
    refuses(&["merge", "--model", s(&m_link), "--adapter", s(&good), "--output", s(&linked), "--overwrite"], &["contains the input"]);
    // An output inside the checkpoint a run resumes from.
    let ckpt = run.join("checkpoints/step-2");
    let mut args = train(&["--resume", s(&ckpt)]);
    let i = args.iter().position(|a| a == s(&run)).unwrap();
    args[i] = s(&ckpt.join("sub")).to_string();
    refuses(&args.iter().map(String::as_str).collect::<Vec<_>>(), &["lies inside the input"]);
    // A damaged optimizer state (NaN first moments) is refused on resume, naming the tensor.
    let broken = dir.join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    for f in std::fs::read_dir(&ckpt).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, broken.join(f.file_name().unwrap())).unwrap();
    }
    let opt = lowrank::model::TensorStore::open_files(&[broken.join("optimizer.safetensors")]).unwrap();
    let (m, shape) = opt.f32_any("exp_avg").unwrap();
    let (v, _) = opt.f32_any("exp_avg_sq").unwrap();
    let mut t = std::collections::BTreeMap::new();
    t.insert("exp_avg".to_string(), (shape.clone(), vec![f32::NAN; m.len()]));
    t.insert("exp_avg_sq".to_string(), (shape, v));
    let meta = [("step", "2"), ("beta1", "0.9"), ("beta2", "0.999"), ("eps", "0.00000001"), ("weight_decay", "0")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    std::fs::write(broken.join("optimizer.safetensors"), lowrank::model::weights::serialize_f32(&t, Some(meta)).unwrap()).unwrap();
    let args = train(&["--resume", s(&broken)]);
    refuses(&args.iter().map(String::as_str).collect::<Vec<_>>(), &["exp_avg[0] is NaN"]);
    // An adapter whose update overflows f32 is refused by merge, naming the module.
    let p = Pretrained::load(&model).unwrap();
    let mut big = LoraAdapter::new(LoraConfig { r: 4, lora_alpha: 8.0, ..Default::default() }, &p.model, 1).unwrap();
    big.params.iter_mut().for_each(|x| *x = 1e38);
    lowrank::lora::peft::save(&big, &dir.join("big")).unwrap();
    refuses(
        &["merge", "--model", s(&model), "--adapter", s(&dir.join("big")), "--output", s(&dir.join("big-merged"))],
        &["model.layers.0.self_attn.q_proj gives a non-finite weight"],
    );
    // Resuming with another setting names it.
    let mut args = train(&["--resume", s(&run.join("checkpoints/step-2")), "--lr", "0.5"]);
    let i = args.iter().position(|a| a == "2").unwrap();
    args[i] = "3".into();
    refuses(&args.iter().map(String::as_str).collect::<Vec<_>>(), &["lr: checkpoint 0.0002, this run 0.5"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn data_files_with_a_bom_or_one_huge_line_train() {
    let dir = tmpdir("hostile-data");
    let model = tiny_model(&dir);
    let bom = jsonl(&dir, "bom.jsonl", &format!("\u{FEFF}{GOOD}{GOOD}"));
    let (code, _, err) =
        run_cli(&["train", "--model", s(&model), "--data", s(&bom), "--output", s(&dir.join("o1")), "--max-steps", "1"], 60);
    assert_eq!(code, 0, "{err}");
    // One 50 MB line: only what --seq-len keeps is tokenized; the example counts as truncated.
    let huge = dir.join("huge.jsonl");
    let text = "lorem ipsum dolor sit amet ".repeat(2_000_000);
    std::fs::write(&huge, format!("{{\"text\": \"{text}\"}}\n{GOOD}")).unwrap();
    let (code, _, err) = run_cli(
        &["train", "--model", s(&model), "--data", s(&huge), "--output", s(&dir.join("o2")), "--max-steps", "1", "--seq-len", "32"],
        60,
    );
    assert!(code == 0 && err.contains("(1 truncated to 32 tokens"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn hostile_chat_templates_end_with_an_error_naming_their_source() {
    let dir = tmpdir("hostile-template");
    for (template, needle) in [
        ("{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}{% endfor %}{% endfor %}", "execution budget"),
        (
            "{% set ns = namespace(s='xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx') %}{% for i in range(22) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{% for i in range(1000) %}{{ ns.s }}{% endfor %}",
            "output exceeds",
        ),
        ("{% for m in messages %}{{ m.content | nosuchfilter }}{% endfor %}", "nosuchfilter"),
    ] {
        let path = TinyGguf::get().set("tokenizer.chat_template", GgufValue::String(template.into())).write(&dir.join("t.gguf"));
        refuses(&["generate", "--model", s(&path), "--chat", "--prompt", "hi"], &["the chat template of", "t.gguf", needle]);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
