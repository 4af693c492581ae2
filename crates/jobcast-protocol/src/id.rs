//! Stream ids, event types and event ids (`{epoch}-{seq}`).

use std::fmt;

/// Why an id or type was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum IdError {
    /// Not `^[A-Za-z0-9][A-Za-z0-9._:-]{0,199}$`.
    InvalidStreamId,
    /// Not `^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$`.
    InvalidEventType,
    /// Not `^[a-z0-9]{1,16}-(0|[1-9][0-9]*)$` with seq ≤ 2^64−1.
    InvalidEventId,
}

impl fmt::Display for IdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IdError::InvalidStreamId => {
                "a stream id is 1 to 200 characters of A-Z a-z 0-9 . _ : - starting with a letter or digit"
            }
            IdError::InvalidEventType => {
                "an event type is 1 to 64 characters of A-Z a-z 0-9 . _ : - starting with a letter or digit"
            }
            IdError::InvalidEventId => "an event id is {epoch}-{seq}, e.g. k3x9q-42",
        })
    }
}

impl std::error::Error for IdError {}

fn valid_name(s: &str, max: usize) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= max
        && b[0].is_ascii_alphanumeric()
        && b[1..]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b':' | b'-'))
}

/// Checks a stream id against `^[A-Za-z0-9][A-Za-z0-9._:-]{0,199}$`.
pub fn validate_stream_id(s: &str) -> Result<(), IdError> {
    if valid_name(s, 200) {
        Ok(())
    } else {
        Err(IdError::InvalidStreamId)
    }
}

/// Checks an event type against `^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$`
/// (the reserved `jobcast.` prefix is checked by the caller).
pub fn validate_event_type(s: &str) -> Result<(), IdError> {
    if valid_name(s, 64) {
        Ok(())
    } else {
        Err(IdError::InvalidEventType)
    }
}

/// A validated stream id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(String);

impl StreamId {
    /// Validates and wraps a stream id.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        validate_stream_id(s)?;
        Ok(StreamId(s.to_owned()))
    }
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A position in a stream: the epoch of the stream's creation and a seq.
/// `{epoch}-0` means "before the first event".
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EventId {
    /// The stream's epoch, `[a-z0-9]{1,16}`.
    pub epoch: String,
    /// The event's seq (0 = before the first event).
    pub seq: u64,
}

/// Checks an epoch against `[a-z0-9]{1,16}`.
pub fn valid_epoch(s: &str) -> bool {
    (1..=16).contains(&s.len())
        && s.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
}

impl EventId {
    /// Builds an id from parts.
    pub fn new(epoch: impl Into<String>, seq: u64) -> Self {
        EventId {
            epoch: epoch.into(),
            seq,
        }
    }

    /// Parses `^[a-z0-9]{1,16}-(0|[1-9][0-9]*)$` with seq ≤ 2^64−1.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        let (epoch, seq) = s.split_once('-').ok_or(IdError::InvalidEventId)?;
        if !valid_epoch(epoch)
            || seq.is_empty()
            || !seq.bytes().all(|c| c.is_ascii_digit())
            || (seq.len() > 1 && seq.starts_with('0'))
        {
            return Err(IdError::InvalidEventId);
        }
        let seq: u64 = seq.parse().map_err(|_| IdError::InvalidEventId)?;
        Ok(EventId {
            epoch: epoch.to_owned(),
            seq,
        })
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.epoch, self.seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn stream_ids() {
        for ok in ["a", "A9", "job-1", "a.b_c:d-e", &"x".repeat(200)] {
            assert!(validate_stream_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", ".a", "a/b", "a b", "é", &"x".repeat(201), "a%2F"] {
            assert_eq!(
                validate_stream_id(bad),
                Err(IdError::InvalidStreamId),
                "{bad}"
            );
        }
    }

    #[test]
    fn event_types() {
        assert!(validate_event_type(&"t".repeat(64)).is_ok());
        assert!(validate_event_type(&"t".repeat(65)).is_err());
        assert!(validate_event_type("_x").is_err());
    }

    #[test]
    fn event_ids() {
        assert_eq!(
            EventId::parse("k3x9q-42").unwrap(),
            EventId::new("k3x9q", 42)
        );
        assert_eq!(EventId::parse("a-0").unwrap(), EventId::new("a", 0));
        assert_eq!(
            EventId::parse("a-18446744073709551615").unwrap().seq,
            u64::MAX
        );
        for bad in [
            "",
            "a",
            "a-",
            "-1",
            "A-1",
            "a-01",
            "a-+1",
            "a--1",
            "a-1-2",
            "a-18446744073709551616",
            "abcdefghijklmnopq-1",
            "a-1 ",
            " a-1",
        ] {
            assert_eq!(EventId::parse(bad), Err(IdError::InvalidEventId), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn event_id_round_trips(epoch in "[a-z0-9]{1,16}", seq in any::<u64>()) {
            let id = EventId::new(epoch, seq);
            prop_assert_eq!(EventId::parse(&id.to_string()).unwrap(), id);
        }

        #[test]
        fn event_id_parse_never_panics(s in "\\PC{0,40}") {
            let _ = EventId::parse(&s);
        }
    }
}
