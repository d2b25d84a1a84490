//! Helpers for ingestion tests: a running `rsitrd ingest` process, the real RabbitMQ broker,
//! unique queue names, store stats, synthetic images.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};
use rsitrd::config::AmqpSection;
use rsitrd::ingest::amqp::{declare_topology, message_properties};

/// The broker the tests talk to (RabbitMQ on this machine; `.ci/run` starts it).
pub fn amqp_uri() -> String {
    std::env::var("RSITRD_TEST_AMQP_URI")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("rsitrd-test.{prefix}.{}.{nanos}", std::process::id())
}

/// Environment configuring `rsitrd` for a test: its own data dir, inbox and queue.
pub struct TestEnv {
    pub data: PathBuf,
    pub inbox: PathBuf,
    pub queue: String,
    pub amqp: bool,
    pub inbox_enabled: bool,
    pub extra: Vec<(String, String)>,
}

impl TestEnv {
    pub fn new(root: &Path, queue: &str) -> Self {
        Self {
            data: root.join("data"),
            inbox: root.join("inbox"),
            queue: queue.to_string(),
            amqp: false,
            inbox_enabled: false,
            extra: Vec::new(),
        }
    }

    pub fn vars(&self) -> Vec<(String, String)> {
        let mut vars = vec![
            ("RSITRD__STORE__DIR".into(), self.data.display().to_string()),
            (
                "RSITRD__INBOX__DIR".into(),
                self.inbox.display().to_string(),
            ),
            (
                "RSITRD__INBOX__ENABLED".into(),
                self.inbox_enabled.to_string(),
            ),
            ("RSITRD__AMQP__ENABLED".into(), self.amqp.to_string()),
            ("RSITRD__AMQP__URI".into(), amqp_uri()),
            ("RSITRD__AMQP__QUEUE".into(), self.queue.clone()),
            ("RSITRD__AMQP__RECONNECT_MAX_BACKOFF".into(), "1s".into()),
            ("RSITRD_LOG".into(), "info".into()),
        ];
        vars.extend(self.extra.iter().cloned());
        vars
    }

    pub fn command(&self) -> std::process::Command {
        let mut command = super::rsitrd();
        command.envs(self.vars());
        command
    }

    /// `rsitrd stats --json`.
    pub fn stats(&self) -> serde_json::Value {
        let out = super::run_ok(self.command().args(["stats", "--json"]));
        serde_json::from_slice(&out.stdout).expect("stats JSON")
    }

    /// Starts `rsitrd ingest`, logging to `log`.
    pub fn start(&self, log: &Path) -> Ingest {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = self
            .command()
            .arg("ingest")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start rsitrd ingest");
        Ingest {
            child: Some(child),
            log: log.to_path_buf(),
        }
    }
}

/// A running `rsitrd ingest`; killed if the test ends early.
pub struct Ingest {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Ingest {
    /// Wraps a spawned `rsitrd` process logging to `log`.
    pub fn from_child(child: Child, log: &Path) -> Self {
        Self {
            child: Some(child),
            log: log.to_path_buf(),
        }
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// SIGTERM and a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let status = std::process::Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()
                .unwrap();
            assert!(status.success());
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Some(status) = child.try_wait().unwrap() {
                    assert!(
                        status.success(),
                        "ingest exited with {status}:\n{}",
                        self.log_text()
                    );
                    return;
                }
                assert!(Instant::now() < deadline, "ingest did not stop on SIGTERM");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        match &mut self.child {
            Some(child) => child.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Ingest {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs the broker's CLI (`rabbitmqctl ARGS…`); whether it succeeded.
pub fn rabbitmqctl(args: &[&str]) -> bool {
    std::process::Command::new("rabbitmqctl")
        .args(args)
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Polls `condition` until it holds or `timeout` passes (then panics with `what`).
pub fn wait_for(timeout: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A small PNG whose pixels (and so whose sample id) depend on `seed`.
pub fn synthetic_png(seed: u32, size: u32) -> Vec<u8> {
    let image = image::RgbImage::from_fn(size, size, |x, y| {
        let v = seed
            .wrapping_mul(2_654_435_761)
            .wrapping_add(x * 31 + y * 17);
        image::Rgb([
            (v & 0xff) as u8,
            ((v >> 8) & 0xff) as u8,
            ((v >> 16) & 0xff) as u8,
        ])
    });
    let mut out = Cursor::new(Vec::new());
    image.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// A broker connection for test-side publishing and inspection.
pub async fn broker() -> Connection {
    Connection::connect(&amqp_uri(), ConnectionProperties::default())
        .await
        .expect("RabbitMQ on 127.0.0.1:5672 (start it with `rabbitmq-server -detached`)")
}

/// Messages ready in `queue` (0 if it does not exist).
pub async fn queue_len(connection: &Connection, queue: &str) -> u32 {
    let channel = connection.create_channel().await.unwrap();
    match channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
    {
        Ok(queue) => queue.message_count(),
        Err(_) => 0,
    }
}

/// Takes every message from `queue`: (body, reason header, kind header).
pub async fn drain(connection: &Connection, queue: &str) -> Vec<(Vec<u8>, String, String)> {
    let channel = connection.create_channel().await.unwrap();
    let mut out = Vec::new();
    while let Some(message) = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        let header = |name: &str| -> String {
            match message
                .delivery
                .properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get(name).cloned())
            {
                Some(AMQPValue::LongString(s)) => {
                    String::from_utf8_lossy(s.as_bytes()).into_owned()
                }
                Some(other) => format!("{other:?}"),
                None => String::new(),
            }
        };
        let reason = header("x-rsitrd-reason");
        let kind = header("x-rsitrd-kind");
        out.push((message.delivery.data.clone(), reason, kind));
    }
    out
}

/// Deletes the queue, its dead-letter queue and exchange.
pub async fn cleanup(connection: &Connection, queue: &str) {
    let channel = connection.create_channel().await.unwrap();
    for name in [queue.to_string(), format!("{queue}.dead")] {
        let _ = channel
            .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = channel
        .exchange_delete(
            format!("{queue}.dlx").as_str().into(),
            lapin::options::ExchangeDeleteOptions::default(),
        )
        .await;
}

/// A small runtime for test-side broker work.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

pub fn amqp_section(queue: &str) -> AmqpSection {
    AmqpSection {
        enabled: true,
        uri: amqp_uri(),
        queue: queue.into(),
        ..AmqpSection::default()
    }
}

/// Publishes raw bodies (content type per message) with publisher confirms.
pub async fn publish(queue: &str, messages: &[(String, Vec<u8>, Option<&str>)]) {
    let connection = broker().await;
    let channel = connection.create_channel().await.unwrap();
    declare_topology(&channel, &amqp_section(queue))
        .await
        .unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for (id, body, content_type) in messages {
        let mut properties = message_properties(id);
        if let Some(content_type) = content_type {
            properties = properties.with_content_type((*content_type).into());
        }
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack(), "broker confirmed {id}");
    }
}

/// Renames synthetic samples (`PREFIX{seed}.png` of 24×24 pixels + a one-caption
/// `.txt`, "tile {seed}") into `inbox` through `staging`, as a producer would.
pub fn drop_synthetic(inbox: &Path, staging: &Path, seeds: std::ops::Range<u32>) {
    std::fs::create_dir_all(staging).unwrap();
    std::fs::create_dir_all(inbox).unwrap();
    for seed in seeds {
        let name = format!("s{seed}");
        std::fs::write(staging.join(format!("{name}.png")), synthetic_png(seed, 24)).unwrap();
        std::fs::write(
            staging.join(format!("{name}.txt")),
            format!("tile {seed}\n"),
        )
        .unwrap();
        for ext in ["txt", "png"] {
            std::fs::rename(
                staging.join(format!("{name}.{ext}")),
                inbox.join(format!("{name}.{ext}")),
            )
            .unwrap();
        }
    }
}
