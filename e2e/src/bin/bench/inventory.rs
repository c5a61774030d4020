//! Benchmark 5: inventory uploads: twenty concurrent 10 MiB uploads over HTTP. Peak RSS growth
//! against the bytes in flight, and RSS afterwards: a buffer that keeps its capacity
//! (per connection, per pooled database connection, or in the allocator) fails this.
//!
//! RSS is sampled every 2 ms from /proc during the burst. The burst runs twice: the
//! second shows whether memory kept after the first is reused or accumulates.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use bytes::Bytes;
use e2e::sim::inventory::document;
use e2e::sim::tokens::TokenSource;
use tokio::task::JoinSet;

use crate::procfs::rss_kib;
use crate::{Ctx, percentile};

const BENCH: &str = "5 inventory";
const MIB: f64 = 1024.0 * 1024.0;

pub async fn run(ctx: &mut Ctx) -> Result<()> {
    ctx.header("5. Inventory uploads: 20 concurrent 10 MiB documents");
    let stack = ctx.stack(1, false, &[]).await?;
    let server = &stack.servers[0];
    let pid = server.pid();
    let uploads: usize = if ctx.smoke { 5 } else { 20 };
    let size: usize = if ctx.smoke { 2 << 20 } else { 10 << 20 };
    let settle = ctx.window(10, 2);
    let tokens = TokenSource::local(&ctx.secret, "HS256", Duration::from_secs(3600))
        .map_err(anyhow::Error::msg)?;
    let mut agents = Vec::new();
    for i in 0..uploads {
        let id = format!("inv-{i:03}");
        let token = tokens.agent(&id).await.map_err(anyhow::Error::msg)?;
        agents.push((id, token));
    }

    // Warm-up with small documents: agents exist, the database pool is open.
    burst(&server.base(), &agents, document(4096)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let baseline = min_rss(pid, Duration::from_secs(1)).await;
    let in_flight = (uploads * size) as f64;
    println!(
        "  {uploads} uploads of {:.0} MiB at once ({:.0} MiB in flight); server RSS at rest {:.1} MiB",
        size as f64 / MIB,
        in_flight / MIB,
        baseline as f64 / 1024.0
    );
    let doc = document(size);
    for round in 1..=2 {
        let peak = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = {
            let (peak, stop) = (peak.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(r) = rss_kib(pid) {
                        peak.fetch_max(r, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        };
        let took = burst(&server.base(), &agents, doc.clone()).await?;
        stop.store(true, Ordering::Relaxed);
        let _ = sampler.join();
        let peak = peak.load(Ordering::Relaxed);
        tokio::time::sleep(settle).await;
        let after = min_rss(pid, Duration::from_secs(1)).await;
        let growth = (peak.saturating_sub(baseline) * 1024) as f64;
        let residual = (after.saturating_sub(baseline) * 1024) as f64;
        println!(
            "  burst {round}: uploads took p50 {:.2} s, max {:.2} s; peak RSS {:.1} MiB; {} s later {:.1} MiB",
            percentile(&took, 0.5),
            percentile(&took, 1.0),
            peak as f64 / 1024.0,
            settle.as_secs(),
            after as f64 / 1024.0
        );
        ctx.figure(
            BENCH,
            format!("burst {round}: peak RSS growth / bytes in flight"),
            format!("{:.0} MiB = {:.2}x", growth / MIB, growth / in_flight),
            "<= 2x",
            Some(growth <= 2.0 * in_flight),
        );
        ctx.figure(
            BENCH,
            format!("burst {round}: RSS above rest {} s later", settle.as_secs()),
            format!(
                "{:.1} MiB = {:.0} %",
                residual / MIB,
                residual / in_flight * 100.0
            ),
            "<= 10 % of in flight",
            Some(residual <= 0.1 * in_flight),
        );
    }
    stack.stop().await;
    Ok(())
}

/// Uploads `doc` for every agent at once, each with its own token; returns each upload's
/// duration in seconds.
async fn burst(base: &str, agents: &[(String, String)], doc: Bytes) -> Result<Vec<f64>> {
    // One client per upload: each its own connection, all bytes in flight together.
    let mut tasks = JoinSet::new();
    for (id, token) in agents {
        let url = format!("{base}/api/v1/agents/{id}/inventory");
        let (token, doc) = (token.clone(), doc.clone());
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(300))
            .build()?;
        tasks.spawn(async move {
            let start = Instant::now();
            let resp = http
                .post(url)
                .bearer_auth(token)
                .header("content-type", "application/json")
                .body(doc)
                .send()
                .await?;
            let status = resp.status();
            if !status.is_success() {
                bail!(
                    "upload answered {status}: {}",
                    resp.text().await.unwrap_or_default()
                );
            }
            Ok(start.elapsed().as_secs_f64())
        });
    }
    let mut took = Vec::new();
    while let Some(r) = tasks.join_next().await {
        took.push(r??);
    }
    took.sort_by(f64::total_cmp);
    Ok(took)
}

/// The lowest RSS seen over `span` (KiB): memory at rest, not a transient.
async fn min_rss(pid: u32, span: Duration) -> u64 {
    let end = Instant::now() + span;
    let mut min = u64::MAX;
    while Instant::now() < end {
        min = min.min(rss_kib(pid).unwrap_or(u64::MAX));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    min
}
