//! The client's error type.

use std::time::Duration;

use jobcast_protocol::ErrorPayload;

/// A boxed error, used as the source of input errors.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in the client.
///
/// The source chain is kept: print it with `{:#}` (anyhow) or walk
/// [`std::error::Error::source`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An argument was rejected before any request was sent (stream id, event id, URL, token).
    #[error("invalid {what} {value:?}")]
    InvalidInput {
        /// What was rejected, e.g. "stream id".
        what: &'static str,
        /// The rejected value (hidden for secrets).
        value: String,
        /// Why.
        #[source]
        source: BoxError,
    },
    /// The HTTP client could not be built (e.g. no TLS backend).
    #[error("cannot build the HTTP client")]
    Build(#[source] reqwest::Error),
    /// A request got no answer: connection refused or reset, DNS, TLS, timeout.
    #[error("request to {url} failed")]
    Network {
        /// The URL requested.
        url: String,
        /// What reqwest reported.
        #[source]
        source: reqwest::Error,
    },
    /// An SSE connection received no byte (not even a heartbeat) for the read timeout.
    #[error("no data from {url} for {timeout:?}")]
    ReadTimeout {
        /// The URL watched.
        url: String,
        /// The read timeout.
        timeout: Duration,
    },
    /// An SSE connection closed before the stream's end.
    #[error("the connection closed before the end of the stream")]
    Disconnected,
    /// The event stream passed the decoder's bound (a line or an event over
    /// 16 MiB): a broken proxy or server; the watch reconnects.
    #[error("the event stream is broken")]
    Decode(#[source] jobcast_protocol::decode::DecodeError),
    /// The server answered with an error status.
    #[error("the server answered {status} {code}: {message}")]
    Api {
        /// The HTTP status.
        status: u16,
        /// The stable snake_case code, e.g. `stream_not_found` (`http_{status}` when the body had none).
        code: String,
        /// The server's message, for humans.
        message: String,
        /// The `Retry-After` header, if any.
        retry_after: Option<Duration>,
    },
    /// An answer that does not follow the protocol.
    #[error("unexpected answer from the server: {detail}")]
    Protocol {
        /// What was wrong.
        detail: String,
        /// A JSON error, when the answer did not parse.
        #[source]
        source: Option<serde_json::Error>,
    },
    /// The server ended a watch with a `jobcast.error` (e.g. `stream_deleted`).
    #[error("the server ended the watch: {} ({})", .0.code, .0.message)]
    Stream(ErrorPayload),
    /// Event data could not be encoded as JSON.
    #[error("cannot encode the data as JSON")]
    Encode(#[source] serde_json::Error),
    /// Retrying did not succeed within the configured attempts or time.
    #[error("gave up after {attempts} attempts in {elapsed:?}")]
    GaveUp {
        /// Attempts made (failures counted).
        attempts: u32,
        /// Time spent without success (for a watch: without a healthy connection).
        elapsed: Duration,
        /// The last failure.
        #[source]
        last: Box<Error>,
    },
}

impl Error {
    /// The HTTP status of an [`Error::Api`] (also behind [`Error::GaveUp`]).
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Api { status, .. } => Some(*status),
            Error::GaveUp { last, .. } => last.status(),
            _ => None,
        }
    }

    /// The stable error code of an [`Error::Api`] or [`Error::Stream`] (also behind [`Error::GaveUp`]).
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Api { code, .. } => Some(code),
            Error::Stream(p) => Some(&p.code),
            Error::GaveUp { last, .. } => last.code(),
            _ => None,
        }
    }

    /// Whether a retry could succeed: network errors, timeouts, 5xx, 408, 429
    /// and retryable `jobcast.error`s.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Network { .. }
            | Error::ReadTimeout { .. }
            | Error::Disconnected
            | Error::Decode(_) => true,
            Error::Api { status, .. } => retryable_status(*status),
            Error::Stream(p) => p.retryable,
            _ => false,
        }
    }
}

/// Statuses that are retried: 5xx, 408 Request Timeout and 429 Too Many Requests.
pub(crate) fn retryable_status(status: u16) -> bool {
    (500..=599).contains(&status) || status == 408 || status == 429
}
