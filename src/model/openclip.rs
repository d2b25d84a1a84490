//! open_clip checkpoints (RemoteCLIP, GeoRSCLIP, LAION …) loaded as they are published: a
//! PyTorch state dict with open_clip's key names and fused attention projections.
//!
//! A model directory in open_clip's own hub layout holds `open_clip_config.json`
//! (`{"model_cfg": {...}}`, as `open_clip.push_to_hf_hub` writes it) and the weights
//! (`open_clip_pytorch_model.bin`, or the file named by the config's `checkpoint`, which is
//! how rsitrd points at a bare `.pt` file: [`prepare_dir`]). The architecture is one of
//! open_clip's named configs (`ViT-B-32`, `ViT-B-16`, `ViT-L-14`, `ViT-L-14-336`, each also
//! `-quickgelu`) or is inferred from the tensor shapes.
//!
//! The state dict is renamed to the HuggingFace layout in memory (the fused `in_proj_weight`
//! split into q/k/v, `visual.proj` and `text_projection` transposed to `[out, in]`) and
//! loaded by the same strict path as a HF checkpoint: every tensor used, every missing, extra
//! or mis-shaped one named. Pickles are read by burn-store's reader, which interprets the
//! pickle opcodes for tensors and never executes pickled code; a state dict nested under
//! `state_dict` or `model` (training checkpoints) and DDP's `module.` prefix are handled.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::ParamId;
use burn::store::TensorSnapshot;
use burn::tensor::TensorData;
use serde::{Deserialize, Serialize};

use super::config::{ClipConfig, ConfigError, HiddenAct};

/// The config file of an open_clip model directory.
pub const CONFIG_FILE: &str = "open_clip_config.json";
/// Weights file of open_clip's hub layout.
pub const WEIGHTS_FILE: &str = "open_clip_pytorch_model.bin";

/// open_clip's `model_cfg` for a CLIP ViT (the keys rsitrd uses; others are ignored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelCfg {
    pub embed_dim: usize,
    #[serde(default)]
    pub quick_gelu: bool,
    pub vision_cfg: VisionCfg,
    pub text_cfg: TextCfg,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VisionCfg {
    pub image_size: usize,
    pub layers: usize,
    pub width: usize,
    pub patch_size: usize,
    #[serde(default = "default_head_width")]
    pub head_width: usize,
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextCfg {
    #[serde(default = "default_context")]
    pub context_length: usize,
    #[serde(default = "default_vocab")]
    pub vocab_size: usize,
    pub width: usize,
    pub heads: usize,
    pub layers: usize,
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
}

fn default_head_width() -> usize {
    64
}
fn default_mlp_ratio() -> f64 {
    4.0
}
fn default_context() -> usize {
    77
}
fn default_vocab() -> usize {
    49408
}

/// `open_clip_config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpenClipConfig {
    pub model_cfg: ModelCfg,
    /// rsitrd's addition: the weights file when it is not [`WEIGHTS_FILE`] beside the config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<PathBuf>,
    /// rsitrd's addition: the architecture's name, when one was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architecture: Option<String>,
}

/// open_clip's own configs (`open_clip/model_configs/*.json`) for the architectures the
/// remote-sensing CLIPs use. `-quickgelu` selects OpenAI's activation (OpenAI weights and
/// models fine-tuned from them with it, e.g. GeoRSCLIP).
pub fn named(architecture: &str) -> Option<ModelCfg> {
    let (base, quick_gelu) = match architecture.strip_suffix("-quickgelu") {
        Some(base) => (base, true),
        None => (architecture, false),
    };
    let text = |width: usize, heads: usize| TextCfg {
        context_length: 77,
        vocab_size: 49408,
        width,
        heads,
        layers: 12,
        mlp_ratio: 4.0,
    };
    let vision = |image_size: usize, layers: usize, width: usize, patch_size: usize| VisionCfg {
        image_size,
        layers,
        width,
        patch_size,
        head_width: 64,
        mlp_ratio: 4.0,
    };
    let (embed_dim, vision_cfg, text_cfg) = match base {
        "ViT-B-32" => (512, vision(224, 12, 768, 32), text(512, 8)),
        "ViT-B-16" => (512, vision(224, 12, 768, 16), text(512, 8)),
        "ViT-L-14" => (768, vision(224, 24, 1024, 14), text(768, 12)),
        "ViT-L-14-336" => (768, vision(336, 24, 1024, 14), text(768, 12)),
        _ => return None,
    };
    Some(ModelCfg {
        embed_dim,
        quick_gelu,
        vision_cfg,
        text_cfg,
    })
}

/// The names [`named`] knows.
pub const ARCHITECTURES: &[&str] = &["ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336"];

impl ModelCfg {
    /// The equivalent HuggingFace `CLIPConfig` (the towers are the same networks).
    pub fn to_clip_config(&self) -> Result<ClipConfig, ConfigError> {
        let act = if self.quick_gelu {
            HiddenAct::QuickGelu
        } else {
            HiddenAct::Gelu
        };
        let vision = &self.vision_cfg;
        let text = &self.text_cfg;
        if vision.head_width == 0 || !vision.width.is_multiple_of(vision.head_width) {
            return Err(ConfigError::Invalid(format!(
                "vision width {} is not a multiple of head_width {}",
                vision.width, vision.head_width
            )));
        }
        let mut config = ClipConfig::vit_base_patch32();
        config.projection_dim = self.embed_dim;
        config.logit_scale_init_value = (1.0f64 / 0.07).ln();
        let t = &mut config.text_config;
        t.vocab_size = text.vocab_size;
        t.hidden_size = text.width;
        t.intermediate_size = (text.width as f64 * text.mlp_ratio) as usize;
        t.num_hidden_layers = text.layers;
        t.num_attention_heads = text.heads;
        t.max_position_embeddings = text.context_length;
        t.hidden_act = act;
        t.layer_norm_eps = 1e-5;
        let v = &mut config.vision_config;
        v.hidden_size = vision.width;
        v.intermediate_size = (vision.width as f64 * vision.mlp_ratio) as usize;
        v.num_hidden_layers = vision.layers;
        v.num_attention_heads = vision.width / vision.head_width;
        v.image_size = vision.image_size;
        v.patch_size = vision.patch_size;
        v.hidden_act = act;
        v.layer_norm_eps = 1e-5;
        config.validate()?;
        Ok(config)
    }

    /// The architecture of a state dict, from its tensor shapes (widths, layers, patch, image
    /// size, context, embedding width). The activation cannot be seen in the weights:
    /// `quick_gelu` is the caller's.
    pub fn infer(shapes: &BTreeMap<String, Vec<usize>>, quick_gelu: bool) -> Result<Self, String> {
        let shape = |key: &str| {
            shapes
                .get(key)
                .cloned()
                .ok_or_else(|| format!("`{key}` is missing: not an open_clip CLIP ViT state dict"))
        };
        let count_layers = |prefix: &str| {
            (0..)
                .take_while(|i| shapes.contains_key(&format!("{prefix}{i}.ln_1.weight")))
                .count()
        };
        let conv = shape("visual.conv1.weight")?;
        let visual_positions = shape("visual.positional_embedding")?;
        let token = shape("token_embedding.weight")?;
        let text_positions = shape("positional_embedding")?;
        let projection = shape("text_projection")?;
        if conv.len() != 4 || visual_positions.len() != 2 || token.len() != 2 {
            return Err("unexpected ranks of conv1 / positional / token embeddings".into());
        }
        let (width, patch) = (conv[0], conv[2]);
        let grid = ((visual_positions[0].saturating_sub(1)) as f64).sqrt() as usize;
        if grid * grid + 1 != visual_positions[0] {
            return Err(format!(
                "visual.positional_embedding has {} rows: not a square grid plus a class token",
                visual_positions[0]
            ));
        }
        let text_width = token[1];
        let mlp = |key: &str, width: usize| -> Result<f64, String> {
            Ok(shape(key)?[0] as f64 / width as f64)
        };
        Ok(Self {
            embed_dim: projection[1],
            quick_gelu,
            vision_cfg: VisionCfg {
                image_size: grid * patch,
                layers: count_layers("visual.transformer.resblocks."),
                width,
                patch_size: patch,
                head_width: 64,
                mlp_ratio: mlp("visual.transformer.resblocks.0.mlp.c_fc.weight", width)?,
            },
            text_cfg: TextCfg {
                context_length: text_positions[0],
                vocab_size: token[0],
                width: text_width,
                heads: (text_width / 64).max(1),
                layers: count_layers("transformer.resblocks."),
                mlp_ratio: mlp("transformer.resblocks.0.mlp.c_fc.weight", text_width)?,
            },
        })
    }
}

/// Reads `DIR/open_clip_config.json` if the directory is an open_clip model.
pub fn read_config(dir: &Path) -> Result<Option<OpenClipConfig>, ConfigError> {
    let path = dir.join(CONFIG_FILE);
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
        path: path.clone(),
        source,
    })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|source| ConfigError::Parse { path, source })
}

impl OpenClipConfig {
    /// The weights file of the model directory `dir`.
    pub fn weights_path(&self, dir: &Path) -> PathBuf {
        match &self.checkpoint {
            Some(path) if path.is_absolute() => path.clone(),
            Some(path) => dir.join(path),
            None => dir.join(WEIGHTS_FILE),
        }
    }
}

/// Keys of a state dict as stored, with a nesting level (`state_dict`, `model`) and DDP's
/// `module.` prefix taken off.
pub fn read_state_dict(path: &Path) -> Result<BTreeMap<String, TensorSnapshot>, String> {
    use burn::store::pytorch::PytorchReader;
    let plain = PytorchReader::new(path).map_err(|e| e.to_string())?;
    let looks_like_clip = |keys: &[String]| {
        keys.iter()
            .any(|k| k.trim_start_matches("module.").starts_with("visual."))
    };
    let tensors = if looks_like_clip(&plain.keys()) {
        plain.into_tensors()
    } else {
        let mut found = None;
        for key in ["state_dict", "model"] {
            if let Ok(nested) = PytorchReader::with_top_level_key(path, key)
                && looks_like_clip(&nested.keys())
            {
                found = Some(nested.into_tensors());
                break;
            }
        }
        found.ok_or_else(|| {
            "no open_clip state dict in it (looked at the top level, `state_dict` and `model`)"
                .to_string()
        })?
    };
    Ok(tensors
        .into_iter()
        .map(|(key, snapshot)| {
            let key = key.strip_prefix("module.").unwrap_or(&key).to_string();
            (key, snapshot)
        })
        .collect())
}

/// A renamed state dict: HF-layout snapshots, the logit scale, and open_clip keys that
/// mean nothing to the model (named in the error if any remain).
pub struct Renamed {
    pub snapshots: Vec<TensorSnapshot>,
    pub logit_scale: Option<f32>,
    pub unexpected: Vec<String>,
}

fn snapshot(name: &str, data: TensorData) -> TensorSnapshot {
    let path: Vec<String> = name.split('.').map(str::to_string).collect();
    TensorSnapshot::from_data(data, path, Vec::new(), ParamId::new())
}

fn transpose(data: &TensorData) -> Result<TensorData, String> {
    let [rows, cols] = data.shape[..] else {
        return Err(format!(
            "a projection of shape {:?}, 2-D expected",
            data.shape
        ));
    };
    let values = data.to_vec::<f32>().map_err(|e| format!("{e:?}"))?;
    let mut out = vec![0f32; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    Ok(TensorData::new(out, [cols, rows]))
}

/// The three equal row blocks of a fused `in_proj` (q, k, v).
fn split_rows(data: &TensorData) -> Result<[TensorData; 3], String> {
    let rows = data.shape[0];
    if !rows.is_multiple_of(3) {
        return Err(format!(
            "in_proj of shape {:?}: rows not divisible by 3",
            data.shape
        ));
    }
    let rest: usize = data.shape[1..].iter().product();
    let values = data.to_vec::<f32>().map_err(|e| format!("{e:?}"))?;
    let block = rows / 3 * rest;
    let mut shape = data.shape.to_vec();
    shape[0] = rows / 3;
    Ok(std::array::from_fn(|i| {
        TensorData::new(values[i * block..(i + 1) * block].to_vec(), shape.clone())
    }))
}

/// The HF name of a block parameter (`ln_1.weight` → `layer_norm1.weight`, …); `in_proj`
/// parameters are split by the caller.
fn block_name(rest: &str) -> Option<String> {
    let (module, param) = rest.rsplit_once('.')?;
    let hf = match module {
        "ln_1" => "layer_norm1",
        "ln_2" => "layer_norm2",
        "attn.out_proj" => "self_attn.out_proj",
        "mlp.c_fc" => "mlp.fc1",
        "mlp.c_proj" => "mlp.fc2",
        _ => return None,
    };
    Some(format!("{hf}.{param}"))
}

/// Renames an open_clip state dict to the HuggingFace layout (in f32).
pub fn rename(tensors: BTreeMap<String, TensorSnapshot>) -> Result<Renamed, String> {
    let mut out = Renamed {
        snapshots: Vec::new(),
        logit_scale: None,
        unexpected: Vec::new(),
    };
    for (key, tensor) in tensors {
        let data = tensor
            .to_data()
            .map_err(|e| format!("{key}: {e:?}"))?
            .convert::<f32>();
        let fixed = |name: &str| Some(name.to_string());
        let simple = match key.as_str() {
            "visual.conv1.weight" => fixed("vision_model.embeddings.patch_embedding.weight"),
            "visual.class_embedding" => fixed("vision_model.embeddings.class_embedding"),
            "visual.positional_embedding" => {
                fixed("vision_model.embeddings.position_embedding.weight")
            }
            "visual.ln_pre.weight" => fixed("vision_model.pre_layrnorm.weight"),
            "visual.ln_pre.bias" => fixed("vision_model.pre_layrnorm.bias"),
            "visual.ln_post.weight" => fixed("vision_model.post_layernorm.weight"),
            "visual.ln_post.bias" => fixed("vision_model.post_layernorm.bias"),
            "token_embedding.weight" => fixed("text_model.embeddings.token_embedding.weight"),
            "positional_embedding" => fixed("text_model.embeddings.position_embedding.weight"),
            "ln_final.weight" => fixed("text_model.final_layer_norm.weight"),
            "ln_final.bias" => fixed("text_model.final_layer_norm.bias"),
            _ => None,
        };
        if let Some(name) = simple {
            out.snapshots.push(snapshot(&name, data));
            continue;
        }
        match key.as_str() {
            // open_clip multiplies `x @ proj` ([in, out]); HF keeps Linear weights [out, in].
            "visual.proj" => {
                out.snapshots
                    .push(snapshot("visual_projection.weight", transpose(&data)?));
                continue;
            }
            "text_projection" => {
                out.snapshots
                    .push(snapshot("text_projection.weight", transpose(&data)?));
                continue;
            }
            "logit_scale" => {
                out.logit_scale = data.to_vec::<f32>().ok().and_then(|v| v.first().copied());
                continue;
            }
            // A buffer some versions save: rebuilt from the context length.
            "attn_mask" => continue,
            _ => {}
        }
        let block = key
            .strip_prefix("visual.transformer.resblocks.")
            .map(|rest| ("vision_model", rest))
            .or_else(|| {
                key.strip_prefix("transformer.resblocks.")
                    .map(|rest| ("text_model", rest))
            });
        let Some((tower, rest)) = block else {
            out.unexpected.push(key);
            continue;
        };
        let Some((index, rest)) = rest.split_once('.') else {
            out.unexpected.push(key);
            continue;
        };
        let prefix = format!("{tower}.encoder.layers.{index}");
        if let Some(param) = rest.strip_prefix("attn.in_proj_") {
            let [q, k, v] = split_rows(&data).map_err(|e| format!("{key}: {e}"))?;
            for (name, part) in [("q_proj", q), ("k_proj", k), ("v_proj", v)] {
                out.snapshots.push(snapshot(
                    &format!("{prefix}.self_attn.{name}.{param}"),
                    part,
                ));
            }
        } else if let Some(name) = block_name(rest) {
            out.snapshots
                .push(snapshot(&format!("{prefix}.{name}"), data));
        } else {
            out.unexpected.push(key);
        }
    }
    Ok(out)
}

/// Makes a model directory in `cache` for an open_clip checkpoint file: its
/// `open_clip_config.json` names the architecture (or the one inferred from the shapes)
/// and points at the file. Returns the directory.
pub fn prepare_dir(
    checkpoint: &Path,
    architecture: Option<&str>,
    cache: &Path,
) -> Result<PathBuf, String> {
    let checkpoint = checkpoint
        .canonicalize()
        .map_err(|e| format!("{}: {e}", checkpoint.display()))?;
    let (model_cfg, name) = match architecture {
        Some(name) if name != "auto" && name != "auto-quickgelu" => {
            let cfg = named(name).ok_or_else(|| {
                format!(
                    "unknown open_clip architecture `{name}` (known: {}, each also -quickgelu; \
                     or `auto` / `auto-quickgelu` to read it from the weights)",
                    ARCHITECTURES.join(", ")
                )
            })?;
            (cfg, name.to_string())
        }
        other => {
            let tensors = read_state_dict(&checkpoint)?;
            let shapes = tensors
                .iter()
                .map(|(k, t)| (k.clone(), t.shape.to_vec()))
                .collect();
            let quick_gelu = other == Some("auto-quickgelu");
            let cfg = ModelCfg::infer(&shapes, quick_gelu)?;
            let name = ARCHITECTURES
                .iter()
                .map(|n| {
                    if quick_gelu {
                        format!("{n}-quickgelu")
                    } else {
                        n.to_string()
                    }
                })
                .find(|n| named(n).as_ref() == Some(&cfg))
                .unwrap_or_else(|| "inferred".to_string());
            (cfg, name)
        }
    };
    let key = blake3::hash(format!("{}#{name}", checkpoint.display()).as_bytes()).to_hex();
    let dir = cache.join("open_clip").join(&key.as_str()[..16]);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let config = OpenClipConfig {
        model_cfg,
        checkpoint: Some(checkpoint),
        architecture: Some(name),
    };
    let text = serde_json::to_string_pretty(&config).expect("serializable");
    crate::durable::write_atomically(&dir.join(CONFIG_FILE), text.as_bytes())
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::{AdapterConfig, backbone_params};

    #[test]
    fn named_architectures_count_as_open_clip_reports() {
        // open_clip: sum(p.numel() for p in create_model(name).parameters()).
        let expected = [
            ("ViT-B-32", 151_277_313),
            ("ViT-B-16", 149_620_737),
            ("ViT-L-14", 427_616_513),
            ("ViT-L-14-336", 427_944_193),
        ];
        for (name, params) in expected {
            let config = named(name).unwrap().to_clip_config().unwrap();
            assert_eq!(backbone_params(&config), params, "{name}");
        }
    }

    #[test]
    fn the_adapter_follows_the_backbone_width() {
        let l14 = named("ViT-L-14").unwrap().to_clip_config().unwrap();
        let adapter = AdapterConfig::default();
        adapter.validate_for(&l14).unwrap();
        // d -> 64 -> d - 64 per tower, plus the shared 64 -> 64.
        let linear = |i: usize, o: usize| i * o + o;
        let expected = linear(1024, 64)
            + linear(768, 64)
            + linear(64, 1024 - 64)
            + linear(64, 768 - 64)
            + linear(64, 64);
        assert_eq!(adapter.trainable_params(&l14), expected);
    }

    #[test]
    fn unknown_architecture_is_named() {
        assert!(named("ViT-H-14").is_none());
        assert!(named("ViT-B-32-quickgelu").unwrap().quick_gelu);
        assert!(!named("ViT-B-32").unwrap().quick_gelu);
    }
}

#[cfg(test)]
mod strict_tests {
    use super::*;
    use crate::model::config::AdapterConfig;
    use crate::model::weights::open_clip_model;
    use burn::backend::Flex;

    fn tiny() -> ModelCfg {
        ModelCfg {
            embed_dim: 8,
            quick_gelu: false,
            vision_cfg: VisionCfg {
                image_size: 32,
                layers: 1,
                width: 128,
                patch_size: 16,
                head_width: 64,
                mlp_ratio: 2.0,
            },
            text_cfg: TextCfg {
                context_length: 8,
                vocab_size: 50,
                width: 128,
                heads: 2,
                layers: 1,
                mlp_ratio: 2.0,
            },
        }
    }

    /// A complete open_clip state dict of `cfg` (values do not matter here).
    fn state_dict(cfg: &ModelCfg) -> BTreeMap<String, TensorSnapshot> {
        let (v, t) = (&cfg.vision_cfg, &cfg.text_cfg);
        let mut shapes: Vec<(String, Vec<usize>)> = vec![
            (
                "visual.conv1.weight".into(),
                vec![v.width, 3, v.patch_size, v.patch_size],
            ),
            ("visual.class_embedding".into(), vec![v.width]),
            (
                "visual.positional_embedding".into(),
                vec![(v.image_size / v.patch_size).pow(2) + 1, v.width],
            ),
            ("visual.ln_pre.weight".into(), vec![v.width]),
            ("visual.ln_pre.bias".into(), vec![v.width]),
            ("visual.ln_post.weight".into(), vec![v.width]),
            ("visual.ln_post.bias".into(), vec![v.width]),
            ("visual.proj".into(), vec![v.width, cfg.embed_dim]),
            ("token_embedding.weight".into(), vec![t.vocab_size, t.width]),
            (
                "positional_embedding".into(),
                vec![t.context_length, t.width],
            ),
            ("ln_final.weight".into(), vec![t.width]),
            ("ln_final.bias".into(), vec![t.width]),
            ("text_projection".into(), vec![t.width, cfg.embed_dim]),
            ("logit_scale".into(), vec![]),
        ];
        for (prefix, width, layers, ratio) in [
            (
                "visual.transformer.resblocks.",
                v.width,
                v.layers,
                v.mlp_ratio,
            ),
            ("transformer.resblocks.", t.width, t.layers, t.mlp_ratio),
        ] {
            let inner = (width as f64 * ratio) as usize;
            for i in 0..layers {
                let p = format!("{prefix}{i}.");
                for (name, shape) in [
                    ("ln_1.weight", vec![width]),
                    ("ln_1.bias", vec![width]),
                    ("ln_2.weight", vec![width]),
                    ("ln_2.bias", vec![width]),
                    ("attn.in_proj_weight", vec![3 * width, width]),
                    ("attn.in_proj_bias", vec![3 * width]),
                    ("attn.out_proj.weight", vec![width, width]),
                    ("attn.out_proj.bias", vec![width]),
                    ("mlp.c_fc.weight", vec![inner, width]),
                    ("mlp.c_fc.bias", vec![inner]),
                    ("mlp.c_proj.weight", vec![width, inner]),
                    ("mlp.c_proj.bias", vec![width]),
                ] {
                    shapes.push((format!("{p}{name}"), shape));
                }
            }
        }
        shapes
            .into_iter()
            .map(|(key, shape)| {
                let len = shape.iter().product::<usize>().max(1);
                let values: Vec<f32> = (0..len).map(|i| (i % 7) as f32 * 0.01).collect();
                let data = if shape.is_empty() {
                    TensorData::new(values, [1])
                } else {
                    TensorData::new(values, shape)
                };
                (key.clone(), snapshot(&key, data))
            })
            .collect()
    }

    fn load(tensors: BTreeMap<String, TensorSnapshot>) -> Result<(), String> {
        let config = tiny().to_clip_config().unwrap();
        open_clip_model::<Flex>(
            &config,
            tensors,
            &AdapterConfig::default(),
            Path::new("test.pt"),
            &Default::default(),
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
    }

    #[test]
    fn a_complete_state_dict_loads_and_its_shapes_give_the_architecture() {
        let dict = state_dict(&tiny());
        let shapes = dict
            .iter()
            .map(|(k, t)| (k.clone(), t.shape.to_vec()))
            .collect();
        assert_eq!(ModelCfg::infer(&shapes, false).unwrap(), tiny());
        load(dict).unwrap();
    }

    #[test]
    fn missing_extra_and_misshaped_tensors_are_named() {
        let mut dict = state_dict(&tiny());
        dict.remove("visual.ln_post.bias");
        let error = load(dict).unwrap_err();
        assert!(error.contains("vision_model.post_layernorm"), "{error}");

        let mut dict = state_dict(&tiny());
        let extra = snapshot("visual.head.weight", TensorData::new(vec![0f32; 4], [2, 2]));
        dict.insert("visual.head.weight".into(), extra);
        let error = load(dict).unwrap_err();
        assert!(
            error.contains("unexpected tensors: visual.head.weight"),
            "{error}"
        );

        let mut dict = state_dict(&tiny());
        let wrong = snapshot(
            "text_projection",
            TensorData::new(vec![0f32; 128 * 9], [128, 9]),
        );
        dict.insert("text_projection".into(), wrong);
        let error = load(dict).unwrap_err();
        assert!(error.contains("text_projection"), "{error}");
    }
}
