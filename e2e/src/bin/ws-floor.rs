//! ws-floor: the smallest server an agent-sim fleet can stay connected to, a bare
//! tokio-tungstenite server with agent-server's WebSocket buffers (`ws::ws_config`). The
//! idle benchmark runs it beside agent-server in the same run, so that agent-server's
//! memory per idle agent is printed next to what the WebSocket library alone costs on the
//! same machine, allocator and kernel (docs/benchmarks.md, benchmark 1).
//!
//! Per connection it does what any WebSocket server must: the opening handshake, a
//! `welcome` (agent-sim waits for one), a ping every `--heartbeat` seconds, and an answer
//! to each `heartbeat`. No store, no hub, no authentication.

use std::time::Duration;

use agent_protocol::ServerMessage;
use anyhow::Result;
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

#[derive(Parser)]
#[command(about = "A bare tokio-tungstenite server: the floor of memory per idle agent")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Seconds between server pings, as agent-server's WS_HEARTBEAT_INTERVAL.
    #[arg(long, default_value_t = 15)]
    heartbeat: u64,
}

/// agent-server's `ws::ws_config` with its default message limit (1 MiB).
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(1024)
        .write_buffer_size(4 * 1024)
        .max_write_buffer_size(1024 * 1024)
        .max_message_size(Some(1024 * 1024))
        .max_frame_size(Some(1024 * 1024))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    e2e::sim::net::raise_open_files_limit();
    let listener = TcpListener::bind(&args.listen).await?;
    // The benchmark reads the port from this line.
    println!("listening on {}", listener.local_addr()?);
    let heartbeat = Duration::from_secs(args.heartbeat.max(1));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            // Out of files: wait for connections to close rather than spin.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        tokio::spawn(serve(stream, heartbeat));
    }
}

async fn serve(stream: TcpStream, heartbeat: Duration) {
    let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(stream, Some(ws_config())).await
    else {
        return;
    };
    let welcome = ServerMessage::Welcome {
        protocol: 1,
        client_id: "floor".into(),
        pod: "ws-floor".into(),
        epoch: 1,
        heartbeat_interval: heartbeat.as_secs_f64(),
        offline_timeout: 4.0 * heartbeat.as_secs_f64(),
        server_version: env!("CARGO_PKG_VERSION").into(),
    };
    if ws.send(Message::text(welcome.to_json())).await.is_err() {
        return;
    }
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
    loop {
        tokio::select! {
            _ = ping.tick() => {
                if ws.send(Message::Ping(Default::default())).await.is_err() {
                    return;
                }
            }
            frame = ws.next() => match frame {
                Some(Ok(Message::Text(text))) if text.as_str().contains("\"heartbeat\"") => {
                    let ack = ServerMessage::HeartbeatAck { ts: 0 }.to_json();
                    if ws.send(Message::text(ack)).await.is_err() {
                        return;
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(_)) => {}
            },
        }
    }
}
