//! Using adapters: merge/unmerge, switching among several, PEFT's add_weighted_adapter, llama.cpp
//! GGUF adapter export, merged Hugging Face export, sampling determinism and the chat CLI.

mod common;

use common::{fixture, max_abs_diff, smollm2, tmpdir};
use lowrank::infer::{generate, GenerateParams, SamplingParams};
use lowrank::lora::combine::{add_weighted, merge, unmerge, AdapterSet, Combination};
use lowrank::lora::{self, LoraAdapter};
use lowrank::model::adapt::{ModuleKind, NoAdapter};
use lowrank::model::gguf::{unpermute_rows, GgufFile};
use lowrank::{Batch, DecoderModel};
use std::io::Write;
use std::process::{Command, Stdio};

fn llama() -> (DecoderModel, LoraAdapter) {
    let model = DecoderModel::from_hf_dir(&fixture("tiny-llama/model")).unwrap();
    let adapter = lora::peft::load(&fixture("tiny-llama/peft_adapter"), &model).unwrap();
    (model, adapter)
}

fn batch() -> Batch {
    Batch::right_padded(&[vec![5, 17, 99, 3, 250, 31, 8], vec![44, 2, 19]], 0).unwrap()
}

/// A second adapter with the same structure and different weights.
fn other(a: &LoraAdapter) -> LoraAdapter {
    let mut b = a.clone();
    for (i, p) in b.params.iter_mut().enumerate() {
        *p = 0.7 * *p + 0.02 * ((i * 37 % 11) as f32 - 5.0);
    }
    b
}

#[test]
fn merged_logits_equal_unmerged_and_unmerge_restores_the_weights() {
    let (mut model, adapter) = llama();
    let before: Vec<Vec<f32>> = model.layers.iter().flat_map(|l| l.linear.iter().map(|x| x.w.to_f32())).collect();
    let unmerged = model.forward(&batch(), &adapter).unwrap();
    merge(&mut model, &adapter, 1.0).unwrap();
    let merged = model.forward(&batch(), &NoAdapter).unwrap();
    let err = max_abs_diff(&merged, &unmerged);
    assert!(err <= 1e-4, "merged vs unmerged logits: {err}");
    unmerge(&mut model, &adapter, 1.0).unwrap();
    let after: Vec<Vec<f32>> = model.layers.iter().flat_map(|l| l.linear.iter().map(|x| x.w.to_f32())).collect();
    let worst = before.iter().zip(&after).map(|(a, b)| max_abs_diff(a, b)).fold(0.0, f32::max);
    // Bound: a few ulps of weights of magnitude < 0.5.
    assert!(worst <= 1e-6, "unmerge left a weight off by {worst}");
}

#[test]
fn a_merge_that_fails_part_way_leaves_the_weights_as_they_were() {
    let (mut model, mut adapter) = llama();
    let before: Vec<Vec<f32>> = model.layers.iter().flat_map(|l| l.linear.iter().map(|x| x.w.to_f32())).collect();
    // The last module's B is so large that its merged weights overflow; the others merge first.
    let last = adapter.modules.last().unwrap().clone();
    let off = last.offset + last.a_len();
    adapter.params[off..off + last.b_len()].fill(1e38);
    let e = merge(&mut model, &adapter, 1.0).unwrap_err().to_string();
    assert!(e.contains(&last.name) && e.contains("non-finite"), "{e}");
    let after: Vec<Vec<f32>> = model.layers.iter().flat_map(|l| l.linear.iter().map(|x| x.w.to_f32())).collect();
    let worst = before.iter().zip(&after).map(|(a, b)| max_abs_diff(a, b)).fold(0.0, f32::max);
    assert!(worst <= 1e-6, "the failed merge left a weight off by {worst}");
}

#[test]
fn switching_among_adapters_with_scales() {
    let (model, a) = llama();
    let b = other(&a);
    let mut set = AdapterSet::default();
    set.add("a", a.clone(), 1.0).unwrap();
    set.add("b", b.clone(), 0.5).unwrap();
    assert!(set.add("a", a.clone(), 1.0).is_err());
    assert_eq!(set.active_name(), Some("a"));
    assert_eq!(model.forward(&batch(), &set).unwrap(), model.forward(&batch(), &a).unwrap());
    set.activate(Some("b")).unwrap();
    let mut half = b.clone();
    for m in &half.modules.clone() {
        let off = m.offset + m.a_len();
        half.params[off..off + m.b_len()].iter_mut().for_each(|x| *x *= 0.5);
    }
    assert!(max_abs_diff(&model.forward(&batch(), &set).unwrap(), &model.forward(&batch(), &half).unwrap()) < 1e-6);
    set.activate(None).unwrap();
    assert_eq!(model.forward(&batch(), &set).unwrap(), model.forward(&batch(), &NoAdapter).unwrap());
    assert!(set.activate(Some("c")).unwrap_err().to_string().contains("a, b"));
}

#[test]
fn weighted_combinations_follow_peft() {
    let (model, a) = llama();
    let b = other(&a);
    // cat: the update is exactly the weighted sum of the updates.
    let cat = add_weighted(&model, &[(&a, 0.7), (&b, -0.4)], Combination::Cat).unwrap();
    assert_eq!(cat.config.r, 8);
    assert_eq!(cat.config.lora_alpha, 8.0);
    let (mut m1, mut m2) = (llama().0, llama().0);
    merge(&mut m1, &cat, 1.0).unwrap();
    merge(&mut m2, &a, 0.7).unwrap();
    merge(&mut m2, &b, -0.4).unwrap();
    for (l1, l2) in m1.layers.iter().zip(&m2.layers) {
        for (x, y) in l1.linear.iter().zip(&l2.linear) {
            assert!(max_abs_diff(&x.w.to_f32(), &y.w.to_f32()) < 1e-6);
        }
    }
    // linear: A = Σ sign·√|w s| Aᵢ, B = Σ √|w s| Bᵢ, on every module (rank_pattern gives down_proj r=2,
    // so the fixture's adapters of mixed ranks are refused).
    let e = add_weighted(&model, &[(&a, 0.7), (&b, 0.3)], Combination::Linear).unwrap_err().to_string();
    assert!(e.contains("one rank"), "{e}");
    let cfg = lowrank::LoraConfig { r: 4, lora_alpha: 8.0, ..Default::default() };
    let mut c = LoraAdapter::new(cfg.clone(), &model, 1).unwrap();
    let mut d = LoraAdapter::new(cfg, &model, 2).unwrap();
    c.params.iter_mut().enumerate().for_each(|(i, p)| *p += 0.01 * (i % 5) as f32);
    d.params.iter_mut().enumerate().for_each(|(i, p)| *p -= 0.02 * (i % 3) as f32);
    let lin = add_weighted(&model, &[(&c, 0.5), (&d, -2.0)], Combination::Linear).unwrap();
    let m = lin.module(1, ModuleKind::V).unwrap();
    let (mc, md) = (c.module(1, ModuleKind::V).unwrap(), d.module(1, ModuleKind::V).unwrap());
    let (wc, wd) = (0.5f32 * mc.scale, -2.0f32 * md.scale);
    let want_a: Vec<f32> = c.a(mc).iter().zip(d.a(md)).map(|(x, y)| wc.sqrt() * x - wd.abs().sqrt() * y).collect();
    let want_b: Vec<f32> = c.b(mc).iter().zip(d.b(md)).map(|(x, y)| wc.sqrt() * x + wd.abs().sqrt() * y).collect();
    assert!(max_abs_diff(lin.a(m), &want_a) < 1e-6 && max_abs_diff(lin.b(m), &want_b) < 1e-6);
    assert_eq!(m.scale, 1.0);
}

#[test]
fn gguf_adapter_export_has_llama_cpp_names_shapes_alpha_and_the_exact_update() {
    // The qwen2 fixture uses rsLoRA (scale alpha/√r), which GGUF's alpha/r cannot say directly.
    for name in ["tiny-llama", "tiny-qwen2"] {
        let model = DecoderModel::from_hf_dir(&fixture(&format!("{name}/model"))).unwrap();
        let adapter = lora::peft::load(&fixture(&format!("{name}/peft_adapter")), &model).unwrap();
        let dir = tmpdir(&format!("gguf-{name}"));
        let path = dir.join("a.gguf");
        std::fs::write(&path, lora::gguf::to_gguf(&adapter, &model.config).unwrap()).unwrap();
        let g = GgufFile::open(&path).unwrap();
        assert_eq!(g.get_str("general.type"), Some("adapter"));
        assert_eq!(g.get_str("adapter.type"), Some("lora"));
        assert_eq!(g.get_str("general.architecture"), Some(if name == "tiny-llama" { "llama" } else { "qwen2" }));
        let alpha = g.get_f64("adapter.lora.alpha").unwrap() as f32;
        assert_eq!(alpha, adapter.config.lora_alpha);
        assert_eq!(g.tensors.len(), 2 * adapter.modules.len());
        for m in &adapter.modules {
            let base = lowrank::model::gguf::hf_to_gguf_name(&format!("{}.weight", m.name)).unwrap();
            let (a, sa) = g.tensor_f32(&format!("{base}.lora_a")).unwrap();
            let (mut b, sb) = g.tensor_f32(&format!("{base}.lora_b")).unwrap();
            assert_eq!((sa, sb.clone()), (vec![m.r, m.in_features], vec![m.out_features, m.r]), "{base}");
            let heads = match m.kind {
                ModuleKind::Q => model.config.num_heads,
                ModuleKind::K => model.config.num_kv_heads,
                _ => 0,
            };
            if heads > 0 && name == "tiny-llama" {
                b = unpermute_rows(&b, heads, m.out_features, m.r);
            }
            // llama.cpp's update alpha/r · B·A equals PEFT's scale · B·A.
            let k = alpha / m.r as f32;
            let got: Vec<f32> = b.iter().map(|x| x * k).collect();
            let want: Vec<f32> = adapter.b(m).iter().map(|x| x * m.scale).collect();
            assert!(max_abs_diff(&got, &want) < 1e-6 && a == adapter.a(m), "{base}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// A GGUF adapter reads back (as llama.cpp applies it: alpha/r, q/k rows un-permuted) to the
/// update of the PEFT adapter it was written from, mixed ranks and alpha_pattern included.
#[test]
fn gguf_adapters_load_back_to_the_same_logits() {
    for name in ["tiny-llama", "tiny-qwen2"] {
        let model = DecoderModel::from_hf_dir(&fixture(&format!("{name}/model"))).unwrap();
        let peft = lora::peft::load(&fixture(&format!("{name}/peft_adapter")), &model).unwrap();
        let dir = tmpdir(&format!("gguf-load-{name}"));
        let path = dir.join("a.gguf");
        std::fs::write(&path, lora::gguf::to_gguf(&peft, &model.config).unwrap()).unwrap();
        let back = lora::load(&path, &model).unwrap();
        assert_eq!(back.modules.len(), peft.modules.len());
        for (m, n) in back.modules.iter().zip(&peft.modules) {
            assert_eq!((&m.name, m.r), (&n.name, n.r));
        }
        let (want, got) = (model.forward(&batch(), &peft).unwrap(), model.forward(&batch(), &back).unwrap());
        let base = model.forward(&batch(), &NoAdapter).unwrap();
        assert!(max_abs_diff(&want, &base) > 1e-3, "{name}: the adapter changes the logits");
        assert!(max_abs_diff(&got, &want) <= 1e-5, "{name}: {}", max_abs_diff(&got, &want));
        // Under a name in a registry, like a PEFT directory.
        let mut set = AdapterSet::default();
        set.load(&lora::combine::AdapterSpec::parse(&format!("g={}", path.display())).unwrap(), &model).unwrap();
        assert!(max_abs_diff(&model.forward(&batch(), &set).unwrap(), &want) <= 1e-5);
        std::fs::remove_dir_all(&dir).unwrap();
    }
    // What is not an adapter for this base is refused, naming why.
    let (llama_model, _) = llama();
    let e = lora::load(smollm2(), &llama_model).unwrap_err().to_string();
    assert!(e.contains("general.type is \"model\"") || e.contains("not a GGUF adapter"), "{e}");
    let qwen = DecoderModel::from_hf_dir(&fixture("tiny-qwen2/model")).unwrap();
    let q = lora::peft::load(&fixture("tiny-qwen2/peft_adapter"), &qwen).unwrap();
    let dir = tmpdir("gguf-load-wrong");
    std::fs::write(dir.join("q.gguf"), lora::gguf::to_gguf(&q, &qwen.config).unwrap()).unwrap();
    let e = lora::load(&dir.join("q.gguf"), &llama_model).unwrap_err().to_string();
    assert!(e.contains("architecture \"qwen2\"") && e.contains("\"llama\""), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn merged_hf_export_reloads_to_the_merged_logits() {
    let (mut model, adapter) = llama();
    let want = model.forward(&batch(), &adapter).unwrap();
    merge(&mut model, &adapter, 1.0).unwrap();
    let dir = tmpdir("export");
    lowrank::model::export::save_model_files(&model, &dir).unwrap();
    let back = DecoderModel::from_hf_dir(&dir).unwrap();
    assert!(max_abs_diff(&back.forward(&batch(), &NoAdapter).unwrap(), &want) <= 1e-4);
    assert!(dir.join("model.safetensors").metadata().unwrap().len() > 0);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn merge_cli_turns_the_gguf_base_into_an_hf_directory_with_tokenizer() {
    let dir = tmpdir("merge-cli");
    let p = common::smollm2_model();
    let adapter = LoraAdapter::new(lowrank::LoraConfig::default(), &p.model, 3).unwrap();
    let mut adapter = adapter;
    adapter.params.iter_mut().enumerate().for_each(|(i, x)| *x += 0.001 * ((i % 13) as f32 - 6.0));
    lora::peft::save(&adapter, &dir.join("adapter")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_lowrank"))
        .args([
            "merge",
            "--model",
            smollm2().to_str().unwrap(),
            "--adapter",
            dir.join("adapter").to_str().unwrap(),
            "--output",
            dir.join("merged").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let merged = lowrank::pretrained::Pretrained::load(&dir.join("merged")).unwrap();
    let text = "Dates like 2024-05-17 and café ünïcode";
    assert_eq!(merged.tokenizer.encode(text, false).unwrap(), p.tokenizer.encode(text, false).unwrap());
    assert_eq!(merged.tokenizer.chat_template, p.tokenizer.chat_template);
    let ids = p.tokenizer.encode("The capital of France is", false).unwrap();
    let b = Batch::right_padded(&[ids], 0).unwrap();
    let want = p.model.forward(&b, &adapter).unwrap();
    let got = merged.model.forward(&b, &NoAdapter).unwrap();
    assert!(max_abs_diff(&got, &want) <= 1e-3, "{}", max_abs_diff(&got, &want));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn sampling_is_deterministic_under_a_seed() {
    let p = common::smollm2_model();
    let prompt = p.tokenizer.encode("Once upon a time", false).unwrap();
    let run = |seed| {
        let params = GenerateParams {
            max_new_tokens: 12,
            sampling: SamplingParams { temperature: 1.0, top_k: 50, top_p: 0.95, repetition_penalty: 1.1, seed },
            stop_ids: vec![],
            stop_strings: vec![],
        };
        generate(&p.model, &p.tokenizer, &[prompt.clone(), prompt.clone()], None, &params, None).unwrap()
    };
    let (a, b, c) = (run(1), run(1), run(2));
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert_eq!(a[0].len(), 12);
    // Stop strings cut the output before them.
    let params = GenerateParams {
        max_new_tokens: 30,
        sampling: SamplingParams::default(),
        stop_ids: p.stop_ids(),
        stop_strings: vec!["Paris".into()],
    };
    let q = p.tokenizer.encode("<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n", false).unwrap();
    let out = generate(&p.model, &p.tokenizer, &[q], None, &params, None).unwrap();
    let text = p.tokenizer.decode(&out[0], true).unwrap();
    assert!(!text.contains("Paris") && text.len() < 40, "{text:?}");
}

#[test]
fn chat_cli_switches_adapters() {
    let dir = tmpdir("chat");
    let p = common::smollm2_model();
    let adapter = LoraAdapter::new(lowrank::LoraConfig::default(), &p.model, 3).unwrap();
    lora::peft::save(&adapter, &dir.join("a")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_lowrank"))
        .args([
            "chat",
            "--model",
            smollm2().to_str().unwrap(),
            "--adapter",
            &format!("dates={}", dir.join("a").display()),
            "--max-new-tokens",
            "8",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"/adapters\n/adapter none\n/adapter nope\n/adapter dates\nHi!\n/quit\n").unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("[adapters: dates; active: dates]"), "{stdout}");
    assert!(stdout.contains("[active adapter: none]") && stdout.contains("no adapter named \"nope\""), "{stdout}");
    assert!(stdout.lines().count() >= 5, "{stdout}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An adapter trained by PEFT on SmolLM2 (tools/make_peft_interop.py) gives PEFT's loss in lowrank.
#[test]
fn peft_trained_smollm2_adapter_gives_peft_loss() {
    let p = common::smollm2_model();
    let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture("smollm2/interop.json")).unwrap()).unwrap();
    let adapter = lora::peft::load(&fixture("smollm2/peft_adapter"), &p.model).unwrap();
    let enc = lowrank::data::Encoder { tokenizer: &p.tokenizer, template: None, train_on_inputs: false, max_tokens: usize::MAX };
    let examples: Vec<_> = reference["eval_texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| enc.encode(&lowrank::data::Record::Text(t.as_str().unwrap().into())).unwrap())
        .collect();
    let (seqs, _) = lowrank::data::make_sequences(&examples, 512, false).unwrap();
    let eos = p.tokenizer.eos_id.unwrap();
    for (ad, key) in [(&adapter as &dyn lowrank::model::adapt::LowRankSource, "peft_eval_loss"), (&NoAdapter, "base_eval_loss")] {
        let got = lowrank::train::eval::evaluate(&p.model, ad, &seqs, 8, eos).unwrap().mean();
        let want = reference[key].as_f64().unwrap();
        assert!((got - want).abs() <= 1e-4 * want, "{key}: lowrank {got} vs PEFT {want}");
    }
}

#[test]
fn inspect_describes_models_and_adapters() {
    let report = lowrank::inspect::inspect(&fixture("tiny-qwen2/peft_adapter")).unwrap();
    assert!(
        report.contains("PEFT LoRA adapter")
            && report.contains("r=8")
            && report.contains("rslora=true")
            && report.contains("layers_to_transform=[1]"),
        "{report}"
    );
    let report = lowrank::inspect::inspect(&fixture("tiny-qwen2/model")).unwrap();
    assert!(report.contains("Qwen2") && report.contains("123456 parameters"), "{report}");
    let report = lowrank::inspect::inspect(smollm2()).unwrap();
    assert!(report.contains("GGUF v3 model") && report.contains("llama.block_count = 30") && report.contains("Q4_1"), "{report}");
    let dir = tmpdir("inspect");
    let (model, adapter) = llama();
    std::fs::write(dir.join("a.gguf"), lora::gguf::to_gguf(&adapter, &model.config).unwrap()).unwrap();
    let report = lowrank::inspect::inspect(&dir.join("a.gguf")).unwrap();
    assert!(report.contains("GGUF v3 adapter") && report.contains("adapter.lora.alpha = 8"), "{report}");
    assert!(lowrank::inspect::inspect(&dir.join("missing")).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}
