//! What a client may send, in one place: how large each document may be on each path it
//! can take, and the shape every JSON document must have on every path.
//!
//! | document | path | bound |
//! |---|---|---|
//! | any WebSocket message (hello, inventory, result) | `/ws/{client_id}` | `WS_MAX_MESSAGE_BYTES` (64 KiB; close 1009 above) |
//! | inventory | `POST /api/v1/agents/{id}/inventory` | `MAX_INVENTORY_BYTES` (10 MiB; 413 above) |
//! | every other JSON body (commands and their `args`, jobs, tokens, …) | `/api/v1/…` | [`MAX_API_BODY`] (64 KiB; 413 above) |
//! | binary | `POST /api/v1/binaries` | `MAX_BINARY_BYTES` (512 MiB; 413 above) |
//!
//! The server keeps the JSON documents it stores and hands back (command `args`, result
//! `output`, inventories) as raw text, byte for byte as their sender wrote them: numbers of
//! any size and key order survive. Every such document, whichever path it comes by, is
//! checked by [`check_depth`] (and by `storable::check_json` for U+0000), so a document
//! one path accepts no other path refuses. The chart derives the ingress' limits per
//! route from the same numbers (`chart/values.yaml`, `limits`).

/// The largest JSON request body of the API, other than inventories.
pub const MAX_API_BODY: usize = 64 * 1024;

/// The deepest nesting of arrays and objects in a document a client sends. serde_json,
/// which the server and the agent parse documents with, refuses 128 levels; 64 leaves
/// room for the message around a document and is far beyond any real inventory.
pub const MAX_JSON_DEPTH: usize = 64;

/// A document nested deeper than [`MAX_JSON_DEPTH`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{document} is nested {depth} levels deep; at most {MAX_JSON_DEPTH} are accepted")]
pub struct TooDeep {
    /// Which document: `inventory`, `output`, `args`.
    pub document: &'static str,
    /// How deep it goes, counted until the limit was passed.
    pub depth: usize,
}

/// Refuses JSON text nested deeper than [`MAX_JSON_DEPTH`]. A lexical pass that
/// allocates nothing; text that is not JSON passes (its parser says where it is wrong).
pub fn check_depth(document: &'static str, text: &str) -> Result<(), TooDeep> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in text.as_bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_JSON_DEPTH {
                    return Err(TooDeep { document, depth });
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(levels: usize) -> String {
        "[".repeat(levels) + &"]".repeat(levels)
    }

    #[test]
    fn documents_up_to_the_depth_limit_pass_and_deeper_ones_are_named() {
        assert_eq!(check_depth("output", &nested(MAX_JSON_DEPTH)), Ok(()));
        let e = check_depth("output", &nested(200)).unwrap_err();
        assert_eq!(e.depth, MAX_JSON_DEPTH + 1);
        assert!(e.to_string().starts_with("output is nested"), "{e}");
    }

    #[test]
    fn brackets_inside_strings_do_not_count() {
        let text = format!(r#"{{"a":"{}","b":"\"[[["}}"#, "[".repeat(500));
        assert_eq!(check_depth("inventory", &text), Ok(()));
    }

    #[test]
    fn serde_json_reads_every_document_the_limit_lets_through() {
        let text = format!(
            r#"{{"type":"inventory","data":{}}}"#,
            nested(MAX_JSON_DEPTH)
        );
        assert!(serde_json::from_str::<serde_json::Value>(&text).is_ok());
    }
}
