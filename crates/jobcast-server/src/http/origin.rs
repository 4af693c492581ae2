//! Without authentication, the browser is the attacker's way in: any page
//! can send a `no-cors` POST to a loopback port, and DNS rebinding lets a
//! page's own name resolve to 127.0.0.1. So, when no key is configured:
//!
//! - a request whose `Host` is not a loopback name (`localhost`,
//!   `*.localhost`, `127.x.y.z`, `[::1]`, any port) nor listed in
//!   `--allowed-host` is 403 `host_not_allowed` (reads too: rebinding reads);
//! - a write (any method but GET, HEAD, OPTIONS) with an `Origin` other than
//!   the server's own or one listed in `--cors-origin` (`*` does not count),
//!   or with `Sec-Fetch-Site: cross-site` from an unlisted origin, is 403
//!   `cross_site_write`. No `Origin` at all (curl, the CLI, servers) is fine.
//!
//! With authentication on, Bearer tokens protect writes (a browser never
//! adds one by itself, and cookies grant reading only) and names are the
//! operator's business, as with Mercure or Centrifugo: neither check runs.
//! A router layer, so the lean SSE path (which serves through the router)
//! is covered too.

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{header, HeaderMap, Method, StatusCode};

use super::{ApiError, AppState};

/// The middleware.
pub(super) async fn check(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if state.config.auth.is_some() {
        return next.run(req).await;
    }
    let host = request_host(&req);
    if let Some(host) = host.as_deref() {
        if !host_allowed(host, &state.config.allowed_hosts) {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "host_not_allowed",
                "this server answers loopback names only; add the name with --allowed-host",
            )
            .into_response();
        }
    }
    let write = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if write && cross_site(req.headers(), host.as_deref(), &state.config.cors_origins) {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "cross_site_write",
            "writes from pages on other sites need --cors-origin (or authentication)",
        )
        .into_response();
    }
    next.run(req).await
}

/// The `Host` header, else the URI's authority (HTTP/2), lowercased.
fn request_host(req: &Request) -> Option<String> {
    req.headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.as_str().to_owned()))
        .map(|h| h.trim().to_ascii_lowercase())
}

/// `host` without its port (`[::1]:7700` → `[::1]`).
fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        };
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

/// Whether `host` (lowercased, maybe with a port) is loopback or allowed.
fn host_allowed(host: &str, allowed: &[String]) -> bool {
    let name = strip_port(host).trim_end_matches('.');
    let loopback = name == "localhost"
        || name.ends_with(".localhost")
        || name == "[::1]"
        || name
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback());
    loopback
        || allowed
            .iter()
            .any(|a| a == "*" || a.eq_ignore_ascii_case(host) || a.eq_ignore_ascii_case(name))
}

/// Whether a write comes from a page of another site (or origin).
fn cross_site(headers: &HeaderMap, host: Option<&str>, cors: &[String]) -> bool {
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    if let Some(origin) = origin {
        let origin = origin.trim().trim_end_matches('/');
        if cors
            .iter()
            .any(|o| o != "*" && o.eq_ignore_ascii_case(origin))
        {
            return false;
        }
        let own = host.is_some_and(|h| same_origin(origin, h));
        return !own;
    }
    headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("cross-site"))
}

/// Whether `origin` (`scheme://host[:port]`) names the server reached as `host`.
fn same_origin(origin: &str, host: &str) -> bool {
    let Some((scheme, rest)) = origin.split_once("://") else {
        return false; // "null" and anything odd
    };
    let default = match scheme.to_ascii_lowercase().as_str() {
        "http" => ":80",
        "https" => ":443",
        _ => return false,
    };
    let norm = |h: &str| {
        let h = h.to_ascii_lowercase();
        match h.strip_suffix(default) {
            Some(bare) => bare.to_owned(),
            None => h,
        }
    };
    norm(rest) == norm(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_names_with_or_without_ports() {
        for h in [
            "localhost",
            "localhost:7700",
            "a.localhost:1",
            "127.0.0.1",
            "127.9.9.9:80",
            "[::1]",
            "[::1]:7700",
            "localhost.",
        ] {
            assert!(host_allowed(h, &[]), "{h}");
        }
        for h in [
            "evil.example",
            "127.0.0.1.evil.example",
            "localhost.evil",
            "10.0.0.1",
            "[::2]:1",
            "0.0.0.0",
        ] {
            assert!(!host_allowed(h, &[]), "{h}");
        }
        assert!(host_allowed("jobs.lan:7700", &["jobs.lan".into()]));
        assert!(host_allowed("anything", &["*".into()]));
    }

    #[test]
    fn origins_match_their_host() {
        assert!(same_origin("http://127.0.0.1:7700", "127.0.0.1:7700"));
        assert!(same_origin("http://localhost", "localhost:80"));
        assert!(!same_origin("http://127.0.0.1:1", "127.0.0.1:7700"));
        assert!(!same_origin("null", "127.0.0.1:7700"));
        assert!(!same_origin("file://", "127.0.0.1:7700"));
    }
}
