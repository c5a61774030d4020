//! agent-server: the server that fleets of host agents keep a WebSocket open to.
//!
//! `ARCHITECTURE.md` at the repository root maps these modules to the design.

pub mod app;
pub mod auth;
pub mod binaries;
pub mod cli;
pub mod config;
pub mod http;
pub mod hub;
pub mod ids;
pub mod metrics;
pub mod redact;
pub mod store;
pub mod telemetry;
pub mod ws;

pub use app::{AppState, Application};
pub use config::Config;
