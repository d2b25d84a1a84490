//! Adapter training: one step of HMMC on a batch, with the backbone frozen and Adam on the
//! adapter only. The offline trainer and the daemon's continual trainer both drive this.

use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{Adam, AdamConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use serde::{Deserialize, Serialize};

pub mod continual;
pub mod gate;
pub mod offline;
pub mod trigger;

use crate::model::clip::mix_seed;
use crate::model::kernels::TrainBackend;
use crate::model::tokenizer;
use crate::model::{ClipModel, ForwardOptions, LossConfig, TokenBatch, l2_normalize};

/// Embedding dropout of the augmented views (METHOD.md).
pub const EMBEDDING_DROPOUT: f64 = 0.2;

/// Loss values of one step (host floats, for logs).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepLosses {
    pub total: f32,
    pub image_text: f32,
    pub image_image: f32,
    pub text_text: f32,
}

impl StepLosses {
    pub fn is_finite(&self) -> bool {
        self.total.is_finite()
            && self.image_text.is_finite()
            && self.image_image.is_finite()
            && self.text_text.is_finite()
    }
}

/// A CLIP whose backbone is frozen, its adapter and the Adam state.
pub struct AdapterTrainer<B: TrainBackend> {
    /// `Some` except transiently inside [`AdapterTrainer::step`].
    pub(crate) model: Option<ClipModel<B>>,
    pub(crate) optimizer: OptimizerAdaptor<Adam, ClipModel<B>, B>,
    pub loss: LossConfig,
    /// Embedding dropout of the augmented views.
    pub embedding_dropout: f64,
}

/// Adam as in the reference recipe (PyTorch defaults: β = (0.9, 0.999), ε = 1e-8, no decay).
pub fn adam() -> AdamConfig {
    AdamConfig::new().with_epsilon(1e-8)
}

impl<B: TrainBackend> AdapterTrainer<B> {
    /// Freezes the backbone of `model` and sets up Adam for the adapter.
    pub fn new(model: ClipModel<B>, loss: LossConfig) -> Self {
        Self {
            model: Some(model.freeze_backbone()),
            optimizer: adam().init(),
            loss,
            embedding_dropout: EMBEDDING_DROPOUT,
        }
    }

    pub fn model(&self) -> &ClipModel<B> {
        self.model.as_ref().expect("model present between steps")
    }

    /// The inference copy (no autodiff) of the current model.
    pub fn inference_model(&self) -> ClipModel<B::InnerBackend> {
        use burn::module::AutodiffModule;
        self.model().valid()
    }

    /// One optimisation step on aligned images and captions (row i of each is a pair).
    ///
    /// - `pixels`: `[n, patches, 3·p·p]` (see [`crate::model::pixel_tensor`]); `tokens`: `n`
    ///   captions.
    /// - `seed`: all dropout masks of the step derive from it (host RNGs, not burn's global
    ///   one), so a step is reproducible bit for bit.
    pub fn step(
        &mut self,
        pixels: Tensor<B, 3>,
        tokens: &TokenBatch,
        lr: f64,
        seed: u64,
    ) -> StepLosses {
        let model = self.model.take().expect("model present between steps");
        // Clean and augmented views of the same inputs run as one forward pass of twice the
        // batch (rows n.. get the embedding dropout): bigger matmuls, half the per-op
        // overhead. Passes stay sequential so gradients accumulate in a fixed order and a
        // seeded run (and `--resume`) is bit-reproducible.
        let n = tokens.len();
        let options = |stream: u64| ForwardOptions {
            dropout_seed: Some(mix_seed(seed, stream)),
            embedding_dropout: self.embedding_dropout,
            embedding_dropout_from_row: n,
        };
        let images = l2_normalize(
            model.image_features(Tensor::cat(vec![pixels.clone(), pixels], 0), options(0)),
        ); // [2n, dim]
        let doubled = tokenizer::repeat_batch(tokens);
        let texts = l2_normalize(model.text_features(&doubled, options(1))); // [2n, dim]
        let dim = images.dims()[1];
        let image = images.clone().slice([0..n, 0..dim]);
        let image_aug = images.slice([n..2 * n, 0..dim]);
        let text = texts.clone().slice([0..n, 0..dim]);
        let text_aug = texts.slice([n..2 * n, 0..dim]);
        let terms = self.loss.hmmc(image, text, image_aug, text_aug);
        let scalar = |t: &Tensor<B, 1>| t.clone().into_scalar().elem::<f32>();
        let losses = StepLosses {
            total: scalar(&terms.total),
            image_text: scalar(&terms.image_text),
            image_image: scalar(&terms.image_image),
            text_text: scalar(&terms.text_text),
        };
        let gradients = terms.total.backward();
        let gradients = GradientsParams::from_grads(gradients, &model);
        self.model = Some(self.optimizer.step(lr, model, gradients));
        losses
    }

    /// Gives back the trained model.
    pub fn into_model(self) -> ClipModel<B> {
        self.model.expect("model present between steps")
    }
}
