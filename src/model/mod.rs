//! The model: frozen CLIP towers, the MRS-Adapter, the HMMC loss, tokenization, image
//! preprocessing, checkpoint loading, device choice, and a batched [`Embedder`].

pub mod adapter;
pub mod clip;
pub mod config;
pub mod device;
pub mod hub;
pub mod kernels;
pub mod loss;
pub mod openclip;
pub mod preprocess;
pub mod tokenizer;
pub mod weights;

use crate::model::kernels::ModelBackend;
use std::path::Path;
use std::sync::Arc;

use burn::prelude::*;
use burn::tensor::TensorData;

pub use adapter::{Modality, MrsAdapter};
pub use clip::{ClipModel, ForwardOptions, TokenBatch, l2_normalize};
pub use config::{AdapterConfig, ClipConfig};
pub use loss::{LossConfig, LossKind};
pub use tokenizer::ClipTokenizer;
pub use weights::{AdapterMeta, BaseModel, LoadedClip, WeightsError};

/// Default number of inputs per forward pass when embedding.
pub const DEFAULT_EMBED_BATCH: usize = 32;

impl AdapterConfig {
    /// The paper's adapter when it fits the backbone; for tiny test backbones narrower than
    /// 64 channels, a proportionally smaller one (bottleneck d/2, shared width d/4).
    pub fn default_for(clip: &ClipConfig) -> Self {
        let default = Self::default();
        if default.validate_for(clip).is_ok() {
            return default;
        }
        let narrowest = clip
            .text_config
            .hidden_size
            .min(clip.vision_config.hidden_size);
        Self {
            bottleneck: (narrowest / 2).max(1),
            shared_width: (narrowest / 4).max(1),
            ..default
        }
    }
}

/// A CLIP (+ adapter) ready to embed images and captions in batches, L2-normalized.
pub struct Embedder<B: Backend> {
    pub model: ClipModel<B>,
    pub config: ClipConfig,
    pub tokenizer: Arc<ClipTokenizer>,
    pub base: BaseModel,
    /// Adapter metadata when a checkpoint was loaded; `None` for the untrained adapter.
    pub adapter_meta: Option<AdapterMeta>,
    pub adapter_config: AdapterConfig,
    pub logit_scale: f32,
    pub device: B::Device,
    /// Inputs per forward pass.
    pub batch_size: usize,
}

impl<B: ModelBackend> Embedder<B> {
    /// Loads the backbone from `model_dir` and, if given, an adapter checkpoint (whose
    /// metadata decides the adapter shape); the blocks' products run in `precision`.
    pub fn load(
        model_dir: &Path,
        adapter: Option<&Path>,
        precision: device::BackbonePrecision,
        device: &B::Device,
    ) -> Result<Self, WeightsError> {
        let clip_config = ClipConfig::from_model_dir(model_dir)?;
        let (adapter_config, meta) = match adapter {
            Some(path) => {
                let meta = weights::read_adapter_meta(path)?;
                (meta.adapter.clone(), Some(path))
            }
            None => (AdapterConfig::default_for(&clip_config), None),
        };
        let loaded = weights::load_clip::<B>(model_dir, &adapter_config, device)?;
        let mut model = loaded.model.with_backbone_precision(precision, device)?;
        let adapter_meta = match meta {
            Some(path) => Some(weights::load_adapter(
                &mut model,
                &loaded.base,
                &adapter_config,
                path,
            )?),
            None => None,
        };
        Ok(Self::from_parts(
            model,
            loaded.config,
            loaded.base,
            adapter_config,
            adapter_meta,
            loaded.logit_scale,
            device,
        ))
    }

    pub fn from_parts(
        model: ClipModel<B>,
        config: ClipConfig,
        base: BaseModel,
        adapter_config: AdapterConfig,
        adapter_meta: Option<AdapterMeta>,
        logit_scale: f32,
        device: &B::Device,
    ) -> Self {
        let tokenizer = Arc::new(ClipTokenizer::new(
            config.text_config.max_position_embeddings,
        ));
        Self {
            model,
            config,
            tokenizer,
            base,
            adapter_meta,
            adapter_config,
            logit_scale,
            device: device.clone(),
            batch_size: DEFAULT_EMBED_BATCH,
        }
    }

    /// Side length of the square model input.
    pub fn image_size(&self) -> usize {
        self.config.vision_config.image_size
    }

    /// Adapter version (0 for the untrained adapter).
    pub fn adapter_version(&self) -> u64 {
        self.adapter_meta.as_ref().map_or(0, |meta| meta.version)
    }

    /// Preprocessed images (`[3, size, size]` each) as one `[n, patches, 3·p·p]` tensor.
    pub fn pixel_tensor(&self, images: &[&[f32]]) -> Tensor<B, 3> {
        pixel_tensor(
            images,
            self.image_size(),
            self.config.vision_config.patch_size,
            &self.device,
        )
    }

    /// Inputs per concurrent forward pass: each batch is split across the rayon threads,
    /// because burn-flex leaves a core idle during its single-threaded element-wise ops
    /// (measured at ViT-B/32 on 2 cores: +38 % images/s).
    fn sub_batch(&self) -> usize {
        self.batch_size
            .max(1)
            .div_ceil(rayon::current_num_threads().max(1))
    }

    /// Normalized embeddings of preprocessed images.
    pub fn embed_pixels(&self, images: &[&[f32]]) -> Vec<Vec<f32>> {
        use rayon::prelude::*;
        images
            .par_chunks(self.sub_batch())
            .map(|chunk| {
                let features = self
                    .model
                    .image_features(self.pixel_tensor(chunk), ForwardOptions::default());
                rows(l2_normalize(features))
            })
            .collect::<Vec<_>>()
            .into_iter()
            .flatten()
            .collect()
    }

    /// Normalized embeddings of captions (batched by length to limit padding).
    pub fn embed_texts<S: AsRef<str>>(&self, texts: &[S]) -> Vec<Vec<f32>> {
        let ids: Vec<Vec<i32>> = texts
            .iter()
            .map(|t| self.tokenizer.encode(t.as_ref()))
            .collect();
        self.embed_token_ids(&ids)
    }

    /// Normalized embeddings of already tokenized captions.
    pub fn embed_token_ids(&self, ids: &[Vec<i32>]) -> Vec<Vec<f32>> {
        use rayon::prelude::*;
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&i| ids[i].len());
        let embedded: Vec<Vec<Vec<f32>>> = order
            .par_chunks(self.sub_batch())
            .map(|chunk| {
                let batch: Vec<Vec<i32>> = chunk.iter().map(|&i| ids[i].clone()).collect();
                let tokens = tokenizer::batch_from_ids(&batch);
                let features = self.model.text_features(&tokens, ForwardOptions::default());
                rows(l2_normalize(features))
            })
            .collect();
        let mut out = vec![Vec::new(); ids.len()];
        for (&index, row) in order.iter().zip(embedded.into_iter().flatten()) {
            out[index] = row;
        }
        out
    }
}

/// Stacks preprocessed `[3, size, size]` images into the `[n, patches, 3·p·p]` input of
/// [`ClipModel::image_features`].
pub fn pixel_tensor<B: ModelBackend>(
    images: &[&[f32]],
    size: usize,
    patch: usize,
    device: &B::Device,
) -> Tensor<B, 3> {
    let grid = size / patch;
    let row_len = 3 * patch * patch;
    let mut flat = Vec::with_capacity(images.len() * grid * grid * row_len);
    for image in images {
        flat.extend(preprocess::patchify(image, size, patch));
    }
    Tensor::from_data(
        TensorData::new(flat, [images.len(), grid * grid, row_len]),
        device,
    )
}

/// Splits a `[n, dim]` tensor into rows.
pub fn rows<B: ModelBackend>(tensor: Tensor<B, 2>) -> Vec<Vec<f32>> {
    let [_, dim] = tensor.dims();
    let data = tensor
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("float tensor");
    data.chunks(dim.max(1)).map(<[f32]>::to_vec).collect()
}
