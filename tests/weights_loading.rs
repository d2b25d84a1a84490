//! Loading HF checkpoints is strict on the backbone and errors name the keys.

mod common;

use std::collections::HashMap;
use std::path::Path;

use burn::backend::Flex;
use rsitrd::model::weights::load_clip;
use rsitrd::model::{AdapterConfig, ClipConfig};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use common::fixture;

/// Copies tiny-clip into `dir`, letting `edit` change the tensor list.
fn modified_copy(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>)) {
    let source = fixture("tiny-clip");
    std::fs::copy(source.join("config.json"), dir.join("config.json")).unwrap();
    let bytes = std::fs::read(source.join("model.safetensors")).unwrap();
    let tensors = SafeTensors::deserialize(&bytes).unwrap();
    let mut list: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = tensors
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            (
                name,
                view.dtype(),
                view.shape().to_vec(),
                view.data().to_vec(),
            )
        })
        .collect();
    edit(&mut list);
    let views: Vec<(String, TensorView<'_>)> = list
        .iter()
        .map(|(name, dtype, shape, data)| {
            (
                name.clone(),
                TensorView::new(*dtype, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(
        views,
        None::<HashMap<String, String>>,
        &dir.join("model.safetensors"),
    )
    .unwrap();
}

fn load_error(dir: &Path) -> String {
    let config = ClipConfig::from_model_dir(dir).unwrap();
    load_clip::<Flex>(
        dir,
        &AdapterConfig::default_for(&config),
        &Default::default(),
    )
    .err()
    .expect("load must fail")
    .to_string()
}

#[test]
fn unchanged_copy_loads() {
    let temp = tempfile::tempdir().unwrap();
    modified_copy(temp.path(), |_| {});
    let config = ClipConfig::from_model_dir(temp.path()).unwrap();
    let loaded = load_clip::<Flex>(
        temp.path(),
        &AdapterConfig::default_for(&config),
        &Default::default(),
    )
    .unwrap();
    assert!((loaded.logit_scale - (1.0f32 / 0.07).ln()).abs() < 1e-5);
    assert_eq!(loaded.base.fingerprint.len(), 64);
}

#[test]
fn missing_backbone_tensor_is_named() {
    let temp = tempfile::tempdir().unwrap();
    modified_copy(temp.path(), |list| {
        list.retain(|(name, ..)| name != "text_model.encoder.layers.1.mlp.fc2.weight")
    });
    let error = load_error(temp.path());
    assert!(error.contains("missing backbone tensors"), "{error}");
    assert!(
        error.contains("text_model.encoder.layers.1.mlp.fc2.weight"),
        "{error}"
    );
}

#[test]
fn unexpected_tensor_is_named() {
    let temp = tempfile::tempdir().unwrap();
    modified_copy(temp.path(), |list| {
        list.push((
            "vision_model.extra_head.weight".into(),
            Dtype::F32,
            vec![2],
            vec![0; 8],
        ))
    });
    let error = load_error(temp.path());
    assert!(
        error.contains("unexpected tensors: vision_model.extra_head.weight"),
        "{error}"
    );
}

#[test]
fn misshaped_tensor_is_named() {
    let temp = tempfile::tempdir().unwrap();
    modified_copy(temp.path(), |list| {
        let entry = list
            .iter_mut()
            .find(|(name, ..)| name == "vision_model.post_layernorm.weight")
            .unwrap();
        entry.2 = vec![entry.2[0] / 2];
        entry.3.truncate(entry.3.len() / 2);
    });
    let error = load_error(temp.path());
    assert!(error.contains("vision_model.post_layernorm"), "{error}");
}

#[test]
fn missing_weights_file_is_explained() {
    let temp = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("tiny-clip/config.json"),
        temp.path().join("config.json"),
    )
    .unwrap();
    let error = load_error(temp.path());
    assert!(error.contains("model.safetensors"), "{error}");
}

#[test]
fn pytorch_pickle_checkpoint_loads_like_safetensors() {
    use rsitrd::model::Embedder;
    let device = Default::default();
    let pickle = Embedder::<Flex>::load(
        &fixture("tiny-clip-gelu-bin"),
        None,
        Default::default(),
        &device,
    )
    .unwrap();
    let safe = Embedder::<Flex>::load(
        &fixture("tiny-clip-gelu"),
        None,
        Default::default(),
        &device,
    )
    .unwrap();
    let texts = [
        "a baseball stadium",
        "dense residential area with a railway",
    ];
    let (a, b) = (pickle.embed_texts(&texts), safe.embed_texts(&texts));
    for (x, y) in a.iter().zip(&b) {
        assert!(common::max_abs_diff(x, y) < 1e-6);
    }
    let pixels = vec![0.25f32; 3 * 64 * 64];
    let (a, b) = (
        pickle.embed_pixels(&[&pixels]),
        safe.embed_pixels(&[&pixels]),
    );
    assert!(common::max_abs_diff(&a[0], &b[0]) < 1e-6);
}
