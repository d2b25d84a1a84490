//! The command-line contracts other tools rely on (`params`, `embed`, device errors).

mod common;

use common::{fixture, json_lines, rs_mini_dir, rsitrd, run_ok};

#[test]
fn params_of_vit_b32_config() {
    let out = run_ok(
        rsitrd()
            .args(["params", "--json", "--model"])
            .arg(fixture("vit-b-32")),
    );
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(value["trainable"], 161_088);
    assert_eq!(value["backbone"], 151_277_313);
    assert_eq!(value["total"], 151_277_313 + 161_088);
}

#[test]
fn params_of_open_clip_architectures() {
    // Backbone counts as open_clip reports them (`sum(p.numel())` of `create_model(name)`,
    // printed by tests/make_fixtures.py --open-clip); the adapter follows the widths.
    for (arch, backbone, trainable) in [
        ("ViT-B-32", 151_277_313u64, 161_088u64),
        ("ViT-B-16", 149_620_737, 161_088),
        ("ViT-L-14", 427_616_513, 227_136),
        ("ViT-L-14-336", 427_944_193, 227_136),
    ] {
        let out = run_ok(rsitrd().args(["params", "--json", "--arch", arch]));
        let value: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(value["backbone"], backbone, "{arch}");
        assert_eq!(value["trainable"], trainable, "{arch}");
    }
    let out = rsitrd()
        .args(["params", "--arch", "ViT-H-14"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ViT-L-14-336"));
}

#[test]
fn embed_prints_normalized_lines_in_order() {
    let image = rs_mini_dir().join("images/rsicd_00001.jpg");
    let lines = json_lines(
        rsitrd()
            .args(["embed", "--json", "--model"])
            .arg(fixture("tiny-clip"))
            .args(["--text", "a football field"])
            .arg("--image")
            .arg(&image)
            .args(["--text", "a bridge over a river"]),
    );
    let kinds: Vec<&str> = lines.iter().map(|l| l["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["text", "image", "text"]);
    assert_eq!(lines[0]["input"], "a football field");
    assert_eq!(lines[2]["input"], "a bridge over a river");
    for line in &lines {
        let embedding: Vec<f64> = serde_json::from_value(line["embedding"].clone()).unwrap();
        assert_eq!(embedding.len(), 24);
        let norm: f64 = embedding.iter().map(|v| v * v).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "norm {norm}");
    }
}

#[test]
fn embed_of_a_corrupt_image_names_it() {
    let temp = tempfile::tempdir().unwrap();
    let bad = temp.path().join("broken.jpg");
    let good = std::fs::read(rs_mini_dir().join("images/rsicd_00002.jpg")).unwrap();
    std::fs::write(&bad, &good[..good.len() / 3]).unwrap();
    let out = rsitrd()
        .args(["embed", "--model"])
        .arg(fixture("tiny-clip"))
        .arg("--image")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("broken.jpg"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_without_the_feature_is_a_clear_error() {
    let out = rsitrd()
        .args(["embed", "--device", "cuda", "--text", "x", "--model"])
        .arg(fixture("tiny-clip"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--features cuda"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn missing_model_dir_is_a_clear_error() {
    let out = rsitrd()
        .args(["embed", "--text", "x", "--model", "/nonexistent/model"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("`/nonexistent/model` is neither a local directory"),
        "{stderr}"
    );
}

/// `rsitrd bench` (what docs/PERFORMANCE.md and tests/cuda_check.sh run) measures every part it
/// is asked for on a real checkpoint, with rates that are positive and finite, and refuses an
/// unknown part.
#[test]
fn bench_reports_every_requested_part() {
    let out = run_ok(
        rsitrd()
            .args(["bench", "--batch-size", "2", "--iterations", "1", "--model"])
            .arg(fixture("tiny-clip"))
            .args(["--only", "image,text,train,matmul,linear"]),
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in [
        "image_embed_per_s",
        "text_embed_per_s",
        "train_pairs_per_s",
        "train_step_ms",
        "matmul_gflops",
        "linear_gflops",
    ] {
        let value = report[key].as_f64().unwrap_or(f64::NAN);
        assert!(value.is_finite() && value > 0.0, "{key}: {report}");
    }
    assert!(report["ranking_seconds"].is_null(), "not asked: {report}");
    assert_eq!(report["trainable_params"], 2_536, "{report}");

    let out = rsitrd()
        .args(["bench", "--only", "image,speed", "--model"])
        .arg(fixture("tiny-clip"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown part `speed`"), "{stderr}");

    let out = rsitrd()
        .args([
            "bench",
            "--only",
            "image",
            "--backbone-precision",
            "fp8",
            "--model",
        ])
        .arg(fixture("tiny-clip"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("unknown backbone precision `fp8`"),
        "{stderr}"
    );
}

/// The GPU check's script runs only where a device is lent (minutes of device time), so a
/// renamed flag or output would be found there, too late: its stages run here on the CPU,
/// with the tiny model in place of both random-weight sizes.
#[test]
fn gpu_check_script_runs_every_stage_on_the_cpu() {
    let out_dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("bash")
        .arg(common::repo_root().join("tests/cuda_check.sh"))
        .current_dir(common::repo_root())
        .env("DEVICE", "cpu")
        .env("BIN", env!("CARGO_BIN_EXE_rsitrd"))
        .env("BENCH_MODEL", fixture("tiny-clip"))
        .env("B32_ITERS", "1")
        .env("L14_ITERS", "1")
        .env("RESULTS", out_dir.path().join("results"))
        .env("ARCHIVE", out_dir.path().join("check.tar.gz"))
        .env("RSITRD_SHARED_DIR", common::shared_dir())
        .output()
        .expect("run bash");
    let results = out_dir.path().join("results");
    let read = |name: &str| std::fs::read_to_string(results.join(name)).unwrap_or_default();
    assert!(
        out.status.success(),
        "stages:\n{}\n{}",
        read("stages.tsv"),
        String::from_utf8_lossy(&out.stderr)
    );
    let stages: Vec<Vec<String>> = read("stages.tsv")
        .lines()
        .map(|line| line.split('\t').map(str::to_string).collect())
        .collect();
    let names: Vec<&str> = stages.iter().map(|s| s[0].as_str()).collect();
    assert_eq!(
        names,
        [
            "embed-cpu",
            "embed-device",
            "compare",
            "bench-b32",
            "e2e",
            "embed-bf16",
            "compare-bf16",
            "bench-b32-bf16",
            "bench-l14"
        ]
    );
    assert!(stages.iter().all(|s| s[1] == "0"), "{stages:?}");
    assert!(read("compare.txt").starts_with("inputs 5 max_abs_diff 0"));
    assert!(
        read("compare-bf16.txt").starts_with("inputs 5 min_cosine 0.99"),
        "{}",
        read("compare-bf16.txt")
    );
    for (bench, precision) in [
        ("bench-b32.json", "f32"),
        ("bench-b32-bf16.json", "bf16"),
        ("bench-l14.json", "f32"),
    ] {
        let report: serde_json::Value = serde_json::from_str(&read(bench)).unwrap();
        let pairs = report["train_pairs_per_s"].as_f64().unwrap_or(f64::NAN);
        assert!(pairs > 0.0, "{bench}: {report}");
        assert_eq!(report["backbone_precision"], precision, "{bench}: {report}");
    }
    let e2e: serde_json::Value = serde_json::from_str(&read("e2e.json")).unwrap();
    assert_eq!(e2e["device"], "cpu", "{e2e}");
    assert!(e2e["train_promote_s"].as_f64().is_some(), "{e2e}");
    // What a device session brings back: one archive of every result.
    let listed = std::process::Command::new("tar")
        .arg("tzf")
        .arg(out_dir.path().join("check.tar.gz"))
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout);
    for name in ["stages.tsv", "bench-b32.json", "e2e.json", "e2e.log"] {
        assert!(listed.contains(&format!("./{name}")), "{name} in {listed}");
    }
}
