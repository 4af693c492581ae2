//! The dashboard at `GET /`: the files of `web/` and the browser client of
//! `clients/js` (plain ES modules, no build step), embedded in the binary so
//! that `jobcast serve` needs no Node at run time.
//!
//! The page maps the bare specifiers its modules import (`@jobcast/client`,
//! `eventsource-parser`) to `/ui/…` URLs with an import map. Browsers treat an
//! inline import map as an inline script under CSP, so the policy allows
//! exactly that one by its SHA-256 hash and nothing else inline.

use std::sync::OnceLock;

use axum::extract::Path;
use axum::response::{IntoResponse, Response};
use http::{header, HeaderValue, StatusCode};
use sha2::{Digest, Sha256};

use super::ApiError;

/// `web/index.html`.
const INDEX_HTML: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../web/index.html"));

const JS: &str = "text/javascript; charset=utf-8";

/// The assets under `/ui/`: (path after `/ui/`, content type, body).
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "app.js",
        JS,
        include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../web/app.js")),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../web/style.css")),
    ),
    (
        "client/index.js",
        JS,
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../clients/js/src/index.js"
        )),
    ),
    (
        "client/watch.js",
        JS,
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../clients/js/src/watch.js"
        )),
    ),
    (
        "client/machine.js",
        JS,
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../clients/js/src/machine.js"
        )),
    ),
    (
        "client/backoff.js",
        JS,
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../clients/js/src/backoff.js"
        )),
    ),
    (
        "client/store.js",
        JS,
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../clients/js/src/store.js"
        )),
    ),
    (
        "client/producer.js",
        JS,
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../clients/js/src/producer.js"
        )),
    ),
    (
        "vendor/eventsource-parser.js",
        JS,
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../clients/js/vendor/eventsource-parser.js"
        )),
    ),
];

/// The paths of every embedded asset, `/` first.
#[cfg(test)]
fn asset_paths() -> Vec<String> {
    std::iter::once("/".to_owned())
        .chain(ASSETS.iter().map(|(p, _, _)| format!("/ui/{p}")))
        .collect()
}

/// `GET /`: the dashboard page.
pub(super) async fn index() -> Response {
    respond("text/html; charset=utf-8", INDEX_HTML)
}

/// `GET /ui/{*path}`: an embedded asset, or 404.
pub(super) async fn asset(Path(path): Path<String>) -> Result<Response, ApiError> {
    ASSETS
        .iter()
        .find(|(p, _, _)| *p == path)
        .map(|(_, ty, body)| respond(ty, body))
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route"))
}

fn respond(content_type: &'static str, body: &'static str) -> Response {
    let mut res = body.into_response();
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Embedded in the binary: revalidate, so an upgrade shows at once.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // A `?token=` in the page URL must not leak through Referer.
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if let Ok(csp) = HeaderValue::from_str(csp()) {
        h.insert(header::CONTENT_SECURITY_POLICY, csp);
    }
    res
}

/// The Content-Security-Policy of the dashboard: scripts from this origin
/// only, plus the page's one import map by hash; no inline code, no framing.
fn csp() -> &'static str {
    static CSP: OnceLock<String> = OnceLock::new();
    CSP.get_or_init(|| {
        let map = import_map(INDEX_HTML).unwrap_or_default();
        let hash = base64(&Sha256::digest(map.as_bytes()));
        format!(
            "default-src 'none'; script-src 'self' 'sha256-{hash}'; style-src 'self'; \
             img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; \
             frame-ancestors 'none'"
        )
    })
}

/// The text of the page's `<script type="importmap">` element.
fn import_map(html: &str) -> Option<&str> {
    const OPEN: &str = "<script type=\"importmap\">";
    let start = html.find(OPEN)? + OPEN.len();
    let len = html[start..].find("</script>")?;
    Some(&html[start..start + len])
}

/// Standard base64 with padding (CSP hashes use it).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_known_vectors() {
        for (input, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), want, "{input:?}");
        }
    }

    #[test]
    fn the_page_has_an_import_map_and_no_other_inline_script() {
        let map = import_map(INDEX_HTML).expect("an import map");
        let v: serde_json::Value = serde_json::from_str(map).expect("import map is JSON");
        for (name, url) in v["imports"].as_object().expect("imports") {
            let path = url.as_str().expect("url");
            assert!(asset_paths().iter().any(|p| p == path), "{name} -> {path}");
        }
        // Every other <script> element loads a file.
        let scripts = INDEX_HTML.matches("<script").count();
        let with_src = INDEX_HTML.matches("<script type=\"module\" src=").count();
        assert_eq!(scripts, with_src + 1, "only the import map is inline");
        assert!(csp().contains("script-src 'self' 'sha256-"));
    }

    #[test]
    fn every_relative_import_of_a_served_module_is_served() {
        for (path, _, body) in ASSETS.iter().filter(|(p, _, _)| p.ends_with(".js")) {
            let dir = path.rsplit_once('/').map_or("", |(d, _)| d);
            for line in body.lines() {
                let Some(spec) = line
                    .split(" from './")
                    .nth(1)
                    .and_then(|rest| rest.split('\'').next())
                else {
                    continue;
                };
                let want = if dir.is_empty() {
                    spec.to_owned()
                } else {
                    format!("{dir}/{spec}")
                };
                assert!(
                    ASSETS.iter().any(|(p, _, _)| *p == want),
                    "{path} imports ./{spec}, which is not embedded"
                );
            }
        }
    }
}
