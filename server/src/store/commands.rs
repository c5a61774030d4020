//! Commands: stored before anyone is told of them, delivered at least once.

use diesel::prelude::*;
use serde::Serialize;

use super::schema::commands;
use super::writer::{Outcome, Write};
use super::{Change, NewAuditRow, Store, StoreError, with_conn};

/// Lifecycle: `pending` → `delivered` → `succeeded` | `failed`; `pending`/`delivered` →
/// `expired` once past the optional TTL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CommandStatus {
    /// Stored; not yet sent on a connection.
    Pending,
    /// Sent at least once; no result yet. Resent on the agent's next connection.
    Delivered,
    /// The agent reported success.
    Succeeded,
    /// The agent reported failure.
    Failed,
    /// Past its TTL before a result came.
    Expired,
}

impl CommandStatus {
    pub(crate) const ALL: [CommandStatus; 5] = [
        CommandStatus::Pending,
        CommandStatus::Delivered,
        CommandStatus::Succeeded,
        CommandStatus::Failed,
        CommandStatus::Expired,
    ];

    /// The stored and JSON spelling, lowercase (`pending`).
    pub fn as_str(self) -> &'static str {
        match self {
            CommandStatus::Pending => "pending",
            CommandStatus::Delivered => "delivered",
            CommandStatus::Succeeded => "succeeded",
            CommandStatus::Failed => "failed",
            CommandStatus::Expired => "expired",
        }
    }

    /// The status spelled `s`; `None` for anything else (the `?status=` of a job's
    /// results is checked with it).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

/// A command as stored. Timestamps are milliseconds since the Unix epoch.
#[derive(Debug, Clone, Queryable, QueryableByName, Selectable)]
#[diesel(table_name = commands)]
pub struct CommandRow {
    /// A UUIDv7: ids sort by creation time.
    pub id: String,
    /// The `client_id` of the agent it is for.
    pub agent_id: String,
    /// What to run, as the agent knows it (the reference agent: `ping`, `inventory`,
    /// `exec`).
    pub name: String,
    /// JSON object, stored as text.
    pub args: String,
    /// A [`CommandStatus`] in lowercase.
    pub status: String,
    /// The agent's `output` from its `result`, as JSON text; `None` until then or when it sent
    /// none.
    pub output: Option<String>,
    /// When it was stored.
    pub created_at: i64,
    pub(crate) delivered_at: Option<i64>,
    /// When the result came or it expired.
    pub completed_at: Option<i64>,
    /// `created_at` plus the `ttl_seconds` asked for; `None`: it never expires.
    pub expires_at: Option<i64>,
    /// How many times it was sent: more than one after a connection dropped before the result.
    pub attempts: i32,
    /// The fleet job this command belongs to, if any.
    pub job_id: Option<String>,
}

/// A command to queue for an agent (a `commands` row as first stored).
#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = commands)]
pub struct NewCommand {
    /// A UUIDv7 chosen by the server.
    pub id: String,
    /// The target agent's `client_id`.
    pub agent_id: String,
    /// The command's name, as the operator sent it.
    pub name: String,
    /// The args, JSON text kept as sent.
    pub args: String,
    /// `pending` when queued (a [`CommandStatus`] in lowercase).
    pub status: String,
    /// Milliseconds since the Unix epoch.
    pub created_at: i64,
    /// Milliseconds since the Unix epoch; never expires when `None`.
    pub expires_at: Option<i64>,
}

/// What became of a `result` an agent sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResultOutcome {
    /// Stored (committed) with this final status; the agent may be sent `ack`.
    Stored(CommandStatus),
    /// No such command, or it belongs to another agent (indistinguishable on purpose).
    UnknownCommand,
    /// A newer connection of the same agent exists; this one is fenced off.
    StaleConnection,
    /// The command already has a final status (a duplicate result, or it expired).
    AlreadyFinal(CommandStatus),
}

/// The statuses of a command that waits for its result.
pub(super) const OPEN: [&str; 2] = ["pending", "delivered"];

/// Which of an agent's commands are sent to it: released (a job's pacer no longer holds
/// it), open (of `statuses`: [`OPEN`], or only `pending`) and not expired at `now` (ms).
/// The partial index `commands_open` (agent, held, status) serves it. The group readers'
/// raw statement spells the same rule as [`SENDABLE_SQL`].
#[diesel::dsl::auto_type(no_type_alias)]
pub(super) fn sendable<'a>(statuses: &'a [&'a str], now: i64) -> _ {
    commands::held
        .eq(false)
        .and(commands::status.eq_any(statuses))
        .and(
            commands::expires_at
                .is_null()
                .or(commands::expires_at.gt(now)),
        )
}

/// [`sendable`] in SQL, for the group readers (`reader.rs`): over commands `c`, with each
/// request's `v_delivered` (whether `delivered` ones count) and `v_now` (ms).
pub(super) const SENDABLE_SQL: &str = "c.held = FALSE AND c.status IN ('pending', 'delivered') \
     AND (v_delivered OR c.status = 'pending') \
     AND (c.expires_at IS NULL OR c.expires_at > v_now)";

impl Store {
    /// Stores a queued command and its audit entry in one transaction, if the agent
    /// exists; returns whether it did (nothing is written for an unknown agent).
    /// Group-committed: resolves once the command is committed.
    pub async fn create_command(
        &self,
        cmd: NewCommand,
        audit: Option<NewAuditRow>,
    ) -> Result<bool, StoreError> {
        let (id, agent_id) = (cmd.id.clone(), cmd.agent_id.clone());
        let stored = self.write(Write::Command { cmd, audit }).await? == Outcome::Applied(true);
        if stored {
            self.announce(|| Change::Command { id, agent_id });
        }
        Ok(stored)
    }

    /// The command with this id, whatever its status; `None` if there is none.
    pub async fn get_command(&self, id: String) -> Result<Option<CommandRow>, StoreError> {
        self.run(move |pool| {
            with_conn!(pool, c => Ok(commands::table.find(&id).select(CommandRow::as_select()).first(c).optional()?))
        })
        .await
    }

    /// Newest first; `before` is a command id from a previous page.
    pub async fn list_commands(
        &self,
        agent_id: String,
        before: Option<(i64, String)>,
        limit: i64,
    ) -> Result<Vec<CommandRow>, StoreError> {
        self.run(move |pool| {
            with_conn!(pool, c => {
                let mut q = commands::table.filter(commands::agent_id.eq(&agent_id)).into_boxed();
                if let Some((at, id)) = &before {
                    q = q.filter(
                        commands::created_at
                            .lt(*at)
                            .or(commands::created_at.eq(*at).and(commands::id.lt(id.clone()))),
                    );
                }
                Ok(q.order((commands::created_at.desc(), commands::id.desc()))
                    .limit(limit)
                    .select(CommandRow::as_select())
                    .load(c)?)
            })
        })
        .await
    }

    /// The next commands to send on a connection, oldest first. On a fresh connection
    /// `include_delivered` resends those delivered earlier without a result. The first
    /// page (`after` is `None`: what every wake-up reads) goes through the group readers
    /// (`reader.rs`), many sessions per statement; later pages are read alone.
    pub async fn commands_to_send(
        &self,
        agent_id: String,
        include_delivered: bool,
        after: Option<(i64, String)>,
        now: i64,
        limit: i64,
    ) -> Result<Vec<CommandRow>, StoreError> {
        if after.is_none() {
            return self
                .read_sendable(agent_id, include_delivered, limit, now)
                .await;
        }
        self.run(move |pool| {
            with_conn!(pool, c => {
                let statuses: &[&str] = if include_delivered { &OPEN } else { &OPEN[..1] };
                let mut q = commands::table
                    .filter(commands::agent_id.eq(&agent_id))
                    .filter(sendable(statuses, now))
                    .into_boxed();
                if let Some((at, id)) = &after {
                    q = q.filter(
                        commands::created_at
                            .gt(*at)
                            .or(commands::created_at.eq(*at).and(commands::id.gt(id.clone()))),
                    );
                }
                Ok(q.order((commands::created_at.asc(), commands::id.asc()))
                    .limit(limit)
                    .select(CommandRow::as_select())
                    .load(c)?)
            })
        })
        .await
    }

    /// Marks commands written to a socket as delivered (those still open). Group-committed.
    pub async fn mark_delivered(&self, ids: Vec<String>, now: i64) -> Result<usize, StoreError> {
        let Outcome::Count(n) = self.write(Write::Delivered { ids, now }).await? else {
            return Err(StoreError::Task);
        };
        self.announce(|| Change::Commands);
        Ok(n)
    }

    /// Stores an agent's result if the command is its own, still open, and the reporting
    /// connection is the agent's current one. Group-committed: `Stored` means committed.
    pub async fn record_result(
        &self,
        agent_id: String,
        epoch: i64,
        command_id: String,
        status: CommandStatus,
        output: Option<String>,
        now: i64,
    ) -> Result<ResultOutcome, StoreError> {
        let announced = (command_id.clone(), agent_id.clone());
        let outcome = self
            .write(Write::Result {
                agent_id,
                epoch,
                command_id,
                status,
                output,
                now,
            })
            .await?;
        let Outcome::Result(outcome) = outcome else {
            return Err(StoreError::Task);
        };
        if let ResultOutcome::Stored(_) = outcome {
            let (id, agent_id) = announced;
            self.announce(|| Change::Command { id, agent_id });
        }
        Ok(outcome)
    }

    /// Moves open commands past their TTL to `expired`; returns how many.
    pub async fn expire_commands(&self, now: i64) -> Result<usize, StoreError> {
        let n = self
            .run(move |pool| {
                with_conn!(pool, c => Ok(diesel::update(commands::table)
                    .filter(commands::status.eq_any(OPEN).and(commands::expires_at.le(now)))
                    .set((commands::status.eq("expired"), commands::completed_at.eq(now)))
                    .execute(c)?))
            })
            .await?;
        if n > 0 {
            self.announce(|| Change::Commands);
        }
        Ok(n)
    }

    /// Ids of agents with commands still waiting to be sent (held job commands are not
    /// sendable yet, so they do not count).
    pub async fn agents_with_pending(
        &self,
        agent_ids: Vec<String>,
    ) -> Result<Vec<String>, StoreError> {
        if agent_ids.is_empty() {
            return Ok(Vec::new());
        }
        self.run(move |pool| {
            let mut out = Vec::new();
            for chunk in agent_ids.chunks(500) {
                with_conn!(pool, c => out.extend(commands::table
                    .filter(commands::agent_id.eq_any(chunk).and(commands::status.eq("pending")))
                    .filter(commands::held.eq(false))
                    .select(commands::agent_id)
                    .distinct()
                    .load::<String>(c)?));
            }
            Ok(out)
        })
        .await
    }
}
