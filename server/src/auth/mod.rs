//! Tokens: HMAC-signed JWTs with `sub`, `role` and `exp`.
//!
//! Validation is explicit because jsonwebtoken's defaults are lax: only the configured
//! algorithm is accepted (so `alg: none` and algorithm confusion fail), `exp` and `sub`
//! are required, `nbf` is checked when present, and the clock leeway is a few seconds
//! rather than a minute.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};

use crate::config::Secret;

pub mod ui_session;

/// Lifetime of an agent token unless the minter asks for another: agents hold theirs
/// for a long time.
pub const DEFAULT_AGENT_TOKEN_TTL: Duration = Duration::from_secs(30 * 86_400);
/// Lifetime of an admin token unless the minter asks for another: a working day.
pub const DEFAULT_ADMIN_TOKEN_TTL: Duration = Duration::from_secs(86_400);

/// Who a token speaks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A host agent; may only act as its own `sub`.
    Agent,
    /// An operator or the UI; may do everything.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Admin => "admin",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "agent" => Ok(Role::Agent),
            "admin" => Ok(Role::Admin),
            other => Err(format!("`{other}` is not a role; use agent or admin")),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub role: Role,
    /// Seconds since the Unix epoch.
    pub exp: u64,
    pub iat: u64,
}

/// Why a token was refused; each maps to 401 with a message a person can act on.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("a token is required: send `Authorization: Bearer <token>`")]
    Missing,
    #[error("the token has expired; mint a new one")]
    Expired,
    #[error("the token is not yet valid (nbf is in the future)")]
    NotYetValid,
    #[error("the token's signature does not match this server's SECRET_KEY")]
    BadSignature,
    #[error("the token's algorithm is not accepted; this server accepts {0:?} only")]
    WrongAlgorithm(Algorithm),
    #[error("the token is malformed or lacks a required claim (sub, role, exp)")]
    Malformed,
}

/// Signs and checks tokens with the configured key and algorithm. Cheap to clone.
#[derive(Clone)]
pub struct Tokens {
    algorithm: Algorithm,
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

/// Leeway for clock skew between the minting host and this server.
const LEEWAY_SECS: u64 = 5;

impl Tokens {
    pub fn new(secret: &Secret, algorithm: Algorithm) -> Self {
        let mut validation = Validation::new(algorithm);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = LEEWAY_SECS;
        Self {
            algorithm,
            encoding: EncodingKey::from_secret(secret.expose().as_bytes()),
            decoding: DecodingKey::from_secret(secret.expose().as_bytes()),
            validation,
        }
    }

    pub fn mint(&self, sub: &str, role: Role, ttl: Duration) -> String {
        let now = unix_now();
        let claims = Claims {
            sub: sub.to_string(),
            role,
            iat: now,
            exp: now + ttl.as_secs().max(1),
        };
        // Encoding HMAC claims we built ourselves cannot fail.
        jsonwebtoken::encode(&Header::new(self.algorithm), &claims, &self.encoding)
            .expect("HMAC signing")
    }

    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        // Check the header first so that `alg: none` or RS256 gets a precise message.
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        if header.alg != self.algorithm {
            return Err(AuthError::WrongAlgorithm(self.algorithm));
        }
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map(|data| data.claims)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                ErrorKind::InvalidSignature => AuthError::BadSignature,
                ErrorKind::InvalidAlgorithm => AuthError::WrongAlgorithm(self.algorithm),
                _ => AuthError::Malformed,
            })
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> Tokens {
        Tokens::new(&Secret::new("k".repeat(32)), Algorithm::HS256)
    }

    #[test]
    fn minted_token_verifies_with_its_claims() {
        let t = tokens();
        let c = t
            .verify(&t.mint("host-1", Role::Agent, Duration::from_secs(60)))
            .unwrap();
        assert_eq!((c.sub.as_str(), c.role), ("host-1", Role::Agent));
    }

    #[test]
    fn token_signed_with_another_key_is_refused() {
        let other = Tokens::new(&Secret::new("x".repeat(32)), Algorithm::HS256);
        let token = other.mint("h", Role::Admin, Duration::from_secs(60));
        assert_eq!(
            tokens().verify(&token).unwrap_err(),
            AuthError::BadSignature
        );
    }

    #[test]
    fn unsigned_alg_none_token_is_refused() {
        // {"alg":"none","typ":"JWT"} . {"sub":"h","role":"admin","exp":9999999999,"iat":0} .
        let token = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJoIiwicm9sZSI6ImFkbWluIiwiZXhwIjo5OTk5OTk5OTk5LCJpYXQiOjB9.";
        assert!(tokens().verify(token).is_err());
    }

    #[test]
    fn other_hmac_algorithm_is_refused() {
        let hs512 = Tokens::new(&Secret::new("k".repeat(32)), Algorithm::HS512);
        let token = hs512.mint("h", Role::Agent, Duration::from_secs(60));
        assert_eq!(
            tokens().verify(&token).unwrap_err(),
            AuthError::WrongAlgorithm(Algorithm::HS256)
        );
    }

    #[test]
    fn expired_token_is_refused() {
        let t = tokens();
        let claims = Claims {
            sub: "h".into(),
            role: Role::Agent,
            exp: unix_now() - 3600,
            iat: 0,
        };
        let token =
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &t.encoding).unwrap();
        assert_eq!(t.verify(&token).unwrap_err(), AuthError::Expired);
    }

    #[test]
    fn token_without_exp_is_refused() {
        let t = tokens();
        let claims = serde_json::json!({"sub": "h", "role": "agent", "iat": 0});
        let token =
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &t.encoding).unwrap();
        assert_eq!(t.verify(&token).unwrap_err(), AuthError::Malformed);
    }

    #[test]
    fn garbage_is_malformed() {
        assert_eq!(
            tokens().verify("not-a-jwt").unwrap_err(),
            AuthError::Malformed
        );
    }
}
