//! Agent tokens: minted locally with the server's key (no load on the
//! server, the normal case for benchmarks), or enrolled through `POST /api/v1/tokens`
//! with an admin token (once per agent, then cached).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use jsonwebtoken::Algorithm;

use crate::tokens::{Minter, Role};

pub enum TokenSource {
    /// The server's SECRET_KEY and JWT_ALGORITHM.
    Local { tokens: Box<Minter>, ttl: Duration },
    /// An admin token and the API of `base` (`http://host:port`).
    Api {
        http: reqwest::Client,
        base: String,
        admin: String,
        /// Enrolled tokens by client id; an agent keeps its token across reconnections.
        cache: Mutex<HashMap<String, String>>,
    },
}

impl TokenSource {
    pub fn local(secret_key: &str, algorithm: &str, ttl: Duration) -> Result<Self, String> {
        let algorithm = match algorithm {
            "HS256" => Algorithm::HS256,
            "HS384" => Algorithm::HS384,
            "HS512" => Algorithm::HS512,
            other => {
                return Err(format!(
                    "JWT algorithm `{other}`: use HS256, HS384 or HS512"
                ));
            }
        };
        Ok(TokenSource::Local {
            tokens: Box::new(Minter::with_algorithm(secret_key, algorithm)),
            ttl,
        })
    }

    pub fn api(http: reqwest::Client, base: &str, admin: &str) -> Self {
        TokenSource::Api {
            http,
            base: base.trim_end_matches('/').to_string(),
            admin: admin.to_string(),
            cache: Mutex::default(),
        }
    }

    /// An admin token, when minted locally (the API source has one already).
    pub fn admin(&self) -> Option<String> {
        match self {
            TokenSource::Local { tokens, .. } => {
                Some(tokens.mint("bench-admin", Role::Admin, Duration::from_secs(86_400)))
            }
            TokenSource::Api { admin, .. } => Some(admin.clone()),
        }
    }

    /// The agent token for `client_id`.
    pub async fn agent(&self, client_id: &str) -> Result<String, String> {
        match self {
            TokenSource::Local { tokens, ttl } => Ok(tokens.mint(client_id, Role::Agent, *ttl)),
            TokenSource::Api {
                http,
                base,
                admin,
                cache,
            } => {
                if let Some(t) = lock(cache).get(client_id) {
                    return Ok(t.clone());
                }
                let resp = http
                    .post(format!("{base}/api/v1/tokens"))
                    .bearer_auth(admin)
                    .json(&serde_json::json!({"client_id": client_id, "role": "agent"}))
                    .send()
                    .await
                    .map_err(|e| format!("token request: {e}"))?;
                let status = resp.status();
                let body: serde_json::Value = resp
                    .json()
                    .await
                    .map_err(|e| format!("token response: {e}"))?;
                let token = body["token"]
                    .as_str()
                    .ok_or_else(|| format!("token request answered {status}: {body}"))?
                    .to_string();
                lock(cache).insert(client_id.to_string(), token.clone());
                Ok(token)
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_protocol::Claims;
    use jsonwebtoken::{DecodingKey, Validation};

    #[tokio::test]
    async fn local_tokens_carry_the_protocols_claims() {
        let key = "k".repeat(32);
        let source = TokenSource::local(&key, "HS384", Duration::from_secs(60)).unwrap();
        let token = source.agent("sim-000001").await.unwrap();
        let claims = jsonwebtoken::decode::<Claims>(
            &token,
            &DecodingKey::from_secret(key.as_bytes()),
            &Validation::new(Algorithm::HS384),
        )
        .unwrap()
        .claims;
        assert_eq!(
            (claims.sub.as_str(), claims.role),
            ("sim-000001", Role::Agent)
        );
    }
}
