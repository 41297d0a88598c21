//! `lowrank._lowrank`: thin bindings over the lowrank library for the Python package in
//! `python/lowrank/`, which adds numpy arrays, progress display and HTML previews on top.
//!
//! Every call that computes releases the GIL. Errors become Python exceptions carrying
//! lowrank's messages: `FileNotFoundError` for a missing path, `OSError` for other I/O
//! failures, `ValueError` for anything the input got wrong. Training runs on a thread of its
//! own while the calling thread relays its progress to Python and watches for Ctrl-C, so a
//! KeyboardInterrupt stops it cleanly after a checkpoint.

use lowrank::infer::chat::Conversation;
use lowrank::infer::session::Session;
use lowrank::infer::{GenerateParams, Generation, Request, SamplingParams, SharedAdapter, StopHandle};
use lowrank::lora::combine::AdapterSpec;
use lowrank::model::adapt::{LowRank, LowRankSource, ModuleKind, NoAdapter};
use lowrank::model::{Batch, WeightFormat};
use lowrank::train::trainer::{self, Metric, Progress, TrainConfig};
use pyo3::exceptions::{PyFileNotFoundError, PyKeyboardInterrupt, PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

/// lowrank's error as the Python exception a user expects, with the whole message chain.
fn to_py(e: anyhow::Error) -> PyErr {
    let message = format!("{e:#}");
    match e.chain().find_map(|c| c.downcast_ref::<std::io::Error>()) {
        Some(io) if io.kind() == std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(message),
        Some(_) => PyOSError::new_err(message),
        None => PyValueError::new_err(message),
    }
}

/// An adapter applied with an extra scale (the session's `NAME=PATH@SCALE`).
struct Scaled<'a>(&'a dyn LowRankSource, f32);

impl LowRankSource for Scaled<'_> {
    fn lookup(&self, layer: usize, kind: ModuleKind) -> Option<LowRank<'_>> {
        self.0.lookup(layer, kind).map(|lr| LowRank { scale: lr.scale * self.1, ..lr })
    }
}

/// A base model with its adapters (a `lowrank::infer::Session`).
#[pyclass(module = "lowrank._lowrank", frozen)]
struct Model {
    session: Arc<RwLock<Session>>,
    #[pyo3(get)]
    path: String,
    #[pyo3(get)]
    weights: String,
}

impl Model {
    /// The session for reading. Waits (with the GIL released, so a writer that needs the GIL
    /// back can finish) while a change is under way.
    fn read(&self, py: Python<'_>) -> RwLockReadGuard<'_, Session> {
        loop {
            match self.session.try_read() {
                Ok(guard) => return guard,
                Err(std::sync::TryLockError::Poisoned(e)) => return e.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => py.detach(|| std::thread::sleep(Duration::from_millis(1))),
            }
        }
    }

    /// The session for a change. Other calls and text streams hold the session while they run:
    /// wait a few seconds for them (with the GIL released), then refuse rather than hang.
    fn write(&self, py: Python<'_>) -> PyResult<RwLockWriteGuard<'_, Session>> {
        let t = Instant::now();
        loop {
            match self.session.try_write() {
                Ok(guard) => return Ok(guard),
                Err(std::sync::TryLockError::Poisoned(e)) => return Ok(e.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) if t.elapsed() < Duration::from_secs(5) => {
                    py.detach(|| std::thread::sleep(Duration::from_millis(10)))
                }
                Err(_) => {
                    return Err(PyRuntimeError::new_err(
                        "the model is in use by another call or a text stream; finish or close() the stream first",
                    ))
                }
            }
        }
    }

    /// What `adapter` names for one call: `None` = the active adapter (or none); "none" = the
    /// base model; a name = that adapter. An adapter merged into the weights is the base here.
    fn resolve(s: &Session, adapter: Option<&str>) -> anyhow::Result<Option<(SharedAdapter, f32)>> {
        let merged = s.is_merged().then(|| s.adapters.active_name().unwrap_or_default().to_string());
        match (adapter, merged) {
            (None, _) => Ok(s.adapter()),
            (Some("none"), None) => Ok(None),
            (Some(name), Some(m)) if name == m => Ok(None),
            (Some(_), Some(m)) => anyhow::bail!("adapter {m:?} is merged into the weights; call unmerge() before using another"),
            (Some(name), None) => match s.adapters.entries.iter().find(|e| e.0 == name) {
                Some((_, a, scale)) => Ok(Some((a.clone() as SharedAdapter, *scale))),
                None => anyhow::bail!(
                    "no adapter named {name:?} (loaded: {})",
                    if s.adapters.entries.is_empty() { "none".to_string() } else { s.adapters.names().join(", ") }
                ),
            },
        }
    }

    /// The prompt's tokens: through the chat template (`chat`) or as plain text.
    fn prompt(s: &Session, prompt: &str, chat: bool) -> anyhow::Result<Vec<u32>> {
        if chat {
            Conversation::new(s, &[])?.prompt_for(s, prompt)
        } else {
            s.base.tokenizer.encode(prompt, true)
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn request(
        s: &Session,
        prompt: &str,
        adapter: Option<&str>,
        max_new_tokens: usize,
        temperature: f32,
        top_p: f32,
        top_k: usize,
        seed: u64,
        chat: bool,
        stop: Vec<String>,
    ) -> anyhow::Result<Request> {
        let params = GenerateParams {
            max_new_tokens,
            sampling: SamplingParams { temperature, top_k, top_p, repetition_penalty: 1.0, seed },
            stop_ids: s.base.stop_ids(),
            stop_strings: stop,
        };
        let adapter = Self::resolve(s, adapter)?;
        Ok(Request { prompt: Self::prompt(s, prompt, chat)?, params, adapter })
    }

    /// Each text's tokens (with the tokenizer's special tokens, as `tokenizer(text)` in
    /// transformers), refusing an empty list or an empty text.
    fn encode_all(s: &Session, texts: &[String]) -> PyResult<Vec<Vec<u32>>> {
        if texts.is_empty() {
            return Err(PyValueError::new_err("texts must not be empty"));
        }
        texts
            .iter()
            .enumerate()
            .map(|(i, t)| match s.base.tokenizer.encode(t, true).map_err(to_py)? {
                ids if ids.is_empty() => Err(PyValueError::new_err(format!("texts[{i}] has no tokens"))),
                ids => Ok(ids),
            })
            .collect()
    }
}

#[pymethods]
impl Model {
    /// Loads a Hugging Face directory or a GGUF file, keeping the frozen weights as `weights`
    /// (f32, bf16, q8_0 or q4_1).
    #[staticmethod]
    #[pyo3(signature = (path, weights = "bf16"))]
    fn load(py: Python<'_>, path: PathBuf, weights: &str) -> PyResult<Self> {
        let format = WeightFormat::parse(weights).map_err(to_py)?;
        let session = py.detach(|| Session::load(&path, format, &[], false)).map_err(to_py)?;
        Ok(Model { session: Arc::new(RwLock::new(session)), path: path.display().to_string(), weights: format.name().to_string() })
    }

    /// An iterator of text pieces as they are generated (the package's `generate` joins them).
    #[pyo3(signature = (prompt, adapter = None, max_new_tokens = 256, temperature = 0.0, top_p = 1.0, top_k = 0, seed = 0, chat = true, stop = vec![]))]
    #[allow(clippy::too_many_arguments)]
    fn stream(
        &self,
        py: Python<'_>,
        prompt: String,
        adapter: Option<String>,
        max_new_tokens: usize,
        temperature: f32,
        top_p: f32,
        top_k: usize,
        seed: u64,
        chat: bool,
        stop: Vec<String>,
    ) -> PyResult<TextStream> {
        let (tx, rx) = mpsc::channel();
        let (started_tx, started_rx) = mpsc::channel::<anyhow::Result<StopHandle>>();
        let session = self.session.clone();
        std::thread::spawn(move || {
            // The request is built under the same lock the generation runs under, so the
            // adapter it chose is the one the session still has (nothing can merge meanwhile).
            let s = session.read().unwrap_or_else(|e| e.into_inner());
            let started = Self::request(&s, &prompt, adapter.as_deref(), max_new_tokens, temperature, top_p, top_k, seed, chat, stop)
                .and_then(|request| Generation::new(s.model(), &s.base.tokenizer, request));
            let generation = match started {
                Ok(g) => g,
                Err(e) => {
                    let _ = started_tx.send(Err(e));
                    return;
                }
            };
            if started_tx.send(Ok(generation.stop_handle())).is_err() {
                return;
            }
            for token in generation {
                match token {
                    Ok(t) if t.text.is_empty() => {}
                    Ok(t) => {
                        if tx.send(Ok(t.text)).is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        break;
                    }
                }
            }
        });
        let handle = py.detach(move || started_rx.recv()).map_err(|_| PyRuntimeError::new_err("the generation thread ended at start"))?;
        Ok(TextStream { rx: Mutex::new(Some(rx)), stop: handle.map_err(to_py)? })
    }

    /// Logits of every position of each text as little-endian f32 bytes, and their shape
    /// `(texts, longest, vocab)`; positions past a text's end are NaN.
    #[pyo3(signature = (texts, adapter = None))]
    fn logits<'py>(
        &self,
        py: Python<'py>,
        texts: Vec<String>,
        adapter: Option<&str>,
    ) -> PyResult<(Bound<'py, PyBytes>, (usize, usize, usize))> {
        let s = self.read(py);
        let rows = Self::encode_all(&s, &texts)?;
        let adapter = Self::resolve(&s, adapter).map_err(to_py)?;
        let (n, longest, vocab) = (rows.len(), rows.iter().map(Vec::len).max().unwrap_or(0), s.model().config.vocab_size);
        // The f32 logits and the bytes object Python gets exist at once.
        let bytes = 2 * (n * longest * vocab * 4) as u128;
        lowrank::limits::ensure_memory(bytes, &format!("the logits of {n} texts of up to {longest} tokens")).map_err(to_py)?;
        let logits = py
            .detach(|| -> anyhow::Result<Vec<f32>> {
                let batch = Batch::right_padded(&rows, s.base.tokenizer.eos_id.unwrap_or(0))?;
                let mut logits = match &adapter {
                    Some((a, scale)) => s.model().forward(&batch, &Scaled(a.as_ref(), *scale))?,
                    None => s.model().forward(&batch, &NoAdapter)?,
                };
                for (r, ids) in rows.iter().enumerate() {
                    logits[(r * longest + ids.len()) * vocab..(r + 1) * longest * vocab].fill(f32::NAN);
                }
                Ok(logits)
            })
            .map_err(to_py)?;
        let raw = PyBytes::new_with(py, logits.len() * 4, |buf| {
            for (chunk, x) in buf.chunks_exact_mut(4).zip(&logits) {
                chunk.copy_from_slice(&x.to_le_bytes());
            }
            Ok(())
        })?;
        Ok((raw, (n, longest, vocab)))
    }

    /// Mean next-token cross-entropy over every token of the texts (each followed by EOS), as
    /// `lowrank eval` computes it on a JSONL file of {"text": ...} lines.
    #[pyo3(signature = (texts, adapter = None, seq_len = 2048))]
    fn loss(&self, py: Python<'_>, texts: Vec<String>, adapter: Option<&str>, seq_len: usize) -> PyResult<f64> {
        if texts.is_empty() {
            return Err(PyValueError::new_err("texts must not be empty"));
        }
        let s = self.read(py);
        let adapter = Self::resolve(&s, adapter).map_err(to_py)?;
        let records: Vec<lowrank::data::Record> = texts.into_iter().map(lowrank::data::Record::Text).collect();
        let loss = py
            .detach(|| -> anyhow::Result<f64> {
                let seqs = lowrank::train::eval::sequences(&s.base, &records, std::path::Path::new("texts"), false, seq_len)?;
                let pad = s.base.tokenizer.eos_id.unwrap_or(0);
                let l = match &adapter {
                    Some((a, scale)) => lowrank::train::eval::evaluate(s.model(), &Scaled(a.as_ref(), *scale), &seqs, 4, pad)?,
                    None => lowrank::train::eval::evaluate(s.model(), &NoAdapter, &seqs, 4, pad)?,
                };
                Ok(l.mean())
            })
            .map_err(to_py)?;
        Ok(loss)
    }

    /// Exact-match accuracy of greedy answers on a JSONL file of chat or prompt/completion
    /// records, as `lowrank eval --exact-match`: (correct, total, [(prompt, expected, got)]).
    #[pyo3(signature = (data, adapter = None, max_new_tokens = 16, batch_size = 8))]
    #[allow(clippy::type_complexity)]
    fn exact_match(
        &self,
        py: Python<'_>,
        data: PathBuf,
        adapter: Option<&str>,
        max_new_tokens: usize,
        batch_size: usize,
    ) -> PyResult<(usize, usize, Vec<(String, String, String)>)> {
        let s = self.read(py);
        let adapter = Self::resolve(&s, adapter).map_err(to_py)?;
        let em = py
            .detach(|| {
                let (records, _) = lowrank::data::read_jsonl(&data, None, false)?;
                lowrank::infer::exact_match::exact_match(&s.base, adapter, &records, batch_size, max_new_tokens)
            })
            .map_err(to_py)?;
        Ok((em.correct, em.total, em.answers))
    }

    /// Loads a PEFT adapter directory or a GGUF adapter as `name` (applied with `scale`).
    #[pyo3(signature = (path, name, scale = 1.0))]
    fn load_adapter(&self, py: Python<'_>, path: PathBuf, name: String, scale: f32) -> PyResult<()> {
        let spec = AdapterSpec { name, path, scale };
        let mut guard = self.write(py)?;
        let s: &mut Session = &mut guard;
        py.detach(|| s.load_adapter(&spec)).map_err(to_py)
    }

    /// Makes `name` the active adapter, or none.
    #[pyo3(signature = (name))]
    fn set_adapter(&self, py: Python<'_>, name: Option<&str>) -> PyResult<()> {
        let mut guard = self.write(py)?;
        let s: &mut Session = &mut guard;
        py.detach(|| s.switch(name.filter(|n| *n != "none"))).map_err(to_py)
    }

    /// Activates `name` and folds it into the weights (no per-token overhead).
    fn merge(&self, py: Python<'_>, name: &str) -> PyResult<()> {
        let mut guard = self.write(py)?;
        let s: &mut Session = &mut guard;
        if !s.adapters.names().iter().any(|n| n == name) {
            return Err(PyValueError::new_err(format!("no adapter named {name:?} (loaded: {})", s.adapters.names().join(", "))));
        }
        py.detach(|| {
            s.set_merged(false)?;
            s.switch(Some(name))?;
            s.set_merged(true)
        })
        .map_err(to_py)
    }

    /// Takes the merged adapter back out of the weights; it stays active, applied unmerged.
    fn unmerge(&self, py: Python<'_>) -> PyResult<()> {
        let mut guard = self.write(py)?;
        let s: &mut Session = &mut guard;
        py.detach(|| s.set_merged(false)).map_err(to_py)
    }

    /// The loaded adapters: name, rank, alpha, scale, targets, active, merged.
    #[getter]
    fn adapters<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let s = self.read(py);
        let active = s.adapters.active_name();
        s.adapters
            .entries
            .iter()
            .map(|(name, a, scale)| {
                let d = PyDict::new(py);
                let mut targets: Vec<&str> = a.modules.iter().map(|m| m.kind.short_name()).collect();
                targets.sort_unstable();
                targets.dedup();
                d.set_item("name", name)?;
                d.set_item("rank", a.config.r)?;
                d.set_item("alpha", a.config.lora_alpha)?;
                d.set_item("scale", scale)?;
                d.set_item("targets", targets)?;
                d.set_item("active", active == Some(name.as_str()))?;
                d.set_item("merged", active == Some(name.as_str()) && s.is_merged())?;
                Ok(d)
            })
            .collect()
    }

    /// The active adapter's name, or None.
    #[getter]
    fn active_adapter(&self, py: Python<'_>) -> Option<String> {
        self.read(py).adapters.active_name().map(str::to_string)
    }

    /// The model's chat template applied to one user message (the prompt `generate(chat=True)`
    /// continues).
    fn chat_prompt(&self, py: Python<'_>, message: &str) -> PyResult<String> {
        let s = self.read(py);
        let ids = Self::prompt(&s, message, true).map_err(to_py)?;
        s.base.tokenizer.decode(&ids, false).map_err(to_py)
    }
}

/// Text pieces of one generation, produced on a thread of their own.
#[pyclass(module = "lowrank._lowrank", frozen)]
struct TextStream {
    rx: Mutex<Option<mpsc::Receiver<anyhow::Result<String>>>>,
    /// Ends the generation before its next step (the thread then drops the session lock).
    stop: StopHandle,
}

#[pymethods]
impl TextStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<String>> {
        // Never wait for this lock with the GIL held: a second reader gets an error instead.
        let mut guard = match self.rx.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                return Err(PyRuntimeError::new_err("this text stream is being read by another thread"))
            }
        };
        loop {
            let Some(rx) = guard.take() else { return Ok(None) };
            // Wait with the GIL released, but look at Ctrl-C every 100 ms.
            let (got, rx) = py.detach(move || (rx.recv_timeout(Duration::from_millis(100)), rx));
            *guard = Some(rx);
            match got {
                Ok(Ok(text)) => return Ok(Some(text)),
                Ok(Err(e)) => return Err(to_py(e)),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    guard.take();
                    return Ok(None);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Err(e) = py.check_signals() {
                        self.stop.stop();
                        return Err(e);
                    }
                }
            }
        }
    }

    /// Stops the generation before its next step; the stream then ends.
    fn close(&self) {
        self.stop.stop();
        if let Ok(mut guard) = self.rx.try_lock() {
            guard.take();
        }
    }
}

impl Drop for TextStream {
    fn drop(&mut self) {
        self.stop.stop();
    }
}

/// What the training thread tells the calling thread.
enum TrainEvent {
    Start { total: usize, resumed_at: usize },
    Step(Metric),
    Eval(Metric),
    Message(String),
}

/// Forwards the trainer's progress over a channel.
struct Relay(mpsc::Sender<TrainEvent>);

impl Progress for Relay {
    fn start(&mut self, total: usize, resumed_at: usize) {
        let _ = self.0.send(TrainEvent::Start { total, resumed_at });
    }
    fn step(&mut self, m: &Metric) {
        let _ = self.0.send(TrainEvent::Step(m.clone()));
    }
    fn eval(&mut self, m: &Metric) {
        let _ = self.0.send(TrainEvent::Eval(m.clone()));
    }
    fn message(&mut self, text: &str) {
        let _ = self.0.send(TrainEvent::Message(text.to_string()));
    }
}

fn json_to_py<'py>(py: Python<'py>, v: &serde_json::Value) -> PyResult<Bound<'py, PyAny>> {
    let json = py.import("json")?;
    json.call_method1("loads", (v.to_string(),))
}

/// Trains an adapter. `settings` is a JSON object of `lowrank train`'s settings (snake_case,
/// the same names as a settings file); `on_event(kind, payload)` is called on this thread with
/// ("start", {"total", "resumed_at"}), ("step", metric), ("eval", metric) and ("message", text).
/// Returns the run's summary as a dict. Ctrl-C (KeyboardInterrupt) stops after the current step
/// with a checkpoint written, then raises KeyboardInterrupt naming it.
#[pyfunction]
fn train<'py>(py: Python<'py>, settings: &str, on_event: Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    let values: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(settings).map_err(|e| PyValueError::new_err(format!("settings: {e}")))?;
    let cfg = TrainConfig::default().with_settings(values, "lowrank.train").map_err(to_py)?;
    cfg.validate().map_err(to_py)?;
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let worker = {
        let (cfg, stop) = (cfg.clone(), stop.clone());
        std::thread::spawn(move || lowrank::in_pool(cfg.threads, || trainer::train(&cfg, &mut Relay(tx), &stop)))
    };
    let mut interrupted: Option<PyErr> = None;
    let mut rx = rx;
    loop {
        let (got, back) = py.detach(move || (rx.recv_timeout(Duration::from_millis(100)), rx));
        rx = back;
        match got {
            Ok(event) => {
                let (kind, payload) = match event {
                    TrainEvent::Start { total, resumed_at } => ("start", serde_json::json!({"total": total, "resumed_at": resumed_at})),
                    TrainEvent::Step(m) => ("step", serde_json::to_value(&m).unwrap_or_default()),
                    TrainEvent::Eval(m) => ("eval", serde_json::to_value(&m).unwrap_or_default()),
                    TrainEvent::Message(t) => ("message", serde_json::Value::String(t)),
                };
                // A failing callback stops the run like Ctrl-C; its exception is raised after.
                if let Err(e) = json_to_py(py, &payload).and_then(|p| on_event.call1((kind, p))) {
                    stop.store(true, Ordering::SeqCst);
                    interrupted.get_or_insert(e);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if let Err(e) = py.check_signals() {
            stop.store(true, Ordering::SeqCst);
            interrupted.get_or_insert(e);
        }
    }
    let summary = py.detach(|| worker.join()).map_err(|_| PyRuntimeError::new_err("the training thread panicked"))?.map_err(to_py)?;
    if let Some(e) = interrupted {
        // A stop on the last step ends the run normally (no checkpoint): the adapter is there.
        if e.is_instance_of::<PyKeyboardInterrupt>(py) && !summary.interrupted {
            return Err(PyKeyboardInterrupt::new_err(format!(
                "interrupted as training finished its last step ({}); the adapter is in {}",
                summary.steps,
                summary.adapter_dir.display()
            )));
        }
        if e.is_instance_of::<PyKeyboardInterrupt>(py) {
            let dir = cfg.output.join("checkpoints");
            return Err(PyKeyboardInterrupt::new_err(format!(
                "training stopped after step {}; a checkpoint is in {} (resume=... continues it)",
                summary.steps,
                dir.display()
            )));
        }
        return Err(e);
    }
    json_to_py(py, &serde_json::to_value(&summary).map_err(|e| PyValueError::new_err(e.to_string()))?)
}

/// The first `limit` examples of a data file as training sees them: a list of
/// (tokens, trained, total_tokens).
#[pyfunction]
#[pyo3(signature = (model, data, format = None, train_on_inputs = false, seq_len = 512, limit = 3))]
#[allow(clippy::type_complexity)]
fn preview(
    py: Python<'_>,
    model: &Model,
    data: PathBuf,
    format: Option<&str>,
    train_on_inputs: bool,
    seq_len: usize,
    limit: usize,
) -> PyResult<Vec<(Vec<String>, Vec<bool>, usize)>> {
    let s = model.read(py);
    let examples =
        py.detach(|| lowrank::train::eval::preview_examples(&s.base, &data, format, train_on_inputs, seq_len, limit)).map_err(to_py)?;
    Ok(examples.into_iter().map(|e| (e.tokens, e.trained, e.total_tokens)).collect())
}

/// The CPU features the kernels chose at run time.
#[pyfunction]
fn cpu_features() -> Vec<&'static str> {
    let mut out = vec![];
    if is_x86_feature_detected!("avx2") {
        out.push("avx2");
    }
    if is_x86_feature_detected!("avx512f") {
        out.push("avx512f");
    }
    if lowrank::kernels::amx::available() {
        out.push("amx-bf16");
    }
    out
}

#[pymodule]
fn _lowrank(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Model>()?;
    m.add_class::<TextStream>()?;
    m.add_function(wrap_pyfunction!(train, m)?)?;
    m.add_function(wrap_pyfunction!(preview, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_features, m)?)?;
    Ok(())
}
