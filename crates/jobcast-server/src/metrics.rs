//! Prometheus metrics (`GET /metrics`), `jobcast_` prefix, units in names.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Why a watch connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// `jobcast.end` was sent.
    End,
    /// The client went away, or a write failed or timed out.
    ClientGone,
    /// `--max-duration` reached.
    MaxDuration,
    /// The server is shutting down.
    Shutdown,
    /// The stream was deleted.
    Deleted,
    /// The stream did not appear within the wait.
    NotFound,
    /// The store failed for too long.
    StoreUnavailable,
    /// The watcher fell behind retention.
    Lagged,
    /// The watcher's token expired.
    TokenExpired,
}

impl CloseReason {
    fn label(self) -> &'static str {
        match self {
            CloseReason::End => "end",
            CloseReason::ClientGone => "client_gone",
            CloseReason::MaxDuration => "max_duration",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Deleted => "deleted",
            CloseReason::NotFound => "not_found",
            CloseReason::StoreUnavailable => "store_unavailable",
            CloseReason::Lagged => "lagged",
            CloseReason::TokenExpired => "token_expired",
        }
    }
}

/// How a watch started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResumeOutcome {
    /// No resume point: the whole log (or live).
    FromStart,
    /// Continued after the client's id.
    Resumed,
    /// A `jobcast.reset` was sent.
    Reset,
    /// Answered 204: the client already had the end.
    NoContent,
}

/// A stage of an append on its way from the request to a watcher's
/// connection (`jobcast_append_stage_seconds{stage=…}`): each is the time
/// from the end of the stage before to the end of this one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// The handler read and validated the body (`parse`).
    Parse,
    /// Handed to the writer until the writer took it (`queue`).
    Queue,
    /// Taken by the writer until its transaction committed (`commit`).
    Commit,
    /// Committed until published to the hub (encoding included; `publish`).
    Publish,
    /// Published until the handler had its answer (`reply`).
    Reply,
    /// Published until a watcher's connection was handed the batch
    /// (`deliver`; live ring batches only).
    Deliver,
}

impl Stage {
    const ALL: [Stage; 6] = [
        Stage::Parse,
        Stage::Queue,
        Stage::Commit,
        Stage::Publish,
        Stage::Reply,
        Stage::Deliver,
    ];

    fn label(self) -> &'static str {
        match self {
            Stage::Parse => "parse",
            Stage::Queue => "queue",
            Stage::Commit => "commit",
            Stage::Publish => "publish",
            Stage::Reply => "reply",
            Stage::Deliver => "deliver",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabel {
    stage: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProtoLabel {
    proto: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Kind {
    kind: &'static str,
}

/// What a store query was for (the `kind` of `jobcast_store_queries_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QueryKind {
    /// A stream's metadata, for a watcher or a request.
    Meta,
    /// A page of events, for a watcher, a long-poll or a request.
    Page,
    /// A page the listener read after another node's wake-up.
    ListenerPage,
    /// A page (with its metadata) the listener read to re-sync a watched
    /// stream after its connection was re-established.
    Resync,
}

impl QueryKind {
    fn label(self) -> &'static str {
        match self {
            QueryKind::Meta => "meta",
            QueryKind::Page => "page",
            QueryKind::ListenerPage => "listener_page",
            QueryKind::Resync => "resync",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: &'static str,
}

/// Every metric the server keeps; a cheap handle.
#[derive(Debug, Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
    watchers: Gauge,
    opened: Counter,
    closed: Family<Reason, Counter>,
    appended: Counter,
    delivered: Counter,
    replayed: Counter,
    slow_fallbacks: Counter,
    resumes: Family<Outcome, Counter>,
    store_errors: Counter,
    write_timeouts: Counter,
    refused: Family<Reason, Counter>,
    accepted: Family<ProtoLabel, Counter>,
    append_seconds: Histogram,
    publish_to_write_seconds: Histogram,
    /// One histogram per [`Stage`] (index: its place in [`Stage::ALL`]),
    /// taken from the family once, so recording takes no family lock.
    stages: [Histogram; 6],
    memory_used: Gauge,
    memory_limit: Gauge,
    page_reads: Counter,
    queries: Family<Kind, Counter>,
    notify_queue: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every family registered.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("jobcast");
        let watchers = Gauge::default();
        let opened = Counter::default();
        let closed = Family::<Reason, Counter>::default();
        let appended = Counter::default();
        let delivered = Counter::default();
        let replayed = Counter::default();
        let slow_fallbacks = Counter::default();
        let resumes = Family::<Outcome, Counter>::default();
        let store_errors = Counter::default();
        let write_timeouts = Counter::default();
        let refused = Family::<Reason, Counter>::default();
        let accepted = Family::<ProtoLabel, Counter>::default();
        // 50 µs .. ~26 s
        let append_seconds = Histogram::new(exponential_buckets(0.000_05, 2.0, 20));
        let publish_to_write_seconds = Histogram::new(exponential_buckets(0.000_01, 2.0, 22));
        let stage_family =
            Family::<StageLabel, Histogram, fn() -> Histogram>::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.000_001, 2.0, 24))
            });
        let stages = Stage::ALL.map(|s| {
            stage_family
                .get_or_create(&StageLabel { stage: s.label() })
                .clone()
        });
        registry.register(
            "append_stage_seconds",
            "Time an append spends in each stage: parse, queue (to the writer), commit, publish (to the hub), reply (to the handler), deliver (publish to a watcher's connection)",
            stage_family,
        );
        registry.register("watchers", "SSE watchers connected", watchers.clone());
        registry.register(
            "connections_opened",
            "SSE watch connections opened",
            opened.clone(),
        );
        registry.register(
            "connections_closed",
            "SSE watch connections closed, by reason",
            closed.clone(),
        );
        registry.register(
            "events_appended",
            "Events committed to the store",
            appended.clone(),
        );
        registry.register(
            "events_delivered",
            "Events written to watchers",
            delivered.clone(),
        );
        registry.register(
            "events_replayed_from_store",
            "Events written to watchers from store pages",
            replayed.clone(),
        );
        registry.register(
            "slow_watcher_fallbacks",
            "Times a watcher fell out of the live ring and read the store",
            slow_fallbacks.clone(),
        );
        registry.register("resumes", "Watch starts, by outcome", resumes.clone());
        registry.register(
            "store_errors",
            "Store calls that failed",
            store_errors.clone(),
        );
        registry.register(
            "write_timeouts",
            "Connections dropped because the peer accepted no bytes in time",
            write_timeouts.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections answered 503/429 and closed at a connection limit, by limit",
            refused.clone(),
        );
        registry.register(
            "connections_accepted",
            "TCP connections admitted, by the protocol they spoke (http1, h2c, http1_tls, h2; none: closed before a request)",
            accepted.clone(),
        );
        let notify_queue = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "pg_notify_queue_usage_ratio",
            "PostgreSQL's NOTIFY queue usage (pg_notification_queue_usage(), 0..1) as this node's listener last saw it",
            notify_queue.clone(),
        );
        let page_reads = Counter::default();
        registry.register(
            "store_page_reads",
            "Pages of events read from the store (replay, catch-up, long-polls)",
            page_reads.clone(),
        );
        let queries = Family::<Kind, Counter>::default();
        registry.register(
            "store_queries",
            "Store reads, by kind: meta, page (watchers and requests), listener_page (after a wake-up), resync (after the listener reconnected)",
            queries.clone(),
        );
        let memory_used = Gauge::default();
        let memory_limit = Gauge::default();
        registry.register(
            "memory_used_bytes",
            "Bytes held in the memory budget: replay frames waiting for sockets, request bodies, rings",
            memory_used.clone(),
        );
        registry.register(
            "memory_budget_bytes",
            "The memory budget (--memory-budget)",
            memory_limit.clone(),
        );
        registry.register(
            "append_duration_seconds",
            "Time from receiving an append to its commit",
            append_seconds.clone(),
        );
        registry.register(
            "publish_to_write_seconds",
            "Time from publishing a batch to handing it to a watcher's connection",
            publish_to_write_seconds.clone(),
        );
        Metrics {
            inner: Arc::new(Inner {
                registry,
                watchers,
                opened,
                closed,
                appended,
                delivered,
                replayed,
                slow_fallbacks,
                resumes,
                store_errors,
                write_timeouts,
                refused,
                accepted,
                append_seconds,
                publish_to_write_seconds,
                stages,
                memory_used,
                memory_limit,
                page_reads,
                queries,
                notify_queue,
            }),
        }
    }

    /// The server's memory budget of `limit` bytes, reported here.
    pub fn memory_budget(&self, limit: usize) -> crate::budget::Budget {
        self.inner
            .memory_limit
            .set(limit.min(i64::MAX as usize) as i64);
        crate::budget::Budget::new(limit, self.inner.memory_used.clone())
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.inner.registry);
        out
    }

    /// A connection was refused at a limit (`server` or `per_ip`).
    pub fn connection_refused(&self, limit: &'static str) {
        self.inner
            .refused
            .get_or_create(&Reason { reason: limit })
            .inc();
    }

    /// A connection was admitted and spoke `proto` (`http1`, `h2c`,
    /// `http1_tls`, `h2`, or `none`).
    pub fn connection_accepted(&self, proto: &'static str) {
        self.inner
            .accepted
            .get_or_create(&ProtoLabel { proto })
            .inc();
    }

    /// A watch connection opened.
    pub fn watch_opened(&self) {
        self.inner.opened.inc();
        self.inner.watchers.inc();
    }

    /// A watch connection closed.
    pub fn watch_closed(&self, reason: CloseReason) {
        self.inner.watchers.dec();
        self.inner
            .closed
            .get_or_create(&Reason {
                reason: reason.label(),
            })
            .inc();
    }

    /// How a watch started.
    pub fn resume(&self, outcome: ResumeOutcome) {
        let outcome = match outcome {
            ResumeOutcome::FromStart => "from_start",
            ResumeOutcome::Resumed => "resumed",
            ResumeOutcome::Reset => "reset",
            ResumeOutcome::NoContent => "no_content",
        };
        self.inner.resumes.get_or_create(&Outcome { outcome }).inc();
    }

    /// Events committed, and how long the append took.
    pub fn appended(&self, events: u64, took: Duration) {
        self.inner.appended.inc_by(events);
        self.inner.append_seconds.observe(took.as_secs_f64());
    }

    /// Events written to a watcher; `from_store` when read from a store page.
    pub fn delivered(&self, events: u64, from_store: bool) {
        self.inner.delivered.inc_by(events);
        if from_store {
            self.inner.replayed.inc_by(events);
        }
    }

    /// A live batch reached a watcher's connection this long after publishing.
    pub fn publish_to_write(&self, took: Duration) {
        let took = took.as_secs_f64();
        self.inner.publish_to_write_seconds.observe(took);
        self.inner.stages[Stage::Deliver as usize].observe(took);
    }

    /// An append spent `took` in `stage`.
    pub fn stage(&self, stage: Stage, took: Duration) {
        self.inner.stages[stage as usize].observe(took.as_secs_f64());
    }

    /// A watcher fell out of the ring and reads the store.
    pub fn slow_fallback(&self) {
        self.inner.slow_fallbacks.inc();
    }

    /// PostgreSQL's NOTIFY queue usage, 0..1.
    pub fn notify_queue_usage(&self, usage: f64) {
        self.inner.notify_queue.set(usage);
    }

    /// A page of events was read from the store.
    pub fn page_read(&self) {
        self.inner.page_reads.inc();
    }

    /// A store read of `kind` was made.
    pub fn store_query(&self, kind: QueryKind) {
        self.inner
            .queries
            .get_or_create(&Kind { kind: kind.label() })
            .inc();
    }

    /// A store call failed.
    pub fn store_error(&self) {
        self.inner.store_errors.inc();
    }

    /// Passes a store result through, counting it when it is an error.
    pub fn counted<T, E>(&self, r: Result<T, E>) -> Result<T, E> {
        if r.is_err() {
            self.store_error();
        }
        r
    }

    /// A connection was dropped by the write timeout.
    pub fn write_timeout(&self) {
        self.inner.write_timeouts.inc();
    }

    /// The current value of the watchers gauge.
    pub fn watchers(&self) -> i64 {
        self.inner.watchers.get()
    }
}
