//! Connection limits, applied in the accept loop before anything is parsed:
//! at most `max_connections` open at once, and at most
//! `max_connections_per_ip` from one address. A connection over a limit is
//! answered with a fixed minimal response (503 or 429, `Retry-After`, a JSON
//! error) and closed, so the client knows to back off and everyone already
//! connected keeps being served.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Most refusals being written at once; past it, sockets are just closed
/// (a flood must not turn the polite answers into the resource it exhausts).
const MAX_REFUSING: usize = 256;
/// A refusal's whole life: read the request head, answer, read what else comes.
const REFUSAL_TIME: Duration = Duration::from_secs(2);
/// Bytes of the client's request read (and dropped): the head before
/// answering, the rest before closing, so the close is a FIN and not a reset
/// that could destroy the answer in flight.
const REFUSAL_DRAIN: usize = 64 * 1024;

const SERVER_FULL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\n\
retry-after: 1\r\n\
cache-control: no-store\r\n\
connection: close\r\n\
content-length: 102\r\n\r\n\
{\"error\":{\"code\":\"too_many_connections\",\"message\":\"the server has too many connections; retry later\"}}";

const IP_FULL: &[u8] = b"HTTP/1.1 429 Too Many Requests\r\n\
content-type: application/json\r\n\
retry-after: 1\r\n\
cache-control: no-store\r\n\
connection: close\r\n\
content-length: 112\r\n\r\n\
{\"error\":{\"code\":\"too_many_connections_per_ip\",\"message\":\"too many connections from your address; retry later\"}}";

/// Which limit a connection met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// `max_connections`: 503.
    Server,
    /// `max_connections_per_ip`: 429.
    PerIp,
}

/// Open connections, in all and per address; a cheap handle.
#[derive(Debug, Clone)]
pub(crate) struct Limiter {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    max: usize,
    max_per_ip: Option<usize>,
    open: AtomicUsize,
    refusing: AtomicUsize,
    /// std Mutex: a short map update per accept and per close, never held across an await.
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// One admitted connection; its slot is given back on drop.
#[derive(Debug)]
pub(crate) struct Slot {
    limiter: Limiter,
    ip: IpAddr,
}

impl Limiter {
    /// A limiter with these limits.
    pub(crate) fn new(max: usize, max_per_ip: Option<usize>) -> Limiter {
        Limiter {
            inner: Arc::new(Inner {
                max,
                max_per_ip,
                open: AtomicUsize::new(0),
                refusing: AtomicUsize::new(0),
                per_ip: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Admits a connection from `ip`, or says which limit it met.
    pub(crate) fn admit(&self, ip: IpAddr) -> Result<Slot, Refusal> {
        let inner = &self.inner;
        if inner.open.fetch_add(1, Ordering::AcqRel) >= inner.max {
            inner.open.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::Server);
        }
        if let Some(max_per_ip) = inner.max_per_ip {
            let mut map = lock(&inner.per_ip);
            let n = map.entry(ip).or_insert(0);
            if *n >= max_per_ip {
                drop(map);
                inner.open.fetch_sub(1, Ordering::AcqRel);
                return Err(Refusal::PerIp);
            }
            *n += 1;
        }
        Ok(Slot {
            limiter: self.clone(),
            ip,
        })
    }

    /// Connections open now.
    pub(crate) fn open(&self) -> usize {
        self.inner.open.load(Ordering::Acquire)
    }

    /// Answers `sock` with the refusal and closes it, on a small task of its
    /// own, bounded in time, bytes and number.
    pub(crate) fn refuse(&self, mut sock: TcpStream, why: Refusal) {
        let inner = self.inner.clone();
        if inner.refusing.fetch_add(1, Ordering::AcqRel) >= MAX_REFUSING {
            inner.refusing.fetch_sub(1, Ordering::AcqRel);
            return; // dropped: closed without an answer
        }
        // The task ends within REFUSAL_TIME; it is not tracked, since it holds no state worth waiting for at shutdown.
        tokio::spawn(async move {
            let answer = match why {
                Refusal::Server => SERVER_FULL,
                Refusal::PerIp => IP_FULL,
            };
            let _ = tokio::time::timeout(REFUSAL_TIME, async {
                // Wait for the request head (scanned for its blank line, not
                // parsed): an answer sent before the request is one a client
                // may drop as unsolicited.
                let mut buf = [0u8; 1024];
                let mut tail = [0u8; 4];
                let mut read = 0;
                while read < REFUSAL_DRAIN {
                    let n = sock.read(&mut buf).await?;
                    if n == 0 {
                        return Ok(());
                    }
                    read += n;
                    if head_ended(&mut tail, &buf[..n]) {
                        break;
                    }
                }
                sock.write_all(answer).await?;
                sock.shutdown().await?;
                // Read what else comes (a body), so the close is a FIN.
                while read < REFUSAL_DRAIN {
                    match sock.read(&mut buf).await? {
                        0 => break,
                        n => read += n,
                    }
                }
                Ok::<_, std::io::Error>(())
            })
            .await;
            inner.refusing.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let inner = &self.limiter.inner;
        if inner.max_per_ip.is_some() {
            let mut map = lock(&inner.per_ip);
            if let Some(n) = map.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    // Freed at zero: the map holds only addresses with open connections.
                    map.remove(&self.ip);
                }
            }
        }
        inner.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Feeds `bytes` through a window of the last four bytes; true once a
/// blank line (`\r\n\r\n` or `\n\n`) went by.
fn head_ended(tail: &mut [u8; 4], bytes: &[u8]) -> bool {
    for &b in bytes {
        tail.copy_within(1.., 0);
        tail[3] = b;
        if tail == b"\r\n\r\n" || tail[2..] == *b"\n\n" {
            return true;
        }
    }
    false
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this lock leaves only counts behind: keep going.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_have_the_right_lengths() {
        for a in [SERVER_FULL, IP_FULL] {
            let text = std::str::from_utf8(a).unwrap();
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(len, body.len(), "{head}");
            let v: serde_json::Value = serde_json::from_str(body).unwrap();
            assert!(v["error"]["code"].is_string());
        }
    }

    #[test]
    fn head_end_is_found_across_reads() {
        let mut t = [0u8; 4];
        assert!(!head_ended(&mut t, b"GET / HTTP/1.1\r\nHost: x\r"));
        assert!(!head_ended(&mut t, b"\n"));
        assert!(head_ended(&mut t, b"\r\n"));
        let mut t = [0u8; 4];
        assert!(head_ended(&mut t, b"GET / HTTP/1.0\n\n"));
    }

    #[test]
    fn slots_are_counted_and_given_back() {
        let l = Limiter::new(3, Some(2));
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        let a1 = l.admit(a).unwrap();
        let _a2 = l.admit(a).unwrap();
        assert_eq!(l.admit(a).unwrap_err(), Refusal::PerIp);
        let _b1 = l.admit(b).unwrap();
        assert_eq!(l.admit(b).unwrap_err(), Refusal::Server);
        assert_eq!(l.open(), 3);
        drop(a1);
        assert_eq!(l.open(), 2);
        let _a3 = l.admit(a).unwrap();
        assert_eq!(lock(&l.inner.per_ip).len(), 2);
    }
}

/// The address a request came from (put into its extensions by the accept loop).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer(pub(crate) IpAddr);

/// Caps on SSE watchers per client address and per token subject
/// (`--max-watchers-per-ip`, `--max-watchers-per-subject`; off by default:
/// behind a proxy every watcher has the proxy's address).
#[derive(Debug, Default)]
pub(crate) struct WatcherCaps {
    per_ip: Option<usize>,
    per_subject: Option<usize>,
    /// std Mutex: a map update per watch start and end, never held across an await.
    counts: Mutex<HashMap<WatcherKey, usize>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum WatcherKey {
    Ip(IpAddr),
    Subject(String),
}

/// Which cap refused a watcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WatcherCap {
    /// `--max-watchers-per-ip`.
    PerIp(usize),
    /// `--max-watchers-per-subject`.
    PerSubject(usize),
}

impl WatcherCaps {
    /// Caps as configured (None: no cap).
    pub(crate) fn new(per_ip: Option<usize>, per_subject: Option<usize>) -> WatcherCaps {
        WatcherCaps {
            per_ip,
            per_subject,
            counts: Mutex::new(HashMap::new()),
        }
    }

    /// A slot for one more watcher from `ip` with `subject`, or the cap it hit.
    pub(crate) fn admit(
        self: &Arc<Self>,
        ip: Option<IpAddr>,
        subject: Option<&str>,
    ) -> Result<WatcherSlot, WatcherCap> {
        let mut keys = Vec::new();
        if let (Some(max), Some(ip)) = (self.per_ip, ip) {
            keys.push((WatcherKey::Ip(ip), WatcherCap::PerIp(max), max));
        }
        if let (Some(max), Some(sub)) = (self.per_subject, subject) {
            keys.push((
                WatcherKey::Subject(sub.to_owned()),
                WatcherCap::PerSubject(max),
                max,
            ));
        }
        if keys.is_empty() {
            return Ok(WatcherSlot {
                caps: self.clone(),
                keys: Vec::new(),
            });
        }
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        for (key, cap, max) in &keys {
            if counts.get(key).copied().unwrap_or(0) >= *max {
                return Err(*cap);
            }
        }
        for (key, _, _) in &keys {
            *counts.entry(key.clone()).or_insert(0) += 1;
        }
        Ok(WatcherSlot {
            caps: self.clone(),
            keys: keys.into_iter().map(|(k, _, _)| k).collect(),
        })
    }
}

/// A watcher's place under the caps; given back when dropped.
#[derive(Debug)]
pub(crate) struct WatcherSlot {
    caps: Arc<WatcherCaps>,
    keys: Vec<WatcherKey>,
}

impl Drop for WatcherSlot {
    fn drop(&mut self) {
        if self.keys.is_empty() {
            return;
        }
        let mut counts = self.caps.counts.lock().unwrap_or_else(|e| e.into_inner());
        for key in self.keys.drain(..) {
            if let Some(n) = counts.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    counts.remove(&key);
                }
            }
        }
    }
}
