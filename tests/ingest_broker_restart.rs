//! The broker restarts in the middle of ingestion: nothing lost, nothing duplicated, the
//! consumer reconnects by itself. Its own test binary: it stops the shared RabbitMQ for a
//! moment, and cargo runs test binaries one after another.

mod common;

use std::time::Duration;

use base64::Engine;
use common::ingest::{TestEnv, cleanup, queue_len, rabbitmqctl, synthetic_png, unique, wait_for};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use rsitrd::config::AmqpSection;
use rsitrd::ingest::amqp::{declare_topology, message_properties};

/// Starts the broker application again even if the test fails half-way.
struct RestartGuard;

impl Drop for RestartGuard {
    fn drop(&mut self) {
        let _ = rabbitmqctl(&["start_app"]);
    }
}

async fn publish(queue: &str, range: std::ops::Range<u32>) {
    let connection = common::ingest::broker().await;
    let channel = connection.create_channel().await.unwrap();
    let config = AmqpSection {
        queue: queue.into(),
        ..AmqpSection::default()
    };
    declare_topology(&channel, &config).await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for i in range {
        let body = serde_json::to_vec(&serde_json::json!({
            "image_b64": base64::engine::general_purpose::STANDARD.encode(synthetic_png(50_000 + i, 32)),
            "captions": [format!("tile {i}")],
        }))
        .unwrap();
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &body,
                message_properties(&format!("m{i}")),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack());
    }
    let _ = connection.close(200, "done".into()).await;
}

#[test]
fn broker_restart_during_ingestion_loses_and_duplicates_nothing() {
    // `.ci/run` starts the local broker; a test that cannot control it must fail, not pass.
    assert!(
        rabbitmqctl(&["status"]),
        "rabbitmqctl cannot control the local broker (127.0.0.1:5672): this test stops and restarts it"
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let temp = tempfile::tempdir().unwrap();
    let queue = unique("restart");
    let mut env = TestEnv::new(temp.path(), &queue);
    env.amqp = true;
    env.extra = vec![("RSITRD__AMQP__PREFETCH".into(), "4".into())];
    let first = 2500;
    rt.block_on(publish(&queue, 0..first));
    let mut ingest = env.start(&temp.path().join("ingest.log"));
    let _guard = RestartGuard;
    std::thread::sleep(Duration::from_millis(150));
    assert!(rabbitmqctl(&["stop_app"]), "stop the broker");
    let stats = env.stats();
    let at_stop = stats["samples"].as_u64().unwrap();
    println!("{at_stop} of {first} stored when the broker stopped");
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        ingest.alive(),
        "the ingester survives the broker going away"
    );
    assert!(rabbitmqctl(&["start_app"]), "start the broker");
    wait_for(Duration::from_secs(60), "the broker back", || {
        std::net::TcpStream::connect("127.0.0.1:5672").is_ok()
    });
    // New messages after the restart are consumed too.
    rt.block_on(publish(&queue, first..first + 100));
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while env.stats()["samples"] != first + 100 {
        assert!(
            std::time::Instant::now() < deadline,
            "not every message stored: {}\n{}",
            env.stats(),
            ingest.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let connection = rt.block_on(common::ingest::broker());
    ingest.stop();
    // Unacked deliveries go back to the queue when the consumer leaves: empty means all acked.
    assert_eq!(
        rt.block_on(queue_len(&connection, &queue)),
        0,
        "queue empty after the stop"
    );
    let stats = env.stats();
    assert_eq!(stats["samples"], first + 100, "{stats}");
    assert_eq!(stats["captions"], first + 100, "{stats}");
    assert_eq!(stats["rejected"], 0, "{stats}");
    assert!(
        at_stop < u64::from(first),
        "the broker must stop mid-ingestion ({at_stop} of {first} already stored)"
    );
    assert!(
        ingest.log_text().contains("reconnecting"),
        "the consumer reconnected"
    );
    rt.block_on(cleanup(&connection, &queue));
}
