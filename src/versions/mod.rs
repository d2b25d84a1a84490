//! The one owner of the live version, and the index worker.
//!
//! A single blocking task owns everything that says which adapter version serves: the
//! `ArcSwap` of the serving model, the ledger's live pointer, versions and promotion rows,
//! the index's live pointer and which index versions exist. Promotion, rollback and dropping
//! old versions happen only here, in order, fed by a bounded command channel (as qdrant's
//! update handler); HTTP handlers and the trainer send a [`Command`] and await the reply.
//!
//! Between commands the same task keeps the index fresh: new samples are embedded with the
//! live adapter (and, while a promotion runs, with the candidate too: the dual write), and a
//! promotion re-embeds the corpus up to the cursor where it began, one batch per freshness
//! batch, so it ends in bounded time whatever the arrival rate.
//!
//! Every change is committed to the ledger first (the truth), then the serving model is
//! swapped, then the index's live pointer follows (repaired from the ledger at start if a crash
//! fell in between).

use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use burn::prelude::*;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::index::VectorIndex;
use crate::indexer::embed_points;
use crate::model::Embedder;
use crate::model::kernels::ModelBackend;
use crate::model::preprocess::ImageLimits;
use crate::serve::{Backbone, Live, ServingModel};
use crate::store::ledger::{
    DaemonLedger, LedgerChange, LivePointer, Promotion, SwitchRecord, TrainingProgress,
    VersionRecord,
};
use crate::store::{Store, StoreError, now_ms};

pub mod legacy;

/// Commands waiting for the owner; senders beyond it are told the owner is busy.
const COMMAND_QUEUE: usize = 16;
/// Commands handled between two batches of embedding work.
const COMMANDS_PER_TURN: usize = 8;
/// Longest idle wait (also how often cancellation is checked).
const IDLE_POLL: Duration = Duration::from_millis(50);
/// Entries of the live history kept (rollback and `keep_versions` look at the newest).
const HISTORY: usize = 256;

/// Why a version change was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum VersionError {
    /// Refused in the current state (HTTP 409).
    #[error("{0}")]
    Conflict(String),
    /// The owner's queue is full or it is stopping (HTTP 503).
    #[error("{0}")]
    Busy(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Index(#[from] crate::index::IndexError),
    #[error(transparent)]
    Serve(#[from] crate::serve::ServeError),
    #[error(transparent)]
    Migrate(#[from] legacy::MigrateError),
    #[error("{0}")]
    Other(String),
}

/// What the owner can be asked to do.
pub enum Command<B: Backend> {
    /// A finished training run: its ledger rows (version, run record, training progress,
    /// slice, evaluations), committed together, and the candidate when the gate promoted it.
    Candidate {
        version: u64,
        /// The live version the candidate was trained from.
        parent: u64,
        changes: Vec<LedgerChange>,
        promote: Option<Box<Embedder<B>>>,
        reply: oneshot::Sender<Result<(), VersionError>>,
    },
    /// Serve a kept earlier version (`None`: the previous one).
    Rollback {
        to: Option<u64>,
        reply: oneshot::Sender<Result<u64, VersionError>>,
    },
    /// Answered between two turns: every change begun before it is complete (in the ledger,
    /// the serving model and the index).
    Ping {
        reply: oneshot::Sender<Result<(), VersionError>>,
    },
    /// `POST /v1/train` (true) or the trainer finding nothing to train (false).
    TrainingRequest {
        requested: bool,
        reply: oneshot::Sender<Result<(), VersionError>>,
    },
}

/// Sends commands to the owner.
pub struct Handle<B: Backend> {
    sender: SyncSender<Command<B>>,
}

impl<B: ModelBackend> Clone for Handle<B> {
    fn clone(&self) -> Self {
        Self {
            sender: self.sender.clone(),
        }
    }
}

impl<B: ModelBackend> Handle<B> {
    fn try_send(&self, command: Command<B>) -> Result<(), VersionError> {
        self.sender.try_send(command).map_err(|error| match error {
            TrySendError::Full(_) => VersionError::Busy(
                "the version owner has too many commands queued; try again".into(),
            ),
            TrySendError::Disconnected(_) => VersionError::Busy("the daemon is stopping".into()),
        })
    }

    async fn ask<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<T, VersionError>>) -> Command<B>,
    ) -> Result<T, VersionError> {
        let (reply, answer) = oneshot::channel();
        self.try_send(command(reply))?;
        answer
            .await
            .map_err(|_| VersionError::Busy("the daemon is stopping".into()))?
    }

    fn ask_blocking<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<T, VersionError>>) -> Command<B>,
    ) -> Result<T, VersionError> {
        let (reply, answer) = oneshot::channel();
        // The trainer waits for room rather than failing a finished run.
        self.sender
            .send(command(reply))
            .map_err(|_| VersionError::Busy("the daemon is stopping".into()))?;
        answer
            .blocking_recv()
            .map_err(|_| VersionError::Busy("the daemon is stopping".into()))?
    }

    pub async fn rollback(&self, to: Option<u64>) -> Result<u64, VersionError> {
        self.ask(|reply| Command::Rollback { to, reply }).await
    }

    pub async fn request_training(&self) -> Result<(), VersionError> {
        self.ask(|reply| Command::TrainingRequest {
            requested: true,
            reply,
        })
        .await
    }

    /// From a blocking thread: clears a training request that found nothing to train.
    pub fn clear_training_request(&self) -> Result<(), VersionError> {
        self.ask_blocking(|reply| Command::TrainingRequest {
            requested: false,
            reply,
        })
    }

    /// From a blocking thread (the trainer): hands over a finished run trained from
    /// `parent`. A promotion is refused (409, nothing committed) if `parent` no longer serves:
    /// the run is redone from the version that does.
    pub fn submit_candidate(
        &self,
        version: u64,
        parent: u64,
        changes: Vec<LedgerChange>,
        promote: Option<Embedder<B>>,
    ) -> Result<(), VersionError> {
        self.ask_blocking(|reply| Command::Candidate {
            version,
            parent,
            changes,
            promote: promote.map(Box::new),
            reply,
        })
    }

    /// From a blocking thread: waits until the owner is between turns (nothing half done).
    pub fn ping_blocking(&self) -> Result<(), VersionError> {
        self.ask_blocking(|reply| Command::Ping { reply })
    }

    /// From a blocking thread: rollback (tests and tools that drive the owner directly).
    pub fn rollback_blocking(&self, to: Option<u64>) -> Result<u64, VersionError> {
        self.ask_blocking(|reply| Command::Rollback { to, reply })
    }
}

/// The ledger's daemon rows, migrated from `state.json` or created on the first start.
pub fn load_or_init(store: &Store, config: &Config) -> Result<DaemonLedger, VersionError> {
    if let Some(ledger) = store.daemon_ledger()? {
        return Ok(ledger);
    }
    if let Some(ledger) = legacy::migrate(store, &config.store.dir.join("state.json"))? {
        return Ok(ledger);
    }
    let (version, adapter) = match &config.model.adapter {
        Some(path) => (
            crate::model::weights::read_adapter_meta(path)
                .map_err(|e| VersionError::Other(e.to_string()))?
                .version,
            Some(legacy::adapter_file(path)?),
        ),
        None => (0, None),
    };
    let now = now_ms();
    let ledger = DaemonLedger {
        live: LivePointer {
            version,
            history: vec![version],
            embed_cursor: 0,
        },
        training: TrainingProgress {
            next_version: version + 1,
            trained_upto: 0,
            last_train_ms: now,
            best: None,
            requested: false,
        },
        promotion: None,
        slice: None,
    };
    store.apply(&[
        LedgerChange::Version(
            version,
            VersionRecord {
                adapter,
                parent: None,
                metrics: Default::default(),
                created_ms: now,
                indexed_cursor: 0,
                decision: "initial".into(),
            },
        ),
        LedgerChange::Live(ledger.live.clone()),
        LedgerChange::Training(ledger.training.clone()),
    ])?;
    Ok(ledger)
}

/// Which version a rollback serves: `to`, or the newest kept one before the live one. The
/// same rule for the running daemon and for `rsitrd rollback` with the daemon stopped.
pub fn rollback_target(
    ledger: &DaemonLedger,
    to: Option<u64>,
    keep: usize,
    index_versions: &[u64],
) -> Result<u64, VersionError> {
    if ledger.promotion.is_some() {
        return Err(VersionError::Conflict(
            "a promotion is in progress; try again when it has finished".into(),
        ));
    }
    let kept = ledger.live.kept_versions(keep);
    let target = match to {
        Some(version) => version,
        None => *kept
            .iter()
            .find(|&&v| v != ledger.live.version)
            .ok_or_else(|| {
                VersionError::Conflict("no earlier version is kept (index.keep_versions)".into())
            })?,
    };
    if target != ledger.live.version && !index_versions.contains(&target) {
        return Err(VersionError::Conflict(format!(
            "version {target} is not kept (kept: {kept:?})"
        )));
    }
    Ok(target)
}

/// The ledger rows of a switch of the live version to `to`, its index complete up to
/// `cursor`: both versions' records, the live pointer, and the end of a promotion.
pub fn switch_changes(
    store: &Store,
    live: &LivePointer,
    to: u64,
    cursor: u64,
    kind: &str,
) -> Result<(Vec<LedgerChange>, LivePointer, VersionRecord), VersionError> {
    let mut changes = vec![LedgerChange::Switch(SwitchRecord {
        at_ms: crate::store::now_ms(),
        from: live.version,
        to,
        kind: kind.to_string(),
    })];
    if let Some(mut old) = store.version(live.version)? {
        old.indexed_cursor = live.embed_cursor;
        changes.push(LedgerChange::Version(live.version, old));
    }
    let mut record = store
        .version(to)?
        .ok_or_else(|| VersionError::Conflict(format!("unknown version {to}")))?;
    record.indexed_cursor = cursor;
    changes.push(LedgerChange::Version(to, record.clone()));
    let mut history = live.history.clone();
    history.push(to);
    if history.len() > HISTORY {
        history.drain(..history.len() - HISTORY);
    }
    let pointer = LivePointer {
        version: to,
        history,
        embed_cursor: cursor,
    };
    changes.push(LedgerChange::Live(pointer.clone()));
    changes.push(LedgerChange::Promotion(None));
    Ok((changes, pointer, record))
}

/// Rollback with the daemon stopped: the same rule and ledger rows as the running daemon's;
/// the next start serves the version and catches its index up.
pub fn offline_rollback(
    store: &Store,
    index: &dyn VectorIndex,
    config: &Config,
    to: Option<u64>,
) -> Result<u64, VersionError> {
    let ledger = load_or_init(store, config)?;
    let target = rollback_target(&ledger, to, config.index.keep_versions, &index.versions()?)?;
    if target == ledger.live.version {
        return Ok(target);
    }
    let record = store
        .version(target)?
        .ok_or_else(|| VersionError::Conflict(format!("unknown version {target}")))?;
    let (changes, _, _) = switch_changes(
        store,
        &ledger.live,
        target,
        record.indexed_cursor,
        "rollback",
    )?;
    store.apply(&changes)?;
    index.set_live(target)?;
    Ok(target)
}

/// The owner, the handle to send it commands, and the receiving end its [`Owner::run`]
/// takes.
pub type Started<B> = (Owner<B>, Handle<B>, Receiver<Command<B>>);

/// The owner's state. Build it with [`Owner::start`], run it with [`Owner::run`] on a
/// blocking thread.
pub struct Owner<B: Backend> {
    store: Arc<Store>,
    index: Arc<dyn VectorIndex>,
    backbone: Arc<Backbone<B>>,
    live: Arc<Live<B>>,
    /// The daemon rows as last committed (this task is their only writer).
    ledger: DaemonLedger,
    promotion: Option<(Promotion, Embedder<B>)>,
    /// The index's live pointer failed to follow the ledger: retried every turn.
    index_live_stale: bool,
    /// The index agrees with the ledger (see `prepare_index`); until then no embedding work.
    index_prepared: bool,
    keep_versions: usize,
    embed_batch: usize,
    limits: ImageLimits,
    cancel: CancellationToken,
}

impl<B: ModelBackend> Owner<B> {
    /// Reads (or migrates) the ledger, loads the live adapter on the shared backbone, makes
    /// the index agree with the ledger, and resumes a promotion in progress.
    pub fn start(
        config: &Config,
        store: Arc<Store>,
        index: Arc<dyn VectorIndex>,
        backbone: Arc<Backbone<B>>,
        cancel: CancellationToken,
    ) -> Result<Started<B>, VersionError> {
        let ledger = load_or_init(&store, config)?;
        let version = ledger.live.version;
        let record = store.version(version)?.ok_or_else(|| {
            VersionError::Other(format!("the ledger names unknown live version {version}"))
        })?;
        let embedder = backbone.with_adapter(record.adapter.as_ref())?;
        let live = crate::serve::live(ServingModel {
            version,
            adapter_id: record.adapter_id().to_string(),
            embedder,
            metrics: record.metrics.clone(),
        });
        let (sender, receiver) = std::sync::mpsc::sync_channel(COMMAND_QUEUE);
        let mut owner = Self {
            store,
            index,
            backbone,
            live,
            ledger,
            promotion: None,
            index_live_stale: false,
            index_prepared: false,
            keep_versions: config.index.keep_versions,
            embed_batch: config.index.embed_batch,
            limits: config.image_limits(),
            cancel,
        };
        if let Some(promotion) = owner.ledger.promotion {
            owner.resume_promotion(promotion)?;
        }
        // A server that is away at start does not stop the daemon: it serves 503s and the
        // loop tries again (with backoff) until the index is ready.
        if let Err(error) = owner.prepare_index() {
            tracing::warn!(%error, "the index is not ready: retrying in the background");
        }
        Ok((owner, Handle { sender }, receiver))
    }

    /// Makes the index agree with the ledger: the live version (and a promotion's) exists,
    /// the index's live pointer names the live version. Rebuilds a lost live version.
    fn prepare_index(&mut self) -> Result<(), VersionError> {
        let version = self.ledger.live.version;
        let record = self.store.version(version)?.ok_or_else(|| {
            VersionError::Other(format!("the ledger names unknown live version {version}"))
        })?;
        let dim = self.backbone.projection_dim();
        let missing = !self.index.versions()?.contains(&version);
        self.index
            .ensure_version(version, dim, &version_info(&self.backbone, &record))?;
        if missing && self.ledger.live.embed_cursor > 0 {
            // The index was deleted or lost (e.g. restored from a backup without it): rebuild
            // it from the store, which is the source of truth.
            tracing::warn!(
                version,
                "the live index version is missing: re-embedding the corpus"
            );
            let mut live = self.ledger.live.clone();
            live.embed_cursor = 0;
            self.store.apply(&[LedgerChange::Live(live.clone())])?;
            self.ledger.live = live;
        }
        if self.index.live()? != Some(version) {
            self.index.set_live(version)?;
        }
        if let Some((promotion, _)) = &self.promotion {
            let record = self.store.version(promotion.version)?.ok_or_else(|| {
                VersionError::Other(format!("unknown version {}", promotion.version))
            })?;
            self.index.ensure_version(
                promotion.version,
                dim,
                &version_info(&self.backbone, &record),
            )?;
        }
        self.index_prepared = true;
        Ok(())
    }

    /// The live serving model (read by queries and the trainer).
    pub fn live(&self) -> Arc<Live<B>> {
        self.live.clone()
    }

    fn resume_promotion(&mut self, promotion: Promotion) -> Result<(), VersionError> {
        let record = self.store.version(promotion.version)?;
        let loaded = record
            .ok_or_else(|| VersionError::Other(format!("unknown version {}", promotion.version)))
            .and_then(|record| Ok(self.backbone.with_adapter(record.adapter.as_ref())?));
        match loaded {
            Ok(embedder) => {
                tracing::info!(
                    version = promotion.version,
                    cursor = promotion.cursor,
                    stop_at = promotion.stop_at,
                    "promotion resumed"
                );
                self.promotion = Some((promotion, embedder));
            }
            Err(error) => {
                tracing::error!(%error, version = promotion.version, "cannot resume the promotion: dropped");
                self.store.apply(&[LedgerChange::Promotion(None)])?;
                self.ledger.promotion = None;
            }
        }
        Ok(())
    }

    /// Runs until cancelled: commands first, then one freshness batch and one re-embed batch
    /// per turn.
    pub fn run(mut self, commands: Receiver<Command<B>>) {
        let mut backoff = Duration::from_millis(500);
        while !self.cancel.is_cancelled() {
            for _ in 0..COMMANDS_PER_TURN {
                match commands.try_recv() {
                    Ok(command) => self.handle(command),
                    Err(_) => break,
                }
            }
            if self.index_live_stale {
                self.follow_ledger();
            }
            let mut worked = false;
            let prepared = if self.index_prepared {
                Ok(())
            } else {
                self.prepare_index()
            };
            let turn = prepared
                .and_then(|()| self.fresh_batch())
                .and_then(|fresh| {
                    worked |= fresh;
                    if self.promotion.is_some() {
                        worked = true;
                        if self.reembed_batch()? {
                            self.finish_promotion()?;
                        }
                    }
                    Ok(())
                });
            let wait = match turn {
                Ok(()) => {
                    metrics::gauge!("rsitrd_index_available").set(1.0);
                    backoff = Duration::from_millis(500);
                    if worked {
                        continue;
                    }
                    IDLE_POLL
                }
                Err(error) => {
                    if matches!(
                        error,
                        VersionError::Index(crate::index::IndexError::Unavailable(_))
                    ) {
                        metrics::gauge!("rsitrd_index_available").set(0.0);
                    }
                    metrics::counter!("rsitrd_index_errors_total", "stage" => "background")
                        .increment(1);
                    tracing::warn!(%error, retry_in = ?backoff, "index work failed");
                    let wait = backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    wait
                }
            };
            // Idle or backing off: still answer commands (a rollback need not wait).
            let deadline = Instant::now() + wait;
            while !self.cancel.is_cancelled() {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                match commands.recv_timeout(left.min(IDLE_POLL)) {
                    Ok(command) => self.handle(command),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => std::thread::sleep(left.min(IDLE_POLL)),
                }
            }
        }
    }

    fn handle(&mut self, command: Command<B>) {
        match command {
            Command::Candidate {
                version,
                parent,
                changes,
                promote,
                reply,
            } => {
                let _ = reply.send(self.candidate(version, parent, changes, promote.map(|e| *e)));
            }
            Command::Rollback { to, reply } => {
                let _ = reply.send(self.rollback(to));
            }
            Command::Ping { reply } => {
                let _ = reply.send(Ok(()));
            }
            Command::TrainingRequest { requested, reply } => {
                let mut training = self.ledger.training.clone();
                training.requested = requested;
                let result = self
                    .store
                    .apply(&[LedgerChange::Training(training.clone())])
                    .map(|()| self.ledger.training = training)
                    .map_err(VersionError::from);
                let _ = reply.send(result);
            }
        }
    }

    fn candidate(
        &mut self,
        version: u64,
        parent: u64,
        mut changes: Vec<LedgerChange>,
        promote: Option<Embedder<B>>,
    ) -> Result<(), VersionError> {
        let promotion = match &promote {
            Some(_) if self.promotion.is_some() => {
                return Err(VersionError::Conflict(
                    "a promotion is already in progress".into(),
                ));
            }
            Some(_) if parent != self.ledger.live.version => {
                return Err(VersionError::Conflict(format!(
                    "the candidate was trained from v{parent}, but v{} serves now (rolled back meanwhile)",
                    self.ledger.live.version
                )));
            }
            Some(_) => {
                // The run's own version row names the adapter the index records.
                let record = changes
                    .iter()
                    .find_map(|change| match change {
                        LedgerChange::Version(v, record) if *v == version => Some(record),
                        _ => None,
                    })
                    .ok_or_else(|| {
                        VersionError::Conflict(format!(
                            "the promoted run carries no row for version {version}"
                        ))
                    })?;
                let info = version_info(&self.backbone, record);
                self.index
                    .ensure_version(version, self.backbone.projection_dim(), &info)?;
                Some(Promotion {
                    version,
                    stop_at: self.ledger.live.embed_cursor,
                    cursor: 0,
                })
            }
            None => None,
        };
        if promotion.is_some() {
            changes.push(LedgerChange::Promotion(promotion));
        }
        self.store.apply(&changes)?;
        for change in changes {
            match change {
                LedgerChange::Training(training) => self.ledger.training = training,
                LedgerChange::Slice(slice) => self.ledger.slice = Some(slice),
                _ => {}
            }
        }
        if let (Some(promotion), Some(embedder)) = (promotion, promote) {
            tracing::info!(
                version,
                stop_at = promotion.stop_at,
                "promotion: re-embedding the corpus (new samples go to both versions)"
            );
            self.ledger.promotion = Some(promotion);
            self.promotion = Some((promotion, embedder));
        }
        Ok(())
    }

    fn rollback(&mut self, to: Option<u64>) -> Result<u64, VersionError> {
        let target = rollback_target(
            &self.ledger,
            to,
            self.keep_versions,
            &self.index.versions()?,
        )?;
        if target == self.ledger.live.version {
            return Ok(target);
        }
        let started = Instant::now();
        let record = self
            .store
            .version(target)?
            .ok_or_else(|| VersionError::Conflict(format!("unknown version {target}")))?;
        let embedder = self.backbone.with_adapter(record.adapter.as_ref())?;
        self.switch(target, embedder, record.indexed_cursor)?;
        metrics::histogram!("rsitrd_rollback_seconds").record(started.elapsed().as_secs_f64());
        tracing::info!(to = target, "rolled back");
        Ok(target)
    }

    /// Makes `to` the live version: ledger, serving model, index pointer, in that order;
    /// then drops index versions beyond `keep_versions`.
    fn switch(&mut self, to: u64, embedder: Embedder<B>, cursor: u64) -> Result<(), VersionError> {
        let (pointer, record) = self.commit_switch(to, cursor, "rollback")?;
        self.serve(pointer, record, embedder);
        Ok(())
    }

    /// The ledger part of a switch (nothing else changes if it fails).
    fn commit_switch(
        &self,
        to: u64,
        cursor: u64,
        kind: &str,
    ) -> Result<(LivePointer, VersionRecord), VersionError> {
        let (changes, pointer, record) =
            switch_changes(&self.store, &self.ledger.live, to, cursor, kind)?;
        self.store.apply(&changes)?;
        Ok((pointer, record))
    }

    /// The in-memory part of a switch whose ledger rows are committed.
    fn serve(&mut self, pointer: LivePointer, record: VersionRecord, embedder: Embedder<B>) {
        let (from, to) = (self.ledger.live.version, pointer.version);
        self.ledger.live = pointer;
        self.ledger.promotion = None;
        self.live.store(Arc::new(ServingModel {
            version: to,
            adapter_id: record.adapter_id().to_string(),
            embedder,
            metrics: record.metrics,
        }));
        self.follow_ledger();
        tracing::debug!(from, to, "live version switched");
        self.drop_old_versions();
    }

    /// Points the index's live pointer at the ledger's live version.
    fn follow_ledger(&mut self) {
        match self.index.set_live(self.ledger.live.version) {
            Ok(()) => self.index_live_stale = false,
            Err(error) => {
                if !self.index_live_stale {
                    tracing::warn!(%error, version = self.ledger.live.version, "cannot move the index's live pointer: retrying");
                }
                self.index_live_stale = true;
            }
        }
    }

    fn drop_old_versions(&self) {
        let mut kept = self.ledger.live.kept_versions(self.keep_versions);
        if let Some((promotion, _)) = &self.promotion {
            kept.push(promotion.version);
        }
        match self.index.versions() {
            Ok(versions) => {
                for version in versions.into_iter().filter(|v| !kept.contains(v)) {
                    if let Err(error) = self.index.drop_version(version) {
                        tracing::warn!(%error, version, "cannot drop an old index version");
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "cannot list index versions"),
        }
    }

    /// Embeds the next changes after the live cursor into the live version (and into the
    /// candidate during a promotion); `true` when there were any.
    fn fresh_batch(&mut self) -> Result<bool, VersionError> {
        let cursor = self.ledger.live.embed_cursor;
        let page = self.store.page_since(cursor, self.embed_batch)?;
        if page.next_cursor == cursor {
            // Nothing after the cursor: no backlog, and no counter read on every idle poll.
            metrics::gauge!("rsitrd_embed_backlog_samples").set(0.0);
            return Ok(false);
        }
        let last_seq = self.store.stats().map_or(cursor, |s| s.last_seq);
        metrics::gauge!("rsitrd_embed_backlog_samples").set(last_seq.saturating_sub(cursor) as f64);
        let live = self.live.load_full();
        let started = Instant::now();
        let embedded = self.write(&live.embedder, live.version, &page.records, "embed")?;
        if let Some((promotion, candidate)) = &self.promotion {
            // The dual write: the candidate gets every change after `stop_at` this way.
            self.write(candidate, promotion.version, &page.records, "embed")?;
        }
        let mut pointer = self.ledger.live.clone();
        pointer.embed_cursor = page.next_cursor;
        self.store.apply(&[LedgerChange::Live(pointer.clone())])?;
        self.ledger.live = pointer;
        metrics::counter!("rsitrd_embedded_samples_total").increment(embedded as u64);
        metrics::histogram!("rsitrd_embed_batch_seconds").record(started.elapsed().as_secs_f64());
        tracing::debug!(
            samples = embedded,
            version = live.version,
            "embedded new samples"
        );
        Ok(true)
    }

    /// Embeds `records` with `embedder` into index version `version`; returns how many
    /// samples were usable (the others are quarantined under `stage`).
    fn write(
        &self,
        embedder: &Embedder<B>,
        version: u64,
        records: &[crate::store::SampleRecord],
        stage: &str,
    ) -> Result<usize, VersionError> {
        let (points, embedded) =
            embed_points(&self.store, embedder, version, records, &self.limits, stage)
                .map_err(sample_error)?;
        self.index.upsert(version, points)?;
        Ok(embedded)
    }

    /// Re-embeds the next batch of the corpus (up to where the promotion began) into the
    /// candidate; `true` when it is complete.
    fn reembed_batch(&mut self) -> Result<bool, VersionError> {
        let Some((promotion, candidate)) = &self.promotion else {
            return Ok(true);
        };
        let mut next = *promotion;
        let page = self
            .store
            .page_range(next.cursor, next.stop_at, self.embed_batch)?;
        if page.next_cursor == next.cursor {
            return Ok(true);
        }
        self.write(candidate, next.version, &page.records, "reindex")?;
        next.cursor = page.next_cursor;
        self.store.apply(&[LedgerChange::Promotion(Some(next))])?;
        if let Some((promotion, _)) = &mut self.promotion {
            *promotion = next;
        }
        self.ledger.promotion = Some(next);
        Ok(next.cursor >= next.stop_at)
    }

    fn finish_promotion(&mut self) -> Result<(), VersionError> {
        let Some((promotion, _)) = &self.promotion else {
            return Ok(());
        };
        let version = promotion.version;
        let from = self.ledger.live.version;
        // Everything up to the live cursor is in the candidate: re-embedded up to `stop_at`,
        // dual-written after it. If the commit fails the promotion stays and is retried.
        let (pointer, record) =
            self.commit_switch(version, self.ledger.live.embed_cursor, "promotion")?;
        let (_, candidate) = self.promotion.take().expect("checked above");
        self.serve(pointer, record, candidate);
        metrics::counter!("rsitrd_promotions_total").increment(1);
        tracing::info!(
            from,
            to = version,
            "promoted: serving the new adapter and index version"
        );
        Ok(())
    }
}

/// What a version's vectors are made with, for the index's record of it.
fn version_info<B: ModelBackend>(
    backbone: &Backbone<B>,
    record: &VersionRecord,
) -> crate::index::VersionInfo {
    crate::index::VersionInfo {
        base_model: backbone.base().fingerprint.clone(),
        adapter_id: record.adapter_id().to_string(),
    }
}

fn sample_error(error: crate::stored::SampleError) -> VersionError {
    match error {
        crate::stored::SampleError::Store(error) => VersionError::Store(error),
        other => VersionError::Other(other.to_string()),
    }
}
