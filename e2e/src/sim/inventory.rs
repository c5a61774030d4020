//! Inventory documents: valid JSON of an exact size, shaped like a package list.

use bytes::Bytes;

/// A JSON object of exactly `size` bytes (at least 24): a list of packages, then padding.
pub fn document(size: usize) -> Bytes {
    let head = r#"{"packages":["#;
    let tail_open = r#"],"pad":""#;
    let tail_close = r#""}"#;
    let fixed = head.len() + tail_open.len() + tail_close.len();
    let size = size.max(fixed);
    let mut out = String::with_capacity(size);
    out.push_str(head);
    let mut i = 0u64;
    loop {
        let entry = format!(
            r#"{}{{"name":"pkg-{i:06}","version":"1.{}.{}","arch":"x86_64"}}"#,
            if i == 0 { "" } else { "," },
            i % 17,
            i % 5
        );
        if out.len() + entry.len() + fixed - head.len() > size {
            break;
        }
        out.push_str(&entry);
        i += 1;
    }
    out.push_str(tail_open);
    let pad = size - out.len() - tail_close.len();
    out.extend(std::iter::repeat_n('x', pad));
    out.push_str(tail_close);
    debug_assert_eq!(out.len(), size);
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_are_valid_json_of_the_exact_size() {
        for size in [24, 25, 100, 4096, 65_000, 10 * 1024 * 1024] {
            let doc = document(size);
            assert_eq!(doc.len(), size);
            let v: serde_json::Value = serde_json::from_slice(&doc).unwrap();
            assert!(v["packages"].is_array());
        }
    }
}
