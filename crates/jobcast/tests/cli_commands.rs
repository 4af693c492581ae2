//! The client commands end to end against a real `jobcast serve`: publish
//! (arguments and stdin), tail (plain and JSON, live), complete, fail,
//! delete, streams, and the exit codes (0 completed, 1 failed, 2 error).

mod cli_support;

use cli_support::{command, finish, run, run_with_stdin, wait_for_watcher, Server};

fn json_lines(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_tail_complete_and_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let url = server.url.as_str();

    // A watcher that starts before the stream exists and follows it live.
    let live_tail = command(url, &["tail", "build", "--json"]).spawn().unwrap();

    let r = run(url, &["publish", "build", "compiling", "two words"]).await;
    assert_eq!((r.code, r.stderr.as_str()), (0, ""), "{r:?}");
    let r = run_with_stdin(
        url,
        &["publish", "build", "--type", "log"],
        "l1\n\nl2\r\nl3",
    )
    .await;
    assert_eq!(r.code, 0, "{r:?}");
    let r = run(url, &["publish", "build", "--json", r#"{"pct": 50}"#]).await;
    assert_eq!(r.code, 0, "{r:?}");
    let r = run(
        url,
        &[
            "complete",
            "build",
            "--json",
            "--data",
            r#"{"artifact":"app.tar"}"#,
        ],
    )
    .await;
    assert_eq!(r.code, 0, "{r:?}");

    let r = finish(live_tail).await;
    assert_eq!(r.code, 0, "{r:?}");
    let lines = json_lines(&r.stdout);
    let data: Vec<(&str, &str)> = lines
        .iter()
        .map(|v| (v["type"].as_str().unwrap(), v["data"].as_str().unwrap()))
        .collect();
    assert_eq!(
        data,
        vec![
            ("message", "compiling"),
            ("message", "two words"),
            ("log", "l1"),
            ("log", "l2"),
            ("log", "l3"),
            ("message", r#"{"pct":50}"#),
            (
                "jobcast.end",
                r#"{"state":"completed","data":{"artifact":"app.tar"}}"#
            ),
        ]
    );
    let ids: Vec<&str> = lines.iter().map(|v| v["id"].as_str().unwrap()).collect();
    assert!(ids[0].ends_with("-1") && ids[6].ends_with("-7"), "{ids:?}");

    // A late watcher: plain data lines, exit 0.
    let r = run(url, &["tail", "build"]).await;
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.stdout, "compiling\ntwo words\nl1\nl2\nl3\n{\"pct\":50}\n");
    // From an id: only what follows it.
    let r = run(url, &["tail", "build", "--from", ids[4]]).await;
    assert_eq!((r.code, r.stdout.as_str()), (0, "{\"pct\":50}\n"), "{r:?}");
    // From the end's id: nothing more (204), and the state still decides the exit code.
    let r = run(url, &["tail", "build", "--from", ids[6]]).await;
    assert_eq!((r.code, r.stdout.as_str()), (0, ""), "{r:?}");

    // A failed stream: exit 1 with the reason.
    assert_eq!(run(url, &["publish", "deploy", "step 1"]).await.code, 0);
    let tail = command(url, &["tail", "deploy", "--from", "live"])
        .spawn()
        .unwrap();
    wait_for_watcher(url, "deploy").await;
    assert_eq!(run(url, &["publish", "deploy", "step 2"]).await.code, 0);
    let r = run(url, &["fail", "deploy", "--error", "disk full"]).await;
    assert_eq!(r.code, 0, "{r:?}");
    let r = finish(tail).await;
    assert_eq!(r.code, 1, "{r:?}");
    assert_eq!(r.stdout, "step 2\n", "live: only what came after");
    assert!(r.stderr.contains("deploy failed: disk full"), "{r:?}");
    let r = run(url, &["tail", "deploy"]).await;
    assert_eq!(
        (r.code, r.stdout.as_str()),
        (1, "step 1\nstep 2\n"),
        "{r:?}"
    );

    // The table.
    let r = run(url, &["streams"]).await;
    assert_eq!(r.code, 0, "{r:?}");
    let rows: Vec<Vec<&str>> = r
        .stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows[0],
        vec!["ID", "STATE", "EVENTS", "WATCHERS", "UPDATED"]
    );
    assert_eq!(rows[1][..4], ["deploy", "failed", "3", "0"]);
    assert_eq!(rows[2][..4], ["build", "completed", "7", "0"]);
    assert_eq!(rows.len(), 3);
    let r = run(url, &["streams", "--state", "failed"]).await;
    assert_eq!(r.stdout.lines().count(), 2, "{r:?}");
    let r = run(url, &["streams", "--state", "nope"]).await;
    assert_eq!(r.code, 2, "{r:?}");

    // Errors: one line, `jobcast: …`, exit 2.
    for (args, needle) in [
        (&["complete", "build"][..], "409 stream_ended"),
        (&["publish", "build", "late"][..], "409 stream_ended"),
        (&["publish", "x", ""][..], "400 empty_data"),
        (&["tail", "a/b"][..], "invalid stream id"),
        (&["delete", "nothing-here"][..], "404 stream_not_found"),
    ] {
        let r = run(url, args).await;
        assert_eq!(r.code, 2, "{args:?}: {r:?}");
        assert!(r.stderr.starts_with("jobcast: "), "{args:?}: {r:?}");
        assert!(r.stderr.contains(needle), "{args:?}: {r:?}");
        assert_eq!(
            r.stderr.trim_end().lines().count(),
            1,
            "{args:?}: one line: {r:?}"
        );
    }

    // A watcher of a deleted stream stops with the server's error: exit 2.
    assert_eq!(run(url, &["publish", "tmp", "x"]).await.code, 0);
    let tail = command(url, &["tail", "tmp"]).spawn().unwrap();
    wait_for_watcher(url, "tmp").await;
    assert_eq!(run(url, &["delete", "tmp"]).await.code, 0);
    let r = finish(tail).await;
    assert_eq!(r.code, 2, "{r:?}");
    assert_eq!(r.stdout, "x\n");
    assert!(r.stderr.contains("stream_deleted"), "{r:?}");
}

#[tokio::test]
async fn many_stdin_lines_are_published_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let url = server.url.as_str();
    let input: String = (1..=2500).map(|i| format!("line {i}\n")).collect();
    let r = run_with_stdin(url, &["publish", "bulk"], &input).await;
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(run(url, &["complete", "bulk"]).await.code, 0);
    let r = run(url, &["tail", "bulk"]).await;
    assert_eq!(r.code, 0);
    assert_eq!(r.stdout, input);
}

/// Safe default: no authentication means loopback only, unless the operator
/// says otherwise in so many words.
#[tokio::test]
async fn serve_refuses_a_public_bind_without_auth() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("p.db").display());
    let out = std::process::Command::new(cli_support::bin())
        .args(["serve", "--listen", "0.0.0.0:0", "--db", &db])
        .env_remove("JOBCAST_INSECURE_NO_AUTH")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "one clear line: {err}");
    assert!(
        err.contains("refusing to listen on 0.0.0.0:0 without authentication"),
        "{err}"
    );
    assert!(err.contains("--insecure-no-auth"), "{err}");
    assert!(!dir.path().join("p.db").exists(), "nothing was opened");
}

/// With --insecure-no-auth the operator's choice is honoured (and the
/// server is reached here over loopback only).
#[tokio::test]
async fn insecure_no_auth_allows_a_public_bind() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("p.db").display());
    let mut child = std::process::Command::new(cli_support::bin())
        .args([
            "serve",
            "--listen",
            "0.0.0.0:0",
            "--db",
            &db,
            "--insecure-no-auth",
        ])
        .env("JOBCAST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            // The warning about the public bind carries an addr= too.
            if !line.contains("listening") {
                continue;
            }
            if let Some(addr) = line.split("addr=").nth(1) {
                let _ = tx.send(addr.split_whitespace().next().unwrap_or("").to_owned());
            }
        }
    });
    let addr = rx.recv_timeout(std::time::Duration::from_secs(30));
    let port = addr
        .as_deref()
        .ok()
        .and_then(|a| a.rsplit(':').next())
        .map(str::to_owned);
    let status = match &port {
        Some(p) => reqwest::get(format!("http://127.0.0.1:{p}/healthz"))
            .await
            .map(|r| r.status().as_u16())
            .ok(),
        None => None,
    };
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(status, Some(200), "address line: {addr:?}");
}

/// `jobcast ready` (the container's HEALTHCHECK): 0 while the server is
/// ready, 1 when nothing answers.
#[tokio::test]
async fn ready_exits_0_when_ready_and_1_when_not() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let r = run(&server.url, &["ready", "--server", &server.url]).await;
    assert_eq!((r.code, r.stderr.as_str()), (0, ""), "{r:?}");
    let r = run(
        &server.url,
        &["ready", "--server", "http://127.0.0.1:1", "--timeout", "2s"],
    )
    .await;
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("not ready"), "{r:?}");
}
