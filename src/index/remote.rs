//! Remote index: a Qdrant server or cluster through `qdrant-client` (gRPC). Each version is a
//! collection `NAME_vN`; the alias `NAME` names the live one and is re-pointed with a single
//! `create_alias` call (the server replaces an existing alias atomically), so a client that
//! searches `NAME` sees one version or the next, never a mix.
//!
//! The collection contract (docs/qdrant.md): named vectors `image` and `text` (cosine), the
//! payload of [`super::sample_points`], keyword/integer indexes on the fields people filter
//! on ([`super::INDEXED_FIELDS`] and `index.indexed_metadata`), and the backbone fingerprint,
//! adapter BLAKE3 and version in the collection's metadata. Upserts are split to at most
//! `index.upsert_points` per request and acknowledged only when durable (`wait`, with the
//! configured write ordering); a server away or too slow is [`IndexError::Unavailable`].

use std::time::Duration;

use qdrant_client::qdrant::{
    Condition, CountPointsBuilder, CreateAliasBuilder, CreateCollectionBuilder,
    CreateFieldIndexCollectionBuilder, Distance, FieldType, Filter, NamedVectors, PointStruct,
    QueryPointsBuilder, UpsertPointsBuilder, VectorParamsBuilder, VectorsConfigBuilder,
    WriteOrdering, WriteOrderingType,
};
use qdrant_client::{Payload, Qdrant, QdrantError};

use super::{
    Hit, IMAGE_VECTOR, INDEXED_FIELDS, IndexError, IndexPoint, MatchValue, PayloadFilter,
    TEXT_VECTOR, VectorIndex, VersionInfo, match_conditions, uuid_string,
};
use crate::config::IndexSection;

/// Collection metadata keys of a version.
const META_BASE_MODEL: &str = "rsitrd_base_model";
const META_ADAPTER_ID: &str = "rsitrd_adapter_id";
const META_ADAPTER_VERSION: &str = "rsitrd_adapter_version";

/// A client error as an index error: connection failures, timeouts, overload and a server
/// shutting down are [`IndexError::Unavailable`] (retried; searches answer 503).
fn remote_error(what: impl Into<String>, error: QdrantError) -> IndexError {
    let what = what.into();
    let unavailable = match &error {
        QdrantError::ResponseError { status } => {
            // gRPC codes: CANCELLED 1, DEADLINE_EXCEEDED 4, PERMISSION_DENIED 7,
            // RESOURCE_EXHAUSTED 8, UNAVAILABLE 14, UNAUTHENTICATED 16 (a wrong API key is
            // an operator's fix away: retried, and reported, like a server away).
            matches!(status.code() as i32, 1 | 4 | 7 | 8 | 14 | 16)
                // The client reports a refused connection as INTERNAL (13) "Failed to
                // connect to …".
                || (status.code() as i32 == 13 && status.message().starts_with("Failed to connect"))
        }
        QdrantError::ResourceExhaustedError { .. } => true,
        _ => false,
    };
    if unavailable {
        IndexError::Unavailable(format!("{what}: {error}"))
    } else {
        super::backend_error(what, error)
    }
}

/// A Qdrant server behind an alias.
pub struct RemoteIndex {
    client: Qdrant,
    alias: String,
    config: IndexSection,
    /// Runs the client's futures: callers are blocking threads.
    /// `Some` until dropped (see the `Drop` impl).
    runtime: Option<tokio::runtime::Runtime>,
}

impl RemoteIndex {
    pub fn connect(config: &IndexSection) -> Result<Self, IndexError> {
        let api_key = match &config.api_key_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|error| IndexError::Io {
                        path: path.clone(),
                        error,
                    })?
                    .trim()
                    .to_string(),
            ),
            None => std::env::var(&config.api_key_env)
                .ok()
                .filter(|k| !k.is_empty()),
        };
        let client = Qdrant::from_url(&config.url)
            .api_key(api_key)
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(Duration::from_secs(5)))
            .skip_compatibility_check()
            .build()
            .map_err(|e| remote_error(format!("connect {}", config.url), e))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| super::backend_error("runtime", e))?;
        Ok(Self {
            client,
            alias: config.collection.clone(),
            config: config.clone(),
            runtime: Some(runtime),
        })
    }

    fn collection(&self, version: u64) -> String {
        format!("{}_v{version}", self.alias)
    }

    fn ordering(&self) -> WriteOrdering {
        let kind = match self.config.write_ordering.as_str() {
            "weak" => WriteOrderingType::Weak,
            "strong" => WriteOrderingType::Strong,
            _ => WriteOrderingType::Medium,
        };
        WriteOrdering {
            r#type: kind as i32,
        }
    }

    /// Runs a client future from a blocking thread (its own runtime, so it also works inside
    /// another runtime's blocking pool).
    fn run<T>(&self, future: impl Future<Output = T> + Send) -> T
    where
        T: Send,
    {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    self.runtime
                        .as_ref()
                        .expect("runtime present until drop")
                        .block_on(future)
                })
                .join()
                .expect("qdrant client thread")
        })
    }
}

impl Drop for RemoteIndex {
    /// The daemon drops its index inside its async runtime, where dropping another runtime
    /// (which blocks on its workers) panics: shut the client's down without waiting.
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl VectorIndex for RemoteIndex {
    fn ensure_version(
        &self,
        version: u64,
        dim: usize,
        info: &VersionInfo,
    ) -> Result<(), IndexError> {
        let name = self.collection(version);
        self.run(async {
            let exists = self
                .client
                .collection_exists(&name)
                .await
                .map_err(|e| remote_error("exists", e))?;
            if !exists {
                let mut vectors = VectorsConfigBuilder::default();
                vectors
                    .add_named_vector_params(
                        IMAGE_VECTOR,
                        VectorParamsBuilder::new(dim as u64, Distance::Cosine),
                    )
                    .add_named_vector_params(
                        TEXT_VECTOR,
                        VectorParamsBuilder::new(dim as u64, Distance::Cosine),
                    );
                let metadata: std::collections::HashMap<String, serde_json::Value> = [
                    (META_BASE_MODEL.to_string(), info.base_model.clone().into()),
                    (META_ADAPTER_ID.to_string(), info.adapter_id.clone().into()),
                    (META_ADAPTER_VERSION.to_string(), version.into()),
                ]
                .into_iter()
                .collect();
                let mut create = CreateCollectionBuilder::new(&name)
                    .vectors_config(vectors)
                    .metadata(metadata);
                if let Some(shards) = self.config.shard_number {
                    create = create.shard_number(shards);
                }
                if let Some(replicas) = self.config.replication_factor {
                    create = create.replication_factor(replicas);
                }
                if let Some(factor) = self.config.write_consistency_factor {
                    create = create.write_consistency_factor(factor);
                }
                self.client
                    .create_collection(create)
                    .await
                    .map_err(|e| remote_error(format!("create {name}"), e))?;
            }
            // Indexes are created (idempotently) every time, so a crash between the
            // collection and its indexes is repaired.
            let metadata_fields: Vec<(String, bool)> = self
                .config
                .indexed_metadata
                .iter()
                .map(|key| (format!("metadata.{key}"), false))
                .collect();
            let fields = INDEXED_FIELDS
                .iter()
                .map(|(field, integer)| (field.to_string(), *integer))
                .chain(metadata_fields);
            for (field, integer) in fields {
                let kind = if integer {
                    FieldType::Integer
                } else {
                    FieldType::Keyword
                };
                self.client
                    .create_field_index(
                        CreateFieldIndexCollectionBuilder::new(&name, &field, kind).wait(true),
                    )
                    .await
                    .map_err(|e| remote_error(format!("index {name}.{field}"), e))?;
            }
            Ok(())
        })
    }

    fn version_info(&self, version: u64) -> Result<Option<VersionInfo>, IndexError> {
        let name = self.collection(version);
        self.run(async {
            if !self
                .client
                .collection_exists(&name)
                .await
                .map_err(|e| remote_error("exists", e))?
            {
                return Ok(None);
            }
            let info = self
                .client
                .collection_info(&name)
                .await
                .map_err(|e| remote_error(format!("info {name}"), e))?;
            let metadata = info
                .result
                .and_then(|r| r.config)
                .map(|c| c.metadata)
                .unwrap_or_default();
            let text = |key: &str| -> Option<String> {
                let value: serde_json::Value = metadata.get(key)?.clone().into();
                value.as_str().map(str::to_string)
            };
            Ok(match (text(META_BASE_MODEL), text(META_ADAPTER_ID)) {
                (Some(base_model), Some(adapter_id)) => Some(VersionInfo {
                    base_model,
                    adapter_id,
                }),
                _ => None,
            })
        })
    }

    fn upsert(&self, version: u64, points: Vec<IndexPoint>) -> Result<(), IndexError> {
        if points.is_empty() {
            return Ok(());
        }
        let name = self.collection(version);
        let points: Vec<PointStruct> = points
            .into_iter()
            .map(|p| {
                PointStruct::new(
                    uuid_string(&p.id),
                    NamedVectors::default().add_vector(p.vector_name, p.vector),
                    Payload::from(p.payload),
                )
            })
            .collect();
        // Requests stay under the server's size limits; each is durable before the next.
        let mut points = points;
        self.run(async {
            while !points.is_empty() {
                let rest = points.split_off(points.len().min(self.config.upsert_points));
                let chunk = std::mem::replace(&mut points, rest);
                self.client
                    .upsert_points(
                        UpsertPointsBuilder::new(&name, chunk)
                            .wait(true)
                            .ordering(self.ordering()),
                    )
                    .await
                    .map_err(|e| remote_error(format!("upsert {name}"), e))?;
            }
            Ok(())
        })
    }

    fn search(
        &self,
        version: u64,
        vector_name: &str,
        query: Vec<f32>,
        k: usize,
        filter: &PayloadFilter,
    ) -> Result<Vec<Hit>, IndexError> {
        let name = self.collection(version);
        let mut request = QueryPointsBuilder::new(&name)
            .query(query)
            .using(vector_name)
            .limit(k as u64)
            .with_payload(true);
        if !filter.is_empty() {
            let conditions: Vec<Condition> = match_conditions(filter)?
                .into_iter()
                .map(|(key, value)| match value {
                    MatchValue::Text(s) => Condition::matches(key, s),
                    MatchValue::Bool(b) => Condition::matches(key, b),
                    MatchValue::Integer(i) => Condition::matches(key, i),
                })
                .collect();
            request = request.filter(Filter::must(conditions));
        }
        let response = self.run(async {
            self.client
                .query(request)
                .await
                .map_err(|e| remote_error(format!("search {name}"), e))
        })?;
        Ok(response
            .result
            .into_iter()
            .map(|point| Hit {
                score: point.score,
                payload: Payload::from(point.payload).into(),
            })
            .collect())
    }

    fn count(&self, version: u64) -> Result<usize, IndexError> {
        let name = self.collection(version);
        self.run(async {
            let response = self
                .client
                .count(CountPointsBuilder::new(&name).exact(true))
                .await
                .map_err(|e| remote_error(format!("count {name}"), e))?;
            Ok(response.result.map_or(0, |r| r.count as usize))
        })
    }

    fn versions(&self) -> Result<Vec<u64>, IndexError> {
        let prefix = format!("{}_v", self.alias);
        self.run(async {
            let response = self
                .client
                .list_collections()
                .await
                .map_err(|e| remote_error("list collections", e))?;
            let mut versions: Vec<u64> = response
                .collections
                .into_iter()
                .filter_map(|c| c.name.strip_prefix(&prefix).and_then(|v| v.parse().ok()))
                .collect();
            versions.sort_unstable();
            Ok(versions)
        })
    }

    fn drop_version(&self, version: u64) -> Result<(), IndexError> {
        let name = self.collection(version);
        self.run(async {
            self.client
                .delete_collection(&name)
                .await
                .map_err(|e| remote_error(format!("delete {name}"), e))?;
            Ok(())
        })
    }

    fn set_live(&self, version: u64) -> Result<(), IndexError> {
        let name = self.collection(version);
        self.run(async {
            self.client
                .create_alias(CreateAliasBuilder::new(&name, &self.alias))
                .await
                .map_err(|e| remote_error(format!("alias {} -> {name}", self.alias), e))?;
            Ok(())
        })
    }

    fn live(&self) -> Result<Option<u64>, IndexError> {
        let prefix = format!("{}_v", self.alias);
        self.run(async {
            let response = self
                .client
                .list_aliases()
                .await
                .map_err(|e| remote_error("list aliases", e))?;
            Ok(response
                .aliases
                .into_iter()
                .find(|a| a.alias_name == self.alias)
                .and_then(|a| {
                    a.collection_name
                        .strip_prefix(&prefix)
                        .and_then(|v| v.parse().ok())
                }))
        })
    }
}
