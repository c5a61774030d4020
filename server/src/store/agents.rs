//! Agents: identity, presence columns and the connection epoch.

use diesel::dsl::sql;
use diesel::prelude::*;
use diesel::sql_types::{Bool, Text};

use super::schema::{agent_labels, agents, inventories};
use super::writer::{Outcome, Write};
use super::{Change, DbPool, Store, StoreError, WriteTransaction, now_ms, with_conn};

/// An agent as stored: identity, presence and what its last `hello` said. Timestamps are
/// milliseconds since the Unix epoch.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = agents)]
pub struct AgentRow {
    /// The agent's `client_id`.
    pub id: String,
    /// First contact (a connection or enrollment).
    pub created_at: i64,
    /// Whether a connection is open on some replica. Set by the replica holding it, cleared
    /// on close or, when that replica dies, by the sweep of stale pods.
    pub online: bool,
    /// The pod (replica) holding the connection; `None` while offline.
    pub pod: Option<String>,
    /// Connections so far: each new one takes the next epoch, and writes about a connection
    /// (hello, close) apply only while its epoch is current, so a late close of a superseded
    /// connection cannot mark a reconnected agent offline.
    pub epoch: i64,
    pub(crate) connected_at: Option<i64>,
    /// Last frame heard from the agent, refreshed in batches (so up to a refresh interval old).
    pub last_seen: Option<i64>,
    /// The agent's version from its last `hello`; `None` until it sent one.
    pub version: Option<String>,
    /// The host name from its last `hello`.
    pub hostname: Option<String>,
    /// The operating system from its last `hello` (`linux`: the reference agent sends
    /// Rust's `std::env::consts::OS`).
    pub os: Option<String>,
    /// The CPU architecture from its last `hello` (`x86_64`, `aarch64`).
    pub arch: Option<String>,
}

/// What an agent reports about itself in its `hello` message.
#[derive(Debug, Clone, Default, AsChangeset)]
#[diesel(table_name = agents)]
pub struct Hello {
    /// The agent's version.
    pub version: Option<String>,
    /// The host's name.
    pub hostname: Option<String>,
    /// The operating system (`linux`).
    pub os: Option<String>,
    /// The CPU architecture (`x86_64`, `aarch64`).
    pub arch: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct AgentFilter {
    pub online: Option<bool>,
    /// Substring of the id or hostname, ASCII letters matched case-insensitively on both
    /// backends (see [`Store::list_agents`]).
    pub search: Option<String>,
    /// Only agents that reported this label in their hello.
    pub label: Option<String>,
    /// Keyset pagination: ids strictly greater than this.
    pub after: Option<String>,
    pub limit: i64,
}

#[derive(Debug)]
pub(crate) struct AgentPage {
    pub agents: Vec<AgentRow>,
    /// Matches of the filter, ignoring pagination.
    pub total: i64,
    pub online: i64,
    /// `(agent_id, label)` of the page's agents, by agent and label.
    pub labels: Vec<(String, String)>,
}

#[derive(Insertable)]
#[diesel(table_name = agents)]
pub(super) struct NewConnection<'a> {
    pub(super) id: &'a str,
    pub(super) created_at: i64,
    pub(super) online: bool,
    pub(super) pod: &'a str,
    pub(super) epoch: i64,
    pub(super) connected_at: i64,
    pub(super) last_seen: i64,
}

/// Inventory size and time, shown with an agent without loading the body.
pub(crate) type InventorySummary = Option<(i64, i64)>;

impl Store {
    /// Records a new connection and returns its epoch, one more than any earlier
    /// connection of this agent. Creates the agent on first contact. Group-committed.
    pub async fn agent_connected(&self, id: String, pod: String) -> Result<i64, StoreError> {
        let announced = id.clone();
        let outcome = self
            .write(Write::Connect {
                id,
                pod,
                now: now_ms(),
            })
            .await?;
        let Outcome::Epoch(epoch) = outcome else {
            return Err(StoreError::Task);
        };
        self.announce(|| Change::Agent { id: announced });
        Ok(epoch)
    }

    /// Marks a connection closed, unless a newer one has already taken over.
    /// Group-committed.
    pub async fn agent_disconnected(
        &self,
        id: String,
        epoch: i64,
        last_seen: i64,
    ) -> Result<bool, StoreError> {
        let announced = id.clone();
        let current = self
            .write(Write::Disconnect {
                id,
                epoch,
                last_seen,
            })
            .await?
            == Outcome::Applied(true);
        if current {
            self.announce(|| Change::Agent { id: announced });
        }
        Ok(current)
    }

    /// Stores what the agent reported in its `hello`, if the connection is still the
    /// agent's current one. Group-committed.
    pub async fn agent_hello(
        &self,
        id: String,
        epoch: i64,
        hello: Hello,
    ) -> Result<(), StoreError> {
        if hello.version.is_none()
            && hello.hostname.is_none()
            && hello.os.is_none()
            && hello.arch.is_none()
        {
            return Ok(());
        }
        let announced = id.clone();
        self.write(Write::Hello { id, epoch, hello }).await?;
        self.announce(|| Change::Agent { id: announced });
        Ok(())
    }

    /// Whether the agent has commands to send now: pending, or delivered without a
    /// result, released, not expired. A new connection asks once, so that the common
    /// case (nothing waiting) costs a share of one batched read instead of a read of its
    /// own.
    pub async fn has_sendable_commands(&self, agent_id: String) -> Result<bool, StoreError> {
        let outcome = self
            .write(Write::Sendable {
                agent_id,
                now: now_ms(),
            })
            .await?;
        Ok(outcome == Outcome::Applied(true))
    }

    /// Refreshes `last_seen` for agents this pod heard from, in chunks that keep each
    /// statement small.
    pub(crate) async fn touch_agents(&self, ids: Vec<String>, now: i64) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        self.run(move |pool| {
            for chunk in ids.chunks(500) {
                with_conn!(pool, c => diesel::update(agents::table)
                    .filter(agents::id.eq_any(chunk).and(agents::online.eq(true)))
                    .set(agents::last_seen.eq(now))
                    .execute(c)?);
            }
            Ok(())
        })
        .await
    }

    /// Marks offline every agent whose pod stopped refreshing it before `cutoff`: the
    /// agents of a pod that died without closing its connections.
    pub(crate) async fn mark_stale_offline(&self, cutoff: i64) -> Result<usize, StoreError> {
        let n = self
            .run(move |pool| {
                with_conn!(pool, c => Ok(diesel::update(agents::table)
                    .filter(agents::online.eq(true).and(agents::last_seen.lt(cutoff)))
                    .set((agents::online.eq(false), agents::pod.eq(None::<String>)))
                    .execute(c)?))
            })
            .await?;
        if n > 0 {
            self.announce(|| Change::Agents);
        }
        Ok(n)
    }

    /// Registers an agent that has not connected yet (token minting for enrollment).
    pub async fn ensure_agent(&self, id: String) -> Result<(), StoreError> {
        let announced = id.clone();
        let created = self
            .run(move |pool| {
                with_conn!(pool, c => Ok(diesel::insert_into(agents::table)
                    .values((agents::id.eq(&id), agents::created_at.eq(now_ms())))
                    .on_conflict_do_nothing()
                    .execute(c)? == 1))
            })
            .await?;
        if created {
            self.announce(|| Change::Agent { id: announced });
        }
        Ok(())
    }

    /// The agent and its inventory's size (bytes) and receipt time (ms), if an inventory was
    /// stored; `None` for an unknown `client_id`.
    pub async fn get_agent(
        &self,
        id: String,
    ) -> Result<Option<(AgentRow, InventorySummary)>, StoreError> {
        self.run(move |pool| {
            with_conn!(pool, c => {
                let agent = agents::table
                    .find(&id)
                    .select(AgentRow::as_select())
                    .first(c)
                    .optional()?;
                let Some(agent) = agent else { return Ok(None) };
                let inventory = inventories::table
                    .find(&id)
                    .select((inventories::size_bytes, inventories::received_at))
                    .first::<(i64, i64)>(c)
                    .optional()?;
                Ok(Some((agent, inventory)))
            })
        })
        .await
    }

    /// Whether `client_id` is a known agent.
    pub async fn agent_exists(&self, id: String) -> Result<bool, StoreError> {
        self.run(move |pool| {
            with_conn!(pool, c => Ok(diesel::select(diesel::dsl::exists(agents::table.find(&id))).get_result(c)?))
        })
        .await
    }

    /// A page of agents. `search` matches a substring of the id or the hostname with ASCII
    /// letters folded and every other character as is, identically on both backends:
    /// SQLite's `LIKE` folds ASCII only and PostgreSQL's is case-sensitive, while its
    /// `lower()` folds by the database's locale; `lower()` under the "C" collation
    /// (PostgreSQL) and SQLite's own `lower()` both fold exactly ASCII.
    pub(crate) async fn list_agents(&self, filter: AgentFilter) -> Result<AgentPage, StoreError> {
        self.run(move |pool| {
            let pattern = filter
                .search
                .as_ref()
                .map(|s| format!("%{}%", escape_like(&s.to_ascii_lowercase())));
            let folded = |column: &str| match pool {
                DbPool::Postgres(_) => format!(r#"lower({column} COLLATE "C")"#),
                DbPool::Sqlite(_) => format!("lower({column})"),
            };
            let (id_folded, hostname_folded) = (folded("agents.id"), folded("agents.hostname"));
            // Boxed queries let the optional filters compose; rebuilt per use because a
            // boxed query is consumed.
            macro_rules! filtered {
                () => {{
                    let mut q = agents::table.into_boxed();
                    if let Some(online) = filter.online {
                        q = q.filter(agents::online.eq(online));
                    }
                    if let Some(label) = &filter.label {
                        q = q.filter(
                            agents::id.eq_any(
                                agent_labels::table
                                    .filter(agent_labels::label.eq(label.clone()))
                                    .select(agent_labels::agent_id),
                            ),
                        );
                    }
                    if let Some(p) = &pattern {
                        q = q.filter(
                            sql::<Bool>(&format!("({id_folded} LIKE "))
                                .bind::<Text, _>(p.clone())
                                .sql(&format!(" ESCAPE '\\' OR {hostname_folded} LIKE "))
                                .bind::<Text, _>(p.clone())
                                .sql(" ESCAPE '\\')"),
                        );
                    }
                    q
                }};
            }
            with_conn!(pool, c => {
                let mut page = filtered!();
                if let Some(after) = &filter.after {
                    page = page.filter(agents::id.gt(after.clone()));
                }
                let agents = page
                    .order(agents::id.asc())
                    .limit(filter.limit)
                    .select(AgentRow::as_select())
                    .load(c)?;
                let total = filtered!().count().get_result(c)?;
                let online = filtered!().filter(agents::online.eq(true)).count().get_result(c)?;
                let ids: Vec<&str> = agents.iter().map(|a| a.id.as_str()).collect();
                let labels = agent_labels::table
                    .filter(agent_labels::agent_id.eq_any(ids))
                    .order((agent_labels::agent_id.asc(), agent_labels::label.asc()))
                    .select((agent_labels::agent_id, agent_labels::label))
                    .load(c)?;
                Ok(AgentPage { agents, total, online, labels })
            })
        })
        .await
    }

    /// Deletes an agent with its commands and inventory. Returns whether it existed.
    pub async fn delete_agent(&self, id: String) -> Result<bool, StoreError> {
        let announced = id.clone();
        let existed = self.run(move |pool| {
            with_conn!(pool, c => c.write_transaction::<bool, StoreError, _>(|c| {
                // Explicit child deletes: SQLite enforces the cascade only when the
                // connection enabled foreign keys, and this must not depend on it.
                diesel::delete(super::schema::commands::table.filter(super::schema::commands::agent_id.eq(&id))).execute(c)?;
                diesel::delete(inventories::table.find(&id)).execute(c)?;
                diesel::delete(super::schema::agent_labels::table.filter(super::schema::agent_labels::agent_id.eq(&id))).execute(c)?;
                diesel::delete(super::schema::rollout_agents::table.filter(super::schema::rollout_agents::agent_id.eq(&id))).execute(c)?;
                Ok(diesel::delete(agents::table.find(&id)).execute(c)? == 1)
            }))
        })
        .await?;
        if existed {
            self.announce(|| Change::Agent { id: announced });
        }
        Ok(existed)
    }
}

fn escape_like(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        if matches!(ch, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(ch);
    }
    out
}
