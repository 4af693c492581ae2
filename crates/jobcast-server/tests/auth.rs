//! Authentication and per-stream authorization against a real server: a
//! table of tokens (none, malformed, wrong signature, other algorithms,
//! expired, not yet valid, publish-only, subscribe-only, prefix patterns)
//! against requests, each with its exact status and code; cookie and query
//! tokens grant reading only; the stream list shows only what a token may
//! watch; public keys (EdDSA, RS256) with the algorithm pinned; a token
//! expiring while its stream is open closes it with `token_expired`.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{status_json, Sse, TestServer, T};
use jobcast_server::{Auth, KeyAlg};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

const SECRET: &str = "a test secret, long enough for HS256";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn sign(alg: Algorithm, key: &EncodingKey, claims: &Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, key).unwrap()
}

fn hs(claims: Value) -> String {
    sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(SECRET.as_bytes()),
        &claims,
    )
}

/// Claims valid for an hour with these publish and subscribe patterns.
fn claims(publish: &[&str], subscribe: &[&str]) -> Value {
    json!({ "exp": now() + 3600, "jobcast": { "publish": publish, "subscribe": subscribe } })
}

async fn server() -> TestServer {
    TestServer::start_with(|c| {
        c.auth = Some(Auth::hs256(SECRET).unwrap().with_leeway(Duration::ZERO));
    })
    .await
}

/// How a token is sent.
#[derive(Debug, Clone, Copy)]
enum Via {
    Bearer,
    Cookie,
    Query,
}

/// A request of the table.
#[derive(Debug, Clone, Copy)]
enum Req {
    /// GET the JSON page of a stream's log.
    Read(&'static str),
    /// GET the metadata.
    Meta(&'static str),
    /// POST one event.
    Append(&'static str),
    /// PUT (create).
    Create(&'static str),
    /// POST complete.
    Complete(&'static str),
    /// DELETE.
    Delete(&'static str),
    /// GET /v1/streams.
    List,
    /// GET /metrics.
    Metrics,
    /// GET /healthz.
    Health,
}

async fn send(s: &TestServer, req: Req, token: Option<&str>, via: Via) -> (u16, Value) {
    let c = &s.client;
    let (mut b, query_ok) = match req {
        Req::Read(id) => (c.get(s.url(&format!("/v1/streams/{id}/events"))), true),
        Req::Meta(id) => (c.get(s.url(&format!("/v1/streams/{id}"))), true),
        Req::Append(id) => (
            c.post(s.url(&format!("/v1/streams/{id}/events")))
                .header("content-type", "application/json")
                .body(r#"{"data":"x"}"#),
            false,
        ),
        Req::Create(id) => (c.put(s.url(&format!("/v1/streams/{id}"))), false),
        Req::Complete(id) => (c.post(s.url(&format!("/v1/streams/{id}/complete"))), false),
        Req::Delete(id) => (c.delete(s.url(&format!("/v1/streams/{id}"))), false),
        Req::List => (c.get(s.url("/v1/streams")), true),
        Req::Metrics => (c.get(s.url("/metrics")), true),
        Req::Health => (c.get(s.url("/healthz")), true),
    };
    if let Some(t) = token {
        b = match via {
            Via::Bearer => b.bearer_auth(t),
            Via::Cookie => b.header("cookie", format!("theme=dark; jobcast_token={t}")),
            Via::Query => {
                let _ = query_ok;
                b.query(&[("access_token", t)])
            }
        };
    }
    let res = b.send().await.expect("request");
    if res.status() == 401 {
        let challenge = res
            .headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        assert!(
            challenge.starts_with("Bearer"),
            "401 without a Bearer challenge"
        );
    }
    if res.status() == 200 && matches!(req, Req::Metrics) {
        return (200, Value::Null);
    }
    status_json(res).await
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

/// A row: name, token, how it is sent, the request, the status and code wanted.
type Row<'a> = (&'a str, Option<&'a str>, Via, Req, u16, &'a str);

/// Every row: a token (as sent), a request, the exact status and error code.
#[tokio::test]
async fn token_table() {
    let s = server().await;
    let admin = hs(claims(&["*"], &["*"]));
    // Streams the rows read.
    for id in ["job-1", "other-1", "job-del"] {
        let (st, v) = send(&s, Req::Append(id), Some(&admin), Via::Bearer).await;
        assert_eq!(st, 201, "{v}");
    }
    let other_key = EncodingKey::from_secret(b"another secret entirely, not the server's");
    let wrong_sig = sign(Algorithm::HS256, &other_key, &claims(&["*"], &["*"]));
    // The same secret, another HMAC algorithm: the algorithm is pinned.
    let hs512 = sign(
        Algorithm::HS512,
        &EncodingKey::from_secret(SECRET.as_bytes()),
        &claims(&["*"], &["*"]),
    );
    let no_exp = hs(json!({ "jobcast": { "publish": ["*"], "subscribe": ["*"] } }));
    let expired =
        hs(json!({ "exp": now() - 120, "jobcast": { "publish": ["*"], "subscribe": ["*"] } }));
    let not_yet = hs(json!({
        "exp": now() + 3600, "nbf": now() + 1800,
        "jobcast": { "publish": ["*"], "subscribe": ["*"] }
    }));
    // An unsigned token claiming `alg: none`.
    let none_alg = {
        use base64_url as b64;
        format!(
            "{}.{}.",
            b64(br#"{"alg":"none","typ":"JWT"}"#),
            b64(claims(&["*"], &["*"]).to_string().as_bytes())
        )
    };
    let publish_only = hs(claims(&["job-1"], &[]));
    let subscribe_only = hs(claims(&[], &["job-1"]));
    let prefix = hs(claims(&["job-*"], &["job-*"]));
    let no_claim = hs(json!({ "exp": now() + 3600 }));
    let metrics = hs(json!({ "exp": now() + 3600, "jobcast": { "metrics": true } }));

    use Req::*;
    use Via::*;
    let rows: Vec<Row> = vec![
        (
            "none: read",
            None,
            Bearer,
            Read("job-1"),
            401,
            "unauthorized",
        ),
        (
            "none: append",
            None,
            Bearer,
            Append("job-1"),
            401,
            "unauthorized",
        ),
        ("none: list", None, Bearer, List, 401, "unauthorized"),
        ("none: metrics", None, Bearer, Metrics, 401, "unauthorized"),
        ("none: health is public", None, Bearer, Health, 200, ""),
        (
            "malformed",
            Some("not-a-jwt"),
            Bearer,
            Read("job-1"),
            401,
            "token_invalid",
        ),
        (
            "malformed 3 parts",
            Some("a.b.c"),
            Bearer,
            Read("job-1"),
            401,
            "token_invalid",
        ),
        (
            "wrong signature",
            Some(&wrong_sig),
            Bearer,
            Read("job-1"),
            401,
            "token_invalid",
        ),
        (
            "other algorithm",
            Some(&hs512),
            Bearer,
            Read("job-1"),
            401,
            "token_invalid",
        ),
        (
            "alg none",
            Some(&none_alg),
            Bearer,
            Read("job-1"),
            401,
            "token_invalid",
        ),
        (
            "no exp",
            Some(&no_exp),
            Bearer,
            Read("job-1"),
            401,
            "token_invalid",
        ),
        (
            "expired",
            Some(&expired),
            Bearer,
            Read("job-1"),
            401,
            "token_expired",
        ),
        (
            "expired: append",
            Some(&expired),
            Bearer,
            Append("job-1"),
            401,
            "token_expired",
        ),
        (
            "not yet valid",
            Some(&not_yet),
            Bearer,
            Read("job-1"),
            401,
            "token_not_yet_valid",
        ),
        (
            "publish-only: append",
            Some(&publish_only),
            Bearer,
            Append("job-1"),
            201,
            "",
        ),
        (
            "publish-only: read",
            Some(&publish_only),
            Bearer,
            Read("job-1"),
            403,
            "forbidden",
        ),
        (
            "publish-only: meta",
            Some(&publish_only),
            Bearer,
            Meta("job-1"),
            403,
            "forbidden",
        ),
        (
            "publish-only: other stream",
            Some(&publish_only),
            Bearer,
            Append("other-1"),
            403,
            "forbidden",
        ),
        (
            "publish-only: create other",
            Some(&publish_only),
            Bearer,
            Create("job-2"),
            403,
            "forbidden",
        ),
        (
            "subscribe-only: read",
            Some(&subscribe_only),
            Bearer,
            Read("job-1"),
            200,
            "",
        ),
        (
            "subscribe-only: meta",
            Some(&subscribe_only),
            Bearer,
            Meta("job-1"),
            200,
            "",
        ),
        (
            "subscribe-only: append",
            Some(&subscribe_only),
            Bearer,
            Append("job-1"),
            403,
            "forbidden",
        ),
        (
            "subscribe-only: complete",
            Some(&subscribe_only),
            Bearer,
            Complete("job-1"),
            403,
            "forbidden",
        ),
        (
            "subscribe-only: delete",
            Some(&subscribe_only),
            Bearer,
            Delete("job-1"),
            403,
            "forbidden",
        ),
        (
            "subscribe-only: other stream",
            Some(&subscribe_only),
            Bearer,
            Read("other-1"),
            403,
            "forbidden",
        ),
        (
            "prefix: read",
            Some(&prefix),
            Bearer,
            Read("job-1"),
            200,
            "",
        ),
        (
            "prefix: append new",
            Some(&prefix),
            Bearer,
            Append("job-77"),
            201,
            "",
        ),
        (
            "prefix: create",
            Some(&prefix),
            Bearer,
            Create("job-2"),
            201,
            "",
        ),
        (
            "prefix: read other",
            Some(&prefix),
            Bearer,
            Read("other-1"),
            403,
            "forbidden",
        ),
        (
            "prefix: append other",
            Some(&prefix),
            Bearer,
            Append("other-1"),
            403,
            "forbidden",
        ),
        (
            "prefix: delete",
            Some(&prefix),
            Bearer,
            Delete("job-del"),
            204,
            "",
        ),
        ("prefix: list", Some(&prefix), Bearer, List, 200, ""),
        (
            "prefix: metrics",
            Some(&prefix),
            Bearer,
            Metrics,
            403,
            "forbidden",
        ),
        (
            "no jobcast claim: read",
            Some(&no_claim),
            Bearer,
            Read("job-1"),
            403,
            "forbidden",
        ),
        ("metrics claim", Some(&metrics), Bearer, Metrics, 200, ""),
        ("cookie: read", Some(&admin), Cookie, Read("job-1"), 200, ""),
        ("cookie: meta", Some(&admin), Cookie, Meta("job-1"), 200, ""),
        (
            "cookie: append",
            Some(&admin),
            Cookie,
            Append("job-1"),
            401,
            "bearer_required",
        ),
        (
            "cookie: create",
            Some(&admin),
            Cookie,
            Create("job-3"),
            401,
            "bearer_required",
        ),
        (
            "cookie: delete",
            Some(&admin),
            Cookie,
            Delete("job-1"),
            401,
            "bearer_required",
        ),
        (
            "cookie: expired",
            Some(&expired),
            Cookie,
            Read("job-1"),
            401,
            "token_expired",
        ),
        (
            "cookie: scoped",
            Some(&subscribe_only),
            Cookie,
            Read("other-1"),
            403,
            "forbidden",
        ),
        ("query: read", Some(&admin), Query, Read("job-1"), 200, ""),
        ("query: list", Some(&admin), Query, List, 200, ""),
        // Not accepted on a write at all: as if no token was sent.
        (
            "query: append",
            Some(&admin),
            Query,
            Append("job-1"),
            401,
            "unauthorized",
        ),
        (
            "query: wrong signature",
            Some(&wrong_sig),
            Query,
            Read("job-1"),
            401,
            "token_invalid",
        ),
    ];
    let mut failures = Vec::new();
    for (name, token, via, req, status, want_code) in rows {
        let (got, body) = send(&s, req, token, via).await;
        if got != status || code(&body) != want_code {
            failures.push(format!(
                "{name}: {req:?} via {via:?}: want {status} {want_code:?}, got {got} {body}"
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

fn base64_url(b: &[u8]) -> String {
    // A tiny unpadded base64url encoder, so the test needs no extra crate.
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in b.chunks(3) {
        let n = chunk.iter().fold(0u32, |acc, &x| (acc << 8) | x as u32) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// The list shows only the streams the token may subscribe to, across pages.
#[tokio::test]
async fn list_shows_only_what_the_token_may_watch() {
    let s = server().await;
    let admin = hs(claims(&["*"], &["*"]));
    for id in ["a-1", "b-1", "a-2", "b-2", "a-3", "secret-1"] {
        let (st, _) = send(&s, Req::Create(id), Some(&admin), Via::Bearer).await;
        assert_eq!(st, 201);
    }
    let token = hs(claims(&[], &["a-*", "secret-1"]));
    let mut seen = Vec::new();
    let mut url = s.url("/v1/streams?limit=2");
    for _ in 0..10 {
        let res = s.client.get(&url).bearer_auth(&token).send().await.unwrap();
        let (st, v) = status_json(res).await;
        assert_eq!(st, 200, "{v}");
        for m in v["streams"].as_array().unwrap() {
            seen.push(m["id"].as_str().unwrap().to_owned());
        }
        match v["next"].as_str() {
            Some(n) => url = s.url(&format!("/v1/streams?limit=2&after={n}")),
            None => break,
        }
    }
    assert_eq!(seen, ["secret-1", "a-3", "a-2", "a-1"]);
    let nothing = hs(claims(&["*"], &[]));
    let res = s
        .client
        .get(s.url("/v1/streams"))
        .bearer_auth(&nothing)
        .send()
        .await
        .unwrap();
    let (st, v) = status_json(res).await;
    assert_eq!(
        (st, v["streams"].as_array().unwrap().len()),
        (200, 0),
        "{v}"
    );
}

fn key_file(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/fixtures/keys/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

/// EdDSA and RS256 public keys: the right signature passes; a token of another
/// algorithm, or an HS256 token "signed" with the public key, does not.
#[tokio::test]
async fn public_keys_pin_their_algorithm() {
    let ed_pub = key_file("ed25519.pub.pem");
    let rsa_pub = key_file("rsa.pub.pem");
    let ed = EncodingKey::from_ed_pem(&key_file("ed25519.pem")).unwrap();
    let rsa = EncodingKey::from_rsa_pem(&key_file("rsa.pem")).unwrap();
    // Inferred from the key type, and given explicitly.
    assert_eq!(
        Auth::public_key_pem(&ed_pub, None).unwrap().algorithm(),
        Algorithm::EdDSA
    );
    assert_eq!(
        Auth::public_key_pem(&rsa_pub, None).unwrap().algorithm(),
        Algorithm::RS256
    );
    assert!(Auth::public_key_pem(&ed_pub, Some(KeyAlg::Rs256)).is_err());
    assert!(Auth::public_key_pem(b"not a key", None).is_err());

    let c = claims(&["*"], &["*"]);
    for (pem, good, bad) in [
        (
            ed_pub.clone(),
            sign(Algorithm::EdDSA, &ed, &c),
            vec![
                sign(Algorithm::RS256, &rsa, &c),
                sign(Algorithm::HS256, &EncodingKey::from_secret(&ed_pub), &c),
            ],
        ),
        (
            rsa_pub.clone(),
            sign(Algorithm::RS256, &rsa, &c),
            vec![
                sign(Algorithm::EdDSA, &ed, &c),
                sign(Algorithm::RS512, &rsa, &c),
                sign(Algorithm::HS256, &EncodingKey::from_secret(&rsa_pub), &c),
            ],
        ),
    ] {
        let s = TestServer::start_with(|cfg| {
            cfg.auth = Some(Auth::public_key_pem(&pem, None).unwrap());
        })
        .await;
        let (st, v) = send(&s, Req::Append("k-1"), Some(&good), Via::Bearer).await;
        assert_eq!(st, 201, "{v}");
        for t in &bad {
            let (st, v) = send(&s, Req::Read("k-1"), Some(t), Via::Bearer).await;
            assert_eq!((st, code(&v)), (401, "token_invalid"), "{v}");
        }
    }
}

/// A token expiring while its SSE stream is open closes the stream with a
/// `jobcast.error` `token_expired` (not retryable, `refresh: true`): on the
/// lean path and on hyper's, with a Bearer token and with `?access_token=`.
#[tokio::test]
async fn a_token_expiring_mid_stream_closes_the_stream() {
    for lean in [true, false] {
        let s = TestServer::start_with(|c| {
            c.auth = Some(Auth::hs256(SECRET).unwrap().with_leeway(Duration::ZERO));
            c.lean_sse = lean;
        })
        .await;
        let admin = hs(claims(&["*"], &["*"]));
        let (st, _) = send(&s, Req::Append("live-1"), Some(&admin), Via::Bearer).await;
        assert_eq!(st, 201);
        for via in [Via::Bearer, Via::Query] {
            let short = hs(json!({ "exp": now() + 2, "jobcast": { "subscribe": ["live-*"] } }));
            let mut req = s
                .client
                .get(s.url("/v1/streams/live-1/events"))
                .header("accept", "text/event-stream");
            req = match via {
                Via::Query => req.query(&[("access_token", &short)]),
                _ => req.bearer_auth(&short),
            };
            let mut sse = Sse::new(req.send().await.unwrap());
            assert_eq!(sse.status, 200, "lean={lean} {via:?}");
            let first = sse.next_event(T).await.expect("the event");
            assert_eq!(first.data, "x");
            let err = sse.next_event(T).await.expect("token_expired");
            assert_eq!(err.event, "jobcast.error", "lean={lean}");
            let v: Value = serde_json::from_str(&err.data).unwrap();
            assert_eq!(v["code"], "token_expired", "{v}");
            assert_eq!(v["retryable"], false, "{v}");
            assert_eq!(v["refresh"], true, "{v}");
            assert!(
                sse.next_event(T).await.is_none(),
                "closed after token_expired"
            );
        }
    }
}

/// A long poll does not outlive its token either: it answers at the expiry.
#[tokio::test]
async fn a_long_poll_answers_when_its_token_expires() {
    let s = server().await;
    let admin = hs(claims(&["*"], &["*"]));
    let (st, v) = send(&s, Req::Append("poll-1"), Some(&admin), Via::Bearer).await;
    assert_eq!(st, 201);
    let last = v["last_id"].as_str().unwrap().to_owned();
    let short = hs(json!({ "exp": now() + 2, "jobcast": { "subscribe": ["poll-1"] } }));
    let res = tokio::time::timeout(
        T,
        s.client
            .get(s.url(&format!("/v1/streams/poll-1/events?after={last}&wait=600")))
            .bearer_auth(&short)
            .send(),
    )
    .await
    .expect("the long poll ends at the token's expiry, not after 600 s")
    .unwrap();
    let (st, v) = status_json(res).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["events"], json!([]));
}

/// Debug output of the configuration never shows the secret.
#[test]
fn config_debug_hides_the_secret() {
    let config = jobcast_server::Config {
        auth: Some(Auth::hs256(SECRET).unwrap()),
        ..Default::default()
    };
    let text = format!("{config:?}");
    assert!(!text.contains(SECRET), "{text}");
}

/// A validly signed token whose `exp` is as far as a JSON number goes gets
/// a normal answer (its grant is capped at 100 years), on every path that
/// turns `exp` into a deadline: the guard, a JSON page, a long poll, SSE on
/// the lean path and on hyper's. A huge `nbf` is just "not valid yet".
#[tokio::test]
async fn a_far_future_exp_is_answered_normally() {
    for lean in [true, false] {
        let s = TestServer::start_with(|c| {
            c.auth = Some(Auth::hs256(SECRET).unwrap().with_leeway(Duration::ZERO));
            c.lean_sse = lean;
        })
        .await;
        for exp in [i64::MAX as u64, u64::MAX, 1 << 62, 253_402_300_800] {
            let t = hs(json!({ "exp": exp, "jobcast": { "publish": ["*"], "subscribe": ["*"] } }));
            let (st, v) = send(&s, Req::Append("far-1"), Some(&t), Via::Bearer).await;
            assert_eq!(st, 201, "exp={exp}: {v}");
            let (st, v) = send(&s, Req::Read("far-1"), Some(&t), Via::Bearer).await;
            assert_eq!(st, 200, "exp={exp}: {v}");
            let last = v["next"].as_str().unwrap().to_owned();
            let res = s
                .client
                .get(s.url(&format!("/v1/streams/far-1/events?after={last}&wait=1")))
                .bearer_auth(&t)
                .send()
                .await
                .expect("a long poll is answered");
            assert_eq!(res.status(), 200, "exp={exp}");
            let mut sse = Sse::new(
                s.client
                    .get(s.url("/v1/streams/far-1/events"))
                    .header("accept", "text/event-stream")
                    .bearer_auth(&t)
                    .send()
                    .await
                    .expect("an SSE watch is answered"),
            );
            assert_eq!(sse.status, 200, "lean={lean} exp={exp}");
            assert_eq!(sse.next_event(T).await.expect("the event").data, "x");
        }
        let t = hs(json!({ "exp": u64::MAX, "nbf": u64::MAX, "jobcast": { "subscribe": ["*"] } }));
        let (st, v) = send(&s, Req::Read("far-1"), Some(&t), Via::Bearer).await;
        assert_eq!((st, code(&v)), (401, "token_not_yet_valid"), "{v}");
    }
}

/// A malformed `nbf` (not a whole number of seconds) is refused, not
/// ignored: a token must not become valid early because its issuer wrote
/// the time in another form.
#[tokio::test]
async fn a_malformed_nbf_is_refused() {
    let s = server().await;
    let perms = json!({ "publish": ["*"], "subscribe": ["*"] });
    for nbf in [
        json!("0"),
        json!("soon"),
        json!(1.5),
        json!(-1),
        json!({}),
        json!([0]),
    ] {
        let t = hs(json!({ "exp": now() + 3600, "nbf": nbf, "jobcast": perms }));
        let (st, v) = send(&s, Req::Meta("nbf-1"), Some(&t), Via::Bearer).await;
        assert_eq!((st, code(&v)), (401, "token_invalid"), "nbf={nbf}: {v}");
    }
    let t = hs(json!({ "exp": now() + 3600, "nbf": now() - 10, "jobcast": perms }));
    let (st, v) = send(&s, Req::Append("nbf-1"), Some(&t), Via::Bearer).await;
    assert_eq!(st, 201, "a well-formed nbf in the past: {v}");
}

/// With an audience and an issuer configured, a token must carry both,
/// matching (`aud` as a string or an array containing it); without them
/// configured, neither claim is looked at.
#[tokio::test]
async fn audience_and_issuer_are_checked_when_configured() {
    let s = TestServer::start_with(|c| {
        c.auth = Some(
            Auth::hs256(SECRET)
                .unwrap()
                .with_leeway(Duration::ZERO)
                .with_audience("jobcast-test")
                .with_issuer("https://issuer.test"),
        );
    })
    .await;
    let perms = json!({ "publish": ["*"], "subscribe": ["*"] });
    let exp = now() + 3600;
    let rows = [
        (
            json!({ "aud": "jobcast-test", "iss": "https://issuer.test" }),
            201,
        ),
        (
            json!({ "aud": ["other", "jobcast-test"], "iss": "https://issuer.test" }),
            201,
        ),
        (json!({ "iss": "https://issuer.test" }), 401),
        (json!({ "aud": "jobcast-test" }), 401),
        (json!({ "aud": "other", "iss": "https://issuer.test" }), 401),
        (
            json!({ "aud": "jobcast-test", "iss": "https://evil.test" }),
            401,
        ),
        (json!({ "aud": "jobcast-test", "iss": 7 }), 401),
        (json!({ "aud": 7, "iss": "https://issuer.test" }), 401),
    ];
    for (extra, want) in rows {
        let mut claims = json!({ "exp": exp, "jobcast": perms });
        for (k, v) in extra.as_object().unwrap() {
            claims[k] = v.clone();
        }
        let (st, v) = send(
            &s,
            Req::Append("aud-1"),
            Some(&hs(claims.clone())),
            Via::Bearer,
        )
        .await;
        assert_eq!(st, want, "{claims}: {v}");
        if want == 401 {
            assert_eq!(code(&v), "token_invalid", "{claims}: {v}");
        }
    }
    // Not configured: aud and iss are not required (and not checked).
    let plain = server().await;
    let t = hs(json!({ "exp": exp, "aud": "anything", "iss": "anyone", "jobcast": perms }));
    let (st, v) = send(&plain, Req::Append("aud-1"), Some(&t), Via::Bearer).await;
    assert_eq!(st, 201, "{v}");
}

/// Keys that cannot be right are refused when the server is configured:
/// an HS256 secret shorter than 32 bytes (guessable offline from one token),
/// and a private key given where a public key belongs.
#[test]
fn short_secrets_and_private_keys_are_refused() {
    let err = Auth::hs256("0123456789abcdef0123456789abcde").unwrap_err();
    assert!(err.to_string().contains("32 bytes"), "{err}");
    assert!(Auth::hs256("0123456789abcdef0123456789abcdef").is_ok());
    assert!(Auth::hs256_allow_short("short").is_ok());
    for (file, alg) in [
        ("rsa.pem", None),
        ("rsa.pem", Some(KeyAlg::Rs256)),
        ("ed25519.pem", None),
        ("ed25519.pem", Some(KeyAlg::EdDsa)),
    ] {
        let err = Auth::public_key_pem(&key_file(file), alg).unwrap_err();
        assert!(err.to_string().contains("private key"), "{file}: {err}");
    }
}

/// Every route declares its permission where it is defined, and the guard
/// checks exactly that: walking the declared routes, each non-public one
/// answers 401 without a token and 403 (or, for `Token`, 200) with a valid
/// token that grants nothing; every `/v1` route needs more than nothing,
/// and every `/v1` write needs publish.
#[tokio::test]
async fn every_declared_route_is_guarded_as_declared() {
    use jobcast_server::http::{declared_routes, Need};
    let s = server().await;
    let admin = hs(claims(&["*"], &["*"]));
    let (st, _) = send(&s, Req::Append("g-1"), Some(&admin), Via::Bearer).await;
    assert_eq!(st, 201);
    let nothing = hs(json!({ "exp": now() + 3600 }));
    let routes = declared_routes(s.server.state());
    assert!(routes.len() >= 13, "{routes:?}");
    for r in &routes {
        let path = r.path.replace("{id}", "g-1").replace("{*path}", "app.js");
        if r.path.starts_with("/v1") {
            assert_ne!(r.need, Need::Public, "{r:?}");
            // A write route never falls through to "any valid token".
            if r.method != reqwest::Method::GET {
                let want = if r.path.ends_with("/cancel") {
                    Need::Cancel
                } else {
                    Need::Publish
                };
                assert_eq!(r.need, want, "a write must need publish (or cancel): {r:?}");
            }
        }
        for (token, want) in [
            (
                None,
                if r.need == Need::Public {
                    None
                } else {
                    Some(401)
                },
            ),
            (
                Some(&nothing),
                match r.need {
                    Need::Public => None,
                    Need::Token => Some(200),
                    _ => Some(403),
                },
            ),
        ] {
            let mut b = s.client.request(r.method.clone(), s.url(&path));
            if let Some(t) = token {
                b = b.bearer_auth(t);
            }
            let res = b.send().await.unwrap();
            let st = res.status().as_u16();
            match want {
                Some(w) => assert_eq!(st, w, "{r:?} token={}", token.is_some()),
                None => assert!(st != 401 && st != 403, "{r:?}: {st}"),
            }
        }
    }
}
