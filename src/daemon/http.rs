//! The HTTP API (axum): search, embed, status, train, rollback, health, readiness, metrics.
//! Queries are encoded on blocking threads with the live model and searched in the index
//! version that model wrote, taken together from one `ArcSwap` load.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use burn::prelude::Backend;
use serde::Deserialize;
use serde_json::json;

use super::Shared;
use crate::index::{IMAGE_VECTOR, TEXT_VECTOR};
use crate::model::preprocess::{decode_image, preprocess};

/// An API error: status and a JSON body naming the problem.
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }

    fn internal(message: impl std::fmt::Display) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({"error": self.message}))).into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        Self {
            status: rejection.status(),
            message: rejection.body_text(),
        }
    }
}

type AppState<B> = Arc<Shared<B>>;

/// Serves until the daemon is cancelled.
pub async fn serve<B: Backend>(shared: AppState<B>, listener: tokio::net::TcpListener)
where
    B::Device: Send + Sync,
{
    let cancel = shared.cancel.clone();
    let app = router(shared);
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await;
    if let Err(error) = result {
        tracing::error!(%error, "http server failed");
    }
}

/// All routes (public for tests that drive the router directly).
pub fn router<B: Backend>(shared: AppState<B>) -> Router
where
    B::Device: Send + Sync,
{
    let max_body = shared.config.http.max_body_bytes;
    let v1 = Router::new()
        .route("/v1/search", post(search::<B>))
        .route("/v1/embed", post(embed::<B>))
        .route("/v1/status", get(status::<B>))
        .route("/v1/train", post(train::<B>))
        .route("/v1/rollback", post(rollback::<B>))
        .route_layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            auth::<B>,
        ));
    Router::new()
        .merge(v1)
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz::<B>))
        .route("/metrics", get(metrics::<B>))
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            reject_oversized::<B>,
        ))
        .layer(axum::middleware::from_fn(count_requests))
        .with_state(shared)
}

/// Refuses a body announced larger than `http.max_body_bytes` before reading any of it
/// (bodies without a length are still cut off at the limit while being read).
async fn reject_oversized<B: Backend>(
    State(shared): State<AppState<B>>,
    request: Request,
    next: Next,
) -> Response {
    let max = shared.config.http.max_body_bytes;
    let announced = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(length) = announced
        && length > max as u64
    {
        return ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!("request body of {length} bytes exceeds the length limit of {max} bytes (http.max_body_bytes)"),
        }
        .into_response();
    }
    next.run(request).await
}

async fn count_requests(request: Request, next: Next) -> Response {
    let path = request.uri().path().to_string();
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    if path == "/v1/search" {
        metrics::histogram!("rsitrd_search_seconds").record(started.elapsed().as_secs_f64());
    }
    metrics::counter!("rsitrd_http_requests_total", "path" => path, "status" => response.status().as_u16().to_string())
        .increment(1);
    response
}

/// Bearer token check when `http.bearer_token_env` names a non-empty variable.
async fn auth<B: Backend>(
    State(shared): State<AppState<B>>,
    request: Request,
    next: Next,
) -> Response {
    let expected = std::env::var(&shared.config.http.bearer_token_env)
        .ok()
        .filter(|t| !t.is_empty());
    if let Some(expected) = expected {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(expected.as_str()) {
            return ApiError {
                status: StatusCode::UNAUTHORIZED,
                message: "missing or wrong bearer token".into(),
            }
            .into_response();
        }
    }
    next.run(request).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SearchRequest {
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    image_b64: Option<String>,
    k: usize,
    #[serde(default)]
    filter: Option<serde_json::Map<String, serde_json::Value>>,
}

async fn search<B: Backend>(
    State(shared): State<AppState<B>>,
    body: Result<Json<SearchRequest>, JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError>
where
    B::Device: Send + Sync,
{
    let Json(request) = body?;
    let max_k = shared.config.http.max_k;
    if request.k == 0 || request.k > max_k {
        return Err(ApiError::bad_request(format!(
            "k must be between 1 and {max_k}"
        )));
    }
    let filter: crate::index::PayloadFilter =
        request.filter.unwrap_or_default().into_iter().collect();
    let query = match (request.text, request.image_b64) {
        (Some(text), None) => Query::Text(text),
        (None, Some(image)) => Query::Image(decode_b64(&image)?),
        _ => {
            return Err(ApiError::bad_request(
                "give exactly one of `text` (finds images) or `image_b64` (finds captions)",
            ));
        }
    };
    let k = request.k;
    let shared2 = shared.clone();
    let response = tokio::task::spawn_blocking(move || -> Result<serde_json::Value, ApiError> {
        // One load: the encoder and the index version belong together.
        let live = shared2.live.load_full();
        let (vector, vector_name) = encode(&shared2, &live.embedder, query)?;
        let hits = shared2
            .index
            .search(live.version, vector_name, vector, k, &filter)
            .map_err(|e| {
                if e.to_string().contains("only strings") {
                    ApiError::bad_request(e.to_string())
                } else {
                    ApiError::internal(e)
                }
            })?;
        let results: Vec<serde_json::Value> = hits
            .into_iter()
            .map(|hit| {
                json!({
                    "sample_id": hit.payload.get("sample_id").cloned().unwrap_or_default(),
                    "adapter_version": hit.payload.get("adapter_version").cloned().unwrap_or_default(),
                    "score": hit.score,
                    "captions": hit.payload.get("captions").cloned().unwrap_or_default(),
                    "metadata": hit.payload.get("metadata").cloned().unwrap_or_default(),
                })
            })
            .collect();
        Ok(json!({"adapter_version": live.version, "results": results}))
    })
    .await
    .map_err(ApiError::internal)??;
    Ok(Json(response))
}

enum Query {
    Text(String),
    Image(Vec<u8>),
}

fn decode_b64(text: &str) -> Result<Vec<u8>, ApiError> {
    base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| ApiError::bad_request(format!("image_b64 is not valid base64: {e}")))
}

/// A text query is compared with image vectors, an image query with caption vectors.
fn encode<B: Backend>(
    shared: &Shared<B>,
    embedder: &crate::model::Embedder<B>,
    query: Query,
) -> Result<(Vec<f32>, &'static str), ApiError> {
    match query {
        Query::Text(text) => {
            if text.trim().is_empty() {
                return Err(ApiError::bad_request("`text` is empty"));
            }
            let vector = embedder.embed_texts(&[text]).remove(0);
            Ok((vector, IMAGE_VECTOR))
        }
        Query::Image(bytes) => {
            let image = decode_image(&bytes, "image_b64", shared.config.model.max_pixels)
                .map_err(|e| ApiError::bad_request(e.to_string()))?;
            let pixels = preprocess(&image, embedder.image_size());
            let vector = embedder.embed_pixels(&[pixels.as_slice()]).remove(0);
            Ok((vector, TEXT_VECTOR))
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EmbedRequest {
    #[serde(default)]
    texts: Vec<String>,
    #[serde(default)]
    images_b64: Vec<String>,
}

async fn embed<B: Backend>(
    State(shared): State<AppState<B>>,
    body: Result<Json<EmbedRequest>, JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError>
where
    B::Device: Send + Sync,
{
    let Json(request) = body?;
    if request.texts.is_empty() && request.images_b64.is_empty() {
        return Err(ApiError::bad_request("give `texts` and/or `images_b64`"));
    }
    let images: Vec<Vec<u8>> = request
        .images_b64
        .iter()
        .map(|text| decode_b64(text))
        .collect::<Result<_, _>>()?;
    let texts = request.texts;
    let response = tokio::task::spawn_blocking(move || -> Result<serde_json::Value, ApiError> {
        let live = shared.live.load_full();
        let mut image_vectors = Vec::new();
        for (index, bytes) in images.iter().enumerate() {
            let image = decode_image(
                bytes,
                &format!("images_b64[{index}]"),
                shared.config.model.max_pixels,
            )
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
            image_vectors.push(preprocess(&image, live.embedder.image_size()));
        }
        let refs: Vec<&[f32]> = image_vectors.iter().map(Vec::as_slice).collect();
        let images = if refs.is_empty() {
            Vec::new()
        } else {
            live.embedder.embed_pixels(&refs)
        };
        let texts = if texts.is_empty() {
            Vec::new()
        } else {
            live.embedder.embed_texts(&texts)
        };
        Ok(json!({"adapter_version": live.version, "images": images, "texts": texts}))
    })
    .await
    .map_err(ApiError::internal)??;
    Ok(Json(response))
}

async fn status<B: Backend>(
    State(shared): State<AppState<B>>,
) -> Result<Json<serde_json::Value>, ApiError>
where
    B::Device: Send + Sync,
{
    let response = tokio::task::spawn_blocking(move || -> Result<serde_json::Value, ApiError> {
        let live = shared.live.load_full();
        let state = shared.state_snapshot();
        let stats = shared.store.stats().map_err(ApiError::internal)?;
        let index_versions = shared.index.versions().map_err(ApiError::internal)?;
        let backlog = stats.last_seq.saturating_sub(state.embed_cursor);
        let backlog_samples = shared
            .store
            .samples_since(state.embed_cursor, 100_000)
            .map(|s| s.len())
            .unwrap_or(backlog as usize);
        let last_run = shared.last_run.lock().expect("run lock").clone();
        Ok(json!({
            "adapter_version": live.version,
            "adapter_metrics": live.metrics,
            "index_versions": index_versions,
            "index_points": shared.index.count(live.version).ok(),
            "samples": stats,
            "backlog": backlog_samples,
            "training": shared.training.load(Ordering::SeqCst),
            "promotion": state.reindex,
            "last_run": last_run,
            "versions": state.versions,
        }))
    })
    .await
    .map_err(ApiError::internal)??;
    Ok(Json(response))
}

async fn train<B: Backend>(
    State(shared): State<AppState<B>>,
) -> (StatusCode, Json<serde_json::Value>) {
    shared.update_state(|state| state.train_requested = true);
    (StatusCode::ACCEPTED, Json(json!({"requested": true})))
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RollbackRequest {
    #[serde(default)]
    to: Option<u64>,
}

async fn rollback<B: Backend>(
    State(shared): State<AppState<B>>,
    body: Option<Json<RollbackRequest>>,
) -> Result<Json<serde_json::Value>, ApiError>
where
    B::Device: Send + Sync,
{
    let to = body.map(|Json(r)| r.to).unwrap_or_default();
    let version = tokio::task::spawn_blocking(move || super::rollback(&shared, to))
        .await
        .map_err(ApiError::internal)?
        .map_err(|message| ApiError {
            status: StatusCode::CONFLICT,
            message,
        })?;
    Ok(Json(json!({"adapter_version": version})))
}

async fn readyz<B: Backend>(State(shared): State<AppState<B>>) -> Response {
    if shared.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting").into_response()
    }
}

async fn metrics<B: Backend>(State(shared): State<AppState<B>>) -> Response {
    match &shared.metrics {
        Some(handle) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "metrics recorder not installed").into_response(),
    }
}
