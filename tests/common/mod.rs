//! Helpers shared by the integration tests: fixture paths and the rs-mini samples.
#![allow(dead_code)]

use std::path::PathBuf;

pub mod daemon;
pub mod ingest;

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `../shared` beside the checkout (override with `RSITRD_SHARED_DIR`).
pub fn shared_dir() -> PathBuf {
    std::env::var_os("RSITRD_SHARED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("../shared"))
}

pub fn fixture(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures").join(name)
}

pub fn rs_mini_dir() -> PathBuf {
    shared_dir().join("data/rs-mini")
}

/// One rs-mini image with its captions.
#[derive(Debug, Clone)]
pub struct MiniSample {
    pub filename: String,
    pub path: PathBuf,
    pub split: String,
    pub captions: Vec<String>,
}

pub fn rs_mini() -> Vec<MiniSample> {
    let dir = rs_mini_dir();
    let text = std::fs::read_to_string(dir.join("dataset.json")).expect("rs-mini dataset.json");
    let value: serde_json::Value = serde_json::from_str(&text).expect("valid json");
    value["images"]
        .as_array()
        .expect("images")
        .iter()
        .map(|image| {
            let filename = image["filename"].as_str().expect("filename").to_string();
            MiniSample {
                path: dir.join("images").join(&filename),
                filename,
                split: image["split"].as_str().expect("split").to_string(),
                captions: image["sentences"]
                    .as_array()
                    .expect("sentences")
                    .iter()
                    .map(|s| s["raw"].as_str().expect("raw").to_string())
                    .collect(),
            }
        })
        .collect()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The `rsitrd` binary under test.
pub fn rsitrd() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_rsitrd"))
}

/// Runs `command` and asserts it succeeded (showing its stderr otherwise).
pub fn run_ok(command: &mut std::process::Command) -> std::process::Output {
    let out = command.output().expect("run rsitrd");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `command`, asserts success and parses stdout as JSON lines.
pub fn json_lines(command: &mut std::process::Command) -> Vec<serde_json::Value> {
    String::from_utf8(run_ok(command).stdout)
        .expect("utf-8 output")
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}
