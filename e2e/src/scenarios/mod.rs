//! The scenarios, written once against [`Target`] and run on both targets.
//!
//! Each one applies the deployment profile it needs, starts its own agents (ids carry the
//! run id and the scenario, so scenarios never see each other's agents), disturbs the
//! deployment, and fills a [`ScenarioReport`]: every check that fails becomes a line in
//! the report, and an error (a bound passed, a step failed) ends the scenario with one.

mod agent_update;
mod hpa;
mod ingress_timeouts;
mod pod_kill;
mod real_agent;
mod rolling_update;
mod shared_binaries;
pub mod traffic;
mod websocket;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use tokio::time::Instant;

use crate::agent::{AgentConfig, Fleet};
use crate::api::Api;
use crate::report::{Latencies, ScenarioReport};
use crate::target::Target;
use crate::tokens::Role;
use crate::wait::{self, Check};

/// The scenarios, in the order a full run takes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    Websocket,
    IngressTimeouts,
    RollingUpdate,
    Hpa,
    PodKill,
    SharedBinaries,
    RealAgent,
    AgentUpdate,
}

impl Scenario {
    pub const ALL: [Scenario; 8] = [
        Scenario::Websocket,
        Scenario::IngressTimeouts,
        Scenario::RollingUpdate,
        Scenario::Hpa,
        Scenario::PodKill,
        Scenario::SharedBinaries,
        Scenario::RealAgent,
        Scenario::AgentUpdate,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Websocket => "websocket",
            Scenario::IngressTimeouts => "ingress-timeouts",
            Scenario::RollingUpdate => "rolling-update",
            Scenario::Hpa => "hpa",
            Scenario::PodKill => "pod-kill",
            Scenario::SharedBinaries => "shared-binaries",
            Scenario::RealAgent => "real-agent",
            Scenario::AgentUpdate => "agent-update",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Scenario::Websocket => "ws",
            Scenario::IngressTimeouts => "to",
            Scenario::RollingUpdate => "ru",
            Scenario::Hpa => "hpa",
            Scenario::PodKill => "pk",
            Scenario::SharedBinaries => "sb",
            Scenario::RealAgent => "ra",
            Scenario::AgentUpdate => "au",
        }
    }
}

/// Sizes and bounds shared by every scenario.
#[derive(Clone, Debug)]
pub struct Options {
    /// Agents per scenario.
    pub agents: usize,
    /// Server pods (the HPA's minimum on kind).
    pub replicas: usize,
    /// The low ingress timeout of the ingress-timeouts scenario.
    pub ingress_timeout: Duration,
    /// Bound on connections spreading onto pods added by a scale-out.
    pub spread_timeout: Duration,
    /// Prefix of every agent id of this run.
    pub run_id: String,
}

/// Bound on a whole fleet connecting through the ingress.
pub const CONNECT_BOUND: Duration = Duration::from_secs(60);
/// Stated bound on one agent's reconnect (loss to the next welcome). Agents wait up to
/// five seconds after 1012 by protocol; the rest is backoff after connections refused
/// while a pod dies.
pub const RECONNECT_BOUND: Duration = Duration::from_secs(20);
/// Bound on the whole fleet being connected at one instant once a disturbance is over.
/// Longer than the reconnect bound: rebalancing keeps moving a few agents (each within
/// the reconnect bound) until the pods hold about the same number.
pub const SETTLE_BOUND: Duration = Duration::from_secs(60);
/// Bound on every command of a ledger being acknowledged once the disturbance is over.
pub const RESULTS_BOUND: Duration = Duration::from_secs(30);

/// Runs one scenario and prints its summary line.
pub async fn run<C: Target>(scenario: Scenario, target: &mut C, opts: &Options) -> ScenarioReport {
    println!("\n=== {} ({} target)", scenario.name(), target.name());
    let mut report = ScenarioReport::new(scenario.name());
    let start = Instant::now();
    let outcome = match scenario {
        Scenario::Websocket => websocket::run(target, opts, &mut report).await,
        Scenario::IngressTimeouts => ingress_timeouts::run(target, opts, &mut report).await,
        Scenario::RollingUpdate => rolling_update::run(target, opts, &mut report).await,
        Scenario::Hpa => hpa::run(target, opts, &mut report).await,
        Scenario::PodKill => pod_kill::run(target, opts, &mut report).await,
        Scenario::SharedBinaries => shared_binaries::run(target, opts, &mut report).await,
        Scenario::RealAgent => real_agent::run(target, opts, &mut report).await,
        Scenario::AgentUpdate => agent_update::run(target, opts, &mut report).await,
    };
    if let Err(e) = outcome {
        report.failures.push(format!("{e:#}"));
    }
    report.duration = start.elapsed();
    if !report.passed() {
        match target.collect_artifacts(scenario.name()).await {
            Ok(dir) => println!("  logs and state for this failure: {}", dir.display()),
            Err(e) => println!("  could not collect artifacts: {e:#}"),
        }
    }
    println!("{}", report.summary_line());
    report
}

/// Starts `n` agents named `<run>-<scenario>-NNN` against the target's ingress.
fn start_fleet(
    target: &impl Target,
    opts: &Options,
    scenario: Scenario,
    prefix: &str,
    n: usize,
) -> Arc<Fleet> {
    let endpoint = target.endpoint();
    let minter = target.minter();
    let configs = (0..n).map(|i| {
        let minter = minter.clone();
        let id = format!("{}-{}{prefix}-{i:03}", opts.run_id, scenario.short());
        AgentConfig::new(
            id,
            endpoint.clone(),
            Arc::new(move |id: &str| minter.mint(id, Role::Agent, Duration::from_secs(3600))),
        )
    });
    Arc::new(Fleet::spawn(configs))
}

/// Waits until every agent of the fleet is connected; returns how long it took.
async fn all_connected(fleet: &Fleet, what: &str, bound: Duration) -> Result<Duration> {
    let start = Instant::now();
    let n = fleet.len();
    wait::until(what, bound, Duration::from_millis(50), || async {
        let connected = fleet.connected();
        let given_up = fleet.given_up();
        if let Some((id, why)) = given_up.first() {
            anyhow::bail!("{} agents gave up, e.g. {id}: {why}", given_up.len());
        }
        Ok(if connected == n {
            Check::Ready(())
        } else {
            Check::Pending(format!("{connected}/{n} connected"))
        })
    })
    .await?;
    Ok(start.elapsed())
}

/// Waits (within [`SETTLE_BOUND`]) until every agent is connected again; a failure to do
/// so fails the scenario.
async fn fleet_settles(report: &mut ScenarioReport, fleet: &Fleet, after: &str) {
    let what = format!("every agent to be connected after {after}");
    match all_connected(fleet, &what, SETTLE_BOUND).await {
        Ok(took) => report.figure(
            format!("all connected after {after} in"),
            crate::report::short(took),
        ),
        Err(e) => report.failures.push(format!("{e:#}")),
    }
}

/// Stops the fleet once every other holder of it (traffic tasks) has let go.
async fn stop_fleet(fleet: Arc<Fleet>) {
    match Arc::try_unwrap(fleet) {
        Ok(fleet) => fleet.stop().await,
        Err(_) => eprintln!("  fleet still shared; its agents are aborted instead of closed"),
    }
}

/// An admin API client through the ingress.
fn admin_api(target: &impl Target) -> Api {
    let token = target
        .minter()
        .mint("e2e-admin", Role::Admin, Duration::from_secs(6 * 3600));
    Api::new(&target.endpoint(), token)
}

/// Copies the API client's counters into the report and fails it on any failed request.
fn record_requests(report: &mut ScenarioReport, api: &Api) {
    report.requests = api.requests();
    report.failed_requests = api.failed();
    for failure in api.failures(5) {
        report.failures.push(format!("failed request: {failure}"));
    }
}

/// Copies a verification into the report and fails it on any lost command.
fn record_commands(report: &mut ScenarioReport, v: &traffic::Verification) {
    report.commands = v.total as u64;
    report.lost_commands = v.lost.len() as u64;
    for lost in v.lost.iter().take(5) {
        report.failures.push(format!("lost command: {lost}"));
    }
    if v.lost.len() > 5 {
        report
            .failures
            .push(format!("… and {} more lost commands", v.lost.len() - 5));
    }
    report.figure("command delivery", v.delivery.summary());
}

/// Reconnect downtimes since `since`, checked against [`RECONNECT_BOUND`].
fn record_reconnects(report: &mut ScenarioReport, fleet: &Fleet, since: Instant) {
    let reconnects = fleet.reconnects_since(since);
    let latencies = Latencies::new(reconnects.iter().map(|r| r.downtime()).collect());
    if let Some(max) = latencies.max() {
        report.check(
            max <= RECONNECT_BOUND,
            format!(
                "an agent took {} to reconnect (bound {})",
                crate::report::short(max),
                crate::report::short(RECONNECT_BOUND)
            ),
        );
    }
    report.reconnects = latencies;
}

fn section(what: &str) {
    println!("--- {what}");
}

fn distribution(by_pod: &std::collections::BTreeMap<String, usize>) -> String {
    by_pod
        .iter()
        .map(|(pod, n)| format!("{pod}: {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}
