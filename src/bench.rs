//! Throughput measurements of embedding and adapter training (`rsitrd bench`).
//!
//! Inputs are synthetic pixels (preprocessing excluded: it runs on other threads in the
//! daemon) and real rs-mini captions when a dataset is given, so text lengths are realistic.

use std::time::Instant;

use burn::prelude::*;
use burn::tensor::Distribution;
use serde::Serialize;

use crate::model::device::{BackbonePrecision, PrecisionError};
use crate::model::kernels::TrainBackend;
use crate::model::{AdapterConfig, ClipConfig, ClipModel, ClipTokenizer, LossConfig, tokenizer};
use crate::train::AdapterTrainer;

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub batch_size: usize,
    /// Timed iterations (after one untimed warm-up iteration).
    pub iterations: usize,
    pub image: bool,
    pub text: bool,
    pub train: bool,
    /// Time evaluation ranking (similarity + R@K) at RSICD test size.
    pub ranking: bool,
    /// Time the model's largest matmul alone (the MLP's first layer at the training shape).
    pub matmul: bool,
    /// Time the frozen linear layers' products (the vision MLP's two layers at the training
    /// shape, forward and input gradient) through the model's own linear operation.
    pub linear: bool,
    /// Captions to embed / train on (cycled).
    pub captions: Vec<String>,
    pub seed: u64,
    /// Float type of the frozen blocks' products (image, text, train and linear parts; the
    /// matmul part is the backend's f32 product).
    pub precision: BackbonePrecision,
}

/// Results; rates are per second, memory in MiB.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub device: String,
    pub config: String,
    /// `f32`, `bf16` or `f16` ([`BenchOptions::precision`]).
    pub backbone_precision: String,
    pub batch_size: usize,
    pub iterations: usize,
    pub image_embed_per_s: Option<f64>,
    pub text_embed_per_s: Option<f64>,
    pub train_pairs_per_s: Option<f64>,
    pub train_step_ms: Option<f64>,
    /// Similarity matrix + R@K/mR for 1,093 images × 5,465 captions (RSICD test), seconds.
    pub ranking_seconds: Option<f64>,
    /// The vision MLP's first matmul at the training shape ([2·batch·tokens, width] ×
    /// [width, intermediate]), GFLOP/s of the backend's matmul alone.
    pub matmul_gflops: Option<f64>,
    /// The vision MLP's frozen layers at the training shape through `ModelBackend`'s linear
    /// operation: `x W₁ + b₁`, `h W₂ + b₂` and their input gradients `dY Wᵀ`, GFLOP/s over
    /// the four products (the products of a training step, as the step runs them).
    pub linear_gflops: Option<f64>,
    pub trainable_params: usize,
    /// Peak resident memory of the process (VmHWM) at the end of the run.
    pub peak_rss_mib: Option<f64>,
}

/// Peak resident set size of this process, from `/proc/self/status`.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn batch_captions(options: &BenchOptions, iteration: usize) -> Vec<String> {
    let fallback = vec!["many buildings and green trees are around a playground".to_string()];
    let captions = if options.captions.is_empty() {
        &fallback
    } else {
        &options.captions
    };
    (0..options.batch_size)
        .map(|i| captions[(iteration * options.batch_size + i) % captions.len()].clone())
        .collect()
}

/// Runs the benchmark on a model (random or loaded) for the training backend `AB`.
pub fn run<AB: TrainBackend>(
    model: ClipModel<AB>,
    config: &ClipConfig,
    adapter: &AdapterConfig,
    device: &AB::Device,
    options: &BenchOptions,
    description: String,
) -> Result<BenchReport, PrecisionError> {
    AB::seed(device, options.seed);
    let model = model.with_backbone_precision(options.precision, device)?;
    let tokenizer = ClipTokenizer::new(config.text_config.max_position_embeddings);
    let size = config.vision_config.image_size;
    let patch = config.vision_config.patch_size;
    let patch_shape = |n: usize| [n, (size / patch) * (size / patch), 3 * patch * patch];
    let iterations = options.iterations.max(1);
    let timed = |mut body: Box<dyn FnMut(usize) + '_>| -> f64 {
        body(0); // warm-up
        let start = Instant::now();
        for iteration in 1..=iterations {
            body(iteration);
        }
        start.elapsed().as_secs_f64()
    };
    let mut report = BenchReport {
        device: format!("{device:?}"),
        config: description,
        backbone_precision: options.precision.to_string(),
        batch_size: options.batch_size,
        iterations,
        image_embed_per_s: None,
        text_embed_per_s: None,
        train_pairs_per_s: None,
        train_step_ms: None,
        ranking_seconds: None,
        matmul_gflops: None,
        linear_gflops: None,
        trainable_params: adapter.trainable_params(config),
        peak_rss_mib: None,
    };
    let per_second = |seconds: f64| (iterations * options.batch_size) as f64 / seconds;

    if options.image || options.text {
        use burn::module::AutodiffModule;
        // The product's path: `Embedder` (sub-batches on all cores, captions by length).
        let mut embedder = crate::model::Embedder::from_parts(
            model.valid(),
            config.clone(),
            crate::model::BaseModel {
                fingerprint: String::new(),
                source: "bench".into(),
                architecture: crate::model::weights::architecture_of(config),
            },
            adapter.clone(),
            None,
            config.logit_scale_init_value as f32,
            device,
        );
        embedder.batch_size = options.batch_size;
        if options.image {
            let images: Vec<Vec<f32>> = (0..options.batch_size)
                .map(|_| {
                    Tensor::<AB::InnerBackend, 1>::random(
                        [3 * size * size],
                        Distribution::Normal(0.0, 1.0),
                        device,
                    )
                    .into_data()
                    .to_vec::<f32>()
                    .expect("f32")
                })
                .collect();
            let refs: Vec<&[f32]> = images.iter().map(Vec::as_slice).collect();
            let seconds = timed(Box::new(|_| {
                let out = embedder.embed_pixels(&refs);
                assert_eq!(out.len(), refs.len());
            }));
            report.image_embed_per_s = Some(per_second(seconds));
        }
        if options.text {
            let seconds = timed(Box::new(|iteration| {
                let out = embedder.embed_texts(&batch_captions(options, iteration));
                assert_eq!(out.len(), options.batch_size);
            }));
            report.text_embed_per_s = Some(per_second(seconds));
        }
    }
    if options.train {
        let mut trainer = AdapterTrainer::new(model, LossConfig::default());
        let seconds = timed(Box::new(|iteration| {
            let ids: Vec<Vec<i32>> = batch_captions(options, iteration)
                .iter()
                .map(|c| tokenizer.encode(c))
                .collect();
            let tokens = tokenizer::batch_from_ids(&ids);
            let input: Tensor<AB, 3> = Tensor::random(
                patch_shape(options.batch_size),
                Distribution::Normal(0.0, 1.0),
                device,
            );
            let losses = trainer.step(input, &tokens, 2e-4, iteration as u64);
            assert!(losses.is_finite(), "non-finite loss in benchmark");
        }));
        report.train_pairs_per_s = Some(per_second(seconds));
        report.train_step_ms = Some(1000.0 * seconds / iterations as f64);
    }
    if options.ranking {
        report.ranking_seconds = Some(ranking_seconds(config.projection_dim, options.seed));
    }
    if options.matmul {
        let vision = &config.vision_config;
        let tokens = (size / patch) * (size / patch) + 1;
        let (m, k, n) = (
            2 * options.batch_size * tokens,
            vision.hidden_size,
            vision.intermediate_size,
        );
        let lhs = Tensor::<AB::InnerBackend, 2>::random([m, k], Distribution::Default, device);
        let rhs = Tensor::<AB::InnerBackend, 2>::random([k, n], Distribution::Default, device);
        // 10 products per iteration: each is milliseconds, too short to time alone.
        let seconds = timed(Box::new(|_| {
            for _ in 0..10 {
                let product = lhs.clone().matmul(rhs.clone());
                // Reading one value waits for the product on asynchronous backends.
                let _ = product.slice([0..1, 0..1]).into_scalar();
            }
        }));
        let flops = 2.0 * m as f64 * k as f64 * n as f64 * 10.0 * iterations as f64;
        report.matmul_gflops = Some(flops / seconds / 1e9);
    }
    if options.linear {
        report.linear_gflops = Some(linear_gflops::<AB::InnerBackend>(
            config,
            options.batch_size,
            iterations,
            options.precision,
            device,
        ));
    }
    report.peak_rss_mib = peak_rss_mib();
    Ok(report)
}

/// GFLOP/s of the vision MLP's frozen products at the training shape (`2·batch·tokens`
/// rows: the plain and the dropout view), as `ModelBackend`'s linear operation runs them;
/// `iterations` timed rounds of the four products after one untimed round.
fn linear_gflops<B: crate::model::kernels::ModelBackend>(
    config: &ClipConfig,
    batch_size: usize,
    iterations: usize,
    precision: BackbonePrecision,
    device: &B::Device,
) -> f64 {
    use burn::tensor::TensorPrimitive;
    let vision = &config.vision_config;
    let tokens = (vision.image_size / vision.patch_size).pow(2) + 1;
    let (m, width, inner) = (
        2 * batch_size * tokens,
        vision.hidden_size,
        vision.intermediate_size,
    );
    let matrix = |dims: [usize; 2]| {
        Tensor::<B, 2>::random(dims, Distribution::Normal(0.0, 0.02), device)
            .into_primitive()
            .tensor()
    };
    let bias = |n: usize| {
        Tensor::<B, 1>::random([n], Distribution::Normal(0.0, 0.02), device)
            .into_primitive()
            .tensor()
    };
    // The weights in the backbone's precision, as `ClipModel::with_backbone_precision`
    // stores them.
    let weight = |dims: [usize; 2]| match precision.narrow_dtype() {
        Some(dtype) => B::float_cast(matrix(dims), dtype),
        None => matrix(dims),
    };
    let (x, w1, b1, w2, b2) = (
        matrix([m, width]),
        weight([width, inner]),
        bias(inner),
        weight([inner, width]),
        bias(width),
    );
    let (grad_hidden, grad_out) = (matrix([m, inner]), matrix([m, width]));
    let round = || {
        let hidden = B::linear_fused(x.clone(), w1.clone(), Some(b1.clone()));
        let out = B::linear_fused(hidden, w2.clone(), Some(b2.clone()));
        let grad_h = B::linear_input_grad(w2.clone(), grad_out.clone());
        let grad_x = B::linear_input_grad(w1.clone(), grad_hidden.clone());
        // Reading one value waits for the products on asynchronous backends.
        for t in [out, grad_h, grad_x] {
            let t = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(t));
            let _ = t.slice([0..1, 0..1]).into_scalar();
        }
    };
    round();
    let start = Instant::now();
    for _ in 0..iterations {
        round();
    }
    let flops = 4.0 * 2.0 * (m * width * inner) as f64 * iterations as f64;
    flops / start.elapsed().as_secs_f64() / 1e9
}

/// Evaluation ranking at RSICD test size (1,093 images, 5 captions each) on random unit
/// vectors: the work `rsitrd eval` does after embedding. Best of 3 runs.
pub fn ranking_seconds(dim: usize, seed: u64) -> f64 {
    use rand::{Rng, SeedableRng};
    const IMAGES: usize = 1093;
    const PER_IMAGE: usize = 5;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut unit = |_| -> Vec<f32> {
        let v: Vec<f32> = (0..dim).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.into_iter().map(|x| x / norm).collect()
    };
    let images: Vec<Vec<f32>> = (0..IMAGES).map(&mut unit).collect();
    let captions: Vec<Vec<f32>> = (0..IMAGES * PER_IMAGE).map(&mut unit).collect();
    let owners: Vec<usize> = (0..IMAGES * PER_IMAGE).map(|c| c / PER_IMAGE).collect();
    (0..3)
        .map(|_| {
            let start = Instant::now();
            let similarity = crate::eval::similarity_matrix(&images, &captions);
            let metrics = crate::eval::retrieval_metrics(&similarity, IMAGES, &owners);
            assert!(metrics.mr.is_finite());
            start.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// Commits `samples` synthetic samples to `store` (unique 4×4 PNGs, one caption each) in
/// commits of `batch`, through [`crate::store::Store::commit_batch`]: the ledger of a large
/// corpus for the daemon's benchmarks.
pub fn fill_store(
    store: &crate::store::Store,
    samples: u64,
    batch: usize,
) -> Result<(), crate::store::StoreError> {
    use crate::store::{NewSample, StoreOp};
    let mut next = 0u64;
    while next < samples {
        let end = (next + batch.max(1) as u64).min(samples);
        let ops: Vec<StoreOp> = (next..end)
            .map(|i| {
                let bytes = i.to_le_bytes();
                let image = image::RgbImage::from_fn(4, 4, |x, y| {
                    let k = (y * 4 + x) as usize % 8;
                    image::Rgb([bytes[k], bytes[(k + 1) % 8], (x * 64 + y) as u8])
                });
                let mut png = Vec::new();
                image::DynamicImage::ImageRgb8(image)
                    .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
                    .expect("in-memory PNG");
                StoreOp::Sample(NewSample::new(
                    png,
                    vec![format!("synthetic tile number {i}")],
                    serde_json::Map::new(),
                    "synthetic".into(),
                    format!("synthetic/{i}"),
                    "png".into(),
                    4,
                    4,
                ))
            })
            .collect();
        store.commit_batch(&ops)?;
        next = end;
    }
    Ok(())
}
