//! The daemon's durable state (`DATA_DIR/state.json`, replaced atomically): which adapter
//! version serves, every version made, cursors into the store, and the promotion in progress.
//! Work in progress lives here, so after a crash a re-embed resumes and an unfinished
//! training run simply runs again (its cursor was not advanced).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One adapter version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionRecord {
    /// Adapter checkpoint; `None` = the untrained adapter (plain CLIP).
    pub adapter: Option<PathBuf>,
    pub parent: Option<u64>,
    /// Validation metrics when it was made (percent).
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
    pub created_ms: u64,
    /// Store sequence number its index version is complete up to (while it was live).
    #[serde(default)]
    pub indexed_cursor: u64,
    /// `promoted`, `rejected: …`, `initial`.
    pub decision: String,
}

/// A promotion in progress: the corpus is being re-embedded into `version`'s index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reindex {
    pub version: u64,
    /// Store sequence number re-embedded so far.
    pub cursor: u64,
}

/// Everything the daemon must remember across restarts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DaemonState {
    /// Adapter (and index) version serving queries.
    pub live: u64,
    pub next_version: u64,
    pub versions: BTreeMap<u64, VersionRecord>,
    /// Live versions in the order they served (for keep/rollback).
    pub history: Vec<u64>,
    /// Store sequence number embedded into the live index.
    pub embed_cursor: u64,
    /// Creation sequence number of the newest sample the last finished run trained on.
    pub train_cursor: u64,
    pub last_train_ms: u64,
    pub reindex: Option<Reindex>,
    /// `POST /v1/train` asked for a run that has not finished yet (a crash re-runs it).
    #[serde(default)]
    pub train_requested: bool,
}

impl DaemonState {
    /// Fresh state serving `adapter` (from the configuration) as version `version`.
    pub fn initial(version: u64, adapter: Option<PathBuf>, now_ms: u64) -> Self {
        let mut versions = BTreeMap::new();
        versions.insert(
            version,
            VersionRecord {
                adapter,
                parent: None,
                metrics: BTreeMap::new(),
                created_ms: now_ms,
                indexed_cursor: 0,
                decision: "initial".into(),
            },
        );
        Self {
            live: version,
            next_version: version + 1,
            versions,
            history: vec![version],
            embed_cursor: 0,
            train_cursor: 0,
            last_train_ms: now_ms,
            reindex: None,
            train_requested: false,
        }
    }

    pub fn load(path: &Path) -> std::io::Result<Option<Self>> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            }),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(error),
        }
    }

    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(self).expect("state serializes");
        crate::model::weights::write_atomically(path, &bytes)
    }

    /// Index versions to keep: the live one and the `keep - 1` previous live ones.
    pub fn kept_versions(&self, keep: usize) -> Vec<u64> {
        let mut kept = Vec::new();
        for version in self.history.iter().rev() {
            if !kept.contains(version) {
                kept.push(*version);
            }
            if kept.len() >= keep {
                break;
            }
        }
        kept
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_versions_follow_the_live_history() {
        let mut state = DaemonState::initial(0, None, 0);
        state.history = vec![0, 1, 2, 1, 3];
        assert_eq!(state.kept_versions(2), vec![3, 1]);
        assert_eq!(state.kept_versions(3), vec![3, 1, 2]);
        assert_eq!(state.kept_versions(1), vec![3]);
    }

    #[test]
    fn state_round_trips() {
        let dir = std::env::temp_dir().join(format!("rsitrd-state-{}", std::process::id()));
        let path = dir.join("state.json");
        let mut state = DaemonState::initial(4, Some("a.safetensors".into()), 7);
        state.reindex = Some(Reindex {
            version: 5,
            cursor: 9,
        });
        state.save(&path).unwrap();
        assert_eq!(DaemonState::load(&path).unwrap(), Some(state));
        let _ = std::fs::remove_dir_all(dir);
    }
}
