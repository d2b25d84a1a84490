//! Stored samples as model inputs: their pixels, decoded within the image limits, and the
//! quarantine of those that can no longer be used (every stage that reads stored images —
//! freshness, re-embedding, training, the gate — goes through here).

use crate::model::preprocess::{ImageLimits, load_image};
use crate::store::{SampleId, SampleRecord, Store, StoreError};

/// Why a stored sample could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A deterministic failure of one stored sample (its image no longer decodes within the
    /// limits, its blob is gone): quarantine it, retrying cannot help.
    #[error("stored sample {id} is unusable: {reason}")]
    Unusable { id: SampleId, reason: String },
}

/// Preprocessed `[3, size, size]` pixels of a stored sample. A missing blob or an image that
/// no longer passes `limits` is [`SampleError::Unusable`]; other read errors are transient.
pub fn sample_pixels(
    store: &Store,
    record: &SampleRecord,
    size: usize,
    limits: &ImageLimits,
) -> Result<Vec<f32>, SampleError> {
    let unusable = |reason: String| SampleError::Unusable {
        id: record.id,
        reason,
    };
    let bytes = match store.read_image(&record.id) {
        Ok(bytes) => bytes,
        Err(StoreError::Io { path, error }) if error.kind() == std::io::ErrorKind::NotFound => {
            return Err(unusable(format!(
                "image blob {} is missing",
                path.display()
            )));
        }
        Err(error) => return Err(error.into()),
    };
    load_image(&bytes, &record.id.to_hex(), limits, size).map_err(|e| unusable(e.to_string()))
}

/// [`sample_pixels`], with an unusable sample put in quarantine under `stage` (`None`);
/// transient errors are returned.
pub fn pixels_or_quarantine(
    store: &Store,
    record: &SampleRecord,
    size: usize,
    limits: &ImageLimits,
    stage: &str,
) -> Result<Option<Vec<f32>>, SampleError> {
    match sample_pixels(store, record, size, limits) {
        Ok(pixels) => Ok(Some(pixels)),
        Err(SampleError::Unusable { id, reason }) => {
            quarantine(store, &id, stage, &reason)?;
            Ok(None)
        }
        Err(error) => Err(error),
    }
}

/// The pixels of the usable `records`, with those records, in order; unusable ones are
/// quarantined under `stage` and left out.
pub fn usable_pixels<'a>(
    store: &Store,
    records: &'a [SampleRecord],
    size: usize,
    limits: &ImageLimits,
    stage: &str,
) -> Result<(Vec<Vec<f32>>, Vec<&'a SampleRecord>), SampleError> {
    let mut pixels = Vec::with_capacity(records.len());
    let mut usable = Vec::with_capacity(records.len());
    for record in records {
        if let Some(sample) = pixels_or_quarantine(store, record, size, limits, stage)? {
            pixels.push(sample);
            usable.push(record);
        }
    }
    Ok((pixels, usable))
}

/// Puts an unusable sample in quarantine (logged and counted); a store error is returned.
pub fn quarantine(
    store: &Store,
    id: &SampleId,
    stage: &str,
    reason: &str,
) -> Result<(), SampleError> {
    if store.quarantine(id, stage, reason)? {
        metrics::counter!("rsitrd_quarantined_total", "stage" => stage.to_string()).increment(1);
        tracing::warn!(sample_id = %id, stage, reason, "sample quarantined: skipped until released");
        report_quarantine(store);
    }
    Ok(())
}

/// Sets the `rsitrd_quarantined_samples` gauge from the ledger.
pub fn report_quarantine(store: &Store) {
    if let Ok(stats) = store.stats() {
        metrics::gauge!("rsitrd_quarantined_samples").set(stats.quarantined as f64);
    }
}
