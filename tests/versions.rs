//! The version owner in-process, on the tiny CLIP, real qdrant-edge and a real store:
//! promotions and rollbacks issued concurrently always leave ledger, index pointer and
//! served model in agreement; a promotion under sustained ingest ends; the gate refuses a
//! candidate finitely worse than the best version though within tolerance of the live one;
//! an old `state.json` is migrated.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use burn::backend::{Autodiff, Flex};
use burn::module::Param;
use burn::prelude::*;
use rand::{Rng, SeedableRng};
use rsitrd::config::Config;
use rsitrd::index::VectorIndex;
use rsitrd::model::{AdapterMeta, Embedder};
use rsitrd::serve::{Backbone, Live};
use rsitrd::store::ledger::{LedgerChange, TrainingProgress, VersionRecord};
use rsitrd::store::{NewSample, SampleSplit, SplitPolicy, Store, StoreOp, now_ms};
use rsitrd::train::continual;
use rsitrd::versions::{Handle, Owner, VersionError};
use tokio_util::sync::CancellationToken;

type B = Flex;

struct Rig {
    config: Config,
    store: Arc<Store>,
    index: Arc<dyn VectorIndex>,
    backbone: Arc<Backbone<B>>,
    live: Arc<Live<B>>,
    handle: Handle<B>,
    cancel: CancellationToken,
    owner: Option<std::thread::JoinHandle<()>>,
    /// Last: fields drop in order, and the index flushes its shards when dropped.
    _temp: tempfile::TempDir,
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.cancel.cancel();
        if let Some(owner) = self.owner.take() {
            let _ = owner.join();
        }
    }
}

fn mini_ops() -> Vec<StoreOp> {
    common::rs_mini()
        .into_iter()
        .map(|sample| {
            let bytes = std::fs::read(&sample.path).unwrap();
            let image = image::load_from_memory(&bytes).unwrap();
            StoreOp::Sample(NewSample::new(
                bytes,
                sample.captions.clone(),
                serde_json::Map::new(),
                "import".into(),
                sample.filename.clone(),
                "jpeg".into(),
                image.width(),
                image.height(),
            ))
        })
        .collect()
}

fn synthetic(seed: u32) -> StoreOp {
    StoreOp::Sample(NewSample::new(
        common::ingest::synthetic_png(seed, 24),
        vec![format!("synthetic tile {seed}")],
        serde_json::Map::new(),
        "import".into(),
        format!("tile{seed}"),
        "png".into(),
        24,
        24,
    ))
}

fn rig(env: &[(&str, &str)]) -> Rig {
    let temp = tempfile::tempdir().unwrap();
    let mut vars: Vec<(String, String)> = vec![(
        "RSITRD__STORE__DIR".into(),
        temp.path().display().to_string(),
    )];
    vars.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let config = Config::load(None, vars).unwrap();
    let store = Arc::new(
        Store::open(
            &config.store.store_dir(),
            SplitPolicy {
                val_fraction: config.store.val_fraction,
                seed: config.store.split_seed,
            },
        )
        .unwrap(),
    );
    store.commit_batch(&mini_ops()).unwrap();
    let index = rsitrd::index::open(&config.index, &config.store.dir).unwrap();
    let device = Default::default();
    let backbone = Arc::new(
        Backbone::<B>::load(
            &common::fixture("tiny-clip"),
            None,
            42,
            8,
            Default::default(),
            &device,
        )
        .unwrap(),
    );
    std::fs::create_dir_all(config.adapters_dir()).unwrap();
    let cancel = CancellationToken::new();
    let (owner, handle, commands) = Owner::start(
        &config,
        store.clone(),
        index.clone(),
        backbone.clone(),
        cancel.clone(),
    )
    .unwrap();
    let live = owner.live();
    let thread = std::thread::spawn(move || owner.run(commands));
    Rig {
        _temp: temp,
        config,
        store,
        index,
        backbone,
        live,
        handle,
        cancel,
        owner: Some(thread),
    }
}

impl Rig {
    fn ledger(&self) -> rsitrd::store::ledger::DaemonLedger {
        self.store.daemon_ledger().unwrap().unwrap()
    }

    /// Waits until the index has caught up and no promotion runs.
    fn settle(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let ledger = self.ledger();
            let last = self.store.stats().unwrap().last_seq;
            if ledger.promotion.is_none() && ledger.live.embed_cursor == last {
                return;
            }
            assert!(Instant::now() < deadline, "not settled: {ledger:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Ledger, index pointer and served model name one version, with the recorded adapter.
    fn assert_agree(&self) {
        // Between the owner's turns (a switch is three steps: ledger, model, index pointer).
        self.handle.ping_blocking().unwrap();
        let ledger = self.ledger();
        let served = self.live.load_full();
        assert_eq!(served.version, ledger.live.version, "served vs ledger");
        assert_eq!(
            self.index.live().unwrap(),
            Some(ledger.live.version),
            "index vs ledger"
        );
        let record = self.store.version(served.version).unwrap().unwrap();
        assert_eq!(served.adapter_id, record.adapter_id(), "served adapter");
    }

    /// A candidate with a random (nonzero) adapter, saved content-addressed, handed to the
    /// owner as a promoted run would be.
    fn promote(&self, seed: u64) -> Result<u64, VersionError> {
        let ledger = self.ledger();
        let version = ledger.training.next_version;
        let embedder = random_adapter(&self.backbone, seed, version, ledger.live.version);
        let meta = embedder.adapter_meta.clone().unwrap();
        let file =
            continual::save_candidate(&embedder, &meta, &self.config.adapters_dir()).unwrap();
        let changes = vec![
            LedgerChange::Version(
                version,
                VersionRecord {
                    adapter: Some(file),
                    parent: Some(ledger.live.version),
                    metrics: Default::default(),
                    created_ms: now_ms(),
                    indexed_cursor: 0,
                    decision: "promoted: test".into(),
                },
            ),
            LedgerChange::Training(TrainingProgress {
                next_version: version + 1,
                ..ledger.training.clone()
            }),
        ];
        self.handle
            .submit_candidate(version, ledger.live.version, changes, Some(embedder))
            .map(|()| version)
    }
}

fn random_adapter(backbone: &Backbone<B>, seed: u64, version: u64, parent: u64) -> Embedder<B> {
    let mut embedder = backbone.untrained();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let weight = embedder.model.adapter.visual_up.weight.val();
    let shape = weight.shape();
    let values: Vec<f32> = (0..shape.num_elements())
        .map(|_| rng.random_range(-0.2..0.2))
        .collect();
    embedder.model.adapter.visual_up.weight = Param::from_tensor(Tensor::from_data(
        burn::tensor::TensorData::new(values, shape),
        &Default::default(),
    ));
    embedder.adapter_meta = Some(AdapterMeta {
        adapter: embedder.adapter_config.clone(),
        base_model: embedder.base.fingerprint.clone(),
        base_architecture: embedder.base.architecture.clone(),
        version,
        parent: Some(parent),
        created_at: "2026-12-03T00:00:00Z".into(),
        metrics: Default::default(),
    });
    embedder
}

/// Searches the live version the way the API does (one snapshot per query) until stopped;
/// returns the answers and the versions seen. Every hit must carry the snapshot's version.
fn searcher(
    live: Arc<Live<B>>,
    index: Arc<dyn VectorIndex>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(usize, std::collections::BTreeSet<u64>)> {
    std::thread::spawn(move || {
        let (mut answers, mut versions) = (0, std::collections::BTreeSet::new());
        while !stop.load(Ordering::SeqCst) {
            let model = live.load_full();
            let query = model
                .embedder
                .embed_texts(&["a bridge over a river"])
                .remove(0);
            match index.search(
                model.version,
                rsitrd::index::IMAGE_VECTOR,
                query,
                5,
                &Vec::new(),
            ) {
                Ok(hits) => {
                    assert!(!hits.is_empty(), "an empty answer from v{}", model.version);
                    for hit in hits {
                        assert_eq!(
                            hit.payload["adapter_version"],
                            serde_json::json!(model.version),
                            "one version per answer"
                        );
                    }
                    answers += 1;
                    versions.insert(model.version);
                }
                // A snapshot two switches old may name a version already dropped.
                Err(rsitrd::index::IndexError::MissingVersion(_)) => {}
                Err(error) => panic!("search failed: {error}"),
            }
        }
        (answers, versions)
    })
}

/// The index settings of a Qdrant-server run: the server named by `RSITRD_TEST_QDRANT_URL`,
/// a collection of the test's own.
fn server() -> Vec<(&'static str, String)> {
    let url = std::env::var("RSITRD_TEST_QDRANT_URL")
        .expect("RSITRD_TEST_QDRANT_URL names a Qdrant server (gRPC, e.g. http://127.0.0.1:6334)");
    vec![
        ("RSITRD__INDEX__BACKEND", "remote".into()),
        ("RSITRD__INDEX__URL", url),
        (
            "RSITRD__INDEX__COLLECTION",
            common::ingest::unique("versions").replace(['.', '-'], "_"),
        ),
    ]
}

fn with(base: &[(&'static str, &'static str)], extra: &[(&'static str, String)]) -> Rig {
    let mut env: Vec<(&str, &str)> = base.to_vec();
    env.extend(extra.iter().map(|(k, v)| (*k, v.as_str())));
    rig(&env)
}

impl Rig {
    /// Drops the versions a server run made (a shared server keeps no test's leftovers).
    fn drop_all(&mut self) {
        self.cancel.cancel();
        if let Some(owner) = self.owner.take() {
            owner.join().unwrap();
        }
        for version in self.index.versions().unwrap() {
            self.index.drop_version(version).unwrap();
        }
    }
}

#[test]
fn concurrent_promotions_and_rollbacks_keep_ledger_index_and_serving_in_agreement() {
    concurrent_promotions_and_rollbacks(&[]);
}

#[test]
#[ignore = "needs a Qdrant server: set RSITRD_TEST_QDRANT_URL and run with --include-ignored"]
fn server_concurrent_promotions_and_rollbacks_keep_ledger_alias_and_serving_in_agreement() {
    concurrent_promotions_and_rollbacks(&server());
}

fn concurrent_promotions_and_rollbacks(backend: &[(&'static str, String)]) {
    let mut rig = with(
        &[
            ("RSITRD__INDEX__EMBED_BATCH", "8"),
            ("RSITRD__INDEX__KEEP_VERSIONS", "3"),
        ],
        backend,
    );
    rig.settle(Duration::from_secs(60));
    rig.assert_agree();
    let stop = Arc::new(AtomicBool::new(false));
    let search = searcher(rig.live.clone(), rig.index.clone(), stop.clone());
    let (mut promoted, mut rolled_back, mut refused, mut retried) = (0, 0, 0, 0);
    for round in 0..200u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(round);
        let (promote_delay, rollback_delay) = (rng.random_range(0..5), rng.random_range(0..60));
        let to = rng.random_bool(0.5).then(|| {
            let kept = rig.ledger().live.kept_versions(3);
            kept[rng.random_range(0..kept.len())]
        });
        let (a, b) = std::thread::scope(|scope| {
            let a = scope.spawn(|| {
                std::thread::sleep(Duration::from_millis(promote_delay));
                rig.promote(round)
            });
            let b = scope.spawn(|| {
                std::thread::sleep(Duration::from_millis(rollback_delay));
                rig.handle.rollback_blocking(to)
            });
            (a.join().unwrap(), b.join().unwrap())
        });
        match a {
            Ok(_) => promoted += 1,
            Err(VersionError::Conflict(_)) => refused += 1,
            Err(error) => panic!("round {round}: promotion failed: {error}"),
        }
        let mut retry = false;
        match b {
            Ok(_) => rolled_back += 1,
            Err(VersionError::Conflict(reason)) => {
                refused += 1;
                retry = reason.contains("promotion is in progress");
            }
            Err(error) => panic!("round {round}: rollback failed: {error}"),
        }
        rig.settle(Duration::from_secs(60));
        rig.assert_agree();
        if retry {
            // Refused while a promotion ran; once it has finished, a rollback goes through
            // (how many rounds overlap depends on the machine's load, this does not).
            rig.handle
                .rollback_blocking(None)
                .unwrap_or_else(|e| panic!("round {round}: rollback after the promotion: {e}"));
            retried += 1;
            rig.settle(Duration::from_secs(60));
            rig.assert_agree();
        }
        // Kept versions only, and the live one among them.
        let kept = rig.ledger().live.kept_versions(3);
        for version in rig.index.versions().unwrap() {
            assert!(
                kept.contains(&version),
                "round {round}: v{version} not kept: {kept:?}, {:?}",
                rig.ledger().live
            );
        }
    }
    stop.store(true, Ordering::SeqCst);
    let (answers, versions) = search.join().unwrap();
    assert!(promoted >= 25, "{promoted} promotions");
    assert!(rolled_back > 0, "{rolled_back} rollbacks beside promotions");
    assert!(refused > 0, "some rollbacks met a promotion in progress");
    assert!(
        retried > 0,
        "a refused rollback went through once the promotion ended"
    );
    assert!(
        answers > 100 && versions.len() > 10,
        "{answers} answers over {versions:?}"
    );
    rig.drop_all();
}

#[test]
fn a_promotion_under_sustained_ingest_ends_and_holds_every_sample() {
    promotion_under_sustained_ingest(&[]);
}

#[test]
#[ignore = "needs a Qdrant server: set RSITRD_TEST_QDRANT_URL and run with --include-ignored"]
fn server_a_promotion_under_sustained_ingest_ends_and_holds_every_sample() {
    promotion_under_sustained_ingest(&server());
}

fn promotion_under_sustained_ingest(backend: &[(&'static str, String)]) {
    let mut rig = with(&[("RSITRD__INDEX__EMBED_BATCH", "4")], backend);
    rig.settle(Duration::from_secs(60));
    // Ingest as fast as the store commits, in the background.
    let stop = Arc::new(AtomicBool::new(false));
    let ingest = {
        let (store, stop) = (rig.store.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut seed = 10_000u32;
            while !stop.load(Ordering::SeqCst) {
                let ops: Vec<StoreOp> = (0..8).map(|i| synthetic(seed + i)).collect();
                seed += 8;
                store.commit_batch(&ops).unwrap();
            }
            seed - 10_000
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let backlog = |rig: &Rig| {
        rig.store
            .stats()
            .unwrap()
            .last_seq
            .saturating_sub(rig.ledger().live.embed_cursor)
    };
    let backlog_before = backlog(&rig);
    let started = Instant::now();
    let version = rig.promote(1).unwrap();
    let mut peak_backlog = 0;
    while rig.live.load().version != version {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the promotion never ended under ingest: {:?}",
            rig.ledger()
        );
        peak_backlog = peak_backlog.max(backlog(&rig));
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = started.elapsed();
    // Arrivals outran the embedding throughout: the backlog grew while the promotion ran.
    assert!(
        peak_backlog > backlog_before + 8,
        "ingest must outrun embedding: backlog {backlog_before} → {peak_backlog}"
    );
    stop.store(true, Ordering::SeqCst);
    let ingested = ingest.join().unwrap();
    rig.settle(Duration::from_secs(600));
    rig.assert_agree();
    let stats = rig.store.stats().unwrap();
    assert_eq!(stats.samples, 26 + ingested as u64);
    assert_eq!(
        rig.index.count(version).unwrap() as u64,
        stats.samples + stats.captions,
        "every sample (and caption) ingested meanwhile is in the new version"
    );
    eprintln!("promotion under ingest: {took:?}, {ingested} samples ingested meanwhile");
    rig.drop_all();
}

#[test]
fn the_gate_refuses_a_candidate_worse_than_the_best_version_though_within_tolerance_of_live() {
    let rig = rig(&[
        ("RSITRD__STORE__VAL_FRACTION", "0.5"),
        ("RSITRD__GATE__MR_TOLERANCE", "20"),
        ("RSITRD__TRAINING__STEPS", "2"),
        ("RSITRD__TRAINING__LR", "1e-9"),
        ("RSITRD__TRAINING__MIN_NEW_SAMPLES", "1"),
    ]);
    rig.settle(Duration::from_secs(60));
    let val = rig.store.split_len(SampleSplit::Val).unwrap();
    assert!(val >= 10, "{val} val samples: the slice needs 200/20 = 10");
    // The best version: an adapter trained on the validation samples themselves (it knows
    // them), recorded as promoted earlier; the live one is the untrained adapter (as after a
    // rollback).
    let val_records = rig.store.split_range(SampleSplit::Val, 0, val).unwrap();
    let training = rsitrd::config::TrainingSection {
        steps: 150,
        batch_size: 8,
        lr: 1e-2,
        ..rsitrd::config::TrainingSection::default()
    };
    let device = Default::default();
    let best = continual::train_candidate::<Autodiff<B>>(
        &rig.backbone.untrained(),
        &val_records,
        &rig.store,
        &training,
        3,
        &rig.config.image_limits(),
        &device,
        &CancellationToken::new(),
    )
    .unwrap();
    assert!(best.finite);
    let mut best_embedder = best.embedder;
    let ledger = rig.ledger();
    let meta = AdapterMeta {
        adapter: best_embedder.adapter_config.clone(),
        base_model: best_embedder.base.fingerprint.clone(),
        base_architecture: best_embedder.base.architecture.clone(),
        version: 1,
        parent: Some(0),
        created_at: "2026-12-03T00:00:00Z".into(),
        metrics: Default::default(),
    };
    best_embedder.adapter_meta = Some(meta.clone());
    let file =
        continual::save_candidate(&best_embedder, &meta, &rig.config.adapters_dir()).unwrap();
    rig.store
        .apply(&[
            LedgerChange::Version(
                1,
                VersionRecord {
                    adapter: Some(file.clone()),
                    parent: Some(0),
                    metrics: Default::default(),
                    created_ms: now_ms(),
                    indexed_cursor: 0,
                    decision: "promoted: earlier".into(),
                },
            ),
            LedgerChange::Training(TrainingProgress {
                next_version: 2,
                best: Some(1),
                ..ledger.training.clone()
            }),
        ])
        .unwrap();
    let trainer = rsitrd::train::trigger::Trainer {
        config: rig.config.clone(),
        store: rig.store.clone(),
        backbone: rig.backbone.clone(),
        live: rig.live.clone(),
        versions: rig.handle.clone(),
        training: Arc::new(AtomicBool::new(false)),
        adapters_dir: rig.config.adapters_dir(),
        cancel: CancellationToken::new(),
    };
    trainer.run_once(&rig.ledger()).unwrap();
    let run = &rig.store.recent_runs(1).unwrap()[0];
    let (candidate, live, best) = (
        run["candidate_metrics"]["mr"].as_f64().unwrap(),
        run["live_metrics"]["mr"].as_f64().unwrap(),
        run["best_metrics"]["mr"].as_f64().unwrap(),
    );
    assert!(candidate.is_finite() && run["last_loss"].as_f64().unwrap().is_finite());
    assert!(candidate >= live - 20.0, "within tolerance of live: {run}");
    assert!(best > candidate + 20.0, "the best is far better: {run}");
    assert_eq!(run["promoted"], false, "{run}");
    let decision = run["decision"].as_str().unwrap();
    assert!(
        decision.starts_with("rejected: mR regressed") && decision.contains("below best v1"),
        "{decision}"
    );
    assert_eq!(run["best_version"], 1);
    assert_eq!(rig.live.load().version, 0, "the live version is unchanged");
    // Every decision keeps the slice's identity, and the live and best metrics are cached
    // for that slice (the next run evaluates only its candidate).
    let slice = rig.ledger().slice.expect("the slice is in the ledger");
    assert_eq!(run["slice"]["id"], slice.id.as_str());
    assert_eq!(run["slice"]["samples"], slice.samples.len());
    assert!(
        rig.store
            .cached_eval("untrained", &slice.id)
            .unwrap()
            .is_some()
    );
    assert!(
        rig.store
            .cached_eval(&file.blake3, &slice.id)
            .unwrap()
            .is_some()
    );

    // The best version's adapter file lost: the next run compares with the live version
    // only, instead of failing every run from now on.
    std::fs::remove_file(&file.path).unwrap();
    rig.store
        .commit_batch(&(0..12).map(|i| synthetic(70_000 + i)).collect::<Vec<_>>())
        .unwrap();
    trainer.run_once(&rig.ledger()).unwrap();
    let run = &rig.store.recent_runs(1).unwrap()[0];
    assert_eq!(run["version"], 3, "{run}");
    assert_eq!(run["best_version"], 0, "{run}");
    assert_eq!(run["promoted"], true, "{run}");
}

#[test]
fn a_state_file_of_an_earlier_release_is_migrated_into_the_ledger() {
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path();
    let config = Config::load(
        None,
        [("RSITRD__STORE__DIR".to_string(), data.display().to_string())],
    )
    .unwrap();
    let store = Store::open(
        &config.store.store_dir(),
        SplitPolicy {
            val_fraction: config.store.val_fraction,
            seed: config.store.split_seed,
        },
    )
    .unwrap();
    store.commit_batch(&mini_ops()).unwrap();
    let device = Default::default();
    let backbone = Backbone::<B>::load(
        &common::fixture("tiny-clip"),
        None,
        42,
        8,
        Default::default(),
        &device,
    )
    .unwrap();
    let adapter = random_adapter(&backbone, 5, 1, 0);
    let old_path = config.adapters_dir().join("v1.safetensors");
    rsitrd::model::weights::save_adapter(
        &adapter.model,
        adapter.adapter_meta.as_ref().unwrap(),
        &old_path,
    )
    .unwrap();
    let last_seq = store.stats().unwrap().last_seq;
    let state = serde_json::json!({
        "live": 1, "next_version": 2, "history": [0, 1],
        "embed_cursor": last_seq, "train_cursor": 10, "last_train_ms": 5,
        "reindex": null, "train_requested": true,
        "versions": {
            "0": {"adapter": null, "parent": null, "metrics": {}, "created_ms": 1,
                  "indexed_cursor": 3, "decision": "initial"},
            "1": {"adapter": old_path, "parent": 0, "metrics": {"mr": 12.5}, "created_ms": 2,
                  "indexed_cursor": 0, "decision": "promoted"}
        }
    });
    std::fs::write(data.join("state.json"), state.to_string()).unwrap();
    let ledger = rsitrd::versions::load_or_init(&store, &config).unwrap();
    assert_eq!(ledger.live.version, 1);
    assert_eq!(ledger.live.history, vec![0, 1]);
    assert_eq!(ledger.live.embed_cursor, last_seq);
    assert!(ledger.training.requested);
    assert_eq!(ledger.training.next_version, 2);
    assert_eq!(
        ledger.training.trained_upto,
        store.train_ordinal_after(10).unwrap()
    );
    assert!(!data.join("state.json").exists());
    assert!(data.join("state.json.migrated").exists());
    let record = store.version(1).unwrap().unwrap();
    let bytes = std::fs::read(&old_path).unwrap();
    assert_eq!(record.adapter_id(), rsitrd::serve::adapter_id(&bytes));
    assert_eq!(record.metrics["mr"], 12.5);
    // Once migrated, the ledger is the truth: a second read does not look at files again.
    assert_eq!(
        rsitrd::versions::load_or_init(&store, &config).unwrap(),
        ledger
    );
    // The recorded adapter serves; the same name with other bytes is refused as stale.
    assert!(backbone.with_adapter(record.adapter.as_ref()).is_ok());
    let other = random_adapter(&backbone, 6, 1, 0);
    rsitrd::model::weights::save_adapter(
        &other.model,
        other.adapter_meta.as_ref().unwrap(),
        &old_path,
    )
    .unwrap();
    match backbone.with_adapter(record.adapter.as_ref()) {
        Err(rsitrd::serve::ServeError::Stale { .. }) => {}
        Err(other) => panic!("expected a stale adapter, got {other}"),
        Ok(_) => panic!("a stale adapter must never serve"),
    }
}
