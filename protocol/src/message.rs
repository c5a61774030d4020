//! JSON text messages, tagged by `type`. Unknown fields are ignored in both directions;
//! agents ignore server message types they do not know ([`ServerMessage::Unknown`]).

use std::borrow::Cow;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

/// Agent → server.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentMessage {
    /// Once after `welcome`; every field is optional. `version`, `os` and `arch` decide
    /// updates.
    Hello {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        hostname: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        os: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        arch: Option<String>,
        /// Free-form tags (`canary`, `region:eu`), up to 32; replace the stored labels when
        /// present. A rollout may target one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        labels: Option<Vec<String>>,
    },
    /// A small inventory (under `WS_MAX_MESSAGE_BYTES`); large ones go to
    /// `POST /api/v1/agents/{id}/inventory`.
    Inventory { data: Value },
    /// The outcome of command `id`; the first result for a command stands.
    Result {
        id: String,
        status: ResultStatus,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        output: Option<Value>,
    },
    /// Optional; answered with `heartbeat_ack`.
    Heartbeat,
    /// Protocol version 2: how the `update` of rollout `rollout_id` ended, sent by whichever
    /// build runs afterwards (the new one, or the previous one it was rolled back to).
    /// Answered with `ack` carrying the `rollout_id`; sent again on each connection until
    /// then.
    UpdateResult {
        rollout_id: String,
        /// The version the update was to install.
        version: String,
        status: UpdateStatus,
        /// Why it failed, for operators: at most a few hundred characters.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
}

impl AgentMessage {
    /// The message as one JSON text frame.
    pub fn to_json(&self) -> String {
        // Maps with string keys and plain values: serialising cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResultStatus {
    Ok,
    Error,
}

/// How an update ended (`update_result.status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpdateStatus {
    /// The new build runs and reached `welcome`.
    Ok,
    /// Refused, failed its check, or rolled back: the previous build runs.
    Failed,
}

impl UpdateStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            UpdateStatus::Ok => "ok",
            UpdateStatus::Failed => "failed",
        }
    }
}

/// Server → agent. Strings borrow when the server builds a message and are owned when an
/// agent parses one (`ServerMessage<'static>`, see [`ServerMessage::parse`]).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage<'a> {
    /// Always the first message. Intervals are in seconds.
    Welcome {
        protocol: u32,
        client_id: Cow<'a, str>,
        pod: Cow<'a, str>,
        /// Grows by one with every connection of this `client_id`; only the newest
        /// connection's results are accepted.
        epoch: i64,
        heartbeat_interval: f64,
        offline_timeout: f64,
        server_version: Cow<'a, str>,
    },
    /// Delivered at least once: agents deduplicate by `id`.
    Command {
        id: Cow<'a, str>,
        name: Cow<'a, str>,
        /// Any JSON value, passed through as the operator sent it.
        #[serde(deserialize_with = "raw_value")]
        args: Cow<'a, RawValue>,
        /// Milliseconds since the Unix epoch.
        created_at: i64,
        /// Milliseconds since the Unix epoch, when the command has a TTL.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expires_at: Option<i64>,
    },
    /// The result for `id` is stored; the agent may forget it.
    Ack { id: Cow<'a, str> },
    /// The answer to `heartbeat`: the server's time in ms since the Unix epoch.
    HeartbeatAck { ts: i64 },
    /// Download this build (with the agent's own token), check its sha256, install it and
    /// reconnect: a hello reporting `version` (or, from protocol version 2, an
    /// `update_result`) completes the update.
    Update {
        rollout_id: Cow<'a, str>,
        binary_id: Cow<'a, str>,
        name: Cow<'a, str>,
        version: Cow<'a, str>,
        os: Cow<'a, str>,
        arch: Cow<'a, str>,
        url: Cow<'a, str>,
        sha256: Cow<'a, str>,
        /// Bytes.
        size: i64,
        /// The rollout is a rollback: install `version` even if it is older than the one
        /// running. Absent (false) otherwise, and agents then refuse a downgrade.
        #[serde(default, skip_serializing_if = "is_false")]
        allow_downgrade: bool,
    },
    /// A message was refused; the connection stays open.
    Error {
        code: ErrorCode,
        message: Cow<'a, str>,
        /// The command the refused `result` was for.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<Cow<'a, str>>,
    },
    /// A type this version does not know: newer servers may add some, and agents ignore
    /// them.
    #[serde(other, skip_serializing)]
    Unknown,
}

impl ServerMessage<'_> {
    /// Parses one text frame into an owned message.
    pub fn parse(text: &str) -> Result<ServerMessage<'static>, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// The message as one JSON text frame.
    pub fn to_json(&self) -> String {
        // Only `Unknown` fails to serialise, and a server never builds one.
        serde_json::to_string(self).unwrap_or_default()
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Reads any JSON value as raw JSON. `RawValue` itself cannot be read inside an internally
/// tagged enum (serde buffers the content first), so this goes through a `Value`.
fn raw_value<'de, 'a, D: Deserializer<'de>>(d: D) -> Result<Cow<'a, RawValue>, D::Error> {
    let value = Value::deserialize(d)?;
    serde_json::value::to_raw_value(&value)
        .map(Cow::Owned)
        .map_err(serde::de::Error::custom)
}

/// Why the server refused a message (`error.code`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not JSON, or not a known type; or some labels of a hello were refused.
    InvalidMessage,
    /// Binary frames are not part of the protocol.
    BinaryNotSupported,
    /// A result for a command that does not exist or belongs to another agent.
    UnknownCommand,
    /// The server could not store the message; send it again later.
    StoreUnavailable,
    /// A code this version does not know.
    #[serde(other)]
    Other,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidMessage => "invalid_message",
            ErrorCode::BinaryNotSupported => "binary_not_supported",
            ErrorCode::UnknownCommand => "unknown_command",
            ErrorCode::StoreUnavailable => "store_unavailable",
            ErrorCode::Other => "other",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_args_survive_as_raw_json() {
        let text = r#"{"type":"command","id":"c1","name":"exec","args":{"program":"uptime","args":[]},"created_at":1}"#;
        let ServerMessage::Command { args, .. } = ServerMessage::parse(text).unwrap() else {
            panic!("a command");
        };
        let args: Value = serde_json::from_str(args.get()).unwrap();
        assert_eq!(args, serde_json::json!({"program": "uptime", "args": []}));
    }

    #[test]
    fn unknown_server_types_and_error_codes_are_tolerated() {
        assert!(matches!(
            ServerMessage::parse(r#"{"type":"shiny_new_thing","x":1}"#).unwrap(),
            ServerMessage::Unknown
        ));
        let ServerMessage::Error { code, .. } =
            ServerMessage::parse(r#"{"type":"error","code":"later_code","message":"m"}"#).unwrap()
        else {
            panic!("an error");
        };
        assert_eq!(code, ErrorCode::Other);
    }

    #[test]
    fn heartbeat_is_a_bare_type() {
        assert_eq!(AgentMessage::Heartbeat.to_json(), r#"{"type":"heartbeat"}"#);
    }

    #[test]
    fn update_result_carries_its_rollout_and_an_optional_error() {
        let ok = AgentMessage::UpdateResult {
            rollout_id: "r1".into(),
            version: "1.1.0".into(),
            status: UpdateStatus::Ok,
            error: None,
        };
        assert_eq!(
            ok.to_json(),
            r#"{"type":"update_result","rollout_id":"r1","version":"1.1.0","status":"ok"}"#
        );
        let failed: AgentMessage = serde_json::from_str(
            r#"{"type":"update_result","rollout_id":"r1","version":"1.1.0","status":"failed","error":"e"}"#,
        )
        .unwrap();
        assert!(matches!(
            failed,
            AgentMessage::UpdateResult {
                status: UpdateStatus::Failed,
                error: Some(_),
                ..
            }
        ));
    }

    #[test]
    fn an_update_without_allow_downgrade_does_not_allow_one() {
        let text = r#"{"type":"update","rollout_id":"r","binary_id":"b","name":"agent","version":"1.0.0","os":"linux","arch":"x86_64","url":"u","sha256":"s","size":1}"#;
        let ServerMessage::Update {
            allow_downgrade, ..
        } = ServerMessage::parse(text).unwrap()
        else {
            panic!("an update");
        };
        assert!(!allow_downgrade);
    }

    #[test]
    fn unknown_agent_types_are_refused() {
        assert!(serde_json::from_str::<AgentMessage>(r#"{"type":"bogus"}"#).is_err());
    }
}
