//! `rsitrd embed`: the command-line embedding contract (one JSON line per input).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::model::Embedder;
use crate::model::device::BackbonePrecision;
use crate::model::kernels::ModelBackend;
use crate::model::preprocess::{ImageLimits, load_image};

/// The inputs of `rsitrd embed`.
pub struct EmbedJob<'a> {
    pub model: &'a Path,
    pub adapter: Option<&'a Path>,
    pub images: &'a [PathBuf],
    pub texts: &'a [String],
    /// (is_image, index) in command-line order.
    pub order: &'a [(bool, usize)],
    pub max_pixels: u64,
    pub batch_size: usize,
    pub precision: BackbonePrecision,
}

/// Embeds the job's inputs and writes one JSON line per input, in command-line order:
/// `{"kind": "image"|"text", "input": …, "embedding": […]}`, L2-normalized (the contract
/// other tools rely on, ARCHITECTURE.md).
pub fn embed_lines<B: ModelBackend>(
    device: &B::Device,
    job: &EmbedJob<'_>,
    out: &mut impl Write,
) -> Result<()> {
    let EmbedJob {
        model,
        adapter,
        images,
        texts,
        order,
        max_pixels,
        batch_size,
        precision,
    } = *job;
    if images.is_empty() && texts.is_empty() {
        bail!("nothing to embed: give at least one --image or --text");
    }
    let mut embedder = Embedder::<B>::load(model, adapter, precision, device)?;
    embedder.batch_size = batch_size;
    let size = embedder.image_size();
    let pixels: Vec<Vec<f32>> = images
        .iter()
        .map(|path| {
            let bytes = std::fs::read(path)
                .with_context(|| format!("cannot read image {}", path.display()))?;
            Ok(load_image(
                &bytes,
                &path.display().to_string(),
                &ImageLimits::with_max_pixels(max_pixels),
                size,
            )?)
        })
        .collect::<Result<_>>()?;
    let refs: Vec<&[f32]> = pixels.iter().map(Vec::as_slice).collect();
    let image_embeddings = embedder.embed_pixels(&refs);
    let text_embeddings = embedder.embed_texts(texts);
    for &(is_image, index) in order {
        let line = if is_image {
            serde_json::json!({"kind": "image", "input": images[index].display().to_string(),
                "embedding": image_embeddings[index]})
        } else {
            serde_json::json!({"kind": "text", "input": texts[index],
                "embedding": text_embeddings[index]})
        };
        writeln!(out, "{line}")?;
    }
    Ok(())
}
