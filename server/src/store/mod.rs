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
mod batch;
pub mod binaries;
pub mod commands;
pub mod enroll_secrets;
pub mod inventory;
pub mod jobs;
mod liveness;
mod reader;
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
use diesel::{Connection, PgConnection, SqliteConnection};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

use crate::config::DatabaseUrl;
use crate::redact::redact;

pub use agents::{AgentRow, Hello};
pub use api_tokens::ApiTokenRow;
pub use audit::AuditRow;
pub use commands::{CommandRow, CommandStatus};
pub use enroll_secrets::{EnrollAttempt, EnrollOutcome, EnrollRefusal, EnrollSecretRow};
pub use jobs::{JobCounts, JobDurations, JobPacing, JobRow, JobStatus};
pub use liveness::DEFAULT_OUTAGE_TIMEOUT;
use liveness::Liveness;
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

/// Why a store call failed. `Unavailable`, `ConnectionLost`, `TimedOut` and `NoAnswer` are
/// the database being away or too slow ([`StoreError::is_unavailable`]: HTTP 503,
/// `store_unavailable` to an agent); the others are faults (500) whose message, already
/// redacted of credentials, belongs in the log.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The pool had no connection within [`POOL_TIMEOUT`] (the database is down or
    /// saturated); r2d2's message.
    #[error("no database connection available: {0}")]
    Unavailable(String),
    /// The connection broke during the call: the server restarted, or the network
    /// between us dropped it (libpq's TCP user timeout and keepalives notice a cut link).
    #[error("the database connection was lost: {0}")]
    ConnectionLost(#[source] diesel::result::Error),
    /// The database cancelled a statement that ran past DATABASE_STATEMENT_TIMEOUT
    /// (PostgreSQL's `statement_timeout`), or SQLite stayed locked that long.
    #[error("the database cancelled a statement after DATABASE_STATEMENT_TIMEOUT: {0}")]
    TimedOut(#[source] diesel::result::Error),
    /// Nothing came back within the bound: the call may still complete later, so its
    /// effect is unknown (callers retry; every write the server retries is idempotent
    /// or deduplicated by id).
    #[error("no answer from the database within {}", crate::config::human(*.0))]
    NoAnswer(Duration),
    /// The database did not answer a probe (`SELECT 1` on a connection of its own) within
    /// DATABASE_OUTAGE_TIMEOUT, the bound given, or has not answered one since: it is
    /// stopped, hung or cut off (`liveness.rs`). The call's effect is unknown, as with
    /// `NoAnswer`.
    #[error("the database does not answer (no reply to a probe within {})", crate::config::human(*.0))]
    NotResponding(Duration),
    /// The database refused or failed a query (a constraint, a foreign key raced by a
    /// delete): a fault, not an outage.
    #[error("database query failed: {0}")]
    Query(#[source] diesel::result::Error),
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

impl From<diesel::result::Error> for StoreError {
    /// Sorts out the failures that mean "the database is not reachable now" (503, or
    /// `store_unavailable` to an agent) from the ones that are faults (500).
    fn from(e: diesel::result::Error) -> Self {
        use diesel::result::{DatabaseErrorKind as Kind, Error};
        match &e {
            Error::DatabaseError(Kind::ClosedConnection | Kind::UnableToSendCommand, _) => {
                StoreError::ConnectionLost(e)
            }
            Error::DatabaseError(_, info) if is_timeout(info.message()) => StoreError::TimedOut(e),
            _ => StoreError::Query(e),
        }
    }
}

/// Whether a database error is a cancellation by a timeout: PostgreSQL's
/// `statement_timeout` and `lock_timeout` (SQLSTATE 57014 and 55P03, which diesel does not
/// expose, so the server's messages are matched), or SQLite still busy after
/// `busy_timeout`.
fn is_timeout(message: &str) -> bool {
    message.contains("canceling statement due to statement timeout")
        || message.contains("canceling statement due to lock timeout")
        || message.contains("database is locked")
        || message.contains("database table is locked")
}

impl StoreError {
    /// Whether the database could not be reached or did not answer in time, as opposed
    /// to a fault: retrying later may succeed.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            StoreError::Unavailable(_)
                | StoreError::ConnectionLost(_)
                | StoreError::TimedOut(_)
                | StoreError::NoAnswer(_)
                | StoreError::NotResponding(_)
        )
    }

    /// For a client, why the database is unavailable, in words that leak nothing of its
    /// address or credentials.
    pub fn outage(&self) -> String {
        match self {
            StoreError::Unavailable(_) => format!(
                "no database connection within {}",
                crate::config::human(POOL_TIMEOUT)
            ),
            StoreError::ConnectionLost(_) => "the connection to the database was lost".into(),
            StoreError::TimedOut(_) => {
                "the database cancelled a statement after DATABASE_STATEMENT_TIMEOUT".into()
            }
            StoreError::NoAnswer(bound) => format!(
                "no answer from the database within {} (DATABASE_STATEMENT_TIMEOUT plus {})",
                crate::config::human(*bound),
                crate::config::human(ANSWER_MARGIN)
            ),
            StoreError::NotResponding(bound) => format!(
                "the database does not answer (no reply within {}, DATABASE_OUTAGE_TIMEOUT)",
                crate::config::human(*bound)
            ),
            _ => "the database failed".into(),
        }
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
    /// The group-commit writers (`writer.rs`): session writes and queued commands, many
    /// per transaction, on connections of the same pool (so with the same statement
    /// timeout and network settings).
    writer: writer::Writers,
    /// The group readers (`reader.rs`): the first page of commands to send, for many
    /// sessions per statement, on their own threads (never behind the writers' commits).
    reader: reader::Readers,
    /// How long [`Store::run`] waits for a call: DATABASE_STATEMENT_TIMEOUT plus
    /// [`ANSWER_MARGIN`].
    answer_within: Duration,
    /// Whether the database answers at all: a stopped, hung or cut-off one fails calls
    /// within DATABASE_OUTAGE_TIMEOUT instead of `answer_within` (`liveness.rs`).
    liveness: Liveness,
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

/// How much longer than DATABASE_STATEMENT_TIMEOUT the server waits for a call before
/// giving up on it: enough for the database's own cancellation to come back first, so
/// that the answer names the cause when the database can still give one.
pub(crate) const ANSWER_MARGIN: Duration = Duration::from_secs(1);

/// libpq connection parameters that make a cut network visible as an error on an
/// established connection instead of a wait of many minutes (TCP retransmissions), each
/// added unless DATABASE_URL sets it: unacknowledged data or keepalive probes for 10 s
/// end the connection (`tcp_user_timeout`, Linux), idle connections are probed after 5 s,
/// and connecting gives up after 5 s.
const PG_NETWORK_PARAMETERS: [(&str, &str); 6] = [
    ("connect_timeout", "5"),
    ("keepalives", "1"),
    ("keepalives_idle", "5"),
    ("keepalives_interval", "2"),
    ("keepalives_count", "3"),
    ("tcp_user_timeout", "10000"),
];

/// How the pool is sized and bounded.
#[derive(Clone, Copy, Debug)]
pub struct PoolSettings {
    /// Connections per process (DATABASE_POOL_SIZE); SQLite uses at most 8.
    pub size: u32,
    /// DATABASE_STATEMENT_TIMEOUT.
    pub statement_timeout: Duration,
    /// DATABASE_OUTAGE_TIMEOUT: how soon a database that answers nothing is reported.
    pub outage_timeout: Duration,
}

impl PoolSettings {
    /// `size` connections and the default statement timeout.
    pub fn sized(size: u32) -> Self {
        PoolSettings {
            size,
            statement_timeout: crate::config::DEFAULT_STATEMENT_TIMEOUT,
            outage_timeout: DEFAULT_OUTAGE_TIMEOUT,
        }
    }
}

/// SQLite pragmas applied to every pooled connection: WAL lets readers run beside the
/// writer, busy_timeout (DATABASE_STATEMENT_TIMEOUT) turns lock contention into a bounded
/// wait instead of an error, and foreign keys make `ON DELETE CASCADE` work.
#[derive(Debug)]
struct SqlitePragmas {
    busy_timeout: Duration,
}

impl CustomizeConnection<SqliteConnection, diesel::r2d2::Error> for SqlitePragmas {
    fn on_acquire(&self, conn: &mut SqliteConnection) -> Result<(), diesel::r2d2::Error> {
        conn.batch_execute(&format!(
            "PRAGMA busy_timeout = {}; PRAGMA journal_mode = WAL; \
             PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;",
            self.busy_timeout.as_millis()
        ))
        .map_err(diesel::r2d2::Error::QueryError)
    }
}

/// PostgreSQL's `statement_timeout` (DATABASE_STATEMENT_TIMEOUT) on every pooled
/// connection: a statement that hangs on a live server (a lock held elsewhere, a runaway
/// plan) is cancelled by the server, and its connection stays usable.
#[derive(Debug)]
struct PgSession {
    statement_timeout: Duration,
}

impl CustomizeConnection<PgConnection, diesel::r2d2::Error> for PgSession {
    fn on_acquire(&self, conn: &mut PgConnection) -> Result<(), diesel::r2d2::Error> {
        conn.batch_execute(&format!(
            "SET statement_timeout = {}",
            self.statement_timeout.as_millis()
        ))
        .map_err(diesel::r2d2::Error::QueryError)
    }
}

/// `url` with [`PG_NETWORK_PARAMETERS`] added where it does not set them already. The
/// query starts at the first `?` after the userinfo: an unescaped password may hold one.
fn with_network_parameters(url: &str) -> String {
    let after_userinfo = url.rfind('@').map_or(0, |at| at + 1);
    let query_start = url[after_userinfo..].find('?').map(|q| after_userinfo + q);
    let given: Vec<&str> = query_start
        .map_or("", |q| &url[q + 1..])
        .split('&')
        .filter_map(|pair| pair.split('=').next())
        .collect();
    let mut out = url.to_string();
    let mut separator = if query_start.is_some() { '&' } else { '?' };
    for (key, value) in PG_NETWORK_PARAMETERS {
        if !given.contains(&key) {
            out.push(separator);
            out.push_str(key);
            out.push('=');
            out.push_str(value);
            separator = '&';
        }
    }
    out
}

impl Store {
    /// Opens the pool and runs pending migrations. Blocking: call before serving.
    ///
    /// A PostgreSQL URL may leave out the password and TLS files: libpq takes them from
    /// PGPASSWORD, PGSSLROOTCERT, PGSSLCERT and PGSSLKEY (and the other `PG*` variables),
    /// which the server passes through untouched. libpq quotes parts of a URL it cannot
    /// parse, so the open error is redacted before anyone can print it.
    pub fn open(url: &DatabaseUrl, settings: PoolSettings) -> Result<Self, StoreError> {
        let timeout = POOL_TIMEOUT;
        let mut probed = None;
        let pool = match url {
            DatabaseUrl::Postgres(url) => {
                let url = with_network_parameters(url.expose());
                probed = Some(url.clone());
                // Migrations may run longer than any request: their own connection,
                // without the statement timeout, closed once they are done.
                migrate_postgres(&url)?;
                let pool = Pool::builder()
                    .max_size(settings.size)
                    .min_idle(Some(1))
                    .connection_timeout(timeout)
                    .connection_customizer(Box::new(PgSession {
                        statement_timeout: settings.statement_timeout,
                    }))
                    .build(ConnectionManager::<PgConnection>::new(url))
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
                    .max_size(settings.size.min(8))
                    .min_idle(Some(1))
                    .connection_timeout(timeout)
                    .connection_customizer(Box::new(SqlitePragmas {
                        busy_timeout: settings.statement_timeout,
                    }))
                    .build(ConnectionManager::<SqliteConnection>::new(sqlite_url(path)))
                    .map_err(|e| StoreError::Open(e.to_string()))?;
                let mut conn = pool.get()?;
                conn.run_pending_migrations(SQLITE_MIGRATIONS)
                    .map_err(|e| StoreError::Migration(e.to_string()))?;
                drop(conn);
                DbPool::Sqlite(pool)
            }
        };
        let pool = Arc::new(pool);
        Ok(Store {
            writer: writer::spawn(pool.clone()),
            reader: reader::spawn(pool.clone()),
            pool,
            changes: tokio::sync::broadcast::channel(CHANGE_BUFFER).0,
            answer_within: settings.statement_timeout + ANSWER_MARGIN,
            liveness: Liveness::new(probed, settings.outage_timeout),
        })
    }

    /// Runs blocking diesel work on the blocking pool, waiting at most
    /// DATABASE_STATEMENT_TIMEOUT plus [`ANSWER_MARGIN`] for it, and failing within
    /// DATABASE_OUTAGE_TIMEOUT when the database answers nothing at all (`liveness.rs`).
    /// A call stuck on a hung database or a cut network returns then, and its thread
    /// finishes (or fails) on its own once the database answers or libpq's TCP timeouts
    /// end the connection.
    pub(crate) async fn run<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&DbPool) -> Result<T, StoreError> + Send + 'static,
    {
        self.liveness.refuse()?;
        let pool = self.pool.clone();
        let work = tokio::task::spawn_blocking(move || f(&pool));
        let work = async { work.await.map_err(|_| StoreError::Task)? };
        self.liveness.wait(work, self.answer_within).await
    }

    /// Applies `write` through the group-commit writer; resolves once the transaction
    /// holding it has committed (or failed), or with `StoreError::NoAnswer` or
    /// `StoreError::NotResponding` after the same bounds as [`Store::run`] (the write may
    /// still be applied later: every write the writer takes is idempotent or checked by
    /// epoch or id).
    async fn write(&self, write: writer::Write) -> Result<writer::Outcome, StoreError> {
        let (reply, outcome) = tokio::sync::oneshot::channel();
        self.queued(&self.writer, writer::Job { write, reply }, outcome)
            .await
    }

    /// The oldest `limit` commands `agent_id` may send now, read by the group readers
    /// together with other sessions' reads; bounded as [`Store::run`] is.
    async fn read_sendable(
        &self,
        agent_id: String,
        include_delivered: bool,
        limit: i64,
        now: i64,
    ) -> Result<Vec<CommandRow>, StoreError> {
        let (reply, page) = tokio::sync::oneshot::channel();
        let read = reader::Read {
            agent_id,
            include_delivered,
            limit,
            now,
            reply,
        };
        self.queued(&self.reader, read, page).await
    }

    /// Queues `job` on `queue` and waits for its `answer`, within the same bounds as
    /// [`Store::run`] (`StoreError::NoAnswer` or `StoreError::NotResponding`).
    async fn queued<J: Send + 'static, T>(
        &self,
        queue: &batch::Queue<J>,
        job: J,
        answer: tokio::sync::oneshot::Receiver<Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        self.liveness.refuse()?;
        if !queue.send(job) {
            return Err(StoreError::Task);
        }
        let answer = async { answer.await.map_err(|_| StoreError::Task)? };
        self.liveness.wait(answer, self.answer_within).await
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

    /// Waits until no pooled connection is in use and the group-commit writers and the
    /// group readers have answered everything queued, or until `deadline`; returns
    /// whether both happened.
    /// The drain calls this last, so that what was accepted is stored before the process
    /// exits. A connection r2d2 is still opening on one of its threads is not counted by
    /// the pool; the process therefore leaves without exit handlers (`main.rs`).
    pub async fn settle(&self, deadline: tokio::time::Instant) -> bool {
        loop {
            let state = match &*self.pool {
                DbPool::Postgres(pool) => pool.state(),
                DbPool::Sqlite(pool) => pool.state(),
            };
            if state.connections == state.idle_connections
                && self.writer.idle()
                && self.reader.idle()
            {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
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

/// Runs pending PostgreSQL migrations on a connection of their own, under an advisory
/// lock so that replicas starting together do not race on the schema.
fn migrate_postgres(url: &str) -> Result<(), StoreError> {
    let mut conn = PgConnection::establish(url)
        .map_err(|e| StoreError::Open(redact(&e.to_string()).into_owned()))?;
    conn.batch_execute(&format!("SELECT pg_advisory_lock({MIGRATION_LOCK_KEY})"))?;
    let result = conn
        .run_pending_migrations(POSTGRES_MIGRATIONS)
        .map(|_| ())
        .map_err(|e| StoreError::Migration(e.to_string()));
    conn.batch_execute(&format!("SELECT pg_advisory_unlock({MIGRATION_LOCK_KEY})"))?;
    result
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
    use super::*;

    #[test]
    fn network_parameters_are_added_unless_the_url_sets_them() {
        assert_eq!(
            with_network_parameters("postgres://db/x"),
            "postgres://db/x?connect_timeout=5&keepalives=1&keepalives_idle=5\
             &keepalives_interval=2&keepalives_count=3&tcp_user_timeout=10000"
        );
        let url = with_network_parameters(
            "postgres://u:p?ss@db/x?sslmode=require&tcp_user_timeout=30000&keepalives_idle=60",
        );
        assert_eq!(
            url,
            "postgres://u:p?ss@db/x?sslmode=require&tcp_user_timeout=30000&keepalives_idle=60\
             &connect_timeout=5&keepalives=1&keepalives_interval=2&keepalives_count=3"
        );
    }

    #[test]
    fn timeouts_and_lost_connections_are_unavailability_not_faults() {
        use diesel::result::{DatabaseErrorKind, Error};
        let lost = Error::DatabaseError(
            DatabaseErrorKind::ClosedConnection,
            Box::new("server closed the connection unexpectedly".to_string()),
        );
        assert!(StoreError::from(lost).is_unavailable());
        let cancelled = Error::DatabaseError(
            DatabaseErrorKind::Unknown,
            Box::new("canceling statement due to statement timeout".to_string()),
        );
        assert!(matches!(
            StoreError::from(cancelled),
            StoreError::TimedOut(_)
        ));
        let busy = Error::DatabaseError(
            DatabaseErrorKind::Unknown,
            Box::new("database is locked".to_string()),
        );
        assert!(StoreError::from(busy).is_unavailable());
        assert!(!StoreError::from(Error::NotFound).is_unavailable());
    }

    /// The store's sources, each checked for transactions that begin another way.
    const SOURCES: [(&str, &str); 17] = [
        ("mod.rs", include_str!("mod.rs")),
        ("agents.rs", include_str!("agents.rs")),
        ("api_tokens.rs", include_str!("api_tokens.rs")),
        ("audit.rs", include_str!("audit.rs")),
        ("batch.rs", include_str!("batch.rs")),
        ("binaries.rs", include_str!("binaries.rs")),
        ("commands.rs", include_str!("commands.rs")),
        ("enroll_secrets.rs", include_str!("enroll_secrets.rs")),
        ("inventory.rs", include_str!("inventory.rs")),
        ("jobs.rs", include_str!("jobs.rs")),
        ("liveness.rs", include_str!("liveness.rs")),
        ("reader.rs", include_str!("reader.rs")),
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
