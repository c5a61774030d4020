//! The audit log: who changed what, from where, and when.
//!
//! Every change made through the API or the UI is recorded as an [`AuditEvent`]: the
//! actor (a token's subject and `jti`, a UI session, an enroll secret), the client's
//! address ([`client_address`]: `X-Forwarded-For` is believed only from TRUSTED_PROXIES),
//! the time, the [`AuditAction`] and its target. Entries are only ever appended; the
//! [`AuditPruner`] deletes those older than AUDIT_RETENTION.

use std::net::IpAddr;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::auth::Claims;
use crate::store::{AuditFilter, AuditRow, NewAuditRow, Store, StoreError, now_ms};

/// What was done. Stored and queried in snake_case (`token_minted`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuditAction {
    /// `POST /api/v1/agents/{client_id}/commands` (and the UI's equivalent); target: the client id.
    CommandCreated,
    /// `DELETE /api/v1/agents/{client_id}`; target: the client id.
    AgentDeleted,
    /// Every token of an agent revoked at once; target: the client id.
    AgentRevoked,
    /// An API token minted; target: its `jti`.
    TokenMinted,
    /// An API token revoked; target: its `jti`.
    TokenRevoked,
    /// An enroll secret created; target: its id.
    EnrollSecretCreated,
    /// An agent enrolled with a secret; target: the new client id.
    EnrollSecretUsed,
    /// An enroll secret revoked; target: its id.
    EnrollSecretRevoked,
    /// A binary uploaded; target: its id.
    BinaryUploaded,
    /// A binary deleted; target: its id.
    BinaryDeleted,
    /// A rollout started; target: its id.
    RolloutCreated,
    /// A rollout cancelled; target: its id.
    RolloutCancelled,
    /// A rollout paused by an admin; target: its id.
    RolloutPaused,
    /// A paused rollout resumed; target: its id.
    RolloutResumed,
    /// A web UI sign-in with the admin password.
    SignInSucceeded,
    /// A refused web UI sign-in (wrong password or rate-limited); the actor is anonymous.
    SignInFailed,
    /// A fleet job created; target: its id.
    JobCreated,
    /// A fleet job paused; target: its id.
    JobPaused,
    /// A fleet job resumed; target: its id.
    JobResumed,
    /// A fleet job cancelled; target: its id.
    JobCancelled,
}

impl AuditAction {
    pub(crate) const ALL: [AuditAction; 20] = [
        AuditAction::CommandCreated,
        AuditAction::AgentDeleted,
        AuditAction::AgentRevoked,
        AuditAction::TokenMinted,
        AuditAction::TokenRevoked,
        AuditAction::EnrollSecretCreated,
        AuditAction::EnrollSecretUsed,
        AuditAction::EnrollSecretRevoked,
        AuditAction::BinaryUploaded,
        AuditAction::BinaryDeleted,
        AuditAction::RolloutCreated,
        AuditAction::RolloutCancelled,
        AuditAction::RolloutPaused,
        AuditAction::RolloutResumed,
        AuditAction::SignInSucceeded,
        AuditAction::SignInFailed,
        AuditAction::JobCreated,
        AuditAction::JobPaused,
        AuditAction::JobResumed,
        AuditAction::JobCancelled,
    ];

    /// The stored and query-string spelling, snake_case (`token_minted`); `FromStr` parses it
    /// back and lists every action when it cannot.
    pub fn as_str(self) -> &'static str {
        match self {
            AuditAction::CommandCreated => "command_created",
            AuditAction::AgentDeleted => "agent_deleted",
            AuditAction::AgentRevoked => "agent_revoked",
            AuditAction::TokenMinted => "token_minted",
            AuditAction::TokenRevoked => "token_revoked",
            AuditAction::EnrollSecretCreated => "enroll_secret_created",
            AuditAction::EnrollSecretUsed => "enroll_secret_used",
            AuditAction::EnrollSecretRevoked => "enroll_secret_revoked",
            AuditAction::BinaryUploaded => "binary_uploaded",
            AuditAction::BinaryDeleted => "binary_deleted",
            AuditAction::RolloutCreated => "rollout_created",
            AuditAction::RolloutCancelled => "rollout_cancelled",
            AuditAction::RolloutPaused => "rollout_paused",
            AuditAction::RolloutResumed => "rollout_resumed",
            AuditAction::SignInSucceeded => "sign_in_succeeded",
            AuditAction::SignInFailed => "sign_in_failed",
            AuditAction::JobCreated => "job_created",
            AuditAction::JobPaused => "job_paused",
            AuditAction::JobResumed => "job_resumed",
            AuditAction::JobCancelled => "job_cancelled",
        }
    }
}

impl std::str::FromStr for AuditAction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| {
                let all: Vec<&str> = Self::ALL.iter().map(|a| a.as_str()).collect();
                format!(
                    "`{s}` is not an audit action; use one of {}",
                    all.join(", ")
                )
            })
    }
}

/// Who did it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    /// A bearer token: its `sub` and, when it has one, its `jti`.
    Token {
        /// The token's `sub`: a client id or an operator's name.
        subject: String,
        /// The token's `jti`; CLI-minted tokens have none.
        jti: Option<String>,
    },
    /// A web UI sign-in, by a short, non-secret prefix of its stored hash.
    UiSession {
        /// The prefix of the session's stored hash.
        id: String,
    },
    /// Enrollment, by the enroll secret's id.
    EnrollSecret {
        /// The enroll secret's id.
        id: String,
    },
    /// No credential (a failed sign-in).
    Anonymous,
}

impl Actor {
    pub(crate) fn from_claims(claims: &Claims) -> Self {
        Actor::Token {
            subject: claims.sub.clone(),
            jti: claims.jti.clone(),
        }
    }

    fn parts(&self) -> (&'static str, String, Option<String>) {
        match self {
            Actor::Token { subject, jti } => ("token", subject.clone(), jti.clone()),
            Actor::UiSession { id } => ("ui_session", id.clone(), None),
            Actor::EnrollSecret { id } => ("enroll_secret", id.clone(), None),
            Actor::Anonymous => ("anonymous", String::new(), None),
        }
    }
}

/// The actor of a request and the client's address, as every audited function takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestContext {
    /// Who made the request.
    pub actor: Actor,
    /// From [`client_address`].
    pub source: Option<IpAddr>,
}

/// One audited change.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEvent {
    /// Milliseconds since the Unix epoch.
    pub(crate) at_ms: i64,
    /// Who did it.
    pub actor: Actor,
    /// The client's address, from [`client_address`]; `None` when unknown.
    pub source: Option<IpAddr>,
    /// What was done.
    pub action: AuditAction,
    /// What was acted on: a client id, a token's `jti`, a secret's id, a binary id…
    pub target: Option<String>,
    /// A few facts about the change (a token's role and name); never a secret.
    pub detail: Option<serde_json::Value>,
}

impl AuditEvent {
    /// An event happening now in the request `ctx`.
    pub fn now(ctx: &RequestContext, action: AuditAction, target: impl Into<String>) -> Self {
        AuditEvent {
            at_ms: now_ms(),
            actor: ctx.actor.clone(),
            source: ctx.source,
            action,
            target: Some(target.into()),
            detail: None,
        }
    }

    pub(crate) fn with_detail(mut self, detail: serde_json::Value) -> Self {
        self.detail = Some(detail);
        self
    }

    /// The row the audit log stores for this event.
    pub(crate) fn into_row(self) -> NewAuditRow {
        let (actor_kind, actor, actor_jti) = self.actor.parts();
        NewAuditRow {
            at: self.at_ms,
            actor_kind: actor_kind.to_string(),
            actor: storable(actor),
            actor_jti: actor_jti.map(storable),
            source: self.source.map(|a| a.to_string()),
            action: self.action.as_str().to_string(),
            target: self.target.map(storable),
            detail: self.detail.map(|d| storable(d.to_string())),
        }
    }
}

/// PostgreSQL `text` cannot hold U+0000; the audit log must record what it is given.
fn storable(s: String) -> String {
    if s.contains('\0') {
        s.replace('\0', "\u{fffd}")
    } else {
        s
    }
}

/// The address of the client that made a request.
///
/// `peer` is the TCP peer. Unless it is one of `trusted` (TRUSTED_PROXIES), it is the
/// client, whatever `X-Forwarded-For` says: anyone can send that header. From a trusted
/// proxy, the `X-Forwarded-For` values (every header line, in order) are read from the
/// right, skipping trusted proxies: the first address that is not one is the client.
/// When an entry is not an address, the hop that appended it cannot be believed, so
/// the last trusted hop is answered.
pub(crate) fn client_address<'a>(
    peer: IpAddr,
    forwarded_for: impl IntoIterator<Item = &'a str>,
    trusted: &[ipnet::IpNet],
) -> IpAddr {
    let is_trusted = |a: &IpAddr| trusted.iter().any(|n| n.contains(&unmap(*a)));
    if !is_trusted(&peer) {
        return unmap(peer);
    }
    let hops: Vec<&str> = forwarded_for
        .into_iter()
        .flat_map(|line| line.split(','))
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .collect();
    let mut client = unmap(peer);
    for hop in hops.iter().rev() {
        match parse_hop(hop) {
            Some(addr) if is_trusted(&addr) => client = addr,
            Some(addr) => return addr,
            None => return client,
        }
    }
    client
}

/// An address as proxies write it: `192.0.2.1`, `192.0.2.1:4711`, `[2001:db8::1]:4711`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    if let Ok(a) = hop.parse::<IpAddr>() {
        return Some(unmap(a));
    }
    hop.parse::<std::net::SocketAddr>()
        .ok()
        .map(|s| unmap(s.ip()))
}

fn unmap(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(a),
        v4 => v4,
    }
}

/// An error and its sources, one line: logged once where it is handled.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Which entries to read, as `GET /api/v1/audit?actor=&action=&after=&limit=` gives them.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// A token's subject, a UI session's id or an enroll secret's id.
    pub actor: Option<String>,
    /// Only entries of this action.
    pub action: Option<AuditAction>,
    /// Only entries at or after this time (ms).
    pub since_ms: Option<i64>,
    /// The `next` of the previous page: entries older than it.
    pub after: Option<i64>,
    /// 1..=[`MAX_AUDIT_PAGE`]; default [`DEFAULT_AUDIT_PAGE`].
    pub limit: Option<u32>,
}

pub(crate) const DEFAULT_AUDIT_PAGE: u32 = 100;
pub(crate) const MAX_AUDIT_PAGE: u32 = 1000;

/// A page of entries, newest first.
#[derive(Debug, Clone)]
pub struct AuditPage {
    /// At most the query's `limit` entries, newest first.
    pub entries: Vec<AuditRow>,
    /// Pass as `after` for the next (older) page; `None` on the last page.
    pub next: Option<i64>,
}

/// A query the audit log cannot answer (400).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuditQueryError {
    /// `limit` outside 1..=[`MAX_AUDIT_PAGE`].
    #[error("limit must be from 1 to {MAX_AUDIT_PAGE}")]
    Limit,
}

/// Why [`Audit::query`] failed: the query (400) or the store (503 without a connection,
/// 500 otherwise).
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The query itself is wrong: answered 400.
    #[error(transparent)]
    Query(#[from] AuditQueryError),
    /// The database failed; see [`StoreError`].
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Appends and reads the audit log. Cheap to clone.
#[derive(Clone)]
pub struct Audit {
    store: Store,
}

impl Audit {
    /// An audit log over `store`, where its entries live.
    pub fn new(store: Store) -> Self {
        Audit { store }
    }

    /// Appends an event; returns its id.
    pub async fn record(&self, event: AuditEvent) -> Result<i64, StoreError> {
        self.store.append_audit(event.into_row()).await
    }

    /// Appends an event after the change it describes was committed: a failure here must
    /// not turn a done change into an error for the caller, so it is logged instead.
    pub(crate) async fn record_or_log(&self, event: AuditEvent) {
        let action = event.action.as_str();
        if let Err(e) = self.record(event).await {
            tracing::error!(action, error = %chain(&e), "could not append to the audit log");
        }
    }

    /// `GET /api/v1/audit`: entries newest first, with keyset pages.
    pub async fn query(&self, query: AuditQuery) -> Result<AuditPage, AuditError> {
        let limit = query.limit.unwrap_or(DEFAULT_AUDIT_PAGE);
        if !(1..=MAX_AUDIT_PAGE).contains(&limit) {
            return Err(AuditQueryError::Limit.into());
        }
        let entries = self
            .store
            .query_audit(AuditFilter {
                actor: query.actor,
                action: query.action.map(|a| a.as_str().to_string()),
                since: query.since_ms,
                before_id: query.after,
                limit: i64::from(limit),
            })
            .await?;
        let next = (entries.len() == limit as usize)
            .then(|| entries.last().map(|e| e.id))
            .flatten();
        Ok(AuditPage { entries, next })
    }
}

/// Deletes audit entries older than AUDIT_RETENTION, every `interval`, until stopped.
/// Safe on every replica at once: each deletes whatever is still there.
///
/// Spawned by the assembly code with the root stop token:
/// `tasks.spawn(AuditPruner::new(store.clone(), config.credentials.audit_retention).run(stop.clone()))`.
pub struct AuditPruner {
    store: Store,
    retention: Duration,
    interval: Duration,
}

/// Rows deleted per statement, so a long backlog never holds a lock for long.
const PRUNE_BATCH: i64 = 5000;

impl AuditPruner {
    /// A pruner deleting entries older than `retention`, once an hour.
    pub fn new(store: Store, retention: Duration) -> Self {
        AuditPruner {
            store,
            retention,
            interval: Duration::from_secs(3600),
        }
    }

    /// Prunes every `interval` instead of hourly (tests use seconds).
    pub fn with_interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// One pass: deletes every entry older than the retention at `now` (ms).
    pub async fn prune(&self, now: i64) -> Result<usize, StoreError> {
        let cutoff = now.saturating_sub(self.retention.as_millis() as i64);
        let mut total = 0;
        loop {
            let n = self.store.prune_audit(cutoff, PRUNE_BATCH).await?;
            total += n;
            if (n as i64) < PRUNE_BATCH {
                return Ok(total);
            }
        }
    }

    /// Prunes every interval until `stop` is cancelled; a failed pass is logged and retried
    /// at the next interval, never fatal.
    pub async fn run(self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.prune(now_ms()).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(deleted = n, "pruned the audit log"),
                Err(e) => {
                    tracing::warn!(error = %chain(&e), "audit log pruning failed; retrying at the next interval")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &str) -> Vec<ipnet::IpNet> {
        crate::config::parse_networks(list).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn forwarded_for_is_ignored_from_untrusted_peers() {
        let trusted = nets("10.0.0.0/8");
        assert_eq!(
            client_address(ip("192.0.2.9"), ["198.51.100.1"], &trusted),
            ip("192.0.2.9")
        );
        assert_eq!(
            client_address(ip("192.0.2.9"), ["198.51.100.1"], &[]),
            ip("192.0.2.9")
        );
    }

    #[test]
    fn the_first_untrusted_hop_from_the_right_is_the_client() {
        let trusted = nets("10.0.0.0/8, fd00::/8");
        // A client-supplied spoofed entry on the left is not believed.
        assert_eq!(
            client_address(
                ip("10.0.0.2"),
                ["6.6.6.6, 198.51.100.7", "10.0.0.5"],
                &trusted
            ),
            ip("198.51.100.7")
        );
        assert_eq!(
            client_address(ip("fd00::1"), ["[2001:db8::7]:5555"], &trusted),
            ip("2001:db8::7")
        );
        // Only proxies on the path: the leftmost is as far as we can see.
        assert_eq!(
            client_address(ip("10.0.0.2"), ["10.1.1.1"], &trusted),
            ip("10.1.1.1")
        );
        // Garbage stops the walk at the last trusted hop.
        assert_eq!(
            client_address(ip("10.0.0.2"), ["198.51.100.7, unknown"], &trusted),
            ip("10.0.0.2")
        );
        assert_eq!(
            client_address(ip("::ffff:10.0.0.2"), ["198.51.100.7"], &trusted),
            ip("198.51.100.7")
        );
    }

    #[test]
    fn actions_round_trip_through_their_names() {
        for a in AuditAction::ALL {
            assert_eq!(a.as_str().parse::<AuditAction>(), Ok(a));
        }
        assert!(
            "dropped_tables"
                .parse::<AuditAction>()
                .unwrap_err()
                .contains("token_minted")
        );
    }
}
