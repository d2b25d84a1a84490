//! AMQP ingestion against the real RabbitMQ on 127.0.0.1:5672: bad input is dead-lettered
//! with its reason, SIGKILL at random points loses and duplicates nothing, and the
//! publish/import commands.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use base64::Engine;
use common::ingest::{
    TestEnv, cleanup, drain, publish, queue_len, rabbitmqctl, runtime, synthetic_png, unique,
    wait_for,
};
use rand::Rng;
use rsitrd::ingest::amqp::encode_message;
use serde_json::json;

/// (id, body, content type, expected reject kind, words the reason must contain)
type BadMessage = (
    &'static str,
    Vec<u8>,
    Option<&'static str>,
    &'static str,
    &'static str,
);

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn message(image: &[u8], captions: &[&str]) -> Vec<u8> {
    serde_json::to_vec(&json!({"image_b64": b64(image), "captions": captions})).unwrap()
}

fn png16(size: u32) -> Vec<u8> {
    let image = image::ImageBuffer::<image::Rgb<u16>, Vec<u16>>::from_fn(size, size, |x, y| {
        image::Rgb([(x * 2000) as u16, (y * 1500) as u16, 40000])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    image.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn gray_png(size: u32) -> Vec<u8> {
    let image = image::GrayImage::from_fn(size, size, |x, y| image::Luma([(x ^ y) as u8]));
    let mut out = std::io::Cursor::new(Vec::new());
    image.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

#[test]
fn bad_messages_are_dead_lettered_with_reasons_and_valid_ones_stored_once() {
    let temp = tempfile::tempdir().unwrap();
    let queue = unique("bad");
    let mut env = TestEnv::new(temp.path(), &queue);
    env.amqp = true;
    env.extra = vec![
        ("RSITRD__MODEL__MAX_PIXELS".into(), "250000".into()),
        ("RSITRD__AMQP__MAX_MESSAGE_BYTES".into(), "2000000".into()),
    ];
    let mini = common::rs_mini();
    let jpeg = std::fs::read(&mini[0].path).unwrap();
    assert!(mini[0].filename.ends_with(".jpg"));
    let second = std::fs::read(&mini[1].path).unwrap();
    let third = std::fs::read(&mini[13].path).unwrap();
    let long_caption = "a very long caption about a harbor with many ships ".repeat(12);

    let valid: Vec<(String, Vec<u8>, Option<&str>)> = vec![
        (
            "valid-jpeg".into(),
            message(&jpeg, &["a playground among buildings"]),
            None,
        ),
        (
            "valid-second".into(),
            message(&second, &["a football field"]),
            None,
        ),
        (
            "valid-tiff".into(),
            message(&third, &["farmland in rows"]),
            None,
        ),
        (
            "valid-16bit".into(),
            message(&png16(40), &["a 16-bit image"]),
            None,
        ),
        (
            "valid-gray".into(),
            message(&gray_png(40), &["a gray image"]),
            None,
        ),
        (
            "valid-long-caption".into(),
            message(&synthetic_png(1, 32), &[&long_caption]),
            None,
        ),
    ];
    let again: Vec<(String, Vec<u8>, Option<&str>)> = vec![
        // Exact re-delivery: counted as a duplicate.
        (
            "duplicate".into(),
            message(&jpeg, &["a playground among buildings"]),
            None,
        ),
        // Same image, a new caption: merged.
        ("merge".into(), message(&second, &["a green pitch"]), None),
    ];
    let truncated = jpeg[..jpeg.len() / 2].to_vec();
    let mut corrupt = jpeg.clone();
    for byte in corrupt.iter_mut().skip(200).take(2000) {
        *byte = 0x5a;
    }
    // (id, body, content type, expected kind, expected words in the reason)
    let bad: Vec<BadMessage> = vec![
        (
            "truncated",
            message(&truncated, &["x"]),
            None,
            "image",
            "truncated",
        ),
        (
            "corrupt",
            message(&corrupt, &["x"]),
            None,
            "image",
            "could not be decoded",
        ),
        ("zero-byte", message(b"", &["x"]), None, "image", "empty"),
        (
            "not-an-image",
            message(b"hello, I am text", &["x"]),
            None,
            "image",
            "is not a supported image",
        ),
        (
            "too-many-pixels",
            message(&synthetic_png(2, 600), &["x"]),
            None,
            "image",
            "pixels",
        ),
        (
            "no-captions",
            message(&synthetic_png(3, 16), &[]),
            None,
            "captions",
            "no captions",
        ),
        (
            "empty-caption",
            message(&synthetic_png(4, 16), &["ok", "  "]),
            None,
            "captions",
            "caption 2 is empty",
        ),
        (
            "broken-json",
            b"{\"image_b64\": \"abc\", \"captions\": [".to_vec(),
            None,
            "message",
            "invalid message JSON",
        ),
        (
            "wrong-types",
            serde_json::to_vec(&json!({"image_b64": b64(&jpeg), "captions": "one"})).unwrap(),
            None,
            "message",
            "invalid type",
        ),
        (
            "missing-image",
            serde_json::to_vec(&json!({"captions": ["x"]})).unwrap(),
            None,
            "message",
            "missing field `image_b64`",
        ),
        (
            "bad-base64",
            serde_json::to_vec(&json!({"image_b64": "***not base64***", "captions": ["x"]}))
                .unwrap(),
            None,
            "message",
            "not valid base64",
        ),
        (
            "unknown-field",
            serde_json::to_vec(
                &json!({"image_b64": b64(&jpeg), "captions": ["x"], "colour": "red"}),
            )
            .unwrap(),
            None,
            "message",
            "unknown field `colour`",
        ),
        (
            "non-utf8",
            [
                &b"{\"image_b64\": \"\", \"captions\": [\"caf"[..],
                &[0xff, 0xfe],
                b"\"]}",
            ]
            .concat(),
            None,
            "message",
            "invalid message JSON",
        ),
        (
            "huge",
            message(&vec![7u8; 1_600_000], &["x"]),
            None,
            "too_large",
            "more than amqp.max_message_bytes",
        ),
        (
            "wrong-content-type",
            message(&synthetic_png(5, 16), &["x"]),
            Some("text/plain"),
            "message",
            "not application/json",
        ),
    ];
    let rt = runtime();
    let mut ingest = env.start(&temp.path().join("ingest.log"));
    rt.block_on(async {
        publish(&queue, &valid).await;
        let bad_messages: Vec<_> = bad
            .iter()
            .map(|(id, body, content_type, _, _)| (id.to_string(), body.clone(), *content_type))
            .collect();
        publish(&queue, &bad_messages).await;
        publish(&queue, &again).await;
    });
    let connection = rt.block_on(common::ingest::broker());
    wait_for(Duration::from_secs(60), "every message handled", || {
        let stats = env.stats();
        stats["samples"] == 6
            && stats["rejected"] == bad.len()
            && stats["duplicates"] == 1
            && stats["merges"] == 1
    });
    wait_for(Duration::from_secs(10), "the queue drained", || {
        rt.block_on(queue_len(&connection, &queue)) == 0
    });
    assert!(ingest.alive(), "bad input must not stop the ingester");
    let stats = env.stats();
    assert_eq!(stats["captions"], 7, "{stats}");
    assert_eq!(stats["by_source"]["amqp"], 6, "{stats}");
    let mut kinds: HashMap<&str, u64> = HashMap::new();
    for (_, _, _, kind, _) in &bad {
        *kinds.entry(kind).or_default() += 1;
    }
    for (kind, count) in kinds {
        assert_eq!(stats["rejected_by_kind"][kind], count, "{kind}: {stats}");
    }
    let dead = rt.block_on(drain(&connection, &format!("{queue}.dead")));
    assert_eq!(dead.len(), bad.len(), "each bad message dead-lettered once");
    let by_body: HashMap<Vec<u8>, (String, String)> = dead
        .into_iter()
        .map(|(body, reason, kind)| (body, (reason, kind)))
        .collect();
    for (id, body, _, kind, words) in &bad {
        let (reason, got_kind) = by_body
            .get(body)
            .unwrap_or_else(|| panic!("{id} not in the dead-letter queue"));
        assert_eq!(got_kind, kind, "{id}: {reason}");
        assert!(
            reason.contains(words),
            "{id}: reason `{reason}` lacks `{words}`"
        );
    }
    let log = ingest.log_text();
    assert!(
        log.contains("rejected") && log.contains("not valid base64"),
        "log lines name rejects"
    );
    ingest.stop();
    assert_eq!(rt.block_on(queue_len(&connection, &queue)), 0, "all acked");
    rt.block_on(cleanup(&connection, &queue));
}

#[test]
fn sigkill_at_random_points_loses_and_duplicates_nothing() {
    let temp = tempfile::tempdir().unwrap();
    let queue = unique("crash");
    let mut env = TestEnv::new(temp.path(), &queue);
    env.amqp = true;
    env.extra = vec![("RSITRD__AMQP__PREFETCH".into(), "8".into())];
    let mut valid = Vec::new();
    let mut expected_captions = 0;
    for sample in common::rs_mini() {
        let captions: Vec<&str> = sample.captions.iter().map(String::as_str).collect();
        let unique_captions: HashSet<&str> = captions.iter().copied().collect();
        expected_captions += unique_captions.len();
        let bytes = std::fs::read(&sample.path).unwrap();
        valid.push((sample.filename.clone(), message(&bytes, &captions), None));
    }
    // Enough messages that the kills land mid-stream (checked below).
    for i in 0..1500 {
        valid.push((
            format!("synthetic-{i}"),
            message(&synthetic_png(100 + i, 32), &["a synthetic tile"]),
            None,
        ));
        expected_captions += 1;
    }
    let invalid: Vec<(String, Vec<u8>, Option<&str>)> = (0..30)
        .map(|i| {
            let body = if i % 2 == 0 {
                format!("{{\"broken\": {i}").into_bytes()
            } else {
                message(format!("not an image {i}").as_bytes(), &["x"])
            };
            (format!("invalid-{i}"), body, None)
        })
        .collect();
    let mut all = valid.clone();
    all.extend(invalid.iter().cloned());
    // Interleave so that kills hit valid and invalid messages alike.
    let seed: u64 = rand::rng().random();
    println!("seed {seed}");
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
    rand::seq::SliceRandom::shuffle(all.as_mut_slice(), &mut rng);
    let rt = runtime();
    rt.block_on(publish(&queue, &all));
    let log = temp.path().join("ingest.log");
    let total = valid.len() + invalid.len();
    let mut mid_stream = 0;
    let handled = || {
        let stats = env.stats();
        stats["samples"].as_u64().unwrap() + stats["rejected"].as_u64().unwrap()
    };
    let mut before = 0;
    for round in 0..5 {
        // Kill at a random point of what is left (a fixed delay would, on a fast machine,
        // land after the end): once 10-40 % more of the remainder is handled, plus 0-30 ms.
        let target = before + (total as u64 - before) * rng.random_range(10..40) / 100;
        let mut ingest = env.start(&log);
        let started = std::time::Instant::now();
        while handled() < target && started.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(0..30)));
        ingest.kill9();
        let after = handled();
        if after < total as u64 {
            mid_stream += 1;
        }
        println!(
            "round {round}: killed after {} ms, {after} of {total} handled",
            started.elapsed().as_millis()
        );
        before = after;
    }
    assert!(
        mid_stream >= 2,
        "the kills must interrupt ingestion, not follow it"
    );
    let consuming = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("\"consuming\"")
            .count()
    };
    let consumers_before = consuming();
    let mut ingest = env.start(&log);
    let connection = rt.block_on(common::ingest::broker());
    // The last kill may already have seen everything through: wait until this process consumes,
    // so that the stop below tests its clean shutdown rather than its start-up.
    wait_for(Duration::from_secs(30), "the consumer to start", || {
        consuming() > consumers_before
    });
    wait_for(
        Duration::from_secs(90),
        "all messages handled after the crashes",
        || {
            let stats = env.stats();
            stats["samples"] == valid.len() && stats["rejected"] == invalid.len()
        },
    );
    ingest.stop();
    // Unacked deliveries go back to the queue when the consumer leaves: empty means all acked.
    assert_eq!(
        rt.block_on(queue_len(&connection, &queue)),
        0,
        "queue empty after the stop"
    );
    let stats = env.stats();
    assert_eq!(stats["samples"], valid.len(), "{stats}");
    assert_eq!(stats["captions"], expected_captions, "{stats}");
    assert_eq!(stats["rejected"], invalid.len(), "{stats}");
    // Every stored image is one of ours, once: the blob directory holds exactly the valid set.
    let blobs = walk_files(&temp.path().join("data/store/blobs"));
    assert_eq!(
        blobs,
        valid.len(),
        "one blob per valid sample (orphans would be extra)"
    );
    // Dead letters: every invalid message at least once (a kill between the dead-letter
    // confirm and the ack may repeat one), nothing valid.
    let dead = rt.block_on(drain(&connection, &format!("{queue}.dead")));
    let invalid_bodies: HashSet<&Vec<u8>> = invalid.iter().map(|(_, body, _)| body).collect();
    let dead_bodies: HashSet<&Vec<u8>> = dead.iter().map(|(body, _, _)| body).collect();
    assert_eq!(dead_bodies, invalid_bodies);
    assert!(dead.iter().all(|(_, reason, _)| !reason.is_empty()));
    rt.block_on(cleanup(&connection, &queue));
}

fn walk_files(dir: &std::path::Path) -> usize {
    let mut count = 0;
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        if entry.file_type().unwrap().is_dir() {
            count += walk_files(&entry.path());
        } else {
            count += 1;
        }
    }
    count
}

#[test]
fn publish_then_ingest_and_import_store_the_dataset() {
    let temp = tempfile::tempdir().unwrap();
    let queue = unique("publish");
    let mut env = TestEnv::new(temp.path(), &queue);
    let summary = dataset_command(&env, "publish");
    assert_eq!(summary["published"], 26, "{summary}");
    let rt = runtime();
    let connection = rt.block_on(common::ingest::broker());
    assert_eq!(rt.block_on(queue_len(&connection, &queue)), 26);

    env.amqp = true;
    let mut ingest = env.start(&temp.path().join("ingest.log"));
    wait_for(Duration::from_secs(60), "26 samples", || {
        env.stats()["samples"] == 26
    });
    ingest.stop();
    let stats = env.stats();
    assert_eq!(stats["captions"], 130 - duplicate_captions(), "{stats}");
    assert_eq!(
        stats["train"].as_u64().unwrap() + stats["val"].as_u64().unwrap(),
        26
    );

    // import into another data directory: same samples, same splits (split = hash of the id).
    let other = TestEnv::new(&temp.path().join("other"), &queue);
    let summary = dataset_command(&other, "import");
    assert_eq!(summary["new"], 26, "{summary}");
    let imported = other.stats();
    assert_eq!(imported["by_source"]["import"], 26);
    assert_eq!(imported["train"], stats["train"]);
    assert_eq!(imported["captions"], stats["captions"]);
    let summary = dataset_command(&other, "import");
    assert_eq!(
        summary["duplicates"], 26,
        "a second import adds nothing: {summary}"
    );
    assert_eq!(other.stats()["samples"], 26);
    rt.block_on(cleanup(&connection, &queue));
}

/// `rsitrd publish|import --dataset rs-mini` with `env`, not yet run.
fn dataset_command_line(env: &TestEnv, verb: &str) -> std::process::Command {
    let mut command = env.command();
    command
        .arg(verb)
        .arg("--dataset")
        .arg(common::rs_mini_dir().join("dataset.json"))
        .arg("--images")
        .arg(common::rs_mini_dir().join("images"));
    command
}

/// `rsitrd publish|import --dataset rs-mini` with `env`; its JSON summary.
fn dataset_command(env: &TestEnv, verb: &str) -> serde_json::Value {
    let out = common::run_ok(&mut dataset_command_line(env, verb));
    serde_json::from_slice(&out.stdout).expect("a JSON summary")
}

/// Captions repeated within one rs-mini image (stored once).
fn duplicate_captions() -> usize {
    common::rs_mini()
        .iter()
        .map(|s| s.captions.len() - s.captions.iter().collect::<HashSet<_>>().len())
        .sum()
}

#[test]
fn a_second_delivery_with_new_metadata_keeps_the_first_values() {
    // Store-level merge semantics through the real queue: metadata keys are added, not
    // overwritten, and captions accumulate.
    let temp = tempfile::tempdir().unwrap();
    let queue = unique("merge");
    let mut env = TestEnv::new(temp.path(), &queue);
    env.amqp = true;
    let image = synthetic_png(9, 24);
    let first = encode_message(
        "a",
        &image,
        &["one".into()],
        serde_json::from_value(json!({"gsd": 0.5})).unwrap(),
    );
    let second = encode_message(
        "b",
        &image,
        &["two".into(), "one".into()],
        serde_json::from_value(json!({"gsd": 9, "sensor": "x"})).unwrap(),
    );
    let rt = runtime();
    rt.block_on(publish(&queue, &[("a".into(), first, None)]));
    let mut ingest = env.start(&temp.path().join("ingest.log"));
    wait_for(Duration::from_secs(30), "first", || {
        env.stats()["samples"] == 1
    });
    rt.block_on(publish(&queue, &[("b".into(), second, None)]));
    wait_for(Duration::from_secs(30), "merge", || {
        env.stats()["merges"] == 1
    });
    ingest.stop();
    let store = rsitrd::store::Store::open(
        &temp.path().join("data/store"),
        rsitrd::store::SplitPolicy {
            val_fraction: 0.1,
            seed: 42,
        },
    )
    .unwrap();
    let record = store
        .get(&rsitrd::store::SampleId::of_image(&image))
        .unwrap()
        .unwrap();
    assert_eq!(record.captions, vec!["one", "two"]);
    assert_eq!(record.metadata["gsd"], 0.5);
    assert_eq!(record.metadata["sensor"], "x");
    assert_eq!(record.source, "amqp");
    let connection = rt.block_on(common::ingest::broker());
    rt.block_on(cleanup(&connection, &queue));
}

#[test]
fn a_failing_store_keeps_the_message_unacked_and_retries_without_spinning() {
    // Fault injection with the real store: its temp directory replaced by a file makes every
    // blob write fail (as a full or broken disk would) until it is put back.
    let temp = tempfile::tempdir().unwrap();
    let queue = unique("fault");
    let mut env = TestEnv::new(temp.path(), &queue);
    env.amqp = true;
    let mut ingest = env.start(&temp.path().join("ingest.log"));
    let store_tmp = env.data.join("store/tmp");
    wait_for(Duration::from_secs(30), "the store created", || {
        store_tmp.is_dir()
    });
    std::fs::remove_dir(&store_tmp).unwrap();
    std::fs::write(&store_tmp, b"not a directory").unwrap();
    let rt = runtime();
    let image = synthetic_png(77, 16);
    rt.block_on(publish(
        &queue,
        &[("fault".into(), message(&image, &["a tile"]), None)],
    ));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        env.stats()["samples"],
        0,
        "nothing stored while the disk fails"
    );
    assert!(ingest.alive());
    let retries = ingest
        .log_text()
        .matches("store commit failed: retrying")
        .count();
    assert!(
        (2..=8).contains(&retries),
        "retried with backoff, not in a tight loop: {retries} attempts in 3 s"
    );
    std::fs::remove_file(&store_tmp).unwrap();
    std::fs::create_dir(&store_tmp).unwrap();
    wait_for(
        Duration::from_secs(15),
        "the sample stored once the disk is back",
        || env.stats()["samples"] == 1,
    );
    ingest.stop();
    // Unacked messages return to the queue when the consumer goes: an empty queue after the
    // stop means the delivery was acked.
    let connection = rt.block_on(common::ingest::broker());
    assert_eq!(rt.block_on(queue_len(&connection, &queue)), 0);
    assert_eq!(env.stats()["rejected"], 0);
    rt.block_on(cleanup(&connection, &queue));
}

/// A RabbitMQ policy on one queue, cleared on drop.
struct Policy(String);

impl Policy {
    /// `reject-publish` overflow at `max_length` messages: the broker nacks further publishes
    /// (publisher confirms) until a consumer makes room.
    fn reject_publish_beyond(queue: &str, max_length: u32) -> Self {
        let name = format!("{queue}.policy");
        let pattern = format!("^{}$", queue.replace('.', "\\."));
        let definition = json!({"max-length": max_length, "overflow": "reject-publish"});
        assert!(
            rabbitmqctl(&[
                "set_policy",
                "--apply-to",
                "queues",
                &name,
                &pattern,
                &definition.to_string(),
            ]),
            "rabbitmqctl set_policy failed (the tests need the broker's CLI)"
        );
        Self(name)
    }
}

impl Drop for Policy {
    fn drop(&mut self) {
        rabbitmqctl(&["clear_policy", &self.0]);
    }
}

/// The broker refusing publishes (a full queue with `reject-publish`: real nacks, no double):
/// with nobody consuming, `rsitrd publish` retries, then fails naming the refused message;
/// when a consumer makes room while it retries, every message goes through, stored once.
#[test]
fn publish_republishes_what_the_broker_nacks() {
    let temp = tempfile::tempdir().unwrap();
    let queue = unique("nack");
    let _policy = Policy::reject_publish_beyond(&queue, 5);
    let mut env = TestEnv::new(temp.path(), &queue);
    let rt = runtime();
    let connection = rt.block_on(common::ingest::broker());

    // Nobody consumes: the queue fills, then publish gives up after its retries.
    let out = dataset_command_line(&env, "publish").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("the broker refused message") && stderr.contains("nack"),
        "{stderr}"
    );
    let retries = stderr
        .matches("publish nacked by the broker: retrying")
        .count();
    assert!(retries >= 5, "{retries} retries: {stderr}");
    let queued = rt.block_on(queue_len(&connection, &queue));
    assert!(0 < queued && queued < 26, "{queued} queued");
    rt.block_on(cleanup(&connection, &queue));

    // Refused again, and a consumer starts meanwhile: publish completes, nothing twice.
    let log = temp.path().join("publish.log");
    let publisher = dataset_command_line(&env, "publish")
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_for(Duration::from_secs(30), "a nacked publish", || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("publish nacked by the broker: retrying")
    });
    env.amqp = true;
    let mut ingest = env.start(&temp.path().join("ingest.log"));
    let out = publisher.wait_with_output().unwrap();
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(out.status.success(), "{log_text}");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON summary");
    assert_eq!(summary["published"], 26, "{summary}");
    wait_for(Duration::from_secs(60), "26 samples", || {
        env.stats()["samples"] == 26
    });
    ingest.stop();
    let stats = env.stats();
    assert_eq!(stats["samples"], 26, "{stats}");
    assert_eq!(stats["captions"], 130 - duplicate_captions(), "{stats}");
    assert_eq!(
        stats["duplicates"], 0,
        "a re-publish is not a second copy: {stats}"
    );
    rt.block_on(cleanup(&connection, &queue));
}
