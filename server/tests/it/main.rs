//! Integration tests over real sockets, on SQLite and on PostgreSQL (TEST_POSTGRES_URL,
//! default postgres://postgres@127.0.0.1:5432/postgres; each test gets its own database).

// The helpers are shared by the test modules of this one binary, which nothing links
// against: `pub` is their natural visibility and `pub(crate)` would say nothing more.
#![allow(unreachable_pub)]

mod certs;
mod helpers;
mod host_agent;
mod netns;
mod procs;

mod api;
mod binaries;
mod browser;
mod cluster;
mod commands;
mod credentials;
mod credentials_http;
mod documents;
mod drain;
mod group_commit;
mod http;
mod jobs;
mod jobs_http;
mod netcut;
mod openapi;
mod outage;
mod process;
mod redis_ha;
mod reliability;
mod rollouts;
mod secrets;
mod store;
mod tls;
mod ui;
mod websocket;
