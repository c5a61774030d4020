//! Version order (which agents a rollout updates): a total order on any strings, so that
//! "is older" never depends on which pair is compared first. Input: up to three versions,
//! one a line.
#![no_main]

use std::cmp::Ordering;

use agent_protocol::version::compare;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines = text.splitn(3, '\n');
    let (a, b, c) = (
        lines.next().unwrap_or(""),
        lines.next().unwrap_or(""),
        lines.next().unwrap_or(""),
    );
    assert_eq!(compare(a, a), Ordering::Equal, "{a:?}");
    assert_eq!(compare(a, b), compare(b, a).reverse(), "{a:?} {b:?}");
    if compare(a, b) != Ordering::Greater && compare(b, c) != Ordering::Greater {
        assert_ne!(compare(a, c), Ordering::Greater, "{a:?} ≤ {b:?} ≤ {c:?}");
    }
});
