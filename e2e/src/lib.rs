//! The end-to-end harness: the server and the chart proven together.
//!
//! - [`agent`]: a protocol-correct simulated agent and fleets of them (also the base of
//!   load generators);
//! - [`api`], [`tokens`], [`endpoint`]: clients of the deployment through its ingress;
//! - [`report`], [`wait`]: figures and bounded waits.

pub mod agent;
pub mod api;
pub mod endpoint;
pub mod report;
pub mod tokens;
pub mod wait;
