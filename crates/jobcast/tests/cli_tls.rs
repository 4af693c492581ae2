//! `jobcast serve --tls-cert --tls-key`: HTTPS with HTTP/2 by ALPN, and
//! SIGHUP reloading the certificate without dropping an open watch; a
//! reload of a broken file keeps the certificate in use; bad files stop
//! the start with a message naming them.

mod cli_support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use cli_support::sse::{self, Watcher};
use cli_support::{bin, Server};

/// A new self-signed certificate for `localhost` in `dir`/cert.pem and key.pem; its PEM.
fn write_cert(dir: &Path) -> String {
    let c = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    // Written next to the files, then renamed: a reload never reads half a file.
    std::fs::write(dir.join("cert.tmp"), c.cert.pem()).unwrap();
    std::fs::write(dir.join("key.tmp"), c.key_pair.serialize_pem()).unwrap();
    std::fs::rename(dir.join("cert.tmp"), dir.join("cert.pem")).unwrap();
    std::fs::rename(dir.join("key.tmp"), dir.join("key.pem")).unwrap();
    c.cert.pem()
}

fn trusting(pem: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).unwrap())
        .build()
        .unwrap()
}

fn sighup(server: &Server) {
    let ok = Command::new("kill")
        .args(["-HUP", &server.child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -HUP");
}

/// Whether a client trusting only `pem` gets /healthz over HTTP/2.
async fn serves(url: &str, pem: &str) -> bool {
    match trusting(pem).get(format!("{url}/healthz")).send().await {
        Ok(res) => res.status() == 200 && res.version() == reqwest::Version::HTTP_2,
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate_and_drops_no_watch() {
    let dir = tempfile::tempdir().unwrap();
    let first = write_cert(dir.path());
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let db = format!("sqlite://{}", dir.path().join("j.db").display());
    let server = Server::start_with(
        &db,
        0,
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    )
    .expect("jobcast serve with TLS");
    let url = format!("https://localhost:{}", server.port);
    assert!(serves(&url, &first).await, "{}", server.log_tail());

    // A watch opened on the first certificate.
    let old = trusting(&first);
    let mut w = Watcher::new("renewed");
    let mut open = w.open(&old, &url).await.expect("watch over TLS");
    assert_eq!(sse::append(&old, &url, "renewed", "before").await, 1);
    assert_eq!(w.read(&mut open, Some(1)).await, None);

    let second = write_cert(dir.path());
    sighup(&server);
    let mut swapped = false;
    for _ in 0..200 {
        if serves(&url, &second).await {
            swapped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        swapped,
        "the new certificate after SIGHUP: {}",
        server.log_tail()
    );
    assert!(
        !serves(&url, &first).await,
        "new handshakes no longer get the old one"
    );

    // A broken file: the reload fails and the certificate in use stays.
    std::fs::write(&key, "not a key").unwrap();
    sighup(&server);
    let mut logged = false;
    for _ in 0..200 {
        if server.log_tail().contains("TLS certificate reload failed") {
            logged = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(logged, "{}", server.log_tail());
    assert!(serves(&url, &second).await);

    // The watch from before both reloads goes on, on its connection.
    let new = trusting(&second);
    assert_eq!(sse::append(&new, &url, "renewed", "after").await, 2);
    assert_eq!(w.read(&mut open, Some(2)).await, None);
    assert_eq!(w.connections, 1);
}

#[test]
fn bad_tls_files_stop_the_start_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    write_cert(dir.path());
    let missing = dir.path().join("missing.pem");
    let out = Command::new(bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--db"])
        .arg(format!("sqlite://{}", dir.path().join("j.db").display()))
        .arg("--tls-cert")
        .arg(&missing)
        .arg("--tls-key")
        .arg(dir.path().join("key.pem"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing.pem"), "{err}");
    // One without the other is a usage error.
    let out = Command::new(bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--tls-cert"])
        .arg(dir.path().join("cert.pem"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-key"));
}
