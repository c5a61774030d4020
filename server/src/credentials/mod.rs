//! Credentials: who may connect and call the API, and how that is taken back.
//!
//! - **Authentication** ([`Credentials::authenticate`]): a JWT checked by [`Tokens`], then
//!   against revocations: an agent token minted for a credential generation below the
//!   agent's current one is refused (deleting or revoking an agent bumps it), and so is a
//!   recorded token (`jti` in `api_tokens`) that an operator revoked. Both facts come from
//!   a replica-local [`CredentialCache`]: no database round trip per heartbeat or message,
//!   at most one lookup per agent and per token per cache lifetime.
//! - **Revocation** reaches this replica's cache and sessions at once and the other
//!   replicas over the [`RevocationBus`] (cluster mode), within a second. Should a bus
//!   message be lost, live sessions still close within two heartbeat intervals: each
//!   ping checks [`Credentials::must_close`], whose cache entries the
//!   [`RevocationRefresh`] re-reads in batches.
//! - **Tokens minted through the API** get a `jti` recorded with a name, role, subject,
//!   expiry and (batched, see [`LastUsedFlusher`]) last use.
//! - **Enrollment** (anchors: FleetDM enroll secrets, Teleport join tokens): an enroll
//!   secret, shown once and stored as its SHA-256, turns a client id into an agent with
//!   its own token and the secret's labels.
//!
//! Every change is recorded in the audit log. Transport code calls one function per route
//! and maps [`CredentialError`] / [`EnrollError`] to a status.

pub mod bus;
pub mod cache;
pub(crate) mod rate_limit;
pub(crate) mod refresh;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::audit::{Actor, Audit, AuditAction, AuditEvent, RequestContext, chain};
use crate::auth::{
    AuthError, Claims, DEFAULT_ADMIN_TOKEN_TTL, DEFAULT_AGENT_TOKEN_TTL, MintOptions, Revoked,
    Role, Tokens, TtlOutOfRange, ttl_from_secs,
};
use crate::hub::Hub;
use crate::ids::{MAX_LABELS, check_client_id, check_label};
use crate::store::{
    ApiTokenFilter, ApiTokenRow, EnrollAttempt, EnrollOutcome, EnrollRefusal, EnrollSecretRow,
    Store, StoreError, now_ms,
};
use crate::ws::protocol;
pub(crate) use bus::Revocation;
pub use bus::RevocationBus;
pub(crate) use cache::{CredentialCache, TokenState};
pub use rate_limit::RateLimiter;
pub(crate) use refresh::RevocationRefresh;

/// Longest token name and enroll secret name.
pub(crate) const MAX_NAME_CHARS: usize = 100;
pub(crate) const MAX_HOSTNAME_CHARS: usize = 253;
/// Bound on an enroll secret's `max_uses`.
pub(crate) const MAX_ENROLL_USES: u64 = 1_000_000;
/// Page size bounds of the token and enroll secret lists.
pub(crate) const DEFAULT_PAGE: u32 = 100;
pub(crate) const MAX_PAGE: u32 = 1000;
/// Enrollment attempts per source address: a burst, then a steady rate.
pub(crate) const ENROLL_BURST: u32 = 10;
pub(crate) const ENROLL_PER_SECOND: f64 = 1.0;
const ENROLL_TRACKED_ADDRESSES: usize = 100_000;
/// Pending `last_used_at` updates kept between flushes; beyond it, updates are dropped
/// (they are informational) rather than memory growing.
const MAX_PENDING_LAST_USED: usize = 100_000;

/// Why a credentials operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// 401: the token is missing, invalid, expired or revoked.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// 400: a field of the request is invalid; `field` names it.
    #[error("{message}")]
    Invalid {
        /// The request field at fault (`client_id`, `ttl_seconds`, `limit`, `name`…); it picks
        /// the error code of the 400.
        field: &'static str,
        /// What is wrong and what to send instead.
        message: String,
    },
    /// 404.
    #[error("no {what} `{id}`")]
    NotFound {
        /// What was looked for (`token`, `enroll secret`).
        what: &'static str,
        /// The id asked for.
        id: String,
    },
    /// 503 when the pool is exhausted, else 500 (as `StoreError` maps today).
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl CredentialError {
    fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        CredentialError::Invalid {
            field,
            message: message.into(),
        }
    }
}

/// Why an enrollment failed.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// 401.
    #[error(
        "the enroll secret is not known to this server; check it, or ask an operator for a new one"
    )]
    UnknownSecret,
    /// 401.
    #[error("the enroll secret has expired; ask an operator for a new one")]
    Expired,
    /// 401.
    #[error("the enroll secret was revoked; ask an operator for a new one")]
    Revoked,
    /// 401.
    #[error(
        "the enroll secret has been used as many times as it allows (max_uses); ask an operator for a new one"
    )]
    UsedUp,
    /// 409.
    #[error(
        "client_id `{client_id}` is already enrolled and this enroll secret does not allow re-enrollment; use another client_id, or ask an operator to delete the agent first"
    )]
    AlreadyEnrolled {
        /// The client id asked for.
        client_id: String,
    },
    /// 400.
    #[error("{message}")]
    Invalid {
        /// The request field at fault (`client_id`, `hostname`).
        field: &'static str,
        /// What is wrong and what to send instead.
        message: String,
    },
    /// 429 with `Retry-After: retry_after_secs`.
    #[error("too many enrollment attempts from this address; retry in {retry_after_secs} s")]
    RateLimited {
        /// Seconds until the address's bucket allows another attempt.
        retry_after_secs: u64,
    },
    /// 503 / 500.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// `POST /api/v1/tokens`.
#[derive(Debug, Clone, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MintRequest {
    /// The subject: the agent's `client_id`, or an admin's name (same character rules).
    #[schema(
        pattern = r"^([A-Za-z0-9_-][A-Za-z0-9._-]{0,127}|\.[A-Za-z0-9_-][A-Za-z0-9._-]{0,126}|\.\.[A-Za-z0-9._-]{1,126})$"
    )]
    pub client_id: String,
    /// `agent` by default.
    #[serde(default)]
    pub role: Option<Role>,
    /// Lifetime in seconds; 30 days for agents and 1 day for admins by default.
    #[serde(default)]
    pub ttl_seconds: Option<u64>,
    /// What the token is for, shown in lists (1 to 100 characters, no control
    /// characters).
    #[serde(default)]
    pub name: Option<String>,
}

/// A token just minted: shown once.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    /// The JWT (RFC 7519): returned this once, never stored.
    pub token: String,
    /// What was recorded about it (`jti`, name, role, subject, expiry).
    pub record: ApiTokenRow,
}

/// `GET /api/v1/tokens?subject=&role=&include_revoked=&after=&limit=`.
#[derive(Debug, Clone, Default)]
pub struct TokenListQuery {
    /// Only tokens of this `sub`.
    pub subject: Option<String>,
    /// Only tokens of this role.
    pub role: Option<Role>,
    /// Also revoked and expired tokens (`include_revoked=true`).
    pub include_inactive: bool,
    /// The `next` of the previous page.
    pub after: Option<String>,
    /// 1 to 1000; default 100.
    pub limit: Option<u32>,
}

/// A page of recorded tokens, oldest first.
#[derive(Debug, Clone)]
pub struct TokenPage {
    /// At most `limit` tokens, by `jti`.
    pub tokens: Vec<ApiTokenRow>,
    /// Pass as `after` for the next page.
    pub next: Option<String>,
}

/// `POST /api/v1/enroll-secrets`.
#[derive(Debug, Clone, Default, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewEnrollSecret {
    /// What the secret is for (shown in lists): 1 to 100 characters, no control
    /// characters.
    #[schema(min_length = 1, max_length = 100)]
    pub name: String,
    /// Given to every agent that enrolls with it: up to 32, each 1 to 64 of
    /// `A-Z a-z 0-9 . _ : / -` (the rule of a hello's labels, so that jobs and rollouts
    /// can name them).
    #[serde(default)]
    #[schema(max_items = 32)]
    pub labels: Vec<String>,
    /// It stops working this long after its creation; never by default.
    #[serde(default)]
    pub expires_in_seconds: Option<u64>,
    /// It stops working after this many enrollments; unlimited by default.
    #[serde(default)]
    pub max_uses: Option<u64>,
    /// Whether an already enrolled client id may enroll again with this secret.
    #[serde(default)]
    pub allow_reenroll: bool,
}

/// An enroll secret just created: `secret` is shown this once.
#[derive(Debug, Clone)]
pub struct CreatedEnrollSecret {
    /// The enroll secret itself: returned this once, stored only as its SHA-256.
    pub secret: String,
    /// What was recorded about it.
    pub record: EnrollSecretRow,
}

/// `POST /api/v1/enroll`.
#[derive(Debug, Clone, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// An enroll secret from `POST /api/v1/enroll-secrets`.
    pub secret: String,
    /// The client_id the agent will connect as.
    #[schema(
        pattern = r"^([A-Za-z0-9_-][A-Za-z0-9._-]{0,127}|\.[A-Za-z0-9_-][A-Za-z0-9._-]{0,126}|\.\.[A-Za-z0-9._-]{1,126})$"
    )]
    pub client_id: String,
    /// The host's name, recorded with the agent.
    #[serde(default)]
    pub hostname: Option<String>,
}

/// What `POST /api/v1/enroll` answers (201).
#[derive(Debug, Clone)]
pub struct Enrolled {
    /// The enrolled `client_id`.
    pub client_id: String,
    /// The agent's JWT (RFC 7519), for `Authorization: Bearer` on `/ws/{client_id}`.
    pub token: String,
    /// Milliseconds since the Unix epoch.
    pub expires_at_ms: i64,
    /// The labels the agent was given.
    pub labels: Vec<String>,
}

/// Checks, mints and revokes credentials. Cheap to clone.
#[derive(Clone)]
pub struct Credentials {
    store: Store,
    tokens: Tokens,
    hub: Hub,
    audit: Audit,
    cache: Arc<CredentialCache>,
    /// Present in cluster mode.
    bus: Option<Arc<RevocationBus>>,
    last_used: Arc<PendingLastUsed>,
    enroll_limiter: Arc<RateLimiter>,
}

/// `last_used_at` values waiting for the next flush, one per `jti`.
#[derive(Default)]
struct PendingLastUsed(Mutex<HashMap<String, i64>>);

impl Credentials {
    /// Credentials over `store` (tokens, secrets, audit log), verifying with `tokens`,
    /// closing sessions of revoked agents through `hub`, and in cluster mode telling the
    /// other replicas over `bus`.
    pub fn new(store: Store, tokens: Tokens, hub: Hub, bus: Option<Arc<RevocationBus>>) -> Self {
        Credentials {
            audit: Audit::new(store.clone()),
            store,
            tokens,
            hub,
            cache: Arc::new(CredentialCache::default()),
            bus,
            last_used: Arc::default(),
            enroll_limiter: Arc::new(RateLimiter::new(
                ENROLL_BURST,
                ENROLL_PER_SECOND,
                ENROLL_TRACKED_ADDRESSES,
            )),
        }
    }

    /// Replaces the enrollment rate limiter (tests use a tight one).
    pub fn with_enroll_limiter(mut self, limiter: RateLimiter) -> Self {
        self.enroll_limiter = Arc::new(limiter);
        self
    }

    /// The JWT minter and verifier.
    pub fn tokens(&self) -> &Tokens {
        &self.tokens
    }

    /// The audit log, which every credential change is recorded in.
    pub fn audit(&self) -> &Audit {
        &self.audit
    }

    /// The revocation bus; `None` outside cluster mode.
    pub fn bus(&self) -> Option<&Arc<RevocationBus>> {
        self.bus.as_ref()
    }

    /// Verifies a bearer token and checks it against revocations. Every authenticated
    /// route and the WebSocket upgrade call this instead of `Tokens::verify`.
    ///
    /// Errors: [`CredentialError::Auth`] (401) with the check that failed, including
    /// [`AuthError::Revoked`]; [`CredentialError::Store`] when the database is needed
    /// (first sight of this agent or token within the cache TTL) and unavailable.
    pub async fn authenticate(&self, token: &str) -> Result<Claims, CredentialError> {
        if token.is_empty() {
            return Err(AuthError::Missing.into());
        }
        let claims = self.tokens.verify(token)?;
        self.check_revocation(&claims).await?;
        Ok(claims)
    }

    /// The revocation half of [`Credentials::authenticate`], for claims already verified.
    pub(crate) async fn check_revocation(&self, claims: &Claims) -> Result<(), CredentialError> {
        let client_id = (claims.role == Role::Agent).then_some(claims.sub.as_str());
        let mut generation = client_id.and_then(|id| self.cache.generation(id));
        let mut token = claims.jti.as_deref().and_then(|j| self.cache.token(j));
        let need_generation = client_id.is_some() && generation.is_none();
        let need_token = claims.jti.is_some() && token.is_none();
        if need_generation || need_token {
            let state = self
                .store
                .credential_state(
                    client_id.filter(|_| need_generation).map(str::to_string),
                    claims.jti.clone().filter(|_| need_token),
                )
                .await?;
            if let (Some(id), Some(g)) = (client_id, state.generation) {
                self.cache.put_generation(id, g);
            }
            if let Some(jti) = claims.jti.as_deref().filter(|_| need_token) {
                let s = match state.token_revoked {
                    Some(true) => TokenState::Revoked,
                    Some(false) => TokenState::Live,
                    None => TokenState::Unrecorded,
                };
                self.cache.put_token(jti, s);
            }
            // Re-read: a revocation may have arrived while the database answered.
            generation = client_id.and_then(|id| self.cache.generation(id));
            token = claims.jti.as_deref().and_then(|j| self.cache.token(j));
        }
        if let Some(revoked) = verdict(claims, generation, token) {
            return Err(AuthError::Revoked(revoked).into());
        }
        if token == Some(TokenState::Live)
            && let Some(jti) = &claims.jti
        {
            self.note_use(jti);
        }
        Ok(())
    }

    /// For a live session holding `claims`: whether its credentials were revoked, from
    /// the cache alone (no database). `None` when nothing revokes them as far as this
    /// replica knows. Sessions are also closed directly (4002, "credentials revoked")
    /// when a revocation arrives; this is the session's own check, at each ping.
    ///
    /// The agent and the token are marked watched, so the [`RevocationRefresh`] re-reads
    /// them from the database in its next batch: what a lost bus message left stale
    /// here is corrected within one refresh interval.
    pub fn must_close(&self, claims: &Claims) -> Option<Revoked> {
        let client_id = (claims.role == Role::Agent).then_some(claims.sub.as_str());
        self.cache.watch(client_id, claims.jti.as_deref());
        let generation = client_id.and_then(|id| self.cache.generation(id));
        let token = claims.jti.as_deref().and_then(|j| self.cache.token(j));
        verdict(claims, generation, token)
    }

    fn note_use(&self, jti: &str) {
        let mut pending = self.last_used.0.lock().unwrap_or_else(|p| p.into_inner());
        if pending.len() < MAX_PENDING_LAST_USED || pending.contains_key(jti) {
            pending.insert(jti.to_string(), now_ms());
        }
    }

    /// The background job that writes `last_used_at` in batches.
    pub fn last_used_flusher(&self, interval: Duration) -> LastUsedFlusher {
        LastUsedFlusher {
            store: self.store.clone(),
            pending: self.last_used.clone(),
            interval,
        }
    }

    /// The background job that re-reads what live sessions watch.
    pub(crate) fn revocation_refresh(&self) -> RevocationRefresh {
        RevocationRefresh {
            store: self.store.clone(),
            cache: self.cache.clone(),
        }
    }

    /// Forgets every cached answer (the revocation bus reconnected).
    pub(crate) fn forget_cached(&self) {
        self.cache.clear();
    }

    /// Applies a revocation on this replica: the cache, then live sessions.
    pub(crate) fn apply_local(&self, revocation: &Revocation) {
        self.cache.apply(revocation);
        match revocation {
            Revocation::Agent {
                client_id, deleted, ..
            } => {
                let close = if *deleted {
                    protocol::DELETED
                } else {
                    protocol::REVOKED
                };
                self.hub.close(client_id, close);
            }
            Revocation::Token {
                subject,
                role: Role::Agent,
                ..
            } => {
                // The session may hold another, valid token: it reconnects with it.
                self.hub.close(subject, protocol::REVOKED);
            }
            Revocation::Token { .. } => {}
        }
    }

    /// Applies a revocation here and tells the other replicas.
    async fn propagate(&self, revocation: Revocation) {
        self.apply_local(&revocation);
        if let Some(bus) = &self.bus {
            bus.publish(&revocation).await;
        }
    }

    /// `POST /api/v1/agents/{id}/revoke` (admin): every token issued to the agent so far
    /// stops working on every replica, and its live session closes (4002). The agent
    /// stays; it needs a new token (enrollment, or `POST /api/v1/tokens`). Returns the
    /// new generation.
    ///
    /// Errors: `Invalid { field: "client_id" }` (400), `NotFound` (404), `Store`.
    pub async fn revoke_agent(
        &self,
        ctx: &RequestContext,
        client_id: &str,
    ) -> Result<i64, CredentialError> {
        check_client_id(client_id).map_err(|m| CredentialError::invalid("client_id", m))?;
        if !self.store.agent_exists(client_id.to_string()).await? {
            return Err(CredentialError::NotFound {
                what: "agent",
                id: client_id.to_string(),
            });
        }
        let generation = self
            .store
            .bump_agent_generation(client_id.to_string())
            .await?;
        self.propagate(Revocation::Agent {
            client_id: client_id.to_string(),
            generation,
            deleted: false,
        })
        .await;
        self.audit
            .record_or_log(
                AuditEvent::now(ctx, AuditAction::AgentRevoked, client_id)
                    .with_detail(serde_json::json!({ "generation": generation })),
            )
            .await;
        Ok(generation)
    }

    /// `DELETE /api/v1/agents/{id}` (admin): deletes the agent with its commands and
    /// inventory, and invalidates every token issued to it, so that it cannot reconnect
    /// and be created again with an old token. Its session closes (4002) on whichever
    /// replica holds it.
    ///
    /// Errors: `Invalid { field: "client_id" }` (400), `NotFound` (404), `Store`.
    pub async fn delete_agent(
        &self,
        ctx: &RequestContext,
        client_id: &str,
    ) -> Result<(), CredentialError> {
        check_client_id(client_id).map_err(|m| CredentialError::invalid("client_id", m))?;
        if !self.store.agent_exists(client_id.to_string()).await? {
            return Err(CredentialError::NotFound {
                what: "agent",
                id: client_id.to_string(),
            });
        }
        // Generation first: should the delete fail, the tokens are revoked anyway,
        // which errs on the safe side.
        let generation = self
            .store
            .bump_agent_generation(client_id.to_string())
            .await?;
        self.store.delete_agent(client_id.to_string()).await?;
        self.propagate(Revocation::Agent {
            client_id: client_id.to_string(),
            generation,
            deleted: true,
        })
        .await;
        self.audit
            .record_or_log(AuditEvent::now(ctx, AuditAction::AgentDeleted, client_id))
            .await;
        Ok(())
    }

    /// `POST /api/v1/tokens` (admin): mints a token with a `jti`, recorded with its name.
    /// An agent token carries the agent's current generation, and registers the agent so
    /// that commands can be queued for it before it connects.
    ///
    /// Errors: `Invalid { field: "client_id" | "ttl_seconds" | "name" }` (400), `Store`.
    pub async fn mint_token(
        &self,
        ctx: &RequestContext,
        request: MintRequest,
    ) -> Result<IssuedToken, CredentialError> {
        check_client_id(&request.client_id)
            .map_err(|m| CredentialError::invalid("client_id", m))?;
        let role = request.role.unwrap_or(Role::Agent);
        let ttl = match request.ttl_seconds {
            None if role == Role::Agent => DEFAULT_AGENT_TOKEN_TTL,
            None => DEFAULT_ADMIN_TOKEN_TTL,
            Some(secs) => ttl_from_secs(secs).map_err(|e: TtlOutOfRange| {
                CredentialError::invalid("ttl_seconds", format!("ttl_seconds: {e}"))
            })?,
        };
        let name = match request.name {
            None => None,
            Some(n) => {
                Some(check_name("name", n).map_err(|m| CredentialError::invalid("name", m))?)
            }
        };
        let generation = if role == Role::Agent {
            self.store.ensure_agent(request.client_id.clone()).await?;
            Some(
                self.store
                    .agent_generation(request.client_id.clone())
                    .await?,
            )
        } else {
            None
        };
        let jti = uuid::Uuid::now_v7().to_string();
        let minted = self.tokens.mint_with(
            &request.client_id,
            role,
            ttl,
            MintOptions {
                jti: Some(jti.clone()),
                generation,
            },
        );
        let record = ApiTokenRow {
            jti: jti.clone(),
            name,
            role: role.as_str().to_string(),
            subject: request.client_id.clone(),
            created_at: secs_to_ms(minted.claims.iat.unwrap_or(minted.claims.exp)),
            expires_at: secs_to_ms(minted.claims.exp),
            last_used_at: None,
            revoked_at: None,
        };
        self.store.insert_api_token(record.clone()).await?;
        self.audit
            .record_or_log(
                AuditEvent::now(ctx, AuditAction::TokenMinted, &jti).with_detail(
                    serde_json::json!({
                        "subject": record.subject,
                        "role": record.role,
                        "name": record.name,
                        "expires_at": record.expires_at,
                    }),
                ),
            )
            .await;
        Ok(IssuedToken {
            token: minted.token,
            record,
        })
    }

    /// `GET /api/v1/tokens` (admin): recorded tokens, oldest first, live ones unless
    /// `include_inactive`.
    ///
    /// Errors: `Invalid { field: "limit" }` (400), `Store`.
    pub async fn list_tokens(&self, query: TokenListQuery) -> Result<TokenPage, CredentialError> {
        let limit = page_limit(query.limit)?;
        let tokens = self
            .store
            .list_api_tokens(
                ApiTokenFilter {
                    subject: query.subject,
                    role: query.role.map(|r| r.as_str().to_string()),
                    include_inactive: query.include_inactive,
                    after: query.after,
                    limit: i64::from(limit),
                },
                now_ms(),
            )
            .await?;
        let next = (tokens.len() == limit as usize)
            .then(|| tokens.last().map(|t| t.jti.clone()))
            .flatten();
        Ok(TokenPage { tokens, next })
    }

    /// `DELETE /api/v1/tokens/{jti}` (admin): the token stops working on every replica
    /// within a second; an agent holding it is disconnected (4002). Revoking twice is
    /// not an error. Returns the token's record.
    ///
    /// Errors: `NotFound` (404; tokens minted offline by the CLI are not recorded and
    /// are revoked by rotating SECRET_KEY), `Store`.
    pub async fn revoke_token(
        &self,
        ctx: &RequestContext,
        jti: &str,
    ) -> Result<ApiTokenRow, CredentialError> {
        let record = self
            .store
            .revoke_api_token(jti.to_string(), now_ms())
            .await?
            .ok_or_else(|| CredentialError::NotFound {
                what: "token",
                id: jti.to_string(),
            })?;
        let role = record.role.parse().unwrap_or(Role::Admin);
        self.propagate(Revocation::Token {
            jti: record.jti.clone(),
            subject: record.subject.clone(),
            role,
        })
        .await;
        self.audit
            .record_or_log(
                AuditEvent::now(ctx, AuditAction::TokenRevoked, jti).with_detail(
                    serde_json::json!({ "subject": record.subject, "role": record.role }),
                ),
            )
            .await;
        Ok(record)
    }

    /// `POST /api/v1/enroll-secrets` (admin): creates an enroll secret. The secret is in
    /// the result this once and stored only as its SHA-256.
    ///
    /// Errors: `Invalid { field: "name" | "labels" | "expires_in_seconds" | "max_uses" }`
    /// (400), `Store`.
    pub async fn create_enroll_secret(
        &self,
        ctx: &RequestContext,
        request: NewEnrollSecret,
    ) -> Result<CreatedEnrollSecret, CredentialError> {
        let name =
            check_name("name", request.name).map_err(|m| CredentialError::invalid("name", m))?;
        let labels = enroll_labels(request.labels)?;
        let now = now_ms();
        let expires_at = match request.expires_in_seconds {
            None => None,
            Some(secs) => {
                let ttl = ttl_from_secs(secs).map_err(|e| {
                    CredentialError::invalid(
                        "expires_in_seconds",
                        format!("expires_in_seconds: {e}"),
                    )
                })?;
                Some(now + ttl.as_millis() as i64)
            }
        };
        let max_uses = match request.max_uses {
            None => None,
            Some(n) if (1..=MAX_ENROLL_USES).contains(&n) => Some(n as i64),
            Some(_) => {
                return Err(CredentialError::invalid(
                    "max_uses",
                    format!("max_uses must be from 1 to {MAX_ENROLL_USES}"),
                ));
            }
        };
        let secret = new_enroll_secret();
        let record = EnrollSecretRow {
            id: uuid::Uuid::now_v7().to_string(),
            name,
            secret_sha256: sha256_hex(&secret),
            labels: serde_json::to_string(&labels).unwrap_or_else(|_| "[]".into()),
            allow_reenroll: request.allow_reenroll,
            created_at: now,
            expires_at,
            max_uses,
            use_count: 0,
            last_used_at: None,
            revoked_at: None,
        };
        self.store.insert_enroll_secret(record.clone()).await?;
        self.audit
            .record_or_log(
                AuditEvent::now(ctx, AuditAction::EnrollSecretCreated, &record.id).with_detail(
                    serde_json::json!({
                        "name": record.name,
                        "labels": labels,
                        "max_uses": record.max_uses,
                        "expires_at": record.expires_at,
                        "allow_reenroll": record.allow_reenroll,
                    }),
                ),
            )
            .await;
        Ok(CreatedEnrollSecret { secret, record })
    }

    /// `GET /api/v1/enroll-secrets?after=&limit=` (admin): every secret with its use
    /// count, oldest first; never the secrets themselves (nor their hashes: the handler
    /// leaves `secret_sha256` out).
    ///
    /// Errors: `Invalid { field: "limit" }` (400), `Store`.
    pub async fn list_enroll_secrets(
        &self,
        after: Option<String>,
        limit: Option<u32>,
    ) -> Result<Vec<EnrollSecretRow>, CredentialError> {
        let limit = page_limit(limit)?;
        Ok(self
            .store
            .list_enroll_secrets(after, i64::from(limit))
            .await?)
    }

    /// `DELETE /api/v1/enroll-secrets/{id}` (admin): no agent can enroll with it any more;
    /// agents already enrolled keep their tokens. Revoking twice is not an error.
    ///
    /// Errors: `NotFound` (404), `Store`.
    pub async fn revoke_enroll_secret(
        &self,
        ctx: &RequestContext,
        id: &str,
    ) -> Result<EnrollSecretRow, CredentialError> {
        let record = self
            .store
            .revoke_enroll_secret(id.to_string(), now_ms())
            .await?
            .ok_or_else(|| CredentialError::NotFound {
                what: "enroll secret",
                id: id.to_string(),
            })?;
        self.audit
            .record_or_log(AuditEvent::now(ctx, AuditAction::EnrollSecretRevoked, id))
            .await;
        Ok(record)
    }

    /// `POST /api/v1/enroll` (no token; rate limited per `source` address, from
    /// `audit::client_address`): turns an enroll secret, a client id and an optional
    /// hostname into the agent's own token (with a `jti` and the agent's generation),
    /// and gives the agent the secret's labels. Re-enrolling (when the secret allows it)
    /// invalidates the client id's earlier tokens.
    ///
    /// Errors: see [`EnrollError`]; each says what to do.
    pub async fn enroll(
        &self,
        source: IpAddr,
        request: EnrollRequest,
    ) -> Result<Enrolled, EnrollError> {
        self.enroll_limiter
            .check(source)
            .map_err(|wait| EnrollError::RateLimited {
                retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64,
            })?;
        check_client_id(&request.client_id).map_err(|message| EnrollError::Invalid {
            field: "client_id",
            message,
        })?;
        let hostname = match request.hostname {
            None => None,
            Some(h)
                if h.is_empty()
                    || h.chars().count() > MAX_HOSTNAME_CHARS
                    || h.chars().any(char::is_control) =>
            {
                return Err(EnrollError::Invalid {
                    field: "hostname",
                    message: format!(
                        "hostname must be 1 to {MAX_HOSTNAME_CHARS} characters without control characters"
                    ),
                });
            }
            Some(h) => Some(h),
        };
        if request.secret.is_empty() {
            return Err(EnrollError::UnknownSecret);
        }
        let jti = uuid::Uuid::now_v7().to_string();
        let now = now_ms();
        let ttl = DEFAULT_AGENT_TOKEN_TTL;
        // Whole seconds, as in the token's `exp`.
        let exp_secs = (now / 1000) as u64 + ttl.as_secs();
        let outcome = self
            .store
            .enroll(EnrollAttempt {
                secret_sha256: sha256_hex(&request.secret),
                client_id: request.client_id.clone(),
                hostname,
                now,
                token: ApiTokenRow {
                    jti: jti.clone(),
                    name: None,
                    role: Role::Agent.as_str().to_string(),
                    subject: request.client_id.clone(),
                    created_at: now,
                    expires_at: secs_to_ms(exp_secs),
                    last_used_at: None,
                    revoked_at: None,
                },
            })
            .await?;
        let (generation, secret, reenrolled) = match outcome {
            EnrollOutcome::Enrolled {
                generation,
                secret,
                reenrolled,
            } => (generation, secret, reenrolled),
            EnrollOutcome::Refused(why) => {
                return Err(match why {
                    EnrollRefusal::UnknownSecret => EnrollError::UnknownSecret,
                    EnrollRefusal::Revoked => EnrollError::Revoked,
                    EnrollRefusal::Expired => EnrollError::Expired,
                    EnrollRefusal::UsedUp => EnrollError::UsedUp,
                    EnrollRefusal::AlreadyEnrolled => EnrollError::AlreadyEnrolled {
                        client_id: request.client_id,
                    },
                });
            }
        };
        let minted = self.tokens.mint_with(
            &request.client_id,
            Role::Agent,
            ttl,
            MintOptions {
                jti: Some(jti),
                generation: Some(generation),
            },
        );
        if reenrolled {
            self.propagate(Revocation::Agent {
                client_id: request.client_id.clone(),
                generation,
                deleted: false,
            })
            .await;
        }
        let ctx = RequestContext {
            actor: Actor::EnrollSecret {
                id: secret.id.clone(),
            },
            source: Some(source),
        };
        self.audit
            .record_or_log(
                AuditEvent::now(&ctx, AuditAction::EnrollSecretUsed, &request.client_id)
                    .with_detail(serde_json::json!({
                        "secret_name": secret.name,
                        "reenrolled": reenrolled,
                        "jti": minted.claims.jti,
                    })),
            )
            .await;
        Ok(Enrolled {
            client_id: request.client_id,
            token: minted.token,
            expires_at_ms: secs_to_ms(minted.claims.exp),
            labels: secret.labels(),
        })
    }
}

/// Whether claims are revoked given what is known of the agent's generation and the
/// token's state.
fn verdict(claims: &Claims, generation: Option<i64>, token: Option<TokenState>) -> Option<Revoked> {
    if claims.role == Role::Agent
        && let Some(current) = generation
        && claims.generation() < current
    {
        return Some(Revoked::AgentGeneration {
            client_id: claims.sub.clone(),
        });
    }
    if token == Some(TokenState::Revoked) {
        return Some(Revoked::TokenRevoked {
            jti: claims.jti.clone().unwrap_or_default(),
        });
    }
    None
}

/// Writes pending `last_used_at` values every `interval`, one transaction per flush,
/// and once more when stopped. Spawned by the assembly code:
/// `tasks.spawn(credentials.last_used_flusher(Duration::from_secs(30)).run(stop.clone()))`.
pub struct LastUsedFlusher {
    store: Store,
    pending: Arc<PendingLastUsed>,
    interval: Duration,
}

impl LastUsedFlusher {
    /// Writes what is pending now; returns how many tokens were updated.
    pub async fn flush(&self) -> Result<usize, StoreError> {
        let batch: Vec<(String, i64)> = {
            let mut pending = self.pending.0.lock().unwrap_or_else(|p| p.into_inner());
            pending.drain().collect()
        };
        let n = batch.len();
        self.store.touch_api_tokens(batch).await?;
        Ok(n)
    }

    /// Flushes every interval until `stop` is cancelled, then once more so that a draining
    /// replica loses no recorded use; a failed flush is logged, its values dropped.
    pub async fn run(self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let stopping = tokio::select! {
                _ = stop.cancelled() => true,
                _ = tick.tick() => false,
            };
            if let Err(e) = self.flush().await {
                tracing::warn!(error = %chain(&e), "could not record when tokens were last used");
            }
            if stopping {
                return;
            }
        }
    }
}

fn page_limit(limit: Option<u32>) -> Result<u32, CredentialError> {
    match limit.unwrap_or(DEFAULT_PAGE) {
        n if (1..=MAX_PAGE).contains(&n) => Ok(n),
        _ => Err(CredentialError::invalid(
            "limit",
            format!("limit must be from 1 to {MAX_PAGE}"),
        )),
    }
}

/// An enroll secret's labels, which become its agents': at most [`MAX_LABELS`], each
/// trimmed and following the one label rule (`ids::check_label`), so that a job or a
/// rollout can name every one; sorted, without duplicates.
pub(crate) fn enroll_labels(given: Vec<String>) -> Result<Vec<String>, CredentialError> {
    if given.len() > MAX_LABELS {
        return Err(CredentialError::invalid(
            "labels",
            format!("at most {MAX_LABELS} labels"),
        ));
    }
    let mut labels = Vec::with_capacity(given.len());
    for label in given {
        let label = label.trim().to_string();
        check_label(&label).map_err(|m| CredentialError::invalid("labels", m))?;
        labels.push(label);
    }
    labels.sort();
    labels.dedup();
    Ok(labels)
}

/// A name: trimmed, 1 to [`MAX_NAME_CHARS`] characters, no control characters
/// (PostgreSQL `text` cannot hold U+0000 either).
fn check_name(what: &str, value: String) -> Result<String, String> {
    let value = value.trim().to_string();
    if value.is_empty() || value.chars().count() > MAX_NAME_CHARS {
        return Err(format!("a {what} must be 1 to {MAX_NAME_CHARS} characters"));
    }
    if value.chars().any(char::is_control) {
        return Err(format!("a {what} may not contain control characters"));
    }
    Ok(value)
}

/// 256 random bits, hex, with a prefix that secret scanners and people recognise.
fn new_enroll_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("agent-enroll-{hex}")
}

fn sha256_hex(secret: &str) -> String {
    Sha256::digest(secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn secs_to_ms(secs: u64) -> i64 {
    i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX)
}
