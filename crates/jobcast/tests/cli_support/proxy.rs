//! A TCP proxy on 127.0.0.1 in front of one upstream (the test PostgreSQL),
//! with a switch: [`CutProxy::cut`] closes every connection through it and
//! refuses new ones (accepted and closed at once) until [`CutProxy::restore`];
//! [`CutProxy::blackhole`] makes the connections open at that moment stop
//! forwarding (both ways: bytes are read and dropped, the sockets stay
//! open, as a dead link or a dropping firewall would) while new ones pass.
//! Loopback only; the proxy's tasks end when it is dropped.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// The proxy; see the module docs.
pub struct CutProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    /// true: connections pass; false: cut.
    open: watch::Sender<bool>,
    /// Bumped by each blackhole: connections opened before it swallow.
    black: watch::Sender<u64>,
    refused: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl CutProxy {
    /// Starts in front of `upstream`, letting connections through.
    pub async fn start(upstream: SocketAddr) -> CutProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let (open, _) = watch::channel(true);
        let (black, _) = watch::channel(0u64);
        let refused = Arc::new(AtomicUsize::new(0));
        let (tx, r, b) = (open.clone(), refused.clone(), black.clone());
        let task = tokio::spawn(async move {
            // Aborted with this task (a JoinSet aborts its tasks on drop).
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((client, _)) = accepted else { continue };
                        if !*tx.borrow() {
                            // Cut: the connection is closed before a byte passes.
                            r.fetch_add(1, Ordering::Relaxed);
                            drop(client);
                            continue;
                        }
                        conns.spawn(pipe(client, upstream, tx.subscribe(), b.subscribe()));
                    }
                    // Reap finished connections so the set stays small.
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        CutProxy {
            addr,
            open,
            black,
            refused,
            task,
        }
    }

    /// Closes every connection through the proxy and refuses new ones.
    pub fn cut(&self) {
        self.open.send_replace(false);
    }

    /// Every connection open now stops forwarding in both directions (what
    /// arrives is read and dropped; nothing is closed); new ones pass.
    pub fn blackhole(&self) {
        self.black.send_modify(|g| *g += 1);
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.open.send_replace(true);
    }

    /// How many connections were refused while cut.
    pub fn refused(&self) -> usize {
        self.refused.load(Ordering::Relaxed)
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies both ways until either side closes or the proxy is cut; after a
/// blackhole, swallows both ways instead.
async fn pipe(
    mut client: TcpStream,
    upstream: SocketAddr,
    mut open: watch::Receiver<bool>,
    mut black: watch::Receiver<u64>,
) {
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let born = *black.borrow_and_update();
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => return,
        // A cut drops both sockets at once, as a network failure would.
        _ = open.wait_for(|open| !*open) => return,
        // Blackholed: from now on nothing passes, and nothing is closed.
        _ = black.wait_for(|g| *g > born) => {}
    }
    let (mut a, mut b) = ([0u8; 4096], [0u8; 4096]);
    use tokio::io::AsyncReadExt;
    loop {
        // Read and drop from either side, until a side closes or a cut.
        tokio::select! {
            n = client.read(&mut a) => if !matches!(n, Ok(1..)) { return },
            n = server.read(&mut b) => if !matches!(n, Ok(1..)) { return },
            _ = open.wait_for(|open| !*open) => return,
        }
    }
}
