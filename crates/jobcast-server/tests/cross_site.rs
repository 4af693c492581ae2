//! Without authentication (loopback only), other web pages must not write
//! and DNS rebinding must not reach the API: a write with a cross-site
//! `Origin` or `Sec-Fetch-Site: cross-site` is 403 `cross_site_write`; a
//! `Host` that is not loopback (or allowed) is 403 `host_not_allowed`, on
//! hyper's path and on the lean SSE path. With authentication on, Bearer
//! tokens decide and neither check applies.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{status_json, TestServer};
use jobcast_server::Auth;
use reqwest::Method;
use serde_json::Value;

const EVIL: &str = "http://evil.example";
const LISTED: &str = "http://app.example";

async fn server(lean: bool) -> TestServer {
    TestServer::start_with(|c| {
        c.lean_sse = lean;
        c.cors_origins = vec![LISTED.into()];
        c.allowed_hosts = vec!["jobcast.internal".into()];
    })
    .await
}

fn port(s: &TestServer) -> &str {
    s.url.rsplit(':').next().unwrap()
}

/// A request with optional extra headers, no Content-Type (as a no-cors fetch sends).
async fn send(
    s: &TestServer,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> (u16, Value) {
    let mut b = s.client.request(method, s.url(path));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    if let Some(body) = body {
        b = b.body(body.to_owned());
    }
    status_json(b.send().await.expect("request")).await
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

#[tokio::test]
async fn cross_site_writes_are_refused_without_auth() {
    let s = server(true).await;
    let own = s.url.clone();
    let body = Some(r#"{"data":"x"}"#);
    let refused: Vec<(&str, Vec<(&str, &str)>)> = vec![
        ("cross-site origin", vec![("origin", EVIL)]),
        ("null origin", vec![("origin", "null")]),
        (
            "same host, other port",
            vec![("origin", "http://127.0.0.1:1")],
        ),
        (
            "fetch metadata only",
            vec![("sec-fetch-site", "cross-site")],
        ),
    ];
    for (name, h) in &refused {
        for (method, path) in [
            (Method::POST, "/v1/streams/cs-1/events"),
            (Method::POST, "/v1/streams/cs-1/fail"),
            (Method::POST, "/v1/streams/cs-1/complete"),
            (Method::PUT, "/v1/streams/cs-1"),
            (Method::DELETE, "/v1/streams/cs-1"),
        ] {
            let (st, v) = send(&s, method.clone(), path, h, body).await;
            assert_eq!(
                (st, code(&v)),
                (403, "cross_site_write"),
                "{name}: {method} {path}: {v}"
            );
        }
    }
    let (st, _) = s.get_json("/v1/streams/cs-1").await;
    assert_eq!(st, 404, "nothing was written");
    // Allowed: no Origin (curl, the CLI), the server's own origin, a listed origin.
    let allowed: Vec<(&str, Vec<(&str, &str)>)> = vec![
        ("no origin", vec![]),
        (
            "own origin",
            vec![("origin", own.as_str()), ("sec-fetch-site", "same-origin")],
        ),
        (
            "listed origin",
            vec![("origin", LISTED), ("sec-fetch-site", "cross-site")],
        ),
        ("fetch metadata: none", vec![("sec-fetch-site", "none")]),
    ];
    for (name, h) in &allowed {
        let (st, v) = send(&s, Method::POST, "/v1/streams/cs-2/events", h, body).await;
        assert_eq!(st, 201, "{name}: {v}");
    }
    // Reads from any page are not writes (CORS keeps their answers from the page).
    let (st, v) = send(
        &s,
        Method::GET,
        "/v1/streams/cs-2",
        &[("origin", EVIL)],
        None,
    )
    .await;
    assert_eq!(st, 200, "{v}");
}

#[tokio::test]
async fn foreign_hosts_are_refused_without_auth_on_both_paths() {
    for lean in [true, false] {
        let s = server(lean).await;
        s.append("h-1", "x").await;
        let p = port(&s).to_owned();
        for host in [
            "evil.example".to_owned(),
            format!("evil.example:{p}"),
            "127.0.0.1.evil.example".to_owned(),
            "localhost.evil.example".to_owned(),
            format!("10.0.0.1:{p}"),
        ] {
            for (path, sse) in [
                ("/v1/streams", false),
                ("/v1/streams/h-1/events", true),
                ("/v1/streams/h-1/events", false),
                ("/healthz", false),
            ] {
                let mut b = s.client.get(s.url(path)).header("host", &host);
                if sse {
                    b = b.header("accept", "text/event-stream");
                }
                let (st, v) = status_json(b.send().await.unwrap()).await;
                assert_eq!(
                    (st, code(&v)),
                    (403, "host_not_allowed"),
                    "lean={lean} host={host} {path} sse={sse}: {v}"
                );
            }
        }
        for host in [
            format!("127.0.0.1:{p}"),
            format!("127.1.2.3:{p}"),
            format!("localhost:{p}"),
            "LOCALHOST".to_owned(),
            format!("app.localhost:{p}"),
            format!("[::1]:{p}"),
            "jobcast.internal".to_owned(),
            format!("jobcast.internal:{p}"),
        ] {
            let b = s
                .client
                .get(s.url("/v1/streams/h-1/events"))
                .header("host", &host)
                .header("accept", "text/event-stream");
            let res = b.send().await.unwrap();
            assert_eq!(res.status(), 200, "lean={lean} host={host}");
            drop(res);
            let (st, v) = status_json(
                s.client
                    .post(s.url("/v1/streams/h-2/events"))
                    .header("host", &host)
                    .body(r#"{"data":"x"}"#)
                    .send()
                    .await
                    .unwrap(),
            )
            .await;
            assert_eq!(st, 201, "lean={lean} host={host}: {v}");
        }
    }
}

#[tokio::test]
async fn with_auth_tokens_decide_and_neither_check_applies() {
    const SECRET: &str = "a test secret for the cross-site tests!";
    let s = TestServer::start_with(|c| {
        c.auth = Some(Auth::hs256(SECRET).unwrap().with_leeway(Duration::ZERO));
    })
    .await;
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let t = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &serde_json::json!({ "exp": exp, "jobcast": { "publish": ["*"], "subscribe": ["*"] } }),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let auth = format!("Bearer {t}");
    let h = [
        ("origin", EVIL),
        ("host", "jobcast.example.com"),
        ("authorization", auth.as_str()),
    ];
    let (st, v) = send(
        &s,
        Method::POST,
        "/v1/streams/a-1/events",
        &h,
        Some(r#"{"data":"x"}"#),
    )
    .await;
    assert_eq!(st, 201, "{v}");
    let (st, v) = send(
        &s,
        Method::GET,
        "/v1/streams",
        &[("host", "jobcast.example.com")],
        None,
    )
    .await;
    assert_eq!((st, code(&v)), (401, "unauthorized"), "{v}");
}
