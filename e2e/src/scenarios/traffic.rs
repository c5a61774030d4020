//! Traffic the scenarios run while they disturb the deployment: a steady flow of
//! commands whose fate is tracked one by one, and API read load.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use rand::Rng;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::agent::Fleet;
use crate::api::Api;
use crate::report::Latencies;
use crate::wait::{self, Check};

/// What a command must come back with.
#[derive(Clone, Debug)]
pub enum Expect {
    /// `echo`: `output.echo` equals these args.
    Echo(Value),
    /// `sleep`: `output.slept_ms` equals this.
    Slept(u64),
}

/// One accepted command (202) and who it is for.
#[derive(Clone, Debug)]
pub struct Entry {
    pub id: String,
    /// Index of the agent in the fleet.
    pub agent: usize,
    pub submitted_at: Instant,
    pub expect: Expect,
}

/// Every command a scenario submitted, in order.
#[derive(Default)]
pub struct Ledger(Mutex<Vec<Entry>>);

impl Ledger {
    pub fn push(&self, entry: Entry) {
        self.0.lock().expect("ledger lock").push(entry);
    }

    pub fn entries(&self) -> Vec<Entry> {
        self.0.lock().expect("ledger lock").clone()
    }

    pub fn len(&self) -> usize {
        self.0.lock().expect("ledger lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Submits `name` with `args` for `agent` and records it.
pub async fn submit(
    api: &Api,
    fleet: &Fleet,
    ledger: &Ledger,
    agent: usize,
    name: &str,
    args: Value,
    expect: Expect,
) -> Result<(), String> {
    let client_id = fleet.agents()[agent].client_id().to_string();
    let submitted_at = Instant::now();
    let id = api.submit(&client_id, name, args).await?;
    ledger.push(Entry {
        id,
        agent,
        submitted_at,
        expect,
    });
    Ok(())
}

/// Commands acknowledged so far (their results are stored).
pub fn acked(fleet: &Fleet, entries: &[Entry]) -> usize {
    entries
        .iter()
        .filter(|e| fleet.agents()[e.agent].with_stats(|s| s.acked.contains_key(&e.id)))
        .count()
}

/// A steady stream of `echo` commands, round-robin over the fleet, submitted through the
/// ingress. Runs until stopped.
pub struct CommandFlow {
    stop: CancellationToken,
    task: JoinHandle<()>,
    pub ledger: Arc<Ledger>,
}

impl CommandFlow {
    pub fn start(api: Api, fleet: Arc<Fleet>, every: Duration) -> CommandFlow {
        let stop = CancellationToken::new();
        let ledger = Arc::new(Ledger::default());
        let task = {
            let (stop, ledger) = (stop.clone(), ledger.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut seq: u64 = 0;
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    let agent = (seq as usize) % fleet.len();
                    let args = json!({"seq": seq});
                    // A failure is already counted by the API client; the flow goes on.
                    let _ = submit(
                        &api,
                        &fleet,
                        &ledger,
                        agent,
                        "echo",
                        args.clone(),
                        Expect::Echo(args),
                    )
                    .await;
                    seq += 1;
                }
            })
        };
        CommandFlow { stop, task, ledger }
    }

    /// Waits until `n` more commands than now have been acknowledged: proof that
    /// commands flow end to end at this moment.
    pub async fn wait_flowing(&self, fleet: &Fleet, n: usize, bound: Duration) -> Result<()> {
        let base = acked(fleet, &self.ledger.entries());
        wait::until(
            &format!("{n} commands to round-trip"),
            bound,
            Duration::from_millis(100),
            || async {
                let now = acked(fleet, &self.ledger.entries());
                Ok(if now >= base + n {
                    Check::Ready(())
                } else {
                    Check::Pending(format!("{} of {n} acknowledged", now - base))
                })
            },
        )
        .await
    }

    pub async fn stop(self) -> Arc<Ledger> {
        self.stop.cancel();
        let _ = self.task.await;
        self.ledger
    }
}

/// API read traffic through the ingress: agent lists, single agents, command histories
/// and health checks, from `workers` concurrent clients.
pub struct ApiLoad {
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl ApiLoad {
    /// `pause` between requests of one worker; `heavy` asks for large agent lists (CPU
    /// for the HPA to see).
    pub fn start(
        api: Api,
        ids: Arc<Vec<String>>,
        workers: usize,
        pause: Duration,
        heavy: bool,
    ) -> ApiLoad {
        let stop = CancellationToken::new();
        let tasks = (0..workers)
            .map(|_| {
                let (api, ids, stop) = (api.clone(), ids.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut n: usize = rand::rng().random_range(0..1000);
                    loop {
                        let path = match (heavy, n % 4) {
                            (true, _) => "/api/v1/agents?limit=1000".to_string(),
                            (false, 0) => "/api/v1/agents?limit=50".to_string(),
                            (false, 1) => format!("/api/v1/agents/{}", ids[n % ids.len()]),
                            (false, 2) => {
                                format!("/api/v1/agents/{}/commands?limit=5", ids[n % ids.len()])
                            }
                            (false, _) => "/health".to_string(),
                        };
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = api.get(&path) => {}
                        }
                        n += 1;
                        if !pause.is_zero() {
                            tokio::select! {
                                _ = stop.cancelled() => return,
                                _ = tokio::time::sleep(pause) => {}
                            }
                        }
                    }
                })
            })
            .collect();
        ApiLoad { stop, tasks }
    }

    pub async fn stop(self) {
        self.stop.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// The fate of every command in a ledger.
pub struct Verification {
    pub total: usize,
    /// Each lost or wrong command, in words.
    pub lost: Vec<String>,
    /// Submission to first arrival at the agent.
    pub delivery: Latencies,
    /// The last acknowledgement.
    pub last_ack: Option<Instant>,
}

/// Waits (at most `bound`) until every command in `entries` is acknowledged to its agent,
/// then checks each one's stored status and output through the API.
pub async fn verify(fleet: &Fleet, api: &Api, entries: &[Entry], bound: Duration) -> Verification {
    let waited = wait::until(
        &format!("results of {} commands", entries.len()),
        bound,
        Duration::from_millis(100),
        || async {
            let done = acked(fleet, entries);
            Ok(if done == entries.len() {
                Check::Ready(())
            } else {
                Check::Pending(format!("{done}/{} acknowledged", entries.len()))
            })
        },
    )
    .await;
    if let Err(e) = waited {
        println!("      {e}");
    }

    let mut lost = Vec::new();
    let mut delivery = Vec::new();
    let mut last_ack: Option<Instant> = None;
    for entry in entries {
        let agent = &fleet.agents()[entry.agent];
        let (received, acked) = agent.with_stats(|s| {
            (
                s.received.get(&entry.id).copied(),
                s.acked.get(&entry.id).copied(),
            )
        });
        let Some(acked) = acked else {
            lost.push(format!(
                "{} for {}: {}",
                entry.id,
                agent.client_id(),
                if received.is_some() {
                    "received, result never acknowledged"
                } else {
                    "never received"
                }
            ));
            continue;
        };
        last_ack = Some(last_ack.map_or(acked, |l| l.max(acked)));
        if let Some(received) = received {
            delivery.push(received.saturating_duration_since(entry.submitted_at));
        }
        match api.command(&entry.id).await {
            Err(e) => lost.push(format!("{}: status unreadable: {e}", entry.id)),
            Ok(stored) => {
                let output_ok = match &entry.expect {
                    Expect::Echo(args) => stored["output"]["echo"] == *args,
                    Expect::Slept(ms) => stored["output"]["slept_ms"] == json!(ms),
                };
                if stored["status"] != "succeeded" || !output_ok {
                    lost.push(format!(
                        "{}: stored as {} with output {}",
                        entry.id, stored["status"], stored["output"]
                    ));
                }
            }
        }
    }
    Verification {
        total: entries.len(),
        lost,
        delivery: Latencies::new(delivery),
        last_ack,
    }
}
