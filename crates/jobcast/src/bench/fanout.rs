//! `jobcast bench fanout`: S streams x N watchers, M events per stream.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;
use hdrhistogram::Histogram;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::http::{Conn, Endpoint};
use super::stats::{self, Latency};
use super::target::Api;
use super::watch::{self, Plan, Shared, Totals};
use super::{Common, Outcome};

/// `jobcast bench fanout`.
#[derive(Debug, Args)]
pub(super) struct FanoutArgs {
    #[command(flatten)]
    pub(super) common: Common,
    /// Streams (one producer each).
    #[arg(long, default_value_t = 10)]
    streams: u64,
    /// Watchers in all, spread evenly over the streams.
    #[arg(long, default_value_t = 1000)]
    watchers: u64,
    /// Events per stream.
    #[arg(long, default_value_t = 1000)]
    events: u64,
    /// Events per second per stream; 0 publishes flat out (each request waits for the previous ack).
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Events per append request (jobcast only; nchan takes one message per request).
    #[arg(long, default_value_t = 1)]
    batch: u64,
    /// Extra bytes of padding in each event's data.
    #[arg(long, default_value_t = 0)]
    payload: usize,
    /// Watchers connect before the streams exist, asking for new events only
    /// (`from=live`): the first append creates each stream, and every event
    /// must still reach every watcher.
    #[arg(long)]
    early: bool,
}

/// What a producer did.
struct Produced {
    events: u64,
    requests: u64,
    ack: Histogram<u64>,
    error: Option<String>,
}

/// Runs the scenario.
pub(super) async fn run(args: FanoutArgs) -> Result<()> {
    let c = &args.common;
    if args.streams == 0 || args.watchers == 0 || args.events == 0 || args.batch == 0 {
        bail!("--streams, --watchers, --events and --batch must be at least 1");
    }
    if args.batch > 1000 {
        bail!("--batch is at most 1000");
    }
    if args.rate < 0.0 || !args.rate.is_finite() {
        bail!("--rate must be 0 (flat out) or positive");
    }
    let api = c.api();
    if !api.batches() && args.batch != 1 {
        bail!(
            "{} takes one event per request: use --batch 1",
            c.target.name()
        );
    }
    let (ui, nofile) = super::start()?;
    let endpoints = c.endpoints(args.watchers + args.streams + 1).await?;
    let endpoint = endpoints[0].clone();
    let nodes = endpoints.len();
    let timeout = c.timeout.unwrap_or(Duration::from_secs(120));
    let deadline = Instant::now() + timeout;
    // Created first, so watchers attach to existing streams (unless --early).
    let streams = if args.early {
        Api::stream_names("f", args.streams)
    } else {
        api.create_streams(&endpoint, "f", args.streams).await?
    };

    let cancel = CancellationToken::new();
    let shared = Arc::new(Shared::new(
        endpoints.clone(),
        c.target,
        c.connect_concurrency,
        cancel.clone(),
    ));
    // Stream s is published on node s mod nodes; its watchers are on the
    // other nodes (their requests name their node's host).
    let requests: Vec<Vec<Arc<Vec<u8>>>> = streams
        .iter()
        .map(|s| {
            endpoints
                .iter()
                .map(|e| Arc::new(api.subscribe_request_from(&e.host, s, args.early)))
                .collect()
        })
        .collect();
    let mut watchers_per_node = vec![0_u64; nodes];
    let plan = Plan {
        until: Some(args.events),
        buf_size: 16 * 1024,
    };
    let mut watchers = JoinSet::new();
    for i in 0..args.watchers as usize {
        let s = i % requests.len();
        let node = super::other_node(s % nodes, i / requests.len(), nodes);
        watchers_per_node[node] += 1;
        let req = requests[s][node].clone();
        watchers.spawn(watch::run(shared.clone(), i, node, req, plan));
    }

    // Producers wait for the go signal: every watcher connected (or failed).
    let (go_tx, go_rx) = tokio::sync::watch::channel(false);
    let first_publish = Arc::new(AtomicU64::new(u64::MAX));
    let published = Arc::new(AtomicU64::new(0));
    let mut producers = JoinSet::new();
    for (s, name) in streams.iter().enumerate() {
        let p = Producer {
            api: api.clone(),
            endpoint: endpoints[s % nodes].clone(),
            index: args.watchers as usize + s,
            stream: name.clone(),
            events: args.events,
            batch: args.batch,
            rate: args.rate,
            payload: args.payload,
            // Spread the streams' publish instants over one period.
            offset: if args.rate > 0.0 {
                Duration::from_secs_f64(
                    args.batch as f64 / args.rate * s as f64 / args.streams as f64,
                )
            } else {
                Duration::ZERO
            },
            shared: shared.clone(),
            first_publish: first_publish.clone(),
            published: published.clone(),
        };
        let go = go_rx.clone();
        let cancel = cancel.clone();
        producers.spawn(async move { p.run(go, cancel).await });
    }

    let connect_bar = ui.bar(args.watchers, "connected");
    let publish_bar = ui.bar(args.events * args.streams, "published");
    let deliver_bar = ui.bar(args.events * args.watchers, "delivered");
    let connect_started = Instant::now();
    let mut connect_secs = None;
    let mut timed_out = false;
    let mut producer_failed = false;
    let mut results = Vec::new();
    let mut cpu_start = None;
    loop {
        let connected = shared.connected.load(Ordering::Relaxed);
        let failed = shared.failed.load(Ordering::Relaxed);
        connect_bar.set_position(connected + failed);
        publish_bar.set_position(published.load(Ordering::Relaxed));
        deliver_bar.set_position(shared.delivered.load(Ordering::Relaxed));
        if connect_secs.is_none() && connected + failed == args.watchers {
            connect_secs = Some(connect_started.elapsed().as_secs_f64());
            connect_bar.finish();
            ui.note(format!(
                "{connected} watchers connected ({failed} failed) in {:.2} s; publishing",
                connect_started.elapsed().as_secs_f64()
            ));
            cpu_start = Some((super::Cpu::now(c), Instant::now()));
            let _ = go_tx.send(true);
        }
        // A producer that failed leaves watchers waiting for ever: stop.
        while let Some(r) = producers.try_join_next() {
            let p = r.unwrap_or_else(|e| Produced {
                events: 0,
                requests: 0,
                ack: stats::histogram(),
                error: Some(format!("producer task: {e}")),
            });
            producer_failed |= p.error.is_some();
            results.push(p);
        }
        if producer_failed {
            cancel.cancel();
            break;
        }
        if shared.finished.load(Ordering::Relaxed) == args.watchers && producers.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            timed_out = true;
            cancel.cancel();
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let cpu =
        cpu_start.map(|(start, at)| (super::Cpu::now(c).since(&start), at.elapsed().as_secs_f64()));
    cancel.cancel();
    let outcomes = join_all(&mut watchers).await;
    while let Some(r) = producers.join_next().await {
        if let Ok(p) = r {
            results.push(p);
        }
    }
    connect_bar.finish();
    publish_bar.finish();
    deliver_bar.finish();

    // End the streams (not timed).
    let mut conn = Conn::new(endpoint.clone(), 0);
    for s in &streams {
        if let Err(e) = api.finish(&mut conn, s).await {
            ui.note(format!("cleanup: {e:#}"));
        }
    }

    let totals = Totals::of(&outcomes, Some(args.events));
    let mut ack = stats::histogram();
    let mut events_published = 0;
    let mut requests = 0;
    let mut producer_errors = Vec::new();
    for p in &results {
        stats::merge_into(&mut ack, &p.ack);
        events_published += p.events;
        requests += p.requests;
        if let Some(e) = &p.error {
            producer_errors.push(e.clone());
        }
    }
    let first = first_publish.load(Ordering::Relaxed);
    let last = shared.last_delivery_ns.load(Ordering::Relaxed);
    let window = if first != u64::MAX && last > first {
        (last - first) as f64 / 1e9
    } else {
        0.0
    };
    let latency = Latency::of(&shared.latency.merged());
    let ack = Latency::of(&ack);
    let deliveries_per_sec = stats::rate(totals.received, window);

    let mut out = Outcome::new();
    out.row(
        "streams x watchers",
        format!(
            "{} x {} ({} per stream)",
            args.streams,
            args.watchers,
            args.watchers / args.streams
        ),
    );
    out.row(
        "events per stream",
        format!(
            "{} at {} (batch {})",
            args.events,
            if args.rate > 0.0 {
                format!("{} ev/s per stream", args.rate)
            } else {
                "flat out".to_owned()
            },
            args.batch
        ),
    );
    if nodes > 1 {
        out.row(
            "nodes",
            format!(
                "{nodes}: stream s published on node s mod {nodes}, its watchers on the others \
                 (watchers per node {watchers_per_node:?})"
            ),
        );
    }
    out.row(
        "connected",
        format!(
            "{} of {} in {:.2} s",
            totals.connected,
            args.watchers,
            connect_secs.unwrap_or(0.0)
        ),
    );
    out.row(
        "published",
        format!("{events_published} events in {requests} requests"),
    );
    out.row(
        "delivered",
        format!("{} of {}", totals.received, args.events * args.watchers),
    );
    out.row(
        "deliveries/s",
        format!("{deliveries_per_sec:.0} (over {window:.2} s, first publish to last delivery)"),
    );
    out.row("latency p50/p90/p99/p999/max", latency.row());
    out.row("ack p50/p90/p99/p999/max", ack.row());
    out.row(
        "exactly once, in order",
        format!(
            "{} of {} watchers (duplicates {}, gaps {}, missing {}, id mismatches {}, malformed {})",
            totals.complete, args.watchers, totals.duplicates, totals.gaps, totals.missing, totals.id_mismatches, totals.malformed
        ),
    );
    if !totals.errors.is_empty() {
        out.row("watcher errors", format!("{:?}", totals.errors));
    }
    if let Some((cpu, secs)) = cpu {
        cpu.report(&mut out, secs);
    }
    // CPU µs per event delivered, over the publishing window.
    let per_delivery = |v: Option<f64>| {
        v.filter(|_| totals.received > 0)
            .map(|v| (v * 1e6 / totals.received as f64 * 100.0).round() / 100.0)
    };
    let server_us = per_delivery(cpu.and_then(|(c, _)| c.server));
    let client_us = per_delivery(cpu.and_then(|(c, _)| c.client));

    out.set(
        "params",
        serde_json::json!({
            "streams": args.streams,
            "watchers": args.watchers,
            "events": args.events,
            "rate": args.rate,
            "batch": args.batch,
            "payload": args.payload,
            "timeout_secs": timeout.as_secs_f64(),
            "placement": if nodes > 1 {
                "stream s published on node s mod nodes; its watchers on the other nodes"
            } else {
                "one node"
            },
            "watchers_per_node": watchers_per_node,
        }),
    );
    out.set(
        "metrics",
        serde_json::json!({
            "connect_secs": connect_secs.unwrap_or(0.0),
            "deliveries_per_sec": deliveries_per_sec.round(),
            "delivery_window_secs": window,
            "latency_p50_us": latency.p50_us,
            "latency_p90_us": latency.p90_us,
            "latency_p99_us": latency.p99_us,
            "latency_p999_us": latency.p999_us,
            "latency_max_us": latency.max_us,
            "ack_p50_us": ack.p50_us,
            "ack_p99_us": ack.p99_us,
            "server_cpu_us_per_delivery": server_us,
        "client_cpu_us_per_delivery": client_us,
        "watchers_complete": totals.complete,
            "delivered": totals.received,
        }),
    );
    out.set("latency", latency);
    out.set("ack_latency", ack);
    out.set("published", serde_json::json!({"events": events_published, "requests": requests, "errors": producer_errors}));
    out.set("check", &totals);
    out.set("timed_out", timed_out);

    if timed_out {
        out.failures.push(format!(
            "timed out after {}",
            humantime::format_duration(timeout)
        ));
    }
    if !producer_errors.is_empty() {
        out.failures
            .push(format!("producer failed: {}", producer_errors[0]));
    }
    if totals.complete != args.watchers {
        out.failures.push(format!(
            "{} of {} watchers did not get every event exactly once, in order",
            args.watchers - totals.complete,
            args.watchers
        ));
    }
    super::report("fanout", c, nofile, endpoint.source_count(), out)
}

/// Waits for every watcher (they stop at once when cancelled; a stuck one is aborted).
pub(super) async fn join_all(set: &mut JoinSet<watch::Outcome>) -> Vec<watch::Outcome> {
    let mut outcomes = Vec::with_capacity(set.len());
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(until, set.join_next()).await {
            Ok(Some(Ok(o))) => outcomes.push(o),
            Ok(Some(Err(e))) => outcomes.push(watch::Outcome {
                error: Some(format!("watcher task: {e}")),
                ..Default::default()
            }),
            Ok(None) => break,
            Err(_) => {
                set.abort_all();
            }
        }
    }
    outcomes
}

/// One stream's producer.
struct Producer {
    api: Api,
    endpoint: Arc<Endpoint>,
    index: usize,
    stream: String,
    events: u64,
    batch: u64,
    rate: f64,
    payload: usize,
    offset: Duration,
    shared: Arc<Shared>,
    first_publish: Arc<AtomicU64>,
    published: Arc<AtomicU64>,
}

impl Producer {
    async fn run(
        self,
        mut go: tokio::sync::watch::Receiver<bool>,
        cancel: CancellationToken,
    ) -> Produced {
        let mut done = Produced {
            events: 0,
            requests: 0,
            ack: stats::histogram(),
            error: None,
        };
        tokio::select! {
            r = go.wait_for(|&g| g) => if r.is_err() { return done },
            _ = cancel.cancelled() => return done,
        }
        let mut conn = Conn::new(self.endpoint.clone(), self.index);
        let mut body = Vec::with_capacity(256);
        let start = Instant::now() + self.offset;
        let mut seq = 1;
        while seq <= self.events {
            let count = self.batch.min(self.events - seq + 1);
            if self.rate > 0.0 {
                let at = start + Duration::from_secs_f64((seq - 1) as f64 / self.rate);
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = cancel.cancelled() => return done,
                }
            }
            self.first_publish
                .fetch_min(self.shared.since_base(), Ordering::Relaxed);
            let sent = Instant::now();
            let t = stats::unix_nanos();
            let r = tokio::select! {
                r = self.api.publish(&mut conn, &mut body, &self.stream, seq, count, t, self.payload) => r,
                _ = cancel.cancelled() => return done,
            };
            if let Err(e) = r {
                done.error = Some(format!("{e:#}"));
                return done;
            }
            done.ack
                .saturating_record(u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX));
            done.requests += 1;
            done.events += count;
            self.published.fetch_add(count, Ordering::Relaxed);
            seq += count;
        }
        done
    }
}
