//! `lowrank serve` over real HTTP on 127.0.0.1: OpenAI's shapes streaming and not, concurrent
//! requests on different adapters each equal to generating alone with that adapter, every error
//! status, hot loading and unloading under a running stream, cancellation when a client goes,
//! 429 on a full queue, 503 while the model loads or after it failed to, and a graceful stop on
//! SIGTERM.

mod common;

use lowrank::infer::{GenerateParams, Generation, Request, SamplingParams, SharedAdapter};
use lowrank::serve::{spawn, ServeConfig, ServerHandle};
use lowrank::LoraAdapter;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// An adapter whose B is not zero, saved as a PEFT directory.
fn adapter_dir(dir: &Path, name: &str, seed: u64) -> PathBuf {
    let p = common::smollm2_model();
    let mut a = LoraAdapter::new(lowrank::LoraConfig { r: 4, lora_alpha: 8.0, ..Default::default() }, &p.model, seed).unwrap();
    for m in a.modules.clone() {
        let off = m.offset + m.a_len();
        for (i, x) in a.params[off..off + m.b_len()].iter_mut().enumerate() {
            *x = 0.5 * (((i as u64 * 2654435761 + seed) % 17) as f32 / 8.0 - 1.0);
        }
    }
    let path = dir.join(name);
    lowrank::lora::peft::save(&a, &path).unwrap();
    path
}

fn config(adapters: &[(&str, &Path)]) -> ServeConfig {
    ServeConfig {
        model: common::smollm2().to_path_buf(),
        adapter: adapters.iter().map(|(n, p)| format!("{n}={}", p.display())).collect(),
        weights: lowrank::model::WeightFormat::F32,
        host: "127.0.0.1".into(),
        port: 0,
        api_key: None,
        served_model_name: Some("smollm2".into()),
        max_batch: 16,
        max_queue: 64,
        max_loras: 8,
        max_lora_rank: 64,
        adapter_dir: None,
        prefill_chunk: 64,
        threads: 2,
    }
}

fn start(c: ServeConfig) -> ServerHandle {
    let h = spawn(c, false).unwrap();
    let t = Instant::now();
    while http(h.addr, "GET", "/health", &[], "").0 != 200 {
        assert!(t.elapsed() < Duration::from_secs(120), "the server did not become ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    h
}

/// One HTTP/1.1 request; returns status, headers (lower-case names) and the (de-chunked) body.
fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, HashMap<String, String>, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status: u16 = lines.next().unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    let hdrs: HashMap<String, String> =
        lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string())).collect();
    let body = if hdrs.get("transfer-encoding").is_some_and(|v| v.contains("chunked")) { dechunk(rest) } else { rest.to_string() };
    (status, hdrs, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

fn post(addr: SocketAddr, path: &str, body: &Value) -> (u16, HashMap<String, String>, Value) {
    let (status, h, b) = http(addr, "POST", path, &[], &body.to_string());
    (status, h, serde_json::from_str(&b).unwrap_or(Value::String(b)))
}

/// The `data:` payloads of an SSE body.
fn sse_data(body: &str) -> Vec<String> {
    body.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_string).collect()
}

fn chat(model: &str, text: &str, max_tokens: usize) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "temperature": 0})
}

/// What generating alone with `adapter` gives for a chat message.
fn alone(adapter: Option<&Path>, text: &str, max_tokens: usize) -> String {
    let p = common::smollm2_model();
    let a: Option<(SharedAdapter, f32)> = adapter.map(|d| (Arc::new(lowrank::lora::load(d, &p.model).unwrap()) as SharedAdapter, 1.0));
    let template = p.chat_template().unwrap().unwrap();
    let prompt = p.tokenizer.encode(&template.render(&[lowrank::data::Message::new("user", text)], true).unwrap(), false).unwrap();
    let params =
        GenerateParams { max_new_tokens: max_tokens, sampling: SamplingParams::default(), stop_ids: p.stop_ids(), stop_strings: vec![] };
    Generation::new(&p.model, &p.tokenizer, Request { prompt, params, adapter: a }).unwrap().run(|_| {}).unwrap().text
}

#[test]
fn openai_shapes_and_mixed_adapter_requests_equal_generating_alone() {
    let dir = common::tmpdir("serve-shapes");
    let (a, b) = (adapter_dir(&dir, "a", 1), adapter_dir(&dir, "b", 2));
    let h = start(config(&[("alpha", &a), ("beta", &b)]));
    let addr = h.addr;

    let (status, _, models) = http(addr, "GET", "/v1/models", &[], "");
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(status, 200);
    let ids: Vec<(&str, &Value)> = models["data"].as_array().unwrap().iter().map(|m| (m["id"].as_str().unwrap(), &m["parent"])).collect();
    assert_eq!(ids, vec![("smollm2", &Value::Null), ("alpha", &json!("smollm2")), ("beta", &json!("smollm2"))]);

    // Not streaming.
    let (status, _, v) = post(addr, "/v1/chat/completions", &chat("alpha", "Name a color.", 8));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "alpha");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert_eq!(text, alone(Some(&a), "Name a color.", 8));
    assert!(["stop", "length"].contains(&v["choices"][0]["finish_reason"].as_str().unwrap()));
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 5 && v["usage"]["completion_tokens"].as_u64().unwrap() <= 8);

    // Streaming, with usage: the deltas add up to the same text.
    let mut body = chat("alpha", "Name a color.", 8);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let (status, headers, raw) = http(addr, "POST", "/v1/chat/completions", &[], &body.to_string());
    assert_eq!(status, 200);
    assert!(headers["content-type"].starts_with("text/event-stream"));
    let data = sse_data(&raw);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks.iter().filter_map(|c| c["choices"].get(0)?["delta"]["content"].as_str()).collect();
    assert_eq!(streamed, text);
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["completion_tokens"], v["usage"]["completion_tokens"]);
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"]));

    // Completions, and a stop string that is not returned.
    let (status, _, v) = post(
        addr,
        "/v1/completions",
        &json!({"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0}),
    );
    assert_eq!((status, v["object"].as_str()), (200, Some("text_completion")), "{v}");
    let full = v["choices"][0]["text"].as_str().unwrap().to_string();
    let stop: String = full.chars().skip(3).take(2).collect();
    let (_, _, v) = post(
        addr,
        "/v1/completions",
        &json!({"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0, "stop": [stop]}),
    );
    assert_eq!(v["choices"][0]["text"].as_str().unwrap(), &full[..full.find(&stop).unwrap()]);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");

    // `ignore_eos` (vLLM's extension) generates past the end of the answer, to `max_tokens`.
    let short = |ignore_eos: bool| {
        let mut body = json!({"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 300, "temperature": 0});
        body["ignore_eos"] = json!(ignore_eos);
        let (status, _, v) = post(addr, "/v1/completions", &body);
        assert_eq!(status, 200, "{v}");
        (v["usage"]["completion_tokens"].as_u64().unwrap(), v["choices"][0]["finish_reason"].as_str().unwrap().to_string())
    };
    let (ended, reason) = short(false);
    assert!(ended < 300 && reason == "stop", "the base model ends this answer itself: {ended} tokens, {reason}");
    assert_eq!(short(true), (300, "length".to_string()));

    // Concurrent requests over the base and both adapters, batched together.
    let cases: Vec<(&str, Option<PathBuf>, &str)> = vec![
        ("smollm2", None, "Say hello."),
        ("alpha", Some(a.clone()), "Say hello."),
        ("beta", Some(b.clone()), "Say hello."),
        ("beta", Some(b.clone()), "Count to three."),
        ("alpha", Some(a.clone()), "Count to three."),
        ("smollm2", None, "Count to three."),
    ];
    let answers: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = cases
            .iter()
            .map(|(model, _, text)| {
                scope.spawn(move || {
                    let (status, _, v) = post(addr, "/v1/chat/completions", &chat(model, text, 10));
                    assert_eq!(status, 200, "{v}");
                    v["choices"][0]["message"]["content"].as_str().unwrap().to_string()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for ((model, adapter, text), got) in cases.iter().zip(&answers) {
        assert_eq!(got, &alone(adapter.as_deref(), text, 10), "{model}: {text}");
    }
    assert_ne!(answers[0], answers[1], "the adapters change the answer");
    let (_, _, metrics) = http(addr, "GET", "/metrics", &[], "");
    assert!(metrics.contains("lowrank_requests_total{endpoint=\"/v1/chat/completions\",status=\"200\"} 8"), "{metrics}");
    assert!(metrics.contains("lowrank_model_requests_total{model=\"beta\"} 2"), "{metrics}");
    assert!(metrics.contains("lowrank_batch_size_count"));
    h.shutdown().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn errors_have_openai_shapes_and_statuses() {
    let mut c = config(&[]);
    c.api_key = Some("sekret".into());
    let h = start(c);
    let addr = h.addr;
    let auth = [("authorization", "Bearer sekret")];
    let call = |path: &str, body: &str, headers: &[(&str, &str)]| {
        let (status, h, b) = http(addr, "POST", path, headers, body);
        (status, h, serde_json::from_str::<Value>(&b).unwrap_or(Value::Null))
    };
    let good = chat("smollm2", "hi", 2).to_string();
    let (status, _, v) = call("/v1/chat/completions", &good, &[]);
    assert_eq!((status, v["error"]["code"].as_str()), (401, Some("invalid_api_key")));
    assert_eq!(call("/v1/chat/completions", &good, &[("authorization", "Bearer wrong")]).0, 401);
    assert_eq!(call("/v1/chat/completions", &good, &auth).0, 200);
    for (body, param) in [
        ("{not json", "body"),
        (r#"{"model":"smollm2"}"#, "messages"),
        (r#"{"model":"smollm2","messages":[{"role":"user","content":"a"}],"n":3}"#, "n"),
        (r#"{"model":"smollm2","messages":[{"role":"user","content":"a"}],"max_tokens":100000000}"#, "max_tokens"),
    ] {
        let (status, _, v) = call("/v1/chat/completions", body, &auth);
        assert_eq!((status, v["error"]["param"].as_str()), (400, Some(param)), "{body}: {v}");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["message"].as_str().unwrap().contains(param) || param == "body", "{v}");
    }
    let (status, _, v) = call("/v1/chat/completions", &chat("nope", "hi", 2).to_string(), &auth);
    assert_eq!((status, v["error"]["code"].as_str(), v["error"]["param"].as_str()), (404, Some("model_not_found"), Some("model")));
    // An input error names the field the input came from.
    let long = format!(r#"{{"model":"smollm2","prompt":"{}"}}"#, "x ".repeat(9000));
    let (status, _, v) = call("/v1/completions", &long, &auth);
    assert_eq!((status, v["error"]["param"].as_str()), (400, Some("prompt")), "{v}");
    let big = format!(r#"{{"model":"smollm2","prompt":"{}"}}"#, "x".repeat(5 << 20));
    assert_eq!(call("/v1/completions", &big, &auth).0, 413);
    // Loading is off without --adapter-dir.
    let (status, _, v) = call("/v1/load_lora_adapter", r#"{"lora_name":"x","lora_path":"/tmp"}"#, &auth);
    assert_eq!((status, v["error"]["code"].as_str()), (403, Some("loading_disabled")));
    h.shutdown().unwrap();
}

#[test]
fn a_model_that_fails_to_load_gives_503_naming_why() {
    let dir = common::tmpdir("serve-bad-model");
    let bad = dir.join("broken.gguf");
    std::fs::write(&bad, b"GGUF\x03\x00\x00\x00 not a model").unwrap();
    let mut c = config(&[]);
    c.model = bad;
    // The server binds at once and loads on the scheduler thread: /health is 503 while loading
    // and after a failure, and so is every model request.
    let h = spawn(c, false).unwrap();
    let t = Instant::now();
    let failed = loop {
        let (status, _, body) = http(h.addr, "GET", "/health", &[], "");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!((status, v["error"]["code"].as_str()), (503, Some("model_loading")), "{v}");
        let message = v["error"]["message"].as_str().unwrap().to_string();
        if message.contains("failed to load") {
            break message;
        }
        assert!(message.contains("still loading"), "{message}");
        assert!(t.elapsed() < Duration::from_secs(60), "loading never failed");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(failed.contains("broken.gguf"), "{failed}");
    let (status, _, v) = post(h.addr, "/v1/chat/completions", &chat("smollm2", "hi", 2));
    assert_eq!(status, 503, "{v}");
    h.shutdown().unwrap();
}

/// Starts a streaming request and returns the connection once its first event has arrived.
fn open_stream(addr: SocketAddr, path: &str, body: &Value) -> BufReader<TcpStream> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let body = body.to_string();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    while !line.starts_with("data: ") {
        line.clear();
        assert!(r.read_line(&mut line).unwrap() > 0, "the stream ended before its first event");
    }
    r
}

/// Reads a stream to its end; true when it ended with a finish reason and `[DONE]`.
fn finish_stream(mut r: BufReader<TcpStream>) -> bool {
    let mut rest = String::new();
    let _ = r.read_to_string(&mut rest);
    rest.contains("data: [DONE]") && rest.contains("\"finish_reason\":\"")
}

fn metric(addr: SocketAddr, name: &str) -> u64 {
    let (_, _, m) = http(addr, "GET", "/metrics", &[], "");
    m.lines().find_map(|l| l.strip_prefix(&format!("{name} "))).unwrap().parse().unwrap()
}

#[test]
fn hot_adapters_cancellation_and_a_full_queue() {
    let dir = common::tmpdir("serve-hot");
    let allowed = dir.join("allowed");
    std::fs::create_dir_all(&allowed).unwrap();
    adapter_dir(&allowed, "a", 1);
    let outside = adapter_dir(&dir, "outside", 2);
    std::os::unix::fs::symlink(&outside, allowed.join("link")).unwrap();
    let mut c = config(&[]);
    c.adapter_dir = Some(allowed.clone());
    c.max_batch = 2;
    c.max_queue = 0;
    let h = start(c);
    let addr = h.addr;
    let load = |name: &str, path: &str| post(addr, "/v1/load_lora_adapter", &json!({"lora_name": name, "lora_path": path}));

    // Outside the directory, by a link or by "..": 403. A directory that is no adapter: 400.
    assert_eq!(load("x", outside.to_str().unwrap()).0, 403);
    assert_eq!(load("x", "link").0, 403);
    assert_eq!(load("x", "../outside").0, 403);
    let (status, _, v) = load("x", ".");
    assert_eq!((status, v["error"]["param"].as_str()), (400, Some("lora_path")), "{v}");
    assert_eq!(load("hot", "a").0, 200);
    assert_eq!(load("hot", "a").0, 400, "a name is loaded once");
    let (_, _, models) = http(addr, "GET", "/v1/models", &[], "");
    assert!(models.contains("\"hot\""));

    // A stream on the adapter keeps running while the adapter is unloaded; new requests get 404.
    let mut long = chat("hot", "Tell me a long story.", 40);
    long["stream"] = json!(true);
    let running = open_stream(addr, "/v1/chat/completions", &long);
    // The batch (2) is one short of full: a second stream fills it (counting on for a long
    // time), and the queue (0) is full.
    let counting = json!({"model": "smollm2", "prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": 1000, "temperature": 0, "stream": true});
    let filler = open_stream(addr, "/v1/completions", &counting);
    let (status, headers, v) = post(addr, "/v1/chat/completions", &chat("smollm2", "hi", 2));
    assert_eq!((status, v["error"]["code"].as_str()), (429, Some("queue_full")), "{v}");
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(post(addr, "/v1/unload_lora_adapter", &json!({"lora_name": "hot"})).0, 200);
    assert_eq!(post(addr, "/v1/unload_lora_adapter", &json!({"lora_name": "hot"})).0, 404);
    assert!(finish_stream(running), "the running stream finished after its adapter was unloaded");
    assert_eq!(post(addr, "/v1/chat/completions", &chat("hot", "hi", 2)).0, 404);

    // A client that goes away cancels its sequence: nothing runs any more.
    assert_eq!(metric(addr, "lowrank_running_sequences"), 1);
    drop(filler);
    let t = Instant::now();
    while metric(addr, "lowrank_running_sequences") != 0 {
        assert!(t.elapsed() < Duration::from_secs(20), "the cancelled sequence kept running");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(metric(addr, "lowrank_generated_tokens_total") < 40 + 1000, "the dropped stream did not run to its end");
    assert_eq!(post(addr, "/v1/chat/completions", &chat("smollm2", "hi", 2)).0, 200);
    h.shutdown().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn sigterm_lets_a_running_stream_finish_and_exits_0() {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_lowrank"))
        .args(["serve", "--model", common::smollm2().to_str().unwrap(), "--port", "0", "--served-model-name", "m", "--threads", "2"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("listening on http://") {
        line.clear();
        assert!(err.read_line(&mut line).unwrap() > 0, "the server exited before listening");
    }
    let addr: SocketAddr = line.trim().rsplit("http://").next().unwrap().parse().unwrap();
    let t = Instant::now();
    while http(addr, "GET", "/health", &[], "").0 != 200 {
        assert!(t.elapsed() < Duration::from_secs(120));
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut body = chat("m", "Tell me a story.", 24);
    body["stream"] = json!(true);
    let running = open_stream(addr, "/v1/chat/completions", &body);
    std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(finish_stream(running), "the stream ran to its end after SIGTERM");
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "the server did not exit");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    assert!(TcpStream::connect(addr).is_err(), "nothing listens any more");
}

/// With room for one resident adapter, requests alternating between two evict and read them
/// again, and each answer is still that adapter's.
#[test]
fn evicted_adapters_are_read_again_on_demand() {
    let dir = common::tmpdir("serve-lru");
    let (a, b) = (adapter_dir(&dir, "a", 1), adapter_dir(&dir, "b", 2));
    let mut c = config(&[("alpha", &a), ("beta", &b)]);
    c.max_loras = 1;
    let h = start(c);
    let (want_a, want_b) = (alone(Some(&a), "Name a color.", 6), alone(Some(&b), "Name a color.", 6));
    assert_ne!(want_a, want_b);
    for model in ["alpha", "beta", "alpha", "beta"] {
        let (status, _, v) = post(h.addr, "/v1/chat/completions", &chat(model, "Name a color.", 6));
        assert_eq!(status, 200, "{v}");
        let want = if model == "alpha" { &want_a } else { &want_b };
        assert_eq!(v["choices"][0]["message"]["content"].as_str().unwrap(), want, "{model}");
    }
    h.shutdown().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}
