//! The durable sample store, the single source of truth for ingested data: a `redb` ledger
//! (samples, captions, metadata, split, source, arrival, rejects, counters) and a
//! content-addressed blob directory (sample id = BLAKE3 of the image bytes).
//!
//! Durability: a batch writes its blobs temp → fsync → rename → fsync(dir) first, then commits
//! the ledger in one transaction (redb `Durability::Immediate`, i.e. fsynced). Only after
//! [`Store::commit_batch`] returns may a source acknowledge its deliveries. A crash between the
//! two leaves an unreferenced blob that the next delivery of the same image reuses.
//!
//! The ledger opens in redb's single-writer mode: one process (the daemon) writes, and any
//! number of others (`rsitrd stats`) may open it read-only at the same time.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{
    Builder, ConcurrencyMode, Database, ReadOnlyDatabase, ReadableDatabase, ReadableTable,
    ReadableTableMetadata, TableDefinition,
};
use serde::{Deserialize, Serialize};

pub mod ledger;
pub mod writer;

/// Sample id (BLAKE3 of the image bytes) → JSON [`SampleRecord`].
const SAMPLES: TableDefinition<[u8; 32], &[u8]> = TableDefinition::new("samples");
/// Change sequence number → sample id; a sample appears once, under its latest change.
const BY_SEQ: TableDefinition<u64, [u8; 32]> = TableDefinition::new("samples_by_seq");
/// Hash of the rejected input → JSON [`RejectRecord`] (idempotent: a re-delivered reject
/// counts once).
const REJECTS: TableDefinition<[u8; 32], &[u8]> = TableDefinition::new("rejects");
/// (unix ms, reject key) → (): the rejects in time order, so that the latest reasons are a
/// bounded read (written in the reject's own transaction).
const REJECTS_BY_TIME: TableDefinition<(u64, [u8; 32]), ()> =
    TableDefinition::new("rejects_by_time");
/// Sample id → JSON [`QuarantineRecord`]: stored samples that a stage cannot use (their
/// image no longer decodes within the limits, their blob is gone). Every stage skips them
/// until an operator releases them.
const QUARANTINE: TableDefinition<[u8; 32], &[u8]> = TableDefinition::new("quarantine");
/// (split, ordinal within the split) → sample id: the n-th sample created in each split, so
/// that training, replay and the gate's slice read exactly the samples they need (bounded
/// work, never a scan of the whole ledger). Ordinals follow creation order and never change.
const BY_SPLIT: TableDefinition<(u8, u64), [u8; 32]> = TableDefinition::new("samples_by_split");
/// Named counters (see [`Stats`]).
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");

/// Ledger file inside the store directory.
const LEDGER_FILE: &str = "ledger.redb";
/// How long [`Store::open`] waits for another process's writer to let go of the ledger.
const OPEN_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
/// Largest ledger [`StoreReader`] copies to read the committed state of a ledger whose
/// writer died (it never repairs the original: that is the writer's job).
const MAX_LEDGER_COPY: u64 = 1 << 30;
/// Counter holding the last sequence number handed out.
const SEQ_COUNTER: &str = "seq";

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store i/o on {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot open the ledger {path}: {error}")]
    Open {
        path: PathBuf,
        error: redb::DatabaseError,
    },
    #[error("ledger error: {0}")]
    Ledger(String),
    #[error("corrupt ledger record for {what}: {reason}")]
    Corrupt { what: String, reason: String },
    #[error("unknown sample {0}")]
    UnknownSample(SampleId),
}

impl StoreError {
    /// Whether trying the same write again later can succeed (disk full, I/O hiccup, another
    /// writer holding the ledger). Sources keep such deliveries unacknowledged and retry.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Io { .. } | Self::Ledger(_) | Self::Open { .. })
    }
}

fn ledger_error(error: impl fmt::Display) -> StoreError {
    StoreError::Ledger(error.to_string())
}

/// A sample id: BLAKE3 of the image bytes, shown as 64 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SampleId(pub [u8; 32]);

impl SampleId {
    pub fn of_image(bytes: &[u8]) -> Self {
        Self(*blake3::hash(bytes).as_bytes())
    }

    pub fn parse(hex: &str) -> Option<Self> {
        if hex.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Self(out))
    }

    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Display for SampleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for SampleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SampleId({})", &self.to_hex()[..12])
    }
}

impl Serialize for SampleId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for SampleId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let hex = String::deserialize(deserializer)?;
        Self::parse(&hex).ok_or_else(|| serde::de::Error::custom("invalid sample id"))
    }
}

/// Stable split of a sample: a seeded hash of its id decides, so evaluation never trains on
/// its own held-out data, whatever order samples arrive in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SampleSplit {
    Train,
    Val,
}

impl SampleSplit {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Train => "train",
            Self::Val => "val",
        }
    }

    /// Key of the split in the ledger's split index.
    fn code(self) -> u8 {
        match self {
            Self::Train => 0,
            Self::Val => 1,
        }
    }
}

/// How samples are assigned to splits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SplitPolicy {
    /// Fraction of samples held out as `val`, in [0, 1).
    pub val_fraction: f64,
    /// Seed of the hash; changing it reshuffles future assignments (stored ones keep theirs).
    pub seed: u64,
}

impl SplitPolicy {
    pub fn split_of(&self, id: &SampleId) -> SampleSplit {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"rsitrd.split");
        hasher.update(&self.seed.to_le_bytes());
        hasher.update(&id.0);
        let hash = hasher.finalize();
        let head = u64::from_le_bytes(hash.as_bytes()[..8].try_into().expect("8 bytes"));
        // Uniform in [0, 1) with 53 bits of precision.
        let unit = (head >> 11) as f64 / (1u64 << 53) as f64;
        if unit < self.val_fraction {
            SampleSplit::Val
        } else {
            SampleSplit::Train
        }
    }
}

/// Where a sample or reject came from (a label for counters and logs).
pub type Source = String;

/// One stored sample, as kept in the ledger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleRecord {
    pub id: SampleId,
    /// Sequence number of the latest change (creation or caption merge).
    pub seq: u64,
    /// Sequence number of the creation.
    pub created_seq: u64,
    pub split: SampleSplit,
    /// Source of the first delivery (`inbox`, `amqp`, `import`).
    pub source: Source,
    /// The producer's name for it (file path, message id).
    pub source_ref: String,
    /// Unix milliseconds of the first delivery.
    pub arrived_ms: u64,
    /// Unix milliseconds of the latest change.
    pub updated_ms: u64,
    /// Captions in arrival order, no exact duplicates.
    pub captions: Vec<String>,
    /// Producer metadata; later deliveries add keys, never overwrite.
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// `jpeg`, `png` or `tiff`.
    pub format: String,
    pub width: u32,
    pub height: u32,
    /// Size of the image file in bytes.
    pub bytes: u64,
}

/// A validated sample on its way into the store.
#[derive(Debug, Clone)]
pub struct NewSample {
    /// `SampleId::of_image(&image)`, computed by the source's worker threads (hashing off
    /// the single writer thread); [`NewSample::new`] fills it in.
    pub id: SampleId,
    /// Shared so that retries and hand-offs never copy the image.
    pub image: Arc<Vec<u8>>,
    pub captions: Vec<String>,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub source: Source,
    pub source_ref: String,
    pub format: String,
    pub width: u32,
    pub height: u32,
}

impl NewSample {
    /// A sample with its id computed from the image bytes.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        image: Vec<u8>,
        captions: Vec<String>,
        metadata: serde_json::Map<String, serde_json::Value>,
        source: Source,
        source_ref: String,
        format: String,
        width: u32,
        height: u32,
    ) -> Self {
        Self {
            id: SampleId::of_image(&image),
            image: Arc::new(image),
            captions,
            metadata,
            source,
            source_ref,
            format,
            width,
            height,
        }
    }
}

/// What committing a sample did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOutcome {
    /// A new image.
    New { id: SampleId, split: SampleSplit },
    /// A known image with captions not seen before, merged in.
    Merged { id: SampleId, added: usize },
    /// Nothing new: an exact re-delivery.
    Duplicate { id: SampleId },
}

impl CommitOutcome {
    pub fn id(&self) -> SampleId {
        match *self {
            Self::New { id, .. } | Self::Merged { id, .. } | Self::Duplicate { id } => id,
        }
    }

    pub fn label(&self) -> &'static str {
        match self {
            Self::New { .. } => "new",
            Self::Merged { .. } => "merged",
            Self::Duplicate { .. } => "duplicate",
        }
    }
}

/// A rejected input, with the reason given to its producer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RejectRecord {
    /// Hash identifying the input (so a re-delivered reject is counted once).
    pub key: SampleId,
    pub source: Source,
    /// File path or message id.
    pub source_ref: String,
    /// Short category (`image`, `captions`, `message`, `too_large`, `orphan`, `file`).
    pub kind: String,
    pub reason: String,
    pub at_ms: u64,
}

/// What a source hands to the store in one group commit.
#[derive(Debug, Clone)]
pub enum StoreOp {
    Sample(NewSample),
    Reject(RejectRecord),
}

/// Result of one [`StoreOp`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpOutcome {
    Sample(CommitOutcome),
    /// `true` if this reject was not recorded before.
    Reject {
        first_time: bool,
    },
}

/// Counts read from the ledger (`rsitrd stats`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub samples: u64,
    pub captions: u64,
    pub train: u64,
    pub val: u64,
    pub rejected: u64,
    pub duplicates: u64,
    /// Deliveries of known images that brought new captions.
    pub merges: u64,
    /// Samples by the source of their first delivery.
    pub by_source: BTreeMap<String, u64>,
    /// Rejects by kind (`image`, `captions`, `message`, …).
    pub rejected_by_kind: BTreeMap<String, u64>,
    /// Rejects by the source that delivered them.
    #[serde(default)]
    pub rejected_by_source: BTreeMap<String, u64>,
    /// Latest change sequence number (a cursor for [`Store::page_since`]).
    pub last_seq: u64,
    /// Stored samples in quarantine (skipped by embedding and training).
    #[serde(default)]
    pub quarantined: u64,
}

/// A stored sample a stage could not use, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuarantineRecord {
    pub id: SampleId,
    /// Where it failed: `embed`, `reindex`, `train` or `eval`.
    pub stage: String,
    pub reason: String,
    pub at_ms: u64,
}

/// One page of [`Store::page_since`].
#[derive(Debug, Clone, Default)]
pub struct SamplePage {
    /// The usable samples of the page (quarantined ones left out), oldest change first.
    pub records: Vec<SampleRecord>,
    /// The cursor after this page: the last sequence number scanned, quarantined or not, so
    /// that a quarantined sample never pins a cursor.
    pub next_cursor: u64,
}

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The ledger and the blobs of one data directory.
pub struct Store {
    /// The store directory (`DATA_DIR/store`).
    root: PathBuf,
    db: Database,
    policy: SplitPolicy,
}

impl Store {
    /// Opens the store of a configuration (`store.dir`/store, its split policy).
    pub fn open_configured(config: &crate::config::StoreSection) -> Result<Self, StoreError> {
        Self::open(
            &config.store_dir(),
            SplitPolicy {
                val_fraction: config.val_fraction,
                seed: config.split_seed,
            },
        )
    }

    /// Opens (creating if needed) the store under `root`, as its only writer.
    pub fn open(root: &Path, policy: SplitPolicy) -> Result<Self, StoreError> {
        for dir in [root.to_path_buf(), root.join("blobs"), root.join("tmp")] {
            std::fs::create_dir_all(&dir).map_err(|error| StoreError::Io {
                path: dir.clone(),
                error,
            })?;
        }
        // Temp files of writes that never finished (crash mid-write).
        if let Ok(entries) = std::fs::read_dir(root.join("tmp")) {
            for entry in entries.flatten() {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let path = root.join(LEDGER_FILE);
        // Another writer (an offline command such as `rsitrd import`) may hold the ledger for
        // a moment: wait for it briefly rather than failing a service start.
        let deadline = std::time::Instant::now() + OPEN_WAIT;
        let db = loop {
            match Builder::new()
                .set_concurrency_mode(ConcurrencyMode::SingleWriter)
                .create(&path)
            {
                Ok(db) => break db,
                Err(redb::DatabaseError::DatabaseAlreadyOpen)
                    if std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(error) => {
                    return Err(StoreError::Open {
                        path: path.clone(),
                        error,
                    });
                }
            }
        };
        let txn = db.begin_write().map_err(ledger_error)?;
        {
            txn.open_table(QUARANTINE).map_err(ledger_error)?;
            txn.open_table(SAMPLES).map_err(ledger_error)?;
            txn.open_table(BY_SEQ).map_err(ledger_error)?;
            txn.open_table(REJECTS).map_err(ledger_error)?;
            txn.open_table(REJECTS_BY_TIME).map_err(ledger_error)?;
            txn.open_table(COUNTERS).map_err(ledger_error)?;
            ledger::create_tables(&txn)?;
        }
        txn.commit().map_err(ledger_error)?;
        let store = Self {
            root: root.to_path_buf(),
            db,
            policy,
        };
        store.index_splits()?;
        store.index_rejects()?;
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn policy(&self) -> SplitPolicy {
        self.policy
    }

    /// Path of a sample's image bytes.
    pub fn blob_path(&self, id: &SampleId) -> PathBuf {
        blob_path(&self.root, id)
    }

    /// Commits samples and rejects in one durable transaction; the outcomes are in input order.
    /// Blobs are made durable before the ledger commit.
    pub fn commit_batch(&self, ops: &[StoreOp]) -> Result<Vec<OpOutcome>, StoreError> {
        self.write_blobs(ops)?;
        let txn = self.db.begin_write().map_err(ledger_error)?;
        let mut outcomes = Vec::with_capacity(ops.len());
        {
            let mut samples = txn.open_table(SAMPLES).map_err(ledger_error)?;
            let mut by_seq = txn.open_table(BY_SEQ).map_err(ledger_error)?;
            let mut rejects = txn.open_table(REJECTS).map_err(ledger_error)?;
            let mut rejects_by_time = txn.open_table(REJECTS_BY_TIME).map_err(ledger_error)?;
            let mut counters = txn.open_table(COUNTERS).map_err(ledger_error)?;
            let mut by_split = txn.open_table(BY_SPLIT).map_err(ledger_error)?;
            let mut deltas: BTreeMap<String, u64> = BTreeMap::new();
            let mut seq = counter(&counters, SEQ_COUNTER)?;
            let now = now_ms();
            for op in ops {
                match op {
                    StoreOp::Sample(sample) => {
                        let id = sample.id;
                        debug_assert_eq!(id, SampleId::of_image(&sample.image));
                        let existing = match samples.get(id.0).map_err(ledger_error)? {
                            Some(bytes) => Some(decode_record(&id, bytes.value())?),
                            None => None,
                        };
                        let outcome = match existing {
                            None => {
                                seq += 1;
                                let split = self.policy.split_of(&id);
                                let captions = dedup_captions(&[], &sample.captions);
                                let record = SampleRecord {
                                    id,
                                    seq,
                                    created_seq: seq,
                                    split,
                                    source: sample.source.clone(),
                                    source_ref: sample.source_ref.clone(),
                                    arrived_ms: now,
                                    updated_ms: now,
                                    captions,
                                    metadata: sample.metadata.clone(),
                                    format: sample.format.clone(),
                                    width: sample.width,
                                    height: sample.height,
                                    bytes: sample.image.len() as u64,
                                };
                                *deltas.entry("samples".into()).or_default() += 1;
                                *deltas.entry("captions".into()).or_default() +=
                                    record.captions.len() as u64;
                                let in_split = deltas.entry(split.as_str().into()).or_default();
                                let ordinal = counter(&counters, split.as_str())? + *in_split;
                                *in_split += 1;
                                by_split
                                    .insert((split.code(), ordinal), id.0)
                                    .map_err(ledger_error)?;
                                *deltas
                                    .entry(format!("source:{}", sample.source))
                                    .or_default() += 1;
                                put_record(&mut samples, &record)?;
                                by_seq.insert(seq, id.0).map_err(ledger_error)?;
                                CommitOutcome::New { id, split }
                            }
                            Some(mut record) => {
                                let added = dedup_captions(&record.captions, &sample.captions);
                                let mut changed = !added.is_empty();
                                for (key, value) in &sample.metadata {
                                    if !record.metadata.contains_key(key) {
                                        record.metadata.insert(key.clone(), value.clone());
                                        changed = true;
                                    }
                                }
                                if changed {
                                    *deltas.entry("captions".into()).or_default() +=
                                        added.len() as u64;
                                    record.captions.extend(added.iter().cloned());
                                    seq += 1;
                                    resequence(&mut samples, &mut by_seq, &mut record, seq, now)?;
                                }
                                if added.is_empty() {
                                    *deltas.entry("duplicates".into()).or_default() += 1;
                                    CommitOutcome::Duplicate { id }
                                } else {
                                    *deltas.entry("merges".into()).or_default() += 1;
                                    CommitOutcome::Merged {
                                        id,
                                        added: added.len(),
                                    }
                                }
                            }
                        };
                        outcomes.push(OpOutcome::Sample(outcome));
                    }
                    StoreOp::Reject(reject) => {
                        let known = rejects.get(reject.key.0).map_err(ledger_error)?.is_some();
                        if !known {
                            let bytes = serde_json::to_vec(reject).map_err(ledger_error)?;
                            rejects
                                .insert(reject.key.0, bytes.as_slice())
                                .map_err(ledger_error)?;
                            *deltas.entry("rejected".into()).or_default() += 1;
                            *deltas.entry(format!("reject:{}", reject.kind)).or_default() += 1;
                            *deltas
                                .entry(format!("reject_source:{}", reject.source))
                                .or_default() += 1;
                            rejects_by_time
                                .insert((reject.at_ms, reject.key.0), ())
                                .map_err(ledger_error)?;
                        }
                        outcomes.push(OpOutcome::Reject { first_time: !known });
                    }
                }
            }
            deltas.insert(SEQ_COUNTER.into(), 0);
            for (name, delta) in deltas {
                let value = if name == SEQ_COUNTER {
                    seq
                } else {
                    counter(&counters, &name)? + delta
                };
                counters
                    .insert(name.as_str(), value)
                    .map_err(ledger_error)?;
            }
        }
        txn.commit().map_err(ledger_error)?;
        Ok(outcomes)
    }

    /// Writes every blob of the batch that is not on disk yet: temp files written and fsynced
    /// in parallel, renamed into place, then each touched shard directory fsynced once.
    fn write_blobs(&self, ops: &[StoreOp]) -> Result<(), StoreError> {
        let mut seen = HashSet::new();
        let pending: Vec<(SampleId, &[u8])> = ops
            .iter()
            .filter_map(|op| match op {
                StoreOp::Sample(sample) => Some(sample),
                StoreOp::Reject(_) => None,
            })
            .map(|sample| (sample.id, sample.image.as_slice()))
            .filter(|(id, _)| seen.insert(*id) && !self.blob_path(id).exists())
            .collect();
        if pending.is_empty() {
            return Ok(());
        }
        let tmp_dir = self.root.join("tmp");
        parallel_io(&pending, |(id, bytes)| {
            let final_path = self.blob_path(id);
            let shard = final_path
                .parent()
                .expect("blob path has a shard directory");
            std::fs::create_dir_all(shard).map_err(|error| StoreError::Io {
                path: shard.to_path_buf(),
                error,
            })?;
            let temp = tmp_dir.join(format!("{}.{}", id.to_hex(), std::process::id()));
            let io = |error| StoreError::Io {
                path: temp.clone(),
                error,
            };
            let mut file = File::create(&temp).map_err(io)?;
            file.write_all(bytes).map_err(io)?;
            // Data and size: what a reader after a crash needs.
            file.sync_data().map_err(io)?;
            drop(file);
            std::fs::rename(&temp, &final_path).map_err(|error| StoreError::Io {
                path: final_path.clone(),
                error,
            })
        })?;
        let mut shards: Vec<PathBuf> = pending
            .iter()
            .filter_map(|(id, _)| self.blob_path(id).parent().map(Path::to_path_buf))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        shards.push(self.root.join("blobs"));
        parallel_io(&shards, |dir| sync_dir(dir))?;
        Ok(())
    }

    /// Counts, for `rsitrd stats` and the status endpoint.
    pub fn stats(&self) -> Result<Stats, StoreError> {
        read_stats(&self.db)
    }

    /// A sample by id.
    pub fn get(&self, id: &SampleId) -> Result<Option<SampleRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(ledger_error)?;
        let samples = txn.open_table(SAMPLES).map_err(ledger_error)?;
        match samples.get(id.0).map_err(ledger_error)? {
            Some(bytes) => Ok(Some(decode_record(id, bytes.value())?)),
            None => Ok(None),
        }
    }

    /// The image bytes of a sample.
    pub fn read_image(&self, id: &SampleId) -> Result<Vec<u8>, StoreError> {
        let path = self.blob_path(id);
        std::fs::read(&path).map_err(|error| StoreError::Io { path, error })
    }

    /// Samples created or changed after `cursor` (a sequence number), oldest change first, at
    /// most `limit`, quarantined ones left out; pass the page's `next_cursor` on (it moves past
    /// quarantined samples too).
    pub fn page_since(&self, cursor: u64, limit: usize) -> Result<SamplePage, StoreError> {
        self.page_range(cursor, u64::MAX, limit)
    }

    /// [`Store::page_since`] limited to changes numbered up to `upto` (a promotion's re-embed
    /// stops where it began: later changes reach the new version by the dual write).
    pub fn page_range(
        &self,
        cursor: u64,
        upto: u64,
        limit: usize,
    ) -> Result<SamplePage, StoreError> {
        let txn = self.db.begin_read().map_err(ledger_error)?;
        let by_seq = txn.open_table(BY_SEQ).map_err(ledger_error)?;
        let samples = txn.open_table(SAMPLES).map_err(ledger_error)?;
        let quarantine = txn.open_table(QUARANTINE).map_err(ledger_error)?;
        let mut page = SamplePage {
            records: Vec::new(),
            next_cursor: cursor,
        };
        // `limit` bounds the records decoded; scanned quarantined entries are bounded too, so
        // a page is bounded work whatever the quarantine holds.
        let max_scanned = limit.saturating_mul(4).max(1024);
        if cursor >= upto {
            return Ok(page);
        }
        for (scanned, entry) in by_seq
            .range(cursor + 1..=upto)
            .map_err(ledger_error)?
            .enumerate()
        {
            if page.records.len() >= limit || scanned >= max_scanned {
                break;
            }
            let (seq, id) = entry.map_err(ledger_error)?;
            let id = SampleId(id.value());
            page.next_cursor = seq.value();
            if quarantine.get(id.0).map_err(ledger_error)?.is_some() {
                continue;
            }
            let bytes = samples
                .get(id.0)
                .map_err(ledger_error)?
                .ok_or(StoreError::UnknownSample(id))?;
            page.records.push(decode_record(&id, bytes.value())?);
        }
        Ok(page)
    }

    /// Puts a stored sample in quarantine (`stage` could not use it, for `reason`); returns
    /// whether it was not there already. Deterministic failures only: a transient one (disk,
    /// index) is retried instead.
    pub fn quarantine(&self, id: &SampleId, stage: &str, reason: &str) -> Result<bool, StoreError> {
        let record = QuarantineRecord {
            id: *id,
            stage: stage.into(),
            reason: reason.into(),
            at_ms: now_ms(),
        };
        let bytes = serde_json::to_vec(&record).map_err(ledger_error)?;
        let txn = self.db.begin_write().map_err(ledger_error)?;
        let new = {
            let mut table = txn.open_table(QUARANTINE).map_err(ledger_error)?;
            let known = table.get(id.0).map_err(ledger_error)?.is_some();
            if !known {
                table.insert(id.0, bytes.as_slice()).map_err(ledger_error)?;
            }
            !known
        };
        txn.commit().map_err(ledger_error)?;
        Ok(new)
    }

    /// Whether a sample is in quarantine.
    pub fn is_quarantined(&self, id: &SampleId) -> Result<bool, StoreError> {
        let txn = self.db.begin_read().map_err(ledger_error)?;
        let table = txn.open_table(QUARANTINE).map_err(ledger_error)?;
        Ok(table.get(id.0).map_err(ledger_error)?.is_some())
    }

    /// The quarantine, in id order.
    pub fn quarantined(&self) -> Result<Vec<QuarantineRecord>, StoreError> {
        read_quarantine(&self.db)
    }

    /// Takes samples out of quarantine (`None`: all of them) and gives each a new change
    /// sequence number in the same transaction, so that the index worker embeds them again;
    /// returns the ids released. Unknown ids are ignored.
    pub fn release(&self, ids: Option<&[SampleId]>) -> Result<Vec<SampleId>, StoreError> {
        let txn = self.db.begin_write().map_err(ledger_error)?;
        let mut released = Vec::new();
        {
            let mut quarantine = txn.open_table(QUARANTINE).map_err(ledger_error)?;
            let mut samples = txn.open_table(SAMPLES).map_err(ledger_error)?;
            let mut by_seq = txn.open_table(BY_SEQ).map_err(ledger_error)?;
            let mut counters = txn.open_table(COUNTERS).map_err(ledger_error)?;
            let wanted: Vec<SampleId> = match ids {
                Some(ids) => ids.to_vec(),
                None => {
                    let mut all = Vec::new();
                    for entry in quarantine.iter().map_err(ledger_error)? {
                        all.push(SampleId(entry.map_err(ledger_error)?.0.value()));
                    }
                    all
                }
            };
            let mut seq = counter(&counters, SEQ_COUNTER)?;
            for id in wanted {
                if quarantine.remove(id.0).map_err(ledger_error)?.is_none() {
                    continue;
                }
                let record = match samples.get(id.0).map_err(ledger_error)? {
                    Some(bytes) => Some(decode_record(&id, bytes.value())?),
                    None => None,
                };
                if let Some(mut record) = record {
                    seq += 1;
                    resequence(&mut samples, &mut by_seq, &mut record, seq, now_ms())?;
                }
                released.push(id);
            }
            counters.insert(SEQ_COUNTER, seq).map_err(ledger_error)?;
        }
        txn.commit().map_err(ledger_error)?;
        Ok(released)
    }

    /// Every sample of a split (quarantined ones left out), in id order. A full scan: for
    /// offline tools and tests; the daemon reads through the split index instead.
    pub fn samples_in(&self, split: Option<SampleSplit>) -> Result<Vec<SampleRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(ledger_error)?;
        let samples = txn.open_table(SAMPLES).map_err(ledger_error)?;
        let quarantine = txn.open_table(QUARANTINE).map_err(ledger_error)?;
        let mut out = Vec::new();
        for entry in samples.iter().map_err(ledger_error)? {
            let (key, bytes) = entry.map_err(ledger_error)?;
            let id = SampleId(key.value());
            if quarantine.get(id.0).map_err(ledger_error)?.is_some() {
                continue;
            }
            let record = decode_record(&id, bytes.value())?;
            if split.is_none_or(|split| record.split == split) {
                out.push(record);
            }
        }
        Ok(out)
    }

    /// The newest `limit` rejects, newest first.
    pub fn recent_rejects(&self, limit: usize) -> Result<Vec<RejectRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(ledger_error)?;
        let by_time = txn.open_table(REJECTS_BY_TIME).map_err(ledger_error)?;
        let rejects = txn.open_table(REJECTS).map_err(ledger_error)?;
        let mut out = Vec::new();
        for entry in by_time.iter().map_err(ledger_error)?.rev().take(limit) {
            let (key, _) = entry.map_err(ledger_error)?;
            let (_, key) = key.value();
            if let Some(bytes) = rejects.get(key).map_err(ledger_error)? {
                out.push(decode_reject(key, bytes.value())?);
            }
        }
        Ok(out)
    }

    /// The `limit` most recently created or changed samples, newest first (quarantined ones
    /// included: this is a view of what arrived).
    pub fn recent_samples(&self, limit: usize) -> Result<Vec<SampleRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(ledger_error)?;
        let by_seq = txn.open_table(BY_SEQ).map_err(ledger_error)?;
        let samples = txn.open_table(SAMPLES).map_err(ledger_error)?;
        let mut out = Vec::new();
        for entry in by_seq.iter().map_err(ledger_error)?.rev().take(limit) {
            let (_, id) = entry.map_err(ledger_error)?;
            let id = SampleId(id.value());
            if let Some(bytes) = samples.get(id.0).map_err(ledger_error)? {
                out.push(decode_record(&id, bytes.value())?);
            }
        }
        Ok(out)
    }

    /// Builds the time index and per-source counts of rejects recorded before they existed
    /// (one pass, once).
    fn index_rejects(&self) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(ledger_error)?;
        {
            let rejects = txn.open_table(REJECTS).map_err(ledger_error)?;
            let mut by_time = txn.open_table(REJECTS_BY_TIME).map_err(ledger_error)?;
            if by_time.len().map_err(ledger_error)? == rejects.len().map_err(ledger_error)? {
                return Ok(());
            }
            let mut counters = txn.open_table(COUNTERS).map_err(ledger_error)?;
            by_time.retain(|_, _| false).map_err(ledger_error)?;
            let mut by_source: BTreeMap<String, u64> = BTreeMap::new();
            for entry in rejects.iter().map_err(ledger_error)? {
                let (key, bytes) = entry.map_err(ledger_error)?;
                let record = decode_reject(key.value(), bytes.value())?;
                by_time
                    .insert((record.at_ms, record.key.0), ())
                    .map_err(ledger_error)?;
                *by_source.entry(record.source).or_default() += 1;
            }
            for (source, count) in by_source {
                counters
                    .insert(format!("reject_source:{source}").as_str(), count)
                    .map_err(ledger_error)?;
            }
        }
        txn.commit().map_err(ledger_error)?;
        Ok(())
    }

    /// Every recorded reject, in key order.
    pub fn rejects(&self) -> Result<Vec<RejectRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(ledger_error)?;
        let rejects = txn.open_table(REJECTS).map_err(ledger_error)?;
        let mut out = Vec::new();
        for entry in rejects.iter().map_err(ledger_error)? {
            let (key, bytes) = entry.map_err(ledger_error)?;
            out.push(decode_reject(key.value(), bytes.value())?);
        }
        Ok(out)
    }
}

/// Read-only view of a store another process writes (`rsitrd stats` beside the daemon). It
/// never takes the writer's lock: a daemon (re)starting at any moment opens its ledger.
pub enum StoreReader {
    /// The ledger, opened read-only beside its writer.
    Ledger(ReadOnlyDatabase),
    /// The last writer died without closing the ledger and none has recovered it yet: a
    /// private copy, recovered, shows what was committed (the original is left to the writer).
    Copy {
        db: Box<Database>,
        _dir: tempfile::TempDir,
    },
    /// No store in this directory yet.
    Empty,
}

impl StoreReader {
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        let path = root.join(LEDGER_FILE);
        if !path.exists() {
            tracing::warn!(store = %root.display(), "no store here yet: nothing ingested (is store.dir right?)");
            return Ok(Self::Empty);
        }
        // A writer that has just created the file may not have initialised it yet (an empty
        // file is an empty store), or may be recovering it after a crash: open errors get a
        // few short retries.
        let mut last_error = None;
        for _ in 0..20 {
            if std::fs::metadata(&path).is_ok_and(|m| m.len() == 0) {
                return Ok(Self::Empty);
            }
            match Builder::new()
                .set_concurrency_mode(ConcurrencyMode::SingleWriter)
                .open_read_only(&path)
            {
                Ok(db) => return Ok(Self::Ledger(db)),
                Err(redb::DatabaseError::RepairAborted) => match Self::recovered_copy(&path) {
                    Ok(reader) => return Ok(reader),
                    Err(error) => {
                        tracing::debug!(%error, "cannot read a copy of the unrecovered ledger yet");
                        last_error = Some(redb::DatabaseError::RepairAborted);
                    }
                },
                Err(error) => last_error = Some(error),
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        Err(StoreError::Open {
            path,
            error: last_error.expect("at least one attempt"),
        })
    }

    /// Copies the ledger to a private temporary file and recovers the copy there.
    fn recovered_copy(path: &Path) -> Result<Self, StoreError> {
        let io = |error| StoreError::Io {
            path: path.to_path_buf(),
            error,
        };
        let len = std::fs::metadata(path).map_err(io)?.len();
        if len > MAX_LEDGER_COPY {
            return Err(StoreError::Ledger(format!(
                "the ledger was not closed cleanly and is too large ({len} bytes) to read a copy: start the daemon to recover it"
            )));
        }
        let dir = tempfile::tempdir().map_err(io)?;
        let copy = dir.path().join(LEDGER_FILE);
        std::fs::copy(path, &copy).map_err(io)?;
        let db = Builder::new()
            .set_concurrency_mode(ConcurrencyMode::SingleWriter)
            .create(&copy)
            .map_err(|error| StoreError::Open {
                path: copy.clone(),
                error,
            })?;
        Ok(Self::Copy {
            db: Box::new(db),
            _dir: dir,
        })
    }

    pub fn stats(&self) -> Result<Stats, StoreError> {
        match self {
            Self::Ledger(db) => read_stats(db),
            Self::Copy { db, .. } => read_stats(db.as_ref()),
            Self::Empty => Ok(Stats::default()),
        }
    }

    /// The quarantine (empty for a store not created yet).
    pub fn quarantined(&self) -> Result<Vec<QuarantineRecord>, StoreError> {
        match self {
            Self::Ledger(db) => read_quarantine(db),
            Self::Copy { db, .. } => read_quarantine(db.as_ref()),
            Self::Empty => Ok(Vec::new()),
        }
    }
}

fn read_quarantine(db: &impl ReadableDatabase) -> Result<Vec<QuarantineRecord>, StoreError> {
    let txn = db.begin_read().map_err(ledger_error)?;
    let table = match txn.open_table(QUARANTINE) {
        Ok(table) => table,
        // A ledger of an older version, or not initialised yet.
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(error) => return Err(ledger_error(error)),
    };
    let mut out = Vec::new();
    for entry in table.iter().map_err(ledger_error)? {
        let (key, bytes) = entry.map_err(ledger_error)?;
        let record = serde_json::from_slice(bytes.value()).map_err(|e| StoreError::Corrupt {
            what: format!("quarantine record {}", SampleId(key.value())),
            reason: e.to_string(),
        })?;
        out.push(record);
    }
    Ok(out)
}

fn read_stats(db: &impl ReadableDatabase) -> Result<Stats, StoreError> {
    let txn = db.begin_read().map_err(ledger_error)?;
    let counters = match txn.open_table(COUNTERS) {
        Ok(table) => table,
        // The writer has created the file but not committed its first transaction yet.
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Stats::default()),
        Err(error) => return Err(ledger_error(error)),
    };
    let mut stats = Stats::default();
    match txn.open_table(QUARANTINE) {
        Ok(table) => stats.quarantined = table.len().map_err(ledger_error)?,
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(error) => return Err(ledger_error(error)),
    }
    for entry in counters.iter().map_err(ledger_error)? {
        let (name, value) = entry.map_err(ledger_error)?;
        let (name, value) = (name.value().to_string(), value.value());
        match name.as_str() {
            "samples" => stats.samples = value,
            "captions" => stats.captions = value,
            "train" => stats.train = value,
            "val" => stats.val = value,
            "rejected" => stats.rejected = value,
            "duplicates" => stats.duplicates = value,
            "merges" => stats.merges = value,
            SEQ_COUNTER => stats.last_seq = value,
            other => {
                if let Some(source) = other.strip_prefix("source:") {
                    stats.by_source.insert(source.into(), value);
                } else if let Some(kind) = other.strip_prefix("reject:") {
                    stats.rejected_by_kind.insert(kind.into(), value);
                } else if let Some(source) = other.strip_prefix("reject_source:") {
                    stats.rejected_by_source.insert(source.into(), value);
                }
            }
        }
    }
    Ok(stats)
}

fn blob_path(root: &Path, id: &SampleId) -> PathBuf {
    let hex = id.to_hex();
    root.join("blobs").join(&hex[..2]).join(hex)
}

/// Threads waiting on the disk at once when a batch is made durable: fsyncs mostly wait, and
/// concurrent ones share journal commits, so far more threads than cores pay off.
const IO_THREADS: usize = 32;

/// Runs `work` on every item from up to [`IO_THREADS`] threads; the first error wins.
fn parallel_io<T: Sync>(
    items: &[T],
    work: impl Fn(&T) -> Result<(), StoreError> + Sync,
) -> Result<(), StoreError> {
    if items.len() <= 1 {
        return items.iter().try_for_each(&work);
    }
    let threads = items.len().min(IO_THREADS);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let work = &work;
                scope.spawn(move || items.iter().skip(t).step_by(threads).try_for_each(work))
            })
            .collect();
        handles
            .into_iter()
            .try_for_each(|handle| handle.join().expect("store i/o thread panicked"))
    })
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|error| StoreError::Io {
            path: dir.to_path_buf(),
            error,
        })
}

fn counter(table: &impl ReadableTable<&'static str, u64>, name: &str) -> Result<u64, StoreError> {
    Ok(table
        .get(name)
        .map_err(ledger_error)?
        .map(|v| v.value())
        .unwrap_or(0))
}

fn decode_reject(key: [u8; 32], bytes: &[u8]) -> Result<RejectRecord, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        what: format!("reject {}", SampleId(key)),
        reason: e.to_string(),
    })
}

fn decode_record(id: &SampleId, bytes: &[u8]) -> Result<SampleRecord, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        what: format!("sample {id}"),
        reason: e.to_string(),
    })
}

fn put_record(
    table: &mut redb::Table<[u8; 32], &[u8]>,
    record: &SampleRecord,
) -> Result<(), StoreError> {
    let bytes = serde_json::to_vec(record).map_err(ledger_error)?;
    table
        .insert(record.id.0, bytes.as_slice())
        .map_err(ledger_error)?;
    Ok(())
}

/// Stores a changed record under the new change number `seq` (its old one dropped), so that
/// cursors see it again.
fn resequence(
    samples: &mut redb::Table<[u8; 32], &[u8]>,
    by_seq: &mut redb::Table<u64, [u8; 32]>,
    record: &mut SampleRecord,
    seq: u64,
    now: u64,
) -> Result<(), StoreError> {
    by_seq.remove(record.seq).map_err(ledger_error)?;
    record.seq = seq;
    record.updated_ms = now;
    put_record(samples, record)?;
    by_seq.insert(seq, record.id.0).map_err(ledger_error)?;
    Ok(())
}

/// The captions of `incoming` that are not in `known` (nor repeated within `incoming`).
fn dedup_captions(known: &[String], incoming: &[String]) -> Vec<String> {
    let mut seen: HashSet<&str> = known.iter().map(String::as_str).collect();
    let mut out = Vec::new();
    for caption in incoming {
        if seen.insert(caption.as_str()) {
            out.push(caption.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_ids_round_trip_through_hex() {
        let id = SampleId::of_image(b"abc");
        assert_eq!(SampleId::parse(&id.to_hex()), Some(id));
        assert_eq!(SampleId::parse("xyz"), None);
    }

    #[test]
    fn split_is_a_stable_seeded_fraction() {
        let policy = SplitPolicy {
            val_fraction: 0.2,
            seed: 7,
        };
        let ids: Vec<SampleId> = (0u32..5000)
            .map(|i| SampleId::of_image(&i.to_le_bytes()))
            .collect();
        let val = ids
            .iter()
            .filter(|id| policy.split_of(id) == SampleSplit::Val)
            .count();
        assert!((900..1100).contains(&val), "{val} of 5000 held out");
        let again = ids
            .iter()
            .filter(|id| policy.split_of(id) == SampleSplit::Val)
            .count();
        assert_eq!(val, again);
        let other_seed = SplitPolicy { seed: 8, ..policy };
        let differ = ids
            .iter()
            .filter(|id| policy.split_of(id) != other_seed.split_of(id))
            .count();
        assert!(differ > 500, "the seed must matter");
        let none = SplitPolicy {
            val_fraction: 0.0,
            seed: 7,
        };
        assert!(ids.iter().all(|id| none.split_of(id) == SampleSplit::Train));
    }

    #[test]
    fn caption_dedup_keeps_order_and_drops_known() {
        let known = vec!["a".to_string(), "b".to_string()];
        let incoming = vec!["b".into(), "c".into(), "c".into(), "d".into()];
        assert_eq!(dedup_captions(&known, &incoming), vec!["c", "d"]);
    }
}
