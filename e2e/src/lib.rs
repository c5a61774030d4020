//! The end-to-end harness: the server and the chart proven together, on a kind cluster
//! (`e2e kind`) or on this machine with processes and nginx (`e2e local`).
//!
//! - [`agent`]: a protocol-correct simulated agent and fleets of them (also the base of
//!   load generators);
//! - [`target`]: the [`target::Target`] trait (a deployment target) the scenarios are
//!   written against;
//! - [`local`] and [`kind`]: the two targets;
//! - [`scenarios`]: websocket, ingress-timeouts, rolling-update, hpa, pod-kill;
//! - [`api`], [`tokens`], [`endpoint`]: clients of the deployment through its ingress;
//! - [`report`], [`wait`], [`values`]: figures, bounded waits, the chart's values;
//! - [`sim`]: the load generator behind `agent-sim` and `bench` (many cheap agents).
//!
//! `docs/e2e.md` describes what each target proves and how to run it.

pub mod agent;
pub mod api;
pub mod endpoint;
pub mod kind;
pub mod local;
pub mod report;
pub mod scenarios;
pub mod sim;
pub mod target;
pub mod tokens;
pub mod values;
pub mod wait;
