//! The web pages: a search page at `/` and a status page at `/status`, served from files
//! compiled into the binary (no build step, no CDN: they work on an offline machine).
//!
//! The pages themselves hold no data and need no token; every datum comes from the `/v1` API
//! with the bearer token the user typed, kept in the browser's local storage (never in a
//! URL). Images are fetched with that header too and shown from blob URLs.

use axum::Router;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// Page or asset: path, content type, body.
const FILES: &[(&str, &str, &str)] = &[
    (
        "/",
        "text/html; charset=utf-8",
        include_str!("assets/index.html"),
    ),
    (
        "/status",
        "text/html; charset=utf-8",
        include_str!("assets/status.html"),
    ),
    (
        "/ui/app.css",
        "text/css; charset=utf-8",
        include_str!("assets/app.css"),
    ),
    (
        "/ui/api.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/api.js"),
    ),
    (
        "/ui/search.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/search.js"),
    ),
    (
        "/ui/status.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/status.js"),
    ),
    (
        "/ui/favicon.svg",
        "image/svg+xml",
        include_str!("assets/favicon.svg"),
    ),
];

/// Only this origin's scripts and styles; images from the API arrive as blob URLs.
const CSP: &str = "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; \
                   script-src 'self'; connect-src 'self'; frame-ancestors 'none'";

/// The pages' routes (mounted beside the API, outside its token check).
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    let mut router = Router::new();
    for &(path, content_type, body) in FILES {
        router = router.route(path, get(move || async move { file(content_type, body) }));
    }
    router
}

fn file(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            // Revalidated on every load: an upgraded daemon serves its own pages.
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}
