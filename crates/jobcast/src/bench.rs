//! `jobcast bench`: measure a running jobcast (or nchan, for comparison)
//! over loopback.
//!
//! Scenarios: `fanout` (S streams x N watchers, latency and an
//! exactly-once-in-order check), `ingest` (appends/s and ack latency),
//! `replay` (one watcher catching up a long log), `hold` (idle watchers:
//! server memory per connection, heartbeats). `compare` prints two JSON
//! results side by side. Progress goes to stderr, the table to stdout, and
//! every number to `--json FILE`.
//!
//! The client is deliberately lean (raw sockets, a hand-written HTTP/1.1
//! reader, the protocol crate's decoder) so that it measures the server; it
//! still shares the machine's cores with the server, which the results say.

mod compare;
mod fanout;
mod hold;
mod http;
mod ingest;
mod nodes;
mod replay;
mod stats;
mod target;
mod watch;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use self::http::Endpoint;
use self::target::{Api, Target};

/// `jobcast bench`.
#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    #[command(subcommand)]
    scenario: Scenario,
}

/// The benchmark scenarios.
#[derive(Debug, Subcommand)]
enum Scenario {
    /// S streams x N watchers: publish-to-receive latency, deliveries/s, and
    /// a check that every watcher got every event exactly once, in order.
    Fanout(fanout::FanoutArgs),
    /// P concurrent producers appending batches: appends/s and ack latency.
    Ingest(ingest::IngestArgs),
    /// One watcher catching up a long log (jobcast only): events/s.
    Replay(replay::ReplayArgs),
    /// N idle watchers for a while: server memory per connection, heartbeats.
    Hold(hold::HoldArgs),
    /// Prints two or more `--json` results side by side, with ratios to the first.
    Compare(compare::CompareArgs),
}

/// Flags every scenario takes.
#[derive(Debug, Clone, Args)]
struct Common {
    /// The server's base URL (http only). Several nodes of one cluster:
    /// separate with commas (producers and watchers are spread over them).
    #[arg(
        long,
        env = "JOBCAST_URL",
        default_value = "http://127.0.0.1:7700",
        value_delimiter = ','
    )]
    server: Vec<String>,
    /// Start the nodes to measure instead of using --server: `sqlite` (one
    /// node on a new SQLite file) or `postgres://USER@HOST:PORT` (a new
    /// database `jobcast_bench_<random>` there, --nodes nodes on it). The
    /// bench stops the nodes and drops the database at the end, on error
    /// and on Ctrl-C. --server and --pid are then the started nodes'.
    #[arg(long, value_name = "STORE")]
    db: Option<String>,
    /// With --db: how many nodes to start (several need PostgreSQL).
    #[arg(long, default_value_t = 1, requires = "db")]
    nodes: usize,
    /// With --db: an extra argument for each node's `jobcast serve`
    /// (repeat: `--serve-arg=--pg-pool-size --serve-arg=32`).
    #[arg(long, requires = "db", allow_hyphen_values = true)]
    serve_arg: Vec<String>,
    /// Which server is behind --server.
    #[arg(long, value_enum, default_value = "jobcast")]
    target: Target,
    /// nchan: the publisher location prefix.
    #[arg(long, default_value = "/pub/")]
    nchan_pub: String,
    /// nchan: the EventSource subscriber location prefix.
    #[arg(long, default_value = "/sub/")]
    nchan_sub: String,
    /// Also write every number to this JSON file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Give up after this long (report what was measured, exit non-zero).
    /// Default: depends on the scenario.
    #[arg(long, value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
    /// Spread client sockets over 127.0.0.1..=127.0.0.N (each address has its
    /// own ephemeral port range). 0: as many as the connection count needs.
    #[arg(long, default_value_t = 0)]
    source_ips: u32,
    /// At most this many connections being set up at once (kept under the
    /// listen backlog: 128 for a std/tokio listener, 511 for nginx).
    #[arg(long, default_value_t = 100)]
    connect_concurrency: usize,
    /// The server's process id(s), for its CPU time and memory (nginx: every
    /// worker). Repeat or separate with commas.
    #[arg(long, value_delimiter = ',')]
    pid: Vec<u32>,
    /// A free-form name for this run, kept in the JSON.
    #[arg(long)]
    label: Option<String>,
    /// What is known about the store (set by --db).
    #[arg(skip)]
    store: Value,
}

impl Common {
    fn api(&self) -> Api {
        Api {
            target: self.target,
            nchan_pub: self.nchan_pub.clone(),
            nchan_sub: self.nchan_sub.clone(),
        }
    }

    /// Resolves the server(s), each with enough source addresses for
    /// `connections` (to all of them: an upper bound for each).
    async fn endpoints(&self, connections: u64) -> Result<Vec<Arc<Endpoint>>> {
        if self.server.is_empty() {
            bail!("--server: no URL");
        }
        let mut out = Vec::with_capacity(self.server.len());
        for url in &self.server {
            let endpoint = Endpoint::resolve(url).await?;
            let count = if self.source_ips > 0 {
                self.source_ips
            } else if endpoint.addr.ip().is_loopback() && endpoint.addr.is_ipv4() {
                let ports = ephemeral_ports().unwrap_or(28_000);
                // Leave a fifth of each address's ports for everything else.
                u32::try_from(connections.div_ceil(ports * 4 / 5)).unwrap_or(254)
            } else {
                1
            };
            out.push(Arc::new(endpoint.with_sources(count)?));
        }
        Ok(out)
    }
}

/// The node of a cluster of `nodes` that serves watcher `k` of a stream
/// whose producer is on node `producer`: another node when there is one
/// (publish on one node, receive on another: through the store's
/// notifications), spread over the others.
fn other_node(producer: usize, k: usize, nodes: usize) -> usize {
    if nodes <= 1 {
        0
    } else {
        (producer + 1 + k % (nodes - 1)) % nodes
    }
}

/// The size of the kernel's ephemeral port range.
fn ephemeral_ports() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = text.split_whitespace().map(|s| s.parse::<u64>().ok());
    let (lo, hi) = (it.next()??, it.next()??);
    hi.checked_sub(lo).map(|n| n + 1)
}

impl Scenario {
    /// The common flags (not for `compare`).
    fn common_mut(&mut self) -> Option<&mut Common> {
        match self {
            Self::Fanout(a) => Some(&mut a.common),
            Self::Ingest(a) => Some(&mut a.common),
            Self::Replay(a) => Some(&mut a.common),
            Self::Hold(a) => Some(&mut a.common),
            Self::Compare(_) => None,
        }
    }

    async fn run(self) -> Result<()> {
        match self {
            Self::Fanout(a) => fanout::run(a).await,
            Self::Ingest(a) => ingest::run(a).await,
            Self::Replay(a) => replay::run(a).await,
            Self::Hold(a) => hold::run(a).await,
            Self::Compare(a) => compare::run(a),
        }
    }
}

/// Runs a benchmark; with `--db`, on nodes it starts (and stops, whatever
/// happens: end, error, Ctrl-C or SIGTERM).
pub(crate) async fn run(args: BenchArgs) -> Result<()> {
    let mut scenario = args.scenario;
    let mut started = None;
    let run = async {
        if let Some(c) = scenario.common_mut() {
            if let Some(db) = c.db.clone() {
                if c.target != Target::Jobcast {
                    bail!("--db starts jobcast nodes: --target jobcast only");
                }
                eprintln!("starting {} node(s)", c.nodes);
                let nodes = started.insert(nodes::Nodes::start(&db, c.nodes, &c.serve_arg).await?);
                c.server = nodes.urls();
                c.pid = nodes.pids();
                c.store = nodes.info();
                eprintln!("nodes {} on {}", c.server.join(" "), c.store);
            }
        }
        scenario.run().await
    };
    let result = tokio::select! {
        biased;
        s = interrupted() => Err(anyhow::anyhow!("interrupted ({s})")),
        r = run => r,
    };
    // Stops the nodes and drops the database.
    drop(started);
    result
}

/// Resolves at the first SIGINT or SIGTERM.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        },
        _ => std::future::pending().await,
    }
}

/// Raises the open-file limit to the hard limit; returns (soft, hard).
/// What every scenario does first: raise the open-files limit and say so.
fn start() -> Result<(Ui, (u64, u64))> {
    let nofile = raise_nofile()?;
    let ui = Ui::new();
    ui.note(format!(
        "open files: {} (hard limit {})",
        nofile.0, nofile.1
    ));
    Ok((ui, nofile))
}

fn raise_nofile() -> Result<(u64, u64)> {
    let soft = rlimit::increase_nofile_limit(u64::MAX).context("raising RLIMIT_NOFILE")?;
    let (_, hard) = rlimit::Resource::NOFILE
        .get()
        .context("reading RLIMIT_NOFILE")?;
    Ok((soft, hard))
}

/// Progress bars on stderr (drawn only when it is a terminal) and notes between them.
struct Ui {
    bars: MultiProgress,
}

impl Ui {
    fn new() -> Self {
        Self {
            bars: MultiProgress::new(),
        }
    }

    /// A bar of `len` steps.
    fn bar(&self, len: u64, what: &str) -> ProgressBar {
        let style = ProgressStyle::with_template(
            "{prefix:>10} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} {per_sec:>12} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        let bar = self.bars.add(ProgressBar::new(len).with_style(style));
        bar.set_prefix(what.to_owned());
        bar
    }

    /// A line on stderr that does not break the bars.
    fn note(&self, line: impl AsRef<str>) {
        self.bars.suspend(|| eprintln!("{}", line.as_ref()));
    }
}

/// One scenario's result: a table for humans and a JSON document.
struct Outcome {
    /// Rows of (what, value).
    rows: Vec<(String, String)>,
    /// Every number; merged into the common header.
    json: serde_json::Map<String, Value>,
    /// Why the run failed (timeout, check failures); empty when it passed.
    failures: Vec<String>,
}

impl Outcome {
    fn new() -> Self {
        Self {
            rows: Vec::new(),
            json: serde_json::Map::new(),
            failures: Vec::new(),
        }
    }

    fn row(&mut self, what: &str, value: impl std::fmt::Display) {
        self.rows.push((what.to_owned(), value.to_string()));
    }

    fn set(&mut self, key: &str, value: impl serde::Serialize) {
        self.json.insert(
            key.to_owned(),
            serde_json::to_value(value).unwrap_or(Value::Null),
        );
    }
}

/// Prints the table, writes the JSON, and fails when the run did.
fn report(
    scenario: &str,
    common: &Common,
    nofile: (u64, u64),
    sources: usize,
    out: Outcome,
) -> Result<()> {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!();
    println!(
        "jobcast bench {scenario} — target {} at {} ({} cores, open files {}/{}, {} source address{})",
        common.target.name(),
        common.server.join(","),
        cores,
        nofile.0,
        nofile.1,
        sources,
        if sources == 1 { "" } else { "es" },
    );
    let width = out.rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in &out.rows {
        println!("  {k:<width$}  {v}");
    }
    let ok = out.failures.is_empty();
    println!(
        "  {:<width$}  {}",
        "result",
        if ok {
            "PASS".to_owned()
        } else {
            format!("FAIL: {}", out.failures.join("; "))
        }
    );
    if let Some(path) = &common.json {
        let mut doc = serde_json::Map::new();
        let header = json!({
            "scenario": scenario,
            "target": common.target.name(),
            "server": common.server.first(),
            "servers": common.server,
            "nodes": common.server.len(),
            "store": common.store,
            "loadavg": stats::loadavg(),
            "label": common.label,
            "unix_time": stats::unix_nanos() / 1_000_000_000,
            "jobcast_version": env!("CARGO_PKG_VERSION"),
            "cores": cores,
            "nofile_soft": nofile.0,
            "nofile_hard": nofile.1,
            "source_ips": sources,
            "ok": ok,
            "failures": out.failures,
        });
        if let Value::Object(h) = header {
            doc.extend(h);
        }
        doc.extend(out.json);
        let text = serde_json::to_string_pretty(&Value::Object(doc))?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    if !ok {
        bail!("{scenario}: {}", out.failures.join("; "));
    }
    Ok(())
}

/// CPU seconds used by the server (`--pid`), by this client, by
/// PostgreSQL's processes (when the store is PostgreSQL) and by the whole
/// machine, between two readings.
#[derive(Debug, Clone, Copy)]
struct Cpu {
    server: Option<f64>,
    client: Option<f64>,
    postgres: Option<f64>,
    machine: Option<f64>,
}

impl Cpu {
    /// Reads them now.
    fn now(common: &Common) -> Self {
        Self {
            server: if common.pid.is_empty() {
                None
            } else {
                stats::cpu_secs(&common.pid)
            },
            client: stats::own_cpu_secs(),
            postgres: if common.store["kind"] == "postgres" {
                stats::postgres_cpu_secs()
            } else {
                None
            },
            machine: stats::machine_busy_secs(),
        }
    }

    /// What was used since `earlier`.
    fn since(&self, earlier: &Self) -> Self {
        let d = |a: Option<f64>, b: Option<f64>| Some(((a? - b?) * 100.0).round() / 100.0);
        Self {
            server: d(self.server, earlier.server),
            client: d(self.client, earlier.client),
            postgres: d(self.postgres, earlier.postgres),
            machine: d(self.machine, earlier.machine),
        }
    }

    /// Adds a table row and JSON metrics for a window of `secs` seconds.
    fn report(&self, out: &mut Outcome, secs: f64) {
        let pct = |v: Option<f64>| {
            v.map(|v| format!("{v:.1} s ({:.0}% of one core)", v / secs.max(1e-9) * 100.0))
        };
        out.row(
            "CPU server / client",
            format!(
                "{} / {}",
                pct(self.server).unwrap_or_else(|| "? (give --pid)".into()),
                pct(self.client).unwrap_or_else(|| "?".into())
            ),
        );
        if let Some(pg) = pct(self.postgres) {
            out.row("CPU postgres (all its processes)", pg);
        }
        if let Some(m) = pct(self.machine) {
            out.row("CPU machine (all cores, busy)", m);
        }
        out.set(
            "cpu",
            json!({
                "window_secs": secs,
                "server_secs": self.server,
                "client_secs": self.client,
                "postgres_secs": self.postgres,
                "machine_busy_secs": self.machine,
            }),
        );
    }
}

/// A short id for this run, so that stream names never collide with an earlier run's.
fn run_id() -> String {
    format!("{:x}", stats::unix_nanos() / 1_000_000 % (1 << 40))
}
