//! `rsitrd run`: wires the stages together and handles readiness, the systemd watchdog and
//! graceful shutdown. Nothing here decides anything: ingestion (`ingest`) stores samples, the
//! version owner (`versions`) keeps the index fresh and alone changes the live version, the
//! trainer (`train::trigger`) trains and gates candidates, `http` serves.
//!
//! Threads: ingestion sources (async + blocking), the version owner (blocking, its own rayon
//! pool), the trainer (blocking, its own pool), the HTTP server (async; encodes queries on
//! blocking threads). One backbone is loaded, once, and shared by all of them.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::model::kernels::ModelBackend;
use crate::serve::Backbone;
use crate::store::Store;
use crate::versions::{Owner, VersionError};

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
    Versions(#[from] VersionError),
    #[error(transparent)]
    Inbox(#[from] crate::ingest::fs::InboxError),
    #[error("cannot create {path}: {error}")]
    Dir {
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

/// Runs the daemon until `cancel` fires. `model_dir` is the resolved backbone directory.
pub async fn run<B: ModelBackend>(
    config: Config,
    model_dir: PathBuf,
    device: B::Device,
    cancel: CancellationToken,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
) -> Result<(), DaemonError>
where
    B::Device: Send + Sync,
{
    zero_counters(&config);
    let store = Arc::new(Store::open_configured(&config.store)?);
    let index = crate::index::open(&config.index, &config.store.dir)?;
    let adapters_dir = config.adapters_dir();
    std::fs::create_dir_all(&adapters_dir).map_err(|error| DaemonError::Dir {
        path: adapters_dir.clone(),
        error,
    })?;
    // The backbone, loaded once (blocking: reads and hashes the weights), then the owner
    // makes the ledger, the serving model and the index agree.
    let (owner, handle, commands, backbone) = {
        let (config, store, index, cancel) =
            (config.clone(), store.clone(), index.clone(), cancel.clone());
        tokio::task::spawn_blocking(move || -> Result<_, DaemonError> {
            let backbone = Arc::new(Backbone::<B>::load(
                &model_dir,
                config.model.adapter.as_deref(),
                config.training.seed,
                config.model.embed_batch_size,
                config.model.backbone_precision,
                &device,
            )?);
            let (owner, handle, commands) =
                Owner::start(&config, store, index, backbone.clone(), cancel)?;
            Ok((owner, handle, commands, backbone))
        })
        .await
        .map_err(|e| DaemonError::Other(e.to_string()))??
    };
    let live = owner.live();
    let live_version = live.load().version;
    let training = Arc::new(AtomicBool::new(false));
    let ready = Arc::new(AtomicBool::new(false));
    let api = Arc::new(crate::http::Api {
        config: config.clone(),
        index: index.clone(),
        live: live.clone(),
        primary: Some(crate::http::Primary {
            store: store.clone(),
            versions: handle.clone(),
            training: training.clone(),
            thumbnails: crate::http::Thumbnails::new(
                config.http.max_concurrent_thumbnails,
                config.http.thumbnail_cache_bytes,
            ),
        }),
        ready: ready.clone(),
        encodes: Arc::new(tokio::sync::Semaphore::new(
            config.http.max_concurrent_encodes,
        )),
        metrics,
        cancel: cancel.clone(),
    });

    crate::stored::report_quarantine(&store);
    let listener = tokio::net::TcpListener::bind(&config.http.listen)
        .await
        .map_err(|error| DaemonError::Listen {
            address: config.http.listen.clone(),
            error,
        })?;
    tracing::info!(address = %config.http.listen, version = live_version, "serving");
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(async move {
        crate::http::serve(api, listener).await;
        Ok(())
    });
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
    // The owner and the trainer get one pool each: a long training run must not hold up
    // freshness.
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
        let pool = pool("index")?;
        tasks.spawn_blocking(move || {
            pool.install(|| owner.run(commands));
            Ok(())
        });
    }
    if config.training.enabled {
        let trainer = crate::train::trigger::Trainer {
            config: config.clone(),
            store: store.clone(),
            backbone,
            live,
            versions: handle,
            training,
            adapters_dir,
            cancel: cancel.clone(),
        };
        let pool = pool("train")?;
        tasks.spawn_blocking(move || {
            pool.install(|| trainer.run());
            Ok(())
        });
    } else {
        drop(handle);
    }
    ready.store(true, Ordering::SeqCst);
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

/// Histogram buckets (seconds) of every `*_seconds` series: from a search (milliseconds) to a
/// training run (up to an hour), so that dashboards can aggregate quantiles across instances.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0, 1800.0, 3600.0,
];

/// Installs the Prometheus recorder behind `/metrics` (`None` if one is installed already).
pub fn metrics_recorder() -> Option<metrics_exporter_prometheus::PrometheusHandle> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(SECONDS_BUCKETS)
        .expect("buckets are not empty")
        .install_recorder()
        .ok()
}

/// Counters of rare events exported as 0 from the start, so that an alert or a rate over
/// them sees a series (a counter first incremented an hour in is invisible until then).
fn zero_counters(config: &Config) {
    metrics::counter!("rsitrd_http_busy_total").increment(0);
    metrics::counter!("rsitrd_promotions_total").increment(0);
    for stage in ["search", "background"] {
        metrics::counter!("rsitrd_index_errors_total", "stage" => stage).increment(0);
    }
    for decision in ["promoted", "rejected"] {
        metrics::counter!("rsitrd_training_runs_total", "decision" => decision).increment(0);
    }
    if config.inbox.enabled {
        metrics::counter!("rsitrd_inbox_stuck_total").increment(0);
    }
    if config.amqp.enabled {
        metrics::counter!("rsitrd_amqp_reconnects_total").increment(0);
    }
}
