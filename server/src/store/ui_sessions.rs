//! Web UI sign-ins, server-side so that signing out (or deleting the rows) ends them on
//! every replica. Rows hold a hash of the cookie, never the cookie itself.

use diesel::prelude::*;

use super::schema::ui_sessions;
use super::{Store, StoreError, with_conn};

impl Store {
    pub(crate) async fn create_ui_session(
        &self,
        id_hash: String,
        created_at: i64,
        expires_at: i64,
    ) -> Result<(), StoreError> {
        self.run(move |pool| {
            with_conn!(pool, c => diesel::insert_into(ui_sessions::table)
                .values((
                    ui_sessions::id_hash.eq(&id_hash),
                    ui_sessions::created_at.eq(created_at),
                    ui_sessions::expires_at.eq(expires_at),
                ))
                .execute(c)?);
            Ok(())
        })
        .await
    }

    /// The session's expiry, if it exists and has not expired at `now`.
    pub(crate) async fn ui_session_expiry(
        &self,
        id_hash: String,
        now: i64,
    ) -> Result<Option<i64>, StoreError> {
        self.run(move |pool| {
            with_conn!(pool, c => Ok(ui_sessions::table
                .find(&id_hash)
                .filter(ui_sessions::expires_at.gt(now))
                .select(ui_sessions::expires_at)
                .first(c)
                .optional()?))
        })
        .await
    }

    pub(crate) async fn delete_ui_session(&self, id_hash: String) -> Result<(), StoreError> {
        self.run(move |pool| {
            with_conn!(pool, c => diesel::delete(ui_sessions::table.find(&id_hash)).execute(c)?);
            Ok(())
        })
        .await
    }

    /// Forgets sessions that expired before `now`; returns how many.
    pub(crate) async fn delete_expired_ui_sessions(&self, now: i64) -> Result<usize, StoreError> {
        self.run(move |pool| {
            with_conn!(pool, c => Ok(diesel::delete(ui_sessions::table.filter(ui_sessions::expires_at.le(now))).execute(c)?))
        })
        .await
    }
}
