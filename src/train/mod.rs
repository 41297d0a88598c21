//! Training: AdamW, learning-rate schedules and gradient clipping, each matching PyTorch /
//! transformers exactly so loss curves compare with PEFT runs.

pub mod checkpoint;
pub mod eval;
pub mod metrics;
pub mod optim;
pub mod plot;
pub mod schedule;
pub mod trainer;

pub use optim::{clip_grad_norm, AdamW};
pub use schedule::Schedule;
