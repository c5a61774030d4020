//! The configuration parser on any values of the settings it reads: every value is
//! accepted or refused with an error naming its variable, never a panic. Input: one
//! `NAME=value` a line. The `*_FILE` forms, which read files, are left out.
#![no_main]

use std::collections::HashMap;

use agent_server::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let vars: HashMap<&str, &str> = text
        .lines()
        .filter_map(|line| line.split_once('='))
        .filter(|(name, _)| !name.ends_with("_FILE"))
        .collect();
    if let Err(e) = Config::from_source(&|k: &str| vars.get(k).map(|v| v.to_string())) {
        assert!(!e.var.is_empty() && !e.problem.is_empty(), "{e:?}");
    }
});
