//! One simulated agent: a single task that connects, speaks protocol version 1
//! (`docs/protocol.md`) and reconnects, until the fleet stops.
//!
//! Per agent it holds the WebSocket (a small read buffer, no write buffer), its client id,
//! two timer entries and a few integers; everything else is shared by the fleet.

use std::sync::Arc;
use std::time::Duration;

use agent_protocol::{AgentMessage, CloseCode, ErrorCode, Reconnect, ResultStatus, ServerMessage};
use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::header::{AUTHORIZATION, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{WebSocketStream, client_async_with_config};

use super::backoff::uniform;
use super::fleet::{Inventory, Receipt, Shared};
use super::net::connect_from;
use super::stats::ConnectFailure;

type Ws = WebSocketStream<TcpStream>;

/// How a connection ended.
enum End {
    /// The fleet is stopping; we closed with 1000.
    Stopped,
    /// Churn mode: we closed after the hold time.
    Churned,
    /// The server closed with this code.
    Closed(u16),
    /// Lost without a close frame: reset, EOF, a killed server.
    Dropped,
}

/// `AgentMessage::Heartbeat` as text, written once: heartbeats are the simulator's most
/// frequent message.
const HEARTBEAT: &str = r#"{"type":"heartbeat"}"#;

/// Far enough in the future to mean "never" for a timer.
const NEVER: Duration = Duration::from_secs(86_400 * 365);
/// Delay before sending again a result the server could not store (`store_unavailable`),
/// as the reference agent waits.
const STORE_RETRY: Duration = Duration::from_secs(5);

/// What a server message asks of the agent.
enum Handled {
    Done,
    /// The connection failed.
    Failed,
    /// The server could not store the result of this command: send it again later.
    Unstored(String),
}

pub(crate) async fn run(shared: Arc<Shared>, index: u32) {
    let cfg = &shared.cfg;
    let id = cfg.client_id(index);
    let mut server = cfg
        .start_on
        .unwrap_or(index as usize % cfg.servers.len())
        .min(cfg.servers.len() - 1);
    let mut attempt = 0u32;
    let mut inventory_sent = false;
    let mut replaced_in_a_row = 0u32;
    loop {
        if shared.stop.is_cancelled() {
            return;
        }
        let delay = match connect(&shared, &id, index, server).await {
            Err(why) => {
                shared.stats.connect_failed(why);
                // Another replica may answer: move on, as a client with several
                // endpoints (or a load balancer that noticed) would.
                server = (server + 1) % cfg.servers.len();
                let d = cfg.backoff.delay(attempt);
                attempt = attempt.saturating_add(1);
                d
            }
            Ok((ws, heartbeat_ms)) => {
                shared.stats.connected(index as usize, server, heartbeat_ms);
                let send_inventory = !inventory_sent && shared.inventory.is_some();
                let end = session(&shared, ws, &id, index, server, send_inventory).await;
                inventory_sent |= send_inventory;
                shared.stats.disconnected(index as usize, server);
                attempt = 0;
                if !matches!(end, End::Closed(c) if CloseCode::from(c) == CloseCode::Replaced) {
                    replaced_in_a_row = 0;
                }
                match end {
                    End::Stopped => return,
                    End::Churned => {
                        shared.stats.churn_cycles.fetch_add(1, RELAXED);
                        cfg.churn_pause
                    }
                    End::Closed(code) => {
                        shared.stats.closed_by_server(code);
                        match CloseCode::from(code).policy() {
                            // An operator deleted the agent: only an operator can fix it.
                            Reconnect::Stop => {
                                shared.stats.gave_up.fetch_add(1, RELAXED);
                                return;
                            }
                            // Replaced once may be our own earlier connection (an upgrade
                            // the server took from its backlog after we had given up on
                            // it): back off and reconnect, as the host agent does. Twice
                            // in a row means another process uses this id; the host agent
                            // then waits minutes, the simulator stops.
                            Reconnect::AnotherHost => {
                                replaced_in_a_row += 1;
                                if replaced_in_a_row >= 2 {
                                    shared.stats.gave_up.fetch_add(1, RELAXED);
                                    return;
                                }
                                attempt = 1;
                                cfg.backoff.delay(0)
                            }
                            // Restarting or rebalancing: a short random delay, then
                            // any replica, as a load balancer spreads reconnections
                            // (back to the same one, rebalancing could never work).
                            Reconnect::Soon => {
                                server = rand::rng().random_range(0..cfg.servers.len());
                                uniform(cfg.restart_delay)
                            }
                            // Token expired: a fresh one is minted on every connection.
                            Reconnect::RenewToken => Duration::ZERO,
                            Reconnect::Backoff => {
                                attempt = 1;
                                cfg.backoff.delay(0)
                            }
                        }
                    }
                    End::Dropped => {
                        shared.stats.drops.fetch_add(1, RELAXED);
                        attempt = 1;
                        cfg.backoff.delay(0)
                    }
                }
            }
        };
        tokio::select! {
            _ = shared.stop.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

const RELAXED: std::sync::atomic::Ordering = std::sync::atomic::Ordering::Relaxed;

/// TCP connect from this agent's source address, the upgrade with its token, and the
/// `welcome`; returns the socket and the server's heartbeat interval in ms.
async fn connect(
    shared: &Shared,
    id: &str,
    index: u32,
    server: usize,
) -> Result<(Ws, u64), ConnectFailure> {
    let cfg = &shared.cfg;
    let target = &cfg.servers[server];
    let source = (!cfg.sources.is_empty()).then(|| cfg.sources[index as usize % cfg.sources.len()]);
    let token = shared
        .tokens
        .agent(id)
        .await
        .map_err(|_| ConnectFailure::Other)?;
    let attempt = async {
        let stream = connect_from(source, target.addr)
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::ConnectionRefused => ConnectFailure::Refused,
                _ => ConnectFailure::Other,
            })?;
        let mut req = format!("ws://{}/ws/{id}", target.addr)
            .into_client_request()
            .map_err(|_| ConnectFailure::Other)?;
        let bearer =
            HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| ConnectFailure::Other)?;
        req.headers_mut().insert(AUTHORIZATION, bearer);
        let (mut ws, _) = client_async_with_config(req, stream, Some(shared.ws_config))
            .await
            .map_err(|e| match e {
                WsError::Http(resp) => ConnectFailure::Status(resp.status().as_u16()),
                _ => ConnectFailure::Other,
            })?;
        // `welcome` is always the first message.
        match ws.next().await {
            Some(Ok(Message::Text(text))) => match ServerMessage::parse(&text) {
                Ok(ServerMessage::Welcome {
                    heartbeat_interval, ..
                }) => Ok((ws, (heartbeat_interval * 1000.0) as u64)),
                _ => Err(ConnectFailure::Other),
            },
            _ => Err(ConnectFailure::Other),
        }
    };
    match timeout(cfg.connect_timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(ConnectFailure::Timeout),
    }
}

async fn session(
    shared: &Shared,
    mut ws: Ws,
    id: &str,
    index: u32,
    server: usize,
    send_inventory: bool,
) -> End {
    let stats = &shared.stats;
    let hello = AgentMessage::Hello {
        version: Some(concat!("agent-sim/", env!("CARGO_PKG_VERSION")).into()),
        hostname: Some(id.into()),
        os: Some(std::env::consts::OS.into()),
        arch: Some(std::env::consts::ARCH.into()),
        labels: None,
    };
    if ws.send(Message::text(hello.to_json())).await.is_err() {
        return End::Dropped;
    }
    if send_inventory && !send_inventory_now(shared, &mut ws, id, server).await {
        return End::Dropped;
    }

    let mut heartbeat_rx = shared.heartbeat.subscribe();
    let mut every = *heartbeat_rx.borrow_and_update();
    let heartbeat = tokio::time::sleep(first_heartbeat(every));
    tokio::pin!(heartbeat);
    let hold = shared
        .cfg
        .hold
        .map_or(NEVER, |h| h.mul_f64(0.5) + uniform(h));
    let hold = tokio::time::sleep(hold);
    tokio::pin!(hold);
    // Results to send again when `retry` fires; empty almost always.
    let mut unstored: Vec<String> = Vec::new();
    let retry = tokio::time::sleep(NEVER);
    tokio::pin!(retry);

    loop {
        tokio::select! {
            _ = shared.stop.cancelled() => {
                close(&mut ws).await;
                return End::Stopped;
            }
            _ = &mut hold => {
                close(&mut ws).await;
                return End::Churned;
            }
            changed = heartbeat_rx.changed() => {
                if changed.is_err() {
                    // The fleet is gone; the stop signal follows.
                    continue;
                }
                every = *heartbeat_rx.borrow_and_update();
                heartbeat.as_mut().reset(Instant::now() + first_heartbeat(every));
            }
            _ = &mut retry, if !unstored.is_empty() => {
                for id in std::mem::take(&mut unstored) {
                    stats.results_resent.fetch_add(1, RELAXED);
                    if ws.send(Message::text(result_for(&id, "resent"))).await.is_err() {
                        return End::Dropped;
                    }
                }
            }
            _ = &mut heartbeat => {
                heartbeat.as_mut().reset(Instant::now() + if every.is_zero() { NEVER } else { every });
                stats.heartbeats.fetch_add(1, RELAXED);
                if ws.send(Message::text(HEARTBEAT)).await.is_err() {
                    return End::Dropped;
                }
            }
            frame = ws.next() => {
                let msg = match frame {
                    Some(Ok(msg)) => msg,
                    Some(Err(_)) | None => return End::Dropped,
                };
                stats.heard(index as usize);
                match msg {
                    Message::Text(text) => match on_text(shared, &mut ws, index, &text).await {
                        Handled::Done => {}
                        Handled::Failed => return End::Dropped,
                        Handled::Unstored(id) => {
                            if unstored.is_empty() {
                                retry.as_mut().reset(Instant::now() + STORE_RETRY);
                            }
                            unstored.push(id);
                        }
                    },
                    Message::Ping(_) => {
                        stats.pings.fetch_add(1, RELAXED);
                        // tungstenite queued the pong; send it now rather than with the
                        // next read.
                        if ws.flush().await.is_err() {
                            return End::Dropped;
                        }
                    }
                    Message::Close(frame) => {
                        let code = frame.map_or(1005, |f| u16::from(f.code));
                        // Let tungstenite send the reply and see the end of the stream.
                        let _ = timeout(Duration::from_secs(2), async {
                            while let Some(Ok(_)) = ws.next().await {}
                        })
                        .await;
                        return End::Closed(code);
                    }
                    _ => {}
                }
            }
        }
    }
}

/// A random phase within the first interval, so heartbeats spread over the fleet.
fn first_heartbeat(every: Duration) -> Duration {
    if every.is_zero() {
        NEVER
    } else {
        uniform(every)
    }
}

/// The `result` of a command: every command succeeds here.
fn result_for(id: &str, ran: &str) -> String {
    AgentMessage::Result {
        id: id.to_string(),
        status: ResultStatus::Ok,
        output: Some(agent_protocol::raw_json(&serde_json::json!({ "ran": ran }))),
    }
    .to_json()
}

/// Handles one server message.
async fn on_text(shared: &Shared, ws: &mut Ws, index: u32, text: &str) -> Handled {
    let stats = &shared.stats;
    // The parsed message is dropped before the await below, so it never becomes part of
    // the agent's task state: idle agents stay as small as before the typed messages.
    let (id, result) = match ServerMessage::parse(text) {
        Ok(ServerMessage::Command { id, name, .. }) => {
            // Running a command is instant and idempotent here, so a command delivered
            // again (at-least-once delivery) is answered again with the same result,
            // which is what the protocol asks of agents that already ran it.
            let result = result_for(&id, &name);
            (id.into_owned(), result)
        }
        Ok(ServerMessage::Ack { .. }) => {
            stats.acks.fetch_add(1, RELAXED);
            return Handled::Done;
        }
        Ok(ServerMessage::HeartbeatAck { .. }) => {
            stats.heartbeat_acks.fetch_add(1, RELAXED);
            return Handled::Done;
        }
        Ok(ServerMessage::Error { code, id, .. }) => {
            stats.errors.fetch_add(1, RELAXED);
            return match (code, id) {
                (ErrorCode::StoreUnavailable, Some(id)) => Handled::Unstored(id.into_owned()),
                _ => Handled::Done,
            };
        }
        Ok(_) | Err(_) => return Handled::Done,
    };
    let at = std::time::Instant::now();
    stats.commands.fetch_add(1, RELAXED);
    let sent = ws.send(Message::text(result)).await.is_ok();
    if sent {
        stats.results.fetch_add(1, RELAXED);
    }
    if let Some(tx) = &shared.receipts {
        let _ = tx.send(Receipt {
            agent: index,
            command_id: id,
            at,
        });
    }
    if sent { Handled::Done } else { Handled::Failed }
}

/// Sends the inventory: as a message when small, over HTTP with the agent's own token
/// when big. False when the WebSocket failed.
async fn send_inventory_now(shared: &Shared, ws: &mut Ws, id: &str, server: usize) -> bool {
    let stats = &shared.stats;
    match &shared.inventory {
        None => true,
        Some(Inventory::WebSocket(text)) => {
            let ok = ws.send(Message::Text(text.clone())).await.is_ok();
            if ok {
                stats.inventories.fetch_add(1, RELAXED);
            }
            ok
        }
        Some(Inventory::Http(body)) => {
            let server = &shared.cfg.servers[server];
            let uploaded = async {
                let token = shared.tokens.agent(id).await.ok()?;
                let resp = shared
                    .http
                    .post(format!("{}/api/v1/agents/{id}/inventory", server.base))
                    .bearer_auth(token)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await
                    .ok()?;
                resp.status().is_success().then_some(())
            }
            .await;
            match uploaded {
                Some(()) => stats.inventories.fetch_add(1, RELAXED),
                None => stats.inventory_failures.fetch_add(1, RELAXED),
            };
            true
        }
    }
}

/// Closes with 1000 and waits briefly for the server's reply.
async fn close(ws: &mut Ws) {
    let frame = CloseFrame {
        code: WsCloseCode::Normal,
        reason: "".into(),
    };
    let _ = timeout(Duration::from_secs(2), async {
        if ws.close(Some(frame)).await.is_ok() {
            while let Some(Ok(_)) = ws.next().await {}
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cached_heartbeat_is_the_protocols() {
        assert_eq!(HEARTBEAT, AgentMessage::Heartbeat.to_json());
    }
}
