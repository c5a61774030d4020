//! Version order (which agents a rollout updates): a total order on any strings, so that
//! "is older" never depends on which pair is compared first.
#![no_main]

use std::cmp::Ordering;

use agent_protocol::version::compare;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|versions: (String, String, String)| {
    let (a, b, c) = (&versions.0, &versions.1, &versions.2);
    assert_eq!(compare(a, a), Ordering::Equal, "{a:?}");
    assert_eq!(compare(a, b), compare(b, a).reverse(), "{a:?} {b:?}");
    if compare(a, b) != Ordering::Greater && compare(b, c) != Ordering::Greater {
        assert_ne!(compare(a, c), Ordering::Greater, "{a:?} ≤ {b:?} ≤ {c:?}");
    }
});
