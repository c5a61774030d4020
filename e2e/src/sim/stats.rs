//! Fleet-wide counters (atomics shared by every agent) and the [`Snapshot`] that
//! `agent-sim` prints as one JSON line per progress interval and `bench` reads back.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// HTTP statuses counted separately when an upgrade is refused; others count as 0.
const HTTP_CODES: [u16; 9] = [400, 401, 403, 404, 429, 500, 502, 503, 504];
/// Close codes counted separately; others count as 0.
const CLOSE_CODES: [u16; 12] = [
    1000, 1001, 1006, 1009, 1011, 1012, 4000, 4001, 4002, 4003, 4008, 1008,
];

/// Why a connection attempt failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectFailure {
    /// Nothing listens (a killed replica).
    Refused,
    /// TCP connect or WebSocket handshake did not finish in time.
    Timeout,
    /// The server answered the upgrade with this HTTP status.
    Status(u16),
    /// Anything else (reset during the handshake, no welcome, token source failed).
    Other,
}

pub struct Stats {
    started: Instant,
    agents: AtomicU64,
    connected: AtomicI64,
    per_server: Box<[AtomicI64]>,
    connects: AtomicU64,
    connects_per_server: Box<[AtomicU64]>,
    connect_failures: AtomicU64,
    refused: AtomicU64,
    timeouts: AtomicU64,
    http: [AtomicU64; HTTP_CODES.len() + 1],
    closes: [AtomicU64; CLOSE_CODES.len() + 1],
    pub drops: AtomicU64,
    pub churn_cycles: AtomicU64,
    pub commands: AtomicU64,
    pub results: AtomicU64,
    pub acks: AtomicU64,
    pub results_resent: AtomicU64,
    pub pings: AtomicU64,
    pub heartbeats: AtomicU64,
    pub heartbeat_acks: AtomicU64,
    pub errors: AtomicU64,
    pub inventories: AtomicU64,
    pub inventory_failures: AtomicU64,
    pub gave_up: AtomicU64,
    /// Per agent: seconds since `started` when the server was last heard from; 0 while
    /// disconnected. Four bytes per agent buys an exact "every connection alive" count.
    last_heard: Box<[AtomicU32]>,
    /// The server's heartbeat interval from the latest `welcome`, in milliseconds.
    heartbeat_ms: AtomicU64,
}

impl Stats {
    pub fn new(agents: usize, servers: usize) -> Self {
        Stats {
            started: Instant::now(),
            agents: AtomicU64::new(0),
            connected: AtomicI64::new(0),
            per_server: (0..servers).map(|_| AtomicI64::new(0)).collect(),
            connects: AtomicU64::new(0),
            connects_per_server: (0..servers).map(|_| AtomicU64::new(0)).collect(),
            connect_failures: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            http: Default::default(),
            closes: Default::default(),
            drops: AtomicU64::new(0),
            churn_cycles: AtomicU64::new(0),
            commands: AtomicU64::new(0),
            results: AtomicU64::new(0),
            acks: AtomicU64::new(0),
            results_resent: AtomicU64::new(0),
            pings: AtomicU64::new(0),
            heartbeats: AtomicU64::new(0),
            heartbeat_acks: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            inventories: AtomicU64::new(0),
            inventory_failures: AtomicU64::new(0),
            gave_up: AtomicU64::new(0),
            last_heard: (0..agents).map(|_| AtomicU32::new(0)).collect(),
            heartbeat_ms: AtomicU64::new(0),
        }
    }

    pub fn started(&self) -> Instant {
        self.started
    }

    pub fn agent_started(&self) {
        self.agents.fetch_add(1, Relaxed);
    }

    /// A `welcome` arrived: the agent is connected to `server`.
    pub fn connected(&self, agent: usize, server: usize, heartbeat_ms: u64) {
        self.connected.fetch_add(1, Relaxed);
        self.per_server[server].fetch_add(1, Relaxed);
        self.connects.fetch_add(1, Relaxed);
        self.connects_per_server[server].fetch_add(1, Relaxed);
        if heartbeat_ms > 0 {
            self.heartbeat_ms.store(heartbeat_ms, Relaxed);
        }
        self.heard(agent);
    }

    pub fn disconnected(&self, agent: usize, server: usize) {
        self.connected.fetch_sub(1, Relaxed);
        self.per_server[server].fetch_sub(1, Relaxed);
        self.last_heard[agent].store(0, Relaxed);
    }

    /// Any frame from the server: the connection is alive.
    pub fn heard(&self, agent: usize) {
        let secs = self.started.elapsed().as_secs() as u32 + 1;
        self.last_heard[agent].store(secs, Relaxed);
    }

    pub fn connect_failed(&self, why: ConnectFailure) {
        self.connect_failures.fetch_add(1, Relaxed);
        match why {
            ConnectFailure::Refused => {
                self.refused.fetch_add(1, Relaxed);
            }
            ConnectFailure::Timeout => {
                self.timeouts.fetch_add(1, Relaxed);
            }
            ConnectFailure::Status(code) => {
                let i = HTTP_CODES
                    .iter()
                    .position(|c| *c == code)
                    .unwrap_or(HTTP_CODES.len());
                self.http[i].fetch_add(1, Relaxed);
            }
            ConnectFailure::Other => {}
        }
    }

    /// The server closed the connection with `code`.
    pub fn closed_by_server(&self, code: u16) {
        let i = CLOSE_CODES
            .iter()
            .position(|c| *c == code)
            .unwrap_or(CLOSE_CODES.len());
        self.closes[i].fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self) -> Snapshot {
        let now = self.started.elapsed();
        // Alive: heard from within one and a half heartbeat intervals (plus the one-second
        // resolution of `last_heard`).
        let hb = self.heartbeat_ms.load(Relaxed);
        let window = if hb == 0 { 60 } else { (hb * 3 / 2) / 1000 + 2 };
        let cutoff = (now.as_secs() + 1).saturating_sub(window) as u32;
        let alive = self
            .last_heard
            .iter()
            .filter(|t| {
                let t = t.load(Relaxed);
                t != 0 && t >= cutoff
            })
            .count() as u64;
        let counted = |codes: &[u16], counters: &[AtomicU64]| {
            let mut map = BTreeMap::new();
            for (i, c) in counters.iter().enumerate() {
                let n = c.load(Relaxed);
                if n > 0 {
                    map.insert(codes.get(i).copied().unwrap_or(0), n);
                }
            }
            map
        };
        Snapshot {
            elapsed_ms: now.as_millis() as u64,
            agents: self.agents.load(Relaxed),
            connected: self.connected.load(Relaxed).max(0) as u64,
            per_server: self
                .per_server
                .iter()
                .map(|c| c.load(Relaxed).max(0) as u64)
                .collect(),
            alive,
            connects: self.connects.load(Relaxed),
            connects_per_server: self
                .connects_per_server
                .iter()
                .map(|c| c.load(Relaxed))
                .collect(),
            connect_failures: self.connect_failures.load(Relaxed),
            refused: self.refused.load(Relaxed),
            timeouts: self.timeouts.load(Relaxed),
            http_status: counted(&HTTP_CODES, &self.http),
            closes: counted(&CLOSE_CODES, &self.closes),
            drops: self.drops.load(Relaxed),
            churn_cycles: self.churn_cycles.load(Relaxed),
            commands: self.commands.load(Relaxed),
            results: self.results.load(Relaxed),
            acks: self.acks.load(Relaxed),
            results_resent: self.results_resent.load(Relaxed),
            pings: self.pings.load(Relaxed),
            heartbeats: self.heartbeats.load(Relaxed),
            heartbeat_acks: self.heartbeat_acks.load(Relaxed),
            errors: self.errors.load(Relaxed),
            inventories: self.inventories.load(Relaxed),
            inventory_failures: self.inventory_failures.load(Relaxed),
            gave_up: self.gave_up.load(Relaxed),
            rss_kib: own_rss_kib(),
            processes: 1,
        }
    }
}

/// What a fleet (or several fleets in several processes, summed) has done so far. Counters
/// are totals since the start; `connected`, `per_server` and `alive` are current.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub elapsed_ms: u64,
    /// Agents started so far (the ramp may still be running).
    pub agents: u64,
    pub connected: u64,
    /// Connected agents per server, in the order the servers were given.
    pub per_server: Vec<u64>,
    /// Connected agents that heard from the server within 1.5 heartbeat intervals.
    pub alive: u64,
    /// Connections that reached `welcome`.
    pub connects: u64,
    pub connects_per_server: Vec<u64>,
    pub connect_failures: u64,
    pub refused: u64,
    pub timeouts: u64,
    /// Upgrades refused, by HTTP status (0: another status).
    pub http_status: BTreeMap<u16, u64>,
    /// Connections the server closed, by close code (0: another code).
    pub closes: BTreeMap<u16, u64>,
    /// Connections lost without a close frame (reset, EOF: a killed server).
    pub drops: u64,
    /// Connections the agents closed themselves after their hold time (churn mode).
    pub churn_cycles: u64,
    pub commands: u64,
    pub results: u64,
    pub acks: u64,
    /// Results sent again after the server answered `store_unavailable`.
    pub results_resent: u64,
    pub pings: u64,
    pub heartbeats: u64,
    pub heartbeat_acks: u64,
    pub errors: u64,
    pub inventories: u64,
    pub inventory_failures: u64,
    /// Agents that stopped reconnecting (closed with 4001 or 4002, as the protocol says).
    pub gave_up: u64,
    /// Resident memory of the simulator process(es).
    pub rss_kib: u64,
    pub processes: u64,
}

impl Snapshot {
    /// Adds another process's snapshot (for a fleet spread over several processes).
    pub fn add(&mut self, o: &Snapshot) {
        self.elapsed_ms = self.elapsed_ms.max(o.elapsed_ms);
        let sum_vec = |a: &mut Vec<u64>, b: &[u64]| {
            if a.len() < b.len() {
                a.resize(b.len(), 0);
            }
            for (x, y) in a.iter_mut().zip(b) {
                *x += y;
            }
        };
        let sum_map = |a: &mut BTreeMap<u16, u64>, b: &BTreeMap<u16, u64>| {
            for (k, v) in b {
                *a.entry(*k).or_default() += v;
            }
        };
        self.agents += o.agents;
        self.connected += o.connected;
        sum_vec(&mut self.per_server, &o.per_server);
        self.alive += o.alive;
        self.connects += o.connects;
        sum_vec(&mut self.connects_per_server, &o.connects_per_server);
        self.connect_failures += o.connect_failures;
        self.refused += o.refused;
        self.timeouts += o.timeouts;
        sum_map(&mut self.http_status, &o.http_status);
        sum_map(&mut self.closes, &o.closes);
        self.drops += o.drops;
        self.churn_cycles += o.churn_cycles;
        self.commands += o.commands;
        self.results += o.results;
        self.acks += o.acks;
        self.results_resent += o.results_resent;
        self.pings += o.pings;
        self.heartbeats += o.heartbeats;
        self.heartbeat_acks += o.heartbeat_acks;
        self.errors += o.errors;
        self.inventories += o.inventories;
        self.inventory_failures += o.inventory_failures;
        self.gave_up += o.gave_up;
        self.rss_kib += o.rss_kib;
        self.processes += o.processes;
    }

    /// One human-readable progress line.
    pub fn line(&self) -> String {
        let mut s = format!(
            "{:>7.1}s agents {} connected {} {:?} alive {} | connects {} failures {}",
            self.elapsed_ms as f64 / 1000.0,
            self.agents,
            self.connected,
            self.per_server,
            self.alive,
            self.connects,
            self.connect_failures,
        );
        if !self.http_status.is_empty() {
            s += &format!(" http {:?}", self.http_status);
        }
        if !self.closes.is_empty() {
            s += &format!(" closes {:?}", self.closes);
        }
        if self.drops > 0 {
            s += &format!(" drops {}", self.drops);
        }
        if self.churn_cycles > 0 {
            s += &format!(" churn {}", self.churn_cycles);
        }
        s += &format!(
            " | commands {} pings {} heartbeats {}/{} | rss {} MiB",
            self.commands,
            self.pings,
            self.heartbeat_acks,
            self.heartbeats,
            self.rss_kib / 1024
        );
        s
    }
}

/// VmRSS of this process, in KiB (0 where /proc is missing).
pub fn own_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_of_several_processes_add_up() {
        let a = Stats::new(2, 2);
        a.agent_started();
        a.connected(0, 1, 15_000);
        a.connect_failed(ConnectFailure::Status(503));
        a.closed_by_server(1012);
        let b = Stats::new(1, 2);
        b.agent_started();
        b.connected(0, 0, 15_000);
        b.connect_failed(ConnectFailure::Status(418));
        let mut sum = a.snapshot();
        sum.add(&b.snapshot());
        assert_eq!(sum.connected, 2);
        assert_eq!(sum.per_server, vec![1, 1]);
        assert_eq!(sum.alive, 2);
        assert_eq!(sum.http_status, BTreeMap::from([(0, 1), (503, 1)]));
        assert_eq!(sum.closes, BTreeMap::from([(1012, 1)]));
        assert_eq!(sum.processes, 2);
    }

    #[test]
    fn a_disconnected_agent_is_not_alive() {
        let s = Stats::new(1, 1);
        s.connected(0, 0, 15_000);
        s.disconnected(0, 0);
        assert_eq!(s.snapshot().alive, 0);
        assert_eq!(s.snapshot().connected, 0);
    }
}
