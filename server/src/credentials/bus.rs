//! Revocations between replicas (cluster mode): one Redis pub/sub channel,
//! `{REDIS_KEY_PREFIX}revocations`, that every replica publishes to and listens on.
//!
//! Pub/sub is at-most-once, so the database stays the source of truth: a replica that
//! (re)subscribes forgets its whole cache, and a message lost without a reconnect costs
//! at most the cache's TTL. The replica that revokes applies the revocation to itself
//! before publishing, so it never depends on Redis for its own view.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::{AsyncCommands, RedisResult};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::Credentials;
use crate::audit::chain;
use crate::auth::Role;
use crate::config::RedisConfig;
use crate::hub::redis_conn::RedisConn;

/// A revocation every replica must apply to its cache and its live sessions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum Revocation {
    /// Tokens of this agent minted for a generation below `generation` are invalid.
    Agent {
        client_id: String,
        generation: i64,
        /// The agent was deleted (its session closes as deleted, not as revoked).
        deleted: bool,
    },
    /// One recorded token was revoked.
    Token {
        jti: String,
        subject: String,
        role: Role,
    },
}

#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    /// The replica that published it: it already applied the revocation.
    origin: String,
    revocation: Revocation,
}

const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

/// This replica's end of the revocation channel: publishes the revocations made here and
/// applies those of the other replicas (see the module doc for why a lost one is harmless).
pub struct RevocationBus {
    pod: String,
    channel: String,
    /// For publishing; reconnects by itself (and follows a Sentinel failover). The
    /// subscription has its own connection.
    conn: RedisConn,
}

impl RevocationBus {
    /// Connects lazily, so the server starts while Redis is down.
    /// TLS, the ACL user and Sentinel come from the same settings as the registry's.
    pub fn new(cfg: &RedisConfig, pod: String) -> RedisResult<Self> {
        Ok(RevocationBus {
            pod,
            channel: format!("{}revocations", cfg.key_prefix),
            conn: RedisConn::new(cfg, REDIS_TIMEOUT)?,
        })
    }

    /// Tells the other replicas. Returns whether Redis took the message; when it did
    /// not, they learn within the cache TTL from the database.
    pub(crate) async fn publish(&self, revocation: &Revocation) -> bool {
        let payload = serde_json::to_string(&Envelope {
            origin: self.pod.clone(),
            revocation: revocation.clone(),
        })
        .unwrap_or_default();
        let mut conn = self.conn.clone();
        let sent = tokio::time::timeout(
            REDIS_TIMEOUT,
            conn.publish::<_, _, i64>(&self.channel, payload),
        )
        .await;
        match sent {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => {
                tracing::warn!(error = %chain(&e), "could not publish a revocation; other replicas see it within the cache TTL");
                false
            }
            Err(_) => {
                tracing::warn!(
                    "publishing a revocation timed out; other replicas see it within the cache TTL"
                );
                false
            }
        }
    }

    /// Listens until `stop`, applying other replicas' revocations through
    /// `credentials`. Resubscribes after any failure, and forgets the cache each time it
    /// (re)subscribes, since messages sent meanwhile are gone.
    ///
    /// Spawned by the assembly code in cluster mode:
    /// `tasks.spawn(bus.clone().run_subscriber(credentials.clone(), stop.clone()))`.
    pub(crate) async fn run_subscriber(
        self: Arc<Self>,
        credentials: Credentials,
        stop: CancellationToken,
    ) {
        self.subscribe_until(credentials, stop, None).await
    }

    /// [`RevocationBus::run_subscriber`], signalling `subscribed` each time the
    /// subscription is in place (tests wait on it instead of sleeping).
    pub async fn subscribe_until(
        self: Arc<Self>,
        credentials: Credentials,
        stop: CancellationToken,
        subscribed: Option<Arc<tokio::sync::Notify>>,
    ) {
        let mut backoff = Duration::from_millis(200);
        loop {
            let attempt = async {
                let mut pubsub = tokio::time::timeout(REDIS_TIMEOUT, self.conn.pubsub())
                    .await
                    .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
                tokio::time::timeout(REDIS_TIMEOUT, pubsub.subscribe(&self.channel))
                    .await
                    .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(pubsub)
            };
            let pubsub = tokio::select! {
                _ = stop.cancelled() => return,
                p = attempt => p,
            };
            match pubsub {
                Ok(pubsub) => {
                    backoff = Duration::from_millis(200);
                    credentials.forget_cached();
                    if let Some(n) = &subscribed {
                        n.notify_one();
                    }
                    let mut messages = pubsub.into_on_message();
                    loop {
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            msg = messages.next() => match msg {
                                Some(msg) => self.handle(&credentials, msg.get_payload_bytes()),
                                None => break,
                            },
                            // A Sentinel failover: subscribe on the new master.
                            _ = self.conn.moved() => break,
                        }
                    }
                    tracing::warn!("revocation subscription lost; resubscribing");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not subscribe to revocations; retrying")
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    fn handle(&self, credentials: &Credentials, payload: &[u8]) {
        match serde_json::from_slice::<Envelope>(payload) {
            Ok(envelope) if envelope.origin != self.pod => {
                credentials.apply_local(&envelope.revocation)
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "ignored a malformed revocation message"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revocations_are_tagged_json() {
        let r = Revocation::Agent {
            client_id: "web-7".into(),
            generation: 2,
            deleted: true,
        };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(
            text,
            r#"{"kind":"agent","client_id":"web-7","generation":2,"deleted":true}"#
        );
        assert_eq!(serde_json::from_str::<Revocation>(&text).unwrap(), r);
    }
}
