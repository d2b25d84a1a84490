//! The HMMC loss (hybrid multi-modal contrastive, METHOD.md) and its InfoNCE variant.

use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use burn::tensor::{Bool, TensorData};
use serde::{Deserialize, Serialize};

/// Which contrastive term the three HMMC parts use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LossKind {
    /// VSE++ hinge with the hardest in-batch negative (the reference code).
    #[default]
    Hmmc,
    /// Symmetric cross-entropy over the scaled similarity matrix.
    Infonce,
}

impl std::str::FromStr for LossKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "hmmc" => Ok(Self::Hmmc),
            "infonce" => Ok(Self::Infonce),
            other => Err(format!("unknown loss `{other}` (expected hmmc or infonce)")),
        }
    }
}

/// Loss hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossConfig {
    pub kind: LossKind,
    /// Hinge margin m (0.2).
    pub margin: f64,
    /// InfoNCE logit scale (inverse temperature).
    pub scale: f64,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            kind: LossKind::Hmmc,
            margin: 0.2,
            scale: 1.0 / 0.07,
        }
    }
}

/// The three HMMC terms and their sum (weights 1 : 1 : 1).
pub struct HmmcTerms<B: Backend> {
    /// `L(img, txt)`: the inter-modal term.
    pub image_text: Tensor<B, 1>,
    /// `L(img, img_aug)`: intra-modal, images.
    pub image_image: Tensor<B, 1>,
    /// `L(txt, txt_aug)`: intra-modal, texts.
    pub text_text: Tensor<B, 1>,
    pub total: Tensor<B, 1>,
}

/// `[n, n]` boolean identity.
fn identity_mask<B: Backend>(n: usize, device: &B::Device) -> Tensor<B, 2, Bool> {
    let values: Vec<bool> = (0..n * n).map(|i| i / n == i % n).collect();
    Tensor::from_data(TensorData::new(values, [n, n]), device)
}

/// VSE++ max-violation hinge on the cosine matrix `S = a bᵀ` (rows: `a`, positives on the
/// diagonal), summed over the batch:
/// `Σ_i max_{j≠i} [m + S_ij − S_ii]_+ + Σ_j max_{i≠j} [m + S_ij − S_jj]_+`.
///
/// - `a`, `b`: `[n, dim]`, L2-normalized; returns `[1]`.
pub fn max_violation_hinge<B: Backend>(
    a: Tensor<B, 2>,
    b: Tensor<B, 2>,
    margin: f64,
) -> Tensor<B, 1> {
    let n = a.dims()[0];
    let device = a.device();
    let scores = a.clone().matmul(b.clone().transpose()); // [n, n]
    let diagonal = (a * b).sum_dim(1); // [n, 1]
    let mask = identity_mask::<B>(n, &device);
    let cost_rows = (scores.clone() - diagonal.clone() + margin)
        .clamp_min(0.0)
        .mask_fill(mask.clone(), 0.0);
    let cost_cols = (scores - diagonal.transpose() + margin)
        .clamp_min(0.0)
        .mask_fill(mask, 0.0);
    cost_rows.max_dim(1).sum() + cost_cols.max_dim(0).sum()
}

/// Symmetric InfoNCE: mean cross-entropy of `scale · a bᵀ` over rows and over columns.
pub fn info_nce<B: Backend>(a: Tensor<B, 2>, b: Tensor<B, 2>, scale: f64) -> Tensor<B, 1> {
    let n = a.dims()[0];
    let device = a.device();
    let logits = a.matmul(b.transpose()) * scale; // [n, n]
    let eye = identity_mask::<B>(n, &device).float();
    let rows = (log_softmax(logits.clone(), 1) * eye.clone()).sum();
    let cols = (log_softmax(logits, 0) * eye).sum();
    (rows + cols) * (-0.5 / n as f64)
}

impl LossConfig {
    /// One contrastive term between two aligned batches of normalized embeddings.
    pub fn term<B: Backend>(&self, a: Tensor<B, 2>, b: Tensor<B, 2>) -> Tensor<B, 1> {
        match self.kind {
            LossKind::Hmmc => max_violation_hinge(a, b, self.margin),
            LossKind::Infonce => info_nce(a, b, self.scale),
        }
    }

    /// `L(img, txt) + L(img, img_aug) + L(txt, txt_aug)`; all inputs `[n, dim]`, normalized.
    pub fn hmmc<B: Backend>(
        &self,
        image: Tensor<B, 2>,
        text: Tensor<B, 2>,
        image_aug: Tensor<B, 2>,
        text_aug: Tensor<B, 2>,
    ) -> HmmcTerms<B> {
        let image_text = self.term(image.clone(), text.clone());
        let image_image = self.term(image, image_aug);
        let text_text = self.term(text, text_aug);
        let total = image_text.clone() + image_image.clone() + text_text.clone();
        HmmcTerms {
            image_text,
            image_image,
            text_text,
            total,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    type B = Flex;

    fn tensor(rows: &[[f32; 2]]) -> Tensor<B, 2> {
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        Tensor::from_data(TensorData::new(flat, [rows.len(), 2]), &Default::default())
    }

    fn scalar(t: Tensor<B, 1>) -> f32 {
        t.into_data().to_vec::<f32>().unwrap()[0]
    }

    #[test]
    fn hinge_matches_hand_computation() {
        // a = [e1, e2, (0.6, 0.8)], b = [e1, (0.6, 0.8), e2]
        let a = tensor(&[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]);
        let b = tensor(&[[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]);
        // S = [[1, .6, 0], [0, .8, 1], [.6, 1, .8]], diag = [1, .8, .8]
        // rows (max over j≠i of m + S_ij - S_ii, m = .2):
        //   i0: max(.2+.6-1, .2+0-1) = -.2 -> 0 ; i1: max(.2+0-.8, .2+1-.8) = .4 ; i2: max(.2+.6-.8, .2+1-.8) = .4
        // cols (max over i≠j of m + S_ij - S_jj):
        //   j0: max(.2+0-1, .2+.6-1) = 0 ; j1: max(.2+.6-.8, .2+1-.8) = .4 ; j2: max(.2+0-.8, .2+1-.8) = .4
        let loss = scalar(max_violation_hinge(a, b, 0.2));
        assert!((loss - 1.6).abs() < 1e-5, "{loss}");
    }

    #[test]
    fn hinge_is_zero_for_well_separated_pairs() {
        let a = tensor(&[[1.0, 0.0], [0.0, 1.0]]);
        assert_eq!(scalar(max_violation_hinge(a.clone(), a, 0.2)), 0.0);
    }

    #[test]
    fn info_nce_matches_hand_computation() {
        let a = tensor(&[[1.0, 0.0], [0.0, 1.0]]);
        // logits = 2·I: each row and column CE = -log(e^2 / (e^2 + 1))
        let expected = -(2f32.exp() / (2f32.exp() + 1.0)).ln();
        let loss = scalar(info_nce(a.clone(), a, 2.0));
        assert!((loss - expected).abs() < 1e-5, "{loss} vs {expected}");
    }

    #[test]
    fn hmmc_sums_three_terms() {
        let a = tensor(&[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]);
        let b = tensor(&[[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]);
        let config = LossConfig::default();
        let terms = config.hmmc(a.clone(), b.clone(), b.clone(), a.clone());
        // L(a,b) = 1.6; L(a, b) again for the image term; L(b, a) = 1.6 by symmetry of S^T.
        assert!((scalar(terms.image_text) - 1.6).abs() < 1e-5);
        assert!((scalar(terms.total) - 4.8).abs() < 1e-5);
    }
}
