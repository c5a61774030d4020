//! Token claims (RFC 7519): HMAC-signed JWTs with `sub`, `role` and `exp`, and optionally
//! `iat`, `nbf`, `jti` and the agent's credential generation `gen`.

use serde::{Deserialize, Serialize};

/// Who a token speaks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A host agent; may only act as its own `sub`.
    Agent,
    /// An operator or the UI; may do everything.
    Admin,
}

impl Role {
    /// The claim's and the API's spelling, lowercase (`agent`, `admin`).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Admin => "admin",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
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

/// The claims of every token the server signs and accepts (RFC 7519 §4.1 and two private
/// claims, `role` and `gen`). The server checks them by hand so that each refusal names
/// the claim; this type is what a token that passed those checks holds, and what a
/// minter signs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The subject: the `client_id` of an agent token; the operator's name for an admin
    /// token.
    pub sub: String,
    /// What the token may do.
    pub role: Role,
    /// Expiry, whole seconds since the Unix epoch (the server rounds a fractional `exp`
    /// down).
    pub exp: u64,
    /// Issued-at, seconds since the Unix epoch; optional (RFC 7519 §4.1.6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// Not-before, seconds since the Unix epoch (the server rounds a fraction up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Token id: set on tokens minted through the API or by enrollment, which the server
    /// records and can revoke one by one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    /// The agent's credential generation when the token was minted (the `gen` claim).
    /// Deleting or revoking an agent bumps its generation, which invalidates every token
    /// minted before; a token without `gen` belongs to generation 0.
    #[serde(default, rename = "gen", skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
}

impl Claims {
    /// Claims with only the registered times a minimal minter sets: `sub`, `role`, `iat`
    /// and `exp`, in seconds since the Unix epoch.
    pub fn new(sub: impl Into<String>, role: Role, iat: u64, exp: u64) -> Claims {
        Claims {
            sub: sub.into(),
            role,
            exp,
            iat: Some(iat),
            nbf: None,
            jti: None,
            generation: None,
        }
    }

    /// The credential generation the token was minted for (0 when it carries none).
    pub fn generation(&self) -> i64 {
        self.generation.unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_parse_from_and_print_as_their_wire_names() {
        for role in [Role::Agent, Role::Admin] {
            assert_eq!(role.as_str().parse::<Role>(), Ok(role));
            assert_eq!(serde_json::to_string(&role).unwrap(), format!("\"{role}\""));
        }
        assert!("root".parse::<Role>().is_err());
    }

    #[test]
    fn optional_claims_are_left_out_and_the_generation_travels_as_gen() {
        let minimal = Claims::new("web-1", Role::Agent, 10, 20);
        assert_eq!(
            serde_json::to_string(&minimal).unwrap(),
            r#"{"sub":"web-1","role":"agent","exp":20,"iat":10}"#
        );
        assert_eq!(minimal.generation(), 0);
        let full: Claims =
            serde_json::from_str(r#"{"sub":"web-1","role":"agent","exp":20,"jti":"t1","gen":3}"#)
                .unwrap();
        assert_eq!(
            (full.iat, full.jti.as_deref(), full.generation()),
            (None, Some("t1"), 3)
        );
    }
}
