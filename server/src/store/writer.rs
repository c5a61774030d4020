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
//! - **The newest connection wins** holds as before: each kind of write is one statement
//!   for the batch (`sets.rs`) that keeps every row's own epoch check and reports every
//!   row's outcome; a statement never names an agent twice (a later write of the same
//!   agent and kind goes into a later round of the batch), and a session awaits each of
//!   its writes before it makes the next, so its own writes are never reordered. Batches
//!   take agent row locks in one order (by id, `lock_order` and `SetStatements::lock_agents`),
//!   so concurrent writers do not deadlock on each other.
//! - One failing write never fails its neighbours: when a batch's transaction fails on a
//!   query (a foreign key raced by a delete, a constraint), nothing of it was committed,
//!   and each write is applied again alone, in its own transaction, to get its own
//!   outcome.
//!
//! So a batch costs a handful of statements whatever its size: the `delivered` marks of
//! several sessions are one `UPDATE`, the agents of several queued commands one `SELECT`
//! and their rows one `INSERT` (and one for their audit entries), the connect-time
//! "anything to send?" checks one `SELECT`, the upgrades' revocation checks one `SELECT`
//! of generations and one of tokens, and the connects, disconnects, hellos and results
//! one statement per kind.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use diesel::prelude::*;
use tokio::sync::oneshot;

use super::api_tokens::{CredentialState, load_credential_states};
use super::batch::{Lease, Plan, Queue, again, with_lease};
use super::commands::{OPEN, sendable};
use super::schema::{agents, audit_log, commands};
use super::sets::{ConnectRow, DisconnectRow, HelloRow, ResultRow, SetStatements};
use super::{
    CommandStatus, DbPool, Hello, NewAuditRow, NewCommand, ResultOutcome, StoreError,
    WriteTransaction,
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
    /// A read for an upgrade's revocation check: the agent's credential generation (when
    /// `client_id` is given) and the token's state (when `jti` is). Outcome:
    /// [`Outcome::Credentials`].
    Credentials {
        client_id: Option<String>,
        jti: Option<String>,
    },
}

/// What a write came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Epoch(i64),
    Applied(bool),
    Count(usize),
    Result(ResultOutcome),
    Credentials(CredentialState),
    Done,
}

/// Writer threads on PostgreSQL: while one waits for its commit (a WAL flush) or a round
/// trip, another applies the next batch. SQLite has one writer at a time anyway.
const POSTGRES_WRITERS: usize = 3;

/// The way to the writer threads.
pub(crate) type Writers = Queue<Job>;

/// Starts the writer threads (`batch.rs`): each batch is put in [`lock_order`] and
/// committed in one transaction.
pub(crate) fn spawn(pool: Arc<DbPool>) -> Writers {
    Queue::spawn(
        pool,
        Plan {
            name: "store-writer",
            postgres_threads: POSTGRES_WRITERS,
            max_batch: MAX_BATCH,
            order: sort_batch,
            apply: commit,
        },
    )
}

/// Concurrent batches lock rows in one global order (no deadlock between writers): first
/// the writes that lock no agent row, then by agent. A stable sort keeps each agent's
/// writes in arrival order; writes of different agents are independent, so any order of
/// them is one the callers could have seen.
fn sort_batch(batch: &mut [Job]) {
    batch.sort_by(|a, b| lock_order(&a.write).cmp(&lock_order(&b.write)));
}

/// Where a write goes in a batch: `delivered` marks, connect-time checks, credential
/// lookups and queued commands first (they lock no agent row, and runs of each share a
/// statement), then
/// the writes that lock an agent's row or a result's command row, by agent and command.
fn lock_order(w: &Write) -> (u8, &str, &str) {
    match w {
        Write::Delivered { .. } => (0, "", ""),
        Write::Sendable { .. } => (1, "", ""),
        Write::Credentials { .. } => (2, "", ""),
        Write::Command { .. } => (3, "", ""),
        Write::Connect { id, .. } | Write::Disconnect { id, .. } | Write::Hello { id, .. } => {
            (4, id, "")
        }
        Write::Result {
            agent_id,
            command_id,
            ..
        } => (4, agent_id, command_id),
    }
}

/// Applies `batch` in one transaction and answers every job; on a query failure, applies
/// each job alone.
fn commit(lease: &mut Lease<'_>, batch: Vec<Job>) {
    let (writes, replies): (Vec<Write>, Vec<_>) =
        batch.into_iter().map(|j| (j.write, j.reply)).unzip();
    match apply(lease, &writes) {
        Ok(outcomes) => {
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                let _ = reply.send(Ok(outcome));
            }
        }
        Err(StoreError::Query(_)) if writes.len() > 1 => {
            for (write, reply) in writes.into_iter().zip(replies) {
                let one = std::slice::from_ref(&write);
                let _ = reply.send(apply(lease, one).map(|mut o| o.remove(0)));
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

/// Applies `writes` in one transaction; one outcome per write, in the order of `writes`.
///
/// Each kind of write is one statement for the whole batch (`sets.rs`), in the order of
/// [`lock_order`]: `delivered` marks, connect-time checks, queued commands, then the
/// writes about agents' connections and results, in rounds (see [`rounds`]). The writes of
/// a batch come from callers none of whom has been answered, and each session awaits
/// its write before it makes the next, so the writes are concurrent: applying them in
/// this order instead of their arrival order is an order they could have arrived in, and
/// each caller learns the outcome its own row had in it.
fn apply(lease: &mut Lease<'_>, writes: &[Write]) -> Result<Vec<Outcome>, StoreError> {
    with_lease!(lease, c => c.write_transaction::<_, StoreError, _>(|c| {
        let mut out: Vec<Option<Outcome>> = vec![None; writes.len()];
        let of_kind = |kind: u8| -> Vec<usize> {
            (0..writes.len()).filter(|&i| lock_order(&writes[i]).0 == kind).collect()
        };

        // `delivered` marks: one statement; each caller learns the batch's count.
        let delivered = of_kind(0);
        if !delivered.is_empty() {
            let mut ids: Vec<&str> = Vec::new();
            let mut now = 0;
            for &i in &delivered {
                if let Write::Delivered { ids: mine, now: at } = &writes[i] {
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
            for i in delivered {
                out[i] = Some(Outcome::Count(n));
            }
        }

        // Connect-time checks: one read.
        let checks = of_kind(1);
        if !checks.is_empty() {
            let wanted: Vec<(usize, &str, i64)> = checks
                .iter()
                .filter_map(|&i| match &writes[i] {
                    Write::Sendable { agent_id, now } => Some((i, agent_id.as_str(), *now)),
                    _ => None,
                })
                .collect();
            let now = wanted.iter().map(|(_, _, n)| *n).min().unwrap_or(0);
            let mut with_commands: Vec<String> = Vec::new();
            for chunk in wanted.chunks(500) {
                let ids: Vec<&str> = chunk.iter().map(|(_, id, _)| *id).collect();
                with_commands.extend(
                    commands::table
                        .filter(commands::agent_id.eq_any(ids))
                        .filter(sendable(&OPEN, now))
                        .select(commands::agent_id)
                        .distinct()
                        .load::<String>(c)?,
                );
            }
            for (i, id, _) in wanted {
                out[i] = Some(Outcome::Applied(with_commands.iter().any(|a| a == id)));
            }
        }

        // Credential lookups of upgrades: one read of generations and one of tokens.
        let lookups = of_kind(2);
        if !lookups.is_empty() {
            let asked = |i: usize| match &writes[i] {
                Write::Credentials { client_id, jti } => (client_id.as_deref(), jti.as_deref()),
                _ => (None, None),
            };
            let ids: Vec<&str> = lookups.iter().filter_map(|&i| asked(i).0).collect();
            let jtis: Vec<&str> = lookups.iter().filter_map(|&i| asked(i).1).collect();
            let states = load_credential_states!(c, &ids, &jtis);
            for i in lookups {
                let (id, jti) = asked(i);
                out[i] = Some(Outcome::Credentials(CredentialState {
                    generation: id.map(|id| states.generations.get(id).copied().unwrap_or(0)),
                    token_revoked: jti.and_then(|j| states.revoked.get(j).copied()),
                }));
            }
        }

        // Queued commands: their agents in one read, then every row (and audit entry) in
        // one multi-row insert each.
        let queued = of_kind(3);
        if !queued.is_empty() {
            let cmds: Vec<(usize, &NewCommand, Option<&NewAuditRow>)> = queued
                .iter()
                .filter_map(|&i| match &writes[i] {
                    Write::Command { cmd, audit } => Some((i, cmd, audit.as_ref())),
                    _ => None,
                })
                .collect();
            let wanted: Vec<&str> = cmds.iter().map(|(_, cmd, _)| cmd.agent_id.as_str()).collect();
            let mut known: Vec<String> = Vec::new();
            for chunk in wanted.chunks(500) {
                known.extend(
                    agents::table
                        .filter(agents::id.eq_any(chunk))
                        .select(agents::id)
                        .load::<String>(c)?,
                );
            }
            let mut rows: Vec<&NewCommand> = Vec::new();
            let mut audits: Vec<&NewAuditRow> = Vec::new();
            for (i, cmd, audit) in cmds {
                let exists = known.contains(&cmd.agent_id);
                if exists {
                    rows.push(cmd);
                    audits.extend(audit);
                }
                out[i] = Some(Outcome::Applied(exists));
            }
            // Chunks keep the bound parameters under SQLite's limit (32,766).
            for chunk in rows.chunks(1000) {
                diesel::insert_into(commands::table).values(chunk.to_vec()).execute(c)?;
            }
            for chunk in audits.chunks(1000) {
                diesel::insert_into(audit_log::table).values(chunk.to_vec()).execute(c)?;
            }
        }

        apply_agent_writes(c, writes, &of_kind(4), &mut out)?;
        out.into_iter().collect::<Option<Vec<_>>>().ok_or(StoreError::Task)
    }))
}

/// The rounds of `agent_writes` (indices into `writes`): round `k` holds the `k`-th
/// connect, disconnect and hello of each agent and the `k`-th result for each command, so
/// that no statement of a round names an agent (or a command) twice; a later write of the
/// same agent and kind lands in a later round, after the earlier one. Almost every batch
/// is one round: a second connection of an agent within a batch makes a second.
fn rounds(writes: &[Write], agent_writes: &[usize]) -> Vec<Vec<usize>> {
    let mut seen: std::collections::HashMap<(u8, &str), usize> = Default::default();
    let mut rounds: Vec<Vec<usize>> = Vec::new();
    for &i in agent_writes {
        let key = match &writes[i] {
            Write::Connect { id, .. } => (0, id.as_str()),
            Write::Disconnect { id, .. } => (1, id.as_str()),
            Write::Hello { id, .. } => (2, id.as_str()),
            Write::Result { command_id, .. } => (3, command_id.as_str()),
            _ => continue,
        };
        let round = seen.entry(key).or_insert(0);
        if rounds.len() <= *round {
            rounds.push(Vec::new());
        }
        rounds[*round].push(i);
        *round += 1;
    }
    rounds
}

/// Connects, disconnects, hellos and results, round by round: in each, the agents' rows
/// are locked in one order (when more than the connect upsert touches them), then one
/// statement per kind. Each kind's rows keep their indices in `writes` (`*_at`), for the
/// outcomes.
fn apply_agent_writes<C: SetStatements>(
    c: &mut C,
    writes: &[Write],
    agent_writes: &[usize],
    out: &mut [Option<Outcome>],
) -> Result<(), StoreError> {
    for round in rounds(writes, agent_writes) {
        let (mut connects, mut connects_at) = (Vec::new(), Vec::new());
        let (mut disconnects, mut disconnects_at) = (Vec::new(), Vec::new());
        let (mut hellos, mut hellos_at) = (Vec::new(), Vec::new());
        let (mut results, mut results_at) = (Vec::new(), Vec::new());
        for i in round {
            match &writes[i] {
                Write::Connect { id, pod, now } => {
                    connects.push(ConnectRow { id, pod, now: *now });
                    connects_at.push(i);
                }
                Write::Disconnect {
                    id,
                    epoch,
                    last_seen,
                } => {
                    disconnects.push(DisconnectRow {
                        id,
                        epoch: *epoch,
                        last_seen: *last_seen,
                    });
                    disconnects_at.push(i);
                }
                Write::Hello { id, epoch, hello } => {
                    hellos.push(HelloRow {
                        id,
                        epoch: *epoch,
                        hello,
                    });
                    hellos_at.push(i);
                }
                Write::Result {
                    agent_id,
                    epoch,
                    command_id,
                    status,
                    output,
                    now,
                } => {
                    results.push(ResultRow {
                        agent_id,
                        epoch: *epoch,
                        command_id,
                        status: *status,
                        output: output.as_deref(),
                        now: *now,
                    });
                    results_at.push(i);
                }
                _ => {}
            }
        }

        // The connect upsert alone takes its rows' locks in the order it is given (by
        // agent, as every writer sorts them); the updates take them in whatever order
        // their plan reads the table, so they lock first.
        if !disconnects.is_empty() || !hellos.is_empty() {
            let mut ids: Vec<&str> = connects.iter().map(|r| r.id).collect();
            ids.extend(disconnects.iter().map(|r| r.id));
            ids.extend(hellos.iter().map(|r| r.id));
            ids.sort_unstable();
            ids.dedup();
            c.lock_agents(&ids)?;
        }

        if !connects.is_empty() {
            let epochs: HashMap<String, i64> = c
                .connect_all(&connects)?
                .into_iter()
                .map(|r| (r.id, r.epoch))
                .collect();
            for (i, row) in connects_at.into_iter().zip(&connects) {
                let epoch = *epochs.get(row.id).ok_or(StoreError::Task)?;
                out[i] = Some(Outcome::Epoch(epoch));
            }
        }
        if !disconnects.is_empty() {
            let current: HashSet<String> = c
                .disconnect_all(&disconnects)?
                .into_iter()
                .map(|r| r.id)
                .collect();
            for (i, row) in disconnects_at.into_iter().zip(&disconnects) {
                out[i] = Some(Outcome::Applied(current.contains(row.id)));
            }
        }
        if !hellos.is_empty() {
            c.hello_all(&hellos)?;
            for i in hellos_at {
                out[i] = Some(Outcome::Done);
            }
        }
        if !results.is_empty() {
            let stored: HashSet<String> =
                c.result_all(&results)?.into_iter().map(|r| r.id).collect();
            for (i, row) in results_at.into_iter().zip(&results) {
                let outcome = if stored.contains(row.command_id) {
                    ResultOutcome::Stored(row.status)
                } else {
                    c.result_refusal(row)?
                };
                out[i] = Some(Outcome::Result(outcome));
            }
        }
    }
    Ok(())
}
