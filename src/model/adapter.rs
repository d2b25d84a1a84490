//! The MRS-Adapter: one instance shared by every block of both CLIP towers (METHOD.md).

use burn::module::Param;
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::relu;

use super::clip::{mix_seed, token_rows};
use super::config::{AdapterConfig, ClipConfig};

/// Which tower the adapter is serving (selects the modality-specific projections).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Modality {
    Vision,
    Text,
}

/// `adapter(x, m) = concat(up_m(h), shared_up(h))`, `h = dropout(relu(down_m(x)))`.
///
/// Field names are the keys of adapter checkpoints (`adapter.visual_down.weight`, …).
#[derive(Module, Debug)]
pub struct MrsAdapter<B: Backend> {
    /// Image-specific down projection `d_vision -> bottleneck`.
    pub visual_down: Linear<B>,
    /// Text-specific down projection `d_text -> bottleneck`.
    pub text_down: Linear<B>,
    /// Image-specific up projection `bottleneck -> d_vision - shared_width`.
    pub visual_up: Linear<B>,
    /// Text-specific up projection `bottleneck -> d_text - shared_width`.
    pub text_up: Linear<B>,
    /// Up projection shared by both modalities: the last `shared_width` output channels.
    pub shared_up: Linear<B>,
    /// Dropout probability on the bottleneck, applied only when the caller asks for it.
    pub dropout: f64,
}

/// Linear layer with PyTorch's default weight init (Kaiming-uniform, a = √5) and a zero bias.
fn down_projection<B: Backend>(d_input: usize, d_output: usize, device: &B::Device) -> Linear<B> {
    let mut linear = LinearConfig::new(d_input, d_output).init(device);
    linear.bias = Some(Param::from_tensor(Tensor::zeros([d_output], device)));
    linear
}

/// Linear layer with zero weight and zero bias, so the untrained adapter adds nothing.
fn zero_projection<B: Backend>(d_input: usize, d_output: usize, device: &B::Device) -> Linear<B> {
    LinearConfig::new(d_input, d_output)
        .with_initializer(Initializer::Zeros)
        .init(device)
}

impl AdapterConfig {
    /// A fresh adapter for this backbone: up weights and all biases zero.
    pub fn init<B: Backend>(&self, clip: &ClipConfig, device: &B::Device) -> MrsAdapter<B> {
        let d_vision = clip.vision_config.hidden_size;
        let d_text = clip.text_config.hidden_size;
        MrsAdapter {
            visual_down: down_projection(d_vision, self.bottleneck, device),
            text_down: down_projection(d_text, self.bottleneck, device),
            visual_up: zero_projection(self.bottleneck, d_vision - self.shared_width, device),
            text_up: zero_projection(self.bottleneck, d_text - self.shared_width, device),
            shared_up: zero_projection(self.bottleneck, self.shared_width, device),
            dropout: self.dropout,
        }
    }
}

impl AdapterConfig {
    /// [`AdapterConfig::init`] with the down projections drawn from `seed` (host RNG, not
    /// burn's process-global one): the untrained adapter a continual run starts from is then
    /// the same for the same configuration, so runs are reproducible.
    pub fn init_seeded<B: Backend>(
        &self,
        clip: &ClipConfig,
        seed: u64,
        device: &B::Device,
    ) -> MrsAdapter<B> {
        let mut adapter = self.init(clip, device);
        adapter.visual_down = seeded_down(
            clip.vision_config.hidden_size,
            self.bottleneck,
            mix_seed(seed, 1),
            device,
        );
        adapter.text_down = seeded_down(
            clip.text_config.hidden_size,
            self.bottleneck,
            mix_seed(seed, 2),
            device,
        );
        adapter
    }
}

/// PyTorch's default `nn.Linear` weight init (Kaiming-uniform with a = √5, i.e. uniform in
/// ±1/√fan_in) from a seeded host RNG, and a zero bias.
fn seeded_down<B: Backend>(
    d_input: usize,
    d_output: usize,
    seed: u64,
    device: &B::Device,
) -> Linear<B> {
    use rand::{Rng, SeedableRng};
    let bound = 1.0 / (d_input as f64).sqrt();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let values: Vec<f32> = (0..d_input * d_output)
        .map(|_| rng.random_range(-bound..bound) as f32)
        .collect();
    let mut linear = down_projection(d_input, d_output, device);
    linear.weight = Param::from_tensor(Tensor::from_data(
        burn::tensor::TensorData::new(values, [d_input, d_output]),
        device,
    ));
    linear
}

impl<B: Backend> MrsAdapter<B> {
    /// `self + t·(other − self)`, parameter by parameter (both of one configuration): the
    /// step of an exponential moving average of adapter weights.
    pub fn lerp(self, other: &Self, t: f64) -> Self {
        fn toward<B: Backend, const D: usize>(
            x: Tensor<B, D>,
            y: Tensor<B, D>,
            t: f64,
        ) -> Tensor<B, D> {
            x.clone() + (y - x) * t
        }
        let mix = |a: Linear<B>, b: &Linear<B>| Linear {
            weight: Param::from_tensor(toward(a.weight.val(), b.weight.val(), t)),
            bias: match (a.bias, &b.bias) {
                (Some(x), Some(y)) => Some(Param::from_tensor(toward(x.val(), y.val(), t))),
                (bias, _) => bias,
            },
        };
        Self {
            visual_down: mix(self.visual_down, &other.visual_down),
            text_down: mix(self.text_down, &other.text_down),
            visual_up: mix(self.visual_up, &other.visual_up),
            text_up: mix(self.text_up, &other.text_up),
            shared_up: mix(self.shared_up, &other.shared_up),
            dropout: self.dropout,
        }
    }

    /// Adapter output for the residual stream `x`.
    ///
    /// - `x`: `[batch, tokens, d_model]` (post-attention residual stream, no LayerNorm)
    /// - `dropout_seed`: `Some(seed)` applies the bottleneck dropout (training) with masks
    ///   drawn from `seed`; `None` is inference
    /// - returns `[batch, tokens, d_model]`
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        modality: Modality,
        dropout_seed: Option<u64>,
    ) -> Tensor<B, 3> {
        self.forward_at(x, modality, dropout_seed, None)
    }

    /// [`Self::forward`] on some tokens only: row `i` of `x` (its rows taken in order, any
    /// shape `[.., .., d_model]`) is token `at.rows[i]` of a padded `[batch, tokens]` layout.
    /// The dropout mask is the one the whole padded layout would draw at those tokens, so a
    /// training run does not depend on which tokens were left out (the pooled last block, the
    /// text tower's packed captions).
    pub fn forward_at(
        &self,
        x: Tensor<B, 3>,
        modality: Modality,
        dropout_seed: Option<u64>,
        at: Option<TokenPositions<'_>>,
    ) -> Tensor<B, 3> {
        let (down, up) = match modality {
            Modality::Vision => (&self.visual_down, &self.visual_up),
            Modality::Text => (&self.text_down, &self.text_up),
        };
        // The adapter is trained, so burn's `Linear` (not the frozen backbone's kernel).
        let hidden = relu(token_rows(x, |rows| down.forward(rows))); // [batch, tokens, bottleneck]
        let hidden = match (dropout_seed, at) {
            (Some(seed), None) => dropout(hidden, self.dropout, seed),
            (Some(seed), Some(at)) => dropout_at(hidden, self.dropout, seed, at),
            (None, _) => hidden,
        };
        // concat(up(h), shared_up(h)) as one product with the weights side by side: the
        // concatenation then copies a [bottleneck, d_model] weight, not the activations.
        let bias = |linear: &Linear<B>| match &linear.bias {
            Some(bias) => bias.val(),
            None => Tensor::zeros([linear.weight.dims()[1]], &linear.weight.device()),
        };
        let weight = Tensor::cat(vec![up.weight.val(), self.shared_up.weight.val()], 1);
        let bias = Tensor::cat(vec![bias(up), bias(&self.shared_up)], 0);
        token_rows(hidden, |rows| rows.matmul(weight) + bias.unsqueeze::<2>())
    }
}

/// Inverted dropout with probability `prob` (identity when `prob` is 0).
///
/// The keep-mask is drawn on the host from an RNG seeded with `seed`, not from burn's
/// process-global RNG: the masks of a training step are then a pure function of the step's
/// seed, whatever order concurrent forward passes run in (seeded runs and `--resume` stay
/// bit-reproducible).
pub fn dropout<B: Backend, const D: usize>(
    input: Tensor<B, D>,
    prob: f64,
    seed: u64,
) -> Tensor<B, D> {
    dropout_rows_from(input, prob, seed, 0)
}

/// [`dropout`] on batch rows `first_row..` only (dimension 0); earlier rows pass unchanged.
pub fn dropout_rows_from<B: Backend, const D: usize>(
    input: Tensor<B, D>,
    prob: f64,
    seed: u64,
    first_row: usize,
) -> Tensor<B, D> {
    let shape = input.shape();
    let rows = input.dims()[0];
    if prob <= 0.0 || first_row >= rows {
        return input;
    }
    let total = shape.num_elements();
    let mask = keep_mask(total, total / rows * first_row, prob, seed);
    let mask =
        Tensor::<B, D>::from_data(burn::tensor::TensorData::new(mask, shape), &input.device());
    input * mask
}

/// Where the computed tokens sit in a padded `[batch, tokens]` layout (see
/// [`MrsAdapter::forward_at`]).
#[derive(Debug, Clone, Copy)]
pub struct TokenPositions<'a> {
    /// Tokens of the whole padded layout (`batch · tokens`): the masks are drawn for it.
    pub padded: usize,
    /// The padded token (`b · tokens + t`) of each row.
    pub rows: &'a [usize],
}

/// [`dropout`] of rows that stand for tokens `at.rows` of a padded layout: the mask values
/// are the whole layout's at those tokens.
fn dropout_at<B: Backend, const D: usize>(
    input: Tensor<B, D>,
    prob: f64,
    seed: u64,
    at: TokenPositions<'_>,
) -> Tensor<B, D> {
    if prob <= 0.0 {
        return input;
    }
    let shape = input.shape();
    let width = input.dims()[D - 1];
    assert_eq!(
        shape.num_elements(),
        at.rows.len() * width,
        "one padded position per row"
    );
    let full = keep_mask(at.padded * width, 0, prob, seed);
    let mask: Vec<f32> = at
        .rows
        .iter()
        .flat_map(|&token| full[token * width..(token + 1) * width].iter().copied())
        .collect();
    let mask =
        Tensor::<B, D>::from_data(burn::tensor::TensorData::new(mask, shape), &input.device());
    input * mask
}

/// Inverted-dropout multipliers (`0` or `1 / (1 − prob)`) for `total` values from a host RNG
/// seeded with `seed`; the first `untouched` are `1`.
fn keep_mask(total: usize, untouched: usize, prob: f64, seed: u64) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let keep = 1.0 - prob;
    let scale = (1.0 / keep) as f32;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..total)
        .map(|i| {
            if i < untouched {
                1.0
            } else if rng.random::<f64>() < keep {
                scale
            } else {
                0.0
            }
        })
        .collect()
}
