//! Benchmark 1: idle agents held by one server process: as many as its open-file limit allows,
//! every one alive; user-space RSS per agent and kernel socket memory. The same fleet is
//! then held by `ws-floor`, a bare tokio-tungstenite server with the same buffers, so the
//! ratio of the two is measured in one run on one machine.

use std::time::Duration;

use anyhow::Result;

use crate::procfs::{max_open_files, open_fds, page_size, rss_kib, sockstat, tcp_slab_bytes};
use crate::services::{FloorProc, SimProc};
use crate::{Ctx, thousands};

const BENCH: &str = "1 idle";

pub async fn run(ctx: &mut Ctx) -> Result<()> {
    ctx.header("1. Idle agents held by one server process (15 s heartbeats)");
    let env = ctx.heartbeat_env();
    let stack = ctx.stack(1, true, &env).await?;
    let server = &stack.servers[0];
    let pid = server.pid();
    tokio::time::sleep(Duration::from_secs(1)).await;

    let limit = max_open_files(pid).unwrap_or(1024);
    let fds0 = open_fds(pid).unwrap_or(0);
    // Every agent is a socket. Leave room for the database pool to grow to its 16
    // connections, Redis, and our own /metrics requests.
    let ceiling = limit.saturating_sub(fds0 + 16 + 24) as u32;
    let n = ctx.size(ceiling, 300).min(ceiling);
    let rss0 = rss_kib(pid).unwrap_or(0);
    let sock0 = sockstat();
    let slab0 = tcp_slab_bytes();
    println!(
        "  server open-file limit {}, {} open at start: {} agents",
        thousands(limit),
        fds0,
        thousands(u64::from(n))
    );

    let held = hold(ctx, &server.base(), pid, n, "idle").await?;
    let (rss1, sim, snap) = (held.rss_kib, held.sim, held.snapshot);
    let sock1 = sockstat();
    let slab1 = tcp_slab_bytes();
    let fds1 = open_fds(pid).unwrap_or(0);
    let metrics = server.metrics(&ctx.http).await?;
    let on_server = metrics.sum("agent_server_connected_agents", &[]) as u64;

    let all_alive = snap.alive == u64::from(n) && on_server == u64::from(n) && snap.drops == 0;
    ctx.figure(
        BENCH,
        "idle agents held by one process, all alive",
        format!(
            "{} of {} ({} fds open)",
            thousands(snap.alive),
            thousands(u64::from(n)),
            thousands(fds1)
        ),
        format!("~{} files", thousands(limit)),
        Some(all_alive && (ctx.agents.is_some() || ctx.smoke || n + 100 >= limit as u32)),
    );
    if !all_alive {
        println!(
            "  not all alive: simulator {} server {on_server}",
            snap.line()
        );
    }
    let per_agent = (rss1.saturating_sub(rss0)) as f64 / f64::from(n.max(1));
    ctx.figure(
        BENCH,
        "server RSS per idle agent",
        format!("{per_agent:.1} KiB"),
        "<= 5 KiB",
        Some(per_agent <= 5.0),
    );
    ctx.figure(
        BENCH,
        "server RSS, empty -> with agents",
        format!("{} -> {} MiB", rss0 / 1024, rss1 / 1024),
        "",
        None,
    );
    // Both ends of every connection are on this machine: half the growth is the server's.
    let conns = 2.0 * f64::from(n.max(1));
    let buffers = (sock1.mem_pages.saturating_sub(sock0.mem_pages) * page_size()) as f64 / conns;
    ctx.figure(
        BENCH,
        "kernel socket buffers per connection end",
        format!("{:.2} KiB", buffers / 1024.0),
        "",
        None,
    );
    if let (Some(a), Some(b)) = (slab0, slab1) {
        ctx.figure(
            BENCH,
            "kernel TCP socket objects per connection end",
            format!("{:.2} KiB", b.saturating_sub(a) as f64 / conns / 1024.0),
            "",
            None,
        );
    }
    ctx.figure(
        BENCH,
        "simulator RSS per agent",
        format!("{:.1} KiB", snap.rss_kib as f64 / f64::from(n.max(1))),
        "",
        None,
    );
    sim.stop().await;
    stack.stop().await;

    // The floor, in the same run: the same fleet against a bare tokio-tungstenite server
    // with the same buffers.
    let floor = FloorProc::start(&ctx.floor_bin(), ctx.heartbeat_secs()).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let floor_rss0 = rss_kib(floor.pid()).unwrap_or(0);
    let held = hold(ctx, &floor.base(), floor.pid(), n, "floor").await?;
    let floor_alive = held.snapshot.alive;
    held.sim.stop().await;
    floor.stop().await;
    let floor_per_agent = held.rss_kib.saturating_sub(floor_rss0) as f64 / f64::from(n.max(1));
    println!(
        "  floor: {} of {} agents alive on a bare tokio-tungstenite server (same buffers), RSS {} -> {} MiB",
        thousands(floor_alive),
        thousands(u64::from(n)),
        floor_rss0 / 1024,
        held.rss_kib / 1024
    );
    ctx.figure(
        BENCH,
        "floor: bare tokio-tungstenite RSS per agent",
        format!("{floor_per_agent:.1} KiB"),
        "",
        None,
    );
    let ratio = per_agent / floor_per_agent.max(0.1);
    ctx.figure(
        BENCH,
        "server / floor RSS per agent",
        format!("{ratio:.2}x"),
        "<= 1.25x",
        Some(ratio <= 1.25),
    );
    Ok(())
}

/// A fleet connected to `base` and left idle for two heartbeat intervals.
struct Held {
    sim: SimProc,
    /// The median of five samples of the process's RSS, after two intervals.
    rss_kib: u64,
    snapshot: e2e::sim::Snapshot,
}

/// Connects `n` heartbeating agents to `base`, waits two heartbeat intervals (every agent
/// pinged and answered, every buffer a ping or heartbeat needs allocated), then samples
/// the RSS of `pid`.
async fn hold(ctx: &Ctx, base: &str, pid: u32, n: u32, prefix: &str) -> Result<Held> {
    let hb = ctx.heartbeat_secs();
    let processes = n.div_ceil(10_000).max(1);
    let args: Vec<String> = [
        "--server",
        base,
        "--count",
        &n.to_string(),
        "--processes",
        &processes.to_string(),
        "--rate",
        "1000",
        "--heartbeat",
        &format!("{hb}s"),
        "--prefix",
        prefix,
        "--progress",
        "500ms",
        "--duration",
        "30m",
    ]
    .map(String::from)
    .to_vec();
    let mut sim = SimProc::start(
        &ctx.sim_bin(),
        &args,
        &ctx.secret,
        &ctx.run_dir.join(format!("{prefix}-sim.log")),
    )
    .await?;
    let ramp = sim
        .wait_for("every agent connected", Duration::from_secs(300), |s| {
            s.connected == u64::from(n)
        })
        .await?;
    println!(
        "  {} agents connected to {base} in {:.1} s ({:.0} per second, over {processes} simulator processes)",
        thousands(u64::from(n)),
        ramp.as_secs_f64(),
        f64::from(n) / ramp.as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(2 * hb + 2)).await;
    let mut samples = Vec::new();
    for _ in 0..5 {
        samples.push(rss_kib(pid).unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    samples.sort_unstable();
    let snapshot = sim.latest();
    Ok(Held {
        sim,
        rss_kib: samples[samples.len() / 2],
        snapshot,
    })
}
