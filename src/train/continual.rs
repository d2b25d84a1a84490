//! Continual training for the daemon: a run continues the live adapter on new training
//! samples mixed with a replayed sample of older ones, then the candidate and the live adapter
//! are evaluated side by side on the held-out `val` samples of the store (the promotion gate).

use std::path::Path;

use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use tokio_util::sync::CancellationToken;

use super::{AdapterTrainer, StepLosses};
use crate::config::TrainingSection;
use crate::eval::{RetrievalMetrics, retrieval_metrics, similarity_matrix};
use crate::model::clip::mix_seed;
use crate::model::preprocess::{ImageLimits, load_image};
use crate::model::weights::{self, AdapterMeta, WeightsError};
use crate::model::{Embedder, LossConfig, pixel_tensor, tokenizer};
use crate::store::{SampleId, SampleRecord, Store, StoreError};

/// Why a run failed (the daemon records it and tries again at the next trigger).
#[derive(Debug, thiserror::Error)]
pub enum ContinualError {
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A deterministic failure of one stored sample (its image no longer decodes within the
    /// limits, its blob is gone): quarantine it, retrying cannot help.
    #[error("stored sample {id} is unusable: {reason}")]
    Unusable { id: SampleId, reason: String },
    #[error("no training samples")]
    NoSamples,
    #[error("cancelled")]
    Cancelled,
}

/// A trained candidate and how its training went.
pub struct Candidate<B: Backend> {
    pub embedder: Embedder<B>,
    pub steps: usize,
    pub first_loss: f32,
    pub last_loss: f32,
    /// `false` if any loss was NaN or infinite (the gate refuses such a candidate).
    pub finite: bool,
}

/// Preprocessed `[3, size, size]` pixels of a stored sample. A missing blob or an image that
/// no longer passes `limits` is [`ContinualError::Unusable`]; other read errors are transient.
pub fn sample_pixels(
    store: &Store,
    record: &SampleRecord,
    size: usize,
    limits: &ImageLimits,
) -> Result<Vec<f32>, ContinualError> {
    let unusable = |reason: String| ContinualError::Unusable {
        id: record.id,
        reason,
    };
    let bytes = match store.read_image(&record.id) {
        Ok(bytes) => bytes,
        Err(StoreError::Io { path, error }) if error.kind() == std::io::ErrorKind::NotFound => {
            return Err(unusable(format!(
                "image blob {} is missing",
                path.display()
            )));
        }
        Err(error) => return Err(error.into()),
    };
    load_image(&bytes, &record.id.to_hex(), limits, size).map_err(|e| unusable(e.to_string()))
}

/// [`sample_pixels`], with an unusable sample put in quarantine under `stage` (`None`);
/// transient errors are returned.
pub fn pixels_or_quarantine(
    store: &Store,
    record: &SampleRecord,
    size: usize,
    limits: &ImageLimits,
    stage: &str,
) -> Result<Option<Vec<f32>>, ContinualError> {
    match sample_pixels(store, record, size, limits) {
        Ok(pixels) => Ok(Some(pixels)),
        Err(ContinualError::Unusable { id, reason }) => {
            quarantine(store, &id, stage, &reason)?;
            Ok(None)
        }
        Err(error) => Err(error),
    }
}

/// The pixels of the usable `records`, with those records, in order; unusable ones are
/// quarantined under `stage` and left out.
pub fn usable_pixels<'a>(
    store: &Store,
    records: &'a [SampleRecord],
    size: usize,
    limits: &ImageLimits,
    stage: &str,
) -> Result<(Vec<Vec<f32>>, Vec<&'a SampleRecord>), ContinualError> {
    let mut pixels = Vec::with_capacity(records.len());
    let mut usable = Vec::with_capacity(records.len());
    for record in records {
        if let Some(sample) = pixels_or_quarantine(store, record, size, limits, stage)? {
            pixels.push(sample);
            usable.push(record);
        }
    }
    Ok((pixels, usable))
}

/// Puts an unusable sample in quarantine (logged and counted); a store error is returned.
pub fn quarantine(
    store: &Store,
    id: &SampleId,
    stage: &str,
    reason: &str,
) -> Result<(), ContinualError> {
    if store.quarantine(id, stage, reason)? {
        metrics::counter!("rsitrd_quarantined_total", "stage" => stage.to_string()).increment(1);
        tracing::warn!(sample_id = %id, stage, reason, "sample quarantined: skipped until released");
        report_quarantine(store);
    }
    Ok(())
}

/// Sets the `rsitrd_quarantined_samples` gauge from the ledger.
pub fn report_quarantine(store: &Store) {
    if let Ok(stats) = store.stats() {
        metrics::gauge!("rsitrd_quarantined_samples").set(stats.quarantined as f64);
    }
}

/// Trains `steps` adapter steps starting from `parent` (none: the untrained adapter) on
/// `samples`, one random caption per image per step, batches of `config.batch_size`. The
/// result depends on `seed` and the set of samples, not on their order.
#[allow(clippy::too_many_arguments)]
pub fn train_candidate<AB: AutodiffBackend>(
    model_dir: &Path,
    parent: Option<&Path>,
    samples: &[SampleRecord],
    store: &Store,
    config: &TrainingSection,
    seed: u64,
    limits: &ImageLimits,
    batch_size_for_embedding: usize,
    device: &AB::Device,
    cancel: &CancellationToken,
) -> Result<Candidate<AB::InnerBackend>, ContinualError> {
    if samples.len() < 2 {
        return Err(ContinualError::NoSamples);
    }
    let start = Embedder::<AB>::load(model_dir, parent, device)?;
    let image_size = start.image_size();
    let patch = start.config.vision_config.patch_size;
    let tokenizer = start.tokenizer.clone();
    let (config_clip, base, adapter_config, meta, logit_scale) = (
        start.config.clone(),
        start.base.clone(),
        start.adapter_config.clone(),
        start.adapter_meta.clone(),
        start.logit_scale,
    );
    let mut trainer = AdapterTrainer::new(start.model, LossConfig::default());
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let batch = config.batch_size.min(samples.len());
    // Batches depend on the set of samples, not on the order they arrived in (ingestion
    // commits concurrently validated samples in a varying order): a seeded run is repeatable.
    let mut order: Vec<usize> = (0..samples.len()).collect();
    order.sort_by_key(|&i| samples[i].id);
    let mut cursor = order.len();
    let (mut first_loss, mut last_loss, mut finite) = (f32::NAN, f32::NAN, true);
    for step in 0..config.steps {
        if cancel.is_cancelled() {
            return Err(ContinualError::Cancelled);
        }
        let mut chosen = Vec::with_capacity(batch);
        let mut pixels = Vec::with_capacity(batch);
        while chosen.len() < batch.min(order.len()) {
            if cursor >= order.len() {
                order.shuffle(&mut rng);
                cursor = 0;
            }
            let index = order[cursor];
            match pixels_or_quarantine(store, &samples[index], image_size, limits, "train")? {
                Some(sample) => {
                    chosen.push(index);
                    pixels.push(sample);
                    cursor += 1;
                }
                // Quarantined: it leaves this run (and every later one).
                None => {
                    order.remove(cursor);
                }
            }
        }
        if chosen.len() < 2 {
            return Err(ContinualError::NoSamples);
        }
        let ids: Vec<Vec<i32>> = chosen
            .iter()
            .map(|&i| {
                let captions = &samples[i].captions;
                let caption = &captions[rand::Rng::random_range(&mut rng, 0..captions.len())];
                tokenizer.encode(caption)
            })
            .collect();
        let refs: Vec<&[f32]> = pixels.iter().map(Vec::as_slice).collect();
        let tensor = pixel_tensor::<AB>(&refs, image_size, patch, device);
        let losses: StepLosses = trainer.step(
            tensor,
            &tokenizer::batch_from_ids(&ids),
            config.lr,
            mix_seed(seed, step as u64),
        );
        if step == 0 {
            first_loss = losses.total;
        }
        last_loss = losses.total;
        if !losses.is_finite() {
            finite = false;
            break;
        }
    }
    let model = trainer.inference_model();
    let embedder = Embedder::from_parts(
        model,
        config_clip,
        base,
        adapter_config,
        meta,
        logit_scale,
        device,
    );
    let mut embedder = embedder;
    embedder.batch_size = batch_size_for_embedding;
    Ok(Candidate {
        embedder,
        steps: config.steps,
        first_loss,
        last_loss,
        finite,
    })
}

/// Samples decoded and embedded at a time during evaluation (bounds memory: one chunk of
/// preprocessed images, not the whole validation set).
const EVAL_CHUNK: usize = 64;

/// R@K / mR of `embedder` on stored samples (every caption of every sample), embedded in
/// chunks; `cancel` is checked between chunks.
pub fn evaluate_on_store<B: Backend>(
    embedder: &Embedder<B>,
    store: &Store,
    samples: &[SampleRecord],
    limits: &ImageLimits,
    cancel: &CancellationToken,
) -> Result<RetrievalMetrics, ContinualError> {
    let size = embedder.image_size();
    let mut images = Vec::with_capacity(samples.len());
    let mut texts = Vec::new();
    let mut caption_image = Vec::new();
    for chunk in samples.chunks(EVAL_CHUNK) {
        if cancel.is_cancelled() {
            return Err(ContinualError::Cancelled);
        }
        // Unusable samples are quarantined, and so left out of every later evaluation too.
        let (pixels, usable) = usable_pixels(store, chunk, size, limits, "eval")?;
        if usable.is_empty() {
            continue;
        }
        let refs: Vec<&[f32]> = pixels.iter().map(Vec::as_slice).collect();
        let first = images.len();
        images.extend(embedder.embed_pixels(&refs));
        let mut captions = Vec::new();
        for (offset, record) in usable.iter().enumerate() {
            for caption in &record.captions {
                captions.push(caption.as_str());
                caption_image.push(first + offset);
            }
        }
        texts.extend(embedder.embed_texts(&captions));
    }
    let similarity = similarity_matrix(&images, &texts);
    Ok(retrieval_metrics(&similarity, images.len(), &caption_image))
}

/// Adapter metadata of a candidate: version lineage and its gate metrics.
pub fn candidate_meta(
    adapter: crate::model::AdapterConfig,
    base_model: String,
    version: u64,
    parent: u64,
    metrics: &RetrievalMetrics,
    created_at: String,
) -> AdapterMeta {
    AdapterMeta {
        adapter,
        base_model,
        version,
        parent: Some(parent),
        created_at,
        metrics: metrics.to_map(),
    }
}

/// Saves a candidate's adapter with its metadata.
pub fn save_candidate<B: Backend>(
    embedder: &Embedder<B>,
    meta: &AdapterMeta,
    path: &Path,
) -> Result<(), ContinualError> {
    weights::save_adapter(&embedder.model, meta, path)?;
    Ok(())
}
