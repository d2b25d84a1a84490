//! rsitrd: keeps a remote-sensing image-text retrieval model (frozen CLIP + MRS-Adapter,
//! PE-RSITR) fresh while new data streams in.
//!
//! # Layout
//! - [`config`]: the configuration file, defaults and `RSITRD__SECTION__KEY` overrides
//! - [`durable`]: atomic, fsynced file replacement
//! - [`data`]: dataset formats (Karpathy JSON, AMFMN precomp), validation, image loading
//! - [`model`]: CLIP towers, MRS-Adapter, HMMC loss, tokenizer, preprocessing, weights, devices
//! - [`train`]: the adapter training step, the offline trainer, the daemon's trigger and gate
//! - [`store`]: the durable sample store (redb ledger + content-addressed blobs, group commit)
//! - [`ingest`]: validation, the watched inbox, the AMQP source, import/publish backfills
//! - [`index`]: the vector index trait, qdrant-edge (embedded) and qdrant-client (remote)
//! - [`stored`]: stored samples as model inputs, and the quarantine of unusable ones
//! - [`serve`]: the shared backbone and the live adapter version behind an `ArcSwap`
//! - [`indexer`]: stored samples into index points (freshness, re-embedding)
//! - [`versions`]: the one owner of the live version, and the index worker it drives
//! - [`http`]: the API (search, embed, status, train, rollback, quarantine, metrics)
//! - [`daemon`]: `rsitrd run`: wiring, readiness, watchdog, graceful shutdown
//! - [`replica`]: `rsitrd serve`: a stateless query replica that follows the alias
//! - [`eval`]: R@K / mR with pessimistic ties
//! - [`embed`]: the `rsitrd embed` contract (one JSON line per input)
//! - [`bench`]: embedding and training throughput measurements
//! - [`client`]: operator commands through the daemon's API, or offline when it is stopped

pub mod bench;
pub mod client;
pub mod config;
pub mod daemon;
pub mod data;
pub mod durable;
pub mod embed;
pub mod eval;
pub mod http;
pub mod index;
pub mod indexer;
pub mod ingest;
pub mod model;
pub mod replica;
pub mod serve;
pub mod store;
pub mod stored;
pub mod streameval;
pub mod train;
pub mod versions;
pub mod web;
