//! The frozen backbone's linear layers as one operation with its own backward.
//!
//! burn-flex allocates every product's output with `FlexTensor::empty`, which zeroes a byte
//! vector and then copies it into a 16-byte-aligned buffer, on the calling thread while the
//! pool waits; the bias is then a separate pass (docs/PERFORMANCE.md, issue #15). Here the
//! output is an uninitialised `Vec<f32>` (kept as it is by burn's `Bytes`), the bias is
//! written into its rows first so that gemm adds the product to it, and the backward of a
//! frozen layer computes `dX = dY Wᵀ` the same way. A layer whose weight or bias is trained
//! keeps burn's op.
//!
//! A frozen weight stored in bf16/f16 (`model.backbone_precision`) takes the mixed-precision
//! path on any backend: [`mixed_forward`] and [`mixed_input_grad`].

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::flex::FlexTensor;
use burn::prelude::*;
use burn::tensor::TensorMetadata;
use burn::tensor::ops::{FloatTensor, ModuleOps};
use rayon::prelude::*;

use super::{
    InputGrad, Mat, ModelBackend, TASK_ELEMENTS, product, record_one_input, tensor, values,
};

/// Products below this many multiply-adds run on the calling thread (burn-flex's threshold).
const PARALLEL_WORK: usize = 192 * 192 * 192;

/// Column parts of a product are multiples of this many columns (a cache line of f32).
const PART_ALIGN: usize = 16;

/// `out[rows × n] = (out if accumulate) + lhs[rows × k] · rhs`, where `rhs` is `[k, n]` at
/// strides (`rhs_row`, `rhs_col`); `out` has `rows · n` of capacity and is initialised by the
/// call (it must already be when `accumulate`).
fn product_into(
    out: &mut Vec<f32>,
    accumulate: bool,
    lhs: &[f32],
    [rows, k, n]: [usize; 3],
    rhs: &[f32],
    [rhs_row, rhs_col]: [isize; 2],
) {
    let len = rows * n;
    assert!(out.capacity() >= len && lhs.len() >= rows * k && rhs.len() >= k * n);
    assert!(!accumulate || out.len() == len);
    if k == 0 {
        // An empty sum: the bias, or zeros.
        if !accumulate {
            out.clear();
            out.resize(len, 0.0);
        }
        return;
    }
    if len == 0 {
        return;
    }
    // Split the output's columns over the pool, one single-threaded gemm per part, rather
    // than let gemm split the product: when the right-hand matrix is a transposed weight
    // (the backward's `dY Wᵀ`), gemm packs all of it on the calling thread while the pool
    // waits, once per depth block; per part, each thread packs its own columns' share.
    let parts = if rows * n * k >= PARALLEL_WORK {
        rayon::current_num_threads().clamp(1, n.div_ceil(PART_ALIGN))
    } else {
        1
    };
    let width = n.div_ceil(parts).next_multiple_of(PART_ALIGN).min(n);
    let dst = Mat {
        ptr: out.as_mut_ptr(),
        row: n as isize,
        col: 1,
    };
    let lhs = Mat {
        ptr: lhs.as_ptr() as *mut f32,
        row: k as isize,
        col: 1,
    };
    let rhs = Mat {
        ptr: rhs.as_ptr() as *mut f32,
        row: rhs_row,
        col: rhs_col,
    };
    let part = |index: usize| {
        let first = index * width;
        let cols = width.min(n.saturating_sub(first));
        if cols == 0 {
            return;
        }
        // SAFETY: the asserts above bound every matrix inside its buffer (`lhs` and `rhs`
        // are only read); part `index` writes only the columns `first..first + cols` of each
        // output row, which no other part touches, each exactly once (reading them first
        // only when `accumulate`, where they are initialised).
        unsafe {
            product(
                [rows, cols, k],
                dst.cols_from(first),
                accumulate,
                lhs,
                rhs.cols_from(first),
                1.0,
            );
        }
    };
    if parts == 1 {
        part(0);
    } else {
        (0..parts).into_par_iter().for_each(part);
    }
    // SAFETY: the parts cover all `n` columns of all `rows` rows, so each of the `len`
    // outputs is initialised.
    unsafe { out.set_len(len) };
}

/// `x W + b` over the last dimension of `x` (`W`: `[d_in, d_out]`), for f32 tensors.
pub fn linear_forward(x: &FlexTensor, w: &FlexTensor, b: Option<&FlexTensor>) -> FlexTensor {
    let [d_in, d_out] = weight_dims(w);
    let (x_values, w_values) = (values(x), values(w));
    let rows = x_values.len().checked_div(d_in).unwrap_or(0);
    let mut out = Vec::with_capacity(rows * d_out);
    if let Some(b) = b {
        let b = values(b);
        assert_eq!(b.len(), d_out, "bias of {} for {d_out} outputs", b.len());
        let per_task = (TASK_ELEMENTS / d_out.max(1)).max(1) * d_out;
        out.spare_capacity_mut()[..rows * d_out]
            .par_chunks_mut(per_task.max(1))
            .for_each(|chunk| {
                for row in chunk.chunks_mut(d_out) {
                    for (o, &v) in row.iter_mut().zip(b.iter()) {
                        o.write(v);
                    }
                }
            });
        // SAFETY: every one of the rows · d_out values was written just above.
        unsafe { out.set_len(rows * d_out) };
    }
    let accumulate = b.is_some();
    let w_strides = [d_out as isize, 1];
    product_into(
        &mut out,
        accumulate,
        &x_values,
        [rows, d_in, d_out],
        &w_values,
        w_strides,
    );
    tensor(out, with_last_dim(x, d_out))
}

/// `dX = dY Wᵀ`: the input gradient of [`linear_forward`], shaped like `dY` with `d_in` last.
pub fn linear_input_backward(w: &FlexTensor, grad: &FlexTensor) -> FlexTensor {
    let [d_in, d_out] = weight_dims(w);
    let (w_values, grad_values) = (values(w), values(grad));
    let rows = grad_values.len().checked_div(d_out).unwrap_or(0);
    let mut out = Vec::with_capacity(rows * d_in);
    // Wᵀ as a [d_out, d_in] matrix: row j is column j of W.
    let wt_strides = [1, d_out as isize];
    product_into(
        &mut out,
        false,
        &grad_values,
        [rows, d_out, d_in],
        &w_values,
        wt_strides,
    );
    tensor(out, with_last_dim(grad, d_in))
}

/// `t`'s shape with its last dimension replaced by `last`.
fn with_last_dim(t: &FlexTensor, last: usize) -> burn::tensor::Shape {
    let mut shape = t.layout().shape().clone();
    let dims = shape.num_dims();
    shape[dims - 1] = last;
    shape
}

fn weight_dims(w: &FlexTensor) -> [usize; 2] {
    let shape = w.layout().shape();
    assert_eq!(shape.num_dims(), 2, "a linear weight is 2-D");
    [shape[0], shape[1]]
}

/// `dY Wᵀ` in burn's ops (any backend); mixed precision when `w` is narrower than `grad`.
pub fn linear_input_grad_composite<B: Backend>(
    w: FloatTensor<B>,
    grad: FloatTensor<B>,
) -> FloatTensor<B> {
    match mixed_input_grad::<B>(&w, &grad) {
        Some(dx) => dx,
        None => B::linear_x_backward(w, grad),
    }
}

/// `x W + b` for a weight stored in another float type than `x` (a frozen bf16/f16 weight,
/// [`crate::model::device::BackbonePrecision`]): `x` is rounded to the weight's type, the
/// product runs in it, and the output comes back in `x`'s type, where the bias (never
/// narrowed) is added. `None` when the types agree.
pub fn mixed_forward<B: Backend>(
    x: &FloatTensor<B>,
    w: &FloatTensor<B>,
    b: Option<&FloatTensor<B>>,
) -> Option<FloatTensor<B>> {
    let (wide, narrow) = (x.dtype(), w.dtype());
    if wide == narrow {
        return None;
    }
    let product = B::linear(B::float_cast(x.clone(), narrow.into()), w.clone(), None);
    let y = B::float_cast(product, wide.into());
    Some(match b {
        Some(b) => {
            let mut dims = vec![1; y.shape().num_dims()];
            *dims
                .last_mut()
                .expect("a linear output has a last dimension") = b.shape().num_elements();
            let bias = B::float_reshape(B::float_cast(b.clone(), wide.into()), dims.into());
            B::float_add(y, bias)
        }
        None => y,
    })
}

/// `dY Wᵀ` for a weight stored in another float type than the gradient (see
/// [`mixed_forward`]), returned in the gradient's type; `None` when the types agree.
pub fn mixed_input_grad<B: Backend>(
    w: &FloatTensor<B>,
    grad: &FloatTensor<B>,
) -> Option<FloatTensor<B>> {
    let (wide, narrow) = (grad.dtype(), w.dtype());
    (wide != narrow).then(|| {
        let narrow_grad = B::float_cast(grad.clone(), narrow.into());
        B::float_cast(B::linear_x_backward(w.clone(), narrow_grad), wide.into())
    })
}

/// A linear layer under `Autodiff`: the inner backend's kernel with a backward node for the
/// input when the weight and bias are frozen; burn's op otherwise.
pub fn linear_autodiff<B: ModelBackend, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
    w: FloatTensor<Autodiff<B, C>>,
    b: Option<FloatTensor<Autodiff<B, C>>>,
) -> FloatTensor<Autodiff<B, C>> {
    let frozen =
        w.node.requirement.is_none() && b.as_ref().is_none_or(|b| b.node.requirement.is_none());
    // Only the frozen backbone is narrowed (`ClipModel::with_backbone_precision`); burn's op
    // cannot multiply two float types.
    assert!(
        frozen || x.primitive.dtype() == w.primitive.dtype(),
        "a linear weight in another float type than its input must be frozen"
    );
    let kernel = frozen
        .then(|| B::linear_kernel(&x.primitive, &w.primitive, b.as_ref().map(|b| &b.primitive)))
        .flatten();
    let Some(output) = kernel else {
        return <Autodiff<B, C> as ModuleOps<Autodiff<B, C>>>::linear(x, w, b);
    };
    // The backward keeps the weight.
    record_one_input::<B, C>(x, output, InputGrad::Linear, |_| w.primitive)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::nn::{Linear, LinearConfig};
    use burn::tensor::{DType, Distribution, TensorPrimitive, Tolerance};

    type AB = Autodiff<Flex>;

    fn fused(layer: &Linear<AB>, x: Tensor<AB, 3>) -> Tensor<AB, 3> {
        crate::model::kernels::linear(layer, x)
    }

    /// Frozen layers (the backbone's) go through the kernel and match burn's linear forward
    /// and input gradient, with and without a bias, at sizes split into column parts over
    /// the pool (widths that are not a multiple of the parts' alignment) and one that is not
    /// split.
    #[test]
    fn kernel_matches_burn_linear_for_a_frozen_layer() {
        // Three threads, so that the parts are uneven (601 → 208 + 208 + 185 columns).
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        pool.install(|| {
            let device = Default::default();
            for (bias, [batch, tokens, d_in, d_out]) in [
                (true, [2, 64, 200, 601]),
                (false, [2, 64, 200, 601]),
                (true, [1, 3, 5, 7]),
            ] {
                let layer: Linear<AB> = LinearConfig::new(d_in, d_out)
                    .with_bias(bias)
                    .init(&device)
                    .no_grad();
                let x = Tensor::<Flex, 3>::random(
                    [batch, tokens, d_in],
                    Distribution::Default,
                    &device,
                );
                let weights = Tensor::<Flex, 3>::random(
                    [batch, tokens, d_out],
                    Distribution::Default,
                    &device,
                );
                let mut results = Vec::new();
                for kernel in [false, true] {
                    let x = Tensor::<AB, 3>::from_inner(x.clone()).require_grad();
                    let y = if kernel {
                        fused(&layer, x.clone())
                    } else {
                        layer.forward(x.clone())
                    };
                    let grads = (y.clone() * Tensor::from_inner(weights.clone()))
                        .sum()
                        .backward();
                    results.push((y.inner(), x.grad(&grads).unwrap()));
                }
                super::super::tests::assert_same_outputs(
                    &results,
                    Tolerance::<f32>::absolute(1e-5),
                );
            }
        });
    }

    /// The kernels themselves against burn-flex's ops (what the autodiff test cannot tell
    /// apart from a fallback to burn's op).
    /// A frozen layer with its weight in bf16/f16 (`model.backbone_precision`): the output
    /// and the input gradient come back as f32, within the narrow type's rounding of the f32
    /// layer's, and a non-frozen narrow weight is refused.
    #[test]
    fn a_narrow_frozen_weight_gives_f32_outputs_and_gradients_within_its_rounding() {
        let device = Default::default();
        let layer: Linear<AB> = LinearConfig::new(96, 80).init(&device).no_grad();
        let x = Tensor::<Flex, 3>::random([2, 9, 96], Distribution::Default, &device);
        let weights = Tensor::<Flex, 3>::random([2, 9, 80], Distribution::Default, &device);
        let run = |layer: &Linear<AB>| {
            let x = Tensor::<AB, 3>::from_inner(x.clone()).require_grad();
            let y = fused(layer, x.clone());
            let grads = (y.clone() * Tensor::from_inner(weights.clone()))
                .sum()
                .backward();
            (y.inner(), x.grad(&grads).unwrap())
        };
        let relative = |value: &Tensor<Flex, 3>, reference: &Tensor<Flex, 3>| {
            let norm = |t: Tensor<Flex, 3>| t.powi_scalar(2).sum().sqrt().into_scalar();
            norm(value.clone() - reference.clone()) / norm(reference.clone())
        };
        let (y, dx) = run(&layer);
        // One product of depth 96 or 80: a few units of 2⁻⁸ (bf16) or 2⁻¹¹ (f16).
        for (dtype, bound) in [(DType::BF16, 0.01), (DType::F16, 0.0015)] {
            let narrow = Linear {
                weight: layer.weight.clone().map(|w| w.cast(dtype)),
                bias: layer.bias.clone(),
            };
            let (narrow_y, narrow_dx) = run(&narrow);
            for (value, reference) in [(&narrow_y, &y), (&narrow_dx, &dx)] {
                assert_eq!(value.dtype(), DType::F32);
                let error = relative(value, reference);
                assert!(error > 1e-7 && error < bound, "{dtype:?}: {error}");
            }
        }
        let trained = Linear {
            weight: layer
                .weight
                .clone()
                .map(|w| w.cast(DType::BF16).require_grad()),
            bias: None,
        };
        let refused = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            fused(&trained, Tensor::<AB, 3>::from_inner(x.clone()))
        }));
        assert!(
            refused.is_err(),
            "a trained narrow weight must not reach burn's op"
        );
    }

    #[test]
    fn kernels_match_burn_flex_linear_and_its_input_gradient() {
        let device = Default::default();
        let x = Tensor::<Flex, 3>::random([3, 17, 40], Distribution::Default, &device);
        let w = Tensor::<Flex, 2>::random([40, 24], Distribution::Default, &device);
        let b = Tensor::<Flex, 1>::random([24], Distribution::Default, &device);
        let grad = Tensor::<Flex, 3>::random([3, 17, 24], Distribution::Default, &device);
        let [x, w, b, grad] = [
            x.into_primitive().tensor(),
            w.into_primitive().tensor(),
            b.into_primitive().tensor(),
            grad.into_primitive().tensor(),
        ];
        let flex = |t: FlexTensor| Tensor::<Flex, 3>::from_primitive(TensorPrimitive::Float(t));
        let tolerance = Tolerance::<f32>::absolute(1e-5);
        for bias in [Some(&b), None] {
            let reference = Flex::linear(x.clone(), w.clone(), bias.cloned());
            flex(linear_forward(&x, &w, bias))
                .to_data()
                .assert_approx_eq::<f32>(&flex(reference).to_data(), tolerance);
        }
        let reference = Flex::linear_x_backward(w.clone(), grad.clone());
        flex(linear_input_backward(&w, &grad))
            .to_data()
            .assert_approx_eq::<f32>(&flex(reference).to_data(), tolerance);
    }

    /// A trained layer keeps burn's op, so its weight and bias still get their gradients.
    #[test]
    fn a_trained_layer_keeps_its_parameter_gradients() {
        let device = Default::default();
        let layer: Linear<AB> = LinearConfig::new(8, 4).init(&device);
        let x = Tensor::<AB, 3>::random([2, 3, 8], Distribution::Default, &device);
        let grads = fused(&layer, x.clone()).sum().backward();
        let reference = layer.forward(x).sum().backward();
        for (fused, reference) in [
            (layer.weight.grad(&grads), layer.weight.grad(&reference)),
            (
                layer
                    .bias
                    .as_ref()
                    .unwrap()
                    .grad(&grads)
                    .map(|g| g.reshape([1, 4])),
                layer
                    .bias
                    .as_ref()
                    .unwrap()
                    .grad(&reference)
                    .map(|g| g.reshape([1, 4])),
            ),
        ] {
            let (fused, reference) = (fused.unwrap(), reference.unwrap());
            fused
                .to_data()
                .assert_approx_eq::<f32>(&reference.to_data(), Tolerance::absolute(1e-5));
        }
    }
}
