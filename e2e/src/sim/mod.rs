//! The agent simulator: very many protocol-correct agents for little memory each.
//!
//! It is a load generator, not a test agent: one task per agent, a small tungstenite read
//! buffer, no per-agent queue, counters shared by the whole fleet, and the tokio timer
//! wheel for heartbeats (one timer entry per agent, no per-agent thread or interval
//! task). What each agent does is in [`agent`]; [`fleet`] starts and stops many of them and
//! reports a [`stats::Snapshot`] that `agent-sim` prints and `bench` reads.
//!
//! - [`agent`]: connect, `hello`, heartbeats, `result` for each `command`, inventory (over
//!   HTTP when it is too big for a WebSocket message), reconnection with full-jitter
//!   exponential backoff, moving to the next server when one refuses.
//! - [`net`]: connections from several loopback source addresses, so the ephemeral port
//!   range (about 28,000 ports per source address and destination) is no limit.
//! - [`tokens`]: agent tokens minted with the server's own code and key, or by its API.
//! - [`inventory`]: valid JSON documents of an exact size.
//! - [`backoff`]: full-jitter exponential backoff.

pub mod agent;
pub mod backoff;
pub mod fleet;
pub mod inventory;
pub mod net;
pub mod stats;
pub mod tokens;

pub use fleet::{Fleet, FleetConfig, Receipt, ReceiptLine, Server, monotonic_ns};
pub use stats::Snapshot;
