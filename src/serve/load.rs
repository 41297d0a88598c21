//! `lowrank bench serve`: a load test of the server over loopback. It starts the server on a
//! free port with K adapters (random q,v r8 adapters written to a temporary directory, or the
//! base when K = 0), then C clients each send streaming chat requests one after another, spread
//! round-robin over the adapters, until the requests are spent. Each request asks for
//! `ignore_eos`, so it generates exactly `max_tokens`: the throughput then does not depend on
//! where the model happens to end its answers (a change in rounding that ended one prompt's
//! answers early moved 16-client tokens/s by 15%). Reported: aggregate generated tokens/s, time
//! to first token and inter-token latency (p50, p99), and errors.

use super::{spawn, ServeConfig};
use crate::lora::{LoraAdapter, LoraConfig};
use crate::model::WeightFormat;
use anyhow::{bail, Result};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub struct LoadBench {
    pub model: PathBuf,
    pub weights: WeightFormat,
    pub clients: usize,
    pub adapters: usize,
    pub requests: usize,
    pub max_tokens: usize,
    pub threads: usize,
}

/// One streamed request: seconds to the first text, the gaps between later pieces, tokens.
struct Timing {
    ttft: f64,
    gaps: Vec<f64>,
    tokens: usize,
}

fn stream_once(addr: SocketAddr, model: &str, prompt: &str, max_tokens: usize) -> Result<Timing> {
    let body = json!({"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                      "temperature": 0, "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}})
    .to_string();
    let start = Instant::now();
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(300)))?;
    write!(s, "POST /v1/chat/completions HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len())?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line)?;
    if !line.contains(" 200 ") {
        bail!("HTTP status line {:?}", line.trim());
    }
    let (mut first, mut last, mut gaps, mut tokens) = (None, start, Vec::new(), 0);
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            bail!("the stream ended without [DONE]");
        }
        let Some(data) = line.trim().strip_prefix("data: ") else { continue };
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(data)?;
        if v.get("error").is_some() {
            bail!("{}", v["error"]["message"]);
        }
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            tokens = n as usize;
        }
        if v["choices"][0]["delta"]["content"].as_str().is_some_and(|t| !t.is_empty()) {
            let now = Instant::now();
            match first {
                None => first = Some(now - start),
                Some(_) => gaps.push((now - last).as_secs_f64()),
            }
            last = now;
        }
    }
    Ok(Timing { ttft: first.unwrap_or_default().as_secs_f64(), gaps, tokens })
}

/// GET /health answers 200 (the model has loaded).
fn healthy(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect(addr) else { return false };
    if write!(s, "GET /health HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n").is_err() {
        return false;
    }
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).is_ok() && line.contains(" 200 ")
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

pub fn run(b: &LoadBench) -> Result<Value> {
    use crate::limits::check_count;
    check_count("--clients", b.clients, 1, 1024)?;
    check_count("--adapters", b.adapters, 0, 1024)?;
    check_count("--requests", b.requests, 1, 1 << 20)?;
    check_count("--max-tokens", b.max_tokens, 1, 1 << 16)?;
    let dir = std::env::temp_dir().join(format!("lowrank-bench-serve-{}", std::process::id()));
    let mut names = Vec::new();
    let mut specs = Vec::new();
    if b.adapters > 0 {
        let p = crate::pretrained::Pretrained::load(&b.model)?;
        for k in 0..b.adapters {
            let mut a = LoraAdapter::new(LoraConfig { r: 8, lora_alpha: 16.0, ..Default::default() }, &p.model, k as u64)?;
            for m in a.modules.clone() {
                let off = m.offset + m.a_len();
                a.params[off..off + m.b_len()].iter_mut().enumerate().for_each(|(i, x)| *x = 0.01 * ((i + k) % 7) as f32 - 0.03);
            }
            let path = dir.join(format!("a{k}"));
            crate::lora::peft::save(&a, &path)?;
            names.push(format!("a{k}"));
            specs.push(format!("a{k}={}", path.display()));
        }
    }
    let config = ServeConfig {
        model: b.model.clone(),
        adapter: specs,
        weights: b.weights,
        host: "127.0.0.1".into(),
        port: 0,
        api_key: None,
        served_model_name: Some("base".into()),
        max_batch: b.clients.max(1),
        max_queue: b.clients,
        max_loras: b.adapters.max(1),
        max_lora_rank: 64,
        adapter_dir: None,
        prefill_chunk: 256,
        threads: b.threads,
    };
    let server = spawn(config, false)?;
    let addr = server.addr;
    let t = Instant::now();
    while !healthy(addr) {
        if t.elapsed() > Duration::from_secs(300) {
            bail!("the server did not become ready");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let models: Vec<String> = if names.is_empty() { vec!["base".into()] } else { names };
    let prompts =
        ["Tell me about the sea.", "Write a short poem about autumn.", "Explain what a CPU does.", "List three fruits and their colors."];
    let next = std::sync::atomic::AtomicUsize::new(0);
    let start = Instant::now();
    let results: Vec<Result<Timing>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..b.clients)
            .map(|_| {
                scope.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= b.requests {
                            return mine;
                        }
                        mine.push(stream_once(addr, &models[i % models.len()], prompts[i % prompts.len()], b.max_tokens));
                    }
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().unwrap_or_default()).collect()
    });
    let wall = start.elapsed().as_secs_f64();
    server.shutdown()?;
    let _ = std::fs::remove_dir_all(&dir);
    let errors: Vec<String> = results.iter().filter_map(|r| r.as_ref().err().map(|e| format!("{e:#}"))).collect();
    let ok: Vec<&Timing> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    let tokens: usize = ok.iter().map(|t| t.tokens).sum();
    let mut ttft: Vec<f64> = ok.iter().map(|t| t.ttft).collect();
    let mut itl: Vec<f64> = ok.iter().flat_map(|t| t.gaps.iter().copied()).collect();
    Ok(json!({
        "bench": "serve", "impl": "lowrank", "weights": b.weights.name(), "clients": b.clients, "adapters": b.adapters,
        "requests": b.requests, "max_tokens": b.max_tokens, "generated_tokens": tokens, "wall_s": wall,
        "tok_per_s": tokens as f64 / wall, "ttft_p50_s": percentile(&mut ttft, 0.5), "ttft_p99_s": percentile(&mut ttft, 0.99),
        "itl_p50_s": percentile(&mut itl, 0.5), "itl_p99_s": percentile(&mut itl, 0.99), "errors": errors.len(),
        "first_error": errors.first(),
    }))
}
