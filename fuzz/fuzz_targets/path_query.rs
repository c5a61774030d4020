//! The path and query string of a request, as the server's routes decode them
//! (`/ws/{client_id}`, the list endpoints' `limit`, `after`, `before`, `q`, `status`,
//! `online`, `label`, `actor`, `action`): any text as the request target. Every answer is
//! what was decoded (200) or a JSON 400 with a code, never a panic or a 5xx; a decoded
//! client_id follows the id rule; a page size lies within its bounds; nothing decoded
//! holds U+0000 (the store refuses it on PostgreSQL).
#![no_main]

use agent_protocol::check_client_id;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

/// Whether any string within `v` holds U+0000.
fn has_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(a) => a.iter().any(has_nul),
        Value::Object(o) => o.values().any(has_nul),
        _ => false,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(target) = std::str::from_utf8(data) else {
        return;
    };
    let Some((status, body)) = agent_server::fuzzing::get_uri(target) else {
        return;
    };
    match status {
        200 => {
            assert!(!has_nul(&body), "{target:?} decoded to {body}");
            if let Some(id) = body["client_id"].as_str() {
                assert!(check_client_id(id).is_ok(), "{target:?} gave client_id {id:?}");
            }
            if let Some(limit) = body["limit"].as_i64() {
                assert!((1..=1000).contains(&limit), "{target:?} gave limit {limit}");
            }
        }
        400 => {
            let code = body["error"]["code"].as_str();
            assert!(code.is_some_and(|c| !c.is_empty()), "{target:?}: {body}");
        }
        _ => panic!("{target:?} answered {status}: {body}"),
    }
});
