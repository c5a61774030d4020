//! Benchmark 9: scale (issue 16). A fleet of up to 100,000 agents held by five release
//! replicas sharing one PostgreSQL database and one redis-server, checked alive through
//! two heartbeat intervals; then a rolling restart of all five (SIGTERM, drain, start
//! again on the same ports) while commands are posted without pause, and every accepted
//! command's result must end up stored.
//!
//! Printed: the kernel limits the run needs; CPU and memory per component (each replica,
//! redis-server, the database's backends, the simulators) while the fleet idles and over
//! the rolling restart; Redis operations per agent (`INFO commandstats`), database
//! transactions and rows per agent (`pg_stat_database`) and statements
//! (`pg_stat_statements`, where the PostgreSQL server preloads it); per restart, the drain,
//! the time until every agent was connected again and the fewest connected meanwhile;
//! commands accepted and lost. docs/operations.md's capacity model is checked against
//! these figures.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use e2e::sim::Snapshot;
use rand::Rng;

use crate::kernel::{self, Load};
use crate::procfs::{CpuMeter, clk_tck, loadavg, max_open_files, open_fds, pss_kib, rss_kib};
use crate::services::{PROGRESS_EVERY, Redis, ServerProc, SimProc, pg_stat_statements_available};
use crate::{Ctx, Stack, post_command, thousands};

const BENCH: &str = "9 scale";
const REPLICAS: usize = 5;
/// The fleet.
const TARGET_AGENTS: u32 = 100_000;
/// Connections per second while the fleet starts, over all simulator processes.
const RAMP_RATE: u32 = 2_000;
/// DATABASE_POOL_SIZE per replica: five replicas at the default 16 would take 80 of the
/// shared PostgreSQL server's 100 connections.
const POOL: u32 = 8;
/// Memory the run needs per agent, every process and the kernel together (server 5.4
/// KiB, simulator about 9, two socket ends 4.6, PostgreSQL and Redis rows), in KiB.
const KIB_PER_AGENT: u64 = 25;
/// No replica in the list of those to post commands to.
const NONE: usize = usize::MAX;

pub async fn run(ctx: &mut Ctx) -> Result<()> {
    ctx.header("9. Scale: a fleet on 5 replicas, two heartbeat intervals, a rolling restart");
    let hb = ctx.heartbeat_secs();
    let mut env = ctx.heartbeat_env();
    env.push(("DATABASE_POOL_SIZE", POOL.to_string()));
    // Rebalancing brings agents back to each restarted replica, as in production.
    env.push(("REBALANCE", "true".into()));
    let mut stack = ctx.stack(REPLICAS, true, &env).await?;

    // What one replica can hold: its open-file limit, less what it opened to start, its
    // database pool, Redis and our scrapes.
    let pid0 = stack.servers[0].pid();
    let files = max_open_files(pid0).unwrap_or(1024);
    let per_replica = files.saturating_sub(open_fds(pid0).unwrap_or(0) + u64::from(POOL) + 40);
    let capacity = u32::try_from(per_replica * REPLICAS as u64).unwrap_or(u32::MAX);
    let n = match ctx.agents {
        Some(n) if n > capacity => bail!(
            "{} agents do not fit on {REPLICAS} replicas whose open-file limit is {} ({} agents each at most)",
            thousands(u64::from(n)),
            thousands(files),
            thousands(per_replica)
        ),
        Some(n) => n,
        None if ctx.smoke => 500,
        None => TARGET_AGENTS.min(capacity),
    };
    if n < TARGET_AGENTS && ctx.agents.is_none() && !ctx.smoke {
        println!(
            "  {} agents need {} open files per replica; the limit here is {} (hard): {} agents, {} per replica",
            thousands(u64::from(TARGET_AGENTS)),
            thousands(u64::from(TARGET_AGENTS) / REPLICAS as u64 + files - per_replica),
            thousands(files),
            thousands(u64::from(n)),
            thousands(per_replica)
        );
    }
    kernel::check(&Load {
        connections: u64::from(n),
        per_process: u64::from(n).div_ceil(REPLICAS as u64) + (files - per_replica),
        sources: 8,
        destinations: REPLICAS as u64,
        kib_per_connection: KIB_PER_AGENT,
    })?;

    let processes = n.div_ceil(15_000).max(1);
    let mut args: Vec<String> = vec![
        "--count".into(),
        n.to_string(),
        "--prefix".into(),
        "scale".into(),
        "--processes".into(),
        processes.to_string(),
        "--rate".into(),
        (RAMP_RATE / processes).max(100).to_string(),
        "--heartbeat".into(),
        format!("{hb}s"),
        "--progress".into(),
        "500ms".into(),
        "--duration".into(),
        "2h".into(),
    ];
    for s in &stack.servers {
        args.extend(["--server".into(), s.base()]);
    }
    let mut sim = SimProc::start(
        &ctx.sim_bin(),
        &args,
        &ctx.secret,
        &ctx.run_dir.join("scale-sim.log"),
    )
    .await?;
    let bound = Duration::from_secs(120 + u64::from(n) / 200);
    let took = sim
        .wait_for("every agent connected", bound, |s| {
            s.connected == u64::from(n)
        })
        .await?;
    println!(
        "  {} agents connected over {REPLICAS} replicas in {:.1} s ({processes} simulator processes, {} per replica), load {}",
        thousands(u64::from(n)),
        took.as_secs_f64(),
        thousands(u64::from(n) / REPLICAS as u64),
        loadavg()
    );

    let (db, connection) = tokio_postgres::connect(&stack.db.url(), tokio_postgres::NoTls)
        .await
        .context("connecting to the benchmark's database")?;
    tokio::spawn(connection);
    let statements = pg_stat_statements_available(&db).await;

    // Two heartbeat intervals with the fleet idle: every agent must stay connected and hear
    // from its replica.
    let window = Duration::from_secs(2 * hb + 1);
    println!(
        "  holding for {} s (two heartbeat intervals of {hb} s){}",
        window.as_secs(),
        if statements {
            ""
        } else {
            "; pg_stat_statements not loaded by this PostgreSQL server: no statement counts"
        }
    );
    let before = Reading::take(ctx, &stack, &sim, &db, statements).await?;
    let meters = Meters::start(&stack, &sim);
    let start = Instant::now();
    while start.elapsed() < window {
        tokio::time::sleep(Duration::from_secs(5).min(window.saturating_sub(start.elapsed())))
            .await;
        println!(
            "    {:>3} s: {}",
            start.elapsed().as_secs(),
            sim.latest().line().trim_start()
        );
    }
    let after = Reading::take(ctx, &stack, &sim, &db, statements).await?;
    let usage = meters.read(&stack, &sim);
    let held = &after.snapshot;
    let all_alive = held.alive == u64::from(n)
        && held.connected == u64::from(n)
        && after.on_servers == u64::from(n)
        && held.connects == before.snapshot.connects
        && held.drops == before.snapshot.drops;
    if !all_alive {
        println!(
            "  not all alive: the replicas count {}, the simulators: {}",
            after.on_servers,
            held.line()
        );
    }
    let target_met = all_alive && (n >= TARGET_AGENTS || ctx.agents.is_some() || ctx.smoke);
    ctx.figure(
        BENCH,
        "agents alive through two heartbeat intervals",
        format!("{} of {}", thousands(held.alive), thousands(u64::from(n))),
        "100,000 on 5",
        Some(target_met),
    );
    let idle_usage = usage;
    idle_usage.print(ctx, "idle fleet");
    let idle = Costs::between(&before, &after, hb);
    idle.print("idle fleet", u64::from(n), false);
    per_event(
        "per agent per heartbeat interval",
        (f64::from(n) * idle.secs / hb as f64) as u64,
        (&idle, &idle_usage),
        (&Costs::zero(hb), &Usage::zero(REPLICAS)),
    );

    // Commands alone for one interval: their cost is what this window adds to the idle
    // fleet's.
    let rate = ctx.rate.unwrap_or(if ctx.smoke { 20 } else { 200 });
    let down = Arc::new(AtomicUsize::new(NONE));
    let poster = Poster::start(ctx, &stack, n, rate, down.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = Reading::take(ctx, &stack, &sim, &db, statements).await?;
    let meters = Meters::start(&stack, &sim);
    println!("  {rate} commands per second for {hb} s, no restart");
    tokio::time::sleep(Duration::from_secs(hb)).await;
    let after = Reading::take(ctx, &stack, &sim, &db, statements).await?;
    let commands_usage = meters.read(&stack, &sim);
    let commands = Costs::between(&before, &after, hb);
    commands.print("commands", u64::from(n), false);
    commands_usage.print(ctx, "commands");
    per_event(
        "per command",
        commands.d.commands,
        (&commands, &commands_usage),
        (&idle, &idle_usage),
    );

    // The rolling restart, with commands posted throughout.
    let before = Reading::take(ctx, &stack, &sim, &db, statements).await?;
    let meters = Meters::start(&stack, &sim);
    println!(
        "  rolling restart of {REPLICAS} replicas, {rate} commands per second posted throughout, load {}",
        loadavg()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut restarts = Vec::new();
    for i in 0..REPLICAS {
        restarts.push(restart_one(ctx, &mut stack, &mut sim, i, n, &down).await?);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (accepted, refused) = poster.stop().await;
    let after = Reading::take(ctx, &stack, &sim, &db, statements).await?;
    let usage = meters.read(&stack, &sim);

    println!(
        "  {:<9} {:>8} {:>10} {:>14} {:>16} {:>12} {:>14}",
        "replica", "drain", "healthy", "all back", "fewest online", "then held", "exit"
    );
    for r in &restarts {
        println!(
            "  {:<9} {:>6.1} s {:>8.1} s {:>12.1} s {:>16} {:>12} {:>14}",
            r.name,
            r.exited.as_secs_f64(),
            r.healthy.as_secs_f64(),
            r.all_back.as_secs_f64(),
            thousands(r.fewest),
            thousands(r.held_after),
            r.status
        );
    }
    let slowest = restarts
        .iter()
        .map(|r| r.all_back.as_secs_f64())
        .fold(0.0, f64::max);
    ctx.figure(
        BENCH,
        "every agent connected again after a restart, slowest",
        format!("{slowest:.1} s"),
        "",
        None,
    );
    usage.print(ctx, "rolling restart");
    let restart_costs = Costs::between(&before, &after, hb);
    restart_costs.print("rolling restart", u64::from(n), true);
    println!(
        "  per reconnection below: the window less the idle fleet's cost, less its commands at the cost measured per command"
    );
    per_event_less(
        "per reconnection",
        restart_costs.d.connects,
        (&restart_costs, &usage),
        (&idle, &idle_usage),
        (&commands, &commands_usage, restart_costs.d.commands),
    );

    // Every accepted command must have its result stored.
    let lost = unfinished(&db, &accepted, Duration::from_secs(180)).await?;
    let snap = sim.latest();
    println!(
        "  commands: {} accepted (202), {} refused by the API ({}), {} received by agents (redeliveries included), {} lost",
        thousands(accepted.len() as u64),
        thousands(refused.values().sum()),
        refused
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join(", "),
        thousands(snap.commands),
        lost
    );
    ctx.figure(
        BENCH,
        "commands lost over the rolling restart",
        format!("{lost} of {}", thousands(accepted.len() as u64)),
        "0",
        Some(lost == 0 && !accepted.is_empty()),
    );
    sim.stop().await;
    stack.stop().await;
    Ok(())
}

/// One replica's restart: SIGTERM, the drain, the same replica started again, then every
/// agent connected again (and, bounded, the replica refilled by rebalancing).
async fn restart_one(
    ctx: &Ctx,
    stack: &mut Stack,
    sim: &mut SimProc,
    i: usize,
    n: u32,
    down: &AtomicUsize,
) -> Result<RestartFigures> {
    let name = stack.servers[i].name.clone();
    down.store(i, Ordering::SeqCst);
    let signalled = Instant::now();
    println!(
        "    SIGTERM to {name} ({} agents), load {}",
        thousands(sim.latest().per_server.get(i).copied().unwrap_or(0)),
        loadavg()
    );
    let r = stack.servers[i]
        .restart(Duration::from_secs(40), 2)
        .await
        .with_context(|| format!("restarting {name}"))?;
    down.store(NONE, Ordering::SeqCst);
    println!(
        "    {name}: exited after {:.1} s ({}), healthy again after {:.1} s",
        r.exited.as_secs_f64(),
        r.status,
        r.healthy.as_secs_f64()
    );
    let bound = Duration::from_secs(240 + u64::from(n) / 500);
    sim.wait_for("every agent connected again", bound, |s| {
        s.connected == u64::from(n)
    })
    .await?;
    let all_back = signalled.elapsed();
    let fewest = sim
        .history()
        .iter()
        .filter(|(t, _)| *t >= signalled)
        .map(|(_, s)| s.connected)
        .min()
        .unwrap_or(0);
    // Rebalancing moves agents onto the new process; wait (bounded, not a failure) until it
    // holds most of its share before the next restart, as a rollout waits for readiness.
    let share = u64::from(n) / REPLICAS as u64;
    let settle = Duration::from_secs(if ctx.smoke { 20 } else { 90 });
    let refilled = sim
        .wait_for("the restarted replica refilled", settle, |s: &Snapshot| {
            s.per_server.get(i).copied().unwrap_or(0) * 10 >= share * 8
        })
        .await;
    if let Err(e) = refilled {
        println!("    {e:#}; going on");
    }
    Ok(RestartFigures {
        name,
        exited: r.exited,
        healthy: r.healthy,
        all_back,
        fewest,
        held_after: sim.latest().per_server.get(i).copied().unwrap_or(0),
        status: r.status,
    })
}

struct RestartFigures {
    name: String,
    exited: Duration,
    healthy: Duration,
    /// SIGTERM → every agent of the fleet connected again.
    all_back: Duration,
    /// The fewest agents connected at once after the SIGTERM.
    fewest: u64,
    /// Agents on the restarted replica when the next restart began.
    held_after: u64,
    status: String,
}

/// Commands posted at a fixed rate (open loop) to random agents, through a random replica
/// that is not being restarted.
struct Poster {
    task: tokio::task::JoinHandle<()>,
    stop: tokio_util::sync::CancellationToken,
    accepted: Arc<Mutex<Vec<String>>>,
    refused: Arc<Mutex<BTreeMap<String, u64>>>,
}

impl Poster {
    fn start(ctx: &Ctx, stack: &Stack, n: u32, rate: u32, down: Arc<AtomicUsize>) -> Poster {
        let bases: Vec<String> = stack.servers.iter().map(|s| s.base()).collect();
        let (http, admin) = (ctx.http.clone(), ctx.admin.clone());
        let stop = tokio_util::sync::CancellationToken::new();
        let accepted: Arc<Mutex<Vec<String>>> = Arc::default();
        let refused: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
        let (s, a, r) = (stop.clone(), accepted.clone(), refused.clone());
        let task = tokio::spawn(async move {
            let mut tick =
                tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate.max(1))));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut requests = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    _ = s.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let (agent, replica) = {
                    let mut rng = rand::rng();
                    let skip = down.load(Ordering::SeqCst);
                    let mut replica = rng.random_range(0..bases.len());
                    if replica == skip {
                        replica = (replica + 1) % bases.len();
                    }
                    (format!("scale-{:06}", rng.random_range(0..n)), replica)
                };
                let (http, admin, base) = (http.clone(), admin.clone(), bases[replica].clone());
                let (a, r) = (a.clone(), r.clone());
                requests.spawn(async move {
                    match post_command(&http, &base, &admin, &agent).await {
                        Ok(id) => a.lock().unwrap_or_else(|p| p.into_inner()).push(id),
                        Err(e) => {
                            let why = e.to_string();
                            let kind = why
                                .split_whitespace()
                                .find(|w| w.len() == 3 && w.parse::<u16>().is_ok())
                                .unwrap_or("connection")
                                .to_string();
                            *r.lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .entry(kind)
                                .or_default() += 1;
                        }
                    }
                });
                while requests.try_join_next().is_some() {}
            }
            while requests.join_next().await.is_some() {}
        });
        Poster {
            task,
            stop,
            accepted,
            refused,
        }
    }

    /// Stops posting, waits for the requests in flight; returns the accepted command ids
    /// and the refusals by HTTP status ("connection" when there was no answer).
    async fn stop(self) -> (Vec<String>, BTreeMap<String, u64>) {
        self.stop.cancel();
        let _ = self.task.await;
        let accepted =
            std::mem::take(&mut *self.accepted.lock().unwrap_or_else(|p| p.into_inner()));
        let refused = std::mem::take(&mut *self.refused.lock().unwrap_or_else(|p| p.into_inner()));
        (accepted, refused)
    }
}

/// Figures read at the start and end of a window.
struct Reading {
    at: Instant,
    snapshot: Snapshot,
    /// `agent_server_connected_agents` summed over the replicas.
    on_servers: u64,
    counters: Counters,
}

/// Counters of the fleet and the shared services: totals at a reading, or a window's
/// differences.
#[derive(Default)]
struct Counters {
    /// Connections that reached `welcome`, commands agents received (the simulators).
    connects: u64,
    commands: u64,
    /// Pings the replicas sent (`agent_server_ws_messages_total`).
    pings: u64,
    /// Redis calls by command.
    redis: BTreeMap<String, u64>,
    db: DbStats,
    /// Statement calls by verb and table, where pg_stat_statements is loaded.
    statements: BTreeMap<String, i64>,
}

impl Reading {
    async fn take(
        ctx: &Ctx,
        stack: &Stack,
        sim: &SimProc,
        db: &tokio_postgres::Client,
        statements: bool,
    ) -> Result<Reading> {
        let mut on_servers = 0;
        let mut pings = 0;
        for s in &stack.servers {
            // A replica that is restarting has no agents and has sent its pings.
            if let Ok(m) = s.metrics(&ctx.http).await {
                on_servers += m.sum("agent_server_connected_agents", &[]) as u64;
                pings += m.sum(
                    "agent_server_ws_messages_total",
                    &["direction=\"outbound\"", "type=\"ping\""],
                ) as u64;
            }
        }
        let snapshot = sim.latest();
        Ok(Reading {
            at: Instant::now(),
            on_servers,
            counters: Counters {
                connects: snapshot.connects,
                commands: snapshot.commands,
                pings,
                redis: stack
                    .redis
                    .as_ref()
                    .context("the scale benchmark runs with Redis")?
                    .command_calls()?,
                db: DbStats::read(db).await?,
                statements: if statements {
                    statement_calls(db).await?
                } else {
                    BTreeMap::new()
                },
            },
            snapshot,
        })
    }
}

/// This database's counters from `pg_stat_database`.
#[derive(Clone, Copy, Default)]
struct DbStats {
    commits: i64,
    inserted: i64,
    updated: i64,
    deleted: i64,
    /// Rows returned to clients (`tup_fetched`: by index scans).
    fetched: i64,
}

impl DbStats {
    async fn read(db: &tokio_postgres::Client) -> Result<DbStats> {
        let row = db
            .query_one(
                "SELECT xact_commit, tup_inserted, tup_updated, tup_deleted, tup_fetched \
                 FROM pg_stat_database WHERE datname = current_database()",
                &[],
            )
            .await?;
        Ok(DbStats {
            commits: row.get(0),
            inserted: row.get(1),
            updated: row.get(2),
            deleted: row.get(3),
            fetched: row.get(4),
        })
    }
}

/// Calls per statement on this database, the statement's first words as its name.
async fn statement_calls(db: &tokio_postgres::Client) -> Result<BTreeMap<String, i64>> {
    let rows = db
        .query(
            "/* bench */ SELECT query, calls FROM pg_stat_statements \
             WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             AND query NOT LIKE '/* bench */%'",
            &[],
        )
        .await?;
    let mut out = BTreeMap::new();
    for row in rows {
        let query: String = row.get(0);
        let calls: i64 = row.get(1);
        *out.entry(statement_kind(&query)).or_default() += calls;
    }
    Ok(out)
}

/// `UPDATE agents SET …` → "UPDATE agents": a statement's verb and table.
fn statement_kind(query: &str) -> String {
    let words: Vec<&str> = query.split_whitespace().collect();
    let verb = words.first().map_or("?".to_string(), |w| w.to_uppercase());
    let table = match verb.as_str() {
        "SELECT" | "DELETE" => words
            .iter()
            .position(|w| w.eq_ignore_ascii_case("from"))
            .and_then(|i| words.get(i + 1)),
        "INSERT" => words.get(2),
        "UPDATE" => words.get(1),
        _ => None,
    };
    match table {
        Some(t) => format!(
            "{verb} {}",
            t.trim_matches(|c: char| !c.is_alphanumeric() && c != '_')
        ),
        None => verb,
    }
}

/// What a window cost the shared services.
struct Costs {
    secs: f64,
    /// What the counters grew by in the window.
    d: Counters,
    hb: u64,
}

impl Costs {
    /// Nothing done: the baseline of the idle fleet itself.
    fn zero(hb: u64) -> Costs {
        Costs {
            secs: 1.0,
            d: Counters::default(),
            hb,
        }
    }

    fn between(a: &Reading, b: &Reading, hb: u64) -> Costs {
        let (a, bt, b) = (&a.counters, b.at - a.at, &b.counters);
        let redis = b
            .redis
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.saturating_sub(a.redis.get(k).copied().unwrap_or(0)),
                )
            })
            .filter(|(_, v)| *v > 0)
            .collect();
        let statements = b
            .statements
            .iter()
            .map(|(k, v)| (k.clone(), v - a.statements.get(k).copied().unwrap_or(0)))
            .filter(|(_, v)| *v > 0)
            .collect();
        Costs {
            secs: bt.as_secs_f64(),
            d: Counters {
                connects: b.connects.saturating_sub(a.connects),
                commands: b.commands.saturating_sub(a.commands),
                pings: b.pings.saturating_sub(a.pings),
                redis,
                db: DbStats {
                    commits: b.db.commits - a.db.commits,
                    inserted: b.db.inserted - a.db.inserted,
                    updated: b.db.updated - a.db.updated,
                    deleted: b.db.deleted - a.db.deleted,
                    fetched: b.db.fetched - a.db.fetched,
                },
                statements,
            },
            hb,
        }
    }

    fn print(&self, what: &str, n: u64, restarts: bool) {
        let per_s = |v: f64| v / self.secs.max(0.001);
        // Per agent per heartbeat interval: the unit the capacity model uses.
        let per_agent = |v: f64| per_s(v) * self.hb as f64 / n.max(1) as f64;
        let redis_total: u64 = self.d.redis.values().sum();
        println!(
            "  {what}, {:.0} s: {} connections (welcome), {} commands received by agents",
            self.secs,
            thousands(self.d.connects),
            thousands(self.d.commands)
        );
        // Replicas count pings from their start: a window with restarts has no figure.
        let pings = match restarts {
            true => String::new(),
            false => format!("pings sent {:.0}/s; ", per_s(self.d.pings as f64)),
        };
        println!(
            "  {what}, {:.0} s: {pings}Redis {:.0} ops/s ({:.3} per agent per {}-s interval: {})",
            self.secs,
            per_s(redis_total as f64),
            per_agent(redis_total as f64),
            self.hb,
            self.d
                .redis
                .iter()
                .map(|(k, v)| format!("{k} {:.0}/s", per_s(*v as f64)))
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!(
            "  {what}: PostgreSQL {:.1} commits/s, rows {:.0} updated, {:.0} inserted, {:.0} deleted, {:.0} fetched per s ({:.3} rows updated per agent per interval)",
            per_s(self.d.db.commits as f64),
            per_s(self.d.db.updated as f64),
            per_s(self.d.db.inserted as f64),
            per_s(self.d.db.deleted as f64),
            per_s(self.d.db.fetched as f64),
            per_agent(self.d.db.updated as f64),
        );
        if !self.d.statements.is_empty() {
            let total: i64 = self.d.statements.values().sum();
            let mut top: Vec<(&String, &i64)> = self.d.statements.iter().collect();
            top.sort_by(|a, b| b.1.cmp(a.1));
            println!(
                "  {what}: {:.1} statements/s: {}",
                per_s(total as f64),
                top.iter()
                    .take(8)
                    .map(|(k, v)| format!("{k} {:.1}/s", per_s(**v as f64)))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
}

/// CPU meters over a window, per component.
struct Meters {
    /// Each replica's CPU ticks at the start (restarts included, [`ServerProc::cpu_ticks`]).
    replicas: Vec<u64>,
    start: Instant,
    redis: CpuMeter,
    db: CpuMeter,
    sim: CpuMeter,
}

impl Meters {
    fn start(stack: &Stack, sim: &SimProc) -> Meters {
        Meters {
            replicas: stack.servers.iter().map(ServerProc::cpu_ticks).collect(),
            start: Instant::now(),
            redis: CpuMeter::start(stack.redis.iter().map(Redis::pid).collect()),
            db: stack.db.cpu_meter(),
            sim: CpuMeter::start(sim.pids()),
        }
    }

    /// CPU over the window and memory now.
    fn read(self, stack: &Stack, sim: &SimProc) -> Usage {
        let wall = self.start.elapsed().as_secs_f64().max(0.001);
        let tck = clk_tck() as f64;
        Usage {
            replicas: stack
                .servers
                .iter()
                .zip(&self.replicas)
                .map(|(s, t0)| s.cpu_ticks().saturating_sub(*t0) as f64 / tck / wall * 100.0)
                .collect(),
            replica_rss_mib: stack
                .servers
                .iter()
                .map(|s| rss_kib(s.pid()).unwrap_or(0) / 1024)
                .collect(),
            redis: self.redis.percent(),
            redis_rss_mib: stack
                .redis
                .as_ref()
                .and_then(|r| rss_kib(r.pid()))
                .unwrap_or(0)
                / 1024,
            db: self.db.percent(),
            db_pss_mib: stack
                .db
                .backends()
                .into_iter()
                .filter_map(pss_kib)
                .sum::<u64>()
                / 1024,
            sim: self.sim.percent(),
            sim_rss_mib: sim.latest().rss_kib / 1024,
        }
    }
}

/// CPU in percent of one core over a window, memory at its end.
struct Usage {
    replicas: Vec<f64>,
    replica_rss_mib: Vec<u64>,
    redis: f64,
    redis_rss_mib: u64,
    db: f64,
    db_pss_mib: u64,
    sim: f64,
    sim_rss_mib: u64,
}

impl Usage {
    /// Nothing used: the baseline of the idle fleet itself.
    fn zero(replicas: usize) -> Usage {
        Usage {
            replicas: vec![0.0; replicas],
            replica_rss_mib: vec![0; replicas],
            redis: 0.0,
            redis_rss_mib: 0,
            db: 0.0,
            db_pss_mib: 0,
            sim: 0.0,
            sim_rss_mib: 0,
        }
    }

    /// CPU seconds per second of wall time: (replicas together, Redis, PostgreSQL).
    fn rates(&self) -> [f64; 3] {
        [
            self.replicas.iter().sum::<f64>() / 100.0,
            self.redis / 100.0,
            self.db / 100.0,
        ]
    }

    fn print(&self, ctx: &mut Ctx, what: &str) {
        let cpu: Vec<String> = self.replicas.iter().map(|c| format!("{c:.0}")).collect();
        let rss: Vec<String> = self.replica_rss_mib.iter().map(u64::to_string).collect();
        println!(
            "  {what}, CPU in % of one core / memory: replicas {} % / {} MiB RSS; redis-server {:.1} % / {} MiB; PostgreSQL backends {:.1} % / {} MiB PSS; simulators {:.0} % / {} MiB; load {}",
            cpu.join(" + "),
            rss.join(" + "),
            self.redis,
            self.redis_rss_mib,
            self.db,
            self.db_pss_mib,
            self.sim,
            self.sim_rss_mib,
            loadavg()
        );
        ctx.figure(
            BENCH,
            format!("{what}: replicas' CPU, total"),
            format!("{:.0} % of a core", self.replicas.iter().sum::<f64>()),
            "",
            None,
        );
        ctx.figure(
            BENCH,
            format!("{what}: replicas' RSS, total"),
            format!("{} MiB", self.replica_rss_mib.iter().sum::<u64>()),
            "",
            None,
        );
        ctx.figure(
            BENCH,
            format!("{what}: Redis / PostgreSQL CPU"),
            format!("{:.1} % / {:.1} %", self.redis, self.db),
            "",
            None,
        );
    }
}

/// A window's cost beyond a baseline window's, per event: CPU of the replicas, Redis and
/// PostgreSQL in µs, Redis operations, database commits, rows written and statements.
fn per_event(what: &str, events: u64, window: (&Costs, &Usage), base: (&Costs, &Usage)) {
    per_event_less(what, events, window, base, (base.0, base.1, 0));
}

/// [`per_event`], less `other.2` events of another kind at `other`'s cost beyond `base`.
fn per_event_less(
    what: &str,
    events: u64,
    (w, wu): (&Costs, &Usage),
    (b, bu): (&Costs, &Usage),
    (o, ou, other_events): (&Costs, &Usage, u64),
) {
    if events == 0 {
        println!("  {what}: no events in the window");
        return;
    }
    let secs = w.secs;
    // Each figure as a rate per second, the baseline's and the other kind's shares
    // subtracted.
    let other_share = |o_rate: f64, b_rate: f64, o_events: u64| {
        if o.d.commands == 0 || o_events == 0 {
            0.0
        } else {
            (o_rate - b_rate) * o.secs / o.d.commands as f64 * o_events as f64 / secs
        }
    };
    let excess = |w_total: f64, b_rate: f64, o_rate: f64| {
        let rate = w_total / secs - b_rate - other_share(o_rate, b_rate, other_events);
        rate * secs / events as f64
    };
    let (wr, br, or) = (wu.rates(), bu.rates(), ou.rates());
    let cpu_us = |i: usize| excess(wr[i] * secs, br[i], or[i]) * 1e6;
    let total = |m: &BTreeMap<String, u64>| m.values().sum::<u64>() as f64;
    let statements = |c: &Costs| c.d.statements.values().sum::<i64>() as f64;
    let redis_ops = excess(
        total(&w.d.redis),
        total(&b.d.redis) / b.secs,
        total(&o.d.redis) / o.secs,
    );
    let commits = excess(
        w.d.db.commits as f64,
        b.d.db.commits as f64 / b.secs,
        o.d.db.commits as f64 / o.secs,
    );
    let rows = |c: &Costs| (c.d.db.updated + c.d.db.inserted + c.d.db.deleted) as f64;
    let written = excess(rows(w), rows(b) / b.secs, rows(o) / o.secs);
    let stmts = excess(
        statements(w),
        statements(b) / b.secs,
        statements(o) / o.secs,
    );
    println!(
        "  {what} ({} events): CPU {:.1} µs replicas, {:.1} µs Redis, {:.1} µs PostgreSQL; {:.2} Redis ops; {:.3} commits; {:.2} rows written{}",
        thousands(events),
        cpu_us(0),
        cpu_us(1),
        cpu_us(2),
        redis_ops,
        commits,
        written,
        if w.d.statements.is_empty() {
            String::new()
        } else {
            format!("; {stmts:.2} statements")
        }
    );
}

/// How many of `ids` have no stored result after waiting up to `bound`, read from the
/// database (a result is stored when the command's status is final).
async fn unfinished(db: &tokio_postgres::Client, ids: &[String], bound: Duration) -> Result<u64> {
    let deadline = Instant::now() + bound;
    let mut next_progress = Instant::now() + PROGRESS_EVERY;
    loop {
        let row = db
            .query_one(
                "SELECT count(*) FROM commands WHERE id = ANY($1) AND status IN ('succeeded', 'failed')",
                &[&ids],
            )
            .await?;
        let done: i64 = row.get(0);
        let left = (ids.len() as u64).saturating_sub(done as u64);
        if left == 0 || Instant::now() > deadline {
            return Ok(left);
        }
        if Instant::now() >= next_progress {
            println!(
                "    waiting for results: {left} of {} not stored yet",
                ids.len()
            );
            next_progress += PROGRESS_EVERY;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_are_named_by_verb_and_table() {
        assert_eq!(
            statement_kind("UPDATE agents AS a SET last_seen = v.t FROM (VALUES ($1))"),
            "UPDATE agents"
        );
        assert_eq!(
            statement_kind("INSERT INTO \"commands\" (id) VALUES ($1)"),
            "INSERT commands"
        );
        assert_eq!(
            statement_kind("SELECT id FROM agents WHERE id = $1"),
            "SELECT agents"
        );
        assert_eq!(statement_kind("COMMIT"), "COMMIT");
    }
}
