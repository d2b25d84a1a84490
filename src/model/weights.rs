//! Loading HuggingFace CLIP checkpoints (strict on the backbone) and saving/loading
//! adapter-only checkpoints with metadata.
//!
//! Key mapping from HF to our modules (struct fields mirror HF keys, so only two rules):
//! - `Linear` weights are transposed (`[out, in]` → `[in, out]`) by `PyTorchToBurnAdapter`.
//! - `LayerNorm` `weight`/`bias` become `gamma`/`beta` (same adapter).
//! - `*.position_ids` buffers are ignored; `logit_scale` is read separately.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::store::{
    BurnToPyTorchAdapter, ModuleSnapshot, PyTorchToBurnAdapter, PytorchStore, SafetensorsStore,
};
use serde::{Deserialize, Serialize};

use super::clip::ClipModel;
use super::config::{AdapterConfig, ClipConfig, ConfigError};

/// Prefix of every adapter tensor key.
pub const ADAPTER_PREFIX: &str = "adapter.";
/// Metadata key holding the JSON [`AdapterMeta`] inside an adapter checkpoint.
const META_KEY: &str = "rsitrd.adapter";

/// Errors loading or saving weights. Messages name the file and the offending keys.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Precision(#[from] super::device::PrecisionError),
    #[error(
        "no weights in {dir}: expected model.safetensors (or pytorch_model.bin) next to config.json"
    )]
    NoWeights { dir: PathBuf },
    #[error("cannot read {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("checkpoint {path} does not match the model: {details}")]
    Mismatch { path: PathBuf, details: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("adapter checkpoint {path} is not usable here: {reason}")]
    IncompatibleAdapter { path: PathBuf, reason: String },
}

/// What identifies the backbone an adapter was trained on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseModel {
    /// BLAKE3 of `config.json` and the weights file.
    pub fingerprint: String,
    /// Where it was loaded from (informational).
    pub source: String,
    /// The architecture (an open_clip name such as `ViT-L-14`, or the shape of a HF config).
    #[serde(default)]
    pub architecture: String,
}

/// A loaded backbone directory.
pub struct LoadedClip<B: Backend> {
    pub model: ClipModel<B>,
    pub config: ClipConfig,
    /// `logit_scale` of the checkpoint (log of the inverse temperature).
    pub logit_scale: f32,
    pub base: BaseModel,
}

/// Metadata stored in every adapter checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterMeta {
    pub adapter: AdapterConfig,
    /// Fingerprint of the backbone it was trained on.
    pub base_model: String,
    /// That backbone's architecture (e.g. `ViT-L-14`; empty in checkpoints written before
    /// it was recorded).
    #[serde(default)]
    pub base_architecture: String,
    /// Monotonic adapter version (0 = untrained).
    pub version: u64,
    /// Version it was trained from, if any.
    pub parent: Option<u64>,
    /// RFC 3339 creation time.
    pub created_at: String,
    /// Evaluation metrics (`mr`, `i2t_r1`, …) and training figures.
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
}

fn read_error(path: &Path, reason: impl ToString) -> WeightsError {
    WeightsError::Read {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// BLAKE3 over `config.json` and the weights file.
fn fingerprint(config: &Path, weights: &Path) -> Result<String, WeightsError> {
    let config_bytes = std::fs::read(config).map_err(|e| read_error(config, e))?;
    fingerprint_of(&config_bytes, weights)
}

/// BLAKE3 over configuration bytes and the weights file.
fn fingerprint_of(config_bytes: &[u8], weights: &Path) -> Result<String, WeightsError> {
    let mut hasher = blake3::Hasher::new();
    hasher.update(config_bytes);
    hasher
        .update_mmap_rayon(weights)
        .map_err(|e| read_error(weights, e))?;
    Ok(hasher.finalize().to_hex().to_string())
}

/// Reads the 0-d `logit_scale` tensor from a safetensors file without loading the rest.
fn read_logit_scale(path: &Path) -> Result<Option<f32>, WeightsError> {
    let mut file = File::open(path).map_err(|e| read_error(path, e))?;
    let mut length = [0u8; 8];
    file.read_exact(&mut length)
        .map_err(|e| read_error(path, e))?;
    let header_len = u64::from_le_bytes(length);
    if header_len > 100 << 20 {
        return Err(read_error(path, "safetensors header larger than 100 MiB"));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header)
        .map_err(|e| read_error(path, e))?;
    let header: HashMap<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| read_error(path, e))?;
    let Some(entry) = header.get("logit_scale") else {
        return Ok(None);
    };
    let dtype = entry["dtype"].as_str().unwrap_or_default();
    let start = entry["data_offsets"][0].as_u64().unwrap_or_default();
    let data_start = 8 + header_len + start;
    use std::io::{Seek, SeekFrom};
    file.seek(SeekFrom::Start(data_start))
        .map_err(|e| read_error(path, e))?;
    let value = match dtype {
        "F32" => {
            let mut bytes = [0u8; 4];
            file.read_exact(&mut bytes)
                .map_err(|e| read_error(path, e))?;
            f32::from_le_bytes(bytes)
        }
        other => {
            return Err(read_error(
                path,
                format!("logit_scale has dtype {other}, F32 expected"),
            ));
        }
    };
    Ok(Some(value))
}

/// Loads `DIR/config.json` and `DIR/model.safetensors` (or `pytorch_model.bin`) into a CLIP
/// with a fresh (zero-effect) adapter.
///
/// Strict on the backbone: a missing, unexpected or mis-shaped backbone tensor is an error
/// listing the keys.
pub fn load_clip<B: Backend>(
    dir: &Path,
    adapter: &AdapterConfig,
    device: &B::Device,
) -> Result<LoadedClip<B>, WeightsError> {
    if let Some(open_clip) = super::openclip::read_config(dir)? {
        return load_open_clip(dir, &open_clip, adapter, device);
    }
    let config = ClipConfig::from_model_dir(dir)?;
    adapter.validate_for(&config)?;
    let mut model = config.init::<B>(adapter, device);
    let safetensors = dir.join("model.safetensors");
    let pickle = dir.join("pytorch_model.bin");
    let (weights_path, result) = if safetensors.is_file() {
        let mut store = SafetensorsStore::from_file(&safetensors)
            .with_from_adapter(PyTorchToBurnAdapter)
            .allow_partial(true)
            .validate(false);
        let result = model
            .load_from(&mut store)
            .map_err(|e| read_error(&safetensors, e))?;
        (safetensors, result)
    } else if pickle.is_file() {
        let mut store = PytorchStore::from_file(&pickle)
            .allow_partial(true)
            .validate(false);
        let result = model
            .load_from(&mut store)
            .map_err(|e| read_error(&pickle, e))?;
        (pickle, result)
    } else {
        return Err(WeightsError::NoWeights {
            dir: dir.to_path_buf(),
        });
    };
    check_applied(&result, &weights_path, &[])?;
    let logit_scale = if weights_path.extension().is_some_and(|e| e == "safetensors") {
        read_logit_scale(&weights_path)?
    } else {
        None
    }
    .unwrap_or(config.logit_scale_init_value as f32);
    let base = BaseModel {
        fingerprint: fingerprint(&dir.join("config.json"), &weights_path)?,
        source: dir.display().to_string(),
        architecture: architecture_of(&config),
    };
    Ok(LoadedClip {
        model,
        config,
        logit_scale,
        base,
    })
}

/// A short name of the backbone's shape: towers, widths, patch and image size.
pub fn architecture_of(config: &ClipConfig) -> String {
    let v = &config.vision_config;
    let t = &config.text_config;
    format!(
        "ViT d{} L{} p{} @{} / text d{} L{} / {} {:?}",
        v.hidden_size,
        v.num_hidden_layers,
        v.patch_size,
        v.image_size,
        t.hidden_size,
        t.num_hidden_layers,
        config.projection_dim,
        v.hidden_act
    )
}

/// An open_clip model directory (see [`super::openclip`]): its state dict renamed to the HF
/// layout, then the same strict checks.
fn load_open_clip<B: Backend>(
    dir: &Path,
    open_clip: &super::openclip::OpenClipConfig,
    adapter: &AdapterConfig,
    device: &B::Device,
) -> Result<LoadedClip<B>, WeightsError> {
    let config = open_clip.model_cfg.to_clip_config()?;
    adapter.validate_for(&config)?;
    let weights_path = open_clip.weights_path(dir);
    if !weights_path.is_file() {
        return Err(WeightsError::NoWeights {
            dir: dir.to_path_buf(),
        });
    }
    let tensors = super::openclip::read_state_dict(&weights_path)
        .map_err(|e| read_error(&weights_path, e))?;
    let (model, logit_scale) =
        open_clip_model::<B>(&config, tensors, adapter, &weights_path, device)?;
    let base = BaseModel {
        // The architecture and the weights, not where they sit: the same checkpoint in another
        // cache (a query replica, another machine) is the same backbone.
        fingerprint: fingerprint_of(
            &serde_json::to_vec(&open_clip.model_cfg).expect("serializable"),
            &weights_path,
        )?,
        source: weights_path.display().to_string(),
        architecture: open_clip
            .architecture
            .clone()
            .unwrap_or_else(|| architecture_of(&config)),
    };
    Ok(LoadedClip {
        model,
        logit_scale: logit_scale.unwrap_or(config.logit_scale_init_value as f32),
        config,
        base,
    })
}

/// A CLIP of `config` holding an open_clip state dict (renamed, then checked strictly;
/// `path` names the source in errors), and the dict's logit scale.
pub fn open_clip_model<B: Backend>(
    config: &ClipConfig,
    tensors: BTreeMap<String, burn::store::TensorSnapshot>,
    adapter: &AdapterConfig,
    path: &Path,
    device: &B::Device,
) -> Result<(ClipModel<B>, Option<f32>), WeightsError> {
    let renamed = super::openclip::rename(tensors).map_err(|e| read_error(path, e))?;
    let mut model = config.init::<B>(adapter, device);
    let result = model.apply(
        renamed.snapshots,
        None,
        Some(Box::new(PyTorchToBurnAdapter)),
        false,
    );
    let unexpected: Vec<&str> = renamed.unexpected.iter().map(String::as_str).collect();
    check_applied(&result, path, &unexpected)?;
    Ok((model, renamed.logit_scale))
}

/// Strict on the backbone: a missing, unexpected or mis-shaped backbone tensor is an error
/// listing the keys (`also_unexpected`: source keys that had no place in the model at all).
fn check_applied(
    result: &burn::store::ApplyResult,
    weights_path: &Path,
    also_unexpected: &[&str],
) -> Result<(), WeightsError> {
    let missing: Vec<&str> = result
        .missing
        .iter()
        .map(|(path, _)| path.as_str())
        .filter(|path| !path.starts_with(ADAPTER_PREFIX))
        .collect();
    // burn-store lists LayerNorm `weight`/`bias` as unused even when it applied them under
    // their burn names `gamma`/`beta`: those are not unexpected.
    let applied: std::collections::HashSet<&str> =
        result.applied.iter().map(String::as_str).collect();
    let applied_as_norm = |key: &str| {
        let renamed = key
            .strip_suffix(".weight")
            .map(|stem| format!("{stem}.gamma"))
            .or_else(|| key.strip_suffix(".bias").map(|stem| format!("{stem}.beta")));
        renamed.is_some_and(|name| applied.contains(name.as_str()))
    };
    let mut unexpected: Vec<&str> = result
        .unused
        .iter()
        .map(String::as_str)
        .filter(|key| {
            !key.ends_with("position_ids") && *key != "logit_scale" && !applied_as_norm(key)
        })
        .collect();
    unexpected.extend_from_slice(also_unexpected);
    let errors: Vec<String> = result.errors.iter().map(ToString::to_string).collect();
    if !missing.is_empty() || !unexpected.is_empty() || !errors.is_empty() {
        let mut details = Vec::new();
        if !missing.is_empty() {
            details.push(format!("missing backbone tensors: {}", missing.join(", ")));
        }
        if !unexpected.is_empty() {
            details.push(format!("unexpected tensors: {}", unexpected.join(", ")));
        }
        if !errors.is_empty() {
            details.push(errors.join("; "));
        }
        return Err(WeightsError::Mismatch {
            path: weights_path.to_path_buf(),
            details: details.join("; "),
        });
    }
    Ok(())
}

/// Reads only the metadata of an adapter checkpoint.
pub fn read_adapter_meta(path: &Path) -> Result<AdapterMeta, WeightsError> {
    let bytes = std::fs::read(path).map_err(|e| read_error(path, e))?;
    adapter_meta_of(&bytes, path)
}

/// The metadata of adapter checkpoint bytes (`path` names them in errors).
pub fn adapter_meta_of(bytes: &[u8], path: &Path) -> Result<AdapterMeta, WeightsError> {
    let (_, metadata) =
        safetensors::SafeTensors::read_metadata(bytes).map_err(|e| read_error(path, e))?;
    let json = metadata
        .metadata()
        .as_ref()
        .and_then(|map| map.get(META_KEY))
        .ok_or_else(|| WeightsError::IncompatibleAdapter {
            path: path.to_path_buf(),
            reason: format!("no `{META_KEY}` metadata: not an rsitrd adapter checkpoint"),
        })?;
    serde_json::from_str(json).map_err(|e| read_error(path, e))
}

/// Loads an adapter checkpoint into `model`, refusing one made for another backbone or with
/// another adapter shape.
pub fn load_adapter<B: Backend>(
    model: &mut ClipModel<B>,
    base: &BaseModel,
    adapter: &AdapterConfig,
    path: &Path,
) -> Result<AdapterMeta, WeightsError> {
    let bytes = std::fs::read(path).map_err(|e| read_error(path, e))?;
    load_adapter_bytes(model, base, adapter, bytes, path)
}

/// [`load_adapter`] from the checkpoint's bytes (read once: the caller may have checked
/// their hash); `path` names them in errors.
pub fn load_adapter_bytes<B: Backend>(
    model: &mut ClipModel<B>,
    base: &BaseModel,
    adapter: &AdapterConfig,
    bytes: Vec<u8>,
    path: &Path,
) -> Result<AdapterMeta, WeightsError> {
    let meta = adapter_meta_of(&bytes, path)?;
    let incompatible = |reason: String| WeightsError::IncompatibleAdapter {
        path: path.to_path_buf(),
        reason,
    };
    if meta.base_model != base.fingerprint {
        return Err(incompatible(format!(
            "it was trained on base model {} ({}) but the loaded backbone {} is {} ({})",
            short(&meta.base_model),
            if meta.base_architecture.is_empty() {
                "architecture not recorded"
            } else {
                meta.base_architecture.as_str()
            },
            base.source,
            short(&base.fingerprint),
            base.architecture
        )));
    }
    if meta.adapter.bottleneck != adapter.bottleneck
        || meta.adapter.shared_width != adapter.shared_width
    {
        return Err(incompatible(format!(
            "adapter shape bottleneck={} shared_width={} differs from the configured bottleneck={} shared_width={}",
            meta.adapter.bottleneck,
            meta.adapter.shared_width,
            adapter.bottleneck,
            adapter.shared_width
        )));
    }
    let mut store = SafetensorsStore::from_bytes(Some(bytes))
        .with_from_adapter(PyTorchToBurnAdapter)
        .with_regex(r"^adapter\.")
        .allow_partial(true)
        .validate(false);
    let result = model
        .load_from(&mut store)
        .map_err(|e| read_error(path, e))?;
    let missing: Vec<&str> = result
        .missing
        .iter()
        .map(|(p, _)| p.as_str())
        .filter(|p| p.starts_with(ADAPTER_PREFIX))
        .collect();
    if !missing.is_empty() || !result.errors.is_empty() || result.applied.is_empty() {
        let errors: Vec<String> = result.errors.iter().map(ToString::to_string).collect();
        return Err(incompatible(format!(
            "missing adapter tensors [{}]; errors [{}]",
            missing.join(", "),
            errors.join("; ")
        )));
    }
    Ok(meta)
}

/// Writes the adapter tensors of `model` (PyTorch layout) with `meta`, atomically:
/// temp file → fsync → rename → fsync of the directory.
pub fn save_adapter<B: Backend>(
    model: &ClipModel<B>,
    meta: &AdapterMeta,
    path: &Path,
) -> Result<(), WeightsError> {
    let write_error = |source: std::io::Error| WeightsError::Write {
        path: path.to_path_buf(),
        source,
    };
    let bytes = adapter_bytes(model, meta).map_err(write_error)?;
    write_atomically(path, &bytes).map_err(write_error)
}

/// The adapter checkpoint of `model` with `meta`, serialized in memory (its BLAKE3 names it
/// in the daemon's content-addressed adapter directory).
pub fn adapter_bytes<B: Backend>(
    model: &ClipModel<B>,
    meta: &AdapterMeta,
) -> std::io::Result<Vec<u8>> {
    let other = |e: &dyn std::fmt::Display| std::io::Error::other(e.to_string());
    let json = serde_json::to_string(meta).expect("adapter metadata serializes");
    let mut store = SafetensorsStore::from_bytes(None)
        .with_to_adapter(BurnToPyTorchAdapter)
        .with_regex(r"^adapter\.")
        .metadata(META_KEY, json);
    model.save_into(&mut store).map_err(|e| other(&e))?;
    store.get_bytes().map_err(|e| other(&e))
}

pub use crate::durable::write_atomically;

fn short(fingerprint: &str) -> &str {
    &fingerprint[..fingerprint.len().min(12)]
}

/// Writes a random-weight CLIP in the HuggingFace layout: `config.json` copied from
/// `config_dir`, the backbone in `model.safetensors` (PyTorch key names and layouts, no
/// `logit_scale`: its configured initial value applies). For full-size benchmarks of the
/// daemon without downloading pretrained weights; it loads like any HF checkpoint.
pub fn write_random_model(config_dir: &Path, out: &Path, seed: u64) -> Result<(), WeightsError> {
    type B = crate::model::device::Cpu;
    let config = ClipConfig::from_model_dir(config_dir)?;
    let device = Default::default();
    <B as Backend>::seed(&device, seed);
    let model: ClipModel<B> = config.init(&AdapterConfig::default_for(&config), &device);
    let write_error = |source: std::io::Error| WeightsError::Write {
        path: out.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(out).map_err(write_error)?;
    std::fs::copy(config_dir.join("config.json"), out.join("config.json")).map_err(write_error)?;
    let store = SafetensorsStore::from_bytes(None)
        .with_to_adapter(BurnToPyTorchAdapter)
        .with_regex(r"^(text_model|vision_model|visual_projection|text_projection)\.");
    write_store(&model, store, &out.join("model.safetensors")).map_err(write_error)
}

/// Serializes the tensors `store` selects from `model` in memory (so the file only ever
/// appears complete), then writes them atomically to `path`.
fn write_store<B: Backend>(
    model: &ClipModel<B>,
    mut store: SafetensorsStore,
    path: &Path,
) -> std::io::Result<()> {
    let other = |e: &dyn std::fmt::Display| std::io::Error::other(e.to_string());
    model.save_into(&mut store).map_err(|e| other(&e))?;
    let bytes = store.get_bytes().map_err(|e| other(&e))?;
    write_atomically(path, &bytes)
}
