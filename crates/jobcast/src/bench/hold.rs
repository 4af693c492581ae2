//! `jobcast bench hold`: N idle watchers for T seconds; the server's memory
//! per connection (from `/proc/PID/status`) and the heartbeats received.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::stats::Mem;
use super::watch::{self, Plan, Shared, Totals};
use super::{Common, Outcome, Ui};

/// `jobcast bench hold`.
#[derive(Debug, Args)]
pub(super) struct HoldArgs {
    #[command(flatten)]
    pub(super) common: Common,
    /// Idle watchers.
    #[arg(long, default_value_t = 10_000)]
    watchers: u64,
    /// Streams they watch (created empty first; nothing is published).
    #[arg(long, default_value_t = 100)]
    streams: u64,
    /// How long to hold them, from when the last one connected.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Wait this long after the last connection before reading the server's memory.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    settle: Duration,
}

/// Runs the scenario.
pub(super) async fn run(args: HoldArgs) -> Result<()> {
    let c = &args.common;
    if args.watchers == 0 || args.streams == 0 {
        bail!("--watchers and --streams must be at least 1");
    }
    if args.settle >= args.duration {
        bail!("--settle must be shorter than --duration");
    }
    let (ui, nofile) = super::start()?;
    if nofile.0 < args.watchers + 64 {
        ui.note(format!(
            "warning: {} watchers need more open files than the limit {}",
            args.watchers, nofile.0
        ));
    }
    let api = c.api();
    let endpoints = c.endpoints(args.watchers + 1).await?;
    let endpoint = endpoints[0].clone();
    let timeout = c
        .timeout
        .unwrap_or(args.duration + Duration::from_secs(120));
    let deadline = Instant::now() + timeout;
    let streams = api.create_streams(&endpoint, "h", args.streams).await?;

    // Let the server settle before the baseline.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = read_mem(&c.pid, &ui);

    let cancel = CancellationToken::new();
    let shared = Arc::new(Shared::new(
        endpoints.clone(),
        c.target,
        c.connect_concurrency,
        cancel.clone(),
    ));
    let plan = Plan {
        until: None,
        buf_size: 1024,
    };
    // Watcher i on node i mod nodes (memory is summed over every --pid).
    let requests: Vec<Vec<Arc<Vec<u8>>>> = streams
        .iter()
        .map(|s| {
            endpoints
                .iter()
                .map(|e| Arc::new(api.subscribe_request(&e.host, s)))
                .collect()
        })
        .collect();
    let mut watchers = JoinSet::new();
    for i in 0..args.watchers as usize {
        let node = i % endpoints.len();
        let req = requests[i % requests.len()][node].clone();
        watchers.spawn(watch::run(shared.clone(), i, node, req, plan));
    }

    let connect_bar = ui.bar(args.watchers, "connected");
    let started = Instant::now();
    let mut timed_out = false;
    let mut connect_secs = 0.0;
    loop {
        let done = shared.connected.load(Ordering::Relaxed) + shared.failed.load(Ordering::Relaxed);
        connect_bar.set_position(done);
        if done == args.watchers {
            connect_secs = started.elapsed().as_secs_f64();
            break;
        }
        if Instant::now() >= deadline {
            timed_out = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    connect_bar.finish();
    let connected = shared.connected.load(Ordering::Relaxed);
    ui.note(format!(
        "{connected} watchers connected ({} failed) in {connect_secs:.2} s; holding {}",
        shared.failed.load(Ordering::Relaxed),
        humantime::format_duration(args.duration)
    ));

    let mut after = None;
    let mut at_end = None;
    let mut held_secs = 0.0;
    // Heartbeats during the hold only (nchan greets each subscriber with a comment).
    let mut heartbeats = 0;
    let mut still_open = 0;
    let mut cpu = None;
    if !timed_out {
        let hold_start = Instant::now();
        let cpu_start = super::Cpu::now(c);
        let heartbeats_start = shared.heartbeats.load(Ordering::Relaxed);
        let hold_bar = ui.bar(args.duration.as_secs(), "held (s)");
        let settle_at = hold_start + args.settle;
        let end = (hold_start + args.duration).min(deadline);
        loop {
            let now = Instant::now();
            hold_bar.set_position(now.duration_since(hold_start).as_secs());
            hold_bar.set_message(format!(
                "heartbeats {}",
                shared.heartbeats.load(Ordering::Relaxed)
            ));
            if after.is_none() && now >= settle_at {
                after = read_mem(&c.pid, &ui);
            }
            if now >= end {
                timed_out = end < hold_start + args.duration;
                break;
            }
            tokio::time::sleep(Duration::from_millis(200).min(end - now)).await;
        }
        held_secs = hold_start.elapsed().as_secs_f64();
        cpu = Some(super::Cpu::now(c).since(&cpu_start));
        heartbeats = shared.heartbeats.load(Ordering::Relaxed) - heartbeats_start;
        at_end = read_mem(&c.pid, &ui);
        still_open = connected - shared.finished.load(Ordering::Relaxed).min(connected);
        hold_bar.finish();
    }
    cancel.cancel();
    let outcomes = super::fanout::join_all(&mut watchers).await;
    let totals = Totals::of(&outcomes, None);

    let mut out = Outcome::new();
    out.row(
        "watchers x streams",
        format!("{} on {} streams", args.watchers, args.streams),
    );
    out.row(
        "connected",
        format!("{connected} of {} in {connect_secs:.2} s", args.watchers),
    );
    out.row(
        "held",
        format!("{held_secs:.1} s; {still_open} still open at the end"),
    );
    out.row(
        "heartbeats",
        format!(
            "{heartbeats} during the hold ({:.2} per watcher)",
            heartbeats as f64 / connected.max(1) as f64,
        ),
    );
    let per_conn = |a: Option<Mem>, f: fn(&Mem) -> u64| -> Option<f64> {
        let (b, a) = (before?, a?);
        (connected > 0).then(|| (f(&a) as f64 - f(&b) as f64) * 1024.0 / connected as f64)
    };
    let rss = per_conn(after, |m| m.vm_rss_kib);
    let anon = per_conn(after, |m| m.rss_anon_kib);
    let rss_end = per_conn(at_end, |m| m.vm_rss_kib);
    if let (Some(b), Some(a)) = (before, after) {
        out.row(
            "server RSS before / after",
            format!(
                "{} / {} KiB (anon {} / {} KiB)",
                b.vm_rss_kib, a.vm_rss_kib, b.rss_anon_kib, a.rss_anon_kib
            ),
        );
        out.row(
            "server RSS per connection",
            format!(
                "{:.0} bytes (anon {:.0} bytes; at the end {:.0} bytes)",
                rss.unwrap_or(0.0),
                anon.unwrap_or(0.0),
                rss_end.unwrap_or(0.0)
            ),
        );
    } else {
        out.row("server RSS", "not measured (give --pid)");
    }
    if let Some(cpu) = cpu {
        cpu.report(&mut out, held_secs);
    }
    if !totals.errors.is_empty() {
        out.row("watcher errors", format!("{:?}", totals.errors));
    }

    out.set(
        "params",
        serde_json::json!({
            "watchers": args.watchers,
            "streams": args.streams,
            "duration_secs": args.duration.as_secs_f64(),
            "settle_secs": args.settle.as_secs_f64(),
            "pids": c.pid,
            "timeout_secs": timeout.as_secs_f64(),
        }),
    );
    out.set(
        "metrics",
        serde_json::json!({
            "connect_secs": connect_secs,
            "connected": connected,
            "rss_per_conn_bytes": rss.map(f64::round),
            "rss_anon_per_conn_bytes": anon.map(f64::round),
            "rss_per_conn_at_end_bytes": rss_end.map(f64::round),
            "heartbeats_per_watcher": heartbeats as f64 / connected.max(1) as f64,
            "still_open_at_end": still_open,
        "server_cpu_secs_idle": cpu.and_then(|c| c.server),
        }),
    );
    out.set(
        "memory_kib",
        serde_json::json!({"before": before, "after_settle": after, "at_end": at_end}),
    );
    out.set("held_secs", held_secs);
    out.set("check", &totals);
    out.set("timed_out", timed_out);
    if timed_out {
        out.failures.push(format!(
            "timed out after {}",
            humantime::format_duration(timeout)
        ));
    }
    if connected != args.watchers {
        out.failures.push(format!(
            "{} watchers could not connect",
            args.watchers - connected
        ));
    }
    if still_open != connected {
        out.failures.push(format!(
            "{} watchers were closed before the end",
            connected - still_open
        ));
    }
    super::report("hold", c, nofile, endpoint.source_count(), out)
}

/// Reads the memory of `pids` (None without pids, or on error, which is noted).
fn read_mem(pids: &[u32], ui: &Ui) -> Option<Mem> {
    if pids.is_empty() {
        return None;
    }
    match Mem::read(pids) {
        Ok(m) => Some(m),
        Err(e) => {
            ui.note(format!("memory: {e:#}"));
            None
        }
    }
}
