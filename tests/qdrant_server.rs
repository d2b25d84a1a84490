//! What users of a Qdrant server see: the Python query of docs/qdrant.md, run as written
//! against a daemon that writes to the server. `#[ignore]`d unless a server is named by
//! `RSITRD_TEST_QDRANT_URL` (gRPC); the REST URL the Python client uses is
//! `RSITRD_TEST_QDRANT_REST_URL` (default: the same host, port 6333). Needs
//! `pip install qdrant-client`.

mod common;

use std::time::{Duration, Instant};

use common::daemon::Daemon;
use common::ingest::wait_for;
use serde_json::json;

/// The one ```python block of docs/qdrant.md.
fn documented_snippet() -> String {
    let doc = std::fs::read_to_string(common::repo_root().join("docs/qdrant.md")).unwrap();
    let start = doc.find("```python\n").expect("a python block") + "```python\n".len();
    let end = start + doc[start..].find("```").expect("its end");
    doc[start..end].to_string()
}

#[test]
fn the_documented_snippet_is_python() {
    let snippet = documented_snippet();
    assert!(snippet.contains("query_points") && snippet.contains("/v1/embed"));
}

#[test]
#[ignore = "needs a Qdrant server: set RSITRD_TEST_QDRANT_URL and run with --include-ignored"]
fn the_documented_python_query_runs_against_the_server() {
    let backend = common::daemon::server_backend();
    let grpc = std::env::var("RSITRD_TEST_QDRANT_URL").unwrap();
    let rest = std::env::var("RSITRD_TEST_QDRANT_REST_URL")
        .unwrap_or_else(|_| grpc.replace(":6334", ":6333"));
    let collection = backend
        .iter()
        .find(|(k, _)| k == "RSITRD__INDEX__COLLECTION")
        .unwrap()
        .1
        .clone();
    let temp = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::new(temp.path(), &[]);
    daemon.env.extra.extend(backend.iter().cloned());
    daemon.start();
    let staging = temp.path().join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::create_dir_all(&daemon.env.inbox).unwrap();
    let mini = common::rs_mini();
    for sample in &mini {
        let stem = sample.filename.rsplit_once('.').unwrap().0;
        std::fs::copy(&sample.path, staging.join(&sample.filename)).unwrap();
        std::fs::write(
            staging.join(format!("{stem}.json")),
            json!({"captions": sample.captions, "metadata": {"sensor": "rs-mini"}}).to_string(),
        )
        .unwrap();
        std::fs::rename(
            staging.join(format!("{stem}.json")),
            daemon.env.inbox.join(format!("{stem}.json")),
        )
        .unwrap();
        std::fs::rename(
            staging.join(&sample.filename),
            daemon.env.inbox.join(&sample.filename),
        )
        .unwrap();
    }
    wait_for(Duration::from_secs(120), "rs-mini embedded", || {
        let (_, status) = daemon.get("/v1/status");
        status["samples"]["samples"] == mini.len() && status["backlog"] == 0
    });
    let output = std::process::Command::new("python3")
        .arg("-c")
        .arg(documented_snippet())
        .env("RSITRD_URL", &daemon.base)
        .env("QDRANT_URL", &rest)
        .env("RSITRD_COLLECTION", &collection)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // Five hits, each a train sample of the store.
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 5, "{stdout}");
    for line in lines {
        let sample_id = line.split_whitespace().nth(1).unwrap();
        assert_eq!(sample_id.len(), 64, "{line}");
    }
    daemon.process.as_mut().unwrap().stop();
    common::daemon::drop_server_collections(&backend);
}

/// Two `rsitrd serve` replicas under search load while the primary promotes: every answer
/// comes from one adapter version whose vectors it searched, and both replicas follow the
/// alias to the new version within seconds.
#[test]
#[ignore = "needs a Qdrant server: set RSITRD_TEST_QDRANT_URL and run with --include-ignored"]
fn replicas_follow_the_alias_across_a_promotion_without_mixing_versions() {
    let backend = common::daemon::server_backend();
    let temp = tempfile::tempdir().unwrap();
    for dir in ["primary", "replica0", "replica1"] {
        std::fs::create_dir_all(temp.path().join(dir)).unwrap();
    }
    let mut primary = Daemon::new(
        &temp.path().join("primary"),
        &[("RSITRD__GATE__MR_TOLERANCE", "100")],
    );
    primary.env.extra.extend(backend.iter().cloned());
    primary.start();
    let staging = temp.path().join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::create_dir_all(&primary.env.inbox).unwrap();
    let mini = common::rs_mini();
    for sample in &mini {
        let stem = sample.filename.rsplit_once('.').unwrap().0;
        std::fs::copy(&sample.path, staging.join(&sample.filename)).unwrap();
        std::fs::write(
            staging.join(format!("{stem}.txt")),
            sample.captions.join("\n"),
        )
        .unwrap();
        for name in [format!("{stem}.txt"), sample.filename.clone()] {
            std::fs::rename(staging.join(&name), primary.env.inbox.join(&name)).unwrap();
        }
    }
    wait_for(Duration::from_secs(120), "rs-mini embedded", || {
        let (_, status) = primary.get("/v1/status");
        status["samples"]["samples"] == mini.len() && status["backlog"] == 0
    });
    let adapters = primary.env.data.join("adapters").display().to_string();
    let mut replicas: Vec<Daemon> = (0..2)
        .map(|i| {
            let mut replica = Daemon::new(&temp.path().join(format!("replica{i}")), &[]);
            replica.subcommand = "serve";
            replica.env.extra.extend(backend.iter().cloned());
            replica
                .env
                .extra
                .push(("RSITRD__MODEL__ADAPTER_DIR".into(), adapters.clone()));
            replica.start();
            replica
        })
        .collect();
    for replica in &replicas {
        assert_eq!(replica.get("/v1/status").1["adapter_version"], 0);
    }
    let stop = std::sync::atomic::AtomicBool::new(false);
    let seen = std::thread::scope(|scope| {
        let load: Vec<_> = replicas
            .iter()
            .map(|replica| {
                let (base, stop) = (replica.base.clone(), &stop);
                scope.spawn(move || {
                    let mut versions = std::collections::BTreeSet::new();
                    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                        let found: serde_json::Value = ureq::post(&format!("{base}/v1/search"))
                            .send_json(json!({"text": "a bridge over a river", "k": 5}))
                            .expect("no failed search on a replica")
                            .body_mut()
                            .read_json()
                            .unwrap();
                        let version = found["adapter_version"].clone();
                        let results = found["results"].as_array().unwrap();
                        assert!(!results.is_empty());
                        for hit in results {
                            assert_eq!(hit["adapter_version"], version, "{found}");
                        }
                        versions.insert(version.as_u64().unwrap());
                    }
                    versions
                })
            })
            .collect();
        assert_eq!(primary.post("/v1/train", &json!({})).0, 202);
        wait_for(Duration::from_secs(240), "promoted on the primary", || {
            primary.get("/v1/status").1["adapter_version"] == 1
        });
        let switched = Instant::now();
        wait_for(Duration::from_secs(10), "the replicas followed", || {
            replicas
                .iter()
                .all(|r| r.get("/v1/status").1["adapter_version"] == 1)
        });
        eprintln!("replicas followed the alias in {:?}", switched.elapsed());
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        load.into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    for versions in seen {
        assert_eq!(versions.into_iter().collect::<Vec<_>>(), vec![0, 1]);
    }
    for replica in &mut replicas {
        replica.process.as_mut().unwrap().stop();
    }
    primary.process.as_mut().unwrap().stop();
    common::daemon::drop_server_collections(&backend);
}
