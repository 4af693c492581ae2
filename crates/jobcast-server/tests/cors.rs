//! CORS for pages on other origins: preflights and real requests from an
//! allowed and a disallowed origin, on hyper's path and on the lean SSE
//! path; credentials only with explicit origins; error answers (401) carry
//! the headers too, so a page can read why it was refused.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{Sse, TestServer, T};
use jobcast_server::Auth;
use reqwest::header::HeaderMap;
use reqwest::Method;

const SECRET: &str = "a test secret for the CORS tests";
const ALLOWED: &str = "https://app.example.com";
const OTHER: &str = "https://evil.example.net";

fn token() -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let claims =
        serde_json::json!({ "exp": exp, "jobcast": { "publish": ["*"], "subscribe": ["*"] } });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

async fn server(origins: &[&str]) -> TestServer {
    let origins: Vec<String> = origins.iter().map(|s| s.to_string()).collect();
    TestServer::start_with(move |c| {
        c.auth = Some(Auth::hs256(SECRET).unwrap().with_leeway(Duration::ZERO));
        c.cors_origins = origins;
    })
    .await
}

fn h<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Every value of a comma-separated header, lowercased.
fn list(headers: &HeaderMap, name: &str) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.trim().to_ascii_lowercase())
        .filter(|v| !v.is_empty())
        .collect()
}

async fn preflight(s: &TestServer, origin: &str) -> (u16, HeaderMap) {
    let res = s
        .client
        .request(Method::OPTIONS, s.url("/v1/streams/job-1/events"))
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization, content-type, idempotency-key, last-event-id",
        )
        .send()
        .await
        .unwrap();
    (res.status().as_u16(), res.headers().clone())
}

#[tokio::test]
async fn preflight_from_an_allowed_and_a_disallowed_origin() {
    let s = server(&[ALLOWED, "https://second.example.com"]).await;
    let (status, headers) = preflight(&s, ALLOWED).await;
    assert_eq!(status, 200);
    assert_eq!(h(&headers, "access-control-allow-origin"), Some(ALLOWED));
    assert_eq!(
        h(&headers, "access-control-allow-credentials"),
        Some("true")
    );
    let allowed = list(&headers, "access-control-allow-headers");
    for want in [
        "authorization",
        "content-type",
        "idempotency-key",
        "last-event-id",
    ] {
        assert!(
            allowed.contains(&want.to_owned()),
            "{want} not in {allowed:?}"
        );
    }
    let methods = list(&headers, "access-control-allow-methods");
    for want in ["get", "post", "put", "delete"] {
        assert!(
            methods.contains(&want.to_owned()),
            "{want} not in {methods:?}"
        );
    }
    // Without Access-Control-Allow-Origin a browser refuses the request
    // (tower-http still sends allow-credentials, which alone grants nothing).
    let (_, headers) = preflight(&s, OTHER).await;
    assert_eq!(h(&headers, "access-control-allow-origin"), None);
}

#[tokio::test]
async fn real_requests_carry_the_headers_only_for_allowed_origins() {
    let s = server(&[ALLOWED]).await;
    let t = token();
    // An append and a JSON read through hyper.
    for origin in [ALLOWED, OTHER] {
        let res = s
            .client
            .post(s.url("/v1/streams/job-1/events"))
            .header("origin", origin)
            .bearer_auth(&t)
            .header("content-type", "application/json")
            .body(r#"{"data":"x"}"#)
            .send()
            .await
            .unwrap();
        // CORS is the browser's to enforce: the server answers either way.
        assert_eq!(res.status(), 201);
        let want = (origin == ALLOWED).then_some(ALLOWED);
        assert_eq!(h(res.headers(), "access-control-allow-origin"), want);
        let res = s
            .client
            .get(s.url("/v1/streams/job-1/events"))
            .header("origin", origin)
            .bearer_auth(&t)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(h(res.headers(), "access-control-allow-origin"), want);
        // The reads' own Vary survives next to the CORS one.
        let vary = list(res.headers(), "vary");
        for v in ["accept", "authorization", "cookie", "origin"] {
            assert!(vary.contains(&v.to_owned()), "{v} not in {vary:?}");
        }
    }
    // A 401 is readable by the page too.
    let res = s
        .client
        .get(s.url("/v1/streams/job-1/events"))
        .header("origin", ALLOWED)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(
        h(res.headers(), "access-control-allow-origin"),
        Some(ALLOWED)
    );
    let exposed = list(res.headers(), "access-control-expose-headers");
    assert!(
        exposed.contains(&"www-authenticate".to_owned()),
        "{exposed:?}"
    );
}

/// An SSE watch on a fresh connection is served by the lean path, which
/// answers through the same router: the CORS headers are there.
#[tokio::test]
async fn an_sse_watch_on_a_fresh_connection_carries_the_headers() {
    let s = server(&[ALLOWED]).await;
    let t = token();
    let res = s
        .client
        .post(s.url("/v1/streams/job-1/events"))
        .bearer_auth(&t)
        .header("content-type", "application/json")
        .body(r#"{"data":"x"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    for (origin, want) in [(ALLOWED, Some(ALLOWED)), (OTHER, None)] {
        // A new client: a new connection, whose first request is the watch.
        let fresh = reqwest::Client::new();
        let res = fresh
            .get(s.url("/v1/streams/job-1/events"))
            .header("accept", "text/event-stream")
            .header("origin", origin)
            .query(&[("access_token", &t)])
            .send()
            .await
            .unwrap();
        assert_eq!(
            h(res.headers(), "connection"),
            Some("close"),
            "served by the lean path"
        );
        let mut sse = Sse::new(res);
        assert_eq!(sse.status, 200);
        assert_eq!(h(&sse.headers, "access-control-allow-origin"), want);
        if want.is_some() {
            assert_eq!(
                h(&sse.headers, "access-control-allow-credentials"),
                Some("true")
            );
        }
        let e = sse.next_event(T).await.expect("the event");
        assert_eq!(e.data, "x");
    }
}

/// `*` allows any origin, and then never credentials.
#[tokio::test]
async fn a_wildcard_origin_never_allows_credentials() {
    let s = server(&["*"]).await;
    let (status, headers) = preflight(&s, OTHER).await;
    assert_eq!(status, 200);
    assert_eq!(h(&headers, "access-control-allow-origin"), Some("*"));
    assert_eq!(h(&headers, "access-control-allow-credentials"), None);
}

/// No origin configured: no CORS headers at all.
#[tokio::test]
async fn no_origins_no_headers() {
    let s = server(&[]).await;
    let (_, headers) = preflight(&s, ALLOWED).await;
    assert_eq!(h(&headers, "access-control-allow-origin"), None);
}
