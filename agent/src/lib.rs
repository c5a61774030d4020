//! The host agent: one WebSocket to agent-server (`docs/protocol.md`), the host's facts and
//! inventory, and commands run effectively once.
//!
//! - `config`: the TOML file and its `AGENT_*` overrides.
//! - `enroll`: trading an enroll secret for the agent's own token, kept in `state_dir`.
//! - `net`: TCP, proxy tunnel, TLS; the WebSocket and the HTTP inventory upload.
//! - `session`: the connection loop and the reconnect policy.
//! - `journal`: the on-disk record that makes redelivered commands run once.
//! - `commands`: `ping`, `exec`, plug-ins; `inventory`: the host's facts.

pub mod commands;
pub mod config;
pub mod enroll;
pub mod inventory;
pub mod journal;
pub mod net;
pub mod session;
