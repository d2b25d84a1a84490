//! `rsitrd serve`: a stateless query replica. It serves search and embed only (no ingest, no
//! training) from the same Qdrant server as the primary and the primary's adapter directory,
//! and follows the alias: when the primary promotes or rolls back, the replica loads the
//! adapter that made the new live version's vectors (named by the collection's metadata,
//! checked against its BLAKE3) on its one backbone, then swaps. Every query is encoded with
//! the replica's current adapter and searches that adapter's own version, so an answer never
//! mixes an encoder with another adapter's vectors, even between the primary's switch and the
//! replica's.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::daemon::DaemonError;
use crate::index::VectorIndex;
use crate::model::kernels::ModelBackend;
use crate::serve::{Backbone, Live, ServingModel};
use crate::store::ledger::AdapterFile;

/// How often the replica reads the alias.
const FOLLOW_POLL: Duration = Duration::from_millis(500);

/// The adapter checkpoint whose BLAKE3 is `adapter_id`, in `dir` (named `vN-PREFIX.safetensors`
/// by the primary; the full hash is checked when it is loaded).
fn adapter_file(dir: &Path, adapter_id: &str) -> Option<AdapterFile> {
    let suffix = format!("-{}.safetensors", adapter_id.get(..12)?);
    let entries = std::fs::read_dir(dir).ok()?;
    entries
        .flatten()
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.ends_with(&suffix))
        })
        .map(|path| AdapterFile {
            path,
            blake3: adapter_id.to_string(),
        })
}

/// Serves the version the alias names: `Ok(true)` when it swapped.
fn follow<B: ModelBackend>(
    index: &dyn VectorIndex,
    backbone: &Backbone<B>,
    live: &Live<B>,
    adapters: &Path,
) -> Result<bool, String> {
    let Some(version) = index.live().map_err(|e| e.to_string())? else {
        return Err("the alias names no version yet".into());
    };
    if live.load().version == version {
        return Ok(false);
    }
    let info = index
        .version_info(version)
        .map_err(|e| e.to_string())?
        .ok_or(format!("version {version} records no encoder"))?;
    if info.base_model != backbone.base().fingerprint {
        return Err(format!(
            "version {version} was made with backbone {}, this replica loaded {}",
            info.base_model,
            backbone.base().fingerprint
        ));
    }
    let embedder = if info.adapter_id == "untrained" {
        backbone.untrained()
    } else {
        let file = adapter_file(adapters, &info.adapter_id).ok_or(format!(
            "no adapter {} in {}",
            info.adapter_id,
            adapters.display()
        ))?;
        backbone
            .with_adapter(Some(&file))
            .map_err(|e| e.to_string())?
    };
    live.store(Arc::new(ServingModel {
        version,
        adapter_id: info.adapter_id,
        embedder,
        metrics: Default::default(),
    }));
    Ok(true)
}

/// Runs a replica until `cancel` fires.
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
    let index = crate::index::open(&config.index, &config.store.dir)?;
    let adapters = config.adapters_dir();
    let (backbone, live) = {
        let (config, index, adapters) = (config.clone(), index.clone(), adapters.clone());
        tokio::task::spawn_blocking(move || -> Result<_, DaemonError> {
            let backbone = Backbone::<B>::load(
                &model_dir,
                config.model.adapter.as_deref(),
                config.training.seed,
                config.model.embed_batch_size,
                config.model.backbone_precision,
                &device,
            )?;
            // Until the alias is read: nothing served (version u64::MAX matches no alias).
            let live = crate::serve::live(ServingModel {
                version: u64::MAX,
                adapter_id: String::new(),
                embedder: backbone.untrained(),
                metrics: Default::default(),
            });
            let mut waited = 0;
            loop {
                match follow(index.as_ref(), &backbone, &live, &adapters) {
                    Ok(_) => break,
                    Err(error) if waited < 120 => {
                        if waited == 0 {
                            tracing::warn!(%error, "waiting for the primary's live version");
                        }
                        waited += 1;
                        std::thread::sleep(Duration::from_secs(1));
                    }
                    Err(error) => return Err(DaemonError::Other(error)),
                }
            }
            Ok((Arc::new(backbone), live))
        })
        .await
        .map_err(|e| DaemonError::Other(e.to_string()))??
    };
    let ready = Arc::new(AtomicBool::new(true));
    let api = Arc::new(crate::http::Api {
        config: config.clone(),
        index: index.clone(),
        live: live.clone(),
        primary: None,
        ready,
        encodes: Arc::new(tokio::sync::Semaphore::new(
            config.http.max_concurrent_encodes,
        )),
        metrics,
        cancel: cancel.clone(),
    });
    let listener = tokio::net::TcpListener::bind(&config.http.listen)
        .await
        .map_err(|error| DaemonError::Listen {
            address: config.http.listen.clone(),
            error,
        })?;
    tracing::info!(address = %config.http.listen, version = live.load().version, "serving as a query replica");
    let follower = {
        let cancel = cancel.clone();
        std::thread::spawn(move || {
            let mut failing = false;
            while !cancel.is_cancelled() {
                match follow(index.as_ref(), &backbone, &live, &adapters) {
                    Ok(true) => {
                        failing = false;
                        metrics::counter!("rsitrd_replica_swaps_total").increment(1);
                        tracing::info!(
                            version = live.load().version,
                            "following the alias: swapped"
                        );
                    }
                    Ok(false) => failing = false,
                    Err(error) => {
                        if !failing {
                            tracing::warn!(%error, "cannot follow the alias: still serving the previous version");
                        }
                        failing = true;
                    }
                }
                std::thread::sleep(FOLLOW_POLL);
            }
        })
    };
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    crate::http::serve(api, listener).await;
    cancel.cancel();
    let _ = follower.join();
    Ok(())
}
