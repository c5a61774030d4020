//! The label rule and where labels come from or are named: a hello's labels, an enroll
//! secret's (which become its agents'), and a job's target. Every label an agent can hold
//! can be named by a job and reported in a hello; a target that resolves selects only
//! valid ids and labels. Input: a first line `labels` and one label a line, or a first
//! line `target` and a job's `target` as JSON.
#![no_main]

use agent_protocol::check_client_id;
use agent_server::fuzzing::{check_label, check_labels, enroll_labels, resolve_target};
use agent_server::jobs::Target;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (kind, rest) = text.split_once('\n').unwrap_or((text, ""));
    match kind {
        "labels" => {
            let labels: Vec<String> = rest.split('\n').map(String::from).collect();
            let (kept, problem) = check_labels(labels.clone());
            assert!(kept.len() <= 32, "{kept:?}");
            for (i, label) in kept.iter().enumerate() {
                assert!(check_label(label).is_ok(), "{label:?} kept");
                assert!(labels.contains(label), "{label:?} invented");
                assert!(!kept[..i].contains(label), "{label:?} kept twice");
            }
            if problem.is_none() {
                assert!(labels.iter().all(|l| kept.contains(l)), "{labels:?}");
            }
            if let Ok(given) = enroll_labels(labels.clone()) {
                // What an enroll secret gives, a hello may report and a job may name.
                let (same, problem) = check_labels(given.clone());
                assert_eq!((&same, &problem), (&given, &None), "{labels:?}");
                if !given.is_empty() {
                    let target = Target {
                        labels: Some(given.clone()),
                        ..Target::default()
                    };
                    let selection = resolve_target(&target, "job")
                        .unwrap_or_else(|e| panic!("{given:?} cannot be targeted: {e}"));
                    assert_eq!(selection.labels, given);
                }
            }
        }
        "target" => {
            let Ok(target) = serde_json::from_str::<Target>(rest) else {
                return;
            };
            if let Ok(selection) = resolve_target(&target, "job") {
                if let Some(ids) = &selection.ids {
                    assert!(!ids.is_empty());
                    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
                    assert!(ids.iter().all(|id| check_client_id(id).is_ok()), "{ids:?}");
                }
                assert!(selection.labels.iter().all(|l| check_label(l).is_ok()));
                for word in [&selection.os, &selection.arch].into_iter().flatten() {
                    assert!(!word.is_empty() && *word == word.trim().to_lowercase(), "{word:?}");
                }
            }
        }
        _ => {}
    }
});
