//! Compact JSON: valid JSON text with its insignificant whitespace removed,
//! members in the order written, strings copied as written.

/// Removes insignificant whitespace from `json`, which must be valid JSON
/// (e.g. a `serde_json::value::RawValue`). Strings, numbers and member order
/// are kept exactly as written, so no value is changed by a round trip.
pub fn compact(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    let mut in_string = false;
    let mut escaped = false;
    for c in json.chars() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else {
            match c {
                ' ' | '\t' | '\n' | '\r' => {}
                '"' => {
                    in_string = true;
                    out.push(c);
                }
                _ => out.push(c),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::compact;

    #[test]
    fn removes_only_insignificant_whitespace() {
        assert_eq!(
            compact("{ \"b\" : [1, 2.50 , 1e3],\n \"a\":\"x y \\\" z\", \"é\": null }"),
            "{\"b\":[1,2.50,1e3],\"a\":\"x y \\\" z\",\"é\":null}"
        );
        assert_eq!(compact(" true "), "true");
        assert_eq!(compact("\"\\\\\" "), "\"\\\\\"");
    }
}
