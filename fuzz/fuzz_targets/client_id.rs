//! The `client_id` rule: every id it accepts can be addressed in a URL path unchanged (no
//! URL normaliser removes or rewrites it), and every id made from a host name passes it.
#![no_main]

use agent_protocol::{check_client_id, client_id_from_hostname};
use libfuzzer_sys::fuzz_target;

/// RFC 3986 §5.2.4: what curl, browsers and the web UI do to a path before sending it.
fn remove_dot_segments(path: &str) -> String {
    let mut output: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').collect();
    let last = segments.len() - 1;
    for (i, segment) in segments.iter().enumerate() {
        match *segment {
            "." => {
                if i == last {
                    output.push("");
                }
            }
            ".." => {
                if output.len() > 1 {
                    output.pop();
                }
                if i == last {
                    output.push("");
                }
            }
            s => output.push(s),
        }
    }
    output.join("/")
}

fuzz_target!(|data: &[u8]| {
    let Ok(id) = std::str::from_utf8(data) else {
        return;
    };
    if check_client_id(id).is_ok() {
        let path = format!("/api/v1/agents/{id}");
        assert_eq!(remove_dot_segments(&path), path, "{id:?} is not addressable");
        assert!(
            id.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)),
            "{id:?} needs escaping somewhere"
        );
    }
    if let Some(made) = client_id_from_hostname(id) {
        assert!(check_client_id(&made).is_ok(), "{id:?} became {made:?}");
    }
});
