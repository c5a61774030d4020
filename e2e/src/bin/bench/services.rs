//! The processes a benchmark runs: a fresh PostgreSQL database, a redis-server on a free
//! port, agent-server replicas built in release, and agent-sim fleets. Each is stopped
//! (and the database dropped) when its handle drops, even when a benchmark fails.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use e2e::sim::{ReceiptLine, Snapshot};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A database of its own on the PostgreSQL server, dropped at the end.
pub struct Database {
    /// `postgres://user@host:port` without a database name.
    server: String,
    pub name: String,
}

impl Database {
    pub fn create(server: &str, name: &str) -> Result<Database> {
        let db = Database {
            server: server.trim_end_matches('/').to_string(),
            name: name.to_string(),
        };
        db.admin_sql(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))?;
        db.admin_sql(&format!("CREATE DATABASE {name}"))?;
        Ok(db)
    }

    pub fn url(&self) -> String {
        format!("{}/{}", self.server, self.name)
    }

    fn admin_sql(&self, sql: &str) -> Result<String> {
        psql(&format!("{}/postgres", self.server), sql)
    }

    /// The backends serving this database now.
    pub fn backends(&self) -> Vec<u32> {
        backend_pids(&self.server, &self.name)
    }

    /// Transactions and table scans of this database so far (`pg_stat_database`,
    /// `pg_stat_user_tables`): the difference over a window, divided by the admissions in
    /// it, is the database work per admission. PostgreSQL publishes a busy backend's
    /// counts about once a second, so a window should end a second or two after the work.
    pub fn activity(&self) -> Result<DbActivity> {
        let out = psql(
            &self.url(),
            &format!(
                "SELECT (SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = '{}'), \
                 (SELECT COALESCE(SUM(COALESCE(seq_scan, 0) + COALESCE(idx_scan, 0)), 0) FROM pg_stat_user_tables), \
                 (SELECT COALESCE(SUM(n_tup_ins + n_tup_upd + n_tup_del), 0) FROM pg_stat_user_tables)",
                self.name
            ),
        )?;
        let fields: Vec<u64> = out
            .trim()
            .split('|')
            .map(|f| f.trim().parse().unwrap_or(0))
            .collect();
        Ok(DbActivity {
            transactions: fields.first().copied().unwrap_or(0),
            scans: fields.get(1).copied().unwrap_or(0),
            rows_written: fields.get(2).copied().unwrap_or(0),
        })
    }

    /// CPU of this database's backends, including those opened during the window.
    pub fn cpu_meter(&self) -> super::procfs::CpuMeter {
        let (server, name) = (self.server.clone(), self.name.clone());
        super::procfs::CpuMeter::start_listing(move || backend_pids(&server, &name))
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let _ = self.admin_sql(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ));
    }
}

/// Cumulative database counters; see [`Database::activity`].
#[derive(Debug, Clone, Copy, Default)]
pub struct DbActivity {
    /// Transactions committed or rolled back.
    pub transactions: u64,
    /// Sequential and index scans started on the project's tables: about one per
    /// statement that reads or writes a table (a join or a subquery adds one).
    pub scans: u64,
    /// Rows inserted, updated or deleted.
    pub rows_written: u64,
}

impl DbActivity {
    /// Per admission over the window from `before` to `self`: transactions, scans, rows.
    pub fn per(&self, before: &DbActivity, admissions: f64) -> String {
        let per = |a: u64, b: u64| a.saturating_sub(b) as f64 / admissions.max(1.0);
        format!(
            "{:.2} transactions, {:.2} table scans, {:.2} rows written",
            per(self.transactions, before.transactions),
            per(self.scans, before.scans),
            per(self.rows_written, before.rows_written)
        )
    }
}

fn backend_pids(server: &str, db: &str) -> Vec<u32> {
    psql(
        &format!("{server}/postgres"),
        &format!("SELECT pid FROM pg_stat_activity WHERE datname = '{db}'"),
    )
    .map(|out| out.lines().filter_map(|l| l.trim().parse().ok()).collect())
    .unwrap_or_default()
}

/// Whether pg_stat_statements answers on this database: the extension is created here,
/// and it counts only when the PostgreSQL server preloads it. The query starts with
/// `/* bench */`, as every statement the benchmarks send, so counts can leave it out.
pub async fn pg_stat_statements_available(db: &tokio_postgres::Client) -> bool {
    db.batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .await
        .is_ok()
        && db
            .query_one("/* bench */ SELECT count(*) FROM pg_stat_statements", &[])
            .await
            .is_ok()
}

pub fn psql(url: &str, sql: &str) -> Result<String> {
    let out = std::process::Command::new("psql")
        .args([url, "-v", "ON_ERROR_STOP=1", "-qAtc", sql])
        .output()
        .context("running psql (is the PostgreSQL client installed?)")?;
    if !out.status.success() {
        bail!(
            "psql `{sql}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A redis-server of our own, without persistence.
pub struct Redis {
    pub port: u16,
    child: Child,
}

impl Redis {
    pub async fn start(bin: &str, dir: &Path) -> Result<Redis> {
        let port = free_port()?;
        let child = Command::new(bin)
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--maxmemory-policy",
                "noeviction",
            ])
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {bin}"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            if Instant::now() > deadline {
                bail!("redis-server did not listen on {port} within 10 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Redis { port, child })
    }

    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// Calls per command since start (`INFO commandstats`; commands a Lua script runs
    /// count under their own names too).
    pub fn command_calls(&self) -> Result<std::collections::BTreeMap<String, u64>> {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "INFO", "commandstats"])
            .output()
            .context("running redis-cli")?;
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(text
            .lines()
            .filter_map(|l| {
                let (name, rest) = l.trim().strip_prefix("cmdstat_")?.split_once(':')?;
                let calls = rest.split(',').find_map(|kv| kv.strip_prefix("calls="))?;
                Some((name.to_string(), calls.parse().ok()?))
            })
            .collect())
    }
}

/// Redis commands per admission between two [`Redis::command_calls`] readings: the
/// total, then each command's share (`evalsha 0.01, hget 1.00, …`), largest first.
pub fn redis_calls_per(
    before: &std::collections::BTreeMap<String, u64>,
    after: &std::collections::BTreeMap<String, u64>,
    admissions: f64,
) -> String {
    let mut each: Vec<(&str, f64)> = after
        .iter()
        .map(|(k, v)| {
            let d = v.saturating_sub(before.get(k).copied().unwrap_or(0));
            (k.as_str(), d as f64 / admissions.max(1.0))
        })
        .filter(|(_, d)| *d > 0.0)
        .collect();
    each.sort_by(|a, b| b.1.total_cmp(&a.1));
    let total: f64 = each.iter().map(|(_, d)| d).sum();
    let list: Vec<String> = each.iter().map(|(k, d)| format!("{k} {d:.2}")).collect();
    format!("{total:.2} ({})", list.join(", "))
}

/// One agent-server replica, its log in a file.
pub struct ServerProc {
    pub name: String,
    pub port: u16,
    /// METRICS_PORT: `/metrics` is served there only.
    pub metrics_port: u16,
    pub log: PathBuf,
    child: Child,
    pid: u32,
    /// CPU time of the processes this replica ran before the current one, in clock
    /// ticks (each read last while it drained), so that a meter spans restarts.
    retired_ticks: u64,
    /// What it was started with, to start it again on the same ports ([`Self::restart`]).
    bin: PathBuf,
    dir: PathBuf,
    env: Vec<(String, String)>,
}

impl ServerProc {
    pub async fn start(
        bin: &Path,
        dir: &Path,
        name: &str,
        env: &[(String, String)],
    ) -> Result<Self> {
        let (port, metrics_port) = (free_port()?, free_port()?);
        let (child, pid, log) = Self::spawn(bin, dir, name, env, port, metrics_port, 1).await?;
        Ok(ServerProc {
            name: name.to_string(),
            port,
            metrics_port,
            log,
            child,
            pid,
            retired_ticks: 0,
            bin: bin.to_path_buf(),
            dir: dir.to_path_buf(),
            env: env.to_vec(),
        })
    }

    /// Runs the binary on the given ports and waits (bounded) for `/health`; the log of
    /// the `run`th start is `NAME.log`, then `NAME.RUN.log`.
    async fn spawn(
        bin: &Path,
        dir: &Path,
        name: &str,
        env: &[(String, String)],
        port: u16,
        metrics_port: u16,
        run: u32,
    ) -> Result<(Child, u32, PathBuf)> {
        let data = dir.join(name);
        std::fs::create_dir_all(&data)?;
        let log = match run {
            1 => dir.join(format!("{name}.log")),
            n => dir.join(format!("{name}.{n}.log")),
        };
        let file = std::fs::File::create(&log)?;
        let mut child = Command::new(bin)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("SERVER_HOST", "127.0.0.1")
            .env("SERVER_PORT", port.to_string())
            .env("METRICS_PORT", metrics_port.to_string())
            .env("POD_ID", name)
            .env("DATA_DIR", &data)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .current_dir(&data)
            .stdout(file.try_clone()?)
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let pid = child.id().unwrap_or(0);
        let health = format!("http://127.0.0.1:{port}/health");
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                bail!("{name} exited ({status}) at start:\n{}", tail(&log));
            }
            if http
                .get(&health)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                break;
            }
            if Instant::now() > deadline {
                bail!("{name} did not answer /health within 60 s:\n{}", tail(&log));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok((child, pid, log))
    }

    /// SIGTERM, a bounded wait for the drain (SIGKILL after `bound`), then the same
    /// replica started again on the same ports, as a rolling update replaces a pod behind
    /// the same Service. Returns the time from the signal to the exit and to `/health`
    /// answering again, and the exit status.
    pub async fn restart(&mut self, bound: Duration, run: u32) -> Result<Restarted> {
        let signalled = Instant::now();
        self.terminate();
        // The CPU time read every 100 ms until the exit (a zombie still shows it).
        let mut last_ticks = super::procfs::cpu_ticks(self.pid).unwrap_or(0);
        let status = loop {
            tokio::select! {
                status = self.child.wait() => break status?.to_string(),
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
            last_ticks = super::procfs::cpu_ticks(self.pid).unwrap_or(last_ticks);
            if signalled.elapsed() > bound {
                let _ = self.child.kill().await;
                break format!("killed after {} s", bound.as_secs());
            }
        };
        self.retired_ticks += last_ticks;
        let exited = signalled.elapsed();
        let (child, pid, log) = Self::spawn(
            &self.bin,
            &self.dir,
            &self.name,
            &self.env,
            self.port,
            self.metrics_port,
            run,
        )
        .await?;
        (self.child, self.pid, self.log) = (child, pid, log);
        Ok(Restarted {
            exited,
            healthy: signalled.elapsed(),
            status,
        })
    }

    fn terminate(&self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// CPU time of this replica in clock ticks: every process it ran, restarts included.
    pub fn cpu_ticks(&self) -> u64 {
        self.retired_ticks + super::procfs::cpu_ticks(self.pid).unwrap_or(0)
    }

    /// The Prometheus text of `/metrics`, from METRICS_PORT, or from the main port for a
    /// server older than METRICS_PORT (before 617c0f9), so that a before/after comparison
    /// can drive an old binary with this harness (`--bin-dir`).
    pub async fn metrics(&self, http: &reqwest::Client) -> Result<Metrics> {
        let url = format!("http://127.0.0.1:{}/metrics", self.metrics_port);
        let reply = match http.get(&url).send().await {
            Ok(reply) => reply,
            Err(e) if e.is_connect() => http.get(format!("{}/metrics", self.base())).send().await?,
            Err(e) => return Err(e.into()),
        };
        Ok(Metrics(reply.error_for_status()?.text().await?))
    }

    /// Kills without grace, as a node failure or the OOM killer would.
    pub async fn sigkill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// SIGTERM, then a bounded wait for the drain.
    pub async fn stop(mut self) {
        self.terminate();
        if tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// How a [`ServerProc::restart`] went.
pub struct Restarted {
    /// SIGTERM to the process's exit (the drain).
    pub exited: Duration,
    /// SIGTERM to `/health` answering from the new process.
    pub healthy: Duration,
    /// The old process's exit status, as the system reports it.
    pub status: String,
}

/// ws-floor: a bare tokio-tungstenite server with agent-server's buffers, the floor that
/// the idle benchmark prints agent-server's memory against.
pub struct FloorProc {
    pub port: u16,
    child: Child,
    pid: u32,
}

impl FloorProc {
    pub async fn start(bin: &Path, heartbeat_secs: u64) -> Result<Self> {
        let port = free_port()?;
        let mut child = Command::new(bin)
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--heartbeat",
                &heartbeat_secs.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let pid = child.id().unwrap_or(0);
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            if let Ok(Some(status)) = child.try_wait() {
                bail!("ws-floor exited ({status}) at start");
            }
            if Instant::now() > deadline {
                bail!("ws-floor did not listen on {port} within 10 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(FloorProc { port, child, pid })
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// The last lines of a log file, for error messages.
pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// A scrape of `/metrics`.
pub struct Metrics(pub String);

impl Metrics {
    /// Sum of every sample of `name` whose labels contain all of `labels`
    /// (`direction="outbound"` …).
    pub fn sum(&self, name: &str, labels: &[&str]) -> f64 {
        self.0
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                let (metric, rest) = match series.split_once('{') {
                    Some((m, rest)) => (m, rest),
                    None => (series, ""),
                };
                (metric == name && labels.iter().all(|want| rest.contains(want)))
                    .then(|| value.parse::<f64>().ok())
                    .flatten()
            })
            .sum()
    }
}

/// How often a long wait prints where it stands.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// An agent-sim process (it may run children of its own), steered over stdin and read
/// through its JSON snapshots.
pub struct SimProc {
    child: Child,
    stdin: ChildStdin,
    state: Arc<Mutex<SimState>>,
}

#[derive(Default)]
struct SimState {
    latest: Snapshot,
    /// Every snapshot with the time it arrived, for time series (reconnect storms).
    history: Vec<(Instant, Snapshot)>,
}

impl SimProc {
    pub async fn start(bin: &Path, args: &[String], secret_key: &str, log: &Path) -> Result<Self> {
        Self::start_with_receipts(bin, args, secret_key, log, None).await
    }

    /// As [`SimProc::start`]; with `receipts`, the simulator runs with `--receipts` and
    /// every command an agent receives is sent there.
    pub async fn start_with_receipts(
        bin: &Path,
        args: &[String],
        secret_key: &str,
        log: &Path,
        receipts: Option<mpsc::UnboundedSender<ReceiptLine>>,
    ) -> Result<Self> {
        let mut child = Command::new(bin)
            .args(["--json", "--stop-on-eof"])
            .args(receipts.is_some().then_some("--receipts"))
            .args(args)
            .env("SECRET_KEY", secret_key)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log)?)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdout = child.stdout.take().context("agent-sim stdout")?;
        let stdin = child.stdin.take().context("agent-sim stdin")?;
        let state: Arc<Mutex<SimState>> = Arc::default();
        let s = state.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(snap) = serde_json::from_str::<Snapshot>(&line) {
                    let mut st = s.lock().unwrap_or_else(|p| p.into_inner());
                    st.history.push((Instant::now(), snap.clone()));
                    st.latest = snap;
                } else if let (Some(tx), Ok(receipt)) =
                    (&receipts, serde_json::from_str::<ReceiptLine>(&line))
                {
                    let _ = tx.send(receipt);
                }
            }
        });
        Ok(SimProc {
            child,
            stdin,
            state,
        })
    }

    pub fn latest(&self) -> Snapshot {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .latest
            .clone()
    }

    pub fn history(&self) -> Vec<(Instant, Snapshot)> {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .history
            .clone()
    }

    /// The simulator processes (the supervisor and its children), for CPU figures.
    pub fn pids(&self) -> Vec<u32> {
        self.child
            .id()
            .map(super::procfs::with_descendants)
            .unwrap_or_default()
    }

    /// Waits (bounded) until the fleet's snapshot satisfies `done`; returns how long. A
    /// wait longer than [`PROGRESS_EVERY`] prints the fleet's state at that interval.
    pub async fn wait_for(
        &mut self,
        what: &str,
        bound: Duration,
        done: impl Fn(&Snapshot) -> bool,
    ) -> Result<Duration> {
        let start = Instant::now();
        let mut next_progress = start + PROGRESS_EVERY;
        loop {
            let snap = self.latest();
            if done(&snap) {
                return Ok(start.elapsed());
            }
            if Instant::now() >= next_progress {
                println!(
                    "    waiting for {what} ({} s): {}",
                    start.elapsed().as_secs(),
                    snap.line().trim_start()
                );
                next_progress += PROGRESS_EVERY;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                bail!("agent-sim exited ({status}) while waiting for {what}");
            }
            if start.elapsed() > bound {
                bail!(
                    "{what}: not reached within {} s; last: {}",
                    bound.as_secs(),
                    snap.line()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn send(&mut self, line: &str) -> Result<()> {
        self.stdin.write_all(format!("{line}\n").as_bytes()).await?;
        Ok(())
    }

    /// Closes every agent and returns the last snapshot.
    pub async fn stop(mut self) -> Snapshot {
        let _ = self.send("stop").await;
        if tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.latest()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_summed_over_matching_labels() {
        let m = Metrics(
            "# HELP x\nagent_server_ws_messages_total{direction=\"outbound\",type=\"ping\"} 3\n\
             agent_server_ws_messages_total{direction=\"inbound\",type=\"pong\"} 2\n\
             agent_server_connected_agents 7\n"
                .into(),
        );
        assert_eq!(m.sum("agent_server_connected_agents", &[]), 7.0);
        assert_eq!(
            m.sum("agent_server_ws_messages_total", &["type=\"ping\""]),
            3.0
        );
        assert_eq!(m.sum("agent_server_ws_messages_total", &[]), 5.0);
    }
}
