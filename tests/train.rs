//! Training end to end on the real SmolLM2-135M-Instruct: label masking per data format, loss
//! falling, adapter reload, bit-identical resume, Ctrl-C checkpoints and bad input via the CLI.

mod common;

use common::{smollm2, smollm2_model, tmpdir};
use lowrank::data::{parse_record, ChatTemplate, Encoder, Record};
use lowrank::train::trainer::{self, read_metrics, Silent, TrainConfig};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;

/// The text of the tokens that train, concatenated.
fn trained_text(record: &str, train_on_inputs: bool) -> (String, String) {
    let p = smollm2_model();
    let t = &p.tokenizer;
    let template = ChatTemplate::new(t.chat_template.as_deref().unwrap(), &t.bos_token, &t.eos_token).unwrap();
    let enc = Encoder { tokenizer: t, template: Some(&template), train_on_inputs, max_tokens: usize::MAX };
    let e = enc.encode(&parse_record(record, None).unwrap()).unwrap();
    let pick = |want: bool| -> String {
        let ids: Vec<u32> = e.ids.iter().zip(&e.train).filter(|(_, &tr)| tr == want).map(|(&i, _)| i).collect();
        t.decode(&ids, false).unwrap()
    };
    (pick(true), pick(false))
}

#[test]
fn label_masking_per_format() {
    let (tr, masked) = trained_text(r#"{"prompt": "Q: 2+2?\nA:", "completion": " 4"}"#, false);
    assert_eq!((tr.as_str(), masked.as_str()), (" 4<|im_end|>", "Q: 2+2?\nA:"));
    let (tr, _) = trained_text(r#"{"instruction": "Say hi", "output": "Hi!"}"#, false);
    assert_eq!(tr, "Hi!<|im_end|>");
    let (tr, masked) = trained_text(r#"{"text": "plain text"}"#, false);
    assert_eq!((tr.as_str(), masked.as_str()), ("plain text<|im_end|>", ""));
    let chat = r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}]}"#;
    let (tr, masked) = trained_text(chat, false);
    assert_eq!(tr, "Hello.<|im_end|>\nGoodbye.<|im_end|>\n");
    assert_eq!(masked, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n");
    let (tr, masked) = trained_text(chat, true);
    assert!(masked.is_empty() && tr.starts_with("<|im_start|>system"), "--train-on-inputs trains everything");
    assert!(matches!(parse_record(chat, None).unwrap(), Record::Messages(_)));
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn dates(n: usize) -> String {
    let months = ["January", "March", "May", "July", "October", "December"];
    (0..n)
        .map(|i| {
            let (d, m, y) = (1 + i * 7 % 28, i % 6, 1960 + i * 13 % 60);
            let mm = [1, 3, 5, 7, 10, 12][m];
            format!(
                "{{\"messages\": [{{\"role\": \"user\", \"content\": \"ISO date of {} {d}, {y}?\"}}, {{\"role\": \"assistant\", \"content\": \"{y}-{mm:02}-{d:02}\"}}]}}\n",
                months[m]
            )
        })
        .collect()
}

fn small_config(dir: &Path, steps: usize) -> TrainConfig {
    TrainConfig {
        model: smollm2().to_path_buf(),
        data: write(dir, "train.jsonl", &dates(24)),
        eval_data: Some(write(dir, "eval.jsonl", &dates(30)[..].lines().skip(24).map(|l| format!("{l}\n")).collect::<String>())),
        output: dir.join("out"),
        batch_size: 4,
        seq_len: 64,
        lr: 1e-3,
        max_steps: Some(steps),
        targets: "q_proj,v_proj".into(),
        dropout: 0.1,
        ..Default::default()
    }
}

#[test]
fn loss_falls_and_the_saved_adapter_reloads_to_the_same_eval_loss() {
    let dir = tmpdir("e2e");
    let cfg = TrainConfig { eval_every: 8, ..small_config(&dir, 8) };
    let s = trainer::train(&cfg, &mut Silent, &AtomicBool::new(false)).unwrap();
    let m = read_metrics(&cfg.output.join("metrics.jsonl")).unwrap();
    let losses: Vec<f64> = m.iter().filter_map(|x| x.loss).collect();
    assert_eq!(losses.len(), 8);
    let (first, last) = (losses[..2].iter().sum::<f64>() / 2.0, losses[6..].iter().sum::<f64>() / 2.0);
    assert!(last < 0.7 * first, "loss did not fall: {losses:?}");
    let p = smollm2_model();
    let adapter = lowrank::lora::peft::load(&cfg.output.join("adapter"), &p.model).unwrap();
    let data = trainer::prepare_data(&cfg, p).unwrap();
    let e = lowrank::train::eval::evaluate(&p.model, &adapter, &data.eval, 4, p.tokenizer.eos_id.unwrap()).unwrap();
    assert!((e.mean() - s.final_eval_loss.unwrap()).abs() < 1e-9, "{} vs {:?}", e.mean(), s.final_eval_loss);
    assert!(cfg.output.join("loss.png").metadata().unwrap().len() > 1000);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// With the base kept in Q4_1 (a quarter of f32's memory), the adapter still trains, and the
/// adapter works on the exact f32 base too.
#[test]
fn training_on_a_q4_1_base_trains_the_adapter() {
    let dir = tmpdir("q4");
    let cfg = TrainConfig { weights: "q4_1".into(), ..small_config(&dir, 8) };
    let s = trainer::train(&cfg, &mut Silent, &AtomicBool::new(false)).unwrap();
    let losses: Vec<f64> = read_metrics(&cfg.output.join("metrics.jsonl")).unwrap().iter().filter_map(|x| x.loss).collect();
    let (first, last) = (losses[..2].iter().sum::<f64>() / 2.0, losses[6..].iter().sum::<f64>() / 2.0);
    assert!(last < 0.7 * first, "loss did not fall: {losses:?}");
    let p = smollm2_model();
    let adapter = lowrank::lora::peft::load(&cfg.output.join("adapter"), &p.model).unwrap();
    let data = trainer::prepare_data(&cfg, p).unwrap();
    let on_f32 = lowrank::train::eval::evaluate(&p.model, &adapter, &data.eval, 4, p.tokenizer.eos_id.unwrap()).unwrap().mean();
    let base = lowrank::train::eval::evaluate(&p.model, &lowrank::model::adapt::NoAdapter, &data.eval, 4, p.tokenizer.eos_id.unwrap())
        .unwrap()
        .mean();
    let q4 = s.final_eval_loss.unwrap();
    assert!(on_f32 < 0.7 * base && (on_f32 - q4).abs() < 0.1 * q4, "eval loss: base {base}, adapter on f32 {on_f32}, on q4_1 {q4}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn resume_is_bit_identical() {
    let dir = tmpdir("resume");
    let straight = TrainConfig { output: dir.join("straight"), ..small_config(&dir, 12) };
    trainer::train(&straight, &mut Silent, &AtomicBool::new(false)).unwrap();
    let first = TrainConfig { output: dir.join("split"), save_every: 6, ..small_config(&dir, 12) };
    // Run to step 6 and "crash": only the checkpoint of step 6 is used from here.
    let stop_at_6 = TrainConfig { max_steps: Some(12), ..first.clone() };
    let flag = AtomicBool::new(false);
    struct StopAt<'a>(&'a AtomicBool);
    impl trainer::Progress for StopAt<'_> {
        fn step(&mut self, m: &trainer::Metric) {
            if m.step == 6 {
                self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
    }
    let s = trainer::train(&stop_at_6, &mut StopAt(&flag), &flag).unwrap();
    assert!(s.interrupted && s.steps == 6);
    let resumed = TrainConfig { resume: Some(first.output.join("checkpoints/step-6")), ..first.clone() };
    trainer::train(&resumed, &mut Silent, &AtomicBool::new(false)).unwrap();
    let losses = |d: &Path| -> Vec<f64> { read_metrics(&d.join("metrics.jsonl")).unwrap().iter().filter_map(|m| m.loss).collect() };
    assert_eq!(losses(&straight.output), losses(&first.output));
    assert_eq!(losses(&first.output).len(), 12);
    let bytes = |d: &Path| std::fs::read(d.join("adapter/adapter_model.safetensors")).unwrap();
    assert!(bytes(&straight.output) == bytes(&first.output), "adapters differ after resume");
    // A resume with different settings is refused.
    let changed = TrainConfig { lr: 5e-4, ..resumed };
    let e = format!("{:#}", trainer::train(&changed, &mut Silent, &AtomicBool::new(false)).unwrap_err());
    assert!(e.contains("different settings"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn lowrank(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lowrank")).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "lowrank {args:?} panicked:\n{stderr}");
    (out.status.code().unwrap_or(-1), stderr)
}

#[test]
fn bad_input_gives_clear_errors() {
    let dir = tmpdir("bad");
    let model = smollm2().to_str().unwrap().to_string();
    let out = dir.join("out");
    let out = out.to_str().unwrap();
    let run = |data: &Path, extra: &[&str]| {
        let mut a = vec!["train", "--model", &model, "--data", data.to_str().unwrap(), "--output", out, "--max-steps", "1"];
        a.extend_from_slice(extra);
        lowrank(&a)
    };
    let good = r#"{"prompt": "a", "completion": "b"}"#;
    let bad_json = write(&dir, "bad.jsonl", &format!("{good}\n{good}\n{{\"prompt\": \"x\", \n"));
    let (code, err) = run(&bad_json, &[]);
    assert!(code == 1 && err.contains("bad.jsonl:3:") && err.contains("invalid JSON"), "{err}");
    let missing = write(&dir, "missing.jsonl", &format!("{good}\n{{\"prompt\": \"x\"}}\n"));
    let (code, err) = run(&missing, &["--format", "prompt-completion"]);
    assert!(code == 1 && err.contains("missing.jsonl:2:") && err.contains("missing field \"completion\""), "{err}");
    let (code, err) = run(&write(&dir, "empty.jsonl", ""), &[]);
    assert!(code == 1 && err.contains("no examples"), "{err}");
    let long = write(&dir, "long.jsonl", &format!("{{\"prompt\": \"{}\", \"completion\": \"end\"}}\n", "word ".repeat(100)));
    let (code, err) = run(&long, &["--seq-len", "16"]);
    assert!(code == 1 && err.contains("no example has a token to train on within seq-len 16") && err.contains("1 truncated"), "{err}");
    let ok = write(&dir, "ok.jsonl", &format!("{good}\n"));
    let (code, err) = run(&ok, &["--targets", "q_proj,qkv_proj"]);
    assert!(code == 1 && err.contains("\"qkv_proj\" matches no linear module") && err.contains("v_proj"), "{err}");
    let (code, err) = lowrank(&["train", "--model", "/no/such/model", "--data", ok.to_str().unwrap(), "--output", out]);
    assert!(code == 1 && err.contains("/no/such/model") && err.contains("does not exist"), "{err}");
    let (code, err) = run(&ok, &["--lr=-1"]);
    assert!(code == 1 && err.contains("lr must be a positive number"), "{err}");
    let skipped = write(&dir, "skip.jsonl", &format!("{good}\nnot json\n{good}\n"));
    let (code, err) = run(&skipped, &["--skip-bad-lines"]);
    assert!(code == 0 && err.contains("1 bad lines skipped"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn ctrl_c_writes_a_checkpoint_and_exits_cleanly() {
    let dir = tmpdir("sigint");
    let cfg = small_config(&dir, 1000);
    let out = dir.join("out");
    let mut child = Command::new(env!("CARGO_BIN_EXE_lowrank"))
        .args(["train", "--model", smollm2().to_str().unwrap(), "--data", cfg.data.to_str().unwrap(), "--output", out.to_str().unwrap()])
        .args(["--max-steps", "1000", "--batch-size", "2", "--seq-len", "64"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
    // Wait until training runs, then interrupt.
    for line in lines.by_ref() {
        if line.unwrap().starts_with("step 1/") {
            break;
        }
    }
    Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{rest:?}");
    let ckpt = std::fs::read_dir(out.join("checkpoints")).unwrap().next().unwrap().unwrap().path();
    assert!(
        ckpt.join("trainer_state.json").exists()
            && ckpt.join("adapter_model.safetensors").exists()
            && ckpt.join("optimizer.safetensors").exists()
    );
    assert!(rest.iter().any(|l| l.contains("--resume")), "{rest:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn toml_config_with_flags_overriding_it() {
    let dir = tmpdir("toml");
    let data = write(&dir, "d.jsonl", "{\"prompt\": \"a\", \"completion\": \"b\"}\n");
    let out = dir.join("out");
    let cfg = write(&dir, "run.toml", &format!("model = {:?}\ndata = {:?}\nmax_steps = 2\nlr = -1.0\nrank = 4\n", smollm2(), data));
    let (code, err) = lowrank(&["train", "--config", cfg.to_str().unwrap(), "--output", out.to_str().unwrap()]);
    assert!(code == 1 && err.contains("lr must be a positive number"), "the file's lr applies: {err}");
    let (code, err) = lowrank(&["train", "--config", cfg.to_str().unwrap(), "--output", out.to_str().unwrap(), "--lr", "0.001"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(read_metrics(&out.join("metrics.jsonl")).unwrap().len(), 2);
    let a: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("adapter/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(a["r"], 4);
    let bad = write(&dir, "bad.toml", "rnak = 4\n");
    let (code, err) = lowrank(&["train", "--config", bad.to_str().unwrap(), "--model", "m", "--data", "d"]);
    assert!(code == 1 && err.contains("rnak"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn data_preview_marks_masked_tokens_and_eval_reports_json() {
    let dir = tmpdir("preview");
    let data = write(&dir, "d.jsonl", "{\"prompt\": \"Q: 2+2?\\nA:\", \"completion\": \" 4\"}\n");
    let model = smollm2().to_str().unwrap().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_lowrank"))
        .args(["data", "preview", "--model", &model, "--data", data.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("[Q]|[:]|") && text.contains("[A]|[:]| |4|<|im_end|>|") && text.contains("3 trained"), "{text}");
    let out = Command::new(env!("CARGO_BIN_EXE_lowrank"))
        .args(["eval", "--model", &model, "--data", data.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["tokens"], 3);
    assert!(v["loss"].as_f64().unwrap() > 0.0 && (v["perplexity"].as_f64().unwrap() - v["loss"].as_f64().unwrap().exp()).abs() < 1e-9);
    std::fs::remove_dir_all(&dir).unwrap();
}
