//! LoRA: configuration (PEFT's names), adapter weights and their init, PEFT adapter files.

pub mod adapter;
pub mod combine;
pub mod config;
pub mod gguf_export;
pub mod peft;

pub use adapter::{LoraAdapter, LoraModule};
pub use config::{LoraConfig, TargetModules};
