//! The jobcast wire protocol, with no I/O: stream ids, event ids
//! (`{epoch}-{seq}`), the SSE encoder, a sans-IO SSE decoder that follows the
//! WHATWG rules, and the payloads of the control events (`jobcast.end`,
//! `jobcast.error`, `jobcast.reset`).
//!
//! Both the server and the clients build on this crate, so that the grammar
//! of ids and the framing of events are written once.

pub mod control;
pub mod decode;
pub mod encode;
pub mod id;
pub mod json;

pub use control::{EndPayload, ErrorPayload, ResetPayload, ResetReason, StreamState};
pub use id::{validate_event_type, validate_stream_id, EventId, IdError, StreamId};

/// The event type of an event appended without one.
pub const DEFAULT_EVENT_TYPE: &str = "message";
/// The type of the final event of every stream.
pub const END_EVENT: &str = "jobcast.end";
/// The type of the event a cancel request appends (an ordinary log event:
/// it has an id; producers learn of it from their append answers).
pub const CANCEL_EVENT: &str = "jobcast.cancel_requested";
/// The type of the control event that reports a problem before closing.
pub const ERROR_EVENT: &str = "jobcast.error";
/// The type of the control event that reports a resume point that could not be honoured.
pub const RESET_EVENT: &str = "jobcast.reset";
/// The prefix reserved for control events (case-sensitive).
pub const RESERVED_PREFIX: &str = "jobcast.";

/// One event of a stream's log, as the JSON page returns it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Event {
    /// The SSE id, `{epoch}-{seq}`.
    pub id: String,
    /// Position in the stream, 1, 2, 3 … with no gaps.
    pub seq: u64,
    /// The event type (`message` by default; `jobcast.end` for the end).
    #[serde(rename = "type")]
    pub event_type: String,
    /// The data as stored (UTF-8 text; JSON values are stored compact).
    pub data: String,
    /// RFC 3339 UTC time with milliseconds, from the server's clock.
    pub time: String,
}
