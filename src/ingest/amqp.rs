//! The AMQP source (`lapin`, RabbitMQ): a durable quorum queue with a dead-letter exchange,
//! manual acks after the store commit is durable, bounded prefetch, reconnection with backoff.
//!
//! Topology (declared if absent): queue `Q` (quorum, `x-dead-letter-exchange = Q.dlx`,
//! `x-delivery-limit`), fanout exchange `Q.dlx`, queue `Q.dead` bound to it. A rejected message
//! is re-published to `Q.dlx` with the reason in the `x-rsitrd-reason` header (publisher
//! confirm awaited), then acked. A message that keeps crashing the consumer is dead-lettered
//! by the broker itself after `delivery_limit` deliveries.
//!
//! Delivery is at least once: after a crash or a broker restart unacked messages come again,
//! and the store makes that harmless (sample ids are content hashes, rejects are keyed by the
//! message body). A dead-lettered message can appear twice in `Q.dead` if the process dies
//! between the dead-letter confirm and the ack.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{RejectKind, Rejection, Validator, report_reject, report_stored};
use crate::config::AmqpSection;
use crate::store::writer::{StoreWriter, WriteError};
use crate::store::{NewSample, OpOutcome, SampleId, StoreOp};

/// Source label of AMQP samples.
pub const SOURCE: &str = "amqp";
/// Header carrying the reject reason on dead-lettered messages.
pub const REASON_HEADER: &str = "x-rsitrd-reason";
/// Header carrying the reject kind (`image`, `captions`, `message`, `too_large`).
pub const KIND_HEADER: &str = "x-rsitrd-kind";
/// First pause before reconnecting; doubles up to `reconnect_max_backoff`.
const INITIAL_BACKOFF: Duration = Duration::from_millis(250);
/// Longest pause between retries of a transiently failing store commit.
const MAX_COMMIT_BACKOFF: Duration = Duration::from_secs(5);
/// How often the queue's depth is read for the metrics.
const QUEUE_DEPTH_EVERY: Duration = Duration::from_secs(5);
/// How often the connection's state is checked: lapin can report a broken connection (its
/// error handler logs "Connection error") without ending the consumer stream, and a source
/// waiting on that stream alone would never reconnect.
const LIVENESS_EVERY: Duration = Duration::from_millis(500);
/// Publishes awaiting their confirm in `rsitrd publish` (bounds memory, keeps the pipe full).
const PUBLISH_WINDOW: usize = 256;
/// Re-publishes of a message the broker nacked before `publish` fails; the waits double from
/// [`PUBLISH_RETRY_FIRST_WAIT`] (0.2 + 0.4 + … + 3.2 = 6.2 s in all).
const PUBLISH_RETRIES: u32 = 5;
const PUBLISH_RETRY_FIRST_WAIT: Duration = Duration::from_millis(200);

/// Why the AMQP source or publisher failed.
#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    #[error("amqp {action}: {source}")]
    Broker {
        action: &'static str,
        source: lapin::Error,
    },
    #[error("the broker refused message {id} (publisher confirm nack)")]
    Nacked { id: String },
    #[error("cannot read {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("the store writer stopped")]
    StoreStopped,
}

fn broker(action: &'static str) -> impl FnOnce(lapin::Error) -> AmqpError {
    move |source| AmqpError::Broker { action, source }
}

/// Longest wait for one broker operation. lapin leaves an operation pending for good once its
/// connection's I/O loop has died: seen in CI, the acks of the deliveries in flight when the
/// broker reset the connection never completed, so the session never finished draining them
/// and the source never reconnected (1 run in 9 of `ingest_broker_restart`).
const BROKER_WAIT: Duration = Duration::from_secs(10);

/// A broker operation that gives up after [`BROKER_WAIT`].
trait WithinBrokerWait<T>: Future<Output = Result<T, lapin::Error>> + Sized {
    fn within(self, action: &'static str) -> impl Future<Output = Result<T, AmqpError>> + Send
    where
        Self: Send,
        T: Send,
    {
        self.within_for(action, BROKER_WAIT)
    }

    fn within_for(
        self,
        action: &'static str,
        wait: Duration,
    ) -> impl Future<Output = Result<T, AmqpError>> + Send
    where
        Self: Send,
        T: Send,
    {
        async move {
            match tokio::time::timeout(wait, self).await {
                Ok(result) => result.map_err(broker(action)),
                Err(_) => Err(AmqpError::Broker {
                    action,
                    source: lapin::Error::from(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no answer within {wait:?}"),
                    )),
                }),
            }
        }
    }
}

impl<T, F: Future<Output = Result<T, lapin::Error>>> WithinBrokerWait<T> for F {}

/// The message format: `{"id"?, "image_b64", "captions": [...], "metadata"?: {...}}`.
/// The base64 text is borrowed from the body when it has no escapes (no copy).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleMessage<'a> {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(borrow)]
    pub image_b64: std::borrow::Cow<'a, str>,
    pub captions: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
}

/// Declares the queue, the dead-letter exchange and the dead-letter queue (idempotent).
pub async fn declare_topology(channel: &Channel, config: &AmqpSection) -> Result<(), AmqpError> {
    let dlx = config.dead_letter_exchange();
    let dead = config.dead_letter_queue();
    channel
        .exchange_declare(
            dlx.as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .within("declare the dead-letter exchange")
        .await?;
    channel
        .queue_declare(
            dead.as_str().into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .within("declare the dead-letter queue")
        .await?;
    channel
        .queue_bind(
            dead.as_str().into(),
            dlx.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .within("bind the dead-letter queue")
        .await?;
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    arguments.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(dlx.as_str().into()),
    );
    arguments.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongInt(config.delivery_limit as i32),
    );
    channel
        .queue_declare(
            config.queue.as_str().into(),
            QueueDeclareOptions::durable(),
            arguments,
        )
        .within(
            "declare the queue (if it exists with other arguments, delete it or use another name)",
        )
        .await?;
    Ok(())
}

async fn connect(config: &AmqpSection) -> Result<Connection, AmqpError> {
    Connection::connect(&config.uri, ConnectionProperties::default())
        .within("connect")
        .await
}

/// What the consumer's handlers share.
struct Context {
    config: AmqpSection,
    validator: Arc<Validator>,
    writer: StoreWriter,
    cancel: CancellationToken,
}

/// Consumes the queue until `cancel` fires, reconnecting with backoff whenever the broker goes
/// away. In-flight deliveries finish (commit, then ack) before it returns.
pub async fn run_amqp(
    config: AmqpSection,
    validator: Arc<Validator>,
    writer: StoreWriter,
    cancel: CancellationToken,
) {
    let context = Arc::new(Context {
        config,
        validator,
        writer,
        cancel: cancel.clone(),
    });
    let mut backoff = INITIAL_BACKOFF;
    // 0 until the first session consumes, and whenever the broker is away: what an alert on a
    // disconnected consumer watches.
    metrics::gauge!("rsitrd_amqp_connected").set(0.0);
    while !cancel.is_cancelled() {
        let started = Instant::now();
        let result = session(&context).await;
        metrics::gauge!("rsitrd_amqp_connected").set(0.0);
        match result {
            Ok(()) => break,
            Err(error) => {
                metrics::counter!("rsitrd_amqp_reconnects_total").increment(1);
                if started.elapsed() > Duration::from_secs(30) {
                    backoff = INITIAL_BACKOFF;
                }
                tracing::warn!(%error, retry_in = ?backoff, "amqp source down: reconnecting");
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(context.config.reconnect_max_backoff);
            }
        }
    }
}

/// One connection's life: returns `Ok` on cancellation, `Err` when the connection broke.
async fn session(context: &Arc<Context>) -> Result<(), AmqpError> {
    let config = &context.config;
    let connection = connect(config).await?;
    let channel = connection.create_channel().within("open a channel").await?;
    declare_topology(&channel, config).await?;
    channel
        .basic_qos(config.prefetch, BasicQosOptions::default())
        .within("set prefetch")
        .await?;
    let dead_letters = connection
        .create_channel()
        .within("open the dead-letter channel")
        .await?;
    dead_letters
        .confirm_select(ConfirmSelectOptions::default())
        .within("enable publisher confirms")
        .await?;
    let mut consumer = channel
        .basic_consume(
            config.queue.as_str().into(),
            format!("rsitrd-{}", std::process::id()).into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .within("consume")
        .await?;
    tracing::info!(queue = %config.queue, prefetch = config.prefetch, "consuming");
    metrics::gauge!("rsitrd_amqp_connected").set(1.0);
    let mut handlers = JoinSet::new();
    let mut depth_tick = tokio::time::interval(QUEUE_DEPTH_EVERY);
    let mut liveness = tokio::time::interval(LIVENESS_EVERY);
    let result = loop {
        tokio::select! {
            () = context.cancel.cancelled() => break Ok(()),
            _ = liveness.tick() => {
                if !connection.status().connected() {
                    break Err(AmqpError::Broker {
                        action: "stay connected",
                        source: lapin::Error::from(std::io::Error::new(
                            std::io::ErrorKind::ConnectionAborted,
                            "the connection to the broker broke",
                        )),
                    });
                }
            }
            _ = depth_tick.tick() => {
                // Ready messages (a passive declare answers with the count): the backlog. A
                // failure means the channel is gone: reconnect.
                let passive = QueueDeclareOptions { passive: true, durable: true, ..Default::default() };
                match channel
                    .queue_declare(config.queue.as_str().into(), passive, FieldTable::default())
                    .within("check the queue")
                    .await
                {
                    Ok(queue) => metrics::gauge!("rsitrd_amqp_queue_ready_messages")
                        .set(f64::from(queue.message_count())),
                    Err(error) => break Err(error),
                }
                metrics::gauge!("rsitrd_amqp_in_flight_deliveries").set(handlers.len() as f64);
            }
            Some(finished) = handlers.join_next(), if !handlers.is_empty() => {
                match finished {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => break Err(error),
                    Err(panic) => tracing::error!(%panic, "delivery handler panicked"),
                }
            }
            delivery = consumer.next() => match delivery {
                Some(Ok(delivery)) => {
                    handlers.spawn(handle(context.clone(), dead_letters.clone(), delivery));
                }
                Some(Err(source)) => break Err(AmqpError::Broker { action: "receive", source }),
                None => break Err(AmqpError::Broker {
                    action: "receive",
                    source: lapin::Error::from(std::io::Error::new(
                        std::io::ErrorKind::ConnectionAborted,
                        "the consumer was cancelled by the broker",
                    )),
                }),
            },
        }
    };
    // Deliveries in flight finish: committed ones are acked, the others stay unacked and come
    // back from the broker.
    while handlers.join_next().await.is_some() {}
    let _ = connection
        .close(200, "rsitrd stopping".into())
        .within("close")
        .await;
    result
}

/// Processes one delivery: validate, commit durably, then ack; or record, dead-letter, ack.
async fn handle(
    context: Arc<Context>,
    dead_letters: Channel,
    mut delivery: lapin::message::Delivery,
) -> Result<(), AmqpError> {
    let fallback_ref = delivery
        .properties
        .message_id()
        .as_ref()
        .map(|id| id.to_string())
        .unwrap_or_else(|| format!("delivery {}", delivery.delivery_tag));
    let checks = {
        let context = context.clone();
        // The body goes to the validation thread and comes back (for dead-lettering): no copy.
        let data = std::mem::take(&mut delivery.data);
        let content_type = delivery
            .properties
            .content_type()
            .as_ref()
            .map(|c| c.to_string());
        let fallback_ref = fallback_ref.clone();
        tokio::task::spawn_blocking(move || {
            let (source_ref, checked) =
                parse_and_validate(&context, &data, content_type.as_deref(), &fallback_ref);
            (data, source_ref, checked)
        })
    };
    let (source_ref, checked) = match checks.await {
        Ok((data, source_ref, checked)) => {
            delivery.data = data;
            (source_ref, checked)
        }
        // Requeued: the broker's delivery limit dead-letters a message that keeps crashing.
        Err(panic) => {
            tracing::error!(input = %fallback_ref, %panic, "validation crashed: requeued");
            delivery
                .nack(BasicNackOptions {
                    multiple: false,
                    requeue: true,
                })
                .within("nack")
                .await?;
            return Ok(());
        }
    };
    match checked {
        Ok(sample) => {
            let Some(outcome) =
                commit_with_retry(&context, StoreOp::Sample(sample), &source_ref).await?
            else {
                return Ok(()); // cancelled: left unacked, the broker redelivers it
            };
            if let OpOutcome::Sample(outcome) = outcome {
                report_stored(SOURCE, &source_ref, &outcome);
            }
        }
        Err(rejection) => {
            let key = SampleId(*blake3::hash(&delivery.data).as_bytes());
            let record = rejection.record(key, SOURCE, &source_ref);
            if commit_with_retry(&context, StoreOp::Reject(record), &source_ref)
                .await?
                .is_none()
            {
                return Ok(());
            }
            report_reject(SOURCE, &source_ref, &rejection);
            dead_letter(&context.config, &dead_letters, &delivery, &rejection).await?;
        }
    }
    // A failed ack (channel gone) means a redelivery, which the store absorbs.
    delivery
        .ack(BasicAckOptions::default())
        .within("ack")
        .await?;
    Ok(())
}

/// Commits, retrying transient store errors with backoff (the delivery stays unacked, so the
/// broker's prefetch bound stops the flow meanwhile); `None` if cancelled first.
async fn commit_with_retry(
    context: &Context,
    op: StoreOp,
    source_ref: &str,
) -> Result<Option<OpOutcome>, AmqpError> {
    let mut backoff = Duration::from_millis(100);
    loop {
        match context.writer.commit(op.clone()).await {
            Ok(outcome) => return Ok(Some(outcome)),
            Err(WriteError::Stopped) => return Err(AmqpError::StoreStopped),
            Err(error) => {
                tracing::warn!(input = source_ref, %error, retry_in = ?backoff, "store commit failed: retrying");
                tokio::select! {
                    () = context.cancel.cancelled() => return Ok(None),
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_COMMIT_BACKOFF);
            }
        }
    }
}

/// Re-publishes a rejected message to the dead-letter exchange with the reason, and waits for
/// the broker's confirm.
async fn dead_letter(
    config: &AmqpSection,
    channel: &Channel,
    delivery: &lapin::message::Delivery,
    rejection: &Rejection,
) -> Result<(), AmqpError> {
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    headers.insert(
        REASON_HEADER.into(),
        AMQPValue::LongString(LongString::from(rejection.reason.as_str())),
    );
    headers.insert(
        KIND_HEADER.into(),
        AMQPValue::LongString(LongString::from(rejection.kind.as_str())),
    );
    headers.insert(
        "x-rsitrd-queue".into(),
        AMQPValue::LongString(LongString::from(config.queue.as_str())),
    );
    let properties = delivery
        .properties
        .clone()
        .with_headers(headers)
        .with_delivery_mode(2);
    let confirm = channel
        .basic_publish(
            config.dead_letter_exchange().as_str().into(),
            "".into(),
            BasicPublishOptions::default(),
            &delivery.data,
            properties,
        )
        .within("dead-letter")
        .await?
        .within("dead-letter confirm")
        .await?;
    if confirm.is_nack() {
        return Err(AmqpError::Nacked {
            id: format!("dead letter of delivery {}", delivery.delivery_tag),
        });
    }
    Ok(())
}

/// Checks a message body; returns the producer's name for it and the sample or the reason.
fn parse_and_validate(
    context: &Context,
    data: &[u8],
    content_type: Option<&str>,
    fallback_ref: &str,
) -> (String, Result<NewSample, Rejection>) {
    let max = context.config.max_message_bytes;
    if data.len() as u64 > max {
        return (
            fallback_ref.into(),
            Err(Rejection::new(
                RejectKind::TooLarge,
                format!(
                    "message is {} bytes, more than amqp.max_message_bytes ({max})",
                    data.len()
                ),
            )),
        );
    }
    if let Some(content_type) = content_type {
        let essence = content_type.split(';').next().unwrap_or("").trim();
        if !essence.eq_ignore_ascii_case("application/json") {
            return (
                fallback_ref.into(),
                Err(Rejection::new(
                    RejectKind::Message,
                    format!("content type `{content_type}` is not application/json"),
                )),
            );
        }
    }
    let message: SampleMessage = match serde_json::from_slice(data) {
        Ok(message) => message,
        Err(error) => {
            return (
                fallback_ref.into(),
                Err(Rejection::new(
                    RejectKind::Message,
                    format!(
                        "invalid message JSON: {error} (expected {{\"id\"?: str, \"image_b64\": str, \"captions\": [str], \"metadata\"?: {{...}}}})"
                    ),
                )),
            );
        }
    };
    let source_ref = message.id.clone().unwrap_or_else(|| fallback_ref.into());
    let image = match base64::engine::general_purpose::STANDARD.decode(message.image_b64.trim()) {
        Ok(image) => image,
        Err(error) => {
            return (
                source_ref,
                Err(Rejection::new(
                    RejectKind::Message,
                    format!("image_b64 is not valid base64: {error}"),
                )),
            );
        }
    };
    let mut metadata = message.metadata.unwrap_or_default();
    if let Some(id) = &message.id {
        metadata
            .entry("message_id")
            .or_insert_with(|| serde_json::Value::String(id.clone()));
    }
    let result = context.validator.validate(
        image,
        message.captions,
        metadata,
        &SOURCE.to_string(),
        &source_ref,
    );
    (source_ref, result)
}

/// Builds the JSON body of a sample message.
pub fn encode_message(
    id: &str,
    image: &[u8],
    captions: &[String],
    metadata: serde_json::Map<String, serde_json::Value>,
) -> Vec<u8> {
    let message = SampleMessage {
        id: Some(id.to_string()),
        image_b64: base64::engine::general_purpose::STANDARD
            .encode(image)
            .into(),
        captions: captions.to_vec(),
        metadata: Some(metadata),
    };
    serde_json::to_vec(&message).expect("a message serializes")
}

/// Properties of a sample message: JSON, persistent, with its id.
pub fn message_properties(id: &str) -> BasicProperties {
    BasicProperties::default()
        .with_content_type(ShortString::from("application/json"))
        .with_delivery_mode(2)
        .with_message_id(ShortString::from(truncate_utf8(id, 255)))
}

fn truncate_utf8(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// One message for [`publish_all`].
pub struct Outgoing {
    pub id: String,
    pub body: Vec<u8>,
}

/// Publishes messages to the configured queue with publisher confirms (a window of
/// [`PUBLISH_WINDOW`] in flight); returns once every one is confirmed. `on_confirm` is
/// called once per confirmed message.
pub async fn publish_all(
    config: &AmqpSection,
    messages: impl Iterator<Item = Result<Outgoing, AmqpError>>,
    mut on_confirm: impl FnMut(),
) -> Result<usize, AmqpError> {
    let connection = connect(config).await?;
    let channel = connection.create_channel().within("open a channel").await?;
    declare_topology(&channel, config).await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .within("enable publisher confirms")
        .await?;
    let mut pending = std::collections::VecDeque::new();
    let mut published = 0;
    let mut messages = messages.peekable();
    while messages.peek().is_some() || !pending.is_empty() {
        if pending.len() < PUBLISH_WINDOW
            && let Some(message) = messages.next()
        {
            let message = message?;
            let confirm = publish_one(&channel, config, &message).await?;
            pending.push_back((message, confirm));
            continue;
        }
        let (message, mut confirm) = pending.pop_front().expect("non-empty");
        // A nack means the broker could not take it this time (e.g. a quorum queue still
        // electing its leader): publish it again, a few times, before giving up.
        let mut attempt = 0;
        while !confirmed(confirm).await? {
            attempt += 1;
            if attempt > PUBLISH_RETRIES {
                return Err(AmqpError::Nacked { id: message.id });
            }
            tracing::warn!(id = %message.id, attempt, "publish nacked by the broker: retrying");
            tokio::time::sleep(PUBLISH_RETRY_FIRST_WAIT * (1 << (attempt - 1))).await;
            confirm = publish_one(&channel, config, &message).await?;
        }
        published += 1;
        on_confirm();
    }
    let _ = connection
        .close(200, "published".into())
        .within("close")
        .await;
    Ok(published)
}

/// Whether the broker acked the publish.
async fn confirmed(confirm: lapin::PublisherConfirm) -> Result<bool, AmqpError> {
    let confirmation = confirm.within("publisher confirm").await?;
    Ok(!confirmation.is_nack())
}

async fn publish_one(
    channel: &Channel,
    config: &AmqpSection,
    message: &Outgoing,
) -> Result<lapin::PublisherConfirm, AmqpError> {
    channel
        .basic_publish(
            "".into(),
            config.queue.as_str().into(),
            BasicPublishOptions::default(),
            &message.body,
            message_properties(&message.id),
        )
        .within("publish")
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An operation lapin never completes (its connection's I/O loop died) fails after the
    /// wait, naming the action, instead of holding the session for good.
    #[test]
    fn a_broker_operation_that_never_completes_fails_after_the_wait() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        runtime.block_on(async {
            let never = std::future::pending::<Result<(), lapin::Error>>();
            let started = Instant::now();
            let error = never
                .within_for("ack", Duration::from_millis(50))
                .await
                .unwrap_err();
            assert!(started.elapsed() >= Duration::from_millis(50));
            assert!(
                matches!(&error, AmqpError::Broker { action: "ack", .. }),
                "{error}"
            );
            assert!(error.to_string().contains("no answer within"), "{error}");
            let answered = async { Ok::<_, lapin::Error>(7) }
                .within_for("ack", Duration::from_millis(50))
                .await;
            assert_eq!(answered.unwrap(), 7);
        });
    }
}
