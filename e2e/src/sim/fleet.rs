//! A fleet: many agents in this process, started at a bounded rate, observed through one
//! set of counters, stopped together.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::backoff::Backoff;
use super::stats::{Snapshot, Stats};
use super::tokens::TokenSource;

/// Inventories at most this big go over the WebSocket (the server's default message limit
/// is 64 KiB); bigger ones over HTTP, as `docs/protocol.md` says.
pub const WS_INVENTORY_MAX: usize = 60 * 1024;

/// A server (replica) the agents may connect to.
#[derive(Clone, Debug)]
pub struct Server {
    /// `http://host:port`, for the REST API.
    pub base: String,
    /// Resolved once: agents connect without name lookups.
    pub addr: SocketAddr,
}

impl Server {
    /// Parses `http://host:port` (or `ws://…`, or `host:port`) and resolves it.
    pub async fn resolve(url: &str) -> Result<Server, String> {
        let authority = url
            .trim_end_matches('/')
            .split_once("://")
            .map_or(url, |(_, rest)| rest);
        if authority.contains('/') {
            return Err(format!(
                "server `{url}`: give scheme://host:port without a path"
            ));
        }
        let addr = tokio::net::lookup_host(authority)
            .await
            .map_err(|e| format!("server `{url}`: {e}"))?
            .next()
            .ok_or_else(|| format!("server `{url}`: no address"))?;
        Ok(Server {
            base: format!("http://{authority}"),
            addr,
        })
    }
}

/// What the agents of a fleet do.
#[derive(Clone, Debug)]
pub struct FleetConfig {
    pub servers: Vec<Server>,
    /// Client ids are `{prefix}-{first + i:06}`.
    pub prefix: String,
    pub first: u64,
    pub count: u32,
    /// Every agent starts on this server (index into `servers`); otherwise they are
    /// spread round-robin. Either way an agent moves to the next server when one refuses.
    pub start_on: Option<usize>,
    /// Source addresses, used round-robin; empty: the system chooses.
    pub sources: Vec<IpAddr>,
    /// New agents per second while the fleet starts (0: all at once). Reconnections are
    /// paced by the backoff instead.
    pub rate: u32,
    /// Each agent sends a `heartbeat` this often (zero: never; the server's pings keep
    /// the connection alive by themselves). Changeable while running.
    pub heartbeat: Duration,
    /// Churn mode: each agent closes its connection after this long and reconnects after
    /// `churn_pause`.
    pub hold: Option<Duration>,
    pub churn_pause: Duration,
    /// Inventory size sent once per agent after its first `hello` (0: none).
    pub inventory_bytes: usize,
    pub backoff: Backoff,
    /// After a 1012 close (restart, rebalancing) agents wait a random delay up to this.
    pub restart_delay: Duration,
    /// tungstenite read buffer per agent.
    pub read_buffer: usize,
    /// Bound on TCP connect plus the WebSocket handshake plus `welcome`.
    pub connect_timeout: Duration,
}

impl FleetConfig {
    pub fn client_id(&self, index: u32) -> String {
        format!("{}-{:06}", self.prefix, self.first + u64::from(index))
    }
}

/// A command as an agent received it, for latency measurements in-process.
#[derive(Debug)]
pub struct Receipt {
    pub agent: u32,
    pub command_id: String,
    pub at: Instant,
}

impl Receipt {
    /// The receipt as `agent-sim --receipts` prints it, timed on the machine-wide clock.
    pub fn line(&self) -> ReceiptLine {
        let age = self.at.elapsed().as_nanos() as u64;
        ReceiptLine {
            command_id: self.command_id.clone(),
            received_ns: monotonic_ns().saturating_sub(age),
        }
    }
}

/// One received command, as one JSON line on `agent-sim --receipts`'s stdout:
/// `{"command_id": "…", "received_ns": 123}`. Several simulator processes and the
/// benchmark that reads them share the clock ([`monotonic_ns`]), so one process can time
/// a job from its POST to every agent's receipt.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiptLine {
    pub command_id: String,
    /// [`monotonic_ns`] when the agent had the command.
    pub received_ns: u64,
}

/// `CLOCK_MONOTONIC` in nanoseconds: the same clock in every process on this machine
/// (and the one `Instant` reads on Linux).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub(crate) enum Inventory {
    WebSocket(Utf8Bytes),
    Http(Bytes),
}

/// What every agent task shares: configuration, counters, the stop signal.
pub(crate) struct Shared {
    pub cfg: FleetConfig,
    pub tokens: TokenSource,
    pub stats: Stats,
    pub stop: CancellationToken,
    pub http: reqwest::Client,
    pub inventory: Option<Inventory>,
    pub receipts: Option<mpsc::UnboundedSender<Receipt>>,
    pub heartbeat: watch::Sender<Duration>,
    pub ws_config: WebSocketConfig,
}

pub struct Fleet {
    shared: Arc<Shared>,
    tasks: TaskTracker,
}

impl Fleet {
    /// Starts the fleet's agents at `cfg.rate` per second. `receipts`, when given, gets
    /// every command as it arrives.
    pub fn start(
        cfg: FleetConfig,
        tokens: TokenSource,
        receipts: Option<mpsc::UnboundedSender<Receipt>>,
    ) -> Fleet {
        let inventory = match cfg.inventory_bytes {
            0 => None,
            n if n <= WS_INVENTORY_MAX => {
                let doc = super::inventory::document(n);
                let data = serde_json::from_slice::<Box<serde_json::value::RawValue>>(&doc)
                    .expect("the generated inventory is JSON");
                let text = agent_protocol::AgentMessage::Inventory { data }.to_json();
                Some(Inventory::WebSocket(Utf8Bytes::from(text)))
            }
            n => Some(Inventory::Http(super::inventory::document(n))),
        };
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(cfg.read_buffer)
            .write_buffer_size(0)
            .max_write_buffer_size(1024 * 1024)
            .max_message_size(Some(1024 * 1024))
            .max_frame_size(Some(1024 * 1024));
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap_or_default();
        let (heartbeat, _) = watch::channel(cfg.heartbeat);
        let shared = Arc::new(Shared {
            stats: Stats::new(cfg.count as usize, cfg.servers.len()),
            cfg,
            tokens,
            stop: CancellationToken::new(),
            http,
            inventory,
            receipts,
            heartbeat,
            ws_config,
        });
        let tasks = TaskTracker::new();
        let (s, t) = (shared.clone(), tasks.clone());
        tasks.spawn(async move { ramp(s, t).await });
        Fleet { shared, tasks }
    }

    pub fn snapshot(&self) -> Snapshot {
        self.shared.stats.snapshot()
    }

    /// Changes how often agents send `heartbeat` (zero: never); each agent picks a random
    /// phase so that the fleet's heartbeats are spread evenly.
    pub fn set_heartbeat(&self, every: Duration) {
        self.shared.heartbeat.send_replace(every);
    }

    /// Closes every connection (1000) and waits up to `grace` for the agents to finish.
    /// Returns whether they all did.
    pub async fn stop(&self, grace: Duration) -> bool {
        self.shared.stop.cancel();
        self.tasks.close();
        tokio::time::timeout(grace, self.tasks.wait()).await.is_ok()
    }
}

/// Starts the agents, `rate` per second, in 10 ms steps.
async fn ramp(shared: Arc<Shared>, tasks: TaskTracker) {
    let count = shared.cfg.count;
    let rate = shared.cfg.rate;
    let start = tokio::time::Instant::now();
    let mut started = 0u32;
    while started < count {
        let due = if rate == 0 {
            count
        } else {
            let elapsed = start.elapsed().as_secs_f64();
            ((elapsed * f64::from(rate)) as u32 + 1).min(count)
        };
        while started < due {
            let s = shared.clone();
            let index = started;
            tasks.spawn(async move { super::agent::run(s, index).await });
            shared.stats.agent_started();
            started += 1;
        }
        tokio::select! {
            _ = shared.stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(10)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An idle agent costs its task (this future) plus its socket: keep the task small.
    #[tokio::test]
    async fn an_agent_task_stays_small() {
        let cfg = FleetConfig {
            servers: vec![Server {
                base: "http://127.0.0.1:9".into(),
                addr: "127.0.0.1:9".parse().unwrap(),
            }],
            prefix: "size".into(),
            first: 0,
            count: 0,
            start_on: None,
            sources: Vec::new(),
            rate: 0,
            heartbeat: Duration::ZERO,
            hold: None,
            churn_pause: Duration::ZERO,
            inventory_bytes: 0,
            backoff: super::super::backoff::Backoff {
                base: Duration::from_secs(1),
                cap: Duration::from_secs(1),
            },
            restart_delay: Duration::ZERO,
            read_buffer: 4096,
            connect_timeout: Duration::from_secs(1),
        };
        let tokens = TokenSource::local(&"k".repeat(32), "HS256", Duration::from_secs(60)).unwrap();
        let fleet = Fleet::start(cfg, tokens, None);
        let task = super::super::agent::run(fleet.shared.clone(), 0);
        let bytes = std::mem::size_of_val(&task);
        eprintln!("agent task: {bytes} bytes");
        drop(task);
        assert!(bytes < 4096, "an agent task takes {bytes} bytes");
    }
}
