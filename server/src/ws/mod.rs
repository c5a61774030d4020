//! The WebSocket session of each agent ([`session`]) and the messages it exchanges
//! ([`protocol`]). The upgrade that starts a session is an HTTP handler (`http/ws.rs`).

pub mod protocol;
pub(crate) mod session;

use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::config::Config;

/// Buffers sized for very many idle agents: tungstenite's defaults (128 KiB read buffer,
/// allocated and zero-filled up front) would cost ~135 KiB per connection. Agent messages
/// are small by protocol (large inventories go over HTTP) and a larger frame reserves what
/// it needs, so a 1 KiB read buffer suffices (docs/benchmarks.md, benchmark 1).
pub(crate) fn ws_config(config: &Config) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(1024)
        .write_buffer_size(4 * 1024)
        .max_write_buffer_size(1024 * 1024)
        .max_message_size(Some(config.ws_max_message_bytes))
        .max_frame_size(Some(config.ws_max_message_bytes))
}
