//! The stream list's `next` cursor is opaque and says nothing beyond the
//! page it ends: it is made of the last returned stream's creation time and
//! id, never of the store's internal row key (which would tell a reader of
//! one stream how many streams exist). Paging is stable and newest first on
//! SQLite and PostgreSQL; a malformed cursor is 400 `invalid_cursor`.

mod common;
mod pg;

use std::collections::HashSet;

use common::TestServer;
use serde_json::Value;

/// base64url without padding, decoded (the test's own, to look inside).
fn b64url_decode(s: &str) -> Option<Vec<u8>> {
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = Vec::new();
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        } as u32;
        bits = bits << 6 | v;
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
            bits &= (1 << n) - 1;
        }
    }
    Some(out)
}

/// Stream ids without digits, so a number in a cursor can only be a time or a key.
fn name(i: usize) -> String {
    let mut s = String::from("list-");
    for d in [i / 676, i / 26 % 26, i % 26] {
        s.push((b'a' + d as u8) as char);
    }
    s
}

async fn pages_of_250(s: &TestServer) {
    for i in 0..250 {
        let (st, v) = s
            .post(
                &format!("/v1/streams/{}/events", name(i)),
                r#"{"data":"x"}"#,
            )
            .await;
        assert_eq!(st, 201, "{v}");
    }
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    for page in 0.. {
        assert!(page < 10, "paging did not end");
        let q = match &after {
            Some(a) => format!("/v1/streams?limit=100&after={a}"),
            None => "/v1/streams?limit=100".to_owned(),
        };
        let (st, v) = s.get_json(&q).await;
        assert_eq!(st, 200, "{v}");
        let streams = v["streams"].as_array().unwrap();
        let ids: Vec<String> = streams
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_owned())
            .collect();
        seen.extend(ids.iter().cloned());
        match &v["next"] {
            Value::Null => break,
            Value::String(c) => {
                // Rows are keyed 1, 2, 3 … in creation order: the last row of
                // this page has key 250 - len(seen) + 1.
                let key = (250 - seen.len() + 1).to_string();
                assert_ne!(c, &key, "the cursor is the row key");
                assert!(c.parse::<i64>().is_err(), "a bare number: {c}");
                let text = String::from_utf8(b64url_decode(c).expect("base64url")).unwrap();
                let last = ids.last().unwrap();
                let (time, id) = text.split_once(':').expect("time:id");
                assert_eq!(id, last, "the cursor names the last returned stream");
                assert!(time.bytes().all(|b| b.is_ascii_digit()), "{text}");
                assert_ne!(time, key, "{text}");
                after = Some(c.clone());
            }
            other => panic!("next: {other}"),
        }
    }
    assert_eq!(seen.len(), 250, "each stream once");
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), 250, "no repeats");
    // Newest created first (created in the order 0..250).
    let expected: Vec<String> = (0..250).rev().map(name).collect();
    assert_eq!(seen, expected);
    for bad in ["12", "-1", "%%%", "bm90LWEtY3Vyc29y", "OjpsaXN0", "MTIzOg"] {
        let (st, v) = s.get_json(&format!("/v1/streams?after={bad}")).await;
        assert_eq!(
            (st, v["error"]["code"].as_str()),
            (400, Some("invalid_cursor")),
            "{bad}: {v}"
        );
    }
}

#[tokio::test]
async fn list_cursors_are_opaque_and_stable_on_sqlite() {
    let s = TestServer::start().await;
    pages_of_250(&s).await;
}

#[tokio::test]
async fn list_cursors_are_opaque_and_stable_on_postgres() {
    let db = pg::Database::create().await;
    let dir = tempfile::tempdir().unwrap();
    let config = jobcast_server::Config {
        db: db.url(),
        ..Default::default()
    };
    let s = TestServer::start_in(dir, config).await;
    pages_of_250(&s).await;
}
