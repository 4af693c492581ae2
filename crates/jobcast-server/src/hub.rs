//! The hub: per watched stream, a ring of recently committed batches, already
//! encoded as SSE, shared by every watcher of that stream.
//!
//! A watcher holds only a [`Subscription`] (a cursor is just the last seq it
//! wrote); there is no task and no channel per watcher. The writer publishes
//! each committed batch once; watchers copy nothing but a `Bytes` handle. A
//! watcher whose position fell out of the ring reads the gap from the store.
//! A stream's entry exists only while it has subscriptions: entries are
//! created and removed under the one map lock, so an arriving watcher can
//! never attach to an entry that is being removed.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::Notify;

/// A committed batch of one stream's events, encoded once as SSE.
#[derive(Debug)]
pub struct Batch {
    /// The internal key of the stream's creation (ordered: a later creation
    /// has a larger key), so a late batch of a replaced stream is recognised.
    pub key: i64,
    /// The epoch of the stream these events belong to.
    pub epoch: Arc<str>,
    /// Seq of the first event.
    pub first_seq: u64,
    /// Seq of the last event.
    pub last_seq: u64,
    /// The encoded events, back to back.
    pub bytes: Bytes,
    /// Where each event starts in `bytes` (`offsets[i]` for seq `first_seq + i`).
    pub offsets: Vec<u32>,
    /// Whether the last event is `jobcast.end`.
    pub ends: bool,
    /// When it was encoded, right after its commit (for the latency histogram).
    pub published_at: std::time::Instant,
}

impl Batch {
    /// Encodes events `(type, data)` of the creation `key` numbered from `first_seq`.
    pub fn encode<'a>(
        key: i64,
        epoch: &str,
        first_seq: u64,
        events: impl IntoIterator<Item = (&'a str, &'a str)>,
        ends: bool,
    ) -> Batch {
        let mut buf = Vec::new();
        let mut offsets = Vec::new();
        let mut seq = first_seq;
        for (ty, data) in events {
            // A batch is ≤ 16 MiB of request body plus framing, far below 4 GiB.
            offsets.push(buf.len() as u32);
            jobcast_protocol::encode::event(&mut buf, Some((epoch, seq)), ty, data);
            seq += 1;
        }
        Batch {
            key,
            epoch: Arc::from(epoch),
            first_seq,
            last_seq: seq.saturating_sub(1).max(first_seq),
            bytes: Bytes::from(buf),
            offsets,
            ends,
            published_at: std::time::Instant::now(),
        }
    }

    /// The same batch without its events up to seq `after` (`first_seq <= after < last_seq`).
    fn suffix(&self, after: u64) -> Batch {
        let skip = (after + 1 - self.first_seq) as usize;
        let start = self.offsets[skip];
        Batch {
            key: self.key,
            epoch: self.epoch.clone(),
            first_seq: after + 1,
            last_seq: self.last_seq,
            bytes: self.bytes.slice(start as usize..),
            offsets: self.offsets[skip..].iter().map(|o| o - start).collect(),
            ends: self.ends,
            published_at: self.published_at,
        }
    }

    /// The encoded events with seq > `after` (all of them when `after` < first_seq).
    pub fn after(&self, after: u64) -> Bytes {
        if after < self.first_seq {
            return self.bytes.clone();
        }
        let skip = (after - self.first_seq + 1) as usize;
        match self.offsets.get(skip) {
            Some(&off) => self.bytes.slice(off as usize..),
            None => Bytes::new(),
        }
    }
}

/// Why a ring read found nothing to hand over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingRead {
    /// The ring holds events after the position but not the next one: read the store.
    Gap,
    /// Nothing after the position yet.
    Nothing,
    /// A batch of another epoch: the stream was replaced; check the store.
    OtherEpoch,
}

#[derive(Debug, Default)]
struct Ring {
    batches: VecDeque<Arc<Batch>>,
    bytes: usize,
    epoch: Option<Arc<str>>,
    /// The newest creation seen; batches of older creations are dropped
    /// (a node's listener can lag its own writer across a delete).
    key: i64,
    /// `bytes`, held in the server's memory budget.
    permit: Option<crate::budget::Permit>,
}

/// One watched stream's shared state.
#[derive(Debug, Default)]
pub struct Entry {
    ring: Mutex<Ring>,
    notify: Notify,
    /// Changed by every delete and creation, so watchers re-check the store.
    changes: AtomicU64,
    /// Changed by every publish and change: lets a watcher tell whether
    /// anything happened since it last read the store.
    version: AtomicU64,
    /// Subscriptions; changed only under the hub's map lock.
    watchers: AtomicUsize,
    /// Store pages read for watchers behind the ring, shared by all of them.
    catchup: Mutex<Catchup>,
    /// Single flight: one store page read at a time per stream, so watchers
    /// behind the ring wait for the one in flight and take it from
    /// `catchup` (tokio Mutex: held across the read).
    reading: tokio::sync::Mutex<()>,
    /// Woken when the slowest watcher catching up moves on (or leaves), so
    /// a front waiting for room in `catchup` looks again.
    room: Notify,
}

/// Recently read store pages of a stream, encoded once: N watchers catching
/// up cost one store read per page, not N. Events are immutable per
/// creation and seq, so a page stays valid for its epoch.
#[derive(Debug, Default)]
struct Catchup {
    /// In seq order, each with when it was last used (for eviction).
    batches: VecDeque<(Arc<Batch>, u64)>,
    bytes: usize,
    /// Counts uses; a page's stamp is the count at its last use.
    clock: u64,
    /// `bytes`, held in the server's memory budget.
    permit: Option<crate::budget::Permit>,
    /// `(last seq sent, watcher id)` of the SSE watchers catching up from
    /// these pages: a page with one of them behind it is still needed.
    attached: BTreeSet<(u64, u64)>,
    /// Watchers left behind by the front (it waited for them in vain):
    /// they no longer hold pages back, until they move again; theirs go
    /// first when room is needed.
    detached: BTreeSet<(u64, u64)>,
}

impl Catchup {
    /// Bytes of the pages some attached watcher still needs (every page
    /// after the slowest attached position).
    fn pinned(&self) -> usize {
        let Some(&(min, _)) = self.attached.first() else {
            return 0;
        };
        self.batches
            .iter()
            .filter(|(b, _)| b.last_seq > min)
            .map(|(b, _)| b.bytes.len())
            .sum()
    }

    /// How far the nearest watcher of `set` behind `b` is from it (in seqs;
    /// 0 when one is in it or right before it), None when none is behind it.
    fn distance(set: &BTreeSet<(u64, u64)>, b: &Batch) -> Option<u64> {
        let &(pos, _) = set.range(..(b.last_seq, 0)).next_back()?;
        Some((b.first_seq - 1).saturating_sub(pos))
    }

    /// The page to drop when room is needed: one nobody still needs (least
    /// recently used first), else the one whose next reader is furthest
    /// away: behind it only watchers left behind, else any.
    fn victim(&self) -> Option<usize> {
        let mut best: Option<(u8, u64, std::cmp::Reverse<u64>, usize)> = None;
        for (i, (b, used)) in self.batches.iter().enumerate() {
            let score = match (
                Self::distance(&self.attached, b),
                Self::distance(&self.detached, b),
            ) {
                (None, None) => (3, 0, std::cmp::Reverse(*used), i),
                (None, Some(d)) => (2, d, std::cmp::Reverse(*used), i),
                (Some(d), _) => (1, d, std::cmp::Reverse(*used), i),
            };
            if best.as_ref().is_none_or(|b| score > *b) {
                best = Some(score);
            }
        }
        best.map(|(_, _, _, i)| i)
    }

    /// Drops pages (see [`Catchup::victim`]) until at most `cap` bytes are kept.
    fn evict(&mut self, cap: usize) {
        while self.bytes > cap && self.batches.len() > 1 {
            let Some(i) = self.victim() else { break };
            if let Some((old, _)) = self.batches.remove(i) {
                self.bytes -= old.bytes.len();
            }
        }
    }
}

/// Most bytes of store pages kept per stream for catching-up watchers, by
/// default (`Config::catchup_bytes`).
const CATCHUP_BYTES: usize = 16 << 20;

#[derive(Debug)]
struct Inner {
    /// std Mutex: held for a map lookup or insert, never across an await.
    streams: Mutex<HashMap<String, Arc<Entry>>>,
    ring_bytes: usize,
    /// Most bytes of store pages kept per stream (the shared catch-up).
    catchup_bytes: usize,
    /// How long the front of a catch-up waits for room (`Config::catchup_pace`).
    catchup_pace: std::time::Duration,
    budget: crate::budget::Budget,
    watchers: AtomicUsize,
    /// Numbers subscriptions (their place among a stream's catching-up watchers).
    ids: AtomicU64,
    /// Set at shutdown; watchers are woken through their entries to see it.
    closed: std::sync::atomic::AtomicBool,
}

/// The hub; a cheap handle.
#[derive(Debug, Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these short locks leaves consistent data
    // (every critical section is a few field updates), so poisoning is ignored.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Hub {
    /// A hub whose rings keep about `ring_bytes` of encoded events per stream.
    pub fn new(ring_bytes: usize) -> Hub {
        Hub::with_budget(ring_bytes, crate::budget::Budget::unlimited())
    }

    /// A hub whose rings count against `budget`: past it, a ring keeps only
    /// its newest batch (watchers behind it read the store).
    pub fn with_budget(ring_bytes: usize, budget: crate::budget::Budget) -> Hub {
        Hub {
            inner: Arc::new(Inner {
                streams: Mutex::new(HashMap::new()),
                ring_bytes,
                catchup_bytes: CATCHUP_BYTES,
                catchup_pace: std::time::Duration::ZERO,
                budget,
                watchers: AtomicUsize::new(0),
                ids: AtomicU64::new(0),
                closed: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    /// The same hub keeping at most `bytes` of store pages per stream for
    /// watchers catching up (call before sharing it).
    pub fn with_catchup_bytes(mut self, bytes: usize) -> Hub {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.catchup_bytes = bytes;
        }
        self
    }

    /// The same hub whose catch-up fronts wait up to `pace` for room (see
    /// [`Subscription::must_wait_for_room`]); zero, they never wait.
    pub fn with_catchup_pace(mut self, pace: std::time::Duration) -> Hub {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.catchup_pace = pace;
        }
        self
    }

    /// Takes a cursor on a stream (creating its entry). Take it BEFORE reading
    /// the store, so nothing committed in between is missed.
    pub fn subscribe(&self, stream: &str) -> Subscription {
        let entry = {
            let mut map = lock(&self.inner.streams);
            let entry = map.entry(stream.to_owned()).or_default().clone();
            entry.watchers.fetch_add(1, Ordering::Relaxed);
            entry
        };
        self.inner.watchers.fetch_add(1, Ordering::Relaxed);
        let changes = entry.changes.load(Ordering::Acquire);
        let head = {
            let ring = lock(&entry.ring);
            ring.batches.back().map(|b| (b.epoch.clone(), b.last_seq))
        };
        Subscription {
            id: self.inner.ids.fetch_add(1, Ordering::Relaxed),
            catchup_at: AtomicU64::new(NOT_CATCHING_UP),
            hub: self.clone(),
            stream: stream.to_owned(),
            entry,
            changes,
            head,
        }
    }

    fn entry(&self, stream: &str) -> Option<Arc<Entry>> {
        lock(&self.inner.streams).get(stream).cloned()
    }

    /// Whether anyone watches `stream` on this node (to skip encoding when not).
    pub fn is_watched(&self, stream: &str) -> bool {
        lock(&self.inner.streams).contains_key(stream)
    }

    /// Subscriptions to `stream` on this node.
    pub fn watchers_of(&self, stream: &str) -> usize {
        self.entry(stream)
            .map_or(0, |e| e.watchers.load(Ordering::Relaxed))
    }

    /// Subscriptions on this node.
    pub fn watchers(&self) -> usize {
        self.inner.watchers.load(Ordering::Relaxed)
    }

    /// Streams with an entry (for tests and metrics).
    pub fn entries(&self) -> usize {
        lock(&self.inner.streams).len()
    }

    /// Marks the hub closed (shutdown) and wakes every watcher, which then
    /// sees [`Hub::is_closed`]. Watchers wait on their stream's entry only,
    /// not on a shared shutdown signal, so waiting costs no shared lock.
    pub fn close(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        let entries: Vec<Arc<Entry>> = lock(&self.inner.streams).values().cloned().collect();
        for e in entries {
            e.notify.notify_waiters();
        }
    }

    /// Whether [`Hub::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Relaxed)
    }

    /// Streams watched on this node (to re-sync them after missed wake-ups).
    pub fn watched(&self) -> Vec<String> {
        lock(&self.inner.streams).keys().cloned().collect()
    }

    /// The epoch and last seq of the newest batch in a stream's ring.
    pub fn ring_head(&self, stream: &str) -> Option<(Arc<str>, u64)> {
        let entry = self.entry(stream)?;
        let ring = lock(&entry.ring);
        let last = ring.batches.back()?;
        Some((last.epoch.clone(), last.last_seq))
    }

    /// Publishes a committed batch, right after its COMMIT. Batches of one
    /// epoch are kept in seq order: a batch at or below the ring's head is
    /// dropped, one overlapping it is cut. With several writers (nodes on one
    /// PostgreSQL) batches may arrive late or out of order; a seq missing
    /// from the ring is a gap that watchers fill from the store.
    pub fn publish(&self, stream: &str, batch: Arc<Batch>) {
        self.put(stream, batch, false);
    }

    /// Publishes a batch read from the store that holds every event of its
    /// creation from `first_seq` on (a listener's re-sync): the ring's
    /// batches from that seq on are replaced by it, so the holes a missed
    /// wake-up left between this node's own commits are filled too. The
    /// events are the same, so watchers in the replaced part go on by seq.
    pub fn publish_over(&self, stream: &str, batch: Arc<Batch>) {
        self.put(stream, batch, true);
    }

    /// The epoch and last seq of the ring's first run of batches with no
    /// hole between them (where a re-sync starts reading).
    pub fn ring_contiguous_head(&self, stream: &str) -> Option<(Arc<str>, u64)> {
        let entry = self.entry(stream)?;
        let ring = lock(&entry.ring);
        let first = ring.batches.front()?;
        let mut head = first.last_seq;
        for b in ring.batches.iter().skip(1) {
            if b.first_seq > head + 1 {
                break;
            }
            head = head.max(b.last_seq);
        }
        Some((first.epoch.clone(), head))
    }

    fn put(&self, stream: &str, mut batch: Arc<Batch>, over: bool) {
        let Some(entry) = self.entry(stream) else {
            return;
        };
        {
            let mut ring = lock(&entry.ring);
            if batch.key < ring.key {
                // A late batch of a creation that was since replaced.
                return;
            }
            if batch.key > ring.key || ring.epoch.as_deref() != Some(&*batch.epoch) {
                ring.batches.clear();
                ring.bytes = 0;
                ring.permit = None;
                ring.epoch = Some(batch.epoch.clone());
                ring.key = batch.key;
            } else {
                while over
                    && ring
                        .batches
                        .back()
                        .is_some_and(|b| b.first_seq >= batch.first_seq)
                {
                    if let Some(old) = ring.batches.pop_back() {
                        ring.bytes -= old.bytes.len();
                    }
                }
            }
            if let Some(head) = ring
                .batches
                .back()
                .filter(|_| ring.key == batch.key)
                .map(|b| b.last_seq)
            {
                if batch.last_seq <= head {
                    return;
                }
                if batch.first_seq <= head {
                    batch = Arc::new(batch.suffix(head));
                }
            }
            ring.bytes += batch.bytes.len();
            ring.batches.push_back(batch);
            // Keep at least the newest batch, however large; past the
            // memory budget, only that one.
            let cap = if self.inner.budget.exhausted() {
                0
            } else {
                self.inner.ring_bytes
            };
            while ring.bytes > cap && ring.batches.len() > 1 {
                if let Some(old) = ring.batches.pop_front() {
                    ring.bytes -= old.bytes.len();
                }
            }
            let bytes = ring.bytes;
            match ring.permit.as_mut() {
                Some(p) => p.resize(bytes),
                None => ring.permit = Some(self.inner.budget.take(bytes)),
            }
        }
        entry.version.fetch_add(1, Ordering::AcqRel);
        entry.notify.notify_waiters();
    }

    /// Tells watchers that the stream was created, deleted or replaced: they
    /// re-check the store (after taking what the ring holds of their
    /// creation: committed events of it, so theirs to have).
    pub fn changed(&self, stream: &str) {
        self.change(stream, None);
    }

    /// Tells watchers that the creation `key` of the stream was deleted;
    /// batches of it that arrive late are dropped from then on.
    pub fn deleted(&self, stream: &str, key: i64) {
        self.change(stream, Some(key));
    }

    fn change(&self, stream: &str, deleted: Option<i64>) {
        let Some(entry) = self.entry(stream) else {
            return;
        };
        if let Some(key) = deleted {
            // The batches committed before the delete stay for watchers that
            // have not taken them yet (they get them, then `stream_deleted`);
            // late ones of that creation are dropped from now on.
            let mut ring = lock(&entry.ring);
            ring.key = ring.key.max(key.saturating_add(1));
        }
        entry.changes.fetch_add(1, Ordering::AcqRel);
        entry.version.fetch_add(1, Ordering::AcqRel);
        entry.notify.notify_waiters();
    }
}

/// A watcher's hold on a stream's entry; dropping it releases the entry.
#[derive(Debug)]
pub struct Subscription {
    hub: Hub,
    stream: String,
    entry: Arc<Entry>,
    /// The change counter when subscribing.
    changes: u64,
    /// The ring's epoch and head when subscribing (`from=live` starts there).
    head: Option<(Arc<str>, u64)>,
    /// This subscription's number (its key among catching-up watchers).
    id: u64,
    /// Its position among the stream's catching-up watchers, or
    /// [`NOT_CATCHING_UP`]; changed only under the entry's `catchup` lock.
    catchup_at: AtomicU64,
}

/// `Subscription::catchup_at` of a watcher that is not catching up.
const NOT_CATCHING_UP: u64 = u64::MAX;

impl Entry {
    /// A future that completes at the next publish or change. Create it and
    /// `enable()` it before looking at the ring, so no wake-up is lost.
    pub fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.notify.notified()
    }

    /// The stream's single-flight lock for store page reads.
    pub async fn read_lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.reading.lock().await
    }
}

impl Subscription {
    /// A future that completes at the next publish or change (see [`Entry::notified`]).
    pub fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.entry.notify.notified()
    }

    /// The stream's shared entry (to wait on it while the subscription is borrowed elsewhere).
    pub fn entry(&self) -> Arc<Entry> {
        self.entry.clone()
    }

    /// The stream's change counter: bumped by every creation, deletion and
    /// re-sync. A watcher that saw another value than the one it captured
    /// before its last store read re-checks the store.
    pub fn changes(&self) -> u64 {
        self.entry.changes.load(Ordering::Acquire)
    }

    /// The change counter when this subscription was taken.
    pub fn changes_at_subscribe(&self) -> u64 {
        self.changes
    }

    /// The stream's publish counter: bumped by every publish and change.
    pub fn version(&self) -> u64 {
        self.entry.version.load(Ordering::Acquire)
    }

    /// The epoch and seq of the newest batch in the ring when subscribing.
    pub fn head_at_subscribe(&self) -> Option<(&str, u64)> {
        self.head.as_ref().map(|(e, s)| (&**e, *s))
    }

    /// Hands `take` the cached store pages of `epoch` from the one that
    /// holds seq `after + 1` on (in seq order; `take` stops at a gap), if one
    /// is kept.
    pub fn read_cached<R>(
        &self,
        epoch: &str,
        after: u64,
        take: impl FnOnce(&mut dyn Iterator<Item = &Arc<Batch>>) -> R,
    ) -> Option<R> {
        let mut cache = lock(&self.entry.catchup);
        let want = after.checked_add(1)?;
        let i = cache
            .batches
            .iter()
            .position(|(b, _)| &*b.epoch == epoch && b.first_seq <= want && want <= b.last_seq)?;
        cache.clock += 1;
        let now = cache.clock;
        // This page and the next are in use.
        for (_, used) in cache.batches.range_mut(i..).take(2) {
            *used = now;
        }
        // One page per frame: handed over without a copy, and a watcher far
        // behind never builds a frame the size of the whole cache.
        Some(take(&mut cache.batches.range(i..).take(1).map(|(b, _)| b)))
    }

    /// Whether other watchers share this stream on this node (a page read
    /// for this one is then worth keeping).
    pub fn shared(&self) -> bool {
        self.entry.watchers.load(Ordering::Relaxed) > 1
    }

    /// Keeps a store page for the other watchers of this stream, when there
    /// are others and the memory budget has room; the oldest go first.
    pub fn cache_page(&self, batch: Arc<Batch>) {
        if !self.shared() || self.hub.inner.budget.exhausted() {
            return;
        }
        let mut cache = lock(&self.entry.catchup);
        if cache.batches.iter().any(|(b, _)| {
            b.epoch == batch.epoch && b.first_seq <= batch.first_seq && batch.last_seq <= b.last_seq
        }) {
            return;
        }
        // A new creation's pages replace the old one's.
        if cache
            .batches
            .front()
            .is_some_and(|(b, _)| b.key != batch.key)
        {
            cache.batches.clear();
            cache.bytes = 0;
        }
        cache.bytes += batch.bytes.len();
        cache.clock += 1;
        let now = cache.clock;
        // Kept in seq order, so a watcher can go from one page into the next.
        let at = cache
            .batches
            .partition_point(|(b, _)| b.first_seq <= batch.first_seq);
        cache.batches.insert(at, (batch, now));
        cache.evict(self.hub.inner.catchup_bytes);
        let bytes = cache.bytes;
        match cache.permit.as_mut() {
            Some(p) => p.resize(bytes),
            None => cache.permit = Some(self.hub.inner.budget.take(bytes)),
        }
    }

    /// Records where this SSE watcher is while it catches up from store
    /// pages (`Some(last seq sent)`), or that it is not (`None`: it follows
    /// the ring, or is done). A page with a catching-up watcher behind it
    /// is kept for it, within the cache's bound.
    pub fn catching_up(&self, at: Option<u64>) {
        let new = match at {
            Some(p) => p.min(NOT_CATCHING_UP - 1),
            None => NOT_CATCHING_UP,
        };
        let old = self.catchup_at.load(Ordering::Relaxed);
        if old == new {
            return;
        }
        let mut cache = lock(&self.entry.catchup);
        let min = cache.attached.first().map(|&(p, _)| p);
        if old != NOT_CATCHING_UP && !cache.attached.remove(&(old, self.id)) {
            cache.detached.remove(&(old, self.id));
        }
        if new != NOT_CATCHING_UP {
            // Moving again: it holds its pages back again (a stalled
            // watcher, left behind, does not move).
            cache.attached.insert((new, self.id));
        }
        self.catchup_at.store(new, Ordering::Relaxed);
        let moved = cache.attached.first().map(|&(p, _)| p) != min;
        drop(cache);
        if moved {
            self.entry.room.notify_waiters();
        }
    }

    /// How long the front of a catch-up waits for room (zero: never).
    pub fn catchup_pace(&self) -> std::time::Duration {
        self.hub.inner.catchup_pace
    }

    /// A future completing when the slowest catching-up watcher moves on
    /// (`enable()` it before [`Subscription::must_wait_for_room`]).
    pub fn room_notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.entry.room.notified()
    }

    /// Whether this watcher, at the front of the stream's catch-up (needing
    /// a page after every cached one), should wait before reading another:
    /// the cache is full of pages that slower watchers still need, so a new
    /// page would push one of them out and cost them a store read again.
    pub fn must_wait_for_room(&self) -> bool {
        let at = self.catchup_at.load(Ordering::Relaxed);
        if at == NOT_CATCHING_UP {
            return false;
        }
        let cache = lock(&self.entry.catchup);
        if !cache.attached.contains(&(at, self.id)) {
            return false;
        }
        let Some((last, _)) = cache.batches.back() else {
            return false;
        };
        let front = cache.batches.iter().all(|(b, _)| b.last_seq <= at);
        front && cache.pinned() + last.bytes.len() > self.hub.inner.catchup_bytes
    }

    /// The front waited long enough: the slowest watchers that keep the
    /// cache full no longer hold pages back (they read on as their own
    /// group), so the front can go on. Never this watcher itself.
    pub fn leave_behind(&self) {
        let mut cache = lock(&self.entry.catchup);
        let est = cache.batches.back().map_or(0, |(b, _)| b.bytes.len());
        while cache.pinned() + est > self.hub.inner.catchup_bytes {
            let Some(&(pos, id)) = cache.attached.first() else {
                break;
            };
            if id == self.id {
                break;
            }
            cache.attached.remove(&(pos, id));
            cache.detached.insert((pos, id));
        }
    }

    /// Whether the hub was closed (shutdown). Check it after registering
    /// for wake-ups ([`Subscription::notified`]), so the close is not missed.
    pub fn is_closed(&self) -> bool {
        self.hub.inner.closed.load(Ordering::SeqCst)
    }

    /// Hands `take` the batches after seq `after` of epoch `epoch` (the
    /// first one containing `after + 1`), under the ring's lock: `take` only
    /// slices shared bytes, and no list is allocated per read.
    pub fn read<R>(
        &self,
        epoch: &str,
        after: u64,
        take: impl FnOnce(std::collections::vec_deque::Iter<'_, Arc<Batch>>) -> R,
    ) -> Result<R, RingRead> {
        let ring = lock(&self.entry.ring);
        match ring.epoch.as_deref() {
            None => return Err(RingRead::Nothing),
            Some(e) if e != epoch => return Err(RingRead::OtherEpoch),
            Some(_) => {}
        }
        let Some(last) = ring.batches.back() else {
            return Err(RingRead::Nothing);
        };
        if last.last_seq <= after {
            return Err(RingRead::Nothing);
        }
        // Batches are contiguous and ordered: find the first with last_seq > after.
        let start = ring.batches.partition_point(|b| b.last_seq <= after);
        if ring.batches[start].first_seq > after + 1 {
            return Err(RingRead::Gap);
        }
        Ok(take(ring.batches.range(start..)))
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.catching_up(None);
        let mut map = lock(&self.hub.inner.streams);
        if self.entry.watchers.fetch_sub(1, Ordering::Relaxed) == 1 {
            if let Some(e) = map.get(&self.stream) {
                if Arc::ptr_eq(e, &self.entry) {
                    map.remove(&self.stream);
                }
            }
        }
        drop(map);
        self.hub.inner.watchers.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(epoch: &str, first: u64, n: u64) -> Arc<Batch> {
        let data: Vec<String> = (first..first + n).map(|s| format!("e{s}")).collect();
        Arc::new(Batch::encode(
            1,
            epoch,
            first,
            data.iter().map(|d| ("message", d.as_str())),
            false,
        ))
    }

    #[test]
    fn entry_lives_while_subscribed() {
        let hub = Hub::new(1 << 20);
        let a = hub.subscribe("s");
        let b = hub.subscribe("s");
        assert_eq!((hub.entries(), hub.watchers_of("s")), (1, 2));
        drop(a);
        assert_eq!(hub.entries(), 1);
        drop(b);
        assert_eq!((hub.entries(), hub.watchers()), (0, 0));
    }

    #[test]
    fn unwatched_publish_is_dropped() {
        let hub = Hub::new(1 << 20);
        hub.publish("s", batch("e", 1, 3));
        let sub = hub.subscribe("s");
        assert_eq!(sub.read("e", 0, |b| b.count()), Err(RingRead::Nothing));
    }

    #[test]
    fn ring_reads_and_gaps() {
        let hub = Hub::new(1 << 20);
        let sub = hub.subscribe("s");
        hub.publish("s", batch("e", 4, 3)); // 4..=6
        hub.publish("s", batch("e", 7, 2)); // 7..=8
        assert_eq!(sub.read("e", 2, |b| b.count()), Err(RingRead::Gap));
        let got = sub.read("e", 5, |b| {
            let b: Vec<_> = b.collect();
            (b.len(), b[0].after(5))
        });
        assert_eq!(
            got,
            Ok((2, bytes::Bytes::from_static(b"id: e-6\ndata: e6\n\n")))
        );
        assert_eq!(sub.read("e", 8, |b| b.count()), Err(RingRead::Nothing));
        assert_eq!(sub.read("x", 3, |b| b.count()), Err(RingRead::OtherEpoch));
    }

    #[test]
    fn late_and_overlapping_batches_keep_the_ring_in_order() {
        let hub = Hub::new(1 << 20);
        let sub = hub.subscribe("s");
        hub.publish("s", batch("e", 1, 3)); // 1..=3
        hub.publish("s", batch("e", 2, 1)); // late: dropped
        hub.publish("s", batch("e", 2, 4)); // 2..=5 overlaps: 4..=5 kept
        assert_eq!(hub.ring_head("s"), Some((Arc::from("e"), 5)));
        let got = sub.read("e", 3, |b| {
            let b: Vec<_> = b.collect();
            (b.len(), b[0].first_seq, b[0].after(3))
        });
        assert_eq!(
            got,
            Ok((
                1,
                4,
                bytes::Bytes::from_static(b"id: e-4\ndata: e4\n\nid: e-5\ndata: e5\n\n")
            ))
        );
        hub.publish("s", batch("e", 8, 1)); // a gap: 6..=7 come from the store
        assert_eq!(sub.read("e", 5, |b| b.count()), Err(RingRead::Gap));
        assert_eq!(sub.read("e", 7, |b| b.count()), Ok(1));
        assert_eq!(hub.watched(), vec!["s".to_string()]);
    }

    /// Issue 12 item 5: the writer and the listener may publish in either
    /// order; a late batch of a replaced creation never sets the ring back.
    #[test]
    fn a_late_batch_of_an_older_creation_is_dropped() {
        let hub = Hub::new(1 << 20);
        let sub = hub.subscribe("s");
        let keyed =
            |key, epoch: &str| Arc::new(Batch::encode(key, epoch, 1, [("message", "x")], false));
        hub.publish("s", keyed(2, "new"));
        hub.publish("s", keyed(1, "old"));
        assert_eq!(hub.ring_head("s"), Some((Arc::from("new"), 1)));
        assert_eq!(sub.read("new", 0, |b| b.count()), Ok(1));
        // After a delete its batches stay for watchers still behind them;
        // late ones of it are dropped.
        hub.deleted("s", 2);
        hub.publish(
            "s",
            Arc::new(Batch::encode(2, "new", 2, [("message", "y")], false)),
        );
        assert_eq!(hub.ring_head("s"), Some((Arc::from("new"), 1)));
        hub.publish("s", keyed(3, "newer"));
        assert_eq!(hub.ring_head("s"), Some((Arc::from("newer"), 1)));
    }

    /// Past the memory budget a ring keeps only its newest batch; its bytes
    /// are held in the budget while it lives.
    #[test]
    fn rings_count_against_the_budget() {
        let budget = crate::budget::Budget::new(1000, Default::default());
        let hub = Hub::with_budget(1 << 20, budget.clone());
        let sub = hub.subscribe("s");
        for i in 0..10 {
            hub.publish("s", batch("e", 1 + i * 2, 2));
        }
        assert!(budget.used() > 0);
        assert_eq!(sub.read("e", 18, |b| b.count()), Ok(1));
        let _held = budget.take(1000);
        hub.publish("s", batch("e", 21, 2));
        // Only the newest batch is left: older positions read the store.
        assert_eq!(sub.read("e", 18, |b| b.count()), Err(RingRead::Gap));
        assert_eq!(sub.read("e", 20, |b| b.count()), Ok(1));
        drop(sub);
        assert_eq!(budget.used(), 1000, "the ring's bytes are released with it");
    }

    #[test]
    fn ring_is_bounded_by_bytes() {
        let hub = Hub::new(100);
        let sub = hub.subscribe("s");
        for i in 0..100 {
            hub.publish("s", batch("e", 1 + i * 2, 2));
        }
        assert_eq!(sub.read("e", 1, |b| b.count()), Err(RingRead::Gap));
        assert_eq!(sub.read("e", 197, |b| b.count()), Ok(2));
    }

    /// The shared catch-up keeps a page while a catching-up watcher is
    /// behind it, within its bound: a stalled watcher holds back only the
    /// page it needs next, the front waits for room while the cache is full
    /// of pages others need, and stops waiting once they are left behind.
    #[test]
    fn catchup_pages_are_kept_for_the_watchers_behind_them_within_the_bound() {
        let page = |first| batch("e", first, 10);
        let size = page(1).bytes.len();
        let hub = Hub::new(1 << 20).with_catchup_bytes(3 * size);
        let (stalled, front) = (hub.subscribe("s"), hub.subscribe("s"));
        stalled.catching_up(Some(0));
        front.catching_up(Some(0));
        front.cache_page(page(1));
        for first in (11..=81).step_by(10) {
            front.catching_up(Some(first - 1));
            front.cache_page(page(first));
            let cache = lock(&front.entry.catchup);
            assert!(cache.bytes <= 3 * size, "bounded: {}", cache.bytes);
            // The stalled watcher's next page stays; the front's too.
            assert_eq!(cache.batches.front().map(|(b, _)| b.first_seq), Some(1));
            assert_eq!(cache.batches.back().map(|(b, _)| b.first_seq), Some(first));
        }
        // At the front of a full cache whose pages the stalled one needs: wait.
        front.catching_up(Some(90));
        assert!(front.must_wait_for_room());
        assert!(!stalled.must_wait_for_room(), "only the front waits");
        front.leave_behind();
        assert!(
            !front.must_wait_for_room(),
            "left behind, it holds nothing back"
        );
        // Still catching up (as its own group), it gets its page if kept.
        assert_eq!(stalled.read_cached("e", 0, |b| b.count()), Some(1));
        drop(stalled);
        assert!(lock(&front.entry.catchup).detached.is_empty());
    }

    /// A listener's re-sync after missed wake-ups: the ring's first
    /// unbroken run ends before the hole, and the page read from there
    /// replaces the ring's tail, so the hole is filled in the ring.
    #[test]
    fn a_re_sync_fills_the_holes_left_between_own_commits() {
        let hub = Hub::new(1 << 20);
        let sub = hub.subscribe("s");
        hub.publish("s", batch("e", 1, 3)); // 1..=3
        hub.publish("s", batch("e", 6, 1)); // 6: 4..=5 were missed
        hub.publish("s", batch("e", 8, 1)); // 8: 7 was missed
        assert_eq!(hub.ring_contiguous_head("s"), Some((Arc::from("e"), 3)));
        assert_eq!(sub.read("e", 3, |b| b.count()), Err(RingRead::Gap));
        hub.publish_over("s", batch("e", 4, 6)); // 4..=9 from the store
        assert_eq!(hub.ring_contiguous_head("s"), Some((Arc::from("e"), 9)));
        let got = sub.read("e", 3, |b| {
            let b: Vec<_> = b.collect();
            (b.len(), b[0].first_seq, b[0].last_seq)
        });
        assert_eq!(got, Ok((1, 4, 9)));
        assert_eq!(sub.read("e", 1, |b| b.count()), Ok(2));
    }
}
