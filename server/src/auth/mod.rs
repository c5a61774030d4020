//! Tokens: HMAC-signed JSON Web Tokens (RFC 7519) with `sub`, `role` and `exp`.
//!
//! jsonwebtoken checks the header and the signature only; the claims are checked here, so
//! that every refusal names the check that failed (RFC 7519 §4.1): `exp` and `nbf` are
//! NumericDates and may carry a fraction, `iat` is optional, unknown claims are ignored,
//! and the clock leeway (JWT_LEEWAY) is seconds rather than jsonwebtoken's minute. Only
//! the configured HMAC algorithm is accepted, so `alg: none` and algorithm confusion fail.
//!
//! During a key rotation a token signed with SECRET_KEY_PREVIOUS still verifies; new
//! tokens are always signed with SECRET_KEY (docs/operations.md, "Rotating SECRET_KEY").

use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};

use crate::config::Secret;

pub(crate) mod ui_session;

/// Lifetime of an agent token unless the minter asks for another: agents hold theirs
/// for a long time.
pub(crate) const DEFAULT_AGENT_TOKEN_TTL: Duration = Duration::from_secs(30 * 86_400);
/// Lifetime of an admin token unless the minter asks for another: a working day.
pub(crate) const DEFAULT_ADMIN_TOKEN_TTL: Duration = Duration::from_secs(86_400);

/// The claims and roles are the protocol crate's: one definition for the server, the
/// agent, the simulators and the tests. What is the server's own is here: signing,
/// verifying with each refusal named, lifetimes and revocation reasons.
pub use agent_protocol::{Claims, Role};

/// Why a token was refused; each maps to 401 with a message a person can act on. No
/// message ever contains the token.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum AuthError {
    /// No token in the request (neither `Authorization: Bearer` nor, on `/ws/{client_id}`,
    /// `?token=`).
    #[error("a token is required: send `Authorization: Bearer <token>`")]
    Missing,
    /// `exp` (RFC 7519 §4.1.4) is past, beyond the JWT_LEEWAY allowance.
    #[error("the token expired at {exp} (seconds since the Unix epoch); mint a new one")]
    Expired {
        /// The token's `exp`, seconds since the Unix epoch.
        exp: u64,
    },
    /// `nbf` (RFC 7519 §4.1.5) is still ahead, beyond the JWT_LEEWAY allowance.
    #[error(
        "the token is not yet valid: its nbf is {nbf} (seconds since the Unix epoch); check the clocks of this server and of the host that minted it"
    )]
    NotYetValid {
        /// The token's `nbf`, seconds since the Unix epoch.
        nbf: u64,
    },
    /// Signed with neither SECRET_KEY nor SECRET_KEY_PREVIOUS.
    #[error(
        "the token's signature does not match this server's key (SECRET_KEY, or SECRET_KEY_PREVIOUS during a rotation)"
    )]
    BadSignature,
    /// The header's `alg` is not the one configured; `alg: none` is refused too.
    #[error("the token's algorithm is not accepted; this server accepts {0:?} only")]
    WrongAlgorithm(Algorithm),
    /// Not three base64url parts of JSON (RFC 7519 §7.2); says which part is wrong.
    #[error("the token is not a JWT: {0}")]
    Malformed(&'static str),
    /// A claim the server needs is absent or of the wrong type.
    #[error("the token's `{claim}` claim {problem}")]
    Claim {
        /// The claim's name (`sub`, `role`, `exp`, `gen`…).
        claim: &'static str,
        /// What is wrong with it.
        problem: ClaimProblem,
    },
    /// The token verifies but was revoked since; see [`Revoked`].
    #[error("the token was revoked: {0}")]
    Revoked(Revoked),
}

/// What is wrong with one claim.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
pub enum ClaimProblem {
    /// Required but absent.
    #[error("is missing")]
    Missing,
    /// Must be a JSON string.
    #[error("must be a string")]
    NotAString,
    /// Must be a NumericDate (RFC 7519 §2): seconds since the Unix epoch.
    #[error("must be a number of seconds since the Unix epoch (RFC 7519 NumericDate)")]
    NotANumericDate,
    /// `role` is neither `agent` nor `admin`.
    #[error("must be `agent` or `admin`")]
    UnknownRole,
    /// `gen` must be a whole number.
    #[error("must be a whole number")]
    NotAnInteger,
    /// Must not be an empty string.
    #[error("must not be empty")]
    Empty,
}

/// Why a token that verifies is no longer honoured.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum Revoked {
    /// The agent's credential generation moved past the token's `gen`.
    #[error(
        "the agent `{client_id}` was deleted or its credentials revoked after this token was minted; enroll again or mint a new token"
    )]
    AgentGeneration {
        /// The agent whose tokens are no longer honoured.
        client_id: String,
    },
    /// The recorded token was revoked (`DELETE /api/v1/tokens/{id}` or the UI).
    #[error("token `{jti}` was revoked by an operator")]
    TokenRevoked {
        /// The revoked token's `jti`.
        jti: String,
    },
}

/// The shortest and longest token lifetime accepted by the API and the CLI.
pub(crate) const MIN_TTL: Duration = Duration::from_secs(1);
pub(crate) const MAX_TTL: Duration = Duration::from_secs(10 * 365 * 86_400);

/// A token lifetime outside [`MIN_TTL`]..=[`MAX_TTL`].
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
#[error(
    "the token lifetime must be from {} to {} seconds (10 years)",
    MIN_TTL.as_secs(),
    MAX_TTL.as_secs()
)]
pub(crate) struct TtlOutOfRange;

/// Checks a lifetime in seconds, as the API and the CLI receive it.
pub(crate) fn ttl_from_secs(secs: u64) -> Result<Duration, TtlOutOfRange> {
    let ttl = Duration::from_secs(secs);
    if (MIN_TTL..=MAX_TTL).contains(&ttl) {
        Ok(ttl)
    } else {
        Err(TtlOutOfRange)
    }
}

/// The default and the bound of JWT_LEEWAY.
pub(crate) const DEFAULT_LEEWAY: Duration = Duration::from_secs(5);
pub(crate) const MAX_LEEWAY: Duration = Duration::from_secs(300);

/// What to put in a new token besides `sub`, `role` and the lifetime.
#[derive(Clone, Debug, Default)]
pub struct MintOptions {
    /// The `jti` to record the token under; `None` for an unrecorded token (the CLI).
    pub jti: Option<String>,
    /// The agent's credential generation, signed as the private claim `gen`.
    pub generation: Option<i64>,
}

/// A signed token and its claims.
#[derive(Clone, Debug)]
pub struct Minted {
    /// The compact JWT (RFC 7519), for `Authorization: Bearer`.
    pub token: String,
    /// What it carries.
    pub claims: Claims,
}

/// Signs and checks tokens with the configured keys and algorithm. Cheap to clone.
#[derive(Clone)]
pub struct Tokens {
    algorithm: Algorithm,
    encoding: EncodingKey,
    /// SECRET_KEY, then SECRET_KEY_PREVIOUS when a rotation is under way.
    decoding: Vec<DecodingKey>,
    /// Header and signature only: the claims are checked by [`check_claims`].
    validation: Validation,
    leeway: Duration,
}

impl Tokens {
    /// One key, the default leeway.
    pub fn new(secret: &Secret, algorithm: Algorithm) -> Self {
        Self::with_rotation(secret, None, algorithm, DEFAULT_LEEWAY)
    }

    /// Signs with `secret`; verifies with `secret`, then `previous` (SECRET_KEY_PREVIOUS).
    /// `leeway` (JWT_LEEWAY) absorbs clock skew on `exp` and `nbf`.
    pub fn with_rotation(
        secret: &Secret,
        previous: Option<&Secret>,
        algorithm: Algorithm,
        leeway: Duration,
    ) -> Self {
        let mut validation = Validation::new(algorithm);
        validation.required_spec_claims = HashSet::new();
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        let decoding = std::iter::once(secret)
            .chain(previous)
            .map(|s| DecodingKey::from_secret(s.expose().as_bytes()))
            .collect();
        Self {
            algorithm,
            encoding: EncodingKey::from_secret(secret.expose().as_bytes()),
            decoding,
            validation,
            leeway: leeway.min(MAX_LEEWAY),
        }
    }

    /// The leeway applied to `exp` and `nbf`.
    pub fn leeway(&self) -> Duration {
        self.leeway
    }

    /// Mints a token without `jti` or generation (the CLI's bootstrap tokens, tests). The
    /// lifetime is clamped to [`MIN_TTL`]..=[`MAX_TTL`]; callers with user input check it
    /// with [`ttl_from_secs`] first.
    pub fn mint(&self, sub: &str, role: Role, ttl: Duration) -> String {
        self.mint_with(sub, role, ttl, MintOptions::default()).token
    }

    /// Mints a token with `iat`, `nbf` (both now), `exp` = now + `ttl` (clamped to
    /// [`MIN_TTL`]..=[`MAX_TTL`]) and the given `jti` and generation.
    pub fn mint_with(&self, sub: &str, role: Role, ttl: Duration, options: MintOptions) -> Minted {
        let now = unix_now();
        let ttl = ttl.clamp(MIN_TTL, MAX_TTL);
        let claims = Claims {
            sub: sub.to_string(),
            role,
            exp: now + ttl.as_secs(),
            iat: Some(now),
            nbf: Some(now),
            jti: options.jti,
            generation: options.generation,
        };
        // Encoding HMAC claims we built ourselves cannot fail.
        let token = jsonwebtoken::encode(&Header::new(self.algorithm), &claims, &self.encoding)
            .expect("HMAC signing");
        Minted { token, claims }
    }

    /// Checks the header, the signature and the claims at the current time.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        self.verify_at(token, now_secs_f64())
    }

    /// [`Tokens::verify`] at `now` (seconds since the Unix epoch), for tests.
    pub(crate) fn verify_at(&self, token: &str, now: f64) -> Result<Claims, AuthError> {
        if token.split('.').count() != 3 {
            return Err(AuthError::Malformed(
                "expected three base64url parts separated by dots",
            ));
        }
        // The header first, so that `alg: none` or RS256 gets a precise message; read by
        // hand because jsonwebtoken cannot parse a header naming an algorithm it lacks.
        let alg = header_alg(token).ok_or(AuthError::Malformed(
            "the header is not base64url-encoded JSON with an `alg`",
        ))?;
        if alg != format!("{:?}", self.algorithm) {
            return Err(AuthError::WrongAlgorithm(self.algorithm));
        }
        let mut outcome = Err(AuthError::BadSignature);
        for key in &self.decoding {
            outcome = jsonwebtoken::decode::<serde_json::Value>(token, key, &self.validation)
                .map(|data| data.claims)
                .map_err(|e| match e.kind() {
                    ErrorKind::InvalidSignature => AuthError::BadSignature,
                    ErrorKind::InvalidAlgorithm => AuthError::WrongAlgorithm(self.algorithm),
                    ErrorKind::Json(_) | ErrorKind::Utf8(_) => {
                        AuthError::Malformed("the claims are not a JSON object")
                    }
                    _ => AuthError::Malformed("a part is not valid base64url"),
                });
            if !matches!(outcome, Err(AuthError::BadSignature)) {
                break;
            }
        }
        check_claims(&outcome?, now, self.leeway.as_secs_f64())
    }
}

/// The `alg` of a compact JWS header.
fn header_alg(token: &str) -> Option<String> {
    use base64::Engine;
    let header = token.split('.').next()?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header.trim_end_matches('='))
        .ok()?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    value.get("alg")?.as_str().map(str::to_string)
}

/// Reads and checks the claims (RFC 7519 §4.1.4, §4.1.5): expired when `now` is at or
/// past `exp` + leeway, not yet valid when `now` + leeway is before `nbf`.
fn check_claims(value: &serde_json::Value, now: f64, leeway: f64) -> Result<Claims, AuthError> {
    use serde_json::Value;
    let object = value
        .as_object()
        .ok_or(AuthError::Malformed("the claims are not a JSON object"))?;
    let claim_error = |claim, problem| AuthError::Claim { claim, problem };
    let string = |claim: &'static str| -> Result<Option<&str>, AuthError> {
        match object.get(claim) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Err(claim_error(claim, ClaimProblem::Empty)),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(claim_error(claim, ClaimProblem::NotAString)),
        }
    };
    let date = |claim: &'static str| -> Result<Option<f64>, AuthError> {
        match object.get(claim) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => n
                .as_f64()
                .filter(|d| d.is_finite() && *d >= 0.0 && *d < 1e15)
                .map(Some)
                .ok_or(claim_error(claim, ClaimProblem::NotANumericDate)),
            Some(_) => Err(claim_error(claim, ClaimProblem::NotANumericDate)),
        }
    };
    let sub = string("sub")?.ok_or(claim_error("sub", ClaimProblem::Missing))?;
    let role = match string("role")?.ok_or(claim_error("role", ClaimProblem::Missing))? {
        "agent" => Role::Agent,
        "admin" => Role::Admin,
        _ => return Err(claim_error("role", ClaimProblem::UnknownRole)),
    };
    let exp = date("exp")?.ok_or(claim_error("exp", ClaimProblem::Missing))?;
    let nbf = date("nbf")?;
    let iat = date("iat")?;
    let jti = string("jti")?;
    let generation = match object.get("gen") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_i64()
                .ok_or(claim_error("gen", ClaimProblem::NotAnInteger))?,
        ),
    };
    if now >= exp + leeway {
        return Err(AuthError::Expired {
            exp: exp.floor() as u64,
        });
    }
    if let Some(nbf) = nbf
        && now + leeway < nbf
    {
        return Err(AuthError::NotYetValid {
            nbf: nbf.ceil() as u64,
        });
    }
    Ok(Claims {
        sub: sub.to_string(),
        role,
        exp: exp.floor() as u64,
        iat: iat.map(|d| d.floor() as u64),
        nbf: nbf.map(|d| d.ceil() as u64),
        jti: jti.map(str::to_string),
        generation,
    })
}

/// Whole seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn now_secs_f64() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const KEY: &str = "kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk";

    fn tokens() -> Tokens {
        Tokens::new(&Secret::new(KEY), Algorithm::HS256)
    }

    fn sign(claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(KEY.as_bytes()),
        )
        .unwrap()
    }

    fn now() -> f64 {
        now_secs_f64()
    }

    #[test]
    fn minted_token_verifies_with_its_claims() {
        let t = tokens();
        let minted = t.mint_with(
            "host-1",
            Role::Agent,
            Duration::from_secs(60),
            MintOptions {
                jti: Some("t1".into()),
                generation: Some(3),
            },
        );
        let c = t.verify(&minted.token).unwrap();
        assert_eq!(c, minted.claims);
        assert_eq!(
            (c.sub.as_str(), c.role, c.generation()),
            ("host-1", Role::Agent, 3)
        );
    }

    #[test]
    fn iat_is_optional_exp_may_have_a_fraction_and_unknown_claims_are_ignored() {
        let exp = now() + 600.5;
        let c = tokens()
            .verify(&sign(
                json!({"sub": "h", "role": "admin", "exp": exp, "aud": "x", "scope": ["a"]}),
            ))
            .unwrap();
        assert_eq!(c.exp, exp.floor() as u64);
        assert_eq!(c.iat, None);
        assert_eq!(c.generation(), 0);
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
    fn previous_key_verifies_during_a_rotation_and_new_tokens_use_the_current_key() {
        let old = Secret::new("o".repeat(32));
        let new = Secret::new("n".repeat(32));
        let before = Tokens::new(&old, Algorithm::HS256).mint("h", Role::Agent, MIN_TTL * 60);
        let rotating = Tokens::with_rotation(&new, Some(&old), Algorithm::HS256, DEFAULT_LEEWAY);
        assert!(rotating.verify(&before).is_ok());
        let after = rotating.mint("h", Role::Agent, MIN_TTL * 60);
        let done = Tokens::new(&new, Algorithm::HS256);
        assert!(done.verify(&after).is_ok());
        assert_eq!(done.verify(&before).unwrap_err(), AuthError::BadSignature);
    }

    #[test]
    fn unsigned_alg_none_token_is_refused() {
        // {"alg":"none","typ":"JWT"} . {"sub":"h","role":"admin","exp":9999999999,"iat":0} .
        let token = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJoIiwicm9sZSI6ImFkbWluIiwiZXhwIjo5OTk5OTk5OTk5LCJpYXQiOjB9.";
        assert_eq!(
            tokens().verify(token).unwrap_err(),
            AuthError::WrongAlgorithm(Algorithm::HS256)
        );
    }

    #[test]
    fn other_hmac_algorithm_is_refused() {
        let hs512 = Tokens::new(&Secret::new(KEY), Algorithm::HS512);
        let token = hs512.mint("h", Role::Agent, Duration::from_secs(60));
        assert_eq!(
            tokens().verify(&token).unwrap_err(),
            AuthError::WrongAlgorithm(Algorithm::HS256)
        );
    }

    #[test]
    fn expiry_and_not_before_allow_the_leeway_and_no_more() {
        let t = tokens();
        let n = now();
        let token = sign(json!({"sub": "h", "role": "agent", "exp": n - 3.0}));
        assert!(t.verify_at(&token, n).is_ok(), "within the 5 s leeway");
        assert_eq!(
            t.verify_at(&token, n + 2.5).unwrap_err(),
            AuthError::Expired {
                exp: (n - 3.0).floor() as u64
            }
        );
        let token = sign(json!({"sub": "h", "role": "agent", "exp": n + 600.0, "nbf": n + 4.0}));
        assert!(t.verify_at(&token, n).is_ok(), "within the 5 s leeway");
        let token = sign(json!({"sub": "h", "role": "agent", "exp": n + 600.0, "nbf": n + 60.0}));
        assert!(matches!(
            t.verify_at(&token, n).unwrap_err(),
            AuthError::NotYetValid { .. }
        ));
    }

    #[test]
    fn each_bad_claim_is_named() {
        let exp = now() + 600.0;
        let cases = [
            (
                json!({"role": "agent", "exp": exp}),
                "sub",
                ClaimProblem::Missing,
            ),
            (
                json!({"sub": 5, "role": "agent", "exp": exp}),
                "sub",
                ClaimProblem::NotAString,
            ),
            (
                json!({"sub": "", "role": "agent", "exp": exp}),
                "sub",
                ClaimProblem::Empty,
            ),
            (
                json!({"sub": "h", "exp": exp}),
                "role",
                ClaimProblem::Missing,
            ),
            (
                json!({"sub": "h", "role": "root", "exp": exp}),
                "role",
                ClaimProblem::UnknownRole,
            ),
            (
                json!({"sub": "h", "role": "agent"}),
                "exp",
                ClaimProblem::Missing,
            ),
            (
                json!({"sub": "h", "role": "agent", "exp": "soon"}),
                "exp",
                ClaimProblem::NotANumericDate,
            ),
            (
                json!({"sub": "h", "role": "agent", "exp": -1}),
                "exp",
                ClaimProblem::NotANumericDate,
            ),
            (
                json!({"sub": "h", "role": "agent", "exp": exp, "nbf": true}),
                "nbf",
                ClaimProblem::NotANumericDate,
            ),
            (
                json!({"sub": "h", "role": "agent", "exp": exp, "iat": "x"}),
                "iat",
                ClaimProblem::NotANumericDate,
            ),
            (
                json!({"sub": "h", "role": "agent", "exp": exp, "jti": 7}),
                "jti",
                ClaimProblem::NotAString,
            ),
            (
                json!({"sub": "h", "role": "agent", "exp": exp, "gen": 1.5}),
                "gen",
                ClaimProblem::NotAnInteger,
            ),
        ];
        for (claims, claim, problem) in cases {
            let token = sign(claims.clone());
            assert_eq!(
                tokens().verify(&token).unwrap_err(),
                AuthError::Claim { claim, problem },
                "{claims}"
            );
        }
    }

    #[test]
    fn garbage_is_malformed_and_no_message_echoes_the_token() {
        for bad in ["not-a-jwt", "a.b.c", "eyJhbGciOiJIUzI1NiJ9.!!!.x"] {
            let e = tokens().verify(bad).unwrap_err();
            assert!(matches!(e, AuthError::Malformed(_)), "{bad}: {e:?}");
            assert!(!e.to_string().contains(bad), "{e}");
        }
        let token = sign(json!([1, 2]));
        assert!(matches!(
            tokens().verify(&token).unwrap_err(),
            AuthError::Malformed(_)
        ));
    }

    #[test]
    fn ttls_outside_one_second_to_ten_years_are_refused() {
        assert_eq!(ttl_from_secs(0), Err(TtlOutOfRange));
        assert_eq!(ttl_from_secs(u64::MAX), Err(TtlOutOfRange));
        assert_eq!(ttl_from_secs(MAX_TTL.as_secs()), Ok(MAX_TTL));
        assert_eq!(ttl_from_secs(1), Ok(MIN_TTL));
    }
}
