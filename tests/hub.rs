//! `--model owner/name` downloads the HF files once into the cache; offline, the error says
//! how to use a local directory. The "hub" here is a plain HTTP server on 127.0.0.1 serving
//! the real files under the hub's URL layout (`/{repo}/resolve/main/{file}`).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::fixture;

/// Serves tiny-clip's files as repo `test-org/tiny-clip`; returns the endpoint and a request
/// counter. The server thread ends with the test process.
fn serve_hub() -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let requests = Arc::new(AtomicUsize::new(0));
    let counter = requests.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            reader.read_line(&mut request_line).unwrap();
            loop {
                let mut header = String::new();
                if reader.read_line(&mut header).unwrap() == 0 || header == "\r\n" {
                    break;
                }
            }
            counter.fetch_add(1, Ordering::SeqCst);
            let path = request_line.split_whitespace().nth(1).unwrap_or("");
            let body = match path.strip_prefix("/test-org/remote-clip/resolve/main/") {
                // An open_clip training checkpoint in a folder of the repository.
                Some("ckpt/RS-ViT-L-14.pt") => {
                    std::fs::read(fixture("openclip-l14-gelu/checkpoint.pt")).ok()
                }
                Some(_) => None,
                None => path
                    .strip_prefix("/test-org/tiny-clip/resolve/main/")
                    .and_then(|file| std::fs::read(fixture("tiny-clip").join(file)).ok()),
            };
            match body {
                Some(body) => {
                    write!(
                        stream,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    )
                    .unwrap();
                    stream.write_all(&body).unwrap();
                }
                None => {
                    write!(
                        stream,
                        "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    )
                    .unwrap();
                }
            }
        }
    });
    (endpoint, requests)
}

fn embed(endpoint: &str, cache: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_rsitrd"))
        .args([
            "embed",
            "--model",
            "test-org/tiny-clip",
            "--text",
            "a harbor",
        ])
        .env("HF_ENDPOINT", endpoint)
        .env("RSITRD_CACHE_DIR", cache)
        .output()
        .unwrap()
}

#[test]
fn downloads_once_then_uses_the_cache() {
    let cache = tempfile::tempdir().unwrap();
    let (endpoint, requests) = serve_hub();
    let first = embed(&endpoint, cache.path());
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert_eq!(
        requests.load(Ordering::SeqCst),
        2,
        "config.json and model.safetensors"
    );
    let cached = cache
        .path()
        .join("hub/test-org--tiny-clip/model.safetensors");
    assert_eq!(
        std::fs::read(&cached).unwrap(),
        std::fs::read(fixture("tiny-clip/model.safetensors")).unwrap()
    );
    // Second run: nothing fetched (an unreachable endpoint proves it).
    let second = embed("http://127.0.0.1:1", cache.path());
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    assert_eq!(first.stdout, second.stdout);
}

#[test]
fn offline_error_explains_local_directories() {
    let cache = tempfile::tempdir().unwrap();
    let out = embed("http://127.0.0.1:1", cache.path());
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot download config.json"), "{stderr}");
    assert!(stderr.contains("--model DIR"), "{stderr}");
    // Nothing half-written is left to be mistaken for a cached model.
    assert!(
        !cache
            .path()
            .join("hub/test-org--tiny-clip/config.json")
            .exists()
    );
}

#[test]
fn missing_repo_is_an_error_not_a_panic() {
    let cache = tempfile::tempdir().unwrap();
    let (endpoint, _) = serve_hub();
    let out = Command::new(env!("CARGO_BIN_EXE_rsitrd"))
        .args(["embed", "--model", "test-org/missing", "--text", "x"])
        .env("HF_ENDPOINT", &endpoint)
        .env("RSITRD_CACHE_DIR", cache.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("404"), "{stderr}");
}

#[test]
fn an_open_clip_file_in_a_hub_repository_downloads_once_and_loads() {
    let cache = tempfile::tempdir().unwrap();
    let (endpoint, requests) = serve_hub();
    let run = |endpoint: &str| {
        Command::new(env!("CARGO_BIN_EXE_rsitrd"))
            .args([
                "embed",
                "--json",
                "--model",
                "test-org/remote-clip:ckpt/RS-ViT-L-14.pt#auto",
            ])
            .args(["--text", "a harbor"])
            .env("HF_ENDPOINT", endpoint)
            .env("RSITRD_CACHE_DIR", cache.path())
            .output()
            .unwrap()
    };
    let first = run(&endpoint);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert_eq!(requests.load(Ordering::SeqCst), 1, "the checkpoint only");
    let line: serde_json::Value =
        serde_json::from_slice(first.stdout.split(|b| *b == b'\n').next().unwrap()).unwrap();
    assert_eq!(
        line["embedding"].as_array().unwrap().len(),
        16,
        "its embed_dim"
    );
    let second = run("http://127.0.0.1:1");
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    assert_eq!(first.stdout, second.stdout, "from the cache");
}
