//! One memory budget for the whole server (`--memory-budget`): the bytes of
//! replay frames waiting for their socket, request bodies being read, and the
//! hub's rings. Past it, new replays are refused (503 with Retry-After) and
//! running ones wait for room, and rings keep only their newest batch;
//! nothing acknowledged is lost (watchers catch up from the store later).
//!
//! A [`Permit`] holds its bytes until dropped; a frame's permit rides inside
//! its `Bytes` ([`Permit::attach`]), so it is released exactly when the
//! connection has written (or dropped) the frame.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use prometheus_client::metrics::gauge::Gauge;

/// The budget; a cheap handle.
#[derive(Debug, Clone)]
pub struct Budget {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    limit: usize,
    used: AtomicUsize,
    gauge: Gauge,
}

impl Budget {
    /// A budget of `limit` bytes, reported in `gauge`.
    pub fn new(limit: usize, gauge: Gauge) -> Budget {
        Budget {
            inner: Arc::new(Inner {
                limit,
                used: AtomicUsize::new(0),
                gauge,
            }),
        }
    }

    /// A budget that never refuses (for tests and tools).
    pub fn unlimited() -> Budget {
        Budget::new(usize::MAX, Gauge::default())
    }

    /// The configured limit.
    pub fn limit(&self) -> usize {
        self.inner.limit
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.inner.used.load(Ordering::Relaxed)
    }

    /// Whether the budget is used up.
    pub fn exhausted(&self) -> bool {
        self.used() >= self.inner.limit
    }

    /// `n` bytes if they fit (always when nothing is held, so one item
    /// larger than the budget can still make progress).
    pub fn try_take(&self, n: usize) -> Option<Permit> {
        let inner = &self.inner;
        let mut used = inner.used.load(Ordering::Relaxed);
        loop {
            if used != 0 && used.saturating_add(n) > inner.limit {
                return None;
            }
            match inner.used.compare_exchange_weak(
                used,
                used.saturating_add(n),
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(now) => used = now,
            }
        }
        self.report();
        Some(Permit {
            budget: self.clone(),
            bytes: n,
        })
    }

    /// `n` bytes whether they fit or not (memory already allocated, such as
    /// a committed batch entering a ring).
    pub fn take(&self, n: usize) -> Permit {
        self.inner.used.fetch_add(n, Ordering::AcqRel);
        self.report();
        Permit {
            budget: self.clone(),
            bytes: n,
        }
    }

    fn release(&self, n: usize) {
        self.inner.used.fetch_sub(n, Ordering::AcqRel);
        self.report();
    }

    fn report(&self) {
        let used = self.used().min(i64::MAX as usize) as i64;
        self.inner.gauge.set(used);
    }
}

/// Bytes held in a [`Budget`] until dropped.
#[derive(Debug)]
pub struct Permit {
    budget: Budget,
    bytes: usize,
}

impl Permit {
    /// The bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Holds `n` bytes instead (taking more even past the limit: the memory
    /// exists already).
    pub fn resize(&mut self, n: usize) {
        if n > self.bytes {
            self.budget
                .inner
                .used
                .fetch_add(n - self.bytes, Ordering::AcqRel);
            self.budget.report();
        } else {
            self.budget.release(self.bytes - n);
        }
        self.bytes = n;
    }

    /// Holds `n` bytes more if they fit in the budget.
    pub fn try_grow(&mut self, n: usize) -> bool {
        match self.budget.try_take(n) {
            Some(mut more) => {
                // Merged into this permit: `more` releases nothing when dropped.
                self.bytes += std::mem::take(&mut more.bytes);
                true
            }
            None => false,
        }
    }

    /// `bytes` carrying this permit: released when the last handle to
    /// them is dropped (after the connection wrote them).
    pub fn attach(mut self, bytes: Bytes) -> Bytes {
        self.resize(bytes.len());
        Bytes::from_owner(Held {
            bytes,
            _permit: self,
        })
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.budget.release(self.bytes);
    }
}

/// Bytes and the permit that accounts for them.
struct Held {
    bytes: Bytes,
    _permit: Permit,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_hold_until_dropped() {
        let b = Budget::new(100, Gauge::default());
        let a = b.try_take(60).unwrap();
        assert!(b.try_take(50).is_none());
        let c = b.try_take(40).unwrap();
        assert!(b.exhausted());
        drop(a);
        assert_eq!(b.used(), 40);
        let frame = c.attach(Bytes::from(vec![1u8; 70]));
        assert_eq!(b.used(), 70);
        let clone = frame.clone();
        drop(frame);
        assert_eq!(b.used(), 70, "held while any handle lives");
        drop(clone);
        assert_eq!(b.used(), 0);
        // One item larger than the whole budget still gets through alone.
        let big = b.try_take(500).unwrap();
        assert!(b.try_take(1).is_none());
        drop(big);
        assert_eq!(b.used(), 0);
    }
}
