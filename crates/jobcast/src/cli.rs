//! Client commands: tail, publish, complete, fail, delete, streams.
//!
//! Each builds a [`jobcast_client::Client`] from `--server` / `--token` and
//! does one thing. Errors come back as `anyhow` errors with context; `main`
//! prints them as one line (`jobcast: …`) and exits 2.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use futures::StreamExt;
use jobcast_client::{
    Client, Item, ListOptions, NewEvent, ResetPayload, RetryPolicy, Start, StreamState,
};
use tokio::io::AsyncBufReadExt;

/// Where the server is and how to authenticate.
#[derive(Debug, Clone, Args)]
pub(crate) struct ServerArgs {
    /// The server's base URL.
    #[arg(long, env = "JOBCAST_URL", default_value = jobcast_client::DEFAULT_URL)]
    pub(crate) server: String,
    /// A bearer token.
    #[arg(long, env = "JOBCAST_TOKEN", hide_env_values = true)]
    pub(crate) token: Option<String>,
}

/// The client subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum ClientCommand {
    /// Print a stream's events as they arrive; exit 0 when it completed, 1 when it failed, 2 on error.
    Tail(TailArgs),
    /// Append events: each DATA is one event (sent as one batch); without DATA, one event per line of stdin.
    Publish(PublishArgs),
    /// End a stream as completed.
    Complete(CompleteArgs),
    /// End a stream as failed.
    Fail(FailArgs),
    /// Delete a stream and its log.
    Delete(DeleteArgs),
    /// List streams, newest first, as a table.
    Streams(StreamsArgs),
    /// Exit 0 when the server is ready (`GET /readyz`), 1 otherwise: for health checks.
    Ready(ReadyArgs),
}

/// `jobcast ready`.
#[derive(Debug, Args)]
pub(crate) struct ReadyArgs {
    /// Give up after this long.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    #[command(flatten)]
    server: ServerArgs,
}

/// `jobcast tail`.
#[derive(Debug, Args)]
pub(crate) struct TailArgs {
    /// The stream to follow.
    stream: String,
    /// Where to start: `start` (the whole log), `live` (only new events), `tail:N` (the last N events, then new ones), or an event id (the events after it).
    #[arg(long, default_value = "start", value_parser = parse_start)]
    from: Start,
    /// Print one JSON object per line, `{"id","type","data"}` (the end too), instead of the data.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    server: ServerArgs,
}

/// `jobcast publish`.
#[derive(Debug, Args)]
pub(crate) struct PublishArgs {
    /// The stream (created if it does not exist).
    stream: String,
    /// The events' data; none: read stdin, one event per non-empty line, in batches.
    data: Vec<String>,
    /// The event type (default `message`).
    #[arg(long = "type", value_name = "T")]
    event_type: Option<String>,
    /// Each DATA (or line) is a JSON value, sent as JSON rather than as text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    server: ServerArgs,
}

/// `jobcast complete`.
#[derive(Debug, Args)]
pub(crate) struct CompleteArgs {
    /// The stream to end.
    stream: String,
    /// Final data for the end event (text; a JSON value with --json).
    #[arg(long, value_name = "D")]
    data: Option<String>,
    /// --data is a JSON value.
    #[arg(long, requires = "data")]
    json: bool,
    #[command(flatten)]
    server: ServerArgs,
}

/// `jobcast fail`.
#[derive(Debug, Args)]
pub(crate) struct FailArgs {
    /// The stream to end.
    stream: String,
    /// Why it failed.
    #[arg(long, value_name = "E")]
    error: String,
    #[command(flatten)]
    server: ServerArgs,
}

/// `jobcast delete`.
#[derive(Debug, Args)]
pub(crate) struct DeleteArgs {
    /// The stream to delete.
    stream: String,
    #[command(flatten)]
    server: ServerArgs,
}

/// `jobcast streams`.
#[derive(Debug, Args)]
pub(crate) struct StreamsArgs {
    /// Only streams in this state.
    #[arg(long, value_name = "S", value_parser = parse_state)]
    state: Option<StreamState>,
    #[command(flatten)]
    server: ServerArgs,
}

fn parse_start(s: &str) -> Result<Start, String> {
    s.parse()
        .map_err(|_| "expected start, live, tail:N or an event id such as k3x9q-42".to_owned())
}

fn parse_state(s: &str) -> Result<StreamState, String> {
    StreamState::parse(s).ok_or_else(|| "expected open, completed or failed".to_owned())
}

/// Runs a client command.
pub(crate) async fn run(cmd: ClientCommand) -> Result<ExitCode> {
    // Reconnects and retries are logged at debug: JOBCAST_LOG=debug shows them.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("JOBCAST_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
    match cmd {
        ClientCommand::Tail(a) => tail(a).await,
        ClientCommand::Publish(a) => publish(a).await.map(|()| ExitCode::SUCCESS),
        ClientCommand::Complete(a) => complete(a).await.map(|()| ExitCode::SUCCESS),
        ClientCommand::Fail(a) => {
            let client = client(&a.server)?;
            client
                .fail(&a.stream, &a.error)
                .await
                .with_context(|| format!("fail {}", a.stream))?;
            Ok(ExitCode::SUCCESS)
        }
        ClientCommand::Delete(a) => {
            let client = client(&a.server)?;
            client
                .delete(&a.stream)
                .await
                .with_context(|| format!("delete {}", a.stream))?;
            Ok(ExitCode::SUCCESS)
        }
        ClientCommand::Streams(a) => streams(a).await.map(|()| ExitCode::SUCCESS),
        ClientCommand::Ready(a) => ready(a).await,
    }
}

fn client(args: &ServerArgs) -> Result<Client> {
    let mut b = Client::builder(&args.server)
        .user_agent(concat!("jobcast-cli/", env!("CARGO_PKG_VERSION")))
        // A person is waiting: retry producer requests for a shorter time than the library default.
        .retry(RetryPolicy {
            max_attempts: 6,
            max_elapsed: Duration::from_secs(20),
        });
    if let Some(t) = &args.token {
        b = b.token(t);
    }
    Ok(b.build()?)
}

/// Writes to stdout; a closed stdout (e.g. `| head`) ends the command quietly.
struct Out {
    out: std::io::Stdout,
}

enum Wrote {
    Ok,
    Closed,
}

impl Out {
    fn line(&mut self, text: &str) -> Result<Wrote> {
        let mut lock = self.out.lock();
        match writeln!(lock, "{text}").and_then(|()| lock.flush()) {
            Ok(()) => Ok(Wrote::Ok),
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(Wrote::Closed),
            Err(e) => Err(e).context("writing to stdout"),
        }
    }
}

fn exit_for(stream: &str, state: StreamState, error: Option<&str>) -> ExitCode {
    match state {
        StreamState::Completed => ExitCode::SUCCESS,
        StreamState::Failed => {
            match error {
                Some(e) => eprintln!("jobcast: stream {stream} failed: {e}"),
                None => eprintln!("jobcast: stream {stream} failed"),
            }
            ExitCode::from(1)
        }
        // Not reachable from an end event; a watch that ended on an open stream.
        StreamState::Open => {
            eprintln!("jobcast: the watch of {stream} ended before the stream did");
            ExitCode::from(2)
        }
    }
}

fn reset_notice(stream: &str, r: &ResetPayload) {
    let reason = match r.reason {
        jobcast_client::ResetReason::EpochMismatch => "the stream was deleted and created again",
        jobcast_client::ResetReason::HistoryTrimmed => "older events were removed by retention",
        jobcast_client::ResetReason::UnknownPosition => "the server does not know that position",
    };
    let from = r.resumed_from.as_deref().unwrap_or("the first event kept");
    eprintln!(
        "jobcast: notice: {stream}: cannot resume after {} ({reason}); continuing after {from}",
        r.requested
    );
}

async fn tail(args: TailArgs) -> Result<ExitCode> {
    let client = client(&args.server)?;
    let stream = args.stream;
    let mut watch = client.watch(&stream, args.from);
    let mut out = Out {
        out: std::io::stdout(),
    };
    while let Some(item) = watch.next().await {
        let wrote = match item.with_context(|| format!("tail {stream}"))? {
            Item::Event(e) if args.json => out.line(
                &serde_json::json!({"id": e.id.to_string(), "type": e.event_type, "data": e.data})
                    .to_string(),
            )?,
            Item::Event(e) => out.line(&e.data)?,
            Item::Reset(r) => {
                reset_notice(&stream, &r);
                Wrote::Ok
            }
            Item::End(end) => {
                if args.json {
                    let data = serde_json::to_string(&end.payload)?;
                    let id = end.id.as_ref().map(|i| i.to_string());
                    if let Wrote::Closed = out.line(
                        &serde_json::json!({"id": id, "type": jobcast_protocol::END_EVENT, "data": data})
                            .to_string(),
                    )? {
                        return Ok(ExitCode::SUCCESS);
                    }
                }
                return Ok(exit_for(&stream, end.state(), end.payload.error.as_deref()));
            }
            _ => Wrote::Ok,
        };
        if let Wrote::Closed = wrote {
            return Ok(ExitCode::SUCCESS);
        }
    }
    // Ended without an end event: the position was the stream's end (204),
    // so the end was seen before. Report the stream's state.
    let info = client
        .get(&stream)
        .await
        .with_context(|| format!("tail {stream}"))?;
    Ok(exit_for(&stream, info.state, None))
}

fn new_event(data: String, json: bool, event_type: Option<&str>) -> Result<NewEvent> {
    let event = if json {
        let value: serde_json::Value =
            serde_json::from_str(&data).with_context(|| format!("not JSON: {data:?}"))?;
        NewEvent::json(&value)?
    } else {
        NewEvent::text(data)
    };
    Ok(match event_type {
        Some(t) => event.with_type(t),
        None => event,
    })
}

/// Most events per append (the server's batch limit).
const MAX_BATCH: usize = 1000;
/// Lines read from stdin are sent when this many are waiting …
const STDIN_BATCH: usize = 100;
/// … or when the first waiting line is this old.
const STDIN_LINGER: Duration = Duration::from_millis(50);

async fn publish(args: PublishArgs) -> Result<()> {
    let client = client(&args.server)?;
    let ctx = || format!("publish to {}", args.stream);
    let t = args.event_type.as_deref();
    if !args.data.is_empty() {
        let events = args
            .data
            .into_iter()
            .map(|d| new_event(d, args.json, t))
            .collect::<Result<Vec<_>>>()?;
        for batch in events.chunks(MAX_BATCH) {
            client
                .append_batch(&args.stream, batch)
                .await
                .with_context(ctx)?;
        }
        return Ok(());
    }
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut batch: Vec<NewEvent> = Vec::new();
    loop {
        // Wait as long as it takes for a first line, then at most STDIN_LINGER for more.
        let line = if batch.is_empty() {
            lines.next_line().await.context("reading stdin")?
        } else {
            match tokio::time::timeout(STDIN_LINGER, lines.next_line()).await {
                Ok(line) => line.context("reading stdin")?,
                Err(_) => {
                    send(&client, &args.stream, &mut batch)
                        .await
                        .with_context(ctx)?;
                    continue;
                }
            }
        };
        let Some(line) = line else { break };
        let line = line.strip_suffix('\r').unwrap_or(&line).to_owned();
        // An empty line would be an empty event, which the server refuses
        // (browsers would drop it silently): skip it.
        if line.is_empty() {
            continue;
        }
        batch.push(new_event(line, args.json, t)?);
        if batch.len() >= STDIN_BATCH {
            send(&client, &args.stream, &mut batch)
                .await
                .with_context(ctx)?;
        }
    }
    if !batch.is_empty() {
        send(&client, &args.stream, &mut batch)
            .await
            .with_context(ctx)?;
    }
    Ok(())
}

async fn send(client: &Client, stream: &str, batch: &mut Vec<NewEvent>) -> Result<()> {
    client.append_batch(stream, batch).await?;
    batch.clear();
    Ok(())
}

async fn complete(args: CompleteArgs) -> Result<()> {
    let client = client(&args.server)?;
    let data = match args.data {
        None => None,
        Some(d) if args.json => {
            Some(serde_json::from_str(&d).with_context(|| format!("--data is not JSON: {d:?}"))?)
        }
        Some(d) => Some(serde_json::Value::String(d)),
    };
    client
        .complete(&args.stream, data.as_ref())
        .await
        .with_context(|| format!("complete {}", args.stream))?;
    Ok(())
}

async fn streams(args: StreamsArgs) -> Result<()> {
    let client = client(&args.server)?;
    let mut rows = vec![[
        "ID".to_owned(),
        "STATE".to_owned(),
        "EVENTS".to_owned(),
        "WATCHERS".to_owned(),
        "UPDATED".to_owned(),
    ]];
    let mut options = ListOptions {
        state: args.state,
        limit: Some(1000),
        ..Default::default()
    };
    // Bounded: at most 1000 pages of 1000 streams.
    for _ in 0..1000 {
        let page = client.list(&options).await.context("list streams")?;
        rows.extend(page.streams.into_iter().map(|s| {
            [
                s.id,
                s.state.as_str().to_owned(),
                s.events.to_string(),
                s.watchers.to_string(),
                s.updated_at,
            ]
        }));
        match page.next {
            Some(next) => options.after = Some(next),
            None => break,
        }
    }
    let mut widths = [0usize; 5];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = Out {
        out: std::io::stdout(),
    };
    for row in &rows {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  "));
            }
        }
        if let Wrote::Closed = out.line(line.trim_end())? {
            break;
        }
    }
    Ok(())
}

async fn ready(args: ReadyArgs) -> Result<ExitCode> {
    // One attempt: the health checker decides when to ask again.
    let client = Client::builder(&args.server.server)
        .user_agent(concat!("jobcast-cli/", env!("CARGO_PKG_VERSION")))
        .retry(RetryPolicy {
            max_attempts: 1,
            max_elapsed: args.timeout,
        })
        .build()?;
    match tokio::time::timeout(args.timeout, client.ready()).await {
        Ok(Ok(())) => Ok(ExitCode::SUCCESS),
        Ok(Err(e)) => {
            eprintln!("jobcast: not ready: {e}");
            Ok(ExitCode::from(1))
        }
        Err(_) => {
            eprintln!("jobcast: not ready: no answer within {:?}", args.timeout);
            Ok(ExitCode::from(1))
        }
    }
}
