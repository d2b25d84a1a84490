//! The daemon's continual trainer: waits for a trigger (enough new training samples, the
//! interval, or `POST /v1/train`), trains a candidate from the live adapter on new plus
//! replayed samples, has the gate judge it on the slice, saves it content-addressed, and
//! hands the run's ledger rows (and the candidate, when promoted) to the version owner.
//!
//! Every read is bounded by the run: new samples are a range of the train split's ordinals,
//! replay is point lookups, the gate reads its slice. Nothing scans the ledger.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use burn::backend::Autodiff;
use burn::prelude::*;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::continual::{self, ContinualError};
use super::gate::{self, Side};
use crate::config::Config;
use crate::eval::RetrievalMetrics;
use crate::model::Embedder;
use crate::model::kernels::ModelBackend;
use crate::serve::{Backbone, Live};
use crate::store::ledger::{
    DaemonLedger, GateSlice, LedgerChange, TrainingProgress, VersionRecord,
};
use crate::store::{SampleSplit, Store, now_ms};
use crate::versions::Handle;

/// Most new samples one training run takes (older ones wait for the next run).
pub const MAX_NEW_PER_RUN: u64 = 4096;
/// How often the trigger is checked.
const POLL: Duration = Duration::from_secs(1);

/// What a run did and what the gate decided (the ledger's run log, `/v1/status`).
#[derive(Debug, Clone, Serialize)]
pub struct RunRecord {
    pub version: u64,
    pub parent: u64,
    pub decision: String,
    pub promoted: bool,
    pub live_metrics: Option<RetrievalMetrics>,
    pub candidate_metrics: Option<RetrievalMetrics>,
    /// The best promoted version the candidate was also compared with, and its slice metrics.
    pub best_version: Option<u64>,
    pub best_metrics: Option<RetrievalMetrics>,
    /// The gate slice: number, identity, samples evaluated.
    pub slice: Option<SliceRef>,
    pub adapter_blake3: String,
    pub new_samples: usize,
    pub replayed: usize,
    pub steps: usize,
    pub first_loss: f32,
    pub last_loss: f32,
    pub duration_s: f64,
    pub finished_ms: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SliceRef {
    pub number: u64,
    pub id: String,
    pub samples: usize,
}

/// The trainer's parts.
pub struct Trainer<B: Backend> {
    pub config: Config,
    pub store: Arc<Store>,
    pub backbone: Arc<Backbone<B>>,
    pub live: Arc<Live<B>>,
    pub versions: Handle<B>,
    /// A run is in progress (for `/v1/status`).
    pub training: Arc<AtomicBool>,
    pub adapters_dir: PathBuf,
    pub cancel: CancellationToken,
}

impl<B: ModelBackend> Trainer<B> {
    /// Runs until cancelled.
    pub fn run(&self) {
        while !self.cancel.is_cancelled() {
            self.sleep(POLL);
            if self.cancel.is_cancelled() {
                break;
            }
            if let Err(error) = self.turn() {
                match error {
                    // A shutdown, not a failure: nothing to page anyone about.
                    ContinualError::Cancelled => tracing::info!(
                        "training run cancelled by shutdown: it runs again after the restart"
                    ),
                    error => {
                        tracing::error!(%error, "training run failed: it runs again at the next trigger")
                    }
                }
            }
        }
    }

    fn sleep(&self, duration: Duration) {
        let deadline = Instant::now() + duration;
        while Instant::now() < deadline && !self.cancel.is_cancelled() {
            std::thread::sleep(Duration::from_millis(50).min(deadline - Instant::now()));
        }
    }

    /// Checks the trigger and runs once if it is due.
    pub fn turn(&self) -> Result<(), ContinualError> {
        let Some(ledger) = self.store.daemon_ledger()? else {
            return Ok(());
        };
        if ledger.promotion.is_some() {
            return Ok(());
        }
        let training = &ledger.training;
        let pending = self
            .store
            .split_len(SampleSplit::Train)?
            .saturating_sub(training.trained_upto);
        let config = &self.config.training;
        let due = pending >= config.min_new_samples
            || (pending > 0
                && now_ms().saturating_sub(training.last_train_ms)
                    >= config.interval.as_millis() as u64);
        if !(due || (training.requested && pending > 0)) {
            if training.requested {
                tracing::info!("training requested, but no new training samples");
                self.versions
                    .clear_training_request()
                    .map_err(|e| ContinualError::Versions(e.to_string()))?;
            }
            return Ok(());
        }
        self.training.store(true, Ordering::SeqCst);
        let result = self.run_once(&ledger);
        self.training.store(false, Ordering::SeqCst);
        crate::model::device::release_free_memory();
        result
    }

    /// One training run, gated, handed to the version owner.
    pub fn run_once(&self, ledger: &DaemonLedger) -> Result<(), ContinualError> {
        let started = Instant::now();
        let config = &self.config;
        let limits = config.image_limits();
        let training = &ledger.training;
        let upto = self
            .store
            .split_len(SampleSplit::Train)?
            .min(training.trained_upto + MAX_NEW_PER_RUN);
        let new = self
            .store
            .split_range(SampleSplit::Train, training.trained_upto, upto)?;
        let version = training.next_version;
        let live = self.live.load_full();
        let parent = live.version;
        let seed = config.training.seed.wrapping_add(version);
        let replay_count = (new.len() as f64 * config.training.replay_ratio).round() as usize;
        let replay = self.store.sample_split(
            SampleSplit::Train,
            training.trained_upto,
            replay_count,
            seed,
        )?;
        let mut samples = new.clone();
        samples.extend(replay.iter().cloned());
        tracing::info!(
            version,
            parent,
            new = new.len(),
            replayed = replay.len(),
            "training run"
        );
        let candidate = match continual::train_candidate::<Autodiff<B>>(
            &live.embedder,
            &samples,
            &self.store,
            &config.training,
            seed,
            &limits,
            self.backbone.device(),
            &self.cancel,
        ) {
            Ok(candidate) => candidate,
            // Nothing usable to train on (all quarantined): move past them.
            Err(ContinualError::NoSamples) if new.len() < 2 => {
                let progress = TrainingProgress {
                    trained_upto: upto,
                    requested: false,
                    ..training.clone()
                };
                return self
                    .versions
                    .submit_candidate(
                        version,
                        parent,
                        vec![LedgerChange::Training(progress)],
                        None,
                    )
                    .map_err(|e| ContinualError::Versions(e.to_string()));
            }
            Err(error) => return Err(error),
        };

        // The gate, on the slice (none read when the gate is off).
        let mut changes = Vec::new();
        let slice = if config.gate.enabled {
            gate::slice_for_run(
                &self.store,
                ledger.slice.as_ref(),
                &config.gate,
                config.store.split_seed,
            )?
        } else {
            None
        };
        let slice = slice.map(|(slice, rebuilt)| {
            if rebuilt {
                changes.push(LedgerChange::Slice(slice.clone()));
            }
            slice
        });
        let records = match &slice {
            Some(slice) => self.store.records(&slice.samples)?,
            None => Vec::new(),
        };
        let needed = config.gate.min_slice();
        let judged = candidate.finite && records.len() >= needed;
        let (mut live_metrics, mut best_side, mut best_metrics, mut candidate_metrics) =
            (None, None, None, None);
        let mut best = training.best;
        let mut verdict = gate::decide(
            candidate.finite,
            records.len(),
            &config.gate,
            f64::NAN,
            Side {
                version: parent,
                mr: f64::NAN,
            },
            None,
        );
        if judged {
            let slice = slice.as_ref().expect("judged only with a slice");
            let live_m = self.metrics_on(
                slice,
                &records,
                &live.adapter_id,
                &live.embedder,
                &mut changes,
            )?;
            let cand_m = continual::evaluate_on_store(
                &candidate.embedder,
                &self.store,
                &records,
                &limits,
                &self.cancel,
            )?;
            // The best promoted version on this slice (the live one when none is recorded,
            // or when its adapter can no longer be loaded: a lost file must not stall every
            // later run).
            let recorded = training
                .best
                .filter(|&v| v != parent)
                .map(|v| self.store.version(v).map(|record| (v, record)))
                .transpose()?;
            let loaded = match recorded {
                Some((v, Some(record))) => {
                    match self.backbone.with_adapter(record.adapter.as_ref()) {
                        Ok(embedder) => Some((v, record, embedder)),
                        Err(error) => {
                            tracing::warn!(%error, version = v, "the best version's adapter cannot be loaded: the gate compares with the live version only");
                            None
                        }
                    }
                }
                _ => None,
            };
            let (best_version, best_m) = match loaded {
                Some((v, record, embedder)) => (
                    v,
                    self.metrics_on(
                        slice,
                        &records,
                        record.adapter_id(),
                        &embedder,
                        &mut changes,
                    )?,
                ),
                None => (parent, live_m),
            };
            let (live_mr, best_mr) = (live_m.mr, best_m.mr);
            best_side = Some(Side {
                version: best_version,
                mr: best_mr,
            });
            verdict = gate::decide(
                true,
                records.len(),
                &config.gate,
                cand_m.mr,
                Side {
                    version: parent,
                    mr: live_mr,
                },
                best_side.filter(|b| b.version != parent),
            );
            // Best so far: the better of the recorded best and the live; the candidate if it
            // is promoted and better still.
            best = Some(if live_mr > best_mr {
                parent
            } else {
                best_version
            });
            let best_now = live_mr.max(best_mr);
            if verdict.promote && cand_m.mr > best_now {
                best = Some(version);
            }
            live_metrics = Some(live_m);
            best_metrics = Some(best_m);
            candidate_metrics = Some(cand_m);
        }
        let nan = RetrievalMetrics::nan();
        let meta = continual::candidate_meta(
            candidate.embedder.adapter_config.clone(),
            &candidate.embedder.base,
            version,
            parent,
            candidate_metrics.as_ref().unwrap_or(&nan),
            humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        );
        let file = continual::save_candidate(&candidate.embedder, &meta, &self.adapters_dir)?;
        if let (Some(slice), Some(metrics)) = (&slice, &candidate_metrics) {
            changes.push(LedgerChange::Eval {
                adapter: file.blake3.clone(),
                slice: slice.id.clone(),
                metrics: metrics.to_map(),
            });
        }
        let run = RunRecord {
            version,
            parent,
            decision: verdict.decision.clone(),
            promoted: verdict.promote,
            live_metrics,
            candidate_metrics,
            best_version: best_side.map(|b| b.version),
            best_metrics,
            slice: slice.as_ref().map(|s| SliceRef {
                number: s.number,
                id: s.id.clone(),
                samples: records.len(),
            }),
            adapter_blake3: file.blake3.clone(),
            new_samples: new.len(),
            replayed: replay.len(),
            steps: candidate.steps,
            first_loss: candidate.first_loss,
            last_loss: candidate.last_loss,
            duration_s: started.elapsed().as_secs_f64(),
            finished_ms: now_ms(),
        };
        changes.push(LedgerChange::Version(
            version,
            VersionRecord {
                adapter: Some(file),
                parent: Some(parent),
                metrics: meta.metrics.clone(),
                created_ms: now_ms(),
                indexed_cursor: 0,
                decision: verdict.decision.clone(),
            },
        ));
        changes.push(LedgerChange::Run(
            version,
            serde_json::to_value(&run).expect("run record serializes"),
        ));
        changes.push(LedgerChange::Training(TrainingProgress {
            next_version: version + 1,
            trained_upto: upto,
            last_train_ms: now_ms(),
            best,
            requested: false,
        }));
        let mut embedder = candidate.embedder;
        embedder.adapter_meta = Some(meta);
        let promote = verdict.promote.then_some(embedder);
        self.versions
            .submit_candidate(version, parent, changes, promote)
            .map_err(|e| ContinualError::Versions(e.to_string()))?;
        append_run_log(&self.adapters_dir.join("runs.jsonl"), &run);
        let label = if verdict.promote {
            "promoted"
        } else {
            "rejected"
        };
        metrics::counter!("rsitrd_training_runs_total", "decision" => label).increment(1);
        metrics::histogram!("rsitrd_training_run_seconds").record(run.duration_s);
        tracing::info!(version, parent, decision = %verdict.decision, duration_s = run.duration_s, "training run finished");
        Ok(())
    }

    /// Metrics of an adapter on the slice: cached in the ledger, evaluated once per slice.
    fn metrics_on(
        &self,
        slice: &GateSlice,
        records: &[crate::store::SampleRecord],
        adapter_id: &str,
        embedder: &Embedder<B>,
        changes: &mut Vec<LedgerChange>,
    ) -> Result<RetrievalMetrics, ContinualError> {
        if let Some(cached) = self.store.cached_eval(adapter_id, &slice.id)?
            && let Some(metrics) = RetrievalMetrics::from_map(&cached)
        {
            return Ok(metrics);
        }
        let metrics = continual::evaluate_on_store(
            embedder,
            &self.store,
            records,
            &self.config.image_limits(),
            &self.cancel,
        )?;
        changes.push(LedgerChange::Eval {
            adapter: adapter_id.to_string(),
            slice: slice.id.clone(),
            metrics: metrics.to_map(),
        });
        Ok(metrics)
    }
}

/// Appends a run to `runs.jsonl` beside the adapters (a log for people; the ledger's run
/// rows are the record).
fn append_run_log(path: &std::path::Path, run: &RunRecord) {
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
