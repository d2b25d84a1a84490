//! Group commit: one thread owns the store's writes and commits whatever sources have queued
//! since the last commit in one transaction (one fsync for many samples), then answers each
//! caller. Sources await the answer before they acknowledge anything.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::{OpOutcome, Store, StoreError, StoreOp};

/// Queued operations before senders wait: bounds memory (each holds an image) while letting
/// hundreds of deliveries share one commit.
pub const WRITE_QUEUE_CAPACITY: usize = 512;
/// Largest group commit.
pub const MAX_BATCH: usize = 256;

struct Job {
    op: StoreOp,
    reply: oneshot::Sender<Result<OpOutcome, Arc<StoreError>>>,
}

/// Handle to the writer thread; cheap to clone. The thread ends when every handle is dropped.
#[derive(Clone)]
pub struct StoreWriter {
    jobs: mpsc::Sender<Job>,
}

/// The writer thread is gone (the process is shutting down).
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Store(Arc<StoreError>),
    #[error("the store writer has stopped")]
    Stopped,
}

impl WriteError {
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Store(error) => error.is_retryable(),
            Self::Stopped => false,
        }
    }
}

impl StoreWriter {
    /// Starts the writer thread over `store`.
    pub fn spawn(store: Arc<Store>) -> Self {
        let (jobs, receiver) = mpsc::channel(WRITE_QUEUE_CAPACITY);
        std::thread::Builder::new()
            .name("rsitrd-store-writer".into())
            .spawn(move || writer_loop(&store, receiver))
            .expect("spawn the store writer thread");
        Self { jobs }
    }

    /// Commits one operation (batched with others queued at the same time) and returns once it
    /// is durable.
    pub async fn commit(&self, op: StoreOp) -> Result<OpOutcome, WriteError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job { op, reply })
            .await
            .map_err(|_| WriteError::Stopped)?;
        answer
            .await
            .map_err(|_| WriteError::Stopped)?
            .map_err(WriteError::Store)
    }

    /// [`Self::commit`] for threads outside the async runtime.
    pub fn commit_blocking(&self, op: StoreOp) -> Result<OpOutcome, WriteError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .blocking_send(Job { op, reply })
            .map_err(|_| WriteError::Stopped)?;
        answer
            .blocking_recv()
            .map_err(|_| WriteError::Stopped)?
            .map_err(WriteError::Store)
    }

    /// Commits many operations from a blocking thread; queues them all before waiting so they
    /// share commits.
    pub fn commit_all_blocking(&self, ops: Vec<StoreOp>) -> Vec<Result<OpOutcome, WriteError>> {
        let mut answers = Vec::with_capacity(ops.len());
        for op in ops {
            let (reply, answer) = oneshot::channel();
            if self.jobs.blocking_send(Job { op, reply }).is_err() {
                answers.push(None);
            } else {
                answers.push(Some(answer));
            }
        }
        answers
            .into_iter()
            .map(|answer| match answer {
                None => Err(WriteError::Stopped),
                Some(answer) => answer
                    .blocking_recv()
                    .map_err(|_| WriteError::Stopped)?
                    .map_err(WriteError::Store),
            })
            .collect()
    }
}

fn writer_loop(store: &Store, mut receiver: mpsc::Receiver<Job>) {
    while let Some(first) = receiver.blocking_recv() {
        let mut jobs = vec![first];
        // Let concurrent producers join this commit: a short grace period only when more work
        // is evidently arriving.
        while jobs.len() < MAX_BATCH {
            match receiver.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => {
                    if jobs.len() > 1 {
                        std::thread::sleep(Duration::from_micros(200));
                        match receiver.try_recv() {
                            Ok(job) => jobs.push(job),
                            Err(_) => break,
                        }
                    } else {
                        break;
                    }
                }
            }
        }
        let (ops, replies): (Vec<StoreOp>, Vec<_>) =
            jobs.into_iter().map(|job| (job.op, job.reply)).unzip();
        let started = std::time::Instant::now();
        let result = store.commit_batch(&ops);
        tracing::debug!(
            batch = ops.len(),
            elapsed_us = started.elapsed().as_micros() as u64,
            "group commit"
        );
        metrics::histogram!("rsitrd_store_commit_seconds").record(started.elapsed().as_secs_f64());
        match result {
            Ok(outcomes) => {
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(Ok(outcome));
                }
            }
            Err(error) => {
                tracing::warn!(%error, batch = ops.len(), "store commit failed");
                let error = Arc::new(error);
                for reply in replies {
                    let _ = reply.send(Err(error.clone()));
                }
            }
        }
    }
}
