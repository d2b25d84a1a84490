//! The HuggingFace `CLIPConfig` (`config.json`) and the MRS-Adapter configuration.
//!
//! Field names and defaults mirror `transformers`' `CLIPTextConfig` / `CLIPVisionConfig`, so a
//! `config.json` published on the hub (which omits keys equal to their defaults) parses as
//! `transformers` would read it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Errors reading or validating a model configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read model config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("model config {path} is not a valid CLIP config.json: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("invalid model config: {0}")]
    Invalid(String),
}

/// Activation of the transformer MLPs (`hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HiddenAct {
    /// `x * sigmoid(1.702 x)`, OpenAI CLIP.
    #[serde(rename = "quick_gelu")]
    QuickGelu,
    /// Exact (erf) GELU.
    #[serde(rename = "gelu")]
    Gelu,
    /// Tanh-approximated GELU.
    #[serde(rename = "gelu_new", alias = "gelu_pytorch_tanh", alias = "gelu_fast")]
    GeluTanh,
}

/// Text tower configuration (`text_config`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipTextConfig {
    #[serde(default = "text_defaults::vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "text_defaults::hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "text_defaults::intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "text_defaults::num_hidden_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "text_defaults::num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "text_defaults::max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: HiddenAct,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
}

/// Vision tower configuration (`vision_config`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipVisionConfig {
    #[serde(default = "vision_defaults::hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "vision_defaults::intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "vision_defaults::num_hidden_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "vision_defaults::num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "vision_defaults::num_channels")]
    pub num_channels: usize,
    #[serde(default = "vision_defaults::image_size")]
    pub image_size: usize,
    #[serde(default = "vision_defaults::patch_size")]
    pub patch_size: usize,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: HiddenAct,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
}

/// The whole `config.json` of a HuggingFace `CLIPModel` (unknown keys are ignored, as
/// `transformers` does).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipConfig {
    #[serde(default = "default_text_config")]
    pub text_config: ClipTextConfig,
    #[serde(default = "default_vision_config")]
    pub vision_config: ClipVisionConfig,
    #[serde(default = "default_projection_dim")]
    pub projection_dim: usize,
    #[serde(default = "default_logit_scale_init")]
    pub logit_scale_init_value: f64,
}

mod text_defaults {
    pub fn vocab_size() -> usize {
        49408
    }
    pub fn hidden_size() -> usize {
        512
    }
    pub fn intermediate_size() -> usize {
        2048
    }
    pub fn num_hidden_layers() -> usize {
        12
    }
    pub fn num_attention_heads() -> usize {
        8
    }
    pub fn max_position_embeddings() -> usize {
        77
    }
}

mod vision_defaults {
    pub fn hidden_size() -> usize {
        768
    }
    pub fn intermediate_size() -> usize {
        3072
    }
    pub fn num_hidden_layers() -> usize {
        12
    }
    pub fn num_attention_heads() -> usize {
        12
    }
    pub fn num_channels() -> usize {
        3
    }
    pub fn image_size() -> usize {
        224
    }
    pub fn patch_size() -> usize {
        32
    }
}

fn default_text_config() -> ClipTextConfig {
    serde_json::from_str("{}").expect("all text fields have defaults")
}
fn default_vision_config() -> ClipVisionConfig {
    serde_json::from_str("{}").expect("all vision fields have defaults")
}
fn default_hidden_act() -> HiddenAct {
    HiddenAct::QuickGelu
}
fn default_layer_norm_eps() -> f64 {
    1e-5
}
fn default_projection_dim() -> usize {
    512
}
fn default_logit_scale_init() -> f64 {
    2.6592
}

impl ClipConfig {
    /// Reads and validates `DIR/config.json`.
    pub fn from_model_dir(dir: &Path) -> Result<Self, ConfigError> {
        if let Some(open_clip) = super::openclip::read_config(dir)? {
            return open_clip.model_cfg.to_clip_config();
        }
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let config: ClipConfig =
            serde_json::from_str(&text).map_err(|source| ConfigError::Parse { path, source })?;
        config.validate()?;
        Ok(config)
    }

    /// The published `openai/clip-vit-base-patch32` configuration (for benchmarks with random
    /// weights and for `params`).
    pub fn vit_base_patch32() -> Self {
        serde_json::from_str("{}").expect("defaults are the ViT-B/32 configuration")
    }

    /// Checks the invariants the towers rely on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let text = &self.text_config;
        let vision = &self.vision_config;
        let invalid = |message: String| Err(ConfigError::Invalid(message));
        if !text.hidden_size.is_multiple_of(text.num_attention_heads) {
            return invalid(format!(
                "text_config.hidden_size {} is not divisible by num_attention_heads {}",
                text.hidden_size, text.num_attention_heads
            ));
        }
        if !vision
            .hidden_size
            .is_multiple_of(vision.num_attention_heads)
        {
            return invalid(format!(
                "vision_config.hidden_size {} is not divisible by num_attention_heads {}",
                vision.hidden_size, vision.num_attention_heads
            ));
        }
        if vision.patch_size == 0 || !vision.image_size.is_multiple_of(vision.patch_size) {
            return invalid(format!(
                "vision_config.image_size {} is not a multiple of patch_size {}",
                vision.image_size, vision.patch_size
            ));
        }
        if vision.num_channels != 3 {
            return invalid(format!(
                "vision_config.num_channels is {}, only RGB (3) is supported",
                vision.num_channels
            ));
        }
        if text.max_position_embeddings < 3 {
            return invalid("text_config.max_position_embeddings must be at least 3".into());
        }
        Ok(())
    }

    /// Number of image patches plus the class token.
    pub fn vision_positions(&self) -> usize {
        let grid = self.vision_config.image_size / self.vision_config.patch_size;
        grid * grid + 1
    }
}

/// MRS-Adapter shape and regularisation (METHOD.md). Part of every adapter checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterConfig {
    /// Width of the bottleneck (`visual_down`/`text_down` output).
    #[serde(default = "adapter_defaults::bottleneck")]
    pub bottleneck: usize,
    /// Width produced by the shared up layer: the last `shared_width` channels of the adapter
    /// output for both modalities.
    #[serde(default = "adapter_defaults::shared_width")]
    pub shared_width: usize,
    /// Dropout on the bottleneck during training.
    #[serde(default = "adapter_defaults::dropout")]
    pub dropout: f64,
}

mod adapter_defaults {
    pub fn bottleneck() -> usize {
        64
    }
    pub fn shared_width() -> usize {
        64
    }
    pub fn dropout() -> f64 {
        0.5
    }
}

impl Default for AdapterConfig {
    fn default() -> Self {
        Self {
            bottleneck: adapter_defaults::bottleneck(),
            shared_width: adapter_defaults::shared_width(),
            dropout: adapter_defaults::dropout(),
        }
    }
}

impl AdapterConfig {
    /// Checks that this adapter fits a backbone with these tower widths.
    pub fn validate_for(&self, clip: &ClipConfig) -> Result<(), ConfigError> {
        if self.bottleneck == 0 || self.shared_width == 0 {
            return Err(ConfigError::Invalid(
                "adapter bottleneck and shared_width must be positive".into(),
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(ConfigError::Invalid(format!(
                "adapter dropout {} is not in [0, 1)",
                self.dropout
            )));
        }
        for (tower, width) in [
            ("vision", clip.vision_config.hidden_size),
            ("text", clip.text_config.hidden_size),
        ] {
            if width <= self.shared_width {
                return Err(ConfigError::Invalid(format!(
                    "adapter shared_width {} must be smaller than the {tower} width {width}",
                    self.shared_width
                )));
            }
        }
        Ok(())
    }

    /// Trainable parameters of one MRS-Adapter for this backbone (weights and biases).
    pub fn trainable_params(&self, clip: &ClipConfig) -> usize {
        let linear = |d_in: usize, d_out: usize| d_in * d_out + d_out;
        let d_vision = clip.vision_config.hidden_size;
        let d_text = clip.text_config.hidden_size;
        linear(d_vision, self.bottleneck)
            + linear(d_text, self.bottleneck)
            + linear(self.bottleneck, d_vision - self.shared_width)
            + linear(self.bottleneck, d_text - self.shared_width)
            + linear(self.bottleneck, self.shared_width)
    }
}

/// Parameters of the frozen CLIP backbone, counted from the configuration alone (what
/// `transformers` reports for `CLIPModel`, `logit_scale` included).
pub fn backbone_params(clip: &ClipConfig) -> usize {
    let linear = |d_in: usize, d_out: usize| d_in * d_out + d_out;
    let layer_norm = |d: usize| 2 * d;
    let block = |d: usize, inter: usize| {
        4 * linear(d, d) + layer_norm(d) + linear(d, inter) + linear(inter, d) + layer_norm(d)
    };
    let text = &clip.text_config;
    let vision = &clip.vision_config;
    let text_params = text.vocab_size * text.hidden_size
        + text.max_position_embeddings * text.hidden_size
        + text.num_hidden_layers * block(text.hidden_size, text.intermediate_size)
        + layer_norm(text.hidden_size);
    let patch = vision.num_channels * vision.patch_size * vision.patch_size * vision.hidden_size;
    let vision_params = vision.hidden_size
        + patch
        + clip.vision_positions() * vision.hidden_size
        + layer_norm(vision.hidden_size)
        + vision.num_hidden_layers * block(vision.hidden_size, vision.intermediate_size)
        + layer_norm(vision.hidden_size);
    let projections = (text.hidden_size + vision.hidden_size) * clip.projection_dim;
    text_params + vision_params + projections + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vit_b32_counts_match_the_paper() {
        let clip = ClipConfig::vit_base_patch32();
        let adapter = AdapterConfig::default();
        assert_eq!(adapter.trainable_params(&clip), 161_088);
        // transformers reports 151,277,313 parameters for openai/clip-vit-base-patch32.
        assert_eq!(backbone_params(&clip), 151_277_313);
    }

    #[test]
    fn adapter_wider_than_tower_is_refused() {
        let mut clip = ClipConfig::vit_base_patch32();
        clip.text_config.hidden_size = 64;
        let error = AdapterConfig::default().validate_for(&clip).unwrap_err();
        assert!(error.to_string().contains("text width 64"), "{error}");
    }

    #[test]
    fn unknown_activation_is_an_error() {
        let json = r#"{"text_config": {"hidden_act": "swish"}, "vision_config": {}}"#;
        assert!(serde_json::from_str::<ClipConfig>(json).is_err());
    }
}
