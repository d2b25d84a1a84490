//! The daemon's own rows in the ledger: adapter versions, the live pointer, training progress,
//! the promotion job, the gate's evaluation slice, cached evaluations and the run log. They
//! sit in the same redb file as the samples, so one transaction changes a version and
//! everything that describes it (there is no second source of truth), and the split index
//! ([`BY_SPLIT`](super::BY_SPLIT)) gives every stage bounded reads.
//!
//! The store knows nothing of models: an adapter is a file and its BLAKE3, metrics are named
//! numbers, a run record is JSON.

use std::collections::BTreeMap;
use std::path::PathBuf;

use rand::SeedableRng;
use rand::seq::index;
use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{
    BY_SPLIT, COUNTERS, QUARANTINE, SAMPLES, SampleId, SampleRecord, SampleSplit, Store,
    StoreError, counter, decode_record, ledger_error,
};

/// Version number → JSON [`VersionRecord`].
const VERSIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("versions");
/// `live`, `training`, `promotion`, `slice` → JSON of the matching row type.
const DAEMON: TableDefinition<&str, &[u8]> = TableDefinition::new("daemon");
/// `ADAPTER_ID/SLICE_ID` → JSON metrics: an adapter is evaluated once per slice.
const EVALS: TableDefinition<&str, &[u8]> = TableDefinition::new("evals");
/// Candidate version → JSON run record (what the run did and what the gate decided).
const RUNS: TableDefinition<u64, &[u8]> = TableDefinition::new("runs");
/// Switch number → JSON [`SwitchRecord`]: every change of the live version, in order.
const SWITCHES: TableDefinition<u64, &[u8]> = TableDefinition::new("switches");

const LIVE_ROW: &str = "live";
const TRAINING_ROW: &str = "training";
const PROMOTION_ROW: &str = "promotion";
const SLICE_ROW: &str = "slice";

pub(super) fn create_tables(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(BY_SPLIT).map_err(ledger_error)?;
    txn.open_table(VERSIONS).map_err(ledger_error)?;
    txn.open_table(DAEMON).map_err(ledger_error)?;
    txn.open_table(EVALS).map_err(ledger_error)?;
    txn.open_table(RUNS).map_err(ledger_error)?;
    txn.open_table(SWITCHES).map_err(ledger_error)?;
    Ok(())
}

/// An adapter checkpoint, content-addressed: whoever loads it checks the bytes against
/// `blake3`, so a reused file name can never serve another adapter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdapterFile {
    pub path: PathBuf,
    pub blake3: String,
}

/// One adapter version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionRecord {
    /// Adapter checkpoint; `None` = the untrained adapter (plain CLIP).
    pub adapter: Option<AdapterFile>,
    pub parent: Option<u64>,
    /// Gate metrics when it was made (percent), on the slice of its run.
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
    pub created_ms: u64,
    /// Change sequence number its index version is complete up to (when it last served).
    #[serde(default)]
    pub indexed_cursor: u64,
    /// `initial`, `promoted: …`, `rejected: …`, `kept: …`.
    pub decision: String,
}

impl VersionRecord {
    /// Identity of the adapter's weights (`untrained` for plain CLIP).
    pub fn adapter_id(&self) -> &str {
        self.adapter
            .as_ref()
            .map_or("untrained", |a| a.blake3.as_str())
    }
}

/// Which version serves, the versions that served before it, and how far its index is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LivePointer {
    pub version: u64,
    /// Versions in the order they served (for `keep_versions` and rollback).
    pub history: Vec<u64>,
    /// Change sequence number embedded into the live index version.
    pub embed_cursor: u64,
}

impl LivePointer {
    /// Index versions to keep: the live one and the `keep - 1` previous live ones.
    pub fn kept_versions(&self, keep: usize) -> Vec<u64> {
        let mut kept = Vec::new();
        for version in self.history.iter().rev() {
            if !kept.contains(version) {
                kept.push(*version);
            }
            if kept.len() >= keep {
                break;
            }
        }
        kept
    }
}

/// Continual training's position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingProgress {
    pub next_version: u64,
    /// Train samples (by ordinal in the split) that finished runs have taken as new.
    pub trained_upto: u64,
    pub last_train_ms: u64,
    /// The best version promoted so far (by its mR on the gate's current slice): a candidate
    /// must also come within tolerance of it, so promotions cannot drift down step by step.
    pub best: Option<u64>,
    /// `POST /v1/train` asked for a run that has not finished yet (a crash re-runs it).
    #[serde(default)]
    pub requested: bool,
}

/// A promotion in progress: the corpus up to `stop_at` is re-embedded into `version`; changes
/// after `stop_at` reach it by the freshness dual write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Promotion {
    pub version: u64,
    /// The live embed cursor when the promotion began: the re-embed ends here.
    pub stop_at: u64,
    /// Change sequence number re-embedded so far.
    pub cursor: u64,
}

/// The gate's fixed evaluation slice: val samples by id, and an identity for its metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateSlice {
    /// Increases with every rebuild.
    pub number: u64,
    /// BLAKE3 of the sample ids (hex, 16 digits): cached metrics are keyed by it.
    pub id: String,
    /// Val samples (by ordinal) that existed when it was built.
    pub val_upto: u64,
    pub samples: Vec<SampleId>,
}

impl GateSlice {
    pub fn new(number: u64, val_upto: u64, mut samples: Vec<SampleId>) -> Self {
        samples.sort_unstable();
        samples.dedup();
        let mut hasher = blake3::Hasher::new();
        for id in &samples {
            hasher.update(&id.0);
        }
        let id = hasher.finalize().to_hex()[..16].to_string();
        Self {
            number,
            id,
            val_upto,
            samples,
        }
    }
}

/// One change of the live version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchRecord {
    pub at_ms: u64,
    pub from: u64,
    pub to: u64,
    /// `promotion` or `rollback`.
    pub kind: String,
}

/// The daemon's rows, read together.
#[derive(Debug, Clone, PartialEq)]
pub struct DaemonLedger {
    pub live: LivePointer,
    pub training: TrainingProgress,
    pub promotion: Option<Promotion>,
    pub slice: Option<GateSlice>,
}

/// One change of the daemon's rows; [`Store::apply`] commits a list in one transaction.
#[derive(Debug, Clone)]
pub enum LedgerChange {
    Version(u64, VersionRecord),
    Live(LivePointer),
    Training(TrainingProgress),
    Promotion(Option<Promotion>),
    Slice(GateSlice),
    Eval {
        adapter: String,
        slice: String,
        metrics: BTreeMap<String, f64>,
    },
    Run(u64, serde_json::Value),
    /// Appended to the switch history.
    Switch(SwitchRecord),
}

fn to_json(value: &impl Serialize) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(ledger_error)
}

fn from_json<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        what: what.to_string(),
        reason: e.to_string(),
    })
}

/// The record of `id` unless it is quarantined or unknown.
fn usable_record(
    samples: &impl ReadableTable<[u8; 32], &'static [u8]>,
    quarantine: &impl ReadableTable<[u8; 32], &'static [u8]>,
    id: &SampleId,
) -> Result<Option<SampleRecord>, StoreError> {
    if quarantine.get(id.0).map_err(ledger_error)?.is_some() {
        return Ok(None);
    }
    match samples.get(id.0).map_err(ledger_error)? {
        Some(bytes) => Ok(Some(decode_record(id, bytes.value())?)),
        None => Ok(None),
    }
}

fn eval_key(adapter: &str, slice: &str) -> String {
    format!("{adapter}/{slice}")
}

impl Store {
    /// Builds the split index of a ledger written before it existed (one pass, once).
    pub(super) fn index_splits(&self) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(ledger_error)?;
        {
            let mut by_split = txn.open_table(BY_SPLIT).map_err(ledger_error)?;
            let counters = txn.open_table(COUNTERS).map_err(ledger_error)?;
            let expected = counter(&counters, "train")? + counter(&counters, "val")?;
            if by_split.len().map_err(ledger_error)? == expected {
                return Ok(());
            }
            let samples = txn.open_table(SAMPLES).map_err(ledger_error)?;
            let mut all = Vec::new();
            for entry in samples.iter().map_err(ledger_error)? {
                let (key, bytes) = entry.map_err(ledger_error)?;
                let id = SampleId(key.value());
                let record = decode_record(&id, bytes.value())?;
                all.push((record.created_seq, record.split.code(), id));
            }
            all.sort_unstable();
            by_split.retain(|_, _| false).map_err(ledger_error)?;
            let mut next = [0u64; 2];
            for (_, code, id) in all {
                let ordinal = &mut next[code as usize];
                by_split
                    .insert((code, *ordinal), id.0)
                    .map_err(ledger_error)?;
                *ordinal += 1;
            }
            tracing::info!(
                train = next[0],
                val = next[1],
                "built the ledger's split index"
            );
        }
        txn.commit().map_err(ledger_error)?;
        Ok(())
    }

    /// Samples created in `split` so far (a counter, not a scan).
    pub fn split_len(&self, split: SampleSplit) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().map_err(ledger_error)?;
        let counters = txn.open_table(COUNTERS).map_err(ledger_error)?;
        counter(&counters, split.as_str())
    }

    /// The samples of `split` with ordinals in `from..to` (quarantined ones left out), in
    /// creation order.
    pub fn split_range(
        &self,
        split: SampleSplit,
        from: u64,
        to: u64,
    ) -> Result<Vec<SampleRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(ledger_error)?;
        let by_split = txn.open_table(BY_SPLIT).map_err(ledger_error)?;
        let samples = txn.open_table(SAMPLES).map_err(ledger_error)?;
        let quarantine = txn.open_table(QUARANTINE).map_err(ledger_error)?;
        let mut out = Vec::new();
        if from >= to {
            return Ok(out);
        }
        for entry in by_split
            .range((split.code(), from)..(split.code(), to))
            .map_err(ledger_error)?
        {
            let id = SampleId(entry.map_err(ledger_error)?.1.value());
            out.extend(usable_record(&samples, &quarantine, &id)?);
        }
        Ok(out)
    }

    /// A seeded uniform sample of up to `count` samples of `split` among its first `upto`
    /// (quarantined ones left out): point lookups, bounded by `count`, not by the corpus.
    pub fn sample_split(
        &self,
        split: SampleSplit,
        upto: u64,
        count: usize,
        seed: u64,
    ) -> Result<Vec<SampleRecord>, StoreError> {
        let upto = upto.min(self.split_len(split)?);
        let count = (count as u64).min(upto) as usize;
        if count == 0 {
            return Ok(Vec::new());
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let population = usize::try_from(upto).map_err(|_| ledger_error("split too large"))?;
        let mut chosen: Vec<u64> = index::sample(&mut rng, population, count)
            .into_iter()
            .map(|i| i as u64)
            .collect();
        chosen.sort_unstable();
        self.split_ordinals(split, &chosen)
    }

    /// The samples of `split` at these ordinals (missing or quarantined ones left out).
    pub fn split_ordinals(
        &self,
        split: SampleSplit,
        ordinals: &[u64],
    ) -> Result<Vec<SampleRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(ledger_error)?;
        let by_split = txn.open_table(BY_SPLIT).map_err(ledger_error)?;
        let samples = txn.open_table(SAMPLES).map_err(ledger_error)?;
        let quarantine = txn.open_table(QUARANTINE).map_err(ledger_error)?;
        let mut out = Vec::with_capacity(ordinals.len());
        for &ordinal in ordinals {
            let Some(id) = by_split
                .get((split.code(), ordinal))
                .map_err(ledger_error)?
                .map(|v| SampleId(v.value()))
            else {
                continue;
            };
            out.extend(usable_record(&samples, &quarantine, &id)?);
        }
        Ok(out)
    }

    /// The ids of `split` at these ordinals (no record decoded).
    pub fn split_ids(
        &self,
        split: SampleSplit,
        ordinals: impl IntoIterator<Item = u64>,
    ) -> Result<Vec<SampleId>, StoreError> {
        let txn = self.db.begin_read().map_err(ledger_error)?;
        let by_split = txn.open_table(BY_SPLIT).map_err(ledger_error)?;
        let mut out = Vec::new();
        for ordinal in ordinals {
            if let Some(id) = by_split
                .get((split.code(), ordinal))
                .map_err(ledger_error)?
            {
                out.push(SampleId(id.value()));
            }
        }
        Ok(out)
    }

    /// Stored samples by id (unknown or quarantined ones left out), in the given order.
    pub fn records(&self, ids: &[SampleId]) -> Result<Vec<SampleRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(ledger_error)?;
        let samples = txn.open_table(SAMPLES).map_err(ledger_error)?;
        let quarantine = txn.open_table(QUARANTINE).map_err(ledger_error)?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            out.extend(usable_record(&samples, &quarantine, id)?);
        }
        Ok(out)
    }

    /// The number of train samples created at or before change `created_seq` (to convert
    /// an old state file's cursor into an ordinal): a binary search over the split index.
    pub fn train_ordinal_after(&self, created_seq: u64) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().map_err(ledger_error)?;
        let by_split = txn.open_table(BY_SPLIT).map_err(ledger_error)?;
        let samples = txn.open_table(SAMPLES).map_err(ledger_error)?;
        let counters = txn.open_table(COUNTERS).map_err(ledger_error)?;
        let (mut low, mut high) = (0u64, counter(&counters, "train")?);
        let code = SampleSplit::Train.code();
        while low < high {
            let mid = low + (high - low) / 2;
            let id = by_split
                .get((code, mid))
                .map_err(ledger_error)?
                .map(|v| SampleId(v.value()))
                .ok_or_else(|| ledger_error(format!("split index has no train ordinal {mid}")))?;
            let bytes = samples
                .get(id.0)
                .map_err(ledger_error)?
                .ok_or(StoreError::UnknownSample(id))?;
            if decode_record(&id, bytes.value())?.created_seq <= created_seq {
                low = mid + 1;
            } else {
                high = mid;
            }
        }
        Ok(low)
    }

    /// The daemon's rows; `None` before the first start.
    pub fn daemon_ledger(&self) -> Result<Option<DaemonLedger>, StoreError> {
        read_daemon_ledger(&self.db)
    }

    pub fn version(&self, version: u64) -> Result<Option<VersionRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(ledger_error)?;
        let table = txn.open_table(VERSIONS).map_err(ledger_error)?;
        match table.get(version).map_err(ledger_error)? {
            Some(bytes) => Ok(Some(from_json(
                &format!("version {version}"),
                bytes.value(),
            )?)),
            None => Ok(None),
        }
    }

    /// The newest `limit` versions, newest first.
    pub fn recent_versions(&self, limit: usize) -> Result<Vec<(u64, VersionRecord)>, StoreError> {
        let txn = self.db.begin_read().map_err(ledger_error)?;
        let table = txn.open_table(VERSIONS).map_err(ledger_error)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(ledger_error)?.rev().take(limit) {
            let (key, bytes) = entry.map_err(ledger_error)?;
            let version = key.value();
            out.push((
                version,
                from_json(&format!("version {version}"), bytes.value())?,
            ));
        }
        Ok(out)
    }

    /// The newest `limit` run records, newest first.
    pub fn recent_runs(&self, limit: usize) -> Result<Vec<serde_json::Value>, StoreError> {
        let txn = self.db.begin_read().map_err(ledger_error)?;
        let table = txn.open_table(RUNS).map_err(ledger_error)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(ledger_error)?.rev().take(limit) {
            let (key, bytes) = entry.map_err(ledger_error)?;
            out.push(from_json(&format!("run {}", key.value()), bytes.value())?);
        }
        Ok(out)
    }

    /// The newest `limit` switches of the live version, newest first.
    pub fn recent_switches(&self, limit: usize) -> Result<Vec<SwitchRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(ledger_error)?;
        let table = txn.open_table(SWITCHES).map_err(ledger_error)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(ledger_error)?.rev().take(limit) {
            let (key, bytes) = entry.map_err(ledger_error)?;
            out.push(from_json(
                &format!("switch {}", key.value()),
                bytes.value(),
            )?);
        }
        Ok(out)
    }

    /// Cached metrics of `adapter` on slice `slice`.
    pub fn cached_eval(
        &self,
        adapter: &str,
        slice: &str,
    ) -> Result<Option<BTreeMap<String, f64>>, StoreError> {
        let txn = self.db.begin_read().map_err(ledger_error)?;
        let table = txn.open_table(EVALS).map_err(ledger_error)?;
        let key = eval_key(adapter, slice);
        match table.get(key.as_str()).map_err(ledger_error)? {
            Some(bytes) => Ok(Some(from_json(&format!("eval {key}"), bytes.value())?)),
            None => Ok(None),
        }
    }

    /// Commits `changes` in one durable transaction.
    pub fn apply(&self, changes: &[LedgerChange]) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(ledger_error)?;
        {
            let mut versions = txn.open_table(VERSIONS).map_err(ledger_error)?;
            let mut daemon = txn.open_table(DAEMON).map_err(ledger_error)?;
            let mut evals = txn.open_table(EVALS).map_err(ledger_error)?;
            let mut runs = txn.open_table(RUNS).map_err(ledger_error)?;
            let mut switches = txn.open_table(SWITCHES).map_err(ledger_error)?;
            for change in changes {
                match change {
                    LedgerChange::Version(version, record) => {
                        versions
                            .insert(*version, to_json(record)?.as_slice())
                            .map_err(ledger_error)?;
                    }
                    LedgerChange::Live(live) => {
                        daemon
                            .insert(LIVE_ROW, to_json(live)?.as_slice())
                            .map_err(ledger_error)?;
                    }
                    LedgerChange::Training(training) => {
                        daemon
                            .insert(TRAINING_ROW, to_json(training)?.as_slice())
                            .map_err(ledger_error)?;
                    }
                    LedgerChange::Promotion(promotion) => {
                        daemon
                            .insert(PROMOTION_ROW, to_json(promotion)?.as_slice())
                            .map_err(ledger_error)?;
                    }
                    LedgerChange::Slice(slice) => {
                        daemon
                            .insert(SLICE_ROW, to_json(slice)?.as_slice())
                            .map_err(ledger_error)?;
                    }
                    LedgerChange::Eval {
                        adapter,
                        slice,
                        metrics,
                    } => {
                        evals
                            .insert(
                                eval_key(adapter, slice).as_str(),
                                to_json(metrics)?.as_slice(),
                            )
                            .map_err(ledger_error)?;
                    }
                    LedgerChange::Run(version, record) => {
                        runs.insert(*version, to_json(record)?.as_slice())
                            .map_err(ledger_error)?;
                    }
                    LedgerChange::Switch(record) => {
                        let next = match switches.last().map_err(ledger_error)? {
                            Some((key, _)) => key.value() + 1,
                            None => 1,
                        };
                        switches
                            .insert(next, to_json(record)?.as_slice())
                            .map_err(ledger_error)?;
                    }
                }
            }
        }
        txn.commit().map_err(ledger_error)?;
        Ok(())
    }
}

impl super::StoreReader {
    /// The daemon's rows, read beside the daemon (or from a stopped one's ledger).
    pub fn daemon_ledger(&self) -> Result<Option<DaemonLedger>, StoreError> {
        match self {
            Self::Ledger(db) => read_daemon_ledger(db),
            Self::Copy { db, .. } => read_daemon_ledger(db.as_ref()),
            Self::Empty => Ok(None),
        }
    }
}

fn read_daemon_ledger(db: &impl ReadableDatabase) -> Result<Option<DaemonLedger>, StoreError> {
    let txn = db.begin_read().map_err(ledger_error)?;
    let daemon = match txn.open_table(DAEMON) {
        Ok(table) => table,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(error) => return Err(ledger_error(error)),
    };
    let row = |key: &str| -> Result<Option<Vec<u8>>, StoreError> {
        Ok(daemon
            .get(key)
            .map_err(ledger_error)?
            .map(|v| v.value().to_vec()))
    };
    let Some(live) = row(LIVE_ROW)? else {
        return Ok(None);
    };
    let training = row(TRAINING_ROW)?
        .ok_or_else(|| ledger_error("the ledger has a live row but no training row"))?;
    Ok(Some(DaemonLedger {
        live: from_json("live pointer", &live)?,
        training: from_json("training progress", &training)?,
        promotion: match row(PROMOTION_ROW)? {
            Some(bytes) => from_json("promotion", &bytes)?,
            None => None,
        },
        slice: match row(SLICE_ROW)? {
            Some(bytes) => Some(from_json("gate slice", &bytes)?),
            None => None,
        },
    }))
}
