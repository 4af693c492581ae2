//! The binary with authentication: a public bind is allowed once a secret is
//! configured; the client commands work with `--token` (and fail without);
//! the secret and the tokens never reach the server's log, even at debug.

mod cli_support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cli_support::{command, finish, run};

const SECRET: &str = "cli-test-secret-0123456789abcdef";

fn token(publish: &[&str], subscribe: &[&str]) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let claims = serde_json::json!({ "exp": exp, "jobcast": { "publish": publish, "subscribe": subscribe } });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// `jobcast serve` with the secret in its environment; every stderr line kept.
struct Served {
    child: Child,
    url: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(dir: &std::path::Path, listen: &str) -> Served {
    let db = format!("sqlite://{}", dir.join("a.db").display());
    let mut child = Command::new(cli_support::bin())
        .args(["serve", "--listen", listen, "--db", &db])
        .env("JOBCAST_JWT_SECRET", SECRET)
        .env("JOBCAST_LOG", "debug")
        .env_remove("JOBCAST_INSECURE_NO_AUTH")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let kept = log.clone();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("listening") {
                if let Some(addr) = line.split("addr=").nth(1) {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr.split_whitespace().next().unwrap_or("").to_owned());
                    }
                }
            }
            kept.lock().unwrap().push(line);
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|_| panic!("no listening line: {:?}", log.lock().unwrap()));
    let port = addr.rsplit(':').next().unwrap().to_owned();
    Served {
        child,
        // Reached over loopback only, whatever the bind.
        url: format!("http://127.0.0.1:{port}"),
        log,
    }
}

/// With a secret configured, a public bind is allowed (no --insecure-no-auth)
/// and the API wants a token.
#[tokio::test]
async fn a_public_bind_is_allowed_with_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    let s = serve(dir.path(), "0.0.0.0:0");
    let health = reqwest::get(format!("{}/healthz", s.url)).await.unwrap();
    assert_eq!(health.status(), 200);
    let list = reqwest::get(format!("{}/v1/streams", s.url)).await.unwrap();
    assert_eq!(list.status(), 401);
    let log = s.log.lock().unwrap().join("\n");
    assert!(log.contains("authentication on"), "{log}");
    assert!(!log.contains(SECRET), "the secret was logged:\n{log}");
}

/// publish, complete, tail and streams with `--token`; without one they fail
/// with exit code 2; tokens in headers and in `?access_token=` never reach the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_commands_use_their_token() {
    let dir = tempfile::tempdir().unwrap();
    let s = serve(dir.path(), "127.0.0.1:0");
    let url = s.url.as_str();
    let t = token(&["build-*"], &["build-*"]);

    let r = run(url, &["publish", "build-1", "hello", "--token", &t]).await;
    assert_eq!((r.code, r.stderr.as_str()), (0, ""), "{r:?}");
    // The environment variable works too.
    let mut c = command(url, &["publish", "build-1", "world"]);
    c.env("JOBCAST_TOKEN", &t);
    let r = finish(c.spawn().unwrap()).await;
    assert_eq!(r.code, 0, "{r:?}");
    let r = run(url, &["complete", "build-1", "--token", &t]).await;
    assert_eq!(r.code, 0, "{r:?}");
    let r = run(url, &["tail", "build-1", "--token", &t]).await;
    assert_eq!((r.code, r.stdout.as_str()), (0, "hello\nworld\n"), "{r:?}");
    let r = run(url, &["streams", "--token", &t]).await;
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("build-1"), "{r:?}");

    // No token, or a token for other streams: refused, exit code 2.
    let r = run(url, &["publish", "build-1", "x"]).await;
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr.contains("401") || r.stderr.contains("unauthorized"),
        "{r:?}"
    );
    let other = token(&["deploy-*"], &["deploy-*"]);
    let r = run(url, &["tail", "build-1", "--token", &other]).await;
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr.contains("403") || r.stderr.contains("forbidden"),
        "{r:?}"
    );

    // A browser-style read with the token in the query string.
    let res = reqwest::Client::new()
        .get(format!("{url}/v1/streams/build-1/events"))
        .header("accept", "text/event-stream")
        .query(&[("access_token", &t)])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let _ = res.text().await;

    let log = s.log.lock().unwrap().join("\n");
    assert!(!log.contains(SECRET), "the secret was logged:\n{log}");
    // The signature part of a token is what makes it a credential.
    let signature = t.rsplit('.').next().unwrap();
    assert!(!log.contains(signature), "a token was logged:\n{log}");
}

/// `jobcast serve` with `args`: exits (code and stderr) or is still running
/// after 3 s (then killed: None).
fn serve_outcome(dir: &std::path::Path, args: &[&str]) -> Option<(i32, String)> {
    let db = format!("sqlite://{}", dir.join("k.db").display());
    let mut child = Command::new(cli_support::bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--db", &db])
        .args(args)
        .env_remove("JOBCAST_JWT_SECRET")
        .env_remove("JOBCAST_INSECURE_SHORT_SECRET")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let err = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    for _ in 0..30 {
        if let Some(status) = child.try_wait().unwrap() {
            return Some((status.code().unwrap_or(-1), err.join().unwrap()));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

fn fixture_key(name: &str) -> String {
    format!(
        "{}/../jobcast-server/tests/fixtures/keys/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// Startup refuses a secret shorter than 32 bytes (unless
/// --insecure-short-secret), and a private key given as --jwt-public-key,
/// each with a message that says what to do.
#[test]
fn weak_keys_are_refused_at_startup() {
    let dir = tempfile::tempdir().unwrap();
    let short = "only-twenty-bytes-ok";
    let (code, err) =
        serve_outcome(dir.path(), &["--jwt-secret", short]).expect("a short secret is refused");
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("32 bytes"), "{err}");
    assert!(!err.contains(short), "the secret was printed: {err}");
    assert!(
        serve_outcome(
            dir.path(),
            &["--jwt-secret", short, "--insecure-short-secret"]
        )
        .is_none(),
        "the opt-out serves"
    );
    assert!(
        serve_outcome(dir.path(), &["--jwt-secret", SECRET]).is_none(),
        "a 32-byte secret serves"
    );
    for key in ["rsa.pem", "ed25519.pem"] {
        let (code, err) = serve_outcome(dir.path(), &["--jwt-public-key", &fixture_key(key)])
            .expect("a private key is refused");
        assert_eq!(code, 2, "{key}: {err}");
        assert!(err.contains("private key"), "{key}: {err}");
    }
    assert!(
        serve_outcome(
            dir.path(),
            &["--jwt-public-key", &fixture_key("rsa.pub.pem")]
        )
        .is_none(),
        "a public key serves"
    );
}

/// --jwt-audience and --jwt-issuer (and their environment variables) make
/// the server require matching `aud` and `iss` claims.
#[tokio::test]
async fn audience_and_issuer_flags_are_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("a.db").display());
    let mut child = Command::new(cli_support::bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--db", &db])
        .args(["--jwt-audience", "jobcast-cli"])
        .env("JOBCAST_JWT_ISSUER", "https://issuer.cli")
        .env("JOBCAST_JWT_SECRET", SECRET)
        .env("JOBCAST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(addr) = line.split("addr=").nth(1) {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(addr.split_whitespace().next().unwrap_or("").to_owned());
                }
            }
        }
    });
    let addr = rx.recv_timeout(Duration::from_secs(30)).expect("listening");
    let s = Served {
        child,
        url: format!("http://{addr}"),
        log: Arc::new(Mutex::new(Vec::new())),
    };
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let sign = |claims: serde_json::Value| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    };
    let perms = serde_json::json!({ "publish": ["*"], "subscribe": ["*"] });
    let good = sign(
        serde_json::json!({ "exp": exp, "aud": "jobcast-cli", "iss": "https://issuer.cli", "jobcast": perms }),
    );
    let bad = sign(serde_json::json!({ "exp": exp, "aud": "jobcast-cli", "jobcast": perms }));
    let c = reqwest::Client::new();
    let get = |t: String| c.get(format!("{}/v1/streams", s.url)).bearer_auth(t).send();
    assert_eq!(get(good).await.unwrap().status(), 200);
    assert_eq!(get(bad).await.unwrap().status(), 401);
}
