//! Bearer tokens as the server checks them (`Tokens::verify_at`): any text, and any JSON
//! claims correctly signed, so that every check after the signature meets fuzzed input.
//! An accepted token's claims always hold at the time they were checked. Input: a first
//! line `verify` and a token as a client sends it, or a first line with the time of the
//! check (seconds since the Unix epoch) and JSON claims that get signed with the key.
#![no_main]

use agent_server::auth::Tokens;
use agent_server::config::Secret;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;

const KEY: &str = "fuzz-key-0123456789abcdef0123456789abcdef";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (first, rest) = text.split_once('\n').unwrap_or((text, ""));
    let tokens = Tokens::new(&Secret::new(KEY), Algorithm::HS256);
    if first == "verify" {
        let _ = agent_server::fuzzing::verify_at(&tokens, rest, 1_800_000_000.0);
        return;
    }
    let Ok(now) = first.parse::<u32>() else {
        return;
    };
    let Ok(raw) = RawValue::from_string(rest.to_string()) else {
        return;
    };
    let token = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &raw,
        &EncodingKey::from_secret(KEY.as_bytes()),
    )
    .expect("HMAC signing");
    let now = f64::from(now);
    if let Ok(c) = agent_server::fuzzing::verify_at(&tokens, &token, now) {
        let leeway = tokens.leeway().as_secs_f64();
        assert!(!c.sub.is_empty());
        assert!((c.exp as f64) + 1.0 + leeway > now, "{c:?} expired at {now}");
        if let Some(nbf) = c.nbf {
            assert!(now + leeway >= nbf as f64 - 1.0, "{c:?} not yet valid at {now}");
        }
    }
});
