//! Prometheus metrics. Every name is `agent_server_*`; label values come from enums or
//! static route templates, never from user input, so cardinality stays bounded.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::store::CommandStatus;

/// A label enum whose values render in snake_case, as Prometheus conventions want.
macro_rules! label_enum {
    ($(#[$doc:meta])* $name:ident { $($variant:ident => $text:literal),* $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
        pub enum $name {
            $($variant),*
        }

        impl EncodeLabelValue for $name {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
                use std::fmt::Write;
                encoder.write_str(match self {
                    $($name::$variant => $text),*
                })
            }
        }
    };
}

label_enum! {
    Direction {
        Inbound => "inbound",
        Outbound => "outbound",
    }
}

label_enum! {
    /// WebSocket message kinds, as in `docs/protocol.md`.
    MessageType {
        Welcome => "welcome",
        Hello => "hello",
        Heartbeat => "heartbeat",
        HeartbeatAck => "heartbeat_ack",
        Inventory => "inventory",
        Command => "command",
        Result => "result",
        Ack => "ack",
        Error => "error",
        Ping => "ping",
        Pong => "pong",
        Close => "close",
        Invalid => "invalid",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WsLabels {
    pub direction: Direction,
    pub r#type: MessageType,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub method: &'static str,
    pub route: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: &'static str,
}

label_enum! {
    StatusLabel {
        Pending => "pending",
        Delivered => "delivered",
        Succeeded => "succeeded",
        Failed => "failed",
        Expired => "expired",
    }
}

impl From<CommandStatus> for StatusLabel {
    fn from(s: CommandStatus) -> Self {
        match s {
            CommandStatus::Pending => StatusLabel::Pending,
            CommandStatus::Delivered => StatusLabel::Delivered,
            CommandStatus::Succeeded => StatusLabel::Succeeded,
            CommandStatus::Failed => StatusLabel::Failed,
            CommandStatus::Expired => StatusLabel::Expired,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommandLabels {
    pub status: StatusLabel,
}

label_enum! {
    /// Why a WebSocket session ended.
    CloseReason {
        ClientClosed => "client_closed",
        Replaced => "replaced",
        Deleted => "deleted",
        HeartbeatTimeout => "heartbeat_timeout",
        TokenExpired => "token_expired",
        SlowConsumer => "slow_consumer",
        Draining => "draining",
        Rebalance => "rebalance",
        ProtocolError => "protocol_error",
        StoreError => "store_error",
        NetworkError => "network_error",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CloseLabels {
    pub reason: CloseReason,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: &'static str,
}

fn latency_histogram() -> Histogram {
    // 0.5 ms .. ~8 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 15))
}

/// All metrics of one process; cheap to share behind an `Arc`.
pub struct Metrics {
    pub registry: Registry,
    pub connected_agents: Gauge,
    pub ws_messages: Family<WsLabels, Counter>,
    pub ws_closes: Family<CloseLabels, Counter>,
    pub ws_rejected_upgrades: Counter,
    pub http_requests: Family<HttpLabels, Counter>,
    pub http_duration: Family<RouteLabels, Histogram, fn() -> Histogram>,
    /// Transitions into each status (a counter, not a census of the table).
    pub commands: Family<CommandLabels, Counter>,
    pub draining: Gauge,
    pub store_errors: Counter,
    /// Cluster mode: 1 while Redis answers.
    pub redis_up: Gauge,
    pub redis_errors: Counter,
    pub wakeups_sent: Counter,
    pub wakeups_received: Counter,
    /// Registry entries refreshed (one per agent per heartbeat interval).
    pub presence_refreshes: Counter,
    pub rebalance_closes: Counter,
    /// Replicas that reported their agent count recently.
    pub cluster_pods: Gauge,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("agent_server");
        let connected_agents = Gauge::default();
        registry.register(
            "connected_agents",
            "WebSocket sessions currently open on this process",
            connected_agents.clone(),
        );
        let ws_messages = Family::<WsLabels, Counter>::default();
        registry.register(
            "ws_messages",
            "WebSocket messages by direction and type",
            ws_messages.clone(),
        );
        let ws_closes = Family::<CloseLabels, Counter>::default();
        registry.register(
            "ws_sessions_closed",
            "WebSocket sessions ended, by reason",
            ws_closes.clone(),
        );
        let ws_rejected_upgrades = Counter::default();
        registry.register(
            "ws_rejected_upgrades",
            "WebSocket upgrade requests refused (bad id, token, origin, draining)",
            ws_rejected_upgrades.clone(),
        );
        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by method, route and status",
            http_requests.clone(),
        );
        let http_duration =
            Family::<RouteLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram,
            );
        registry.register_with_unit(
            "http_request_duration",
            "HTTP request handling time by route",
            prometheus_client::registry::Unit::Seconds,
            http_duration.clone(),
        );
        let commands = Family::<CommandLabels, Counter>::default();
        registry.register("commands", "Command status transitions", commands.clone());
        let draining = Gauge::default();
        registry.register(
            "draining",
            "1 while this process is draining for shutdown",
            draining.clone(),
        );
        let store_errors = Counter::default();
        registry.register(
            "store_errors",
            "Database operations that failed",
            store_errors.clone(),
        );
        let redis_up = Gauge::default();
        redis_up.set(1);
        registry.register(
            "redis_up",
            "1 while Redis answers (cluster mode)",
            redis_up.clone(),
        );
        let redis_errors = Counter::default();
        registry.register(
            "redis_errors",
            "Redis operations that failed",
            redis_errors.clone(),
        );
        let wakeups_sent = Counter::default();
        registry.register(
            "wakeups_sent",
            "Wake-ups published to other replicas",
            wakeups_sent.clone(),
        );
        let wakeups_received = Counter::default();
        registry.register(
            "wakeups_received",
            "Wake-ups received from other replicas",
            wakeups_received.clone(),
        );
        let presence_refreshes = Counter::default();
        registry.register(
            "presence_refreshes",
            "Agent registry entries refreshed",
            presence_refreshes.clone(),
        );
        let rebalance_closes = Counter::default();
        registry.register(
            "rebalance_closes",
            "Agents closed to rebalance replicas",
            rebalance_closes.clone(),
        );
        let cluster_pods = Gauge::default();
        registry.register(
            "cluster_pods",
            "Replicas that reported their agent count recently",
            cluster_pods.clone(),
        );
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("build_info", "Build information; always 1", build_info);
        Metrics {
            registry,
            connected_agents,
            ws_messages,
            ws_closes,
            ws_rejected_upgrades,
            http_requests,
            http_duration,
            commands,
            draining,
            store_errors,
            redis_up,
            redis_errors,
            wakeups_sent,
            wakeups_received,
            presence_refreshes,
            rebalance_closes,
            cluster_pods,
        }
    }

    pub fn ws(&self, direction: Direction, r#type: MessageType) {
        self.ws_messages
            .get_or_create(&WsLabels { direction, r#type })
            .inc();
    }

    pub fn command(&self, status: CommandStatus, n: u64) {
        self.commands
            .get_or_create(&CommandLabels {
                status: status.into(),
            })
            .inc_by(n);
    }

    pub fn closed(&self, reason: CloseReason) {
        self.ws_closes.get_or_create(&CloseLabels { reason }).inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
