//! Tokens minted through the API or by enrollment, by `jti`, and agents' credential
//! generations. The tokens themselves are never stored.

use diesel::prelude::*;

use super::schema::api_tokens;
use super::writer::{Outcome, Write};
use super::{Store, StoreError, WriteTransaction, now_ms, with_conn};

/// A token minted through the API or by enrollment, as recorded: enough to list and
/// revoke it, never the token itself.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, Insertable)]
#[diesel(table_name = api_tokens)]
pub struct ApiTokenRow {
    /// The token's `jti` (a UUIDv7, so ids sort by creation time).
    pub jti: String,
    /// The operator's label for it, or the enroll secret's name for an enrolled agent's token.
    pub name: Option<String>,
    /// `agent` or `admin`.
    pub role: String,
    /// The token's `sub`.
    pub subject: String,
    /// Milliseconds since the Unix epoch, as every timestamp here.
    pub created_at: i64,
    /// Its `exp`, in milliseconds (the claim itself is in seconds, RFC 7519 §4.1.4).
    pub expires_at: i64,
    /// The last request authenticated with it, recorded lazily (batched, so up to a flush
    /// interval late).
    pub last_used_at: Option<i64>,
    /// When it was revoked; a revoked token is refused (401).
    pub revoked_at: Option<i64>,
}

/// Which recorded tokens to list: ordered by `jti` (creation time), keyset-paginated.
#[derive(Debug, Clone, Default)]
pub(crate) struct ApiTokenFilter {
    pub subject: Option<String>,
    pub role: Option<String>,
    /// Include revoked tokens and tokens that expired before `now`.
    pub include_inactive: bool,
    /// Keyset pagination: `jti`s strictly greater than this.
    pub after: Option<String>,
    pub limit: i64,
}

/// What the database says about one presented token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CredentialState {
    /// The agent's current credential generation (0 when never bumped); `None` when no
    /// client id was asked about.
    pub generation: Option<i64>,
    /// `Some(true)` when the token's `jti` is recorded and revoked, `Some(false)` when
    /// recorded and live, `None` when not recorded (or no `jti` was asked about).
    pub token_revoked: Option<bool>,
}

/// What the database says about many agents and tokens at once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct CredentialStates {
    /// Credential generation by client id, for agents whose generation was ever bumped.
    pub generations: std::collections::HashMap<String, i64>,
    /// Whether each recorded token (by `jti`) is revoked.
    pub revoked: std::collections::HashMap<String, bool>,
}

impl Store {
    pub(crate) async fn insert_api_token(&self, row: ApiTokenRow) -> Result<(), StoreError> {
        self.run(move |pool| {
            with_conn!(pool, c => diesel::insert_into(api_tokens::table).values(&row).execute(c)?);
            Ok(())
        })
        .await
    }

    /// The recorded token with this `jti`; `None` for an unrecorded one (CLI-minted).
    pub async fn get_api_token(&self, jti: String) -> Result<Option<ApiTokenRow>, StoreError> {
        self.run(move |pool| {
            with_conn!(pool, c => Ok(api_tokens::table
                .find(&jti)
                .select(ApiTokenRow::as_select())
                .first(c)
                .optional()?))
        })
        .await
    }

    pub(crate) async fn list_api_tokens(
        &self,
        filter: ApiTokenFilter,
        now: i64,
    ) -> Result<Vec<ApiTokenRow>, StoreError> {
        self.run(move |pool| {
            with_conn!(pool, c => {
                let mut q = api_tokens::table.into_boxed();
                if let Some(subject) = &filter.subject {
                    q = q.filter(api_tokens::subject.eq(subject.clone()));
                }
                if let Some(role) = &filter.role {
                    q = q.filter(api_tokens::role.eq(role.clone()));
                }
                if !filter.include_inactive {
                    q = q.filter(api_tokens::revoked_at.is_null().and(api_tokens::expires_at.gt(now)));
                }
                if let Some(after) = &filter.after {
                    q = q.filter(api_tokens::jti.gt(after.clone()));
                }
                Ok(q.order(api_tokens::jti.asc())
                    .limit(filter.limit)
                    .select(ApiTokenRow::as_select())
                    .load(c)?)
            })
        })
        .await
    }

    /// Marks a token revoked (the first revocation's time is kept). Returns the row, or
    /// `None` when no token has this `jti`. The database write alone: live sessions and
    /// other replicas learn of it from `Credentials`, or, should its message be lost,
    /// from the revocation refresh.
    pub async fn revoke_api_token(
        &self,
        jti: String,
        now: i64,
    ) -> Result<Option<ApiTokenRow>, StoreError> {
        self.run(move |pool| {
            with_conn!(pool, c => {
                diesel::update(api_tokens::table.find(&jti).filter(api_tokens::revoked_at.is_null()))
                    .set(api_tokens::revoked_at.eq(now))
                    .execute(c)?;
                Ok(api_tokens::table
                    .find(&jti)
                    .select(ApiTokenRow::as_select())
                    .first(c)
                    .optional()?)
            })
        })
        .await
    }

    /// Records when tokens were last used, one statement per token, only ever moving
    /// `last_used_at` forward. Called in batches by the credentials' flusher.
    pub(crate) async fn touch_api_tokens(
        &self,
        uses: Vec<(String, i64)>,
    ) -> Result<(), StoreError> {
        if uses.is_empty() {
            return Ok(());
        }
        self.run(move |pool| {
            with_conn!(pool, c => c.write_transaction::<(), StoreError, _>(|c| {
                for (jti, at) in &uses {
                    diesel::update(api_tokens::table.find(jti).filter(
                        api_tokens::last_used_at.is_null().or(api_tokens::last_used_at.lt(*at)),
                    ))
                    .set(api_tokens::last_used_at.eq(*at))
                    .execute(c)?;
                }
                Ok(())
            }))
        })
        .await
    }

    /// Many agents' generations and many tokens' states, 500 keys per statement: what a
    /// replica's revocation refresh re-reads for its live sessions. Agents never bumped
    /// are absent from `generations` (their generation is 0); tokens not recorded are
    /// absent from `revoked`.
    pub(crate) async fn credential_states(
        &self,
        client_ids: Vec<String>,
        jtis: Vec<String>,
    ) -> Result<CredentialStates, StoreError> {
        self.run(
            move |pool| with_conn!(pool, c => Ok(load_credential_states!(c, &client_ids, &jtis))),
        )
        .await
    }

    /// The agent's credential generation and the token's state, for an upgrade's
    /// revocation check. Read by the group-commit writer together with every other
    /// admission's lookup that is waiting (two statements per batch, not per agent), so a
    /// reconnect storm neither queues for pool connections nor fails on a pool wait.
    pub(crate) async fn credential_state(
        &self,
        client_id: Option<String>,
        jti: Option<String>,
    ) -> Result<CredentialState, StoreError> {
        match self.write(Write::Credentials { client_id, jti }).await? {
            Outcome::Credentials(state) => Ok(state),
            _ => Err(StoreError::Task),
        }
    }

    /// The agent's current credential generation (0 when never bumped).
    pub(crate) async fn agent_generation(&self, client_id: String) -> Result<i64, StoreError> {
        let state = self.credential_state(Some(client_id), None).await?;
        Ok(state.generation.unwrap_or(0))
    }

    /// Invalidates every token minted for the agent so far, and returns the new
    /// generation. A single upsert, so concurrent bumps on several replicas all count.
    /// The database write alone, like [`Store::revoke_api_token`].
    pub async fn bump_agent_generation(&self, client_id: String) -> Result<i64, StoreError> {
        self.run(move |pool| {
            let now = now_ms();
            with_conn!(pool, c => Ok(bump_generation!(c, &client_id, now)?))
        })
        .await
    }
}

/// The reads behind [`Store::credential_states`], usable inside a transaction on either
/// backend: `$ids` and `$jtis` are `&[impl AsRef<str>]`-like slices of `String` or `&str`;
/// evaluates to the `CredentialStates`, 500 keys per statement, and returns a query's
/// error with `?` (the enclosing function's error must come `From` diesel's).
macro_rules! load_credential_states {
    ($c:expr, $ids:expr, $jtis:expr) => {{
        use $crate::store::schema::{agent_credentials as ac, api_tokens as at};
        {
            let mut states = $crate::store::api_tokens::CredentialStates::default();
            for chunk in $ids.chunks(500) {
                let rows: Vec<(String, i64)> = ac::table
                    .filter(ac::client_id.eq_any(chunk))
                    .select((ac::client_id, ac::generation))
                    .load($c)?;
                states.generations.extend(rows);
            }
            for chunk in $jtis.chunks(500) {
                let rows: Vec<(String, Option<i64>)> = at::table
                    .filter(at::jti.eq_any(chunk))
                    .select((at::jti, at::revoked_at))
                    .load($c)?;
                states
                    .revoked
                    .extend(rows.into_iter().map(|(jti, at)| (jti, at.is_some())));
            }
            states
        }
    }};
}
pub(crate) use load_credential_states;

/// The upsert behind [`Store::bump_agent_generation`], usable inside a transaction on
/// either backend: evaluates to `QueryResult<i64>`, the new generation.
macro_rules! bump_generation {
    ($c:expr, $client_id:expr, $now:expr) => {{
        use $crate::store::schema::agent_credentials as ac;
        diesel::insert_into(ac::table)
            .values((
                ac::client_id.eq($client_id),
                ac::generation.eq(1_i64),
                ac::updated_at.eq($now),
            ))
            .on_conflict(ac::client_id)
            .do_update()
            .set((
                ac::generation.eq(ac::generation + 1_i64),
                ac::updated_at.eq($now),
            ))
            .returning(ac::generation)
            .get_result::<i64>($c)
    }};
}
pub(crate) use bump_generation;
