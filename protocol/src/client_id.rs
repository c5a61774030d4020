//! The `client_id` rule: 1 to 128 characters of `[A-Za-z0-9._-]`, safe in URLs, file
//! names, log lines and Redis keys without escaping.

pub const MAX_CLIENT_ID_LEN: usize = 128;

fn allowed(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// Checks `id` against the rule; the error says which part is wrong.
pub fn check_client_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_CLIENT_ID_LEN {
        return Err(format!(
            "client_id must be 1 to {MAX_CLIENT_ID_LEN} characters long (got {})",
            id.len()
        ));
    }
    if let Some(bad) = id.chars().find(|c| !allowed(*c)) {
        return Err(format!(
            "client_id may contain only letters, digits, '.', '_' and '-' (found {bad:?})"
        ));
    }
    if id == "." || id == ".." {
        return Err(format!(
            "client_id may not be `{id}`: URL clients remove that path segment, so the agent could not be addressed"
        ));
    }
    Ok(())
}

/// A host name made into a valid `client_id`: every other character becomes `-`, and the
/// result is cut to the maximum length. `None` when nothing usable is left.
pub fn client_id_from_hostname(hostname: &str) -> Option<String> {
    let id: String = hostname
        .trim()
        .chars()
        .map(|c| if allowed(c) { c } else { '-' })
        .take(MAX_CLIENT_ID_LEN)
        .collect();
    (check_client_id(&id).is_ok() && id.chars().any(|c| c.is_ascii_alphanumeric())).then_some(id)
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
        for bad in ["a b", "a/b", "a%2Fb", "ä", "a:b", ".", ".."] {
            assert!(check_client_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn host_names_are_normalised_to_the_rule() {
        assert_eq!(
            client_id_from_hostname("web-1.example.com").as_deref(),
            Some("web-1.example.com")
        );
        assert_eq!(
            client_id_from_hostname("Büro PC").as_deref(),
            Some("B-ro-PC")
        );
        let long = client_id_from_hostname(&"h".repeat(300)).unwrap();
        assert!(check_client_id(&long).is_ok());
        assert_eq!(client_id_from_hostname("  "), None);
        assert_eq!(client_id_from_hostname("---"), None);
    }
}
