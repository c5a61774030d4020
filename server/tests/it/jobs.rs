//! Fleet jobs below HTTP: targeting, pacing across replicas, canary, failure brake,
//! cancel, offline agents and TTL, against real sessions and a real database.
//!
//! These apps run without their own pacer (`JOB_PACER=false`): turns are taken
//! explicitly (`Pacer::turn`) where a scenario needs to know what one turn released; the
//! two-replica scenario runs the pacers as tasks, as a replica does. The HTTP scenarios
//! (`jobs_http.rs`) run with the replicas' own pacers.

use std::collections::BTreeSet;
use std::time::Duration;

use agent_server::jobs::pacer::Pacer;
use agent_server::jobs::{CreateJob, JobError, JobView, Jobs, ListJobs, ListResults};
use agent_server::store::{Change, Hello, JobStatus, Store, now_ms};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::helpers::{Agent, TestApp, WAIT, on_both_backends};

fn jobs(app: &TestApp) -> Jobs {
    Jobs::new(app.state.store.clone(), app.state.metrics.clone())
}

fn pacer(app: &TestApp) -> Pacer {
    Pacer::new(
        app.state.store.clone(),
        app.state.hub.clone(),
        app.state.metrics.clone(),
        app.state.config.pod_id.clone(),
    )
}

fn request(body: Value) -> CreateJob {
    serde_json::from_value(body).expect("a well-formed job request")
}

async fn create(app: &TestApp, body: Value) -> JobView {
    jobs(app).create(request(body)).await.expect("job created")
}

async fn job(app: &TestApp, id: &str) -> JobView {
    jobs(app).get(id).await.expect("job exists")
}

/// Polls the job until `check` holds, within [`WAIT`].
async fn job_until(app: &TestApp, id: &str, check: impl Fn(&JobView) -> bool) -> JobView {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let view = job(app, id).await;
        if check(&view) {
            return view;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "job condition not met within {WAIT:?}: {view:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An agent as the store knows it, without a session: enough for targeting.
async fn known_agent(
    store: &Store,
    id: &str,
    facts: (&str, &str, &str),
    labels: &[&str],
    online: bool,
) {
    let epoch = store
        .agent_connected(id.into(), "pod-elsewhere".into())
        .await
        .unwrap();
    let (os, arch, version) = facts;
    let hello = Hello {
        version: Some(version.into()),
        hostname: None,
        os: Some(os.into()),
        arch: Some(arch.into()),
    };
    store.agent_hello(id.into(), epoch, hello).await.unwrap();
    store
        .set_agent_labels(id.into(), labels.iter().map(|l| l.to_string()).collect())
        .await
        .unwrap();
    if !online {
        store
            .agent_disconnected(id.into(), epoch, now_ms())
            .await
            .unwrap();
    }
}

async fn agents_of(app: &TestApp, job_id: &str) -> BTreeSet<String> {
    let page = jobs(app)
        .results(
            job_id,
            ListResults {
                limit: Some(500),
                ..ListResults::default()
            },
        )
        .await
        .unwrap();
    page.results.into_iter().map(|r| r.agent_id).collect()
}

fn set(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|s| s.to_string()).collect()
}

/// Connects `n` agents named `<prefix>-<i>` (two digits, so ids sort as numbers).
async fn connect_many(app: &TestApp, prefix: &str, n: usize) -> Vec<Agent> {
    let mut agents = Vec::with_capacity(n);
    for i in 0..n {
        agents.push(app.connect(&format!("{prefix}-{i:02}")).await);
    }
    agents
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:02}")).collect()
}

/// Receives the job's command, answers with `status` and waits for the ack (the result
/// is stored by then).
async fn answer(agent: &mut Agent, status: &str) -> String {
    let cmd = agent.recv_type("command").await;
    let id = cmd["id"].as_str().unwrap().to_string();
    agent.result(&id, status, json!({"stdout": "done"})).await;
    let ack = agent.recv_type("ack").await;
    assert_eq!(ack["id"], id.as_str());
    id
}

async fn targeting_rules_combine_and_all_must_hold(app: TestApp) {
    let store = &app.state.store;
    known_agent(
        store,
        "t-1",
        ("linux", "x86_64", "2.4.0"),
        &["gpu", "rack-a3"],
        true,
    )
    .await;
    known_agent(store, "t-2", ("Linux", "aarch64", "2.5.0"), &["gpu"], true).await;
    known_agent(store, "t-3", ("windows", "x86_64", "2.6.0"), &[], false).await;
    known_agent(
        store,
        "t-4",
        ("linux", "AArch64", "2.10.0"),
        &["gpu", "rack-a3"],
        true,
    )
    .await;
    let mut changes = store.subscribe();

    let cases = [
        (json!({"labels": ["gpu", "rack-a3"]}), set(&["t-1", "t-4"])),
        (
            json!({"os": "LINUX", "arch": "aarch64"}),
            set(&["t-2", "t-4"]),
        ),
        (json!({"version": ">=2.5.0"}), set(&["t-2", "t-3", "t-4"])),
        (json!({"version": "<2.5"}), set(&["t-1"])),
        (json!({"version": "2.5"}), set(&["t-2"])),
        (
            json!({"online": true, "labels": ["gpu"]}),
            set(&["t-1", "t-2", "t-4"]),
        ),
        (json!({"online": false}), set(&["t-3"])),
        (
            json!({"ids": ["t-1", "t-3", "nobody"]}),
            set(&["t-1", "t-3"]),
        ),
        (
            json!({"os": "linux", "version": ">2.4.0", "labels": ["rack-a3"]}),
            set(&["t-4"]),
        ),
    ];
    for (i, (target, expected)) in cases.into_iter().enumerate() {
        let view = create(&app, json!({"name": format!("case-{i}"), "target": target})).await;
        assert_eq!(agents_of(&app, &view.id).await, expected, "target {target}");
        assert_eq!(view.targeted, expected.len() as i64);
        // An unpaced job is released at once to the agents online now (t-3 is not).
        let offline = i64::from(expected.contains("t-3"));
        assert_eq!(
            (view.counts.held, view.released),
            (offline, view.targeted - offline),
            "released when stored, to online agents only"
        );
        assert_eq!(view.status, JobStatus::Running);
    }

    // The percentage is the rollouts' stable hash of the job's name and the client_id.
    let all = ["t-1", "t-2", "t-3", "t-4"];
    for pct in [25, 50, 75] {
        let expected: BTreeSet<String> = all
            .iter()
            .filter(|a| agent_server::binaries::rollout::selected("disk-check", a, pct))
            .map(|a| a.to_string())
            .collect();
        let created = jobs(&app)
            .create(request(
                json!({"name": "disk-check", "target": {"percentage": pct}}),
            ))
            .await;
        match created {
            Ok(view) => assert_eq!(agents_of(&app, &view.id).await, expected, "{pct}%"),
            Err(JobError::NoAgentsMatch) => assert!(expected.is_empty(), "{pct}%"),
            Err(e) => panic!("{e:?}"),
        }
    }

    // A held command (of the offline t-3) is in the agent's history but not sendable;
    // released ones (of the online agents) are.
    let history = store.list_commands("t-3".into(), None, 100).await.unwrap();
    assert!(
        history
            .iter()
            .any(|c| c.job_id.is_some() && c.status == "pending")
    );
    let sendable = store
        .commands_to_send("t-3".into(), true, None, now_ms(), 100)
        .await
        .unwrap();
    assert!(
        sendable.is_empty(),
        "held commands are skipped: {sendable:?}"
    );
    let sendable = store
        .commands_to_send("t-1".into(), true, None, now_ms(), 100)
        .await
        .unwrap();
    assert!(!sendable.is_empty(), "released when the job was stored");
    let pending = store
        .agents_with_pending(all.iter().map(|a| a.to_string()).collect())
        .await
        .unwrap();
    assert_eq!(
        pending.into_iter().collect::<BTreeSet<_>>(),
        set(&["t-1", "t-2", "t-4"]),
        "the sweep wakes for released commands, never for held ones"
    );

    // Live views hear of every job.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let got = tokio::time::timeout_at(deadline, changes.recv())
            .await
            .expect("a job announcement")
            .unwrap();
        if matches!(got.change, Change::Job { .. }) {
            break;
        }
    }

    // Keyset pages of jobs, newest first.
    let first = jobs(&app)
        .list(ListJobs {
            limit: Some(5),
            ..ListJobs::default()
        })
        .await
        .unwrap();
    assert_eq!(first.jobs.len(), 5);
    let rest = jobs(&app)
        .list(ListJobs {
            limit: Some(500),
            before: first.next.clone(),
            ..ListJobs::default()
        })
        .await
        .unwrap();
    let seen: BTreeSet<String> = first
        .jobs
        .iter()
        .chain(&rest.jobs)
        .map(|j| j.id.clone())
        .collect();
    assert_eq!(
        seen.len(),
        first.jobs.len() + rest.jobs.len(),
        "pages do not overlap"
    );
    assert!(seen.len() >= 11);
}

async fn bad_targets_are_refused_with_a_message_and_no_match_is_distinct(app: TestApp) {
    known_agent(
        &app.state.store,
        "b-1",
        ("linux", "x86_64", "1.0.0"),
        &[],
        true,
    )
    .await;
    let refused = |body: Value| {
        let app = &app;
        async move { jobs(app).create(request(body)).await.expect_err("refused") }
    };
    match refused(json!({"name": "x", "target": {}})).await {
        JobError::InvalidTarget(m) => assert!(m.contains("at least one"), "{m}"),
        other => panic!("{other:?}"),
    }
    for target in [
        json!({"labels": []}),
        json!({"ids": []}),
        json!({"os": ""}),
        json!({"version": ">="}),
        json!({"percentage": 0}),
    ] {
        assert!(
            matches!(
                refused(json!({"name": "x", "target": target})).await,
                JobError::InvalidTarget(_)
            ),
            "{target}"
        );
    }
    let unknown =
        serde_json::from_value::<CreateJob>(json!({"name": "x", "target": {"label": ["a"]}}))
            .unwrap_err()
            .to_string();
    assert!(unknown.contains("unknown field `label`"), "{unknown}");
    for body in [
        json!({"name": "", "target": {"percentage": 100}}),
        json!({"name": "x", "target": {"percentage": 100}, "max_in_flight": 0}),
        json!({"name": "x", "target": {"percentage": 100}, "max_failure_ratio": 1.5}),
        json!({"name": "x", "target": {"percentage": 100}, "canary": {"count": 1, "percentage": 5}}),
        json!({"name": "x", "target": {"percentage": 100}, "args": [1]}),
    ] {
        assert!(
            matches!(refused(body.clone()).await, JobError::Invalid(_)),
            "{body}"
        );
    }
    assert!(matches!(
        refused(json!({"name": "x", "target": {"os": "plan9"}})).await,
        JobError::NoAgentsMatch
    ));
    let listed = jobs(&app).list(ListJobs::default()).await.unwrap();
    assert!(listed.jobs.is_empty(), "nothing stored for refused jobs");
    assert!(matches!(
        jobs(&app).get("nope").await,
        Err(JobError::NotFound(_))
    ));
}

async fn two_replicas_pacing_never_exceeds_max_in_flight(app: TestApp) {
    const AGENTS: usize = 40;
    const MAX_IN_FLIGHT: i64 = 5;
    let replica = app.spawn_replica("pod-b").await;
    let mut answering = tokio::task::JoinSet::new();
    for (i, id) in ids("p", AGENTS).into_iter().enumerate() {
        let host = if i % 2 == 0 { &app } else { &replica };
        let mut agent = host.connect(&id).await;
        answering.spawn(async move {
            let cmd = agent.recv_type("command").await;
            // Some work, so that commands overlap.
            tokio::time::sleep(Duration::from_millis(15)).await;
            let id = cmd["id"].as_str().unwrap().to_string();
            // As agents do: a result the server could not store is sent again.
            loop {
                agent.result(&id, "ok", json!(null)).await;
                let reply = agent.recv().await;
                match reply["type"].as_str() {
                    Some("ack") => return,
                    Some("error") if reply["code"] == "store_unavailable" => {
                        eprintln!("result of {id} sent again: {reply}");
                    }
                    _ => panic!("unexpected reply: {reply}"),
                }
            }
        });
    }
    let stop = CancellationToken::new();
    let _stop_on_exit = stop.clone().drop_guard();
    tokio::spawn(pacer(&app).run(stop.clone()));
    tokio::spawn(pacer(&replica).run(stop.clone()));

    let view = create(
        &app,
        json!({"name": "restart-collector", "target": {"ids": ids("p", AGENTS)}, "max_in_flight": MAX_IN_FLIGHT}),
    )
    .await;
    let (row, _) = app
        .state
        .store
        .get_job(view.id.clone())
        .await
        .unwrap()
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let (mut samples, mut busiest) = (0, 0);
    loop {
        let counts = app.state.store.job_counts(row.clone()).await.unwrap();
        samples += 1;
        busiest = busiest.max(counts.in_flight());
        assert!(
            counts.in_flight() <= MAX_IN_FLIGHT,
            "bound exceeded: {counts:?}"
        );
        if counts.succeeded == AGENTS as i64 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "job stalled: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    while let Some(done) = answering.join_next().await {
        done.expect("every agent answered");
    }
    assert!(
        busiest >= 2,
        "commands overlapped ({busiest} at most, {samples} samples)"
    );
    for host in [&app, &replica] {
        assert!(
            host.state.metrics.job_commands_released.get() > 0,
            "each replica released to its own agents"
        );
    }
    let done = job_until(&app, &view.id, |j| j.status == JobStatus::Completed).await;
    assert_eq!(done.released, AGENTS as i64);
    assert!(done.durations.p50_ms.is_some() && done.durations.p95_ms >= done.durations.p50_ms);
}

async fn canary_finishes_before_the_rest_start(app: TestApp) {
    let mut agents = connect_many(&app, "c", 8).await;
    let view = create(
        &app,
        json!({"name": "disk-check", "target": {"ids": ids("c", 8)}, "canary": {"count": 3}}),
    )
    .await;
    assert_eq!(view.canary, 3);
    assert_eq!(
        (view.released, view.counts.held),
        (3, 5),
        "the canary goes alone, released when the job is stored"
    );
    let pacer = pacer(&app);
    // The first turn wakes the canary's agents (the sweep may have been quicker).
    pacer.turn().await.unwrap();
    assert_eq!(
        pacer.turn().await.unwrap(),
        0,
        "the rest waits for the canary"
    );
    for agent in &mut agents[..2] {
        answer(agent, "ok").await;
    }
    assert_eq!(
        pacer.turn().await.unwrap(),
        0,
        "one canary command still open"
    );
    answer(&mut agents[2], "ok").await;
    assert_eq!(
        pacer.turn().await.unwrap(),
        5,
        "canary done: the rest starts"
    );
    for agent in &mut agents[3..] {
        answer(agent, "ok").await;
    }
    pacer.turn().await.unwrap();
    let done = job(&app, &view.id).await;
    assert_eq!(done.status, JobStatus::Completed);
    assert_eq!(done.counts.succeeded, 8);

    // Results: filtered by status, in keyset pages by client_id.
    let page = jobs(&app)
        .results(
            &view.id,
            ListResults {
                status: Some("succeeded".into()),
                limit: Some(5),
                after: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(page.results.len(), 5);
    assert_eq!(page.results[0].agent_id, "c-00");
    assert_eq!(
        page.results[0].output.as_ref().unwrap().get(),
        r#"{"stdout":"done"}"#
    );
    assert!(page.results[0].duration_ms.is_some());
    let next = jobs(&app)
        .results(
            &view.id,
            ListResults {
                status: Some("succeeded".into()),
                limit: Some(5),
                after: page.next,
            },
        )
        .await
        .unwrap();
    assert_eq!(next.results.len(), 3);
    assert_eq!(next.results[0].agent_id, "c-05");
    assert!(next.next.is_none());
}

async fn brake_pauses_the_job_and_resume_continues(app: TestApp) {
    let mut agents = connect_many(&app, "k", 10).await;
    let view = create(
        &app,
        json!({
            "name": "upgrade-driver", "target": {"ids": ids("k", 10)},
            "max_in_flight": 4, "max_failure_ratio": 0.5, "min_sample": 4
        }),
    )
    .await;
    assert_eq!(view.released, 4, "max_in_flight released when stored");
    let pacer = pacer(&app);
    pacer.turn().await.unwrap();
    for (i, agent) in agents[..4].iter_mut().enumerate() {
        answer(agent, if i < 3 { "error" } else { "ok" }).await;
    }
    assert_eq!(pacer.turn().await.unwrap(), 0);
    let paused = job(&app, &view.id).await;
    assert_eq!(paused.status, JobStatus::Paused);
    let reason = paused.reason.clone().unwrap();
    assert!(reason.contains("3 of 4 results failed"), "{reason}");
    assert_eq!(
        pacer.turn().await.unwrap(),
        0,
        "nothing released while paused"
    );
    assert_eq!(job(&app, &view.id).await.released, 4);

    let resumed = jobs(&app).resume(&view.id).await.unwrap();
    assert_eq!(resumed.status, JobStatus::Running);
    assert!(resumed.reason.is_none());
    assert!(matches!(
        jobs(&app).resume(&view.id).await,
        Err(JobError::WrongState {
            status: "running",
            ..
        })
    ));
    assert_eq!(
        pacer.turn().await.unwrap(),
        4,
        "the earlier failures are not judged again"
    );
    for agent in &mut agents[4..8] {
        answer(agent, "ok").await;
    }
    assert_eq!(pacer.turn().await.unwrap(), 2);
    for agent in &mut agents[8..] {
        answer(agent, "ok").await;
    }
    pacer.turn().await.unwrap();
    let done = job(&app, &view.id).await;
    assert_eq!(done.status, JobStatus::Completed);
    assert_eq!((done.counts.succeeded, done.counts.failed), (7, 3));
}

async fn cancel_mid_flight_expires_what_was_not_delivered(app: TestApp) {
    let mut agents = connect_many(&app, "x", 10).await;
    let view = create(
        &app,
        json!({"name": "rotate-logs", "target": {"ids": ids("x", 10)}, "max_in_flight": 3}),
    )
    .await;
    assert_eq!(view.released, 3, "max_in_flight released when stored");
    let pacer = pacer(&app);
    pacer.turn().await.unwrap();
    job_until(&app, &view.id, |j| j.counts.delivered == 3).await;

    let cancelled = jobs(&app).cancel(&view.id).await.unwrap();
    assert_eq!(cancelled.status, JobStatus::Cancelled);
    assert_eq!(cancelled.counts.cancelled, 7);
    assert_eq!((cancelled.counts.pending, cancelled.counts.expired), (0, 0));
    assert_eq!(
        cancelled.counts.delivered, 3,
        "delivered commands may still report"
    );
    for agent in &mut agents[..3] {
        answer(agent, "ok").await;
    }
    assert_eq!(pacer.turn().await.unwrap(), 0);
    let after = job(&app, &view.id).await;
    assert_eq!((after.counts.succeeded, after.counts.cancelled), (3, 7));
    for action in ["cancel", "resume"] {
        let outcome = match action {
            "cancel" => jobs(&app).cancel(&view.id).await,
            _ => jobs(&app).resume(&view.id).await,
        };
        assert!(
            matches!(
                outcome,
                Err(JobError::WrongState {
                    status: "cancelled",
                    ..
                })
            ),
            "{action}: {outcome:?}"
        );
    }
    let expired = jobs(&app)
        .results(
            &view.id,
            ListResults {
                status: Some("expired".into()),
                ..ListResults::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(expired.results.len(), 7);
}

async fn offline_agents_get_their_command_when_they_connect(app: TestApp) {
    let mut online = connect_many(&app, "o", 2).await;
    app.state.store.ensure_agent("o-02".into()).await.unwrap();
    let view = create(
        &app,
        json!({"name": "inventory", "target": {"ids": ids("o", 3)}}),
    )
    .await;
    assert_eq!(view.targeted, 3);
    assert_eq!(
        (view.released, view.counts.held),
        (2, 1),
        "only connected agents are released to"
    );
    let pacer = pacer(&app);
    // Wakes the two (unless the sweep was quicker).
    pacer.turn().await.unwrap();
    for agent in &mut online {
        answer(agent, "ok").await;
    }
    assert_eq!(pacer.turn().await.unwrap(), 0);
    let waiting = job(&app, &view.id).await;
    assert_eq!(waiting.status, JobStatus::Running);
    assert_eq!(waiting.counts.held, 1);

    let mut late = app.connect("o-02").await;
    assert_eq!(pacer.turn().await.unwrap(), 1);
    answer(&mut late, "ok").await;
    pacer.turn().await.unwrap();
    let done = job(&app, &view.id).await;
    assert_eq!(done.status, JobStatus::Completed);
    assert_eq!(done.counts.succeeded, 3);
}

async fn commands_of_agents_that_never_connect_expire_at_the_ttl(app: TestApp) {
    app.state.store.ensure_agent("e-00".into()).await.unwrap();
    let mut present = app.connect("e-01").await;
    let view = create(
        &app,
        json!({"name": "collect", "target": {"ids": ids("e", 2)}, "ttl_seconds": 1}),
    )
    .await;
    assert!(view.expires_at.is_some());
    assert_eq!((view.released, view.counts.held), (1, 1));
    let pacer = pacer(&app);
    pacer.turn().await.unwrap();
    answer(&mut present, "ok").await;
    // The sweep's expiry path, called as the sweep does.
    let deadline = tokio::time::Instant::now() + WAIT;
    while app.state.store.expire_commands(now_ms()).await.unwrap() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    pacer.turn().await.unwrap();
    let done = job(&app, &view.id).await;
    assert_eq!(done.status, JobStatus::Completed);
    assert_eq!(
        (
            done.counts.succeeded,
            done.counts.expired,
            done.counts.cancelled
        ),
        (1, 1, 0)
    );
}

on_both_backends! {
    targeting_rules_combine_and_all_must_hold with ["JOB_PACER" = "false"];
    bad_targets_are_refused_with_a_message_and_no_match_is_distinct with ["JOB_PACER" = "false"];
    two_replicas_pacing_never_exceeds_max_in_flight with ["JOB_PACER" = "false"];
    canary_finishes_before_the_rest_start with ["JOB_PACER" = "false"];
    brake_pauses_the_job_and_resume_continues with ["JOB_PACER" = "false"];
    cancel_mid_flight_expires_what_was_not_delivered with ["JOB_PACER" = "false"];
    offline_agents_get_their_command_when_they_connect with ["JOB_PACER" = "false"];
    commands_of_agents_that_never_connect_expire_at_the_ttl with ["JOB_PACER" = "false"];
}
