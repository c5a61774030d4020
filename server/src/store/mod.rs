//! The store: PostgreSQL or SQLite through diesel + r2d2, the source of truth for agents,
//! commands and inventories.
//!
//! diesel is blocking, so every query runs inside [`Store::run`], which checks a connection
//! out of the pool on a `spawn_blocking` thread and returns it before the future resolves:
//! no connection is ever held across an `.await`. Queries are written once and compiled for
//! both backends by the [`with_conn!`] macro.

pub mod agents;
pub(crate) mod api_tokens;
pub mod audit;
pub mod binaries;
pub mod commands;
pub mod enroll_secrets;
pub mod inventory;
pub mod jobs;
pub mod rollouts;
pub(crate) mod schema;
mod sets;
pub(crate) mod ui_sessions;
mod writer;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::r2d2::{ConnectionManager, CustomizeConnection, Pool, PoolError};
use diesel::{PgConnection, SqliteConnection};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

use crate::config::DatabaseUrl;
use crate::redact::redact;

pub use agents::{AgentRow, Hello};
pub use api_tokens::ApiTokenRow;
pub use audit::AuditRow;
pub use commands::{CommandRow, CommandStatus};
pub use enroll_secrets::{EnrollAttempt, EnrollOutcome, EnrollRefusal, EnrollSecretRow};
pub use jobs::{JobCounts, JobDurations, JobPacing, JobRow, JobStatus};
pub use rollouts::Claim;

pub(crate) use agents::AgentFilter;
pub(crate) use api_tokens::ApiTokenFilter;
pub(crate) use audit::AuditFilter;
pub use audit::NewAuditRow;
pub(crate) use binaries::{BinaryDeletion, BinaryFilter, BinaryInsert, BinaryRow};
pub use commands::{NewCommand, ResultOutcome};
pub(crate) use jobs::{
    AgentPredicate, AgentSelection, CanarySize, JobCreation, JobRecord, JobResultRow,
    JobTransition, Pace,
};
pub(crate) use rollouts::{
    CurrentRollout, FailureRecord, RolloutBrake, RolloutRow, RolloutStart, RolloutStatus,
    RolloutTransition, UpdateFailure,
};

const POSTGRES_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");
const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");

/// Key of the PostgreSQL advisory lock held while migrating, so that replicas starting
/// together do not race on the schema.
const MIGRATION_LOCK_KEY: i64 = 0x6167_656e_7473_7276; // "agentsrv"

/// Why a store call failed. Only `Unavailable` is the database being away (HTTP 503,
/// `store_unavailable` to an agent); the others are faults (500) whose message, already
/// redacted of credentials, belongs in the log.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The pool had no connection within [`POOL_TIMEOUT`] (the database is down or
    /// saturated); r2d2's message.
    #[error("no database connection available: {0}")]
    Unavailable(String),
    /// The database refused or failed a query (a constraint, a lost connection mid-query).
    #[error("database query failed: {0}")]
    Query(#[from] diesel::result::Error),
    /// A migration of `migrations/{postgres,sqlite}` failed at start-up.
    #[error("database migration failed: {0}")]
    Migration(String),
    /// The pool could not be built: an unusable URL or an unreachable file path.
    #[error("could not open the database: {0}")]
    Open(String),
    /// The `spawn_blocking` task running the query panicked or was cancelled at shutdown.
    #[error("database task panicked or was cancelled")]
    Task,
}

impl From<PoolError> for StoreError {
    fn from(e: PoolError) -> Self {
        StoreError::Unavailable(e.to_string())
    }
}

pub(crate) enum DbPool {
    Postgres(Pool<ConnectionManager<PgConnection>>),
    Sqlite(Pool<ConnectionManager<SqliteConnection>>),
}

/// Runs `$body` with `$conn` bound to a `&mut` connection of whichever backend the pool
/// holds. The body is compiled once per backend, so it must be backend-generic diesel.
macro_rules! with_conn {
    ($pool:expr, $conn:ident => $body:expr) => {
        match $pool {
            $crate::store::DbPool::Postgres(pool) => {
                let mut guard = pool.get()?;
                let $conn = &mut *guard;
                $body
            }
            $crate::store::DbPool::Sqlite(pool) => {
                let mut guard = pool.get()?;
                let $conn = &mut *guard;
                $body
            }
        }
    };
}
pub(crate) use with_conn;

/// A transaction for work that reads before it writes. On SQLite a deferred transaction
/// that reads first holds a snapshot it cannot upgrade once another connection has
/// committed a write (SQLITE_BUSY at once, which busy_timeout does not wait out), so there
/// it begins IMMEDIATE and takes the write lock first; PostgreSQL needs nothing special.
pub(crate) trait WriteTransaction: Sized {
    fn write_transaction<T, E, F>(&mut self, f: F) -> Result<T, E>
    where
        F: FnOnce(&mut Self) -> Result<T, E>,
        E: From<diesel::result::Error>;
}

impl WriteTransaction for PgConnection {
    fn write_transaction<T, E, F>(&mut self, f: F) -> Result<T, E>
    where
        F: FnOnce(&mut Self) -> Result<T, E>,
        E: From<diesel::result::Error>,
    {
        diesel::Connection::transaction(self, f)
    }
}

impl WriteTransaction for SqliteConnection {
    fn write_transaction<T, E, F>(&mut self, f: F) -> Result<T, E>
    where
        F: FnOnce(&mut Self) -> Result<T, E>,
        E: From<diesel::result::Error>,
    {
        self.immediate_transaction(f)
    }
}

/// Cheap-to-clone handle on the connection pool.
#[derive(Clone)]
pub struct Store {
    pool: Arc<DbPool>,
    /// Committed changes, announced in-process for live views (the UI's event stream),
    /// and in cluster mode forwarded to and from the other replicas.
    changes: tokio::sync::broadcast::Sender<Announcement>,
    /// The group-commit writer (`writer.rs`): session writes and queued commands, many
    /// per transaction.
    writer: std::sync::mpsc::Sender<writer::Job>,
}

/// A change the store has committed, announced after the write so that live views can
/// refresh. It carries ids only: whoever listens reads the data from the store, so a
/// missed announcement costs freshness, never correctness.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Change {
    /// An agent connected, disconnected, said hello, was enrolled or deleted.
    Agent {
        /// The agent's `client_id`.
        id: String,
    },
    /// Several agents at once (marked offline after their pod stopped refreshing them).
    Agents,
    /// A command was queued or got its result.
    Command {
        /// The command's id (a UUIDv7).
        id: String,
        /// The `client_id` of the agent it is for.
        agent_id: String,
    },
    /// Several commands at once (delivered, expired).
    Commands,
    /// A binary was uploaded or deleted.
    Binaries,
    /// A rollout was started, cancelled or moved on (an agent updated or failed).
    Rollouts,
    /// A fleet job was created, paused (by the brake or an operator), resumed, cancelled
    /// or completed. Its commands' progress is announced as `Commands`/`Command`.
    Job {
        /// The job's id.
        id: String,
    },
    /// Any job may have changed (a replica's burst of changes, forwarded as one).
    Jobs,
}

/// A change and where it was committed: replicas forward only their own.
#[derive(Clone, Debug)]
pub struct Announcement {
    /// What changed.
    pub change: Change,
    /// Committed on another replica and received over the cluster bus.
    pub(crate) remote: bool,
}

/// Announcements buffered per listener; one that falls further behind is told to resync.
const CHANGE_BUFFER: usize = 1024;

/// The longest wait for a pooled connection. When the database is down, every query
/// waits this long before failing (as `StoreError::Unavailable`: a 503, or a
/// `store_unavailable` message to an agent), so it bounds how late an outage is reported;
/// a healthy pool hands out connections in microseconds.
pub(crate) const POOL_TIMEOUT: Duration = Duration::from_secs(2);

/// SQLite pragmas applied to every pooled connection: WAL lets readers run beside the
/// writer, busy_timeout turns lock contention into a short wait instead of an error, and
/// foreign keys make `ON DELETE CASCADE` work.
#[derive(Debug)]
struct SqlitePragmas;

impl CustomizeConnection<SqliteConnection, diesel::r2d2::Error> for SqlitePragmas {
    fn on_acquire(&self, conn: &mut SqliteConnection) -> Result<(), diesel::r2d2::Error> {
        conn.batch_execute(
            "PRAGMA busy_timeout = 5000; PRAGMA journal_mode = WAL; \
             PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;",
        )
        .map_err(diesel::r2d2::Error::QueryError)
    }
}

impl Store {
    /// Opens the pool and runs pending migrations. Blocking: call before serving.
    ///
    /// A PostgreSQL URL may leave out the password and TLS files: libpq takes them from
    /// PGPASSWORD, PGSSLROOTCERT, PGSSLCERT and PGSSLKEY (and the other `PG*` variables),
    /// which the server passes through untouched. libpq quotes parts of a URL it cannot
    /// parse, so the open error is redacted before anyone can print it.
    pub fn open(url: &DatabaseUrl, pool_size: u32) -> Result<Self, StoreError> {
        let timeout = POOL_TIMEOUT;
        let pool = match url {
            DatabaseUrl::Postgres(url) => {
                let pool = Pool::builder()
                    .max_size(pool_size)
                    .min_idle(Some(1))
                    .connection_timeout(timeout)
                    .build(ConnectionManager::<PgConnection>::new(url.expose()))
                    .map_err(|e| StoreError::Open(redact(&e.to_string()).into_owned()))?;
                DbPool::Postgres(pool)
            }
            DatabaseUrl::Sqlite(path) => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(|e| {
                        StoreError::Open(format!("cannot create {}: {e}", dir.display()))
                    })?;
                }
                let pool = Pool::builder()
                    .max_size(pool_size.min(8))
                    .min_idle(Some(1))
                    .connection_timeout(timeout)
                    .connection_customizer(Box::new(SqlitePragmas))
                    .build(ConnectionManager::<SqliteConnection>::new(sqlite_url(path)))
                    .map_err(|e| StoreError::Open(e.to_string()))?;
                DbPool::Sqlite(pool)
            }
        };
        let pool = Arc::new(pool);
        let store = Store {
            writer: writer::spawn(pool.clone()),
            pool,
            changes: tokio::sync::broadcast::channel(CHANGE_BUFFER).0,
        };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&self) -> Result<(), StoreError> {
        let migration_error =
            |e: Box<dyn std::error::Error + Send + Sync>| StoreError::Migration(e.to_string());
        match &*self.pool {
            DbPool::Postgres(pool) => {
                let mut conn = pool.get()?;
                conn.batch_execute(&format!("SELECT pg_advisory_lock({MIGRATION_LOCK_KEY})"))?;
                let result = conn
                    .run_pending_migrations(POSTGRES_MIGRATIONS)
                    .map(|_| ())
                    .map_err(migration_error);
                conn.batch_execute(&format!("SELECT pg_advisory_unlock({MIGRATION_LOCK_KEY})"))?;
                result
            }
            DbPool::Sqlite(pool) => {
                let mut conn = pool.get()?;
                conn.run_pending_migrations(SQLITE_MIGRATIONS)
                    .map(|_| ())
                    .map_err(migration_error)
            }
        }
    }

    /// Runs blocking diesel work on the blocking pool.
    pub(crate) async fn run<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&DbPool) -> Result<T, StoreError> + Send + 'static,
    {
        let pool = self.pool.clone();
        tokio::task::spawn_blocking(move || f(&pool))
            .await
            .map_err(|_| StoreError::Task)?
    }

    /// Applies `write` through the group-commit writer; resolves once the transaction
    /// holding it has committed (or failed).
    async fn write(&self, write: writer::Write) -> Result<writer::Outcome, StoreError> {
        let (reply, outcome) = tokio::sync::oneshot::channel();
        self.writer
            .send(writer::Job { write, reply })
            .map_err(|_| StoreError::Task)?;
        outcome.await.map_err(|_| StoreError::Task)?
    }

    /// Listens to committed changes from now on.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Announcement> {
        self.changes.subscribe()
    }

    /// Tells listeners about a committed change; free when nobody listens.
    pub(crate) fn announce(&self, change: impl FnOnce() -> Change) {
        if self.changes.receiver_count() > 0 {
            let _ = self.changes.send(Announcement {
                change: change(),
                remote: false,
            });
        }
    }

    /// Re-announces a change another replica committed (cluster mode).
    pub(crate) fn announce_remote(&self, change: Change) {
        if self.changes.receiver_count() > 0 {
            let _ = self.changes.send(Announcement {
                change,
                remote: true,
            });
        }
    }

    /// Round trip used by readiness.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.run(
            |pool| with_conn!(pool, c => c.batch_execute("SELECT 1").map_err(StoreError::from)),
        )
        .await
    }

    /// `"postgres"` or `"sqlite"`, for the start-up log and `/health/ready`.
    pub fn backend_name(&self) -> &'static str {
        match &*self.pool {
            DbPool::Postgres(_) => "postgres",
            DbPool::Sqlite(_) => "sqlite",
        }
    }
}

fn sqlite_url(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// Milliseconds since the Unix epoch: the unit of every timestamp column.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    /// The store's sources, each checked for transactions that begin another way.
    const SOURCES: [(&str, &str); 14] = [
        ("mod.rs", include_str!("mod.rs")),
        ("agents.rs", include_str!("agents.rs")),
        ("api_tokens.rs", include_str!("api_tokens.rs")),
        ("audit.rs", include_str!("audit.rs")),
        ("binaries.rs", include_str!("binaries.rs")),
        ("commands.rs", include_str!("commands.rs")),
        ("enroll_secrets.rs", include_str!("enroll_secrets.rs")),
        ("inventory.rs", include_str!("inventory.rs")),
        ("jobs.rs", include_str!("jobs.rs")),
        ("rollouts.rs", include_str!("rollouts.rs")),
        ("schema.rs", include_str!("schema.rs")),
        ("sets.rs", include_str!("sets.rs")),
        ("ui_sessions.rs", include_str!("ui_sessions.rs")),
        ("writer.rs", include_str!("writer.rs")),
    ];

    /// A deferred SQLite transaction that reads and then writes fails with SQLITE_BUSY
    /// when another connection committed in between; [`super::WriteTransaction`] begins
    /// IMMEDIATE there. Every transaction of the store begins through it (the
    /// concurrent case is tested in `tests/it/store.rs`).
    #[test]
    fn every_store_transaction_begins_as_a_write_transaction() {
        let deferred = [
            format!(".{}(", "transaction"),
            format!(".{}::<", "transaction"),
            format!("{}(", "build_transaction"),
        ];
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/store");
        let mut files: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.ends_with(".rs"))
            .collect();
        files.sort();
        let mut listed: Vec<&str> = SOURCES.iter().map(|(file, _)| *file).collect();
        listed.sort();
        assert_eq!(files, listed, "SOURCES must list every file of store/");
        for (file, source) in SOURCES {
            for needle in &deferred {
                assert!(
                    !source.contains(needle.as_str()),
                    "store/{file} begins a transaction with `{needle}`: use write_transaction"
                );
            }
        }
    }
}
