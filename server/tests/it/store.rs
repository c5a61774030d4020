//! The store as replicas meet it at start-up, and under concurrent writers.

use agent_server::config::{DatabaseUrl, Secret};
use agent_server::store::{
    ApiTokenRow, EnrollAttempt, EnrollOutcome, EnrollSecretRow, PoolSettings, Store,
};

use crate::helpers::postgres_db;

#[test]
fn replicas_starting_together_migrate_without_racing() {
    let Some((url, _db)) = postgres_db() else {
        return;
    };
    let replicas: Vec<_> = (0..4)
        .map(|_| {
            let url = DatabaseUrl::Postgres(Secret::new(url.clone()));
            std::thread::spawn(move || {
                Store::open(&url, PoolSettings::sized(2)).map(|s| s.backend_name())
            })
        })
        .collect();
    for r in replicas {
        assert_eq!(r.join().unwrap().expect("every replica starts"), "postgres");
    }
}

#[test]
fn embedded_sqlite_database_is_created_with_its_directory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/deeper/agent.db");
    let store = Store::open(&DatabaseUrl::Sqlite(path.clone()), PoolSettings::sized(2)).unwrap();
    assert_eq!(store.backend_name(), "sqlite");
    assert!(path.exists());
    // Opening again runs no migration twice.
    Store::open(&DatabaseUrl::Sqlite(path), PoolSettings::sized(2)).unwrap();
}

/// Enrollment reads the secret, then counts its use and creates the agent: a
/// transaction that reads before it writes. On SQLite a deferred transaction that has
/// read cannot take the write lock once another connection has committed meanwhile
/// (SQLITE_BUSY at once, "database is locked", which busy_timeout does not wait out), so
/// such transactions begin IMMEDIATE. Many at once, on every connection of the pool,
/// half of them re-enrolling one client id: every one succeeds and every use is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_read_then_write_transactions_on_sqlite_never_find_the_database_locked() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(
        &DatabaseUrl::Sqlite(dir.path().join("agent.db")),
        PoolSettings::sized(8),
    )
    .unwrap();
    let now = 1_800_000_000_000;
    store
        .insert_enroll_secret(EnrollSecretRow {
            id: "0190f000-0000-7000-8000-000000000001".into(),
            name: "fleet".into(),
            secret_sha256: "a".repeat(64),
            labels: r#"["site:lab"]"#.into(),
            allow_reenroll: true,
            created_at: now,
            expires_at: None,
            max_uses: None,
            use_count: 0,
            last_used_at: None,
            revoked_at: None,
        })
        .await
        .unwrap();
    const ENROLLMENTS: usize = 64;
    let tasks: Vec<_> = (0..ENROLLMENTS)
        .map(|i| {
            let store = store.clone();
            let client_id = if i % 2 == 0 {
                "web-shared".to_string()
            } else {
                format!("web-{i}")
            };
            tokio::spawn(async move {
                store
                    .enroll(EnrollAttempt {
                        secret_sha256: "a".repeat(64),
                        client_id: client_id.clone(),
                        hostname: Some(format!("host-{i}")),
                        now: now + i as i64,
                        token: ApiTokenRow {
                            jti: format!("0190f000-0000-7000-8000-{i:012}"),
                            name: None,
                            role: "agent".into(),
                            subject: client_id,
                            created_at: now,
                            expires_at: now + 3_600_000,
                            last_used_at: None,
                            revoked_at: None,
                        },
                    })
                    .await
            })
        })
        .collect();
    for (i, task) in tasks.into_iter().enumerate() {
        match task.await.unwrap() {
            Ok(EnrollOutcome::Enrolled { .. }) => {}
            other => panic!("enrollment {i}: {other:?}"),
        }
    }
    let secrets = store.list_enroll_secrets(None, 10).await.unwrap();
    assert_eq!(secrets[0].use_count, ENROLLMENTS as i64);
}
