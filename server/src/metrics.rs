//! Prometheus metrics. Every name is `agent_server_*`, beside the standard `process_*`
//! metrics of the Prometheus client guidelines ([`ProcessCollector`]); label values come
//! from enums or static route templates, never from user input, so cardinality stays
//! bounded.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::store::CommandStatus;

/// A label enum whose values render in snake_case, as Prometheus conventions want.
macro_rules! label_enum {
    ($(#[$doc:meta])* $name:ident { $($variant:ident => $text:literal),* $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
        pub enum $name {
            $(#[doc = concat!("`", $text, "`")] $variant),*
        }

        impl EncodeLabelValue for $name {
            fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
                use std::fmt::Write;
                encoder.write_str(match self {
                    $($name::$variant => $text),*
                })
            }
        }
    };
}

label_enum! {
    /// Which way a WebSocket message went, seen from the server.
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
        Update => "update",
        UpdateResult => "update_result",
        Error => "error",
        Ping => "ping",
        Pong => "pong",
        Close => "close",
        Invalid => "invalid",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct WsLabels {
    pub direction: Direction,
    pub r#type: MessageType,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct HttpLabels {
    pub method: &'static str,
    /// The matched route template, from the fixed route table (bounded).
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RouteLabels {
    /// The matched route template, from the fixed route table (bounded).
    pub route: String,
}

label_enum! {
    /// A command status, as the `status` label of `agent_server_commands_total`.
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

/// The labels of `agent_server_commands_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommandLabels {
    /// The status the commands moved into.
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
pub(crate) struct CloseLabels {
    pub reason: CloseReason,
}

label_enum! {
    /// Why a request to `/ws/{client_id}` got no 101: a rule of the opening handshake
    /// (RFC 6455 §4.2.1, RFC 9110 §7.8) or one of our own checks before it.
    RefusalReason {
        Method => "method",
        HttpVersion => "http_version",
        UpgradeHeader => "upgrade_header",
        ConnectionHeader => "connection_header",
        Host => "host",
        Key => "key",
        WebsocketVersion => "websocket_version",
        ClientId => "client_id",
        Unauthorized => "unauthorized",
        Forbidden => "forbidden",
        Draining => "draining",
        Other => "other",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct HandshakeRefusalLabels {
    pub reason: RefusalReason,
}

label_enum! {
    /// How a binary upload ended.
    UploadOutcome {
        Stored => "stored",
        Invalid => "invalid",
        Duplicate => "duplicate",
        TooLarge => "too_large",
        ChecksumMismatch => "checksum_mismatch",
        StorageFull => "storage_full",
        Incomplete => "incomplete",
        Failed => "failed",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct UploadLabels {
    pub outcome: UploadOutcome,
}

label_enum! {
    /// What a binary download answered.
    DownloadKind {
        Full => "full",
        Partial => "partial",
        NotModified => "not_modified",
        Unsatisfiable => "unsatisfiable",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct DownloadLabels {
    pub kind: DownloadKind,
}

label_enum! {
    /// How an agent's update within a rollout ended.
    UpdateOutcome {
        Updated => "updated",
        TimedOut => "timed_out",
        Failed => "failed",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct UpdateOutcomeLabels {
    pub outcome: UpdateOutcome,
}

label_enum! {
    /// How a web UI sign-in attempt ended.
    SignInOutcome {
        Ok => "ok",
        WrongPassword => "wrong_password",
        RateLimited => "rate_limited",
        Disabled => "disabled",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct SignInLabels {
    pub outcome: SignInOutcome,
}

label_enum! {
    /// What happened to a fleet job.
    JobEvent {
        Created => "created",
        Braked => "braked",
        Paused => "paused",
        Resumed => "resumed",
        Cancelled => "cancelled",
        Completed => "completed",
    }
}

/// The labels of `agent_server_jobs_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabels {
    /// What happened to the job.
    pub event: JobEvent,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct BuildLabels {
    pub version: &'static str,
}

fn latency_histogram() -> Histogram {
    // 0.5 ms .. ~8 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 15))
}

/// All metrics of one process; cheap to share behind an `Arc`.
pub struct Metrics {
    /// Every metric below, registered under the `agent_server` prefix; `/metrics`
    /// encodes it (see [`Metrics::encode`]).
    pub registry: Registry,
    /// `process_*`, without the `agent_server_` prefix, as dashboards and the chart's
    /// alert rules expect.
    process: Registry,
    pub(crate) connected_agents: Gauge,
    pub(crate) ws_messages: Family<WsLabels, Counter>,
    pub(crate) ws_closes: Family<CloseLabels, Counter>,
    pub(crate) ws_rejected_upgrades: Counter,
    /// The same refusals by reason: proxy misconfigurations show as `http_version`,
    /// `upgrade_header` or `connection_header`.
    pub(crate) ws_handshake_refusals: Family<HandshakeRefusalLabels, Counter>,
    pub(crate) http_requests: Family<HttpLabels, Counter>,
    pub(crate) http_duration: Family<RouteLabels, Histogram, fn() -> Histogram>,
    /// Transitions into each status (a counter, not a census of the table).
    pub commands: Family<CommandLabels, Counter>,
    /// 1 while this replica drains (SIGTERM received), else 0.
    pub draining: Gauge,
    pub(crate) store_errors: Counter,
    /// Cluster mode: 1 while Redis answers.
    pub(crate) redis_up: Gauge,
    pub(crate) redis_errors: Counter,
    pub(crate) wakeups_sent: Counter,
    pub(crate) wakeups_received: Counter,
    /// Registry entries refreshed (one per agent per heartbeat interval).
    pub(crate) presence_refreshes: Counter,
    pub(crate) rebalance_closes: Counter,
    /// Replicas that reported their agent count recently.
    pub(crate) cluster_pods: Gauge,
    pub(crate) binary_uploads: Family<UploadLabels, Counter>,
    pub(crate) binary_downloads: Family<DownloadLabels, Counter>,
    /// Bytes of binaries sent to clients (ranges included).
    pub(crate) binary_download_bytes: Counter,
    pub(crate) updates_offered: Counter,
    pub(crate) update_outcomes: Family<UpdateOutcomeLabels, Counter>,
    pub(crate) ui_sign_ins: Family<SignInLabels, Counter>,
    pub(crate) ui_event_streams: Gauge,
    /// Fleet jobs by event (created, braked, paused, resumed, cancelled, completed).
    pub jobs: Family<JobLabels, Counter>,
    /// Job commands this replica released: its pacer's releases, and the first batch of
    /// each job created here (released when it is stored).
    pub job_commands_released: Counter,
}

impl Metrics {
    /// Every metric at zero, registered in a fresh registry (one per process; tests make
    /// one per app).
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
            "WebSocket upgrade requests refused (handshake, id, token, draining)",
            ws_rejected_upgrades.clone(),
        );
        let ws_handshake_refusals = Family::<HandshakeRefusalLabels, Counter>::default();
        registry.register(
            "ws_handshake_refusals",
            "WebSocket upgrade requests refused before the 101, by reason",
            ws_handshake_refusals.clone(),
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
        let binary_uploads = Family::<UploadLabels, Counter>::default();
        registry.register(
            "binary_uploads",
            "Binary uploads by outcome",
            binary_uploads.clone(),
        );
        let binary_downloads = Family::<DownloadLabels, Counter>::default();
        registry.register(
            "binary_downloads",
            "Binary download responses by kind",
            binary_downloads.clone(),
        );
        let binary_download_bytes = Counter::default();
        registry.register_with_unit(
            "binary_download",
            "Bytes of binaries sent",
            prometheus_client::registry::Unit::Bytes,
            binary_download_bytes.clone(),
        );
        let updates_offered = Counter::default();
        registry.register(
            "updates_offered",
            "update messages sent to agents",
            updates_offered.clone(),
        );
        let update_outcomes = Family::<UpdateOutcomeLabels, Counter>::default();
        registry.register(
            "update_outcomes",
            "Agent updates that ended, by outcome",
            update_outcomes.clone(),
        );
        let ui_sign_ins = Family::<SignInLabels, Counter>::default();
        registry.register(
            "ui_sign_ins",
            "Web UI sign-in attempts by outcome",
            ui_sign_ins.clone(),
        );
        let ui_event_streams = Gauge::default();
        registry.register(
            "ui_event_streams",
            "Open /api/v1/events streams on this process",
            ui_event_streams.clone(),
        );
        let jobs = Family::<JobLabels, Counter>::default();
        registry.register("jobs", "Fleet job events", jobs.clone());
        let job_commands_released = Counter::default();
        registry.register(
            "job_commands_released",
            "Fleet-job commands released by this replica: by its pacer, or when a job created here was stored",
            job_commands_released.clone(),
        );
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("build_info", "Build information; always 1", build_info);
        let mut process = Registry::with_prefix("process");
        process.register_collector(Box::new(ProcessCollector));
        Metrics {
            registry,
            process,
            connected_agents,
            ws_messages,
            ws_closes,
            ws_rejected_upgrades,
            ws_handshake_refusals,
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
            binary_uploads,
            binary_downloads,
            binary_download_bytes,
            updates_offered,
            update_outcomes,
            ui_sign_ins,
            ui_event_streams,
            jobs,
            job_commands_released,
        }
    }

    /// Counts one WebSocket message (`agent_server_ws_messages_total`).
    pub fn ws(&self, direction: Direction, r#type: MessageType) {
        self.ws_messages
            .get_or_create(&WsLabels { direction, r#type })
            .inc();
    }

    /// Counts `n` commands moving into `status` (`agent_server_commands_total`).
    pub fn command(&self, status: CommandStatus, n: u64) {
        self.commands
            .get_or_create(&CommandLabels {
                status: status.into(),
            })
            .inc_by(n);
    }

    /// Counts one binary upload by how it ended.
    pub fn upload(&self, outcome: UploadOutcome) {
        self.binary_uploads
            .get_or_create(&UploadLabels { outcome })
            .inc();
    }

    /// Counts one binary download by what it answered (full, partial, not modified,
    /// unsatisfiable range).
    pub fn download(&self, kind: DownloadKind) {
        self.binary_downloads
            .get_or_create(&DownloadLabels { kind })
            .inc();
    }

    pub(crate) fn update_outcome(&self, outcome: UpdateOutcome) {
        self.update_outcomes
            .get_or_create(&UpdateOutcomeLabels { outcome })
            .inc();
    }

    /// Counts one web UI sign-in attempt by how it ended.
    pub fn sign_in(&self, outcome: SignInOutcome) {
        self.ui_sign_ins
            .get_or_create(&SignInLabels { outcome })
            .inc();
    }

    /// Counts one fleet job event (`agent_server_jobs_total`).
    pub fn job(&self, event: JobEvent) {
        self.jobs.get_or_create(&JobLabels { event }).inc();
    }

    /// Counts one ended WebSocket session by its reason
    /// (`agent_server_ws_sessions_closed_total`).
    pub fn closed(&self, reason: CloseReason) {
        self.ws_closes.get_or_create(&CloseLabels { reason }).inc();
    }

    /// The Prometheus text exposition (OpenMetrics): `agent_server_*`, then `process_*`.
    pub fn encode(&self) -> String {
        use prometheus_client::encoding::text::{encode_eof, encode_registry};
        let mut out = String::with_capacity(8 * 1024);
        // Writing into a String cannot fail.
        let _ = encode_registry(&mut out, &self.registry)
            .and_then(|()| encode_registry(&mut out, &self.process))
            .and_then(|()| encode_eof(&mut out));
        out
    }
}

/// The standard process metrics (<https://prometheus.io/docs/instrumenting/writing_clientlibs/#process-metrics>):
/// `process_cpu_seconds_total`, `process_open_fds`, `process_max_fds` (the soft limit;
/// 0 when unlimited), `process_resident_memory_bytes`, `process_virtual_memory_bytes`,
/// `process_virtual_memory_max_bytes`, `process_start_time_seconds` and
/// `process_threads`. prometheus-client has no collector of its own; `metrics-process`
/// reads them from the OS (`/proc/self` on Linux) at each scrape. A value the OS does not
/// give is left out rather than reported as 0.
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        let now = metrics_process::collector::collect();
        if let Some(cpu) = now.cpu_seconds_total {
            let metric = encoder.encode_descriptor(
                "cpu",
                "Total user and system CPU time spent in seconds.",
                Some(&Unit::Seconds),
                MetricType::Counter,
            )?;
            ConstCounter::new(cpu).encode(metric)?;
        }
        let gauges: [(&str, &str, Option<Unit>, Option<u64>); 7] = [
            (
                "open_fds",
                "Number of open file descriptors.",
                None,
                now.open_fds,
            ),
            (
                "max_fds",
                "Maximum number of open file descriptors (the soft limit; 0: unlimited).",
                None,
                now.max_fds,
            ),
            (
                "resident_memory",
                "Resident memory size in bytes.",
                Some(Unit::Bytes),
                now.resident_memory_bytes,
            ),
            (
                "virtual_memory",
                "Virtual memory size in bytes.",
                Some(Unit::Bytes),
                now.virtual_memory_bytes,
            ),
            (
                "virtual_memory_max",
                "Maximum amount of virtual memory available in bytes (0: unlimited).",
                Some(Unit::Bytes),
                now.virtual_memory_max_bytes,
            ),
            (
                "start_time",
                "Start time of the process since the Unix epoch in seconds.",
                Some(Unit::Seconds),
                now.start_time_seconds,
            ),
            (
                "threads",
                "Number of OS threads in the process.",
                None,
                now.threads,
            ),
        ];
        for (name, help, unit, value) in gauges {
            let Some(value) = value else { continue };
            let metric = encoder.encode_descriptor(name, help, unit.as_ref(), MetricType::Gauge)?;
            ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX)).encode(metric)?;
        }
        Ok(())
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scrape_has_agent_server_and_process_metrics_and_one_eof() {
        let text = Metrics::new().encode();
        for name in [
            "agent_server_build_info",
            "process_cpu_seconds_total",
            "process_open_fds",
            "process_max_fds",
            "process_resident_memory_bytes",
            "process_start_time_seconds",
        ] {
            assert!(
                text.lines()
                    .any(|l| l.starts_with(&format!("{name} "))
                        || l.starts_with(&format!("{name}{{"))),
                "{name} in\n{text}"
            );
        }
        assert!(
            !text.contains("agent_server_process_"),
            "no prefix on process_*"
        );
        assert_eq!(text.matches("# EOF").count(), 1);
        assert!(text.ends_with("# EOF\n"));
    }
}
