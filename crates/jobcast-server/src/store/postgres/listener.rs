//! The node's LISTEN connection: wake-ups from every node's commits feed
//! this node's hub.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use jobcast_protocol::END_EVENT;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use tokio_util::sync::CancellationToken;

use super::reads::read_page;
use super::{CATCH_UP_PAGES, CHANNEL, LISTENER_PING};
use crate::hub::{Batch, Hub};
use crate::metrics::Metrics;

/// The node's LISTEN connection, feeding its hub.
pub(super) struct Listener {
    pub(super) opts: PgConnectOptions,
    pub(super) pool: PgPool,
    pub(super) hub: Hub,
    pub(super) page_size: u32,
    pub(super) connect_timeout: Duration,
    pub(super) metrics: Metrics,
    /// `pg_notification_queue_usage()` at the last check (f64 bits), for /readyz.
    pub(super) queue_usage: Arc<AtomicU64>,
}

/// Groups wake-ups by stream (in order of first appearance), keeping only
/// watched streams; within a stream, a run of events of one epoch becomes one
/// range and a creation or deletion stays in its place.
fn coalesce<'a>(
    payloads: impl Iterator<Item = &'a str>,
    watched: impl Fn(&str) -> bool,
) -> Vec<(String, Vec<Wake>)> {
    let mut per: Vec<(String, Vec<Wake>)> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    for p in payloads {
        let Some((stream, wake)) = Wake::parse(p) else {
            continue;
        };
        if !watched(stream) {
            continue;
        }
        let i = *index.entry(stream.to_owned()).or_insert_with(|| {
            per.push((stream.to_owned(), Vec::new()));
            per.len() - 1
        });
        let list = &mut per[i].1;
        match (list.last_mut(), wake) {
            (
                Some(Wake::Events { epoch, first, last }),
                Wake::Events {
                    epoch: e,
                    first: f,
                    last: l,
                },
            ) if *epoch == e => {
                *first = (*first).min(f);
                *last = (*last).max(l);
            }
            (_, wake) => list.push(wake),
        }
    }
    per
}

/// Most wake-ups handled as one batch.
const WAKE_BATCH: usize = 1000;
/// Streams whose wake-ups are read in parallel.
const WAKE_STREAMS: usize = 8;

/// A wake-up from the NOTIFY channel.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Wake {
    /// Events `first..=last` of `epoch` were committed.
    Events {
        epoch: String,
        first: u64,
        last: u64,
    },
    /// The stream was created or deleted (or the payload was not understood).
    Changed,
}

impl Wake {
    /// `"{stream} {epoch} {first} {last}"` or `"{stream}"`.
    fn parse(payload: &str) -> Option<(&str, Wake)> {
        let mut parts = payload.split(' ');
        let stream = parts.next().filter(|s| !s.is_empty())?;
        let wake = match (parts.next(), parts.next(), parts.next()) {
            (Some(epoch), Some(first), Some(last)) => {
                match (first.parse::<u64>(), last.parse::<u64>()) {
                    (Ok(first), Ok(last)) if first >= 1 && last >= first => Wake::Events {
                        epoch: epoch.to_owned(),
                        first,
                        last,
                    },
                    _ => Wake::Changed,
                }
            }
            _ => Wake::Changed,
        };
        Some((stream, wake))
    }
}

impl Listener {
    pub(super) async fn run(self, stop: CancellationToken) {
        let mut delay = Duration::from_millis(100);
        while !stop.is_cancelled() {
            let mut listener = match self.connect().await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, ?delay, "cannot listen for other nodes' appends; retrying");
                    // Sleep, or stop at shutdown.
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            delay = Duration::from_millis(100);
            // Wake-ups sent while no connection listened are lost: every
            // watcher here re-checks the store once.
            for stream in self.hub.watched() {
                self.hub.changed(&stream);
            }
            let mut ping = tokio::time::interval(LISTENER_PING);
            ping.tick().await;
            loop {
                // One line per branch: shutdown, a wake-up, or a periodic check of the link.
                tokio::select! {
                    _ = stop.cancelled() => return,
                    n = listener.try_recv() => match n {
                        Ok(Some(n)) => {
                            // Drain what is already buffered too, and handle it
                            // as one batch: coalesced per stream, streams in
                            // parallel, so a busy cluster never fills the
                            // NOTIFY queue behind a slow node.
                            let mut batch = vec![n.payload().to_owned()];
                            while batch.len() < WAKE_BATCH {
                                match listener.next_buffered() {
                                    Some(n) => batch.push(n.payload().to_owned()),
                                    None => break,
                                }
                            }
                            self.wake_all(batch).await;
                        }
                        Ok(None) => {
                            tracing::warn!("listener connection lost; reconnecting and re-syncing watched streams");
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "listener failed; reconnecting and re-syncing watched streams");
                            break;
                        }
                    },
                    _ = ping.tick() => {
                        // The link's check doubles as a look at the cluster's NOTIFY queue.
                        let alive = tokio::time::timeout(
                            self.connect_timeout,
                            sqlx::query_scalar::<_, f64>("SELECT pg_notification_queue_usage()")
                                .fetch_one(&mut listener),
                        ).await;
                        if let Ok(Ok(usage)) = alive {
                            self.queue_usage.store(usage.to_bits(), Ordering::Relaxed);
                            self.metrics.notify_queue_usage(usage);
                        }
                        if !matches!(alive, Ok(Ok(_))) {
                            tracing::warn!("listener connection does not answer; reconnecting and re-syncing watched streams");
                            break;
                        }
                    }
                }
            }
        }
    }

    async fn connect(&self) -> Result<PgListener, sqlx::Error> {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(self.connect_timeout)
            .connect_lazy_with(self.opts.clone());
        let mut listener = PgListener::connect_with(&pool).await?;
        listener.listen(CHANNEL).await?;
        Ok(listener)
    }

    /// Handles a batch of wake-ups: those of one stream coalesced (runs of
    /// events of one epoch become one range; a creation or deletion stays
    /// in its place), streams handled in parallel, a few at a time.
    async fn wake_all(&self, payloads: Vec<String>) {
        let per = coalesce(payloads.iter().map(String::as_str), |s| {
            self.hub.is_watched(s)
        });
        futures::stream::iter(per)
            .for_each_concurrent(WAKE_STREAMS, |(stream, wakes)| async move {
                for wake in wakes {
                    self.wake(&stream, wake).await;
                }
            })
            .await;
    }

    /// Handles one (coalesced) wake-up of a watched stream.
    async fn wake(&self, stream: &str, wake: Wake) {
        let (epoch, first, last) = match &wake {
            Wake::Events { epoch, first, last } => (epoch.as_str(), *first, *last),
            Wake::Changed => return self.hub.changed(stream),
        };
        let mut after = match self.hub.ring_head(stream) {
            Some((e, head)) if &*e == epoch => {
                if head >= last {
                    return; // Published already (this node's own commit).
                }
                head
            }
            _ => first - 1,
        };
        for _ in 0..CATCH_UP_PAGES {
            let page = match read_page(&self.pool, stream, after, self.page_size).await {
                Ok(Some(page)) if page.meta.epoch == epoch => page,
                Ok(_) => return self.hub.changed(stream),
                Err(e) => {
                    // Watchers read the store themselves, with their backoff.
                    tracing::warn!(error = %e, stream, "cannot read a stream after a wake-up");
                    return self.hub.changed(stream);
                }
            };
            let (Some(first_event), Some(last_event)) = (page.events.first(), page.events.last())
            else {
                return;
            };
            let batch = Batch::encode(
                page.meta.key,
                epoch,
                first_event.seq,
                page.events
                    .iter()
                    .map(|e| (e.event_type.as_str(), e.data.as_str())),
                last_event.event_type == END_EVENT,
            );
            after = last_event.seq;
            self.hub.publish(stream, Arc::new(batch));
            if after >= last {
                return;
            }
        }
    }
}

#[cfg(test)]
mod wake_tests {
    use super::*;

    #[test]
    fn wakeups_are_coalesced_per_stream_in_order() {
        let payloads = [
            "a e1 1 2",
            "b e9 5 5",
            "a e1 3 3",
            "a e1 4 6",
            "x e2 1 1",
            "a",
            "a e2 1 1",
            "b e9 6 9",
            "a e2 garbage 1",
        ];
        let per = coalesce(payloads.into_iter(), |s| s != "x");
        let ev = |e: &str, first, last| Wake::Events {
            epoch: e.into(),
            first,
            last,
        };
        assert_eq!(
            per,
            vec![
                (
                    "a".to_owned(),
                    vec![ev("e1", 1, 6), Wake::Changed, ev("e2", 1, 1), Wake::Changed]
                ),
                ("b".to_owned(), vec![ev("e9", 5, 9)]),
            ]
        );
    }
}
