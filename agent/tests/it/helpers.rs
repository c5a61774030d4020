//! The real `agent-server` binary (built in the same target directory) on a database of
//! its own, driven through its REST API, and real `agent` processes.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub const SECRET: &str = "agent-integration-test-secret-0123456789";
/// Bound on every wait; tests never sleep to wait for an event.
pub const WAIT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// For each `async fn(Server)` scenario, a module with one test per backend.
macro_rules! on_both_backends {
    ($($scenario:ident;)*) => {$(
        mod $scenario {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                if let Some(s) = $crate::helpers::Server::start($crate::helpers::Backend::Sqlite).await {
                    super::$scenario(s).await;
                }
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                if let Some(s) = $crate::helpers::Server::start($crate::helpers::Backend::Postgres).await {
                    super::$scenario(s).await;
                }
            }
        }
    )*};
}
pub(crate) use on_both_backends;

/// `target/<profile>/<name>`, next to this test executable's `deps/` directory.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build it first with `cargo build -p {}` (or run `cargo test --workspace`)",
        path.display(),
        if name == "agent" {
            "agent"
        } else {
            "agent-server"
        }
    );
    path
}

/// Lines a child writes to stderr (and stdout), kept for assertions.
#[derive(Clone, Default)]
pub struct Log(Arc<Mutex<String>>);

impl Log {
    /// Collects the child's output; returns the readers, which end at the pipes' EOF.
    fn follow(&self, child: &mut Child) -> Vec<tokio::task::JoinHandle<()>> {
        let mut readers = Vec::new();
        for pipe in [
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let log = self.0.clone();
            readers.push(tokio::spawn(async move {
                let mut lines = BufReader::new(pipe).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    log.lock().unwrap().push_str(&(line + "\n"));
                }
            }));
        }
        readers
    }

    pub fn text(&self) -> String {
        self.0.lock().unwrap().clone()
    }

    /// Waits until the log holds `needle`.
    pub async fn shows(&self, needle: &str) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !self.text().contains(needle) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "`{needle}` not logged within {WAIT:?}:\n{}",
                self.text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A PostgreSQL database that exists for one test.
struct PgDb {
    admin_url: String,
    name: String,
}

impl Drop for PgDb {
    fn drop(&mut self) {
        let (url, name) = (self.admin_url.clone(), self.name.clone());
        // Drop runs outside any runtime's reach: use a thread with its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .ok()?;
                tokio::spawn(conn);
                client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
                    .ok()
            })
        })
        .join();
    }
}

async fn postgres_db() -> Option<(String, PgDb)> {
    let admin_url = std::env::var("TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let (client, conn) = match tokio_postgres::connect(&admin_url, tokio_postgres::NoTls).await {
        Ok(c) => c,
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!(
                "SKIPPED: PostgreSQL not reachable at {admin_url} ({e}); set TEST_POSTGRES_URL"
            );
            return None;
        }
        Err(e) => panic!("PostgreSQL at {admin_url}: {e}"),
    };
    tokio::spawn(conn);
    let name = format!("agent_it_{}", uuid::Uuid::new_v4().simple());
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create test database");
    let (base, _) = admin_url
        .rsplit_once('/')
        .expect("URL with a database path");
    Some((format!("{base}/{name}"), PgDb { admin_url, name }))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A real `agent-server` process; it can be killed and started again on the same port and
/// database.
pub struct Server {
    pub port: u16,
    pub admin: String,
    pub http: reqwest::Client,
    pub log: Log,
    database_url: String,
    child: Option<Child>,
    /// The server's data directory, and room for the agents' state directories.
    pub dir: tempfile::TempDir,
    _db: Option<PgDb>,
}

impl Server {
    pub async fn start(backend: Backend) -> Option<Server> {
        let dir = tempfile::tempdir().unwrap();
        let (database_url, db) = match backend {
            Backend::Sqlite => (
                format!("sqlite://{}", dir.path().join("server.db").display()),
                None,
            ),
            Backend::Postgres => {
                let (url, db) = postgres_db().await?;
                (url, Some(db))
            }
        };
        let mut server = Server {
            port: free_port(),
            admin: String::new(),
            http: reqwest::Client::new(),
            log: Log::default(),
            database_url,
            child: None,
            dir,
            _db: db,
        };
        server.admin = server.mint("admin", "admin");
        server.start_again().await;
        Some(server)
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("SERVER_HOST", "127.0.0.1".into()),
            ("SERVER_PORT", self.port.to_string()),
            // Tests run in parallel: no fixed metrics port.
            ("METRICS_PORT", "0".into()),
            ("SERVER_URL", self.base()),
            ("SECRET_KEY", SECRET.into()),
            ("DATABASE_URL", self.database_url.clone()),
            ("DATABASE_POOL_SIZE", "4".into()),
            (
                "DATA_DIR",
                self.dir.path().join("data").display().to_string(),
            ),
            ("WS_HEARTBEAT_INTERVAL", "2".into()),
            ("WS_OFFLINE_TIMEOUT", "10".into()),
            ("DRAIN_WINDOW", "0".into()),
            ("SHUTDOWN_TIMEOUT", "5".into()),
            ("POD_ID", "pod-it".into()),
        ]
    }

    /// `agent-server token`, with this server's configuration.
    fn mint(&self, sub: &str, role: &str) -> String {
        let out = std::process::Command::new(binary("agent-server"))
            .args(["token", "--sub", sub, "--role", role])
            .env_clear()
            .envs(self.env())
            .output()
            .expect("agent-server token");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }

    /// Starts the process (again) and waits until it answers.
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "already running");
        let mut child = Command::new(binary("agent-server"))
            .env_clear()
            .envs(self.env())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("agent-server starts");
        // The server's log is only ever waited on (`Log::shows`).
        let _ = self.log.follow(&mut child);
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Ok(r) = self
                .http
                .get(format!("{}/health", self.base()))
                .send()
                .await
                && r.status().is_success()
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "server did not come up:\n{}",
                self.log.text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL, as a crash or the OOM killer would.
    pub async fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().await.unwrap();
    }

    /// An enroll secret from `POST /api/v1/enroll-secrets` with these extra fields
    /// (`labels`, `max_uses`, …); returns the secret and its id.
    pub async fn enroll_secret(&self, extra: Value) -> (String, String) {
        let mut body = json!({"name": "it"});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().cloned().unwrap_or_default());
        let (status, created) = self.post("/api/v1/enroll-secrets", &body).await;
        assert_eq!(status, 201, "{created}");
        (
            created["secret"].as_str().unwrap().to_string(),
            created["id"].as_str().unwrap().to_string(),
        )
    }

    /// An agent token from `POST /api/v1/tokens`, as an operator enrols a host.
    pub async fn agent_token(&self, client_id: &str) -> String {
        let (status, body) = self
            .post("/api/v1/tokens", &json!({"client_id": client_id}))
            .await;
        assert_eq!(status, 201, "{body}");
        body["token"].as_str().unwrap().to_string()
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .http
            .get(format!("{}{path}", self.base()))
            .bearer_auth(&self.admin)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.base()))
            .bearer_auth(&self.admin)
            .json(body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    pub async fn delete(&self, path: &str) -> u16 {
        self.http
            .delete(format!("{}{path}", self.base()))
            .bearer_auth(&self.admin)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    /// Uploads an agent build for this host's os/arch; returns the binary's id.
    pub async fn upload_build(&self, version: &str, bytes: Vec<u8>) -> String {
        let r = self
            .http
            .post(format!(
                "{}/api/v1/binaries?name=agent&version={version}&os={}&arch={}",
                self.base(),
                std::env::consts::OS,
                std::env::consts::ARCH
            ))
            .bearer_auth(&self.admin)
            .header("content-type", "application/octet-stream")
            .body(bytes)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        assert_eq!(status, 201, "{body}");
        body["id"].as_str().unwrap().to_string()
    }

    /// Queues a command; returns its id.
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

    /// Polls `path` until `check` holds.
    pub async fn eventually(&self, path: &str, check: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let (_, body) = self.get(path).await;
            if check(&body) {
                return body;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "condition on {path} not met within {WAIT:?}: {body}\nserver log:\n{}",
                self.log.text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for command `id` to finish; returns it.
    pub async fn finished(&self, id: &str) -> Value {
        self.eventually(&format!("/api/v1/commands/{id}"), |c| {
            matches!(c["status"].as_str(), Some("succeeded" | "failed"))
        })
        .await
    }

    pub async fn online(&self, agent: &str) -> Value {
        self.eventually(&format!("/api/v1/agents/{agent}"), |a| a["online"] == true)
            .await
    }
}

/// A real `agent` process, in a process group of its own: after an update it may run on
/// in another process (the watchdog's, once it rolled back), and the whole group goes
/// when the test ends.
pub struct Agent {
    child: Child,
    group: i32,
    pub log: Log,
    /// The log's readers: an exit is only reported once they have read everything.
    readers: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SAFETY: a plain kill(2) of the group this test started.
        unsafe {
            libc::kill(-self.group, libc::SIGKILL);
        }
    }
}

/// What an agent is started with.
pub struct AgentSpec<'a> {
    pub client_id: &'a str,
    /// `None` for an agent that enrolls (AGENT_ENROLL_SECRET in `env`).
    pub token: Option<&'a str>,
    pub state_dir: &'a Path,
    pub env: Vec<(&'a str, String)>,
}

impl Agent {
    pub fn start(server: &Server, spec: AgentSpec<'_>) -> Agent {
        Agent::start_from(&binary("agent"), &server.ws_url(), spec)
    }

    /// Runs the agent executable at `exe` (which an update replaces) against `server_url`.
    pub fn start_from(exe: &Path, server_url: &str, spec: AgentSpec<'_>) -> Agent {
        let mut command = Command::new(exe);
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("AGENT_SERVER_URL", server_url)
            .env("AGENT_CLIENT_ID", spec.client_id)
            .env("AGENT_STATE_DIR", spec.state_dir)
            .env("AGENT_LOG", "info");
        if let Some(token) = spec.token {
            command.env("AGENT_TOKEN", token);
        }
        let mut child = command
            .envs(spec.env)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .expect("agent starts");
        let group = child.id().expect("a process id") as i32;
        let log = Log::default();
        let readers = log.follow(&mut child);
        Agent {
            child,
            group,
            log,
            readers,
        }
    }

    /// Waits for the process to exit on its own, and for its last log lines; returns
    /// its exit code.
    pub async fn exits(&mut self) -> i32 {
        let status = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("agent still running after {WAIT:?}:\n{}", self.log.text()))
            .unwrap();
        // A plug-in still running may hold the pipes open: bounded.
        for reader in self.readers.drain(..) {
            let _ = tokio::time::timeout(WAIT, reader).await;
        }
        status.code().unwrap_or(-1)
    }

    /// SIGKILL: no chance to clean up.
    pub async fn kill9(mut self) {
        self.child.kill().await.unwrap();
    }

    /// The process the test started (an update keeps it, a rollback by the watchdog
    /// ends it).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// SIGTERM, as systemd stops it; waits for the exit and returns its code.
    pub async fn stop(mut self) -> i32 {
        let pid = self.child.id().expect("running") as libc::pid_t;
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        self.exits().await
    }
}

/// Writes an executable script.
pub fn script(path: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, body).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Agent builds of a given version (`AGENT_VERSION` at compile time), built from this
/// workspace into `target/agent-builds` (one target directory for every version) and
/// copied out as `target/agent-builds/agent-<version>`. Each version is built once per
/// test process; cargo's lock serialises test processes.
pub fn agent_build(version: &str) -> PathBuf {
    static BUILT: Mutex<Vec<(String, PathBuf)>> = Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, path)) = built.iter().find(|(v, _)| v == version) {
        return path.clone();
    }
    let profile_dir = binary("agent").parent().unwrap().to_path_buf();
    let target = profile_dir.parent().unwrap().join("agent-builds");
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args(["build", "-p", "agent", "--bin", "agent"])
        .current_dir(workspace)
        .env("CARGO_TARGET_DIR", &target)
        .env("AGENT_VERSION", version)
        .output()
        .expect("cargo build");
    assert!(
        out.status.success(),
        "building agent {version}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = target.join(format!("agent-{version}"));
    std::fs::copy(target.join("debug").join("agent"), &path).unwrap();
    let reported = std::process::Command::new(&path)
        .arg("--version")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&reported.stdout).trim(),
        format!("agent {version}")
    );
    built.push((version.to_string(), path.clone()));
    path
}

/// A TCP proxy in front of the server that cuts the first binary download after
/// `cut_after` bytes of its response, as a flaky network would; everything else
/// (WebSockets included) passes through.
pub struct CutProxy {
    pub port: u16,
    /// The request heads of every download, in order.
    pub downloads: Arc<Mutex<Vec<String>>>,
}

impl CutProxy {
    pub async fn start(upstream: u16, cut_after: usize) -> CutProxy {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let downloads: Arc<Mutex<Vec<String>>> = Arc::default();
        let seen = downloads.clone();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let Ok(mut server) =
                        tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    else {
                        return;
                    };
                    let mut head = vec![0u8; 16 * 1024];
                    let Ok(n) = client.read(&mut head).await else {
                        return;
                    };
                    head.truncate(n);
                    let text = String::from_utf8_lossy(&head).to_string();
                    let download = text.starts_with("GET ") && text.contains("/download ");
                    let first = download && {
                        let mut seen = seen.lock().unwrap();
                        seen.push(text);
                        seen.len() == 1
                    };
                    if server.write_all(&head).await.is_err() {
                        return;
                    }
                    if first {
                        let mut buf = vec![0u8; 16 * 1024];
                        let mut sent = 0;
                        while sent < cut_after {
                            let Ok(n) = server.read(&mut buf).await else {
                                return;
                            };
                            if n == 0 {
                                return;
                            }
                            let n = n.min(cut_after - sent);
                            if client.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                            sent += n;
                        }
                        // Both connections end here, mid-body.
                        return;
                    }
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
            }
        });
        CutProxy { port, downloads }
    }

    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }
}
