//! GGUF models: dequantization against llama.cpp's gguf-py, and the real SmolLM2-135M-Instruct
//! (tokenizer, chat template and logits) against transformers on the upstream-equivalent HF
//! directory (fixtures from tools/make_gguf_reference.py).

mod common;

use common::{fixture, max_abs_diff, smollm2_model};
use lowrank::data::{ChatTemplate, Message};
use lowrank::model::gguf::GgufFile;
use lowrank::model::weights::TensorStore;
use lowrank::model::Batch;

#[test]
fn every_supported_type_dequantizes_like_gguf_py() {
    let g = GgufFile::open(&fixture("quant/quant.gguf")).unwrap();
    let want = TensorStore::open_files(&[fixture("quant/expected.safetensors")]).unwrap();
    let mut checked = 0;
    for name in ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q4_k", "q5_k", "q6_k"] {
        let (got, shape) = g.tensor_f32(name).unwrap();
        let (exp, eshape) = want.f32_any(name).unwrap();
        assert_eq!(shape, eshape, "{name}");
        let scale = exp.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let err = max_abs_diff(&got, &exp);
        assert!(err <= 1e-6 * scale.max(1.0), "{name}: max-abs diff {err}");
        checked += 1;
    }
    assert_eq!(checked, 9);
}

#[test]
fn smollm2_tokenizer_and_chat_template_match_upstream() {
    let p = smollm2_model();
    let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture("smollm2/tokens.json")).unwrap()).unwrap();
    for case in reference["strings"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(p.tokenizer.encode(text, false).unwrap(), want, "token ids of {text:?}");
    }
    let t = &p.tokenizer;
    let template = ChatTemplate::new(t.chat_template.as_deref().expect("SmolLM2 has a chat template"), &t.bos_token, &t.eos_token).unwrap();
    for case in reference["chats"].as_array().unwrap() {
        let msgs: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
        let text = template.render(&msgs, case["add_generation_prompt"].as_bool().unwrap()).unwrap();
        assert_eq!(text, case["text"].as_str().unwrap());
        let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(t.encode(&text, false).unwrap(), want, "token ids of {text:?}");
    }
    assert_eq!((t.bos_id, t.eos_id, t.add_bos), (Some(1), Some(2), false));
}

#[test]
fn smollm2_logits_match_transformers() {
    let p = smollm2_model();
    let want = TensorStore::open_files(&[fixture("smollm2/logits.safetensors")]).unwrap();
    let v = p.model.config.vocab_size;
    for i in 0..3 {
        let (ids, _) = want.i64(&format!("prompt{i}.ids")).unwrap();
        let ids: Vec<u32> = ids.iter().map(|&x| x as u32).collect();
        let n = ids.len();
        let logits = p.model.forward(&Batch::right_padded(&[ids], 0).unwrap(), &lowrank::model::adapt::NoAdapter).unwrap();
        let (head, _) = want.f32_any(&format!("prompt{i}.last_logits_head")).unwrap();
        let err = max_abs_diff(&logits[(n - 1) * v..(n - 1) * v + head.len()], &head);
        assert!(err <= 1e-3, "prompt {i}: last-position logits max-abs diff {err}");
        let (argmax, _) = want.i64(&format!("prompt{i}.argmax")).unwrap();
        for (t, &a) in argmax.iter().enumerate() {
            let row = &logits[t * v..(t + 1) * v];
            let ours = row.iter().enumerate().fold((0, f32::MIN), |m, (j, &x)| if x > m.1 { (j, x) } else { m }).0;
            assert!(ours as i64 == a || (row[ours] - row[a as usize]).abs() < 1e-4, "prompt {i} position {t}: argmax {ours} vs {a}");
        }
    }
}

/// A llama-style (SentencePiece) GGUF tokenizer, made by tools/make_spm_reference.py from a trained
/// SentencePiece model: ids as llama.cpp's SPM tokenizer gives them (SentencePiece per text run,
/// special and user-defined tokens whole), including byte fallback for characters not in the vocabulary.
#[test]
fn sentencepiece_gguf_tokenizer_matches_sentencepiece() {
    let g = GgufFile::open(&fixture("spm/tokenizer.gguf")).unwrap();
    let t = lowrank::tokenizer::Tokenizer::from_gguf(&g).unwrap();
    let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture("spm/expected.json")).unwrap()).unwrap();
    assert_eq!(t.vocab_size() as u64, reference["vocab_size"].as_u64().unwrap());
    let id = |key: &str| Some(reference[key].as_u64().unwrap() as u32);
    assert_eq!((t.bos_id, t.eos_id, t.add_bos), (id("bos_id"), id("eos_id"), true));
    let mut fallbacks = 0;
    for case in reference["strings"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        let got = t.encode(text, true).unwrap();
        assert_eq!(got, want, "token ids of {text:?}");
        fallbacks += got.iter().filter(|&&i| t.id_to_token(i).is_some_and(|p| p.starts_with("<0x"))).count();
        let plain = !text.contains("<|") && !text.contains("</s>");
        if plain {
            assert_eq!(t.decode(&got, true).unwrap(), case["decoded"].as_str().unwrap(), "decoding {text:?}");
        }
    }
    assert!(fallbacks > 10, "the strings exercise byte fallback ({fallbacks} byte tokens)");
}
