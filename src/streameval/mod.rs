//! `rsitrd stream-eval`: does continual training help, and how much does it forget?
//!
//! A dataset is cut into tasks (by dataset, by a metadata field, or by arrival order) and
//! streamed, task by task, through the daemon's own continual path: the samples are imported
//! into a fresh store with the ingest validator, and the daemon's trainer
//! ([`crate::train::trigger::Trainer::turn`]) trains, gates and hands candidates to the
//! version owner ([`crate::versions::Owner`]), which promotes them (re-embedding the corpus
//! into an embedded index). Only the clock is simulated: a run is due as soon as a task's
//! samples are stored, and the next task waits until the promotion has finished.
//!
//! After each task the live adapter is evaluated on every task's evaluation split: the
//! matrix `R[i][j]` ([`metrics`]). The same run also measures the bounds: zero-shot (the
//! starting adapter), joint offline training on the union of all tasks (the offline trainer,
//! about the same total steps) and naive sequential fine-tuning (no replay, no gate).

pub mod metrics;
pub mod report;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use burn::backend::Autodiff;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, IndexBackendKind};
use crate::data::{Dataset, DatasetImage, Split};
use crate::model::Embedder;
use crate::model::kernels::ModelBackend;
use crate::serve::Backbone;
use crate::store::{SampleSplit, Store};
use crate::train::offline::{self, Protocol, TrainConfig};
use crate::train::trigger::Trainer;
use crate::versions::Owner;

/// Why a stream evaluation failed.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Index(#[from] crate::index::IndexError),
    #[error(transparent)]
    Weights(#[from] crate::model::weights::WeightsError),
    #[error(transparent)]
    Versions(#[from] crate::versions::VersionError),
    #[error(transparent)]
    Training(#[from] crate::train::continual::ContinualError),
    #[error(transparent)]
    Offline(#[from] crate::train::offline::TrainError),
    #[error(transparent)]
    Serve(#[from] crate::serve::ServeError),
    #[error(transparent)]
    Image(#[from] crate::model::preprocess::ImageError),
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> StreamError + '_ {
    move |source| StreamError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// How a dataset is cut into tasks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskSplit {
    /// One task per dataset given.
    Dataset,
    /// One task per value of a scalar field of the Karpathy entries (e.g. `source`).
    Field(String),
    /// `n` tasks of consecutive images in file order (arrival order).
    Time(usize),
}

impl std::str::FromStr for TaskSplit {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text.split_once(':') {
            None if text == "dataset" => Ok(Self::Dataset),
            Some(("field", name)) if !name.is_empty() => Ok(Self::Field(name.to_string())),
            Some(("time", n)) => match n.parse::<usize>() {
                Ok(n) if (1..=MAX_TASKS).contains(&n) => Ok(Self::Time(n)),
                _ => Err(format!("time:N needs 1 <= N <= {MAX_TASKS}")),
            },
            _ => Err("expected dataset, field:NAME or time:N".into()),
        }
    }
}

/// Which images of a task its row of `R` is measured on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum EvalSplit {
    /// The task's test images (never streamed): generalisation.
    #[default]
    Test,
    /// The task's streamed (train and val) images: retention of what was seen. For datasets
    /// too small for a meaningful test split.
    Seen,
}

/// Most tasks a stream may have (the R matrix is T×T evaluations per stream).
pub const MAX_TASKS: usize = 64;

/// One task: what is streamed, what it is evaluated on.
#[derive(Debug, Clone)]
pub struct Task {
    pub name: String,
    /// Train and val images, imported when the task arrives.
    pub stream: Dataset,
    /// Its test images, never streamed (also the joint bound's per-epoch selection set,
    /// whatever the evaluation split).
    pub test: Dataset,
    pub eval_split: EvalSplit,
}

impl Task {
    /// The images its mR is measured on.
    pub fn eval(&self) -> &Dataset {
        match self.eval_split {
            EvalSplit::Test => &self.test,
            EvalSplit::Seen => &self.stream,
        }
    }
}

/// Cuts `datasets` (name, dataset) into tasks: by dataset, or within each dataset by field
/// or arrival order (tasks of several datasets then follow one another).
pub fn make_tasks(
    datasets: &[(String, Dataset)],
    by: &TaskSplit,
    eval: EvalSplit,
) -> Result<Vec<Task>, StreamError> {
    let mut groups: Vec<(String, Dataset)> = Vec::new();
    for (name, dataset) in datasets {
        let part = |images: Vec<DatasetImage>| Dataset {
            images,
            image_dir: dataset.image_dir.clone(),
        };
        let prefix = |value: &str| {
            if datasets.len() > 1 {
                format!("{name}/{value}")
            } else {
                value.to_string()
            }
        };
        match by {
            TaskSplit::Dataset => groups.push((name.clone(), dataset.clone())),
            TaskSplit::Field(field) => {
                let mut values: Vec<(String, Vec<DatasetImage>)> = Vec::new();
                for image in &dataset.images {
                    let value = image.tags.get(field).ok_or_else(|| {
                        StreamError::Invalid(format!(
                            "{name}: image {} has no field `{field}`",
                            image.filename
                        ))
                    })?;
                    match values.iter_mut().find(|(v, _)| v == value) {
                        Some((_, images)) => images.push(image.clone()),
                        None => values.push((value.clone(), vec![image.clone()])),
                    }
                }
                for (value, images) in values {
                    groups.push((prefix(&value), part(images)));
                }
            }
            TaskSplit::Time(n) => {
                let per = dataset.images.len().div_ceil(*n).max(1);
                for (index, chunk) in dataset.images.chunks(per).enumerate() {
                    groups.push((prefix(&format!("t{index}")), part(chunk.to_vec())));
                }
            }
        }
    }
    if groups.len() < 2 || groups.len() > MAX_TASKS {
        return Err(StreamError::Invalid(format!(
            "a stream needs 2 to {MAX_TASKS} tasks, this split gives {}",
            groups.len()
        )));
    }
    let mut tasks = Vec::with_capacity(groups.len());
    for (name, dataset) in groups {
        let (streamed, test): (Vec<DatasetImage>, Vec<DatasetImage>) = dataset
            .images
            .iter()
            .cloned()
            .partition(|image| image.split != Split::Test);
        if streamed.is_empty() {
            return Err(StreamError::Invalid(format!(
                "task {name} has no train or val images"
            )));
        }
        tasks.push(Task {
            name,
            stream: Dataset {
                images: streamed,
                image_dir: dataset.image_dir.clone(),
            },
            test: Dataset {
                images: test,
                image_dir: dataset.image_dir.clone(),
            },
            eval_split: eval,
        });
    }
    Ok(tasks)
}

/// A configuration to stream with, named for the report.
#[derive(Debug, Clone)]
pub struct Variant {
    pub name: String,
    /// The settings it changes, as given (`training.replay_ratio=0`).
    pub overrides: Vec<(String, String)>,
    pub config: Config,
}

/// The overrides of the naive sequential fine-tuning bound.
pub const NAIVE: &[(&str, &str)] = &[
    ("training.replay_ratio", "0"),
    ("training.ema_decay", "0"),
    ("gate.enabled", "false"),
];

/// What a stream evaluation runs.
pub struct Plan {
    pub model_dir: PathBuf,
    pub tasks: Vec<Task>,
    /// Task orders, as indices into `tasks`.
    pub orders: Vec<Vec<usize>>,
    pub seeds: Vec<u64>,
    /// The first is the reference: its starting adapter is the zero-shot bound's, its
    /// training settings the joint bound's. With `bounds`, the caller adds the naive variant.
    pub variants: Vec<Variant>,
    /// Also train the joint offline bound.
    pub joint: bool,
    pub eval_split: EvalSplit,
    /// Scratch space (a store, an index and adapters per stream); emptied as it goes.
    pub work_dir: PathBuf,
}

/// What one stream did (or one bound measured).
#[derive(Debug, Clone, Serialize)]
pub struct StreamRun {
    pub variant: String,
    pub seed: u64,
    /// Task names in stream order.
    pub order: Vec<String>,
    /// `r[i][j]`: mR on the stream's task `j` after its task `i` (stream order). Bounds
    /// without a stream (zero-shot, joint) have one row: the final one.
    pub r: Vec<Vec<f64>>,
    /// `None` for the bounds without a stream.
    pub metrics: Option<metrics::ContinualMetrics>,
    /// Mean of the last row.
    pub average_final: f64,
    pub compute: Compute,
    /// The gate's decision of every training run, in order.
    pub decisions: Vec<String>,
}

/// The work a stream took.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Compute {
    pub training_runs: usize,
    pub training_steps: usize,
    pub promotions: usize,
    /// Images embedded again for promoted versions (the whole corpus per promotion).
    pub images_reembedded: u64,
    pub seconds: f64,
}

/// Runs the plan: for every seed and order, the zero-shot row, each variant's stream, and
/// the joint bound. `progress` gets a line per finished stream.
pub fn run<B: ModelBackend>(
    plan: &Plan,
    device: &B::Device,
    mut progress: impl FnMut(&StreamRun),
) -> Result<report::Report, StreamError>
where
    B::Device: Send + Sync,
{
    let reference = plan
        .variants
        .first()
        .ok_or_else(|| StreamError::Invalid("no variant to run".into()))?;
    let mut runs = Vec::new();
    for &seed in &plan.seeds {
        let backbone = Arc::new(Backbone::<B>::load(
            &plan.model_dir,
            reference.config.model.adapter.as_deref(),
            seed,
            reference.config.model.embed_batch_size,
            reference.config.model.backbone_precision,
            device,
        )?);
        let max_pixels = reference.config.model.max_pixels;
        // Zero-shot depends on the seed, not the order: measured once, reordered per order.
        let started = Instant::now();
        let all: Vec<&Task> = plan.tasks.iter().collect();
        let zero_all = evaluate_all(&starting(&backbone, &reference.config)?, &all, max_pixels)?;
        let zero_seconds = started.elapsed().as_secs_f64();
        for order in &plan.orders {
            let tasks: Vec<&Task> = order.iter().map(|&i| &plan.tasks[i]).collect();
            let names: Vec<String> = tasks.iter().map(|t| t.name.clone()).collect();
            let zero: Vec<f64> = order.iter().map(|&i| zero_all[i]).collect();
            let zero_run = StreamRun {
                variant: "zero-shot".into(),
                seed,
                order: names.clone(),
                average_final: metrics::mean_finite(zero.iter().copied()),
                r: vec![zero.clone()],
                metrics: None,
                compute: Compute {
                    seconds: zero_seconds,
                    ..Compute::default()
                },
                decisions: Vec::new(),
            };
            progress(&zero_run);
            runs.push(zero_run);
            // The joint bound trains as many steps as the reference stream did.
            let mut reference_steps = None;
            for variant in &plan.variants {
                let work = plan.work_dir.join(format!("stream-{seed}"));
                let run = stream(variant, seed, &backbone, &tasks, &zero, &work)?;
                let _ = std::fs::remove_dir_all(&work);
                reference_steps.get_or_insert(run.compute.training_steps);
                progress(&run);
                runs.push(run);
            }
            if plan.joint {
                let work = plan.work_dir.join(format!("joint-{seed}"));
                let steps = reference_steps.unwrap_or_default().max(1);
                let job = JointJob {
                    plan,
                    reference,
                    seed,
                    steps,
                };
                let run = joint::<B>(&job, &backbone, &tasks, &work, device)?;
                let _ = std::fs::remove_dir_all(&work);
                progress(&run);
                runs.push(run);
            }
        }
    }
    Ok(report::Report::new(plan, runs))
}

/// Writes an untrained adapter of shape `adapter` for the backbone in `model_dir` to `path`
/// (version 0; its up projections are zero, so it adds nothing until trained), for streams
/// that start from another adapter shape than the backbone's default.
pub fn write_start_adapter<B: ModelBackend>(
    model_dir: &Path,
    adapter: &crate::model::AdapterConfig,
    path: &Path,
    device: &B::Device,
) -> Result<(), StreamError> {
    use crate::model::weights::{self, AdapterMeta};
    let mut loaded = weights::load_clip::<B>(model_dir, adapter, device)?;
    loaded.model.adapter = adapter.init_seeded(&loaded.config, 0, device);
    let meta = AdapterMeta {
        adapter: adapter.clone(),
        base_model: loaded.base.fingerprint.clone(),
        base_architecture: loaded.base.architecture.clone(),
        version: 0,
        parent: None,
        created_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        metrics: Default::default(),
    };
    Ok(weights::save_adapter(&loaded.model, &meta, path)?)
}

/// The adapter a stream starts from: `model.adapter`, else the untrained one.
fn starting<B: ModelBackend>(
    backbone: &Backbone<B>,
    config: &Config,
) -> Result<Embedder<B>, StreamError> {
    let Some(path) = &config.model.adapter else {
        return Ok(backbone.untrained());
    };
    let bytes = std::fs::read(path).map_err(io_error(path))?;
    let file = crate::store::ledger::AdapterFile {
        path: path.clone(),
        blake3: crate::serve::adapter_id(&bytes),
    };
    Ok(backbone.with_adapter(Some(&file))?)
}

/// mR of `embedder` on every task's evaluation images (NaN for a task without any).
fn evaluate_all<B: ModelBackend>(
    embedder: &Embedder<B>,
    tasks: &[&Task],
    max_pixels: u64,
) -> Result<Vec<f64>, StreamError> {
    tasks
        .iter()
        .map(|task| {
            let eval = task.eval();
            if eval.images.is_empty() {
                return Ok(f64::NAN);
            }
            let images: Vec<&DatasetImage> = eval.images.iter().collect();
            Ok(crate::eval::evaluate(embedder, eval, &images, max_pixels)?.mr)
        })
        .collect()
}

/// One stream of `tasks` through the daemon's continual path with `variant`'s settings.
fn stream<B: ModelBackend>(
    variant: &Variant,
    seed: u64,
    backbone: &Arc<Backbone<B>>,
    tasks: &[&Task],
    zero: &[f64],
    work: &Path,
) -> Result<StreamRun, StreamError>
where
    B::Device: Send + Sync,
{
    let started = Instant::now();
    let _ = std::fs::remove_dir_all(work);
    let mut config = variant.config.clone();
    config.store.dir = work.to_path_buf();
    config.model.adapter_dir = None;
    config.index.backend = IndexBackendKind::Embedded;
    config.training.enabled = true;
    config.training.seed = seed;
    // Simulated time: a run is due as soon as a task's samples are in.
    config.training.min_new_samples = 1;
    let store = Arc::new(Store::open_configured(&config.store)?);
    let index = crate::index::open(&config.index, &config.store.dir)?;
    let adapters_dir = config.adapters_dir();
    std::fs::create_dir_all(&adapters_dir).map_err(io_error(&adapters_dir))?;
    let cancel = CancellationToken::new();
    let (owner, handle, commands) = Owner::start(
        &config,
        store.clone(),
        index,
        backbone.clone(),
        cancel.clone(),
    )?;
    let live = owner.live();
    let owner_thread = std::thread::spawn(move || owner.run(commands));
    let trainer = Trainer {
        config: config.clone(),
        store: store.clone(),
        backbone: backbone.clone(),
        live: live.clone(),
        versions: handle,
        training: Arc::new(AtomicBool::new(false)),
        adapters_dir,
        cancel: cancel.clone(),
    };
    let validator = crate::ingest::Validator::from_config(&config);
    let max_pixels = config.model.max_pixels;
    let mut compute = Compute::default();
    let mut decisions = Vec::new();
    let mut rows = Vec::with_capacity(tasks.len());
    let result = (|| -> Result<(), StreamError> {
        for task in tasks {
            crate::ingest::import::import_dataset(&store, &validator, &task.stream, |_| {})?;
            // Runs until every stored training sample was trained on (a task larger than a
            // run's limit takes several).
            loop {
                let before = ledger_of(&store)?.training;
                if store.split_len(SampleSplit::Train)? <= before.trained_upto {
                    break;
                }
                trainer.turn()?;
                settle(&trainer, &store, &owner_thread)?;
                let after = ledger_of(&store)?.training;
                if after.next_version == before.next_version {
                    // Everything new was quarantined: nothing trained.
                    if after.trained_upto == before.trained_upto {
                        break;
                    }
                    continue;
                }
                let version = before.next_version;
                compute.training_runs += 1;
                compute.training_steps += config.training.steps;
                if let Some(record) = store.version(version)? {
                    decisions.push(record.decision.clone());
                }
                if live.load().version == version {
                    compute.promotions += 1;
                    compute.images_reembedded += store.stats()?.samples;
                }
            }
            rows.push(evaluate_all(&live.load().embedder, tasks, max_pixels)?);
        }
        Ok(())
    })();
    cancel.cancel();
    let _ = owner_thread.join();
    result?;
    compute.seconds = started.elapsed().as_secs_f64();
    let metrics = metrics::continual_metrics(&rows, zero);
    Ok(StreamRun {
        variant: variant.name.clone(),
        seed,
        order: tasks.iter().map(|t| t.name.clone()).collect(),
        average_final: metrics.average_final,
        r: rows,
        metrics: Some(metrics),
        compute,
        decisions,
    })
}

fn ledger_of(store: &Store) -> Result<crate::store::ledger::DaemonLedger, StreamError> {
    store
        .daemon_ledger()?
        .ok_or_else(|| StreamError::Invalid("the version owner wrote no ledger".into()))
}

/// Waits until the owner has finished the promotion a run started (if any).
fn settle<B: ModelBackend>(
    trainer: &Trainer<B>,
    store: &Store,
    owner: &std::thread::JoinHandle<()>,
) -> Result<(), StreamError> {
    loop {
        if owner.is_finished() {
            return Err(StreamError::Invalid(
                "the version owner stopped during the stream".into(),
            ));
        }
        trainer.versions.ping_blocking()?;
        if ledger_of(store)?.promotion.is_none() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// What the joint bound trains like: the reference variant's settings, the seed, and the
/// reference stream's total training steps.
struct JointJob<'a> {
    plan: &'a Plan,
    reference: &'a Variant,
    seed: u64,
    steps: usize,
}

/// The joint bound: the offline trainer on the union of every task's streamed images, for
/// the whole epochs nearest to the reference stream's total steps, at the reference's batch
/// size and learning rate (constant); the last epoch's adapter is evaluated.
fn joint<B: ModelBackend>(
    job: &JointJob<'_>,
    backbone: &Backbone<B>,
    tasks: &[&Task],
    work: &Path,
    device: &B::Device,
) -> Result<StreamRun, StreamError> {
    let started = Instant::now();
    let _ = std::fs::remove_dir_all(work);
    std::fs::create_dir_all(work).map_err(io_error(work))?;
    let JointJob {
        plan,
        reference,
        seed,
        ..
    } = *job;
    let training = &reference.config.training;
    // Karpathy JSON with absolute file names: training images are every task's streamed
    // ones, the offline trainer's per-epoch selection set their test images (without any,
    // it holds out a tenth of the training images). Only `last` is reported, so the
    // selection never picks what is measured.
    let entry = |path: String, split: &str, captions: &[String]| {
        serde_json::json!({
            "filename": path,
            "split": split,
            "sentences": captions.iter().map(|c| serde_json::json!({"raw": c})).collect::<Vec<_>>(),
        })
    };
    let mut images = Vec::new();
    let mut pairs = 0usize;
    for task in tasks {
        for image in &task.stream.images {
            pairs += image.captions.len();
            let path = absolute(&task.stream.path_of(image))?;
            images.push(entry(path.display().to_string(), "train", &image.captions));
        }
    }
    let mut held_out = 0;
    for task in tasks {
        for image in &task.test.images {
            let path = absolute(&task.test.path_of(image))?;
            images.push(entry(path.display().to_string(), "test", &image.captions));
            held_out += 1;
        }
    }
    let (protocol, val_fraction) = if held_out > 0 {
        (Protocol::Paper, 0.0)
    } else {
        (Protocol::Holdout, 0.1)
    };
    let dataset = work.join("union.json");
    let text = serde_json::json!({ "images": images }).to_string();
    std::fs::write(&dataset, text).map_err(io_error(&dataset))?;
    let batch = training.batch_size;
    let steps_per_epoch = (pairs / batch + usize::from(pairs % batch >= 2)).max(1);
    let epochs = ((job.steps as f64 / steps_per_epoch as f64).round() as usize).max(1);
    let config = TrainConfig {
        model: plan.model_dir.clone(),
        dataset,
        images: PathBuf::from("/"),
        out: work.join("out"),
        adapter: reference.config.model.adapter.clone(),
        adapter_config: backbone.adapter_config().clone(),
        device: format!("{device:?}"),
        backbone_precision: reference.config.model.backbone_precision,
        epochs,
        batch_size: batch,
        lr: training.lr,
        lr_decay: 1.0,
        lr_decay_every: 1,
        val_fraction,
        protocol,
        seed,
        loss: crate::model::LossKind::default(),
        max_pixels: reference.config.model.max_pixels,
    };
    offline::train::<Autodiff<B>>(&config, false, device, Arc::new(AtomicBool::new(false)))?;
    let last = config.out.join("last.safetensors");
    let bytes = std::fs::read(&last).map_err(io_error(&last))?;
    let file = crate::store::ledger::AdapterFile {
        path: last,
        blake3: crate::serve::adapter_id(&bytes),
    };
    let embedder = backbone.with_adapter(Some(&file))?;
    let row = evaluate_all(&embedder, tasks, reference.config.model.max_pixels)?;
    Ok(StreamRun {
        variant: "joint".into(),
        seed,
        order: tasks.iter().map(|t| t.name.clone()).collect(),
        average_final: metrics::mean_finite(row.iter().copied()),
        r: vec![row],
        metrics: None,
        compute: Compute {
            training_runs: 1,
            training_steps: epochs * steps_per_epoch,
            seconds: started.elapsed().as_secs_f64(),
            ..Compute::default()
        },
        decisions: Vec::new(),
    })
}

fn absolute(path: &Path) -> Result<PathBuf, StreamError> {
    std::path::absolute(path).map_err(io_error(path))
}

/// The task orders of `spec` (comma-separated task names), validated against `tasks`.
pub fn parse_order(spec: &str, tasks: &[Task]) -> Result<Vec<usize>, StreamError> {
    let mut order = Vec::new();
    for name in spec.split(',').map(str::trim) {
        let index = tasks.iter().position(|t| t.name == name).ok_or_else(|| {
            StreamError::Invalid(format!(
                "unknown task {name} in --order (tasks: {})",
                tasks
                    .iter()
                    .map(|t| t.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        if order.contains(&index) {
            return Err(StreamError::Invalid(format!(
                "task {name} twice in --order"
            )));
        }
        order.push(index);
    }
    if order.len() != tasks.len() {
        return Err(StreamError::Invalid(format!(
            "--order names {} of the {} tasks",
            order.len(),
            tasks.len()
        )));
    }
    Ok(order)
}

/// Parses `NAME:section.key=value,section.key=value` into a name and overrides.
pub fn parse_variant(spec: &str) -> Result<(String, Vec<(String, String)>), StreamError> {
    let (name, settings) = spec.split_once(':').ok_or_else(|| {
        StreamError::Invalid(format!("variant {spec}: expected NAME:key=value,…"))
    })?;
    let mut overrides = Vec::new();
    for setting in settings.split(',').filter(|s| !s.trim().is_empty()) {
        let (key, value) = setting.split_once('=').ok_or_else(|| {
            StreamError::Invalid(format!("variant {name}: `{setting}` is not key=value"))
        })?;
        let key = key.trim();
        if key.split('.').count() != 2 {
            return Err(StreamError::Invalid(format!(
                "variant {name}: `{key}` is not section.key"
            )));
        }
        overrides.push((key.to_string(), value.trim().to_string()));
    }
    Ok((name.to_string(), overrides))
}

/// Overrides as the configuration's environment variables (`RSITRD__SECTION__KEY`).
pub fn as_env(overrides: &[(String, String)]) -> Vec<(String, String)> {
    overrides
        .iter()
        .map(|(key, value)| {
            let name = key.replace('.', "__").to_uppercase();
            (format!("RSITRD__{name}"), value.clone())
        })
        .collect()
}

/// The overrides a report shows for a variant.
pub fn overrides_map(overrides: &[(String, String)]) -> BTreeMap<String, String> {
    overrides.iter().cloned().collect()
}
