//! The HTTP API (axum): search, embed, status, train, rollback, quarantine, health,
//! readiness, metrics. Queries are encoded on blocking threads with the live model and
//! searched in the index version that model wrote, taken together from one `ArcSwap` load.
//!
//! Every answer that is not a success is `{"error": "..."}` JSON, whatever refused it (a
//! handler, the body limit, an unknown route, a wrong method): the last layer rewrites any
//! other error body. Encodes are admitted by a semaphore (`http.max_concurrent_encodes`)
//! before their body is read, so the memory requests can hold is bounded.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use burn::prelude::Backend;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::config::Config;
use crate::index::{IMAGE_VECTOR, IndexError, TEXT_VECTOR, VectorIndex};
use crate::model::kernels::ModelBackend;
use crate::model::preprocess::load_image;
use crate::serve::Live;
use crate::store::SampleId;
use crate::store::Store;
use crate::versions::{self, VersionError};

mod history;
mod samples;

pub use samples::Thumbnails;

/// Seconds a client told "busy" should wait before trying again.
const RETRY_AFTER_S: u32 = 1;
/// Largest error body the JSON-error layer reads back to rewrite it.
const MAX_ERROR_BODY: usize = 64 << 10;

/// An API error: status and a JSON body naming the problem.
pub struct ApiError {
    status: StatusCode,
    message: String,
    retry_after: Option<u32>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    fn internal(message: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message.to_string())
    }

    fn busy(message: impl Into<String>) -> Self {
        Self {
            retry_after: Some(RETRY_AFTER_S),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
        }
    }

    fn from_versions(error: VersionError) -> Self {
        match error {
            VersionError::Conflict(message) => Self::new(StatusCode::CONFLICT, message),
            VersionError::Busy(message) => Self::busy(message),
            other => Self::internal(other),
        }
    }

    fn from_index(error: IndexError) -> Self {
        match error {
            IndexError::InvalidFilter(_) => Self::bad_request(error.to_string()),
            // The server away or overloaded: fail fast, the client may retry.
            IndexError::Unavailable(_) => {
                metrics::counter!("rsitrd_index_errors_total", "stage" => "search").increment(1);
                Self::busy(error.to_string())
            }
            other => Self::internal(other),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(json!({"error": self.message}))).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// Reads a request body within `max` bytes.
async fn read_body(body: Body, max: usize) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, max).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body exceeds the length limit of {max} bytes (http.max_body_bytes)"),
        )
    })
}

/// Parses a JSON body strictly: `application/json`, valid UTF-8 JSON, the request's own
/// fields with their types. An empty body is `None` (for routes whose body is optional).
fn parse_json<T: DeserializeOwned>(
    headers: &HeaderMap,
    bytes: &[u8],
) -> Result<Option<T>, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = content_type.split(';').next().unwrap_or("").trim();
    if !essence.eq_ignore_ascii_case("application/json") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("expected a body of content type application/json, got `{content_type}`"),
        ));
    }
    serde_json::from_slice(bytes)
        .map(Some)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
}

/// A body a route needs: an empty one is refused.
fn required<T>(body: Option<T>) -> Result<T, ApiError> {
    body.ok_or_else(|| {
        ApiError::bad_request("the request body is empty: a JSON object is expected")
    })
}

/// A strictly parsed JSON body ([`parse_json`]; `None` when empty), read with [`read_body`]:
/// the extractor of routes that are not admission-controlled (search and embed read theirs
/// only once admitted).
struct JsonBody<T>(Option<T>);

impl<T: DeserializeOwned, B: Backend> axum::extract::FromRequest<AppState<B>> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, shared: &AppState<B>) -> Result<Self, ApiError> {
        let (parts, body) = request.into_parts();
        let bytes = read_body(body, shared.config.http.max_body_bytes).await?;
        Ok(Self(parse_json(&parts.headers, &bytes)?))
    }
}

/// What the handlers share (built by the daemon, or by a query replica).
pub struct Api<B: Backend> {
    pub config: Config,
    pub index: Arc<dyn VectorIndex>,
    /// The live serving model (only the version owner, or a replica's follower, changes it).
    pub live: Arc<Live<B>>,
    /// The primary's parts; `None` on a query replica (`rsitrd serve`), which serves
    /// search, embed and a short status only.
    pub primary: Option<Primary<B>>,
    pub ready: Arc<std::sync::atomic::AtomicBool>,
    /// Admission of query encodes (`http.max_concurrent_encodes`).
    pub encodes: Arc<tokio::sync::Semaphore>,
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    pub cancel: tokio_util::sync::CancellationToken,
}

/// The parts only the primary daemon has.
pub struct Primary<B: Backend> {
    pub store: Arc<Store>,
    /// Version changes and training requests go to their owner.
    pub versions: versions::Handle<B>,
    /// A training run is in progress.
    pub training: Arc<std::sync::atomic::AtomicBool>,
    /// Thumbnails of stored images (`/v1/samples/{id}/image`).
    pub thumbnails: Thumbnails,
}

impl<B: ModelBackend> Api<B> {
    fn primary(&self) -> &Primary<B> {
        self.primary
            .as_ref()
            .expect("primary routes are mounted on the primary only")
    }
}

type AppState<B> = Arc<Api<B>>;

/// Serves until the daemon is cancelled.
pub async fn serve<B: ModelBackend>(shared: AppState<B>, listener: tokio::net::TcpListener)
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
pub fn router<B: ModelBackend>(shared: AppState<B>) -> Router
where
    B::Device: Send + Sync,
{
    let max_body = shared.config.http.max_body_bytes;
    let v1 = Router::new()
        .route("/v1/search", post(search::<B>))
        .route("/v1/embed", post(embed::<B>));
    let v1 = if shared.primary.is_some() {
        v1.route("/v1/status", get(status::<B>))
            .route("/v1/train", post(train::<B>))
            .route("/v1/rollback", post(rollback::<B>))
            .route("/v1/quarantine", get(quarantine_list::<B>))
            .route("/v1/quarantine/release", post(quarantine_release::<B>))
            .route("/v1/history", get(history::history::<B>))
            .route("/v1/facets", get(history::facets::<B>))
            .route("/v1/samples/{id}", get(samples::record::<B>))
            .route("/v1/samples/{id}/image", get(samples::image::<B>))
    } else {
        v1.route("/v1/status", get(replica_status::<B>))
    };
    let v1 = v1.route_layer(axum::middleware::from_fn_with_state(
        shared.clone(),
        auth::<B>,
    ));
    let pages = if shared.primary.is_some() {
        crate::web::routes()
    } else {
        Router::new()
    };
    Router::new()
        .merge(v1)
        .merge(pages)
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz::<B>))
        .route("/metrics", get(metrics::<B>))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route") })
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            reject_oversized::<B>,
        ))
        .layer(axum::middleware::from_fn(json_errors))
        .layer(axum::middleware::from_fn(count_requests))
        .with_state(shared)
}

/// Rewrites an error that some layer answered in plain text (a wrong method, a framework
/// rejection) as `{"error": ...}` JSON: one error format on every route.
async fn json_errors(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, MAX_ERROR_BODY)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_lowercase()
    } else {
        text
    };
    let mut rewritten = ApiError::new(status, message).into_response();
    for name in [header::RETRY_AFTER, header::ALLOW, header::WWW_AUTHENTICATE] {
        if let Some(value) = parts.headers.get(&name) {
            rewritten.headers_mut().insert(name, value.clone());
        }
    }
    rewritten
}

/// Refuses a body announced larger than `http.max_body_bytes` before reading any of it
/// (bodies without a length are still cut off at the limit while being read).
async fn reject_oversized<B: ModelBackend>(
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
        return ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body of {length} bytes exceeds the length limit of {max} bytes (http.max_body_bytes)"),
        )
        .into_response();
    }
    next.run(request).await
}

/// The route a path belongs to, as a metric label: one series per route, whatever ids or
/// unknown paths clients send.
fn route_label(path: &str) -> &'static str {
    const ROUTES: &[&str] = &[
        "/v1/search",
        "/v1/embed",
        "/v1/status",
        "/v1/train",
        "/v1/rollback",
        "/v1/quarantine",
        "/v1/quarantine/release",
        "/v1/history",
        "/v1/facets",
        "/healthz",
        "/readyz",
        "/metrics",
        "/",
        "/status",
    ];
    if let Some(route) = ROUTES.iter().find(|route| **route == path) {
        return route;
    }
    match path.strip_prefix("/v1/samples/") {
        Some(rest) if rest.ends_with("/image") => "/v1/samples/{id}/image",
        Some(_) => "/v1/samples/{id}",
        None if path.starts_with("/ui/") => "/ui/*",
        None => "other",
    }
}

async fn count_requests(request: Request, next: Next) -> Response {
    let path = route_label(request.uri().path());
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
async fn auth<B: ModelBackend>(
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
            return ApiError::new(StatusCode::UNAUTHORIZED, "missing or wrong bearer token")
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

/// Admits one encode and reads its JSON body, or answers 503 with `Retry-After` when
/// `http.max_concurrent_encodes` are running: a burst is refused at once instead of queueing
/// work and memory. A refused body is read and thrown away chunk by chunk (never held, at
/// most `http.max_body_bytes`): a server that closed on an unread body would reset the
/// connection under a client still sending, and it would never see the 503.
async fn admitted<B: ModelBackend, T: DeserializeOwned>(
    shared: &Api<B>,
    headers: &HeaderMap,
    body: Body,
) -> Result<(tokio::sync::OwnedSemaphorePermit, T), ApiError> {
    let max = shared.config.http.max_body_bytes;
    let Ok(permit) = shared.encodes.clone().try_acquire_owned() else {
        metrics::counter!("rsitrd_http_busy_total").increment(1);
        let mut chunks = body.into_data_stream();
        let mut seen = 0usize;
        while let Some(Ok(chunk)) = futures_lite::StreamExt::next(&mut chunks).await {
            seen = seen.saturating_add(chunk.len());
            if seen > max {
                break;
            }
        }
        return Err(ApiError::busy(format!(
            "{} queries are being encoded (http.max_concurrent_encodes): try again shortly",
            shared.config.http.max_concurrent_encodes
        )));
    };
    let bytes = read_body(body, max).await?;
    Ok((permit, required(parse_json(headers, &bytes)?)?))
}

async fn search<B: ModelBackend>(
    State(shared): State<AppState<B>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<serde_json::Value>, ApiError>
where
    B::Device: Send + Sync,
{
    // Admission first: only admitted requests keep their body.
    let (permit, request): (_, SearchRequest) = admitted(&shared, &headers, body).await?;
    let max_k = shared.config.http.max_k;
    if request.k == 0 || request.k > max_k {
        return Err(ApiError::bad_request(format!(
            "k must be between 1 and {max_k}"
        )));
    }
    let filter: crate::index::PayloadFilter =
        request.filter.unwrap_or_default().into_iter().collect();
    crate::index::match_conditions(&filter).map_err(ApiError::from_index)?;
    let query = match (request.text, request.image_b64) {
        (Some(text), None) => Query::Text(text),
        (None, Some(image)) => Query::Image(decode_b64(&image, "image_b64")?),
        _ => {
            return Err(ApiError::bad_request(
                "give exactly one of `text` (finds images) or `image_b64` (finds captions)",
            ));
        }
    };
    let k = request.k;
    let shared2 = shared.clone();
    let response = tokio::task::spawn_blocking(move || -> Result<serde_json::Value, ApiError> {
        let _permit = permit;
        // One load: the encoder and the index version belong together.
        let live = shared2.live.load_full();
        let (vector, vector_name) = encode(&shared2, &live.embedder, query)?;
        let hits = shared2
            .index
            .search(live.version, vector_name, vector, k, &filter)
            .map_err(ApiError::from_index)?;
        let results: Vec<serde_json::Value> = hits
            .into_iter()
            .map(|hit| {
                json!({
                    "sample_id": hit.payload.get("sample_id").cloned().unwrap_or_default(),
                    "adapter_version": hit.payload.get("adapter_version").cloned().unwrap_or_default(),
                    "score": hit.score,
                    "kind": hit.payload.get("kind").cloned().unwrap_or_default(),
                    "caption": hit.payload.get("caption").cloned(),
                    "captions": hit.payload.get("captions").cloned().unwrap_or_default(),
                    "source": hit.payload.get("source").cloned().unwrap_or_default(),
                    "split": hit.payload.get("split").cloned().unwrap_or_default(),
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

fn decode_b64(text: &str, field: &str) -> Result<Vec<u8>, ApiError> {
    base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| ApiError::bad_request(format!("{field} is not valid base64: {e}")))
}

/// A text query is compared with image vectors, an image query with caption vectors.
fn encode<B: ModelBackend>(
    shared: &Api<B>,
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
            // The limits ingestion applies: what could be stored can be searched with.
            let pixels = load_image(
                &bytes,
                "image_b64",
                &shared.config.image_limits(),
                embedder.image_size(),
            )
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
            drop(bytes);
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

async fn embed<B: ModelBackend>(
    State(shared): State<AppState<B>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<serde_json::Value>, ApiError>
where
    B::Device: Send + Sync,
{
    let (permit, request): (_, EmbedRequest) = admitted(&shared, &headers, body).await?;
    if request.texts.is_empty() && request.images_b64.is_empty() {
        return Err(ApiError::bad_request("give `texts` and/or `images_b64`"));
    }
    if let Some(index) = request.texts.iter().position(|t| t.trim().is_empty()) {
        return Err(ApiError::bad_request(format!("texts[{index}] is empty")));
    }
    let texts = request.texts;
    let images_b64 = request.images_b64;
    let response = tokio::task::spawn_blocking(move || -> Result<serde_json::Value, ApiError> {
        let _permit = permit;
        let live = shared.live.load_full();
        let limits = shared.config.image_limits();
        // One image decoded at a time: a request holds at most one decoded image.
        let mut image_vectors = Vec::with_capacity(images_b64.len());
        for (index, text) in images_b64.iter().enumerate() {
            let name = format!("images_b64[{index}]");
            let bytes = decode_b64(text, &name)?;
            let pixels = load_image(&bytes, &name, &limits, live.embedder.image_size())
                .map_err(|e| ApiError::bad_request(e.to_string()))?;
            image_vectors.push(pixels);
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

/// Versions listed by `/v1/status` (the newest; every one is in the ledger).
const STATUS_VERSIONS: usize = 50;

async fn status<B: ModelBackend>(
    State(shared): State<AppState<B>>,
) -> Result<Json<serde_json::Value>, ApiError>
where
    B::Device: Send + Sync,
{
    // Counters and single rows only: the cost does not grow with the corpus.
    let response = tokio::task::spawn_blocking(move || -> Result<serde_json::Value, ApiError> {
        let live = shared.live.load_full();
        let ledger = shared
            .primary()
            .store
            .daemon_ledger()
            .map_err(ApiError::internal)?
            .ok_or_else(|| ApiError::busy("starting"))?;
        let stats = shared.primary().store.stats().map_err(ApiError::internal)?;
        // The index may be away (a server restarting): the status still answers.
        let index_versions = shared.index.versions().ok();
        let backlog = stats.last_seq.saturating_sub(ledger.live.embed_cursor);
        let last_run = shared
            .primary()
            .store
            .recent_runs(1)
            .map_err(ApiError::internal)?
            .into_iter()
            .next();
        let versions: serde_json::Map<String, serde_json::Value> = shared
            .primary()
            .store
            .recent_versions(STATUS_VERSIONS)
            .map_err(ApiError::internal)?
            .into_iter()
            .map(|(v, record)| (v.to_string(), json!(record)))
            .collect();
        Ok(json!({
            "adapter_version": live.version,
            "adapter_id": live.adapter_id,
            "adapter_metrics": live.metrics,
            "index_versions": index_versions,
            "index_live": shared.index.live().ok().flatten(),
            "index_points": shared.index.count(live.version).ok(),
            "samples": stats,
            "backlog": backlog,
            "training": shared.primary().training.load(Ordering::SeqCst),
            "promotion": ledger.promotion,
            "kept_versions": ledger.live.kept_versions(shared.config.index.keep_versions),
            "live": ledger.live,
            "best_version": ledger.training.best,
            "gate_slice": ledger.slice.map(|s| json!({"number": s.number, "id": s.id, "samples": s.samples.len()})),
            "last_run": last_run,
            "versions": versions,
        }))
    })
    .await
    .map_err(ApiError::internal)??;
    Ok(Json(response))
}

/// A query replica's status: the version it serves and the index's live pointer.
async fn replica_status<B: ModelBackend>(
    State(shared): State<AppState<B>>,
) -> Result<Json<serde_json::Value>, ApiError>
where
    B::Device: Send + Sync,
{
    let response = tokio::task::spawn_blocking(move || {
        let live = shared.live.load_full();
        json!({
            "role": "replica",
            "adapter_version": live.version,
            "adapter_id": live.adapter_id,
            "index_live": shared.index.live().ok().flatten(),
        })
    })
    .await
    .map_err(ApiError::internal)?;
    Ok(Json(response))
}

/// `/v1/train` takes no parameters: an empty body or `{}`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TrainRequest {}

async fn train<B: ModelBackend>(
    State(shared): State<AppState<B>>,
    _: JsonBody<TrainRequest>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    shared
        .primary()
        .versions
        .request_training()
        .await
        .map_err(ApiError::from_versions)?;
    Ok((StatusCode::ACCEPTED, Json(json!({"requested": true}))))
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RollbackRequest {
    #[serde(default)]
    to: Option<u64>,
}

async fn rollback<B: ModelBackend>(
    State(shared): State<AppState<B>>,
    JsonBody(request): JsonBody<RollbackRequest>,
) -> Result<Json<serde_json::Value>, ApiError>
where
    B::Device: Send + Sync,
{
    let to = request.and_then(|r| r.to);
    let version = shared
        .primary()
        .versions
        .rollback(to)
        .await
        .map_err(ApiError::from_versions)?;
    Ok(Json(json!({"adapter_version": version})))
}

async fn quarantine_list<B: ModelBackend>(
    State(shared): State<AppState<B>>,
) -> Result<Json<serde_json::Value>, ApiError>
where
    B::Device: Send + Sync,
{
    let records = tokio::task::spawn_blocking(move || shared.primary().store.quarantined())
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)?;
    Ok(Json(json!({"quarantined": records})))
}

/// `{"ids": ["<sample id>", ...]}` or `{"all": true}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseRequest {
    #[serde(default)]
    pub ids: Vec<String>,
    #[serde(default)]
    pub all: bool,
}

async fn quarantine_release<B: ModelBackend>(
    State(shared): State<AppState<B>>,
    JsonBody(request): JsonBody<ReleaseRequest>,
) -> Result<Json<serde_json::Value>, ApiError>
where
    B::Device: Send + Sync,
{
    let request = required(request)?;
    let ids = match (request.all, request.ids.is_empty()) {
        (true, true) => None,
        (false, false) => Some(
            request
                .ids
                .iter()
                .map(|hex| {
                    SampleId::parse(hex).ok_or_else(|| {
                        ApiError::bad_request(format!("`{hex}` is not a sample id (64 hex digits)"))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
        _ => {
            return Err(ApiError::bad_request(
                "give either `ids` (sample ids) or `all: true`",
            ));
        }
    };
    let released = tokio::task::spawn_blocking(move || {
        let released = shared.primary().store.release(ids.as_deref())?;
        crate::stored::report_quarantine(&shared.primary().store);
        Ok::<_, crate::store::StoreError>(released)
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(ApiError::internal)?;
    tracing::info!(
        released = released.len(),
        "quarantine released: samples are embedded again"
    );
    Ok(Json(json!({"released": released})))
}

async fn readyz<B: ModelBackend>(State(shared): State<AppState<B>>) -> Response {
    if shared.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready").into_response()
    } else {
        ApiError::busy("starting").into_response()
    }
}

async fn metrics<B: ModelBackend>(State(shared): State<AppState<B>>) -> Response {
    match &shared.metrics {
        Some(handle) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        None => {
            ApiError::new(StatusCode::NOT_FOUND, "metrics recorder not installed").into_response()
        }
    }
}
