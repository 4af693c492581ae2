//! A Jepsen-style history of a run against real jobcast processes, and its
//! checker (in the spirit of jepsen's kafka queue checker).
//!
//! Every operation is recorded with a monotonic timestamp: each producer
//! append (invoke, every failed attempt, then ok with the ids the server
//! returned, or fail: definite when the server refused it, indeterminate
//! when its events may or may not exist), the nemesis' faults and the
//! harness' admin operations, and for every watcher each connection (or,
//! for a jobcast-client watcher, each `watch()`) with its resume point,
//! every event it received (id, type, data) and every control event
//! (`jobcast.reset`, `jobcast.error`, `jobcast.end`) or cut.
//!
//! Each event's data is a unique token (`p{producer}-{n}`), so acks can be
//! matched to deliveries. [`check`] then says, per stream epoch (the SSE id
//! is `{epoch}-{seq}`), whether every acknowledged event was seen exactly once
//! by every watcher that followed that epoch to its end, and counts what it
//! found ([`Report`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use jobcast_protocol::decode::Frame;
use jobcast_protocol::EventId;
use serde_json::Value;
use tokio::time::Instant;

use super::sse::{self, Close};

/// How a watcher reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The raw SSE reader of [`raw_watcher`]: one recorded connection per
    /// request, so a `jobcast.reset` must come before any event of it.
    Raw,
    /// The real `jobcast_client::Watch` of [`client_watcher`]: one recorded
    /// "connection" per `watch()`, which reconnects (and may get a reset)
    /// inside by itself.
    Client,
}

/// A watcher known to the history.
#[derive(Debug, Clone)]
pub struct WatcherInfo {
    pub name: String,
    pub stream: String,
    pub kind: Kind,
}

/// One recorded operation.
#[derive(Debug, Clone)]
pub enum Op {
    /// A producer starts appending `tokens` (each event's data) under `key`.
    Invoke {
        producer: usize,
        stream: String,
        key: String,
        tokens: Vec<String>,
    },
    /// One attempt of `key` failed and is retried with the same key
    /// (`status` 0: no HTTP answer).
    Attempt {
        key: String,
        status: u16,
        why: String,
    },
    /// Acknowledged (201) with these ids.
    Ok {
        key: String,
        first: EventId,
        last: EventId,
    },
    /// Given up. `definite`: the server refused it (a 4xx), so nothing was
    /// appended; otherwise indeterminate (timeouts, cuts, 503).
    Fail {
        key: String,
        definite: bool,
        why: String,
    },
    /// A fault injected (or healed) by the nemesis.
    Nemesis { what: String, detail: String },
    /// The harness created, deleted or completed a stream.
    Admin {
        what: String,
        stream: String,
        detail: String,
    },
    /// A watcher's connection starts, resuming after `resume`.
    Connect {
        watcher: usize,
        node: String,
        resume: Option<String>,
    },
    /// A log event arrived.
    Event {
        watcher: usize,
        id: String,
        event_type: String,
        data: String,
    },
    /// `jobcast.reset` arrived (its data).
    Reset { watcher: usize, payload: Value },
    /// `jobcast.error` arrived, or the watch was answered with an error.
    Error { watcher: usize, payload: Value },
    /// `jobcast.end` arrived: the watcher is done.
    End {
        watcher: usize,
        id: String,
        payload: Value,
    },
    /// The connection ended without a control event (cut, timeout).
    Closed { watcher: usize, why: String },
}

/// An operation and when it was recorded (since the history began).
#[derive(Debug, Clone)]
pub struct Entry {
    pub at: Duration,
    pub op: Op,
}

/// The history of one run: appended to by every task, in the order the
/// operations happened (one lock, held only to push).
#[derive(Debug)]
pub struct History {
    /// Prefixes the nemesis' log lines (runs may go on side by side).
    label: String,
    start: Instant,
    ops: Mutex<Vec<Entry>>,
    watchers: Mutex<Vec<WatcherInfo>>,
}

impl Default for History {
    fn default() -> Self {
        History {
            label: String::new(),
            start: Instant::now(),
            ops: Mutex::new(Vec::new()),
            watchers: Mutex::new(Vec::new()),
        }
    }
}

impl History {
    /// A new history; `label` names the run in log lines.
    pub fn new(label: &str) -> Arc<History> {
        Arc::new(History {
            label: label.to_owned(),
            ..History::default()
        })
    }

    /// The run's name.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Records `op` now.
    pub fn record(&self, op: Op) {
        let at = self.start.elapsed();
        self.ops.lock().unwrap().push(Entry { at, op });
    }

    /// Registers a watcher; returns its number.
    pub fn watcher(&self, name: &str, stream: &str, kind: Kind) -> usize {
        let mut w = self.watchers.lock().unwrap();
        w.push(WatcherInfo {
            name: name.to_owned(),
            stream: stream.to_owned(),
            kind,
        });
        w.len() - 1
    }

    /// What was recorded so far.
    pub fn entries(&self) -> Vec<Entry> {
        self.ops.lock().unwrap().clone()
    }

    /// Writes the history, one operation a line (`seconds op`), to `path`.
    pub fn dump(&self, path: &std::path::Path) -> std::io::Result<()> {
        use std::io::Write;
        let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
        for (i, w) in self.watchers().iter().enumerate() {
            writeln!(out, "watcher {i}: {w:?}")?;
        }
        for e in self.entries() {
            writeln!(out, "{:>9.3} {:?}", e.at.as_secs_f64(), e.op)?;
        }
        out.flush()
    }

    pub fn watchers(&self) -> Vec<WatcherInfo> {
        self.watchers.lock().unwrap().clone()
    }

    /// Records a fault.
    pub fn fault(&self, what: &str, detail: impl Into<String>) {
        let detail = detail.into();
        eprintln!(
            "[{}] nemesis {:>6.1}s: {what} {detail}",
            self.label,
            self.start.elapsed().as_secs_f64()
        );
        self.record(Op::Nemesis {
            what: what.to_owned(),
            detail,
        });
    }
}

/// How long a watcher waits for any byte (heartbeats come every second in
/// these runs) before it counts the connection as cut.
pub const SILENCE: Duration = Duration::from_secs(10);

/// A raw SSE watcher of `stream`: connects to `urls[first]`, reads with the
/// protocol's decoder and records everything; after every disconnect
/// (cut, retryable error, `stream_deleted`) it resumes with `Last-Event-ID`
/// (on the next node after a cut). Ends at `jobcast.end`, or at `deadline`,
/// or after `MAX` connections.
pub async fn raw_watcher(
    h: Arc<History>,
    w: usize,
    client: reqwest::Client,
    stream: String,
    urls: Vec<String>,
    first: usize,
    deadline: Instant,
) {
    const MAX: usize = 5_000;
    let mut last_id: Option<String> = None;
    let mut node = first;
    let closed = |why: String| Op::Closed { watcher: w, why };
    for _ in 0..MAX {
        if Instant::now() >= deadline {
            h.record(closed("deadline: gave up".into()));
            return;
        }
        let url = &urls[node % urls.len()];
        h.record(Op::Connect {
            watcher: w,
            node: url.clone(),
            resume: last_id.clone(),
        });
        // Waits for a stream that does not exist (yet, or again after a delete).
        let req = client.get(format!("{url}/v1/streams/{stream}/events?wait=120"));
        match sse::open(req, last_id.as_deref(), &[], SILENCE).await {
            Err(Close::Cut(why)) => {
                h.record(closed(why));
                node += 1;
            }
            Err(Close::Error(payload)) => h.record(Op::Error {
                watcher: w,
                payload,
            }),
            Err(Close::End) => unreachable!("open does not read"),
            Ok(mut res) => loop {
                let frame = match res.next_frame_within(SILENCE).await {
                    Err(_) => {
                        h.record(closed(format!("nothing within {SILENCE:?}")));
                        node += 1;
                        break;
                    }
                    Ok(None) => {
                        h.record(closed("the response ended".into()));
                        node += 1;
                        break;
                    }
                    Ok(Some(Frame::Event(e))) => e,
                    Ok(Some(_)) => continue,
                };
                let json = || {
                    serde_json::from_str(&frame.data).unwrap_or(Value::String(frame.data.clone()))
                };
                match frame.event.as_str() {
                    "jobcast.end" => {
                        h.record(Op::End {
                            watcher: w,
                            id: frame.last_event_id.clone(),
                            payload: json(),
                        });
                        return;
                    }
                    "jobcast.error" => {
                        h.record(Op::Error {
                            watcher: w,
                            payload: json(),
                        });
                        break;
                    }
                    "jobcast.reset" => {
                        let payload = json();
                        // The server's position: resumed from there.
                        last_id = payload["resumed_from"].as_str().map(str::to_owned);
                        h.record(Op::Reset {
                            watcher: w,
                            payload,
                        });
                    }
                    _ => {
                        h.record(Op::Event {
                            watcher: w,
                            id: if frame.id_set {
                                frame.last_event_id.clone()
                            } else {
                                String::new()
                            },
                            event_type: frame.event.clone(),
                            data: frame.data.clone(),
                        });
                        last_id = Some(frame.last_event_id.clone());
                    }
                }
            },
        }
        tokio::time::sleep(Duration::from_millis(100 + (w as u64 * 37) % 200)).await;
    }
    h.record(closed(format!("gave up after {MAX} connections")));
}

/// A watcher that is what users run: `jobcast_client::Client::watch` on the
/// node at `url`, from the start. When a watch ends with an error (e.g.
/// `stream_deleted`, or giving up) a new one starts after the last event
/// delivered, as an application would. Ends at `jobcast.end` or `deadline`.
pub async fn client_watcher(
    h: Arc<History>,
    w: usize,
    url: String,
    stream: String,
    deadline: Instant,
) {
    use jobcast_client::{Item, Start};
    let client = jobcast_client::Client::builder(&url)
        .backoff(Duration::from_millis(100), Duration::from_secs(1))
        .read_timeout(SILENCE)
        .healthy_after(Duration::from_secs(1))
        .give_up_after(Duration::from_secs(60))
        .build()
        .expect("client");
    let mut last: Option<EventId> = None;
    for _ in 0..200 {
        h.record(Op::Connect {
            watcher: w,
            node: url.clone(),
            resume: last.as_ref().map(EventId::to_string),
        });
        let start = match &last {
            Some(id) => Start::After(id.clone()),
            None => Start::Beginning,
        };
        let mut watch = client.watch(&stream, start);
        loop {
            let item = match tokio::time::timeout_at(deadline, watch.next()).await {
                Err(_) => {
                    h.record(Op::Closed {
                        watcher: w,
                        why: "deadline: gave up".into(),
                    });
                    return;
                }
                Ok(item) => item,
            };
            match item {
                None => {
                    h.record(Op::Closed {
                        watcher: w,
                        why: "the watch ended without an item".into(),
                    });
                    break;
                }
                Some(Ok(Item::Event(e))) => {
                    h.record(Op::Event {
                        watcher: w,
                        id: e.id.to_string(),
                        event_type: e.event_type.clone(),
                        data: e.data.clone(),
                    });
                    last = Some(e.id);
                }
                Some(Ok(Item::Reset(r))) => {
                    last = r
                        .resumed_from
                        .as_deref()
                        .and_then(|id| EventId::parse(id).ok());
                    h.record(Op::Reset {
                        watcher: w,
                        payload: serde_json::to_value(&r).expect("reset JSON"),
                    });
                }
                Some(Ok(Item::End(end))) => {
                    h.record(Op::End {
                        watcher: w,
                        id: end.id.as_ref().map(EventId::to_string).unwrap_or_default(),
                        payload: serde_json::to_value(&end.payload).expect("end JSON"),
                    });
                    return;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    h.record(Op::Error {
                        watcher: w,
                        payload: serde_json::json!({
                            "code": e.code().unwrap_or("client_error"),
                            "message": e.to_string(),
                        }),
                    });
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What every producer does: append to `streams` until `until`, single events
/// and batches of 2 and 3, each with its own Idempotency-Key.
#[derive(Debug, Clone)]
pub struct Producing {
    pub streams: Vec<String>,
    pub urls: Vec<String>,
    pub until: Instant,
    /// Between two appends.
    pub pause: Duration,
}

impl Producing {
    /// Append number `i` of producer `p`: its stream, key and tokens (`n`
    /// counts the producer's events).
    fn next(&self, p: usize, i: usize, n: &mut usize) -> (String, String, Vec<String>) {
        let stream = self.streams[(p + i) % self.streams.len()].clone();
        let size = 1 + (p * 7 + i) % 3;
        let tokens = (0..size)
            .map(|_| {
                *n += 1;
                format!("p{p}-{n}")
            })
            .collect();
        (stream, format!("p{p}-a{i}"), tokens)
    }
}

/// The body of an append: one event, or a batch.
fn append_body(tokens: &[String]) -> Value {
    let events: Vec<Value> = tokens
        .iter()
        .map(|t| serde_json::json!({ "data": t }))
        .collect();
    match events.as_slice() {
        [one] => one.clone(),
        _ => Value::from(events),
    }
}

/// A producer with raw HTTP: each append tried up to 10 times with its
/// Idempotency-Key, each time on the next node, 5 s per attempt. Returns how
/// many appends it made.
pub async fn raw_producer(
    h: Arc<History>,
    p: usize,
    client: reqwest::Client,
    cfg: Producing,
) -> usize {
    let mut n = 0;
    for i in 0..1_000_000 {
        if Instant::now() >= cfg.until {
            return i;
        }
        let (stream, key, tokens) = cfg.next(p, i, &mut n);
        let body = append_body(&tokens).to_string();
        h.record(Op::Invoke {
            producer: p,
            stream: stream.clone(),
            key: key.clone(),
            tokens,
        });
        let mut outcome = None;
        for attempt in 0..10u32 {
            let url = &cfg.urls[(p + attempt as usize) % cfg.urls.len()];
            let res = client
                .post(format!("{url}/v1/streams/{stream}/events"))
                .header("content-type", "application/json")
                .header("idempotency-key", &key)
                .timeout(Duration::from_secs(5))
                .body(body.clone())
                .send()
                .await;
            let (status, why) = match res {
                Ok(res) => {
                    let status = res.status().as_u16();
                    let v: Value = res.json().await.unwrap_or_default();
                    if status == 201 {
                        let id = |k: &str| v[k].as_str().and_then(|s| EventId::parse(s).ok());
                        match (id("first_id"), id("last_id")) {
                            (Some(first), Some(last)) => {
                                outcome = Some(Op::Ok {
                                    key: key.clone(),
                                    first,
                                    last,
                                })
                            }
                            _ => {
                                outcome = Some(Op::Fail {
                                    key: key.clone(),
                                    definite: false,
                                    why: format!("201 without ids: {v}"),
                                })
                            }
                        }
                        break;
                    }
                    let code = v["error"]["code"].as_str().unwrap_or("").to_owned();
                    if (400..500).contains(&status) && status != 408 && status != 429 {
                        outcome = Some(Op::Fail {
                            key: key.clone(),
                            definite: true,
                            why: format!("{status} {code}"),
                        });
                        break;
                    }
                    (status, code)
                }
                Err(e) => (0, e.to_string()),
            };
            h.record(Op::Attempt {
                key: key.clone(),
                status,
                why,
            });
            tokio::time::sleep(Duration::from_millis((100 << attempt).min(1000))).await;
        }
        h.record(outcome.unwrap_or(Op::Fail {
            key,
            definite: false,
            why: "no answer after 10 attempts".into(),
        }));
        tokio::time::sleep(cfg.pause).await;
    }
    1_000_000
}

/// A producer with the real `jobcast_client` on `urls[p % len]`: its
/// `append_with_key` retries (network errors, 5xx) with the key by itself.
pub async fn client_producer(h: Arc<History>, p: usize, cfg: Producing) -> usize {
    use jobcast_client::{Error, NewEvent, RetryPolicy};
    let url = &cfg.urls[p % cfg.urls.len()];
    let client = jobcast_client::Client::builder(url)
        .backoff(Duration::from_millis(100), Duration::from_secs(1))
        .request_timeout(Duration::from_secs(5))
        .connect_timeout(Duration::from_secs(2))
        .retry(RetryPolicy {
            max_attempts: 10,
            max_elapsed: Duration::from_secs(20),
        })
        .build()
        .expect("client");
    let mut n = 0;
    for i in 0..1_000_000 {
        if Instant::now() >= cfg.until {
            return i;
        }
        let (stream, key, tokens) = cfg.next(p, i, &mut n);
        let events: Vec<NewEvent> = tokens.iter().map(|t| NewEvent::text(t.as_str())).collect();
        h.record(Op::Invoke {
            producer: p,
            stream: stream.clone(),
            key: key.clone(),
            tokens,
        });
        let op = match client.append_with_key(&stream, &events, &key).await {
            Ok(a) => Op::Ok {
                key,
                first: a.first_id,
                last: a.last_id,
            },
            Err(e) => {
                let definite = matches!(&e, Error::Api { status, .. }
                    if (400..500).contains(status) && *status != 408 && *status != 429);
                Op::Fail {
                    key,
                    definite,
                    why: e.to_string(),
                }
            }
        };
        h.record(op);
        tokio::time::sleep(cfg.pause).await;
    }
    1_000_000
}

/// What the checker found.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub appends_acked: usize,
    pub events_acked: usize,
    pub appends_indeterminate: usize,
    pub indeterminate_appeared: usize,
    pub appends_refused: usize,
    /// Log events delivered to watchers, counted per watcher.
    pub deliveries: usize,
    /// Distinct (epoch, seq) delivered.
    pub distinct_events: usize,
    /// Acknowledged events a watcher that followed their epoch to its end did
    /// not get, plus acknowledged events missing from the store's final log.
    pub lost: usize,
    /// Events a watcher got twice, plus events stored twice (one token at
    /// two seqs of an epoch).
    pub duplicated: usize,
    /// Events of a deleted epoch that a watcher did not get because the
    /// delete ended its watch first (allowed).
    pub cut_by_delete: usize,
    pub watchers: usize,
    pub connections: usize,
    pub resets: usize,
    /// `jobcast.error` codes (and error answers) received, by code.
    pub errors: BTreeMap<String, usize>,
    /// Connections cut without a control event.
    pub cuts: usize,
    pub faults: BTreeMap<String, usize>,
    pub epochs: usize,
    /// Everything that breaks a guarantee (empty when the run is good).
    pub violations: Vec<String>,
    /// Allowed but worth knowing (events cut off by a delete).
    pub notes: Vec<String>,
}

impl Report {
    fn violation(&mut self, v: String) {
        self.violations.push(v);
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "appends acked {} ({} events), indeterminate {} (appeared {}), refused {}",
            self.appends_acked,
            self.events_acked,
            self.appends_indeterminate,
            self.indeterminate_appeared,
            self.appends_refused
        )?;
        writeln!(
            f,
            "deliveries {} ({} distinct events in {} epochs) to {} watchers over {} connections \
             ({} reconnects)",
            self.deliveries,
            self.distinct_events,
            self.epochs,
            self.watchers,
            self.connections,
            self.connections.saturating_sub(self.watchers)
        )?;
        writeln!(
            f,
            "lost {}, duplicated {}, cut by a delete {}",
            self.lost, self.duplicated, self.cut_by_delete
        )?;
        writeln!(
            f,
            "resets {}, cuts {}, errors {:?}",
            self.resets, self.cuts, self.errors
        )?;
        writeln!(f, "faults {:?}", self.faults)?;
        for n in self.notes.iter().take(20) {
            writeln!(f, "note: {n}")?;
        }
        write!(f, "violations {}", self.violations.len())?;
        for v in self.violations.iter().take(40) {
            write!(f, "\n  {v}")?;
        }
        if self.violations.len() > 40 {
            write!(f, "\n  … and {} more", self.violations.len() - 40)?;
        }
        Ok(())
    }
}

/// A stream's log as the store has it at the end: (epoch, data of seq 1, 2, …)
/// of its final epoch, `jobcast.end` excluded.
pub type FinalLog = (String, Vec<String>);

/// Checks a history (see the module docs). `finals`: the store's final log
/// of each stream.
pub fn check(
    entries: &[Entry],
    watchers: &[WatcherInfo],
    finals: &HashMap<String, FinalLog>,
) -> Report {
    let mut r = Report {
        watchers: watchers.len(),
        ..Report::default()
    };
    // The producers' side: what was attempted, acknowledged, refused.
    let mut invoked: HashMap<&str, (&str, &[String])> = HashMap::new();
    let mut attempted: HashSet<&str> = HashSet::new();
    let mut acked_at: HashMap<(String, u64), &str> = HashMap::new();
    let mut acked_token: HashMap<&str, (String, u64)> = HashMap::new();
    let mut undecided: Vec<&[String]> = Vec::new();
    let mut refused: Vec<&[String]> = Vec::new();
    // When each (epoch, seq) was acknowledged, and when deletes were sent.
    let mut acked_when: HashMap<(String, u64), Duration> = HashMap::new();
    let mut deletes: Vec<Duration> = Vec::new();
    for e in entries {
        match &e.op {
            Op::Invoke {
                stream,
                key,
                tokens,
                ..
            } => {
                invoked.insert(key, (stream, tokens));
                attempted.extend(tokens.iter().map(String::as_str));
            }
            Op::Ok { key, first, last } => {
                r.appends_acked += 1;
                let Some((_, tokens)) = invoked.get(key.as_str()) else {
                    r.violation(format!("ack of {key}, never invoked"));
                    continue;
                };
                if first.epoch != last.epoch || last.seq + 1 - first.seq != tokens.len() as u64 {
                    r.violation(format!(
                        "{key}: {} events acked as {first}..{last}",
                        tokens.len()
                    ));
                    continue;
                }
                for (i, t) in tokens.iter().enumerate() {
                    let at = (first.epoch.clone(), first.seq + i as u64);
                    r.events_acked += 1;
                    acked_when.insert(at.clone(), e.at);
                    if let Some(other) = acked_at.insert(at.clone(), t) {
                        r.violation(format!("{}-{} acked for {other} and for {t}", at.0, at.1));
                    }
                    if let Some(p) = acked_token.insert(t, at.clone()) {
                        r.violation(format!(
                            "{t} acked twice: {}-{} and {}-{}",
                            p.0, p.1, at.0, at.1
                        ));
                    }
                }
            }
            Op::Fail { key, definite, .. } => {
                let tokens = invoked.get(key.as_str()).map(|(_, t)| *t).unwrap_or(&[]);
                if *definite {
                    r.appends_refused += 1;
                    refused.push(tokens);
                } else {
                    r.appends_indeterminate += 1;
                    undecided.push(tokens);
                }
            }
            Op::Nemesis { what, .. } => {
                *r.faults.entry(what.clone()).or_default() += 1;
                if what == "delete" {
                    deletes.push(e.at);
                }
            }
            _ => {}
        }
    }

    // What each (epoch, seq) holds, as delivered (every watcher must agree)
    // and as the store's final log has it.
    let mut content: HashMap<(String, u64), String> = HashMap::new();
    for (stream, (epoch, log)) in finals {
        for (i, data) in log.iter().enumerate() {
            content.insert((epoch.clone(), i as u64 + 1), data.clone());
        }
        // Durability: every acknowledged event of the final epoch is in the store.
        for ((e, s), t) in &acked_at {
            if e == epoch && log.get(*s as usize - 1).map(String::as_str) != Some(*t) {
                r.lost += 1;
                r.violation(format!(
                    "{stream}: acked {e}-{s} ({t}) is not in the store's log"
                ));
            }
        }
    }

    let mut by_watcher: Vec<Vec<(Duration, &Op)>> = vec![Vec::new(); watchers.len()];
    for e in entries {
        let w = match &e.op {
            Op::Connect { watcher, .. }
            | Op::Event { watcher, .. }
            | Op::Reset { watcher, .. }
            | Op::Error { watcher, .. }
            | Op::End { watcher, .. }
            | Op::Closed { watcher, .. } => *watcher,
            _ => continue,
        };
        by_watcher[w].push((e.at, &e.op));
    }
    let mut epochs: HashSet<String> = HashSet::new();
    let mut final_end: HashMap<&str, String> = HashMap::new();
    for (w, ops) in by_watcher.iter().enumerate() {
        let info = &watchers[w];
        let name = format!("{} ({})", info.name, info.stream);
        // Within one connection: the position (epoch, seq) the next event
        // must follow; None: the start of whatever epoch comes.
        let mut pos: Option<(String, u64)> = None;
        let mut resume: Option<String> = None;
        let mut events_on_conn = 0usize;
        let mut seen: HashMap<(String, u64), u32> = HashMap::new();
        let mut ended: Option<(String, u64)> = None;
        // How it left each epoch: "stream_deleted" or "a reset".
        // (and since when its connection was open).
        let mut exits: HashMap<String, (&str, Duration)> = HashMap::new();
        let follows = |pos: &Option<(String, u64)>,
                       epoch: &str,
                       seq: u64,
                       what: &str,
                       r: &mut Report| {
            match pos {
            Some((pe, ps)) if pe != epoch => r.violation(format!(
                "{name}: {what} {epoch}-{seq} after {pe}-{ps} on one connection, without a jobcast.reset"
            )),
            Some((_, ps)) if seq <= *ps => r.violation(format!(
                "{name}: {what} {epoch}-{seq} after {epoch}-{ps}: out of order or repeated"
            )),
            Some((_, ps)) if seq > ps + 1 => r.violation(format!(
                "{name}: {what} {epoch}-{seq} after {epoch}-{ps}: seqs {}..{} skipped",
                ps + 1,
                seq - 1
            )),
            None if seq != 1 => r.violation(format!(
                "{name}: {what} {epoch}-{seq} first from the start: seqs 1..{} skipped",
                seq - 1
            )),
            _ => {}
        }
        };
        let mut conn_start = Duration::ZERO;
        for &(op_at, op) in ops {
            if let Some((e, s)) = &ended {
                r.violation(format!("{name}: {op:?} after the end {e}-{s}"));
                break;
            }
            match op {
                Op::Connect { resume: res, .. } => {
                    conn_start = op_at;
                    r.connections += 1;
                    events_on_conn = 0;
                    resume = res.clone();
                    pos = res.as_deref().map(|id| {
                        let id = EventId::parse(id).expect("a resume id the watcher got");
                        (id.epoch, id.seq)
                    });
                }
                Op::Reset { payload, .. } => {
                    r.resets += 1;
                    if let Some((e, _)) = &pos {
                        exits.entry(e.clone()).or_insert(("a reset", conn_start));
                    }
                    if info.kind == Kind::Raw {
                        if events_on_conn > 0 {
                            r.violation(format!(
                                "{name}: jobcast.reset after {events_on_conn} events: {payload}"
                            ));
                        }
                        if payload["requested"].as_str() != resume.as_deref() {
                            r.violation(format!(
                                "{name}: jobcast.reset {payload} when resuming after {resume:?}"
                            ));
                        }
                    }
                    pos = match payload["resumed_from"].as_str().map(EventId::parse) {
                        Some(Ok(id)) => Some((id.epoch, id.seq)),
                        Some(Err(_)) => {
                            r.violation(format!(
                                "{name}: a reset with a bad resumed_from: {payload}"
                            ));
                            None
                        }
                        None => None,
                    };
                }
                Op::Event {
                    id,
                    event_type,
                    data,
                    ..
                } => {
                    r.deliveries += 1;
                    events_on_conn += 1;
                    let Ok(id) = EventId::parse(id) else {
                        r.violation(format!("{name}: an event with the id {id:?} ({data})"));
                        continue;
                    };
                    if event_type != "message" {
                        r.violation(format!("{name}: {id} has the type {event_type:?}"));
                    }
                    if !attempted.contains(data.as_str()) {
                        r.violation(format!(
                            "{name}: {id} holds {data:?}, which no producer appended"
                        ));
                    }
                    let at = (id.epoch.clone(), id.seq);
                    match content.get(&at) {
                        Some(c) if c != data => {
                            r.violation(format!("{name}: {id} holds {data:?}, elsewhere {c:?}"))
                        }
                        Some(_) => {}
                        None => {
                            content.insert(at.clone(), data.clone());
                        }
                    }
                    if let Some(t) = acked_at.get(&at) {
                        if t != data {
                            r.violation(format!("{name}: {id} holds {data:?}, acked as {t:?}"));
                        }
                    }
                    follows(&pos, &id.epoch, id.seq, "event", &mut r);
                    let n = seen.entry(at.clone()).or_default();
                    *n += 1;
                    if *n > 1 {
                        r.duplicated += 1;
                        r.violation(format!("{name}: {id} delivered {n} times"));
                    }
                    epochs.insert(id.epoch.clone());
                    pos = Some(at);
                }
                Op::End { id: end_id, .. } => {
                    let Ok(id) = EventId::parse(end_id) else {
                        r.violation(format!("{name}: jobcast.end with the id {end_id:?}"));
                        continue;
                    };
                    follows(&pos, &id.epoch, id.seq, "jobcast.end", &mut r);
                    ended = Some((id.epoch, id.seq));
                }
                Op::Error { payload, .. } => {
                    let code = payload["code"]
                        .as_str()
                        .or(payload["error"]["code"].as_str())
                        .unwrap_or("?");
                    *r.errors.entry(code.to_owned()).or_default() += 1;
                    if let (Some((e, _)), "stream_deleted") = (&pos, code) {
                        exits
                            .entry(e.clone())
                            .or_insert(("stream_deleted", conn_start));
                    }
                }
                Op::Closed { why, .. } => {
                    r.cuts += 1;
                    if why.starts_with("deadline") || why.starts_with("gave up") {
                        r.violation(format!("{name}: {why}"));
                    }
                }
                _ => {}
            }
        }
        // Lost: acknowledged events of the epoch it followed to the end
        // that it did not get.
        let Some((epoch, end)) = ended else {
            r.violation(format!("{name}: no jobcast.end"));
            continue;
        };
        match final_end.get(info.stream.as_str()) {
            Some(other) if *other != format!("{epoch}-{end}") => r.violation(format!(
                "{name}: ended at {epoch}-{end}, another watcher at {other}"
            )),
            _ => {
                final_end.insert(&info.stream, format!("{epoch}-{end}"));
            }
        }
        for seq in 1..end {
            let at = (epoch.clone(), seq);
            if !seen.contains_key(&at) && acked_at.contains_key(&at) {
                r.lost += 1;
                r.violation(format!(
                    "{name}: acked {epoch}-{seq} ({}) never delivered",
                    acked_at[&at]
                ));
            }
        }
        // Epochs it left before their end (a delete ends them, and the
        // continuity checks above hold it to a gap-free prefix of each).
        let left: HashSet<&str> = seen
            .keys()
            .map(|(e, _)| e.as_str())
            .filter(|e| *e != epoch)
            .collect();
        // Acked events below the last seq it got of such an epoch are lost
        // (the continuity checks name the gap); those after it were cut
        // off by the delete.
        for e in left {
            let last = seen
                .keys()
                .filter(|(se, _)| se == e)
                .map(|(_, s)| *s)
                .max()
                .unwrap_or(0);
            let (mut within, mut after) = (0, 0);
            for (ae, s) in acked_at.keys() {
                if ae == e && !seen.contains_key(&(ae.clone(), *s)) {
                    if *s < last {
                        within += 1;
                    } else {
                        after += 1;
                    }
                }
            }
            r.lost += within;
            if after > 0 {
                r.cut_by_delete += after;
                let (how, since) = exits.get(e).copied().unwrap_or(("?", Duration::ZERO));
                // The delete that ended the epoch: the first sent after its first ack.
                let born = acked_when
                    .iter()
                    .filter(|((ae, _), _)| ae == e)
                    .map(|(_, t)| *t)
                    .min()
                    .unwrap_or_default();
                let deleted = deletes.iter().copied().find(|d| *d > born);
                // Acked before that delete was sent, on a connection open before it.
                let before = match deleted {
                    Some(d) if since < d => acked_when
                        .iter()
                        .filter(|((ae, s), t)| {
                            ae == e && **t < d && !seen.contains_key(&(ae.clone(), *s))
                        })
                        .count(),
                    _ => 0,
                };
                // A client watcher's "connection" is its watch(), which
                // reconnects inside: it may have been away across the delete.
                let opened = match info.kind {
                    Kind::Raw => "connection opened",
                    Kind::Client => "watch() started",
                };
                r.notes.push(format!(
                    "{name}: left epoch {e} after seq {last} by {how} ({opened} at \
                     {:.3}s, delete sent at {}); {after} later acked events of it not delivered, \
                     {before} of them acked before the delete was sent",
                    since.as_secs_f64(),
                    deleted.map_or("?".into(), |d| format!("{:.3}s", d.as_secs_f64()))
                ));
            }
        }
    }
    for (stream, (epoch, _)) in finals {
        if let Some(end) = final_end.get(stream.as_str()) {
            if !end.starts_with(&format!("{epoch}-")) {
                r.violation(format!(
                    "{stream}: watchers ended at {end}, the store's final epoch is {epoch}"
                ));
            }
        }
    }
    r.distinct_events = content.len();
    r.epochs = epochs.len();

    // Each token at most once per epoch (a retried append stored twice, or
    // an acked event repeated at another seq).
    let mut places: HashMap<(&str, &str), Vec<u64>> = HashMap::new();
    for ((epoch, seq), data) in &content {
        places.entry((epoch, data)).or_default().push(*seq);
    }
    for ((epoch, data), seqs) in &places {
        if seqs.len() > 1 {
            r.duplicated += seqs.len() - 1;
            r.violation(format!(
                "{data} stored {} times in epoch {epoch}: seqs {seqs:?}",
                seqs.len()
            ));
        }
    }
    let appeared: HashSet<&str> = content.values().map(String::as_str).collect();
    // Refused appends left nothing; an indeterminate one all or nothing.
    for tokens in &refused {
        if let Some(t) = tokens.iter().find(|t| appeared.contains(t.as_str())) {
            r.violation(format!("{t} appeared though its append was refused"));
        }
    }
    for tokens in &undecided {
        let n = tokens
            .iter()
            .filter(|t| appeared.contains(t.as_str()))
            .count();
        if n > 0 {
            r.indeterminate_appeared += 1;
        }
        if n != 0 && n != tokens.len() {
            r.violation(format!("only {n} of the batch {tokens:?} appeared"));
        }
    }
    r
}
