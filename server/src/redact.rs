//! Redaction: the one place that keeps secrets out of everything the server writes.
//!
//! Drivers quote what they were given: libpq answers a DATABASE_URL whose password holds a
//! `%` with `invalid percent-encoded token: "<the password>"`, and any error may carry a
//! URL with its `user:password@`. Rather than trusting every error path, the log writer
//! ([`RedactingWriter`], installed by `telemetry::init`) passes every line through
//! [`redact`], which replaces each configured secret and the userinfo of every URL with
//! `***`. Errors printed outside the log (the store's open error) use [`redact`] as well.

use std::borrow::Cow;
use std::io::{self, Write};
use std::sync::RwLock;

/// What a secret is replaced with.
pub(crate) const MASK: &str = "***";

/// Pieces of a password shorter than this are not redacted on their own: a driver that
/// quotes a fragment cut at a URL delimiter leaks little, and masking every two-letter
/// string would make the logs unreadable.
const MIN_FRAGMENT_CHARS: usize = 4;

/// Every value registered so far, longest first so that a secret containing another is
/// masked whole.
static SECRETS: RwLock<Vec<String>> = RwLock::new(Vec::new());

/// Adds secret values to mask from now on. A value that looks like a URL also registers
/// its password, raw and percent-decoded, and the pieces of it a URL parser could cut it
/// into, because that is how drivers quote a URL they could not parse.
pub(crate) fn register<I, S>(values: I)
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let mut found = Vec::new();
    for value in values {
        let value = value.as_ref();
        if value.is_empty() {
            continue;
        }
        found.push(value.to_string());
        if let Some(password) = url_password(value) {
            let decoded = percent_decode(password);
            for candidate in [password.to_string(), decoded] {
                for piece in candidate.split(['/', '?', '#', '@', ':']) {
                    if piece.chars().count() >= MIN_FRAGMENT_CHARS {
                        found.push(piece.to_string());
                    }
                }
                found.push(candidate);
            }
        }
    }
    // A JSON log escapes `"` and `\` in a value, and a field recorded with `?` prints it
    // Debug-escaped: mask those spellings too.
    let escaped: Vec<String> = found
        .iter()
        .flat_map(|v| {
            let json = serde_json::to_string(v).unwrap_or_default();
            let debug = format!("{v:?}");
            // Both are quoted: strip the quotes.
            [json, debug].map(|quoted| quoted.get(1..quoted.len() - 1).unwrap_or("").to_string())
        })
        .collect();
    found.extend(escaped);
    let mut secrets = SECRETS.write().unwrap_or_else(|e| e.into_inner());
    for value in found {
        if !value.is_empty() && !secrets.contains(&value) {
            secrets.push(value);
        }
    }
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
}

/// `text` with every registered secret and every URL's `user:password@` replaced by
/// [`MASK`]. Borrowed when there was nothing to replace.
pub(crate) fn redact(text: &str) -> Cow<'_, str> {
    let mut out = Cow::Borrowed(text);
    {
        let secrets = SECRETS.read().unwrap_or_else(|e| e.into_inner());
        for secret in secrets.iter() {
            if out.contains(secret.as_str()) {
                out = Cow::Owned(out.replace(secret.as_str(), MASK));
            }
        }
    }
    match mask_userinfo(&out) {
        Some(masked) => Cow::Owned(masked),
        None => out,
    }
}

/// The password of `scheme://user:password@host...`: everything between the first `:`
/// after the scheme and the last `@`, because an unescaped password may itself hold `/`,
/// `?`, `#` or `@`.
fn url_password(url: &str) -> Option<&str> {
    let (_, rest) = url.split_once("://")?;
    let (userinfo, _) = rest.rsplit_once('@')?;
    let (_, password) = userinfo.split_once(':')?;
    (!password.is_empty()).then_some(password)
}

/// Replaces the userinfo of every `scheme://userinfo@host` in `text`; None if there is none.
fn mask_userinfo(text: &str) -> Option<String> {
    let mut out = String::new();
    let mut rest = text;
    let mut changed = false;
    while let Some(at) = rest.find("://") {
        let (before, after) = rest.split_at(at + 3);
        out.push_str(before);
        // A URL ends where the text around it resumes: whitespace or a quote.
        let end = after
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '`' | '<' | '>'))
            .unwrap_or(after.len());
        let (url, tail) = after.split_at(end);
        match url.rfind('@') {
            Some(userinfo_end) if userinfo_end > 0 && url[..userinfo_end] != *MASK => {
                out.push_str(MASK);
                out.push_str(&url[userinfo_end..]);
                changed = true;
            }
            _ => out.push_str(url),
        }
        rest = tail;
    }
    out.push_str(rest);
    changed.then_some(out)
}

/// `%XY` sequences decoded; invalid ones kept as written (as libpq refuses them, the raw
/// form is what it quotes).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push(h * 16 + l);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// A `tracing_subscriber` writer that redacts whatever it is given before passing it on.
/// The fmt layer writes each event with one `write_all` of the whole formatted line, so a
/// secret is never split across two writes.
pub(crate) struct RedactingWriter<W>(pub W);

impl<W: Write> Write for RedactingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        self.0.write_all(redact(&text).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// Makes a [`RedactingWriter`] around standard error for each event.
pub(crate) fn stderr() -> RedactingWriter<io::Stderr> {
    RedactingWriter(io::stderr())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_userinfo_is_masked_wherever_it_appears() {
        assert_eq!(
            redact("could not connect to postgres://app:s3cr3t@db:5432/agents: refused"),
            "could not connect to postgres://***@db:5432/agents: refused"
        );
        assert_eq!(
            redact("redis://127.0.0.1:6379/0 and \"rediss://u:p@r:6380\""),
            "redis://127.0.0.1:6379/0 and \"rediss://***@r:6380\""
        );
    }

    #[test]
    fn a_password_with_url_reserved_characters_is_masked_whole_and_in_pieces() {
        register(["postgresql://app:Vx7#kQ9?mz%2Lr:8@db.example:5432/agents"]);
        // What libpq prints for it.
        assert_eq!(
            redact("invalid percent-encoded token: \"Vx7#kQ9?mz%2Lr:8\""),
            "invalid percent-encoded token: \"***\""
        );
        assert!(!redact("port \"mz%2Lr\" is invalid").contains("mz%2Lr"));
    }

    #[test]
    fn registered_values_are_masked_and_other_text_is_borrowed() {
        register(["correct-horse-battery-staple"]);
        assert_eq!(
            redact("auth failed for correct-horse-battery-staple"),
            "auth failed for ***"
        );
        assert!(matches!(redact("nothing to hide"), Cow::Borrowed(_)));
    }

    #[test]
    fn escaped_spellings_of_a_secret_are_masked_too() {
        register([r#"pa"ss\word-1"#]);
        assert_eq!(
            redact(r#"{"error":"auth pa\"ss\\word-1"}"#),
            r#"{"error":"auth ***"}"#
        );
    }

    #[test]
    fn percent_decoding_keeps_invalid_sequences() {
        assert_eq!(percent_decode("p%40ss%2"), "p@ss%2");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
