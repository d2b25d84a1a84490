//! What the pages show beside search results: the model's history (training runs with the
//! gate's decisions, switches of the live version), the latest rejects, and the payload
//! values people filter on. Every read is bounded by a count checked first.

use crate::model::kernels::ModelBackend;
use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Query, State};
use serde::Deserialize;
use serde_json::json;

use super::{ApiError, AppState};

/// Most entries of each list `/v1/history` answers with.
const MAX_HISTORY: usize = 500;
const DEFAULT_HISTORY: usize = 100;
/// Latest rejects shown.
const REJECTS: usize = 20;
/// Recent samples whose metadata `/v1/facets` reads.
const FACET_SCAN: usize = 2000;
/// Most metadata keys, values per key, and characters per value it lists.
const FACET_KEYS: usize = 32;
const FACET_VALUES: usize = 50;
const FACET_CHARS: usize = 100;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct HistoryQuery {
    #[serde(default)]
    limit: Option<usize>,
}

/// `GET /v1/history?limit=N`: the newest training runs (each with its gate decision and the
/// metrics compared), switches of the live version, and the latest rejects.
pub(super) async fn history<B: ModelBackend>(
    State(shared): State<AppState<B>>,
    Query(query): Query<HistoryQuery>,
) -> Result<Json<serde_json::Value>, ApiError>
where
    B::Device: Send + Sync,
{
    let limit = query.limit.unwrap_or(DEFAULT_HISTORY);
    if limit == 0 || limit > MAX_HISTORY {
        return Err(ApiError::bad_request(format!(
            "limit must be between 1 and {MAX_HISTORY}"
        )));
    }
    tokio::task::spawn_blocking(move || {
        let store = &shared.primary().store;
        let runs = store.recent_runs(limit).map_err(ApiError::internal)?;
        let switches = store.recent_switches(limit).map_err(ApiError::internal)?;
        let rejects = store.recent_rejects(REJECTS).map_err(ApiError::internal)?;
        Ok(Json(json!({
            "runs": runs,
            "switches": switches,
            "rejects": rejects,
        })))
    })
    .await
    .map_err(ApiError::internal)?
}

/// `GET /v1/facets`: the values of the payload fields searches can filter on: splits, sources
/// (from the ledger's counters) and metadata keys with their values (from the newest
/// samples; any other value can still be typed).
pub(super) async fn facets<B: ModelBackend>(
    State(shared): State<AppState<B>>,
) -> Result<Json<serde_json::Value>, ApiError>
where
    B::Device: Send + Sync,
{
    tokio::task::spawn_blocking(move || {
        let store = &shared.primary().store;
        let stats = store.stats().map_err(ApiError::internal)?;
        let recent = store
            .recent_samples(FACET_SCAN)
            .map_err(ApiError::internal)?;
        let mut metadata: BTreeMap<String, Vec<serde_json::Value>> = BTreeMap::new();
        for record in &recent {
            for (key, value) in &record.metadata {
                if !metadata.contains_key(key) && metadata.len() >= FACET_KEYS {
                    continue;
                }
                // Only what a filter can match: strings, integers, booleans.
                let value = match value {
                    serde_json::Value::String(s) if s.chars().count() <= FACET_CHARS => {
                        value.clone()
                    }
                    serde_json::Value::Bool(_) => value.clone(),
                    serde_json::Value::Number(n) if n.is_i64() => value.clone(),
                    _ => continue,
                };
                let values = metadata.entry(key.clone()).or_default();
                if values.len() < FACET_VALUES && !values.contains(&value) {
                    values.push(value);
                }
            }
        }
        Ok(Json(json!({
            "split": ["train", "val"],
            "source": stats.by_source.keys().collect::<Vec<_>>(),
            "metadata": metadata,
            "scanned": recent.len(),
        })))
    })
    .await
    .map_err(ApiError::internal)?
}
