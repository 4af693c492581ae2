//! Compact JSON: valid JSON text with its insignificant whitespace removed,
//! members in the order written, numbers exactly as written, and strings in
//! one canonical form: non-ASCII as UTF-8, whatever escapes the producer's
//! encoder used (SPEC: "non-ASCII as UTF-8").

use std::fmt;

/// Why a JSON text has no compact form.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CompactError {
    /// A `\uD800`–`\uDFFF` escape that is not half of a surrogate pair: it
    /// stands for no character, so it has no UTF-8 form.
    LoneSurrogate {
        /// Byte offset of the escape's backslash in the input.
        offset: usize,
    },
}

impl fmt::Display for CompactError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CompactError::LoneSurrogate { offset } => write!(
                f,
                "a \\u escape at byte {offset} is a lone surrogate (half of a pair), \
                 which is no character and cannot be UTF-8"
            ),
        }
    }
}

impl std::error::Error for CompactError {}

/// The compact form of `json`, which must be valid JSON (e.g. a
/// `serde_json::value::RawValue`; other input is copied, never a panic).
///
/// - Whitespace outside strings is removed; members stay in the order
///   written (duplicates too), numbers exactly as written (`1.0`, `1e400`).
/// - In strings, `\uXXXX` escapes of characters that need none become the
///   character in UTF-8: `\u00e9` is `é`, a surrogate pair one character,
///   `\u0041` is `A`, `\/` is `/`.
/// - What JSON requires escaped stays escaped, in the short form where
///   there is one: `\"`, `\\`, `\b \f \n \r \t`, else `\u00xx` (lowercase;
///   the same as serde_json writes).
/// - A lone surrogate escape is refused: [`CompactError::LoneSurrogate`].
pub fn compact(json: &str) -> Result<String, CompactError> {
    let b = json.as_bytes();
    let mut out = String::with_capacity(json.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b' ' | b'\t' | b'\n' | b'\r' => i += 1,
            b'"' => i = string(json, i, &mut out)?,
            _ => {
                // A run up to the next whitespace or string: split only at
                // ASCII bytes, so always on a character boundary.
                let start = i;
                while i < b.len() && !matches!(b[i], b' ' | b'\t' | b'\n' | b'\r' | b'"') {
                    i += 1;
                }
                out.push_str(&json[start..i]);
            }
        }
    }
    Ok(out)
}

/// Copies the string starting with the quote at `open` in canonical form;
/// the index after its closing quote.
fn string(json: &str, open: usize, out: &mut String) -> Result<usize, CompactError> {
    let b = json.as_bytes();
    out.push('"');
    let mut i = open + 1;
    let mut run = i;
    while i < b.len() {
        match b[i] {
            b'"' => {
                out.push_str(&json[run..=i]);
                return Ok(i + 1);
            }
            b'\\' => {
                out.push_str(&json[run..i]);
                i = escape(json, i, out)?;
                run = i;
            }
            _ => i += 1,
        }
    }
    // Unterminated (not valid JSON): copied as it is.
    out.push_str(&json[run..]);
    Ok(b.len())
}

/// Writes the escape at `at` (a backslash) in canonical form; the index after it.
fn escape(json: &str, at: usize, out: &mut String) -> Result<usize, CompactError> {
    let b = json.as_bytes();
    match b.get(at + 1) {
        Some(b'/') => {
            out.push('/');
            Ok(at + 2)
        }
        Some(c @ (b'"' | b'\\' | b'b' | b'f' | b'n' | b'r' | b't')) => {
            out.push('\\');
            out.push(char::from(*c));
            Ok(at + 2)
        }
        Some(b'u') => {
            let Some(unit) = hex4(b, at + 2) else {
                // Not valid JSON: copied as written.
                out.push_str("\\u");
                return Ok(at + 2);
            };
            let lone = CompactError::LoneSurrogate { offset: at };
            let (c, next) = match unit {
                0xD800..=0xDBFF => {
                    let low = match (b.get(at + 6), b.get(at + 7)) {
                        (Some(b'\\'), Some(b'u')) => hex4(b, at + 8),
                        _ => None,
                    };
                    match low {
                        Some(low @ 0xDC00..=0xDFFF) => {
                            let scalar = 0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00);
                            (char::from_u32(scalar).ok_or(lone)?, at + 12)
                        }
                        _ => return Err(lone),
                    }
                }
                0xDC00..=0xDFFF => return Err(lone),
                _ => (char::from_u32(unit).ok_or(lone)?, at + 6),
            };
            push_char(c, out);
            Ok(next)
        }
        // Not valid JSON: the backslash is copied, the rest follows as written.
        _ => {
            out.push('\\');
            Ok(at + 1)
        }
    }
}

/// Four hex digits at `at`, as a UTF-16 code unit.
fn hex4(b: &[u8], at: usize) -> Option<u32> {
    let digits = b.get(at..at + 4)?;
    digits
        .iter()
        .try_fold(0u32, |acc, &d| Some(acc * 16 + char::from(d).to_digit(16)?))
}

/// A character of a string in canonical form: escaped only if JSON needs it.
fn push_char(c: char, out: &mut String) {
    match c {
        '"' => out.push_str("\\\""),
        '\\' => out.push_str("\\\\"),
        '\u{8}' => out.push_str("\\b"),
        '\u{c}' => out.push_str("\\f"),
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        c if u32::from(c) < 0x20 => {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            let n = u32::from(c) as usize;
            out.push_str("\\u00");
            out.push(char::from(HEX[n >> 4]));
            out.push(char::from(HEX[n & 0xf]));
        }
        c => out.push(c),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(json: &str) -> String {
        compact(json).unwrap()
    }

    #[test]
    fn removes_only_insignificant_whitespace() {
        assert_eq!(
            c("{ \"b\" : [1, 2.50 , 1e3],\n \"a\":\"x y \\\" z\", \"é\": null }"),
            "{\"b\":[1,2.50,1e3],\"a\":\"x y \\\" z\",\"é\":null}"
        );
        assert_eq!(c(" true "), "true");
        assert_eq!(c("\"\\\\\" "), "\"\\\\\"");
    }

    #[test]
    fn non_ascii_escapes_become_utf8() {
        assert_eq!(c(r#"{"name": "caf\u00e9"}"#), r#"{"name":"café"}"#);
        assert_eq!(c(r#""\u00E9\u4e2d""#), "\"é中\"");
        // A surrogate pair is one character.
        assert_eq!(c(r#""\uD83D\uDE00!""#), "\"😀!\"");
        // Escaped keys too.
        assert_eq!(c(r#"{ "\u00e9" : 1 }"#), r#"{"é":1}"#);
        // Already UTF-8: unchanged.
        assert_eq!(c("\"é 😀\""), "\"é 😀\"");
    }

    #[test]
    fn needed_escapes_stay_in_their_short_form() {
        // Control characters: the two-character form where JSON has one,
        // else \u00xx (lowercase, as serde_json writes it).
        assert_eq!(
            c(r#""\u0008\u000C\u000a\u000D\u0009\b\f\n\r\t""#),
            r#""\b\f\n\r\t\b\f\n\r\t""#
        );
        assert_eq!(c(r#""\u0000\u001F\u001f""#), r#""\u0000\u001f\u001f""#);
        // Quote and backslash, however they were written.
        assert_eq!(c(r#""\u0022\"\u005C\\""#), r#""\"\"\\\\""#);
        // Printable ASCII needs no escape: \u0041 is A, \/ is /.
        assert_eq!(c(r#""\u0041\u007a\/\u002F ~\u007f""#), "\"Az// ~\u{7f}\"");
    }

    #[test]
    fn numbers_and_order_stay_exactly_as_written() {
        assert_eq!(
            c(r#"{ "z": 1.0, "a": [1e400, -0, 2E+3, 0.10, 1.5e-7 ], "z": 2 }"#),
            r#"{"z":1.0,"a":[1e400,-0,2E+3,0.10,1.5e-7],"z":2}"#
        );
    }

    /// **Decision** (docs/protocol.md): a lone surrogate has no UTF-8 form;
    /// it is refused, as serde_json refuses it in string data.
    #[test]
    fn lone_surrogates_are_refused() {
        for (json, offset) in [
            (r#""\ud800""#, 1),
            (r#"["x", "\uDC00"]"#, 7),
            (r#""\ud83d\u0041""#, 1),
            (r#""\ud83d""#, 1),
            (r#""\ud83dx""#, 1),
            (r#""\ud83d\ud83d\ude00""#, 1),
            (r#"{"\udfff": 1}"#, 2),
        ] {
            assert_eq!(
                compact(json),
                Err(CompactError::LoneSurrogate { offset }),
                "{json}"
            );
        }
    }

    #[test]
    fn never_panics_on_invalid_input() {
        for json in [
            "\"\\",
            "\"\\u",
            "\"\\u12",
            "\"\\ud83d\\u",
            "\"\\ud83d\\",
            "\"abc",
            "\"\\x\"",
            "\"\\é\"",
            "é \"é",
            "\\u0041",
        ] {
            let _ = compact(json);
        }
        assert_eq!(c("\"\\u12"), "\"\\u12");
    }

    mod props {
        use super::super::compact;
        use proptest::prelude::*;
        use serde_json::{Map, Number, Value};

        fn value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(Value::from),
                any::<u64>().prop_map(Value::from),
                any::<f64>()
                    .prop_filter_map("finite", Number::from_f64)
                    .prop_map(Value::Number),
                any::<String>().prop_map(Value::String),
            ];
            leaf.prop_recursive(4, 48, 6, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                    prop::collection::vec((any::<String>(), inner), 0..6).prop_map(|members| {
                        Value::Object(members.into_iter().collect::<Map<_, _>>())
                    }),
                ]
            })
        }

        /// How a producer's encoder may have written a value: whitespace
        /// around tokens, and which characters it escaped as `\uXXXX`.
        #[derive(Debug, Clone, Copy)]
        struct Style {
            spaced: bool,
            /// Python's and many others' default: non-ASCII as escapes.
            ascii_only: bool,
            /// Every character escaped (upper-case hex), even `A`.
            all: bool,
        }

        fn style() -> impl Strategy<Value = Style> {
            (any::<bool>(), any::<bool>(), any::<bool>()).prop_map(|(spaced, ascii_only, all)| {
                Style {
                    spaced,
                    ascii_only,
                    all,
                }
            })
        }

        fn write(v: &Value, st: Style, out: &mut String) {
            let ws = if st.spaced { " \n\t " } else { "" };
            match v {
                Value::Array(items) => {
                    out.push('[');
                    for (i, item) in items.iter().enumerate() {
                        if i > 0 {
                            out.push_str(ws);
                            out.push(',');
                        }
                        out.push_str(ws);
                        write(item, st, out);
                    }
                    out.push_str(ws);
                    out.push(']');
                }
                Value::Object(members) => {
                    out.push('{');
                    for (i, (k, item)) in members.iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        out.push_str(ws);
                        write_str(k, st, out);
                        out.push_str(ws);
                        out.push(':');
                        out.push_str(ws);
                        write(item, st, out);
                    }
                    out.push_str(ws);
                    out.push('}');
                }
                Value::String(s) => write_str(s, st, out),
                other => out.push_str(&other.to_string()),
            }
        }

        fn write_str(s: &str, st: Style, out: &mut String) {
            out.push('"');
            for c in s.chars() {
                let escaped = st.all || (st.ascii_only && !c.is_ascii()) || (c as u32) < 0x20;
                if escaped {
                    let mut units = [0u16; 2];
                    for u in c.encode_utf16(&mut units) {
                        if st.all {
                            out.push_str(&format!("\\u{u:04X}"));
                        } else {
                            out.push_str(&format!("\\u{u:04x}"));
                        }
                    }
                } else if c == '"' || c == '\\' {
                    out.push('\\');
                    out.push(c);
                } else {
                    out.push(c);
                }
            }
            out.push('"');
        }

        proptest! {
            /// Re-parsing the compact form gives the value the producer
            /// sent, and the compact form is the one serde_json writes
            /// (UTF-8, short escapes, members in order), whatever the
            /// producer escaped or spaced.
            #[test]
            fn compact_keeps_the_value_and_is_canonical(v in value(), st in style()) {
                let mut input = String::new();
                write(&v, st, &mut input);
                let out = compact(&input).unwrap();
                let sent: Value = serde_json::from_str(&input).unwrap();
                let got: Value = serde_json::from_str(&out).unwrap();
                prop_assert_eq!(&got, &sent);
                prop_assert_eq!(&out, &serde_json::to_string(&v).unwrap());
                prop_assert_eq!(compact(&out).unwrap(), out);
            }
        }
    }
}
