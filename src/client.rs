//! Operator commands that change the daemon's state (`rsitrd rollback`, `rsitrd quarantine
//! --release`): through the running daemon's API, whose version owner applies them; when no
//! daemon answers, directly on the data directory with the same rules (the store's writer
//! lock keeps a daemon from starting meanwhile).

use anyhow::{Context, Result, bail};

use crate::config::Config;
use crate::store::{SampleId, Store};

/// POSTs `body` to the running daemon's API (with the bearer token when one is set); `None`
/// when no daemon answers at `http.listen`.
pub fn post_to_daemon(
    config: &Config,
    path: &str,
    body: &serde_json::Value,
    what: &str,
) -> Result<Option<String>> {
    let url = format!("http://{}{path}", config.http.listen);
    let mut request = ureq::post(&url);
    if let Ok(token) = std::env::var(&config.http.bearer_token_env)
        && !token.is_empty()
    {
        request = request.header("Authorization", &format!("Bearer {token}"));
    }
    match request
        .config()
        .http_status_as_error(false)
        .build()
        .send_json(body)
    {
        Ok(mut response) => {
            let text = response.body_mut().read_to_string().unwrap_or_default();
            if !response.status().is_success() {
                bail!("{what} refused by the daemon: {text}");
            }
            Ok(Some(text))
        }
        Err(ureq::Error::Io(_)) | Err(ureq::Error::ConnectionFailed) => Ok(None),
        Err(error) => Err(error).with_context(|| format!("{what} request")),
    }
}

fn open_store(config: &Config) -> Result<Store> {
    let dir = config.store.store_dir();
    Store::open_configured(&config.store)
        .with_context(|| format!("cannot open the store in {}", dir.display()))
}

/// Rolls back to `to` (or the previous kept version); the daemon's answer, or
/// `{"adapter_version", "offline": true}` when it is stopped.
pub fn rollback(config: &Config, to: Option<u64>) -> Result<serde_json::Value> {
    let body = serde_json::json!({ "to": to });
    if let Some(text) = post_to_daemon(config, "/v1/rollback", &body, "rollback")? {
        return Ok(serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)));
    }
    let store = open_store(config)?;
    let index = crate::index::open(&config.index, &config.store.dir)?;
    let version = crate::versions::offline_rollback(&store, index.as_ref(), config, to)?;
    Ok(serde_json::json!({ "adapter_version": version, "offline": true }))
}

/// Releases quarantined samples (`None`: all of them).
pub fn release(config: &Config, ids: Option<&[SampleId]>) -> Result<serde_json::Value> {
    let body = match ids {
        None => serde_json::json!({ "all": true }),
        Some(ids) => serde_json::json!({ "ids": ids }),
    };
    if let Some(text) = post_to_daemon(config, "/v1/quarantine/release", &body, "release")? {
        return Ok(serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)));
    }
    let store = open_store(config)?;
    let released = store.release(ids)?;
    Ok(serde_json::json!({ "released": released }))
}
