//! The `lowrank` command line: train, evaluate, preview data and generate. No math lives here.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use lowrank::convert;
use lowrank::infer::chat::Conversation;
use lowrank::infer::session::Session;
use lowrank::infer::{GenerateParams, Generation, Request, SamplingParams};
use lowrank::lora::adapter::thousands;
use lowrank::model::WeightFormat;
use lowrank::pretrained::Pretrained;
use lowrank::train::eval::{self, EvalSettings};
use lowrank::train::trainer::{self, Metric, Progress, TrainConfig};
use lowrank::LoraAdapter;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Parser)]
#[command(name = "lowrank", version, about = "LoRA fine-tuning of pre-trained transformer language models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fine-tune a LoRA adapter.
    Train(Box<TrainArgs>),
    /// Mean loss and perplexity of a model (with an adapter) on a data file; optionally
    /// exact-match accuracy of its greedy answers.
    Eval(EvalArgs),
    /// Inspect data as the trainer sees it.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
    /// Generate text from a prompt.
    Generate(GenerateArgs),
    /// Chat interactively (/adapter NAME, /adapter none, /adapters, /reset, /quit).
    Chat(ChatArgs),
    /// Merge an adapter into the base model and write a Hugging Face directory.
    Merge(MergeArgs),
    /// Write an adapter in llama.cpp's GGUF LoRA format.
    ExportGguf(ExportArgs),
    /// Combine adapters with PEFT's add_weighted_adapter (linear or cat).
    Combine(CombineArgs),
    /// Benchmarks (JSON lines prefixed "RESULT "); scripts/bench.sh compares them with PEFT.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
    /// Serve the model and its adapters behind an OpenAI-compatible HTTP API.
    Serve(Box<lowrank::serve::ServeConfig>),
    /// Describe a model or adapter (HF directory, PEFT directory or GGUF file).
    Inspect { path: PathBuf },
}

/// Adapters and sampling shared by generate and chat.
#[derive(Args)]
struct InferArgs {
    #[arg(long)]
    model: PathBuf,
    /// Keep the base weights as f32, bf16, q8_0 or q4_1 (compact formats decode faster).
    #[arg(long, default_value = "f32", value_parser = WeightFormat::parse)]
    weights: WeightFormat,
    /// Adapter as [NAME=]PATH[@SCALE]; repeatable. The first one starts active.
    #[arg(long)]
    adapter: Vec<String>,
    /// Merge the active adapter into the weights instead of applying it on the fly.
    #[arg(long)]
    merged: bool,
    #[arg(long, allow_negative_numbers = true, default_value_t = 256)]
    max_new_tokens: usize,
    #[arg(long, allow_negative_numbers = true, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, allow_negative_numbers = true, default_value_t = 0)]
    top_k: usize,
    #[arg(long, allow_negative_numbers = true, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, allow_negative_numbers = true, default_value_t = 1.0)]
    repetition_penalty: f32,
    #[arg(long, allow_negative_numbers = true, default_value_t = 0)]
    seed: u64,
    /// Stop when this text appears (repeatable).
    #[arg(long)]
    stop: Vec<String>,
}

impl InferArgs {
    fn session(&self) -> Result<Session> {
        Session::load(&self.model, self.weights, &self.adapter, self.merged)
    }

    fn params(&self, p: &Pretrained) -> GenerateParams {
        GenerateParams {
            max_new_tokens: self.max_new_tokens,
            sampling: SamplingParams {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                repetition_penalty: self.repetition_penalty,
                seed: self.seed,
            },
            stop_ids: p.stop_ids(),
            stop_strings: self.stop.clone(),
        }
    }
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    infer: InferArgs,
    /// System message.
    #[arg(long)]
    system: Option<String>,
}

#[derive(Args)]
struct MergeArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    adapter: PathBuf,
    /// Scale of the adapter's update.
    #[arg(long, allow_negative_numbers = true, default_value_t = 1.0)]
    scale: f32,
    /// Directory to write (refused if it holds anything, unless --overwrite).
    #[arg(long)]
    output: PathBuf,
    /// Replace the output directory's contents (only once the new ones are written).
    #[arg(long)]
    overwrite: bool,
}

#[derive(Args)]
struct ExportArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    adapter: PathBuf,
    /// File to write (refused if it exists, unless --overwrite).
    #[arg(long)]
    output: PathBuf,
    /// Replace an existing output file.
    #[arg(long)]
    overwrite: bool,
}

#[derive(Args)]
struct CombineArgs {
    #[arg(long)]
    model: PathBuf,
    /// PATH@WEIGHT, repeatable.
    #[arg(long, required = true)]
    adapter: Vec<String>,
    /// linear or cat.
    #[arg(long, default_value = "cat")]
    combination: String,
    /// Adapter directory to write (refused if it holds anything, unless --overwrite).
    #[arg(long)]
    output: PathBuf,
    /// Replace the output directory's contents (only once the new ones are written).
    #[arg(long)]
    overwrite: bool,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// LoRA training throughput on peft_bench.py's workload (its corpus file: `peft_bench.py corpus`).
    Train {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        corpus: PathBuf,
        #[arg(long, default_value = "q_proj,v_proj")]
        targets: String,
        #[arg(long, allow_negative_numbers = true, default_value_t = 8)]
        r: usize,
        #[arg(long, allow_negative_numbers = true, default_value_t = 16.0)]
        alpha: f32,
        #[arg(long, allow_negative_numbers = true, default_value_t = 0.05)]
        dropout: f32,
        #[arg(long, allow_negative_numbers = true, default_value_t = 4)]
        batch: usize,
        #[arg(long, allow_negative_numbers = true, default_value_t = 128)]
        seq: usize,
        #[arg(long, allow_negative_numbers = true, default_value_t = 10)]
        steps: usize,
        #[arg(long, allow_negative_numbers = true, default_value_t = 2)]
        warmup: usize,
        #[arg(long, allow_negative_numbers = true, default_value_t = 2)]
        threads: usize,
        #[arg(long)]
        gradient_checkpointing: bool,
        /// Base weights as f32, bf16, q8_0 or q4_1.
        #[arg(long, default_value = "f32", value_parser = WeightFormat::parse)]
        weights: WeightFormat,
        /// Train a random-weight Llama of this shape instead (tinyllama-1.1b or llama3-8b; --model
        /// still gives the tokenizer), its weights made directly in --weights' format.
        #[arg(long)]
        random_shape: Option<String>,
        /// Time each phase of a step (frozen and LoRA GEMMs, attention, norms/RoPE/SwiGLU, LM
        /// head, optimizer, the rest) and count page faults.
        #[arg(long)]
        profile: bool,
    },
    /// Decode and prefill tokens/s: base, unmerged adapter, merged adapter.
    Decode {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        adapter: Option<PathBuf>,
        #[arg(long, allow_negative_numbers = true, default_value_t = 128)]
        new_tokens: usize,
        #[arg(long, allow_negative_numbers = true, default_value_t = 512)]
        prefill: usize,
        #[arg(long, allow_negative_numbers = true, default_value_t = 2)]
        threads: usize,
        /// Base weights as f32, bf16, q8_0 or q4_1.
        #[arg(long, default_value = "f32", value_parser = WeightFormat::parse)]
        weights: WeightFormat,
    },
    /// Batched inference with a different adapter per row vs one adapter for all rows.
    Adapters {
        #[arg(long)]
        model: PathBuf,
        #[arg(long, default_value_t = 8)]
        rows: usize,
        #[arg(long, default_value_t = 8)]
        r: usize,
        #[arg(long, default_value_t = 128)]
        prefill: usize,
        #[arg(long, default_value_t = 32)]
        steps: usize,
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Base weights as f32, bf16, q8_0 or q4_1.
        #[arg(long, default_value = "f32", value_parser = WeightFormat::parse)]
        weights: WeightFormat,
        /// Seconds per decode step in each phase (frozen products with the LM head, low-rank
        /// products, attention, norms/RoPE/SwiGLU, the rest).
        #[arg(long)]
        profile: bool,
    },
    /// Load test of `lowrank serve` over loopback: C streaming clients over K adapters.
    Serve {
        #[arg(long)]
        model: PathBuf,
        #[arg(long, default_value = "q8_0", value_parser = WeightFormat::parse)]
        weights: WeightFormat,
        #[arg(long, default_value_t = 16)]
        clients: usize,
        /// Distinct adapters the requests are spread over (0: the base model).
        #[arg(long, default_value_t = 16)]
        adapters: usize,
        #[arg(long, default_value_t = 64)]
        requests: usize,
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
    /// Frozen-weight products of one inference step (SmolLM2-135M's shapes, random weights) per
    /// weight format and row count (decoding sequences or prompt tokens): ms, multiply-adds/s, bytes/s.
    Gemv {
        /// Weight formats, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "f32,bf16,q8_0,q4_1")]
        weights: Vec<String>,
        /// Rows per step, comma-separated: sequences decoding, or prompt tokens (1 to 4096).
        #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
        rows: Vec<usize>,
        #[arg(long, allow_negative_numbers = true, default_value_t = 20)]
        repeats: usize,
        #[arg(long, allow_negative_numbers = true, default_value_t = 2)]
        threads: usize,
    },
    /// f32 GEMM GFLOP/s.
    Gemm {
        #[arg(long, allow_negative_numbers = true, default_value_t = 2048)]
        n: usize,
        #[arg(long, allow_negative_numbers = true, default_value_t = 10)]
        repeats: usize,
        #[arg(long, allow_negative_numbers = true, default_value_t = 2)]
        threads: usize,
    },
}

#[derive(Subcommand)]
enum DataCommand {
    /// Print tokenized examples; tokens that do not train (label -100) are shown in [brackets].
    Preview(PreviewArgs),
}

/// `lowrank train`: the training settings (one definition, `TrainConfig`) and a settings file.
#[derive(Args)]
struct TrainArgs {
    /// TOML file with any of these settings (the same names in snake_case); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: TrainConfig,
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    settings: EvalSettings,
    /// Print every generated answer (with --exact-match).
    #[arg(long)]
    show: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct PreviewArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    data: PathBuf,
    #[arg(long)]
    format: Option<String>,
    #[arg(long)]
    train_on_inputs: bool,
    #[arg(long, allow_negative_numbers = true, default_value_t = 512)]
    seq_len: usize,
    /// Examples to show.
    #[arg(long, allow_negative_numbers = true, default_value_t = 3)]
    limit: usize,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    infer: InferArgs,
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
}

static STOP: AtomicBool = AtomicBool::new(false);

/// Draws a progress bar on a terminal, or prints a log line per step otherwise.
struct Bar {
    bar: Option<ProgressBar>,
    total: usize,
}

impl Progress for Bar {
    fn start(&mut self, total: usize, resumed_at: usize) {
        self.total = total;
        if std::io::stderr().is_terminal() {
            let b = ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
            b.set_style(ProgressStyle::with_template("{bar:30.cyan/blue} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]").unwrap());
            b.set_position(resumed_at as u64);
            b.reset_eta();
            self.bar = Some(b);
        }
    }
    fn step(&mut self, m: &Metric) {
        let msg =
            format!("loss {:.4} lr {:.2e} {:.0} tok/s", m.loss.unwrap_or(f64::NAN), m.lr.unwrap_or(0.0), m.tokens_per_s.unwrap_or(0.0));
        match &self.bar {
            Some(b) => {
                b.set_position(m.step as u64);
                b.set_message(msg);
            }
            None => eprintln!("step {}/{} {msg} grad_norm {:.3}", m.step, self.total, m.grad_norm.unwrap_or(0.0)),
        }
    }
    fn eval(&mut self, m: &Metric) {
        self.message(&format!(
            "step {}: eval loss {:.4}, perplexity {:.3}",
            m.step,
            m.eval_loss.unwrap_or(f64::NAN),
            m.eval_ppl.unwrap_or(f64::NAN)
        ));
    }
    fn message(&mut self, text: &str) {
        match &self.bar {
            Some(b) => b.println(text),
            None => eprintln!("{text}"),
        }
    }
    fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish();
        }
    }
}

/// Runs `f` on a thread pool of `n` workers (0: rayon's default, one per core). The binary owns
/// the pool; the library never configures a global one, so a host program decides its threads.
fn load_adapter(p: &Pretrained, path: &Option<PathBuf>) -> Result<Option<LoraAdapter>> {
    path.as_ref().map(|a| lowrank::lora::load(a, &p.model)).transpose()
}

fn cmd_train(args: TrainArgs, matches: &clap::ArgMatches) -> Result<()> {
    let cfg = match &args.config {
        Some(path) => {
            let text = lowrank::io::read_input_text(path, "settings file")?;
            let given = |key: &str| matches.value_source(key) == Some(clap::parser::ValueSource::CommandLine);
            args.settings.with_file(&text, path, &given)?
        }
        None => args.settings,
    };
    cfg.validate()?;
    ctrlc::set_handler(|| {
        if STOP.swap(true, Ordering::SeqCst) {
            eprintln!("\nsecond interrupt: exiting without a checkpoint");
            std::process::exit(130);
        }
        eprintln!("\ninterrupt: finishing this step and writing a checkpoint (Ctrl-C again to quit at once)");
    })
    .context("installing the Ctrl-C handler")?;
    let mut bar = Bar { bar: None, total: 0 };
    let s = lowrank::in_pool(cfg.threads, || trainer::train(&cfg, &mut bar, &STOP))?;
    println!(
        "{} {} steps in {:.1} s, {:.0} tokens/s; final loss {}{}",
        if s.interrupted { "stopped after" } else { "trained" },
        s.steps,
        s.wall_s,
        s.tokens_per_s,
        s.final_loss.map_or("-".into(), |l| format!("{l:.4}")),
        s.final_eval_loss.map_or(String::new(), |l| format!(", eval loss {l:.4} (perplexity {:.3})", l.exp())),
    );
    println!(
        "trainable params: {} of {} ({:.4}%); adapter {} ({:.2} MiB)",
        thousands(s.trainable_params),
        thousands(s.total_params),
        100.0 * s.trainable_params as f64 / s.total_params as f64,
        s.adapter_dir.display(),
        s.adapter_bytes as f64 / (1 << 20) as f64
    );
    if s.interrupted {
        std::process::exit(130);
    }
    Ok(())
}

fn cmd_eval(a: EvalArgs) -> Result<()> {
    let report = eval::run(&a.settings)?;
    if a.json {
        println!("{}", report.to_json());
        return Ok(());
    }
    let loss = &report.loss;
    println!("loss {:.4}  perplexity {:.3}  ({} tokens, {} examples)", loss.mean(), loss.mean().exp(), loss.count, report.examples);
    if let Some(em) = &report.exact_match {
        if a.show {
            for (_, want, got) in &em.answers {
                println!("{} expected {want:?} got {got:?}", if got.trim() == want.trim() { "ok  " } else { "MISS" });
            }
        }
        println!("exact match {}/{} = {:.1}%", em.correct, em.total, 100.0 * em.accuracy());
    }
    Ok(())
}

fn cmd_preview(a: PreviewArgs) -> Result<()> {
    let p = Pretrained::load(&a.model)?;
    print!("{}", eval::preview(&p, &a.data, a.format.as_deref(), a.train_on_inputs, a.seq_len, a.limit)?);
    Ok(())
}

fn print_now(text: &str) {
    let mut out = std::io::stdout();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

fn cmd_generate(a: GenerateArgs) -> Result<()> {
    let s = a.infer.session()?;
    let t = &s.base.tokenizer;
    let prompt = if a.chat { Conversation::new(&s, &[])?.prompt_for(&s, &a.prompt)? } else { t.encode(&a.prompt, true)? };
    let request = Request { prompt, params: a.infer.params(&s.base), adapter: s.adapter() };
    Generation::new(s.model(), t, request)?.run(print_now)?;
    println!();
    Ok(())
}

fn cmd_chat(a: ChatArgs) -> Result<()> {
    let mut s = a.infer.session()?;
    let mut chat = Conversation::new(&s, a.system.as_slice())?;
    let params = a.infer.params(&s.base);
    let stdin = std::io::stdin();
    let interactive = stdin.is_terminal();
    let active = |s: &Session| s.adapters.active_name().unwrap_or("none").to_string();
    if interactive {
        eprintln!("lowrank chat — adapter: {}. Commands: /adapter NAME, /adapter none, /adapters, /reset, /quit", active(&s));
    }
    loop {
        if interactive {
            eprint!("> ");
        }
        let mut line = String::new();
        if stdin.read_line(&mut line).context("reading a chat line from standard input")? == 0 {
            break;
        }
        let line = line.trim_end_matches(['\n', '\r']);
        if let Some(cmd) = line.strip_prefix('/') {
            let mut parts = cmd.split_whitespace();
            match (parts.next(), parts.next()) {
                (Some("quit" | "exit"), _) => break,
                (Some("reset"), _) => {
                    chat.reset();
                    println!("[history cleared]");
                }
                (Some("adapters"), _) => {
                    let names = s.adapters.names();
                    println!("[adapters: {}; active: {}]", if names.is_empty() { "none".into() } else { names.join(", ") }, active(&s));
                }
                (Some("adapter"), Some(name)) => match s.switch(if name == "none" { None } else { Some(name) }) {
                    Ok(()) => println!("[active adapter: {}]", active(&s)),
                    Err(e) => println!("[{e}]"),
                },
                _ => println!("[unknown command /{cmd}]"),
            }
            continue;
        }
        if line.trim().is_empty() {
            continue;
        }
        // One turn that cannot run (e.g. past the context) ends that turn, not the chat.
        match chat.turn(&s, line, &params, print_now) {
            Ok(_) => println!(),
            Err(e) => println!("[{e:#}]"),
        }
    }
    Ok(())
}

fn cmd_merge(a: MergeArgs) -> Result<()> {
    convert::merge_into_model(&a.model, &a.adapter, a.scale, &a.output, a.overwrite)?;
    println!("merged {} into {} → {}", a.adapter.display(), a.model.display(), a.output.display());
    Ok(())
}

fn cmd_export_gguf(a: ExportArgs) -> Result<()> {
    let (tensors, bytes) = convert::export_gguf(&a.model, &a.adapter, &a.output, a.overwrite)?;
    println!("wrote {} ({tensors} tensors, {:.2} MiB)", a.output.display(), bytes as f64 / (1 << 20) as f64);
    Ok(())
}

fn cmd_combine(a: CombineArgs) -> Result<()> {
    let r = convert::combine(&a.model, &a.adapter, &a.combination, &a.output, a.overwrite)?;
    println!("wrote {} (r={r})", a.output.display());
    Ok(())
}

fn cmd_bench(c: BenchCommand) -> Result<()> {
    let results = match c {
        BenchCommand::Train {
            model,
            corpus,
            targets,
            r,
            alpha,
            dropout,
            batch,
            seq,
            steps,
            warmup,
            threads,
            gradient_checkpointing,
            weights,
            profile,
            random_shape,
        } => lowrank::in_pool(threads, || {
            let mut p = Pretrained::load_as(&model, weights)?;
            if let Some(shape) = &random_shape {
                p.model = lowrank::bench::random_model(shape, weights, 0)?;
            }
            p.model.gradient_checkpointing = gradient_checkpointing;
            let b = lowrank::bench::TrainBench { corpus: &corpus, targets, r, alpha, dropout, batch, seq, warmup, steps, profile };
            Ok(vec![lowrank::bench::train(&p, &b)?])
        })?,
        BenchCommand::Decode { model, adapter, new_tokens, prefill, threads, weights } => lowrank::in_pool(threads, || {
            let mut p = Pretrained::load_as(&model, weights)?;
            let a = load_adapter(&p, &adapter)?;
            lowrank::bench::decode(&mut p, a.as_ref(), new_tokens, prefill)
        })?,
        BenchCommand::Adapters { model, rows, r, prefill, steps, threads, weights, profile } => lowrank::in_pool(threads, || {
            let p = Pretrained::load_as(&model, weights)?;
            Ok(vec![lowrank::bench::multi_adapter(&p, rows, r, prefill, steps, profile)?])
        })?,
        BenchCommand::Serve { model, weights, clients, adapters, requests, max_tokens, threads } => {
            let b = lowrank::serve::load::LoadBench { model, weights, clients, adapters, requests, max_tokens, threads };
            vec![lowrank::serve::load::run(&b)?]
        }
        BenchCommand::Gemv { weights, rows, repeats, threads } => lowrank::in_pool(threads, || {
            let formats = weights.iter().map(|w| WeightFormat::parse(w)).collect::<Result<Vec<_>>>().context("--weights")?;
            Ok(vec![lowrank::bench::gemv(&formats, &rows, repeats)?])
        })?,
        BenchCommand::Gemm { n, repeats, threads } => lowrank::in_pool(threads, || Ok(vec![lowrank::bench::gemm(n, repeats)?]))?,
    };
    for r in results {
        println!("RESULT {r}");
    }
    Ok(())
}

fn main() {
    use clap::{CommandFactory, FromArgMatches};
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let result = match cli.command {
        Command::Train(a) => cmd_train(*a, matches.subcommand_matches("train").expect("the train subcommand")),
        Command::Eval(a) => cmd_eval(a),
        Command::Data { command: DataCommand::Preview(a) } => cmd_preview(a),
        Command::Generate(a) => cmd_generate(a),
        Command::Chat(a) => cmd_chat(a),
        Command::Merge(a) => cmd_merge(a),
        Command::ExportGguf(a) => cmd_export_gguf(a),
        Command::Combine(a) => cmd_combine(a),
        Command::Bench { command } => cmd_bench(command),
        Command::Serve(c) => lowrank::serve::run(*c),
        Command::Inspect { path } => lowrank::inspect::inspect(&path).map(|r| print!("{r}")),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
