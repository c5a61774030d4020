//! The agent protocol, version 2 (`docs/protocol.md` is its prose version; keep them in
//! step): the JSON messages in both directions, the close codes with the reconnect policy
//! each implies, the token claims, and the `client_id` rule.
//!
//! The server, the agent, the simulators, the tests and the CLI all speak through these
//! types, so the wire contract is written once. The crate depends on serde alone.

mod auth;
mod client_id;
mod close;
mod message;
pub mod version;

pub use auth::{Claims, Role};
pub use client_id::{MAX_CLIENT_ID_LEN, check_client_id, client_id_from_hostname};
pub use close::{CloseCode, RESTART_DELAY_MAX, Reconnect, backoff_ceiling, refusal_policy};
pub use message::{AgentMessage, ErrorCode, ResultStatus, ServerMessage, UpdateStatus, raw_json};

/// The version the server speaks on `/ws/{client_id}` (`welcome.protocol`). Version 2
/// adds `update_result` (agent → server) to version 1, which the server still serves on
/// the same path: a version-1 agent never sends it.
pub const PROTOCOL_VERSION: u32 = 2;
