//! Wall time per phase of the model's work, for `lowrank bench train --profile`. Off unless
//! enabled; a timed region then costs one relaxed atomic load. Regions are timed on the calling
//! thread around whole kernels (which parallelize inside). Only the outermost region records: a
//! region opened while another is open, on any thread (a kernel timed inside a parallel loop that
//! is timed as a whole, as decode attention runs one task per sequence), counts under the outer
//! one, so the phases of a step add up to at most its wall time; the rest is copies, layout
//! changes and allocation.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Products with the frozen weights (forward, and the input gradient in backward).
    FrozenGemm,
    /// The low-rank products x·Aᵀ, u·Bᵀ and their gradients, with dropout.
    LoraGemm,
    /// Attention scores, softmax and values, forward and backward.
    Attention,
    /// RMSNorm, RoPE, SwiGLU, residual adds, embedding lookups.
    Elementwise,
    /// The LM head with cross-entropy (and its gradient).
    LmHead,
    /// AdamW and gradient clipping.
    Optimizer,
}

impl Phase {
    pub const ALL: [Phase; 6] = [Self::FrozenGemm, Self::LoraGemm, Self::Attention, Self::Elementwise, Self::LmHead, Self::Optimizer];

    pub fn name(self) -> &'static str {
        match self {
            Self::FrozenGemm => "frozen_gemm",
            Self::LoraGemm => "lora_gemm",
            Self::Attention => "attention",
            Self::Elementwise => "norm_rope_swiglu",
            Self::LmHead => "lm_head_ce",
            Self::Optimizer => "optimizer",
        }
    }
}

static ENABLED: AtomicBool = AtomicBool::new(false);
/// Timed regions open now, on all threads.
static OPEN: AtomicUsize = AtomicUsize::new(0);
static NANOS: [AtomicU64; 6] = [const { AtomicU64::new(0) }; 6];

/// Starts or stops recording.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Records the time until it is dropped under its phase (when recording is on and no other
/// region is open).
pub struct Timer(Option<(Phase, Instant, bool)>);

pub fn time(phase: Phase) -> Timer {
    Timer(ENABLED.load(Ordering::Relaxed).then(|| (phase, Instant::now(), OPEN.fetch_add(1, Ordering::Relaxed) == 0)))
}

impl Drop for Timer {
    fn drop(&mut self) {
        if let Some((phase, start, outermost)) = self.0 {
            OPEN.fetch_sub(1, Ordering::Relaxed);
            if outermost {
                NANOS[phase as usize].fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
            }
        }
    }
}

/// Seconds recorded per phase since the last call, and resets them.
pub fn take() -> [(Phase, f64); 6] {
    Phase::ALL.map(|p| (p, NANOS[p as usize].swap(0, Ordering::Relaxed) as f64 * 1e-9))
}

/// Minor page faults of this process so far (each one a first touch of fresh memory), from
/// /proc/self/stat; 0 where that cannot be read.
pub fn minor_faults() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesized command name: state is field 3, minflt field 10.
    stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(7)).and_then(|f| f.parse().ok()).unwrap_or(0)
}
