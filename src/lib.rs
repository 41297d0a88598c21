//! lowrank: LoRA fine-tuning of pre-trained transformer language models on the CPU, with an
//! explicit forward and hand-derived backward pass and PEFT-compatible adapters.
//!
//! Layers, top to bottom: `train` (optimizer, schedules), `lora` (config, adapters, PEFT files),
//! `model` (configs, weights, architectures), `kernels` (numerics on slices).

pub mod bench;
pub mod convert;
pub mod data;
pub mod infer;
pub mod inspect;
pub mod io;
pub mod kernels;
pub mod limits;
pub mod lora;
pub mod model;
pub mod pretrained;
pub mod profile;
pub mod rng;
pub mod serve;
pub mod train;

pub use lora::{LoraAdapter, LoraConfig, TargetModules};
pub use model::{Batch, DecoderModel};
pub mod tokenizer;

/// The README's Rust example, compiled as a doctest so it cannot drift from the API.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctest;
