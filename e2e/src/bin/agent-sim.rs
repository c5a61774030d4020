//! agent-sim: runs many simulated agents against one or more agent-server replicas.
//!
//! ```sh
//! SECRET_KEY=… agent-sim --server http://127.0.0.1:8080 --count 30000
//! ```
//!
//! Agents are spread over loopback source addresses (127.0.0.2, …) and, past 15,000 agents,
//! over several processes (this binary runs copies of itself): one process may hold only
//! so many open files. Progress goes to stderr every `--progress`; `--json` prints one JSON
//! snapshot per interval on stdout instead, for `bench`. Lines on stdin steer a running
//! fleet: `stop`, or `heartbeat 15s` (`0s`: no agent heartbeats). The run ends after
//! `--duration`, on `stop`, on Ctrl-C or SIGTERM, and with `--stop-on-eof` when stdin closes
//! (its parent went away).

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use e2e::sim::backoff::Backoff;
use e2e::sim::net::{loopback_sources, raise_open_files_limit};
use e2e::sim::tokens::TokenSource;
use e2e::sim::{Fleet, FleetConfig, Receipt, ReceiptLine, Server, Snapshot};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

/// Agents per process when `--processes` is not given; leaves room under a 20,000-file
/// limit for everything else the process opens.
const AGENTS_PER_PROCESS: u32 = 15_000;

#[derive(Parser, Debug, Clone)]
#[command(
    version,
    about = "Simulated agents for agent-server: load and capacity testing"
)]
struct Args {
    /// Server URL (http://host:port); repeat for several replicas. Agents start spread
    /// over them (or all on --start-on) and move to the next when one refuses.
    #[arg(long = "server", required = true)]
    servers: Vec<String>,
    /// Number of agents.
    #[arg(long, default_value_t = 100)]
    count: u32,
    /// Client ids are PREFIX-NNNNNN.
    #[arg(long, default_value = "sim")]
    prefix: String,
    /// Number of the first agent.
    #[arg(long, default_value_t = 0)]
    first: u64,
    /// The server's SECRET_KEY, to mint agent tokens locally (default: $SECRET_KEY).
    #[arg(long)]
    secret_key: Option<String>,
    /// The server's JWT_ALGORITHM.
    #[arg(long, default_value = "HS256")]
    jwt_algorithm: String,
    /// Enroll agents with POST /api/v1/tokens using this admin token instead of minting
    /// (default: $ADMIN_TOKEN when no key is given).
    #[arg(long)]
    admin_token: Option<String>,
    /// Every agent starts on this server (0-based index of --server).
    #[arg(long)]
    start_on: Option<usize>,
    /// Loopback source addresses from 127.0.0.2 on (0: let the system choose; used only
    /// when the servers are on loopback).
    #[arg(long, default_value_t = 8)]
    source_addresses: u16,
    /// New agents per second while starting, per process (0: all at once).
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Agents send a heartbeat this often (0s: never; the server's pings suffice).
    #[arg(long, default_value = "15s", value_parser = duration)]
    heartbeat: Duration,
    /// Churn: each agent closes after about this long (0.5x to 1.5x) and reconnects.
    #[arg(long, value_parser = duration)]
    hold: Option<Duration>,
    /// Churn: pause between an agent's close and its next connection.
    #[arg(long, default_value = "0s", value_parser = duration)]
    churn_pause: Duration,
    /// Inventory bytes each agent reports once (over HTTP above 60 KiB; 0: none).
    #[arg(long, default_value_t = 0)]
    inventory_bytes: usize,
    /// Reconnection backoff: ceiling of the first delay.
    #[arg(long, default_value = "1s", value_parser = duration)]
    backoff_base: Duration,
    /// Reconnection backoff: ceiling of any delay.
    #[arg(long, default_value = "60s", value_parser = duration)]
    backoff_cap: Duration,
    /// After a 1012 close, reconnect after a random delay up to this.
    #[arg(long, default_value = "5s", value_parser = duration)]
    restart_delay: Duration,
    /// Bound on TCP connect, handshake and welcome.
    #[arg(long, default_value = "10s", value_parser = duration)]
    connect_timeout: Duration,
    /// tungstenite read buffer per agent, in bytes.
    #[arg(long, default_value_t = 2048)]
    read_buffer: usize,
    /// Processes to spread the agents over (default: one per 15,000 agents).
    #[arg(long)]
    processes: Option<u32>,
    /// Stop after this long.
    #[arg(long, default_value = "10m", value_parser = duration)]
    duration: Duration,
    /// Progress interval.
    #[arg(long, default_value = "1s", value_parser = duration)]
    progress: Duration,
    /// Print JSON snapshots on stdout instead of progress lines on stderr.
    #[arg(long)]
    json: bool,
    /// Stop when stdin closes (for a parent process that steers this one).
    #[arg(long)]
    stop_on_eof: bool,
    /// With --json: also print one line per command received,
    /// `{"command_id": "…", "received_ns": …}` on CLOCK_MONOTONIC, for latency
    /// measurements across processes.
    #[arg(long, requires = "json")]
    receipts: bool,
}

fn duration(v: &str) -> Result<Duration, String> {
    e2e::values::parse_duration(v)
        .ok_or_else(|| format!("`{v}` is not a duration such as 500ms, 15s or 2m"))
}

/// Something that steers a running fleet, from stdin or a signal.
#[derive(Debug)]
enum Control {
    Stop,
    Heartbeat(Duration),
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let files = raise_open_files_limit();
    let processes = args
        .processes
        .unwrap_or_else(|| args.count.div_ceil(AGENTS_PER_PROCESS).max(1));
    if processes > 1 {
        return supervise(args, processes).await;
    }
    if u64::from(args.count) + 64 > files {
        bail!(
            "{} agents need more open files than this process may hold ({files}); use --processes",
            args.count
        );
    }
    run_fleet(args).await
}

/// Runs the agents in this process.
async fn run_fleet(args: Args) -> Result<()> {
    let mut servers = Vec::new();
    for url in &args.servers {
        servers.push(Server::resolve(url).await.map_err(anyhow::Error::msg)?);
    }
    let on_loopback = servers.iter().all(|s| s.addr.ip().is_loopback());
    let sources = if on_loopback {
        loopback_sources(args.source_addresses)
    } else {
        Vec::new()
    };
    let tokens = token_source(&args, &servers[0])?;
    let cfg = FleetConfig {
        servers,
        prefix: args.prefix.clone(),
        first: args.first,
        count: args.count,
        start_on: args.start_on,
        sources,
        rate: args.rate,
        heartbeat: args.heartbeat,
        hold: args.hold,
        churn_pause: args.churn_pause,
        inventory_bytes: args.inventory_bytes,
        backoff: Backoff {
            base: args.backoff_base,
            cap: args.backoff_cap,
        },
        restart_delay: args.restart_delay,
        read_buffer: args.read_buffer,
        connect_timeout: args.connect_timeout,
    };
    if !args.json {
        eprintln!(
            "agent-sim: {} agents ({}-{:06}…) against {}, {} source addresses",
            cfg.count,
            cfg.prefix,
            cfg.first,
            args.servers.join(", "),
            cfg.sources.len().max(1)
        );
    }
    let receipts = args.receipts.then(print_receipts);
    let fleet = Fleet::start(cfg, tokens, receipts);
    let (control_tx, mut control) = mpsc::unbounded_channel();
    spawn_control(control_tx, args.stop_on_eof);

    let deadline = tokio::time::sleep(args.duration);
    tokio::pin!(deadline);
    let mut tick = tokio::time::interval(args.progress);
    loop {
        tokio::select! {
            _ = &mut deadline => break,
            c = control.recv() => match c {
                Some(Control::Heartbeat(every)) => fleet.set_heartbeat(every),
                Some(Control::Stop) | None => break,
            },
            _ = tick.tick() => report(&args, &fleet.snapshot()),
        }
    }
    let clean = fleet.stop(Duration::from_secs(10)).await;
    let last = fleet.snapshot();
    report(&args, &last);
    if !args.json {
        summary(&last, clean);
    }
    Ok(())
}

/// Prints every receipt as a JSON line on stdout, from a thread of its own: under the
/// stdout lock, so that lines never interleave with the snapshots, and in batches, so that
/// a burst of commands costs a few writes.
fn print_receipts() -> mpsc::UnboundedSender<Receipt> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Receipt>();
    std::thread::spawn(move || {
        use std::io::Write;
        while let Some(first) = rx.blocking_recv() {
            let mut out = std::io::stdout().lock();
            let mut next = Some(first);
            while let Some(receipt) = next {
                let line = serde_json::to_string(&receipt.line()).unwrap_or_default();
                if writeln!(out, "{line}").is_err() {
                    return;
                }
                next = rx.try_recv().ok();
            }
            if out.flush().is_err() {
                return;
            }
        }
    });
    tx
}

fn token_source(args: &Args, first: &Server) -> Result<TokenSource> {
    let key = args
        .secret_key
        .clone()
        .or_else(|| std::env::var("SECRET_KEY").ok());
    let admin = args
        .admin_token
        .clone()
        .or_else(|| std::env::var("ADMIN_TOKEN").ok());
    match (key, admin) {
        (Some(key), _) => {
            TokenSource::local(&key, &args.jwt_algorithm, Duration::from_secs(86_400))
                .map_err(anyhow::Error::msg)
        }
        (None, Some(admin)) => Ok(TokenSource::api(
            reqwest::Client::new(),
            &first.base,
            &admin,
        )),
        (None, None) => bail!(
            "agents need tokens: give the server's key (--secret-key or $SECRET_KEY) or an admin token (--admin-token or $ADMIN_TOKEN)"
        ),
    }
}

/// Reads control lines from stdin and turns SIGINT/SIGTERM into `Stop`. A child stops
/// when its stdin closes: its parent is gone.
fn spawn_control(tx: mpsc::UnboundedSender<Control>, stop_on_eof: bool) {
    let stdin_tx = tx.clone();
    // A plain thread: stdin is blocking, and it lives as long as the process.
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            let mut words = line.split_whitespace();
            let control = match (words.next(), words.next().and_then(|d| duration(d).ok())) {
                (Some("stop"), _) => Control::Stop,
                (Some("heartbeat"), Some(every)) => Control::Heartbeat(every),
                _ => {
                    eprintln!("agent-sim: ignored `{line}` (stop | heartbeat DURATION)");
                    continue;
                }
            };
            if stdin_tx.send(control).is_err() {
                return;
            }
        }
        if stop_on_eof {
            let _ = stdin_tx.send(Control::Stop);
        }
    });
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        let _ = tx.send(Control::Stop);
    });
}

fn report(args: &Args, snap: &Snapshot) {
    if args.json {
        println!("{}", serde_json::to_string(snap).unwrap_or_default());
    } else {
        eprintln!("{}", snap.line());
    }
}

fn summary(s: &Snapshot, clean: bool) {
    println!("agent-sim summary");
    println!("  processes           {}", s.processes);
    println!("  agents              {}", s.agents);
    println!(
        "  connections         {} ({} failed attempts: {} refused, {} timed out, http {:?})",
        s.connects, s.connect_failures, s.refused, s.timeouts, s.http_status
    );
    println!("  closed by server    {:?}, dropped {}", s.closes, s.drops);
    if s.churn_cycles > 0 {
        println!("  churn cycles        {}", s.churn_cycles);
    }
    println!(
        "  commands            {} received, {} results sent ({} again after store_unavailable), {} acked",
        s.commands, s.results, s.results_resent, s.acks
    );
    println!(
        "  liveness            {} pings answered, {} heartbeats sent, {} acknowledged",
        s.pings, s.heartbeats, s.heartbeat_acks
    );
    if s.inventories + s.inventory_failures > 0 {
        println!(
            "  inventories         {} sent, {} failed",
            s.inventories, s.inventory_failures
        );
    }
    if s.agents > 0 {
        println!(
            "  simulator memory    {} MiB RSS, {:.1} KiB per agent",
            s.rss_kib / 1024,
            s.rss_kib as f64 / s.agents as f64
        );
    }
    if !clean {
        println!("  (some agents did not finish closing within 10 s)");
    }
}

/// Runs `processes` copies of this binary with a slice of the agents each, sums their
/// snapshots and forwards control lines to them.
async fn supervise(args: Args, processes: u32) -> Result<()> {
    let exe = std::env::current_exe().context("locating agent-sim")?;
    let per = args.count.div_ceil(processes);
    let latest: Arc<Mutex<Vec<Snapshot>>> = Arc::default();
    let mut children: Vec<(Child, ChildStdin)> = Vec::new();
    let mut first = args.first;
    let mut left = args.count;
    for i in 0..processes {
        let count = per.min(left);
        if count == 0 {
            break;
        }
        let mut command = Command::new(&exe);
        command.args(child_args(&args, first, count));
        // Secrets travel in the environment, not on command lines that `ps` shows.
        if let Some(key) = &args.secret_key {
            command.env("SECRET_KEY", key);
        }
        if let Some(admin) = &args.admin_token {
            command.env("ADMIN_TOKEN", admin);
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting an agent-sim child")?;
        let stdout = child.stdout.take().context("child stdout")?;
        let stdin = child.stdin.take().context("child stdin")?;
        latest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Snapshot::default());
        let latest = latest.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(snap) = serde_json::from_str::<Snapshot>(&line) {
                    latest.lock().unwrap_or_else(|p| p.into_inner())[i as usize] = snap;
                } else if serde_json::from_str::<ReceiptLine>(&line).is_ok() {
                    // A child prints receipts only when asked (--receipts): pass them on.
                    println!("{line}");
                }
            }
        });
        children.push((child, stdin));
        first += u64::from(count);
        left -= count;
    }
    if !args.json {
        eprintln!(
            "agent-sim: {} agents over {} processes against {}",
            args.count,
            children.len(),
            args.servers.join(", ")
        );
    }
    let (control_tx, mut control) = mpsc::unbounded_channel();
    spawn_control(control_tx, args.stop_on_eof);
    let total = || {
        let mut sum = Snapshot::default();
        for s in latest.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            sum.add(s);
        }
        sum
    };
    // Children stop by themselves after --duration; a little grace for their last line.
    let deadline = tokio::time::sleep(args.duration + Duration::from_secs(15));
    tokio::pin!(deadline);
    let mut tick = tokio::time::interval(args.progress);
    loop {
        tokio::select! {
            _ = &mut deadline => break,
            c = control.recv() => match c {
                Some(Control::Heartbeat(every)) => {
                    let line = format!("heartbeat {}ms\n", every.as_millis());
                    for (_, stdin) in &mut children {
                        let _ = stdin.write_all(line.as_bytes()).await;
                    }
                }
                Some(Control::Stop) | None => break,
            },
            _ = tick.tick() => {
                report(&args, &total());
                if children.iter_mut().all(|(c, _)| matches!(c.try_wait(), Ok(Some(_)))) {
                    break;
                }
            }
        }
    }
    for (_, stdin) in &mut children {
        let _ = stdin.write_all(b"stop\n").await;
    }
    let mut clean = true;
    for (child, _) in &mut children {
        if tokio::time::timeout(Duration::from_secs(20), child.wait())
            .await
            .is_err()
        {
            clean = false;
            let _ = child.kill().await;
        }
    }
    // The readers see EOF once the children are gone; give them a moment for the last line.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let last = total();
    report(&args, &last);
    if !args.json {
        summary(&last, clean);
    }
    Ok(())
}

/// The command line of a child process running `count` agents from `first`.
fn child_args(a: &Args, first: u64, count: u32) -> Vec<String> {
    let d = |d: Duration| format!("{}ms", d.as_millis());
    let mut v = vec!["--stop-on-eof".to_string(), "--json".to_string()];
    for s in &a.servers {
        v.extend(["--server".into(), s.clone()]);
    }
    v.extend([
        "--count".into(),
        count.to_string(),
        "--first".into(),
        first.to_string(),
        "--processes".into(),
        "1".into(),
        "--prefix".into(),
        a.prefix.clone(),
        "--jwt-algorithm".into(),
        a.jwt_algorithm.clone(),
        "--source-addresses".into(),
        a.source_addresses.to_string(),
        "--rate".into(),
        a.rate.to_string(),
        "--heartbeat".into(),
        d(a.heartbeat),
        "--churn-pause".into(),
        d(a.churn_pause),
        "--inventory-bytes".into(),
        a.inventory_bytes.to_string(),
        "--backoff-base".into(),
        d(a.backoff_base),
        "--backoff-cap".into(),
        d(a.backoff_cap),
        "--restart-delay".into(),
        d(a.restart_delay),
        "--connect-timeout".into(),
        d(a.connect_timeout),
        "--read-buffer".into(),
        a.read_buffer.to_string(),
        "--duration".into(),
        d(a.duration),
        "--progress".into(),
        d(a.progress),
    ]);
    if let Some(i) = a.start_on {
        v.extend(["--start-on".into(), i.to_string()]);
    }
    if let Some(h) = a.hold {
        v.extend(["--hold".into(), d(h)]);
    }
    if a.receipts {
        v.push("--receipts".into());
    }
    v
}
