//! Group read: the first page of commands to send, for many sessions in one statement.
//!
//! A wake-up makes its session read the commands it may send. One command to one agent
//! is one such read; a fleet job released to 10,000 agents of a replica at once is 10,000
//! of them, each a statement of its own and a wait for one of the pool's connections (a
//! session that waits longer than the pool's timeout reads nothing and waits for the next
//! wake-up). Here reader threads take the reads queued meanwhile (at most [`MAX_BATCH`];
//! none when the queue is empty, so a lone read costs what it did) and answer them with
//! one statement per [`CHUNK`] sessions: each session's rows, ranked by
//! `row_number()` over that session's own request, up to its own limit.
//!
//! The readers have threads of their own and read outside any transaction, on pooled
//! connections like every other read: they never wait behind the group-commit writers'
//! commits (reading through the writers made same-pod latency worse). A read sees what
//! was committed when its statement started, as before: a command committed later wakes
//! its session again.

use std::sync::Arc;

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool, Text};
use tokio::sync::oneshot;

use super::batch::{Held, Lease, Plan, Queue, again};
use super::commands::{CommandRow, SENDABLE_SQL};
use super::{DbPool, StoreError};

/// Most reads taken in one batch.
pub(crate) const MAX_BATCH: usize = 1024;
/// Sessions per statement: 5 bound parameters each, far below SQLite's 32,766.
const CHUNK: usize = 512;
/// Reader threads on PostgreSQL: one collects the next batch while another reads. SQLite
/// reads beside its writer too (WAL), one reader is enough.
const POSTGRES_READERS: usize = 2;

/// One session's read: the oldest `limit` commands it may send now, and where to answer.
pub(crate) struct Read {
    pub(crate) agent_id: String,
    /// Also those delivered earlier without a result (a fresh connection resends them).
    pub(crate) include_delivered: bool,
    pub(crate) limit: i64,
    /// Commands that expire at or before this instant (ms) are not sent.
    pub(crate) now: i64,
    pub(crate) reply: oneshot::Sender<Result<Vec<CommandRow>, StoreError>>,
}

/// The reader threads.
pub(crate) type Readers = Queue<Read>;

/// Starts the reader threads.
pub(crate) fn spawn(pool: Arc<DbPool>) -> Readers {
    Queue::spawn(
        pool,
        Plan {
            name: "store-reader",
            postgres_threads: POSTGRES_READERS,
            max_batch: MAX_BATCH,
            order: |_| {},
            apply: answer,
        },
    )
}

/// Reads for every request of `batch`, [`CHUNK`] at a time, and answers each.
fn answer(lease: &mut Lease<'_>, mut batch: Vec<Read>) {
    while !batch.is_empty() {
        let rest = batch.split_off(batch.len().min(CHUNK));
        let pages = read(lease, &batch);
        match lease.checked(pages) {
            Ok(pages) => {
                for (read, page) in batch.drain(..).zip(pages) {
                    let _ = read.reply.send(Ok(page));
                }
            }
            Err(e) => {
                // Every caller gets the failure's kind (an outage stays an outage).
                for read in batch.drain(..) {
                    let _ = read.reply.send(Err(again(&e)));
                }
            }
        }
        batch = rest;
    }
}

/// A command row with the index of the request it answers.
#[derive(QueryableByName)]
struct Ranked {
    #[diesel(sql_type = BigInt)]
    v_i: i64,
    #[diesel(embed)]
    row: CommandRow,
}

/// Binds every request of `reads` to the statement for them and loads the rows, on a
/// connection of backend `$db` (placeholders `$1` when `$dollar`, else `?1`).
macro_rules! load_ranked {
    ($c:expr, $db:ty, $dollar:expr, $reads:expr) => {{
        let reads: &[Read] = $reads;
        let mut q = diesel::sql_query(sendable_sql($dollar, reads.len())).into_boxed::<$db>();
        for (i, r) in reads.iter().enumerate() {
            q = q
                .bind::<BigInt, _>(i as i64)
                .bind::<Text, _>(r.agent_id.as_str())
                .bind::<Bool, _>(r.include_delivered)
                .bind::<BigInt, _>(r.limit)
                .bind::<BigInt, _>(r.now);
        }
        q.load::<Ranked>($c)?
    }};
}

/// One page per request of `reads`, in their order.
fn read(lease: &mut Lease<'_>, reads: &[Read]) -> Result<Vec<Vec<CommandRow>>, StoreError> {
    let rows = match lease.conn()? {
        Held::Postgres(c) => load_ranked!(&mut **c, diesel::pg::Pg, true, reads),
        Held::Sqlite(c) => load_ranked!(&mut **c, diesel::sqlite::Sqlite, false, reads),
    };
    let mut pages: Vec<Vec<CommandRow>> = reads.iter().map(|_| Vec::new()).collect();
    for ranked in rows {
        if let Some(page) = usize::try_from(ranked.v_i)
            .ok()
            .and_then(|i| pages.get_mut(i))
        {
            page.push(ranked.row);
        }
    }
    Ok(pages)
}

/// The statement for `n` requests (`VALUES` of bound parameters, numbered `$1` on
/// PostgreSQL and `?1` on SQLite, as in `sets.rs`): the sendable commands of each
/// request's agent ([`SENDABLE_SQL`]), oldest first, at most its `limit`, ordered by
/// request.
fn sendable_sql(dollar: bool, n: usize) -> String {
    format!(
        "WITH v (v_i, v_agent, v_delivered, v_limit, v_now) AS (VALUES {}) \
         SELECT v_i, id, agent_id, name, args, status, output, created_at, delivered_at, \
         completed_at, expires_at, attempts, job_id FROM ( \
           SELECT v_i, v_limit, c.id, c.agent_id, c.name, c.args, c.status, c.output, \
           c.created_at, c.delivered_at, c.completed_at, c.expires_at, c.attempts, c.job_id, \
           row_number() OVER (PARTITION BY v_i ORDER BY c.created_at, c.id) AS place \
           FROM v JOIN commands c ON c.agent_id = v_agent \
           WHERE {SENDABLE_SQL} \
         ) ranked WHERE place <= v_limit ORDER BY v_i, created_at, id",
        super::sets::values(dollar, n, 5)
    )
}
