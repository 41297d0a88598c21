//! A pre-trained model with its tokenizer, loaded from a Hugging Face directory or a GGUF file.

use crate::data::ChatTemplate;
use crate::model::gguf::GgufFile;
use crate::model::{DecoderModel, WeightFormat};
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

pub struct Pretrained {
    pub model: DecoderModel,
    pub tokenizer: Tokenizer,
    pub path: PathBuf,
}

impl Pretrained {
    /// Loads `path`: a directory with config.json, safetensors weights and tokenizer.json, or a
    /// single .gguf file (tokenizer and chat template from its metadata); weights in f32.
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_as(path, WeightFormat::F32)
    }

    /// As `load`, with the frozen weights stored in `format`.
    pub fn load_as(path: &Path, format: WeightFormat) -> Result<Self> {
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(crate::io::missing(e, format!("model path {} does not exist", path.display())))
            }
            Err(e) => return Err(e).with_context(|| format!("model path {}", path.display())),
        };
        let (model, tokenizer) = if meta.is_dir() {
            let model = DecoderModel::from_hf_dir_as(path, format)?;
            let tokenizer = Tokenizer::from_hf_dir(path)?;
            (model, tokenizer)
        } else {
            let g = GgufFile::open(path)?;
            let model = DecoderModel::from_gguf(&g, format).with_context(|| format!("loading {}", path.display()))?;
            let tokenizer = Tokenizer::from_gguf(&g).with_context(|| format!("loading the tokenizer of {}", path.display()))?;
            (model, tokenizer)
        };
        let vocab = model.config.vocab_size;
        let ids = [("BOS token", tokenizer.bos_id), ("EOS token", tokenizer.eos_id), ("BOS token (config)", model.config.bos_token_id)]
            .into_iter()
            .chain(model.config.eos_token_ids.iter().map(|&id| ("EOS token (config)", Some(id))));
        for (what, id) in ids {
            if let Some(id) = id.filter(|&id| id as usize >= vocab) {
                bail!("{}: the {what} id {id} is outside the vocabulary of {vocab} tokens", path.display());
            }
        }
        if tokenizer.vocab_size() > model.config.vocab_size {
            bail!("the tokenizer has {} tokens but the model only {} embeddings", tokenizer.vocab_size(), model.config.vocab_size);
        }
        Ok(Pretrained { model, tokenizer, path: path.to_path_buf() })
    }

    /// Writes model and tokenizer as a Hugging Face directory that transformers loads.
    pub fn save_hf_dir(&self, dir: &Path) -> Result<()> {
        crate::model::export::save_model_files(&self.model, dir)?;
        self.tokenizer.save_hf_files(dir, self.model.config.max_position_embeddings)
    }

    /// What adapters record as `base_model_name_or_path`.
    pub fn name(&self) -> String {
        self.path.to_string_lossy().into_owned()
    }

    /// The model's chat template, ready to render (None when the model has none).
    pub fn chat_template(&self) -> Result<Option<ChatTemplate>> {
        let t = &self.tokenizer;
        let origin = format!("the chat template of {}", self.path.display());
        t.chat_template
            .as_deref()
            .map(|s| Ok(ChatTemplate::new(s, &t.bos_token, &t.eos_token).with_context(|| origin.clone())?.with_origin(&origin)))
            .transpose()
    }

    /// Token ids that end generation: EOS and, for chat models, the end-of-turn token.
    pub fn stop_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.model.config.eos_token_ids.clone();
        ids.extend(self.tokenizer.eos_id);
        for t in ["<|im_end|>", "<|eot_id|>", "<|end|>", "</s>", "<|endoftext|>"] {
            ids.extend(self.tokenizer.token_to_id(t));
        }
        ids.sort();
        ids.dedup();
        ids
    }
}
