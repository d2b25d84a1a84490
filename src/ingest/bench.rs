//! `rsitrd bench-ingest`: sustained AMQP → durable store throughput and publish → commit
//! latency with real images, next to two baselines measured in the same run: the broker alone
//! (publish, consume, ack; no work) and validation alone (full image decode, no broker/store).
//!
//! Images are the dataset's real files made unique per message (a JPEG comment segment, or
//! trailing bytes for TIFF/PNG, which decoders ignore), so every message is a new sample of
//! realistic size and decode cost.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use rayon::prelude::*;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::Validator;
use super::amqp::{AmqpError, Outgoing, encode_message, publish_all, run_amqp};
use crate::config::AmqpSection;
use crate::data::Dataset;
use crate::store::writer::StoreWriter;
use crate::store::{SplitPolicy, Store};

/// What `bench-ingest` measured.
#[derive(Debug, Clone, Serialize)]
pub struct IngestBenchReport {
    pub messages: usize,
    pub mean_image_bytes: f64,
    pub prefetch: u16,
    /// Broker alone: consume + ack of pre-published messages, no validation, no store.
    pub broker_only_per_s: f64,
    /// Validation alone: full decode of every image on all cores.
    pub validate_only_per_s: f64,
    /// The real pipeline: consume, validate, group-commit (fsync), ack.
    pub ingest_per_s: f64,
    /// Image bytes made durable per second by the pipeline.
    pub ingest_mb_per_s: f64,
    /// Disk baseline: one 256 MiB sequential write + fdatasync in the store's directory.
    pub disk_seq_write_mb_per_s: f64,
    /// Publish → durably committed and visible, at `latency_rate` messages/s.
    pub latency_rate: f64,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub latency_max_ms: f64,
}

/// The dataset's images, each made unique `count` times in round robin.
fn unique_images(dataset: &Dataset, count: usize) -> std::io::Result<Vec<(Vec<u8>, Vec<String>)>> {
    let originals: Vec<(Vec<u8>, Vec<String>)> = dataset
        .images
        .iter()
        .map(|image| {
            Ok((
                std::fs::read(dataset.path_of(image))?,
                image.captions.clone(),
            ))
        })
        .collect::<std::io::Result<_>>()?;
    Ok((0..count)
        .map(|i| {
            let (bytes, captions) = &originals[i % originals.len()];
            (uniquify(bytes, i), captions.clone())
        })
        .collect())
}

/// Same pixels, different bytes: a JPEG COM segment after SOI, or trailing bytes.
fn uniquify(bytes: &[u8], index: usize) -> Vec<u8> {
    let tag = format!("rsitrd-bench {index:012}");
    if bytes.starts_with(&[0xFF, 0xD8]) {
        let length = (tag.len() + 2) as u16;
        let mut out = Vec::with_capacity(bytes.len() + tag.len() + 4);
        out.extend_from_slice(&bytes[..2]);
        out.extend_from_slice(&[0xFF, 0xFE]);
        out.extend_from_slice(&length.to_be_bytes());
        out.extend_from_slice(tag.as_bytes());
        out.extend_from_slice(&bytes[2..]);
        out
    } else {
        let mut out = bytes.to_vec();
        out.extend_from_slice(tag.as_bytes());
        out
    }
}

fn messages(images: &[(Vec<u8>, Vec<String>)], prefix: &str) -> Vec<Outgoing> {
    images
        .par_iter()
        .enumerate()
        .map(|(i, (bytes, captions))| {
            let id = format!("{prefix}-{i}");
            let body = encode_message(&id, bytes, captions, serde_json::Map::new());
            Outgoing { id, body }
        })
        .collect()
}

async fn delete_topology(config: &AmqpSection) {
    if let Ok(connection) = Connection::connect(&config.uri, ConnectionProperties::default()).await
        && let Ok(channel) = connection.create_channel().await
    {
        for queue in [config.queue.clone(), config.dead_letter_queue()] {
            let _ = channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        let _ = channel
            .exchange_delete(
                config.dead_letter_exchange().as_str().into(),
                lapin::options::ExchangeDeleteOptions::default(),
            )
            .await;
    }
}

/// Consumes `count` messages with no work but the ack; messages/s.
async fn broker_only(config: &AmqpSection, count: usize) -> Result<f64, AmqpError> {
    let broker = |action| move |source| AmqpError::Broker { action, source };
    let connection = Connection::connect(&config.uri, ConnectionProperties::default())
        .await
        .map_err(broker("connect"))?;
    let channel = connection
        .create_channel()
        .await
        .map_err(broker("channel"))?;
    channel
        .basic_qos(config.prefetch, BasicQosOptions::default())
        .await
        .map_err(broker("qos"))?;
    let mut consumer = channel
        .basic_consume(
            config.queue.as_str().into(),
            "rsitrd-bench".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(broker("consume"))?;
    let started = Instant::now();
    for _ in 0..count {
        let delivery = consumer
            .next()
            .await
            .expect("consumer open")
            .map_err(broker("receive"))?;
        delivery
            .ack(BasicAckOptions::default())
            .await
            .map_err(broker("ack"))?;
    }
    let rate = count as f64 / started.elapsed().as_secs_f64();
    let _ = connection.close(200, "bench".into()).await;
    Ok(rate)
}

/// Runs the whole benchmark against the broker in `amqp` (a throw-away queue is used and
/// deleted), with a throw-away store under `work_dir`.
pub fn run_ingest_bench(
    amqp: &AmqpSection,
    validator: Arc<Validator>,
    dataset: &Dataset,
    count: usize,
    latency_rate: f64,
    latency_messages: usize,
    work_dir: &Path,
) -> anyhow::Result<IngestBenchReport> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut config = amqp.clone();
    config.queue = format!("rsitrd.bench.{}", std::process::id());
    let images = unique_images(dataset, count + latency_messages)?;
    let mean_image_bytes =
        images.iter().map(|(b, _)| b.len()).sum::<usize>() as f64 / images.len() as f64;
    let (throughput_images, latency_images) = images.split_at(count);

    // Baseline 1: validation alone (decode on all cores).
    let source = "bench".to_string();
    let started = Instant::now();
    let rejected = throughput_images
        .par_iter()
        .filter(|(bytes, captions)| {
            validator
                .validate(
                    bytes.clone(),
                    captions.clone(),
                    Default::default(),
                    &source,
                    "bench",
                )
                .is_err()
        })
        .count();
    anyhow::ensure!(
        rejected == 0,
        "{rejected} benchmark images failed validation"
    );
    let validate_only_per_s = count as f64 / started.elapsed().as_secs_f64();

    runtime.block_on(delete_topology(&config));
    let outgoing = messages(throughput_images, "t");
    // Baseline 2: the broker alone.
    runtime.block_on(publish_all(
        &config,
        outgoing.iter().map(|m| Ok(clone(m))),
        || {},
    ))?;
    let broker_only_per_s = runtime.block_on(broker_only(&config, count))?;

    // The pipeline: pre-published messages, then the real consumer into a fresh store.
    runtime.block_on(publish_all(&config, outgoing.into_iter().map(Ok), || {}))?;
    let store_dir = work_dir.join(format!("bench-store-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&store_dir);
    let store = Arc::new(Store::open(
        &store_dir,
        SplitPolicy {
            val_fraction: 0.1,
            seed: 1,
        },
    )?);
    let writer = StoreWriter::spawn(store.clone());
    let cancel = CancellationToken::new();
    let consumer = runtime.spawn(run_amqp(
        config.clone(),
        validator.clone(),
        writer,
        cancel.clone(),
    ));
    let started = Instant::now();
    while (store.stats()?.samples as usize) < count {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "ingestion did not finish in 10 minutes"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let ingest_seconds = started.elapsed().as_secs_f64();
    let ingest_per_s = count as f64 / ingest_seconds;
    let ingest_mb_per_s = mean_image_bytes * count as f64 / ingest_seconds / 1e6;
    let disk_seq_write_mb_per_s = disk_baseline(work_dir)?;

    // Latency at a steady rate below capacity: publish time → visible in the store.
    let cursor = store.stats()?.last_seq;
    let sent: Arc<std::sync::Mutex<HashMap<String, Instant>>> = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    let poller = {
        let (store, sent, done) = (store.clone(), sent.clone(), done.clone());
        std::thread::spawn(move || -> anyhow::Result<Vec<f64>> {
            let mut cursor = cursor;
            let mut latencies = Vec::new();
            while latencies.len() < latency_messages && !done.load(Ordering::SeqCst) {
                let page = store.page_since(cursor, 1000)?;
                cursor = page.next_cursor;
                for record in page.records {
                    let now = Instant::now();
                    let id = record.source_ref.clone();
                    if let Some(at) = sent.lock().expect("lock").get(&id) {
                        latencies.push((now - *at).as_secs_f64() * 1000.0);
                    }
                }
                std::thread::sleep(Duration::from_micros(250));
            }
            Ok(latencies)
        })
    };
    let latency_outgoing = messages(latency_images, "l");
    let interval = Duration::from_secs_f64(1.0 / latency_rate);
    let start = Instant::now();
    runtime.block_on(async {
        let mut index = 0;
        let iterator = latency_outgoing.into_iter().map(|message| {
            // Pace the publisher: message i leaves at start + i × interval.
            let due = start + interval * index;
            index += 1;
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            sent.lock()
                .expect("lock")
                .insert(message.id.clone(), Instant::now());
            Ok(message)
        });
        publish_all(&config, iterator, || {}).await
    })?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !poller.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    done.store(true, Ordering::SeqCst);
    let mut latencies = poller.join().expect("poller thread")?;
    cancel.cancel();
    let _ = runtime.block_on(consumer);
    runtime.block_on(delete_topology(&config));
    drop(store);
    let _ = std::fs::remove_dir_all(&store_dir);
    anyhow::ensure!(!latencies.is_empty(), "no latency samples");
    latencies.sort_by(f64::total_cmp);
    let percentile = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize];
    Ok(IngestBenchReport {
        messages: count,
        mean_image_bytes,
        prefetch: config.prefetch,
        broker_only_per_s,
        validate_only_per_s,
        ingest_per_s,
        ingest_mb_per_s,
        disk_seq_write_mb_per_s,
        latency_rate,
        latency_p50_ms: percentile(0.5),
        latency_p99_ms: percentile(0.99),
        latency_max_ms: *latencies.last().expect("non-empty"),
    })
}

/// MB/s of one 256 MiB sequential write made durable (fdatasync), in `dir`.
fn disk_baseline(dir: &Path) -> std::io::Result<f64> {
    use std::io::Write;
    let path = dir.join(format!("bench-disk-{}", std::process::id()));
    let block = vec![0x5au8; 1 << 20];
    let started = Instant::now();
    {
        let mut file = std::fs::File::create(&path)?;
        for _ in 0..256 {
            file.write_all(&block)?;
        }
        file.sync_data()?;
    }
    let rate = 256.0 * (1 << 20) as f64 / started.elapsed().as_secs_f64() / 1e6;
    std::fs::remove_file(&path)?;
    Ok(rate)
}

fn clone(message: &Outgoing) -> Outgoing {
    Outgoing {
        id: message.id.clone(),
        body: message.body.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniquified_images_differ_and_keep_their_format() {
        let jpeg = [0xFF, 0xD8, 0xFF, 0xE0, 1, 2, 3];
        let a = uniquify(&jpeg, 1);
        let b = uniquify(&jpeg, 2);
        assert_ne!(a, b);
        assert!(a.starts_with(&[0xFF, 0xD8, 0xFF, 0xFE]));
        assert!(a.ends_with(&[0xFF, 0xE0, 1, 2, 3]));
        let tiff = b"II*\0rest";
        assert!(uniquify(tiff, 3).starts_with(tiff));
    }
}
