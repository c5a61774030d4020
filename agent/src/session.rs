//! The connection loop: connect, speak protocol version 2 (`docs/protocol.md`; version 1
//! with servers that speak only that), and reconnect as each close code or refusal asks
//! (`agent_protocol::CloseCode::policy`). An `update` is prepared in the background and,
//! once no command runs, ends the connection so that the agent switches builds
//! (`crate::update`).
//!
//! Commands run in their own tasks and report through a channel that outlives any one
//! connection, so a command that finishes while the agent is offline is sent on the next
//! connection (from memory, or from the journal after a restart).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use agent_protocol::{
    AgentMessage, CloseCode, ErrorCode, RESTART_DELAY_MAX, Reconnect, ServerMessage,
    backoff_ceiling, refusal_policy,
};
use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_util::sync::CancellationToken;

use crate::commands::{self, Kind};
use crate::config::{Config, Secret, TokenSource};
use crate::enroll::{self, Answer};
use crate::journal::{Entry, Journal, Outcome};
use crate::net::{ConnectError, Net, Ws};
use crate::update::{Confirmation, Decision, Offer, Updater};

/// First backoff step and its cap (full jitter: a random delay below
/// `min(cap, base × 2^attempt)`).
const BACKOFF_BASE: Duration = Duration::from_secs(1);
const BACKOFF_CAP: Duration = Duration::from_secs(60);
/// After repeated 4001s another host holds our id: stay out of its way for longer.
const ANOTHER_HOST_DELAY: Duration = Duration::from_secs(300);
/// Bound on the wait for `welcome`.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(30);
/// Delay before sending again what the server could not store (`store_unavailable`).
const STORE_RETRY: Duration = Duration::from_secs(5);
/// Commands running at once; more wait their turn.
const MAX_RUNNING: usize = 16;

/// Why the agent stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    /// SIGTERM or SIGINT.
    Shutdown,
    /// The server refused this agent for good (deleted, bad token, bad id, enrollment
    /// refused).
    Refused,
    /// The state directory cannot hold what the agent must keep (the enrolled token).
    StateDir,
}

/// What the agent presents next, or why it cannot yet.
enum Credential {
    Token(Secret),
    Wait(Duration),
    Exit(Exit),
}

/// The next full-jitter backoff delay; counts the attempt.
fn next_backoff(attempt: &mut u32) -> Duration {
    let d = jitter(backoff_ceiling(*attempt, BACKOFF_BASE, BACKOFF_CAP));
    *attempt = attempt.saturating_add(1);
    d
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// How one connection ended.
enum End {
    Shutdown,
    Closed(u16),
    /// Nothing heard for `offline_timeout`: the server or the path to it is gone.
    Silent,
    Dropped(String),
    /// A checked build is ready and no command runs: switch to it.
    Switch,
}

/// Reported by command and update tasks to the connection loop.
enum Event {
    /// A command finished; its result is in the journal.
    Finished(Entry),
    /// An `inventory` command's document, small enough for the WebSocket.
    Inventory(String),
    /// An update was downloaded and checked (its path), or failed.
    Prepared(Offer, Result<std::path::PathBuf, String>),
}

pub struct Agent {
    cfg: Arc<Config>,
    net: Net,
    journal: Arc<Journal>,
    /// Finished results the server has not acknowledged yet, by command id.
    unacked: HashMap<String, Entry>,
    /// Commands running in this process: a redelivery of one is ignored.
    running: HashSet<String>,
    events_tx: mpsc::Sender<Event>,
    events_rx: mpsc::Receiver<Event>,
    limit: Arc<tokio::sync::Semaphore>,
    stop: CancellationToken,
    updater: Updater,
    /// A checked build to switch to once no command runs; commands that arrive meanwhile
    /// are left to the new build (the server delivers them again).
    switching: Option<(Offer, std::path::PathBuf)>,
    /// Rolls back a new build that does not reach `welcome` in time.
    trial_guard: Option<tokio::task::JoinHandle<()>>,
}

fn jitter(ceiling: Duration) -> Duration {
    if ceiling.is_zero() {
        return ceiling;
    }
    Duration::from_millis(rand::rng().random_range(0..=ceiling.as_millis() as u64))
}

impl Agent {
    pub fn new(cfg: Config, net: Net, stop: CancellationToken) -> std::io::Result<Agent> {
        let (journal, entries) = Journal::open(&cfg.state_dir)?;
        if !entries.is_empty() {
            tracing::info!(
                results = entries.len(),
                "unacknowledged results from the journal will be sent"
            );
        }
        let (events_tx, events_rx) = mpsc::channel(64);
        let updater = Updater::open(&cfg);
        Ok(Agent {
            updater,
            switching: None,
            trial_guard: None,
            cfg: Arc::new(cfg),
            net,
            journal: Arc::new(journal),
            unacked: crate::journal::by_id(entries),
            running: HashSet::new(),
            events_tx,
            events_rx,
            limit: Arc::new(tokio::sync::Semaphore::new(MAX_RUNNING)),
            stop,
        })
    }

    pub async fn run(mut self) -> Exit {
        if let Some(deadline) = self.updater.trial_deadline() {
            self.trial_guard = Some(tokio::spawn(Updater::guard(
                self.cfg.state_dir.clone(),
                deadline,
            )));
        }
        let id = self.cfg.client_id.clone();
        let mut attempt = 0u32;
        let mut replaced_in_a_row = 0u32;
        loop {
            let delay = match self.credential(&mut attempt).await {
                Credential::Wait(d) => d,
                Credential::Exit(exit) => return exit,
                Credential::Token(token) => match self.net.websocket(&id, &token).await {
                    Err(ConnectError::Refused {
                        status,
                        retry_after,
                        message,
                    }) => match refusal_policy(status) {
                        Reconnect::Stop => {
                            let hint = match (&self.cfg.token, status) {
                                (TokenSource::Enroll { path, .. }, 401) => format!(
                                    "the token this agent enrolled for was refused: an operator deleted the agent or revoked its credentials, or the server's key changed. To enroll again, an operator deletes the agent (or hands out an enroll secret with allow_reenroll); then remove {} and start the agent",
                                    path.display()
                                ),
                                (_, 401) => "the token is missing, expired, revoked or signed with another key: mint a new one with `agent-server token --sub ID --role agent` or POST /api/v1/tokens".into(),
                                (_, 403) => {
                                    "the token belongs to another client_id or is not an agent token".into()
                                }
                                _ => "the client_id is not valid".into(),
                            };
                            tracing::error!(status, reason = %message, "the server refused this agent; stopping: {hint}");
                            return Exit::Refused;
                        }
                        _ => {
                            let d = next_backoff(&mut attempt).max(retry_after.unwrap_or_default());
                            tracing::warn!(status, reason = %message, delay_ms = d.as_millis() as u64, "the server refused the connection; retrying");
                            d
                        }
                    },
                    Err(ConnectError::Transport(e)) => {
                        let d = next_backoff(&mut attempt);
                        tracing::warn!(error = %e, delay_ms = d.as_millis() as u64, "cannot connect; retrying");
                        d
                    }
                    Ok(ws) => {
                        let started = Instant::now();
                        let end = self.session(ws, &token).await;
                        // A connection that held longer than the cap resets the backoff;
                        // one refused right after welcome keeps growing it.
                        if started.elapsed() > BACKOFF_CAP {
                            attempt = 0;
                        }
                        match end {
                            End::Shutdown => return self.stopped(),
                            End::Switch => {
                                let Some((offer, build)) = self.switching.take() else {
                                    continue;
                                };
                                // Returns only when the switch failed; the failure is
                                // recorded and reported on the next connection.
                                let error = self.updater.switch(&offer, &build);
                                tracing::error!(%error, version = %offer.version, "could not switch to the new build; staying on this one");
                                attempt = 0;
                                Duration::ZERO
                            }
                            End::Silent => {
                                tracing::warn!(
                                    "nothing heard from the server within its offline timeout; reconnecting"
                                );
                                next_backoff(&mut attempt)
                            }
                            End::Dropped(e) => {
                                tracing::warn!(error = %e, "connection lost; reconnecting");
                                next_backoff(&mut attempt)
                            }
                            End::Closed(code) => {
                                let close = CloseCode::from(code);
                                if close != CloseCode::Replaced {
                                    replaced_in_a_row = 0;
                                }
                                match close.policy() {
                                    Reconnect::Stop => {
                                        let hint = match &self.cfg.token {
                                            TokenSource::Enroll { path, .. } => format!(
                                                "to enroll again, an operator deletes the agent (or hands out an enroll secret with allow_reenroll); then remove {} and start the agent",
                                                path.display()
                                            ),
                                            _ => "give it a new token to reconnect".into(),
                                        };
                                        tracing::error!(
                                            code,
                                            "an operator deleted this agent or revoked its credentials on the server; stopping: {hint}"
                                        );
                                        return Exit::Refused;
                                    }
                                    Reconnect::AnotherHost => {
                                        replaced_in_a_row += 1;
                                        if replaced_in_a_row >= 2 {
                                            tracing::error!(code, client_id = %id, "another host is using this client_id: its connections keep replacing ours. Give each host its own client_id");
                                            ANOTHER_HOST_DELAY.mul_f64(0.5)
                                                + jitter(ANOTHER_HOST_DELAY.mul_f64(0.5))
                                        } else {
                                            tracing::warn!(
                                                code,
                                                "replaced by a newer connection with the same client_id; reconnecting"
                                            );
                                            next_backoff(&mut attempt)
                                        }
                                    }
                                    Reconnect::RenewToken => {
                                        tracing::info!(
                                            code,
                                            "token expired; reading it again and reconnecting"
                                        );
                                        jitter(BACKOFF_BASE)
                                    }
                                    Reconnect::Soon => {
                                        tracing::info!(
                                            code,
                                            "server restarting; reconnecting shortly"
                                        );
                                        jitter(RESTART_DELAY_MAX)
                                    }
                                    Reconnect::Backoff => {
                                        let d = next_backoff(&mut attempt);
                                        tracing::info!(
                                            code,
                                            reason = close.reason(),
                                            delay_ms = d.as_millis() as u64,
                                            "server closed the connection; reconnecting"
                                        );
                                        d
                                    }
                                }
                            }
                        }
                    }
                },
            };
            tokio::select! {
                _ = self.stop.cancelled() => return self.stopped(),
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Stopped (SIGTERM or SIGINT). A new build stopped before it reached `welcome` has
    /// not proven itself: the previous build is restored for the next start, and the
    /// watchdog, seeing the outcome, does not restart it.
    fn stopped(&mut self) -> Exit {
        if self.updater.trial_deadline().is_some() {
            crate::update::watchdog::roll_back(
                &self.cfg.state_dir,
                "the agent was stopped before the new build reached welcome",
            );
        }
        Exit::Shutdown
    }

    /// The token to connect with: the configured one, or for an enrolling agent the
    /// stored one, enrolling first when there is none (or it expired, or it belongs to
    /// another client id).
    async fn credential(&self, attempt: &mut u32) -> Credential {
        let TokenSource::Enroll { secret, path } = &self.cfg.token else {
            return match self.cfg.token.read() {
                Ok(token) => Credential::Token(token),
                Err(e) => {
                    let d = next_backoff(attempt);
                    tracing::error!(error = %e, delay_ms = d.as_millis() as u64, "no token; retrying");
                    Credential::Wait(d)
                }
            };
        };
        match self.cfg.token.read() {
            Ok(token) => match enroll::unusable(&token, &self.cfg.client_id, unix_now()) {
                None => return Credential::Token(token),
                Some(why) => tracing::info!(path = %path.display(), "{why}; enrolling again"),
            },
            Err(_) if !path.exists() => {
                tracing::info!(path = %path.display(), "no token yet; enrolling with the enroll secret")
            }
            Err(e) => {
                let d = next_backoff(attempt);
                tracing::error!(error = %e, delay_ms = d.as_millis() as u64, "cannot read the enrolled token; retrying");
                return Credential::Wait(d);
            }
        }
        let hostname = crate::inventory::hostname();
        match enroll::enroll(&self.net, secret, &self.cfg.client_id, hostname).await {
            Err(e) => {
                let d = next_backoff(attempt);
                tracing::warn!(error = %e, delay_ms = d.as_millis() as u64, "cannot enroll; retrying");
                Credential::Wait(d)
            }
            Ok(Answer::Enrolled {
                token,
                expires_at,
                labels,
            }) => {
                let (p, t) = (path.clone(), token.clone());
                let stored = tokio::task::spawn_blocking(move || enroll::store_token(&p, &t))
                    .await
                    .unwrap_or_else(|e| Err(std::io::Error::other(e)));
                match stored {
                    Ok(()) => {
                        tracing::info!(client_id = %self.cfg.client_id, %expires_at, ?labels, path = %path.display(), "enrolled: the server issued this agent's own token, kept in the state directory");
                        Credential::Token(token)
                    }
                    Err(e) => {
                        tracing::error!(error = %e, path = %path.display(), "enrolled, but the token cannot be stored; stopping. Make state_dir (AGENT_STATE_DIR) writable; this client_id is now enrolled, so an operator must delete the agent (or hand out an enroll secret with allow_reenroll) before it can enroll again");
                        Credential::Exit(Exit::StateDir)
                    }
                }
            }
            Ok(Answer::Refused { status, message }) => {
                let hint = match status {
                    401 => {
                        "set a valid enroll_secret (AGENT_ENROLL_SECRET or enroll_secret_file); an operator creates one with POST /api/v1/enroll-secrets"
                    }
                    409 => {
                        "if this host lost its token (state_dir wiped), an operator must delete the agent or hand out an enroll secret with allow_reenroll; otherwise give this host its own client_id"
                    }
                    _ => "the server does not accept this enrollment request",
                };
                tracing::error!(status, reason = %message, "the server refused the enrollment; stopping: {hint}");
                Credential::Exit(Exit::Refused)
            }
            Ok(Answer::Later {
                status,
                retry_after,
                message,
            }) => {
                let d = next_backoff(attempt).max(retry_after.unwrap_or_default());
                tracing::warn!(status, reason = %message, delay_ms = d.as_millis() as u64, "the server cannot enroll this agent now; retrying");
                Credential::Wait(d)
            }
        }
    }

    async fn session(&mut self, mut ws: Ws, token: &Secret) -> End {
        let (heartbeat, offline, protocol) = match timeout(WELCOME_TIMEOUT, ws.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => match ServerMessage::parse(&text) {
                Ok(ServerMessage::Welcome {
                    protocol,
                    pod,
                    epoch,
                    heartbeat_interval,
                    offline_timeout,
                    ..
                }) => {
                    tracing::info!(%pod, epoch, protocol, "connected");
                    (
                        Duration::from_secs_f64(heartbeat_interval.clamp(1.0, 3600.0)),
                        Duration::from_secs_f64(offline_timeout.clamp(2.0, 86_400.0)),
                        protocol,
                    )
                }
                _ => return End::Dropped(format!("expected welcome, got {text}")),
            },
            Ok(Some(Ok(Message::Close(frame)))) => {
                return End::Closed(frame.map_or(1005, |f| u16::from(f.code)));
            }
            Ok(Some(Ok(other))) => return End::Dropped(format!("expected welcome, got {other:?}")),
            Ok(Some(Err(e))) => return End::Dropped(e.to_string()),
            Ok(None) => return End::Dropped("closed before welcome".into()),
            Err(_) => return End::Dropped("no welcome within 30 s".into()),
        };

        // A new build on trial has made it: the update is complete, unless the watchdog
        // rolled it back meanwhile.
        if self.updater.trial_deadline().is_some() {
            match self.updater.confirm() {
                Confirmation::Confirmed => {
                    if let Some(guard) = self.trial_guard.take() {
                        guard.abort();
                    }
                }
                Confirmation::RolledBack => {
                    tracing::warn!(
                        "the update watchdog restored the previous build before welcome; stopping"
                    );
                    close(&mut ws).await;
                    return End::Shutdown;
                }
            }
        }
        // How the last update ended, before the hello, so that the server does not offer
        // a failed update again on this connection. Version-1 servers learn it from the
        // hello alone.
        let reports = protocol >= 2;
        if reports {
            if let Some(report) = self.updater.report()
                && let Err(end) = send(&mut ws, report.to_json()).await
            {
                return end;
            }
        } else {
            self.updater.forget_report();
        }

        let hello = AgentMessage::Hello {
            version: Some(crate::VERSION.into()),
            hostname: crate::inventory::hostname(),
            os: Some(std::env::consts::OS.into()),
            arch: Some(std::env::consts::ARCH.into()),
            labels: Some(self.cfg.labels.clone()),
        };
        if let Err(end) = send(&mut ws, hello.to_json()).await {
            return end;
        }
        if let Err(end) = self.send_inventory(&mut ws, token).await {
            return end;
        }
        let mut ids: Vec<&Entry> = self.unacked.values().collect();
        ids.sort_by_key(|e| e.started_at);
        let resend: Vec<String> = ids.iter().map(|e| self.result_json(e)).collect();
        for text in resend {
            if let Err(end) = send(&mut ws, text).await {
                return end;
            }
        }

        // A build prepared while the agent was offline.
        if self.switching.is_some() && self.running.is_empty() {
            close(&mut ws).await;
            return End::Switch;
        }

        let mut tick = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last_heard = Instant::now();
        let retry = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(retry);
        let mut retry_armed = false;
        let mut retry_inventory = false;

        loop {
            tokio::select! {
                _ = self.stop.cancelled() => {
                    close(&mut ws).await;
                    return End::Shutdown;
                }
                _ = tick.tick() => {
                    if last_heard.elapsed() >= offline {
                        return End::Silent;
                    }
                    if let Err(end) = send(&mut ws, AgentMessage::Heartbeat.to_json()).await {
                        return end;
                    }
                }
                Some(event) = self.events_rx.recv() => {
                    let text = match event {
                        Event::Finished(entry) => {
                            self.running.remove(&entry.id);
                            let text = self.result_json(&entry);
                            self.unacked.insert(entry.id.clone(), entry);
                            Some(text)
                        }
                        Event::Inventory(text) => Some(text),
                        Event::Prepared(offer, Ok(build)) => {
                            self.switching = Some((offer, build));
                            None
                        }
                        Event::Prepared(offer, Err(error)) => {
                            let report = self.updater.failed(&offer, error);
                            reports.then(|| report.to_json())
                        }
                    };
                    if let Some(text) = text
                        && let Err(end) = send(&mut ws, text).await
                    {
                        return end;
                    }
                    if self.switching.is_some() && self.running.is_empty() {
                        tracing::info!("no command runs: closing the connection to switch builds");
                        close(&mut ws).await;
                        return End::Switch;
                    }
                }
                _ = &mut retry, if retry_armed => {
                    retry_armed = false;
                    if std::mem::take(&mut retry_inventory)
                        && let Err(end) = self.send_inventory(&mut ws, token).await
                    {
                        return end;
                    }
                    let mut texts: Vec<String> = self.unacked.values().map(|e| self.result_json(e)).collect();
                    if reports && let Some(report) = self.updater.report() {
                        texts.push(report.to_json());
                    }
                    for text in texts {
                        if let Err(end) = send(&mut ws, text).await {
                            return end;
                        }
                    }
                }
                frame = ws.next() => {
                    last_heard = Instant::now();
                    let msg = match frame {
                        None => return End::Dropped("connection closed without a close frame".into()),
                        Some(Err(e)) => return End::Dropped(e.to_string()),
                        Some(Ok(msg)) => msg,
                    };
                    match msg {
                        Message::Text(text) => {
                            let msg = match ServerMessage::parse(&text) {
                                Ok(msg) => msg,
                                Err(e) => {
                                    tracing::warn!(error = %e, "unreadable message from the server ignored");
                                    continue;
                                }
                            };
                            match msg {
                                ServerMessage::Command { id, name, args, .. } => {
                                    if let Some(text) = self.on_command(id.into_owned(), name.into_owned(), args.get().to_string()) &&
                                        let Err(end) = send(&mut ws, text).await {
                                        return end;
                                    }
                                }
                                ServerMessage::Ack { id } => {
                                    if self.unacked.remove(id.as_ref()).is_some() {
                                        self.journal.remove(&id);
                                    } else if self.updater.acknowledged(&id) {
                                        tracing::info!(rollout = %id, "the server stored the update's outcome");
                                    }
                                }
                                ServerMessage::Error { code, message, id } => {
                                    tracing::warn!(code = code.as_str(), reason = %message, command = ?id, "the server refused a message");
                                    match (code, id) {
                                        (ErrorCode::StoreUnavailable, id) => {
                                            retry_inventory |= id.is_none();
                                            if !retry_armed {
                                                retry_armed = true;
                                                retry.as_mut().reset(Instant::now() + STORE_RETRY + jitter(STORE_RETRY));
                                            }
                                        }
                                        // The server has no such command for us: sending the
                                        // result again cannot help.
                                        (ErrorCode::UnknownCommand, Some(id)) => {
                                            self.unacked.remove(id.as_ref());
                                            self.journal.remove(&id);
                                        }
                                        _ => {}
                                    }
                                }
                                msg @ ServerMessage::Update { .. } => {
                                    let Some(offer) = Offer::from_message(&msg) else { continue };
                                    match self.updater.decide(&offer) {
                                        Decision::Ignore => {}
                                        Decision::Report(report) => {
                                            if reports && let Err(end) = send(&mut ws, report.to_json()).await {
                                                return end;
                                            }
                                        }
                                        Decision::Prepare(offer) => self.prepare(offer, token),
                                    }
                                }
                                ServerMessage::HeartbeatAck { .. }
                                | ServerMessage::Welcome { .. }
                                | ServerMessage::Unknown => {}
                            }
                        }
                        Message::Ping(_) => {
                            // tungstenite queued the pong; send it now.
                            if let Err(e) = ws.flush().await {
                                return End::Dropped(e.to_string());
                            }
                        }
                        Message::Close(frame) => {
                            let code = frame.map_or(1005, |f| u16::from(f.code));
                            let _ = timeout(Duration::from_secs(2), async {
                                while let Some(Ok(_)) = ws.next().await {}
                            })
                            .await;
                            return End::Closed(code);
                        }
                        Message::Binary(_) | Message::Pong(_) | Message::Frame(_) => {}
                    }
                }
            }
        }
    }

    /// Downloads and checks an offered build in the background; the connection goes on.
    fn prepare(&self, offer: Offer, token: &Secret) {
        let (net, token, events) = (self.net.clone(), token.clone(), self.events_tx.clone());
        let (dir, args) = (self.updater.download_dir(), self.updater.args());
        tokio::spawn(async move {
            let prepared = crate::update::prepare(&net, &token, &dir, &args, &offer).await;
            let _ = events.send(Event::Prepared(offer, prepared)).await;
        });
    }

    /// Starts command `id` unless it ran already; returns a stored result to send again.
    fn on_command(&mut self, id: String, name: String, args: String) -> Option<String> {
        if let Some(entry) = self.unacked.get(&id) {
            tracing::info!(command = %id, "command delivered again; sending its stored result");
            return Some(self.result_json(entry));
        }
        if let Some((offer, _)) = &self.switching {
            // Delivered, not run: the new build gets it again on its first connection.
            tracing::info!(command = %id, %name, version = %offer.version, "command left to the new build (switching builds)");
            return None;
        }
        if !self.running.insert(id.clone()) {
            tracing::info!(command = %id, "command delivered again while it runs; not running it twice");
            return None;
        }
        tracing::info!(command = %id, %name, "command received");
        let cfg = self.cfg.clone();
        let journal = self.journal.clone();
        let events = self.events_tx.clone();
        let limit = self.limit.clone();
        let net = self.net.clone();
        tokio::spawn(async move {
            let _permit = limit.acquire_owned().await;
            let started_at = crate::journal::now_ms();
            let (j, i, n) = (journal.clone(), id.clone(), name.clone());
            let begun = tokio::task::spawn_blocking(move || j.begin(&i, &n)).await;
            let outcome = match begun {
                Ok(Ok(())) => run_command(&cfg, &net, &events, &name, &args).await,
                Ok(Err(e)) => commands::failed(
                    "journal_unavailable",
                    format!(
                        "not run: the journal in {} is not writable: {e}",
                        cfg.state_dir.display()
                    ),
                ),
                Err(e) => commands::failed("journal_unavailable", format!("not run: {e}")),
            };
            tracing::info!(command = %id, %name, status = ?outcome.status, "command finished");
            let entry = Entry {
                id,
                name,
                started_at,
                outcome: Some(outcome),
            };
            let (j, e) = (journal, entry.clone());
            if let Ok(Err(err)) = tokio::task::spawn_blocking(move || j.finish(&e)).await {
                tracing::error!(command = %entry.id, error = %err, "could not journal the result; it is lost if the agent dies before the server stores it");
            }
            let _ = events.send(Event::Finished(entry)).await;
        });
        None
    }

    /// The `result` message for a finished entry, shrunk to fit a WebSocket message.
    fn result_json(&self, entry: &Entry) -> String {
        let outcome = entry
            .outcome
            .clone()
            .unwrap_or_else(crate::journal::interrupted);
        let msg = |outcome: Outcome| AgentMessage::Result {
            id: entry.id.clone(),
            status: outcome.status,
            output: Some(agent_protocol::raw_json(&outcome.output)),
        };
        let text = msg(outcome).to_json();
        if text.len() + 64 <= self.cfg.ws_max_message_bytes {
            return text;
        }
        msg(commands::failed(
            "output_too_large",
            format!(
                "the result is {} bytes; the server takes at most {} per message",
                text.len(),
                self.cfg.ws_max_message_bytes
            ),
        ))
        .to_json()
    }

    /// Collects the inventory and sends it: as a message when it fits, else over HTTP in
    /// the background.
    async fn send_inventory(&self, ws: &mut Ws, token: &Secret) -> Result<(), End> {
        let doc = crate::inventory::collect(self.cfg.labels.clone()).await;
        let text = AgentMessage::Inventory {
            data: agent_protocol::raw_json(&doc),
        }
        .to_json();
        if text.len() < self.cfg.ws_max_message_bytes {
            return send(ws, text).await;
        }
        let (net, token, path) = (
            self.net.clone(),
            token.clone(),
            format!("/api/v1/agents/{}/inventory", self.cfg.client_id),
        );
        tokio::spawn(async move {
            let data = inventory_body(&text);
            if let Err(e) = net.post_json(&path, &token, data).await {
                tracing::warn!(error = %e, "could not upload the inventory");
            }
        });
        Ok(())
    }
}

/// The `data` of an inventory message, as the HTTP body.
fn inventory_body(message: &str) -> String {
    serde_json::from_str::<serde_json::Value>(message)
        .map(|v| v["data"].to_string())
        .unwrap_or_default()
}

async fn run_command(
    cfg: &Config,
    net: &Net,
    events: &mpsc::Sender<Event>,
    name: &str,
    args: &str,
) -> Outcome {
    // Each of stdout and stderr gets a quarter of a message, leaving room for escaping.
    let cap = cfg.ws_max_message_bytes / 4;
    match commands::kind(cfg, name) {
        Kind::Ping => commands::ping(),
        Kind::Exec => commands::exec(cfg, args, cap).await,
        Kind::Plugin(path) => commands::plugin_run(cfg, &path, args, cap).await,
        Kind::Inventory => {
            let doc = crate::inventory::collect(cfg.labels.clone()).await;
            let text = AgentMessage::Inventory {
                data: agent_protocol::raw_json(&doc),
            }
            .to_json();
            let bytes = text.len();
            if bytes < cfg.ws_max_message_bytes {
                let _ = events.send(Event::Inventory(text)).await;
                return Outcome {
                    status: agent_protocol::ResultStatus::Ok,
                    output: serde_json::json!({"sent": "websocket", "bytes": bytes}),
                };
            }
            let token = match cfg.token.read() {
                Ok(t) => t,
                Err(e) => return commands::failed("no_token", e),
            };
            let path = format!("/api/v1/agents/{}/inventory", cfg.client_id);
            match net.post_json(&path, &token, inventory_body(&text)).await {
                Ok(()) => Outcome {
                    status: agent_protocol::ResultStatus::Ok,
                    output: serde_json::json!({"sent": "http", "bytes": bytes}),
                },
                Err(e) => commands::failed("upload_failed", e),
            }
        }
        Kind::Unknown => commands::failed(
            "unknown_command",
            format!(
                "this agent has no command `{name}`: the built-ins are ping, inventory and exec, and plug-ins are the executables in plugin_dir"
            ),
        ),
    }
}

async fn send(ws: &mut Ws, text: String) -> Result<(), End> {
    ws.send(Message::text(text))
        .await
        .map_err(|e| End::Dropped(e.to_string()))
}

/// Closes with 1000 and waits briefly for the server's reply.
async fn close(ws: &mut Ws) {
    let frame = CloseFrame {
        code: WsCloseCode::Normal,
        reason: "agent stopping".into(),
    };
    let _ = timeout(Duration::from_secs(2), async {
        if ws.close(Some(frame)).await.is_ok() {
            while let Some(Ok(_)) = ws.next().await {}
        }
    })
    .await;
}
