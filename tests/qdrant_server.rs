//! What users of a Qdrant server see: the Python query of docs/qdrant.md, run as written
//! against a daemon that writes to the server. `#[ignore]`d unless a server is named by
//! `RSITRD_TEST_QDRANT_URL` (gRPC); the REST URL the Python client uses is
//! `RSITRD_TEST_QDRANT_REST_URL` (default: the same host, port 6333). Needs
//! `pip install qdrant-client`.

mod common;

use std::time::Duration;

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
