//! What the store can hold, as one rule for both backends.
//!
//! PostgreSQL's `text` and `jsonb` cannot hold U+0000 (NUL); SQLite can. Left to the
//! backends, the same input would be stored on one and fail on the other (a 500, or a
//! hello silently lost). So every string and JSON document a client sends is checked here,
//! at the boundary where it arrives (HTTP extractors and middleware, the WebSocket
//! session), and refused on both backends with a message that names the field.

/// A client's string or document contains U+0000.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} contains U+0000 (NUL), which cannot be stored; remove it")]
pub(crate) struct NulError {
    /// Where: a field name, a JSON path (`output.lines[2]`) or a query parameter.
    pub field: String,
}

/// Refuses a string containing U+0000; `field` names it in the error.
#[allow(dead_code)] // The string counterpart of `check_json`; no string field reaches the store unchecked by it yet.
pub(crate) fn check_text(field: &str, value: &str) -> Result<(), NulError> {
    if value.contains('\0') {
        return Err(NulError {
            field: field.to_string(),
        });
    }
    Ok(())
}

/// Refuses a JSON document in which any string, key or value, decodes to text containing
/// U+0000 (the escape `\u0000`). `document` names the whole document and prefixes the path
/// of the offending field (`{document}.a.b[2]`); an empty `document` gives bare paths.
///
/// The scan is lexical and allocates nothing, so a large inventory costs one pass; only a
/// document that contains the escape is parsed, to name the field. Text that is not JSON
/// passes: the caller's parser reports that with its own position.
pub(crate) fn check_json(document: &str, text: &str) -> Result<(), NulError> {
    if !has_nul_escape(text.as_bytes()) {
        return Ok(());
    }
    let field = match serde_json::from_str::<serde_json::Value>(text) {
        Ok(value) => {
            let mut path = document.to_string();
            if find_nul(&value, &mut path) {
                path
            } else {
                document.to_string()
            }
        }
        // Not JSON after all: the caller's parser will say where.
        Err(_) => return Ok(()),
    };
    Err(NulError {
        field: if field.is_empty() {
            "the document".into()
        } else {
            field
        },
    })
}

/// Whether a JSON text has a string with `\u0000` (or a raw NUL byte, which JSON forbids
/// anyway) in it.
fn has_nul_escape(bytes: &[u8]) -> bool {
    let mut in_string = false;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            0 => return true,
            b'"' => in_string = !in_string,
            b'\\' if in_string => {
                if bytes.get(i + 1) == Some(&b'u') && bytes.get(i + 2..i + 6) == Some(b"0000") {
                    return true;
                }
                // Skip the escaped character, so that `\"` and `\\` do not toggle.
                i += 1;
            }
            _ => {}
        }
        i += 1;
    }
    false
}

/// Appends the path of the first string containing U+0000 to `path`; false if none.
fn find_nul(value: &serde_json::Value, path: &mut String) -> bool {
    use serde_json::Value;
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().enumerate().any(|(i, item)| {
            let len = path.len();
            path.push_str(&format!("[{i}]"));
            if find_nul(item, path) {
                return true;
            }
            path.truncate(len);
            false
        }),
        Value::Object(fields) => fields.iter().any(|(key, item)| {
            let len = path.len();
            let plain = !key.is_empty()
                && key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if plain {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(key);
            } else {
                // Keys that would be ambiguous in a dotted path, NUL included, in JSON form.
                path.push_str(&format!("[{}]", serde_json::Value::from(key.as_str())));
            }
            if key.contains('\0') || find_nul(item, path) {
                return true;
            }
            path.truncate(len);
            false
        }),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(document: &str, text: &str) -> Option<String> {
        check_json(document, text).err().map(|e| e.field)
    }

    #[test]
    fn documents_without_nul_pass_whatever_their_escapes() {
        for text in [
            r#"{"a": "b"}"#,
            r#"{"a": "\\u0000"}"#,
            r#"{"a": "\u0001\"x"}"#,
            r#"["\\", "u0000"]"#,
            r#"{"n": 0, "m": "0000"}"#,
            "not json \\u0000",
        ] {
            assert_eq!(field("body", text), None, "{text}");
        }
    }

    #[test]
    fn nul_anywhere_is_refused_and_named_by_its_path() {
        assert_eq!(
            field("", r#"{"type":"hello","hostname":"web-1\u0000"}"#).as_deref(),
            Some("hostname")
        );
        assert_eq!(
            field("output", r#"{"lines": ["ok", "bad\u0000"]}"#).as_deref(),
            Some("output.lines[1]")
        );
        assert_eq!(
            field("data", r#"{"k\u0000": 1}"#).as_deref(),
            Some(r#"data["k\u0000"]"#)
        );
        assert_eq!(field("args", r#""\u0000""#).as_deref(), Some("args"));
        assert_eq!(field("", r#""\u0000""#).as_deref(), Some("the document"));
        assert_eq!(
            field("", r#"{"a": "\\\u0000"}"#).as_deref(),
            Some("a"),
            "an escaped backslash before the escape"
        );
    }

    #[test]
    fn text_with_nul_is_refused_with_its_field_name() {
        assert!(check_text("q", "web").is_ok());
        let e = check_text("q", "web\0").unwrap_err();
        assert_eq!(
            e.to_string(),
            "q contains U+0000 (NUL), which cannot be stored; remove it"
        );
    }
}
