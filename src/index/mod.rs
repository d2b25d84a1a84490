//! The vector index: one *version* per adapter version, holding an image point per sample
//! (named vector `image`) and a caption point per caption (named vector `text`), with payload
//! (sample id, captions, metadata, adapter version). Two implementations of [`VectorIndex`]:
//! [`edge::EdgeIndex`] (qdrant-edge, in-process, the default) and [`remote::RemoteIndex`]
//! (qdrant-client, a Qdrant server or cluster). The logic shared by both lives here.
//!
//! Calls block: run them on blocking threads. Searches always name their version, so a query
//! never mixes adapter versions; the *live* pointer (embedded: an atomically replaced file;
//! remote: an alias) tells restarts and outside clients which version serves.

use serde::Serialize;

use crate::store::{SampleId, SampleRecord};

pub mod edge;
pub mod remote;

/// Named vector of image points.
pub const IMAGE_VECTOR: &str = "image";
/// Named vector of caption points.
pub const TEXT_VECTOR: &str = "text";

/// Why the index failed.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("index {what}: {reason}")]
    Backend { what: String, reason: String },
    /// The query's payload filter cannot be matched (the caller's mistake, not the index's).
    #[error("invalid filter: {0}")]
    InvalidFilter(String),
    #[error("index version v{0} does not exist")]
    MissingVersion(u64),
    /// The server is away, too slow or refuses for now (connection, timeout, overload):
    /// searches answer 503, background work backs off and retries.
    #[error("index unavailable: {0}")]
    Unavailable(String),
    #[error("index i/o on {path}: {error}")]
    Io {
        path: std::path::PathBuf,
        error: std::io::Error,
    },
}

pub(crate) fn backend_error(what: impl Into<String>, reason: impl std::fmt::Display) -> IndexError {
    IndexError::Backend {
        what: what.into(),
        reason: reason.to_string(),
    }
}

/// What a version's vectors were made with, recorded with the version (a Qdrant server keeps
/// it in the collection's metadata) so that a client can check which encoder it must use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct VersionInfo {
    /// Fingerprint (BLAKE3) of the frozen backbone.
    pub base_model: String,
    /// BLAKE3 of the adapter checkpoint (`untrained` for plain CLIP).
    pub adapter_id: String,
}

/// Payload fields with an index in every version (keyword unless noted), the ones people
/// filter on; `metadata.KEY` for each of `index.indexed_metadata` is added.
pub const INDEXED_FIELDS: &[(&str, bool)] = &[
    ("sample_id", false),
    ("kind", false),
    ("split", false),
    ("source", false),
    ("adapter_version", true),
    ("arrived_ms", true),
];

/// A point: id derived from the sample (idempotent upserts), one named vector, payload.
#[derive(Debug, Clone)]
pub struct IndexPoint {
    /// UUID bytes (see [`image_point_id`], [`caption_point_id`]).
    pub id: [u8; 16],
    /// [`IMAGE_VECTOR`] or [`TEXT_VECTOR`].
    pub vector_name: &'static str,
    pub vector: Vec<f32>,
    pub payload: serde_json::Map<String, serde_json::Value>,
}

/// One search result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Hit {
    pub score: f32,
    pub payload: serde_json::Map<String, serde_json::Value>,
}

/// Exact-match conditions on payload fields (all must hold), e.g. `{"split": "val"}` or
/// `{"metadata.sensor": "wv3"}`.
pub type PayloadFilter = Vec<(String, serde_json::Value)>;

/// A value a payload field is matched against.
#[derive(Debug, Clone, PartialEq)]
pub enum MatchValue {
    Text(String),
    Integer(i64),
    Bool(bool),
}

/// The filter's conditions as matchable values; other JSON values are refused by name.
pub fn match_conditions(filter: &PayloadFilter) -> Result<Vec<(String, MatchValue)>, IndexError> {
    filter
        .iter()
        .map(|(key, value)| {
            let value = match value {
                serde_json::Value::String(s) => MatchValue::Text(s.clone()),
                serde_json::Value::Bool(b) => MatchValue::Bool(*b),
                serde_json::Value::Number(n) if n.is_i64() => {
                    MatchValue::Integer(n.as_i64().expect("i64"))
                }
                other => {
                    return Err(IndexError::InvalidFilter(format!(
                        "`{key}`: only strings, integers and booleans can be matched, not {other}"
                    )));
                }
            };
            Ok((key.clone(), value))
        })
        .collect()
}

fn uuid_bytes(parts: &[&[u8]]) -> [u8; 16] {
    let mut hasher = blake3::Hasher::new();
    for part in parts {
        hasher.update(&(part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&hasher.finalize().as_bytes()[..16]);
    // RFC 4122 version 8 (custom) and variant bits, so servers accept it as a UUID.
    bytes[6] = (bytes[6] & 0x0f) | 0x80;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    bytes
}

/// Point id of a sample's image.
pub fn image_point_id(sample: &SampleId) -> [u8; 16] {
    uuid_bytes(&[b"image", &sample.0])
}

/// Point id of one caption of a sample (by its text: re-delivered captions map to the same
/// point).
pub fn caption_point_id(sample: &SampleId, caption: &str) -> [u8; 16] {
    uuid_bytes(&[b"caption", &sample.0, caption.as_bytes()])
}

/// `8-4-4-4-12` hex form.
pub fn uuid_string(bytes: &[u8; 16]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// The points of one sample embedded with adapter `version`: its image and each caption.
pub fn sample_points(
    record: &SampleRecord,
    version: u64,
    image: Vec<f32>,
    captions: Vec<Vec<f32>>,
) -> Vec<IndexPoint> {
    let base = |kind: &str| {
        let mut payload = serde_json::Map::new();
        payload.insert("sample_id".into(), record.id.to_hex().into());
        payload.insert("kind".into(), kind.into());
        payload.insert("adapter_version".into(), version.into());
        payload.insert("split".into(), record.split.as_str().into());
        payload.insert("source".into(), record.source.clone().into());
        payload.insert("arrived_ms".into(), record.arrived_ms.into());
        payload.insert("metadata".into(), record.metadata.clone().into());
        payload
    };
    let mut image_payload = base("image");
    image_payload.insert("captions".into(), record.captions.clone().into());
    let mut points = vec![IndexPoint {
        id: image_point_id(&record.id),
        vector_name: IMAGE_VECTOR,
        vector: image,
        payload: image_payload,
    }];
    for (caption, vector) in record.captions.iter().zip(captions) {
        let mut payload = base("caption");
        payload.insert("caption".into(), caption.clone().into());
        payload.insert("captions".into(), vec![caption.clone()].into());
        points.push(IndexPoint {
            id: caption_point_id(&record.id, caption),
            vector_name: TEXT_VECTOR,
            vector,
            payload,
        });
    }
    points
}

/// Opens the configured index (embedded: under `data_dir/index`).
pub fn open(
    config: &crate::config::IndexSection,
    data_dir: &std::path::Path,
) -> Result<std::sync::Arc<dyn VectorIndex>, IndexError> {
    Ok(match config.backend {
        crate::config::IndexBackendKind::Embedded => {
            std::sync::Arc::new(edge::EdgeIndex::open(&data_dir.join("index"))?)
        }
        crate::config::IndexBackendKind::Remote => {
            std::sync::Arc::new(remote::RemoteIndex::connect(config)?)
        }
    })
}

/// A vector index with versions. Implementations are thread-safe; every call blocks.
///
/// The contract both implementations keep (tested for both, `tests/index.rs`,
/// `tests/versions.rs`; the server's with `RSITRD_TEST_QDRANT_URL`):
/// - `upsert` returns only once the points are durable (embedded: flushed; server: `wait`
///   with the configured write ordering), so a cursor recorded after it never skips a point;
///   it is idempotent (point ids derive from samples and captions).
/// - `search` names its version: a query never meets another adapter's vectors, whatever
///   the live pointer says meanwhile.
/// - `set_live` is atomic for anyone resolving the live pointer (embedded: a file replaced
///   by rename; server: an alias re-pointed in one call), and `live` reads it back.
/// - `ensure_version` is idempotent and records what made the version (`version_info`).
/// - A backend that is away, too slow or refusing for now answers
///   [`IndexError::Unavailable`] (retried by background work, 503 to searches); other errors
///   are the caller's or the configuration's.
pub trait VectorIndex: Send + Sync {
    /// Creates version `version` (vectors of `dim`, made as `info` says) if absent.
    fn ensure_version(
        &self,
        version: u64,
        dim: usize,
        info: &VersionInfo,
    ) -> Result<(), IndexError>;
    /// What `version` was made with, as recorded at its creation.
    fn version_info(&self, version: u64) -> Result<Option<VersionInfo>, IndexError>;
    /// Upserts points into `version`; durable when it returns.
    fn upsert(&self, version: u64, points: Vec<IndexPoint>) -> Result<(), IndexError>;
    /// Top `k` points of `vector_name` nearest to `query` in `version`.
    fn search(
        &self,
        version: u64,
        vector_name: &str,
        query: Vec<f32>,
        k: usize,
        filter: &PayloadFilter,
    ) -> Result<Vec<Hit>, IndexError>;
    /// Points in `version`.
    fn count(&self, version: u64) -> Result<usize, IndexError>;
    /// Versions present, ascending.
    fn versions(&self) -> Result<Vec<u64>, IndexError>;
    /// Removes a version and its data.
    fn drop_version(&self, version: u64) -> Result<(), IndexError>;
    /// Points the live pointer (alias) at `version`, atomically.
    fn set_live(&self, version: u64) -> Result<(), IndexError>;
    /// The version the live pointer names, if any.
    fn live(&self) -> Result<Option<u64>, IndexError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn point_ids_are_stable_distinct_uuids() {
        let a = SampleId::of_image(b"a");
        let b = SampleId::of_image(b"b");
        assert_eq!(image_point_id(&a), image_point_id(&a));
        assert_ne!(image_point_id(&a), image_point_id(&b));
        assert_ne!(caption_point_id(&a, "x"), caption_point_id(&a, "y"));
        assert_ne!(caption_point_id(&a, "x"), image_point_id(&a));
        let text = uuid_string(&image_point_id(&a));
        assert_eq!(text.len(), 36);
        assert_eq!(&text[14..15], "8", "version nibble");
    }
}
