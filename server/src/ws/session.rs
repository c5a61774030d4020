//! One agent's WebSocket session: welcome, command delivery, heartbeats, results, close.
//!
//! The session is a single task that owns its socket. Everything else reaches it through
//! its [`SessionHandle`]: a wake-up (commands may be waiting in the store) or a close
//! request. It never buffers commands in memory: each wake-up reads them from the store,
//! so a slow or disconnected agent costs nothing but its socket.
//!
//! No await in the session can be stalled by the agent or by the store for long: every
//! write is bounded by WS_SEND_TIMEOUT (then 4008) and races the close request and the
//! token's expiry; every store or hub call also races them and keeps the heartbeat timer
//! (pings, OFFLINE_TIMEOUT) running ([`Session::guarded`]). Pongs are never awaited:
//! tungstenite sends them on the next read, as far as the socket takes them, so an agent
//! that floods pings and never reads meets the next ping's send timeout like any other
//! slow reader.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use serde_json::value::RawValue;
use tokio::time::{Instant, Interval, MissedTickBehavior, Sleep, timeout};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use super::protocol::{
    self, Close, ErrorCode, Inbound, Metered, Outbound, PROTOCOL_VERSION, ResultStatus,
    UpdateStatus,
};
use crate::auth::{Claims, unix_now};
use crate::binaries::{Rollouts, rollout};
use crate::config::Config;
use crate::credentials::Credentials;
use crate::error::error_chain;
use crate::hub::{Hub, SessionHandle};
use crate::limits::check_depth;
use crate::metrics::{CloseReason, Direction, MessageType, Metrics};
use crate::storable::check_json;
use crate::store::{CommandStatus, Hello, ResultOutcome, Store, now_ms};

type Socket = WebSocketStream<TokioIo<Upgraded>>;

/// Commands read from the store per round trip.
const BATCH: i64 = 100;
/// How long to wait for the agent's answer to our close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// What every session of this replica shares: the handles it uses and its settings.
pub(crate) struct SessionContext {
    pub(crate) store: Store,
    pub(crate) hub: Hub,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) rollouts: Rollouts,
    /// For each ping's revocation check, from the replica's cache (no database).
    pub(crate) creds: Credentials,
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
        creds: Credentials,
    ) -> Self {
        SessionContext {
            store,
            hub,
            metrics,
            rollouts,
            creds,
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
///
/// `claims` are the verified token's: `sub` is the agent's id, `exp` ends the session,
/// and each ping checks them against revocations (boxed: they are read once a heartbeat).
///
/// An idle agent's whole cost is this task, so its size matters: what runs once (the
/// connect, the close) and what runs rarely (messages, deliveries) is boxed, and the
/// task itself holds little more than the socket and the select of `serve_until_end`
/// (`idle_session_task_stays_small`).
pub(crate) async fn run(state: Arc<SessionContext>, ws: Socket, claims: Box<Claims>) {
    let Some(mut session) = Box::pin(open(state, ws, claims)).await else {
        return;
    };
    let end = session.serve().await;
    Box::pin(finish(session, end)).await;
}

/// Records the connection (its epoch) and registers it in the hub; `None` when the
/// session ended before it began (store unavailable, or a newer connection exists).
async fn open(state: Arc<SessionContext>, mut ws: Socket, claims: Box<Claims>) -> Option<Session> {
    let client_id = claims.sub.clone();
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
            return None;
        }
    };
    let handle = match state.hub.connect(&client_id, epoch, now_ms()).await {
        Ok(handle) => handle,
        Err(_) => {
            close_socket(&mut ws, protocol::REPLACED).await;
            state.metrics.closed(CloseReason::Replaced);
            return None;
        }
    };
    tracing::info!(agent = %client_id, epoch, "agent connected");

    let heartbeat = state.heartbeat_interval;
    let mut ping = tokio::time::interval_at(ping_slot(Instant::now() + heartbeat), heartbeat);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let token_left = Duration::from_secs(claims.exp.saturating_sub(unix_now()));
    Some(Session {
        state,
        ws,
        handle,
        ping,
        token_expiry: Box::pin(tokio::time::sleep(token_left)),
        claims,
    })
}

/// Closes the socket as `end` asks, then unregisters the session and records the
/// disconnection.
async fn finish(mut session: Session, end: End) {
    let state = session.state.clone();
    let handle = session.handle.clone();
    let client_id = handle.client_id.clone();
    let epoch = handle.epoch;
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

/// Sends our close frame and waits briefly for the agent's, so the close is clean. Both
/// are bounded by CLOSE_GRACE: an agent that does not read never sees the frame, and its
/// connection is dropped all the same.
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
    /// Server pings, every HEARTBEAT_INTERVAL; each tick also checks OFFLINE_TIMEOUT.
    ping: Interval,
    /// Fires at the token's `exp`: the session ends when its credential does.
    token_expiry: Pin<Box<Sleep>>,
    /// The token the session was opened with, checked against revocations at each ping.
    claims: Box<Claims>,
}

impl Session {
    async fn serve(&mut self) -> End {
        match self.serve_until_end().await {
            Ok(never) => match never {},
            Err(end) => end,
        }
    }

    async fn serve_until_end(&mut self) -> Result<std::convert::Infallible, End> {
        Box::pin(self.start()).await?;
        // Everything awaited in an arm is boxed: the task's size is its largest state,
        // and idle agents only ever wait here.
        loop {
            tokio::select! {
                close = self.handle.closing() => return Err(End::Server(close)),
                _ = &mut self.token_expiry => return Err(End::Server(protocol::TOKEN_EXPIRED)),
                _ = self.ping.tick() => Box::pin(self.heartbeat()).await?,
                _ = self.handle.woken() => Box::pin(self.on_wake()).await?,
                frame = self.ws.next() => {
                    let msg = match frame {
                        None => return Err(End::Network("connection closed without a close frame".into())),
                        Some(Err(e)) => return Err(classify(e)),
                        Some(Ok(msg)) => msg,
                    };
                    // Any frame is a sign of life.
                    self.handle.touch(now_ms());
                    match msg {
                        Message::Text(text) => Box::pin(self.on_text(text.as_str())).await?,
                        Message::Binary(_) => {
                            self.metrics_in(MessageType::Invalid);
                            Box::pin(self.error(ErrorCode::BinaryNotSupported, "send JSON text messages".into(), None)).await?
                        }
                        // tungstenite queued the pong; the next read sends it, as far as
                        // the socket takes it. Awaiting it here would let an agent that
                        // sends pings and never reads hold the session still.
                        Message::Ping(_) => self.metrics_in(MessageType::Ping),
                        Message::Pong(_) => self.metrics_in(MessageType::Pong),
                        Message::Close(_) => {
                            self.metrics_in(MessageType::Close);
                            return Err(End::ClientClosed);
                        }
                        Message::Frame(_) => {}
                    }
                }
            }
        }
    }

    /// The welcome, then what a fresh connection must be sent.
    async fn start(&mut self) -> Result<(), End> {
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
        self.send(&welcome).await?;
        // A fresh connection also gets commands delivered earlier without a result:
        // the previous connection may have dropped before the agent saw them. Most
        // connections have none: a batched check (asked after the hub registered this
        // session, so a command stored from now on wakes it) spares them the read.
        let store = self.state.store.clone();
        let sendable = self
            .guarded(store.has_sendable_commands(handle.client_id.clone()))
            .await?;
        // On a store error, read anyway: the read reports its own failure.
        if sendable.unwrap_or(true) {
            self.deliver(true).await?;
        }
        Ok(())
    }

    /// A wake-up: commands may be waiting, or an update.
    async fn on_wake(&mut self) -> Result<(), End> {
        self.deliver(false).await?;
        let rollouts = self.state.rollouts.clone();
        let handle = self.handle.clone();
        let offer = self
            .guarded(rollouts.pending_offer(&handle.client_id, handle.epoch))
            .await?;
        self.send_update(offer).await
    }

    /// A heartbeat tick: closes a silent agent (4000) or one whose credentials were
    /// revoked (4002), else pings it.
    ///
    /// Revocations normally close the session at once (`Credentials::apply_local`, on
    /// every replica through the revocation bus). Redis pub/sub is at-most-once, so each
    /// ping also asks the replica's credential cache, which the revocation refresh keeps
    /// in step with the database: a lost message still closes the session within two
    /// heartbeat intervals, with no database round trip here.
    async fn heartbeat(&mut self) -> Result<(), End> {
        let offline_ms = self.state.offline_timeout.as_millis() as i64;
        if now_ms() - self.handle.last_inbound_ms() >= offline_ms {
            return Err(End::Server(protocol::HEARTBEAT_TIMEOUT));
        }
        if let Some(revoked) = self.state.creds.must_close(&self.claims) {
            tracing::info!(agent = %self.handle.client_id, %revoked, "closing a session whose credentials were revoked");
            return Err(End::Server(protocol::REVOKED));
        }
        self.send_frame(Message::Ping(Default::default()), MessageType::Ping)
            .await
    }

    /// Awaits `work` (a store or hub call) while close requests and the token's expiry
    /// still end the session and the heartbeat keeps pinging and checking
    /// OFFLINE_TIMEOUT, so an outage of the store holds up neither. `work` must not
    /// borrow the session: clone the handle it needs first.
    async fn guarded<T>(&mut self, work: impl Future<Output = T>) -> Result<T, End> {
        let mut work = std::pin::pin!(work);
        loop {
            tokio::select! {
                biased;
                close = self.handle.closing() => return Err(End::Server(close)),
                _ = &mut self.token_expiry => return Err(End::Server(protocol::TOKEN_EXPIRED)),
                out = &mut work => return Ok(out),
                _ = self.ping.tick() => self.heartbeat().await?,
            }
        }
    }

    /// Sends the agent's sendable commands, oldest first, and marks them delivered.
    async fn deliver(&mut self, include_delivered: bool) -> Result<(), End> {
        let store = self.state.store.clone();
        let mut after = None;
        loop {
            let loaded = self
                .guarded(store.commands_to_send(
                    self.handle.client_id.clone(),
                    include_delivered,
                    after.clone(),
                    now_ms(),
                    BATCH,
                ))
                .await?;
            let batch = match loaded {
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
                match self.guarded(store.mark_delivered(ids, now_ms())).await? {
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
        // One rule for both backends: text PostgreSQL cannot store is refused here, whole
        // and with the field named, on SQLite too.
        if let Err(e) = check_json("", text) {
            let id = match &msg {
                Inbound::Result { id, .. } => Some(id.as_str()),
                Inbound::UpdateResult { rollout_id, .. } => Some(rollout_id.as_str()),
                _ => None,
            };
            tracing::info!(agent = %self.handle.client_id, field = %e.field, "message refused: U+0000");
            return self
                .error(ErrorCode::InvalidMessage, e.to_string(), id)
                .await;
        }
        let store = self.state.store.clone();
        let rollouts = self.state.rollouts.clone();
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
                if let Err(e) = self
                    .guarded(store.agent_hello(id.clone(), epoch, hello))
                    .await?
                {
                    self.state.metrics.store_errors.inc();
                    tracing::error!(agent = %id, error = %error_chain(&e), "could not store hello");
                    // Never silence: without its hello stored the agent would be skipped
                    // by rollouts, so it must know to say it again.
                    let msg = "hello not stored; send it again later".to_string();
                    return self.error(ErrorCode::StoreUnavailable, msg, None).await;
                }
                // Once the hello is stored: an agent on an older version may be due an update.
                let outcome = self
                    .guarded(rollouts.after_hello(&id, epoch, facts))
                    .await?;
                if let Some(problem) = outcome.problem {
                    self.error(ErrorCode::InvalidMessage, problem, None).await?;
                }
                self.send_update(outcome.offer).await
            }
            Inbound::UpdateResult {
                rollout_id,
                version,
                status,
                error,
            } => {
                self.on_update_result(rollout_id, version, status, error)
                    .await
            }
            Inbound::Inventory { data } => {
                if let Err(e) = check_depth("data", data.get()) {
                    return self
                        .error(ErrorCode::InvalidMessage, e.to_string(), None)
                        .await;
                }
                // Stored as the agent wrote it.
                let body = data.get().to_string();
                match self
                    .guarded(store.store_inventory(id.to_string(), body, now_ms()))
                    .await?
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
                if let Some(Err(e)) = output.as_ref().map(|o| check_depth("output", o.get())) {
                    return self
                        .error(ErrorCode::InvalidMessage, e.to_string(), Some(&command_id))
                        .await;
                }
                let status = match status {
                    ResultStatus::Ok => CommandStatus::Succeeded,
                    ResultStatus::Error => CommandStatus::Failed,
                };
                // Stored as the agent wrote it.
                let output = output.map(|o| o.get().to_string());
                let outcome = self
                    .guarded(store.record_result(
                        id.clone(),
                        epoch,
                        command_id.clone(),
                        status,
                        output,
                        now_ms(),
                    ))
                    .await?;
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

    /// An `update_result` (protocol version 2): stored, then acknowledged with the
    /// rollout's id; on a store failure the agent is told to send it again.
    async fn on_update_result(
        &mut self,
        rollout_id: String,
        version: String,
        status: UpdateStatus,
        error: Option<String>,
    ) -> Result<(), End> {
        let rollouts = self.state.rollouts.clone();
        let id = self.handle.client_id.clone();
        tracing::info!(agent = %id, rollout = %rollout_id, %version, status = status.as_str(), ?error, "update result");
        let report = rollout_id.clone();
        let stored = self
            .guarded(async move {
                rollouts
                    .update_result(&id, &report, &version, status, error)
                    .await
            })
            .await?;
        match stored {
            Ok(()) => {
                self.send(&Outbound::Ack {
                    id: rollout_id.as_str().into(),
                })
                .await
            }
            Err(e) => {
                self.state.metrics.store_errors.inc();
                tracing::error!(agent = %self.handle.client_id, error = %error_chain(&e), "could not store an update result");
                let msg = "update result not stored; send it again later".to_string();
                self.error(ErrorCode::StoreUnavailable, msg, Some(&rollout_id))
                    .await
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
            allow_downgrade: o.allow_downgrade,
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

    /// Sends one frame; an agent that cannot take it within WS_SEND_TIMEOUT is closed
    /// (4008), so memory per agent stays bounded. A close request or the token's expiry
    /// ends the wait at once.
    async fn send_frame(&mut self, frame: Message, kind: MessageType) -> Result<(), End> {
        let write = timeout(self.state.send_timeout, self.ws.send(frame));
        tokio::select! {
            biased;
            close = self.handle.closing() => Err(End::Server(close)),
            _ = &mut self.token_expiry => Err(End::Server(protocol::TOKEN_EXPIRED)),
            written = write => match written {
                Ok(Ok(())) => {
                    self.state.metrics.ws(Direction::Outbound, kind);
                    Ok(())
                }
                Ok(Err(e)) => Err(classify(e)),
                Err(_) => Err(End::Server(protocol::SLOW_CONSUMER)),
            },
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

#[cfg(test)]
mod tests {
    /// The size of the future `f` returns, without calling it.
    fn future_size<F, A, B, C, R>(_: F) -> usize
    where
        F: FnOnce(A, B, C) -> R,
    {
        std::mem::size_of::<R>()
    }

    #[test]
    fn idle_session_task_stays_small() {
        // Every idle agent is one such task: each byte here is a byte per agent.
        let size = future_size(super::run);
        eprintln!("session task future: {size} bytes");
        // 1,200 bytes today: the socket, the timers, the handle and the select's futures.
        assert!(size <= 1280, "the session task is {size} bytes");
    }
}
