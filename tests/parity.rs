//! lowrank against PyTorch + transformers + PEFT on the tiny fixture models made by
//! tools/make_fixtures.py: logits, loss, every LoRA gradient, three AdamW steps with warmup,
//! schedule and clipping, and the PEFT adapter file format in both directions.

use lowrank::kernels::loss::shift_labels;
use lowrank::lora::{self, LoraAdapter};
use lowrank::model::weights::TensorStore;
use lowrank::train::{clip_grad_norm, AdamW, Schedule};
use lowrank::{Batch, DecoderModel};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lowrank-parity-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn max_abs(a: &[f32]) -> f32 {
    a.iter().fold(0.0f32, |m, x| m.max(x.abs()))
}

struct Case {
    model: DecoderModel,
    adapter: LoraAdapter,
    expected: TensorStore,
    batch: Batch,
    targets: Vec<Option<u32>>,
    meta: serde_json::Value,
}

fn load_case(name: &str) -> Case {
    let dir = fixture(name);
    let model = DecoderModel::from_hf_dir(&dir.join("model")).unwrap();
    let adapter = lora::peft::load(&dir.join("peft_adapter"), &model).unwrap();
    let expected = TensorStore::open_files(&[dir.join("expected.safetensors")]).unwrap();
    let (ids, shape) = expected.i64("input_ids").unwrap();
    let (mask, _) = expected.i64("attention_mask").unwrap();
    let (labels, _) = expected.i64("labels").unwrap();
    let batch = Batch::new(ids.iter().map(|&t| t as u32).collect(), mask.iter().map(|&m| m != 0).collect(), shape[0], shape[1]).unwrap();
    let targets = shift_labels(&labels, shape[1]);
    let meta = serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json")).unwrap()).unwrap();
    Case { model, adapter, expected, batch, targets, meta }
}

fn expected(case: &Case, key: &str) -> Vec<f32> {
    case.expected.f32_any(key).unwrap().0
}

fn logits_loss_and_gradients(name: &str) {
    let c = load_case(name);
    let logits = c.model.forward(&c.batch, &c.adapter).unwrap();
    let want = expected(&c, "logits");
    let err = max_abs_diff(&logits, &want);
    assert!(err <= 1e-4, "{name}: logits max-abs diff {err:.3e}");

    let count = c.targets.iter().flatten().count();
    let mut grads = vec![0.0; c.adapter.num_params()];
    let loss = c.model.loss_and_grads(&c.batch, &c.targets, &c.adapter, &mut grads, 1.0 / count as f32, None).unwrap();
    let want_loss = expected(&c, "loss")[0] as f64;
    assert!((loss.mean() - want_loss).abs() <= 1e-5 * want_loss.abs(), "{name}: loss {} vs PyTorch {want_loss}", loss.mean());
    // The loss-only path agrees with the training path.
    let eval = c.model.loss(&c.batch, &c.targets, &c.adapter).unwrap();
    assert!((eval.mean() - loss.mean()).abs() < 1e-9);

    for m in &c.adapter.modules {
        for (which, off, len) in [("A", m.offset, m.a_len()), ("B", m.offset + m.a_len(), m.b_len())] {
            let key = m.peft_key(which);
            let want = expected(&c, &format!("grad.{key}"));
            let rel = max_abs_diff(&grads[off..off + len], &want) / max_abs(&want);
            assert!(rel <= 1e-4, "{name}: gradient of {key}: relative diff {rel:.3e}");
        }
    }
}

#[test]
fn tiny_llama_logits_loss_and_lora_gradients_match_peft() {
    logits_loss_and_gradients("tiny-llama");
}

#[test]
fn tiny_qwen2_logits_loss_and_lora_gradients_match_peft() {
    logits_loss_and_gradients("tiny-qwen2");
}

fn three_adamw_steps(name: &str) {
    let mut c = load_case(name);
    let t = &c.meta["train"];
    let f = |k: &str| t[k].as_f64().unwrap();
    let u = |k: &str| t[k].as_u64().unwrap() as usize;
    let schedule = Schedule::parse(t["schedule"].as_str().unwrap()).unwrap();
    let mut opt =
        AdamW::new(c.adapter.num_params(), t["betas"][0].as_f64().unwrap(), t["betas"][1].as_f64().unwrap(), f("eps"), f("weight_decay"));
    let (want_losses, want_norms, want_lrs) = (expected(&c, "step_losses"), expected(&c, "step_grad_norms"), expected(&c, "step_lrs"));
    let count = c.targets.iter().flatten().count();
    let mut clipped = false;
    for step in 0..u("steps") {
        let mut grads = vec![0.0; c.adapter.num_params()];
        let loss = c.model.loss_and_grads(&c.batch, &c.targets, &c.adapter, &mut grads, 1.0 / count as f32, None).unwrap();
        let norm = clip_grad_norm(&mut grads, f("max_grad_norm"));
        clipped |= norm > f("max_grad_norm");
        let lr = f("lr") * schedule.factor(step, u("warmup_steps"), u("total_steps"));
        assert!((lr - want_lrs[step] as f64).abs() < 1e-9, "{name}: step {step} lr {lr} vs {}", want_lrs[step]);
        assert!((loss.mean() - want_losses[step] as f64).abs() < 1e-5, "{name}: step {step} loss {} vs {}", loss.mean(), want_losses[step]);
        assert!((norm - want_norms[step] as f64).abs() < 1e-4 * norm, "{name}: step {step} grad norm {norm} vs {}", want_norms[step]);
        opt.update(&mut c.adapter.params, &grads, lr);
    }
    assert!(clipped, "{name}: the fixture must exercise clipping");
    for m in &c.adapter.modules {
        for (which, w) in [("A", c.adapter.a(m)), ("B", c.adapter.b(m))] {
            let key = m.peft_key(which);
            let err = max_abs_diff(w, &expected(&c, &format!("step3.{key}")));
            assert!(err <= 1e-5, "{name}: {key} after 3 steps: max-abs diff {err:.3e}");
        }
    }
}

#[test]
fn tiny_llama_three_adamw_steps_match_torch() {
    three_adamw_steps("tiny-llama");
}

#[test]
fn tiny_qwen2_three_adamw_steps_match_torch() {
    three_adamw_steps("tiny-qwen2");
}

#[test]
fn saved_adapter_has_peft_key_set_shapes_and_dtypes_and_reloads_exactly() {
    for name in ["tiny-llama", "tiny-qwen2"] {
        let c = load_case(name);
        let out = tmpdir(name);
        lora::peft::save(&c.adapter, &out).unwrap();
        let ours = TensorStore::open_files(&[out.join("adapter_model.safetensors")]).unwrap().list();
        let peft = TensorStore::open_files(&[fixture(name).join("peft_adapter/adapter_model.safetensors")]).unwrap().list();
        assert_eq!(ours, peft, "{name}: key set, shapes or dtypes differ from PEFT's");
        let back = lora::peft::load(&out, &c.model).unwrap();
        assert_eq!(back.params, c.adapter.params);
        assert_eq!(back.modules, c.adapter.modules);
        let peft_cfg = lora::peft::read_config(&fixture(name).join("peft_adapter")).unwrap();
        let our_cfg = lora::peft::read_config(&out).unwrap();
        assert_eq!(our_cfg, peft_cfg, "{name}: config does not survive a save");
        std::fs::remove_dir_all(&out).unwrap();
    }
}

#[test]
fn fresh_adapter_is_the_base_model_and_reports_trainable_parameters() {
    let c = load_case("tiny-llama");
    let fresh = LoraAdapter::new(lowrank::LoraConfig::default(), &c.model, 0).unwrap();
    // B = 0 at init: the adapted model computes exactly the base model.
    let base = c.model.forward(&c.batch, &lowrank::model::adapt::NoAdapter).unwrap();
    assert_eq!(c.model.forward(&c.batch, &fresh).unwrap(), base);
    // A is kaiming-uniform: within ±1/√in and not all zero.
    let m = &fresh.modules[0];
    let bound = 1.0 / (m.in_features as f32).sqrt();
    assert!(fresh.a(m).iter().all(|x| x.abs() <= bound) && max_abs(fresh.a(m)) > 0.5 * bound);
    // q_proj and v_proj of 2 layers at r=8: (8·64 + 64·8) + (8·64 + 32·8) per layer.
    assert_eq!(fresh.num_params(), 2 * (1024 + 768));
    let report = fresh.trainable_report(&c.model);
    assert!(report.starts_with("trainable params: 3,584 || all params: "), "{report}");
}

#[test]
fn adapter_for_another_base_names_the_tensor_and_both_shapes() {
    let llama = load_case("tiny-llama");
    let qwen = DecoderModel::from_hf_dir(&fixture("tiny-qwen2/model")).unwrap();
    let e = format!("{:#}", lora::peft::load(&fixture("tiny-llama/peft_adapter"), &qwen).unwrap_err());
    assert!(
        e.contains("base_model.model.model.layers.0.mlp.gate_proj.lora_B.weight") && e.contains("[160, 4]") && e.contains("[128, 4]"),
        "{e}"
    );
    drop(llama);
}

#[test]
fn missing_or_misshapen_model_tensors_are_named() {
    let src = fixture("tiny-llama/model");
    let store = TensorStore::open_dir(&src).unwrap();
    let write_without = |skip: &str, reshape: Option<&str>| {
        let dir = tmpdir(&format!("model-{skip}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
        let mut tensors = std::collections::BTreeMap::new();
        for (name, _) in store.list() {
            if name == skip {
                continue;
            }
            let (v, mut shape) = store.f32_any(&name).unwrap();
            if reshape == Some(name.as_str()) {
                shape = vec![shape.iter().product()];
            }
            tensors.insert(name, (shape, v));
        }
        std::fs::write(dir.join("model.safetensors"), lowrank::model::weights::serialize_f32(&tensors, None).unwrap()).unwrap();
        dir
    };
    let dir = write_without("model.norm.weight", None);
    let e = format!("{:#}", DecoderModel::from_hf_dir(&dir).err().unwrap());
    assert!(e.contains("model.norm.weight"), "{e}");
    let dir2 = write_without("none", Some("model.layers.1.self_attn.k_proj.weight"));
    let e = format!("{:#}", DecoderModel::from_hf_dir(&dir2).err().unwrap());
    assert!(e.contains("model.layers.1.self_attn.k_proj.weight") && e.contains("[2048]") && e.contains("[32, 64]"), "{e}");
    let e = format!("{:#}", DecoderModel::from_hf_dir(Path::new("/nonexistent/model")).err().unwrap());
    assert!(e.contains("/nonexistent/model"), "{e}");
    for d in [dir, dir2] {
        std::fs::remove_dir_all(d).unwrap();
    }
}
