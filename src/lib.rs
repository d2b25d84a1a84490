//! rsitrd: keeps a remote-sensing image-text retrieval model (frozen CLIP + MRS-Adapter,
//! PE-RSITR) fresh while new data streams in.
//!
//! # Layout
//! - [`config`]: the configuration file, defaults and `RSITRD__SECTION__KEY` overrides
//! - [`data`]: dataset formats (Karpathy JSON, AMFMN precomp), validation, image loading
//! - [`model`]: CLIP towers, MRS-Adapter, HMMC loss, tokenizer, preprocessing, weights, devices
//! - [`train`]: the adapter training step (frozen backbone, Adam) and the offline trainer
//! - [`store`]: the durable sample store (redb ledger + content-addressed blobs, group commit)
//! - [`ingest`]: validation, the watched inbox, the AMQP source, import/publish backfills
//! - [`index`]: the vector index trait, qdrant-edge (embedded) and qdrant-client (remote)
//! - [`daemon`]: `rsitrd run`: index worker, continual trainer + gate, promotion, HTTP API
//! - [`eval`]: R@K / mR with pessimistic ties
//! - [`bench`]: embedding and training throughput measurements

pub mod bench;
pub mod config;
pub mod daemon;
pub mod data;
pub mod eval;
pub mod index;
pub mod ingest;
pub mod model;
pub mod store;
pub mod train;
