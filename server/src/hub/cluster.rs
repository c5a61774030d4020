//! Cluster mode: the Redis registry that tells every replica where each agent is
//! connected, and the pub/sub bus that carries wake-ups and kicks between replicas.
//!
//! Redis is a routing table, never the source of truth: commands live in the database,
//! so a lost message or a flushed registry costs latency, not data. Every write to an
//! agent's entry is compare-and-set on its connection epoch (Lua), so a stale replica can
//! neither overwrite nor delete a newer connection's entry. Entries expire unless their
//! replica refreshes them, so a replica killed without grace leaves nothing behind.
//!
//! Keys (all under REDIS_KEY_PREFIX):
//! - `agent:{client_id}` hash `pod`, `epoch`, `since`; TTL about WS_OFFLINE_TIMEOUT.
//! - `pods` hash `pod_id` → `count:updated_ms`: agents per replica, for rebalancing.
//! - channel `pod:{pod_id}`: one per replica (not per agent), JSON [`BusMessage`]s.
//! - channel `changes`: committed changes for live views, batched per replica
//!   ([`ChangeBatch`]), so a browser on any replica sees what happened on every one.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use redis::{AsyncCommands, RedisResult, Script};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::redis_conn::RedisConn;
use super::{Hub, SessionHandle};
use crate::config::RedisConfig;
use crate::error::error_chain;
use crate::metrics::Metrics;
use crate::store::{Announcement, Change, Store, now_ms};
use crate::ws::protocol;

/// Sets the entry if the caller's epoch is at least the stored one; returns
/// `{claimed (0|1), previous pod, previous epoch}`. Used to register and to refresh.
const CLAIM: &str = r#"
local cur = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '0')
local prev = redis.call('HGET', KEYS[1], 'pod') or ''
if cur > tonumber(ARGV[2]) then return {0, prev, cur} end
redis.call('HSET', KEYS[1], 'pod', ARGV[1], 'epoch', ARGV[2], 'since', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {1, prev, cur}
"#;

/// Deletes the entry only if it still belongs to the caller's epoch.
const RELEASE: &str = r#"
if redis.call('HGET', KEYS[1], 'epoch') == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// A message on a replica's channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum BusMessage {
    /// Commands may be waiting for this agent.
    Wake { id: String },
    /// A connection with this epoch exists elsewhere: close any older one.
    Replaced { id: String, epoch: i64 },
    /// An operator deleted the agent.
    Deleted { id: String },
}

/// Changes one replica committed within a short window, for the others' live views.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ChangeBatch {
    pub origin: String,
    pub changes: Vec<Change>,
}

/// How long a replica collects changes before forwarding them as one message.
const CHANGE_BATCH_WINDOW: Duration = Duration::from_millis(250);
/// A busier window is forwarded as "everything changed" instead of item by item.
const CHANGE_BATCH_MAX: usize = 256;

/// Outcome of registering a connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// Registered; `previous` is the replica that held the agent before, if another.
    Claimed {
        /// The POD_ID of the replica that held the agent, which is told to close its
        /// session.
        previous: Option<String>,
    },
    /// A newer connection is registered: this one is stale.
    Superseded,
    /// Redis did not answer; the database epoch still fences stale connections.
    Unknown,
}

/// This replica's part of the cluster (cluster mode only): agent presence in Redis (which
/// replica holds which agent), the per-replica bus channel for wake-ups and closes, the
/// changes channel for live views, and the replica counts rebalancing reads.
pub struct Cluster {
    pod: String,
    prefix: String,
    /// Reconnects (and follows a Sentinel failover) by itself; created lazily so the
    /// server starts while Redis is down.
    conn: RedisConn,
    metrics: Arc<Metrics>,
    /// Whether the last Redis call succeeded; errors are logged once per outage.
    healthy: AtomicBool,
    /// When the last outage was logged (ms). The first call on a connection opened before
    /// a restart fails even though Redis is back; that belongs to the same outage.
    outage_logged_ms: AtomicI64,
    /// Signalled when Redis comes back or the subscriber resubscribes: presence is
    /// re-registered and pending commands are re-checked without waiting for a tick.
    pub(crate) resync: Notify,
    /// Signalled when Redis answers again after an outage: the subscription may have
    /// died silently meanwhile (a cut link shows no error to an idle subscriber, and
    /// Redis drops clients it cannot reach), so the subscriber subscribes afresh.
    recovered: Notify,
    claim: Script,
    release: Script,
    /// Lifetime of an agent entry without refresh.
    presence_ttl: Duration,
    /// Set once this replica is routable (its readiness answered 200, or an agent
    /// reached it): before that its count of zero would make every other replica shed
    /// agents that cannot reach it yet.
    routable: AtomicBool,
}

/// Counts are published every second; one older than this belongs to a replica that is
/// gone (killed, or exited before its next tick).
const POD_COUNT_STALE_AFTER: Duration = Duration::from_secs(4);

/// Failures this soon after the last logged one are counted but not logged again.
const OUTAGE_LOG_QUIET: Duration = Duration::from_secs(30);

/// Bound on a single Redis call, so a hung Redis never stalls a request or a session.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

impl Cluster {
    /// A cluster member named `pod` (its POD_ID). Presence entries live for
    /// `offline_timeout + heartbeat` without a refresh. Connects lazily: `Err` only for an
    /// unusable configuration, never because Redis is down.
    pub fn new(
        cfg: &RedisConfig,
        pod: String,
        heartbeat: Duration,
        offline_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> RedisResult<Self> {
        let conn = RedisConn::new(cfg, REDIS_TIMEOUT)?;
        Ok(Cluster {
            pod,
            prefix: cfg.key_prefix.clone(),
            conn,
            metrics,
            healthy: AtomicBool::new(true),
            outage_logged_ms: AtomicI64::new(i64::MIN / 2),
            resync: Notify::new(),
            recovered: Notify::new(),
            claim: Script::new(CLAIM),
            release: Script::new(RELEASE),
            presence_ttl: offline_timeout + heartbeat,
            routable: AtomicBool::new(false),
        })
    }

    fn agent_key(&self, id: &str) -> String {
        format!("{}agent:{id}", self.prefix)
    }

    fn channel(&self, pod: &str) -> String {
        format!("{}pod:{pod}", self.prefix)
    }

    fn changes_channel(&self) -> String {
        format!("{}changes", self.prefix)
    }

    fn pods_key(&self) -> String {
        format!("{}pods", self.prefix)
    }

    /// This replica's POD_ID.
    pub fn pod(&self) -> &str {
        &self.pod
    }

    pub(crate) fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Counts and logs a failure (once per outage) or notes a recovery.
    fn track<T>(&self, what: &str, result: RedisResult<T>) -> Option<T> {
        match result {
            Ok(v) => {
                if !self.healthy.swap(true, Ordering::Relaxed) {
                    tracing::info!("Redis reachable again; re-registering agents");
                    self.metrics.redis_up.set(1);
                    self.recovered.notify_waiters();
                    self.resync.notify_waiters();
                }
                Some(v)
            }
            Err(e) => {
                self.metrics.redis_errors.inc();
                let now = now_ms();
                let last = self.outage_logged_ms.load(Ordering::Relaxed);
                let was_healthy = self.healthy.swap(false, Ordering::Relaxed);
                if was_healthy {
                    self.metrics.redis_up.set(0);
                }
                if was_healthy && now - last > OUTAGE_LOG_QUIET.as_millis() as i64 {
                    self.outage_logged_ms.store(now, Ordering::Relaxed);
                    tracing::error!(
                        during = what,
                        error = %error_chain(&e),
                        "Redis unavailable; agents stay connected and commands are stored, \
                         cross-replica delivery waits for the periodic sweep until it is back"
                    );
                }
                None
            }
        }
    }

    async fn with_timeout<T>(fut: impl Future<Output = RedisResult<T>>) -> RedisResult<T> {
        tokio::time::timeout(REDIS_TIMEOUT, fut)
            .await
            .unwrap_or_else(|_| {
                Err(redis::RedisError::from(std::io::Error::from(
                    std::io::ErrorKind::TimedOut,
                )))
            })
    }

    /// Registers a connection (compare-and-set on its epoch).
    pub async fn claim(&self, id: &str, epoch: i64, since_ms: i64) -> Claim {
        let mut conn = self.conn.clone();
        let mut invocation = self.claim.key(self.agent_key(id));
        invocation
            .arg(&self.pod)
            .arg(epoch)
            .arg(since_ms)
            .arg(self.presence_ttl.as_millis() as u64);
        let result =
            Self::with_timeout(invocation.invoke_async::<(i64, String, i64)>(&mut conn)).await;
        match self.track("claim", result) {
            Some((1, prev, _)) => Claim::Claimed {
                previous: (!prev.is_empty() && prev != self.pod).then_some(prev),
            },
            Some(_) => Claim::Superseded,
            None => Claim::Unknown,
        }
    }

    /// Removes a connection's entry unless a newer connection already replaced it.
    pub(crate) async fn release(&self, id: &str, epoch: i64) {
        let mut conn = self.conn.clone();
        let mut invocation = self.release.key(self.agent_key(id));
        invocation.arg(epoch);
        let result = Self::with_timeout(invocation.invoke_async::<i64>(&mut conn)).await;
        self.track("release", result);
    }

    /// The replica an agent is connected to, per the registry.
    pub(crate) async fn owner(&self, id: &str) -> Option<String> {
        let mut conn = self.conn.clone();
        let key = self.agent_key(id);
        let result = Self::with_timeout(conn.hget::<_, _, Option<String>>(key, "pod")).await;
        self.track("lookup", result).flatten()
    }

    pub(crate) async fn publish(&self, pod: &str, msg: &BusMessage) -> bool {
        let mut conn = self.conn.clone();
        let payload = serde_json::to_string(msg).unwrap_or_default();
        let result =
            Self::with_timeout(conn.publish::<_, _, i64>(self.channel(pod), payload)).await;
        let sent = self.track("publish", result).is_some();
        if sent && matches!(msg, BusMessage::Wake { .. }) {
            self.metrics.wakeups_sent.inc();
        }
        sent
    }

    /// Re-claims every local session's entry (recreating entries lost to a Redis restart
    /// or FLUSHALL) and returns the sessions that a newer connection has superseded.
    pub(crate) async fn refresh(&self, sessions: &[Arc<SessionHandle>]) -> Vec<Arc<SessionHandle>> {
        let mut stale = Vec::new();
        let mut conn = self.conn.clone();
        // Loading per cycle re-installs the script after a Redis restart emptied its cache.
        let sha: String = match self.track(
            "script load",
            Self::with_timeout(self.claim.prepare_invoke().load_async(&mut conn)).await,
        ) {
            Some(sha) => sha,
            None => return stale,
        };
        let ttl = self.presence_ttl.as_millis() as u64;
        for chunk in sessions.chunks(1000) {
            let mut pipe = redis::pipe();
            for s in chunk {
                pipe.cmd("EVALSHA")
                    .arg(&sha)
                    .arg(1)
                    .arg(self.agent_key(&s.client_id))
                    .arg(&self.pod)
                    .arg(s.epoch)
                    .arg(s.connected_at_ms)
                    .arg(ttl);
            }
            let result =
                Self::with_timeout(pipe.query_async::<Vec<(i64, String, i64)>>(&mut conn)).await;
            let Some(outcomes) = self.track("presence refresh", result) else {
                return stale;
            };
            self.metrics.presence_refreshes.inc_by(chunk.len() as u64);
            for (s, (claimed, _, _)) in chunk.iter().zip(outcomes) {
                if claimed == 0 {
                    stale.push(s.clone());
                }
            }
        }
        stale
    }

    pub(crate) fn mark_routable(&self) {
        self.routable.store(true, Ordering::Relaxed);
    }

    /// Publishes this replica's agent count (once it is routable) and returns every live
    /// replica's count.
    pub(crate) async fn exchange_counts(&self, mine: usize) -> Option<HashMap<String, u64>> {
        let mut conn = self.conn.clone();
        let now = now_ms();
        let key = self.pods_key();
        if self.routable.load(Ordering::Relaxed) || mine > 0 {
            let write = conn.hset::<_, _, _, ()>(&key, &self.pod, format!("{mine}:{now}"));
            self.track("pod count", Self::with_timeout(write).await)?;
        }
        let all = self.track(
            "pod counts",
            Self::with_timeout(conn.hgetall::<_, HashMap<String, String>>(&key)).await,
        )?;
        let cutoff = now - POD_COUNT_STALE_AFTER.as_millis() as i64;
        let mut live = HashMap::new();
        let mut gone = Vec::new();
        for (pod, value) in all {
            let parsed = value
                .split_once(':')
                .and_then(|(c, t)| Some((c.parse::<u64>().ok()?, t.parse::<i64>().ok()?)));
            match parsed {
                Some((count, at)) if at >= cutoff => {
                    live.insert(pod, count);
                }
                _ => gone.push(pod),
            }
        }
        if !gone.is_empty() {
            let _ = Self::with_timeout(conn.hdel::<_, _, ()>(&key, gone)).await;
        }
        Some(live)
    }

    /// Takes this replica out of the counts (it is draining).
    pub async fn leave(&self) {
        let mut conn = self.conn.clone();
        let result = Self::with_timeout(conn.hdel::<_, _, ()>(self.pods_key(), &self.pod)).await;
        self.track("leave", result);
    }

    /// A Redis `PING` within 2 s, for readiness; `Err` is the error chain to report.
    pub async fn ping(&self) -> Result<(), String> {
        let mut conn = self.conn.clone();
        let result = Self::with_timeout(redis::cmd("PING").query_async::<String>(&mut conn)).await;
        let ok = result.as_ref().map(|_| ()).map_err(|e| error_chain(e));
        self.track("ping", result);
        ok
    }

    /// Listens on this replica's channel until `stop`, resubscribing after any failure
    /// on a connection of its own (a subscribed connection can issue no other command).
    pub(crate) async fn run_subscriber(
        self: Arc<Self>,
        hub: Hub,
        store: Store,
        stop: CancellationToken,
    ) {
        let channel = self.channel(&self.pod);
        let changes = self.changes_channel();
        let mut backoff = Duration::from_millis(200);
        loop {
            let subscribed = async {
                let mut pubsub = Self::with_timeout(self.conn.pubsub()).await?;
                Self::with_timeout(pubsub.subscribe(&[&channel, &changes])).await?;
                Ok::<_, redis::RedisError>(pubsub)
            }
            .await;
            if let Some(pubsub) = self.track("subscribe", subscribed) {
                backoff = Duration::from_millis(200);
                tracing::info!(channel, "subscribed to this replica's channel");
                // Wake-ups published while we were not listening are gone: re-check.
                self.resync.notify_waiters();
                let mut messages = pubsub.into_on_message();
                let lost = loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        // Sentinel named another master: subscribe there instead.
                        _ = self.conn.moved() => break true,
                        // Redis is back after an outage: do not trust this subscription;
                        // subscribe afresh at once.
                        _ = self.recovered.notified() => break false,
                        msg = messages.next() => match msg {
                            Some(msg) if msg.get_channel_name() == changes => {
                                self.relay_changes(&store, msg.get_payload_bytes());
                            }
                            Some(msg) => self.handle(&hub, msg.get_payload_bytes()),
                            None => break true,
                        },
                    }
                };
                if !lost {
                    continue;
                }
                self.track::<()>(
                    "subscription",
                    Err(std::io::Error::from(std::io::ErrorKind::ConnectionReset).into()),
                );
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// Re-announces another replica's changes to this replica's live views.
    fn relay_changes(&self, store: &Store, payload: &[u8]) {
        match serde_json::from_slice::<ChangeBatch>(payload) {
            Ok(batch) if batch.origin != self.pod => batch
                .changes
                .into_iter()
                .for_each(|c| store.announce_remote(c)),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "ignored a malformed change batch"),
        }
    }

    /// Forwards this replica's committed changes to the others, batched per
    /// [`CHANGE_BATCH_WINDOW`], until `stop`.
    pub(crate) async fn forward_changes(self: Arc<Self>, store: Store, stop: CancellationToken) {
        let mut changes = store.subscribe();
        let mut batch: std::collections::HashSet<Change> = std::collections::HashSet::new();
        let add = |batch: &mut std::collections::HashSet<Change>, received| match received {
            Ok(Announcement {
                remote: false,
                change,
            }) => {
                batch.insert(change);
            }
            Ok(Announcement { remote: true, .. }) => {}
            // Too many to follow: tell the others that everything may have changed.
            Err(_) => batch.extend([
                Change::Agents,
                Change::Commands,
                Change::Binaries,
                Change::Rollouts,
                Change::Jobs,
            ]),
        };
        loop {
            let first = tokio::select! {
                _ = stop.cancelled() => return,
                received = changes.recv() => received,
            };
            if matches!(first, Err(tokio::sync::broadcast::error::RecvError::Closed)) {
                return;
            }
            add(&mut batch, first);
            let window = tokio::time::sleep(CHANGE_BATCH_WINDOW);
            tokio::pin!(window);
            loop {
                tokio::select! {
                    _ = &mut window => break,
                    received = changes.recv() => add(&mut batch, received),
                }
            }
            if batch.is_empty() {
                continue;
            }
            let changes: Vec<Change> = if batch.len() > CHANGE_BATCH_MAX {
                batch.clear();
                vec![
                    Change::Agents,
                    Change::Commands,
                    Change::Binaries,
                    Change::Rollouts,
                    Change::Jobs,
                ]
            } else {
                batch.drain().collect()
            };
            let payload = serde_json::to_string(&ChangeBatch {
                origin: self.pod.clone(),
                changes,
            })
            .unwrap_or_default();
            let mut conn = self.conn.clone();
            let result =
                Self::with_timeout(conn.publish::<_, _, i64>(self.changes_channel(), payload))
                    .await;
            self.track("forward changes", result);
        }
    }

    fn handle(&self, hub: &Hub, payload: &[u8]) {
        match serde_json::from_slice::<BusMessage>(payload) {
            Ok(BusMessage::Wake { id }) => {
                self.metrics.wakeups_received.inc();
                hub.wake(&id);
            }
            Ok(BusMessage::Replaced { id, epoch }) => {
                if let Some(session) = hub.get(&id).filter(|s| s.epoch < epoch) {
                    session.close(protocol::REPLACED);
                }
            }
            Ok(BusMessage::Deleted { id }) => {
                hub.close(&id, protocol::DELETED);
            }
            Err(e) => tracing::warn!(error = %e, "ignored a malformed cluster message"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_messages_are_tagged_json() {
        let m = BusMessage::Replaced {
            id: "a".into(),
            epoch: 3,
        };
        let text = serde_json::to_string(&m).unwrap();
        assert_eq!(text, r#"{"op":"replaced","id":"a","epoch":3}"#);
        assert_eq!(serde_json::from_str::<BusMessage>(&text).unwrap(), m);
    }
}
