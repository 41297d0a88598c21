//! LoRA: configuration (PEFT's names), adapter weights and their init, adapter files (PEFT
//! directories and llama.cpp GGUF adapters).

pub mod adapter;
pub mod combine;
pub mod config;
pub mod gguf;
pub mod peft;

pub use adapter::{LoraAdapter, LoraModule};
pub use config::{LoraConfig, TargetModules};

/// Loads an adapter for `model` from a PEFT directory or a llama.cpp GGUF adapter file.
pub fn load(path: &std::path::Path, model: &crate::model::DecoderModel) -> anyhow::Result<LoraAdapter> {
    if std::fs::metadata(path).is_ok_and(|m| m.is_file()) && crate::model::gguf::is_gguf_file(path) {
        gguf::load(path, model)
    } else {
        peft::load(path, model)
    }
}
