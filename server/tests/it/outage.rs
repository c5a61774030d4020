//! A database outage, on a PostgreSQL instance of the test's own (a private data directory
//! on a free port, never the machine's shared server): failures surface within the pool's
//! bound, sessions keep their heartbeat, and nothing sent during the outage is lost.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::helpers::*;
use crate::procs::PrivatePostgres;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_is_reported_within_the_bound_and_loses_no_result() {
    let Some(pg) = PrivatePostgres::start() else {
        return;
    };
    let app = spawn_app_on(
        &pg.url(),
        &[
            ("WS_HEARTBEAT_INTERVAL", "300ms"),
            ("WS_OFFLINE_TIMEOUT", "30s"),
        ],
    )
    .await;
    let mut agent = app.connect("outage-1").await;
    let id = app.command("outage-1", "uptime", json!({})).await;
    agent.recv_type("command").await;

    pg.stop_server();

    // A result sent during the outage is answered within the pool's bound, and the
    // session's heartbeat goes on meanwhile.
    let sent = Instant::now();
    agent.result(&id, "ok", json!({"stdout": "up"})).await;
    let mut pings = 0;
    let reply = loop {
        match agent.next_frame().await {
            Frame::Ping => pings += 1,
            Frame::Json(v) if v["type"] == "error" => break v,
            Frame::Json(_) => {}
            Frame::Close(c) => panic!("the session closed during the outage: {c:?}"),
        }
    };
    let waited = sent.elapsed();
    eprintln!(
        "result during the outage: store_unavailable after {waited:?}, {pings} pings meanwhile"
    );
    assert_eq!(
        (reply["code"].as_str(), reply["id"].as_str()),
        (Some("store_unavailable"), Some(id.as_str())),
        "{reply}"
    );
    assert!(
        waited < Duration::from_secs(3),
        "store_unavailable after {waited:?}"
    );
    assert!(
        pings >= 2,
        "pings kept coming while the store call waited: {pings} in {waited:?}"
    );

    // An API write during the outage: 503 within the same bound.
    let started = Instant::now();
    let (status, body) = app
        .post(
            "/api/v1/agents/outage-1/commands",
            &json!({"name": "uptime"}),
        )
        .await;
    let waited = started.elapsed();
    eprintln!("POST during the outage: {status} after {waited:?}");
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("store_unavailable")),
        "{body}"
    );
    assert!(waited < Duration::from_secs(3), "503 after {waited:?}");

    // The database comes back; the agent sends the result again, as told, and it is kept.
    pg.start_server();
    let mut acked = false;
    eventually(
        Duration::from_secs(15),
        "the result is stored after the outage",
        async || {
            if !acked {
                agent.result(&id, "ok", json!({"stdout": "up"})).await;
                let v = loop {
                    if let Frame::Json(v) = agent.next_frame().await {
                        break v;
                    }
                };
                acked = v["type"] == "ack";
            }
            acked
        },
    )
    .await;
    assert_eq!(app.command_status(&id).await["status"], "succeeded");
}

/// A statement that waits on a lock another session holds, on a database that is up, is
/// cancelled after DATABASE_STATEMENT_TIMEOUT (PostgreSQL's `statement_timeout`, SQLite's
/// `busy_timeout`): a 503 that names the cause, and the server goes on once the lock is
/// released.
async fn a_statement_blocked_by_a_lock_ends_after_the_statement_timeout(app: TestApp) {
    use agent_server::config::DatabaseUrl;
    use diesel::Connection;
    use diesel::connection::SimpleConnection;

    app.enroll("locked-1").await;
    let mut holder: Box<dyn SimpleConnection> = match &app.config.database {
        DatabaseUrl::Postgres(_) => {
            let mut c = diesel::PgConnection::establish(&app.database_url).unwrap();
            c.batch_execute("BEGIN; LOCK TABLE commands IN ACCESS EXCLUSIVE MODE")
                .unwrap();
            Box::new(c)
        }
        DatabaseUrl::Sqlite(path) => {
            let mut c = diesel::SqliteConnection::establish(path.to_str().unwrap()).unwrap();
            c.batch_execute("BEGIN IMMEDIATE").unwrap();
            Box::new(c)
        }
    };
    let started = Instant::now();
    let (status, body) = app
        .post(
            "/api/v1/agents/locked-1/commands",
            &json!({"name": "uptime"}),
        )
        .await;
    let waited = started.elapsed();
    eprintln!("POST behind a lock: {status} after {waited:?}: {body}");
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("store_unavailable")),
        "{body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("DATABASE_STATEMENT_TIMEOUT"),
        "{body}"
    );
    assert!(
        (Duration::from_millis(900)..Duration::from_millis(2500)).contains(&waited),
        "503 after {waited:?}"
    );
    holder.batch_execute("COMMIT").unwrap();
    app.command("locked-1", "uptime", json!({})).await;
}

on_both_backends! {
    a_statement_blocked_by_a_lock_ends_after_the_statement_timeout
        with ["DATABASE_STATEMENT_TIMEOUT" = "1s"];
}
