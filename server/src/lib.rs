//! agent-server: the server that fleets of host agents keep a WebSocket open to.
//!
//! `ARCHITECTURE.md` at the repository root maps these modules to the design.

pub(crate) mod app;
pub mod audit;
pub mod auth;
pub mod binaries;
pub mod brake;
pub mod cli;
pub mod config;
pub mod credentials;
pub mod error;
pub(crate) mod events;
pub(crate) mod http;
pub mod hub;
pub(crate) mod ids;
pub mod jobs;
pub(crate) mod lifecycle;
pub mod metrics;
pub(crate) mod redact;
pub(crate) mod secrets;
pub(crate) mod state;
pub(crate) mod storable;
pub mod store;
pub(crate) mod tasks;
pub mod telemetry;
pub mod ws;

pub use app::Application;
pub use config::Config;
pub use state::AppState;
