//! metrics.jsonl: one line per optimizer step and per evaluation, read back for plots and resumes.

use crate::io::atomic_write;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One line of metrics.jsonl.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Metric {
    pub step: usize,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub lr: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub grad_norm: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tokens_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub eval_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub eval_ppl: Option<f64>,
    pub epoch: f64,
    pub elapsed_s: f64,
}

pub fn read_metrics(path: &Path) -> Result<Vec<Metric>> {
    let Some(text) = crate::io::read_optional_text(path, "metrics file")? else { return Ok(vec![]) };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("{}:{}", path.display(), i + 1)))
        .collect()
}

pub(crate) fn write_metrics(path: &Path, metrics: &[Metric]) -> Result<()> {
    let mut text = String::new();
    for m in metrics {
        text.push_str(&serde_json::to_string(m)?);
        text.push('\n');
    }
    atomic_write(path, text.as_bytes())
}

/// Appends one line (a torn last line is impossible to mistake: each line is one write).
pub(crate) fn append_metric(path: &Path, m: &Metric) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).with_context(|| format!("opening {}", path.display()))?;
    f.write_all(format!("{}\n", serde_json::to_string(m)?).as_bytes())?;
    Ok(())
}
