//! Learning-rate schedules of transformers' `get_scheduler`: the multiplier applied to the base
//! learning rate at optimizer step `step` (0-based), with linear warmup.

use anyhow::{bail, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    Constant,
    ConstantWithWarmup,
    Linear,
    Cosine,
}

impl Schedule {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "constant" => Schedule::Constant,
            "constant_with_warmup" => Schedule::ConstantWithWarmup,
            "linear" => Schedule::Linear,
            "cosine" => Schedule::Cosine,
            _ => bail!("unknown schedule \"{s}\" (use linear, cosine, constant or constant_with_warmup)"),
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Schedule::Constant => "constant",
            Schedule::ConstantWithWarmup => "constant_with_warmup",
            Schedule::Linear => "linear",
            Schedule::Cosine => "cosine",
        }
    }

    pub fn factor(&self, step: usize, warmup: usize, total: usize) -> f64 {
        let (step, warmup, total) = (step as f64, warmup as f64, total as f64);
        if *self == Schedule::Constant {
            return 1.0;
        }
        if step < warmup {
            return step / warmup.max(1.0);
        }
        match self {
            Schedule::Linear => ((total - step) / (total - warmup).max(1.0)).max(0.0),
            Schedule::Cosine => {
                let progress = (step - warmup) / (total - warmup).max(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * 2.0 * 0.5 * progress).cos())).max(0.0)
            }
            _ => 1.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay_like_transformers() {
        let lin: Vec<f64> = (0..6).map(|s| Schedule::Linear.factor(s, 2, 6)).collect();
        assert_eq!(lin, vec![0.0, 0.5, 1.0, 0.75, 0.5, 0.25]);
        let cos: Vec<f64> = (0..5).map(|s| Schedule::Cosine.factor(s, 1, 5)).collect();
        assert!((cos[3] - 0.5).abs() < 1e-12 && cos[0] == 0.0 && cos[1] == 1.0);
        assert_eq!(Schedule::ConstantWithWarmup.factor(1, 4, 10), 0.25);
        assert_eq!(Schedule::Constant.factor(0, 4, 10), 1.0);
    }
}
