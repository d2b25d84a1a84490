//! Fused CPU kernels for the element-wise work of a training step, as custom backend
//! operations with their own backward (burn's extension point, not a fork of burn).
//!
//! Under `Autodiff`, burn builds LayerNorm from eight primitive ops and the MLP activations
//! (quick-GELU, erf-GELU) from three to six, each a separate single-threaded pass over memory
//! that keeps its own copy for the backward (docs/PERFORMANCE.md, issue #15). Here each is one
//! pass, split over the cores by rows, vectorised with AVX2/FMA where the CPU has them, and its
//! backward keeps only the input.
//!
//! [`ModelBackend`] is what the model's forward passes require. The CPU backend (`Flex`)
//! provides the kernels; a backend without them (CUDA) keeps burn's own ops, through the
//! trait's default methods, with or without autodiff.

use burn::backend::Autodiff;
use burn::backend::Flex;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::prelude::*;
use burn::tensor::activation::{gelu, gelu_approximate, sigmoid};
use burn::tensor::ops::{FloatTensor, ModuleOps};
use burn::tensor::{DType, TensorData, TensorMetadata, TensorPrimitive};
use gemm::Parallelism;
use rayon::prelude::*;

use super::config::HiddenAct;

pub use attention::{KeyRange, attention};

/// LayerNorm gradients: input, γ, β (each only when asked for).
pub type LayerNormGrads<B> = (
    Option<FloatTensor<B>>,
    Option<FloatTensor<B>>,
    Option<FloatTensor<B>>,
);

/// The backend operations the CLIP forward passes use beyond burn's `Backend`.
///
/// The `*_saving` methods are the forward kernels an autodiff wrapper records with their
/// backward (`*_grad`); a backend without kernels returns `None` from them and keeps burn's
/// own ops.
pub trait ModelBackend: Backend {
    /// LayerNorm over the last dimension with a bias (`(x − mean) / √(var + ε) · γ + β`):
    /// the backend's kernel, else burn's op.
    fn layer_norm_fused(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self> {
        match Self::layer_norm_saving(&x, &gamma, &beta, epsilon) {
            Some((output, _)) => output,
            None => Self::layer_norm(x, gamma, Some(beta), epsilon),
        }
    }

    /// The MLP activation `act` element-wise: the backend's kernel, else burn's ops.
    fn activation(x: FloatTensor<Self>, act: HiddenAct) -> FloatTensor<Self> {
        match Self::activation_saving(&x, act) {
            Some(output) => output,
            None => activation_composite::<Self>(x, act),
        }
    }

    /// LayerNorm forward that also returns what its backward needs (per-row mean and 1/σ,
    /// `[rows · 2]`); `None` where the backend has no kernel.
    fn layer_norm_saving(
        _x: &FloatTensor<Self>,
        _gamma: &FloatTensor<Self>,
        _beta: &FloatTensor<Self>,
        _epsilon: f64,
    ) -> Option<(FloatTensor<Self>, FloatTensor<Self>)> {
        None
    }

    /// LayerNorm backward from [`Self::layer_norm_saving`]'s statistics (burn's ops unless
    /// the backend has a kernel).
    fn layer_norm_grad(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        want_input: bool,
        want_params: bool,
    ) -> LayerNormGrads<Self> {
        layer_norm_grad_composite::<Self>(x, gamma, stats, grad, want_input, want_params)
    }

    /// Multi-head attention of `q` `[batch, queries, width]` over `k`, `v` `[batch, keys, width]`
    /// (see [`attention::attention`]): the backend's kernel, else burn's ops.
    fn attention_fused(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        heads: usize,
        range: &KeyRange,
    ) -> FloatTensor<Self> {
        match Self::attention_saving(&q, &k, &v, heads, range) {
            Some((output, _)) => output,
            None => attention::attention_composite::<Self>(q, k, v, heads, range),
        }
    }

    /// Attention forward that also returns the probabilities its backward needs
    /// (`[batch · heads · queries · keys]`); `None` where the backend has no kernel.
    fn attention_saving(
        _q: &FloatTensor<Self>,
        _k: &FloatTensor<Self>,
        _v: &FloatTensor<Self>,
        _heads: usize,
        _range: &KeyRange,
    ) -> Option<(FloatTensor<Self>, FloatTensor<Self>)> {
        None
    }

    /// Gradients of the queries, keys and values (those in `want`) from
    /// [`Self::attention_saving`]'s probabilities (burn's ops unless the backend has a kernel).
    fn attention_grad(
        qkv: [FloatTensor<Self>; 3],
        probs: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        heads: usize,
        want: [bool; 3],
    ) -> [Option<FloatTensor<Self>>; 3] {
        attention::attention_grad_composite::<Self>(qkv, probs, grad, heads, want)
    }

    /// `x W + b` over the last dimension (`W`: `[d_in, d_out]`): the backend's kernel, else
    /// burn's op.
    fn linear_fused(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        b: Option<FloatTensor<Self>>,
    ) -> FloatTensor<Self> {
        match Self::linear_kernel(&x, &w, b.as_ref()) {
            Some(output) => output,
            None => Self::linear(x, w, b),
        }
    }

    /// The linear forward kernel; `None` where the backend has none. Every backend has the
    /// mixed-precision one, for a weight narrower than its input.
    fn linear_kernel(
        x: &FloatTensor<Self>,
        w: &FloatTensor<Self>,
        b: Option<&FloatTensor<Self>>,
    ) -> Option<FloatTensor<Self>> {
        linear::mixed_forward::<Self>(x, w, b)
    }

    /// The input gradient `dY Wᵀ` of a linear layer (burn's op unless the backend has a kernel).
    fn linear_input_grad(w: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        linear::linear_input_grad_composite::<Self>(w, grad)
    }

    /// Activation forward for an autodiff wrapper (it keeps only the input); `None` where the
    /// backend has no kernel for `act`.
    fn activation_saving(_x: &FloatTensor<Self>, _act: HiddenAct) -> Option<FloatTensor<Self>> {
        None
    }

    /// Gradient of the activation `act` with respect to its input `x`.
    fn activation_grad(
        x: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        act: HiddenAct,
    ) -> FloatTensor<Self> {
        activation_grad_composite::<Self>(x, grad, act)
    }
}

/// burn's ops for the activation (any backend).
fn activation_composite<B: Backend>(x: FloatTensor<B>, act: HiddenAct) -> FloatTensor<B> {
    let shape = x.shape();
    let x = flat::<B>(x);
    let y = match act {
        HiddenAct::QuickGelu => x.clone() * sigmoid(x * QUICK_GELU_ALPHA as f64),
        HiddenAct::Gelu => gelu(x),
        HiddenAct::GeluTanh => gelu_approximate(x),
    };
    B::float_reshape(y.into_primitive().tensor(), shape)
}

/// Any tensor as a rank-1 `Tensor` (element-wise work does not care about the shape).
fn flat<B: Backend>(x: FloatTensor<B>) -> Tensor<B, 1> {
    let n = x.shape().num_elements();
    Tensor::from_primitive(TensorPrimitive::Float(B::float_reshape(
        x,
        burn::tensor::Shape::new([n]),
    )))
}

impl ModelBackend for Flex {
    fn layer_norm_saving(
        x: &FlexTensor,
        gamma: &FlexTensor,
        beta: &FlexTensor,
        epsilon: f64,
    ) -> Option<(FlexTensor, FlexTensor)> {
        let f32s = [x, gamma, beta].into_iter().all(is_f32);
        // Rows of zero width have nothing to normalise: burn's op handles that shape.
        let width = gamma.layout().shape().num_elements();
        (f32s && width > 0).then(|| layer_norm_forward(x, gamma, beta, epsilon as f32))
    }

    fn layer_norm_grad(
        x: FlexTensor,
        gamma: FlexTensor,
        stats: FlexTensor,
        grad: FlexTensor,
        want_input: bool,
        want_params: bool,
    ) -> LayerNormGrads<Self> {
        layer_norm_backward(&x, &gamma, &stats, &grad, want_input, want_params)
    }

    fn activation_saving(x: &FlexTensor, act: HiddenAct) -> Option<FlexTensor> {
        let kernel = matches!(act, HiddenAct::QuickGelu | HiddenAct::Gelu);
        (kernel && is_f32(x)).then(|| activation_forward(x, act))
    }

    fn attention_saving(
        q: &FlexTensor,
        k: &FlexTensor,
        v: &FlexTensor,
        heads: usize,
        range: &KeyRange,
    ) -> Option<(FlexTensor, FlexTensor)> {
        let f32s = [q, k, v].into_iter().all(is_f32);
        f32s.then(|| attention::attention_forward(q, k, v, heads, range))
    }

    fn attention_grad(
        [q, k, v]: [FlexTensor; 3],
        probs: FlexTensor,
        grad: FlexTensor,
        heads: usize,
        want: [bool; 3],
    ) -> [Option<FlexTensor>; 3] {
        attention::attention_backward([&q, &k, &v], &probs, &grad, heads, want)
    }

    fn linear_kernel(x: &FlexTensor, w: &FlexTensor, b: Option<&FlexTensor>) -> Option<FlexTensor> {
        let f32s = is_f32(x) && is_f32(w) && b.is_none_or(is_f32);
        if f32s {
            Some(linear::linear_forward(x, w, b))
        } else {
            linear::mixed_forward::<Self>(x, w, b)
        }
    }

    fn linear_input_grad(w: FlexTensor, grad: FlexTensor) -> FlexTensor {
        if is_f32(&w) && is_f32(&grad) {
            linear::linear_input_backward(&w, &grad)
        } else {
            linear::linear_input_grad_composite::<Self>(w, grad)
        }
    }

    fn activation_grad(x: FlexTensor, grad: FlexTensor, act: HiddenAct) -> FlexTensor {
        match act {
            HiddenAct::QuickGelu | HiddenAct::Gelu => activation_backward(&x, &grad, act),
            HiddenAct::GeluTanh => activation_grad_composite::<Self>(x, grad, act),
        }
    }
}

impl<B: ModelBackend, C: CheckpointStrategy> ModelBackend for Autodiff<B, C> {
    fn layer_norm_fused(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self> {
        /// State: the input, γ, and the per-row statistics.
        #[derive(Debug)]
        struct LayerNormBackward;

        impl<B: ModelBackend> Backward<B, 3> for LayerNormBackward {
            type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                _checkpointer: &mut Checkpointer,
            ) {
                let [x_node, gamma_node, beta_node] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (x, gamma, stats) = ops.state;
                let want_params = gamma_node.is_some() || beta_node.is_some();
                let (dx, dgamma, dbeta) =
                    B::layer_norm_grad(x, gamma, stats, grad, x_node.is_some(), want_params);
                for (node, grad) in [(x_node, dx), (gamma_node, dgamma), (beta_node, dbeta)] {
                    if let (Some(node), Some(grad)) = (node, grad) {
                        grads.register::<B>(node.id, grad);
                    }
                }
            }
        }

        let Some((output, stats)) =
            B::layer_norm_saving(&x.primitive, &gamma.primitive, &beta.primitive, epsilon)
        else {
            return Self::layer_norm(x, gamma, Some(beta), epsilon);
        };
        match LayerNormBackward
            .prepare::<C>([x.node.clone(), gamma.node.clone(), beta.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((x.primitive, gamma.primitive, stats), output),
            OpsKind::UnTracked(prep) => prep.finish(output),
        }
    }

    fn attention_fused(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        heads: usize,
        range: &KeyRange,
    ) -> FloatTensor<Self> {
        attention::attention_autodiff::<B, C>(q, k, v, heads, range)
    }

    fn linear_fused(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        b: Option<FloatTensor<Self>>,
    ) -> FloatTensor<Self> {
        linear::linear_autodiff::<B, C>(x, w, b)
    }

    fn activation(x: FloatTensor<Self>, act: HiddenAct) -> FloatTensor<Self> {
        let Some(output) = B::activation_saving(&x.primitive, act) else {
            return activation_composite::<Self>(x, act);
        };
        // The backward keeps the input only (burn's composites keep intermediates too).
        record_one_input::<B, C>(x, output, InputGrad::Activation(act), |x| x)
    }
}

/// What the backward of a one-input operation computes from its saved tensor and the output's
/// gradient.
#[derive(Debug, Clone, Copy)]
enum InputGrad {
    /// The activation's derivative; the saved tensor is the input.
    Activation(HiddenAct),
    /// `dY Wᵀ` of a frozen linear layer; the saved tensor is the weight.
    Linear,
}

/// The backward node of a one-input operation.
#[derive(Debug)]
struct OneInputBackward(InputGrad);

impl<B: ModelBackend> Backward<B, 1> for OneInputBackward {
    type State = FloatTensor<B>;

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let [parent] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        if let Some(node) = parent {
            let input_grad = match self.0 {
                InputGrad::Activation(act) => B::activation_grad(ops.state, grad, act),
                InputGrad::Linear => B::linear_input_grad(ops.state, grad),
            };
            grads.register::<B>(node.id, input_grad);
        }
    }
}

/// Records `output`, computed by the inner backend from `input`, with the backward `kind`;
/// `state` picks the tensor that backward keeps (taking the input's primitive), and runs
/// only when the input is tracked.
fn record_one_input<B: ModelBackend, C: CheckpointStrategy>(
    input: FloatTensor<Autodiff<B, C>>,
    output: FloatTensor<B>,
    kind: InputGrad,
    state: impl FnOnce(FloatTensor<B>) -> FloatTensor<B>,
) -> FloatTensor<Autodiff<B, C>> {
    match OneInputBackward(kind)
        .prepare::<C>([input.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(state(input.primitive), output),
        OpsKind::UnTracked(prep) => prep.finish(output),
    }
}

/// LayerNorm backward in burn's ops (any backend), from per-row mean and 1/σ.
pub fn layer_norm_grad_composite<B: Backend>(
    x: FloatTensor<B>,
    gamma: FloatTensor<B>,
    stats: FloatTensor<B>,
    grad: FloatTensor<B>,
    want_input: bool,
    want_params: bool,
) -> LayerNormGrads<B> {
    let shape = x.shape();
    let gamma = flat::<B>(gamma);
    let d = gamma.dims()[0];
    let rows = shape.num_elements() / d;
    let x = flat::<B>(x).reshape([rows, d]);
    let grad = flat::<B>(grad).reshape([rows, d]);
    let stats = flat::<B>(stats).reshape([rows, 2]);
    let mean = stats.clone().slice([0..rows, 0..1]);
    let rstd = stats.slice([0..rows, 1..2]);
    let x_hat = (x - mean) * rstd.clone();
    let g_hat = grad.clone() * gamma.unsqueeze::<2>();
    let dx = want_input.then(|| {
        let a = g_hat.clone().mean_dim(1);
        let b = (g_hat.clone() * x_hat.clone()).mean_dim(1);
        let dx = (g_hat - a - x_hat.clone() * b) * rstd;
        B::float_reshape(dx.into_primitive().tensor(), shape)
    });
    if !want_params {
        return (dx, None, None);
    }
    let dgamma = (grad.clone() * x_hat).sum_dim(0).reshape([d]);
    let dbeta = grad.sum_dim(0).reshape([d]);
    (
        dx,
        Some(dgamma.into_primitive().tensor()),
        Some(dbeta.into_primitive().tensor()),
    )
}

/// The activation's input gradient in burn's ops (any backend).
pub fn activation_grad_composite<B: Backend>(
    x: FloatTensor<B>,
    grad: FloatTensor<B>,
    act: HiddenAct,
) -> FloatTensor<B> {
    let shape = x.shape();
    let x = flat::<B>(x);
    let grad = flat::<B>(grad);
    let derivative = match act {
        HiddenAct::QuickGelu => {
            let s = sigmoid(x.clone() * QUICK_GELU_ALPHA as f64);
            // d/dx [x σ(αx)] = σ + αx σ (1 − σ)
            s.clone() + x * QUICK_GELU_ALPHA as f64 * s.clone() * (s.neg() + 1.0)
        }
        HiddenAct::Gelu => {
            // d/dx [x Φ(x)] = Φ(x) + x φ(x)
            let cdf = (x.clone() * std::f64::consts::FRAC_1_SQRT_2).erf() * 0.5 + 0.5;
            let pdf = (x.clone().powi_scalar(2) * -0.5).exp() * INV_SQRT_2PI as f64;
            cdf + x * pdf
        }
        HiddenAct::GeluTanh => {
            // y = x/2 (1 + tanh u), u = √(2/π) (x + 0.044715 x³)
            const C: f64 = 0.797_884_560_802_865_4;
            let t = ((x.clone() + x.clone().powi_scalar(3) * 0.044715) * C).tanh();
            let du = (x.clone().powi_scalar(2) * (3.0 * 0.044715) + 1.0) * C;
            (t.clone() + 1.0) * 0.5 + x * 0.5 * (t.clone() * t).neg().add_scalar(1.0) * du
        }
    };
    B::float_reshape((grad * derivative).into_primitive().tensor(), shape)
}

/// A training backend: autodiff over a [`ModelBackend`], itself one.
pub trait TrainBackend:
    burn::tensor::backend::AutodiffBackend<InnerBackend: ModelBackend> + ModelBackend
{
}

impl<T> TrainBackend for T where
    T: burn::tensor::backend::AutodiffBackend<InnerBackend: ModelBackend> + ModelBackend
{
}

#[cfg(feature = "cuda")]
impl ModelBackend for super::device::Cuda {}

/// LayerNorm with the parameters of burn's `LayerNorm` module and its `epsilon` (which the
/// module keeps private).
pub fn layer_norm<B: ModelBackend, const D: usize>(
    norm: &burn::nn::LayerNorm<B>,
    x: Tensor<B, D>,
    epsilon: f64,
) -> Tensor<B, D> {
    match &norm.beta {
        Some(beta) => Tensor::from_primitive(TensorPrimitive::Float(B::layer_norm_fused(
            x.into_primitive().tensor(),
            norm.gamma.val().into_primitive().tensor(),
            beta.val().into_primitive().tensor(),
            epsilon,
        ))),
        None => norm.forward(x),
    }
}

/// A `Linear` layer through [`ModelBackend::linear_fused`].
pub fn linear<B: ModelBackend, const D: usize>(
    layer: &burn::nn::Linear<B>,
    x: Tensor<B, D>,
) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(B::linear_fused(
        x.into_primitive().tensor(),
        layer.weight.val().into_primitive().tensor(),
        layer
            .bias
            .as_ref()
            .map(|b| b.val().into_primitive().tensor()),
    )))
}

/// The MLP activation `act` on any tensor.
pub fn activation<B: ModelBackend, const D: usize>(
    x: Tensor<B, D>,
    act: HiddenAct,
) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(B::activation(
        x.into_primitive().tensor(),
        act,
    )))
}

pub const QUICK_GELU_ALPHA: f32 = 1.702;
/// 1/√(2π), the standard normal density at 0.
const INV_SQRT_2PI: f32 = 0.398_942_3;

// ---------------------------------------------------------------------------------------------
// Kernels (f32, contiguous rows)
// ---------------------------------------------------------------------------------------------

/// Elements per parallel task: small enough to split a ViT-B batch over the cores, large
/// enough that scheduling costs nothing next to the work.
const TASK_ELEMENTS: usize = 16 * 1024;

/// A new buffer of `len` values, written in parallel pieces of `piece` values (the last may
/// be shorter) by `write(values, item)`, with the matching item of `inputs` (one per piece).
/// Each task zeroes its own piece just before `write` runs, in cache: `vec![0.0; len]` was a
/// memset of the whole output on the calling thread while the pool waited (2–3 % of a
/// training step on an Intel Xeon, docs/PERFORMANCE.md).
fn par_output<I: IndexedParallelIterator>(
    len: usize,
    piece: usize,
    inputs: I,
    write: impl Fn(&mut [f32], I::Item) + Sync + Send,
) -> Vec<f32> {
    let piece = piece.max(1);
    // Every piece must get an item, or some values would stay uninitialised.
    assert_eq!(
        inputs.len(),
        len.div_ceil(piece),
        "one input per output piece"
    );
    let mut out = Vec::with_capacity(len);
    out.spare_capacity_mut()[..len]
        .par_chunks_mut(piece)
        .zip(inputs)
        .for_each(|(values, item)| {
            for value in values.iter_mut() {
                value.write(0.0);
            }
            // SAFETY: every element of `values` was initialised just above, and
            // `MaybeUninit<f32>` has the layout of `f32`.
            let values =
                unsafe { &mut *(values as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) };
            write(values, item);
        });
    // SAFETY: the pieces cover `0..len` and each was initialised by its task (the assert
    // above gave every piece an item, so `zip` visited them all).
    unsafe { out.set_len(len) };
    out
}

/// `len` zeros, written over the pool (see [`par_output`]).
fn par_zeros(len: usize) -> Vec<f32> {
    par_output(
        len,
        TASK_ELEMENTS,
        rayon::iter::repeat_n((), len.div_ceil(TASK_ELEMENTS)),
        |_, ()| {},
    )
}

/// The tensor's values in row-major order (a copy only when it is a strided view).
fn values(t: &FlexTensor) -> std::borrow::Cow<'_, [f32]> {
    match t.as_slice::<f32>() {
        Some(slice) => std::borrow::Cow::Borrowed(slice),
        None => std::borrow::Cow::Owned(t.to_contiguous().as_slice::<f32>().unwrap().to_vec()),
    }
}

/// Whether a tensor can go through the f32 kernels.
fn is_f32(t: &FlexTensor) -> bool {
    t.dtype() == DType::F32
}

fn tensor(values: Vec<f32>, shape: burn::tensor::Shape) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

/// Whether this CPU runs the AVX2/FMA versions (checked once).
#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    use std::sync::OnceLock;
    static DETECTED: OnceLock<bool> = OnceLock::new();
    *DETECTED.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    })
}

/// Defines `$name(args)` that runs `$body` compiled for AVX2+FMA when the CPU has them and
/// for the baseline target otherwise: the loops are written so that LLVM vectorises them
/// (no intrinsics), and `FMA` selects fused multiply-adds only where they are native. Type
/// arguments after `$body` follow its `FMA` parameter.
macro_rules! dispatch {
    ($(#[$meta:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? = $body:ident $(<$($generic:ty),+>)?) => {
        $(#[$meta])*
        fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                fn fast($($arg: $ty),*) $(-> $ret)? {
                    $body::<true $($(, $generic)+)?>($($arg),*)
                }
                if has_avx2_fma() {
                    // SAFETY: the CPU was checked to support AVX2 and FMA.
                    return unsafe { fast($($arg),*) };
                }
            }
            $body::<false $($(, $generic)+)?>($($arg),*)
        }
    };
}

// ---------------------------------------------------------------------------------------------
// Single-threaded products on strided matrices (gemm), for kernels that split the work
// ---------------------------------------------------------------------------------------------

/// A matrix inside a buffer: its first element and its row and column strides.
#[derive(Clone, Copy)]
struct Mat {
    ptr: *mut f32,
    row: isize,
    col: isize,
}

// SAFETY: a `Mat` is an address; the tasks that share one write disjoint blocks (see the
// callers), and reads are of buffers no task writes.
unsafe impl Send for Mat {}
unsafe impl Sync for Mat {}

impl Mat {
    /// A row-major `[rows, cols]` block.
    fn dense(slice: &mut [f32], cols: usize) -> Self {
        Mat {
            ptr: slice.as_mut_ptr(),
            row: cols as isize,
            col: 1,
        }
    }

    /// The same strides from `elements` further on (inside the same buffer).
    fn skip(self, elements: usize) -> Self {
        Mat {
            // SAFETY: the callers stay inside the buffer.
            ptr: unsafe { self.ptr.add(elements) },
            ..self
        }
    }

    /// The same matrix from column `first` on.
    fn cols_from(self, first: usize) -> Self {
        Mat {
            // SAFETY: the callers pass a column inside the matrix.
            ptr: unsafe { self.ptr.offset(first as isize * self.col) },
            ..self
        }
    }

    fn t(self) -> Self {
        Mat {
            ptr: self.ptr,
            row: self.col,
            col: self.row,
        }
    }
}

/// `dst[m×n] = (dst if accumulate) + scale · lhs[m×k] · rhs[k×n]`, on the calling thread (the
/// callers split the work: attention across heads, the linear layers across column parts).
///
/// # Safety
/// Each matrix must lie inside a live buffer at its strides, and no other thread may touch
/// `dst`'s block during the call.
unsafe fn product(
    [m, n, k]: [usize; 3],
    dst: Mat,
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    scale: f32,
) {
    // SAFETY: forwarded from the caller; `dst` is read only when `accumulate`. gemm ignores
    // the `1.0` multiplying `dst` when it does not read it.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.ptr,
            dst.col,
            dst.row,
            accumulate,
            lhs.ptr,
            lhs.col,
            lhs.row,
            rhs.ptr,
            rhs.col,
            rhs.row,
            1.0,
            scale,
            false,
            false,
            false,
            Parallelism::None,
        )
    }
}

mod attention;
mod linear;

#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// `eˣ` to within 3e-7 relative error (Cephes' `expf`, tested below): range reduction by ln 2
/// and a degree-6 polynomial, in plain arithmetic so a loop over it vectorises.
#[inline(always)]
fn exp_approx<const FMA: bool>(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    let x = x.clamp(-87.336_55, 88.376_26);
    let n = (x * LOG2E + 0.5).floor();
    let r = madd::<FMA>(n, -0.693_359_4, x);
    let r = madd::<FMA>(n, 2.121_944_4e-4, r);
    let mut p = 1.987_569_1e-4;
    p = madd::<FMA>(p, r, 1.398_199_9e-3);
    p = madd::<FMA>(p, r, 8.333_452e-3);
    p = madd::<FMA>(p, r, 4.166_579_6e-2);
    p = madd::<FMA>(p, r, 1.666_666_5e-1);
    p = madd::<FMA>(p, r, 0.5);
    let p = madd::<FMA>(p, r * r, r) + 1.0;
    // 2ⁿ: the clamp keeps n in -126..=128. Added to 1.5·2²³ + 127, n + 127 lands in the low
    // mantissa bits of an exactly representable float, and the shift moves them into the
    // exponent. `n as i32` would give the same bits, but its saturating, NaN-checking
    // conversion compiles to scalar code and stops the loop vectorising (issue #15).
    p * f32::from_bits((n + EXP_BIAS_SHIFT).to_bits() << 23)
}

/// `1.5 · 2²³ + 127`: see [`exp_approx`].
const EXP_BIAS_SHIFT: f32 = 12_583_039.0;

/// An element-wise activation with a kernel: its value and derivative at one input.
trait Pointwise {
    fn value<const FMA: bool>(x: f32) -> f32;
    fn derivative<const FMA: bool>(x: f32) -> f32;
}

/// `x · σ(1.702 x)`.
struct QuickGeluFn;

impl Pointwise for QuickGeluFn {
    #[inline(always)]
    fn value<const FMA: bool>(x: f32) -> f32 {
        x / (1.0 + exp_approx::<FMA>(-QUICK_GELU_ALPHA * x))
    }

    #[inline(always)]
    fn derivative<const FMA: bool>(x: f32) -> f32 {
        let s = 1.0 / (1.0 + exp_approx::<FMA>(-QUICK_GELU_ALPHA * x));
        // d/dx [x σ(αx)] = σ + αx σ (1 − σ)
        madd::<FMA>(QUICK_GELU_ALPHA * x * s, 1.0 - s, s)
    }
}

/// `x · Φ(x)`, the exact GELU.
struct GeluFn;

impl Pointwise for GeluFn {
    #[inline(always)]
    fn value<const FMA: bool>(x: f32) -> f32 {
        x * normal_cdf::<FMA>(x)
    }

    #[inline(always)]
    fn derivative<const FMA: bool>(x: f32) -> f32 {
        // d/dx [x Φ(x)] = Φ(x) + x φ(x)
        let pdf = INV_SQRT_2PI * exp_approx::<FMA>(-0.5 * x * x);
        madd::<FMA>(x, pdf, normal_cdf::<FMA>(x))
    }
}

#[inline(always)]
fn pointwise_rows<const FMA: bool, F: Pointwise>(input: &[f32], output: &mut [f32]) {
    for (y, &x) in output.iter_mut().zip(input) {
        *y = F::value::<FMA>(x);
    }
}

#[inline(always)]
fn pointwise_grad_rows<const FMA: bool, F: Pointwise>(
    input: &[f32],
    grad: &[f32],
    output: &mut [f32],
) {
    for ((dx, &x), &g) in output.iter_mut().zip(input).zip(grad) {
        *dx = g * F::derivative::<FMA>(x);
    }
}

dispatch!(fn quick_gelu_chunk(input: &[f32], output: &mut [f32]) = pointwise_rows<QuickGeluFn>);
dispatch!(fn quick_gelu_grad_chunk(input: &[f32], grad: &[f32], output: &mut [f32]) = pointwise_grad_rows<QuickGeluFn>);
dispatch!(fn gelu_chunk(input: &[f32], output: &mut [f32]) = pointwise_rows<GeluFn>);
dispatch!(fn gelu_grad_chunk(input: &[f32], grad: &[f32], output: &mut [f32]) = pointwise_grad_rows<GeluFn>);

/// `erfc(z)` for `z ≥ 0` to within 1.2e-7 *relative* error (Numerical Recipes' `erfcc`, a
/// Chebyshev fit; tested below): the GELU of a very negative input is `x · erfc(|x|/√2) / 2`,
/// so the tail must be accurate relative to its own size, which `1 − erf` is not.
#[inline(always)]
fn erfc_approx<const FMA: bool>(z: f32) -> f32 {
    let t = 1.0 / madd::<FMA>(0.5, z, 1.0);
    let mut p = 0.170_872_77;
    for c in [
        -0.822_152_23,
        1.488_515_9,
        -1.135_204,
        0.278_868_07,
        -0.186_288_06,
        0.096_784_18,
        0.374_091_96,
        1.000_023_7,
        -1.265_512_2,
    ] {
        p = madd::<FMA>(p, t, c);
    }
    t * exp_approx::<FMA>(madd::<FMA>(-z, z, p))
}

/// `Φ(x)`, the standard normal CDF, from [`erfc_approx`] on `|x|/√2`.
#[inline(always)]
fn normal_cdf<const FMA: bool>(x: f32) -> f32 {
    let half_tail = 0.5 * erfc_approx::<FMA>(x.abs() * std::f32::consts::FRAC_1_SQRT_2);
    if x >= 0.0 { 1.0 - half_tail } else { half_tail }
}

/// Quick-GELU or erf-GELU forward on an f32 tensor.
pub fn activation_forward(x: &FlexTensor, act: HiddenAct) -> FlexTensor {
    let chunk = match act {
        HiddenAct::QuickGelu => quick_gelu_chunk,
        HiddenAct::Gelu => gelu_chunk,
        HiddenAct::GeluTanh => unreachable!("no kernel for the tanh GELU"),
    };
    let input = values(x);
    let output = par_output(
        input.len(),
        TASK_ELEMENTS,
        input.par_chunks(TASK_ELEMENTS),
        |out, inp| chunk(inp, out),
    );
    tensor(output, x.layout().shape().clone())
}

/// Gradient of quick-GELU or erf-GELU with respect to its input.
pub fn activation_backward(x: &FlexTensor, grad: &FlexTensor, act: HiddenAct) -> FlexTensor {
    let chunk = match act {
        HiddenAct::QuickGelu => quick_gelu_grad_chunk,
        HiddenAct::Gelu => gelu_grad_chunk,
        HiddenAct::GeluTanh => unreachable!("no kernel for the tanh GELU"),
    };
    let input = values(x);
    let grad_values = values(grad);
    let output = par_output(
        input.len(),
        TASK_ELEMENTS,
        input
            .par_chunks(TASK_ELEMENTS)
            .zip(grad_values.par_chunks(TASK_ELEMENTS)),
        |out, (inp, g)| chunk(inp, g, out),
    );
    tensor(output, x.layout().shape().clone())
}

#[inline(always)]
fn layer_norm_rows<const FMA: bool>(
    input: &[f32],
    gamma: &[f32],
    beta: &[f32],
    epsilon: f32,
    output: &mut [f32],
    stats: &mut [f32],
) {
    let d = gamma.len();
    for ((x, y), stat) in input
        .chunks_exact(d)
        .zip(output.chunks_exact_mut(d))
        .zip(stats.chunks_exact_mut(2))
    {
        let mean = row_sum(x) / d as f32;
        let mut lanes = [0.0f32; 16];
        let chunks = x.chunks_exact(16);
        let tail = chunks.remainder();
        for chunk in chunks {
            for (lane, &v) in lanes.iter_mut().zip(chunk) {
                let c = v - mean;
                *lane = madd::<FMA>(c, c, *lane);
            }
        }
        let mut var: f32 = lanes.iter().sum();
        for &v in tail {
            var += (v - mean) * (v - mean);
        }
        let rstd = 1.0 / (var / d as f32 + epsilon).sqrt();
        for (((out, &v), &g), &b) in y.iter_mut().zip(x).zip(gamma).zip(beta) {
            *out = madd::<FMA>((v - mean) * rstd, g, b);
        }
        stat[0] = mean;
        stat[1] = rstd;
    }
}

/// Sum of a row with 16 partial accumulators (vectorises; one accumulator would not).
#[inline(always)]
fn row_sum(x: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 16];
    let chunks = x.chunks_exact(16);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += v;
        }
    }
    lanes.iter().sum::<f32>() + tail.iter().sum::<f32>()
}

dispatch!(fn layer_norm_chunk(
    input: &[f32],
    gamma: &[f32],
    beta: &[f32],
    epsilon: f32,
    output: &mut [f32],
    stats: &mut [f32],
) = layer_norm_rows);

/// Rows per parallel task for rows of `d` values.
fn rows_per_task(d: usize) -> usize {
    (TASK_ELEMENTS / d.max(1)).max(1)
}

/// LayerNorm forward over the last dimension; also returns each row's mean and 1/σ.
pub fn layer_norm_forward(
    x: &FlexTensor,
    gamma: &FlexTensor,
    beta: &FlexTensor,
    epsilon: f32,
) -> (FlexTensor, FlexTensor) {
    let input = values(x);
    let gamma = values(gamma);
    let beta = values(beta);
    let d = gamma.len();
    let rows = input.len() / d;
    let mut stats = vec![0.0f32; rows * 2];
    let per_task = rows_per_task(d);
    let output = par_output(
        input.len(),
        per_task * d,
        input
            .par_chunks(per_task * d)
            .zip(stats.par_chunks_mut(per_task * 2)),
        |out, (inp, stat)| layer_norm_chunk(inp, &gamma, &beta, epsilon, out, stat),
    );
    let stats_len = stats.len();
    (
        tensor(output, x.layout().shape().clone()),
        tensor(stats, burn::tensor::Shape::new([stats_len])),
    )
}

#[inline(always)]
fn layer_norm_grad_rows<const FMA: bool>(
    input: &[f32],
    gamma: &[f32],
    stats: &[f32],
    grad: &[f32],
    dx: &mut [f32],
) {
    let d = gamma.len();
    for (((x, g), stat), out) in input
        .chunks_exact(d)
        .zip(grad.chunks_exact(d))
        .zip(stats.chunks_exact(2))
        .zip(dx.chunks_exact_mut(d))
    {
        let (mean, rstd) = (stat[0], stat[1]);
        // dx = rstd · (ĝ − mean(ĝ) − x̂ · mean(ĝ x̂)), ĝ = g γ, x̂ = (x − mean) rstd
        let mut sum_g = [0.0f32; 16];
        let mut sum_gx = [0.0f32; 16];
        let chunks = x
            .chunks_exact(16)
            .zip(g.chunks_exact(16))
            .zip(gamma.chunks_exact(16));
        for ((xc, gc), wc) in chunks {
            for i in 0..16 {
                let gh = gc[i] * wc[i];
                let xh = (xc[i] - mean) * rstd;
                sum_g[i] += gh;
                sum_gx[i] = madd::<FMA>(gh, xh, sum_gx[i]);
            }
        }
        let mut a: f32 = sum_g.iter().sum();
        let mut b: f32 = sum_gx.iter().sum();
        for i in (d / 16 * 16)..d {
            let gh = g[i] * gamma[i];
            a += gh;
            b += gh * (x[i] - mean) * rstd;
        }
        let (a, b) = (a / d as f32, b / d as f32);
        for (((o, &xv), &gv), &w) in out.iter_mut().zip(x).zip(g).zip(gamma) {
            let xh = (xv - mean) * rstd;
            *o = rstd * (gv * w - a - xh * b);
        }
    }
}

dispatch!(fn layer_norm_grad_chunk(
    input: &[f32],
    gamma: &[f32],
    stats: &[f32],
    grad: &[f32],
    dx: &mut [f32],
) = layer_norm_grad_rows);

/// LayerNorm backward: gradients of the input and, when asked, of γ and β.
pub fn layer_norm_backward(
    x: &FlexTensor,
    gamma: &FlexTensor,
    stats: &FlexTensor,
    grad: &FlexTensor,
    want_input: bool,
    want_params: bool,
) -> LayerNormGrads<Flex> {
    let stats = values(stats);
    let stats: &[f32] = &stats;
    let input = values(x);
    let grad_values = values(grad);
    let gamma_values = values(gamma);
    let d = gamma_values.len();
    let dx = want_input.then(|| {
        let per_task = rows_per_task(d);
        let dx = par_output(
            input.len(),
            per_task * d,
            input
                .par_chunks(per_task * d)
                .zip(grad_values.par_chunks(per_task * d))
                .zip(stats.par_chunks(per_task * 2)),
            |out, ((inp, g), stat)| layer_norm_grad_chunk(inp, &gamma_values, stat, g, out),
        );
        tensor(dx, x.layout().shape().clone())
    });
    if !want_params {
        return (dx, None, None);
    }
    // γ and β of the frozen backbone never need this; an adapter-side LayerNorm would.
    let mut dgamma = vec![0.0f32; d];
    let mut dbeta = vec![0.0f32; d];
    for ((x, g), stat) in input
        .chunks_exact(d)
        .zip(grad_values.chunks_exact(d))
        .zip(stats.chunks_exact(2))
    {
        for i in 0..d {
            dgamma[i] += g[i] * (x[i] - stat[0]) * stat[1];
            dbeta[i] += g[i];
        }
    }
    let shape = gamma.layout().shape().clone();
    (
        dx,
        Some(tensor(dgamma, shape.clone())),
        Some(tensor(dbeta, shape)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, Tolerance};

    type AB = Autodiff<Flex>;

    /// The second (output, input gradient) pair of `results` against the first.
    pub(super) fn assert_same_outputs<const D: usize>(
        results: &[(Tensor<Flex, D>, Tensor<Flex, D>)],
        tolerance: Tolerance<f32>,
    ) {
        for (got, want) in [
            (&results[1].0, &results[0].0),
            (&results[1].1, &results[0].1),
        ] {
            got.to_data()
                .assert_approx_eq::<f32>(&want.to_data(), tolerance);
        }
    }

    /// Every value of a parallel output is written once, in order, including a short last
    /// piece; each piece starts zeroed; and inputs that do not match the pieces are refused
    /// rather than leaving values uninitialised.
    #[test]
    fn par_output_fills_every_piece_from_its_input() {
        let input: Vec<f32> = (0..1000).map(|i| i as f32).collect();
        let output = par_output(1000, 64, input.par_chunks(64), |out, inp| {
            assert!(out.iter().all(|&v| v == 0.0));
            for (o, &v) in out.iter_mut().zip(inp) {
                *o += 2.0 * v;
            }
        });
        assert_eq!(output, input.iter().map(|v| 2.0 * v).collect::<Vec<_>>());
        assert!(par_zeros(40_000).iter().all(|&v| v == 0.0));
        assert!(par_zeros(0).is_empty());
        let mismatched = std::panic::catch_unwind(|| {
            par_output(1000, 64, input.par_chunks(100), |_, _| {});
        });
        assert!(mismatched.is_err());
    }

    #[test]
    fn exp_approx_is_within_a_few_ulp_on_both_paths() {
        let mut worst = [0.0f64; 2];
        let mut x = -87.0f32;
        while x < 88.0 {
            let exact = (x as f64).exp();
            for (path, value) in [exp_approx::<false>(x), exp_approx::<true>(x)]
                .iter()
                .enumerate()
            {
                worst[path] = worst[path].max(((*value as f64 - exact) / exact).abs());
            }
            x += 0.0137;
        }
        assert!(
            worst[0] < 3e-7 && worst[1] < 3e-7,
            "relative errors {worst:?}"
        );
        assert_eq!(
            exp_approx::<false>(-1000.0),
            exp_approx::<false>(-87.336_55)
        );
        assert!(exp_approx::<false>(1000.0).is_finite());
    }

    /// LayerNorm on the autodiff backend, fused or by burn's own ops (the reference).
    fn layer_norm_by(
        fused: bool,
        x: Tensor<AB, 3>,
        gamma: Tensor<AB, 1>,
        beta: Tensor<AB, 1>,
    ) -> Tensor<AB, 3> {
        let (x, gamma, beta) = (
            x.into_primitive().tensor(),
            gamma.into_primitive().tensor(),
            beta.into_primitive().tensor(),
        );
        Tensor::from_primitive(TensorPrimitive::Float(if fused {
            AB::layer_norm_fused(x, gamma, beta, 1e-5)
        } else {
            AB::layer_norm(x, gamma, Some(beta), 1e-5)
        }))
    }

    #[test]
    fn layer_norm_matches_burn_forward_and_backward() {
        let device = Default::default();
        // 2·50 rows of 83: not a multiple of 16 (tails), more rows than one task.
        let x = Tensor::<Flex, 3>::random([2, 50, 83], Distribution::Normal(0.5, 2.0), &device);
        let gamma = Tensor::<Flex, 1>::random([83], Distribution::Normal(1.0, 0.3), &device);
        let beta = Tensor::<Flex, 1>::random([83], Distribution::Normal(0.0, 0.3), &device);
        let weights =
            Tensor::<Flex, 3>::random([2, 50, 83], Distribution::Normal(0.0, 1.0), &device);
        let mut results = Vec::new();
        for fused in [false, true] {
            let x = Tensor::<AB, 3>::from_inner(x.clone()).require_grad();
            let gamma = Tensor::<AB, 1>::from_inner(gamma.clone()).require_grad();
            let beta = Tensor::<AB, 1>::from_inner(beta.clone()).require_grad();
            let y = layer_norm_by(fused, x.clone(), gamma.clone(), beta.clone());
            // A loss whose gradient is not uniform, so every term of the backward counts.
            let loss = (y.clone() * Tensor::from_inner(weights.clone())).sum();
            let grads = loss.backward();
            results.push((
                y.inner(),
                x.grad(&grads).unwrap(),
                gamma.grad(&grads).unwrap(),
                beta.grad(&grads).unwrap(),
            ));
        }
        let (reference, fused) = (&results[0], &results[1]);
        let tolerance = Tolerance::<f32>::absolute(2e-5);
        fused
            .0
            .to_data()
            .assert_approx_eq::<f32>(&reference.0.to_data(), tolerance);
        fused
            .1
            .to_data()
            .assert_approx_eq::<f32>(&reference.1.to_data(), tolerance);
        fused
            .2
            .to_data()
            .assert_approx_eq::<f32>(&reference.2.to_data(), Tolerance::absolute(1e-3));
        fused
            .3
            .to_data()
            .assert_approx_eq::<f32>(&reference.3.to_data(), Tolerance::absolute(1e-3));
    }

    #[test]
    fn layer_norm_of_a_frozen_norm_keeps_no_parameter_gradient() {
        let device = Default::default();
        let x = Tensor::<AB, 3>::random([1, 4, 32], Distribution::Default, &device).require_grad();
        let gamma = Tensor::<AB, 1>::ones([32], &device);
        let beta = Tensor::<AB, 1>::zeros([32], &device);
        let y = layer_norm_by(true, x.clone(), gamma.clone(), beta.clone());
        let grads = y.powi_scalar(2).sum().backward();
        assert!(x.grad(&grads).is_some());
        assert!(gamma.grad(&grads).is_none() && beta.grad(&grads).is_none());
    }

    #[test]
    fn erfc_approx_is_relatively_accurate_into_the_tail() {
        // Against an f64 reference (series / continued fraction) on a fine grid of z, up to
        // where erfc underflows f32's normal range.
        // [bulk (z < 2, erfc > 4.7e-3), tail] × [baseline, FMA]
        let mut worst = [[0.0f64; 2]; 2];
        let mut z = 0.0f32;
        while z < 9.0 {
            let exact = erfc_f64(z as f64);
            for (path, value) in [erfc_approx::<false>(z), erfc_approx::<true>(z)]
                .iter()
                .enumerate()
            {
                let error = ((*value as f64 - exact) / exact).abs();
                let part = &mut worst[usize::from(z >= 2.0)][path];
                *part = part.max(error);
            }
            z += 0.0031;
        }
        // The fit's 1.2e-7, exp's 3e-7, and in the tail the f32 rounding of the exponent
        // −z² + p (half an ulp of 82 is 3.8e-6 relative at z = 9), as in any f32 erfc.
        assert!(
            worst[0].iter().all(|&e| e < 1e-6) && worst[1].iter().all(|&e| e < 1e-5),
            "relative errors {worst:?}"
        );
    }

    /// erfc in f64 to ~1e-15: Taylor series of erf below 3, Lentz's continued fraction above.
    fn erfc_f64(z: f64) -> f64 {
        if z < 3.0 {
            let (mut term, mut sum, mut n) = (z, z, 0.0);
            while term.abs() > 1e-17 * sum.abs() {
                n += 1.0;
                term *= -z * z / n;
                sum += term / (2.0 * n + 1.0);
            }
            1.0 - sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            // erfc z = e^{-z²}/√π · 1/(z + 1/2/(z + 1/(z + 3/2/(z + …))))
            let mut f = z;
            for k in (1..200).rev() {
                f = z + (k as f64 / 2.0) / f;
            }
            (-z * z).exp() / std::f64::consts::PI.sqrt() / f
        }
    }

    #[test]
    fn activations_match_burn_forward_and_backward() {
        let device = Default::default();
        // Beyond ±88/1.702 too, where σ saturates, and erf-GELU's far negative tail.
        let x = Tensor::<Flex, 2>::random([37, 1001], Distribution::Normal(0.0, 30.0), &device);
        let weights =
            Tensor::<Flex, 2>::random([37, 1001], Distribution::Normal(0.0, 1.0), &device);
        for act in [HiddenAct::QuickGelu, HiddenAct::Gelu] {
            let mut results = Vec::new();
            for fused in [false, true] {
                let x = Tensor::<AB, 2>::from_inner(x.clone()).require_grad();
                let y = if fused {
                    activation(x.clone(), act)
                } else if act == HiddenAct::Gelu {
                    gelu(x.clone())
                } else {
                    x.clone() * sigmoid(x.clone() * QUICK_GELU_ALPHA as f64)
                };
                let grads = (y.clone() * Tensor::from_inner(weights.clone()))
                    .sum()
                    .backward();
                results.push((y.inner(), x.grad(&grads).unwrap()));
            }
            assert_same_outputs(
                &results,
                Tolerance::<f32>::relative(1e-5).set_absolute(1e-5),
            );
            // And the inference backend runs the same kernel.
            activation(x.clone(), act)
                .to_data()
                .assert_approx_eq::<f32>(&results[1].0.to_data(), Tolerance::absolute(0.0));
        }
    }

    #[test]
    fn gelu_kernel_is_exact_in_the_negative_tail() {
        // x = −8: Φ(−8) ≈ 6.2e-16, so the GELU is ≈ −5.0e-15; `1 − erf` in f32 would give 0
        // or a wrong sign, an absolute-tolerance test would not notice.
        let device = Default::default();
        let x = Tensor::<Flex, 1>::from_floats([-8.0, -5.0, -2.0], &device);
        let y: Vec<f32> = activation(x, HiddenAct::Gelu).to_data().to_vec().unwrap();
        for (x, y) in [-8.0f64, -5.0, -2.0].iter().zip(y) {
            let exact = x * 0.5 * erfc_f64(-x / std::f64::consts::SQRT_2);
            assert!(
                ((y as f64 - exact) / exact).abs() < 1e-5,
                "gelu({x}) = {y}, exact {exact}"
            );
        }
    }

    /// The backward that a backend without kernels would run (burn's ops) agrees with the
    /// kernels': the default methods are checked here, on the CPU.
    #[test]
    fn composite_backwards_match_the_kernels() {
        let device = Default::default();
        let x = Tensor::<Flex, 2>::random([64, 77], Distribution::Normal(0.0, 2.0), &device);
        let grad = Tensor::<Flex, 2>::random([64, 77], Distribution::Normal(0.0, 1.0), &device);
        let gamma = Tensor::<Flex, 1>::random([77], Distribution::Normal(1.0, 0.2), &device);
        let beta = Tensor::<Flex, 1>::random([77], Distribution::Normal(0.0, 0.2), &device);
        let p = |t: &Tensor<Flex, 2>| t.clone().into_primitive().tensor();
        let (gamma, beta) = (
            gamma.into_primitive().tensor(),
            beta.into_primitive().tensor(),
        );
        let (_, stats) = Flex::layer_norm_saving(&p(&x), &gamma, &beta, 1e-5).unwrap();
        let kernel =
            Flex::layer_norm_grad(p(&x), gamma.clone(), stats.clone(), p(&grad), true, true);
        let composite =
            layer_norm_grad_composite::<Flex>(p(&x), gamma, stats, p(&grad), true, true);
        for (k, c) in [
            (kernel.0, composite.0),
            (kernel.1, composite.1),
            (kernel.2, composite.2),
        ] {
            let (k, c) = (k.unwrap().into_data(), c.unwrap().into_data());
            k.assert_approx_eq::<f32>(&c, Tolerance::absolute(1e-4));
        }
        for act in [HiddenAct::QuickGelu, HiddenAct::Gelu] {
            let kernel = Flex::activation_grad(p(&x), p(&grad), act).into_data();
            let composite = activation_grad_composite::<Flex>(p(&x), p(&grad), act).into_data();
            let tolerance = Tolerance::relative(1e-5).set_absolute(1e-5);
            kernel.assert_approx_eq::<f32>(&composite, tolerance);
        }
        // The tanh GELU has no kernel: its composite gradient against autodiff's.
        let leaf = Tensor::<AB, 2>::from_inner(x.clone()).require_grad();
        let grads = (gelu_approximate(leaf.clone()) * Tensor::from_inner(grad.clone()))
            .sum()
            .backward();
        let autodiff = leaf.grad(&grads).unwrap().into_data();
        let composite =
            activation_grad_composite::<Flex>(p(&x), p(&grad), HiddenAct::GeluTanh).into_data();
        composite.assert_approx_eq::<f32>(&autodiff, Tolerance::relative(1e-4).set_absolute(1e-5));
    }
}
