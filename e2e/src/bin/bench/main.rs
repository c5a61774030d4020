//! bench: the capacity benchmarks of issue 7 (and 15's jobs, the host agent's own cost and
//! 16's scale run), against agent-server built in release and
//! run as separate processes, with a database, a redis-server and agent-sim fleets of
//! their own. `just bench` runs them all; `just bench-smoke` runs tiny sizes (CI).
//!
//! Each benchmark prints the machine it ran on and its figures; `all` ends with a table
//! of every figure against its target. Figures come from /proc (RSS, CPU time, socket
//! memory), the server's `/metrics` and the simulator's counters. Method and results:
//! `docs/benchmarks.md`.

mod churn;
mod heartbeat;
mod host_agent;
mod idle;
mod inventory;
mod jobs;
mod kernel;
mod latency;
mod machine;
mod procfs;
mod scale;
mod services;
mod storm;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use e2e::tokens::{Minter, Role};
use machine::Machine;
use services::{Database, Redis, ServerProc};

#[derive(Parser)]
#[command(about = "Capacity benchmarks for agent-server (docs/benchmarks.md)")]
struct Args {
    /// Tiny sizes and short windows: proves the benchmarks run (CI), measures nothing.
    #[arg(long, global = true)]
    smoke: bool,
    /// Agents for the selected benchmark instead of its default.
    #[arg(long, global = true)]
    agents: Option<u32>,
    /// Commands per second for the latency benchmark instead of 2,000 and 5,000, and for
    /// the scale benchmark's rolling restart instead of 200.
    #[arg(long, global = true)]
    rate: Option<u32>,
    /// Measurement window in seconds instead of the default.
    #[arg(long, global = true)]
    window: Option<u64>,
    /// PostgreSQL server (user with CREATE DATABASE); a fresh database per benchmark.
    #[arg(
        long,
        global = true,
        default_value = "postgres://postgres@127.0.0.1:5432"
    )]
    postgres: String,
    #[arg(long, global = true, default_value = "/usr/bin/redis-server")]
    redis_server: String,
    /// Where agent-server and agent-sim are (default: next to this binary).
    #[arg(long, global = true)]
    bin_dir: Option<PathBuf>,
    /// Extra environment for every agent-server process, `KEY=VALUE` (repeatable): to
    /// measure a setting, such as `--server-env DATABASE_POOL_SIZE=32`.
    #[arg(long, global = true, value_parser = key_value)]
    server_env: Vec<(String, String)>,
    /// Keep server and simulator logs (in target/bench/) after a successful run.
    #[arg(long, global = true)]
    keep_logs: bool,
    #[command(subcommand)]
    command: Bench,
}

fn key_value(v: &str) -> Result<(String, String), String> {
    v.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("`{v}` is not KEY=VALUE"))
}

#[derive(Subcommand, Clone, Copy, PartialEq, Eq, Debug)]
enum Bench {
    /// Benchmarks 1 to 8, then a table of every figure.
    All,
    /// 1. Idle agents held by one process; RSS per agent beside a bare WebSocket server's.
    Idle,
    /// 2. Server CPU per heartbeat round trip.
    Heartbeat,
    /// 3. Command latency, API accepted to agent received, same and cross replica.
    Latency,
    /// 4. Reconnect storm: a replica with 15,000 agents killed.
    Storm,
    /// 5. Twenty concurrent 10 MiB inventory uploads: RSS.
    Inventory,
    /// 6. Connection churn: connects and disconnects per second.
    Churn,
    /// 7. Fleet jobs: one command to every agent on 2 replicas, unbounded and paced.
    Jobs,
    /// 8. The host agent: one idle `agent` process's RSS and CPU over a few heartbeats.
    Agent,
    /// 9. Scale: up to 100,000 agents on 5 replicas, alive through two heartbeat intervals,
    ///    then a rolling restart under commands (not part of `all`: it needs the machine).
    Scale,
}

/// One figure against its target.
pub struct Figure {
    pub bench: &'static str,
    pub what: String,
    pub value: String,
    pub target: String,
    /// None: reported, no target.
    pub met: Option<bool>,
}

/// What every benchmark needs: where things are, the shared key, the figures so far.
pub struct Ctx {
    pub smoke: bool,
    pub agents: Option<u32>,
    pub rate: Option<u32>,
    pub window: Option<u64>,
    pub bin_dir: PathBuf,
    pub run_dir: PathBuf,
    pub postgres: String,
    pub redis_bin: String,
    /// SECRET_KEY of every replica; agents' tokens are minted with it.
    pub secret: String,
    pub admin: String,
    pub http: reqwest::Client,
    pub machine: Machine,
    pub figures: Vec<Figure>,
    /// `--server-env`, applied after each benchmark's own settings.
    server_env: Vec<(String, String)>,
    databases: u32,
}

impl Ctx {
    pub fn server_bin(&self) -> PathBuf {
        self.bin_dir.join("agent-server")
    }

    pub fn sim_bin(&self) -> PathBuf {
        self.bin_dir.join("agent-sim")
    }

    pub fn floor_bin(&self) -> PathBuf {
        self.bin_dir.join("ws-floor")
    }

    /// The host agent (`cargo build --release -p agent`).
    pub fn agent_bin(&self) -> PathBuf {
        self.bin_dir.join("agent")
    }

    /// Measurement window: the override, the smoke size, or the default.
    pub fn window(&self, default: u64, smoke: u64) -> Duration {
        Duration::from_secs(
            self.window
                .unwrap_or(if self.smoke { smoke } else { default }),
        )
    }

    pub fn size(&self, default: u32, smoke: u32) -> u32 {
        self.agents
            .unwrap_or(if self.smoke { smoke } else { default })
    }

    pub fn figure(
        &mut self,
        bench: &'static str,
        what: impl Into<String>,
        value: impl Into<String>,
        target: impl Into<String>,
        met: Option<bool>,
    ) {
        let f = Figure {
            bench,
            what: what.into(),
            value: value.into(),
            target: target.into(),
            met,
        };
        println!(
            "  {:<44} {:>18}   target {:<14} {}",
            f.what,
            f.value,
            if f.target.is_empty() { "-" } else { &f.target },
            verdict(f.met)
        );
        self.figures.push(f);
    }

    /// Prints a benchmark's title and the machine.
    pub fn header(&self, title: &str) {
        println!();
        println!(
            "== {title}{}",
            if self.smoke { " (smoke size)" } else { "" }
        );
        println!("{}", self.machine.line());
        if !self.server_env.is_empty() {
            let settings: Vec<String> = self
                .server_env
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            println!("server settings: {}", settings.join(" "));
        }
    }

    /// A database, a redis-server when asked, and `replicas` servers named bench-a,
    /// bench-b, … sharing them.
    pub async fn stack(
        &mut self,
        replicas: usize,
        redis: bool,
        env: &[(&str, String)],
    ) -> Result<Stack> {
        self.databases += 1;
        let db = Database::create(
            &self.postgres,
            &format!("agent_bench_{}_{}", std::process::id(), self.databases),
        )?;
        let redis = match redis {
            true => Some(Redis::start(&self.redis_bin, &self.run_dir).await?),
            false => None,
        };
        let mut common: Vec<(String, String)> = vec![
            ("DATABASE_URL".into(), db.url()),
            ("SECRET_KEY".into(), self.secret.clone()),
        ];
        if let Some(r) = &redis {
            common.push(("REDIS_HOST".into(), "127.0.0.1".into()));
            common.push(("REDIS_PORT".into(), r.port.to_string()));
        }
        common.extend(env.iter().map(|(k, v)| (k.to_string(), v.clone())));
        common.extend(self.server_env.iter().cloned());
        let mut servers = Vec::new();
        for i in 0..replicas {
            let name = format!("bench-{}", (b'a' + i as u8) as char);
            servers
                .push(ServerProc::start(&self.server_bin(), &self.run_dir, &name, &common).await?);
        }
        Ok(Stack { servers, redis, db })
    }

    /// Heartbeat settings: production's 15 s, or 2 s for smoke runs so that pings happen.
    pub fn heartbeat_env(&self) -> Vec<(&'static str, String)> {
        if self.smoke {
            vec![
                ("WS_HEARTBEAT_INTERVAL", "2".into()),
                ("WS_OFFLINE_TIMEOUT", "10".into()),
            ]
        } else {
            vec![
                ("WS_HEARTBEAT_INTERVAL", "15".into()),
                ("WS_OFFLINE_TIMEOUT", "60".into()),
            ]
        }
    }

    pub fn heartbeat_secs(&self) -> u64 {
        if self.smoke { 2 } else { 15 }
    }
}

/// Servers first, then Redis, then the database: fields drop in this order.
pub struct Stack {
    pub servers: Vec<ServerProc>,
    pub redis: Option<Redis>,
    pub db: Database,
}

impl Stack {
    /// Kills the servers (the benchmarks are over; draining would only add time).
    pub async fn stop(mut self) {
        for s in &mut self.servers {
            s.sigkill().await;
        }
    }
}

fn verdict(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "met",
        Some(false) => "NOT MET",
        None => "",
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    e2e::sim::net::raise_open_files_limit();
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("directory of this binary")?
            .to_path_buf(),
    };
    for bin in ["agent-server", "agent-sim", "ws-floor"] {
        if !bin_dir.join(bin).exists() {
            bail!(
                "{} not found in {}: run `cargo build --release -p agent-server -p e2e --bins` (or `just bench`)",
                bin,
                bin_dir.display()
            );
        }
    }
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let run_dir = bin_dir
        .parent()
        .unwrap_or(&bin_dir)
        .join("bench")
        .join(format!("run-{stamp}"));
    std::fs::create_dir_all(&run_dir)?;
    let secret: String = (0..32)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    let tokens = Minter::new(&secret);
    let admin = tokens.mint("bench-admin", Role::Admin, Duration::from_secs(86_400));
    let machine = Machine::detect(&format!("{}/postgres", args.postgres), &args.redis_server);
    let mut ctx = Ctx {
        smoke: args.smoke,
        agents: args.agents,
        rate: args.rate,
        window: args.window,
        bin_dir,
        run_dir: run_dir.clone(),
        postgres: args.postgres.clone(),
        redis_bin: args.redis_server.clone(),
        secret,
        admin,
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(64)
            .timeout(Duration::from_secs(60))
            .build()?,
        machine,
        figures: Vec::new(),
        server_env: args.server_env.clone(),
        databases: 0,
    };
    let benches = match args.command {
        Bench::All => vec![
            Bench::Idle,
            Bench::Heartbeat,
            Bench::Latency,
            Bench::Storm,
            Bench::Inventory,
            Bench::Churn,
            Bench::Jobs,
            Bench::Agent,
        ],
        one => vec![one],
    };
    let mut failed = Vec::new();
    for b in &benches {
        let result = match b {
            Bench::Idle => idle::run(&mut ctx).await,
            Bench::Heartbeat => heartbeat::run(&mut ctx).await,
            Bench::Latency => latency::run(&mut ctx).await,
            Bench::Storm => storm::run(&mut ctx).await,
            Bench::Inventory => inventory::run(&mut ctx).await,
            Bench::Churn => churn::run(&mut ctx).await,
            Bench::Jobs => jobs::run(&mut ctx).await,
            Bench::Agent => host_agent::run(&mut ctx).await,
            Bench::Scale => scale::run(&mut ctx).await,
            Bench::All => Ok(()),
        };
        if let Err(e) = result {
            println!("  FAILED: {e:#}");
            failed.push(format!("{b:?}"));
        }
    }
    if benches.len() > 1 {
        summary(&ctx);
    }
    if failed.is_empty() && !args.keep_logs {
        let _ = std::fs::remove_dir_all(&run_dir);
    } else {
        println!("logs: {}", run_dir.display());
    }
    if !failed.is_empty() {
        bail!("benchmarks that could not run: {}", failed.join(", "));
    }
    Ok(())
}

/// Every figure of the run as a Markdown table (pasted into docs/benchmarks.md).
fn summary(ctx: &Ctx) {
    println!();
    println!(
        "== Summary{}",
        if ctx.smoke {
            " (smoke size: not figures)"
        } else {
            ""
        }
    );
    println!("{}", ctx.machine.line());
    println!();
    println!("| benchmark | figure | measured | target | |");
    println!("|---|---|---|---|---|");
    for f in &ctx.figures {
        println!(
            "| {} | {} | {} | {} | {} |",
            f.bench,
            f.what,
            f.value,
            if f.target.is_empty() { "-" } else { &f.target },
            verdict(f.met)
        );
    }
}

/// Percentile (0..=1) of sorted values.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Queues a command through `base`'s API; returns its id once the server answered 202.
pub async fn post_command(
    http: &reqwest::Client,
    base: &str,
    admin: &str,
    agent: &str,
) -> Result<String> {
    let resp = http
        .post(format!("{base}/api/v1/agents/{agent}/commands"))
        .bearer_auth(admin)
        .json(&serde_json::json!({"name": "bench", "args": {}}))
        .send()
        .await?;
    let status = resp.status();
    let body: serde_json::Value = resp.json().await?;
    match body["id"].as_str() {
        Some(id) if status == reqwest::StatusCode::ACCEPTED => Ok(id.to_string()),
        _ => bail!("POST command for {agent}: {status} {body}"),
    }
}

/// 12345 → "12,345".
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=1000).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 500.0);
        assert_eq!(percentile(&v, 0.99), 990.0);
        assert_eq!(percentile(&v, 0.999), 999.0);
        assert_eq!(percentile(&v, 1.0), 1000.0);
        assert_eq!(percentile(&[3.0], 0.999), 3.0);
    }
}
