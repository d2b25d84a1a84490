//! Ingestion: turns inbox files ([`fs`]) and AMQP deliveries ([`amqp`]) into validated samples
//! for the store, or into rejects with a reason. Validation decodes every image with the same
//! function the model's preprocessing uses ([`crate::model::preprocess::decode_image`]).

use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::model::preprocess::{ImageLimits, decode_image};
use crate::model::tokenizer::ClipTokenizer;
use crate::store::writer::StoreWriter;
use crate::store::{NewSample, RejectRecord, SampleId, Source, Store, now_ms};

pub mod amqp;
pub mod bench;
pub mod fs;
pub mod import;

/// CLIP's text context: longer captions are truncated when embedded.
const CONTEXT_LENGTH: usize = 77;
/// Largest caption file (`NAME.txt` / `NAME.json`) read from the inbox.
pub const MAX_CAPTION_FILE_BYTES: u64 = 1 << 20;

/// Runs the enabled sources (inbox, AMQP) into `store` until `cancel` fires; in-flight work
/// finishes (committed deliveries are acknowledged) before it returns.
pub async fn run(
    config: &Config,
    store: Arc<Store>,
    cancel: CancellationToken,
) -> Result<(), fs::InboxError> {
    let validator = Arc::new(Validator::from_config(config));
    let writer = StoreWriter::spawn(store);
    let mut tasks = tokio::task::JoinSet::new();
    if config.inbox.enabled {
        let (inbox, validator, writer, cancel) = (
            config.inbox.clone(),
            validator.clone(),
            writer.clone(),
            cancel.clone(),
        );
        tasks.spawn_blocking(move || fs::run_inbox(&inbox, validator, writer, cancel));
    }
    if config.amqp.enabled {
        let (amqp, validator, writer, cancel) = (
            config.amqp.clone(),
            validator.clone(),
            writer.clone(),
            cancel.clone(),
        );
        tasks.spawn(async move {
            amqp::run_amqp(amqp, validator, writer, cancel).await;
            Ok(())
        });
    }
    drop(writer);
    if tasks.is_empty() {
        tracing::warn!("no source enabled (inbox.enabled and amqp.enabled are both false)");
        cancel.cancelled().await;
        return Ok(());
    }
    let mut result = Ok(());
    while let Some(finished) = tasks.join_next().await {
        match finished {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                // A source that cannot start stops the others: the service is misconfigured.
                cancel.cancel();
                result = Err(error);
            }
            Err(panic) => {
                cancel.cancel();
                tracing::error!(%panic, "an ingestion source panicked");
            }
        }
    }
    result
}

/// Category of a reject, a label for counters, metrics and the dead-letter header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectKind {
    /// Undecodable, truncated, empty, non-image or too many pixels.
    Image,
    /// Missing, empty, too many or non-UTF-8 captions.
    Captions,
    /// Broken message: JSON, types, base64, unknown fields, content type.
    Message,
    /// Above a byte limit (file or message).
    TooLarge,
    /// An inbox file whose partner never arrived.
    Orphan,
    /// An inbox file outside the contract (unsupported type, symlink, ambiguous pair).
    File,
}

impl RejectKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Image => "image",
            Self::Captions => "captions",
            Self::Message => "message",
            Self::TooLarge => "too_large",
            Self::Orphan => "orphan",
            Self::File => "file",
        }
    }
}

/// Why an input was refused; `reason` is what the producer reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub kind: RejectKind,
    pub reason: String,
}

impl Rejection {
    pub fn new(kind: RejectKind, reason: impl Into<String>) -> Self {
        Self {
            kind,
            reason: reason.into(),
        }
    }

    /// The ledger record of this reject; `key` identifies the input so a re-delivery of the
    /// same bad input is counted once.
    pub fn record(&self, key: SampleId, source: &str, source_ref: &str) -> RejectRecord {
        RejectRecord {
            key,
            source: source.into(),
            source_ref: source_ref.into(),
            kind: self.kind.as_str().into(),
            reason: self.reason.clone(),
            at_ms: now_ms(),
        }
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.reason, self.kind.as_str())
    }
}

/// Counts and logs a reject (one metric and one log line per reject, whatever the source).
pub fn report_reject(source: &str, source_ref: &str, rejection: &Rejection) {
    metrics::counter!("rsitrd_ingest_rejected_total", "source" => source.to_string(), "kind" => rejection.kind.as_str())
        .increment(1);
    tracing::warn!(
        source,
        input = source_ref,
        kind = rejection.kind.as_str(),
        reason = %rejection.reason,
        "rejected"
    );
}

/// Counts and logs a stored sample.
pub fn report_stored(source: &str, source_ref: &str, outcome: &crate::store::CommitOutcome) {
    metrics::counter!("rsitrd_ingest_samples_total", "source" => source.to_string(), "outcome" => outcome.label())
        .increment(1);
    tracing::debug!(source, input = source_ref, sample_id = %outcome.id(), outcome = outcome.label(), "stored");
}

/// The checks every source applies.
pub struct Validator {
    limits: ImageLimits,
    max_image_bytes: u64,
    max_captions: usize,
    tokenizer: ClipTokenizer,
}

impl Validator {
    pub fn new(limits: ImageLimits, max_image_bytes: u64, max_captions: usize) -> Self {
        Self {
            limits,
            max_image_bytes,
            max_captions,
            tokenizer: ClipTokenizer::new(CONTEXT_LENGTH),
        }
    }

    pub fn from_config(config: &Config) -> Self {
        Self::new(
            config.image_limits(),
            config.ingest.max_image_bytes,
            config.ingest.max_captions,
        )
    }

    pub fn max_image_bytes(&self) -> u64 {
        self.max_image_bytes
    }

    /// Validates one sample: the image decodes fully within the limits, and there are 1..=max
    /// non-empty captions (trimmed). Captions beyond the 77-token context are accepted and
    /// logged: the model truncates them.
    pub fn validate(
        &self,
        image: Vec<u8>,
        captions: Vec<String>,
        metadata: serde_json::Map<String, serde_json::Value>,
        source: &Source,
        source_ref: &str,
    ) -> Result<NewSample, Rejection> {
        if image.len() as u64 > self.max_image_bytes {
            return Err(Rejection::new(
                RejectKind::TooLarge,
                format!(
                    "{source_ref}: image is {} bytes, more than ingest.max_image_bytes ({})",
                    image.len(),
                    self.max_image_bytes
                ),
            ));
        }
        let captions = self.check_captions(captions, source_ref)?;
        let format = match image::guess_format(&image) {
            Ok(image::ImageFormat::Jpeg) => "jpeg",
            Ok(image::ImageFormat::Png) => "png",
            Ok(image::ImageFormat::Tiff) => "tiff",
            _ => "unknown",
        };
        // The same check every later stage makes (stored samples, queries): what passes here
        // can always be preprocessed.
        let decoded = decode_image(&image, source_ref, &self.limits)
            .map_err(|error| Rejection::new(RejectKind::Image, error.to_string()))?;
        Ok(NewSample::new(
            image,
            captions,
            metadata,
            source.clone(),
            source_ref.into(),
            format.into(),
            decoded.width(),
            decoded.height(),
        ))
    }

    fn check_captions(
        &self,
        captions: Vec<String>,
        source_ref: &str,
    ) -> Result<Vec<String>, Rejection> {
        if captions.is_empty() {
            return Err(Rejection::new(
                RejectKind::Captions,
                format!("{source_ref}: no captions"),
            ));
        }
        if captions.len() > self.max_captions {
            return Err(Rejection::new(
                RejectKind::Captions,
                format!(
                    "{source_ref}: {} captions, more than ingest.max_captions ({})",
                    captions.len(),
                    self.max_captions
                ),
            ));
        }
        let mut out = Vec::with_capacity(captions.len());
        for (index, caption) in captions.into_iter().enumerate() {
            let caption = caption.trim().to_string();
            if caption.is_empty() {
                return Err(Rejection::new(
                    RejectKind::Captions,
                    format!("{source_ref}: caption {} is empty", index + 1),
                ));
            }
            if self.tokenizer.is_truncated(&caption) {
                metrics::counter!("rsitrd_ingest_captions_truncated_total").increment(1);
                tracing::info!(
                    input = source_ref,
                    caption = index + 1,
                    "caption longer than the 77-token context: kept, truncated when embedded"
                );
            }
            out.push(caption);
        }
        Ok(out)
    }
}

/// Whether [`read_regular`] may follow a symbolic link: never in the inbox (anyone who can
/// write there could point it anywhere); yes for a dataset the operator chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Links {
    Refuse,
    Follow,
}

/// Why [`read_regular`] read nothing.
#[derive(Debug)]
pub enum ReadError {
    /// A symbolic link (with [`Links::Refuse`]), directory, device or pipe.
    NotRegular,
    /// More bytes than the limit.
    TooLarge,
    Io(std::io::Error),
}

impl ReadError {
    /// The reject of an input `label` that could not be read within `limit` bytes.
    pub fn rejection(self, label: &str, limit: u64) -> Rejection {
        match self {
            Self::TooLarge => Rejection::new(
                RejectKind::TooLarge,
                format!("{label}: more than {limit} bytes when read"),
            ),
            Self::NotRegular => Rejection::new(
                RejectKind::File,
                format!("{label}: not a regular file (a symbolic link, a device or a pipe)"),
            ),
            Self::Io(e) => Rejection::new(RejectKind::File, format!("{label}: cannot read: {e}")),
        }
    }
}

/// Opens `path` for reading without blocking on a pipe (`O_NONBLOCK`) and, with
/// [`Links::Refuse`], without following a symbolic link (`O_NOFOLLOW`); checks on the open
/// handle that it is a regular file, so a file swapped for a link or a device after a scan is
/// refused, not read.
pub fn open_regular(path: &Path, links: Links) -> Result<std::fs::File, ReadError> {
    use std::os::unix::fs::OpenOptionsExt;
    let flags = match links {
        Links::Refuse => libc::O_NOFOLLOW | libc::O_NONBLOCK,
        Links::Follow => libc::O_NONBLOCK,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(path)
        .map_err(|error| {
            if error.raw_os_error() == Some(libc::ELOOP) {
                ReadError::NotRegular
            } else {
                ReadError::Io(error)
            }
        })?;
    if !file.metadata().map_err(ReadError::Io)?.is_file() {
        return Err(ReadError::NotRegular);
    }
    Ok(file)
}

/// Reads a regular file ([`open_regular`]), at most `limit` bytes whatever its size says.
pub fn read_regular(path: &Path, limit: u64, links: Links) -> Result<Vec<u8>, ReadError> {
    use std::io::Read;
    let file = open_regular(path, links)?;
    let mut bytes = Vec::new();
    file.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(ReadError::Io)?;
    if bytes.len() as u64 > limit {
        return Err(ReadError::TooLarge);
    }
    Ok(bytes)
}

/// Captions of `NAME.txt`: UTF-8, one per line; blank lines are skipped.
pub fn parse_caption_txt(bytes: &[u8], name: &str) -> Result<Vec<String>, Rejection> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        Rejection::new(
            RejectKind::Captions,
            format!(
                "{name} is not valid UTF-8 (at byte {}): save captions as UTF-8",
                e.valid_up_to()
            ),
        )
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(str::to_string)
        .collect())
}

/// `NAME.json` in the inbox.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaptionFile {
    captions: Vec<String>,
    #[serde(default)]
    metadata: Option<serde_json::Map<String, serde_json::Value>>,
}

/// Captions and metadata of `NAME.json`: `{"captions": [...], "metadata": {...}}`.
pub fn parse_caption_json(
    bytes: &[u8],
    name: &str,
) -> Result<(Vec<String>, serde_json::Map<String, serde_json::Value>), Rejection> {
    let file: CaptionFile = serde_json::from_slice(bytes).map_err(|e| {
        Rejection::new(
            RejectKind::Captions,
            format!("{name}: invalid caption JSON: {e} (expected {{\"captions\": [...], \"metadata\": {{...}}}})"),
        )
    })?;
    Ok((file.captions, file.metadata.unwrap_or_default()))
}

/// Lowercase extension of a path.
pub fn extension_of(path: &Path) -> Option<String> {
    path.extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
}

/// Image extensions of the inbox contract.
pub const IMAGE_EXTENSIONS: [&str; 5] = ["jpg", "jpeg", "png", "tif", "tiff"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn txt_captions_skip_blank_lines_and_refuse_bad_utf8() {
        let captions = parse_caption_txt(b"\xef\xbb\xbfa harbor\n\n  two ships  \r\n", "x.txt");
        assert_eq!(captions.unwrap(), vec!["a harbor", "two ships"]);
        let error = parse_caption_txt(b"ok\n\xff\xfe", "x.txt").unwrap_err();
        assert_eq!(error.kind, RejectKind::Captions);
        assert!(
            error
                .reason
                .contains("x.txt is not valid UTF-8 (at byte 3)")
        );
    }

    #[test]
    fn json_captions_refuse_unknown_fields_and_wrong_types() {
        let (captions, metadata) = parse_caption_json(
            br#"{"captions": ["a"], "metadata": {"gsd": 0.5}}"#,
            "x.json",
        )
        .unwrap();
        assert_eq!(captions, vec!["a"]);
        assert_eq!(metadata["gsd"], 0.5);
        for bad in [
            &br#"{"captions": "a"}"#[..],
            br#"{"captions": ["a"], "colour": 1}"#,
            br#"{"captions": ["a"]"#,
        ] {
            let error = parse_caption_json(bad, "x.json").unwrap_err();
            assert!(error.reason.starts_with("x.json: invalid caption JSON"));
        }
    }

    #[test]
    fn captions_are_checked_and_long_ones_kept() {
        let validator = Validator::new(ImageLimits::with_max_pixels(1 << 20), 1 << 20, 3);
        let source = "test".to_string();
        let long = "a very long caption ".repeat(40);
        assert_eq!(
            validator
                .check_captions(vec![" x ".into(), long.clone()], "s")
                .unwrap(),
            vec!["x".to_string(), long.trim().to_string()]
        );
        let error = validator.check_captions(vec![], "s").unwrap_err();
        assert_eq!(error.reason, "s: no captions");
        let error = validator
            .check_captions(vec!["a".into(), " ".into()], "s")
            .unwrap_err();
        assert_eq!(error.reason, "s: caption 2 is empty");
        let error = validator
            .check_captions(vec!["a".into(); 4], "s")
            .unwrap_err();
        assert!(error.reason.contains("more than ingest.max_captions (3)"));
        let error = validator
            .validate(
                vec![0u8; 2 << 20],
                vec!["a".into()],
                Default::default(),
                &source,
                "big",
            )
            .unwrap_err();
        assert_eq!(error.kind, RejectKind::TooLarge);
    }
}
