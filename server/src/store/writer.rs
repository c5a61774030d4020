//! Group commit: the writes of agent sessions and of queued commands, many per
//! transaction.
//!
//! Every connect, disconnect, hello, `delivered` mark, stored result and queued command
//! used to be a transaction of its own: a commit (a WAL flush on PostgreSQL) and a pool
//! checkout on a blocking thread each. Here they go through a few writer threads per
//! replica instead (one on SQLite). A writer takes whatever was queued while the
//! transactions before committed (at most [`MAX_BATCH`] writes, and no waiting when the
//! queue is empty, so an idle replica adds no latency), applies them in one transaction,
//! and only after the commit tells each caller the outcome of its own write. So:
//!
//! - **Stored before acknowledged** holds as before: a caller hears "stored" only once
//!   the transaction holding its row has committed.
//! - **The newest connection wins** holds as before: the writes are the same statements,
//!   epoch checks included; each agent's writes in a batch keep their arrival order, and
//!   a session awaits each of its writes before it makes the next, so its own writes are
//!   never reordered. Batches take row locks in one order (`lock_order`), so concurrent
//!   writers do not deadlock on each other.
//! - One failing write never fails its neighbours: when a batch's transaction fails on a
//!   query (a foreign key raced by a delete, a constraint), nothing of it was committed,
//!   and each write is applied again alone, in its own transaction, to get its own
//!   outcome.
//!
//! Runs of the same kind of write share statements where the result allows it: the
//! `delivered` marks of several sessions are one `UPDATE`, the agents of several queued
//! commands are checked by one `SELECT`, the connect-time "anything to send?" checks of
//! several sessions are one `SELECT`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};

use diesel::prelude::*;
use tokio::sync::oneshot;

use super::agents::NewConnection;
use super::commands::OPEN;
use super::schema::{agents, audit_log, commands};
use super::{
    CommandStatus, DbPool, Hello, NewAuditRow, NewCommand, ResultOutcome, StoreError,
    WriteTransaction, with_conn,
};

/// Most writes applied in one transaction. Large enough that a storm's connects share a
/// few commits; small enough that one transaction never holds locks for long.
pub(crate) const MAX_BATCH: usize = 512;

/// One write and what its caller learns after the commit.
pub(crate) struct Job {
    pub(crate) write: Write,
    pub(crate) reply: oneshot::Sender<Result<Outcome, StoreError>>,
}

/// The writes that go through the writer.
pub(crate) enum Write {
    /// A new connection: the agent's epoch, one more than any before (created on first
    /// contact). Outcome: [`Outcome::Epoch`].
    Connect { id: String, pod: String, now: i64 },
    /// A closed connection, unless a newer one took over. Outcome: [`Outcome::Applied`]
    /// (whether the row was this connection's).
    Disconnect {
        id: String,
        epoch: i64,
        last_seen: i64,
    },
    /// What the agent said about itself, if the connection is still current.
    /// Outcome: [`Outcome::Done`].
    Hello {
        id: String,
        epoch: i64,
        hello: Hello,
    },
    /// Commands written to the agent's socket. Outcome: [`Outcome::Count`].
    Delivered { ids: Vec<String>, now: i64 },
    /// An agent's result. Outcome: [`Outcome::Result`].
    Result {
        agent_id: String,
        epoch: i64,
        command_id: String,
        status: CommandStatus,
        output: Option<String>,
        now: i64,
    },
    /// A queued command with its audit entry, if the agent exists. Outcome:
    /// [`Outcome::Applied`] (false: no such agent, nothing written).
    Command {
        cmd: NewCommand,
        audit: Option<NewAuditRow>,
    },
    /// A read in the writers' order: whether the agent has commands to send now (pending
    /// or delivered without a result, released, not expired). Outcome:
    /// [`Outcome::Applied`].
    Sendable { agent_id: String, now: i64 },
}

/// What a write came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Epoch(i64),
    Applied(bool),
    Count(usize),
    Result(ResultOutcome),
    Done,
}

/// Writer threads on PostgreSQL: while one waits for its commit (a WAL flush) or a round
/// trip, another applies the next batch. SQLite has one writer at a time anyway.
const POSTGRES_WRITERS: usize = 3;

/// The way to the writer threads, and how many writes they have yet to answer.
#[derive(Clone)]
pub(crate) struct Writers {
    /// Where writes are queued.
    jobs: mpsc::Sender<Job>,
    /// Writes queued and not yet answered: `Store::settle` waits for none (a writer in the
    /// middle of a batch may be inside libpq and OpenSSL).
    in_flight: Arc<AtomicUsize>,
}

impl Writers {
    /// Queues `job`; false if no writer is left to take it.
    pub(crate) fn send(&self, job: Job) -> bool {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        if self.jobs.send(job).is_err() {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// Whether every queued write has been answered.
    pub(crate) fn idle(&self) -> bool {
        self.in_flight.load(Ordering::SeqCst) == 0
    }
}

/// Starts the writer threads. They stop when every sender is gone (the last `Store`
/// dropped), after the batch each is applying.
pub(crate) fn spawn(pool: Arc<DbPool>) -> Writers {
    let in_flight = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = mpsc::channel::<Job>();
    let rx = Arc::new(std::sync::Mutex::new(rx));
    let writers = match &*pool {
        DbPool::Postgres(_) => POSTGRES_WRITERS,
        DbPool::Sqlite(_) => 1,
    };
    for n in 0..writers {
        let (pool, rx, in_flight) = (pool.clone(), rx.clone(), in_flight.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("store-writer-{n}"))
            .spawn(move || {
                while let Some(batch) = next_batch(&rx) {
                    let len = batch.len();
                    commit(&pool, batch);
                    in_flight.fetch_sub(len, Ordering::SeqCst);
                }
            });
        if let Err(e) = spawned {
            // Without any thread every write fails as a task error; say why.
            tracing::error!(error = %e, "could not start a store writer thread");
        }
    }
    Writers {
        jobs: tx,
        in_flight,
    }
}

/// The next batch: the first job to arrive, then whatever else is queued (at most
/// [`MAX_BATCH`]); `None` once every sender is gone. One writer collects at a time.
fn next_batch(rx: &std::sync::Mutex<mpsc::Receiver<Job>>) -> Option<Vec<Job>> {
    let rx = rx.lock().unwrap_or_else(|p| p.into_inner());
    let mut batch = vec![rx.recv().ok()?];
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(job) => batch.push(job),
            Err(_) => break,
        }
    }
    drop(rx);
    // Concurrent batches lock rows in one global order (no deadlock between writers):
    // first the writes that lock no agent row, then by agent. A stable sort keeps each
    // agent's writes in arrival order; writes of different agents are independent, so
    // any order of them is one the callers could have seen.
    batch.sort_by(|a, b| lock_order(&a.write).cmp(&lock_order(&b.write)));
    Some(batch)
}

/// Where a write goes in a batch: `delivered` marks, connect-time checks and queued
/// commands first (they lock no agent row, and runs of each share a statement), then
/// the writes that lock an agent's row or a result's command row, by agent and command.
fn lock_order(w: &Write) -> (u8, &str, &str) {
    match w {
        Write::Delivered { .. } => (0, "", ""),
        Write::Sendable { .. } => (1, "", ""),
        Write::Command { .. } => (2, "", ""),
        Write::Connect { id, .. } | Write::Disconnect { id, .. } | Write::Hello { id, .. } => {
            (3, id, "")
        }
        Write::Result {
            agent_id,
            command_id,
            ..
        } => (3, agent_id, command_id),
    }
}

/// Applies `batch` in one transaction and answers every job; on a query failure, applies
/// each job alone.
fn commit(pool: &DbPool, batch: Vec<Job>) {
    let (writes, replies): (Vec<Write>, Vec<_>) =
        batch.into_iter().map(|j| (j.write, j.reply)).unzip();
    match apply(pool, &writes) {
        Ok(outcomes) => {
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                let _ = reply.send(Ok(outcome));
            }
        }
        Err(StoreError::Query(_)) if writes.len() > 1 => {
            for (write, reply) in writes.into_iter().zip(replies) {
                let one = std::slice::from_ref(&write);
                let _ = reply.send(apply(pool, one).map(|mut o| o.remove(0)));
            }
        }
        Err(e) => {
            // Every caller gets an error of the same kind: 503 `store_unavailable` while
            // the database is away or too slow, whichever way that showed.
            let mut replies = replies.into_iter();
            let first = replies.next();
            for reply in replies {
                let _ = reply.send(Err(again(&e)));
            }
            if let Some(first) = first {
                let _ = first.send(Err(e));
            }
        }
    }
}

/// A copy of `e` for another caller of the same failed batch: the same kind of failure
/// (an outage stays an outage), with the database's message. diesel's errors are not
/// `Clone`, so a database error is rebuilt from its kind and message.
fn again(e: &StoreError) -> StoreError {
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
        _ => StoreError::Task,
    }
}

/// Applies `writes` in order in one transaction; one outcome per write.
fn apply(pool: &DbPool, writes: &[Write]) -> Result<Vec<Outcome>, StoreError> {
    with_conn!(pool, c => c.write_transaction::<_, StoreError, _>(|c| {
        let mut out: Vec<Outcome> = Vec::with_capacity(writes.len());
        let mut i = 0;
        while i < writes.len() {
            // The run of writes of the same kind starting at `i`, for shared statements.
            let run = writes[i..]
                .iter()
                .take_while(|w| std::mem::discriminant(*w) == std::mem::discriminant(&writes[i]))
                .count();
            match &writes[i] {
                Write::Connect { id, pod, now } => {
                    let row = NewConnection {
                        id,
                        created_at: *now,
                        online: true,
                        pod,
                        epoch: 1,
                        connected_at: *now,
                        last_seen: *now,
                    };
                    let epoch = diesel::insert_into(agents::table)
                        .values(&row)
                        .on_conflict(agents::id)
                        .do_update()
                        .set((
                            agents::online.eq(true),
                            agents::pod.eq(diesel::upsert::excluded(agents::pod)),
                            agents::epoch.eq(agents::epoch + 1),
                            agents::connected_at.eq(diesel::upsert::excluded(agents::connected_at)),
                            agents::last_seen.eq(diesel::upsert::excluded(agents::last_seen)),
                        ))
                        .returning(agents::epoch)
                        .get_result::<i64>(c)?;
                    out.push(Outcome::Epoch(epoch));
                    i += 1;
                }
                Write::Disconnect { id, epoch, last_seen } => {
                    let n = diesel::update(agents::table)
                        .filter(agents::id.eq(id).and(agents::epoch.eq(*epoch)))
                        .set((
                            agents::online.eq(false),
                            agents::pod.eq(None::<String>),
                            agents::last_seen.eq(*last_seen),
                        ))
                        .execute(c)?;
                    out.push(Outcome::Applied(n == 1));
                    i += 1;
                }
                Write::Hello { id, epoch, hello } => {
                    diesel::update(agents::table)
                        .filter(agents::id.eq(id).and(agents::epoch.eq(*epoch)))
                        .set(hello)
                        .execute(c)?;
                    out.push(Outcome::Done);
                    i += 1;
                }
                Write::Delivered { .. } => {
                    // One statement for the run; each caller learns the run's count.
                    let mut ids: Vec<&str> = Vec::new();
                    let mut now = 0;
                    for w in &writes[i..i + run] {
                        if let Write::Delivered { ids: mine, now: at } = w {
                            ids.extend(mine.iter().map(String::as_str));
                            now = now.max(*at);
                        }
                    }
                    let mut n = 0;
                    for chunk in ids.chunks(500) {
                        n += diesel::update(commands::table)
                            .filter(commands::id.eq_any(chunk).and(commands::status.eq_any(OPEN)))
                            .set((
                                commands::status.eq("delivered"),
                                commands::delivered_at.eq(now),
                                commands::attempts.eq(commands::attempts + 1),
                            ))
                            .execute(c)?;
                    }
                    out.extend(std::iter::repeat_n(Outcome::Count(n), run));
                    i += run;
                }
                Write::Result { agent_id, epoch, command_id, status, output, now } => {
                    // The common case in one statement: the command is this agent's, still
                    // open, and the reporting connection is the agent's current one.
                    let current = agents::table
                        .filter(agents::id.eq(agent_id).and(agents::epoch.eq(*epoch)));
                    let stored = diesel::update(commands::table)
                        .filter(
                            commands::id
                                .eq(command_id)
                                .and(commands::agent_id.eq(agent_id))
                                .and(commands::status.eq_any(OPEN))
                                .and(diesel::dsl::exists(current)),
                        )
                        .set((
                            commands::status.eq(status.as_str()),
                            commands::output.eq(output),
                            commands::completed_at.eq(*now),
                        ))
                        .execute(c)?;
                    let outcome = if stored == 1 {
                        ResultOutcome::Stored(*status)
                    } else {
                        // Why not, in the order the checks always had.
                        let epoch_now: Option<i64> = agents::table
                            .find(agent_id)
                            .select(agents::epoch)
                            .first(c)
                            .optional()?;
                        if epoch_now != Some(*epoch) {
                            ResultOutcome::StaleConnection
                        } else {
                            let existing: Option<String> = commands::table
                                .filter(commands::id.eq(command_id).and(commands::agent_id.eq(agent_id)))
                                .select(commands::status)
                                .first(c)
                                .optional()?;
                            match existing {
                                Some(s) if !OPEN.contains(&s.as_str()) => ResultOutcome::AlreadyFinal(
                                    CommandStatus::parse(&s).unwrap_or(CommandStatus::Failed),
                                ),
                                _ => ResultOutcome::UnknownCommand,
                            }
                        }
                    };
                    out.push(Outcome::Result(outcome));
                    i += 1;
                }
                Write::Command { .. } => {
                    // The agents of the whole run in one read, then the rows.
                    let wanted: Vec<&str> = writes[i..i + run]
                        .iter()
                        .filter_map(|w| match w {
                            Write::Command { cmd, .. } => Some(cmd.agent_id.as_str()),
                            _ => None,
                        })
                        .collect();
                    let mut known: Vec<String> = Vec::new();
                    for chunk in wanted.chunks(500) {
                        known.extend(
                            agents::table
                                .filter(agents::id.eq_any(chunk))
                                .select(agents::id)
                                .load::<String>(c)?,
                        );
                    }
                    for w in &writes[i..i + run] {
                        if let Write::Command { cmd, audit } = w {
                            let exists = known.contains(&cmd.agent_id);
                            if exists {
                                diesel::insert_into(commands::table).values(cmd).execute(c)?;
                                if let Some(row) = audit {
                                    diesel::insert_into(audit_log::table).values(row).execute(c)?;
                                }
                            }
                            out.push(Outcome::Applied(exists));
                        }
                    }
                    i += run;
                }
                Write::Sendable { .. } => {
                    let wanted: Vec<(&str, i64)> = writes[i..i + run]
                        .iter()
                        .filter_map(|w| match w {
                            Write::Sendable { agent_id, now } => Some((agent_id.as_str(), *now)),
                            _ => None,
                        })
                        .collect();
                    let now = wanted.iter().map(|(_, n)| *n).min().unwrap_or(0);
                    let mut with_commands: Vec<String> = Vec::new();
                    for chunk in wanted.chunks(500) {
                        let ids: Vec<&str> = chunk.iter().map(|(id, _)| *id).collect();
                        with_commands.extend(
                            commands::table
                                .filter(commands::agent_id.eq_any(ids))
                                .filter(commands::held.eq(false))
                                .filter(commands::status.eq_any(OPEN))
                                .filter(commands::expires_at.is_null().or(commands::expires_at.gt(now)))
                                .select(commands::agent_id)
                                .distinct()
                                .load::<String>(c)?,
                        );
                    }
                    for (id, _) in &wanted {
                        out.push(Outcome::Applied(with_commands.iter().any(|a| a == id)));
                    }
                    i += run;
                }
            }
        }
        Ok(out)
    }))
}
