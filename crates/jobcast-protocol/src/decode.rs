//! Sans-IO Server-Sent Events decoder.
//!
//! Implements the WHATWG HTML "event stream interpretation" rules
//! (<https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation>):
//! UTF-8 decoding with replacement characters, one optional leading BOM,
//! CRLF / LF / CR line endings (a CRLF pair may be split across feeds),
//! comments, the `event`, `data`, `id` and `retry` fields, dispatch on a blank
//! line, and discarding an incomplete event at end of stream.
//!
//! The decoder performs no I/O: callers [`Decoder::feed`] it bytes in chunks of
//! any size and collect the [`Frame`]s it produces.
//!
//! It is bounded: a line (any field, or a comment) and an event's data may
//! each hold at most [`Decoder::max_bytes`] bytes (default
//! [`DEFAULT_MAX_BYTES`], 16 MiB). Past that the stream is broken (a proxy
//! that lost line breaks, a hostile server): the decoder drops what it holds,
//! ignores further input and reports [`DecodeError`] from
//! [`Decoder::try_feed`] (and [`Decoder::error`]) until [`Decoder::finish`].

use std::borrow::Cow;

/// The UTF-8 encoding of U+FEFF BYTE ORDER MARK.
const BOM: [u8; 3] = [0xEF, 0xBB, 0xBF];

/// One dispatched SSE event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The event type; "message" when the stream gave none.
    pub event: String,
    /// The data buffer, lines joined by '\n' (the trailing '\n' removed, per WHATWG).
    pub data: String,
    /// The last-event-id buffer at dispatch time (persists across events; an `id` containing NUL is ignored).
    pub last_event_id: String,
    /// Whether this event block itself contained a valid (not ignored) `id` field.
    pub id_set: bool,
}

/// What the decoder produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A dispatched event.
    Event(SseEvent),
    /// A `retry:` field with a valid (ASCII digits only) value, in milliseconds.
    Retry(u64),
    /// A comment line: the raw text after the leading ':' (no space stripped).
    Comment(String),
}

/// The default bound on one line and on one event's data: 16 MiB, far above
/// the server's largest event (1 MiB by default, `--max-event-bytes`).
pub const DEFAULT_MAX_BYTES: usize = 16 << 20;

/// Why a stream cannot be decoded further.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeError {
    /// A line grew past the limit without a line break.
    LineTooLong {
        /// The limit, in bytes.
        limit: usize,
    },
    /// An event's data grew past the limit before its blank line.
    EventTooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::LineTooLong { limit } => {
                write!(f, "an SSE line is longer than {limit} bytes")
            }
            DecodeError::EventTooLarge { limit } => {
                write!(f, "an SSE event's data is larger than {limit} bytes")
            }
        }
    }
}

impl std::error::Error for DecodeError {}

/// Sans-IO decoder: feed bytes, take frames.
#[derive(Debug)]
pub struct Decoder {
    /// The bound on a line and on an event's data, in bytes.
    max_bytes: usize,
    /// Set when a bound was passed: input is ignored until `finish`.
    error: Option<DecodeError>,
    /// Bytes of the current, not yet terminated line.
    line: Vec<u8>,
    /// The previous chunk ended with CR, so a leading LF in the next chunk
    /// belongs to that same line break.
    last_was_cr: bool,
    /// The leading-BOM check is over (BOM stripped, or the stream started otherwise).
    bom_checked: bool,
    /// How many bytes of a leading BOM have been consumed so far (while unchecked).
    bom_matched: usize,
    /// The data buffer.
    data: String,
    /// The event type buffer.
    event_type: String,
    /// The last event ID buffer.
    last_event_id: String,
    /// Whether the current event block contained a valid `id` field.
    id_set: bool,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder {
            max_bytes: DEFAULT_MAX_BYTES,
            error: None,
            line: Vec::new(),
            last_was_cr: false,
            bom_checked: false,
            bom_matched: 0,
            data: String::new(),
            event_type: String::new(),
            last_event_id: String::new(),
            id_set: false,
        }
    }
}

impl Decoder {
    /// A new decoder with the default bound ([`DEFAULT_MAX_BYTES`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// A new decoder whose lines and event data may each hold at most
    /// `max_bytes` bytes (at least 1).
    pub fn with_max_bytes(max_bytes: usize) -> Self {
        Decoder {
            max_bytes: max_bytes.max(1),
            ..Self::default()
        }
    }

    /// The bound on a line and on an event's data, in bytes.
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// Why the decoder stopped, if it did (until [`Decoder::finish`]).
    pub fn error(&self) -> Option<DecodeError> {
        self.error
    }

    /// Feeds bytes (any split, even inside a UTF-8 sequence or between CR and
    /// LF) and appends every complete frame to `out`. Past a bound the rest
    /// is ignored; [`Decoder::error`] says so ([`Decoder::try_feed`] returns it).
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<Frame>) {
        let _ = self.try_feed(bytes, out);
    }

    /// Like [`Decoder::feed`], returning the error once a bound is passed
    /// (frames completed before that point are still appended to `out`).
    pub fn try_feed(&mut self, bytes: &[u8], out: &mut Vec<Frame>) -> Result<(), DecodeError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        self.feed_bounded(bytes, out);
        match self.error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Gives up on the stream: frees the buffers and remembers why.
    fn broken(&mut self, e: DecodeError) {
        self.error = Some(e);
        self.line = Vec::new();
        self.data = String::new();
        self.event_type = String::new();
    }

    fn feed_bounded(&mut self, bytes: &[u8], out: &mut Vec<Frame>) {
        let mut rest = self.strip_bom(bytes);
        if rest.is_empty() {
            return;
        }

        if self.last_was_cr {
            self.last_was_cr = false;
            if rest[0] == b'\n' {
                rest = &rest[1..];
            }
        }

        while let Some(pos) = rest.iter().position(|&b| b == b'\n' || b == b'\r') {
            if self.line.len() + pos > self.max_bytes {
                return self.broken(DecodeError::LineTooLong {
                    limit: self.max_bytes,
                });
            }
            if self.line.is_empty() {
                // Fast path: the whole line is inside this chunk, no copy needed.
                self.process_line(&rest[..pos], out);
            } else {
                self.line.extend_from_slice(&rest[..pos]);
                let line = std::mem::take(&mut self.line);
                self.process_line(&line, out);
                // Reuse the allocation for the next line.
                self.line = line;
                self.line.clear();
            }

            let mut consumed = pos + 1;
            if rest[pos] == b'\r' {
                match rest.get(pos + 1) {
                    Some(b'\n') => consumed += 1,
                    Some(_) => {}
                    None => self.last_was_cr = true,
                }
            }
            rest = &rest[consumed..];
            if self.error.is_some() {
                return;
            }
        }
        if self.line.len() + rest.len() > self.max_bytes {
            return self.broken(DecodeError::LineTooLong {
                limit: self.max_bytes,
            });
        }
        self.line.extend_from_slice(rest);
    }

    /// The last event id buffer (what a client sends as Last-Event-ID).
    pub fn last_event_id(&self) -> &str {
        &self.last_event_id
    }

    /// Called at end of stream: WHATWG discards an incomplete event at EOF (do not dispatch it); resets line state.
    ///
    /// The last event id buffer is kept (a reconnecting client sends it); everything
    /// else, including the leading-BOM check, is reset so the decoder can be reused
    /// for a new stream.
    pub fn finish(&mut self) {
        self.error = None;
        self.line.clear();
        self.last_was_cr = false;
        self.bom_checked = false;
        self.bom_matched = 0;
        self.data.clear();
        self.event_type.clear();
        self.id_set = false;
    }

    /// Consumes a leading UTF-8 BOM (possibly split across feeds) and returns
    /// the bytes still to be interpreted.
    fn strip_bom<'a>(&mut self, bytes: &'a [u8]) -> &'a [u8] {
        let mut rest = bytes;
        while !self.bom_checked {
            let Some((&first, tail)) = rest.split_first() else {
                // Need more bytes to decide.
                return rest;
            };
            if first == BOM[self.bom_matched] {
                self.bom_matched += 1;
                rest = tail;
                if self.bom_matched == BOM.len() {
                    self.bom_checked = true;
                }
            } else {
                // Not a BOM: the withheld prefix bytes (EF, EF BB) are ordinary
                // content. They contain no line terminators and nothing precedes
                // them, so they simply start the current line.
                self.line.extend_from_slice(&BOM[..self.bom_matched]);
                self.bom_checked = true;
            }
        }
        rest
    }

    /// Interprets one complete line (without its terminator).
    fn process_line(&mut self, raw: &[u8], out: &mut Vec<Frame>) {
        if raw.is_empty() {
            self.dispatch(out);
            return;
        }
        let line: Cow<'_, str> = String::from_utf8_lossy(raw);
        if let Some(comment) = line.strip_prefix(':') {
            out.push(Frame::Comment(comment.to_owned()));
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (&*line, ""),
        };
        self.process_field(field, value, out);
    }

    /// Applies one field to the buffers.
    fn process_field(&mut self, field: &str, value: &str, out: &mut Vec<Frame>) {
        match field {
            "event" => {
                self.event_type.clear();
                self.event_type.push_str(value);
            }
            "data" => {
                if self.data.len() + value.len() + 1 > self.max_bytes {
                    return self.broken(DecodeError::EventTooLarge {
                        limit: self.max_bytes,
                    });
                }
                self.data.push_str(value);
                self.data.push('\n');
            }
            // An id containing NUL is ignored entirely.
            "id" if !value.contains('\0') => {
                self.last_event_id.clear();
                self.last_event_id.push_str(value);
                self.id_set = true;
            }
            "retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                // Digits only, so parsing fails only on overflow: ignore then.
                if let Ok(ms) = value.parse::<u64>() {
                    out.push(Frame::Retry(ms));
                }
            }
            _ => {}
        }
    }

    /// Dispatches the event on a blank line.
    fn dispatch(&mut self, out: &mut Vec<Frame>) {
        let id_set = std::mem::take(&mut self.id_set);
        if self.data.is_empty() {
            self.event_type.clear();
            return;
        }
        if self.data.ends_with('\n') {
            self.data.pop();
        }
        let event = if self.event_type.is_empty() {
            "message".to_owned()
        } else {
            std::mem::take(&mut self.event_type)
        };
        out.push(Frame::Event(SseEvent {
            event,
            data: std::mem::take(&mut self.data),
            last_event_id: self.last_event_id.clone(),
            id_set,
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode(input: &[u8]) -> Vec<Frame> {
        let mut d = Decoder::new();
        let mut out = Vec::new();
        d.feed(input, &mut out);
        d.finish();
        out
    }

    fn decode_bytewise(input: &[u8]) -> Vec<Frame> {
        let mut d = Decoder::new();
        let mut out = Vec::new();
        for b in input {
            d.feed(std::slice::from_ref(b), &mut out);
        }
        d.finish();
        out
    }

    fn ev(event: &str, data: &str, id: &str, id_set: bool) -> Frame {
        Frame::Event(SseEvent {
            event: event.to_owned(),
            data: data.to_owned(),
            last_event_id: id.to_owned(),
            id_set,
        })
    }

    fn both(input: &[u8]) -> Vec<Frame> {
        let whole = decode(input);
        assert_eq!(whole, decode_bytewise(input), "bytewise differs");
        whole
    }

    #[test]
    fn a_line_past_the_bound_stops_the_decoder() {
        for split in [1usize, 7, 64, 1000] {
            let mut d = Decoder::with_max_bytes(64);
            let mut out = Vec::new();
            let mut input = b"data: ok\n\n: ".to_vec();
            input.extend_from_slice(&[b'z'; 100]);
            input.extend_from_slice(b"\n\ndata: after\n\n");
            let mut err = None;
            for chunk in input.chunks(split) {
                if let Err(e) = d.try_feed(chunk, &mut out) {
                    err = Some(e);
                }
            }
            assert_eq!(
                err,
                Some(DecodeError::LineTooLong { limit: 64 }),
                "split {split}"
            );
            assert_eq!(d.error(), err);
            // What came before the bound is delivered; nothing after it.
            assert_eq!(out, vec![ev("message", "ok", "", false)], "split {split}");
            assert!(d.line.capacity() == 0, "the buffer is freed");
            d.finish();
            assert_eq!(d.error(), None);
            assert_eq!(d.try_feed(b"data: again\n\n", &mut out), Ok(()));
            assert_eq!(out.len(), 2);
        }
    }

    #[test]
    fn data_past_the_bound_stops_the_decoder() {
        let mut d = Decoder::with_max_bytes(32);
        let mut out = Vec::new();
        // Each line is short; together they pass the bound.
        let r = d.try_feed(
            b"data: 0123456789\ndata: 0123456789\ndata: 0123456789\n",
            &mut out,
        );
        assert_eq!(r, Err(DecodeError::EventTooLarge { limit: 32 }));
        assert!(out.is_empty());
        // Exactly at the bound (a 16-byte line) is fine.
        let mut d = Decoder::with_max_bytes(16);
        d.feed(b"data: 0123456789\n\n", &mut out);
        assert_eq!(d.error(), None);
        assert_eq!(out, vec![ev("message", "0123456789", "", false)]);
        assert_eq!(Decoder::new().max_bytes(), DEFAULT_MAX_BYTES);
    }

    #[test]
    fn simple_message() {
        assert_eq!(both(b"data: hi\n\n"), vec![ev("message", "hi", "", false)]);
    }

    #[test]
    fn line_endings_lf_crlf_cr_mixed() {
        let expect = vec![ev("message", "a\nb", "", false)];
        assert_eq!(both(b"data:a\ndata:b\n\n"), expect);
        assert_eq!(both(b"data:a\r\ndata:b\r\n\r\n"), expect);
        assert_eq!(both(b"data:a\rdata:b\r\r"), expect);
        assert_eq!(both(b"data:a\rdata:b\r\n\n"), expect);
        // LF CR is two line breaks: the CR alone is a blank line.
        assert_eq!(both(b"data:a\n\r"), vec![ev("message", "a", "", false)]);
    }

    #[test]
    fn crlf_split_across_feeds_is_one_break() {
        let mut d = Decoder::new();
        let mut out = Vec::new();
        d.feed(b"data:a\r", &mut out);
        d.feed(b"\ndata:b\r", &mut out);
        d.feed(b"\n\r", &mut out);
        d.feed(b"\n", &mut out);
        assert_eq!(out, vec![ev("message", "a\nb", "", false)]);
    }

    #[test]
    fn cr_then_non_lf_next_feed() {
        let mut d = Decoder::new();
        let mut out = Vec::new();
        d.feed(b"data:a\r", &mut out);
        d.feed(b"\r", &mut out);
        assert_eq!(out, vec![ev("message", "a", "", false)]);
    }

    #[test]
    fn bom_stripped_once_and_only_at_start() {
        assert_eq!(
            both(b"\xEF\xBB\xBFdata:x\n\n"),
            vec![ev("message", "x", "", false)]
        );
        // A second BOM is part of the first line, making the field name unknown.
        assert_eq!(both(b"\xEF\xBB\xBF\xEF\xBB\xBFdata:x\n\n"), vec![]);
        // A BOM not at the start is content.
        assert_eq!(
            both(b"data:\xEF\xBB\xBFx\n\n"),
            vec![ev("message", "\u{FEFF}x", "", false)]
        );
    }

    #[test]
    fn bom_split_across_feeds() {
        let mut d = Decoder::new();
        let mut out = Vec::new();
        d.feed(b"\xEF", &mut out);
        d.feed(b"", &mut out);
        d.feed(b"\xBB", &mut out);
        d.feed(b"\xBFdata:x\n\n", &mut out);
        assert_eq!(out, vec![ev("message", "x", "", false)]);
    }

    #[test]
    fn partial_bom_is_content() {
        // EF BB followed by 'd': the withheld bytes are an invalid UTF-8 prefix.
        assert_eq!(
            both(b"\xEF\xBBdata:x\n\n"),
            vec![] // field name "\u{FFFD}data" is unknown
        );
        assert_eq!(
            both(b"\xEF\xBB\n:c\n"),
            vec![Frame::Comment("c".to_owned())]
        );
        assert_eq!(
            both(b":\xEF\xBB\xBF\n"),
            vec![Frame::Comment("\u{FEFF}".to_owned())]
        );
    }

    #[test]
    fn invalid_utf8_replaced_and_split_sequences_joined() {
        assert_eq!(
            both(b"data:caf\xC3\xA9 \xFF\n\n"),
            vec![ev("message", "caf\u{e9} \u{FFFD}", "", false)]
        );
        let mut d = Decoder::new();
        let mut out = Vec::new();
        d.feed(b"data:\xC3", &mut out);
        d.feed(b"\xA9\n\n", &mut out);
        assert_eq!(out, vec![ev("message", "\u{e9}", "", false)]);
    }

    #[test]
    fn empty_line_with_empty_data_dispatches_nothing() {
        assert_eq!(both(b"\n\n\n"), vec![]);
        assert_eq!(
            both(b"event: x\n\ndata: y\n\n"),
            vec![ev("message", "y", "", false)]
        );
    }

    #[test]
    fn comment_keeps_raw_text() {
        assert_eq!(
            both(b": hi\n:\n::x\n"),
            vec![
                Frame::Comment(" hi".to_owned()),
                Frame::Comment(String::new()),
                Frame::Comment(":x".to_owned()),
            ]
        );
    }

    #[test]
    fn only_one_leading_space_removed() {
        assert_eq!(both(b"data:  x\n\n"), vec![ev("message", " x", "", false)]);
        assert_eq!(both(b"data:x \n\n"), vec![ev("message", "x ", "", false)]);
        assert_eq!(both(b"data:\tx\n\n"), vec![ev("message", "\tx", "", false)]);
    }

    #[test]
    fn value_split_on_first_colon_only() {
        assert_eq!(
            both(b"data: a: b:c\n\n"),
            vec![ev("message", "a: b:c", "", false)]
        );
    }

    #[test]
    fn field_without_colon() {
        // "data" alone appends "\n": buffer non-empty, dispatched with data "".
        assert_eq!(both(b"data\n\n"), vec![ev("message", "", "", false)]);
        assert_eq!(
            both(b"data\ndata\n\n"),
            vec![ev("message", "\n", "", false)]
        );
        // "event" alone sets the type to "", so the default applies.
        assert_eq!(
            both(b"event: x\nevent\ndata: y\n\n"),
            vec![ev("message", "y", "", false)]
        );
        // "id" alone sets the id buffer to "".
        assert_eq!(
            both(b"id: 1\ndata: a\n\nid\ndata: b\n\n"),
            vec![ev("message", "a", "1", true), ev("message", "b", "", true)]
        );
    }

    #[test]
    fn field_names_are_case_sensitive_and_exact() {
        assert_eq!(both(b"Data: x\n\n"), vec![]);
        assert_eq!(both(b"data : x\n\n"), vec![]);
        assert_eq!(both(b" data: x\n\n"), vec![]);
    }

    #[test]
    fn event_type_set_and_reset_after_dispatch() {
        assert_eq!(
            both(b"event: a\nevent: b\ndata: 1\n\ndata: 2\n\n"),
            vec![ev("b", "1", "", false), ev("message", "2", "", false)]
        );
    }

    #[test]
    fn id_persists_and_nul_is_ignored() {
        assert_eq!(
            both(b"id: 7\ndata: a\n\ndata: b\n\nid: x\0y\ndata: c\n\n"),
            vec![
                ev("message", "a", "7", true),
                ev("message", "b", "7", false),
                ev("message", "c", "7", false),
            ]
        );
    }

    #[test]
    fn id_set_even_without_dispatch() {
        let mut d = Decoder::new();
        let mut out = Vec::new();
        d.feed(b"id: 5\n\n", &mut out);
        assert!(out.is_empty());
        assert_eq!(d.last_event_id(), "5");
        // The blank line ended the block: the next event did not set an id.
        d.feed(b"data: x\n\n", &mut out);
        assert_eq!(out, vec![ev("message", "x", "5", false)]);
        // Set immediately, before the blank line.
        d.feed(b"id: 6\n", &mut out);
        assert_eq!(d.last_event_id(), "6");
        d.finish();
        assert_eq!(d.last_event_id(), "6");
    }

    #[test]
    fn retry_digits_only() {
        assert_eq!(
            both(b"retry: 3000\nretry:10a\nretry: -1\nretry:\nretry\nretry: 1.5\nretry:  5\nretry:0\n"),
            vec![Frame::Retry(3000), Frame::Retry(0)]
        );
        // Overflow is ignored.
        assert_eq!(both(b"retry: 99999999999999999999999\n"), vec![]);
        assert_eq!(
            both(b"retry: 18446744073709551615\n"),
            vec![Frame::Retry(u64::MAX)]
        );
        // Non-ASCII digits are rejected.
        assert_eq!(both("retry: \u{0661}\n".as_bytes()), vec![]);
    }

    #[test]
    fn retry_emitted_in_stream_order() {
        assert_eq!(
            both(b"data: a\nretry: 5\n: c\n\n"),
            vec![
                Frame::Retry(5),
                Frame::Comment(" c".to_owned()),
                ev("message", "a", "", false)
            ]
        );
    }

    #[test]
    fn unknown_field_ignored() {
        assert_eq!(
            both(b"foo: bar\ndata: x\n\n"),
            vec![ev("message", "x", "", false)]
        );
    }

    #[test]
    fn incomplete_event_discarded_at_eof() {
        assert_eq!(
            both(b"data: a\n\ndata: b\n"),
            vec![ev("message", "a", "", false)]
        );
        assert_eq!(
            both(b"data: a\n\ndata: b"),
            vec![ev("message", "a", "", false)]
        );
    }

    #[test]
    fn finish_resets_state_for_reuse() {
        let mut d = Decoder::new();
        let mut out = Vec::new();
        d.feed(
            b"id: 1\nevent: e\ndata: partial\ndata: no newline\r",
            &mut out,
        );
        d.finish();
        d.feed(b"\n\xEF\xBB\xBFdata: next\n\n", &mut out);
        // The LF is not swallowed as part of a pre-finish CR; it is a blank line
        // (nothing to dispatch) and the BOM is then ordinary content.
        assert_eq!(out, vec![]);

        let mut d = Decoder::new();
        let mut out = Vec::new();
        d.feed(b"id: 1\nevent: e\ndata: partial", &mut out);
        d.finish();
        d.feed(b"\xEF\xBB\xBFdata: next\n\n", &mut out);
        assert_eq!(out, vec![ev("message", "next", "1", false)]);
    }

    #[test]
    fn injection_via_data_lines_stays_data() {
        assert_eq!(
            both(b"data: x\ndata: \ndata: event: evil\n\n"),
            vec![ev("message", "x\n\nevent: evil", "", false)]
        );
    }

    const ALPHABET: &[u8] = &[
        b'\r', b'\n', b':', b' ', b'a', b'd', b'i', b'e', 0, 0xEF, 0xBB, 0xBF, 0xC3, 0xA9,
    ];

    fn input_strategy() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            prop::collection::vec(prop::sample::select(ALPHABET), 0..256),
            // Token-level inputs hit real field names far more often.
            prop::collection::vec(
                prop::sample::select(vec![
                    &b"data"[..],
                    b"id",
                    b"event",
                    b"retry",
                    b":",
                    b" ",
                    b"\r",
                    b"\n",
                    b"\r\n",
                    b"12",
                    b"a",
                    b"\0",
                    b"\xEF\xBB\xBF",
                    b"\xC3\xA9",
                    b"\xC3",
                ]),
                0..64,
            )
            .prop_map(|parts| parts.concat()),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn chunking_does_not_change_frames(
            input in input_strategy(),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..16),
        ) {
            let mut whole = Decoder::new();
            let mut expected = Vec::new();
            whole.feed(&input, &mut expected);

            let mut points: Vec<usize> = cuts.iter().map(|c| c.index(input.len() + 1)).collect();
            points.sort_unstable();
            let mut chunked = Decoder::new();
            let mut actual = Vec::new();
            let mut start = 0;
            for p in points.into_iter().chain(std::iter::once(input.len())) {
                chunked.feed(&input[start..p], &mut actual);
                start = p;
            }

            prop_assert_eq!(&actual, &expected);
            prop_assert_eq!(chunked.last_event_id(), whole.last_event_id());

            let mut bytewise = Vec::new();
            let mut d = Decoder::new();
            for b in &input {
                d.feed(std::slice::from_ref(b), &mut bytewise);
            }
            prop_assert_eq!(&bytewise, &expected);
        }
    }
}
