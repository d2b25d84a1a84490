//! A running `rsitrd run` on the tiny CLIP for end-to-end tests, and HTTP helpers.

use std::path::Path;
use std::time::Duration;

use base64::Engine;
use serde_json::{Value, json};

use super::ingest::{Ingest, TestEnv, unique, wait_for};

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Daemon {
    pub env: TestEnv,
    pub base: String,
    pub process: Option<Ingest>,
    pub log: std::path::PathBuf,
    /// `run` (the daemon) or `serve` (a query replica).
    pub subcommand: &'static str,
}

impl Daemon {
    pub fn new(root: &Path, extra: &[(&str, &str)]) -> Self {
        let port = free_port();
        let mut env = TestEnv::new(root, &unique("daemon"));
        env.inbox_enabled = true;
        env.extra = vec![
            (
                "RSITRD__MODEL__DIR".into(),
                super::fixture("tiny-clip").display().to_string(),
            ),
            ("RSITRD__HTTP__LISTEN".into(), format!("127.0.0.1:{port}")),
            ("RSITRD__INBOX__SETTLE".into(), "200ms".into()),
            ("RSITRD__STORE__VAL_FRACTION".into(), "0.3".into()),
            ("RSITRD__TRAINING__MIN_NEW_SAMPLES".into(), "100000".into()),
            ("RSITRD__TRAINING__STEPS".into(), "6".into()),
            ("RSITRD__TRAINING__BATCH_SIZE".into(), "4".into()),
            ("RSITRD__TRAINING__LR".into(), "0.001".into()),
            ("RSITRD_API_TOKEN".into(), String::new()),
        ];
        for (key, value) in extra {
            env.extra.push((key.to_string(), value.to_string()));
        }
        Self {
            env,
            base: format!("http://127.0.0.1:{port}"),
            process: None,
            log: root.join("daemon.log"),
            subcommand: "run",
        }
    }

    pub fn start(&mut self) {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        // Only this start's lines: an earlier run's logged error is not this one's failure.
        let offset = std::fs::metadata(&self.log).map_or(0, |m| m.len() as usize);
        let child = self
            .env
            .command()
            .arg(self.subcommand)
            .stdout(std::process::Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap();
        self.process = Some(Ingest::from_child(child, &self.log));
        let base = self.base.clone();
        let log = self.log.clone();
        let this_run = || {
            let text = std::fs::read(&log).unwrap_or_default();
            String::from_utf8_lossy(&text[offset.min(text.len())..]).into_owned()
        };
        wait_for(Duration::from_secs(60), "readyz", || {
            ureq::get(&format!("{base}/readyz"))
                .call()
                .is_ok_and(|r| r.status() == 200)
                || {
                    let lines = this_run();
                    assert!(
                        !lines.contains("\"level\":\"ERROR\""),
                        "daemon failed: {lines}"
                    );
                    false
                }
        });
    }

    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let response = ureq::post(&format!("{}{path}", self.base))
            .config()
            .http_status_as_error(false)
            .build()
            .send_json(body)
            .unwrap();
        read(response)
    }

    /// Any method, raw body and content type; the whole answer.
    pub fn raw(&self, method: &str, path: &str, content_type: Option<&str>, body: &[u8]) -> Reply {
        let url = format!("{}{path}", self.base);
        let mut request = ureq::http::Request::builder().method(method).uri(&url);
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        let request = request.body(body.to_vec()).unwrap();
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .allow_non_standard_methods(true)
            .build()
            .into();
        let mut response = agent.run(request).unwrap();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let content_type = header("content-type").unwrap_or_default();
        let retry_after = header("retry-after");
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().unwrap_or_default();
        Reply {
            status,
            body: serde_json::from_str(&text).unwrap_or(Value::String(text)),
            content_type,
            retry_after,
        }
    }

    /// The Prometheus text of `/metrics`.
    pub fn metrics(&self) -> String {
        ureq::get(&format!("{}/metrics", self.base))
            .call()
            .unwrap()
            .body_mut()
            .read_to_string()
            .unwrap()
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        let response = ureq::get(&format!("{}{path}", self.base))
            .config()
            .http_status_as_error(false)
            .build()
            .call()
            .unwrap();
        read(response)
    }
}

pub fn read(mut response: ureq::http::Response<ureq::Body>) -> (u16, Value) {
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A whole HTTP answer.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
    pub content_type: String,
    pub retry_after: Option<String>,
}

impl Reply {
    /// The `{"error": ...}` message, asserting the answer is a JSON error.
    pub fn error(&self) -> String {
        assert!(
            self.content_type.starts_with("application/json"),
            "not JSON: {self:?}"
        );
        self.body["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no `error` field: {self:?}"))
            .to_string()
    }
}

/// The index settings of a Qdrant-server run (`RSITRD_TEST_QDRANT_URL`), with a collection of
/// the test's own; push them into `Daemon::env.extra`.
pub fn server_backend() -> Vec<(String, String)> {
    let url = std::env::var("RSITRD_TEST_QDRANT_URL")
        .expect("RSITRD_TEST_QDRANT_URL names a Qdrant server (gRPC, e.g. http://127.0.0.1:6334)");
    vec![
        ("RSITRD__INDEX__BACKEND".into(), "remote".into()),
        ("RSITRD__INDEX__URL".into(), url),
        (
            "RSITRD__INDEX__COLLECTION".into(),
            unique("daemon").replace(['.', '-'], "_"),
        ),
    ]
}

/// Drops the collections a server run made (none for the embedded index).
pub fn drop_server_collections(backend: &[(String, String)]) {
    let Some(collection) = backend
        .iter()
        .find(|(k, _)| k == "RSITRD__INDEX__COLLECTION")
        .map(|(_, v)| v.clone())
    else {
        return;
    };
    let url = backend
        .iter()
        .find(|(k, _)| k == "RSITRD__INDEX__URL")
        .map(|(_, v)| v.clone())
        .unwrap();
    let config = rsitrd::config::IndexSection {
        backend: rsitrd::config::IndexBackendKind::Remote,
        url,
        collection,
        ..Default::default()
    };
    use rsitrd::index::VectorIndex;
    let index = rsitrd::index::remote::RemoteIndex::connect(&config).unwrap();
    for version in index.versions().unwrap() {
        index.drop_version(version).unwrap();
    }
}

/// Moves the rs-mini samples into `inbox` (through `staging`, as producers do), each with
/// its captions and `{"set": "rs-mini"}` metadata; returns how many.
pub fn feed_rs_mini(inbox: &Path, staging: &Path) -> usize {
    std::fs::create_dir_all(inbox).unwrap();
    std::fs::create_dir_all(staging).unwrap();
    let mini = super::rs_mini();
    for sample in &mini {
        let stem = sample.filename.rsplit_once('.').unwrap().0;
        let ext = sample.filename.rsplit_once('.').unwrap().1;
        std::fs::copy(&sample.path, staging.join(&sample.filename)).unwrap();
        // NAME.json with metadata (searches can filter on it), NAME.txt for the rest.
        let captions = json!({"captions": sample.captions, "metadata": {"set": "rs-mini"}});
        std::fs::write(staging.join(format!("{stem}.json")), captions.to_string()).unwrap();
        std::fs::rename(
            staging.join(format!("{stem}.json")),
            inbox.join(format!("{stem}.json")),
        )
        .unwrap();
        std::fs::rename(
            staging.join(&sample.filename),
            inbox.join(format!("{stem}.{ext}")),
        )
        .unwrap();
    }
    mini.len()
}
