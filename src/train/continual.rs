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
use crate::model::preprocess::{decode_image, preprocess};
use crate::model::weights::{self, AdapterMeta, WeightsError};
use crate::model::{Embedder, LossConfig, pixel_tensor, tokenizer};
use crate::store::{SampleRecord, Store, StoreError};

/// Why a run failed (the daemon records it and tries again at the next trigger).
#[derive(Debug, thiserror::Error)]
pub enum ContinualError {
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("stored image {id} cannot be decoded any more: {reason}")]
    Image { id: String, reason: String },
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

/// Preprocessed `[3, size, size]` pixels of a stored sample.
pub fn sample_pixels(
    store: &Store,
    record: &SampleRecord,
    size: usize,
    max_pixels: u64,
) -> Result<Vec<f32>, ContinualError> {
    let bytes = store.read_image(&record.id)?;
    let image = decode_image(&bytes, &record.id.to_hex(), max_pixels).map_err(|e| {
        ContinualError::Image {
            id: record.id.to_hex(),
            reason: e.to_string(),
        }
    })?;
    Ok(preprocess(&image, size))
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
    max_pixels: u64,
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
        while chosen.len() < batch {
            if cursor == order.len() {
                order.shuffle(&mut rng);
                cursor = 0;
            }
            chosen.push(order[cursor]);
            cursor += 1;
        }
        let pixels: Vec<Vec<f32>> = chosen
            .iter()
            .map(|&i| sample_pixels(store, &samples[i], image_size, max_pixels))
            .collect::<Result<_, _>>()?;
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
    max_pixels: u64,
    cancel: &CancellationToken,
) -> Result<RetrievalMetrics, ContinualError> {
    let size = embedder.image_size();
    let mut images = Vec::with_capacity(samples.len());
    let mut texts = Vec::new();
    let mut caption_image = Vec::new();
    for (chunk_index, chunk) in samples.chunks(EVAL_CHUNK).enumerate() {
        if cancel.is_cancelled() {
            return Err(ContinualError::Cancelled);
        }
        let pixels: Vec<Vec<f32>> = chunk
            .iter()
            .map(|record| sample_pixels(store, record, size, max_pixels))
            .collect::<Result<_, _>>()?;
        let refs: Vec<&[f32]> = pixels.iter().map(Vec::as_slice).collect();
        images.extend(embedder.embed_pixels(&refs));
        let mut captions = Vec::new();
        for (offset, record) in chunk.iter().enumerate() {
            for caption in &record.captions {
                captions.push(caption.as_str());
                caption_image.push(chunk_index * EVAL_CHUNK + offset);
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
