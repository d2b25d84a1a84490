//! Retrieval metrics: R@1/5/10 image→text and text→image and their mean (mR), METHOD.md's
//! protocol, with ties broken pessimistically.
//!
//! Tie rule: an item tied with the ground truth counts as ranked above it, so a model that
//! scores everything equally gets rank `N-1`, never a lucky hit. Identical captions of
//! different images ("There is a piece of farmland .", common in UCM and Sydney) are embedded
//! once, so they tie exactly: for image→text, another image's copy of a caption ranks above
//! the image's own copy; for text→image, each copy is its own query and finds its own image
//! only if that image scores strictly higher than every other.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::data::{Dataset, DatasetImage, load_pixels};
use crate::model::Embedder;
use crate::model::kernels::ModelBackend;
use crate::model::preprocess::ImageError;

/// Images decoded at once while embedding a split (bounds memory: a ViT-B/32 input is 0.6 MB).
const IMAGE_CHUNK: usize = 64;

/// Recall figures in percent.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RetrievalMetrics {
    pub i2t_r1: f64,
    pub i2t_r5: f64,
    pub i2t_r10: f64,
    pub t2i_r1: f64,
    pub t2i_r5: f64,
    pub t2i_r10: f64,
    /// Mean of the six recalls.
    pub mr: f64,
    pub images: usize,
    pub captions: usize,
}

impl RetrievalMetrics {
    /// The recalls and mR by name (`mr`, `i2t_r1`, …), as adapter checkpoints record them.
    pub fn to_map(&self) -> std::collections::BTreeMap<String, f64> {
        [
            ("mr", self.mr),
            ("i2t_r1", self.i2t_r1),
            ("i2t_r5", self.i2t_r5),
            ("i2t_r10", self.i2t_r10),
            ("t2i_r1", self.t2i_r1),
            ("t2i_r5", self.t2i_r5),
            ("t2i_r10", self.t2i_r10),
        ]
        .into_iter()
        // JSON has no NaN: a figure that was not measured is left out.
        .filter(|(_, v)| v.is_finite())
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// The inverse of [`RetrievalMetrics::to_map`] (with `images` and `captions` when
    /// present); `None` if a recall is missing.
    pub fn from_map(map: &std::collections::BTreeMap<String, f64>) -> Option<Self> {
        let get = |key: &str| map.get(key).copied();
        Some(Self {
            i2t_r1: get("i2t_r1")?,
            i2t_r5: get("i2t_r5")?,
            i2t_r10: get("i2t_r10")?,
            t2i_r1: get("t2i_r1")?,
            t2i_r5: get("t2i_r5")?,
            t2i_r10: get("t2i_r10")?,
            mr: get("mr")?,
            images: get("images").unwrap_or(0.0) as usize,
            captions: get("captions").unwrap_or(0.0) as usize,
        })
    }

    /// Every figure NaN (a candidate that was not evaluated).
    pub fn nan() -> Self {
        Self {
            i2t_r1: f64::NAN,
            i2t_r5: f64::NAN,
            i2t_r10: f64::NAN,
            t2i_r1: f64::NAN,
            t2i_r5: f64::NAN,
            t2i_r10: f64::NAN,
            mr: f64::NAN,
            images: 0,
            captions: 0,
        }
    }
}

/// Computes the metrics from a row-major `[images, captions]` similarity matrix.
/// `caption_image[c]` is the image that caption `c` describes; every image needs at least one
/// caption.
pub fn retrieval_metrics(
    similarity: &[f32],
    images: usize,
    caption_image: &[usize],
) -> RetrievalMetrics {
    let captions = caption_image.len();
    assert_eq!(similarity.len(), images * captions, "similarity shape");
    // image -> text: rank of the best ground-truth caption among the non-ground-truth ones.
    let image_ranks: Vec<usize> = (0..images)
        .into_par_iter()
        .map(|image| {
            let row = &similarity[image * captions..(image + 1) * captions];
            let best = caption_image
                .iter()
                .zip(row)
                .filter(|(owner, _)| **owner == image)
                .map(|(_, score)| *score)
                .fold(f32::NEG_INFINITY, f32::max);
            caption_image
                .iter()
                .zip(row)
                .filter(|(owner, score)| **owner != image && **score >= best)
                .count()
        })
        .collect();
    // text -> image: rank of the caption's own image among the other images.
    let caption_ranks: Vec<usize> = (0..captions)
        .into_par_iter()
        .map(|caption| {
            let own = caption_image[caption];
            let target = similarity[own * captions + caption];
            (0..images)
                .filter(|&image| image != own && similarity[image * captions + caption] >= target)
                .count()
        })
        .collect();
    let recall = |ranks: &[usize], k: usize| {
        if ranks.is_empty() {
            return 0.0;
        }
        100.0 * ranks.iter().filter(|&&rank| rank < k).count() as f64 / ranks.len() as f64
    };
    let (i2t_r1, i2t_r5, i2t_r10) = (
        recall(&image_ranks, 1),
        recall(&image_ranks, 5),
        recall(&image_ranks, 10),
    );
    let (t2i_r1, t2i_r5, t2i_r10) = (
        recall(&caption_ranks, 1),
        recall(&caption_ranks, 5),
        recall(&caption_ranks, 10),
    );
    RetrievalMetrics {
        i2t_r1,
        i2t_r5,
        i2t_r10,
        t2i_r1,
        t2i_r5,
        t2i_r10,
        mr: (i2t_r1 + i2t_r5 + i2t_r10 + t2i_r1 + t2i_r5 + t2i_r10) / 6.0,
        images,
        captions,
    }
}

/// Embeddings of a set of dataset images and all their captions.
pub struct SplitEmbeddings {
    pub images: Vec<Vec<f32>>,
    pub captions: Vec<Vec<f32>>,
    /// Image index of each caption.
    pub caption_image: Vec<usize>,
}

/// Embeds `images` (decoded in parallel, in bounded chunks) and every caption of them.
pub fn embed_split<B: ModelBackend>(
    embedder: &Embedder<B>,
    dataset: &Dataset,
    images: &[&DatasetImage],
    max_pixels: u64,
) -> Result<SplitEmbeddings, ImageError> {
    let size = embedder.image_size();
    let mut image_embeddings = Vec::with_capacity(images.len());
    for chunk in images.chunks(IMAGE_CHUNK) {
        let pixels: Vec<Vec<f32>> = chunk
            .par_iter()
            .map(|image| load_pixels(&dataset.path_of(image), size, max_pixels))
            .collect::<Result<_, _>>()?;
        let refs: Vec<&[f32]> = pixels.iter().map(Vec::as_slice).collect();
        image_embeddings.extend(embedder.embed_pixels(&refs));
    }
    // Each distinct caption text is embedded once: identical captions of different images
    // (common in UCM and Sydney) get bit-identical vectors whatever the batching, so they tie
    // exactly and the tie rule decides, deterministically.
    let mut unique: Vec<&str> = Vec::new();
    let mut row_of: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    let mut caption_rows = Vec::new();
    let mut caption_image = Vec::new();
    for (index, image) in images.iter().enumerate() {
        for caption in &image.captions {
            let row = *row_of.entry(caption.as_str()).or_insert_with(|| {
                unique.push(caption.as_str());
                unique.len() - 1
            });
            caption_rows.push(row);
            caption_image.push(index);
        }
    }
    let vectors = embedder.embed_texts(&unique);
    Ok(SplitEmbeddings {
        images: image_embeddings,
        captions: caption_rows
            .iter()
            .map(|&row| vectors[row].clone())
            .collect(),
        caption_image,
    })
}

/// R@K and mR of `images` under `embedder`.
pub fn evaluate<B: ModelBackend>(
    embedder: &Embedder<B>,
    dataset: &Dataset,
    images: &[&DatasetImage],
    max_pixels: u64,
) -> Result<RetrievalMetrics, ImageError> {
    let embeddings = embed_split(embedder, dataset, images, max_pixels)?;
    Ok(metrics_of(&embeddings))
}

/// Metrics of already computed embeddings.
pub fn metrics_of(embeddings: &SplitEmbeddings) -> RetrievalMetrics {
    let similarity = similarity_matrix(&embeddings.images, &embeddings.captions);
    retrieval_metrics(
        &similarity,
        embeddings.images.len(),
        &embeddings.caption_image,
    )
}

/// Row-major `[a.len(), b.len()]` dot products of two sets of (normalized) embeddings, as
/// one matmul on the CPU backend.
pub fn similarity_matrix(a: &[Vec<f32>], b: &[Vec<f32>]) -> Vec<f32> {
    use burn::tensor::{Tensor, TensorData};
    type Cpu = crate::model::device::Cpu;
    if a.is_empty() || b.is_empty() {
        return Vec::new();
    }
    let dim = a[0].len();
    let stack = |rows: &[Vec<f32>]| -> Tensor<Cpu, 2> {
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        Tensor::from_data(
            TensorData::new(flat, [rows.len(), dim]),
            &Default::default(),
        )
    };
    stack(a)
        .matmul(stack(b).transpose())
        .into_data()
        .to_vec::<f32>()
        .expect("f32 similarity")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_ranks_with_unequal_caption_counts() {
        // 3 images; image 0 has captions 0,1; image 1 has caption 2; image 2 has captions 3,4,5.
        let owners = [0, 0, 1, 2, 2, 2];
        #[rustfmt::skip]
        let sim = [
            // c0   c1   c2   c3   c4   c5
            0.9, 0.1, 0.5, 0.2, 0.0, 0.0, // image 0: best gt 0.9 -> rank 0
            0.8, 0.0, 0.3, 0.1, 0.9, 0.0, // image 1: gt 0.3; beaten by c0 .8, c4 .9 -> rank 2
            0.0, 0.0, 0.0, 0.1, 0.2, 0.3, // image 2: best gt .3; c0,c1,c2 at 0 -> rank 0
        ];
        let m = retrieval_metrics(&sim, 3, &owners);
        assert!((m.i2t_r1 - 200.0 / 3.0).abs() < 1e-9);
        assert_eq!(m.i2t_r5, 100.0);
        // text -> image ranks: c0: own .9 vs .8,0 -> 0; c1: own .1 vs 0,0 -> 0;
        // c2: own .3 vs .5, 0 -> 1; c3: own .1 vs .2, .1 (tie) -> 2; c4: own .2 vs 0, .9 -> 1;
        // c5: own .3 vs 0, 0 -> 0.
        assert!((m.t2i_r1 - 50.0).abs() < 1e-9);
        assert!((m.t2i_r5 - 100.0).abs() < 1e-9);
        assert_eq!(m.images, 3);
        assert_eq!(m.captions, 6);
        let mean = (m.i2t_r1 + m.i2t_r5 + m.i2t_r10 + m.t2i_r1 + m.t2i_r5 + m.t2i_r10) / 6.0;
        assert!((m.mr - mean).abs() < 1e-9);
    }

    #[test]
    fn ties_count_against() {
        // Everything equal: no hit at R@1 in either direction.
        let owners = [0, 1];
        let sim = [0.5; 4];
        let m = retrieval_metrics(&sim, 2, &owners);
        assert_eq!(m.i2t_r1, 0.0);
        assert_eq!(m.t2i_r1, 0.0);
        assert_eq!(m.i2t_r5, 100.0);
    }

    #[test]
    fn r10_needs_more_than_ten_items() {
        // 12 images, one caption each; caption 0's own image is beaten by 10 others.
        let n = 12;
        let owners: Vec<usize> = (0..n).collect();
        let mut sim = vec![0.0f32; n * n];
        for i in 0..n {
            sim[i * n + i] = 1.0;
        }
        for image in 1..=10 {
            sim[image * n] = 2.0;
        }
        let m = retrieval_metrics(&sim, n, &owners);
        assert!((m.t2i_r10 - 100.0 * 11.0 / 12.0).abs() < 1e-9);
        assert!((m.t2i_r1 - 100.0 * 11.0 / 12.0).abs() < 1e-9);
    }

    #[test]
    fn similarity_is_dot_product() {
        let a = vec![vec![1.0, 0.0], vec![0.6, 0.8]];
        let b = vec![vec![0.0, 1.0]];
        assert_eq!(similarity_matrix(&a, &b), vec![0.0, 0.8]);
    }
}
