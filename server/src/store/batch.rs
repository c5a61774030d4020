//! Threads that take queued work in batches: the group-commit writers (`writer.rs`) and
//! the group readers (`reader.rs`).
//!
//! A thread takes the first job to arrive, then whatever else is queued (at most a
//! bound, and no waiting when the queue is empty, so an idle replica adds no latency),
//! and hands the batch to its apply function, which answers every job. One thread
//! collects at a time; the others apply their batches meanwhile.
//!
//! A thread keeps its pooled connection (its [`Lease`]) from one batch to the next while
//! batches keep coming, and gives it back after [`KEEP_IDLE`] without one, after any
//! failure, and whenever the pool has no connection left to hand out. The pool checks a
//! connection with `SELECT 1` when it hands it out; a busy thread therefore pays that
//! round trip (a transaction of its own, in PostgreSQL's counts) once per busy spell
//! instead of once per batch, and a connection that sat idle, or failed, is checked
//! again before it is used.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use diesel::r2d2::{ConnectionManager, PooledConnection};
use diesel::{PgConnection, SqliteConnection};
use parking_lot::Mutex;

use super::{DbPool, StoreError};

/// How long a thread keeps its connection with no batch to apply.
const KEEP_IDLE: Duration = Duration::from_millis(100);

/// The way to a group of threads, and how many jobs they have yet to answer.
pub(crate) struct Queue<J> {
    /// Where jobs are queued.
    jobs: mpsc::Sender<J>,
    /// Jobs queued and not yet answered: `Store::settle` waits for none (a thread in the
    /// middle of a batch may be inside libpq and OpenSSL).
    in_flight: Arc<AtomicUsize>,
}

impl<J> Clone for Queue<J> {
    fn clone(&self) -> Self {
        Queue {
            jobs: self.jobs.clone(),
            in_flight: self.in_flight.clone(),
        }
    }
}

/// How a group of threads takes and applies its batches.
pub(crate) struct Plan<J> {
    /// Thread names are `{name}-{n}`.
    pub(crate) name: &'static str,
    /// Threads on PostgreSQL, where one applies a batch while another waits for a round
    /// trip or a commit. SQLite takes one writer at a time, so it gets one thread.
    pub(crate) postgres_threads: usize,
    /// Most jobs in one batch.
    pub(crate) max_batch: usize,
    /// Puts a batch in the order it is applied in.
    pub(crate) order: fn(&mut [J]),
    /// Applies a batch on the lease's connection and answers each of its jobs; releases
    /// the lease after a failure.
    pub(crate) apply: fn(&mut Lease<'_>, Vec<J>),
}

/// A connection a store thread holds between batches, checked out of the pool when first
/// needed.
pub(crate) struct Lease<'a> {
    pool: &'a DbPool,
    held: Option<Held>,
}

/// A checked-out connection of either backend.
pub(crate) enum Held {
    Postgres(PooledConnection<ConnectionManager<PgConnection>>),
    Sqlite(PooledConnection<ConnectionManager<SqliteConnection>>),
}

impl<'a> Lease<'a> {
    fn new(pool: &'a DbPool) -> Self {
        Lease { pool, held: None }
    }

    /// The held connection, checked out (and checked by the pool) if none is held.
    pub(crate) fn conn(&mut self) -> Result<&mut Held, StoreError> {
        if self.held.is_none() {
            self.held = Some(match self.pool {
                DbPool::Postgres(pool) => Held::Postgres(pool.get()?),
                DbPool::Sqlite(pool) => Held::Sqlite(pool.get()?),
            });
        }
        Ok(self.held.as_mut().expect("checked out above"))
    }

    /// Gives the connection back: the pool drops it if it is broken, and checks the
    /// next one it hands out.
    fn release(&mut self) {
        self.held = None;
    }

    /// `result` of work on this lease's connection, releasing the connection when the
    /// work failed, whatever the failure: the next work starts on a checked one.
    pub(crate) fn checked<T>(&mut self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        if result.is_err() {
            self.release();
        }
        result
    }

    /// Gives the connection back when the pool has none left to hand out, so that a
    /// small pool (DATABASE_POOL_SIZE below the store's threads plus the API's needs)
    /// serves everyone in turn, as before threads kept theirs.
    fn release_if_pool_is_short(&mut self) {
        let (state, max) = match self.pool {
            DbPool::Postgres(pool) => (pool.state(), pool.max_size()),
            DbPool::Sqlite(pool) => (pool.state(), pool.max_size()),
        };
        if state.idle_connections == 0 && state.connections >= max {
            self.release();
        }
    }
}

/// Runs `$body` (a `Result<_, StoreError>`) with `$conn` bound to the `&mut` connection
/// of the lease `$lease` (checked out if none is held), of whichever backend, as
/// `with_conn!`; a failed body releases the connection ([`Lease::checked`]).
macro_rules! with_lease {
    ($lease:expr, $conn:ident => $body:expr) => {{
        let result = match $lease.conn()? {
            $crate::store::batch::Held::Postgres(guard) => {
                let $conn = &mut **guard;
                $body
            }
            $crate::store::batch::Held::Sqlite(guard) => {
                let $conn = &mut **guard;
                $body
            }
        };
        $lease.checked(result)
    }};
}
pub(crate) use with_lease;

impl<J: Send + 'static> Queue<J> {
    /// Starts the threads of `plan`. They stop when every sender is gone (the last
    /// `Store` dropped), after the batch each is applying.
    pub(crate) fn spawn(pool: Arc<DbPool>, plan: Plan<J>) -> Self {
        let in_flight = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::channel::<J>();
        let rx = Arc::new(Mutex::new(rx));
        let threads = match &*pool {
            DbPool::Postgres(_) => plan.postgres_threads,
            DbPool::Sqlite(_) => 1,
        };
        for n in 0..threads {
            let (pool, rx, in_flight) = (pool.clone(), rx.clone(), in_flight.clone());
            let (max_batch, order, apply) = (plan.max_batch, plan.order, plan.apply);
            let spawned = std::thread::Builder::new()
                .name(format!("{}-{n}", plan.name))
                .spawn(move || {
                    let mut lease = Lease::new(&pool);
                    loop {
                        match next_batch(&rx, max_batch, lease.held.is_some()) {
                            Next::Batch(mut batch) => {
                                let len = batch.len();
                                order(&mut batch);
                                apply(&mut lease, batch);
                                lease.release_if_pool_is_short();
                                in_flight.fetch_sub(len, Ordering::SeqCst);
                            }
                            Next::Idle => lease.release(),
                            Next::Closed => break,
                        }
                    }
                });
            if let Err(e) = spawned {
                // Without any thread every job fails as a task error; say why.
                tracing::error!(error = %e, thread = plan.name, "could not start a store thread");
            }
        }
        Queue {
            jobs: tx,
            in_flight,
        }
    }

    /// Queues `job`; false if no thread is left to take it.
    pub(crate) fn send(&self, job: J) -> bool {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        if self.jobs.send(job).is_err() {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// Whether every queued job has been answered.
    pub(crate) fn idle(&self) -> bool {
        self.in_flight.load(Ordering::SeqCst) == 0
    }
}

/// What a thread does next.
enum Next<J> {
    Batch(Vec<J>),
    /// Nothing came within [`KEEP_IDLE`]: give the connection back, then wait on.
    Idle,
    /// Every sender is gone.
    Closed,
}

/// The next batch: the first job to arrive, then whatever else is queued (at most
/// `max`). One thread collects at a time. A thread that holds a connection waits at most
/// [`KEEP_IDLE`], for its turn and then for the first job.
fn next_batch<J>(rx: &Mutex<mpsc::Receiver<J>>, max: usize, holding: bool) -> Next<J> {
    let first = if holding {
        let Some(rx) = rx.try_lock_for(KEEP_IDLE) else {
            return Next::Idle;
        };
        match rx.recv_timeout(KEEP_IDLE) {
            Ok(job) => (job, rx),
            Err(mpsc::RecvTimeoutError::Timeout) => return Next::Idle,
            Err(mpsc::RecvTimeoutError::Disconnected) => return Next::Closed,
        }
    } else {
        let rx = rx.lock();
        match rx.recv() {
            Ok(job) => (job, rx),
            Err(_) => return Next::Closed,
        }
    };
    let (job, rx) = first;
    let mut batch = vec![job];
    while batch.len() < max {
        match rx.try_recv() {
            Ok(job) => batch.push(job),
            Err(_) => break,
        }
    }
    Next::Batch(batch)
}

/// A copy of `e` for another caller of the same failed batch: the same kind of failure
/// (an outage stays an outage), with the database's message. diesel's errors are not
/// `Clone`, so a database error is rebuilt from its kind and message.
pub(crate) fn again(e: &StoreError) -> StoreError {
    use diesel::result::Error;
    let copy = |d: &Error| match d {
        Error::DatabaseError(kind, info) => {
            Error::DatabaseError(*kind, Box::new(info.message().to_string()))
        }
        other => Error::QueryBuilderError(other.to_string().into()),
    };
    match e {
        StoreError::Unavailable(m) => StoreError::Unavailable(m.clone()),
        StoreError::ConnectionLost(d) => StoreError::ConnectionLost(copy(d)),
        StoreError::TimedOut(d) => StoreError::TimedOut(copy(d)),
        StoreError::NoAnswer(bound) => StoreError::NoAnswer(*bound),
        StoreError::NotResponding(bound) => StoreError::NotResponding(*bound),
        _ => StoreError::Task,
    }
}
