//! `rsitrd train` and `rsitrd eval` end to end on the real rs-mini samples with a tiny CLIP:
//! training raises retrieval, an interrupted run resumes to the identical adapter, and eval
//! agrees with an independent computation from `rsitrd embed` outputs.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{fixture, json_lines, rs_mini, rs_mini_dir, rsitrd, run_ok};

/// Train flags shared by the runs that must agree.
fn train_command(out: &Path, epochs: usize) -> Command {
    let mut command = rsitrd();
    command
        .arg("train")
        .arg("--model")
        .arg(fixture("tiny-clip"))
        .arg("--dataset")
        .arg(rs_mini_dir().join("dataset.json"))
        .arg("--images")
        .arg(rs_mini_dir().join("images"))
        .arg("--out")
        .arg(out)
        .args(["--epochs", &epochs.to_string()])
        .args(["--batch-size", "8", "--lr", "5e-3", "--seed", "7"])
        .args(["--bottleneck", "128", "--shared-width", "16"])
        .env("RSITRD_LOG", "warn");
    command
}

fn eval_json(adapter: Option<&Path>, split: &str) -> serde_json::Value {
    let mut command = rsitrd();
    command
        .args(["eval", "--json", "--split", split, "--model"])
        .arg(fixture("tiny-clip"))
        .arg("--dataset")
        .arg(rs_mini_dir().join("dataset.json"))
        .arg("--images")
        .arg(rs_mini_dir().join("images"));
    if let Some(adapter) = adapter {
        command.arg("--adapter").arg(adapter);
    }
    let out = run_ok(&mut command);
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The adapter tensors of a checkpoint (metadata such as the creation time excluded).
fn tensors(path: &Path) -> Vec<(String, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut list: Vec<(String, Vec<u8>)> = file
        .tensors()
        .into_iter()
        .map(|(name, view)| (name, view.data().to_vec()))
        .collect();
    list.sort();
    list
}

fn logged_steps(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["kind"] == "step")
        .filter_map(|v| v["step"].as_u64())
        .max()
        .unwrap_or(0) as usize
}

#[test]
fn training_raises_mr_and_an_interrupted_run_resumes_identically() {
    const EPOCHS: usize = 15;
    let temp = tempfile::tempdir().unwrap();
    let straight = temp.path().join("straight");
    let out = run_ok(&mut train_command(&straight, EPOCHS));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["status"], "finished");
    for file in [
        "best.safetensors",
        "last.safetensors",
        "train-log.jsonl",
        "train-config.json",
        "training.svg",
    ] {
        assert!(straight.join(file).is_file(), "{file} missing");
    }
    let log = std::fs::read_to_string(straight.join("train-log.jsonl")).unwrap();
    let epochs: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "epoch")
        .collect();
    assert_eq!(epochs.len(), EPOCHS);
    assert!(
        epochs
            .iter()
            .all(|e| e["val"]["mr"].is_number() && e["train_loss"].is_number())
    );
    let svg = std::fs::read_to_string(straight.join("training.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("polyline"));

    // Train-split retrieval rises well above the untrained adapter's.
    let before = eval_json(None, "train")["mr"].as_f64().unwrap();
    let after = eval_json(Some(&straight.join("last.safetensors")), "train")["mr"]
        .as_f64()
        .unwrap();
    println!("train mR {before:.2} -> {after:.2}");
    assert!(after > before + 15.0, "train mR {before} -> {after}");

    // Same run, interrupted with SIGTERM part-way, then resumed.
    let resumed = temp.path().join("resumed");
    let child = train_command(&resumed, EPOCHS)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while logged_steps(&resumed.join("train-log.jsonl")) < 30 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "training did not progress"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let interrupted = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&interrupted.stdout);
    assert_eq!(
        interrupted.status.code(),
        Some(130),
        "{stdout} {}",
        String::from_utf8_lossy(&interrupted.stderr)
    );
    assert!(stdout.contains("\"interrupted\""), "{stdout}");
    run_ok(train_command(&resumed, EPOCHS).arg("--resume"));
    assert_eq!(
        tensors(&straight.join("last.safetensors")),
        tensors(&resumed.join("last.safetensors")),
        "resumed run ended with a different adapter"
    );
    assert_eq!(
        tensors(&straight.join("best.safetensors")),
        tensors(&resumed.join("best.safetensors"))
    );
}

/// Recall@K computed independently: sort every row, ties resolved against the query.
fn independent_metrics(images: &[Vec<f64>], captions: &[Vec<f64>], owner: &[usize]) -> [f64; 7] {
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let mut i2t = [0usize; 3];
    for (image, embedding) in images.iter().enumerate() {
        let mut scored: Vec<(f64, bool)> = captions
            .iter()
            .enumerate()
            .map(|(c, caption)| (dot(embedding, caption), owner[c] == image))
            .collect();
        // Descending by score; among equal scores, wrong items first (pessimistic).
        scored.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap().then(a.1.cmp(&b.1)));
        let first_hit = scored.iter().position(|(_, own)| *own).unwrap();
        for (slot, k) in [1, 5, 10].iter().enumerate() {
            if first_hit < *k {
                i2t[slot] += 1;
            }
        }
    }
    let mut t2i = [0usize; 3];
    for (c, caption) in captions.iter().enumerate() {
        let mut scored: Vec<(f64, bool)> = images
            .iter()
            .enumerate()
            .map(|(i, image)| (dot(image, caption), i == owner[c]))
            .collect();
        scored.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap().then(a.1.cmp(&b.1)));
        let position = scored.iter().position(|(_, own)| *own).unwrap();
        for (slot, k) in [1, 5, 10].iter().enumerate() {
            if position < *k {
                t2i[slot] += 1;
            }
        }
    }
    let pct = |hits: usize, n: usize| 100.0 * hits as f64 / n as f64;
    let r = [
        pct(i2t[0], images.len()),
        pct(i2t[1], images.len()),
        pct(i2t[2], images.len()),
        pct(t2i[0], captions.len()),
        pct(t2i[1], captions.len()),
        pct(t2i[2], captions.len()),
    ];
    [
        r[0],
        r[1],
        r[2],
        r[3],
        r[4],
        r[5],
        r.iter().sum::<f64>() / 6.0,
    ]
}

#[test]
fn eval_agrees_with_an_independent_computation_from_embed() {
    let test: Vec<_> = rs_mini()
        .into_iter()
        .filter(|s| s.split == "test")
        .collect();
    let mut command = rsitrd();
    command
        .args(["embed", "--json", "--model"])
        .arg(fixture("tiny-clip"));
    for sample in &test {
        command.arg("--image").arg(&sample.path);
    }
    let mut owner = Vec::new();
    for (index, sample) in test.iter().enumerate() {
        for caption in &sample.captions {
            command.args(["--text", caption]);
            owner.push(index);
        }
    }
    let lines = json_lines(&mut command);
    let vectors = |kind: &str| -> Vec<Vec<f64>> {
        lines
            .iter()
            .filter(|l| l["kind"] == kind)
            .map(|l| serde_json::from_value(l["embedding"].clone()).unwrap())
            .collect()
    };
    // The documented rule: identical caption texts are one vector (they tie exactly);
    // `rsitrd embed` batches them apart, so its copies may differ in the last bits.
    let texts: Vec<&String> = test.iter().flat_map(|s| &s.captions).collect();
    let mut captions = vectors("text");
    for i in 0..captions.len() {
        if let Some(first) = texts.iter().position(|t| *t == texts[i]) {
            captions[i] = captions[first].clone();
        }
    }
    let expected = independent_metrics(&vectors("image"), &captions, &owner);
    let actual = eval_json(None, "test");
    assert_eq!(actual["images"], 8);
    assert_eq!(actual["captions"], 40);
    let keys = [
        "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mr",
    ];
    for (key, value) in keys.iter().zip(expected) {
        let got = actual[key].as_f64().unwrap();
        assert!(
            (got - value).abs() < 1e-9,
            "{key}: eval {got} vs independent {value}"
        );
    }
}

#[test]
fn broken_dataset_is_reported_before_any_work() {
    let temp = tempfile::tempdir().unwrap();
    let dataset = temp.path().join("broken.json");
    std::fs::write(
        &dataset,
        r#"{"images": [{"filename": "nope.jpg", "split": "weird", "sentences": []},
                        {"filename": "rsicd_00001.jpg", "split": "test", "sentences": [{"raw": ""}]}]}"#,
    )
    .unwrap();
    let out = rsitrd()
        .args(["eval", "--model"])
        .arg(fixture("tiny-clip"))
        .arg("--dataset")
        .arg(&dataset)
        .arg("--images")
        .arg(rs_mini_dir().join("images"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("2 problem(s)"), "{stderr}");
    assert!(stderr.contains("unknown split `weird`"), "{stderr}");
    assert!(stderr.contains("caption 0 is empty"), "{stderr}");
}

#[test]
fn identical_captions_of_different_images_tie_the_same_way_whatever_the_batching() {
    use burn::backend::Flex;
    use rsitrd::data::Dataset;
    use rsitrd::eval::{embed_split, metrics_of};
    use rsitrd::model::Embedder;

    // UCM and Sydney repeat captions across images ("There is a piece of farmland ."): give
    // three rs-mini images the same first caption.
    let shared = "There is a piece of farmland .";
    let mut dataset = Dataset::load(
        &rs_mini_dir().join("dataset.json"),
        &rs_mini_dir().join("images"),
    )
    .unwrap();
    for image in dataset.images.iter_mut().take(3) {
        image.captions[0] = shared.to_string();
    }
    let images: Vec<_> = dataset.images.iter().collect();
    let mut embedder = Embedder::<Flex>::load(
        &fixture("tiny-clip"),
        None,
        Default::default(),
        &Default::default(),
    )
    .unwrap();
    let mut results = Vec::new();
    for batch in [1, 7, 64] {
        embedder.batch_size = batch;
        let split = embed_split(&embedder, &dataset, &images, 1 << 26).unwrap();
        // The copies are one vector, so they tie exactly.
        let copies: Vec<&Vec<f32>> = images
            .iter()
            .flat_map(|i| &i.captions)
            .zip(&split.captions)
            .filter(|(text, _)| text.as_str() == shared)
            .map(|(_, vector)| vector)
            .collect();
        assert!(copies.len() >= 3, "rs-mini has this caption already too");
        assert!(copies.iter().all(|v| *v == copies[0]));
        results.push(metrics_of(&split));
    }
    for other in &results[1..] {
        assert_eq!(
            other.to_map(),
            results[0].to_map(),
            "metrics depend on the batching"
        );
    }
}

#[test]
fn the_paper_protocol_trains_on_every_training_image_and_evaluates_on_test() {
    // rs-mini has 18 train and 8 test images and no val split, like RSITMD and UCM.
    let epoch_val_images = |protocol: &str| {
        let out = tempfile::tempdir().unwrap();
        run_ok(
            train_command(out.path(), 1)
                .args(["--protocol", protocol])
                .stdout(Stdio::null()),
        );
        let config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.path().join("train-config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(config["protocol"], protocol);
        let log = std::fs::read_to_string(out.path().join("train-log.jsonl")).unwrap();
        let epoch = log
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["kind"] == "epoch")
            .expect("an epoch line");
        epoch["val"]["images"].as_u64().unwrap()
    };
    assert_eq!(
        epoch_val_images("holdout"),
        4,
        "20 % of the 18 training images"
    );
    assert_eq!(epoch_val_images("paper"), 8, "the 8 test images");
}
