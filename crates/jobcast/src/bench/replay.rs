//! `jobcast bench replay`: load a stream of many events, end it, then time
//! one watcher (or a few) catching up the whole log from the store.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::http::Conn;
use super::target::Target;
use super::watch::{self, Plan, Shared, Totals};
use super::{Common, Outcome};

/// `jobcast bench replay`.
#[derive(Debug, Args)]
pub(super) struct ReplayArgs {
    #[command(flatten)]
    pub(super) common: Common,
    /// Events in the stream.
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Watchers catching up at the same time.
    #[arg(long, default_value_t = 1)]
    watchers: u64,
    /// Events per append while loading.
    #[arg(long, default_value_t = 1000)]
    load_batch: u64,
    /// Extra bytes of padding in each event's data.
    #[arg(long, default_value_t = 0)]
    payload: usize,
    /// Replay this existing, completed stream (loaded by an earlier run with
    /// the same --events) instead of loading a new one.
    #[arg(long)]
    stream: Option<String>,
}

/// Runs the scenario.
pub(super) async fn run(args: ReplayArgs) -> Result<()> {
    let c = &args.common;
    if c.target != Target::Jobcast {
        bail!("replay needs a log of {} events: jobcast only", args.events);
    }
    if args.events == 0 || args.watchers == 0 || args.load_batch == 0 || args.load_batch > 1000 {
        bail!("--events and --watchers must be at least 1, --load-batch in 1..=1000");
    }
    let (ui, nofile) = super::start()?;
    let api = c.api();
    let endpoints = c.endpoints(args.watchers + 1).await?;
    let endpoint = endpoints[0].clone();
    let nodes = endpoints.len();
    let timeout = c.timeout.unwrap_or(Duration::from_secs(600));
    let deadline = Instant::now() + timeout;

    let mut out = Outcome::new();
    let mut conn = Conn::new(endpoint.clone(), 0);
    let (stream, load) = match &args.stream {
        Some(s) => (s.clone(), None),
        None => {
            let s = format!("r{}", super::run_id());
            api.create(&mut conn, &s).await?;
            let bar = ui.bar(args.events, "loaded");
            let started = Instant::now();
            let mut body = Vec::with_capacity(64 * args.load_batch as usize);
            let mut seq = 1;
            while seq <= args.events {
                if Instant::now() >= deadline {
                    bail!(
                        "timed out loading the stream ({} of {} events)",
                        seq - 1,
                        args.events
                    );
                }
                let n = args.load_batch.min(args.events - seq + 1);
                api.publish(&mut conn, &mut body, &s, seq, n, 0, args.payload)
                    .await?;
                seq += n;
                bar.set_position(seq - 1);
            }
            api.finish(&mut conn, &s).await?;
            bar.finish();
            (s, Some(started.elapsed().as_secs_f64()))
        }
    };
    let res = conn
        .request("GET", &format!("/v1/streams/{stream}"), None, b"")
        .await?;
    if res.status != 200 {
        bail!("stream {stream}: status {}", res.status);
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&res.body).context("stream metadata is not JSON")?;
    // `events` counts jobcast.end.
    let stored = meta["events"].as_u64().unwrap_or(0);
    if stored != args.events + 1 || meta["state"] != "completed" {
        bail!(
            "stream {stream} holds {stored} events (state {}); expected {} events and the end",
            meta["state"],
            args.events
        );
    }
    drop(conn);

    let cancel = CancellationToken::new();
    let shared = Arc::new(Shared::new(
        endpoints.clone(),
        c.target,
        c.connect_concurrency,
        cancel.clone(),
    ));
    // Loaded through node 0; with several nodes the watchers read on the others.
    let requests: Vec<Arc<Vec<u8>>> = endpoints
        .iter()
        .map(|e| Arc::new(api.subscribe_request(&e.host, &stream)))
        .collect();
    let plan = Plan {
        until: Some(args.events),
        buf_size: 64 * 1024,
    };
    let bar = ui.bar(args.events * args.watchers, "replayed");
    let start_ns = shared.since_base();
    let cpu_start = super::Cpu::now(c);
    let mut set = JoinSet::new();
    for i in 0..args.watchers as usize {
        let node = super::other_node(0, i, nodes);
        set.spawn(watch::run(
            shared.clone(),
            i,
            node,
            requests[node].clone(),
            plan,
        ));
    }
    let mut timed_out = false;
    loop {
        bar.set_position(shared.delivered.load(Ordering::Relaxed));
        if shared.finished.load(Ordering::Relaxed) == args.watchers {
            break;
        }
        if Instant::now() >= deadline {
            timed_out = true;
            cancel.cancel();
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cpu = super::Cpu::now(c).since(&cpu_start);
    let outcomes = super::fanout::join_all(&mut set).await;
    bar.finish();
    let last = shared.last_delivery_ns.load(Ordering::Relaxed);
    // From the request to the last event delivered.
    let secs = if last > start_ns {
        (last - start_ns) as f64 / 1e9
    } else {
        (shared.since_base() - start_ns) as f64 / 1e9
    };
    let totals = Totals::of(&outcomes, Some(args.events));
    let eps = super::stats::rate(totals.received, secs);

    out.row("stream", format!("{stream}: {} events", args.events));
    if let Some(l) = load {
        out.row(
            "load",
            format!(
                "{:.1} s ({:.0} events/s in batches of {})",
                l,
                args.events as f64 / l,
                args.load_batch
            ),
        );
    }
    out.row(
        "watchers",
        if nodes > 1 {
            format!(
                "{} (loaded through node 0, read on the {} others)",
                args.watchers,
                nodes - 1
            )
        } else {
            args.watchers.to_string()
        },
    );
    out.row(
        "replayed",
        format!("{} events in {secs:.2} s", totals.received),
    );
    out.row("events/s", format!("{eps:.0} (all watchers together)"));
    out.row(
        "exactly once, in order",
        format!(
            "{} of {} watchers (duplicates {}, gaps {}, missing {}, id mismatches {})",
            totals.complete,
            args.watchers,
            totals.duplicates,
            totals.gaps,
            totals.missing,
            totals.id_mismatches
        ),
    );
    cpu.report(&mut out, secs);
    out.set(
        "params",
        serde_json::json!({
            "events": args.events,
            "watchers": args.watchers,
            "load_batch": args.load_batch,
            "payload": args.payload,
            "stream": stream,
            "timeout_secs": timeout.as_secs_f64(),
        }),
    );
    out.set(
        "metrics",
        serde_json::json!({
            "replay_events_per_sec": eps.round(),
            "replay_secs": secs,
            "load_secs": load,
            "load_events_per_sec": load.map(|l| (args.events as f64 / l).round()),
        }),
    );
    out.set("check", &totals);
    out.set("timed_out", timed_out);
    if timed_out {
        out.failures.push(format!(
            "timed out after {}",
            humantime::format_duration(timeout)
        ));
    }
    if totals.complete != args.watchers {
        out.failures.push(format!(
            "{} of {} watchers did not get every event exactly once, in order",
            args.watchers - totals.complete,
            args.watchers
        ));
    }
    super::report("replay", c, nofile, endpoint.source_count(), out)
}
