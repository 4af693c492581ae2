//! Payloads of the control events: `jobcast.end`, `jobcast.error`, `jobcast.reset`.

use serde::{Deserialize, Serialize};

/// The state of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamState {
    /// Accepting appends.
    Open,
    /// Ended by `complete`.
    Completed,
    /// Ended by `fail`.
    Failed,
}

impl StreamState {
    /// The state as the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            StreamState::Open => "open",
            StreamState::Completed => "completed",
            StreamState::Failed => "failed",
        }
    }

    /// Parses `open`, `completed` or `failed`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "open" => Some(StreamState::Open),
            "completed" => Some(StreamState::Completed),
            "failed" => Some(StreamState::Failed),
            _ => None,
        }
    }
}

/// Data of `jobcast.end`: `{"state","error"?,"data"?}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EndPayload {
    /// `completed` or `failed`.
    pub state: StreamState,
    /// The failure message given to `fail`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The value given to `complete`, as JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Box<serde_json::value::RawValue>>,
}

impl PartialEq for EndPayload {
    fn eq(&self, other: &Self) -> bool {
        self.state == other.state
            && self.error == other.error
            && self.data.as_ref().map(|d| d.get()) == other.data.as_ref().map(|d| d.get())
    }
}

impl Eq for EndPayload {}

/// Data of `jobcast.error`: `{"code","message","retryable","retry_after_ms"?,"refresh"?}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorPayload {
    /// A stable snake_case code, e.g. `stream_deleted`.
    pub code: String,
    /// For humans.
    pub message: String,
    /// Whether the client should reconnect (and resume).
    pub retryable: bool,
    /// The least time to wait before reconnecting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
    /// Set on `token_expired`: reconnect with a fresh token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh: Option<bool>,
}

/// Why a resume point could not be honoured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResetReason {
    /// The id names another creation of the stream (deleted and created again).
    EpochMismatch,
    /// The events after the id were removed by retention.
    HistoryTrimmed,
    /// Right epoch, but a seq beyond the log.
    UnknownPosition,
}

/// Data of `jobcast.reset`: `{"reason","requested","resumed_from"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResetPayload {
    /// Why.
    pub reason: ResetReason,
    /// The id the client asked to resume from.
    pub requested: String,
    /// The id just before the first event sent, or null.
    pub resumed_from: Option<String>,
}
