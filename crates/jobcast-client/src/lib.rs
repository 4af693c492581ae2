//! The jobcast client: a producer that retries appends safely, and a
//! subscriber that follows a stream's log across network cuts and server
//! restarts, delivering every event exactly once, in order, then the end.
//!
//! ```no_run
//! use futures::StreamExt;
//! use jobcast_client::{Client, Item, NewEvent, Start};
//!
//! # async fn run() -> Result<(), jobcast_client::Error> {
//! let client = Client::builder("http://127.0.0.1:7700")
//!     .token("eyJhbGciOi…")
//!     .build()?;
//!
//! // Producer: retried on network errors and 5xx with one Idempotency-Key,
//! // so a retried append is never stored twice.
//! client.append("build-42", "compiling").await?;
//! client
//!     .append_batch("build-42", &[NewEvent::text("linking"), NewEvent::json(&42)?.with_type("progress")])
//!     .await?;
//! client.complete("build-42", None).await?;
//!
//! // Subscriber: reconnects with backoff and resumes with Last-Event-ID.
//! let mut watch = client.watch("build-42", Start::Beginning);
//! while let Some(item) = watch.next().await {
//!     match item? {
//!         Item::Event(e) => println!("{} {}: {}", e.id, e.event_type, e.data),
//!         Item::Reset(r) => eprintln!("reset: {:?}", r.reason),
//!         Item::End(end) => println!("ended: {}", end.state().as_str()),
//!         _ => {}
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! The rules a [`Watch`] follows (backoff, floors, what stops, what retries,
//! when a connection counts as healthy) are listed on [`Watch`]; the backoff
//! itself is the pure function [`backoff::backoff`].
//!
//! This crate depends on the protocol crate and reqwest only: it does not
//! compile the server (axum, sqlx).

pub mod backoff;
mod client;
mod error;
mod machine;
pub mod sse;
mod types;
mod watch;

pub use client::{idempotency_key, CancelSignal, Client, ClientBuilder, RetryPolicy, DEFAULT_URL};
pub use error::{BoxError, Error};
pub use jobcast_protocol::{
    EndPayload, ErrorPayload, EventId, ResetPayload, ResetReason, StreamState,
};
pub use types::{Appended, ListOptions, NewEvent, StreamInfo, StreamList};
pub use watch::{End, Event, Item, Start, StartError, State, Watch};
