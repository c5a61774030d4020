//! Secrets the embedded default keeps in its data directory: the signing key and the web
//! UI's admin password, each generated on first use and read back afterwards. The only
//! file I/O of the configuration (`config.rs` parses and does no I/O).

use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::config::{MIN_ADMIN_PASSWORD_CHARS, MIN_SECRET_KEY_BYTES, Secret};

/// The signing key at `path`, or a new one (32 random bytes in hex).
pub(crate) fn load_or_create_signing_key(path: &Path) -> io::Result<Secret> {
    load_or_create(path, "key", MIN_SECRET_KEY_BYTES, || {
        let key: [u8; 32] = rand::random();
        key.iter().map(|b| format!("{b:02x}")).collect()
    })
}

/// The admin password at `path`, or a new one: 24 characters from an alphabet without
/// look-alikes, so a person can type it.
pub(crate) fn load_or_create_admin_password(path: &Path) -> io::Result<Secret> {
    const ALPHABET: &[u8] = b"abcdefghjkmnpqrstuvwxyzABCDEFGHJKMNPQRSTUVWXYZ23456789";
    load_or_create(path, "password", MIN_ADMIN_PASSWORD_CHARS, || {
        (0..24)
            .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
            .collect()
    })
}

/// Reads the secret at `path` (at least `min_chars` once trimmed), or writes a fresh one
/// from `generate` with mode 0600. If two processes race to create it, one wins and the
/// other reads the winner's.
fn load_or_create(
    path: &Path,
    what: &str,
    min_chars: usize,
    generate: impl Fn() -> String,
) -> io::Result<Secret> {
    loop {
        match std::fs::read_to_string(path) {
            Ok(s) if s.trim().chars().count() >= min_chars => return Ok(Secret::new(s.trim())),
            Ok(_) => {
                return Err(io::Error::other(format!(
                    "{} holds a {what} shorter than {min_chars} characters; delete it to generate a new one",
                    path.display()
                )));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let secret = generate();
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(mut f) => {
                f.write_all(secret.as_bytes())?;
                f.sync_all()?;
                return Ok(Secret::new(secret));
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_is_generated_once_then_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("key");
        let first = load_or_create_signing_key(&path).unwrap();
        assert_eq!(first.expose().len(), 64);
        let again = load_or_create_signing_key(&path).unwrap();
        assert_eq!(first.expose(), again.expose());
        std::fs::write(&path, "short").unwrap();
        let e = load_or_create_signing_key(&path).unwrap_err();
        assert!(e.to_string().contains("shorter than 32"), "{e}");
    }

    #[test]
    fn generated_admin_password_is_private_and_stable() {
        let dir = std::env::temp_dir().join(format!("agent-server-pw-{}", std::process::id()));
        let path = dir.join("admin_password");
        let _ = std::fs::remove_file(&path);
        let first = load_or_create_admin_password(&path).unwrap();
        let again = load_or_create_admin_password(&path).unwrap();
        assert_eq!(first, again);
        assert_eq!(first.expose().len(), 24);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
