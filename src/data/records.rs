//! JSONL training records in the four common shapes, read with errors that name file:line.

use super::template::Message;
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `{"text": ...}`: every token trains.
    Text,
    /// `{"prompt": ..., "completion": ...}`
    PromptCompletion,
    /// `{"instruction": ..., "input": ..., "output": ...}` (input optional)
    Alpaca,
    /// `{"messages": [{"role": ..., "content": ...}, ...]}` rendered with the chat template.
    Messages,
}

impl Format {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "text" => Format::Text,
            "prompt-completion" | "completion" => Format::PromptCompletion,
            "alpaca" => Format::Alpaca,
            "messages" | "chat" => Format::Messages,
            _ => bail!("unknown data format \"{s}\" (use text, prompt-completion, alpaca or messages)"),
        })
    }

    /// The format a JSON object's keys indicate.
    fn detect(obj: &serde_json::Map<String, Value>) -> Option<Self> {
        if obj.contains_key("messages") {
            Some(Format::Messages)
        } else if obj.contains_key("prompt") && obj.contains_key("completion") {
            Some(Format::PromptCompletion)
        } else if obj.contains_key("instruction") && obj.contains_key("output") {
            Some(Format::Alpaca)
        } else if obj.contains_key("text") {
            Some(Format::Text)
        } else {
            None
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Record {
    Text(String),
    PromptCompletion { prompt: String, completion: String },
    Alpaca { instruction: String, input: String, output: String },
    Messages(Vec<Message>),
}

fn field<'a>(obj: &'a serde_json::Map<String, Value>, key: &str) -> Result<&'a str> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => bail!("field \"{key}\" must be a string, found {}", kind(other)),
        None => bail!("missing field \"{key}\""),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Parses one JSON line as `format` (or the format its keys indicate).
pub fn parse_record(line: &str, format: Option<Format>) -> Result<Record> {
    let v: Value = serde_json::from_str(line).map_err(|e| anyhow::anyhow!("invalid JSON: {e}"))?;
    let Value::Object(obj) = v else { bail!("expected a JSON object, found {}", kind(&v)) };
    let format = match format.or_else(|| Format::detect(&obj)) {
        Some(f) => f,
        None => bail!("cannot tell the record's format from its keys (expected \"text\", \"prompt\"+\"completion\", \"instruction\"+\"output\" or \"messages\")"),
    };
    Ok(match format {
        Format::Text => Record::Text(field(&obj, "text")?.to_string()),
        Format::PromptCompletion => {
            Record::PromptCompletion { prompt: field(&obj, "prompt")?.into(), completion: field(&obj, "completion")?.into() }
        }
        Format::Alpaca => Record::Alpaca {
            instruction: field(&obj, "instruction")?.into(),
            input: if obj.contains_key("input") { field(&obj, "input")?.into() } else { String::new() },
            output: field(&obj, "output")?.into(),
        },
        Format::Messages => {
            let Some(Value::Array(list)) = obj.get("messages") else { bail!("field \"messages\" must be an array") };
            if list.is_empty() {
                bail!("\"messages\" is empty");
            }
            if list.len() > MAX_MESSAGES {
                // Loss masking renders every prefix of the conversation: quadratic in its length.
                bail!("\"messages\" has {} turns; at most {MAX_MESSAGES} are accepted", list.len());
            }
            let mut msgs = Vec::with_capacity(list.len());
            for (i, m) in list.iter().enumerate() {
                let Value::Object(m) = m else { bail!("messages[{i}] must be an object") };
                let role = field(m, "role").with_context(|| format!("messages[{i}]"))?;
                if !matches!(role, "system" | "user" | "assistant" | "tool") {
                    bail!("messages[{i}]: unknown role \"{role}\" (expected system, user, assistant or tool)");
                }
                msgs.push(Message::new(role, field(m, "content").with_context(|| format!("messages[{i}]"))?));
            }
            if !msgs.iter().any(|m| m.role == "assistant") {
                bail!("\"messages\" has no assistant turn, so nothing would train");
            }
            Record::Messages(msgs)
        }
    })
}

/// Turns in one conversation record.
pub const MAX_MESSAGES: usize = 1024;

/// The longest JSONL line read (a longer one is an error naming its line, not an allocation).
pub const MAX_LINE_BYTES: u64 = 256 << 20;

/// Records of a JSONL file and the number of lines skipped. A bad line is an error naming
/// `file:line`, or with `skip_bad` is skipped and counted. Blank lines are ignored, and so is a
/// UTF-8 byte-order mark at the start of the file. The file is read line by line, so nothing
/// but the records themselves is held in memory.
pub fn read_jsonl(path: &Path, format: Option<Format>, skip_bad: bool) -> Result<(Vec<Record>, usize)> {
    use std::io::{BufRead, Read};
    let file = crate::io::open_input(path, "data file")?;
    let mut reader = std::io::BufReader::new(file);
    let mut records = Vec::new();
    let mut skipped = 0;
    let mut buf = Vec::new();
    for number in 1.. {
        buf.clear();
        let n =
            (&mut reader).take(MAX_LINE_BYTES + 1).read_until(b'\n', &mut buf).with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        if n as u64 > MAX_LINE_BYTES {
            bail!("{}:{number}: the line is longer than {} MiB", path.display(), MAX_LINE_BYTES >> 20);
        }
        let bytes = if number == 1 { buf.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&buf) } else { &buf[..] };
        let parsed = match std::str::from_utf8(bytes) {
            Ok(line) if line.trim().is_empty() => continue,
            Ok(line) => parse_record(line, format),
            Err(e) => Err(anyhow::anyhow!("not UTF-8 text (byte {} of the line)", e.valid_up_to() + 1)),
        };
        match parsed {
            Ok(r) => records.push(r),
            Err(_) if skip_bad => skipped += 1,
            Err(e) => bail!("{}:{number}: {e:#}", path.display()),
        }
    }
    if records.is_empty() {
        bail!("{}: no examples{}", path.display(), if skipped > 0 { format!(" ({skipped} bad lines skipped)") } else { String::new() });
    }
    Ok((records, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_formats_and_reports_problems() {
        assert_eq!(parse_record(r#"{"text":"a"}"#, None).unwrap(), Record::Text("a".into()));
        assert!(matches!(parse_record(r#"{"prompt":"p","completion":"c"}"#, None).unwrap(), Record::PromptCompletion { .. }));
        assert!(matches!(parse_record(r#"{"instruction":"i","output":"o"}"#, None).unwrap(), Record::Alpaca { .. }));
        let m = parse_record(r#"{"messages":[{"role":"user","content":"q"},{"role":"assistant","content":"a"}]}"#, None).unwrap();
        assert!(matches!(m, Record::Messages(ref v) if v.len() == 2));
        let err = |l: &str, f: Option<Format>| format!("{:#}", parse_record(l, f).unwrap_err());
        assert!(err(r#"{"text": 3}"#, None).contains("must be a string"));
        assert!(err(r#"{"prompt":"p"}"#, Some(Format::PromptCompletion)).contains("missing field \"completion\""));
        assert!(err(r#"{"foo":1}"#, None).contains("cannot tell"));
        assert!(err(r#"{"text": "a""#, None).contains("invalid JSON"));
        assert!(err(r#"[1]"#, None).contains("JSON object"));
        assert!(err(r#"{"messages":[{"role":"robot","content":"x"}]}"#, None).contains("robot"));
        assert!(err(r#"{"messages":[{"role":"user","content":"x"}]}"#, None).contains("no assistant"));
        let long = format!("{{\"messages\":[{}]}}", vec![r#"{"role":"user","content":"x"}"#; 1025].join(","));
        assert!(err(&long, None).contains("at most 1024"));
    }

    #[test]
    fn file_errors_name_the_line_and_skipping_counts() {
        let p = std::env::temp_dir().join(format!("lowrank-records-{}.jsonl", std::process::id()));
        std::fs::write(&p, "{\"text\":\"ok\"}\n\n{\"text\": oops}\n{\"text\":\"fine\"}\n").unwrap();
        let e = format!("{:#}", read_jsonl(&p, None, false).unwrap_err());
        assert!(e.contains(&format!("{}:3:", p.display())), "{e}");
        let (recs, skipped) = read_jsonl(&p, None, true).unwrap();
        assert_eq!((recs.len(), skipped), (2, 1));
        std::fs::write(&p, "\n\n").unwrap();
        assert!(format!("{:#}", read_jsonl(&p, None, false).unwrap_err()).contains("no examples"));
        // A byte-order mark is not part of the first record; bad UTF-8 names its line.
        std::fs::write(&p, "\u{FEFF}{\"text\":\"bom\"}\r\n{\"text\":\"two\"}\n").unwrap();
        assert_eq!(read_jsonl(&p, None, false).unwrap().0, vec![Record::Text("bom".into()), Record::Text("two".into())]);
        std::fs::write(&p, b"{\"text\":\"ok\"}\n{\"text\":\"\xff\"}\n").unwrap();
        let e = format!("{:#}", read_jsonl(&p, None, false).unwrap_err());
        assert!(e.contains(":2: not UTF-8"), "{e}");
        std::fs::remove_file(&p).unwrap();
    }
}
