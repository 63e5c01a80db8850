//! The web console at `/ui/`: static files (`crates/hyperfleet-core/ui/`)
//! compiled into the binary with `include_bytes!`, served with their content
//! types and a strict Content-Security-Policy (scripts, styles and
//! connections from this origin only, nothing inline, no frames). No
//! authentication here: the files hold no data; the console calls the API
//! with the key the user signs in with (docs/security.md "The web console").
//!
//! Every file under `ui/` must be listed in [`ASSETS`]; a test fails when one
//! is missing, so a new file cannot be forgotten.

use std::sync::OnceLock;

use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use sha2::{Digest, Sha256};

use super::error::ApiError;
use super::AppState;

/// The policy on every console response. `style-src` has no
/// `'unsafe-inline'`: xterm.js's runtime styles go through constructed
/// stylesheets (ui/term.js), which CSP does not restrict.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                       img-src 'self'; font-src 'self'; connect-src 'self'; \
                       manifest-src 'self'; base-uri 'none'; form-action 'none'; \
                       frame-ancestors 'none'";

/// One embedded file.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

macro_rules! asset {
    ($path:literal, $type:literal) => {
        Asset {
            path: $path,
            content_type: $type,
            body: include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/ui/", $path)),
        }
    };
}

/// Every file of the console, by its path under `/ui/`.
const ASSETS: &[Asset] = &[
    asset!("index.html", "text/html; charset=utf-8"),
    asset!("favicon.svg", "image/svg+xml"),
    asset!("style.css", "text/css; charset=utf-8"),
    asset!("api.js", "text/javascript; charset=utf-8"),
    asset!("dom.js", "text/javascript; charset=utf-8"),
    asset!("app.js", "text/javascript; charset=utf-8"),
    asset!("list.js", "text/javascript; charset=utf-8"),
    asset!("machine.js", "text/javascript; charset=utf-8"),
    asset!("keys.js", "text/javascript; charset=utf-8"),
    asset!("term.js", "text/javascript; charset=utf-8"),
    asset!("vendor/VERSIONS", "text/plain; charset=utf-8"),
    asset!("vendor/xterm/xterm.mjs", "text/javascript; charset=utf-8"),
    asset!("vendor/xterm/xterm.css", "text/css; charset=utf-8"),
    asset!("vendor/xterm/LICENSE", "text/plain; charset=utf-8"),
    asset!(
        "vendor/addon-fit/addon-fit.mjs",
        "text/javascript; charset=utf-8"
    ),
    asset!("vendor/addon-fit/LICENSE", "text/plain; charset=utf-8"),
];

/// A strong validator for each file: a hash of its bytes, computed once.
fn etag(i: usize) -> &'static HeaderValue {
    static TAGS: OnceLock<Vec<HeaderValue>> = OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        ASSETS
            .iter()
            .map(|a| {
                let h = hex::encode(&Sha256::digest(a.body)[..12]);
                // Hex in quotes: always a valid header value.
                HeaderValue::from_str(&format!("\"{h}\""))
                    .unwrap_or(HeaderValue::from_static("\"\""))
            })
            .collect()
    });
    &tags[i]
}

/// The console's routes: `/ui` (redirects), `/ui/` (index.html) and
/// `/ui/{path}`.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route(
            "/ui/",
            get(|h: HeaderMap| async move { serve("index.html", &h) }),
        )
        .route(
            "/ui/{*path}",
            get(|Path(path): Path<String>, h: HeaderMap| async move { serve(&path, &h) }),
        )
}

fn serve(path: &str, req: &HeaderMap) -> Response {
    let Some(i) = ASSETS.iter().position(|a| a.path == path) else {
        return ApiError::not_found(format!(
            "console file '{}'",
            path.chars().take(100).collect::<String>()
        ))
        .into_response();
    };
    let a = &ASSETS[i];
    let tag = etag(i);
    let fresh = req
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == tag.as_bytes());
    let headers = [
        (
            header::CONTENT_TYPE,
            HeaderValue::from_static(a.content_type),
        ),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        // Revalidated on every load (cheap: 304 by ETag), so a new daemon's
        // console is never mixed with an old one's cached modules.
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        (header::ETAG, tag.clone()),
    ];
    if fresh {
        return (StatusCode::NOT_MODIFIED, headers).into_response();
    }
    (StatusCode::OK, headers, a.body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files_under(dir: &std::path::Path, base: &std::path::Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                files_under(&p, base, out);
            } else {
                out.push(p.strip_prefix(base).unwrap().to_string_lossy().into_owned());
            }
        }
    }

    /// The content type a file's extension calls for (what [`ASSETS`] must say;
    /// checked by a test).
    fn type_for(path: &str) -> &'static str {
        match path.rsplit_once('.').map(|(_, ext)| ext) {
            Some("html") => "text/html; charset=utf-8",
            Some("js" | "mjs") => "text/javascript; charset=utf-8",
            Some("css") => "text/css; charset=utf-8",
            Some("svg") => "image/svg+xml",
            _ => "text/plain; charset=utf-8",
        }
    }

    #[test]
    fn every_file_of_the_console_is_embedded_with_the_type_its_extension_calls_for() {
        let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("ui");
        let mut files = Vec::new();
        files_under(&base, &base, &mut files);
        files.sort();
        let mut listed: Vec<String> = ASSETS.iter().map(|a| a.path.to_string()).collect();
        listed.sort();
        assert_eq!(files, listed, "ui/ and ASSETS differ");
        for a in ASSETS {
            assert_eq!(a.content_type, type_for(a.path), "{}", a.path);
        }
    }

    #[test]
    fn the_policy_names_no_other_origin_and_allows_nothing_inline() {
        assert!(!CSP.contains("http"), "{CSP}");
        assert!(!CSP.contains("unsafe"), "{CSP}");
        assert!(!CSP.contains('*'), "{CSP}");
    }
}
