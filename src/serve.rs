//! The serving model: one frozen backbone loaded once and shared, and the live adapter
//! version on top of it behind an `ArcSwap`. A version is an adapter (161,088 parameters at
//! ViT-B/32): making one serve costs an adapter read and a pointer swap, not a weights load.
//!
//! Sharing: burn's CPU tensors (and CUDA handles) are reference-counted, so cloning the
//! backbone's modules shares their weights; only the adapter differs between versions.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::model::device::BackbonePrecision;
use crate::model::kernels::ModelBackend;
use crate::model::kernels::TrainBackend;
use arc_swap::ArcSwap;
use burn::prelude::*;

use crate::model::weights::{self, WeightsError};
use crate::model::{AdapterConfig, ClipConfig, ClipModel, Embedder, MrsAdapter};
use crate::store::ledger::AdapterFile;

/// Why an adapter cannot serve.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("cannot read adapter {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// The file under this name is not the adapter the ledger recorded (overwritten, or a
    /// version number reused by another deployment): refused, never served.
    #[error(
        "adapter {path} has BLAKE3 {found}, the ledger recorded {expected}: refusing a stale adapter"
    )]
    Stale {
        path: PathBuf,
        expected: String,
        found: String,
    },
}

/// BLAKE3 of adapter checkpoint bytes (hex): an adapter's identity.
pub fn adapter_id(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// The frozen CLIP, loaded once. Every embedder made from it shares its weights.
pub struct Backbone<B: Backend> {
    /// The backbone with the seeded untrained adapter (its up projections are zero: it adds
    /// nothing, so this is plain CLIP).
    untrained: Embedder<B>,
}

impl<B: ModelBackend> Backbone<B> {
    /// Loads `model_dir` once. The adapter shape comes from `adapter` (an existing checkpoint
    /// to continue) or is the default for the backbone; `seed` draws the untrained adapter's
    /// down projections; the blocks' products run in `precision`.
    pub fn load(
        model_dir: &Path,
        adapter: Option<&Path>,
        seed: u64,
        batch_size: usize,
        precision: BackbonePrecision,
        device: &B::Device,
    ) -> Result<Self, WeightsError> {
        let clip = ClipConfig::from_model_dir(model_dir)?;
        let adapter_config = match adapter {
            Some(path) => weights::read_adapter_meta(path)?.adapter,
            None => AdapterConfig::default_for(&clip),
        };
        let loaded = weights::load_clip::<B>(model_dir, &adapter_config, device)?;
        let mut model = loaded.model.with_backbone_precision(precision, device)?;
        model.adapter = adapter_config.init_seeded(&loaded.config, seed, device);
        tracing::info!(model = %model_dir.display(), %precision, "backbone loaded");
        let mut untrained = Embedder::from_parts(
            model,
            loaded.config,
            loaded.base,
            adapter_config,
            None,
            loaded.logit_scale,
            device,
        );
        untrained.batch_size = batch_size;
        Ok(Self { untrained })
    }

    /// The backbone with the untrained adapter.
    pub fn untrained(&self) -> Embedder<B> {
        self.share(self.untrained.model.adapter.clone(), None)
    }

    /// The backbone with `adapter` (shares every backbone weight).
    pub fn share(&self, adapter: MrsAdapter<B>, meta: Option<weights::AdapterMeta>) -> Embedder<B> {
        let base = &self.untrained;
        let mut model: ClipModel<B> = base.model.clone();
        model.adapter = adapter;
        // Built field by field: `Embedder::from_parts` would build a new tokenizer per swap.
        Embedder {
            model,
            config: base.config.clone(),
            tokenizer: base.tokenizer.clone(),
            base: base.base.clone(),
            adapter_meta: meta,
            adapter_config: base.adapter_config.clone(),
            logit_scale: base.logit_scale,
            device: base.device.clone(),
            batch_size: base.batch_size,
        }
    }

    /// The backbone with a stored adapter (`None`: untrained), its bytes checked against the
    /// recorded BLAKE3 first.
    pub fn with_adapter(&self, file: Option<&AdapterFile>) -> Result<Embedder<B>, ServeError> {
        let Some(file) = file else {
            return Ok(self.untrained());
        };
        let bytes = std::fs::read(&file.path).map_err(|error| ServeError::Read {
            path: file.path.clone(),
            error,
        })?;
        let found = adapter_id(&bytes);
        if found != file.blake3 {
            return Err(ServeError::Stale {
                path: file.path.clone(),
                expected: file.blake3.clone(),
                found,
            });
        }
        let mut embedder = self.untrained();
        let meta = weights::load_adapter_bytes(
            &mut embedder.model,
            &self.untrained.base,
            &self.untrained.adapter_config,
            bytes,
            &file.path,
        )?;
        embedder.adapter_meta = Some(meta);
        Ok(embedder)
    }

    /// The adapter's shape.
    pub fn adapter_config(&self) -> &AdapterConfig {
        &self.untrained.adapter_config
    }

    /// The backbone's fingerprint and source.
    pub fn base(&self) -> &weights::BaseModel {
        &self.untrained.base
    }

    pub fn image_size(&self) -> usize {
        self.untrained.image_size()
    }

    pub fn projection_dim(&self) -> usize {
        self.untrained.config.projection_dim
    }

    pub fn device(&self) -> &B::Device {
        &self.untrained.device
    }
}

/// `embedder`'s model on the autodiff backend `AB` for training: the backbone's weights are
/// shared (wrapped, not copied) and frozen; only the adapter will get gradients.
pub fn trainable<AB: TrainBackend>(model: ClipModel<AB::InnerBackend>) -> ClipModel<AB> {
    use burn::module::AutodiffModule;
    let model = ClipModel::<AB>::from_inner(model).freeze_backbone();
    let adapter = model.adapter;
    let grad = |linear: burn::nn::Linear<AB>| burn::nn::Linear {
        weight: linear.weight.set_require_grad(true),
        bias: linear.bias.map(|bias| bias.set_require_grad(true)),
    };
    ClipModel {
        adapter: MrsAdapter {
            visual_down: grad(adapter.visual_down),
            text_down: grad(adapter.text_down),
            visual_up: grad(adapter.visual_up),
            text_up: grad(adapter.text_up),
            shared_up: grad(adapter.shared_up),
            dropout: adapter.dropout,
        },
        ..model
    }
}

/// What serves queries: an adapter version on the shared backbone. The index version has the
/// same number, so a query encoded with it searches vectors made with it.
pub struct ServingModel<B: Backend> {
    pub version: u64,
    /// BLAKE3 of the adapter (`untrained` for plain CLIP).
    pub adapter_id: String,
    pub embedder: Embedder<B>,
    pub metrics: std::collections::BTreeMap<String, f64>,
}

/// The live serving model. Only the version owner (`versions`) stores into it; readers take
/// one snapshot per request, so a request never mixes versions.
pub type Live<B> = ArcSwap<ServingModel<B>>;

/// A new live holder.
pub fn live<B: ModelBackend>(model: ServingModel<B>) -> Arc<Live<B>> {
    Arc::new(ArcSwap::from_pointee(model))
}
