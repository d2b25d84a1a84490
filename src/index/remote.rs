//! Remote index: a Qdrant server or cluster through `qdrant-client` (gRPC). Each version is a
//! collection `NAME_vN`; the alias `NAME` names the live one and is re-pointed with a single
//! `create_alias` call (the server replaces an existing alias atomically). Thin on purpose: the
//! shared logic (point ids, payloads, versions) is in [`super`] and exercised by the embedded
//! tests; these run against a server when `RSITRD_TEST_QDRANT_URL` is set.

use std::time::Duration;

use qdrant_client::qdrant::{
    Condition, CountPointsBuilder, CreateAliasBuilder, CreateCollectionBuilder, Distance, Filter,
    NamedVectors, PointStruct, QueryPointsBuilder, UpsertPointsBuilder, VectorParamsBuilder,
    VectorsConfigBuilder,
};
use qdrant_client::{Payload, Qdrant};

use super::{
    Hit, IMAGE_VECTOR, IndexError, IndexPoint, MatchValue, PayloadFilter, TEXT_VECTOR, VectorIndex,
    backend_error, match_conditions, uuid_string,
};
use crate::config::IndexSection;

/// A Qdrant server behind an alias.
pub struct RemoteIndex {
    client: Qdrant,
    alias: String,
    /// Runs the client's futures: callers are blocking threads.
    runtime: tokio::runtime::Runtime,
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
            .timeout(Duration::from_secs(30))
            .connect_timeout(Duration::from_secs(5))
            .skip_compatibility_check()
            .build()
            .map_err(|e| backend_error(format!("connect {}", config.url), e))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| backend_error("runtime", e))?;
        Ok(Self {
            client,
            alias: config.collection.clone(),
            runtime,
        })
    }

    fn collection(&self, version: u64) -> String {
        format!("{}_v{version}", self.alias)
    }

    /// Runs a client future from a blocking thread (its own runtime, so it also works inside
    /// another runtime's blocking pool).
    fn run<T>(&self, future: impl Future<Output = T> + Send) -> T
    where
        T: Send,
    {
        std::thread::scope(|scope| {
            scope
                .spawn(|| self.runtime.block_on(future))
                .join()
                .expect("qdrant client thread")
        })
    }
}

impl VectorIndex for RemoteIndex {
    fn ensure_version(&self, version: u64, dim: usize) -> Result<(), IndexError> {
        let name = self.collection(version);
        self.run(async {
            if self
                .client
                .collection_exists(&name)
                .await
                .map_err(|e| backend_error("exists", e))?
            {
                return Ok(());
            }
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
            self.client
                .create_collection(CreateCollectionBuilder::new(&name).vectors_config(vectors))
                .await
                .map_err(|e| backend_error(format!("create {name}"), e))?;
            Ok(())
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
        self.run(async {
            self.client
                .upsert_points(UpsertPointsBuilder::new(&name, points).wait(true))
                .await
                .map_err(|e| backend_error(format!("upsert {name}"), e))?;
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
                .map_err(|e| backend_error(format!("search {name}"), e))
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
                .map_err(|e| backend_error(format!("count {name}"), e))?;
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
                .map_err(|e| backend_error("list collections", e))?;
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
                .map_err(|e| backend_error(format!("delete {name}"), e))?;
            Ok(())
        })
    }

    fn set_live(&self, version: u64) -> Result<(), IndexError> {
        let name = self.collection(version);
        self.run(async {
            self.client
                .create_alias(CreateAliasBuilder::new(&name, &self.alias))
                .await
                .map_err(|e| backend_error(format!("alias {} -> {name}", self.alias), e))?;
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
                .map_err(|e| backend_error("list aliases", e))?;
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
