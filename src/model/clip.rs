//! CLIP vision (ViT) and text towers with the MRS-Adapter in every block.
//!
//! Struct fields mirror the HuggingFace `CLIPModel` checkpoint keys
//! (`vision_model.encoder.layers.3.self_attn.q_proj.weight`, …), so weights load with no
//! key remapping (see `weights.rs`).

use burn::module::Param;
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::{Int, TensorData};

use super::adapter::{Modality, MrsAdapter, TokenPositions, dropout_rows_from};
use super::config::{AdapterConfig, ClipConfig, HiddenAct};
use super::kernels::{KeyRange, ModelBackend, activation, attention, layer_norm as norm, linear};

/// Applies a `Linear` to `[batch, tokens, d_in]` as one `[batch·tokens, d_in]` matmul.
///
/// burn's `Linear` on a 3-D input runs one small matmul per batch row (re-packing the weight
/// each time); a single tall matmul is several times faster on the CPU.
pub fn linear_tokens<B: ModelBackend>(layer: &Linear<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    token_rows(x, |rows| linear(layer, rows))
}

/// `f` applied to `[batch, tokens, d_in]` as the rows `[batch·tokens, d_in]` (one tall
/// product instead of one per batch row); `f` returns `[batch·tokens, d_out]`.
pub fn token_rows<B: Backend>(
    x: Tensor<B, 3>,
    f: impl FnOnce(Tensor<B, 2>) -> Tensor<B, 2>,
) -> Tensor<B, 3> {
    let [batch, tokens, d_input] = x.dims();
    let out = f(x.reshape([batch * tokens, d_input]));
    let d_output = out.dims()[1];
    out.reshape([batch, tokens, d_output])
}

/// Per-call switches of a forward pass. The default is inference.
#[derive(Debug, Clone, Copy, Default)]
pub struct ForwardOptions {
    /// Training: `Some(seed)` turns on the adapter's bottleneck dropout (and the embedding
    /// dropout below); every dropout site draws its mask from a seed derived from this one.
    pub dropout_seed: Option<u64>,
    /// Embedding dropout for the "augmented" views (METHOD.md: 0.2); 0 disables it.
    pub embedding_dropout: f64,
    /// Batch rows before this index skip the embedding dropout: a batch holding the clean
    /// view then the augmented view of the same inputs runs as one forward pass.
    pub embedding_dropout_from_row: usize,
}

impl ForwardOptions {
    /// Seed of dropout site `site` (0 = embeddings, 1 + i = block i's adapter).
    fn site_seed(&self, site: u64) -> Option<u64> {
        self.dropout_seed.map(|seed| mix_seed(seed, site))
    }

    /// The embedding dropout of the augmented views (both towers), on rows
    /// `embedding_dropout_from_row..`; identity at inference.
    fn embedding_dropout_on<B: Backend>(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        match self.site_seed(0) {
            Some(seed) => dropout_rows_from(
                x,
                self.embedding_dropout,
                seed,
                self.embedding_dropout_from_row,
            ),
            None => x,
        }
    }
}

/// Mixes a seed with a counter (SplitMix64 finaliser): independent streams per step, view
/// and dropout site.
pub fn mix_seed(seed: u64, counter: u64) -> u64 {
    let mut z = seed ^ counter.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Multi-head self-attention with HF's projection names.
#[derive(Module, Debug)]
pub struct ClipAttention<B: Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub out_proj: Linear<B>,
    /// Number of heads; `d_model / num_heads` is the head width.
    pub num_heads: usize,
}

impl<B: Backend> ClipAttention<B> {
    fn new(d_model: usize, num_heads: usize, device: &B::Device) -> Self {
        let linear = || LinearConfig::new(d_model, d_model).init(device);
        Self {
            q_proj: linear(),
            k_proj: linear(),
            v_proj: linear(),
            out_proj: linear(),
            num_heads,
        }
    }
}

impl<B: ModelBackend> ClipAttention<B> {
    /// - `x`: `[batch, tokens, d_model]`; returns `[batch, tokens, d_model]`.
    fn forward(&self, x: Tensor<B, 3>, causal: bool) -> Tensor<B, 3> {
        let q = linear_tokens(&self.q_proj, x.clone());
        let k = linear_tokens(&self.k_proj, x.clone());
        let v = linear_tokens(&self.v_proj, x);
        let range = if causal {
            KeyRange::Causal
        } else {
            KeyRange::All
        };
        linear_tokens(&self.out_proj, attention(q, k, v, self.num_heads, &range))
    }

    /// The attention output at one query token per row (`pooled[row]`), attending to every
    /// token (or, when `causal`, to the tokens up to it): what [`Self::forward`] gives at
    /// those positions, for a fraction of the work.
    ///
    /// - `x`: `[batch, tokens, d_model]`; returns `[batch, 1, d_model]`.
    fn forward_at(&self, x: Tensor<B, 3>, pooled: &[usize], causal: bool) -> Tensor<B, 3> {
        let queries = select_tokens(x.clone(), pooled); // [batch, 1, d]
        let q = linear_tokens(&self.q_proj, queries);
        let k = linear_tokens(&self.k_proj, x.clone());
        let v = linear_tokens(&self.v_proj, x);
        let range = if causal {
            KeyRange::UpTo(pooled.to_vec())
        } else {
            KeyRange::All
        };
        linear_tokens(&self.out_proj, attention(q, k, v, self.num_heads, &range))
    }
}

/// Row `b` of the result is token `pooled[b]` of row `b` of `x` (`[batch, tokens, d]` →
/// `[batch, 1, d]`).
fn select_tokens<B: Backend>(x: Tensor<B, 3>, pooled: &[usize]) -> Tensor<B, 3> {
    let [batch, tokens, d_model] = x.dims();
    let rows: Vec<i32> = pooled
        .iter()
        .enumerate()
        .map(|(row, &token)| (row * tokens + token) as i32)
        .collect();
    let rows = Tensor::<B, 1, Int>::from_data(TensorData::new(rows, [batch]), &x.device());
    x.reshape([batch * tokens, d_model])
        .select(0, rows)
        .reshape([batch, 1, d_model])
}

/// The block MLP: `fc2(act(fc1(x)))`.
#[derive(Module, Debug)]
pub struct ClipMlp<B: Backend> {
    pub fc1: Linear<B>,
    pub fc2: Linear<B>,
    #[module(skip)]
    pub activation: HiddenAct,
}

impl<B: ModelBackend> ClipMlp<B> {
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let hidden = linear_tokens(&self.fc1, x);
        linear_tokens(&self.fc2, activation(hidden, self.activation))
    }
}

/// One pre-LN transformer block with the adapter in parallel with the MLP.
#[derive(Module, Debug)]
pub struct ClipEncoderLayer<B: Backend> {
    pub self_attn: ClipAttention<B>,
    pub layer_norm1: LayerNorm<B>,
    pub mlp: ClipMlp<B>,
    pub layer_norm2: LayerNorm<B>,
}

/// The stack of blocks of one tower.
#[derive(Module, Debug)]
pub struct ClipEncoder<B: Backend> {
    pub layers: Vec<ClipEncoderLayer<B>>,
}

/// Geometry of one tower's encoder.
struct EncoderShape {
    d_model: usize,
    intermediate: usize,
    layers: usize,
    heads: usize,
    activation: HiddenAct,
    eps: f64,
}

impl<B: Backend> ClipEncoder<B> {
    fn new(shape: &EncoderShape, device: &B::Device) -> Self {
        let layers = (0..shape.layers)
            .map(|_| ClipEncoderLayer {
                self_attn: ClipAttention::new(shape.d_model, shape.heads, device),
                layer_norm1: layer_norm(shape.d_model, shape.eps, device),
                mlp: ClipMlp {
                    fc1: LinearConfig::new(shape.d_model, shape.intermediate).init(device),
                    fc2: LinearConfig::new(shape.intermediate, shape.d_model).init(device),
                    activation: shape.activation,
                },
                layer_norm2: layer_norm(shape.d_model, shape.eps, device),
            })
            .collect();
        Self { layers }
    }
}

/// What differs between the towers' encoders.
#[derive(Debug, Clone, Copy)]
struct Tower {
    modality: Modality,
    /// Causal attention (the text tower).
    causal: bool,
    /// ε of the tower's LayerNorms.
    eps: f64,
}

impl<B: ModelBackend> ClipEncoder<B> {
    /// Runs every block:
    /// `x = x + attn(ln_1(x)); x = x + mlp(ln_2(x)) + adapter(x, modality)`,
    /// and returns the last block's output at token `pooled[row]` of each row only: nothing
    /// else of the last block is read, so its queries, MLP and adapter run on those tokens
    /// alone (its keys and values still see every token).
    ///
    /// - `x`: `[batch, tokens, d_model]`; returns `[batch, d_model]`.
    fn forward(
        &self,
        mut x: Tensor<B, 3>,
        pooled: &[usize],
        adapter: &MrsAdapter<B>,
        tower: Tower,
        options: ForwardOptions,
    ) -> Tensor<B, 2> {
        let Tower {
            modality,
            causal,
            eps,
        } = tower;
        let [batch, tokens, d_model] = x.dims();
        let last = self.layers.len().saturating_sub(1);
        for (index, layer) in self.layers.iter().enumerate() {
            let normed = norm(&layer.layer_norm1, x.clone(), eps);
            x = if index == last {
                select_tokens(x, pooled) + layer.self_attn.forward_at(normed, pooled, causal)
            } else {
                x + layer.self_attn.forward(normed, causal)
            };
            let seed = options.site_seed(1 + index as u64);
            let at = (index == last).then_some(TokenPositions { tokens, pooled });
            let adapted = adapter.forward_at(x.clone(), modality, seed, at);
            x = x.clone() + layer.mlp.forward(norm(&layer.layer_norm2, x, eps)) + adapted;
        }
        if self.layers.is_empty() {
            x = select_tokens(x, pooled);
        }
        x.reshape([batch, d_model])
    }
}

fn layer_norm<B: Backend>(d_model: usize, eps: f64, device: &B::Device) -> LayerNorm<B> {
    LayerNormConfig::new(d_model).with_epsilon(eps).init(device)
}

/// Token and position embeddings of the text tower.
#[derive(Module, Debug)]
pub struct ClipTextEmbeddings<B: Backend> {
    pub token_embedding: Embedding<B>,
    pub position_embedding: Embedding<B>,
}

/// The text tower (`text_model.*`).
#[derive(Module, Debug)]
pub struct ClipTextTransformer<B: Backend> {
    pub embeddings: ClipTextEmbeddings<B>,
    pub encoder: ClipEncoder<B>,
    pub final_layer_norm: LayerNorm<B>,
    /// ε of every LayerNorm of the tower (burn's `LayerNorm` keeps its own private).
    #[module(skip)]
    pub layer_norm_eps: f64,
}

/// The patch embedding: a stride = kernel convolution without bias, computed as a matmul.
#[derive(Module, Debug)]
pub struct PatchEmbedding<B: Backend> {
    /// `[d_model, channels, patch, patch]`, PyTorch's `Conv2d` layout.
    pub weight: Param<Tensor<B, 4>>,
}

/// Class token, patch and position embeddings of the vision tower.
#[derive(Module, Debug)]
pub struct ClipVisionEmbeddings<B: Backend> {
    /// `[d_model]`
    pub class_embedding: Param<Tensor<B, 1>>,
    pub patch_embedding: PatchEmbedding<B>,
    pub position_embedding: Embedding<B>,
}

/// The vision tower (`vision_model.*`). `pre_layrnorm` is spelled as in HF.
#[derive(Module, Debug)]
pub struct ClipVisionTransformer<B: Backend> {
    pub embeddings: ClipVisionEmbeddings<B>,
    pub pre_layrnorm: LayerNorm<B>,
    pub encoder: ClipEncoder<B>,
    pub post_layernorm: LayerNorm<B>,
    /// ε of every LayerNorm of the tower.
    #[module(skip)]
    pub layer_norm_eps: f64,
}

/// CLIP with one MRS-Adapter shared by all blocks of both towers.
#[derive(Module, Debug)]
pub struct ClipModel<B: Backend> {
    pub text_model: ClipTextTransformer<B>,
    pub vision_model: ClipVisionTransformer<B>,
    /// `[d_vision, projection]` (burn layout), no bias.
    pub visual_projection: Linear<B>,
    /// `[d_text, projection]` (burn layout), no bias.
    pub text_projection: Linear<B>,
    /// The only trainable part.
    pub adapter: MrsAdapter<B>,
}

/// A batch of tokenized captions, ready for the text tower.
#[derive(Debug, Clone)]
pub struct TokenBatch {
    /// Row-major `[batch, seq_len]` token ids, padded with 0.
    pub ids: Vec<i32>,
    /// Index of the first EOT token of each row (the pooled position).
    pub eot_positions: Vec<usize>,
    /// Columns of `ids`: the longest caption of the batch (attention is causal, so padding
    /// beyond it could not change any pooled token).
    pub seq_len: usize,
}

impl TokenBatch {
    pub fn len(&self) -> usize {
        self.eot_positions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.eot_positions.is_empty()
    }
}

impl ClipConfig {
    /// A CLIP with freshly initialised (random) backbone weights and an untrained adapter.
    pub fn init<B: Backend>(&self, adapter: &AdapterConfig, device: &B::Device) -> ClipModel<B> {
        let text = &self.text_config;
        let vision = &self.vision_config;
        let text_shape = EncoderShape {
            d_model: text.hidden_size,
            intermediate: text.intermediate_size,
            layers: text.num_hidden_layers,
            heads: text.num_attention_heads,
            activation: text.hidden_act,
            eps: text.layer_norm_eps,
        };
        let vision_shape = EncoderShape {
            d_model: vision.hidden_size,
            intermediate: vision.intermediate_size,
            layers: vision.num_hidden_layers,
            heads: vision.num_attention_heads,
            activation: vision.hidden_act,
            eps: vision.layer_norm_eps,
        };
        let patch_weight = Tensor::random(
            [
                vision.hidden_size,
                vision.num_channels,
                vision.patch_size,
                vision.patch_size,
            ],
            burn::tensor::Distribution::Normal(0.0, 0.02),
            device,
        );
        ClipModel {
            text_model: ClipTextTransformer {
                embeddings: ClipTextEmbeddings {
                    token_embedding: EmbeddingConfig::new(text.vocab_size, text.hidden_size)
                        .init(device),
                    position_embedding: EmbeddingConfig::new(
                        text.max_position_embeddings,
                        text.hidden_size,
                    )
                    .init(device),
                },
                encoder: ClipEncoder::new(&text_shape, device),
                final_layer_norm: layer_norm(text.hidden_size, text.layer_norm_eps, device),
                layer_norm_eps: text.layer_norm_eps,
            },
            vision_model: ClipVisionTransformer {
                embeddings: ClipVisionEmbeddings {
                    class_embedding: Param::from_tensor(Tensor::random(
                        [vision.hidden_size],
                        burn::tensor::Distribution::Normal(0.0, 0.02),
                        device,
                    )),
                    patch_embedding: PatchEmbedding {
                        weight: Param::from_tensor(patch_weight),
                    },
                    position_embedding: EmbeddingConfig::new(
                        self.vision_positions(),
                        vision.hidden_size,
                    )
                    .init(device),
                },
                pre_layrnorm: layer_norm(vision.hidden_size, vision.layer_norm_eps, device),
                encoder: ClipEncoder::new(&vision_shape, device),
                post_layernorm: layer_norm(vision.hidden_size, vision.layer_norm_eps, device),
                layer_norm_eps: vision.layer_norm_eps,
            },
            visual_projection: LinearConfig::new(vision.hidden_size, self.projection_dim)
                .with_bias(false)
                .init(device),
            text_projection: LinearConfig::new(text.hidden_size, self.projection_dim)
                .with_bias(false)
                .init(device),
            adapter: adapter.init(self, device),
        }
    }
}

impl<B: ModelBackend> ClipModel<B> {
    /// Projected image embeddings (not normalized).
    ///
    /// - `patches`: `[batch, patches, channels * patch * patch]`, CLIP-normalized pixels cut
    ///   into patches on the host by [`super::preprocess::patchify`] (a stride = kernel
    ///   convolution is then one matmul; burn-flex's 6-D permute would cost more than the
    ///   whole tiny model)
    /// - returns `[batch, projection_dim]`
    pub fn image_features(&self, patches: Tensor<B, 3>, options: ForwardOptions) -> Tensor<B, 2> {
        let [batch, num_patches, patch_len] = patches.dims();
        let embeddings = &self.vision_model.embeddings;
        let weight = embeddings.patch_embedding.weight.val(); // [d, c, p, p]
        let d_model = weight.dims()[0];
        let weight = weight.reshape([d_model, patch_len]).transpose(); // [c*p*p, d]
        let patches = patches
            .reshape([batch * num_patches, patch_len])
            .matmul(weight)
            .reshape([batch, num_patches, d_model]); // [batch, patches, d]
        let class = embeddings
            .class_embedding
            .val()
            .reshape([1, 1, d_model])
            .expand([batch, 1, d_model]);
        let tokens = Tensor::cat(vec![class, patches], 1); // [batch, patches + 1, d]
        let positions = embeddings.position_embedding.weight.val().unsqueeze::<3>(); // [1, patches + 1, d]
        let eps = self.vision_model.layer_norm_eps;
        let x = norm(&self.vision_model.pre_layrnorm, tokens + positions, eps);
        let x = options.embedding_dropout_on(x);
        let cls = vec![0; batch];
        let cls = self.vision_model.encoder.forward(
            x,
            &cls,
            &self.adapter,
            Tower {
                modality: Modality::Vision,
                causal: false,
                eps,
            },
            options,
        ); // [batch, d]
        let pooled = norm(&self.vision_model.post_layernorm, cls, eps);
        self.visual_projection.forward(pooled)
    }

    /// Projected text embeddings (not normalized), pooled at each caption's first EOT.
    ///
    /// Returns `[batch, projection_dim]`.
    pub fn text_features(&self, tokens: &TokenBatch, options: ForwardOptions) -> Tensor<B, 2> {
        let device = self.visual_projection.weight.device();
        let batch = tokens.len();
        let seq_len = tokens.seq_len;
        let ids = Tensor::<B, 2, Int>::from_data(
            TensorData::new(tokens.ids.clone(), [batch, seq_len]),
            &device,
        );
        let embeddings = &self.text_model.embeddings;
        let x = embeddings.token_embedding.forward(ids); // [batch, seq, d]
        let positions = embeddings
            .position_embedding
            .weight
            .val()
            .slice(0..seq_len)
            .unsqueeze::<3>(); // [1, seq, d]
        let x = x + positions;
        let x = options.embedding_dropout_on(x);
        let pooled = self.text_model.encoder.forward(
            x,
            &tokens.eot_positions,
            &self.adapter,
            Tower {
                modality: Modality::Text,
                causal: true,
                eps: self.text_model.layer_norm_eps,
            },
            options,
        ); // [batch, d]
        let pooled = norm(
            &self.text_model.final_layer_norm,
            pooled,
            self.text_model.layer_norm_eps,
        );
        self.text_projection.forward(pooled)
    }

    /// Freezes the backbone: only adapter parameters will receive gradients.
    pub fn freeze_backbone(self) -> Self {
        Self {
            text_model: self.text_model.no_grad(),
            vision_model: self.vision_model.no_grad(),
            visual_projection: self.visual_projection.no_grad(),
            text_projection: self.text_projection.no_grad(),
            adapter: self.adapter,
        }
    }
}

/// Row-wise L2 normalization (`[batch, dim]`).
pub fn l2_normalize<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    let norm = x.clone().powi_scalar(2).sum_dim(1).sqrt().clamp_min(1e-12); // [batch, 1]
    x / norm
}
