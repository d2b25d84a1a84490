//! The configuration file (`config/rsitrd.toml`): built-in defaults, then the file, then
//! environment overrides `RSITRD__SECTION__KEY`, validated once; errors name the key.
//!
//! Sections: `[model]` (every command), `[store]` (the durable sample store), `[ingest]`
//! (validation limits), `[inbox]` (the watched directory) and `[amqp]` (the RabbitMQ source).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::model::DEFAULT_EMBED_BATCH;
use crate::model::device::{BackbonePrecision, DeviceChoice};
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
    #[serde(default)]
    pub index: IndexSection,
    #[serde(default)]
    pub training: TrainingSection,
    #[serde(default)]
    pub gate: GateSection,
    #[serde(default)]
    pub http: HttpSection,
}

/// Which Qdrant holds the vectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IndexBackendKind {
    /// In-process qdrant-edge shards under `DATA_DIR/index`.
    Embedded,
    /// A Qdrant server or cluster (gRPC).
    Remote,
}

/// `[index]`: the vector index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexSection {
    /// `embedded` (qdrant-edge, in-process) or `remote` (qdrant-client).
    #[serde(default = "default_index_backend")]
    pub backend: IndexBackendKind,
    /// Remote: gRPC URL (`https://` for TLS).
    #[serde(default = "default_index_url")]
    pub url: String,
    /// Remote: environment variable holding the API key (none if unset or empty).
    #[serde(default = "default_api_key_env")]
    pub api_key_env: String,
    /// Remote: file holding the API key (takes precedence over the variable).
    #[serde(default)]
    pub api_key_file: Option<PathBuf>,
    /// Remote: the alias queries use; versions are collections `NAME_vN` behind it.
    #[serde(default = "default_collection")]
    pub collection: String,
    /// Index versions kept after a switch (the live one and previous ones, for rollback).
    #[serde(default = "default_keep_versions")]
    pub keep_versions: usize,
    /// Samples embedded and upserted per batch (new samples and re-embedding alike; each
    /// batch is made durable and its progress recorded).
    #[serde(default = "default_embed_batch_samples")]
    pub embed_batch: usize,
    /// Remote: time limit of one request to the server (a server away or stuck fails fast:
    /// searches answer 503, background writes back off and retry).
    #[serde(default = "default_index_timeout", with = "humantime_serde_compat")]
    pub timeout: std::time::Duration,
    /// Remote: most points in one upsert request (larger batches are split, each one acknowledged
    /// only once durable: `wait = true`).
    #[serde(default = "default_upsert_points")]
    pub upsert_points: usize,
    /// Remote: write ordering of upserts, `weak`, `medium` (default: through a dynamically chosen
    /// leader, consistent unless the leader changes) or `strong` (through the permanent
    /// leader; unavailable while it is down).
    #[serde(default = "default_write_ordering")]
    pub write_ordering: String,
    /// Remote: shards of each version's collection (none: the server's default).
    #[serde(default)]
    pub shard_number: Option<u32>,
    /// Remote: copies of each shard on a cluster (none: the server's default, 1).
    #[serde(default)]
    pub replication_factor: Option<u32>,
    /// Remote: replicas that must acknowledge a write (none: the server's default, 1).
    #[serde(default)]
    pub write_consistency_factor: Option<u32>,
    /// Metadata keys people filter on, indexed as keywords (`metadata.KEY`) in every version.
    #[serde(default)]
    pub indexed_metadata: Vec<String>,
}

fn default_index_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(10)
}
fn default_upsert_points() -> usize {
    256
}
fn default_write_ordering() -> String {
    "medium".into()
}

fn default_embed_batch_samples() -> usize {
    32
}

fn default_index_backend() -> IndexBackendKind {
    IndexBackendKind::Embedded
}
fn default_index_url() -> String {
    "http://127.0.0.1:6334".into()
}
fn default_api_key_env() -> String {
    "QDRANT_API_KEY".into()
}
fn default_collection() -> String {
    "rsitrd".into()
}
fn default_keep_versions() -> usize {
    2
}

impl Default for IndexSection {
    fn default() -> Self {
        Self {
            backend: default_index_backend(),
            url: default_index_url(),
            api_key_env: default_api_key_env(),
            api_key_file: None,
            collection: default_collection(),
            keep_versions: default_keep_versions(),
            embed_batch: default_embed_batch_samples(),
            timeout: default_index_timeout(),
            upsert_points: default_upsert_points(),
            write_ordering: default_write_ordering(),
            shard_number: None,
            replication_factor: None,
            write_consistency_factor: None,
            indexed_metadata: Vec::new(),
        }
    }
}

/// `[training]`: continual adapter training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingSection {
    /// Train at all (off: the daemon only ingests, embeds and serves).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// A run starts once this many new training samples arrived since the last run...
    #[serde(default = "default_min_new_samples")]
    pub min_new_samples: u64,
    /// ...or after this long with at least one new training sample.
    #[serde(default = "default_train_interval", with = "humantime_serde_compat")]
    pub interval: std::time::Duration,
    /// Adapter steps per run.
    #[serde(default = "default_train_steps")]
    pub steps: usize,
    /// Pairs per step.
    #[serde(default = "default_train_batch")]
    pub batch_size: usize,
    /// Adam learning rate.
    #[serde(default = "default_train_lr")]
    pub lr: f64,
    /// Replayed older training samples per new one (against forgetting).
    #[serde(default = "default_replay_ratio")]
    pub replay_ratio: f64,
    /// Learning rate over a run's steps (each run starts a fresh Adam).
    #[serde(default)]
    pub lr_schedule: LrSchedule,
    /// Decay of an exponential moving average of the adapter weights over a run's steps,
    /// started at the parent adapter; the average is the candidate. 0: off (the last step's
    /// weights are the candidate).
    #[serde(default)]
    pub ema_decay: f64,
    #[serde(default = "default_split_seed")]
    pub seed: u64,
}

/// Learning rate within one training run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    /// `lr` at every step.
    #[default]
    Constant,
    /// `lr · (1 + cos(π·t/steps)) / 2`: full at the first step, near zero at the last.
    Cosine,
}

impl LrSchedule {
    /// The rate of step `step` (0-based) of `steps`.
    pub fn lr_at(self, lr: f64, step: usize, steps: usize) -> f64 {
        match self {
            Self::Constant => lr,
            Self::Cosine => {
                let t = step as f64 / steps.max(1) as f64;
                lr * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
            }
        }
    }
}

/// Largest `training.replay_ratio` accepted.
pub const MAX_REPLAY_RATIO: f64 = 16.0;

fn default_min_new_samples() -> u64 {
    64
}
fn default_train_interval() -> std::time::Duration {
    std::time::Duration::from_secs(3600)
}
fn default_train_steps() -> usize {
    100
}
fn default_train_batch() -> usize {
    16
}
fn default_train_lr() -> f64 {
    2e-4
}
/// Measured with `rsitrd stream-eval` (docs/continual.md): 2 beat 0, 0.5 and 1 on final mR
/// and forgetting, and EMA or a cosine schedule on top of it did not help.
fn default_replay_ratio() -> f64 {
    2.0
}

impl Default for TrainingSection {
    fn default() -> Self {
        Self {
            enabled: true,
            min_new_samples: default_min_new_samples(),
            interval: default_train_interval(),
            steps: default_train_steps(),
            batch_size: default_train_batch(),
            lr: default_train_lr(),
            replay_ratio: default_replay_ratio(),
            lr_schedule: LrSchedule::default(),
            ema_decay: 0.0,
            seed: default_split_seed(),
        }
    }
}

/// `[gate]`: when a candidate adapter replaces the live one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GateSection {
    /// Off: every candidate whose losses stayed finite is promoted, unevaluated (for
    /// measurements such as `rsitrd stream-eval`'s naive bound, not for serving).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Largest accepted drop of slice mR, in percentage points, against the live version and
    /// against the best version promoted so far.
    #[serde(default = "default_mr_tolerance")]
    pub mr_tolerance: f64,
    /// Fewest slice samples for a decision (fewer: candidates are kept, not promoted). Absent:
    /// `ceil(200 / mr_tolerance)`, the smallest slice on which the tolerance spans four
    /// single-image steps of mR ([`required_slice`]); a smaller value is refused.
    #[serde(default)]
    pub min_val_samples: Option<usize>,
    /// Validation samples in the gate's evaluation slice (the newest, and `old_fraction` of
    /// it drawn from older ones).
    #[serde(default = "default_slice_size")]
    pub slice_size: usize,
    /// Fraction of the slice drawn from older validation samples (the rest are the newest),
    /// so that forgetting of earlier data is what the gate sees, not only the new data.
    #[serde(default = "default_old_fraction")]
    pub old_fraction: f64,
}

fn default_old_fraction() -> f64 {
    0.5
}

/// Fewest slice samples for which `tolerance` (mR points) is a meaningful margin.
///
/// mR averages six recalls; a single image whose image→text retrieval flips at every K moves
/// three of them by 100/n points, i.e. mR by 50/n. A decision within a tolerance of less than
/// four such steps turns on two or three images: noise. So n ≥ 200 / tolerance (400 for the
/// default 0.5, 2 for a tolerance of 100 that only screens out broken candidates).
pub fn required_slice(tolerance: f64) -> usize {
    if tolerance <= 0.0 {
        // Zero tolerance: any size is exact about "not worse"; ask for the default's size.
        return required_slice(0.5);
    }
    ((200.0 / tolerance).ceil() as usize).max(2)
}

impl GateSection {
    /// The slice size a decision needs: `min_val_samples`, else [`required_slice`].
    pub fn min_slice(&self) -> usize {
        self.min_val_samples
            .unwrap_or_else(|| required_slice(self.mr_tolerance))
    }
}

fn default_mr_tolerance() -> f64 {
    0.5
}
fn default_slice_size() -> usize {
    1000
}

impl Default for GateSection {
    fn default() -> Self {
        Self {
            mr_tolerance: default_mr_tolerance(),
            enabled: true,
            min_val_samples: None,
            slice_size: default_slice_size(),
            old_fraction: default_old_fraction(),
        }
    }
}

/// `[http]`: the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSection {
    /// Address to bind (loopback by default; put a TLS proxy in front for remote clients).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Environment variable holding a bearer token that every `/v1` request must carry
    /// (unset or empty: no authentication).
    #[serde(default = "default_token_env")]
    pub bearer_token_env: String,
    /// Largest request body in bytes.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Largest `k` of a search.
    #[serde(default = "default_max_k")]
    pub max_k: usize,
    /// Queries (`/v1/search`, `/v1/embed`) encoded at once; more are answered 503 with
    /// `Retry-After` instead of queueing. Bounds the CPU and the memory requests can take:
    /// each image query holds at most one decoded image (`model.max_pixels`).
    #[serde(default = "default_max_concurrent_encodes")]
    pub max_concurrent_encodes: usize,
    /// Thumbnails (`/v1/samples/{id}/image`) made at once; a request waits up to a few
    /// seconds for its turn, then is answered 503.
    #[serde(default = "default_max_concurrent_thumbnails")]
    pub max_concurrent_thumbnails: usize,
    /// Memory the thumbnail cache may hold, in bytes (least recently used ones go first).
    #[serde(default = "default_thumbnail_cache_bytes")]
    pub thumbnail_cache_bytes: usize,
}

fn default_listen() -> String {
    "127.0.0.1:8080".into()
}
fn default_token_env() -> String {
    "RSITRD_API_TOKEN".into()
}
fn default_max_body() -> usize {
    32 << 20
}
fn default_max_k() -> usize {
    1000
}
fn default_max_concurrent_encodes() -> usize {
    4
}
fn default_max_concurrent_thumbnails() -> usize {
    4
}
fn default_thumbnail_cache_bytes() -> usize {
    64 << 20
}

impl Default for HttpSection {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            bearer_token_env: default_token_env(),
            max_body_bytes: default_max_body(),
            max_k: default_max_k(),
            max_concurrent_encodes: default_max_concurrent_encodes(),
            max_concurrent_thumbnails: default_max_concurrent_thumbnails(),
            thumbnail_cache_bytes: default_thumbnail_cache_bytes(),
        }
    }
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
    /// Where the daemon writes its candidate adapters (`vN-HASH.safetensors`) and run log
    /// (`runs.jsonl`); none = `<store.dir>/adapters`.
    #[serde(default)]
    pub adapter_dir: Option<PathBuf>,
    /// `cpu`, `cuda` or `cuda:N`.
    #[serde(default)]
    pub device: DeviceChoice,
    /// Float type of the frozen blocks' products: `f32`, or `bf16`/`f16` (mixed precision,
    /// for GPUs; the CPU converts them to f32 and back).
    #[serde(default)]
    pub backbone_precision: BackbonePrecision,
    /// Largest accepted image in pixels (width × height).
    #[serde(default = "default_max_pixels")]
    pub max_pixels: u64,
    /// Largest accepted ratio of an image's long side to its short side (CLIP keeps only the
    /// centre square); checked with `max_pixels` at ingest, on stored samples and on queries.
    #[serde(default = "default_max_aspect_ratio")]
    pub max_aspect_ratio: u32,
    /// Inputs per forward pass when embedding.
    #[serde(default = "default_embed_batch")]
    pub embed_batch_size: usize,
    /// CPU threads for the daemon's background work (embedding new samples, re-embedding,
    /// training); queries use all cores. 0 = all cores but one (at least one).
    #[serde(default)]
    pub background_threads: usize,
}

fn default_model() -> String {
    DEFAULT_MODEL.into()
}
fn default_max_pixels() -> u64 {
    DEFAULT_MAX_PIXELS
}
fn default_max_aspect_ratio() -> u32 {
    crate::model::preprocess::DEFAULT_MAX_ASPECT_RATIO
}
fn default_embed_batch() -> usize {
    DEFAULT_EMBED_BATCH
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            dir: default_model(),
            adapter: None,
            adapter_dir: None,
            device: DeviceChoice::default(),
            backbone_precision: BackbonePrecision::default(),
            max_pixels: default_max_pixels(),
            max_aspect_ratio: default_max_aspect_ratio(),
            embed_batch_size: default_embed_batch(),
            background_threads: 0,
        }
    }
}

impl Config {
    /// The daemon's adapter directory: `model.adapter_dir`, or `<store.dir>/adapters`.
    pub fn adapters_dir(&self) -> PathBuf {
        self.model
            .adapter_dir
            .clone()
            .unwrap_or_else(|| self.store.dir.join("adapters"))
    }

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

    /// The image limits every path checks (ingest, stored samples, queries).
    pub fn image_limits(&self) -> crate::model::preprocess::ImageLimits {
        crate::model::preprocess::ImageLimits::new(
            self.model.max_pixels,
            self.model.max_aspect_ratio,
        )
    }

    /// Checks values serde cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.model.dir.trim().is_empty() {
            return Err("model.dir must not be empty".into());
        }
        if self.model.max_pixels == 0 {
            return Err("model.max_pixels must be positive".into());
        }
        if self.model.max_aspect_ratio == 0 {
            return Err("model.max_aspect_ratio must be at least 1".into());
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
        if self.index.embed_batch == 0 {
            return Err("index.embed_batch must be positive".into());
        }
        if self.index.keep_versions == 0 {
            return Err("index.keep_versions must be at least 1 (the live version)".into());
        }
        if self.training.steps == 0 || self.training.batch_size < 2 {
            return Err(
                "training.steps must be positive and training.batch_size at least 2".into(),
            );
        }
        if self.training.lr.is_nan()
            || self.training.lr <= 0.0
            || self.training.replay_ratio.is_nan()
            || self.training.replay_ratio < 0.0
        {
            return Err("training.lr must be positive and training.replay_ratio >= 0".into());
        }
        // Replay is drawn per new sample: a bound keeps one run's sample list bounded.
        if self.training.replay_ratio > MAX_REPLAY_RATIO {
            return Err(format!(
                "training.replay_ratio must be at most {MAX_REPLAY_RATIO}"
            ));
        }
        if !(0.0..1.0).contains(&self.training.ema_decay) {
            return Err("training.ema_decay must be in [0, 1)".into());
        }
        if !(0.0..=1.0).contains(&self.gate.old_fraction) {
            return Err("gate.old_fraction must be in [0, 1]".into());
        }
        if self.gate.mr_tolerance.is_nan() || self.gate.mr_tolerance < 0.0 {
            return Err("gate.mr_tolerance must be >= 0".into());
        }
        if !["weak", "medium", "strong"].contains(&self.index.write_ordering.as_str()) {
            return Err(format!(
                "index.write_ordering = {:?}: expected weak, medium or strong",
                self.index.write_ordering
            ));
        }
        if self.index.upsert_points == 0 {
            return Err("index.upsert_points must be at least 1".into());
        }
        let required = required_slice(self.gate.mr_tolerance);
        if let Some(min) = self.gate.min_val_samples
            && min < required
        {
            return Err(format!(
                "gate.min_val_samples = {min} is too few for gate.mr_tolerance = {}: at least {required} (one image moves mR by 50/n points)",
                self.gate.mr_tolerance
            ));
        }
        if self.gate.slice_size < self.gate.min_val_samples.unwrap_or(required) {
            return Err(format!(
                "gate.slice_size = {} is smaller than the {} samples a decision needs (gate.min_val_samples, or 200 / gate.mr_tolerance)",
                self.gate.slice_size,
                self.gate.min_val_samples.unwrap_or(required)
            ));
        }
        if self.http.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(format!(
                "http.listen `{}` is not an address like 127.0.0.1:8080",
                self.http.listen
            ));
        }
        if self.http.max_k == 0 {
            return Err("http.max_k must be positive".into());
        }
        if self.http.max_concurrent_encodes == 0 {
            return Err("http.max_concurrent_encodes must be positive".into());
        }
        if self.http.max_concurrent_thumbnails == 0 {
            return Err("http.max_concurrent_thumbnails must be positive".into());
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

    #[test]
    fn the_cosine_schedule_falls_from_lr_to_zero_over_a_run() {
        let lr = 0.01;
        assert_eq!(LrSchedule::Constant.lr_at(lr, 7, 10), lr);
        assert_eq!(LrSchedule::Cosine.lr_at(lr, 0, 10), lr);
        assert!((LrSchedule::Cosine.lr_at(lr, 5, 10) - lr / 2.0).abs() < 1e-12);
        let last = LrSchedule::Cosine.lr_at(lr, 9, 10);
        assert!(last > 0.0 && last < 0.03 * lr, "{last}");
    }

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
                ("RSITRD__MODEL__BACKBONE_PRECISION", "bf16"),
                ("OTHER", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(config.model.device, DeviceChoice::Cuda(1));
        assert_eq!(config.model.max_pixels, 1000);
        assert_eq!(config.model.backbone_precision, BackbonePrecision::Bf16);
    }

    #[test]
    fn errors_name_the_key() {
        let error = Config::load(None, env(&[("RSITRD__MODEL__DEVICE", "tpu")])).unwrap_err();
        assert!(
            error.to_string().contains("unknown device `tpu`"),
            "{error}"
        );
        let error =
            Config::load(None, env(&[("RSITRD__MODEL__BACKBONE_PRECISION", "fp8")])).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("unknown backbone precision `fp8`"),
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
        assert!(
            error.to_string().contains("invalid duration `soon`"),
            "{error}"
        );
        assert!(error.to_string().contains("settle"), "{error}");
        let error = Config::load(None, env(&[("RSITRD__STORE__VAL_FRACTION", "1.5")])).unwrap_err();
        assert!(error.to_string().contains("store.val_fraction"), "{error}");
        let error = Config::load(None, env(&[("RSITRD__AMQP__PREFETCH", "0")])).unwrap_err();
        assert!(error.to_string().contains("amqp.prefetch"), "{error}");
    }
}
