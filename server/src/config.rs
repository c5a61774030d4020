//! Configuration: parsed once, from an injectable source, into one typed [`Config`].
//!
//! Every key of the seed's ConfigMap and Secret is read under its seed name. Values are
//! validated here and nowhere else; an invalid one is a [`ConfigError`] naming the variable
//! and what is accepted, which `main` turns into exit status 64.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use jsonwebtoken::Algorithm;

/// Where configuration values come from. Production reads the process environment; tests
/// pass a map so they never touch (or race on) process-wide state.
pub trait Source {
    /// The value of `key`, or `None` when it is not set.
    fn get(&self, key: &str) -> Option<String>;
}

/// The process environment.
pub struct Env;

impl Source for Env {
    fn get(&self, key: &str) -> Option<String> {
        std::env::var(key).ok()
    }
}

impl<F: Fn(&str) -> Option<String>> Source for F {
    fn get(&self, key: &str) -> Option<String> {
        self(key)
    }
}

/// A value that must never appear in logs or debug output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value so that it prints as `Secret([redacted])`.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// Which database the store talks to.
#[derive(Clone, Debug)]
pub enum DatabaseUrl {
    /// `postgres://` or `postgresql://`; the URL may carry a password, hence `Secret`.
    Postgres(Secret),
    /// A file path (from `sqlite://PATH`, or the embedded default in the data directory).
    Sqlite(PathBuf),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LogFormat {
    Text,
    Json,
}

/// Redis connection settings; present only when REDIS_HOST or REDIS_SENTINELS is set
/// (cluster mode).
#[derive(Clone, Debug)]
pub struct RedisConfig {
    /// Where the data node is: one address, or whatever master a Sentinel set names.
    pub target: RedisTarget,
    /// REDIS_DB: the database index on the data nodes (default 0).
    pub db: i64,
    /// REDIS_USERNAME: the ACL user (Redis 6+); without it the password is for `default`.
    pub username: Option<String>,
    /// REDIS_PASSWORD (or REDIS_PASSWORD_FILE).
    pub password: Option<Secret>,
    /// REDIS_TLS: speak TLS to the data nodes and the sentinels (managed Redis services
    /// require it).
    pub tls: bool,
    /// REDIS_TLS_CA_FILE: PEM certificates to trust instead of the system roots, for a
    /// Redis whose certificate a private CA signed.
    pub tls_ca: Option<TlsCa>,
    /// Prefix of every key and channel, so several installations can share one Redis.
    pub key_prefix: String,
}

/// Which Redis server the data connections go to.
#[derive(Clone, Debug)]
pub enum RedisTarget {
    /// REDIS_HOST:REDIS_PORT.
    Direct {
        /// REDIS_HOST: a name or an address.
        host: String,
        /// REDIS_PORT (default 6379).
        port: u16,
    },
    /// The current master of REDIS_SENTINEL_MASTER, as REDIS_SENTINELS report it; asked
    /// again after every connection failure, so a failover moves this replica with it.
    Sentinel(SentinelConfig),
}

/// Redis Sentinel settings.
#[derive(Clone, Debug)]
pub struct SentinelConfig {
    /// REDIS_SENTINELS: `host:port` of every sentinel, tried in order.
    pub nodes: Vec<(String, u16)>,
    /// REDIS_SENTINEL_MASTER: the name the sentinels monitor the master under.
    pub master: String,
    /// REDIS_SENTINEL_PASSWORD: the sentinels' own `requirepass`, if any.
    pub password: Option<Secret>,
}

/// A CA bundle read from REDIS_TLS_CA_FILE at start, so a missing file is a configuration
/// error rather than a failure at the first connection.
#[derive(Clone, Debug)]
pub struct TlsCa {
    /// The file it was read from, for messages.
    pub path: PathBuf,
    /// Its contents: one or more PEM certificates.
    pub pem: Vec<u8>,
}

/// Where the JWT signing key comes from.
#[derive(Clone, Debug)]
pub enum SecretKeySource {
    /// SECRET_KEY was given (required whenever several replicas must agree on it).
    Given(Secret),
    /// Embedded default: a random key generated once and kept in the data directory.
    DataDir(PathBuf),
}

/// The whole configuration of one server process.
#[derive(Clone, Debug)]
pub struct Config {
    /// SERVER_HOST:SERVER_PORT; port 0 picks a free port (tests).
    pub(crate) listen: SocketAddr,
    /// SERVER_HOST:METRICS_PORT, where `/metrics` is served (and only there); port 0
    /// picks a free port (tests).
    pub(crate) metrics_listen: SocketAddr,
    /// SERVER_URL: the public URL agents and browsers use; its origin is the only one
    /// allowed for browser requests (CORS on /api, Origin on /ws).
    pub(crate) server_url: String,
    /// `scheme://host[:port]` of `server_url`, precomputed for Origin comparisons.
    pub(crate) public_origin: String,
    /// Present in cluster mode only (REDIS_HOST or REDIS_SENTINELS set); see [`RedisConfig`].
    pub redis: Option<RedisConfig>,
    /// WS_HEARTBEAT_INTERVAL: how often the server pings each agent, so that proxies see
    /// traffic in both directions.
    pub heartbeat_interval: Duration,
    /// WS_OFFLINE_TIMEOUT: silence after which an agent is disconnected and marked offline.
    pub offline_timeout: Duration,
    /// BINARY_STORAGE_PATH: where uploaded agent binaries live (default `DATA_DIR/binaries`);
    /// shared by every replica.
    pub binary_storage_path: PathBuf,
    /// LOG_LEVEL: a level (`info`) or a full `tracing` filter directive.
    pub(crate) log_level: String,
    pub(crate) log_format: LogFormat,
    /// DATABASE_URL (or DATABASE_URL_FILE): PostgreSQL, or SQLite in DATA_DIR by default.
    pub database: DatabaseUrl,
    /// SECRET_KEY (or SECRET_KEY_FILE), or the key generated in DATA_DIR.
    pub secret_key: SecretKeySource,
    pub(crate) jwt_algorithm: Algorithm,
    /// POD_ID: this replica's name (the downward API's `metadata.name`).
    pub pod_id: String,
    /// POD_IP: this replica's address (the downward API's `status.podIP`), if given.
    pub pod_ip: Option<IpAddr>,
    /// DATA_DIR: the embedded SQLite database and generated secret live here.
    pub data_dir: PathBuf,
    /// DRAIN_DELAY: time to keep serving with readiness 503 before closing agents, for
    /// clusters without the native preStop sleep.
    pub(crate) drain_delay: Duration,
    /// DRAIN_WINDOW: agents are closed with 1012 spread over this window so that they do
    /// not all reconnect in the same second.
    pub(crate) drain_window: Duration,
    /// SHUTDOWN_TIMEOUT: bound on the whole shutdown after SIGTERM.
    pub(crate) shutdown_timeout: Duration,
    /// MAX_INVENTORY_BYTES: bound on an inventory request body.
    pub(crate) max_inventory_bytes: usize,
    /// WS_MAX_MESSAGE_BYTES: bound on one WebSocket message (large inventories use HTTP).
    pub(crate) ws_max_message_bytes: usize,
    /// WS_SEND_TIMEOUT: an agent that cannot take a frame within this time is closed.
    pub(crate) ws_send_timeout: Duration,
    /// HTTP_HEADER_TIMEOUT: slowloris bound on reading request headers.
    pub(crate) http_header_timeout: Duration,
    /// DATABASE_POOL_SIZE: connections per process.
    pub(crate) database_pool_size: u32,
    /// DATABASE_STATEMENT_TIMEOUT: the longest one database call may take: PostgreSQL's
    /// `statement_timeout` and SQLite's `busy_timeout` on every pooled connection, and
    /// the server's own bound on waiting for an answer (a cut network answers nothing).
    pub(crate) database_statement_timeout: Duration,
    /// DATABASE_OUTAGE_TIMEOUT: how soon a database that answers nothing (stopped, hung,
    /// cut off) is reported as unavailable (`store/liveness.rs`).
    pub(crate) database_outage_timeout: Duration,
    /// COMMAND_SWEEP_INTERVAL: how often this pod re-checks pending commands of its agents
    /// (a safety net for lost wake-ups) and expires commands past their TTL.
    pub(crate) command_sweep_interval: Duration,
    /// REBALANCE: whether a replica above the cluster average sheds agents (cluster mode).
    pub rebalance: bool,
    /// JOB_PACER: whether this replica runs the job pacer, which releases fleet jobs'
    /// held commands to the agents connected here. Off, those agents' job commands stay
    /// held until they connect to a replica whose pacer runs (troubleshooting, and tests
    /// that take pacer turns by hand).
    pub(crate) job_pacer: bool,
    /// REBALANCE_RATE: agents closed per second while shedding (more when the excess is
    /// so large that this rate would take longer than about 30 s).
    pub(crate) rebalance_rate: u32,
    /// REBALANCE_TOLERANCE (percent): how far above the average a replica may be before
    /// it sheds.
    pub(crate) rebalance_tolerance: f64,
    /// Agent binaries and fleet updates (MAX_BINARY_BYTES, ROLLOUT_*).
    pub(crate) releases: ReleaseConfig,
    /// The web UI's sign-in (ADMIN_PASSWORD, UI_SESSION_TTL).
    pub ui: UiConfig,
    /// Credentials: key rotation, clock leeway, audit retention, trusted proxies.
    pub credentials: CredentialsConfig,
    /// TLS_CERT_FILE and TLS_KEY_FILE: HTTPS and WSS on SERVER_PORT, without an ingress.
    pub tls: Option<TlsFiles>,
}

/// The PEM files SERVER_PORT serves TLS with; both are reloaded when they change.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// TLS_CERT_FILE: the server certificate first, then its intermediates.
    pub cert: PathBuf,
    /// TLS_KEY_FILE: the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

impl TlsFiles {
    /// Both variables or neither.
    fn parse(get: &impl Fn(&str) -> Option<String>) -> Result<Option<Self>, ConfigError> {
        match (get("TLS_CERT_FILE"), get("TLS_KEY_FILE")) {
            (None, None) => Ok(None),
            (Some(cert), Some(key)) => Ok(Some(TlsFiles {
                cert: cert.into(),
                key: key.into(),
            })),
            (Some(_), None) => Err(ConfigError::new(
                "TLS_KEY_FILE",
                "is required with TLS_CERT_FILE: set both (a PEM certificate chain and its private key) or neither".to_string(),
            )),
            (None, Some(_)) => Err(ConfigError::new(
                "TLS_CERT_FILE",
                "is required with TLS_KEY_FILE: set both (a PEM certificate chain and its private key) or neither".to_string(),
            )),
        }
    }
}

/// An invalid configuration value.
#[derive(Debug, thiserror::Error)]
#[error("{var}: {problem}")]
pub struct ConfigError {
    /// The variable at fault, as the operator set it (`WS_OFFLINE_TIMEOUT`).
    pub var: &'static str,
    /// What is wrong with its value and what is expected instead.
    pub problem: String,
}

impl ConfigError {
    fn new(var: &'static str, problem: impl Into<String>) -> Self {
        Self {
            var,
            problem: problem.into(),
        }
    }
}

/// Minimum SECRET_KEY length: HMAC keys shorter than the hash output weaken the signature.
pub(crate) const MIN_SECRET_KEY_BYTES: usize = 32;

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_source(&Env)
    }

    /// Parses and validates every key. The only I/O is reading the files that `*_FILE`
    /// variables and REDIS_TLS_CA_FILE name.
    pub fn from_source(src: &dyn Source) -> Result<Self, ConfigError> {
        let from_files = read_secret_files(src)?;
        // Empty values count as unset: the seed's Secret ships `REDIS_PASSWORD: ""`.
        let get = |k: &str| {
            from_files
                .get(k)
                .cloned()
                .or_else(|| src.get(k))
                .filter(|v| !v.trim().is_empty())
        };

        let host: IpAddr = parse_or(&get, "SERVER_HOST", "0.0.0.0".parse().unwrap(), |v| {
            v.parse()
                .map_err(|_| "an IP address such as 0.0.0.0 or ::".into())
        })?;
        let port: u16 = parse_or(&get, "SERVER_PORT", 8080, |v| {
            v.parse().map_err(|_| "a TCP port number (0-65535)".into())
        })?;
        let listen = SocketAddr::new(host, port);
        let metrics_port: u16 = parse_or(&get, "METRICS_PORT", 9090, |v| {
            v.parse().map_err(|_| "a TCP port number (0-65535)".into())
        })?;
        let metrics_listen = SocketAddr::new(host, metrics_port);
        if metrics_port != 0 && metrics_port == port {
            return Err(ConfigError::new(
                "METRICS_PORT",
                format!("{metrics_port} is SERVER_PORT already; pick another port for metrics"),
            ));
        }

        let server_url = get("SERVER_URL").unwrap_or_else(|| format!("http://localhost:{port}"));
        let public_origin = origin_of(&server_url).ok_or_else(|| {
            ConfigError::new(
                "SERVER_URL",
                format!("`{server_url}` is not an http:// or https:// URL such as https://agent.example.com"),
            )
        })?;

        let heartbeat_interval = duration(&get, "WS_HEARTBEAT_INTERVAL", Duration::from_secs(15))?;
        let offline_timeout = duration(&get, "WS_OFFLINE_TIMEOUT", Duration::from_secs(60))?;
        if heartbeat_interval.is_zero() {
            return Err(ConfigError::new(
                "WS_HEARTBEAT_INTERVAL",
                "must be greater than zero",
            ));
        }
        if offline_timeout <= heartbeat_interval {
            return Err(ConfigError::new(
                "WS_OFFLINE_TIMEOUT",
                format!(
                    "must be longer than WS_HEARTBEAT_INTERVAL ({}), or every agent would time out between pings",
                    human(heartbeat_interval)
                ),
            ));
        }

        let data_dir = PathBuf::from(get("DATA_DIR").unwrap_or_else(|| "./data".into()));
        let binary_storage_path = get("BINARY_STORAGE_PATH")
            .map(PathBuf::from)
            .unwrap_or_else(|| data_dir.join("binaries"));

        let log_level = get("LOG_LEVEL").unwrap_or_else(|| "info".into());
        tracing_subscriber::EnvFilter::try_new(&log_level).map_err(|_| {
            ConfigError::new(
                "LOG_LEVEL",
                format!("`{log_level}` is not one of trace, debug, info, warn, error (or a tracing filter directive)"),
            )
        })?;
        let log_format = match get("LOG_FORMAT").as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(ConfigError::new(
                    "LOG_FORMAT",
                    format!("`{other}` is not `text` or `json`"),
                ));
            }
        };

        let database = match get("DATABASE_URL") {
            None => DatabaseUrl::Sqlite(data_dir.join("agent-server.db")),
            Some(url) => parse_database_url(&url)?,
        };

        let redis = parse_redis(&get)?;

        let clustered = redis.is_some() || matches!(database, DatabaseUrl::Postgres(_));
        let secret_key = match get("SECRET_KEY") {
            Some(key) if key.len() < MIN_SECRET_KEY_BYTES => {
                return Err(ConfigError::new(
                    "SECRET_KEY",
                    format!(
                        "is {} bytes; at least {MIN_SECRET_KEY_BYTES} are required (for example `openssl rand -hex 32`)",
                        key.len()
                    ),
                ));
            }
            Some(key) => SecretKeySource::Given(Secret(key)),
            None if clustered => {
                return Err(ConfigError::new(
                    "SECRET_KEY",
                    "is required with PostgreSQL or Redis: every replica must sign and check tokens with the same key",
                ));
            }
            None => SecretKeySource::DataDir(data_dir.join("secret_key")),
        };

        let jwt_algorithm = match get("JWT_ALGORITHM").as_deref() {
            None | Some("HS256") => Algorithm::HS256,
            Some("HS384") => Algorithm::HS384,
            Some("HS512") => Algorithm::HS512,
            Some(other) => {
                return Err(ConfigError::new(
                    "JWT_ALGORITHM",
                    format!("`{other}` is not accepted; use HS256, HS384 or HS512"),
                ));
            }
        };

        let pod_id = get("POD_ID")
            .or_else(|| get("HOSTNAME"))
            .unwrap_or_else(|| "local".into());
        let pod_ip =
            match get("POD_IP") {
                None => None,
                Some(v) => Some(v.parse().map_err(|_| {
                    ConfigError::new("POD_IP", format!("`{v}` is not an IP address"))
                })?),
            };

        let drain_delay = duration(&get, "DRAIN_DELAY", Duration::ZERO)?;
        let drain_window = duration(&get, "DRAIN_WINDOW", Duration::from_secs(10))?;
        let shutdown_timeout = duration(&get, "SHUTDOWN_TIMEOUT", Duration::from_secs(20))?;
        if drain_delay + drain_window >= shutdown_timeout {
            return Err(ConfigError::new(
                "SHUTDOWN_TIMEOUT",
                format!(
                    "({}) must be longer than DRAIN_DELAY + DRAIN_WINDOW ({}), or draining could never finish",
                    human(shutdown_timeout),
                    human(drain_delay + drain_window)
                ),
            ));
        }

        let ui = UiConfig::parse(&get, &data_dir, clustered)?;
        Ok(Config {
            listen,
            metrics_listen,
            server_url,
            public_origin,
            redis,
            heartbeat_interval,
            offline_timeout,
            binary_storage_path,
            log_level,
            log_format,
            database,
            secret_key,
            jwt_algorithm,
            pod_id,
            pod_ip,
            data_dir,
            drain_delay,
            drain_window,
            shutdown_timeout,
            max_inventory_bytes: bytes(&get, "MAX_INVENTORY_BYTES", 10 * 1024 * 1024)?,
            ws_max_message_bytes: bytes(&get, "WS_MAX_MESSAGE_BYTES", 64 * 1024)?,
            ws_send_timeout: duration(&get, "WS_SEND_TIMEOUT", Duration::from_secs(10))?,
            http_header_timeout: duration(&get, "HTTP_HEADER_TIMEOUT", Duration::from_secs(10))?,
            database_pool_size: parse_or(&get, "DATABASE_POOL_SIZE", 16, |v| {
                match v.parse::<u32>() {
                    Ok(n) if (1..=512).contains(&n) => Ok(n),
                    _ => Err("a number of connections between 1 and 512".into()),
                }
            })?,
            database_statement_timeout: parse_or(
                &get,
                "DATABASE_STATEMENT_TIMEOUT",
                DEFAULT_STATEMENT_TIMEOUT,
                |v| {
                    parse_duration(v)
                        .filter(|d| {
                            (Duration::from_millis(100)..=Duration::from_secs(3600)).contains(d)
                        })
                        .ok_or_else(|| {
                            "a duration from 100ms to 1h, such as \"10s\" or \"500ms\"".into()
                        })
                },
            )?,
            database_outage_timeout: parse_or(
                &get,
                "DATABASE_OUTAGE_TIMEOUT",
                crate::store::DEFAULT_OUTAGE_TIMEOUT,
                |v| {
                    parse_duration(v)
                        .filter(|d| {
                            (Duration::from_millis(200)..=Duration::from_secs(60)).contains(d)
                        })
                        .ok_or_else(|| {
                            "a duration from 200ms to 60s, such as \"2s\" or \"1500ms\"".into()
                        })
                },
            )?,
            command_sweep_interval: duration(
                &get,
                "COMMAND_SWEEP_INTERVAL",
                Duration::from_secs(30),
            )?,
            rebalance: parse_or(&get, "REBALANCE", true, |v| match v {
                "true" | "1" | "on" => Ok(true),
                "false" | "0" | "off" => Ok(false),
                _ => Err("true or false".into()),
            })?,
            job_pacer: parse_or(&get, "JOB_PACER", true, |v| match v {
                "true" | "1" | "on" => Ok(true),
                "false" | "0" | "off" => Ok(false),
                _ => Err("true or false".into()),
            })?,
            rebalance_rate: parse_or(&get, "REBALANCE_RATE", 10, |v| match v.parse::<u32>() {
                Ok(n) if (1..=10_000).contains(&n) => Ok(n),
                _ => Err("a number of agents per second from 1 to 10000".into()),
            })?,
            rebalance_tolerance: parse_or(&get, "REBALANCE_TOLERANCE", 0.1, |v| {
                match v.parse::<u32>() {
                    Ok(n) if n <= 1000 => Ok(f64::from(n) / 100.0),
                    _ => Err("a whole percentage such as 10".into()),
                }
            })?,
            releases: ReleaseConfig::parse(&get)?,
            ui,
            credentials: CredentialsConfig::parse(&get)?,
            tls: TlsFiles::parse(&get)?,
        })
    }

    /// Whether the database is the SQLite file (a single-replica setup).
    pub fn is_sqlite(&self) -> bool {
        matches!(self.database, DatabaseUrl::Sqlite(_))
    }
}

fn parse_or<T>(
    get: &impl Fn(&str) -> Option<String>,
    var: &'static str,
    default: T,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<T, ConfigError> {
    match get(var) {
        None => Ok(default),
        Some(v) => parse(v.trim())
            .map_err(|expected| ConfigError::new(var, format!("`{v}` is not {expected}"))),
    }
}

impl Config {
    /// Every secret value this configuration holds (and PGPASSWORD, which libpq reads from
    /// the environment), for [`crate::redact`] to mask wherever it would be written.
    pub fn secrets(&self) -> Vec<String> {
        let mut out: Vec<String> = std::env::var("PGPASSWORD").into_iter().collect();
        if let DatabaseUrl::Postgres(url) = &self.database {
            out.push(url.expose().to_string());
        }
        if let SecretKeySource::Given(key) = &self.secret_key {
            out.push(key.expose().to_string());
        }
        if let Some(previous) = &self.credentials.secret_key_previous {
            out.push(previous.expose().to_string());
        }
        if let AdminPasswordSource::Given(password) = &self.ui.admin_password {
            out.push(password.expose().to_string());
        }
        if let Some(redis) = &self.redis {
            out.extend(redis.password.iter().map(|p| p.expose().to_string()));
            if let RedisTarget::Sentinel(sentinel) = &redis.target {
                out.extend(sentinel.password.iter().map(|p| p.expose().to_string()));
            }
        }
        out
    }
}

/// Settings that may instead be read from a file whose path `<NAME>_FILE` holds (the
/// container convention for secrets that a Vault agent or a CSI driver mounts). Listing a
/// name here is all it takes for a setting to accept the `_FILE` form.
pub(crate) const FILE_VARIANTS: &[(&str, &str)] = &[
    ("DATABASE_URL", "DATABASE_URL_FILE"),
    ("SECRET_KEY", "SECRET_KEY_FILE"),
    ("ADMIN_PASSWORD", "ADMIN_PASSWORD_FILE"),
    ("REDIS_PASSWORD", "REDIS_PASSWORD_FILE"),
    ("REDIS_SENTINEL_PASSWORD", "REDIS_SENTINEL_PASSWORD_FILE"),
    ("SECRET_KEY_PREVIOUS", "SECRET_KEY_PREVIOUS_FILE"),
];

/// Reads every `<NAME>_FILE` that is set: the file's content, without one trailing newline,
/// is the value of `<NAME>`. Setting both forms is refused, so that nobody wonders which
/// one won; an unreadable file names the variable and the path.
fn read_secret_files(
    src: &dyn Source,
) -> Result<std::collections::HashMap<&'static str, String>, ConfigError> {
    let set = |k: &str| src.get(k).filter(|v| !v.trim().is_empty());
    let mut values = std::collections::HashMap::new();
    for &(var, file_var) in FILE_VARIANTS {
        let Some(path) = set(file_var) else { continue };
        if set(var).is_some() {
            return Err(ConfigError::new(
                file_var,
                format!("{var} and {file_var} are both set; set only one of them"),
            ));
        }
        let content = std::fs::read_to_string(&path)
            .map_err(|e| ConfigError::new(file_var, format!("cannot read `{path}`: {e}")))?;
        let value = content
            .strip_suffix('\n')
            .map(|v| v.strip_suffix('\r').unwrap_or(v))
            .unwrap_or(&content);
        values.insert(var, value.to_string());
    }
    Ok(values)
}

/// Cluster mode's Redis: REDIS_HOST, or REDIS_SENTINELS with REDIS_SENTINEL_MASTER; None
/// when neither is set.
fn parse_redis(get: &impl Fn(&str) -> Option<String>) -> Result<Option<RedisConfig>, ConfigError> {
    let target = match (get("REDIS_SENTINELS"), get("REDIS_HOST")) {
        (None, None) => return Ok(None),
        (Some(nodes), _) => RedisTarget::Sentinel(parse_sentinel(get, &nodes)?),
        (None, Some(host)) => RedisTarget::Direct {
            host,
            port: parse_or(get, "REDIS_PORT", 6379, |v| {
                v.parse().map_err(|_| "a TCP port number".into())
            })?,
        },
    };
    let tls = parse_or(get, "REDIS_TLS", false, |v| {
        match v.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" => Ok(true),
            "false" | "0" | "no" => Ok(false),
            _ => Err("`true` or `false`".into()),
        }
    })?;
    let tls_ca = match get("REDIS_TLS_CA_FILE") {
        None => None,
        Some(path) => {
            let pem = std::fs::read(&path).map_err(|e| {
                ConfigError::new("REDIS_TLS_CA_FILE", format!("cannot read `{path}`: {e}"))
            })?;
            if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
                return Err(ConfigError::new(
                    "REDIS_TLS_CA_FILE",
                    format!("`{path}` holds no PEM certificate (-----BEGIN CERTIFICATE-----)"),
                ));
            }
            Some(TlsCa {
                path: PathBuf::from(path),
                pem,
            })
        }
    };
    if tls_ca.is_some() && !tls {
        return Err(ConfigError::new(
            "REDIS_TLS_CA_FILE",
            "is set but REDIS_TLS is not `true`; set REDIS_TLS=true to connect with TLS",
        ));
    }
    Ok(Some(RedisConfig {
        target,
        db: parse_or(get, "REDIS_DB", 0, |v| match v.parse::<i64>() {
            Ok(n) if n >= 0 => Ok(n),
            _ => Err("a database index such as 0".into()),
        })?,
        username: get("REDIS_USERNAME"),
        password: get("REDIS_PASSWORD").map(Secret),
        tls,
        tls_ca,
        key_prefix: get("REDIS_KEY_PREFIX").unwrap_or_else(|| "agent-server:".into()),
    }))
}

/// REDIS_SENTINELS (`host:port,host:port`), REDIS_SENTINEL_MASTER, REDIS_SENTINEL_PASSWORD.
fn parse_sentinel(
    get: &impl Fn(&str) -> Option<String>,
    nodes: &str,
) -> Result<SentinelConfig, ConfigError> {
    let nodes = nodes
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(|node| {
            node.rsplit_once(':')
                .and_then(|(host, port)| {
                    let host = host.trim_start_matches('[').trim_end_matches(']');
                    Some((host.to_string(), port.parse::<u16>().ok()?))
                })
                .filter(|(host, _)| !host.is_empty())
                .ok_or_else(|| {
                    ConfigError::new(
                        "REDIS_SENTINELS",
                        format!("`{node}` is not host:port (for example redis-sentinel-0:26379)"),
                    )
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let master = get("REDIS_SENTINEL_MASTER").ok_or_else(|| {
        ConfigError::new(
            "REDIS_SENTINEL_MASTER",
            "is required with REDIS_SENTINELS: the name the sentinels monitor the master under (often `mymaster`)",
        )
    })?;
    Ok(SentinelConfig {
        nodes,
        master,
        password: get("REDIS_SENTINEL_PASSWORD").map(Secret),
    })
}

/// DATABASE_STATEMENT_TIMEOUT's default: far above any query a request makes on a
/// healthy database, short enough that a hung one is reported while the caller waits.
pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest duration a setting accepts: ten years. Longer means nothing more and only
/// overflows the arithmetic it reaches (deadlines, `DRAIN_DELAY + DRAIN_WINDOW`).
const MAX_SETTING_DURATION: Duration = Duration::from_secs(3650 * 86_400);

fn duration(
    get: &impl Fn(&str) -> Option<String>,
    var: &'static str,
    default: Duration,
) -> Result<Duration, ConfigError> {
    parse_or(get, var, default, |v| {
        parse_duration(v)
            .filter(|d| *d <= MAX_SETTING_DURATION)
            .ok_or_else(|| {
                "a duration of at most 3650d: seconds (\"15\") or a number with ms, s, m, h or d (\"500ms\", \"2m\")".into()
            })
    })
}

fn bytes(
    get: &impl Fn(&str) -> Option<String>,
    var: &'static str,
    default: usize,
) -> Result<usize, ConfigError> {
    parse_or(get, var, default, |v| match v.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err("a positive number of bytes".into()),
    })
}

/// Parses `15` (seconds, the seed's form), `500ms`, `15s`, `2m`, `1h`, `30d`.
pub(crate) fn parse_duration(v: &str) -> Option<Duration> {
    let v = v.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: u64 = num.parse().ok()?;
    let d = match unit {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n.checked_mul(60)?),
        "h" => Duration::from_secs(n.checked_mul(3600)?),
        "d" => Duration::from_secs(n.checked_mul(86400)?),
        _ => return None,
    };
    Some(d)
}

/// Formats a duration the way [`parse_duration`] reads it.
pub(crate) fn human(d: Duration) -> String {
    if d.subsec_millis() != 0 || d.is_zero() {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}s", d.as_secs())
    }
}

fn parse_database_url(url: &str) -> Result<DatabaseUrl, ConfigError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(DatabaseUrl::Postgres(Secret(url.to_string())));
    }
    if let Some(path) = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
    {
        if path.is_empty() {
            return Err(ConfigError::new(
                "DATABASE_URL",
                "sqlite:// needs a file path, e.g. sqlite://./data/agent-server.db",
            ));
        }
        return Ok(DatabaseUrl::Sqlite(PathBuf::from(path)));
    }
    // Never echo the URL: it may carry a password.
    Err(ConfigError::new(
        "DATABASE_URL",
        "must start with postgres://, postgresql:// or sqlite://",
    ))
}

/// `scheme://host[:port]` of an http(s) URL, lower-cased, default ports dropped, as browsers
/// send it in the `Origin` header.
pub(crate) fn origin_of(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    if scheme != "http" && scheme != "https" {
        return None;
    }
    let authority = rest.split(['/', '?', '#']).next()?.to_ascii_lowercase();
    if authority.is_empty() || authority.contains('@') {
        return None;
    }
    let authority = match (scheme.as_str(), authority.rsplit_once(':')) {
        ("http", Some((h, "80"))) | ("https", Some((h, "443"))) => h.to_string(),
        _ => authority,
    };
    Some(format!("{scheme}://{authority}"))
}

/// Agent binaries on BINARY_STORAGE_PATH and the paced rollout of new versions.
#[derive(Clone, Debug)]
pub(crate) struct ReleaseConfig {
    /// MAX_BINARY_BYTES: largest binary an upload may carry (413 above).
    pub(crate) max_binary_bytes: u64,
    /// ROLLOUT_MAX_CONCURRENT: how many agents of one rollout may be updating at once,
    /// unless the rollout sets its own `max_concurrent`.
    pub(crate) rollout_max_concurrent: u32,
    /// ROLLOUT_UPDATE_TIMEOUT: an agent that has not come back with the new version this
    /// long after its `update` message counts as failed and frees its slot.
    pub(crate) rollout_update_timeout: Duration,
    /// ROLLOUT_CHECK_INTERVAL: how often each replica offers free rollout slots to its
    /// connected agents and expires updates that timed out.
    pub(crate) rollout_check_interval: Duration,
}

impl ReleaseConfig {
    fn parse(get: &impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let rollout_check_interval =
            duration(get, "ROLLOUT_CHECK_INTERVAL", Duration::from_secs(5))?;
        if rollout_check_interval.is_zero() {
            return Err(ConfigError::new(
                "ROLLOUT_CHECK_INTERVAL",
                "must be greater than zero",
            ));
        }
        Ok(ReleaseConfig {
            max_binary_bytes: bytes(get, "MAX_BINARY_BYTES", 512 * 1024 * 1024)? as u64,
            rollout_max_concurrent: parse_or(get, "ROLLOUT_MAX_CONCURRENT", 10, |v| {
                match v.parse::<u32>() {
                    Ok(n) if (1..=100_000).contains(&n) => Ok(n),
                    _ => Err("a number of agents between 1 and 100000".into()),
                }
            })?,
            rollout_update_timeout: duration(
                get,
                "ROLLOUT_UPDATE_TIMEOUT",
                Duration::from_secs(15 * 60),
            )?,
            rollout_check_interval,
        })
    }
}

/// Token verification, the audit log and client addresses.
#[derive(Clone, Debug)]
pub struct CredentialsConfig {
    /// SECRET_KEY_PREVIOUS: the key being rotated out. Tokens it signed still verify;
    /// new tokens are signed with SECRET_KEY only (docs/operations.md).
    pub(crate) secret_key_previous: Option<Secret>,
    /// JWT_LEEWAY: clock skew tolerated on `exp` and `nbf`; at most 5 minutes.
    pub(crate) jwt_leeway: Duration,
    /// AUDIT_RETENTION: audit entries older than this are pruned.
    pub(crate) audit_retention: Duration,
    /// TRUSTED_PROXIES: comma-separated addresses or CIDRs of reverse proxies whose
    /// `X-Forwarded-For` is believed; from anyone else the header is ignored.
    pub(crate) trusted_proxies: Vec<ipnet::IpNet>,
}

impl CredentialsConfig {
    fn parse(get: &impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let secret_key_previous = match get("SECRET_KEY_PREVIOUS") {
            Some(key) if key.len() < MIN_SECRET_KEY_BYTES => {
                return Err(ConfigError::new(
                    "SECRET_KEY_PREVIOUS",
                    format!(
                        "is {} bytes; a signing key has at least {MIN_SECRET_KEY_BYTES}",
                        key.len()
                    ),
                ));
            }
            other => other.map(Secret),
        };
        let jwt_leeway = duration(get, "JWT_LEEWAY", crate::auth::DEFAULT_LEEWAY)?;
        if jwt_leeway > crate::auth::MAX_LEEWAY {
            return Err(ConfigError::new(
                "JWT_LEEWAY",
                format!(
                    "({}) must be at most {}: a larger leeway keeps expired tokens alive",
                    human(jwt_leeway),
                    human(crate::auth::MAX_LEEWAY)
                ),
            ));
        }
        let audit_retention = duration(get, "AUDIT_RETENTION", Duration::from_secs(90 * 86_400))?;
        if audit_retention < Duration::from_secs(3600) {
            return Err(ConfigError::new("AUDIT_RETENTION", "must be at least 1h"));
        }
        let trusted_proxies = match get("TRUSTED_PROXIES") {
            None => Vec::new(),
            Some(list) => parse_networks(&list).map_err(|bad| {
                ConfigError::new(
                    "TRUSTED_PROXIES",
                    format!(
                        "`{bad}` is not an IP address or CIDR; give a comma-separated list such as 10.0.0.0/8, 192.168.1.7"
                    ),
                )
            })?,
        };
        Ok(CredentialsConfig {
            secret_key_previous,
            jwt_leeway,
            audit_retention,
            trusted_proxies,
        })
    }
}

/// Parses `10.0.0.0/8, 192.168.1.7, fd00::/8`; a bare address is a /32 or /128. Returns
/// the first entry that is neither.
pub(crate) fn parse_networks(list: &str) -> Result<Vec<ipnet::IpNet>, String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<ipnet::IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(ipnet::IpNet::from))
                .map(|n| n.trunc())
                .map_err(|_| s.to_string())
        })
        .collect()
}

/// Where the web UI's admin password comes from.
#[derive(Clone, Debug)]
pub enum AdminPasswordSource {
    /// ADMIN_PASSWORD was given.
    Given(Secret),
    /// Embedded default: a random password generated once and kept in the data directory.
    DataDir(PathBuf),
    /// Several replicas and no ADMIN_PASSWORD: sign-in is refused with a message saying so,
    /// because per-replica generated passwords would differ.
    Disabled,
}

/// Sign-in to the web UI.
#[derive(Clone, Debug)]
pub struct UiConfig {
    /// ADMIN_PASSWORD (or ADMIN_PASSWORD_FILE), the password generated in DATA_DIR, or
    /// sign-in disabled.
    pub admin_password: AdminPasswordSource,
    /// UI_SESSION_TTL: how long a sign-in lasts.
    pub(crate) session_ttl: Duration,
}

/// Minimum ADMIN_PASSWORD length.
pub(crate) const MIN_ADMIN_PASSWORD_CHARS: usize = 12;

impl UiConfig {
    fn parse(
        get: &impl Fn(&str) -> Option<String>,
        data_dir: &Path,
        clustered: bool,
    ) -> Result<Self, ConfigError> {
        let admin_password = match get("ADMIN_PASSWORD") {
            Some(p) if p.chars().count() < MIN_ADMIN_PASSWORD_CHARS => {
                return Err(ConfigError::new(
                    "ADMIN_PASSWORD",
                    format!(
                        "is {} characters; at least {MIN_ADMIN_PASSWORD_CHARS} are required (for example `openssl rand -base64 18`)",
                        p.chars().count()
                    ),
                ));
            }
            Some(p) => AdminPasswordSource::Given(Secret(p)),
            None if clustered => AdminPasswordSource::Disabled,
            None => AdminPasswordSource::DataDir(data_dir.join("admin_password")),
        };
        let session_ttl = duration(get, "UI_SESSION_TTL", Duration::from_secs(12 * 3600))?;
        if session_ttl < Duration::from_secs(60) {
            return Err(ConfigError::new("UI_SESSION_TTL", "must be at least 60s"));
        }
        Ok(UiConfig {
            admin_password,
            session_ttl,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_source(&move |k: &str| map.get(k).cloned())
    }

    #[test]
    fn no_environment_gives_the_embedded_default() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.listen, "0.0.0.0:8080".parse().unwrap());
        assert!(
            matches!(c.database, DatabaseUrl::Sqlite(ref p) if p == Path::new("./data/agent-server.db"))
        );
        assert!(matches!(c.secret_key, SecretKeySource::DataDir(_)));
        assert!(c.redis.is_none());
        assert_eq!(c.heartbeat_interval, Duration::from_secs(15));
        assert_eq!(c.offline_timeout, Duration::from_secs(60));
    }

    #[test]
    fn seed_configmap_and_secret_are_accepted_as_written() {
        let c = parse(&[
            ("SERVER_HOST", "0.0.0.0"),
            ("SERVER_PORT", "8080"),
            ("SERVER_URL", "https://agent.myelintek.com"),
            ("REDIS_HOST", "redis-service"),
            ("REDIS_PORT", "6379"),
            ("REDIS_DB", "0"),
            ("REDIS_PASSWORD", ""),
            ("WS_HEARTBEAT_INTERVAL", "15"),
            ("WS_OFFLINE_TIMEOUT", "60"),
            ("BINARY_STORAGE_PATH", "/storage/binaries"),
            ("LOG_LEVEL", "info"),
            (
                "DATABASE_URL",
                "postgresql://user:password@postgres-service:5432/agentdb",
            ),
            ("SECRET_KEY", "0123456789abcdef0123456789abcdef"),
            ("JWT_ALGORITHM", "HS256"),
            ("POD_ID", "agent-server-7d9f-abc"),
            ("POD_IP", "10.1.2.3"),
        ])
        .unwrap();
        assert_eq!(c.public_origin, "https://agent.myelintek.com");
        let redis = c.redis.unwrap();
        assert!(
            matches!(redis.target, RedisTarget::Direct { ref host, port: 6379 } if host == "redis-service")
        );
        assert!(!redis.tls);
        assert!(
            redis.password.is_none(),
            "an empty REDIS_PASSWORD means no password"
        );
        assert!(matches!(c.database, DatabaseUrl::Postgres(_)));
        assert_eq!(c.pod_id, "agent-server-7d9f-abc");
        assert_eq!(c.binary_storage_path, PathBuf::from("/storage/binaries"));
    }

    #[test]
    fn tls_needs_both_files() {
        let e = parse(&[("TLS_CERT_FILE", "/etc/tls/tls.crt")]).unwrap_err();
        assert_eq!(e.var, "TLS_KEY_FILE");
        let e = parse(&[("TLS_KEY_FILE", "/etc/tls/tls.key")]).unwrap_err();
        assert_eq!(e.var, "TLS_CERT_FILE");
        let c = parse(&[
            ("TLS_CERT_FILE", "/etc/tls/tls.crt"),
            ("TLS_KEY_FILE", "/etc/tls/tls.key"),
        ])
        .unwrap();
        let tls = c.tls.unwrap();
        assert_eq!(tls.cert, Path::new("/etc/tls/tls.crt"));
        assert!(parse(&[]).unwrap().tls.is_none());
    }

    #[test]
    fn short_secret_key_is_refused_with_its_length() {
        let e = parse(&[("SECRET_KEY", "your-secret-key-change")]).unwrap_err();
        assert_eq!(e.var, "SECRET_KEY");
        assert!(e.problem.contains("22 bytes"), "{e}");
    }

    #[test]
    fn only_hmac_algorithms_are_accepted() {
        for bad in ["none", "RS256", "hs256"] {
            let e = parse(&[("JWT_ALGORITHM", bad)]).unwrap_err();
            assert_eq!(e.var, "JWT_ALGORITHM");
        }
        assert_eq!(
            parse(&[("JWT_ALGORITHM", "HS512")]).unwrap().jwt_algorithm,
            Algorithm::HS512
        );
    }

    #[test]
    fn postgres_without_secret_key_is_refused() {
        let e = parse(&[("DATABASE_URL", "postgres://db/x")]).unwrap_err();
        assert_eq!(e.var, "SECRET_KEY");
    }

    #[test]
    fn database_url_errors_never_echo_the_url() {
        let e = parse(&[("DATABASE_URL", "mysql://u:hunter2@db/x")]).unwrap_err();
        assert_eq!(e.var, "DATABASE_URL");
        assert!(!e.to_string().contains("hunter2"));
    }

    #[test]
    fn offline_timeout_must_exceed_heartbeat() {
        let e = parse(&[
            ("WS_HEARTBEAT_INTERVAL", "60"),
            ("WS_OFFLINE_TIMEOUT", "60"),
        ])
        .unwrap_err();
        assert_eq!(e.var, "WS_OFFLINE_TIMEOUT");
    }

    #[test]
    fn invalid_numbers_name_the_variable_and_the_accepted_form() {
        let e = parse(&[("SERVER_PORT", "eighty")]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "SERVER_PORT: `eighty` is not a TCP port number (0-65535)"
        );
        let e = parse(&[("WS_HEARTBEAT_INTERVAL", "fast")]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("WS_HEARTBEAT_INTERVAL: `fast` is not a duration")
        );
    }

    #[test]
    fn durations_beyond_ten_years_are_refused_not_overflowed() {
        let huge = u64::MAX.to_string();
        for var in [
            "DRAIN_DELAY",
            "WS_SEND_TIMEOUT",
            "WS_HEARTBEAT_INTERVAL",
            "AUDIT_RETENTION",
        ] {
            let e = parse(&[(var, huge.as_str())]).unwrap_err();
            assert_eq!(e.var, var);
            assert!(e.to_string().contains("at most 3650d"), "{e}");
        }
        assert!(parse(&[("AUDIT_RETENTION", "3650d")]).is_ok());
    }

    #[test]
    fn statement_timeout_defaults_to_ten_seconds_and_stays_within_bounds() {
        assert_eq!(
            parse(&[]).unwrap().database_statement_timeout,
            Duration::from_secs(10)
        );
        let c = parse(&[("DATABASE_STATEMENT_TIMEOUT", "500ms")]).unwrap();
        assert_eq!(c.database_statement_timeout, Duration::from_millis(500));
        for bad in ["0", "50ms", "2h", "soon"] {
            let e = parse(&[("DATABASE_STATEMENT_TIMEOUT", bad)]).unwrap_err();
            assert_eq!(e.var, "DATABASE_STATEMENT_TIMEOUT");
            assert!(e.to_string().contains("from 100ms to 1h"), "{e}");
        }
    }

    #[test]
    fn outage_timeout_defaults_to_two_seconds_and_stays_within_bounds() {
        assert_eq!(
            parse(&[]).unwrap().database_outage_timeout,
            Duration::from_secs(2)
        );
        let c = parse(&[("DATABASE_OUTAGE_TIMEOUT", "1500ms")]).unwrap();
        assert_eq!(c.database_outage_timeout, Duration::from_millis(1500));
        for bad in ["0", "100ms", "2m", "soon"] {
            let e = parse(&[("DATABASE_OUTAGE_TIMEOUT", bad)]).unwrap_err();
            assert_eq!(e.var, "DATABASE_OUTAGE_TIMEOUT");
            assert!(e.to_string().contains("from 200ms to 60s"), "{e}");
        }
    }

    #[test]
    fn durations_accept_seconds_and_suffixes() {
        assert_eq!(parse_duration("15"), Some(Duration::from_secs(15)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1.5s"), None);
        assert_eq!(parse_duration("-1"), None);
    }

    #[test]
    fn origins_are_normalised_like_browsers_send_them() {
        assert_eq!(
            origin_of("https://Agent.Example.com/").as_deref(),
            Some("https://agent.example.com")
        );
        assert_eq!(
            origin_of("https://a.example:443/x").as_deref(),
            Some("https://a.example")
        );
        assert_eq!(
            origin_of("http://localhost:8080").as_deref(),
            Some("http://localhost:8080")
        );
        assert_eq!(origin_of("ftp://x"), None);
    }

    #[test]
    fn admin_password_is_generated_embedded_required_to_be_long_and_disabled_in_a_cluster() {
        assert!(matches!(
            parse(&[]).unwrap().ui.admin_password,
            AdminPasswordSource::DataDir(ref p) if p == Path::new("./data/admin_password")
        ));
        let e = parse(&[("ADMIN_PASSWORD", "hunter2")]).unwrap_err();
        assert_eq!(e.var, "ADMIN_PASSWORD");
        assert!(e.problem.contains("7 characters"), "{e}");
        let clustered = parse(&[
            ("DATABASE_URL", "postgres://db/x"),
            ("SECRET_KEY", "0123456789abcdef0123456789abcdef"),
        ])
        .unwrap();
        assert!(matches!(
            clustered.ui.admin_password,
            AdminPasswordSource::Disabled
        ));
    }

    #[test]
    fn fleet_settings_have_defaults_and_name_the_variable_when_invalid() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.releases.max_binary_bytes, 512 * 1024 * 1024);
        assert_eq!(c.releases.rollout_max_concurrent, 10);
        assert_eq!(c.releases.rollout_update_timeout, Duration::from_secs(900));
        let e = parse(&[("ROLLOUT_MAX_CONCURRENT", "0")]).unwrap_err();
        assert_eq!(e.var, "ROLLOUT_MAX_CONCURRENT");
        let e = parse(&[("MAX_BINARY_BYTES", "lots")]).unwrap_err();
        assert_eq!(e.var, "MAX_BINARY_BYTES");
    }

    #[test]
    fn credentials_settings_have_defaults_and_bounds() {
        let c = parse(&[]).unwrap().credentials;
        assert!(c.secret_key_previous.is_none());
        assert_eq!(c.jwt_leeway, Duration::from_secs(5));
        assert_eq!(c.audit_retention, Duration::from_secs(90 * 86_400));
        assert!(c.trusted_proxies.is_empty());
        let e = parse(&[("JWT_LEEWAY", "1h")]).unwrap_err();
        assert_eq!(e.var, "JWT_LEEWAY");
        let e = parse(&[("SECRET_KEY_PREVIOUS", "short")]).unwrap_err();
        assert_eq!(e.var, "SECRET_KEY_PREVIOUS");
        let e = parse(&[("TRUSTED_PROXIES", "10.0.0.0/8, proxy.local")]).unwrap_err();
        assert!(e.to_string().contains("`proxy.local`"), "{e}");
        let c = parse(&[("TRUSTED_PROXIES", "10.1.2.3/8, 192.168.1.7,fd00::/8")])
            .unwrap()
            .credentials;
        let shown: Vec<String> = c.trusted_proxies.iter().map(|n| n.to_string()).collect();
        assert_eq!(shown, ["10.0.0.0/8", "192.168.1.7/32", "fd00::/8"]);
    }

    #[test]
    fn secret_debug_output_is_redacted() {
        let c = parse(&[("SECRET_KEY", "0123456789abcdef0123456789abcdef-supersecret")]).unwrap();
        assert!(!format!("{c:?}").contains("supersecret"));
    }
    fn write_file(dir: &Path, name: &str, content: &str) -> String {
        let path = dir.join(name);
        std::fs::write(&path, content).unwrap();
        path.to_str().unwrap().to_string()
    }

    #[test]
    fn every_secret_setting_can_be_read_from_a_file_without_its_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let url = write_file(
            dir.path(),
            "url",
            "postgres://app:Vx7#kQ9?mz%2Lr:8@db/agents\n",
        );
        let key = write_file(dir.path(), "key", "0123456789abcdef0123456789abcdef\r\n");
        let admin = write_file(dir.path(), "admin", "an admin password\n\n");
        let redis = write_file(dir.path(), "redis", "redis-pass");
        let sentinel = write_file(dir.path(), "sentinel", "sentinel-pass\n");
        let c = parse(&[
            ("DATABASE_URL_FILE", &url),
            ("SECRET_KEY_FILE", &key),
            ("ADMIN_PASSWORD_FILE", &admin),
            ("REDIS_SENTINELS", "s1:26379, s2:26380"),
            ("REDIS_SENTINEL_MASTER", "mymaster"),
            ("REDIS_PASSWORD_FILE", &redis),
            ("REDIS_SENTINEL_PASSWORD_FILE", &sentinel),
        ])
        .unwrap();
        assert!(
            matches!(c.database, DatabaseUrl::Postgres(ref u) if u.expose() == "postgres://app:Vx7#kQ9?mz%2Lr:8@db/agents")
        );
        assert!(
            matches!(c.secret_key, SecretKeySource::Given(ref k) if k.expose() == "0123456789abcdef0123456789abcdef")
        );
        // Only one newline is trimmed: the rest is part of the value.
        assert!(
            matches!(c.ui.admin_password, AdminPasswordSource::Given(ref p) if p.expose() == "an admin password\n")
        );
        let redis = c.redis.unwrap();
        assert_eq!(redis.password.unwrap().expose(), "redis-pass");
        let RedisTarget::Sentinel(sentinel) = redis.target else {
            panic!("sentinel target expected");
        };
        assert_eq!(
            sentinel.nodes,
            vec![("s1".to_string(), 26379), ("s2".to_string(), 26380)]
        );
        assert_eq!(sentinel.master, "mymaster");
        assert_eq!(sentinel.password.unwrap().expose(), "sentinel-pass");
    }

    #[test]
    fn a_setting_given_both_directly_and_as_a_file_is_refused_naming_both() {
        let dir = tempfile::tempdir().unwrap();
        let key = write_file(dir.path(), "key", "0123456789abcdef0123456789abcdef");
        let e = parse(&[
            ("SECRET_KEY", "0123456789abcdef0123456789abcdef"),
            ("SECRET_KEY_FILE", &key),
        ])
        .unwrap_err();
        assert_eq!(e.var, "SECRET_KEY_FILE");
        assert!(e.problem.contains("SECRET_KEY and SECRET_KEY_FILE"), "{e}");
    }

    #[test]
    fn an_unreadable_secret_file_names_the_variable_and_the_path() {
        let e = parse(&[("REDIS_PASSWORD_FILE", "/nonexistent/redis-password")]).unwrap_err();
        assert_eq!(e.var, "REDIS_PASSWORD_FILE");
        assert!(e.problem.contains("/nonexistent/redis-password"), "{e}");
    }

    #[test]
    fn redis_tls_username_and_ca_are_parsed_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let ca = write_file(
            dir.path(),
            "ca.pem",
            "-----BEGIN CERTIFICATE-----\nMII\n-----END CERTIFICATE-----\n",
        );
        let c = parse(&[
            ("REDIS_HOST", "cache.example"),
            ("REDIS_PORT", "6380"),
            ("REDIS_TLS", "true"),
            ("REDIS_TLS_CA_FILE", &ca),
            ("REDIS_USERNAME", "agent-server"),
            ("SECRET_KEY", "0123456789abcdef0123456789abcdef"),
        ])
        .unwrap();
        let redis = c.redis.unwrap();
        assert!(redis.tls);
        assert_eq!(redis.username.as_deref(), Some("agent-server"));
        assert!(redis.tls_ca.is_some());
        let e = parse(&[("REDIS_HOST", "r"), ("REDIS_TLS", "maybe")]).unwrap_err();
        assert_eq!(e.var, "REDIS_TLS");
        let e = parse(&[("REDIS_HOST", "r"), ("REDIS_TLS_CA_FILE", &ca)]).unwrap_err();
        assert_eq!(e.var, "REDIS_TLS_CA_FILE");
        let not_pem = write_file(dir.path(), "x", "hello");
        let e = parse(&[
            ("REDIS_HOST", "r"),
            ("REDIS_TLS", "true"),
            ("REDIS_TLS_CA_FILE", &not_pem),
        ])
        .unwrap_err();
        assert!(e.problem.contains("no PEM certificate"), "{e}");
    }

    #[test]
    fn sentinels_need_host_port_pairs_and_a_master_name() {
        let e = parse(&[("REDIS_SENTINELS", "s1")]).unwrap_err();
        assert_eq!(e.var, "REDIS_SENTINELS");
        let e = parse(&[("REDIS_SENTINELS", "s1:26379")]).unwrap_err();
        assert_eq!(e.var, "REDIS_SENTINEL_MASTER");
    }

    #[test]
    fn configured_secrets_are_listed_for_redaction() {
        let c = parse(&[
            ("DATABASE_URL", "postgres://u:db-pass@db/x"),
            ("SECRET_KEY", "0123456789abcdef0123456789abcdef"),
            ("ADMIN_PASSWORD", "admin-password-1"),
            ("REDIS_HOST", "r"),
            ("REDIS_PASSWORD", "redis-pass"),
        ])
        .unwrap();
        let secrets = c.secrets();
        for s in [
            "postgres://u:db-pass@db/x",
            "0123456789abcdef0123456789abcdef",
            "admin-password-1",
            "redis-pass",
        ] {
            assert!(secrets.iter().any(|x| x == s), "{s} missing");
        }
    }
}
