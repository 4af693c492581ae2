//! What the producer API sends and receives.

use jobcast_protocol::{EventId, StreamState};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

use crate::error::Error;

/// An event to append: a type (default `message`) and data.
#[derive(Debug, Clone, Serialize)]
pub struct NewEvent {
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    event_type: Option<String>,
    data: Data,
}

/// Event data: text sent as is, or a JSON value the server stores compact.
#[derive(Debug, Clone)]
enum Data {
    Text(String),
    Json(Box<RawValue>),
}

impl Serialize for Data {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Data::Text(t) => s.serialize_str(t),
            Data::Json(raw) => raw.serialize(s),
        }
    }
}

impl NewEvent {
    /// An event whose data is this text (watchers receive it as is; it must not be empty).
    pub fn text(data: impl Into<String>) -> Self {
        NewEvent {
            event_type: None,
            data: Data::Text(data.into()),
        }
    }

    /// An event whose data is a JSON value (watchers receive it as compact JSON).
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<Self, Error> {
        let raw = serde_json::value::to_raw_value(value).map_err(Error::Encode)?;
        Ok(NewEvent {
            event_type: None,
            data: Data::Json(raw),
        })
    }

    /// Sets the event type (`^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$`, not starting with `jobcast.`).
    pub fn with_type(mut self, event_type: impl Into<String>) -> Self {
        self.event_type = Some(event_type.into());
        self
    }
}

impl From<&str> for NewEvent {
    fn from(s: &str) -> Self {
        NewEvent::text(s)
    }
}

impl From<String> for NewEvent {
    fn from(s: String) -> Self {
        NewEvent::text(s)
    }
}

/// The answer to an append: the ids of the first and last event appended.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct Appended {
    /// The id of the first event appended.
    #[serde(deserialize_with = "event_id")]
    pub first_id: EventId,
    /// The id of the last event appended.
    #[serde(deserialize_with = "event_id")]
    pub last_id: EventId,
    /// How many events were appended.
    pub count: u64,
    /// Whether a cancel of the stream was requested (the producer should
    /// stop and end the stream; see [`Client::cancel_signal`](crate::Client::cancel_signal)).
    #[serde(default)]
    pub cancel_requested: bool,
}

/// A stream's metadata.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct StreamInfo {
    /// The stream id.
    pub id: String,
    /// The epoch of this creation of the stream.
    pub epoch: String,
    /// `open`, `completed` or `failed`.
    pub state: StreamState,
    /// RFC 3339 UTC time of creation.
    pub created_at: String,
    /// RFC 3339 UTC time of the last change.
    pub updated_at: String,
    /// The id of the last event (including `jobcast.end`), `None` for an empty stream.
    #[serde(deserialize_with = "opt_event_id")]
    pub last_id: Option<EventId>,
    /// How many events the log holds (including `jobcast.end`).
    pub events: u64,
    /// SSE watchers connected to the node that answered.
    pub watchers: u64,
    /// Labels set with [`Client::set_labels`](crate::Client::set_labels).
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Whether a cancel was requested ([`Client::cancel`](crate::Client::cancel)).
    #[serde(default)]
    pub cancel_requested: bool,
}

/// A page of the stream list.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct StreamList {
    /// Streams, newest created first.
    pub streams: Vec<StreamInfo>,
    /// The cursor of the next page (for [`ListOptions::after`]), `None` on the last page.
    pub next: Option<String>,
}

/// Filters and paging for [`Client::list`](crate::Client::list).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListOptions {
    /// Only streams in this state.
    pub state: Option<StreamState>,
    /// Page size, 1..1000 (server default 100).
    pub limit: Option<u32>,
    /// The `next` cursor of the previous page.
    pub after: Option<String>,
    /// Only streams whose id starts with this.
    pub prefix: Option<String>,
    /// Only streams with every one of these labels.
    pub labels: Vec<(String, String)>,
}

fn event_id<'de, D: Deserializer<'de>>(d: D) -> Result<EventId, D::Error> {
    let s = String::deserialize(d)?;
    EventId::parse(&s).map_err(serde::de::Error::custom)
}

fn opt_event_id<'de, D: Deserializer<'de>>(d: D) -> Result<Option<EventId>, D::Error> {
    match Option::<String>::deserialize(d)? {
        None => Ok(None),
        Some(s) => EventId::parse(&s)
            .map(Some)
            .map_err(serde::de::Error::custom),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_event_serializes_text_and_json() {
        let t = serde_json::to_string(&NewEvent::text("a\"b")).unwrap();
        assert_eq!(t, r#"{"data":"a\"b"}"#);
        let j = NewEvent::json(&serde_json::json!({"k": [1, 2]}))
            .unwrap()
            .with_type("progress");
        assert_eq!(
            serde_json::to_string(&j).unwrap(),
            r#"{"type":"progress","data":{"k":[1,2]}}"#
        );
        let n = NewEvent::json(&()).unwrap();
        assert_eq!(serde_json::to_string(&n).unwrap(), r#"{"data":null}"#);
    }

    #[test]
    fn answers_deserialize() {
        let a: Appended =
            serde_json::from_str(r#"{"first_id":"ab-1","last_id":"ab-3","count":3}"#).unwrap();
        assert_eq!(a.last_id, EventId::new("ab", 3));
        assert!(
            serde_json::from_str::<Appended>(r#"{"first_id":"x","last_id":"ab-3","count":3}"#)
                .is_err()
        );
        let s: StreamInfo = serde_json::from_str(
            r#"{"id":"j","epoch":"ab","state":"open","created_at":"t","updated_at":"t","last_id":null,"events":0,"watchers":2,"extra":1}"#,
        )
        .unwrap();
        assert_eq!(
            (s.state, s.last_id, s.watchers),
            (StreamState::Open, None, 2)
        );
    }
}
