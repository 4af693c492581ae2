//! `jobcast bench ingest`: P concurrent producers appending batches of each
//! given size for a while: appends/s and ack latency.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;
use hdrhistogram::Histogram;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::http::Conn;
use super::stats::{self, Latency};
use super::{Common, Outcome};

/// `jobcast bench ingest`.
#[derive(Debug, Args)]
pub(super) struct IngestArgs {
    #[command(flatten)]
    pub(super) common: Common,
    /// Concurrent producers (one connection each; each waits for its ack before the next request).
    #[arg(long, default_value_t = 16)]
    producers: u64,
    /// Streams the producers append to (producer i appends to stream i mod streams).
    /// 0: one stream per producer.
    #[arg(long, default_value_t = 0)]
    streams: u64,
    /// Batch sizes to run one after the other.
    #[arg(long, value_delimiter = ',', default_value = "1,10,100")]
    batch: Vec<u64>,
    /// How long each batch size runs.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Extra bytes of padding in each event's data.
    #[arg(long, default_value_t = 0)]
    payload: usize,
}

/// What one producer did.
struct Done {
    node: usize,
    events: u64,
    requests: u64,
    ack: Histogram<u64>,
    error: Option<String>,
}

/// Runs the scenario.
pub(super) async fn run(args: IngestArgs) -> Result<()> {
    let c = &args.common;
    if args.producers == 0
        || args.batch.is_empty()
        || args.batch.iter().any(|&b| b == 0 || b > 1000)
    {
        bail!("--producers must be at least 1 and every --batch in 1..=1000");
    }
    let api = c.api();
    if !api.batches() && args.batch.iter().any(|&b| b != 1) {
        bail!(
            "{} takes one event per request: use --batch 1",
            c.target.name()
        );
    }
    let (ui, nofile) = super::start()?;
    let endpoints = c.endpoints(args.producers + 1).await?;
    let endpoint = endpoints[0].clone();
    let nodes = endpoints.len();
    let timeout = c.timeout.unwrap_or(
        args.duration * u32::try_from(args.batch.len()).unwrap_or(u32::MAX)
            + Duration::from_secs(60),
    );
    let deadline = Instant::now() + timeout;
    let nstreams = if args.streams == 0 {
        args.producers
    } else {
        args.streams
    };
    let streams = api.create_streams(&endpoint, "i", nstreams).await?;

    let mut out = Outcome::new();
    out.row(
        "producers x streams",
        format!("{} on {} streams", args.producers, nstreams),
    );
    if nodes > 1 {
        out.row(
            "nodes",
            format!("{nodes} (producer p appends to node p mod {nodes}; events/s is all nodes together)"),
        );
    }
    let mut runs = Vec::new();
    let mut metrics = serde_json::Map::new();
    let mut timed_out = false;
    let mut errors = Vec::new();
    // Each producer's next seq per stream, kept across batch sizes.
    let seqs: Arc<Vec<AtomicU64>> = Arc::new((0..nstreams).map(|_| AtomicU64::new(1)).collect());
    for &batch in &args.batch {
        let cancel = CancellationToken::new();
        let counted = Arc::new(AtomicU64::new(0));
        let end = (Instant::now() + args.duration).min(deadline);
        let bar = ui.bar(args.duration.as_secs(), &format!("batch {batch}"));
        let mut set = JoinSet::new();
        let started = Instant::now();
        let cpu_start = super::Cpu::now(c);
        for p in 0..args.producers {
            let api = api.clone();
            let node = p as usize % nodes;
            let endpoint = endpoints[node].clone();
            let s = (p % nstreams) as usize;
            let stream = streams[s].clone();
            let seqs = seqs.clone();
            let counted = counted.clone();
            let cancel = cancel.clone();
            let pad = args.payload;
            set.spawn(async move {
                let mut done = Done {
                    node,
                    events: 0,
                    requests: 0,
                    ack: stats::histogram(),
                    error: None,
                };
                let mut conn = Conn::new(endpoint, p as usize);
                let mut body = Vec::with_capacity(64 * batch as usize);
                while Instant::now() < end {
                    // The data seq is informative here (several producers may share a stream).
                    let first = seqs[s].fetch_add(batch, Ordering::Relaxed);
                    let sent = Instant::now();
                    let r = tokio::select! {
                        r = api.publish(&mut conn, &mut body, &stream, first, batch, stats::unix_nanos(), pad) => r,
                        _ = cancel.cancelled() => break,
                    };
                    if let Err(e) = r {
                        done.error = Some(format!("{e:#}"));
                        break;
                    }
                    done.ack.saturating_record(
                        u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX),
                    );
                    done.requests += 1;
                    done.events += batch;
                    counted.fetch_add(batch, Ordering::Relaxed);
                }
                done
            });
        }
        // Requests in flight at the end are allowed to finish (bounded by the deadline).
        let mut results = Vec::new();
        loop {
            let now = Instant::now();
            bar.set_position(now.duration_since(started).as_secs());
            bar.set_message(format!("{} events", counted.load(Ordering::Relaxed)));
            while let Some(r) = set.try_join_next() {
                results.push(r.unwrap_or_else(|e| Done {
                    node: 0,
                    events: 0,
                    requests: 0,
                    ack: stats::histogram(),
                    error: Some(format!("producer task: {e}")),
                }));
            }
            if set.is_empty() {
                break;
            }
            if now >= deadline {
                timed_out = true;
                cancel.cancel();
                while let Some(r) = set.join_next().await {
                    if let Ok(d) = r {
                        results.push(d);
                    }
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let secs = started.elapsed().as_secs_f64();
        let cpu = super::Cpu::now(c).since(&cpu_start);
        bar.finish();
        let mut ack = stats::histogram();
        let (mut events, mut requests) = (0, 0);
        let mut per_node = vec![(0_u64, 0_u64); nodes];
        for d in &results {
            stats::merge_into(&mut ack, &d.ack);
            events += d.events;
            requests += d.requests;
            per_node[d.node % nodes].0 += d.events;
            per_node[d.node % nodes].1 += d.requests;
            if let Some(e) = &d.error {
                errors.push(e.clone());
            }
        }
        let ack = Latency::of(&ack);
        let eps = stats::rate(events, secs);
        let rps = stats::rate(requests, secs);
        let mut server_cpu = cpu.server.map_or(String::new(), |s| {
            format!("   server CPU {:.0}%", s / secs * 100.0)
        });
        if let Some(pg) = cpu.postgres {
            server_cpu += &format!("   postgres CPU {:.0}%", pg / secs * 100.0);
        }
        out.row(
            &format!("batch {batch}"),
            format!(
                "{eps:>9.0} events/s {rps:>8.0} requests/s   ack {}{server_cpu}",
                ack.row()
            ),
        );
        metrics.insert(
            format!("b{batch}_server_cpu_us_per_event"),
            cpu.server
                .filter(|_| events > 0)
                .map(|s| (s * 1e6 / events as f64 * 100.0).round() / 100.0)
                .into(),
        );
        if nodes > 1 {
            let each: Vec<String> = per_node
                .iter()
                .map(|(e, _)| format!("{:.0}", stats::rate(*e, secs)))
                .collect();
            out.row(
                &format!("batch {batch} per node"),
                format!("{} events/s", each.join(" + ")),
            );
        }
        metrics.insert(format!("b{batch}_events_per_sec"), eps.round().into());
        metrics.insert(format!("b{batch}_requests_per_sec"), rps.round().into());
        metrics.insert(format!("b{batch}_ack_p50_us"), ack.p50_us.into());
        metrics.insert(format!("b{batch}_ack_p99_us"), ack.p99_us.into());
        runs.push(serde_json::json!({
            "batch": batch,
            "secs": secs,
            "events": events,
            "requests": requests,
            "events_per_sec": eps,
            "requests_per_sec": rps,
            "ack_latency": ack,
            "server_cpu_secs": cpu.server,
            "client_cpu_secs": cpu.client,
            "postgres_cpu_secs": cpu.postgres,
            "machine_busy_secs": cpu.machine,
            "per_node": per_node
                .iter()
                .enumerate()
                .map(|(i, (e, r))| serde_json::json!({
                    "node": i,
                    "server": c.server.get(i),
                    "events": e,
                    "requests": r,
                    "events_per_sec": stats::rate(*e, secs).round(),
                }))
                .collect::<Vec<_>>(),
        }));
        if timed_out || !errors.is_empty() {
            break;
        }
    }
    out.set(
        "params",
        serde_json::json!({
            "producers": args.producers,
            "streams": nstreams,
            "batches": args.batch,
            "duration_secs": args.duration.as_secs_f64(),
            "payload": args.payload,
            "timeout_secs": timeout.as_secs_f64(),
        }),
    );
    out.set("metrics", serde_json::Value::Object(metrics));
    out.set("runs", runs);
    out.set("errors", &errors);
    out.set("timed_out", timed_out);
    if timed_out {
        out.failures.push(format!(
            "timed out after {}",
            humantime::format_duration(timeout)
        ));
    }
    if let Some(e) = errors.first() {
        out.failures
            .push(format!("{} producer errors, first: {e}", errors.len()));
    }
    super::report("ingest", c, nofile, endpoint.source_count(), out)
}
