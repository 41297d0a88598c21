//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// The real SmolLM2-135M-Instruct GGUF; fetched with scripts/fetch_models.sh when absent.
pub fn smollm2() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = std::env::var_os("LOWRANK_MODELS").map(PathBuf::from).unwrap_or_else(|| root.join("models"));
        let path = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
        if !path.exists() {
            let status =
                std::process::Command::new(root.join("scripts/fetch_models.sh")).status().expect("running scripts/fetch_models.sh");
            assert!(status.success(), "scripts/fetch_models.sh failed");
        }
        path
    })
}

/// The SmolLM2 model, loaded once per test binary.
pub fn smollm2_model() -> &'static lowrank::pretrained::Pretrained {
    static MODEL: OnceLock<lowrank::pretrained::Pretrained> = OnceLock::new();
    MODEL.get_or_init(|| lowrank::pretrained::Pretrained::load(smollm2()).expect("loading SmolLM2"))
}

pub fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lowrank-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// A small Llama-architecture GGUF model — hidden 64, 2 layers, 4 heads (2 key/value), random
/// weights — with SmolLM2's real tokenizer metadata and vocabulary, held as parts so tests can
/// write damaged variants of it. Loads in well under a second.
/// A tensor description and its data: (name, GGML-order dims, type id, data offset or None for
/// the next aligned one, bytes).
pub type RawTensor = (String, Vec<u64>, u32, Option<u64>, Vec<u8>);

#[derive(Clone)]
pub struct TinyGguf {
    pub meta: Vec<(String, lowrank::model::gguf::GgufValue)>,
    pub tensors: Vec<RawTensor>,
}

impl TinyGguf {
    pub fn get() -> TinyGguf {
        static TINY: OnceLock<TinyGguf> = OnceLock::new();
        TINY.get_or_init(|| {
            use lowrank::model::gguf::{hf_to_gguf_name, GgufFile, GgufValue};
            let real = GgufFile::open(smollm2()).expect("opening SmolLM2");
            let mut meta: Vec<(String, GgufValue)> = vec![("general.architecture".into(), GgufValue::String("llama".into()))];
            for (k, v) in [
                ("llama.embedding_length", 64u32),
                ("llama.feed_forward_length", 160),
                ("llama.block_count", 2),
                ("llama.attention.head_count", 4),
                ("llama.attention.head_count_kv", 2),
                ("llama.context_length", 1024),
            ] {
                meta.push((k.into(), GgufValue::U32(v)));
            }
            meta.push(("llama.rope.freq_base".into(), GgufValue::F32(10000.0)));
            meta.push(("llama.attention.layer_norm_rms_epsilon".into(), GgufValue::F32(1e-5)));
            for (k, v) in &real.metadata {
                if k.starts_with("tokenizer.") {
                    meta.push((k.clone(), v.clone()));
                }
            }
            let mut cfg =
                lowrank::model::decoder::DecoderModel::from_gguf(&real, lowrank::model::WeightFormat::F32).expect("loading SmolLM2").config;
            cfg.hidden_size = 64;
            cfg.intermediate_size = 160;
            cfg.num_layers = 2;
            cfg.num_heads = 4;
            cfg.num_kv_heads = 2;
            cfg.head_dim = 16;
            cfg.max_position_embeddings = 1024;
            cfg.tie_word_embeddings = true;
            let model = lowrank::model::decoder::DecoderModel::random(cfg, 7);
            let tensors = lowrank::model::export::hf_tensors(&model)
                .into_iter()
                .map(|(name, (shape, data))| {
                    let dims = shape.iter().rev().map(|&d| d as u64).collect();
                    let bytes = data.iter().flat_map(|x| x.to_le_bytes()).collect();
                    (hf_to_gguf_name(&name).expect("decoder tensor"), dims, 0u32, None, bytes)
                })
                .collect();
            TinyGguf { meta, tensors }
        })
        .clone()
    }

    /// Replaces (or adds) a metadata value.
    pub fn set(&mut self, key: &str, v: lowrank::model::gguf::GgufValue) -> &mut Self {
        match self.meta.iter_mut().find(|(k, _)| k == key) {
            Some(e) => e.1 = v,
            None => self.meta.push((key.into(), v)),
        }
        self
    }

    pub fn remove(&mut self, key: &str) -> &mut Self {
        self.meta.retain(|(k, _)| k != key);
        self
    }

    pub fn tensor_mut(&mut self, name: &str) -> &mut RawTensor {
        self.tensors.iter_mut().find(|t| t.0 == name).expect("tensor of the tiny model")
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = lowrank::model::gguf::GgufWriter::default();
        for (k, v) in &self.meta {
            w.meta(k, v.clone());
        }
        for (name, dims, ty, offset, bytes) in &self.tensors {
            w.tensor_unchecked(name, dims, *ty, *offset, bytes.clone());
        }
        w.to_bytes()
    }

    pub fn write(&self, path: &Path) -> PathBuf {
        std::fs::write(path, self.to_bytes()).unwrap();
        path.to_path_buf()
    }
}

/// Runs the lowrank binary with a time limit: (exit code, stdout, stderr). A panic, an abort
/// (signal) or running past `limit_s` fails the calling test.
pub fn run_cli(args: &[&str], limit_s: u64) -> (i32, String, String) {
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_lowrank"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting lowrank");
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut s);
        s
    });
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed().as_secs() >= limit_s {
            let _ = child.kill();
            let _ = child.wait();
            panic!("lowrank {args:?} hung: still running after {limit_s} s");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let (stdout, stderr) = (t_out.join().unwrap(), t_err.join().unwrap());
    assert!(!stderr.contains("panicked"), "lowrank {args:?} panicked:\n{stderr}");
    let code = status.code().unwrap_or_else(|| panic!("lowrank {args:?} was killed by a signal (abort?):\n{stderr}"));
    (code, stdout, stderr)
}
