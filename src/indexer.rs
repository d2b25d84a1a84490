//! Stored samples into index points: the work of the index worker (freshness and a
//! promotion's re-embed), with unusable samples quarantined on the way.

use crate::index::{IndexPoint, sample_points};
use crate::model::Embedder;
use crate::model::kernels::ModelBackend;
use crate::model::preprocess::ImageLimits;
use crate::store::{SampleRecord, Store};
use crate::stored::{SampleError, usable_pixels};

/// Embeds records with `embedder` into index points of `version`; returns the points and
/// how many samples they hold. A record that cannot be used (deterministically) is
/// quarantined under `stage` and left out; a transient failure (disk) fails the batch, which
/// is retried.
pub fn embed_points<B: ModelBackend>(
    store: &Store,
    embedder: &Embedder<B>,
    version: u64,
    records: &[SampleRecord],
    limits: &ImageLimits,
    stage: &str,
) -> Result<(Vec<IndexPoint>, usize), SampleError> {
    let (pixels, usable) = usable_pixels(store, records, embedder.image_size(), limits, stage)?;
    if usable.is_empty() {
        return Ok((Vec::new(), 0));
    }
    let refs: Vec<&[f32]> = pixels.iter().map(Vec::as_slice).collect();
    let images = embedder.embed_pixels(&refs);
    let captions: Vec<&str> = usable
        .iter()
        .flat_map(|r| r.captions.iter().map(String::as_str))
        .collect();
    let mut texts = embedder.embed_texts(&captions).into_iter();
    let mut points = Vec::new();
    let embedded = usable.len();
    for (record, image) in usable.into_iter().zip(images) {
        let caption_vectors: Vec<Vec<f32>> = texts.by_ref().take(record.captions.len()).collect();
        points.extend(sample_points(record, version, image, caption_vectors));
    }
    Ok((points, embedded))
}
