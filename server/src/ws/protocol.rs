//! The agent protocol, version 1: JSON text messages tagged by `type`, and close codes.
//! `docs/protocol.md` is the prose version of this file; keep them in step.

use serde::{Deserialize, Serialize};

use crate::metrics::{CloseReason, MessageType};

pub const PROTOCOL_VERSION: u32 = 1;

/// Agent → server.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Inbound {
    Hello {
        #[serde(default)]
        version: Option<String>,
        #[serde(default)]
        hostname: Option<String>,
        #[serde(default)]
        os: Option<String>,
        #[serde(default)]
        arch: Option<String>,
        /// Free-form tags (`canary`, `region:eu`); a rollout may target one.
        #[serde(default)]
        labels: Option<Vec<String>>,
    },
    /// A small inventory; large ones go to `POST /api/v1/agents/{id}/inventory`.
    Inventory {
        data: serde_json::Value,
    },
    Result {
        id: String,
        status: ResultStatus,
        #[serde(default)]
        output: Option<serde_json::Value>,
    },
    Heartbeat,
}

impl Inbound {
    pub fn metric_type(&self) -> MessageType {
        match self {
            Inbound::Hello { .. } => MessageType::Hello,
            Inbound::Inventory { .. } => MessageType::Inventory,
            Inbound::Result { .. } => MessageType::Result,
            Inbound::Heartbeat => MessageType::Heartbeat,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ResultStatus {
    Ok,
    Error,
}

/// Server → agent.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Outbound<'a> {
    Welcome {
        protocol: u32,
        client_id: &'a str,
        pod: &'a str,
        epoch: i64,
        /// Seconds, as in the seed's configuration.
        heartbeat_interval: f64,
        offline_timeout: f64,
        server_version: &'static str,
    },
    Command {
        id: &'a str,
        name: &'a str,
        args: &'a serde_json::value::RawValue,
        /// Milliseconds since the Unix epoch.
        created_at: i64,
        #[serde(skip_serializing_if = "Option::is_none")]
        expires_at: Option<i64>,
    },
    /// The result for `id` is stored; the agent may forget it.
    Ack {
        id: &'a str,
    },
    HeartbeatAck {
        ts: i64,
    },
    /// Download this build (with the agent's own token), check its sha256, install it and
    /// reconnect: a hello reporting `version` completes the update.
    Update {
        rollout_id: &'a str,
        binary_id: &'a str,
        name: &'a str,
        version: &'a str,
        os: &'a str,
        arch: &'a str,
        url: &'a str,
        sha256: &'a str,
        size: i64,
    },
    /// A message was refused; the connection stays open.
    Error {
        code: &'static str,
        message: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a str>,
    },
}

impl Outbound<'_> {
    pub fn metric_type(&self) -> MessageType {
        match self {
            Outbound::Welcome { .. } => MessageType::Welcome,
            Outbound::Command { .. } => MessageType::Command,
            Outbound::Ack { .. } => MessageType::Ack,
            Outbound::HeartbeatAck { .. } => MessageType::HeartbeatAck,
            Outbound::Update { .. } => MessageType::Update,
            Outbound::Error { .. } => MessageType::Error,
        }
    }
}

/// A close frame the server sends, with the reason recorded in metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Close {
    pub code: u16,
    pub reason: &'static str,
    pub metric: CloseReason,
}

impl Close {
    const fn new(code: u16, reason: &'static str, metric: CloseReason) -> Self {
        Close {
            code,
            reason,
            metric,
        }
    }
}

/// Silence for WS_OFFLINE_TIMEOUT. Reconnect.
pub const HEARTBEAT_TIMEOUT: Close =
    Close::new(4000, "heartbeat timeout", CloseReason::HeartbeatTimeout);
/// Another connection with the same client_id took over. Do not reconnect in a loop:
/// two agents share an id.
pub const REPLACED: Close = Close::new(
    4001,
    "replaced by a newer connection",
    CloseReason::Replaced,
);
/// An operator deleted the agent.
pub const DELETED: Close = Close::new(4002, "agent deleted by an operator", CloseReason::Deleted);
/// The agent's credentials were revoked (`POST /api/v1/agents/{id}/revoke` or token
/// revocation). Same code as a deletion: the agent's next step is the same (stop, or
/// enroll again), and agents written for protocol version 1 already handle it.
pub const REVOKED: Close = Close::new(4002, "credentials revoked", CloseReason::Deleted);
/// The token's `exp` passed during the connection. Reconnect with a fresh token.
pub const TOKEN_EXPIRED: Close = Close::new(4003, "token expired", CloseReason::TokenExpired);
/// The agent did not read its frames in time. Reconnect.
pub const SLOW_CONSUMER: Close = Close::new(4008, "too slow to receive", CloseReason::SlowConsumer);
/// The server could not record the connection. Reconnect with backoff.
pub const STORE_UNAVAILABLE: Close =
    Close::new(1011, "storage unavailable", CloseReason::StoreError);
/// A message over WS_MAX_MESSAGE_BYTES.
pub const TOO_BIG: Close = Close::new(
    1009,
    "message too big; send large inventories over HTTP",
    CloseReason::ProtocolError,
);
/// The pod is shutting down. Reconnect (after a short random delay).
pub const DRAINING: Close = Close::new(1012, "server restarting", CloseReason::Draining);
/// This pod holds more than its share of agents. Reconnect; the load balancer picks
/// another pod.
pub const REBALANCE: Close = Close::new(1012, "rebalancing", CloseReason::Rebalance);
