//! Model architectures: configuration, weight files and the decoder family's forward/backward.

pub mod adapt;
pub mod buffers;
pub mod config;
pub mod decoder;
pub mod export;
pub mod frozen;
pub mod gguf;
pub mod quant;
pub mod weights;

pub use adapt::{Linear, LowRank, LowRankSource, ModuleKind, ModuleSpec, NoAdapter};
pub use config::{Arch, DecoderConfig};
pub use decoder::{Batch, DecoderModel};
pub use frozen::{FrozenMatrix, WeightFormat};
pub use weights::TensorStore;
