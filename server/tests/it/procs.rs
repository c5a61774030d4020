//! Real processes: `agent-server` replicas, a `redis-server` the test owns (so it can be
//! flushed, stopped and restarted), and agents that reconnect through a round-robin
//! "load balancer" over the replicas, as they would behind a Service.

use std::collections::HashSet;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_protocol::{AgentMessage, ResultStatus, ServerMessage};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::helpers::WAIT;
use crate::netns::NetHost;

pub const BIN: &str = env!("CARGO_BIN_EXE_agent-server");

pub fn command(dir: &Path, env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(BIN);
    c.current_dir(dir)
        .env_clear()
        // Tests run in parallel: no fixed metrics port.
        .env("METRICS_PORT", "0")
        .envs(env.iter().copied())
        .kill_on_drop(true);
    c
}

/// A running server process whose stderr is collected.
pub struct ServerProcess {
    child: Child,
    pub port: u16,
    /// The metrics listener's port.
    pub metrics_port: u16,
    pub log: Arc<Mutex<String>>,
    reader: JoinHandle<()>,
}

impl ServerProcess {
    pub async fn start(dir: &Path, env: &[(&str, &str)]) -> ServerProcess {
        let mut child = command(dir, env)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let listening = Arc::new(Notify::new());
        let stderr = child.stderr.take().unwrap();
        let (log2, listening2) = (log.clone(), listening.clone());
        let reader = tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let is_listening = line.contains("agent-server listening");
                log2.lock().unwrap().push_str(&(line + "\n"));
                if is_listening {
                    listening2.notify_one();
                }
            }
        });
        if tokio::time::timeout(WAIT, listening.notified())
            .await
            .is_err()
        {
            panic!("server did not start listening:\n{}", log.lock().unwrap());
        }
        let text = log.lock().unwrap().clone();
        let port = text
            .split("addr=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|addr| addr.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("port in the listening line: {text}"));
        let metrics_port = text
            .split(" metrics=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|addr| addr.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("metrics port in the listening line: {text}"));
        ServerProcess {
            child,
            port,
            metrics_port,
            log,
            reader,
        }
    }

    /// The process id, for `/proc` and `prlimit`.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("the server is running")
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    async fn signal_and_wait(mut self, signal: i32) -> (i32, String) {
        let pid = self.child.id().unwrap() as i32;
        // SAFETY: kill(2) on a child we own.
        unsafe { libc::kill(pid, signal) };
        let status = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("process exits")
            .unwrap();
        // The pipe reaches EOF once the process is gone.
        let _ = tokio::time::timeout(WAIT, &mut self.reader).await;
        let mut log = self.log.lock().unwrap().clone();
        if let Some(signal) = std::os::unix::process::ExitStatusExt::signal(&status) {
            log.push_str(&format!("[ended by signal {signal}]\n"));
        }
        (status.code().unwrap_or(-1), log)
    }

    pub async fn sigterm_and_wait(self) -> (i32, String) {
        self.signal_and_wait(libc::SIGTERM).await
    }

    /// Kills without grace, as the OOM killer or a node failure would.
    pub async fn sigkill(self) {
        self.signal_and_wait(libc::SIGKILL).await;
    }

    /// The value of an unlabelled metric.
    pub async fn metric(&self, name: &str) -> f64 {
        let text = reqwest::get(format!("http://127.0.0.1:{}/metrics", self.metrics_port))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("metric {name} missing"))
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A redis-server on a free port, owned by the test.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts redis-server, or returns `None` (a loud skip) outside CI when it is absent.
    pub async fn start() -> Option<RedisServer> {
        if !have_redis_server() {
            return None;
        }
        let mut r = RedisServer {
            port: free_port(),
            child: None,
        };
        r.restart().await;
        Some(r)
    }

    pub async fn restart(&mut self) {
        let mut command = Command::new("redis-server");
        command.args(ephemeral_redis("127.0.0.1", self.port));
        self.child = Some(spawn_redis(command, &[]));
        let deadline = Instant::now() + WAIT;
        while self.query(&["PING"]).await.is_err() {
            assert!(Instant::now() < deadline, "redis-server answers PING");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    pub async fn query(&self, args: &[&str]) -> redis::RedisResult<redis::Value> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}/", self.port))?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query_async(&mut conn).await
    }

    pub async fn keys(&self, pattern: &str) -> Vec<String> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}/", self.port)).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        redis::cmd("KEYS")
            .arg(pattern)
            .query_async(&mut conn)
            .await
            .unwrap()
    }
}

/// Whether redis-server is installed; outside CI its absence is a loud skip, in CI a
/// failure.
pub fn have_redis_server() -> bool {
    if which("redis-server").is_some() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "redis-server is required in CI"
    );
    eprintln!("SKIPPED: redis-server not found on PATH");
    false
}

/// The arguments of a redis-server that keeps nothing on disk, on `bind`:`port`.
pub fn ephemeral_redis(bind: &str, port: u16) -> Vec<String> {
    ["--port", &port.to_string(), "--bind", bind]
        .into_iter()
        .chain(["--save", "", "--appendonly", "no"])
        .map(String::from)
        .collect()
}

/// Spawns `command` (redis-server, or a wrapper that runs it) with `args` added, quiet,
/// killed when the handle is dropped.
pub fn spawn_redis(mut command: Command, args: &[String]) -> Child {
    command
        .args(args)
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("redis-server starts")
}

fn which(bin: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(bin))
        .find(|p| p.exists())
}

/// The replicas a load balancer can route to; agents pick them round-robin.
#[derive(Clone, Default)]
pub struct Balancer {
    inner: Arc<Mutex<(Vec<u16>, usize)>>,
}

impl Balancer {
    pub fn set(&self, ports: Vec<u16>) {
        self.inner.lock().unwrap().0 = ports;
    }

    fn next(&self) -> u16 {
        let mut g = self.inner.lock().unwrap();
        let n = g.0.len();
        g.1 = g.1.wrapping_add(1);
        g.0[g.1 % n]
    }
}

/// What a [`FleetAgent`] observed.
#[derive(Default, Debug)]
pub struct Observed {
    /// Port of the replica the agent is connected to right now.
    pub connected_to: Option<u16>,
    pub connects: usize,
    /// Command ids received.
    pub received: HashSet<String>,
    /// Command ids executed (results sent), deduplicated as the protocol asks.
    pub executed: HashSet<String>,
    /// Close codes received from the server.
    pub closes: Vec<u16>,
}

/// A protocol-correct agent that executes every command and reconnects through the
/// balancer whenever its connection ends.
pub struct FleetAgent {
    pub id: String,
    pub seen: Arc<Mutex<Observed>>,
    /// While set, commands are received but not answered, as by a busy host.
    pub hold: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl FleetAgent {
    pub fn spawn(id: &str, token: String, balancer: Balancer) -> FleetAgent {
        let seen = Arc::new(Mutex::new(Observed::default()));
        let hold = Arc::new(AtomicBool::new(false));
        let (id2, seen2, hold2) = (id.to_string(), seen.clone(), hold.clone());
        let task = tokio::spawn(async move {
            loop {
                let port = balancer.next();
                let mut req = format!("ws://127.0.0.1:{port}/ws/{id2}")
                    .into_client_request()
                    .unwrap();
                req.headers_mut()
                    .insert("authorization", format!("Bearer {token}").parse().unwrap());
                let Ok((mut ws, _)) = tokio_tungstenite::connect_async(req).await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                {
                    let mut s = seen2.lock().unwrap();
                    s.connected_to = Some(port);
                    s.connects += 1;
                }
                while let Some(Ok(msg)) = ws.next().await {
                    match msg {
                        Message::Text(t) => {
                            if let Ok(ServerMessage::Command { id, .. }) =
                                ServerMessage::parse(t.as_str())
                            {
                                let cid = id.into_owned();
                                seen2.lock().unwrap().received.insert(cid.clone());
                                if hold2.load(Ordering::Relaxed) {
                                    continue;
                                }
                                seen2.lock().unwrap().executed.insert(cid.clone());
                                let result = AgentMessage::Result {
                                    id: cid,
                                    status: ResultStatus::Ok,
                                    output: Some(agent_protocol::raw_json(&json!(port))),
                                };
                                if ws.send(Message::text(result.to_json())).await.is_err() {
                                    break;
                                }
                            }
                        }
                        Message::Close(Some(f)) => {
                            seen2.lock().unwrap().closes.push(u16::from(f.code));
                        }
                        _ => {}
                    }
                }
                seen2.lock().unwrap().connected_to = None;
            }
        });
        FleetAgent {
            id: id.to_string(),
            seen,
            hold,
            task,
        }
    }

    pub fn connected_to(&self) -> Option<u16> {
        self.seen.lock().unwrap().connected_to
    }
}

impl Drop for FleetAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A PostgreSQL server of its own: `initdb` into a temporary directory and `pg_ctl` on a
/// free port, run as the `postgres` user, on the loopback or on a [`NetHost`] of its own.
/// Stopped and removed on drop. Never the machine's shared server.
pub struct PrivatePostgres {
    bin: std::path::PathBuf,
    dir: tempfile::TempDir,
    pub port: u16,
    /// The address it listens on.
    pub host: std::net::Ipv4Addr,
    /// The network namespace it runs in, if not the test's.
    netns: Option<String>,
    /// Stopped by [`PrivatePostgres::freeze`] and not yet resumed.
    frozen: AtomicBool,
}

impl PrivatePostgres {
    /// On 127.0.0.1; `None` (a loud skip outside CI) where PostgreSQL's server binaries or
    /// the `postgres` user are missing.
    pub fn start() -> Option<PrivatePostgres> {
        Self::start_in(None)
    }

    /// On `net`'s address, inside its namespace, so that [`NetHost::cut`] cuts it off.
    pub fn start_on(net: &NetHost) -> Option<PrivatePostgres> {
        Self::start_in(Some(net))
    }

    fn start_in(net: Option<&NetHost>) -> Option<PrivatePostgres> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|versions| {
                versions
                    .filter_map(Result::ok)
                    .map(|v| v.path().join("bin"))
                    .find(|b| b.join("pg_ctl").exists())
            });
        let Some(bin) = bin else {
            let why = "no PostgreSQL server binaries under /usr/lib/postgresql";
            assert!(std::env::var_os("CI").is_none(), "{why}");
            eprintln!("SKIPPED: {why}");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let chown = std::process::Command::new("chown")
            .args(["-R", "postgres"])
            .arg(dir.path())
            .status();
        if !chown.is_ok_and(|s| s.success()) {
            let why = "cannot hand a data directory to the postgres user (not root?)";
            assert!(std::env::var_os("CI").is_none(), "{why}");
            eprintln!("SKIPPED: {why}");
            return None;
        }
        let (host, port) = match net {
            // Alone in its namespace: the default port is free there.
            Some(net) => (net.addr, 5432),
            None => (std::net::Ipv4Addr::LOCALHOST, free_port()),
        };
        let pg = PrivatePostgres {
            bin,
            dir,
            port,
            host,
            netns: net.map(|n| n.ns.clone()),
            frozen: AtomicBool::new(false),
        };
        pg.run(
            "initdb",
            &[
                "-D",
                &pg.data(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
        );
        if net.is_some() {
            // initdb trusts the loopback only; the server's side of the link is another
            // address.
            let hba = std::path::Path::new(&pg.data()).join("pg_hba.conf");
            let mut rules = std::fs::read_to_string(&hba).unwrap();
            rules.push_str("host all all 0.0.0.0/0 trust\n");
            std::fs::write(&hba, rules).unwrap();
        }
        pg.start_server();
        Some(pg)
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let mut command = match &self.netns {
            Some(ns) => {
                let mut c = std::process::Command::new("ip");
                c.args(["netns", "exec", ns, "runuser"]);
                c
            }
            None => std::process::Command::new("runuser"),
        };
        let out = command
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join(tool))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn start_server(&self) {
        let options = format!(
            "-p {} -c listen_addresses={} -k {}",
            self.port,
            self.host,
            self.dir.path().display()
        );
        let log = self.dir.path().join("log").display().to_string();
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-o",
                &options,
                "-l",
                &log,
                "-w",
                "start",
            ],
        );
    }

    pub fn stop_server(&self) {
        self.run("pg_ctl", &["-D", &self.data(), "-m", "fast", "-w", "stop"]);
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@{}:{}/postgres", self.host, self.port)
    }

    /// Hangs the server without closing anything: SIGSTOP to the postmaster and each of
    /// its processes. Connections stay established and the kernel still accepts new ones,
    /// but nothing answers: a database stuck on a dead disk or a frozen VM.
    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
        self.signal_all(libc::SIGSTOP);
    }

    /// Resumes a server [`PrivatePostgres::freeze`] stopped.
    pub fn thaw(&self) {
        self.signal_all(libc::SIGCONT);
        self.frozen.store(false, Ordering::SeqCst);
    }

    /// Sends `signal` to the postmaster (by the pid in its `postmaster.pid`), then to each
    /// of its children.
    fn signal_all(&self, signal: i32) {
        let pidfile = std::path::Path::new(&self.data()).join("postmaster.pid");
        let postmaster: i32 = std::fs::read_to_string(pidfile)
            .unwrap()
            .lines()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let children = std::fs::read_dir("/proc").unwrap().filter_map(|entry| {
            let pid: i32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // `pid (comm) state ppid …`; comm may hold spaces, so read after its `)`.
            let ppid: i32 = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            (ppid == postmaster).then_some(pid)
        });
        for pid in std::iter::once(postmaster).chain(children.collect::<Vec<_>>()) {
            // SAFETY: kill(2) on a pid of this test's own PostgreSQL.
            unsafe { libc::kill(pid, signal) };
        }
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        if self.frozen.load(Ordering::SeqCst) {
            self.thaw();
        }
        let _ = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["-D", &self.data(), "-m", "immediate", "stop"])
            .output();
    }
}
