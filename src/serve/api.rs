//! OpenAI's request and response shapes: parsing a completion request's JSON into what the
//! scheduler runs (naming the field of any error), and the JSON of answers, stream chunks and
//! errors.

use serde_json::{json, Value};

/// An error as OpenAI's API answers it: an HTTP status and `{"error": {message, type, param, code}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn bad_request(param: &str, message: impl Into<String>) -> Self {
        ApiError { status: 400, message: message.into(), kind: "invalid_request_error", param: Some(param.into()), code: None }
    }

    pub fn new(status: u16, kind: &'static str, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), kind, param: None, code: Some(code) }
    }

    pub fn to_json(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

/// What a completion request asks for, checked.
#[derive(Debug, Clone)]
pub struct CompletionRequest {
    pub model: String,
    pub input: Input,
    pub max_tokens: Option<usize>,
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// vLLM's extension: generate past the model's end-of-sequence tokens, up to `max_tokens`
    /// (stop strings still apply). Load tests use it so every request is the same length.
    pub ignore_eos: bool,
}

#[derive(Debug, Clone)]
pub enum Input {
    /// `/v1/chat/completions`: (role, text) messages for the chat template.
    Messages(Vec<(String, String)>),
    /// `/v1/completions`: plain text.
    Prompt(String),
}

impl Input {
    /// The request field the input came from, for errors about it.
    pub fn param(&self) -> &'static str {
        match self {
            Input::Messages(_) => "messages",
            Input::Prompt(_) => "prompt",
        }
    }
}

/// Fields a value of the wrong type is named by.
fn wrong(param: &str, want: &str) -> ApiError {
    ApiError::bad_request(param, format!("'{param}' must be {want}"))
}

fn opt_number(v: &Value, key: &str, lo: f64, hi: f64) -> Result<Option<f64>, ApiError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            let x = n.as_f64().unwrap_or(f64::NAN);
            if x.is_finite() && x >= lo && x <= hi {
                Ok(Some(x))
            } else {
                Err(ApiError::bad_request(key, format!("'{key}' must be a number in [{lo}, {hi}], got {x}")))
            }
        }
        Some(_) => Err(wrong(key, "a number")),
    }
}

fn opt_uint(v: &Value, key: &str, lo: u64, hi: u64) -> Result<Option<u64>, ApiError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(x) if x >= lo && x <= hi => Ok(Some(x)),
            _ => Err(ApiError::bad_request(key, format!("'{key}' must be an integer in [{lo}, {hi}], got {n}"))),
        },
        Some(_) => Err(wrong(key, "an integer")),
    }
}

fn opt_bool(v: &Value, key: &str) -> Result<bool, ApiError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(wrong(key, "true or false")),
    }
}

/// A message's content: a string, or OpenAI's array of parts of which only text parts are allowed.
fn content_text(v: &Value, param: &str) -> Result<String, ApiError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok(String::new()),
        Value::Array(parts) => {
            let mut text = String::new();
            for (i, p) in parts.iter().enumerate() {
                match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    _ => return Err(ApiError::bad_request(&format!("{param}[{i}]"), "only text content parts are supported")),
                }
            }
            Ok(text)
        }
        _ => Err(wrong(param, "a string or an array of text parts")),
    }
}

/// A request body as JSON, or 400 naming the body.
pub fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request("body", format!("the body is not valid JSON: {e}")))
}

/// Most stop strings a request may give (OpenAI's limit).
pub const MAX_STOP: usize = 4;

/// Parses a request body of `/v1/chat/completions` (`chat`) or `/v1/completions`. Unknown fields
/// are ignored, as OpenAI-compatible servers do.
pub fn parse_completion(body: &[u8], chat: bool, max_context: usize) -> Result<CompletionRequest, ApiError> {
    let v = parse_json(body)?;
    if !v.is_object() {
        return Err(ApiError::bad_request("body", "the body must be a JSON object"));
    }
    let model = match v.get("model") {
        Some(Value::String(s)) => s.clone(),
        None => return Err(ApiError::bad_request("model", "'model' is required")),
        Some(_) => return Err(wrong("model", "a string")),
    };
    let input = if chat {
        let Some(Value::Array(msgs)) = v.get("messages") else {
            return Err(ApiError::bad_request("messages", "'messages' must be a non-empty array of {role, content}"));
        };
        if msgs.is_empty() {
            return Err(ApiError::bad_request("messages", "'messages' must not be empty"));
        }
        let mut out = Vec::with_capacity(msgs.len());
        for (i, m) in msgs.iter().enumerate() {
            let role = m.get("role").and_then(Value::as_str).ok_or_else(|| wrong(&format!("messages[{i}].role"), "a string"))?;
            if !["system", "user", "assistant", "developer", "tool"].contains(&role) {
                return Err(ApiError::bad_request(&format!("messages[{i}].role"), format!("unknown role {role:?}")));
            }
            let role = if role == "developer" { "system" } else { role };
            out.push((role.to_string(), content_text(m.get("content").unwrap_or(&Value::Null), &format!("messages[{i}].content"))?));
        }
        Input::Messages(out)
    } else {
        match v.get("prompt") {
            Some(Value::String(s)) => Input::Prompt(s.clone()),
            Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => Input::Prompt(a[0].as_str().unwrap_or_default().to_string()),
            Some(Value::Array(_)) => {
                return Err(ApiError::bad_request("prompt", "'prompt' must be one string (batches of prompts are not supported)"))
            }
            None => return Err(ApiError::bad_request("prompt", "'prompt' is required")),
            Some(_) => return Err(wrong("prompt", "a string")),
        }
    };
    let ctx = max_context as u64;
    let max_tokens = match opt_uint(&v, "max_completion_tokens", 1, ctx)? {
        Some(n) => Some(n),
        None => opt_uint(&v, "max_tokens", 1, ctx)?,
    }
    .map(|n| n as usize);
    if let Some(n) = opt_uint(&v, "n", 1, u64::MAX)? {
        if n != 1 {
            return Err(ApiError::bad_request("n", "only n = 1 is supported"));
        }
    }
    let stop = match v.get("stop") {
        None | Some(Value::Null) => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|s| s.as_str().map(str::to_string).ok_or_else(|| wrong("stop", "a string or an array of strings")))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(wrong("stop", "a string or an array of strings")),
    };
    if stop.len() > MAX_STOP {
        return Err(ApiError::bad_request("stop", format!("at most {MAX_STOP} stop strings, got {}", stop.len())));
    }
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::bad_request("stop", "a stop string must not be empty"));
    }
    let include_usage = match v.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(o @ Value::Object(_)) => opt_bool(o, "include_usage").map_err(|_| wrong("stream_options.include_usage", "true or false"))?,
        Some(_) => return Err(wrong("stream_options", "an object")),
    };
    Ok(CompletionRequest {
        model,
        input,
        max_tokens,
        temperature: opt_number(&v, "temperature", 0.0, 2.0)?.unwrap_or(1.0) as f32,
        top_p: match opt_number(&v, "top_p", 0.0, 1.0)? {
            Some(p) if p <= 0.0 => return Err(ApiError::bad_request("top_p", "'top_p' must be in (0, 1]")),
            Some(p) => p as f32,
            None => 1.0,
        },
        seed: opt_uint(&v, "seed", 0, u64::MAX)?.unwrap_or(0),
        stop,
        stream: opt_bool(&v, "stream")?,
        include_usage,
        ignore_eos: opt_bool(&v, "ignore_eos")?,
    })
}

/// A string field of a small JSON body (the adapter endpoints).
pub fn string_field(v: &Value, key: &str) -> Result<String, ApiError> {
    match v.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        None | Some(Value::Null) => Err(ApiError::bad_request(key, format!("'{key}' is required"))),
        Some(_) => Err(wrong(key, "a non-empty string")),
    }
}

pub fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// The whole answer of a request that did not stream.
pub fn completion_json(chat: bool, id: &str, created: u64, model: &str, text: &str, finish: &str, usage: Value) -> Value {
    let choice = if chat {
        json!({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": finish})
    } else {
        json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish})
    };
    let object = if chat { "chat.completion" } else { "text_completion" };
    json!({"id": id, "object": object, "created": created, "model": model, "choices": [choice], "usage": usage})
}

/// One streamed chunk: `text` (for chat, as the delta's content; `first` also carries the role)
/// and a finish reason on the last one.
pub fn chunk_json(chat: bool, id: &str, created: u64, model: &str, text: &str, first: bool, finish: Option<&str>) -> Value {
    let choice = if chat {
        let delta = match (first, finish) {
            (true, _) => json!({"role": "assistant", "content": text}),
            (false, Some(_)) if text.is_empty() => json!({}),
            _ => json!({"content": text}),
        };
        json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
    } else {
        json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish})
    };
    let object = if chat { "chat.completion.chunk" } else { "text_completion" };
    json!({"id": id, "object": object, "created": created, "model": model, "choices": [choice]})
}

/// The last chunk of a stream with `stream_options.include_usage`: no choices, the usage.
pub fn usage_chunk_json(chat: bool, id: &str, created: u64, model: &str, usage: Value) -> Value {
    let object = if chat { "chat.completion.chunk" } else { "text_completion" };
    json!({"id": id, "object": object, "created": created, "model": model, "choices": [], "usage": usage})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: &str) -> Result<CompletionRequest, ApiError> {
        parse_completion(body.as_bytes(), true, 8192)
    }

    #[test]
    fn requests_parse_and_errors_name_their_field() {
        let r = chat(r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}],"max_tokens":5,"stop":"x","seed":3,"extra":1}"#).unwrap();
        assert_eq!((r.max_tokens, r.stop.clone(), r.seed, r.stream, r.ignore_eos), (Some(5), vec!["x".to_string()], 3, false, false));
        assert!(matches!(&r.input, Input::Messages(m) if m[0] == ("user".to_string(), "hi".to_string())));
        let r =
            chat(r#"{"model":"m","messages":[{"role":"user","content":"a"}],"max_tokens":5,"max_completion_tokens":7,"ignore_eos":true}"#)
                .unwrap();
        assert_eq!((r.max_tokens, r.ignore_eos), (Some(7), true));
        for (body, param) in [
            ("{", "body"),
            ("[]", "body"),
            (r#"{"messages":[]}"#, "model"),
            (r#"{"model":"m"}"#, "messages"),
            (r#"{"model":"m","messages":[{"role":"bot","content":"a"}]}"#, "messages[0].role"),
            (r#"{"model":"m","messages":[{"role":"user","content":"a"}],"n":2}"#, "n"),
            (r#"{"model":"m","messages":[{"role":"user","content":"a"}],"temperature":"hot"}"#, "temperature"),
            (r#"{"model":"m","messages":[{"role":"user","content":"a"}],"temperature":3}"#, "temperature"),
            (r#"{"model":"m","messages":[{"role":"user","content":"a"}],"max_tokens":0}"#, "max_tokens"),
            (r#"{"model":"m","messages":[{"role":"user","content":"a"}],"stop":["a","b","c","d","e"]}"#, "stop"),
            (r#"{"model":"m","messages":[{"role":"user","content":"a"}],"top_p":0}"#, "top_p"),
            (r#"{"model":"m","messages":[{"role":"user","content":"a"}],"ignore_eos":1}"#, "ignore_eos"),
        ] {
            let e = chat(body).unwrap_err();
            assert_eq!((e.status, e.param.as_deref()), (400, Some(param)), "{body}: {}", e.message);
        }
        let e = parse_completion(br#"{"model":"m","prompt":["a","b"]}"#, false, 8192).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("prompt"));
    }
}
