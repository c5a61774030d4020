//! agent-server: the server that fleets of host agents keep a WebSocket open to.
//!
//! `ARCHITECTURE.md` at the repository root maps these modules to the design.

pub mod app;
pub mod audit;
pub mod auth;
pub mod binaries;
pub mod cli;
pub mod config;
pub mod credentials;
pub mod error;
pub mod events;
pub(crate) mod http;
pub mod hub;
pub mod ids;
pub mod jobs;
pub mod lifecycle;
pub mod limits;
pub mod metrics;
pub mod redact;
pub(crate) mod secrets;
pub mod state;
pub mod storable;
pub mod store;
pub(crate) mod tasks;
pub mod telemetry;
pub mod ws;

/// Internals that the fuzz targets (`fuzz/`) drive directly; not an API.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::http::files::{ByteRange, byte_range, if_range_allows, none_match};
}

pub use app::Application;
pub use config::Config;
pub use state::AppState;
