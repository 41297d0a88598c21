//! `lowrank serve`: an OpenAI-compatible HTTP server for a base model and many LoRA adapters at
//! once, the adapter chosen per request by its `model` field, requests on different adapters
//! batched into one forward.
//!
//! Two kinds of threads: a tokio runtime answers HTTP (parsing, tokenizing, the chat template,
//! streaming) and never runs the model; the scheduler thread (`scheduler`) owns the running batch
//! and runs every model step, on a rayon pool of `--threads`.

pub mod api;
pub mod load;
pub mod metrics;
pub mod scheduler;

use crate::infer::GenerateParams;
use crate::lora::combine::AdapterSpec;
use crate::model::WeightFormat;
use crate::pretrained::Pretrained;
use anyhow::{bail, Context, Result};
use api::{ApiError, CompletionRequest, Input};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use scheduler::{Chunk, Command, Job, Shared};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `lowrank serve`'s settings (its flags).
#[derive(Clone, Debug, clap::Args)]
pub struct ServeConfig {
    /// The base model: an HF directory or a GGUF file.
    #[arg(long)]
    pub model: PathBuf,
    /// An adapter to serve as NAME=PATH[@SCALE] (a PEFT directory or a GGUF adapter); repeatable.
    #[arg(long)]
    pub adapter: Vec<String>,
    /// Keep the base weights as f32, bf16, q8_0 or q4_1.
    #[arg(long, default_value = "f32", value_parser = WeightFormat::parse)]
    pub weights: WeightFormat,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// 0 picks a free port (printed at start).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on every /v1 request.
    #[arg(long)]
    pub api_key: Option<String>,
    /// The name the base model answers to (default: the model file or directory name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Sequences decoded together at most.
    #[arg(long, default_value_t = 16)]
    pub max_batch: usize,
    /// Requests waiting beyond the running batch before new ones get 429.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// Adapters kept in memory; the least recently used others are read again when asked for.
    #[arg(long, default_value_t = 8)]
    pub max_loras: usize,
    /// Largest adapter rank accepted.
    #[arg(long, default_value_t = 64)]
    pub max_lora_rank: usize,
    /// Allow POST /v1/load_lora_adapter for adapters inside this directory (off without it).
    #[arg(long)]
    pub adapter_dir: Option<PathBuf>,
    /// Prompt tokens one sequence feeds per step (a long prompt delays the others by one chunk).
    #[arg(long, default_value_t = 256)]
    pub prefill_chunk: usize,
    /// Worker threads for the model (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

/// Bodies above this are refused with 413.
pub const MAX_BODY_BYTES: usize = 4 << 20;
/// New tokens when a request names no limit (and its prompt leaves room).
pub const DEFAULT_MAX_TOKENS: usize = 1024;
/// How long shutdown waits for running requests before it ends them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

struct AppState {
    shared: Arc<Shared>,
    commands: Mutex<std::sync::mpsc::Sender<Command>>,
    config: ServeConfig,
    base_name: String,
    /// The canonical --adapter-dir.
    adapter_dir: Option<PathBuf>,
    next_id: std::sync::atomic::AtomicU64,
}

type St = State<Arc<AppState>>;

impl AppState {
    fn send(&self, c: Command) -> Result<(), ApiError> {
        self.commands.lock().unwrap_or_else(|e| e.into_inner()).send(c).map_err(|_| not_running())
    }

    fn model(&self) -> Result<Arc<Pretrained>, ApiError> {
        if let Some(m) = self.shared.model.get() {
            return Ok(m.clone());
        }
        let why =
            self.shared.load_error.get().map_or("the model is still loading".to_string(), |e| format!("the model failed to load: {e}"));
        Err(ApiError::new(503, "server_error", "model_loading", why))
    }

    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(key) = &self.config.api_key else { return Ok(()) };
        let given = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        if given == Some(key.as_str()) {
            Ok(())
        } else {
            Err(ApiError::new(401, "invalid_request_error", "invalid_api_key", "missing or wrong API key (Authorization: Bearer KEY)"))
        }
    }
}

/// The scheduler thread has gone (it failed to load the model, or the server is stopping).
fn not_running() -> ApiError {
    ApiError::new(503, "server_error", "unavailable", "the model is not running")
}

fn error_response(e: &ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = (status, axum::Json(e.to_json())).into_response();
    if e.status == 429 {
        r.headers_mut().insert("retry-after", HeaderValue::from_static("1"));
    }
    r
}

fn body_error(e: BytesRejection) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(413, "invalid_request_error", "body_too_large", format!("the body exceeds {MAX_BODY_BYTES} bytes"))
    } else {
        ApiError::bad_request("body", format!("the body could not be read: {e}"))
    }
}

fn now_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Answers, counting the answer in the metrics under `endpoint`.
fn answer(state: &AppState, endpoint: &str, r: Result<Response, ApiError>) -> Response {
    let r = r.unwrap_or_else(|e| error_response(&e));
    state.shared.metrics.request(endpoint, r.status().as_u16());
    r
}

async fn health(State(s): St) -> Response {
    let r = match s.model() {
        Ok(_) => Ok((StatusCode::OK, "ok").into_response()),
        Err(e) => Err(e),
    };
    answer(&s, "/health", r)
}

async fn metrics(State(s): St) -> Response {
    ([("content-type", "text/plain; version=0.0.4")], s.shared.metrics.render()).into_response()
}

async fn models(State(s): St, headers: HeaderMap) -> Response {
    let r = s.authorize(&headers).map(|_| {
        let created = now_s();
        let mut data = vec![json!({"id": s.base_name, "object": "model", "created": created, "owned_by": "lowrank", "root": s.config.model.display().to_string(), "parent": null})];
        for (name, path) in s.shared.adapters.read().unwrap_or_else(|e| e.into_inner()).iter() {
            data.push(json!({"id": name, "object": "model", "created": created, "owned_by": "lowrank", "root": path.display().to_string(), "parent": s.base_name}));
        }
        axum::Json(json!({"object": "list", "data": data})).into_response()
    });
    answer(&s, "/v1/models", r)
}

async fn chat_completions(State(s): St, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Response {
    let r = completion(&s, &headers, body, true).await;
    answer(&s, "/v1/chat/completions", r)
}

async fn completions(State(s): St, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Response {
    let r = completion(&s, &headers, body, false).await;
    answer(&s, "/v1/completions", r)
}

/// Checks, tokenizes and queues a completion request, then streams or collects its answer.
async fn completion(s: &Arc<AppState>, headers: &HeaderMap, body: Result<Bytes, BytesRejection>, chat: bool) -> Result<Response, ApiError> {
    s.authorize(headers)?;
    let body = body.map_err(body_error)?;
    let p = s.model()?;
    let ctx = p.model.config.max_position_embeddings;
    let req = api::parse_completion(&body, chat, ctx)?;
    let adapter = if req.model == s.base_name {
        None
    } else if s.shared.adapters.read().unwrap_or_else(|e| e.into_inner()).contains_key(&req.model) {
        Some(req.model.clone())
    } else {
        return Err(ApiError {
            param: Some("model".into()),
            ..ApiError::new(
                404,
                "invalid_request_error",
                "model_not_found",
                format!("the model {:?} does not exist (GET /v1/models lists them)", req.model),
            )
        });
    };
    let prompt = tokenize(&p, &req)?;
    let room = ctx.saturating_sub(prompt.len());
    if room == 0 {
        return Err(ApiError::bad_request(
            req.input.param(),
            format!("the prompt has {} tokens; the model's context is {ctx}", prompt.len()),
        ));
    }
    let max_tokens = match req.max_tokens {
        Some(n) if n > room => {
            return Err(ApiError::bad_request(
                "max_tokens",
                format!("the prompt ({} tokens) + max_tokens ({n}) exceed the model's context of {ctx}", prompt.len()),
            ))
        }
        Some(n) => n,
        None => room.min(DEFAULT_MAX_TOKENS),
    };
    let limit = s.config.max_batch + s.config.max_queue;
    if s.shared.in_flight.fetch_add(1, Ordering::SeqCst) >= limit {
        s.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
        return Err(ApiError::new(429, "rate_limit_error", "queue_full", format!("{limit} requests are running or waiting; retry later")));
    }
    s.shared.metrics.model(&req.model);
    let params = GenerateParams {
        max_new_tokens: max_tokens,
        sampling: crate::infer::SamplingParams {
            temperature: req.temperature,
            top_k: 0,
            top_p: req.top_p,
            repetition_penalty: 1.0,
            seed: req.seed,
        },
        stop_ids: if req.ignore_eos { Vec::new() } else { p.stop_ids() },
        stop_strings: req.stop.clone(),
    };
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    if let Err(e) = s.send(Command::Submit(Job { prompt: prompt.clone(), params, adapter, input_param: req.input.param(), reply: tx })) {
        s.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
        return Err(e);
    }
    let id = format!("{}-{}", if chat { "chatcmpl" } else { "cmpl" }, s.next_id.fetch_add(1, Ordering::Relaxed));
    let reply = Reply { chat, id, created: now_s(), model: req.model.clone(), prompt_tokens: prompt.len() };
    if req.stream {
        Ok(stream(reply, rx, req.include_usage).into_response())
    } else {
        collect(reply, rx).await
    }
}

fn tokenize(p: &Pretrained, req: &CompletionRequest) -> Result<Vec<u32>, ApiError> {
    let internal = |e: anyhow::Error| ApiError::bad_request(req.input.param(), format!("{e:#}"));
    let ids = match &req.input {
        Input::Messages(msgs) => {
            let template = p
                .chat_template()
                .map_err(internal)?
                .ok_or_else(|| ApiError::bad_request("messages", "the model has no chat template; use /v1/completions"))?;
            let messages: Vec<crate::data::Message> = msgs.iter().map(|(r, c)| crate::data::Message::new(r, c)).collect();
            let text = template.render(&messages, true).map_err(internal)?;
            p.tokenizer.encode(&text, false).map_err(internal)?
        }
        Input::Prompt(text) => p.tokenizer.encode(text, true).map_err(internal)?,
    };
    if ids.is_empty() {
        return Err(ApiError::bad_request(req.input.param(), "the prompt is empty"));
    }
    Ok(ids)
}

struct Reply {
    chat: bool,
    id: String,
    created: u64,
    model: String,
    prompt_tokens: usize,
}

/// The whole answer at once.
async fn collect(r: Reply, mut rx: tokio::sync::mpsc::UnboundedReceiver<Chunk>) -> Result<Response, ApiError> {
    while let Some(chunk) = rx.recv().await {
        match chunk {
            Chunk::Text(_) => {}
            Chunk::Error(e) => return Err(e),
            Chunk::Done(f) => {
                let usage = api::usage(r.prompt_tokens, f.tokens.len());
                let v = api::completion_json(r.chat, &r.id, r.created, &r.model, &f.text, f.reason.as_str(), usage);
                return Ok(axum::Json(v).into_response());
            }
        }
    }
    Err(ApiError::new(503, "server_error", "cancelled", "the request was ended before it finished (the server is stopping)"))
}

/// Server-sent events: a chunk per piece of text, the finish reason, optionally the usage, then
/// `[DONE]`. When the client goes, the stream is dropped, its channel closes and the scheduler
/// cancels the sequence.
fn stream(
    r: Reply,
    rx: tokio::sync::mpsc::UnboundedReceiver<Chunk>,
    include_usage: bool,
) -> Sse<impl futures_util::Stream<Item = Result<Event, std::convert::Infallible>>> {
    let json_event = |v: Value| Event::default().data(v.to_string());
    let state = (rx, r, true, false);
    let events = futures_util::stream::unfold(state, move |(mut rx, r, first, done)| async move {
        if done {
            return None;
        }
        let mut out: Vec<Event> = Vec::new();
        let mut finished = false;
        match rx.recv().await {
            Some(Chunk::Text(t)) => out.push(json_event(api::chunk_json(r.chat, &r.id, r.created, &r.model, &t, first, None))),
            Some(Chunk::Done(f)) => {
                out.push(json_event(api::chunk_json(r.chat, &r.id, r.created, &r.model, "", first, Some(f.reason.as_str()))));
                if include_usage {
                    out.push(json_event(api::usage_chunk_json(
                        r.chat,
                        &r.id,
                        r.created,
                        &r.model,
                        api::usage(r.prompt_tokens, f.tokens.len()),
                    )));
                }
                out.push(Event::default().data("[DONE]"));
                finished = true;
            }
            Some(Chunk::Error(e)) => {
                out.push(json_event(e.to_json()));
                out.push(Event::default().data("[DONE]"));
                finished = true;
            }
            None => {
                out.push(json_event(ApiError::new(503, "server_error", "cancelled", "the request was ended before it finished").to_json()));
                finished = true;
            }
        }
        // Only the stream's first chunk carries the role.
        Some((futures_util::stream::iter(out.into_iter().map(Ok)), (rx, r, false, finished)))
    });
    Sse::new(futures_util::StreamExt::flatten(events)).keep_alive(KeepAlive::default())
}

/// `lora_path` resolved (links and `..` followed) inside the canonical `dir`, or 403.
fn inside_adapter_dir(dir: &Path, path: &str) -> Result<PathBuf, ApiError> {
    let forbidden = |why: String| {
        eprintln!("lowrank serve: refused to load {path:?}: {why}");
        ApiError::new(403, "permission_error", "forbidden_path", format!("lora_path {path:?} is not allowed: {why}"))
    };
    let p = Path::new(path);
    let full = if p.is_absolute() { p.to_path_buf() } else { dir.join(p) };
    let real = full.canonicalize().map_err(|e| forbidden(format!("it cannot be resolved ({e})")))?;
    if !real.starts_with(dir) {
        return Err(forbidden(format!("it resolves outside --adapter-dir {}", dir.display())));
    }
    Ok(real)
}

/// Reads and checks an adapter for `p` (rank limit included), on a blocking thread.
fn load_checked(p: &Pretrained, path: &Path, max_rank: usize) -> Result<crate::lora::LoraAdapter, ApiError> {
    let a = crate::lora::load(path, &p.model).map_err(|e| ApiError::bad_request("lora_path", format!("{e:#}")))?;
    if let Some(m) = a.modules.iter().find(|m| m.r > max_rank) {
        return Err(ApiError::bad_request(
            "lora_path",
            format!("module {} has rank {}; this server accepts at most --max-lora-rank {max_rank}", m.name, m.r),
        ));
    }
    Ok(a)
}

async fn load_lora(State(s): St, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Response {
    let r = async {
        s.authorize(&headers)?;
        let body = body.map_err(body_error)?;
        let Some(dir) = &s.adapter_dir else {
            return Err(ApiError::new(
                403,
                "permission_error",
                "loading_disabled",
                "loading adapters at run time is off; start the server with --adapter-dir DIR",
            ));
        };
        let v = api::parse_json(&body)?;
        let name = api::string_field(&v, "lora_name")?;
        let path = inside_adapter_dir(dir, &api::string_field(&v, "lora_path")?)?;
        if name == s.base_name || s.shared.adapters.read().unwrap_or_else(|e| e.into_inner()).contains_key(&name) {
            return Err(ApiError::bad_request("lora_name", format!("an adapter named {name:?} is already loaded")));
        }
        let p = s.model()?;
        let max_rank = s.config.max_lora_rank;
        let checked_path = path.clone();
        let adapter = tokio::task::spawn_blocking(move || load_checked(&p, &checked_path, max_rank))
            .await
            .map_err(|e| ApiError::new(500, "server_error", "load_failed", format!("{e}")))??;
        let (tx, rx) = tokio::sync::oneshot::channel();
        s.send(Command::Register { name: name.clone(), adapter: Arc::new(adapter), path, scale: 1.0, reply: tx })?;
        rx.await.map_err(|_| not_running())??;
        Ok((StatusCode::OK, format!("Success: LoRA adapter '{name}' added successfully.")).into_response())
    }
    .await;
    answer(&s, "/v1/load_lora_adapter", r)
}

async fn unload_lora(State(s): St, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Response {
    let r = async {
        s.authorize(&headers)?;
        let body = body.map_err(body_error)?;
        let v = api::parse_json(&body)?;
        let name = api::string_field(&v, "lora_name")?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        s.send(Command::Unload { name: name.clone(), reply: tx })?;
        rx.await.map_err(|_| not_running())??;
        Ok((StatusCode::OK, format!("Success: LoRA adapter '{name}' removed successfully.")).into_response())
    }
    .await;
    answer(&s, "/v1/unload_lora_adapter", r)
}

async fn not_found(State(s): St) -> Response {
    answer(&s, "other", Err(ApiError::new(404, "invalid_request_error", "not_found", "no such endpoint")))
}

/// A running server: its address, and how to stop it.
pub struct ServerHandle {
    pub addr: SocketAddr,
    stop: Arc<tokio::sync::Notify>,
    http: std::thread::JoinHandle<Result<()>>,
}

impl ServerHandle {
    /// Stops accepting, lets running requests finish (at most `SHUTDOWN_GRACE`), and returns.
    pub fn shutdown(self) -> Result<()> {
        self.stop.notify_one();
        self.wait()
    }

    /// Waits until the server has stopped (on SIGINT/SIGTERM when it was started with signals).
    pub fn wait(self) -> Result<()> {
        self.http.join().map_err(|_| anyhow::anyhow!("the HTTP thread panicked"))?
    }
}

/// Binds the address, starts loading the model on the scheduler thread (requests get 503 until
/// it is in) and serves on a thread of its own. With `signals`, SIGINT and SIGTERM stop it.
pub fn spawn(config: ServeConfig, signals: bool) -> Result<ServerHandle> {
    use crate::limits::check_count;
    check_count("--max-batch", config.max_batch, 1, 4096)?;
    check_count("--max-queue", config.max_queue, 0, 1 << 20)?;
    check_count("--max-loras", config.max_loras, 1, 1 << 16)?;
    check_count("--max-lora-rank", config.max_lora_rank, 1, 1 << 16)?;
    check_count("--prefill-chunk", config.prefill_chunk, 1, 1 << 20)?;
    check_count("--threads", config.threads, 0, crate::limits::MAX_THREADS)?;
    let specs: Vec<AdapterSpec> = config.adapter.iter().map(|s| AdapterSpec::parse(s)).collect::<Result<_>>()?;
    let adapter_dir = match &config.adapter_dir {
        Some(d) => Some(d.canonicalize().with_context(|| format!("--adapter-dir {}", d.display()))?),
        None => None,
    };
    let base_name = match &config.served_model_name {
        Some(n) => n.clone(),
        None => config.model.file_name().map_or("model".into(), |n| n.to_string_lossy().into_owned()),
    };
    if specs.iter().any(|s| s.name == base_name) {
        bail!("an adapter may not be named like the base model ({base_name})");
    }
    let listener = std::net::TcpListener::bind((config.host.as_str(), config.port))
        .with_context(|| format!("binding {}:{}", config.host, config.port))?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    if !addr.ip().is_loopback() && config.api_key.is_none() {
        eprintln!(
            "lowrank serve: warning: listening on {addr}, beyond this machine, without --api-key: anyone who can reach it can use it"
        );
    }
    let shared = Arc::new(Shared {
        model: std::sync::OnceLock::new(),
        load_error: std::sync::OnceLock::new(),
        adapters: Default::default(),
        in_flight: Default::default(),
        metrics: Default::default(),
    });
    let (tx, rx) = std::sync::mpsc::channel();
    let limits = scheduler::Limits { max_batch: config.max_batch, max_loras: config.max_loras, prefill_chunk: config.prefill_chunk };
    {
        let (shared, config, tx) = (shared.clone(), config.clone(), tx.clone());
        std::thread::Builder::new().name("lowrank-scheduler".into()).spawn(move || {
            let run = || -> Result<()> {
                let p = Arc::new(Pretrained::load_as(&config.model, config.weights)?);
                let mut startup = Vec::new();
                for s in &specs {
                    let a = load_checked(&p, &s.path, config.max_lora_rank)
                        .map_err(|e| anyhow::anyhow!("adapter {}: {}", s.name, e.message))?;
                    startup.push((s.name.clone(), Arc::new(a), s.path.clone(), s.scale));
                }
                let _ = shared.model.set(p.clone());
                scheduler::run(&shared, p, startup, (tx, rx), limits);
                Ok(())
            };
            let pool = rayon::ThreadPoolBuilder::new().num_threads(config.threads).thread_name(|i| format!("lowrank-model-{i}")).build();
            let result = match pool {
                Ok(pool) => pool.install(run),
                Err(e) => Err(e.into()),
            };
            if let Err(e) = result {
                eprintln!("lowrank serve: {e:#}");
                let _ = shared.load_error.set(format!("{e:#}"));
            }
        })?;
    }
    let state = Arc::new(AppState { shared, commands: Mutex::new(tx), config, base_name, adapter_dir, next_id: Default::default() });
    let app = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/load_lora_adapter", post(load_lora))
        .route("/v1/unload_lora_adapter", post(unload_lora))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state.clone());
    let stop = Arc::new(tokio::sync::Notify::new());
    let stop_http = stop.clone();
    let http = std::thread::Builder::new().name("lowrank-http".into()).spawn(move || -> Result<()> {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            let stopped = Arc::new(tokio::sync::Notify::new());
            let shutdown = {
                let stopped = stopped.clone();
                async move {
                    wait_for_stop(&stop_http, signals).await;
                    eprintln!("lowrank serve: stopping (running requests may take up to {} s)", SHUTDOWN_GRACE.as_secs());
                    stopped.notify_one();
                }
            };
            let server = axum::serve(listener, app).with_graceful_shutdown(shutdown);
            let server = tokio::spawn(async move { server.await });
            stopped.notified().await;
            // Running requests finish within the grace period; then they are ended.
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, server).await;
            let _ = state.send(Command::Stop);
            Ok::<(), anyhow::Error>(())
        })
    })?;
    Ok(ServerHandle { addr, stop, http })
}

async fn wait_for_stop(stop: &tokio::sync::Notify, signals: bool) {
    if !signals {
        return stop.notified().await;
    }
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(t) => t,
        Err(_) => return stop.notified().await,
    };
    tokio::select! {
        _ = stop.notified() => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// `lowrank serve`: starts the server and runs until SIGINT or SIGTERM.
pub fn run(config: ServeConfig) -> Result<()> {
    let h = spawn(config, true)?;
    eprintln!("lowrank serve: listening on http://{}", h.addr);
    h.wait()
}
