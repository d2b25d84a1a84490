//! rsitrd: keeps a remote-sensing image-text retrieval model (frozen CLIP + MRS-Adapter,
//! PE-RSITR) fresh while new data streams in.
//!
//! # Layout
//! - [`model`]: CLIP towers, MRS-Adapter, HMMC loss, tokenizer, preprocessing, weights, devices
//! - [`train`]: the adapter training step (frozen backbone, Adam) shared by every trainer
//! - [`eval`]: R@K / mR with pessimistic ties
//! - [`bench`]: embedding and training throughput measurements

pub mod bench;
pub mod eval;
pub mod model;
pub mod train;
