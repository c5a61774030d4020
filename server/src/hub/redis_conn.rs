//! Connections to Redis for cluster mode: the command connection and the pub/sub
//! connections, to one address (REDIS_HOST) or to whatever master a Sentinel set names
//! (REDIS_SENTINELS), in plain TCP or TLS (REDIS_TLS, REDIS_TLS_CA_FILE), as an ACL user
//! (REDIS_USERNAME) or the `default` one.
//!
//! [`RedisConn`] is a cheap `Clone` handle that implements `redis::aio::ConnectionLike`, so
//! commands, pipelines and scripts run on it unchanged whichever the target is.
//!
//! With a single address, the redis crate's `ConnectionManager` reconnects by itself. With
//! Sentinel, a reconnection must first ask the sentinels which node is the master now, and
//! `ConnectionManager` only knows one address; so the Sentinel target keeps one multiplexed
//! connection and drops it on any error that means "this is no longer the master" (the
//! connection failed, timed out, or the node answered READONLY because it was demoted).
//! The next command resolves the master again. A command that failed that way is retried
//! once on the new connection: every command the cluster sends is safe to repeat (claims
//! are compare-and-set, wake-ups are idempotent).
//!
//! A failover does not always break the old connection: after `SENTINEL FAILOVER`, or
//! while the old master is cut off rather than dead, it keeps accepting writes until the
//! sentinels reconfigure it. So at most every [`MASTER_RECHECK`] a command also asks the
//! sentinels, in the background, which node is the master; when it has changed, the
//! connection is dropped and [`RedisConn::moved`] tells the subscriber to resubscribe on
//! the new master (its resubscription re-checks pending commands, so a wake-up published
//! on the old master in between costs latency, not the command).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionAddr, ConnectionInfo, ErrorKind,
    IntoConnectionInfo, Pipeline, RedisError, RedisFuture, RedisResult, TlsCertificates, TlsMode,
    Value,
};

use crate::config::{RedisConfig, RedisTarget, SentinelConfig};

/// A handle on the command connection; clone it per call.
#[derive(Clone)]
pub(crate) enum RedisConn {
    /// REDIS_HOST: the crate's reconnecting manager, plus the client for pub/sub.
    Direct {
        /// Behind an `Arc` because the handle is cloned for every command.
        client: Arc<Client>,
        manager: ConnectionManager,
        db: i64,
    },
    /// REDIS_SENTINELS: the master as the sentinels report it.
    Sentinel(Arc<SentinelTarget>),
}

/// The Sentinel target's shared state.
pub(crate) struct SentinelTarget {
    /// Asks the sentinels for the master; behind an async lock because resolving takes
    /// `&mut` and several callers may find the connection gone at once.
    sentinel: tokio::sync::Mutex<SentinelClient>,
    /// The connection to the master last resolved, with its generation, so that a caller
    /// holding an older connection cannot drop a newer one.
    current: std::sync::Mutex<Option<(u64, MultiplexedConnection)>>,
    generation: AtomicU64,
    timeout: Duration,
    db: i64,
    /// The master's address as last resolved, to tell a failover from a reconnection.
    master_addr: std::sync::Mutex<Option<String>>,
    /// When the sentinels were last asked, and whether a check is running now.
    last_check: std::sync::Mutex<Instant>,
    checking: AtomicBool,
    /// Signalled when the sentinels name another master.
    moved: tokio::sync::Notify,
}

/// How often a busy replica asks the sentinels whether the master has changed.
pub(crate) const MASTER_RECHECK: Duration = Duration::from_secs(1);

impl RedisConn {
    /// Builds the handle without connecting: the server starts while Redis is down, and
    /// connects (or resolves the master) on first use. `timeout` bounds connecting and each
    /// response.
    pub(crate) fn new(cfg: &RedisConfig, timeout: Duration) -> RedisResult<Self> {
        install_crypto_provider();
        let certificates = cfg.tls_ca.as_ref().map(|ca| TlsCertificates {
            client_tls: None,
            root_cert: Some(ca.pem.clone()),
        });
        match &cfg.target {
            RedisTarget::Direct { host, port } => {
                let addr = if cfg.tls {
                    ConnectionAddr::TcpTls {
                        host: host.clone(),
                        port: *port,
                        insecure: false,
                        tls_params: None,
                    }
                } else {
                    ConnectionAddr::Tcp(host.clone(), *port)
                };
                let info = addr.into_connection_info()?;
                let info = with_credentials(info, cfg);
                let client = match &certificates {
                    Some(certs) => Client::build_with_tls(info, certs.clone())?,
                    None => Client::open(info)?,
                };
                let manager_config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_secs(2));
                let manager =
                    ConnectionManager::new_lazy_with_config(client.clone(), manager_config)?;
                Ok(RedisConn::Direct {
                    client: Arc::new(client),
                    manager,
                    db: cfg.db,
                })
            }
            RedisTarget::Sentinel(sentinel) => Ok(RedisConn::Sentinel(Arc::new(SentinelTarget {
                sentinel: tokio::sync::Mutex::new(sentinel_client(cfg, sentinel, certificates)?),
                current: std::sync::Mutex::new(None),
                generation: AtomicU64::new(0),
                timeout,
                db: cfg.db,
                master_addr: std::sync::Mutex::new(None),
                last_check: std::sync::Mutex::new(Instant::now()),
                checking: AtomicBool::new(false),
                moved: tokio::sync::Notify::new(),
            }))),
        }
    }

    /// A new pub/sub connection (a subscribed connection can issue no other command), to
    /// the master as of now.
    pub(crate) async fn pubsub(&self) -> RedisResult<redis::aio::PubSub> {
        match self {
            RedisConn::Direct { client, .. } => client.get_async_pubsub().await,
            RedisConn::Sentinel(target) => target.master().await?.get_async_pubsub().await,
        }
    }

    /// Resolves when the sentinels name another master (never with a single address).
    pub(crate) async fn moved(&self) {
        match self {
            RedisConn::Direct { .. } => std::future::pending().await,
            RedisConn::Sentinel(target) => target.moved.notified().await,
        }
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Direct { manager, .. } => manager.req_packed_command(cmd),
            RedisConn::Sentinel(target) => {
                let target = target.clone();
                Box::pin(async move {
                    target
                        .with_master(|mut conn| async move { conn.req_packed_command(cmd).await })
                        .await
                })
            }
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Direct { manager, .. } => {
                manager.req_packed_commands(pipeline, offset, count)
            }
            RedisConn::Sentinel(target) => {
                let target = target.clone();
                Box::pin(async move {
                    target
                        .with_master(|mut conn| async move {
                            conn.req_packed_commands(pipeline, offset, count).await
                        })
                        .await
                })
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Direct { db, .. } => *db,
            RedisConn::Sentinel(target) => target.db,
        }
    }
}

impl SentinelTarget {
    /// The master's client, as the first sentinel that answers reports it.
    async fn master(&self) -> RedisResult<Client> {
        self.sentinel.lock().await.async_get_client().await
    }

    /// The current connection to the master, resolving and connecting if there is none.
    async fn connection(self: &Arc<Self>) -> RedisResult<(u64, MultiplexedConnection)> {
        if let Some(current) = self.lock_current().clone() {
            self.recheck_in_background();
            return Ok(current);
        }
        let mut sentinel = self.sentinel.lock().await;
        // Another caller may have connected while this one waited for the lock.
        if let Some(current) = self.lock_current().clone() {
            return Ok(current);
        }
        let client = sentinel.async_get_client().await?;
        drop(sentinel);
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        *self.lock_current() = Some((generation, conn.clone()));
        self.master_is(client.get_connection_info().addr().to_string());
        Ok((generation, conn))
    }

    /// Records the master's address; a different one than before means a failover.
    fn master_is(&self, addr: String) -> bool {
        let mut known = self.master_addr.lock().unwrap_or_else(|e| e.into_inner());
        let moved = known.as_ref().is_some_and(|a| *a != addr);
        if moved {
            tracing::info!(master = %addr, "the sentinels name another Redis master; following it");
            self.moved.notify_waiters();
        }
        *known = Some(addr);
        moved
    }

    /// At most every [`MASTER_RECHECK`], asks the sentinels which node is the master,
    /// off the caller's path, and drops the connection if it is another one.
    fn recheck_in_background(self: &Arc<Self>) {
        {
            let mut last = self.last_check.lock().unwrap_or_else(|e| e.into_inner());
            if last.elapsed() < MASTER_RECHECK || self.checking.swap(true, Ordering::AcqRel) {
                return;
            }
            *last = Instant::now();
        }
        let target = self.clone();
        tokio::spawn(async move {
            let asked = tokio::time::timeout(target.timeout, target.master()).await;
            if let Ok(Ok(client)) = asked {
                let generation = target.lock_current().as_ref().map(|(g, _)| *g);
                if target.master_is(client.get_connection_info().addr().to_string())
                    && let Some(generation) = generation
                {
                    target.forget(generation);
                }
            }
            target.checking.store(false, Ordering::Release);
        });
    }

    /// Runs `op` on the master's connection; after an error that means the node is gone
    /// or no longer the master, forgets that connection and tries once more.
    async fn with_master<T, F, Fut>(self: &Arc<Self>, op: F) -> RedisResult<T>
    where
        F: Fn(MultiplexedConnection) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (generation, conn) = self.connection().await?;
            match op(conn).await {
                Err(e) if master_lost(&e) => {
                    self.forget(generation);
                    if attempt >= 2 {
                        return Err(e);
                    }
                }
                result => return result,
            }
        }
    }

    fn forget(&self, generation: u64) {
        let mut current = self.lock_current();
        if current.as_ref().is_some_and(|(g, _)| *g == generation) {
            *current = None;
        }
    }

    fn lock_current(&self) -> std::sync::MutexGuard<'_, Option<(u64, MultiplexedConnection)>> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Whether an error means the connected node is gone or is no longer the master.
fn master_lost(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_unrecoverable_error()
        || matches!(
            e.kind(),
            ErrorKind::Server(
                redis::ServerErrorKind::ReadOnly | redis::ServerErrorKind::MasterDown
            )
        )
}

/// REDIS_DB, REDIS_USERNAME and REDIS_PASSWORD applied to a connection's settings.
fn with_credentials(info: ConnectionInfo, cfg: &RedisConfig) -> ConnectionInfo {
    let mut settings = info.redis_settings().clone().set_db(cfg.db);
    if let Some(username) = &cfg.username {
        settings = settings.set_username(username);
    }
    if let Some(password) = &cfg.password {
        settings = settings.set_password(password.expose());
    }
    info.set_redis_settings(settings)
}

/// A client of the sentinels that hands out clients of the current master. The data
/// nodes get REDIS_DB, REDIS_USERNAME and REDIS_PASSWORD; the sentinels get
/// REDIS_SENTINEL_PASSWORD. REDIS_TLS (and its CA) applies to both.
fn sentinel_client(
    cfg: &RedisConfig,
    sentinel: &SentinelConfig,
    certificates: Option<TlsCertificates>,
) -> RedisResult<SentinelClient> {
    let nodes = sentinel.nodes.iter().map(|(host, port)| {
        if cfg.tls {
            ConnectionAddr::TcpTls {
                host: host.clone(),
                port: *port,
                insecure: false,
                tls_params: None,
            }
        } else {
            ConnectionAddr::Tcp(host.clone(), *port)
        }
    });
    let mut builder =
        SentinelClientBuilder::new(nodes, &sentinel.master, SentinelServerType::Master)?
            .set_client_to_redis_db(cfg.db);
    if let Some(username) = &cfg.username {
        builder = builder.set_client_to_redis_username(username);
    }
    if let Some(password) = &cfg.password {
        builder = builder.set_client_to_redis_password(password.expose());
    }
    if let Some(password) = &sentinel.password {
        builder = builder.set_client_to_sentinel_password(password.expose());
    }
    if cfg.tls {
        builder = builder
            .set_client_to_redis_tls_mode(TlsMode::Secure)
            .set_client_to_sentinel_tls_mode(TlsMode::Secure);
        if let Some(certs) = certificates {
            builder = builder
                .set_client_to_redis_certificates(certs.clone())
                .set_client_to_sentinel_certificates(certs);
        }
    }
    builder.build()
}

/// rustls needs one process-wide crypto provider; ring is the one this build enables.
/// Installing twice is harmless (the second attempt is refused and ignored).
fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
