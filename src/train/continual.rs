//! Continual training for the daemon: a run continues the live adapter on new training
//! samples mixed with a replayed sample of older ones (the gate, `super::gate`, then decides
//! whether the candidate serves). The run starts from the shared backbone: no weights load.

use std::path::Path;

use crate::model::kernels::ModelBackend;
use crate::model::kernels::TrainBackend;
use burn::prelude::*;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use tokio_util::sync::CancellationToken;

use super::{AdapterTrainer, StepLosses};
use crate::config::TrainingSection;
use crate::eval::{RetrievalMetrics, retrieval_metrics, similarity_matrix};
use crate::model::clip::mix_seed;
use crate::model::preprocess::ImageLimits;
use crate::model::weights::{self, AdapterMeta, WeightsError};
use crate::model::{Embedder, LossConfig, pixel_tensor, tokenizer};
use crate::store::{SampleId, SampleRecord, Store, StoreError};
use crate::stored::{SampleError, pixels_or_quarantine, usable_pixels};

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
    #[error(transparent)]
    Serve(#[from] crate::serve::ServeError),
    #[error("no training samples")]
    NoSamples,
    #[error("version owner: {0}")]
    Versions(String),
    #[error("cancelled")]
    Cancelled,
}

impl From<SampleError> for ContinualError {
    fn from(error: SampleError) -> Self {
        match error {
            SampleError::Store(error) => Self::Store(error),
            SampleError::Unusable { id, reason } => Self::Unusable { id, reason },
        }
    }
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

/// Trains `steps` adapter steps starting from `start` (the parent adapter on the shared
/// backbone) on `samples`, one random caption per image per step, batches of
/// `config.batch_size`. The result depends on `seed` and the set of samples, not on their
/// order. The backbone's weights stay shared with `start` (wrapped for autodiff, frozen).
#[allow(clippy::too_many_arguments)]
pub fn train_candidate<AB: TrainBackend>(
    start: &Embedder<AB::InnerBackend>,
    samples: &[SampleRecord],
    store: &Store,
    config: &TrainingSection,
    seed: u64,
    limits: &ImageLimits,
    device: &AB::Device,
    cancel: &CancellationToken,
) -> Result<Candidate<AB::InnerBackend>, ContinualError> {
    if samples.len() < 2 {
        return Err(ContinualError::NoSamples);
    }
    let image_size = start.image_size();
    let patch = start.config.vision_config.patch_size;
    let tokenizer = start.tokenizer.clone();
    let device_inner = start.device.clone();
    let (config_clip, base, adapter_config, meta, logit_scale) = (
        start.config.clone(),
        start.base.clone(),
        start.adapter_config.clone(),
        start.adapter_meta.clone(),
        start.logit_scale,
    );
    let mut trainer = AdapterTrainer::new(
        crate::serve::trainable::<AB>(start.model.clone()),
        LossConfig::default(),
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let batch = config.batch_size.min(samples.len());
    // Batches depend on the set of samples, not on the order they arrived in (ingestion
    // commits concurrently validated samples in a varying order): a seeded run is repeatable.
    let mut order: Vec<usize> = (0..samples.len()).collect();
    order.sort_by_key(|&i| samples[i].id);
    let mut cursor = order.len();
    let (mut first_loss, mut last_loss, mut finite) = (f32::NAN, f32::NAN, true);
    // The weight average starts at the parent: with a decay d over n steps the candidate
    // keeps d^n of the parent, which limits how far one run can move away from what served.
    let mut ema = (config.ema_decay > 0.0).then(|| start.model.adapter.clone());
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
            config.lr_schedule.lr_at(config.lr, step, config.steps),
            mix_seed(seed, step as u64),
        );
        if let Some(average) = ema.take() {
            use burn::module::AutodiffModule;
            let current = trainer.model().adapter.valid();
            ema = Some(average.lerp(&current, 1.0 - config.ema_decay));
        }
        if step == 0 {
            first_loss = losses.total;
        }
        last_loss = losses.total;
        if !losses.is_finite() {
            finite = false;
            break;
        }
    }
    let mut model = trainer.inference_model();
    if let Some(average) = ema {
        model.adapter = average;
    }
    // The start's tokenizer is shared, not rebuilt.
    let embedder = Embedder {
        model,
        config: config_clip,
        tokenizer,
        base,
        adapter_meta: meta,
        adapter_config,
        logit_scale,
        device: device_inner,
        batch_size: start.batch_size,
    };
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
pub fn evaluate_on_store<B: ModelBackend>(
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
    base: &crate::model::BaseModel,
    version: u64,
    parent: u64,
    metrics: &RetrievalMetrics,
    created_at: String,
) -> AdapterMeta {
    AdapterMeta {
        adapter,
        base_model: base.fingerprint.clone(),
        base_architecture: base.architecture.clone(),
        version,
        parent: Some(parent),
        created_at,
        metrics: metrics.to_map(),
    }
}

/// Saves a candidate's adapter under a content-addressed name in `dir`
/// (`v{version}-{blake3 prefix}.safetensors`) and returns the file with its full BLAKE3.
pub fn save_candidate<B: ModelBackend>(
    embedder: &Embedder<B>,
    meta: &AdapterMeta,
    dir: &Path,
) -> Result<crate::store::ledger::AdapterFile, ContinualError> {
    let write_error = |path: &Path, source: std::io::Error| {
        ContinualError::Weights(WeightsError::Write {
            path: path.to_path_buf(),
            source,
        })
    };
    let bytes = weights::adapter_bytes(&embedder.model, meta).map_err(|e| write_error(dir, e))?;
    let blake3 = crate::serve::adapter_id(&bytes);
    let path = dir.join(format!("v{}-{}.safetensors", meta.version, &blake3[..12]));
    weights::write_atomically(&path, &bytes).map_err(|e| write_error(&path, e))?;
    Ok(crate::store::ledger::AdapterFile { path, blake3 })
}
