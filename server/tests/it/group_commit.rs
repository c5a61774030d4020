//! Group commit (`store/writer.rs`): writes of many sessions and requests share a
//! transaction, and each caller still learns the outcome of its own write, exactly as if
//! it had been alone. Group reads (`store/reader.rs`): the commands to send to many
//! sessions are read in one statement, and each session gets exactly its own. Every
//! write or read here is issued at once, so they land in the same batch or, on
//! PostgreSQL's several writers, in concurrent ones: each test checks only what holds in
//! every order those allow.

use agent_server::store::{CommandStatus, Hello, NewCommand, ResultOutcome, Store, now_ms};
use futures_util::future::join_all;

use crate::helpers::{TestApp, on_both_backends};

fn command(id: &str, agent: &str) -> NewCommand {
    NewCommand {
        id: id.to_string(),
        agent_id: agent.to_string(),
        name: "ping".into(),
        args: "{}".into(),
        status: CommandStatus::Pending.as_str().into(),
        created_at: now_ms(),
        expires_at: None,
    }
}

async fn connect(store: &Store, agent: &str) -> i64 {
    store
        .agent_connected(agent.to_string(), "pod-test".into())
        .await
        .unwrap()
}

async fn concurrent_connects_of_one_agent_get_distinct_epochs_and_the_newest_wins(app: TestApp) {
    let store = &app.state.store;
    let epochs: Vec<i64> = join_all((0..20).map(|_| connect(store, "twin"))).await;
    let mut sorted = epochs.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted, (1..=20).collect::<Vec<i64>>(), "{epochs:?}");
    // Only the newest connection's disconnect clears presence.
    let gone =
        join_all((1..=20).map(|e| store.agent_disconnected("twin".into(), e, now_ms()))).await;
    let cleared: Vec<i64> = (1..=20)
        .filter(|e| gone[*e as usize - 1].as_ref().is_ok_and(|b| *b))
        .collect();
    assert_eq!(cleared, [20]);
}

async fn results_in_one_batch_each_get_their_own_outcome(app: TestApp) {
    let store = &app.state.store;
    let agents: Vec<String> = (0..30).map(|i| format!("agent-{i}")).collect();
    let epochs = join_all(agents.iter().map(|a| connect(store, a))).await;
    let created = join_all(
        agents
            .iter()
            .map(|a| store.create_command(command(&format!("cmd-{a}"), a), None)),
    )
    .await;
    assert!(created.iter().all(|c| matches!(c, Ok(true))), "{created:?}");
    // A newer connection of agent-0 fences its first one off.
    let newer = connect(store, "agent-0").await;
    assert_eq!(newer, epochs[0] + 1);

    let mut results = Vec::new();
    for (a, epoch) in agents.iter().zip(&epochs) {
        results.push((a.clone(), *epoch, format!("cmd-{a}")));
    }
    // The same result twice, a command of another agent, and an unknown command.
    results.push(("agent-1".into(), epochs[1], "cmd-agent-1".into()));
    results.push(("agent-2".into(), epochs[2], "cmd-agent-3".into()));
    results.push(("agent-4".into(), epochs[4], "no-such-command".into()));
    let outcomes = join_all(results.iter().map(|(a, epoch, cmd)| {
        store.record_result(
            a.clone(),
            *epoch,
            cmd.clone(),
            CommandStatus::Succeeded,
            Some("{}".into()),
            now_ms(),
        )
    }))
    .await;
    let outcomes: Vec<ResultOutcome> = outcomes.into_iter().map(Result::unwrap).collect();

    assert_eq!(
        outcomes[0],
        ResultOutcome::StaleConnection,
        "agent-0 was replaced"
    );
    let stored = ResultOutcome::Stored(CommandStatus::Succeeded);
    let duplicate = ResultOutcome::AlreadyFinal(CommandStatus::Succeeded);
    // agent-1's result was sent twice: the first stands, the second is a duplicate.
    let mut twice = [outcomes[1], outcomes[30]];
    twice.sort_by_key(|o| *o != stored);
    assert_eq!(twice, [stored, duplicate]);
    // agent-3's command, reported by agent-2, is agent-3's own business.
    assert_eq!(outcomes[3], stored);
    assert_eq!(outcomes[31], ResultOutcome::UnknownCommand);
    assert_eq!(outcomes[32], ResultOutcome::UnknownCommand);
    for (i, o) in outcomes.iter().enumerate().take(30).skip(2) {
        assert_eq!(*o, stored, "agent-{i}");
    }
    let first = store
        .get_command("cmd-agent-0".into())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.status, "pending", "a fenced-off result is not stored");
}

async fn a_failing_write_fails_alone_and_its_neighbours_are_committed(app: TestApp) {
    let store = &app.state.store;
    for a in ["a-1", "a-2", "a-3"] {
        connect(store, a).await;
    }
    assert!(
        store
            .create_command(command("taken", "a-1"), None)
            .await
            .unwrap()
    );
    // In one batch: two good commands, one whose id is taken (a constraint violation
    // that aborts the batch's transaction), one for an agent that does not exist.
    let outcomes = join_all([
        store.create_command(command("new-1", "a-1"), None),
        store.create_command(command("taken", "a-2"), None),
        store.create_command(command("new-2", "a-3"), None),
        store.create_command(command("new-3", "nobody"), None),
    ])
    .await;
    assert!(matches!(outcomes[0], Ok(true)), "{:?}", outcomes[0]);
    assert!(
        outcomes[1].is_err(),
        "the taken id fails: {:?}",
        outcomes[1]
    );
    assert!(matches!(outcomes[2], Ok(true)), "{:?}", outcomes[2]);
    assert!(matches!(outcomes[3], Ok(false)), "{:?}", outcomes[3]);
    for (id, agent) in [("new-1", "a-1"), ("new-2", "a-3"), ("taken", "a-1")] {
        let row = store.get_command(id.into()).await.unwrap().unwrap();
        assert_eq!(row.agent_id, agent);
    }
    assert!(store.get_command("new-3".into()).await.unwrap().is_none());
}

async fn a_new_connection_learns_whether_commands_wait_for_it(app: TestApp) {
    let store = &app.state.store;
    for a in ["idle", "busy", "done"] {
        connect(store, a).await;
    }
    assert!(
        store
            .create_command(command("c-busy", "busy"), None)
            .await
            .unwrap()
    );
    assert!(
        store
            .create_command(command("c-done", "done"), None)
            .await
            .unwrap()
    );
    let epoch = connect(store, "done").await;
    store
        .record_result(
            "done".into(),
            epoch,
            "c-done".into(),
            CommandStatus::Failed,
            None,
            now_ms(),
        )
        .await
        .unwrap();
    let sendable = join_all(
        ["idle", "busy", "done", "unknown"].map(|a| store.has_sendable_commands(a.into())),
    )
    .await;
    let sendable: Vec<bool> = sendable.into_iter().map(Result::unwrap).collect();
    assert_eq!(sendable, [false, true, false, false]);
    // Delivered without a result still counts: it is sent again on a new connection.
    store
        .mark_delivered(vec!["c-busy".into()], now_ms())
        .await
        .unwrap();
    assert!(store.has_sendable_commands("busy".into()).await.unwrap());
}

async fn reads_of_many_sessions_in_one_batch_each_get_their_own_commands(app: TestApp) {
    let store = &app.state.store;
    for a in ["many", "one", "none"] {
        connect(store, a).await;
    }
    let now = now_ms();
    // "many" has six commands, created in order: one delivered without a result, one
    // expired, one finished, three pending.
    for i in 0..6 {
        let mut cmd = command(&format!("m{i}"), "many");
        cmd.created_at = now - 1000 + i;
        if i == 2 {
            cmd.expires_at = Some(now - 1);
        }
        assert!(store.create_command(cmd, None).await.unwrap());
    }
    store.mark_delivered(vec!["m0".into()], now).await.unwrap();
    let epoch = connect(store, "many").await;
    store
        .record_result(
            "many".into(),
            epoch,
            "m3".into(),
            CommandStatus::Succeeded,
            None,
            now,
        )
        .await
        .unwrap();
    assert!(
        store
            .create_command(command("o0", "one"), None)
            .await
            .unwrap()
    );

    // (agent, include delivered, limit) → the ids it must get, oldest first.
    let asked: [(&str, bool, i64, &[&str]); 7] = [
        ("many", false, 100, &["m1", "m4", "m5"]),
        ("many", true, 100, &["m0", "m1", "m4", "m5"]),
        ("many", true, 2, &["m0", "m1"]),
        ("many", false, 1, &["m1"]),
        ("one", false, 100, &["o0"]),
        ("none", true, 100, &[]),
        ("unknown", true, 100, &[]),
    ];
    let pages = join_all(asked.iter().map(|(agent, delivered, limit, _)| {
        store.commands_to_send(agent.to_string(), *delivered, None, now, *limit)
    }))
    .await;
    for ((agent, delivered, limit, want), page) in asked.iter().zip(pages) {
        let got: Vec<String> = page.unwrap().into_iter().map(|c| c.id).collect();
        assert_eq!(
            got, *want,
            "{agent}, delivered too: {delivered}, limit {limit}"
        );
    }
    // The next page (after the last one sent) is read alone, with the same rules.
    let rest = store
        .commands_to_send(
            "many".into(),
            true,
            Some((now - 1000 + 1, "m1".into())),
            now,
            100,
        )
        .await
        .unwrap();
    let rest: Vec<String> = rest.into_iter().map(|c| c.id).collect();
    assert_eq!(rest, ["m4", "m5"]);
}

async fn connects_hellos_and_disconnects_in_one_batch_each_follow_their_epoch(app: TestApp) {
    let store = &app.state.store;
    let agents: Vec<String> = (0..40).map(|i| format!("mix-{i:02}")).collect();
    let first = join_all(agents.iter().map(|a| connect(store, a))).await;
    let hello = |version: Option<&str>, os: Option<&str>| Hello {
        version: version.map(Into::into),
        hostname: Some("host".into()),
        os: os.map(Into::into),
        arch: None,
    };
    // Every agent's first hello, in one batch.
    let said = join_all(
        agents
            .iter()
            .zip(&first)
            .map(|(a, e)| store.agent_hello(a.clone(), *e, hello(Some("1.0"), Some("linux")))),
    )
    .await;
    assert!(said.iter().all(Result::is_ok), "{said:?}");

    // At once: even agents close their connection and say nothing more; odd agents
    // reconnect while their first connection says a late hello and then closes (a session
    // awaits each write before its next). PostgreSQL has several writers, so these land in
    // one batch or in concurrent ones, in any order consistent with that.
    let mut writes = Vec::new();
    for (i, (a, e)) in agents.iter().zip(&first).enumerate() {
        let (a, e) = (a.clone(), *e);
        if i % 2 == 0 {
            writes.push(Box::pin(async move {
                vec![Op::Gone(
                    store.agent_disconnected(a, e, now_ms()).await.unwrap(),
                )]
            })
                as std::pin::Pin<Box<dyn std::future::Future<Output = Vec<Op>>>>);
        } else {
            let b = a.clone();
            writes.push(Box::pin(async move {
                vec![Op::Epoch(connect(store, &a).await)]
            }));
            writes.push(Box::pin(async move {
                store
                    .agent_hello(b.clone(), e, hello(Some("0.9"), None))
                    .await
                    .unwrap();
                let gone = store.agent_disconnected(b, e, now_ms()).await.unwrap();
                vec![Op::Said, Op::Gone(gone)]
            }));
        }
    }
    let outcomes = join_all(writes).await;

    let mut outcomes = outcomes.into_iter().flatten();
    for (i, (a, e)) in agents.iter().zip(&first).enumerate() {
        let (row, _) = store.get_agent(a.clone()).await.unwrap().unwrap();
        assert_eq!(row.hostname.as_deref(), Some("host"), "{a}");
        assert_eq!(
            row.os.as_deref(),
            Some("linux"),
            "{a}: a hello keeps what it leaves out"
        );
        if i % 2 == 0 {
            assert_eq!(outcomes.next(), Some(Op::Gone(true)), "{a}");
            assert!(!row.online, "{a}");
            assert_eq!(row.epoch, *e, "{a}");
            assert_eq!(row.version.as_deref(), Some("1.0"), "{a}");
            continue;
        }
        assert_eq!(outcomes.next(), Some(Op::Epoch(e + 1)), "{a}");
        assert_eq!(outcomes.next(), Some(Op::Said), "{a}");
        let gone = outcomes.next();
        assert_eq!(row.epoch, e + 1, "{a}");
        // Whichever came first, the newest connection is the one online.
        assert!(row.online, "{a}: the newest connection wins");
        match (gone, row.version.as_deref()) {
            // The close came before the second connection, so the hello did too: it was
            // current, and stored.
            (Some(Op::Gone(true)), version) => assert_eq!(version, Some("0.9"), "{a}"),
            // The close came after the second connection and was fenced off; the hello
            // came before it (stored) or after it (fenced off too).
            (Some(Op::Gone(false)), Some("0.9" | "1.0")) => {}
            other => panic!("{a}: {other:?}"),
        }
        // Once the second connection is known, the first one's words change nothing.
        let before = row.version.clone();
        store
            .agent_hello(a.clone(), *e, hello(Some("0.1"), Some("plan9")))
            .await
            .unwrap();
        let late_close = store.agent_disconnected(a.clone(), *e, now_ms()).await;
        assert!(!late_close.unwrap(), "{a}: a stale close is fenced off");
        let (row, _) = store.get_agent(a.clone()).await.unwrap().unwrap();
        assert_eq!(row.version, before, "{a}: a stale hello is not stored");
        assert_eq!(row.os.as_deref(), Some("linux"), "{a}");
        assert!(row.online, "{a}");
    }
}

/// The row version (`xmin`) of an agent's row: a new one for every write to the row.
fn row_version(database_url: &str, id: &str) -> String {
    use diesel::{Connection, RunQueryDsl};
    #[derive(diesel::QueryableByName)]
    struct Version {
        #[diesel(sql_type = diesel::sql_types::Text)]
        v: String,
    }
    let mut c = diesel::PgConnection::establish(database_url).unwrap();
    diesel::sql_query("SELECT xmin::text AS v FROM agents WHERE id = $1")
        .bind::<diesel::sql_types::Text, _>(id)
        .get_result::<Version>(&mut c)
        .unwrap()
        .v
}

async fn a_hello_that_changes_nothing_writes_nothing(app: TestApp) {
    let store = &app.state.store;
    let epoch = connect(store, "same").await;
    let facts = |version: &str| Hello {
        version: Some(version.into()),
        hostname: Some("host".into()),
        os: Some("linux".into()),
        arch: Some("x86_64".into()),
    };
    let say = |hello: Hello| store.agent_hello("same".into(), epoch, hello);
    say(facts("1.0")).await.unwrap();
    let stored = row_version(&app.database_url, "same");
    // The same facts again (as on every reconnection), or none at all: no new row version.
    say(facts("1.0")).await.unwrap();
    say(Hello {
        version: None,
        hostname: None,
        os: None,
        arch: None,
    })
    .await
    .unwrap();
    assert_eq!(row_version(&app.database_url, "same"), stored);
    // A fact that changed is written, and the others kept.
    say(facts("1.1")).await.unwrap();
    assert_ne!(row_version(&app.database_url, "same"), stored);
    let (row, _) = store.get_agent("same".into()).await.unwrap().unwrap();
    assert_eq!(row.version.as_deref(), Some("1.1"));
    assert_eq!(row.os.as_deref(), Some("linux"));
}

/// Store threads keep their connection only while batches keep coming.
async fn store_threads_give_their_connections_back_when_idle(app: TestApp) {
    let store = &app.state.store;
    let agents: Vec<String> = (0..50).map(|i| format!("idle-{i:02}")).collect();
    join_all(agents.iter().map(|a| connect(store, a))).await;
    join_all(
        agents
            .iter()
            .map(|a| store.commands_to_send(a.clone(), true, None, now_ms(), 10)),
    )
    .await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
    assert!(
        store.settle(deadline).await,
        "every pooled connection idle again within 2 s"
    );
}

/// Threads keep their connection only while the pool has more to hand out: with fewer
/// connections than store threads, writes, group reads and the API's own reads all get
/// their turn.
async fn a_pool_smaller_than_the_store_threads_serves_everyone(app: TestApp) {
    let store = &app.state.store;
    let agents: Vec<String> = (0..40).map(|i| format!("small-{i:02}")).collect();
    let work = async {
        for _ in 0..3 {
            let connects = join_all(agents.iter().map(|a| connect(store, a)));
            let reads = join_all(
                agents
                    .iter()
                    .map(|a| store.commands_to_send(a.clone(), true, None, now_ms(), 10)),
            );
            let lookups = join_all(agents.iter().map(|a| store.get_agent(a.clone())));
            let (_, reads, lookups) = tokio::join!(connects, reads, lookups);
            assert!(reads.iter().all(Result::is_ok), "{reads:?}");
            assert!(lookups.iter().all(Result::is_ok));
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(20), work)
        .await
        .expect("every call answered within 20 s");
}

#[derive(Debug, PartialEq, Eq)]
enum Op {
    Epoch(i64),
    Gone(bool),
    Said,
}

on_both_backends! {
    concurrent_connects_of_one_agent_get_distinct_epochs_and_the_newest_wins;
    results_in_one_batch_each_get_their_own_outcome;
    a_failing_write_fails_alone_and_its_neighbours_are_committed;
    a_new_connection_learns_whether_commands_wait_for_it;
    reads_of_many_sessions_in_one_batch_each_get_their_own_commands;
    connects_hellos_and_disconnects_in_one_batch_each_follow_their_epoch;
    store_threads_give_their_connections_back_when_idle;
    a_pool_smaller_than_the_store_threads_serves_everyone with ["DATABASE_POOL_SIZE" = "2"];
}

// Row versions are PostgreSQL's.
mod a_hello_that_changes_nothing_writes_nothing {
    crate::helpers::scenario_test!(
        postgres,
        Postgres,
        super::a_hello_that_changes_nothing_writes_nothing,
        []
    );
}
