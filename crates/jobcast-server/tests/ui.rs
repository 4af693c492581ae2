//! The dashboard: `/` and every asset answer 200 with the right type, no
//! caching without revalidation, and a restrictive Content-Security-Policy.

mod common;

use common::TestServer;

const ASSETS: &[(&str, &str)] = &[
    ("/", "text/html; charset=utf-8"),
    ("/ui/app.js", "text/javascript; charset=utf-8"),
    ("/ui/style.css", "text/css; charset=utf-8"),
    ("/ui/client/index.js", "text/javascript; charset=utf-8"),
    ("/ui/client/watch.js", "text/javascript; charset=utf-8"),
    ("/ui/client/machine.js", "text/javascript; charset=utf-8"),
    ("/ui/client/backoff.js", "text/javascript; charset=utf-8"),
    ("/ui/client/store.js", "text/javascript; charset=utf-8"),
    ("/ui/client/producer.js", "text/javascript; charset=utf-8"),
    (
        "/ui/vendor/eventsource-parser.js",
        "text/javascript; charset=utf-8",
    ),
];

#[tokio::test]
async fn the_dashboard_and_its_assets_are_served() {
    let s = TestServer::start().await;
    for (path, ty) in ASSETS {
        let res = s.client.get(s.url(path)).send().await.expect("get");
        assert_eq!(res.status(), 200, "{path}");
        let h = res.headers();
        assert_eq!(h["content-type"], *ty, "{path}");
        assert_eq!(h["cache-control"], "no-cache", "{path}");
        assert_eq!(h["x-content-type-options"], "nosniff", "{path}");
        let csp = h["content-security-policy"].to_str().expect("csp");
        assert!(
            csp.starts_with("default-src 'none'; script-src 'self' 'sha256-"),
            "{csp}"
        );
        assert!(
            !csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"),
            "{csp}"
        );
        let body = res.text().await.expect("body");
        assert!(!body.is_empty(), "{path}");
    }
    let page = s.client.get(s.url("/")).send().await.expect("get");
    let html = page.text().await.expect("html");
    assert!(html.contains("<script type=\"importmap\">"));
    assert!(html.contains("src=\"/ui/app.js\""));
}

#[tokio::test]
async fn unknown_assets_are_json_404s_and_writes_are_405() {
    let s = TestServer::start().await;
    for path in [
        "/ui/nope.js",
        "/ui/client/react.js",
        "/ui/../Cargo.toml",
        "/ui/",
    ] {
        let res = s.client.get(s.url(path)).send().await.expect("get");
        assert_eq!(res.status(), 404, "{path}");
        let body: serde_json::Value = res.json().await.expect("json error");
        assert_eq!(body["error"]["code"], "not_found", "{path}");
    }
    let res = s.client.post(s.url("/")).send().await.expect("post");
    assert_eq!(res.status(), 405);
    let res = s
        .client
        .head(s.url("/ui/app.js"))
        .send()
        .await
        .expect("head");
    assert_eq!(res.status(), 200);
}
