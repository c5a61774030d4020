//! Test harness: each test gets its own server on a free port, its own database (a fresh
//! SQLite file or a fresh PostgreSQL database) and typed clients.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use agent_protocol::{AgentMessage, ResultStatus};
use agent_server::AppState;
use agent_server::auth::{Role, Tokens};
use agent_server::config::Secret;
use agent_server::{Application, Config};
use diesel::Connection;
use diesel::connection::SimpleConnection;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const SECRET: &str = "integration-test-secret-0123456789abcdef";
/// Bound on every wait for an event; tests never sleep to wait.
pub const WAIT: Duration = Duration::from_secs(10);

/// The one way tests wait: polls `check` until it holds, within `bound` (a failure names
/// `what`); returns how long it took. Never a bare sleep.
pub async fn eventually(
    bound: Duration,
    what: &str,
    mut check: impl AsyncFnMut() -> bool,
) -> Duration {
    let started = std::time::Instant::now();
    loop {
        if check().await {
            return started.elapsed();
        }
        assert!(started.elapsed() < bound, "{what}: not within {bound:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Attempts a WebSocket handshake with the server at `addr` (`host:port`) as `id`, with
/// `headers` and `query` (empty, or `?…`); on refusal returns the HTTP status and body.
pub async fn open_session(
    addr: &str,
    id: &str,
    headers: &[(&str, &str)],
    query: &str,
) -> Result<Agent, (u16, String)> {
    let mut req = format!("ws://{addr}/ws/{id}{query}")
        .into_client_request()
        .unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            http::HeaderValue::from_str(v).unwrap(),
        );
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => {
            let mut agent = Agent {
                ws,
                welcome: Value::Null,
            };
            agent.welcome = agent.recv().await;
            assert_eq!(
                agent.welcome["type"], "welcome",
                "first message is the welcome"
            );
            Ok(agent)
        }
        Err(tungstenite::Error::Http(resp)) => {
            let status = resp.status().as_u16();
            let body = resp
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            Err((status, body))
        }
        Err(e) => panic!("unexpected handshake error: {e}"),
    }
}

/// Connects as `id` with `token` to the server listening on 127.0.0.1:`port` and reads
/// the welcome.
pub async fn connect_to(port: u16, id: &str, token: &str) -> Agent {
    let bearer = format!("Bearer {token}");
    open_session(
        &format!("127.0.0.1:{port}"),
        id,
        &[("authorization", &bearer)],
        "",
    )
    .await
    .expect("agent connects")
}

/// Checks that every answer of [`TestApp::requests_at_once`] is a 503
/// `store_unavailable` whose message names the database, within `bound`; returns the
/// slowest answer's time.
pub fn all_store_unavailable(answers: &[(u16, Value, Duration)], bound: Duration) -> Duration {
    for (status, body, took) in answers {
        assert_eq!(
            (*status, body["error"]["code"].as_str()),
            (503, Some("store_unavailable")),
            "{body}"
        );
        assert!(*took < bound, "503 after {took:?}: {body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("database"), "{message}");
    }
    answers.iter().map(|(_, _, t)| *t).max().unwrap_or_default()
}

#[derive(Clone, Copy, Debug)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// One `#[tokio::test]` running `$scenario` against a fresh app on `$backend`.
macro_rules! scenario_test {
    ($test:ident, $backend:ident, $scenario:path, [$(($k:literal, $v:literal)),*]) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $test() {
            let vars: &[(&str, &str)] = &[$(($k, $v)),*];
            if let Some(app) = $crate::helpers::spawn_app_with($crate::helpers::Backend::$backend, vars).await {
                $scenario(app).await;
            }
        }
    };
}
pub(crate) use scenario_test;

/// For each `async fn(TestApp)` scenario, a module with one test per backend, each with
/// the default test configuration plus the given overrides.
macro_rules! on_both_backends {
    ($($scenario:ident $(with [$($k:literal = $v:literal),* $(,)?])?;)*) => {$(
        mod $scenario {
            $crate::helpers::scenario_test!(sqlite, Sqlite, super::$scenario, [$($(($k, $v)),*)?]);
            $crate::helpers::scenario_test!(postgres, Postgres, super::$scenario, [$($(($k, $v)),*)?]);
        }
    )*};
}
pub(crate) use on_both_backends;

/// Like [`on_both_backends`], for behaviour that does not touch the database.
macro_rules! on_sqlite {
    ($($scenario:ident $(with [$($k:literal = $v:literal),* $(,)?])?;)*) => {$(
        mod $scenario {
            $crate::helpers::scenario_test!(sqlite, Sqlite, super::$scenario, [$($(($k, $v)),*)?]);
        }
    )*};
}
pub(crate) use on_sqlite;

/// A database that exists for one test.
pub enum TestDb {
    /// Kept for its lifetime: the directory is removed on drop.
    Sqlite {
        _dir: tempfile::TempDir,
    },
    Postgres {
        admin_url: String,
        name: String,
    },
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let TestDb::Postgres { admin_url, name } = self
            && let Ok(mut c) = diesel::PgConnection::establish(admin_url)
        {
            let _ = c.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
        }
    }
}

/// Where to create per-test databases: TEST_POSTGRES_URL, else the local server on
/// 127.0.0.1:5432, else (where Docker runs and nothing else answers) a disposable
/// PostgreSQL container shared by this test binary.
fn postgres_admin_url() -> Result<String, String> {
    if let Ok(url) = std::env::var("TEST_POSTGRES_URL") {
        return Ok(url);
    }
    let local = "postgres://postgres@127.0.0.1:5432/postgres".to_string();
    match diesel::PgConnection::establish(&local) {
        Ok(_) => Ok(local),
        Err(e) => docker_postgres().clone().ok_or_else(|| {
            format!("PostgreSQL not reachable at {local} ({e}) and no Docker engine to start one")
        }),
    }
}

/// One PostgreSQL container per test binary, removed when the binary exits.
fn docker_postgres() -> &'static Option<String> {
    static URL: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    static CONTAINER: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    extern "C" fn remove_container() {
        if let Some(id) = CONTAINER.get() {
            let _ = std::process::Command::new("docker")
                .args(["rm", "-f", id])
                .output();
        }
    }
    URL.get_or_init(|| {
        let docker = |args: &[&str]| {
            std::process::Command::new("docker")
                .args(args)
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        };
        docker(&["info", "--format", "{{.ServerVersion}}"])?;
        eprintln!("starting a disposable PostgreSQL container for the tests");
        let id = docker(&[
            "run",
            "-d",
            "--rm",
            "--label",
            "agent-server-tests",
            "-e",
            "POSTGRES_HOST_AUTH_METHOD=trust",
            "-p",
            "127.0.0.1::5432",
            "postgres:16-alpine",
        ])?;
        let _ = CONTAINER.set(id.clone());
        // SAFETY: registers a plain extern "C" function to run at process exit.
        unsafe { libc::atexit(remove_container) };
        let port = docker(&["port", &id, "5432/tcp"])?
            .lines()
            .next()?
            .rsplit(':')
            .next()?
            .to_string();
        let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while diesel::PgConnection::establish(&url).is_err() {
            if std::time::Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Some(url)
    })
}

/// A PostgreSQL database for this test, or `None` (a loud skip) when PostgreSQL is not
/// reachable outside CI. In CI a missing PostgreSQL fails the test.
pub fn postgres_db() -> Option<(String, TestDb)> {
    let admin_url = match postgres_admin_url() {
        Ok(url) => url,
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("SKIPPED: {e}; set TEST_POSTGRES_URL");
            return None;
        }
        Err(e) => panic!("{e}"),
    };
    let mut conn = diesel::PgConnection::establish(&admin_url)
        .unwrap_or_else(|e| panic!("PostgreSQL at {admin_url}: {e}"));
    let name = format!("agent_it_{}", uuid::Uuid::new_v4().simple());
    conn.batch_execute(&format!("CREATE DATABASE {name}"))
        .expect("create test database");
    let (base, _) = admin_url
        .rsplit_once('/')
        .expect("URL with a database path");
    Some((
        format!("{base}/{name}"),
        TestDb::Postgres { admin_url, name },
    ))
}

pub fn test_config(
    database_url: &str,
    data_dir: &std::path::Path,
    overrides: &[(&str, &str)],
) -> Config {
    let mut vars: HashMap<String, String> = [
        ("SERVER_HOST", "127.0.0.1"),
        ("SERVER_PORT", "0"),
        ("SERVER_URL", "https://agents.example.com"),
        ("SECRET_KEY", SECRET),
        ("WS_HEARTBEAT_INTERVAL", "15"),
        ("WS_OFFLINE_TIMEOUT", "60"),
        ("DRAIN_WINDOW", "1"),
        ("SHUTDOWN_TIMEOUT", "10"),
        ("POD_ID", "pod-test"),
        ("METRICS_PORT", "0"),
        ("DATABASE_POOL_SIZE", "4"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    vars.insert("DATABASE_URL".into(), database_url.to_string());
    vars.insert("DATA_DIR".into(), data_dir.display().to_string());
    for (k, v) in overrides {
        vars.insert(k.to_string(), v.to_string());
    }
    Config::from_source(&move |k: &str| vars.get(k).cloned()).expect("valid test configuration")
}

pub struct TestApp {
    pub addr: SocketAddr,
    pub base: String,
    /// `http://` and the metrics listener's address.
    pub metrics_base: String,
    pub http: reqwest::Client,
    pub admin: String,
    /// The configuration it runs with (replicas start from it).
    pub config: Config,
    /// Its DATABASE_URL, for tests that open a connection of their own.
    pub database_url: String,
    /// The running app's handles (store, hub, metrics), for domain-level scenarios.
    pub state: AppState,
    tokens: Tokens,
    shutdown: Option<oneshot::Sender<()>>,
    pub server: Option<JoinHandle<bool>>,
    /// Owned by the first app; replicas share it.
    _data_dir: Option<tempfile::TempDir>,
    _db: Option<TestDb>,
}

pub async fn spawn_app_with(backend: Backend, overrides: &[(&str, &str)]) -> Option<TestApp> {
    let data_dir = tempfile::tempdir().unwrap();
    let (url, db) = match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().unwrap();
            (
                format!("sqlite://{}", dir.path().join("test.db").display()),
                TestDb::Sqlite { _dir: dir },
            )
        }
        Backend::Postgres => postgres_db()?,
    };
    let config = test_config(&url, data_dir.path(), overrides);
    let mut app = start(config, url).await;
    app._data_dir = Some(data_dir);
    app._db = Some(db);
    Some(app)
}

/// An app on the database at `url` (which the caller owns), with the test configuration
/// plus `overrides`.
pub async fn spawn_app_on(url: &str, overrides: &[(&str, &str)]) -> TestApp {
    let data_dir = tempfile::tempdir().unwrap();
    let config = test_config(url, data_dir.path(), overrides);
    let mut app = start(config, url.to_string()).await;
    app._data_dir = Some(data_dir);
    app
}

async fn start(config: Config, database_url: String) -> TestApp {
    let app = Application::build(config.clone())
        .await
        .expect("app builds");
    let addr = app.local_addr();
    let metrics_base = format!("http://{}", app.metrics_addr());
    let state = app.state().clone();
    let (tx, rx) = oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async {
        let _ = rx.await;
    }));
    let tokens = Tokens::new(&Secret::new(SECRET), jsonwebtoken::Algorithm::HS256);
    TestApp {
        addr,
        base: format!("http://{addr}"),
        metrics_base,
        admin: tokens.mint("admin", Role::Admin, Duration::from_secs(3600)),
        http: reqwest::Client::new(),
        config,
        database_url,
        state,
        tokens,
        shutdown: Some(tx),
        server: Some(server),
        _data_dir: None,
        _db: None,
    }
}

impl TestApp {
    /// Another replica: the same database, binary volume and key, its own port and pod.
    pub async fn spawn_replica(&self, pod: &str) -> TestApp {
        let mut config = self.config.clone();
        config.pod_id = pod.to_string();
        start(config, self.database_url.clone()).await
    }

    pub fn agent_token(&self, id: &str) -> String {
        self.tokens.mint(id, Role::Agent, Duration::from_secs(3600))
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `/metrics` on the metrics listener.
    pub fn metrics_url(&self) -> String {
        format!("{}/metrics", self.metrics_base)
    }

    /// Connects as `id` with a valid token and reads the welcome message.
    pub async fn connect(&self, id: &str) -> Agent {
        let token = self.agent_token(id);
        self.connect_with(id, &[("authorization", &format!("Bearer {token}"))], "")
            .await
            .expect("agent connects")
    }

    /// Attempts a WebSocket handshake; on refusal returns the HTTP status and body.
    pub async fn connect_with(
        &self,
        id: &str,
        headers: &[(&str, &str)],
        query: &str,
    ) -> Result<Agent, (u16, String)> {
        open_session(&self.addr.to_string(), id, headers, query).await
    }

    /// `n` API calls at once, half of them queueing a command for `agent`, half listing
    /// the agents: each one's status, body and how long it took.
    pub async fn requests_at_once(&self, agent: &str, n: usize) -> Vec<(u16, Value, Duration)> {
        let path = format!("/api/v1/agents/{agent}/commands");
        let requests = (0..n).map(|i| {
            let path = &path;
            async move {
                let started = std::time::Instant::now();
                let (status, body) = if i % 2 == 0 {
                    self.post(path, &json!({"name": "uptime"})).await
                } else {
                    self.get("/api/v1/agents").await
                };
                (status, body, started.elapsed())
            }
        });
        futures_util::future::join_all(requests).await
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let resp = self
            .http
            .get(self.url(path))
            .bearer_auth(&self.admin)
            .send()
            .await
            .unwrap();
        status_json(resp).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let resp = self
            .http
            .post(self.url(path))
            .bearer_auth(&self.admin)
            .json(body)
            .send()
            .await
            .unwrap();
        status_json(resp).await
    }

    pub async fn delete(&self, path: &str) -> (u16, Value) {
        let resp = self
            .http
            .delete(self.url(path))
            .bearer_auth(&self.admin)
            .send()
            .await
            .unwrap();
        status_json(resp).await
    }

    /// Uploads `body` as a binary; returns the status and the JSON answer.
    pub async fn upload(&self, query: &str, body: Vec<u8>) -> (u16, Value) {
        let resp = self
            .http
            .post(self.url(&format!("/api/v1/binaries?{query}")))
            .bearer_auth(&self.admin)
            .body(body)
            .send()
            .await
            .unwrap();
        status_json(resp).await
    }

    /// Uploads a binary that must be accepted; returns its id.
    pub async fn uploaded(&self, name: &str, version: &str, os: &str, arch: &str) -> String {
        let (status, body) = self
            .upload(
                &format!("name={name}&version={version}&os={os}&arch={arch}"),
                format!("{name} {version} {os} {arch}").into_bytes(),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        body["id"].as_str().unwrap().to_string()
    }

    /// Starts a rollout; returns its JSON.
    pub async fn rollout(&self, body: Value) -> Value {
        let (status, resp) = self.post("/api/v1/rollouts", &body).await;
        assert_eq!(status, 201, "{resp}");
        resp
    }

    /// Connects as `id` and says hello with this version, os and arch.
    pub async fn connect_as(&self, id: &str, version: &str, labels: &[&str]) -> Agent {
        let mut agent = self.connect(id).await;
        agent
            .send_msg(&AgentMessage::Hello {
                version: Some(version.into()),
                hostname: None,
                os: Some("linux".into()),
                arch: Some("x86_64".into()),
                labels: Some(labels.iter().map(|l| l.to_string()).collect()),
            })
            .await;
        agent
    }

    /// Registers an agent (as token minting for enrollment does).
    pub async fn enroll(&self, id: &str) {
        let (status, _) = self.post("/api/v1/tokens", &json!({"client_id": id})).await;
        assert_eq!(status, 201);
    }

    /// Queues a command and returns its id.
    pub async fn command(&self, agent: &str, name: &str, args: Value) -> String {
        let (status, body) = self
            .post(
                &format!("/api/v1/agents/{agent}/commands"),
                &json!({"name": name, "args": args}),
            )
            .await;
        assert_eq!(status, 202, "{body}");
        body["id"].as_str().unwrap().to_string()
    }

    pub async fn command_status(&self, id: &str) -> Value {
        let (status, body) = self.get(&format!("/api/v1/commands/{id}")).await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Polls `path` until `check` holds, within [`WAIT`].
    pub async fn eventually(&self, path: &str, check: impl Fn(&Value) -> bool) -> Value {
        let mut last = Value::Null;
        eventually(WAIT, &format!("condition on {path}"), async || {
            last = self.get(path).await.1;
            check(&last)
        })
        .await;
        last
    }

    /// Triggers the drain sequence (as SIGTERM does) and returns the server task.
    pub fn begin_shutdown(&mut self) -> JoinHandle<bool> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.server.take().expect("server still running")
    }
}

pub async fn status_json(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// A protocol-speaking test agent.
pub struct Agent {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub welcome: Value,
}

#[derive(Debug)]
pub enum Frame {
    Json(Value),
    Ping,
    Close(Option<(u16, String)>),
}

impl Agent {
    /// The next frame of any kind (pongs are answered by tungstenite), within [`WAIT`].
    pub async fn next_frame(&mut self) -> Frame {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a frame within the wait bound");
            match msg {
                None => return Frame::Close(None),
                Some(Err(_)) => return Frame::Close(None),
                Some(Ok(Message::Text(t))) => {
                    return Frame::Json(serde_json::from_str(t.as_str()).unwrap());
                }
                Some(Ok(Message::Ping(_))) => return Frame::Ping,
                Some(Ok(Message::Close(frame))) => {
                    return Frame::Close(frame.map(|f| (u16::from(f.code), f.reason.to_string())));
                }
                Some(Ok(_)) => continue,
            }
        }
    }

    /// The next JSON message, skipping pings.
    pub async fn recv(&mut self) -> Value {
        loop {
            match self.next_frame().await {
                Frame::Json(v) => return v,
                Frame::Ping => continue,
                Frame::Close(c) => panic!("connection closed while waiting for a message: {c:?}"),
            }
        }
    }

    /// The next message of `type`, skipping others.
    pub async fn recv_type(&mut self, kind: &str) -> Value {
        loop {
            let v = self.recv().await;
            if v["type"] == kind {
                return v;
            }
        }
    }

    /// Sends a heartbeat and returns every message that arrived before its answer: the
    /// session handles messages in order, so this shows what an earlier message caused.
    pub async fn until_heartbeat_ack(&mut self) -> Vec<Value> {
        self.send_msg(&AgentMessage::Heartbeat).await;
        let mut before = Vec::new();
        loop {
            let v = self.recv().await;
            if v["type"] == "heartbeat_ack" {
                return before;
            }
            before.push(v);
        }
    }

    /// Waits for the server's close frame, skipping other frames.
    pub async fn closed(&mut self) -> (u16, String) {
        loop {
            if let Frame::Close(c) = self.next_frame().await {
                return c.expect("a close frame with a code");
            }
        }
    }

    pub async fn send(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).await.unwrap();
    }

    /// A typed message, as a real agent sends it.
    pub async fn send_msg(&mut self, msg: &AgentMessage) {
        self.ws.send(Message::text(msg.to_json())).await.unwrap();
    }

    /// `status` is `ok` or `error`.
    pub async fn result(&mut self, id: &str, status: &str, output: Value) {
        let status: ResultStatus =
            serde_json::from_value(json!(status)).expect("status is ok or error");
        self.send_msg(&AgentMessage::Result {
            id: id.to_string(),
            status,
            output: Some(agent_protocol::raw_json(&output)),
        })
        .await;
    }

    /// Sends an `ok` result for command `id` while the store is away and reads up to the
    /// server's `error` reply, counting the pings meanwhile (the session must stay open).
    /// Returns the reply, how long it took and the pings.
    pub async fn result_during_outage(&mut self, id: &str) -> (Value, Duration, usize) {
        let sent = std::time::Instant::now();
        self.result(id, "ok", json!({"stdout": "up"})).await;
        let mut pings = 0;
        loop {
            match self.next_frame().await {
                Frame::Ping => pings += 1,
                Frame::Json(v) if v["type"] == "error" => return (v, sent.elapsed(), pings),
                Frame::Json(_) => {}
                Frame::Close(c) => panic!("the session closed during the outage: {c:?}"),
            }
        }
    }

    /// Sends the result of command `id` (status `ok`) again until it is acknowledged, as
    /// an agent told `store_unavailable` does, within `bound`; returns how long it took.
    pub async fn resend_result_until_acked(&mut self, id: &str, bound: Duration) -> Duration {
        let mut acked = false;
        eventually(bound, "the result is stored", async || {
            if !acked {
                self.result(id, "ok", json!({"stdout": "up"})).await;
                let v = loop {
                    if let Frame::Json(v) = self.next_frame().await {
                        break v;
                    }
                };
                acked = v["type"] == "ack";
            }
            acked
        })
        .await
    }

    /// Drops the TCP connection without a close handshake, as a crashed host would.
    pub fn kill(self) {
        drop(self.ws);
    }
}
