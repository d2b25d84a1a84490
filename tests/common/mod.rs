//! Helpers shared by the integration tests: fixture paths and the rs-mini samples.
#![allow(dead_code)]

use std::path::PathBuf;

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
