//! The store as replicas meet it at start-up.

use agent_server::config::{DatabaseUrl, Secret};
use agent_server::store::{PoolSettings, Store};

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
