//! `rsitrd train`: the paper's training recipe on a dataset, with validation-based model
//! selection, a JSONL log, a plot, and interruption-safe resumable state.
//!
//! Determinism: the data order of epoch `e` is a permutation seeded by `(seed, e)` and the
//! dropout masks of step `s` are drawn from host RNGs seeded by `(seed, s)`, so a run
//! resumed from a saved state reaches the same adapter as an uninterrupted one (on CPU).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, sync_channel};
use std::time::{Duration, Instant};

use burn::module::Module;
use burn::optim::Optimizer;
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, Recorder};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::data::{Dataset, DatasetImage, Split, load_pixels};
use crate::eval::{RetrievalMetrics, evaluate};
use crate::model::clip::mix_seed;
use crate::model::device::BackbonePrecision;
use crate::model::kernels::TrainBackend;
use crate::model::weights::{self, AdapterMeta, LoadedClip};
use crate::model::{
    AdapterConfig, ClipTokenizer, Embedder, LossConfig, LossKind, TokenBatch, pixel_tensor,
    tokenizer,
};
use crate::train::{AdapterTrainer, StepLosses};

/// Batches prepared ahead of the trainer (decode, resize, tokenize run on other threads).
const PREFETCH_BATCHES: usize = 4;
/// Log a step line every this many steps.
const LOG_EVERY: usize = 10;

/// How a dataset without a `val` split (RSITMD, UCM, Sydney) is used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Hold out `val_fraction` of the training images to select the checkpoint; the test
    /// split is never seen during training.
    #[default]
    Holdout,
    /// The paper's: train on every training image and evaluate each epoch on the test split,
    /// as PE-RSITR's (and its predecessors') code does; `best` is then chosen on test
    /// (optimistic), `last` is the figure that saw no test data. With a `val` split (RSICD)
    /// both protocols use it.
    Paper,
}

/// The training configuration, written to `OUT/train-config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub model: PathBuf,
    pub dataset: PathBuf,
    pub images: PathBuf,
    pub out: PathBuf,
    /// Adapter checkpoint to start from (its version becomes the parent).
    pub adapter: Option<PathBuf>,
    pub adapter_config: AdapterConfig,
    pub device: String,
    /// Float type of the frozen blocks' products (absent in runs saved before it existed).
    #[serde(default)]
    pub backbone_precision: BackbonePrecision,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    /// Learning rate multiplied by this every `lr_decay_every` epochs.
    pub lr_decay: f64,
    pub lr_decay_every: usize,
    /// Fraction of training images held out for validation when the dataset has no `val`.
    pub val_fraction: f64,
    /// Which images train and which select the checkpoint (see [`Protocol`]).
    #[serde(default)]
    pub protocol: Protocol,
    pub seed: u64,
    pub loss: LossKind,
    pub max_pixels: u64,
}

impl TrainConfig {
    /// Learning rate of `epoch` (0-based): `lr · decay^(epoch / every)`.
    pub fn lr_at(&self, epoch: usize) -> f64 {
        self.lr
            * self
                .lr_decay
                .powi((epoch / self.lr_decay_every.max(1)) as i32)
    }
}

/// Where a run stands; saved with the adapter and Adam state for `--resume`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub epoch: usize,
    /// Step within the epoch.
    pub step_in_epoch: usize,
    pub global_step: usize,
    pub best_mr: Option<f64>,
    pub best_epoch: Option<usize>,
    /// Per finished epoch: mean training loss and validation metrics.
    pub history: Vec<EpochRecord>,
    pub finished: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    pub epoch: usize,
    pub train_loss: f64,
    pub val: RetrievalMetrics,
    pub seconds: f64,
    /// Fraction of the epoch the trainer waited for data.
    pub data_wait_fraction: f64,
}

/// Why training stopped early or failed.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Weights(#[from] weights::WeightsError),
    #[error(transparent)]
    Dataset(#[from] crate::data::DatasetReport),
    #[error(transparent)]
    Image(#[from] crate::model::preprocess::ImageError),
    #[error("{0}")]
    Invalid(String),
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("non-finite loss at step {step}: {losses:?}")]
    NonFinite { step: usize, losses: StepLosses },
    #[error("cannot read or write training state {path}: {reason}")]
    State { path: PathBuf, reason: String },
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Finished {
        best_mr: f64,
        best_epoch: usize,
    },
    /// Interrupted; the state to resume from was saved.
    Interrupted {
        global_step: usize,
    },
}

/// Paths inside `--out`.
struct OutDir {
    root: PathBuf,
}

impl OutDir {
    fn best(&self) -> PathBuf {
        self.root.join("best.safetensors")
    }
    fn last(&self) -> PathBuf {
        self.root.join("last.safetensors")
    }
    fn log(&self) -> PathBuf {
        self.root.join("train-log.jsonl")
    }
    fn config(&self) -> PathBuf {
        self.root.join("train-config.json")
    }
    fn plot(&self) -> PathBuf {
        self.root.join("training.svg")
    }
    fn state_dir(&self) -> PathBuf {
        self.root.join("state")
    }
}

/// One prepared batch.
struct Batch {
    pixels: Vec<Vec<f32>>,
    tokens: TokenBatch,
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Training and validation images: the dataset's `val` split, else a seeded fraction of
/// the training images.
pub fn split_train_val(
    dataset: &Dataset,
    fraction: f64,
    seed: u64,
) -> (Vec<&DatasetImage>, Vec<&DatasetImage>) {
    let train = dataset.split(Split::Train);
    let val = dataset.split(Split::Val);
    if !val.is_empty() {
        return (train, val);
    }
    let mut order: Vec<usize> = (0..train.len()).collect();
    order.shuffle(&mut StdRng::seed_from_u64(mix_seed(seed, u64::MAX)));
    let held = ((train.len() as f64 * fraction).round() as usize)
        .clamp(1, train.len().saturating_sub(1).max(1));
    let held_out: std::collections::HashSet<usize> = order[..held].iter().copied().collect();
    let (mut kept, mut validation) = (Vec::new(), Vec::new());
    for (index, image) in train.into_iter().enumerate() {
        if held_out.contains(&index) {
            validation.push(image);
        } else {
            kept.push(image);
        }
    }
    (kept, validation)
}

/// All (image, caption) pairs of the training images, in the order of epoch `epoch`.
fn epoch_pairs(images: &[&DatasetImage], seed: u64, epoch: usize) -> Vec<(usize, usize)> {
    let mut pairs: Vec<(usize, usize)> = images
        .iter()
        .enumerate()
        .flat_map(|(i, image)| (0..image.captions.len()).map(move |c| (i, c)))
        .collect();
    pairs.shuffle(&mut StdRng::seed_from_u64(mix_seed(seed, epoch as u64)));
    pairs
}

/// What the loader thread needs for one epoch.
struct LoaderJob {
    dataset: Arc<Dataset>,
    images: Vec<DatasetImage>,
    /// (image, caption) pairs in epoch order.
    pairs: Vec<(usize, usize)>,
    /// Batches already trained on (resume).
    skip_batches: usize,
    batch_size: usize,
    image_size: usize,
    max_pixels: u64,
    tokenizer: Arc<ClipTokenizer>,
}

/// Prepares the batches of one epoch on a background thread, `PREFETCH_BATCHES` ahead.
fn spawn_loader(job: LoaderJob) -> Receiver<Result<Batch, TrainError>> {
    let LoaderJob {
        dataset,
        images,
        pairs,
        skip_batches,
        batch_size,
        image_size,
        max_pixels,
        tokenizer,
    } = job;
    let (sender, receiver) = sync_channel(PREFETCH_BATCHES);
    std::thread::spawn(move || {
        for chunk in pairs.chunks(batch_size).skip(skip_batches) {
            if chunk.len() < 2 {
                break; // a contrastive batch needs negatives
            }
            let pixels: Result<Vec<Vec<f32>>, _> = chunk
                .par_iter()
                .map(|&(image, _)| {
                    load_pixels(&dataset.path_of(&images[image]), image_size, max_pixels)
                })
                .collect();
            let batch = pixels.map_err(TrainError::from).map(|pixels| {
                let ids: Vec<Vec<i32>> = chunk
                    .iter()
                    .map(|&(image, caption)| tokenizer.encode(&images[image].captions[caption]))
                    .collect();
                Batch {
                    pixels,
                    tokens: tokenizer::batch_from_ids(&ids),
                }
            });
            if sender.send(batch).is_err() {
                return; // trainer stopped
            }
        }
    });
    receiver
}

/// Appends one JSON line to the training log.
fn log_line(file: &mut File, path: &Path, value: serde_json::Value) -> Result<(), TrainError> {
    writeln!(file, "{value}").map_err(io_error(path))
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// Runs (or resumes) training. `interrupt` is polled between steps; when set, the state is
/// saved and [`Outcome::Interrupted`] returned.
pub fn train<AB: TrainBackend>(
    config: &TrainConfig,
    resume: bool,
    device: &AB::Device,
    interrupt: Arc<AtomicBool>,
) -> Result<Outcome, TrainError> {
    let out = OutDir {
        root: config.out.clone(),
    };
    std::fs::create_dir_all(&out.root).map_err(io_error(&out.root))?;
    let dataset = Arc::new(Dataset::load(&config.dataset, &config.images)?);
    let (train_images, val_images) = match config.protocol {
        Protocol::Holdout => split_train_val(&dataset, config.val_fraction, config.seed),
        Protocol::Paper => {
            let val = dataset.split(Split::Val);
            let selection = if val.is_empty() {
                dataset.split(Split::Test)
            } else {
                val
            };
            (dataset.split(Split::Train), selection)
        }
    };
    if train_images.len() < 2 || val_images.is_empty() {
        return Err(TrainError::Invalid(format!(
            "need at least 2 training and 1 validation image, have {} and {}",
            train_images.len(),
            val_images.len()
        )));
    }

    // Model, starting adapter, and the parent version. Seeded first: the fresh adapter's
    // random down projections must be the same in a resumed run's first attempt.
    AB::seed(device, config.seed);
    let LoadedClip {
        model,
        config: clip_config,
        logit_scale,
        base,
    } = weights::load_clip::<AB>(&config.model, &config.adapter_config, device)?;
    let mut model = model
        .with_backbone_precision(config.backbone_precision, device)
        .map_err(weights::WeightsError::from)?;
    let parent = match &config.adapter {
        Some(path) => Some(weights::load_adapter(
            &mut model,
            &base,
            &config.adapter_config,
            path,
        )?),
        None => None,
    };
    let version = parent.as_ref().map_or(1, |meta| meta.version + 1);
    let image_size = clip_config.vision_config.image_size;
    let patch_size = clip_config.vision_config.patch_size;
    let loss = LossConfig {
        kind: config.loss,
        scale: f64::from(logit_scale.exp()),
        ..LossConfig::default()
    };
    let state_dir = out.state_dir();
    let recorder = NamedMpkFileRecorder::<FullPrecisionSettings>::new();
    let mut trainer = AdapterTrainer::new(model, loss);
    let mut progress = Progress::default();
    if resume {
        let state_path = state_dir.join("progress.json");
        let state_error = |reason: String| TrainError::State {
            path: state_path.clone(),
            reason,
        };
        let text = std::fs::read_to_string(&state_path).map_err(|e| state_error(e.to_string()))?;
        progress = serde_json::from_str(&text).map_err(|e| state_error(e.to_string()))?;
        let saved: TrainConfig = serde_json::from_str(
            &std::fs::read_to_string(out.config()).map_err(|e| state_error(e.to_string()))?,
        )
        .map_err(|e| state_error(e.to_string()))?;
        if saved != *config {
            return Err(TrainError::Invalid(format!(
                "--resume with a different configuration than {} (compare the flags)",
                out.config().display()
            )));
        }
        let adapter_record = recorder
            .load(state_dir.join("adapter"), device)
            .map_err(|e| state_error(e.to_string()))?;
        let optimizer_record = recorder
            .load(state_dir.join("optimizer"), device)
            .map_err(|e| state_error(e.to_string()))?;
        trainer.restore(adapter_record, optimizer_record);
        if progress.finished {
            return Ok(Outcome::Finished {
                best_mr: progress.best_mr.unwrap_or_default(),
                best_epoch: progress.best_epoch.unwrap_or_default(),
            });
        }
        tracing::info!(
            epoch = progress.epoch,
            step = progress.global_step,
            "resuming training"
        );
    } else {
        let json = serde_json::to_string_pretty(config).expect("config serializes");
        std::fs::write(out.config(), json).map_err(io_error(&out.config()))?;
        // A fresh run starts a fresh log.
        let _ = std::fs::remove_file(out.log());
        let _ = std::fs::remove_dir_all(&state_dir);
    }
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out.log())
        .map_err(io_error(&out.log()))?;

    let tokenizer = Arc::new(ClipTokenizer::new(
        clip_config.text_config.max_position_embeddings,
    ));
    let owned_train: Vec<DatasetImage> = train_images.iter().map(|i| (*i).clone()).collect();
    let meta_for = |metrics: &RetrievalMetrics, epoch: usize| AdapterMeta {
        adapter: config.adapter_config.clone(),
        base_model: base.fingerprint.clone(),
        base_architecture: base.architecture.clone(),
        version,
        parent: parent.as_ref().map(|p| p.version),
        created_at: now_rfc3339(),
        metrics: {
            let mut map = metrics.to_map();
            map.insert("epoch".into(), epoch as f64);
            map
        },
    };
    let total_batches_per_epoch =
        owned_train.iter().map(|i| i.captions.len()).sum::<usize>() / config.batch_size.max(1);
    let bar = progress_bar(
        config.epochs * total_batches_per_epoch.max(1),
        progress.global_step,
    );

    while progress.epoch < config.epochs {
        let epoch = progress.epoch;
        let lr = config.lr_at(epoch);
        let pairs = epoch_pairs(&train_images, config.seed, epoch);
        let loader = spawn_loader(LoaderJob {
            dataset: dataset.clone(),
            images: owned_train.clone(),
            pairs,
            skip_batches: progress.step_in_epoch,
            batch_size: config.batch_size,
            image_size,
            max_pixels: config.max_pixels,
            tokenizer: tokenizer.clone(),
        });
        let epoch_start = Instant::now();
        let mut waited = Duration::ZERO;
        let mut loss_sum = 0.0f64;
        let mut loss_count = 0usize;
        loop {
            if interrupt.load(Ordering::SeqCst) {
                save_state(&trainer, &progress, &state_dir, &recorder)?;
                if let Some(bar) = &bar {
                    bar.abandon();
                }
                tracing::warn!(
                    step = progress.global_step,
                    "interrupted: state saved, continue with --resume"
                );
                return Ok(Outcome::Interrupted {
                    global_step: progress.global_step,
                });
            }
            let wait_start = Instant::now();
            let Ok(batch) = loader.recv() else { break };
            waited += wait_start.elapsed();
            let batch = batch?;
            let refs: Vec<&[f32]> = batch.pixels.iter().map(Vec::as_slice).collect();
            let pixels = pixel_tensor::<AB>(&refs, image_size, patch_size, device);
            let step_seed = mix_seed(config.seed, progress.global_step as u64);
            let losses = trainer.step(pixels, &batch.tokens, lr, step_seed);
            if !losses.is_finite() {
                return Err(TrainError::NonFinite {
                    step: progress.global_step,
                    losses,
                });
            }
            loss_sum += f64::from(losses.total);
            loss_count += 1;
            progress.step_in_epoch += 1;
            progress.global_step += 1;
            if progress.global_step % LOG_EVERY == 0 || progress.step_in_epoch == 1 {
                log_line(
                    &mut log,
                    &out.log(),
                    serde_json::json!({"kind": "step", "step": progress.global_step, "epoch": epoch, "lr": lr,
                        "loss": losses.total, "image_text": losses.image_text,
                        "image_image": losses.image_image, "text_text": losses.text_text,
                        "data_wait_ms": waited.as_secs_f64() * 1000.0}),
                )?;
            }
            match &bar {
                Some(bar) => {
                    bar.set_position(progress.global_step as u64);
                    bar.set_message(format!("epoch {} loss {:.3}", epoch + 1, losses.total));
                }
                None if progress.global_step % LOG_EVERY == 0 => {
                    tracing::info!(
                        step = progress.global_step,
                        epoch,
                        loss = losses.total,
                        lr,
                        "training"
                    );
                }
                None => {}
            }
        }

        // End of epoch: validate, select, checkpoint, log.
        let inference = trainer.inference_model();
        let embedder = Embedder::from_parts(
            inference,
            clip_config.clone(),
            base.clone(),
            config.adapter_config.clone(),
            None,
            logit_scale,
            &device_inner::<AB>(device),
        );
        let val = evaluate(&embedder, &dataset, &val_images, config.max_pixels)?;
        let seconds = epoch_start.elapsed().as_secs_f64();
        let record = EpochRecord {
            epoch,
            train_loss: if loss_count > 0 {
                loss_sum / loss_count as f64
            } else {
                f64::NAN
            },
            val,
            seconds,
            data_wait_fraction: waited.as_secs_f64() / seconds.max(1e-9),
        };
        weights::save_adapter(&embedder.model, &meta_for(&val, epoch), &out.last())?;
        if progress.best_mr.is_none_or(|best| val.mr > best) {
            progress.best_mr = Some(val.mr);
            progress.best_epoch = Some(epoch);
            weights::save_adapter(&embedder.model, &meta_for(&val, epoch), &out.best())?;
        }
        log_line(
            &mut log,
            &out.log(),
            serde_json::json!({"kind": "epoch", "epoch": epoch, "lr": lr, "train_loss": record.train_loss,
                "val": val, "seconds": seconds, "data_wait_fraction": record.data_wait_fraction}),
        )?;
        let report = || {
            tracing::info!(
                epoch,
                train_loss = record.train_loss,
                val_mr = val.mr,
                seconds,
                "epoch done"
            )
        };
        match &bar {
            // Printed above the bar instead of through it.
            Some(bar) => bar.suspend(report),
            None => report(),
        }
        progress.history.push(record);
        progress.epoch += 1;
        progress.step_in_epoch = 0;
        write_plot(&out.plot(), &progress.history)?;
        save_state(&trainer, &progress, &state_dir, &recorder)?;
    }
    progress.finished = true;
    save_state(&trainer, &progress, &state_dir, &recorder)?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(Outcome::Finished {
        best_mr: progress.best_mr.unwrap_or_default(),
        best_epoch: progress.best_epoch.unwrap_or_default(),
    })
}

/// The inner (inference) device of an autodiff device: the same value.
fn device_inner<AB: TrainBackend>(device: &AB::Device) -> burn::tensor::Device<AB::InnerBackend> {
    device.clone()
}

/// A progress bar on a terminal; `None` (plain log lines) otherwise.
fn progress_bar(total: usize, position: usize) -> Option<indicatif::ProgressBar> {
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return None;
    }
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {pos}/{len} steps {per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_position(position as u64);
    Some(bar)
}

/// Saves adapter (with parameter ids), Adam state and progress: written to a temp directory,
/// then swapped in, so a crash mid-save leaves the previous state intact.
fn save_state<AB: TrainBackend>(
    trainer: &AdapterTrainer<AB>,
    progress: &Progress,
    state_dir: &Path,
    recorder: &NamedMpkFileRecorder<FullPrecisionSettings>,
) -> Result<(), TrainError> {
    let temp = state_dir.with_extension("tmp");
    let state_error = |reason: String| TrainError::State {
        path: state_dir.to_path_buf(),
        reason,
    };
    let _ = std::fs::remove_dir_all(&temp);
    std::fs::create_dir_all(&temp).map_err(|e| state_error(e.to_string()))?;
    let (adapter, optimizer) = trainer.records();
    recorder
        .record(adapter, temp.join("adapter"))
        .map_err(|e| state_error(e.to_string()))?;
    recorder
        .record(optimizer, temp.join("optimizer"))
        .map_err(|e| state_error(e.to_string()))?;
    let json = serde_json::to_vec_pretty(progress).expect("progress serializes");
    weights::write_atomically(&temp.join("progress.json"), &json)
        .map_err(|e| state_error(e.to_string()))?;
    let old = state_dir.with_extension("old");
    let _ = std::fs::remove_dir_all(&old);
    if state_dir.exists() {
        std::fs::rename(state_dir, &old).map_err(|e| state_error(e.to_string()))?;
    }
    std::fs::rename(&temp, state_dir).map_err(|e| state_error(e.to_string()))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// A two-panel SVG: mean training loss and validation mR per epoch.
pub fn write_plot(path: &Path, history: &[EpochRecord]) -> Result<(), TrainError> {
    let width = 750.0;
    let height = 260.0;
    let panel = |title: &str, values: &[f64], x0: f64, color: &str| -> String {
        let (w, h, pad) = (330.0, 200.0, 30.0);
        let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        let (lo, hi) = finite
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
                (lo.min(v), hi.max(v))
            });
        let (lo, hi) = if lo.is_finite() && hi > lo {
            (lo, hi)
        } else {
            (lo.min(0.0), lo.max(0.0) + 1.0)
        };
        let n = values.len().max(2) - 1;
        let points: Vec<String> = values
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite())
            .map(|(i, v)| {
                let x = x0 + pad + w * i as f64 / n as f64;
                let y = 20.0 + h - h * (v - lo) / (hi - lo);
                format!("{x:.1},{y:.1}")
            })
            .collect();
        format!(
            r##"<text x="{tx}" y="14" font-size="13" font-family="sans-serif">{title}</text>
<rect x="{rx}" y="20" width="{w}" height="{h}" fill="none" stroke="#999"/>
<text x="{x0}" y="28" font-size="10" font-family="sans-serif">{hi:.2}</text>
<text x="{x0}" y="{by}" font-size="10" font-family="sans-serif">{lo:.2}</text>
<text x="{rx}" y="{ly}" font-size="10" font-family="sans-serif">epoch 1 … {epochs}</text>
<polyline fill="none" stroke="{color}" stroke-width="2" points="{points}"/>
"##,
            tx = x0 + pad,
            rx = x0 + pad,
            by = 20.0 + h,
            ly = 20.0 + h + 14.0,
            epochs = values.len(),
            points = points.join(" "),
        )
    };
    let losses: Vec<f64> = history.iter().map(|r| r.train_loss).collect();
    let mrs: Vec<f64> = history.iter().map(|r| r.val.mr).collect();
    let svg = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}">
<rect width="100%" height="100%" fill="white"/>
{}{}</svg>
"##,
        panel("training loss (mean per epoch)", &losses, 0.0, "#c0392b"),
        panel("validation mR (%)", &mrs, 360.0, "#2471a3"),
    );
    weights::write_atomically(path, svg.as_bytes()).map_err(io_error(path))
}

/// Saved adapter parameters (values and parameter ids).
pub type AdapterRecord<B> = <crate::model::MrsAdapter<B> as Module<B>>::Record;
/// Saved Adam state, keyed by parameter id.
pub type AdamRecord<B> = <burn::optim::adaptor::OptimizerAdaptor<
    burn::optim::Adam,
    crate::model::ClipModel<B>,
    B,
> as Optimizer<crate::model::ClipModel<B>, B>>::Record;

impl<B: TrainBackend> AdapterTrainer<B> {
    /// Records of the adapter (with parameter ids) and of Adam, for resumable state.
    pub fn records(&self) -> (AdapterRecord<B>, AdamRecord<B>) {
        (
            self.model().adapter.clone().into_record(),
            self.optimizer.to_record(),
        )
    }

    /// Restores what [`AdapterTrainer::records`] saved.
    pub fn restore(&mut self, adapter: AdapterRecord<B>, optimizer: AdamRecord<B>) {
        let mut model = self.model.take().expect("model present between steps");
        model.adapter = model.adapter.load_record(adapter);
        self.model = Some(model);
        let optimizer_state = std::mem::replace(&mut self.optimizer, crate::train::adam().init());
        self.optimizer = optimizer_state.load_record(optimizer);
    }
}
