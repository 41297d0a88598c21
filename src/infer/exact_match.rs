//! Exact-match accuracy: generate an answer for each record's prompt (greedy) and compare it,
//! whitespace-trimmed, with the record's completion or final assistant message.

use super::{generate, GenerateParams, SamplingParams};
use crate::data::{ChatTemplate, Record};
use crate::model::adapt::SharedAdapter;
use crate::pretrained::Pretrained;
use anyhow::{bail, Result};

#[derive(Clone, Debug, Default)]
pub struct ExactMatch {
    pub correct: usize,
    pub total: usize,
    /// (prompt, expected, generated) for every record.
    pub answers: Vec<(String, String, String)>,
}

impl ExactMatch {
    pub fn accuracy(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.correct as f64 / self.total as f64
        }
    }
}

/// The prompt text (as the model sees it before answering) and the expected answer.
pub fn prompt_and_answer(record: &Record, template: Option<&ChatTemplate>) -> Result<(String, String)> {
    Ok(match record {
        Record::PromptCompletion { prompt, completion } => (prompt.clone(), completion.clone()),
        Record::Alpaca { output, .. } => (crate::data::examples::alpaca_prompt(record), output.clone()),
        Record::Messages(msgs) => {
            let Some(last) = msgs.iter().rposition(|m| m.role == "assistant") else { bail!("no assistant turn to compare with") };
            let Some(t) = template else { bail!("the model has no chat template") };
            (t.render(&msgs[..last], true)?, msgs[last].content.clone())
        }
        Record::Text(_) => bail!("exact-match needs prompt/completion, alpaca or messages records, not plain text"),
    })
}

pub fn exact_match(
    p: &Pretrained,
    adapter: Option<(SharedAdapter, f32)>,
    records: &[Record],
    batch_size: usize,
    max_new_tokens: usize,
) -> Result<ExactMatch> {
    let t = &p.tokenizer;
    let template = p.chat_template()?;
    let mut result = ExactMatch::default();
    let params = GenerateParams { max_new_tokens, sampling: SamplingParams::default(), stop_ids: p.stop_ids(), stop_strings: vec![] };
    for chunk in records.chunks(batch_size.max(1)) {
        let pairs: Vec<(String, String)> = chunk.iter().map(|r| prompt_and_answer(r, template.as_ref())).collect::<Result<_>>()?;
        // Chat renders carry their own special tokens; plain prompts get what plain text gets.
        let special = !matches!(chunk[0], Record::Messages(_));
        let prompts: Vec<Vec<u32>> = pairs.iter().map(|(pr, _)| t.encode(pr, special)).collect::<Result<_>>()?;
        let outs = generate(&p.model, t, &prompts, adapter.clone(), &params, None)?;
        for ((prompt, want), got) in pairs.into_iter().zip(outs) {
            let got = t.decode(&got, true)?;
            result.total += 1;
            if got.trim() == want.trim() {
                result.correct += 1;
            }
            result.answers.push((prompt, want, got));
        }
    }
    Ok(result)
}
