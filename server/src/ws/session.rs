//! One agent's WebSocket session: welcome, command delivery, heartbeats, results, close.
//!
//! The session is a single task that owns its socket. Everything else reaches it through
//! its [`SessionHandle`]: a wake-up (commands may be waiting in the store) or a close
//! request. It never buffers commands in memory: each wake-up reads them from the store,
//! so a slow or disconnected agent costs nothing but its socket.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use serde_json::value::RawValue;
use tokio::time::{Instant, MissedTickBehavior, timeout};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use super::protocol::{
    self, Close, ErrorCode, Inbound, Metered, Outbound, PROTOCOL_VERSION, ResultStatus,
};
use crate::auth::unix_now;
use crate::binaries::{Rollouts, rollout};
use crate::config::Config;
use crate::error::error_chain;
use crate::hub::{Hub, SessionHandle};
use crate::metrics::{CloseReason, Direction, MessageType, Metrics};
use crate::store::{CommandStatus, Hello, ResultOutcome, Store, now_ms};

type Socket = WebSocketStream<TokioIo<Upgraded>>;

/// Commands read from the store per round trip.
const BATCH: i64 = 100;
/// How long to wait for the agent's answer to our close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// What every session of this replica shares: the handles it uses and its settings.
pub struct SessionContext {
    pub(crate) store: Store,
    pub(crate) hub: Hub,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) rollouts: Rollouts,
    /// POD_ID, announced in the welcome and recorded with the connection.
    pub(crate) pod_id: String,
    /// HEARTBEAT_INTERVAL: how often the server pings.
    pub(crate) heartbeat_interval: Duration,
    /// OFFLINE_TIMEOUT: silence after which the session is closed.
    pub(crate) offline_timeout: Duration,
    /// WS_SEND_TIMEOUT: how long one frame may wait for a slow agent.
    pub(crate) send_timeout: Duration,
}

impl SessionContext {
    /// The context, from the configuration and the replica's handles.
    pub(crate) fn new(
        config: &Config,
        store: Store,
        hub: Hub,
        metrics: Arc<Metrics>,
        rollouts: Rollouts,
    ) -> Self {
        SessionContext {
            store,
            hub,
            metrics,
            rollouts,
            pod_id: config.pod_id.clone(),
            heartbeat_interval: config.heartbeat_interval,
            offline_timeout: config.offline_timeout,
            send_timeout: config.ws_send_timeout,
        }
    }
}

/// How a session ended.
enum End {
    /// The server closes, with a code the agent can act on.
    Server(Close),
    /// The agent sent a close frame.
    ClientClosed,
    /// The transport failed (reset, EOF without close).
    Network(String),
}

/// Runs one agent's session until it ends, recording its connection and disconnection.
pub async fn run(state: Arc<SessionContext>, mut ws: Socket, client_id: String, token_exp: u64) {
    let epoch = match state
        .store
        .agent_connected(client_id.clone(), state.pod_id.clone())
        .await
    {
        Ok(epoch) => epoch,
        Err(e) => {
            state.metrics.store_errors.inc();
            tracing::error!(agent = %client_id, error = %error_chain(&e), "could not record connection");
            close_socket(&mut ws, protocol::STORE_UNAVAILABLE).await;
            state.metrics.closed(CloseReason::StoreError);
            return;
        }
    };
    let handle = match state.hub.connect(&client_id, epoch, now_ms()).await {
        Ok(handle) => handle,
        Err(_) => {
            close_socket(&mut ws, protocol::REPLACED).await;
            state.metrics.closed(CloseReason::Replaced);
            return;
        }
    };
    tracing::info!(agent = %client_id, epoch, "agent connected");

    let mut session = Session {
        state: state.clone(),
        ws,
        handle: handle.clone(),
        token_exp,
    };
    let end = session.serve().await;
    let reason = match &end {
        End::Server(close) => {
            close_socket(&mut session.ws, *close).await;
            close.metric
        }
        End::ClientClosed => {
            // tungstenite queued the reply to the agent's close frame; send it.
            let _ = timeout(CLOSE_GRACE, session.ws.flush()).await;
            CloseReason::ClientClosed
        }
        End::Network(_) => CloseReason::NetworkError,
    };

    state.hub.disconnect(&handle).await;
    if let Err(e) = state
        .store
        .agent_disconnected(client_id.clone(), epoch, handle.last_inbound_ms())
        .await
    {
        state.metrics.store_errors.inc();
        tracing::error!(agent = %client_id, error = %error_chain(&e), "could not record disconnection");
    }
    state.metrics.closed(reason);
    match end {
        End::Network(detail) => {
            tracing::info!(agent = %client_id, epoch, ?reason, detail, "agent disconnected")
        }
        _ => tracing::info!(agent = %client_id, epoch, ?reason, "agent disconnected"),
    }
}

/// Sends our close frame and waits briefly for the agent's, so the close is clean.
async fn close_socket(ws: &mut Socket, close: Close) {
    let frame = CloseFrame {
        code: CloseCode::from(close.code),
        reason: close.reason.into(),
    };
    let _ = timeout(CLOSE_GRACE, async {
        if ws.send(Message::Close(Some(frame))).await.is_ok() {
            while let Some(Ok(_)) = ws.next().await {}
        }
    })
    .await;
}

struct Session {
    state: Arc<SessionContext>,
    ws: Socket,
    handle: Arc<SessionHandle>,
    /// The token's `exp`: the session ends when its credential does.
    token_exp: u64,
}

impl Session {
    async fn serve(&mut self) -> End {
        let config = self.state.clone();
        let handle = self.handle.clone();
        let welcome = Outbound::Welcome {
            protocol: PROTOCOL_VERSION,
            client_id: handle.client_id.as_str().into(),
            pod: config.pod_id.as_str().into(),
            epoch: handle.epoch,
            heartbeat_interval: config.heartbeat_interval.as_secs_f64(),
            offline_timeout: config.offline_timeout.as_secs_f64(),
            server_version: env!("CARGO_PKG_VERSION").into(),
        };
        if let Err(end) = self.send(&welcome).await {
            return end;
        }
        // A fresh connection also gets commands delivered earlier without a result:
        // the previous connection may have dropped before the agent saw them.
        if let Err(end) = self.deliver(true).await {
            return end;
        }

        let heartbeat = config.heartbeat_interval;
        let mut ping = tokio::time::interval_at(ping_slot(Instant::now() + heartbeat), heartbeat);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let token_left = Duration::from_secs(self.token_exp.saturating_sub(unix_now()));
        let token_expiry = tokio::time::sleep(token_left);
        tokio::pin!(token_expiry);
        let offline_ms = config.offline_timeout.as_millis() as i64;

        loop {
            tokio::select! {
                close = self.handle.closing() => return End::Server(close),
                _ = self.handle.woken() => {
                    if let Err(end) = self.deliver(false).await {
                        return end;
                    }
                    let offer = self.state.rollouts.pending_offer(&self.handle.client_id, self.handle.epoch).await;
                    if let Err(end) = self.send_update(offer).await {
                        return end;
                    }
                }
                _ = ping.tick() => {
                    if now_ms() - self.handle.last_inbound_ms() >= offline_ms {
                        return End::Server(protocol::HEARTBEAT_TIMEOUT);
                    }
                    if let Err(end) = self.send_frame(Message::Ping(Default::default()), MessageType::Ping).await {
                        return end;
                    }
                }
                _ = &mut token_expiry => return End::Server(protocol::TOKEN_EXPIRED),
                frame = self.ws.next() => {
                    let msg = match frame {
                        None => return End::Network("connection closed without a close frame".into()),
                        Some(Err(e)) => return classify(e),
                        Some(Ok(msg)) => msg,
                    };
                    // Any frame is a sign of life.
                    self.handle.touch(now_ms());
                    let result = match msg {
                        Message::Text(text) => self.on_text(text.as_str()).await,
                        Message::Binary(_) => {
                            self.metrics_in(MessageType::Invalid);
                            self.error(ErrorCode::BinaryNotSupported, "send JSON text messages".into(), None).await
                        }
                        Message::Ping(_) => {
                            // tungstenite queues the pong; it goes out with the next flush.
                            self.metrics_in(MessageType::Ping);
                            self.ws.flush().await.map_err(|e| End::Network(e.to_string()))
                        }
                        Message::Pong(_) => {
                            self.metrics_in(MessageType::Pong);
                            Ok(())
                        }
                        Message::Close(_) => {
                            self.metrics_in(MessageType::Close);
                            return End::ClientClosed;
                        }
                        Message::Frame(_) => Ok(()),
                    };
                    if let Err(end) = result {
                        return end;
                    }
                }
            }
        }
    }

    /// Sends the agent's sendable commands, oldest first, and marks them delivered.
    async fn deliver(&mut self, include_delivered: bool) -> Result<(), End> {
        let store = self.state.store.clone();
        let mut after = None;
        loop {
            let batch = match store
                .commands_to_send(
                    self.handle.client_id.clone(),
                    include_delivered,
                    after.clone(),
                    now_ms(),
                    BATCH,
                )
                .await
            {
                Ok(batch) => batch,
                Err(e) => {
                    // The commands stay pending; the periodic sweep wakes us again.
                    self.state.metrics.store_errors.inc();
                    tracing::error!(agent = %self.handle.client_id, error = %error_chain(&e), "could not load commands");
                    return Ok(());
                }
            };
            let mut ids = Vec::with_capacity(batch.len());
            for cmd in &batch {
                let args: &RawValue = serde_json::from_str(&cmd.args).unwrap_or(RawValue::NULL);
                let msg = Outbound::Command {
                    id: cmd.id.as_str().into(),
                    name: cmd.name.as_str().into(),
                    args: std::borrow::Cow::Borrowed(args),
                    created_at: cmd.created_at,
                    expires_at: cmd.expires_at,
                };
                self.send(&msg).await?;
                ids.push(cmd.id.clone());
            }
            if !ids.is_empty() {
                let n = ids.len();
                match store.mark_delivered(ids, now_ms()).await {
                    Ok(_) => self
                        .state
                        .metrics
                        .command(CommandStatus::Delivered, n as u64),
                    Err(e) => {
                        // Still pending in the store: they will be sent again, and agents
                        // dedupe by id.
                        self.state.metrics.store_errors.inc();
                        tracing::error!(agent = %self.handle.client_id, error = %error_chain(&e), "could not mark commands delivered");
                    }
                }
            }
            match batch.last() {
                Some(last) if batch.len() as i64 == BATCH => {
                    after = Some((last.created_at, last.id.clone()))
                }
                _ => return Ok(()),
            }
        }
    }

    async fn on_text(&mut self, text: &str) -> Result<(), End> {
        let msg = match serde_json::from_str::<Inbound>(text) {
            Ok(msg) => msg,
            Err(e) => {
                self.metrics_in(MessageType::Invalid);
                return self
                    .error(
                        ErrorCode::InvalidMessage,
                        format!("{e}; see docs/protocol.md for the message types"),
                        None,
                    )
                    .await;
            }
        };
        self.metrics_in(msg.metric_type());
        let id = self.handle.client_id.clone();
        let epoch = self.handle.epoch;
        match msg {
            Inbound::Heartbeat => self.send(&Outbound::HeartbeatAck { ts: now_ms() }).await,
            Inbound::Hello {
                version,
                hostname,
                os,
                arch,
                labels,
            } => {
                tracing::info!(agent = %id, ?version, ?hostname, ?os, ?arch, "agent hello");
                let facts = rollout::AgentFacts {
                    version: version.clone(),
                    os: os.clone(),
                    arch: arch.clone(),
                    labels,
                };
                let hello = Hello {
                    version,
                    hostname,
                    os,
                    arch,
                };
                if let Err(e) = self.state.store.agent_hello(id.clone(), epoch, hello).await {
                    self.state.metrics.store_errors.inc();
                    tracing::error!(agent = %self.handle.client_id, error = %error_chain(&e), "could not store hello");
                    return Ok(());
                }
                // Once the hello is stored: an agent on an older version may be due an update.
                let outcome = self.state.rollouts.after_hello(&id, epoch, facts).await;
                if let Some(problem) = outcome.problem {
                    self.error(ErrorCode::InvalidMessage, problem, None).await?;
                }
                self.send_update(outcome.offer).await
            }
            Inbound::Inventory { data } => {
                let body = data.to_string();
                match self
                    .state
                    .store
                    .store_inventory(id.to_string(), body, now_ms())
                    .await
                {
                    Ok(()) => Ok(()),
                    Err(e) => {
                        self.state.metrics.store_errors.inc();
                        tracing::error!(agent = %id, error = %error_chain(&e), "could not store inventory");
                        self.error(
                            ErrorCode::StoreUnavailable,
                            "inventory not stored; send it again later".into(),
                            None,
                        )
                        .await
                    }
                }
            }
            Inbound::Result {
                id: command_id,
                status,
                output,
            } => {
                let status = match status {
                    ResultStatus::Ok => CommandStatus::Succeeded,
                    ResultStatus::Error => CommandStatus::Failed,
                };
                let output = output.map(|o| o.to_string());
                let outcome = self
                    .state
                    .store
                    .record_result(
                        id.clone(),
                        epoch,
                        command_id.clone(),
                        status,
                        output,
                        now_ms(),
                    )
                    .await;
                match outcome {
                    Ok(ResultOutcome::Stored(st)) => {
                        self.state.metrics.command(st, 1);
                        tracing::info!(agent = %id, command = %command_id, status = st.as_str(), "result stored");
                        self.send(&Outbound::Ack {
                            id: command_id.as_str().into(),
                        })
                        .await
                    }
                    // A repeated result (sent again after a reconnect): acknowledge so
                    // the agent can forget it; the first result stands.
                    Ok(ResultOutcome::AlreadyFinal(_)) => {
                        self.send(&Outbound::Ack {
                            id: command_id.as_str().into(),
                        })
                        .await
                    }
                    Ok(ResultOutcome::UnknownCommand) => {
                        tracing::warn!(agent = %id, command = %command_id, "result refused: no such command for this agent");
                        let msg = "no such command for this agent".to_string();
                        self.error(ErrorCode::UnknownCommand, msg, Some(&command_id))
                            .await
                    }
                    Ok(ResultOutcome::StaleConnection) => {
                        tracing::warn!(agent = %id, command = %command_id, epoch, "result refused: stale connection");
                        Err(End::Server(protocol::REPLACED))
                    }
                    Err(e) => {
                        self.state.metrics.store_errors.inc();
                        tracing::error!(agent = %id, error = %error_chain(&e), "could not store result");
                        let msg = "result not stored; send it again later".to_string();
                        self.error(ErrorCode::StoreUnavailable, msg, Some(&command_id))
                            .await
                    }
                }
            }
        }
    }

    async fn send_update(&mut self, offer: Option<rollout::Offer>) -> Result<(), End> {
        let Some(o) = offer else { return Ok(()) };
        self.send(&Outbound::Update {
            rollout_id: o.rollout_id.as_str().into(),
            binary_id: o.binary_id.as_str().into(),
            name: o.name.as_str().into(),
            version: o.version.as_str().into(),
            os: o.os.as_str().into(),
            arch: o.arch.as_str().into(),
            url: o.url.as_str().into(),
            sha256: o.sha256.as_str().into(),
            size: o.size,
        })
        .await
    }

    async fn error(
        &mut self,
        code: ErrorCode,
        message: String,
        id: Option<&str>,
    ) -> Result<(), End> {
        self.send(&Outbound::Error {
            code,
            message: message.into(),
            id: id.map(Into::into),
        })
        .await
    }

    async fn send(&mut self, msg: &Outbound<'_>) -> Result<(), End> {
        // Serialising our own message types cannot fail.
        let text = serde_json::to_string(msg).unwrap_or_default();
        self.send_frame(Message::text(text), msg.metric_type())
            .await
    }

    /// Sends one frame; an agent that cannot take it within WS_SEND_TIMEOUT is closed,
    /// so memory per agent stays bounded.
    async fn send_frame(&mut self, frame: Message, kind: MessageType) -> Result<(), End> {
        match timeout(self.state.send_timeout, self.ws.send(frame)).await {
            Ok(Ok(())) => {
                self.state.metrics.ws(Direction::Outbound, kind);
                Ok(())
            }
            Ok(Err(e)) => Err(classify(e)),
            Err(_) => Err(End::Server(protocol::SLOW_CONSUMER)),
        }
    }

    fn metrics_in(&self, kind: MessageType) {
        self.state.metrics.ws(Direction::Inbound, kind);
    }
}

/// Granularity of ping timers. Sessions keep their spread over the heartbeat interval
/// but share a few slots per second, so the runtime wakes a few times a second for many
/// pings instead of once per ping (docs/benchmarks.md, benchmark 2).
const PING_SLOT: Duration = Duration::from_millis(250);

/// The first slot boundary at or after `at`, on a process-wide grid.
fn ping_slot(at: Instant) -> Instant {
    static GRID: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let origin = *GRID.get_or_init(Instant::now);
    let slot = PING_SLOT.as_millis();
    let since = at.saturating_duration_since(origin).as_millis();
    origin + Duration::from_millis((since.div_ceil(slot) * slot) as u64)
}

fn classify(e: WsError) -> End {
    match e {
        WsError::Capacity(_) => End::Server(protocol::TOO_BIG),
        WsError::ConnectionClosed | WsError::AlreadyClosed => End::ClientClosed,
        other => End::Network(other.to_string()),
    }
}
