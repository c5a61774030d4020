//! websocket: agents connect through the ingress; bad tokens are refused; a command
//! submitted through the ingress (to whichever pod the ingress picks) reaches agents on
//! every pod, and its result comes back.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Result;
use serde_json::json;

use super::traffic::{Expect, Ledger, acked, submit, verify};
use super::*;
use crate::agent::{AuthMode, Handshake, handshake};
use crate::target::Profile;
use crate::tokens::Minter;

pub async fn run<C: Target>(
    target: &mut C,
    opts: &Options,
    report: &mut ScenarioReport,
) -> Result<()> {
    target.apply(&Profile::standard(opts.replicas)).await?;
    let endpoint = target.endpoint();
    let minter = target.minter();
    let api = admin_api(target);

    section("handshakes through the ingress");
    let id = format!("{}-ws-probe", opts.run_id);
    let hour = Duration::from_secs(3600);
    let other_key = Minter::new("a-key-this-deployment-has-never-seen-0123456789");
    // (what is sent, the credentials, the expected refusal; None: a welcome)
    type Case<'a> = (&'a str, Option<(AuthMode, String)>, Option<u16>);
    let cases: Vec<Case> = vec![
        ("no token", None, Some(401)),
        (
            "token signed with another key",
            Some((AuthMode::Header, other_key.mint(&id, Role::Agent, hour))),
            Some(401),
        ),
        (
            "expired token",
            Some((AuthMode::Header, minter.expired(&id, Role::Agent))),
            Some(401),
        ),
        (
            "token for another client_id",
            Some((
                AuthMode::Header,
                minter.mint("someone-else", Role::Agent, hour),
            )),
            Some(403),
        ),
        (
            "admin token",
            Some((AuthMode::Header, minter.mint(&id, Role::Admin, hour))),
            Some(403),
        ),
        (
            "valid token in ?token=",
            Some((AuthMode::Query, minter.mint(&id, Role::Agent, hour))),
            None,
        ),
        (
            "valid token in the Authorization header",
            Some((AuthMode::Header, minter.mint(&id, Role::Agent, hour))),
            None,
        ),
    ];
    let mut passed = 0;
    for (name, auth, expected) in &cases {
        let auth = auth.as_ref().map(|(mode, token)| (*mode, token.as_str()));
        let outcome = handshake(&endpoint, &id, auth, Duration::from_secs(10)).await;
        let (ok, got) = match (&outcome, expected) {
            (Ok(Handshake::Refused { status }), Some(want)) => {
                (status == want, format!("{status}"))
            }
            (Ok(Handshake::Accepted { welcome }), None) => (
                welcome["type"] == "welcome",
                format!("welcome from {}", welcome["pod"]),
            ),
            (Ok(Handshake::Accepted { .. }), Some(_)) => (false, "accepted".into()),
            (Ok(Handshake::Refused { status }), None) => (false, format!("{status}")),
            (Err(e), _) => (false, format!("error: {e}")),
        };
        let want = expected.map_or("welcome".to_string(), |s| s.to_string());
        println!("  {} {name}: {got}", if ok { "ok  " } else { "FAIL" });
        report.check(
            ok,
            format!("handshake with {name}: expected {want}, got {got}"),
        );
        passed += usize::from(ok);
    }
    report.figure("handshake checks", format!("{passed}/{}", cases.len()));

    section(&format!(
        "{} agents connect through the ingress",
        opts.agents
    ));
    let started = tokio::time::Instant::now();
    let fleet = start_fleet(target, opts, Scenario::Websocket, "", opts.agents);
    report.agents = fleet.len();
    let took = all_connected(&fleet, "every agent to connect", CONNECT_BOUND).await?;
    report.figure("all connected in", crate::report::short(took));
    let by_pod = fleet.by_pod();
    println!("  agents per pod: {}", distribution(&by_pod));
    for pod in target.pods().await? {
        report.check(
            by_pod.get(&pod.name).copied().unwrap_or(0) > 0,
            format!("no agent reached pod {} through the ingress", pod.name),
        );
    }

    section("one command per agent, submitted through the ingress");
    let ledger = Ledger::default();
    for i in 0..fleet.len() {
        let args = json!({"n": i});
        // A failure is counted by the API client and reported below.
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
    let entries = ledger.entries();
    let verification = verify(&fleet, &api, &entries, RESULTS_BOUND).await;
    // Results per pod: each pod's agents must have answered.
    let mut per_pod: BTreeMap<String, usize> = BTreeMap::new();
    for entry in &entries {
        let agent = &fleet.agents()[entry.agent];
        if agent.with_stats(|s| s.acked.contains_key(&entry.id)) {
            let pod = agent.status().pod.unwrap_or_default();
            *per_pod.entry(pod).or_insert(0) += 1;
        }
    }
    println!("  results per pod: {}", distribution(&per_pod));
    for pod in by_pod.keys() {
        report.check(
            per_pod.contains_key(pod),
            format!("no result came back from the agents on {pod}"),
        );
    }
    println!(
        "  {} of {} commands answered",
        acked(&fleet, &entries),
        entries.len()
    );

    section("presence as the API reports it");
    fleet_settles(report, &fleet, "the commands").await;
    let mut compared = 0;
    for agent in fleet.agents().iter().take(10) {
        let path = format!("/api/v1/agents/{}", agent.client_id());
        let before = agent.status();
        let Ok(view) = api.get(&path).await else {
            continue;
        };
        // Compare only when the agent held one and the same connection throughout the
        // request: the server may have moved it meanwhile (rebalancing).
        let after = agent.status();
        if !(before.connected && after.connected && before.connections == after.connections) {
            continue;
        }
        compared += 1;
        let pod = after.pod.unwrap_or_default();
        report.check(
            view["online"] == true && view["pod"] == pod.as_str(),
            format!(
                "{} is connected to {pod} but the API says online={} pod={}",
                agent.client_id(),
                view["online"],
                view["pod"]
            ),
        );
    }
    println!("  {compared} agents' presence compared with what they are connected to");
    report.check(
        compared > 0,
        "no agent held still long enough to compare its presence with the API's",
    );

    record_commands(report, &verification);
    record_reconnects(report, &fleet, started);
    // Nothing disturbs the deployment here, so any loss other than the server's own
    // rebalancing (1012, counted and shown) is a failure.
    let losses = fleet.disconnects_since(started);
    let rebalanced = losses.iter().filter(|d| d.code == Some(1012)).count();
    let other: Vec<String> = losses
        .iter()
        .filter(|d| d.code != Some(1012) && d.code != Some(1000))
        .map(|d| format!("{:?} {}", d.code, d.detail))
        .collect();
    report.figure("rebalanced (1012)", rebalanced.to_string());
    report.check(
        other.is_empty(),
        format!(
            "{} connections lost although nothing disturbed the deployment: {:?}",
            other.len(),
            other.first()
        ),
    );
    record_requests(report, &api);
    stop_fleet(fleet).await;
    Ok(())
}
