//! Tokenizers: Hugging Face `tokenizers` built from a model directory's tokenizer.json or from GGUF
//! metadata, plus what the model says about special tokens and its chat template.

use crate::model::gguf::{GgufFile, GgufValue};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::path::Path;

/// Token ids with the byte range of the text each came from.
pub type IdsWithOffsets = (Vec<u32>, Vec<(usize, usize)>);

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub bos_token: String,
    pub eos_token: String,
    /// Whether plain text gets a BOS token prepended (`add_bos_token`).
    pub add_bos: bool,
    pub chat_template: Option<String>,
    max_token_bytes: usize,
}

fn longest_token(inner: &tokenizers::Tokenizer) -> usize {
    inner.get_vocab(true).keys().map(String::len).max().unwrap_or(1).max(1)
}

/// The regex of llama 3's pre-tokenizer (`tokenizer.ggml.pre` = llama-bpe).
const LLAMA3_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's: as llama 3's, but digits one at a time.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn byte_level(use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

/// The pre-tokenizer llama.cpp names by `tokenizer.ggml.pre`, as tokenizers JSON.
fn gguf_pre_tokenizer(pre: &str) -> Result<Value> {
    let split = |re: &str| {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false},
            byte_level(false)]})
    };
    Ok(match pre {
        "default" | "gpt-2" | "gpt2" => byte_level(true),
        // SmolLM2: digits split one by one, then GPT-2 byte-level BPE.
        "smollm" => json!({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "llama-bpe" | "llama3" => split(LLAMA3_SPLIT),
        "qwen2" => split(QWEN2_SPLIT),
        other => bail!("GGUF pre-tokenizer \"{other}\" is not supported (supported: default, gpt2, smollm, llama-bpe, qwen2)"),
    })
}

fn strings(g: &GgufFile, key: &str) -> Result<Vec<String>> {
    let a = g.get(key).and_then(GgufValue::as_array).with_context(|| format!("GGUF metadata {key} is missing"))?;
    a.iter().map(|v| v.as_str().map(str::to_string).with_context(|| format!("{key}: expected strings"))).collect()
}

fn token_content(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// BPE merges implied by a SentencePiece vocabulary, which stores none: every way of cutting a
/// piece into two pieces of the vocabulary is a merge, ranked by the score of the piece it makes
/// (higher first; SentencePiece BPE merges the best-scoring pair first), ties by the longer left
/// then right part, then by vocabulary order. The same order as transformers' `generate_merges`.
fn merges_from_scores(tokens: &[String], scores: &[f64]) -> Vec<(String, String)> {
    let index: std::collections::HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    let mut merges: Vec<(usize, usize, f64, usize, usize)> = Vec::new();
    for (piece, &score) in tokens.iter().zip(scores) {
        let mut local = Vec::new();
        for (cut, _) in piece.char_indices().skip(1) {
            if let (Some(&l), Some(&r)) = (index.get(&piece[..cut]), index.get(&piece[cut..])) {
                local.push((l, r, score, piece[..cut].chars().count(), piece[cut..].chars().count()));
            }
        }
        local.sort_by_key(|m| (m.0, m.1));
        merges.extend(local);
    }
    // Stable, so equal keys keep the order above (as Python's sorted(reverse=True) does).
    merges.sort_by(|a, b| b.2.total_cmp(&a.2).then(b.3.cmp(&a.3)).then(b.4.cmp(&a.4)));
    merges.into_iter().map(|(l, r, ..)| (tokens[l].clone(), tokens[r].clone())).collect()
}

impl Tokenizer {
    /// From a Hugging Face model directory: tokenizer.json, tokenizer_config.json and, when
    /// present, chat_template.jinja (which transformers 5 writes instead of the config key).
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let text = crate::io::read_input_text(&path, "tokenizer")?;
        let inner: tokenizers::Tokenizer = text.parse().map_err(|e| anyhow!("loading {}: {e}", path.display()))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Value = match crate::io::read_optional_text(&cfg_path, "tokenizer config")? {
            Some(t) => serde_json::from_str(&t).with_context(|| format!("parsing {}", cfg_path.display()))?,
            None => json!({}),
        };
        let mut chat_template = match cfg.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Value::as_str))
                .map(str::to_string),
            _ => None,
        };
        if let Some(t) = crate::io::read_optional_text(&dir.join("chat_template.jinja"), "chat template")? {
            chat_template = Some(t);
        }
        let model_cfg: Value = crate::io::read_optional_text(&dir.join("config.json"), "model config")?
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(json!({}));
        let id_of = |key: &str| -> (String, Option<u32>) {
            let tok = cfg.get(key).and_then(token_content);
            let id = tok.as_deref().and_then(|t| inner.token_to_id(t)).or_else(|| {
                let k = format!("{key}_id");
                match model_cfg.get(&k) {
                    Some(Value::Array(a)) => a.first().and_then(Value::as_u64).map(|x| x as u32),
                    Some(v) => v.as_u64().map(|x| x as u32),
                    None => None,
                }
            });
            let tok = tok.or_else(|| id.and_then(|i| inner.id_to_token(i))).unwrap_or_default();
            (tok, id)
        };
        let (bos_token, bos_id) = id_of("bos_token");
        let (eos_token, eos_id) = id_of("eos_token");
        Ok(Tokenizer {
            max_token_bytes: longest_token(&inner),
            inner,
            bos_id,
            eos_id,
            bos_token,
            eos_token,
            add_bos: cfg.get("add_bos_token").and_then(Value::as_bool).unwrap_or(false),
            chat_template,
        })
    }

    /// From GGUF metadata: `tokenizer.ggml.model` gpt2 (byte-level BPE with merges) or llama
    /// (SentencePiece BPE: pieces and scores, byte fallback, merges rebuilt from the scores).
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let model = g.get_str("tokenizer.ggml.model").context("GGUF has no tokenizer (tokenizer.ggml.model)")?;
        let tokens = strings(g, "tokenizer.ggml.tokens")?;
        let types: Vec<u64> = match g.get("tokenizer.ggml.token_type").and_then(GgufValue::as_array) {
            Some(a) => a.iter().map(|v| v.as_u64().unwrap_or(1)).collect(),
            None => vec![1; tokens.len()],
        };
        let token_id = |key: &str| g.get_u64(key).map(|v| v as u32);
        let (bos_id, eos_id) = (token_id("tokenizer.ggml.bos_token_id"), token_id("tokenizer.ggml.eos_token_id"));
        let name = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize).cloned()).unwrap_or_default();
        let (bos_token, eos_token) = (name(bos_id), name(eos_id));
        let flag = |key: &str| g.get(key).and_then(GgufValue::as_bool);
        let vocab: serde_json::Map<String, Value> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
        let (add_bos, normalizer, pre_tokenizer, decoder, model) = match model {
            "gpt2" => {
                let merges: Vec<Value> = strings(g, "tokenizer.ggml.merges")?
                    .iter()
                    .map(|m| m.split_once(' ').map(|(a, b)| json!([a, b])).with_context(|| format!("malformed merge {m:?}")))
                    .collect::<Result<_>>()?;
                let pre = gguf_pre_tokenizer(g.get_str("tokenizer.ggml.pre").unwrap_or("default"))?;
                let decoder = json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true});
                let model = json!({"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                                   "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                                   "vocab": vocab, "merges": merges});
                (flag("tokenizer.ggml.add_bos_token").unwrap_or(false), Value::Null, pre, decoder, model)
            }
            "llama" => {
                let scores: Vec<f64> = match g.get("tokenizer.ggml.scores").and_then(GgufValue::as_array) {
                    Some(a) => a.iter().map(|v| v.as_f64().context("tokenizer.ggml.scores: expected numbers")).collect::<Result<_>>()?,
                    None => bail!("GGUF metadata tokenizer.ggml.scores is missing (a llama-style tokenizer needs them)"),
                };
                if scores.len() != tokens.len() {
                    bail!("GGUF tokenizer: {} tokens but {} scores", tokens.len(), scores.len());
                }
                let merges: Vec<Value> = merges_from_scores(&tokens, &scores).into_iter().map(|(a, b)| json!([a, b])).collect();
                let unk = name(token_id("tokenizer.ggml.unknown_token_id").or(Some(0)));
                // llama.cpp puts the SentencePiece dummy-prefix space before every run of text that
                // starts the input or follows a special token: a normalizer does exactly that, since
                // tokenizers normalizes each stretch of text between added tokens on its own.
                let space_prefix = flag("tokenizer.ggml.add_space_prefix").unwrap_or(true);
                let mut steps = vec![json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"})];
                if space_prefix {
                    steps.insert(0, json!({"type": "Prepend", "prepend": "\u{2581}"}));
                }
                let decoder = json!({"type": "Sequence", "decoders": [
                    {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
                    {"type": "ByteFallback"}, {"type": "Fuse"},
                    {"type": "Strip", "content": " ", "start": usize::from(space_prefix), "stop": 0}]});
                let model = json!({"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                                   "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                                   "vocab": vocab, "merges": merges});
                // llama.cpp adds BOS to a SentencePiece vocabulary unless the file says otherwise.
                let normalizer = json!({"type": "Sequence", "normalizers": steps});
                (flag("tokenizer.ggml.add_bos_token").unwrap_or(true), normalizer, Value::Null, decoder, model)
            }
            other => bail!(
                "GGUF tokenizer model \"{other}\" is not supported (gpt2-style BPE and llama-style SentencePiece are); \
                 load the model's Hugging Face directory instead"
            ),
        };
        // Control (3) and user-defined (4) tokens match as whole strings before the model runs.
        let added: Vec<Value> = tokens
            .iter()
            .enumerate()
            .filter(|(i, _)| matches!(types.get(*i), Some(3) | Some(4)))
            .map(|(i, t)| json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": types[i] == 3}))
            .collect();
        let post = if add_bos && bos_id.is_some() {
            json!({"type": "TemplateProcessing",
                   "single": [{"SpecialToken": {"id": bos_token, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                   "pair": [{"SpecialToken": {"id": bos_token, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                   "special_tokens": {bos_token.clone(): {"id": bos_token, "ids": [bos_id], "tokens": [bos_token]}}})
        } else {
            Value::Null
        };
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": normalizer,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": post,
            "decoder": decoder,
            "model": model,
        });
        let inner: tokenizers::Tokenizer = spec
            .to_string()
            .parse()
            .map_err(|e| anyhow!("building the tokenizer from GGUF metadata ({} tokens in tokenizer.ggml.tokens): {e}", tokens.len()))?;
        Ok(Tokenizer {
            max_token_bytes: longest_token(&inner),
            inner,
            bos_id,
            eos_id,
            bos_token,
            eos_token,
            add_bos,
            chat_template: match g.get("tokenizer.chat_template") {
                None => None,
                Some(v) => Some(v.as_str().context("GGUF metadata tokenizer.chat_template must be a string")?.to_string()),
            },
        })
    }

    /// Token ids of `text`; `add_special` adds what the tokenizer adds around plain text (BOS).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        Ok(self.encode_with_offsets(text, add_special)?.0)
    }

    /// Token ids and, per token, the byte range of `text` it came from.
    pub fn encode_with_offsets(&self, text: &str, add_special: bool) -> Result<IdsWithOffsets> {
        let enc = self.inner.encode(text, add_special).map_err(|e| anyhow!("tokenizing: {e}"))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(|e| anyhow!("decoding: {e}"))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The most bytes of text one token can stand for (the longest entry of the vocabulary: a
    /// byte-level or SentencePiece token's string is never shorter than the text it covers).
    pub fn max_token_bytes(&self) -> usize {
        self.max_token_bytes
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Writes the tokenizer's files of a Hugging Face directory (tokenizer.json,
    /// tokenizer_config.json and, when there is one, chat_template.jinja), each atomically.
    pub fn save_hf_files(&self, dir: &Path, model_max_length: usize) -> Result<()> {
        use crate::io::atomic_write;
        atomic_write(&dir.join("tokenizer.json"), self.to_json()?.as_bytes())?;
        let mut cfg = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "add_bos_token": self.add_bos,
            "model_max_length": model_max_length,
        });
        if let Some(ct) = &self.chat_template {
            cfg["chat_template"] = json!(ct);
            atomic_write(&dir.join("chat_template.jinja"), ct.as_bytes())?;
        }
        atomic_write(&dir.join("tokenizer_config.json"), (serde_json::to_string_pretty(&cfg)? + "\n").as_bytes())
    }

    /// The tokenizer as tokenizer.json text (to write next to an exported model).
    pub fn to_json(&self) -> Result<String> {
        self.inner.to_string(true).map_err(|e| anyhow!("serializing the tokenizer: {e}"))
    }
}
