//! What differs between the servers under test: URLs, how to create, publish
//! and end a stream.

use anyhow::{bail, Result};
use clap::ValueEnum;
use serde::Serialize;

use super::http::Conn;
use super::stats::write_payload;

/// The server under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Target {
    /// jobcast's HTTP API.
    Jobcast,
    /// nginx + nchan: an EventSource subscriber location and a publisher location.
    Nchan,
}

impl Target {
    /// The name used in tables and JSON.
    pub(super) fn name(self) -> &'static str {
        match self {
            Self::Jobcast => "jobcast",
            Self::Nchan => "nchan",
        }
    }
}

/// How to talk to the server under test.
#[derive(Debug, Clone)]
pub(super) struct Api {
    /// Which server.
    pub(super) target: Target,
    /// nchan's publisher location prefix (`/pub/`).
    pub(super) nchan_pub: String,
    /// nchan's subscriber location prefix (`/sub/`).
    pub(super) nchan_sub: String,
}

impl Api {
    /// Whether one request can append many events.
    pub(super) fn batches(&self) -> bool {
        self.target == Target::Jobcast
    }

    /// The whole request a watcher sends to follow `stream` from its start.
    pub(super) fn subscribe_request(&self, host: &str, stream: &str) -> Vec<u8> {
        self.subscribe_request_from(host, stream, false)
    }

    /// The subscribe request; `live_early`: the watcher connects before the
    /// stream exists and asks for new events only (jobcast: `from=live`,
    /// waiting for the creation; nchan's subscribers do that by default).
    pub(super) fn subscribe_request_from(
        &self,
        host: &str,
        stream: &str,
        live_early: bool,
    ) -> Vec<u8> {
        let path = match (self.target, live_early) {
            (Target::Jobcast, false) => format!("/v1/streams/{stream}/events"),
            (Target::Jobcast, true) => format!("/v1/streams/{stream}/events?from=live&wait=600"),
            (Target::Nchan, _) => format!("{}{stream}", self.nchan_sub),
        };
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n")
            .into_bytes()
    }

    /// Makes sure `stream` exists (nchan creates channels on demand).
    pub(super) async fn create(&self, conn: &mut Conn, stream: &str) -> Result<()> {
        if self.target == Target::Jobcast {
            let path = format!("/v1/streams/{stream}");
            let res = conn.request("PUT", &path, None, b"").await?;
            if res.status != 200 && res.status != 201 {
                bail!(
                    "PUT {path}: {} {}",
                    res.status,
                    String::from_utf8_lossy(&res.body)
                );
            }
        }
        Ok(())
    }

    /// Creates `n` streams named `{prefix}{run}s{i}`, `run` being new for
    /// this run (names never collide with an earlier run's), over one connection.
    pub(super) async fn create_streams(
        &self,
        endpoint: &std::sync::Arc<super::http::Endpoint>,
        prefix: &str,
        n: u64,
    ) -> Result<Vec<String>> {
        let streams = Self::stream_names(prefix, n);
        let mut conn = Conn::new(endpoint.clone(), 0);
        for s in &streams {
            self.create(&mut conn, s).await?;
        }
        Ok(streams)
    }

    /// `n` stream names `{prefix}{run}s{i}`, new for this run, not created.
    pub(super) fn stream_names(prefix: &str, n: u64) -> Vec<String> {
        let run = super::run_id();
        (0..n).map(|s| format!("{prefix}{run}s{s}")).collect()
    }

    /// Publishes events `first..first+count` of `stream`, all stamped `t`,
    /// in one request. `body` is a reusable buffer.
    #[allow(clippy::too_many_arguments)] // each is one knob of the payload
    pub(super) async fn publish(
        &self,
        conn: &mut Conn,
        body: &mut Vec<u8>,
        stream: &str,
        first: u64,
        count: u64,
        t: u64,
        pad: usize,
    ) -> Result<()> {
        body.clear();
        let (path, ct) = match self.target {
            Target::Jobcast => {
                if count != 1 {
                    body.push(b'[');
                }
                for seq in first..first + count {
                    if seq != first {
                        body.push(b',');
                    }
                    body.extend_from_slice(b"{\"data\":");
                    write_payload(body, seq, t, pad);
                    body.push(b'}');
                }
                if count != 1 {
                    body.push(b']');
                }
                (format!("/v1/streams/{stream}/events"), "application/json")
            }
            Target::Nchan => {
                if count != 1 {
                    bail!("nchan publishes one message per request");
                }
                write_payload(body, first, t, pad);
                (format!("{}{stream}", self.nchan_pub), "text/plain")
            }
        };
        let res = conn.request("POST", &path, Some(ct), body).await?;
        if !(200..300).contains(&res.status) {
            bail!(
                "POST {path}: {} {}",
                res.status,
                String::from_utf8_lossy(&res.body)
            );
        }
        Ok(())
    }

    /// Ends `stream` (jobcast: complete; nchan: delete the channel).
    pub(super) async fn finish(&self, conn: &mut Conn, stream: &str) -> Result<()> {
        let (method, path) = match self.target {
            Target::Jobcast => ("POST", format!("/v1/streams/{stream}/complete")),
            Target::Nchan => ("DELETE", format!("{}{stream}", self.nchan_pub)),
        };
        let res = conn.request(method, &path, None, b"").await?;
        if !(200..300).contains(&res.status) && res.status != 404 {
            bail!("{method} {path}: {}", res.status);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(target: Target) -> Api {
        Api {
            target,
            nchan_pub: "/pub/".into(),
            nchan_sub: "/sub/".into(),
        }
    }

    #[test]
    fn subscribe_requests() {
        assert_eq!(
            api(Target::Jobcast).subscribe_request("127.0.0.1:7700", "s1"),
            b"GET /v1/streams/s1/events HTTP/1.1\r\nHost: 127.0.0.1:7700\r\nAccept: text/event-stream\r\n\r\n"
        );
        assert_eq!(
            api(Target::Nchan).subscribe_request("h", "s1"),
            b"GET /sub/s1 HTTP/1.1\r\nHost: h\r\nAccept: text/event-stream\r\n\r\n"
        );
    }
}
