//! Inventories: the latest document an agent reported, with its received time.

use diesel::prelude::*;
use diesel::upsert::excluded;

use super::schema::inventories;
use super::{Store, StoreError, with_conn};

#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = inventories)]
pub(crate) struct InventoryRow {
    pub agent_id: String,
    /// Validated JSON, stored as text.
    pub body: String,
    pub size_bytes: i64,
    pub received_at: i64,
}

impl Store {
    /// Replaces the agent's inventory with `body` (validated JSON); shared by the HTTP
    /// endpoint and the WebSocket `inventory` message.
    pub(crate) async fn store_inventory(
        &self,
        client_id: String,
        body: String,
        received_at: i64,
    ) -> Result<(), StoreError> {
        let row = InventoryRow {
            agent_id: client_id,
            size_bytes: body.len() as i64,
            body,
            received_at,
        };
        self.run(move |pool| {
            with_conn!(pool, c => diesel::insert_into(inventories::table)
                .values(&row)
                .on_conflict(inventories::agent_id)
                .do_update()
                .set((
                    inventories::body.eq(excluded(inventories::body)),
                    inventories::size_bytes.eq(excluded(inventories::size_bytes)),
                    inventories::received_at.eq(excluded(inventories::received_at)),
                ))
                .execute(c)?);
            Ok(())
        })
        .await
    }

    pub(crate) async fn get_inventory(
        &self,
        agent_id: String,
    ) -> Result<Option<InventoryRow>, StoreError> {
        self.run(move |pool| {
            with_conn!(pool, c => Ok(inventories::table
                .find(&agent_id)
                .select(InventoryRow::as_select())
                .first(c)
                .optional()?))
        })
        .await
    }
}
