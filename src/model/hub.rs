//! Model directories from the HuggingFace hub: `openai/clip-vit-base-patch32` is fetched
//! once (with progress) into a cache; a local directory is used as it is.
//!
//! open_clip checkpoints are named by their file: a local `FILE.pt` or a hub id and file name
//! `owner/repo:FILE.pt` (e.g. `chendelong/RemoteCLIP:RemoteCLIP-ViT-B-32.pt`), each with an
//! optional `#ARCHITECTURE` (`#ViT-B-32`, `#ViT-L-14-quickgelu`, `#auto`); they become a
//! small model directory in the cache that points at the file ([`super::openclip`]).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// The hub the default configuration downloads from (override: `HF_ENDPOINT`).
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// The files of a CLIP model directory that rsitrd needs.
pub const MODEL_FILES: [&str; 2] = ["config.json", "model.safetensors"];

/// Why a model could not be found or fetched. Messages say how to point at a local copy.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error(
        "model `{spec}` is neither a local directory, an open_clip checkpoint (`FILE.pt#ARCH`, `owner/repo:FILE.pt#ARCH`) nor a hub id like `openai/clip-vit-base-patch32`"
    )]
    NotFound { spec: String },
    #[error(
        "cannot download {file} of `{repo}` from {endpoint} ({reason}); offline machines: download {files} of the model elsewhere into one directory and pass it with --model DIR (or model.dir in the configuration)",
        files = MODEL_FILES.join(" and ")
    )]
    Download {
        repo: String,
        file: String,
        endpoint: String,
        reason: String,
    },
    #[error("open_clip checkpoint `{spec}`: {reason}")]
    OpenClip { spec: String, reason: String },
    #[error("cannot write the model cache {path}: {source}")]
    Cache {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Where downloaded models live: `$RSITRD_CACHE_DIR`, else `$XDG_CACHE_HOME/rsitrd`, else
/// `~/.cache/rsitrd`, else `./.rsitrd-cache`.
pub fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("RSITRD_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("rsitrd");
    }
    if let Some(home) = std::env::var_os("HOME") {
        return PathBuf::from(home).join(".cache/rsitrd");
    }
    PathBuf::from(".rsitrd-cache")
}

/// Whether `spec` looks like a hub repository id (`owner/name`).
fn is_hub_id(spec: &str) -> bool {
    let mut parts = spec.split('/');
    let valid = |p: &str| {
        !p.is_empty()
            && !p.starts_with('.')
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    matches!((parts.next(), parts.next(), parts.next()), (Some(a), Some(b), None) if valid(a) && valid(b))
}

/// Resolves `--model`: an existing directory is returned as it is; a hub id is served from
/// the cache, downloading `config.json` and `model.safetensors` the first time.
pub fn resolve_model(spec: &str) -> Result<PathBuf, HubError> {
    resolve_model_files(spec, &MODEL_FILES)
}

/// Like [`resolve_model`], fetching only `files` (e.g. just `config.json`).
pub fn resolve_model_files(spec: &str, files: &[&str]) -> Result<PathBuf, HubError> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if let Some(dir) = resolve_open_clip(spec)? {
        return Ok(dir);
    }
    if !is_hub_id(spec) {
        return Err(HubError::NotFound { spec: spec.into() });
    }
    let endpoint = std::env::var("HF_ENDPOINT").unwrap_or_else(|_| DEFAULT_ENDPOINT.into());
    let dir = cache_root().join("hub").join(spec.replace('/', "--"));
    for &file in files {
        let target = dir.join(file);
        if target.is_file() {
            continue;
        }
        download(&endpoint, spec, file, &target)?;
    }
    Ok(dir)
}

/// An open_clip checkpoint spec (`FILE[#ARCH]` or `owner/repo:FILE[#ARCH]`) as a model
/// directory; `None` if `spec` is not one.
fn resolve_open_clip(spec: &str) -> Result<Option<PathBuf>, HubError> {
    let (file_spec, architecture) = match spec.rsplit_once('#') {
        Some((file, arch)) => (file, Some(arch)),
        None => (spec, None),
    };
    let failed = |reason: String| HubError::OpenClip {
        spec: spec.into(),
        reason,
    };
    let checkpoint = if Path::new(file_spec).is_file() {
        PathBuf::from(file_spec)
    } else if let Some((repo, file)) = file_spec.split_once(':')
        && is_hub_id(repo)
        && !file.is_empty()
        && !file.contains("..")
        && !file.starts_with('/')
    {
        let endpoint = std::env::var("HF_ENDPOINT").unwrap_or_else(|_| DEFAULT_ENDPOINT.into());
        let target = cache_root()
            .join("hub")
            .join(repo.replace('/', "--"))
            .join(file);
        if !target.is_file() {
            download(&endpoint, repo, file, &target)?;
        }
        target
    } else {
        return Ok(None);
    };
    if architecture.is_none() {
        tracing::warn!(
            %spec,
            "no open_clip architecture named: inferring it from the weights, with GELU \
             (append #ARCH-quickgelu for OpenAI-activation models such as GeoRSCLIP)"
        );
    }
    super::openclip::prepare_dir(&checkpoint, architecture, &cache_root())
        .map(Some)
        .map_err(failed)
}

/// Downloads one file to `target` (temp file, fsync, rename), with a progress bar on a
/// terminal and a log line otherwise.
fn download(endpoint: &str, repo: &str, file: &str, target: &Path) -> Result<(), HubError> {
    let url = format!(
        "{}/{repo}/resolve/main/{file}",
        endpoint.trim_end_matches('/')
    );
    let failed = |reason: String| HubError::Download {
        repo: repo.into(),
        file: file.into(),
        endpoint: endpoint.into(),
        reason,
    };
    let cache_error = |source: std::io::Error| HubError::Cache {
        path: target.to_path_buf(),
        source,
    };
    tracing::info!(%url, "downloading model file");
    let agent = ureq::Agent::config_builder()
        .timeout_connect(Some(std::time::Duration::from_secs(20)))
        .build()
        .new_agent();
    let mut response = agent.get(&url).call().map_err(|e| failed(e.to_string()))?;
    let length = response
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let dir = target.parent().expect("cache file has a parent");
    std::fs::create_dir_all(dir).map_err(cache_error)?;
    // Named after the target's own file name: `file` may be a path inside the repository.
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = dir.join(format!(".{name}.part-{}", std::process::id()));
    let progress = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        let bar = indicatif::ProgressBar::new(length.unwrap_or(0));
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_message(format!("{repo}/{file}"));
        Some(bar)
    } else {
        None
    };
    let mut reader = response.body_mut().as_reader();
    let mut out = std::fs::File::create(&temp).map_err(cache_error)?;
    let mut buffer = vec![0u8; 1 << 20];
    let mut written = 0u64;
    loop {
        let read = reader
            .read(&mut buffer)
            .map_err(|e| failed(e.to_string()))?;
        if read == 0 {
            break;
        }
        out.write_all(&buffer[..read]).map_err(cache_error)?;
        written += read as u64;
        if let Some(bar) = &progress {
            bar.set_position(written);
        }
    }
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    if let Some(expected) = length
        && expected != written
    {
        let _ = std::fs::remove_file(&temp);
        return Err(failed(format!("got {written} of {expected} bytes")));
    }
    out.sync_all().map_err(cache_error)?;
    std::fs::rename(&temp, target).map_err(cache_error)?;
    tracing::info!(file = %target.display(), bytes = written, "model file cached");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids() {
        assert!(is_hub_id("openai/clip-vit-base-patch32"));
        assert!(!is_hub_id("/abs/path"));
        assert!(!is_hub_id("a/b/c"));
        assert!(!is_hub_id("../x"));
        assert!(!is_hub_id("plain"));
    }
}
