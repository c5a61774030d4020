//! The web UI's sign-in: the admin password (kept only as a MAC) and the per-replica
//! limit on failed attempts. Sessions themselves are rows in the store, keyed by a hash
//! of the cookie, so signing out ends a session on every replica.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::binaries::storage::hex;
use crate::config::{AdminPasswordSource, Config, Secret};
use crate::secrets::load_or_create_admin_password;

/// The session cookie's name.
pub(crate) const COOKIE: &str = "agent_server_session";
/// Failed sign-ins allowed per window, per replica; more are refused with 429 until the
/// window ends, so the password cannot be guessed at speed.
const MAX_FAILURES: u32 = 10;
const FAILURE_WINDOW: Duration = Duration::from_secs(60);

type HmacSha256 = Hmac<Sha256>;

/// What the sign-in endpoint checks a password against.
pub(crate) struct UiSignIn {
    /// HMAC of the admin password under `mac_key`; `None` when sign-in is disabled.
    /// Comparing MACs with `verify_slice` takes the same time whatever the guess.
    password_mac: Option<Vec<u8>>,
    /// Random per process: the MAC is never comparable across processes or logs.
    mac_key: [u8; 32],
    /// Start of the current window and the failed sign-ins in it.
    failures: Mutex<(Instant, u32)>,
}

impl UiSignIn {
    /// Resolves the admin password: ADMIN_PASSWORD, the embedded default's generated
    /// file (its location is logged), or none (sign-in disabled, with a warning).
    pub(crate) fn new(config: &Config) -> std::io::Result<Self> {
        let password = match &config.ui.admin_password {
            AdminPasswordSource::Given(secret) => Some(secret.clone()),
            AdminPasswordSource::DataDir(path) => {
                let secret = load_or_create_admin_password(path)?;
                tracing::info!(
                    "web UI: sign in at {} with the admin password kept in {}",
                    config.server_url,
                    path.display()
                );
                Some(secret)
            }
            AdminPasswordSource::Disabled => {
                tracing::warn!(
                    "web UI sign-in is disabled: set ADMIN_PASSWORD (the same on every replica) to enable it"
                );
                None
            }
        };
        let mac_key: [u8; 32] = rand::random();
        Ok(UiSignIn {
            password_mac: password.map(|p| mac(&mac_key, &p)),
            mac_key,
            failures: Mutex::new((Instant::now(), 0)),
        })
    }

    /// Whether an admin password is set.
    pub(crate) fn enabled(&self) -> bool {
        self.password_mac.is_some()
    }

    /// Whether `given` is the admin password, in constant time.
    pub(crate) fn password_matches(&self, given: &str) -> bool {
        let Some(expected) = &self.password_mac else {
            return false;
        };
        let Ok(mut m) = HmacSha256::new_from_slice(&self.mac_key) else {
            return false;
        };
        m.update(given.as_bytes());
        m.verify_slice(expected).is_ok()
    }

    /// Seconds until sign-in is allowed again, if too many attempts failed.
    pub(crate) fn limited(&self) -> Option<u64> {
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if f.0.elapsed() >= FAILURE_WINDOW {
            *f = (Instant::now(), 0);
        }
        (f.1 >= MAX_FAILURES).then(|| (FAILURE_WINDOW - f.0.elapsed()).as_secs().max(1))
    }

    /// Counts a failed attempt.
    pub(crate) fn failed(&self) {
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        f.1 += 1;
    }
}

fn mac(key: &[u8], password: &Secret) -> Vec<u8> {
    // HMAC accepts keys of any length.
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC key");
    m.update(password.expose().as_bytes());
    m.finalize().into_bytes().to_vec()
}

/// The store key of a session cookie: its SHA-256, in hex, so a leaked table grants
/// nothing.
pub(crate) fn cookie_hash(cookie: &str) -> String {
    hex(&Sha256::digest(cookie.as_bytes()))
}
