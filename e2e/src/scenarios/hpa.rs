//! hpa: load raises the replica count above the minimum; connections spread onto the new
//! pods; when the load stops the count comes back down, and the agents of the removed pods
//! reconnect elsewhere with no lost command.
//!
//! On kind the HorizontalPodAutoscaler decides, from the CPU the load causes; on the local
//! target the harness scales in explicit steps and the load is only there to keep the
//! scenario identical. Connections move onto new pods only if the server rebalances
//! (target mode): long-lived WebSockets never move by themselves.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::Result;
use tokio::time::Instant;

use super::traffic::{ApiLoad, CommandFlow, verify};
use super::*;
use crate::report::short;
use crate::target::{Profile, Scaling};

/// Bound on the HPA reacting (kind): metrics-server scrapes every 15 s, the HPA syncs every
/// 15 s, and pods need their readiness probe.
const SCALE_BOUND: Duration = Duration::from_secs(600);

pub async fn run<C: Target>(
    target: &mut C,
    opts: &Options,
    report: &mut ScenarioReport,
) -> Result<()> {
    target.apply(&Profile::standard(opts.replicas)).await?;
    let api = admin_api(target);
    let fleet = start_fleet(target, opts, Scenario::Hpa, "", opts.agents);
    report.agents = fleet.len();
    all_connected(&fleet, "every agent to connect", CONNECT_BOUND).await?;
    let before: BTreeSet<String> = target.pods().await?.into_iter().map(|p| p.name).collect();

    let scaling = target.scaling();
    let workers = target.load_workers();
    section(&format!(
        "load: {workers} API clients{}, a command every 200ms",
        if scaling == Scaling::Autoscaler {
            " listing 1000 agents each, back to back"
        } else {
            ""
        }
    ));
    let ids: Vec<String> = fleet
        .agents()
        .iter()
        .map(|a| a.client_id().to_string())
        .collect();
    let flow = CommandFlow::start(api.clone(), fleet.clone(), Duration::from_millis(200));
    let load = match scaling {
        Scaling::Autoscaler => {
            ApiLoad::start(api.clone(), ids.into(), workers, Duration::ZERO, true)
        }
        Scaling::Explicit => ApiLoad::start(
            api.clone(),
            ids.into(),
            workers,
            Duration::from_millis(50),
            false,
        ),
    };
    flow.wait_flowing(&fleet, 5, Duration::from_secs(30))
        .await?;

    section(match scaling {
        Scaling::Autoscaler => "waiting for the HPA to add pods",
        Scaling::Explicit => "scaling out (explicit step: the local target has no HPA)",
    });
    let t_out = Instant::now();
    let added = wait::bounded("the scale-out", SCALE_BOUND, target.scale_out()).await??;
    let pods_now = before.len() + added.len();
    report.figure(
        "scaled",
        format!(
            "{} → {pods_now} pods in {}",
            before.len(),
            short(t_out.elapsed())
        ),
    );
    report.check(!added.is_empty(), "no pod was added");

    section("connections spreading onto the new pods");
    let t_spread = Instant::now();
    let spread = wait::until(
        "agents on every new pod (at least half the average each)",
        opts.spread_timeout,
        Duration::from_millis(250),
        || async {
            let by_pod = fleet.by_pod();
            let floor = (fleet.len() / pods_now / 2).max(1);
            let short_of: Vec<&String> = added
                .iter()
                .filter(|p| by_pod.get(*p).copied().unwrap_or(0) < floor)
                .collect();
            Ok(if short_of.is_empty() {
                Check::Ready(())
            } else {
                Check::Pending(distribution(&by_pod))
            })
        },
    )
    .await;
    println!("  agents per pod: {}", distribution(&fleet.by_pod()));
    match spread {
        Ok(()) => report.figure("spread in", short(t_spread.elapsed())),
        Err(e) => report.failures.push(format!(
            "connections did not spread onto the new pods ({e}); moving agents to new pods needs the server's rebalancing (target mode)"
        )),
    }

    load.stop().await;
    section(match scaling {
        Scaling::Autoscaler => "load stopped; waiting for the HPA to remove pods",
        Scaling::Explicit => "scaling in (explicit step)",
    });
    let t_in = Instant::now();
    let removed = wait::bounded("the scale-in", SCALE_BOUND, target.scale_in()).await??;
    report.figure(
        "scaled in",
        format!(
            "{} pods removed in {}",
            removed.len(),
            short(t_in.elapsed())
        ),
    );
    fleet_settles(report, &fleet, "the scale-in").await;
    let stranded: usize = fleet
        .by_pod()
        .iter()
        .filter(|(pod, _)| removed.contains(pod))
        .map(|(_, n)| n)
        .sum();
    report.check(
        stranded == 0,
        format!("{stranded} agents still on removed pods"),
    );
    flow.wait_flowing(&fleet, 5, Duration::from_secs(30))
        .await?;
    let ledger = flow.stop().await;

    section("verifying every command");
    let verification = verify(&fleet, &api, &ledger.entries(), RESULTS_BOUND).await;
    record_commands(report, &verification);
    record_reconnects(report, &fleet, t_out);
    println!("  agents per pod: {}", distribution(&fleet.by_pod()));
    record_requests(report, &api);
    stop_fleet(fleet).await;
    Ok(())
}
