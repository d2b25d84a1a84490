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
use super::device::{BackbonePrecision, PrecisionError};
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
    /// - `x`: the rows of `layout` (`[batch, tokens, d_model]`, or `[1, rows, d_model]`
    ///   packed); returns the same shape.
    fn forward(&self, x: Tensor<B, 3>, causal: bool, layout: &Layout<B>) -> Tensor<B, 3> {
        let q = linear_tokens(&self.q_proj, x.clone());
        let k = linear_tokens(&self.k_proj, x.clone());
        let v = linear_tokens(&self.v_proj, x);
        let range = if causal {
            KeyRange::Causal
        } else {
            KeyRange::All
        };
        let context = match layout {
            Layout::Dense { .. } => attention(q, k, v, self.num_heads, &range),
            Layout::Packed(packed) => packed.unpad(attention(
                packed.pad(q),
                packed.pad(k),
                packed.pad(v),
                self.num_heads,
                &range,
            )),
        };
        linear_tokens(&self.out_proj, context)
    }

    /// The attention output at each sequence's pooled token, attending to every token (or,
    /// when `causal`, to the tokens up to it): what [`Self::forward`] gives at those
    /// positions, for a fraction of the work.
    ///
    /// - `x`: the rows of `layout`; returns `[batch, 1, d_model]`.
    fn forward_at(&self, x: Tensor<B, 3>, causal: bool, layout: &Layout<B>) -> Tensor<B, 3> {
        let queries = layout.pooled_rows(x.clone()); // [batch, 1, d]
        let q = linear_tokens(&self.q_proj, queries);
        let k = linear_tokens(&self.k_proj, x.clone());
        let v = linear_tokens(&self.v_proj, x);
        let (k, v) = match layout {
            Layout::Dense { .. } => (k, v),
            Layout::Packed(packed) => (packed.pad(k), packed.pad(v)),
        };
        let range = if causal {
            KeyRange::UpTo(layout.pooled().to_vec())
        } else {
            KeyRange::All
        };
        linear_tokens(&self.out_proj, attention(q, k, v, self.num_heads, &range))
    }
}

/// An index tensor of `rows`.
fn index<B: Backend>(rows: &[usize], device: &B::Device) -> Tensor<B, 1, Int> {
    let rows: Vec<i32> = rows.iter().map(|&row| row as i32).collect();
    let len = rows.len();
    Tensor::from_data(TensorData::new(rows, [len]), device)
}

/// The rows `rows` of `x` (taken as `[rows, d]`), shaped `[sequences, per_sequence, d]`.
fn gather_rows<B: Backend>(
    x: Tensor<B, 3>,
    rows: &Tensor<B, 1, Int>,
    [sequences, per_sequence]: [usize; 2],
) -> Tensor<B, 3> {
    let [batch, tokens, d_model] = x.dims();
    x.reshape([batch * tokens, d_model])
        .select(0, rows.clone())
        .reshape([sequences, per_sequence, d_model])
}

/// How a tower's token rows are laid out.
enum Layout<'a, B: Backend> {
    /// `[batch, tokens, d]`: every sequence has all `tokens` tokens (the vision tower).
    Dense {
        tokens: usize,
        /// The pooled token of each sequence.
        pooled: &'a [usize],
    },
    /// The captions of a batch packed one after another as `[1, rows, d]`, each only up to
    /// its pooled end token: under the causal mask nothing after it reaches the pooled
    /// output, so the padding of shorter captions is never computed.
    Packed(&'a Packing<B>),
}

impl<B: Backend> Layout<'_, B> {
    /// The pooled token of each sequence, counted from its start.
    fn pooled(&self) -> &[usize] {
        match self {
            Layout::Dense { pooled, .. } => pooled,
            Layout::Packed(packed) => &packed.pooled,
        }
    }

    /// Each sequence's pooled row of `x` (the rows of this layout): `[batch, 1, d]`.
    fn pooled_rows(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        match self {
            Layout::Dense { .. } => {
                let rows = index(&self.pooled_positions(), &x.device());
                gather_rows(x, &rows, [self.pooled().len(), 1])
            }
            Layout::Packed(packed) => gather_rows(x, &packed.pooled_index, [packed.batch, 1]),
        }
    }

    /// The padded position of each row (what the adapter's dropout masks are drawn for),
    /// with the size of the padded layout; `None` when the rows are the padded layout.
    fn positions(&self) -> Option<TokenPositions<'_>> {
        match self {
            Layout::Dense { .. } => None,
            Layout::Packed(packed) => Some(TokenPositions {
                padded: self.padded(),
                rows: &packed.rows,
            }),
        }
    }

    /// Tokens per sequence of the padded layout.
    fn tokens(&self) -> usize {
        match self {
            Layout::Dense { tokens, .. } => *tokens,
            Layout::Packed(packed) => packed.tokens,
        }
    }

    /// Tokens of the whole padded layout (`batch · tokens`).
    fn padded(&self) -> usize {
        self.pooled().len() * self.tokens()
    }

    /// Padded positions of the pooled tokens (`b · tokens + pooled[b]`).
    fn pooled_positions(&self) -> Vec<usize> {
        let tokens = self.tokens();
        self.pooled()
            .iter()
            .enumerate()
            .map(|(row, &token)| row * tokens + token)
            .collect()
    }
}

/// The index maps between a padded `[batch, tokens]` batch of captions and its packed rows.
struct Packing<B: Backend> {
    batch: usize,
    /// The padded length (the batch's longest caption).
    tokens: usize,
    /// Pooled (end) token of each caption; caption `b` keeps tokens `0..=pooled[b]`.
    pooled: Vec<usize>,
    /// The padded position `b · tokens + t` of each packed row.
    rows: Vec<usize>,
    /// `rows` as an index tensor (padded → packed).
    pack_index: Tensor<B, 1, Int>,
    /// For each padded position, the packed row it reads: its own token, or for padding
    /// the caption's end token (a key no query of the caption sees, a query whose output
    /// is dropped, so its gradients are exact zeros).
    pad_index: Tensor<B, 1, Int>,
    /// The packed row of each caption's pooled token.
    pooled_index: Tensor<B, 1, Int>,
}

impl<B: Backend> Packing<B> {
    fn new(tokens: usize, pooled: &[usize], device: &B::Device) -> Self {
        let batch = pooled.len();
        let mut rows = Vec::new();
        let mut pad = Vec::with_capacity(batch * tokens);
        let mut pooled_rows = Vec::with_capacity(batch);
        for (b, &end) in pooled.iter().enumerate() {
            assert!(end < tokens, "pooled token {end} outside {tokens} tokens");
            let start = rows.len();
            rows.extend((0..=end).map(|t| b * tokens + t));
            pad.extend((0..tokens).map(|t| start + t.min(end)));
            pooled_rows.push(start + end);
        }
        Self {
            batch,
            tokens,
            pooled: pooled.to_vec(),
            pack_index: index(&rows, device),
            rows,
            pad_index: index(&pad, device),
            pooled_index: index(&pooled_rows, device),
        }
    }

    /// `[batch, tokens, d]` → the packed `[1, rows, d]`.
    fn pack(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        gather_rows(x, &self.pack_index, [1, self.rows.len()])
    }

    /// The packed `[1, rows, d]` → `[batch, tokens, d]` (padding repeats each end token).
    fn pad(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        gather_rows(x, &self.pad_index, [self.batch, self.tokens])
    }

    /// `[batch, tokens, d]` → the packed rows (the inverse of [`Self::pad`] on real tokens).
    fn unpad(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.pack(x)
    }
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
    /// and returns the last block's output at each sequence's pooled token only: nothing
    /// else of the last block is read, so its queries, MLP and adapter run on those tokens
    /// alone (its keys and values still see every token).
    ///
    /// - `x`: the rows of `layout`; returns `[batch, d_model]`.
    fn forward(
        &self,
        mut x: Tensor<B, 3>,
        layout: &Layout<B>,
        adapter: &MrsAdapter<B>,
        tower: Tower,
        options: ForwardOptions,
    ) -> Tensor<B, 2> {
        let Tower {
            modality,
            causal,
            eps,
        } = tower;
        let d_model = x.dims()[2];
        let batch = layout.pooled().len();
        let pooled_positions = layout.pooled_positions();
        let last = self.layers.len().saturating_sub(1);
        for (index, layer) in self.layers.iter().enumerate() {
            let normed = norm(&layer.layer_norm1, x.clone(), eps);
            x = if index == last {
                layout.pooled_rows(x) + layer.self_attn.forward_at(normed, causal, layout)
            } else {
                x + layer.self_attn.forward(normed, causal, layout)
            };
            let seed = options.site_seed(1 + index as u64);
            let at = if index == last {
                Some(TokenPositions {
                    padded: layout.padded(),
                    rows: &pooled_positions,
                })
            } else {
                layout.positions()
            };
            let adapted = adapter.forward_at(x.clone(), modality, seed, at);
            x = x.clone() + layer.mlp.forward(norm(&layer.layer_norm2, x, eps)) + adapted;
        }
        if self.layers.is_empty() {
            x = layout.pooled_rows(x);
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
            &Layout::Dense {
                tokens: num_patches + 1,
                pooled: &cls,
            },
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
    ///
    /// The captions run packed (each only up to its end token, see [`Layout::Packed`]).
    pub fn text_features(&self, tokens: &TokenBatch, options: ForwardOptions) -> Tensor<B, 2> {
        self.text_features_as(tokens, options, true)
    }

    /// [`Self::text_features`], packed or, with `packed` false, every caption padded to the
    /// batch's longest (the reference the packing is tested against).
    fn text_features_as(
        &self,
        tokens: &TokenBatch,
        options: ForwardOptions,
        packed: bool,
    ) -> Tensor<B, 2> {
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
        let packing = packed.then(|| Packing::new(seq_len, &tokens.eot_positions, &device));
        let (x, layout) = match &packing {
            Some(packing) => (packing.pack(x), Layout::Packed(packing)),
            None => (
                x,
                Layout::Dense {
                    tokens: seq_len,
                    pooled: &tokens.eot_positions,
                },
            ),
        };
        let pooled = self.text_model.encoder.forward(
            x,
            &layout,
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

    /// Stores the frozen blocks' weights (q/k/v/out projections, MLP layers) in `precision`,
    /// so that their products run in it ([`BackbonePrecision`]); biases, LayerNorms,
    /// embeddings, projections and the adapter stay f32. The narrowed weights are frozen. A
    /// precision that `device` cannot compute in is refused.
    pub fn with_backbone_precision(
        self,
        precision: BackbonePrecision,
        device: &B::Device,
    ) -> Result<Self, PrecisionError> {
        precision.check::<B>(device)?;
        let Some(dtype) = precision.narrow_dtype() else {
            return Ok(self);
        };
        let narrow = |layer: Linear<B>| Linear {
            weight: layer
                .weight
                .map(|w| w.detach().cast(dtype).set_require_grad(false)),
            ..layer
        };
        let narrow_encoder = |encoder: ClipEncoder<B>| ClipEncoder {
            layers: encoder
                .layers
                .into_iter()
                .map(|layer| ClipEncoderLayer {
                    self_attn: ClipAttention {
                        q_proj: narrow(layer.self_attn.q_proj),
                        k_proj: narrow(layer.self_attn.k_proj),
                        v_proj: narrow(layer.self_attn.v_proj),
                        out_proj: narrow(layer.self_attn.out_proj),
                        num_heads: layer.self_attn.num_heads,
                    },
                    mlp: ClipMlp {
                        fc1: narrow(layer.mlp.fc1),
                        fc2: narrow(layer.mlp.fc2),
                        activation: layer.mlp.activation,
                    },
                    ..layer
                })
                .collect(),
        };
        let mut model = self;
        model.text_model.encoder = narrow_encoder(model.text_model.encoder);
        model.vision_model.encoder = narrow_encoder(model.vision_model.encoder);
        Ok(model)
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

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::module::AutodiffModule;
    use burn::tensor::{Distribution, Tolerance};

    type AB = Autodiff<Flex>;

    /// A tiny CLIP (the tiny-clip fixture's text shape, 3 layers) with a non-zero adapter
    /// (its up projections start at zero, which would hide the adapter's gradients).
    fn tiny_model() -> ClipModel<AB> {
        let device = &Default::default();
        let config: ClipConfig = serde_json::from_str(
            r#"{"projection_dim": 24,
                "text_config": {"hidden_size": 32, "intermediate_size": 64,
                                "num_attention_heads": 2, "num_hidden_layers": 3},
                "vision_config": {"hidden_size": 48, "intermediate_size": 96,
                                  "num_attention_heads": 2, "num_hidden_layers": 2,
                                  "image_size": 64, "patch_size": 32}}"#,
        )
        .expect("tiny config");
        let adapter = AdapterConfig {
            bottleneck: 8,
            shared_width: 8,
            dropout: 0.5,
        };
        let mut model = config.init::<AB>(&adapter, device).freeze_backbone();
        let random = |linear: &Linear<AB>| {
            let dims = linear.weight.dims();
            Param::from_tensor(Tensor::random(dims, Distribution::Normal(0.0, 0.5), device))
        };
        model.adapter.text_up.weight = random(&model.adapter.text_up);
        model.adapter.shared_up.weight = random(&model.adapter.shared_up);
        model
    }

    /// Captions of 3, 7, 2 and 5 tokens (padded to 7), each ending in its EOT.
    fn ragged_batch() -> TokenBatch {
        let captions: Vec<Vec<i32>> = [3usize, 7, 2, 5]
            .iter()
            .enumerate()
            .map(|(row, &len)| {
                let mut ids: Vec<i32> = (0..len as i32 - 1)
                    .map(|t| 49406 - 1 - 97 * row as i32 - 13 * t)
                    .collect();
                ids[0] = 49406;
                ids.push(49407);
                ids
            })
            .collect();
        crate::model::tokenizer::batch_from_ids(&captions)
    }

    /// The adapter's text and shared gradients after backward of a fixed projection of the
    /// features.
    fn features_and_grads(
        model: &ClipModel<AB>,
        tokens: &TokenBatch,
        options: ForwardOptions,
        packed: bool,
    ) -> (Tensor<Flex, 2>, Vec<Tensor<Flex, 2>>) {
        let features = model.text_features_as(tokens, options, packed);
        let [rows, dim] = features.dims();
        let weights: Vec<f32> = (0..rows * dim)
            .map(|i| ((i * 7 % 11) as f32 - 5.0) / 5.0)
            .collect();
        let weights =
            Tensor::<AB, 2>::from_data(TensorData::new(weights, [rows, dim]), &features.device());
        let grads = (features.clone() * weights).sum().backward();
        let adapter = &model.adapter;
        let grad_of = |linear: &Linear<AB>| linear.weight.grad(&grads).expect("adapter gradient");
        (
            features.inner(),
            vec![
                grad_of(&adapter.text_down),
                grad_of(&adapter.text_up),
                grad_of(&adapter.shared_up),
            ],
        )
    }

    #[test]
    fn packed_captions_match_the_padded_batch_with_the_same_dropout() {
        let model = tiny_model();
        let tokens = ragged_batch();
        assert_eq!(tokens.seq_len, 7);
        for options in [
            ForwardOptions::default(),
            ForwardOptions {
                dropout_seed: Some(41),
                embedding_dropout: 0.2,
                embedding_dropout_from_row: 2,
            },
        ] {
            let (packed, packed_grads) = features_and_grads(&model, &tokens, options, true);
            let (padded, padded_grads) = features_and_grads(&model, &tokens, options, false);
            packed
                .to_data()
                .assert_approx_eq::<f32>(&padded.to_data(), Tolerance::absolute(1e-5));
            for (packed, padded) in packed_grads.iter().zip(&padded_grads) {
                assert!(
                    padded.clone().abs().max().into_scalar() > 1e-3,
                    "a gradient to compare"
                );
                packed
                    .to_data()
                    .assert_approx_eq::<f32>(&padded.to_data(), Tolerance::absolute(1e-5));
            }
        }
        // The dropout masks matter: another seed gives other features.
        let other = ForwardOptions {
            dropout_seed: Some(42),
            ..ForwardOptions::default()
        };
        let (seeded, _) = features_and_grads(&model, &tokens, other, true);
        let (plain, _) = features_and_grads(&model, &tokens, ForwardOptions::default(), true);
        let difference = (seeded - plain).abs().max().into_scalar();
        assert!(difference > 1e-4, "dropout changed nothing ({difference})");
    }

    #[test]
    fn a_caption_gives_the_same_features_alone_and_packed_with_others() {
        let model = tiny_model();
        let tokens = ragged_batch();
        let batch = model.text_features(&tokens, ForwardOptions::default());
        for row in 0..tokens.len() {
            let len = tokens.eot_positions[row] + 1;
            let start = row * tokens.seq_len;
            let alone =
                crate::model::tokenizer::batch_from_ids(&[tokens.ids[start..start + len].to_vec()]);
            let features = model.text_features(&alone, ForwardOptions::default());
            features.inner().to_data().assert_approx_eq::<f32>(
                &batch.clone().inner().slice(row..row + 1).to_data(),
                Tolerance::absolute(1e-5),
            );
        }
    }

    /// The difference's norm relative to the norm of `reference` (Frobenius).
    fn relative_error(value: &Tensor<Flex, 2>, reference: &Tensor<Flex, 2>) -> f32 {
        let norm = |t: Tensor<Flex, 2>| t.powi_scalar(2).sum().sqrt().into_scalar();
        norm(value.clone() - reference.clone()) / norm(reference.clone())
    }

    #[test]
    fn a_bf16_or_f16_backbone_stays_close_to_f32_and_still_trains_the_adapter() {
        let model = tiny_model();
        let tokens = ragged_batch();
        let device = &Default::default();
        let patches = Tensor::<AB, 3>::random([3, 4, 3 * 32 * 32], Distribution::Default, device);
        let image_grads = |model: &ClipModel<AB>| {
            let features = model.image_features(patches.clone(), ForwardOptions::default());
            let grads = features.clone().sum().backward();
            let grad = model.adapter.shared_up.weight.grad(&grads);
            (features.inner(), grad.expect("adapter gradient"))
        };
        let (text, text_grads) =
            features_and_grads(&model, &tokens, ForwardOptions::default(), true);
        let (image, image_grad) = image_grads(&model);
        // Bounds on the relative error (norm of the difference over the reference's), for the
        // features and for the adapter's gradients. Measured over 300 runs of random tiny
        // models: features at most 0.31 % (bf16, 8 bits of mantissa) and 0.04 % (f16, 11);
        // gradients mostly as close, but up to 25 % (bf16) and 8 % (f16) where a bottleneck
        // unit sits at ReLU's step (rounding only the weights, products in f32, gave the same
        // tails, so they are the model's, not the mixed products').
        for (precision, dtype, features_bound, grads_bound) in [
            (
                BackbonePrecision::Bf16,
                burn::tensor::DType::BF16,
                0.01,
                0.6,
            ),
            (
                BackbonePrecision::F16,
                burn::tensor::DType::F16,
                0.0015,
                0.3,
            ),
        ] {
            let narrow = model
                .clone()
                .with_backbone_precision(precision, device)
                .unwrap();
            let block = &narrow.vision_model.encoder.layers[0];
            for linear in [&block.self_attn.q_proj, &block.mlp.fc2] {
                assert_eq!(linear.weight.val().dtype(), dtype);
                assert_eq!(
                    linear.bias.as_ref().unwrap().val().dtype(),
                    burn::tensor::DType::F32
                );
            }
            let text_layer = &narrow.text_model.encoder.layers[2];
            assert_eq!(text_layer.mlp.fc1.weight.val().dtype(), dtype);
            assert_eq!(
                narrow.visual_projection.weight.val().dtype(),
                burn::tensor::DType::F32
            );

            let (narrow_text, narrow_grads) =
                features_and_grads(&narrow, &tokens, ForwardOptions::default(), true);
            let (narrow_image, narrow_image_grad) = image_grads(&narrow);
            let mut compared = vec![(&narrow_text, &text), (&narrow_image, &image)];
            compared.extend(narrow_grads.iter().zip(&text_grads));
            compared.push((&narrow_image_grad, &image_grad));
            for (i, (value, reference)) in compared.into_iter().enumerate() {
                assert_eq!(value.dtype(), burn::tensor::DType::F32);
                let error = relative_error(value, reference);
                let bound = if i < 2 { features_bound } else { grads_bound };
                // Different (the products ran in the narrow type), and close.
                assert!(
                    error > 1e-7 && error < bound,
                    "{precision} #{i}: relative error {error}"
                );
            }
            // Inference (no autodiff) takes the same path.
            let valid = narrow
                .valid()
                .text_features(&tokens, ForwardOptions::default());
            valid
                .to_data()
                .assert_approx_eq::<f32>(&narrow_text.to_data(), Tolerance::absolute(1e-6));
        }
    }
}
