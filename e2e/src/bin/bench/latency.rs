//! Benchmark 3: command latency from the API's 202 to the agent receiving the command, and
//! the commands accepted and delivered per second, for agents on the replica that took the
//! request (same pod) and on the other one (cross pod: Redis pub/sub wake-up).
//!
//! The agents run in this process so that one monotonic clock times both ends. Requests
//! are sent open-loop on a fixed schedule (a slow answer does not delay the next
//! request), so queueing shows in the figures instead of lowering the rate.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use e2e::sim::backoff::Backoff;
use e2e::sim::net::loopback_sources;
use e2e::sim::tokens::TokenSource;
use e2e::sim::{Fleet, FleetConfig, Server};
use rand::Rng;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::{Ctx, percentile, post_command, thousands};

const BENCH: &str = "3 latency";

/// The highest rate the latency targets (p50 2 ms, p99 10 ms, p99.9 50 ms) apply at.
const LATENCY_TARGET_RATE: u32 = 2_000;

/// One command as the API client saw it.
struct Sent {
    id: String,
    sent: Instant,
    accepted: Instant,
}

type Receipts = Arc<Mutex<HashMap<String, Instant>>>;

pub async fn run(ctx: &mut Ctx) -> Result<()> {
    ctx.header("3. Command latency, API accepted (202) -> agent received");
    let mut env = ctx.heartbeat_env();
    // Agents must stay on the replica they were put on.
    env.push(("REBALANCE", "false".into()));
    let stack = ctx.stack(2, true, &env).await?;
    let per_pod = ctx.size(1000, 100);
    // Issue 16's rates: the latency targets at 2,000 per second, the throughput target
    // at 5,000.
    let rates: Vec<u32> = match ctx.rate {
        Some(r) => vec![r],
        None if ctx.smoke => vec![200],
        None => vec![LATENCY_TARGET_RATE, 5_000],
    };
    let len = ctx.window(30, 2);

    let mut servers = Vec::new();
    for s in &stack.servers {
        servers.push(
            Server::resolve(&s.base())
                .await
                .map_err(anyhow::Error::msg)?,
        );
    }
    let cfg = FleetConfig {
        servers,
        prefix: "lat".into(),
        first: 0,
        count: 2 * per_pod,
        // Round-robin: even agents on bench-a, odd ones on bench-b.
        start_on: None,
        sources: loopback_sources(8),
        rate: 2000,
        heartbeat: Duration::ZERO,
        hold: None,
        churn_pause: Duration::ZERO,
        inventory_bytes: 0,
        backoff: Backoff {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(60),
        },
        restart_delay: Duration::from_secs(5),
        read_buffer: 2048,
        connect_timeout: Duration::from_secs(10),
    };
    let ids: Vec<String> = (0..cfg.count).map(|i| cfg.client_id(i)).collect();
    let tokens = TokenSource::local(&ctx.secret, "HS256", Duration::from_secs(86_400))
        .map_err(anyhow::Error::msg)?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let fleet = Fleet::start(cfg, tokens, Some(tx));
    let receipts: Receipts = Arc::default();
    let r = receipts.clone();
    tokio::spawn(async move {
        while let Some(receipt) = rx.recv().await {
            // At-least-once delivery may repeat a command; the first arrival counts.
            r.lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(receipt.command_id)
                .or_insert(receipt.at);
        }
    });
    let start = Instant::now();
    while fleet.snapshot().per_server != [u64::from(per_pod), u64::from(per_pod)] {
        if start.elapsed() > Duration::from_secs(120) {
            bail!("agents did not all connect: {}", fleet.snapshot().line());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let same: Vec<String> = ids.iter().step_by(2).cloned().collect();
    let cross: Vec<String> = ids.iter().skip(1).step_by(2).cloned().collect();
    let api = stack.servers[0].base();
    println!(
        "  {} agents on each of 2 replicas; commands posted to bench-a for {} s per case",
        thousands(u64::from(per_pod)),
        len.as_secs()
    );

    // Warm-up: connections, prepared statements, allocator.
    load(ctx, &api, &ids, rates[0], Duration::from_secs(2)).await;
    let before = fleet.snapshot();
    let cases = rates
        .iter()
        .flat_map(|r| [(*r, "same pod", &same), (*r, "cross pod", &cross)]);
    for (rate, case, agents) in cases {
        let (sent, failed) = load(ctx, &api, agents, rate, len).await;
        // Let the stragglers arrive (bounded).
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let all_in = {
                let got = receipts.lock().unwrap_or_else(|p| p.into_inner());
                sent.iter().all(|s| got.contains_key(&s.id))
            };
            if all_in {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        report(ctx, case, &sent, failed, &receipts, rate, len);
    }
    let after = fleet.snapshot();
    if after.drops != before.drops || after.closes != before.closes {
        println!(
            "  note: agents reconnected during the run (drops {} -> {}, closes {:?})",
            before.drops, after.drops, after.closes
        );
    }
    fleet.stop(Duration::from_secs(10)).await;
    stack.stop().await;
    Ok(())
}

/// Posts commands for random `agents` at `rate` per second for `len`, open-loop.
async fn load(
    ctx: &Ctx,
    api: &str,
    agents: &[String],
    rate: u32,
    len: Duration,
) -> (Vec<Sent>, u64) {
    let total = (f64::from(rate) * len.as_secs_f64()) as u64;
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = JoinSet::new();
    for _ in 0..total {
        tick.tick().await;
        let agent = agents[rand::rng().random_range(0..agents.len())].clone();
        let (http, api, admin) = (ctx.http.clone(), api.to_string(), ctx.admin.clone());
        tasks.spawn(async move {
            let sent = Instant::now();
            let id = post_command(&http, &api, &admin, &agent).await?;
            Ok::<_, anyhow::Error>(Sent {
                id,
                sent,
                accepted: Instant::now(),
            })
        });
    }
    let mut out = Vec::with_capacity(total as usize);
    let mut failed = 0;
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok(s)) => out.push(s),
            _ => failed += 1,
        }
    }
    (out, failed)
}

fn report(
    ctx: &mut Ctx,
    case: &str,
    sent: &[Sent],
    failed: u64,
    receipts: &Receipts,
    rate: u32,
    len: Duration,
) {
    let got = receipts.lock().unwrap_or_else(|p| p.into_inner());
    let mut from_202 = Vec::new();
    let mut from_post = Vec::new();
    let mut api = Vec::new();
    let mut early = 0u64;
    let mut lost = 0u64;
    for s in sent {
        api.push(ms(s.accepted - s.sent));
        match got.get(&s.id) {
            Some(at) => {
                if *at < s.accepted {
                    early += 1;
                }
                from_202.push(ms(at.saturating_duration_since(s.accepted)));
                from_post.push(ms(at.saturating_duration_since(s.sent)));
            }
            None => lost += 1,
        }
    }
    // Throughput while the schedule ran, past its first second (connections warming):
    // commands the API accepted, and commands agents received, per second of that
    // span. A server that keeps up shows the offered rate in both; one that falls
    // behind shows less, however long its queue may grow after the window.
    let start = sent.iter().map(|s| s.sent).min();
    let (accepted_rate, delivered_rate) = match start {
        Some(start) => {
            let from = start + Duration::from_secs(1);
            let until = start + len;
            let span = (until - from).as_secs_f64().max(1e-3);
            let within = |t: &Instant| *t >= from && *t < until;
            let accepted = sent.iter().filter(|s| within(&s.accepted)).count();
            let delivered = sent
                .iter()
                .filter_map(|s| got.get(&s.id))
                .filter(|t| within(t))
                .count();
            (accepted as f64 / span, delivered as f64 / span)
        }
        None => (0.0, 0.0),
    };
    drop(got);
    for v in [&mut from_202, &mut from_post, &mut api] {
        v.sort_by(f64::total_cmp);
    }
    let p = |v: &[f64], q| percentile(v, q);
    println!(
        "  {case}: {} commands at {rate}/s over {} s; {failed} API errors, {lost} not received, {early} reached the agent before the client read the 202",
        thousands(sent.len() as u64),
        len.as_secs(),
    );
    println!(
        "    POST -> agent  p50 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2} ms;  API (POST -> 202) p50 {:.2}  p99 {:.2} ms",
        p(&from_post, 0.5),
        p(&from_post, 0.99),
        p(&from_post, 0.999),
        p(&from_post, 1.0),
        p(&api, 0.5),
        p(&api, 0.99)
    );
    let bench = BENCH;
    let case = format!("{case} at {rate}/s");
    // Sustained: both rates within 2 % of the offered one.
    let kept_up =
        accepted_rate >= 0.98 * f64::from(rate) && delivered_rate >= 0.98 * f64::from(rate);
    ctx.figure(
        bench,
        format!("{case}: accepted / delivered per s"),
        format!("{accepted_rate:.0} / {delivered_rate:.0}"),
        format!(">= {rate}"),
        Some(kept_up),
    );
    // The latency targets hold up to 2,000 per second (issue 16); above it the
    // figures are printed for what they show.
    let judged = rate <= LATENCY_TARGET_RATE;
    let (p50, p99, p999) = (p(&from_202, 0.5), p(&from_202, 0.99), p(&from_202, 0.999));
    for (what, value, target) in [("p50", p50, 2.0), ("p99", p99, 10.0), ("p99.9", p999, 50.0)] {
        ctx.figure(
            bench,
            format!("{case}: 202 -> agent {what}"),
            format!("{value:.2} ms"),
            if judged {
                format!("<= {target} ms")
            } else {
                "-".into()
            },
            judged.then_some(value <= target),
        );
    }
    ctx.figure(
        bench,
        format!("{case}: commands lost / API errors"),
        format!("{lost} / {failed}"),
        "0",
        Some(lost == 0 && failed == 0),
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
