//! The per-replica pacer: releases held job commands to the agents connected to this
//! replica, within each job's bounds, and wakes their sessions.
//!
//! Every replica runs one. A turn on a job happens in one store transaction that first
//! writes the job's row (`Store::pace_job`), so the turns of all replicas on the same job
//! are serialised and every bound holds cluster-wide; each replica releases only commands
//! of agents connected to it, so it wakes them with `Hub::wake`, without the bus. Like
//! any command, a released one is read from the store by the session: a lost wake-up
//! costs latency (the sweep wakes sessions with sendable commands), never a command.
//! Offline agents keep their command held until they connect here or elsewhere (the
//! pacer of that replica releases it) or until its TTL expires it (the sweep).
//!
//! A job's first batch is released by the transaction that stores it (`Store::create_job`
//! takes the first turn for every replica at once), so the pacer's first turn on a job
//! wakes the agents here whose command that released (`Store::released_here`), and it
//! wakes those still undelivered again every [`REWAKE`]: a session that could not read
//! its command (no database connection within the pool's timeout, under load) would
//! otherwise wait for the sweep.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use crate::hub::Hub;
use crate::metrics::{JobEvent, Metrics};
use crate::store::{Pace, Store, StoreError, now_ms};

/// A turn happens at least this often while jobs run (rate pacing, agents connecting).
pub(crate) const TICK: Duration = Duration::from_millis(250);
/// Turns prompted by changes (results freeing slots, a new job) are at least this far
/// apart, so that a burst of results costs one turn.
pub(crate) const MIN_GAP: Duration = Duration::from_millis(50);
/// Most commands released by one statement.
pub(crate) const MAX_BATCH: i64 = 20_000;
/// Agents here with a released, undelivered command of a running job are woken again
/// this often: far above a delivery's time, far below COMMAND_SWEEP_INTERVAL's default.
pub(crate) const REWAKE: Duration = Duration::from_secs(5);

/// Built from the narrow handles it uses; spawned by the application's assembly code:
/// `tasks.spawn(Pacer::new(store, hub, metrics, pod_id).run(stop))`.
pub struct Pacer {
    /// Where the jobs and their commands are, and where turns are decided.
    store: Store,
    /// This replica's sessions, woken when their command is released.
    hub: Hub,
    metrics: Arc<Metrics>,
    /// This replica's POD_ID: it releases commands of agents connected here.
    pod: String,
    /// Running jobs whose released commands this replica has woken its agents for, and
    /// when it last did.
    woken: Mutex<HashMap<String, Instant>>,
}

impl Pacer {
    /// A pacer for the replica `pod` (its POD_ID): releases commands of agents connected to
    /// it, wakes their sessions through `hub`, and counts releases, brake trips and completed
    /// jobs in `metrics`.
    pub fn new(store: Store, hub: Hub, metrics: Arc<Metrics>, pod: String) -> Self {
        Pacer {
            store,
            hub,
            metrics,
            pod,
            woken: Mutex::default(),
        }
    }

    /// Takes turns until `stop`: every [`TICK`], and sooner (at most every [`MIN_GAP`])
    /// when the store announces a change (a new or resumed job, a result, an agent
    /// connecting), here or on another replica.
    pub async fn run(self, stop: CancellationToken) {
        let mut changes = self.store.subscribe();
        loop {
            if let Err(e) = self.turn().await {
                self.metrics.store_errors.inc();
                tracing::error!(error = &e as &dyn std::error::Error, "job pacing failed");
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(TICK) => {}
                received = changes.recv() => {
                    if matches!(received, Err(RecvError::Closed)) {
                        return;
                    }
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(MIN_GAP) => {}
                    }
                    // Everything announced meanwhile is covered by the coming turn.
                    changes = changes.resubscribe();
                }
            }
        }
    }

    /// One turn over every running job; returns how many commands it released (those a
    /// job's creation released are woken for, not counted).
    pub async fn turn(&self) -> Result<usize, StoreError> {
        let mut total = 0;
        let running = self.store.running_jobs().await?;
        // Jobs to wake agents for: new here, or last woken for REWAKE ago.
        let due: Vec<String> = {
            let mut woken = self.woken.lock().unwrap_or_else(|p| p.into_inner());
            woken.retain(|job, _| running.contains(job));
            running
                .iter()
                .filter(|job| woken.get(*job).is_none_or(|at| at.elapsed() >= REWAKE))
                .cloned()
                .collect()
        };
        for job in running {
            if due.contains(&job) {
                let agents = self
                    .store
                    .released_here(job.clone(), self.pod.clone())
                    .await?;
                for agent in &agents {
                    self.hub.wake(agent);
                }
                self.woken
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(job.clone(), Instant::now());
            }
            loop {
                let pace = self
                    .store
                    .pace_job(job.clone(), self.pod.clone(), now_ms(), MAX_BATCH)
                    .await?;
                match pace {
                    Pace::Released(agents) => {
                        let n = agents.len();
                        for agent in &agents {
                            self.hub.wake(agent);
                        }
                        total += n;
                        self.metrics.job_commands_released.inc_by(n as u64);
                        if (n as i64) < MAX_BATCH {
                            break;
                        }
                    }
                    Pace::Braked(reason) => {
                        self.metrics.job(JobEvent::Braked);
                        tracing::warn!(job = %job, %reason, "job paused by its failure brake");
                        break;
                    }
                    Pace::Completed => {
                        self.metrics.job(JobEvent::Completed);
                        tracing::info!(job = %job, "job completed");
                        break;
                    }
                    Pace::Idle => break,
                }
            }
        }
        Ok(total)
    }
}
