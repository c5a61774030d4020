//! Secrets: read from files (`*_FILE`), never written to a log line, and PostgreSQL
//! credentials and certificates taken from libpq's own variables (PGPASSWORD,
//! PGSSLROOTCERT, PGSSLCERT, PGSSLKEY) against a private PostgreSQL with TLS and
//! scram-sha-256 that the test starts.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;

use crate::certs::TestCa;
use crate::helpers::*;
use crate::procs::*;

/// A provider-generated password with URL-reserved characters: libpq quotes it whole in
/// `invalid percent-encoded token: "..."`.
const DB_PASSWORD: &str = "Vx7#kQ9?mz%2Lr:8";
const SECRET_KEY: &str = "log-test-secret-key-0123456789abcdef-XYZ";
const ADMIN_PASSWORD: &str = "admin-pass-Qw8!zz";
const REDIS_PASSWORD: &str = "redis-pass-Hn4$tt";
const SENTINEL_PASSWORD: &str = "sentinel-pass-Lp2&yy";

/// Runs the binary to completion (or kills it after `run_for`), returning its exit code and
/// every line it wrote to stdout and stderr.
async fn run_collecting(dir: &Path, env: &[(&str, &str)], run_for: Duration) -> (i32, String) {
    let mut child = command(dir, env)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let read_out = tokio::spawn(async move {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s).await;
        s
    });
    let read_err = tokio::spawn(async move {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s).await;
        s
    });
    let code = match tokio::time::timeout(run_for, child.wait()).await {
        Ok(status) => status.unwrap().code().unwrap_or(-1),
        Err(_) => {
            // SAFETY: kill(2) on a child we own; SIGTERM so that shutdown logs too.
            unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGTERM) };
            let status = tokio::time::timeout(WAIT, child.wait()).await.unwrap();
            status.unwrap().code().unwrap_or(-1)
        }
    };
    let log = read_out.await.unwrap() + &read_err.await.unwrap();
    (code, log)
}

fn assert_no_secret(log: &str, secrets: &[&str]) {
    for line in log.lines() {
        for secret in secrets {
            assert!(
                !line.contains(secret),
                "a log line holds the secret `{secret}`:\n{line}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_a_log_line_when_the_database_url_cannot_be_parsed() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("postgresql://app:{DB_PASSWORD}@127.0.0.1:5432/agents");
    for format in ["text", "json"] {
        let (code, log) = run_collecting(
            dir.path(),
            &[
                ("DATABASE_URL", &url),
                ("SECRET_KEY", SECRET_KEY),
                ("ADMIN_PASSWORD", ADMIN_PASSWORD),
                ("REDIS_HOST", "127.0.0.1"),
                ("REDIS_PORT", "1"),
                ("REDIS_PASSWORD", REDIS_PASSWORD),
                ("LOG_LEVEL", "trace"),
                ("LOG_FORMAT", format),
                ("SERVER_HOST", "127.0.0.1"),
                ("SERVER_PORT", "0"),
            ],
            WAIT,
        )
        .await;
        assert_ne!(code, 0, "{log}");
        assert!(log.contains("could not start"), "{log}");
        assert!(
            log.contains("invalid percent-encoded token"),
            "libpq's own message is kept, with the password masked: {log}"
        );
        assert_no_secret(
            &log,
            &[DB_PASSWORD, SECRET_KEY, ADMIN_PASSWORD, REDIS_PASSWORD],
        );
        eprintln!("{format} log of a failing start, redacted:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_a_log_line_of_a_server_whose_redis_refuses_it() {
    let Some((db_url, _db)) = postgres_db() else {
        return;
    };
    // redis-server with another password: every Redis call fails authentication, at trace.
    let redis_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let Ok(_redis) = tokio::process::Command::new("redis-server")
        .args(["--port", &redis_port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--requirepass", "other"])
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
    else {
        assert!(
            std::env::var_os("CI").is_none(),
            "redis-server is required in CI"
        );
        eprintln!("SKIPPED: redis-server not found on PATH");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let port = redis_port.to_string();
    for format in ["text", "json"] {
        let (_, log) = run_collecting(
            dir.path(),
            &[
                ("DATABASE_URL", &db_url),
                // PostgreSQL here trusts local connections, so libpq's password is unused;
                // it must still never be printed.
                ("PGPASSWORD", DB_PASSWORD),
                ("SECRET_KEY", SECRET_KEY),
                ("ADMIN_PASSWORD", ADMIN_PASSWORD),
                ("REDIS_HOST", "127.0.0.1"),
                ("REDIS_PORT", &port),
                ("REDIS_PASSWORD", REDIS_PASSWORD),
                ("REDIS_SENTINEL_PASSWORD", SENTINEL_PASSWORD),
                ("LOG_LEVEL", "trace"),
                ("LOG_FORMAT", format),
                ("SERVER_HOST", "127.0.0.1"),
                ("SERVER_PORT", "0"),
                ("DATA_DIR", dir.path().to_str().unwrap()),
            ],
            Duration::from_secs(4),
        )
        .await;
        assert!(log.contains("agent-server listening"), "{log}");
        assert!(log.contains("Redis unavailable"), "{log}");
        assert_no_secret(
            &log,
            &[
                DB_PASSWORD,
                SECRET_KEY,
                ADMIN_PASSWORD,
                REDIS_PASSWORD,
                SENTINEL_PASSWORD,
            ],
        );
    }
}

fn secret_file(dir: &Path, name: &str, content: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, format!("{content}\n")).unwrap();
    path.to_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_mounted_as_files_configure_a_clustered_server() {
    let Some((db_url, _db)) = postgres_db() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let files = dir.path();
    let server = ServerProcess::start(
        files,
        &[
            ("DATABASE_URL_FILE", &secret_file(files, "url", &db_url)),
            ("SECRET_KEY_FILE", &secret_file(files, "key", SECRET)),
            (
                "ADMIN_PASSWORD_FILE",
                &secret_file(files, "admin", ADMIN_PASSWORD),
            ),
            ("SERVER_HOST", "127.0.0.1"),
            ("SERVER_PORT", "0"),
            ("DATA_DIR", files.to_str().unwrap()),
        ],
    )
    .await;
    assert!(
        server.log().contains("database=\"postgres\""),
        "{}",
        server.log()
    );
    // The key read from the file signs and checks tokens: one minted with it is accepted.
    let tokens = agent_server::auth::Tokens::new(
        &agent_server::config::Secret::new(SECRET),
        jsonwebtoken::Algorithm::HS256,
    );
    let admin = tokens.mint(
        "admin",
        agent_server::auth::Role::Admin,
        Duration::from_secs(60),
    );
    let resp = reqwest::Client::new()
        .get(format!("{}/api/v1/agents", server.base()))
        .bearer_auth(admin)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let (code, log) = server.sigterm_and_wait().await;
    assert_eq!(code, 0, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_set_twice_or_an_unreadable_secret_file_exits_64_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let key = secret_file(dir.path(), "key", SECRET);
    let (code, log) = run_collecting(
        dir.path(),
        &[("SECRET_KEY", SECRET), ("SECRET_KEY_FILE", &key)],
        WAIT,
    )
    .await;
    assert_eq!(code, 64, "{log}");
    assert!(
        log.contains("SECRET_KEY and SECRET_KEY_FILE are both set"),
        "{log}"
    );
    let (code, log) = run_collecting(
        dir.path(),
        &[("REDIS_PASSWORD_FILE", "/run/secrets/missing")],
        WAIT,
    )
    .await;
    assert_eq!(code, 64, "{log}");
    assert!(
        log.contains("REDIS_PASSWORD_FILE") && log.contains("/run/secrets/missing"),
        "{log}"
    );
}

/// A PostgreSQL 15 of the test's own on a free port: TLS on, and only `hostssl`
/// connections with a password (scram-sha-256) or a client certificate let in.
struct PrivatePostgres {
    port: u16,
    data: PathBuf,
    ca: TestCa,
    _dir: tempfile::TempDir,
}

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
const PG_ROLE_PASSWORD: &str = "Vx7#kQ9?mz%2Lr:8";

fn as_postgres(args: &[&str]) -> std::process::Output {
    std::process::Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .args(args)
        .output()
        .expect("runuser runs")
}

impl PrivatePostgres {
    fn start() -> Option<PrivatePostgres> {
        let initdb = format!("{PG_BIN}/initdb");
        if !Path::new(&initdb).exists() || !nix_user_exists("postgres") {
            assert!(
                std::env::var_os("CI").is_none(),
                "PostgreSQL 15 server binaries are required in CI"
            );
            eprintln!("SKIPPED: {initdb} or the postgres user not found");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let ca = TestCa::new(dir.path())?;
        let server = ca.issue("localhost");
        let data = dir.path().join("data");
        let pwfile = dir.path().join("pw");
        std::fs::write(&pwfile, "superuser-unused\n").unwrap();
        chown_to_postgres(dir.path());
        for p in [&server.cert, &server.key, &ca.cert, &pwfile] {
            chown_to_postgres(p);
        }
        std::fs::set_permissions(
            &server.key,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        let out = as_postgres(&[
            &initdb,
            "-D",
            data.to_str().unwrap(),
            "-U",
            "postgres",
            "--auth=scram-sha-256",
            "--pwfile",
            pwfile.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all postgres trust\n\
             hostssl agents_cert app_cert 127.0.0.1/32 cert\n\
             hostssl agents app 127.0.0.1/32 scram-sha-256\n",
        )
        .unwrap();
        let conf = format!(
            "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{sock}'\n\
             ssl = on\nssl_cert_file = '{cert}'\nssl_key_file = '{key}'\nssl_ca_file = '{ca}'\n\
             password_encryption = 'scram-sha-256'\n",
            sock = dir.path().display(),
            cert = server.cert.display(),
            key = server.key.display(),
            ca = ca.cert.display(),
        );
        let mut auto = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .unwrap();
        std::io::Write::write_all(&mut auto, conf.as_bytes()).unwrap();
        let log = dir.path().join("pg.log");
        let out = as_postgres(&[
            &format!("{PG_BIN}/pg_ctl"),
            "-D",
            data.to_str().unwrap(),
            "-l",
            log.to_str().unwrap(),
            "-w",
            "start",
        ]);
        assert!(
            out.status.success(),
            "pg_ctl start: {}{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        // From here on, Drop stops the server even if the set-up below fails.
        let pg = PrivatePostgres {
            port,
            data,
            ca,
            _dir: dir,
        };
        for sql in [
            format!("CREATE ROLE app LOGIN PASSWORD '{PG_ROLE_PASSWORD}'"),
            "CREATE ROLE app_cert LOGIN".to_string(),
            "CREATE DATABASE agents OWNER app".to_string(),
            "CREATE DATABASE agents_cert OWNER app_cert".to_string(),
        ] {
            let out = as_postgres(&[
                "psql",
                "-h",
                pg._dir.path().to_str().unwrap(),
                "-p",
                &port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                &sql,
            ]);
            assert!(
                out.status.success(),
                "psql: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Some(pg)
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        as_postgres(&[
            &format!("{PG_BIN}/pg_ctl"),
            "-D",
            self.data.to_str().unwrap(),
            "-m",
            "immediate",
            "stop",
        ]);
    }
}

fn nix_user_exists(name: &str) -> bool {
    std::process::Command::new("id")
        .arg(name)
        .output()
        .is_ok_and(|o| o.status.success())
}

fn chown_to_postgres(path: &Path) {
    let status = std::process::Command::new("chown")
        .args(["postgres:postgres", path.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_password_and_certificates_come_from_libpq_variables() {
    let Some(pg) = PrivatePostgres::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    // No password in the URL: libpq reads PGPASSWORD, and verifies the server with
    // PGSSLROOTCERT (verify-full: the CA and the host name, localhost).
    let url = format!(
        "postgresql://app@localhost:{}/agents?sslmode=verify-full",
        pg.port
    );
    let ca = pg.ca.cert.to_str().unwrap();
    let base = [
        ("DATABASE_URL", url.as_str()),
        ("SECRET_KEY", SECRET),
        ("SERVER_HOST", "127.0.0.1"),
        ("SERVER_PORT", "0"),
        ("DATA_DIR", data),
    ];
    let mut good = base.to_vec();
    good.extend([("PGPASSWORD", PG_ROLE_PASSWORD), ("PGSSLROOTCERT", ca)]);
    let server = ServerProcess::start(dir.path(), &good).await;
    let ready = reqwest::get(format!("{}/readiness", server.base()))
        .await
        .unwrap();
    assert_eq!(ready.status().as_u16(), 200, "{}", server.log());
    let (code, log) = server.sigterm_and_wait().await;
    assert_eq!(code, 0, "{log}");
    assert_no_secret(&log, &[PG_ROLE_PASSWORD]);

    // A wrong password is refused, and the refusal printed without it.
    let mut wrong = base.to_vec();
    wrong.extend([("PGPASSWORD", "not-the-password"), ("PGSSLROOTCERT", ca)]);
    let (code, log) = run_collecting(dir.path(), &wrong, Duration::from_secs(30)).await;
    assert_ne!(code, 0);
    assert!(log.contains("password authentication failed"), "{log}");
    assert_no_secret(&log, &["not-the-password"]);

    // Without the CA, verify-full cannot check the server: libpq refuses to connect.
    let mut no_ca = base.to_vec();
    no_ca.push(("PGPASSWORD", PG_ROLE_PASSWORD));
    let (code, log) = run_collecting(dir.path(), &no_ca, Duration::from_secs(30)).await;
    assert_ne!(code, 0);
    assert!(log.contains("root certificate"), "{log}");

    // A client certificate instead of a password (pg_hba `cert`): PGSSLCERT and PGSSLKEY.
    let client = pg.ca.issue("app_cert");
    std::fs::set_permissions(
        &client.key,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let url = format!(
        "postgresql://app_cert@localhost:{}/agents_cert?sslmode=verify-full",
        pg.port
    );
    let cert_env = [
        ("DATABASE_URL", url.as_str()),
        ("SECRET_KEY", SECRET),
        ("SERVER_HOST", "127.0.0.1"),
        ("SERVER_PORT", "0"),
        ("DATA_DIR", data),
        ("PGSSLROOTCERT", ca),
        ("PGSSLCERT", client.cert.to_str().unwrap()),
        ("PGSSLKEY", client.key.to_str().unwrap()),
    ];
    let server = ServerProcess::start(dir.path(), &cert_env).await;
    let ready = reqwest::get(format!("{}/readiness", server.base()))
        .await
        .unwrap();
    assert_eq!(ready.status().as_u16(), 200, "{}", server.log());
    server.sigterm_and_wait().await;
}
