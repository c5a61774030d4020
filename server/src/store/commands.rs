//! Commands: stored before anyone is told of them, delivered at least once.

use diesel::prelude::*;
use serde::Serialize;

use super::schema::{agents, commands};
use super::{Change, Store, StoreError, WriteTransaction, with_conn};

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
#[derive(Debug, Clone, Queryable, Selectable)]
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

#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = commands)]
pub(crate) struct NewCommand {
    pub id: String,
    pub agent_id: String,
    pub name: String,
    pub args: String,
    pub status: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
}

/// What became of a `result` an agent sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ResultOutcome {
    Stored(CommandStatus),
    /// No such command, or it belongs to another agent (indistinguishable on purpose).
    UnknownCommand,
    /// A newer connection of the same agent exists; this one is fenced off.
    StaleConnection,
    /// The command already has a final status (a duplicate result, or it expired).
    AlreadyFinal(CommandStatus),
}

const OPEN: [&str; 2] = ["pending", "delivered"];

impl Store {
    pub(crate) async fn insert_command(&self, cmd: NewCommand) -> Result<(), StoreError> {
        let (id, agent_id) = (cmd.id.clone(), cmd.agent_id.clone());
        self.run(move |pool| {
            with_conn!(pool, c => diesel::insert_into(commands::table).values(&cmd).execute(c)?);
            Ok(())
        })
        .await?;
        self.announce(|| Change::Command { id, agent_id });
        Ok(())
    }

    pub(crate) async fn get_command(&self, id: String) -> Result<Option<CommandRow>, StoreError> {
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
    /// `include_delivered` resends those delivered earlier without a result.
    pub async fn commands_to_send(
        &self,
        agent_id: String,
        include_delivered: bool,
        after: Option<(i64, String)>,
        now: i64,
        limit: i64,
    ) -> Result<Vec<CommandRow>, StoreError> {
        self.run(move |pool| {
            with_conn!(pool, c => {
                let statuses: &[&str] = if include_delivered { &OPEN } else { &OPEN[..1] };
                // A job's command waits, held, until the job's pacer releases it
                // (`commands_open` covers agent, held and status).
                let mut q = commands::table
                    .filter(commands::agent_id.eq(&agent_id))
                    .filter(commands::held.eq(false))
                    .filter(commands::status.eq_any(statuses))
                    .filter(commands::expires_at.is_null().or(commands::expires_at.gt(now)))
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

    pub(crate) async fn mark_delivered(
        &self,
        ids: Vec<String>,
        now: i64,
    ) -> Result<usize, StoreError> {
        let n = self
            .run(move |pool| {
                with_conn!(pool, c => Ok(diesel::update(commands::table)
                    .filter(commands::id.eq_any(&ids).and(commands::status.eq_any(OPEN)))
                    .set((
                        commands::status.eq("delivered"),
                        commands::delivered_at.eq(now),
                        commands::attempts.eq(commands::attempts + 1),
                    ))
                    .execute(c)?))
            })
            .await?;
        self.announce(|| Change::Commands);
        Ok(n)
    }

    /// Stores an agent's result if the command is its own, still open, and the reporting
    /// connection is the agent's current one.
    pub(crate) async fn record_result(
        &self,
        agent_id: String,
        epoch: i64,
        command_id: String,
        status: CommandStatus,
        output: Option<String>,
        now: i64,
    ) -> Result<ResultOutcome, StoreError> {
        let announced = (command_id.clone(), agent_id.clone());
        let outcome = self.run(move |pool| {
            with_conn!(pool, c => c.write_transaction::<ResultOutcome, StoreError, _>(|c| {
                let current: Option<i64> = agents::table.find(&agent_id).select(agents::epoch).first(c).optional()?;
                if current != Some(epoch) {
                    return Ok(ResultOutcome::StaleConnection);
                }
                let existing: Option<String> = commands::table
                    .filter(commands::id.eq(&command_id).and(commands::agent_id.eq(&agent_id)))
                    .select(commands::status)
                    .first(c)
                    .optional()?;
                let Some(existing) = existing else { return Ok(ResultOutcome::UnknownCommand) };
                if !OPEN.contains(&existing.as_str()) {
                    let st = CommandStatus::parse(&existing).unwrap_or(CommandStatus::Failed);
                    return Ok(ResultOutcome::AlreadyFinal(st));
                }
                let updated = diesel::update(commands::table)
                    .filter(commands::id.eq(&command_id).and(commands::status.eq_any(OPEN)))
                    .set((
                        commands::status.eq(status.as_str()),
                        commands::output.eq(output),
                        commands::completed_at.eq(now),
                    ))
                    .execute(c)?;
                Ok(if updated == 1 { ResultOutcome::Stored(status) } else { ResultOutcome::UnknownCommand })
            }))
        })
        .await?;
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
