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

/// Runs `f` on a pool of `threads` worker threads (0: the global pool, one per core).
pub fn in_pool<T: Send>(threads: usize, f: impl FnOnce() -> anyhow::Result<T> + Send) -> anyhow::Result<T> {
    limits::check_count("threads (0 = all cores)", threads, 0, limits::MAX_THREADS)?;
    if threads == 0 {
        return f();
    }
    use anyhow::Context;
    rayon::ThreadPoolBuilder::new().num_threads(threads).build().context("starting the worker threads")?.install(f)
}
pub use model::{Batch, DecoderModel};
pub mod tokenizer;

/// The README's Rust example, compiled as a doctest so it cannot drift from the API.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctest;
