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
