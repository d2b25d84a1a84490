//! `rsitrd run`: wires ingestion, the index worker (freshness + re-embedding), continual
//! training with the promotion gate, and the HTTP API; handles readiness, the systemd
//! watchdog and graceful shutdown.
//!
//! Threads: ingestion sources (async + blocking), one *index worker* (blocking: embeds new
//! samples with the live adapter and, during a promotion, re-embeds the corpus with the
//! candidate, then switches), one *trainer* (blocking), the HTTP server (async; encodes
//! queries on blocking threads). The live model and its index version sit together behind
//! one `ArcSwap`, so a query sees one version from encoding to search.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use burn::backend::Autodiff;
use burn::prelude::*;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, IndexBackendKind};
use crate::eval::RetrievalMetrics;
use crate::index::{VectorIndex, sample_points};
use crate::model::Embedder;
use crate::store::{SampleRecord, SampleSplit, SplitPolicy, Store, now_ms};
use crate::train::continual;

pub mod http;
pub mod state;

use state::{DaemonState, Reindex, VersionRecord};

/// Longest pause of the index worker and the trainer when idle (also their cancellation check).
const IDLE_POLL: Duration = Duration::from_millis(50);
/// Most new samples one training run takes (older ones wait for the next run).
const MAX_NEW_PER_RUN: usize = 4096;

/// Why the daemon cannot start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Index(#[from] crate::index::IndexError),
    #[error(transparent)]
    Weights(#[from] crate::model::weights::WeightsError),
    #[error(transparent)]
    Inbox(#[from] crate::ingest::fs::InboxError),
    #[error("state file {path}: {error}")]
    State {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot listen on {address}: {error}")]
    Listen {
        address: String,
        error: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

/// The model serving queries and the index version holding its vectors.
pub struct Live<B: Backend> {
    pub version: u64,
    pub embedder: Embedder<B>,
    pub metrics: std::collections::BTreeMap<String, f64>,
}

/// What the last training run decided (for `/v1/status`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunRecord {
    pub version: u64,
    pub parent: u64,
    pub decision: String,
    pub promoted: bool,
    pub live_metrics: Option<RetrievalMetrics>,
    pub candidate_metrics: Option<RetrievalMetrics>,
    pub new_samples: usize,
    pub replayed: usize,
    pub steps: usize,
    pub first_loss: f32,
    pub last_loss: f32,
    pub duration_s: f64,
    pub finished_ms: u64,
}

/// State shared by the daemon's parts.
pub struct Shared<B: Backend> {
    pub config: Config,
    pub model_dir: PathBuf,
    pub store: Arc<Store>,
    pub index: Arc<dyn VectorIndex>,
    pub live: ArcSwap<Live<B>>,
    pub state: Mutex<DaemonState>,
    pub state_path: PathBuf,
    pub adapters_dir: PathBuf,
    pub device: B::Device,
    /// A candidate waiting for the index worker to re-embed the corpus with it.
    pub promotion: Mutex<Option<(u64, Embedder<B>)>>,
    /// A training run is in progress.
    pub training: AtomicBool,
    pub last_run: Mutex<Option<RunRecord>>,
    pub ready: AtomicBool,
    /// Admission of query encodes (`http.max_concurrent_encodes`).
    pub encodes: Arc<tokio::sync::Semaphore>,
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    pub cancel: CancellationToken,
}

impl<B: Backend> Shared<B> {
    /// Persists the state after `change`.
    pub fn update_state<T>(&self, change: impl FnOnce(&mut DaemonState) -> T) -> T {
        let mut state = self.state.lock().expect("state lock");
        let out = change(&mut state);
        if let Err(error) = state.save(&self.state_path) {
            tracing::error!(path = %self.state_path.display(), %error, "cannot save the daemon state");
        }
        out
    }

    pub fn state_snapshot(&self) -> DaemonState {
        self.state.lock().expect("state lock").clone()
    }
}

fn save_state(state: &DaemonState, path: &Path) -> Result<(), DaemonError> {
    state.save(path).map_err(|error| DaemonError::State {
        path: path.to_path_buf(),
        error,
    })
}

/// Opens the configured index.
pub fn open_index(config: &Config) -> Result<Arc<dyn VectorIndex>, DaemonError> {
    Ok(match config.index.backend {
        IndexBackendKind::Embedded => Arc::new(crate::index::edge::EdgeIndex::open(
            &config.store.dir.join("index"),
        )?),
        IndexBackendKind::Remote => {
            Arc::new(crate::index::remote::RemoteIndex::connect(&config.index)?)
        }
    })
}

fn load_embedder<B: Backend>(
    model_dir: &Path,
    record: &VersionRecord,
    device: &B::Device,
    batch_size: usize,
) -> Result<Embedder<B>, DaemonError> {
    let mut embedder = Embedder::<B>::load(model_dir, record.adapter.as_deref(), device)?;
    embedder.batch_size = batch_size;
    Ok(embedder)
}

/// Runs the daemon until `cancel` fires. `model_dir` is the resolved backbone directory.
pub async fn run<B: Backend>(
    config: Config,
    model_dir: PathBuf,
    device: B::Device,
    cancel: CancellationToken,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
) -> Result<(), DaemonError>
where
    B::Device: Send + Sync,
{
    let data_dir = config.store.dir.clone();
    let store = Arc::new(Store::open(
        &config.store.store_dir(),
        SplitPolicy {
            val_fraction: config.store.val_fraction,
            seed: config.store.split_seed,
        },
    )?);
    let index = open_index(&config)?;
    let state_path = data_dir.join("state.json");
    let adapters_dir = config.adapters_dir();
    std::fs::create_dir_all(&adapters_dir).map_err(|error| DaemonError::State {
        path: adapters_dir.clone(),
        error,
    })?;
    let state = match DaemonState::load(&state_path).map_err(|error| DaemonError::State {
        path: state_path.clone(),
        error,
    })? {
        Some(state) => state,
        None => {
            let initial = match &config.model.adapter {
                Some(path) => crate::model::weights::read_adapter_meta(path)?.version,
                None => 0,
            };
            let state = DaemonState::initial(initial, config.model.adapter.clone(), now_ms());
            save_state(&state, &state_path)?;
            state
        }
    };
    // Load the live model (blocking: reads and hashes the weights).
    let live_record = state.versions.get(&state.live).cloned().ok_or_else(|| {
        DaemonError::Other(format!("state names unknown live version {}", state.live))
    })?;
    let batch = config.model.embed_batch_size;
    let embedder = {
        let (model_dir, device) = (model_dir.clone(), device.clone());
        tokio::task::spawn_blocking(move || {
            load_embedder::<B>(&model_dir, &live_record, &device, batch)
        })
        .await
        .map_err(|e| DaemonError::Other(e.to_string()))??
    };
    let dim = embedder.config.projection_dim;
    let live_version = state.live;
    let index_was_missing = {
        let index = index.clone();
        tokio::task::spawn_blocking(move || -> Result<bool, DaemonError> {
            let missing = !index.versions()?.contains(&live_version);
            index.ensure_version(live_version, dim)?;
            if index.live()? != Some(live_version) {
                index.set_live(live_version)?;
            }
            Ok(missing)
        })
        .await
        .map_err(|e| DaemonError::Other(e.to_string()))??
    };
    let mut state = state;
    if index_was_missing && state.embed_cursor > 0 {
        // The index was deleted or lost (e.g. restored from a backup without it): rebuild it
        // from the store, which is the source of truth.
        tracing::warn!(
            version = live_version,
            "the live index version is missing: re-embedding the corpus"
        );
        state.embed_cursor = 0;
        save_state(&state, &state_path)?;
    }
    let live_metrics = state
        .versions
        .get(&live_version)
        .map(|v| v.metrics.clone())
        .unwrap_or_default();
    let shared = Arc::new(Shared {
        config: config.clone(),
        model_dir,
        store: store.clone(),
        index,
        live: ArcSwap::from_pointee(Live {
            version: live_version,
            embedder,
            metrics: live_metrics,
        }),
        state: Mutex::new(state),
        state_path,
        adapters_dir,
        device,
        promotion: Mutex::new(None),
        training: AtomicBool::new(false),
        last_run: Mutex::new(None),
        ready: AtomicBool::new(false),
        encodes: Arc::new(tokio::sync::Semaphore::new(
            config.http.max_concurrent_encodes,
        )),
        metrics,
        cancel: cancel.clone(),
    });

    continual::report_quarantine(&store);
    let listener = tokio::net::TcpListener::bind(&config.http.listen)
        .await
        .map_err(|error| DaemonError::Listen {
            address: config.http.listen.clone(),
            error,
        })?;
    tracing::info!(address = %config.http.listen, version = live_version, "serving");
    let mut tasks = tokio::task::JoinSet::new();
    {
        let shared = shared.clone();
        tasks.spawn(async move {
            http::serve(shared, listener).await;
            Ok(())
        });
    }
    {
        let (config, store, cancel) = (config.clone(), store.clone(), cancel.clone());
        tasks.spawn(async move {
            crate::ingest::run(&config, store, cancel)
                .await
                .map_err(DaemonError::from)
        });
    }
    // Background work runs on its own, smaller thread pools (burn's CPU kernels use the rayon
    // pool they are called from), so queries on the global pool keep a core during a swap.
    // The index worker and the trainer get one pool each: a long training run must not hold
    // up freshness.
    let threads = match config.model.background_threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1)),
        n => n,
    };
    let pool = |name: &'static str| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(move |i| format!("rsitrd-{name}-{i}"))
            .build()
            .map_err(|e| DaemonError::Other(format!("{name} thread pool: {e}")))
    };
    {
        let (shared, pool) = (shared.clone(), pool("index")?);
        tasks.spawn_blocking(move || {
            pool.install(|| index_worker(&shared));
            Ok(())
        });
    }
    if config.training.enabled {
        let (shared, pool) = (shared.clone(), pool("train")?);
        tasks.spawn_blocking(move || {
            pool.install(|| trainer(&shared));
            Ok(())
        });
    }
    shared.ready.store(true, Ordering::SeqCst);
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    if let Some(interval) = sd_notify::watchdog_enabled() {
        let cancel = cancel.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(interval / 2);
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return Ok(()),
                    _ = tick.tick() => { let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]); }
                }
            }
        });
    }
    let mut result = Ok(());
    while let Some(finished) = tasks.join_next().await {
        match finished {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::error!(%error, "a daemon part failed: stopping");
                cancel.cancel();
                result = Err(error);
            }
            Err(panic) => {
                tracing::error!(%panic, "a daemon part panicked: stopping");
                cancel.cancel();
                result = Err(DaemonError::Other(format!("panic: {panic}")));
            }
        }
        if !cancel.is_cancelled() {
            // A part ended on its own (e.g. the HTTP server): stop the rest.
            cancel.cancel();
        }
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    result
}

/// Embeds records with `embedder` into index points of `version`; returns the points and
/// how many samples they hold. A record that cannot be used (deterministically) is
/// quarantined under `stage` and left out; a transient failure (disk) fails the batch, which
/// is retried.
fn embed_records<B: Backend>(
    shared: &Shared<B>,
    embedder: &Embedder<B>,
    version: u64,
    records: &[SampleRecord],
    stage: &str,
) -> Result<(Vec<crate::index::IndexPoint>, usize), continual::ContinualError> {
    let limits = shared.config.image_limits();
    let (pixels, usable) = continual::usable_pixels(
        &shared.store,
        records,
        embedder.image_size(),
        &limits,
        stage,
    )?;
    if usable.is_empty() {
        return Ok((Vec::new(), 0));
    }
    let refs: Vec<&[f32]> = pixels.iter().map(Vec::as_slice).collect();
    let images = embedder.embed_pixels(&refs);
    let captions: Vec<&str> = usable
        .iter()
        .flat_map(|r| r.captions.iter().map(String::as_str))
        .collect();
    let mut texts = embedder.embed_texts(&captions).into_iter();
    let mut points = Vec::new();
    let embedded = usable.len();
    for (record, image) in usable.into_iter().zip(images) {
        let caption_vectors: Vec<Vec<f32>> = texts.by_ref().take(record.captions.len()).collect();
        points.extend(sample_points(record, version, image, caption_vectors));
    }
    Ok((points, embedded))
}

/// Keeps the live index fresh and carries out promotions (re-embed, then switch).
fn index_worker<B: Backend>(shared: &Shared<B>) {
    let mut reindex: Option<(Reindex, Embedder<B>)> = None;
    let mut backoff = Duration::from_millis(500);
    while !shared.cancel.is_cancelled() {
        // A promotion recorded in the state (just decided, or interrupted by a crash) starts
        // or resumes from its cursor.
        if reindex.is_none()
            && let Some(job) = shared.state_snapshot().reindex
        {
            match promotion_embedder(shared, job.version) {
                Ok(embedder) => {
                    tracing::info!(
                        version = job.version,
                        cursor = job.cursor,
                        "promotion: re-embedding the corpus"
                    );
                    reindex = Some((job, embedder));
                }
                Err(error) => {
                    tracing::error!(%error, version = job.version, "cannot start the promotion: dropped");
                    shared.update_state(|state| state.reindex = None);
                }
            }
        }
        let mut worked = false;
        // 1. Freshness: new samples into the live version.
        match fresh_batch(shared) {
            Ok(done) => worked |= done,
            Err(error) => {
                tracing::warn!(%error, retry_in = ?backoff, "embedding new samples failed");
                sleep_cancellable(shared, backoff);
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        }
        // 2. Promotion: one chunk of the corpus into the candidate version, switch when done.
        if let Some((job, embedder)) = reindex.as_mut() {
            match reindex_chunk(shared, job, embedder) {
                Ok(true) => {
                    let (job, embedder) = reindex.take().expect("present");
                    switch_live(shared, job, embedder);
                    worked = true;
                }
                Ok(false) => worked = true,
                Err(error) => {
                    tracing::warn!(%error, retry_in = ?backoff, "re-embedding failed");
                    sleep_cancellable(shared, backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    continue;
                }
            }
        }
        backoff = Duration::from_millis(500);
        if !worked {
            sleep_cancellable(shared, IDLE_POLL);
        }
    }
}

/// The candidate of a promotion (handed over in memory, or loaded from its checkpoint after a
/// restart), with its index version created.
fn promotion_embedder<B: Backend>(
    shared: &Shared<B>,
    version: u64,
) -> Result<Embedder<B>, DaemonError> {
    let handed = shared.promotion.lock().expect("promotion lock").take();
    let embedder = match handed {
        Some((v, embedder)) if v == version => embedder,
        _ => {
            let record = shared
                .state_snapshot()
                .versions
                .get(&version)
                .cloned()
                .ok_or_else(|| DaemonError::Other(format!("unknown version {version}")))?;
            load_embedder::<B>(
                &shared.model_dir,
                &record,
                &shared.device,
                shared.config.model.embed_batch_size,
            )?
        }
    };
    shared
        .index
        .ensure_version(version, embedder.config.projection_dim)?;
    Ok(embedder)
}

fn sleep_cancellable<B: Backend>(shared: &Shared<B>, duration: Duration) {
    let deadline = Instant::now() + duration;
    while Instant::now() < deadline && !shared.cancel.is_cancelled() {
        std::thread::sleep(IDLE_POLL.min(deadline - Instant::now()));
    }
}

#[derive(Debug, thiserror::Error)]
enum WorkerError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Index(#[from] crate::index::IndexError),
    #[error(transparent)]
    Embed(#[from] continual::ContinualError),
}

/// Embeds samples stored after the live cursor; returns whether there were any.
fn fresh_batch<B: Backend>(shared: &Shared<B>) -> Result<bool, WorkerError> {
    let cursor = shared.state.lock().expect("state lock").embed_cursor;
    let page = shared
        .store
        .page_since(cursor, shared.config.index.embed_batch)?;
    if page.next_cursor == cursor {
        metrics::gauge!("rsitrd_embed_backlog_samples").set(0.0);
        return Ok(false);
    }
    let (records, last) = (page.records, page.next_cursor);
    metrics::gauge!("rsitrd_embed_backlog_samples").set(
        shared
            .store
            .stats()
            .map_or(0, |s| s.last_seq.saturating_sub(cursor)) as f64,
    );
    let live = shared.live.load_full();
    let started = Instant::now();
    let (points, embedded) =
        embed_records(shared, &live.embedder, live.version, &records, "embed")?;
    if !points.is_empty() {
        shared.index.upsert(live.version, points)?;
    }
    metrics::counter!("rsitrd_embedded_samples_total").increment(embedded as u64);
    metrics::histogram!("rsitrd_embed_batch_seconds").record(started.elapsed().as_secs_f64());
    shared.update_state(|state| {
        // The live version may have switched meanwhile: then the switch set the cursor.
        if state.live == live.version {
            state.embed_cursor = state.embed_cursor.max(last);
            if let Some(record) = state.versions.get_mut(&live.version) {
                record.indexed_cursor = state.embed_cursor;
            }
        }
    });
    tracing::debug!(
        samples = embedded,
        version = live.version,
        "embedded new samples"
    );
    Ok(true)
}

/// Re-embeds the next chunk into the candidate version; `true` when the corpus is done.
fn reindex_chunk<B: Backend>(
    shared: &Shared<B>,
    job: &mut Reindex,
    embedder: &Embedder<B>,
) -> Result<bool, WorkerError> {
    let page = shared
        .store
        .page_since(job.cursor, shared.config.index.embed_batch)?;
    if page.next_cursor == job.cursor {
        return Ok(true);
    }
    let (points, _) = embed_records(shared, embedder, job.version, &page.records, "reindex")?;
    if !points.is_empty() {
        shared.index.upsert(job.version, points)?;
    }
    job.cursor = page.next_cursor;
    let saved = *job;
    shared.update_state(|state| state.reindex = Some(saved));
    Ok(false)
}

/// Switches serving model and index version together, then drops versions beyond `keep`.
fn switch_live<B: Backend>(shared: &Shared<B>, job: Reindex, embedder: Embedder<B>) {
    if let Err(error) = shared.index.set_live(job.version) {
        tracing::error!(%error, version = job.version, "cannot switch the index alias: promotion retried at restart");
        return;
    }
    let metrics = shared
        .state_snapshot()
        .versions
        .get(&job.version)
        .map(|v| v.metrics.clone())
        .unwrap_or_default();
    let previous = shared.live.load().version;
    shared.live.store(Arc::new(Live {
        version: job.version,
        embedder,
        metrics,
    }));
    let kept = shared.update_state(|state| {
        state.live = job.version;
        state.embed_cursor = job.cursor;
        state.history.push(job.version);
        state.reindex = None;
        if let Some(record) = state.versions.get_mut(&job.version) {
            record.indexed_cursor = job.cursor;
        }
        state.kept_versions(shared.config.index.keep_versions)
    });
    metrics::counter!("rsitrd_promotions_total").increment(1);
    tracing::info!(
        from = previous,
        to = job.version,
        "promoted: serving the new adapter and index version"
    );
    if let Ok(versions) = shared.index.versions() {
        for version in versions.into_iter().filter(|v| !kept.contains(v)) {
            if let Err(error) = shared.index.drop_version(version) {
                tracing::warn!(%error, version, "cannot drop an old index version");
            }
        }
    }
}

/// Switches back to a kept version (the index worker catches its index up with new samples).
pub fn rollback<B: Backend>(shared: &Shared<B>, to: Option<u64>) -> Result<u64, String> {
    let state = shared.state_snapshot();
    if state.reindex.is_some() {
        return Err("a promotion is in progress; try again when it has finished".into());
    }
    let kept = state.kept_versions(shared.config.index.keep_versions);
    let target = match to {
        Some(version) => version,
        None => *kept
            .iter()
            .find(|&&v| v != state.live)
            .ok_or("no earlier version is kept (index.keep_versions)")?,
    };
    if target == state.live {
        return Ok(target);
    }
    let versions = shared.index.versions().map_err(|e| e.to_string())?;
    if !versions.contains(&target) {
        return Err(format!("version {target} is not kept (kept: {kept:?})"));
    }
    let record = state
        .versions
        .get(&target)
        .cloned()
        .ok_or(format!("unknown version {target}"))?;
    let embedder = load_embedder::<B>(
        &shared.model_dir,
        &record,
        &shared.device,
        shared.config.model.embed_batch_size,
    )
    .map_err(|e| e.to_string())?;
    shared.index.set_live(target).map_err(|e| e.to_string())?;
    shared.live.store(Arc::new(Live {
        version: target,
        embedder,
        metrics: record.metrics.clone(),
    }));
    shared.update_state(|state| {
        state.live = target;
        state.embed_cursor = record.indexed_cursor;
        state.history.push(target);
    });
    tracing::info!(to = target, "rolled back");
    Ok(target)
}

/// Waits for a trigger, runs training, gates and hands promotions to the index worker.
fn trainer<B: Backend>(shared: &Shared<B>) {
    while !shared.cancel.is_cancelled() {
        sleep_cancellable(shared, Duration::from_secs(1));
        if shared.cancel.is_cancelled() {
            break;
        }
        let state = shared.state_snapshot();
        if state.reindex.is_some() || shared.promotion.lock().expect("promotion lock").is_some() {
            continue;
        }
        let new = match new_training_samples(shared, state.train_cursor) {
            Ok(new) => new,
            Err(error) => {
                tracing::warn!(%error, "cannot read new samples");
                continue;
            }
        };
        let requested = state.train_requested;
        let due = new.len() as u64 >= shared.config.training.min_new_samples
            || (!new.is_empty()
                && now_ms().saturating_sub(state.last_train_ms)
                    >= shared.config.training.interval.as_millis() as u64);
        if !(due || (requested && !new.is_empty())) {
            if requested {
                tracing::info!("training requested, but no new training samples");
                shared.update_state(|state| state.train_requested = false);
            }
            continue;
        }
        shared.training.store(true, Ordering::SeqCst);
        let result = training_run(shared, &state, new);
        shared.training.store(false, Ordering::SeqCst);
        // Finished or failed: the request is answered (a crash before this line re-runs it).
        if requested {
            shared.update_state(|state| state.train_requested = false);
        }
        match result {
            Ok(()) => {}
            // A shutdown, not a failure: nothing to page anyone about.
            Err(continual::ContinualError::Cancelled) => {
                tracing::info!(
                    "training run cancelled by shutdown: it runs again after the restart"
                );
            }
            Err(error) => {
                tracing::error!(%error, "training run failed: it runs again at the next trigger");
            }
        }
    }
}

fn new_training_samples<B: Backend>(
    shared: &Shared<B>,
    cursor: u64,
) -> Result<Vec<SampleRecord>, crate::store::StoreError> {
    let mut out = Vec::new();
    let mut seq = cursor;
    loop {
        let page = shared.store.page_since(seq, 1024)?;
        if page.next_cursor == seq {
            break;
        }
        seq = page.next_cursor;
        out.extend(
            page.records
                .into_iter()
                .filter(|r| r.split == SampleSplit::Train && r.created_seq > cursor),
        );
        if out.len() >= MAX_NEW_PER_RUN {
            out.truncate(MAX_NEW_PER_RUN);
            break;
        }
    }
    Ok(out)
}

fn training_run<B: Backend>(
    shared: &Shared<B>,
    state: &DaemonState,
    new: Vec<SampleRecord>,
) -> Result<(), continual::ContinualError> {
    let started = Instant::now();
    let config = &shared.config;
    let version = state.next_version;
    let parent = state.live;
    let parent_record = state.versions.get(&parent).cloned();
    let limits = config.image_limits();
    let seed = config.training.seed.wrapping_add(version);
    let replay_count = (new.len() as f64 * config.training.replay_ratio).round() as usize;
    let replay =
        shared
            .store
            .replay_sample(SampleSplit::Train, state.train_cursor, replay_count, seed)?;
    let newest = new
        .iter()
        .map(|r| r.created_seq)
        .max()
        .unwrap_or(state.train_cursor);
    let mut samples = new.clone();
    samples.extend(replay.iter().cloned());
    tracing::info!(
        version,
        parent,
        new = new.len(),
        replayed = replay.len(),
        "training run"
    );
    let candidate = continual::train_candidate::<Autodiff<B>>(
        &shared.model_dir,
        parent_record.as_ref().and_then(|r| r.adapter.as_deref()),
        &samples,
        &shared.store,
        &config.training,
        seed,
        &limits,
        config.model.embed_batch_size,
        &shared.device,
        &shared.cancel,
    )?;
    let val = shared.store.samples_in(Some(SampleSplit::Val))?;
    let live = shared.live.load_full();
    let (decision, promote, live_metrics, candidate_metrics) = if !candidate.finite {
        (
            "rejected: a loss was not finite".to_string(),
            false,
            None,
            None,
        )
    } else if val.len() < config.gate.min_val_samples {
        (
            format!(
                "kept: {} val samples, fewer than gate.min_val_samples ({})",
                val.len(),
                config.gate.min_val_samples
            ),
            false,
            None,
            None,
        )
    } else {
        let live_metrics = continual::evaluate_on_store(
            &live.embedder,
            &shared.store,
            &val,
            &limits,
            &shared.cancel,
        )?;
        let candidate_metrics = continual::evaluate_on_store(
            &candidate.embedder,
            &shared.store,
            &val,
            &limits,
            &shared.cancel,
        )?;
        let promote = candidate_metrics.mr >= live_metrics.mr - config.gate.mr_tolerance;
        let decision = if promote {
            format!(
                "promoted: val mR {:.2} vs live {:.2}",
                candidate_metrics.mr, live_metrics.mr
            )
        } else {
            format!(
                "rejected: val mR {:.2} below live {:.2} minus tolerance {}",
                candidate_metrics.mr, live_metrics.mr, config.gate.mr_tolerance
            )
        };
        (
            decision,
            promote,
            Some(live_metrics),
            Some(candidate_metrics),
        )
    };
    let metrics_for_meta = candidate_metrics.unwrap_or(RetrievalMetrics {
        i2t_r1: f64::NAN,
        i2t_r5: f64::NAN,
        i2t_r10: f64::NAN,
        t2i_r1: f64::NAN,
        t2i_r5: f64::NAN,
        t2i_r10: f64::NAN,
        mr: f64::NAN,
        images: 0,
        captions: 0,
    });
    let meta = continual::candidate_meta(
        candidate.embedder.adapter_config.clone(),
        candidate.embedder.base.fingerprint.clone(),
        version,
        parent,
        &metrics_for_meta,
        humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
    );
    let adapter_path = shared.adapters_dir.join(format!("v{version}.safetensors"));
    continual::save_candidate(&candidate.embedder, &meta, &adapter_path)?;
    let mut embedder = candidate.embedder;
    embedder.adapter_meta = Some(meta.clone());
    let run = RunRecord {
        version,
        parent,
        decision: decision.clone(),
        promoted: promote,
        live_metrics,
        candidate_metrics,
        new_samples: new.len(),
        replayed: replay.len(),
        steps: candidate.steps,
        first_loss: candidate.first_loss,
        last_loss: candidate.last_loss,
        duration_s: started.elapsed().as_secs_f64(),
        finished_ms: now_ms(),
    };
    append_run_log(&shared.adapters_dir.join("runs.jsonl"), &run);
    metrics::counter!("rsitrd_training_runs_total", "decision" => if promote { "promoted" } else { "rejected" }).increment(1);
    metrics::histogram!("rsitrd_training_run_seconds").record(run.duration_s);
    tracing::info!(version, parent, decision = %decision, duration_s = run.duration_s, "training run finished");
    *shared.last_run.lock().expect("run lock") = Some(run);
    shared.update_state(|state| {
        state.versions.insert(
            version,
            VersionRecord {
                adapter: Some(adapter_path.clone()),
                parent: Some(parent),
                metrics: meta.metrics.clone(),
                created_ms: now_ms(),
                indexed_cursor: 0,
                decision: decision.clone(),
            },
        );
        state.next_version = version + 1;
        state.train_cursor = state.train_cursor.max(newest);
        state.last_train_ms = now_ms();
    });
    if promote {
        // In memory for the index worker; the state entry makes it survive a crash.
        *shared.promotion.lock().expect("promotion lock") = Some((version, embedder));
        shared.update_state(|state| state.reindex = Some(Reindex { version, cursor: 0 }));
    }
    Ok(())
}

fn append_run_log(path: &Path, run: &RunRecord) {
    use std::io::Write;
    let line = match serde_json::to_string(run) {
        Ok(line) => line,
        Err(error) => {
            tracing::warn!(%error, "cannot serialize the run record");
            return;
        }
    };
    let result = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut file| {
            writeln!(file, "{line}")?;
            file.sync_data()
        });
    if let Err(error) = result {
        tracing::warn!(path = %path.display(), %error, "cannot append to the run log");
    }
}

/// Rollback with the daemon stopped: moves the live pointer and the state to a kept version;
/// the next start serves it and catches its index up with samples that arrived since.
pub fn offline_rollback(config: &Config, to: Option<u64>) -> Result<u64, DaemonError> {
    let state_path = config.store.dir.join("state.json");
    let mut state = DaemonState::load(&state_path)
        .map_err(|error| DaemonError::State {
            path: state_path.clone(),
            error,
        })?
        .ok_or_else(|| {
            DaemonError::Other(format!("no daemon state in {}", state_path.display()))
        })?;
    if state.reindex.is_some() {
        return Err(DaemonError::Other(
            "a promotion is in progress: start the daemon to finish it first".into(),
        ));
    }
    let kept = state.kept_versions(config.index.keep_versions);
    let target = match to {
        Some(version) => version,
        None => *kept
            .iter()
            .find(|&&v| v != state.live)
            .ok_or_else(|| DaemonError::Other("no earlier version is kept".into()))?,
    };
    let index = open_index(config)?;
    if !index.versions()?.contains(&target) {
        return Err(DaemonError::Other(format!(
            "version {target} is not kept (kept: {kept:?})"
        )));
    }
    let record = state
        .versions
        .get(&target)
        .cloned()
        .ok_or_else(|| DaemonError::Other(format!("unknown version {target}")))?;
    index.set_live(target)?;
    state.live = target;
    state.embed_cursor = record.indexed_cursor;
    state.history.push(target);
    state
        .save(&state_path)
        .map_err(|error| DaemonError::State {
            path: state_path.clone(),
            error,
        })?;
    Ok(target)
}
