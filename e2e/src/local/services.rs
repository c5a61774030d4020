//! The local target's backing services: a redis-server the harness starts, and a fresh
//! database on the local PostgreSQL.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use super::process::{free_port, spawn_logged, tail};
use crate::wait::{self, Check};

/// A redis-server on a free loopback port, without persistence.
pub struct Redis {
    pub port: u16,
    _child: Child,
}

impl Redis {
    pub async fn start(bin: &str, dir: &Path) -> Result<Redis> {
        std::fs::create_dir_all(dir)?;
        let port = free_port()?;
        let mut command = Command::new(bin);
        command
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir);
        let log = dir.join("redis.log");
        let (child, _) = spawn_logged(command, &log).with_context(|| {
            format!("starting {bin} (install it with `apt-get install -y redis-server`)")
        })?;
        wait::until(
            "redis-server to answer PING",
            Duration::from_secs(15),
            Duration::from_millis(50),
            || async {
                Ok(match ping(port).await {
                    Ok(()) => Check::Ready(()),
                    Err(e) => Check::Pending(e.to_string()),
                })
            },
        )
        .await
        .with_context(|| format!("redis log:\n{}", tail(&log, 20)))?;
        Ok(Redis {
            port,
            _child: child,
        })
    }
}

/// One inline PING; `+PONG` means Redis serves.
async fn ping(port: u16) -> Result<()> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
    stream.write_all(b"PING\r\n").await?;
    let mut line = String::new();
    BufReader::new(&mut stream).read_line(&mut line).await?;
    if line.trim() != "+PONG" {
        bail!("answered {line:?}");
    }
    Ok(())
}

/// A database created for this run and dropped at its end.
pub struct Database {
    admin_url: String,
    pub name: String,
    /// DATABASE_URL for the servers.
    pub url: String,
}

impl Database {
    /// Creates `e2e_<random>` through `admin_url` (a superuser connection URL).
    pub async fn create(admin_url: &str) -> Result<Database> {
        let client = connect(admin_url).await?;
        let name = format!("e2e_{}", uuid::Uuid::new_v4().simple());
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .with_context(|| format!("creating database {name}"))?;
        Ok(Database {
            url: with_database(admin_url, &name)?,
            admin_url: admin_url.to_string(),
            name,
        })
    }

    pub async fn drop_database(self) -> Result<()> {
        let client = connect(&self.admin_url).await?;
        client
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await
            .with_context(|| format!("dropping database {}", self.name))?;
        Ok(())
    }
}

async fn connect(url: &str) -> Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .with_context(|| {
            format!(
                "connecting to PostgreSQL at {} (set --postgres-url or TEST_POSTGRES_URL)",
                redact(url)
            )
        })?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// `admin_url` with its database path replaced by `name` (query string kept).
fn with_database(admin_url: &str, name: &str) -> Result<String> {
    let (base, query) = match admin_url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (admin_url, None),
    };
    let rest = base
        .split_once("://")
        .map(|(_, r)| r)
        .context("PostgreSQL URL without a scheme")?;
    let base = if rest.contains('/') {
        base.rsplit_once('/').map(|(b, _)| b).unwrap_or(base)
    } else {
        base
    };
    Ok(match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    })
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, rest)), Some(_)) => {
            let (userinfo, host) = rest.rsplit_once('@').unwrap_or(("", rest));
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}@{host}")
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_urls_keep_everything_but_the_path() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/postgres", "e2e_x").unwrap(),
            "postgres://postgres@127.0.0.1:5432/e2e_x"
        );
        assert_eq!(
            with_database("postgresql://u:p@h/db?sslmode=disable", "e2e_x").unwrap(),
            "postgresql://u:p@h/e2e_x?sslmode=disable"
        );
        assert_eq!(
            with_database("postgres://h:5432", "e2e_x").unwrap(),
            "postgres://h:5432/e2e_x"
        );
    }

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u@h/db");
    }
}
