//! rolling-update: with agents connected, API traffic and commands flowing, roll every pod
//! to a new revision. Zero failed API requests, zero lost commands, every agent back
//! within the reconnect bound, every pod on the new revision at the end.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::Result;
use tokio::time::Instant;

use super::traffic::{ApiLoad, CommandFlow, verify};
use super::*;
use crate::report::short;
use crate::target::Profile;

/// Bound on the whole rollout (kind builds nothing here; pods start in seconds).
const ROLLOUT_BOUND: Duration = Duration::from_secs(600);

pub async fn run<C: Target>(
    target: &mut C,
    opts: &Options,
    report: &mut ScenarioReport,
) -> Result<()> {
    target.apply(&Profile::standard(opts.replicas)).await?;
    let api = admin_api(target);
    let fleet = start_fleet(target, opts, Scenario::RollingUpdate, "", opts.agents);
    report.agents = fleet.len();
    all_connected(&fleet, "every agent to connect", CONNECT_BOUND).await?;
    let before: BTreeSet<String> = target.pods().await?.into_iter().map(|p| p.name).collect();
    println!("  agents per pod: {}", distribution(&fleet.by_pod()));

    section("traffic: a command every 100ms, API reads from 2 clients");
    let ids: Vec<String> = fleet
        .agents()
        .iter()
        .map(|a| a.client_id().to_string())
        .collect();
    let flow = CommandFlow::start(api.clone(), fleet.clone(), Duration::from_millis(100));
    let load = ApiLoad::start(api.clone(), ids.into(), 2, Duration::from_millis(50), false);
    flow.wait_flowing(&fleet, 10, Duration::from_secs(30))
        .await?;

    section(&format!("rolling {} pods to a new revision", before.len()));
    let t0 = Instant::now();
    wait::bounded("the rollout", ROLLOUT_BOUND, target.rollout()).await??;
    let rolled = t0.elapsed();
    println!("  rollout complete in {}", short(rolled));
    report.figure("rollout", short(rolled));

    fleet_settles(report, &fleet, "the rollout").await;
    flow.wait_flowing(&fleet, 10, Duration::from_secs(30))
        .await?;
    load.stop().await;
    let ledger = flow.stop().await;

    section("verifying every command and every pod");
    let verification = verify(&fleet, &api, &ledger.entries(), RESULTS_BOUND).await;
    record_commands(report, &verification);
    record_reconnects(report, &fleet, t0);

    let pods = target.pods().await?;
    let stale: Vec<&str> = pods
        .iter()
        .filter(|p| !p.current || !p.ready || before.contains(&p.name))
        .map(|p| p.name.as_str())
        .collect();
    println!(
        "  pods now: {}",
        pods.iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    report.check(
        stale.is_empty(),
        format!("pods not on the new revision (or not ready) after the rollout: {stale:?}"),
    );
    let on_old: usize = fleet
        .by_pod()
        .iter()
        .filter(|(pod, _)| before.contains(*pod))
        .map(|(_, n)| n)
        .sum();
    report.check(
        on_old == 0,
        format!("{on_old} agents still on pods of the old revision"),
    );
    let moved = fleet.reconnects_since(t0).len();
    println!(
        "  {moved} reconnects; agents per pod: {}",
        distribution(&fleet.by_pod())
    );

    record_requests(report, &api);
    stop_fleet(fleet).await;
    Ok(())
}
