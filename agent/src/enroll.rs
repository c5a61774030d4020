//! Enrollment: an agent configured with an enroll secret (`enroll_secret` or
//! `enroll_secret_file`) instead of a token trades it, once, for a token of its own at
//! `POST /api/v1/enroll` (`{"secret", "client_id", "hostname"}` → 201 `{"client_id",
//! "token", "expires_at", "labels"}`), and keeps that token in `<state_dir>/token`
//! (mode 0600, written to a temporary file, synced, then renamed). From then on, and
//! after every restart, it connects with the stored token; it enrolls again only when
//! that token has expired.
//!
//! A stored token the server refuses (the agent was deleted or its credentials revoked)
//! is never replaced by itself: enrolling again would undo the operator's decision.
//! The agent stops (exit 77) and says what to do: remove the token file, and have the
//! operator allow the enrollment (delete the agent, or hand out a secret with
//! `allow_reenroll`).

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use agent_protocol::Claims;
use base64::Engine;

use crate::config::Secret;
use crate::net::Net;

/// The enrolled token's file name in the state directory.
pub const TOKEN_FILE: &str = "token";

/// What the server said to an enrollment.
#[derive(Debug)]
pub enum Answer {
    /// 201: the token to store.
    Enrolled {
        token: Secret,
        expires_at: String,
        labels: Vec<String>,
    },
    /// 400, 401, 403, 409: this secret or client id will not do; only an operator can
    /// change that. `message` is the server's, which says which check failed.
    Refused { status: u16, message: String },
    /// 429, 503 and other 5xx: try again, not before `retry_after` when it is given.
    Later {
        status: u16,
        retry_after: Option<Duration>,
        message: String,
    },
}

/// Asks the server for this agent's own token. An error only when no answer came.
pub async fn enroll(
    net: &Net,
    secret: &Secret,
    client_id: &str,
    hostname: Option<String>,
) -> Result<Answer, String> {
    let body = serde_json::json!({
        "secret": secret.expose(),
        "client_id": client_id,
        "hostname": hostname,
    })
    .to_string();
    let resp = net.post("/api/v1/enroll", None, body).await?;
    match resp.status {
        201 => {
            let v: serde_json::Value = serde_json::from_slice(&resp.body)
                .map_err(|e| format!("the enrollment answer is not JSON: {e}"))?;
            let token = v["token"]
                .as_str()
                .filter(|t| !t.is_empty())
                .ok_or("the enrollment answer has no token")?;
            Ok(Answer::Enrolled {
                token: Secret::new(token),
                expires_at: v["expires_at"].as_str().unwrap_or_default().to_string(),
                labels: v["labels"]
                    .as_array()
                    .map(|l| {
                        l.iter()
                            .filter_map(|s| s.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default(),
            })
        }
        status @ (400 | 401 | 403 | 404 | 409 | 413 | 415 | 422) => Ok(Answer::Refused {
            status,
            message: resp.error_message(),
        }),
        status => Ok(Answer::Later {
            status,
            retry_after: resp.retry_after,
            message: resp.error_message(),
        }),
    }
}

/// Writes the token to `path` atomically with mode 0600: a crash leaves either the old
/// file or the new one, never a torn token.
pub fn store_token(path: &Path, token: &Secret) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let dir = path.parent().unwrap_or(Path::new("."));
    // Directories created here are the agent's alone, like systemd's StateDirectory.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let tmp = path.with_extension("tmp");
    // A leftover from a crash may carry other permissions: start afresh.
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(token.expose().as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    // The rename is durable once the directory is.
    std::fs::File::open(dir)?.sync_all()
}

/// The token's claims, read without checking the signature: only the server can check
/// that, and the agent only needs to know whether to present the token or enroll again.
pub fn claims(token: &Secret) -> Option<Claims> {
    let payload = token.expose().split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice::<Claims>(&bytes).ok()
}

/// Why a stored token should not be presented, if it should not: it expired by `now`
/// (seconds since the Unix epoch), or it was issued to another client id (the
/// configuration changed). A token whose claims cannot be read is presented anyway:
/// the server has the last word.
pub fn unusable(token: &Secret, client_id: &str, now: u64) -> Option<&'static str> {
    let claims = claims(token)?;
    if claims.exp <= now {
        Some("the enrolled token has expired")
    } else if claims.sub != client_id {
        Some("the enrolled token belongs to another client_id")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_protocol::Role;

    fn jwt(claims: &Claims) -> Secret {
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        Secret::new(format!(
            "{}.{}.{}",
            b64(br#"{"alg":"HS256","typ":"JWT"}"#),
            b64(&serde_json::to_vec(claims).unwrap()),
            b64(b"signature")
        ))
    }

    #[test]
    fn an_expired_token_or_one_for_another_id_is_not_presented() {
        let token = jwt(&Claims::new("web-1", Role::Agent, 100, 200));
        assert_eq!(claims(&token).map(|c| c.exp), Some(200));
        assert_eq!(unusable(&token, "web-1", 199), None);
        assert!(unusable(&token, "web-1", 200).unwrap().contains("expired"));
        assert!(
            unusable(&token, "web-2", 199)
                .unwrap()
                .contains("another client_id")
        );
        assert_eq!(unusable(&Secret::new("not-a-jwt"), "web-1", u64::MAX), None);
    }

    #[test]
    fn the_token_is_stored_whole_and_readable_by_its_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state").join(TOKEN_FILE);
        store_token(&path, &Secret::new("first")).unwrap();
        store_token(&path, &Secret::new("second")).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "second\n");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!path.with_extension("tmp").exists());
    }
}
