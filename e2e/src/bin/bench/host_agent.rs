//! Benchmark 8: the host agent (`agent/`, binary `agent`) as operators run it: one
//! process, connected to a server, doing nothing but staying connected. What it costs the
//! host: resident memory and CPU over a few heartbeat intervals, in which it answers the
//! server's pings, sends its own `heartbeat` at the welcome's interval and reads the
//! `heartbeat_ack`. Also what starting costs: connecting and sending the inventory.
//!
//! RSS is sampled every second from /proc. CPU is the process's own, from the scheduler's
//! nanosecond account of its threads (`/proc/<pid>/task/*/schedstat`): clock ticks (10
//! ms) are too coarse for an agent that idles at a few milliseconds a minute. Other work
//! on the machine barely skews either (the machine's load average is printed).

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use e2e::tokens::{Minter, Role};
use tokio::process::Command;

use crate::Ctx;
use crate::procfs::{clk_tck, cpu_ticks, peak_rss_kib, rss_kib, sched_ns};
use crate::services::tail;

const BENCH: &str = "8 host agent";
const CLIENT_ID: &str = "bench-host";

pub async fn run(ctx: &mut Ctx) -> Result<()> {
    ctx.header("8. The host agent: one idle agent process (RSS, CPU)");
    let binary = ctx.agent_bin();
    if !binary.exists() {
        bail!(
            "{} not found: run `cargo build --release -p agent` (or `just bench`)",
            binary.display()
        );
    }
    let env = ctx.heartbeat_env();
    let stack = ctx.stack(1, false, &env).await?;
    let server = &stack.servers[0];
    let hb = ctx.heartbeat_secs();
    let intervals = if ctx.smoke { 2 } else { 4 };
    let len = ctx
        .window
        .map_or(Duration::from_secs(hb * intervals), Duration::from_secs);

    let token = Minter::new(&ctx.secret).mint(CLIENT_ID, Role::Agent, Duration::from_secs(86_400));
    let state = ctx.run_dir.join("agent-state");
    let log = ctx.run_dir.join("agent.log");
    let file = std::fs::File::create(&log)?;
    let mut child = Command::new(&binary)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env(
            "AGENT_SERVER_URL",
            format!("ws://127.0.0.1:{}", server.port),
        )
        .env("AGENT_CLIENT_ID", CLIENT_ID)
        .env("AGENT_TOKEN", &token)
        .env("AGENT_STATE_DIR", &state)
        .env("AGENT_LOG", "info")
        .stdout(Stdio::null())
        .stderr(file)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let pid = child.id().context("the agent's pid")?;
    let started = Instant::now();

    // Connected, hello and inventory stored: the agent's start-up work is done.
    let url = format!("{}/api/v1/agents/{CLIENT_ID}/inventory", server.base());
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            bail!("the agent exited ({status}):\n{}", tail(&log));
        }
        let stored = ctx
            .http
            .get(&url)
            .bearer_auth(&ctx.admin)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if stored {
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("the agent did not connect within 60 s:\n{}", tail(&log));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let online_after = started.elapsed();
    // Start-up work partly runs on blocking threads that may have exited: the tick
    // count (which keeps exited threads' time, 10 ms steps) bounds it from above.
    let startup_ns = sched_ns(pid).unwrap_or(0);
    let startup_ticks_ms = cpu_ticks(pid).unwrap_or(0) * 1000 / clk_tck();
    // A full interval, so that the window below holds only steady-state work.
    tokio::time::sleep(Duration::from_secs(hb + 2)).await;

    let cpu_start = sched_ns(pid).unwrap_or(0);
    let wall_start = Instant::now();
    let mut rss = Vec::new();
    let end = Instant::now() + len;
    while Instant::now() < end {
        if let Some(kib) = rss_kib(pid) {
            rss.push(kib);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let cpu_secs = sched_ns(pid).unwrap_or(0).saturating_sub(cpu_start) as f64 / 1e9;
    let wall = wall_start.elapsed().as_secs_f64();
    let peak = peak_rss_kib(pid).unwrap_or(0);
    let threads = std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count());
    if let Ok(Some(status)) = child.try_wait() {
        bail!(
            "the agent exited during the window ({status}):\n{}",
            tail(&log)
        );
    }
    let _ = child.kill().await;
    stack.stop().await;

    let (min, max) = (
        rss.iter().copied().min().unwrap_or(0),
        rss.iter().copied().max().unwrap_or(0),
    );
    println!(
        "  one agent, server pings and agent heartbeats every {hb} s, {:.0} s window ({} intervals), {threads} threads; connected with its inventory stored {:.0} ms after start",
        wall,
        (wall / hb as f64).round(),
        online_after.as_secs_f64() * 1000.0
    );
    ctx.figure(
        BENCH,
        "agent RSS, idle (min-max over the window)",
        format!("{:.1}-{:.1} MiB", min as f64 / 1024.0, max as f64 / 1024.0),
        "",
        None,
    );
    ctx.figure(
        BENCH,
        "agent peak RSS (VmHWM, start-up inventory included)",
        format!("{:.1} MiB", peak as f64 / 1024.0),
        "",
        None,
    );
    ctx.figure(
        BENCH,
        "agent CPU, idle",
        format!("{:.4} % of a core", cpu_secs / wall * 100.0),
        "",
        None,
    );
    ctx.figure(
        BENCH,
        "agent CPU per heartbeat interval",
        format!("{:.0} µs", cpu_secs * 1e6 / (wall / hb as f64)),
        "",
        None,
    );
    ctx.figure(
        BENCH,
        "agent CPU to start, connect and send its inventory",
        format!(
            "{:.1} ms (ticks: {startup_ticks_ms} ms)",
            startup_ns as f64 / 1e6
        ),
        "",
        None,
    );
    Ok(())
}
