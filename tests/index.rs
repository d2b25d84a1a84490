//! The index contract, the same for both implementations: brute-force agreement, filters,
//! versions, the live pointer, what a version was made with. The embedded qdrant-edge runs
//! always; the Qdrant server tests are `#[ignore]`d unless asked for, with a server named by
//! `RSITRD_TEST_QDRANT_URL` (docs/qdrant.md):
//! `RSITRD_TEST_QDRANT_URL=http://127.0.0.1:6334 cargo test --test index -- --include-ignored`

mod common;

use rsitrd::index::edge::EdgeIndex;
use rsitrd::index::{
    IMAGE_VECTOR, IndexPoint, TEXT_VECTOR, VectorIndex, VersionInfo, image_point_id,
};
use rsitrd::store::SampleId;

const DIM: usize = 16;

fn unit(seed: u64) -> Vec<f32> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let v: Vec<f32> = (0..DIM)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        })
        .collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.into_iter().map(|x| x / norm).collect()
}

fn points(count: u64) -> Vec<(SampleId, Vec<f32>, IndexPoint)> {
    (0..count)
        .map(|i| {
            let id = SampleId::of_image(&i.to_le_bytes());
            let vector = unit(i);
            let mut payload = serde_json::Map::new();
            payload.insert("sample_id".into(), id.to_hex().into());
            payload.insert(
                "split".into(),
                if i % 3 == 0 { "val" } else { "train" }.into(),
            );
            payload.insert("n".into(), i.into());
            let point = IndexPoint {
                id: image_point_id(&id),
                vector_name: IMAGE_VECTOR,
                vector: vector.clone(),
                payload,
            };
            (id, vector, point)
        })
        .collect()
}

fn info(adapter: &str) -> VersionInfo {
    VersionInfo {
        base_model: "base-fingerprint".into(),
        adapter_id: adapter.into(),
    }
}

fn check(index: &dyn VectorIndex) {
    let version = 7;
    index.ensure_version(version, DIM, &info("a7")).unwrap();
    index.ensure_version(version, DIM, &info("a7")).unwrap(); // idempotent
    assert_eq!(index.version_info(version).unwrap(), Some(info("a7")));
    assert_eq!(index.version_info(99).unwrap(), None);
    let data = points(200);
    index
        .upsert(version, data.iter().map(|(_, _, p)| p.clone()).collect())
        .unwrap();
    // Upserting the same ids again adds nothing.
    index
        .upsert(
            version,
            data[..50].iter().map(|(_, _, p)| p.clone()).collect(),
        )
        .unwrap();
    assert_eq!(index.count(version).unwrap(), 200);

    let query = unit(10_000);
    let mut expected: Vec<(f32, usize)> = data
        .iter()
        .enumerate()
        .map(|(i, (_, v, _))| (v.iter().zip(&query).map(|(a, b)| a * b).sum(), i))
        .collect();
    expected.sort_by(|a, b| b.0.total_cmp(&a.0));
    let hits = index
        .search(version, IMAGE_VECTOR, query.clone(), 5, &Vec::new())
        .unwrap();
    assert_eq!(hits.len(), 5);
    for (hit, (score, i)) in hits.iter().zip(&expected) {
        assert!((hit.score - score).abs() < 1e-4, "{} vs {score}", hit.score);
        assert_eq!(hit.payload["sample_id"], data[*i].0.to_hex());
    }
    // A filter restricts to matching payloads.
    let filter = vec![("split".to_string(), serde_json::json!("val"))];
    let hits = index
        .search(version, IMAGE_VECTOR, query.clone(), 5, &filter)
        .unwrap();
    let best_val = expected
        .iter()
        .find(|(_, i)| i % 3 == 0)
        .expect("a val point");
    assert_eq!(hits[0].payload["sample_id"], data[best_val.1].0.to_hex());
    assert!(hits.iter().all(|h| h.payload["split"] == "val"));
    // Caption vectors are a separate space: no image point answers a text search.
    assert!(
        index
            .search(version, TEXT_VECTOR, query, 5, &Vec::new())
            .unwrap()
            .is_empty()
    );

    index.ensure_version(8, DIM, &info("a8")).unwrap();
    assert_eq!(index.versions().unwrap(), vec![7, 8]);
    index.set_live(8).unwrap();
    assert_eq!(index.live().unwrap(), Some(8));
    index.set_live(7).unwrap();
    assert_eq!(index.live().unwrap(), Some(7));
    index.drop_version(8).unwrap();
    assert_eq!(index.versions().unwrap(), vec![7]);
}

#[test]
fn embedded_index_matches_brute_force_and_survives_reopen() {
    let temp = tempfile::tempdir().unwrap();
    {
        let index = EdgeIndex::open(temp.path()).unwrap();
        check(&index);
    }
    // Reopened (as after a restart): data, versions and the live pointer are still there.
    let index = EdgeIndex::open(temp.path()).unwrap();
    assert_eq!(index.versions().unwrap(), vec![7]);
    assert_eq!(index.live().unwrap(), Some(7));
    assert_eq!(index.count(7).unwrap(), 200);
}

/// The remote index on the server named by `RSITRD_TEST_QDRANT_URL`, in a collection of its
/// own (dropped by the caller's `cleanup`).
pub fn remote(
    name: &str,
) -> (
    rsitrd::index::remote::RemoteIndex,
    rsitrd::config::IndexSection,
) {
    let url = std::env::var("RSITRD_TEST_QDRANT_URL")
        .expect("RSITRD_TEST_QDRANT_URL names a Qdrant server (gRPC, e.g. http://127.0.0.1:6334)");
    let config = rsitrd::config::IndexSection {
        backend: rsitrd::config::IndexBackendKind::Remote,
        url,
        collection: common::ingest::unique(name).replace(['.', '-'], "_"),
        upsert_points: 64,
        indexed_metadata: vec!["sensor".into()],
        ..Default::default()
    };
    (
        rsitrd::index::remote::RemoteIndex::connect(&config).unwrap(),
        config,
    )
}

fn cleanup(index: &dyn VectorIndex) {
    for version in index.versions().unwrap() {
        index.drop_version(version).unwrap();
    }
}

#[test]
#[ignore = "needs a Qdrant server: set RSITRD_TEST_QDRANT_URL and run with --include-ignored"]
fn remote_index_matches_brute_force() {
    let (index, _) = remote("index");
    check(&index);
    cleanup(&index);
}

/// Switching versions while a client searches the alias, as users' own clients do: every
/// answer comes whole from one version (no error, no empty answer, no mix).
fn alias_switch_is_atomic(index: &dyn VectorIndex, search_live: &(dyn Fn() -> Vec<u64> + Sync)) {
    for version in [1u64, 2] {
        index
            .ensure_version(version, DIM, &info(&format!("a{version}")))
            .unwrap();
        let points = points(300)
            .into_iter()
            .map(|(_, _, mut p)| {
                p.payload.insert("adapter_version".into(), version.into());
                p
            })
            .collect();
        index.upsert(version, points).unwrap();
    }
    index.set_live(1).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let seen = std::thread::scope(|scope| {
        let searcher = scope.spawn(|| {
            let mut seen = std::collections::BTreeSet::new();
            let mut answers = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) || answers < 20 {
                let versions = search_live();
                assert!(!versions.is_empty(), "an empty answer");
                assert!(
                    versions.iter().all(|v| *v == versions[0]),
                    "one answer mixed versions: {versions:?}"
                );
                seen.insert(versions[0]);
                answers += 1;
            }
            seen
        });
        for round in 0..40 {
            index.set_live(1 + (round % 2)).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        searcher.join().unwrap()
    });
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![1, 2]);
}

#[test]
fn embedded_live_pointer_switch_is_atomic_for_a_searching_client() {
    let temp = tempfile::tempdir().unwrap();
    let index = EdgeIndex::open(temp.path()).unwrap();
    // An embedded client reads the live pointer, then searches that version.
    let search = || {
        let live = index.live().unwrap().unwrap();
        index
            .search(live, IMAGE_VECTOR, unit(5), 10, &Vec::new())
            .unwrap()
            .iter()
            .map(|h| h.payload["adapter_version"].as_u64().unwrap())
            .collect()
    };
    alias_switch_is_atomic(&index, &search);
}

#[test]
#[ignore = "needs a Qdrant server: set RSITRD_TEST_QDRANT_URL and run with --include-ignored"]
fn server_alias_switch_is_atomic_for_a_searching_client() {
    use qdrant_client::qdrant::QueryPointsBuilder;
    let (index, config) = remote("alias");
    // A user's own client, searching the alias by name.
    let client = qdrant_client::Qdrant::from_url(&config.url)
        .skip_compatibility_check()
        .build()
        .unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let search = || -> Vec<u64> {
        let response = runtime
            .block_on(
                client.query(
                    QueryPointsBuilder::new(&config.collection)
                        .query(unit(5))
                        .using(IMAGE_VECTOR)
                        .limit(10)
                        .with_payload(true),
                ),
            )
            .expect("no error while the alias switches");
        response
            .result
            .into_iter()
            .map(|p| {
                serde_json::Value::from(p.payload["adapter_version"].clone())
                    .as_u64()
                    .unwrap()
            })
            .collect()
    };
    alias_switch_is_atomic(&index, &search);
    cleanup(&index);
}

#[test]
#[ignore = "needs a Qdrant server: set RSITRD_TEST_QDRANT_URL and run with --include-ignored"]
fn server_collections_follow_the_documented_contract() {
    let (index, config) = remote("contract");
    index.ensure_version(3, DIM, &info("adapter-hash")).unwrap();
    index.set_live(3).unwrap();
    let client = qdrant_client::Qdrant::from_url(&config.url)
        .skip_compatibility_check()
        .build()
        .unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let collection = format!("{}_v3", config.collection);
    let info = runtime
        .block_on(client.collection_info(&collection))
        .unwrap()
        .result
        .unwrap();
    // Payload indexes on the fields people filter on, and the configured metadata keys.
    let schema: Vec<&str> = info.payload_schema.keys().map(String::as_str).collect();
    for field in [
        "sample_id",
        "kind",
        "split",
        "source",
        "adapter_version",
        "arrived_ms",
        "metadata.sensor",
    ] {
        assert!(schema.contains(&field), "no index on {field}: {schema:?}");
    }
    // The collection says which encoder made its vectors.
    let metadata = info.config.unwrap().metadata;
    let text = |key: &str| serde_json::Value::from(metadata[key].clone());
    assert_eq!(text("rsitrd_base_model"), "base-fingerprint");
    assert_eq!(text("rsitrd_adapter_id"), "adapter-hash");
    assert_eq!(text("rsitrd_adapter_version"), 3);
    // Upserts larger than `upsert_points` (64) are split and all land.
    index
        .upsert(3, points(500).into_iter().map(|(_, _, p)| p).collect())
        .unwrap();
    assert_eq!(index.count(3).unwrap(), 500);
    cleanup(&index);
}
