//! The `state.json` of earlier releases, migrated into the ledger on the first start (then
//! renamed `state.json.migrated`: the ledger is the only source of truth from there on).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::store::ledger::{
    AdapterFile, DaemonLedger, LedgerChange, LivePointer, Promotion, TrainingProgress,
    VersionRecord,
};
use crate::store::{Store, StoreError};

#[derive(Debug, Deserialize)]
struct LegacyVersion {
    adapter: Option<PathBuf>,
    parent: Option<u64>,
    #[serde(default)]
    metrics: BTreeMap<String, f64>,
    created_ms: u64,
    #[serde(default)]
    indexed_cursor: u64,
    decision: String,
}

#[derive(Debug, Deserialize)]
struct LegacyReindex {
    version: u64,
    cursor: u64,
}

#[derive(Debug, Deserialize)]
struct LegacyState {
    live: u64,
    next_version: u64,
    versions: BTreeMap<u64, LegacyVersion>,
    history: Vec<u64>,
    embed_cursor: u64,
    /// Creation sequence number of the newest sample trained on.
    train_cursor: u64,
    last_train_ms: u64,
    reindex: Option<LegacyReindex>,
    #[serde(default)]
    train_requested: bool,
}

/// Why a state file cannot be migrated.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("cannot read {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path} is not a state file of an earlier rsitrd: {error}")]
    Parse {
        path: PathBuf,
        error: serde_json::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The content-addressed record of an adapter file named by an old state file.
pub fn adapter_file(path: &Path) -> Result<AdapterFile, MigrateError> {
    let bytes = std::fs::read(path).map_err(|error| MigrateError::Read {
        path: path.to_path_buf(),
        error,
    })?;
    Ok(AdapterFile {
        path: path.to_path_buf(),
        blake3: crate::serve::adapter_id(&bytes),
    })
}

/// Moves `state_path` into the ledger in one transaction; `None` when there is no such file.
pub fn migrate(store: &Store, state_path: &Path) -> Result<Option<DaemonLedger>, MigrateError> {
    let bytes = match std::fs::read(state_path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => {
            return Err(MigrateError::Read {
                path: state_path.to_path_buf(),
                error,
            });
        }
    };
    let state: LegacyState =
        serde_json::from_slice(&bytes).map_err(|error| MigrateError::Parse {
            path: state_path.to_path_buf(),
            error,
        })?;
    let mut changes = Vec::new();
    for (version, old) in &state.versions {
        let adapter = match &old.adapter {
            // An adapter file that is gone cannot serve anyway; the version keeps its history.
            Some(path) if path.exists() => Some(adapter_file(path)?),
            Some(path) => {
                tracing::warn!(version, path = %path.display(), "adapter file of a migrated version is missing");
                None
            }
            None => None,
        };
        changes.push(LedgerChange::Version(
            *version,
            VersionRecord {
                adapter,
                parent: old.parent,
                metrics: old.metrics.clone(),
                created_ms: old.created_ms,
                indexed_cursor: old.indexed_cursor,
                decision: old.decision.clone(),
            },
        ));
    }
    let live = LivePointer {
        version: state.live,
        history: state.history.clone(),
        embed_cursor: state.embed_cursor,
    };
    let training = TrainingProgress {
        next_version: state.next_version,
        trained_upto: store.train_ordinal_after(state.train_cursor)?,
        last_train_ms: state.last_train_ms,
        best: None,
        requested: state.train_requested,
    };
    // The old re-embed ran to the tail; from here it stops where freshness stands and the
    // dual write covers the rest.
    let promotion = state.reindex.as_ref().map(|job| Promotion {
        version: job.version,
        stop_at: state.embed_cursor.max(job.cursor),
        cursor: job.cursor,
    });
    changes.push(LedgerChange::Live(live.clone()));
    changes.push(LedgerChange::Training(training.clone()));
    changes.push(LedgerChange::Promotion(promotion));
    store.apply(&changes)?;
    let migrated = state_path.with_extension("json.migrated");
    if let Err(error) = std::fs::rename(state_path, &migrated) {
        tracing::warn!(%error, "state.json migrated into the ledger but could not be renamed");
    }
    tracing::info!(from = %state_path.display(), versions = state.versions.len(), "migrated the daemon state into the ledger");
    Ok(Some(DaemonLedger {
        live,
        training,
        promotion,
        slice: None,
    }))
}
