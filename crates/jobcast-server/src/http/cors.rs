//! CORS for pages on other origins (`--cors-origin`).

use std::time::Duration;

use http::{header, HeaderName, HeaderValue, Method};
use tower_http::cors::{AllowOrigin, CorsLayer};

/// The CORS layer for `origins`; None when no origin is configured.
/// Credentials (cookies) are allowed only with an explicit list of origins:
/// `*` means any origin, without credentials.
pub(super) fn layer(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let base = CorsLayer::new()
        .allow_methods([
            Method::GET,
            Method::HEAD,
            Method::POST,
            Method::PUT,
            Method::DELETE,
        ])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::CACHE_CONTROL,
            HeaderName::from_static("idempotency-key"),
            HeaderName::from_static("last-event-id"),
        ])
        .expose_headers([
            header::RETRY_AFTER,
            header::WWW_AUTHENTICATE,
            HeaderName::from_static("idempotent-replayed"),
        ])
        .max_age(Duration::from_secs(3600));
    if origins.iter().any(|o| o == "*") {
        return Some(base.allow_origin(AllowOrigin::any()));
    }
    let list: Vec<HeaderValue> = origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o.trim_end_matches('/')).ok())
        .collect();
    Some(base.allow_origin(list).allow_credentials(true))
}
