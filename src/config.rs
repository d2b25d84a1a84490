//! The configuration file (`config/rsitrd.toml`): built-in defaults, then the file, then
//! environment overrides `RSITRD__SECTION__KEY`, validated once; errors name the key.
//!
//! Sections: `[model]` (every command), `[store]` (the durable sample store), `[ingest]`
//! (validation limits), `[inbox]` (the watched directory) and `[amqp]` (the RabbitMQ source).

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
    #[serde(default)]
    pub store: StoreSection,
    #[serde(default)]
    pub ingest: IngestSection,
    #[serde(default)]
    pub inbox: InboxSection,
    #[serde(default)]
    pub amqp: AmqpSection,
}

/// `[store]`: where samples live and how they are split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// Data directory: the store lives in `DIR/store` (ledger + image blobs).
    #[serde(default = "default_data_dir")]
    pub dir: PathBuf,
    /// Fraction of samples held out as `val` (never trained on), by a seeded hash of the id.
    #[serde(default = "default_val_fraction")]
    pub val_fraction: f64,
    /// Seed of the split hash.
    #[serde(default = "default_split_seed")]
    pub split_seed: u64,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("data")
}
fn default_val_fraction() -> f64 {
    0.1
}
fn default_split_seed() -> u64 {
    42
}

impl Default for StoreSection {
    fn default() -> Self {
        Self {
            dir: default_data_dir(),
            val_fraction: default_val_fraction(),
            split_seed: default_split_seed(),
        }
    }
}

impl StoreSection {
    /// The store directory inside the data directory.
    pub fn store_dir(&self) -> PathBuf {
        self.dir.join("store")
    }
}

/// `[ingest]`: what every source accepts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestSection {
    /// Largest image file in bytes.
    #[serde(default = "default_max_image_bytes")]
    pub max_image_bytes: u64,
    /// Most captions per sample.
    #[serde(default = "default_max_captions")]
    pub max_captions: usize,
}

fn default_max_image_bytes() -> u64 {
    64 << 20
}
fn default_max_captions() -> usize {
    100
}

impl Default for IngestSection {
    fn default() -> Self {
        Self {
            max_image_bytes: default_max_image_bytes(),
            max_captions: default_max_captions(),
        }
    }
}

/// What happens to an inbox pair once it is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnSuccess {
    /// Move the files to `done_dir`.
    Move,
    /// Delete them.
    Delete,
}

/// `[inbox]`: the watched directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboxSection {
    /// Watch the inbox directory.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Directory producers rename `NAME.jpg` + `NAME.txt`/`NAME.json` into (subdirectories too).
    #[serde(default = "default_inbox_dir")]
    pub dir: PathBuf,
    /// Where stored pairs go (`move`); default `DIR/done`.
    #[serde(default)]
    pub done_dir: Option<PathBuf>,
    /// Where rejected files go, each with `NAME.error.txt`; default `DIR/rejected`.
    #[serde(default)]
    pub rejected_dir: Option<PathBuf>,
    /// `move` or `delete`.
    #[serde(default = "default_on_success")]
    pub on_success: OnSuccess,
    /// How long an image or caption file waits for its partner before it is rejected.
    #[serde(default = "default_orphan_timeout", with = "humantime_serde_compat")]
    pub orphan_timeout: std::time::Duration,
    /// A file found without a close/rename event (e.g. while the daemon was down) is taken
    /// once unmodified for this long.
    #[serde(default = "default_settle", with = "humantime_serde_compat")]
    pub settle: std::time::Duration,
    /// Full rescan period (events are hints; the directory is the truth).
    #[serde(default = "default_rescan_interval", with = "humantime_serde_compat")]
    pub rescan_interval: std::time::Duration,
}

fn default_true() -> bool {
    true
}
fn default_inbox_dir() -> PathBuf {
    PathBuf::from("data/inbox")
}
fn default_on_success() -> OnSuccess {
    OnSuccess::Move
}
fn default_orphan_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(300)
}
fn default_settle() -> std::time::Duration {
    std::time::Duration::from_secs(2)
}
fn default_rescan_interval() -> std::time::Duration {
    std::time::Duration::from_secs(30)
}

impl Default for InboxSection {
    fn default() -> Self {
        Self {
            enabled: true,
            dir: default_inbox_dir(),
            done_dir: None,
            rejected_dir: None,
            on_success: default_on_success(),
            orphan_timeout: default_orphan_timeout(),
            settle: default_settle(),
            rescan_interval: default_rescan_interval(),
        }
    }
}

impl InboxSection {
    pub fn done_dir(&self) -> PathBuf {
        self.done_dir
            .clone()
            .unwrap_or_else(|| self.dir.join("done"))
    }
    pub fn rejected_dir(&self) -> PathBuf {
        self.rejected_dir
            .clone()
            .unwrap_or_else(|| self.dir.join("rejected"))
    }
}

/// `[amqp]`: the RabbitMQ source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpSection {
    /// Consume the queue (needs a reachable broker; off by default).
    #[serde(default)]
    pub enabled: bool,
    /// Broker URI; credentials may sit in it (`amqp://user:pass@host:5672/%2f`), or set
    /// `RSITRD__AMQP__URI` from a secret.
    #[serde(default = "default_amqp_uri")]
    pub uri: String,
    /// Durable quorum queue, declared if absent.
    #[serde(default = "default_amqp_queue")]
    pub queue: String,
    /// Unacknowledged deliveries in flight (basic.qos prefetch).
    #[serde(default = "default_prefetch")]
    pub prefetch: u16,
    /// Largest accepted message body in bytes.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: u64,
    /// Deliveries of one message before the broker dead-letters it itself (a message that
    /// crashes the consumer every time cannot block the queue).
    #[serde(default = "default_delivery_limit")]
    pub delivery_limit: u32,
    /// Longest wait between reconnection attempts.
    #[serde(default = "default_reconnect_max", with = "humantime_serde_compat")]
    pub reconnect_max_backoff: std::time::Duration,
}

fn default_amqp_uri() -> String {
    "amqp://127.0.0.1:5672/%2f".into()
}
fn default_amqp_queue() -> String {
    "rsitrd.samples".into()
}
fn default_prefetch() -> u16 {
    64
}
fn default_max_message_bytes() -> u64 {
    32 << 20
}
fn default_delivery_limit() -> u32 {
    20
}
fn default_reconnect_max() -> std::time::Duration {
    std::time::Duration::from_secs(30)
}

impl Default for AmqpSection {
    fn default() -> Self {
        Self {
            enabled: false,
            uri: default_amqp_uri(),
            queue: default_amqp_queue(),
            prefetch: default_prefetch(),
            max_message_bytes: default_max_message_bytes(),
            delivery_limit: default_delivery_limit(),
            reconnect_max_backoff: default_reconnect_max(),
        }
    }
}

impl AmqpSection {
    /// Exchange that rejected messages are published to, with their reason.
    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dlx", self.queue)
    }
    /// Queue bound to the dead-letter exchange.
    pub fn dead_letter_queue(&self) -> String {
        format!("{}.dead", self.queue)
    }
}

/// Durations as humantime strings (`"30s"`, `"5m"`) in the file.
mod humantime_serde_compat {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&humantime::format_duration(*value).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(&text)
            .map_err(|e| serde::de::Error::custom(format!("invalid duration `{text}`: {e}")))
    }
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
        if !(0.0..1.0).contains(&self.store.val_fraction) {
            return Err("store.val_fraction must be in [0, 1)".into());
        }
        if self.ingest.max_image_bytes == 0 {
            return Err("ingest.max_image_bytes must be positive".into());
        }
        if self.ingest.max_captions == 0 {
            return Err("ingest.max_captions must be positive".into());
        }
        if self.amqp.prefetch == 0 {
            return Err("amqp.prefetch must be positive".into());
        }
        if self.amqp.queue.trim().is_empty() {
            return Err("amqp.queue must not be empty".into());
        }
        if self.amqp.max_message_bytes == 0 {
            return Err("amqp.max_message_bytes must be positive".into());
        }
        if self.inbox.settle.is_zero() || self.inbox.rescan_interval.is_zero() {
            return Err("inbox.settle and inbox.rescan_interval must be positive".into());
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

    #[test]
    fn source_sections_parse_durations_and_name_bad_keys() {
        let config = Config::load(
            None,
            env(&[
                ("RSITRD__INBOX__SETTLE", "250ms"),
                ("RSITRD__AMQP__ENABLED", "true"),
                ("RSITRD__AMQP__QUEUE", "q1"),
                ("RSITRD__STORE__VAL_FRACTION", "0.2"),
            ]),
        )
        .unwrap();
        assert_eq!(config.inbox.settle, std::time::Duration::from_millis(250));
        assert!(config.amqp.enabled);
        assert_eq!(config.amqp.dead_letter_exchange(), "q1.dlx");
        assert_eq!(config.inbox.done_dir(), PathBuf::from("data/inbox/done"));
        let error = Config::load(None, env(&[("RSITRD__INBOX__SETTLE", "soon")])).unwrap_err();
        assert!(error.to_string().contains("invalid duration `soon`"), "{error}");
        assert!(error.to_string().contains("settle"), "{error}");
        let error =
            Config::load(None, env(&[("RSITRD__STORE__VAL_FRACTION", "1.5")])).unwrap_err();
        assert!(error.to_string().contains("store.val_fraction"), "{error}");
        let error = Config::load(None, env(&[("RSITRD__AMQP__PREFETCH", "0")])).unwrap_err();
        assert!(error.to_string().contains("amqp.prefetch"), "{error}");
    }
}
