//! A simulated host agent that speaks the agent protocol (`docs/protocol.md`) as a real
//! agent should, and records what happened to it.
//!
//! Each [`Agent`] is one task that owns one WebSocket at a time:
//! - connects with its token (the `Authorization` header, or `?token=` on request);
//! - waits for `welcome`, says `hello`, answers pings (tungstenite queues the pong; the
//!   agent flushes it at once so it never waits for the next outgoing message);
//! - runs each `command` and replies with a `result`, deduplicating by id: a command
//!   delivered again (delivery is at least once) gets its stored result again, never a
//!   second execution; results not yet acknowledged are sent again after a reconnect;
//! - reconnects after any loss: after 1012 (server restarting or rebalancing) within a
//!   random delay of up to five seconds, otherwise with full-jitter exponential backoff,
//!   and stops for good only on 4001 (replaced) and 4002 (deleted).
//!
//! What it records ([`Stats`]): every disconnect with its close code and how long the
//! connection lasted, every reconnect with its downtime, the first arrival of each command
//! id, every acknowledged result, and refused handshakes. Nothing is printed; callers read
//! the records. The module depends only on [`Endpoint`] so that load generators can build
//! fleets of thousands on it: WebSocket buffers are 4 KiB, as on the server.
//!
//! Commands the agent understands (anything else gets an `error` result):
//! - `echo`: succeeds at once with `{"echo": <args>, "agent": <client_id>}`;
//! - `sleep`: succeeds after `args.ms` milliseconds (default 1000), with
//!   `{"slept_ms": ms}`; the timer keeps running across reconnects;
//! - `fail`: fails at once with `{"error": args.message}`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_protocol::{AgentMessage, CloseCode, ResultStatus, ServerMessage};
use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;

use crate::endpoint::Endpoint;

/// Produces the token for a connection attempt; called once per attempt, so a source
/// that mints fresh tokens recovers from 4003 (token expired) by itself.
pub type TokenSource = Arc<dyn Fn(&str) -> String + Send + Sync>;

/// How the token travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthMode {
    /// `Authorization: Bearer …` (preferred: proxies log query strings).
    Header,
    /// `?token=…`, the original deployment's form.
    Query,
}

/// Full-jitter exponential backoff: a random delay between zero and
/// `min(cap, base × 2^attempt)`.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
}

impl Backoff {
    /// The protocol document's example: one second doubling up to a minute.
    pub const PROTOCOL: Backoff = Backoff {
        base: Duration::from_secs(1),
        cap: Duration::from_secs(60),
    };

    /// The delay before attempt number `attempt` (0 for the first retry).
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << attempt.min(20))
            .min(self.cap);
        random_up_to(ceiling)
    }
}

fn random_up_to(ceiling: Duration) -> Duration {
    let ms = ceiling.as_millis() as u64;
    Duration::from_millis(rand::rng().random_range(0..=ms))
}

/// Everything one agent needs.
#[derive(Clone)]
pub struct AgentConfig {
    pub client_id: String,
    pub endpoint: Endpoint,
    pub token: TokenSource,
    pub auth: AuthMode,
    /// Retry policy after a network loss or a refused handshake.
    pub backoff: Backoff,
    /// After 1012 the agent reconnects within a random delay of up to this (protocol: 5 s).
    pub restart_delay: Duration,
    /// Bound on TCP connect + handshake + welcome.
    pub connect_timeout: Duration,
    /// Reported in `hello`.
    pub version: String,
}

impl AgentConfig {
    pub fn new(client_id: impl Into<String>, endpoint: Endpoint, token: TokenSource) -> Self {
        Self {
            client_id: client_id.into(),
            endpoint,
            token,
            auth: AuthMode::Header,
            backoff: Backoff::PROTOCOL,
            restart_delay: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(10),
            version: concat!("e2e-agent/", env!("CARGO_PKG_VERSION")).to_string(),
        }
    }
}

/// The agent's connection state, published on every change.
#[derive(Clone, Debug, Default)]
pub struct Status {
    pub connected: bool,
    /// The pod named in the current (or last) welcome.
    pub pod: Option<String>,
    pub epoch: Option<u64>,
    /// Welcomes received so far.
    pub connections: u64,
    /// Set when the agent has given up (4001, 4002) or was stopped.
    pub stopped: Option<String>,
}

/// One loss of the connection and the moment the agent was welcomed again.
#[derive(Clone, Debug)]
pub struct Reconnect {
    pub lost_at: Instant,
    pub back_at: Instant,
    /// Close code of the lost connection; `None` when it ended without a close frame.
    pub code: Option<u16>,
    pub from_pod: Option<String>,
    pub to_pod: String,
    /// Connection attempts it took, the successful one included.
    pub attempts: u32,
}

impl Reconnect {
    pub fn downtime(&self) -> Duration {
        self.back_at - self.lost_at
    }
}

/// One connection that ended.
#[derive(Clone, Debug)]
pub struct Disconnect {
    pub at: Instant,
    pub pod: Option<String>,
    /// From the welcome to the end of the connection.
    pub connected_for: Duration,
    pub code: Option<u16>,
    pub detail: String,
}

/// What happened to the agent so far.
#[derive(Debug, Default)]
pub struct Stats {
    /// First arrival of each command id.
    pub received: HashMap<String, Instant>,
    /// Command messages received, repeats included.
    pub deliveries: u64,
    /// When each result was acknowledged (stored by the server).
    pub acked: HashMap<String, Instant>,
    pub reconnects: Vec<Reconnect>,
    pub disconnects: Vec<Disconnect>,
    /// Refused handshakes: when, and the HTTP status.
    pub refusals: Vec<(Instant, u16)>,
    /// Attempts that failed below HTTP (connection refused or reset, timeouts).
    pub connect_errors: u64,
    /// `error` messages from the server.
    pub server_errors: Vec<String>,
}

struct Shared {
    client_id: String,
    status: watch::Sender<Status>,
    stats: Mutex<Stats>,
}

/// A running simulated agent. Dropping it without [`Agent::stop`] aborts its task.
pub struct Agent {
    shared: Arc<Shared>,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Agent {
    /// Starts the agent; it connects at once.
    pub fn spawn(config: AgentConfig) -> Agent {
        let (status, _) = watch::channel(Status::default());
        let shared = Arc::new(Shared {
            client_id: config.client_id.clone(),
            status,
            stats: Mutex::new(Stats::default()),
        });
        let stop = CancellationToken::new();
        let (results_tx, results_rx) = mpsc::unbounded_channel();
        let runner = Runner {
            config,
            shared: shared.clone(),
            stop: stop.clone(),
            results_tx,
            results_rx,
            done: HashMap::new(),
            executing: HashSet::new(),
        };
        let task = tokio::spawn(runner.run());
        Agent {
            shared,
            stop,
            task: Some(task),
        }
    }

    pub fn client_id(&self) -> &str {
        &self.shared.client_id
    }

    pub fn status(&self) -> Status {
        self.shared.status.borrow().clone()
    }

    /// Notified on every status change.
    pub fn watch(&self) -> watch::Receiver<Status> {
        self.shared.status.subscribe()
    }

    /// Reads the records under their lock; keep `f` short.
    pub fn with_stats<R>(&self, f: impl FnOnce(&Stats) -> R) -> R {
        f(&self.shared.stats.lock().expect("stats lock"))
    }

    /// Closes the connection politely (close frame, 1000) and ends the task.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(mut task) = self.task.take() {
            // The close handshake is bounded inside the task; this is a backstop.
            if timeout(Duration::from_secs(5), &mut task).await.is_err() {
                task.abort();
                eprintln!(
                    "agent {}: did not stop within 5s; aborted",
                    self.shared.client_id
                );
            }
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

type Ws = WebSocketStream<TcpStream>;

/// Client-side buffers as small as the server's: a fleet of thousands stays cheap.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(4 * 1024)
        .max_write_buffer_size(1024 * 1024)
        .max_message_size(Some(1024 * 1024))
        .max_frame_size(Some(1024 * 1024))
}

/// Why a connection attempt failed.
enum Failure {
    /// The server (or the ingress) answered the handshake with this HTTP status.
    Refused(u16),
    /// Nothing usable came back: refused, reset, timed out, or no welcome.
    Io(String),
}

/// How a session ended.
enum End {
    Stopped,
    Closed { code: Option<u16>, reason: String },
    Network(String),
}

/// A command's result, kept until acknowledged and resent if the command comes again.
struct Done {
    text: String,
    acked: bool,
}

struct Runner {
    config: AgentConfig,
    shared: Arc<Shared>,
    stop: CancellationToken,
    /// Results of commands that finish later (`sleep`); they survive reconnects.
    results_tx: mpsc::UnboundedSender<(String, String)>,
    results_rx: mpsc::UnboundedReceiver<(String, String)>,
    done: HashMap<String, Done>,
    executing: HashSet<String>,
}

/// The connection that was lost, for the reconnect record.
struct Lost {
    at: Instant,
    code: Option<u16>,
    pod: Option<String>,
}

impl Runner {
    async fn run(mut self) {
        let mut failures: u32 = 0;
        let mut lost: Option<Lost> = None;
        let mut delay = Duration::ZERO;
        loop {
            if !delay.is_zero() {
                tokio::select! {
                    _ = self.stop.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            let attempt = tokio::select! {
                _ = self.stop.cancelled() => break,
                attempt = self.connect() => attempt,
            };
            let (mut ws, welcome) = match attempt {
                Ok(ok) => ok,
                Err(failure) => {
                    {
                        let mut stats = self.stats();
                        match failure {
                            Failure::Refused(status) => {
                                stats.refusals.push((Instant::now(), status))
                            }
                            Failure::Io(_) => stats.connect_errors += 1,
                        }
                    }
                    delay = self.config.backoff.delay(failures);
                    failures = failures.saturating_add(1);
                    continue;
                }
            };

            let pod = welcome["pod"].as_str().unwrap_or_default().to_string();
            let welcomed_at = Instant::now();
            self.shared.status.send_modify(|s| {
                s.connected = true;
                s.pod = Some(pod.clone());
                s.epoch = welcome["epoch"].as_u64();
                s.connections += 1;
            });
            if let Some(l) = lost.take() {
                self.stats().reconnects.push(Reconnect {
                    lost_at: l.at,
                    back_at: welcomed_at,
                    code: l.code,
                    from_pod: l.pod,
                    to_pod: pod.clone(),
                    attempts: failures + 1,
                });
            }
            failures = 0;

            let end = match self.greet(&mut ws).await {
                Ok(()) => self.session(&mut ws).await,
                Err(end) => end,
            };
            let now = Instant::now();
            self.shared.status.send_modify(|s| s.connected = false);
            let (code, detail) = match &end {
                End::Stopped => (Some(1000), "stopped by the harness".to_string()),
                End::Closed { code, reason } => (*code, reason.clone()),
                End::Network(e) => (None, e.clone()),
            };
            self.stats().disconnects.push(Disconnect {
                at: now,
                pod: Some(pod.clone()),
                connected_for: now - welcomed_at,
                code,
                detail,
            });
            match end {
                End::Stopped => break,
                End::Closed {
                    code: Some(c),
                    reason,
                } => match CloseCode::from(c).policy() {
                    // Deleted, or another process holds the id: the protocol says not to
                    // reconnect in a loop.
                    agent_protocol::Reconnect::Stop | agent_protocol::Reconnect::AnotherHost => {
                        self.shared.status.send_modify(|s| {
                            s.stopped = Some(format!("closed {c} ({reason}); not reconnecting"))
                        });
                        return;
                    }
                    agent_protocol::Reconnect::Soon => {
                        delay = random_up_to(self.config.restart_delay)
                    }
                    // A fresh token is minted for every attempt, so 4003 needs no more.
                    agent_protocol::Reconnect::RenewToken | agent_protocol::Reconnect::Backoff => {
                        delay = self.config.backoff.delay(0)
                    }
                },
                End::Closed { code: None, .. } | End::Network(_) => {
                    delay = self.config.backoff.delay(0)
                }
            }
            lost = Some(Lost {
                at: now,
                code,
                pod: Some(pod),
            });
        }
        self.shared.status.send_modify(|s| {
            s.connected = false;
            s.stopped.get_or_insert_with(|| "stopped".into());
        });
    }

    fn stats(&self) -> std::sync::MutexGuard<'_, Stats> {
        self.shared.stats.lock().expect("stats lock")
    }

    /// TCP connect, WebSocket handshake, and the welcome, within `connect_timeout`.
    async fn connect(&self) -> Result<(Ws, Value), Failure> {
        let bound = self.config.connect_timeout;
        match timeout(bound, self.try_connect()).await {
            Ok(result) => result,
            Err(_) => Err(Failure::Io(format!("no welcome within {bound:?}"))),
        }
    }

    async fn try_connect(&self) -> Result<(Ws, Value), Failure> {
        let id = &self.config.client_id;
        let token = (self.config.token)(id);
        let mut ws = open(&self.config.endpoint, id, Some((self.config.auth, &token))).await?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) => {
                    let v: Value = serde_json::from_str(text.as_str())
                        .map_err(|e| Failure::Io(format!("first message is not JSON: {e}")))?;
                    if !matches!(
                        ServerMessage::parse(text.as_str()),
                        Ok(ServerMessage::Welcome { .. })
                    ) {
                        return Err(Failure::Io(format!("first message is not a welcome: {v}")));
                    }
                    return Ok((ws, v));
                }
                Some(Ok(Message::Ping(_))) => {
                    let _ = ws.flush().await;
                }
                Some(Ok(Message::Close(frame))) => {
                    return Err(Failure::Io(format!("closed before the welcome: {frame:?}")));
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(Failure::Io(e.to_string())),
                None => return Err(Failure::Io("closed before the welcome".into())),
            }
        }
    }

    /// `hello`, then every result the server has not acknowledged yet.
    async fn greet(&mut self, ws: &mut Ws) -> Result<(), End> {
        let hello = AgentMessage::Hello {
            version: Some(self.config.version.clone()),
            hostname: Some(self.config.client_id.clone()),
            os: Some(std::env::consts::OS.into()),
            arch: Some(std::env::consts::ARCH.into()),
            labels: None,
        };
        send(ws, hello.to_json()).await?;
        let pending: Vec<String> = self
            .done
            .values()
            .filter(|d| !d.acked)
            .map(|d| d.text.clone())
            .collect();
        for text in pending {
            send(ws, text).await?;
        }
        Ok(())
    }

    async fn session(&mut self, ws: &mut Ws) -> End {
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => {
                    // Close politely; the bound keeps a dead peer from holding us.
                    let _ = timeout(Duration::from_secs(2), async {
                        if ws.close(None).await.is_ok() {
                            while let Some(Ok(_)) = ws.next().await {}
                        }
                    }).await;
                    return End::Stopped;
                }
                Some((id, text)) = self.results_rx.recv() => {
                    self.executing.remove(&id);
                    self.done.insert(id, Done { text: text.clone(), acked: false });
                    if let Err(end) = send(ws, text).await {
                        return end;
                    }
                }
                frame = ws.next() => {
                    let result = match frame {
                        None => Err(End::Network("connection closed without a close frame".into())),
                        Some(Err(e)) => Err(End::Network(e.to_string())),
                        Some(Ok(Message::Text(text))) => self.on_text(ws, text.as_str()).await,
                        // tungstenite queued the pong; send it now.
                        Some(Ok(Message::Ping(_))) => ws.flush().await.map_err(|e| End::Network(e.to_string())),
                        Some(Ok(Message::Close(frame))) => {
                            // Sends the close reply tungstenite queued.
                            let _ = timeout(Duration::from_secs(1), ws.flush()).await;
                            let (code, reason) = frame
                                .map(|f| (Some(u16::from(f.code)), f.reason.to_string()))
                                .unwrap_or((None, "close frame without a code".into()));
                            Err(End::Closed { code, reason })
                        }
                        Some(Ok(_)) => Ok(()),
                    };
                    if let Err(end) = result {
                        return end;
                    }
                }
            }
        }
    }

    async fn on_text(&mut self, ws: &mut Ws, text: &str) -> Result<(), End> {
        let Ok(msg) = ServerMessage::parse(text) else {
            self.stats()
                .server_errors
                .push(format!("unparseable message: {text}"));
            return Ok(());
        };
        match msg {
            ServerMessage::Command { id, name, args, .. } => {
                let id = id.into_owned();
                {
                    let mut stats = self.stats();
                    stats.deliveries += 1;
                    stats
                        .received
                        .entry(id.clone())
                        .or_insert_with(Instant::now);
                }
                if let Some(done) = self.done.get(&id) {
                    // Delivered again (at least once): the stored result, not a rerun.
                    let text = done.text.clone();
                    return send(ws, text).await;
                }
                if self.executing.contains(&id) {
                    // Still running; its result follows when it finishes.
                    return Ok(());
                }
                let args = serde_json::from_str(args.get()).unwrap_or(Value::Null);
                self.execute(ws, id, &name, args).await
            }
            ServerMessage::Ack { id } => {
                let id = id.as_ref();
                if let Some(done) = self.done.get_mut(id) {
                    done.acked = true;
                }
                self.stats()
                    .acked
                    .entry(id.to_string())
                    .or_insert_with(Instant::now);
                Ok(())
            }
            ServerMessage::Error { .. } => {
                self.stats().server_errors.push(text.to_string());
                Ok(())
            }
            _ => Ok(()),
        }
    }

    async fn execute(
        &mut self,
        ws: &mut Ws,
        id: String,
        name: &str,
        args: Value,
    ) -> Result<(), End> {
        let (status, output) = match name {
            "echo" => (
                ResultStatus::Ok,
                json!({"echo": args, "agent": self.config.client_id}),
            ),
            "fail" => (ResultStatus::Error, json!({"error": args["message"]})),
            "sleep" => {
                let ms = args["ms"].as_u64().unwrap_or(1000);
                let tx = self.results_tx.clone();
                self.executing.insert(id.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    let text = result_text(&id, ResultStatus::Ok, &json!({"slept_ms": ms}));
                    let _ = tx.send((id, text));
                });
                return Ok(());
            }
            other => (
                ResultStatus::Error,
                json!({"error": format!("unknown command `{other}`")}),
            ),
        };
        let text = result_text(&id, status, &output);
        self.done.insert(
            id,
            Done {
                text: text.clone(),
                acked: false,
            },
        );
        send(ws, text).await
    }
}

fn result_text(id: &str, status: ResultStatus, output: &Value) -> String {
    AgentMessage::Result {
        id: id.to_string(),
        status,
        output: Some(agent_protocol::raw_json(output)),
    }
    .to_json()
}

async fn send(ws: &mut Ws, text: String) -> Result<(), End> {
    ws.send(Message::text(text))
        .await
        .map_err(|e| End::Network(e.to_string()))
}

/// Opens a WebSocket to `/ws/{client_id}` through `endpoint`.
async fn open(
    endpoint: &Endpoint,
    client_id: &str,
    auth: Option<(AuthMode, &str)>,
) -> Result<Ws, Failure> {
    let mut url = endpoint.ws_url(&format!("/ws/{client_id}"));
    if let Some((AuthMode::Query, token)) = auth {
        url.push_str("?token=");
        url.push_str(token);
    }
    let mut request = url
        .into_client_request()
        .map_err(|e| Failure::Io(format!("bad request: {e}")))?;
    if let Some((AuthMode::Header, token)) = auth {
        let value = http::HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|e| Failure::Io(format!("bad token: {e}")))?;
        request
            .headers_mut()
            .insert(http::header::AUTHORIZATION, value);
    }
    let stream = TcpStream::connect(endpoint.addr)
        .await
        .map_err(|e| Failure::Io(format!("connect {}: {e}", endpoint.addr)))?;
    let _ = stream.set_nodelay(true);
    match tokio_tungstenite::client_async_with_config(request, stream, Some(ws_config())).await {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::Error::Http(resp)) => Err(Failure::Refused(resp.status().as_u16())),
        Err(e) => Err(Failure::Io(e.to_string())),
    }
}

/// The outcome of a single handshake, for checks that expect refusals.
#[derive(Debug)]
pub enum Handshake {
    /// Upgraded; this was the welcome. The connection was closed again.
    Accepted { welcome: Value },
    /// Refused before the upgrade with this status.
    Refused { status: u16 },
}

/// One connection attempt without retries: the welcome, or the refusal's status.
pub async fn handshake(
    endpoint: &Endpoint,
    client_id: &str,
    auth: Option<(AuthMode, &str)>,
    bound: Duration,
) -> Result<Handshake, String> {
    let attempt = async {
        let mut ws = match open(endpoint, client_id, auth).await {
            Ok(ws) => ws,
            Err(Failure::Refused(status)) => return Ok(Handshake::Refused { status }),
            Err(Failure::Io(e)) => return Err(e),
        };
        while let Some(frame) = ws.next().await {
            match frame {
                Ok(Message::Text(text)) => {
                    let welcome: Value =
                        serde_json::from_str(text.as_str()).map_err(|e| e.to_string())?;
                    let _ = ws.close(None).await;
                    while let Some(Ok(_)) = ws.next().await {}
                    return Ok(Handshake::Accepted { welcome });
                }
                Ok(_) => continue,
                Err(e) => return Err(e.to_string()),
            }
        }
        Err("closed before the welcome".to_string())
    };
    timeout(bound, attempt)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {bound:?}")))
}

/// A set of agents started together.
pub struct Fleet {
    agents: Vec<Agent>,
}

impl Fleet {
    pub fn spawn(configs: impl IntoIterator<Item = AgentConfig>) -> Fleet {
        Fleet {
            agents: configs.into_iter().map(Agent::spawn).collect(),
        }
    }

    pub fn agents(&self) -> &[Agent] {
        &self.agents
    }

    pub fn len(&self) -> usize {
        self.agents.len()
    }

    pub fn is_empty(&self) -> bool {
        self.agents.is_empty()
    }

    pub fn connected(&self) -> usize {
        self.agents.iter().filter(|a| a.status().connected).count()
    }

    /// Connected agents per pod.
    pub fn by_pod(&self) -> BTreeMap<String, usize> {
        let mut pods = BTreeMap::new();
        for agent in &self.agents {
            let status = agent.status();
            if let (true, Some(pod)) = (status.connected, status.pod) {
                *pods.entry(pod).or_insert(0) += 1;
            }
        }
        pods
    }

    /// Agents that gave up (closed 4001 or 4002), with the reason.
    pub fn given_up(&self) -> Vec<(String, String)> {
        self.agents
            .iter()
            .filter_map(|a| {
                a.status()
                    .stopped
                    .map(|why| (a.client_id().to_string(), why))
            })
            .collect()
    }

    /// Every reconnect whose loss happened at or after `since`.
    pub fn reconnects_since(&self, since: Instant) -> Vec<Reconnect> {
        self.agents
            .iter()
            .flat_map(|a| {
                a.with_stats(|s| {
                    s.reconnects
                        .iter()
                        .filter(|r| r.lost_at >= since)
                        .cloned()
                        .collect::<Vec<_>>()
                })
            })
            .collect()
    }

    /// Every disconnect at or after `since`.
    pub fn disconnects_since(&self, since: Instant) -> Vec<Disconnect> {
        self.agents
            .iter()
            .flat_map(|a| {
                a.with_stats(|s| {
                    s.disconnects
                        .iter()
                        .filter(|d| d.at >= since)
                        .cloned()
                        .collect::<Vec<_>>()
                })
            })
            .collect()
    }

    /// Stops every agent, concurrently.
    pub async fn stop(self) {
        futures_util::future::join_all(self.agents.into_iter().map(Agent::stop)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_stays_within_its_ceiling() {
        let b = Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_millis(1000),
        };
        for attempt in 0..40 {
            let ceiling = Duration::from_millis((100u64 << attempt.min(20)).min(1000));
            for _ in 0..50 {
                assert!(b.delay(attempt) <= ceiling, "attempt {attempt}");
            }
        }
    }

    #[test]
    fn results_are_protocol_messages() {
        let v: Value =
            serde_json::from_str(&result_text("c1", ResultStatus::Ok, &json!({"x": 1}))).unwrap();
        assert_eq!(v["type"], "result");
        assert_eq!(v["id"], "c1");
        assert_eq!(v["status"], "ok");
        assert_eq!(v["output"]["x"], 1);
    }
}
