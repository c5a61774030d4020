//! The replica-local view of revocations: agents' credential generations and recorded
//! tokens' states, each read from the database at most once per [`CACHE_TTL`].
//!
//! Revocations reach the cache directly on the replica that made them and over the
//! revocation bus on the others, so it is fresh within a second; the TTL only bounds how
//! long a lost bus message (pub/sub is at-most-once) could leave a revoked token usable.
//! Entries only ever move towards "revoked", so a database read racing with a
//! revocation cannot undo it.
//!
//! Live sessions check their credentials against the cache on every ping
//! (`Credentials::must_close`), which marks them *watched*; the replica's
//! [`RevocationRefresh`](super::RevocationRefresh) re-reads the watched keys from the
//! database in batches every heartbeat interval. So a revocation whose bus message was
//! lost still closes a live session within two heartbeat intervals, at the cost of one
//! query per 500 sessions per interval rather than one per ping.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::bus::Revocation;

/// How long a database answer is trusted without hearing otherwise.
pub(crate) const CACHE_TTL: Duration = Duration::from_secs(60);
/// Entries per map; beyond it, expired entries go, then everything (and is re-read).
pub(crate) const CACHE_CAPACITY: usize = 200_000;

/// What the database says about a token's `jti`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TokenState {
    Live,
    Revoked,
    /// Not in `api_tokens`: minted by the CLI or another implementation.
    Unrecorded,
}

impl TokenState {
    fn rank(self) -> u8 {
        match self {
            TokenState::Unrecorded => 0,
            TokenState::Live => 1,
            TokenState::Revoked => 2,
        }
    }
}

pub(crate) struct CredentialCache {
    ttl: Duration,
    capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    generations: HashMap<String, (i64, Instant)>,
    tokens: HashMap<String, (TokenState, Instant)>,
    /// Agents and tokens that live sessions asked about since the last refresh.
    watched_agents: HashSet<String>,
    watched_tokens: HashSet<String>,
}

impl Default for CredentialCache {
    fn default() -> Self {
        Self::new(CACHE_TTL, CACHE_CAPACITY)
    }
}

impl CredentialCache {
    pub(crate) fn new(ttl: Duration, capacity: usize) -> Self {
        CredentialCache {
            ttl,
            capacity: capacity.max(1),
            inner: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The agent's generation, if known and fresh.
    pub(crate) fn generation(&self, client_id: &str) -> Option<i64> {
        let now = Instant::now();
        self.lock()
            .generations
            .get(client_id)
            .filter(|(_, at)| now.duration_since(*at) < self.ttl)
            .map(|(g, _)| *g)
    }

    /// The token's state, if known and fresh.
    pub(crate) fn token(&self, jti: &str) -> Option<TokenState> {
        let now = Instant::now();
        self.lock()
            .tokens
            .get(jti)
            .filter(|(_, at)| now.duration_since(*at) < self.ttl)
            .map(|(s, _)| *s)
    }

    /// Records a generation read from the database or heard on the bus; a lower one
    /// than already known is ignored (generations only grow).
    pub(crate) fn put_generation(&self, client_id: &str, generation: i64) {
        let now = Instant::now();
        let capacity = self.capacity;
        let ttl = self.ttl;
        let mut inner = self.lock();
        bound(&mut inner.generations, capacity, ttl, now);
        let entry = inner
            .generations
            .entry(client_id.to_string())
            .or_insert((generation, now));
        *entry = (entry.0.max(generation), now);
    }

    /// Records a token's state; a token known revoked stays revoked.
    pub(crate) fn put_token(&self, jti: &str, state: TokenState) {
        let now = Instant::now();
        let capacity = self.capacity;
        let ttl = self.ttl;
        let mut inner = self.lock();
        bound(&mut inner.tokens, capacity, ttl, now);
        let entry = inner.tokens.entry(jti.to_string()).or_insert((state, now));
        let kept = if state.rank() >= entry.0.rank() {
            state
        } else {
            entry.0
        };
        *entry = (kept, now);
    }

    pub(crate) fn apply(&self, revocation: &Revocation) {
        match revocation {
            Revocation::Agent {
                client_id,
                generation,
                ..
            } => self.put_generation(client_id, *generation),
            Revocation::Token { jti, .. } => self.put_token(jti, TokenState::Revoked),
        }
    }

    /// Marks an agent's generation and a token's state as wanted by a live session, so
    /// that the next refresh re-reads them. Bounded like the maps: beyond capacity, new
    /// keys wait for the next round.
    pub(crate) fn watch(&self, client_id: Option<&str>, jti: Option<&str>) {
        let capacity = self.capacity;
        let mut inner = self.lock();
        if let Some(id) = client_id
            && inner.watched_agents.len() < capacity
            && !inner.watched_agents.contains(id)
        {
            inner.watched_agents.insert(id.to_string());
        }
        if let Some(jti) = jti
            && inner.watched_tokens.len() < capacity
            && !inner.watched_tokens.contains(jti)
        {
            inner.watched_tokens.insert(jti.to_string());
        }
    }

    /// The watched client ids and `jti`s, forgetting them: sessions watch again at their
    /// next ping.
    pub(crate) fn take_watched(&self) -> (Vec<String>, Vec<String>) {
        let mut inner = self.lock();
        let agents = std::mem::take(&mut inner.watched_agents);
        let tokens = std::mem::take(&mut inner.watched_tokens);
        (agents.into_iter().collect(), tokens.into_iter().collect())
    }

    /// Forgets everything: revocations may have been missed (the bus reconnected).
    pub(crate) fn clear(&self) {
        let mut inner = self.lock();
        inner.generations.clear();
        inner.tokens.clear();
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        let inner = self.lock();
        inner.generations.len() + inner.tokens.len()
    }
}

fn bound<V>(map: &mut HashMap<String, (V, Instant)>, capacity: usize, ttl: Duration, now: Instant) {
    if map.len() >= capacity {
        map.retain(|_, (_, at)| now.duration_since(*at) < ttl);
        if map.len() >= capacity {
            map.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_only_move_towards_revoked() {
        let cache = CredentialCache::default();
        cache.put_generation("a", 2);
        cache.put_generation("a", 1);
        assert_eq!(cache.generation("a"), Some(2));
        cache.put_token("t", TokenState::Revoked);
        cache.put_token("t", TokenState::Live);
        assert_eq!(cache.token("t"), Some(TokenState::Revoked));
    }

    #[test]
    fn stale_entries_are_not_answered_and_the_maps_stay_bounded() {
        let cache = CredentialCache::new(Duration::ZERO, 10);
        cache.put_generation("a", 1);
        assert_eq!(cache.generation("a"), None);
        for i in 0..100 {
            cache.put_token(&i.to_string(), TokenState::Live);
        }
        assert!(cache.len() <= 11, "{}", cache.len());
    }

    #[test]
    fn watched_keys_are_taken_once_and_stay_bounded() {
        let cache = CredentialCache::new(CACHE_TTL, 2);
        cache.watch(Some("a"), Some("t1"));
        cache.watch(Some("a"), None);
        cache.watch(Some("b"), Some("t2"));
        cache.watch(Some("c"), Some("t3"));
        let (mut agents, mut tokens) = cache.take_watched();
        agents.sort();
        tokens.sort();
        assert_eq!(agents, ["a", "b"]);
        assert_eq!(tokens, ["t1", "t2"]);
        assert_eq!(cache.take_watched(), (vec![], vec![]));
    }
}
