//! The configuration parser on any values of the settings it reads: every value is
//! accepted or refused with an error naming its variable, never a panic. The `*_FILE`
//! forms, which read files, are left out.
#![no_main]

use std::collections::HashMap;

use agent_server::Config;
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;

const SETTINGS: &[&str] = &[
    "ADMIN_PASSWORD", "AUDIT_RETENTION", "BINARY_STORAGE_PATH", "COMMAND_SWEEP_INTERVAL",
    "DATABASE_POOL_SIZE", "DATABASE_STATEMENT_TIMEOUT", "DATABASE_URL", "DATA_DIR",
    "DRAIN_DELAY", "DRAIN_WINDOW", "HOSTNAME", "HTTP_HEADER_TIMEOUT", "JOB_PACER",
    "JWT_ALGORITHM", "JWT_LEEWAY", "LOG_FORMAT", "LOG_LEVEL", "MAX_BINARY_BYTES",
    "MAX_INVENTORY_BYTES", "METRICS_PORT", "POD_ID", "POD_IP", "REBALANCE", "REBALANCE_RATE",
    "REBALANCE_TOLERANCE", "REDIS_DB", "REDIS_HOST", "REDIS_KEY_PREFIX", "REDIS_PASSWORD",
    "REDIS_PORT", "REDIS_SENTINELS", "REDIS_SENTINEL_MASTER", "REDIS_SENTINEL_PASSWORD",
    "REDIS_TLS", "REDIS_USERNAME", "ROLLOUT_CHECK_INTERVAL", "ROLLOUT_MAX_CONCURRENT",
    "ROLLOUT_UPDATE_TIMEOUT", "SECRET_KEY", "SECRET_KEY_PREVIOUS", "SERVER_HOST",
    "SERVER_PORT", "SERVER_URL", "SHUTDOWN_TIMEOUT", "TRUSTED_PROXIES", "UI_SESSION_TTL",
    "WS_HEARTBEAT_INTERVAL", "WS_MAX_MESSAGE_BYTES", "WS_OFFLINE_TIMEOUT", "WS_SEND_TIMEOUT",
];

#[derive(Arbitrary, Debug)]
struct Input {
    values: Vec<(u8, String)>,
}

fuzz_target!(|input: Input| {
    let vars: HashMap<&str, String> = input
        .values
        .into_iter()
        .map(|(k, v)| (SETTINGS[k as usize % SETTINGS.len()], v))
        .collect();
    if let Err(e) = Config::from_source(&|k: &str| vars.get(k).cloned()) {
        assert!(!e.var.is_empty() && !e.problem.is_empty(), "{e:?}");
    }
});
