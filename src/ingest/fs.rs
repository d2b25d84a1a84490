//! The watched inbox directory (`notify`): `NAME.{jpg,jpeg,png,tif,tiff}` + `NAME.txt` or
//! `NAME.json`, in the inbox or any subdirectory.
//!
//! Events are hints; the directory is the truth. The watch starts first, then every wake-up
//! (an event, a queue overflow, a pending deadline, the periodic rescan) scans the whole inbox,
//! so files that arrived while rsitrd was down, bursts beyond the inotify queue and subtrees
//! copied in are all found. A file is taken when it is complete: renamed in, or closed by its
//! writer, or (without such an event) unmodified for `settle`; when events were lost (an
//! overflow), every hint is forgotten and `settle` decides, so a dropped close event cannot
//! leave a pair waiting. After the store commit the pair moves to `done/` (or is deleted);
//! rejects move to `rejected/` with `NAME.error.txt`.

use std::collections::{BTreeMap, HashMap};
use std::fs::Metadata;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant, SystemTime};

use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind, RenameMode};
use notify::{EventKind, RecursiveMode, Watcher};
use rayon::prelude::*;
use tokio_util::sync::CancellationToken;

use super::{
    IMAGE_EXTENSIONS, Links, MAX_CAPTION_FILE_BYTES, ReadError, RejectKind, Rejection, Validator,
    extension_of, open_regular, parse_caption_json, parse_caption_txt, read_regular, report_reject,
    report_stored,
};
use crate::config::{InboxSection, OnSuccess};
use crate::store::writer::StoreWriter;
use crate::store::{OpOutcome, SampleId, StoreOp};

/// Source label of inbox samples.
pub const SOURCE: &str = "inbox";
/// Events buffered between the watcher thread and the scan loop; beyond it the loop is told to
/// rescan (as on an inotify overflow) instead of growing without bound.
const EVENT_QUEUE_CAPACITY: usize = 16_384;
/// Longest sleep between cancellation checks.
const POLL: Duration = Duration::from_millis(200);
/// Pause before retrying pairs whose commit failed transiently (disk full, I/O error).
const RETRY_AFTER: Duration = Duration::from_secs(2);

/// Why the inbox cannot run.
#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    #[error("cannot create inbox directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot watch {path}: {source}")]
    Watch {
        path: PathBuf,
        source: notify::Error,
    },
}

/// What the watcher learned about a path since its last change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hint {
    /// Created or written, not yet closed: wait.
    Writing,
    /// Closed by its writer or renamed in: complete.
    Complete,
}

/// Role of a file in the inbox contract.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Role {
    Image,
    Txt,
    Json,
    Unsupported(String),
}

#[derive(Debug, Clone)]
struct Part {
    path: PathBuf,
    role: Role,
    len: u64,
    modified: SystemTime,
}

/// A file and whether it is complete.
type PartState = (Part, bool);

/// Files sharing a directory and a stem.
#[derive(Debug, Default)]
struct Group {
    parts: Vec<Part>,
}

/// The inbox loop; blocking: run it on its own thread. Returns when `cancel` fires.
pub fn run_inbox(
    config: &InboxSection,
    validator: Arc<Validator>,
    writer: StoreWriter,
    cancel: CancellationToken,
) -> Result<(), InboxError> {
    let inbox = absolute(&config.dir);
    let done = absolute(&config.done_dir());
    let rejected = absolute(&config.rejected_dir());
    for dir in [&inbox, &done, &rejected] {
        std::fs::create_dir_all(dir).map_err(|source| InboxError::CreateDir {
            path: dir.clone(),
            source,
        })?;
    }
    let (sender, events) = std::sync::mpsc::sync_channel(EVENT_QUEUE_CAPACITY);
    let overflow = Arc::new(AtomicBool::new(false));
    let mut watcher = watcher(sender, overflow.clone()).map_err(|source| InboxError::Watch {
        path: inbox.clone(),
        source,
    })?;
    // Watch first, then scan: nothing arriving in between is missed.
    watcher
        .watch(&inbox, RecursiveMode::Recursive)
        .map_err(|source| InboxError::Watch {
            path: inbox.clone(),
            source,
        })?;
    tracing::info!(inbox = %inbox.display(), "watching the inbox");
    let mut state = Inbox {
        config: config.clone(),
        inbox,
        done,
        rejected,
        validator,
        writer,
        hints: Hints::default(),
        first_seen: HashMap::new(),
        stuck: HashMap::new(),
    };
    let mut next_scan = Instant::now();
    let mut last_full_scan = Instant::now();
    while !cancel.is_cancelled() {
        let now = Instant::now();
        if now >= next_scan || now.duration_since(last_full_scan) >= config.rescan_interval {
            next_scan = state.scan_and_process(&cancel);
            last_full_scan = Instant::now();
        }
        let wait = next_scan
            .saturating_duration_since(Instant::now())
            .min(POLL)
            .max(Duration::from_millis(1));
        match events.recv_timeout(wait) {
            Ok(event) => {
                let mut lost = state.hints.apply(event);
                while let Ok(event) = events.try_recv() {
                    lost |= state.hints.apply(event);
                }
                if lost | overflow.swap(false, Ordering::SeqCst) {
                    state.hints.lost();
                }
                // Coalesce a burst: a few milliseconds of quiet before the scan.
                next_scan = Instant::now() + Duration::from_millis(20);
            }
            Err(RecvTimeoutError::Timeout) => {
                if overflow.swap(false, Ordering::SeqCst) {
                    state.hints.lost();
                    next_scan = Instant::now();
                }
            }
            Err(RecvTimeoutError::Disconnected) => {
                next_scan = Instant::now();
            }
        }
    }
    drop(watcher);
    Ok(())
}

fn watcher(
    sender: SyncSender<notify::Result<notify::Event>>,
    overflow: Arc<AtomicBool>,
) -> notify::Result<notify::RecommendedWatcher> {
    // The callback only forwards: a full queue becomes a rescan flag.
    notify::recommended_watcher(move |event| {
        if let Err(TrySendError::Full(_)) = sender.try_send(event) {
            overflow.store(true, Ordering::SeqCst);
        }
    })
}

struct Inbox {
    config: InboxSection,
    inbox: PathBuf,
    done: PathBuf,
    rejected: PathBuf,
    validator: Arc<Validator>,
    writer: StoreWriter,
    /// Per path, what events said since its last change.
    hints: Hints,
    /// When this process first saw each (directory, stem) group, for the orphan timeout.
    first_seen: HashMap<(PathBuf, String), Instant>,
    /// Entries handled (rejected or stored) that could not be moved out of the inbox: skipped
    /// while they keep the identity they had, so that one is never rejected twice.
    stuck: HashMap<PathBuf, Identity>,
}

/// What makes an inbox entry "the same one": device, inode, type, size and change times.
/// A new file at the same path, or the same file rewritten, differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Identity {
    dev: u64,
    ino: u64,
    mode: u32,
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

fn identity_of(path: &Path) -> Option<Identity> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(path).ok()?;
    Some(Identity {
        dev: m.dev(),
        ino: m.ino(),
        mode: m.mode(),
        len: m.len(),
        mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
    })
}

/// What events said about each path since its last change: hints, since events can be lost.
#[derive(Debug, Default)]
struct Hints {
    map: HashMap<PathBuf, Hint>,
}

impl Hints {
    /// Records an event's hints; returns whether events were lost (an
    /// error, or the kernel's queue overflowed).
    fn apply(&mut self, event: notify::Result<notify::Event>) -> bool {
        let event = match event {
            Ok(event) => event,
            Err(error) => {
                tracing::warn!(%error, "inbox watch error: rescanning");
                return true;
            }
        };
        if event.need_rescan() {
            return true;
        }
        let hint = match event.kind {
            EventKind::Create(CreateKind::File) | EventKind::Modify(ModifyKind::Data(_)) => {
                Some(Hint::Writing)
            }
            EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Modify(ModifyKind::Name(RenameMode::To)) => Some(Hint::Complete),
            EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => {
                // paths = [from, to]
                if let Some(to) = event.paths.get(1) {
                    self.map.insert(to.clone(), Hint::Complete);
                }
                if let Some(from) = event.paths.first() {
                    self.map.remove(from);
                }
                None
            }
            EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(RenameMode::From)) => {
                for path in &event.paths {
                    self.map.remove(path);
                }
                None
            }
            _ => None,
        };
        if let Some(hint) = hint {
            for path in event.paths {
                self.map.insert(path, hint);
            }
        }
        false
    }

    /// Events were lost (the kernel's queue or ours overflowed): any hint may be stale. A
    /// `Writing` whose close event was dropped would keep its pair waiting forever, so every
    /// hint is forgotten and files are taken by the `settle` rule until new events arrive.
    fn lost(&mut self) {
        tracing::info!("inbox events were lost: hints forgotten, full rescan");
        self.map.clear();
    }

    /// Whether a file is complete: closed by its writer or renamed in, or, without such a
    /// hint, unmodified for `settle`.
    fn settled(&self, part: &Part, settle: Duration) -> bool {
        match self.map.get(&part.path) {
            Some(Hint::Complete) => true,
            Some(Hint::Writing) => false,
            None => part
                .modified
                .elapsed()
                .map(|age| age >= settle)
                .unwrap_or(true),
        }
    }

    fn remove(&mut self, path: &Path) {
        self.map.remove(path);
    }

    /// Forgets the paths that are gone.
    fn retain_existing(&mut self) {
        self.map.retain(|path, _| path.exists());
    }
}

impl Inbox {
    /// Scans the inbox, ingests complete pairs, rejects what breaks the contract; returns when
    /// the next scan is due for pending files (settling, waiting for a partner, retrying).
    fn scan_and_process(&mut self, cancel: &CancellationToken) -> Instant {
        let now = Instant::now();
        let mut next = now + self.config.rescan_interval;
        let mut groups: BTreeMap<(PathBuf, String), Group> = BTreeMap::new();
        let mut links = Vec::new();
        // A stuck entry that is gone or has changed is handled afresh.
        self.stuck
            .retain(|path, identity| identity_of(path) == Some(*identity));
        self.walk(&self.inbox.clone(), &mut groups, &mut links);
        for link in links {
            let rejection = Rejection::new(
                RejectKind::File,
                format!(
                    "{}: symbolic links are not accepted (they may point outside the inbox): move the file itself in",
                    self.relative(&link)
                ),
            );
            self.reject(&[link], None, &rejection);
        }
        // Forget groups and hints that are gone.
        self.first_seen.retain(|key, _| groups.contains_key(key));
        self.hints.retain_existing();

        let mut ready = Vec::new();
        for (key, group) in groups {
            let first_seen = *self.first_seen.entry(key.clone()).or_insert(now);
            let settled: Vec<bool> = group
                .parts
                .iter()
                .map(|p| self.hints.settled(p, self.config.settle))
                .collect();
            let waiting_for = |deadline: Instant, next: &mut Instant| {
                *next = (*next).min(deadline);
            };
            // Unsupported files: rejected on their own once complete.
            let (unsupported, parts): (Vec<PartState>, Vec<PartState>) = group
                .parts
                .into_iter()
                .zip(settled)
                .partition(|(p, _)| matches!(p.role, Role::Unsupported(_)));
            for (part, complete) in unsupported {
                if !complete {
                    waiting_for(now + self.config.settle, &mut next);
                    continue;
                }
                let Role::Unsupported(ext) = &part.role else {
                    continue;
                };
                let rejection = Rejection::new(
                    RejectKind::File,
                    format!(
                        "{}: unsupported file type `.{ext}` (expected NAME.jpg/.jpeg/.png/.tif/.tiff with NAME.txt or NAME.json)",
                        self.relative(&part.path)
                    ),
                );
                self.reject(&[part.path], Some(&key), &rejection);
            }
            if parts.is_empty() {
                continue;
            }
            if parts.iter().any(|(_, complete)| !complete) {
                waiting_for(
                    now + self.config.settle.min(Duration::from_millis(500)),
                    &mut next,
                );
                continue;
            }
            let images: Vec<&Part> = parts
                .iter()
                .map(|(p, _)| p)
                .filter(|p| p.role == Role::Image)
                .collect();
            let texts: Vec<&Part> = parts
                .iter()
                .map(|(p, _)| p)
                .filter(|p| p.role != Role::Image)
                .collect();
            let paths: Vec<PathBuf> = parts.iter().map(|(p, _)| p.path.clone()).collect();
            let name = self.relative(&key.0.join(&key.1));
            if images.len() > 1 || texts.len() > 1 {
                let rejection = Rejection::new(
                    RejectKind::File,
                    format!(
                        "{name}: ambiguous pair ({} image files, {} caption files share the name): keep one image and one of NAME.txt or NAME.json",
                        images.len(),
                        texts.len()
                    ),
                );
                self.reject(&paths, Some(&key), &rejection);
                continue;
            }
            if images.len() == 1 && texts.len() == 1 {
                ready.push((key, images[0].clone(), texts[0].clone()));
                continue;
            }
            // A lone part waits for its partner.
            let deadline = first_seen + self.config.orphan_timeout;
            if now >= deadline {
                let missing = if images.is_empty() {
                    format!("no image {name}.{{jpg,jpeg,png,tif,tiff}}")
                } else {
                    format!("no caption file {name}.txt or {name}.json")
                };
                let rejection = Rejection::new(
                    RejectKind::Orphan,
                    format!(
                        "{missing} arrived within inbox.orphan_timeout ({})",
                        humantime::format_duration(self.config.orphan_timeout)
                    ),
                );
                self.reject(&paths, Some(&key), &rejection);
            } else {
                waiting_for(deadline, &mut next);
            }
        }
        if !ready.is_empty() && !cancel.is_cancelled() && !self.ingest(ready) {
            next = next.min(Instant::now() + RETRY_AFTER);
        }
        next
    }

    /// Reads, validates and commits complete pairs (validation in parallel, one group
    /// commit); returns false if some must be retried.
    fn ingest(&mut self, ready: Vec<((PathBuf, String), Part, Part)>) -> bool {
        let validated: Vec<_> = ready
            .into_par_iter()
            .map(|(key, image, text)| {
                let result = self.read_and_validate(&key, &image, &text);
                (key, image, text, result)
            })
            .collect();
        let mut ops = Vec::new();
        let mut accepted = Vec::new();
        for (key, image, text, result) in validated {
            match result {
                Ok(sample) => {
                    ops.push(StoreOp::Sample(sample));
                    accepted.push((key, image, text));
                }
                Err(rejection) => self.reject(&[image.path, text.path], Some(&key), &rejection),
            }
        }
        let mut all_done = true;
        let answers = self.writer.commit_all_blocking(ops);
        for ((key, image, text), answer) in accepted.into_iter().zip(answers) {
            let name = self.relative(&image.path);
            match answer {
                Ok(OpOutcome::Sample(outcome)) => {
                    report_stored(SOURCE, &name, &outcome);
                    self.finish(&[image.path, text.path]);
                    self.first_seen.remove(&key);
                }
                Ok(OpOutcome::Reject { .. }) => unreachable!("a sample op answers with a sample"),
                Err(error) => {
                    // Nothing moves: the files stay for the retry.
                    tracing::warn!(input = %name, %error, "store commit failed: will retry");
                    all_done = false;
                }
            }
        }
        all_done
    }

    fn read_and_validate(
        &self,
        key: &(PathBuf, String),
        image: &Part,
        text: &Part,
    ) -> Result<crate::store::NewSample, Rejection> {
        let name = self.relative(&image.path);
        if image.len > self.validator.max_image_bytes() {
            return Err(Rejection::new(
                RejectKind::TooLarge,
                format!(
                    "{name}: image is {} bytes, more than ingest.max_image_bytes ({})",
                    image.len,
                    self.validator.max_image_bytes()
                ),
            ));
        }
        let text_name = self.relative(&text.path);
        if text.len > MAX_CAPTION_FILE_BYTES {
            return Err(Rejection::new(
                RejectKind::TooLarge,
                format!(
                    "{text_name}: caption file is {} bytes, more than {MAX_CAPTION_FILE_BYTES}",
                    text.len
                ),
            ));
        }
        let read = |path: &Path, label: &str, limit: u64| {
            read_regular(path, limit, Links::Refuse).map_err(|e| e.rejection(label, limit))
        };
        let text_bytes = read(&text.path, &text_name, MAX_CAPTION_FILE_BYTES)?;
        let (captions, metadata) = match text.role {
            Role::Txt => (
                parse_caption_txt(&text_bytes, &text_name)?,
                Default::default(),
            ),
            _ => parse_caption_json(&text_bytes, &text_name)?,
        };
        let bytes = read(&image.path, &name, self.validator.max_image_bytes())?;
        let mut metadata = metadata;
        metadata
            .entry("inbox_name")
            .or_insert_with(|| serde_json::Value::String(self.relative(&key.0.join(&key.1))));
        self.validator
            .validate(bytes, captions, metadata, &SOURCE.to_string(), &name)
    }

    /// Collects the inbox's files (not following links), skipping done/rejected and temporary
    /// files.
    fn walk(
        &self,
        dir: &Path,
        groups: &mut BTreeMap<(PathBuf, String), Group>,
        links: &mut Vec<PathBuf>,
    ) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path == self.done || path == self.rejected {
                continue;
            }
            let Some(file_name) = path.file_name().and_then(|n| n.to_str()).map(String::from)
            else {
                continue;
            };
            if is_temporary(&file_name) {
                continue;
            }
            let Ok(metadata) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if self.stuck.contains_key(&path) {
                continue;
            }
            if metadata.file_type().is_symlink() {
                links.push(path);
                continue;
            }
            if metadata.is_dir() {
                self.walk(&path, groups, links);
                continue;
            }
            if !metadata.is_file() {
                continue;
            }
            let (stem, role) = classify(&path, &file_name);
            groups
                .entry((dir.to_path_buf(), stem))
                .or_default()
                .parts
                .push(part(path, role, &metadata));
        }
    }

    /// Moves (or deletes) the files of a stored pair.
    fn finish(&mut self, paths: &[PathBuf]) {
        for path in paths {
            self.hints.remove(path);
        }
        match self.config.on_success {
            OnSuccess::Delete => {
                for path in paths {
                    let identity = identity_of(path);
                    if let Err(error) = std::fs::remove_file(path) {
                        self.mark_stuck(path, identity, &error.to_string());
                    }
                }
            }
            OnSuccess::Move => {
                let done = self.done.clone();
                self.move_all(paths, &done, None);
            }
        }
    }

    /// Records the reject durably, then moves the files to `rejected/` with `NAME.error.txt`.
    fn reject(
        &mut self,
        paths: &[PathBuf],
        key: Option<&(PathBuf, String)>,
        rejection: &Rejection,
    ) {
        let source_ref = paths.first().map(|p| self.relative(p)).unwrap_or_default();
        let mut hasher = blake3::Hasher::new();
        hasher.update(SOURCE.as_bytes());
        for path in paths {
            hasher.update(self.relative(path).as_bytes());
            if let Ok(metadata) = std::fs::symlink_metadata(path) {
                hasher.update(&metadata.len().to_le_bytes());
                if let Ok(modified) = metadata.modified() {
                    hasher.update(format!("{modified:?}").as_bytes());
                }
            }
        }
        let record = rejection.record(SampleId(*hasher.finalize().as_bytes()), SOURCE, &source_ref);
        if let Err(error) = self.writer.commit_blocking(StoreOp::Reject(record)) {
            // The files stay; the next scan tries again.
            tracing::warn!(input = %source_ref, %error, "cannot record a reject: will retry");
            return;
        }
        report_reject(SOURCE, &source_ref, rejection);
        for path in paths {
            self.hints.remove(path);
        }
        if let Some(key) = key {
            self.first_seen.remove(key);
        }
        let rejected = self.rejected.clone();
        self.move_all(paths, &rejected, Some(&rejection.reason));
    }

    /// Moves files under `target`, keeping their path relative to the inbox; a name already
    /// taken there gets a `.N` suffix (nothing is overwritten). With `reason`, writes
    /// `STEM.error.txt` beside them.
    fn move_all(&mut self, paths: &[PathBuf], target: &Path, reason: Option<&str>) {
        let Some(first) = paths.first() else {
            return;
        };
        let identities: Vec<Option<Identity>> = paths.iter().map(|p| identity_of(p)).collect();
        let relative_dir = first
            .parent()
            .and_then(|p| p.strip_prefix(&self.inbox).ok())
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let dir = target.join(relative_dir);
        if let Err(error) = std::fs::create_dir_all(&dir) {
            let reason = format!("cannot create {}: {error}", dir.display());
            for (path, identity) in paths.iter().zip(identities) {
                self.mark_stuck(path, identity, &reason);
            }
            return;
        }
        let stem = file_stem(first);
        let destination = |suffix: usize, path: &Path| -> PathBuf {
            let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
            let rest = file_name.strip_prefix(stem.as_str()).unwrap_or(file_name);
            if suffix == 0 {
                dir.join(format!("{stem}{rest}"))
            } else {
                dir.join(format!("{stem}.{suffix}{rest}"))
            }
        };
        let error_file = |suffix: usize| {
            if suffix == 0 {
                dir.join(format!("{stem}.error.txt"))
            } else {
                dir.join(format!("{stem}.{suffix}.error.txt"))
            }
        };
        let suffix = (0..)
            .find(|&suffix| {
                !paths.iter().any(|p| destination(suffix, p).exists())
                    && (reason.is_none() || !error_file(suffix).exists())
            })
            .expect("a free name exists");
        let mut failed = Vec::new();
        for (path, identity) in paths.iter().zip(identities) {
            let to = destination(suffix, path);
            if let Err(error) = rename_or_copy(path, &to) {
                failed.push((
                    path.clone(),
                    identity,
                    format!("cannot move it to {}: {error}", to.display()),
                ));
            }
        }
        for (path, identity, reason) in failed {
            self.mark_stuck(&path, identity, &reason);
        }
        if let Some(reason) = reason {
            let path = error_file(suffix);
            if let Err(error) = std::fs::write(&path, format!("{reason}\n")) {
                tracing::error!(path = %path.display(), %error, "cannot write the reject reason");
            }
        }
    }

    /// Remembers an entry that could not leave the inbox (one log line); it is skipped until
    /// it changes or goes.
    fn mark_stuck(&mut self, path: &Path, identity: Option<Identity>, reason: &str) {
        let Some(identity) = identity else {
            return; // gone already
        };
        tracing::warn!(
            path = %path.display(),
            reason,
            "inbox entry cannot be moved out of the inbox: skipped until it changes"
        );
        metrics::counter!("rsitrd_inbox_stuck_total").increment(1);
        self.stuck.insert(path.to_path_buf(), identity);
    }

    fn relative(&self, path: &Path) -> String {
        path.strip_prefix(&self.inbox)
            .unwrap_or(path)
            .display()
            .to_string()
    }
}

fn classify(path: &Path, file_name: &str) -> (String, Role) {
    let stem = file_stem(path);
    let role = match extension_of(path).as_deref() {
        Some(ext) if IMAGE_EXTENSIONS.contains(&ext) => Role::Image,
        Some("txt") => Role::Txt,
        Some("json") => Role::Json,
        Some(ext) => Role::Unsupported(ext.to_string()),
        None => Role::Unsupported(file_name.to_string()),
    };
    (stem, role)
}

fn file_stem(path: &Path) -> String {
    path.file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default()
        .to_string()
}

fn part(path: PathBuf, role: Role, metadata: &Metadata) -> Part {
    Part {
        path,
        role,
        len: metadata.len(),
        modified: metadata.modified().unwrap_or(SystemTime::UNIX_EPOCH),
    }
}

/// Hidden files and the usual in-progress names are a producer's business, not ours.
fn is_temporary(file_name: &str) -> bool {
    file_name.starts_with('.')
        || file_name.ends_with('~')
        || [".tmp", ".part", ".partial", ".crdownload", ".swp"]
            .iter()
            .any(|suffix| file_name.to_ascii_lowercase().ends_with(suffix))
}

/// Moves `from` to `to` without ever following a symbolic link: a rename moves the link
/// itself; across filesystems a link is re-created (pointing where it pointed, its target
/// never opened) and a regular file is copied through a no-follow handle into a new file.
fn rename_or_copy(from: &Path, to: &Path) -> std::io::Result<()> {
    match std::fs::rename(from, to) {
        Ok(()) => Ok(()),
        Err(error) if error.raw_os_error() == Some(libc::EXDEV) => {
            let metadata = std::fs::symlink_metadata(from)?;
            if metadata.file_type().is_symlink() {
                std::os::unix::fs::symlink(std::fs::read_link(from)?, to)?;
            } else {
                let mut source =
                    open_regular(from, Links::Refuse).map_err(|error| match error {
                        ReadError::Io(error) => error,
                        _ => std::io::Error::other("not a regular file: not copied"),
                    })?;
                // `create_new` never writes through a link planted at the destination.
                let mut target = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(to)?;
                std::io::copy(&mut source, &mut target)?;
                target.sync_all()?;
            }
            std::fs::remove_file(from)
        }
        Err(error) => Err(error),
    }
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file whose close event was lost in a queue overflow does not wait forever: once
    /// events are known lost, its stale `Writing` hint is forgotten and it settles by age.
    #[test]
    fn hints_are_forgotten_when_events_are_lost() {
        let path = PathBuf::from("/inbox/a.png");
        let part = |age_s: u64| Part {
            path: path.clone(),
            role: Role::Image,
            len: 1,
            modified: SystemTime::now() - Duration::from_secs(age_s),
        };
        let settle = Duration::from_secs(1);
        let mut hints = Hints::default();
        let created =
            notify::Event::new(EventKind::Create(CreateKind::File)).add_path(path.clone());
        assert!(!hints.apply(Ok(created)), "an ordinary event loses nothing");
        assert!(
            !hints.settled(&part(60), settle),
            "a file being written waits, however old"
        );
        // The kernel's overflow notice (or a full queue of ours) means events were dropped.
        let overflow = notify::Event::new(EventKind::Other).set_flag(notify::event::Flag::Rescan);
        assert!(hints.apply(Ok(overflow)));
        hints.lost();
        assert!(hints.settled(&part(60), settle), "settled by age");
        assert!(!hints.settled(&part(0), settle), "a fresh file still waits");
        // A close event settles a file at once.
        let closed = notify::Event::new(EventKind::Access(AccessKind::Close(AccessMode::Write)))
            .add_path(path.clone());
        assert!(!hints.apply(Ok(closed)));
        assert!(hints.settled(&part(0), settle));
    }

    #[test]
    fn files_are_classified_by_extension() {
        let role = |name: &str| classify(Path::new(name), name);
        assert_eq!(role("a.JPG"), ("a".into(), Role::Image));
        assert_eq!(role("a.b.tiff"), ("a.b".into(), Role::Image));
        assert_eq!(role("a.txt"), ("a".into(), Role::Txt));
        assert_eq!(role("a.json"), ("a".into(), Role::Json));
        assert_eq!(role("a.gif"), ("a".into(), Role::Unsupported("gif".into())));
        assert!(is_temporary(".a.jpg"));
        assert!(is_temporary("a.jpg.part"));
        assert!(!is_temporary("a.jpg"));
    }
}
