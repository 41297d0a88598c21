//! The server's counters, gauges and histograms, written in Prometheus' text format for
//! `GET /metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Observations counted into cumulative buckets (`le` upper bounds), with their sum and count.
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram { bounds, counts: vec![0; bounds.len()], sum: 0.0, count: 0 }
    }

    fn observe(&mut self, x: f64) {
        for (c, &b) in self.counts.iter_mut().zip(self.bounds) {
            if x <= b {
                *c += 1;
            }
        }
        self.sum += x;
        self.count += 1;
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (c, b) in self.counts.iter().zip(self.bounds) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}", self.count, self.sum, self.count);
    }
}

const BATCH_BOUNDS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];
const LATENCY_BOUNDS: &[f64] = &[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

pub struct Metrics {
    /// (endpoint, HTTP status) → requests answered.
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    /// model (base or adapter) → completion requests.
    by_model: Mutex<BTreeMap<String, u64>>,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub queued: AtomicU64,
    pub running: AtomicU64,
    batch: Mutex<Histogram>,
    latency: Mutex<Histogram>,
    ttft: Mutex<Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Mutex::default(),
            by_model: Mutex::default(),
            prompt_tokens: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            running: AtomicU64::new(0),
            batch: Mutex::new(Histogram::new(BATCH_BOUNDS)),
            latency: Mutex::new(Histogram::new(LATENCY_BOUNDS)),
            ttft: Mutex::new(Histogram::new(LATENCY_BOUNDS)),
        }
    }
}

impl Metrics {
    pub fn request(&self, endpoint: &str, status: u16) {
        *self.requests.lock().unwrap_or_else(|e| e.into_inner()).entry((endpoint.to_string(), status)).or_default() += 1;
    }

    pub fn model(&self, name: &str) {
        *self.by_model.lock().unwrap_or_else(|e| e.into_inner()).entry(name.to_string()).or_default() += 1;
    }

    pub fn batch_size(&self, n: usize) {
        self.batch.lock().unwrap_or_else(|e| e.into_inner()).observe(n as f64);
    }

    pub fn latency(&self, seconds: f64) {
        self.latency.lock().unwrap_or_else(|e| e.into_inner()).observe(seconds);
    }

    pub fn time_to_first_token(&self, seconds: f64) {
        self.ttft.lock().unwrap_or_else(|e| e.into_inner()).observe(seconds);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str(
            "# HELP lowrank_requests_total Requests answered, by endpoint and HTTP status.\n# TYPE lowrank_requests_total counter\n",
        );
        for ((endpoint, status), n) in self.requests.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "lowrank_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}");
        }
        out.push_str("# HELP lowrank_model_requests_total Completion requests by model (the base or an adapter).\n# TYPE lowrank_model_requests_total counter\n");
        for (model, n) in self.by_model.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "lowrank_model_requests_total{{model=\"{model}\"}} {n}");
        }
        for (name, help, kind, v) in [
            ("lowrank_prompt_tokens_total", "Prompt tokens read.", "counter", &self.prompt_tokens),
            ("lowrank_generated_tokens_total", "Tokens generated.", "counter", &self.generated_tokens),
            ("lowrank_queue_depth", "Requests waiting to join the batch.", "gauge", &self.queued),
            ("lowrank_running_sequences", "Sequences in the running batch.", "gauge", &self.running),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}", v.load(Ordering::Relaxed));
        }
        self.batch.lock().unwrap_or_else(|e| e.into_inner()).write(&mut out, "lowrank_batch_size", "Sequences per model step.");
        self.latency.lock().unwrap_or_else(|e| e.into_inner()).write(&mut out, "lowrank_request_seconds", "Completion request latency.");
        self.ttft.lock().unwrap_or_else(|e| e.into_inner()).write(
            &mut out,
            "lowrank_time_to_first_token_seconds",
            "Time to the first generated token.",
        );
        out
    }
}
