//! A database outage, on a PostgreSQL instance of the test's own (a private data directory
//! on a free port, never the machine's shared server): failures surface within the pool's
//! bound, sessions keep their heartbeat, and nothing sent during the outage is lost.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::helpers::*;

/// A PostgreSQL server of its own: `initdb` into a temporary directory and `pg_ctl` on a
/// free port, run as the `postgres` user. Stopped and removed on drop.
struct PrivatePostgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
}

impl PrivatePostgres {
    /// `None` (a loud skip outside CI) where PostgreSQL's server binaries or the
    /// `postgres` user are missing.
    fn start() -> Option<PrivatePostgres> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|versions| {
                versions
                    .filter_map(Result::ok)
                    .map(|v| v.path().join("bin"))
                    .find(|b| b.join("pg_ctl").exists())
            });
        let Some(bin) = bin else {
            let why = "no PostgreSQL server binaries under /usr/lib/postgresql";
            assert!(std::env::var_os("CI").is_none(), "{why}");
            eprintln!("SKIPPED: {why}");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let chown = Command::new("chown")
            .args(["-R", "postgres"])
            .arg(dir.path())
            .status();
        if !chown.is_ok_and(|s| s.success()) {
            let why = "cannot hand a data directory to the postgres user (not root?)";
            assert!(std::env::var_os("CI").is_none(), "{why}");
            eprintln!("SKIPPED: {why}");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let pg = PrivatePostgres { bin, dir, port };
        pg.run(
            "initdb",
            &[
                "-D",
                &pg.data(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
        );
        pg.start_server();
        Some(pg)
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let out = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join(tool))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn start_server(&self) {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {}",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("log").display().to_string();
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-o",
                &options,
                "-l",
                &log,
                "-w",
                "start",
            ],
        );
    }

    fn stop_server(&self) {
        self.run("pg_ctl", &["-D", &self.data(), "-m", "fast", "-w", "stop"]);
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["-D", &self.data(), "-m", "immediate", "stop"])
            .output();
    }
}

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
