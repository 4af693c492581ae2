//! Every connection ends by itself, whatever a client sends (SPEC
//! guarantee 6): a request head must arrive whole within ONE header timeout
//! (the lean path's read and hyper's together), a body must make progress
//! within the body timeout, and a Content-Length above the body limit is
//! refused before a byte of the body is read. Raw TCP, short timeouts; the
//! only timing bounds are generous ("closed within 10 s of a 1 s timeout").

mod common;

use std::time::Duration;

use common::TestServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Far more than any timeout configured here: the bound for "ended by itself".
const BOUND: Duration = Duration::from_secs(10);

async fn server(lean: bool) -> TestServer {
    TestServer::start_with(|c| {
        c.lean_sse = lean;
        c.header_timeout = Duration::from_secs(1);
        c.body_timeout = Duration::from_secs(1);
        c.max_body_bytes = 1 << 20;
    })
    .await
}

async fn connect(s: &TestServer) -> TcpStream {
    TcpStream::connect(s.url.trim_start_matches("http://"))
        .await
        .expect("connect")
}

/// Reads until the server closes (or BOUND passes: a failure); what it sent.
async fn until_closed(sock: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + BOUND;
    loop {
        match tokio::time::timeout_at(deadline, sock.read(&mut buf)).await {
            Err(_) => panic!(
                "still open after {BOUND:?}; got {:?}",
                String::from_utf8_lossy(&out)
            ),
            Ok(Ok(0)) | Ok(Err(_)) => return String::from_utf8_lossy(&out).into_owned(),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// A head trickled a byte every 300 ms never completes: with a 1 s header
/// timeout the connection is answered 408 and closed, on both paths (the
/// lean reader must not hand a half head to hyper for a second timeout).
#[tokio::test]
async fn a_trickled_head_gets_one_deadline() {
    for lean in [true, false] {
        let s = server(lean).await;
        let mut sock = connect(&s).await;
        let head = b"GET /v1/streams/a/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        let started = Instant::now();
        let (mut rd, mut wr) = sock.split();
        let trickle = async {
            for b in head.iter() {
                if wr.write_all(&[*b]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            std::future::pending::<()>().await
        };
        let read = async {
            let mut out = Vec::new();
            let mut buf = [0u8; 1024];
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => return String::from_utf8_lossy(&out).into_owned(),
                    Ok(n) => out.extend_from_slice(&buf[..n]),
                }
            }
        };
        let got = tokio::select! {
            got = read => got,
            _ = trickle => unreachable!(),
            _ = tokio::time::sleep(BOUND) => panic!("lean={lean}: the trickled head was still accepted after {BOUND:?}"),
        };
        assert!(got.starts_with("HTTP/1.1 408"), "lean={lean}: {got:?}");
        // One deadline: closed well before two of them could have passed twice over.
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "lean={lean}: {:?}",
            started.elapsed()
        );
    }
}

/// A connection that sends nothing at all is closed too.
#[tokio::test]
async fn a_silent_connection_is_closed() {
    for lean in [true, false] {
        let s = server(lean).await;
        let mut sock = connect(&s).await;
        let got = until_closed(&mut sock).await;
        assert!(
            got.is_empty() || got.starts_with("HTTP/1.1 408"),
            "lean={lean}: {got:?}"
        );
    }
}

/// A body that stops (Content-Length 100, 10 bytes sent) or never ends (a
/// chunked body without its last chunk): 408 `body_timeout`, closed, and
/// nothing was appended.
#[tokio::test]
async fn a_stalled_body_is_answered_and_closed() {
    for lean in [true, false] {
        let s = server(lean).await;
        let bodies: [&[u8]; 3] = [
            b"POST /v1/streams/stall-1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"data\":\"x",
            b"POST /v1/streams/stall-1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"dat\r\n",
            b"DELETE /v1/streams/stall-1 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\nabc",
        ];
        for req in bodies {
            let mut sock = connect(&s).await;
            sock.write_all(req).await.unwrap();
            let got = until_closed(&mut sock).await;
            let first = got.lines().next().unwrap_or("");
            if req.starts_with(b"POST") {
                assert!(first.starts_with("HTTP/1.1 408"), "lean={lean}: {got:?}");
                assert!(got.contains("body_timeout"), "lean={lean}: {got:?}");
            }
        }
        let (st, _) = s.get_json("/v1/streams/stall-1").await;
        assert_eq!(st, 404, "nothing was appended");
    }
}

/// A Content-Length above the limit is 413 `body_too_large` at once,
/// before any of the body is sent.
#[tokio::test]
async fn a_declared_oversized_body_is_refused_before_reading() {
    let s = server(true).await;
    for path in [
        "/v1/streams/big-1/events",
        "/v1/streams/big-1/complete",
        "/v1/streams/big-1/fail",
    ] {
        let mut sock = connect(&s).await;
        let req = format!("POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n");
        sock.write_all(req.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_millis(900), sock.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{path}: no answer before the body timeout"))
            .unwrap();
        let got = String::from_utf8_lossy(&buf[..n]);
        assert!(got.starts_with("HTTP/1.1 413"), "{path}: {got:?}");
        assert!(got.contains("body_too_large"), "{path}: {got:?}");
    }
}
