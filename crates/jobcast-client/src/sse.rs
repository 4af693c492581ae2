//! The client's SSE framing: one [`FrameReader`] per connection over the
//! protocol crate's WHATWG decoder (BOM, CR / LF / CRLF, multi-line data,
//! NUL in `id` ignored, digits-only `retry`, incomplete event dropped at the
//! end of a connection).

pub use jobcast_protocol::decode::{DecodeError, Frame, SseEvent};

use jobcast_protocol::decode::Decoder;

/// Turns the bytes of one SSE response into frames.
///
/// A new reader is used for every connection: each response is its own
/// event stream (a leading BOM is stripped again, nothing half-parsed carries
/// over). The client keeps its resume position itself rather than in the
/// decoder's last-event-id buffer, so control events never move it.
#[derive(Debug, Default)]
pub struct FrameReader {
    decoder: Decoder,
}

impl FrameReader {
    /// A reader for a new connection.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds a chunk (split anywhere) and appends the complete frames to
    /// `out`; an error once a line or an event passes the decoder's bound
    /// (16 MiB): the connection is broken and should be dropped.
    pub fn feed(&mut self, chunk: &[u8], out: &mut Vec<Frame>) -> Result<(), DecodeError> {
        self.decoder.try_feed(chunk, out)
    }

    /// The connection ended: an event not terminated by a blank line is discarded.
    pub fn finish(&mut self) {
        self.decoder.finish();
    }

    /// Decodes a whole response body: feed, then finish.
    pub fn decode_all(body: &[u8]) -> Vec<Frame> {
        let mut reader = FrameReader::new();
        let mut out = Vec::new();
        // Past the bound, the frames before it are what the body holds.
        let _ = reader.feed(body, &mut out);
        reader.finish();
        out
    }
}
