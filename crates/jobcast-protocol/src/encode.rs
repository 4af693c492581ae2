//! The SSE encoder. Every line break inside data (CR, LF or CRLF) becomes a
//! new `data:` line, so nothing in data can start a field or an event.

/// Appends one event: `id:` (when given), `event:` (omitted for `message`),
/// one `data:` line per line of `data`, then the empty line that ends it.
///
/// `event_type` and the epoch are validated names and hold no line breaks.
pub fn event(buf: &mut Vec<u8>, id: Option<(&str, u64)>, event_type: &str, data: &str) {
    if let Some((epoch, seq)) = id {
        buf.extend_from_slice(b"id: ");
        buf.extend_from_slice(epoch.as_bytes());
        buf.push(b'-');
        push_u64(buf, seq);
        buf.push(b'\n');
    }
    if event_type != crate::DEFAULT_EVENT_TYPE {
        buf.extend_from_slice(b"event: ");
        buf.extend_from_slice(event_type.as_bytes());
        buf.push(b'\n');
    }
    let bytes = data.as_bytes();
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\n' => {
                data_line(buf, &bytes[start..i]);
                i += 1;
                start = i;
            }
            b'\r' => {
                data_line(buf, &bytes[start..i]);
                i += if bytes.get(i + 1) == Some(&b'\n') {
                    2
                } else {
                    1
                };
                start = i;
            }
            _ => i += 1,
        }
    }
    data_line(buf, &bytes[start..]);
    buf.push(b'\n');
}

fn data_line(buf: &mut Vec<u8>, line: &[u8]) {
    buf.extend_from_slice(b"data: ");
    buf.extend_from_slice(line);
    buf.push(b'\n');
}

/// Appends a comment line (`:` followed by `text`, which must hold no line break).
pub fn comment(buf: &mut Vec<u8>, text: &str) {
    buf.push(b':');
    buf.extend_from_slice(text.as_bytes());
    buf.push(b'\n');
}

/// Appends `retry: {ms}` as a single line.
pub fn retry(buf: &mut Vec<u8>, ms: u64) {
    buf.extend_from_slice(b"retry: ");
    push_u64(buf, ms);
    buf.push(b'\n');
}

fn push_u64(buf: &mut Vec<u8>, mut n: u64) {
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    buf.extend_from_slice(&tmp[i..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(id: Option<(&str, u64)>, t: &str, d: &str) -> String {
        let mut b = Vec::new();
        event(&mut b, id, t, d);
        String::from_utf8(b).unwrap()
    }

    #[test]
    fn plain_message() {
        assert_eq!(
            enc(Some(("ab", 7)), "message", "hi"),
            "id: ab-7\ndata: hi\n\n"
        );
    }

    #[test]
    fn typed_multiline() {
        assert_eq!(
            enc(Some(("e", 0)), "token", "a\rb\r\nc\nd"),
            "id: e-0\nevent: token\ndata: a\ndata: b\ndata: c\ndata: d\n\n"
        );
    }

    #[test]
    fn injection_is_data() {
        assert_eq!(
            enc(None, "message", "x\n\nevent: evil\nid: 9"),
            "data: x\ndata: \ndata: event: evil\ndata: id: 9\n\n"
        );
    }

    #[test]
    fn trailing_break_and_numbers() {
        assert_eq!(
            enc(Some(("z", u64::MAX)), "message", "a\n"),
            "id: z-18446744073709551615\ndata: a\ndata: \n\n"
        );
        let mut b = Vec::new();
        retry(&mut b, 3000);
        comment(&mut b, "");
        assert_eq!(b, b"retry: 3000\n:\n");
    }
}
