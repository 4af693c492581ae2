//! A TCP proxy on 127.0.0.1 in front of one upstream (the test PostgreSQL),
//! with a switch: [`CutProxy::cut`] closes every connection through it and
//! refuses new ones (accepted and closed at once) until [`CutProxy::restore`].
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
    refused: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl CutProxy {
    /// Starts in front of `upstream`, letting connections through.
    pub async fn start(upstream: SocketAddr) -> CutProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let (open, _) = watch::channel(true);
        let refused = Arc::new(AtomicUsize::new(0));
        let (tx, r) = (open.clone(), refused.clone());
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
                        conns.spawn(pipe(client, upstream, tx.subscribe()));
                    }
                    // Reap finished connections so the set stays small.
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        CutProxy {
            addr,
            open,
            refused,
            task,
        }
    }

    /// Closes every connection through the proxy and refuses new ones.
    pub fn cut(&self) {
        self.open.send_replace(false);
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

/// Copies both ways until either side closes or the proxy is cut.
async fn pipe(mut client: TcpStream, upstream: SocketAddr, mut open: watch::Receiver<bool>) {
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        // A cut drops both sockets at once, as a network failure would.
        _ = open.wait_for(|open| !*open) => {}
    }
}
