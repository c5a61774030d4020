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
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;

use super::batch::Batcher;
use super::redis_conn::RedisConn;
use super::{Hub, SessionHandle};
use crate::config::RedisConfig;
use crate::error::error_chain;
use crate::metrics::Metrics;
use crate::store::{Announcement, Change, Store, now_ms};
use crate::ws::protocol;

/// Registers connections: for each key, sets the entry if the caller's epoch is at least
/// the stored one. `KEYS` are the agents' entries; `ARGV` the pod and the entries' TTL
/// (ms), then each key's epoch and `since`. Returns `{claimed (0|1), previous pod,
/// previous epoch}` per key, in order; a key named twice is claimed in that order, as by
/// two calls. Used to register (a batch of connects) and to refresh.
const CLAIM_ALL: &str = r#"
local out = {}
for i, key in ipairs(KEYS) do
  local epoch, since = ARGV[1 + 2 * i], ARGV[2 + 2 * i]
  local held = redis.call('HMGET', key, 'epoch', 'pod')
  local cur = tonumber(held[1] or '0')
  local prev = held[2] or ''
  if cur > tonumber(epoch) then
    out[i] = {0, prev, cur}
  else
    redis.call('HSET', key, 'pod', ARGV[1], 'epoch', epoch, 'since', since)
    redis.call('PEXPIRE', key, ARGV[2])
    out[i] = {1, prev, cur}
  end
end
return out
"#;

/// Deletes each entry (`KEYS`) only if it still belongs to the caller's epoch (`ARGV`, one
/// per key); returns how many were deleted.
const RELEASE_ALL: &str = r#"
local n = 0
for i, key in ipairs(KEYS) do
  if redis.call('HGET', key, 'epoch') == ARGV[i] then n = n + redis.call('DEL', key) end
end
return n
"#;

/// Most registry entries one script call claims or releases: a storm's claims share a
/// few calls, and none holds Redis for more than a few milliseconds.
const REGISTRY_BATCH: usize = 1000;

/// A connect waiting for its registry claim.
struct PendingClaim {
    id: String,
    epoch: i64,
    since_ms: i64,
    reply: oneshot::Sender<Claim>,
}

/// A disconnect waiting for its registry entry's removal.
struct PendingRelease {
    id: String,
    epoch: i64,
    done: oneshot::Sender<()>,
}

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
    /// [`CLAIM_ALL`].
    claim: Script,
    /// [`RELEASE_ALL`].
    release: Script,
    /// Connects waiting to be claimed together, in one script call.
    claims: Batcher<PendingClaim>,
    /// Disconnects waiting to be released together, in one script call.
    releases: Batcher<PendingRelease>,
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
            claim: Script::new(CLAIM_ALL),
            release: Script::new(RELEASE_ALL),
            claims: Batcher::new(),
            releases: Batcher::new(),
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

    /// Registers a connection (compare-and-set on its epoch) and, if another replica held
    /// the agent, tells that one to close its older session (`replaced` on its channel).
    ///
    /// Connects arriving together share the round trips: the claims waiting while one
    /// batch is in flight go out as the next one, in one script call ([`CLAIM_ALL`]),
    /// and their `replaced` notices as one pipeline. Each entry is still compare-and-set
    /// on its own epoch, so the newest connection wins exactly as with one call each.
    pub async fn claim(self: &Arc<Self>, id: &str, epoch: i64, since_ms: i64) -> Claim {
        let (reply, claimed) = oneshot::channel();
        let pending = PendingClaim {
            id: id.to_string(),
            epoch,
            since_ms,
            reply,
        };
        if self.claims.push(pending) {
            let cluster = self.clone();
            // Its own task, so a caller that goes away never strands the queue; every
            // call in it is bounded by REDIS_TIMEOUT.
            tokio::spawn(async move { cluster.flush_claims().await });
        }
        claimed.await.unwrap_or(Claim::Unknown)
    }

    /// Claims queued connects, batch after batch, until none is waiting.
    async fn flush_claims(&self) {
        loop {
            let batch = self.claims.take(REGISTRY_BATCH);
            if batch.is_empty() {
                return;
            }
            let entries: Vec<(&str, i64, i64)> = batch
                .iter()
                .map(|p| (p.id.as_str(), p.epoch, p.since_ms))
                .collect();
            let outcomes = self.claim_all("claim", &entries).await;
            let claims: Vec<Claim> = match outcomes {
                Some(outcomes) if outcomes.len() == batch.len() => outcomes
                    .into_iter()
                    .map(|(claimed, prev, _)| match claimed {
                        1 => Claim::Claimed {
                            previous: (!prev.is_empty() && prev != self.pod).then_some(prev),
                        },
                        _ => Claim::Superseded,
                    })
                    .collect(),
                _ => batch.iter().map(|_| Claim::Unknown).collect(),
            };
            let replaced: Vec<(&str, BusMessage)> = batch
                .iter()
                .zip(&claims)
                .filter_map(|(p, c)| match c {
                    Claim::Claimed {
                        previous: Some(pod),
                    } => Some((
                        pod.as_str(),
                        BusMessage::Replaced {
                            id: p.id.clone(),
                            epoch: p.epoch,
                        },
                    )),
                    _ => None,
                })
                .collect();
            if !replaced.is_empty() {
                let mut pipe = redis::pipe();
                for (pod, msg) in &replaced {
                    let payload = serde_json::to_string(msg).unwrap_or_default();
                    pipe.cmd("PUBLISH")
                        .arg(self.channel(pod))
                        .arg(payload)
                        .ignore();
                }
                let mut conn = self.conn.clone();
                let result = Self::with_timeout(pipe.query_async::<()>(&mut conn)).await;
                self.track("publish", result);
            }
            for (pending, claim) in batch.into_iter().zip(claims) {
                let _ = pending.reply.send(claim);
            }
        }
    }

    /// One [`CLAIM_ALL`] call for `entries` (`client_id`, epoch, `since` in ms), at most
    /// [`REGISTRY_BATCH`]: each entry's `(claimed, previous pod, previous epoch)`, or
    /// `None` when Redis did not answer (counted and logged as `what`).
    async fn claim_all(
        &self,
        what: &str,
        entries: &[(&str, i64, i64)],
    ) -> Option<Vec<(i64, String, i64)>> {
        let mut invocation = self.claim.prepare_invoke();
        invocation
            .arg(&self.pod)
            .arg(self.presence_ttl.as_millis() as u64);
        for (id, epoch, since_ms) in entries {
            invocation
                .key(self.agent_key(id))
                .arg(*epoch)
                .arg(*since_ms);
        }
        let mut conn = self.conn.clone();
        let result =
            Self::with_timeout(invocation.invoke_async::<Vec<(i64, String, i64)>>(&mut conn)).await;
        self.track(what, result)
    }

    /// Removes a connection's entry unless a newer connection already replaced it.
    /// Disconnects arriving together share one script call ([`RELEASE_ALL`]), each
    /// entry still compared with its own epoch.
    pub(crate) async fn release(self: &Arc<Self>, id: &str, epoch: i64) {
        let (done, released) = oneshot::channel();
        let pending = PendingRelease {
            id: id.to_string(),
            epoch,
            done,
        };
        if self.releases.push(pending) {
            let cluster = self.clone();
            tokio::spawn(async move { cluster.flush_releases().await });
        }
        let _ = released.await;
    }

    /// Releases queued disconnects, batch after batch, until none is waiting.
    async fn flush_releases(&self) {
        loop {
            let batch = self.releases.take(REGISTRY_BATCH);
            if batch.is_empty() {
                return;
            }
            let mut invocation = self.release.prepare_invoke();
            for p in &batch {
                invocation.key(self.agent_key(&p.id)).arg(p.epoch);
            }
            let mut conn = self.conn.clone();
            let result = Self::with_timeout(invocation.invoke_async::<i64>(&mut conn)).await;
            self.track("release", result);
            for p in batch {
                let _ = p.done.send(());
            }
        }
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
        for chunk in sessions.chunks(REGISTRY_BATCH) {
            let entries: Vec<(&str, i64, i64)> = chunk
                .iter()
                .map(|s| (s.client_id.as_str(), s.epoch, s.connected_at_ms))
                .collect();
            // A script call re-installs the script after a Redis restart emptied its cache.
            let Some(outcomes) = self.claim_all("presence refresh", &entries).await else {
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
