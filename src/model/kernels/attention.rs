//! Multi-head self-attention as one operation with its own backward.
//!
//! burn computes attention on a `[batch, heads, tokens, head_dim]` view, so the heads of the
//! projections are copied out (`swap_dims` then a contiguous copy), the context is copied
//! back, and under `Autodiff` the softmax is five primitive passes, each kept for the
//! backward, all on one core (docs/PERFORMANCE.md, issue #15). Here the heads are read in
//! place from the `[batch, tokens, width]` projections (head `h` is columns
//! `h·head_dim..(h+1)·head_dim`, so each product is a strided gemm call), every
//! `(batch row, head)` pair is one parallel task, and the backward keeps the inputs and the
//! attention probabilities (`[batch, heads, queries, keys]`, the only intermediate it needs).

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::prelude::*;
use burn::tensor::ops::{AttentionModuleOptions, FloatTensor};
use burn::tensor::{Bool, TensorData, TensorPrimitive};
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::has_avx2_fma;
use super::{Mat, ModelBackend, exp_approx, madd, par_zeros, product, row_sum, tensor, values};

/// Which keys each query attends to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyRange {
    /// Every key.
    All,
    /// Query `i` sees keys `0..=i` (queries and keys are the same tokens).
    Causal,
    /// Every query of batch row `b` sees keys `0..=last[b]`: one pooled query per row under a
    /// causal mask (the text tower's last block).
    UpTo(Vec<usize>),
}

impl KeyRange {
    /// How many keys (from the first) query `query` of batch row `row` sees, of `keys`.
    fn visible(&self, row: usize, query: usize, keys: usize) -> usize {
        match self {
            KeyRange::All => keys,
            KeyRange::Causal => (query + 1).min(keys),
            KeyRange::UpTo(last) => (last[row] + 1).min(keys),
        }
    }
}

/// Shapes of one attention call: queries `[batch, queries, width]`, keys and values
/// `[batch, keys, width]`, `width = heads · head_dim`.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    batch: usize,
    queries: usize,
    keys: usize,
    heads: usize,
    head_dim: usize,
}

impl Geometry {
    fn of(q: &[usize], k: &[usize], v: &[usize], heads: usize, range: &KeyRange) -> Self {
        assert!(
            q.len() == 3 && k.len() == 3 && v.len() == 3,
            "attention takes 3-D tensors"
        );
        let [batch, queries, width] = [q[0], q[1], q[2]];
        assert!(
            k == v && k[0] == batch && k[2] == width,
            "attention: queries {q:?}, keys {k:?} and values {v:?} do not match"
        );
        assert!(
            heads > 0 && width % heads == 0,
            "{heads} heads do not divide width {width}"
        );
        match range {
            KeyRange::Causal => assert_eq!(queries, k[1], "causal attention needs a square"),
            KeyRange::UpTo(last) => assert_eq!(last.len(), batch, "one key limit per row"),
            KeyRange::All => {}
        }
        Self {
            batch,
            queries,
            keys: k[1],
            heads,
            head_dim: width / heads,
        }
    }

    fn width(&self) -> usize {
        self.heads * self.head_dim
    }

    /// `1/√head_dim`, the scale of the scores.
    fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }

    fn is_empty(&self) -> bool {
        self.batch * self.queries * self.keys * self.head_dim == 0
    }
}

impl Mat {
    /// Head `head` of token rows `tokens·row..` of a `[batch, tokens, width]` buffer.
    fn head(base: *const f32, g: &Geometry, tokens: usize, row: usize, head: usize) -> Self {
        let width = g.width();
        let offset = (row * tokens * width + head * g.head_dim) as isize;
        Mat {
            // SAFETY: the offset is inside the buffer (row < batch, head < heads).
            ptr: unsafe { base.offset(offset) as *mut f32 },
            row: width as isize,
            col: 1,
        }
    }
}

/// Softmax of the first `visible` scores of a row in place; the rest (masked keys) become 0.
#[inline(always)]
fn softmax_row<const FMA: bool>(row: &mut [f32], visible: usize) {
    let (live, masked) = row.split_at_mut(visible);
    masked.fill(0.0);
    if live.is_empty() {
        return;
    }
    let max = live.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    for x in live.iter_mut() {
        *x = exp_approx::<FMA>(*x - max);
    }
    let inverse = 1.0 / row_sum(live);
    for x in live.iter_mut() {
        *x *= inverse;
    }
}

dispatch!(fn softmax_rows(scores: &mut [f32], keys: usize, visible: &dyn Fn(usize) -> usize) = softmax_rows_by);

#[inline(always)]
fn softmax_rows_by<const FMA: bool>(
    scores: &mut [f32],
    keys: usize,
    visible: &dyn Fn(usize) -> usize,
) {
    for (query, row) in scores.chunks_exact_mut(keys).enumerate() {
        softmax_row::<FMA>(row, visible(query));
    }
}

/// `dS = P ⊙ (dP − Σⱼ dP ⊙ P) · scale` in place of `dP`, row by row (the softmax backward).
#[inline(always)]
fn softmax_grad_rows_by<const FMA: bool>(grad: &mut [f32], probs: &[f32], keys: usize, scale: f32) {
    for (g, p) in grad.chunks_exact_mut(keys).zip(probs.chunks_exact(keys)) {
        let mut lanes = [0.0f32; 16];
        let chunks = g.chunks_exact(16).zip(p.chunks_exact(16));
        for (gc, pc) in chunks {
            for i in 0..16 {
                lanes[i] = madd::<FMA>(gc[i], pc[i], lanes[i]);
            }
        }
        let mut dot: f32 = lanes.iter().sum();
        for i in (keys / 16 * 16)..keys {
            dot += g[i] * p[i];
        }
        for (gi, &pi) in g.iter_mut().zip(p) {
            *gi = pi * (*gi - dot) * scale;
        }
    }
}

dispatch!(fn softmax_grad_rows(grad: &mut [f32], probs: &[f32], keys: usize, scale: f32) = softmax_grad_rows_by);

/// Attention forward on f32 tensors: the output `[batch, queries, width]` and the attention
/// probabilities `[batch, heads, queries, keys]` (flat) that the backward needs.
pub fn attention_forward(
    q: &FlexTensor,
    k: &FlexTensor,
    v: &FlexTensor,
    heads: usize,
    range: &KeyRange,
) -> (FlexTensor, FlexTensor) {
    let g = Geometry::of(
        q.layout().shape(),
        k.layout().shape(),
        v.layout().shape(),
        heads,
        range,
    );
    let (q_values, k_values, v_values) = (values(q), values(k), values(v));
    let mut output = par_zeros(g.batch * g.queries * g.width());
    let mut probs = par_zeros(g.batch * g.heads * g.queries * g.keys);
    if !g.is_empty() {
        let head0 = |values: *const f32, tokens: usize| Mat::head(values, &g, tokens, 0, 0);
        let out = head0(output.as_mut_ptr(), g.queries);
        let qm = head0(q_values.as_ptr(), g.queries);
        let (km, vm) = (
            head0(k_values.as_ptr(), g.keys),
            head0(v_values.as_ptr(), g.keys),
        );
        probs
            .par_chunks_mut(g.queries * g.keys)
            .enumerate()
            .for_each(|(task, p)| {
                let (row, head) = (task / g.heads, task % g.heads);
                let at = |m: Mat, tokens: usize| Mat::head(m.ptr, &g, tokens, row, head);
                // SAFETY: q, k, v are live and only read; each task writes its own
                // probabilities and its own head's columns of its own row of the output.
                unsafe {
                    product(
                        [g.queries, g.keys, g.head_dim],
                        Mat::dense(p, g.keys),
                        false,
                        at(qm, g.queries),
                        at(km, g.keys).t(),
                        g.scale(),
                    );
                    softmax_rows(p, g.keys, &|query| range.visible(row, query, g.keys));
                    product(
                        [g.queries, g.head_dim, g.keys],
                        at(out, g.queries),
                        false,
                        Mat::dense(p, g.keys),
                        at(vm, g.keys),
                        1.0,
                    );
                }
            });
    }
    let probs_len = probs.len();
    (
        tensor(output, q.layout().shape().clone()),
        tensor(probs, burn::tensor::Shape::new([probs_len])),
    )
}

/// Attention backward: the gradients of the queries, keys and values (each only when asked
/// for), from the inputs, the saved probabilities and the output's gradient.
pub fn attention_backward(
    [q, k, v]: [&FlexTensor; 3],
    probs: &FlexTensor,
    grad: &FlexTensor,
    heads: usize,
    want: [bool; 3],
) -> [Option<FlexTensor>; 3] {
    let g = Geometry::of(
        q.layout().shape(),
        k.layout().shape(),
        v.layout().shape(),
        heads,
        &KeyRange::All,
    );
    let (q_values, k_values, v_values) = (values(q), values(k), values(v));
    let (probs, grad_values) = (values(probs), values(grad));
    let buffer = |want: bool, tokens: usize| want.then(|| par_zeros(g.batch * tokens * g.width()));
    let mut dq = buffer(want[0], g.queries);
    let mut dk = buffer(want[1], g.keys);
    let mut dv = buffer(want[2], g.keys);
    if !g.is_empty() && want.iter().any(|&w| w) {
        let head0 = |values: *const f32, tokens: usize| Mat::head(values, &g, tokens, 0, 0);
        let out0 = |buffer: &mut Option<Vec<f32>>, tokens: usize| {
            buffer.as_mut().map(|b| head0(b.as_mut_ptr(), tokens))
        };
        let qm = head0(q_values.as_ptr(), g.queries);
        let (km, vm) = (
            head0(k_values.as_ptr(), g.keys),
            head0(v_values.as_ptr(), g.keys),
        );
        let dom = head0(grad_values.as_ptr(), g.queries);
        let dqm = out0(&mut dq, g.queries);
        let (dkm, dvm) = (out0(&mut dk, g.keys), out0(&mut dv, g.keys));
        let probs = Mat {
            ptr: probs.as_ptr() as *mut f32,
            row: g.keys as isize,
            col: 1,
        };
        (0..g.batch * g.heads).into_par_iter().for_each_init(
            || vec![0.0f32; g.queries * g.keys],
            |scratch, task| {
                let (row, head) = (task / g.heads, task % g.heads);
                let at = |m: Mat, tokens: usize| Mat::head(m.ptr, &g, tokens, row, head);
                let p = probs.skip(task * g.queries * g.keys);
                let d_out = at(dom, g.queries);
                // SAFETY: the inputs are live and only read; each task writes its own head's
                // columns of its own row of dq, dk and dv, and its own scratch.
                unsafe {
                    if let Some(dvm) = dvm {
                        // dV = Pᵀ dO
                        product(
                            [g.keys, g.head_dim, g.queries],
                            at(dvm, g.keys),
                            false,
                            p.t(),
                            d_out,
                            1.0,
                        );
                    }
                    if dqm.is_none() && dkm.is_none() {
                        return;
                    }
                    // dP = dO Vᵀ, then dS (scaled) in its place
                    let ds = Mat::dense(scratch, g.keys);
                    product(
                        [g.queries, g.keys, g.head_dim],
                        ds,
                        false,
                        d_out,
                        at(vm, g.keys).t(),
                        1.0,
                    );
                    let p_slice = std::slice::from_raw_parts(p.ptr, g.queries * g.keys);
                    softmax_grad_rows(scratch, p_slice, g.keys, g.scale());
                    let ds = Mat::dense(scratch, g.keys);
                    if let Some(dqm) = dqm {
                        // dQ = dS K
                        product(
                            [g.queries, g.head_dim, g.keys],
                            at(dqm, g.queries),
                            false,
                            ds,
                            at(km, g.keys),
                            1.0,
                        );
                    }
                    if let Some(dkm) = dkm {
                        // dK = dSᵀ Q
                        product(
                            [g.keys, g.head_dim, g.queries],
                            at(dkm, g.keys),
                            false,
                            ds.t(),
                            at(qm, g.queries),
                            1.0,
                        );
                    }
                }
            },
        );
    }
    let finish = |buffer: Option<Vec<f32>>, like: &FlexTensor| {
        buffer.map(|b| tensor(b, like.layout().shape().clone()))
    };
    [finish(dq, q), finish(dk, k), finish(dv, v)]
}

// ---------------------------------------------------------------------------------------------
// burn's ops (any backend) and the autodiff node
// ---------------------------------------------------------------------------------------------

/// `[batch, tokens, width]` → `[batch, heads, tokens, head_dim]`.
fn split<B: Backend>(t: Tensor<B, 3>, heads: usize) -> Tensor<B, 4> {
    let [batch, tokens, width] = t.dims();
    t.reshape([batch, tokens, heads, width / heads])
        .swap_dims(1, 2)
}

/// `[batch, heads, tokens, head_dim]` → `[batch, tokens, width]`.
fn merge<B: Backend>(t: Tensor<B, 4>) -> Tensor<B, 3> {
    let [batch, heads, tokens, head_dim] = t.dims();
    t.swap_dims(1, 2).reshape([batch, tokens, heads * head_dim])
}

fn float<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// Attention in burn's ops (any backend, with or without autodiff).
pub fn attention_composite<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    heads: usize,
    range: &KeyRange,
) -> FloatTensor<B> {
    let (q, k, v) = (float::<B, 3>(q), float::<B, 3>(k), float::<B, 3>(v));
    let [batch, queries, _] = q.dims();
    let keys = k.dims()[1];
    let device = q.device();
    let mut options = AttentionModuleOptions::default();
    let mask = match range {
        KeyRange::All => None,
        KeyRange::Causal => {
            options.is_causal = true;
            None
        }
        KeyRange::UpTo(_) => {
            // true = masked
            let masked: Vec<bool> = (0..batch * queries * keys)
                .map(|i| {
                    let (row, query, key) = (i / (queries * keys), i / keys % queries, i % keys);
                    key >= range.visible(row, query, keys)
                })
                .collect();
            let mask = TensorData::new(masked, [batch, 1, queries, keys]);
            Some(
                Tensor::<B, 4, Bool>::from_data(mask, &device)
                    .expand([batch, heads, queries, keys]),
            )
        }
    };
    let context = burn::tensor::module::attention(
        split(q, heads),
        split(k, heads),
        split(v, heads),
        mask,
        None,
        options,
    );
    merge(context).into_primitive().tensor()
}

/// The attention backward in burn's ops (any backend), from the saved probabilities.
pub fn attention_grad_composite<B: Backend>(
    [q, k, v]: [FloatTensor<B>; 3],
    probs: FloatTensor<B>,
    grad: FloatTensor<B>,
    heads: usize,
    want: [bool; 3],
) -> [Option<FloatTensor<B>>; 3] {
    let (q, k, v) = (float::<B, 3>(q), float::<B, 3>(k), float::<B, 3>(v));
    let [batch, queries, width] = q.dims();
    let keys = k.dims()[1];
    let scale = 1.0 / ((width / heads) as f64).sqrt();
    let p = float::<B, 1>(probs).reshape([batch, heads, queries, keys]);
    let d_out = split(float::<B, 3>(grad), heads);
    let dv = want[2].then(|| merge(p.clone().swap_dims(2, 3).matmul(d_out.clone())));
    let (dq, dk) = if want[0] || want[1] {
        let dp = d_out.matmul(split(v, heads).swap_dims(2, 3));
        let dot = (dp.clone() * p.clone()).sum_dim(3);
        let ds = p * (dp - dot) * scale;
        (
            want[0].then(|| merge(ds.clone().matmul(split(k, heads)))),
            want[1].then(|| merge(ds.swap_dims(2, 3).matmul(split(q, heads)))),
        )
    } else {
        (None, None)
    };
    [dq, dk, dv].map(|t| t.map(|t| t.into_primitive().tensor()))
}

/// Attention under `Autodiff`: the inner backend's kernel with its own backward node, else
/// burn's ops (differentiated by burn).
pub fn attention_autodiff<B: ModelBackend, C: CheckpointStrategy>(
    q: FloatTensor<Autodiff<B, C>>,
    k: FloatTensor<Autodiff<B, C>>,
    v: FloatTensor<Autodiff<B, C>>,
    heads: usize,
    range: &KeyRange,
) -> FloatTensor<Autodiff<B, C>> {
    /// State: queries, keys, values and the probabilities.
    #[derive(Debug)]
    struct AttentionBackward {
        heads: usize,
    }

    impl<B: ModelBackend> Backward<B, 3> for AttentionBackward {
        type State = [FloatTensor<B>; 4];

        fn backward(
            self,
            ops: Ops<Self::State, 3>,
            grads: &mut Gradients,
            _checkpointer: &mut Checkpointer,
        ) {
            let grad = grads.consume::<B>(&ops.node);
            let [q, k, v, probs] = ops.state;
            let want = ops.parents.each_ref().map(Option::is_some);
            let d = B::attention_grad([q, k, v], probs, grad, self.heads, want);
            for (node, grad) in ops.parents.into_iter().zip(d) {
                if let (Some(node), Some(grad)) = (node, grad) {
                    grads.register::<B>(node.id, grad);
                }
            }
        }
    }

    let Some((output, probs)) =
        B::attention_saving(&q.primitive, &k.primitive, &v.primitive, heads, range)
    else {
        return attention_composite::<Autodiff<B, C>>(q, k, v, heads, range);
    };
    match (AttentionBackward { heads })
        .prepare::<C>([q.node.clone(), k.node.clone(), v.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            prep.finish([q.primitive, k.primitive, v.primitive, probs], output)
        }
        OpsKind::UnTracked(prep) => prep.finish(output),
    }
}

/// Attention of `q` `[batch, queries, width]` over `k`, `v` `[batch, keys, width]` with `heads`
/// heads of width `width / heads`, scores scaled by `1/√head_dim`: `[batch, queries, width]`.
pub fn attention<B: ModelBackend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    heads: usize,
    range: &KeyRange,
) -> Tensor<B, 3> {
    float(B::attention_fused(
        q.into_primitive().tensor(),
        k.into_primitive().tensor(),
        v.into_primitive().tensor(),
        heads,
        range,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::{Distribution, Tolerance};

    type AB = Autodiff<Flex>;

    /// Random queries `[batch, queries, width]` and keys/values `[batch, keys, width]`, with
    /// scores large enough that the softmax is far from uniform.
    fn inputs(batch: usize, queries: usize, keys: usize, width: usize) -> [Tensor<Flex, 3>; 3] {
        let device = Default::default();
        let normal = Distribution::Normal(0.0, 1.5);
        [
            Tensor::random([batch, queries, width], normal, &device),
            Tensor::random([batch, keys, width], normal, &device),
            Tensor::random([batch, keys, width], normal, &device),
        ]
    }

    /// The ranges under test with their shapes: every key (ViT), causal (text), and one
    /// pooled query per row under a causal mask (the text tower's last block). 21 keys: not a
    /// multiple of 16, so the row loops' tails run; 4 rows · 3 heads: more than one task each.
    fn cases() -> Vec<(KeyRange, [usize; 3])> {
        vec![
            (KeyRange::All, [4, 21, 21]),
            (KeyRange::All, [4, 1, 21]),
            (KeyRange::Causal, [4, 21, 21]),
            (KeyRange::UpTo(vec![20, 0, 7, 13]), [4, 1, 21]),
        ]
    }

    #[test]
    fn kernel_matches_burn_attention_forward() {
        for (range, [batch, queries, keys]) in cases() {
            let [q, k, v] = inputs(batch, queries, keys, 48);
            let (output, probs) = attention_forward(
                &q.clone().into_primitive().tensor(),
                &k.clone().into_primitive().tensor(),
                &v.clone().into_primitive().tensor(),
                3,
                &range,
            );
            let reference: Tensor<Flex, 3> = float(attention_composite::<Flex>(
                q.into_primitive().tensor(),
                k.into_primitive().tensor(),
                v.into_primitive().tensor(),
                3,
                &range,
            ));
            float::<Flex, 3>(output)
                .to_data()
                .assert_approx_eq::<f32>(&reference.to_data(), Tolerance::absolute(2e-5));
            // Every probability row sums to one and is zero past the query's last key.
            let probs = float::<Flex, 1>(probs).into_data().to_vec::<f32>().unwrap();
            for (i, row) in probs.chunks_exact(keys).enumerate() {
                let (batch_row, query) = (i / (3 * queries), i % queries);
                let visible = range.visible(batch_row, query, keys);
                assert!(
                    (row.iter().sum::<f32>() - 1.0).abs() < 1e-5,
                    "{range:?} row {i}"
                );
                assert!(
                    row[visible..].iter().all(|&p| p == 0.0),
                    "{range:?} row {i}"
                );
                assert!(row[..visible].iter().all(|&p| p > 0.0), "{range:?} row {i}");
            }
        }
    }

    #[test]
    fn kernel_backward_matches_autodiff_of_burn_attention() {
        let device = Default::default();
        for (range, [batch, queries, keys]) in cases() {
            let inputs = inputs(batch, queries, keys, 48);
            let weights =
                Tensor::<Flex, 3>::random([batch, queries, 48], Distribution::Default, &device);
            let mut results = Vec::new();
            for fused in [false, true] {
                let [q, k, v] = inputs
                    .clone()
                    .map(|t| Tensor::<AB, 3>::from_inner(t).require_grad());
                let (qp, kp, vp) = (
                    q.clone().into_primitive().tensor(),
                    k.clone().into_primitive().tensor(),
                    v.clone().into_primitive().tensor(),
                );
                let y: Tensor<AB, 3> = float(if fused {
                    AB::attention_fused(qp, kp, vp, 3, &range)
                } else {
                    attention_composite::<AB>(qp, kp, vp, 3, &range)
                });
                // A loss whose gradient differs per output, so every path of the backward counts.
                let grads = (y * Tensor::from_inner(weights.clone())).sum().backward();
                results.push([q, k, v].map(|t| t.grad(&grads).unwrap()));
            }
            for (name, (reference, fused)) in ["q", "k", "v"]
                .iter()
                .zip(results[0].iter().zip(&results[1]))
            {
                assert!(
                    fused
                        .to_data()
                        .as_slice::<f32>()
                        .unwrap()
                        .iter()
                        .any(|&g| g != 0.0),
                    "{range:?}: d{name} is all zero"
                );
                fused
                    .to_data()
                    .assert_approx_eq::<f32>(&reference.to_data(), Tolerance::absolute(2e-5));
            }
        }
    }

    #[test]
    fn composite_backward_matches_the_kernel_and_skips_what_is_not_asked() {
        for (range, [batch, queries, keys]) in cases() {
            let [q, k, v] = inputs(batch, queries, keys, 48).map(|t| t.into_primitive().tensor());
            let grad: Tensor<Flex, 3> = Tensor::random(
                [batch, queries, 48],
                Distribution::Default,
                &Default::default(),
            );
            let grad = grad.into_primitive().tensor();
            let (_, probs) = attention_forward(&q, &k, &v, 3, &range);
            let kernel = attention_backward([&q, &k, &v], &probs, &grad, 3, [true; 3]);
            let composite =
                attention_grad_composite::<Flex>([q, k, v], probs.clone(), grad, 3, [true; 3]);
            for (kernel, composite) in kernel.into_iter().zip(composite) {
                float::<Flex, 3>(kernel.unwrap())
                    .to_data()
                    .assert_approx_eq::<f32>(
                        &float::<Flex, 3>(composite.unwrap()).to_data(),
                        Tolerance::absolute(2e-5),
                    );
            }
        }
        let [q, k, v] = inputs(2, 5, 5, 8).map(|t| t.into_primitive().tensor());
        let (output, probs) = attention_forward(&q, &k, &v, 2, &KeyRange::Causal);
        let only_values =
            attention_backward([&q, &k, &v], &probs, &output, 2, [false, false, true]);
        assert!(only_values[0].is_none() && only_values[1].is_none() && only_values[2].is_some());
    }
}
