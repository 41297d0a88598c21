//! The model's own thread: it owns the running batch and the adapter registry, takes commands
//! from the HTTP handlers between steps, and streams each sequence's text back to its handler.
//!
//! Requests wait in a queue and join the running batch between decode steps (at most
//! `max_batch` run at once; their prompts are fed in chunks). A request whose client has gone
//! (its channel closed) is cancelled at the next step and its cache freed. Adapters are loaded
//! and checked by the handlers' blocking threads and only registered here; at most `max_loras`
//! stay resident, the least recently used of the others dropped and read again from their path
//! when a request names them (off this thread, the request waiting meanwhile). Unloading an
//! adapter lets running requests finish with it: they hold their own reference.

use super::api::ApiError;
use super::metrics::Metrics;
use crate::infer::{Finished, GenerateParams, Request, RunningBatch, SeqId, SharedAdapter};
use crate::lora::LoraAdapter;
use crate::pretrained::Pretrained;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Instant;
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::oneshot;

/// What the scheduler sends a request's handler.
#[derive(Debug)]
pub enum Chunk {
    /// Text that became final.
    Text(String),
    Done(Finished),
    Error(ApiError),
}

/// A request, tokenized and checked by its handler.
pub struct Job {
    pub prompt: Vec<u32>,
    pub params: GenerateParams,
    /// An adapter's name, or `None` for the base model.
    pub adapter: Option<String>,
    /// The request field the prompt came from ("messages" or "prompt"), for errors about it.
    pub input_param: &'static str,
    pub reply: UnboundedSender<Chunk>,
}

pub enum Command {
    Submit(Job),
    /// Registers an adapter loaded and checked elsewhere.
    Register {
        name: String,
        adapter: Arc<LoraAdapter>,
        path: PathBuf,
        scale: f32,
        reply: oneshot::Sender<Result<(), ApiError>>,
    },
    Unload {
        name: String,
        reply: oneshot::Sender<Result<(), ApiError>>,
    },
    /// An evicted adapter read again (or why it could not be).
    Reloaded {
        name: String,
        result: Result<Arc<LoraAdapter>, String>,
    },
    /// Cancel everything still running and stop.
    Stop,
}

/// What the handlers see of the scheduler.
pub struct Shared {
    /// Set once the model has loaded (before that, requests get 503).
    pub model: OnceLock<Arc<Pretrained>>,
    /// Why loading failed, if it did.
    pub load_error: OnceLock<String>,
    /// Registered adapters (resident or not) and their paths.
    pub adapters: RwLock<BTreeMap<String, PathBuf>>,
    /// Requests accepted and not yet answered (queued or running).
    pub in_flight: AtomicUsize,
    pub metrics: Metrics,
}

pub struct Limits {
    pub max_batch: usize,
    pub max_loras: usize,
    pub prefill_chunk: usize,
}

struct Entry {
    adapter: Option<Arc<LoraAdapter>>,
    path: PathBuf,
    scale: f32,
    last_used: u64,
    reloading: bool,
}

struct Live {
    reply: UnboundedSender<Chunk>,
    started: Instant,
    first_token: bool,
}

struct Scheduler<'m> {
    shared: &'m Shared,
    model: &'m Arc<Pretrained>,
    commands: Sender<Command>,
    limits: &'m Limits,
    batch: RunningBatch<'m>,
    registry: HashMap<String, Entry>,
    queue: VecDeque<(Job, Instant)>,
    /// Jobs waiting for their adapter to be read again.
    parked: Vec<(Job, Instant)>,
    live: HashMap<SeqId, Live>,
    clock: u64,
    stopping: bool,
}

/// Runs the scheduler on this thread until the command channel closes or `Stop` arrives.
/// `startup` are the adapters given on the command line, already loaded.
pub fn run(
    shared: &Shared,
    model: Arc<Pretrained>,
    startup: Vec<(String, Arc<LoraAdapter>, PathBuf, f32)>,
    commands: (Sender<Command>, Receiver<Command>),
    limits: Limits,
) {
    let (tx, rx) = commands;
    let mut s = Scheduler {
        shared,
        model: &model,
        commands: tx,
        limits: &limits,
        batch: RunningBatch::new(&model.model, &model.tokenizer),
        registry: HashMap::new(),
        queue: VecDeque::new(),
        parked: Vec::new(),
        live: HashMap::new(),
        clock: 0,
        stopping: false,
    };
    s.batch.prefill_chunk = limits.prefill_chunk;
    for (name, adapter, path, scale) in startup {
        s.register(name, adapter, path, scale);
    }
    loop {
        if s.batch.is_empty() && s.queue.is_empty() {
            if s.stopping {
                break;
            }
            match rx.recv() {
                Ok(c) => s.handle(c),
                Err(_) => break,
            }
        }
        while let Ok(c) = rx.try_recv() {
            s.handle(c);
        }
        s.admit();
        s.step();
        s.shared.metrics.queued.store((s.queue.len() + s.parked.len()) as u64, Ordering::Relaxed);
        s.shared.metrics.running.store(s.batch.len() as u64, Ordering::Relaxed);
    }
}

impl Scheduler<'_> {
    fn handle(&mut self, c: Command) {
        match c {
            Command::Submit(job) => self.queue.push_back((job, Instant::now())),
            Command::Register { name, adapter, path, scale, reply } => {
                let answer = if self.registry.contains_key(&name) {
                    Err(ApiError::bad_request("lora_name", format!("an adapter named {name:?} is already loaded")))
                } else {
                    self.register(name, adapter, path, scale);
                    Ok(())
                };
                let _ = reply.send(answer);
            }
            Command::Unload { name, reply } => {
                let answer = match self.registry.remove(&name) {
                    Some(_) => {
                        self.shared.adapters.write().unwrap_or_else(|e| e.into_inner()).remove(&name);
                        Ok(())
                    }
                    None => Err(ApiError::new(404, "not_found_error", "model_not_found", format!("no adapter named {name:?} is loaded"))),
                };
                let _ = reply.send(answer);
            }
            Command::Reloaded { name, result } => {
                let waiting: Vec<_> = {
                    let (mine, rest) = std::mem::take(&mut self.parked).into_iter().partition(|(j, _)| j.adapter.as_deref() == Some(&name));
                    self.parked = rest;
                    mine
                };
                match (result, self.registry.get_mut(&name)) {
                    (Ok(a), Some(e)) => {
                        e.adapter = Some(a);
                        e.reloading = false;
                        self.evict();
                        waiting.into_iter().rev().for_each(|j| self.queue.push_front(j));
                    }
                    (result, _) => {
                        if let Some(e) = self.registry.get_mut(&name) {
                            e.reloading = false;
                        }
                        let why = result.err().unwrap_or_else(|| "it was unloaded".into());
                        for (job, _) in waiting {
                            self.fail(
                                &job.reply,
                                ApiError::new(
                                    500,
                                    "server_error",
                                    "adapter_unavailable",
                                    format!("adapter {name:?} could not be read again: {why}"),
                                ),
                            );
                        }
                    }
                }
            }
            Command::Stop => {
                self.stopping = true;
                for id in self.live.keys().copied().collect::<Vec<_>>() {
                    self.cancel(id);
                }
                for (job, _) in std::mem::take(&mut self.queue).into_iter().chain(std::mem::take(&mut self.parked)) {
                    self.fail(&job.reply, ApiError::new(503, "server_error", "shutting_down", "the server is shutting down"));
                }
            }
        }
    }

    fn register(&mut self, name: String, adapter: Arc<LoraAdapter>, path: PathBuf, scale: f32) {
        self.clock += 1;
        self.shared.adapters.write().unwrap_or_else(|e| e.into_inner()).insert(name.clone(), path.clone());
        self.registry.insert(name, Entry { adapter: Some(adapter), path, scale, last_used: self.clock, reloading: false });
        self.evict();
    }

    /// Drops the least recently used resident adapters beyond `max_loras` (they stay registered).
    fn evict(&mut self) {
        loop {
            let resident: Vec<(&String, u64)> =
                self.registry.iter().filter(|(_, e)| e.adapter.is_some()).map(|(n, e)| (n, e.last_used)).collect();
            if resident.len() <= self.limits.max_loras {
                return;
            }
            let oldest = resident.iter().min_by_key(|(_, t)| *t).map(|(n, _)| (*n).clone()).expect("more than zero resident");
            if let Some(e) = self.registry.get_mut(&oldest) {
                e.adapter = None;
            }
        }
    }

    fn fail(&self, reply: &UnboundedSender<Chunk>, e: ApiError) {
        let _ = reply.send(Chunk::Error(e));
        self.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
    }

    /// A request leaves (answered, failed or cancelled).
    fn finish(&mut self, id: SeqId) {
        if let Some(live) = self.live.remove(&id) {
            self.shared.metrics.latency(live.started.elapsed().as_secs_f64());
            self.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
            // Before the answer goes out, so a client that reads the metrics next sees it gone.
            self.shared.metrics.running.store(self.live.len() as u64, Ordering::Relaxed);
        }
    }

    /// Ends a running request now: its sequence leaves the batch (freeing its cache) and it is
    /// answered for.
    fn cancel(&mut self, id: SeqId) {
        self.batch.cancel(id);
        self.finish(id);
    }

    /// Moves queued requests into the running batch while there is room.
    fn admit(&mut self) {
        while self.batch.len() < self.limits.max_batch {
            let Some((job, queued_at)) = self.queue.pop_front() else { return };
            if job.reply.is_closed() {
                self.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
                continue;
            }
            let adapter: Option<(SharedAdapter, f32)> = match &job.adapter {
                None => None,
                Some(name) => {
                    self.clock += 1;
                    let clock = self.clock;
                    match self.registry.get_mut(name) {
                        None => {
                            self.fail(
                                &job.reply,
                                ApiError::new(404, "not_found_error", "model_not_found", format!("adapter {name:?} was unloaded")),
                            );
                            continue;
                        }
                        Some(e) => {
                            e.last_used = clock;
                            match &e.adapter {
                                Some(a) => Some((a.clone() as SharedAdapter, e.scale)),
                                None => {
                                    if !e.reloading {
                                        e.reloading = true;
                                        reload(self.model, &self.commands, name.clone(), e.path.clone());
                                    }
                                    self.parked.push((job, queued_at));
                                    continue;
                                }
                            }
                        }
                    }
                }
            };
            let prompt_tokens = job.prompt.len();
            match self.batch.add(Request { prompt: job.prompt, params: job.params, adapter }) {
                Ok(id) => {
                    self.shared.metrics.prompt_tokens.fetch_add(prompt_tokens as u64, Ordering::Relaxed);
                    self.live.insert(id, Live { reply: job.reply, started: queued_at, first_token: false });
                }
                Err(e) => self.fail(&job.reply, ApiError::bad_request(job.input_param, format!("{e:#}"))),
            }
        }
    }

    /// One model step over the running batch; its text goes to each request's handler.
    fn step(&mut self) {
        // Requests whose clients have gone are cancelled before the step.
        let gone: Vec<SeqId> = self.live.iter().filter(|(_, l)| l.reply.is_closed()).map(|(id, _)| *id).collect();
        for id in gone {
            self.cancel(id);
        }
        if self.batch.is_empty() {
            return;
        }
        self.shared.metrics.batch_size(self.batch.len());
        let events = match self.batch.step() {
            Ok(events) => events,
            Err(e) => {
                // A step that fails fails every request in it (none can go on without the others' step).
                for id in self.live.keys().copied().collect::<Vec<_>>() {
                    if let Some(l) = self.live.get(&id) {
                        let _ = l.reply.send(Chunk::Error(ApiError::new(500, "server_error", "step_failed", format!("{e:#}"))));
                    }
                    self.cancel(id);
                }
                return;
            }
        };
        for e in events {
            let Some(live) = self.live.get_mut(&e.id) else { continue };
            if e.token.is_some() {
                self.shared.metrics.generated_tokens.fetch_add(1, Ordering::Relaxed);
                if !live.first_token {
                    live.first_token = true;
                    self.shared.metrics.time_to_first_token(live.started.elapsed().as_secs_f64());
                }
            }
            if !e.text.is_empty() {
                let _ = live.reply.send(Chunk::Text(e.text));
            }
            if let Some(done) = e.finished {
                let reply = live.reply.clone();
                self.finish(e.id);
                let _ = reply.send(Chunk::Done(done));
            }
        }
    }
}

/// Reads an evicted adapter again on a thread of its own; the result comes back as a command.
fn reload(model: &Arc<Pretrained>, commands: &Sender<Command>, name: String, path: PathBuf) {
    let (model, tx) = (model.clone(), commands.clone());
    std::thread::spawn(move || {
        let result = crate::lora::load(&path, &model.model).map(Arc::new).map_err(|e| format!("{e:#}"));
        let _ = tx.send(Command::Reloaded { name, result });
    });
}
