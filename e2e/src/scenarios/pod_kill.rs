//! pod-kill: the pod holding the most agents is killed without grace (SIGKILL: no drain,
//! no close frames). Its agents are back, on other pods or on the restarted one, and every
//! command pending for them is delivered, within stated bounds.
//!
//! Pending means both kinds: a command delivered just before the kill whose result never
//! came back (a 3 s `sleep`; the server must send it again and the agent must not run it
//! twice), and commands queued while the agents were away.

use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::json;
use tokio::time::Instant;

use super::traffic::{Expect, Ledger, submit, verify};
use super::*;
use crate::report::short;
use crate::target::Profile;

/// Stated bound: every command pending for the victims is acknowledged this soon after
/// the kill.
const DELIVERY_BOUND: Duration = Duration::from_secs(30);

pub async fn run<C: Target>(
    target: &mut C,
    opts: &Options,
    report: &mut ScenarioReport,
) -> Result<()> {
    target.apply(&Profile::standard(opts.replicas)).await?;
    let api = admin_api(target);
    let fleet = start_fleet(target, opts, Scenario::PodKill, "", opts.agents);
    report.agents = fleet.len();
    all_connected(&fleet, "every agent to connect", CONNECT_BOUND).await?;
    let by_pod = fleet.by_pod();
    println!("  agents per pod: {}", distribution(&by_pod));
    let (victim, held) = by_pod
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(p, n)| (p.clone(), *n))
        .context("no agent is connected to any pod")?;
    let victims: Vec<usize> = (0..fleet.len())
        .filter(|i| fleet.agents()[*i].status().pod.as_deref() == Some(victim.as_str()))
        .collect();

    section(&format!(
        "{victim} holds {held} agents; a 3s command in flight on each"
    ));
    let ledger = Ledger::default();
    for &i in &victims {
        let _ = submit(
            &api,
            &fleet,
            &ledger,
            i,
            "sleep",
            json!({"ms": 3000}),
            Expect::Slept(3000),
        )
        .await;
    }
    let in_flight = ledger.entries();
    wait::until(
        "the 3s commands to reach the victims",
        Duration::from_secs(30),
        Duration::from_millis(50),
        || async {
            let received = in_flight
                .iter()
                .filter(|e| fleet.agents()[e.agent].with_stats(|s| s.received.contains_key(&e.id)))
                .count();
            Ok(if received == in_flight.len() {
                Check::Ready(())
            } else {
                Check::Pending(format!("{received}/{}", in_flight.len()))
            })
        },
    )
    .await?;

    section(&format!("killing {victim} with SIGKILL"));
    let t0 = Instant::now();
    target.kill_pod(&victim).await?;
    println!("  {victim} dead after {}", short(t0.elapsed()));
    for &i in &victims {
        let args = json!({"queued_after_kill": i});
        let _ = submit(
            &api,
            &fleet,
            &ledger,
            i,
            "echo",
            args.clone(),
            Expect::Echo(args),
        )
        .await;
    }
    println!(
        "  {} commands queued for the victims while they are away",
        victims.len()
    );

    // Each victim's first welcome after the kill. (All agents connected at one instant
    // is not the measure: rebalancing may be moving others meanwhile.)
    let back = wait::until(
        "every victim to be welcomed again",
        RECONNECT_BOUND,
        Duration::from_millis(50),
        || async {
            let back: Vec<Instant> = victims
                .iter()
                .filter_map(|&i| {
                    fleet.agents()[i].with_stats(|s| {
                        s.reconnects
                            .iter()
                            .find(|r| r.lost_at >= t0)
                            .map(|r| r.back_at)
                    })
                })
                .collect();
            Ok(if back.len() == victims.len() {
                Check::Ready(back.into_iter().max())
            } else {
                Check::Pending(format!("{}/{} back", back.len(), victims.len()))
            })
        },
    )
    .await;
    match back {
        Ok(last) => report.figure(
            "victims back in",
            short(last.map_or(Duration::ZERO, |l| l.saturating_duration_since(t0))),
        ),
        Err(e) => report.failures.push(format!("{e:#}")),
    }
    let entries = ledger.entries();
    let verification = verify(&fleet, &api, &entries, DELIVERY_BOUND).await;
    if let Some(last) = verification.last_ack {
        let took = last.saturating_duration_since(t0);
        report.figure("pending delivered in", short(took));
        report.check(
            took <= DELIVERY_BOUND,
            format!(
                "pending commands took {} after the kill (bound {})",
                short(took),
                short(DELIVERY_BOUND)
            ),
        );
    }
    let reruns: u64 = victims
        .iter()
        .map(|&i| {
            fleet.agents()[i].with_stats(|s| s.deliveries.saturating_sub(s.received.len() as u64))
        })
        .sum();
    report.figure("redelivered", reruns.to_string());

    section(&format!("waiting for {victim} to be back"));
    wait::bounded(
        "the killed pod's restart",
        Duration::from_secs(300),
        target.settle(),
    )
    .await??;
    fleet_settles(report, &fleet, "the restart").await;
    let pods = target.pods().await?;
    report.check(
        pods.iter().all(|p| p.ready),
        format!(
            "pods not ready after the restart: {:?}",
            pods.iter()
                .filter(|p| !p.ready)
                .map(|p| &p.name)
                .collect::<Vec<_>>()
        ),
    );
    println!("  agents per pod: {}", distribution(&fleet.by_pod()));

    record_commands(report, &verification);
    record_reconnects(report, &fleet, t0);
    record_requests(report, &api);
    stop_fleet(fleet).await;
    Ok(())
}
