//! JSON text messages, tagged by `type`. Unknown fields are ignored in both directions;
//! agents ignore server message types they do not know ([`ServerMessage::Unknown`]).
//!
//! The JSON documents a message carries (command `args`, result `output`, inventory
//! `data`) are kept as raw JSON ([`RawValue`]): they reach the other side byte for byte as
//! their sender wrote them, with integers beyond 64 bits, exponents like `1e400` and key
//! order intact. serde's internally tagged enums buffer every field in a tree that cannot
//! hold raw JSON, so both enums are read by hand ([`Fields`]): every field is captured raw
//! first, then the fields of the message's `type` are decoded.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use serde::de::{DeserializeOwned, Error as _, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;

/// Agent → server.
#[derive(Clone, Debug, Serialize)]
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
    /// `POST /api/v1/agents/{id}/inventory`. Any JSON document but `null`, kept raw.
    Inventory { data: Box<RawValue> },
    /// The outcome of command `id`; the first result for a command stands. `output` is
    /// any JSON document, kept raw; `null` is the same as none.
    Result {
        id: String,
        status: ResultStatus,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        output: Option<Box<RawValue>>,
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

/// Every field of a message, raw, and its `type`: what a message is read from before the
/// fields of its type are decoded. `null` counts as absent; a field given twice is refused
/// (which one would count is anybody's guess).
struct Fields {
    kind: String,
    fields: BTreeMap<String, Box<RawValue>>,
}

impl Fields {
    /// Field `name`, which must be present.
    fn required<T: DeserializeOwned, E: serde::de::Error>(
        &self,
        name: &'static str,
    ) -> Result<T, E> {
        self.optional(name)?.ok_or_else(|| E::missing_field(name))
    }

    /// Field `name`, absent or `null` being `None`.
    fn optional<T: DeserializeOwned, E: serde::de::Error>(
        &self,
        name: &'static str,
    ) -> Result<Option<T>, E> {
        match self.fields.get(name).filter(|raw| raw.get() != "null") {
            Some(raw) => serde_json::from_str(raw.get())
                .map(Some)
                .map_err(|e| E::custom(format_args!("field `{name}`: {e}"))),
            None => Ok(None),
        }
    }

    /// Field `name` as raw JSON, absent or `null` being `None`.
    fn raw(&mut self, name: &str) -> Option<Box<RawValue>> {
        self.fields.remove(name).filter(|raw| raw.get() != "null")
    }
}

impl<'de> Deserialize<'de> for Fields {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Object;
        impl<'de> Visitor<'de> for Object {
            type Value = Fields;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object with a `type`")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields, A::Error> {
                let mut fields = BTreeMap::new();
                while let Some(key) = map.next_key::<String>()? {
                    let value: Box<RawValue> = map.next_value()?;
                    if fields.contains_key(&key) {
                        return Err(A::Error::custom(format_args!("duplicate field `{key}`")));
                    }
                    fields.insert(key, value);
                }
                let kind = fields
                    .remove("type")
                    .ok_or_else(|| A::Error::missing_field("type"))?;
                let kind = serde_json::from_str(kind.get())
                    .map_err(|e| A::Error::custom(format_args!("field `type`: {e}")))?;
                Ok(Fields { kind, fields })
            }
        }
        d.deserialize_map(Object)
    }
}

impl<'de> Deserialize<'de> for AgentMessage {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut f = Fields::deserialize(d)?;
        Ok(match f.kind.as_str() {
            "hello" => AgentMessage::Hello {
                version: f.optional("version")?,
                hostname: f.optional("hostname")?,
                os: f.optional("os")?,
                arch: f.optional("arch")?,
                labels: f.optional("labels")?,
            },
            "inventory" => AgentMessage::Inventory {
                data: f
                    .raw("data")
                    .ok_or_else(|| D::Error::missing_field("data"))?,
            },
            "result" => AgentMessage::Result {
                id: f.required("id")?,
                status: f.required("status")?,
                output: f.raw("output"),
            },
            "heartbeat" => AgentMessage::Heartbeat,
            "update_result" => AgentMessage::UpdateResult {
                rollout_id: f.required("rollout_id")?,
                version: f.required("version")?,
                status: f.required("status")?,
                error: f.optional("error")?,
            },
            other => {
                return Err(D::Error::unknown_variant(
                    other,
                    &["hello", "inventory", "result", "heartbeat", "update_result"],
                ));
            }
        })
    }
}

/// `value` as the raw JSON a message carries (`output`, `data`).
pub fn raw_json(value: &serde_json::Value) -> Box<RawValue> {
    // A `Value` has string keys only: it always serialises.
    serde_json::value::to_raw_value(value).unwrap_or_else(|_| RawValue::NULL.to_owned())
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
#[derive(Clone, Debug, Serialize)]
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
        /// Any JSON value, passed through byte for byte as the operator sent it.
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
    #[serde(skip_serializing)]
    Unknown,
}

impl ServerMessage<'_> {
    /// Parses one text frame into an owned message; a `type` this version does not know
    /// is [`ServerMessage::Unknown`].
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

impl<'de> Deserialize<'de> for ServerMessage<'static> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut f = Fields::deserialize(d)?;
        let owned = |s: String| Cow::Owned(s);
        Ok(match f.kind.as_str() {
            "welcome" => ServerMessage::Welcome {
                protocol: f.required("protocol")?,
                client_id: owned(f.required("client_id")?),
                pod: owned(f.required("pod")?),
                epoch: f.required("epoch")?,
                heartbeat_interval: f.required("heartbeat_interval")?,
                offline_timeout: f.required("offline_timeout")?,
                server_version: owned(f.required("server_version")?),
            },
            "command" => ServerMessage::Command {
                id: owned(f.required("id")?),
                name: owned(f.required("name")?),
                args: Cow::Owned(f.raw("args").unwrap_or_else(|| RawValue::NULL.to_owned())),
                created_at: f.required("created_at")?,
                expires_at: f.optional("expires_at")?,
            },
            "ack" => ServerMessage::Ack {
                id: owned(f.required("id")?),
            },
            "heartbeat_ack" => ServerMessage::HeartbeatAck {
                ts: f.required("ts")?,
            },
            "update" => ServerMessage::Update {
                rollout_id: owned(f.required("rollout_id")?),
                binary_id: owned(f.required("binary_id")?),
                name: owned(f.required("name")?),
                version: owned(f.required("version")?),
                os: owned(f.required("os")?),
                arch: owned(f.required("arch")?),
                url: owned(f.required("url")?),
                sha256: owned(f.required("sha256")?),
                size: f.required("size")?,
                allow_downgrade: f.optional("allow_downgrade")?.unwrap_or(false),
            },
            "error" => ServerMessage::Error {
                code: f.required("code")?,
                message: owned(f.required("message")?),
                id: f.optional::<String, _>("id")?.map(owned),
            },
            _ => ServerMessage::Unknown,
        })
    }
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
    fn command_args_arrive_byte_for_byte() {
        let args = r#"{"program":"zfs","n":18446744073709551616,"b":1,"a":2,"x":1e400}"#;
        let text =
            format!(r#"{{"type":"command","id":"c1","name":"exec","args":{args},"created_at":1}}"#);
        let ServerMessage::Command { args: got, .. } = ServerMessage::parse(&text).unwrap() else {
            panic!("a command");
        };
        assert_eq!(got.get(), args);
    }

    #[test]
    fn documents_from_agents_are_kept_byte_for_byte() {
        let data = r#"{"zpool_bytes": 18446744073709551616, "b": 1, "a": [1e400]}"#;
        let text = format!(r#"{{"type":"inventory","data":{data}}}"#);
        let AgentMessage::Inventory { data: got } = serde_json::from_str(&text).unwrap() else {
            panic!("an inventory");
        };
        assert_eq!(got.get(), data);
        let text = format!(r#"{{"status":"ok","output":{data},"type":"result","id":"c1"}}"#);
        let AgentMessage::Result { output, .. } = serde_json::from_str(&text).unwrap() else {
            panic!("a result");
        };
        assert_eq!(output.unwrap().get(), data);
    }

    #[test]
    fn fields_of_other_types_are_ignored_and_a_field_given_twice_is_refused() {
        let hello: AgentMessage =
            serde_json::from_str(r#"{"type":"hello","status":[1],"version":"1.0","x":{}}"#)
                .unwrap();
        assert!(matches!(hello, AgentMessage::Hello { version: Some(v), .. } if v == "1.0"));
        let e = serde_json::from_str::<AgentMessage>(r#"{"type":"result","id":"a","id":"b"}"#)
            .unwrap_err();
        assert!(e.to_string().contains("duplicate field `id`"), "{e}");
        let e = serde_json::from_str::<AgentMessage>(r#"{"type":"result","id":5,"status":"ok"}"#)
            .unwrap_err();
        assert!(e.to_string().contains("field `id`"), "{e}");
        let e =
            serde_json::from_str::<AgentMessage>(r#"{"type":"result","status":"ok"}"#).unwrap_err();
        assert!(e.to_string().contains("missing field `id`"), "{e}");
        let e = serde_json::from_str::<AgentMessage>(r#"{"type":"inventory","data":null}"#)
            .unwrap_err();
        assert!(e.to_string().contains("missing field `data`"), "{e}");
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
