//! The configuration file (`config/rsitrd.toml`): built-in defaults, then the file, then
//! environment overrides `RSITRD__SECTION__KEY`, validated once; errors name the key.
//!
//! Today it covers the model section, shared by every command; the daemon's sections (data,
//! sources, index, training schedule, gate, HTTP) join it with the daemon.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::model::DEFAULT_EMBED_BATCH;
use crate::model::device::DeviceChoice;
use crate::model::preprocess::DEFAULT_MAX_PIXELS;

/// Prefix of environment overrides: `RSITRD__MODEL__DEVICE=cuda` sets `model.device`.
pub const ENV_PREFIX: &str = "RSITRD__";

/// The default model: fetched once from the HuggingFace hub.
pub const DEFAULT_MODEL: &str = "openai/clip-vit-base-patch32";

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid configuration {origin}: {message}")]
    Invalid { origin: String, message: String },
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub model: ModelSection,
}

/// `[model]`: which backbone and adapter, on which device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// HuggingFace CLIP directory (`config.json` + `model.safetensors`) or hub id, downloaded
    /// once into the cache.
    #[serde(default = "default_model")]
    pub dir: String,
    /// Adapter checkpoint (`rsitrd train` output); none = the untrained adapter.
    #[serde(default)]
    pub adapter: Option<PathBuf>,
    /// `cpu`, `cuda` or `cuda:N`.
    #[serde(default)]
    pub device: DeviceChoice,
    /// Largest accepted image in pixels (width × height).
    #[serde(default = "default_max_pixels")]
    pub max_pixels: u64,
    /// Inputs per forward pass when embedding.
    #[serde(default = "default_embed_batch")]
    pub embed_batch_size: usize,
}

fn default_model() -> String {
    DEFAULT_MODEL.into()
}
fn default_max_pixels() -> u64 {
    DEFAULT_MAX_PIXELS
}
fn default_embed_batch() -> usize {
    DEFAULT_EMBED_BATCH
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            dir: default_model(),
            adapter: None,
            device: DeviceChoice::default(),
            max_pixels: default_max_pixels(),
            embed_batch_size: default_embed_batch(),
        }
    }
}

impl Config {
    /// Defaults, then `path` (if any), then `RSITRD__SECTION__KEY` variables from `env`.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut table = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                text.parse::<toml::Table>()
                    .map_err(|e| ConfigError::Invalid {
                        origin: path.display().to_string(),
                        message: e.to_string(),
                    })?
            }
            None => toml::Table::new(),
        };
        for (name, value) in env {
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let parts: Vec<String> = rest.split("__").map(str::to_lowercase).collect();
            let [section, key] = parts.as_slice() else {
                return Err(ConfigError::Invalid {
                    origin: format!("environment variable {name}"),
                    message: "expected RSITRD__SECTION__KEY".into(),
                });
            };
            // A TOML literal when it parses as one (numbers, booleans), else a string.
            let parsed = format!("v = {value}")
                .parse::<toml::Table>()
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or(toml::Value::String(value));
            let section = table
                .entry(section.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            match section {
                toml::Value::Table(section) => {
                    section.insert(key.clone(), parsed);
                }
                _ => {
                    return Err(ConfigError::Invalid {
                        origin: format!("environment variable {name}"),
                        message: format!("`{}` is not a section", parts[0]),
                    });
                }
            }
        }
        let origin = path.map_or_else(|| "(defaults)".to_string(), |p| p.display().to_string());
        let config: Config =
            toml::Value::Table(table)
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Invalid {
                    origin: origin.clone(),
                    message: e.to_string(),
                })?;
        config
            .validate()
            .map_err(|message| ConfigError::Invalid { origin, message })?;
        Ok(config)
    }

    /// Checks values serde cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.model.dir.trim().is_empty() {
            return Err("model.dir must not be empty".into());
        }
        if self.model.max_pixels == 0 {
            return Err("model.max_pixels must be positive".into());
        }
        if self.model.embed_batch_size == 0 {
            return Err("model.embed_batch_size must be positive".into());
        }
        Ok(())
    }

    /// The configuration the program runs with: `--config FILE` (if any) and the process
    /// environment.
    pub fn from_process(path: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load(path, std::env::vars())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_name_the_hub_model() {
        let config = Config::load(None, env(&[])).unwrap();
        assert_eq!(config.model.dir, "openai/clip-vit-base-patch32");
        assert_eq!(config.model.device, DeviceChoice::Cpu);
    }

    #[test]
    fn the_shipped_file_parses_and_env_overrides_it() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/rsitrd.toml");
        let shipped = Config::load(Some(&path), env(&[])).unwrap();
        assert_eq!(
            shipped,
            Config::default(),
            "config/rsitrd.toml documents the defaults"
        );
        let config = Config::load(
            Some(&path),
            env(&[
                ("RSITRD__MODEL__DEVICE", "cuda:1"),
                ("RSITRD__MODEL__MAX_PIXELS", "1000"),
                ("OTHER", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(config.model.device, DeviceChoice::Cuda(1));
        assert_eq!(config.model.max_pixels, 1000);
    }

    #[test]
    fn errors_name_the_key() {
        let error = Config::load(None, env(&[("RSITRD__MODEL__DEVICE", "tpu")])).unwrap_err();
        assert!(
            error.to_string().contains("unknown device `tpu`"),
            "{error}"
        );
        let error = Config::load(None, env(&[("RSITRD__MODEL__COLOUR", "red")])).unwrap_err();
        assert!(error.to_string().contains("colour"), "{error}");
        let error =
            Config::load(None, env(&[("RSITRD__MODEL__EMBED_BATCH_SIZE", "0")])).unwrap_err();
        assert!(
            error.to_string().contains("model.embed_batch_size"),
            "{error}"
        );
    }
}
