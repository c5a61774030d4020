//! A database outage, on a PostgreSQL instance of the test's own (a private data directory
//! on a free port, never the machine's shared server): stopped, or hung (every process
//! SIGSTOPped, connections left open). Failures surface within DATABASE_OUTAGE_TIMEOUT
//! (2 s), sessions keep their heartbeat, nothing sent during the outage is lost, and a
//! query that is only slow is not mistaken for an outage.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::helpers::*;
use crate::procs::PrivatePostgres;

/// DATABASE_OUTAGE_TIMEOUT's default (2 s) plus scheduling slack for a machine that runs
/// the whole test suite at once (2.0 s is what a quiet run measures); far below the
/// statement timeout (10 s), which is what a caller waited before the outage probe.
const OUTAGE_BOUND: Duration = Duration::from_millis(4000);

/// How the test takes the database away.
#[derive(Clone, Copy, Debug)]
enum Outage {
    /// `pg_ctl stop -m fast`: connections are closed, new ones refused.
    Stopped,
    /// SIGSTOP: connections stay open and the kernel accepts new ones; nothing answers.
    Hung,
}

/// With the default DATABASE_STATEMENT_TIMEOUT (10 s): a result sent during the outage is
/// answered `store_unavailable` within the bound while the session's pings go on; API
/// calls, more at once than the pool has connections, are 503 within the bound;
/// readiness fails; once the database is back the resent result is stored.
async fn database_outage_is_reported_within_the_bound_and_loses_no_result(outage: Outage) {
    let Some(pg) = PrivatePostgres::start() else {
        return;
    };
    let app = spawn_app_on(
        &pg.url(),
        &[
            ("WS_HEARTBEAT_INTERVAL", "300ms"),
            ("WS_OFFLINE_TIMEOUT", "30s"),
            ("DATABASE_POOL_SIZE", "4"),
        ],
    )
    .await;
    let mut agent = app.connect("outage-1").await;
    let id = app.command("outage-1", "uptime", json!({})).await;
    agent.recv_type("command").await;
    // Let the session finish recording the delivery before the outage.
    agent.until_heartbeat_ack().await;

    match outage {
        Outage::Stopped => pg.stop_server(),
        Outage::Hung => pg.freeze(),
    }

    let (reply, result_answer, pings) = agent.result_during_outage(&id).await;
    assert_eq!(
        (reply["code"].as_str(), reply["id"].as_str()),
        (Some("store_unavailable"), Some(id.as_str())),
        "{reply}"
    );
    assert!(
        result_answer < OUTAGE_BOUND,
        "store_unavailable after {result_answer:?}"
    );
    // Pings (every 300 ms) go on while the store call waits: at least one for every two
    // intervals waited (a stopped database is often reported at once).
    assert!(
        pings as u128 >= result_answer.as_millis() / 600,
        "pings kept coming while the store call waited: {pings} in {result_answer:?}"
    );

    let answers = app.requests_at_once("outage-1", 6).await;
    let slowest = all_store_unavailable(&answers, OUTAGE_BOUND);
    let started = Instant::now();
    let ready = reqwest::get(app.url("/readiness")).await.unwrap();
    let readiness = started.elapsed();
    assert_eq!(ready.status().as_u16(), 503);
    assert!(readiness < OUTAGE_BOUND, "readiness after {readiness:?}");

    match outage {
        Outage::Stopped => pg.start_server(),
        Outage::Hung => pg.thaw(),
    }
    let back = Instant::now();
    let stored = agent
        .resend_result_until_acked(&id, Duration::from_secs(15))
        .await;
    assert_eq!(app.command_status(&id).await["status"], "succeeded");
    eprintln!(
        "{outage:?} PostgreSQL: result answered store_unavailable in {result_answer:?} \
         ({pings} pings meanwhile); {} requests at once answered 503 within {slowest:?}; \
         readiness 503 in {readiness:?}; the resent result stored {stored:?} after the \
         database was back ({:?} in all)",
        answers.len(),
        back.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_database_is_reported_within_the_outage_bound_and_loses_no_result() {
    database_outage_is_reported_within_the_bound_and_loses_no_result(Outage::Stopped).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_database_is_reported_within_the_outage_bound_and_loses_no_result() {
    database_outage_is_reported_within_the_bound_and_loses_no_result(Outage::Hung).await;
}

/// A statement that waits on a lock for longer than DATABASE_OUTAGE_TIMEOUT, on a database
/// that answers: the probe finds the database alive, so the request waits for the lock
/// and succeeds once it is released (within DATABASE_STATEMENT_TIMEOUT).
async fn a_statement_slower_than_the_outage_bound_on_a_live_database_succeeds(app: TestApp) {
    app.enroll("slow-1").await;
    let mut holder = LockHolder::take(&app);
    let hold = Duration::from_secs(3);
    let body = json!({"name": "uptime"});
    let started = Instant::now();
    let (answer, ()) = tokio::join!(app.post("/api/v1/agents/slow-1/commands", &body), async {
        // The scenario's length: the lock is held this long, then released.
        tokio::time::sleep(hold).await;
        holder.release();
    });
    let waited = started.elapsed();
    let (status, body) = answer;
    eprintln!("POST behind a lock held {hold:?}: {status} after {waited:?}");
    assert_eq!(status, 202, "{body}");
    assert!(
        waited >= hold,
        "answered before the lock was released: {waited:?}"
    );
}

/// A lock on the `commands` table from a connection of the test's own: PostgreSQL's
/// `ACCESS EXCLUSIVE` lock, SQLite's write lock (`BEGIN IMMEDIATE`).
struct LockHolder(Box<dyn diesel::connection::SimpleConnection>);

impl LockHolder {
    fn take(app: &TestApp) -> LockHolder {
        use agent_server::config::DatabaseUrl;
        use diesel::Connection;
        use diesel::connection::SimpleConnection;

        LockHolder(match &app.config.database {
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
        })
    }

    fn release(&mut self) {
        self.0.batch_execute("COMMIT").unwrap();
    }
}

/// A statement that waits on a lock another session holds, on a database that is up, is
/// cancelled after DATABASE_STATEMENT_TIMEOUT (PostgreSQL's `statement_timeout`, SQLite's
/// `busy_timeout`): a 503 that names the cause, and the server goes on once the lock is
/// released.
async fn a_statement_blocked_by_a_lock_ends_after_the_statement_timeout(app: TestApp) {
    app.enroll("locked-1").await;
    let mut holder = LockHolder::take(&app);
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
    holder.release();
    app.command("locked-1", "uptime", json!({})).await;
}

on_both_backends! {
    a_statement_blocked_by_a_lock_ends_after_the_statement_timeout
        with ["DATABASE_STATEMENT_TIMEOUT" = "1s"];
    a_statement_slower_than_the_outage_bound_on_a_live_database_succeeds;
}
