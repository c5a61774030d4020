//! Benchmark 2: heartbeat cost: server CPU per heartbeat round trip, with the server's pings alone
//! (the protocol's liveness) and with agents also sending `heartbeat` messages.
//!
//! CPU time is the process's own (utime + stime), so other work on the machine barely
//! skews it. Each window's CPU includes everything that scales with idle agents at this
//! heartbeat: pings and pongs, the presence refresh in the database and the registry
//! refresh in Redis, both every heartbeat interval.

use std::time::Duration;

use anyhow::Result;

use crate::procfs::CpuMeter;
use crate::services::{Metrics, ServerProc, SimProc};
use crate::{Ctx, thousands};

const BENCH: &str = "2 heartbeat";

/// What one window measured.
struct Window {
    /// Server CPU, percent of one core.
    server: f64,
    redis: f64,
    postgres: f64,
    pongs: f64,
    heartbeats: f64,
}

async fn window(
    ctx: &Ctx,
    server: &ServerProc,
    redis_pid: u32,
    pg: CpuMeter,
    len: Duration,
) -> Result<Window> {
    let before = server.metrics(&ctx.http).await?;
    let s = CpuMeter::start(vec![server.pid()]);
    let r = CpuMeter::start(vec![redis_pid]);
    let p = pg;
    tokio::time::sleep(len).await;
    let after = server.metrics(&ctx.http).await?;
    let delta = |m: &Metrics, dir: &str, t: &str| {
        m.sum(
            "agent_server_ws_messages_total",
            &[&format!("direction=\"{dir}\""), &format!("type=\"{t}\"")],
        )
    };
    Ok(Window {
        server: s.percent(),
        redis: r.percent(),
        postgres: p.percent(),
        pongs: delta(&after, "inbound", "pong") - delta(&before, "inbound", "pong"),
        heartbeats: delta(&after, "inbound", "heartbeat") - delta(&before, "inbound", "heartbeat"),
    })
}

pub async fn run(ctx: &mut Ctx) -> Result<()> {
    ctx.header("2. Heartbeat cost (server CPU per round trip)");
    let env = ctx.heartbeat_env();
    let stack = ctx.stack(1, true, &env).await?;
    let server = &stack.servers[0];
    let redis_pid = stack.redis.as_ref().map_or(0, |r| r.pid());
    let n = ctx.size(10_000, 300);
    let hb = ctx.heartbeat_secs();
    let len = ctx.window(60, 3);

    // The empty server's own background work, subtracted below.
    let empty = window(
        ctx,
        server,
        redis_pid,
        stack.db.cpu_meter(),
        len.min(Duration::from_secs(10)),
    )
    .await?;

    let args: Vec<String> = [
        "--server",
        &server.base(),
        "--count",
        &n.to_string(),
        "--processes",
        "1",
        "--rate",
        "1000",
        "--heartbeat",
        "0s",
        "--prefix",
        "hb",
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
        &ctx.run_dir.join("heartbeat-sim.log"),
    )
    .await?;
    sim.wait_for("every agent connected", Duration::from_secs(300), |s| {
        s.connected == u64::from(n)
    })
    .await?;
    // A full interval (plus margin) so that the ramp's work is over and every session's
    // ping timer runs in steady state.
    tokio::time::sleep(Duration::from_secs(hb + 3)).await;

    let pings = window(ctx, server, redis_pid, stack.db.cpu_meter(), len).await?;
    sim.send(&format!("heartbeat {hb}s")).await?;
    // Each agent sends its first heartbeat at a random point of the first interval.
    tokio::time::sleep(Duration::from_secs(hb + 1)).await;
    let both = window(ctx, server, redis_pid, stack.db.cpu_meter(), len).await?;
    let last = sim.latest();
    sim.stop().await;
    stack.stop().await;

    let scale = 10_000.0 / f64::from(n) * hb as f64 / 15.0;
    println!(
        "  {} agents, server pings every {hb} s, {} s windows; empty server {:.2} % of a core",
        thousands(u64::from(n)),
        len.as_secs(),
        empty.server
    );
    let secs = len.as_secs_f64();
    // CPU seconds over the window beyond the empty server's, per round trip.
    let per_rt = (pings.server - empty.server).max(0.0) / 100.0 * secs / pings.pongs.max(1.0) * 1e6;
    ctx.figure(
        BENCH,
        "server CPU per ping/pong round trip (all-in)",
        format!("{per_rt:.1} µs"),
        "<= 30 µs",
        Some(per_rt <= 30.0),
    );
    let core_per_10k = (pings.server - empty.server).max(0.0) * scale;
    ctx.figure(
        BENCH,
        "server CPU per 10k agents at 15 s, pings only",
        format!("{core_per_10k:.2} % of a core"),
        "<= 2 %",
        Some(core_per_10k <= 2.0),
    );
    let per_hb =
        (both.server - pings.server).max(0.0) / 100.0 * secs / both.heartbeats.max(1.0) * 1e6;
    ctx.figure(
        BENCH,
        "server CPU per agent heartbeat -> heartbeat_ack",
        format!("{per_hb:.1} µs"),
        "<= 30 µs",
        Some(per_hb <= 30.0),
    );
    let both_per_10k = (both.server - empty.server).max(0.0) * scale;
    ctx.figure(
        BENCH,
        "server CPU per 10k agents at 15 s, pings + heartbeats",
        format!("{both_per_10k:.2} % of a core"),
        "<= 2 %",
        Some(both_per_10k <= 2.0),
    );
    ctx.figure(
        BENCH,
        "Redis / PostgreSQL CPU per 10k agents (refreshes)",
        format!(
            "{:.2} / {:.2} % of a core",
            (pings.redis - empty.redis).max(0.0) * scale,
            (pings.postgres - empty.postgres).max(0.0) * scale
        ),
        "",
        None,
    );
    println!(
        "  pings-only window: {:.0} pongs, server {:.2} %; with heartbeats: {:.0} pongs + {:.0} heartbeats, server {:.2} %; agents alive at the end {}",
        pings.pongs, pings.server, both.pongs, both.heartbeats, both.server, last.alive
    );
    Ok(())
}
