//! The agent protocol (version 2, which version-1 agents speak a subset of): the messages and close codes are the `agent-protocol`
//! crate's (`docs/protocol.md` is their prose version). What stays here is the server's
//! own: the metric label of each message, and the close frames it sends with the reason
//! recorded in metrics.

pub use agent_protocol::{
    AgentMessage as Inbound, CloseCode, ErrorCode, PROTOCOL_VERSION, ResultStatus,
    ServerMessage as Outbound, UpdateStatus,
};

use crate::metrics::{CloseReason, MessageType};

/// The metric label of a message.
pub(crate) trait Metered {
    fn metric_type(&self) -> MessageType;
}

impl Metered for Inbound {
    fn metric_type(&self) -> MessageType {
        match self {
            Inbound::Hello { .. } => MessageType::Hello,
            Inbound::Inventory { .. } => MessageType::Inventory,
            Inbound::Result { .. } => MessageType::Result,
            Inbound::Heartbeat => MessageType::Heartbeat,
            Inbound::UpdateResult { .. } => MessageType::UpdateResult,
        }
    }
}

impl Metered for Outbound<'_> {
    fn metric_type(&self) -> MessageType {
        match self {
            Outbound::Welcome { .. } => MessageType::Welcome,
            Outbound::Command { .. } => MessageType::Command,
            Outbound::Ack { .. } => MessageType::Ack,
            Outbound::HeartbeatAck { .. } => MessageType::HeartbeatAck,
            Outbound::Update { .. } => MessageType::Update,
            Outbound::Error { .. } => MessageType::Error,
            // Only parsed, never sent.
            Outbound::Unknown => MessageType::Invalid,
        }
    }
}

/// A close frame the server sends, with the reason recorded in metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Close {
    /// The close code (RFC 6455 §7.4): a standard one such as 1011 or 1012, or one of ours
    /// in 4000–4999 (`agent_protocol::CloseCode` and `docs/protocol.md` list them).
    pub code: u16,
    /// The close frame's reason text, short and stable enough for agents to log.
    pub reason: &'static str,
    /// The `reason` label of `agent_server_ws_sessions_closed_total`.
    pub metric: CloseReason,
}

impl Close {
    const fn new(code: CloseCode, metric: CloseReason) -> Self {
        Close {
            code: code.code(),
            reason: code.reason(),
            metric,
        }
    }
}

/// Silence for WS_OFFLINE_TIMEOUT. Reconnect.
pub(crate) const HEARTBEAT_TIMEOUT: Close =
    Close::new(CloseCode::HeartbeatTimeout, CloseReason::HeartbeatTimeout);
/// Another connection with the same client_id took over. Do not reconnect in a loop:
/// two agents share an id.
pub(crate) const REPLACED: Close = Close::new(CloseCode::Replaced, CloseReason::Replaced);
/// An operator deleted the agent.
pub(crate) const DELETED: Close = Close::new(CloseCode::Deleted, CloseReason::Deleted);
/// The agent's credentials were revoked (`POST /api/v1/agents/{id}/revoke` or token
/// revocation). Same code as a deletion: the agent's next step is the same (stop, or
/// enroll again), and agents written for protocol version 1 already handle it.
pub const REVOKED: Close = Close {
    reason: "credentials revoked",
    ..Close::new(CloseCode::Deleted, CloseReason::Deleted)
};
/// The token's `exp` passed during the connection. Reconnect with a fresh token.
pub(crate) const TOKEN_EXPIRED: Close =
    Close::new(CloseCode::TokenExpired, CloseReason::TokenExpired);
/// The agent did not read its frames in time. Reconnect.
pub(crate) const SLOW_CONSUMER: Close =
    Close::new(CloseCode::SlowConsumer, CloseReason::SlowConsumer);
/// The server could not record the connection. Reconnect with backoff.
pub(crate) const STORE_UNAVAILABLE: Close =
    Close::new(CloseCode::StoreUnavailable, CloseReason::StoreError);
/// A message over WS_MAX_MESSAGE_BYTES.
pub(crate) const TOO_BIG: Close = Close::new(CloseCode::TooBig, CloseReason::ProtocolError);
/// The pod is shutting down. Reconnect (after a short random delay).
pub(crate) const DRAINING: Close = Close::new(CloseCode::Restarting, CloseReason::Draining);
/// This pod holds more than its share of agents. Reconnect; the load balancer picks
/// another pod.
pub const REBALANCE: Close = Close {
    reason: "rebalancing",
    ..Close::new(CloseCode::Restarting, CloseReason::Rebalance)
};
