//! Parity with HuggingFace `transformers` and with `open_clip` on tiny random CLIP
//! checkpoints in their real formats (references written by tests/make_fixtures.py).

mod common;

use burn::backend::Flex;
use rsitrd::model::Embedder;
use rsitrd::model::preprocess::{ImageLimits, load_image};
use serde::Deserialize;

use common::{fixture, max_abs_diff, rs_mini_dir};

/// Normalized embeddings must agree to this where the pixels are identical: lossless images
/// (TIFF) that need no resize.
const EXACT_TOLERANCE: f32 = 1e-4;
/// Elsewhere the pixels differ slightly, so the embeddings do too:
/// - resizing: our bicubic (image's Catmull-Rom, antialiased like PIL) and PIL's bicubic
///   round differently (a pixel may differ by one or two levels of 255);
/// - JPEG: Pillow decodes with libjpeg-turbo, we with zune-jpeg; measured on the rs-mini
///   JPEGs, up to 4 levels of 255 on ~20 % of the samples (IDCT and chroma upsampling).
///
/// In normalized pixel units one level is 1 / 255 / 0.27 ≈ 0.015.
const APPROX_PIXEL_TOLERANCE: f32 = 0.075;
/// Measured worst case on the tiny models is about 0.012; random tiny backbones are far
/// more sensitive to pixel noise than trained ones.
const APPROX_EMBEDDING_TOLERANCE: f32 = 0.03;

#[derive(Deserialize)]
struct Reference {
    image_size: usize,
    images: Vec<ImageReference>,
    texts: Vec<TextReference>,
}

#[derive(Deserialize)]
struct ImageReference {
    file: String,
    resized: bool,
    pixel_mean: f64,
    pixel_samples: Vec<f32>,
    embedding: Vec<f32>,
}

#[derive(Deserialize)]
struct TextReference {
    text: String,
    ids: Vec<i32>,
    embedding: Vec<f32>,
}

/// Identical input pixels: a lossless file at the model's input size.
fn exact(image: &ImageReference) -> bool {
    !image.resized && image.file.ends_with(".tif")
}

fn reference(model: &str) -> Reference {
    let text = std::fs::read_to_string(fixture(model).join("reference.json")).expect("reference");
    serde_json::from_str(&text).expect("reference json")
}

fn check_model(model: &str) {
    check_dir(model, &fixture(model));
}

/// Compares the model loaded from `dir` with the references of fixture `model`.
fn check_dir(model: &str, dir: &std::path::Path) {
    let reference = reference(model);
    let device = Default::default();
    let embedder =
        Embedder::<Flex>::load(dir, None, Default::default(), &device).expect("load tiny clip");
    assert_eq!(embedder.image_size(), reference.image_size);

    // Images: preprocessing, then embeddings.
    let mut pixels = Vec::new();
    let mut worst_approx = (0.0f32, 0.0f32);
    for image in &reference.images {
        let bytes = std::fs::read(rs_mini_dir().join("images").join(&image.file)).unwrap();
        let ours = load_image(
            &bytes,
            &image.file,
            &ImageLimits::default(),
            reference.image_size,
        )
        .unwrap();
        let samples: Vec<f32> = ours.iter().step_by(997).copied().collect();
        let pixel_diff = max_abs_diff(&samples, &image.pixel_samples);
        let mean = ours.iter().map(|&v| f64::from(v)).sum::<f64>() / ours.len() as f64;
        if !exact(image) {
            worst_approx.0 = worst_approx.0.max(pixel_diff);
            assert!(
                pixel_diff <= APPROX_PIXEL_TOLERANCE,
                "{}: pixels differ by {pixel_diff}",
                image.file
            );
        } else {
            assert!(
                pixel_diff <= 1e-5,
                "{}: pixels differ by {pixel_diff}",
                image.file
            );
            assert!(
                (mean - image.pixel_mean).abs() < 1e-5,
                "{}: pixel mean",
                image.file
            );
        }
        pixels.push(ours);
    }
    let refs: Vec<&[f32]> = pixels.iter().map(Vec::as_slice).collect();
    let embeddings = embedder.embed_pixels(&refs);
    let mut exact_images = 0;
    for (image, ours) in reference.images.iter().zip(&embeddings) {
        let diff = max_abs_diff(ours, &image.embedding);
        if !exact(image) {
            worst_approx.1 = worst_approx.1.max(diff);
            assert!(
                diff <= APPROX_EMBEDDING_TOLERANCE,
                "{model} {}: image embedding differs by {diff}",
                image.file
            );
        } else {
            exact_images += 1;
            assert!(
                diff <= EXACT_TOLERANCE,
                "{model} {}: image embedding differs by {diff}",
                image.file
            );
        }
    }
    println!(
        "{model}: {exact_images} images compared exactly; resized or JPEG: max pixel diff {}, max embedding diff {}",
        worst_approx.0, worst_approx.1
    );

    // Texts: token ids, then embeddings.
    let texts: Vec<&str> = reference.texts.iter().map(|t| t.text.as_str()).collect();
    for text in &reference.texts {
        assert_eq!(
            embedder.tokenizer.encode(&text.text),
            text.ids,
            "ids of {:?}",
            text.text
        );
    }
    let embeddings = embedder.embed_texts(&texts);
    let mut worst = 0.0f32;
    for (text, ours) in reference.texts.iter().zip(&embeddings) {
        let diff = max_abs_diff(ours, &text.embedding);
        worst = worst.max(diff);
        assert!(
            diff <= EXACT_TOLERANCE,
            "{model}: text {:?} differs by {diff}",
            text.text
        );
    }
    println!("{model}: {} texts, max embedding diff {worst}", texts.len());
}

#[test]
fn tiny_clip_matches_transformers() {
    check_model("tiny-clip");
}

#[test]
fn tiny_clip_gelu_matches_transformers() {
    check_model("tiny-clip-gelu");
}

#[test]
fn ucm_tiffs_are_compared_exactly() {
    // The exact-tolerance branch above must actually be exercised.
    let reference = reference("tiny-clip");
    let exact_count = reference.images.iter().filter(|i| exact(i)).count();
    assert_eq!(exact_count, 9, "the 9 UCM 256x256 TIFFs");
}

#[test]
fn open_clip_hub_layout_b16_quickgelu_matches_open_clip() {
    // open_clip_config.json + open_clip_pytorch_model.bin, as open_clip publishes models.
    check_model("openclip-b16-quickgelu");
    let dir = fixture("openclip-b16-quickgelu");
    check_synthetic_pixels("openclip-b16-quickgelu", &dir);
    let config = rsitrd::model::ClipConfig::from_model_dir(&dir).unwrap();
    assert_eq!(
        rsitrd::model::config::backbone_params(&config) as u64,
        reference_params("openclip-b16-quickgelu"),
        "parameters as open_clip counts them"
    );
}

#[test]
fn open_clip_training_checkpoint_l14_gelu_matches_open_clip() {
    // A bare `.pt` training checkpoint: {"epoch", "state_dict": {"module.…"}}, architecture
    // inferred from the shapes (14 px patches, 224 px, 3 layers, exact GELU).
    let cache = tempfile::tempdir().unwrap();
    let file = fixture("openclip-l14-gelu").join("checkpoint.pt");
    let dir = rsitrd::model::openclip::prepare_dir(&file, Some("auto"), cache.path()).unwrap();
    let config = rsitrd::model::ClipConfig::from_model_dir(&dir).unwrap();
    assert_eq!(config.vision_config.patch_size, 14);
    assert_eq!(config.vision_config.image_size, 224);
    assert_eq!(config.vision_config.num_hidden_layers, 3);
    assert_eq!(
        config.vision_config.hidden_act,
        rsitrd::model::config::HiddenAct::Gelu
    );
    check_dir("openclip-l14-gelu", &dir);
    check_synthetic_pixels("openclip-l14-gelu", &dir);
    assert_eq!(
        rsitrd::model::config::backbone_params(&config) as u64,
        reference_params("openclip-l14-gelu")
    );
    // The same checkpoint elsewhere (another cache, another machine) is the same backbone.
    let elsewhere = tempfile::tempdir().unwrap();
    let copy = elsewhere.path().join("moved.pt");
    std::fs::copy(&file, &copy).unwrap();
    let moved =
        rsitrd::model::openclip::prepare_dir(&copy, Some("auto"), elsewhere.path()).unwrap();
    let fingerprint = |dir: &std::path::Path| {
        Embedder::<Flex>::load(dir, None, Default::default(), &Default::default())
            .unwrap()
            .base
            .fingerprint
    };
    assert_eq!(fingerprint(&dir), fingerprint(&moved));
    // The wrong architecture named: refused, the mismatched tensors named.
    let wrong =
        rsitrd::model::openclip::prepare_dir(&file, Some("ViT-B-32"), cache.path()).unwrap();
    let error = Embedder::<Flex>::load(&wrong, None, Default::default(), &Default::default())
        .err()
        .expect("a ViT-B/32 cannot hold these weights")
        .to_string();
    assert!(error.contains("patch_embedding"), "{error}");
}

/// The embedding of pixels both sides compute from a formula (`sin(0.01 (7919 c + 131 y + x))`
/// in f32): identical model input at any image size, so it compares to 1e-4.
fn check_synthetic_pixels(model: &str, dir: &std::path::Path) {
    let text = std::fs::read_to_string(fixture(model).join("reference.json")).unwrap();
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    let expected: Vec<f32> = value["synthetic_pixels_embedding"]
        .as_array()
        .expect("synthetic_pixels_embedding")
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    let embedder =
        Embedder::<Flex>::load(dir, None, Default::default(), &Default::default()).unwrap();
    let size = embedder.image_size();
    let mut pixels = Vec::with_capacity(3 * size * size);
    for c in 0..3 {
        for y in 0..size {
            for x in 0..size {
                pixels.push((0.01f32 * (c * 7919 + y * 131 + x) as f32).sin());
            }
        }
    }
    let ours = embedder.embed_pixels(&[pixels.as_slice()]).remove(0);
    let diff = max_abs_diff(&ours, &expected);
    assert!(
        diff <= EXACT_TOLERANCE,
        "{model}: identical pixels differ by {diff}"
    );
}

fn reference_params(model: &str) -> u64 {
    let text = std::fs::read_to_string(fixture(model).join("reference.json")).unwrap();
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    value["params"].as_u64().expect("params")
}

#[test]
fn a_hostile_open_clip_file_is_refused_with_its_name() {
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in [
        ("empty.pt", Vec::new()),
        (
            "garbage.pt",
            b"PK\x03\x04 not really a zip \xff\xfe".to_vec(),
        ),
    ] {
        let file = dir.path().join(name);
        std::fs::write(&file, &bytes).unwrap();
        // Inferring the architecture reads the file: refused, not a panic.
        let error = rsitrd::model::openclip::prepare_dir(&file, Some("auto"), dir.path())
            .expect_err("nothing to infer from");
        assert!(!error.is_empty());
        // Named architecture: the load refuses, naming the file.
        let model =
            rsitrd::model::openclip::prepare_dir(&file, Some("ViT-B-32"), dir.path()).unwrap();
        let error = Embedder::<Flex>::load(&model, None, Default::default(), &Default::default())
            .err()
            .expect("not a checkpoint")
            .to_string();
        assert!(error.contains(name), "{error}");
    }
}
