//! Tokens the way the server checks them: HMAC JWTs with the protocol's `Claims` (`sub`,
//! `role`, `iat`, `exp`). The harness holds the deployment's SECRET_KEY (it sets it on
//! both targets), so it mints its own admin and agent tokens instead of asking a server.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agent_protocol::Claims;
pub use agent_protocol::Role;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

/// Signs tokens with one key. Cheap to clone and shareable across tasks.
#[derive(Clone)]
pub struct Minter {
    key: EncodingKey,
    algorithm: Algorithm,
}

impl Minter {
    /// `secret` is the deployment's SECRET_KEY; the algorithm is the server's default, HS256.
    pub fn new(secret: &str) -> Self {
        Self::with_algorithm(secret, Algorithm::HS256)
    }

    /// For a server whose JWT_ALGORITHM is not the default.
    pub fn with_algorithm(secret: &str, algorithm: Algorithm) -> Self {
        Self {
            key: EncodingKey::from_secret(secret.as_bytes()),
            algorithm,
        }
    }

    pub fn mint(&self, sub: &str, role: Role, ttl: Duration) -> String {
        let now = unix_now();
        self.sign(sub, role, now, now + ttl.as_secs().max(1))
    }

    /// A token that expired an hour ago, well past the server's few seconds of leeway.
    pub fn expired(&self, sub: &str, role: Role) -> String {
        let now = unix_now();
        self.sign(sub, role, now - 7200, now - 3600)
    }

    fn sign(&self, sub: &str, role: Role, iat: u64, exp: u64) -> String {
        let claims = Claims::new(sub, role, iat, exp);
        // HMAC over claims we built cannot fail.
        jsonwebtoken::encode(&Header::new(self.algorithm), &claims, &self.key)
            .expect("HMAC signing")
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
