//! Benchmark 6: connection churn: agents that connect, say hello, stay about 100 ms and close,
//! over and over. Each cycle costs the server a JWT check, a database upsert (the
//! connection epoch), the hello, the pending-command query, a Redis registry claim, and
//! on close a registry release and a database update. Redis and PostgreSQL CPU are
//! reported beside the server's.

use std::time::Duration;

use anyhow::Result;

use crate::procfs::{CpuMeter, pids_named};
use crate::services::{SimProc, redis_calls_per};
use crate::storm::redis_calls;
use crate::{Ctx, thousands};

const BENCH: &str = "6 churn";

pub async fn run(ctx: &mut Ctx) -> Result<()> {
    ctx.header("6. Connection churn (connect, hello, ~100 ms, close)");
    let env = ctx.heartbeat_env();
    let stack = ctx.stack(1, true, &env).await?;
    let server = &stack.servers[0];
    let n = ctx.size(1000, 100);
    let len = ctx.window(30, 3);
    let args: Vec<String> = [
        "--server",
        &server.base(),
        "--count",
        &n.to_string(),
        "--processes",
        "1",
        "--rate",
        "2000",
        "--heartbeat",
        "0s",
        "--hold",
        "100ms",
        "--prefix",
        "churn",
        "--progress",
        "250ms",
        "--duration",
        "30m",
    ]
    .map(String::from)
    .to_vec();
    let mut sim = SimProc::start(
        &ctx.sim_bin(),
        &args,
        &ctx.secret,
        &ctx.run_dir.join("churn-sim.log"),
    )
    .await?;
    sim.wait_for(
        "every agent connected once",
        Duration::from_secs(120),
        |s| s.connects >= u64::from(n),
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(if ctx.smoke { 1 } else { 5 })).await;

    let s0 = sim.latest();
    let m0 = server.metrics(&ctx.http).await?;
    let server_cpu = CpuMeter::start(vec![server.pid()]);
    let redis_cpu = CpuMeter::start(stack.redis.as_ref().map(|r| r.pid()).into_iter().collect());
    let pg_cpu = stack.db.cpu_meter();
    let pg_all = CpuMeter::start_listing(|| pids_named("postgres"));
    let sim_cpu = CpuMeter::start(sim.pids());
    let redis0 = redis_calls(&stack);
    let db0 = stack.db.activity().unwrap_or_default();
    tokio::time::sleep(len).await;
    let redis1 = redis_calls(&stack);
    let db1 = stack.db.activity().unwrap_or_default();
    let (server_pct, redis_pct, pg_pct, pg_all_pct, sim_pct) = (
        server_cpu.percent(),
        redis_cpu.percent(),
        pg_cpu.percent(),
        pg_all.percent(),
        sim_cpu.percent(),
    );
    let (_, wall) = server_cpu.read();
    let s1 = sim.latest();
    let m1 = server.metrics(&ctx.http).await?;
    sim.stop().await;
    stack.stop().await;

    let connects = (s1.connects - s0.connects) as f64 / wall;
    let upgrades = (m1.sum("agent_server_http_requests_total", &["status=\"101\""])
        - m0.sum("agent_server_http_requests_total", &["status=\"101\""]))
        / wall;
    let closed = (m1.sum("agent_server_ws_sessions_closed_total", &[])
        - m0.sum("agent_server_ws_sessions_closed_total", &[]))
        / wall;
    let failures = s1.connect_failures - s0.connect_failures;
    println!(
        "  {} agents cycling for {:.0} s: simulator saw {connects:.0} connects/s; server upgraded {upgrades:.0}/s and closed {closed:.0}/s; {failures} failed attempts",
        thousands(u64::from(n)),
        wall
    );
    println!(
        "  CPU, % of one core: server {server_pct:.0}, Redis {redis_pct:.0}, PostgreSQL backends {pg_pct:.0} (all PostgreSQL processes {pg_all_pct:.0}), simulator {sim_pct:.0}"
    );
    let cycles = upgrades * wall;
    let redis_per = redis_calls_per(&redis0, &redis1, cycles);
    println!(
        "  per connect/disconnect cycle: Redis commands {redis_per}; database {}",
        db1.per(&db0, cycles)
    );
    ctx.figure(
        BENCH,
        "Redis commands per cycle",
        redis_per.split(' ').next().unwrap_or("").to_string(),
        "",
        None,
    );
    ctx.figure(
        BENCH,
        "DB transactions / table scans per cycle",
        format!(
            "{:.2} / {:.2}",
            db1.transactions.saturating_sub(db0.transactions) as f64 / cycles.max(1.0),
            db1.scans.saturating_sub(db0.scans) as f64 / cycles.max(1.0)
        ),
        "",
        None,
    );
    ctx.figure(
        BENCH,
        "connects + disconnects per second sustained",
        format!("{:.0} + {:.0}", upgrades, closed),
        "",
        None,
    );
    ctx.figure(
        BENCH,
        "failed connection attempts in the window",
        failures.to_string(),
        "0",
        Some(failures == 0),
    );
    ctx.figure(
        BENCH,
        "server CPU per connect/disconnect cycle",
        format!("{:.0} µs", server_pct / 100.0 / upgrades.max(1.0) * 1e6),
        "",
        None,
    );
    ctx.figure(
        BENCH,
        "CPU: server / Redis / PostgreSQL (this db)",
        format!("{server_pct:.0} / {redis_pct:.0} / {pg_pct:.0} % of a core"),
        "",
        None,
    );
    Ok(())
}
