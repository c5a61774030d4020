//! ingress-timeouts: the ingress's proxy timeouts and body size are applied, and the
//! server's heartbeat is what keeps idle agents connected through them.
//!
//! 1. Ingress read/send timeout set low (3 s by default), server heartbeat below it (1 s):
//!    idle agents stay connected for four times the timeout.
//! 2. Body sizes per route (`routes` in the chart's values): a 10 MiB inventory (the
//!    inventory route's limit, exactly) passes the ingress and is stored; an 11 MiB one,
//!    and a 2 MiB body on another route (`POST /api/v1/jobs`, 1 MiB there), get 413 from
//!    the ingress itself (its page, not the server's JSON error), so the per-route
//!    `client_max_body_size` is what applies.
//! 3. Same ingress timeout, heartbeat above it (30 s; the server's pings effectively off):
//!    the ingress cuts the silent connections at about the timeout. This is the proof that
//!    the timeout value reaches the ingress; without it, part 1 would prove nothing.

use std::time::Duration;

use anyhow::Result;
use reqwest::Method;
use tokio::time::Instant;

use super::*;
use crate::api::Body;
use crate::report::short;
use crate::target::Profile;

/// Idle agents per part.
const IDLE_AGENTS: usize = 3;
/// Close code of a server restarting or rebalancing.
const REBALANCED: u16 = 1012;

pub async fn run<C: Target>(
    target: &mut C,
    opts: &Options,
    report: &mut ScenarioReport,
) -> Result<()> {
    let timeout = opts.ingress_timeout;
    let api = admin_api(target);

    section(&format!(
        "ingress timeout {}, server heartbeat 1s: idle agents stay",
        short(timeout)
    ));
    target
        .apply(&Profile {
            replicas: opts.replicas,
            heartbeat: Some(Duration::from_secs(1)),
            offline_timeout: Some(Duration::from_secs(10)),
            ingress_timeout: Some(timeout),
        })
        .await?;
    let fleet = start_fleet(target, opts, Scenario::IngressTimeouts, "hb", IDLE_AGENTS);
    report.agents = fleet.len();
    all_connected(&fleet, "the idle agents to connect", CONNECT_BOUND).await?;
    let hold = timeout * 4;
    let since = Instant::now();
    let drops = wait::until(
        &format!("idle agents to stay connected for {}", short(hold)),
        hold + Duration::from_secs(5),
        Duration::from_millis(100),
        || async {
            // A 1012 is the server rebalancing a few idle agents between pods, not the
            // ingress; the ingress cuts without a close frame.
            let drops: Vec<_> = fleet
                .disconnects_since(since)
                .into_iter()
                .filter(|d| d.code != Some(REBALANCED))
                .collect();
            Ok(if !drops.is_empty() || since.elapsed() >= hold {
                Check::Ready(drops)
            } else {
                Check::Pending(format!("connected for {}", short(since.elapsed())))
            })
        },
    )
    .await?;
    println!(
        "  {} of {IDLE_AGENTS} idle agents dropped within {}",
        drops.len(),
        short(since.elapsed())
    );
    report.check(
        drops.is_empty(),
        format!(
            "with a 1s heartbeat, idle agents were cut by the {} ingress timeout: {:?}",
            short(timeout),
            drops.first().map(|d| (&d.detail, d.connected_for))
        ),
    );
    report.figure(
        "idle with heartbeat",
        format!("{} without a drop", short(hold)),
    );

    section("body size limits per route at the ingress");
    let agent = fleet.agents()[0].client_id().to_string();
    let agent_token = target
        .minter()
        .mint(&agent, Role::Agent, Duration::from_secs(3600));
    let path = format!("/api/v1/agents/{agent}/inventory");
    let ten = 10 * 1024 * 1024;
    match api
        .call(
            Method::POST,
            &path,
            Some(&agent_token),
            Body::Raw(document(ten)),
            &[200],
        )
        .await
    {
        Ok(reply) => {
            let stored = reply.json()["size_bytes"].as_u64();
            println!(
                "  10 MiB inventory: {} (stored {stored:?} bytes)",
                reply.status
            );
            report.check(
                stored == Some(ten as u64),
                format!("the 10 MiB inventory was stored as {stored:?} bytes"),
            );
        }
        Err(e) => report.check(false, format!("the 10 MiB inventory was refused: {e}")),
    }
    refused_by_ingress(
        &api,
        report,
        &path,
        Some(&agent_token),
        11 * 1024 * 1024,
        "11 MiB inventory",
        "routes.inventory.bodySize",
    )
    .await;
    // Elsewhere the limit is small: a 2 MiB job never reaches the server.
    refused_by_ingress(
        &api,
        report,
        "/api/v1/jobs",
        None,
        2 * 1024 * 1024,
        "2 MiB job",
        "routes.default.bodySize",
    )
    .await;
    stop_fleet(fleet).await;

    section(&format!(
        "ingress timeout {}, server heartbeat 30s: the ingress cuts silent connections",
        short(timeout)
    ));
    target
        .apply(&Profile {
            replicas: opts.replicas,
            heartbeat: Some(Duration::from_secs(30)),
            offline_timeout: Some(Duration::from_secs(90)),
            ingress_timeout: Some(timeout),
        })
        .await?;
    let fleet = start_fleet(
        target,
        opts,
        Scenario::IngressTimeouts,
        "silent",
        IDLE_AGENTS,
    );
    all_connected(&fleet, "the silent agents to connect", CONNECT_BOUND).await?;
    let since = Instant::now();
    let cuts = wait::until(
        "the ingress to cut every silent connection",
        timeout * 4 + Duration::from_secs(10),
        Duration::from_millis(50),
        || async {
            let cuts: Vec<Duration> = fleet
                .agents()
                .iter()
                .filter_map(|a| {
                    a.with_stats(|s| {
                        s.disconnects
                            .iter()
                            .find(|d| d.at >= since && d.code.is_none())
                            .map(|d| d.connected_for)
                    })
                })
                .collect();
            Ok(if cuts.len() == fleet.len() {
                Check::Ready(cuts)
            } else {
                Check::Pending(format!("{}/{} cut", cuts.len(), fleet.len()))
            })
        },
    )
    .await?;
    let cuts = Latencies::new(cuts);
    println!("  connections lasted {}", cuts.summary());
    let (low, high) = (
        timeout.saturating_sub(Duration::from_millis(500)),
        timeout + Duration::from_millis(2500),
    );
    for cut in [cuts.percentile(1.0), cuts.max()].into_iter().flatten() {
        report.check(
            cut >= low && cut <= high,
            format!(
                "a silent connection lasted {} (expected the {} ingress timeout, within {}..{})",
                short(cut),
                short(timeout),
                short(low),
                short(high)
            ),
        );
    }
    report.figure("cut after", cuts.summary());
    stop_fleet(fleet).await;

    record_requests(report, &api);
    Ok(())
}

/// POSTs a JSON document of `size` bytes to `path` and checks that the ingress itself
/// refused it with 413: the server's own 413 is JSON, the ingress answers with its HTML
/// page, so a JSON 413 means the route's limit (`setting` in the chart's values) was not
/// applied. `what` names the body in the output and the failures.
async fn refused_by_ingress(
    api: &Api,
    report: &mut ScenarioReport,
    path: &str,
    token: Option<&str>,
    size: usize,
    what: &str,
    setting: &str,
) {
    match api
        .call(Method::POST, path, token, Body::Raw(document(size)), &[413])
        .await
    {
        Ok(reply) => {
            let from_ingress = !reply.content_type.contains("application/json");
            println!(
                "  {what} on {path}: 413 from {} ({})",
                if from_ingress {
                    "the ingress"
                } else {
                    "the server"
                },
                reply.content_type
            );
            report.check(
                from_ingress,
                format!(
                    "the {what} got the server's 413, not the ingress's: {setting} is not applied"
                ),
            );
        }
        Err(e) => report.check(false, format!("the {what}: {e}")),
    }
}

/// A JSON document of exactly `size` bytes.
fn document(size: usize) -> Vec<u8> {
    const OPEN: &[u8] = br#"{"padding":""#;
    const CLOSE: &[u8] = br#""}"#;
    let mut doc = Vec::with_capacity(size);
    doc.extend_from_slice(OPEN);
    doc.resize(size - CLOSE.len(), b'x');
    doc.extend_from_slice(CLOSE);
    doc
}

#[cfg(test)]
mod tests {
    #[test]
    fn documents_have_the_exact_size_and_parse() {
        let doc = super::document(1000);
        assert_eq!(doc.len(), 1000);
        let v: serde_json::Value = serde_json::from_slice(&doc).unwrap();
        assert!(v["padding"].is_string());
    }
}
