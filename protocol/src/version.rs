//! Which of two agent versions is newer: the order rollouts use (`docs/protocol.md`,
//! "Updates"), shared by the server, which decides who is offered a build, and agents,
//! which refuse a downgrade the rollout did not allow.
//!
//! Agents report free-form version strings; most are semantic versions (`2.4.1`,
//! `v2.5.0-rc.1`, `2.5.0+build.7`). The order is SemVer's where the strings are SemVer,
//! and stays total and sensible where they are not: a leading `v` is ignored, build
//! metadata after `+` is ignored, missing components count as 0 (`2.5` = `2.5.0`),
//! numeric components compare as numbers, others as text, and a pre-release (`-rc.1`)
//! sorts before its release.

use std::cmp::Ordering;

/// Compares two version strings; see the module documentation for the rules.
pub fn compare(a: &str, b: &str) -> Ordering {
    let (a_main, a_pre) = split(a);
    let (b_main, b_pre) = split(b);
    let (a_parts, b_parts): (Vec<&str>, Vec<&str>) =
        (a_main.split('.').collect(), b_main.split('.').collect());
    for i in 0..a_parts.len().max(b_parts.len()) {
        let x = a_parts.get(i).copied().unwrap_or("0");
        let y = b_parts.get(i).copied().unwrap_or("0");
        match identifier(x, y) {
            Ordering::Equal => continue,
            other => return other,
        }
    }
    match (a_pre, b_pre) {
        (None, None) => Ordering::Equal,
        (None, Some(_)) => Ordering::Greater,
        (Some(_), None) => Ordering::Less,
        (Some(x), Some(y)) => {
            let (xs, ys): (Vec<&str>, Vec<&str>) = (x.split('.').collect(), y.split('.').collect());
            for (p, q) in xs.iter().zip(ys.iter()) {
                match identifier(p, q) {
                    Ordering::Equal => continue,
                    other => return other,
                }
            }
            xs.len().cmp(&ys.len())
        }
    }
}

/// Whether `current` is older than `target`.
pub fn is_older(current: &str, target: &str) -> bool {
    compare(current, target) == Ordering::Less
}

fn split(v: &str) -> (&str, Option<&str>) {
    let v = v.trim();
    let v = v.strip_prefix(['v', 'V']).unwrap_or(v);
    let v = v.split('+').next().unwrap_or(v);
    match v.split_once('-') {
        Some((main, pre)) => (main, Some(pre)),
        None => (v, None),
    }
}

/// Numbers compare numerically and sort before text, as in SemVer pre-releases.
fn identifier(x: &str, y: &str) -> Ordering {
    let numeric = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    match (numeric(x), numeric(y)) {
        (true, true) => {
            let (x, y) = (x.trim_start_matches('0'), y.trim_start_matches('0'));
            x.len().cmp(&y.len()).then_with(|| x.cmp(y))
        }
        (true, false) => Ordering::Less,
        (false, true) => Ordering::Greater,
        (false, false) => x.cmp(y),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_components_compare_as_numbers() {
        assert!(is_older("2.9.0", "2.10.0"));
        assert!(is_older("1.2.3", "1.2.4"));
        assert!(!is_older("10.0.0", "9.9.9"));
        assert!(is_older("2.4.99999999999999999999", "2.5.0"), "no overflow");
    }

    #[test]
    fn missing_components_count_as_zero_and_prefix_v_is_ignored() {
        assert_eq!(compare("2.5", "2.5.0"), Ordering::Equal);
        assert_eq!(compare("v2.5.0", "2.5.0"), Ordering::Equal);
        assert!(is_older("2", "2.0.1"));
    }

    #[test]
    fn prereleases_sort_before_their_release_as_in_semver() {
        let ordered = [
            "1.0.0-alpha",
            "1.0.0-alpha.1",
            "1.0.0-alpha.beta",
            "1.0.0-beta",
            "1.0.0-beta.2",
            "1.0.0-beta.11",
            "1.0.0-rc.1",
            "1.0.0",
        ];
        for pair in ordered.windows(2) {
            assert!(is_older(pair[0], pair[1]), "{} < {}", pair[0], pair[1]);
            assert!(!is_older(pair[1], pair[0]), "{} > {}", pair[1], pair[0]);
        }
    }

    #[test]
    fn build_metadata_is_ignored() {
        assert_eq!(compare("2.5.0+build.7", "2.5.0+build.9"), Ordering::Equal);
    }
}
