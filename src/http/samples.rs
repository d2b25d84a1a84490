//! Samples over HTTP, for people and the web pages: a sample's record and its image, as a
//! JPEG thumbnail made on demand or as the original bytes.
//!
//! Ids are content hashes, so an image never changes under its id: thumbnails are cached in
//! memory (bounded by bytes, least recently used out first) and answered as immutable.
//! Making one decodes the stored image within the ingestion limits (a blob written by an
//! older version with other limits is refused, not decoded), and at most
//! `http.max_concurrent_thumbnails` are made at once.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::{ApiError, AppState};
use crate::model::kernels::ModelBackend;
use crate::model::preprocess::{ImageLimits, decode_image};
use crate::store::{SampleId, SampleRecord, StoreError};

/// Largest thumbnail side.
pub const MAX_THUMBNAIL: u32 = 1024;
/// Thumbnail side when none is asked for.
const DEFAULT_THUMBNAIL: u32 = 256;
/// How long a thumbnail request waits for its turn before it is answered 503.
const THUMBNAIL_WAIT: Duration = Duration::from_secs(5);
/// JPEG quality of thumbnails.
const THUMBNAIL_QUALITY: u8 = 85;
/// Content-addressed: the bytes behind an id never change.
const IMMUTABLE: &str = "private, max-age=31536000, immutable";

/// Thumbnails made and cached by the primary.
pub struct Thumbnails {
    permits: std::sync::Arc<tokio::sync::Semaphore>,
    cache: Mutex<Lru>,
    capacity: usize,
}

impl Thumbnails {
    pub fn new(concurrent: usize, capacity: usize) -> Self {
        Self {
            permits: std::sync::Arc::new(tokio::sync::Semaphore::new(concurrent)),
            cache: Mutex::new(Lru::default()),
            capacity,
        }
    }

    fn get(&self, key: &(SampleId, u32)) -> Option<Bytes> {
        self.cache.lock().expect("cache lock").get(key)
    }

    fn put(&self, key: (SampleId, u32), bytes: Bytes) {
        // One entry may not crowd out the rest.
        if bytes.len() <= self.capacity / 4 {
            self.cache
                .lock()
                .expect("cache lock")
                .put(key, bytes, self.capacity);
        }
    }
}

/// A least-recently-used map bounded by the bytes of its values.
#[derive(Default)]
struct Lru {
    entries: HashMap<(SampleId, u32), (Bytes, u64)>,
    order: BTreeMap<u64, (SampleId, u32)>,
    tick: u64,
    bytes: usize,
}

impl Lru {
    fn get(&mut self, key: &(SampleId, u32)) -> Option<Bytes> {
        self.tick += 1;
        let tick = self.tick;
        let (bytes, used) = self.entries.get_mut(key)?;
        self.order.remove(used);
        *used = tick;
        self.order.insert(tick, *key);
        Some(bytes.clone())
    }

    fn put(&mut self, key: (SampleId, u32), bytes: Bytes, capacity: usize) {
        self.tick += 1;
        if let Some((old, used)) = self.entries.remove(&key) {
            self.order.remove(&used);
            self.bytes -= old.len();
        }
        self.bytes += bytes.len();
        self.entries.insert(key, (bytes, self.tick));
        self.order.insert(self.tick, key);
        while self.bytes > capacity {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            if let Some((gone, _)) = self.entries.remove(&oldest) {
                self.bytes -= gone.len();
            }
        }
    }
}

/// An id from the path: 64 hex digits, anything else refused before any lookup.
fn parse_id(text: &str) -> Result<SampleId, ApiError> {
    SampleId::parse(text).ok_or_else(|| {
        ApiError::bad_request("a sample id is 64 hexadecimal digits (the BLAKE3 of its image)")
    })
}

fn not_found(id: &SampleId) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, format!("no sample {id}"))
}

fn store_error(error: StoreError) -> ApiError {
    ApiError::internal(error)
}

/// `GET /v1/samples/{id}`: the stored record, and whether it is quarantined.
pub(super) async fn record<B: ModelBackend>(
    State(shared): State<AppState<B>>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError>
where
    B::Device: Send + Sync,
{
    let id = parse_id(&id)?;
    tokio::task::spawn_blocking(move || {
        let store = &shared.primary().store;
        let record = store.get(&id).map_err(store_error)?;
        let record = record.ok_or_else(|| not_found(&id))?;
        let quarantined = store.is_quarantined(&id).map_err(store_error)?;
        let mut value = json!(record);
        value["quarantined"] = json!(quarantined);
        Ok(Json(value))
    })
    .await
    .map_err(ApiError::internal)?
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ImageQuery {
    /// Longest side of the thumbnail; 0 = the original bytes.
    #[serde(default)]
    size: Option<u32>,
}

/// `GET /v1/samples/{id}/image?size=N`: a JPEG whose longest side is at most N (never
/// enlarged), or the stored bytes with `size=0`.
pub(super) async fn image<B: ModelBackend>(
    State(shared): State<AppState<B>>,
    Path(id): Path<String>,
    Query(query): Query<ImageQuery>,
) -> Result<Response, ApiError>
where
    B::Device: Send + Sync,
{
    let id = parse_id(&id)?;
    let size = query.size.unwrap_or(DEFAULT_THUMBNAIL);
    if size > MAX_THUMBNAIL {
        return Err(ApiError::bad_request(format!(
            "size must be between 0 (the original) and {MAX_THUMBNAIL}"
        )));
    }
    let thumbnails = &shared.primary().thumbnails;
    if size > 0
        && let Some(bytes) = thumbnails.get(&(id, size))
    {
        return Ok(jpeg(bytes));
    }
    // Waiting holds no body and no decoded pixels; the wait itself is bounded.
    let permits = thumbnails.permits.clone();
    let permit = tokio::time::timeout(THUMBNAIL_WAIT, permits.acquire_owned())
        .await
        .map_err(|_| {
            metrics::counter!("rsitrd_http_busy_total").increment(1);
            ApiError::busy("thumbnails are being made (http.max_concurrent_thumbnails)")
        })?
        .map_err(ApiError::internal)?;
    let shared2 = shared.clone();
    let (record, bytes) = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let primary = shared2.primary();
        let record = primary.store.get(&id).map_err(store_error)?;
        let record = record.ok_or_else(|| not_found(&id))?;
        let bytes = read_blob(&shared2, &record)?;
        if size == 0 {
            return Ok((record, Bytes::from(bytes)));
        }
        let limits = shared2.config.image_limits();
        let thumbnail = thumbnail(&bytes, &id.to_hex(), &limits, size)?;
        primary.thumbnails.put((id, size), thumbnail.clone());
        Ok::<_, ApiError>((record, thumbnail))
    })
    .await
    .map_err(ApiError::internal)??;
    if size > 0 {
        return Ok(jpeg(bytes));
    }
    let content_type = match record.format.as_str() {
        "png" => "image/png",
        "tiff" => "image/tiff",
        _ => "image/jpeg",
    };
    Ok((
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, IMMUTABLE),
        ],
        bytes,
    )
        .into_response())
}

fn jpeg(bytes: Bytes) -> Response {
    (
        [
            (header::CONTENT_TYPE, "image/jpeg"),
            (header::CACHE_CONTROL, IMMUTABLE),
        ],
        bytes,
    )
        .into_response()
}

/// The stored bytes, no larger than ingestion accepts today (the file's size is checked
/// before it is read: the record's claim is not trusted).
fn read_blob<B: ModelBackend>(
    shared: &super::Api<B>,
    record: &SampleRecord,
) -> Result<Vec<u8>, ApiError> {
    let path = shared.primary().store.blob_path(&record.id);
    let max = shared.config.ingest.max_image_bytes;
    let unreadable = |reason: String| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("the image of {} cannot be served: {reason}", record.id),
        )
    };
    let file = std::fs::File::open(&path).map_err(|e| unreadable(e.to_string()))?;
    let len = file
        .metadata()
        .map_err(|e| unreadable(e.to_string()))?
        .len();
    if len > max {
        return Err(unreadable(format!(
            "{len} bytes is over ingest.max_image_bytes ({max})"
        )));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    std::io::Read::read_to_end(&mut std::io::Read::take(file, max + 1), &mut bytes)
        .map_err(|e| unreadable(e.to_string()))?;
    if bytes.len() as u64 > max {
        return Err(unreadable("the file grew while it was read".into()));
    }
    Ok(bytes)
}

/// A JPEG whose longest side is at most `size`, decoded within `limits`.
pub fn thumbnail(
    bytes: &[u8],
    name: &str,
    limits: &ImageLimits,
    size: u32,
) -> Result<Bytes, ApiError> {
    let unusable = |reason: String| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("the image cannot be served: {reason}"),
        )
    };
    let image = decode_image(bytes, name, limits).map_err(|e| unusable(e.to_string()))?;
    let (width, height) = image.dimensions();
    let longest = width.max(height);
    let image = if longest > size {
        // The limits bound the aspect ratio, so the short side stays at least one pixel.
        let scale = |side: u32| ((u64::from(side) * u64::from(size)) / u64::from(longest)).max(1);
        image::imageops::thumbnail(&image, scale(width) as u32, scale(height) as u32)
    } else {
        image
    };
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, THUMBNAIL_QUALITY)
        .encode_image(&image)
        .map_err(|e| ApiError::internal(format!("thumbnail encoding: {e}")))?;
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> (SampleId, u32) {
        (SampleId([n; 32]), 256)
    }

    #[test]
    fn lru_stays_within_its_bytes_and_evicts_the_least_recent() {
        let mut lru = Lru::default();
        lru.put(key(1), Bytes::from(vec![0; 40]), 100);
        lru.put(key(2), Bytes::from(vec![0; 40]), 100);
        assert!(lru.get(&key(1)).is_some(), "1 is now the most recent");
        lru.put(key(3), Bytes::from(vec![0; 40]), 100);
        assert_eq!(lru.bytes, 80);
        assert!(lru.get(&key(2)).is_none(), "2 was least recently used");
        assert!(lru.get(&key(1)).is_some());
        assert!(lru.get(&key(3)).is_some());
        // Replacing a key does not count it twice.
        lru.put(key(3), Bytes::from(vec![0; 10]), 100);
        assert_eq!(lru.bytes, 50);
        assert_eq!(lru.entries.len(), lru.order.len());
    }

    #[test]
    fn thumbnails_keep_the_aspect_ratio_and_never_enlarge() {
        let image = image::RgbImage::from_fn(300, 100, |x, _| image::Rgb([x as u8, 0, 0]));
        let mut png = Vec::new();
        image::DynamicImage::ImageRgb8(image)
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let limits = ImageLimits::new(1 << 20, 10);
        let small = thumbnail(&png, "t", &limits, 60).ok().unwrap();
        let decoded = image::load_from_memory(&small).unwrap();
        assert_eq!((decoded.width(), decoded.height()), (60, 20));
        let same = thumbnail(&png, "t", &limits, 1000).ok().unwrap();
        let decoded = image::load_from_memory(&same).unwrap();
        assert_eq!((decoded.width(), decoded.height()), (300, 100));
        // Beyond the limits: refused, not decoded.
        let tight = ImageLimits::new(1000, 10);
        assert!(thumbnail(&png, "t", &tight, 60).is_err());
    }
}
