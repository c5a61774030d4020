//! Whether the database answers at all, told apart from a database that is only slow.
//!
//! A stopped, hung or cut-off PostgreSQL and a busy one look the same to a caller that
//! waits for its query: nothing comes back yet. Waiting out DATABASE_STATEMENT_TIMEOUT
//! would report an outage only after that long, and failing every query that takes longer
//! than a short bound would fail slow but healthy ones under load. So a call that has had
//! no answer for a quarter of DATABASE_OUTAGE_TIMEOUT asks for a probe: `SELECT 1` on a
//! connection of the probe's own (outside the pool, which the stuck calls may hold). A
//! database that answers the probe is slow, and the call goes on waiting (up to the
//! statement timeout); one that does not answer within the rest of DATABASE_OUTAGE_TIMEOUT
//! is down: every waiting call fails at once (`StoreError::NotResponding`: a 503, or
//! `store_unavailable` to an agent), and so does every new call until a probe answers
//! again. While down, the probe retries every [`RETRY`]; the first answer ends the outage.
//!
//! SQLite is never probed: a local file does not hang the way a server or a network does,
//! and its one writer's lock is a slow database, not a lost one.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::{Connection, PgConnection};
use tokio::sync::watch;

use super::StoreError;
use crate::redact::redact;

/// How long a probe that failed at once (connection refused or broken) waits before the
/// next, while the database is down.
const RETRY: Duration = Duration::from_millis(250);

/// DATABASE_OUTAGE_TIMEOUT's default: a database that does not answer `SELECT 1` within
/// 1.5 s of a call waiting 0.5 s is down. `SELECT 1` on a connection of its own touches
/// neither a table nor the disk; it takes milliseconds even on a loaded two-core machine.
pub const DEFAULT_OUTAGE_TIMEOUT: Duration = Duration::from_secs(2);

/// Cheap-to-clone handle on the database's liveness (see the module's comment).
#[derive(Clone)]
pub(crate) struct Liveness {
    inner: Arc<Inner>,
}

struct Inner {
    /// The PostgreSQL URL the probe connects to; `None` for SQLite (never probed).
    url: Option<String>,
    /// DATABASE_OUTAGE_TIMEOUT: from a call's start to its failure when the database is
    /// down.
    bound: Duration,
    /// `false` from a probe that failed or did not answer in time until one answers.
    up: watch::Sender<bool>,
    /// A probe is running: calls that ask for one meanwhile wait for its verdict.
    probing: AtomicBool,
    /// The probe's own connection, kept between probes.
    connection: Mutex<Option<PgConnection>>,
}

impl Liveness {
    /// Probes PostgreSQL at `url` (`None`: SQLite, never probed); `bound` is
    /// DATABASE_OUTAGE_TIMEOUT.
    pub(crate) fn new(url: Option<String>, bound: Duration) -> Self {
        Liveness {
            inner: Arc::new(Inner {
                url,
                bound,
                up: watch::channel(true).0,
                probing: AtomicBool::new(false),
                connection: Mutex::new(None),
            }),
        }
    }

    /// The error of a call made while the database is down, if it is.
    pub(crate) fn refuse(&self) -> Result<(), StoreError> {
        if *self.inner.up.borrow() {
            Ok(())
        } else {
            Err(StoreError::NotResponding(self.inner.bound))
        }
    }

    /// Waits for `work` (a store call already started), at most `answer_within`; after a
    /// quarter of DATABASE_OUTAGE_TIMEOUT without an answer it asks for a probe, and it
    /// fails as soon as a probe finds the database down.
    pub(crate) async fn wait<T>(
        &self,
        work: impl Future<Output = Result<T, StoreError>>,
        answer_within: Duration,
    ) -> Result<T, StoreError> {
        let mut up = self.inner.up.subscribe();
        if !*up.borrow_and_update() {
            return Err(StoreError::NotResponding(self.inner.bound));
        }
        let mut work = std::pin::pin!(work);
        let deadline = tokio::time::sleep(answer_within);
        let suspect = tokio::time::sleep(self.inner.bound / 4);
        tokio::pin!(deadline, suspect);
        let mut probed = false;
        loop {
            tokio::select! {
                done = &mut work => {
                    if let Err(e) = &done
                        && matches!(e, StoreError::Unavailable(_) | StoreError::ConnectionLost(_))
                    {
                        // The next calls need not wait to learn it.
                        self.probe();
                    }
                    return done;
                }
                () = &mut deadline => return Err(StoreError::NoAnswer(answer_within)),
                () = &mut suspect, if !probed => {
                    probed = true;
                    self.probe();
                }
                changed = up.changed() => {
                    if changed.is_ok() && !*up.borrow_and_update() {
                        return Err(StoreError::NotResponding(self.inner.bound));
                    }
                }
            }
        }
    }

    /// Starts a probe unless one is running (or the database is SQLite).
    fn probe(&self) {
        if self.inner.url.is_none() || self.inner.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let patience = inner.bound - inner.bound / 4;
            loop {
                let mut task = tokio::task::spawn_blocking({
                    let inner = inner.clone();
                    move || inner.select_one()
                });
                let answer = match tokio::time::timeout(patience, &mut task).await {
                    Ok(answer) => answer,
                    Err(_) => {
                        inner.set(false, "no answer to SELECT 1 in time");
                        // The verdict stays "down" until this probe answers.
                        task.await
                    }
                };
                match answer {
                    Ok(Ok(())) => {
                        inner.set(true, "");
                        break;
                    }
                    Ok(Err(e)) => inner.set(false, &e),
                    Err(_) => inner.set(false, "the probe's task failed"),
                }
                tokio::time::sleep(RETRY).await;
            }
            inner.probing.store(false, Ordering::Release);
        });
    }
}

impl Inner {
    /// `SELECT 1` on the probe's connection, opening a new one when there is none or the
    /// old one broke (after a restart of the database, for one). Blocking.
    fn select_one(&self) -> Result<(), String> {
        let mut slot = self
            .connection
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(conn) = slot.as_mut() {
            if conn.batch_execute("SELECT 1").is_ok() {
                return Ok(());
            }
            *slot = None;
        }
        let url = self.url.as_deref().unwrap_or_default();
        let mut conn =
            PgConnection::establish(url).map_err(|e| redact(&e.to_string()).into_owned())?;
        conn.batch_execute("SELECT 1")
            .map_err(|e| redact(&e.to_string()).into_owned())?;
        *slot = Some(conn);
        Ok(())
    }

    /// Records the verdict, logging each change once.
    fn set(&self, up: bool, why: &str) {
        let was = self.up.send_replace(up);
        match (was, up) {
            (true, false) => tracing::warn!(
                reason = why,
                "the database does not answer: store calls fail at once until it does"
            ),
            (false, true) => tracing::info!("the database answers again"),
            _ => {}
        }
    }
}
