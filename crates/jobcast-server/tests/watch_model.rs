//! The model test of the watch machine (issue 12): a seeded simulation that
//! drives the real [`Hub`] and the real [`Watch`] machine against an
//! in-memory store, through random interleavings of appends and batches,
//! complete/fail, delete and recreate, trimming, two publishers out of order
//! (the writer and a lagging listener), listener loss and re-sync, store
//! outages, slow and stalled watchers (store reads whose snapshot and answer
//! come late), long-polls, every resume point, time, and shutdown.
//!
//! The checker: every connection's output is its resume point's suffix of
//! exactly one creation's log, each seq once, in order, then `jobcast.end`;
//! or a `jobcast.reset` at the right place; or a clear `jobcast.error`
//! whose cause really happened. Nothing hangs past its deadline.
//!
//! `JOBCAST_MODEL_CASES` (default 10 000) sets the number of cases;
//! `JOBCAST_MODEL_SEED` replays one case (the failure message names it).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jobcast_protocol::decode::{Decoder, Frame, SseEvent};
use jobcast_protocol::{ErrorPayload, EventId, ResetPayload, ResetReason, StreamState};
use jobcast_server::hub::{Batch, Hub, Subscription};
use jobcast_server::metrics::CloseReason;
use jobcast_server::store::{Page, StoreError, StoredEvent, StreamMeta};
use jobcast_server::watch::{Failure, Mode, PageAnswer, Resume, Settings, Step, Watch};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const IDS: [&str; 3] = ["a", "b", "c"];
const HEARTBEAT: Duration = Duration::from_secs(15);
const WAIT: Duration = Duration::from_secs(30);

/// One creation of a stream: its log as committed.
#[derive(Debug, Clone)]
struct Creation {
    key: i64,
    id: String,
    epoch: String,
    state: StreamState,
    /// `(type, data)` of seq 1, 2, …
    events: Vec<(String, String)>,
    first_seq: u64,
    deleted: bool,
}

impl Creation {
    fn head(&self) -> u64 {
        self.events.len() as u64
    }

    fn meta(&self) -> StreamMeta {
        StreamMeta {
            id: self.id.clone(),
            key: self.key,
            epoch: self.epoch.clone(),
            state: self.state,
            head: self.head(),
            first_seq: self.first_seq,
            created_at: 0,
            updated_at: 0,
            labels: Default::default(),
            cancel_requested: false,
        }
    }
}

/// What the listener of a node passes on, late and in any order.
#[derive(Debug, Clone)]
enum Remote {
    Batch(String, Arc<Batch>),
    Changed(String),
}

/// A store read in flight: issued, then its snapshot taken, then answered.
#[derive(Debug)]
enum Read {
    Meta(Option<Result<Option<StreamMeta>, StoreError>>),
    Page(u64, u32, Option<Result<Option<Page>, StoreError>>),
}

#[derive(Debug)]
enum State {
    Ready,
    Reading(Read),
    /// Registered for wake-ups when the hub's counters were these.
    Waiting {
        until: Instant,
        seen: (u64, u64, bool),
    },
    Done(End),
}

#[derive(Debug)]
enum End {
    Closed(CloseReason, Option<(String, u64)>),
    NoContent,
    Page(Box<PageAnswer>),
    Fail(String),
}

/// What the checker needs to know about the stream around a connection.
#[derive(Debug, Clone)]
struct Seen {
    /// The same at the first store snapshot.
    at_first_read: Option<Option<(String, u64, bool)>>,
    /// The seq before the first kept event at that snapshot (retention).
    oldest_at_first_read: u64,
}

struct Conn {
    id: String,
    mode: Mode,
    resume: Resume,
    sub: Subscription,
    w: Watch,
    state: State,
    out: Vec<u8>,
    seen: Seen,
    started: Instant,
    close_at: Instant,
    wait_until: Instant,
    /// SSE: reconnects left; page: requests left.
    again: u32,
    /// The client this connection belongs to (for reconnects).
    client: usize,
    /// The machine's last known position (epoch, seq).
    last_pos: Option<(String, u64)>,
    trace: Vec<String>,
}

struct Model {
    hub: Hub,
    rng: StdRng,
    creations: Vec<Creation>,
    current: HashMap<String, usize>,
    listener: Vec<Remote>,
    /// Whether commits reach the hub only through the (lagging) listener.
    remote_share: f64,
    failing: bool,
    ever_failed: bool,
    trimmed: bool,
    closed: bool,
    base: Instant,
    now: Instant,
    conns: Vec<Conn>,
    page_size: u32,
    max_duration: Duration,
    next_data: u64,
    log: Vec<String>,
}

fn injected() -> StoreError {
    StoreError::Unavailable("injected store fault".into())
}

impl Model {
    fn new(seed: u64) -> Model {
        let mut rng = StdRng::seed_from_u64(seed);
        let ring_bytes = *[64usize, 200, 1000, 1 << 20]
            .get(rng.random_range(0..4))
            .unwrap_or(&1000);
        let base = Instant::now();
        Model {
            hub: Hub::new(ring_bytes),
            remote_share: [0.0, 0.0, 0.5, 1.0][rng.random_range(0..4)],
            page_size: rng.random_range(1..6),
            max_duration: Duration::from_secs(rng.random_range(20..200)),
            rng,
            creations: Vec::new(),
            current: HashMap::new(),
            listener: Vec::new(),
            failing: false,
            ever_failed: false,
            trimmed: false,
            closed: false,
            base,
            now: base,
            conns: Vec::new(),
            next_data: 0,
            log: Vec::new(),
        }
    }

    fn note(&mut self, s: String) {
        self.log.push(format!("[{:?}] {s}", self.now - self.base));
    }

    // ---- the store ----

    fn meta(&self, id: &str) -> Result<Option<StreamMeta>, StoreError> {
        if self.failing {
            return Err(injected());
        }
        Ok(self.current.get(id).map(|&i| self.creations[i].meta()))
    }

    fn read(&self, id: &str, after: u64, limit: u32) -> Result<Option<Page>, StoreError> {
        if self.failing {
            return Err(injected());
        }
        Ok(self.current.get(id).map(|&i| {
            let c = &self.creations[i];
            let from = after.saturating_add(1).max(c.first_seq);
            let events = (from..=c.head())
                .take(limit as usize)
                .map(|seq| {
                    let (t, d) = &c.events[seq as usize - 1];
                    StoredEvent {
                        seq,
                        event_type: t.clone(),
                        data: d.clone(),
                        time: 0,
                    }
                })
                .collect();
            Page {
                meta: c.meta(),
                events,
            }
        }))
    }

    fn head_of(&self, id: &str) -> Option<(String, u64, bool)> {
        self.current.get(id).map(|&i| {
            let c = &self.creations[i];
            (c.epoch.clone(), c.head(), c.state != StreamState::Open)
        })
    }

    // ---- commits, and what the writer / listener tell the hub ----

    fn tell(&mut self, r: Remote) {
        if self.rng.random_bool(self.remote_share) {
            self.listener.push(r);
        } else {
            match r {
                Remote::Batch(id, b) => self.hub.publish(&id, b),
                Remote::Changed(id) => self.hub.changed(&id),
            }
        }
    }

    fn publish(&mut self, i: usize, first: u64) {
        let c = &self.creations[i];
        if !self.hub.is_watched(&c.id) {
            return;
        }
        let ends = c.state != StreamState::Open;
        let events: Vec<(String, String)> = c.events[first as usize - 1..].to_vec();
        let b = Arc::new(Batch::encode(
            c.key,
            &c.epoch,
            first,
            events.iter().map(|(t, d)| (t.as_str(), d.as_str())),
            ends,
        ));
        let id = c.id.clone();
        self.tell(Remote::Batch(id.clone(), b.clone()));
        // Sometimes both publishers pass the same batch on (a node's own
        // commit, echoed by its listener).
        if self.rng.random_bool(0.1) {
            self.listener.push(Remote::Batch(id, b));
        }
    }

    fn create(&mut self, id: &str) -> usize {
        let key = self.creations.len() as i64 + 1;
        self.creations.push(Creation {
            key,
            id: id.to_owned(),
            epoch: format!("e{key}"),
            state: StreamState::Open,
            events: Vec::new(),
            first_seq: 1,
            deleted: false,
        });
        let i = self.creations.len() - 1;
        self.current.insert(id.to_owned(), i);
        self.tell(Remote::Changed(id.to_owned()));
        i
    }

    fn append(&mut self, id: &str, n: usize) {
        let i = match self.current.get(id) {
            Some(&i) => i,
            None => self.create(id),
        };
        if self.creations[i].state != StreamState::Open {
            return;
        }
        let first = self.creations[i].head() + 1;
        for _ in 0..n {
            self.next_data += 1;
            let d = format!("d{}", self.next_data);
            self.creations[i].events.push(("message".into(), d));
        }
        self.note(format!(
            "append {id} {}..={}",
            first,
            self.creations[i].head()
        ));
        self.publish(i, first);
    }

    fn end(&mut self, id: &str, failed: bool) {
        let Some(&i) = self.current.get(id) else {
            return;
        };
        if self.creations[i].state != StreamState::Open {
            return;
        }
        let (state, data) = if failed {
            (StreamState::Failed, r#"{"state":"failed","error":"x"}"#)
        } else {
            (StreamState::Completed, r#"{"state":"completed"}"#)
        };
        let c = &mut self.creations[i];
        c.events.push(("jobcast.end".into(), data.into()));
        c.state = state;
        let seq = c.head();
        self.note(format!("end {id} at {seq}"));
        self.publish(i, seq);
    }

    fn delete(&mut self, id: &str) {
        let Some(i) = self.current.remove(id) else {
            return;
        };
        self.creations[i].deleted = true;
        let key = self.creations[i].key;
        self.note(format!("delete {id} (key {key})"));
        if self.rng.random_bool(self.remote_share) {
            self.listener.push(Remote::Changed(id.to_owned()));
        } else {
            self.hub.deleted(id, key);
        }
    }

    fn trim(&mut self, id: &str, keep: u64) {
        let Some(&i) = self.current.get(id) else {
            return;
        };
        let c = &mut self.creations[i];
        let first = (c.head() + 1).saturating_sub(keep).max(c.first_seq);
        if first > c.first_seq {
            c.first_seq = first;
            self.trimmed = true;
            self.note(format!("trim {id} to {first}.."));
        }
    }

    fn listener_step(&mut self) {
        if self.listener.is_empty() {
            return;
        }
        let i = self.rng.random_range(0..self.listener.len());
        match self.listener.remove(i) {
            Remote::Batch(id, b) => self.hub.publish(&id, b),
            Remote::Changed(id) => self.hub.changed(&id),
        }
    }

    /// The listener's connection drops: what it had not passed on is lost,
    /// and on reconnecting it re-syncs every watched stream.
    fn listener_loss(&mut self) {
        self.note("listener loss".into());
        self.listener.clear();
        for s in self.hub.watched() {
            self.hub.changed(&s);
        }
    }

    // ---- connections ----

    fn random_resume(&mut self, id: &str) -> Resume {
        let head = self.head_of(id);
        match self.rng.random_range(0..10) {
            0 | 1 => Resume::Start,
            2 | 3 => Resume::Live,
            4 => Resume::After(EventId::new("zz", self.rng.random_range(0..5))),
            // `tail:N`: 0 (live), inside the log, and past its length.
            8 | 9 => {
                let len = head.as_ref().map_or(0, |h| h.1);
                Resume::Tail(self.rng.random_range(0..=len + 3))
            }
            _ => {
                // A position in this or an earlier creation of the stream.
                let old: Vec<&Creation> = self.creations.iter().filter(|c| c.id == id).collect();
                let c = match (head, old.is_empty()) {
                    (_, true) => return Resume::Start,
                    (Some(_), _) if self.rng.random_bool(0.7) => &self.creations[self.current[id]],
                    _ => old[self.rng.random_range(0..old.len())],
                };
                let seq = self.rng.random_range(0..=c.head() + 2);
                Resume::After(EventId::new(c.epoch.clone(), seq))
            }
        }
    }

    fn open(&mut self, id: &str, mode: Mode, resume: Resume, client: usize, again: u32) {
        let sub = self.hub.subscribe(id);
        let wait = match mode {
            Mode::Sse => WAIT,
            Mode::Page { .. } => Duration::from_secs([0, 1, 5, 30][self.rng.random_range(0..4)]),
        };
        let close_at = self.now + self.max_duration;
        let settings = Settings {
            heartbeat: HEARTBEAT,
            close_at: match mode {
                Mode::Sse => close_at,
                Mode::Page { .. } => self.now + wait,
            },
            wait_until: self.now + wait,
            expires_at: None,
            store_retry_limit: Duration::from_secs(10),
            page_size: self.page_size,
        };
        let seen = Seen {
            at_first_read: None,
            oldest_at_first_read: 0,
        };
        let seed = self.rng.random();
        let w = Watch::new(mode, resume.clone(), settings, self.now, seed);
        let n = self.conns.len();
        self.note(format!("open #{n} {id} {mode:?} {resume:?}"));
        self.conns.push(Conn {
            id: id.to_owned(),
            mode,
            resume,
            sub,
            w,
            state: State::Ready,
            out: Vec::new(),
            seen,
            started: self.now,
            close_at,
            wait_until: self.now + wait,
            again,
            client,
            last_pos: None,
            trace: Vec::new(),
        });
    }

    fn counters(sub: &Subscription) -> (u64, u64, bool) {
        (sub.changes(), sub.version(), sub.is_closed())
    }

    fn runnable(&self, i: usize) -> bool {
        let c = &self.conns[i];
        match &c.state {
            State::Done(_) => false,
            State::Waiting { until, seen } => self.now >= *until || Self::counters(&c.sub) != *seen,
            _ => true,
        }
    }

    /// One step of connection `i`: what its shell would do next.
    fn step_conn(&mut self, i: usize) {
        let now = self.now;
        let state = std::mem::replace(&mut self.conns[i].state, State::Ready);
        let pos = self.conns[i].w.position().map(|(e, s)| (e.to_owned(), s));
        if pos.is_some() {
            self.conns[i].last_pos = pos;
        }
        let step = match state {
            State::Done(e) => {
                self.conns[i].state = State::Done(e);
                return;
            }
            State::Ready | State::Waiting { .. } => {
                let c = &mut self.conns[i];
                c.w.next(now, &c.sub)
            }
            State::Reading(Read::Meta(None)) => {
                let r = self.meta(&self.conns[i].id.clone());
                self.first_read(i);
                self.conns[i].state = State::Reading(Read::Meta(Some(r)));
                return;
            }
            State::Reading(Read::Page(after, limit, None)) => {
                let r = self.read(&self.conns[i].id.clone(), after, limit);
                self.first_read(i);
                // As the shell does: a page is kept for the stream's other watchers.
                if let (Ok(Some(page)), true) = (&r, self.conns[i].sub.shared()) {
                    if let (Some(first), Some(last)) = (page.events.first(), page.events.last()) {
                        let b = Batch::encode(
                            page.meta.key,
                            &page.meta.epoch,
                            first.seq,
                            page.events
                                .iter()
                                .map(|e| (e.event_type.as_str(), e.data.as_str())),
                            last.event_type == "jobcast.end",
                        );
                        self.conns[i].sub.cache_page(Arc::new(b));
                    }
                }
                self.conns[i].state = State::Reading(Read::Page(after, limit, Some(r)));
                return;
            }
            State::Reading(Read::Meta(Some(r))) => {
                let c = &mut self.conns[i];
                c.w.on_meta(now, &c.sub, r)
            }
            State::Reading(Read::Page(_, _, Some(r))) => {
                let c = &mut self.conns[i];
                c.w.on_page(now, &c.sub, r)
            }
        };
        self.handle(i, step);
    }

    fn first_read(&mut self, i: usize) {
        if self.conns[i].seen.at_first_read.is_none() {
            let h = self.head_of(&self.conns[i].id);
            let oldest = self
                .current
                .get(&self.conns[i].id)
                .map_or(0, |&c| self.creations[c].first_seq.saturating_sub(1));
            self.conns[i].seen.at_first_read = Some(h);
            self.conns[i].seen.oldest_at_first_read = oldest;
        }
    }

    fn handle(&mut self, i: usize, mut step: Step) {
        let now = self.now;
        for _ in 0..4 {
            let c = &mut self.conns[i];
            c.trace
                .push(format!("{:?} {}", now - self.base, short(&step)));
            match step {
                Step::Send(bytes, _) => {
                    c.out.extend_from_slice(&bytes);
                    c.state = State::Ready;
                }
                Step::ReadMeta => c.state = State::Reading(Read::Meta(None)),
                Step::ReadPage { after, limit, .. } => {
                    c.state = State::Reading(Read::Page(after, limit, None))
                }
                Step::Wait { until } => {
                    // As the shell does: register, then ask once more.
                    let seen = Self::counters(&c.sub);
                    match c.w.next(now, &c.sub) {
                        Step::Wait { until: u2 } => {
                            assert!(u2 > now || until > now, "a wait that is already over");
                            c.state = State::Waiting { until: u2, seen };
                        }
                        other => {
                            step = other;
                            continue;
                        }
                    }
                    let _ = until;
                }
                Step::Close { last, reason } => {
                    if let Some(b) = last {
                        c.out.extend_from_slice(&b);
                    }
                    let pos = c.last_pos.clone();
                    c.state = State::Done(End::Closed(reason, pos));
                    self.closed_conn(i, reason);
                }
                Step::NoContent => c.state = State::Done(End::NoContent),
                Step::Respond(p) => {
                    let next = p.next.clone();
                    c.state = State::Done(End::Page(p));
                    self.page_done(i, next);
                }
                Step::Fail(f) => {
                    let why = match f {
                        Failure::NotFound => "not_found".to_owned(),
                        Failure::ShuttingDown => "shutting_down".to_owned(),
                        Failure::Store(_) => "store".to_owned(),
                    };
                    c.state = State::Done(End::Fail(why));
                }
            }
            return;
        }
        panic!("the machine kept answering without waiting");
    }

    /// An SSE client reconnects after a retryable close, with its last id.
    fn closed_conn(&mut self, i: usize, reason: CloseReason) {
        let c = &self.conns[i];
        if c.again == 0 || self.closed {
            return;
        }
        let retry = matches!(
            reason,
            CloseReason::MaxDuration | CloseReason::StoreUnavailable | CloseReason::Lagged
        );
        if !retry {
            return;
        }
        let last = last_id(&c.out);
        let resume = match last {
            Some(id) => Resume::After(id),
            None => c.resume.clone(),
        };
        let (id, client, again) = (c.id.clone(), c.client, c.again - 1);
        self.open(&id, Mode::Sse, resume, client, again);
    }

    /// A pager asks for the next page.
    fn page_done(&mut self, i: usize, next: Option<EventId>) {
        let c = &self.conns[i];
        let (Some(next), true, false) = (next, c.again > 0, self.closed) else {
            return;
        };
        let (id, mode, client, again) = (c.id.clone(), c.mode, c.client, c.again - 1);
        self.open(&id, mode, Resume::After(next), client, again);
    }

    fn any_stream(&mut self) -> &'static str {
        IDS[self.rng.random_range(0..IDS.len())]
    }

    /// One random action.
    fn act(&mut self, late: bool) {
        let r = self.rng.random_range(0..100);
        match r {
            0..=14 => {
                let id = self.any_stream();
                let n = self.rng.random_range(1..5);
                self.append(id, n);
            }
            15..=17 => {
                let id = self.any_stream();
                let failed = self.rng.random_bool(0.3);
                self.end(id, failed);
            }
            18 => {
                let id = self.any_stream();
                self.delete(id);
            }
            19 => {
                let id = self.any_stream();
                // The store never trims a stream's newest event.
                let keep = self.rng.random_range(1..4);
                self.trim(id, keep);
            }
            20..=24 => self.listener_step(),
            25 if self.rng.random_bool(0.3) => self.listener_loss(),
            26 if self.rng.random_bool(0.3) => {
                self.failing = !self.failing;
                self.ever_failed |= self.failing;
                self.note(format!("store failing: {}", self.failing));
            }
            27..=31 => {
                let ms = if self.rng.random_bool(0.2) {
                    self.rng.random_range(1000..20_000)
                } else {
                    self.rng.random_range(1..500)
                };
                self.now += Duration::from_millis(ms);
            }
            32..=36 if !self.closed && !late => {
                let id = self.any_stream();
                let resume = self.random_resume(id);
                let client = self.conns.len();
                if self.rng.random_bool(0.7) {
                    self.open(id, Mode::Sse, resume, client, 3);
                } else {
                    let limit = self.rng.random_range(1..6);
                    self.open(id, Mode::Page { limit }, resume, client, 6);
                }
            }
            _ => {
                let ready: Vec<usize> = (0..self.conns.len())
                    .filter(|&i| self.runnable(i))
                    .collect();
                if !ready.is_empty() {
                    let i = ready[self.rng.random_range(0..ready.len())];
                    self.step_conn(i);
                }
            }
        }
    }

    fn shutdown(&mut self) {
        self.note("shutdown".into());
        self.closed = true;
        self.hub.close();
        // Every connection ends promptly, without time passing: whatever it
        // was doing, the close wakes it. (Reads in flight complete.)
        for _ in 0..10_000 {
            let ready: Vec<usize> = (0..self.conns.len())
                .filter(|&i| self.runnable(i))
                .collect();
            if ready.is_empty() {
                break;
            }
            for i in ready {
                self.step_conn(i);
            }
        }
        for (i, c) in self.conns.iter().enumerate() {
            assert!(
                matches!(c.state, State::Done(_)),
                "connection #{i} did not end at shutdown: {:?}\n{}",
                c.state,
                c.trace.join("\n")
            );
        }
    }

    /// Ends the run: faults lifted, everything passed on, every stream
    /// ended; every connection must then finish by its deadline.
    fn drain(&mut self) {
        self.failing = false;
        while !self.listener.is_empty() {
            self.listener_step();
        }
        for id in IDS {
            self.end(id, false);
        }
        while !self.listener.is_empty() {
            self.listener_step();
        }
        let limit = self.now + self.max_duration * 8 + WAIT * 8;
        for _ in 0..20_000 {
            let ready: Vec<usize> = (0..self.conns.len())
                .filter(|&i| self.runnable(i))
                .collect();
            if ready.is_empty() {
                self.check_prompt();
                // Only waits left: let time pass to the earliest deadline.
                let next = self
                    .conns
                    .iter()
                    .filter_map(|c| match c.state {
                        State::Waiting { until, .. } => Some(until),
                        _ => None,
                    })
                    .min();
                match next {
                    Some(t) => {
                        assert!(t <= limit, "a connection waits past every deadline");
                        self.now = self.now.max(t);
                    }
                    None => return,
                }
                continue;
            }
            for i in ready {
                self.step_conn(i);
            }
        }
        let stuck: Vec<String> = self
            .conns
            .iter()
            .enumerate()
            .filter(|(_, c)| !matches!(c.state, State::Done(_)))
            .map(|(i, c)| {
                let tail = c.trace.len().saturating_sub(3);
                format!("#{i} {:?}: {}", c.state, c.trace[tail..].join(" | "))
            })
            .collect();
        panic!("the drain did not finish: {}", stuck.join("\n"));
    }
}

impl Model {
    /// Liveness: once the hub was told everything (the drain passed every
    /// listener item on), no SSE watcher sits idle on a deleted creation
    /// unless it is backing off from a store error.
    fn check_prompt(&self) {
        for (i, c) in self.conns.iter().enumerate() {
            let (Mode::Sse, State::Waiting { .. }) = (c.mode, &c.state) else {
                continue;
            };
            if c.w.backing_off() {
                continue;
            }
            if let Some((epoch, _)) = c.w.position() {
                let deleted = self.creation(epoch).is_some_and(|cr| cr.deleted);
                assert!(
                    !deleted,
                    "connection #{i} waits on deleted {epoch}:\n{}",
                    c.trace.join("\n")
                );
            }
        }
    }
}

fn short(step: &Step) -> String {
    match step {
        Step::Send(b, _) => format!("send {:?}", String::from_utf8_lossy(b)),
        other => format!("{other:?}"),
    }
}

fn events_of(out: &[u8]) -> Vec<SseEvent> {
    let mut d = Decoder::new();
    let mut frames = Vec::new();
    d.feed(out, &mut frames);
    frames
        .into_iter()
        .filter_map(|f| match f {
            Frame::Event(e) => Some(e),
            _ => None,
        })
        .collect()
}

fn last_id(out: &[u8]) -> Option<EventId> {
    events_of(out)
        .iter()
        .rev()
        .find(|e| e.id_set)
        .and_then(|e| EventId::parse(&e.last_event_id).ok())
}

impl Model {
    fn creation(&self, epoch: &str) -> Option<&Creation> {
        self.creations.iter().find(|c| c.epoch == epoch)
    }

    /// The events (seq, type, data) match the creation's log, in order with no gap.
    fn check_log(&self, epoch: &str, events: &[(u64, String, String)]) -> Result<(), String> {
        let c = self
            .creation(epoch)
            .ok_or_else(|| format!("events of an epoch that never existed: {epoch}"))?;
        for w in events.windows(2) {
            if w[1].0 != w[0].0 + 1 {
                return Err(format!("not contiguous: {} then {}", w[0].0, w[1].0));
            }
        }
        for (seq, t, d) in events {
            let Some((mt, md)) = c.events.get((*seq as usize).wrapping_sub(1)) else {
                return Err(format!("seq {seq} beyond the log of {epoch}"));
            };
            if mt != t || md != d {
                return Err(format!(
                    "seq {seq} of {epoch} is {t}/{d}, the log has {mt}/{md}"
                ));
            }
        }
        Ok(())
    }

    /// Where the first event must be (the seq before it), given the resume
    /// point, a reset, and what the stream looked like.
    fn check_start(
        &self,
        conn: &Conn,
        epoch: &str,
        reset: Option<&ResetPayload>,
        before_first: u64,
    ) -> Result<(), String> {
        if let Some(r) = reset {
            let from = r
                .resumed_from
                .as_deref()
                .and_then(|s| EventId::parse(s).ok())
                .ok_or("a reset with no resumed_from")?;
            if from.epoch != epoch || from.seq != before_first {
                return Err(format!(
                    "reset says {from}, events start after {epoch}-{before_first}"
                ));
            }
            let req = EventId::parse(&r.requested).map_err(|e| e.to_string())?;
            let asked = match &conn.resume {
                Resume::After(id) => *id == req,
                Resume::Start => req == EventId::new(epoch, 0),
                // A live or tail position trimmed away while a page waited.
                Resume::Live | Resume::Tail(_) => {
                    let head = conn.seen.at_first_read.clone().flatten();
                    // Before creation, live is the start.
                    req.epoch == epoch && head.map_or(req.seq == 0, |(_, h, _)| req.seq <= h)
                }
            };
            if !asked {
                return Err(format!(
                    "reset requested {} for {:?}",
                    r.requested, conn.resume
                ));
            }
            let ok = match r.reason {
                ResetReason::EpochMismatch => req.epoch != epoch,
                ResetReason::HistoryTrimmed => req.epoch == epoch && self.trimmed,
                ResetReason::UnknownPosition => req.epoch == epoch && req.seq > from.seq,
            };
            return if ok {
                Ok(())
            } else {
                Err(format!("reset {r:?} unjustified"))
            };
        }
        match &conn.resume {
            Resume::After(id) => {
                let c = self.creation(epoch).ok_or("unknown epoch")?;
                let ended_early = c.state != StreamState::Open && id.seq >= c.head();
                if id.epoch != epoch {
                    return Err(format!("{id} continued in {epoch} without a reset"));
                }
                if id.seq != before_first && !(ended_early && before_first + 1 == c.head()) {
                    return Err(format!(
                        "resumed after {id} but started after {before_first}"
                    ));
                }
            }
            Resume::Start if before_first != 0 => {
                return Err(format!("from the start, but started after {before_first}"));
            }
            // The last n events of the log as the first snapshot showed it
            // (the machine starts from that snapshot): from the first kept
            // one when the log is shorter, `jobcast.end` included; a stream
            // created later is new from its first event.
            Resume::Tail(n) if *n > 0 => match conn.seen.at_first_read.clone().flatten() {
                None if before_first != 0 => {
                    return Err(format!(
                        "tail:{n} before creation started after {before_first}, not 0"
                    ));
                }
                Some((e, head, _)) if e == epoch => {
                    let expected = head.saturating_sub(*n).max(conn.seen.oldest_at_first_read);
                    if before_first != expected {
                        return Err(format!(
                            "tail:{n} of a log at {head} (kept after {}) started after \
                             {before_first}, not {expected}",
                            conn.seen.oldest_at_first_read
                        ));
                    }
                }
                _ => {}
            },
            Resume::Start => {}
            Resume::Live | Resume::Tail(_) => {
                let first = conn.seen.at_first_read.clone().flatten();
                match first {
                    // The stream did not exist: its creation is new.
                    None if before_first != 0 => {
                        return Err(format!(
                            "live before creation started after {before_first}, not 0"
                        ));
                    }
                    None => {}
                    Some((e, head, _)) if e == epoch && before_first > head => {
                        return Err(format!(
                            "live started after {before_first}, past the head {head} read"
                        ));
                    }
                    Some(_) => {}
                }
            }
        }
        Ok(())
    }

    fn check_sse(&self, conn: &Conn) -> Result<(), String> {
        let events = events_of(&conn.out);
        let State::Done(end) = &conn.state else {
            return Err(format!("not done: {:?}", conn.state));
        };
        let mut reset: Option<ResetPayload> = None;
        let mut log: Vec<(u64, String, String)> = Vec::new();
        let mut epoch: Option<String> = None;
        let mut error: Option<ErrorPayload> = None;
        for (i, e) in events.iter().enumerate() {
            if error.is_some() {
                return Err("an event after jobcast.error".into());
            }
            if log.last().is_some_and(|(_, t, _)| t == "jobcast.end") {
                return Err("an event after jobcast.end".into());
            }
            match e.event.as_str() {
                "jobcast.reset" => {
                    if i != 0 || e.id_set {
                        return Err("jobcast.reset not first, or with an id".into());
                    }
                    reset = Some(serde_json::from_str(&e.data).map_err(|e| e.to_string())?);
                }
                "jobcast.error" => {
                    if e.id_set {
                        return Err("jobcast.error with an id".into());
                    }
                    error = Some(serde_json::from_str(&e.data).map_err(|e| e.to_string())?);
                }
                _ => {
                    let id = EventId::parse(&e.last_event_id)
                        .map_err(|_| format!("log event without a valid id: {e:?}"))?;
                    if !e.id_set {
                        return Err("log event without an id".into());
                    }
                    match &epoch {
                        None => epoch = Some(id.epoch.clone()),
                        Some(ep) if *ep != id.epoch => {
                            return Err(format!("two epochs on one connection: {ep}, {}", id.epoch))
                        }
                        _ => {}
                    }
                    log.push((id.seq, e.event.clone(), e.data.clone()));
                }
            }
        }
        let position = match end {
            End::Closed(_, pos) => pos.clone(),
            _ => None,
        };
        // The epoch followed: from the events, else the machine's position.
        let followed = epoch
            .clone()
            .or_else(|| position.as_ref().map(|p| p.0.clone()));
        if let (Some(ep), Some(first)) = (&followed, log.first()) {
            self.check_log(ep, &log)?;
            self.check_start(conn, ep, reset.as_ref(), first.0 - 1)?;
        } else if let (Some(ep), Some(r)) = (&followed, &reset) {
            // Nothing after the reset: check it names the place it resumed.
            let pos = position.as_ref().map_or(0, |p| p.1);
            self.check_start(conn, ep, Some(r), pos)?;
        }
        match end {
            End::NoContent => {
                let Resume::After(id) = &conn.resume else {
                    return Err("204 without a resume id".into());
                };
                match conn.seen.at_first_read.clone().flatten() {
                    Some((e, head, true)) if e == id.epoch && head == id.seq => Ok(()),
                    other => Err(format!("204 for {id}, but the stream was {other:?}")),
                }
            }
            End::Closed(CloseReason::End, _) => {
                let Some((seq, t, _)) = log.last() else {
                    return Err("closed as ended without jobcast.end".into());
                };
                let c = self
                    .creation(followed.as_deref().unwrap_or(""))
                    .ok_or("no creation")?;
                if t != "jobcast.end" || *seq != c.head() {
                    return Err(format!("ended at {seq} {t}, the log ends at {}", c.head()));
                }
                Ok(())
            }
            End::Closed(reason, _) => {
                if !matches!(reason, CloseReason::MaxDuration) && error.is_none() {
                    return Err(format!("closed ({reason:?}) without jobcast.error"));
                }
                let code = error.as_ref().map(|e| e.code.as_str());
                let justified = match (reason, code) {
                    (CloseReason::MaxDuration, None) => self.now >= conn.close_at,
                    (CloseReason::Shutdown, Some("shutting_down")) => self.closed,
                    (CloseReason::Deleted, Some("stream_deleted")) => followed
                        .as_deref()
                        .and_then(|e| self.creation(e))
                        .is_some_and(|c| c.deleted),
                    (CloseReason::StoreUnavailable, Some("store_unavailable")) => self.ever_failed,
                    (CloseReason::Lagged, Some("lagged_beyond_retention")) => self.trimmed,
                    (CloseReason::NotFound, Some("stream_not_found")) => log.is_empty(),
                    _ => false,
                };
                if justified {
                    Ok(())
                } else {
                    Err(format!("closed {reason:?} / {code:?} without cause"))
                }
            }
            // A 503 before the response: the client retries.
            End::Fail(why) if why == "store" && self.ever_failed => Ok(()),
            other => Err(format!("an SSE watch ended as {other:?}")),
        }
    }

    fn check_page(&self, conn: &Conn) -> Result<(), String> {
        let State::Done(end) = &conn.state else {
            return Err(format!("not done: {:?}", conn.state));
        };
        match end {
            End::Page(p) => {
                let epoch = &p.meta.epoch;
                let log: Vec<(u64, String, String)> = p
                    .events
                    .iter()
                    .map(|e| (e.seq, e.event_type.clone(), e.data.clone()))
                    .collect();
                self.check_log(epoch, &log)?;
                let Mode::Page { limit } = conn.mode else {
                    return Err("not a page".into());
                };
                if log.len() > limit as usize {
                    return Err("more events than the limit".into());
                }
                let before_first = match (log.first(), &p.next) {
                    (Some(e), _) => e.0 - 1,
                    (None, Some(n)) => n.seq,
                    (None, None) => p.meta.head,
                };
                if let Some(n) = &p.next {
                    if n.epoch != *epoch {
                        return Err("next names another epoch".into());
                    }
                }
                // At the end when asked (the first snapshot), not later.
                let at_end = match (&conn.resume, conn.seen.at_first_read.clone().flatten()) {
                    (Resume::After(id), Some((e, head, true))) => {
                        id.epoch == e && id.seq == head && e == *epoch
                    }
                    _ => false,
                };
                if at_end {
                    if !log.is_empty() || p.next.is_some() {
                        return Err("a page after the end is not empty with next null".into());
                    }
                } else {
                    self.check_start(conn, epoch, p.reset.as_ref(), before_first)?;
                }
                let last = log.last().map_or(before_first, |e| e.0);
                let ends = log.last().is_some_and(|e| e.1 == "jobcast.end")
                    || (log.is_empty() && p.meta.ended() && last >= p.meta.head);
                if ends != p.next.is_none() {
                    return Err(format!("next {:?} with the end returned: {ends}", p.next));
                }
                if let Some(n) = &p.next {
                    if n.seq != last {
                        return Err(format!("next {n} is not the last returned ({last})"));
                    }
                }
                Ok(())
            }
            End::Fail(why) if why == "shutting_down" && self.closed => Ok(()),
            End::Fail(why) if why == "store" && self.ever_failed => Ok(()),
            End::Fail(why) if why == "not_found" => Ok(()),
            other => Err(format!("a page ended as {other:?}")),
        }
    }

    fn check(&self) -> Result<(), String> {
        for (i, c) in self.conns.iter().enumerate() {
            let r = match c.mode {
                Mode::Sse => self.check_sse(c),
                Mode::Page { .. } => self.check_page(c),
            };
            if let Err(e) = r {
                return Err(format!(
                    "connection #{i} ({} {:?} from {:?}, started at {:?}, wait until {:?}): {e}\noutput: {}\ntrace:\n{}",
                    c.id,
                    c.mode,
                    c.resume,
                    c.started - self.base,
                    c.wait_until - self.base,
                    String::from_utf8_lossy(&c.out),
                    c.trace.join("\n")
                ));
            }
        }
        Ok(())
    }
}

/// Runs one case; the model log and the failure when it fails.
fn run(seed: u64) -> Result<usize, String> {
    let mut m = Model::new(seed);
    let steps = m.rng.random_range(50..400);
    let shutdown = m.rng.random_bool(0.15);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        for _ in 0..steps {
            m.act(false);
        }
        if shutdown {
            m.shutdown();
        } else {
            // Keep the world moving for a while without new watchers.
            for _ in 0..steps / 2 {
                m.act(true);
            }
            m.drain();
        }
        m.check()?;
        Ok(m.conns.len())
    }));
    match result {
        Ok(r) => r,
        Err(p) => Err(p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".into())),
    }
    .map_err(|e| format!("{e}\nmodel log:\n{}", m.log.join("\n")))
}

#[test]
fn every_watcher_sees_its_suffix_exactly_once_under_random_interleavings() {
    if let Ok(seed) = std::env::var("JOBCAST_MODEL_SEED") {
        let seed: u64 = seed.parse().expect("JOBCAST_MODEL_SEED is a number");
        if let Err(e) = run(seed) {
            panic!("seed {seed}: {e}");
        }
        return;
    }
    let cases: u64 = std::env::var("JOBCAST_MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let mut conns = 0;
    for seed in 0..cases {
        match run(seed) {
            Ok(n) => conns += n,
            Err(e) => panic!("seed {seed} (replay with JOBCAST_MODEL_SEED={seed}): {e}"),
        }
    }
    println!("watch model: {cases} cases, {conns} connections checked");
}
