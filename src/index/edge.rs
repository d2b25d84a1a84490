//! Embedded index: Qdrant's engine in-process (`qdrant-edge` 0.7.2), one shard directory per
//! version under `DATA_DIR/index/vN`, and the live version in `DATA_DIR/index/LIVE`
//! (replaced atomically: temp, fsync, rename).
//!
//! qdrant-edge 0.7.2 pitfalls handled here: updates reach the disk only with `flush()` (the
//! WAL is not replayed on load), so every upsert batch is flushed before it returns; `flush()`
//! must not run concurrently with `update()`, so writes to a shard are serialized; a shard
//! directory can be open once per process (WAL lock), so shards are cached.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use qdrant_edge::external::uuid::Uuid;
use qdrant_edge::{
    Condition, Distance, EdgeConfigBuilder, EdgeShard, EdgeVectorParamsBuilder, FieldCondition,
    Filter, JsonPath, Match, NamedQuery, PointId, PointInsertOperations, PointOperations,
    PointStruct, QueryEnum, QueryRequest, ScoringQuery, UpdateOperation, ValueVariants,
    VectorInternal, Vectors, WithPayloadInterface, WithVector,
};

use super::{
    Hit, IMAGE_VECTOR, IndexError, IndexPoint, MatchValue, PayloadFilter, TEXT_VECTOR, VectorIndex,
    VersionInfo, backend_error, match_conditions,
};

const LIVE_FILE: &str = "LIVE";
/// Beside each version's shard: what its vectors were made with.
const INFO_FILE: &str = "rsitrd-version.json";

struct Shard {
    shard: Arc<EdgeShard>,
    /// Serializes update + flush (flush panics if it races an update).
    writes: Mutex<()>,
}

/// qdrant-edge shards, one per version.
pub struct EdgeIndex {
    root: PathBuf,
    shards: Mutex<BTreeMap<u64, Arc<Shard>>>,
    /// Versions being dropped: not loaded again while their files go.
    dropping: Mutex<std::collections::BTreeSet<u64>>,
}

fn version_dir(root: &Path, version: u64) -> PathBuf {
    root.join(format!("v{version}"))
}

impl EdgeIndex {
    pub fn open(root: &Path) -> Result<Self, IndexError> {
        std::fs::create_dir_all(root).map_err(|error| IndexError::Io {
            path: root.to_path_buf(),
            error,
        })?;
        Ok(Self {
            root: root.to_path_buf(),
            shards: Mutex::new(BTreeMap::new()),
            dropping: Mutex::new(Default::default()),
        })
    }

    fn shard(&self, version: u64) -> Result<Arc<Shard>, IndexError> {
        let mut shards = self.shards.lock().expect("shard cache lock");
        if let Some(shard) = shards.get(&version) {
            return Ok(shard.clone());
        }
        if self
            .dropping
            .lock()
            .expect("dropping lock")
            .contains(&version)
        {
            return Err(IndexError::MissingVersion(version));
        }
        let dir = version_dir(&self.root, version);
        if !dir.join("edge_config.json").exists() {
            return Err(IndexError::MissingVersion(version));
        }
        let shard = EdgeShard::load(&dir, None)
            .map_err(|e| backend_error(format!("load {}", dir.display()), e))?;
        let shard = Arc::new(Shard {
            shard: Arc::new(shard),
            writes: Mutex::new(()),
        });
        shards.insert(version, shard.clone());
        Ok(shard)
    }
}

fn point_id(bytes: &[u8; 16]) -> PointId {
    PointId::Uuid(Uuid::from_bytes(*bytes))
}

fn condition(key: &str, value: MatchValue) -> Result<Condition, IndexError> {
    let path: JsonPath = key
        .parse()
        .map_err(|()| backend_error("filter", format!("invalid payload key `{key}`")))?;
    let value = match value {
        MatchValue::Text(s) => ValueVariants::String(s),
        MatchValue::Bool(b) => ValueVariants::Bool(b),
        MatchValue::Integer(i) => ValueVariants::Integer(i),
    };
    Ok(Condition::Field(FieldCondition::new_match(
        path,
        Match::new_value(value),
    )))
}

impl VectorIndex for EdgeIndex {
    fn ensure_version(
        &self,
        version: u64,
        dim: usize,
        info: &VersionInfo,
    ) -> Result<(), IndexError> {
        let dir = version_dir(&self.root, version);
        if dir.join("edge_config.json").exists() {
            return Ok(());
        }
        let info_path = self.root.join(format!("v{version}.{INFO_FILE}"));
        crate::durable::write_atomically(
            &info_path,
            &serde_json::to_vec(info).expect("version info serializes"),
        )
        .map_err(|error| IndexError::Io {
            path: info_path.clone(),
            error,
        })?;
        // A directory from a crash before the config was written holds nothing of value.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|error| IndexError::Io {
            path: dir.clone(),
            error,
        })?;
        let config = EdgeConfigBuilder::new()
            .vector(
                IMAGE_VECTOR,
                EdgeVectorParamsBuilder::new(dim, Distance::Cosine).build(),
            )
            .vector(
                TEXT_VECTOR,
                EdgeVectorParamsBuilder::new(dim, Distance::Cosine).build(),
            )
            .build();
        let shard = EdgeShard::new(&dir, config)
            .map_err(|e| backend_error(format!("create {}", dir.display()), e))?;
        shard.flush();
        self.shards.lock().expect("shard cache lock").insert(
            version,
            Arc::new(Shard {
                shard: Arc::new(shard),
                writes: Mutex::new(()),
            }),
        );
        Ok(())
    }

    fn version_info(&self, version: u64) -> Result<Option<VersionInfo>, IndexError> {
        let path = self.root.join(format!("v{version}.{INFO_FILE}"));
        match std::fs::read(&path) {
            Ok(bytes) => Ok(serde_json::from_slice(&bytes).ok()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(IndexError::Io { path, error }),
        }
    }

    fn upsert(&self, version: u64, points: Vec<IndexPoint>) -> Result<(), IndexError> {
        if points.is_empty() {
            return Ok(());
        }
        let shard = self.shard(version)?;
        let points = points
            .into_iter()
            .map(|p| {
                PointStruct::new(
                    point_id(&p.id),
                    Vectors::new_named([(p.vector_name, p.vector)]),
                    serde_json::Value::Object(p.payload),
                )
                .into()
            })
            .collect();
        let _guard = shard.writes.lock().expect("shard write lock");
        shard
            .shard
            .update(UpdateOperation::PointOperation(
                PointOperations::UpsertPoints(PointInsertOperations::PointsList(points)),
            ))
            .map_err(|e| backend_error("upsert", e))?;
        shard.shard.flush();
        Ok(())
    }

    fn search(
        &self,
        version: u64,
        vector_name: &str,
        query: Vec<f32>,
        k: usize,
        filter: &PayloadFilter,
    ) -> Result<Vec<Hit>, IndexError> {
        let shard = self.shard(version)?;
        let filter = if filter.is_empty() {
            None
        } else {
            Some(Filter {
                must: Some(
                    match_conditions(filter)?
                        .into_iter()
                        .map(|(key, value)| condition(&key, value))
                        .collect::<Result<_, _>>()?,
                ),
                ..Default::default()
            })
        };
        let request = QueryRequest {
            prefetches: Vec::new(),
            query: Some(ScoringQuery::Vector(QueryEnum::Nearest(NamedQuery::new(
                VectorInternal::Dense(query),
                vector_name,
            )))),
            filter,
            score_threshold: None,
            limit: k,
            offset: 0,
            params: None,
            with_vector: WithVector::Bool(false),
            with_payload: WithPayloadInterface::Bool(true),
        };
        let points = shard
            .shard
            .query(request)
            .map_err(|e| backend_error("search", e))?;
        Ok(points
            .into_iter()
            .map(|p| Hit {
                score: p.score,
                payload: p.payload.map(|payload| payload.0).unwrap_or_default(),
            })
            .collect())
    }

    fn count(&self, version: u64) -> Result<usize, IndexError> {
        let shard = self.shard(version)?;
        shard
            .shard
            .count(qdrant_edge::CountRequest {
                filter: None,
                exact: true,
            })
            .map_err(|e| backend_error("count", e))
    }

    fn versions(&self) -> Result<Vec<u64>, IndexError> {
        let mut versions = Vec::new();
        let entries = std::fs::read_dir(&self.root).map_err(|error| IndexError::Io {
            path: self.root.clone(),
            error,
        })?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(version) = name.strip_prefix('v').and_then(|v| v.parse::<u64>().ok())
                && entry.path().join("edge_config.json").exists()
            {
                versions.push(version);
            }
        }
        versions.sort_unstable();
        Ok(versions)
    }

    fn drop_version(&self, version: u64) -> Result<(), IndexError> {
        // No new loads of it; searches already holding it finish first, because the shard
        // flushes into its directory when the last handle goes (and panics if it is gone).
        let shard = {
            let mut shards = self.shards.lock().expect("shard cache lock");
            self.dropping.lock().expect("dropping lock").insert(version);
            shards.remove(&version)
        };
        if let Some(shard) = shard {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while Arc::strong_count(&shard) > 1 && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            drop(shard);
        }
        let dir = version_dir(&self.root, version);
        let _ = std::fs::remove_file(self.root.join(format!("v{version}.{INFO_FILE}")));
        let result = match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(IndexError::Io { path: dir, error }),
        };
        self.dropping
            .lock()
            .expect("dropping lock")
            .remove(&version);
        result
    }

    fn set_live(&self, version: u64) -> Result<(), IndexError> {
        let path = self.root.join(LIVE_FILE);
        crate::durable::write_atomically(&path, format!("{version}\n").as_bytes())
            .map_err(|error| IndexError::Io { path, error })
    }

    fn live(&self) -> Result<Option<u64>, IndexError> {
        let path = self.root.join(LIVE_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(text.trim().parse().ok()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(IndexError::Io { path, error }),
        }
    }
}

#[allow(dead_code)]
fn assert_send_sync() {
    fn is<T: Send + Sync>() {}
    is::<EdgeIndex>();
}
