//! Backfills: `rsitrd import` writes a Karpathy dataset straight into the store (same
//! validation and counting as the live sources), `rsitrd publish` sends one to the queue.

use std::sync::Arc;

use rayon::prelude::*;

use super::amqp::{AmqpError, Outgoing, encode_message};
use super::{Links, Validator, read_regular, report_reject};
use crate::data::{Dataset, DatasetImage};
use crate::store::{CommitOutcome, OpOutcome, SampleId, Store, StoreError, StoreOp};

/// Source label of imported samples.
pub const SOURCE: &str = "import";
/// Images validated and committed together.
const IMPORT_CHUNK: usize = 256;

/// What an import did.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ImportSummary {
    pub images: usize,
    pub new: usize,
    pub merged: usize,
    pub duplicates: usize,
    pub rejected: usize,
}

/// Metadata every backfilled sample carries: where it came from.
fn metadata_of(image: &DatasetImage) -> serde_json::Map<String, serde_json::Value> {
    let mut metadata = serde_json::Map::new();
    metadata.insert("filename".into(), image.filename.clone().into());
    metadata.insert("dataset_split".into(), image.split.to_string().into());
    metadata
}

/// Validates and stores every image of `dataset` (parallel validation, group commits);
/// `progress` gets the number of images done so far.
pub fn import_dataset(
    store: &Store,
    validator: &Validator,
    dataset: &Dataset,
    mut progress: impl FnMut(usize),
) -> Result<ImportSummary, StoreError> {
    let mut summary = ImportSummary::default();
    for chunk in dataset.images.chunks(IMPORT_CHUNK) {
        let ops: Vec<StoreOp> = chunk
            .par_iter()
            .map(|image| {
                let name = image.filename.clone();
                // Links are followed (the operator chose the dataset); devices, pipes and
                // files larger than the limit are not read.
                let limit = validator.max_image_bytes();
                let checked = read_regular(&dataset.path_of(image), limit, Links::Follow)
                    .map_err(|e| e.rejection(&name, limit))
                    .and_then(|bytes| {
                        validator.validate(
                            bytes,
                            image.captions.clone(),
                            metadata_of(image),
                            &SOURCE.to_string(),
                            &name,
                        )
                    });
                match checked {
                    Ok(sample) => StoreOp::Sample(sample),
                    Err(rejection) => {
                        report_reject(SOURCE, &name, &rejection);
                        let key = SampleId(
                            *blake3::hash(format!("{SOURCE}:{name}").as_bytes()).as_bytes(),
                        );
                        StoreOp::Reject(rejection.record(key, SOURCE, &name))
                    }
                }
            })
            .collect();
        for outcome in store.commit_batch(&ops)? {
            summary.images += 1;
            match outcome {
                OpOutcome::Sample(CommitOutcome::New { .. }) => summary.new += 1,
                OpOutcome::Sample(CommitOutcome::Merged { .. }) => summary.merged += 1,
                OpOutcome::Sample(CommitOutcome::Duplicate { .. }) => summary.duplicates += 1,
                OpOutcome::Reject { .. } => summary.rejected += 1,
            }
        }
        progress(summary.images);
    }
    Ok(summary)
}

/// The dataset as queue messages (read lazily, one image at a time).
pub fn dataset_messages(
    dataset: Arc<Dataset>,
) -> impl Iterator<Item = Result<Outgoing, AmqpError>> {
    (0..dataset.images.len()).map(move |index| {
        let image = &dataset.images[index];
        let path = dataset.path_of(image);
        let bytes = std::fs::read(&path).map_err(|source| AmqpError::Read {
            path: path.clone(),
            source,
        })?;
        Ok(Outgoing {
            id: image.filename.clone(),
            body: encode_message(&image.filename, &bytes, &image.captions, metadata_of(image)),
        })
    })
}
