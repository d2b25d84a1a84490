//! `rsitrd stream-eval` end to end: rs-mini's three sources as tasks, streamed through the
//! daemon's continual path with the tiny CLIP. A seeded run repeats bit for bit; naive
//! fine-tuning at a high learning rate forgets, and replay forgets less; the bounds run.

mod common;

use burn::backend::Flex;
use rsitrd::config::Config;
use rsitrd::data::Dataset;
use rsitrd::streameval::{self, EvalSplit, Plan, TaskSplit, Variant};

use common::{fixture, rs_mini_dir};

const STEPS: &str = "150";
const LR: &str = "0.01";

/// The starting adapter: untrained (a no-op: its up projections are zero), but 128 wide.
/// A random 32-wide backbone needs a wider bottleneck than the default ratio to fit rs-mini
/// in a few hundred steps (`tests/training.rs` measured it).
fn wide_adapter(dir: &std::path::Path) -> std::path::PathBuf {
    let adapter = rsitrd::model::AdapterConfig {
        bottleneck: 128,
        shared_width: 16,
        dropout: 0.5,
    };
    let path = dir.join("wide-adapter.safetensors");
    streameval::write_start_adapter::<Flex>(
        &fixture("tiny-clip"),
        &adapter,
        &path,
        &Default::default(),
    )
    .unwrap();
    path
}

fn variant(adapter: &std::path::Path, name: &str, overrides: &[(&str, &str)]) -> Variant {
    // Runs that move the adapter a lot (a deliberately high learning rate, 50 times the
    // default); every sample trains (the gate is off in these streams: no validation split).
    let mut settings: Vec<(String, String)> = [
        ("training.steps", STEPS),
        ("training.batch_size", "8"),
        ("training.lr", LR),
        ("store.val_fraction", "0"),
        ("gate.mr_tolerance", "100"),
        ("index.embed_batch", "16"),
        ("model.adapter", adapter.to_str().unwrap()),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    settings.extend(
        overrides
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let config = Config::load(None, streameval::as_env(&settings)).expect("valid settings");
    Variant {
        name: name.into(),
        overrides: overrides
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        config,
    }
}

fn plan(work: &std::path::Path, variants: Vec<Variant>, joint: bool, seeds: &[u64]) -> Plan {
    let dir = rs_mini_dir();
    let dataset = Dataset::load(&dir.join("dataset.json"), &dir.join("images")).unwrap();
    let tasks = streameval::make_tasks(
        &[("rs-mini".into(), dataset)],
        &TaskSplit::Field("source".into()),
        EvalSplit::Seen,
    )
    .unwrap();
    // UCM's nine rs-mini images share their five captions (mR is stuck at the tie rule's
    // 50): it goes last, where it is trained on but has no forgetting to measure.
    let order = ["rsicd", "sydney", "ucm"]
        .iter()
        .map(|name| tasks.iter().position(|t| &t.name == name).unwrap())
        .collect();
    Plan {
        model_dir: fixture("tiny-clip"),
        tasks,
        orders: vec![order],
        seeds: seeds.to_vec(),
        variants,
        joint,
        eval_split: EvalSplit::Seen,
        work_dir: work.to_path_buf(),
    }
}

#[test]
fn rs_mini_sources_as_tasks_replay_reduces_forgetting_and_a_seed_repeats_bit_for_bit() {
    let temp = tempfile::tempdir().unwrap();
    let adapter = wide_adapter(temp.path());
    let variants = || {
        vec![
            variant(
                &adapter,
                "naive",
                &[("training.replay_ratio", "0"), ("gate.enabled", "false")],
            ),
            variant(
                &adapter,
                "replay",
                &[("training.replay_ratio", "2"), ("gate.enabled", "false")],
            ),
        ]
    };
    let device = Default::default();
    let plan_a = plan(&temp.path().join("a"), variants(), true, &[1, 2]);
    let report = streameval::run::<Flex>(&plan_a, &device, |_| {}).unwrap();
    let table = report.table();
    println!("{table}");
    for run in &report.runs {
        println!("{} {:?}", run.variant, run.r);
    }

    // The tasks are the three sources, each streamed once, in the order given.
    let names: Vec<&str> = report.tasks.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["rsicd", "ucm", "sydney"]);
    assert_eq!(report.orders, vec![vec!["rsicd", "sydney", "ucm"]]);
    for name in ["zero-shot", "naive", "replay", "joint"] {
        assert!(report.summary(name).is_some(), "{name} missing: {table}");
        assert!(table.contains(name));
    }
    let run = |name: &str| report.runs.iter().find(|r| r.variant == name).unwrap();
    // Through the daemon's path: one run per task, each promoted (gate off), each promotion
    // re-embedding the whole corpus stored so far (18 images in all: 8 + 12 + 18).
    for stream in report.runs.iter().filter(|r| r.metrics.is_some()) {
        assert_eq!(stream.r.len(), 3);
        assert_eq!(stream.compute.training_runs, 3, "{:?}", stream.decisions);
        assert_eq!(stream.compute.promotions, 3, "{:?}", stream.decisions);
        assert!(
            stream
                .decisions
                .iter()
                .all(|d| d == "promoted: gate disabled")
        );
        assert_eq!(stream.compute.images_reembedded, 38, "{:?}", stream.compute);
    }
    // Learning happens: right after a task is learned its mR is above zero-shot's (the first
    // two tasks, both seeds, on average). The mean gain depends on the CPU's float rounding
    // (this tiny run is chaotic): 4.2 (code before issue #15) and 4.6 points on a Zen 3,
    // more on the Zen 4 where the bound of 5 was set.
    let zero = &run("zero-shot").r[0];
    let gains: Vec<f64> = report
        .runs
        .iter()
        .filter(|r| r.variant == "naive")
        .flat_map(|r| {
            let learned = &r.metrics.as_ref().unwrap().just_learned;
            (0..2).map(move |j| learned[j] - zero[j])
        })
        .collect();
    let gain = gains.iter().sum::<f64>() / gains.len() as f64;
    assert!(gain > 2.0, "no learning: gains {gains:?}\n{table}");
    // Naive fine-tuning forgets measurably; replay of earlier tasks forgets less (means over
    // two seeds; measured on a Zen 4: naive 13.8 and 12.1, replay 2.9 and 3.3 points).
    let forgetting = |name: &str| report.summary(name).unwrap().mean_forgetting.mean;
    assert!(
        forgetting("naive") > 8.0,
        "naive fine-tuning did not forget:\n{table}"
    );
    assert!(
        forgetting("replay") < forgetting("naive") - 5.0,
        "replay did not reduce forgetting:\n{table}"
    );
    // The joint bound trained on the union (about the stream's total steps) and was measured.
    let joint = run("joint");
    assert_eq!(joint.r.len(), 1);
    assert!(joint.average_final.is_finite() && joint.compute.training_steps >= 300);

    // Outputs: JSON with every figure, an SVG with the matrices.
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["summaries"].as_array().unwrap().len(), 4);
    assert!(json["summaries"][1]["mean_forgetting"]["mean"].is_f64());
    let svg = report.svg();
    assert!(svg.starts_with("<svg") && svg.contains("naive") && svg.contains("polyline"));

    // Seed 1 again, in another directory: every R entry identical to the bit.
    let plan_b = plan(&temp.path().join("b"), variants(), false, &[1]);
    let again = streameval::run::<Flex>(&plan_b, &device, |_| {}).unwrap();
    for name in ["zero-shot", "naive", "replay"] {
        let bits = |r: &streameval::StreamRun| -> Vec<u64> {
            r.r.iter().flatten().map(|v| v.to_bits()).collect()
        };
        let other = again.runs.iter().find(|r| r.variant == name).unwrap();
        assert_eq!(
            bits(run(name)),
            bits(other),
            "{name} differs between two runs of a seed"
        );
    }
}

#[test]
fn task_splits_and_orders_are_checked() {
    let dir = rs_mini_dir();
    let dataset = Dataset::load(&dir.join("dataset.json"), &dir.join("images")).unwrap();
    let sets = [("rs-mini".to_string(), dataset)];
    let by_time = streameval::make_tasks(&sets, &TaskSplit::Time(2), EvalSplit::Test).unwrap();
    assert_eq!(by_time.len(), 2);
    let streamed: usize = by_time.iter().map(|t| t.stream.images.len()).sum();
    let tested: usize = by_time.iter().map(|t| t.eval().images.len()).sum();
    assert_eq!((streamed, tested), (18, 8));
    // One dataset is one task: not a stream.
    assert!(streameval::make_tasks(&sets, &TaskSplit::Dataset, EvalSplit::Test).is_err());
    assert!(
        streameval::make_tasks(&sets, &TaskSplit::Field("nope".into()), EvalSplit::Test)
            .unwrap_err()
            .to_string()
            .contains("no field `nope`")
    );
    let tasks =
        streameval::make_tasks(&sets, &TaskSplit::Field("source".into()), EvalSplit::Test).unwrap();
    assert_eq!(
        streameval::parse_order("sydney,ucm,rsicd", &tasks)
            .unwrap()
            .len(),
        3
    );
    for bad in ["sydney,ucm", "sydney,ucm,ucm", "sydney,ucm,mars"] {
        assert!(streameval::parse_order(bad, &tasks).is_err(), "{bad}");
    }
    assert!("time:0".parse::<TaskSplit>().is_err());
    assert_eq!(
        "field:source".parse::<TaskSplit>(),
        Ok(TaskSplit::Field("source".into()))
    );
    let (name, overrides) = streameval::parse_variant("ema:training.ema_decay=0.9").unwrap();
    assert_eq!(name, "ema");
    assert_eq!(
        streameval::as_env(&overrides),
        vec![("RSITRD__TRAINING__EMA_DECAY".to_string(), "0.9".to_string())]
    );
    assert!(streameval::parse_variant("bad:training=1").is_err());
}
