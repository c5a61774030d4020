//! Identifier rules shared by the WebSocket path, the API and the token minter, and the
//! one label rule of every place a label comes from or is named in.

/// The `client_id` rule, shared with agents: the protocol crate holds the one copy.
pub(crate) use agent_protocol::check_client_id;

/// Most labels one agent, enroll secret or job target holds.
pub(crate) const MAX_LABELS: usize = 32;
/// Longest label, in bytes (they are ASCII).
pub(crate) const MAX_LABEL_LEN: usize = 64;

/// The label rule (docs/protocol.md, `hello.labels`): 1 to [`MAX_LABEL_LEN`] of
/// `A-Z a-z 0-9 . _ : / -`. The same for labels an agent reports, labels an enroll secret
/// gives, and labels a job target or a rollout names, so that every label an agent can
/// hold can be targeted. The error says the rule.
pub(crate) fn check_label(label: &str) -> Result<(), String> {
    let valid = !label.is_empty()
        && label.len() <= MAX_LABEL_LEN
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:/-".contains(&b));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "a label is 1 to {MAX_LABEL_LEN} letters, digits, '.', '_', ':', '/' or '-' (got {label:?})"
        ))
    }
}

/// Milliseconds since the Unix epoch as RFC 3339 UTC with milliseconds.
pub(crate) fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm), valid for the proleptic Gregorian calendar.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        tod / 3600,
        tod % 3600 / 60,
        tod % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids_follow_the_documented_charset_and_length() {
        assert!(check_client_id("host-01.example_a").is_ok());
        assert!(check_client_id(&"a".repeat(128)).is_ok());
        assert!(check_client_id("").is_err());
        assert!(check_client_id(&"a".repeat(129)).is_err());
        for bad in ["a b", "a/b", "a%2Fb", "ä", "a:b"] {
            assert!(check_client_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ids_a_url_normaliser_would_change_are_refused() {
        for bad in [".", ".."] {
            let e = check_client_id(bad).unwrap_err();
            assert!(e.contains("path segment"), "{e}");
        }
        // Only whole dot segments are removed; dots within an id are kept by URL clients.
        for good in ["...", ".a", "a.", "a..b", "..a"] {
            assert!(check_client_id(good).is_ok(), "{good}");
        }
    }

    #[test]
    fn labels_are_short_words_of_a_url_safe_charset() {
        for good in [
            "canary",
            "region:eu",
            "tier/web",
            "a.b_c-d",
            &"x".repeat(64),
        ] {
            assert!(check_label(good).is_ok(), "{good}");
        }
        for bad in ["", "web server", "ü", "a\0", "a,b", &"x".repeat(65)] {
            let e = check_label(bad).unwrap_err();
            assert!(e.contains("1 to 64"), "{e}");
        }
    }

    #[test]
    fn timestamps_format_as_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_796_000_000_123), "2026-11-30T00:53:20.123Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }
}
