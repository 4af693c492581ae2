//! One benchmark watcher: a raw socket, the response head, the body framing,
//! and `jobcast_protocol`'s SSE decoder; every event is checked (seq order,
//! exactly once) and its publish-to-receive latency recorded.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use jobcast_protocol::decode::{Decoder, Frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::http::{read_head, BodyDecoder, Endpoint};
use super::stats::{id_seq, parse_payload, unix_nanos, SeqCheck, Shards};
use super::target::Target;

/// What every watcher of a run shares: the server, counters read by the
/// progress bars, the latency histograms.
#[derive(Debug)]
pub(super) struct Shared {
    /// The server's nodes (one for a single server).
    pub(super) endpoints: Vec<Arc<Endpoint>>,
    /// Which server (jobcast ids are checked too).
    pub(super) target: Target,
    /// Bounds the connections being set up at once (the listen backlog is finite).
    pub(super) connect_gate: Semaphore,
    /// Ends every watcher (deadline or end of run).
    pub(super) cancel: CancellationToken,
    /// The run's time origin.
    pub(super) base: Instant,
    /// Watchers that got their response head.
    pub(super) connected: AtomicU64,
    /// Watchers that could not connect.
    pub(super) failed: AtomicU64,
    /// Watchers that are over.
    pub(super) finished: AtomicU64,
    /// Events received by all watchers.
    pub(super) delivered: AtomicU64,
    /// Heartbeats (comments, nchan `ping` events) received by all watchers.
    pub(super) heartbeats: AtomicU64,
    /// Nanoseconds after `base` of the latest delivery.
    pub(super) last_delivery_ns: AtomicU64,
    /// Publish-to-receive latencies, µs.
    pub(super) latency: Shards,
}

impl Shared {
    /// State for a run against `endpoints` (at least one).
    pub(super) fn new(
        endpoints: Vec<Arc<Endpoint>>,
        target: Target,
        connect_concurrency: usize,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            endpoints,
            target,
            connect_gate: Semaphore::new(connect_concurrency.max(1)),
            cancel,
            base: Instant::now(),
            connected: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            heartbeats: AtomicU64::new(0),
            last_delivery_ns: AtomicU64::new(0),
            latency: Shards::new(64),
        }
    }

    /// Nanoseconds since `base`.
    pub(super) fn since_base(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// What one watcher saw.
#[derive(Debug, Default)]
pub(super) struct Outcome {
    /// It got a response head with status 200.
    pub(super) connected: bool,
    /// The order check over the seqs carried in the data.
    pub(super) check: SeqCheck,
    /// jobcast only: events whose `id:` seq differs from the data seq.
    pub(super) id_mismatches: u64,
    /// Events whose data is not a benchmark payload.
    pub(super) malformed: u64,
    /// `jobcast.reset` / `jobcast.error` events.
    pub(super) control_events: u64,
    /// Heartbeats received.
    pub(super) heartbeats: u64,
    /// The server ended the response (EOF, end of body, `jobcast.end`) before we were done.
    pub(super) closed_early: bool,
    /// What went wrong, if anything.
    pub(super) error: Option<String>,
}

/// How a watcher runs.
#[derive(Debug, Clone, Copy)]
pub(super) struct Plan {
    /// Stop after the event whose data seq is this (None: until cancelled).
    pub(super) until: Option<u64>,
    /// Read buffer size.
    pub(super) buf_size: usize,
}

/// Runs watcher `index` on node `node`: sends `request`, then reads until
/// the plan is done, the server ends, or the run is cancelled.
pub(super) async fn run(
    shared: Arc<Shared>,
    index: usize,
    node: usize,
    request: Arc<Vec<u8>>,
    plan: Plan,
) -> Outcome {
    let mut out = Outcome::default();
    let connecting = async {
        // Closed only if the semaphore is closed, which never happens: treat as a failure.
        let _permit = shared
            .connect_gate
            .acquire()
            .await
            .context("connect gate")?;
        let connect = async {
            let endpoint = &shared.endpoints[node % shared.endpoints.len()];
            let mut stream = endpoint.connect(index).await.context("connecting")?;
            stream
                .write_all(&request)
                .await
                .context("sending the request")?;
            let mut pending = Vec::with_capacity(1024);
            let head = read_head(&mut stream, &mut pending).await?;
            if head.status != 200 {
                bail!("status {}", head.status);
            }
            Ok::<_, anyhow::Error>((stream, head, pending))
        };
        // A server that never answers must not hold a permit forever.
        tokio::time::timeout(Duration::from_secs(30), connect)
            .await
            .context("no response head within 30 s")?
    };
    let connected = tokio::select! {
        r = connecting => r,
        _ = shared.cancel.cancelled() => Err(anyhow::anyhow!("cancelled while connecting")),
    };
    let (stream, head, pending) = match connected {
        Ok(c) => c,
        Err(e) => {
            shared.failed.fetch_add(1, Ordering::Relaxed);
            shared.finished.fetch_add(1, Ordering::Relaxed);
            out.error = Some(format!("{e:#}"));
            return out;
        }
    };
    out.connected = true;
    shared.connected.fetch_add(1, Ordering::Relaxed);
    let mut reader = Reader {
        shared: &shared,
        index,
        plan,
        body: BodyDecoder::new(head.framing),
        sse: Decoder::new(),
        frames: Vec::new(),
        latencies: Vec::new(),
        out,
        done: false,
    };
    if let Err(e) = reader.read_loop(stream, pending).await {
        reader.out.error = Some(format!("{e:#}"));
    }
    shared.finished.fetch_add(1, Ordering::Relaxed);
    reader.out
}

/// The reading half of a watcher.
struct Reader<'a> {
    shared: &'a Shared,
    index: usize,
    plan: Plan,
    body: BodyDecoder,
    sse: Decoder,
    frames: Vec<Frame>,
    latencies: Vec<u64>,
    out: Outcome,
    /// The plan is complete.
    done: bool,
}

impl Reader<'_> {
    async fn read_loop(&mut self, mut stream: TcpStream, pending: Vec<u8>) -> Result<()> {
        self.chunk(&pending)?;
        let mut buf = vec![0u8; self.plan.buf_size];
        while !self.done {
            let n = tokio::select! {
                r = stream.read(&mut buf) => r.context("reading")?,
                _ = self.shared.cancel.cancelled() => return Ok(()),
            };
            if n == 0 {
                self.out.closed_early = true;
                return Ok(());
            }
            self.chunk(&buf[..n])?;
            if self.body.is_done() && !self.done {
                self.out.closed_early = true;
                return Ok(());
            }
        }
        Ok(())
    }

    /// Handles the bytes of one read.
    fn chunk(&mut self, bytes: &[u8]) -> Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        let now = unix_nanos();
        let sse = &mut self.sse;
        let frames = &mut self.frames;
        self.body
            .feed(bytes, |payload| sse.feed(payload, frames))
            .context("body framing")?;
        let mut events = 0u64;
        let mut heartbeats = 0u64;
        let jobcast = self.shared.target == super::target::Target::Jobcast;
        for frame in self.frames.drain(..) {
            match frame {
                Frame::Comment(_) => heartbeats += 1,
                Frame::Retry(_) => {}
                Frame::Event(ev) => match ev.event.as_str() {
                    "message" => {
                        let Some((seq, t)) = parse_payload(&ev.data) else {
                            self.out.malformed += 1;
                            continue;
                        };
                        events += 1;
                        self.out.check.observe(seq);
                        if jobcast && (!ev.id_set || id_seq(&ev.last_event_id) != Some(seq)) {
                            self.out.id_mismatches += 1;
                        }
                        if t > 0 {
                            self.latencies.push(now.saturating_sub(t) / 1000);
                        }
                        if self.plan.until.is_some_and(|u| seq >= u) {
                            self.done = true;
                        }
                    }
                    // nchan's ping, when configured as an event.
                    "ping" => heartbeats += 1,
                    "jobcast.end" => {
                        if !self.done {
                            self.out.closed_early = true;
                        }
                        self.done = true;
                    }
                    _ => {
                        self.out.control_events += 1;
                        self.out
                            .error
                            .get_or_insert_with(|| format!("{}: {}", ev.event, ev.data));
                    }
                },
            }
        }
        if events > 0 {
            self.shared.delivered.fetch_add(events, Ordering::Relaxed);
            self.shared
                .last_delivery_ns
                .fetch_max(self.shared.since_base(), Ordering::Relaxed);
            self.shared.latency.record(self.index, &self.latencies);
            self.latencies.clear();
        }
        if heartbeats > 0 {
            self.out.heartbeats += heartbeats;
            self.shared
                .heartbeats
                .fetch_add(heartbeats, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// Totals over many watchers' outcomes.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub(super) struct Totals {
    /// Watchers.
    pub(super) watchers: u64,
    /// Watchers that connected.
    pub(super) connected: u64,
    /// Watchers that got every event exactly once, in order.
    pub(super) complete: u64,
    /// Events received.
    pub(super) received: u64,
    /// Repeated or late events.
    pub(super) duplicates: u64,
    /// Jumps over missing events.
    pub(super) gaps: u64,
    /// Events never received in order.
    pub(super) missing: u64,
    /// jobcast `id:` seqs that differ from the data seq.
    pub(super) id_mismatches: u64,
    /// Events that are not benchmark payloads.
    pub(super) malformed: u64,
    /// `jobcast.reset` / `jobcast.error` events.
    pub(super) control_events: u64,
    /// Heartbeats.
    pub(super) heartbeats: u64,
    /// Watchers whose response ended before they were done.
    pub(super) closed_early: u64,
    /// The most frequent errors, with counts.
    pub(super) errors: Vec<(String, u64)>,
}

impl Totals {
    /// Adds up outcomes; `expected` is the number of events each watcher should get.
    pub(super) fn of(outcomes: &[Outcome], expected: Option<u64>) -> Self {
        let mut t = Self {
            watchers: outcomes.len() as u64,
            ..Self::default()
        };
        let mut errors: std::collections::BTreeMap<String, u64> = Default::default();
        for o in outcomes {
            t.connected += u64::from(o.connected);
            let c = &o.check;
            t.received += c.in_order + c.duplicates + c.gaps;
            t.duplicates += c.duplicates;
            t.gaps += c.gaps;
            t.id_mismatches += o.id_mismatches;
            t.malformed += o.malformed;
            t.control_events += o.control_events;
            t.heartbeats += o.heartbeats;
            t.closed_early += u64::from(o.closed_early);
            if let Some(n) = expected {
                t.missing += c.missing(n);
                if o.connected
                    && c.complete(n)
                    && o.id_mismatches == 0
                    && o.malformed == 0
                    && o.control_events == 0
                {
                    t.complete += 1;
                }
            }
            if let Some(e) = &o.error {
                *errors.entry(e.clone()).or_default() += 1;
            }
        }
        let mut errors: Vec<_> = errors.into_iter().collect();
        errors.sort_by_key(|e| std::cmp::Reverse(e.1));
        errors.truncate(5);
        t.errors = errors;
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(seqs: &[u64]) -> Outcome {
        let mut o = Outcome {
            connected: true,
            ..Outcome::default()
        };
        for &s in seqs {
            o.check.observe(s);
        }
        o
    }

    #[test]
    fn totals_count_complete_watchers_only() {
        let mut errored = outcome(&[1, 2, 3]);
        errored.error = Some("boom".into());
        errored.control_events = 1;
        let outcomes = vec![
            outcome(&[1, 2, 3]),
            outcome(&[1, 3]),
            outcome(&[1, 2, 2, 3]),
            errored,
            Outcome::default(),
        ];
        let t = Totals::of(&outcomes, Some(3));
        assert_eq!(t.watchers, 5);
        assert_eq!(t.connected, 4);
        assert_eq!(t.complete, 1);
        assert_eq!(t.received, 3 + 2 + 4 + 3);
        assert_eq!(t.duplicates, 1);
        assert_eq!(t.gaps, 1);
        assert_eq!(t.missing, 1 + 3);
        assert_eq!(t.errors, vec![("boom".to_owned(), 1)]);
    }
}
