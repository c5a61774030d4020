//! The host agent: one WebSocket to agent-server (`docs/protocol.md`), the host's facts and
//! inventory, and commands run effectively once.
//!
//! - `config`: the TOML file and its `AGENT_*` overrides.
//! - `enroll`: trading an enroll secret for the agent's own token, kept in `state_dir`.
//! - `net`: TCP, proxy tunnel, TLS; the WebSocket and the HTTP inventory upload.
//! - `session`: the connection loop and the reconnect policy.
//! - `journal`: the on-disk record that makes redelivered commands run once.
//! - `commands`: `ping`, `exec`, plug-ins; `inventory`: the host's facts.
//! - `update`: self-update on `update` (download, check, switch, roll back, report).

pub mod commands;
pub mod config;
pub mod enroll;
pub mod inventory;
pub mod journal;
pub mod net;
pub mod session;
pub mod update;

/// The version this build reports (hello, `--version`, `--self-check`): the crate's,
/// unless `AGENT_VERSION` was set when it was compiled, so that one source can produce
/// builds of different versions (release pipelines, tests of updates).
pub const VERSION: &str = match option_env!("AGENT_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};
