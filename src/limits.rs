//! What lowrank accepts: bounds on the sizes a model file may declare, checks on numbers from the
//! command line and from files, and the memory check made before any large allocation.
//!
//! Files come from strangers (model hubs, shared adapters), so a size read from one is never
//! trusted to allocate: it must lie within these bounds, be consistent with the file's length,
//! and the memory it implies must be available.

use anyhow::{bail, Result};

/// Largest model dimensions accepted from a config.json or GGUF header. Every released decoder
/// lies far inside them (Llama-3-405B: 126 layers, hidden 16384, 128 heads, vocabulary 128256).
pub const MAX_LAYERS: usize = 1024;
pub const MAX_HIDDEN: usize = 1 << 16;
pub const MAX_INTERMEDIATE: usize = 1 << 20;
pub const MAX_HEADS: usize = 1024;
pub const MAX_HEAD_DIM: usize = 1024;
pub const MAX_VOCAB: usize = 1 << 22;
/// Worker threads: more than this is a typo, and spawning them would stall the machine.
pub const MAX_THREADS: usize = 1024;
/// Optimizer steps in one run.
pub const MAX_STEPS: usize = 100_000_000;
/// A chat template's rendered output (bytes) and its execution budget (minijinja fuel: about one
/// unit per template instruction; rendering a long real conversation takes well under 1e6).
pub const MAX_TEMPLATE_OUTPUT: usize = 64 << 20;
pub const TEMPLATE_FUEL: u64 = 20_000_000;

/// What range a number must lie in; every range also requires a finite value.
#[derive(Clone, Copy, Debug)]
pub enum Allowed {
    /// > 0
    Positive,
    /// >= 0
    NonNegative,
    /// [lo, hi]
    Closed(f64, f64),
    /// (lo, hi]
    LeftOpen(f64, f64),
    /// [lo, hi)
    RightOpen(f64, f64),
}

impl Allowed {
    fn contains(self, v: f64) -> bool {
        v.is_finite()
            && match self {
                Allowed::Positive => v > 0.0,
                Allowed::NonNegative => v >= 0.0,
                Allowed::Closed(lo, hi) => lo <= v && v <= hi,
                Allowed::LeftOpen(lo, hi) => lo < v && v <= hi,
                Allowed::RightOpen(lo, hi) => lo <= v && v < hi,
            }
    }

    fn describe(self) -> String {
        match self {
            Allowed::Positive => "a positive number".into(),
            Allowed::NonNegative => "a number >= 0".into(),
            Allowed::Closed(lo, hi) => format!("in [{lo}, {hi}]"),
            Allowed::LeftOpen(lo, hi) => format!("in ({lo}, {hi}]"),
            Allowed::RightOpen(lo, hi) => format!("in [{lo}, {hi})"),
        }
    }
}

/// `value` of the setting `name` must be finite and in `allowed`; the error names both.
pub fn check(name: &str, value: f64, allowed: Allowed) -> Result<()> {
    if !allowed.contains(value) {
        bail!("{name} must be {}, got {value}", allowed.describe());
    }
    Ok(())
}

/// An integer setting within `lo..=hi`.
pub fn check_count(name: &str, value: usize, lo: usize, hi: usize) -> Result<()> {
    if value < lo || value > hi {
        bail!("{name} must be in [{lo}, {hi}], got {value}");
    }
    Ok(())
}

/// A size read from a file: at least 1 and at most `max`; `what` names the key.
pub fn check_dim(what: &str, value: u64, max: usize) -> Result<usize> {
    if value == 0 || value > max as u64 {
        bail!("{what} is {value}; it must be in [1, {max}]");
    }
    Ok(value as usize)
}

/// Bytes of memory the system can still give this process (MemAvailable + free swap), when known.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |key: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(key))?;
        line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kib| kib * 1024)
    };
    Some(field("MemAvailable:")? + field("SwapFree:").unwrap_or(0))
}

/// Refuses, with the number of bytes and the reason, an allocation of `bytes` for `what` that the
/// machine cannot hold. Call it before allocating anything whose size comes from outside.
pub fn ensure_memory(bytes: u128, what: &str) -> Result<()> {
    let Some(avail) = available_memory() else { return Ok(()) };
    if bytes > avail as u128 {
        bail!("{what} needs {} ({bytes} bytes) but only {} of memory is available", human_bytes(bytes), human_bytes(avail as u128));
    }
    Ok(())
}

/// 1536 → "1.5 KiB".
pub fn human_bytes(b: u128) -> String {
    let units = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} bytes")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_reject_non_finite_and_name_the_setting() {
        assert!(check("lr", 1e-3, Allowed::Positive).is_ok());
        let e = check("lr", -1.0, Allowed::Positive).unwrap_err().to_string();
        assert_eq!(e, "lr must be a positive number, got -1");
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert!(check("x", bad, Allowed::NonNegative).is_err());
        }
        assert!(check("top-p", 1.0, Allowed::LeftOpen(0.0, 1.0)).is_ok());
        assert!(check("top-p", 0.0, Allowed::LeftOpen(0.0, 1.0)).unwrap_err().to_string().contains("(0, 1]"));
        assert!(check("dropout", 1.0, Allowed::RightOpen(0.0, 1.0)).is_err());
        assert!(check_count("threads", 2000, 0, MAX_THREADS).unwrap_err().to_string().contains("[0, 1024]"));
        assert!(check_dim("block_count", 0, MAX_LAYERS).is_err());
        assert_eq!(check_dim("block_count", 30, MAX_LAYERS).unwrap(), 30);
    }

    #[test]
    fn memory_check_refuses_the_impossible() {
        let e = ensure_memory(1 << 70, "a test buffer").unwrap_err().to_string();
        assert!(e.contains("a test buffer needs 1024.0 EiB"), "{e}");
        assert!(ensure_memory(1 << 20, "a small buffer").is_ok());
        assert_eq!(human_bytes(1536), "1.5 KiB");
    }
}
