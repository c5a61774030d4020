//! Threads that take queued work in batches: the group-commit writers (`writer.rs`) and
//! the group readers (`reader.rs`).
//!
//! A thread takes the first job to arrive, then whatever else is queued (at most a
//! bound, and no waiting when the queue is empty, so an idle replica adds no latency),
//! and hands the batch to its apply function, which answers every job. One thread
//! collects at a time; the others apply their batches meanwhile.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use super::DbPool;

/// The way to a group of threads, and how many jobs they have yet to answer.
pub(crate) struct Queue<J> {
    /// Where jobs are queued.
    jobs: mpsc::Sender<J>,
    /// Jobs queued and not yet answered: `Store::settle` waits for none (a thread in the
    /// middle of a batch may be inside libpq and OpenSSL).
    in_flight: Arc<AtomicUsize>,
}

impl<J> Clone for Queue<J> {
    fn clone(&self) -> Self {
        Queue {
            jobs: self.jobs.clone(),
            in_flight: self.in_flight.clone(),
        }
    }
}

/// How a group of threads takes and applies its batches.
pub(crate) struct Plan<J> {
    /// Thread names are `{name}-{n}`.
    pub(crate) name: &'static str,
    pub(crate) threads: usize,
    /// Most jobs in one batch.
    pub(crate) max_batch: usize,
    /// Puts a batch in the order it is applied in.
    pub(crate) order: fn(&mut [J]),
    /// Applies a batch and answers each of its jobs.
    pub(crate) apply: fn(&DbPool, Vec<J>),
}

impl<J: Send + 'static> Queue<J> {
    /// Starts the threads of `plan`. They stop when every sender is gone (the last
    /// `Store` dropped), after the batch each is applying.
    pub(crate) fn spawn(pool: Arc<DbPool>, plan: Plan<J>) -> Self {
        let in_flight = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::channel::<J>();
        let rx = Arc::new(Mutex::new(rx));
        for n in 0..plan.threads {
            let (pool, rx, in_flight) = (pool.clone(), rx.clone(), in_flight.clone());
            let (max_batch, order, apply) = (plan.max_batch, plan.order, plan.apply);
            let spawned = std::thread::Builder::new()
                .name(format!("{}-{n}", plan.name))
                .spawn(move || {
                    while let Some(mut batch) = next_batch(&rx, max_batch) {
                        let len = batch.len();
                        order(&mut batch);
                        apply(&pool, batch);
                        in_flight.fetch_sub(len, Ordering::SeqCst);
                    }
                });
            if let Err(e) = spawned {
                // Without any thread every job fails as a task error; say why.
                tracing::error!(error = %e, thread = plan.name, "could not start a store thread");
            }
        }
        Queue {
            jobs: tx,
            in_flight,
        }
    }

    /// Queues `job`; false if no thread is left to take it.
    pub(crate) fn send(&self, job: J) -> bool {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        if self.jobs.send(job).is_err() {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// Whether every queued job has been answered.
    pub(crate) fn idle(&self) -> bool {
        self.in_flight.load(Ordering::SeqCst) == 0
    }
}

/// The next batch: the first job to arrive, then whatever else is queued (at most
/// `max`); `None` once every sender is gone. One thread collects at a time.
fn next_batch<J>(rx: &Mutex<mpsc::Receiver<J>>, max: usize) -> Option<Vec<J>> {
    let rx = rx.lock().unwrap_or_else(|p| p.into_inner());
    let mut batch = vec![rx.recv().ok()?];
    while batch.len() < max {
        match rx.try_recv() {
            Ok(job) => batch.push(job),
            Err(_) => break,
        }
    }
    Some(batch)
}
