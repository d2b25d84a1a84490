//! The index implementations against brute force: the embedded qdrant-edge always, the remote
//! Qdrant server when `RSITRD_TEST_QDRANT_URL` is set (skipped with a printed reason otherwise).

mod common;

use rsitrd::index::edge::EdgeIndex;
use rsitrd::index::{IMAGE_VECTOR, IndexPoint, TEXT_VECTOR, VectorIndex, image_point_id};
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

fn check(index: &dyn VectorIndex) {
    let version = 7;
    index.ensure_version(version, DIM).unwrap();
    index.ensure_version(version, DIM).unwrap(); // idempotent
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

    index.ensure_version(8, DIM).unwrap();
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

#[test]
fn remote_index_matches_brute_force_when_a_server_is_given() {
    let Ok(url) = std::env::var("RSITRD_TEST_QDRANT_URL") else {
        println!(
            "skipped: set RSITRD_TEST_QDRANT_URL (e.g. http://127.0.0.1:6334) to test a Qdrant server"
        );
        return;
    };
    let config = rsitrd::config::IndexSection {
        backend: rsitrd::config::IndexBackendKind::Remote,
        url,
        collection: common::ingest::unique("index").replace('.', "_"),
        ..Default::default()
    };
    let index = rsitrd::index::remote::RemoteIndex::connect(&config).unwrap();
    check(&index);
    index.drop_version(7).unwrap();
}
