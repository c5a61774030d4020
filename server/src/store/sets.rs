//! Set-based statements of the group-commit writer (`writer.rs`): one statement for every
//! write of a kind in a batch, instead of one per write.
//!
//! Each statement joins the table to the batch's rows, given as a `VALUES` list of bound
//! parameters (`WITH v(..) AS (VALUES ($1, $2), ($3, $4))` on PostgreSQL, `?1` on SQLite,
//! both backends from one text), and keeps each row's own condition: a connect's epoch
//! comes back with its id (`RETURNING`), a disconnect or hello applies only where its
//! epoch is current, a result only where its command is the agent's, still open, and its
//! connection current, and `RETURNING` names the rows that applied. So every caller still
//! learns its own row's outcome, exactly as with one statement per write.
//!
//! A statement's rows must name distinct agents (distinct commands for results): the
//! writer splits a batch into rounds so that they do (`writer::rounds`). Rows are bound
//! in the order given; the writer sorts them by agent, so PostgreSQL takes row locks in
//! one order across writers.

use std::fmt::Write as _;

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Nullable, Text};
use diesel::{PgConnection, SqliteConnection};

use super::agents::Hello;
use super::commands::OPEN;
use super::schema::{agents, commands};
use super::{CommandStatus, ResultOutcome};

/// A new connection of `id` on `pod` at `now` (ms).
pub(super) struct ConnectRow<'a> {
    pub(super) id: &'a str,
    pub(super) pod: &'a str,
    pub(super) now: i64,
}

/// A closed connection: `id`'s connection `epoch`, last heard from at `last_seen` (ms).
pub(super) struct DisconnectRow<'a> {
    pub(super) id: &'a str,
    pub(super) epoch: i64,
    pub(super) last_seen: i64,
}

/// What connection `epoch` of `id` said in its hello.
pub(super) struct HelloRow<'a> {
    pub(super) id: &'a str,
    pub(super) epoch: i64,
    pub(super) hello: &'a Hello,
}

/// A result for `command_id` from connection `epoch` of `agent_id`.
pub(super) struct ResultRow<'a> {
    pub(super) agent_id: &'a str,
    pub(super) epoch: i64,
    pub(super) command_id: &'a str,
    pub(super) status: CommandStatus,
    pub(super) output: Option<&'a str>,
    pub(super) now: i64,
}

#[derive(QueryableByName)]
pub(super) struct IdEpoch {
    #[diesel(sql_type = Text)]
    pub(super) id: String,
    #[diesel(sql_type = BigInt)]
    pub(super) epoch: i64,
}

#[derive(QueryableByName)]
pub(super) struct Id {
    #[diesel(sql_type = Text)]
    pub(super) id: String,
}

/// The batch's statements, for each backend (one text, the placeholders differ).
pub(super) trait SetStatements {
    /// Upserts the connections (distinct ids): creates unknown agents at epoch 1, else
    /// takes the next epoch. Returns every row's `(id, epoch)`, in no particular order.
    fn connect_all(&mut self, rows: &[ConnectRow<'_>]) -> QueryResult<Vec<IdEpoch>>;
    /// Marks offline the agents (distinct ids) whose connection is still the current
    /// one; returns the ids that were.
    fn disconnect_all(&mut self, rows: &[DisconnectRow<'_>]) -> QueryResult<Vec<Id>>;
    /// Stores the hellos (distinct ids) of current connections; a field the agent left
    /// out keeps its stored value.
    fn hello_all(&mut self, rows: &[HelloRow<'_>]) -> QueryResult<usize>;
    /// Stores the results (distinct commands) whose command is the agent's, still open,
    /// and whose connection is current; returns the ids of the commands stored.
    fn result_all(&mut self, rows: &[ResultRow<'_>]) -> QueryResult<Vec<Id>>;
    /// Why a result [`SetStatements::result_all`] did not store was refused, in the order
    /// the checks always had: a newer connection, else a final status, else no such
    /// command of this agent.
    fn result_refusal(&mut self, row: &ResultRow<'_>) -> QueryResult<ResultOutcome>;
    /// Locks the agents' rows in the order of their ids (PostgreSQL; SQLite has one
    /// writer at a time), so that the statements after it cannot deadlock with another
    /// writer's batch.
    fn lock_agents(&mut self, ids: &[&str]) -> QueryResult<()>;
}

/// `(p1, p2, p3), (p4, p5, p6)`: `rows` tuples of `cols` numbered placeholders.
pub(super) fn values(dollar: bool, rows: usize, cols: usize) -> String {
    let mut s = String::with_capacity(rows * cols * 6);
    let sigil = if dollar { '$' } else { '?' };
    for r in 0..rows {
        s.push_str(if r == 0 { "(" } else { ", (" });
        for c in 0..cols {
            if c > 0 {
                s.push_str(", ");
            }
            let _ = write!(s, "{sigil}{}", r * cols + c + 1);
        }
        s.push(')');
    }
    s
}

fn connect_sql(dollar: bool, n: usize) -> String {
    format!(
        "WITH v (v_id, v_pod, v_now) AS (VALUES {}) \
         INSERT INTO agents (id, created_at, online, pod, epoch, connected_at, last_seen) \
         SELECT v_id, v_now, TRUE, v_pod, 1, v_now, v_now FROM v WHERE TRUE \
         ON CONFLICT (id) DO UPDATE SET online = TRUE, pod = excluded.pod, \
         epoch = agents.epoch + 1, connected_at = excluded.connected_at, \
         last_seen = excluded.last_seen \
         RETURNING id, epoch",
        values(dollar, n, 3)
    )
}

fn disconnect_sql(dollar: bool, n: usize) -> String {
    format!(
        "WITH v (v_id, v_epoch, v_last_seen) AS (VALUES {}) \
         UPDATE agents SET online = FALSE, pod = NULL, last_seen = v_last_seen FROM v \
         WHERE id = v_id AND epoch = v_epoch \
         RETURNING id",
        values(dollar, n, 3)
    )
}

/// Rows whose facts are unchanged are left alone: an agent says the same `hello` on every
/// connection, and a write would cost a new row version (and its WAL) per reconnection.
fn hello_sql(dollar: bool, n: usize) -> String {
    // The null-safe "differs": PostgreSQL's standard form, SQLite's own.
    let differs = if dollar { "IS DISTINCT FROM" } else { "IS NOT" };
    format!(
        "WITH v (v_id, v_epoch, v_version, v_hostname, v_os, v_arch) AS (VALUES {}) \
         UPDATE agents SET version = COALESCE(v_version, version), \
         hostname = COALESCE(v_hostname, hostname), os = COALESCE(v_os, os), \
         arch = COALESCE(v_arch, arch) FROM v \
         WHERE id = v_id AND epoch = v_epoch \
         AND (version {differs} COALESCE(v_version, version) \
         OR hostname {differs} COALESCE(v_hostname, hostname) \
         OR os {differs} COALESCE(v_os, os) OR arch {differs} COALESCE(v_arch, arch))",
        values(dollar, n, 6)
    )
}

fn result_sql(dollar: bool, n: usize) -> String {
    format!(
        "WITH v (v_command, v_agent, v_epoch, v_status, v_output, v_now) AS (VALUES {}) \
         UPDATE commands SET status = v_status, output = v_output, completed_at = v_now FROM v \
         WHERE id = v_command AND agent_id = v_agent AND status IN ('pending', 'delivered') \
         AND EXISTS (SELECT 1 FROM agents WHERE agents.id = v_agent AND agents.epoch = v_epoch) \
         RETURNING id",
        values(dollar, n, 6)
    )
}

/// One implementation per backend from one body: each method binds its rows in order
/// to the shared statement text.
macro_rules! set_statements {
    ($conn:ty, $db:ty, $dollar:expr, $($lock:tt)*) => {
        impl SetStatements for $conn {
            fn connect_all(&mut self, rows: &[ConnectRow<'_>]) -> QueryResult<Vec<IdEpoch>> {
                if rows.is_empty() {
                    return Ok(Vec::new());
                }
                let mut q = diesel::sql_query(connect_sql($dollar, rows.len())).into_boxed::<$db>();
                for r in rows {
                    q = q.bind::<Text, _>(r.id).bind::<Text, _>(r.pod).bind::<BigInt, _>(r.now);
                }
                q.load(self)
            }

            fn disconnect_all(&mut self, rows: &[DisconnectRow<'_>]) -> QueryResult<Vec<Id>> {
                if rows.is_empty() {
                    return Ok(Vec::new());
                }
                let mut q =
                    diesel::sql_query(disconnect_sql($dollar, rows.len())).into_boxed::<$db>();
                for r in rows {
                    q = q
                        .bind::<Text, _>(r.id)
                        .bind::<BigInt, _>(r.epoch)
                        .bind::<BigInt, _>(r.last_seen);
                }
                q.load(self)
            }

            fn hello_all(&mut self, rows: &[HelloRow<'_>]) -> QueryResult<usize> {
                if rows.is_empty() {
                    return Ok(0);
                }
                let mut q = diesel::sql_query(hello_sql($dollar, rows.len())).into_boxed::<$db>();
                for r in rows {
                    q = q
                        .bind::<Text, _>(r.id)
                        .bind::<BigInt, _>(r.epoch)
                        .bind::<Nullable<Text>, _>(r.hello.version.as_deref())
                        .bind::<Nullable<Text>, _>(r.hello.hostname.as_deref())
                        .bind::<Nullable<Text>, _>(r.hello.os.as_deref())
                        .bind::<Nullable<Text>, _>(r.hello.arch.as_deref());
                }
                q.execute(self)
            }

            fn result_all(&mut self, rows: &[ResultRow<'_>]) -> QueryResult<Vec<Id>> {
                if rows.is_empty() {
                    return Ok(Vec::new());
                }
                let mut q = diesel::sql_query(result_sql($dollar, rows.len())).into_boxed::<$db>();
                for r in rows {
                    q = q
                        .bind::<Text, _>(r.command_id)
                        .bind::<Text, _>(r.agent_id)
                        .bind::<BigInt, _>(r.epoch)
                        .bind::<Text, _>(r.status.as_str())
                        .bind::<Nullable<Text>, _>(r.output)
                        .bind::<BigInt, _>(r.now);
                }
                q.load(self)
            }

            fn result_refusal(&mut self, row: &ResultRow<'_>) -> QueryResult<ResultOutcome> {
                let epoch_now: Option<i64> = agents::table
                    .find(row.agent_id)
                    .select(agents::epoch)
                    .first(self)
                    .optional()?;
                if epoch_now != Some(row.epoch) {
                    return Ok(ResultOutcome::StaleConnection);
                }
                let existing: Option<String> = commands::table
                    .filter(commands::id.eq(row.command_id).and(commands::agent_id.eq(row.agent_id)))
                    .select(commands::status)
                    .first(self)
                    .optional()?;
                Ok(match existing {
                    Some(s) if !OPEN.contains(&s.as_str()) => ResultOutcome::AlreadyFinal(
                        CommandStatus::parse(&s).unwrap_or(CommandStatus::Failed),
                    ),
                    _ => ResultOutcome::UnknownCommand,
                })
            }

            $($lock)*
        }
    };
}

set_statements!(
    PgConnection,
    diesel::pg::Pg,
    true,
    fn lock_agents(&mut self, ids: &[&str]) -> QueryResult<()> {
        if ids.len() < 2 {
            return Ok(());
        }
        diesel::sql_query(
            "SELECT id FROM agents WHERE id = ANY($1) ORDER BY id COLLATE \"C\" FOR NO KEY UPDATE",
        )
        .bind::<diesel::sql_types::Array<Text>, _>(ids)
        .load::<Id>(self)
        .map(|_| ())
    }
);
set_statements!(
    SqliteConnection,
    diesel::sqlite::Sqlite,
    false,
    fn lock_agents(&mut self, _ids: &[&str]) -> QueryResult<()> {
        Ok(())
    }
);

#[cfg(test)]
mod tests {
    use super::values;

    #[test]
    fn placeholders_are_numbered_in_binding_order() {
        assert_eq!(values(true, 2, 3), "($1, $2, $3), ($4, $5, $6)");
        assert_eq!(values(false, 1, 2), "(?1, ?2)");
    }
}
